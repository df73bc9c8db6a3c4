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
  least one operand is mapped;
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
    aligned at the front (see align_for_broadcast), then the primitive itself."""
    from ..primitive import bind

    def rule(args, dims, **attrs):
        return bind(prim, tuple(align_for_broadcast(args, dims)), attrs), 0
    return rule


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
