"""Forward mode and the Jacobian transformations (avalon.forward): jvp, vjp,
linearize, jacrev, jacfwd, hessian, hvp.

Driven by the primitive table (avalon.testing.cases): for every
differentiable case, f = the op as a function of the inputs it differentiates
(the others fixed), and

* jvp(f, x, t) against torch.func.jvp (float32) and against float64 central
  differences (f(x + h t) - f(x - h t)) / 2h;
* vjp(f, x)[1](u) against torch.func.vjp (float32);

then jacrev, jacfwd, hessian and hvp of small functions against torch.func,
and linearize reused for several tangents.  Every compiled function is called
twice and must not retrace (`.traces`).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import avalon
from avalon.forward import compiled_hvp, compiled_jvp
from avalon.testing import CASES, as_list
from avalon.testing.conformance import to_host

torch = pytest.importorskip("torch")
tf = torch.func

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

#: ops whose VJP has no VJP of its own: forward mode (the VJP's VJP) raises MissingRuleError naming it
NO_FORWARD_MODE = {"cumprod": "cumprod_grad"}


def _skip_reason(case, float_dtype):
    bug = next((b for b in case.bugs if any(b.applies(k, float_dtype) for k in ("grad", "forward"))), None)
    return f"known first-derivative bug: {bug.reason}" if bug else None


def _rng(case, what):
    return np.random.default_rng(zlib.crc32((what + ":" + case.id).encode()))


def _problem(case, float_dtype):
    """(f of the differentiated inputs, those inputs, tangents, the same for torch)."""
    inputs = case.inputs(float_dtype)
    wrt = case.wrt
    rng = _rng(case, "t")
    xs = tuple(inputs[i] for i in wrt)
    ts = tuple(rng.standard_normal(x.shape).astype(x.dtype) for x in xs)

    def substitute(args, full):
        full = list(full)
        for i, a in zip(wrt, args):
            full[i] = a
        return full

    def f(*args):
        return case.call(*substitute(args, inputs))
    f.__qualname__ = f"f_{case.id}"

    def tf_fn(*args):
        full = [torch.from_numpy(np.array(x, copy=True)) for x in inputs]
        return tuple(as_list(case.call_torch(torch, *substitute(args, full))))
    return f, xs, ts, tf_fn


def _t(xs):
    return tuple(torch.from_numpy(np.array(x, copy=True)) for x in xs)


def _params(cases, float_dtype, need):
    out = []
    for c in cases:
        reason = _skip_reason(c, float_dtype) or (None if need(c) else "no reference for this case")
        out.append(pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return out


def _tols(case):
    rtol = case.rtol if case.rtol is not None else 1e-4
    atol = case.atol if case.atol is not None else 1e-4
    return rtol, atol


def _close(got, want, rtol, atol, what):
    got, want = to_host(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, got.dtype, want.shape, want.dtype)
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=what)


def _jvp_twice(f, xs, ts):
    out, tout = avalon.jvp(f, xs, ts)
    _, again = avalon.jvp(f, xs, ts)
    assert compiled_jvp(f).traces == 1, "the second call retraced"
    for a, b in zip(as_list(tout), as_list(again)):
        np.testing.assert_array_equal(to_host(a), to_host(b))
    return as_list(out), as_list(tout)


_CASES = [c for c in CASES if c.differentiable and c.op not in NO_FORWARD_MODE]
_NO_RULE = [c for c in CASES if c.differentiable and c.op in NO_FORWARD_MODE]


@pytest.mark.parametrize("case", _NO_RULE, ids=lambda c: c.id)
def test_jvp_without_a_transposable_vjp_names_the_missing_rule(case):
    f, xs, ts, _ = _problem(case, np.float64)
    with pytest.raises(avalon.MissingRuleError, match=NO_FORWARD_MODE[case.op]):
        avalon.jvp(f, xs, ts)


@pytest.mark.parametrize("case", _params(_CASES, np.float32, lambda c: c.torch_fn is not None))
def test_jvp_matches_torch(case):
    f, xs, ts, tf_fn = _problem(case, np.float32)
    outs, touts = _jvp_twice(f, xs, ts)
    want_out, want_t = tf.jvp(tf_fn, _t(xs), _t(ts))
    rtol, atol = _tols(case)
    for k, (o, w) in enumerate(zip(outs, want_out)):
        _close(o, w.detach().numpy(), rtol, atol, f"{case.id}: output {k}")
    for k, (t, w) in enumerate(zip(touts, want_t)):
        if t is None:  # an integer output has no tangent
            assert not w.dtype.is_floating_point
            continue
        _close(t, w.detach().numpy(), rtol, atol, f"{case.id}: output tangent {k}")


@pytest.mark.parametrize("case", _params(_CASES, np.float64, lambda c: c.fd))
def test_jvp_matches_finite_differences(case):
    f, xs, ts, _ = _problem(case, np.float64)
    _, touts = _jvp_twice(f, xs, ts)
    all_f64 = all(np.dtype(a.dtype) == np.float64 for a in list(xs) + [t for t in touts if t is not None])
    step, rtol, atol = (1e-6, 1e-5, 1e-6) if all_f64 else (1e-2, 2e-3, 2e-3)

    def at(sign):
        moved = [np.asarray(x + sign * step * t, dtype=x.dtype) for x, t in zip(xs, ts)]
        return [to_host(o).astype(np.float64) for o in as_list(f(*moved))]

    for k, (t, p, m) in enumerate(zip(touts, at(1.0), at(-1.0))):
        if t is None:
            continue
        num = (p - m) / (2 * step)
        scale = max(1.0, float(np.max(np.abs(num), initial=0.0)))
        np.testing.assert_allclose(to_host(t), num, rtol=rtol, atol=atol * scale,
                                   err_msg=f"{case.id}: output tangent {k}")


@pytest.mark.parametrize("case", _params(_CASES + _NO_RULE, np.float32, lambda c: c.torch_fn is not None))
def test_vjp_matches_torch(case):
    f, xs, _, tf_fn = _problem(case, np.float32)
    out, vjp_fn = avalon.vjp(f, *xs)
    rng = _rng(case, "u")
    us = [rng.standard_normal(np.shape(o)).astype(to_host(o).dtype) for o in as_list(out)]
    cts = us[0] if not isinstance(out, (tuple, list)) else type(out)(us)
    got = vjp_fn(cts)
    again = vjp_fn(cts)
    assert vjp_fn.compiled.traces == 1, "the second call retraced"
    want_out, torch_vjp = tf.vjp(tf_fn, *_t(xs))
    want = torch_vjp(tuple(torch.from_numpy(u) for u in us))
    rtol, atol = _tols(case)
    assert len(got) == len(xs)
    for k, (g, a, w) in enumerate(zip(got, again, want)):
        np.testing.assert_array_equal(to_host(g), to_host(a))
        _close(g, w.detach().numpy(), rtol, atol, f"{case.id}: cotangent of input {k}")


# -- linearize -------------------------------------------------------------------------------

def _mlp(w1, b1, w2, x):
    return avalon.tanh(x @ w1 + b1) @ w2


def _t_mlp(w1, b1, w2, x):
    return torch.tanh(x @ w1 + b1) @ w2


def _net_params(rng, dtype=np.float32):
    return (rng.standard_normal((4, 5)).astype(dtype), rng.standard_normal(5).astype(dtype),
            rng.standard_normal((5, 3)).astype(dtype), rng.standard_normal((6, 4)).astype(dtype))


def test_linearize_is_compiled_once_and_reused_for_several_tangents():
    rng = np.random.default_rng(0)
    primals = _net_params(rng)
    out, f_jvp = avalon.linearize(_mlp, *primals)
    np.testing.assert_allclose(out, _t_mlp(*_t(primals)).numpy(), rtol=1e-5, atol=1e-5)
    for _ in range(3):
        tangents = tuple(rng.standard_normal(p.shape).astype(p.dtype) for p in primals)
        got = f_jvp(*tangents)
        _, want = tf.jvp(_t_mlp, _t(primals), _t(tangents))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
    assert f_jvp.compiled.traces == 1


def test_jvp_of_a_function_with_several_outputs_and_structured_arguments():
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    x = rng.standard_normal((4, 3))
    dparams = {"w": rng.standard_normal((3, 2)), "b": rng.standard_normal(2)}
    dx = rng.standard_normal((4, 3))

    def f(p, x):
        y = x @ p["w"] + p["b"]
        return {"y": avalon.tanh(y), "s": (y * y).sum()}

    out, tout = avalon.jvp(f, (params, x), (dparams, dx))
    y = x @ params["w"] + params["b"]
    dy = dx @ params["w"] + x @ dparams["w"] + dparams["b"]
    np.testing.assert_allclose(out["y"], np.tanh(y), rtol=1e-12)
    np.testing.assert_allclose(tout["y"], (1 - np.tanh(y) ** 2) * dy, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tout["s"], 2 * (y * dy).sum(), rtol=1e-10)
    avalon.jvp(f, (params, x), (dparams, dx))
    assert compiled_jvp(f).traces == 1


def test_a_tangent_of_the_wrong_shape_is_refused():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(avalon.ShapeError, match=r"tangent 0 is float32\[3, 2\], its primal is float32\[2, 3\]"):
        avalon.jvp(avalon.tanh, (x,), (np.ones((3, 2), np.float32),))


# -- jacrev, jacfwd, hessian, hvp ------------------------------------------------------------

def _f_vec(x, w):
    return avalon.tanh(x @ w) * avalon.sum(x)


def _t_f_vec(x, w):
    return torch.tanh(x @ w) * torch.sum(x)


@pytest.mark.parametrize("jac, tjac", [(avalon.jacrev, tf.jacrev), (avalon.jacfwd, tf.jacfwd)],
                         ids=["jacrev", "jacfwd"])
@pytest.mark.parametrize("argnums", [0, 1, (0, 1)], ids=str)
def test_jacobians_match_torch(jac, tjac, argnums):
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal(3).astype(np.float32), rng.standard_normal((3, 2)).astype(np.float32)
    fn = jac(_f_vec, argnums)
    got = fn(x, w)
    fn(x, w)
    assert fn.traces == 1
    want = tjac(_t_f_vec, argnums)(*_t((x, w)))
    if isinstance(argnums, int):
        got, want = (got,), (want,)
    for g, w_ in zip(got, want):
        np.testing.assert_allclose(g, w_.numpy(), rtol=1e-5, atol=1e-6)


def _energy(x):
    return (avalon.tanh(x) ** 2).sum() + (x[0] * x[1]).sum()


def _t_energy(x):
    return (torch.tanh(x) ** 2).sum() + (x[0] * x[1]).sum()


def test_hessian_matches_torch():
    x = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    h = avalon.hessian(_energy)
    got = h(x)
    h(x)
    assert h.traces == 1 and got.shape == (2, 3, 2, 3)
    np.testing.assert_allclose(got, tf.hessian(_t_energy)(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)


def _net_loss(w1, b1, w2, x):
    return (_mlp(w1, b1, w2, x) ** 2).mean()


def _t_net_loss(w1, b1, w2, x):
    return (_t_mlp(w1, b1, w2, x) ** 2).mean()


def test_hvp_of_a_network_matches_torch_and_the_hessian():
    rng = np.random.default_rng(4)
    primals = _net_params(rng)
    tangents = tuple(rng.standard_normal(p.shape).astype(p.dtype) for p in primals)
    grads, hv = avalon.hvp(_net_loss, primals, tangents)
    avalon.hvp(_net_loss, primals, tangents)
    assert compiled_hvp(_net_loss).traces == 1
    tp = _t(primals)
    want_g = tf.grad(_t_net_loss, argnums=(0, 1, 2, 3))(*tp)
    _, want_hv = tf.jvp(lambda *p: tf.grad(_t_net_loss, argnums=(0, 1, 2, 3))(*p), tp, _t(tangents))
    for g, w in zip(grads, want_g):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-6)
    for g, w in zip(hv, want_hv):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-4, atol=1e-5)
    # against the Hessian itself (for the first layer's weight): H v = hessian @ v
    H = avalon.hessian(_net_loss, 0)(*primals)
    _, hv_w1 = avalon.hvp(lambda w1: _net_loss(w1, *primals[1:]), (primals[0],), (tangents[0],))
    np.testing.assert_allclose(hv_w1[0], np.tensordot(H, tangents[0], axes=2), rtol=1e-4, atol=1e-5)


def test_integer_inputs_and_outputs_have_no_tangent():
    x = np.array([3.0, 1.0, 2.0], np.float32)
    idx = np.array([2, 0], np.int64)

    def f(x, idx):
        return x[idx] * 2.0, avalon.argsort(x)

    (vals, order), (dvals, dorder) = avalon.jvp(f, (x, idx), (np.ones(3, np.float32), np.zeros(2, np.int64)))
    np.testing.assert_array_equal(vals, [4.0, 6.0])
    np.testing.assert_array_equal(order, [1, 2, 0])
    np.testing.assert_array_equal(dvals, [2.0, 2.0])
    assert dorder is None


def test_a_random_draw_in_f_is_drawn_once_for_the_output_and_its_tangent():
    x = np.random.default_rng(5).uniform(1.0, 2.0, (64,)).astype(np.float32)
    t = np.random.default_rng(6).uniform(1.0, 2.0, (64,)).astype(np.float32)

    def dropped(x):
        return avalon.dropout(x, 0.5)

    out, tout = avalon.jvp(dropped, (x,), (t,))
    kept = out != 0
    assert 0 < kept.sum() < 64
    np.testing.assert_allclose(out[kept], 2 * x[kept], rtol=1e-6)
    np.testing.assert_allclose(tout, np.where(kept, 2 * t, 0.0), rtol=1e-6)  # the same mask


def test_an_in_place_write_in_f_happens_once_per_call():
    count = np.zeros(1, np.float32)

    def counted(x, count):
        avalon.assign(count, count + 1.0)
        return x * 3.0

    x = np.ones(2, np.float32)
    _, tout = avalon.jvp(counted, (x, count), (np.ones(2, np.float32), np.zeros(1, np.float32)))
    np.testing.assert_array_equal(tout, [3.0, 3.0])
    np.testing.assert_array_equal(count, [1.0])


def test_a_function_without_float_output_has_no_tangent():
    x = np.array([3.0, 1.0, 2.0], np.float32)
    out, tout = avalon.jvp(avalon.argsort, (x,), (np.ones(3, np.float32),))
    np.testing.assert_array_equal(out, [1, 2, 0])
    assert tout is None


@pytest.mark.parametrize("jac, tjac", [(avalon.jacrev, tf.jacrev), (avalon.jacfwd, tf.jacfwd)],
                         ids=["jacrev", "jacfwd"])
def test_jacobians_of_several_outputs_keep_their_structure(jac, tjac):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(3), rng.standard_normal((3, 2))
    got = jac(lambda x, w: (avalon.tanh(x @ w), (x * x).sum()), (0, 1))(x, w)
    want = tjac(lambda x, w: (torch.tanh(x @ w), (x * x).sum()), (0, 1))(*_t((x, w)))
    assert isinstance(got, tuple) and len(got) == 2
    for g_out, w_out in zip(got, want):
        for g, w_ in zip(g_out, w_out):
            np.testing.assert_allclose(g, w_.numpy(), rtol=1e-10, atol=1e-12)


def _drops(x):
    return avalon.dropout(x, 0.5) * 2.0


def _counts(x, count):
    avalon.assign(count, count + 1.0)
    return x * 3.0


@pytest.mark.parametrize("transform", [
    lambda f, *a: avalon.vjp(f, *a),
    lambda f, *a: avalon.linearize(f, *a),
    lambda f, *a: avalon.jacrev(f)(*a),
    lambda f, *a: avalon.jacfwd(f)(*a),
], ids=["vjp", "linearize", "jacrev", "jacfwd"])
@pytest.mark.parametrize("f, effect", [(_drops, "draws random numbers"), (_counts, r"writes into an array \(assign\)")],
                         ids=["random", "assign"])
def test_transformations_that_run_f_again_refuse_effects_before_running_it(transform, f, effect):
    count = np.zeros(1, np.float32)
    args = (np.ones(3, np.float32),) + ((count,) if f is _counts else ())
    with pytest.raises(avalon.AvalonError, match=effect + r".*test_forward_mode\.py.*so each run would draw"):
        transform(f, *args)
    np.testing.assert_array_equal(count, [0.0])  # nothing ran
