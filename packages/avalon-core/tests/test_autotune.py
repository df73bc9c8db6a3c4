"""The autotuner of compiled schedules (avalon.runtime.threads.Autotuned)
chooses by the time of the whole loop iteration as the caller runs it: from
one call to the next, so what runs between the calls (an optimizer update,
slowed by threads a schedule leaves spinning) counts against that schedule."""
from __future__ import annotations

import time

from avalon.runtime import threads
from avalon.runtime.threads import Autotuned


class _Schedule:
    """A compiled schedule stand-in: `call_s` seconds per call, and `after_s`
    seconds of slowdown it leaves for the caller's next piece of work."""

    def __init__(self, call_s, after_s, log):
        self.call_s, self.after_s, self.log = call_s, after_s, log
        self.fn = self.__call__

    def __call__(self, *args):
        time.sleep(self.call_s)
        self.log["penalty"] = self.after_s
        return args


def _train(tuned, log, steps, update_s=0.002):
    for _ in range(steps):
        tuned(1)
        time.sleep(update_s + log.pop("penalty", 0.0))   # the optimizer update, slowed or not


def test_the_whole_iteration_decides_not_the_call_alone():
    log = {}
    fast_call_slow_after = _Schedule(0.002, 0.010, log)    # BLAS threads: quick call, spinning afterwards
    steady = _Schedule(0.004, 0.0, log)
    tuned = Autotuned([("spins afterwards", fast_call_slow_after), ("steady", steady)])
    _train(tuned, log, 2 * (Autotuned.WARMUP + Autotuned.TRIALS) + 1)
    assert tuned.label == "steady"


def test_the_faster_iteration_wins_when_nothing_spins():
    log = {}
    tuned = Autotuned([("slow", _Schedule(0.008, 0.0, log)), ("fast", _Schedule(0.002, 0.0, log))])
    _train(tuned, log, 2 * (Autotuned.WARMUP + Autotuned.TRIALS) + 1)
    assert tuned.label == "fast"


def test_every_call_returns_its_own_result_while_timing():
    log = {}
    tuned = Autotuned([("a", _Schedule(0.0, 0.0, log)), ("b", _Schedule(0.0, 0.0, log))])
    assert [tuned(k) for k in range(12)] == [(k,) for k in range(12)]


def test_a_schedule_is_compiled_when_first_tried():
    from avalon.runtime.threads import Later
    log, built = {}, []

    def later(name, call_s):
        def build():
            built.append(name)
            return _Schedule(call_s, 0.0, log)
        return Later(build)
    tuned = Autotuned([("first", later("first", 0.003)), ("second", later("second", 0.001))])
    tuned(1)
    assert built == ["first"], "the first call compiles one schedule"
    _train(tuned, log, Autotuned.WARMUP + Autotuned.TRIALS)
    assert built == ["first", "second"]
    _train(tuned, log, Autotuned.WARMUP + Autotuned.TRIALS)
    assert tuned.label == "second" and built == ["first", "second"]   # each built once


def test_reading_the_candidates_compiles_them_all():
    from avalon.runtime.threads import Later
    tuned = Autotuned([("a", Later(lambda: _Schedule(0.0, 0.0, {}))), ("b", Later(lambda: _Schedule(0.0, 0.0, {})))])
    assert all(isinstance(c, _Schedule) for _, c in tuned.candidates)


def _first_round(call_a, call_b, log, names=("a", "b")):
    """Two schedules of call_a and call_b seconds, through their first round of
    trials (no work between the calls); returns (tuned, schedule a, schedule b)."""
    a, b = _Schedule(call_a, 0.0, log), _Schedule(call_b, 0.0, log)
    tuned = Autotuned([(names[0], a), (names[1], b)])
    _train(tuned, log, 2 * (Autotuned.WARMUP + Autotuned.TRIALS) + 1, update_s=0.0)
    return tuned, a, b


def test_the_choice_is_checked_again_when_the_load_changes(monkeypatch):
    monkeypatch.setattr(Autotuned, "RECHECK", 12)
    log = {}
    tuned, a, b = _first_round(0.001, 0.0025, log)
    assert tuned.label == "a"
    a.call_s = 0.006        # another process now slows schedule a
    _train(tuned, log, 12 + 2 * (Autotuned.WARMUP + Autotuned.TRIALS) + 1, update_s=0.0)
    assert tuned.label == "b"
    assert tuned._next_check == 24                   # the next check comes twice as late


