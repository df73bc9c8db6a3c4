"""Neural-network primitives: N-d convolution, transposed convolution, max and
average pooling, in PyTorch's layout (activations (N, C, *spatial), weights
(O, C/groups, *K), transposed-convolution weights (C_in, C_out/groups, *K)).

Primitives (one registration block each; attributes are static tuples/ints):

* conv(x, w)                  stride, padding, dilation, groups
* conv_input_grad(g, w)       input_shape + conv's attributes (a transposed conv)
* conv_weight_grad(x, g)      weight_shape + conv's attributes
* conv_transpose(x, w)        stride, padding, output_padding, dilation, groups
* max_pool(x)                 kernel_size, stride, padding, dilation
* max_pool_grad(x, g)         the same attributes
* max_pool_gather(x, c)       the same attributes (max_pool_grad's VJP)
* avg_pool(x)                 kernel_size, stride, padding, count_include_pad
* avg_pool_grad(g)            input_shape + avg_pool's attributes
* check_labels(t)             num_classes, ignore_index, name, loc, traced_shape
* binary_cross_entropy(x, t)  (elementwise)

The convolution attribute ``padding`` holds one entry per spatial axis: an int
(the same on both sides) or a (low, high) pair (padding="same" with an even
dilated kernel pads one more on the high side, as PyTorch does).  The VJPs are
written with these primitives, so the backward pass of a convolution is itself
differentiable (conv, conv_input_grad and conv_weight_grad are bilinear and
each one's VJP is made of the other two).

The public functions follow torch.nn.functional's signatures and defaults:
conv1d/2d/3d, conv_transpose1d/2d/3d, max_pool1d/2d/3d, avg_pool1d/2d/3d,
adaptive_avg_pool1d/2d/3d, adaptive_max_pool1d/2d/3d (divisible sizes only).
Each accepts an unbatched input (no N axis) as PyTorch does.

Batching rules (avalon.vmap) run a batch of examples as ONE call of the same
primitive: examples that share the weight are more images (folded into N);
examples with weights of their own are more channels, or more groups, of a
grouped convolution, which keeps them apart exactly (see _conv_batching).
"""
from __future__ import annotations

import math
import operator

import numpy as np

from ..errors import AvalonError, DtypeError, LabelError, ShapeError, at, user_location
from ..kernels import conv as K
from ..kernel_ir import glue
from ..kernels.conv_csn import column_tile_rows
from ..primitive import PRIMITIVES, Tracer, bind, current_location, defprim
from ._batching import NOT_MAPPED, align_for_broadcast, batch_size, broadcast_batch, fold_batch, unfold_batch
from ._layout import CSN, NC, POINTWISE, batch_innermost, to_csn
from ._rules import elementwise_rule
from ._sharding import P, R, S, NoSplit, on_sharded, pointwise
from .layout_ops import im2col_shape
from .elementwise import _promote, add, div, gt, log, maximum, mul, sub, where
from .reduce import sum_to
from .shape import reshape

__all__ = [
    "conv", "conv_transpose", "max_pool", "avg_pool",
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "max_pool1d", "max_pool2d", "max_pool3d", "maxpool2d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "check_labels", "LabelError", "binary_cross_entropy",
]

_SPATIAL = {1: "(L)", 2: "(H, W)", 3: "(D, H, W)"}
_LAYOUT = {1: "(N, C, L)", 2: "(N, C, H, W)", 3: "(N, C, D, H, W)"}


# -- shared checks -------------------------------------------------------------------------------

def _t(shape):
    return tuple(int(s) for s in shape)


def _pairs(padding):
    """The padding attribute -> one (low, high) pair per spatial axis."""
    return tuple((int(p), int(p)) if isinstance(p, (int, np.integer)) else (int(p[0]), int(p[1]))
                 for p in padding)


def _split_padding(padding):
    """(symmetric padding the kernels apply, extra padding on the high side)."""
    pairs = _pairs(padding)
    return tuple(lo for lo, _ in pairs), tuple(hi - lo for lo, hi in pairs)


def _pad_str(padding):
    pairs = _pairs(padding)
    return str(tuple(lo if lo == hi else (lo, hi) for lo, hi in pairs))


def _check_float(op, names_avals):
    dts = [(name, np.dtype(a.dtype)) for name, a in names_avals]
    for name, dt in dts:
        if dt.kind != "f":
            raise DtypeError(f"{op}: {name} has dtype {dt.name}, but it needs floating-point arrays; "
                             f"cast it first ({name}.astype('float32'))")
    (n0, d0) = dts[0]
    for name, dt in dts[1:]:
        if dt != d0:
            raise DtypeError(f"{op}: {n0} is {d0.name} but {name} is {dt.name}; cast one of them so that "
                             f"both have the same dtype (e.g. {name}.astype('{d0.name}'))")
    return d0


def _check_params(op, stride=None, padding=None, dilation=None, groups=None, output_padding=None,
                  kernel_size=None):
    def positive(name, v):
        if v is not None and any(int(e) < 1 for e in v):
            raise ShapeError(f"{op}: {name} must be >= 1 in every axis, got {tuple(v)}")

    positive("stride", stride)
    positive("dilation", dilation)
    positive("kernel_size", kernel_size)
    if padding is not None and any(e < 0 for pair in _pairs(padding) for e in pair):
        raise ShapeError(f"{op}: padding must be >= 0 in every axis, got {_pad_str(padding)}")
    if output_padding is not None and any(int(e) < 0 for e in output_padding):
        raise ShapeError(f"{op}: output_padding must be >= 0 in every axis, got {tuple(output_padding)}")
    if groups is not None and int(groups) < 1:
        raise ShapeError(f"{op}: groups must be >= 1, got {groups}")


def _check_ranks(op, xs, ws, nd_attr):
    nd = len(xs) - 2
    if not 1 <= nd <= 3:
        raise ShapeError(f"{op}: the input must have shape (N, C, *spatial) with 1 to 3 spatial axes, "
                         f"got shape {xs}")
    if len(ws) != len(xs):
        raise ShapeError(f"{op}: input {xs} and weight {ws} must have the same rank: input (N, C, *spatial) "
                         f"and weight (C_out, C_in/groups, *kernel) with one kernel size per spatial axis")
    if len(nd_attr) != nd:
        raise ShapeError(f"{op}: {len(nd_attr)} values given per spatial axis for an input with {nd} spatial "
                         f"axes ({xs})")
    return nd


