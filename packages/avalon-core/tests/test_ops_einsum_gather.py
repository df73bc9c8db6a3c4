"""einsum, repeat, tile, torch's index ops (gather, index_select, scatter_add,
masked_fill), the bounds check of their indices (check_index), and constants
of static shape (arange, full, *_like).  The primitive table
(avalon.testing.cases) checks each against NumPy/PyTorch and finite
differences; here: how they lower, NumPy's functions and methods on traced
arrays against NumPy on concrete ones, traced against eager, and the errors."""
import re

import numpy as np
import pytest

import avalon
from avalon import ConcretizationError, DtypeError, ShapeError
from avalon import parallel
from avalon.errors import AvalonError

torch = pytest.importorskip("torch")

HERE = re.escape(__file__.rsplit("/", 1)[-1])


def _rng(seed=0):
    return np.random.default_rng(seed)


def _ops(fn, *args):
    return [n.op for n in avalon.trace(fn, *args).nodes]


# -- einsum ------------------------------------------------------------------------------------

EINSUMS = [("ij,jk->ik", [(3, 4), (4, 5)]), ("ij,jk", [(3, 4), (4, 5)]), ("bij,bjk->bki", [(2, 3, 4), (2, 4, 5)]),
           ("ii->i", [(3, 3)]), ("ii", [(3, 3)]), ("iji->ij", [(2, 3, 2)]), ("ij->", [(3, 4)]),
           ("bA", [(2, 3)]), ("i,j->ij", [(3,), (4,)]), ("i,i->i", [(1,), (3,)]), (",ij->ij", [(), (2, 3)]),
           ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 2)]), ("i...->...", [(3,)]), ("...i->i", [(3,)]),
           ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]), ("abc,cd,bd->ad", [(2, 3, 4), (4, 5), (3, 5)]),
           ("ijk,ikj->i", [(2, 3, 4), (2, 4, 3)]), ("ij,kl->", [(2, 3), (4, 5)]),
           (" i j , j k -> i k ", [(2, 3), (3, 1)])]


@pytest.mark.parametrize("spec,shapes", EINSUMS, ids=[s.replace(" ", "_") for s, _ in EINSUMS])
def test_einsum_eager_jit_and_np_on_tracers_match_numpy(spec, shapes):
    xs = [_rng().standard_normal(s) for s in shapes]
    want = np.einsum(spec, *xs)
    for got in (avalon.einsum(spec, *xs), avalon.jit(lambda *a: avalon.einsum(spec, *a))(*xs),
                avalon.jit(lambda *a: np.einsum(spec, *a))(*xs)):
        assert np.shape(got) == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_einsum_lowers_to_one_matmul_per_contraction():
    a, b, c = (np.ones(s, np.float32) for s in ((2, 3, 4), (2, 4, 5), (5, 6)))
    assert _ops(lambda a, b: avalon.einsum("bij,bjk->bik", a, b), a, b).count("matmul") == 1
    ops = _ops(lambda a, b, c: avalon.einsum("bij,bjk,kl->bil", a, b, c), a, b, c)
    assert ops.count("matmul") == 2 and "einsum" not in ops
    # no contraction: a broadcast product, no matmul
    assert "matmul" not in _ops(lambda a: avalon.einsum("bij,bij->bij", a, a), a)


def test_einsum_gradient_matches_torch_for_a_chain():
    xs = [_rng(k).standard_normal(s).astype(np.float32) for k, s in enumerate(((2, 3, 4), (4, 5), (2, 5)))]
    spec = "bij,jk,bk->bi"
    _, grads = avalon.grad(lambda a, b, c: avalon.sum(avalon.einsum(spec, a, b, c) ** 2), *xs)
    ts = [torch.tensor(x, requires_grad=True) for x in xs]
    (torch.einsum(spec, *ts) ** 2).sum().backward()
    for g, t in zip(grads, ts):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda a, b: avalon.einsum("ij,jk", a), "names 2 operands, but 1 were given"),
    (lambda a, b: avalon.einsum("ij,j1", a, b), "holds '1'"),
    (lambda a, b: avalon.einsum("ijk,jk", a, b), "3 subscripts for an array with 2 axes"),
    (lambda a, b: avalon.einsum("ij,kj", a, b), "subscript 'j' has size 3 in an earlier operand and 4 in operand 1"),
    (lambda a, b: avalon.einsum("ij,jk->iz", a, a.T), "output subscript 'z' appears in no operand"),
    (lambda a, b: avalon.einsum("ij->ii", a), "repeats a subscript"),
    (lambda a, b: avalon.einsum("i..j", a), "stray '.'"),
    (lambda a, b: avalon.einsum("...j->j", np.ones((2, 3))), "no '...' to keep them"),
    (lambda a, b: avalon.einsum("ii->i", a), "repeated in operand 0 over axes of sizes 2 and 3"),
])
def test_einsum_errors_name_the_problem_and_the_line(call, message):
    a, b = np.ones((2, 3)), np.ones((4, 4))
    with pytest.raises(ShapeError, match=re.escape(message) + f".*{HERE}"):
        call(a, b)


