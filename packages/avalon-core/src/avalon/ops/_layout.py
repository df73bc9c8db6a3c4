"""Layout rules: how each primitive takes part in the batch-innermost layout.

The CPU's layout pass (avalon.passes.layout) stores the activations of
convolutional stacks as (C, *spatial, N) instead of PyTorch's (N, C, *spatial).
It first chooses the values stored that way, then rebuilds the graph node by
node, asking each op's rule (`defprim(..., layout=LayoutRule(...))`):

* converts(node): the node has a batch-innermost form of its own (a convolution,
  a max pooling); a graph with no such node is left alone;
* batch_last(node, chosen): the node's value is stored batch-innermost, given
  the values chosen before it;
* rewrite(rw, node): the node in the new graph, as (new node, layout), or None
  for the usual layout.

`rw`, the pass's rewriter, offers rw.get(old, layout) (an old value in a layout,
one transpose inserted on first need), rw.emit(op, inputs, attrs, shape, dtype,
loc), rw.small_operand(old, ndim) (a broadcast operand permuted to match) and
rw.chosen (the values stored batch-innermost) and rw.options (what the backend
asked of the pass: "direct_convs").  An op without a layout rule
reads and writes the usual layout.
"""
from __future__ import annotations

NC, CSN = "NC", "CSN"


def to_csn(shape):
    return tuple(shape[1:]) + (shape[0],)


class LayoutRule:
    """An op's part in the layout pass; see the module docstring."""

    def __init__(self, rewrite, *, converts=None, batch_last=None):
        self.rewrite = rewrite
        self.converts = converts or (lambda node: False)
        self.batch_last = batch_last or (lambda node, chosen: False)


def batch_innermost(rewrite, *, output=CSN):
    """The rule of an op with a batch-innermost form (convolutions with groups
    == 1, max pooling, their gradients) on activations with 1 to 3 spatial
    axes; `output` is the layout of its result (a weight gradient's is NC)."""
    def converts(node):
        return node.attrs.get("groups", 1) == 1 and 3 <= len(node.inputs[0].shape) <= 5

    def rewrite_converted(rw, node):
        return rewrite(rw, node) if converts(node) else None

    def batch_last(node, chosen):
        return output == CSN and converts(node)
    return LayoutRule(rewrite_converted, converts=converts, batch_last=batch_last)


# -- elementwise ops ----------------------------------------------------------------------------

def _pointwise_batch_last(node, chosen):
    """Full-size results computed from batch-innermost values stay batch-innermost."""
    return node.ndim >= 3 and any(i in chosen and i.shape == node.shape for i in node.inputs)


def _pointwise_rewrite(rw, node):
    if node not in rw.chosen:
        return None
    # small broadcast operands such as a bias are permuted instead: cheap
    ins = [rw.get(i, CSN) if i in rw.chosen or (i.shape == node.shape and i.ndim == node.ndim)
           else rw.small_operand(i, node.ndim) for i in node.inputs]
    return rw.emit(node.op, ins, node.attrs, to_csn(node.shape), node.dtype, node.loc), CSN


#: the layout rule of every elementwise op
POINTWISE = LayoutRule(_pointwise_rewrite, batch_last=_pointwise_batch_last)
