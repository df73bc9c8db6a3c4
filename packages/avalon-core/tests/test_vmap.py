"""avalon.vmap end to end: per-example gradients (against torch.func and a
loop of avalon.grad), composition with jit, grad and vmap, in_axes/out_axes
structures, captures, and the errors.  Every vmapped function is called twice
and must not retrace (`.traces`)."""
from __future__ import annotations

import numpy as np
import pytest

import avalon
from avalon.batching import batch_graph
from avalon.errors import AvalonError, MissingRuleError, ShapeError
from avalon.primitive import PRIMITIVES

torch = pytest.importorskip("torch")

RTOL, ATOL = 1e-5, 1e-6


def _twice(f, *args):
    """f(*args) twice: the results must agree, and the second call must not retrace."""
    first = f(*args)
    traces = f.traces
    second = f(*args)
    assert f.traces == traces, f"{f.__name__} retraced on a second call with the same signature"
    for a, b in zip(_leaves(first), _leaves(second)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return first


def _leaves(x):
    return avalon.tree.flatten(x)[0]


# -- a 2-layer MLP -------------------------------------------------------------------------

D_IN, HIDDEN, D_OUT, N = 5, 7, 3, 6


def _mlp_params(rng):
    return {"W1": rng.standard_normal((D_IN, HIDDEN)).astype(np.float32) * 0.5,
            "b1": rng.standard_normal(HIDDEN).astype(np.float32) * 0.1,
            "W2": rng.standard_normal((HIDDEN, D_OUT)).astype(np.float32) * 0.5,
            "b2": rng.standard_normal(D_OUT).astype(np.float32) * 0.1}


def mlp_loss(p, x, y):
    """One example: x of shape (D_IN,), y of shape (D_OUT,)."""
    h = avalon.tanh(x @ p["W1"] + p["b1"])
    out = h @ p["W2"] + p["b2"]
    return avalon.mean((out - y) ** 2)


def torch_mlp_loss(p, x, y):
    h = torch.tanh(x @ p["W1"] + p["b1"])
    return torch.mean((h @ p["W2"] + p["b2"] - y) ** 2)


@pytest.fixture
def mlp():
    rng = np.random.default_rng(0)
    return (_mlp_params(rng), rng.standard_normal((N, D_IN)).astype(np.float32),
            rng.standard_normal((N, D_OUT)).astype(np.float32))


def _torch_per_example_grads(p, x, y):
    tp = {k: torch.from_numpy(v) for k, v in p.items()}
    g = torch.func.vmap(torch.func.grad(torch_mlp_loss), in_dims=(None, 0, 0))(tp, torch.from_numpy(x),
                                                                                torch.from_numpy(y))
    return {k: v.numpy() for k, v in g.items()}


def test_per_example_gradients_match_torch_func_and_a_loop_of_grad(mlp):
    p, x, y = mlp
    per_example = avalon.vmap(avalon.value_and_grad(mlp_loss), in_axes=(None, 0, 0))
    losses, (gp, gx, gy) = _twice(per_example, p, x, y)
    assert losses.shape == (N,) and gx.shape == x.shape and gy.shape == y.shape
    want = _torch_per_example_grads(p, x, y)
    for k in p:
        assert gp[k].shape == (N,) + p[k].shape
        np.testing.assert_allclose(gp[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)
    for i in range(N):
        loss_i, (gp_i, gx_i, _) = avalon.grad(mlp_loss, p, x[i], y[i])
        np.testing.assert_allclose(losses[i], loss_i, rtol=RTOL)
        np.testing.assert_allclose(gx[i], gx_i, rtol=RTOL, atol=ATOL)
        for k in p:
            np.testing.assert_allclose(gp[k][i], gp_i[k], rtol=RTOL, atol=ATOL, err_msg=f"{k}, example {i}")


def test_per_example_gradients_are_one_graph_whatever_the_batch(mlp):
    """No loop over the examples: the compiled graph of 6 examples and of 24
    has the same nodes, only their shapes change."""
    p, x, y = mlp
    per_example = avalon.vmap(lambda p, x, y: avalon.grad(mlp_loss, p, x, y)[1][0], in_axes=(None, 0, 0))
    _twice(per_example, p, x, y)
    small = [n.op for n in per_example.graph.nodes]
    big_x, big_y = np.tile(x, (4, 1)), np.tile(y, (4, 1))
    g = _twice(per_example, p, big_x, big_y)
    assert [n.op for n in per_example.graph.nodes] == small
    assert per_example.traces == 2
    np.testing.assert_allclose(g["W1"][N:2 * N], g["W1"][:N], rtol=RTOL, atol=ATOL)


def test_per_example_gradient_norms(mlp):
    p, x, y = mlp

    def grad_norm(p, x, y):
        _, (g, _, _) = avalon.value_and_grad(mlp_loss)(p, x, y)
        return avalon.sqrt(sum(avalon.sum(v * v) for v in g.values()))

    norms = _twice(avalon.vmap(grad_norm, in_axes=(None, 0, 0)), p, x, y)
    want = _torch_per_example_grads(p, x, y)
    expected = np.sqrt(sum((want[k].reshape(N, -1) ** 2).sum(1) for k in want))
    np.testing.assert_allclose(norms, expected, rtol=RTOL)


# -- composition ---------------------------------------------------------------------------

def test_jit_of_vmap_is_one_graph():
    rng = np.random.default_rng(1)
    w, xs = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    inner = avalon.vmap(lambda w, x: avalon.tanh(x @ w), in_axes=(None, 0))
    f = avalon.jit(lambda w, xs: inner(w, xs) * 2.0)
    out = _twice(f, w, xs)
    np.testing.assert_allclose(out, 2 * np.tanh(xs @ w), rtol=RTOL, atol=ATOL)
    assert f.traces == 1 and inner.traces == 1   # inlined once, cached for the signature
    assert f.graph.count("matmul") == 1


def test_vmap_of_vmap_pairwise_distances():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    dist = lambda u, v: avalon.sum((u - v) ** 2)  # noqa: E731
    pairwise = avalon.vmap(avalon.vmap(dist, in_axes=(None, 0)), in_axes=(0, None))
    out = _twice(pairwise, a, b)
    np.testing.assert_allclose(out, ((a[:, None] - b[None]) ** 2).sum(-1), rtol=RTOL, atol=ATOL)


def test_vmap_of_vmap_closing_over_the_outer_example():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    f = avalon.vmap(lambda u, vs: avalon.vmap(lambda v: avalon.sum(u * v))(vs), in_axes=(0, None))
    np.testing.assert_allclose(_twice(f, a, b), a @ b.T, rtol=RTOL, atol=ATOL)


def test_grad_of_vmap_matches_torch():
    rng = np.random.default_rng(4)
    w, xs = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    batched = avalon.vmap(lambda w, x: avalon.sum(avalon.tanh(x @ w) ** 2), in_axes=(None, 0))
    vg = avalon.value_and_grad(lambda w, xs: avalon.sum(batched(w, xs)), argnums=0)
    value, (gw, _) = _twice(vg, w, xs)
    tw = torch.from_numpy(w).requires_grad_(True)
    tv = (torch.tanh(torch.from_numpy(xs) @ tw) ** 2).sum()
    tv.backward()
    np.testing.assert_allclose(value, tv.item(), rtol=RTOL)
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=RTOL, atol=ATOL)


def test_vmap_of_jit():
    rng = np.random.default_rng(5)
    xs = rng.standard_normal((5, 4)).astype(np.float32)
    f = avalon.vmap(avalon.jit(lambda x: avalon.exp(x).sum()))
    np.testing.assert_allclose(_twice(f, xs), np.exp(xs).sum(1), rtol=RTOL)


def test_closures_over_outer_tracers():
    """vmap inside jit and grad closing over their traced values: the value
    is the same for every example (captured, not mapped)."""
    rng = np.random.default_rng(6)
    w, xs = np.float32(1.5) * np.ones(3, np.float32), rng.standard_normal((5, 3)).astype(np.float32)
    jitted = avalon.jit(lambda w, xs: avalon.vmap(lambda x: avalon.sum(x * w))(xs))
    np.testing.assert_allclose(_twice(jitted, w, xs), xs @ w, rtol=RTOL)
    vg = avalon.value_and_grad(lambda w, xs: avalon.sum(avalon.vmap(lambda x: avalon.sum(avalon.tanh(x * w)))(xs)),
                               argnums=0)
    _, (gw, _) = _twice(vg, w, xs)
    np.testing.assert_allclose(gw, ((1 - np.tanh(xs * w) ** 2) * xs).sum(0), rtol=RTOL, atol=ATOL)


# -- in_axes and out_axes ------------------------------------------------------------------

def test_in_axes_structure_and_negative_axes():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 5)).astype(np.float32)      # batch on axis 1 (-1)
    shared = rng.standard_normal(3).astype(np.float32)
    c = rng.standard_normal((5, 2)).astype(np.float32)      # batch on axis 0
    f = avalon.vmap(lambda d, c: d["a"] * d["s"] + c.sum(), in_axes=({"a": -1, "s": None}, 0))
    out = _twice(f, {"a": a, "s": shared}, c)
    np.testing.assert_allclose(out, a.T * shared + c.sum(1, keepdims=True), rtol=RTOL, atol=ATOL)


