"""Constant folding: a pure node whose inputs are all constants is computed at
compile time (on the CPU) and becomes a constant.  Results larger than their
inputs (a broadcast of a scalar) are left to run: they keep graphs small, and a
broadcast stays a free view whose shape passes can still reason about (the
batch split of avalon.passes.sharding shards it; it cannot shard a folded array)."""
import numpy as np

from ..primitive import PRIMITIVES

def _host(v):
    return v if isinstance(v, np.ndarray) else None


def constant_fold(graph):
    from ..backends import Device, get_backend
    cpu = get_backend(Device("cpu"))
    for n in graph.nodes:
        if n.op in ("input", "const") or not n.inputs:
            continue
        prim = PRIMITIVES.get(n.op)
        if prim is None or not prim.foldable or not all(i.op == "const" for i in n.inputs):
            continue
        values = [_host(i.value) for i in n.inputs]
        if any(v is None for v in values):
            continue
        if n.size > max(v.size for v in values):
            continue
        result = np.asarray(cpu.run(prim, values, n.attrs))
        if result.shape != n.shape or result.dtype != n.dtype:
            continue
        n.op, n.inputs, n.attrs, n.value = "const", [], {}, result
    return graph
