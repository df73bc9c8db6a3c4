"""Property tests over random shapes: elementwise ops with broadcasting,
reductions over random axes, and shape ops, against NumPy."""
from __future__ import annotations

import numpy as np
import pytest

import avalon

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None, database=None, derandomize=True)
SEEDS = st.integers(0, 2**32 - 1)


def unbroadcast(g, shape):
    """Sum g down to `shape` (the adjoint of broadcasting), in NumPy."""
    lead = g.ndim - len(shape)
    g = g.sum(axis=tuple(range(lead))) if lead else g
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def _grad(f, *args):
    return avalon.grad(f, *args)


# -- elementwise with broadcasting -----------------------------------------------------------------

BINARY = {
    "add": (avalon.add, np.add), "sub": (avalon.sub, np.subtract), "mul": (avalon.mul, np.multiply),
    "div": (avalon.div, np.divide), "maximum": (avalon.maximum, np.maximum),
    "minimum": (avalon.minimum, np.minimum),
}


@SETTINGS
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4),
       op=st.sampled_from(sorted(BINARY)), seed=SEEDS)
def test_binary_broadcasting_matches_numpy(shapes, op, seed):
    (sa, sb), out_shape = shapes.input_shapes, shapes.result_shape
    rng = np.random.default_rng(seed)
    # np.asarray: for shape () the generator returns a Python float, which avalon treats as static
    a = np.asarray(rng.standard_normal(sa))
    b = np.asarray(rng.uniform(0.5, 2.0, sb) * rng.choice([-1.0, 1.0], sb))   # a safe divisor
    fn, np_fn = BINARY[op]
    r = np.asarray(fn(a, b))
    assert r.shape == out_shape and r.dtype == np.float64
    np.testing.assert_allclose(r, np_fn(a, b), rtol=1e-13, atol=0)
    np.testing.assert_allclose(np.asarray(avalon.jit(fn)(a, b)), r, rtol=1e-13, atol=0)

    ct = np.asarray(rng.standard_normal(out_shape))
    _, (ga, gb) = _grad(lambda x, y: avalon.sum(avalon.mul(fn(x, y), ct)), a, b)
    assert np.shape(ga) == sa and np.shape(gb) == sb
    if op in ("add", "sub"):
        sign = 1.0 if op == "add" else -1.0
        np.testing.assert_allclose(ga, unbroadcast(ct, sa), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gb, sign * unbroadcast(ct, sb), rtol=1e-12, atol=1e-12)
        # every cotangent element lands somewhere: the sums match
        np.testing.assert_allclose(np.sum(ga), ct.sum(), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(sign * np.sum(gb), ct.sum(), rtol=1e-10, atol=1e-10)
    elif op == "mul":
        np.testing.assert_allclose(ga, unbroadcast(ct * np.broadcast_to(b, out_shape), sa), rtol=1e-12,
                                   atol=1e-12)
        np.testing.assert_allclose(gb, unbroadcast(ct * np.broadcast_to(a, out_shape), sb), rtol=1e-12,
                                   atol=1e-12)
    elif op == "div":
        bb = np.broadcast_to(b, out_shape)
        np.testing.assert_allclose(ga, unbroadcast(ct / bb, sa), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gb, unbroadcast(-ct * np.broadcast_to(a, out_shape) / bb**2, sb),
                                   rtol=1e-10, atol=1e-12)
    else:  # maximum / minimum: no ties with continuous random values
        pick_a = (np.broadcast_to(a, out_shape) > np.broadcast_to(b, out_shape))
        if op == "minimum":
            pick_a = ~pick_a
        np.testing.assert_allclose(ga, unbroadcast(ct * pick_a, sa), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gb, unbroadcast(ct * ~pick_a, sb), rtol=1e-12, atol=1e-12)


UNARY = {"exp": (avalon.exp, np.exp, np.exp), "tanh": (avalon.tanh, np.tanh, lambda x: 1 - np.tanh(x) ** 2),
         "neg": (avalon.neg, np.negative, lambda x: -np.ones_like(x)),
         "sigmoid": (avalon.sigmoid, lambda x: 1 / (1 + np.exp(-x)),
                     lambda x: np.exp(-x) / (1 + np.exp(-x)) ** 2)}


@SETTINGS
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=5), op=st.sampled_from(sorted(UNARY)),
       seed=SEEDS)
def test_unary_matches_numpy(shape, op, seed):
    x = np.random.default_rng(seed).standard_normal(shape)
    fn, np_fn, d_fn = UNARY[op]
    np.testing.assert_allclose(fn(x), np_fn(x), rtol=1e-12, atol=1e-15)
    _, (g,) = _grad(lambda v: avalon.sum(fn(v)), x)
    np.testing.assert_allclose(g, d_fn(x), rtol=1e-10, atol=1e-15)


# -- reductions ------------------------------------------------------------------------------------

@st.composite
def shape_and_axis(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, max_side=4))
    nd = len(shape)
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        axis = None
    elif kind == "int":
        axis = draw(st.integers(-nd, nd - 1))
    else:
        axis = tuple(draw(st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True)))
    return shape, axis, draw(st.booleans())


REDUCTIONS = {"sum": (avalon.sum, np.sum), "mean": (avalon.mean, np.mean), "max": (avalon.max, np.max),
              "min": (avalon.min, np.min)}


