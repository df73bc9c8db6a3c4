"""Pool first: max_pool(f(x)) -> f(max_pool(x)) for monotone elementwise f.

Max pooling commutes with every non-decreasing function applied the same way
to all elements of a window: relu, tanh, sigmoid, adding a value that is
constant over the window (a per-channel bias), max with such a value.  After
the rewrite those ops run on the pooled tensor (a quarter of the elements for
2x2 pooling), and so do their gradients.  Run on forward graphs, before
differentiation, so the backward pass is derived from the cheaper form.
"""
from __future__ import annotations

from ..graph import Node

MONOTONE_UNARY = {"relu", "tanh", "sigmoid"}
MONOTONE_WITH_CONSTANT = {"add": (0, 1), "maximum": (0, 1), "sub": (0,)}  # positions the variable may take


def _window_constant(c, x_shape, pooled_axes):
    """c broadcasts against x_shape with size 1 on every pooled axis."""
    lead = len(x_shape) - len(c.shape)
    if lead < 0:
        return False
    return all(c.shape[a - lead] == 1 for a in pooled_axes if a >= lead)


def _step(node, pooled_axes, uses):
    """(variable input, rebuild function) when node is a monotone step, else None."""
    if node.op in MONOTONE_UNARY:
        return node.inputs[0], lambda v: [v]
    positions = MONOTONE_WITH_CONSTANT.get(node.op)
    if positions is None or len(node.inputs) != 2:
        return None
    for pos in positions:
        var, const = node.inputs[pos], node.inputs[1 - pos]
        if var.shape == node.shape and _window_constant(const, node.shape, pooled_axes):
            return var, (lambda v, pos=pos, const=const: [v, const] if pos == 0 else [const, v])
    return None


def pool_first(graph):
    uses = graph.uses()
    outputs = set(graph.outputs)
    replace = {}
    new_nodes = []
    for n in graph.nodes:
        if n.op != "max_pool" or n.dtype.kind != "f":
            new_nodes.append(n)
            continue
        pooled_axes = range(2, n.ndim)
        chain = []
        src = n.inputs[0]
        while src.op not in ("input", "const") and src not in outputs and len(uses.get(src, ())) == 1:
            step = _step(src, pooled_axes, uses)
            if step is None:
                break
            chain.append((src, step[1]))
            src = step[0]
        if not chain:
            new_nodes.append(n)
            continue
        value = Node("max_pool", [src], n.attrs, n.shape, n.dtype, n.loc)
        new_nodes.append(value)
        for old, rebuild in reversed(chain):
            value = Node(old.op, rebuild(value), old.attrs, n.shape, n.dtype, old.loc)
            new_nodes.append(value)
        replace[n] = value
    if not replace:
        return graph
    for m in new_nodes:
        m.inputs = [replace.get(i, i) for i in m.inputs]
    graph.nodes = new_nodes
    graph.outputs = [replace.get(o, o) for o in graph.outputs]
    from .dce import dce
    return dce(graph)
