"""Segments (avalon.runtime.segments, on unless AVALON_C_DRIVER=0): runs of C kernels,
2-D products and static views called as ONE C driver call.  A step compiled
with segments gives the same bits as the node-by-node code, in one thread and
split across the engine's threads; arrays the driver was not compiled for run
the nodes one by one; profile and detect_anomaly keep per-node code.

The bit-for-bit claims hold for products through NumPy's own OpenBLAS
(AVALON_BLAS=numpy, set for every test here); MKL's products, the default
where the mkl package is installed, are checked in test_blas_choice.py."""
import os
import subprocess
import sys

import numpy as np
import pytest

import avalon
from avalon import parallel
from avalon.errors import OutOfMemoryError
from avalon.runtime import segments
from avalon.runtime.threads import Autotuned, ShardedFunction
from avalon.tree import flatten

rng = np.random.default_rng(11)


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_SHARD_ELEMENTS", 0)
    monkeypatch.setenv("AVALON_BLAS", "numpy")


def mlp_loss(m, x, y):
    h = avalon.tanh(x @ m["w1"] + m["b1"])
    h = avalon.relu(h @ m["w2"] + m["b2"])
    logp = avalon.log_softmax(h @ m["w3"])
    return -avalon.mean(avalon.take_along_axis(logp, avalon.expand_dims(y, 1), axis=1))


def mlp_case():
    m = {"w1": rng.standard_normal((12, 32)).astype(np.float32) * 0.3, "b1": np.zeros(32, np.float32) + 0.1,
         "w2": rng.standard_normal((32, 24)).astype(np.float32) * 0.3, "b2": np.zeros(24, np.float32) - 0.05,
         "w3": rng.standard_normal((24, 5)).astype(np.float32) * 0.3}
    return mlp_loss, (m, rng.standard_normal((16, 12)).astype(np.float32), rng.integers(0, 5, 16))


def cnn_loss(m, x, y):
    h = x
    for w, b in m["convs"]:
        h = avalon.relu(avalon.conv2d(h, w, b, padding=1))
        h = avalon.max_pool2d(h, 2)
    logits = h.reshape(h.shape[0], -1) @ m["fc"]
    return -avalon.mean(avalon.take_along_axis(avalon.log_softmax(logits), avalon.expand_dims(y, 1), axis=1))


def cnn_case():
    def conv(o, i):
        return (rng.standard_normal((o, i, 3, 3)).astype(np.float32) * 0.3,
                rng.standard_normal(o).astype(np.float32) * 0.1)
    m = {"convs": [conv(6, 1), conv(8, 6)], "fc": rng.standard_normal((8 * 4 * 4, 5)).astype(np.float32) * 0.1}
    return cnn_loss, (m, rng.standard_normal((8, 1, 16, 16)).astype(np.float32), rng.integers(0, 5, 8))


H = 16


def lstm_loss(p, x, y):
    xs = avalon.swapaxes(x, 0, 1)
    proj = xs @ p["w_ih"].T + p["b"]
    h = avalon.zeros((x.shape[0], H), x.dtype, like=x)
    c = h
    for t in range(xs.shape[0]):
        i, f, g, o = avalon.split(proj[t] + h @ p["w_hh"].T, 4, axis=-1)
        c = avalon.sigmoid(f) * c + avalon.sigmoid(i) * avalon.tanh(g)
        h = avalon.sigmoid(o) * avalon.tanh(c)
    logp = avalon.log_softmax(h @ p["w_out"])
    return -avalon.mean(avalon.take_along_axis(logp, avalon.expand_dims(y, 1), axis=1))


def lstm_case():
    s = 0.5
    p = {"w_ih": rng.standard_normal((4 * H, 3)).astype(np.float32) * s,
         "w_hh": rng.standard_normal((4 * H, H)).astype(np.float32) * s,
         "b": rng.standard_normal((4 * H,)).astype(np.float32) * s,
         "w_out": rng.standard_normal((H, 3)).astype(np.float32) * s}
    return lstm_loss, (p, rng.standard_normal((8, 5, 3)).astype(np.float32), rng.integers(0, 3, 8))


CASES = {"mlp": mlp_case, "cnn": cnn_case, "lstm": lstm_case}


