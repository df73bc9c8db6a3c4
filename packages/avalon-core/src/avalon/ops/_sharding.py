"""Sharding rules: how a batch split across threads flows through each primitive.

The batch-split analysis (avalon.passes.sharding) gives every value a state:

* R, replicated: the same in every thread (weights, values computed from them);
* P, a partial sum: the threads' values add up to the value of the unsplit step;
* S(axis, stride), sharded: each thread holds 1/shards of `axis`, the batch being
  a factor of that axis whose consecutive entries lie `stride` apart (1: the
  batch is the axis, or its innermost factor after a reshape merged axes).

A primitive's sharding rule, declared in its registration block
(`defprim(..., sharding=rule)`), gives its result's state from its operands':

    rule(node, states, ctx) -> state

`ctx.n` is the batch size; `ctx.sub_graph(node, body, states)` propagates
through a sub-graph the node holds (a fused group's body).  A rule raises
NoSplit when the op cannot run split (the step then runs whole), or
NeedsReduce(operand) when a partial sum must be summed over the threads before
the op reads it.  The rules shared by families of ops are here; the others sit
next to their primitive.
"""
from __future__ import annotations

R, P = ("R",), ("P",)


def S(axis, stride=1):
    return ("S", axis, stride)


class NoSplit(Exception):
    """The op cannot run on shards of the batch: the step runs whole."""


class NeedsReduce(Exception):
    """A partial sum is used non-linearly: it must be summed over the shards
    (an all-reduce between the threads) before that use."""

    def __init__(self, node):
        super().__init__(node)
        self.node = node


def first_partial(node, states):
    return node.inputs[states.index(P)]


def on_sharded(rule, *, reads_partials=False):
    """The rule of an op that gives a replicated result from replicated operands;
    `rule` is asked only when an operand is sharded (or partial, when the op reads
    partial sums linearly: reads_partials).  Other partial operands are summed
    over the threads first."""
    def sharding(node, states, ctx):
        if P in states and not reads_partials:
            raise NeedsReduce(first_partial(node, states))
        if all(s == R for s in states):
            return R
        return rule(node, states, ctx)
    sharding.__name__ = getattr(rule, "__name__", "sharding")
    return sharding


def _unsplittable(node, states, ctx):
    raise NoSplit(f"no sharding rule for {node.op}")


#: what the analysis does for an op with no sharding rule: it runs on replicated
#: values (partial sums summed first); a sharded operand leaves the step whole
WITHOUT_RULE = on_sharded(_unsplittable)


# -- elementwise ops --------------------------------------------------------------------------

def all_partial(states):
    """add, sub, neg, cast: partial sums in, partial sum out."""
    return all(s == P for s in states)


def one_partial(states):
    """mul: a partial sum times a replicated value."""
    return states.count(P) == 1 and all(s in (P, R) for s in states)


def partial_numerator(states):
    """div: a partial sum divided by a replicated value."""
    return states[0] == P and all(s == R for s in states[1:])


def pointwise(partials=None):
    """The sharding rule of an elementwise op: operands sharded on one axis give
    a result sharded on it; `partials(states)` says when partial sums may pass
    through (the op is linear in them)."""
    def sharding(node, states, ctx):
        if all(s == R for s in states):
            return R
        if P in states:
            if partials is None or not partials(states):
                raise NeedsReduce(first_partial(node, states))
            return P
        return _pointwise_axis(node, states)
    return sharding


def _pointwise_axis(node, states):
    axis = stride = None
    for i, s in zip(node.inputs, states):
        if s == R:
            continue
        a = s[1] + (node.ndim - i.ndim)
        if i.shape[s[1]] != node.shape[a]:
            raise NoSplit("broadcast along the batch axis")
        if axis is not None and (axis, stride) != (a, s[2]):
            raise NoSplit("operands sharded on different axes")
        axis, stride = a, s[2]
    for i, s in zip(node.inputs, states):  # replicated operands must not vary along the batch axis
        if s == R:
            k = axis - (node.ndim - i.ndim)
            if k >= 0 and i.shape[k] != 1:
                raise NoSplit(f"{node.op}: a replicated operand spans the batch axis")
    return S(axis, stride)


# -- values made from nothing: fills and random draws ----------------------------------------

def created(node, states, ctx):
    """A fill or a random draw whose shape has the batch size on an axis is
    sharded on it (its values do not depend on the position)."""
    for k, size in enumerate(node.shape):
        if size == ctx.n:
            return S(k)
    return R