def test_out_axes_structure_and_broadcast_of_unmapped_outputs():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    k = rng.standard_normal(2).astype(np.float32)
    f = avalon.vmap(lambda x, k: (x * 2.0, k + 1.0, k * 3.0), in_axes=(0, None), out_axes=(-1, 0, None))
    doubled, broadcast, shared = _twice(f, x, k)
    np.testing.assert_allclose(doubled, (x * 2.0).T)        # batch axis last
    np.testing.assert_allclose(broadcast, np.broadcast_to(k + 1.0, (4, 2)))
    np.testing.assert_allclose(shared, k * 3.0)             # out_axes None: one value, no batch axis


def test_in_axes_list_entries_and_static_arguments():
    rng = np.random.default_rng(9)
    xs, ys = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)
    f = avalon.vmap(lambda pair, scale: (pair[0] + pair[1]) * scale, in_axes=([0, 1], None))
    np.testing.assert_allclose(_twice(f, [xs, ys], 2.0), (xs + ys.T) * 2.0, rtol=RTOL)


def test_batch_graph_is_a_graph_to_graph_transform():
    g = avalon.trace(lambda x, w: avalon.sum(x * w), np.ones(3, np.float32), np.ones(3, np.float32))
    batched = batch_graph(g, [0, None], 5).check()
    assert [tuple(i.shape) for i in batched.inputs] == [(5, 3), (3,)]
    assert [tuple(o.shape) for o in batched.outputs] == [(5,)]
    fn = avalon.compile_graph(batched)
    xs = np.arange(15, dtype=np.float32).reshape(5, 3)
    np.testing.assert_allclose(fn(xs, np.full(3, 2.0, np.float32))[0], 2 * xs.sum(1))
    last = batch_graph(g, [-1, None], 5).check()
    assert [tuple(i.shape) for i in last.inputs] == [(3, 5), (3,)]
    np.testing.assert_allclose(avalon.compile_graph(last)(xs.T.copy(), np.full(3, 2.0, np.float32))[0],
                               2 * xs.sum(1))


