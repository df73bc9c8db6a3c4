"""Indexing ops (getitem, concatenate, stack, split, pad, take_along_axis,
gather, take, one_hot): eager results against NumPy, compiled against eager,
gradients against central finite differences (float64) and against PyTorch
(float32), and the errors for shapes that do not fit."""

import zlib

import numpy as np
import pytest

import avalon
from avalon.testing import numerical_gradient
from avalon import ShapeError
from avalon.errors import AvalonError, ConcretizationError, DtypeError, MissingRuleError
from avalon.ops import indexing as I

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


numgrad = numerical_gradient


def check_grads(f, *args, wrt=None, rtol=1e-6, atol=1e-8):
    """avalon.grad(f, *args) against eager f and finite differences for every
    float argument (or those in `wrt`)."""
    loss, grads = avalon.grad(f, *args)
    np.testing.assert_allclose(loss, f(*args), rtol=1e-12, atol=1e-12)
    assert len(grads) == len(args)
    for k, a in enumerate(args):
        if not (isinstance(a, np.ndarray) and a.dtype.kind == "f") or (wrt is not None and k not in wrt):
            continue

        def fk(v, k=k):
            return f(*args[:k], v, *args[k + 1:])
        assert grads[k].shape == a.shape and grads[k].dtype == a.dtype
        np.testing.assert_allclose(grads[k], numgrad(fk, a), rtol=rtol, atol=atol)
    return loss, grads


def tt(a, grad=False):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.requires_grad_(True) if grad else t


