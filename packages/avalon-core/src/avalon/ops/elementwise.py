"""Elementwise primitives, one registration block each, and the activations
built from them.  Binary ops broadcast as NumPy does; VJPs sum the cotangent
back to each operand's shape (`sum_to`).  Every one shards as its operands do
(the linear ones let partial sums through), keeps the batch-innermost
layout of its operands, and runs on a vmap batch as itself with the batch
axes aligned in front (ops/_sharding.py, ops/_layout.py, ops/_batching.py)."""
from __future__ import annotations

import numpy as np

from ..primitive import bind, defprim
from . import _batching, _layout, _sharding  # (as modules: `from .elementwise import *` must not export their names)
from ._rules import elementwise_rule


def _sum_to(x, shape):
    from .reduce import sum_to
    return sum_to(x, shape)


# -- binary arithmetic ------------------------------------------------------------

add_p = defprim("add", recompute=True, shape=elementwise_rule("add"), ufunc="add", elementwise=True, expr="{0} + {1}",
                sharding=_sharding.pointwise(_sharding.all_partial), layout=_layout.POINTWISE,
                batching=_batching.elementwise_rule("add"),
                impl=lambda xp, a, b: xp.add(a, b),
                vjp=lambda g, out, a, b: (_sum_to(g, a.shape), _sum_to(g, b.shape)))

sub_p = defprim("sub", recompute=True, shape=elementwise_rule("sub"), ufunc="subtract", elementwise=True, expr="{0} - {1}",
                sharding=_sharding.pointwise(_sharding.all_partial), layout=_layout.POINTWISE,
                batching=_batching.elementwise_rule("sub"),
                impl=lambda xp, a, b: xp.subtract(a, b),
                vjp=lambda g, out, a, b: (_sum_to(g, a.shape), _sum_to(neg(g), b.shape)))

mul_p = defprim("mul", recompute=True, shape=elementwise_rule("mul"), ufunc="multiply", elementwise=True, expr="{0} * {1}",
                sharding=_sharding.pointwise(_sharding.one_partial), layout=_layout.POINTWISE,
                batching=_batching.elementwise_rule("mul"),
                impl=lambda xp, a, b: xp.multiply(a, b),
                vjp=lambda g, out, a, b: (_sum_to(mul(g, b), a.shape), _sum_to(mul(g, a), b.shape)))

div_p = defprim("div", shape=elementwise_rule("div"), ufunc="true_divide", elementwise=True, expr="{0} / {1}",
                sharding=_sharding.pointwise(_sharding.partial_numerator), layout=_layout.POINTWISE,
                batching=_batching.elementwise_rule("div"),
                impl=lambda xp, a, b: xp.true_divide(a, b),
                vjp=lambda g, out, a, b: (_sum_to(div(g, b), a.shape),
                                          _sum_to(neg(div(mul(g, out), b)), b.shape)))

pow_p = defprim("pow", shape=elementwise_rule("pow"), ufunc="power", elementwise=True, expr="pow({0}, {1})",
                sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                batching=_batching.elementwise_rule("pow"),
                impl=lambda xp, a, b: xp.power(a, b),
                vjp=lambda g, out, a, b: (_sum_to(mul(g, mul(b, pow(a, sub(b, 1)))), a.shape),
                                          _sum_to(mul(g, mul(out, log(a))), b.shape)))


def _tie_split(a, b, first_wins):
    """Weight of operand a in max/min: 1 where it wins, 1/2 on ties (as PyTorch)."""
    return add(cast(first_wins, a.dtype), mul(cast(eq(a, b), a.dtype), 0.5))


maximum_p = defprim("maximum", recompute=True, shape=elementwise_rule("maximum"), ufunc="maximum", elementwise=True,
                    sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                    batching=_batching.elementwise_rule("maximum"),
                    expr="max({0}, {1})", impl=lambda xp, a, b: xp.maximum(a, b),
                    vjp=lambda g, out, a, b: (_sum_to(mul(g, _tie_split(a, b, gt(a, b))), a.shape),
                                              _sum_to(mul(g, _tie_split(b, a, gt(b, a))), b.shape)))