@SETTINGS
@given(sak=shape_and_axis(), op=st.sampled_from(sorted(REDUCTIONS)), seed=SEEDS)
def test_reduction_matches_numpy(sak, op, seed):
    shape, axis, keepdims = sak
    rng = np.random.default_rng(seed)
    # distinct values: no ties for max/min
    x = (rng.permutation(int(np.prod(shape))) * 0.25 - 3.0).reshape(shape)
    fn, np_fn = REDUCTIONS[op]
    want = np_fn(x, axis=axis, keepdims=keepdims)
    got = np.asarray(fn(x, axis, keepdims))
    assert got.shape == np.shape(want)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(avalon.jit(lambda v: fn(v, axis, keepdims))(x)), want,
                               rtol=1e-12, atol=1e-12)

    _, (g,) = _grad(lambda v: avalon.sum(fn(v, axis, keepdims)), x)
    assert g.shape == shape
    n = np.size(x) // max(1, np.size(want))
    if op == "sum":
        np.testing.assert_array_equal(g, np.ones(shape))
    elif op == "mean":
        np.testing.assert_allclose(g, np.full(shape, 1.0 / n), rtol=1e-12)
    else:
        # one-hot at the extreme of each reduced group
        hit = x == np.broadcast_to(np_fn(x, axis=axis, keepdims=True), shape)
        np.testing.assert_array_equal(g, hit.astype(np.float64))
        assert g.sum() == np.size(want)


@SETTINGS
@given(sak=shape_and_axis(), seed=SEEDS)
def test_logsumexp_and_softmax_properties(sak, seed):
    shape, axis, keepdims = sak
    x = np.random.default_rng(seed).standard_normal(shape) * 3
    m = np.max(x, axis=axis, keepdims=True)
    want = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    if not keepdims:
        want = want.reshape(np.sum(x, axis=axis).shape)
    np.testing.assert_allclose(avalon.logsumexp(x, axis, keepdims), want, rtol=1e-12, atol=1e-12)
    # d logsumexp / dx is the softmax over the same axes; it sums to 1 per group
    _, (g,) = _grad(lambda v: avalon.sum(avalon.logsumexp(v, axis, keepdims)), x)
    np.testing.assert_allclose(np.sum(g, axis=axis), 1.0, rtol=1e-12)
    np.testing.assert_allclose(g, np.exp(x - np.broadcast_to(np.reshape(want, np.shape(m)), shape)),
                               rtol=1e-10, atol=1e-14)


# -- shape ops -------------------------------------------------------------------------------------

@st.composite
def shape_and_perm(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=5, max_side=4))
    perm = tuple(draw(st.permutations(range(len(shape)))))
    return shape, perm


@SETTINGS
@given(sp=shape_and_perm(), seed=SEEDS)
def test_transpose_round_trip_and_grad(sp, seed):
    shape, perm = sp
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    y = avalon.transpose(x, perm)
    np.testing.assert_array_equal(y, np.transpose(x, perm))
    inv = tuple(int(i) for i in np.argsort(perm))
    np.testing.assert_array_equal(avalon.transpose(y, inv), x)
    ct = rng.standard_normal(np.shape(y))
    _, (g,) = _grad(lambda v: avalon.sum(avalon.mul(avalon.transpose(v, perm), ct)), x)
    # the gradient is the cotangent transposed by the inverse permutation
    np.testing.assert_array_equal(g, np.transpose(ct, inv))
    np.testing.assert_array_equal(avalon.jit(lambda v: avalon.transpose(avalon.transpose(v, perm), inv))(x), x)


@st.composite
def shape_and_target(draw):
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, max_side=4))
    size = int(np.prod(shape))
    # a target shape with the same size: a random factorization of `size`
    dims, rest = [], size
    for _ in range(draw(st.integers(0, 3))):
        divisors = [d for d in range(1, rest + 1) if rest % d == 0]
        d = draw(st.sampled_from(divisors))
        dims.append(d)
        rest //= d
    dims.append(rest)
    dims = draw(st.permutations(dims))
    if draw(st.booleans()):
        dims = list(dims)
        dims[draw(st.integers(0, len(dims) - 1))] = -1
    return shape, tuple(dims)


@SETTINGS
@given(st_=shape_and_target(), seed=SEEDS)
def test_reshape_round_trip_and_grad(st_, seed):
    shape, target = st_
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.standard_normal(shape))
    want = np.reshape(x, target)
    y = avalon.reshape(x, target)
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(avalon.reshape(y, shape), x)
    ct = np.asarray(rng.standard_normal(want.shape))
    _, (g,) = _grad(lambda v: avalon.sum(avalon.mul(avalon.reshape(v, target), ct)), x)
    np.testing.assert_array_equal(g, ct.reshape(shape))
    f = avalon.jit(lambda v: avalon.reshape(avalon.reshape(v, target), shape))
    np.testing.assert_array_equal(f(x), x)


@SETTINGS
@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=1, min_dims=0, max_dims=3, max_side=4),
       seed=SEEDS)
def test_broadcast_to_grad_is_unbroadcast(shapes, seed):
    (src,), dst = shapes.input_shapes, shapes.result_shape
    dst = (2,) + tuple(dst)   # at least one new leading axis
    rng = np.random.default_rng(seed)
    x = np.asarray(rng.standard_normal(src))
    np.testing.assert_array_equal(avalon.broadcast_to(x, dst), np.broadcast_to(x, dst))
    ct = rng.standard_normal(dst)
    _, (g,) = _grad(lambda v: avalon.sum(avalon.mul(avalon.broadcast_to(v, dst), ct)), x)
    assert np.shape(g) == src
    np.testing.assert_allclose(g, unbroadcast(ct, src), rtol=1e-12, atol=1e-12)