def close32(actual, expected):
    expected = expected.detach().numpy() if isinstance(expected, torch.Tensor) else expected
    assert tuple(actual.shape) == tuple(expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# getitem
# --------------------------------------------------------------------------

SHAPE = (4, 5, 6)
_mask_rng = _rng("mask")
MASK3 = _mask_rng.random(SHAPE) > 0.5
MASK1 = np.array([True, False, True, True])
MASK2 = _mask_rng.random((5, 6)) > 0.3

# name -> (index, torch-compatible)
GETITEM_CASES = {
    "int": (0, True),
    "neg-int": (-1, True),
    "int-int": ((2, -3), True),
    "int-int-int": ((3, 4, 5), True),
    "slice": (slice(1, 3), True),
    "slice-step": ((slice(None), slice(0, 5, 2)), True),
    "slice-clip": (slice(-10, 10), True),
    "slice-empty": (slice(3, 1), True),
    "slice-neg-step": (slice(None, None, -1), False),
    "slice-neg-step2": ((slice(None, None, -2), 1), False),
    "slice-neg-bounded": ((slice(None), slice(4, 0, -3)), False),
    "slice-neg-empty": (slice(-10, None, -1), False),
    "ellipsis-none": ((Ellipsis, None), True),
    "none-int-ellipsis-none": ((None, 0, Ellipsis, None), True),
    "int-slice-slice": ((1, slice(None), slice(0, 4, 2)), True),
    "ellipsis-int": ((Ellipsis, 2), True),
    "full": ((slice(None), Ellipsis), True),
    "array": (np.array([0, 2, 2, 1]), True),
    "array-2d": (np.array([[3, 0], [3, 3], [1, 2]]), True),
    "array-neg": (np.array([-1, 0, -1]), True),
    "list": ([1, 1, 0], True),
    "array-empty": (np.array([], dtype=np.int64), True),
    "arrays-nonadjacent": ((np.array([[0, 1], [2, 2]]), slice(None), np.array([1, 0])), True),
    "arrays-adjacent-mid": ((slice(None), np.array([0, 0, 3]), np.array([1, 1, 2])), True),
    "arrays-broadcast": ((np.array([[0], [3], [3]]), np.array([1, 1, 4])), True),
    "int-array-nonadjacent": ((0, slice(None), np.array([1, 2, 1])), False),  # torch keeps the int basic
    "int-array-adjacent": ((slice(1, 3), 2, np.array([5, 0, 5])), True),
    "ellipsis-array": ((Ellipsis, np.array([2, 0, 2])), True),
    "array-none-array": ((np.array([1, 0, 1]), None, np.array([0, 1, 0])), True),
    "array-ellipsis-array": ((np.array([1, 3]), Ellipsis, np.array([5, 5])), True),
    "0d-array": ((np.array(2), 1), True),
    "mask-full": (MASK3, True),
    "mask-axis0": (MASK1, True),
    "mask-trailing": ((slice(None), MASK2), True),
    "mask-and-array": ((np.array([2, 2, 0]), np.array([True, False, True, False, True])), True),
    "slice-array-step": ((slice(None, None, 2), np.array([4, 4, 0]), slice(1, None, 2)), True),
}


def _case(name):
    return GETITEM_CASES[name][0]


@pytest.mark.parametrize("name", list(GETITEM_CASES))
def test_getitem_eager_matches_numpy(name):
    idx = _case(name)
    x = _rng("gi", name).standard_normal(SHAPE)
    got = avalon.getitem(x, idx)
    want = x[idx]
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    # the shape rule (used while tracing) agrees with what NumPy computes
    g = avalon.trace(lambda x: avalon.getitem(x, idx), x)
    assert g.outputs[0].shape == want.shape
    g.check()


@pytest.mark.parametrize("name", list(GETITEM_CASES))
def test_getitem_jit_matches_eager(name):
    idx = _case(name)
    x = _rng("gj", name).standard_normal(SHAPE).astype(np.float32)
    f = avalon.jit(lambda x: x[idx])  # Tracer.__getitem__
    np.testing.assert_array_equal(f(x), avalon.getitem(x, idx))
    np.testing.assert_array_equal(f(x), x[idx])


@pytest.mark.parametrize("name", list(GETITEM_CASES))
def test_getitem_grad_finite_differences(name):
    idx = _case(name)
    r = _rng("gg", name)
    x = r.standard_normal(SHAPE)
    w = r.standard_normal(x[idx].shape)
    check_grads(lambda x: (avalon.getitem(x, idx) * w).sum(), x)


def _torch_index(idx):
    if isinstance(idx, tuple):
        return tuple(_torch_index(i) for i in idx)
    if isinstance(idx, np.ndarray):
        return torch.from_numpy(idx) if idx.ndim else int(idx)
    return idx


@pytest.mark.parametrize("name", [n for n, (_, ok) in GETITEM_CASES.items() if ok])
def test_getitem_against_torch(name):
    idx = _case(name)
    r = _rng("gt", name)
    x = r.standard_normal(SHAPE).astype(np.float32)
    w = r.standard_normal(x[idx].shape).astype(np.float32)
    xt = tt(x, grad=True)
    yt = xt[_torch_index(idx)]
    (yt * tt(w)).sum().backward()
    close32(avalon.getitem(x, idx), yt)
    loss, (gx,) = avalon.grad(lambda x: (x[idx] * w).sum(), x)
    assert gx.dtype == np.float32
    close32(gx, xt.grad)


def test_repeated_indices_accumulate():
    x = np.arange(5, dtype=np.float64)
    idx = np.array([1, 1, 1, 3, 3, 0])
    loss, (g,) = avalon.grad(lambda x: avalon.getitem(x, idx).sum(), x)
    np.testing.assert_array_equal(g, [1, 3, 0, 2, 0])
    # rows of a matrix (the embedding pattern), against torch
    r = _rng("emb")
    table = r.standard_normal((6, 3)).astype(np.float32)
    ids = np.array([[0, 5, 5], [2, 0, 5]])
    w = r.standard_normal((2, 3, 3)).astype(np.float32)
    tt_ = tt(table, grad=True)
    (tt_[tt(ids)] * tt(w)).sum().backward()
    loss, (g,) = avalon.grad(lambda t: (t[ids] * w).sum(), table)
    close32(g, tt_.grad)


def test_tracer_getitem_surface():
    r = _rng("surface")
    x = r.standard_normal((4, 5)).astype(np.float32)
    idx = np.array([3, 0, 0])
    labels = np.array([1, 4, 4, 0])

    def f(x, labels):
        return x[0], x[:, 1:3], x[..., None], x[idx], x[np.arange(4), labels], x[-1, ::-2], x[1][2]

    got = avalon.jit(f)(x, labels)
    want = (x[0], x[:, 1:3], x[..., None], x[idx], x[np.arange(4), labels], x[-1, ::-2], x[1][2])
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    # iteration over a traced array goes through __getitem__ as well
    rows = avalon.jit(lambda x: [row * 2 for row in x])(x)
    for k in range(4):
        np.testing.assert_array_equal(rows[k], x[k] * 2)


def test_traced_index_array_nll_against_torch():
    r = _rng("nll")
    n, c = 6, 5
    logits = r.standard_normal((n, c)).astype(np.float32)
    labels = np.array([1, 4, 4, 0, 1, 1])

    def nll(logits, labels):
        logp = avalon.log_softmax(logits, axis=-1)
        return -logp[np.arange(n), labels].mean()

    g = avalon.trace(nll, logits, labels)
    gi = [node for node in g.nodes if node.op == "getitem"]
    assert len(gi) == 1 and gi[0].inputs[2] is g.inputs[1]  # labels is an operand, not an attribute

    loss, (glogits, glabels) = avalon.grad(nll, logits, labels)
    assert glabels is None
    lt = tt(logits, grad=True)
    ref = F.cross_entropy(lt, tt(labels))
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)
    close32(glogits, lt.grad)
    # same compiled function, new label values: no retrace, new result
    labels2 = np.array([0, 0, 2, 3, 3, 4])
    gf = avalon.value_and_grad(nll)
    traces = gf.traces
    loss2, (g2, _) = gf(logits, labels2)
    assert gf.traces == traces
    lt2 = tt(logits, grad=True)
    ref2 = F.cross_entropy(lt2, tt(labels2))
    ref2.backward()
    np.testing.assert_allclose(loss2, ref2.item(), rtol=1e-5)
    close32(g2, lt2.grad)