def test_a_schedule_far_slower_than_the_choice_is_given_up_in_a_later_round(monkeypatch):
    monkeypatch.setattr(Autotuned, "RECHECK", 12)
    log = {}
    tuned, fast, awful = _first_round(0.001, 0.002, log, names=("fast", "awful"))
    awful.call_s = 0.02     # its BLAS threads now starve: 20x the choice
    calls_before = tuned.calls[1]
    _train(tuned, log, 12 + 2 * (Autotuned.WARMUP + Autotuned.TRIALS), update_s=0.0)
    assert tuned.label == "fast"
    assert tuned.calls[1] <= Autotuned.WARMUP + 2 < calls_before   # warm-ups, two timed calls: given up


class _SlowOnce(_Schedule):
    """A schedule whose next `slow_calls` calls take `slow_s` (cold caches, a page fault,
    a collection), the ones after that `call_s`."""

    def __init__(self, call_s, log):
        super().__init__(call_s, 0.0, log)
        self.slow_calls, self.slow_s = 0, 0.0

    def __call__(self, *args):
        if self.slow_calls:
            self.slow_calls -= 1
            time.sleep(self.slow_s)
            return args
        return super().__call__(*args)


def test_the_choice_is_timed_in_full_in_a_later_round():
    """One slow iteration of the current choice (here its first timed one) does not
    end its trials: a later round that gave the choice up would pick a slower schedule."""
    log = {}
    a, b = _SlowOnce(0.001, log), _Schedule(0.003, 0.0, log)
    tuned = Autotuned([("b", b), ("a", a)])
    _train(tuned, log, 2 * (Autotuned.WARMUP + Autotuned.TRIALS) + 1, update_s=0.0)
    assert tuned.label == "a"
    tuned._start_round()
    _train(tuned, log, Autotuned.WARMUP + Autotuned.TRIALS + Autotuned.WARMUP, update_s=0.0)
    a.slow_calls, a.slow_s = 1, 0.02     # its first timed call of the round: 20x its median
    _train(tuned, log, Autotuned.TRIALS + 1, update_s=0.0)
    assert tuned.choice is not None and tuned.label == "a"
    assert tuned.timings["a"] < 0.005 and len(tuned.times[1]) == Autotuned.TRIALS


def test_one_slow_iteration_does_not_give_a_schedule_up():
    """A schedule far slower than the choice is given up after two slow timed
    iterations, not one: one is a spike (a page fault, a collection, an interrupt)."""
    log = {}
    a, b = _Schedule(0.004, 0.0, log), _SlowOnce(0.008, log)
    tuned = Autotuned([("a", a), ("b", b)])
    _train(tuned, log, 2 * (Autotuned.WARMUP + Autotuned.TRIALS) + 1, update_s=0.0)
    assert tuned.label == "a"
    tuned._start_round()
    b.call_s = 0.001                    # now four times as fast as a, after one spike
    _train(tuned, log, Autotuned.WARMUP + Autotuned.TRIALS + Autotuned.WARMUP, update_s=0.0)
    b.slow_calls, b.slow_s = 1, 0.03
    _train(tuned, log, Autotuned.TRIALS + 1, update_s=0.0)
    assert tuned.label == "b"


def test_the_call_after_a_pause_is_not_a_trial():
    """After the caller pauses (an evaluation, a benchmark's other framework), the next
    call runs with cold caches and sleeping threads: neither it nor the iteration that
    held the pause times the schedule."""
    log = {}
    fast, cold = _Schedule(0.002, 0.0, log), _SlowOnce(0.001, log)
    tuned = Autotuned([("fast", fast), ("cold after pauses", cold)])
    for call in range(1, 60):
        paused = call in (Autotuned.WARMUP + Autotuned.TRIALS + 3, Autotuned.WARMUP + Autotuned.TRIALS + 5)
        if paused:
            time.sleep(0.06)
            cold.slow_calls, cold.slow_s = 1, 0.05
        tuned(1)
        time.sleep(0.001)
        if tuned.choice is not None:
            break
    assert tuned.label == "cold after pauses"
    assert max(tuned.times[1]) < 0.035, "a call after a pause was timed"


