"""Fixtures the tests share: a forked child process that must not hang, and a
context another thread holds meanwhile (a fork or a call made while it does)."""
import contextlib
import multiprocessing
import os
import queue as queues
import threading

import pytest

from avalon.testing.fixtures import fresh_tuning_turn  # noqa: F401  (autouse)


def _report(target, args, queue):
    try:
        queue.put(("ok", target(*args)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put(("error", repr(e)))


@pytest.fixture
def in_forked_child():
    """run(target, *args, timeout=120): target(*args) computed in a forked child
    and returned; the test fails when the child hangs or raises."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")

    def run(target, *args, timeout=120):
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_report, args=(target, args, queue))
        child.start()
        try:
            status, value = queue.get(timeout=timeout)
        except queues.Empty:
            child.kill()
            pytest.fail(f"the forked child hung in {target.__name__}")
        finally:
            child.join(10)
        assert status == "ok", value
        return value
    return run


@pytest.fixture
def held_by_another_thread():
    """held(context, for_s=None): a context manager inside which another thread is
    inside `context` (entered before the block starts, left after it ends, or
    after for_s seconds: a holder that is slow, not stuck)."""
    @contextlib.contextmanager
    def held(context, for_s=None):
        inside, release = threading.Event(), threading.Event()

        def hold():
            with context:
                inside.set()
                release.wait(60 if for_s is None else for_s)
        t = threading.Thread(target=hold)
        t.start()
        try:
            assert inside.wait(10)
            yield
        finally:
            release.set()
            t.join(10)
    return held

