"""Batching rules (avalon.vmap) of the indexing primitives, the scans and
argsort, the random draws, custom_vjp_call, remat_barrier and
process_all_reduce, checked without the vmap transformation: for each choice
of mapped operands and batch axes, rule(args, dims, **attrs) on eager NumPy
arrays, its result's batch axis moved to the front, must equal the primitive
applied to each example alone (eager bind), stacked.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import avalon
from avalon import PRIMITIVES, bind
from avalon.ops._batching import NOT_MAPPED
from avalon.ops.indexing import _normalize_index
from avalon.testing.conformance import to_host

N = 3  # examples in a batch


def _host(x):
    return np.asarray(to_host(x))


def _dim_choices(ranks, rng):
    """Every nonempty choice of mapped operands, each mapped one batched at a
    random axis (its example rank + 1 places to put it)."""
    for mapped in itertools.product((False, True), repeat=len(ranks)):
        if any(mapped):
            yield tuple(int(rng.integers(0, r + 1)) if m else NOT_MAPPED for m, r in zip(mapped, ranks))


def check_rule(name, make_example, attrs, rng, n=N):
    """make_example(k) -> operands of example k (NumPy arrays, same shapes for
    every k); an unmapped operand is example 0's for every example."""
    prim = PRIMITIVES[name]
    rule = prim.rule("batching")
    examples = [make_example(k) for k in range(n)]
    ranks = [np.ndim(a) for a in examples[0]]
    checked = 0
    for dims in _dim_choices(ranks, rng):
        per = [[ex[i] if d is not NOT_MAPPED else examples[0][i] for i, d in enumerate(dims)] for ex in examples]
        args = tuple(np.stack([p[i] for p in per], axis=d) if d is not NOT_MAPPED else examples[0][i]
                     for i, d in enumerate(dims))
        out, od = rule(args, dims, **attrs)
        got = np.moveaxis(_host(out), od, 0)
        want = np.stack([_host(bind(prim, tuple(p), attrs)) for p in per])
        assert got.dtype == want.dtype, (name, dims, got.dtype, want.dtype)
        np.testing.assert_array_equal(got, want, err_msg=f"{name} with batch axes {dims}")
        checked += 1
    assert checked == 2 ** len(ranks) - 1


# -- getitem and getitem_grad ----------------------------------------------------------------

def _arr(p, r, ndim, size):
    """An index array of ndim random extents (from p: the same for every
    example) and values in [-size, size) (from r: the example's own)."""
    return r.integers(-size, size, size=tuple(p.integers(1, 4, size=ndim))).astype(np.int64)


#: index builders: (p, r, s) -> an index for an array of shape s; p draws what every example
#: shares (shapes, slice bounds, ints), r what each example draws anew (index values)
INDICES = {
    "basic": lambda p, r, s: (slice(1, s[0]), int(p.integers(0, s[1]))),
    "new_ellipsis_step": lambda p, r, s: (None, Ellipsis, slice(None, None, -2)),
    "int_only": lambda p, r, s: (int(p.integers(-s[0], s[0])),),
    "array_first": lambda p, r, s: (_arr(p, r, 2, s[0]),),
    "array_after_slice": lambda p, r, s: (slice(None), _arr(p, r, 1, s[1])),
    "arrays_split": lambda p, r, s: (r.integers(0, s[0], size=3), slice(1, 3), r.integers(0, s[2], size=3)),
    "int_and_array_split": lambda p, r, s: (1, slice(None), _arr(p, r, 2, s[2])),
    "arrays_broadcast_after_slice": lambda p, r, s: (slice(None, 2), r.integers(0, s[1], size=(3, 1)),
                                                     _arr(p, r, 1, s[2])),
    "new_then_arrays": lambda p, r, s: (None, slice(0, 3), _arr(p, r, 1, s[1]), 1),
    "scalar_array": lambda p, r, s: (slice(None), np.array(2, np.int64), _arr(p, r, 1, s[2])),
}


