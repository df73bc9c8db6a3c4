"""Compiled functions run with denormals flushed to zero (x86's FTZ/DAZ, as
XLA's CPU code does) unless asked not to (flush_denormals=False): in the calling
thread and in every engine thread running a share of the batch; the thread's
mode is restored after the call, also when the call raises."""
from __future__ import annotations

import numpy as np
import pytest

import avalon
from avalon.runtime import native

pytestmark = pytest.mark.skipif(not native.flushes_denormals(),
                                reason="flushing denormals needs x86 and a C compiler")

TINY = np.float32(np.finfo(np.float32).tiny)   # the smallest normal float32


def _halve(x):
    return x * np.float32(0.5)


def test_denormal_results_are_flushed_unless_asked_not_to():
    x = np.full(1000, TINY, np.float32)
    kept = avalon.jit(_halve, flush_denormals=False)(x)
    assert np.all(kept > 0) and np.all(kept < TINY)          # denormals, as NumPy gives
    flushed = avalon.jit(_halve)(x)
    np.testing.assert_array_equal(flushed, np.zeros(1000, np.float32))


def _halved_sum(w, x):
    return avalon.ops.sum(x * w * np.float32(0.5))


def test_gradients_flush_denormals_unless_asked_not_to():
    # d/dw sum(x * w / 2) = x / 2: denormal for x = TINY
    w, x = np.ones(64, np.float32), np.full(64, TINY, np.float32)
    _, (gw, _) = avalon.value_and_grad(_halved_sum)(w, x)
    np.testing.assert_array_equal(gw, np.zeros(64, np.float32))
    _, (kept, _) = avalon.value_and_grad(_halved_sum, flush_denormals=False)(w, x)
    assert np.all(kept > 0) and np.all(kept < TINY)


def test_engine_threads_run_in_the_callers_mode():
    from avalon.runtime.threads import _workers
    pool = _workers(1)
    x = np.full(8, TINY, np.float32)
    with native.denormals_flushed():
        flushed = pool.run([(_halve, (x,)), (_halve, (x,))])
    kept = pool.run([(_halve, (x,)), (_halve, (x,))])
    np.testing.assert_array_equal(flushed[0], np.zeros(8, np.float32))   # the worker's share
    assert np.all(kept[0] > 0), "the worker must go back to the caller's (IEEE) mode"


def test_the_threads_mode_is_restored_after_the_call_and_after_an_error():
    x = np.full(4, TINY, np.float32)
    avalon.jit(_halve, flush_denormals=True)(x)
    assert np.all(x * np.float32(0.5) > 0), "NumPy after the call must see denormals again"
    with pytest.raises(ZeroDivisionError):
        with native.denormals_flushed():
            raise ZeroDivisionError
    assert np.all(x * np.float32(0.5) > 0)


def test_optimizer_updates_flush_decayed_moments():
    import avalon.nn as nn
    import avalon.optim as optim
    layer = nn.Linear(2, 2)
    opt = optim.Adam(lr=1e-3)
    grads = nn.Linear(2, 2)
    grads.weight[...] = TINY
    grads.bias[...] = 0.0
    opt.step(layer, grads)
    assert opt.update_fn.flush_denormals
