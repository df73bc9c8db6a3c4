"""trace / jit / grad on plain Python objects: structures, caching, retracing,
randomness and the errors users meet."""
import dataclasses
import logging
import warnings
from typing import NamedTuple

import numpy as np
import pytest

import avalon

rng = np.random.default_rng(1)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


class Linear:
    def __init__(self, n_in, n_out):
        self.weight = f32(n_out, n_in)
        self.bias = np.zeros(n_out, np.float32)
        self.activate = True


@dataclasses.dataclass
class Net:
    layers: list
    scale: float = 1.0


class Pair(NamedTuple):
    a: np.ndarray
    b: np.ndarray


def net_loss(net, x, labels):
    for layer in net.layers:
        x = avalon.linear(x, layer.weight, layer.bias)
        if layer.activate:
            x = avalon.tanh(x)
    logp = avalon.log_softmax(x * net.scale)
    onehot = avalon.expand_dims(labels, 1) == np.arange(x.shape[1])
    return -avalon.sum(logp * onehot) / x.shape[0]


def numpy_net_loss(net, x, labels):
    for layer in net.layers:
        x = x @ layer.weight.T + layer.bias
        if layer.activate:
            x = np.tanh(x)
    x = x * net.scale
    logp = x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
    return -logp[np.arange(len(labels)), labels].mean()


def make_net():
    return Net([Linear(4, 6), Linear(6, 3)], scale=0.5)


def test_grad_returns_the_structure_of_each_argument():
    net, x, y = make_net(), f32(5, 4), np.array([0, 1, 2, 1, 0])
    loss, (g_net, g_x, g_y) = avalon.grad(net_loss, net, x, y)
    np.testing.assert_allclose(loss, numpy_net_loss(net, x, y), rtol=1e-5)
    assert type(g_net) is Net and type(g_net.layers[0]) is Linear
    assert g_net.layers[0].weight.shape == (6, 4) and g_net.layers[1].bias.shape == (3,)
    assert g_net.layers[0].activate is None and g_net.scale is None  # non-array leaves
    assert g_x.shape == x.shape
    assert g_y is None  # integer labels have no gradient


def test_grad_matches_finite_differences_through_a_model():
    net, x, y = make_net(), f32(5, 4).astype(np.float64), np.array([0, 1, 2, 1, 0])
    for layer in net.layers:
        layer.weight, layer.bias = layer.weight.astype(np.float64), layer.bias.astype(np.float64)
    _, (g, _, _) = avalon.grad(net_loss, net, x, y)
    w = net.layers[0].weight
    eps = 1e-6
    for idx in [(0, 0), (3, 2), (5, 3)]:
        old = w[idx]
        w[idx] = old + eps
        up = numpy_net_loss(net, x, y)
        w[idx] = old - eps
        down = numpy_net_loss(net, x, y)
        w[idx] = old
        assert abs((up - down) / (2 * eps) - g.layers[0].weight[idx]) < 1e-6


def test_dicts_namedtuples_tuples_and_slots_objects_trace():
    class Slotted:
        __slots__ = ("w",)

        def __init__(self, w):
            self.w = w

    def f(d, p, t, s):
        return avalon.sum(d["u"] * p.a + p.b * t[0] * s.w)
    args = ({"u": f32(3)}, Pair(f32(3), f32(3)), (f32(3), 7), Slotted(f32(3)))
    _, (gd, gp, gt, gs) = avalon.grad(f, *args)
    np.testing.assert_allclose(gd["u"], args[1].a, rtol=1e-6)
    assert isinstance(gp, Pair) and isinstance(gs, Slotted)
    np.testing.assert_allclose(gs.w, args[1].b * args[2][0], rtol=1e-6)
    assert gt[1] is None


def test_argnums_limits_the_gradients():
    net, x, y = make_net(), f32(5, 4), np.array([0, 1, 2, 1, 0])
    _, (g_net, g_x, g_y) = avalon.grad(net_loss, net, x, y, argnums=0)
    assert g_net.layers[0].weight.shape == (6, 4) and g_x is None and g_y is None


def test_numpy_functions_and_methods_on_tracers_are_recorded():
    def f(x):
        return np.sum(np.exp(x) * np.maximum(x, 0.0), axis=1).mean() + x.T.reshape(-1).max()
    x = f32(3, 4)
    g = avalon.trace(f, x)
    assert {"exp", "maximum", "sum", "transpose", "reshape", "max"} <= {n.op for n in g.nodes}
    np.testing.assert_allclose(avalon.jit(f)(x), f(x), rtol=1e-5)


def test_compiled_once_per_signature():
    gf = avalon.value_and_grad(lambda x: avalon.sum(x * x))
    for _ in range(3):
        gf(f32(2, 2))
    assert gf.traces == 1
    gf(f32(3, 2))
    gf(f32(2, 2).astype(np.float64))
    assert gf.traces == 3
    assert avalon.value_and_grad(gf.f) is gf  # grad(f, ...) finds the same cache


def test_retrace_log_says_which_argument_changed_and_how(caplog):
    def loss(model, x):
        return avalon.sum(model["w"] * x) * model["k"]
    m = {"w": f32(3), "k": 2}
    gf = avalon.value_and_grad(loss)
    gf(m, f32(3))
    with caplog.at_level(logging.DEBUG, logger="avalon.trace"):
        gf(m, f32(4, 3))
        gf({"w": m["w"], "k": 3}, f32(4, 3))
        gf({"w": m["w"].astype(np.float64), "k": 2}, f32(4, 3).astype(np.float64))
    text = caplog.text
    assert "args[1] shape (3,) -> (4, 3)" in text
    assert "static value args[0]['k'] changed from 2 to 3" in text
    assert "args[0]['w'] dtype float32 -> float64; args[1] dtype float32 -> float64" in text
    assert "test_api.py" in text  # the user's file and line


