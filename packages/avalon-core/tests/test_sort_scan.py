"""The scan and sort primitives (avalon.ops.sort_scan) beyond the table:
their batch-split rules, cumprod's gradient at zeros, topk's order."""
from __future__ import annotations

import numpy as np
import pytest

import avalon
from avalon.passes import sharding

rng = np.random.default_rng(5)
W = rng.standard_normal((8, 6)).astype(np.float32)
BATCH = rng.standard_normal((32, 8)).astype(np.float32)

ALONG_AXIS = {
    "cumsum": lambda h, axis: avalon.cumsum(h, axis),
    "cumprod": lambda h, axis: avalon.cumprod(h, axis),
    "sort": lambda h, axis: avalon.sort(h, axis),
    "argsort": lambda h, axis: avalon.cast(avalon.argsort(h, axis), h.dtype),
    "topk": lambda h, axis: avalon.topk(h, 3, axis).values,
}


def _step(op, axis):
    def loss(w, x):
        return avalon.sum(avalon.mul(ALONG_AXIS[op](avalon.tanh(x @ w), axis), 0.5))
    return loss


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(sharding, "MIN_SHARD_ELEMENTS", 0)


@pytest.mark.parametrize("op", sorted(ALONG_AXIS))
def test_an_op_along_the_feature_axis_splits_the_batch_and_gives_the_unsplit_result(op, small_threshold):
    loss = _step(op, 1)
    g = avalon.trace(avalon.value_and_grad(loss).f, W, BATCH)
    from avalon.autodiff import grad_graph
    backward = grad_graph(g, [True, False])
    assert sharding.split_batch(backward, {backward.inputs[1]}, 2) is not None
    value, (gw, _) = avalon.grad(loss, W, BATCH)
    h = np.tanh(BATCH.astype(np.float64) @ W)
    want = {"cumsum": np.cumsum, "cumprod": np.cumprod, "sort": np.sort,
            "argsort": lambda a, axis: np.argsort(a, axis, kind="stable"),
            "topk": lambda a, axis: -np.sort(-a, axis)[:, :3]}[op](h, axis=1).sum() * 0.5
    np.testing.assert_allclose(value, want, rtol=1e-5)
    assert np.all(np.isfinite(gw))


@pytest.mark.parametrize("op", sorted(ALONG_AXIS))
def test_an_op_along_the_batch_axis_is_not_split(op, small_threshold):
    g = avalon.trace(_step(op, 0), W, BATCH)
    assert sharding.split_batch(g, {g.inputs[1]}, 2) is None


def test_cumprod_gradient_is_exact_with_zeros_where_dividing_by_x_would_give_nan():
    x = np.array([[2.0, 0.0, 3.0, 0.0, 4.0], [1.5, -2.0, 0.0, 1.0, 0.5]])
    _, (g,) = avalon.grad(lambda a: avalon.sum(avalon.cumprod(a, 1)), x)
    want = np.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):   # d/dx_ij sum_k prod_{l<=k} x_il = sum_{k>=j} prod_{l<=k, l!=j} x_il
            want[i, j] = sum(np.prod(np.delete(x[i, :k + 1], j)) for k in range(j, x.shape[1]))
    np.testing.assert_allclose(g, want, rtol=1e-12)


def test_cumprod_has_no_second_derivative_and_says_so():
    from avalon.errors import MissingRuleError
    from avalon.primitive import PRIMITIVES
    with pytest.raises(MissingRuleError, match="'cumprod_grad' has no VJP rule"):
        PRIMITIVES["cumprod_grad"].get_vjp()


def test_topk_returns_values_and_indices_like_torch():
    torch = pytest.importorskip("torch")
    x = np.array([[1.0, 3.0, 3.0, 2.0], [0.0, -1.0, 5.0, 5.0]], np.float32)
    for largest in (True, False):
        values, indices = avalon.jit(lambda a: avalon.topk(a, 2, largest=largest))(x)
        want = torch.topk(torch.from_numpy(x), 2, largest=largest)
        np.testing.assert_array_equal(values, want.values.numpy())
        # ties keep their order: the first of the equal values comes first
        np.testing.assert_array_equal(indices, [[1, 2], [2, 3]] if largest else [[0, 3], [1, 0]])
    out = avalon.topk(x, 3)
    assert out.values.shape == out.indices.shape == (2, 3) and out.indices.dtype == np.int64


def test_topk_counts_nan_as_the_largest_as_torch():
    torch = pytest.importorskip("torch")
    x = np.array([1.0, np.nan, 3.0, 2.0], np.float32)
    got = avalon.topk(x, 2)
    want = torch.topk(torch.from_numpy(x), 2)
    np.testing.assert_array_equal(got.indices, want.indices.numpy())


def test_sort_gives_the_gradient_to_the_position_each_value_came_from():
    x = np.array([[3.0, 1.0, 2.0]])
    _, (g,) = avalon.grad(lambda a: avalon.sum(avalon.mul(avalon.sort(a, 1), np.array([10.0, 20.0, 30.0]))), x)
    np.testing.assert_array_equal(g, [[30.0, 10.0, 20.0]])
