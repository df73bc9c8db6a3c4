"""The primitive table (avalon.testing.cases) checked three ways:

(a) every gradient against central finite differences, in float64;
(b) forward (eager and jit) and gradient against PyTorch, in float32;
(c) the table covers every registered primitive and every public op, so it is
    the single source of truth for what Avalon computes.

Known bugs are recorded in the table (`OpCase.bugs`) and marked here as strict
expected failures: when a bug is fixed, its test starts passing and fails the
suite until the record is removed.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import avalon
from avalon import ops
from avalon.autodiff import grad_graph
from avalon.primitive import PRIMITIVES
from avalon.testing import CASES, FLOAT, as_list
from avalon.testing.conformance import cotangents, declared_types, make_loss, to_host

torch = pytest.importorskip("torch")

F32_RTOL, F32_ATOL = 1e-4, 1e-5

# torch notes that padding="same" with an even kernel copies the input: irrelevant here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def _params(cases, float_dtype, checks):
    out = []
    for c in cases:
        bug = next((b for b in c.bugs if any(b.applies(k, float_dtype) for k in checks)), None)
        marks = [pytest.mark.xfail(strict=True, reason=bug.reason)] if bug else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


# -- (a) gradients against finite differences (float64) --------------------------------------------

def _loss_np(case, inputs, cts):
    """sum_k <output_k, cotangent_k>, evaluated eagerly, accumulated in float64."""
    outs = as_list(case.call(*inputs))
    return float(sum(np.sum(to_host(o).astype(np.float64) * c.astype(np.float64)) for o, c in zip(outs, cts)))


def numeric_grad(f, inputs, i, rel_step):
    """Central differences of the scalar function f(list of arrays) w.r.t. inputs[i].

    The step is relative to each element's magnitude, and the divisor is the
    difference actually realised after rounding to the input's dtype, so the
    estimate stays exact for linear functions whatever that dtype."""
    x = inputs[i]
    g = np.zeros(x.shape, np.float64)
    for j in range(x.size):
        xp, xm = x.copy(), x.copy()
        h = rel_step * max(1.0, abs(float(x.flat[j])))
        xp.flat[j] = x.flat[j] + h
        xm.flat[j] = x.flat[j] - h
        step = float(xp.flat[j]) - float(xm.flat[j])
        args_p, args_m = list(inputs), list(inputs)
        args_p[i], args_m[i] = xp, xm
        g.flat[j] = (f(args_p) - f(args_m)) / step
    return g


_FD_CASES = [c for c in CASES if c.differentiable]


@pytest.mark.parametrize("case", _params(_FD_CASES, np.float64, ("grad", "forward")))
def test_grad_matches_finite_differences(case):
    if not case.fd:
        pytest.skip(case.fd_reason)
    inputs = case.inputs(np.float64)
    types = declared_types(case, inputs)
    cts = cotangents(case, types)
    n = len(inputs)
    val, grads = avalon.grad(make_loss(case, n), *inputs, *cts, argnums=case.wrt)
    np.testing.assert_allclose(float(to_host(val)), _loss_np(case, inputs, cts), rtol=1e-6, atol=1e-9)
    all_f64 = (all(x.dtype == np.float64 for x in inputs if x.dtype.kind == "f")
               and all(np.dtype(d) == np.float64 for _, d in types if np.dtype(d).kind == "f"))
    # float64 throughout: truncation ~h^2, rounding ~1e-16/h; a float32 input or
    # output (the cast cases, which are linear) needs a coarse step.
    rel_step, rtol, atol = (1e-6, 1e-5, 1e-6) if all_f64 else (1e-2, 1e-3, 1e-3)
    f = lambda args: _loss_np(case, args, cts)  # noqa: E731
    for i in range(n):
        if i not in case.wrt:
            assert grads[i] is None, f"gradient of non-differentiated argument {i} is not None"
            continue
        g = to_host(grads[i])
        assert g.shape == inputs[i].shape and g.dtype == inputs[i].dtype, (g.shape, g.dtype)
        num = numeric_grad(f, inputs, i, rel_step)
        scale = max(1.0, float(np.max(np.abs(num), initial=0.0)))
        np.testing.assert_allclose(g, num, rtol=rtol, atol=atol * scale,
                                   err_msg=f"{case.id}: gradient of argument {i}")
    for i in range(n, n + len(cts)):
        assert grads[i] is None  # cotangents are not differentiated


# -- (b) against PyTorch (float32) -----------------------------------------------------------------

_TORCH_DTYPES = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32",
                 np.dtype(np.float64): "float64", np.dtype(np.int64): "int64", np.dtype(np.int32): "int32",
                 np.dtype(np.bool_): "bool"}


def _to_torch(x, requires_grad=False):
    t = torch.from_numpy(np.array(x, copy=True))
    return t.requires_grad_(True) if requires_grad else t


def _tol(case):
    return (case.rtol if case.rtol is not None else F32_RTOL, case.atol if case.atol is not None else F32_ATOL)


def _compare_with_torch(case, got, want, what):
    got = to_host(got)
    want_np = want.detach().numpy()
    assert got.shape == tuple(want.shape), f"{what}: shape {got.shape}, torch gives {tuple(want.shape)}"
    assert str(want.dtype) == f"torch.{_TORCH_DTYPES.get(got.dtype, got.dtype.name)}", \
        f"{what}: dtype {got.dtype}, torch gives {want.dtype}"
    if case.random:
        return
    if got.dtype.kind in "fc":
        rtol, atol = _tol(case)
        np.testing.assert_allclose(got, want_np, rtol=rtol, atol=atol, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want_np, err_msg=what)


_TORCH_CASES = [c for c in CASES if c.torch_fn is not None]


@pytest.mark.parametrize("case", _params(_TORCH_CASES, np.float32, ("forward",)))
def test_forward_matches_torch(case):
    # fresh (identical) inputs for every call: assign writes into its input
    inputs = case.inputs(np.float32)
    declared = declared_types(case, inputs)
    want = as_list(case.call_torch(torch, *[_to_torch(x) for x in inputs]))
    eager = as_list(case.call(*case.inputs(np.float32)))
    jitted = as_list(avalon.jit(lambda *a: case.call(*a))(*case.inputs(np.float32)))
    assert len(eager) == len(jitted) == len(want) == len(declared)
    for k, (e, j, w, (shape, dtype)) in enumerate(zip(eager, jitted, want, declared)):
        for mode, got in (("eager", e), ("jit", j)):
            h = to_host(got)
            assert (h.shape, h.dtype) == (shape, dtype), \
                f"{mode} output {k} is {h.dtype}{list(h.shape)}; the shape rule declares {dtype}{list(shape)}"
            _compare_with_torch(case, h, w, f"{case.id} {mode} output {k}")
            if case.random and case.check is not None:
                case.check(h, *inputs)


_TORCH_GRAD_CASES = [c for c in _TORCH_CASES if c.differentiable]


@pytest.mark.parametrize("case", _params(_TORCH_GRAD_CASES, np.float32, ("grad",)))
def test_grad_matches_torch(case):
    inputs = case.inputs(np.float32)
    cts = cotangents(case, declared_types(case, inputs))
    n = len(inputs)
    val, grads = avalon.grad(make_loss(case, n), *inputs, *cts, argnums=case.wrt)
    tins = [_to_torch(x, requires_grad=i in case.wrt) for i, x in enumerate(inputs)]
    touts = as_list(case.call_torch(torch, *tins))
    tloss = sum((o * _to_torch(c)).sum() for o, c in zip(touts, cts))
    tloss.backward()
    rtol, atol = _tol(case)
    np.testing.assert_allclose(float(to_host(val)), tloss.item(), rtol=rtol, atol=atol * max(1, abs(tloss.item())))
    for i in case.wrt:
        want = tins[i].grad
        want = np.zeros(inputs[i].shape, inputs[i].dtype) if want is None else want.numpy()
        g = to_host(grads[i])
        assert g.shape == want.shape and g.dtype == want.dtype, (g.shape, g.dtype, want.shape, want.dtype)
        np.testing.assert_allclose(g, want, rtol=rtol, atol=atol, err_msg=f"{case.id}: gradient of argument {i}")


# -- (c) the table covers everything ---------------------------------------------------------------

#: Registered primitives that no table entry needs to exercise, with the reason.
EXEMPT = {
    "fused": "internal: a group of elementwise nodes built by the fusion pass, never bound by user code",
    "fused_update": "internal: in-place writes merged by the CPU's fuse_updates pass, never bound by user code; "
                    "checked in test_update_fusion.py and by every optimizer test",
    "scatter_slices": "internal: a sum of gradients of slices made by the merge_sums pass, never bound by user "
                      "code; checked in test_merge_sums.py",
    **{name: "internal: batch-innermost form put in by the layout pass, never bound by user code; "
             "checked against the (N, C, ...) primitives in test_layout.py"
       for name in ("im2col_csn", "col2im_csn", "max_pool_csn", "max_pool_csn_grad", "conv_csn",
                    "conv_csn_input_grad", "conv_csn_weight_grad")},
    "contiguous": "internal: a C-ordered copy of a transposed matrix many products read, put in by the CPU's "
                  "shared_transposed_operands pass, never bound by user code; checked in test_shared_transposes.py",
    "allreduce_sum": "internal: a barrier between the engine's threads put in by avalon.parallel; "
                     "checked in test_parallel.py",
    "process_all_reduce": "a collective across processes (avalon.distributed), the identity in one process; "
                          "checked on 2 ranks against single-process training in tests/test_distributed.py",
    "max_pool_gather": "the VJP of max_pool_grad (second derivatives of max pooling): checked by every "
                       "max-pool case of test_second_derivatives.py and in test_ops_nn.py",
    "custom_vjp_call": "bound by avalon.custom_vjp, never by user code; checked in test_custom_gradients.py",
    "remat_barrier": "bound by avalon.checkpoint, never by user code; checked in test_custom_gradients.py",
}


def _is_helper(name):
    """Backward-only helper primitives (the VJP of another primitive)."""
    return name.endswith(("_grad", "_backward"))


def _case_primitives_at(case, float_dtype):
    inputs = case.inputs(float_dtype)
    fwd = {n.op for n in avalon.trace(lambda *a: case.call(*a), *inputs).nodes}
    bwd = set()
    if case.differentiable:
        cts = cotangents(case, declared_types(case, inputs))
        lg = avalon.trace(make_loss(case, len(inputs)), *inputs, *cts)
        wrt = [i in case.wrt for i in range(len(inputs))] + [False] * len(cts)
        bwd = {n.op for n in grad_graph(lg, wrt).nodes}
    return fwd, bwd


def _case_primitives(case):
    """The primitives in the case's forward graph and in its backward graph."""
    try:
        return _case_primitives_at(case, np.float32)
    except Exception:  # noqa: BLE001 - a known float32 bug: trace in float64
        return _case_primitives_at(case, np.float64)


