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


# -- the batch size of the vmap in progress (added for avalon.vmap) -------------------------
# A primitive with no operands (a random draw) has no mapped operand to read the
# batch size from: vmap gives its rule every draws_random node, and the rule
# reads the size here.

import contextlib as _contextlib
import threading as _threading

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
