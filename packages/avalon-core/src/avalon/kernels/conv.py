"""Convolution and pooling kernels, generic over the array module ``xp``.

Every kernel takes the array module (``numpy`` or ``cupy``) as its first
argument and uses only APIs both provide (``as_strided``, ``matmul``, ``pad``,
``zeros``, reshape/transpose and strided slicing).  Layout follows PyTorch:

* activations ``x``: ``(N, C, *spatial)`` with 1, 2 or 3 spatial dims;
* convolution weights: ``(O, C // groups, *K)``;
* transposed-convolution weights: ``(C_in, C_out // groups, *K)``.

Integer hyper-parameters (``stride``, ``padding``, ``dilation``,
``output_padding``, ``kernel_size``) may be ints or tuples; they are
normalised with :func:`as_tuple`.  Nothing is validated here: the caller is
responsible for checking shapes and parameter ranges.  Pooling supports
``ceil_mode=False`` only.
"""

from __future__ import annotations

import itertools
import math
import operator

__all__ = [
    "as_tuple",
    "conv_output_shape",
    "conv_transpose_output_shape",
    "conv_forward",
    "conv_input_grad",
    "conv_weight_grad",
    "conv_transpose_forward",
    "max_pool_forward",
    "max_pool_backward",
    "avg_pool_forward",
    "avg_pool_backward",
]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def as_tuple(v, n):
    """Normalise ``v`` (an int or a sequence) to a tuple of ``n`` Python ints.

    An int, or a sequence of length 1, is repeated ``n`` times; a longer
    sequence is converted element-wise.
    """
    try:
        i = operator.index(v)
    except TypeError:
        t = tuple(int(e) for e in v)
        if len(t) == 1 and n != 1:
            t = t * n
        return t
    return (int(i),) * n


def conv_output_shape(in_spatial, kernel, stride, padding, dilation):
    """Output spatial sizes of a convolution / pooling (PyTorch floor formula).

    ``out = (in + 2*padding - dilation*(kernel - 1) - 1) // stride + 1``
    """
    n = len(in_spatial)
    kernel, stride = as_tuple(kernel, n), as_tuple(stride, n)
    padding, dilation = as_tuple(padding, n), as_tuple(dilation, n)
    return tuple(
        (i + 2 * p - d * (k - 1) - 1) // s + 1
        for i, k, s, p, d in zip(in_spatial, kernel, stride, padding, dilation)
    )


def conv_transpose_output_shape(in_spatial, kernel, stride, padding,
                                output_padding, dilation):
    """Output spatial sizes of a transposed convolution (PyTorch formula).

    ``out = (in - 1)*stride - 2*padding + dilation*(kernel - 1)
    + output_padding + 1``
    """
    n = len(in_spatial)
    kernel, stride = as_tuple(kernel, n), as_tuple(stride, n)
    padding, dilation = as_tuple(padding, n), as_tuple(dilation, n)
    output_padding = as_tuple(output_padding, n)
    return tuple(
        (i - 1) * s - 2 * p + d * (k - 1) + op + 1
        for i, k, s, p, op, d in zip(in_spatial, kernel, stride, padding,
                                     output_padding, dilation)
    )


def _pad_spatial(xp, x, padding, value=0):
    """Pad the trailing spatial dims of ``x`` symmetrically by ``padding``."""
    if not any(padding):
        return x
    pad_width = [(0, 0)] * (x.ndim - len(padding)) + [(p, p) for p in padding]
    return xp.pad(x, pad_width, mode="constant", constant_values=value)


def _windows(xp, xpad, out, kernel, stride, dilation):
    """Strided view ``(N, C, *out, *K)`` of sliding windows over ``xpad``."""
    nd = len(kernel)
    lead = xpad.shape[: xpad.ndim - nd]
    lead_strides = xpad.strides[: xpad.ndim - nd]
    sp_strides = xpad.strides[xpad.ndim - nd:]
    shape = tuple(lead) + tuple(out) + tuple(kernel)
    strides = (
        tuple(lead_strides)
        + tuple(st * s for st, s in zip(sp_strides, stride))
        + tuple(st * d for st, d in zip(sp_strides, dilation))
    )
    return xp.lib.stride_tricks.as_strided(xpad, shape=shape, strides=strides)


