"""Reductions over axes (sum, max, min, argmax) and the composites built on
them: mean, logsumexp, softmax, log_softmax."""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from ..primitive import PRIMITIVES, bind, defprim
from . import _batching
from ._layout import CSN, NC, LayoutRule
from ._rules import normalize_axes, reduced_shape
from ._sharding import P, S, NeedsReduce, NoSplit, on_sharded
from .elementwise import abs, add, cast, div, eq, exp, log, mul, stop_gradient, sub, where
from .shape import broadcast_to, reshape


def _reduce_rule(name, int_result=False):
    def rule(x, *, axes, keepdims):
        shape = reduced_shape(x.shape, axes, keepdims)
        if int_result:
            return shape, np.dtype(np.int64)
        dt = np.dtype(x.dtype)
        if name == "sum" and dt.kind in "bi" and dt.itemsize < 8:
            dt = np.dtype(np.int64)
        return shape, dt
    return rule


def _expand_back(g, x_shape, axes, keepdims):
    """Broadcast a reduced cotangent back over the reduced axes."""
    if not keepdims:
        g = reshape(g, reduced_shape(x_shape, axes, True))
    return broadcast_to(g, x_shape)


def _reduction_sharding(linear):
    """A reduction over axes other than the batch's keeps the sharding; a sum
    (linear) over the batch axis, or of a partial sum, gives a partial sum."""
    def sharding(node, states, ctx):
        (s,) = states
        if s == P:
            if not linear:
                raise NeedsReduce(node.inputs[0])
            return P
        axes, keep = node.attrs["axes"], node.attrs["keepdims"]
        if s[1] in axes:
            if not linear:
                raise NoSplit(f"{node.op} over the batch axis")
            return P
        return S(s[1] if keep else s[1] - len([a for a in axes if a < s[1]]), s[2])  # (sum is the op here)
    return on_sharded(sharding, reads_partials=True)


def _reduction_batching(name):
    """A reduction of a batch: the batch axis moved to the front, the reduced
    axes shifted past it (keepdims and the order of the axes unchanged, so
    argmax's flattened block is the same)."""
    def rule(args, dims, *, axes, keepdims):
        x = _batching.move_to_front(args[0], dims[0])
        shifted = tuple(a + 1 for a in axes)
        return bind(PRIMITIVES[name], (x,), {"axes": shifted, "keepdims": keepdims}), 0
    return rule


@dataclass(frozen=True)
class Reduction:
    """A reduction as a fold: the values of the input over `axes` (after a cast
    to the op's result dtype) are combined by `combine`, an IR op of
    avalon.kernel_ir (add, max, min), into an accumulator that starts at the
    identity.  `empty_ok`: an empty fold gives the identity (a sum is 0); else
    an empty fold is NumPy's error (a max of nothing has no value)."""
    combine: str
    empty_ok: bool

    def identity(self, dtype):
        d = np.dtype(dtype)
        if self.combine == "add":
            return d.type(0)
        low = self.combine == "max"     # max starts at the lowest value, min at the highest
        if d.kind == "f":
            return d.type(-np.inf if low else np.inf)
        if d.kind == "b":
            return np.bool_(not low)
        info = np.iinfo(d)
        return d.type(info.min if low else info.max)


def _sum_impl(xp, x, *, axes, keepdims, out=None):
    return xp.sum(x, axis=axes, keepdims=keepdims, out=out)


def _sum_batch_last(rw, node):
    """A sum over a batch-innermost value, its axes remapped."""
    if node.inputs[0] not in rw.chosen:
        return None
    src = rw.get(node.inputs[0], CSN)
    nd = node.inputs[0].ndim
    perm = tuple(range(1, nd)) + (0,)    # position k of the CSN value holds original axis perm[k]
    axes = tuple(sorted(perm.index(a) for a in node.attrs["axes"]))
    keep = node.attrs["keepdims"]
    kept = [perm[k] for k in range(nd) if k not in axes]   # original axes, in CSN order
    shape = tuple(1 if k in axes else src.shape[k] for k in range(nd)) if keep else \
        tuple(src.shape[k] for k in range(nd) if k not in axes)
    r = rw.emit("sum", [src], {"axes": axes, "keepdims": keep}, shape, node.dtype, node.loc)
    if keep:
        return r, CSN
    if kept == sorted(kept):
        return r, NC
    order = tuple(int(k) for k in np.argsort(kept))
    return rw.emit("transpose", [r], {"perm": order}, node.shape, node.dtype, node.loc), NC


