"""Layout choice: convolutional stacks run batch-innermost.

PyTorch's (N, C, *spatial) layout is what users see.  Internally, the
activations between convolutions and max poolings are stored as
(C, *spatial, N): im2col becomes a few long contiguous copies and each
convolution one large matrix product (see kernels/conv_csn.py).  The pass
picks the layout of every value:

* conv / max_pool and their gradients (groups == 1) are replaced by their
  batch-innermost primitives, their activations taken in that layout;
* elementwise ops whose full-size operands are in that layout stay in it
  (small broadcast operands such as a bias are permuted instead: cheap);
* sums over such values remap their axes;
* everything else reads the usual layout, through one transpose inserted where
  the value is first needed that way (a graph input, a flatten before a
  linear layer).

The rewrite is local and verified with Graph.check() like any pass.
"""
from __future__ import annotations

import numpy as np

from ..graph import Graph, Node
from ..primitive import PRIMITIVES
from ..ops import layout_ops  # noqa: F401  (registers the primitives)

NC, CSN = "NC", "CSN"

# op -> (batch-innermost op, positions of activation operands); convolutions are
# written out as im2col_csn / col2im_csn and matrix products (see _conv_family)
CONVERT = {
    "conv": ("im2col_csn", (0,)),
    "conv_input_grad": ("col2im_csn", (0,)),
    "conv_weight_grad": ("im2col_csn", (0, 1)),
    "max_pool": ("max_pool_csn", (0,)),
    "max_pool_grad": ("max_pool_csn_grad", (0, 1)),
}


def to_csn(shape):
    return tuple(shape[1:]) + (shape[0],)


def _perm_to_csn(nd):
    return tuple(range(1, nd)) + (0,)


def _perm_to_nc(nd):
    return (nd - 1,) + tuple(range(nd - 1))


def _convertible(n):
    if n.op not in CONVERT or n.attrs.get("groups", 1) != 1:
        return False
    return 3 <= len(n.inputs[CONVERT[n.op][1][0]].shape) <= 5


class _Rewriter:
    def __init__(self, graph):
        self.g = graph
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


def layout(graph: Graph) -> Graph:
    if not any(_convertible(n) for n in graph.nodes):
        return graph
    csn_values = _choose(graph)
    rw = _Rewriter(graph)
    for n in graph.nodes:
        if n.op in ("input", "const"):
            rw.out.append(n)
            rw.value[n] = (n, NC)
            continue
        if _convertible(n) and n.op.startswith("conv"):
            rw.value[n] = _conv_family(rw, n)
        elif _convertible(n):
            op, acts = CONVERT[n.op]
            ins = [rw.get(i, CSN) if k in acts else rw.get(i, NC) for k, i in enumerate(n.inputs)]
            attrs = {k: v for k, v in n.attrs.items() if k != "groups"}
            if n.op == "max_pool_grad":
                # the pooled output, for comparison (CSE finds the forward's own)
                y = rw.emit("max_pool_csn", [ins[0]], attrs, ins[1].shape, n.dtype, n.loc)
                ins = [ins[0], y, ins[1]]
            if "input_shape" in attrs:
                attrs["input_shape"] = to_csn(attrs["input_shape"])
            out_layout = NC if n.op == "conv_weight_grad" else CSN
            shape = n.shape if out_layout == NC else to_csn(n.shape)
            rw.value[n] = (rw.emit(op, ins, attrs, shape, n.dtype, n.loc), out_layout)
        elif n in csn_values and PRIMITIVES[n.op].elementwise:
            ins = [rw.get(i, CSN) if i in csn_values or (i.shape == n.shape and i.ndim == n.ndim)
                   else rw.small_operand(i, n.ndim) for i in n.inputs]
            rw.value[n] = (rw.emit(n.op, ins, n.attrs, to_csn(n.shape), n.dtype, n.loc), CSN)
        elif n.op == "sum" and n.inputs[0] in csn_values:
            rw.value[n] = _sum(rw, n)
        else:
            ins = [rw.get(i, NC) for i in n.inputs]
            rw.value[n] = (rw.emit(n.op, ins, n.attrs, n.shape, n.dtype, n.loc), NC)
    new = Graph(graph.name)
    new.nodes = rw.out
    new.inputs = list(graph.inputs)
    new.outputs = [rw.get(o, NC) for o in graph.outputs]
    for attr in ("in_tree", "out_tree"):
        if hasattr(graph, attr):
            setattr(new, attr, getattr(graph, attr))
    return new