def test_einsum_refuses_what_it_does_not_do():
    a = np.ones((2, 2))
    with pytest.raises(AvalonError, match="subscripts-string form"):
        avalon.einsum(a, [0, 1], a, [1, 2])
    with pytest.raises(AvalonError, match="out="):
        avalon.einsum("ij->ji", a, out=np.empty((2, 2)))
    assert avalon.einsum("ij,jk", a, a, optimize=True).shape == (2, 2)
    assert avalon.einsum("ij,jk", a.astype(np.float32), a.astype(np.float32), dtype="float64").dtype == np.float64


# -- repeat, tile --------------------------------------------------------------------------------

X = np.arange(24.0).reshape(2, 3, 4)


@pytest.mark.parametrize("args", [(2,), (2, 1), (2, -1), ([1, 0, 2], 1), ([3], 0), (0, 2), (1, None), ([1, 2], 0)],
                         ids=str)
def test_repeat_matches_numpy_eager_traced_and_as_method(args):
    want = np.repeat(X, *args)
    for got in (avalon.repeat(X, *args), avalon.jit(lambda a: avalon.repeat(a, *args))(X),
                avalon.jit(lambda a: np.repeat(a, *args))(X), avalon.jit(lambda a: a.repeat(*args))(X)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("reps", [2, (2, 1), (1, 2, 1, 3), (3, 1, 1), 1, (0, 2)], ids=str)
def test_tile_matches_numpy_eager_and_traced(reps):
    want = np.tile(X, reps)
    for got in (avalon.tile(X, reps), avalon.jit(lambda a: avalon.tile(a, reps))(X),
                avalon.jit(lambda a: np.tile(a, reps))(X)):
        np.testing.assert_array_equal(got, want)


def test_repeat_and_tile_lower_to_views_not_gathers():
    assert "getitem" not in _ops(lambda a: avalon.repeat(a, 3, axis=1), X)
    assert "getitem" not in _ops(lambda a: avalon.tile(a, (2, 1, 3)), X)
    assert "getitem" in _ops(lambda a: avalon.repeat(a, [1, 2, 0], axis=1), X)  # per-element counts


def test_repeat_and_tile_errors():
    with pytest.raises(ConcretizationError, match=f"repeat: repeats is being traced.*{HERE}"):
        avalon.jit(lambda a, r: avalon.repeat(a, r))(X, np.array([1, 2]))
    with pytest.raises(ShapeError, match=f"repeat: 2 repeat counts for an axis of size 3.*{HERE}"):
        avalon.repeat(X, [1, 2], axis=1)
    with pytest.raises(ShapeError, match="non-negative int"):
        avalon.repeat(X, -1)
    with pytest.raises(ShapeError, match="tile: reps must be a non-negative int"):
        avalon.tile(X, (2, -1))


# -- gather, index_select, take, scatter_add ------------------------------------------------------

def test_integer_index_inputs_get_no_gradient():
    x, src = _rng().standard_normal((3, 4)), _rng(1).standard_normal((2, 4))
    idx = np.array([[0, 2, 1, 1], [2, 2, 0, 1]])
    for f in (lambda x, s, i: avalon.sum(avalon.gather(x, 0, i) * s),
              lambda x, s, i: avalon.sum(avalon.scatter_add(x, 0, i, s) ** 2),
              lambda x, s, i: avalon.sum(avalon.index_select(x, 1, i[0]) ** 2) + avalon.sum(s)):
        _, grads = avalon.grad(f, x, src, idx)
        assert grads[2] is None and grads[0].shape == x.shape and grads[1].shape == src.shape


def test_scatter_add_is_out_of_place_and_sums_repeats():
    x = np.zeros((2, 3))
    got = avalon.scatter_add(x, 1, np.array([[0, 0, 2], [1, 1, 1]]), np.ones((2, 3)))
    np.testing.assert_array_equal(got, [[2, 0, 1], [0, 3, 0]])
    np.testing.assert_array_equal(x, 0)


def test_scatter_add_with_a_small_index_matches_torch_forward_and_finite_differences():
    # index smaller than input (outside dim) and than src: only src[:2, :3] is read
    rng = _rng(3)
    x, src, idx = rng.standard_normal((3, 5)), rng.standard_normal((4, 4)), rng.integers(0, 5, (2, 3))
    want = torch.scatter_add(torch.tensor(x), 1, torch.tensor(idx), torch.tensor(src)).numpy()
    np.testing.assert_allclose(avalon.scatter_add(x, 1, idx, src), want)
    np.testing.assert_allclose(avalon.jit(lambda x, i, s: avalon.scatter_add(x, 1, i, s))(x, idx, src), want)
    _, (gx, _, gs) = avalon.grad(lambda x, i, s: avalon.sum(avalon.scatter_add(x, 1, i, s) ** 2), x, idx, src)
    out = want
    np.testing.assert_allclose(gx, 2 * out)
    expect = np.zeros_like(src)
    expect[:2, :3] = np.take_along_axis(2 * out[:2], idx, axis=1)
    np.testing.assert_allclose(gs, expect)


def test_np_take_and_take_method_on_tracers():
    i = np.array([[0, 5], [11, -1]])
    f = avalon.jit(lambda x, i: (np.take(x, i), x.take(i, axis=None), np.take(x, np.array([2, 0]), axis=0)))
    a, b, c = f(X[0], i)
    np.testing.assert_array_equal(a, np.take(X[0], i))
    np.testing.assert_array_equal(b, np.take(X[0], i))
    np.testing.assert_array_equal(c, np.take(X[0], [2, 0], axis=0))
    with pytest.raises(AvalonError, match="mode='clip' are not supported"):
        avalon.jit(lambda x: np.take(x, np.array([0]), mode="clip"))(X)


BAD_INDEX_CALLS = {
    "gather_negative": (lambda x, i: avalon.gather(x, 0, i), np.array([[0, -1, 0, 0]]),
                        r"gather: index -1 is out of range for dimension 0 with size 3 \(valid: 0..2\); "
                        r"found at index\[0, 1\]"),
    "gather_too_large": (lambda x, i: avalon.gather(x, 1, i), np.array([[0], [4], [9]]),
                         r"gather: index 4 is out of range for dimension 1 with size 4 .*index\[1, 0\] "
                         r"and 1 more out-of-range index"),
    "index_select": (lambda x, i: avalon.index_select(x, 1, i), np.array([0, 4]),
                     r"index_select: index 4 is out of range for dimension 1 with size 4"),
    "scatter_add": (lambda x, i: avalon.scatter_add(x, 0, i, x[:1]), np.array([[3, 0, 0, 0]]),
                    r"scatter_add: index 3 is out of range for dimension 0 with size 3"),
    "take": (lambda x, i: avalon.take(x, i), np.array([1, -13]),
             r"take: index -13 is out of range for dimension 0 with size 12 \(valid: -12..11\)"),
}


@pytest.mark.parametrize("name", sorted(BAD_INDEX_CALLS))
@pytest.mark.parametrize("mode", ["eager", "jit", "grad"])
def test_out_of_range_indices_raise_naming_op_index_position_and_line(name, mode):
    fn, idx, message = BAD_INDEX_CALLS[name]
    x = np.arange(12.0).reshape(3, 4)
    before = x.copy()
    with pytest.raises(ShapeError, match=message + f".*{HERE}"):
        if mode == "eager":
            fn(x, idx)
        elif mode == "jit":
            avalon.jit(fn)(x, idx)
        else:
            avalon.grad(lambda x, i: avalon.sum(fn(x, i)), x, idx)
    np.testing.assert_array_equal(x, before)


def test_compiled_bounds_check_runs_on_every_call():
    f = avalon.jit(lambda x, i: avalon.gather(x, 1, i))
    x = np.ones((2, 3))
    f(x, np.array([[0], [2]]))
    with pytest.raises(ShapeError, match="index 3 is out of range"):
        f(x, np.array([[0], [3]]))


def test_index_op_shape_and_dtype_errors():
    x = np.ones((3, 4))
    with pytest.raises(ShapeError, match="index_select: index must be 1-D"):
        avalon.index_select(x, 0, np.zeros((1, 1), np.int64))
    with pytest.raises(DtypeError, match="index arrays must have an integer dtype"):
        avalon.index_select(x, 0, np.array([0.0]))
    with pytest.raises(DtypeError, match=r"scatter_add: src \(float32\) and input \(float64\)"):
        avalon.scatter_add(x, 0, np.zeros((1, 4), np.int64), np.ones((1, 4), np.float32))
    with pytest.raises(ShapeError, match="scatter_add: index of shape \\(1, 5\\) is larger"):
        avalon.scatter_add(x, 0, np.zeros((1, 5), np.int64), np.ones((1, 5)))
    with pytest.raises(ShapeError, match="same number of dimensions"):
        avalon.scatter_add(x, 0, np.zeros((4,), np.int64), np.ones((4,)))


def test_index_select_of_a_0d_index_keeps_the_axis_as_torch():
    x = np.arange(6.0).reshape(3, 2)
    got = avalon.index_select(x, 0, np.array(1))
    np.testing.assert_array_equal(got, torch.index_select(torch.tensor(x), 0, torch.tensor(1)).numpy())


# -- masked_fill -----------------------------------------------------------------------------------

def test_masked_fill_gradient_to_a_traced_value_matches_torch():
    x, v = _rng().standard_normal((3, 4)).astype(np.float32), np.array(0.5, np.float32)
    m = _rng(1).random((1, 4)) < 0.5
    _, (gx, gv) = avalon.grad(lambda x, v: avalon.sum(avalon.masked_fill(x, m, v) ** 2), x, v)
    tx, tv = torch.tensor(x, requires_grad=True), torch.tensor(v, requires_grad=True)
    (tx.masked_fill(torch.tensor(m), tv) ** 2).sum().backward()
    np.testing.assert_allclose(gx, tx.grad.numpy())
    np.testing.assert_allclose(gv, tv.grad.numpy(), rtol=1e-6)


def test_masked_fill_errors():
    x = np.ones((2, 3))
    with pytest.raises(DtypeError, match=f"masked_fill: mask must be a boolean array, got int64.*{HERE}"):
        avalon.masked_fill(x, np.ones((2, 3), np.int64), 0.0)
    with pytest.raises(ShapeError, match="value must be a number or a 0-d array"):
        avalon.masked_fill(x, x > 0, np.ones(3))
    with pytest.raises(ShapeError, match="cannot be broadcast"):
        avalon.masked_fill(x, np.ones((4,), bool), 0.0)


# -- arange, full and the *_like fills ------------------------------------------------------------

@pytest.mark.parametrize("args,kwargs,dtype", [((5,), {}, np.int64), ((2, 11, 3), {}, np.int64),
                                               ((1, 2, 0.25), {}, np.float32), ((3.0,), {}, np.float32),
                                               ((4,), {"dtype": "float64"}, np.float64),
                                               ((5, 1, -2), {}, np.int64)], ids=str)
def test_arange_eager_and_traced(args, kwargs, dtype):
    want = np.arange(*args, **kwargs).astype(dtype)
    got = avalon.arange(*args, **kwargs)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)
    x = np.zeros(want.shape, dtype)
    traced = avalon.jit(lambda x: x + avalon.arange(*args, **kwargs))(x)
    np.testing.assert_array_equal(traced, want)
    assert "const" in _ops(lambda x: avalon.arange(*args, **kwargs), x)


