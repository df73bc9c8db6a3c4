"""Lowering the glue ops of batch-innermost convolutional stacks to kernels.

The activations are (C, *spatial, N) (avalon.passes.layout).  Each op below is
a loop nest whose innermost loop runs over the N contiguous batch entries, so
a C compiler vectorizes it; the kernel offsets of a window are unrolled, and
the range of output positions where an offset reads inside the input (not the
padding) is worked out at compile time, so no load is ever guarded:

* im2col_csn: columns (C, *K, *out, N) of x, zeros where an offset reads padding;
* col2im_csn: its adjoint, for each channel the plane zeroed and then every
  offset's columns added in, offset by offset (the order NumPy's version adds
  them in, so sums agree bit for bit);
* max_pool_csn and max_pool_csn_grad for windows that tile the input (stride
  equal to the kernel, no padding, no dilation: the convolutional stacks'
  2x2 pooling).  The gradient goes to each window's first element equal to
  the maximum, or to its last NaN (PyTorch's rule, as the NumPy kernels).

Each function takes the graph node and returns a `Kernel`, or None when the
op's attributes are outside what it handles (the NumPy kernel runs then).
They are the `lower` rules of the ops' registration blocks
(avalon.ops.layout_ops).
"""
from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np

from .ir import BOOL, Binary, Buffer, Call, Const, Index, Kernel, Let, Load, Loop, Select, Store, Update, Var, verify
from . import conv_templates
from .lower import kernel_dtype


class _Names:
    """Fresh variable names: every IR variable is defined once."""

    def __init__(self):
        self.count = itertools.count()

    def __call__(self, stem, dtype=None):
        name = f"{stem}{next(self.count)}"
        return Var(name) if dtype is None else Var(name, dtype)


def _pairs(padding):
    return tuple(tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in padding)


def _strides(shape):
    """Row-major element strides of `shape`."""
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= n
    return tuple(reversed(out))


def _valid(out_n, size, stride, offset):
    """[first, stop) of the output positions o with 0 <= o*stride + offset < size."""
    ok = [o for o in range(out_n) if 0 <= o * stride + offset < size]
    return (ok[0], ok[-1] + 1) if ok else (0, 0)


def _loops(ranges, names, body_of):
    """Nested loops over output positions (one per spatial axis, each over
    [start, stop)), then the batch; body_of(position terms, n var) gives the
    innermost statements.  Position terms: ((var, start), ...)."""
    vars_ = [names("o") for _ in ranges]

    def build(d, terms):
        if d == len(ranges):
            return body_of(terms)
        start, stop = ranges[d]
        if stop <= start:
            return ()
        return (Loop(vars_[d], stop - start, build(d + 1, terms + ((vars_[d].name, start),))),)
    return build(0, ())


def _index(terms, offset=0):
    """Index from ((var, stride), ...) dropping zero strides, plus offset."""
    return Index(tuple((v, s) for v, s in terms if s), offset)


def _spatial(node):
    """(C, spatial, N) of the node's batch-innermost input."""
    shape = tuple(node.inputs[0].shape)
    return shape[0], shape[1:-1], shape[-1]


def _out_spatial(spatial, kernel, stride, pads, dilation):
    return tuple((s + lo + hi - d * (k - 1) - 1) // st + 1
                 for s, k, st, (lo, hi), d in zip(spatial, kernel, stride, pads, dilation))


# -- im2col / col2im -------------------------------------------------------------------------------------------

