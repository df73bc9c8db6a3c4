"""Tracing and compiling user functions: trace, jit, grad, value_and_grad, vmap.

A compiled function keeps one compiled graph per input signature: the tree
structure of its arguments with every non-array value, and each array's
type, shape and dtype.  A new signature retraces, and says why.
"""
from __future__ import annotations

import functools
import logging
import threading
import weakref

import numpy as np

from . import anomaly, ops, tree
from .autodiff import check_scalar_output, differentiable, grad_graph
from .backends import backend_of_args
from .codegen import generate
from .errors import AvalonError, at, user_location, warn_at_user
from .graph import Graph
from .passes import forward_pipeline, pipeline_version, run_pipeline
from .passes.sharding import split_batch, split_components
from .primitive import Tracer, active_graph, inline, is_tracer, leaked_tracer_error, node_in, tracing
from .runtime.gc_pause import gc_paused
from .runtime import tuning_memo
from .runtime.native import denormals_flushed
from .runtime.threads import Autotuned, BlasThreads, ComponentParallel, Later, ShardedFunction
from .threadsafe import SharedCompiled, private_backend

log = logging.getLogger("avalon.trace")

#: a compiled function warns when it has traced more than this many signatures
RETRACE_WARNING_BUDGET = 8


def _fname(f) -> str:
    return getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or type(f).__name__


def _fdef(f) -> str:
    code = getattr(f, "__code__", None) or getattr(getattr(f, "__call__", None), "__code__", None)
    return f"{code.co_filename}:{code.co_firstlineno}" if code else "<unknown>"


def trace(f, *args, name: str | None = None) -> Graph:
    """Run f(*args) with a tracer in place of every array inside args (arrays,
    lists, tuples, dicts, dataclasses, plain objects, nested) and return the
    recorded Graph.  `graph.in_tree`/`graph.out_tree` describe the structures."""
    leaves, treedef = tree.flatten(args)
    return _trace(f, leaves, treedef, name or _fname(f))


def _trace(f, leaves, treedef, name) -> Graph:
    g = Graph(_safe_name(name))
    paths = tree.leaf_paths(treedef, "args")
    with tracing(g):
        tracers = [Tracer(g, g.add_input(tuple(x.shape), x.dtype, p)) for x, p in zip(leaves, paths)]
        try:
            out = f(*tree.unflatten(treedef, tracers))
        except Exception as e:
            _note_number_sequences(e, treedef)
            raise
        out_leaves, out_tree = tree.flatten(out, is_leaf=lambda x: isinstance(x, Tracer))
        outs = []
        for x in out_leaves:
            if isinstance(x, Tracer):
                # a value of an enclosing trace returned as it is: captured
                outs.append(node_in(g, x, f"{name}'s result"))
            else:
                outs.append(g.add_const(x))
    g.outputs = outs
    g.in_tree, g.out_tree = treedef, out_tree
    return g


def _note_number_sequences(error, treedef):
    """A traced function that failed on a list of numbers passed as data: say
    which argument it was and how to make it an array (a note on the error,
    whose type and message stay the function's own)."""
    for path, what in _arg_sequences(treedef):
        error.add_note(f"avalon: {path} is {what}, which jit and grad pass through as a static value, not as an "
                       "array; if it is data, convert it with np.asarray(values, dtype=np.float32) before the call")


def _safe_name(name):
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "f"


def _leaf_key(x):
    t = type(x)
    if t is np.ndarray:
        return (t, x.shape, x.dtype)
    from .backends import backend_of
    return (t, x.shape, x.dtype, backend_of(x).index)


class _Entry:
    """One compiled signature.  `shared` runs it, safe for concurrent callers;
    `compiled` is the schedule it runs when free (profiles and tests read it)."""
    __slots__ = ("shared", "out_tree", "wrt", "in_tree", "fresh")

    def __init__(self, shared, out_tree, wrt, in_tree):
        self.shared, self.out_tree, self.wrt, self.in_tree = shared, out_tree, wrt, in_tree
        self.fresh = True       # not called yet

    @property
    def compiled(self):
        return self.shared.primary

    @compiled.setter
    def compiled(self, value):
        self.shared.primary = value


