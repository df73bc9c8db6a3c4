"""The primitive test table: one `OpCase` per (op, configuration).

This table is public so that third-party backends can check themselves
against it (see `avalon.testing.conformance`).  Each entry says:

* `op`: the public avalon function it exercises (``avalon.<op>``);
* `fn`: how to call it, a callable ``fn(*arrays, **kwargs)`` over arrays that
  returns an array (or a list/tuple of arrays);
* `args`: one `Arg` per array input: its shape, dtype kind and value domain
  (``positive`` for log/sqrt, ``nonzero`` for a divisor, ``distinct`` for max
  so there are no ties, ...);
* `kwargs`: static (non-array) arguments, passed to both `fn` and `torch_fn`;
* `grad`: the input positions the gradient is taken with respect to (``()``:
  not differentiable; None: every floating-point input);
* `torch_fn`: the PyTorch reference, ``torch_fn(torch, *tensors, **kwargs)``.
  It receives the torch module as its first argument, so this module never
  imports torch;
* `random`: the op draws random numbers; only shape and dtype are compared,
  and `check(out, *inputs)` (NumPy arrays) may assert properties of the values;
* `fd`: whether central finite differences are a valid gradient reference
  (False at deliberate non-differentiable points or for stop_gradient);
* `bugs`: known defects, as `Bug` records; the test suites mark the affected
  checks as expected failures (strictly, in avalon-core's own tests).

Inputs are generated deterministically from the case id (`make_inputs`).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

import avalon

__all__ = ["Arg", "Bug", "OpCase", "CASES", "DOMAINS", "cases_for", "case_by_id", "make_inputs",
           "index_domain", "as_list", "resolve_dtype", "FLOAT", "CHECKS"]

FLOAT = "float"   # an Arg dtype: the floating-point dtype under test (float32, float64, ...)

#: the checks a `Bug` can name
CHECKS = ("forward", "grad")


# -- value domains -----------------------------------------------------------------------------

def _real(rng, shape, dtype):
    return rng.standard_normal(shape)


def _positive(rng, shape, dtype):
    return rng.uniform(0.5, 2.0, shape)


def _nonzero(rng, shape, dtype):
    # away from zero: |x| in [0.2, 2]
    return rng.uniform(0.2, 2.0, shape) * rng.choice([-1.0, 1.0], shape)


def _gt_minus_one(rng, shape, dtype):
    return rng.uniform(-0.5, 2.0, shape)


def _distinct(rng, shape, dtype):
    # all values distinct and at least 0.1 apart (no ties for max/min/argmax)
    n = int(np.prod(shape, dtype=np.int64))
    v = (rng.permutation(n) - (n - 1) / 2.0) * 0.1
    return v.reshape(shape)


def _lattice_even(rng, shape, dtype):
    # multiples of 0.2: never within 0.1 of a `_lattice_odd` value (maximum/minimum without ties)
    return rng.integers(-8, 9, shape) * 0.2


def _lattice_odd(rng, shape, dtype):
    return rng.integers(-8, 8, shape) * 0.2 + 0.1


def _ties(rng, shape, dtype):
    # small integers as floats: many exact ties and exact zeros (comparisons, kinks)
    return rng.integers(-2, 3, shape).astype(np.float64)


def _wide(rng, shape, dtype):
    return rng.uniform(-30.0, 30.0, shape)


def _large(rng, shape, dtype):
    return rng.uniform(50.0, 100.0, shape)


def _distinct_int(rng, shape, dtype):
    n = int(np.prod(shape, dtype=np.int64))
    return (rng.permutation(n) - n // 2).reshape(shape)


def _int(rng, shape, dtype):
    return rng.integers(-5, 6, shape)


def _nonzero_int(rng, shape, dtype):
    return rng.integers(1, 6, shape) * rng.choice([-1, 1], shape)


def _bool(rng, shape, dtype):
    return rng.random(shape) < 0.5


DOMAINS: dict[str, Callable] = {
    "real": _real, "positive": _positive, "nonzero": _nonzero, "gt_minus_one": _gt_minus_one,
    "distinct": _distinct, "distinct_int": _distinct_int, "lattice_even": _lattice_even,
    "lattice_odd": _lattice_odd, "ties": _ties,
    "wide": _wide, "large": _large, "int": _int, "nonzero_int": _nonzero_int, "bool": _bool,
}


def index_domain(n: int) -> Callable:
    """A domain of integer indices in [0, n) (for gather-like ops)."""
    def gen(rng, shape, dtype):
        return rng.integers(0, n, shape)
    gen.__name__ = f"index_{n}"
    return gen


# -- the records -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arg:
    """One array input: shape, dtype (FLOAT = the float dtype under test, or a NumPy
    dtype name such as "int64", "bool", "float32") and value domain (a key of
    DOMAINS or a callable(rng, shape, dtype) -> values)."""
    shape: tuple
    dtype: str = FLOAT
    domain: Any = None

    @property
    def is_float(self) -> bool:
        return self.dtype == FLOAT or np.dtype(self.dtype).kind == "f"

    def default_domain(self):
        if self.domain is not None:
            return self.domain
        if self.dtype == FLOAT:
            return "real"
        kind = np.dtype(self.dtype).kind
        return {"b": "bool", "i": "int", "u": "int"}.get(kind, "real")


@dataclass(frozen=True)
class Bug:
    """A known defect: `check` ("forward" or "grad") fails for the listed float
    dtypes (None: for every dtype).  `reason` says what is wrong."""
    check: str
    reason: str
    dtypes: tuple | None = None

    def applies(self, check: str, float_dtype) -> bool:
        if check != self.check:
            return False
        return self.dtypes is None or np.dtype(float_dtype).name in self.dtypes


@dataclass(frozen=True)
class OpCase:
    op: str
    fn: Callable
    args: tuple
    torch_fn: Callable | None = None
    kwargs: dict = field(default_factory=dict)
    grad: tuple | None = None
    variant: str = ""
    random: bool = False
    check: Callable | None = None
    fd: bool = True
    fd_reason: str = ""
    rtol: float | None = None   # overrides of the float32-vs-torch tolerances
    atol: float | None = None
    bugs: tuple = ()

    @property
    def id(self) -> str:
        return f"{self.op}-{self.variant}" if self.variant else self.op

    @property
    def wrt(self) -> tuple:
        """Positions of the inputs the gradient is checked for ( () = none )."""
        if self.random:
            return ()
        if self.grad is None:
            return tuple(i for i, a in enumerate(self.args) if a.is_float)
        return tuple(self.grad)

    @property
    def differentiable(self) -> bool:
        return bool(self.wrt)

    def call(self, *arrays):
        return self.fn(*arrays, **self.kwargs)

    def call_torch(self, torch, *tensors):
        return self.torch_fn(torch, *tensors, **self.kwargs)

    def bug(self, check: str, float_dtype) -> Bug | None:
        for b in self.bugs:
            if b.applies(check, float_dtype):
                return b
        return None

    def inputs(self, float_dtype=np.float64, seed: int | None = None) -> list:
        return make_inputs(self, float_dtype, seed)

    def __repr__(self):
        return f"<OpCase {self.id}>"


def resolve_dtype(arg: Arg, float_dtype) -> np.dtype:
    return np.dtype(float_dtype) if arg.dtype == FLOAT else np.dtype(arg.dtype)


def make_inputs(case: OpCase, float_dtype=np.float64, seed: int | None = None) -> list:
    """The case's input arrays (NumPy, on the host), deterministic per case id."""
    if seed is None:
        seed = zlib.crc32(case.id.encode())
    rng = np.random.default_rng(seed)
    out = []
    for a in case.args:
        dt = resolve_dtype(a, float_dtype)
        dom = a.default_domain()
        gen = DOMAINS[dom] if isinstance(dom, str) else dom
        out.append(np.asarray(gen(rng, tuple(a.shape), dt)).astype(dt))
    return out


def as_list(out) -> list:
    """An op's result as a list of arrays (ops such as split return several)."""
    if isinstance(out, (list, tuple)):
        return list(out)
    return [out]


# -- building the table ------------------------------------------------------------------------

CASES: list[OpCase] = []


def _add(op, fn, args, torch_fn, variant="", **kw):
    args = tuple(a if isinstance(a, Arg) else Arg(tuple(a)) for a in args)
    c = OpCase(op=op, fn=fn, args=args, torch_fn=torch_fn, variant=variant, **kw)
    if any(x.id == c.id for x in CASES):
        raise ValueError(f"duplicate case id {c.id}")
    CASES.append(c)
    return c


def _F(shape, domain=None):
    return Arg(tuple(shape), FLOAT, domain)


def _I(shape, domain=None):
    return Arg(tuple(shape), "int64", domain)


def _B(shape):
    return Arg(tuple(shape), "bool", "bool")


def _dims(x, axis):
    """avalon axis (None, int, tuple) -> torch dims tuple."""
    if axis is None:
        return tuple(range(x.dim()))
    return (axis,) if isinstance(axis, int) else tuple(axis)


def _axis_name(axis):
    if axis is None:
        return "all"
    if isinstance(axis, int):
        return f"ax{axis}"
    return "ax" + "_".join(str(a) for a in axis)


def _fmt_shape(s):
    return "x".join(str(d) for d in s) if s else "0d"


