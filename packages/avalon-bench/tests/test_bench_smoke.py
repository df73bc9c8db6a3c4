"""Smoke test of `python -m avalon_bench`: a quick run on synthetic data writes the
table, the JSON with every figure and ratio, and the chart, and the two frameworks,
trained from the same weights on the same batches, report finite, matching losses."""
import json
import math
import os
import subprocess
import sys

import pytest

FIGURES = ("compile_s", "time_per_epoch_s", "total_s", "predict_batch_s", "predict_sample_s", "final_loss",
           "test_metric", "peak_memory_mib")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "avalon_bench", "--which", "all", "--quick", "--data", "synthetic",
           "--torch-compile", "off", "--out", str(out)]
    # The run takes ~30 s; the limit leaves room for a loaded, shared machine.
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out / "results.json", encoding="utf-8") as f:
        return out, json.load(f), proc.stdout


def test_writes_table_json_and_chart(run):
    out, info, stdout = run
    table = (out / "results.md").read_text(encoding="utf-8")
    for benchmark in ("## CNN", "## VAE"):
        assert benchmark in table
    for row in ("| Avalon (CPU) |", "| PyTorch eager (CPU) |", "| PyTorch eager, tuned malloc (CPU) |",
                "| torch.compile (CPU) | skipped: --torch-compile off", "| **Avalon / PyTorch eager** |"):
        assert row in table
    assert "| compile | time/epoch | total time | prediction (batch) | prediction (sample) |" in table
    assert "## CNN" in stdout  # the table is printed too
    png = (out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_json_holds_machine_and_versions(run):
    _, info, _ = run
    assert info["machine"]["cores"] >= 1 and info["machine"]["cpu"]
    for lib in ("python", "numpy", "torch", "avalon"):
        assert info["versions"][lib]
    assert info["data"]["kind"] == "synthetic" and "synthetic" in info["data"]["description"]
    assert info["threads"]["torch"] == info["machine"]["cores"]
    assert set(info["benchmarks"]) == {"cnn", "vae"}
    assert set(info["steps"]) == {"resnet", "lstm"}


@pytest.mark.parametrize("name", ["resnet", "lstm"])
def test_step_rows_compare_models_the_benchmarks_never_saw(run, name):
    """The zoo's ResNet and LSTM classifier: one training step each side, same
    weights and batches, so the losses agree step by step; the ratio is the
    median step time of Avalon over PyTorch eager's."""
    out, info, _ = run
    row = info["steps"][name]
    a, t = row["frameworks"]["avalon"], row["frameworks"]["torch_eager"]
    assert a["step_s"] > 0 and t["step_s"] > 0 and a["steps_timed"] == t["steps_timed"] > 0
    assert row["ratio"] == pytest.approx(a["step_s"] / t["step_s"])
    assert row["met"] == (row["ratio"] <= row["goal"]) and row["goal"] == 1.0
    assert len(a["losses"]) == len(t["losses"]) and row["losses_agree"], row["max_relative_loss_difference"]
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "## Training steps of models the benchmarks never saw" in table
    assert row["workload"]["title"] in table
    # the schedule Avalon's step ran is stated: one its autotuner compiles, or, after the few steps
    # of --quick, that the autotuner is still timing them
    assert row["avalon_schedule"] in ("batch split across threads", "one thread", "BLAS on 2 threads",
                                      "independent parts across threads", "one thread (the only schedule compiled)",
                                      "(still timing)")
    assert f"| {row['avalon_schedule']} |" in table
    # and what the autotuner timed each schedule at, once it chose
    timings = row["avalon_schedule_timings"]
    assert all(seconds > 0 for seconds in timings.values())
    if timings:
        from avalon_bench.report import schedule_timings_text
        assert row["avalon_schedule"] in timings
        # "(kept)": timed by an earlier run, whose choice the tuning cache of this machine held
        kept = " (kept)" if row["avalon_schedule_remembered"] else ""
        assert f"- {row['workload']['name']}{kept}: {schedule_timings_text(timings)}" in table


@pytest.mark.parametrize("name", ["cnn", "vae"])
def test_every_figure_and_ratio_is_there(run, name):
    out, info, _ = run
    result = info["benchmarks"][name]
    for key in ("avalon", "torch_eager"):
        f = result["frameworks"][key]
        for figure in FIGURES:
            assert isinstance(f[figure], (int, float)) and math.isfinite(f[figure]), (key, figure, f[figure])
        assert f["time_per_epoch_s"] > 0 and f["predict_batch_s"] > 0 and f["peak_memory_mib"] > 0
        assert f["steps_per_epoch"] == [8, 8]
    tuned = result["frameworks"]["torch_tuned_malloc"]
    assert tuned["time_per_epoch_s"] > 0 and tuned["malloc"]["MALLOC_MMAP_THRESHOLD_"]
    assert "quick" in result["skipped"]["torch_compile"] or "off" in result["skipped"]["torch_compile"]
    assert set(result["ratios"]) == set(FIGURES)
    t, a = result["frameworks"]["torch_eager"], result["frameworks"]["avalon"]
    assert result["ratios"]["time_per_epoch_s"] == pytest.approx(a["time_per_epoch_s"] / t["time_per_epoch_s"])
    assert {t["met"] for t in result["targets"]} <= {True, False, None}
    (compile_target,) = [t for t in result["targets"] if t["target"].startswith("compile (")]
    assert isinstance(a["compile_builds"], int) and a["compile_builds"] >= 0
    assert ("warm" in compile_target["target"]) == (a["compile_builds"] == 0)
    names = " / ".join(t["target"] for t in result["targets"])
    for what in ("vs PyTorch eager", "tuned malloc", "torch.compile", "compile (", "prediction latency, batch",
                 "prediction latency, one sample", "final training loss", "per-epoch mean losses"):
        assert what in names
    missed = [t["target"] for t in result["targets"] if t["met"] is False]
    # A missed speed target comes with the profile that explains it.
    if any("time per epoch" in m or m.startswith("compile") for m in missed):
        assert "profile of" in result["profile"]
        schedule = result["step_breakdown"]["schedule"]
        assert schedule.startswith(("batch split", "one thread", "BLAS on", "independent parts")), schedule
        assert f'run as "{schedule}"' in (out / "results.md").read_text(encoding="utf-8")
        assert isinstance(result["step_breakdown"]["timings"], dict)
    if any(m.startswith("prediction") for m in missed):
        assert "profile of" in result["profile_predict"]


@pytest.mark.parametrize("name, first_step_rtol, epoch_rtol", [
    # Same weights, same batch, no randomness: the same loss up to float32 rounding.
    ("cnn", 1e-4, 1e-3),
    # The VAE draws its own noise in each framework: equal only within that noise.
    ("vae", 0.05, 0.05),
])
def test_losses_are_finite_and_close(run, name, first_step_rtol, epoch_rtol):
    _, info, _ = run
    fw = info["benchmarks"][name]["frameworks"]
    a, t, tuned = fw["avalon"], fw["torch_eager"], fw["torch_tuned_malloc"]
    for f in (a, t, tuned):
        assert len(f["losses"]) == 16 and all(math.isfinite(v) for v in f["losses"])
    assert a["losses"][0] == pytest.approx(t["losses"][0], rel=first_step_rtol)
    assert a["epoch_mean_losses"] == pytest.approx(t["epoch_mean_losses"], rel=epoch_rtol)
    # The subprocess trains the same torch model on the same batches.
    assert tuned["losses"][0] == pytest.approx(t["losses"][0], rel=first_step_rtol)