def test_np_arange_like_a_traced_array_is_a_constant_of_its_trace():
    f = avalon.jit(lambda x: x + np.arange(0.0, 1.5, 0.5, like=x))
    np.testing.assert_array_equal(f(np.ones(3, np.float32)), [1.0, 1.5, 2.0])


def test_arange_errors():
    with pytest.raises(ShapeError, match=f"arange: step must not be zero.*{HERE}"):
        avalon.arange(0, 3, 0)
    with pytest.raises(ConcretizationError, match="arange: a bound is being traced"):
        avalon.jit(lambda n: avalon.arange(n))(np.array(3))


def test_full_takes_numpy_dtypes_and_a_traced_fill():
    assert avalon.full((2,), 3).dtype == np.int64
    assert avalon.full((2,), 1.5).dtype == np.float32   # Avalon's default float
    assert avalon.full((2,), True).dtype == np.bool_
    assert avalon.full((2,), np.float64(2)).dtype == np.float64
    np.testing.assert_array_equal(avalon.full((2, 2), 7, "float32"), np.full((2, 2), 7, np.float32))
    np.testing.assert_array_equal(avalon.full((2, 3), np.array([1.0, 2.0, 3.0])), np.full((2, 3), [1.0, 2.0, 3.0]))
    _, (g,) = avalon.grad(lambda s: avalon.sum(avalon.full((3, 2), s) * 2.0), np.array(1.0))
    assert g == 12.0