# Known defects: the tests mark the checks they break as expected failures.
_BUG_INT_DIV = Bug("forward", "div on integer arrays declares an int64 result but computes float64 "
                   "(true division); a compiled graph that uses the result fails with UFuncTypeError")
_BUG_MIXED_INT_FLOAT = Bug("forward", "a binary op on float32 and int64 arrays declares float32 (the shape rule "
                           "lets ints join the float) but the kernel (NumPy promotion) returns float64; compiled "
                           "code gives float32 or float64 depending on fusion (jit(lambda a, b: add(a, b) * 2) "
                           "gives float32), so results differ in dtype between eager and compiled code",
                           ("float32",))
_BUG_SIGMOID_0D = Bug("forward", "sigmoid of a 0-d array raises TypeError: the kernel computes "
                      "xp.multiply(x, 0.5) (a NumPy scalar for 0-d input) and then calls xp.tanh(s, out=s)")
_BUG_ARGMAX_TUPLE = Bug("forward", "argmax/argmin with a tuple of axes (not all axes) declare the shape "
                        "reduced over every listed axis but the kernel reduces only the first one")
_BUG_ELU_AT_0 = Bug("grad", "elu(alpha=1) is differentiable at 0 with derivative 1, but its VJP gives 0.5 "
                    "there (minimum(x, 0) splits the tie)")
_BUG_SOFTPLUS_AT_0 = Bug("grad", "softplus'(0) must be sigmoid(0) = 0.5, but the VJP gives 0 (relu and abs "
                         "both contribute 0 at the kink of their decomposition)")


# -- binary elementwise ------------------------------------------------------------------------

_BIN_SHAPES = [("same", (3, 4), (3, 4)), ("bcast_3d_2d", (3, 1, 4), (2, 4)), ("rhs_0d", (2, 3), ()),
               ("lhs_0d", (), (2, 3)), ("bcast_both", (4, 1), (1, 5))]

_BINARY = {
    # op: (avalon fn, torch fn, domain a, domain b)
    "add": (avalon.add, lambda t, a, b: t.add(a, b), "real", "real"),
    "sub": (avalon.sub, lambda t, a, b: t.sub(a, b), "real", "real"),
    "mul": (avalon.mul, lambda t, a, b: t.mul(a, b), "real", "real"),
    "div": (avalon.div, lambda t, a, b: t.div(a, b), "real", "nonzero"),
    "pow": (avalon.pow, lambda t, a, b: t.pow(a, b), "positive", "real"),
    "maximum": (avalon.maximum, lambda t, a, b: t.maximum(a, b), "lattice_even", "lattice_odd"),
    "minimum": (avalon.minimum, lambda t, a, b: t.minimum(a, b), "lattice_even", "lattice_odd"),
}

for _op, (_fn, _tfn, _da, _db) in _BINARY.items():
    for _v, _sa, _sb in _BIN_SHAPES:
        _add(_op, lambda a, b, _fn=_fn: _fn(a, b), [_F(_sa, _da), _F(_sb, _db)], _tfn, _v)

# Python scalars as operands (weak scalars take the array's dtype)
_add("add", lambda x: avalon.add(x, 2.0), [_F((3, 4))], lambda t, x: x + 2.0, "py_scalar")
_add("sub", lambda x: avalon.sub(2.0, x), [_F((3, 4))], lambda t, x: 2.0 - x, "py_scalar_lhs")
_add("mul", lambda x: avalon.mul(x, 3), [_F((3, 4))], lambda t, x: x * 3, "py_int")
_add("div", lambda x: avalon.div(x, 4.0), [_F((3, 4))], lambda t, x: x / 4.0, "py_scalar")
_add("div", lambda x: avalon.div(1.0, x), [_F((3, 4), "nonzero")], lambda t, x: 1.0 / x, "py_scalar_lhs")
_add("pow", lambda x: avalon.pow(x, 2.0), [_F((3, 4))], lambda t, x: t.pow(x, 2.0), "square")
_add("pow", lambda x: avalon.pow(x, 3), [_F((3, 4))], lambda t, x: t.pow(x, 3), "cube_int_exp")
_add("pow", lambda x: avalon.pow(x, 0.5), [_F((3, 4), "positive")], lambda t, x: t.pow(x, 0.5), "sqrt")
_add("pow", lambda x: avalon.pow(2.0, x), [_F((3, 4))], lambda t, x: t.pow(2.0, x), "py_base")
_add("maximum", lambda x: avalon.maximum(x, 0.0), [_F((3, 4), "lattice_odd")],
     lambda t, x: t.clamp_min(x, 0.0), "py_scalar")
_add("minimum", lambda x: avalon.minimum(0.0, x), [_F((3, 4), "lattice_odd")],
     lambda t, x: t.clamp_max(x, 0.0), "py_scalar_lhs")
# ties: the gradient is split evenly between equal operands, as in PyTorch
for _op in ("maximum", "minimum"):
    _add(_op, lambda a, b, _fn=_BINARY[_op][0]: _fn(a, b), [_F((4, 5), "ties"), _F((4, 5), "ties")],
         _BINARY[_op][1], "ties")

# mixed dtypes: integer and bool operands join the float one (and get no gradient)
_add("add", lambda a, b: avalon.add(a, b), [_F((3, 4)), _I((4,))], lambda t, a, b: a + b, "float_int")
_add("mul", lambda a, b: avalon.mul(a, b), [_F((3, 4)), _B((3, 4))], lambda t, a, b: a * b, "float_bool")
_add("add", lambda a, b: avalon.add(a, b), [_I((3, 4)), _I((3, 1))], lambda t, a, b: a + b, "int")
_add("sub", lambda a, b: avalon.sub(a, b), [_I((3, 4)), _I(())], lambda t, a, b: a - b, "int")
_add("mul", lambda a, b: avalon.mul(a, b), [_I((3, 4)), _I((4,))], lambda t, a, b: a * b, "int")
_add("maximum", lambda a, b: avalon.maximum(a, b), [_I((3, 4)), _I((3, 4))], lambda t, a, b: t.maximum(a, b),
     "int")
_add("div", lambda a, b: avalon.div(a, b), [_I((3, 4)), _I((4,), "nonzero_int")],
     lambda t, a, b: (a.double() / b.double()).float(), "int")

# -- comparisons -------------------------------------------------------------------------------

_CMP = {"lt": (avalon.lt, lambda t, a, b: t.lt(a, b)), "le": (avalon.le, lambda t, a, b: t.le(a, b)),
        "gt": (avalon.gt, lambda t, a, b: t.gt(a, b)), "ge": (avalon.ge, lambda t, a, b: t.ge(a, b)),
        "eq": (avalon.eq, lambda t, a, b: t.eq(a, b)), "ne": (avalon.ne, lambda t, a, b: t.ne(a, b))}

for _op, (_fn, _tfn) in _CMP.items():
    _add(_op, lambda a, b, _fn=_fn: _fn(a, b), [_F((3, 4), "ties"), _F((3, 4), "ties")], _tfn, "same",
         grad=())
    _add(_op, lambda a, b, _fn=_fn: _fn(a, b), [_F((3, 1, 4), "ties"), _F((2, 4), "ties")], _tfn, "bcast",
         grad=())
    _add(_op, lambda a, _fn=_fn: _fn(a, 0.0), [_F((3, 4), "ties")], lambda t, a, _tfn=_tfn: _tfn(t, a, 0.0),
         "py_scalar", grad=())
    _add(_op, lambda a, b, _fn=_fn: _fn(a, b), [_I((3, 4), "int"), _I((4,), "int")], _tfn, "int", grad=())

# -- unary elementwise -------------------------------------------------------------------------

_UNARY = [
    # (op, avalon fn, torch fn, domain, kwargs, variant)
    ("neg", avalon.neg, lambda t, x: t.neg(x), "real"),
    ("exp", avalon.exp, lambda t, x: t.exp(x), "real"),
    ("log", avalon.log, lambda t, x: t.log(x), "positive"),
    ("log1p", avalon.log1p, lambda t, x: t.log1p(x), "gt_minus_one"),
    ("expm1", avalon.expm1, lambda t, x: t.expm1(x), "real"),
    ("sqrt", avalon.sqrt, lambda t, x: t.sqrt(x), "positive"),
    ("abs", avalon.abs, lambda t, x: t.abs(x), "nonzero"),
    ("sign", avalon.sign, lambda t, x: t.sign(x), "nonzero"),   # gradient: zero everywhere
    ("tanh", avalon.tanh, lambda t, x: t.tanh(x), "real"),
    ("sigmoid", avalon.sigmoid, lambda t, x: t.sigmoid(x), "real"),
    ("relu", avalon.relu, lambda t, x: t.relu(x), "nonzero"),
    ("softsign", avalon.softsign, lambda t, x: t.nn.functional.softsign(x), "real"),
    ("log_sigmoid", avalon.log_sigmoid, lambda t, x: t.nn.functional.logsigmoid(x), "real"),
    ("softplus", avalon.softplus, lambda t, x: t.nn.functional.softplus(x), "real"),
    ("square", avalon.square, lambda t, x: t.square(x), "real"),
    ("reciprocal", avalon.reciprocal, lambda t, x: t.reciprocal(x), "nonzero"),
]

