"""Vectorizing map (avalon.vmap) as a graph-to-graph transformation: batch_graph.

`vmap(f, in_axes, out_axes)` runs f on a batch of examples at once.  f is
traced with ONE example's shapes (each mapped argument's batch axis removed);
`batch_into` then re-emits that graph node by node in the enclosing trace,
calling each primitive's batching rule (`Primitive.rule("batching")`, see
avalon.ops._batching) on the batched values.  A node none of whose operands
depends on the batch is re-emitted as it is (computed once, shared by every
example).  The result is one batched graph, never a Python loop over the
examples, which the passes optimize like any other (`batch_graph` gives it as
a graph of its own).

`in_axes` / `out_axes` follow JAX: an int (the batch axis of every array;
negative counts from the end), None (not mapped: the same value for every
example), or a structure matching the arguments (a tuple with one entry per
argument, each an int, None, or a list/tuple/dict matching that argument) or
the outputs.
"""
from __future__ import annotations

from . import tree
from .errors import AvalonError, MissingRuleError, ShapeError, at, user_location
from .graph import Graph, type_str
from .ops import _batching
from .ops._batching import NOT_MAPPED
from .primitive import PRIMITIVES, Tracer, active_graph, bind_into, source_location, tracing


class _Aval:
    """The shape and dtype of a value, for tracing (an example of a batched argument)."""
    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype


# -- axis specifications ---------------------------------------------------------------

def leaf_axes(spec, treedef, leaves, what: str):
    """The batch axis (int or None) of each array leaf of the structure
    `treedef` (whose leaves are `leaves`), read from `spec`: an int, None, or a
    structure matching a prefix of the tree, as in JAX.  Returns (treedef,
    leaves, axes): one array reached at two places (an alias: `f(x, x)`) stays
    one leaf where both places have the same axis (tied weights keep their tie
    for a grad inside), and becomes two leaves where they differ
    (`in_axes=(0, None)` on `f(x, x)`).  `what` names spec in errors."""
    walk = _AxesWalk(leaves)
    td = walk.match(spec, treedef, what, what)
    return td, walk.leaves, walk.axes


class _AxesWalk:
    """The tree walked in flattening order with its spec, leaves renumbered."""

    def __init__(self, leaves):
        self.given, self.counter = leaves, 0
        self.leaves, self.axes = [], []
        self.placed: dict = {}     # original leaf number -> (new number, axis)

    def match(self, spec, td, path, what):
        if spec is None or _is_int(spec):
            return self.apply(spec, td)
        if td is tree.ARRAY or td is tree.FROZEN or isinstance(td, (tree.Alias, tree.Static)):
            value = "not an array" if isinstance(td, tree.Static) else "an array"
            raise AvalonError(f"vmap: {what} gives {type(spec).__name__} {spec!r} at {path}, where the value is "
                              f"{value}; an array's axis must be an int or None{at(user_location())}")
        if isinstance(spec, (list, tuple)) and (td.kind in (list, tuple) or hasattr(td.kind, "_fields")):
            if len(spec) != len(td.children):
                raise AvalonError(f"vmap: {what} at {path} has {len(spec)} entries for a value of "
                                  f"{len(td.children)} items; give one axis (int or None) per item, or one "
                                  f"int/None for all{at(user_location())}")
            children = [self.match(s, c, f"{path}[{k}]", what) for k, (s, c) in enumerate(zip(spec, td.children))]
            return tree.TreeDef(td.kind, td.meta, children)
        if isinstance(spec, dict) and isinstance(td.kind, type) and issubclass(td.kind, dict):
            if set(spec) != set(td.meta):
                raise AvalonError(f"vmap: {what} at {path} has keys {sorted(map(str, spec))} for a dict with keys "
                                  f"{sorted(map(str, td.meta))}{at(user_location())}")
            children = [self.match(spec[key], c, f"{path}[{key!r}]", what) for key, c in zip(td.meta, td.children)]
            return tree.TreeDef(td.kind, td.meta, children)
        kind = td.kind.__name__ if isinstance(td.kind, type) else "an object"
        raise AvalonError(f"vmap: {what} at {path} is a {type(spec).__name__}, which does not match the value "
                          f"there ({kind}); give an int or None for it, or a structure of the same kind"
                          f"{at(user_location())}")

    def apply(self, axis, td):
        """Every leaf of the subtree `td` gets `axis`."""
        if td is tree.ARRAY or td is tree.FROZEN:
            k = self.counter
            self.counter += 1
            self.placed[k] = (self.add(self.given[k], axis), axis, td)
            return td
        if isinstance(td, tree.Alias):
            new, first_axis, mark = self.placed[td.index]
            if first_axis == axis:
                return tree.Alias(new)
            self.add(self.given[td.index], axis)   # the same array, batched another way: a leaf of its own
            return mark
        if isinstance(td, tree.Static):
            return td
        return tree.TreeDef(td.kind, td.meta, [self.apply(axis, c) for c in td.children])

    def add(self, leaf, axis) -> int:
        self.leaves.append(leaf)
        self.axes.append(axis)
        return len(self.leaves) - 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_axes_spec(spec, what: str, path: str = "") -> None:
    """Refuse an in_axes/out_axes that is not an int, None, or a list, tuple or
    dict of those (checked when vmap is called, not at the first batch)."""
    path = path or what
    if spec is None or _is_int(spec):
        return
    if isinstance(spec, (list, tuple)):
        for k, s in enumerate(spec):
            check_axes_spec(s, what, f"{path}[{k}]")
        return
    if isinstance(spec, dict):
        for key, s in spec.items():
            check_axes_spec(s, what, f"{path}[{key!r}]")
        return
    raise AvalonError(f"vmap: {path} is {type(spec).__name__} {spec!r}{at(user_location())}; {what} holds ints "
                      "(batch axes), None (not mapped), and lists, tuples or dicts of those matching the "
                      "arguments or outputs")


