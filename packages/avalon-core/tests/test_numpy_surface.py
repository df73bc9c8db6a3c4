"""Traced arrays behave exactly like the NumPy arrays they stand in for.

* A keyword NumPy does not take (PyTorch's dim=, keepdim=) raises ArgumentError,
  a TypeError naming the user's line and NumPy's spelling, in traced code
  (methods and np.* functions) and in Avalon's own eager ops alike; it is never
  ignored (x.sum(dim=1) used to sum over every axis).
* NumPy options Avalon does not implement (out=, where=, initial=) raise.
* The methods and np.* functions give NumPy's results, traced and eager.
* PyTorch tensor methods (x.view, x.size(-1), ...) raise TracerAttributeError
  (an AttributeError) naming the NumPy or Avalon spelling.
* Lists of Python numbers and torch tensors passed where arrays belong say
  which argument and how to convert it.
"""
from __future__ import annotations

import numpy as np
import pytest

import avalon
from avalon.errors import ArgumentError, AvalonError, ConcretizationError, TracerAttributeError

RNG = np.random.default_rng(7)
X = RNG.standard_normal((3, 4)).astype(np.float32)
X3 = RNG.standard_normal((2, 3, 4)).astype(np.float32)


def _raises_at_this_file(exc_type, fn, *args):
    """fn(*args) raises exc_type whose message names this file (the user's line)."""
    with pytest.raises(exc_type) as err:
        fn(*args)
    assert __file__ in str(err.value), str(err.value)
    return str(err.value)


# -- 1. unknown keywords raise, with NumPy's spelling -----------------------------------------------

# (id, traced function, hint the message must give)
TRACED_KEYWORDS = [
    ("sum_dim_keepdim", lambda a: a.sum(dim=1, keepdim=True), "dim= -> axis="),
    ("mean_dim", lambda a: a.mean(dim=-1), "dim= -> axis="),
    ("max_dim", lambda a: a.max(dim=1), "dim= -> axis="),
    ("min_dim", lambda a: a.min(dim=0), "dim= -> axis="),
    ("argmax_dim", lambda a: a.argmax(dim=1), "dim= -> axis="),
    ("argmin_keepdim", lambda a: a.argmin(1, keepdim=True), "keepdim= -> keepdims="),
    ("var_unbiased", lambda a: a.var(unbiased=False), "unbiased= -> ddof="),
    ("std_dim", lambda a: a.std(dim=0), "dim= -> axis="),
    ("cumsum_dim", lambda a: a.cumsum(dim=0), "dim= -> axis="),
    ("cumprod_dim", lambda a: a.cumprod(dim=1), "dim= -> axis="),
    ("any_dim", lambda a: (a > 0).any(dim=0), "dim= -> axis="),
    ("all_keepdim", lambda a: (a > 0).all(0, keepdim=True), "keepdim= -> keepdims="),
    ("argsort_descending", lambda a: a.argsort(descending=True), "descending="),
    ("squeeze_dim", lambda a: a.reshape(1, 12).squeeze(dim=0), "dim= -> axis="),
    ("reshape_keyword", lambda a: a.reshape(12, dim=0), "unexpected keyword argument 'dim'"),
    ("clip_lo", lambda a: a.clip(lo=0.0), "lo"),
    ("astype_kw", lambda a: a.astype(np.float64, device="cpu"), "device"),
    # avalon ops inside a trace
    ("avalon_sum_dim", lambda a: avalon.sum(a, dim=1), "dim= -> axis="),
    ("avalon_softmax_dim", lambda a: avalon.softmax(a, dim=-1), "dim= -> axis="),
    ("avalon_topk_dim", lambda a: avalon.topk(a, 2, dim=0)[0], "dim= -> axis="),
    ("avalon_norm_p", lambda a: avalon.norm(a, p=2), "p= -> ord="),
    ("avalon_roll_shifts", lambda a: avalon.roll(a, shifts=1, dims=0), "shifts= -> shift="),
    ("avalon_tril_diagonal", lambda a: avalon.tril(a, diagonal=1), "diagonal= -> k="),
]


