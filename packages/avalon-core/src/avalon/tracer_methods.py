"""NumPy's array surface on Tracer: operators, methods, and np.* functions
(through __array_ufunc__ / __array_function__), so model code written for NumPy
arrays traces unchanged."""
from __future__ import annotations

import numpy as np

from . import ops
from .errors import AvalonError, at, user_location
from .primitive import Tracer

UFUNCS = {
    np.add: ops.add, np.subtract: ops.sub, np.multiply: ops.mul, np.true_divide: ops.div,
    np.divide: ops.div, np.power: ops.pow, np.maximum: ops.maximum, np.minimum: ops.minimum,
    np.less: ops.lt, np.less_equal: ops.le, np.greater: ops.gt, np.greater_equal: ops.ge,
    np.equal: ops.eq, np.not_equal: ops.ne, np.negative: ops.neg, np.exp: ops.exp, np.log: ops.log,
    np.log1p: ops.log1p, np.expm1: ops.expm1, np.sqrt: ops.sqrt, np.absolute: ops.abs, np.sign: ops.sign,
    np.tanh: ops.tanh, np.square: ops.square, np.reciprocal: ops.reciprocal, np.matmul: ops.matmul,
}


def _axis_kw(fn):
    def call(a, axis=None, keepdims=False, **kw):
        return fn(a, axis=axis, keepdims=keepdims)
    return call


FUNCTIONS = {
    np.sum: _axis_kw(ops.sum), np.mean: _axis_kw(ops.mean), np.max: _axis_kw(ops.max),
    np.amax: _axis_kw(ops.max), np.min: _axis_kw(ops.min), np.amin: _axis_kw(ops.min),
    np.argmax: lambda a, axis=None, keepdims=False: ops.argmax(a, axis, keepdims),
    np.reshape: lambda a, shape=None, **kw: ops.reshape(a, shape if shape is not None else kw["newshape"]),
    np.transpose: lambda a, axes=None: ops.transpose(a, *(axes or ())),
    np.broadcast_to: lambda a, shape: ops.broadcast_to(a, shape),
    np.expand_dims: ops.expand_dims, np.squeeze: ops.squeeze, np.where: ops.where,
    np.matmul: ops.matmul, np.dot: ops.matmul, np.clip: lambda a, a_min=None, a_max=None: ops.clip(a, a_min, a_max),
    np.swapaxes: ops.swapaxes,
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
    return fn(*inputs)


def _array_function(self, func, types, args, kwargs):
    fn = FUNCTIONS.get(func)
    if fn is None:
        raise AvalonError(f"numpy.{func.__name__} is not supported on traced arrays{at(user_location())}; "
                          "use the avalon.* op instead")
    return fn(*args, **kwargs)


def _reduction(fn):
    def method(self, axis=None, keepdims=False, **kw):
        return fn(self, axis=axis, keepdims=keepdims)
    return method


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
    T.T = property(lambda a: ops.transpose(a))
    T.mT = property(lambda a: ops.swapaxes(a, -1, -2))
    T.reshape = lambda a, *shape: ops.reshape(a, *shape)
    T.transpose = lambda a, *axes: ops.transpose(a, *axes)
    T.swapaxes = lambda a, i, j: ops.swapaxes(a, i, j)
    T.flatten = lambda a: ops.reshape(a, (-1,))
    T.ravel = T.flatten
    T.squeeze = lambda a, axis=None: ops.squeeze(a, axis)
    T.astype = lambda a, dtype, **kw: ops.cast(a, dtype)
    T.sum = _reduction(ops.sum)
    T.mean = _reduction(ops.mean)
    T.max = _reduction(ops.max)
    T.min = _reduction(ops.min)
    T.argmax = lambda a, axis=None, keepdims=False: ops.argmax(a, axis, keepdims)
    T.argmin = lambda a, axis=None, keepdims=False: ops.argmin(a, axis, keepdims)
    T.clip = lambda a, lo=None, hi=None: ops.clip(a, lo, hi)
    T.exp = lambda a: ops.exp(a)
    T.log = lambda a: ops.log(a)
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
