"""Second derivatives of every differentiable primitive in the table
(avalon.testing.cases): grad of grad, as Hessian-vector products.

For each case, loss(x) = sum_k <op(x)_k, cotangent_k> and a random direction
v over the differentiated inputs; hvp(x) = grad_x <grad_x loss(x), v> = H v is
computed by Avalon as grad of a function that calls grad (one compiled graph),
and checked (a) against float64 central differences of the first derivative
along v, (g(x + h v) - g(x - h v)) / 2h, and (b) against torch.func's grad of
grad in float32.  Every case also checks that the second call does not retrace.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

import avalon
from avalon.testing import CASES, as_list
from avalon.testing.conformance import cotangents, declared_types, make_loss, to_host

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


#: cases whose inputs sit on a kink of the second derivative, where central
#: differences straddle a jump (no reference value exists there)
KINKS = {
    "elu-at_zero": "elu'' jumps from alpha to 0 at x = 0",
    "maximum-ties": "maximum's derivative jumps where the operands tie",
    "minimum-ties": "minimum's derivative jumps where the operands tie",
    "norm-inf_ax1": "the inf-norm's derivative jumps where two entries of a row tie in magnitude",
    "norm-zero_row": "the 2-norm is not twice differentiable at a zero vector (torch's second derivative is "
                     "NaN there)",
}

#: ops whose VJP has no VJP of its own: their second derivative raises MissingRuleError naming the
#: primitive (tested below) instead of coming out wrong
NO_SECOND_DERIVATIVE = {"cumprod": "cumprod_grad"}

#: known wrong second derivatives (strict expected failures: fixing one fails the suite until removed)
SECOND_ORDER_BUGS = {
    "softplus-at_zero": "softplus''(0) comes out 0, not 1/4: the stable formula max(x, 0) + log1p(exp(-|x|)) "
                        "differentiates |x| and max(x, 0) twice at their kink as 0",
    "log_sigmoid-at_zero": "log_sigmoid''(0) comes out 0, not -1/4: min(x, 0) - log1p(exp(-|x|)) has the same "
                           "kinks as softplus",
}


def _skip_reason(case, float_dtype):
    bug = next((b for b in case.bugs if any(b.applies(k, float_dtype) for k in ("grad", "forward"))), None)
    if bug:
        return f"known first-derivative bug: {bug.reason}"
    return KINKS.get(case.id)


def _problem(case, float_dtype):
    """inputs, cotangents, directions, the first-derivative function and hvp."""
    inputs = case.inputs(float_dtype)
    cts = cotangents(case, declared_types(case, inputs))
    n, wrt = len(inputs), case.wrt
    rng = np.random.default_rng(zlib.crc32(("v:" + case.id).encode()))
    vs = [rng.standard_normal(inputs[i].shape).astype(inputs[i].dtype) for i in wrt]
    first = avalon.value_and_grad(make_loss(case, n), argnums=wrt)

    def directional(*a):
        _, grads = first(*a[:n + len(cts)])
        total = None
        for i, v in zip(wrt, a[n + len(cts):]):
            s = avalon.sum(avalon.mul(grads[i], v))
            total = s if total is None else avalon.add(total, s)
        return total

    directional.__qualname__ = f"directional_{case.id}"
    hvp = avalon.value_and_grad(directional, argnums=wrt)
    return inputs, cts, vs, first, hvp


def _hvp(case, hvp, inputs, cts, vs):
    _, grads = hvp(*inputs, *cts, *vs)
    _, again = hvp(*inputs, *cts, *vs)
    assert hvp.traces == 1, f"{case.id}: the second call retraced ({hvp.traces} traces)"
    for i in case.wrt:
        np.testing.assert_array_equal(to_host(grads[i]), to_host(again[i]))
    return [to_host(grads[i]) for i in case.wrt]


_CASES = [c for c in CASES if c.differentiable and c.op not in NO_SECOND_DERIVATIVE]
_FIRST_ORDER_ONLY = [c for c in CASES if c.differentiable and c.op in NO_SECOND_DERIVATIVE]


@pytest.mark.parametrize("case", _FIRST_ORDER_ONLY, ids=lambda c: c.id)
def test_a_second_derivative_without_a_rule_names_the_missing_rule(case):
    inputs, cts, vs, first, hvp = _problem(case, np.float64)
    with pytest.raises(avalon.MissingRuleError, match=NO_SECOND_DERIVATIVE[case.op]):
        hvp(*inputs, *cts, *vs)


def _params(cases, float_dtype, need):
    out = []
    for c in cases:
        reason = _skip_reason(c, float_dtype) or (None if need(c) else "no reference for this case")
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        if not reason and c.id in SECOND_ORDER_BUGS:
            marks = [pytest.mark.xfail(strict=True, reason=SECOND_ORDER_BUGS[c.id])]
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


@pytest.mark.parametrize("case", _params(_CASES, np.float64, lambda c: c.fd))
def test_second_derivative_matches_finite_differences(case):
    inputs, cts, vs, first, hvp = _problem(case, np.float64)
    got = _hvp(case, hvp, inputs, cts, vs)
    all_f64 = all(x.dtype == np.float64 for x in inputs if x.dtype.kind == "f")
    step, rtol, atol = (1e-5, 1e-4, 1e-6) if all_f64 else (1e-2, 2e-3, 2e-3)

    def grad_at(sign):
        moved = list(inputs)
        for i, v in zip(case.wrt, vs):
            moved[i] = np.asarray(inputs[i] + sign * step * v, dtype=inputs[i].dtype)
        _, g = first(*moved, *cts)
        return [to_host(g[i]).astype(np.float64) for i in case.wrt]

    plus, minus = grad_at(1.0), grad_at(-1.0)
    for i, g, p, m in zip(case.wrt, got, plus, minus):
        num = (p - m) / (2 * step)
        scale = max(1.0, float(np.max(np.abs(num), initial=0.0)))
        np.testing.assert_allclose(g, num, rtol=rtol, atol=atol * scale,
                                   err_msg=f"{case.id}: Hessian-vector product, argument {i}")


def _torch_hvp(case, inputs, cts, vs):
    wrt = tuple(case.wrt)
    tins = [torch.from_numpy(np.array(x, copy=True)) for x in inputs]
    tcts = [torch.from_numpy(np.array(c, copy=True)) for c in cts]
    tvs = [torch.from_numpy(v.copy()) for v in vs]

    def loss(*ts):
        outs = as_list(case.call_torch(torch, *ts))
        return sum((o * c).sum() for o, c in zip(outs, tcts))

    def directional(*ts):
        grads = torch.func.grad(loss, argnums=wrt)(*ts)
        return sum((g * v).sum() for g, v in zip(grads, tvs))

    return [g.detach().numpy(force=True) for g in torch.func.grad(directional, argnums=wrt)(*tins)]


@pytest.mark.parametrize("case", _params(_CASES, np.float32, lambda c: c.torch_fn is not None and not c.random))
def test_second_derivative_matches_torch(case):
    inputs, cts, vs, _, hvp = _problem(case, np.float32)
    got = _hvp(case, hvp, inputs, cts, vs)
    want = _torch_hvp(case, inputs, cts, vs)
    rtol = case.rtol if case.rtol is not None else 1e-4
    atol = case.atol if case.atol is not None else 1e-4
    for i, g, w in zip(case.wrt, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, g.dtype, w.shape, w.dtype)
        scale = max(1.0, float(np.max(np.abs(w), initial=0.0)))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * scale,
                                   err_msg=f"{case.id}: Hessian-vector product, argument {i}")