class BoundCall:
    """A compiled function bound to one signature (CompiledFunction.bind).

    `leaves` are the flat arguments it was bound with (tree.flatten order); a
    caller copies that list, puts new arrays at the positions that change from
    call to call and runs `call(leaves)`, which returns the flat outputs.
    `matches(leaves, positions)` says whether the arrays at those positions
    still have the signature's type, shape and dtype; `current()` whether a call
    of the function with such arguments would still run this compilation (no
    pass registered and no anomaly mode turned on or off since)."""
    __slots__ = ("function", "entry", "key", "leaves", "_keys")

    def __init__(self, function, entry, key, leaves):
        self.function, self.entry, self.key, self.leaves = function, entry, key, list(leaves)
        self._keys = key[1]

    def current(self) -> bool:
        return self.key[2] == (pipeline_version(), anomaly.is_enabled())

    def matches(self, leaves, positions) -> bool:
        keys = self._keys
        return all(_leaf_key(leaves[k]) == keys[k] for k in positions)

    def call(self, leaves):
        return self.function._run(self.entry, leaves)


class _Inlined:
    """One signature's transformed graph kept for inlining into enclosing traces;
    `captures` are the enclosing traces' tracers its extra inputs stand for."""
    __slots__ = ("graph", "out_tree", "wrt", "in_tree", "captures")

    def __init__(self, graph, out_tree, wrt, in_tree, captures):
        self.graph, self.out_tree, self.wrt, self.in_tree, self.captures = graph, out_tree, wrt, in_tree, captures