# -- errors ----------------------------------------------------------------------------------

def test_mismatched_batch_sizes_name_both_arguments():
    f = avalon.vmap(lambda a, b: a + b)
    with pytest.raises(ShapeError, match=r"args\[0\].*3 examples.*args\[1\].*has 4.*test_vmap.py"):
        f(np.zeros((3, 2), np.float32), np.zeros((4, 2), np.float32))


def test_out_axes_none_on_a_mapped_output_is_refused():
    f = avalon.vmap(lambda a: a * 2.0, out_axes=None)
    with pytest.raises(AvalonError, match=r"out_axes is None for output.*differs between examples"):
        f(np.zeros((3, 2), np.float32))


def test_a_primitive_without_a_batching_rule_is_named(monkeypatch):
    monkeypatch.delitem(PRIMITIVES["tanh"].rules, "batching")
    f = avalon.vmap(lambda a: avalon.tanh(a))
    with pytest.raises(MissingRuleError, match=r"'tanh' has no batching rule.*test_vmap.py"):
        f(np.zeros((3, 2), np.float32))


def test_a_primitive_without_a_rule_is_fine_when_nothing_mapped_reaches_it(monkeypatch):
    monkeypatch.delitem(PRIMITIVES["tanh"].rules, "batching")
    k = np.full(2, 0.5, np.float32)
    f = avalon.vmap(lambda a, k: a * avalon.tanh(k), in_axes=(0, None))
    np.testing.assert_allclose(_twice(f, np.ones((3, 2), np.float32), k), np.broadcast_to(np.tanh(k), (3, 2)),
                               rtol=RTOL)