@pytest.mark.parametrize("np_fn,av_fn,args", [(np.zeros_like, avalon.zeros_like, ()),
                                              (np.ones_like, avalon.ones_like, ()),
                                              (np.full_like, avalon.full_like, (2.5,)),
                                              (np.empty_like, None, ())], ids=lambda v: getattr(v, "__name__", ""))
def test_like_fills_eager_traced_and_through_numpy(np_fn, av_fn, args):
    x = _rng().standard_normal((2, 3)).astype(np.float32)
    want = np_fn(x, *args) if np_fn is not np.empty_like else np.zeros_like(x)
    results = [avalon.jit(lambda a: np_fn(a, *args))(x)]
    if av_fn is not None:
        results += [av_fn(x, *args), avalon.jit(lambda a: av_fn(a, *args))(x)]
    for got in results:
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    # no gradient flows through a fill
    _, (g,) = avalon.grad(lambda a: avalon.sum(a + np_fn(a, *args) * 3.0), x)
    np.testing.assert_array_equal(g, np.ones_like(x))


def test_like_fills_take_dtype_and_shape():
    x = np.ones((2, 3), np.float32)
    assert avalon.zeros_like(x, dtype="int64").dtype == np.int64
    assert avalon.full_like(x, 1, shape=(4,)).shape == (4,)
    got = avalon.jit(lambda a: np.full_like(a, 7, dtype=np.int32, shape=(3, 1)))(x)
    assert got.dtype == np.int32 and got.shape == (3, 1)
    with pytest.raises(AvalonError, match="order='F'"):
        avalon.zeros_like(x, order="F")


