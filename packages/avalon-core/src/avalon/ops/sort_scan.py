"""Ops along one axis whose outputs depend on the order of that axis: the
scans cumsum and cumprod, and argsort with sort and topk built on it.

Primitives (one registration block each): `cumsum` (its VJP is the reversed
cumsum, an attribute of the same primitive), `cumprod` with the backward helper
`cumprod_grad` (exact also where the input holds zeros, as torch: no division
by the input), and `argsort` (the first k indices of a stable sort, so ties
keep their order; the descending order used by topk keeps ties in order too).
sort and topk gather with take_along_axis at argsort's indices, so their
gradients flow to the positions the values came from.  Each shards along any
axis but its own, and batches (avalon.vmap) with its axis moved past the batch's.
"""
from __future__ import annotations

from collections import namedtuple

import numpy as np

from ..errors import ArgumentError, ShapeError, at, user_location
from ..primitive import bind, defprim
from ._batching import shifted_axis_rule
from ._rules import normalize_axes
from ._sharding import P, NoSplit, on_sharded

__all__ = ["cumsum", "cumprod", "argsort", "sort", "topk"]


def _scan_dtype(dtype):
    """As NumPy's cumsum/cumprod (and sum): bools and narrow ints accumulate in int64."""
    dt = np.dtype(dtype)
    return np.dtype(np.int64) if dt.kind in "biu" and (dt.kind == "b" or dt.itemsize < 8) else dt


def _along_axis_sharding(linear):
    """Split the batch along any axis but the op's own; a linear scan (cumsum)
    lets partial sums through."""
    def sharding(node, states, ctx):
        s = states[0]
        if any(t != s for t in states):   # cumprod_grad: g and x must be split alike
            raise NoSplit(f"{node.op}: operands split differently")
        if s == P:
            return P
        if s[1] == node.attrs["axis"]:
            raise NoSplit(f"{node.op} along the batch axis")
        return s
    return on_sharded(sharding, reads_partials=linear)


def _same_shape_rule(name, result_dtype=_scan_dtype):
    def rule(x, *, axis, **attrs):
        if not 0 <= axis < max(len(x.shape), 1) or not x.shape:
            raise ShapeError(f"{name}: axis {axis} is out of range for an array of shape {tuple(x.shape)}")
        return tuple(x.shape), result_dtype(x.dtype)
    return rule


# -- cumsum ----------------------------------------------------------------------------------

def _cumsum_impl(xp, x, *, axis, reverse):
    dt = _scan_dtype(x.dtype)
    if not reverse:
        return xp.cumsum(x, axis=axis, dtype=dt)
    return xp.flip(xp.cumsum(xp.flip(x, axis), axis=axis, dtype=dt), axis)


cumsum_p = defprim("cumsum", shape=_same_shape_rule("cumsum"), impl=_cumsum_impl,
                   vjp=lambda g, out, x, *, axis, reverse: (
                       bind(cumsum_p, (g,), {"axis": axis, "reverse": not reverse}),),
                   sharding=_along_axis_sharding(linear=True), batching=shifted_axis_rule("cumsum"),
                   doc="Running sums along `axis` (from the end when reverse: the VJP of the forward scan).")


# -- cumprod ---------------------------------------------------------------------------------

def _cumprod_impl(xp, x, *, axis):
    return xp.cumprod(x, axis=axis, dtype=_scan_dtype(x.dtype))


def _cumprod_vjp(g, out, x, *, axis):
    return (bind(cumprod_grad_p, (g, x), {"axis": axis}),)


cumprod_p = defprim("cumprod", shape=_same_shape_rule("cumprod"), impl=_cumprod_impl, vjp=_cumprod_vjp,
                    sharding=_along_axis_sharding(linear=False), batching=shifted_axis_rule("cumprod"),
                    doc="Running products along `axis`.")


def _cumprod_grad_rule(g, x, *, axis):
    if tuple(g.shape) != tuple(x.shape):
        raise ShapeError(f"cumprod_grad: cotangent of shape {tuple(g.shape)} does not match the input of shape "
                         f"{tuple(x.shape)}")
    return tuple(x.shape), np.dtype(x.dtype)


def _cumprod_grad_impl(xp, g, x, *, axis):
    """d/dx_i of sum_j g_j y_j, y_j = x_0 ... x_j, without dividing by x (exact
    with zeros): E_i * R_i, where E_i = x_0 ... x_{i-1} (the exclusive running
    product) and R_i = g_i + x_{i+1} R_{i+1} (one pass from the end)."""
    gm, xm = xp.moveaxis(g, axis, 0), xp.moveaxis(x, axis, 0)
    n = xm.shape[0]
    out = xp.empty(xm.shape, dtype=x.dtype)
    if n == 0:
        return xp.moveaxis(out, 0, axis)
    excl = xp.empty_like(out)
    excl[0] = 1
    excl[1:] = xp.cumprod(xm[:-1], axis=0)
    r = gm[n - 1].astype(x.dtype)
    out[n - 1] = excl[n - 1] * r
    for i in range(n - 2, -1, -1):
        r = gm[i] + xm[i + 1] * r
        out[i] = excl[i] * r
    return xp.moveaxis(out, 0, axis)


