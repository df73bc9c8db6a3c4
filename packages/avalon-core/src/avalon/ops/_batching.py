"""Batching rules: how each primitive runs on a batch of examples (avalon.vmap).

A rule is declared in the primitive's registration block,
``defprim(..., batching=rule)``, and read by the vmap transformation with
``Primitive.rule("batching")`` (a primitive without one raises
MissingRuleError naming it):

    rule(args, dims, **attrs) -> (out, out_dim)

* ``args``: the operands, values of the batched trace (tracers, or arrays for
  constants);
* ``dims[i]``: the axis of ``args[i]`` that indexes the examples, or
  ``NOT_MAPPED`` (None) when ``args[i]`` is the same for every example; at
  least one operand is mapped, except for a ``draws_random`` primitive, whose
  rule vmap always calls (each example draws its own numbers; a draw has no
  operand to read the batch size from: see ``current_batch_size``);
* ``attrs``: the node's attributes, written for one example (a reshape's
  target shape, a sum's axes): the rule translates them;
* the result: the batched output, computed with avalon ops (``bind`` on
  primitives, or the public functions) on those values, and the axis of it
  that indexes the examples (any axis: vmap moves it where it is asked for).

A rule works on the whole batch at once: it never loops over the examples in
Python (vmap's promise is one batched graph).  The helpers below are shared by
the rules of several files.
"""
from __future__ import annotations

import contextlib as _contextlib
import threading as _threading

NOT_MAPPED = None


def batch_size(args, dims) -> int:
    """The number of examples: the extent of any mapped operand's batch axis."""
    for a, d in zip(args, dims):
        if d is not NOT_MAPPED:
            return int(a.shape[d])
    raise ValueError("a batching rule was called with no mapped operand")


def move_to_front(x, d):
    """x with its batch axis `d` moved to axis 0 (x itself when it is there)."""
    from . import transpose
    if d is NOT_MAPPED or d == 0:
        return x
    nd = len(x.shape)
    d = d % nd
    return transpose(x, *((d,) + tuple(i for i in range(nd) if i != d)))


def broadcast_batch(x, d, size: int):
    """x with a batch axis at the front: moved there if x is mapped, else the
    same value for every example (a broadcast, no copy)."""
    from . import broadcast_to, expand_dims
    if d is not NOT_MAPPED:
        return move_to_front(x, d)
    return broadcast_to(expand_dims(x, 0), (size,) + tuple(x.shape))


def example_ndim(x, d) -> int:
    """The rank of one example of x."""
    return len(x.shape) - (0 if d is NOT_MAPPED else 1)


def align_for_broadcast(args, dims):
    """Operands of an elementwise op with NumPy broadcasting, each mapped one's
    batch axis moved to the front and padded with size-1 axes to the examples'
    common rank, so the batch axes line up at axis 0 and the rest broadcast as
    they did for one example; unmapped operands are left as they are (they
    broadcast against the trailing axes).  Returns the operands."""
    from . import reshape
    rank = max(example_ndim(a, d) for a, d in zip(args, dims))
    out = []
    for a, d in zip(args, dims):
        if d is NOT_MAPPED:
            out.append(a)
            continue
        a = move_to_front(a, d)
        missing = rank - (len(a.shape) - 1)
        if missing:
            a = reshape(a, *((a.shape[0],) + (1,) * missing + tuple(a.shape[1:])))
        out.append(a)
    return out


def elementwise_rule(prim):
    """The batching rule of an elementwise primitive (any arity): batch axes
    aligned at the front (see align_for_broadcast), then the primitive itself.
    `prim` is the Primitive or its name (looked up when the rule runs, so a
    registration block can name its own primitive)."""
    from ..primitive import PRIMITIVES, bind

    def rule(args, dims, **attrs):
        p = PRIMITIVES[prim] if isinstance(prim, str) else prim
        return bind(p, tuple(align_for_broadcast(args, dims)), attrs), 0
    return rule


# -- folding the examples into an axis the primitive already has ---------------------------------
# (shared by the rules of ops/nn.py: a convolution or a pooling runs on a batch
# of examples as ONE call of itself, with the examples merged into its N axis,
# its channel axis or its groups)

def _example_axes(rank, d, axis, outer):
    """Labels of the axes of a batched operand once the example's axis `axis`
    is split into (outer, inner) (no outer part when outer == 1), and of the
    folded order: the batch right after the outer part."""
    split = [("e", i) for i in range(axis)] + ([("o",)] if outer > 1 else []) + [("i",)] + \
            [("e", i) for i in range(axis + 1, rank)]
    at = d if d <= axis else d + (1 if outer > 1 else 0)   # the batch axis among the split axes
    batched = split[:at] + [("b",)] + split[at:]
    k = split.index(("i",))
    folded = split[:k] + [("b",)] + split[k:]
    return batched, folded