minimum_p = defprim("minimum", recompute=True, shape=elementwise_rule("minimum"), ufunc="minimum", elementwise=True,
                    sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                    batching=_batching.elementwise_rule("minimum"),
                    expr="min({0}, {1})", impl=lambda xp, a, b: xp.minimum(a, b),
                    vjp=lambda g, out, a, b: (_sum_to(mul(g, _tie_split(a, b, lt(a, b))), a.shape),
                                              _sum_to(mul(g, _tie_split(b, a, lt(b, a))), b.shape)))

# -- comparisons (no gradient) -------------------------------------------------------

def _comparison(name, ufunc, c_op):
    return defprim(name, shape=elementwise_rule(name, out_dtype=np.bool_), ufunc=ufunc, elementwise=True, recompute=True,
                   sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                   batching=_batching.elementwise_rule(name),
                   nondiff=True, expr=f"{{0}} {c_op} {{1}}",
                   impl=lambda xp, a, b: getattr(xp, ufunc)(a, b))


lt_p = _comparison("lt", "less", "<")
le_p = _comparison("le", "less_equal", "<=")
gt_p = _comparison("gt", "greater", ">")
ge_p = _comparison("ge", "greater_equal", ">=")
eq_p = _comparison("eq", "equal", "==")
ne_p = _comparison("ne", "not_equal", "!=")

# -- unary -------------------------------------------------------------------------

_float_rule = lambda name: elementwise_rule(name, float_only=True)  # noqa: E731

neg_p = defprim("neg", recompute=True, shape=elementwise_rule("neg"), ufunc="negative", elementwise=True, expr="-{0}",
                sharding=_sharding.pointwise(_sharding.all_partial), layout=_layout.POINTWISE,
                batching=_batching.elementwise_rule("neg"),
                impl=lambda xp, x: xp.negative(x), vjp=lambda g, out, x: (neg(g),))

exp_p = defprim("exp", shape=_float_rule("exp"), ufunc="exp", elementwise=True, expr="exp({0})",
                sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                batching=_batching.elementwise_rule("exp"),
                impl=lambda xp, x: xp.exp(x), vjp=lambda g, out, x: (mul(g, out),))

log_p = defprim("log", shape=_float_rule("log"), ufunc="log", elementwise=True, expr="log({0})",
                sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                batching=_batching.elementwise_rule("log"),
                impl=lambda xp, x: xp.log(x), vjp=lambda g, out, x: (div(g, x),))

log1p_p = defprim("log1p", shape=_float_rule("log1p"), ufunc="log1p", elementwise=True, expr="log1p({0})",
                  sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                  batching=_batching.elementwise_rule("log1p"),
                  impl=lambda xp, x: xp.log1p(x), vjp=lambda g, out, x: (div(g, add(x, 1.0)),))

expm1_p = defprim("expm1", shape=_float_rule("expm1"), ufunc="expm1", elementwise=True, expr="expm1({0})",
                  sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                  batching=_batching.elementwise_rule("expm1"),
                  impl=lambda xp, x: xp.expm1(x), vjp=lambda g, out, x: (mul(g, add(out, 1.0)),))

sqrt_p = defprim("sqrt", shape=_float_rule("sqrt"), ufunc="sqrt", elementwise=True, expr="sqrt({0})",
                 sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                 batching=_batching.elementwise_rule("sqrt"),
                 impl=lambda xp, x: xp.sqrt(x), vjp=lambda g, out, x: (div(mul(g, 0.5), out),))

abs_p = defprim("abs", shape=elementwise_rule("abs"), ufunc="absolute", elementwise=True, expr="abs({0})",
                sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                batching=_batching.elementwise_rule("abs"),
                impl=lambda xp, x: xp.absolute(x), vjp=lambda g, out, x: (mul(g, sign(x)),))

sign_p = defprim("sign", shape=elementwise_rule("sign"), ufunc="sign", elementwise=True, nondiff=True,
                 sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                 batching=_batching.elementwise_rule("sign"),
                 expr="(({0} > 0) - ({0} < 0))", impl=lambda xp, x: xp.sign(x))

tanh_p = defprim("tanh", shape=_float_rule("tanh"), ufunc="tanh", elementwise=True, expr="tanh({0})",
                 sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                 batching=_batching.elementwise_rule("tanh"),
                 impl=lambda xp, x: xp.tanh(x),
                 vjp=lambda g, out, x: (mul(g, sub(1.0, mul(out, out))),))


