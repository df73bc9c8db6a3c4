"""Primitives over activations stored batch-innermost, layout (C, *spatial, N).

They are not called by users: the layout pass (avalon.passes.layout) puts them
in place of conv / max_pool and their gradients after differentiation, so they
need no VJPs.  A convolution becomes im2col_csn + matmul (its input gradient
matmul + col2im_csn): the columns of a layer's input are then one value that
CSE shares between the forward product and the weight gradient.  Where those
columns exceed a size budget (kernels.conv_csn.column_tile_rows), the
convolution and its gradients are instead one op each (conv_csn,
conv_csn_input_grad, conv_csn_weight_grad) that builds the columns a few output
rows at a time.
"""
from __future__ import annotations

from ..kernel_ir import glue
from ..kernels import conv_csn as K
from ..kernels.conv import conv_output_shape
from ..primitive import defprim
from ._sharding import P, R, S, NoSplit, on_sharded


def _pairs(padding):
    return tuple(p if isinstance(p, tuple) else (p, p) for p in padding)


def _out_spatial(spatial, kernel, stride, padding, dilation):
    pairs = _pairs(padding)
    widened = tuple(s + lo + hi - 2 * lo for s, (lo, hi) in zip(spatial, pairs))
    return conv_output_shape(widened, kernel, stride, tuple(lo for lo, _ in pairs), dilation)


def _im2col_rule(x, *, kernel, stride, padding, dilation):
    out = _out_spatial(x.shape[1:-1], kernel, stride, padding, dilation)
    c, n = x.shape[0], x.shape[-1]
    return (c * _prod(kernel), _prod(out) * n), x.dtype


def _prod(t):
    p = 1
    for v in t:
        p *= int(v)
    return p


def im2col_shape(xshape, kernel, *, stride, padding, dilation):
    """The shape of im2col_csn's columns for activations of shape `xshape`."""
    class _Aval:
        shape = xshape
        dtype = None
    return _im2col_rule(_Aval, kernel=kernel, stride=stride, padding=padding, dilation=dilation)[0]


def _batch_last(*data):
    """The sharding rule of an op over (C, *S, N) activations: the operands at
    positions `data` carry the whole batch as their last axis (one thread's share
    of it), the others are replicated; the result has the batch innermost in its
    last axis (for im2col_csn's (C*K, out*N) columns: in its innermost factor)."""
    def sharding(node, states, ctx):
        for k, (i, s) in enumerate(zip(node.inputs, states)):
            want = S(i.ndim - 1) if k in data else R
            if s != want or (k in data and i.shape[-1] != ctx.n):
                raise NoSplit(f"{node.op}: the batch must be the last axis of its activations")
        return S(node.ndim - 1)
    return on_sharded(sharding)


def _col2im_sharding(node, states, ctx):
    if states[0] == S(1):
        return S(node.ndim - 1)
    raise NoSplit("col2im_csn of columns not sharded by their innermost factor")


im2col_csn_p = defprim("im2col_csn", shape=_im2col_rule, accepts_out=True, sharding=_batch_last(0),
                       lower=glue.lower_im2col_csn,
                       impl=lambda xp, x, out=None, **a: K.im2col_csn(xp, x, out=out, **a),
                       doc="columns (C*K, out*N) of (C, *S, N) activations: a convolution is then one matmul.")

col2im_csn_p = defprim(
    "col2im_csn", shape=lambda cols, *, input_shape, **a: (tuple(input_shape), cols.dtype), accepts_out=True,
    output_shape_attr="input_shape", sharding=on_sharded(_col2im_sharding), lower=glue.lower_col2im_csn,
    impl=lambda xp, cols, out=None, **a: K.col2im_csn(xp, cols, out=out, **a),
    doc="the adjoint of im2col_csn: columns summed back into (C, *S, N).")


def _pool_rule(x, *, kernel_size, stride, padding, dilation):
    out = _out_spatial(x.shape[1:-1], kernel_size, stride, padding, dilation)
    return (x.shape[0],) + tuple(out) + (x.shape[-1],), x.dtype


max_pool_csn_p = defprim("max_pool_csn", shape=_pool_rule, accepts_out=True, sharding=_batch_last(0),
                         lower=glue.lower_max_pool_csn,
                         impl=lambda xp, x, out=None, **a: K.max_pool_csn_forward(xp, x, out=out, **a),
                         doc="max pooling of (C, *S, N) activations.")

max_pool_csn_grad_p = defprim(
    "max_pool_csn_grad", shape=lambda x, y, g, **a: (tuple(x.shape), g.dtype), accepts_out=True,
    sharding=_batch_last(0, 1, 2), lower=glue.lower_max_pool_csn_grad,
    impl=lambda xp, x, y, g, out=None, **a: K.max_pool_csn_backward(xp, x, g, out=out, y=y, **a),
    doc="gradient of max_pool_csn (x, its pooled output y, cotangent g): each window's cotangent "
        "to its first maximum.")


# -- convolutions whose columns exceed the budget: tiles of output rows ------------------------------------

def _conv_csn_rule(x, w, *, stride, padding, dilation, tile_rows):
    out = _out_spatial(x.shape[1:-1], tuple(w.shape[2:]), stride, padding, dilation)
    return (w.shape[0],) + tuple(out) + (x.shape[-1],), x.dtype


def _threads():
    from ..runtime.threads import kernel_threads  # the runtime imports the primitives: not at load time
    return kernel_threads()


def _weight_grad_sharding(node, states, ctx):
    if states == [S(node.inputs[0].ndim - 1), S(node.inputs[1].ndim - 1)]:
        return P  # a sum over the batch: each thread has its share of it
    raise NoSplit("conv_csn_weight_grad of activations not sharded by their batch")


conv_csn_p = defprim(
    "conv_csn", shape=_conv_csn_rule, accepts_out=True, lower=glue.lower_conv_csn, sharding=_batch_last(0),
    impl=lambda xp, x, w, out=None, **a: K.conv_csn_tiled_forward(xp, x, w, out=out, run=_threads(), **a),
    doc="convolution of (C, *S, N) activations with w (O, C, *K), its columns built tile_rows output rows "
        "at a time.")

conv_csn_input_grad_p = defprim(
    "conv_csn_input_grad", shape=lambda g, w, *, input_shape, **a: (tuple(input_shape), g.dtype),
    accepts_out=True, output_shape_attr="input_shape", sharding=_batch_last(0),
    lower=glue.lower_conv_csn_input_grad,
    impl=lambda xp, g, w, out=None, **a: K.conv_csn_tiled_input_grad(xp, g, w, out=out, run=_threads(), **a),
    doc="gradient of conv_csn with respect to its input, tile_rows output rows at a time.")

conv_csn_weight_grad_p = defprim(
    "conv_csn_weight_grad", shape=lambda x, g, *, weight_shape, **a: (tuple(weight_shape), g.dtype),
    accepts_out=True, sharding=on_sharded(_weight_grad_sharding), lower=glue.lower_conv_csn_weight_grad,
    impl=lambda xp, x, g, out=None, **a: K.conv_csn_tiled_weight_grad(xp, x, g, out=out, run=_threads(), **a),
    doc="gradient of conv_csn with respect to its weight (O, C, *K), summed over tiles of tile_rows "
        "output rows.")
