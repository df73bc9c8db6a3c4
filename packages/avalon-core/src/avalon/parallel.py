"""Engine-owned threads: a compiled step split across the batch.

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
  become sharded on that axis (their values do not depend on the position).

Anything else (a max over the batch, batch statistics mixed back into
per-example values as in BatchNorm) leaves the graph unsplit.  The shard graph
is the original with every sharded shape divided by the number of shards;
constants such as the 1/N of a mean are kept, which is exactly what makes the
partial sums add up.  The result is verified with Graph.check().
"""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from .errors import GraphError
from .primitive import PRIMITIVES, defprim
from .threadsafe import private_backend

R, P = ("R",), ("P",)

# attributes that hold a node's own output shape
SHAPE_ATTRS = {"reshape": "shape", "broadcast_to": "shape", "full": "shape", "random_uniform": "shape",
               "random_normal": "shape", "conv_input_grad": "input_shape", "avg_pool_grad": "input_shape",
               "take_along_axis_grad": "shape", "col2im_csn": "input_shape"}
LINEAR_UNARY = {"neg", "cast", "reshape", "transpose", "sum", "broadcast_to"}
# ops over (N, C, ...) data: which operands carry the batch on axis 0 (the rest are weights)
BATCH_AXIS0_OPS = {"conv": (0,), "conv_input_grad": (0,), "conv_transpose": (0,), "max_pool": (0,),
                   "max_pool_grad": (0, 1), "avg_pool": (0,), "avg_pool_grad": (0,)}

# the batch-innermost forms (layout pass): the batch is the last axis of activations
BATCH_LAST_OPS = {"im2col_csn": (0,), "max_pool_csn": (0,), "max_pool_csn_grad": (0, 1, 2)}

MIN_SHARD_ELEMENTS = 400_000   # below this much sharded work a step is not worth two threads


class _NoSplit(Exception):
    pass


class _NeedsReduce(Exception):
    """A partial sum is used non-linearly: it must be summed over the shards
    (an all-reduce between the threads) before that use."""

    def __init__(self, node):
        super().__init__(node)
        self.node = node


def _allreduce_rule(x, *, key):
    return tuple(x.shape), x.dtype


allreduce_sum_p = defprim("allreduce_sum", shape=_allreduce_rule, impl=None, effectful=True,
                          doc="sum of a value over the shards of a split step (a barrier between "
                              "the engine's threads); put in by avalon.parallel")


