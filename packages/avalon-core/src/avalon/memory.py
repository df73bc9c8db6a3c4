"""Static memory planning for compiled graphs.

Shapes are static, so every intermediate that a kernel can write with out= gets
a slot in a set of buffers preallocated once per compiled signature:

* a value whose last use has passed gives its slot back for the next value
  (reuse of dead buffers, best fit by size);
* an in-place-safe op (a ufunc) whose input dies at that op writes straight
  over that input: this is how gradient contributions accumulate in place
  (add(g1, g2) -> add(g1, g2, out=g1));
* values that leave the function (outputs, and what they are views of) never
  live in a slot: each call returns arrays the caller may keep (recycled
  only once the caller lets go of them: runtime.recycled);
* assign(dst, src) (an optimizer's update) lets the op computing src write
  straight into dst, when nothing reads dst afterwards: no copy at all;
* an op that only lays its inputs end to end (a primitive with an `assembles`
  rule: a concatenation along time of an RNN's per-step gradients) runs no
  kernel: each input is written straight into its place in the op's buffer,
  which is taken when the first of them is made and lives as long as any.
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
    offset_of: dict = field(default_factory=dict)    # node -> byte offset in its slot (an assembled part)
    assembled: set = field(default_factory=set)      # nodes whose inputs were written in place: no op runs

    @property
    def total_bytes(self) -> int:
        return sum(self.slot_nbytes)

    def summary(self) -> str:
        return (f"{len(self.slot_of)} values in {len(self.slot_nbytes)} buffers "
                f"({self.total_bytes / 2**20:.2f} MiB), {len(self.inplace)} written in place, "
                f"{len(self.write_into)} written straight into assigned arrays, "
                f"{len(self.assembled)} assembled in place")


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

    def plannable(n):
        prim = PRIMITIVES.get(n.op)
        return (prim is not None and not prim.view and root[n] is n and n not in escaping
                and n.nbytes > 0 and backend.supports_out(prim) and n not in plan.write_into)
    part_of = _plan_assembled(graph, plan, plannable, index)
    for part, (whole, _) in part_of.items():
        # a part's memory is its whole's: freed when the whole and every part are dead
        last[whole] = max(last.get(whole, index[whole]), last.pop(part, index[part]))
    free: list[int] = []
    dies_at: dict[int, list] = {}
    for r, k in last.items():
        dies_at.setdefault(k, []).append(r)

    for k, n in enumerate(nodes):
        prim = PRIMITIVES.get(n.op)
        dying_here = [r for r in dies_at.get(k, ()) if r in plan.slot_of]
        if n in part_of:
            whole, offset = part_of[n]
            if whole not in plan.slot_of:
                plan.slot_of[whole] = _take_slot(plan, free, whole.nbytes)
            plan.slot_of[n], plan.offset_of[n] = plan.slot_of[whole], offset
        elif n in plan.assembled:
            pass                      # its slot was taken with its first part
        elif plannable(n):
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
        if n in plan.slot_of and n not in part_of and n not in last:
            free.append(plan.slot_of[n])
    return plan


#: parts are placed at offsets that keep a cache line's alignment (the C kernels'
#: vector loads; backends' buffers are aligned so)
PART_ALIGNMENT = 64


def _plan_assembled(graph, plan, plannable, index) -> dict:
    """part -> (whole, byte offset) for each op whose `assembles` rule lays its inputs
    end to end, where each input can be written in its place: made by a kernel
    writing an `out` of its own (plannable) before the op, of the op's dtype, an
    input of no other such op, and never written again (an assign's destination)."""
    taken: dict = {}
    written = {a.inputs[0] for a in graph.nodes if getattr(PRIMITIVES.get(a.op), "writes_input", False)}
    for whole in graph.nodes:
        prim = PRIMITIVES.get(whole.op)
        rule = prim.rule("assembles", None) if prim is not None else None
        if rule is None or not plannable(whole):
            continue
        offsets = rule(whole)
        parts = whole.inputs
        if (offsets is None or len(parts) < 2 or len(set(parts)) != len(parts)
                or any(off % PART_ALIGNMENT for off in offsets)
                or any(p in taken or p in written or p.dtype != whole.dtype or index[p] > index[whole]
                       or not plannable(p) or p.op in ("input", "const") for p in parts)):
            continue
        for p, off in zip(parts, offsets):
            taken[p] = (whole, off)
        plan.assembled.add(whole)
    return taken


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
