"""The merge_sums pass (avalon.passes.sums) and the scatter_slices primitive.

Each rewrite is shown by what it does to the compiled gradient graph (ops
counted in `fn.graph`) and by results that do not change: gradients against
the same function compiled without the pass, against PyTorch (float32) and
against central finite differences (float64); and by the cases where a rule
must not fire."""
import numpy as np
import pytest

import avalon
from avalon.testing import numerical_gradient
from avalon import passes
from avalon.ops.indexing import _scatter_plan, scatter_slices_p
from avalon.primitive import bind

torch = pytest.importorskip("torch")
rng = np.random.default_rng(0)


def grad_fn(f, merge=True, argnums=None):
    """value_and_grad of f with the default pipeline, or without merge_sums."""
    pipeline = [p for p in passes.default_pipeline() if merge or p[0] != "merge_sums"]
    return avalon.value_and_grad(f, argnums=argnums, passes=pipeline)


def grads_and_graph(f, *args, merge=True, argnums=None):
    fn = grad_fn(f, merge, argnums)
    _, grads = fn(*args)
    return grads, fn.graph


def count(graph, op):
    return sum(n.op == op for n in graph.nodes)


numgrad = numerical_gradient


# -- gradients of slices: one scatter_slices ------------------------------------------------

W_STEPS = rng.standard_normal((6, 4, 5)).astype(np.float32)


def per_step_loss(x):
    """Reads x[t] at every step, as an RNN reads its input projection."""
    total = 0.0
    for t in range(x.shape[0]):
        total = total + avalon.sum(avalon.tanh(x[t]) * W_STEPS[t])
    return total


def test_gradients_of_disjoint_int_slices_become_one_scatter_with_the_same_values():
    x = rng.standard_normal((6, 4, 5)).astype(np.float32)
    merged, g_merged = grads_and_graph(per_step_loss, x)
    plain, g_plain = grads_and_graph(per_step_loss, x, merge=False)
    assert count(g_plain, "getitem_grad") == 6 and count(g_plain, "scatter_slices") == 0
    assert count(g_merged, "getitem_grad") == 0 and count(g_merged, "scatter_slices") == 1
    # disjoint slices are written, not added: bit for bit the unmerged result
    np.testing.assert_array_equal(merged[0], plain[0])
    xt = torch.from_numpy(x).requires_grad_(True)
    sum(torch.sum(torch.tanh(xt[t]) * torch.from_numpy(W_STEPS[t])) for t in range(6)).backward()
    np.testing.assert_allclose(merged[0], xt.grad.numpy(), rtol=1e-6, atol=1e-6)


def mixed_slices_loss(x):
    """Overlapping slices, strided slices and a new axis, all of one array."""
    return (avalon.sum(avalon.tanh(x[0:4])) + avalon.sum(x[2:6] ** 2) + avalon.sum(avalon.sigmoid(x[::2]))
            + avalon.sum(x[1::3] * 3.0) + avalon.sum(avalon.exp(x[None, 1, ::2])))


def test_overlapping_and_strided_slices_accumulate_and_match_finite_differences():
    x = rng.standard_normal((6, 3))
    (grad,), graph = grads_and_graph(mixed_slices_loss, x)
    scatters = [n for n in graph.nodes if n.op == "scatter_slices"]
    assert len(scatters) == 1 and len(scatters[0].inputs) == 5
    assert count(graph, "getitem_grad") == 0
    zero, adds = _scatter_plan(scatters[0].shape, scatters[0].attrs["indices"])
    assert zero and any(adds)  # overlapping pieces: zeroed buffer, later pieces added
    (plain,), _ = grads_and_graph(mixed_slices_loss, x, merge=False)
    np.testing.assert_allclose(grad, plain, rtol=1e-12, atol=1e-12)
    f = lambda v: float(grad_fn(mixed_slices_loss)(v)[0])  # noqa: E731
    np.testing.assert_allclose(grad, numgrad(f, x), rtol=1e-6, atol=1e-8)


