"""Reverse-mode differentiation as a graph-to-graph transformation.

`grad_graph(fwd, wrt)` copies the forward graph, then walks it backwards
calling each primitive's VJP rule on tracers of the new graph.  The backward
pass is therefore an ordinary graph: every pass (CSE, folding, fusion, memory
planning) optimizes it like any other.
"""
from __future__ import annotations

import numpy as np

from .errors import AvalonError, ShapeError, at
from .graph import Graph, type_str
from .primitive import PRIMITIVES, Tracer, source_location, tracing
from . import ops


def differentiable(dtype) -> bool:
    return np.dtype(dtype).kind in "fc"


def grad_graph(fwd: Graph, wrt: list[bool]) -> Graph:
    """A graph with inputs of `fwd` and outputs (loss, *aux, grad of each input
    marked in `wrt` that the loss depends on); `graph.has_gradient` says which
    inputs have an output.  `fwd`'s first output is the scalar floating-point
    loss; any further outputs (has_aux) are passed through, not differentiated."""
    loss_node, aux_nodes = fwd.outputs[0], list(fwd.outputs[1:])
    g = Graph(fwd.name + "_grad")
    env: dict = {}
    with tracing(g):
        for inp in fwd.inputs:
            env[inp] = Tracer(g, g.add_input(inp.shape, inp.dtype, inp.attrs.get("name")))
        for n in fwd.nodes:
            if n.op == "input":
                continue
            if n.op == "const":
                env[n] = Tracer(g, g.add_const(n.value, n.loc))
            else:
                env[n] = Tracer(g, g.add_node(n.op, [env[i].node for i in n.inputs], n.attrs, n.shape,
                                              n.dtype, n.loc))
        forward_nodes = set(g.nodes)
        needs = _needs_grad(fwd, wrt)
        cts: dict = {loss_node: Tracer(g, g.add_const(np.ones((), loss_node.dtype), loss_node.loc))}
        for n in reversed(fwd.nodes):
            if n not in cts or not needs.get(n) or n.op in ("input", "const"):
                continue
            prim = PRIMITIVES[n.op]
            rule = prim.get_vjp()
            with source_location(n.loc):
                in_cts = rule(cts[n], env[n], *[env[i] for i in n.inputs], **n.attrs)
                if len(in_cts) != len(n.inputs):
                    raise AvalonError(f"VJP of {n.op} returned {len(in_cts)} cotangents for "
                                      f"{len(n.inputs)} inputs")
                for i, c in zip(n.inputs, in_cts):
                    if c is None or not needs.get(i):
                        continue
                    if tuple(c.shape) != i.shape:
                        raise ShapeError(f"VJP of {n.op} gave a cotangent of shape {tuple(c.shape)} for an "
                                         f"input of shape {i.shape}{at(n.loc)}")
                    if c.dtype != i.dtype:
                        c = ops.cast(c, i.dtype)
                    cts[i] = c if i not in cts else ops.add(cts[i], c)
        # an input with no differentiable path to the output has no gradient
        # (None, as in PyTorch): no output at all; one whose path gives zero
        # (sign, a padding row) has zeros
        reached = _reaches_output(fwd, wrt, loss_node)
        has_gradient = [bool(w) and inp in reached for inp, w in zip(fwd.inputs, wrt)]
        grads = [cts[inp] if inp in cts else ops.zeros(inp.shape, inp.dtype)
                 for inp, has in zip(fwd.inputs, has_gradient) if has]
    g.outputs = [env[loss_node].node] + [env[a].node for a in aux_nodes] + [c.node for c in grads]
    # VJP rules give cotangents for every operand; those nobody needs go now
    # (even when no optimization pass runs), as do forward values the
    # backward pass does not read
    from .passes.dce import dce
    g = dce(g)
    g.has_gradient = has_gradient
    # what detect_anomaly reports as the backward pass (kept only until passes rewrite the graph)
    g.backward_nodes = frozenset(n for n in g.nodes if n not in forward_nodes)
    return g


def _reaches_output(fwd: Graph, wrt: list[bool], out) -> set:
    """The inputs in `wrt` from which `out` is reached through floating-point
    values and no detaching op (PyTorch's rule for a None gradient)."""
    depends = {inp: bool(w) and differentiable(inp.dtype) for inp, w in zip(fwd.inputs, wrt)}
    for n in fwd.nodes:
        if n.op not in ("input", "const"):
            depends[n] = (not PRIMITIVES[n.op].detaches and differentiable(n.dtype)
                          and any(depends.get(i, False) for i in n.inputs))
    reached = {out} if depends.get(out) else set()
    for n in reversed(fwd.nodes):
        if n in reached:
            reached.update(i for i in n.inputs if depends.get(i))
    return reached


def _needs_grad(fwd: Graph, wrt: list[bool]) -> dict:
    needs = {}
    for inp, w in zip(fwd.inputs, wrt):
        needs[inp] = bool(w) and differentiable(inp.dtype)
    for n in fwd.nodes:
        if n.op == "input":
            continue
        if n.op == "const":
            needs[n] = False
            continue
        prim = PRIMITIVES[n.op]
        needs[n] = (not prim.nondiff and differentiable(n.dtype)
                    and any(needs.get(i, False) for i in n.inputs))
    return needs


def check_scalar_output(g: Graph, fname: str, has_aux: bool = False) -> None:
    if has_aux:
        td = getattr(g, "out_tree", None)
        if not (getattr(td, "kind", None) in (tuple, list) and len(td.children) == 2 and len(g.outputs) >= 1):
            raise AvalonError(f"grad: {fname} must return a pair (value, aux) when has_aux=True, it returned "
                              f"{td.kind.__name__ if isinstance(getattr(td, 'kind', None), type) else 'another value'}"
                              f" of {len(getattr(td, 'children', ()) or ())} items")
        if not isinstance(td.children[0], str):  # an array leaf (tree.ARRAY), not a structure or a constant
            raise AvalonError(f"grad: with has_aux=True, the value {fname} returns first (before aux) must be "
                              "a scalar array computed from the arguments, not a Python value")
    elif len(g.outputs) != 1:
        raise AvalonError(f"grad: {fname} must return one scalar, it returned {len(g.outputs)} arrays; to return "
                          "more, return (value, aux) and pass has_aux=True")
    out = g.outputs[0]
    if out.shape != ():
        raise ShapeError(f"grad: {fname} must return a scalar (shape ()), it returned "
                         f"{type_str(out.shape, out.dtype)}; reduce it first, e.g. with .sum() or .mean()"
                         f"{at(out.loc)}")
    if not differentiable(out.dtype):
        raise AvalonError(f"grad: {fname} returned {type_str(out.shape, out.dtype)}; it must return a "
                          f"floating-point scalar{at(out.loc)}")
