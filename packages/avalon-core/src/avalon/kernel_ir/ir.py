"""The kernel IR: a small, typed, loop-level IR that renderers turn into C or CUDA.

A `Kernel` has buffer parameters (`Buffer`: a flat array of one dtype and a
static number of elements, read ("in") or written ("out")), local buffers
(role "local": small arrays of the kernel's own, accumulators of a
reduction, read and written) and a body of statements:

* `Loop(var, extent, body, lanes=False)`: ``for var in [0, extent)``; a
  `lanes` loop runs independent lanes of per-lane accumulators (a renderer
  makes it the loop the compiler vectorizes: the lanes become one vector);
* `Let(var, value)`: a new local (SSA: each name is bound once);
* `Store(buffer, index, value)`: ``buffer[index] = value``;
* `Update(buffer, index, op, value)`: ``buffer[index] = buffer[index] op value``
  on an output or local buffer (a scatter-add: col2im, overlapping windows;
  an accumulator of a sum, max or min).

Expressions carry their dtype on every node: `Var`, `Const` (a value of exact
dtype), `Load(buffer, index)`, `Unary`, `Binary`, `Call`, `Select` and
`Cast`.  Indexes (`Index`) are affine: a sum of loop variables times constant
strides, plus a constant offset.  Shapes are static, so extents and strides
are compile-time constants.

Operations mean what NumPy's ufuncs do on the same dtypes, whatever the
target: ``max``/``min`` propagate NaN (the first NaN operand wins) and return
the second operand on ties, integer arithmetic wraps, ``div`` is for floats
only.  A renderer spells each of them exactly in its language.

`str(kernel)` is a stable text form; `verify(kernel)` checks the invariants
(every variable defined before use, dtypes agree, every index in bounds) and
raises `KernelIRError` naming the first broken one.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ..errors import GraphError
from ..graph import DTYPE_NAMES

INDEX = np.dtype(np.int64)   # the dtype of loop variables and index expressions
BOOL = np.dtype(np.bool_)

#: the dtypes a kernel may compute in (float16 and complex have no exact scalar C type here)
DTYPES = tuple(np.dtype(d) for d in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                     np.uint16, np.uint32, np.uint64, np.float32, np.float64))

ARITH_OPS = {"add": "+", "sub": "-", "mul": "*", "div": "/"}
COMPARE_OPS = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
LOGIC_OPS = {"and": "&&", "or": "||"}
BINARY_OPS = {**ARITH_OPS, **COMPARE_OPS, **LOGIC_OPS}
UNARY_OPS = {"neg": "-", "not": "!"}

#: Call functions: name -> (arity, the operand kinds allowed).  Each returns its
#: operands' dtype (all operands share one dtype).
FLOAT_KINDS = "f"
NUMERIC_KINDS = "biuf"
FUNCS = {
    "exp": (1, FLOAT_KINDS), "log": (1, FLOAT_KINDS), "log1p": (1, FLOAT_KINDS),
    "expm1": (1, FLOAT_KINDS), "sqrt": (1, FLOAT_KINDS), "tanh": (1, FLOAT_KINDS),
    "pow": (2, FLOAT_KINDS),
    "abs": (1, NUMERIC_KINDS),
    "max": (2, NUMERIC_KINDS), "min": (2, NUMERIC_KINDS),
}


class KernelIRError(GraphError):
    """A kernel that breaks the IR's invariants (see `verify`)."""


_DTYPE_STR: dict = {}


def dtype_str(dtype) -> str:
    """f32, i64, bool, ... (the graph's short names)."""
    try:
        return _DTYPE_STR[dtype]
    except (KeyError, TypeError):
        d = np.dtype(dtype)
        text = DTYPE_NAMES.get(d.name, d.name)
        try:
            _DTYPE_STR[dtype] = text
        except TypeError:
            pass
        return text


