"""NumPy's array surface on Tracer: operators, methods, and np.* functions
(through __array_ufunc__ / __array_function__), so model code written for NumPy
arrays traces unchanged.

Every method and np.* handler has NumPy's signature: a keyword NumPy does not
take raises ArgumentError (a TypeError) with NumPy's spelling (x.sum(dim=1) ->
axis=), and a NumPy option Avalon does not implement (out=, where=) raises
instead of being ignored.  A PyTorch tensor method (x.view, x.unsqueeze)
raises TracerAttributeError (an AttributeError) naming the NumPy spelling."""
from __future__ import annotations

import numpy as np

from . import ops
from .errors import ArgumentError, AvalonError, ShapeError, TracerAttributeError, at, user_location
from .ops._keywords import check_keywords, reject_options
from .primitive import Tracer

UFUNCS = {
    np.add: ops.add, np.subtract: ops.sub, np.multiply: ops.mul, np.true_divide: ops.div,
    np.divide: ops.div, np.power: ops.pow, np.maximum: ops.maximum, np.minimum: ops.minimum,
    np.less: ops.lt, np.less_equal: ops.le, np.greater: ops.gt, np.greater_equal: ops.ge,
    np.equal: ops.eq, np.not_equal: ops.ne, np.negative: ops.neg, np.exp: ops.exp, np.log: ops.log,
    np.log1p: ops.log1p, np.expm1: ops.expm1, np.sqrt: ops.sqrt, np.absolute: ops.abs, np.sign: ops.sign,
    np.tanh: ops.tanh, np.square: ops.square, np.reciprocal: ops.reciprocal, np.matmul: ops.matmul,
}


def _cast(a, dtype):
    return a if dtype is None else ops.cast(a, dtype)


# -- reductions and scans, with NumPy's signatures (ndarray methods and np.* functions alike) ----

def _sum(a, axis=None, dtype=None, out=None, keepdims=False, initial=None, where=True, **extra):
    check_keywords("sum", extra, ("axis", "dtype", "keepdims"))
    reject_options("sum", out=out, initial=initial, where=where)
    return ops.sum(_cast(a, dtype), axis, keepdims)


def _mean(a, axis=None, dtype=None, out=None, keepdims=False, *, where=True, **extra):
    check_keywords("mean", extra, ("axis", "dtype", "keepdims"))
    reject_options("mean", out=out, where=where)
    return ops.mean(_cast(a, dtype), axis, keepdims)


def _extremum(name, op):
    def extremum(a, axis=None, out=None, keepdims=False, initial=None, where=True, **extra):
        check_keywords(name, extra, ("axis", "keepdims"))
        reject_options(name, out=out, initial=initial, where=where)
        return op(a, axis, keepdims)
    return extremum


def _arg_extremum(name, op):
    def arg_extremum(a, axis=None, out=None, *, keepdims=False, **extra):
        check_keywords(name, extra, ("axis", "keepdims"))
        reject_options(name, out=out)
        return op(a, axis, keepdims)
    return arg_extremum


def _moment(name, op):
    """np.var / np.std (and the methods)."""
    def moment(a, axis=None, dtype=None, out=None, ddof=None, keepdims=False, *, where=True, mean=None,
               correction=None, **extra):
        check_keywords(name, extra, ("axis", "dtype", "ddof", "keepdims", "correction"))
        reject_options(name, out=out, where=where)
        if mean is not None:
            raise ArgumentError(f"{name}: mean= (a precomputed mean) is not supported{at(user_location())}")
        return op(a, axis, keepdims, correction, ddof=ddof, dtype=dtype)
    return moment


def _scan(name, op):
    """np.cumsum / np.cumprod (and the methods)."""
    def scan(a, axis=None, dtype=None, out=None, **extra):
        check_keywords(name, extra, ("axis", "dtype"))
        reject_options(name, out=out)
        return op(a, axis, dtype)
    return scan


def _truth(name, op):
    """np.any / np.all (and the methods)."""
    def truth(a, axis=None, out=None, keepdims=False, *, where=True, **extra):
        check_keywords(name, extra, ("axis", "keepdims"))
        reject_options(name, out=out, where=where)
        return op(a, axis, keepdims)
    return truth


def _argsort(a, axis=-1, kind=None, order=None, *, stable=None, **extra):
    check_keywords("argsort", extra, ("axis", "kind", "stable"))
    return ops.argsort(a, axis, kind, order, stable=stable)


