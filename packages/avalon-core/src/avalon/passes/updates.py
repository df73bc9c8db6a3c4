"""Fusion of in-place updates: several arrays written elementwise in one pass.

An optimizer's update writes each of its arrays in place: Adam writes its two
moments, then the parameters from the new moments.  After elementwise fusion
that is one kernel and one `assign` per array, each kernel a full pass over
memory that reads again what the previous one just wrote.  This pass merges a
run of such writes into ONE `fused_update` node: a multi-output elementwise
body computing every new value from the old ones, each written into its
destination, so the arrays are read once and written once.

A write joins the run when it is `assign(dest, value)`, the value computed by
a fused group or one elementwise op, with `dest` an input of the graph (the caller's array: parameters, optimizer state), of the
run's shape and dtype, its group read by nothing else, and its result read by
nothing but later writes of the run.  Every element is read before it is
written, and at the same index, so writing in place is exact.  A node outside
the run that reads a destination, or writes any array, ends the run first: no
read or write moves across another.

Graph semantics are kept: a member reading a destination that an earlier
member of the run wrote reads the new value (the earlier member's output), as
it did in the graph; one reading a destination not yet written reads the old.
"""
from __future__ import annotations

from ..graph import Graph, Node
from ..primitive import PRIMITIVES, defprim
from .fusion import body_reduces

__all__ = ["fuse_updates", "early_updates", "fused_update_p"]


def _update_rule(*inputs, body, n_dest):
    return tuple(inputs[0].shape), inputs[0].dtype


def _evaluate(xp, body, values):
    """The body's outputs from the values of its inputs, op by op (the reference
    implementation: a backend compiles the body as one kernel)."""
    env = dict(zip(body.inputs, values))
    for n in body.nodes:
        if n.op == "input":
            continue
        if n.op == "const":
            env[n] = n.value
            continue
        prim = PRIMITIVES[n.op]
        args = [env[i] for i in n.inputs]
        if prim.ufunc is not None and not n.attrs:
            env[n] = getattr(xp, prim.ufunc)(*args)
        else:
            env[n] = prim.impl(xp, *args, **n.attrs)
    return [env[o] for o in body.outputs]


def _update_impl(xp, *arrays, body, n_dest):
    dests, values = arrays[:n_dest], arrays[n_dest:]
    new = _evaluate(xp, body, values)    # every output from the old values, then the writes
    for d, v in zip(dests, new):
        xp.copyto(d, xp.broadcast_to(v, d.shape), casting="same_kind")
    return dests[0]


def _update_lower(node):
    from ..kernel_ir.lower import Unfusable, lower
    try:
        return lower(node.attrs["body"])
    except Unfusable:
        return None


fused_update_p = defprim(
    "fused_update", shape=_update_rule, impl=_update_impl, writes_input=True, nondiff=True, lower=_update_lower,
    doc="In-place writes of several arrays computed by one elementwise body: inputs are the n_dest "
        "destinations, then the body's inputs; output j of the body is written into destination j "
        "(see passes.updates).")


def _candidate(a, users, outputs):
    """Whether assign node `a` can join a run: (dest, src) or None."""
    if a.op != "assign":
        return None
    dest, src = a.inputs
    prim = PRIMITIVES.get(src.op)
    # an elementwise value: a fused group that does not end in a reduction, or one op
    computed = ((src.op == "fused" and not body_reduces(src.attrs["body"]))
                or (prim is not None and prim.elementwise and prim.expr and not prim.effectful))
    # a write whose result the function returns stays a node of its own: the merged
    # node stands for no single write's result
    if (dest.op != "input" or not computed or users.get(src) != [a] or src in outputs or a in outputs
            or tuple(src.shape) != tuple(dest.shape) or src.dtype != dest.dtype):
        return None
    return dest, src


def _full_size(src, dest):
    """The arrays of dest's size src reads, and dest (scalars shared by every
    write, a learning rate, connect nothing)."""
    return {i for i in src.inputs if i.size == dest.size} | {dest}