# -- buffers and expressions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Buffer:
    """A flat array of `size` elements of `dtype`; role "in" or "out" (a
    parameter), or "local" (the kernel's own array, read and written)."""
    name: str
    dtype: np.dtype
    size: int
    role: str

    def __post_init__(self):
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        object.__setattr__(self, "size", int(self.size))

    def __str__(self):
        return f"{self.name}: {dtype_str(self.dtype)}[{self.size}]"


class Expr:
    """Base of expressions; every expression has a `dtype`."""
    __slots__ = ()
    dtype: np.dtype

    def __post_init__(self):
        if "dtype" in getattr(self, "__dataclass_fields__", ()):
            object.__setattr__(self, "dtype", np.dtype(self.dtype))

    def __str__(self):
        return format_expr(self)


@dataclass(frozen=True, eq=True)
class Var(Expr):
    name: str
    dtype: np.dtype = INDEX


@dataclass(frozen=True, eq=False)
class Const(Expr):
    """A scalar of exact dtype (`value` is a NumPy scalar of that dtype)."""
    value: object
    dtype: np.dtype

    def __post_init__(self):
        dtype = np.dtype(self.dtype)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "value", np.asarray(self.value).astype(dtype).reshape(())[()])

    def bits(self) -> bytes:
        return self.value.tobytes()

    def __eq__(self, other):
        return isinstance(other, Const) and other.dtype == self.dtype and other.bits() == self.bits()

    def __hash__(self):
        return hash((self.dtype, self.bits()))


@dataclass(frozen=True)
class Index(Expr):
    """sum(var * stride for var, stride in terms) + offset: an element index."""
    terms: tuple = ()     # ((loop var name, stride), ...)
    offset: int = 0

    def __post_init__(self):
        object.__setattr__(self, "terms", tuple((str(v), int(s)) for v, s in self.terms))
        object.__setattr__(self, "offset", int(self.offset))

    dtype = INDEX


@dataclass(frozen=True)
class Load(Expr):
    buffer: Buffer
    index: Index

    @property
    def dtype(self):
        return self.buffer.dtype


@dataclass(frozen=True)
class Unary(Expr):
    op: str          # "neg" | "not"
    a: Expr
    dtype: np.dtype


@dataclass(frozen=True)
class Binary(Expr):
    op: str          # a key of BINARY_OPS
    a: Expr
    b: Expr
    dtype: np.dtype


@dataclass(frozen=True)
class Call(Expr):
    fn: str          # a key of FUNCS
    args: tuple
    dtype: np.dtype


@dataclass(frozen=True)
class Select(Expr):
    """cond ? a : b"""
    cond: Expr
    a: Expr
    b: Expr
    dtype: np.dtype


@dataclass(frozen=True)
class Cast(Expr):
    a: Expr
    dtype: np.dtype


# -- statements and kernels -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Let:
    var: Var
    value: Expr


@dataclass(frozen=True)
class Store:
    buffer: Buffer
    index: Index
    value: Expr


#: Update ops: name -> the C compound assignment
UPDATE_OPS = {"add": "+=", "max": "max=", "min": "min="}


@dataclass(frozen=True)
class Update:
    """buffer[index] = buffer[index] <op> value (an output buffer read back)."""
    buffer: Buffer
    index: Index
    op: str
    value: Expr


@dataclass(frozen=True)
class Loop:
    var: Var
    extent: int
    body: tuple
    lanes: bool = False   # independent lanes of per-lane accumulators: vectorized across

    def __post_init__(self):
        object.__setattr__(self, "body", tuple(self.body))
        object.__setattr__(self, "extent", int(self.extent))


