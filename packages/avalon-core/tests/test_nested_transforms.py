"""Transformations that nest: grad of grad, grad of jit, jit of grad, grad of a
function calling value_and_grad, values of an outer trace used in an inner
one, and tracers that leak out of their trace.

Each nested call inlines the inner function's transformed graph into the
enclosing trace, so the outermost transformation compiles one graph; every
case checks that a second call does not retrace (`.traces`).  References:
torch.func (grad, vjp, hessian, jacrev) in float32 or float64.
"""
from __future__ import annotations

import numpy as np
import pytest

import avalon
from avalon import LeakedTracerError

torch = pytest.importorskip("torch")
tf = torch.func


def _t(x):
    return torch.from_numpy(np.array(x, copy=True))


def _rng(seed=0):
    return np.random.default_rng(seed)


def _called_twice(fn, *args):
    """fn(*args) twice: the second call must reuse the compiled graph."""
    first = fn(*args)
    again = fn(*args)
    assert fn.traces == 1, f"{fn.__name__} retraced on an identical call ({fn.traces} traces)"
    return first, again


# -- composition at any depth ---------------------------------------------------

def f_scalar(x):
    return (avalon.tanh(x) * x * x).sum()


def t_scalar(x):
    return (torch.tanh(x) * x * x).sum()


def test_grad_of_grad_matches_torch_func_hessian_vector_product():
    x = _rng(1).standard_normal(7).astype(np.float32)
    v = _rng(2).standard_normal(7).astype(np.float32)

    def directional(x, v):
        _, (g,) = avalon.value_and_grad(f_scalar)(x)
        return (g * v).sum()

    hvp = avalon.value_and_grad(directional, argnums=0)
    (_, (got, none)), (_, (again, _)) = _called_twice(hvp, x, v)
    want = tf.hessian(t_scalar)(_t(x)) @ _t(v)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got, again)
    assert none is None


def f_two(x, w):
    return (avalon.tanh(x * w) * w).sum()


def test_third_derivative_matches_torch():
    x = _rng(3).standard_normal(5).astype(np.float64)

    def d1(x):
        return avalon.value_and_grad(f_scalar)(x)[1][0].sum()

    def d2(x):
        return avalon.value_and_grad(d1)(x)[1][0].sum()

    d3 = avalon.value_and_grad(d2)
    (_, (got,)), _ = _called_twice(d3, x)

    def t1(x):
        return tf.grad(t_scalar)(x).sum()

    def t2(x):
        return tf.grad(t1)(x).sum()

    want = tf.grad(t2)(_t(x))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-10)


def test_grad_of_jit_is_one_compiled_graph():
    inner = avalon.jit(f_scalar)
    x = _rng(4).standard_normal((3, 4)).astype(np.float32)
    outer = avalon.value_and_grad(lambda x: inner(x) * 2.0)
    (val, (g,)), _ = _called_twice(outer, x)
    tx = _t(x)
    want_val, want_g = 2 * t_scalar(tx), tf.grad(lambda x: 2 * t_scalar(x))(tx)
    np.testing.assert_allclose(val, want_val.item(), rtol=1e-5)
    np.testing.assert_allclose(g, want_g.numpy(), rtol=1e-5, atol=1e-6)
    assert inner.traces == 1
    # the outer graph holds the inner function's ops: tanh appears in it, no call of compiled code
    assert any(n.op in ("tanh", "fused") for n in outer.graph.nodes)


def test_jit_of_grad_matches_torch():
    x = _rng(5).standard_normal((2, 3)).astype(np.float32)
    f = avalon.jit(lambda x: avalon.grad(f_scalar, x)[1][0])
    got, _ = _called_twice(f, x)
    np.testing.assert_allclose(got, tf.grad(t_scalar)(_t(x)).numpy(), rtol=1e-5, atol=1e-6)


def test_inner_trace_of_one_signature_is_reused_across_outer_signatures():
    def cube(x):
        return (x * x * x).sum()

    inner = avalon.value_and_grad(cube)
    outer = avalon.value_and_grad(lambda x, s: (inner(x)[1][0] * s).sum(), argnums=0)
    x = _rng(6).standard_normal(4).astype(np.float32)
    outer(x, 1.0)
    outer(x, 2.0)  # a new static value retraces the outer function only
    assert outer.traces == 2 and inner.traces == 1