def test_mixed_slices_match_torch_in_float32():
    x = rng.standard_normal((6, 3)).astype(np.float32)
    (grad,), _ = grads_and_graph(mixed_slices_loss, x)
    t = torch.from_numpy(x).requires_grad_(True)
    (torch.sum(torch.tanh(t[0:4])) + torch.sum(t[2:6] ** 2) + torch.sum(torch.sigmoid(t[::2]))
     + torch.sum(t[1::3] * 3.0) + torch.sum(torch.exp(t[None, 1, ::2]))).backward()
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_slices_tiling_the_array_need_no_zeroing():
    shape = (4, 12)
    gates = tuple((("slice", 0, 4, 1), ("slice", 3 * k, 3 * k + 3, 1)) for k in range(4))
    assert _scatter_plan(shape, gates) == (False, (False,) * 4)
    assert _scatter_plan(shape, gates[:3]) == (True, (False,) * 3)        # a gap: zeros first
    strided = ((("slice", 0, 4, 2),), (("slice", 1, 4, 2),))             # even and odd rows tile too
    assert _scatter_plan(shape, strided) == (False, (False, False))
    overlap = ((("int", 1),), (("slice", 0, 2, 1),))
    assert _scatter_plan(shape, overlap) == (True, (False, True))


def test_split_gates_gradient_is_one_scatter():
    x = rng.standard_normal((3, 8)).astype(np.float32)

    def f(x):
        i, f_, g, o = avalon.split(x, 4, axis=-1)
        return avalon.sum(avalon.sigmoid(i) * avalon.tanh(g) + avalon.sigmoid(f_) * avalon.sigmoid(o))
    (grad,), graph = grads_and_graph(f, x)
    (plain,), _ = grads_and_graph(f, x, merge=False)
    assert count(graph, "scatter_slices") == 1 and count(graph, "getitem_grad") == 0
    np.testing.assert_array_equal(grad, plain)


def test_advanced_indices_and_a_single_slice_are_left_alone():
    x = rng.standard_normal((5, 3))
    rows = np.array([0, 2, 2])

    def f(x):  # repeated integer-array indices: a scatter-add, not a basic slice
        return avalon.sum(avalon.tanh(x[rows])) + avalon.sum(x[np.array([1, 2])] ** 2) + avalon.sum(x[1:3])
    (grad,), graph = grads_and_graph(f, x)
    assert count(graph, "scatter_slices") == 0 and count(graph, "getitem_grad") == 3
    fx = lambda v: float(grad_fn(f)(v)[0])  # noqa: E731
    np.testing.assert_allclose(grad, numgrad(fx, x), rtol=1e-6, atol=1e-8)
    (_,), single = grads_and_graph(lambda x: avalon.sum(avalon.tanh(x[1:4])), x)
    assert count(single, "scatter_slices") == 0 and count(single, "getitem_grad") == 1


def test_scatter_slices_vjp_and_batching_rules():
    a, b = rng.standard_normal((2, 3)), rng.standard_normal((3, 3))
    w = rng.standard_normal((4, 3))
    attrs = {"shape": (4, 3), "indices": ((("slice", 0, 2, 1),), (("slice", 1, 4, 1),))}

    def f(a, b):
        return avalon.sum(avalon.tanh(bind(scatter_slices_p, (a, b), attrs)) * w)
    direct = np.zeros((4, 3))
    direct[0:2] += a
    direct[1:4] += b
    np.testing.assert_allclose(bind(scatter_slices_p, (a, b), attrs), direct)
    _, (ga, gb) = avalon.grad(f, a, b)
    np.testing.assert_allclose(ga, numgrad(lambda v: f(v, b), a), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gb, numgrad(lambda v: f(a, v), b), rtol=1e-6, atol=1e-8)
    batch_a = rng.standard_normal((5, 2, 3))
    batched = avalon.vmap(lambda a: bind(scatter_slices_p, (a, b), attrs))(batch_a)
    for k in range(5):
        np.testing.assert_allclose(batched[k], bind(scatter_slices_p, (batch_a[k], b), attrs))


# -- sums of products: one matmul of joined operands ------------------------------------------------

def recurrent_loss(w, hs):
    """A weight used at every step: its gradient is sum_t h_t^T @ g_t."""
    total = 0.0
    for t in range(hs.shape[0]):
        total = total + avalon.sum(avalon.tanh(hs[t] @ w))
    return total