@dataclass(frozen=True)
class Kernel:
    name: str
    params: tuple    # Buffers: inputs, then outputs
    body: tuple      # statements
    locals: tuple = ()   # Buffers of role "local"
    # a body written by hand for one target (conv_templates.Template) instead of
    # statements: its renderer emits it as it is, other renderers refuse the kernel
    template: object = None

    def __post_init__(self):
        object.__setattr__(self, "params", tuple(self.params))
        object.__setattr__(self, "body", tuple(self.body))
        object.__setattr__(self, "locals", tuple(self.locals))

    @property
    def inputs(self):
        return tuple(b for b in self.params if b.role == "in")

    @property
    def outputs(self):
        return tuple(b for b in self.params if b.role == "out")

    def loops(self):
        """The loop nest from the outside in, when the body is a perfect nest
        (one loop holding one loop ... holding straight-line code); else None."""
        nest, stmts = [], self.body
        while len(stmts) == 1 and isinstance(stmts[0], Loop):
            nest.append(stmts[0])
            stmts = stmts[0].body
        if any(isinstance(s, Loop) for s in stmts):
            return None
        return nest

    def innermost(self):
        """The statements inside the loop nest (see `loops`)."""
        stmts = self.body
        while len(stmts) == 1 and isinstance(stmts[0], Loop):
            stmts = stmts[0].body
        return stmts

    @functools.cached_property
    def text(self) -> str:
        """The text form (computed once: a Kernel is immutable)."""
        return format_kernel(self)

    def __str__(self):
        return self.text


def elementwise_extent(kernel: Kernel):
    """N when the kernel is one loop ``for i in [0, N)`` of straight-line code
    that loads every buffer at [i] or at [0] (a scalar) and stores each output
    at [i] only (no local buffer, no update): then each range of i computes
    its elements alone, and the loop can run in pieces on several threads.
    None for any other kernel."""
    if kernel.template is not None or kernel.locals or len(kernel.body) != 1:
        return None
    loop = kernel.body[0]
    if not isinstance(loop, Loop) or loop.lanes:
        return None
    at_i = ((loop.var.name, 1),)
    for s in loop.body:
        if isinstance(s, Store):
            if s.index.terms != at_i or s.index.offset or s.buffer.size != loop.extent:
                return None
            value = s.value
        elif isinstance(s, Let):
            value = s.value
        else:
            return None
        if not _loads_elementwise(value, at_i):
            return None
    return loop.extent


def _loads_elementwise(e, at_i) -> bool:
    if isinstance(e, Load):
        return not e.index.offset and e.index.terms in (at_i, ())
    if isinstance(e, (Var, Const)):
        return True
    if isinstance(e, (Unary, Cast)):
        return _loads_elementwise(e.a, at_i)
    if isinstance(e, Binary):
        return _loads_elementwise(e.a, at_i) and _loads_elementwise(e.b, at_i)
    if isinstance(e, Call):
        return all(_loads_elementwise(a, at_i) for a in e.args)
    if isinstance(e, Select):
        return all(_loads_elementwise(x, at_i) for x in (e.cond, e.a, e.b))
    return False


# -- construction helpers ---------------------------------------------------------------------------------

def binary(op, a, b):
    """A Binary with its dtype from the IR's rule (operands must share one dtype)."""
    return Binary(op, a, b, BOOL if op in COMPARE_OPS or op in LOGIC_OPS else a.dtype)


# -- text form ----------------------------------------------------------------------------------------------

def format_const(c: Const) -> str:
    v, d = c.value, c.dtype
    if d.kind == "b":
        return "true" if bool(v) else "false"
    if d.kind == "f":
        f = float(v)
        if math.isnan(f):
            text = "-nan" if np.signbit(v) else "nan"
            payload = int(v.view(np.uint32 if d.itemsize == 4 else np.uint64))
            quiet = 0x7FC00000 if d.itemsize == 4 else 0x7FF8000000000000
            if payload & ~(1 << (8 * d.itemsize - 1)) != quiet:
                text += f"(0x{payload:x})"
        elif math.isinf(f):
            text = "-inf" if f < 0 else "inf"
        else:
            text = repr(f)
        return f"{text}:{dtype_str(d)}"
    return f"{int(v)}:{dtype_str(d)}"


def format_index(ix: Index) -> str:
    parts = [v if s == 1 else f"{v}*{s}" for v, s in ix.terms if s != 0]
    if ix.offset or not parts:
        parts.append(str(ix.offset))
    return " + ".join(parts)