# -- the transformation ---------------------------------------------------------------

def batch_size_of(leaves, axes, paths) -> int:
    """The number of examples: the common extent of the mapped leaves' batch
    axes (`paths` name the leaves in errors: two that disagree, an axis out of
    range, no mapped leaf at all)."""
    size, first = None, None
    for x, d, p in zip(leaves, axes, paths):
        if d is NOT_MAPPED:
            continue
        nd = len(x.shape)
        if not -nd <= d < nd:
            raise ShapeError(f"vmap: in_axes asks for axis {d} of {p}, which has shape {tuple(x.shape)} "
                             f"(rank {nd}){at(user_location())}; an argument mapped along an axis needs it: pass "
                             "None in in_axes for an argument every example shares")
        n = int(x.shape[d])
        if size is None:
            size, first = n, f"{p} (axis {d}, shape {tuple(x.shape)})"
        elif n != size:
            raise ShapeError(f"vmap: the mapped arguments disagree on the batch size: {first} has {size} "
                             f"examples but {p} (axis {d}, shape {tuple(x.shape)}) has {n}"
                             f"{at(user_location())}; every mapped argument needs the same size on its batch "
                             "axis (use None in in_axes for arguments shared by every example)")
    if size is None:
        raise AvalonError(f"vmap: no argument is mapped (in_axes is None for every array){at(user_location())}; "
                          "vmap needs at least one argument with a batch axis")
    return size


def example_aval(x, d):
    """The shape and dtype of one example of x (batch axis d removed)."""
    if d is NOT_MAPPED:
        return _Aval(x.shape, x.dtype)
    d = d % len(x.shape)
    return _Aval(tuple(x.shape[:d]) + tuple(x.shape[d + 1:]), x.dtype)


def batch_into(graph: Graph, values, dims, size: int):
    """Re-emit the nodes of `graph` (traced for one example) in the trace in
    progress, its inputs standing for `values` whose batch axes are `dims`
    (NOT_MAPPED: shared by every example); returns (value, dim) per output."""
    target = active_graph()
    env = {inp: (v, _norm(d, v)) for inp, v, d in zip(graph.inputs, values, dims)}
    with _batching.batch_of(size):
        for n in graph.nodes:
            if n in env:
                continue
            if n.op == "const":
                env[n] = (n.value, NOT_MAPPED)
                continue
            with source_location(n.loc):
                env[n] = _batch_node(target, n, [env[i] for i in n.inputs], size)
    return [env[o] for o in graph.outputs]


def _batch_node(target, n, operands, size):
    prim = PRIMITIVES[n.op]
    args = [v for v, _ in operands]
    dims = [d for _, d in operands]
    if all(d is NOT_MAPPED for d in dims) and not prim.draws_random:
        return bind_into(target, prim, args, n.attrs), NOT_MAPPED
    try:
        rule = prim.rule("batching")
    except MissingRuleError as e:
        raise MissingRuleError(f"vmap: {e}{at(n.loc)}; until it has one, vmap cannot batch {n.op!r}: call the "
                               "function once per example instead") from None
    try:
        out, d = rule(args, dims, **n.attrs)
    except AvalonError as e:   # a rule refusing (assign into a shared array): say where
        if n.loc and "(at " not in str(e):
            raise type(e)(f"{e}{at(n.loc)}") from None
        raise
    d = _norm(d, out)
    _check_rule_result(n, out, d, size)
    return out, d


def _norm(d, v):
    return d if d is NOT_MAPPED else d % len(v.shape)