def fold_batch(x, d, axis: int, outer: int = 1):
    """A mapped operand as one example-shaped array, its batch axis `d` merged
    into the example's axis `axis`.

    The example's axis (size n) is read as (outer, n // outer) and the examples
    go between the two: the merged axis, of size outer * B * (n // outer),
    runs over (outer block, example, inner index).  With outer == 1 example b
    owns entries b*n .. b*n + n - 1 of it (examples stacked along N, or along
    channels); with outer = groups each group's block holds every example's
    share of that group (the channel order of a grouped convolution whose
    groups are the original ones).  `unfold_batch` undoes it on a result."""
    from . import reshape, transpose
    shape = list(x.shape)
    rank = len(shape) - 1
    d = d % (rank + 1)
    size = shape.pop(d)
    n = shape[axis]
    if n % outer:
        raise ValueError(f"fold_batch: axis {axis} of size {n} does not split into {outer} blocks")
    parts = ([outer] if outer > 1 else []) + [n // outer]
    example = shape[:axis] + parts + shape[axis + 1:]
    batched, folded = _example_axes(rank, d, axis, outer)
    sizes = dict(zip([lab for lab in batched if lab != ("b",)], example))
    sizes[("b",)] = size
    merged = tuple(shape[:axis] + [n * size] + shape[axis + 1:])
    if [lab for lab in batched if sizes[lab] != 1] == [lab for lab in folded if sizes[lab] != 1]:
        return reshape(x, merged)   # only size-1 axes move (a vmapped example's N = 1): no transpose
    x = reshape(x, tuple(sizes[lab] for lab in batched))
    x = transpose(x, tuple(batched.index(lab) for lab in folded))
    return reshape(x, merged)


def unfold_batch(y, axis: int, size: int, outer: int = 1):
    """The inverse of fold_batch on a result: y's axis `axis` runs over
    (outer block, example, inner index) for `size` examples; returns
    (the batched result, its batch axis), the batch axis at `axis`."""
    from . import reshape, transpose
    shape = list(y.shape)
    n = shape[axis] // size
    if outer == 1:
        return reshape(y, tuple(shape[:axis] + [size, n] + shape[axis + 1:])), axis
    y = reshape(y, tuple(shape[:axis] + [outer, size, n // outer] + shape[axis + 1:]))
    perm = list(range(len(shape) + 2))
    perm[axis], perm[axis + 1] = perm[axis + 1], perm[axis]
    y = transpose(y, tuple(perm))
    return reshape(y, tuple(shape[:axis] + [size, n] + shape[axis + 1:])), axis
# -- the batch size of the vmap in progress (added for avalon.vmap) -------------------------
# A primitive with no operands (a random draw) has no mapped operand to read the
# batch size from: vmap gives its rule every draws_random node, and the rule
# reads the size here.

_sizes = _threading.local()


@_contextlib.contextmanager
def batch_of(size: int):
    """Mark `size` as the number of examples of the vmap being emitted (nested
    vmaps stack: the innermost is current)."""
    stack = _sizes.__dict__.setdefault("stack", [])
    stack.append(int(size))
    try:
        yield
    finally:
        stack.pop()


def current_batch_size() -> int:
    """The number of examples of the innermost vmap being emitted (for rules
    of ops with no operand, such as random draws)."""
    stack = _sizes.__dict__.get("stack")
    if not stack:
        raise ValueError("current_batch_size() is read only inside a batching rule called by avalon.vmap")
    return stack[-1]
# -- shared by the rules of indexing.py, sort_scan.py, remat.py, distributed/ops.py --------
# (ops along one axis, ops whose attributes name an axis or an output shape, identities)

def _primitive(prim):
    """A Primitive, or its name looked up when the rule runs (so a rule can be
    given in the primitive's own registration block: defprim(name, ...,
    batching=shifted_axis_rule(name)))."""
    if isinstance(prim, str):
        from ..primitive import PRIMITIVES
        return PRIMITIVES[prim]
    return prim


def shifted_axis_rule(prim, shape_attr=None):
    """The batching rule of a primitive (or its name) that works along the axis in its
    attribute `axis` (cumsum, argsort, concatenate, take_along_axis): every
    operand's batch axis goes to the front (an unmapped operand is broadcast,
    a view: the operands of these ops share their leading axes), and `axis`
    moves one place on.  `shape_attr` names an attribute holding the output
    shape of one example (take_along_axis_grad's "shape"): the batch is
    prepended to it.  The result is batched at axis 0."""
    from ..primitive import bind

    def rule(args, dims, **attrs):
        size = batch_size(args, dims)
        p = _primitive(prim)
        attrs = dict(attrs, axis=attrs["axis"] + 1)
        if shape_attr is not None:
            attrs[shape_attr] = (size,) + tuple(attrs[shape_attr])
        return bind(p, tuple(broadcast_batch(a, d, size) for a, d in zip(args, dims)), attrs), 0
    return rule


def identity_rule(prim):
    """The batching rule of a one-operand primitive that acts on each element
    alone and whose attributes do not depend on the shape (remat_barrier, the
    all-reduce across processes): the primitive on the batched operand, whose
    batch axis stays where it is."""
    from ..primitive import bind

    def rule(args, dims, **attrs):
        (x,), (d,) = args, dims
        return bind(_primitive(prim), (x,), attrs), d
    return rule


#: Primitives with no operands (the random draws) are batched too: each
#: example must get numbers of its own, not one draw shared by the batch.  vmap
#: calls their rule with no operands and the number of examples as a keyword:
#:     rule((), (), axis_size=n, **attrs) -> (out, 0)
#: (for a primitive whose `draws_random` is set, even though no operand is mapped).
AXIS_SIZE = "axis_size"