def test_traced_index_array_gradient_finite_differences():
    r = _rng("traced-idx")
    x = r.standard_normal((5, 3))
    ids = np.array([[4, 4], [0, 4], [2, 2]])
    w = r.standard_normal((3, 2, 3))
    check_grads(lambda x, ids: (x[ids] * w).sum(), x, ids)
    w2 = r.standard_normal((3, 2))
    check_grads(lambda x, ids: (x[ids, 1] * w2).sum(), x, ids)
    out = avalon.jit(lambda x, ids: x[::-1][ids[0]])(x, ids)
    np.testing.assert_array_equal(out, x[::-1][ids[0]])


def test_getitem_int32_and_uint_indices():
    x = np.arange(12.0).reshape(3, 4)
    for dt in (np.int32, np.uint8, np.int16):
        idx = np.array([2, 0, 2], dtype=dt)
        np.testing.assert_array_equal(avalon.getitem(x, idx), x[idx])
        np.testing.assert_array_equal(avalon.jit(lambda x, i: x[:, i])(x, idx), x[:, idx])
        loss, (g, _) = avalon.grad(lambda x, i: x[i].sum(), x, idx)
        np.testing.assert_array_equal(g, np.array([[1.0] * 4, [0] * 4, [2] * 4]))


def test_getitem_noop_and_views():
    x = np.arange(24.0).reshape(2, 3, 4)
    assert avalon.getitem(x, slice(None)) is x
    assert avalon.getitem(x, Ellipsis) is x
    assert avalon.getitem(x, ()) is x
    assert avalon.getitem(x, (slice(None), slice(0, 3), Ellipsis)) is x
    v = avalon.getitem(x, (1, slice(None, None, 2)))
    assert np.shares_memory(v, x)  # basic indexing is a view, as in NumPy
    g = avalon.trace(lambda x: x[:, :], x)
    assert g.count("getitem") == 0


def test_getitem_normalized_attrs():
    x = np.zeros((4, 5, 6), np.float32)
    g = avalon.trace(lambda x: x[-1, ..., None, ::-2], x)
    (node,) = [n for n in g.nodes if n.op == "getitem"]
    assert node.attrs["index"] == (("int", 3), ("slice", 0, 5, 1), ("new",), ("slice", 5, -1, -2))
    # two spellings of one index give one node after CSE
    # (without fuse_views, which moves the one view into the add's kernel)
    pipeline = [p for p in avalon.passes.default_pipeline() if p[0] != "fuse_views"]
    f = avalon.jit(lambda x: x[1:3, -2] + x[1:-1, 3], passes=pipeline)
    f(x)
    assert f.graph.count("getitem") == 1


def test_getitem_backward_graph():
    x = np.zeros((4, 5), np.float32)
    gf = avalon.value_and_grad(lambda x: (x[1:3] * x[1:3]).sum() + (x[np.array([0, 0])] ** 3).sum())
    gf(x)
    assert gf.graph.count("getitem_grad") == 2