def _output_spatial(op, spatial, kernel, stride, padding, dilation, kind="kernel"):
    """Output sizes of a sliding window; a clear error where the window does not fit."""
    pairs = _pairs(padding)
    out = []
    for s, k, st, (lo, hi), d in zip(spatial, kernel, stride, pairs, dilation):
        extent = d * (k - 1) + 1
        if extent > s + lo + hi:
            padded = tuple(sp + a + b for sp, (a, b) in zip(spatial, pairs))
            dil = f" dilated by {tuple(dilation)} to extent " if any(e != 1 for e in dilation) else " of extent "
            ext = tuple(e * (kk - 1) + 1 for e, kk in zip(dilation, kernel))
            raise ShapeError(f"{op}: {kind} {tuple(kernel)}{dil}{ext} is larger than the padded input "
                             f"{padded} (input spatial size {tuple(spatial)} + padding {_pad_str(padding)} "
                             f"on both sides); use a smaller {kind}{' or dilation' if kind == 'kernel' else ''}"
                             f", more padding, or a larger input")
        out.append((s + lo + hi - extent) // st + 1)
    return tuple(out)


# -- how the batch split and the batch-innermost layout treat these ops ------------------------

def _batch_on_axis0(*data):
    """The sharding rule of an op over (N, C, ...) activations: the operands at
    positions `data` carry the batch on axis 0, the others (weights) are replicated."""
    def sharding(node, states, ctx):
        if all((s == S(0)) if k in data else (s == R) for k, s in enumerate(states)):
            return S(0)
        raise NoSplit(f"{node.op}: sharded weight or unsharded data")
    return on_sharded(sharding)


# In the batch-innermost layout a convolution is im2col_csn and one matmul (its
# input gradient a matmul and col2im_csn): the forward product and the weight
# gradient read the same columns of the layer input, which CSE computes once.
# Where those columns exceed a size budget, the convolution and each of its
# gradients are one tiled op instead (conv_csn, conv_csn_input_grad,
# conv_csn_weight_grad), which builds them a few output rows at a time.

def _geometry(node):
    return {k: node.attrs[k] for k in ("stride", "padding", "dilation")}


def _tile_rows(x_csn_shape, kernel, out_csn_shape, node):
    """Output rows per tile when the columns of the layer input (C, *S, N)
    exceed the size budget, else None (the columns are built whole)."""
    cols = im2col_shape(tuple(x_csn_shape), kernel, **_geometry(node))
    return column_tile_rows(cols, tuple(out_csn_shape[1:-1]), np.dtype(node.dtype).itemsize)


def _direct(rw, x_shape, w_shape, node, unit_stride=False):
    """Output rows per tile of the NumPy fallback when the layout pass may use
    direct convolutions (C templates, kernel_ir.conv_templates: the CPU backend
    asks for them where it builds C kernels) and this one fits them; else None.
    unit_stride: the input gradient, whose template takes stride 1 only."""
    if not rw.options.get("direct_convs"):
        return None
    geo = glue.direct_conv_geometry(to_csn(x_shape), tuple(w_shape), node.attrs, node.dtype,
                                    unit_stride=unit_stride)
    if geo is None:
        return None
    cols = im2col_shape(to_csn(x_shape), tuple(w_shape[2:]), **_geometry(node))
    rows = column_tile_rows(cols, geo["out_spatial"], np.dtype(node.dtype).itemsize)
    return rows if rows is not None else geo["out_spatial"][0]


def _tiled(rw, op, inputs, node, tile_rows, shape, **attrs):
    return rw.emit(op, inputs, dict(attrs, tile_rows=tile_rows, **_geometry(node)), shape, node.dtype, node.loc)


def _columns(rw, x, kernel, node):
    xc = rw.get(x, CSN)
    shape = im2col_shape(xc.shape, kernel, **_geometry(node))
    return rw.emit("im2col_csn", [xc], dict(kernel=tuple(kernel), **_geometry(node)), shape, node.dtype,
                   node.loc)


def _matrix(rw, v, shape, node):
    return v if tuple(v.shape) == shape else rw.emit("reshape", [v], {"shape": shape}, shape, node.dtype,
                                                     node.loc)


def _product(rw, a, b, node):
    return rw.emit("matmul", [a, b], {}, (a.shape[0], b.shape[1]), node.dtype, node.loc)


def _transposed(rw, v, node):
    return rw.emit("transpose", [v], {"perm": (1, 0)}, (v.shape[1], v.shape[0]), node.dtype, node.loc)


# -- conv ------------------------------------------------------------------------------------------

def _conv_check(op, xs, ws, *, stride, padding, dilation, groups):
    xs, ws = _t(xs), _t(ws)
    nd = _check_ranks(op, xs, ws, stride)
    if len(padding) != nd or len(dilation) != nd:
        raise ShapeError(f"{op}: padding {_pad_str(padding)} and dilation {tuple(dilation)} need one value "
                         f"per spatial axis of the input {xs}")
    _check_params(op, stride=stride, padding=padding, dilation=dilation, groups=groups)
    c, o, cg = xs[1], ws[0], ws[1]
    if o % groups:
        raise ShapeError(f"{op}: weight {ws} has {o} output channels, which is not divisible by "
                         f"groups = {groups}")
    if c != cg * groups:
        raise ShapeError(f"{op}: input has {c} channels but weight {ws} expects {cg * groups} "
                         f"(in_channels/groups = {cg}, groups = {groups}); input shape {xs}. The weight "
                         f"layout is (out_channels, in_channels/groups, *kernel)")
    out = _output_spatial(op, xs[2:], ws[2:], stride, padding, dilation)
    return (xs[0], o) + out


def _conv_rule(x, w, *, stride, padding, dilation, groups):
    shape = _conv_check("conv", x.shape, w.shape, stride=stride, padding=padding, dilation=dilation,
                        groups=groups)
    return shape, _check_float("conv", [("input", x), ("weight", w)])


def _pad_high(xp, x, extra):
    if not any(extra):
        return x
    return xp.pad(x, [(0, 0), (0, 0)] + [(0, e) for e in extra])


def _conv_impl(xp, x, w, *, stride, padding, dilation, groups):
    lo, extra = _split_padding(padding)
    return K.conv_forward(xp, _pad_high(xp, x, extra), w, stride=stride, padding=lo, dilation=dilation,
                          groups=groups)


def _conv_vjp(ct, out, x, w, *, stride, padding, dilation, groups):
    a = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return (bind(conv_input_grad_p, (ct, w), dict(input_shape=_t(x.shape), **a)),
            bind(conv_weight_grad_p, (x, ct), dict(weight_shape=_t(w.shape), **a)))


def _conv_as_columns(rw, node):
    x, w = node.inputs
    rows = _direct(rw, x.shape, w.shape, node) or _tile_rows(to_csn(x.shape), w.shape[2:], to_csn(node.shape), node)
    if rows is not None:
        return _tiled(rw, "conv_csn", [rw.get(x, CSN), rw.get(w, NC)], node, rows, to_csn(node.shape)), CSN
    cols = _columns(rw, x, w.shape[2:], node)
    y = _product(rw, _matrix(rw, rw.get(w, NC), (w.shape[0], cols.shape[0]), node), cols, node)
    return _matrix(rw, y, to_csn(node.shape), node), CSN


def _conv_batching(args, dims, *, groups, **geometry):
    """conv on a batch.  Shared weight: the examples are more images (N).
    Shared input, a weight per example: more output channels in each group
    (the weights' channels ordered (group, example, channel)).  Both mapped:
    the examples are groups, groups * B of them, each seeing only its own
    example's channels, so the result is exact (no cross-example terms)."""
    (x, w), (dx, dw), b = args, dims, batch_size(args, dims)
    if dw is NOT_MAPPED:
        return unfold_batch(bind(conv_p, (fold_batch(x, dx, 0), w), dict(geometry, groups=groups)), 0, b)
    if dx is NOT_MAPPED:
        y = bind(conv_p, (x, fold_batch(w, dw, 0, groups)), dict(geometry, groups=groups))
        return unfold_batch(y, 1, b, groups)
    y = bind(conv_p, (fold_batch(x, dx, 1), fold_batch(w, dw, 0)), dict(geometry, groups=b * groups))
    return unfold_batch(y, 1, b)


conv_p = defprim("conv", shape=_conv_rule, impl=_conv_impl, vjp=_conv_vjp,
                 sharding=_batch_on_axis0(0), layout=batch_innermost(_conv_as_columns), batching=_conv_batching,
                 doc="N-d grouped convolution (cross-correlation) of x (N, C, *S) with w (O, C/groups, *K).")


def _conv_input_grad_rule(g, w, *, input_shape, stride, padding, dilation, groups):
    op = "conv_input_grad"
    input_shape = _t(input_shape)
    expect = _conv_check(op, input_shape, w.shape, stride=stride, padding=padding, dilation=dilation,
                         groups=groups)
    if _t(g.shape) != expect:
        raise ShapeError(f"{op}: the cotangent has shape {_t(g.shape)}, but a conv of an input "
                         f"{input_shape} with weight {_t(w.shape)} gives {expect}")
    return input_shape, _check_float(op, [("cotangent", g), ("weight", w)])


def _conv_input_grad_impl(xp, g, w, *, input_shape, stride, padding, dilation, groups):
    lo, extra = _split_padding(padding)
    shape = tuple(input_shape[:2]) + tuple(s + e for s, e in zip(input_shape[2:], extra))
    r = K.conv_input_grad(xp, g, w, input_shape=shape, stride=stride, padding=lo, dilation=dilation,
                          groups=groups)
    if any(extra):
        r = xp.ascontiguousarray(r[(slice(None), slice(None)) + tuple(slice(0, s) for s in input_shape[2:])])
    return r


def _conv_input_grad_vjp(ct, out, g, w, *, input_shape, stride, padding, dilation, groups):
    # <ct, conv_input_grad(g, w)> = <conv(ct, w), g>
    a = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return (bind(conv_p, (ct, w), a),
            bind(conv_weight_grad_p, (ct, g), dict(weight_shape=_t(w.shape), **a)))


def _conv_input_grad_from_columns(rw, node):
    g, w = node.inputs
    gc = rw.get(g, CSN)
    rows = (_direct(rw, node.shape, w.shape, node, unit_stride=True)
            or _tile_rows(to_csn(node.shape), w.shape[2:], to_csn(g.shape), node))
    if rows is not None:
        return _tiled(rw, "conv_csn_input_grad", [gc, rw.get(w, NC)], node, rows, to_csn(node.shape),
                      input_shape=to_csn(node.attrs["input_shape"])), CSN
    o = w.shape[0]
    cols = _product(rw, _transposed(rw, _matrix(rw, rw.get(w, NC), (o, w.size // o), node), node),
                    _matrix(rw, gc, (o, gc.size // o), node), node)
    attrs = dict(input_shape=to_csn(node.attrs["input_shape"]), kernel=tuple(w.shape[2:]), **_geometry(node))
    return rw.emit("col2im_csn", [cols], attrs, to_csn(node.shape), node.dtype, node.loc), CSN


def _conv_input_grad_batching(args, dims, *, input_shape, groups, **geometry):
    """conv_input_grad on a batch, as conv's rule: a shared weight folds the
    examples into N; a weight per example gives each group more input
    channels (ordered (group, example, channel)), or, with g mapped too,
    makes the examples groups."""
    (g, w), (dg, dw), b = args, dims, batch_size(args, dims)
    n, c, spatial = input_shape[0], input_shape[1], tuple(input_shape[2:])
    if dw is NOT_MAPPED:
        attrs = dict(geometry, groups=groups, input_shape=(b * n, c) + spatial)
        return unfold_batch(bind(conv_input_grad_p, (fold_batch(g, dg, 0), w), attrs), 0, b)
    attrs = dict(geometry, input_shape=(n, b * c) + spatial)
    if dg is NOT_MAPPED:
        dx = bind(conv_input_grad_p, (g, fold_batch(w, dw, 1)), dict(attrs, groups=groups))
        return unfold_batch(dx, 1, b, groups)
    dx = bind(conv_input_grad_p, (fold_batch(g, dg, 1), fold_batch(w, dw, 0)), dict(attrs, groups=b * groups))
    return unfold_batch(dx, 1, b)


conv_input_grad_p = defprim("conv_input_grad", shape=_conv_input_grad_rule, impl=_conv_input_grad_impl,
                            vjp=_conv_input_grad_vjp, output_shape_attr="input_shape",
                            sharding=_batch_on_axis0(0), layout=batch_innermost(_conv_input_grad_from_columns),
                            batching=_conv_input_grad_batching,
                            doc="Gradient of conv w.r.t. its input: a transposed convolution of g with w.")


def _conv_weight_grad_rule(x, g, *, weight_shape, stride, padding, dilation, groups):
    op = "conv_weight_grad"
    weight_shape = _t(weight_shape)
    expect = _conv_check(op, x.shape, weight_shape, stride=stride, padding=padding, dilation=dilation,
                         groups=groups)
    if _t(g.shape) != expect:
        raise ShapeError(f"{op}: the cotangent has shape {_t(g.shape)}, but a conv of an input "
                         f"{_t(x.shape)} with a weight {weight_shape} gives {expect}")
    return weight_shape, _check_float(op, [("input", x), ("cotangent", g)])


def _conv_weight_grad_impl(xp, x, g, *, weight_shape, stride, padding, dilation, groups):
    lo, extra = _split_padding(padding)
    return K.conv_weight_grad(xp, _pad_high(xp, x, extra), g, weight_shape=tuple(weight_shape), stride=stride,
                              padding=lo, dilation=dilation, groups=groups)


def _conv_weight_grad_vjp(ct, out, x, g, *, weight_shape, stride, padding, dilation, groups):
    # <ct, conv_weight_grad(x, g)> = <conv(x, ct), g>
    a = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return (bind(conv_input_grad_p, (g, ct), dict(input_shape=_t(x.shape), **a)),
            bind(conv_p, (x, ct), a))


def _conv_weight_grad_sharding(node, states, ctx):
    if states == [S(0), S(0)]:
        return P  # a sum over the batch: each thread has its share of it
    raise NoSplit("conv_weight_grad layout")


def _conv_weight_grad_from_columns(rw, node):
    x, g = node.inputs
    rows = _direct(rw, x.shape, node.shape, node) or _tile_rows(to_csn(x.shape), node.shape[2:], to_csn(g.shape), node)
    if rows is not None:
        return _tiled(rw, "conv_csn_weight_grad", [rw.get(x, CSN), rw.get(g, CSN)], node, rows, node.shape,
                      weight_shape=tuple(node.shape)), NC
    cols = _columns(rw, x, node.shape[2:], node)
    gm = _matrix(rw, rw.get(g, CSN), (g.shape[1], cols.shape[1]), node)
    return _matrix(rw, _product(rw, gm, _transposed(rw, cols, node), node), node.shape, node), NC


def _conv_weight_grad_batching(args, dims, *, weight_shape, groups, **geometry):
    """conv_weight_grad on a batch: one weight gradient per example, from one
    call.  It sums over N, so the examples cannot join N; they join the
    channels instead.  Both mapped (per-example gradients,
    vmap(grad(loss), in_axes=(None, 0, 0))): the examples are groups, groups * B
    of them; the kernel's one im2col and one matmul batched over groups give
    every example's gradient, summed over that example's own images only.
    Only x mapped: more input channels per group (weight (O, B*C/groups, *K));
    only g mapped: more output channels per group (weight (B*O, C/groups, *K))."""
    (x, g), (dx, dg), b = args, dims, batch_size(args, dims)
    o, cg, kernel = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
    if dg is NOT_MAPPED:
        attrs = dict(geometry, groups=groups, weight_shape=(o, b * cg) + kernel)
        return unfold_batch(bind(conv_weight_grad_p, (fold_batch(x, dx, 1, groups), g), attrs), 1, b)
    attrs = dict(geometry, weight_shape=(b * o, cg) + kernel)
    if dx is NOT_MAPPED:
        dw = bind(conv_weight_grad_p, (x, fold_batch(g, dg, 1, groups)), dict(attrs, groups=groups))
        return unfold_batch(dw, 0, b, groups)
    dw = bind(conv_weight_grad_p, (fold_batch(x, dx, 1), fold_batch(g, dg, 1)), dict(attrs, groups=b * groups))
    return unfold_batch(dw, 0, b)


conv_weight_grad_p = defprim("conv_weight_grad", shape=_conv_weight_grad_rule, impl=_conv_weight_grad_impl,
                             vjp=_conv_weight_grad_vjp, sharding=on_sharded(_conv_weight_grad_sharding),
                             layout=batch_innermost(_conv_weight_grad_from_columns, output=NC),
                             batching=_conv_weight_grad_batching,
                             doc="Gradient of conv w.r.t. its weight.")


# -- conv_transpose ----------------------------------------------------------------------------------

def _conv_transpose_check(op, xs, ws, *, stride, padding, output_padding, dilation, groups):
    xs, ws = _t(xs), _t(ws)
    nd = _check_ranks(op, xs, ws, stride)
    if len(padding) != nd or len(dilation) != nd or len(output_padding) != nd:
        raise ShapeError(f"{op}: padding, output_padding and dilation need one value per spatial axis of "
                         f"the input {xs}")
    if any(not isinstance(p, (int, np.integer)) for p in padding):
        raise ShapeError(f"{op}: padding must be one int per spatial axis, got {tuple(padding)}")
    _check_params(op, stride=stride, padding=padding, dilation=dilation, groups=groups,
                  output_padding=output_padding)
    c_in = xs[1]
    if ws[0] % groups:
        raise ShapeError(f"{op}: weight {ws} has {ws[0]} input channels, which is not divisible by "
                         f"groups = {groups}")
    if c_in != ws[0]:
        raise ShapeError(f"{op}: input has {c_in} channels but weight {ws} expects {ws[0]} (the weight layout "
                         f"of a transposed convolution is (in_channels, out_channels/groups, *kernel)); "
                         f"input shape {xs}")
    if any(op_ >= s for op_, s in zip(output_padding, stride)):
        raise ShapeError(f"{op}: output_padding {tuple(output_padding)} must be smaller than stride "
                         f"{tuple(stride)} in every axis")
    out = K.conv_transpose_output_shape(xs[2:], ws[2:], stride, padding, output_padding, dilation)
    if any(o < 1 for o in out):
        raise ShapeError(f"{op}: input {xs} with weight {ws}, stride {tuple(stride)}, padding {tuple(padding)} "
                         f"and dilation {tuple(dilation)} gives an empty output {out}; reduce the padding")
    return (xs[0], ws[1] * groups) + tuple(out)


def _conv_transpose_rule(x, w, **attrs):
    shape = _conv_transpose_check("conv_transpose", x.shape, w.shape, **attrs)
    return shape, _check_float("conv_transpose", [("input", x), ("weight", w)])


def _conv_transpose_impl(xp, x, w, *, stride, padding, output_padding, dilation, groups):
    return K.conv_transpose_forward(xp, x, w, stride=stride, padding=padding, output_padding=output_padding,
                                    dilation=dilation, groups=groups)


def _conv_transpose_vjp(ct, out, x, w, *, stride, padding, output_padding, dilation, groups):
    # conv_transpose(x, w) = conv_input_grad(x, w) with input_shape = out.shape (output_padding < stride
    # makes conv(ct, w) come back to x's shape exactly).
    a = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return (bind(conv_p, (ct, w), a),
            bind(conv_weight_grad_p, (ct, x), dict(weight_shape=_t(w.shape), **a)))


def _conv_transpose_batching(args, dims, *, groups, **geometry):
    """conv_transpose on a batch (a conv_input_grad; same folds): a shared
    weight folds the examples into N, a weight per example gives each group
    more output channels, or with x mapped too makes the examples groups."""
    (x, w), (dx, dw), b = args, dims, batch_size(args, dims)
    if dw is NOT_MAPPED:
        y = bind(conv_transpose_p, (fold_batch(x, dx, 0), w), dict(geometry, groups=groups))
        return unfold_batch(y, 0, b)
    if dx is NOT_MAPPED:
        y = bind(conv_transpose_p, (x, fold_batch(w, dw, 1)), dict(geometry, groups=groups))
        return unfold_batch(y, 1, b, groups)
    y = bind(conv_transpose_p, (fold_batch(x, dx, 1), fold_batch(w, dw, 0)), dict(geometry, groups=b * groups))
    return unfold_batch(y, 1, b)


conv_transpose_p = defprim("conv_transpose", shape=_conv_transpose_rule, impl=_conv_transpose_impl,
                           vjp=_conv_transpose_vjp, sharding=_batch_on_axis0(0), batching=_conv_transpose_batching,
                           doc="N-d grouped transposed convolution; w is (C_in, C_out/groups, *K).")


# -- pooling ---------------------------------------------------------------------------------------------

def _pool_check(op, xs, *, kernel_size, stride, padding, dilation=None, count_include_pad=None):
    xs = _t(xs)
    nd = len(xs) - 2
    if not 1 <= nd <= 3:
        raise ShapeError(f"{op}: the input must have shape (N, C, *spatial) with 1 to 3 spatial axes, "
                         f"got shape {xs}")
    dil = dilation if dilation is not None else (1,) * nd
    if not len(kernel_size) == len(stride) == len(padding) == len(dil) == nd:
        raise ShapeError(f"{op}: kernel_size {tuple(kernel_size)}, stride {tuple(stride)}, padding "
                         f"{tuple(padding)} need one value per spatial axis of the input {xs}")
    _check_params(op, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation)
    if any(2 * p > k for p, k in zip(padding, kernel_size)):
        raise ShapeError(f"{op}: padding {tuple(padding)} must be at most half the kernel_size "
                         f"{tuple(kernel_size)} in every axis (as in PyTorch)")
    out = _output_spatial(op, xs[2:], kernel_size, stride, padding, dil, kind="pooling window")
    return xs[:2] + out


def _pool_batching(name, shape_attr=None):
    """The batching rule of a pooling primitive or its gradient: pooling
    treats N and C alike, so the examples join one of them: C when every
    operand has them right before its channels (a reshape, no copy), else N.
    An operand the examples share (a cotangent's input) is broadcast first.
    `shape_attr` names an attribute holding the input's shape (avg_pool_grad)."""
    def rule(args, dims, **attrs):
        b = batch_size(args, dims)
        if any(d is NOT_MAPPED for d in dims):
            args, dims = [broadcast_batch(a, d, b) for a, d in zip(args, dims)], [0] * len(args)
        axis = 1 if all(d % len(a.shape) == 1 for a, d in zip(args, dims)) else 0
        if shape_attr is not None:
            shape = list(attrs[shape_attr])
            shape[axis] *= b
            attrs[shape_attr] = tuple(shape)
        y = bind(PRIMITIVES[name], tuple(fold_batch(a, d, axis) for a, d in zip(args, dims)), attrs)
        return unfold_batch(y, axis, b)
    return rule


def _max_pool_rule(x, **attrs):
    return _pool_check("max_pool", x.shape, **attrs), x.dtype


def _max_pool_vjp(ct, out, x, **attrs):
    return (bind(max_pool_grad_p, (x, ct), attrs),)


def _max_pool_batch_last(rw, node):
    x = rw.get(node.inputs[0], CSN)
    return rw.emit("max_pool_csn", [x], dict(node.attrs), to_csn(node.shape), node.dtype, node.loc), CSN


max_pool_p = defprim("max_pool", shape=_max_pool_rule, vjp=_max_pool_vjp,
                     impl=lambda xp, x, **attrs: K.max_pool_forward(xp, x, **attrs),
                     sharding=_batch_on_axis0(0), layout=batch_innermost(_max_pool_batch_last),
                     batching=_pool_batching("max_pool"),
                     doc="N-d max pooling (padding with -inf, floor mode).")


def _max_pool_grad_rule(x, g, **attrs):
    out = _pool_check("max_pool_grad", x.shape, **attrs)
    if _t(g.shape) != out:
        raise ShapeError(f"max_pool_grad: the cotangent has shape {_t(g.shape)}, but max pooling the input "
                         f"{_t(x.shape)} gives {out}")
    if np.dtype(g.dtype).kind != "f":
        raise DtypeError(f"max_pool_grad: the cotangent must be floating-point, got {np.dtype(g.dtype).name}")
    return _t(x.shape), g.dtype


def _max_pool_grad_vjp(ct, out, x, g, **attrs):
    # linear in g (each window's g goes to its argmax); the argmax is piecewise
    # constant in x, so x gets no cotangent
    return None, bind(max_pool_gather_p, (x, ct), attrs)


def _max_pool_grad_batch_last(rw, node):
    x, g = [rw.get(i, CSN) for i in node.inputs]
    # the pooled output, for comparison (CSE finds the forward's own)
    y = rw.emit("max_pool_csn", [x], dict(node.attrs), g.shape, node.dtype, node.loc)
    return rw.emit("max_pool_csn_grad", [x, y, g], dict(node.attrs), to_csn(node.shape), node.dtype,
                   node.loc), CSN


max_pool_grad_p = defprim("max_pool_grad", shape=_max_pool_grad_rule, vjp=_max_pool_grad_vjp,
                          impl=lambda xp, x, g, **attrs: K.max_pool_backward(xp, x, g, **attrs),
                          sharding=_batch_on_axis0(0, 1), layout=batch_innermost(_max_pool_grad_batch_last),
                          batching=_pool_batching("max_pool_grad"),
                          doc="Gradient of max_pool: each window's cotangent goes to its first maximum.")


def _max_pool_gather_rule(x, c, **attrs):
    if _t(c.shape) != _t(x.shape):
        raise ShapeError(f"max_pool_gather: the cotangent has shape {_t(c.shape)}, the input {_t(x.shape)}")
    return _pool_check("max_pool_gather", x.shape, **attrs), c.dtype


max_pool_gather_p = defprim("max_pool_gather", shape=_max_pool_gather_rule,
                            vjp=lambda ct, out, x, c, **attrs: (None, bind(max_pool_grad_p, (x, ct), attrs)),
                            impl=lambda xp, x, c, **attrs: K.max_pool_gather(xp, x, c, **attrs),
                            sharding=_batch_on_axis0(0, 1), batching=_pool_batching("max_pool_gather"),
                            doc="The VJP of max_pool_grad in its cotangent: each window of x reads c at its "
                                "first maximum (so max pooling has second derivatives).")


def _avg_pool_rule(x, **attrs):
    shape = _pool_check("avg_pool", x.shape, **attrs)
    return shape, _check_float("avg_pool", [("input", x)])


avg_pool_p = defprim("avg_pool", shape=_avg_pool_rule, sharding=_batch_on_axis0(0),
                     batching=_pool_batching("avg_pool"),
                     impl=lambda xp, x, **attrs: K.avg_pool_forward(xp, x, **attrs),
                     vjp=lambda ct, out, x, **attrs: (bind(avg_pool_grad_p, (ct,),
                                                           dict(input_shape=_t(x.shape), **attrs)),),
                     doc="N-d average pooling (zero padding, floor mode).")


def _avg_pool_grad_rule(g, *, input_shape, **attrs):
    out = _pool_check("avg_pool_grad", input_shape, **attrs)
    if _t(g.shape) != out:
        raise ShapeError(f"avg_pool_grad: the cotangent has shape {_t(g.shape)}, but average pooling an input "
                         f"{_t(input_shape)} gives {out}")
    return _t(input_shape), _check_float("avg_pool_grad", [("cotangent", g)])


avg_pool_grad_p = defprim("avg_pool_grad", shape=_avg_pool_grad_rule, output_shape_attr="input_shape",
                          sharding=_batch_on_axis0(0), batching=_pool_batching("avg_pool_grad", "input_shape"),
                          impl=lambda xp, g, *, input_shape, **attrs: K.avg_pool_backward(
                              xp, g, input_shape=tuple(input_shape), **attrs),
                          # avg_pool_grad is the adjoint of the linear map avg_pool
                          vjp=lambda ct, out, g, *, input_shape, **attrs: (bind(avg_pool_p, (ct,), attrs),),
                          doc="Gradient of avg_pool w.r.t. its input.")


# -- loss building blocks ------------------------------------------------------------------------------

def _check_labels_rule(target, *, num_classes, ignore_index, name, loc, traced_shape):
    if np.dtype(target.dtype).kind not in "iu":
        raise DtypeError(f"{name}: class labels must be an integer array, got {np.dtype(target.dtype).name}")
    return _t(target.shape), target.dtype


def _check_labels_impl(xp, target, *, num_classes, ignore_index, name, loc, traced_shape):
    # the common case costs two reductions and no temporaries
    if target.size == 0 or (target.min() >= 0 and target.max() < num_classes):
        return target
    bad = (target < 0) | (target >= num_classes)
    if ignore_index is not None:
        bad &= target != ignore_index
    if bad.any():
        raise LabelError(_bad_label_message(xp, target, bad, num_classes, ignore_index, name, loc, traced_shape))
    return target


def _bad_label_message(xp, target, bad, num_classes, ignore_index, name, loc, traced_shape):
    first = int(xp.argmax(bad.reshape(-1)))
    value = int(target.reshape(-1)[first])
    count = int(bad.sum())
    valid = f"0..{num_classes - 1}" + ("" if ignore_index is None else f", or ignore_index={ignore_index}")
    found = ""
    if target.ndim:
        found = f"; found at target[{', '.join(str(int(i)) for i in np.unravel_index(first, target.shape))}]"
    if count > 1:
        found += f" and {count - 1} more out-of-range label{'s' if count > 2 else ''}"
    if tuple(target.shape) != tuple(traced_shape):
        # a step split across the engine's threads checks each thread's share of the
        # batch, and the kernel does not know which share it has
        shares = math.prod(traced_shape) // max(target.size, 1)
        found += (f" (the step ran split across {shares} threads: a position within one thread's share "
                  "of the batch)")
    return f"{name}: target {value} is out of bounds for {num_classes} classes (valid: {valid}){found}{at(loc)}"


def _check_labels_batching(args, dims, *, name, traced_shape, **attrs):
    """check_labels on a batch is check_labels of all the labels at once
    (elementwise; ignore_index and num_classes are per label).  The checked
    shape is the batched one (a different shape at run time means a split
    across threads), and the message says which axis of the position it
    reports is the example's."""
    (t,), (d,) = args, dims
    d = d % len(t.shape)
    attrs = dict(attrs, name=f"{name} (under vmap: axis {d} of the position is the example)",
                 traced_shape=_t(t.shape))
    return bind(check_labels_p, (t,), attrs), d


check_labels_p = defprim(
    "check_labels", shape=_check_labels_rule, impl=_check_labels_impl, nondiff=True,
    batching=_check_labels_batching,
    # elementwise: the batch split shards it with the labels and fusion may group it;
    # view: it returns its input, so the memory plan gives it no buffer of its own
    elementwise=True, view=True, sharding=pointwise(), layout=POINTWISE,
    doc="The class labels themselves, checked when the kernel runs (eagerly or in compiled code): "
        "a label outside [0, num_classes) that is not ignore_index raises LabelError naming the loss "
        "(attribute name), the label, its position and the user's line (attribute loc).")


def _bce_impl(xp, x, t):
    # torch's formula: each log is clamped to >= -100, so x = 0 or 1 gives a finite loss
    with np.errstate(divide="ignore"):
        log_x = xp.maximum(xp.log(x), -100.0)
        log_1mx = xp.maximum(xp.log1p(-x), -100.0)
    return (t - 1) * log_1mx - t * log_x


def _log_or_minus_inf(v):
    """log(v), -inf at v = 0 without a divide-by-zero warning from the kernel."""
    pos = gt(v, 0.0)
    return where(pos, log(where(pos, v, 1.0)), -np.inf)


_BCE_EPS = float(np.float32(1e-12))  # torch's EPSILON is a float constant, in float64 too


def _bce_vjp(g, out, x, t):
    # torch's backward.  The clamped forward is flat at x = 0 and 1, but torch's input
    # gradient (x - t) / max(x (1 - x), 1e-12) is not: -1e12 at x = 0, t = 1.  The
    # target's gradient is -logit(x) = log(1 - x) - log(x), unclamped (inf at x = 0).
    gx = div(mul(g, sub(x, t)), maximum(mul(sub(1.0, x), x), _BCE_EPS))
    gt_ = mul(g, sub(_log_or_minus_inf(sub(1.0, x)), _log_or_minus_inf(x)))
    return sum_to(gx, x.shape), sum_to(gt_, t.shape)


def _bce_batching(args, dims):
    # elementwise: the batch axes aligned at the front (no attributes; a reduction
    # is a separate op after it)
    return bind(binary_cross_entropy_p, tuple(align_for_broadcast(args, dims))), 0


binary_cross_entropy_p = defprim(
    "binary_cross_entropy", shape=elementwise_rule("binary_cross_entropy", float_only=True),
    impl=_bce_impl, vjp=_bce_vjp, elementwise=True, sharding=pointwise(), layout=POINTWISE,
    batching=_bce_batching,
    expr="(({1} - 1) * max(log1p(-{0}), ({T})-100) - {1} * max(log({0}), ({T})-100))",
    doc="Elementwise binary cross entropy -(t log(x) + (1 - t) log(1 - x)) of probabilities x, each "
        "log clamped to >= -100, with torch's gradient (finite at x = 0 and 1).")


# -- public functions --------------------------------------------------------------------------------------

def _fail(cls, msg):
    raise cls(f"{msg}{at(user_location())}")


def _tuple(op, name, v, nd):
    """An int or a sequence of 1 or nd ints -> a tuple of nd Python ints."""
    try:
        t = (operator.index(v),) * nd
    except TypeError:
        try:
            t = tuple(operator.index(e) for e in v)
        except TypeError:
            _fail(ShapeError, f"{op}: {name} must be an int or a tuple of {nd} ints, got {v!r}")
        if len(t) == 1:
            t = t * nd
    if len(t) != nd:
        _fail(ShapeError, f"{op}: {name} must be an int or a tuple of {nd} ints, got {v!r}")
    return tuple(int(e) for e in t)


def _batched(op, x, nd, what="input"):
    """x with a batch axis (added for an unbatched input), and whether one was added."""
    r = len(x.shape)
    if r == nd + 2:
        return x, False
    if r == nd + 1:
        return reshape(x, (1,) + _t(x.shape)), True
    _fail(ShapeError, f"{op}: expected a {nd + 2}-D {what} {_LAYOUT[nd]} (or a {nd + 1}-D unbatched one "
                      f"without N), got shape {_t(x.shape)} ({r}-D)")


def _unbatch(y, added):
    return reshape(y, _t(y.shape)[1:]) if added else y


def _check_weight_rank(op, weight, nd, layout):
    if len(weight.shape) != nd + 2:
        _fail(ShapeError, f"{op}: expected a {nd + 2}-D weight {layout}, got shape {_t(weight.shape)}")


def _add_bias(op, y, bias):
    c = y.shape[1]
    if _t(bias.shape) != (c,):
        _fail(ShapeError, f"{op}: bias must have shape ({c},) (one value per output channel), got "
                          f"{_t(bias.shape)}")
    if np.dtype(bias.dtype) != np.dtype(y.dtype):
        _fail(DtypeError, f"{op}: bias is {np.dtype(bias.dtype).name} but the output is "
                          f"{np.dtype(y.dtype).name}; cast the bias (bias.astype('{np.dtype(y.dtype).name}'))")
    return add(y, reshape(bias, (c,) + (1,) * (len(y.shape) - 2)))


def _checked(op, fn):
    """Run a shape/dtype check under the public op's name, with the caller's location."""
    try:
        return fn()
    except (ShapeError, DtypeError) as e:
        raise type(e)(f"{e}{at(user_location())}") from None


def _conv_padding(op, padding, nd, kernel, stride, dilation):
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * nd
        if padding == "same":
            if any(s != 1 for s in stride):
                _fail(ShapeError, f"{op}: padding='same' needs stride 1, got stride {stride}; "
                                  f"give the padding as numbers instead")
            pads = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                lo = total // 2
                pads.append(lo if total - lo == lo else (lo, total - lo))
            return tuple(pads)
        _fail(ShapeError, f"{op}: padding must be an int, a tuple of {nd} ints, 'valid' or 'same', "
                          f"got {padding!r}")
    return _tuple(op, "padding", padding, nd)


def conv(x, weight, stride=1, padding=0, dilation=1, groups=1, *, op="conv"):
    """N-d convolution of a batched input (N, C, *S) with weight (O, C/groups, *K), no bias."""
    nd = len(x.shape) - 2
    if not 1 <= nd <= 3:
        _fail(ShapeError, f"{op}: expected an input (N, C, *spatial) with 1 to 3 spatial axes, got shape "
                          f"{_t(x.shape)}")
    _check_weight_rank(op, weight, nd, "(out_channels, in_channels/groups, *kernel)")
    stride = _tuple(op, "stride", stride, nd)
    dilation = _tuple(op, "dilation", dilation, nd)
    padding = _conv_padding(op, padding, nd, _t(weight.shape[2:]), stride, dilation)
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=int(groups))
    _checked(op, lambda: (_conv_check(op, x.shape, weight.shape, **attrs),
                          _check_float(op, [("input", x), ("weight", weight)])))
    return bind(conv_p, (x, weight), attrs)


def _conv_nd(nd, x, weight, bias, stride, padding, dilation, groups):
    op = f"conv{nd}d"
    x, added = _batched(op, x, nd)
    _check_weight_rank(op, weight, nd, f"(out_channels, in_channels/groups, *{_SPATIAL[nd]})")
    y = conv(x, weight, stride, padding, dilation, groups, op=op)
    if bias is not None:
        y = _add_bias(op, y, bias)
    return _unbatch(y, added)


def conv1d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """1-D convolution, as torch.nn.functional.conv1d: x (N, C, L) or (C, L), weight (O, C/groups, K)."""
    return _conv_nd(1, x, weight, bias, stride, padding, dilation, groups)


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution, as torch.nn.functional.conv2d: x (N, C, H, W) or (C, H, W),
    weight (O, C/groups, kH, kW); padding may be an int, a pair, 'valid' or 'same'."""
    return _conv_nd(2, x, weight, bias, stride, padding, dilation, groups)


def conv3d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """3-D convolution, as torch.nn.functional.conv3d."""
    return _conv_nd(3, x, weight, bias, stride, padding, dilation, groups)


def conv_transpose(x, weight, stride=1, padding=0, output_padding=0, groups=1, dilation=1, *,
                   op="conv_transpose"):
    """N-d transposed convolution of a batched input (N, C_in, *S) with weight (C_in, C_out/groups, *K)."""
    nd = len(x.shape) - 2
    if not 1 <= nd <= 3:
        _fail(ShapeError, f"{op}: expected an input (N, C, *spatial) with 1 to 3 spatial axes, got shape "
                          f"{_t(x.shape)}")
    _check_weight_rank(op, weight, nd, "(in_channels, out_channels/groups, *kernel)")
    if isinstance(padding, str):
        _fail(ShapeError, f"{op}: padding must be an int or a tuple of {nd} ints, got {padding!r}")
    attrs = dict(stride=_tuple(op, "stride", stride, nd), padding=_tuple(op, "padding", padding, nd),
                 output_padding=_tuple(op, "output_padding", output_padding, nd),
                 dilation=_tuple(op, "dilation", dilation, nd), groups=int(groups))
    _checked(op, lambda: (_conv_transpose_check(op, x.shape, weight.shape, **attrs),
                          _check_float(op, [("input", x), ("weight", weight)])))
    return bind(conv_transpose_p, (x, weight), attrs)


def _conv_transpose_nd(nd, x, weight, bias, stride, padding, output_padding, groups, dilation):
    op = f"conv_transpose{nd}d"
    x, added = _batched(op, x, nd)
    _check_weight_rank(op, weight, nd, f"(in_channels, out_channels/groups, *{_SPATIAL[nd]})")
    y = conv_transpose(x, weight, stride, padding, output_padding, groups, dilation, op=op)
    if bias is not None:
        y = _add_bias(op, y, bias)
    return _unbatch(y, added)


def conv_transpose1d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """As torch.nn.functional.conv_transpose1d: weight (C_in, C_out/groups, K)."""
    return _conv_transpose_nd(1, x, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """As torch.nn.functional.conv_transpose2d: weight (C_in, C_out/groups, kH, kW)."""
    return _conv_transpose_nd(2, x, weight, bias, stride, padding, output_padding, groups, dilation)


def conv_transpose3d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """As torch.nn.functional.conv_transpose3d."""
    return _conv_transpose_nd(3, x, weight, bias, stride, padding, output_padding, groups, dilation)


def _pool_attrs(op, nd, kernel_size, stride, padding):
    kernel = _tuple(op, "kernel_size", kernel_size, nd)
    stride = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) else \
        _tuple(op, "stride", stride, nd)
    return kernel, stride, _tuple(op, "padding", padding, nd)


def _no_ceil(op, ceil_mode):
    if ceil_mode:
        _fail(ShapeError, f"{op}: ceil_mode=True is not supported; pad the input or use ceil_mode=False")


def max_pool(x, kernel_size, stride=None, padding=0, dilation=1, *, op="max_pool"):
    """N-d max pooling of a batched input (N, C, *S)."""
    nd = len(x.shape) - 2
    if not 1 <= nd <= 3:
        _fail(ShapeError, f"{op}: expected an input (N, C, *spatial) with 1 to 3 spatial axes, got shape "
                          f"{_t(x.shape)}")
    kernel, stride, padding = _pool_attrs(op, nd, kernel_size, stride, padding)
    attrs = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=_tuple(op, "dilation", dilation, nd))
    _checked(op, lambda: _pool_check(op, x.shape, **attrs))
    return bind(max_pool_p, (x,), attrs)


def _max_pool_nd(nd, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    op = f"max_pool{nd}d"
    _no_ceil(op, ceil_mode)
    if return_indices:
        _fail(ShapeError, f"{op}: return_indices=True is not supported")
    x, added = _batched(op, x, nd)
    return _unbatch(max_pool(x, kernel_size, stride, padding, dilation, op=op), added)


def max_pool1d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """As torch.nn.functional.max_pool1d (ceil_mode and return_indices unsupported)."""
    return _max_pool_nd(1, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """As torch.nn.functional.max_pool2d: the gradient of a window goes to its first maximum."""
    return _max_pool_nd(2, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def max_pool3d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """As torch.nn.functional.max_pool3d."""
    return _max_pool_nd(3, x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


maxpool2d = max_pool2d  # Avalon.jl's name


def avg_pool(x, kernel_size, stride=None, padding=0, count_include_pad=True, *, op="avg_pool"):
    """N-d average pooling of a batched input (N, C, *S)."""
    nd = len(x.shape) - 2
    if not 1 <= nd <= 3:
        _fail(ShapeError, f"{op}: expected an input (N, C, *spatial) with 1 to 3 spatial axes, got shape "
                          f"{_t(x.shape)}")
    kernel, stride, padding = _pool_attrs(op, nd, kernel_size, stride, padding)
    attrs = dict(kernel_size=kernel, stride=stride, padding=padding, count_include_pad=bool(count_include_pad))
    _checked(op, lambda: (_pool_check(op, x.shape, kernel_size=kernel, stride=stride, padding=padding),
                          _check_float(op, [("input", x)])))
    return bind(avg_pool_p, (x,), attrs)


def _avg_pool_nd(nd, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    op = f"avg_pool{nd}d"
    _no_ceil(op, ceil_mode)
    x, added = _batched(op, x, nd)
    if divisor_override is not None and int(divisor_override) <= 0:
        _fail(ShapeError, f"{op}: divisor_override must be a positive int, got {divisor_override!r}")
    # with divisor_override the window sums are divided by it, padding or not (as PyTorch)
    y = avg_pool(x, kernel_size, stride, padding, count_include_pad or divisor_override is not None, op=op)
    if divisor_override is not None:
        kernel = _tuple(op, "kernel_size", kernel_size, nd)
        y = mul(y, float(math.prod(kernel)) / float(divisor_override))
    return _unbatch(y, added)


def avg_pool1d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """As torch.nn.functional.avg_pool1d (ceil_mode unsupported)."""
    return _avg_pool_nd(1, x, kernel_size, stride, padding, ceil_mode, count_include_pad, None)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """As torch.nn.functional.avg_pool2d (ceil_mode unsupported)."""
    return _avg_pool_nd(2, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def avg_pool3d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """As torch.nn.functional.avg_pool3d (ceil_mode unsupported)."""
    return _avg_pool_nd(3, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _adaptive_window(op, x, output_size, nd):
    x, added = _batched(op, x, nd)
    spatial = _t(x.shape[2:])
    if isinstance(output_size, (int, np.integer)) or output_size is None:
        output_size = (output_size,) * nd
    output_size = tuple(output_size)
    if len(output_size) == 1:
        output_size = output_size * nd
    if len(output_size) != nd:
        _fail(ShapeError, f"{op}: output_size must be an int or a tuple of {nd} ints, got {output_size!r}")
    out = tuple(s if o is None else int(o) for s, o in zip(spatial, output_size))
    if any(o < 1 for o in out):
        _fail(ShapeError, f"{op}: output_size must be >= 1 in every axis, got {out}")
    if any(s % o for s, o in zip(spatial, out)):
        _fail(ShapeError, f"{op}: the input's spatial size {spatial} is not divisible by output_size {out}; "
                          "only divisible sizes are supported (every window then has the same size, "
                          "kernel_size = stride = input size / output size). Resize or crop the input, or "
                          "pick an output_size that divides it")
    return x, added, tuple(s // o for s, o in zip(spatial, out))


def _adaptive_avg(nd, x, output_size):
    op = f"adaptive_avg_pool{nd}d"
    x, added, k = _adaptive_window(op, x, output_size, nd)
    y = x if all(e == 1 for e in k) else avg_pool(x, k, k, 0, op=op)
    return _unbatch(y, added)


def adaptive_avg_pool1d(x, output_size):
    """As torch.nn.functional.adaptive_avg_pool1d, for input sizes divisible by output_size."""
    return _adaptive_avg(1, x, output_size)


def adaptive_avg_pool2d(x, output_size):
    """As torch.nn.functional.adaptive_avg_pool2d, for input sizes divisible by output_size
    (output_size may contain None: keep that axis)."""
    return _adaptive_avg(2, x, output_size)


def adaptive_avg_pool3d(x, output_size):
    """As torch.nn.functional.adaptive_avg_pool3d, for input sizes divisible by output_size."""
    return _adaptive_avg(3, x, output_size)


def _adaptive_max(nd, x, output_size, return_indices):
    op = f"adaptive_max_pool{nd}d"
    if return_indices:
        _fail(ShapeError, f"{op}: return_indices=True is not supported")
    x, added, k = _adaptive_window(op, x, output_size, nd)
    y = x if all(e == 1 for e in k) else max_pool(x, k, k, 0, 1, op=op)
    return _unbatch(y, added)


def adaptive_max_pool1d(x, output_size, return_indices=False):
    """As torch.nn.functional.adaptive_max_pool1d, for input sizes divisible by output_size."""
    return _adaptive_max(1, x, output_size, return_indices)


def adaptive_max_pool2d(x, output_size, return_indices=False):
    """As torch.nn.functional.adaptive_max_pool2d, for input sizes divisible by output_size."""
    return _adaptive_max(2, x, output_size, return_indices)


def adaptive_max_pool3d(x, output_size, return_indices=False):
    """As torch.nn.functional.adaptive_max_pool3d, for input sizes divisible by output_size."""
    return _adaptive_max(3, x, output_size, return_indices)


def check_labels(target, num_classes, ignore_index=None, *, name="check_labels"):
    """`target` itself, its class labels checked when the kernel runs, eagerly or
    inside compiled code (avalon.grad, avalon.jit, fit): a label outside
    [0, num_classes) that is not `ignore_index` raises LabelError (an IndexError)
    naming `name`, the label, its position and the calling line.  Use the
    returned array: the check runs only where its result is used."""
    if not isinstance(target, Tracer) and not hasattr(target, "shape"):
        target = np.asarray(target)
    attrs = dict(num_classes=int(num_classes), ignore_index=None if ignore_index is None else int(ignore_index),
                 name=str(name), loc=current_location(), traced_shape=_t(target.shape))
    return bind(check_labels_p, (target,), attrs)


def binary_cross_entropy(input, target):  # noqa: A002 - torch's argument names
    """Elementwise (unreduced) binary cross entropy of probabilities `input` in
    [0, 1] against `target`, as torch.nn.functional.binary_cross_entropy with
    reduction='none': each log is clamped to >= -100 and the gradient at 0 and 1
    is torch's, (x - t) / max(x (1 - x), 1e-12)."""
    return bind(binary_cross_entropy_p, _promote(input, target))
