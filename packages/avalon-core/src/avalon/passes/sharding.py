"""Batch splitting: can a compiled step run as one thread per core, each on its
share of the batch?

On the CPU the fastest schedule found for a training step is one thread per
core, each running the whole step on its share of the batch with a
single-threaded BLAS, and the per-shard results summed (gradients) or joined
(per-example outputs).  `split_batch` finds out, by propagating a sharding
through the graph, whether a graph can run that way:

* batch inputs are sharded along axis 0: ("S", axis, stride) says the batch is
  a factor of that axis whose consecutive entries lie `stride` apart (1: the
  batch is the axis, or its innermost factor after a reshape merged axes);
* values that do not depend on them are replicated ("R");
* a sum over the sharded axis gives a partial sum ("P") that only linear ops
  may touch (scaling by a replicated value, adding partials, reshaping): the
  shards' partials are added at the end;
* broadcasts, fills and random draws whose shape has the batch size on an axis
  become sharded on that axis (their values do not depend on the position);
* a write into an input (assign: BatchNorm's running statistics) of a
  replicated value is deferred: every shard computes the value and reads the
  written array through it, and the caller writes it once all shards are done
  (ShardPlan.writes), so no shard ever reads an array another one is writing.

What each op does is its primitive's sharding rule, declared in its
registration block (avalon.ops._sharding explains the rules).  Anything else
(a max over the batch, an op without a sharding rule reading a sharded value)
leaves the graph unsplit.  Partial sums used non-linearly (batch statistics
mixed back into per-example values, as in BatchNorm) are summed across the
threads (an all-reduce, a barrier) right where the sum that made them is, as
long as the step has enough work per barrier (ELEMENTS_PER_REDUCTION).  The
shard graph is the original with every sharded shape divided by the number of
shards; constants such as the 1/N of a mean are kept,
which is exactly what makes the partial sums add up.  The result is verified
with Graph.check().

This is analysis only: avalon.runtime.threads runs the plans.
"""
from __future__ import annotations

import logging

from ..errors import GraphError
from ..graph import Graph, Node
from ..ops._sharding import P, R, S, WITHOUT_RULE, NeedsReduce, NoSplit
from ..primitive import PRIMITIVES, defprim
from .updates import _destinations, _own_computation, _view_roots, elementwise_node

__all__ = ["split_batch", "split_components", "ShardPlan", "allreduce_sum_p", "R", "P", "S", "NoSplit",
           "NeedsReduce", "MIN_SHARD_ELEMENTS", "MAX_REDUCTIONS", "ELEMENTS_PER_REDUCTION"]

log = logging.getLogger("avalon.sharding")

MIN_SHARD_ELEMENTS = 400_000   # below this much sharded work a step is not worth two threads
MAX_REDUCTIONS = 8             # all-reduces (thread barriers) any split step may contain...
ELEMENTS_PER_REDUCTION = 1_000_000  # ...and one more per this much sharded work (a barrier costs ~0.1 ms)


def _allreduce_rule(x, *, key):
    return tuple(x.shape), x.dtype


allreduce_sum_p = defprim("allreduce_sum", shape=_allreduce_rule, impl=None, effectful=True,
                          doc="sum of a value over the shards of a split step (a barrier between "
                              "the engine's threads); put in by avalon.passes.sharding")


class ShardPlan:
    """How to run a graph in shards: the shard graph, the batch inputs, and
    how to combine each output ("S", axis) / P / R."""

    def __init__(self, shard_graph, batch_input_index, output_states, shards, writes=(), tail=None):
        self.graph = shard_graph
        self.batch_input_index = batch_input_index
        self.output_states = output_states
        self.shards = shards
        # deferred writes into inputs: (input index, shard graph output index), in
        # graph order; those outputs follow the graph's own (output_states)
        self.writes = list(writes)
        self.tail = tail            # Tail: the writes run once after the shards, or None