def test_value_and_grad_inside_grad_uses_both_results():
    """grad of a function that uses the inner value and its gradient (a
    gradient penalty added to the loss)."""
    w = _rng(7).standard_normal(4).astype(np.float64)
    x = _rng(8).standard_normal(4).astype(np.float64)

    def loss(w, x):
        val, (_, gx) = avalon.value_and_grad(f_two, argnums=1)(w, x)
        return val + (gx * gx).sum()

    def t_f_two(x, w):
        return (torch.tanh(x * w) * w).sum()

    def t_loss(w, x):
        val = t_f_two(w, x)
        gx = tf.grad(t_f_two, argnums=1)(w, x)
        return val + (gx * gx).sum()

    vg = avalon.value_and_grad(loss, argnums=0)
    (val, (gw, _)), _ = _called_twice(vg, w, x)
    want_val, want_gw = tf.grad_and_value(t_loss)(_t(w), _t(x))[::-1]
    np.testing.assert_allclose(val, want_val.item(), rtol=1e-12)
    np.testing.assert_allclose(gw, want_gw.numpy(), rtol=1e-10, atol=1e-12)


def test_jacobian_of_the_gradient_row_by_row_matches_jacrev():
    """d/dx_k of grad f: grad of grad's k-th entry, one row of jacrev(grad f)."""
    x = _rng(9).standard_normal(4).astype(np.float64)
    rows = []
    for k in range(4):
        onehot = np.eye(4)[k]
        row = avalon.value_and_grad(lambda x, e: (avalon.grad(f_scalar, x)[1][0] * e).sum(), argnums=0)
        rows.append(row(x, onehot)[1][0])
    want = tf.jacrev(tf.grad(t_scalar))(_t(x))
    np.testing.assert_allclose(np.stack(rows), want.numpy(), rtol=1e-10, atol=1e-12)


def test_jit_of_jit_and_grad_of_jit_of_grad():
    x = _rng(15).standard_normal(6).astype(np.float64)
    inner = avalon.jit(lambda x: avalon.tanh(x) * x)
    outer = avalon.jit(lambda x: inner(x) + inner(x * 2.0))
    np.testing.assert_allclose(_called_twice(outer, x)[0], np.tanh(x) * x + np.tanh(2 * x) * 2 * x, rtol=1e-12)
    assert inner.traces == 1   # both calls inside outer's trace share one signature

    def d(x):
        return avalon.jit(lambda x: avalon.grad(f_scalar, x)[1][0])(x).sum()

    vg = avalon.value_and_grad(d)
    (_, (got,)), _ = _called_twice(vg, x)
    want = tf.grad(lambda x: tf.grad(t_scalar)(x).sum())(_t(x))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)


def test_nested_traces_in_several_threads_at_once():
    """Each thread traces with its own stack of traces: concurrent first
    calls of grad-of-grad functions do not mix their graphs."""
    import threading

    results, errors = {}, []

    def work(k):
        try:
            def d(x):
                return (avalon.grad(lambda x: (avalon.tanh(x) * k).sum(), x)[1][0] ** 2).sum()
            x = np.linspace(-1, 1, 5) + k
            results[k] = (x, avalon.value_and_grad(d)(x)[1][0])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k, (x, got) in results.items():
        want = tf.grad(lambda x: (tf.grad(lambda x: (torch.tanh(x) * k).sum())(x) ** 2).sum())(_t(x))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)


# -- values of an outer trace inside an inner one --------------------------------

def test_outer_value_closed_over_by_inner_function_is_a_constant_whose_derivative_flows():
    """d/dw of <grad_x f(x; w), v>, where the inner function closes over the
    outer traced w: w is a constant of the inner differentiation, yet the
    outer gradient flows through it (JAX's semantics)."""
    w = _rng(10).standard_normal(3).astype(np.float64)
    x = _rng(11).standard_normal(3).astype(np.float64)
    v = _rng(12).standard_normal(3).astype(np.float64)

    def outer(w, x, v):
        inner = lambda x: (avalon.tanh(x * w) * w).sum()  # noqa: E731 - closes over the outer tracer w
        _, (gx,) = avalon.value_and_grad(inner)(x)
        return (gx * v).sum()

    def t_outer(w, x, v):
        gx = tf.grad(lambda x: (torch.tanh(x * w) * w).sum())(x)
        return (gx * v).sum()

    vg = avalon.value_and_grad(outer, argnums=0)
    (val, (gw, _, _)), _ = _called_twice(vg, w, x, v)
    want_val, want_gw = t_outer(_t(w), _t(x), _t(v)), tf.grad(t_outer)(_t(w), _t(x), _t(v))
    np.testing.assert_allclose(val, want_val.item(), rtol=1e-12)
    np.testing.assert_allclose(gw, want_gw.numpy(), rtol=1e-10, atol=1e-12)