@pytest.mark.parametrize("fn, hint", [pytest.param(f, h, id=i) for i, f, h in TRACED_KEYWORDS])
@pytest.mark.parametrize("mode", ["jit", "grad"])
def test_an_unknown_keyword_in_traced_code_raises_with_numpys_spelling(mode, fn, hint):
    run = avalon.jit(fn) if mode == "jit" else (lambda x: avalon.grad(lambda a: avalon.sum(fn(a)), x))
    message = _raises_at_this_file(ArgumentError, run, X)
    assert hint in message, message


def test_sum_with_dim_no_longer_reduces_over_every_axis():
    """The silent wrong answer: x.sum(dim=1, keepdim=True) gave the total, a 0-d array."""
    with pytest.raises(TypeError, match="axis="):
        avalon.jit(lambda a: a.sum(dim=1, keepdim=True))(X)
    got = avalon.jit(lambda a: a.sum(axis=1, keepdims=True))(X)
    np.testing.assert_allclose(got, X.sum(axis=1, keepdims=True), rtol=1e-6)


EAGER_KEYWORDS = [
    ("sum", lambda: avalon.sum(X, dim=1), "dim= -> axis="),
    ("mean", lambda: avalon.mean(X, keepdim=True), "keepdim= -> keepdims="),
    ("max", lambda: avalon.max(X, dim=0), "dim= -> axis="),
    ("argmax", lambda: avalon.argmax(X, dim=0), "dim= -> axis="),
    ("logsumexp", lambda: avalon.logsumexp(X, dim=1), "dim= -> axis="),
    ("log_softmax", lambda: avalon.log_softmax(X, dim=1), "dim= -> axis="),
    ("var", lambda: avalon.var(X, unbiased=True), "unbiased= -> ddof="),
    ("std", lambda: avalon.std(X, dim=1), "dim= -> axis="),
    ("squeeze", lambda: avalon.squeeze(X[None], dim=0), "dim= -> axis="),
    ("expand_dims", lambda: avalon.expand_dims(X, dim=0), "dim= -> axis="),
    ("concatenate", lambda: avalon.concatenate([X, X], dim=0), "dim= -> axis="),
    ("stack", lambda: avalon.stack([X, X], dim=1), "dim= -> axis="),
    ("cumsum", lambda: avalon.cumsum(X, dim=1), "dim= -> axis="),
    ("sort", lambda: avalon.sort(X, dim=0), "dim= -> axis="),
    ("argsort", lambda: avalon.argsort(X, dim=0), "dim= -> axis="),
    ("topk", lambda: avalon.topk(X, 2, dim=1), "dim= -> axis="),
    ("norm", lambda: avalon.norm(X, dim=1), "dim= -> axis="),
    ("flip", lambda: avalon.flip(X, dims=(0,)), "dims= -> axis="),
    ("any", lambda: avalon.any(X, dim=0), "dim= -> axis="),
    ("all", lambda: avalon.all(X, out=None), "out="),
    # no axis= to suggest: the keywords the op takes instead
    ("flatten", lambda: avalon.flatten(X, dim=1), "(keywords taken: start_dim, end_dim)"),
]


@pytest.mark.parametrize("call, hint", [pytest.param(c, h, id=i) for i, c, h in EAGER_KEYWORDS])
def test_an_unknown_keyword_of_an_eager_avalon_op_raises_with_numpys_spelling(call, hint):
    message = _raises_at_this_file(ArgumentError, call)
    assert hint in message, message
    assert isinstance(ArgumentError("x"), TypeError) and isinstance(ArgumentError("x"), AvalonError)


def test_numpy_rejects_an_unknown_keyword_of_an_np_function_before_avalon_sees_it():
    # NumPy's dispatcher checks np.sum's signature itself: a plain TypeError, as for a NumPy array
    with pytest.raises(TypeError, match="dim"):
        avalon.jit(lambda a: np.sum(a, dim=1))(X)