def format_expr(e) -> str:
    if isinstance(e, Var):
        return e.name
    if isinstance(e, Const):
        return format_const(e)
    if isinstance(e, Index):
        return format_index(e)
    if isinstance(e, Load):
        return f"{e.buffer.name}[{format_index(e.index)}]"
    if isinstance(e, Unary):
        return f"{UNARY_OPS.get(e.op, e.op)}{format_expr(e.a)}"
    if isinstance(e, Binary):
        return f"({format_expr(e.a)} {BINARY_OPS.get(e.op, e.op)} {format_expr(e.b)})"
    if isinstance(e, Call):
        return f"{e.fn}({', '.join(format_expr(a) for a in e.args)})"
    if isinstance(e, Select):
        return f"select({format_expr(e.cond)}, {format_expr(e.a)}, {format_expr(e.b)})"
    if isinstance(e, Cast):
        return f"{dtype_str(e.dtype)}({format_expr(e.a)})"
    return f"<{type(e).__name__}>"


def _format_stmts(stmts, indent, lines):
    for s in stmts:
        if isinstance(s, Loop):
            lanes = " lanes" if s.lanes else ""
            lines.append(f"{indent}for {s.var.name} in [0, {s.extent}){lanes} {{")
            _format_stmts(s.body, indent + "  ", lines)
            lines.append(f"{indent}}}")
        elif isinstance(s, Let):
            lines.append(f"{indent}let {s.var.name}: {dtype_str(s.var.dtype)} = {format_expr(s.value)}")
        elif isinstance(s, Store):
            lines.append(f"{indent}{s.buffer.name}[{format_index(s.index)}] = {format_expr(s.value)}")
        elif isinstance(s, Update):
            lines.append(f"{indent}{s.buffer.name}[{format_index(s.index)}] {UPDATE_OPS.get(s.op, s.op)} "
                         f"{format_expr(s.value)}")
        else:
            lines.append(f"{indent}<{type(s).__name__}>")


def format_kernel(k: Kernel) -> str:
    ins = ", ".join(str(b) for b in k.inputs)
    outs = ", ".join(str(b) for b in k.outputs)
    lines = [f"kernel {k.name}({ins}) -> ({outs}) {{"]
    lines += [f"  local {b}" for b in k.locals]
    if k.template is not None:
        lines.append(f"  {k.template.language} {k.template.label}")
    _format_stmts(k.body, "  ", lines)
    lines.append("}")
    return "\n".join(lines)


# -- verifier -------------------------------------------------------------------------------------------------

def verify(kernel: Kernel) -> Kernel:
    """Check the kernel's invariants; raise KernelIRError naming the first broken one.

    Buffer names are unique and their dtypes are kernel dtypes; every Var is
    defined (by an enclosing Loop or an earlier Let) before it is used, with the
    dtype of its definition, and defined only once; every node's dtype follows
    the IR's rules (Binary/Call operands share one dtype, comparisons give bool,
    Select's condition is bool, a Store's value has its buffer's dtype, Loads
    read inputs or locals and Stores write outputs or locals); every index
    stays within its buffer for all values of the loop variables."""
    _Verifier(kernel).run()
    return kernel