def test_inner_function_returning_an_outer_value_as_it_is():
    w = np.float32([1.5, -2.0])

    def outer(w):
        passthrough = avalon.jit(lambda x: (x * 0 + 1).sum() + w.sum())  # w belongs to the outer trace
        return passthrough(w) * w.sum()

    vg = avalon.value_and_grad(outer)
    val, (g,) = vg(w)
    np.testing.assert_allclose(val, (2 + w.sum()) * w.sum(), rtol=1e-6)
    np.testing.assert_allclose(g, np.full(2, 2 + 2 * w.sum()), rtol=1e-6)


def test_vjp_of_a_vector_function_matches_torch_func_vjp():
    """The VJP of a vector-valued f is grad of <f(x), ct>; used inside
    another grad it is differentiated again (the second-order VJP)."""
    x = _rng(13).standard_normal(5).astype(np.float64)
    ct = _rng(14).standard_normal(5).astype(np.float64)

    def vjp_norm(x, ct):
        _, (g, _) = avalon.value_and_grad(lambda x, c: (avalon.exp(x) * x * c).sum(), argnums=0)(x, ct)
        return (g * g).sum()

    def t_vjp_norm(x, ct):
        _, fn = tf.vjp(lambda x: torch.exp(x) * x, x)
        (g,) = fn(ct)
        return (g * g).sum()

    vg = avalon.value_and_grad(vjp_norm, argnums=(0, 1))
    (val, (gx, gct)), _ = _called_twice(vg, x, ct)
    want = tf.grad(t_vjp_norm, argnums=(0, 1))(_t(x), _t(ct))
    np.testing.assert_allclose(val, t_vjp_norm(_t(x), _t(ct)).item(), rtol=1e-12)
    np.testing.assert_allclose(gx, want[0].numpy(), rtol=1e-10)
    np.testing.assert_allclose(gct, want[1].numpy(), rtol=1e-10)


# -- end-to-end: WGAN-GP, MAML, Hessian-vector product of a network -------------------

def _mlp_params(rng, sizes, dtype=np.float32):
    return [((rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype), np.zeros(b, dtype) + 0.1)
            for a, b in zip(sizes[:-1], sizes[1:])]


def _mlp(params, x, act):
    for k, (w, b) in enumerate(params):
        x = x @ w + b
        if k < len(params) - 1:
            x = act(x)
    return x


def _torch_params(params):
    return [(_t(w), _t(b)) for w, b in params]


def _assert_tree_close(got, want, rtol, atol):
    for (gw, gb), (ww, wb) in zip(got, want):
        np.testing.assert_allclose(gw, ww.detach().numpy(), rtol=rtol, atol=atol)
        np.testing.assert_allclose(gb, wb.detach().numpy(), rtol=rtol, atol=atol)


def test_wgan_gp_critic_step_matches_torch():
    """Critic loss with a gradient penalty: the gradient of the critic's
    input-gradient norm with respect to the critic's parameters."""
    rng = _rng(20)
    params = _mlp_params(rng, [3, 8, 8, 1])
    real, fake = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    eps = rng.uniform(size=(6, 1)).astype(np.float32)
    lam = 10.0

    def critic_sum(params, x):
        return _mlp(params, x, avalon.tanh).sum()   # examples are independent: d/dx gives each one's gradient

    def critic_loss(params, real, fake, eps):
        mixed = eps * real + (1 - eps) * fake
        _, (_, gx) = avalon.value_and_grad(critic_sum, argnums=1)(params, mixed)
        norm = avalon.sqrt((gx * gx).sum(axis=1) + 1e-12)
        penalty = ((norm - 1.0) ** 2).mean()
        return _mlp(params, fake, avalon.tanh).mean() - _mlp(params, real, avalon.tanh).mean() + lam * penalty

    def t_critic_loss(params, real, fake, eps):
        mixed = eps * real + (1 - eps) * fake
        gx = tf.grad(lambda x: _mlp(params, x, torch.tanh).sum())(mixed)
        norm = torch.sqrt((gx * gx).sum(dim=1) + 1e-12)
        penalty = ((norm - 1.0) ** 2).mean()
        return _mlp(params, fake, torch.tanh).mean() - _mlp(params, real, torch.tanh).mean() + lam * penalty

    step = avalon.value_and_grad(critic_loss, argnums=0)
    (val, (gp, *_)), (val2, _) = _called_twice(step, params, real, fake, eps)
    targs = (_torch_params(params), _t(real), _t(fake), _t(eps))
    want_g, want_val = tf.grad_and_value(t_critic_loss)(*targs)
    np.testing.assert_allclose(val, want_val.item(), rtol=1e-5)
    assert val == val2
    _assert_tree_close(gp, want_g, rtol=1e-4, atol=1e-5)


