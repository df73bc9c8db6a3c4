"""The graph IR: a list of SSA nodes in topological order.

Each `Node` is one value: the primitive that computes it (`op`), its input
nodes, static attributes, its shape and dtype, and the line of user code that
created it.  Two ops are not primitives: "input" (an argument of the graph) and
"const" (a value known at compile time, held in `node.value`).  A `Graph` is
editable (insert, replace, remove, rewire) and `graph.check()` verifies it.
`str(graph)` is a stable text form, one node a line.
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from .errors import GraphError

_ids = itertools.count()

DTYPE_NAMES = {"float16": "f16", "float32": "f32", "float64": "f64", "int8": "i8", "int16": "i16",
               "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "bool"}


def as_const_value(value):
    """Constants are arrays: NumPy scalars and Python numbers become 0-d
    NumPy arrays, so every pass (folding, CSE, simplification, fusion) sees
    one kind of value; device arrays are kept as they are."""
    if isinstance(value, (np.generic, bool, int, float, complex)):
        return np.asarray(value)
    return value


def type_str(shape, dtype) -> str:
    return f"{_dtype_name(dtype)}[{','.join(str(s) for s in shape)}]"


@functools.lru_cache(maxsize=None)
def _dtype_name(dtype) -> str:
    # np.dtype.name is computed in Python at each read (~3 us): code generation asks it per node
    name = np.dtype(dtype).name
    return DTYPE_NAMES.get(name, name)


class Node:
    __slots__ = ("id", "op", "inputs", "attrs", "shape", "dtype", "loc", "value", "__weakref__")

    def __init__(self, op, inputs, attrs, shape, dtype, loc=None, value=None):
        self.id = next(_ids)
        self.op = op
        self.inputs = list(inputs)
        self.attrs = dict(attrs)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.loc = loc
        self.value = as_const_value(value) if op == "const" else value

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)   # Python ints: np.prod costs ~5 us a call, and sizes are asked often

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    def __repr__(self):
        return f"<Node {self.op} {type_str(self.shape, self.dtype)} #{self.id}>"


def _attr_str(v) -> str:
    if isinstance(v, np.dtype):
        return v.name
    if isinstance(v, type) and issubclass(v, np.generic):
        return np.dtype(v).name
    if isinstance(v, np.ndarray):
        return f"<array {type_str(v.shape, v.dtype)}>"
    if isinstance(v, Graph):
        return "<graph>"
    return repr(v)


def _const_str(v) -> str:
    a = np.asarray(v) if isinstance(v, (np.ndarray, np.generic, float, int, bool)) else None
    if a is not None and a.size == 1:
        return repr(a.item())
    return f"<{type(v).__name__} {type_str(v.shape, v.dtype)}>"


class Graph:
    """An editable SSA graph.  `inputs` and `outputs` are lists of nodes;
    `nodes` holds every node (inputs and consts included) in topological order."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self.inputs: list[Node] = []
        self.nodes: list[Node] = []
        self.outputs: list[Node] = []

    # -- building -----------------------------------------------------------
    def add_input(self, shape, dtype, name=None) -> Node:
        n = Node("input", (), {"name": name} if name else {}, shape, dtype)
        self.inputs.append(n)
        self.nodes.append(n)
        return n

    def add_const(self, value, loc=None) -> Node:
        n = Node("const", (), {}, value.shape, value.dtype, loc=loc, value=value)
        self.nodes.append(n)
        return n

    def add_node(self, op, inputs, attrs, shape, dtype, loc=None) -> Node:
        n = Node(op, inputs, attrs, shape, dtype, loc=loc)
        self.nodes.append(n)
        return n

    # -- editing ------------------------------------------------------------
    def insert_before(self, anchor: Node, node: Node) -> Node:
        self.nodes.insert(self.nodes.index(anchor), node)
        return node

    def insert_after(self, anchor: Node, node: Node) -> Node:
        self.nodes.insert(self.nodes.index(anchor) + 1, node)
        return node

    def replace_all_uses(self, old: Node, new: Node) -> None:
        """Make every user of `old` (and the graph's outputs) use `new` instead."""
        for n in self.nodes:
            if old in n.inputs:
                n.inputs = [new if i is old else i for i in n.inputs]
        self.outputs = [new if o is old else o for o in self.outputs]

    def remove(self, node: Node) -> None:
        if any(node in n.inputs for n in self.nodes) or node in self.outputs:
            raise GraphError(f"cannot remove {node}: it still has uses; rewire them first "
                             "(graph.replace_all_uses)")
        self.nodes.remove(node)
        if node in self.inputs:
            self.inputs.remove(node)

    def uses(self) -> dict[Node, list[Node]]:
        """Map from each node to the nodes that read it."""
        users: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                users.setdefault(i, []).append(n)
        return users

    def copy(self) -> "Graph":
        """A deep copy of the structure (node objects are new; const values are shared)."""
        g = Graph(self.name)
        env: dict[Node, Node] = {}
        for n in self.nodes:
            m = Node(n.op, [env[i] for i in n.inputs], n.attrs, n.shape, n.dtype, n.loc, n.value)
            env[n] = m
            g.nodes.append(m)
        g.inputs = [env[i] for i in self.inputs]
        g.outputs = [env[o] for o in self.outputs]
        return g

    def __len__(self):
        return len(self.nodes)

    def count(self, op: str) -> int:
        return sum(1 for n in self.nodes if n.op == op)

    # -- verifying ----------------------------------------------------------
    def check(self) -> "Graph":
        """Verify the invariants; raise GraphError naming the first broken one.

        Every input of a node is defined earlier in `nodes`; ids are unique;
        graph inputs and outputs are nodes of this graph; every op is a known
        primitive whose shape rule agrees with the recorded shape and dtype."""
        from .primitive import PRIMITIVES, infer_type
        seen: set[int] = set()
        defined: set[Node] = set()
        for idx, n in enumerate(self.nodes):
            if n.id in seen:
                raise GraphError(f"node #{n.id} appears twice in the graph")
            seen.add(n.id)
            for i in n.inputs:
                if i not in defined:
                    raise GraphError(f"node {idx} ({n.op}) uses a value that is not defined before it: {i}")
            if n.op == "input":
                if n not in self.inputs:
                    raise GraphError(f"node {idx} is an input node missing from graph.inputs")
            elif n.op == "const":
                _check_const(idx, n)
            elif n.op not in PRIMITIVES:
                raise GraphError(f"node {idx} has unknown op {n.op!r}")
            else:
                shape, dtype = infer_type(PRIMITIVES[n.op], n.inputs, n.attrs)
                if tuple(shape) != n.shape or np.dtype(dtype) != n.dtype:
                    raise GraphError(f"node {idx} ({n.op}) records {type_str(n.shape, n.dtype)} but its "
                                     f"shape rule gives {type_str(shape, dtype)}")
            defined.add(n)
        for i in self.inputs:
            if i not in defined:
                raise GraphError(f"graph input {i} is not in graph.nodes")
        for o in self.outputs:
            if o not in defined:
                raise GraphError(f"graph output {o} is not defined by any node")
        return self

    # -- printing -----------------------------------------------------------
    def __str__(self):
        return self.format()

    def format(self, indent: str = "", show_loc: bool = True) -> str:
        names: dict[Node, str] = {}
        for k, n in enumerate(self.nodes):
            names[n] = f"%{k}"
        head = ", ".join(f"{names[i]}: {type_str(i.shape, i.dtype)}" for i in self.inputs)
        lines = [f"{indent}{self.name}({head}) {{"]
        for n in self.nodes:
            if n.op == "input":
                continue
            ty = type_str(n.shape, n.dtype)
            if n.op == "const":
                body = f"const {_const_str(n.value)}"
            else:
                args = ", ".join(names.get(i, "?") for i in n.inputs)
                attrs = {k: v for k, v in n.attrs.items() if not isinstance(v, Graph)}
                body = f"{n.op}({args})"
                if attrs:
                    body += " {" + ", ".join(f"{k}={_attr_str(v)}" for k, v in attrs.items()) + "}"
            line = f"{indent}  {names[n]} = {body} : {ty}"
            if show_loc and n.loc:
                line += f"  # {short_loc(n.loc)}"
            lines.append(line)
            for v in n.attrs.values():
                if isinstance(v, Graph):
                    lines.append(v.format(indent + "    ", show_loc=False))
        lines.append(f"{indent}  return ({', '.join(names.get(o, '?') for o in self.outputs)})")
        lines.append(f"{indent}}}")
        return "\n".join(lines)


def _check_const(idx, n):
    v = n.value
    if v is None or isinstance(v, np.generic) or not hasattr(v, "shape"):
        raise GraphError(f"const node {idx} holds {type(v).__name__}, not an array")
    if tuple(v.shape) != n.shape or np.dtype(v.dtype) != n.dtype:
        raise GraphError(f"const node {idx} records {type_str(n.shape, n.dtype)} but holds "
                         f"{type_str(v.shape, v.dtype)}")


def short_loc(loc: str) -> str:
    import os
    path, _, line = loc.rpartition(":")
    return f"{os.path.basename(path)}:{line}"
