"""Transposed matrix products computed in the layout they are used in.

Reverse mode writes a weight's gradient as the transpose of a product, (a^T b)^T:
the product is laid out like the forward's transposed weight, and the gradient
comes out as a strided view of it.  Everything reading it then reads across
strides (an optimizer's update takes its slow path there), and combining the
engine threads' shares copies it.  Since (a b)^T = b^T a^T, and a transposed
operand costs a matrix product nothing (BLAS reads it with a transpose flag),
the product is computed transposed instead: the same arithmetic, its result
contiguous in the layout its users read.  The rewrite holds for any graph; it
applies where the product's only user is the transpose (else both layouts are
needed and the product stays as it is).
"""
from __future__ import annotations

from collections import Counter

from ..graph import Node

__all__ = ["transposed_products"]


def _uses(graph):
    uses = Counter(i for n in graph.nodes for i in n.inputs)
    uses.update(graph.outputs)
    return uses


def _transposed_product(t, uses):
    """(b^T, a^T, b^T a^T) replacing t = (a b)^T, or None."""
    if t.op != "transpose" or t.ndim != 2 or tuple(t.attrs["perm"]) != (1, 0):
        return None
    m = t.inputs[0]
    if m.op != "matmul" or uses[m] != 1 or m.attrs or any(x.ndim != 2 for x in m.inputs):
        return None
    a, b = m.inputs
    bt = Node("transpose", [b], {"perm": (1, 0)}, b.shape[::-1], b.dtype, m.loc)
    at = Node("transpose", [a], {"perm": (1, 0)}, a.shape[::-1], a.dtype, m.loc)
    return [bt, at, Node("matmul", [bt, at], {}, t.shape, t.dtype, m.loc)]


def transposed_products(graph):
    """Rewrite each transpose of a 2-D matrix product used only there into the
    product of the transposed operands (see the module's docstring)."""
    uses = _uses(graph)
    rename, out = {}, []
    for n in graph.nodes:
        n.inputs = [rename.get(i, i) for i in n.inputs]
        new = _transposed_product(n, uses)
        if new is None:
            out.append(n)
            continue
        out.extend(new)
        rename[n] = new[-1]
    graph.nodes = out
    graph.outputs = [rename.get(o, o) for o in graph.outputs]
    return graph