for _op, _fn, _tfn, _dom in _UNARY:
    _add(_op, lambda x, _fn=_fn: _fn(x), [_F((3, 4), _dom)], _tfn, "")
    if _op in ("exp", "tanh", "sigmoid", "log", "neg", "relu"):
        _add(_op, lambda x, _fn=_fn: _fn(x), [_F((), _dom)], _tfn, "0d",
             bugs=())
    if _op in ("sqrt", "sigmoid", "log_sigmoid"):
        _add(_op, lambda x, _fn=_fn: _fn(x), [_F((2, 3, 4), _dom)], _tfn, "3d")

# large magnitudes: no overflow, correct saturation
_add("sigmoid", lambda x: avalon.sigmoid(x), [_F((3, 4), "wide")], lambda t, x: t.sigmoid(x), "wide")
_add("log_sigmoid", lambda x: avalon.log_sigmoid(x), [_F((3, 4), "wide")],
     lambda t, x: t.nn.functional.logsigmoid(x), "wide")
_add("tanh", lambda x: avalon.tanh(x), [_F((3, 4), "wide")], lambda t, x: t.tanh(x), "wide")
_add("logistic", lambda x: avalon.logistic(x), [_F((3, 4))], lambda t, x: t.sigmoid(x))

for _slope in (0.01, 0.2):
    _add("leaky_relu", lambda x, negative_slope: avalon.leaky_relu(x, negative_slope), [_F((3, 4), "nonzero")],
         lambda t, x, negative_slope: t.nn.functional.leaky_relu(x, negative_slope), f"slope{_slope}",
         kwargs={"negative_slope": _slope})
for _alpha in (1.0, 0.5):
    _add("elu", lambda x, alpha: avalon.elu(x, alpha), [_F((3, 4), "nonzero")],
         lambda t, x, alpha: t.nn.functional.elu(x, alpha), f"alpha{_alpha}", kwargs={"alpha": _alpha})
_add("softplus", lambda x, beta, threshold: avalon.softplus(x, beta, threshold), [_F((4, 5), "wide")],
     lambda t, x, beta, threshold: t.nn.functional.softplus(x, beta, threshold), "beta2_thr5_wide",
     kwargs={"beta": 2.0, "threshold": 5.0})
_add("softplus", lambda x: avalon.softplus(x), [_F((3, 4), "wide")],
     lambda t, x: t.nn.functional.softplus(x), "wide")

# integer inputs
_add("neg", lambda x: avalon.neg(x), [_I((3, 4))], lambda t, x: t.neg(x), "int")
_add("abs", lambda x: avalon.abs(x), [_I((3, 4))], lambda t, x: t.abs(x), "int")
_add("sign", lambda x: avalon.sign(x), [_I((3, 4))], lambda t, x: t.sign(x), "int")

# At exact zeros (and other small integers): kinks follow PyTorch's conventions
# (relu'(0) = abs'(0) = 0, leaky_relu'(0) = slope), and smooth functions keep
# their true derivative.  Finite differences only apply where the function is
# differentiable.
_AT_0 = "a non-differentiable point: checks the subgradient convention against PyTorch only"
_add("relu", lambda x: avalon.relu(x), [_F((4, 5), "ties")], lambda t, x: t.relu(x), "at_zero", fd=False,
     fd_reason=_AT_0)
_add("abs", lambda x: avalon.abs(x), [_F((4, 5), "ties")], lambda t, x: t.abs(x), "at_zero", fd=False,
     fd_reason=_AT_0)
_add("leaky_relu", lambda x: avalon.leaky_relu(x, 0.1), [_F((4, 5), "ties")],
     lambda t, x: t.nn.functional.leaky_relu(x, 0.1), "at_zero", fd=False, fd_reason=_AT_0)
_add("elu", lambda x: avalon.elu(x), [_F((4, 5), "ties")], lambda t, x: t.nn.functional.elu(x), "at_zero")
_add("softplus", lambda x: avalon.softplus(x), [_F((4, 5), "ties")],
     lambda t, x: t.nn.functional.softplus(x), "at_zero")
_add("log_sigmoid", lambda x: avalon.log_sigmoid(x), [_F((4, 5), "ties")],
     lambda t, x: t.nn.functional.logsigmoid(x), "at_zero")
_add("softsign", lambda x: avalon.softsign(x), [_F((4, 5), "ties")],
     lambda t, x: t.nn.functional.softsign(x), "at_zero")

_add("clip", lambda x: avalon.clip(x, -0.4, 0.6), [_F((3, 4), "lattice_odd")],
     lambda t, x: t.clamp(x, -0.4, 0.6), "both")
_add("clip", lambda x: avalon.clip(x, lo=0.0), [_F((3, 4), "lattice_odd")],
     lambda t, x: t.clamp(x, min=0.0), "lo")
_add("clip", lambda x: avalon.clip(x, hi=0.0), [_F((3, 4), "lattice_odd")],
     lambda t, x: t.clamp(x, max=0.0), "hi")

_add("stop_gradient", lambda x: avalon.mul(x, avalon.stop_gradient(x)), [_F((3, 4))],
     lambda t, x: x * x.detach(), fd=False,
     fd_reason="stop_gradient deliberately differs from the derivative of its forward function")

# -- where, cast, full -------------------------------------------------------------------------

_add("where", lambda c, a, b: avalon.where(c, a, b), [_B((3, 4)), _F((3, 4)), _F((3, 4))],
     lambda t, c, a, b: t.where(c, a, b), "same")
_add("where", lambda c, a, b: avalon.where(c, a, b), [_B((3, 1)), _F((4,)), _F(())],
     lambda t, c, a, b: t.where(c, a, b), "bcast")
_add("where", lambda x: avalon.where(avalon.gt(x, 0.0), x, avalon.mul(x, x)), [_F((3, 4), "nonzero")],
     lambda t, x: t.where(x > 0, x, x * x), "traced_cond")
_add("where", lambda c, a: avalon.where(c, a, 0.0), [_B((3, 4)), _F((3, 4))],
     lambda t, c, a: t.where(c, a, 0.0), "py_scalar")
_add("where", lambda c, a, b: avalon.where(c, a, b), [_B((3, 4)), _I((3, 4)), _I((4,))],
     lambda t, c, a, b: t.where(c, a, b), "int")

_add("cast", lambda x: avalon.cast(x, "int64"), [_F((3, 4), "wide")], lambda t, x: x.to(t.int64), "f_to_int",
     grad=())
_add("cast", lambda x: avalon.cast(x, "float32"), [_I((3, 4))], lambda t, x: x.to(t.float32), "int_to_f32")
_add("cast", lambda x: avalon.cast(x, "float64"), [_B((3, 4))], lambda t, x: x.to(t.float64), "bool_to_f64")
_add("cast", lambda x: avalon.cast(x, "float64"), [Arg((3, 4), "float32")], lambda t, x: x.to(t.float64),
     "f32_to_f64")
_add("cast", lambda x: avalon.cast(x, "float32"), [Arg((3, 4), "float64")], lambda t, x: x.to(t.float32),
     "f64_to_f32")
_add("cast", lambda x: avalon.cast(avalon.gt(x, 0.0), x.dtype), [_F((3, 4), "nonzero")],
     lambda t, x: (x > 0).to(x.dtype), "bool_mask", grad=())

_add("full", lambda x: avalon.add(x, avalon.full(x.shape, 2.5, x.dtype, like=x)), [_F((3, 4))],
     lambda t, x: x + 2.5)
_add("zeros", lambda x: avalon.add(x, avalon.zeros(x.shape, x.dtype, like=x)), [_F((3, 4))],
     lambda t, x: x + 0.0)
_add("ones", lambda x: avalon.mul(x, avalon.ones(x.shape, x.dtype, like=x)), [_F((3, 4))],
     lambda t, x: x * 1.0)

# -- reductions --------------------------------------------------------------------------------

_X3 = (2, 3, 4)
for _axis in (None, 1, -1, (0, 2)):
    for _kd in (False, True):
        _v = f"{_axis_name(_axis)}_kd{int(_kd)}"
        _add("sum", lambda x, axis, keepdims: avalon.sum(x, axis, keepdims), [_F(_X3)],
             lambda t, x, axis, keepdims: t.sum(x, dim=_dims(x, axis), keepdim=keepdims), _v,
             kwargs={"axis": _axis, "keepdims": _kd})
for _axis in (None, 0, (1, 2)):
    for _kd in (False, True):
        _v = f"{_axis_name(_axis)}_kd{int(_kd)}"
        _add("mean", lambda x, axis, keepdims: avalon.mean(x, axis, keepdims), [_F(_X3)],
             lambda t, x, axis, keepdims: t.mean(x, dim=_dims(x, axis), keepdim=keepdims), _v,
             kwargs={"axis": _axis, "keepdims": _kd})
        _add("logsumexp", lambda x, axis, keepdims: avalon.logsumexp(x, axis, keepdims), [_F(_X3)],
             lambda t, x, axis, keepdims: t.logsumexp(x, dim=_dims(x, axis), keepdim=keepdims), _v,
             kwargs={"axis": _axis, "keepdims": _kd})