# NumPy options Avalon does not implement raise instead of being ignored
UNSUPPORTED_OPTIONS = [
    ("sum_out", lambda a: a.sum(out=np.zeros(())), "out="),
    ("np_sum_where", lambda a: np.sum(a, where=np.ones((3, 4), bool)), "where="),
    ("np_max_initial", lambda a: np.max(a, initial=0.0), "initial="),
    ("mean_out", lambda a: np.mean(a, 0, None, np.zeros(4)), "out="),
    ("np_add_where", lambda a: np.add(a, 1.0, where=np.ones((3, 4), bool)).sum(), "where="),
    ("np_exp_dtype", lambda a: np.exp(a, dtype=np.float64).sum(), "dtype="),
    ("var_mean", lambda a: np.var(a, mean=np.zeros((3, 1))), "mean="),
    ("np_sort_order", lambda a: np.sort(a, order="f"), "order="),
    ("np_dot_3d", lambda a: np.dot(a, np.ones((2, 4, 3), np.float32)).sum(), "np.dot"),
    ("reshape_fortran", lambda a: a.reshape(4, 3, order="F").sum(), "order="),
]


@pytest.mark.parametrize("fn, what", [pytest.param(f, w, id=i) for i, f, w in UNSUPPORTED_OPTIONS])
def test_numpy_options_avalon_does_not_implement_raise(fn, what):
    with pytest.raises(AvalonError) as err:
        avalon.jit(fn)(X)
    assert what in str(err.value) and __file__ in str(err.value), str(err.value)


# -- 2. the methods and np.* functions give NumPy's results, traced and eager -------------------------

# (id, function of a NumPy or traced array): run on X by NumPy and by avalon.jit
NUMPY_CALLS = [
    ("sum_axis_kd", lambda a: a.sum(axis=1, keepdims=True)),
    ("sum_dtype", lambda a: a.sum(0, np.float64)),
    ("np_sum_kw", lambda a: np.sum(a, axis=(0, 1), keepdims=True)),
    ("mean_dtype", lambda a: a.mean(axis=0, dtype=np.float64)),
    ("np_amax", lambda a: np.amax(a, axis=-1)),
    ("min_kd", lambda a: a.min(axis=0, keepdims=True)),
    ("argmax_kd", lambda a: a.argmax(axis=1, keepdims=True)),
    ("np_argmin", lambda a: np.argmin(a, axis=0)),
    ("var_ddof", lambda a: a.var(axis=1, ddof=1)),
    ("np_var_kd", lambda a: np.var(a, axis=0, keepdims=True)),
    ("std", lambda a: a.std()),
    ("np_std_ddof_kd", lambda a: np.std(a, 1, ddof=1, keepdims=True)),
    ("cumsum_none", lambda a: a.cumsum()),
    ("np_cumsum_ax1", lambda a: np.cumsum(a, axis=1)),
    ("cumprod_ax0", lambda a: a.cumprod(axis=0)),
    ("np_cumprod_dtype", lambda a: np.cumprod(a, 1, dtype=np.float64)),
    ("argsort", lambda a: a.argsort(axis=0)),
    ("np_argsort_stable", lambda a: np.argsort(a, kind="stable")),
    ("np_sort_none", lambda a: np.sort(a, axis=None)),
    ("np_sort_ax0", lambda a: np.sort(a, 0)),
    ("any", lambda a: (a > 1).any(axis=0)),
    ("np_all_kd", lambda a: np.all(a > -1, axis=1, keepdims=True)),
    ("np_any_float", lambda a: np.any(a)),
    ("np_flip", lambda a: np.flip(a, 1)),
    ("np_flip_all", lambda a: np.flip(a)),
    ("np_roll", lambda a: np.roll(a, -1, axis=0)),
    ("np_roll_flat", lambda a: np.roll(a, 5)),
    ("np_tril", lambda a: np.tril(a, -1)),
    ("np_triu", lambda a: np.triu(a, k=2)),
    ("norm", lambda a: np.linalg.norm(a)),
    ("norm_fro", lambda a: np.linalg.norm(a, "fro")),
    ("norm_1", lambda a: np.linalg.norm(a, 1)),
    ("norm_inf", lambda a: np.linalg.norm(a, np.inf)),
    ("norm_vec_ord3", lambda a: np.linalg.norm(a, ord=3, axis=1)),
    ("norm_vec_0_kd", lambda a: np.linalg.norm(a, 0, axis=0, keepdims=True)),
    ("norm_vec_neginf", lambda a: np.linalg.norm(a, -np.inf, 1)),
    ("np_clip", lambda a: np.clip(a, -0.5, 0.5)),
    ("clip_method", lambda a: a.clip(min=0.0)),
    ("np_dot_2d", lambda a: np.dot(a, a.T)),
    ("np_dot_scalar", lambda a: np.dot(a, np.float32(2.0))),
    ("astype_safe", lambda a: a.astype(np.float64, casting="safe")),
    ("np_transpose_axes", lambda a: np.transpose(a, axes=(1, 0))),
    ("np_expand_dims", lambda a: np.expand_dims(a, axis=0)),
    ("np_swapaxes", lambda a: np.swapaxes(a, 0, 1)),
    ("np_reshape_newshape", lambda a: np.reshape(a, (4, 3))),
    ("ravel", lambda a: a.ravel()),
]


