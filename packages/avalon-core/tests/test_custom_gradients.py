"""avalon.custom_vjp (user-defined gradients) and avalon.checkpoint
(rematerialization): values and gradients against PyTorch or closed forms,
composition with jit and grad of grad, the errors, and the memory a
checkpointed step saves.  Every compiled case checks that a second call does
not retrace (`.traces`)."""
from __future__ import annotations

import numpy as np
import pytest

import avalon
from avalon.errors import AvalonError, ShapeError

torch = pytest.importorskip("torch")
tf = torch.func


def _t(x):
    return torch.from_numpy(np.array(x, copy=True))


def _called_twice(fn, *args):
    first = fn(*args)
    fn(*args)
    assert fn.traces == 1, f"{fn.__name__} retraced on an identical call"
    return first


# -- custom_vjp -------------------------------------------------------------------

@avalon.custom_vjp
def straight_through_sign(x):
    return avalon.sign(x)


straight_through_sign.defvjp(lambda x: (avalon.sign(x), ()), lambda res, ct: (ct,))


def test_straight_through_estimator_matches_torch_detach_trick():
    x = np.linspace(-2, 2, 9).astype(np.float32)
    y = np.arange(9, dtype=np.float32) - 4
    loss = avalon.value_and_grad(lambda x, y: ((straight_through_sign(x) - y) ** 2 * x).sum(), argnums=0)
    val, (g, _) = _called_twice(loss, x, y)
    tx = _t(x).requires_grad_(True)
    ste = tx + (torch.sign(tx) - tx).detach()
    want = ((ste - _t(y)) ** 2 * tx).sum()
    want.backward()
    np.testing.assert_allclose(val, want.item(), rtol=1e-6)
    np.testing.assert_allclose(g, tx.grad.numpy(), rtol=1e-6)


def test_custom_vjp_inside_jit_is_the_function_and_leaves_no_node():
    x = np.linspace(-2, 2, 9).astype(np.float32)
    f = avalon.jit(lambda x: straight_through_sign(x) * 3.0)
    np.testing.assert_array_equal(_called_twice(f, x), np.sign(x) * 3)
    assert "custom_vjp_call" not in {n.op for n in f.graph.nodes}
    g = avalon.value_and_grad(lambda x: avalon.jit(lambda x: straight_through_sign(x) * x)(x).sum())
    _, (gx,) = _called_twice(g, x)
    np.testing.assert_allclose(gx, np.sign(x) + x)


def test_eager_call_runs_the_function_itself():
    x = np.float32([-1.5, 0.0, 2.0])
    np.testing.assert_array_equal(straight_through_sign(x), np.sign(x))


@avalon.custom_vjp
def clip_gradient(x):
    return x


clip_gradient.defvjp(lambda x: (x, ()), lambda res, ct: (avalon.clip(ct, -1.0, 1.0),))


def test_gradient_clipping_inside_the_graph():
    x = np.float32([0.5, -2.0, 3.0])
    f = avalon.value_and_grad(lambda x: (clip_gradient(x) * np.float32([0.5, -4.0, 4.0])).sum())
    _, (g,) = _called_twice(f, x)
    np.testing.assert_array_equal(g, [0.5, -1.0, 1.0])


@avalon.custom_vjp
def safe_norm(x):
    return avalon.sqrt((x * x).sum())


def _safe_norm_fwd(x):
    n = avalon.sqrt((x * x).sum())
    return n, (x, n)


def _safe_norm_bwd(res, ct):
    x, n = res
    return (ct * x / avalon.maximum(n, 1e-12),)


safe_norm.defvjp(_safe_norm_fwd, _safe_norm_bwd)


def test_numerically_stable_gradient_at_the_origin():
    """sqrt(sum x^2) has a 0/0 gradient at x = 0; the custom rule gives 0
    there and torch's norm gradient elsewhere."""
    f = avalon.value_and_grad(safe_norm)
    with np.errstate(all="ignore"):
        _, (naive,) = avalon.grad(lambda x: avalon.sqrt((x * x).sum()), np.zeros(3, np.float32))
    assert np.isnan(naive).all()
    _, (g0,) = _called_twice(f, np.zeros(3, np.float32))
    np.testing.assert_array_equal(g0, np.zeros(3))
    x = np.float32([3.0, -4.0, 1.0])
    _, (g,) = f(x)
    np.testing.assert_allclose(g, tf.grad(torch.linalg.vector_norm)(_t(x)).numpy(), rtol=1e-6)


@avalon.custom_vjp
def cube(x):
    return x * x * x


cube.defvjp(lambda x: (x * x * x, x), lambda x, ct: (3.0 * x * x * ct,))