class CompiledFunction:
    """Common machinery of jit and value_and_grad: the per-signature cache, and
    the floating-point mode calls run in.

    flush_denormals (default True) runs each call with denormal numbers (below
    ~1.2e-38 in float32) flushed to zero and read as zero, in the calling thread
    and in the engine's threads (avalon.runtime.native.denormals_flushed: x86's
    FTZ and DAZ), as XLA's CPU code runs.  Values that decay towards zero (an
    optimizer's moments, a saturated sigmoid's gradient) otherwise take x86's
    microcode path, several times slower, and a training step slows down as
    training goes.  False keeps IEEE gradual underflow, as NumPy and PyTorch."""

    kind = "jit"

    def __init__(self, f, passes=None, parallel=True, flush_denormals=True):
        self.f = f
        self.passes = passes
        self.parallel = parallel
        self.flush_denormals = bool(flush_denormals)
        self._cache: dict = {}
        self._compiling = threading.Lock()
        self._last_key = None
        self.traces = 0
        self._inlined: dict = {}   # signature -> _Inlined, for calls made inside another trace
        self.__wrapped__ = f
        self.__name__ = _fname(f)
        self.__doc__ = getattr(f, "__doc__", None)

    # the last compiled signature, for reading
    @property
    def source(self) -> str:
        """Generated Python source of the most recently used signature."""
        return self._last().compiled.source

    @property
    def graph(self) -> Graph:
        """The optimized graph of the most recently used signature."""
        return self._last().compiled.graph

    @property
    def memory_plan(self):
        return self._last().compiled.plan

    def _last(self):
        if self._last_key is None:
            raise AvalonError(f"{self.__name__} has not been called yet, so nothing is compiled")
        return self._cache[self._last_key]

    def _run(self, entry, leaves):
        """The compiled code of `entry` called on the flat leaves, in this
        function's floating-point mode.  Its first call finishes compiling (the
        first schedule's code, its kernels loaded): with the collector paused."""
        if entry.fresh:
            entry.fresh = False
            with gc_paused():
                return self._run(entry, leaves)
        if self.flush_denormals:
            with denormals_flushed():
                return entry.shared.fn(*leaves)
        return entry.shared.fn(*leaves)

    def bind(self, *args) -> "BoundCall":
        """This function compiled for the signature of `args` (compiling it if
        needed), as a BoundCall: a loop that calls it again and again with arrays
        of that signature can skip the flattening of its arguments and the
        signature lookup of every call."""
        entry, leaves, key = self._find(args)
        return BoundCall(self, entry, key, leaves)

    def _lookup(self, args):
        entry, leaves, _ = self._find(args)
        return entry, leaves

    def _find(self, args):
        try:
            leaves, treedef = tree.flatten(args)
        except tree.ForeignArrayError:
            _refuse_leaked_tracers(args, self.__name__)  # a tracer is no foreign array: say what it is
            raise
        key = (treedef, tuple(map(_leaf_key, leaves)), (pipeline_version(), anomaly.is_enabled()))
        entry = self._cache.get(key)
        if entry is None:
            with self._compiling, gc_paused():  # two threads missing at once compile once
                entry = self._cache.get(key) or self._compile(key, leaves, treedef)
        self._last_key = key
        return entry, leaves, key

    def _compile(self, key, leaves, treedef):
        if self._cache:
            self._explain_retrace(key)
        self.traces += 1
        backend, _ = backend_of_args(leaves, self.__name__)
        graph = _trace(self.f, leaves, treedef, self.__name__)
        checked = key[2][1]
        build = self._compile_checked if checked else self._compile_optimized
        shared, out_tree, wrt = build(graph, backend, leaves, treedef)
        entry = _Entry(shared, out_tree, wrt, treedef)
        self._cache[key] = entry
        return entry

    def _compile_optimized(self, graph, backend, leaves, treedef):
        if self.passes is None:
            graph = run_pipeline(graph, forward_pipeline(backend))
        graph, out_tree, wrt = self._transform(graph, leaves, treedef)
        graph = run_pipeline(graph, self.passes, backend=backend)
        shared = SharedCompiled(self._schedules(graph, backend, leaves, treedef),
                                lambda: _spare_copy(graph, backend))
        return shared, out_tree, wrt

    def _compile_checked(self, graph, backend, leaves, treedef):
        """detect_anomaly: the graph as traced (no pass), one kernel per value,
        every value checked as it is made."""
        graph, out_tree, wrt = self._transform(graph, leaves, treedef)
        shared = SharedCompiled(generate(graph, backend, graph.name, check_finite=True),
                                lambda: generate(graph, private_backend(backend), graph.name, check_finite=True))
        return shared, out_tree, wrt

    def _transform(self, graph, leaves, treedef):
        return graph, graph.out_tree, None

    def _schedules(self, graph, backend, leaves, treedef):
        """The compiled step: one schedule, or several that the first calls time
        (batch split across the engine's threads; BLAS on several threads).  Each
        schedule is compiled when first tried, so a first call compiles one."""
        if not self.parallel:
            return backend.wrap_compiled(generate(graph, backend, graph.name))
        first = None
        if backend.parallel_shards > 1:
            plan = split_batch(graph, self._batch_inputs(graph, leaves, treedef), backend.parallel_shards)
            if plan is not None:
                first = ("batch split across threads", Later(lambda: ShardedFunction(plan, backend, graph.name)))
            else:
                parts = split_components(graph, backend.parallel_shards)
                if parts is not None:
                    first = ("independent parts across threads",
                             Later(lambda: ComponentParallel(graph, parts, backend)))
        whole = functools.lru_cache(maxsize=None)(lambda: backend.wrap_compiled(generate(graph, backend, graph.name)))
        candidates = ([first] if first is not None else []) + [("one thread", Later(whole))]
        # BLAS's own threads: fastest for steps made of a few large products (a
        # prediction too small for the batch split), but they spin after each call
        # and slow the engine's threads for a while; timing the schedules inside
        # the real workload weighs that in
        blas = getattr(backend, "blas_threads_available", 1)
        products = [n for n in graph.nodes if n.op == "matmul"]
        if blas > 1 and backend.product_threads_pay(products):
            candidates.append((f"BLAS on {blas} threads", Later(lambda: BlasThreads(whole(), backend, blas))))
        if len(candidates) == 1:
            return whole()
        return Autotuned(candidates, memo_key=tuning_memo.key_of(graph, [c[0] for c in candidates], backend))

    def _batch_inputs(self, graph, leaves, treedef):
        """Graph inputs that carry the batch: arrays of the arguments after the
        first (the model), not differentiated, sharing the commonest leading size."""
        owners = _leaf_owner(treedef)
        skip = self._unbatched_arguments(len(treedef.children))
        cands = [k for k, x in enumerate(leaves) if owners[k] not in skip and np.ndim(x) >= 1]
        if not cands:
            return set()
        sizes = [leaves[k].shape[0] for k in cands]
        n = max(set(sizes), key=sizes.count)
        return {graph.inputs[k] for k in cands if leaves[k].shape[0] == n}

    def _unbatched_arguments(self, n_args) -> set:
        """Positions of the arguments that never carry the batch: the first (the
        model) and the differentiated ones."""
        return set(getattr(self, "argnums", None) or ()) | {0}

    def _explain_retrace(self, key):
        prev = self._last_key if self._last_key is not None else next(reversed(self._cache))
        reason = explain_difference(prev, key)
        where = user_location()
        msg = (f"{self.kind}: retracing {self.__name__} (defined at {_fdef(self.f)}), called at {where}: "
               f"{reason}")
        log.debug(msg)
        if self.traces >= RETRACE_WARNING_BUDGET:
            warn_at_user(f"{msg}. It has been traced {self.traces + 1} times; each new signature "
                         "compiles again. Keep shapes, dtypes and non-array arguments fixed between calls.",
                         RuntimeWarning)

    def clear_cache(self):
        self._cache.clear()
        self._inlined.clear()
        self._last_key = None

    # -- calls inside another trace (grad of grad, jit inside grad) ----------------
    def _call_inlined(self, args):
        """The transformed (not yet optimized) graph of this signature, its nodes
        re-emitted in the enclosing trace, so the outermost transformation
        optimizes and compiles everything as one graph; returns the output
        leaves and the traced entry."""
        leaves, treedef = tree.flatten(args, is_leaf=is_tracer)
        entry = self._inlined_entry(leaves, treedef)
        outs = inline(entry.graph, list(leaves) + list(entry.captures))
        return outs, entry

    def _inlined_entry(self, leaves, treedef):
        key = (treedef, tuple((tuple(x.shape), np.dtype(x.dtype)) for x in leaves))
        entry = self._inlined.get(key)
        if entry is None:
            entry = self._trace_for_inlining(leaves, treedef)
            if not entry.captures:  # a graph capturing values of one trace is good for that call only
                self._inlined[key] = entry
        return entry

    def _trace_for_inlining(self, leaves, treedef):
        self.traces += 1
        graph = _trace(self.f, leaves, treedef, self.__name__)
        captures = graph.__dict__.get("captures", ())
        if self.passes is None:
            # the forward rewrites a compilation of its own runs before differentiating
            # (the CPU's pool_first): after it, the backward reads what they removed.  The
            # enclosing trace's device is not known here; the default one's are exact anywhere
            graph = run_pipeline(graph, forward_pipeline())
        graph, out_tree, wrt = self._transform(graph, leaves, treedef)
        return _Inlined(graph, out_tree, wrt, treedef, tuple(captures))


