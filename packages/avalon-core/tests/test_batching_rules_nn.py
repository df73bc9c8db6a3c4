"""Batching rules (avalon.vmap) of the nn primitives (avalon.ops.nn).

For every primitive, every choice of mapped and unmapped operands and of batch
axes (at the front, second, last, mixed), rule(args, dims, **attrs) on eager
float64 NumPy arrays equals the primitive applied to each example (eager bind)
and stacked; with groups > 1, stride/padding/dilation variants (uneven "same"
padding pairs included) and 1-D, 2-D and 3-D convolutions and pools.  Each rule
is one call of its primitive (no loop over the examples), the graphs the rules
record compile (avalon.jit) to the same values, and examples folded into N
keep the batch split across threads."""
import itertools
import zlib

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import avalon
from avalon.errors import LabelError
from avalon.passes import sharding
from avalon.ops import nn as nn_ops
from avalon.ops._batching import fold_batch, unfold_batch
from avalon.primitive import PRIMITIVES, bind

B = 3  # examples per batch
F64 = dict(rtol=1e-10, atol=1e-12)
NN_PRIMITIVES = ("conv", "conv_input_grad", "conv_weight_grad", "conv_transpose", "max_pool", "max_pool_grad",
                 "max_pool_gather", "avg_pool", "avg_pool_grad", "check_labels", "binary_cross_entropy")


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _normal(r, shape):
    return r.standard_normal(shape)


# -- the shared helpers: fold_batch / unfold_batch ---------------------------------------------------------

FOLDS = [(example, axis, outer) for example in [(2, 6, 3), (1, 6, 3), (3, 1, 2)]
         for axis, outer in [(0, 1), (1, 1), (1, 2), (1, 3), (2, 1)] if example[axis] % outer == 0]


