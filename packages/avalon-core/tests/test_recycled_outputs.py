"""The arrays a compiled call returns are recycled once the caller lets go of them
(avalon.runtime.recycled): a loop of calls does not map fresh memory, and fault
each page of it, at every call; an array the caller still holds, directly or
through a view, a container or a weak reference, is never written again."""
import gc
from contextlib import nullcontext
import resource
import weakref

import numpy as np
import pytest

import avalon
from avalon.runtime import recycled, segments
from avalon.runtime.recycled import RecycledArrays

rng = np.random.default_rng(5)

needs_driver = pytest.mark.skipif(segments.driver() is None, reason="no C compiler: no segments")


def scaled(x, w):
    """Four results of x's size (x: 1.5 MiB), like a step's gradients."""
    h = avalon.tanh(x * w)
    return h * 2.0, h + 1.0, h * h, avalon.exp(-h)


def reference(x, w):
    h = np.tanh(x * w)
    return h * 2.0, h + 1.0, h * h, np.exp(-h)


def operands():
    return rng.standard_normal((384, 1024)).astype(np.float32), np.float32(0.5)


def compiled():
    return avalon.jit(scaled, parallel=False)


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@needs_driver
def test_a_loop_of_calls_maps_no_fresh_memory():
    fn, (x, w) = compiled(), operands()
    out = fn(x, w)
    out = fn(x, w)
    pages = sum(a.nbytes for a in out) // 4096
    before = minor_faults()
    for _ in range(10):
        out = fn(x, w)
        del out
    faults = minor_faults() - before
    assert faults < pages, f"{faults} page faults in 10 calls (one call's results span {pages} pages)"


@needs_driver
def test_a_result_dropped_is_reused_and_holds_the_new_values():
    fn = compiled()
    x1, w = operands()
    x2 = x1 * -0.5
    first = fn(x1, w)
    address = first[0].ctypes.data
    held = fn(x2, w)        # the loop's variable holds the last results during the next call
    del first
    again = fn(x1 * 3.0, w)
    assert again[0].ctypes.data == address
    for got, want in zip(again, reference(x1 * 3.0, w)):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    for got, want in zip(held, reference(x2, w)):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def _kept_by_view(a):
    return a[1:3]


def _kept_in_list(a):
    return [a]


def _kept_by_memoryview(a):
    return memoryview(a)


def _kept_by_reshape(a):
    return a.reshape(-1)


@needs_driver
@pytest.mark.parametrize("keep", [_kept_by_view, _kept_in_list, _kept_by_memoryview, _kept_by_reshape])
def test_a_result_still_referred_to_is_never_overwritten(keep):
    fn = compiled()
    x, w = operands()
    want = [r.copy() for r in fn(x, w)]
    kept = [keep(r) for r in fn(x, w)]
    copies = [np.array(k, copy=True) for k in kept]
    for _ in range(4):
        fn(x * 5.0, w)
    for k, c in zip(kept, copies):
        np.testing.assert_array_equal(np.asarray(k), c)
    assert len(want) == len(kept)


@needs_driver
def test_results_kept_from_every_call_stay_as_they_were():
    fn = compiled()
    x, w = operands()
    inputs = [x * s for s in (1.0, -2.0, 0.25, 3.0, -1.0)]
    results = [fn(xi, w) for xi in inputs]
    addresses = {r[0].ctypes.data for r in results}
    assert len(addresses) == len(results)
    for xi, got in zip(inputs, results):
        for g, want in zip(got, reference(xi, w)):
            np.testing.assert_allclose(g, want, rtol=2e-6, atol=2e-6)


def test_an_array_held_only_by_a_weak_reference_is_not_handed_out_again():
    arrays = RecycledArrays((2048,), np.float32)
    a = arrays()
    a[:] = 7.0
    ref = weakref.ref(a)
    address = a.ctypes.data
    del a
    b = arrays()
    assert b.ctypes.data != address
    assert ref() is not None and float(ref()[0]) == 7.0


def test_a_read_only_array_is_not_handed_out_again():
    arrays = RecycledArrays((2048,), np.float32)
    a = arrays()
    a.flags.writeable = False
    address = a.ctypes.data
    del a
    b = arrays()
    assert b.flags.writeable and b.ctypes.data != address


def test_arrays_alternate_while_the_caller_holds_the_last_one():
    arrays = RecycledArrays((2048,), np.float64)
    held = arrays()
    seen = {held.ctypes.data}
    for _ in range(6):
        held = arrays()
        seen.add(held.ctypes.data)
        gc.collect()
    assert len(seen) == recycled.KEPT
    assert held.shape == (2048,) and held.dtype == np.float64 and held.flags.c_contiguous


def test_small_results_are_left_to_numpy():
    assert not recycled.recycles((16, 16), np.float32)
    assert recycled.recycles((32, 32), np.float32)


@pytest.mark.parametrize("change", ["shape", "dtype", "strides"])
def test_an_array_changed_in_place_before_it_was_dropped_is_not_handed_out_again(change):
    arrays = RecycledArrays((64, 32), np.float32)
    a = arrays()
    address = a.ctypes.data
    if change == "shape":
        a.shape = (32, 64)
    elif change == "dtype":
        a.dtype = np.int32
    else:
        with pytest.warns(DeprecationWarning) if np.lib.NumpyVersion(np.__version__) >= "2.4.0" else nullcontext():
            a.strides = (4, 256)      # a transposed view of the same memory, in place
    del a
    b = arrays()
    assert b.shape == (64, 32) and b.dtype == np.float32 and b.flags.c_contiguous
    assert b.ctypes.data != address