def _spare_copy(graph, backend):
    """The graph compiled once more, with buffers of its own, for a concurrent caller."""
    own = private_backend(backend)
    return own.wrap_compiled(generate(graph, own, graph.name))


def explain_difference(old, new) -> str:
    """Say what changed between two signatures: the argument, and how."""
    (otd, oavals, (over, ochecked)), (ntd, navals, (nver, nchecked)) = old, new
    if ochecked != nchecked:
        return f"anomaly detection was switched {'on' if nchecked else 'off'}"
    if over != nver:
        return "the pass pipeline changed"
    changes = []
    if otd != ntd:
        ostat, nstat = dict(tree.static_paths(otd, "args")), dict(tree.static_paths(ntd, "args"))
        opaths, npaths = tree.leaf_paths(otd, "args"), tree.leaf_paths(ntd, "args")
        if opaths != npaths or ostat.keys() != nstat.keys():
            return (f"the argument structure changed: arrays at {_diff_list(opaths, npaths)}; "
                    f"non-array values at {_diff_list(sorted(ostat), sorted(nstat))}")
        for p in ostat:
            if tree.Static(ostat[p]) != tree.Static(nstat[p]):
                changes.append(f"static value {p} changed from {ostat[p]!r} to {nstat[p]!r}")
        for p, a, b in zip(npaths, tree.trainable_leaves(otd), tree.trainable_leaves(ntd)):
            if a != b:
                changes.append(f"{p} is {'now' if b else 'no longer'} trained")
        if tree.alias_paths(otd, "args") != tree.alias_paths(ntd, "args"):
            changes.append(f"tied arrays changed: {tree.alias_paths(otd, 'args')} -> {tree.alias_paths(ntd, 'args')}")
    paths = tree.leaf_paths(ntd, "args")
    for p, a, b in zip(paths, oavals, navals):
        if a == b:
            continue
        if a[0] is not b[0] or (len(a) > 3 and a[3:] != b[3:]):
            changes.append(f"{p} moved from device {_dev(a)} to {_dev(b)}")
        if a[1] != b[1]:
            changes.append(f"{p} shape {a[1]} -> {b[1]}")
        if a[2] != b[2]:
            changes.append(f"{p} dtype {np.dtype(a[2]).name} -> {np.dtype(b[2]).name}")
    return "; ".join(changes) or "the signature changed"