cumprod_grad_p = defprim("cumprod_grad", shape=_cumprod_grad_rule, impl=_cumprod_grad_impl,
                         sharding=_along_axis_sharding(linear=False), batching=shifted_axis_rule("cumprod_grad"),
                         doc="The VJP of cumprod (itself not differentiable: no second derivatives).")


# -- argsort ---------------------------------------------------------------------------------

def _argsort_rule(x, *, axis, descending, k):
    shape, _ = _same_shape_rule("argsort")(x, axis=axis)
    if not 0 <= k <= shape[axis]:
        raise ShapeError(f"argsort: k={k} is out of range for an axis of size {shape[axis]}")
    return shape[:axis] + (k,) + shape[axis + 1:], np.dtype(np.int64)


def _argsort_impl(xp, x, *, axis, descending, k):
    if not descending:
        order = xp.argsort(x, axis=axis, kind="stable")
    else:
        # Descending and stable: sort the reversed axis ascending, reverse the
        # order back and map positions (flipping an ascending argsort would
        # reverse ties).  NaN, last in ascending order, comes first: the
        # largest, as in torch.topk.
        order = (x.shape[axis] - 1) - xp.flip(xp.argsort(xp.flip(x, axis), axis=axis, kind="stable"), axis)
    if k == x.shape[axis]:
        return order
    return order[(slice(None),) * axis + (slice(0, k),)]


argsort_p = defprim("argsort", shape=_argsort_rule, impl=_argsort_impl, nondiff=True,
                    sharding=_along_axis_sharding(linear=False), batching=shifted_axis_rule("argsort"),
                    doc="The first k of the indices that sort `axis` (stable: equal values keep their order), "
                        "ascending or descending.")


# -- public functions ---------------------------------------------------------------

def _axis_of(opname, x, axis):
    """(x, axis): axis=None flattens x first, as NumPy's scans and sorts do."""
    from .shape import reshape
    if axis is None:
        return reshape(x, (-1,)), 0
    if not x.shape:
        raise ShapeError(f"{opname}: axis {axis} is out of range for a 0-d array (pass axis=None)")
    (axis,) = normalize_axes(opname, int(axis), len(x.shape))
    return x, axis


def _cast_first(x, dtype):
    from .elementwise import cast
    return x if dtype is None else cast(x, dtype)


def cumsum(x, axis=None, dtype=None):
    """np.cumsum: running sums along `axis` (None: of the flattened array); bools
    and narrow ints sum in int64; dtype= casts x first."""
    x, axis = _axis_of("cumsum", _cast_first(x, dtype), axis)
    return bind(cumsum_p, (x,), {"axis": axis, "reverse": False})


def cumprod(x, axis=None, dtype=None):
    """np.cumprod: running products along `axis` (None: of the flattened array).
    The gradient is exact also where x holds zeros (as torch.cumprod's)."""
    x, axis = _axis_of("cumprod", _cast_first(x, dtype), axis)
    return bind(cumprod_p, (x,), {"axis": axis})


_SORT_KINDS = (None, "quicksort", "mergesort", "heapsort", "stable")


def _check_kind(opname, kind, stable):
    # Every NumPy kind sorts the same values; Avalon's sort is always stable,
    # which is one of the orders each kind may give for ties.
    if kind not in _SORT_KINDS or stable not in (None, True, False):
        raise ArgumentError(f"{opname}: kind={kind!r} is not a sorting kind (one of {_SORT_KINDS[1:]})"
                            f"{at(user_location())}")


def argsort(x, axis=-1, kind=None, order=None, *, stable=None):
    """np.argsort: indices that sort x along `axis` (None: flattened), ascending.
    Always stable: equal values keep their order (np.argsort's default kind
    leaves the order of ties unspecified, so this is one of its answers)."""
    from ._keywords import reject_options
    reject_options("argsort", order=order)
    _check_kind("argsort", kind, stable)
    x, axis = _axis_of("argsort", x, axis)
    return bind(argsort_p, (x,), {"axis": axis, "descending": False, "k": x.shape[axis]})


def sort(x, axis=-1, kind=None, order=None, *, stable=None):
    """np.sort: x sorted along `axis` (None: flattened), ascending, NaN last.
    The gradient goes to the position each value came from."""
    from ._keywords import reject_options
    from .indexing import take_along_axis
    reject_options("sort", order=order)
    _check_kind("sort", kind, stable)
    x, axis = _axis_of("sort", x, axis)
    order = bind(argsort_p, (x,), {"axis": axis, "descending": False, "k": x.shape[axis]})
    return take_along_axis(x, order, axis)


TopK = namedtuple("TopK", ["values", "indices"])


def topk(x, k, axis=-1, largest=True, sorted=True):  # noqa: A002 - torch's name
    """torch.topk with NumPy's axis=: the k largest (smallest: largest=False)
    entries along `axis` and their indices, as TopK(values, indices).  The
    result is always sorted (largest first, or smallest first); equal values
    keep their order (torch leaves it unspecified).  NaN counts as the largest."""
    from .indexing import take_along_axis
    x, axis = _axis_of("topk", x, axis)
    n = x.shape[axis]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= int(k) <= n:
        raise ShapeError(f"topk: k={k!r} must be an integer in [0, {n}] for an axis of size {n} "
                         f"(array of shape {tuple(x.shape)})")
    idx = bind(argsort_p, (x,), {"axis": axis, "descending": bool(largest), "k": int(k)})
    return TopK(take_along_axis(x, idx, axis), idx)