def test_getitem_grad_with_shared_intermediates():
    """Views of intermediates, several slices of one value and gradients that
    accumulate in planned buffers: compiled twice, against finite differences."""
    r = _rng("shared")
    x = r.standard_normal((6, 4))
    w = r.standard_normal((3, 4))

    def f(x):
        h = avalon.tanh(x * 1.5)
        a = h[:3] * w
        b = h[3:][::-1] * a
        c = h[np.array([0, 5, 5])] + h[1]
        e = avalon.exp(h)[2:5]
        return (a.sum() + (b * c).sum() + (e * h[::2]).sum()) * 0.5

    loss1, (g1,) = check_grads(f, x)
    g1 = g1.copy()
    loss2, (g2,) = avalon.grad(f, x)
    np.testing.assert_array_equal(g1, g2)
    # compiled against eager: fused kernels may use vector math (a few ulp from NumPy's)
    np.testing.assert_allclose(avalon.jit(f)(x), f(x), rtol=1e-14)


def test_getitem_grad_primitive_vjp():
    """getitem_grad is linear in g; its own VJP (a gather) checked numerically."""
    r = _rng("gg-vjp")
    idx = (np.array([0, 2, 2]), slice(None), np.array([1, 1, 0]))
    x = r.standard_normal((3, 4, 2))
    entries, arrays = I._normalize_index(x.shape, idx)
    gshape = x[idx].shape
    w = r.standard_normal(x.shape)

    def f(g):
        z = avalon.bind(I.getitem_grad_p, (g, *arrays), {"index": entries, "shape": x.shape})
        return (z * z * w).sum()
    check_grads(f, r.standard_normal(gshape))


class _NoUfuncAt:
    """numpy without ufunc.at (as some array modules are)."""
    add = staticmethod(lambda *a, **k: np.add(*a, **k))

    def __getattr__(self, name):
        return getattr(np, name)


def test_scatter_add_fallback_without_ufunc_at():
    r = _rng("no-at")
    xp = _NoUfuncAt()
    assert not hasattr(xp.add, "at")
    for idx in [(np.array([0, 2, 2, -1]), slice(None), np.array([1, 1, 0, 1])), np.array([[1, 1], [1, 0]]),
                (slice(1, None), 0, np.array([1, 1]))]:
        x = r.standard_normal((3, 4, 2)).astype(np.float32)
        entries, arrays = I._normalize_index(x.shape, idx)
        g = r.standard_normal(x[idx].shape).astype(np.float32)
        got = I._getitem_grad_impl(xp, g, *arrays, index=entries, shape=x.shape)
        want = np.zeros_like(x)
        np.add.at(want, idx, g)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    ids = r.integers(0, 4, size=(3, 5))
    g = r.standard_normal((3, 5))
    got = I._tala_grad_impl(xp, g, ids, axis=1, shape=(3, 4))
    np.testing.assert_allclose(got, I._tala_grad_impl(np, g, ids, axis=1, shape=(3, 4)), rtol=1e-12)


def test_getitem_errors():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ShapeError, match=r"index 3 is out of range for axis 0 with size 3 .*\(3, 4\)"):
        avalon.getitem(x, 3)
    with pytest.raises(ShapeError, match=r"index -5 .*axis 1 .*\(3, 4\)\) \(at .*test_ops_indexing.py:\d+\)"):
        avalon.jit(lambda x: x[0, -5])(x)
    with pytest.raises(ShapeError, match=r"too many indices .*\(3, 4\)"):
        avalon.getitem(x, (0, 0, 0))
    with pytest.raises(ShapeError, match=r"too many indices .*\(3, 4\)"):
        avalon.jit(lambda x: x[:, :, None, 1])(x)
    with pytest.raises(ShapeError, match=r"index 4 is out of range for axis 1 .*\(3, 4\)"):
        avalon.getitem(x, (slice(None), np.array([0, 4])))
    with pytest.raises(ShapeError, match=r"index -4 .*axis 0"):
        avalon.getitem(x, [-4])
    with pytest.raises(ShapeError, match=r"boolean index of shape \(4,\) .*\(3, 4\)"):
        avalon.getitem(x, np.ones(4, bool))
    with pytest.raises(ShapeError, match="single Ellipsis"):
        avalon.getitem(x, (Ellipsis, 0, Ellipsis))
    with pytest.raises(ShapeError, match=r"\(2,\) and \(3,\)"):
        avalon.getitem(x, (np.array([0, 1]), np.array([0, 1, 2])))
    with pytest.raises(DtypeError, match="float64"):
        avalon.getitem(x, np.array([0.0, 1.0]))
    with pytest.raises(DtypeError, match="float32"):
        avalon.jit(lambda x, i: x[i])(x, np.zeros(2, np.float32))
    with pytest.raises(ConcretizationError, match="where"):
        avalon.jit(lambda x: x[x > 0])(x)
    with pytest.raises(AvalonError, match="boolean"):
        avalon.getitem(x, True)