def _dev(aval):
    t = aval[0]
    return f"{t.__module__}.{t.__name__}" + (f":{aval[3]}" if len(aval) > 3 else "")


def _diff_list(a, b):
    sa, sb = set(a), set(b)
    gone, new = sorted(sa - sb), sorted(sb - sa)
    parts = []
    if gone:
        parts.append("removed " + ", ".join(gone[:5]))
    if new:
        parts.append("added " + ", ".join(new[:5]))
    return " / ".join(parts) or "same paths, different nesting"


class JitFunction(CompiledFunction):
    """f compiled for prediction: calling it runs the compiled forward graph."""
    kind = "jit"

    def __call__(self, *args):
        if _inside_a_trace():
            outs, entry = self._call_inlined(args)
            return tree.unflatten(entry.out_tree, outs)
        entry, leaves = self._lookup(args)
        return tree.unflatten(entry.out_tree, self._run(entry, leaves))


class VmapFunction(CompiledFunction):
    """f mapped over a batch of examples (avalon.vmap): f is traced for one
    example and its graph batched by each primitive's batching rule into one
    graph over the whole batch (avalon.batching), compiled once per input
    signature; called inside another trace (jit, grad, vmap), that batched
    graph is inlined into it."""
    kind = "vmap"

    def __init__(self, f, in_axes=0, out_axes=0, passes=None, parallel=True):
        from .batching import Vectorized
        super().__init__(Vectorized(f, in_axes, out_axes, _fname(f)), passes, parallel)
        self.fun, self.in_axes, self.out_axes = f, in_axes, out_axes
        self.__wrapped__ = f
        self.__doc__ = getattr(f, "__doc__", None)

    def __call__(self, *args):
        if _inside_a_trace():
            outs, entry = self._call_inlined(args)
            return tree.unflatten(entry.out_tree, outs)
        entry, leaves = self._lookup(args)
        return tree.unflatten(entry.out_tree, self._run(entry, leaves))


