"""Where a run writes (a quick run never replaces a full run's results) and the
progress bars within epochs (on a terminal only)."""
import datetime
import json

import pytest

from avalon_bench import cli, progressbar
from avalon_bench.measure import run_epoch, train_interleaved
from avalon_bench.steps import measure_steps

STARTED = datetime.datetime(2026, 11, 30, 2, 0, 0)


@pytest.mark.parametrize("argv, expected", [
    ([], "results/2026-11-30-020000"),
    (["--quick"], "results/quick-2026-11-30-020000"),
    (["--quick", "--out", "mine"], "mine"),
])
def test_default_output_folders_keep_quick_runs_apart(argv, expected):
    assert cli.output_dir(cli.parse_args(argv), STARTED).as_posix() == expected


def _previous_run(folder, quick):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"config": {"quick": quick}}), encoding="utf-8")
    (folder / "results.md").write_text("the full run's table", encoding="utf-8")


def test_a_quick_run_refuses_to_overwrite_a_full_run(tmp_path):
    _previous_run(tmp_path, quick=False)
    with pytest.raises(SystemExit, match="holds the results of a full run"):
        cli.main(["--quick", "--data", "synthetic", "--out", str(tmp_path)])
    assert (tmp_path / "results.md").read_text(encoding="utf-8") == "the full run's table"


@pytest.mark.parametrize("quick_before, quick_now", [(True, True), (False, False), (True, False)])
def test_other_runs_may_replace_earlier_results(tmp_path, quick_before, quick_now):
    _previous_run(tmp_path, quick=quick_before)
    cli.check_output_dir(tmp_path, quick_now)  # does not exit
    cli.check_output_dir(tmp_path / "empty", True)


class FakeTrainer:
    label = "Avalon (CPU)"
    key = "avalon"

    def step(self, batch):
        return 1.0


class FakeBatches:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def batches(self, epoch):
        return iter([(epoch, i) for i in range(self.n)])


def test_an_epoch_shows_a_bar_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progressbar, "interactive", lambda: True)
    monkeypatch.setattr(progressbar, "REFRESH_S", 0)  # draw every update
    log = run_epoch(FakeTrainer(), FakeBatches(5), epoch=1, max_batches=3, epochs=4)
    err = capsys.readouterr().err
    assert "Avalon (CPU) epoch 2/4" in err and "3/3" in err and "batch" in err
    assert len(log.losses) == 3


def test_no_bar_when_not_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progressbar, "interactive", lambda: False)
    records = train_interleaved([FakeTrainer()], FakeBatches(4), epochs=2, progress=lambda msg: None)
    out, err = capsys.readouterr()
    assert err == "" and out == ""
    assert [len(e.losses) for e in records["avalon"].epochs] == [4, 4]


def test_interleaved_epochs_name_the_total(monkeypatch, capsys):
    monkeypatch.setattr(progressbar, "interactive", lambda: True)
    monkeypatch.setattr(progressbar, "REFRESH_S", 0)  # draw every update
    train_interleaved([FakeTrainer()], FakeBatches(2), epochs=3, progress=lambda msg: None)
    err = capsys.readouterr().err
    assert "epoch 1/3" in err and "epoch 3/3" in err


def test_step_rows_show_a_bar_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(progressbar, "interactive", lambda: True)
    monkeypatch.setattr(progressbar, "REFRESH_S", 0)  # draw every update
    figures = measure_steps({"a": FakeTrainer(), "b": FakeTrainer()}, [1, 2, 3], warmup=1, desc="lstm steps")
    err = capsys.readouterr().err
    assert "lstm steps" in err and "3/3" in err
    assert figures["a"]["steps_timed"] == 2