def lower_im2col_csn(node):
    x = node.inputs[0]
    dtype = kernel_dtype(x.dtype)
    c, spatial, n = _spatial(node)
    kernel, stride, dilation = (tuple(node.attrs[k]) for k in ("kernel", "stride", "dilation"))
    pads = _pairs(node.attrs["padding"])
    out_sp = _out_spatial(spatial, kernel, stride, pads, dilation)
    if math.prod(node.shape) != c * math.prod(kernel) * math.prod(out_sp) * n:
        return None
    xb = Buffer("x", dtype, math.prod(x.shape), "in")
    ob = Buffer("out", dtype, math.prod(node.shape), "out")
    names, cv = _Names(), Var("c")
    sx, so = _strides(spatial), _strides(out_sp)
    plane_x, plane_o = math.prod(spatial) * n, math.prod(out_sp) * n
    zero = Const(0, dtype)
    per_c = []
    for kflat, offset in enumerate(itertools.product(*(range(k) for k in kernel))):
        shift = [o * d - lo for o, d, (lo, _) in zip(offset, dilation, pads)]
        valid = [_valid(m, s, st, sh) for m, s, st, sh in zip(out_sp, spatial, stride, shift)]
        col0 = kflat * plane_o
        # every combination of (before, inside, after) the valid range, per axis
        for parts in itertools.product(*[((0, a), (a, b), (b, m)) for (a, b), m in zip(valid, out_sp)]):
            inside = all(p == v for p, v in zip(parts, valid))

            def body(terms, inside=inside, col0=col0, shift=shift):
                dst = _index([(cv.name, math.prod(kernel) * plane_o)]
                             + [(v, so[d] * n) for d, (v, _) in enumerate(terms)],
                             col0 + sum(start * so[d] * n for d, (_, start) in enumerate(terms)))
                if not inside:
                    return _batch(names, n, ob, dst, None, zero)
                src = _index([(cv.name, plane_x)]
                             + [(v, st * sx[d] * n) for d, ((v, _), st) in enumerate(zip(terms, stride))],
                             sum((start * st + sh) * sx[d] * n
                                 for d, ((_, start), st, sh) in enumerate(zip(terms, stride, shift))))
                return _batch(names, n, ob, dst, (xb, src), zero)
            per_c += _loops(parts, names, body)
    return verify(Kernel(_name("im2col_csn", node), (xb, ob), (Loop(cv, c, tuple(per_c)),)))


def _batch(names, n, out, dst, src, zero):
    """The innermost loop over the batch: out[dst + b] = src[b] (or zero)."""
    b = names("b")
    dst = Index(dst.terms + ((b.name, 1),), dst.offset)
    if src is None:
        value = zero
    else:
        buf, ix = src
        value = Load(buf, Index(ix.terms + ((b.name, 1),), ix.offset))
    return (Loop(b, n, (Store(out, dst, value),)),)


def lower_col2im_csn(node):
    cols = node.inputs[0]
    dtype = kernel_dtype(cols.dtype)
    shape = tuple(node.attrs["input_shape"])
    c, spatial, n = shape[0], shape[1:-1], shape[-1]
    kernel, stride, dilation = (tuple(node.attrs[k]) for k in ("kernel", "stride", "dilation"))
    pads = _pairs(node.attrs["padding"])
    out_sp = _out_spatial(spatial, kernel, stride, pads, dilation)
    if math.prod(cols.shape) != c * math.prod(kernel) * math.prod(out_sp) * n:
        return None
    cb = Buffer("cols", dtype, math.prod(cols.shape), "in")
    ob = Buffer("out", dtype, math.prod(shape), "out")
    names, cv = _Names(), Var("c")
    sx, so = _strides(spatial), _strides(out_sp)
    plane_x, plane_o = math.prod(spatial) * n, math.prod(out_sp) * n
    z = names("z")
    per_c = [Loop(z, plane_x, (Store(ob, Index(((cv.name, plane_x), (z.name, 1))), Const(0, dtype)),))]
    for kflat, offset in enumerate(itertools.product(*(range(k) for k in kernel))):
        shift = [o * d - lo for o, d, (lo, _) in zip(offset, dilation, pads)]
        valid = [_valid(m, s, st, sh) for m, s, st, sh in zip(out_sp, spatial, stride, shift)]

        def body(terms, kflat=kflat, shift=shift):
            b = names("b")
            src = _index([(cv.name, math.prod(kernel) * plane_o)]
                         + [(v, so[d] * n) for d, (v, _) in enumerate(terms)] + [(b.name, 1)],
                         kflat * plane_o + sum(start * so[d] * n for d, (_, start) in enumerate(terms)))
            dst = _index([(cv.name, plane_x)]
                         + [(v, st * sx[d] * n) for d, ((v, _), st) in enumerate(zip(terms, stride))]
                         + [(b.name, 1)],
                         sum((start * st + sh) * sx[d] * n
                             for d, ((_, start), st, sh) in enumerate(zip(terms, stride, shift))))
            return (Loop(b, n, (Update(ob, dst, "add", Load(cb, src)),)),)
        per_c += _loops(valid, names, body)
    return verify(Kernel(_name("col2im_csn", node), (cb, ob), (Loop(cv, c, tuple(per_c)),)))


# -- max pooling over tiling windows ------------------------------------------------------------------------------