def compiled_step(loss, args, monkeypatch, driver, split):
    """A fresh value_and_grad of `loss` compiled with or without segments, its
    schedule forced to the batch split (split=True) or one thread; returns
    (function, the compiled copies that run)."""
    monkeypatch.setenv("AVALON_C_DRIVER", "1" if driver else "0")

    def step(*a):       # a new function: its own compile cache
        return loss(*a)
    fn = avalon.value_and_grad(step, argnums=0, parallel=split)
    fn(*args)
    compiled = fn._last().compiled
    if split:
        assert isinstance(compiled, Autotuned)
        labels = [label for label, _ in compiled.candidates]
        compiled.choice = labels.index("batch split across threads")
        sharded = compiled.current()
        assert isinstance(sharded, ShardedFunction)
        return fn, [c for _, c in sharded.copies]
    return fn, [compiled]


def leaves(result):
    return [np.array(v) for v in flatten(result)[0]]


@pytest.mark.parametrize("split", [False, True], ids=["one-thread", "split"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_step_with_segments_gives_the_bits_of_the_node_by_node_code(case, split, monkeypatch):
    loss, args = CASES[case]()
    plain, plain_copies = compiled_step(loss, args, monkeypatch, driver=False, split=split)
    fast, fast_copies = compiled_step(loss, args, monkeypatch, driver=True, split=split)
    assert all(c.segments == [] for c in plain_copies)
    assert all(len(c.segments) >= 1 for c in fast_copies)
    if split:   # each thread's copy has its own program (its own buffers' addresses)
        tables = [c.fn.__globals__["_P0"] for c in fast_copies]
        assert len(set(tables)) == len(tables)
    want = leaves(plain(*args))
    for _ in range(2):    # the first call builds the programs, the second runs them again
        got = leaves(fast(*args))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_the_lstm_step_runs_its_recurrence_in_segments_that_call_blas(monkeypatch):
    loss, args = lstm_case()
    _, (compiled,) = compiled_step(loss, args, monkeypatch, driver=True, split=False)
    listing = "\n".join(s.source for s in compiled.segments)
    assert "cblas_sgemm(RowMajor, N, T" in listing        # h @ w_hh.T: the transpose is a BLAS flag
    assert "avl_fused_" in listing
    assert "_seg0(_P0" in compiled.source and "compiled.segments[0].source" in compiled.source
    # most of the recurrence's kernels run inside segments
    kernels = [n for n in compiled.graph.nodes if n.op in ("fused", "matmul")]
    inside = sum(len(s.nodes) for s in compiled.segments)
    assert inside >= len(kernels) // 2


def test_segments_are_on_unless_turned_off(monkeypatch):
    loss, args = mlp_case()
    monkeypatch.setenv("AVALON_C_DRIVER", "0")

    def step(*a):
        return loss(*a)
    fn = avalon.value_and_grad(step, argnums=0, parallel=False)
    fn(*args)
    assert fn._last().compiled.segments == [] and "_seg0(" not in fn._last().compiled.source
    assert not segments.enabled()
    monkeypatch.delenv("AVALON_C_DRIVER")
    assert segments.enabled()


def _spy_on_segments(compiled):
    """Record what each segment's driver call returns (0: it ran)."""
    env, returns = compiled.fn.__globals__, []
    for k in range(len(compiled.segments)):
        inner = env[f"_seg{k}"]

        def spy(*a, inner=inner):
            r = inner(*a)
            returns.append(r)
            return r
        env[f"_seg{k}"] = spy
    return returns


def test_an_input_not_laid_out_as_compiled_runs_the_nodes_one_by_one(monkeypatch):
    loss, (m, x, y) = mlp_case()
    fn, (compiled,) = compiled_step(loss, (m, x, y), monkeypatch, driver=True, split=False)
    flat = flatten((m, x, y))[0]
    k = next(i for i, v in enumerate(flat) if v is x)
    returns = _spy_on_segments(compiled)
    want = leaves(compiled.fn(*flat))
    assert returns and all(r == 0 for r in returns)
    returns.clear()
    strided = np.asfortranarray(x)                   # same values, not C-contiguous
    got = leaves(compiled.fn(*flat[:k], strided, *flat[k + 1:]))
    assert any(r != 0 for r in returns)              # the driver refused the array
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    returns.clear()
    other = leaves(compiled.fn(*flat[:k], x.astype(np.float64), *flat[k + 1:]))   # another dtype
    assert any(r != 0 for r in returns)
    for g, w in zip(other, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_profile_and_detect_anomaly_keep_node_by_node_code(monkeypatch):
    loss, args = mlp_case()
    monkeypatch.setenv("AVALON_C_DRIVER", "1")

    def step(*a):
        return loss(*a)
    fn = avalon.value_and_grad(step, argnums=0, parallel=False)
    report = avalon.profile(fn, *args, repeat=2, warmup=1)
    assert "matmul" in str(report)
    with avalon.detect_anomaly():
        checked = avalon.value_and_grad(step, argnums=0, parallel=False)
        checked(*args)
        assert checked._last().compiled.segments == []


def test_without_a_driver_the_step_compiles_node_by_node(monkeypatch):
    loss, args = mlp_case()
    plain, _ = compiled_step(loss, args, monkeypatch, driver=False, split=False)
    monkeypatch.setattr(segments, "_driver_lib", [None])     # as without a C compiler
    fn, (compiled,) = compiled_step(loss, args, monkeypatch, driver=True, split=False)
    assert compiled.segments == []
    for g, w in zip(leaves(fn(*args)), leaves(plain(*args))):
        np.testing.assert_array_equal(g, w)


def test_an_allocation_failing_before_a_segment_names_its_node(monkeypatch):
    def loss(m, x):
        return avalon.sum(avalon.tanh(x @ m["w"]) @ m["v"])
    m = {"w": rng.standard_normal((6, 8)).astype(np.float32), "v": rng.standard_normal((8, 3)).astype(np.float32)}
    x = rng.standard_normal((5, 6)).astype(np.float32)
    fn, (compiled,) = compiled_step(loss, (m, x), monkeypatch, driver=True, split=False)
    env = compiled.fn.__globals__
    assert any(seg.fresh for seg in compiled.segments)     # x @ w's gradient is no buffer of the plan

    def no_memory(*a):
        raise MemoryError("test")
    monkeypatch.setitem(env, "_empty", no_memory)
    with pytest.raises(OutOfMemoryError, match=r"out of memory in \w+ making f\d+\["):
        compiled.fn(*flatten((m, x))[0])


def test_a_segment_refused_again_and_again_runs_node_by_node(monkeypatch):
    loss, (m, x, y) = mlp_case()
    _, (compiled,) = compiled_step(loss, (m, x, y), monkeypatch, driver=True, split=False)
    flat = flatten((m, x, y))[0]
    k = next(i for i, v in enumerate(flat) if v is x)
    want = leaves(compiled.fn(*flat))
    env = compiled.fn.__globals__
    x_node = compiled.graph.inputs[k]
    reads_x = [i for i, seg in enumerate(compiled.segments) if x_node in seg.dyn]
    assert reads_x
    strided = np.asfortranarray(x)
    for _ in range(segments.REFUSALS):
        got = leaves(compiled.fn(*flat[:k], strided, *flat[k + 1:]))
    assert all(env[f"_seg{i}"] is segments._node_by_node for i in reads_x)
    for g, w in zip(got + leaves(compiled.fn(*flat)), want + want):
        np.testing.assert_array_equal(g, w)


def test_without_numpys_blas_products_stay_numpy_calls(monkeypatch):
    loss, args = lstm_case()
    plain, _ = compiled_step(loss, args, monkeypatch, driver=False, split=False)
    monkeypatch.setattr(segments, "blas_gemm", lambda: {})
    fn, (compiled,) = compiled_step(loss, args, monkeypatch, driver=True, split=False)
    assert compiled.segments and "gemm" not in "\n".join(s.source for s in compiled.segments)
    for g, w in zip(leaves(fn(*args)), leaves(plain(*args))):
        np.testing.assert_array_equal(g, w)


def test_float64_products_go_through_dgemm_with_the_same_bits(monkeypatch):
    loss, (m, x, y) = mlp_case()
    m = {k: v.astype(np.float64) for k, v in m.items()}
    args = (m, x.astype(np.float64), y)
    plain, _ = compiled_step(loss, args, monkeypatch, driver=False, split=False)
    fast, (compiled,) = compiled_step(loss, args, monkeypatch, driver=True, split=False)
    assert "cblas_dgemm" in "\n".join(s.source for s in compiled.segments)
    for g, w in zip(leaves(fast(*args)), leaves(plain(*args))):
        np.testing.assert_array_equal(g, w)


def test_concurrent_callers_get_their_own_copies_and_the_same_results(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    loss, args = lstm_case()
    plain, _ = compiled_step(loss, args, monkeypatch, driver=False, split=False)
    want = leaves(plain(*args))
    fast, _ = compiled_step(loss, args, monkeypatch, driver=True, split=False)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: leaves(fast(*args)), range(12)))
    for got in results:
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_a_fused_reduction_written_into_an_input_it_reads_stays_exact(monkeypatch):
    # the reduction's kernel reads its input after writing its output: a segment
    # must not run it with out == input (as an elementwise group may be)
    monkeypatch.setenv("AVALON_C_DRIVER", "1")

    def f(v, x):
        avalon.assign(v, avalon.sum(x * avalon.reshape(v, (1, 64)), axis=0) + np.float32(1.0))
        return v * np.float32(2.0)
    rng = np.random.default_rng(3)
    v, x = rng.standard_normal(64).astype(np.float32), rng.standard_normal((64, 64)).astype(np.float32)
    want_v = (x * v[None, :]).sum(axis=0) + 1
    out = avalon.jit(f)(v, x)
    np.testing.assert_allclose(v, want_v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, want_v * 2, rtol=1e-5, atol=2e-5)


def one_sample_loss(m, x, y):
    """A one-sample step: every product is a vector times a matrix (x @ w1, the
    gradients' g @ w.T), or a matrix times a vector (w0 @ x.T, a column)."""
    h = avalon.tanh(x @ m["w1"] + m["b1"])
    col = avalon.relu(m["w0"] @ x.T)                     # (12, 12) @ (12, 1)
    h = avalon.relu(h @ m["w2"].T) + avalon.sum(col)     # w2 transposed: a strided operand
    logp = avalon.log_softmax(h @ m["w3"])
    return -avalon.mean(avalon.take_along_axis(logp, avalon.expand_dims(y, 1), axis=1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_vector_products_go_through_gemv_with_the_bits_of_numpys_matmul(dtype, monkeypatch):
    m, x, y = mlp_case()[1]
    m = dict(m, w0=rng.standard_normal((12, 12)), w2=np.ascontiguousarray(m["w2"].T))
    m = {k: v.astype(dtype) for k, v in m.items()}
    args = (m, x[:1].astype(dtype), y[:1])
    plain, _ = compiled_step(one_sample_loss, args, monkeypatch, driver=False, split=False)
    fast, (compiled,) = compiled_step(one_sample_loss, args, monkeypatch, driver=True, split=False)
    listing = "\n".join(s.source for s in compiled.segments)
    blas = "cblas_sgemv" if dtype == np.float32 else "cblas_dgemv"
    assert f"{blas}(ColMajor, T" in listing and f"{blas}(RowMajor, T" in listing
    assert "gemm" not in listing         # no 2-D product in a one-sample step: NumPy calls gemv or dot
    want = leaves(plain(*args))
    for _ in range(2):
        for g, w in zip(leaves(fast(*args)), want):
            np.testing.assert_array_equal(g, w)


def _driver_loaded():
    return segments.driver() is not None


def test_a_child_forked_while_another_thread_loads_the_driver_gets_one(in_forked_child, held_by_another_thread):
    """The CPU backend loads the driver in a background thread: a fork meanwhile
    waits for it, so the child does not inherit its lock held forever."""
    expected = segments.driver() is not None
    with held_by_another_thread(segments._lock, for_s=0.3):     # a load taking 0.3 s
        assert in_forked_child(_driver_loaded, timeout=30) == expected


def test_the_cpu_backend_loads_the_driver_before_any_compilation():
    if segments.driver() is None:
        pytest.skip("no C compiler here: no driver to load")
    code = ("import time, avalon\n"
            "from avalon.runtime import native, segments\n"
            "avalon.device('cpu')\n"
            "t = time.monotonic()\n"
            "while not segments._driver_lib and time.monotonic() - t < 20:\n"
            "    time.sleep(0.001)\n"
            "print(bool(segments._driver_lib and segments._driver_lib[0] is not None))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