# --------------------------------------------------------------------------
# concatenate, stack, split
# --------------------------------------------------------------------------

CONCAT_CASES = {
    "axis0": ([(2, 3), (1, 3), (4, 3)], 0),
    "axis1": ([(2, 3), (2, 1), (2, 2)], 1),
    "axis-1-3d": ([(2, 3, 1), (2, 3, 4)], -1),
    "axis1-3d": ([(2, 1, 2), (2, 3, 2), (2, 2, 2)], 1),
    "empty-part": ([(0, 3), (2, 3)], 0),
    "single": ([(2, 3)], 0),
}


@pytest.mark.parametrize("name", list(CONCAT_CASES))
def test_concatenate(name):
    shapes, axis = CONCAT_CASES[name]
    r = _rng("cat", name)
    xs = [r.standard_normal(s) for s in shapes]
    want = np.concatenate(xs, axis)
    got = avalon.concatenate(xs, axis)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(avalon.jit(lambda *xs: avalon.concatenate(xs, axis))(*xs), want)
    np.testing.assert_array_equal(avalon.jit(lambda *xs: np.concatenate(xs, axis=axis))(*xs), want)
    w = r.standard_normal(want.shape)
    check_grads(lambda *xs: (avalon.concatenate(xs, axis) * w * avalon.concatenate(xs, axis)).sum(), *xs)
    # float32 against torch
    xs32 = [a.astype(np.float32) for a in xs]
    w32 = w.astype(np.float32)
    xts = [tt(a, grad=True) for a in xs32]
    yt = torch.cat(xts, axis)
    (yt * tt(w32)).sum().backward()
    close32(avalon.concatenate(xs32, axis), yt)
    loss, grads = avalon.grad(lambda *xs: (avalon.concatenate(xs, axis) * w32).sum(), *xs32)
    for gk, xt in zip(grads, xts):
        close32(gk, xt.grad)


def test_concatenate_axis_none_and_dtypes():
    a, b = np.arange(6.0).reshape(2, 3), np.arange(4.0)
    np.testing.assert_array_equal(avalon.concatenate([a, b], axis=None), np.concatenate([a, b], axis=None))
    f32 = np.ones((2, 2), np.float32)
    i64 = np.arange(4).reshape(2, 2)
    r = avalon.concatenate([f32, i64], 1)
    assert r.dtype == np.float32  # ints join floats without widening them
    np.testing.assert_array_equal(r, np.concatenate([f32, i64], 1).astype(np.float32))
    loss, (g, gi) = avalon.grad(lambda a, b: avalon.concatenate([a, b]).sum(), f32, i64)
    np.testing.assert_array_equal(g, np.ones((2, 2), np.float32))
    assert gi is None
    with pytest.raises(DtypeError, match="float32 and float64"):
        avalon.concatenate([f32, f32.astype(np.float64)])


