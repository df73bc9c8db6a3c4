"""Fusion of elementwise chains, and of the reductions they feed.

A maximal group of elementwise nodes of one shape, whose intermediate values
are used only inside the group, becomes one "fused" node whose `body`
attribute is a small Graph.  A group may end in a reduction (a primitive with
a `reduction` rule: sum, max, min) of a value the group computes: the group's
elementwise members then have the reduction's input shape, and the body's
output is the reduction's.  Each backend compiles a body into one kernel
(`Backend.compile_fused`): the CPU backend runs it in place in preallocated
scratch memory (a reduction body as one loop nest with accumulators, see
kernel_ir.lower), a GPU backend can emit a single elementwise kernel.

Before grouping, `recompute_cheap` gives each reader of a cheap value (an op
whose primitive says `recompute`) its own copy, so each reader's group computes
the value instead of reading a stored array: a normalization's `x - mean`,
read by the variance's sum, the output and three sums of the backward pass,
is never written.  It copies a value only where the copies read less memory
than computing, storing and reading it back: one that reads at most one
full-size array, or two read by two groups.
"""
from ..graph import Graph, Node
from ..primitive import PRIMITIVES, defprim


def _fused_rule(*inputs, body):
    out = body.outputs[0]
    return out.shape, out.dtype


def _fused_sharding(node, states, ctx):
    """A fused group is sharded as its body is."""
    body = node.attrs["body"]
    return ctx.sub_graph(node, body, states)[body.outputs[0]]


def _fused_writes_over(node):
    """A group of one op (fuse_lone_ops) writes over a dying input where the op would:
    each element read before it is written, at the same index (a body reading a view
    of an input reads it elsewhere: never)."""
    ops = [n for n in node.attrs["body"].nodes if n.op not in ("input", "const")]
    return (len(ops) == 1 and PRIMITIVES[ops[0].op].inplace
            and all(i.op in ("input", "const") for i in ops[0].inputs))


fused_p = defprim("fused", shape=_fused_rule, impl=None, accepts_out=True, sharding=_fused_sharding,
                  writes_over=_fused_writes_over,
                  doc="A group of elementwise ops compiled as one kernel (see passes.fusion).")

MIN_GROUP = 2

#: most readers a value is recomputed for (a copy each: bounds the compile work)
MAX_RECOMPUTE_READERS = 16


def _fusible(n):
    p = PRIMITIVES.get(n.op)
    return p is not None and p.fusible and not p.effectful


def reduction_of(n):
    """The `reduction` rule of n's primitive (a group may end in n), or None."""
    p = PRIMITIVES.get(n.op)
    if p is None or p.effectful:
        return None
    return p.rule("reduction", None)


def body_reduces(body) -> bool:
    """Whether a fused body's output is a reduction (its kernel reads more than it writes)."""
    return any(reduction_of(o) is not None for o in body.outputs)


def write_epochs(graph):
    """Number of input-writing nodes (assign) before each node: members of a
    group must share it, so no read of an input moves past a write to it."""
    epoch, count = {}, 0
    for n in graph.nodes:
        epoch[n] = count
        if getattr(PRIMITIVES.get(n.op), "writes_input", False):
            count += 1
    return epoch


def recompute_cheap(graph):
    """Replace each cheap value read by several fusible nodes with one copy per
    reader, placed just before it (consumers first, so a copied value's own
    cheap inputs are copied in turn).  A copy may move past a write (assign)
    only when the value reads no array that is ever written."""
    users = graph.uses()
    outputs = set(graph.outputs)
    epoch = write_epochs(graph)
    written = written_arrays(graph)
    before: dict = {}          # reader -> copies placed just before it
    removed = set()
    for value in reversed(graph.nodes):
        readers = list(dict.fromkeys(users.get(value, ())))
        if not _recomputable(value, readers, outputs, epoch, written):
            continue
        removed.add(value)
        for reader in readers:
            copy = Node(value.op, value.inputs, value.attrs, value.shape, value.dtype, value.loc)
            reader.inputs = [copy if i is value else i for i in reader.inputs]
            before.setdefault(reader, []).append(copy)
            users[copy], epoch[copy] = [reader], epoch[reader]
            for i in value.inputs:
                users[i] = [u for u in users.get(i, ()) if u is not value] + [copy]
    if removed:
        nodes: list = []

        def place(n):
            for c in before.get(n, ()):
                place(c)
            nodes.append(n)
        for n in graph.nodes:
            if n not in removed:
                place(n)
        graph.nodes = nodes
    return graph


