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
from .fusion import reads_written, write_epochs, written_arrays

__all__ = ["transposed_products", "shared_transposed_operands", "SHARED_TRANSPOSE_MIN_ROWS"]

#: a transposed right operand read by products of at least this many rows in all is
#: copied into C order once (see shared_transposed_operands)
SHARED_TRANSPOSE_MIN_ROWS = 256


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


def shared_transposed_operands(graph):
    """Copy into C order, once, a transposed matrix that several 2-D products
    read as their right operand, with SHARED_TRANSPOSE_MIN_ROWS rows or more in
    all (an RNN's recurrent weight, read at every step as h @ w.T).  OpenBLAS
    multiplies by a transposed right operand 20-50% slower than by a C-ordered
    one (a 32x128 by 128x512 product: 61 us against 40), and the copy costs
    one pass over the matrix; a CPU pass (cuBLAS has no such gap)."""
    epoch = write_epochs(graph)
    written = written_arrays(graph)
    readers: dict = {}
    for n in graph.nodes:
        if n.op != "matmul" or n.attrs or len(n.inputs) != 2 or any(x.ndim != 2 for x in n.inputs):
            continue
        b = n.inputs[1]
        if b.op != "transpose" or tuple(b.attrs["perm"]) != (1, 0):
            continue
        if epoch[n] != epoch[b] and reads_written(b, written):
            continue     # a product after a write into the matrix reads the written values: not the copy
        readers.setdefault(b, []).append(n)
    copies = {}
    for t, products in readers.items():
        if len(products) < 2 or sum(m.inputs[0].shape[0] for m in products) < SHARED_TRANSPOSE_MIN_ROWS:
            continue
        copies[t] = Node("contiguous", [t], {}, t.shape, t.dtype, t.loc)
        for m in products:
            m.inputs = [m.inputs[0], copies[t]]
    if copies:
        nodes = []
        for n in graph.nodes:
            nodes.append(n)
            if n in copies:
                nodes.append(copies[n])
        graph.nodes = nodes
    return graph