def _tiling(node, x_shape):
    """(kernel, out spatial) when the windows tile the input, else None."""
    kernel, stride, dilation = (tuple(node.attrs[k]) for k in ("kernel_size", "stride", "dilation"))
    pads = _pairs(node.attrs["padding"])
    if kernel != stride or any(d != 1 for d in dilation) or any(p for pair in pads for p in pair):
        return None
    return kernel, tuple(s // k for s, k in zip(x_shape[1:-1], kernel))


def _window_loads(names, xb, cv, terms, kernel, sx, n, plane_x, b):
    """The window's elements, in row-major offset order: [(flat x index, Let var)], lets."""
    lets, elems = [], []
    for offset in itertools.product(*(range(k) for k in kernel)):
        ix = _index([(cv.name, plane_x)] + [(v, k * sx[d] * n) for d, ((v, _), k) in enumerate(zip(terms, kernel))]
                    + [(b.name, 1)], sum(o * sx[d] * n for d, o in enumerate(offset)))
        v = names("x", xb.dtype)
        lets.append(Let(v, Load(xb, ix)))
        elems.append((ix, v))
    return elems, lets


def lower_max_pool_csn(node):
    x = node.inputs[0]
    dtype = kernel_dtype(x.dtype)
    c, spatial, n = _spatial(node)
    tiling = _tiling(node, x.shape)
    if tiling is None:
        return None
    kernel, out_sp = tiling
    xb, ob = Buffer("x", dtype, math.prod(x.shape), "in"), Buffer("out", dtype, math.prod(node.shape), "out")
    names, cv = _Names(), Var("c")
    sx, so = _strides(spatial), _strides(out_sp)
    plane_x, plane_o = math.prod(spatial) * n, math.prod(out_sp) * n

    def body(terms):
        b = names("b")
        elems, lets = _window_loads(names, xb, cv, terms, kernel, sx, n, plane_x, b)
        acc = elems[0][1]
        for _, v in elems[1:]:       # np.maximum(y, v) in offset order: NaN and ties as NumPy
            m = names("m", dtype)
            lets.append(Let(m, Call("max", (acc, v), dtype)))
            acc = m
        dst = _index([(cv.name, plane_o)] + [(v, so[d] * n) for d, (v, _) in enumerate(terms)] + [(b.name, 1)])
        return (Loop(b, n, tuple(lets) + (Store(ob, dst, acc),)),)
    loops = _loops(tuple((0, m) for m in out_sp), names, body)
    return verify(Kernel(_name("max_pool_csn", node), (xb, ob), (Loop(cv, c, tuple(loops)),)))


def lower_max_pool_csn_grad(node):
    x, y, g = node.inputs
    dtype = kernel_dtype(g.dtype)
    if np.dtype(x.dtype) != dtype or np.dtype(y.dtype) != dtype:
        return None
    c, spatial, n = _spatial(node)
    tiling = _tiling(node, x.shape)
    if tiling is None:
        return None
    kernel, out_sp = tiling
    size = math.prod(x.shape)
    xb, yb = Buffer("x", dtype, size, "in"), Buffer("y", dtype, math.prod(y.shape), "in")
    gb, ob = Buffer("g", dtype, math.prod(g.shape), "in"), Buffer("out", dtype, size, "out")
    names, cv = _Names(), Var("c")
    sx, so = _strides(spatial), _strides(out_sp)
    plane_x, plane_o = math.prod(spatial) * n, math.prod(out_sp) * n
    zero, false = Const(0, dtype), Const(False, BOOL)
    stmts = []
    if any(k * m != s for k, m, s in zip(kernel, out_sp, spatial)):   # rows/columns no window covers
        z = names("z")
        stmts.append(Loop(z, plane_x, (Store(ob, Index(((cv.name, plane_x), (z.name, 1))), zero),)))

    def body(terms):
        b = names("b")
        elems, lets = _window_loads(names, xb, cv, terms, kernel, sx, n, plane_x, b)
        at = _index([(cv.name, plane_o)] + [(v, so[d] * n) for d, (v, _) in enumerate(terms)] + [(b.name, 1)])
        yv, gv = names("y", dtype), names("g", dtype)
        lets += [Let(yv, Load(yb, at)), Let(gv, Load(gb, at))]
        # winner: the first element equal to y, or (a window holding NaN) the last NaN
        taken, winner = false, Const(0, np.int64)
        for i, (_, v) in enumerate(elems):
            hit = names("h", BOOL)
            first = Binary("and", Binary("eq", v, yv, BOOL), Binary("eq", taken, false, BOOL), BOOL)
            if dtype.kind == "f":
                first = Binary("or", first, Binary("ne", v, v, BOOL), BOOL)
            lets.append(Let(hit, first))
            t, w = names("t", BOOL), names("w", np.int64)
            lets += [Let(t, Binary("or", taken, Binary("eq", v, yv, BOOL), BOOL)),
                     Let(w, Select(hit, Const(i, np.int64), winner, np.dtype(np.int64)))]
            taken, winner = t, w
        stores = [Store(ob, ix, Select(Binary("eq", winner, Const(i, np.int64), BOOL), gv, zero, dtype))
                  for i, (ix, _) in enumerate(elems)]
        return (Loop(b, n, tuple(lets) + tuple(stores)),)
    stmts += _loops(tuple((0, m) for m in out_sp), names, body)
    return verify(Kernel(_name("max_pool_csn_grad", node), (xb, yb, gb, ob), (Loop(cv, c, tuple(stmts)),)))


def _name(op, node):
    """A kernel name unique to the op, its shapes, dtypes and attributes."""
    sig = repr((op, tuple(tuple(i.shape) for i in node.inputs), tuple(str(i.dtype) for i in node.inputs),
                tuple(node.shape), sorted((k, repr(v)) for k, v in node.attrs.items())))
    return f"avl_{op}_{hashlib.sha1(sig.encode()).hexdigest()[:12]}"


# -- direct convolutions (C templates: kernel_ir.conv_templates) ------------------------------------------------

#: the shortest row (output width x batch) a direct convolution takes: its tiles
#: are rows of vectors, and shorter rows run mostly in the scalar tail (one image,
#: N = 1, is im2col + matrix product)
DIRECT_MIN_ROW = 64


#: a strided direct convolution's batch (the images of one column) is a whole
#: number of vectors of this many elements: its columns are not contiguous
STRIDED_BATCH_MULTIPLE = 16


def direct_conv_geometry(x_shape, w_shape, attrs, dtype, *, unit_stride=False):
    """The template arguments of a direct convolution of batch-innermost
    activations x (C, H, W, N) with a weight (O, C, KH, KW), or None when the
    templates do not cover it: two spatial axes, stride 1, no dilation, a
    float32/float64 dtype, each padding before an axis at most its kernel
    extent - 1 (so the input gradient's padding is not negative), rows of at
    least DIRECT_MIN_ROW elements.  Stride 1, or any stride with a batch that
    is a multiple of STRIDED_BATCH_MULTIPLE (the forward and the weight
    gradient: unit_stride=False)."""
    if len(x_shape) != 4 or len(w_shape) != 4 or not conv_templates.supported(dtype):
        return None
    stride = tuple(int(v) for v in attrs["stride"])
    if any(d != 1 for d in attrs["dilation"]) or len(stride) != 2:
        return None
    if stride != (1, 1) and (unit_stride or x_shape[-1] % STRIDED_BATCH_MULTIPLE):
        return None
    pads = _pairs(attrs["padding"])
    kernel = tuple(w_shape[2:])
    if any(not 0 <= lo <= k - 1 or hi < 0 for (lo, hi), k in zip(pads, kernel)):
        return None
    spatial = tuple(x_shape[1:3])
    out_sp = _out_spatial(spatial, kernel, stride, pads, (1, 1))
    if min(out_sp) < 1 or w_shape[1] != x_shape[0]:
        return None
    if min(out_sp[1], spatial[1]) * x_shape[-1] < DIRECT_MIN_ROW:
        return None   # rows too short for the vector tiles: one image, a narrow batch

    return dict(channels=x_shape[0], out_channels=w_shape[0], spatial=spatial, out_spatial=out_sp,
                batch=x_shape[-1], kernel=kernel, pad_lo=tuple(lo for lo, _ in pads), stride=stride)


def _direct(node, make, x_shape, w_shape, names, unit_stride=False):
    dtype = kernel_dtype(node.dtype)
    geo = direct_conv_geometry(x_shape, w_shape, node.attrs, dtype, unit_stride=unit_stride)
    if geo is None:
        return None
    params = tuple(Buffer(n, dtype, math.prod(i.shape), "in") for n, i in zip(names, node.inputs))
    out = Buffer("out", dtype, math.prod(node.shape), "out")
    template = make(dtype, **geo)   # its buffer names are the templates' defaults: `names`, then out
    return verify(Kernel(_name(node.op, node), params + (out,), (), template=template))


def lower_conv_csn(node):
    x, w = node.inputs
    return _direct(node, conv_templates.conv_forward, tuple(x.shape), tuple(w.shape), ("x", "w"))


def lower_conv_csn_input_grad(node):
    g, w = node.inputs
    return _direct(node, conv_templates.conv_input_grad, tuple(node.shape), tuple(w.shape), ("g", "w"),
                   unit_stride=True)


def lower_conv_csn_weight_grad(node):
    x, g = node.inputs
    return _direct(node, conv_templates.conv_weight_grad, tuple(x.shape), tuple(node.shape), ("x", "g"))