sum_p = defprim("sum", shape=_reduce_rule("sum"), impl=_sum_impl, accepts_out=True,
                vjp=lambda g, out, x, *, axes, keepdims: (_expand_back(g, x.shape, axes, keepdims),),
                sharding=_reduction_sharding(linear=True), layout=LayoutRule(_sum_batch_last),
                batching=_reduction_batching("sum"), reduction=Reduction("add", empty_ok=True))


def _extremum_vjp(g, out, x, *, axes, keepdims):
    # Ties share the gradient evenly (as torch.amax/amin do).
    out_b = _expand_back(out, x.shape, axes, keepdims)
    mask = cast(eq(x, out_b), x.dtype)
    count = _expand_back(bind(sum_p, (mask,), {"axes": axes, "keepdims": True}), x.shape, axes, True)
    return (mul(_expand_back(g, x.shape, axes, keepdims), div(mask, count)),)


def _max_impl(xp, x, *, axes, keepdims, out=None):
    return xp.max(x, axis=axes, keepdims=keepdims, out=out)


def _min_impl(xp, x, *, axes, keepdims, out=None):
    return xp.min(x, axis=axes, keepdims=keepdims, out=out)


max_p = defprim("max", shape=_reduce_rule("max"), impl=_max_impl, accepts_out=True, vjp=_extremum_vjp,
                sharding=_reduction_sharding(linear=False), batching=_reduction_batching("max"),
                reduction=Reduction("max", empty_ok=False))
min_p = defprim("min", shape=_reduce_rule("min"), impl=_min_impl, accepts_out=True, vjp=_extremum_vjp,
                sharding=_reduction_sharding(linear=False), batching=_reduction_batching("min"),
                reduction=Reduction("min", empty_ok=False))


def _argmax_impl(xp, x, *, axes, keepdims):
    """Index of the extreme value within the flattened block of `axes` (C order)."""
    if len(axes) == 1:
        return xp.argmax(x, axis=axes[0], keepdims=keepdims)
    rest = [d for d in range(x.ndim) if d not in axes]
    flat = xp.transpose(x, rest + list(axes)).reshape([x.shape[d] for d in rest] + [-1])
    r = xp.asarray(xp.argmax(flat, axis=-1))
    return r.reshape(reduced_shape(x.shape, axes, True)) if keepdims else r


def _argmax_rule(x, *, axes, keepdims):
    return reduced_shape(x.shape, axes, keepdims), np.dtype(np.int64)


argmax_p = defprim("argmax", shape=_argmax_rule, impl=_argmax_impl, nondiff=True,
                   sharding=_reduction_sharding(linear=False), batching=_reduction_batching("argmax"))


def _argmin_impl(xp, x, *, axes, keepdims):
    return _argmax_impl(xp, -x, axes=axes, keepdims=keepdims)


argmin_p = defprim("argmin", shape=_argmax_rule, impl=_argmin_impl, nondiff=True,
                   sharding=_reduction_sharding(linear=False), batching=_reduction_batching("argmin"))


# -- public functions ---------------------------------------------------------------

def _reduce(prim, x, axis, keepdims):
    axes = normalize_axes(prim.name, axis, len(x.shape))
    if not axes and prim.name in ("sum", "max", "min"):
        return x
    return bind(prim, (x,), {"axes": axes, "keepdims": bool(keepdims)})


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return _reduce(sum_p, x, axis, keepdims)


def max(x, axis=None, keepdims=False):  # noqa: A001
    return _reduce(max_p, x, axis, keepdims)


def min(x, axis=None, keepdims=False):  # noqa: A001
    return _reduce(min_p, x, axis, keepdims)


def argmax(x, axis=None, keepdims=False):
    return _reduce(argmax_p, x, axis, keepdims)


def argmin(x, axis=None, keepdims=False):
    return _reduce(argmin_p, x, axis, keepdims)


def mean(x, axis=None, keepdims=False):
    axes = normalize_axes("mean", axis, len(x.shape))
    n = int(math.prod([x.shape[a] for a in axes]))
    s = sum(x, axes, keepdims)
    if np.dtype(x.dtype).kind not in "fc":
        s = cast(s, np.float32)
    return div(s, float(n)) if n != 1 else s