def shard_count() -> int:
    env = os.environ.get("AVALON_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1)) if (os.cpu_count() or 1) >= 2 else 1


def _S(axis, stride=1):
    return ("S", axis, stride)


MAX_REDUCTIONS = 8   # all-reduces (thread barriers) one step may contain


def _propagate(graph, batch_inputs, n, reduced=None):
    """States of every node.  Partial sums used non-linearly are summed over
    the shards (they join `reduced` and count as replicated from there on)."""
    reduced = set() if reduced is None else reduced
    while True:
        try:
            return _propagate_once(graph, batch_inputs, n, reduced)
        except _NeedsReduce as e:
            if e.node in reduced or len(reduced) >= MAX_REDUCTIONS:
                raise _NoSplit("too many partial sums used non-linearly") from None
            reduced.add(e.node)


def _propagate_once(graph, batch_inputs, n, reduced):
    state = {}
    for node in graph.nodes:
        if node.op == "input":
            state[node] = _S(0) if node in batch_inputs else R
        elif node.op == "const":
            state[node] = R
        else:
            state[node] = _rule(node, [state[i] for i in node.inputs], n)
            if node in reduced:
                if state[node] != P:
                    raise _NoSplit("an all-reduce of a value that is not a partial sum")
                state[node] = R
    return state


def _elementwise(node, states, n):
    if all(s == R for s in states):
        return R
    if any(s == P for s in states):
        op = node.op
        ok = (op in ("mul", "div") and states[0] == P and all(s == R for s in states[1:])) or \
             (op == "mul" and states[1] == P and states[0] == R) or \
             (op in ("add", "sub") and all(s == P for s in states)) or \
             (op in LINEAR_UNARY and len(states) == 1)
        if not ok:
            raise _NeedsReduce(next(i for i, st in zip(node.inputs, states) if st == P))
        return P
    axis = stride = None
    for i, s in zip(node.inputs, states):
        if s == R:
            continue
        a = s[1] + (node.ndim - i.ndim)
        if i.shape[s[1]] != node.shape[a]:
            raise _NoSplit("broadcast along the batch axis")
        if axis is not None and (axis, stride) != (a, s[2]):
            raise _NoSplit("operands sharded on different axes")
        axis, stride = a, s[2]
    for i, s in zip(node.inputs, states):  # replicated operands must not vary along the batch axis
        if s == R:
            k = axis - (node.ndim - i.ndim)
            if k >= 0 and i.shape[k] != 1:
                raise _NoSplit(f"{node.op}: a replicated operand spans the batch axis")
    return _S(axis, stride)


def _created_shard(node, n):
    for k, s in enumerate(node.shape):
        if s == n:
            return _S(k)
    return R


def _rule(node, states, n):
    op = node.op
    prim = PRIMITIVES.get(op)
    if prim is None:
        raise _NoSplit(f"unknown op {op}")
    if prim.writes_input:
        raise _NoSplit("writes into an input")
    if op in ("full", "random_uniform", "random_normal"):
        return _created_shard(node, n)
    if op == "broadcast_to":
        (s,) = states
        if s == P:
            raise _NeedsReduce(node.inputs[0])
        if s == R:
            src = node.inputs[0]
            lead = node.ndim - src.ndim
            for k, size in enumerate(node.shape):
                if size == n and (k < lead or src.shape[k - lead] == 1):
                    return _S(k)
            return R
        return _S(s[1] + node.ndim - node.inputs[0].ndim, s[2])
    if op == "fused":
        return _fused_rule(node, states, n)
    if prim.elementwise:
        return _elementwise(node, states, n)
    if P in states and op not in ("sum", "max", "min", "argmax", "argmin", "reshape", "transpose", "matmul"):
        raise _NeedsReduce(node.inputs[states.index(P)])
    if all(s == R for s in states):
        return R
    if op in ("sum", "max", "min", "argmax", "argmin"):
        (s,) = states
        if s == P:
            if op != "sum":
                raise _NeedsReduce(node.inputs[0])
            return P
        axes, keep = node.attrs["axes"], node.attrs["keepdims"]
        if s[1] in axes:
            if op != "sum":
                raise _NoSplit(f"{op} over the batch axis")
            return P
        return _S(s[1] if keep else s[1] - sum(1 for a in axes if a < s[1]), s[2])
    if op == "reshape":
        (s,) = states
        return P if s == P else _reshape_rule(node, s, n)
    if op == "transpose":
        (s,) = states
        return P if s == P else _S(list(node.attrs["perm"]).index(s[1]), s[2])
    if op == "matmul":
        return _matmul_rule(node, states, n)
    if op in BATCH_AXIS0_OPS:
        data = BATCH_AXIS0_OPS[op]
        if all((s == _S(0)) if k in data else (s == R) for k, s in enumerate(states)):
            return _S(0)
        raise _NoSplit(f"{op}: sharded weight or unsharded data")
    if op == "conv_weight_grad":
        if states == [_S(0), _S(0)]:
            return P
        raise _NoSplit("conv_weight_grad layout")
    if op in BATCH_LAST_OPS:
        data = BATCH_LAST_OPS[op]
        for k, s in enumerate(states):
            i = node.inputs[k]
            want = _S(i.ndim - 1) if k in data else R
            if s != want or (k in data and i.shape[-1] != n):
                raise _NoSplit(f"{op}: the batch must be the last axis of its activations")
        # im2col_csn puts the batch innermost in axis 1 of its (C*K, out*N) columns
        return _S(1) if op == "im2col_csn" else _S(node.ndim - 1)
    if op == "col2im_csn":
        if states[0] == _S(1):
            return _S(node.ndim - 1)
        raise _NoSplit("col2im_csn of columns not sharded by their innermost factor")
    if op == "take_along_axis":
        if states[0] == states[1] and states[0] != P and node.attrs["axis"] != states[0][1]:
            return states[0]
        raise _NoSplit("take_along_axis along the batch axis")
    if op == "take_along_axis_grad":
        if states[0] == states[1] and states[0] != P and node.attrs["axis"] != states[0][1]:
            return states[0]
        raise _NoSplit("take_along_axis_grad along the batch axis")
    raise _NoSplit(f"no sharding rule for {op}")


def _fused_rule(node, states, n):
    """A fused group is sharded as its body is: propagate through the body."""
    body = node.attrs["body"]
    st = dict(zip(body.inputs, states))
    outer = dict(zip(body.inputs, node.inputs))
    for b in body.nodes:
        if b.op == "input":
            continue
        try:
            st[b] = R if b.op == "const" else _rule(b, [st[i] for i in b.inputs], n)
        except _NeedsReduce as e:
            # a partial sum inside the group comes linearly from partial inputs:
            # summing those inputs over the shards sums it too
            source = _partial_source(e.node, st, outer)
            if source is None:
                raise _NoSplit("a partial sum used non-linearly inside a fused group") from None
            raise _NeedsReduce(source) from None
    _BODY_STATES[body] = st
    return st[body.outputs[0]]


def _partial_source(node, st, outer):
    """The first group input in state P that `node` is computed from."""
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


_BODY_STATES: dict = {}  # fused body -> its nodes' states, from the latest propagation


def _shard_copy(graph, state, shards, reduced=()):
    """A copy of graph with every sharded shape (and shape attribute) divided,
    and an all-reduce after each partial sum that is used non-linearly."""
    shard = graph.copy()
    pairs = list(zip(graph.nodes, shard.nodes))
    if reduced:
        _insert_allreduces(graph, shard, reduced)
    for old, new in pairs:
        s = state[old]
        if new.op == "fused":
            body = old.attrs["body"]
            new.attrs = dict(new.attrs, body=_shard_copy(body, _BODY_STATES[body], shards))
        if s in (R, P):
            continue
        shape = list(new.shape)
        shape[s[1]] //= shards
        full_shape, new.shape = new.shape, tuple(shape)
        if new.op in SHAPE_ATTRS:
            new.attrs = dict(new.attrs, **{SHAPE_ATTRS[new.op]: new.shape})
        if new.op.startswith("random_"):
            new.attrs = dict(new.attrs, full_shape=full_shape, shard_axis=s[1])
    return shard


def _matmul_rule(node, states, n):
    a, b = node.inputs
    sa, sb = states
    if P in states:
        if (sa == P and sb == R) or (sa == R and sb == P):
            return P
        raise _NeedsReduce(a if sa == P else b)
    nd = node.ndim
    if sb == R:  # rows of a (or its batch dims) are sharded
        ax = sa[1]
        if ax == a.ndim - 1:
            raise _NoSplit("matmul contracts a sharded axis against a replicated one")
        return _S(ax + nd - a.ndim, sa[2])
    if sa == R:
        ax = sb[1]
        if ax == b.ndim - 2:
            raise _NoSplit("matmul contracts a sharded axis against a replicated one")
        return _S(ax + nd - b.ndim, sb[2])
    if sa[1] == a.ndim - 1 and sb[1] == b.ndim - 2 and sa[2] == sb[2]:
        return P  # contraction over the batch: a weight gradient
    if sa[1] + nd - a.ndim == sb[1] + nd - b.ndim and sa[1] < a.ndim - 2 and sa[2] == sb[2]:
        return _S(sa[1] + nd - a.ndim, sa[2])  # batched matmul over the batch axis
    raise _NoSplit("matmul sharding")


def _reshape_rule(node, s, n):
    """Where the batch factor lands when a reshape splits or merges axes."""
    src = node.inputs[0]
    flat = s[2] * int(np.prod(src.shape[s[1] + 1:], dtype=np.int64))  # flat distance of batch entries
    after = 1  # product of the output axes after axis b
    for b in range(node.ndim - 1, -1, -1):
        size = node.shape[b]
        if after <= flat < after * size:
            stride = flat // after
            if flat % after == 0 and size % (stride * n) == 0:
                return _S(b, stride)
            break
        after *= size
    raise _NoSplit("reshape splits the batch factor")


class ShardPlan:
    """How to run a graph in shards: the shard graph, the batch inputs, and
    how to combine each output ("S", axis) / P / R."""

    def __init__(self, shard_graph, batch_input_index, output_states, shards):
        self.graph = shard_graph
        self.batch_input_index = batch_input_index
        self.output_states = output_states
        self.shards = shards


def _insert_allreduces(graph, shard, reduced):
    from .graph import Node
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


def split_batch(graph, batch_inputs, shards: int | None = None):
    """A ShardPlan for running `graph` in `shards` pieces along the batch, or
    None when the graph cannot be split (or is too small to gain)."""
    shards = shard_count() if shards is None else shards
    if shards < 2 or not batch_inputs:
        return None
    sizes = {i.shape[0] for i in batch_inputs if i.ndim}
    if len(sizes) != 1:
        return None
    n = sizes.pop()
    if n < 2 * shards or n % shards:
        return None
    reduced: set = set()
    try:
        state = _propagate(graph, set(batch_inputs), n, reduced)
    except _NoSplit:
        _BODY_STATES.clear()
        return None
    for o in graph.outputs:
        st = state[o]
        if st not in (R, P) and o.shape[st[1]] != n * st[2]:
            _BODY_STATES.clear()
            return None  # the batch is not the outer factor of that axis: shards cannot be joined
    work = sum(node.size for node, s in state.items() if s not in (R, P))
    if work < MIN_SHARD_ELEMENTS:
        _BODY_STATES.clear()
        return None
    shard = _shard_copy(graph, state, shards, reduced)
    _BODY_STATES.clear()
    try:
        shard.check()
    except GraphError:
        return None
    index = [k for k, i in enumerate(graph.inputs) if i in batch_inputs]
    return ShardPlan(shard, index, [state[o] for o in graph.outputs], shards)


class ShardedFunction:
    """Runs a ShardPlan: one compiled copy of the shard graph per thread (each
    with its own buffers and random generator), results combined."""

    def __init__(self, plan, backend, name):
        from .codegen import generate
        self.plan = plan
        self.backend = backend
        self.copies = []
        self.reducers = {n.attrs["key"]: _Reducer(plan.shards) for n in plan.graph.nodes
                         if n.op == "allreduce_sum"}
        for index in range(plan.shards):
            b = private_backend(backend)
            b._shard_index, b._reducers = index, self.reducers
            self.copies.append((b, generate(plan.graph, b, name)))
        self.compiled = self.copies[0][1]
        self.graph, self.plan_memory = plan.graph, self.compiled.plan
        self.source = (f"# runs in {plan.shards} threads, each on 1/{plan.shards} of the batch; outputs "
                       f"combined as {[_describe(s) for s in plan.output_states]}\n" + self.compiled.source)
        self.fn = self.__call__
        self._pool = _workers(plan.shards - 1)

    def __call__(self, *args):
        plan = self.plan
        k = plan.shards
        random = self._draws_random()
        if random:
            # every shard replays the generator from where the unsplit step would
            # start, so the draws (and what follows) equal the unsplit step's
            state = self.backend._rng().bit_generator.state
            for b, _ in self.copies:
                b.rng = np.random.Generator(type(self.backend.rng.bit_generator)())
                b.rng.bit_generator.state = state
        per_shard = []
        for s in range(k):
            shard_args = list(args)
            for i in plan.batch_input_index:
                x = args[i]
                step = x.shape[0] // k
                shard_args[i] = x[s * step:(s + 1) * step]
            per_shard.append(shard_args)
        for r in self.reducers.values():
            r.ready()
        self._error = None
        try:
            results = self._pool.run([(self._guarded, (c.fn, a)) for (_, c), a in zip(self.copies, per_shard)])
        except threading.BrokenBarrierError:
            if self._error is not None:  # the thread that failed first says why
                raise self._error from None
            raise
        if random:
            self.backend.rng.bit_generator.state = self.copies[0][0].rng.bit_generator.state
        return tuple(self._combine(j, st, results) for j, st in enumerate(plan.output_states))

    def _guarded(self, fn, args):
        try:
            return fn(*args)
        except BaseException as e:
            if not isinstance(e, threading.BrokenBarrierError) and self._error is None:
                self._error = e
            for r in self.reducers.values():  # release the other threads waiting at a barrier
                r.abort()
            raise

    def _draws_random(self):
        return any(n.op.startswith("random_") for n in self.plan.graph.nodes)

    def _combine(self, j, st, results):
        xp = self.backend.xp
        if st == R:
            return results[0][j]
        if st == P:
            total = results[0][j]
            total = total.copy() if hasattr(total, "copy") else total
            for r in results[1:]:
                total = xp.add(total, r[j], out=total) if getattr(total, "ndim", 0) else total + r[j]
            return total
        return xp.concatenate([r[j] for r in results], axis=st[1])


class _Reducer:
    """The rendezvous of one all-reduce: each thread brings its partial sum and
    leaves with (a copy of) the total."""

    def __init__(self, shards):
        self.values = [None] * shards
        self.total = None
        self.barrier = threading.Barrier(shards)

    def ready(self):
        if self.barrier.broken:
            self.barrier.reset()

    def abort(self):
        self.barrier.abort()

    def reduce(self, index, value):
        self.values[index] = value
        if self.barrier.wait() == 0:
            total = self.values[0]
            for v in self.values[1:]:
                total = total + v
            self.total = total
        self.barrier.wait()
        return self.total.copy()


def _describe(state):
    return {R: "replicated", P: "sum"}.get(state, f"concat(axis={state[1]})" if state not in (R, P) else "")


_pools: dict = {}


def _workers(n):
    if n not in _pools:
        _pools[n] = _Workers(n)
    return _pools[n]


class _Workers:
    """n persistent worker threads; the calling thread runs the last task."""

    def __init__(self, n):
        self.lock = threading.Lock()
        self.tasks = [None] * n
        self.results = [None] * n
        self.go = [threading.Event() for _ in range(n)]
        self.done = [threading.Event() for _ in range(n)]
        for k in range(n):
            threading.Thread(target=self._loop, args=(k,), daemon=True).start()

    def _loop(self, k):
        while True:
            self.go[k].wait()
            self.go[k].clear()
            fn, args = self.tasks[k]
            try:
                self.results[k] = (True, fn(*args))
            except BaseException as e:  # re-raised in the caller
                self.results[k] = (False, e)
            self.done[k].set()

    def run(self, jobs):
        with self.lock:
            return self._run(jobs)

    def _run(self, jobs):
        n = len(self.tasks)
        for k in range(n):
            self.tasks[k] = jobs[k]
            self.done[k].clear()
            self.go[k].set()
        last_fn, last_args = jobs[n]
        try:
            mine = last_fn(*last_args)
        finally:
            # even when the caller's own share failed: a worker still running
            # this call's task must finish before the next call hands it another
            for k in range(n):
                self.done[k].wait()
        out = []
        for k in range(n):
            ok, value = self.results[k]
            if not ok:
                raise value
            out.append(value)
        return out + [mine]


class BlasThreads:
    """A compiled graph run with the backend's BLAS on `threads` threads (and
    back to one afterwards): for steps whose time is mostly a few large
    matrix products, where splitting the batch gains less."""

    def __init__(self, compiled, backend, threads):
        self.compiled, self.backend, self.threads = compiled, backend, threads
        self.graph, self.plan, self.source = compiled.graph, compiled.plan, (
            f"# BLAS on {threads} threads\n" + compiled.source)
        self.fn = self.__call__

    def __call__(self, *args):
        self.backend.set_blas_threads(self.threads)
        try:
            return self.compiled.fn(*args)
        finally:
            self.backend.set_blas_threads(1)


class Autotuned:
    """Several compiled schedules of one graph (split across threads or not,
    BLAS threads or not): the first calls time each in turn, then the fastest
    runs from there on.  Every call computes the same step, so the trial calls
    are real work."""

    WARMUP, TRIALS = 1, 3

    def __init__(self, candidates):
        self.candidates = candidates          # [(label, compiled)]
        self.calls = [0] * len(candidates)
        self.times = [[] for _ in candidates]
        self.choice = None
        self.fn = self.__call__

    def current(self):
        return self.candidates[self.choice if self.choice is not None else 0][1]

    graph = property(lambda self: self.current().graph)
    plan = property(lambda self: self.current().plan)
    source = property(lambda self: self.current().source)

    @property
    def label(self):
        return self.candidates[self.choice][0] if self.choice is not None else "(still timing)"

    def __call__(self, *args):
        if self.choice is not None:
            return self.candidates[self.choice][1].fn(*args)
        # one candidate after the other (not round-robin): a schedule that leaves
        # threads spinning (BLAS) must not slow the timing of the others, so it is last
        k = next(i for i in range(len(self.candidates)) if len(self.times[i]) < self.TRIALS)
        self.calls[k] += 1
        t0 = time.perf_counter()
        out = self.candidates[k][1].fn(*args)
        self.backend_sync()
        if self.calls[k] > self.WARMUP:
            self.times[k].append(time.perf_counter() - t0)
        if all(len(t) >= self.TRIALS for t in self.times):
            self.choice = min(range(len(self.candidates)), key=lambda i: sorted(self.times[i])[len(self.times[i]) // 2])
        return out

    def backend_sync(self):
        b = getattr(self.candidates[0][1], "backend", None)
        if b is not None:
            b.synchronize()


# -- independent parts of a graph across threads ---------------------------------------------

def split_components(graph, parts: int = 2):
    """Subgraphs that share no intermediate value (an optimizer's update of each
    parameter, say), grouped into `parts` groups of about equal work; None when
    the graph has fewer independent parts or too little work to gain."""
    from .graph import Graph
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
    subgraphs = []
    for members in bins:
        keep = set(members)
        g = Graph(graph.name)
        g.inputs = list(graph.inputs)
        g.nodes = [n for n in graph.nodes if n.op in ("input", "const") or n in keep]
        g.outputs = [o for o in graph.outputs if o in keep or o.op in ("input", "const")]
        subgraphs.append(g)
    return subgraphs


class ComponentParallel:
    """Runs the independent parts of a graph (split_components) in the engine's
    threads and puts their outputs back in the graph's order."""

    def __init__(self, graph, parts, backend):
        from .codegen import generate
        self.graph = graph
        self.parts = []
        for g in parts:
            b = private_backend(backend)
            self.parts.append((generate(g, b, g.name), [graph.outputs.index(o) for o in g.outputs]))
        self.plan = self.parts[0][0].plan
        self.source = "".join(f"# part {k} of {len(self.parts)}, in its own thread\n{c.source}"
                              for k, (c, _) in enumerate(self.parts))
        self.backend = backend
        self.fn = self.__call__
        self._pool = _workers(len(parts) - 1)

    def __call__(self, *args):
        results = self._pool.run([(c.fn, args) for c, _ in self.parts])
        out = [None] * len(self.graph.outputs)
        for (_, where), values in zip(self.parts, results):
            for k, v in zip(where, values):
                out[k] = v
        return tuple(out)