@pytest.mark.parametrize("in_axes, args, message", [
    ((0,), (np.zeros(3, np.float32), np.zeros(3, np.float32)), r"in_axes at in_axes has 1 entries for a value of 2"),
    (0, (np.ones((), np.float32),), r"axis 0 of args\[0\], which has shape \(\)"),
    (5, (np.zeros((3, 2), np.float32),), r"axis 5 of args\[0\]"),
    (None, (np.zeros((3, 2), np.float32),), r"no argument is mapped"),
    (({"a": 0},), ([np.zeros(3, np.float32)],), r"does not match the value there"),
])
def test_in_axes_that_do_not_fit_the_arguments(in_axes, args, message):
    f = avalon.vmap(lambda *a: a[0] * 1.0, in_axes=in_axes)
    with pytest.raises(AvalonError, match=message):
        f(*args)


def test_assign_of_a_mapped_value_into_a_shared_array_is_refused():
    shared = np.zeros(2, np.float32)
    f = avalon.vmap(lambda dst, src: avalon.assign(dst, src) * 1.0, in_axes=(None, 0))
    with pytest.raises(AvalonError, match=r"assign writes a value that differs between examples"):
        f(shared, np.ones((3, 2), np.float32))
    np.testing.assert_array_equal(shared, 0.0)   # nothing was written


def test_assign_into_mapped_arrays_along_any_axis():
    dst = np.zeros((2, 3), np.float32)            # batch on axis 1
    src = np.arange(6, dtype=np.float32).reshape(3, 2)
    f = avalon.vmap(lambda d, s: avalon.assign(d, s) + 0.0, in_axes=(1, 0))
    out = _twice(f, dst.copy(), src)
    np.testing.assert_array_equal(out, src)
    written = dst.copy()
    f(written, src)
    np.testing.assert_array_equal(written, src.T)   # in the caller's array, as jit's assign
    shared_src = np.array([5.0, 6.0], np.float32)
    g = avalon.vmap(lambda d, s: avalon.assign(d, s) + 0.0, in_axes=(1, None))
    np.testing.assert_array_equal(_twice(g, dst.copy(), shared_src), np.broadcast_to(shared_src, (3, 2)))


def test_axes_that_are_not_ints_are_refused_when_vmap_is_called():
    with pytest.raises(AvalonError, match=r"in_axes\[1\] is str '0'.*test_vmap.py"):
        avalon.vmap(lambda a, b: a + b, in_axes=(0, "0"))
    with pytest.raises(AvalonError, match=r"out_axes is float 0.0"):
        avalon.vmap(lambda a: a, out_axes=0.0)