def _sigmoid_impl(xp, x, out=None):
    # 1 / (1 + exp(-x)), torch's formula, in place in `out`.  Both tails keep their
    # precision: sigmoid(-20) is 2.06e-9 in float32, where 0.5 tanh(x/2) + 0.5 rounds
    # to 0.  For very negative x, exp(-x) overflows to inf and the result is 0.
    out = xp.negative(x, out=xp.empty(x.shape, x.dtype) if out is None else out)
    with np.errstate(over="ignore"):
        xp.exp(out, out=out)
    out += 1
    return xp.reciprocal(out, out=out)


sigmoid_p = defprim("sigmoid", shape=_float_rule("sigmoid"), elementwise=True, accepts_out=True, inplace=True,
                    sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                    batching=_batching.elementwise_rule("sigmoid"),
                    # in kernels, exp only of -|x|: exp(-x) of a very negative x overflows,
                    # and glibc's vector expf computes such arguments lane by lane (30x
                    # slower); one exp and one division (the lowering computes a repeated
                    # call once): 1 / (1 + e) for x >= 0, e / (1 + e) below
                    expr="({0} >= 0 ? 1 : exp(-abs({0}))) / (1 + exp(-abs({0})))",
                    impl=_sigmoid_impl,
                    vjp=lambda g, out, x: (mul(g, mul(out, sub(1.0, out))),))


def _relu_impl(xp, x, out=None):
    return xp.maximum(x, 0, out=out)


relu_p = defprim("relu", recompute=True, shape=_float_rule("relu"), elementwise=True, accepts_out=True, inplace=True,
                 sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                 batching=_batching.elementwise_rule("relu"),
                 expr="max({0}, 0)", impl=_relu_impl,
                 vjp=lambda g, out, x: (where(gt(x, 0.0), g, 0.0),))


def _where_impl(xp, c, a, b, out=None):
    if out is None:
        return xp.where(c, a, b)
    xp.copyto(out, b)
    xp.copyto(out, a, where=xp.broadcast_to(c, out.shape))
    return out


def _where_rule(c, a, b):
    from ._rules import broadcast_shapes, result_dtype
    return broadcast_shapes("where", c.shape, a.shape, b.shape), result_dtype("where", a.dtype, b.dtype)


where_p = defprim("where", recompute=True, shape=_where_rule, elementwise=True, accepts_out=True, expr="({0} ? {1} : {2})",
                  sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                  batching=_batching.elementwise_rule("where"),
                  impl=_where_impl,
                  vjp=lambda g, out, c, a, b: (None, _sum_to(where(c, g, 0.0), a.shape),
                                               _sum_to(where(c, 0.0, g), b.shape)))


def _cast_impl(xp, x, *, dtype, out=None):
    if out is None:
        return x.astype(dtype)
    xp.copyto(out, x, casting="unsafe")
    return out


def _cast_vjp(g, out, x, *, dtype):
    return (cast(g, x.dtype) if np.dtype(x.dtype).kind in "fc" else None,)


cast_p = defprim("cast", shape=lambda x, *, dtype: (x.shape, np.dtype(dtype)), elementwise=True,
                 sharding=_sharding.pointwise(_sharding.all_partial), layout=_layout.POINTWISE,
                 batching=_batching.elementwise_rule("cast"),
                 accepts_out=True, inplace=True, expr="({T}){0}", impl=_cast_impl, vjp=_cast_vjp)

stop_gradient_p = defprim("stop_gradient", shape=lambda x: (x.shape, x.dtype), elementwise=True, detaches=True,
                          sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
                          batching=_batching.elementwise_rule("stop_gradient"),
                          expr="{0}", impl=lambda xp, x: x, vjp=lambda g, out, x: (None,))


# -- public functions -----------------------------------------------------------------

def _promote(*operands):
    """Cast integer and bool arrays to the float dtype of the other operands, so
    the kernel computes in the dtype the shape rule declares (NumPy would widen
    float32 + int64 to float64)."""
    dts = [np.dtype(o.dtype) for o in operands if hasattr(o, "dtype") and hasattr(o, "shape")]
    floats = [d for d in dts if d.kind in "fc"]
    if not floats or len(floats) == len(dts):
        return operands
    target = floats[0]
    return tuple(cast(o, target) if (hasattr(o, "dtype") and hasattr(o, "shape")
                                     and np.dtype(o.dtype).kind not in "fc") else o for o in operands)


