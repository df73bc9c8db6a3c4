"""Fused bodies built by hand, for testing a backend's compile_fused or the
kernel IR's lowering without tracing a whole function."""
from __future__ import annotations

import numpy as np

from ..graph import Graph
from ..primitive import PRIMITIVES, infer_type


def body_of(inputs, build) -> Graph:
    """A fused body: `inputs` are (shape, dtype); build(op, *input_nodes) returns
    the output node, where op(name, *operands, **attrs) adds a node and an
    operand (value, dtype) adds a scalar constant."""
    g = Graph("fused")
    nodes = [g.add_input(s, d) for s, d in inputs]

    def op(name, *args, **attrs):
        args = [a if hasattr(a, "op") else g.add_const(np.asarray(a[0], a[1])) for a in args]
        shape, dtype = infer_type(PRIMITIVES[name], args, attrs)
        return g.add_node(name, args, attrs, shape, dtype)
    g.outputs = [build(op, *nodes)]
    return g