for _axis in (None, 2, (0, 1), -2):
    for _kd in (False, True):
        _v = f"{_axis_name(_axis)}_kd{int(_kd)}"
        _add("max", lambda x, axis, keepdims: avalon.max(x, axis, keepdims), [_F(_X3, "distinct")],
             lambda t, x, axis, keepdims: t.amax(x, dim=_dims(x, axis), keepdim=keepdims), _v,
             kwargs={"axis": _axis, "keepdims": _kd})
        _add("min", lambda x, axis, keepdims: avalon.min(x, axis, keepdims), [_F(_X3, "distinct")],
             lambda t, x, axis, keepdims: t.amin(x, dim=_dims(x, axis), keepdim=keepdims), _v,
             kwargs={"axis": _axis, "keepdims": _kd})
for _axis in (None, 1, -1):
    for _kd in (False, True):
        _v = f"{_axis_name(_axis)}_kd{int(_kd)}"
        _add("argmax", lambda x, axis, keepdims: avalon.argmax(x, axis, keepdims), [_F(_X3, "distinct")],
             lambda t, x, axis, keepdims: t.argmax(x, dim=axis, keepdim=keepdims), _v,
             kwargs={"axis": _axis, "keepdims": _kd}, grad=())
        _add("argmin", lambda x, axis, keepdims: avalon.argmin(x, axis, keepdims), [_F(_X3, "distinct")],
             lambda t, x, axis, keepdims: t.argmin(x, dim=axis, keepdim=keepdims), _v,
             kwargs={"axis": _axis, "keepdims": _kd}, grad=())


def _t_argmax_over(t, x, axes, largest=True):
    """Index into the flattened `axes` block (C order) of the extreme value."""
    rest = [d for d in range(x.dim()) if d not in axes]
    y = x.permute(*rest, *axes).reshape(*[x.shape[d] for d in rest], -1)
    return t.argmax(y, dim=-1) if largest else t.argmin(y, dim=-1)


_add("argmax", lambda x: avalon.argmax(x, (0, 1)), [_F(_X3, "distinct")],
     lambda t, x: _t_argmax_over(t, x, (0, 1)), "ax0_1", grad=())
_add("argmax", lambda x: avalon.argmax(x, 0), [_I((3, 4), "distinct_int")], lambda t, x: t.argmax(x, dim=0),
     "int")
# reductions of integer and bool arrays
_add("sum", lambda x: avalon.sum(x, 1), [_I((3, 4))], lambda t, x: t.sum(x, dim=1), "int")
_add("sum", lambda x: avalon.sum(x), [_B((3, 4))], lambda t, x: t.sum(x), "bool")
_add("mean", lambda x: avalon.mean(x, 0), [_I((3, 4))], lambda t, x: t.mean(x.to(t.float32), dim=0), "int")
_add("max", lambda x: avalon.max(x, 1), [_I((3, 4))], lambda t, x: t.amax(x, dim=1), "int")
# ties: the gradient is shared evenly among the tied maxima (as torch.amax)
_add("max", lambda x: avalon.max(x, 1), [_F((3, 6), "ties")], lambda t, x: t.amax(x, dim=1), "ties",
     fd=False, fd_reason="ties make max non-differentiable; checks the even split against torch.amax")
_add("min", lambda x: avalon.min(x), [_F((3, 6), "ties")], lambda t, x: t.amin(x), "ties",
     fd=False, fd_reason="ties make min non-differentiable; checks the even split against torch.amin")
# a 0-d and a 1-d input
_add("sum", lambda x: avalon.sum(x), [_F(())], lambda t, x: t.sum(x), "0d")
_add("max", lambda x: avalon.max(x, 0, True), [_F((5,), "distinct")],
     lambda t, x: t.amax(x, dim=0, keepdim=True), "1d_kd1")
_add("logsumexp", lambda x: avalon.logsumexp(x, -1), [_F((3, 4), "large")],
     lambda t, x: t.logsumexp(x, dim=-1), "large_values")

for _axis, _corr, _kd in ((None, 0, False), (1, 0, False), (1, 1, True), ((0, 2), 1, False)):
    _add("var", lambda x, axis, correction, keepdims: avalon.var(x, axis, keepdims, correction), [_F(_X3)],
         lambda t, x, axis, correction, keepdims: t.var(x, dim=_dims(x, axis), correction=correction,
                                                         keepdim=keepdims),
         f"{_axis_name(_axis)}_c{_corr}_kd{int(_kd)}",
         kwargs={"axis": _axis, "correction": _corr, "keepdims": _kd})

for _shape, _axis in (((3, 5), -1), ((3, 5), 0), ((2, 3, 4), 1)):
    _v = f"{_fmt_shape(_shape)}_{_axis_name(_axis)}"
    _add("softmax", lambda x, axis: avalon.softmax(x, axis), [_F(_shape)],
         lambda t, x, axis: t.softmax(x, dim=axis), _v, kwargs={"axis": _axis})
    _add("log_softmax", lambda x, axis: avalon.log_softmax(x, axis), [_F(_shape)],
         lambda t, x, axis: t.log_softmax(x, dim=axis), _v, kwargs={"axis": _axis})
_add("softmax", lambda x: avalon.softmax(x), [_F((3, 5), "large")], lambda t, x: t.softmax(x, dim=-1),
     "large_values")
_add("log_softmax", lambda x: avalon.log_softmax(x), [_F((3, 5), "large")],
     lambda t, x: t.log_softmax(x, dim=-1), "large_values")

def _probability(rng, shape, dtype):
    return rng.uniform(0.05, 0.95, shape)


def _unit(rng, shape, dtype):
    return rng.uniform(0.0, 1.0, shape)


_add("binary_cross_entropy", lambda x, t: avalon.binary_cross_entropy(x, t),
     [_F((3, 4), _probability), _F((3, 4), _unit)],
     lambda t, x, y: t.nn.functional.binary_cross_entropy(x, y, reduction="none"))
_add("check_labels", lambda y: avalon.check_labels(y, 5, ignore_index=-100), [_I((3, 4), index_domain(5))],
     lambda t, y: y)

_add("sum_to", lambda x: avalon.sum_to(x, (3, 1)), [_F(_X3)],
     lambda t, x: x.sum(0).sum(-1, keepdim=True), "lead_and_inner")
_add("sum_to", lambda x: avalon.sum_to(x, (1, 4)), [_F((3, 4))], lambda t, x: x.sum(0, keepdim=True), "keep")

# -- shape ops ---------------------------------------------------------------------------------

for _src, _dst in (((2, 3, 4), (6, 4)), ((2, 3, 4), (-1,)), ((2, 3, 4), (4, -1, 2)), ((), (1, 1)),
                   ((1, 1), ()), ((6,), (2, 1, 3))):
    _add("reshape", lambda x, shape: avalon.reshape(x, shape), [_F(_src)],
         lambda t, x, shape: x.reshape(shape), f"{_fmt_shape(_src)}_to_{_fmt_shape(_dst)}",
         kwargs={"shape": _dst})
_add("reshape", lambda x: avalon.reshape(x, 4, 3), [_I((3, 4))], lambda t, x: x.reshape(4, 3), "int_varargs")

for _perm in (None, (1, 0, 2), (2, 0, 1), (-1, 0, 1)):
    _v = "reverse" if _perm is None else "p" + "".join(str(p % 3) for p in _perm)
    _add("transpose", (lambda x: avalon.transpose(x)) if _perm is None else
         (lambda x, _p=_perm: avalon.transpose(x, _p)), [_F((2, 3, 4))],
         (lambda t, x: x.permute(2, 1, 0)) if _perm is None else (lambda t, x, _p=_perm: x.permute(*_p)),
         _v + ("_neg" if _perm and min(_perm) < 0 else ""))
_add("transpose", lambda x: avalon.transpose(x), [_F((3, 4))], lambda t, x: x.t(), "2d")
_add("permute", lambda x: avalon.permute(x, 2, 0, 1), [_F((2, 3, 4))], lambda t, x: x.permute(2, 0, 1))
_add("swapaxes", lambda x: avalon.swapaxes(x, 0, -1), [_F((2, 3, 4))], lambda t, x: t.swapaxes(x, 0, -1))

for _src, _dst in (((3, 1), (2, 3, 4)), ((), (2, 3)), ((4,), (3, 4)), ((2, 1, 4), (2, 3, 4))):
    _add("broadcast_to", lambda x, shape: avalon.broadcast_to(x, shape), [_F(_src)],
         lambda t, x, shape: t.broadcast_to(x, shape), f"{_fmt_shape(_src)}_to_{_fmt_shape(_dst)}",
         kwargs={"shape": _dst})


def _t_expand_dims(x, axis):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    nd = x.dim() + len(axes)
    for a in sorted(a % nd for a in axes):
        x = x.unsqueeze(a)
    return x


for _axis in (0, -1, (0, 2), 1):
    _add("expand_dims", lambda x, axis: avalon.expand_dims(x, axis), [_F((3, 4))],
         lambda t, x, axis: _t_expand_dims(x, axis), _axis_name(_axis), kwargs={"axis": _axis})

for _axis in (None, 0, (0, 2), -2):
    _add("squeeze", (lambda x: avalon.squeeze(x)) if _axis is None else
         (lambda x, _a=_axis: avalon.squeeze(x, _a)), [_F((1, 3, 1, 4))],
         (lambda t, x: x.squeeze()) if _axis is None else (lambda t, x, _a=_axis: x.squeeze(_a)),
         _axis_name(_axis))