class Tail:
    """The graph's writes into its inputs, with the values only they use, run
    once after the shards on the combined results (an optimizer's update traced
    with its gradient: in the shards each gradient would be summed across them
    at a thread barrier before its update could read it).  `graph` is their own
    graph; `sources` says what each of its inputs is: ("arg", k), the step's
    argument k, or ("value", j), the combined shard output j; the shard
    graph's first `n_outputs` outputs are the step's own."""

    def __init__(self, graph, sources, n_outputs):
        self.graph, self.sources, self.n_outputs = graph, sources, n_outputs


# -- propagation ------------------------------------------------------------------------------

class _Propagation:
    """One propagation of the sharding through a graph: the context sharding
    rules get (`n`, `sub_graph`), and the states of the sub-graphs met."""

    def __init__(self, n):
        self.n = n
        self.sub_states: dict = {}  # sub-graph (a fused body) -> its nodes' states

    def state(self, node, states):
        prim = PRIMITIVES.get(node.op)
        if prim is None:
            raise NoSplit(f"unknown op {node.op}")
        if prim.writes_input:
            return _deferred_write(node, states)
        return prim.rule("sharding", WITHOUT_RULE)(node, states, self)

    def sub_graph(self, node, body, states):
        """The states of the nodes of `body`, a sub-graph `node` holds whose
        inputs are node's operands (in `states`)."""
        st = dict(zip(body.inputs, states))
        outer = dict(zip(body.inputs, node.inputs))
        for b in body.nodes:
            if b.op == "input":
                continue
            try:
                st[b] = R if b.op == "const" else self.state(b, [st[i] for i in b.inputs])
            except NeedsReduce as e:
                # a partial sum inside comes linearly from partial operands:
                # summing those over the shards sums it too
                source = _partial_source(e.node, st, outer)
                if source is None:
                    raise NoSplit(f"a partial sum used non-linearly inside {node.op}") from None
                raise NeedsReduce(source) from None
        self.sub_states[body] = st
        return st


def _deferred_write(node, states):
    """A write into an input (dst, src) runs after the shards (see the module
    docstring): the value written must be the same in every shard.  Only an
    assign's write is deferred: a fused_update writes several inputs from one
    body, and has no single value to hand to the caller."""
    if node.op != "assign":
        raise NoSplit(f"{node.op} writes {node.attrs.get('n_dest', 1)} inputs in place (only an assign's "
                      "write is deferred past the shards)")
    if P in states:
        raise NeedsReduce(node.inputs[states.index(P)])
    if any(s != R for s in states):
        raise NoSplit("writes into an input a value that differs between the shards")
    dst, src = node.inputs[:2]
    if _written_input(dst) is None or tuple(src.shape) != tuple(dst.shape) or src.dtype != dst.dtype:
        raise NoSplit("writes into an input a value of another shape or dtype")
    return R


def _written_input(dst):
    """The graph input a write's destination is: the input itself, or (a buffer
    written twice in one step) the value of an earlier write into it."""
    while getattr(PRIMITIVES.get(dst.op), "writes_input", False):
        dst = dst.inputs[0]
    return dst if dst.op == "input" else None


def _partial_source(node, st, outer):
    """The first sub-graph input in state P that `node` is computed from."""
    stack, seen = [node], set()
    while stack:
        b = stack.pop()
        if b in outer:
            if st[b] == P:
                return outer[b]
            continue
        if b in seen:
            continue
        seen.add(b)
        stack.extend(i for i in b.inputs if st.get(i) == P)
    return None


def _propagate(graph, batch_inputs, n, reduced):
    """States of every node, and the propagation that found them.  Partial sums
    used non-linearly are summed over the shards (they join `reduced` and count
    as replicated from there on)."""
    while True:
        ctx = _Propagation(n)
        try:
            return _propagate_once(graph, batch_inputs, ctx, reduced), ctx
        except NeedsReduce as e:
            if e.node in reduced:
                raise NoSplit(f"a partial sum ({e.node.op}) is used non-linearly even once summed") from None
            reduced.add(e.node)


