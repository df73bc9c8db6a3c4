"""What C and CUDA C++ spell alike: types, literals of exact dtype,
expressions, statements.  Subclasses (`CRenderer`, `CUDARenderer`) add the
prelude, the function signature and the loop structure.

Exactness rules (NumPy's results, bit for bit, for the arithmetic):

* every local has the C type of its IR dtype, and every operation's result is
  converted back to that type, so C's integer promotions never leak;
* integer add/sub/mul/neg are done in the unsigned type of their width and
  converted back: they wrap as NumPy's do (signed overflow is undefined in C);
* float literals are written so they read back as exactly the value of their
  dtype (non-finite ones from their bits);
* max/min propagate NaN, first operand first, and return the second operand
  on ties, as np.maximum/np.minimum do; abs of the most negative integer wraps.

Per-primitive template overrides live in `EXPR` (read by `lower`), the
spelling of the IR's functions per dtype in `FUNCS`: tables, not switches.
"""
from __future__ import annotations

import math

import numpy as np

from .ir import (ARITH_OPS, COMPARE_OPS, Binary, Call, Cast, Const, Index, Let, Load, Loop, Select,
                 Store, Unary, Update, Var)
from .ir import UPDATE_OPS


class CStyleRenderer:
    """The shared part of the C-like renderers."""

    language = "c-style"

    #: dtype -> the C type of a local of that dtype
    TYPES: dict = {
        np.dtype(np.bool_): "bool",
        np.dtype(np.int8): "int8_t", np.dtype(np.int16): "int16_t",
        np.dtype(np.int32): "int32_t", np.dtype(np.int64): "int64_t",
        np.dtype(np.uint8): "uint8_t", np.dtype(np.uint16): "uint16_t",
        np.dtype(np.uint32): "uint32_t", np.dtype(np.uint64): "uint64_t",
        np.dtype(np.float32): "float", np.dtype(np.float64): "double",
    }
    #: unsigned type of at least int's width that integer arithmetic of an itemsize wraps in
    WRAP = {1: "uint32_t", 2: "uint32_t", 4: "uint32_t", 8: "uint64_t"}
    INDEX_TYPE = "int64_t"

    #: primitive name -> template replacing the primitive's own `expr` for C-style
    #: targets, where the generic one is not exact: NumPy's sign keeps NaN, gives
    #: +0 for -0 and has a dtype of its operand, not C's int of a comparison difference
    EXPR: dict = {
        "sign": "({0} > 0 ? 1 : ({0} < 0 ? -1 : ({0} == 0 ? 0 : {0})))",
    }

    #: IR function -> {dtype name, or kind letter, or "*": template over {0}, {1}, {T} (C type), {U} (wrap type)}
    FUNCS: dict = {
        "exp": {"float32": "expf({0})", "float64": "exp({0})"},
        "log": {"float32": "logf({0})", "float64": "log({0})"},
        "log1p": {"float32": "log1pf({0})", "float64": "log1p({0})"},
        "expm1": {"float32": "expm1f({0})", "float64": "expm1({0})"},
        "sqrt": {"float32": "sqrtf({0})", "float64": "sqrt({0})"},
        "tanh": {"float32": "tanhf({0})", "float64": "tanh({0})"},
        "pow": {"float32": "powf({0}, {1})", "float64": "pow({0}, {1})"},
        "abs": {"float32": "fabsf({0})", "float64": "fabs({0})",
                "i": "(({0} < 0) ? ({T})(({U})0 - ({U}){0}) : {0})", "*": "{0}"},
        # NumPy: a NaN first operand wins, then a NaN second one; ties give the second
        "max": {"f": "((({0} > {1}) | ({0} != {0})) ? {0} : {1})", "*": "(({0} > {1}) ? {0} : {1})"},
        "min": {"f": "((({0} < {1}) | ({0} != {0})) ? {0} : {1})", "*": "(({0} < {1}) ? {0} : {1})"},
    }

    def local_type(self, dtype) -> str:
        """The C type of a local (a Let) of dtype; a target may widen bool."""
        return self.c_type(dtype)

    def c_type(self, dtype) -> str:
        return self.TYPES[np.dtype(dtype)]

    def wrap_type(self, dtype) -> str:
        return self.WRAP[np.dtype(dtype).itemsize]

    # -- literals ----------------------------------------------------------------------------------------------
    def literal(self, c: Const) -> str:
        """A C expression of type c_type(c.dtype) whose value is exactly c.value."""
        d, v = c.dtype, c.value
        ct = self.c_type(d)
        if d.kind == "b":
            return "true" if bool(v) else "false"
        if d.kind == "i":
            i = int(v)
            if d.itemsize == 8:
                if i == -2**63:  # no literal spells it: 9223372036854775808 overflows before negation
                    return f"(({ct})(-9223372036854775807LL - 1))"
                return f"(({ct}){i}LL)"
            return f"(({ct}){i})"
        if d.kind == "u":
            return f"(({ct}){int(v)}ULL)"
        f = float(v)
        if math.isfinite(f):
            # repr of the double equal to the value reads back exactly; for float32
            # the nearest float to it is the value itself
            return f"{f!r}f" if d.itemsize == 4 else f"{f!r}"
        bits = int(v.view(np.uint32 if d.itemsize == 4 else np.uint64))
        return self.float_from_bits(d, bits)

    def float_from_bits(self, dtype, bits: int) -> str:
        raise NotImplementedError

    # -- expressions ----------------------------------------------------------------------------------------------
    def index(self, ix: Index) -> str:
        parts = []
        for v, s in ix.terms:
            if s == 1:
                parts.append(v)
            elif s != 0:
                parts.append(f"{v} * {s}" + ("LL" if abs(s) >= 2**31 else ""))
        if ix.offset or not parts:
            parts.append(str(ix.offset))
        return " + ".join(parts)

    def load(self, e: Load) -> str:
        return f"{e.buffer.name}[{self.index(e.index)}]"

    def buffer_type(self, dtype) -> str:
        """The element type of a buffer parameter (the local's type by default)."""
        return self.c_type(dtype)

    def func(self, fn, dtype) -> str:
        table = self.FUNCS[fn]
        d = np.dtype(dtype)
        for key in (d.name, d.kind, "*"):
            if key in table:
                return table[key]
        raise KeyError(f"no spelling of {fn} for {d.name}")

    def expr(self, e) -> str:
        if isinstance(e, Var):
            return e.name
        if isinstance(e, Const):
            return self.literal(e)
        if isinstance(e, Load):
            return self.load(e)
        if isinstance(e, Cast):
            return f"(({self.c_type(e.dtype)}){self.expr(e.a)})"
        if isinstance(e, Unary):
            a = self.expr(e.a)
            if e.op == "not":
                return f"(!{a})"
            if e.dtype.kind in "iu":
                return f"(({self.c_type(e.dtype)})(({self.wrap_type(e.dtype)})0 - ({self.wrap_type(e.dtype)}){a}))"
            return f"(-{a})"
        if isinstance(e, Binary):
            a, b = self.expr(e.a), self.expr(e.b)
            if e.op in COMPARE_OPS:
                return f"({a} {COMPARE_OPS[e.op]} {b})"
            if e.op in ("and", "or"):  # bools are 0 or 1: the bitwise ops are exact and branch-free
                return f"({a} {'&' if e.op == 'and' else '|'} {b})"
            sym = ARITH_OPS[e.op]
            if e.dtype.kind == "f":
                return f"({a} {sym} {b})"
            u = self.wrap_type(e.dtype)
            return f"(({self.c_type(e.dtype)})(({u}){a} {sym} ({u}){b}))"
        if isinstance(e, Call):
            args = [self.expr(a) for a in e.args]
            return "(" + self.func(e.fn, e.dtype).format(*args, T=self.c_type(e.dtype),
                                                          U=self.wrap_type(e.dtype)) + ")"
        if isinstance(e, Select):
            return f"({self.expr(e.cond)} ? {self.expr(e.a)} : {self.expr(e.b)})"
        raise TypeError(f"cannot render {type(e).__name__}")

    # -- statements --------------------------------------------------------------------------------------------------
    def statement(self, s, indent: str) -> list[str]:
        if isinstance(s, Let):
            return [f"{indent}const {self.local_type(s.var.dtype)} {s.var.name} = {self.expr(s.value)};"]
        if isinstance(s, Store):
            return [f"{indent}{s.buffer.name}[{self.index(s.index)}] = {self.expr(s.value)};"]
        if isinstance(s, Update):
            return [self.update(s, indent)]
        if isinstance(s, Loop):
            return self.loop(s, indent)
        raise TypeError(f"cannot render {type(s).__name__}")

    def update(self, s: Update, indent: str) -> str:
        """buffer[index] = buffer[index] op value, exact as the op's expression is
        (integer adds wrap); a float add is the compound `+=`."""
        target = f"{s.buffer.name}[{self.index(s.index)}]"
        if s.op == "add" and s.value.dtype.kind == "f":
            return f"{indent}{target} {UPDATE_OPS[s.op]} {self.expr(s.value)};"
        old = Var(target, s.value.dtype)   # the element itself, spelled as a local
        e = Binary("add", old, s.value, s.value.dtype) if s.op == "add" else Call(s.op, (old, s.value), s.value.dtype)
        return f"{indent}{target} = {self.expr(e)};"

    def locals(self, kernel, indent: str) -> list[str]:
        """Declarations of the kernel's local buffers."""
        return [f"{indent}{self.buffer_type(b.dtype)} {b.name}[{max(b.size, 1)}];" for b in kernel.locals]

    def loop(self, loop: Loop, indent: str, start: str = "0", stop: str | None = None) -> list[str]:
        """The loop over [start, stop): [0, extent) unless a caller names its bounds."""
        v = loop.var.name
        stop = str(loop.extent) if stop is None else stop
        lines = [f"{indent}for ({self.INDEX_TYPE} {v} = {start}; {v} < {stop}; {v}++) {{"]
        for s in loop.body:
            lines += self.statement(s, indent + "    ")
        lines.append(f"{indent}}}")
        return lines

    def params(self, kernel) -> str:
        out = []
        for b in kernel.params:
            const = "const " if b.role == "in" else ""
            out.append(f"{const}{self.buffer_type(b.dtype)}* {b.name}")
        return ", ".join(out)

    def comment(self, kernel) -> str:
        """The kernel's IR text as a comment above its code."""
        text = str(kernel).replace("*/", "* /")
        return "/*\n" + "\n".join(" * " + line if line else " *" for line in text.splitlines()) + "\n */"

    # -- kernels and modules -----------------------------------------------------------------------------------------
    def prelude(self) -> str:
        return ""

    def render_kernel(self, kernel) -> str:
        raise NotImplementedError

    def render(self, kernel) -> str:
        """One kernel as a complete translation unit."""
        return self.render_module([kernel])

    def render_module(self, kernels) -> str:
        """Several kernels in one translation unit (one shared object or CUDA
        module): the prelude once, then each kernel (equal names once)."""
        rendered = {}
        for k in kernels:
            if k.name not in rendered:
                rendered[k.name] = self.render_kernel(k)
        return self.assemble(list(rendered.values()))

    def assemble(self, parts) -> str:
        """A translation unit from kernels already rendered (render_kernel)."""
        head = f"/* avalon kernel module ({self.language}): {len(parts)} kernel(s), by avalon.kernel_ir */\n"
        prelude = self.prelude()
        return head + (prelude + "\n" if prelude else "") + "\n".join(parts)

