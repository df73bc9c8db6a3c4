"""Shape and dtype rules shared by many primitives."""
from __future__ import annotations

import numpy as np

from ..errors import DtypeError, ShapeError
from ..graph import type_str


def checked_shape(opname, shape, allow_infer=False):
    """`shape` as a tuple of Python ints; a negative, fractional or non-numeric
    dimension raises (NumPy would truncate 2.5 to 2, or fail without saying where)."""
    from ..errors import at, user_location
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
        shape = (shape,)
    dims = []
    for k, d in enumerate(shape):
        whole = isinstance(d, (int, np.integer)) and not isinstance(d, (bool, np.bool_))
        if not whole or (d < 0 and not (allow_infer and d == -1)):
            what = f"{d!r} ({type(d).__name__})" if not whole else repr(d)
            rule = "non-negative integers" + (" (or one -1, inferred)" if allow_infer else "")
            raise ShapeError(f"{opname}: dimension {k} of shape {tuple(shape)!r} is {what}; dimensions are "
                             f"{rule}{at(user_location())}")
        dims.append(int(d))
    return tuple(dims)


def broadcast_shapes(opname, *shapes):
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise ShapeError(f"{opname}: shapes {' and '.join(str(tuple(s)) for s in shapes)} cannot be "
                         "broadcast together (dimensions must be equal or 1, aligned from the right)") from None


def result_dtype(opname, *dtypes):
    """Floats of different widths are not mixed silently; ints and bools join floats."""
    dts = [np.dtype(d) for d in dtypes]
    floats = {d for d in dts if d.kind in "fc"}
    if len(floats) > 1:
        names = " and ".join(sorted(d.name for d in floats))
        raise DtypeError(f"{opname}: dtype mismatch, {names}; cast one side explicitly "
                         f"(avalon.cast(x, 'float32') or x.astype('float32'))")
    if floats:
        return floats.pop()
    return np.result_type(*dts)


def elementwise_rule(opname, out_dtype=None, float_only=False):
    def rule(*avals, **attrs):
        shape = broadcast_shapes(opname, *(a.shape for a in avals))
        dtype = result_dtype(opname, *(a.dtype for a in avals))
        if float_only and dtype.kind not in "fc":
            raise DtypeError(f"{opname}: needs a floating-point array, got {dtype.name}; "
                             "cast it first (x.astype('float32'))")
        return shape, (np.dtype(out_dtype) if out_dtype else dtype)
    return rule


def normalize_axes(opname, axis, ndim):
    """axis (None, int or tuple) -> sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        a = int(a)
        if not -ndim <= a < ndim:
            raise ShapeError(f"{opname}: axis {a} is out of range for an array of rank {ndim}")
        out.append(a % ndim if ndim else 0)
    if len(set(out)) != len(out):
        raise ShapeError(f"{opname}: repeated axis in {axis}")
    return tuple(sorted(out))


def reduced_shape(shape, axes, keepdims):
    if keepdims:
        return tuple(1 if i in axes else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in axes)


def describe(a) -> str:
    return type_str(a.shape, a.dtype)
