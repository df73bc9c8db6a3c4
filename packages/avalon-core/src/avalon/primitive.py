"""Primitives and how a call to one is carried out.

A primitive is declared once, in one registration block (`defprim`): its shape
and dtype rule, its implementation written against an array module `xp` (so it
runs on NumPy and CuPy alike; a backend may override it with a kernel of its
own), its VJP written in other ops (so the backward pass is an ordinary graph
that the passes optimize), flags the passes read (elementwise, view,
effectful), and the rules other passes look up by primitive (`Primitive.rule`:
how a batch split flows through the op, how it takes the batch-innermost
layout).  Composite ops (softmax, losses, ...) are plain functions over
primitives and need no rules of their own.

`bind(prim, args, attrs)` is the single entry point: on concrete arrays it runs
the backend kernel at once (eager mode); when an argument is a `Tracer` it
records a node in that tracer's graph instead.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from . import anomaly
from .errors import (AvalonError, ConcretizationError, LeakedTracerError, MissingRuleError, at, model_location,
                     user_location)
from .graph import Graph, Node, type_str

PRIMITIVES: dict[str, "Primitive"] = {}

#: the per-pass rules a primitive may declare (keywords of defprim), and what reads them
RULE_KINDS = {
    "sharding": "the batch split across threads (avalon.passes.sharding)",
    "shard_attrs": "the attributes of a node in a shard graph (avalon.passes.sharding)",
    "layout": "the batch-innermost layout (avalon.passes.layout)",
    "lower": "the op as one loop-level kernel, node -> Kernel or None (avalon.kernel_ir; the CPU backend's C)",
    "batching": "the op on a batch of examples, (args, dims, **attrs) -> (out, out_dim) (avalon.vmap; "
                "avalon.ops._batching)",
    "strided_view": "the op's values as a strided read of its input, node -> (offset, strides) in elements of "
                    "the input's C order, or None (avalon.passes.views: kernels read the view in place)",
    "reduction": "the op as a fold of its input's elements over `axes` into an accumulator, a "
                 "avalon.ops.reduce.Reduction (avalon.passes.fusion ends a fused group with it; kernel_ir lowers it)",
    "writes_over": "whether a node's output may be written over an input of its shape that dies there, node -> "
                   "bool (avalon.memory's in-place reuse; without the rule, the primitive's `inplace`)",
    "merge_sum": "a sum of several nodes of the op as fewer, cheaper nodes, nodes -> (new nodes, merged) or "
                 "None (avalon.passes.sums)",
    "assembles": "the op's output as its inputs laid end to end, node -> the byte offset of each input in the "
                 "output, or None (avalon.memory writes the inputs there and runs no op)",
}

_NO_DEFAULT = object()


class Primitive:
    """One primitive op.  See `defprim` for the meaning of each field."""

    def __init__(self, name, *, shape, impl, vjp=None, ufunc=None, elementwise=False, view=False,
                 effectful=False, accepts_out=False, foldable=True, nondiff=False, expr=None, inplace=None,
                 writes_input=False, draws_random=False, output_shape_attr=None, collective=False, detaches=False,
                 fusible=None, recompute=False, doc="", **rules):
        self.name = name
        self.shape_rule = shape
        self.impl = impl
        self.vjp = vjp
        self.ufunc = ufunc
        self.elementwise = elementwise
        self.fusible = elementwise if fusible is None else fusible
        self.recompute = recompute and self.fusible
        self.view = view
        self.effectful = effectful
        self.accepts_out = accepts_out or ufunc is not None
        self.foldable = foldable and not effectful
        self.nondiff = nondiff or detaches
        self.detaches = detaches
        self.expr = expr
        self.inplace = (ufunc is not None) if inplace is None else inplace
        self.writes_input = writes_input
        if writes_input:
            self.effectful = True
            self.foldable = False
        self.draws_random = draws_random
        if draws_random:
            self.effectful = True
            self.foldable = False
        self.collective = collective
        if collective:
            self.effectful = True
            self.foldable = False
        self.output_shape_attr = output_shape_attr
        unknown = sorted(set(rules) - set(RULE_KINDS))
        if unknown:
            raise TypeError(f"defprim({name!r}): unknown field or rule kind {', '.join(unknown)}; "
                            f"rule kinds are {', '.join(RULE_KINDS)}")
        self.rules = rules
        self.__doc__ = doc

    def __repr__(self):
        return f"<primitive {self.name}>"

    def get_vjp(self):
        if self.vjp is None:
            raise MissingRuleError(f"primitive {self.name!r} has no VJP rule, so it cannot be differentiated; "
                                   f"declare one with defprim({self.name!r}, vjp=...)")
        return self.vjp

    def rule(self, kind, default=_NO_DEFAULT):
        """The op's rule of `kind` (one of RULE_KINDS).  Without one: `default`
        when given (passes that treat an unruled op in a safe way pass None),
        else MissingRuleError naming the primitive and the kind."""
        found = self.rules.get(kind)
        if found is not None:
            return found
        if default is not _NO_DEFAULT:
            return default
        raise MissingRuleError(f"primitive {self.name!r} has no {kind} rule ({RULE_KINDS.get(kind, kind)}); "
                               f"declare one with defprim({self.name!r}, {kind}=...)")


def defprim(name, **fields) -> Primitive:
    """Declare and register a primitive.

    shape(*avals, **attrs) -> (shape, dtype): avals have .shape and .dtype;
        raise ShapeError/DtypeError with a message naming the shapes or dtypes.
    impl(xp, *arrays, **attrs[, out=]) -> array: the reference implementation.
    vjp(ct, out, *inputs, **attrs) -> tuple with one cotangent (or None) per input,
        written with avalon ops on tracers.
    ufunc: name of an xp ufunc that computes the op directly (fast path, takes out=).
    elementwise: output element i depends only on input elements i (after
        broadcasting); fusion groups such ops.
    fusible: the op may join an elementwise fusion group, computed by its `expr`
        (default: elementwise).  broadcast_to is: its output element i is its
        input's element at i's broadcast position, so a group reads the small
        input through zero strides instead of a broadcast view.
    view: the output may share memory with the first input (reshape, transpose).
    effectful: not a pure function of its inputs (randomness): never merged or folded.
    accepts_out: impl takes an out= array of the output's shape and dtype.
    nondiff: the output carries no gradient (comparisons, argmax).
    detaches: the output is cut from the gradient (stop_gradient, torch's
        detach): an input reached only through it gets no gradient (None),
        where one reached through a nondiff op (sign) gets zeros, as in PyTorch.
    recompute: the op is cheap (an add, a compare): where its value feeds several
        fused kernels, each may compute it again instead of reading a stored
        copy (passes.fusion.recompute_cheap).
    expr: C expression template ("exp({0})") a GPU backend may use to fuse the op.
    inplace: out= may be one of the inputs (true for ufuncs; default: ufunc is set).
    writes_input: the op writes into its first input (assign): a side effect that
        passes keep and never move reads of that input across.
    draws_random: the op draws from its backend's random generator (effectful
        implied); a step split across threads replays the generator in each thread.
    output_shape_attr: the attribute that holds the op's own output shape
        ("shape" for reshape): kept equal to it when a pass changes the shape.
    collective: the op communicates with other processes (avalon.distributed):
        every process must run it once per call, in the same order, so a step
        holding one runs in the caller's thread, never split across threads
        (effectful implied: never merged or folded).

    Per-pass rules, each looked up by the pass with `Primitive.rule(kind)` (a
    missing rule raises MissingRuleError naming the primitive and the kind; the
    passes below treat an op without one safely instead: not split, usual layout):
    sharding(node, states, ctx) -> state: how a batch split across threads flows
        through the op (avalon.ops._sharding explains the states; shared rules for
        families of ops live there).
    shard_attrs(node, full_shape, axis) -> attrs: the attributes of the node's copy
        in a shard graph, where it computes 1/shards of its output along `axis`
        (random draws keep their slice of the whole draw).
    layout: a LayoutRule saying how the op takes the batch-innermost layout
        (avalon.ops._layout).
    strided_view(node) -> (offset, strides) or None: a view whose element i
        (a multi-index) is element offset + sum(i[d] * strides[d]) of its
        input in C order: a fused kernel reads it in place, no copy
        (avalon.passes.views).
    merge_sum(nodes) -> (new_nodes, merged) or None: `nodes` are terms of one
        sum (same shape and dtype, each read by that sum alone) that share this
        rule; the rule may replace a subset `merged` of them by new_nodes (in
        order; the last one's value is the sum of `merged`) when that is
        cheaper: gradients of slices into one scatter, products into one
        matmul (avalon.passes.sums).  Ops whose rules are the same function
        merge with each other.

    Example, one registration block (ops/shape.py)::

        reshape_p = defprim("reshape", shape=_reshape_rule, view=True, output_shape_attr="shape",
                            impl=lambda xp, x, *, shape: xp.reshape(x, shape),
                            vjp=lambda g, out, x, *, shape: (reshape(g, x.shape),),
                            sharding=on_sharded(_reshape_sharding, reads_partials=True))
    """
    if name in PRIMITIVES:
        raise AvalonError(f"primitive {name!r} is already registered")
    p = Primitive(name, **fields)
    PRIMITIVES[name] = p
    return p


def vjp_rules() -> dict[str, object]:
    """The VJP table: primitive name -> rule (None where the op has none)."""
    return {name: p.vjp for name, p in PRIMITIVES.items()}


# -- tracing state -------------------------------------------------------------

class _State(threading.local):
    def __init__(self):
        self.loc_override = None
        self.graphs: list[Graph] = []  # traces in progress, innermost last


@contextlib.contextmanager
def tracing(graph: Graph):
    """Mark `graph` as the trace in progress (ops with no traced operand, such
    as random_normal(shape), record into it)."""
    _state.graphs.append(graph)
    try:
        yield graph
    finally:
        _state.graphs.pop()


def active_graph() -> Graph | None:
    return _state.graphs[-1] if _state.graphs else None


_state = _State()


@contextlib.contextmanager
def source_location(loc):
    """Record `loc` as the source line of every node created inside the block
    (autodiff uses it so backward nodes point at the forward line)."""
    old = _state.loc_override
    _state.loc_override = loc
    try:
        yield
    finally:
        _state.loc_override = old


def current_location():
    """Where a node being traced now comes from: model code, not Avalon's library."""
    return _state.loc_override or model_location()


class Tracer:
    """A stand-in for an array while a function is traced: it records every op
    applied to it as a node of `graph`.  It offers NumPy's array surface
    (operators, methods, np.* functions); see tracer_methods.py."""
    __slots__ = ("graph", "node")
    __array_priority__ = 1000

    def __init__(self, graph: Graph, node: Node):
        self.graph = graph
        self.node = node

    shape = property(lambda self: self.node.shape)
    dtype = property(lambda self: self.node.dtype)
    ndim = property(lambda self: len(self.node.shape))
    size = property(lambda self: self.node.size)

    def __repr__(self):
        return f"Tracer({type_str(self.shape, self.dtype)})"

    __hash__ = object.__hash__

    def _concrete(self, what):
        raise ConcretizationError(
            f"{what} needs a concrete value, but this {type_str(self.shape, self.dtype)} array is being "
            f"traced{at(user_location())}. Python control flow cannot depend on traced values: use "
            "avalon.where(cond, a, b) to select values, or pass the value as a static (non-array) argument.")

    def __bool__(self):
        self._concrete("`if`/`while`/`and`/`or`/bool() on an array")

    def __float__(self):
        self._concrete("float()")

    def __int__(self):
        self._concrete("int()")

    def __index__(self):
        self._concrete("using an array as an index or size")

    def __array__(self, *a, **k):
        self._concrete("converting to a NumPy array (np.asarray, .item(), printing values)")

    def item(self):
        self._concrete(".item()")

    def __setitem__(self, index, value):
        raise AvalonError(
            f"item assignment on a traced {type_str(self.shape, self.dtype)} array{at(user_location())}: "
            "traced arrays are immutable, so `x[...] = v` cannot be recorded. Build a new array instead: "
            "x = avalon.where(mask, v, x) with a boolean mask of the positions to replace (for x[0] = v: "
            "mask = np.arange(x.shape[0]) == 0, shaped to broadcast), or join pieces with "
            "avalon.concatenate.")

    def tolist(self):
        self._concrete(".tolist()")


def is_tracer(x) -> bool:
    return isinstance(x, Tracer)


# -- binding -------------------------------------------------------------------

_PY_SCALARS = (bool, int, float)


def _reference_dtype(args):
    """The dtype Python scalars adopt: that of the first float operand, else
    of the first non-bool operand, else of the first operand."""
    dtypes = [np.dtype(a.dtype) for a in args
              if isinstance(a, Tracer) or (hasattr(a, "dtype") and hasattr(a, "shape"))]
    for kinds in ("fc", "iu"):
        for d in dtypes:
            if d.kind in kinds:
                return d
    return dtypes[0] if dtypes else None


def weak_scalar(value, ref_dtype) -> np.ndarray:
    """A Python scalar adopts the dtype of the arrays it meets (as in NumPy 2 and
    JAX): 2.0 * float32 stays float32; a float meeting ints becomes float32."""
    if ref_dtype is None:
        dtype = np.float32 if isinstance(value, float) else (np.bool_ if isinstance(value, bool) else np.int64)
    elif isinstance(value, float) and ref_dtype.kind in "biu":
        dtype = np.float32
    elif isinstance(value, int) and not isinstance(value, bool) and ref_dtype.kind == "b":
        dtype = np.int64
    else:
        dtype = ref_dtype
    return np.asarray(value, dtype=dtype)


def infer_type(prim, avals, attrs):
    return prim.shape_rule(*avals, **attrs)


def bind(prim: Primitive, args, attrs=None):
    """Apply a primitive: eagerly on arrays, or by recording a node on tracers.

    Tracers of several nested traces may meet (a function given to grad that
    calls another grad, or closes over an outer traced value): the node goes
    into the innermost of their traces, and the values of outer traces become
    inputs of it ("captures": constants of the inner differentiation, connected
    back when the inner graph is inlined into the outer one)."""
    attrs = attrs or {}
    graph = _innermost_graph(args, prim.name)
    if graph is None:
        return _eager(prim, args, attrs)
    return bind_into(graph, prim, args, attrs)


def bind_into(graph: Graph, prim: Primitive, args, attrs):
    """Record prim(*args) as a node of `graph` (whatever the operands: arrays
    become constants, tracers of enclosing traces become captured inputs)."""
    ref = _reference_dtype(args)
    inputs = []
    for a in args:
        if isinstance(a, Tracer):
            inputs.append(node_in(graph, a, prim.name))
        elif isinstance(a, _PY_SCALARS):
            inputs.append(graph.add_const(weak_scalar(a, ref)))
        else:
            inputs.append(graph.add_const(_as_const(a)))
    loc = current_location()
    shape, dtype = _checked_type(prim, inputs, attrs, loc)
    return Tracer(graph, graph.add_node(prim.name, inputs, attrs, shape, dtype, loc))


# -- nested traces ---------------------------------------------------------------

def trace_level(graph: Graph) -> int:
    """The depth of `graph` among the traces in progress (0: outermost), or -1
    when it is not being traced (its trace finished: its tracers leaked)."""
    for k in range(len(_state.graphs) - 1, -1, -1):
        if _state.graphs[k] is graph:
            return k
    return -1


def _innermost_graph(args, what):
    """The trace a node with these operands goes into: the innermost trace
    among its tracers' (None when no operand is traced)."""
    graph, level = None, -2
    for a in args:
        if isinstance(a, Tracer) and a.graph is not graph:
            k = trace_level(a.graph)
            if k < 0:
                raise leaked_tracer_error(a, what)
            if k > level:
                graph, level = a.graph, k
    return graph


def node_in(graph: Graph, t: "Tracer", what: str) -> Node:
    """The node standing for tracer `t` in `graph`: its own node, or, for a
    tracer of an enclosing trace, an input of `graph` capturing it."""
    if t.graph is graph:
        return t.node
    if trace_level(t.graph) < 0 or trace_level(t.graph) > trace_level(graph):
        raise leaked_tracer_error(t, what)
    return capture(graph, t)


def capture(graph: Graph, t: "Tracer") -> Node:
    """An input of `graph` standing for `t`, a tracer of an enclosing trace;
    `graph.captures` lists them in the order of graph.inputs (after the
    function's own arguments)."""
    table = graph.__dict__.setdefault("_capture_nodes", {})
    node = table.get(t.node)
    if node is None:
        node = table[t.node] = graph.add_input(t.shape, t.dtype, "captured")
        graph.__dict__.setdefault("captures", []).append(t)
    return node


def leaked_tracer_error(t: "Tracer", what: str) -> LeakedTracerError:
    made = f"made at {t.node.loc}" if t.node.loc else f"an argument of {t.graph.name}"
    used = user_location()
    return LeakedTracerError(
        f"{what}: a traced {type_str(t.shape, t.dtype)} array of {t.graph.name} ({made}) is used outside the "
        f"trace that made it{at(used)}. A traced value lives only while its function is being traced: "
        "storing it on a model, in a global or in a closure and reading it in a later call (or in another "
        "function's trace) has no meaning. Return it from the traced function instead, or compute it "
        "where it is used.")


def inline(graph: Graph, in_values, target: Graph | None = None):
    """Re-emit the nodes of `graph` in the trace `target` (default: the
    innermost trace in progress), its inputs standing for `in_values`
    (tracers or arrays); returns the values of its outputs.  Each node goes
    through bind_into, so tracers of enclosing traces are captured as usual."""
    target = target if target is not None else active_graph()
    env = dict(zip(graph.inputs, in_values))
    for n in graph.nodes:
        if n in env:
            continue
        if n.op == "const":
            env[n] = n.value
            continue
        with source_location(n.loc):
            env[n] = bind_into(target, PRIMITIVES[n.op], [env[i] for i in n.inputs], n.attrs)
    return [env[o] for o in graph.outputs]


def _as_const(a):
    from .backends import backend_of
    if isinstance(a, np.generic):
        return np.asarray(a)
    backend_of(a)  # raises a clear error for unsupported types
    return a


def _checked_type(prim, avals, attrs, loc):
    try:
        return infer_type(prim, avals, attrs)
    except AvalonError as e:
        if loc and "(at " not in str(e):
            raise type(e)(f"{e}{at(loc)}") from None
        raise


def _eager(prim, args, attrs):
    from .backends import backend_of_args
    # the backend first: it refuses a foreign array (a torch tensor) with a clear error
    backend, _ = backend_of_args([a for a in args if not isinstance(a, _PY_SCALARS)], prim.name)
    ref = _reference_dtype(args)
    arrays = [backend.asarray(weak_scalar(a, ref)) if isinstance(a, _PY_SCALARS)
              else (backend.asarray(a) if isinstance(a, np.generic) else a) for a in args]
    _checked_type(prim, arrays, attrs, user_location() if prim.shape_rule else None)
    result = backend.run(prim, arrays, attrs)
    if anomaly.is_enabled():
        anomaly.check_eager(prim, arrays, result, backend.xp, user_location())
    return result


def bind_on(backend, prim: Primitive, attrs):
    """Apply a primitive that has no array inputs (random, full) on a backend."""
    return backend.run(prim, [], attrs)