def _sort_function(a, axis=-1, kind=None, order=None, *, stable=None, **extra):
    check_keywords("sort", extra, ("axis", "kind", "stable"))
    return ops.sort(a, axis, kind, order, stable=stable)


def _sort_method(self, *args, **kwargs):
    raise ArgumentError(f"x.sort() sorts a NumPy array in place, which a traced array cannot do (it is immutable)"
                        f"{at(user_location())}; use x = np.sort(x, axis) (or avalon.sort)")


# -- shape functions ---------------------------------------------------------------

def _reshape_function(a, shape=None, order="C", *, newshape=None, copy=None, **extra):
    check_keywords("reshape", extra, ("shape", "order", "copy"))
    _c_order_only("reshape", order)
    return ops.reshape(a, shape if shape is not None else newshape)


def _reshape_method(a, *shape, order="C", copy=None, **extra):
    check_keywords("reshape", extra, ("order", "copy"))
    _c_order_only("reshape", order)
    return ops.reshape(a, *shape)


def _c_order_only(opname, order):
    if order not in ("C", "A", "K"):   # "A"/"K" read a traced (C-ordered) array in C order
        raise ArgumentError(f"{opname}: order={order!r} is not supported (only C order){at(user_location())}")


def _transpose_method(a, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    if len(axes) == 2 and a.ndim != 2 and all(isinstance(d, (int, np.integer)) for d in axes):
        raise ShapeError(f"transpose{axes} of a {a.ndim}-d array: NumPy's transpose takes a permutation of all "
                         f"{a.ndim} axes{at(user_location())}; to swap two axes (torch's transpose(d0, d1)) "
                         "use x.swapaxes(d0, d1)")
    return ops.transpose(a, *axes)


def _flatten_method(a, order="C"):
    if not isinstance(order, str):
        raise ArgumentError(f"x.flatten({order!r}): NumPy's flatten takes only order=, no start dimension"
                            f"{at(user_location())}; use avalon.flatten(x, start_dim) or "
                            "x.reshape(x.shape[0], -1)")
    _c_order_only("flatten", order)
    return ops.reshape(a, (-1,))


def _transpose_function(a, axes=None, **extra):
    check_keywords("transpose", extra, ("axes",))
    return ops.transpose(a, *(axes or ()))


def _broadcast_to(array, shape, subok=False, **extra):
    check_keywords("broadcast_to", extra, ("shape", "subok"))
    return ops.broadcast_to(array, shape)


def _expand_dims(a, axis, **extra):
    check_keywords("expand_dims", extra, ("axis",))
    return ops.expand_dims(a, axis)


def _swapaxes(a, axis1, axis2, **extra):
    check_keywords("swapaxes", extra, ("axis1", "axis2"))
    return ops.swapaxes(a, axis1, axis2)


def _squeeze(a, axis=None, **extra):
    check_keywords("squeeze", extra, ("axis",))
    return ops.squeeze(a, axis)


def _astype(a, dtype, order="K", casting="unsafe", subok=True, copy=True, **extra):
    check_keywords("astype", extra, ("order", "casting", "subok", "copy"))
    if not np.can_cast(a.dtype, dtype, casting=casting):
        raise ArgumentError(f"astype: cannot cast {np.dtype(a.dtype).name} to {np.dtype(dtype).name} under "
                            f"casting={casting!r}{at(user_location())}")
    return ops.cast(a, dtype)


def _clip_method(a, min=None, max=None, out=None, **extra):  # noqa: A002 - NumPy's names
    check_keywords("clip", extra, ("min", "max"))
    reject_options("clip", out=out)
    return ops.clip(a, min, max)


def _clip_function(a, a_min=None, a_max=None, out=None, *, min=None, max=None, **extra):  # noqa: A002
    check_keywords("clip", extra, ("a_min", "a_max", "min", "max"))
    reject_options("clip", out=out)
    return ops.clip(a, a_min if a_min is not None else min, a_max if a_max is not None else max)


def _dot(a, b, out=None):
    """np.dot: for 0-d operands a product; for b of at most 2 dimensions what
    matmul computes.  np.dot of a 3-d (or higher) b sums over b's second-to-last
    axis with a different result layout than matmul: refused, not approximated."""
    reject_options("dot", out=out)
    a_nd, b_nd = (len(getattr(v, "shape", ())) for v in (a, b))   # (np.ndim would dispatch back here)
    if not a_nd or not b_nd:
        return ops.mul(a, b)
    if b_nd > 2:
        raise ShapeError(f"np.dot with a {b_nd}-d second operand is not supported on traced arrays"
                         f"{at(user_location())}; use a @ b (np.matmul), whose batch layout differs")
    return ops.matmul(a, b)


# -- the new ops' np.* handlers, with NumPy's parameter names -----------------------------

def _tril(m, k=0):
    return ops.tril(m, k)


def _triu(m, k=0):
    return ops.triu(m, k)


def _flip(m, axis=None):
    return ops.flip(m, axis)


def _roll(a, shift, axis=None):
    return ops.roll(a, shift, axis)


def _linalg_norm(x, ord=None, axis=None, keepdims=False):  # noqa: A002 - NumPy's name
    return ops.norm(x, ord, axis, keepdims)


FUNCTIONS = {
    np.sum: _sum, np.mean: _mean,
    np.max: _extremum("max", ops.max), np.amax: _extremum("amax", ops.max),
    np.min: _extremum("min", ops.min), np.amin: _extremum("amin", ops.min),
    np.argmax: _arg_extremum("argmax", ops.argmax), np.argmin: _arg_extremum("argmin", ops.argmin),
    np.reshape: _reshape_function, np.transpose: _transpose_function, np.broadcast_to: _broadcast_to,
    np.expand_dims: _expand_dims, np.squeeze: _squeeze, np.where: ops.where,
    np.matmul: ops.matmul, np.dot: _dot, np.clip: _clip_function, np.swapaxes: _swapaxes,
    # sorting, scans, statistics, norms, flips, triangles
    np.sort: _sort_function, np.argsort: _argsort,
    np.cumsum: _scan("cumsum", ops.cumsum), np.cumprod: _scan("cumprod", ops.cumprod),
    np.var: _moment("var", ops.var), np.std: _moment("std", ops.std),
    np.any: _truth("any", ops.any), np.all: _truth("all", ops.all),
    np.flip: _flip, np.roll: _roll, np.tril: _tril, np.triu: _triu, np.linalg.norm: _linalg_norm,
}


def _add_indexing_functions():
    for np_fn, name in ((getattr(np, "concatenate", None), "concatenate"), (np.stack, "stack"),
                        (np.split, "split"), (np.pad, "pad"), (np.take_along_axis, "take_along_axis")):
        fn = getattr(ops, name, None)
        if fn is not None:
            FUNCTIONS[np_fn] = fn


# -- contractions, repeats, gathers and constants of static shape ------------------------------

def _np_take(a, indices, axis=None, out=None, mode="raise"):
    """np.take on a traced array: out= cannot be recorded, and only mode='raise'
    (out-of-range indices are errors) is what avalon.take does."""
    if out is not None or mode != "raise":
        raise AvalonError(f"numpy.take: out= and mode={mode!r} are not supported on traced arrays"
                          f"{at(user_location())}; only mode='raise' without out=")
    return ops.take(a, indices, axis)


def _add_gather_and_constant_functions():
    FUNCTIONS.update({
        np.einsum: ops.einsum, np.repeat: ops.repeat, np.tile: ops.tile, np.take: _np_take,
        np.zeros_like: ops.zeros_like, np.ones_like: ops.ones_like, np.full_like: ops.full_like,
        np.empty_like: ops.zeros_like,  # contents unspecified: zeros are as good as any
        np.arange: ops.arange,  # reaches a tracer only through like=
    })


def _install_gather_methods(T):
    T.repeat = lambda a, repeats, axis=None: ops.repeat(a, repeats, axis)
    T.take = _np_take


def _array_ufunc(self, ufunc, method, *inputs, **kwargs):
    fn = UFUNCS.get(ufunc)
    if method != "__call__" or fn is None or kwargs.get("out") is not None:
        raise AvalonError(f"numpy.{ufunc.__name__}{'' if method == '__call__' else '.' + method} is not "
                          f"supported on traced arrays{at(user_location())}; use the avalon.* op instead")
    options = sorted(k for k in kwargs if k != "out")
    if options:   # where=, dtype=, casting= ... would be ignored: refuse them
        raise ArgumentError(f"numpy.{ufunc.__name__}: {', '.join(k + '=' for k in options)} not supported on "
                            f"traced arrays{at(user_location())}; call it without (cast with .astype, select "
                            "with avalon.where)")
    return fn(*inputs)


def _array_function(self, func, types, args, kwargs):
    fn = FUNCTIONS.get(func)
    if fn is None:
        raise AvalonError(f"numpy.{func.__name__} is not supported on traced arrays{at(user_location())}; "
                          "use the avalon.* op instead")
    return fn(*args, **kwargs)


# -- PyTorch habits: what a traced array offers instead -----------------------------------

_TORCH_SPELLINGS = {
    "view": "x.reshape(...)", "view_as": "x.reshape(other.shape)", "reshape_as": "x.reshape(other.shape)",
    "dim": "x.ndim", "ndimension": "x.ndim", "numel": "x.size (NumPy's size is the element count)",
    "nelement": "x.size",
    "permute": "x.transpose(*axes) (or avalon.permute(x, *axes))",
    "unsqueeze": "np.expand_dims(x, axis) (avalon.expand_dims), or x[:, None]",
    "contiguous": "nothing: drop the call (traced arrays need no contiguous copy)",
    "clone": "x itself (traced arrays are immutable, so no copy is needed)",
    "float": "x.astype(np.float32)", "double": "x.astype(np.float64)", "half": "x.astype(np.float16)",
    "long": "x.astype(np.int64)", "int": "x.astype(np.int32)", "bool": "x.astype(bool)",
    "type_as": "x.astype(other.dtype)",
    "to": "x.astype(dtype) for a dtype; move arrays between devices outside the traced function "
          "(avalon.to_device)",
    "cpu": "avalon.to_device(x, 'cpu') outside the traced function",
    "cuda": "avalon.to_device(x, 'cuda') outside the traced function",
    "detach": "avalon.stop_gradient(x)", "data": "avalon.stop_gradient(x)",
    "numpy": "nothing inside the traced function (the value is not known yet): return x, and the compiled "
             "function returns it as an array",
    "expand": "np.broadcast_to(x, shape)", "expand_as": "np.broadcast_to(x, other.shape)",
    "t": "x.T", "mm": "x @ y", "bmm": "x @ y", "matmul": "x @ y",
    "amax": "x.max(axis=...)", "amin": "x.min(axis=...)",
    "softmax": "avalon.softmax(x, axis)", "log_softmax": "avalon.log_softmax(x, axis)",
    "norm": "np.linalg.norm(x, ord, axis) (avalon.norm)", "topk": "avalon.topk(x, k, axis)",
    "flip": "np.flip(x, axis)", "roll": "np.roll(x, shift, axis)", "tril": "np.tril(x, k)",
    "triu": "np.triu(x, k)", "chunk": "np.split(x, sections, axis)",
    "masked_fill": "avalon.where(mask, value, x)", "gather": "avalon.gather(x, dim, index)",
    "index_select": "avalon.take(x, index, axis)", "repeat": "np.tile(x, reps) (torch's repeat is NumPy's tile)",
    "sigmoid": "avalon.sigmoid(x)", "relu": "avalon.relu(x)", "tanh": "np.tanh(x)", "abs": "abs(x)",
    "sqrt": "np.sqrt(x)", "pow": "x ** p",
    "new_zeros": "avalon.zeros(shape, x.dtype, like=x)", "new_ones": "avalon.ones(shape, x.dtype, like=x)",
    "new_full": "avalon.full(shape, value, x.dtype, like=x)",
    "backward": "avalon.grad(loss_fn, *args), which returns the loss and the gradients",
    "grad": "avalon.grad(loss_fn, *args), which returns the gradients",
    "requires_grad": "nothing: avalon.grad differentiates every float array argument (argnums= selects)",
    "requires_grad_": "nothing: avalon.grad differentiates every float array argument (argnums= selects)",
    "device": "avalon.backends: an array's device is its backend's (avalon.to_device moves it)",
}


def _tracer_getattr(self, name):
    """Only reached for attributes a traced array does not have."""
    if name.startswith("__"):   # protocols probed with hasattr/getattr (copy, pickle): plain and fast
        raise AttributeError(name)
    text = f"traced array ({self!r}) has no attribute {name!r}{at(user_location())}"
    hint = _TORCH_SPELLINGS.get(name)
    if hint is None and name.endswith("_") and not name.startswith("_"):
        hint = (f"a new array: traced arrays are immutable, so in-place {name}() cannot be recorded "
                f"(x = x + y instead of x.add_(y))")
    if hint is not None:
        raise TracerAttributeError(f"{text}; this is a PyTorch tensor method: with NumPy arrays, use {hint}")
    raise TracerAttributeError(f"{text}; traced arrays have NumPy's array attributes and methods "
                               "(other ops: avalon.<op>(x) or np.<function>(x))")


class _ElementCount(int):
    """x.size: NumPy's element count, an int.  Calling it, torch's x.size(dim),
    raises with NumPy's spelling instead of "'int' object is not callable"."""

    def __call__(self, *dim):
        raise ArgumentError(f"x.size is NumPy's element count ({int(self)}), not torch's size(){at(user_location())}; "
                            f"use x.shape{'[' + str(dim[0]) + ']' if len(dim) == 1 else ''} for "
                            f"{'that axis' if dim else 'the shape'}")

    def __repr__(self):
        return int.__repr__(self)


def _install():
    T = Tracer
    T.__add__ = lambda a, b: ops.add(a, b)
    T.__radd__ = lambda a, b: ops.add(b, a)
    T.__sub__ = lambda a, b: ops.sub(a, b)
    T.__rsub__ = lambda a, b: ops.sub(b, a)
    T.__mul__ = lambda a, b: ops.mul(a, b)
    T.__rmul__ = lambda a, b: ops.mul(b, a)
    T.__truediv__ = lambda a, b: ops.div(a, b)
    T.__rtruediv__ = lambda a, b: ops.div(b, a)
    T.__pow__ = lambda a, b: ops.pow(a, b)
    T.__rpow__ = lambda a, b: ops.pow(b, a)
    T.__matmul__ = lambda a, b: ops.matmul(a, b)
    T.__rmatmul__ = lambda a, b: ops.matmul(b, a)
    T.__neg__ = lambda a: ops.neg(a)
    T.__pos__ = lambda a: a
    T.__abs__ = lambda a: ops.abs(a)
    T.__lt__ = lambda a, b: ops.lt(a, b)
    T.__le__ = lambda a, b: ops.le(a, b)
    T.__gt__ = lambda a, b: ops.gt(a, b)
    T.__ge__ = lambda a, b: ops.ge(a, b)
    T.__eq__ = lambda a, b: ops.eq(a, b)
    T.__ne__ = lambda a, b: ops.ne(a, b)
    T.__hash__ = object.__hash__
    T.__array_ufunc__ = _array_ufunc
    T.__array_function__ = _array_function
    T.__getattr__ = _tracer_getattr
    T.size = property(lambda a: _ElementCount(a.node.size))
    T.T = property(lambda a: ops.transpose(a))
    T.mT = property(lambda a: ops.swapaxes(a, -1, -2))
    T.reshape = _reshape_method
    T.transpose = _transpose_method
    T.swapaxes = _swapaxes
    T.flatten = _flatten_method
    T.ravel = lambda a, order="C": _flatten_method(a, order)
    T.squeeze = _squeeze
    T.astype = _astype
    T.sum = _sum
    T.mean = _mean
    T.max = _extremum("max", ops.max)
    T.min = _extremum("min", ops.min)
    T.argmax = _arg_extremum("argmax", ops.argmax)
    T.argmin = _arg_extremum("argmin", ops.argmin)
    T.clip = _clip_method
    T.exp = lambda a: ops.exp(a)
    T.log = lambda a: ops.log(a)
    # NumPy's ndarray has these methods too (sort sorts in place: refused)
    T.var = _moment("var", ops.var)
    T.std = _moment("std", ops.std)
    T.cumsum = _scan("cumsum", ops.cumsum)
    T.cumprod = _scan("cumprod", ops.cumprod)
    T.any = _truth("any", ops.any)
    T.all = _truth("all", ops.all)
    T.argsort = _argsort
    T.sort = _sort_method
    T.__len__ = _len
    T.__iter__ = _iter
    if hasattr(ops, "getitem"):
        T.__getitem__ = lambda a, idx: ops.getitem(a, idx)
    _add_indexing_functions()
    _add_gather_and_constant_functions()
    _install_gather_methods(T)


def _len(self):
    if not self.shape:
        raise TypeError("len() of a 0-d traced array")
    return self.shape[0]


def _iter(self):
    if not self.shape:
        raise TypeError("iteration over a 0-d traced array")
    return (self[i] for i in range(self.shape[0]))


_install()