def var(x, axis=None, keepdims=False, correction=None, *, ddof=None, dtype=None):
    """np.var: the mean squared deviation from the mean over `axis`, divided by
    N - ddof (ddof=1: the unbiased estimate, torch's default).  correction= is
    NumPy 2's (and torch's) name for ddof; give one of them.  dtype= casts x
    first; integer input gives float32 (as avalon.mean)."""
    ddof = _ddof("var", ddof, correction)
    if dtype is not None:
        x = cast(x, dtype)
    axes = normalize_axes("var", axis, len(x.shape))
    n = int(math.prod([x.shape[a] for a in axes]))
    d = sub(x, mean(x, axes, keepdims=True))
    return div(sum(mul(d, d), axes, keepdims), float(n - ddof))


def _ddof(opname, ddof, correction):
    if ddof is not None and correction is not None:
        from ..errors import ArgumentError, at, user_location
        raise ArgumentError(f"{opname}: give ddof= or correction= (the same thing), not both"
                            f"{at(user_location())}")
    value = ddof if ddof is not None else (correction if correction is not None else 0)
    return float(value) if not float(value).is_integer() else int(value)


def _logsumexp_shift(x, axes):
    """The max over `axes` that logsumexp subtracts before exp, replaced by 0
    where it is infinite (as torch does): all -inf then gives log(0) = -inf,
    not -inf - -inf = nan, and a +inf entry gives +inf."""
    m = max(x, axes, keepdims=True)
    return stop_gradient(where(eq(abs(m), np.inf), 0.0, m))


def logsumexp(x, axis=None, keepdims=False):
    axes = normalize_axes("logsumexp", axis, len(x.shape))
    m = _logsumexp_shift(x, axes)
    r = add(log(sum(exp(sub(x, m)), axes, keepdims=True)), m)
    return r if keepdims else reshape(r, reduced_shape(x.shape, axes, False))


def log_softmax(x, axis=-1):
    # (x - m) - log(sum(exp(x - m))), torch's order: x - logsumexp(x) would round
    # m + log(sum) first and lose log 2 at logits of 1e7 in float32.  The shift is
    # the plain max, as in torch: a +inf logit, or a slice of only -inf, gives nan.
    shifted = sub(x, stop_gradient(max(x, axis, keepdims=True)))
    return sub(shifted, log(sum(exp(shifted), axis, keepdims=True)))


def softmax(x, axis=-1):
    m = stop_gradient(max(x, axis, keepdims=True))
    e = exp(sub(x, m))
    return div(e, sum(e, axis, keepdims=True))


def sum_to(x, shape):
    """Sum `x` down to `shape` (the inverse of broadcasting; used by VJPs)."""
    shape = tuple(shape)
    if tuple(x.shape) == shape:
        return x
    lead = len(x.shape) - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, s in enumerate(shape)
                                       if s == 1 and x.shape[lead + i] != 1)
    r = bind(sum_p, (x,), {"axes": axes, "keepdims": True}) if axes else x
    return reshape(r, shape)


# -- std, norm, any, all (composites) ---------------------------------------------------

def std(x, axis=None, keepdims=False, correction=None, *, ddof=None, dtype=None):
    """np.std: the square root of var (same arguments).  As in torch, its
    gradient is nan where the deviation is zero."""
    from .elementwise import sqrt
    return sqrt(var(x, axis, keepdims, correction, ddof=ddof, dtype=dtype))


def _sqrt_zero_safe(s):
    """sqrt(s) for s >= 0 whose gradient is 0 at s == 0 (as torch's norms), not
    inf * 0 = nan; the value is exactly sqrt(s)."""
    from .elementwise import sqrt
    zero = eq(s, 0.0)
    return where(zero, 0.0, sqrt(where(zero, 1.0, s)))


def _root_zero_safe(s, p):
    """s ** (1/p) for s >= 0, with gradient 0 at s == 0 (p-norms of a zero vector)."""
    from .elementwise import pow
    zero = eq(s, 0.0)
    return where(zero, 0.0, pow(where(zero, 1.0, s), 1.0 / p))