def _body_of(src):
    """The elementwise body computing src: a fused group's, or one op's."""
    if src.op == "fused":
        return src.attrs["body"]
    body = Graph(src.op)
    ins = [body.add_input(i.shape, i.dtype) for i in src.inputs]
    body.outputs = [body.add_node(src.op, ins, src.attrs, src.shape, src.dtype, src.loc)]
    return body


class _Run:
    def __init__(self):
        self.assigns, self.dests, self.srcs = [], [], []
        self.arrays = set()   # the full-size arrays the run reads or writes

    def fits(self, dest, src):
        """Whether the write of src into dest joins the run: of its shape and dtype,
        to another array, and connected to it (reading or writing an array the
        run does).  Unconnected writes stay apart, so independent updates (each
        parameter's, when they are not in one flat buffer) can still run in
        parallel threads (runtime.threads.ComponentParallel)."""
        if not self.dests:
            return True
        first = self.dests[0]
        if dest in self.dests or dest.shape != first.shape or dest.dtype != first.dtype:
            return False
        return bool(self.arrays & _full_size(src, dest))

    def add(self, a, dest, src):
        self.assigns.append(a)
        self.dests.append(dest)
        self.srcs.append(src)
        self.arrays |= _full_size(src, dest) | {a}

    def touches(self, n):
        """Whether n (outside the run) reads a destination or a write's result."""
        return any(i in self.dests or i in self.assigns for i in n.inputs)


def fuse_updates(graph):
    users = graph.uses()
    outputs = set(graph.outputs)
    cands = {a: c for a in graph.nodes if (c := _candidate(a, users, outputs)) is not None}
    srcs = {src: a for a, (_, src) in cands.items()}
    runs, run = [], _Run()
    pending, stale = set(), set()   # groups seen before their write; those a closed run passed

    def close():
        nonlocal run
        if len(run.assigns) >= 2 and _self_contained(run, users):
            runs.append(run)
        run = _Run()
        # a group computed before the run's writes must not move past them
        stale.update(pending)
        pending.clear()

    for n in graph.nodes:
        if n in srcs:
            if not run.fits(cands[srcs[n]][0], n):
                close()
            pending.add(n)
            continue
        if n in cands and cands[n][1] not in stale:
            dest, src = cands[n]
            pending.discard(src)
            run.add(n, dest, src)
            continue
        if run.assigns and (run.touches(n) or getattr(PRIMITIVES.get(n.op), "writes_input", False)):
            close()
    close()
    if not runs:
        return graph
    return _replace(graph, runs)


def _self_contained(run, users):
    """Whether the writes' results are read only by later writes of the run (the
    merged node has no result of its own to give anyone else)."""
    later = set()
    for a, src in reversed(list(zip(run.assigns, run.srcs))):
        if any(u not in later for u in users.get(a, ())):
            return False
        later.add(src)
    return True


def _replace(graph, runs):
    merged = {}
    members = set()
    for r in runs:
        merged[r.assigns[-1]] = _merge(r)
        members.update(r.assigns)
        members.update(r.srcs)
    graph.nodes = [merged.get(n, n) for n in graph.nodes if n not in members or n in merged]
    return graph


def _merge(run):
    """One fused_update node for the run's writes, in their order."""
    body = Graph("fused_update")
    body.made_by = "fuse_updates"
    ext: dict = {}          # outer node -> body input
    new_value: dict = {}    # destination or write -> the body node of its new value
    outs = []
    for a, dest, src in zip(run.assigns, run.dests, run.srcs):
        inner = _body_of(src)
        env = {}
        for bi, outer in zip(inner.inputs, src.inputs):
            if outer in new_value:
                env[bi] = new_value[outer]
            else:
                if outer not in ext:
                    ext[outer] = body.add_input(outer.shape, outer.dtype)
                env[bi] = ext[outer]
        for m in inner.nodes:
            if m.op == "input":
                continue
            if m.op == "const":
                env[m] = body.add_const(m.value, m.loc)
                continue
            env[m] = body.add_node(m.op, [env[i] for i in m.inputs], m.attrs, m.shape, m.dtype, m.loc)
        value = env[inner.outputs[0]]
        new_value[a] = new_value[dest] = value
        outs.append(value)
    body.outputs = outs
    last = run.assigns[-1]
    return Node("fused_update", list(run.dests) + list(ext), {"body": body, "n_dest": len(run.dests)},
                last.shape, last.dtype, last.loc)