def test_maml_one_inner_step_matches_torch():
    """Meta-gradient through one SGD step on a task's training loss."""
    rng = _rng(21)
    params = _mlp_params(rng, [2, 6, 1])
    xs, ys = rng.standard_normal((5, 2)).astype(np.float32), rng.standard_normal((5, 1)).astype(np.float32)
    xq, yq = rng.standard_normal((4, 2)).astype(np.float32), rng.standard_normal((4, 1)).astype(np.float32)
    alpha = 0.1

    def task_loss(params, x, y):
        return ((_mlp(params, x, avalon.tanh) - y) ** 2).mean()

    def meta_loss(params, xs, ys, xq, yq):
        _, (g, _, _) = avalon.value_and_grad(task_loss, argnums=0)(params, xs, ys)
        adapted = [(w - alpha * gw, b - alpha * gb) for (w, b), (gw, gb) in zip(params, g)]
        return task_loss(adapted, xq, yq)

    def t_task_loss(params, x, y):
        return ((_mlp(params, x, torch.tanh) - y) ** 2).mean()

    def t_meta_loss(params, xs, ys, xq, yq):
        g = tf.grad(t_task_loss)(params, xs, ys)
        adapted = [(w - alpha * gw, b - alpha * gb) for (w, b), (gw, gb) in zip(params, g)]
        return t_task_loss(adapted, xq, yq)

    step = avalon.value_and_grad(meta_loss, argnums=0)
    (val, (gp, *_)), _ = _called_twice(step, params, xs, ys, xq, yq)
    want_g, want_val = tf.grad_and_value(t_meta_loss)(_torch_params(params), *map(_t, (xs, ys, xq, yq)))
    np.testing.assert_allclose(val, want_val.item(), rtol=1e-5)
    _assert_tree_close(gp, want_g, rtol=1e-4, atol=1e-5)


def test_hessian_vector_product_of_a_network_matches_torch_hessian():
    """H v as grad of (grad . v), checked against torch.func.hessian of the
    loss over the flattened parameters."""
    rng = _rng(22)
    shapes = [(3, 4), (4,), (4, 2), (2,)]
    sizes = [int(np.prod(s)) for s in shapes]
    theta = rng.standard_normal(sum(sizes)).astype(np.float64) * 0.5
    v = rng.standard_normal(sum(sizes)).astype(np.float64)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))

    def unpack(theta, reshape):
        parts, start = [], 0
        for s, n in zip(shapes, sizes):
            parts.append(reshape(theta[start:start + n], s))
            start += n
        return [(parts[0], parts[1]), (parts[2], parts[3])]

    def loss(theta, x, y):
        return ((_mlp(unpack(theta, avalon.reshape), x, avalon.tanh) - y) ** 2).mean()

    def directional(theta, v, x, y):
        _, (g, _, _) = avalon.value_and_grad(loss, argnums=0)(theta, x, y)
        return (g * v).sum()

    hvp = avalon.value_and_grad(directional, argnums=0)
    (_, (got, *_)), _ = _called_twice(hvp, theta, v, x, y)

    def t_loss(theta):
        return ((_mlp(unpack(theta, torch.reshape), _t(x), torch.tanh) - _t(y)) ** 2).mean()

    want = tf.hessian(t_loss)(_t(theta)) @ _t(v)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)


# -- effects inside nested traces --------------------------------------------------

def test_random_draw_in_an_inner_grad_is_drawn_once_per_outer_call():
    """The inner function's forward and backward share one draw (the inlined
    graph holds one random node), so the second derivative of
    sum((x * mask)^3) is 6 x mask^3 v with the mask the first derivative used."""
    x = np.linspace(0.5, 1.5, 64).astype(np.float32)
    v = np.ones_like(x)

    def f(x):
        mask = (avalon.random_uniform(x.shape, like=x) > 0.5) * 2.0
        return ((x * mask) ** 3).sum()

    def both(x, v):
        _, (g,) = avalon.value_and_grad(f)(x)
        return (g * v).sum(), g

    def directional(x, v):
        return both(x, v)[0]

    hvp = avalon.value_and_grad(directional, argnums=0)
    avalon.manual_seed(0)
    _, (h, _) = hvp(x, v)
    assert sum(n.op.startswith("random") for n in hvp.graph.nodes) == 1
    masks = h / (6 * x)
    assert set(np.round(masks, 4)) <= {0.0, 8.0} and 0 < (masks > 0).sum() < x.size
    avalon.manual_seed(0)
    _, (h_again, _) = hvp(x, v)
    np.testing.assert_array_equal(h, h_again)   # the same seed draws the same mask
    assert hvp.traces == 1