def test_retrace_budget_warns(monkeypatch):
    monkeypatch.setattr(avalon.api, "RETRACE_WARNING_BUDGET", 2)
    f = avalon.jit(lambda x: x + 1.0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for n in range(1, 5):
            f(f32(n))
    msgs = [str(x.message) for x in w if "retracing" in str(x.message)]
    assert msgs and "traced 3 times" in msgs[0] and "shape (2,) -> (3,)" in msgs[0]


def test_jit_source_is_readable_python():
    f = avalon.jit(lambda x, w: avalon.relu(x @ w))
    x, w = f32(2, 3), f32(3, 4)
    np.testing.assert_allclose(f(x, w), np.maximum(x @ w, 0), rtol=1e-6)
    assert f.source.startswith("def ") and "matmul" in f.source and "relu" in f.source
    assert "test_api.py" in f.source  # each line names the user's source line


@pytest.mark.parametrize("bad, what", [
    (lambda x: x if x.sum() > 0 else -x, "bool"),
    (lambda x: x * float(x.sum()), "float()"),
    (lambda x: x[: int(x.max())] if hasattr(x, "__getitem__") else int(x.max()), "int()"),
])
def test_using_a_traced_value_concretely_names_the_line_and_suggests_where(bad, what):
    with pytest.raises(avalon.ConcretizationError) as e:
        avalon.jit(bad)(f32(3))
    msg = str(e.value)
    assert "test_api.py:" in msg and "avalon.where" in msg


def test_shape_errors_name_both_shapes_and_the_line():
    with pytest.raises(avalon.ShapeError, match=r"\(2, 3\) and \(4, 5\).*test_api.py:\d+"):
        avalon.jit(lambda a, b: a @ b)(f32(2, 3), f32(4, 5))
    with pytest.raises(avalon.ShapeError, match=r"shapes \(2, 3\) and \(4,\) cannot be broadcast"):
        avalon.add(f32(2, 3), f32(4))


def test_dtype_mismatch_names_both_dtypes():
    with pytest.raises(avalon.DtypeError, match="float32 and float64.*test_api.py"):
        avalon.jit(lambda a, b: a * b)(f32(3), f32(3).astype(np.float64))


def test_grad_of_a_non_scalar_function_says_so():
    with pytest.raises(avalon.ShapeError, match=r"must return a scalar.*f32\[3\].*\.sum\(\)"):
        avalon.grad(lambda x: x * 2.0, f32(3))


def test_randomness_is_fresh_per_call_and_reproducible_after_manual_seed():
    f = avalon.jit(lambda x: avalon.dropout(x, 0.5) + avalon.random_normal(x.shape))
    x = np.ones(1000, np.float32)
    avalon.manual_seed(123)
    a, b = f(x), f(x)
    assert not np.array_equal(a, b)
    avalon.manual_seed(123)
    np.testing.assert_array_equal(f(x), a)
    np.testing.assert_array_equal(f(x), b)


def test_dropout_mask_is_shared_by_forward_and_backward():
    x = np.ones(2000, np.float32)
    loss, (g,) = avalon.grad(lambda x: avalon.sum(avalon.dropout(x, 0.25)), x)
    kept = g != 0
    assert 0.65 < kept.mean() < 0.85
    np.testing.assert_allclose(g[kept], 1 / 0.75, rtol=1e-6)
    np.testing.assert_allclose(loss, kept.sum() / 0.75, rtol=1e-4)


def test_to_device_walks_models_and_keeps_structure():
    net = make_net()
    moved = avalon.to_device(net, "cpu")
    assert type(moved) is Net and moved.layers[0].weight is net.layers[0].weight
    assert avalon.device("cpu").backend.name == "cpu"
    assert str(avalon.best_available_device()) == "cpu"


def test_eager_ops_compute_at_once_on_numpy_arrays():
    x = f32(3, 4)
    assert isinstance(avalon.exp(x), np.ndarray)
    np.testing.assert_allclose(avalon.softmax(x).sum(-1), np.ones(3), rtol=1e-6)
    np.testing.assert_allclose(avalon.logsumexp(x, axis=1), np.log(np.exp(x).sum(1)), rtol=1e-5)


def test_grad_records_which_argument_each_gradient_belongs_to():
    """avalon.tree.gradient_source(g): the object avalon.grad differentiated, so an
    optimizer given that object's parameters can be stepped with g alone."""
    import gc

    from avalon import tree

    class Model:
        def __init__(self):
            self.w = np.ones(3, np.float32)

    model, x = Model(), np.arange(3, dtype=np.float32)
    params = {"v": np.ones(3, np.float32)}
    _, (g_model, g_x, g_params) = avalon.grad(lambda m, x, p: avalon.sum(m.w * x * p["v"]), model, x, params)
    assert tree.gradient_source(g_model) is model
    assert tree.gradient_source(g_params) is params  # a dict: held by a short ring
    assert tree.gradient_source(g_x) is None  # an array argument's gradient is an array: nothing to record
    assert tree.gradient_source({"v": g_params["v"]}) is None  # a structure built by hand
    # the registry holds instances weakly: the record goes with the gradient
    key = id(g_model)
    del g_model
    gc.collect()
    assert key not in tree._sources_weak
    # dicts older than the ring are forgotten rather than kept alive
    for _ in range(3):
        avalon.grad(lambda p: avalon.sum(p["v"] * p["v"]), params)
    assert tree.gradient_source(g_params) is None
