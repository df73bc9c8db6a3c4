"""`python -m avalon_bench`: train the zoo's CNN and VAE with Avalon and with
PyTorch side by side, and write the comparison (markdown, JSON, PNG) to --out.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

from avalon_zoo.datasets import DatasetNotFoundError

from . import report
from .data import load
from .frameworks import AvalonTrainer, TorchTrainer
from .machine import load_average, machine, uptime, versions
from .measure import latencies, train_interleaved
from .remote import TunedAllocatorTrainer, peak_memory
from .steps import run_step_workload, selected_steps
from .worker import cpu_cores, set_torch_threads
from .workloads import GPU_EPOCH_GOAL, selected

# What a full run and a quick (smoke) run do.
FULL = {"epochs": 3, "max_batches": None, "test_examples": None, "latency_repeats": (50, 200),
        "memory_steps": 20, "step_warmup": 20, "steps": 40}
QUICK = {"epochs": 2, "max_batches": 8, "test_examples": 1000, "latency_repeats": (10, 20),
         "memory_steps": 3, "step_warmup": 2, "steps": 4}
PROFILE_LINES = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m avalon_bench", description=__doc__)
    p.add_argument("--which", choices=("all", "cnn", "vae", "resnet", "lstm"), default="all",
                   help="which benchmark (default: all); resnet and lstm time training steps only")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default: {FULL['epochs']}; {QUICK['epochs']} with --quick)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--data", choices=("auto", "real", "synthetic"), default="auto",
                   help="auto: Fashion-MNIST when installed, else synthetic data of its shape")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke run: {QUICK['max_batches']} batches per epoch, small evaluation, "
                        "no torch.compile (under a minute)")
    p.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                   help="the torch.compile column (auto: on, except with --quick)")
    p.add_argument("--out", default=None,
                   help="output directory (default: results/<timestamp>, results/quick-<timestamp> with --quick); "
                        "a quick run never writes over a full run's results")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def settings(args) -> dict:
    s = dict(QUICK if args.quick else FULL)
    if args.epochs is not None:
        s["epochs"] = args.epochs
    return s


def torch_compile_plan(args) -> str | None:
    """None to run torch.compile, else why it is skipped."""
    if args.torch_compile == "off":
        return "--torch-compile off"
    if args.torch_compile == "auto" and args.quick:
        return "--quick (its compilation alone takes longer than a quick run)"
    return None


def output_dir(args, started: datetime.datetime) -> Path:
    """--out, or a new dated folder under ./results (quick runs apart from full ones)."""
    if args.out:
        return Path(args.out)
    stamp = started.strftime("%Y-%m-%d-%H%M%S")
    return Path("results") / (f"quick-{stamp}" if args.quick else stamp)


def check_output_dir(out: Path, quick: bool) -> None:
    """A quick run must not replace the results of a full run (its figures are
    not worth quoting): exit, saying so, before anything runs."""
    previous = out / "results.json"
    if not quick or not previous.is_file():
        return
    try:
        was_quick = json.loads(previous.read_text(encoding="utf-8"))["config"]["quick"]
    except (OSError, ValueError, KeyError, TypeError):
        was_quick = False  # unreadable: treat as a full run's, keep it
    if not was_quick:
        raise SystemExit(f"avalon_bench: {out} holds the results of a full run; a --quick run would "
                         "overwrite them: give another --out (nox -s bench -- --quick writes to "
                         "packages/avalon-bench/results/quick)")


def check_device(device: str) -> None:
    if device == "cpu":
        return
    import torch

    import avalon
    if not torch.cuda.is_available():
        raise SystemExit(f"avalon_bench: --device {device}: PyTorch {torch.__version__} sees no CUDA device")
    try:
        avalon.device(device)
    except Exception as exc:  # noqa: BLE001 - said to the user as it is
        raise SystemExit(f"avalon_bench: --device {device}: Avalon cannot use it: {exc}") from None


def progress(msg: str) -> None:
    print(msg, flush=True)


def run_workload(wl, data, args, cfg) -> dict:
    progress(f"== {wl.name.upper()}: {wl.title}")
    batches = wl.batches(data)
    steps = len(batches) if cfg["max_batches"] is None else min(len(batches), cfg["max_batches"])
    torch_model = wl.torch_model()
    compile_init = copy.deepcopy(torch_model)       # torch.compile starts from the same weights
    trainers = [AvalonTrainer(wl, torch_model, args.device), TorchTrainer(wl, torch_model, args.device)]
    skipped, tuned = {}, None
    try:
        tuned = TunedAllocatorTrainer(wl.name, data.kind, args.quick, args.device)
        trainers.append(tuned)
    except Exception as exc:  # noqa: BLE001 - reported
        skipped["torch_tuned_malloc"] = f"the subprocess did not start: {exc}"
    why_not_compile = torch_compile_plan(args)
    if why_not_compile is None:
        compiled = TorchTrainer(wl, compile_init, args.device, compiled=True)
        compiled.optional = True
        trainers.append(compiled)
    else:
        skipped["torch_compile"] = why_not_compile
    try:
        records = train_interleaved(trainers, batches, cfg["epochs"], cfg["max_batches"], progress)
    finally:
        if tuned is not None:
            tuned.close()

    local = [t for t in trainers if t is not tuned and not records[t.key].failed]
    x_test, y_test = wl.test_set(data, cfg["test_examples"])
    progress("  prediction latency ...")
    n_batch, n_sample = cfg["latency_repeats"]
    lat_batch = latencies({t.key: t.predictor(x_test[:wl.batch_size]) for t in local}, n_batch)
    predict_schedule = next((t.forward_schedule() for t in local if hasattr(t, "forward_schedule")), None)
    lat_sample = latencies({t.key: t.predictor(x_test[:1]) for t in local}, n_sample)
    progress(f"  {wl.metric} on {len(x_test)} test examples ...")
    metrics = {t.key: t.evaluate(x_test, y_test) for t in local}
    progress("  peak memory (one subprocess per framework) ...")
    memory = peak_memory(wl.name, [t.key for t in local], cfg["memory_steps"], args.device)

    frameworks = {}
    for t in trainers:
        rec = records[t.key]
        f = {"label": t.label, **rec.summary()}
        if rec.epochs:
            times, losses = rec.curve()
            f["losses"] = [float(f"{v:.6g}") for v in losses]
            f["curve_s"] = [round(v, 4) for v in times]
        if t is tuned:
            f["malloc"] = tuned.info.get("malloc", {})
        if getattr(t, "first_step_builds", None) is not None:
            f["compile_builds"] = t.first_step_builds
            f["compile_remembered"] = t.first_step_remembered
        if t.key in lat_batch:
            f["predict_batch"], f["predict_sample"] = lat_batch[t.key], lat_sample[t.key]
            f["predict_batch_s"] = lat_batch[t.key].get("median_s")
            f["predict_sample_s"] = lat_sample[t.key].get("median_s")
        if t.key in metrics:
            f["test_metric"] = metrics[t.key]
        if t.key in memory:
            f["memory"] = memory[t.key]
            f["peak_memory_mib"] = memory[t.key].get("delta_mib")
        frameworks[t.key] = f

    epoch_goal = wl.cpu_epoch_goal if args.device == "cpu" else GPU_EPOCH_GOAL
    result = {"workload": {"name": wl.name, "title": wl.title, **wl.hyperparameters()},
              "epochs": cfg["epochs"], "steps_per_epoch": steps, "max_batches": cfg["max_batches"],
              "test_examples": len(x_test), "epoch_goal": epoch_goal,
              "frameworks": frameworks, "skipped": skipped}
    result["ratios"] = report.ratios(frameworks, wl.metric)
    result["loss_agreement"] = report.loss_agreement(frameworks["avalon"], frameworks["torch_eager"])
    result["targets"] = report.targets(result, args.device, epoch_goal)
    result["profile"] = result["profile_predict"] = None
    result["predict_schedule"] = predict_schedule
    avalon_trainer = trainers[0]
    if report.training_missed(result["targets"]):
        progress("  profiling the Avalon training step (a speed target is missed) ...")
        first = next(iter(batches.batches(0)))
        first = first if isinstance(first, tuple) else (first,)
        prof = avalon_trainer.profile(first)
        result["profile"] = _top(prof)
        # Last: it trains the model a few more steps.
        result["step_breakdown"] = {**avalon_trainer.step_breakdown(first), "kernels_s": prof.total,
                                    "profiled": prof.name}
    if report.prediction_missed(result["targets"]):
        progress("  profiling the Avalon prediction (a latency target is missed) ...")
        result["profile_predict"] = _top(avalon_trainer.profile_predict(x_test[:wl.batch_size]))
    return result


def _top(profile_report) -> str:
    """The header, the PROFILE_LINES slowest kernels and the per-op summary of a profile."""
    text = str(profile_report).splitlines()
    return "\n".join(text[:2 + PROFILE_LINES] + text[-1:])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cfg = settings(args)
    started = datetime.datetime.now().astimezone()
    out = output_dir(args, started)
    check_output_dir(out, args.quick)
    check_device(args.device)
    try:
        data = load(args.data, quick=args.quick)
    except DatasetNotFoundError as exc:   # --data real without the data: say how to get it
        raise SystemExit(f"avalon_bench: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)
    set_torch_threads()
    import avalon.parallel
    info = {"started": started.isoformat(timespec="seconds"),
            "command": " ".join(["python -m avalon_bench", *argv]),
            "config": {**vars(args), **cfg, "test_examples": cfg["test_examples"] or "all"},
            "machine": machine(), "versions": versions(),
            "threads": {"torch": cpu_cores(), "avalon": avalon.parallel.shard_count()},
            "load": {"uptime_before": uptime(), "loadavg_before": load_average()}}
    info["data"] = {"kind": data.kind, "description": data.description}
    progress(f"avalon_bench: {data.description}; results go to {out}")
    t0 = time.perf_counter()
    info["benchmarks"] = {wl.name: run_workload(wl, data, args, cfg) for wl in selected(args.which)}
    info["steps"] = {wl.name: run_step_workload(wl, data, cfg["steps"], cfg["step_warmup"], args.device, progress)
                     for wl in selected_steps(args.which)}
    info["wall_s"] = time.perf_counter() - t0
    info["load"].update(uptime_after=uptime(), loadavg_after=load_average())

    text = report.markdown(info)
    (out / "results.md").write_text(text, encoding="utf-8")
    report.write_json(info, out / "results.json")
    written = [out / "results.md", out / "results.json"]
    if report.write_chart(info, out / "results.png"):
        written.append(out / "results.png")
    progress("\n" + text)
    progress(f"avalon_bench: wrote {', '.join(map(str, written))}")
    return 0
