"""Common-subexpression elimination: one node per (op, inputs, attributes);
small equal constants are merged too.  Effectful ops (random) are never merged."""
import numpy as np

from ..backends.base import _freeze
from ..primitive import PRIMITIVES

_SMALL_CONST = 64


def _key(n, rename):
    if n.op == "const":
        v = n.value
        if not isinstance(v, np.ndarray) or v.size > _SMALL_CONST:
            return None
        return ("const", v.shape, v.dtype.str, v.tobytes())
    if n.op == "input":
        return None
    prim = PRIMITIVES.get(n.op)
    if prim is None or prim.effectful:
        return None
    try:
        attrs = _freeze(n.attrs)
        hash(attrs)
    except TypeError:
        return None
    return (n.op, tuple(rename.get(i, i).id for i in n.inputs), attrs)


def cse(graph):
    seen = {}
    rename = {}
    keep = []
    for n in graph.nodes:
        if rename:
            n.inputs = [rename.get(i, i) for i in n.inputs]
        k = _key(n, rename)
        if k is not None and k in seen:
            rename[n] = seen[k]
            continue
        if k is not None:
            seen[k] = n
        keep.append(n)
    graph.nodes = keep
    graph.outputs = [rename.get(o, o) for o in graph.outputs]
    return graph