class _Verifier:
    def __init__(self, kernel):
        self.k = kernel
        self.where = ""

    def fail(self, msg):
        where = self.where() if callable(self.where) else self.where
        raise KernelIRError(f"kernel {self.k.name}: {where}{msg}")

    def run(self):
        names = set()
        for b in self.k.params:
            if not isinstance(b, Buffer):
                self.fail(f"parameter {b!r} is not a Buffer")
            if b.name in names:
                self.fail(f"two parameters are named {b.name!r}")
            names.add(b.name)
            if b.role not in ("in", "out"):
                self.fail(f"buffer {b.name} has role {b.role!r}; roles are 'in' and 'out'")
            self.dtype_ok(b.dtype, f"buffer {b.name}")
            if b.size < 0:
                self.fail(f"buffer {b.name} has a negative size {b.size}")
        for b in self.k.locals:
            if not isinstance(b, Buffer) or b.role != "local":
                self.fail(f"local {b!r} is not a Buffer of role 'local'")
            if b.name in names:
                self.fail(f"two buffers are named {b.name!r}")
            names.add(b.name)
            self.dtype_ok(b.dtype, f"local buffer {b.name}")
        if self.k.template is not None and (self.k.body or self.k.locals):
            self.fail("a template kernel has no statements or locals of its own")
        self.params = {b.name: b for b in self.k.params + self.k.locals}
        self.defined: set = set(names)
        self.stmts(self.k.body, {}, {})

    def dtype_ok(self, dtype, what):
        """what: the thing's name, or a function giving it (formatted only for the message)."""
        if np.dtype(dtype) not in DTYPES:
            self.fail(f"{what() if callable(what) else what} has dtype {np.dtype(dtype).name}, which kernels "
                      f"do not compute in")

    def stmts(self, stmts, scope, extents):
        scope = dict(scope)
        for s in stmts:
            if isinstance(s, Loop):
                self.where = f"loop {s.var.name}: "
                self.define(s.var, scope)
                if s.var.dtype != INDEX:
                    self.fail(f"loop variable has dtype {s.var.dtype.name}, not {INDEX.name}")
                if s.extent < 0:
                    self.fail(f"negative extent {s.extent}")
                self.stmts(s.body, scope, {**extents, s.var.name: s.extent})
            elif isinstance(s, Let):
                self.where = f"let {s.var.name}: "
                self.expr(s.value, scope, extents)
                self.dtype_ok(s.var.dtype, f"local {s.var.name}")
                if s.value.dtype != s.var.dtype:
                    self.fail(f"declared {dtype_str(s.var.dtype)} but its value is {dtype_str(s.value.dtype)}")
                self.define(s.var, scope)
            elif isinstance(s, (Store, Update)):
                kind = "store" if isinstance(s, Store) else "update"
                self.where = lambda s=s, kind=kind: f"{kind} {s.buffer.name}[{format_index(s.index)}]: "
                if isinstance(s, Update) and s.op not in UPDATE_OPS:
                    self.fail(f"unknown update op {s.op!r}; ops are {', '.join(UPDATE_OPS)}")
                self.buffer(s.buffer, ("out", "local"), "stored to")
                self.index(s.index, s.buffer, scope, extents)
                self.expr(s.value, scope, extents)
                if s.value.dtype != s.buffer.dtype:
                    self.fail(f"value is {dtype_str(s.value.dtype)} but the buffer holds "
                              f"{dtype_str(s.buffer.dtype)}")
            else:
                self.fail(f"{type(s).__name__} is not a statement")

    def define(self, var, scope):
        if var.name in self.defined:
            self.fail(f"{var.name} is defined twice")
        self.defined.add(var.name)
        scope[var.name] = var.dtype

    def buffer(self, b, roles, what):
        p = self.params.get(b.name)
        if p is None or p != b:
            self.fail(f"buffer {b.name} is not a parameter of the kernel")
        if b.role not in roles:
            self.fail(f"buffer {b.name} is {b.role!r} but is {what}")

    def index(self, ix, buf, scope, extents):
        if not isinstance(ix, Index):
            self.fail(f"index {ix!r} is not an affine Index")
        lo = hi = ix.offset
        for v, s in ix.terms:
            if v not in extents:
                what = "not a loop variable" if v in scope else "not defined"
                self.fail(f"index of {buf.name} uses {v}, which is {what} here")
        if 0 in extents.values():
            return  # an enclosing loop never runs: nothing is accessed
        for v, s in ix.terms:
            n = extents[v]
            lo += min(0, s * (n - 1))
            hi += max(0, s * (n - 1))
        if lo < 0 or hi >= buf.size:
            self.fail(f"index {format_index(ix)} of {buf.name} spans [{lo}, {hi}], outside the "
                      f"buffer's {buf.size} elements")

    def expr(self, e, scope, extents):
        fail = self.fail
        if not isinstance(e, Expr):
            fail(f"{e!r} is not an expression")
        if isinstance(e, Index):
            fail("an index expression used as a value")
        self.dtype_ok(e.dtype, lambda: format_expr(e))
        if isinstance(e, Var):
            if e.name not in scope:
                fail(f"{e.name} is used but not defined" + (" here (out of scope)" if e.name in self.defined
                                                             else ""))
            if scope[e.name] != e.dtype:
                fail(f"{e.name} is used as {dtype_str(e.dtype)} but defined as {dtype_str(scope[e.name])}")
        elif isinstance(e, Const):
            pass
        elif isinstance(e, Load):
            self.buffer(e.buffer, ("in", "local"), "loaded from")
            self.index(e.index, e.buffer, scope, extents)
        elif isinstance(e, Unary):
            self.expr(e.a, scope, extents)
            if e.op not in UNARY_OPS:
                fail(f"unknown unary op {e.op!r}")
            want = BOOL if e.op == "not" else e.a.dtype
            if e.op == "not" and e.a.dtype != BOOL or e.dtype != want:
                fail(f"{format_expr(e)}: {e.op} of {dtype_str(e.a.dtype)} cannot be {dtype_str(e.dtype)}")
            if e.op == "neg" and e.dtype == BOOL:
                fail(f"{format_expr(e)}: neg of a bool")
        elif isinstance(e, Binary):
            self.expr(e.a, scope, extents)
            self.expr(e.b, scope, extents)
            if e.op not in BINARY_OPS:
                fail(f"unknown binary op {e.op!r}")
            if e.a.dtype != e.b.dtype:
                fail(f"{format_expr(e)}: operands of {e.op} have dtypes {dtype_str(e.a.dtype)} and "
                     f"{dtype_str(e.b.dtype)}; cast one (Cast) first")
            if e.op in LOGIC_OPS and e.a.dtype != BOOL:
                fail(f"{format_expr(e)}: {e.op} of {dtype_str(e.a.dtype)} (needs bool)")
            if e.op == "div" and e.a.dtype.kind != "f":
                fail(f"{format_expr(e)}: div of {dtype_str(e.a.dtype)} (floats only)")
            want = binary(e.op, e.a, e.b).dtype
            if e.dtype != want:
                fail(f"{format_expr(e)}: {e.op} gives {dtype_str(want)}, not {dtype_str(e.dtype)}")
        elif isinstance(e, Call):
            for a in e.args:
                self.expr(a, scope, extents)
            if e.fn not in FUNCS:
                fail(f"unknown function {e.fn!r}")
            arity, kinds = FUNCS[e.fn]
            if len(e.args) != arity:
                fail(f"{format_expr(e)}: {e.fn} takes {arity} operands, got {len(e.args)}")
            if len({a.dtype for a in e.args}) != 1 or e.args[0].dtype != e.dtype:
                fail(f"{format_expr(e)}: operands ({', '.join(dtype_str(a.dtype) for a in e.args)}) and "
                     f"result ({dtype_str(e.dtype)}) of {e.fn} must share one dtype")
            if e.dtype.kind not in kinds:
                fail(f"{format_expr(e)}: {e.fn} of {dtype_str(e.dtype)}")
        elif isinstance(e, Select):
            for a in (e.cond, e.a, e.b):
                self.expr(a, scope, extents)
            if e.cond.dtype != BOOL:
                fail(f"{format_expr(e)}: condition is {dtype_str(e.cond.dtype)}, not bool")
            if not e.a.dtype == e.b.dtype == e.dtype:
                fail(f"{format_expr(e)}: branches ({dtype_str(e.a.dtype)}, {dtype_str(e.b.dtype)}) and "
                     f"result ({dtype_str(e.dtype)}) must share one dtype")
        elif isinstance(e, Cast):
            self.expr(e.a, scope, extents)
        else:
            fail(f"{type(e).__name__} is not an expression")
