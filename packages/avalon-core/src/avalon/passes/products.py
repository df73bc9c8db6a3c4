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
from .views import elementwise_kernel_op

__all__ = ["transposed_products", "shared_transposed_operands", "wide_products", "SHARED_TRANSPOSE_MIN_ROWS"]

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
    return _rewrite_nodes(graph, lambda n: _transposed_product(n, uses))


def _rewrite_nodes(graph, rewrite):
    """Replace each node n for which rewrite(n) gives new nodes by them (the last
    one takes n's place in its users and the outputs)."""
    rename, out = {}, []
    for n in graph.nodes:
        n.inputs = [rename.get(i, i) for i in n.inputs]
        new = rewrite(n)
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


def wide_products(graph):
    """Compute a product a @ b^T with fewer rows than columns (a linear layer's
    forward on a batch smaller than its outputs) as (b @ a^T)^T, and let its
    users read the transposed view.  OpenBLAS's products by a transposed right
    operand run faster the more rows they have: (b a^T) took 0.44-0.85 of the
    time of a b^T for every shape with fewer rows than columns measured
    (100x784 by 784x500: 741 -> 624 us; 32x128 by 128x512: 82 -> 52 us), and
    1.1-1.4 times it with more rows.  Elementwise users read the view in place
    (fuse_views), products with a transpose flag.  Vector products (one row or
    one column: BLAS's gemv), graph outputs (their callers get C-ordered
    arrays) and products some op would have to copy (a concatenation, a
    reshape) are left as they are.  A CPU pass (cuBLAS has no such gap)."""
    outputs = set(graph.outputs)
    users: dict = {}
    for n in graph.nodes:
        for i in n.inputs:
            users.setdefault(i, []).append(n)

    def rewrite(n):
        if n in outputs or not all(_reads_transposed_in_place(u) for u in users.get(n, ())):
            return None
        return _wide_product(n)
    return _rewrite_nodes(graph, rewrite)


def _reads_transposed_in_place(user) -> bool:
    """Whether `user` reads a transposed operand without copying it: an elementwise
    op C kernels compute (fuse_views moves the view into its kernel), or a 2-D
    product (BLAS's transpose flag)."""
    if user.op == "matmul":
        return not user.attrs and all(x.ndim == 2 for x in user.inputs)
    return elementwise_kernel_op(user)


def _wide_product(m):
    """[a^T, b a^T, (b a^T)^T] replacing m = a @ b^T, or None."""
    if m.op != "matmul" or m.attrs or len(m.inputs) != 2 or any(x.ndim != 2 for x in m.inputs):
        return None
    a, bt = m.inputs
    if bt.op != "transpose" or tuple(bt.attrs["perm"]) != (1, 0):
        return None
    rows, cols = m.shape
    if rows >= cols or rows == 1 or cols == 1:
        return None
    b = bt.inputs[0]
    at = Node("transpose", [a], {"perm": (1, 0)}, a.shape[::-1], a.dtype, m.loc)
    product = Node("matmul", [b, at], {}, (cols, rows), m.dtype, m.loc)
    return [at, product, Node("transpose", [product], {"perm": (1, 0)}, m.shape, m.dtype, m.loc)]