for _s, _e in ((0, -1), (1, -1), (0, 1), (1, 2)):
    _add("flatten", lambda x, start_dim, end_dim: avalon.flatten(x, start_dim, end_dim), [_F((2, 3, 4, 1))],
         lambda t, x, start_dim, end_dim: t.flatten(x, start_dim, end_dim), f"s{_s}_e{_e}",
         kwargs={"start_dim": _s, "end_dim": _e})

# in-place write (optimizer updates): the result is dst, overwritten with src (broadcast)
_add("assign", lambda d, s: avalon.assign(d, s), [_F((3, 4)), _F((4,))], lambda t, d, s: d.copy_(s), "bcast",
     grad=())
_add("assign", lambda d, s: avalon.assign(d, avalon.add(avalon.mul(s, 0.5), d)), [_F((3, 4)), _F((3, 4))],
     lambda t, d, s: d.copy_(s * 0.5 + d), "update", grad=())
_add("assign", lambda d, s: avalon.assign(d, s), [_F((2, 3)), _I((2, 3))], lambda t, d, s: d.copy_(s), "int_src",
     grad=())

# -- matmul, linear ----------------------------------------------------------------------------

for _v, _sa, _sb in (("2d", (3, 4), (4, 5)), ("batched", (2, 3, 4), (2, 4, 5)),
                     ("bcast_batch", (2, 1, 3, 4), (5, 4, 2)), ("2d_3d", (3, 4), (2, 4, 5)),
                     ("1d_2d", (4,), (4, 5)), ("2d_1d", (3, 4), (4,)), ("1d_1d", (4,), (4,)),
                     ("1d_3d", (4,), (2, 4, 5)), ("3d_1d", (2, 3, 4), (4,))):
    _add("matmul", lambda a, b: avalon.matmul(a, b), [_F(_sa), _F(_sb)], lambda t, a, b: t.matmul(a, b), _v)
_add("matmul", lambda a, b: avalon.matmul(a, b), [_I((3, 4)), _I((4, 2))], lambda t, a, b: t.matmul(a, b),
     "int")

_add("linear", lambda x, w, b: avalon.linear(x, w, b), [_F((2, 3, 4)), _F((5, 4)), _F((5,))],
     lambda t, x, w, b: t.nn.functional.linear(x, w, b), "bias_3d")
_add("linear", lambda x, w: avalon.linear(x, w), [_F((3, 4)), _F((5, 4))],
     lambda t, x, w: t.nn.functional.linear(x, w), "no_bias")
_add("linear", lambda x, w, b: avalon.linear(x, w, b), [_F((4,)), _F((5, 4)), _F((5,))],
     lambda t, x, w, b: t.nn.functional.linear(x, w, b), "1d_input")

# -- dropout and random ops --------------------------------------------------------------------

_add("dropout", lambda x: avalon.dropout(x, 0.0), [_F((3, 4))], lambda t, x: t.nn.functional.dropout(x, 0.0),
     "p0")
_add("dropout", lambda x: avalon.dropout(x, 0.5, training=False), [_F((3, 4))],
     lambda t, x: t.nn.functional.dropout(x, 0.5, training=False), "eval")
_add("dropout", lambda x: avalon.dropout(x, 1.0), [_F((3, 4))], lambda t, x: t.nn.functional.dropout(x, 1.0),
     "p1")


def _check_dropout_half(out, x):
    kept = out != 0
    np.testing.assert_allclose(out[kept], 2.0 * x[kept], rtol=1e-5)
    assert 0 < kept.sum() < kept.size, "dropout(p=0.5) kept all or none of 100 elements"


def _check_uniform(out, x):
    assert np.all((out >= 0) & (out < 1)), "random_uniform outside [0, 1)"
    assert out.std() > 0.1


def _check_normal(out, x):
    assert np.all(np.isfinite(out))
    assert abs(out.mean()) < 0.5 and 0.6 < out.std() < 1.4, (out.mean(), out.std())


_add("dropout", lambda x: avalon.dropout(x, 0.5), [_F((10, 10), "nonzero")],
     lambda t, x: t.nn.functional.dropout(x, 0.5), "p0.5", random=True, check=_check_dropout_half)
_add("random_uniform", lambda x: avalon.random_uniform(x.shape, x.dtype, like=x), [_F((10, 10))],
     lambda t, x: t.rand_like(x), random=True, check=_check_uniform)
_add("random_normal", lambda x: avalon.random_normal(x.shape, x.dtype, like=x), [_F((10, 10))],
     lambda t, x: t.randn_like(x), random=True, check=_check_normal)


# -- indexing (avalon.ops.indexing) -----------------------------------------------------------

_IDX = np.array([2, 0, 2, 1])           # repeats: the gradient accumulates
_MASK = np.array([[True, False, True, True], [False, False, True, False], [True, True, False, True]])
for _v, _index in (("int", 1), ("neg_int", -1), ("slice", (slice(None), slice(1, None, 2))),
                   ("ellipsis_newaxis", (Ellipsis, None, 2)),
                   ("int_slice_newaxis", (1, None, slice(0, 3))), ("array_repeats", (_IDX,)),
                   ("array_list", ([0, 2],)), ("array_and_slice", (slice(None), _IDX[:3])),
                   ("arrays_split_by_slice", (np.array([0, 2]), slice(None), np.array([1, 3]))),
                   ("arrays_broadcast", (np.array([[0], [2]]), slice(None), np.array([1, 3, 0])))):
    _add("getitem", lambda x, index: avalon.getitem(x, index), [_F((3, 4, 4) if "split" in _v or "broadcast" in _v
                                                                   else (3, 4))],
         lambda t, x, index: x[tuple(t.from_numpy(i) if isinstance(i, np.ndarray) else i
                                     for i in (index if isinstance(index, tuple) else (index,)))],
         _v, kwargs={"index": _index})
# negative steps (torch slicing has none: flip, then pick)
_add("getitem", lambda x: avalon.getitem(x, (slice(None, None, -1), slice(3, 0, -2))), [_F((3, 4))],
     lambda t, x: x.flip(0)[:, [3, 1]], "neg_step")
_add("getitem", lambda x: avalon.getitem(x, _MASK), [_F((3, 4))], lambda t, x: x[t.from_numpy(_MASK)], "bool_mask")
_add("getitem", lambda x, i: avalon.getitem(x, i), [_F((5, 3)), _I((2, 3), index_domain(5))],
     lambda t, x, i: x[i], "traced_index")
_add("getitem", lambda x, i, j: avalon.getitem(x, (i, j)), [_F((5, 3)), _I((4,), index_domain(5)),
                                                            _I((4,), index_domain(3))],
     lambda t, x, i, j: x[i, j], "traced_index_pair")
_add("getitem", lambda x: avalon.getitem(x, (0, slice(1, 3))), [_I((3, 4))], lambda t, x: x[0, 1:3], "int_array")

_add("concatenate", lambda a, b: avalon.concatenate([a, b]), [_F((2, 3)), _F((4, 3))],
     lambda t, a, b: t.cat([a, b]), "axis0")
_add("concatenate", lambda a, b, c: avalon.concatenate([a, b, c], axis=-1),
     [_F((2, 3, 1)), _F((2, 3, 2)), _F((2, 3, 4))], lambda t, a, b, c: t.cat([a, b, c], dim=-1), "three_axis_neg")
_add("concatenate", lambda a, b: avalon.concatenate([a, b], axis=None), [_F((2, 3)), _F((4,))],
     lambda t, a, b: t.cat([a.reshape(-1), b.reshape(-1)]), "axis_none")
_add("concatenate", lambda a, b: avalon.concatenate([a, b], axis=1), [_F((2, 3)), _I((2, 2))],
     lambda t, a, b: t.cat([a, b.to(a.dtype)], dim=1), "float_int")
_add("stack", lambda a, b, c: avalon.stack([a, b, c]), [_F((2, 3)), _F((2, 3)), _F((2, 3))],
     lambda t, a, b, c: t.stack([a, b, c]), "axis0")
_add("stack", lambda a, b: avalon.stack([a, b], axis=-1), [_F((2, 3)), _F((2, 3))],
     lambda t, a, b: t.stack([a, b], dim=-1), "axis_neg")
_add("split", lambda x: avalon.split(x, 3, axis=1), [_F((2, 6))], lambda t, x: t.tensor_split(x, 3, dim=1),
     "sections")
_add("split", lambda x: avalon.split(x, [1, 3]), [_F((5, 2))], lambda t, x: t.tensor_split(x, [1, 3], dim=0),
     "points")


def _t_pad(t, x, widths, value=0.0):
    """np.pad(constant) in torch: F.pad axis by axis (so a corner takes its last axis' value)."""
    for ax, (b, a) in enumerate(widths):
        if b or a:
            spec = [0, 0] * (x.dim() - 1 - ax) + [b, a]
            x = t.nn.functional.pad(x, spec, value=value[ax] if isinstance(value, list) else value)
    return x


_add("pad", lambda x: avalon.pad(x, 1), [_F((2, 3))], lambda t, x: _t_pad(t, x, [(1, 1), (1, 1)]), "int")
_add("pad", lambda x: avalon.pad(x, ((0, 2), (1, 0), (2, 1)), constant_values=1.5), [_F((2, 3, 2))],
     lambda t, x: _t_pad(t, x, [(0, 2), (1, 0), (2, 1)], 1.5), "pairs_value")
