"""avalon.vmap over the primitive table (avalon.testing.cases).

For every case, and three ways of batching its arguments (all mapped along
axis 0; the last operand shared, in_axes None; the first operand of rank >= 1
mapped along its last axis, -1), vmap of the case's function over a batch of 3
examples must equal the per-example results stacked (eager), and PyTorch's
torch.func.vmap of the case's torch_fn; a second call must not retrace.

A case passes only where every primitive its batch reaches has a batching
rule.  The test computes that from the traced graph: where some primitive has
none, vmap must raise MissingRuleError naming it (no case is skipped: once
every primitive has a rule, every case passes).
"""
from __future__ import annotations

import re
import zlib

import numpy as np
import pytest

import avalon
from avalon.errors import MissingRuleError
from avalon.primitive import PRIMITIVES
from avalon.testing import CASES, as_list
from avalon.testing.conformance import to_host

torch = pytest.importorskip("torch")

BATCH = 3
F32_RTOL, F32_ATOL = 1e-4, 1e-5
VARIANTS = ("axis0", "last_shared", "first_axis_last")

# torch notes that padding="same" with an even kernel copies the input: irrelevant here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def _variant_applies(case, variant):
    if variant == "last_shared":
        return len(case.args) >= 2
    if variant == "first_axis_last":
        return any(len(a.shape) >= 1 for a in case.args)
    return True


PARAMS = [pytest.param(c, v, id=f"{c.id}-{v}") for c in CASES for v in VARIANTS if _variant_applies(c, v)]


def _in_axes(case, variant):
    """One batch axis per array argument (None: shared by every example)."""
    axes = [0] * len(case.args)
    if variant == "last_shared":
        axes[-1] = None
    elif variant == "first_axis_last":
        k = next(i for i, a in enumerate(case.args) if len(a.shape) >= 1)
        axes[k] = -1
    return axes


def _examples(case):
    """BATCH different sets of inputs of the case (its own domains)."""
    seed = zlib.crc32(case.id.encode())
    return [case.inputs(np.float32, seed=seed + k) for k in range(BATCH)]


def _batched_args(case, examples, axes):
    """The arguments of the vmapped call: each mapped argument the examples
    stacked along its batch axis; a shared one example 0's."""
    out = []
    for i, d in enumerate(axes):
        if d is None:
            out.append(examples[0][i].copy())
        else:
            out.append(np.stack([ex[i] for ex in examples], axis=d))
    return out


def _expected_eager(case, examples, axes):
    """Each example computed on its own, the results stacked along axis 0."""
    per = []
    for ex in examples:
        inputs = [(examples[0][i] if d is None else ex[i]).copy() for i, d in enumerate(axes)]
        per.append([to_host(o) for o in as_list(case.call(*inputs))])
    return [np.stack([p[j] for p in per]) for j in range(len(per[0]))]


def _expected_torch(case, examples, axes):
    """torch.func.vmap of the case's torch_fn.  Where torch's vmap cannot run
    the function (data-dependent shapes, .item()) or gives a shape its own
    per-example results do not have (argmax(dim=None, keepdim=True) in torch
    2.13), torch's per-example results stacked."""
    per = [as_list(case.call_torch(torch, *[torch.from_numpy((examples[0][i] if d is None else ex[i]).copy())
                                            for i, d in enumerate(axes)])) for ex in examples]
    stacked = [torch.stack([p[j] for p in per]) for j in range(len(per[0]))]
    dummy = torch.zeros(BATCH)
    args = [torch.from_numpy(np.array(a, copy=True)) for a in _batched_args(case, examples, axes)]
    fn = lambda _, *ts: tuple(as_list(case.call_torch(torch, *ts)))  # noqa: E731
    try:
        outs = torch.func.vmap(fn, in_dims=(0, *axes))(dummy, *args)
    except Exception:
        outs = stacked
    if [tuple(o.shape) for o in outs] != [tuple(o.shape) for o in stacked]:
        outs = stacked
    return [o.detach().numpy() for o in outs]


def _missing_rules(case, example, axes):
    """The primitives of the case's graph that vmap must batch (a node reached
    from a mapped argument, or a random draw) and that have no batching rule."""
    g = avalon.trace(lambda *a: case.call(*a), *example)
    mapped = {inp for inp, d in zip(g.inputs, axes) if d is not None}
    missing = []
    for n in g.nodes:
        if n.op in ("input", "const"):
            continue
        prim = PRIMITIVES[n.op]
        if any(i in mapped for i in n.inputs) or prim.draws_random:
            mapped.add(n)
            if prim.rule("batching", None) is None and n.op not in missing:
                missing.append(n.op)
    return missing


def _tol(case):
    return (case.rtol if case.rtol is not None else F32_RTOL, case.atol if case.atol is not None else F32_ATOL)


def _compare(case, got, want, what):
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    if case.random:
        return
    if got.dtype.kind in "fc":
        rtol, atol = _tol(case)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


@pytest.mark.parametrize("case,variant", PARAMS)
def test_vmap_matches_stacked_examples_and_torch(case, variant):
    axes = _in_axes(case, variant)
    examples = _examples(case)
    # a mapped dummy argument, so cases without array arguments (full, arange)
    # check that an output no example changes is broadcast over the batch
    f = avalon.vmap(lambda _, *a: case.call(*a), in_axes=(0, *axes))
    dummy = np.zeros(BATCH, np.float32)
    missing = _missing_rules(case, examples[0], axes)
    if missing:
        with pytest.raises(MissingRuleError, match="|".join(re.escape(repr(m)) for m in missing)):
            f(dummy, *_batched_args(case, examples, axes))
        return
    got = [to_host(o) for o in as_list(f(dummy, *_batched_args(case, examples, axes)))]
    eager = _expected_eager(case, examples, axes)
    assert len(got) == len(eager)
    for j, (g, e) in enumerate(zip(got, eager)):
        _compare(case, g, e, f"{case.id} {variant}: output {j} against the stacked examples")
    if case.bug("forward", np.float32) is None:
        for j, (g, t) in enumerate(zip(got, _expected_torch(case, examples, axes))):
            _compare(case, g, t,
                     f"{case.id} {variant}: output {j} against torch.func.vmap")
    again = [to_host(o) for o in as_list(f(dummy, *_batched_args(case, examples, axes)))]
    assert f.traces == 1, "a second call with the same signature retraced"
    for g, a in zip(got, again):
        if not case.random:
            np.testing.assert_array_equal(a, g)
