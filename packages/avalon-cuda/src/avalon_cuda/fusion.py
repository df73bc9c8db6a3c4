"""A fused elementwise group (a body Graph from avalon.passes.fusion) as the
C++ of one CuPy ElementwiseKernel.

This module only writes source text; it needs neither CuPy nor a GPU, so the
generated code can be read and checked anywhere.  `generate(body)` returns a
`FusedSource`: the kernel's typed parameter lists and its loop body, one
statement a node::

    // avalon fused kernel avalon_fused_3f2a...: f32[64,128]
    // in:  float32 in0, float32 in1
    // out: float32 out
    float t2 = (float)(in0 * in1);
    float t4 = (float)(tanh(t2));
    out = t4;

Each node's value lives in a local of its own C type, built from the
primitive's `expr` template ("exp({0})", "({0} ? {1} : {2})", "({T}){0}" with
{T} the node's C type).  Operands of the binary ops are cast to their common
dtype first, so C++'s promotion rules never pick a different type than NumPy.
Scalar constants are inlined as literals of their exact dtype.  A few
primitives get a template of their own (`CUDA_EXPR`) where the core's generic
one is not exact in CUDA C++: max/min must propagate NaN as NumPy does, and a
bare `0.5` would make sigmoid compute in double.

Anything this cannot express exactly raises `Unfusable` with the reason, and
the backend falls back to running the group's kernels one after another.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from avalon.ops._rules import result_dtype
from avalon.primitive import PRIMITIVES

#: dtype -> C type of a kernel local; CuPy's parameter syntax uses the dtype name
C_TYPES = {
    np.dtype(np.bool_): "bool",
    np.dtype(np.int8): "signed char",
    np.dtype(np.int16): "short",
    np.dtype(np.int32): "int",
    np.dtype(np.int64): "long long",
    np.dtype(np.uint8): "unsigned char",
    np.dtype(np.uint16): "unsigned short",
    np.dtype(np.uint32): "unsigned int",
    np.dtype(np.uint64): "unsigned long long",
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}

#: ops whose operands C++ must see in one common type (NumPy's result type)
SAME_TYPE_OPERANDS = {"add", "sub", "mul", "div", "pow", "maximum", "minimum",
                      "lt", "le", "gt", "ge", "eq", "ne"}

#: templates that replace the primitive's own `expr` on CUDA
CUDA_EXPR = {
    # NumPy's maximum/minimum return NaN when either operand is NaN; CUDA's max() does not
    "maximum": "(({0} > {1} || {0} != {0}) ? {0} : {1})",
    "minimum": "(({0} < {1} || {0} != {0}) ? {0} : {1})",
    "relu": "(({0} > ({T})0 || {0} != {0}) ? {0} : ({T})0)",
    # typed constants keep float32 math in float (a bare 0.5 is a double)
    # 1 / (1 + exp(-x)): exact in the far negative tail, as the CPU kernel
    # (0.5 tanh(x / 2) + 0.5 rounds to 0 there)
    "sigmoid": "(({T})1 / (({T})1 + exp(-{0})))",
    # NumPy's sign keeps NaN and gives +0 for -0
    "sign": "({0} > ({T})0 ? ({T})1 : ({0} < ({T})0 ? ({T})-1 : ({0} == ({T})0 ? ({T})0 : {0})))",
}


class Unfusable(Exception):
    """The body cannot be written as one exact C++ kernel; str() says why."""


@dataclass(frozen=True)
class FusedSource:
    name: str            # kernel name (a hash of the code: equal code, equal name)
    in_params: str       # "float32 in0, bool in1"
    out_params: str      # "float32 out"
    operation: str       # the loop body
    out_shape: tuple
    out_dtype: np.dtype

    @property
    def text(self) -> str:
        """The kernel as a reader wants it: signature comments and the loop body."""
        head = (f"// avalon fused kernel {self.name}: {np.dtype(self.out_dtype).name}"
                f"[{','.join(map(str, self.out_shape))}]\n"
                f"// in:  {self.in_params or '(none)'}\n// out: {self.out_params}\n")
        return head + self.operation + "\n"


def c_type(dtype) -> str:
    try:
        return C_TYPES[np.dtype(dtype)]
    except KeyError:
        raise Unfusable(f"dtype {np.dtype(dtype).name} has no exact C type in a fused kernel "
                        "(float16 and complex groups run op by op)") from None


def c_literal(value, dtype) -> str:
    """A C expression of type c_type(dtype) whose value is exactly `value`."""
    dtype = np.dtype(dtype)
    ct = c_type(dtype)
    v = np.asarray(value, dtype=dtype).reshape(())
    if dtype.kind == "b":
        return "true" if bool(v) else "false"
    if dtype.kind == "i":
        i = int(v)
        if i == -2**63:  # no literal spells it: -9223372036854775808LL overflows before negation
            return "((long long)(-9223372036854775807LL - 1))"
        return f"(({ct}){i}LL)"
    if dtype.kind == "u":
        return f"(({ct}){int(v)}ULL)"
    if dtype.kind == "f":
        f = float(v)
        if np.isfinite(f):
            # repr of the double equal to the value reads back exactly, and the
            # cast to float is then exact too (the value is a float32 already)
            return f"(({ct}){f!r})"
        if dtype == np.float32:
            return f"__int_as_float({int(v.view(np.int32))})"
        return f"__longlong_as_double({int(v.view(np.int64))}LL)"
    raise Unfusable(f"constant of dtype {dtype.name} cannot be inlined")


def _template(node) -> str:
    prim = PRIMITIVES.get(node.op)
    if prim is None:
        raise Unfusable(f"op {node.op!r} is not a primitive")
    if node.op == "abs":
        return "fabs({0})" if node.dtype.kind == "f" else "({0} < ({T})0 ? ({T})(-{0}) : {0})"
    if node.op == "pow" and node.dtype.kind != "f":
        raise Unfusable("integer pow has no exact C expression")
    expr = CUDA_EXPR.get(node.op, prim.expr)
    if expr is None:
        raise Unfusable(f"primitive {node.op!r} has no C expression (Primitive.expr)")
    return expr


def _operands(node, names) -> list[str]:
    """The C spelling of each operand, cast where the op needs one common type."""
    ops = [names[i] for i in node.inputs]
    if node.op in SAME_TYPE_OPERANDS:
        common = result_dtype(node.op, *(i.dtype for i in node.inputs))
        targets = [common] * len(node.inputs)
    elif node.op == "where":
        targets = [None, node.dtype, node.dtype]
    else:
        return ops
    return [s if t is None or i.dtype == t else f"(({c_type(t)}){s})"
            for s, i, t in zip(ops, node.inputs, targets)]


def generate(body) -> FusedSource:
    """The ElementwiseKernel source of a fused body; raises Unfusable."""
    if len(body.outputs) != 1:
        raise Unfusable(f"a fused body has one output, this one has {len(body.outputs)}")
    out_node = body.outputs[0]
    names: dict = {}
    params = []
    for k, n in enumerate(body.inputs):
        c_type(n.dtype)  # rejects dtypes without an exact C type
        names[n] = f"in{k}"
        params.append(f"{n.dtype.name} in{k}")
    lines = []
    for k, n in enumerate(body.nodes):
        if n.op == "input":
            continue
        if n.op == "const":
            names[n] = c_literal(_host_scalar(n.value), n.dtype)
            continue
        ct = c_type(n.dtype)
        for i in n.inputs:
            c_type(i.dtype)
        expr = _template(n).format(*_operands(n, names), T=ct)
        names[n] = f"t{k}"
        lines.append(f"{ct} t{k} = ({ct})({expr});")
    if out_node not in names or out_node.op in ("input", "const"):
        raise Unfusable("the body's output is not computed by an op of the body")
    c_type(out_node.dtype)
    lines.append(f"out = {names[out_node]};")
    operation = "\n".join(lines)
    in_params = ", ".join(params)
    out_params = f"{out_node.dtype.name} out"
    digest = hashlib.sha1(f"{in_params}|{out_params}|{operation}".encode()).hexdigest()[:16]
    return FusedSource(f"avalon_fused_{digest}", in_params, out_params, operation,
                       tuple(out_node.shape), np.dtype(out_node.dtype))


def _host_value(value) -> np.ndarray:
    """A constant's value on the host (it may be a device array)."""
    if isinstance(value, (np.ndarray, np.generic, bool, int, float)):
        return np.asarray(value)
    from avalon.backends import backend_of
    return np.asarray(backend_of(value).to_host(value))


def _host_scalar(value):
    a = _host_value(value)
    if a.size != 1:
        raise Unfusable(f"a constant of {a.size} elements cannot be inlined")
    return a.reshape(())


def cache_key(body) -> tuple:
    """The body's text form plus its constants' values: the text form prints a
    device-array constant by type only, and two such bodies must not share a kernel."""
    consts = []
    for n in body.nodes:
        if n.op == "const":
            a = _host_value(n.value)
            consts.append((a.dtype.str, a.shape, a.tobytes()))
    return body.format(show_loc=False), tuple(consts)