def test_one_output_returned_twice_with_two_out_axes():
    def f(a):
        y = a * 2.0
        return y, y
    first, second = _twice(avalon.vmap(f, out_axes=(0, 1)), np.arange(6, dtype=np.float32).reshape(3, 2))
    np.testing.assert_array_equal(first, second.T)


def test_one_array_passed_twice_with_two_in_axes():
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    dist = lambda u, v: avalon.sum((u - v) ** 2)  # noqa: E731
    pairwise = avalon.vmap(avalon.vmap(dist, in_axes=(None, 0)), in_axes=(0, None))
    np.testing.assert_allclose(_twice(pairwise, a, a), ((a[:, None] - a[None]) ** 2).sum(-1))
    swapped = avalon.vmap(lambda u, v: u * v, in_axes=(0, 1))   # the same square array along rows and columns
    sq = np.arange(9, dtype=np.float32).reshape(3, 3)
    np.testing.assert_allclose(_twice(swapped, sq, sq), sq * sq.T)


def test_tied_weights_keep_their_tie_under_vmap_of_grad():
    """The same array at two places with the same in_axes stays one input, so
    a grad inside sums the gradients of both places (as without vmap)."""
    w = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    xs = np.arange(6, dtype=np.float32).reshape(3, 2)
    loss = lambda p, x: avalon.sum((x @ p["a"]) @ p["b"])  # noqa: E731
    per_example = avalon.vmap(avalon.value_and_grad(loss, argnums=0), in_axes=(None, 0))
    _, (g, _) = _twice(per_example, {"a": w, "b": w}, xs)
    assert g["a"] is g["b"] or np.array_equal(g["a"], g["b"])
    for i in range(3):
        _, (gi, _) = avalon.grad(loss, {"a": w, "b": w}, xs[i], argnums=0)
        np.testing.assert_allclose(g["a"][i], gi["a"], rtol=RTOL)


def test_a_refusing_rule_names_the_users_line():
    f = avalon.vmap(lambda dst, src: avalon.assign(dst, src) * 1.0, in_axes=(None, 0))
    with pytest.raises(AvalonError, match=r"assign writes.*\(at .*test_vmap.py:\d+\)"):
        f(np.zeros(2, np.float32), np.ones((3, 2), np.float32))


class _Affine:
    """A plain model object: its arrays are leaves of the argument."""

    def __init__(self, w, b):
        self.w, self.b = w, b

    def __call__(self, x):
        return avalon.tanh(x @ self.w + self.b)


def test_a_model_object_shared_by_every_example_and_its_per_example_gradients():
    rng = np.random.default_rng(10)
    model = _Affine(rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32))
    xs = rng.standard_normal((5, 4)).astype(np.float32)
    out = _twice(avalon.vmap(lambda m, x: m(x), in_axes=(None, 0)), model, xs)
    np.testing.assert_allclose(out, np.tanh(xs @ model.w + model.b), rtol=RTOL, atol=ATOL)
    per_example = avalon.vmap(avalon.value_and_grad(lambda m, x: avalon.sum(m(x)), argnums=0), in_axes=(None, 0))
    _, (g, _) = _twice(per_example, model, xs)
    assert isinstance(g, _Affine) and g.w.shape == (5, 4, 3) and g.b.shape == (5, 3)
    tw, tb = torch.from_numpy(model.w), torch.from_numpy(model.b)
    want = torch.func.vmap(torch.func.grad(lambda w, b, x: torch.tanh(x @ w + b).sum(), argnums=(0, 1)),
                           in_dims=(None, None, 0))(tw, tb, torch.from_numpy(xs))
    np.testing.assert_allclose(g.w, want[0].numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(g.b, want[1].numpy(), rtol=RTOL, atol=ATOL)