def _propagate_once(graph, batch_inputs, ctx, reduced):
    state = {}
    for node in graph.nodes:
        if node.op == "input":
            state[node] = S(0) if node in batch_inputs else R
        elif node.op == "const":
            state[node] = R
        else:
            try:
                state[node] = ctx.state(node, [state[i] for i in node.inputs])
            except NeedsReduce as e:
                raise NeedsReduce(_partial_root(e.node, state)) from None
            if node in reduced:
                if state[node] == R:
                    # made from partial sums reduced since it was chosen: already whole
                    reduced.discard(node)
                    continue
                if state[node] != P:
                    raise NoSplit("an all-reduce of a value that is not a partial sum")
                state[node] = R
    return state


def _partial_root(node, state):
    """Where to sum a partial sum over the shards: back up the chain of ops
    that carried it linearly from one partial operand (reshapes, transposes,
    scalings) to the op that made it, so that one all-reduce serves every
    value derived from it."""
    while True:
        partial = [i for i in node.inputs if state.get(i) == P]
        if len(partial) != 1:
            return node
        node = partial[0]


# -- the shard graph --------------------------------------------------------------------------

def _shard_copy(graph, state, shards, sub_states, reduced=()):
    """A copy of graph with every sharded shape (and shape attribute) divided,
    and an all-reduce after each partial sum that is used non-linearly."""
    shard = graph.copy()
    pairs = list(zip(graph.nodes, shard.nodes))
    if reduced:
        _insert_allreduces(graph, shard, reduced)
    for old, new in pairs:
        _shard_sub_graphs(old, new, shards, sub_states)
        s = state[old]
        if s not in (R, P):
            _divide(new, s[1], shards)
    return shard


def _shard_sub_graphs(old, new, shards, sub_states):
    """A node holding a sub-graph (a fused group's body) gets the sub-graph's shard copy."""
    for key, value in old.attrs.items():
        if isinstance(value, Graph) and value in sub_states:
            new.attrs = dict(new.attrs, **{key: _shard_copy(value, sub_states[value], shards, sub_states)})


def _divide(node, axis, shards):
    """`node` computes 1/shards of its output along `axis`: its shape, and the
    attributes that describe it, say so."""
    full_shape = node.shape
    shape = list(full_shape)
    shape[axis] //= shards
    node.shape = tuple(shape)
    prim = PRIMITIVES.get(node.op)
    if prim is None:  # a graph input
        return
    if prim.output_shape_attr:
        node.attrs = dict(node.attrs, **{prim.output_shape_attr: node.shape})
    shard_attrs = prim.rule("shard_attrs", None)
    if shard_attrs is not None:
        node.attrs = shard_attrs(node, full_shape, axis)


def _insert_allreduces(graph, shard, reduced):
    mapping = dict(zip(graph.nodes, shard.nodes))  # shard was just copied from graph
    sums = {}
    for k, old in enumerate(sorted(reduced, key=graph.nodes.index)):
        new = mapping[old]
        sums[new] = Node("allreduce_sum", [new], {"key": k}, new.shape, new.dtype, new.loc)
    nodes = []
    for m in shard.nodes:
        m.inputs = [sums.get(i, i) for i in m.inputs]
        nodes.append(m)
        if m in sums:
            nodes.append(sums[m])
    # the all-reduce itself reads the partial sum
    for new, red in sums.items():
        red.inputs = [new]
    shard.nodes = nodes
    shard.outputs = [sums.get(o, o) for o in shard.outputs]


# -- the analysis -----------------------------------------------------------------------------