def _binary(prim, a, b):
    return bind(prim, _promote(a, b))


def add(a, b):
    return _binary(add_p, a, b)


def sub(a, b):
    return _binary(sub_p, a, b)


def mul(a, b):
    return _binary(mul_p, a, b)


def div(a, b):
    a, b = _promote(a, b)
    kinds = [np.dtype(o.dtype).kind for o in (a, b) if hasattr(o, "dtype") and hasattr(o, "shape")]
    if kinds and all(k not in "fc" for k in kinds):
        # true division of integers gives floats (float32, Avalon's default float)
        a = cast(a, np.float32) if hasattr(a, "dtype") and hasattr(a, "shape") else a
        b = cast(b, np.float32) if hasattr(b, "dtype") and hasattr(b, "shape") else b
    return bind(div_p, (a, b))


def pow(a, b):  # noqa: A001 - mirrors numpy/torch naming
    return _binary(pow_p, a, b)


def maximum(a, b):
    return _binary(maximum_p, a, b)


def minimum(a, b):
    return _binary(minimum_p, a, b)


def lt(a, b):
    return _binary(lt_p, a, b)


def le(a, b):
    return _binary(le_p, a, b)


def gt(a, b):
    return _binary(gt_p, a, b)


def ge(a, b):
    return _binary(ge_p, a, b)


def eq(a, b):
    return _binary(eq_p, a, b)


def ne(a, b):
    return _binary(ne_p, a, b)


def neg(x):
    return bind(neg_p, (x,))


def exp(x):
    return bind(exp_p, (x,))


def log(x):
    return bind(log_p, (x,))


def log1p(x):
    return bind(log1p_p, (x,))


def expm1(x):
    return bind(expm1_p, (x,))


def sqrt(x):
    return bind(sqrt_p, (x,))


def abs(x):  # noqa: A001
    return bind(abs_p, (x,))


def sign(x):
    return bind(sign_p, (x,))


def tanh(x):
    return bind(tanh_p, (x,))


def sigmoid(x):
    return bind(sigmoid_p, (x,))


logistic = sigmoid


def relu(x):
    return bind(relu_p, (x,))


def where(cond, a, b):
    """Elementwise select: a where cond is true, else b (the traced `if`)."""
    return bind(where_p, (cond, *_promote(a, b)))


def cast(x, dtype):
    dtype = np.dtype(dtype)
    if getattr(x, "dtype", None) == dtype:
        return x
    return bind(cast_p, (x,), {"dtype": dtype})


def stop_gradient(x):
    """x, through which no gradient flows."""
    return bind(stop_gradient_p, (x,))


# -- composites: no rules of their own -----------------------------------------------------

def leaky_relu(x, negative_slope=0.01):
    return where(gt(x, 0.0), x, mul(x, negative_slope))


def elu(x, alpha=1.0):
    # expm1 sees only x <= 0 (no overflow); its input is x itself at 0, so elu'(0) = alpha as in torch
    neg_part = where(gt(x, 0.0), 0.0, x)
    return where(gt(x, 0.0), x, mul(expm1(neg_part), alpha))


def softplus(x, beta=1.0, threshold=20.0):
    """log(1 + exp(beta x)) / beta, linear above `threshold` as in PyTorch."""
    bx = mul(x, beta) if beta != 1.0 else x
    # max(bx, 0) splits its tie at 0, which gives the true softplus'(0) = 1/2
    soft = add(maximum(bx, 0.0), log1p(exp(neg(abs(bx)))))
    if beta != 1.0:
        soft = div(soft, beta)
    return where(gt(bx, threshold), x, soft)


def softsign(x):
    return div(x, add(abs(x), 1.0))


def log_sigmoid(x):
    # -softplus(-x), written stably: min(x, 0) - log1p(exp(-|x|))
    return sub(minimum(x, 0.0), log1p(exp(neg(abs(x)))))


def square(x):
    return mul(x, x)


def reciprocal(x):
    return div(1.0, x)


def clip(x, lo=None, hi=None):
    if lo is not None:
        x = maximum(x, lo)
    if hi is not None:
        x = minimum(x, hi)
    return x