@pytest.fixture(scope="module")
def covered():
    fwd, bwd = set(), set()
    for c in CASES:
        f, b = _case_primitives(c)
        fwd |= f
        bwd |= b
    return fwd, bwd


def test_exempt_entries_are_registered_primitives():
    assert set(EXEMPT) <= set(PRIMITIVES), set(EXEMPT) - set(PRIMITIVES)


def test_every_primitive_is_covered_by_the_table(covered):
    fwd, bwd = covered
    missing = sorted(n for n in PRIMITIVES if n not in EXEMPT and not _is_helper(n) and n not in fwd)
    assert not missing, f"primitives no table entry calls (add cases to avalon/testing/cases.py): {missing}"
    helpers = sorted(n for n in PRIMITIVES if n not in EXEMPT and _is_helper(n) and n not in fwd | bwd)
    assert not helpers, f"backward helper primitives no table entry's gradient uses: {helpers}"


def _public_ops():
    return sorted(n for n, v in vars(ops).items()
                  if not n.startswith("_") and inspect.isfunction(v)
                  and v.__module__.startswith("avalon.ops.") and v.__module__ != "avalon.ops._rules")


def test_every_public_op_has_a_case():
    have = {c.op for c in CASES}
    missing = [n for n in _public_ops() if n not in have]
    assert not missing, f"public ops without a table entry: {missing}"


def test_table_is_well_formed():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    for c in CASES:
        assert callable(getattr(avalon, c.op, None)), f"{c.id}: avalon.{c.op} does not exist"
        assert c.torch_fn is not None, f"{c.id}: no PyTorch reference"
        assert all(i < len(c.args) and (c.args[i].is_float) for i in c.wrt), f"{c.id}: bad grad positions"
        assert c.fd or c.fd_reason, f"{c.id}: fd=False needs a reason"
        assert c.random or c.check is None, f"{c.id}: check() is for random cases"
        for b in c.bugs:
            assert b.check in ("forward", "grad") and b.reason
        xs = c.inputs(np.float32)
        assert [x.shape for x in xs] == [tuple(a.shape) for a in c.args]
        assert all(x.dtype == (np.float32 if a.dtype == FLOAT else np.dtype(a.dtype)) for x, a in zip(xs, c.args))
    # the same case id gives the same inputs (reproducible failures)
    c = CASES[0]
    assert all(np.array_equal(a, b) for a, b in zip(c.inputs(np.float64), c.inputs(np.float64)))
