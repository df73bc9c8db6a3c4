"""The CUDA backend on a GPU: the core's conformance suite (every primitive,
eager, jit and grad, equals the CPU backend), fused groups compiled to one
CuPy ElementwiseKernel, random draws, and moving arrays to the device and
back.  Skipped, with the reason, where no GPU is usable."""
import numpy as np
import pytest

import avalon
from avalon.backends import backend_of, get_backend
from avalon.testing.conformance import *  # noqa: F401,F403  (test_eager, test_jit, test_grad)
from avalon_cuda import gpu_available
from avalon_cuda._compat import cupy, device_count

_OK, _WHY = gpu_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"needs a usable CUDA GPU: {_WHY}")


@pytest.fixture
def avalon_device():
    """The conformance suite's device under test."""
    return "cuda"


def _cuda():
    return get_backend(avalon.device("cuda"))


def _host(x):
    return np.asarray(backend_of(x).to_host(x))


# -- moving arrays ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.int32, np.bool_, np.uint8])
def test_to_device_round_trips_values_dtypes_and_shapes(dtype):
    rng = np.random.default_rng(0)
    for shape in [(), (1,), (3, 4), (2, 0, 5), (2, 3, 4, 5)]:
        a = np.asarray(rng.standard_normal(shape) * 10).astype(dtype)
        d = avalon.to_device(a, "cuda")
        assert isinstance(d, cupy.ndarray) and d.shape == a.shape and d.dtype == a.dtype
        assert backend_of(d).device == avalon.device("cuda:0")
        back = avalon.to_device(d, "cpu")
        assert type(back) is np.ndarray
        np.testing.assert_array_equal(back, a)


def test_to_device_walks_nested_objects_and_keeps_non_arrays():
    model = {"w": np.ones((2, 3), np.float32), "layers": [np.arange(4.0), ("name", 3)], "lr": 0.1}
    d = avalon.to_device(model, "cuda")
    assert isinstance(d["w"], cupy.ndarray) and isinstance(d["layers"][0], cupy.ndarray)
    assert d["layers"][1] == ("name", 3) and d["lr"] == 0.1
    assert avalon.to_device(d, "cuda")["w"] is d["w"]            # already there: not copied
    back = avalon.to_device(d, "cpu")
    np.testing.assert_array_equal(back["layers"][0], np.arange(4.0))


def test_eager_ops_stay_on_the_device_and_mixing_devices_is_refused():
    x = avalon.to_device(np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4), "cuda")
    y = avalon.tanh(x @ x.T) + 1.0
    assert isinstance(y, cupy.ndarray)
    ref = np.tanh(_host(x) @ _host(x).T) + 1.0
    np.testing.assert_allclose(_host(y), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(avalon.DeviceError, match="different devices"):
        avalon.add(x, np.ones((3, 4), np.float32))


@pytest.mark.skipif(device_count() < 2, reason="needs two GPUs")
def test_a_second_gpu_holds_its_own_arrays_and_runs_its_own_kernels():
    a = avalon.to_device(np.arange(6, dtype=np.float32), "cuda:1")
    assert a.device.id == 1 and backend_of(a).device == avalon.device("cuda:1")
    b = avalon.jit(lambda v: avalon.exp(v) * 2.0 + v)(a)
    assert b.device.id == 1
    np.testing.assert_allclose(_host(b), np.exp(np.arange(6.0)) * 2 + np.arange(6.0), rtol=1e-5)


# -- fused groups --------------------------------------------------------------------------------

def _mixed(x, y):
    return avalon.tanh(x * y + 1.0) * avalon.sigmoid(x) + avalon.maximum(x, 0.5) - avalon.where(x > y, x, 2.0)


def _fused_body(jitted):
    bodies = [n.attrs["body"] for n in jitted.graph.nodes if n.op == "fused"]
    assert len(bodies) == 1, jitted.graph
    return bodies[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_fused_group_is_one_elementwise_kernel_equal_to_the_cpu(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 33)).astype(dtype)
    y = rng.standard_normal((33,)).astype(dtype)
    f = avalon.jit(_mixed)
    want = f(x, y)
    got = f(avalon.to_device(x, "cuda"), avalon.to_device(y, "cuda"))
    assert isinstance(got, cupy.ndarray)
    np.testing.assert_allclose(_host(got), want, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    fused = _cuda().compile_fused(_fused_body(f))
    assert isinstance(fused.kernel, cupy.ElementwiseKernel) and fused.fallback_reason is None
    assert "tanh(" in fused.source and "// in:" in fused.source       # the generated code is readable
    assert fused.fused_source.operation in fused.kernel.cached_code     # and is what CuPy compiled
    assert "fused_" in f.source                                          # the compiled step calls it


def test_fused_kernels_keep_numpys_nan_and_signed_zero_rules():
    def f(x, y):
        return (avalon.maximum(x, y) * 2.0, avalon.minimum(x, y) * 2.0, avalon.relu(x) * 2.0,
                avalon.div(1.0, avalon.sign(y) + 0.0), avalon.div(1.0, avalon.abs(x)))
    vals = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1.5, -1.5], np.float32)
    x = np.repeat(vals, 7)
    y = np.tile(vals, 7)
    j = avalon.jit(f)
    with np.errstate(all="ignore"):
        want = j(x, y)
    got = j(avalon.to_device(x, "cuda"), avalon.to_device(y, "cuda"))
    for g, w in zip(got, want):
        g = _host(g)
        np.testing.assert_allclose(g, w, equal_nan=True)
        np.testing.assert_array_equal(np.signbit(g[w == 0]), np.signbit(w[w == 0]))


def test_a_group_without_an_exact_kernel_runs_op_by_op_and_still_agrees():
    x = np.linspace(-3, 3, 40, dtype=np.float16)
    f = avalon.jit(lambda v: avalon.exp(v * 0.5) - v)
    want = f(x)
    got = f(avalon.to_device(x, "cuda"))
    np.testing.assert_allclose(_host(got), want, rtol=5e-3, atol=5e-3)
    fused = _cuda().compile_fused(_fused_body(f))
    assert fused.kernel is None and "float16" in fused.fallback_reason


def test_fused_kernels_are_cached_by_the_body_text():
    f = avalon.jit(_mixed)
    x = avalon.to_device(np.ones((4, 3), np.float32), "cuda")
    y = avalon.to_device(np.ones((3,), np.float32), "cuda")
    f(x, y)
    body = _fused_body(f)
    assert _cuda().compile_fused(body) is _cuda().compile_fused(body.copy())


# -- randomness ----------------------------------------------------------------------------------

def test_random_draws_are_on_the_device_and_repeat_after_manual_seed():
    avalon.manual_seed(5)
    a = avalon.random_normal((20000,), device="cuda")
    u = avalon.random_uniform((20000,), np.float64, device="cuda")
    avalon.manual_seed(5)
    b = avalon.random_normal((20000,), device="cuda")
    assert isinstance(a, cupy.ndarray) and a.dtype == np.float32 and u.dtype == np.float64
    np.testing.assert_array_equal(_host(a), _host(b))
    h = _host(a)
    assert abs(h.mean()) < 0.05 and abs(h.std() - 1) < 0.05
    hu = _host(u)
    assert hu.min() >= 0 and hu.max() < 1 and abs(hu.mean() - 0.5) < 0.02
    half = avalon.random_uniform((100,), np.float16, device="cuda")
    assert half.dtype == np.float16