@pytest.mark.parametrize("fn", [pytest.param(f, id=i) for i, f in NUMPY_CALLS])
def test_traced_methods_and_np_functions_give_numpys_results(fn):
    want = fn(X.copy())
    got = np.asarray(avalon.jit(fn)(X))
    assert got.shape == np.shape(want), (got.shape, np.shape(want))
    if np.asarray(want).dtype.kind == "f":
        assert got.dtype == np.asarray(want).dtype, (got.dtype, np.asarray(want).dtype)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)


# (id, avalon op, NumPy reference): eager avalon ops on NumPy arrays equal NumPy's
EAGER_VS_NUMPY = [
    ("sort_ties_stable", lambda a: avalon.argsort(np.round(a)), lambda a: np.argsort(np.round(a), kind="stable")),
    ("cumprod_int", lambda a: avalon.cumprod((a * 2).astype(np.int32), 1),
     lambda a: np.cumprod((a * 2).astype(np.int32), 1)),
    ("cumsum_bool", lambda a: avalon.cumsum(a > 0), lambda a: np.cumsum(a > 0)),
    ("roll_tuple", lambda a: avalon.roll(a, (1, -2), (0, 1)), lambda a: np.roll(a, (1, -2), (0, 1))),
    ("roll_two_shifts_one_axis", lambda a: avalon.roll(a, (1, 2), 1), lambda a: np.roll(a, (1, 2), 1)),
    ("tril_batch", lambda a: avalon.tril(np.stack([a, -a]), 1), lambda a: np.tril(np.stack([a, -a]), 1)),
    ("triu_bool", lambda a: avalon.triu(a > 0, -1), lambda a: np.triu(a > 0, -1)),
    ("flip_tuple", lambda a: avalon.flip(a, (0, 1)), lambda a: np.flip(a, (0, 1))),
    ("norm_neg1_matrix", lambda a: avalon.norm(a, -1), lambda a: np.linalg.norm(a, -1)),
    ("norm_neginf_matrix_axes", lambda a: avalon.norm(np.stack([a, a]), -np.inf, (2, 1)),
     lambda a: np.linalg.norm(np.stack([a, a]), -np.inf, (2, 1))),
    ("norm_p_half", lambda a: avalon.norm(a, 0.5, 1), lambda a: np.linalg.norm(a, 0.5, 1)),
    ("std_correction", lambda a: avalon.std(a, 0, correction=1), lambda a: np.std(a, 0, ddof=1)),
    ("any_empty", lambda a: avalon.any(a[:0], 0), lambda a: np.any(a[:0], 0)),
    ("all_empty", lambda a: avalon.all(a[:0]), lambda a: np.all(a[:0])),
    ("all_nan", lambda a: avalon.all(np.full(3, np.nan)), lambda a: np.all(np.full(3, np.nan))),
]