def test_interactive_needs_both_streams_on_a_terminal(monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    for out, err, expected in [(True, True, True), (True, False, False), (False, True, False)]:
        monkeypatch.setattr("sys.stdout", Stream(out))
        monkeypatch.setattr("sys.stderr", Stream(err))
        assert progressbar.interactive() is expected


def test_latencies_take_turns_in_blocks_after_the_warm_up(monkeypatch):
    from avalon_bench import measure
    from avalon_bench.measure import latencies
    pauses = []
    monkeypatch.setattr(measure, "settle", lambda: pauses.append(1))
    order = []
    calls = {k: (lambda k=k: order.append(k)) for k in ("a", "b")}
    figures = latencies(calls, repeats=25, warmup=2, block=10)
    assert order == ["a"] * 2 + ["b"] * 2 + ["a"] * 10 + ["b"] * 20 + ["a"] * 15 + ["b"] * 5
    assert figures["a"]["calls"] == figures["b"]["calls"] == 25
    assert len(pauses) == 6   # before each block


def test_step_rows_take_turns_in_blocks(monkeypatch):
    from avalon_bench import steps
    monkeypatch.setattr(steps, "settle", lambda: None)
    order = []

    class Trainer:
        def __init__(self, key):
            self.key = key

        def step(self, batch):
            order.append((self.key, batch))
            return 1.0
    block = steps.BLOCK_STEPS
    figures = measure_steps({"a": Trainer("a"), "b": Trainer("b")}, list(range(2 * block + 2)), warmup=2)
    assert order[:2 * block] == [("a", i) for i in range(block)] + [("b", i) for i in range(block)]
    assert order[2 * block:4 * block] == ([("b", i) for i in range(block, 2 * block)]
                                          + [("a", i) for i in range(block, 2 * block)])
    assert order[4 * block:] == [("a", 2 * block), ("a", 2 * block + 1), ("b", 2 * block), ("b", 2 * block + 1)]
    assert figures["a"]["steps_timed"] == figures["b"]["steps_timed"] == 2 * block


def test_the_steps_table_states_what_each_schedule_was_timed_at():
    from avalon_bench.steps import markdown

    def row(name, schedule, timings):
        step = {"step_s": 0.008, "first_step_s": 0.5}
        return {"workload": {"name": name, "title": f"{name} model"}, "warmup_steps": 20, "ratio": 1.3, "goal": 1.0,
                "met": False, "max_relative_loss_difference": 1e-5, "avalon_schedule": schedule,
                "avalon_schedule_timings": timings, "frameworks": {"avalon": step, "torch_eager": step}}
    table = markdown({"lstm": row("lstm", "batch split across threads",
                                  {"one thread": 0.011, "batch split across threads": 0.0084}),
                      "resnet": row("resnet", "(still timing)", {})})
    assert "- lstm: batch split across threads 8.40 ms, one thread 11.00 ms" in table
    assert "- resnet:" not in table
    kept = row("lstm", "one thread", {"one thread": 0.007, "batch split across threads": 0.0084})
    kept["avalon_schedule_remembered"] = True
    assert "- lstm (kept): one thread 7.00 ms, batch split across threads 8.40 ms" in markdown({"lstm": kept})


@pytest.mark.parametrize("builds, compile_s, goal, met", [
    (0, 0.045, "< 50 ms", True), (0, 0.060, "< 50 ms", False),      # warm: every kernel from the disk cache
    (3, 0.600, "< 1 s", True), (1, 1.200, "< 1 s", False),          # cold: the C compiler ran
    (None, 0.600, "< 1 s", True)])                                  # not counted: the cold goal
def test_the_compile_goal_is_the_warm_one_when_no_kernel_was_built(builds, compile_s, goal, met):
    from avalon_bench import report
    avalon = {"compile_s": compile_s, **({} if builds is None else {"compile_builds": builds})}
    t = report.compile_target(avalon)
    assert t["goal"] == goal and t["met"] is met
    assert ("warm" in t["target"]) == (builds == 0)
    if builds:
        assert f"{builds} C compiler run" in t["target"]


def test_a_warm_compile_of_a_kept_schedule_says_so():
    from avalon_bench import report
    kept = report.compile_target({"compile_s": 0.04, "compile_builds": 0, "compile_remembered": True})
    timed = report.compile_target({"compile_s": 0.04, "compile_builds": 0, "compile_remembered": False})
    assert "the schedule an earlier run chose" in kept["target"]
    assert "earlier run" not in timed["target"] and kept["met"] and timed["met"]