def test_assign_in_an_inner_grad_writes_once_per_outer_call():
    """A running-statistics update inside an inner function is inlined once:
    one write per call of the outermost compiled function."""
    running = np.zeros(3, np.float32)

    def f(x, state):
        avalon.assign(state["running"], state["running"] * 0.5 + x)
        return (x * x * x).sum()

    def d(x, state):
        _, (g, _) = avalon.value_and_grad(f, argnums=0)(x, state)
        return g.sum()

    vg = avalon.value_and_grad(d, argnums=0)
    x = np.float32([1, 2, 3])
    _, (g, _) = vg(x, {"running": running})
    np.testing.assert_array_equal(g, 6 * x)
    np.testing.assert_array_equal(running, x)
    vg(x, {"running": running})
    np.testing.assert_array_equal(running, 1.5 * x)
    assert vg.traces == 1


# -- tracers that leak out of their trace ----------------------------------------

class _Model:
    pass


def test_tracer_stored_on_a_model_and_used_later_names_both_lines():
    model = _Model()

    def leaky(x):
        model.saved = avalon.tanh(x)  # LEAK-MADE
        return model.saved.sum()

    x = np.ones(3, np.float32)
    avalon.grad(leaky, x)
    made = f"{__file__}:{_line_of('LEAK-MADE')}"
    with pytest.raises(LeakedTracerError) as info:
        model.saved * 2.0  # LEAK-USED-EAGER
    msg = str(info.value)
    assert made in msg and f"{__file__}:{_line_of('LEAK-USED-EAGER')}" in msg
    assert "Return it from the traced function" in msg

    with pytest.raises(LeakedTracerError) as info:
        avalon.jit(lambda x: x + model.saved)(x)  # LEAK-USED-JIT
    assert made in str(info.value) and f"{__file__}:{_line_of('LEAK-USED-JIT')}" in str(info.value)


def test_tracer_passed_to_a_compiled_function_after_its_trace_ended():
    kept = []
    avalon.jit(lambda x: kept.append(x * 2) or x)(np.ones(2, np.float32))
    with pytest.raises(LeakedTracerError, match="used outside the trace"):
        avalon.jit(lambda y: y + 1)(kept[0])


def _line_of(marker):
    with open(__file__) as fh:
        for k, line in enumerate(fh, 1):
            if line.rstrip().endswith("# " + marker):
                return k
    raise AssertionError(marker)


def test_nested_step_still_splits_its_batch_across_threads():
    """The outermost graph (here a gradient penalty: grad of grad) is an
    ordinary graph: the batch split applies to it, with the same result."""
    from avalon.passes.sharding import split_batch
    rng = _rng(30)
    w = rng.standard_normal((64, 64)).astype(np.float32) / 8
    x = rng.standard_normal((4096, 64)).astype(np.float32)

    def critic(w, x):
        return avalon.tanh(x @ w).sum()

    def loss(w, x):
        _, (_, gx) = avalon.value_and_grad(critic, argnums=1)(w, x)
        return ((gx * gx).sum(axis=1) - 1.0).mean() ** 2 + critic(w, x) / x.shape[0]

    split = avalon.value_and_grad(loss, argnums=0)
    whole = avalon.value_and_grad(loss, argnums=0, parallel=False)
    val, (g, _) = split(w, x)
    assert split_batch(split.graph, {split.graph.inputs[1]}, 2) is not None
    for _ in range(3):  # the autotuner times each schedule on the first calls
        again, (g2, _) = split(w, x)
        np.testing.assert_allclose(again, val, rtol=1e-5)
        np.testing.assert_allclose(g2, g, rtol=1e-4, atol=1e-6)
    want_val, (want_g, _) = whole(w, x)
    np.testing.assert_allclose(val, want_val, rtol=1e-5)
    np.testing.assert_allclose(g, want_g, rtol=1e-4, atol=1e-6)
    assert split.traces == 1