def _conv_family(rw, n):
    """conv, and its two gradients, as im2col_csn / col2im_csn and one matmul each.
    The forward product and the weight gradient read the same columns of the
    layer input, which CSE then computes once."""
    a = {k: n.attrs[k] for k in ("stride", "padding", "dilation")}
    dt, loc = n.dtype, n.loc

    def columns(x_old, kernel):
        xc = rw.get(x_old, CSN)
        shape = _im2col_shape(xc.shape, kernel, **a)
        return rw.emit("im2col_csn", [xc], dict(kernel=tuple(kernel), **a), shape, dt, loc)

    def matrix(v, shape):
        return v if tuple(v.shape) == shape else rw.emit("reshape", [v], {"shape": shape}, shape, dt, loc)

    def matmul(p, q):
        return rw.emit("matmul", [p, q], {}, (p.shape[0], q.shape[1]), dt, loc)

    def t(v):
        return rw.emit("transpose", [v], {"perm": (1, 0)}, (v.shape[1], v.shape[0]), dt, loc)

    if n.op == "conv":
        x, w = n.inputs
        cols = columns(x, w.shape[2:])
        y = matmul(matrix(rw.get(w, NC), (w.shape[0], cols.shape[0])), cols)
        return matrix(y, to_csn(n.shape)), CSN
    if n.op == "conv_weight_grad":
        x, g = n.inputs
        cols = columns(x, n.shape[2:])
        gm = matrix(rw.get(g, CSN), (g.shape[1], cols.shape[1]))
        return matrix(matmul(gm, t(cols)), n.shape), NC
    g, w = n.inputs  # conv_input_grad
    gc = rw.get(g, CSN)
    o = w.shape[0]
    cols = matmul(t(matrix(rw.get(w, NC), (o, w.size // o))), matrix(gc, (o, gc.size // o)))
    attrs = dict(input_shape=to_csn(n.attrs["input_shape"]), kernel=tuple(w.shape[2:]), **a)
    return rw.emit("col2im_csn", [cols], attrs, to_csn(n.shape), dt, loc), CSN


def _im2col_shape(xshape, kernel, *, stride, padding, dilation):
    from ..ops.layout_ops import _im2col_rule

    class _A:
        shape = xshape
        dtype = None
    return _im2col_rule(_A, kernel=kernel, stride=stride, padding=padding, dilation=dilation)[0]


def _choose(graph):
    """The values to store batch-innermost: outputs of convertible ops, and
    elementwise results of full size computed from such values."""
    chosen = set()
    for n in graph.nodes:
        if _convertible(n):
            if n.op != "conv_weight_grad":
                chosen.add(n)
        elif n.op not in ("input", "const") and PRIMITIVES[n.op].elementwise and n.ndim >= 3:
            if any(i in chosen and i.shape == n.shape for i in n.inputs):
                chosen.add(n)
    return chosen


def _sum(rw, n):
    src = rw.get(n.inputs[0], CSN)
    nd = n.inputs[0].ndim
    perm = _perm_to_csn(nd)              # position k of the CSN value holds original axis perm[k]
    axes = tuple(sorted(perm.index(a) for a in n.attrs["axes"]))
    keep = n.attrs["keepdims"]
    kept = [perm[k] for k in range(nd) if k not in axes]   # original axes, in CSN order
    shape = tuple(1 if k in axes else src.shape[k] for k in range(nd)) if keep else \
        tuple(src.shape[k] for k in range(nd) if k not in axes)
    r = rw.emit("sum", [src], {"axes": axes, "keepdims": keep}, shape, n.dtype, n.loc)
    if keep:
        return r, CSN
    if kept == sorted(kept):
        return r, NC
    order = tuple(int(k) for k in np.argsort(kept))
    t = rw.emit("transpose", [r], {"perm": order}, n.shape, n.dtype, n.loc)
    return t, NC
