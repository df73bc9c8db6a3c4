"""CPU backend kernels that replace the reference implementation, and the profiler."""
import numpy as np
import pytest

import avalon
from avalon.backends import get_backend

CPU = get_backend("cpu")
rng = np.random.default_rng(3)


@pytest.mark.parametrize("cs, as_, bs", [((3, 4), (3, 4), (3, 4)), ((3, 1), (3, 4), ()), ((4,), (3, 4), (1, 4)),
                                          ((3, 4), (), (3, 4)), ((), (2, 2), (2, 2))])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitmask_where_equals_numpy_where(cs, as_, bs, dtype):
    c = np.asarray(rng.random(cs) > 0.5)
    a = np.asarray(rng.standard_normal(as_)).astype(dtype)
    b = np.asarray(rng.standard_normal(bs)).astype(dtype)
    np.testing.assert_array_equal(CPU.k_where(c, a, b), np.where(c, a, b))
    out = np.empty(np.broadcast_shapes(cs, as_, bs), dtype)
    assert CPU.k_where(c, a, b, out=out) is out
    np.testing.assert_array_equal(out, np.where(c, a, b))


def test_bitmask_where_keeps_non_finite_values_exactly():
    a = np.array([np.inf, np.nan, -np.inf, 1.0], np.float32)
    c = np.array([True, False, True, False])
    out = CPU.k_where(c, a, np.float32(0.0) * np.ones((), np.float32))
    np.testing.assert_array_equal(out, [np.inf, 0.0, -np.inf, 0.0])
    out = CPU.k_where(~c, a, a[::-1].copy())
    np.testing.assert_array_equal(np.isnan(out), np.isnan(np.where(~c, a, a[::-1])))


def test_profile_reports_every_kernel():
    w = rng.standard_normal((8, 8)).astype(np.float32)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    step = avalon.value_and_grad(lambda w, x: avalon.sum(avalon.tanh(x @ w) ** 2))
    report = avalon.profile(step, w, x, repeat=3)
    ops = {r.op for r in report.rows}
    assert "matmul" in ops
    assert report.total > 0 and abs(sum(report.by_op().values()) - report.total) < 1e-9
    assert "matmul" in str(report) and "ms per call" in str(report)


@pytest.mark.parametrize("nbytes", [1, 100, 4096, 1 << 20, (1 << 22) + 12])
def test_buffers_are_cache_line_aligned(nbytes):
    """NumPy aligns large arrays to 16 bytes only: the C kernels' 64-byte vectors
    would straddle two cache lines."""
    buf = CPU.buffer(nbytes)
    assert buf.dtype == np.uint8 and buf.shape == (nbytes,) and buf.ctypes.data % 64 == 0


def test_a_compiled_function_keeps_its_values_in_aligned_buffers():
    f = avalon.jit(lambda x, w: avalon.tanh(avalon.tanh(x @ w) @ w) + 1.0, parallel=False)
    x, w = rng.standard_normal((300, 200)).astype(np.float32), rng.standard_normal((200, 200)).astype(np.float32)
    np.testing.assert_allclose(f(x, w), np.tanh(np.tanh(x @ w) @ w) + 1.0, rtol=2e-5, atol=2e-5)
    env = f._last().compiled.fn.__globals__
    planned = [v for k, v in env.items() if k[:1] == "b" and k[1:].isdigit()]
    assert planned and all(v.ctypes.data % 64 == 0 for v in planned)