class GradFunction(CompiledFunction):
    """f's value and its gradient with respect to every floating-point array in
    the arguments (or in the arguments selected by `argnums`) that is trainable
    (see avalon.tree: fields an object declares not trained get None).  An
    array the value does not depend on gets None, as in PyTorch; an array
    reached at two places (tied weights) is one input, and both places hold
    the sum of its gradients."""
    kind = "grad"

    def __init__(self, f, argnums=None, passes=None, parallel=True, has_aux=False, flush_denormals=True):
        super().__init__(f, passes, parallel, flush_denormals)
        self.argnums = None if argnums is None else (
            (argnums,) if isinstance(argnums, int) else tuple(argnums))
        self.has_aux = bool(has_aux)

    def _transform(self, graph, leaves, treedef):
        trainable = tree.trainable_leaves(treedef)
        chosen = self._chosen_leaves(treedef, len(leaves))
        wrt = [differentiable(x.dtype) and trainable[k] and chosen[k] for k, x in enumerate(leaves)]
        if not any(wrt) and any(differentiable(x.dtype) and not t for x, t in zip(leaves, trainable)):
            raise AvalonError(f"grad: nothing to differentiate{at(user_location())}: every floating-point array "
                              f"in {self._differentiable_args_text(treedef).removeprefix('none of ')} is declared "
                              "not trained (its object's __avalon_nondiff_fields__: an nn.Module trains only "
                              "declared parameters). Declare them with nn.Parameter(array) or register_parameter, "
                              "or unfreeze them with requires_grad_(True).")
        if not any(wrt):
            raise AvalonError(f"grad: nothing to differentiate{at(user_location())}: "
                              f"{self._differentiable_args_text(treedef)} holds no floating-point array"
                              f"{_sequences_text(treedef)}. "
                              "Gradients are taken with respect to NumPy (or backend) float arrays; "
                              "Python numbers and lists are constants: pass np.asarray(x, dtype=np.float32).")
        check_scalar_output(graph, self.__name__, self.has_aux)
        g = grad_graph(graph, wrt)
        # an input the result does not depend on has no gradient: None for a model's
        # parameter, as in PyTorch; zeros for an array passed on its own or in a list,
        # tuple or dict, as torch.func and JAX give (so grad of grad of a linear
        # function is zeros, and code using the gradient needs no None check)
        has = _GradientLeaves(g.has_gradient)
        in_object = tree.leaves_in_objects(treedef)
        has.zeros = tuple(k for k, (w, h) in enumerate(zip(wrt, g.has_gradient)) if w and not h and not in_object[k])
        has.n_aux = len(graph.outputs) - 1
        return g, graph.out_tree.children[1] if self.has_aux else None, has

    def _chosen_leaves(self, treedef, n):
        """Whether each leaf is in an argument of argnums (at any of its places: an
        array passed in two arguments is one leaf)."""
        if self.argnums is None:
            return [True] * n
        chosen = [k in self.argnums for k in _leaf_owner(treedef)]
        for k in self.argnums:
            if 0 <= k < len(treedef.children):
                for _, i in tree.alias_paths(treedef.children[k]):
                    chosen[i] = True
        return chosen

    def _differentiable_args_text(self, treedef):
        chosen = self.argnums if self.argnums is not None else range(len(treedef.children))
        names = [f"args[{k}]" for k in chosen]
        return "none of " + ", ".join(names) if len(names) > 1 else (names[0] if names else "no argument")

    def __call__(self, *args):
        if _inside_a_trace():
            outs, entry = self._call_inlined(args)
            leaves = tree.flatten(args, is_leaf=is_tracer)[0] if entry.wrt.zeros else ()
        else:
            entry, leaves = self._lookup(args)
            outs = self._run(entry, leaves)
        n_aux = entry.wrt.n_aux
        grads = iter(_distinct(outs[1 + n_aux:]))
        grad_leaves = [next(grads) if w else None for w in entry.wrt]
        for k in entry.wrt.zeros:
            grad_leaves[k] = ops.zeros_like(leaves[k])
        result = tree.unflatten(entry.in_tree, grad_leaves, static=None)
        _record_sources(args, result)
        return self._with_value(entry, outs, result)

    def output_structure(self, *args):
        """What self(*args) returns, with a read-only zero-strided NumPy array of
        each result's shape and dtype in place of its value: the function is
        traced and differentiated (once per signature: a call inside another
        trace inlines that same graph), not compiled and not run."""
        leaves, treedef = tree.flatten(args, is_leaf=is_tracer)
        with gc_paused():
            entry = self._inlined_entry(leaves, treedef)
        outs = [_placeholder(o.shape, o.dtype) for o in entry.graph.outputs]
        n_aux = entry.wrt.n_aux
        grads = iter(outs[1 + n_aux:])
        grad_leaves = [next(grads) if w else None for w in entry.wrt]
        for k in entry.wrt.zeros:
            grad_leaves[k] = _placeholder(leaves[k].shape, leaves[k].dtype)
        return self._with_value(entry, outs, tree.unflatten(entry.in_tree, grad_leaves, static=None))

    def _with_value(self, entry, outs, result):
        n_aux = entry.wrt.n_aux
        if self.has_aux:
            return (outs[0], tree.unflatten(entry.out_tree, list(outs[1:1 + n_aux]))), result
        return outs[0], result