@pytest.mark.parametrize("ours, numpys", [pytest.param(o, n, id=i) for i, o, n in EAGER_VS_NUMPY])
def test_eager_ops_equal_numpy(ours, numpys):
    got, want = np.asarray(ours(X)), np.asarray(numpys(X))
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    np.testing.assert_allclose(got, want, rtol=2e-6)


@pytest.mark.parametrize("bad, match", [
    (lambda: avalon.topk(X, 5), r"k=5 must be an integer in \[0, 4\]"),
    (lambda: avalon.norm(X, "nuc"), "singular values"),
    (lambda: avalon.norm(X, 2), "singular values"),
    (lambda: avalon.norm(X, "fro", axis=1), "matrix norm"),
    (lambda: avalon.norm(X3, 1), "1-d or 2-d"),
    (lambda: avalon.tril(X[0]), "at least 2 dimensions"),
    (lambda: avalon.var(X, ddof=1, correction=1), "not both"),
    (lambda: avalon.sort(X, kind="bogosort"), "sorting kind"),
    (lambda: avalon.roll(X, 1.5, 0), "shift=1.5 must be an integer"),
])
def test_what_the_new_ops_cannot_do_raises_clearly(bad, match):
    with pytest.raises(AvalonError, match=match) as err:
        bad()
    assert __file__ in str(err.value), str(err.value)


def test_the_new_methods_need_no_numpy_dispatch_to_trace_and_differentiate():
    def loss(a):
        return (a.cumsum(axis=1).std(axis=0, ddof=1).sum() + np.linalg.norm(np.tril(a))
                + np.sort(a, axis=0)[-1].sum() + np.roll(np.flip(a, 0), 1, axis=1)[0, 0])
    value, (g,) = avalon.grad(loss, X.astype(np.float64))
    np.testing.assert_allclose(value, loss(X.astype(np.float64)), rtol=1e-12)
    assert g.shape == X.shape and np.all(np.isfinite(g))


# -- 3. PyTorch habits on traced arrays --------------------------------------------------------------

TORCH_HABITS = [
    ("view", lambda a: a.view(12), "x.reshape("),
    ("view_as", lambda a: a.view_as(a), "x.reshape(other.shape)"),
    ("dim", lambda a: a.dim(), "x.ndim"),
    ("numel", lambda a: a.numel(), "x.size"),
    ("permute", lambda a: a.permute(1, 0), "x.transpose(*axes)"),
    ("unsqueeze", lambda a: a.unsqueeze(0), "expand_dims"),
    ("contiguous", lambda a: a.contiguous(), "drop the call"),
    ("float", lambda a: a.float(), "astype(np.float32)"),
    ("long", lambda a: a.long(), "astype(np.int64)"),
    ("detach", lambda a: a.detach(), "avalon.stop_gradient"),
    ("to", lambda a: a.to("cpu"), "astype"),
    ("expand", lambda a: a.expand(2, 3, 4), "broadcast_to"),
    ("masked_fill", lambda a: a.masked_fill(a > 0, 0.0), "avalon.where"),
    ("numpy", lambda a: a.numpy(), "return x"),
    ("backward", lambda a: a.backward(), "avalon.grad"),
    ("in_place_add_", lambda a: a.add_(1.0), "immutable"),
    ("unknown", lambda a: a.frobnicate(), "NumPy's array attributes"),
]


@pytest.mark.parametrize("fn, hint", [pytest.param(f, h, id=i) for i, f, h in TORCH_HABITS])
def test_a_torch_tensor_method_on_a_traced_array_names_the_numpy_spelling(fn, hint):
    message = _raises_at_this_file(TracerAttributeError, avalon.jit(fn), X)
    assert hint in message, message
    assert issubclass(TracerAttributeError, AttributeError)