def _vector_norm(x, ord, axis, keepdims):
    from .elementwise import ne, pow
    if ord is None or ord == 2:
        return _sqrt_zero_safe(sum(mul(x, x), axis, keepdims))
    if ord == np.inf:
        return max(abs(x), axis, keepdims)
    if ord == -np.inf:
        return min(abs(x), axis, keepdims)
    if ord == 0:
        return sum(cast(ne(x, 0.0), x.dtype), axis, keepdims)
    if ord == 1:
        return sum(abs(x), axis, keepdims)
    return _root_zero_safe(sum(pow(abs(x), float(ord)), axis, keepdims), float(ord))


def _matrix_norm(x, ord, row, col, keepdims):
    from ..errors import MissingRuleError, at, user_location
    if ord is None or ord == "fro":
        r = _sqrt_zero_safe(sum(mul(x, x), (row, col)))
    elif ord in (1, -1):          # the largest (smallest) column sum of |x|
        r = (max if ord == 1 else min)(sum(abs(x), row), col - (col > row))
    elif ord in (np.inf, -np.inf):   # the largest (smallest) row sum of |x|
        r = (max if ord == np.inf else min)(sum(abs(x), col), row - (row > col))
    elif ord in (2, -2, "nuc"):
        raise MissingRuleError(f"norm: ord={ord!r} needs the singular values of the matrix (an SVD), which "
                               f"Avalon does not compute{at(user_location())}; use ord='fro', 1, -1, inf or "
                               "-inf, or compute it outside the traced function")
    else:
        from ..errors import ArgumentError
        raise ArgumentError(f"norm: ord={ord!r} is not a matrix norm order (None, 'fro', 'nuc', 1, -1, 2, -2, "
                            f"inf, -inf){at(user_location())}")
    if keepdims:
        r = reshape(r, tuple(1 if d in (row, col) else n for d, n in enumerate(x.shape)))
    return r


def norm(x, ord=None, axis=None, keepdims=False):
    """np.linalg.norm: with axis=None and ord=None, the 2-norm of x flattened;
    otherwise a vector norm over one axis (ord None/2, 1, inf, -inf, 0 counts
    nonzeros, any other p: sum(|x|**p)**(1/p)) or a matrix norm over two
    (axis=(row, col): None/'fro', 1, -1, inf, -inf; 2, -2 and 'nuc' need an SVD
    and raise).  Integer input gives float32.  The gradient at a zero vector is
    0 (as torch's)."""
    from ..errors import ArgumentError, ShapeError, at, user_location
    if np.dtype(x.dtype).kind not in "fc":
        x = cast(x, np.float32)
    nd = len(x.shape)
    if axis is None:
        if ord is None:
            r = _sqrt_zero_safe(sum(mul(x, x)))
            return reshape(r, (1,) * nd) if keepdims else r
        if nd not in (1, 2):
            raise ShapeError(f"norm: ord={ord!r} with axis=None needs a 1-d or 2-d array, got shape "
                             f"{tuple(x.shape)}{at(user_location())}; pass axis=")
        axis = tuple(range(nd))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    for a in axes:
        normalize_axes("norm", a, nd)   # (raises for an axis out of range)
    axes = tuple(int(a) % nd for a in axes)
    if len(axes) == 1:
        if isinstance(ord, str):
            raise ArgumentError(f"norm: ord={ord!r} is a matrix norm; a vector norm takes a number"
                                f"{at(user_location())}")
        return _vector_norm(x, ord, axes[0], keepdims)
    if len(axes) == 2 and axes[0] != axes[1]:
        return _matrix_norm(x, ord, axes[0], axes[1], keepdims)
    raise ShapeError(f"norm: axis={axis!r} must be one axis or two different axes{at(user_location())}")


def any(x, axis=None, keepdims=False):  # noqa: A001
    """np.any: whether some element over `axis` is nonzero (True, or NaN); a bool
    array, with no gradient.  Over no elements: False."""
    from .elementwise import gt, ne
    return gt(sum(ne(x, 0), axis, keepdims), 0)


def all(x, axis=None, keepdims=False):  # noqa: A001
    """np.all: whether every element over `axis` is nonzero; a bool array, with
    no gradient.  Over no elements: True."""
    return eq(sum(eq(x, 0), axis, keepdims), 0)
