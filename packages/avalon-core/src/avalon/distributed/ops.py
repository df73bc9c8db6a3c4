"""process_all_reduce: the all-reduce across processes as a primitive, so that
it can sit in the middle of a traced, differentiated, compiled graph
(SyncBatchNorm sums per-channel statistics over the ranks inside the step).

Its implementation is a host call into the world's collective backend (MPI for
NumPy arrays, NCCL for CuPy arrays).  Its VJP is another all-reduce: if every
rank's y = sum_r x_r, the gradient of the global loss sum_k L_k with respect to
x_r is sum_k dL_k/dy, the all-reduce of the ranks' cotangents.

Threads: the op is `collective`, so the engine never runs it on its worker
threads.  Its sharding rule refuses the batch split (each thread would call the
collective once: N calls per step on this rank, one on another) and
split_components keeps a graph that holds it in one thread, so every rank calls
the collectives of a step once each, in the graph's order, which is the same on
every rank (the same code traced the same way).
"""
from __future__ import annotations

import numpy as np

from ..ops._batching import identity_rule
from ..ops._sharding import NoSplit
from ..primitive import bind, defprim
from . import _world

DIFFERENTIABLE_OPS = ("sum", "mean")


def _shape_rule(x, *, op):
    return tuple(x.shape), np.dtype(x.dtype)


def _impl(xp, x, *, op):
    buf = xp.array(x, copy=True, order="C")  # a fresh buffer: the input may be a kernel's workspace
    return _world.backend_for_arrays([buf]).all_reduce_(buf, op)


def _vjp(ct, out, x, *, op):
    if op not in DIFFERENTIABLE_OPS:
        return (None,)
    return (all_reduce_value(ct, op),)


def _never_split(node, states, ctx):
    raise NoSplit("process_all_reduce communicates with other processes: it runs once per step, in one thread")


# Batching: the reduction runs across processes, element by element, so a batch of
# examples is reduced as one array, in one call (every rank still calls it once per step).
process_all_reduce_p = defprim(
    "process_all_reduce", shape=_shape_rule, impl=_impl, vjp=_vjp, collective=True, sharding=_never_split,
    batching=identity_rule("process_all_reduce"),
    doc="the all-reduce (op: sum, mean, max) of an array across the processes of avalon.distributed")


def all_reduce_value(x, op="sum"):
    """All-reduce one array (or tracer) across the processes, as a value: a new
    array; inside a trace, a process_all_reduce node.  In a world of one
    process, x itself (no node: the single-process graph is unchanged)."""
    if _world.world_size() == 1:
        return x
    if op not in ("sum", "mean", "max"):
        raise ValueError(f"all_reduce: op must be 'sum', 'mean' or 'max', not {op!r}")
    return bind(process_all_reduce_p, [x], {"op": op})
