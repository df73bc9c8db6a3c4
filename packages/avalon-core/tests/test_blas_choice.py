"""The BLAS compiled code calls (avalon.runtime.blas: AVALON_BLAS, MKL when the mkl
package is installed, else NumPy's OpenBLAS), and the segment driver's helper
threads that split one product into pieces (the "BLAS on N threads" schedule)."""
import functools
import os
import threading

import numpy as np
import pytest

import avalon
from avalon.backends.cpu import CpuBackend
from avalon.runtime import blas, segments

rng = np.random.default_rng(5)

needs_driver = pytest.mark.skipif(segments.driver() is None, reason="no C compiler: no segment driver")
needs_mkl = pytest.mark.skipif(blas.mkl_reason() is not None,
                               reason=f"MKL cannot be loaded here: {blas.mkl_reason()}")


def products(a, b, c, v):
    """Every form the driver calls BLAS for: NN, TN, NT products and a vector times a matrix."""
    return a @ b, a.T @ c, (b.T @ a.T).T, v @ a


def operands(m, k, n, dtype):
    return (rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype),
            rng.standard_normal((m, n)).astype(dtype), rng.standard_normal((1, m)).astype(dtype))


def reference(a, b, c, v):
    a64, b64, c64, v64 = (x.astype(np.float64) for x in (a, b, c, v))
    return a64 @ b64, a64.T @ c64, a64 @ b64, v64 @ a64


def assert_close(got, want, dtype):
    tol = 2e-5 if dtype == np.float32 else 1e-12
    for g, w in zip(got, want):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max())


def compiled_products(monkeypatch, choice):
    """A fresh jit of `products` compiled with AVALON_BLAS=choice, and the BLAS it called."""
    monkeypatch.setenv("AVALON_BLAS", choice)
    monkeypatch.setenv("AVALON_C_DRIVER", "1")
    return avalon.jit(lambda *xs: products(*xs), parallel=False), blas.generated_code_blas()


def test_avalon_blas_rejects_an_unknown_name_and_says_what_is_accepted(monkeypatch):
    monkeypatch.setenv("AVALON_BLAS", "atlas")
    with pytest.raises(ValueError, match=r"AVALON_BLAS='atlas' is not one of auto, mkl, numpy"):
        blas.generated_code_blas()


def test_numpy_choice_is_numpys_openblas(monkeypatch):
    monkeypatch.setenv("AVALON_BLAS", "numpy")
    chosen = blas.generated_code_blas()
    if chosen is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS with a 64-bit cblas")
    assert chosen.name.startswith("OpenBLAS") and "NumPy's" in chosen.name
    assert segments.blas_gemm() == {np.dtype(np.float32): chosen.address("gemm", np.float32),
                                    np.dtype(np.float64): chosen.address("gemm", np.float64)}


@needs_mkl
def test_auto_and_mkl_choose_mkl_when_it_is_installed(monkeypatch):
    for choice in ("auto", "mkl", "MKL "):
        monkeypatch.setenv("AVALON_BLAS", choice)
        chosen = blas.generated_code_blas()
        assert chosen.name.startswith("MKL ") and "sequential" in chosen.name
        assert segments.blas_gemv()[np.dtype(np.float64)] == chosen.address("gemv", np.float64)


def test_mkl_asked_for_but_missing_is_an_error_naming_the_package(monkeypatch, tmp_path):
    import sys
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "distribution", missing)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))                   # no lib/libmkl_rt.so there
    monkeypatch.setattr(blas, "_load_mkl", blas._load_mkl.__wrapped__)  # not the process's cached MKL
    monkeypatch.setenv("AVALON_BLAS", "mkl")
    with pytest.raises(blas.BlasUnavailable, match=r'pip install -e "packages/avalon-core\[mkl\]"'):
        blas.generated_code_blas()
    monkeypatch.setenv("AVALON_BLAS", "auto")       # auto falls back to NumPy's
    fallback = blas.generated_code_blas()
    assert fallback is None or fallback.name.startswith("OpenBLAS")