def _recomputable(value, readers, outputs, epoch, written):
    prim = PRIMITIVES.get(value.op)
    if (prim is None or not prim.recompute or prim.effectful or value in outputs
            or not 2 <= len(readers) <= MAX_RECOMPUTE_READERS):
        return False
    stored = len({i for i in value.inputs if i.size == value.size and i.op not in ("const", "broadcast_to")})
    if stored > 1 and len(readers) * stored >= stored + 1 + len(readers):
        return False         # the copies would read more than storing it reads and writes
    moves = any(epoch[r] != epoch[value] for r in readers)
    if moves and any(reads_written(i, written) for i in value.inputs):
        return False         # a copy after the write would read the new value
    for r in readers:
        domain = r.inputs[0].shape if reduction_of(r) is not None else r.shape
        if not (_fusible(r) or reduction_of(r) is not None) or domain != value.shape:
            return False
    return True


def written_arrays(graph) -> set:
    """The arrays some node of the graph writes in place (assign's destinations)."""
    return {n.inputs[0] for n in graph.nodes if getattr(PRIMITIVES.get(n.op), "writes_input", False)}


def reads_written(node, written) -> bool:
    """Whether node is an array some op writes, or a view of one (a reshape, a
    transpose, a broadcast of it: reading it reads the written memory)."""
    while True:
        if node in written:
            return True
        prim = PRIMITIVES.get(node.op)
        if prim is None or not prim.view or not node.inputs:
            return False
        node = node.inputs[0]


def fuse_elementwise(graph):
    users = graph.uses()
    outputs = set(graph.outputs)
    epoch = write_epochs(graph)
    group_of: dict = {}
    groups = []
    for root in reversed(graph.nodes):
        reduces = reduction_of(root) is not None
        if root in group_of or not (_fusible(root) or reduces):
            continue
        # the shape the group's elementwise members compute: a reduction's input's
        domain = root.inputs[0].shape if reduces else root.shape
        members = {root}
        stack = [root]
        while stack:
            n = stack.pop()
            for i in n.inputs:
                if (i in members or i in group_of or not _fusible(i) or i in outputs
                        or i.shape != domain or epoch[i] != epoch[root]):
                    continue
                if all(u in members for u in users.get(i, ())):
                    members.add(i)
                    stack.append(i)
        if len(members) >= MIN_GROUP and _reads_an_array(members):
            for m in members:
                group_of[m] = root
            groups.append((root, members))
        else:
            group_of[root] = None
    if not groups:
        return graph
    replaced = {}
    for root, members in groups:
        replaced[root] = _make_fused(graph, root, members)
    new_nodes = []
    for n in graph.nodes:
        owner = group_of.get(n)
        if owner is None:
            new_nodes.append(n)
        elif n is owner:
            new_nodes.append(replaced[n])
    return _substitute(graph, new_nodes, replaced)


def _substitute(graph, nodes, replaced):
    """graph with `nodes` as its nodes, every use of a key of `replaced` (outputs,
    inputs of nodes) made a use of its value."""
    graph.nodes = nodes
    graph.outputs = [replaced.get(o, o) for o in graph.outputs]
    for n in graph.nodes:
        n.inputs = [replaced.get(i, i) for i in n.inputs]
    return graph


def _reads_an_array(members):
    """A group of constants only is left to folding (a fused kernel needs an input)."""
    return any(i not in members and not (i.op == "const" and i.size == 1)
               for n in members for i in n.inputs)


def _make_fused(graph, root, members):
    order = [n for n in graph.nodes if n in members]
    body = Graph("fused")
    body.made_by = "fuse_elementwise"  # named by codegen's internal errors
    env: dict = {}
    ext_inputs = []
    for n in order:
        for i in n.inputs:
            if i in members or i in env:
                continue
            if i.op == "const" and i.size == 1:
                env[i] = body.add_const(i.value)
            else:
                env[i] = body.add_input(i.shape, i.dtype)
                ext_inputs.append(i)
        env[n] = body.add_node(n.op, [env[i] for i in n.inputs], n.attrs, n.shape, n.dtype, n.loc)
    body.outputs = [env[root]]
    return Node("fused", ext_inputs, {"body": body}, root.shape, root.dtype, root.loc)


def fuse_lone_ops(graph):
    """An elementwise op or a reduction that fusion left alone (a value several
    groups read, an RNN cell's tanh(c); a BatchNorm's sum of a convolution's
    output, a bias gradient) as a fused group of its own: a kernel of the
    backend's, not the library's.  A CPU pass: the C kernels run inside the
    segments' driver calls, where a NumPy call between them cut a step's
    segment in two and cost a Python dispatch (an LSTM step: 55 of them), and
    the C row reduction (per-lane accumulators) sums 2-2.5x faster than
    NumPy's pairwise sum over a channel's values.  Only in a graph that builds
    fused kernels anyway: there a group more joins the same build, where alone
    it would be a C build of its own (0.1-0.2 s) for one library call."""
    if not any(n.op == "fused" for n in graph.nodes):
        return graph
    replaced = {}
    for n in graph.nodes:
        if (n.op != "fused" and (_fusible(n) or reduction_of(n) is not None) and n.inputs
                and _reads_an_array([n])):
            replaced[n] = _make_fused(graph, n, {n})
    if not replaced:
        return graph
    return _substitute(graph, [replaced.get(n, n) for n in graph.nodes], replaced)
