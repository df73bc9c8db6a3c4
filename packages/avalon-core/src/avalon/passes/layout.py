"""Layout choice: convolutional stacks run batch-innermost (a CPU pass).

PyTorch's (N, C, *spatial) layout is what users see.  Internally, the
activations between convolutions and max poolings are stored as
(C, *spatial, N): im2col becomes a few long contiguous copies and each
convolution one large matrix product (see kernels/conv_csn.py).  The pass
picks the layout of every value, asking each op's layout rule (declared in its
registration block; avalon.ops._layout explains them):

* conv / max_pool and their gradients (groups == 1) are replaced by their
  batch-innermost primitives, their activations taken in that layout;
* elementwise ops whose full-size operands are in that layout stay in it
  (small broadcast operands such as a bias are permuted instead: cheap);
* sums over such values remap their axes;
* everything else (ops without a layout rule) reads the usual layout, through
  one transpose inserted where the value is first needed that way (a graph
  input, a flatten before a linear layer).

The rewrite is local and verified with Graph.check() like any pass.
"""
from __future__ import annotations

from ..graph import Graph, Node
from ..ops._layout import CSN, NC
from ..primitive import PRIMITIVES


def _perm_to_csn(nd):
    return tuple(range(1, nd)) + (0,)


def _perm_to_nc(nd):
    return (nd - 1,) + tuple(range(nd - 1))


def _rule(node):
    """node's layout rule; None for graph inputs, constants and ops without one."""
    prim = PRIMITIVES.get(node.op)
    return prim.rule("layout", None) if prim is not None else None


class _Rewriter:
    """The new graph being built, and each old value's node and layout in it
    (what layout rules' rewrite(rw, node) use)."""

    def __init__(self, graph, chosen, options=None):
        self.g = graph
        self.chosen = chosen     # old nodes whose values are stored batch-innermost
        self.options = dict(options or {})   # what the backend asked of the rules (see `layout`)
        self.out: list[Node] = []
        self.value: dict = {}    # old node -> (new node, layout)
        self.converted: dict = {}  # (old node, layout) -> new node in that layout

    def emit(self, op, inputs, attrs, shape, dtype, loc=None):
        n = Node(op, inputs, attrs, shape, dtype, loc)
        self.out.append(n)
        return n

    def get(self, old, layout):
        """old's value in `layout`, inserting one transpose on first need."""
        new, have = self.value[old]
        if have == layout or old.ndim < 3:
            return new
        key = (old, layout)
        if key not in self.converted:
            perm = _perm_to_csn(old.ndim) if layout == CSN else _perm_to_nc(old.ndim)
            shape = tuple(new.shape[p] for p in perm)
            if old.op == "broadcast_to" and layout == CSN and have == NC:
                # a broadcast (a mean's gradient) is broadcast again from its permuted operand:
                # a transpose of it would be a strided view no kernel reads in place, and the
                # broadcast joins its consumer's fused kernel
                src = self.small_operand(old.inputs[0], old.ndim)
                self.converted[key] = self.emit("broadcast_to", [src], {"shape": shape}, shape, new.dtype, old.loc)
            else:
                self.converted[key] = self.emit("transpose", [new], {"perm": perm}, shape, new.dtype, old.loc)
        return self.converted[key]

    def small_operand(self, old, out_ndim):
        """A broadcast operand of a batch-innermost elementwise op, permuted to match."""
        new = self.get(old, NC)
        full = (1,) * (out_ndim - old.ndim) + tuple(old.shape)
        perm = _perm_to_csn(out_ndim)
        target = tuple(full[p] for p in perm)
        if tuple(new.shape) == target:
            return new
        if sum(1 for s in full if s != 1) <= 1 or full[0] == 1:
            # only the order of size-1 axes changes: a reshape is enough
            return self.emit("reshape", [new], {"shape": target}, target, new.dtype, old.loc)
        src = new if tuple(new.shape) == full else self.emit("reshape", [new], {"shape": full}, full,
                                                             new.dtype, old.loc)
        return self.emit("transpose", [src], {"perm": perm}, target, new.dtype, old.loc)


def layout(graph: Graph, *, direct_convs: bool = False) -> Graph:
    """The graph with convolutional stacks batch-innermost.  direct_convs: the
    backend builds C kernels, so convolutions that fit the direct templates
    (2-D, stride 1: kernel_ir.conv_templates) become one op each (conv_csn and
    its gradients) instead of im2col + matrix product."""
    if not any(_converts(n) for n in graph.nodes):
        return graph
    rw = _Rewriter(graph, _choose(graph), {"direct_convs": direct_convs})
    for n in graph.nodes:
        if n.op in ("input", "const"):
            rw.out.append(n)
            rw.value[n] = (n, NC)
            continue
        rule = _rule(n)
        rewritten = rule.rewrite(rw, n) if rule is not None else None
        rw.value[n] = rewritten or _usual_layout(rw, n)
    new = Graph(graph.name)
    new.nodes = rw.out
    new.inputs = list(graph.inputs)
    new.outputs = [rw.get(o, NC) for o in graph.outputs]
    for attr in ("in_tree", "out_tree"):
        if hasattr(graph, attr):
            setattr(new, attr, getattr(graph, attr))
    return new


def _converts(n):
    rule = _rule(n)
    return rule is not None and rule.converts(n)


def _usual_layout(rw, n):
    ins = [rw.get(i, NC) for i in n.inputs]
    return rw.emit(n.op, ins, n.attrs, n.shape, n.dtype, n.loc), NC


def _choose(graph):
    """The values to store batch-innermost, in graph order (each op's rule
    decides from the values chosen before it)."""
    chosen = set()
    for n in graph.nodes:
        rule = _rule(n)
        if rule is not None and rule.batch_last(n, chosen):
            chosen.add(n)
    return chosen
