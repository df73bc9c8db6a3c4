"""Lowering a fused elementwise group (a body Graph from avalon.passes.fusion)
to a `Kernel`.

Shapes are static, so the loop nest is fixed at compile time:

* the output is C-contiguous; each input is read through strides of its own,
  0 on the dimensions it is broadcast along;
* dimensions of extent 1 are dropped, and adjacent dimensions that are
  contiguous for every operand are merged, so the common case (no
  broadcasting, or a scalar) is ONE flat loop, which a C compiler vectorizes;
  a row vector plus a column vector gives two loops with a unit-stride inner one;
* an empty output gives one loop of extent 0;
* a body node whose primitive has a `strided_view` rule (a basic slice that
  avalon.passes.views moved into the body) reads a body input in place: its
  loads take the view's offset and strides, so the input is the whole array.

Each body node becomes a `Let` computed from its primitive's `expr` template
(declared once, in the primitive's registration block), or from the target's
own template for that primitive (a renderer's `EXPR` table keyed by primitive
name, where the generic one is not exact).  A template is a C expression over
``{0}``, ``{1}``, ... (the operands) and ``{T}`` (the node's type); it is
parsed and typed by NumPy's rules: operands of an arithmetic op, a comparison,
``max``/``min`` or the branches of ``?:`` are cast to their common dtype (the
shape rules' `result_dtype`), and a bare literal is weak (it takes the dtype of
what it meets, as a Python scalar does: ``1 + exp(-x)`` stays float32 for
float32 x).  Call operands are made atoms (a variable or a constant) by
`Let`s of their own, so a renderer may repeat them.

What cannot be written exactly raises `Unfusable` naming the reason: a
primitive without `expr`, float16 and complex dtypes, integer division and
pow, negating a bool, a constant a dtype cannot hold.  The backend then keeps
its NumPy path for that group.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import replace

import numpy as np

from ..errors import AvalonError
from ..ops._rules import result_dtype
from ..primitive import PRIMITIVES, weak_scalar
from .ir import (BOOL, DTYPES, FUNCS, Binary, Buffer, Call, Cast, Const, Expr, Index, Kernel, Let, Load, Loop,
                 Select, Store, Unary, Update, Var, binary, verify)


class Unfusable(AvalonError):
    """The group cannot be written as one exact kernel; str() says why."""


def kernel_dtype(dtype, what="a value"):
    d = np.dtype(dtype)
    if d not in DTYPES:
        raise Unfusable(f"{what} has dtype {d.name}, which has no exact scalar type in a kernel "
                        "(float16 and complex groups run op by op)")
    return d


# -- loop structure ------------------------------------------------------------------------------------------

def broadcast_strides(shape, out_shape):
    """Element strides that read an array of C-contiguous `shape` at each index
    of `out_shape`: 0 on broadcast dimensions (and the missing leading ones)."""
    nd = len(out_shape)
    if len(shape) > nd:
        raise Unfusable(f"an operand of shape {tuple(shape)} has more dimensions than the output "
                        f"{tuple(out_shape)}")
    full = (1,) * (nd - len(shape)) + tuple(shape)
    strides, step = [0] * nd, 1
    for j in range(nd - 1, -1, -1):
        if full[j] != out_shape[j]:
            if full[j] != 1:
                raise Unfusable(f"an operand of shape {tuple(shape)} does not broadcast to the output "
                                f"{tuple(out_shape)}")
        else:
            strides[j] = step if full[j] != 1 else 0
        step *= full[j]
    return strides


def collapse(out_shape, operand_strides):
    """The loop nest: [(extent, [stride of each operand])], outermost first.

    Extent-1 dimensions are dropped; dimension j merges into j+1 when every
    operand has stride[j] == stride[j+1] * extent[j+1].  An empty output gives
    [(0, zeros)]."""
    n_ops = len(operand_strides)
    if any(e == 0 for e in out_shape):
        return [(0, [0] * n_ops)]
    dims = [(e, [st[j] for st in operand_strides]) for j, e in enumerate(out_shape) if e != 1]
    merged: list = []
    for extent, strides in dims:
        if merged:
            pe, ps = merged[-1]
            if all(p == s * extent for p, s in zip(ps, strides)):
                merged[-1] = (pe * extent, strides)
                continue
        merged.append((extent, strides))
    return merged


# -- templates: parsing ------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"""\s*(?:
    (?P<num>(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?)(?P<suffix>[fFlLuU]*)
  | (?P<ph>\{\w+\})
  | (?P<id>[A-Za-z_]\w*)
  | (?P<op>\|\||&&|==|!=|<=|>=|[-+*/<>!?:(),])
)""", re.X)

#: type names a template may cast to, besides {T}
C_TYPE_NAMES = {"bool": np.bool_, "int": np.int32, "float": np.float32, "double": np.float64,
                "int8_t": np.int8, "int16_t": np.int16, "int32_t": np.int32, "int64_t": np.int64,
                "uint8_t": np.uint8, "uint16_t": np.uint16, "uint32_t": np.uint32, "uint64_t": np.uint64}

#: function names a template may call -> IR function (semantics of NumPy's ufunc of that name)
TEMPLATE_FUNCS = {"exp": "exp", "log": "log", "log1p": "log1p", "expm1": "expm1", "sqrt": "sqrt",
                  "tanh": "tanh", "pow": "pow", "abs": "abs", "fabs": "abs", "max": "max", "min": "min"}

_BIN = {"+": "add", "-": "sub", "*": "mul", "/": "div", "<": "lt", "<=": "le", ">": "gt", ">=": "ge",
        "==": "eq", "!=": "ne", "&&": "and", "||": "or"}
_LEVELS = [("||",), ("&&",), ("==", "!="), ("<", "<=", ">", ">="), ("+", "-"), ("*", "/")]


def _tokens(template):
    pos, out = 0, []
    template = template.rstrip()
    while pos < len(template):
        m = _TOKEN.match(template, pos)
        if m is None or m.end() == pos:
            raise Unfusable(f"template {template!r}: cannot read {template[pos:]!r}")
        pos = m.end()
        if m.group("num") is not None:
            text, suffix = m.group("num"), m.group("suffix").lower()
            is_float = any(c in text for c in ".eE") or "f" in suffix
            out.append(("num", float(text) if is_float else int(text)))
        elif m.group("ph") is not None:
            out.append(("ph", m.group("ph")[1:-1]))
        elif m.group("id") is not None:
            out.append(("id", m.group("id")))
        else:
            out.append(("op", m.group("op")))
    out.append(("end", None))
    return out


class _Parser:
    """C expressions of templates -> a small AST of tuples:
    ("arg", k), ("lit", value), ("call", name, args), ("un", op, a),
    ("bin", op, a, b), ("sel", c, a, b), ("cast", type, a)  (type "T" or a C name)."""

    def __init__(self, template):
        self.template = template
        self.toks = _tokens(template)
        self.pos = 0

    def peek(self, k=0):
        return self.toks[min(self.pos + k, len(self.toks) - 1)]

    def take(self, op=None):
        tok = self.toks[self.pos]
        if op is not None and tok != ("op", op):
            raise Unfusable(f"template {self.template!r}: expected {op!r}, found {tok[1]!r}")
        self.pos += 1
        return tok

    def parse(self):
        tree = self.ternary()
        if self.peek()[0] != "end":
            raise Unfusable(f"template {self.template!r}: unexpected {self.peek()[1]!r}")
        return tree

    def ternary(self):
        cond = self.binary(0)
        if self.peek() == ("op", "?"):
            self.take()
            a = self.ternary()
            self.take(":")
            b = self.ternary()
            return ("sel", cond, a, b)
        return cond

    def binary(self, level):
        if level == len(_LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek()[0] == "op" and self.peek()[1] in _LEVELS[level]:
            op = self.take()[1]
            left = ("bin", _BIN[op], left, self.binary(level + 1))
        return left

    def unary(self):
        tok = self.peek()
        if tok in (("op", "-"), ("op", "+"), ("op", "!")):
            self.take()
            return ("un", tok[1], self.unary())
        if tok == ("op", "(") and self.peek(2) == ("op", ")") and (
                self.peek(1) == ("ph", "T") or (self.peek(1)[0] == "id" and self.peek(1)[1] in C_TYPE_NAMES)):
            self.take()
            name = self.take()[1]
            self.take(")")
            return ("cast", name, self.unary())
        return self.primary()

    def primary(self):
        kind, v = self.take()
        if kind == "num":
            return ("lit", v)
        if kind == "ph":
            if not v.isdigit():
                raise Unfusable(f"template {self.template!r}: {{{v}}} is not an operand")
            return ("arg", int(v))
        if kind == "id":
            if v in ("true", "false"):
                return ("lit", v == "true")
            if v not in TEMPLATE_FUNCS:
                raise Unfusable(f"template {self.template!r}: unknown function {v!r}")
            self.take("(")
            args = [self.ternary()]
            while self.peek() == ("op", ","):
                self.take()
                args.append(self.ternary())
            self.take(")")
            return ("call", TEMPLATE_FUNCS[v], args)
        if (kind, v) == ("op", "("):
            e = self.ternary()
            self.take(")")
            return e
        raise Unfusable(f"template {self.template!r}: unexpected {v!r}")


_PARSED: dict = {}


def parse_template(template: str):
    tree = _PARSED.get(template)
    if tree is None:
        tree = _PARSED[template] = _Parser(template).parse()
    return tree


# -- templates: typing -----------------------------------------------------------------------------------------------

class _Weak:
    """A literal of the template whose dtype comes from what it meets."""
    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value


def const_of(value, dtype, what="a literal"):
    """Const(value) of `dtype`, or Unfusable when the dtype cannot hold it."""
    dtype = np.dtype(dtype)
    try:
        with np.errstate(all="raise"):
            arr = np.asarray(value, dtype=dtype)
    except (OverflowError, ValueError, FloatingPointError, TypeError):
        raise Unfusable(f"{what} {value!r} does not fit {dtype.name}") from None
    if dtype.kind in "iub" and arr != value:
        raise Unfusable(f"{what} {value!r} is not exact in {dtype.name}")
    return Const(arr, dtype)


class _Typer:
    def __init__(self, node_op, node_dtype, args):
        self.op = node_op
        self.T = node_dtype
        self.args = args

    def fail(self, msg):
        raise Unfusable(f"{self.op}: {msg}")

    def typed(self, t):
        kind = t[0]
        if kind == "arg":
            if t[1] >= len(self.args):
                self.fail(f"the template reads operand {{{t[1]}}} of {len(self.args)}")
            return self.args[t[1]]
        if kind == "lit":
            return _Weak(t[1])
        if kind == "cast":
            dtype = self.T if t[1] == "T" else np.dtype(C_TYPE_NAMES[t[1]])
            x = self.typed(t[2])
            if isinstance(x, _Weak):
                return const_of(x.value, dtype)
            return x if x.dtype == dtype else Cast(x, dtype)
        if kind == "un":
            x = self.typed(t[2])
            if t[1] == "+":
                return x
            if t[1] == "!":
                return _Weak(not x.value) if isinstance(x, _Weak) else Unary("not", self.to_bool(x), BOOL)
            if isinstance(x, _Weak):
                return _Weak(-x.value)
            if x.dtype == BOOL:
                self.fail("negates a bool (NumPy refuses: use logical not)")
            return Unary("neg", x, x.dtype)
        if kind == "bin":
            return self.binary(t[1], self.typed(t[2]), self.typed(t[3]))
        if kind == "sel":
            cond = self.typed(t[1])
            if isinstance(cond, _Weak):
                return self.typed(t[2] if cond.value else t[3])
            a, b = self.unify("where", [self.typed(t[2]), self.typed(t[3])])
            return Select(self.to_bool(cond), a, b, a.dtype)
        if kind == "call":
            return self.call(t[1], [self.typed(a) for a in t[2]])
        self.fail(f"unknown template node {kind!r}")

    def unify(self, opname, xs):
        """Operands in one dtype: weak literals take the dtype of the others,
        typed ones are cast to their common dtype (the shape rules' result_dtype)."""
        typed = [x for x in xs if not isinstance(x, _Weak)]
        if not typed:
            typed = [const_of(xs[0].value, self.T)]
            xs = [typed[0]] + list(xs[1:])
        ref = typed[0].dtype
        xs = [const_of(x.value, _weak_dtype(x.value, ref)) if isinstance(x, _Weak) else x for x in xs]
        try:
            common = result_dtype(opname, *(x.dtype for x in xs))
        except AvalonError as e:
            self.fail(str(e))
        common = kernel_dtype(common)
        return [x if x.dtype == common else
                (const_of(x.value, common) if isinstance(x, Const) else Cast(x, common)) for x in xs]

    def to_bool(self, x):
        if isinstance(x, _Weak):
            return Const(bool(x.value), BOOL)
        return x if x.dtype == BOOL else Binary("ne", x, Const(0, x.dtype), BOOL)

    def binary(self, op, a, b):
        if isinstance(a, _Weak) and isinstance(b, _Weak):
            return _Weak(_fold(op, a.value, b.value))
        if op in ("and", "or"):
            return Binary(op, self.to_bool(a), self.to_bool(b), BOOL)
        a, b = self.unify(op, [a, b])
        if op == "div" and a.dtype.kind != "f":
            self.fail(f"divides {a.dtype.name} values (C truncates, NumPy's true division gives floats)")
        if op == "sub" and a.dtype == BOOL:
            self.fail("subtracts bools (NumPy refuses)")
        return binary(op, a, b)

    def call(self, fn, args):
        arity, kinds = FUNCS[fn]
        if len(args) != arity:
            self.fail(f"{fn} takes {arity} operands, the template gives {len(args)}")
        args = self.unify(fn, args)
        dtype = args[0].dtype
        if dtype.kind not in kinds:
            self.fail(f"{fn} of {dtype.name} has no exact C expression")
        return Call(fn, tuple(args), dtype)


def _weak_dtype(value, ref):
    """The dtype a Python scalar takes next to `ref` (primitive.weak_scalar's rule)."""
    try:
        return weak_scalar(value, ref).dtype
    except (OverflowError, ValueError):
        return ref   # const_of then says the value does not fit


def _fold(op, a, b):
    if op == "div":
        if isinstance(a, int) and isinstance(b, int):
            q = abs(a) // abs(b)
            return q if (a >= 0) == (b >= 0) else -q  # C truncates toward zero
        return a / b
    return {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "lt": lambda: a < b,
            "le": lambda: a <= b, "gt": lambda: a > b, "ge": lambda: a >= b, "eq": lambda: a == b,
            "ne": lambda: a != b, "and": lambda: bool(a) and bool(b), "or": lambda: bool(a) or bool(b)}[op]()


def node_expr(node, operands, exprs=None) -> Expr:
    """The scalar expression of one body node, of exactly the node's dtype."""
    prim = PRIMITIVES.get(node.op)
    if prim is None:
        raise Unfusable(f"op {node.op!r} is not a primitive")
    template = (exprs or {}).get(node.op, prim.expr)
    if template is None:
        raise Unfusable(f"primitive {node.op!r} has no C expression (defprim(..., expr=...))")
    dtype = kernel_dtype(node.dtype, f"{node.op}'s result")
    typer = _Typer(node.op, dtype, operands)
    e = typer.typed(parse_template(template))
    if isinstance(e, _Weak):
        return const_of(e.value, dtype)
    return e if e.dtype == dtype else Cast(e, dtype)


def _atomize(e, lets, fresh, memo=None, root=True):
    """e with every call's operands atoms (Var or Const) and every call inside it
    computed by a Let of its own, via new Lets appended to `lets`; an expression
    met twice is computed once (`memo`: expression -> its Var).  A template that
    names exp(-abs(x)) three times (the stable sigmoid) costs one exp, and a call
    in a branch of a select is computed in any case, as vector code does (the
    calls are pure: -fno-math-errno, no traps)."""
    memo = {} if memo is None else memo
    if isinstance(e, (Var, Const, Load, Index)):
        return e
    if isinstance(e, Call):
        call = replace(e, args=tuple(_atom(a, lets, fresh, memo) for a in e.args))
        return call if root else _let(call, lets, fresh, memo)
    if isinstance(e, (Unary, Cast)):
        return replace(e, a=_atomize(e.a, lets, fresh, memo, False))
    if isinstance(e, Binary):
        return replace(e, a=_atomize(e.a, lets, fresh, memo, False), b=_atomize(e.b, lets, fresh, memo, False))
    if isinstance(e, Select):
        return replace(e, cond=_atomize(e.cond, lets, fresh, memo, False), a=_atomize(e.a, lets, fresh, memo, False),
                       b=_atomize(e.b, lets, fresh, memo, False))
    return e


def _atom(e, lets, fresh, memo):
    e = _atomize(e, lets, fresh, memo, False)
    return e if isinstance(e, (Var, Const)) else _let(e, lets, fresh, memo)


def _let(e, lets, fresh, memo):
    v = memo.get(e)
    if v is None:
        v = memo[e] = Var(fresh(), e.dtype)
        lets.append(Let(v, e))
    return v


# -- the body -> a kernel ----------------------------------------------------------------------------------------------

def _host_scalar(value):
    if not isinstance(value, (np.ndarray, np.generic, bool, int, float)):
        from ..backends import backend_of
        value = backend_of(value).to_host(value)
    a = np.asarray(value)
    if a.size != 1:
        raise Unfusable(f"a constant of {a.size} elements cannot be inlined")
    return a.reshape(())


def _views(body) -> dict:
    """Body nodes that read a body input through a strided view (their
    primitive's `strided_view` rule, put in by avalon.passes.views) ->
    (offset, strides): the kernel loads their elements from the input's buffer."""
    views = {}
    for n in body.nodes:
        prim = PRIMITIVES.get(n.op)
        rule = prim.rule("strided_view", None) if prim is not None else None
        if rule is None:
            continue
        found = rule(n) if n.inputs and n.inputs[0].op == "input" else None
        if found is None:
            raise Unfusable(f"{n.op} in a fused body reads no body input through a strided view")
        views[n] = found
    return views


def _view_strides(node, strides, out_shape):
    """Element strides reading a view of shape node.shape (its own `strides`
    into its input) at each index of `out_shape`: 0 where the view broadcasts."""
    lead = len(out_shape) - len(node.shape)
    broadcast_strides(node.shape, out_shape)   # raises when the view does not broadcast
    return [0 if j < lead or node.shape[j - lead] == 1 else strides[j - lead] for j in range(len(out_shape))]


def _output_reduction(body):
    """(the body's output node, its Reduction rule) when the output is a
    reduction, else None; Unfusable for a reduction anywhere else."""
    def rule(n):
        prim = PRIMITIVES.get(n.op)
        return prim.rule("reduction", None) if prim is not None else None
    for n in body.nodes:
        if rule(n) is not None and n not in body.outputs:
            raise Unfusable(f"{n.op} in a fused body feeds other ops; a reduction may only be the body's output")
    found = [(o, rule(o)) for o in body.outputs if rule(o) is not None]
    if not found:
        return None
    if len(body.outputs) > 1:
        raise Unfusable("a body with several outputs ends in a reduction")
    return found[0]


def lower(body, *, name=None, exprs=None) -> Kernel:
    """The Kernel of a fused body Graph: `in0..in{n-1}` are the body's inputs
    (flat, C-contiguous), `out` its output (C-contiguous; `out0, out1, ...`
    for a body with several outputs of one shape).  `exprs` is the
    target's table of template overrides (a renderer's EXPR); `name` defaults
    to a hash of the kernel's text, so equal kernels get equal names.

    A body whose output is a reduction (its primitive's `reduction` rule)
    loops over the reduction's input shape, the "domain" (see `_Reducer`)."""
    if exprs is None:
        from .render_cstyle import CStyleRenderer
        exprs = CStyleRenderer.EXPR
    if not body.outputs:
        raise Unfusable("a fused body has no output")
    out_shape = tuple(body.outputs[0].shape)
    if any(o.op in ("input", "const") for o in body.outputs):
        raise Unfusable("a body's output is not computed by an op of the body")
    if any(tuple(o.shape) != out_shape for o in body.outputs):
        raise Unfusable(f"a body's outputs differ in shape: {[tuple(o.shape) for o in body.outputs]}")
    reduction = _output_reduction(body)
    domain = tuple(reduction[0].inputs[0].shape) if reduction else out_shape
    # one output is `out`; several (an in-place update of several arrays) out0, out1, ...
    names = ["out"] if len(body.outputs) == 1 else [f"out{j}" for j in range(len(body.outputs))]
    out_bufs = [Buffer(name, kernel_dtype(o.dtype, "an output"), int(math.prod(out_shape)), "out")
                for name, o in zip(names, body.outputs)]
    in_bufs = [Buffer(f"in{k}", kernel_dtype(n.dtype, f"input {k}"), n.size, "in")
               for k, n in enumerate(body.inputs)]
    views = _views(body)
    skip = {reduction[0]} if reduction else set()
    direct = [n for n in body.inputs if any(n in m.inputs for m in body.nodes if m not in views)]
    for n in body.nodes:
        if n.op != "const" and n not in skip and (n.op != "input" or n in direct):
            broadcast_strides(n.shape, domain)   # every value broadcasts to the domain
    if reduction:
        out_strides = _reduced_strides(domain, reduction[0].attrs["axes"])
    else:
        out_strides = broadcast_strides(out_shape, out_shape)
    operands = ([out_strides] + [broadcast_strides(n.shape, domain) for n in direct]
                + [_view_strides(n, strides, domain) for n, (_, strides) in views.items()])
    values = _Values(body, direct, views, dict(zip(body.inputs, in_bufs)), exprs, skip)
    if reduction:
        stmts, local_bufs = _Reducer(reduction, domain, operands, values, out_bufs[0]).statements()
    else:
        stmts, local_bufs = _elementwise(domain, operands, values, out_bufs, body.outputs), ()
    params = in_bufs + out_bufs
    kernel = Kernel(name or "kernel", params, stmts, local_bufs)
    if name is None:
        text = kernel.text
        name = f"avl_fused_{hashlib.sha1(text.encode()).hexdigest()[:16]}"
        kernel = Kernel(name, params, stmts, local_bufs)
        kernel.__dict__["text"] = f"kernel {name}" + text[len("kernel kernel"):]
    return verify(kernel)


def _index(nest, terms_of, operand, offset=0):
    """The element index of `operand` where nest dimension d is sum(var * mult)
    + const over terms_of[d] = ([(var name, mult)], const)."""
    terms, const = [], offset
    for d, (_, strides) in enumerate(nest):
        st = strides[operand]
        if st == 0:
            continue
        dim_terms, dim_const = terms_of[d]
        terms += [(v, st * m) for v, m in dim_terms]
        const += st * dim_const
    return Index(tuple(terms), const)


class _Values:
    """The body's elementwise values at one point of the domain, as Lets; each
    call names its locals with a suffix of its own (a reduction kernel computes
    the body in several loops)."""

    def __init__(self, body, direct, views, buf_of, exprs, skip):
        self.body, self.direct, self.views, self.buf_of = body, direct, views, buf_of
        self.exprs, self.skip = exprs, skip

    def at(self, index, suffix=""):
        """(statements, {node: value}) where index(operand, offset) is each operand's Index."""
        stmts: list = []
        values: dict = {}
        body = self.body
        for k, n in enumerate(self.direct):
            buf = self.buf_of[n]
            v = Var(f"x{body.inputs.index(n)}{suffix}", buf.dtype)
            stmts.append(Let(v, Load(buf, index(k + 1))))
            values[n] = v
        for k, (n, (offset, _)) in enumerate(self.views.items()):
            buf = self.buf_of[n.inputs[0]]
            v = Var(f"w{k}{suffix}", buf.dtype)
            stmts.append(Let(v, Load(buf, index(1 + len(self.direct) + k, offset))))
            values[n] = v
        for idx, n in enumerate(body.nodes):
            if n.op == "input" or n in self.views or n in self.skip:
                continue
            if n.op == "const":
                values[n] = const_of(_host_scalar(n.value)[()], kernel_dtype(n.dtype, "a constant"), "constant")
                continue
            count = iter(range(1 << 30))
            e = node_expr(n, [values[i] for i in n.inputs], self.exprs)
            e = _atomize(e, stmts, lambda: f"t{idx}{suffix}_{next(count)}")
            v = Var(f"t{idx}{suffix}", n.dtype)
            stmts.append(Let(v, e))
            values[n] = v
        return stmts, values


def _elementwise(domain, operands, values, out_bufs, outputs):
    nest = collapse(domain, operands)
    terms_of = {d: ([(f"i{d}", 1)], 0) for d in range(len(nest))}
    stmts, vals = values.at(lambda operand, offset=0: _index(nest, terms_of, operand, offset))
    # every store after every load: an output may be an input's own array (in place)
    stmts += [Store(buf, _index(nest, terms_of, 0), vals[o]) for buf, o in zip(out_bufs, outputs)]
    for d in reversed(range(len(nest))):
        stmts = [Loop(Var(f"i{d}"), nest[d][0], stmts)]
    return stmts


def _reduced_strides(domain, axes):
    """The output's element strides at each index of the domain: 0 along the reduced axes."""
    strides, step = [0] * len(domain), 1
    for d in range(len(domain) - 1, -1, -1):
        if d not in axes:
            strides[d] = step
            step *= domain[d]
    return strides


#: iterations of the lanes per block of a row reduction: a float row is summed
#: block by block (see _Reducer)
BLOCK_ITERS = 128
#: the bytes of the lanes of a row reduction: one 64-byte vector (AVX-512), two of AVX2
LANE_BYTES = 64
#: float column reductions fold at most this many reduced values in sequence into a
#: partial row of at most COLUMN_CHUNK elements before adding it to the output (see _Reducer)
COLUMN_BLOCK = 128
COLUMN_CHUNK = 512


class _Reducer:
    """The loop nest of a body ending in a reduction, over the domain (the
    reduction's input shape) collapsed as an elementwise nest is; a dimension
    is reduced where the output's stride is 0.  The kept dimensions go
    outermost (each output element is finished before the next).

    Row reductions (the innermost, contiguous dimension reduced: softmax's sums
    and maxima, a loss's total): the row is folded into L per-lane accumulators
    (`acc`, L = 64 bytes of the result dtype), a `lanes` loop the C compiler
    turns into vector registers without -ffast-math (the order of the adds is
    fixed, lane by lane); the lanes are combined by a tree at the end of each
    block of L * BLOCK_ITERS elements into the row's total (`tot`), a scalar
    tail takes the last K mod L elements.  Float error of a sum of n terms:
    each lane adds at most BLOCK_ITERS terms in sequence, the tree adds
    log2(L), the blocks add n / (L * BLOCK_ITERS) in sequence, so
    |error| <= (BLOCK_ITERS + log2(L) + n / (L * BLOCK_ITERS)) * eps * sum|x_i|
    (to first order): 132 + n/2048 rounding errors for float32 (16 lanes),
    131 + n/1024 for float64 (8 lanes), against NumPy's pairwise ~(16 + log2(n));
    a row of a million floats stays within ~620 eps * sum|x|.

    Column reductions (the innermost dimension kept: the bias gradient of a
    Linear, sum over axis 0 of (N, F)): the output row is set to the identity,
    then each reduced row is folded into it element by element, a loop that
    vectorizes as elementwise code does.  Long float columns (R reduced values,
    R > COLUMN_BLOCK) go block by block: the outermost reduced dimension in
    blocks of at most COLUMN_BLOCK values folded into a partial row (`part`,
    chunks of the output row) that is then added to the output, so
    |error| <= (COLUMN_BLOCK + R / COLUMN_BLOCK) * eps * sum|x_i| (when the
    inner reduced dimensions hold fewer than COLUMN_BLOCK values; else R).

    Max and min are exact whatever the order; NaN propagates (IR max/min), and
    an empty max or min is Unfusable (NumPy raises; the NumPy path does)."""

    def __init__(self, reduction, domain, operands, values, out_buf):
        self.node, self.rule = reduction
        self.domain, self.operands, self.values, self.out = domain, operands, values, out_buf
        self.dtype = out_buf.dtype
        self.identity = const_of(self.rule.identity(self.dtype), self.dtype, f"the identity of {self.node.op}")
        self.locals: list = []

    def statements(self):
        if any(e == 0 for e in self.domain):
            return self.empty(), ()
        self.nest = nest = collapse(self.domain, self.operands)
        reduced = [d for d, (_, st) in enumerate(nest) if st[0] == 0]
        if not reduced:   # every output element is one input element (reduced extents of 1)
            at = {d: ([(f"i{d}", 1)], 0) for d in range(len(nest))}
            vs, v = self.value(at, "")
            return self.nested(list(range(len(nest))), vs + [Store(self.out, _index(nest, at, 0), v)]), ()
        kept = [d for d in range(len(nest)) if d not in reduced]
        if reduced[-1] == len(nest) - 1:
            stmts = self.rows(kept, reduced)
        else:
            stmts = self.columns(kept[:-1], reduced, kept[-1])
        return stmts, tuple(self.locals)

    # -- pieces ----------------------------------------------------------------------------------------------
    def empty(self):
        """An empty domain: an output of the identity (a sum of nothing is 0)."""
        if self.out.size == 0:
            return []
        if not self.rule.empty_ok:
            raise Unfusable(f"{self.node.op} over an empty axis has no value (NumPy raises)")
        return [Loop(Var("i0"), self.out.size, [Store(self.out, Index((("i0", 1),)), self.identity)])]

    def combine(self, a, b):
        op = self.rule.combine
        return binary(op, a, b) if op in ("add",) else Call(op, (a, b), self.dtype)

    def value(self, terms_of, suffix):
        """(statements, the reduced value cast to the result dtype) at terms_of's point."""
        stmts, vals = self.values.at(lambda operand, offset=0: _index(self.nest, terms_of, operand, offset), suffix)
        v = vals[self.node.inputs[0]]
        if v.dtype != self.dtype:
            cast = Var(f"v{suffix}", self.dtype)
            stmts.append(Let(cast, Cast(v, self.dtype)))
            v = cast
        return stmts, v

    def nested(self, dims, stmts, suffix=""):
        for d in reversed(dims):
            stmts = [Loop(Var(f"i{d}{suffix}"), self.nest[d][0], stmts)]
        return stmts

    def local(self, name, size):
        buf = Buffer(name, self.dtype, size, "local")
        self.locals.append(buf)
        return buf

    # -- rows ------------------------------------------------------------------------------------------------
    def rows(self, kept, reduced):
        *outer, last = reduced
        n = self.nest[last][0]
        base = {d: ([(f"i{d}", 1)], 0) for d in kept + outer}
        at0 = Index((), 0)
        if self.dtype.kind != "f":
            return self.exact_rows(kept, reduced, base)
        lanes = max(1, LANE_BYTES // self.dtype.itemsize)
        block = lanes * BLOCK_ITERS
        n_blocks, rest = divmod(n, block)
        n_iters, n_tail = divmod(rest, lanes)
        acc, tot = self.local("acc", lanes), self.local("tot", 1)
        body = []
        if n_blocks:
            lv = f"i{last}b"
            body.append(Loop(Var(lv), n_blocks, self.lane_pass(acc, tot, base, last, [(lv, block)], 0,
                                                              BLOCK_ITERS, lanes, 0, "_b")))
        if rest:
            body += self.lane_pass(acc, tot, base, last, [], n_blocks * block, n_iters, lanes, n_tail, "_r")
        stmts = [Store(tot, at0, self.identity)] + self.nested(outer, body)
        stmts.append(Store(self.out, _index(self.nest, base, 0), Load(tot, at0)))
        return self.nested(kept, stmts)

    def exact_rows(self, kept, reduced, base):
        """Integer and bool rows: the fold is exact in any order, so one
        accumulator (gcc vectorizes integer reductions itself; gcc 12 also
        miscompiled int64 lanes fed by int32 loads under AVX-512)."""
        tot, at0 = self.local("tot", 1), Index((), 0)
        at = {**base, reduced[-1]: ([(f"i{reduced[-1]}", 1)], 0)}
        vs, v = self.value(at, "")
        fold = self.nested(reduced, vs + [Update(tot, at0, self.rule.combine, v)])
        stmts = [Store(tot, at0, self.identity)] + fold + [Store(self.out, _index(self.nest, base, 0), Load(tot, at0))]
        return self.nested(kept, stmts)

    def lane_pass(self, acc, tot, base, last, terms, const, iters, lanes, tail, suffix):
        """Fold `iters` * `lanes` elements (then `tail` more into lane 0) of the row,
        starting at `terms` + `const` along dimension `last`, into the lanes, and
        the lanes' tree into tot."""
        lane = f"i{last}l{suffix}"
        stmts = [Loop(Var(f"{lane}0"), lanes, [Store(acc, Index(((f"{lane}0", 1),)), self.identity)], lanes=True)]
        if iters:
            it = f"i{last}j{suffix}"
            at = {**base, last: (terms + [(it, lanes), (lane, 1)], const)}
            vs, v = self.value(at, suffix)
            stmts.append(Loop(Var(it), iters, [Loop(Var(lane), lanes,
                                                    vs + [Update(acc, Index(((lane, 1),)), self.rule.combine, v)],
                                                    lanes=True)]))
        if tail:
            t = f"i{last}t{suffix}"
            at = {**base, last: (terms + [(t, 1)], const + iters * lanes)}
            vs, v = self.value(at, f"{suffix}t")
            stmts.append(Loop(Var(t), tail, vs + [Update(acc, Index((), 0), self.rule.combine, v)]))
        level = [Load(acc, Index((), k)) for k in range(lanes)]
        depth = 0
        while len(level) > 1:
            half = len(level) // 2
            nxt = []
            for k in range(half):
                v = Var(f"c{suffix}_{depth}_{k}", self.dtype)
                stmts.append(Let(v, self.combine(level[k], level[k + half])))
                nxt.append(v)
            level = nxt + level[2 * half:]
            depth += 1
        stmts.append(Update(tot, Index((), 0), self.rule.combine, level[0]))
        return stmts

    # -- columns ---------------------------------------------------------------------------------------------
    def columns(self, kept, reduced, inner):
        rest = int(math.prod([self.nest[d][0] for d in reduced[1:]]))
        if self.dtype.kind == "f" and rest < COLUMN_BLOCK < rest * self.nest[reduced[0]][0]:
            return self.nested(kept, self.blocked_columns(kept, reduced, inner, rest))
        init_at = {d: ([(f"i{d}", 1)], 0) for d in kept}
        init_at[inner] = ([(f"i{inner}z", 1)], 0)
        init = Loop(Var(f"i{inner}z"), self.nest[inner][0],
                    [Store(self.out, _index(self.nest, init_at, 0), self.identity)])
        at = {d: ([(f"i{d}", 1)], 0) for d in range(len(self.nest))}
        vs, v = self.value(at, "")
        fold = self.nested([inner], vs + [Update(self.out, _index(self.nest, at, 0), self.rule.combine, v)])
        return self.nested(kept, [init] + self.nested(reduced, fold))

    def blocked_columns(self, kept, reduced, inner, rest):
        """Long float columns: the outermost reduced dimension in blocks of at most
        COLUMN_BLOCK reduced values, each folded into a partial row (`part`, chunks
        of COLUMN_CHUNK elements of the output row) then added to the output."""
        first = reduced[0]
        rows_per_block = COLUMN_BLOCK // rest
        n_blocks, tail_rows = divmod(self.nest[first][0], rows_per_block)
        width = self.nest[inner][0]
        chunk = min(width, COLUMN_CHUNK)
        n_chunks, tail_width = divmod(width, chunk)
        part = self.local("part", chunk)
        base = {d: ([(f"i{d}", 1)], 0) for d in kept}
        stmts = []
        for terms, const, w, sfx in ([([(f"i{inner}c", chunk)], 0, chunk, "_c")] if n_chunks else []) + \
                ([([], n_chunks * chunk, tail_width, "_d")] if tail_width else []):
            body = self.chunk_pass(part, base, first, reduced[1:], inner, (terms, const, w), rows_per_block,
                                   n_blocks, tail_rows, sfx)
            stmts += [Loop(Var(f"i{inner}c"), n_chunks, body)] if terms else body
        return stmts

    def chunk_pass(self, part, base, first, others, inner, chunk, rows_per_block, n_blocks, tail_rows, sfx):
        terms, const, width = chunk
        w0 = f"i{inner}z{sfx}"
        out_at = {**base, inner: (terms + [(w0, 1)], const)}
        stmts = [Loop(Var(w0), width, [Store(self.out, _index(self.nest, out_at, 0), self.identity)])]
        for blk_terms, blk_const, rows, s2 in ([([(f"i{first}b{sfx}", rows_per_block)], 0, rows_per_block, "b")]
                                               if n_blocks else []) + \
                ([([], n_blocks * rows_per_block, tail_rows, "t")] if tail_rows else []):
            tag = sfx + s2
            p0, w, wc, r = f"ip{tag}", f"i{inner}{tag}", f"i{inner}o{tag}", f"i{first}{tag}"
            at = {**base, inner: (terms + [(w, 1)], const), first: (blk_terms + [(r, 1)], blk_const),
                  **{d: ([(f"i{d}{tag}", 1)], 0) for d in others}}
            vs, v = self.value(at, tag)
            fold = [Loop(Var(w), width, vs + [Update(part, Index(((w, 1),)), self.rule.combine, v)])]
            out_at = {**base, inner: (terms + [(wc, 1)], const)}
            block = ([Loop(Var(p0), width, [Store(part, Index(((p0, 1),)), self.identity)])]
                     + [Loop(Var(r), rows, self.nested(others, fold, tag))]
                     + [Loop(Var(wc), width, [Update(self.out, _index(self.nest, out_at, 0), self.rule.combine,
                                                     Load(part, Index(((wc, 1),))))])])
            stmts += [Loop(Var(f"i{first}b{sfx}"), n_blocks, block)] if blk_terms else block
        return stmts