def split_batch(graph, batch_inputs, shards: int):
    """A ShardPlan for running `graph` in `shards` pieces along the batch, or
    None when the graph cannot be split (or is too small to gain)."""
    n = _batch_size(batch_inputs, shards)
    if n is None:
        return None
    whole, (graph, tail) = graph, _after_the_shards(graph)
    reduced: set = set()
    try:
        state, ctx = _propagate(graph, set(batch_inputs), n, reduced)
        _check_joinable(graph, state, n)
        if tail is not None:
            if not any(st not in (R, P) for node, st in state.items() if node.op not in ("input", "const")):
                raise NoSplit("nothing to split but writes into inputs")
            bad = [graph.outputs[j] for kind, j in tail.sources if kind == "value"
                   and state[graph.outputs[j]] not in (R, P)]
            if bad:
                raise NoSplit(f"writes into an input a value that differs between the shards "
                              f"({bad[0].op} {tuple(bad[0].shape)}: {state[bad[0]]})")
        _check_worthwhile(sharded_work(state, ctx), reduced)
    except NoSplit as e:
        log.debug("%s is not split across threads: %s", whole.name, e)
        return None
    shard = _shard_copy(graph, state, shards, ctx.sub_states, reduced)
    writes = _defer_writes(shard)
    try:
        shard.check()
    except GraphError as e:
        log.debug("%s is not split across threads: the shard graph is invalid: %s", graph.name, e)
        return None
    index = [k for k, i in enumerate(graph.inputs) if i in batch_inputs]
    return ShardPlan(shard, index, [state[o] for o in graph.outputs] + [R] * len(writes), shards, writes, tail)


def _after_the_shards(graph):
    """(the graph without its writes, their Tail), when every write into an input
    and the values only it uses can run after the shards: nothing else reads
    what they compute or, after a write, the array it wrote; else (graph, None)."""
    writes = [n for n in graph.nodes if getattr(PRIMITIVES.get(n.op), "writes_input", False)]
    if not writes:
        return graph, None
    users = graph.uses()
    tail: set = set()
    for w in writes:
        # elementwise work only: products and sums over the batch stay in the shards
        tail |= _own_computation(w, users, admit=elementwise_node)
    if any(u not in tail for t in tail for u in users.get(t, ())) or any(o in tail for o in graph.outputs):
        return graph, None
    root = _view_roots(graph)
    rest = [n for n in graph.nodes if n not in tail]
    position = {n: k for k, n in enumerate(graph.nodes)}
    for w in writes:
        written = {root.get(d, d) for d in _destinations(w)}
        if any(position[n] > position[w] and any(root.get(i, i) in written for i in n.inputs) for n in rest):
            return graph, None      # read after the write: the shards would read it unwritten
    head = Graph(graph.name)
    head.inputs, head.nodes = list(graph.inputs), rest
    for attr in ("in_tree", "out_tree"):
        if attr in graph.__dict__:
            setattr(head, attr, getattr(graph, attr))
    t = Graph(graph.name + "_tail")
    made, sources, extra = {}, [], []
    for node in (n for n in graph.nodes if n in tail):
        for i in node.inputs:
            if i in made or i in tail:
                continue
            if i.op == "const":
                made[i] = t.add_const(i.value, i.loc)
                continue
            made[i] = t.add_input(i.shape, i.dtype)
            if i.op == "input":
                sources.append(("arg", graph.inputs.index(i)))
            else:
                sources.append(("value", len(graph.outputs) + len(extra)))
                extra.append(i)
        made[node] = t.add_node(node.op, [made[i] for i in node.inputs], node.attrs, node.shape, node.dtype,
                                node.loc)
    t.outputs = [made[w] for w in writes]
    head.outputs = list(graph.outputs) + extra
    return head, Tail(t, sources, len(graph.outputs))


def _defer_writes(shard):
    """Each write into an input becomes an extra output of the shard graph (the
    caller writes it after the shards); later reads of it take the value."""
    writes, value, nodes = [], {}, []
    for node in shard.nodes:
        if getattr(PRIMITIVES.get(node.op), "writes_input", False):
            dst, src = node.inputs[0], value.get(node.inputs[1], node.inputs[1])
            value[node] = src
            writes.append((shard.inputs.index(_written_input(dst)), len(shard.outputs) + len(writes)))
            continue
        node.inputs = [value.get(i, i) for i in node.inputs]
        nodes.append(node)
    shard.nodes = nodes
    shard.outputs = [value.get(o, o) for o in shard.outputs] + list(value.values())  # in graph order
    return writes


