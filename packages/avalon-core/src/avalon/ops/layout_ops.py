"""Primitives over activations stored batch-innermost, layout (C, *spatial, N).

They are not called by users: the layout pass (avalon.passes.layout) puts them
in place of conv / max_pool and their gradients after differentiation, so they
need no VJPs.  Each mirrors its (N, C, *spatial) counterpart in ops/nn.py,
with the same attributes, and writes its result with out=.
"""
from __future__ import annotations

from ..kernels import conv_csn as K
from ..kernels.conv import conv_output_shape
from ..primitive import defprim


def _pairs(padding):
    return tuple(p if isinstance(p, tuple) else (p, p) for p in padding)


def _out_spatial(spatial, kernel, stride, padding, dilation):
    pairs = _pairs(padding)
    widened = tuple(s + lo + hi - 2 * lo for s, (lo, hi) in zip(spatial, pairs))
    return conv_output_shape(widened, kernel, stride, tuple(lo for lo, _ in pairs), dilation)


def _conv_rule(x, w, *, stride, padding, dilation):
    out = _out_spatial(x.shape[1:-1], w.shape[2:], stride, padding, dilation)
    return (w.shape[0],) + tuple(out) + (x.shape[-1],), x.dtype


conv_csn_p = defprim("conv_csn", shape=_conv_rule, accepts_out=True,
                     impl=lambda xp, x, w, out=None, **a: K.conv_csn_forward(xp, x, w, out=out, **a),
                     doc="conv on (C, *S, N) activations; weight (O, C, *K).")

conv_csn_input_grad_p = defprim(
    "conv_csn_input_grad", shape=lambda g, w, *, input_shape, **a: (tuple(input_shape), g.dtype),
    accepts_out=True, impl=lambda xp, g, w, out=None, **a: K.conv_csn_input_grad(xp, g, w, out=out, **a),
    doc="gradient of conv_csn with respect to its input.")

conv_csn_weight_grad_p = defprim(
    "conv_csn_weight_grad", shape=lambda x, g, *, weight_shape, **a: (tuple(weight_shape), g.dtype),
    accepts_out=True, impl=lambda xp, x, g, out=None, **a: K.conv_csn_weight_grad(xp, x, g, out=out, **a),
    doc="gradient of conv_csn with respect to its weight.")


def _pool_rule(x, *, kernel_size, stride, padding, dilation):
    out = _out_spatial(x.shape[1:-1], kernel_size, stride, padding, dilation)
    return (x.shape[0],) + tuple(out) + (x.shape[-1],), x.dtype


max_pool_csn_p = defprim("max_pool_csn", shape=_pool_rule, accepts_out=True,
                         impl=lambda xp, x, out=None, **a: K.max_pool_csn_forward(xp, x, out=out, **a),
                         doc="max pooling of (C, *S, N) activations.")

max_pool_csn_grad_p = defprim(
    "max_pool_csn_grad", shape=lambda x, g, **a: (tuple(x.shape), g.dtype), accepts_out=True,
    impl=lambda xp, x, g, out=None, **a: K.max_pool_csn_backward(xp, x, g, out=out, **a),
    doc="gradient of max_pool_csn: each window's cotangent to its first maximum.")