class _GradientLeaves(list):
    """For each input leaf, whether the gradient graph has an output for it;
    `zeros`: the leaves whose gradient is structurally zero and is returned as
    zeros rather than None (see GradFunction._transform)."""
    zeros: tuple = ()
    n_aux: int = 0    # outputs between the value and the gradients (has_aux)


def _record_sources(args, grads) -> None:
    """Note which argument each gradient structure belongs to (avalon.tree.gradient_source),
    so an optimizer given the argument's parameters can be stepped with the gradient alone."""
    for arg, g in zip(args, grads):
        if g is not None and not tree.is_array(g):
            tree.record_gradient_source(g, arg)


def _arg_sequences(treedef):
    """The lists of numbers among the arguments (treedef: of the args tuple)."""
    return [found for k, child in enumerate(treedef.children)
            for found in tree.number_sequences(child, f"args[{k}]")]


def _sequences_text(treedef):
    found = _arg_sequences(treedef)
    return " (" + "; ".join(f"{path} is {what}" for path, what in found) + ")" if found else ""


def _placeholder(shape, dtype):
    return np.broadcast_to(np.zeros((), np.dtype(dtype)), tuple(shape))


def _distinct(arrays):
    """The arrays, each its own object: two gradients the passes found equal (and
    computed once) must not be one array, or a tie would appear where the model
    has none and an in-place change of one would change the other."""
    seen: set = set()
    out = []
    for a in arrays:
        # traced values are not stored anywhere yet: the same tracer twice is harmless
        out.append(a.copy() if id(a) in seen and not is_tracer(a) else a)
        seen.add(id(a))
    return out


def _inside_a_trace() -> bool:
    """True when a call is part of another function's trace: a compiled
    function then inlines its transformed graph into that trace instead of
    running its compiled code."""
    return active_graph() is not None


def _refuse_leaked_tracers(args, name):
    """A traced value passed to a compiled function when no trace is running
    (kept from an earlier trace): say where it was made."""
    for x in tree.flatten(args, is_leaf=is_tracer)[0]:
        if is_tracer(x):
            raise leaked_tracer_error(x, name)


