"""Rematerialization: avalon.checkpoint(f) (JAX's jax.checkpoint, PyTorch's
activation checkpointing).

    block = avalon.checkpoint(lambda h, w, b: avalon.relu(h @ w + b))
    h = block(h, w, b)          # inside a function given to grad

The gradient graph normally reads the activations the forward pass computed
inside f, so they stay in memory from the forward pass until the backward pass
reaches them.  A checkpointed f keeps only its inputs: f is traced into a
graph of its own, whose inputs (f's arguments and the traced values it closes
over, such as a layer's parameters) are the arguments of a custom_vjp; its
residuals are those inputs, and its backward pass runs the graph again on them
(a nested grad, inlined into the gradient graph) and differentiates it.
The inputs reach the recomputation through `remat_barrier`, an identity op
that no pass merges or folds, so common-subexpression elimination cannot
replace the recomputed values by the stored forward ones.

f must be free of effects: a random draw (dropout) would draw again in the
backward pass and an in-place write (BatchNorm's running statistics) would
write twice, so both raise an error naming f.  Checkpointing composes with
grad of grad and jit like any custom_vjp.
"""
from __future__ import annotations

import functools

import numpy as np

from . import ops, tree
from .custom_vjp import custom_vjp
from .errors import AvalonError, at
from .ops import _batching, _layout, _sharding
from .primitive import PRIMITIVES, active_graph, bind, defprim, inline, is_tracer

remat_barrier_p = defprim(
    "remat_barrier", shape=lambda x: (x.shape, x.dtype), impl=lambda xp, x: x, view=True, effectful=True,
    vjp=lambda g, out, x: (g,), sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
    batching=_batching.identity_rule("remat_barrier"),
    doc="The identity, kept apart from every other node (never merged, folded or fused): the inputs of "
        "a computation that avalon.checkpoint repeats in the backward pass.")


def remat_barrier(x):
    return bind(remat_barrier_p, (x,))


def checkpoint(f):
    """f, recomputed in the backward pass instead of keeping its intermediate
    values (see the module's doc).  Eagerly, and in a trace nobody
    differentiates, it is f itself."""
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or type(f).__name__

    @functools.wraps(f, updated=())  # f may be a layer object: its attributes stay its own
    def checkpointed(*args):
        leaves, treedef = tree.flatten(args, is_leaf=is_tracer)
        if active_graph() is None and not any(map(is_tracer, leaves)):
            return f(*args)
        from .api import _trace
        graph = _trace(f, leaves, treedef, name)
        _refuse_effects(graph, name)
        # values f closes over (a model's traced parameters) are inputs like its arguments: their
        # gradients flow through the recomputation too
        captures = list(graph.__dict__.get("captures", ()))
        outs = _remat_rule(graph, name)(*leaves, *captures)
        return tree.unflatten(graph.out_tree, outs)

    checkpointed.__wrapped__ = f
    return checkpointed


def _remat_rule(graph, name):
    """A custom_vjp over the traced graph's inputs, one argument each: fwd
    runs the graph and keeps its inputs; bwd runs and differentiates it again."""
    def run(*values):
        return inline(graph, list(values))

    run.__qualname__ = run.__name__ = name
    rule = custom_vjp(run)
    return rule.defvjp(lambda *values: (run(*values), values),
                       lambda values, cts: _recomputed_vjp(graph, name, values, cts))


def _recomputed_vjp(graph, name, values, cts):
    """The cotangent of each input of `graph` (None for non-float ones): a
    nested grad of <graph(values), cts>, inlined into the gradient graph, on
    the inputs passed through remat_barrier."""
    from .api import GradFunction
    barred = tuple(remat_barrier(v) if is_tracer(v) else v for v in values)

    def recompute_loss(*xs):
        total = None
        for o, c in zip(inline(graph, list(xs)), cts):
            if np.dtype(o.dtype).kind not in "fc":
                continue
            # c is a value of the gradient graph: a constant of this inner
            # differentiation, yet an enclosing grad differentiates through it
            s = ops.sum(ops.mul(o, c))
            total = s if total is None else ops.add(total, s)
        return total

    recompute_loss.__qualname__ = recompute_loss.__name__ = f"{name}_recomputed"
    outs, entry = GradFunction(recompute_loss)._call_inlined(barred)
    grads = iter(outs[1:])
    return tuple(next(grads) if w else None for w in entry.wrt)


def _refuse_effects(graph, name):
    for n in graph.nodes:
        prim = PRIMITIVES.get(n.op)
        if prim is not None and (prim.draws_random or prim.writes_input):
            what = "draws random numbers" if prim.draws_random else f"writes into an array ({n.op})"
            raise AvalonError(
                f"checkpoint: {name} {what}{at(n.loc)}; recomputing it in the backward pass would do that a "
                "second time (a new dropout mask, a second running-statistics update). Keep such ops outside "
                "the checkpointed function, or pass the random mask in as an argument.")


__all__ = ["checkpoint", "remat_barrier"]
