"""Static memory planning for compiled graphs.

Shapes are static, so every intermediate that a kernel can write with out= gets
a slot in a set of buffers preallocated once per compiled signature:

* a value whose last use has passed gives its slot back for the next value
  (reuse of dead buffers, best fit by size);
* an in-place-safe op (a ufunc) whose input dies at that op writes straight
  over that input: this is how gradient contributions accumulate in place
  (add(g1, g2) -> add(g1, g2, out=g1));
* values that leave the function (outputs, and what they are views of) never
  live in a slot: each call returns fresh arrays the caller may keep;
* assign(dst, src) (an optimizer's update) lets the op computing src write
  straight into dst, when nothing reads dst afterwards: no copy at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .primitive import PRIMITIVES


@dataclass
class MemoryPlan:
    slot_of: dict = field(default_factory=dict)      # node -> slot index
    slot_nbytes: list = field(default_factory=list)  # size of each slot
    inplace: dict = field(default_factory=dict)      # node -> input node it overwrites
    write_into: dict = field(default_factory=dict)   # node -> array node it writes (for assign)
    elided: set = field(default_factory=set)         # assign nodes made free by write_into

    @property
    def total_bytes(self) -> int:
        return sum(self.slot_nbytes)

    def summary(self) -> str:
        return (f"{len(self.slot_of)} values in {len(self.slot_nbytes)} buffers "
                f"({self.total_bytes / 2**20:.2f} MiB), {len(self.inplace)} written in place, "
                f"{len(self.write_into)} written straight into assigned arrays")


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
    _plan_assign_targets(graph, backend, plan, root, index)
    free: list[int] = []
    dies_at: dict[int, list] = {}
    for r, k in last.items():
        dies_at.setdefault(k, []).append(r)

    for k, n in enumerate(nodes):
        prim = PRIMITIVES.get(n.op)
        plannable = (prim is not None and not prim.view and root[n] is n and n not in escaping
                     and n.nbytes > 0 and backend.supports_out(prim) and n not in plan.write_into)
        dying_here = [r for r in dies_at.get(k, ()) if r in plan.slot_of]
        if plannable:
            donor = None
            if _writes_over(prim, n):
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


def _writes_over(prim, node) -> bool:
    rule = prim.rule("writes_over", None)
    return rule(node) if rule is not None else prim.inplace


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


def _plan_assign_targets(graph, backend, plan, root, index):
    users = graph.uses()
    outputs = set(graph.outputs)
    readers: dict = {}  # root array -> positions of the nodes reading it or a view of it
    for k, n in enumerate(graph.nodes):
        for i in n.inputs:
            readers.setdefault(root[i], []).append(k)
    for a in graph.nodes:
        if a.op != "assign":
            continue
        dst, src = a.inputs
        prim = PRIMITIVES.get(src.op)
        if (prim is None or prim.view or src.op in ("input", "const") or src in outputs
                or users.get(src) != [a] or src.shape != dst.shape or src.dtype != dst.dtype
                or not backend.supports_out(prim) or src in plan.write_into):
            continue
        at = index[src]
        if index[dst] > at:
            # dst is an earlier write's result (a buffer updated twice), made after
            # src: writing src there early would be undone by that earlier write
            continue
        later = [k for k in readers.get(root[dst], ()) if k > at and graph.nodes[k] is not a]
        reads_dst = any(root[i] is root[dst] for i in src.inputs)
        if later or (reads_dst and not (prim.inplace or src.op == "fused")):
            continue
        plan.write_into[src] = dst
        plan.elided.add(a)