def test_custom_vjp_inside_grad_of_grad_differentiates_the_rule():
    """The outer grad differentiates the ops bwd wrote: d/dx <3 x^2, v> = 6 x v,
    as torch.func.hessian of sum(x^3) gives."""
    x = np.float64([0.5, -1.0, 2.0])
    v = np.float64([1.0, 2.0, -1.0])

    def directional(x, v):
        _, (g,) = avalon.value_and_grad(lambda x: cube(x).sum())(x)
        return (g * v).sum()

    hvp = avalon.value_and_grad(directional, argnums=0)
    _, (got, _) = _called_twice(hvp, x, v)
    want = tf.hessian(lambda x: (x ** 3).sum())(_t(x)) @ _t(v)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-12)
    # inside jit of grad of grad as well
    jitted = avalon.jit(lambda x, v: avalon.grad(directional, x, v, argnums=0)[1][0])
    np.testing.assert_allclose(_called_twice(jitted, x, v), got, rtol=1e-12)


@avalon.custom_vjp
def scaled_pair(x, y):
    return x * 2.0, x * y


scaled_pair.defvjp(lambda x, y: ((x * 2.0, x * y), (x, y)),
                   lambda res, cts: (2.0 * cts[0] + res[1] * cts[1], res[0] * cts[1]))


def test_several_outputs_and_arguments():
    x, y = np.float64([1.0, -2.0]), np.float64([0.5, 3.0])
    f = avalon.value_and_grad(lambda x, y: (scaled_pair(x, y)[0] * 3.0 + scaled_pair(x, y)[1] ** 2).sum())
    val, (gx, gy) = _called_twice(f, x, y)
    want = tf.grad(lambda x, y: ((x * 2) * 3.0 + (x * y) ** 2).sum(), argnums=(0, 1))(_t(x), _t(y))
    np.testing.assert_allclose(gx, want[0].numpy())
    np.testing.assert_allclose(gy, want[1].numpy())


@avalon.custom_vjp
def affine(params, x):
    w, b = params
    return x * w + b


affine.defvjp(lambda params, x: (affine.fun(params, x), (params, x)),
              lambda res, ct: ((ct * res[1], None), ct * res[0][0]))


def test_structured_arguments_and_none_cotangents():
    w, b, x = np.float32([2.0, 3.0]), np.float32([1.0, 1.0]), np.float32([0.5, -1.0])
    f = avalon.value_and_grad(lambda p, x: affine(p, x).sum())
    _, ((gw, gb), gx) = _called_twice(f, (w, b), x)
    np.testing.assert_allclose(gw, x)
    np.testing.assert_array_equal(gb, np.zeros(2))   # bwd said None: no gradient
    np.testing.assert_allclose(gx, w)


def test_errors_name_the_function_and_what_to_do():
    @avalon.custom_vjp
    def no_rule(x):
        return x

    with pytest.raises(AvalonError, match=r"no_rule has no gradient rule.*defvjp\(fwd, bwd\)"):
        avalon.grad(lambda x: no_rule(x).sum(), np.ones(2, np.float32))

    @avalon.custom_vjp
    def bad_arity(x):
        return x

    bad_arity.defvjp(lambda x: (x, ()), lambda res, ct: (ct, ct))
    with pytest.raises(AvalonError, match="bad_arity: bwd must return a tuple with one cotangent per argument"):
        avalon.grad(lambda x: bad_arity(x).sum(), np.ones(2, np.float32))

    @avalon.custom_vjp
    def bad_shape(x):
        return x

    bad_shape.defvjp(lambda x: (x, ()), lambda res, ct: (ct.sum(),))
    with pytest.raises(ShapeError, match=r"bad_shape: bwd gave a cotangent of shape \(\)"):
        avalon.grad(lambda x: bad_shape(x).sum(), np.ones(2, np.float32))

    @avalon.custom_vjp
    def bad_fwd(x):
        return x

    bad_fwd.defvjp(lambda x: x, lambda res, ct: (ct,))
    with pytest.raises(AvalonError, match=r"bad_fwd: fwd must return a pair \(output, residuals\)"):
        avalon.grad(lambda x: bad_fwd(x).sum(), np.ones(2, np.float32))


def test_fwd_closing_over_a_traced_float_is_refused():
    """bwd gives cotangents for the arguments only: a traced value fwd reads
    from its closure would silently get no gradient, so it is refused."""
    def loss(w, x):
        @avalon.custom_vjp
        def scale(x):
            return x * w

        scale.defvjp(lambda x: (x * w, ()), lambda res, ct: (ct * w,))
        return scale(x).sum()

    with pytest.raises(AvalonError, match=r"scale: fwd uses a traced f32\[2\] value that is not one of its "
                                          r"arguments.*Pass it to the function as an argument"):
        avalon.grad(loss, np.ones(2, np.float32), np.ones(2, np.float32))


# -- checkpoint ---------------------------------------------------------------------

def _segment(h, *ws):
    for w in ws:
        h = avalon.tanh(h @ w)
    return h