_add("pad", lambda x: avalon.pad(x, ((1, 1), (2, 0)), constant_values=((1.0, 2.0), (3.0, 4.0))), [_F((2, 3))],
     lambda t, x: _t_pad_values(t, x), "per_side_values")


def _t_pad_values(t, x):
    # axis 0: (1 before with 1.0, 1 after with 2.0); then axis 1: (2 before with 3.0)
    F = t.nn.functional
    y = F.pad(F.pad(x, [0, 0, 1, 0], value=1.0), [0, 0, 0, 1], value=2.0)
    return F.pad(y, [2, 0], value=3.0)


_add("take_along_axis", lambda x, i: avalon.take_along_axis(x, i, axis=1), [_F((3, 4)), _I((3, 5), index_domain(4))],
     lambda t, x, i: t.take_along_dim(x, i, dim=1), "axis1")
_add("take_along_axis", lambda x, i: avalon.take_along_axis(x, i, axis=0),
     [_F((3, 4, 2)), _I((5, 1, 2), index_domain(3))], lambda t, x, i: t.take_along_dim(x, i, dim=0),
     "axis0_bcast")
_add("take_along_axis", lambda x, i: avalon.take_along_axis(x, i, axis=None), [_F((3, 4)), _I((6,), index_domain(12))],
     lambda t, x, i: t.take_along_dim(x, i), "axis_none")
_add("gather", lambda x, i: avalon.gather(x, 1, i), [_F((3, 5)), _I((2, 4), index_domain(5))],
     lambda t, x, i: t.gather(x, 1, i), "smaller_index")
_add("gather", lambda x, i: avalon.gather(x, 0, i), [_F((3, 4)), _I((6, 4), index_domain(3))],
     lambda t, x, i: t.gather(x, 0, i), "dim0")
_add("take", lambda x: avalon.take(x, np.array([[0, 5], [11, 5]])), [_F((3, 4))],
     lambda t, x: t.take(x, t.tensor([[0, 5], [11, 5]])), "flat")
_add("take", lambda x, i: avalon.take(x, i, axis=1), [_F((3, 4)), _I((5,), index_domain(4))],
     lambda t, x, i: t.index_select(x, 1, i), "axis1_traced")
_add("one_hot", lambda y: avalon.one_hot(y, 5), [_I((2, 3), index_domain(5))],
     lambda t, y: t.nn.functional.one_hot(y, 5).to(t.float32))

# -- convolution and pooling (avalon.ops.nn) --------------------------------------------------------

def _tF(name):
    return lambda t, *a, **k: getattr(t.nn.functional, name)(*a, **k)


for _v, _xs, _ws, _bias, _kw in (
        ("basic", (2, 3, 7), (4, 3, 3), True, {}),
        ("stride2_pad1_dil2", (2, 2, 9), (3, 2, 3), False, {"stride": 2, "padding": 1, "dilation": 2}),
        ("groups2_same", (1, 4, 6), (4, 2, 4), True, {"groups": 2, "padding": "same"}),
        ("unbatched", (3, 6), (2, 3, 2), True, {})):
    _args = [_F(_xs), _F(_ws)] + ([_F((_ws[0],))] if _bias else [])
    _add("conv1d", lambda *a, **k: avalon.conv1d(*a, **k), _args, _tF("conv1d"), _v, kwargs=_kw)
for _v, _xs, _ws, _bias, _kw in (
        ("basic", (2, 3, 5, 5), (4, 3, 3, 3), True, {}),
        ("stride2_pad1", (2, 2, 6, 5), (3, 2, 3, 2), True, {"stride": 2, "padding": 1}),
        ("dil2_groups2", (1, 4, 7, 7), (4, 2, 2, 3), False, {"dilation": 2, "groups": 2}),
        ("same_even_kernel", (1, 2, 5, 6), (3, 2, 2, 4), False, {"padding": "same"}),
        ("asym", (1, 2, 6, 7), (2, 2, 3, 1), True, {"stride": (2, 1), "padding": (0, 2)}),
        ("unbatched", (2, 5, 5), (3, 2, 3, 3), True, {})):
    _args = [_F(_xs), _F(_ws)] + ([_F((_ws[0],))] if _bias else [])
    _add("conv2d", lambda *a, **k: avalon.conv2d(*a, **k), _args, _tF("conv2d"), _v, kwargs=_kw)
_add("conv3d", lambda *a, **k: avalon.conv3d(*a, **k), [_F((1, 2, 4, 4, 3)), _F((3, 2, 2, 2, 2)), _F((3,))],
     _tF("conv3d"), "basic")
_add("conv3d", lambda *a, **k: avalon.conv3d(*a, **k), [_F((2, 2, 5, 4, 4)), _F((2, 1, 3, 2, 2))],
     _tF("conv3d"), "stride_pad_groups", kwargs={"stride": (2, 1, 1), "padding": 1, "groups": 2})
_add("conv", lambda x, w: avalon.conv(x, w, stride=2, padding=1), [_F((2, 2, 5, 5)), _F((3, 2, 3, 3))],
     lambda t, x, w: t.nn.functional.conv2d(x, w, stride=2, padding=1), "2d")

for _v, _xs, _ws, _bias, _kw in (
        ("basic", (2, 3, 5), (3, 2, 3), True, {}),
        ("stride2_pad1_outpad1", (1, 2, 4), (2, 3, 3), False, {"stride": 2, "padding": 1, "output_padding": 1}),
        ("groups2_dil2", (1, 4, 5), (4, 1, 2), True, {"groups": 2, "dilation": 2})):
    _args = [_F(_xs), _F(_ws)] + ([_F((_ws[1] * _kw.get("groups", 1),))] if _bias else [])
    _add("conv_transpose1d", lambda *a, **k: avalon.conv_transpose1d(*a, **k), _args,
         _tF("conv_transpose1d"), _v, kwargs=_kw)
for _v, _xs, _ws, _bias, _kw in (
        ("basic", (2, 3, 4, 4), (3, 2, 3, 3), True, {}),
        ("stride2_pad1_outpad1", (1, 2, 3, 4), (2, 3, 3, 3), True,
         {"stride": 2, "padding": 1, "output_padding": 1}),
        ("groups2_dil2_asym", (1, 4, 3, 4), (4, 1, 2, 3), False,
         {"groups": 2, "dilation": 2, "stride": (1, 2)}),
        ("unbatched", (2, 3, 3), (2, 2, 2, 2), True, {})):
    _args = [_F(_xs), _F(_ws)] + ([_F((_ws[1] * _kw.get("groups", 1),))] if _bias else [])
    _add("conv_transpose2d", lambda *a, **k: avalon.conv_transpose2d(*a, **k), _args,
         _tF("conv_transpose2d"), _v, kwargs=_kw)
_add("conv_transpose3d", lambda *a, **k: avalon.conv_transpose3d(*a, **k),
     [_F((1, 2, 3, 3, 2)), _F((2, 2, 2, 2, 2)), _F((2,))], _tF("conv_transpose3d"), "stride2",
     kwargs={"stride": 2})
_add("conv_transpose", lambda x, w: avalon.conv_transpose(x, w, stride=2), [_F((1, 2, 3, 3)), _F((2, 3, 2, 2))],
     lambda t, x, w: t.nn.functional.conv_transpose2d(x, w, stride=2), "2d")

for _nd, _xs in ((1, (2, 3, 8)), (2, (2, 2, 6, 5)), (3, (1, 2, 4, 4, 5))):
    _name = f"max_pool{_nd}d"
    for _v, _kw in (("k2", {"kernel_size": 2}), ("k3_s2_p1", {"kernel_size": 3, "stride": 2, "padding": 1}),
                    ("k2_dil2", {"kernel_size": 2, "stride": 1, "dilation": 2})):
        _add(_name, lambda x, _n=_name, **k: getattr(avalon, _n)(x, **k), [_F(_xs, "distinct")], _tF(_name), _v,
             kwargs=_kw)
    _name = f"avg_pool{_nd}d"
    for _v, _kw in (("k2", {"kernel_size": 2}),
                    ("k3_s2_p1", {"kernel_size": 3, "stride": 2, "padding": 1}),
                    ("k3_s2_p1_excl_pad", {"kernel_size": 3, "stride": 2, "padding": 1, "count_include_pad": False})):
        _add(_name, lambda x, _n=_name, **k: getattr(avalon, _n)(x, **k), [_F(_xs)], _tF(_name), _v, kwargs=_kw)
    for _kind in ("avg", "max"):
        _name = f"adaptive_{_kind}_pool{_nd}d"
        _out = {1: 4, 2: (3, 1), 3: (2, 1, 5)}[_nd]
        _add(_name, lambda x, _n=_name, **k: getattr(avalon, _n)(x, **k),
             [_F(_xs, "distinct" if _kind == "max" else None)], _tF(_name), "", kwargs={"output_size": _out})
_add("max_pool2d", lambda x: avalon.max_pool2d(x, (2, 3), stride=(1, 2)), [_F((2, 5, 6), "distinct")],
     lambda t, x: t.nn.functional.max_pool2d(x, (2, 3), stride=(1, 2)), "unbatched_asym")
_add("max_pool2d", lambda x: avalon.max_pool2d(x, 2), [_F((1, 2, 4, 4), "ties")],
     lambda t, x: t.nn.functional.max_pool2d(x, 2), "ties", fd=False,
     fd_reason="ties make max pooling non-differentiable; checks that, as in PyTorch, the first maximum of "
               "each window gets the gradient")
