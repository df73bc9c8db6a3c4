"""Views read in place by fused kernels.

A slice of an array (the gates split out of an LSTM's pre-activation, one
time step x_proj[t] of an input projection) is a strided view.  A kernel
compiled for contiguous inputs cannot take it, so an elementwise op on a
slice ran NumPy's strided loops, op by op (a sigmoid: four passes).  This
pass moves each view that an elementwise kernel reads into the kernel: the
fused node (or a lone elementwise node, which becomes a fused node of two)
takes the view's input instead, and its body reads the view's elements at
their offset and strides (the primitive's `strided_view` rule; the kernel IR
lowers them as loads, avalon.kernel_ir.lower).

A backend whose fused kernels lower through the kernel IR runs it after
`fuse_elementwise` (the CPU backend's `passes()`).  Only views of values that
are not views themselves move: those are contiguous, as kernels need.
"""
from __future__ import annotations

import math

import numpy as np

from ..graph import Graph, Node
from ..primitive import PRIMITIVES
from .dce import dce


def _strided(n):
    """(offset, strides) of view n over its input's C order, or None."""
    prim = PRIMITIVES.get(n.op)
    rule = prim.rule("strided_view", None) if prim is not None else None
    return rule(n) if rule is not None else None


def _contiguous(n) -> bool:
    """n's array is C-contiguous: a graph input or a computed value (kernels
    write contiguous arrays), or a view reading such an array in C order (a
    reshape) - when the caller's arrays are not, the kernel's entry point
    sees it and takes its strided path."""
    prim = PRIMITIVES.get(n.op)
    if n.op == "input" or (prim is not None and not prim.view):
        return True
    view = _strided(n)
    return view is not None and view == (0, _c_strides(n.shape)) and _contiguous(n.inputs[0])


def _c_strides(shape):
    return tuple(int(math.prod(shape[d + 1:])) for d in range(len(shape)))


def _kernel_view(n) -> bool:
    """n is a view a kernel can read in place: a strided view of a contiguous
    array (not a reshape of all of it, which the kernel takes as its input)."""
    view = _strided(n)
    if view is None or (view == (0, _c_strides(n.shape)) and n.size == n.inputs[0].size):
        return False
    return _contiguous(n.inputs[0])


def elementwise_kernel_op(n) -> bool:
    """n is an elementwise op a C kernel computes: this pass moves a view it reads into it."""
    prim = PRIMITIVES.get(n.op)
    return prim is not None and prim.elementwise and not prim.effectful and prim.expr is not None


def fuse_views(graph):
    replaced = {}
    nodes = []
    for n in graph.nodes:
        n.inputs = [replaced.get(i, i) for i in n.inputs]
        if (n.op == "fused" or elementwise_kernel_op(n)) and any(_kernel_view(i) for i in n.inputs):
            new = _absorb_views(n)
            replaced[n] = new
            nodes.append(new)
        else:
            nodes.append(n)
    if not replaced:
        return graph
    graph.nodes = nodes
    graph.outputs = [replaced.get(o, o) for o in graph.outputs]
    return dce(graph)


def _body_of(n):
    """(body, its inputs' values outside): a fused node's own, or a body of one op."""
    if n.op == "fused":
        return n.attrs["body"], list(n.inputs)
    body = Graph("fused")
    env, outside = {}, []
    for i in n.inputs:
        if i not in env:
            scalar = i.op == "const" and i.size == 1
            env[i] = body.add_const(i.value) if scalar else body.add_input(i.shape, i.dtype)
            if not scalar:
                outside.append(i)
    body.outputs = [body.add_node(n.op, [env[i] for i in n.inputs], n.attrs, n.shape, n.dtype, n.loc)]
    return body, outside


def _absorb_views(n):
    """A fused node computing n whose body reads n's view operands in place."""
    body, outside = _body_of(n)
    new = Graph("fused")
    new.made_by = "fuse_views"   # named by codegen's internal errors
    inputs, env = [], {}

    def input_for(value):
        if value not in env:
            env[value] = new.add_input(value.shape, value.dtype)
            inputs.append(value)
        return env[value]

    inner = {}
    for b, value in zip(body.inputs, outside):
        if _kernel_view(value):
            inner[b] = new.add_node(value.op, [input_for(value.inputs[0])], value.attrs, value.shape,
                                    value.dtype, value.loc)
        else:
            inner[b] = input_for(value)
    for m in body.nodes:
        if m.op == "input":
            continue
        if m.op == "const":
            inner[m] = new.add_const(m.value, m.loc)
        else:
            inner[m] = new.add_node(m.op, [inner[i] for i in m.inputs], m.attrs, m.shape, m.dtype, m.loc)
    new.outputs = [inner[body.outputs[0]]]
    return Node("fused", inputs, {"body": new}, n.shape, n.dtype, n.loc)