def _batch_size(batch_inputs, shards):
    """The batch size every batch input shares, when it divides into shards of two or more."""
    if shards < 2 or not batch_inputs:
        return None
    sizes = {i.shape[0] for i in batch_inputs if i.ndim}
    if len(sizes) != 1:
        return None
    n = sizes.pop()
    if n < 2 * shards or n % shards:
        return None
    return n


def _check_joinable(graph, state, n):
    for o in graph.outputs:
        st = state[o]
        if st not in (R, P) and o.shape[st[1]] != n * st[2]:
            raise NoSplit("the batch is not the outer factor of an output's axis: shards cannot be joined")


def sharded_work(state, ctx) -> int:
    """Elements the sharded values hold, counted inside fused groups too, so
    that fusing (or recomputing a value in several groups) does not shrink it."""
    work = 0
    for node, s in state.items():
        if s in (R, P):
            continue
        body = node.attrs.get("body") if node.op == "fused" else None
        inner = ctx.sub_states.get(body) if body is not None else None
        if inner is None:
            work += node.size
        else:
            work += sum(b.size for b, bs in inner.items() if b.op not in ("input", "const") and bs not in (R, P))
    return work


def _check_worthwhile(work, reduced):
    if work < MIN_SHARD_ELEMENTS:
        raise NoSplit(f"{work} sharded elements are too few to gain from threads")
    allowed = max(MAX_REDUCTIONS, work // ELEMENTS_PER_REDUCTION)
    if len(reduced) > allowed:
        raise NoSplit(f"{len(reduced)} partial sums used non-linearly: more thread barriers than "
                      f"{work} sharded elements pay for ({allowed})")


# -- independent parts of a graph across threads ---------------------------------------------

def split_components(graph, parts: int = 2):
    """Subgraphs that share no intermediate value (an optimizer's update of each
    parameter, say), grouped into `parts` groups of about equal work; None when
    the graph has fewer independent parts or too little work to gain, or holds
    a collective (its processes must all run it in one order: one thread)."""
    if any(getattr(PRIMITIVES.get(n.op), "collective", False) for n in graph.nodes):
        return None
    groups = _independent_groups(graph)
    if len(groups) < parts:
        return None
    work = {k: sum(n.size for n in v) for k, v in groups.items()}
    if sum(work.values()) < MIN_SHARD_ELEMENTS:
        return None
    bins = [[] for _ in range(parts)]
    loads = [0] * parts
    for k in sorted(groups, key=lambda k: -work[k]):
        j = loads.index(min(loads))
        bins[j].extend(groups[k])
        loads[j] += work[k]
    if min(loads) < 0.2 * max(loads):
        return None
    return [_subgraph(graph, set(members)) for members in bins]


def _independent_groups(graph):
    """The nodes of graph grouped by connection (through values, and through an
    input one node writes and another reads)."""
    parent = {}

    def find(a):
        while parent.setdefault(a, a) is not a:
            parent[a] = parent.setdefault(parent[a], parent[a])
            a = parent[a]
        return a

    def union(a, b):
        ra, rb = find(a), find(b)
        if ra is not rb:
            parent[ra] = rb

    body = [n for n in graph.nodes if n.op not in ("input", "const")]
    for n in body:
        find(n)
        for i in n.inputs:
            if i.op not in ("input", "const"):
                union(n, i)
    # an input written by one part (assign) must not be read by another
    written = {n.inputs[0]: n for n in body if getattr(PRIMITIVES.get(n.op), "writes_input", False)}
    for n in body:
        for i in n.inputs:
            if i in written:
                union(n, written[i])
    groups: dict = {}
    for n in body:
        groups.setdefault(find(n), []).append(n)
    return groups


def _subgraph(graph, keep):
    g = Graph(graph.name)
    g.inputs = list(graph.inputs)
    g.nodes = [n for n in graph.nodes if n.op in ("input", "const") or n in keep]
    g.outputs = [o for o in graph.outputs if o in keep or o.op in ("input", "const")]
    return g