def test_concatenate_errors():
    with pytest.raises(ShapeError, match=r"\(2, 3\) and \(2, 4\) differ outside axis 0"):
        avalon.concatenate([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ShapeError, match=r"\(2, 3\) and \(3, 4\) differ outside axis 1"):
        avalon.jit(lambda a, b: avalon.concatenate([a, b], axis=1))(np.zeros((2, 3)), np.zeros((3, 4)))
    with pytest.raises(ShapeError, match=r"same number of dimensions.*\(2, 3\) and \(3,\)"):
        avalon.concatenate([np.zeros((2, 3)), np.zeros(3)])
    with pytest.raises(ShapeError, match=r"axis 2 is out of range .*\(2, 3\)"):
        avalon.concatenate([np.zeros((2, 3)), np.zeros((2, 3))], axis=2)
    with pytest.raises(ShapeError, match="zero-dimensional"):
        avalon.concatenate([np.zeros(()), np.zeros(())])
    with pytest.raises(ShapeError, match="at least one"):
        avalon.concatenate([])


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_stack(axis):
    r = _rng("stack", axis)
    xs = [r.standard_normal((2, 3)) for _ in range(3)]
    want = np.stack(xs, axis)
    np.testing.assert_array_equal(avalon.stack(xs, axis), want)
    np.testing.assert_array_equal(avalon.jit(lambda xs: avalon.stack(xs, axis))(xs), want)
    np.testing.assert_array_equal(avalon.jit(lambda xs: np.stack(xs, axis=axis))(xs), want)
    w = r.standard_normal(want.shape)
    check_grads(lambda a, b, c: (avalon.stack([a, b, c], axis) ** 2 * w).sum(), *xs)
    xs32 = [a.astype(np.float32) for a in xs]
    xts = [tt(a, grad=True) for a in xs32]
    (torch.stack(xts, axis) * tt(w.astype(np.float32))).sum().backward()
    loss, grads = avalon.grad(lambda xs: (avalon.stack(xs, axis) * w.astype(np.float32)).sum(), xs32)
    for gk, xt in zip(grads[0], xts):
        close32(gk, xt.grad)


def test_stack_errors():
    with pytest.raises(ShapeError, match=r"\(2, 3\) and \(3, 2\)"):
        avalon.stack([np.zeros((2, 3)), np.zeros((3, 2))])
    with pytest.raises(ShapeError, match=r"axis 3 is out of range"):
        avalon.stack([np.zeros((2, 3))], axis=3)


SPLIT_CASES = {
    "sections": (3, 0),
    "sections-axis1": (2, 1),
    "points": ([1, 4], 0),
    "points-axis-1": ([2], -1),
    "points-beyond": ([2, 10], 0),
    "points-decreasing": ([4, 1], 0),
    "one": (1, 1),
}


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_split(name):
    ios, axis = SPLIT_CASES[name]
    r = _rng("split", name)
    x = r.standard_normal((6, 4))
    want = np.split(x, ios, axis)
    got = avalon.split(x, ios, axis)
    assert isinstance(got, list) and len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    for a, b in zip(avalon.jit(lambda x: np.split(x, ios, axis=axis))(x), want):
        np.testing.assert_array_equal(a, b)
    ws = [r.standard_normal(p.shape) for p in want]

    def f(x):
        parts = avalon.split(x, ios, axis)
        return sum(((p * p * w).sum() for p, w in zip(parts, ws)), 0.0)
    check_grads(f, x)


def test_split_errors():
    with pytest.raises(ShapeError, match=r"shape \(6, 4\) does not split into 4 equal sections along axis 0"):
        avalon.split(np.zeros((6, 4)), 4)
    with pytest.raises(ShapeError, match="positive"):
        avalon.split(np.zeros((6, 4)), 0)
    with pytest.raises(ShapeError, match=r"axis 2 is out of range .*\(6, 4\)"):
        avalon.split(np.zeros((6, 4)), 2, axis=2)


# --------------------------------------------------------------------------
# pad
# --------------------------------------------------------------------------

PAD_CASES = {
    "int": (2, 0),
    "pair": ((1, 2), 0),
    "per-axis": (((1, 2), (0, 3)), -1.5),
    "per-axis-single": ([[1], [2]], 0.25),
    "one-pair-list": ([(0, 1)], 3),
    "per-axis-values": (((1, 1), (2, 1)), ((1.0, 2.0), (3.0, 4.0))),
    "zero": (0, 7),
}


@pytest.mark.parametrize("name", list(PAD_CASES))
def test_pad(name):
    width, value = PAD_CASES[name]
    r = _rng("pad", name)
    x = r.standard_normal((3, 4))
    want = np.pad(x, width, constant_values=value)
    np.testing.assert_array_equal(avalon.pad(x, width, constant_values=value), want)
    np.testing.assert_array_equal(avalon.jit(lambda x: avalon.pad(x, width, constant_values=value))(x), want)
    np.testing.assert_array_equal(avalon.jit(lambda x: np.pad(x, width, constant_values=value))(x), want)
    w = r.standard_normal(want.shape)
    check_grads(lambda x: (avalon.pad(x, width, constant_values=value) ** 2 * w).sum(), x)


def test_pad_3d_int_and_against_torch():
    r = _rng("pad-torch")
    x = r.standard_normal((2, 3, 4)).astype(np.float32)
    width = ((0, 0), (2, 1), (1, 3))
    want = np.pad(x, width, constant_values=0.5)
    got = avalon.pad(x, width, constant_values=0.5)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    w = r.standard_normal(want.shape).astype(np.float32)
    xt = tt(x, grad=True)
    yt = F.pad(xt, (1, 3, 2, 1), value=0.5)  # torch lists the last axis first
    (yt * tt(w)).sum().backward()
    close32(got, yt)
    loss, (g,) = avalon.grad(lambda x: (avalon.pad(x, width, constant_values=0.5) * w).sum(), x)
    close32(g, xt.grad)
    xi = np.arange(6).reshape(2, 3)
    np.testing.assert_array_equal(avalon.pad(xi, 1, constant_values=-1), np.pad(xi, 1, constant_values=-1))


def test_pad_errors():
    x = np.zeros((3, 4))
    with pytest.raises(MissingRuleError, match="mode='reflect' is not supported"):
        avalon.pad(x, 1, mode="reflect")
    with pytest.raises(ShapeError, match="non-negative"):
        avalon.pad(x, -1)
    with pytest.raises(ShapeError, match="non-negative"):
        avalon.pad(x, 1.5)
    with pytest.raises(ShapeError, match="3 axes|2 axes"):
        avalon.pad(x, ((1, 1), (1, 1), (1, 1)))
    with pytest.raises(ShapeError, match=r"pad_width has 1 .*\(3, 4\)"):
        avalon.bind(I.pad_p, (x,), {"pad_width": ((1, 1),), "value": 0})


# --------------------------------------------------------------------------
# take_along_axis, gather, take
# --------------------------------------------------------------------------

def _tala_cases():
    r = _rng("tala-cases")
    x = r.standard_normal((3, 4, 5))
    return {
        "argsort-last": (x, np.argsort(x, axis=-1), -1),
        "repeated-axis1": (x, r.integers(0, 4, size=(3, 7, 5)), 1),
        "top1-axis0": (x, np.argmax(x, axis=0)[None], 0),
        "broadcast-index": (x, r.integers(0, 5, size=(1, 4, 2)), 2),
        "broadcast-array": (x[:1], r.integers(0, 4, size=(3, 2, 5)), 1),
        "negative": (x, -r.integers(1, 6, size=(3, 4, 3)), 2),
        "axis-none": (x, r.integers(0, 60, size=(7,)), None),
        "empty": (x, np.zeros((3, 0, 5), np.int64), 1),
    }


TALA_CASES = list(_tala_cases())


@pytest.mark.parametrize("name", TALA_CASES)
def test_take_along_axis(name):
    x, idx, axis = _tala_cases()[name]
    want = np.take_along_axis(x, idx, axis)
    got = avalon.take_along_axis(x, idx, axis)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(avalon.jit(lambda x: avalon.take_along_axis(x, idx, axis))(x), want)
    np.testing.assert_array_equal(avalon.jit(lambda x: np.take_along_axis(x, idx, axis=axis))(x), want)
    # indices traced
    np.testing.assert_array_equal(avalon.jit(lambda x, i: avalon.take_along_axis(x, i, axis))(x, idx), want)
    w = _rng("tala-w", name).standard_normal(want.shape)
    check_grads(lambda x: (avalon.take_along_axis(x, idx, axis) * w).sum(), x)
    check_grads(lambda x, i: (avalon.take_along_axis(x, i, axis) ** 2 * w).sum(), x, idx)


@pytest.mark.parametrize("name", [n for n in TALA_CASES if n not in ("negative", "axis-none", "broadcast-index",
                                                                       "broadcast-array")])
def test_take_along_axis_against_torch(name):
    x, idx, axis = _tala_cases()[name]
    x = x.astype(np.float32)
    w = _rng("tala-t", name).standard_normal(np.take_along_axis(x, idx, axis).shape).astype(np.float32)
    xt = tt(x, grad=True)
    yt = torch.take_along_dim(xt, tt(idx), axis)
    (yt * tt(w)).sum().backward()
    close32(avalon.take_along_axis(x, idx, axis), yt)
    loss, (g, _) = avalon.grad(lambda x, i: (avalon.take_along_axis(x, i, axis) * w).sum(), x, idx)
    close32(g, xt.grad)


GATHER_CASES = {
    "dim0": ((4, 3), (5, 3), 0),
    "dim1-smaller": ((4, 6), (3, 8), 1),
    "dim-1-3d": ((2, 3, 5), (2, 2, 7), -1),
    "dim1-3d-smaller": ((3, 4, 5), (2, 6, 1), 1),
}


@pytest.mark.parametrize("name", list(GATHER_CASES))
def test_gather_against_torch(name):
    xshape, ishape, dim = GATHER_CASES[name]
    r = _rng("gather", name)
    x = r.standard_normal(xshape).astype(np.float32)
    index = r.integers(0, xshape[dim], size=ishape)  # many repeats
    w = r.standard_normal(ishape).astype(np.float32)
    xt = tt(x, grad=True)
    yt = torch.gather(xt, dim, tt(index))
    (yt * tt(w)).sum().backward()
    close32(avalon.gather(x, dim, index), yt)
    close32(avalon.jit(lambda x, i: avalon.gather(x, dim, i))(x, index), yt)
    loss, (g, _) = avalon.grad(lambda x, i: (avalon.gather(x, dim, i) * w).sum(), x, index)
    close32(g, xt.grad)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    check_grads(lambda x: (avalon.gather(x, dim, index) * w64).sum(), x64)


def test_take_along_axis_grad_primitive_vjp():
    r = _rng("tala-vjp")
    idx = r.integers(0, 4, size=(3, 6))
    w = r.standard_normal((3, 4))

    def f(g):
        z = avalon.bind(I.tala_grad_p, (g, idx), {"axis": 1, "shape": (3, 4)})
        return (z * z * w).sum()
    check_grads(f, r.standard_normal((3, 6)))


def test_take_along_axis_and_gather_errors():
    x = np.zeros((3, 4))
    with pytest.raises(ShapeError, match=r"indices of shape \(3,\) .*\(3, 4\)"):
        avalon.take_along_axis(x, np.zeros(3, np.int64), 1)
    with pytest.raises(ShapeError, match=r"index 4 is out of range .*size 4 .*\(3, 4\)"):
        avalon.take_along_axis(x, np.full((3, 1), 4), 1)
    with pytest.raises(ShapeError, match=r"\(2, 1\) do not broadcast .*\(3, 4\)"):
        avalon.take_along_axis(x, np.zeros((2, 1), np.int64), 1)
    with pytest.raises(ShapeError, match=r"axis 2 is out of range .*\(3, 4\)"):
        avalon.take_along_axis(x, np.zeros((3, 1), np.int64), 2)
    with pytest.raises(DtypeError, match="float64"):
        avalon.take_along_axis(x, np.zeros((3, 1)), 1)
    with pytest.raises(ShapeError, match=r"index of shape \(4, 2\) is larger than the input of shape \(3, 4\)"):
        avalon.gather(x, 1, np.zeros((4, 2), np.int64))
    with pytest.raises(ShapeError, match=r"index of shape \(3,\) must have as many dimensions .*\(3, 4\)"):
        avalon.gather(x, 1, np.zeros(3, np.int64))


def test_take():
    r = _rng("take")
    x = r.standard_normal((4, 5))
    idx = np.array([[0, 3], [3, 3]])
    for axis in (None, 0, 1, -1):
        want = np.take(x, idx, axis=axis)
        np.testing.assert_array_equal(avalon.take(x, idx, axis), want)
        np.testing.assert_array_equal(avalon.jit(lambda x, i: avalon.take(x, i, axis))(x, idx), want)
        w = r.standard_normal(want.shape)
        check_grads(lambda x: (avalon.take(x, idx, axis) * w).sum(), x)
    np.testing.assert_array_equal(avalon.take(x, 3, 1), np.take(x, 3, 1))


# --------------------------------------------------------------------------
# one_hot
# --------------------------------------------------------------------------

def test_one_hot_against_torch():
    labels = np.array([[0, 3], [2, 2], [1, 0]])
    want = F.one_hot(tt(labels), 5).numpy()
    got = avalon.one_hot(labels, 5)
    assert got.dtype == np.float32 and got.shape == (3, 2, 5)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(avalon.one_hot(labels), F.one_hot(tt(labels)).numpy())
    np.testing.assert_array_equal(avalon.jit(lambda l: avalon.one_hot(l, 5, np.int64))(labels), want)
    assert avalon.one_hot(labels.astype(np.int32), 4, dtype=np.float64).dtype == np.float64
    with pytest.raises(ConcretizationError, match="num_classes"):
        avalon.jit(lambda l: avalon.one_hot(l))(labels)
    with pytest.raises(DtypeError):
        avalon.one_hot(np.array([0.0, 1.0]), 2)


def test_one_hot_cross_entropy_against_torch():
    r = _rng("onehot-ce")
    logits = r.standard_normal((5, 4)).astype(np.float32)
    labels = np.array([3, 0, 0, 1, 3])

    def ce(logits, labels):
        return -(avalon.log_softmax(logits) * avalon.one_hot(labels, 4)).sum(axis=-1).mean()

    loss, (g, _) = avalon.grad(ce, logits, labels)
    lt = tt(logits, grad=True)
    ref = F.cross_entropy(lt, tt(labels))
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-5)
    close32(g, lt.grad)


def test_exports():
    for name in I.__all__:
        assert getattr(avalon, name) is getattr(I, name)
