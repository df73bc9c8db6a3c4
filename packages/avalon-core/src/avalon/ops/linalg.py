"""Batched matrix multiplication (NumPy's matmul semantics: the last two axes
multiply, leading axes broadcast)."""
from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..primitive import bind, defprim
from ._rules import broadcast_shapes, result_dtype
from ._sharding import P, R, S, NeedsReduce, NoSplit, on_sharded
from .shape import reshape, swapaxes


def _matmul_rule(a, b):
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise ShapeError(f"matmul: the primitive needs operands of rank >= 2, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not align: "
                         f"{a.shape[-1]} (last axis of the first) != {b.shape[-2]} "
                         "(second-to-last axis of the second)")
    batch = broadcast_shapes("matmul", a.shape[:-2], b.shape[:-2])
    return batch + (a.shape[-2], b.shape[-1]), result_dtype("matmul", a.dtype, b.dtype)


def _matmul_vjp(g, out, a, b):
    from .reduce import sum_to
    ga = matmul(g, swapaxes(b, -1, -2))
    gb = matmul(swapaxes(a, -1, -2), g)
    return sum_to(ga, a.shape), sum_to(gb, b.shape)


def _matmul_impl(xp, a, b, out=None):
    return xp.matmul(a, b, out=out)


def _matmul_sharding(node, states, ctx):
    a, b = node.inputs
    sa, sb = states
    if P in states:
        if (sa == P and sb == R) or (sa == R and sb == P):
            return P
        raise NeedsReduce(a if sa == P else b)
    nd = node.ndim
    if sb == R:  # rows of a (or its batch dims) are sharded
        ax = sa[1]
        if ax == a.ndim - 1:
            raise NoSplit("matmul contracts a sharded axis against a replicated one")
        return S(ax + nd - a.ndim, sa[2])
    if sa == R:
        ax = sb[1]
        if ax == b.ndim - 2:
            raise NoSplit("matmul contracts a sharded axis against a replicated one")
        return S(ax + nd - b.ndim, sb[2])
    if sa[1] == a.ndim - 1 and sb[1] == b.ndim - 2 and sa[2] == sb[2]:
        return P  # contraction over the batch: a weight gradient
    if sa[1] + nd - a.ndim == sb[1] + nd - b.ndim and sa[1] < a.ndim - 2 and sa[2] == sb[2]:
        return S(sa[1] + nd - a.ndim, sa[2])  # batched matmul over the batch axis
    raise NoSplit("matmul sharding")


matmul_p = defprim("matmul", shape=_matmul_rule, impl=_matmul_impl, accepts_out=True, vjp=_matmul_vjp,
                   sharding=on_sharded(_matmul_sharding, reads_partials=True))


def matmul(a, b):
    """a @ b; 1-D operands are promoted as in NumPy (a vector is a row on the
    left, a column on the right) and the added axis is removed again."""
    a_nd, b_nd = len(a.shape), len(b.shape)
    if a_nd == 0 or b_nd == 0:
        raise ShapeError(f"matmul: scalar operands are not allowed (shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}); use * for scaling")
    if a_nd == 1:
        a = reshape(a, (1, a.shape[0]))
    if b_nd == 1:
        b = reshape(b, (b.shape[0], 1))
    if a_nd == 1 and b_nd == 1 and a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"matmul: shapes ({a.shape[-1]},) and ({b.shape[-2]},) do not align")
    from .elementwise import _promote
    r = bind(matmul_p, _promote(a, b))
    if a_nd == 1:
        r = reshape(r, r.shape[:-2] + r.shape[-1:])
    if b_nd == 1:
        r = reshape(r, r.shape[:-1])
    return r


def linear(x, weight, bias=None):
    """x @ weight.T + bias, with weight laid out (out_features, in_features) as in PyTorch."""
    from .elementwise import add
    y = matmul(x, swapaxes(weight, -1, -2))
    return add(y, bias) if bias is not None else y