def test_exports():
    for name in ("einsum", "repeat", "tile", "gather", "index_select", "scatter_add", "masked_fill", "take",
                 "check_index", "arange", "full", "zeros", "ones", "full_like", "zeros_like", "ones_like"):
        assert callable(getattr(avalon, name)), name
        assert name in avalon.ops.__all__, name


# -- the bounds check in a step split across the engine's threads ---------------------------------

def _mean_picked(m, x, y):
    logp = avalon.log_softmax(x @ m["w"])
    return -avalon.mean(avalon.gather(logp, 1, avalon.expand_dims(y, 1)))


@pytest.mark.skipif(parallel.shard_count() < 2, reason="the engine runs one thread here")
def test_a_step_split_across_threads_checks_its_indices():
    rng = _rng(5)
    m = {"w": rng.standard_normal((128, 100)).astype(np.float32) * 0.1}
    x = rng.standard_normal((2048, 128)).astype(np.float32)
    y = rng.integers(0, 100, 2048)
    step = avalon.GradFunction(_mean_picked, argnums=0)
    whole = avalon.GradFunction(_mean_picked, argnums=0, parallel=False)
    loss, _ = step(m, x, y)
    compiled = step._last().compiled
    first = compiled.candidates[0][1] if isinstance(compiled, parallel.Autotuned) else compiled
    assert isinstance(first, parallel.ShardedFunction), "the check must not keep the step whole"
    np.testing.assert_allclose(loss, whole(m, x, y)[0], rtol=1e-6)
    y_bad = y.copy()
    y_bad[1500] = 100  # in the second thread's share
    with pytest.raises(ShapeError, match=r"gather: index 100 is out of range for dimension 1 with size 100 .*"
                                         r"found at index\[476, 0\] \(a position within one thread's share"):
        step(m, x, y_bad)