def _check_rule_result(n, out, d, size):
    """A rule's output must be the node's example value with a batch axis of
    `size` at d: a rule giving anything else is a bug of that rule, said here
    rather than as a wrong answer further on."""
    want = n.shape if d is NOT_MAPPED else n.shape[:d] + (size,) + n.shape[d:]
    if tuple(out.shape) != tuple(want) or out.dtype != n.dtype:
        raise AvalonError(f"vmap: the batching rule of {n.op!r} returned {type_str(out.shape, out.dtype)} with "
                          f"batch axis {d}, but one example is {type_str(n.shape, n.dtype)} and the batch has "
                          f"{size} examples (expected {type_str(want, n.dtype)}){at(n.loc)}")


def move_batch_axis(x, d, to, size: int):
    """x (batch axis d, or NOT_MAPPED) with its batch axis at `to`; an unmapped
    x is broadcast over the batch."""
    from . import ops
    if to is NOT_MAPPED:
        return x
    if d is NOT_MAPPED:
        x = ops.broadcast_to(ops.expand_dims(x, 0), (size,) + tuple(x.shape))
        d = 0
    nd = len(x.shape)
    if not -nd <= to < nd:
        raise ShapeError(f"vmap: out_axes asks for axis {to} of an output of rank {nd} (with its batch axis)"
                         f"{at(user_location())}")
    to = to % nd
    if to == d:
        return x
    perm = [k for k in range(nd) if k != d]
    perm.insert(to, d)
    return ops.transpose(x, tuple(perm))


def batch_graph(graph: Graph, in_dims, size: int, out_dims=0) -> Graph:
    """The graph-to-graph form: `graph`, traced for one example, becomes a graph
    over batches of `size` examples, its input k carrying the batch axis at
    in_dims[k] (NOT_MAPPED: shared by every example) and its output j at
    out_dims[j] (an int: the same for every output)."""
    if not isinstance(out_dims, (list, tuple)):
        out_dims = [out_dims] * len(graph.outputs)
    g = Graph(graph.name + "_vmap")
    values = []
    with tracing(g):
        for inp, d in zip(graph.inputs, in_dims):
            d = d if d is NOT_MAPPED else d % (len(inp.shape) + 1)   # an axis of the batched input
            shape = inp.shape if d is NOT_MAPPED else inp.shape[:d] + (size,) + inp.shape[d:]
            values.append(Tracer(g, g.add_input(shape, inp.dtype, inp.attrs.get("name"))))
        outs = batch_into(graph, values, in_dims, size)
        moved = [move_batch_axis(v, d, to, size) for (v, d), to in zip(outs, out_dims)]
        g.outputs = [bind_const(g, m) for m in moved]
    return g


def bind_const(g, v):
    """The node of `g` for v (a tracer of g, or an array: a constant)."""
    return v.node if isinstance(v, Tracer) else g.add_const(v)


# -- the traced function vmap compiles ---------------------------------------------------

class Vectorized:
    """f over a batch: called with the batched arguments (arrays or tracers of
    a trace in progress), it traces f for one example and emits the batched
    graph into the trace in progress.  VmapFunction traces this."""

    def __init__(self, f, in_axes, out_axes, name):
        self.f, self.in_axes, self.out_axes, self.name = f, in_axes, out_axes, name
        # named and located as f, so graphs and retrace messages point at the user's function
        self.__qualname__ = self.__name__ = name
        self.__code__ = getattr(f, "__code__", None) or getattr(getattr(f, "__call__", None), "__code__", None)

    def __call__(self, *args):
        from .api import _trace
        leaves, treedef = tree.flatten(args, is_leaf=lambda x: isinstance(x, Tracer))
        spec = tuple(self.in_axes) if isinstance(self.in_axes, list) else self.in_axes
        treedef, leaves, axes = leaf_axes(spec, treedef, leaves, "in_axes")
        paths = tree.leaf_paths(treedef, "args")
        size = batch_size_of(leaves, axes, paths)
        inner = _trace(self.f, [example_aval(x, d) for x, d in zip(leaves, axes)], treedef, self.name)
        captures = list(inner.__dict__.get("captures", ()))
        outs = batch_into(inner, list(leaves) + captures, list(axes) + [NOT_MAPPED] * len(captures), size)
        out_tree, outs, out_axes = leaf_axes(self.out_axes, inner.out_tree, outs, "out_axes")
        results = [self._place(v, d, to, size, k, out_tree) for k, ((v, d), to) in enumerate(zip(outs, out_axes))]
        return tree.unflatten(out_tree, results)

    def _place(self, v, d, to, size, k, out_tree):
        if to is NOT_MAPPED and d is not NOT_MAPPED:
            paths = tree.leaf_paths(out_tree, "output")
            raise AvalonError(f"vmap: out_axes is None for {paths[k]}, but it differs between examples (it "
                              f"depends on a mapped argument){at(user_location())}; give it an int out_axes "
                              "(where its batch axis goes), or return only values every example shares there")
        return move_batch_axis(v, d, to, size)
