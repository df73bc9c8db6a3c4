"""The cyclic garbage collector is paused while Avalon compiles (a full collection
in a process holding PyTorch took 10-13 ms of a 40 ms first step) and resumed
after, also when the compilation fails; a collector the user turned off stays off."""
import gc

import numpy as np
import pytest

import avalon
from avalon.runtime.gc_pause import gc_paused

x = np.ones((4, 3), np.float32)


@pytest.fixture(autouse=True)
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def test_tracing_runs_with_the_collector_paused_and_it_resumes_after():
    seen = []

    def f(x):
        seen.append(gc.isenabled())
        return avalon.tanh(x) * 2.0
    np.testing.assert_allclose(avalon.jit(f)(x), np.tanh(x) * 2, rtol=1e-6)
    assert seen == [False] and gc.isenabled()


def test_a_failed_compilation_resumes_the_collector():
    def bad(x):
        return x @ np.ones((5, 2), np.float32)          # (4, 3) @ (5, 2): a shape error
    with pytest.raises(Exception, match="5"):
        avalon.jit(bad)(x)
    assert gc.isenabled()


def test_a_collector_turned_off_by_the_user_stays_off():
    gc.disable()
    avalon.jit(lambda x: x + 1.0)(x)
    assert not gc.isenabled()


def test_nested_and_concurrent_pauses_resume_once_the_last_ends(held_by_another_thread):
    with held_by_another_thread(gc_paused()):
        with gc_paused():
            with gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()
        assert not gc.isenabled()         # the other thread still compiles
    assert gc.isenabled()


def test_a_child_forked_while_another_thread_compiles_gets_the_collector_back(in_forked_child,
                                                                             held_by_another_thread):
    with held_by_another_thread(gc_paused()):
        assert not gc.isenabled()
        assert in_forked_child(gc.isenabled, timeout=60) is True
    assert gc.isenabled()