def _deep_mlp(layers=8, width=16, batch=32, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    ws = [(rng.standard_normal((width, width)) / np.sqrt(width)).astype(dtype) for _ in range(layers)]
    return ws, rng.standard_normal((batch, width)).astype(dtype)


def _step(run_segment, layers, seg, **kw):
    def loss(ws, x):
        h = x
        for k in range(0, layers, seg):
            h = run_segment(h, *ws[k:k + seg])
        return (h * h).mean()
    return avalon.value_and_grad(loss, argnums=0, **kw)


def test_checkpoint_gives_the_same_gradients_and_recomputes():
    ws, x = _deep_mlp()
    plain = _step(_segment, 8, 4)
    remat = _step(avalon.checkpoint(_segment), 8, 4)
    val, (g, _) = _called_twice(plain, ws, x)
    rval, (rg, _) = _called_twice(remat, ws, x)
    assert val == rval
    for a, b in zip(g, rg):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-15)
    ops = [n.op for n in remat.graph.nodes]
    assert "remat_barrier" in ops and "remat_barrier" not in [n.op for n in plain.graph.nodes]


def test_checkpoint_halves_the_buffers_of_a_deep_mlp_step():
    """One activation per 4-layer segment instead of one per layer (the
    memory plan is where a step's activations live; benchmarks/remat_memory.py
    prints the figures at a larger size)."""
    ws, x = _deep_mlp(layers=16, width=32, batch=512, dtype=np.float32)
    plain = _step(_segment, 16, 4, parallel=False)
    remat = _step(avalon.checkpoint(_segment), 16, 4, parallel=False)
    plain(ws, x)
    remat(ws, x)
    activation = x.nbytes
    saved = plain.memory_plan.total_bytes - remat.memory_plan.total_bytes
    assert saved >= 6 * activation, (plain.memory_plan.summary(), remat.memory_plan.summary())


def test_checkpoint_inside_grad_of_grad_and_jit():
    ws, x = _deep_mlp(layers=4, width=5, batch=3)
    v = [np.random.default_rng(1).standard_normal(w.shape) for w in ws]
    ck = avalon.checkpoint(_segment)

    def directional(seg):
        def d(ws, v, x):
            _, (g, _) = avalon.value_and_grad(lambda ws, x: (seg(x, *ws) ** 2).sum(), argnums=0)(ws, x)
            return sum((gi * vi).sum() for gi, vi in zip(g, v))
        return avalon.value_and_grad(d, argnums=0)

    _, (want, _, _) = directional(_segment)(ws, v, x)
    _, (got, _, _) = _called_twice(directional(ck), ws, v, x)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    jitted = avalon.jit(lambda x, *ws: ck(x, *ws))
    np.testing.assert_allclose(_called_twice(jitted, x, *ws), _segment(x, *ws), rtol=1e-12)
    assert "remat_barrier" not in {n.op for n in jitted.graph.nodes}


class _Block:
    def __init__(self, w):
        self.w = w

    def __call__(self, h):
        return avalon.tanh(h @ self.w)


def test_checkpoint_of_a_block_holding_its_parameters():
    """The checkpointed function closes over traced parameters (a layer
    holding its weights): their gradients flow through the recomputation."""
    ws, x = _deep_mlp(layers=3, width=6, batch=4)

    def loss(blocks, x, wrap):
        h = x
        for b in blocks:
            h = wrap(b)(h)
        return (h ** 2).sum()

    blocks = [_Block(w) for w in ws]
    plain = avalon.value_and_grad(lambda blocks, x: loss(blocks, x, lambda b: b), argnums=0)
    remat = avalon.value_and_grad(lambda blocks, x: loss(blocks, x, avalon.checkpoint), argnums=0)
    val, (g, _) = plain(blocks, x)
    rval, (rg, _) = _called_twice(remat, blocks, x)
    np.testing.assert_allclose(rval, val, rtol=1e-12)
    for a, b in zip(g, rg):
        np.testing.assert_allclose(b.w, a.w, rtol=1e-10, atol=1e-14)
    assert "remat_barrier" in {n.op for n in remat.graph.nodes}


def test_checkpoint_refuses_a_random_draw():
    def noisy(h):
        return h * (avalon.random_uniform(h.shape, like=h) > 0.5)  # DRAW

    with pytest.raises(AvalonError, match=r"checkpoint: .*noisy draws random numbers.*pass the random mask in"):
        avalon.grad(lambda x: avalon.checkpoint(noisy)(x).sum(), np.ones(4, np.float32))


def test_checkpoint_eager_is_the_function():
    ws, x = _deep_mlp(layers=2, width=3, batch=2)
    np.testing.assert_array_equal(avalon.checkpoint(_segment)(x, *ws), _segment(x, *ws))


def test_custom_vjp_under_vmap_keeps_its_gradient_per_example():
    """vmap of grad of a function using a custom VJP: each example's gradient is
    the straight-through one, as the loop of per-example grads gives."""
    xs = np.linspace(-2, 2, 12).astype(np.float32).reshape(3, 4)
    ys = (np.arange(12, dtype=np.float32).reshape(3, 4) - 6) / 3

    def loss(x, y):
        return ((straight_through_sign(x) - y) ** 2 * x).sum()

    per_example = avalon.vmap(avalon.value_and_grad(loss, argnums=0))
    values, (gx, _) = _called_twice(per_example, xs, ys)
    for i in range(3):
        v, (g, _) = avalon.grad(loss, xs[i], ys[i], argnums=0)
        np.testing.assert_allclose(values[i], v, rtol=1e-6)
        np.testing.assert_allclose(gx[i], g, rtol=1e-6)