@pytest.mark.parametrize("example,axis,outer", FOLDS)
@pytest.mark.parametrize("d", [0, 1, 2, 3, -1])
def test_fold_batch_orders_the_merged_axis_outer_example_inner(example, axis, outer, d):
    xs = _normal(_rng(example, axis, outer, d), (B,) + example)   # example-major
    folded = np.asarray(fold_batch(np.moveaxis(xs, 0, d), d, axis, outer))
    n = example[axis]
    blocks = xs.reshape((B,) + example[:axis] + (outer, n // outer) + example[axis + 1:])
    expected = np.moveaxis(blocks, 0, axis + 1).reshape(example[:axis] + (outer * B * n // outer,)
                                                        + example[axis + 1:])
    np.testing.assert_array_equal(folded, expected)
    back, out_dim = unfold_batch(folded, axis, B, outer)
    np.testing.assert_array_equal(np.moveaxis(np.asarray(back), out_dim, 0), xs)


def test_fold_batch_is_a_reshape_when_only_size_one_axes_move():
    # a vmapped example's image batch N = 1: the examples join the channels with no copy
    graph = avalon.trace(lambda x: fold_batch(x, 0, 1), np.ones((4, 1, 3, 5, 5)))
    assert [n.op for n in graph.nodes if n.op != "input"] == ["reshape"]


# -- the table: one example's operands and attributes per case -------------------------------------

class Case:
    """One primitive with attributes; `make(r)` draws one example's operands."""

    def __init__(self, name, prim, attrs, make):
        self.name, self.prim, self.attrs, self.make = name, prim, attrs, make

    def __repr__(self):
        return self.name


def _conv_out(spatial, kernel, stride, padding, dilation):
    pairs = [(p, p) if isinstance(p, int) else p for p in padding]
    return tuple((s + lo + hi - d * (k - 1) - 1) // st + 1
                 for s, k, st, (lo, hi), d in zip(spatial, kernel, stride, pairs, dilation))


# (label, N, C, O, groups, spatial, kernel, stride, padding, dilation)
CONV_GEOMETRIES = [
    ("2d", 2, 3, 4, 1, (6, 5), (3, 2), (1, 1), (0, 0), (1, 1)),
    ("2d_groups_strided_dilated", 1, 4, 6, 2, (7, 6), (3, 3), (2, 1), (1, (0, 1)), (1, 2)),
    ("2d_depthwise", 2, 3, 6, 3, (5, 5), (2, 2), (2, 2), (1, 1), (1, 1)),
    ("1d_groups", 2, 6, 3, 3, (11,), (3,), (2,), (1,), (2,)),
    ("3d_groups", 1, 2, 4, 2, (4, 5, 3), (2, 3, 2), (1, 2, 1), (1, 0, (0, 1)), (1, 1, 2)),
]


def _conv_cases(geom):
    label, n, c, o, groups, spatial, kernel, stride, padding, dilation = geom
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    xs, ws = (n, c) + spatial, (o, c // groups) + kernel
    ys = (n, o) + _conv_out(spatial, kernel, stride, padding, dilation)
    int_padding = tuple(p if isinstance(p, int) else p[0] for p in padding)
    transpose_attrs = dict(stride=stride, padding=int_padding, output_padding=tuple(min(1, s - 1) for s in stride),
                           dilation=dilation, groups=groups)
    return [
        Case(f"conv[{label}]", "conv", geometry, lambda r: (_normal(r, xs), _normal(r, ws))),
        Case(f"conv_input_grad[{label}]", "conv_input_grad", dict(geometry, input_shape=xs),
             lambda r: (_normal(r, ys), _normal(r, ws))),
        Case(f"conv_weight_grad[{label}]", "conv_weight_grad", dict(geometry, weight_shape=ws),
             lambda r: (_normal(r, xs), _normal(r, ys))),
        Case(f"conv_transpose[{label}]", "conv_transpose", transpose_attrs,
             lambda r: (_normal(r, xs), _normal(r, (c, o // groups) + kernel))),
    ]


# (label, x shape, kernel_size, stride, padding, dilation)
POOL_GEOMETRIES = [
    ("2d_dilated", (2, 3, 7, 6), (3, 2), (2, 2), (1, 0), (1, 2)),
    ("1d_overlapping", (2, 2, 9), (3,), (1,), (1,), (1,)),
    ("3d", (1, 2, 4, 5, 4), (2, 2, 2), (2, 1, 2), (1, 0, 1), (1, 1, 1)),
]


def _pool_cases(geom):
    label, xs, kernel, stride, padding, dilation = geom
    window = dict(kernel_size=kernel, stride=stride, padding=padding)
    ys = xs[:2] + _conv_out(xs[2:], kernel, stride, padding, dilation)
    avg_ys = xs[:2] + _conv_out(xs[2:], kernel, stride, padding, (1,) * len(kernel))
    cases = [
        Case(f"max_pool[{label}]", "max_pool", dict(window, dilation=dilation), lambda r: (_normal(r, xs),)),
        Case(f"max_pool_grad[{label}]", "max_pool_grad", dict(window, dilation=dilation),
             lambda r: (_normal(r, xs), _normal(r, ys))),
        Case(f"max_pool_gather[{label}]", "max_pool_gather", dict(window, dilation=dilation),
             lambda r: (_normal(r, xs), _normal(r, xs))),
    ]
    for include in (True, False):
        avg = dict(window, count_include_pad=include)
        cases += [
            Case(f"avg_pool[{label},include_pad={include}]", "avg_pool", avg, lambda r: (_normal(r, xs),)),
            Case(f"avg_pool_grad[{label},include_pad={include}]", "avg_pool_grad", dict(avg, input_shape=xs),
                 lambda r: (_normal(r, avg_ys),)),
        ]
    return cases


def _labels(shape, num_classes, ignore_index):
    def make(r):
        t = r.integers(0, num_classes, shape)
        if ignore_index is not None:
            t.reshape(-1)[::3] = ignore_index
        return (t,)
    return make


def _label_attrs(shape, num_classes, ignore_index):
    return dict(num_classes=num_classes, ignore_index=ignore_index, name="my_loss", loc=None, traced_shape=shape)


def _probabilities(xs, ts):
    def make(r):
        x = r.uniform(0.0, 1.0, xs)
        x.reshape(-1)[:2] = (0.0, 1.0)   # the clamped logs
        return x, r.uniform(0.0, 1.0, ts)
    return make


CASES = (
    [c for g in CONV_GEOMETRIES for c in _conv_cases(g)]
    + [c for g in POOL_GEOMETRIES for c in _pool_cases(g)]
    + [Case("check_labels[ignore_index]", "check_labels", _label_attrs((4, 5), 7, -100), _labels((4, 5), 7, -100)),
       Case("check_labels[1d]", "check_labels", _label_attrs((6,), 3, None), _labels((6,), 3, None)),
       Case("binary_cross_entropy", "binary_cross_entropy", {}, _probabilities((2, 3, 4), (2, 3, 4))),
       Case("binary_cross_entropy[broadcast]", "binary_cross_entropy", {}, _probabilities((2, 3, 4), (3, 4)))]
)


# -- batching the examples and checking against the per-example results -------------------------------

AXIS_CHOICES = {   # where operand k of rank r (with its batch axis) gets its batch axis
    "front": lambda k, r: 0,
    "second": lambda k, r: 1,
    "last": lambda k, r: r - 1,
    "mixed": lambda k, r: (r - 1, 0)[k % 2],
}


def _dims_choices(case):
    """Every choice of mapped operands (at least one) and batch axes, once each."""
    ranks = [len(a.shape) + 1 for a in case.make(_rng(case.name))]
    seen = []
    for mapped in itertools.product((True, False), repeat=len(ranks)):
        if not any(mapped):
            continue
        for place in AXIS_CHOICES.values():
            dims = tuple(place(k, ranks[k]) if m else None for k, m in enumerate(mapped))
            if dims not in seen:
                seen.append(dims)
    return seen


def _batch(case, dims, size=B):
    """The batched operands (per-example draws stacked at each mapped operand's
    axis, one draw for an unmapped one) and each example's operands."""
    draws = [case.make(_rng(case.name, i)) for i in range(size)]
    args = tuple(np.stack([dr[k] for dr in draws], axis=d) if d is not None else draws[0][k]
                 for k, d in enumerate(dims))
    examples = [tuple(dr[k] if d is not None else draws[0][k] for k, d in enumerate(dims)) for dr in draws]
    return args, examples


def _per_example(case, examples):
    return np.stack([np.asarray(bind(PRIMITIVES[case.prim], ex, dict(case.attrs))) for ex in examples])


def _apply_rule(case, args, dims):
    out, out_dim = PRIMITIVES[case.prim].rule("batching")(args, dims, **case.attrs)
    return np.moveaxis(np.asarray(out), out_dim, 0)


PARAMS = [pytest.param(case, dims, id=f"{case.name}-dims={dims}") for case in CASES for dims in _dims_choices(case)]


@pytest.mark.parametrize("case,dims", PARAMS)
def test_rule_equals_stacked_examples(case, dims):
    args, examples = _batch(case, dims)
    expected = _per_example(case, examples)
    got = _apply_rule(case, args, dims)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    if got.dtype.kind == "f":
        np.testing.assert_allclose(got, expected, **F64)
    else:
        np.testing.assert_array_equal(got, expected)


def test_every_nn_primitive_has_a_batching_rule_and_a_case():
    for name in NN_PRIMITIVES:
        assert callable(PRIMITIVES[name].rule("batching")), name
    assert {c.prim for c in CASES} == set(NN_PRIMITIVES)
    # every primitive registered by avalon.ops.nn is in that list
    mine = {v.name for v in vars(nn_ops).values() if getattr(v, "name", None) in PRIMITIVES
            and PRIMITIVES[v.name] is v}
    assert mine == set(NN_PRIMITIVES)


# -- random convolution geometries -----------------------------------------------------------------------

@st.composite
def conv_geometries(draw):
    nd = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    c, o = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    # an int, or (low, high) with high >= low (padding="same" adds the odd one on the high side)
    padding = tuple(draw(st.one_of(st.integers(0, 1), st.integers(0, 1).flatmap(
        lambda lo: st.tuples(st.just(lo), st.integers(lo, lo + 1))))) for _ in range(nd))
    extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
    spatial = tuple(e + draw(st.integers(0, 3)) for e in extent)
    n = draw(st.integers(1, 2))
    return ("random", n, c, o, groups, spatial, kernel, stride, padding, dilation)


@settings(max_examples=30, deadline=None)
@given(geom=conv_geometries(), which=st.integers(0, 3), choice=st.integers(0, 99))
def test_conv_rules_on_random_geometries(geom, which, choice):
    case = _conv_cases(geom)[which]
    if case.prim == "conv_transpose":   # its output must not be empty
        a, spatial, kernel = case.attrs, geom[5], geom[6]
        sizes = [(s - 1) * st_ - 2 * p + d * (k - 1) + op + 1 for s, k, st_, p, op, d in
                 zip(spatial, kernel, a["stride"], a["padding"], a["output_padding"], a["dilation"])]
        assume(min(sizes) >= 1)
    dims_list = _dims_choices(case)
    dims = dims_list[choice % len(dims_list)]
    args, examples = _batch(case, dims, size=2)
    np.testing.assert_allclose(_apply_rule(case, args, dims), _per_example(case, examples), **F64)


# -- one call of the primitive, and the recorded graph compiles -----------------------------------------------

def _traced_ops(case, args, dims):
    rule = PRIMITIVES[case.prim].rule("batching")
    graph = avalon.trace(lambda *a: rule(a, dims, **case.attrs)[0], *args)
    return [n.op for n in graph.nodes]


@pytest.mark.parametrize("case,dims", [p for p in PARAMS if p.values[0].prim != "check_labels"][::7])
def test_rule_is_one_call_of_its_primitive(case, dims):
    args, _ = _batch(case, dims)
    assert _traced_ops(case, args, dims).count(case.prim) == 1


PER_EXAMPLE_GRADIENT = [   # the ops of vmap(grad(loss), in_axes=(None, 0, 0)) on a CNN, and their mapping
    ("conv[2d_groups_strided_dilated]", (None, 0)),
    ("conv[2d]", (1, 0)),
    ("conv_input_grad[2d]", (0, None)),
    ("conv_weight_grad[2d]", (0, 0)),
    ("conv_weight_grad[2d_groups_strided_dilated]", (2, 3)),
    ("max_pool_grad[2d_dilated]", (0, 0)),
    ("avg_pool_grad[2d_dilated,include_pad=False]", (1,)),
]


def _transposed_to_front(rule, dims, attrs):
    def batched(*a):
        out, out_dim = rule(a, dims, **attrs)
        return avalon.transpose(out, (out_dim,) + tuple(i for i in range(len(out.shape)) if i != out_dim))
    return batched


@pytest.mark.parametrize("name,dims", PER_EXAMPLE_GRADIENT)
def test_compiled_rule_matches_eager(name, dims):
    case = next(c for c in CASES if c.name == name)
    args, examples = _batch(case, dims, size=8)
    batched = _transposed_to_front(PRIMITIVES[case.prim].rule("batching"), dims, case.attrs)
    np.testing.assert_allclose(np.asarray(avalon.jit(batched)(*args)), _per_example(case, examples), **F64)


@pytest.mark.parametrize("name,dims", [("conv[2d_groups_strided_dilated]", (0, 2)), ("conv[1d_groups]", (None, 1)),
                                       ("conv_weight_grad[2d_groups_strided_dilated]", (0, 0)),
                                       ("conv_weight_grad[3d_groups]", (4, None)),
                                       ("conv_input_grad[2d_depthwise]", (1, 0)),
                                       ("conv_transpose[1d_groups]", (0, 0)), ("max_pool_grad[2d_dilated]", (None, 0))])
def test_the_batched_call_is_differentiable_as_the_examples_are(name, dims):
    """grad of a batched call (grad(vmap(...)), per-example gradient norms in a loss)
    equals each example's gradient: stacked for a mapped operand, summed for a shared one."""
    case = next(c for c in CASES if c.name == name)
    args, examples = _batch(case, dims)
    prim, rule = PRIMITIVES[case.prim], PRIMITIVES[case.prim].rule("batching")
    proj = _normal(_rng(name, "projection"), _per_example(case, examples).shape)
    _, got = avalon.grad(lambda *a: avalon.sum(_transposed_to_front(rule, dims, case.attrs)(*a) * proj), *args)
    per_example = [avalon.grad(lambda *a, r=r: avalon.sum(bind(prim, a, dict(case.attrs)) * r), *ex)[1]
                   for ex, r in zip(examples, proj)]
    for k, d in enumerate(dims):
        parts = [np.asarray(grads[k]) for grads in per_example]
        want = np.stack(parts, axis=d) if d is not None else np.sum(parts, axis=0)
        np.testing.assert_allclose(np.asarray(got[k]), want, **F64)


FOLDED_INTO_N = [   # one image per example (N = 1), the examples at the front: the batch split still applies
    ("conv[2d_groups_strided_dilated]", (0, None)),
    ("conv_input_grad[3d_groups]", (0, None)),
    ("max_pool_grad[3d]", (0, 0)),
    ("avg_pool[3d,include_pad=True]", (0,)),
]


@pytest.mark.parametrize("name,dims", FOLDED_INTO_N)
def test_examples_folded_into_n_keep_the_batch_split_across_threads(name, dims, monkeypatch):
    monkeypatch.setattr(sharding, "MIN_SHARD_ELEMENTS", 0)
    case = next(c for c in CASES if c.name == name)
    args, examples = _batch(case, dims, size=8)
    batched = _transposed_to_front(PRIMITIVES[case.prim].rule("batching"), dims, case.attrs)
    graph = avalon.trace(batched, *args)
    mapped = {graph.inputs[k] for k, d in enumerate(dims) if d == 0}
    assert sharding.split_batch(graph, mapped, 2) is not None
    np.testing.assert_allclose(np.asarray(avalon.jit(batched)(*args)), _per_example(case, examples), **F64)


# -- check_labels under a batch: the same check, the example's axis named ----------------------------------------

def test_batched_check_labels_reports_the_bad_label_and_the_example_axis():
    attrs = _label_attrs((5,), 4, -100)
    t = np.array([[0, 1, 2, 3, -100], [0, 1, 7, 3, 2], [1, 1, 1, 1, 1]])
    rule = PRIMITIVES["check_labels"].rule("batching")
    with pytest.raises(LabelError) as e:
        rule((t.T.copy(),), (1,), **attrs)
    msg = str(e.value)
    assert msg.startswith("my_loss (under vmap: axis 1 of the position is the example): target 7 is out of "
                          "bounds for 4 classes")
    assert "target[2, 1]" in msg
    assert "threads" not in msg     # the batched shape is the checked one


def test_batched_check_labels_passes_ignore_index_and_refuses_other_negatives():
    rule = PRIMITIVES["check_labels"].rule("batching")
    ok = np.array([[0, -100], [3, 1]])
    out, d = rule((ok,), (0,), **_label_attrs((2,), 4, -100))
    np.testing.assert_array_equal(np.asarray(out), ok)
    assert d == 0
    with pytest.raises(LabelError, match="target -1 is out of bounds"):
        rule((np.array([[0, -1], [3, 1]]),), (0,), **_label_attrs((2,), 4, -100))