def _leaf_owner(treedef):
    """For each array leaf of the args tuple, the index of the argument holding it."""
    owners = []
    for k, child in enumerate(treedef.children):
        owners.extend([k] * len(tree.leaf_paths(child)))
    return owners


def jit(f=None, *, passes=None, parallel=True, flush_denormals=True):
    """Compile f (forward only) once per input signature; usable as a decorator.
    parallel=False keeps the batch in one thread (see avalon.runtime.threads);
    flush_denormals=False keeps IEEE denormals (CompiledFunction)."""
    if f is None:
        return lambda g: JitFunction(g, passes, parallel, flush_denormals)
    return JitFunction(f, passes, parallel, flush_denormals)


def vmap(f, in_axes=0, out_axes=0):
    """f mapped over a batch of examples, as JAX's vmap: `in_axes` says where
    each argument's batch axis is (an int, negative from the end; None: the
    argument is shared by every example; or a tuple with one entry per
    argument, each an int, None or a structure matching that argument) and
    `out_axes` likewise where each output's goes (None: an output every
    example shares).  Per-example gradients:
    ``vmap(value_and_grad(loss), in_axes=(None, 0, 0))(params, x, y)``.
    The batch runs as one graph built by the primitives' batching rules (no
    Python loop), compiled once per input signature; vmap composes with jit,
    grad and vmap.  A primitive without a batching rule raises
    MissingRuleError naming it."""
    from .batching import check_axes_spec
    check_axes_spec(in_axes, "in_axes")
    check_axes_spec(out_axes, "out_axes")
    return VmapFunction(f, in_axes, out_axes)


_grad_fns: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_grad_fns_strong: dict = {}


def value_and_grad(f, argnums=None, passes=None, parallel=True, has_aux=False,
                   flush_denormals=True) -> GradFunction:
    """The compiled function args -> (f(*args), grads), cached per f: calling it
    again for the same f returns the same object (and its compiled signatures).
    has_aux=True: f returns (value, aux), and the call returns ((value, aux),
    grads); aux (any structure of arrays: a new hidden state, metrics) is
    computed in the same compiled step, not differentiated (as in JAX and
    torch.func).  flush_denormals=False keeps IEEE denormals (CompiledFunction)."""
    if passes is not None or not parallel:
        return GradFunction(f, argnums, passes, parallel, has_aux, flush_denormals)
    key = (argnums if not isinstance(argnums, list) else tuple(argnums), bool(has_aux), bool(flush_denormals))
    try:
        table = _grad_fns.setdefault(f, {})
    except TypeError:
        table = _grad_fns_strong.setdefault(f, {})
    gf = table.get(key)
    if gf is None:
        gf = table[key] = GradFunction(f, argnums, has_aux=has_aux, flush_denormals=flush_denormals)
    return gf


def grad(f, *args, argnums=None, has_aux=False, flush_denormals=True):
    """loss, grads = avalon.grad(f, *args).

    Returns f's scalar value and one gradient per argument, each with the
    argument's structure (same classes, arrays replaced by their gradients;
    None for integer arrays, non-array values and a model's parameters the
    value does not depend on).  f is traced, differentiated and compiled once
    per input signature and cached.  has_aux=True: f returns (value, aux) and
    the result is ((value, aux), grads).  flush_denormals=False keeps IEEE
    denormals (see CompiledFunction)."""
    return value_and_grad(f, argnums, has_aux=has_aux, flush_denormals=flush_denormals)(*args)


def compile_graph(graph: Graph, device="cpu", passes=(), name: str | None = None):
    """Compile a (possibly hand-edited) graph for a device; returns a callable
    taking the graph's inputs and returning the tuple of its outputs, with
    `.source` and `.plan`.  `passes` defaults to none: pass None for the
    device's default pipeline."""
    from .backends import device as to_device_obj, get_backend
    backend = get_backend(to_device_obj(device))
    graph = run_pipeline(graph, passes, backend=backend) if passes != () else graph
    return generate(graph, backend, name or graph.name)