def early_updates(graph):
    """Each in-place write, with the values only it uses, moved up to just
    after the last node it must follow.

    Traced code writes an optimizer's arrays after the whole gradient is
    computed (the update is called on the gradients), so a parameter's update
    runs long after the product that made its gradient, and reads it back from
    memory.  The write and its own computation (the nodes whose values only it
    uses, pure ones) move up together, to just after the latest of: the nodes
    computing their other operands, every node reading or writing an array
    the write writes (through views too: a transposed weight read by a later
    product is the weight), and every write of an array they read.  There its
    gradient is still in the cache; reads and writes keep their order wherever
    they touch the same memory."""
    writes = [n for n in graph.nodes if getattr(PRIMITIVES.get(n.op), "writes_input", False)]
    if not writes:
        return graph
    root = _view_roots(graph)
    users = graph.uses()
    # inputs and constants first: they depend on nothing, and a moved block may read them
    fixed = [n for n in graph.nodes if n.op in ("input", "const")]
    nodes = fixed + [n for n in graph.nodes if n.op not in ("input", "const")]
    for w in writes:
        block = _own_computation(w, users)
        written = {root.get(d, d) for d in _destinations(w)}
        read = {root.get(i, i) for m in block for i in m.inputs}
        operands = {i for m in block for i in m.inputs} - block
        cut = None     # the node the block must follow: the first such one before w
        for n in reversed(nodes[len(fixed):nodes.index(w)]):
            if n not in block and (n in operands or _conflicts(n, written, read, root)):
                cut = n
                break
        keep = set(nodes[:nodes.index(cut) + 1]) if cut is not None else set()
        moving = [n for n in nodes if n in block and n not in keep]   # members before the cut stay
        rest = [n for n in nodes if n not in moving]
        where = rest.index(cut) + 1 if cut is not None else len(fixed)
        nodes = rest[:where] + moving + rest[where:]
    graph.nodes = nodes
    return graph


def _own_computation(w, users, admit=None):
    """w and the nodes computing values only it uses (transitively): pure nodes
    (no write, no random draw, no communication), free to move with it; with
    `admit`, only those for which admit(node) holds."""
    block = {w}
    stack = list(w.inputs)
    while stack:
        u = stack.pop()
        if u in block or u.op in ("input", "const"):
            continue
        prim = PRIMITIVES.get(u.op)
        if prim is None or prim.effectful or prim.collective or (admit is not None and not admit(u)):
            continue
        if all(x in block for x in users.get(u, ())):
            block.add(u)
            stack.extend(u.inputs)
    return block


def elementwise_node(n) -> bool:
    """An elementwise op, a fused group that does not end in a reduction, or a view."""
    prim = PRIMITIVES.get(n.op)
    if n.op == "fused":
        return not body_reduces(n.attrs["body"])
    return prim is not None and (prim.elementwise or prim.view)


def _view_roots(graph):
    """view node -> the array it views (a view of a view: the first array)."""
    root = {}
    for n in graph.nodes:
        prim = PRIMITIVES.get(n.op)
        if prim is not None and prim.view and n.inputs:
            src = n.inputs[0]
            root[n] = root.get(src, src)
    return root


def _destinations(node):
    """The inputs a writing node writes: an assign's first, a fused_update's n_dest."""
    return node.inputs[:node.attrs.get("n_dest", 1)] if node.op == "fused_update" else node.inputs[:1]


def _conflicts(n, written, read, root) -> bool:
    """Whether node n (earlier) must stay before a write of `written` that reads
    `read`: n reads or writes what it writes, or writes what it reads; a
    collective or an unknown op stays where it is."""
    if n.op in ("input", "const"):
        return False
    prim = PRIMITIVES.get(n.op)
    if prim is None or prim.collective:
        return True
    if any(root.get(i, i) in written for i in n.inputs):
        return True
    if prim.writes_input:
        return any(root.get(d, d) in written or root.get(d, d) in read for d in _destinations(n))
    return False