_add("maxpool2d", lambda x: avalon.maxpool2d(x, 2), [_F((1, 2, 4, 4), "distinct")],
     lambda t, x: t.nn.functional.max_pool2d(x, 2))
_add("max_pool", lambda x: avalon.max_pool(x, 2, 1), [_F((1, 2, 4, 3), "distinct")],
     lambda t, x: t.nn.functional.max_pool2d(x, 2, 1), "2d")
_add("avg_pool2d", lambda x: avalon.avg_pool2d(x, 2, divisor_override=3), [_F((1, 2, 4, 4))],
     lambda t, x: t.nn.functional.avg_pool2d(x, 2, divisor_override=3), "divisor_override")
_add("avg_pool", lambda x: avalon.avg_pool(x, 2, 1, 1, count_include_pad=False), [_F((1, 2, 4, 3))],
     lambda t, x: t.nn.functional.avg_pool2d(x, 2, 1, 1, count_include_pad=False), "2d")


# -- einsum, repeat/tile, torch's index ops, constants of static shape ------------------------

for _v, _spec, _shapes in (("matmul", "ij,jk->ik", [(3, 4), (4, 5)]), ("implicit", "ij,jk", [(3, 4), (4, 5)]),
                           ("batched", "bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
                           ("ellipsis_bcast", "...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 2)]),
                           ("ellipsis_implicit", "...i,...i", [(2, 1, 3), (4, 3)]),
                           ("trace", "ii", [(3, 3)]), ("diagonal", "ii->i", [(3, 3)]),
                           ("sum_all", "ij->", [(3, 4)]), ("transpose", "ijk->kij", [(2, 3, 4)]),
                           ("outer", "i,j->ij", [(3,), (4,)]), ("elementwise", "i,i->i", [(3,), (3,)]),
                           ("dot", "i,i", [(5,), (5,)]), ("size1_bcast", "ij,j->ij", [(3, 4), (1,)]),
                           ("three", "ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]),
                           ("three_shared", "abc,cd,bd->ad", [(2, 3, 4), (4, 5), (3, 5)]),
                           ("bilinear", "bn,anm,bm->ba", [(2, 3), (4, 3, 5), (2, 5)]),
                           ("sum_own_axis", "ij,jk->k", [(3, 4), (4, 2)])):
    _add("einsum", lambda *a, spec: avalon.einsum(spec, *a), [_F(s) for s in _shapes],
         lambda t, *a, spec: t.einsum(spec, *a), _v, kwargs={"spec": _spec})
_add("einsum", lambda a, b: avalon.einsum("ij,jk->ik", a, b), [_I((3, 4)), _I((4, 2))],
     lambda t, a, b: t.einsum("ij,jk->ik", a, b), "int")

for _v, _r, _axis, _kw in (("int_flat", 2, None, {}), ("int_axis1", 3, 1, {}), ("int_neg_axis", 2, -1, {}),
                          ("per_element", [1, 0, 2], 0, {}), ("one_count", [2], 1, {})):
    _add("repeat", lambda x, repeats, axis: avalon.repeat(x, repeats, axis), [_F((3, 2))],
         lambda t, x, repeats, axis: t.repeat_interleave(
             x, repeats if isinstance(repeats, int) else t.tensor(repeats), dim=axis), _v,
         kwargs={"repeats": _r, "axis": _axis})
for _v, _reps, _shape in (("int", 2, (3, 2)), ("pairs", (2, 3), (3, 2)), ("more_reps", (2, 1, 2), (3, 2)),
                          ("fewer_reps", (3,), (2, 2, 2))):
    _add("tile", lambda x, reps: avalon.tile(x, reps), [_F(_shape)], lambda t, x, reps: t.tile(x, (reps,) if
                                                                                          isinstance(reps, int)
                                                                                          else reps),
         _v, kwargs={"reps": _reps})

_add("gather", lambda x, i: avalon.gather(x, -1, i), [_F((2, 3, 4)), _I((2, 3, 6), index_domain(4))],
     lambda t, x, i: t.gather(x, -1, i), "neg_dim_repeats")
_add("index_select", lambda x, i: avalon.index_select(x, 0, i), [_F((4, 3)), _I((6,), index_domain(4))],
     lambda t, x, i: t.index_select(x, 0, i), "dim0_traced_repeats")
_add("index_select", lambda x: avalon.index_select(x, -1, np.array([3, 0, 3])), [_F((2, 3, 4))],
     lambda t, x: t.index_select(x, -1, t.tensor([3, 0, 3])), "neg_dim_concrete")
_add("index_select", lambda x, i: avalon.index_select(x, 1, i), [_I((2, 5)), _I((3,), index_domain(5))],
     lambda t, x, i: t.index_select(x, 1, i), "int")
_add("scatter_add", lambda x, i, s: avalon.scatter_add(x, 0, i, s),
     [_F((3, 4)), _I((5, 4), index_domain(3)), _F((5, 4))],
     lambda t, x, i, s: t.scatter_add(x, 0, i, s), "dim0_repeats")
# index smaller than input and src outside dim: only src[:2, :3] is read (torch's own backward
# refuses a src larger than index, so the reference slices src first)
_add("scatter_add", lambda x, i, s: avalon.scatter_add(x, 1, i, s),
     [_F((3, 4)), _I((2, 3), index_domain(4)), _F((3, 5))],
     lambda t, x, i, s: t.scatter_add(x, 1, i, s[:2, :3]), "index_smaller")
_add("scatter_add", lambda x, i, s: avalon.scatter_add(x, -1, i, s),
     [_I((2, 3)), _I((2, 4), index_domain(3)), _I((2, 4))],
     lambda t, x, i, s: t.scatter_add(x, -1, i, s), "int")
_add("masked_fill", lambda x, m: avalon.masked_fill(x, m, -1.5), [_F((3, 4)), _B((3, 4))],
     lambda t, x, m: t.masked_fill(x, m, -1.5), "same")
_add("masked_fill", lambda x, m: avalon.masked_fill(x, m, 0.0), [_F((2, 3, 4)), _B((3, 1))],
     lambda t, x, m: t.masked_fill(x, m, 0.0), "bcast_mask")
_add("masked_fill", lambda x, m: avalon.masked_fill(x, m, 2.0), [_F((3, 4)), _B((2, 3, 4))],
     lambda t, x, m: t.masked_fill(x, m, 2.0), "mask_wider")
_add("masked_fill", lambda x, m, v: avalon.masked_fill(x, m, v), [_F((3, 4)), _B((3, 4)), _F(())],
     lambda t, x, m, v: t.masked_fill(x, m, v), "traced_value")
_add("masked_fill", lambda x, m: avalon.masked_fill(x, m, 2.5), [_I((3, 4)), _B((3, 4))],
     lambda t, x, m: t.masked_fill(x, m, 2.5), "int_truncates")
_add("check_index", lambda i: avalon.check_index(i, 5), [_I((2, 3), index_domain(5))], lambda t, i: i)

_add("arange", lambda x: avalon.add(x, avalon.arange(4, like=x)), [_F((3, 4))], lambda t, x: x + t.arange(4),
     "int")
_add("arange", lambda x: avalon.mul(x, avalon.arange(0.5, 2.5, 0.5, dtype=x.dtype, like=x)), [_F((3, 4))],
     lambda t, x: x * t.arange(0.5, 2.5, 0.5), "float_step")
_add("full", lambda x, v: avalon.mul(x, avalon.full(x.shape, v)), [_F((3, 4)), _F(())],
     lambda t, x, v: x * v.expand(x.shape), "traced_fill")
_add("full_like", lambda x: avalon.add(x, avalon.full_like(x, 2.5)), [_F((3, 4))],
     lambda t, x: x + t.full_like(x, 2.5))
_add("zeros_like", lambda x: avalon.add(x, avalon.zeros_like(x)), [_F((3, 4))], lambda t, x: x + t.zeros_like(x))
_add("ones_like", lambda x: avalon.mul(x, avalon.ones_like(x, dtype="int64")), [_F((3, 4))],
     lambda t, x: x * t.ones_like(x, dtype=t.int64))
# -- sorting, scans, norms, statistics, flips, triangles, any/all ------------------------------

def _t_flat(x, axis):
    """torch arguments for a NumPy axis that may be None (flatten first)."""
    return (x.reshape(-1), 0) if axis is None else (x, axis)


def _t_sort(t, x, axis, fn="sort"):
    x, dim = _t_flat(x, axis)
    return getattr(t, fn)(x, dim=dim, stable=True)


def _zero_row(rng, shape, dtype):
    x = rng.standard_normal(shape)
    x[0] = 0.0
    return x


def _with_zeros(rng, shape, dtype):
    # exact zeros among ordinary values (cumprod's gradient must not divide by them)
    x = rng.standard_normal(shape)
    x.flat[rng.choice(x.size, max(1, x.size // 4), replace=False)] = 0.0
    return x


for _axis, _shape in ((1, (3, 4)), (0, (3, 4)), (None, (2, 3)), (-1, (2, 3, 4))):
    _v = f"{_fmt_shape(_shape)}_{_axis_name(_axis)}"
    _add("cumsum", lambda x, axis: avalon.cumsum(x, axis), [_F(_shape)],
         lambda t, x, axis: t.cumsum(*_t_flat(x, axis)), _v, kwargs={"axis": _axis})
    _add("cumprod", lambda x, axis: avalon.cumprod(x, axis), [_F(_shape)],
         lambda t, x, axis: t.cumprod(*_t_flat(x, axis)), _v, kwargs={"axis": _axis})
_add("cumsum", lambda x: avalon.cumsum(x, 0), [_I((3, 4))], lambda t, x: t.cumsum(x, 0), "int")
_add("cumsum", lambda x: avalon.cumsum(x, 1), [_B((3, 4))], lambda t, x: t.cumsum(x, 1), "bool")
_add("cumprod", lambda x: avalon.cumprod(x, 1), [_F((3, 6), _with_zeros)], lambda t, x: t.cumprod(x, 1), "zeros")
_add("cumprod", lambda x: avalon.cumprod(x, 0), [_F((5, 3), "ties")], lambda t, x: t.cumprod(x, 0), "ties_zeros")
_add("cumprod", lambda x: avalon.cumprod(x, 1), [_I((3, 4))], lambda t, x: t.cumprod(x, 1), "int")

for _axis, _shape in ((-1, (3, 5)), (0, (4, 3)), (None, (3, 4)), (1, (2, 4, 3))):
    _v = f"{_fmt_shape(_shape)}_{_axis_name(_axis)}"
    _add("sort", lambda x, axis: avalon.sort(x, axis), [_F(_shape, "distinct")],
         lambda t, x, axis: _t_sort(t, x, axis).values, _v, kwargs={"axis": _axis})
    # ties: argsort is stable (equal values keep their order), as torch's stable=True
    _add("argsort", lambda x, axis: avalon.argsort(x, axis), [_F(_shape, "ties")],
         lambda t, x, axis: _t_sort(t, x, axis, "argsort"), _v, kwargs={"axis": _axis}, grad=())
_add("sort", lambda x: avalon.sort(x), [_I((3, 5))], lambda t, x: t.sort(x, dim=-1, stable=True).values, "int")
_add("argsort", lambda x: avalon.argsort(x, 0), [_I((6, 2))], lambda t, x: t.argsort(x, dim=0, stable=True),
     "int")

for _k, _axis, _largest, _shape in ((2, -1, True, (3, 5)), (3, 0, False, (4, 3)), (4, 1, True, (2, 4, 3)),
                                    (0, -1, True, (2, 3))):
    _v = f"k{_k}_{_axis_name(_axis)}_{'largest' if _largest else 'smallest'}"
    _kw = {"k": _k, "axis": _axis, "largest": _largest}
    _add("topk", lambda x, k, axis, largest: avalon.topk(x, k, axis, largest), [_F(_shape, "distinct")],
         lambda t, x, k, axis, largest: t.topk(x, k, axis, largest), _v, kwargs=_kw, grad=())
    _add("topk", lambda x, k, axis, largest: avalon.topk(x, k, axis, largest).values, [_F(_shape, "distinct")],
         lambda t, x, k, axis, largest: t.topk(x, k, axis, largest).values, _v + "_values", kwargs=_kw)
_add("topk", lambda x: avalon.topk(x, 2).indices, [_I((3, 6), "distinct_int")],
     lambda t, x: t.topk(x, 2).indices, "int_indices")

_NORMS = [
    # (variant, shape, domain, ord, axis, keepdims)
    ("default_3d", (2, 3, 4), None, None, None, False),
    ("default_kd", (3, 4), None, None, None, True),
    ("2_ax1_kd", (3, 4), None, 2, 1, True),
    ("1_ax0", (3, 4), None, 1, 0, False),
    ("inf_ax1", (3, 4), "distinct", np.inf, 1, False),
    ("neginf_ax1", (3, 4), "distinct", -np.inf, -1, False),
    ("0_ax1", (3, 4), "nonzero", 0, 1, False),
    ("3_ax1", (3, 4), None, 3, 1, False),
    ("p0.5_ax0", (3, 4), "nonzero", 0.5, 0, False),
    ("vector_1d_ord1", (5,), "nonzero", 1, None, False),
    ("fro_2d", (3, 4), None, "fro", None, False),
    ("fro_ax1_2_kd", (2, 3, 4), None, "fro", (1, 2), True),
    ("mat1", (3, 4), None, 1, None, False),
    ("mat_neg1_ax2_0", (3, 2, 4), None, -1, (2, 0), False),
    ("mat_inf", (3, 4), None, np.inf, None, False),
    ("mat_neginf_kd", (2, 3, 4), None, -np.inf, (1, 2), True),
]
for _v, _shape, _dom, _ord, _axis, _kd in _NORMS:
    _add("norm", lambda x, ord, axis, keepdims: avalon.norm(x, ord, axis, keepdims), [_F(_shape, _dom)],
         lambda t, x, ord, axis, keepdims: t.linalg.norm(x, ord, axis, keepdims), _v,
         kwargs={"ord": _ord, "axis": _axis, "keepdims": _kd})
# the gradient of a norm at a zero vector is 0 (as torch's), not nan
_add("norm", lambda x: avalon.norm(x, axis=1), [_F((3, 4), _zero_row)], lambda t, x: t.linalg.norm(x, dim=1),
     "zero_row", fd=False, fd_reason="the norm is not differentiable at a zero vector; checks torch's 0 there")
_add("norm", lambda x: avalon.norm(x), [_I((3, 4))], lambda t, x: t.linalg.norm(x.to(t.float32)), "int")

for _axis, _ddof, _kd in ((None, 0, False), (1, 1, True), ((0, 2), 1, False), (-1, 0, False)):
    _add("std", lambda x, axis, ddof, keepdims: avalon.std(x, axis, keepdims, ddof=ddof), [_F(_X3)],
         lambda t, x, axis, ddof, keepdims: t.std(x, dim=_dims(x, axis), correction=ddof, keepdim=keepdims),
         f"{_axis_name(_axis)}_ddof{_ddof}_kd{int(_kd)}", kwargs={"axis": _axis, "ddof": _ddof, "keepdims": _kd})
_add("var", lambda x: avalon.var(x, 1, ddof=1), [_F(_X3)], lambda t, x: t.var(x, dim=1, correction=1), "ddof_kw")

for _axis in (None, 0, (0, 2), -1):
    _add("flip", lambda x, axis: avalon.flip(x, axis), [_F(_X3)],
         lambda t, x, axis: t.flip(x, _dims(x, axis)), _axis_name(_axis), kwargs={"axis": _axis})
_add("flip", lambda x: avalon.flip(x, 1), [_I((3, 4))], lambda t, x: t.flip(x, (1,)), "int")

def _t_roll(t, x, shift, axis):
    """np.roll in torch: several shifts of one axis add up (torch wants one per dim)."""
    if isinstance(shift, tuple) and isinstance(axis, int):
        shift = sum(shift)
    return t.roll(x, shift, axis)


for _v, _shift, _axis in (("1_ax1", 1, 1), ("neg2_ax0", -2, 0), ("5_all", 5, None), ("pair", (1, 2), (0, 2)),
                          ("7_ax2_wraps", 7, 2), ("two_on_ax1", (1, 1), 1)):
    _add("roll", lambda x, shift, axis: avalon.roll(x, shift, axis), [_F(_X3)], _t_roll, _v,
         kwargs={"shift": _shift, "axis": _axis})

for _op in ("tril", "triu"):
    for _k, _shape in ((0, (4, 4)), (-1, (3, 5)), (2, (5, 3)), (1, (2, 3, 4))):
        _add(_op, lambda x, k, _op=_op: getattr(avalon, _op)(x, k), [_F(_shape)],
             lambda t, x, k, _op=_op: getattr(t, _op)(x, k), f"k{_k}_{_fmt_shape(_shape)}", kwargs={"k": _k})
    _add(_op, lambda x, _op=_op: getattr(avalon, _op)(x), [_I((3, 3))], lambda t, x, _op=_op: getattr(t, _op)(x),
         "int")
    _add(_op, lambda x, _op=_op: getattr(avalon, _op)(x), [_B((3, 3))], lambda t, x, _op=_op: getattr(t, _op)(x),
         "bool")

for _op in ("any", "all"):
    for _axis, _kd in ((None, False), (1, True), ((0, 2), False), (-1, False)):
        _add(_op, lambda x, axis, keepdims, _op=_op: getattr(avalon, _op)(x, axis, keepdims), [_F(_X3, "ties")],
             lambda t, x, axis, keepdims, _op=_op: getattr(t, _op)(x, _dims(x, axis), keepdims) if axis is not None
             else getattr(t, _op)(x), f"{_axis_name(_axis)}_kd{int(_kd)}", kwargs={"axis": _axis, "keepdims": _kd},
             grad=())
    _add(_op, lambda x, _op=_op: getattr(avalon, _op)(x, 0), [_B((3, 4))],
         lambda t, x, _op=_op: getattr(t, _op)(x, 0), "bool", grad=())


# -- queries -----------------------------------------------------------------------------------

def cases_for(op: str) -> list[OpCase]:
    return [c for c in CASES if c.op == op]


def case_by_id(case_id: str) -> OpCase:
    for c in CASES:
        if c.id == case_id:
            return c
    raise KeyError(case_id)