def _offset_slices(offset, out, stride, dilation):
    """Slices of the padded input touched by kernel offset ``offset``."""
    return tuple(
        slice(k * d, k * d + s * (o - 1) + 1, s)
        for k, o, s, d in zip(offset, out, stride, dilation)
    )


def _crop(padding, spatial):
    return tuple(slice(p, p + n) for p, n in zip(padding, spatial))


def _im2col(xp, x, kernel, stride, padding, dilation, groups, batched):
    """im2col of ``x``; returns the columns and the output spatial size.

    ``batched=True``: columns ``(N, G, Cg*prod(K), prod(out))`` (one small
    matrix per sample, cache friendly on CPU); ``batched=False``: columns
    ``(G, Cg*prod(K), N*prod(out))`` (one large matrix per group).
    Either way it is a single copy out of an ``as_strided`` window view whose
    innermost axis follows the innermost spatial axis of the input.
    """
    nd = len(kernel)
    n, c = x.shape[:2]
    out = conv_output_shape(x.shape[2:], kernel, stride, padding, dilation)
    xpad = _pad_spatial(xp, x, padding)
    win = _windows(xp, xpad, out, kernel, stride, dilation)  # (N,C,*out,*K)
    win = win.reshape((n, groups, c // groups) + tuple(out) + tuple(kernel))
    k_axes = tuple(range(3 + nd, 3 + 2 * nd))
    o_axes = tuple(range(3, 3 + nd))
    rows = (c // groups) * math.prod(kernel)
    if batched:
        cols = win.transpose((0, 1, 2) + k_axes + o_axes).reshape(
            n, groups, rows, math.prod(out))
    else:
        cols = win.transpose((1, 2) + k_axes + (0,) + o_axes).reshape(
            groups, rows, n * math.prod(out))
    return cols, out


# ---------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------


def conv_forward(xp, x, w, *, stride=1, padding=0, dilation=1, groups=1):
    """Grouped N-d convolution (cross-correlation), PyTorch ``convNd``.

    x: ``(N, C, *S)``; w: ``(O, C // groups, *K)`` -> ``(N, O, *out)`` with
    ``out = conv_output_shape(S, K, stride, padding, dilation)``.
    Implemented as im2col (``as_strided`` over the zero-padded input) followed
    by one batched matmul over (sample, group).
    """
    nd = x.ndim - 2
    kernel = tuple(w.shape[2:])
    stride, padding = as_tuple(stride, nd), as_tuple(padding, nd)
    dilation = as_tuple(dilation, nd)
    n, o = x.shape[0], w.shape[0]
    cols, out = _im2col(xp, x, kernel, stride, padding, dilation, groups,
                        batched=True)                    # (N, G, CgKp, L)
    wm = w.reshape(groups, o // groups, -1)              # (G, Og, CgKp)
    y = xp.matmul(wm, cols)                              # (N, G, Og, L)
    return y.reshape((n, o) + tuple(out))


def conv_input_grad(xp, g, w, *, input_shape, stride=1, padding=0,
                    dilation=1, groups=1):
    """Gradient of :func:`conv_forward` w.r.t. its input (transposed conv).

    g: ``(N, O, *out)``; w: ``(O, C // groups, *K)`` -> ``dx`` of shape
    ``input_shape`` = ``(N, C, *S)``.  Columns ``w^T @ g`` are scattered back
    (col2im) by adding one strided slice per kernel offset into a zero-padded
    buffer, whose padding is then cropped.
    """
    nd = g.ndim - 2
    kernel = tuple(w.shape[2:])
    stride, padding = as_tuple(stride, nd), as_tuple(padding, nd)
    dilation = as_tuple(dilation, nd)
    n, o = g.shape[:2]
    out = tuple(g.shape[2:])
    c = input_shape[1]
    spatial = tuple(input_shape[2:])
    # One large matmul per group: (G, CgKp, Og) @ (G, Og, N*L).  The columns
    # come out as (C, *K, N, *out), so each kernel offset's slice is a set of
    # long contiguous runs (much faster to scatter than per-sample columns).
    gm = xp.ascontiguousarray(g.reshape(n, o, -1).transpose(1, 0, 2))
    gm = gm.reshape(groups, o // groups, -1)                    # (G, Og, N*L)
    wm = w.reshape(groups, o // groups, -1).transpose(0, 2, 1)  # (G, CgKp, Og)
    cols = xp.matmul(wm, gm)                                    # (G,CgKp,N*L)
    cols = cols.reshape((c,) + kernel + (n,) + out)             # (C,*K,N,*out)
    padded = tuple(s + 2 * p for s, p in zip(spatial, padding))
    buf = xp.zeros((c, n) + padded, dtype=cols.dtype)
    full = (slice(None), slice(None))
    for offset in itertools.product(*(range(k) for k in kernel)):
        buf[full + _offset_slices(offset, out, stride, dilation)] += \
            cols[(slice(None),) + offset]
    buf = buf[full + _crop(padding, spatial)]
    return xp.ascontiguousarray(buf.transpose((1, 0) + tuple(range(2, 2 + nd))))


def conv_weight_grad(xp, x, g, *, weight_shape, stride=1, padding=0,
                     dilation=1, groups=1):
    """Gradient of :func:`conv_forward` w.r.t. its weight.

    x: ``(N, C, *S)``; g: ``(N, O, *out)`` -> ``dw`` of shape
    ``weight_shape`` = ``(O, C // groups, *K)``.
    """
    nd = x.ndim - 2
    kernel = tuple(weight_shape[2:])
    stride, padding = as_tuple(stride, nd), as_tuple(padding, nd)
    dilation = as_tuple(dilation, nd)
    n, o = g.shape[:2]
    cols, _ = _im2col(xp, x, kernel, stride, padding, dilation, groups,
                      batched=False)                     # (G, CgKp, N*L)
    gm = xp.ascontiguousarray(g.reshape(n, o, -1).transpose(1, 0, 2))
    gm = gm.reshape(groups, o // groups, -1)             # (G, Og, N*L)
    # (cols @ g^T)^T: the long contraction runs over contiguous rows of both.
    dwt = xp.matmul(cols, gm.transpose(0, 2, 1))         # (G, CgKp, Og)
    return xp.ascontiguousarray(dwt.transpose(0, 2, 1)).reshape(
        tuple(weight_shape))


def conv_transpose_forward(xp, x, w, *, stride=1, padding=0, output_padding=0,
                           dilation=1, groups=1):
    """Grouped N-d transposed convolution, PyTorch ``conv_transposeNd``.

    x: ``(N, C_in, *S)``; w: ``(C_in, C_out // groups, *K)`` ->
    ``(N, C_out, *out)`` with ``out = conv_transpose_output_shape(...)``.
    It is the input gradient of a convolution whose weight is ``w``.
    """
    nd = x.ndim - 2
    kernel = tuple(w.shape[2:])
    stride, padding = as_tuple(stride, nd), as_tuple(padding, nd)
    dilation = as_tuple(dilation, nd)
    output_padding = as_tuple(output_padding, nd)
    out = conv_transpose_output_shape(x.shape[2:], kernel, stride, padding,
                                      output_padding, dilation)
    c_out = w.shape[1] * groups
    return conv_input_grad(xp, x, w, input_shape=(x.shape[0], c_out) + out,
                           stride=stride, padding=padding, dilation=dilation,
                           groups=groups)


# ---------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------


def _lowest(xp, dtype):
    """Padding value for max pooling: ``-inf`` (or the dtype's minimum)."""
    if dtype.kind == "f":
        return -math.inf
    if dtype.kind == "b":
        return False
    return xp.iinfo(dtype).min


def _pool_params(nd, kernel_size, stride, padding, dilation=1):
    kernel = as_tuple(kernel_size, nd)
    stride = kernel if stride is None else as_tuple(stride, nd)
    return kernel, stride, as_tuple(padding, nd), as_tuple(dilation, nd)


def _offsets(kernel):
    """Kernel offsets in row-major window order."""
    return itertools.product(*(range(k) for k in kernel))


def _disjoint(kernel, stride, dilation):
    """True when no input element belongs to two windows (scatter by copy)."""
    return all(s >= d * (k - 1) + 1 for k, s, d in zip(kernel, stride, dilation))


# The pooling reductions run as one vectorised elementwise op per kernel
# offset over the ``(N, C, *out)`` strided slice of the padded input (the
# ``as_strided`` window view taken at that offset).  A reduction over the
# window axes of a reshaped / as_strided view is one kernel on CuPy but is
# 10-35x slower on NumPy (short non-contiguous reduction axes), so the offset
# loop is used on both; it also handles the tiled case (stride == kernel,
# no padding, no dilation) without a copy of the input.


_SAME_SIZE_INT = {2: "int16", 4: "int32", 8: "int64"}


def _select(xp, mask, g):
    """``where(mask, g, 0)``, branch-free for floating ``g``.

    NumPy's ``where`` is slow on unpredictable masks; AND-ing the bit pattern
    with ``-mask`` is exact (non-finite values included) and several times
    faster.
    """
    it = _SAME_SIZE_INT.get(g.dtype.itemsize)
    if g.dtype.kind != "f" or it is None:
        return xp.where(mask, g, g.dtype.type(0))
    it = getattr(xp, it)
    bits = xp.subtract(0, mask, dtype=it)                   # 0 or all ones
    return xp.bitwise_and(g.view(it), bits).view(g.dtype)


def max_pool_forward(xp, x, *, kernel_size, stride=None, padding=0,
                     dilation=1):
    """N-d max pooling (``ceil_mode=False``), padding with ``-inf``.

    x: ``(N, C, *S)`` -> ``(N, C, *out)`` with
    ``out = conv_output_shape(S, kernel_size, stride, padding, dilation)``.
    ``stride=None`` means ``stride = kernel_size``.  NaN propagates.
    """
    nd = x.ndim - 2
    kernel, stride, padding, dilation = _pool_params(
        nd, kernel_size, stride, padding, dilation)
    out = conv_output_shape(x.shape[2:], kernel, stride, padding, dilation)
    xpad = _pad_spatial(xp, x, padding, _lowest(xp, x.dtype))
    full = (slice(None), slice(None))
    y = None
    for offset in _offsets(kernel):
        v = xpad[full + _offset_slices(offset, out, stride, dilation)]
        if y is None:
            y = v.copy()
        else:
            xp.maximum(y, v, out=y)
    return y


def _window_argmax(xp, xpad, kernel, out, stride, dilation):
    """The position (row-major offset in the window) of each window's first
    maximum: PyTorch's tie rule; a NaN wins over numbers, the last NaN over
    earlier ones, as in PyTorch's CPU kernel."""
    full = (slice(None), slice(None))
    is_float = xpad.dtype.kind == "f"
    kp = math.prod(kernel)
    # Running (max, argmax) over the flattened window axis; the strict ">"
    # keeps the first maximum.
    best = arg = None
    for i, offset in enumerate(_offsets(kernel)):
        v = xpad[full + _offset_slices(offset, out, stride, dilation)]
        if best is None:
            best = v.copy()
            arg = xp.zeros(best.shape, dtype=xp.int8 if kp < 128 else xp.int32)
            continue
        upd = v > best
        if is_float:
            upd |= xp.isnan(v)
        # arg < i everywhere, so max(arg, upd * i) sets arg = i where upd.
        xp.maximum(arg, xp.multiply(upd, i, dtype=arg.dtype), out=arg)
        xp.maximum(best, v, out=best)
    return arg


def max_pool_gather(xp, x, c, *, kernel_size, stride=None, padding=0, dilation=1):
    """The adjoint of :func:`max_pool_backward` in its cotangent: each window
    of ``x`` reads ``c`` (shaped like ``x``) at its first maximum.

    x, c: ``(N, C, *S)`` -> ``(N, C, *out)``.  (The VJP of max_pool_backward,
    so max pooling has second derivatives.)"""
    nd = x.ndim - 2
    kernel, stride, padding, dilation = _pool_params(nd, kernel_size, stride, padding, dilation)
    out = conv_output_shape(x.shape[2:], kernel, stride, padding, dilation)
    arg = _window_argmax(xp, _pad_spatial(xp, x, padding, _lowest(xp, x.dtype)), kernel, out, stride, dilation)
    cpad = _pad_spatial(xp, c, padding, 0)
    full = (slice(None), slice(None))
    result = xp.zeros(tuple(c.shape[:2]) + tuple(out), dtype=c.dtype)
    for i, offset in enumerate(_offsets(kernel)):
        result += _select(xp, arg == i, cpad[full + _offset_slices(offset, out, stride, dilation)])
    return result


def max_pool_backward(xp, x, g, *, kernel_size, stride=None, padding=0,
                      dilation=1):
    """Gradient of :func:`max_pool_forward` w.r.t. ``x``.

    x: ``(N, C, *S)``; g: ``(N, C, *out)`` -> ``dx`` of shape ``x.shape``.
    Each window's gradient goes to its first maximal element in row-major
    window order (PyTorch's tie rule; a NaN wins over numbers, the last NaN
    over earlier ones, as in PyTorch's CPU kernel); overlapping windows
    accumulate.
    """
    nd = x.ndim - 2
    kernel, stride, padding, dilation = _pool_params(
        nd, kernel_size, stride, padding, dilation)
    out = tuple(g.shape[2:])
    xpad = _pad_spatial(xp, x, padding, _lowest(xp, x.dtype))
    full = (slice(None), slice(None))
    arg = _window_argmax(xp, xpad, kernel, out, stride, dilation)
    # Scatter each window's gradient to its argmax position.
    disjoint = _disjoint(kernel, stride, dilation)
    buf = xp.zeros(tuple(x.shape[:2]) + tuple(xpad.shape[2:]), dtype=g.dtype)
    for i, offset in enumerate(_offsets(kernel)):
        idx = full + _offset_slices(offset, out, stride, dilation)
        contrib = _select(xp, arg == i, g)
        if disjoint:
            buf[idx] = contrib
        else:
            buf[idx] += contrib
    if not any(padding):
        return buf
    return xp.ascontiguousarray(buf[full + _crop(padding, x.shape[2:])])


def _avg_divisor(xp, spatial, out, kernel, stride, padding, count_include_pad,
                 dtype):
    """Divisor of each output element: a scalar, or an ``out``-shaped array."""
    if count_include_pad or not any(padding):
        return math.prod(kernel)
    div = None
    for d, (n, o, k, s, p) in enumerate(zip(spatial, out, kernel, stride,
                                            padding)):
        start = xp.arange(o) * s - p
        cnt = (xp.minimum(start + k, n) - xp.maximum(start, 0)).astype(dtype)
        cnt = cnt.reshape((o,) + (1,) * (len(out) - d - 1))
        div = cnt if div is None else div * cnt
    return div


def avg_pool_forward(xp, x, *, kernel_size, stride=None, padding=0,
                     count_include_pad=True):
    """N-d average pooling (``ceil_mode=False``), zero padding.

    x: ``(N, C, *S)`` (floating) -> ``(N, C, *out)``.  With
    ``count_include_pad=False`` the divisor is the number of non-padding
    elements in each window.  ``stride=None`` means ``stride = kernel_size``.
    """
    nd = x.ndim - 2
    kernel, stride, padding, dilation = _pool_params(
        nd, kernel_size, stride, padding)
    out = conv_output_shape(x.shape[2:], kernel, stride, padding, dilation)
    xpad = _pad_spatial(xp, x, padding)
    full = (slice(None), slice(None))
    y = None
    for offset in _offsets(kernel):
        v = xpad[full + _offset_slices(offset, out, stride, dilation)]
        if y is None:
            y = v.copy()
        else:
            xp.add(y, v, out=y)
    y /= _avg_divisor(xp, x.shape[2:], out, kernel, stride, padding,
                      count_include_pad, x.dtype)
    return y


def avg_pool_backward(xp, g, *, input_shape, kernel_size, stride=None,
                      padding=0, count_include_pad=True):
    """Gradient of :func:`avg_pool_forward` w.r.t. its input.

    g: ``(N, C, *out)`` -> ``dx`` of shape ``input_shape`` = ``(N, C, *S)``.
    """
    nd = g.ndim - 2
    kernel, stride, padding, dilation = _pool_params(
        nd, kernel_size, stride, padding)
    out = tuple(g.shape[2:])
    spatial = tuple(input_shape[2:])
    gd = g / _avg_divisor(xp, spatial, out, kernel, stride, padding,
                          count_include_pad, g.dtype)
    padded = tuple(s + 2 * p for s, p in zip(spatial, padding))
    buf = xp.zeros(tuple(input_shape[:2]) + padded, dtype=gd.dtype)
    full = (slice(None), slice(None))
    disjoint = _disjoint(kernel, stride, dilation)
    for offset in _offsets(kernel):
        idx = full + _offset_slices(offset, out, stride, dilation)
        if disjoint:
            buf[idx] = gd
        else:
            buf[idx] += gd
    if not any(padding):
        return buf
    return xp.ascontiguousarray(buf[full + _crop(padding, spatial)])