def test_per_step_weight_gradients_become_one_matmul():
    # 6 products of 4 rows into a 32x48 result: copying 6 x 4 x (32 + 48)
    # operand elements is cheaper than adding six 32x48 results
    w = rng.standard_normal((32, 48)).astype(np.float32)
    hs = rng.standard_normal((6, 4, 32)).astype(np.float32)
    grads, graph = grads_and_graph(recurrent_loss, w, hs, argnums=0)
    gw = grads[0]
    grads, g_plain = grads_and_graph(recurrent_loss, w, hs, merge=False, argnums=0)
    plain = grads[0]
    assert count(g_plain, "matmul") == 12                       # 6 forward, 6 weight-gradient products
    assert count(graph, "matmul") == 7 and count(graph, "concatenate") == 2
    np.testing.assert_allclose(gw, plain, rtol=1e-5, atol=1e-5)
    wt = torch.from_numpy(w).requires_grad_(True)
    sum(torch.sum(torch.tanh(torch.from_numpy(hs[t]) @ wt)) for t in range(6)).backward()
    np.testing.assert_allclose(gw, wt.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_joined_products_match_finite_differences_in_float64():
    w = rng.standard_normal((8, 10))
    hs = rng.standard_normal((4, 2, 8))
    grads, graph = grads_and_graph(recurrent_loss, w, hs, argnums=0)
    gw = grads[0]
    assert count(graph, "concatenate") == 2
    f = lambda v: float(grad_fn(recurrent_loss, argnums=0)(v, hs)[0])  # noqa: E731
    np.testing.assert_allclose(gw, numgrad(f, w), rtol=1e-6, atol=1e-8)


def test_products_are_not_joined_when_copying_the_operands_costs_more():
    # each product contracts 1000 rows into a 3x2 result: adding six 3x2
    # results is far cheaper than copying 6 x 1000 x (3 + 2) operand elements
    w = rng.standard_normal((3, 2)).astype(np.float32)
    hs = rng.standard_normal((6, 1000, 3)).astype(np.float32)
    grads, graph = grads_and_graph(recurrent_loss, w, hs, argnums=0)
    gw = grads[0]
    assert count(graph, "matmul") == 12 and count(graph, "concatenate") == 0
    plain = grads_and_graph(recurrent_loss, w, hs, merge=False, argnums=0)[0][0]
    np.testing.assert_array_equal(gw, plain)


# -- the pass on its own ---------------------------------------------------------------------------

def test_sum_of_like_transposes_is_the_transpose_of_a_sum_and_other_views_stay():
    a, b, c = (rng.standard_normal((3, 4)) for _ in range(3))
    d = rng.standard_normal((4, 3))

    def f(a, b, c, d):
        return a.T + b.T + avalon.reshape(c, (4, 3)) + d
    graph = avalon.trace(f, a, b, c, d)
    assert count(graph, "transpose") == 2
    merged = passes.merge_sums(graph).check()
    assert count(merged, "transpose") == 1 and count(merged, "reshape") == 1
    out = avalon.compile_graph(merged, "cpu")(a, b, c, d)
    np.testing.assert_allclose(out[0] if isinstance(out, tuple) else out, f(a, b, c, d), rtol=1e-12)


def test_a_term_read_elsewhere_is_not_merged():
    x = rng.standard_normal((4, 3))
    graph = avalon.Graph("f")
    inp = graph.add_input((4, 3), np.float64)
    attrs = lambda k: {"index": (("int", k),), "shape": (4, 3)}  # noqa: E731
    row = graph.add_node("getitem", [inp], {"index": (("int", 0),)}, (3,), np.float64)
    g0 = graph.add_node("getitem_grad", [row], attrs(0), (4, 3), np.float64)
    g1 = graph.add_node("getitem_grad", [row], attrs(1), (4, 3), np.float64)
    s = graph.add_node("add", [g0, g1], {}, (4, 3), np.float64)
    graph.outputs = [s, g1]        # g1 is also an output: only the sum reads g0
    merged = passes.merge_sums(graph.check()).check()
    assert count(merged, "scatter_slices") == 0 and count(merged, "getitem_grad") == 2
    out, extra = avalon.compile_graph(merged, "cpu")(x)
    expect = np.zeros((4, 3))
    expect[0] = x[0]
    expect[1] = x[0]
    np.testing.assert_allclose(out, expect)
    np.testing.assert_allclose(extra, np.where(np.arange(4)[:, None] == 1, x[0], 0.0))
