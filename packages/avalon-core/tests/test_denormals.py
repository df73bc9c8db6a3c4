"""avalon.jit(f, flush_denormals=True): denormal results become zero inside the
call (x86's FTZ/DAZ, as XLA's CPU code), and the thread's mode is restored
after it, also when the call raises."""
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


def test_denormal_results_are_flushed_only_when_asked():
    x = np.full(1000, TINY, np.float32)
    kept = avalon.jit(_halve)(x)
    assert np.all(kept > 0) and np.all(kept < TINY)          # denormals, as NumPy gives
    flushed = avalon.jit(_halve, flush_denormals=True)(x)
    np.testing.assert_array_equal(flushed, np.zeros(1000, np.float32))


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
