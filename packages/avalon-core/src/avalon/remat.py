"""Rematerialization: avalon.checkpoint(f) (JAX's jax.checkpoint, PyTorch's
activation checkpointing).

    block = avalon.checkpoint(lambda h, w, b: avalon.relu(h @ w + b))
    h = block(h, w, b)          # inside a function given to grad

The gradient graph normally reads the activations the forward pass computed
inside f, so they stay in memory from the forward pass until the backward pass
reaches them.  A checkpointed f keeps only its inputs: it is a custom_vjp
whose residuals are its arguments, and whose backward pass traces f again on
them (a nested grad, inlined into the gradient graph) and differentiates it.
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
from .ops import _layout, _sharding
from .primitive import PRIMITIVES, bind, defprim, is_tracer

remat_barrier_p = defprim(
    "remat_barrier", shape=lambda x: (x.shape, x.dtype), impl=lambda xp, x: x, view=True, effectful=True,
    vjp=lambda g, out, x: (g,), sharding=_sharding.pointwise(), layout=_layout.POINTWISE,
    doc="The identity, kept apart from every other node (never merged, folded or fused): the inputs of "
        "a computation that avalon.checkpoint repeats in the backward pass.")


def remat_barrier(x):
    return bind(remat_barrier_p, (x,))


def checkpoint(f):
    """f, recomputed in the backward pass instead of keeping its intermediate
    values (see the module's doc).  Eagerly, and in a trace nobody
    differentiates, it is f itself."""
    rule = custom_vjp(f)

    def fwd(*args):
        return f(*args), args

    def bwd(args, ct):
        return _recomputed_vjp(f, args, ct)

    rule.defvjp(fwd, bwd)

    @functools.wraps(f)
    def checkpointed(*args):
        return rule(*args)

    checkpointed.__wrapped__ = f
    return checkpointed


def _recomputed_vjp(f, args, ct):
    from .api import GradFunction
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", "function")
    ct_leaves = tree.flatten(ct, is_leaf=is_tracer)[0]
    barred = tree.tree_map(lambda x: remat_barrier(x) if is_tracer(x) else x, args, is_leaf=is_tracer)

    def recompute_loss(*xs):
        outs = tree.flatten(f(*xs), is_leaf=is_tracer)[0]
        total = None
        for o, c in zip(outs, ct_leaves):
            if np.dtype(o.dtype).kind not in "fc":
                continue
            # ct is a value of the gradient graph: a constant of this inner
            # differentiation, yet an enclosing grad differentiates through it
            s = ops.sum(ops.mul(o, c))
            total = s if total is None else ops.add(total, s)
        return total

    recompute_loss.__qualname__ = recompute_loss.__name__ = f"{name}_recomputed"
    gf = GradFunction(recompute_loss)
    outs, entry = gf._call_inlined(tuple(barred))
    _refuse_effects(entry.graph, name)
    grads = iter(outs[1:])
    grad_leaves = [next(grads) if w else None for w in entry.wrt]
    return tree.unflatten(entry.in_tree, grad_leaves, static=None)


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