def test_a_later_round_keeps_the_choice_unless_another_is_clearly_faster(monkeypatch):
    monkeypatch.setattr(Autotuned, "RECHECK", 12)
    log = {}
    tuned, a, b = _first_round(0.004, 0.008, log)
    assert tuned.label == "a"
    b.call_s = 0.0038       # now a little faster than a (5 %): within the noise of a round
    _train(tuned, log, 12 + 2 * (Autotuned.WARMUP + Autotuned.TRIALS) + 1, update_s=0.0)
    assert tuned.label == "a"
    b.call_s = 0.002        # now twice as fast: the next round switches
    _train(tuned, log, 24 + 2 * (Autotuned.WARMUP + Autotuned.TRIALS) + 1, update_s=0.0)
    assert tuned.label == "b"


def test_iterations_in_which_the_caller_idles_are_not_trials():
    """A caller that pauses between some calls (an evaluation, a benchmark's other
    framework): those iterations time the pause, not the schedule."""
    log = {}
    fast, slow = _Schedule(0.002, 0.0, log), _Schedule(0.004, 0.0, log)
    tuned = Autotuned([("fast", fast), ("slow", slow)])
    for call in range(1, 40):
        tuned(1)
        # pauses after three of the fast schedule's five timed calls, none of the slow one's
        first_timed = Autotuned.WARMUP + 1
        time.sleep(0.05 if first_timed <= call < first_timed + 3 else 0.001)
        if tuned.choice is not None:
            break
    assert tuned.label == "fast"
    assert tuned.idle[0] == 3 and len(tuned.times[0]) == Autotuned.TRIALS


def test_a_caller_that_always_idles_still_gets_a_choice(monkeypatch):
    monkeypatch.setattr(Autotuned, "MAX_IDLE", 2)
    log = {}
    tuned = Autotuned([("a", _Schedule(0.001, 0.0, log)), ("b", _Schedule(0.003, 0.0, log))])
    _train(tuned, log, 2 * (Autotuned.WARMUP + Autotuned.TRIALS + 2) + 1, update_s=0.04)
    assert tuned.label == "a"


def test_the_timings_the_choice_was_made_on_are_readable():
    log = {}
    tuned = Autotuned([("slow", _Schedule(0.008, 0.0, log)), ("fast", _Schedule(0.002, 0.0, log))])
    assert tuned.timings == {}
    _train(tuned, log, 2 * (Autotuned.WARMUP + Autotuned.TRIALS) + 1)
    timings = tuned.timings
    assert set(timings) == {"slow", "fast"} and timings["fast"] < timings["slow"]
    assert timings["slow"] >= 0.008 + 0.002 and min(timings, key=timings.get) == tuned.label


def test_two_tuners_called_in_one_loop_take_turns():
    """A gradient step and an optimizer update: the second one's schedules are timed
    only once the first has chosen, with the first's choice running meanwhile."""
    log = {}
    grad = Autotuned([("g0", _Schedule(0.003, 0.0, log)), ("g1", _Schedule(0.001, 0.0, log))])
    update = Autotuned([("u0", _Schedule(0.002, 0.0, log)), ("u1", _Schedule(0.0005, 0.0, log))])
    per_tuner = 2 * (Autotuned.WARMUP + Autotuned.TRIALS) + 1
    for step in range(2 * per_tuner + 2):
        grad(1)
        if step < per_tuner - 1:
            assert update.calls == [0, 0], "the update's schedules are not tried while the step's are"
        update(1)
    assert grad.label == "g1" and update.label == "u1"


def test_a_turn_held_by_a_tuner_no_longer_called_is_taken_over():
    log = {}
    abandoned = Autotuned([("a0", _Schedule(0.0, 0.0, log)), ("a1", _Schedule(0.0, 0.0, log))])
    abandoned(1)                      # holds the turn, then is never called again
    keeper = abandoned                # (still referred to: not collected)
    tuned = Autotuned([("slow", _Schedule(0.004, 0.0, log)), ("fast", _Schedule(0.001, 0.0, log))])
    _train(tuned, log, threads._TuningTurn.STALE + 2 * (Autotuned.WARMUP + Autotuned.TRIALS) + 2, update_s=0.0)
    assert tuned.label == "fast"
    assert keeper.choice is None
