"""Static memory planning for compiled graphs.

Shapes are static, so every intermediate that a kernel can write with out= gets
a slot in a set of buffers preallocated once per compiled signature:

* a value whose last use has passed gives its slot back for the next value
  (reuse of dead buffers, best fit by size);
* an in-place-safe op (a ufunc) whose input dies at that op writes straight
  over that input: this is how gradient contributions accumulate in place
  (add(g1, g2) -> add(g1, g2, out=g1));
* values that leave the function (outputs, and what they are views of) never
  live in a slot: each call returns fresh arrays the caller may keep.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .primitive import PRIMITIVES


@dataclass
class MemoryPlan:
    slot_of: dict = field(default_factory=dict)      # node -> slot index
    slot_nbytes: list = field(default_factory=list)  # size of each slot
    inplace: dict = field(default_factory=dict)      # node -> input node it overwrites

    @property
    def total_bytes(self) -> int:
        return sum(self.slot_nbytes)

    def summary(self) -> str:
        return (f"{len(self.slot_of)} values in {len(self.slot_nbytes)} buffers "
                f"({self.total_bytes / 2**20:.2f} MiB), {len(self.inplace)} written in place")


def plan_memory(graph, backend) -> MemoryPlan:
    nodes = graph.nodes
    index = {n: k for k, n in enumerate(nodes)}
    end = len(nodes)
    root = {}
    for n in nodes:
        prim = PRIMITIVES.get(n.op)
        root[n] = root[n.inputs[0]] if (prim is not None and prim.view and n.inputs) else n
    last = {}  # root -> index of the last use of it or of any view of it
    for k, n in enumerate(nodes):
        for i in n.inputs:
            r = root[i]
            last[r] = max(last.get(r, -1), k)
    escaping = {root[o] for o in graph.outputs}
    for r in escaping:
        last[r] = end

    plan = MemoryPlan()
    free: list[int] = []
    dies_at: dict[int, list] = {}
    for r, k in last.items():
        dies_at.setdefault(k, []).append(r)

    for k, n in enumerate(nodes):
        prim = PRIMITIVES.get(n.op)
        plannable = (prim is not None and not prim.view and root[n] is n and n not in escaping
                     and n.nbytes > 0 and backend.supports_out(prim))
        dying_here = [r for r in dies_at.get(k, ()) if r in plan.slot_of]
        if plannable:
            donor = None
            if prim.inplace:
                for i in n.inputs:
                    if i in dying_here and i.shape == n.shape and i.dtype == n.dtype:
                        donor = i
                        break
            if donor is not None:
                plan.slot_of[n] = plan.slot_of[donor]
                plan.inplace[n] = donor
                dying_here.remove(donor)
            else:
                plan.slot_of[n] = _take_slot(plan, free, n.nbytes)
        for r in dying_here:
            if r is not n:
                free.append(plan.slot_of[r])
        # a planned value nobody reads is dead at once
        if plannable and n not in last:
            free.append(plan.slot_of[n])
    return plan


def _take_slot(plan, free, nbytes):
    best = None
    for pos, s in enumerate(free):
        size = plan.slot_nbytes[s]
        if size >= nbytes and (best is None or size < plan.slot_nbytes[free[best]]):
            best = pos
    if best is None and free:
        # grow the largest free slot rather than adding a new one
        best = max(range(len(free)), key=lambda p: plan.slot_nbytes[free[p]])
    if best is not None:
        s = free.pop(best)
        plan.slot_nbytes[s] = max(plan.slot_nbytes[s], nbytes)
        return s
    plan.slot_nbytes.append(nbytes)
    return len(plan.slot_nbytes) - 1