def test_without_mkl_auto_looks_for_it_once_not_at_every_compilation(monkeypatch, tmp_path):
    import sys
    from importlib import metadata
    lookups = []

    def missing(name):
        lookups.append(name)
        raise metadata.PackageNotFoundError(name)
    monkeypatch.setattr(metadata, "distribution", missing)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(blas, "_load_mkl", functools.lru_cache(maxsize=1)(blas._load_mkl.__wrapped__))
    monkeypatch.setenv("AVALON_BLAS", "auto")
    chosen = [blas.generated_code_blas() for _ in range(4)]
    assert lookups == ["mkl"]
    assert all(c is chosen[0] for c in chosen) and (chosen[0] is None or chosen[0].name.startswith("OpenBLAS"))
    monkeypatch.setenv("AVALON_BLAS", "mkl")
    with pytest.raises(blas.BlasUnavailable, match="mkl package is not installed"):
        blas.generated_code_blas()


@needs_driver
@pytest.mark.parametrize("choice", ["numpy", pytest.param("mkl", marks=needs_mkl)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_products_in_segments_match_float64_numpy_with_each_blas(choice, dtype, monkeypatch):
    fn, chosen = compiled_products(monkeypatch, choice)
    if chosen is None:
        pytest.skip("no BLAS for segments")
    args = operands(37, 129, 515, dtype)
    got = fn(*args)
    compiled = fn._last().compiled
    listing = "\n".join(s.source for s in compiled.segments)
    letter = "s" if dtype == np.float32 else "d"
    assert f"cblas_{letter}gemm" in listing and f"cblas_{letter}gemv" in listing
    assert_close(got, reference(*args), dtype)


@needs_driver
@pytest.mark.parametrize("choice", ["numpy", pytest.param("mkl", marks=needs_mkl)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(100, 784, 500), (512, 64, 33), (33, 300, 70), (1, 300, 200)],
                         ids=lambda s: "x".join(map(str, s)))
def test_products_split_across_helper_threads_give_the_whole_products(shape, dtype, choice, monkeypatch):
    fn, chosen = compiled_products(monkeypatch, choice)
    if chosen is None:
        pytest.skip("no BLAS for segments")
    args = operands(*shape, dtype)
    whole = fn(*args)
    previous = segments.driver().avl_set_product_threads(2)
    try:
        split = fn(*args)
        assert segments.driver().avl_set_product_threads(previous) == 2
    finally:
        segments.set_product_threads(previous)
    assert_close(split, reference(*args), dtype)
    # the pieces equal the whole product to rounding, not always bit for bit: MKL may pick
    # another kernel for a piece's row count, summing over k in another order (seen with
    # float64 on AMD EPYC; on Intel Xeon the bits were the same)
    assert_close(split, whole, dtype)
    if shape[0] * shape[1] * shape[2] >= 262144:
        assert segments.driver().avl_product_helpers() >= 1


@needs_driver
def test_two_threads_splitting_products_at_once_both_get_the_right_results(monkeypatch):
    # one caller uses the helpers, the other runs its products whole meanwhile
    fn, chosen = compiled_products(monkeypatch, "auto")
    if chosen is None:
        pytest.skip("no BLAS for segments")
    cases = [operands(96, 200, 160, np.float32) for _ in range(2)]
    failures = []

    def worker(args):
        segments.set_product_threads(2)     # per thread
        try:
            want = reference(*args)
            for _ in range(40):
                assert_close(fn(*args), want, np.float32)
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)
        finally:
            segments.set_product_threads(1)
    threads = [threading.Thread(target=worker, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not failures, failures[0]


def _split_products_in_child():
    fn = avalon.jit(lambda *xs: products(*xs), parallel=False)
    args = operands(64, 128, 256, np.float32)
    segments.set_product_threads(2)
    got = fn(*args)
    assert_close(got, reference(*args), np.float32)
    return segments.driver().avl_product_helpers()


@needs_driver
def test_a_forked_child_starts_its_own_helper_threads(monkeypatch, in_forked_child):
    fn, chosen = compiled_products(monkeypatch, "auto")
    if chosen is None:
        pytest.skip("no BLAS for segments")
    args = operands(64, 128, 256, np.float32)
    segments.set_product_threads(2)
    try:
        fn(*args)              # the parent has helpers
    finally:
        segments.set_product_threads(1)
    assert segments.driver().avl_product_helpers() >= 1
    helpers = in_forked_child(_split_products_in_child)
    assert helpers == 1        # started afresh: the parent's helpers are not in the child


@needs_driver
def test_blas_threads_split_segment_products_and_leave_blas_itself_on_one_thread():
    # BLAS's own threads busy-wait ~0.1 s after each threaded call and slowed the
    # optimizer update that follows a "BLAS on 2 threads" gradient step
    from threadpoolctl import threadpool_info
    backend = CpuBackend()
    backend.set_blas_threads(2)
    try:
        assert segments.driver().avl_set_product_threads(2) == 2
        openblas = [p for p in threadpool_info() if p.get("internal_api") == "openblas"]
        assert openblas and all(p["num_threads"] == 1 for p in openblas)
    finally:
        backend.set_blas_threads(1)
    assert segments.driver().avl_set_product_threads(1) == 1


@pytest.mark.parametrize("choice", ["auto", "numpy", "nonsense"])
def test_prefetch_loads_the_chosen_blas_in_a_background_thread(choice, monkeypatch):
    started = []
    real_thread = threading.Thread

    def recording_thread(*args, **kwargs):
        t = real_thread(*args, **kwargs)
        started.append(t)
        return t
    monkeypatch.setattr(blas.threading, "Thread", recording_thread)
    fresh = functools.lru_cache(maxsize=1)(blas._load_mkl.__wrapped__)    # empty: not the process's MKL
    monkeypatch.setattr(blas, "_load_mkl", fresh)
    monkeypatch.setenv("AVALON_BLAS", choice)
    blas.prefetch()          # never raises: a bad AVALON_BLAS is said when a graph is compiled
    if choice != "auto":
        assert started == []
        return
    (thread,) = started
    assert thread.name == "avalon-blas-prefetch" and thread.daemon
    thread.join(timeout=60)
    assert not thread.is_alive()
    if blas.mkl_reason() is None:      # the thread loaded MKL: a compilation finds it loaded
        assert fresh.cache_info().currsize == 1 and fresh.cache_info().hits >= 1


def _schedule_labels(x, w):
    f = avalon.jit(lambda x, w: avalon.relu(x @ w.T))
    f(x, w)
    compiled = f._last().compiled
    return [label for label, _ in getattr(compiled, "candidates", [("one thread", compiled)])]


@needs_driver
def test_a_matrix_vector_product_the_helpers_split_gets_a_blas_threads_schedule(monkeypatch):
    """A one-sample prediction's products have few flops (0.8 M here) but a weight
    the driver's helpers split in two halves: ran on two threads, it took half the time."""
    monkeypatch.setenv("AVALON_C_DRIVER", "1")
    threads = CpuBackend().blas_threads_available
    if threads < 2:
        pytest.skip("one CPU: no BLAS threads schedule")
    w = rng.standard_normal((500, 784)).astype(np.float32)
    assert segments.splits_product(1, 500, 784)
    assert f"BLAS on {threads} threads" in _schedule_labels(rng.standard_normal((1, 784)).astype(np.float32), w)
    small = rng.standard_normal((10, 16)).astype(np.float32)
    assert not segments.splits_product(1, 10, 16)
    assert _schedule_labels(rng.standard_normal((1, 16)).astype(np.float32), small) == ["one thread"]


@pytest.mark.parametrize("choice", ["auto", "mkl", "numpy"])
def test_whether_mkl_will_be_used_is_known_without_loading_it(choice, monkeypatch):
    """A compilation's passes ask which BLAS will multiply while prefetch still loads
    MKL: the answer must not wait for (or start) the load."""
    installed = blas.mkl_reason() is None         # the process's own answer, before the fresh cache
    fresh = functools.lru_cache(maxsize=1)(blas._load_mkl.__wrapped__)
    monkeypatch.setattr(blas, "_load_mkl", fresh)
    monkeypatch.setenv("AVALON_BLAS", choice)
    assert blas.will_use_mkl() == (choice != "numpy" and installed)
    assert fresh.cache_info().currsize == 0       # nothing loaded


def test_a_fork_while_the_blas_is_loading_leaves_the_child_a_working_lock(in_forked_child,
                                                                          held_by_another_thread):
    """The prefetch thread holds the loader's lock for ~20 ms after the CPU backend is
    made; a fork then copied it held, and the child's first compilation waited forever."""
    want = blas.generated_code_blas().name
    with held_by_another_thread(blas._mkl_lock):
        got = in_forked_child(lambda: blas.generated_code_blas().name, timeout=60)
    assert got == want