@pytest.mark.parametrize("fn, exc, hint", [
    (lambda a: a.size(-1), ArgumentError, "x.shape[-1]"),
    (lambda a: a.size(), ArgumentError, "x.shape"),
    (lambda a: a.transpose(0, 1), AvalonError, "swapaxes"),
    (lambda a: a.flatten(1), ArgumentError, "avalon.flatten(x, start_dim)"),
    (lambda a: a.sort(), ArgumentError, "np.sort(x, axis)"),
    (lambda a: a.item(), ConcretizationError, ".item()"),
])
def test_torch_spellings_of_numpy_methods_raise_with_the_numpy_spelling(fn, exc, hint):
    message = _raises_at_this_file(exc, avalon.jit(fn), X3)
    assert hint in message, message


def test_numpy_attributes_of_a_traced_array_are_unchanged():
    def f(a):
        assert a.size == 12 and isinstance(a.size, int) and a.size * 2 == 24 and repr(a.size) == "12"
        assert not hasattr(a, "view") and hasattr(a, "reshape")
        return a.reshape(a.size)
    np.testing.assert_array_equal(avalon.jit(f)(X), X.reshape(12))


# -- 4. lists and torch tensors where arrays belong ---------------------------------------------------

def test_a_list_of_numbers_given_to_jit_is_named_when_the_function_fails_on_it():
    with pytest.raises(AttributeError, match="'list' object has no attribute 'sum'") as err:
        avalon.jit(lambda x, data: x + data.sum())(X, [1.0, 2.0])
    notes = " ".join(getattr(err.value, "__notes__", []))
    assert "args[1] is a list of 2 Python numbers" in notes and "np.asarray(values, dtype=np.float32)" in notes


def test_a_nested_list_of_numbers_given_to_grad_is_named_with_its_path():
    with pytest.raises(AvalonError) as err:   # (x * list: no backend holds a list)
        avalon.grad(lambda x, batch: (x * batch["y"]).sum(), X, {"y": [[1.0, 2.0], [3.0, 4.0]]})
    notes = " ".join(getattr(err.value, "__notes__", []))
    assert "args[1]['y'] is a list of 2 Python sequences" in notes, notes


def test_a_tuple_of_ints_is_taken_for_a_shape_not_for_data():
    with pytest.raises(AttributeError) as err:
        avalon.jit(lambda x, shape, scale: x.reshape(shape).view(3, 4) * scale[0])(X, (4, 3), (0.5,))
    notes = " ".join(getattr(err.value, "__notes__", []))
    assert "args[1]" not in notes and "args[2] is a tuple of 1 Python number" in notes, notes


def test_grad_of_a_list_of_numbers_names_the_argument():
    with pytest.raises(AvalonError, match=r"nothing to differentiate.*\(args\[0\] is a list of 3 Python numbers\)"):
        avalon.grad(lambda xs, y: sum(v * v for v in xs) + y.sum(), [1.0, 2.0, 3.0], X, argnums=0)


def test_an_eager_op_given_a_list_says_how_to_convert_it():
    message = _raises_at_this_file(AvalonError, avalon.sum, [1.0, 2.0])
    assert "sum: x is a Python list, not an array" in message and "np.asarray(x, dtype=np.float32)" in message
    assert isinstance(pytest.raises(TypeError, avalon.cumsum, (1.0, 2.0)).value, AvalonError)


def test_a_torch_tensor_given_to_grad_or_jit_names_its_path_and_the_conversion():
    torch = pytest.importorskip("torch")
    message = _raises_at_this_file(TypeError, lambda: avalon.jit(lambda p: p["layer"][1] * 2.0)(
        {"layer": [X, torch.ones(3)]}))
    assert "args[0]['layer'][1] is a torch.Tensor" in message and ".numpy()" in message
