"""The autotuner's choices kept on disk (avalon.runtime.tuning_memo): a tuner of
the same step in a later process starts from the kept choice, compiles that
schedule alone and runs no trials until its first check."""
from __future__ import annotations

import time

import numpy as np
import pytest

import avalon
from avalon import parallel
from avalon.runtime import threads, tuning_memo
from avalon.runtime.threads import Autotuned, Later, ShardedFunction

KEY = "ab" * 32
ROUND = 2 * (Autotuned.WARMUP + Autotuned.TRIALS) + 1


@pytest.fixture
def memo(monkeypatch, tmp_path):
    """The memo on, in a directory of this test's own."""
    monkeypatch.setenv("AVALON_TUNING_CACHE", "1")
    monkeypatch.setattr(tuning_memo._MEMO, "directory", lambda: tmp_path)
    return tmp_path


class _Schedule:
    def __init__(self, call_s):
        self.call_s = call_s
        self.fn = self.__call__

    def __call__(self, *args):
        time.sleep(self.call_s)
        return args


def _tuner(built, slow=0.004, fast=0.001, key=KEY):
    def later(name, call_s):
        def build():
            built.append(name)
            return _Schedule(call_s)
        return Later(build)
    return Autotuned([("slow", later("slow", slow)), ("fast", later("fast", fast))], memo_key=key)


def test_a_choice_is_kept_and_a_later_tuner_starts_from_it(memo):
    first_built = []
    first = _tuner(first_built)
    for _ in range(ROUND):
        first(1)
    assert first.label == "fast" and not first.remembered
    assert tuning_memo.recall(KEY) == {"choice": "fast", "timings": first.timings}

    built = []
    later = _tuner(built)        # the same step compiled again, as in a new process
    assert later(7) == (7,)
    assert built == ["fast"], "the first call compiles the kept choice alone"
    assert later.remembered and later.label == "fast" and later.timings == first.timings
    for _ in range(ROUND):
        later(1)
    assert later.calls == [0, 0] and built == ["fast"], "no trials before the first check"


def test_a_kept_choice_is_checked_after_a_quarter_of_recheck_calls_and_the_new_one_kept(monkeypatch, memo):
    monkeypatch.setattr(Autotuned, "RECHECK", 20)
    tuning_memo.remember(KEY, "slow", {"slow": 0.001, "fast": 0.004})   # made under another load
    built = []
    tuned = _tuner(built)
    tuned(1)
    assert tuned.label == "slow" and built == ["slow"]
    for _ in range(4):
        tuned(1)
    assert tuned.calls == [0, 0], "no trials before the check"
    for _ in range(ROUND):
        tuned(1)
    assert tuned.label == "fast" and not tuned.remembered
    assert tuning_memo.recall(KEY)["choice"] == "fast"


@pytest.mark.parametrize("entry", [b"", b"{not json", b"x" * 80])
def test_a_damaged_entry_reads_as_none_and_the_schedules_are_timed(memo, entry):
    tuning_memo.remember(KEY, "fast", {"fast": 0.001})
    (memo / f"{KEY}.json").write_bytes(entry)
    assert tuning_memo.recall(KEY) is None
    built = []
    tuned = _tuner(built)
    tuned(1)
    assert built == ["slow"] and not tuned.remembered   # the first schedule, as without an entry


def test_a_kept_label_that_is_no_schedule_of_the_step_is_ignored(memo):
    tuning_memo.remember(KEY, "batch split across 8 threads", {"batch split across 8 threads": 0.001})
    built = []
    tuned = _tuner(built)
    tuned(1)
    assert built == ["slow"] and not tuned.remembered


def _mlp_loss(params, x):
    w1, w2 = params
    return avalon.mean(avalon.tanh(x @ w1) @ w2)


@pytest.fixture
def splittable(monkeypatch):
    """Small steps are split too (the batch split is their first schedule)."""
    monkeypatch.setattr(parallel, "MIN_SHARD_ELEMENTS", 0)


def _step_and_args():
    rng = np.random.default_rng(0)
    params = [rng.standard_normal((16, 32)).astype(np.float32), rng.standard_normal((32, 4)).astype(np.float32)]
    step = avalon.value_and_grad(_mlp_loss, argnums=0)
    step.clear_cache()       # compiled anew, as in a new process
    return step, (params, rng.standard_normal((64, 16)).astype(np.float32))


def test_a_compiled_step_starts_from_the_choice_an_earlier_compilation_kept(memo, splittable):
    step, args = _step_and_args()
    want = step(*args)
    tuned = step._last().compiled
    labels = [label for label, _ in tuned.candidates]
    assert labels[0] == "batch split across threads" and "one thread" in labels
    assert tuned._memo_key is not None
    tuning_memo.remember(tuned._memo_key, "one thread", {"one thread": 1e-4, "batch split across threads": 2e-4})

    again, _ = _step_and_args()       # compiled anew: the kept choice, not the first schedule
    got = again(*args)
    compiled = again._last().compiled
    assert compiled.remembered and compiled.label == "one thread"
    assert isinstance(compiled._candidates[0][1], Later), "the batch split was not compiled"
    assert compiled.calls == [0] * len(labels)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for g, w in zip(got[1][0], want[1][0]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_steps_of_other_shapes_or_graphs_have_keys_of_their_own(memo, splittable):
    step, (params, x) = _step_and_args()
    step(params, x)
    step(params, x[:32])
    graphs = [entry.shared.primary.graph for entry in step._cache.values()]
    labels = ["batch split across threads", "one thread"]
    keys = {tuning_memo.key_of(g, labels, None) for g in graphs}
    assert len(keys) == 2
    assert tuning_memo.key_of(graphs[0], labels[1:], None) not in keys


def test_off_with_avalon_tuning_cache_0(monkeypatch, memo, splittable):
    monkeypatch.setenv("AVALON_TUNING_CACHE", "0")
    step, args = _step_and_args()
    for _ in range(3 * ROUND):
        step(*args)
    tuned = step._last().compiled
    assert tuned.choice is not None and tuned._memo_key is None
    assert list(memo.iterdir()) == []


def test_the_split_schedule_runs_first_without_a_kept_choice(memo, splittable):
    step, args = _step_and_args()
    step(*args)
    tuned = step._last().compiled
    assert isinstance(tuned._candidates[0][1], ShardedFunction) and tuned.calls[0] == 1
    assert not tuned.remembered and threads._turn is not None