def _getitem_example(index_fn, seed, grad=False):
    """(make_example for getitem (x, *arrays) or getitem_grad (g, *arrays), the
    normalized index, x's shape): the shapes and the normalized index are the
    same for every example, the values differ."""
    found = {}

    def make(k):
        p, r = np.random.default_rng(seed), np.random.default_rng(1000 * seed + k)
        shape = tuple(int(n) for n in p.integers(3, 7, size=3))
        e, arrays = _normalize_index(shape, index_fn(p, r, shape))
        found.update(entries=e, shape=shape)
        x = r.standard_normal(shape)
        if grad:
            out_shape = np.shape(bind(PRIMITIVES["getitem"], (x, *arrays), {"index": e}))
            return (r.standard_normal(out_shape), *arrays)
        return (x, *arrays)
    make(0)
    return make, found["entries"], found["shape"]


SEEDS = [1, 2, 3]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("which", list(INDICES), ids=str)
def test_getitem_rule(which, seed):
    make, entries, _ = _getitem_example(INDICES[which], seed)
    check_rule("getitem", make, {"index": entries}, np.random.default_rng(seed), n=1 + seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("which", list(INDICES), ids=str)
def test_getitem_grad_rule(which, seed):
    make, entries, shape = _getitem_example(INDICES[which], seed, grad=True)
    check_rule("getitem_grad", make, {"index": entries, "shape": shape}, np.random.default_rng(seed), n=1 + seed)


def test_getitem_grad_rule_accumulates_repeated_indices_per_example():
    idx = np.array([1, 1, 3], np.int64)
    e, _ = _normalize_index((5,), (idx,))
    g = np.ones((N, 3))
    out, od = PRIMITIVES["getitem_grad"].rule("batching")((g, idx), (0, NOT_MAPPED), index=e, shape=(5,))
    np.testing.assert_array_equal(np.moveaxis(_host(out), od, 0), np.tile([0, 2, 0, 1, 0], (N, 1)))


# -- concatenate, pad, take_along_axis, check_index ------------------------------------------

def _shape(p, ndim=3):
    """A random example shape (the same for every example: p is seeded alike)."""
    return [int(n) for n in p.integers(1, 5, size=ndim)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_concatenate_rule(axis, seed):
    def make(k):
        p, r = np.random.default_rng(seed), np.random.default_rng(1000 * seed + k)
        base = _shape(p)
        shapes = [base[:axis] + [int(p.integers(1, 4))] + base[axis + 1:] for _ in range(int(p.integers(2, 4)))]
        return tuple(r.standard_normal(s).astype(np.float32) for s in shapes)
    check_rule("concatenate", make, {"axis": axis}, np.random.default_rng(seed), n=1 + seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("value", [0.0, 1.5, "per_axis"], ids=["zero", "scalar", "per_axis"])
def test_pad_rule(value, seed):
    p = np.random.default_rng(seed)
    shape = _shape(p, 2)
    widths = tuple((int(b), int(a)) for b, a in p.integers(0, 3, size=(2, 2)))
    if value == "per_axis":
        value = tuple((float(b), float(a)) for b, a in p.standard_normal((2, 2)))

    def make(k):
        return (np.random.default_rng(1000 * seed + k).standard_normal(shape),)
    check_rule("pad", make, {"pad_width": widths, "value": value}, p, n=1 + seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_take_along_axis_rule(axis, seed):
    p = np.random.default_rng(seed)
    xshape = _shape(p)
    # indices: any length along axis, the array's extent or 1 (broadcast) along the others
    ishape = [int(p.integers(1, 4)) if d == axis else (n if p.random() < 0.7 else 1) for d, n in enumerate(xshape)]

    def make(k):
        r = np.random.default_rng(1000 * seed + k)
        return r.standard_normal(xshape), r.integers(0, xshape[axis], size=ishape).astype(np.int64)
    check_rule("take_along_axis", make, {"axis": axis}, p, n=1 + seed)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_take_along_axis_grad_rule(axis, seed):
    p = np.random.default_rng(seed)
    shape = tuple(_shape(p))
    ishape = tuple(int(p.integers(1, 4)) if d == axis else n for d, n in enumerate(shape))

    def make(k):
        r = np.random.default_rng(1000 * seed + k)
        idx = r.integers(0, shape[axis], size=ishape).astype(np.int64)  # repeats: the scatter adds them up
        return r.standard_normal(ishape), idx
    check_rule("take_along_axis_grad", make, {"axis": axis, "shape": shape}, p, n=1 + seed)


def _check_index_attrs(shape):
    return dict(size=5, dim=0, negative_ok=False, name="gather", loc=None, traced_shape=shape)


def test_check_index_rule_passes_good_indices_and_refuses_a_bad_one_in_any_example():
    def make(k):
        return (np.random.default_rng(50 + k).integers(0, 5, size=(2, 3)).astype(np.int64),)
    check_rule("check_index", make, _check_index_attrs((2, 3)), np.random.default_rng(8))
    batch = np.zeros((N, 2, 3), np.int64)
    batch[2, 1, 0] = 7
    rule = PRIMITIVES["check_index"].rule("batching")
    with pytest.raises(avalon.ShapeError, match="gather: index 7 is out of range for dimension 0 with size 5"):
        rule((batch,), (0,), **_check_index_attrs((2, 3)))


# -- scans and argsort -------------------------------------------------------------------------

SCANS = [("cumsum", {"reverse": False}), ("cumsum", {"reverse": True}), ("cumprod", {}),
         ("argsort", {"descending": False}), ("argsort", {"descending": True})]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name, attrs", SCANS, ids=lambda v: v if isinstance(v, str) else str(*v.values()))
def test_scan_and_sort_rules(name, attrs, seed):
    p = np.random.default_rng(seed)
    shape = _shape(p)
    attrs = dict(attrs, axis=int(p.integers(0, 3)))
    if name == "argsort":
        attrs["k"] = int(p.integers(0, shape[attrs["axis"]] + 1))

    def make(k):
        r = np.random.default_rng(1000 * seed + k)
        return (np.round(r.standard_normal(shape), 1),)  # rounded: ties, whose order argsort keeps
    check_rule(name, make, attrs, p, n=1 + seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_cumprod_grad_rule(seed):
    p = np.random.default_rng(seed)
    shape, axis = _shape(p), int(p.integers(0, 3))

    def make(k):
        r = np.random.default_rng(1000 * seed + k)
        x = r.standard_normal(shape)
        x.flat[k % x.size] = 0.0  # zeros: the gradient is exact there too
        return r.standard_normal(shape), x
    check_rule("cumprod_grad", make, {"axis": axis}, p, n=1 + seed)


# -- the identities: remat_barrier, process_all_reduce ------------------------------------------

def test_remat_barrier_rule():
    check_rule("remat_barrier", lambda k: (np.random.default_rng(80 + k).standard_normal((2, 3)),), {},
               np.random.default_rng(11))


def test_process_all_reduce_rule_reduces_the_batch_in_one_call():
    """The reduction is elementwise across processes: the batch goes through
    one all-reduce node (its axis where it was), not one per example."""
    rule = PRIMITIVES["process_all_reduce"].rule("batching")
    x = np.ones((2, N, 4), np.float32)
    g = avalon.trace(lambda x: rule((x,), (1,), op="sum")[0], x)
    nodes = [n for n in g.nodes if n.op == "process_all_reduce"]
    assert len(nodes) == 1 and tuple(nodes[0].shape) == (2, N, 4) and nodes[0].attrs == {"op": "sum"}
    found = {}

    def f(x):
        out, found["od"] = rule((x,), (1,), op="mean")
        return out
    avalon.trace(f, x)
    assert found["od"] == 1  # the batch axis stays where it was


# -- the random draws: each example its own numbers ---------------------------------------------

@pytest.mark.parametrize("name", ["random_uniform", "random_normal"])
def test_a_batched_draw_gives_each_example_the_numbers_of_drawing_them_in_turn(name):
    prim = PRIMITIVES[name]
    attrs = {"shape": (2, 3), "dtype": np.dtype(np.float32)}
    avalon.manual_seed(123)
    out, od = prim.rule("batching")((), (), axis_size=4, **attrs)
    got = np.moveaxis(_host(out), od, 0)
    avalon.manual_seed(123)
    want = np.stack([_host(bind(prim, (), attrs)) for _ in range(4)])
    assert got.shape == (4, 2, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert len({got[k].tobytes() for k in range(4)}) == 4  # no two examples share their numbers


def test_a_batched_draw_in_a_trace_is_one_node_of_the_batched_shape():
    rule = PRIMITIVES["random_normal"].rule("batching")
    x = np.zeros(3, np.float32)
    g = avalon.trace(lambda x: x + rule((), (), axis_size=5, shape=(3,), dtype=np.dtype(np.float32))[0], x)
    draws = [n for n in g.nodes if n.op == "random_normal"]
    assert len(draws) == 1 and tuple(draws[0].shape) == (5, 3)


# -- custom_vjp_call ----------------------------------------------------------------------------

@avalon.custom_vjp
def clipped_square(x, s):
    return x * x * s


clipped_square.defvjp(lambda x, s: (x * x * s, (x, s)),
                      lambda res, ct: (avalon.clip(2.0 * res[0] * res[1] * ct, -1.0, 1.0), None))


def _reference_vmap(f):
    """vmap by a loop over the examples (a test stand-in for avalon.vmap:
    every leaf of every argument batched at axis 0, outputs stacked at 0)."""
    def batched(*args):
        leaves, td = avalon.tree.flatten(args, is_leaf=avalon.primitive.is_tracer)
        n = int(leaves[0].shape[0])
        outs = [f(*avalon.tree.unflatten(td, [avalon.getitem(x, k) for x in leaves])) for k in range(n)]
        return tuple(None if o[0] is None else avalon.stack([o_k[i] for o_k in outs])
                     for i, o in enumerate(zip(*outs)))
    return batched


def _custom_node_operands(x, s):
    """The operands and rule of the custom_vjp_call node that clipped_square(x, s) makes."""
    g = avalon.trace(clipped_square, x, s)
    (node,) = [n for n in g.nodes if n.op == "custom_vjp_call"]
    return node


def test_custom_vjp_call_rule_keeps_the_custom_gradient_of_each_example(monkeypatch):
    rng = np.random.default_rng(12)
    xs = rng.standard_normal((N, 4)).astype(np.float32) * 2
    s = np.float32(1.5) * np.ones(4, np.float32)
    rule = PRIMITIVES["custom_vjp_call"].rule("batching")
    monkeypatch.setattr(avalon, "vmap", _reference_vmap, raising=False)
    # the node as clipped_square(x, s) makes it for one example, then batched by its rule
    node_rule = _custom_node_operands(np.zeros(4, np.float32), s).attrs["rule"]

    def batched_loss(xs, s):
        y = xs * xs * s
        out, od = rule((y, xs, s, xs, s), (0, 0, NOT_MAPPED, 0, NOT_MAPPED), rule=node_rule)
        assert od == 0
        return avalon.sum(out * np.arange(1, 5, dtype=np.float32))

    value, (gx, gs) = avalon.grad(batched_loss, xs, s)
    want_value = sum(float(((x * x * s) * np.arange(1, 5)).sum()) for x in xs)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    want_gx = np.clip(2.0 * xs * s * np.arange(1, 5, dtype=np.float32), -1.0, 1.0)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-6)   # the custom (clipped) gradient, per example
    np.testing.assert_array_equal(gs, np.zeros(4, np.float32))  # bwd gives s no gradient


def test_custom_vjp_call_rule_without_vmap_names_what_is_missing():
    if hasattr(avalon, "vmap"):
        pytest.skip("avalon.vmap exists in this build")
    rule = PRIMITIVES["custom_vjp_call"].rule("batching")
    s = np.ones(4, np.float32)

    node_rule = _custom_node_operands(np.zeros(4, np.float32), s).attrs["rule"]

    def batched_loss(xs):
        out, _ = rule((xs * xs * s, xs, s, xs, s), (0, 0, NOT_MAPPED, 0, NOT_MAPPED), rule=node_rule)
        return avalon.sum(out)

    with pytest.raises(avalon.MissingRuleError, match="clipped_square.*avalon.vmap"):
        avalon.grad(batched_loss, np.ones((N, 4), np.float32))


def test_custom_vjp_call_rule_forward_is_the_batched_output():
    def make(k):
        r = np.random.default_rng(90 + k)
        x = r.standard_normal(4).astype(np.float32)
        return (x * x, x)
    node_rule = _custom_node_operands(np.zeros(4, np.float32), np.ones(4, np.float32)).attrs["rule"]
    check_rule("custom_vjp_call", lambda k: make(k) + (np.ones(4, np.float32),) * 3, {"rule": node_rule},
               np.random.default_rng(13))
