"""Algebraic simplification: local rewrites that remove work.

Each rule looks at one node and returns a replacement (an existing node, or a
new node to insert), or None.  A replacement always has the node's exact shape
and dtype.  The rules are listed in RULES; add yours with `RULES.append`.
"""
import numpy as np

from ..graph import Node


def _const_value(n):
    """The value of a constant, seen through a broadcast of it (the rules only
    ask which values it holds; every rule keeps the node's own shape)."""
    if n.op == "broadcast_to":
        n = n.inputs[0]
    if n.op == "const" and isinstance(n.value, np.ndarray):
        return n.value
    return None


def _is_scalar_const(n, value):
    v = _const_value(n)
    return v is not None and v.size >= 1 and bool(np.all(v == value))


def _same_type(a, b):
    return a.shape == b.shape and a.dtype == b.dtype


def add_zero(n):
    if n.op in ("add", "sub"):
        a, b = n.inputs
        if _is_scalar_const(b, 0) and _same_type(a, n):
            return a
        if n.op == "add" and _is_scalar_const(a, 0) and _same_type(b, n):
            return b


def mul_one(n):
    if n.op in ("mul", "div"):
        a, b = n.inputs
        if _is_scalar_const(b, 1) and _same_type(a, n):
            return a
        if n.op == "mul" and _is_scalar_const(a, 1) and _same_type(b, n):
            return b


def div_by_const(n):
    """x / c -> x * (1/c): multiplication is cheaper than division."""
    if n.op == "div":
        a, b = n.inputs
        v = _const_value(b)
        if v is not None and v.dtype.kind == "f" and v.size == 1 and v.item() != 0:
            recip = Node("const", (), {}, v.shape, v.dtype, value=np.asarray(1 / v, dtype=v.dtype))
            return [recip, Node("mul", [a, recip], {}, n.shape, n.dtype, n.loc)]


def double_neg(n):
    if n.op == "neg" and n.inputs[0].op == "neg":
        return n.inputs[0].inputs[0]


def add_neg(n):
    """a + (-b) -> a - b; a - (-b) -> a + b."""
    if n.op in ("add", "sub") and n.inputs[1].op == "neg":
        a, nb = n.inputs
        op = "sub" if n.op == "add" else "add"
        return Node(op, [a, nb.inputs[0]], {}, n.shape, n.dtype, n.loc)


def identity_shape_ops(n):
    if n.op in ("reshape", "broadcast_to") and _same_type(n.inputs[0], n):
        return n.inputs[0]
    if n.op == "transpose" and tuple(n.attrs["perm"]) == tuple(range(n.ndim)):
        return n.inputs[0]
    if n.op in ("stop_gradient", "custom_vjp_call"):  # gradient markers: identities once differentiated
        return n.inputs[0]
    if n.op == "cast" and n.inputs[0].dtype == n.dtype:
        return n.inputs[0]


def reshape_chain(n):
    if n.op == "reshape" and n.inputs[0].op == "reshape":
        return Node("reshape", [n.inputs[0].inputs[0]], {"shape": n.shape}, n.shape, n.dtype, n.loc)


def transpose_chain(n):
    if n.op == "transpose" and n.inputs[0].op == "transpose":
        inner = n.inputs[0].attrs["perm"]
        perm = tuple(inner[p] for p in n.attrs["perm"])
        src = n.inputs[0].inputs[0]
        if perm == tuple(range(n.ndim)):
            return src
        return Node("transpose", [src], {"perm": perm}, n.shape, n.dtype, n.loc)


def square(n):
    """x ** 2 -> x * x (one multiply instead of a pow; its gradient needs no log)."""
    if n.op == "pow":
        v = _const_value(n.inputs[1])
        if v is not None and v.size == 1 and v.item() == 2 and n.inputs[0].shape == n.shape:
            return Node("mul", [n.inputs[0], n.inputs[0]], {}, n.shape, n.dtype, n.loc)


def log_exp(n):
    if n.op == "log" and n.inputs[0].op == "exp":
        return n.inputs[0].inputs[0]


RULES = [add_zero, mul_one, div_by_const, double_neg, add_neg, identity_shape_ops, reshape_chain,
         transpose_chain, log_exp, square]


def _first_match(rules, n):
    for rule in rules:
        r = rule(n)
        if r is not None:
            return r if isinstance(r, list) else [r]
    return None


def _written_buffers(graph):
    """The arrays (seen through views) that an op writes into (assign): a value
    of theirs read after the write differs from the one read before."""
    from ..primitive import PRIMITIVES
    root = {}
    for n in graph.nodes:
        prim = PRIMITIVES.get(n.op)
        root[n] = root.get(n.inputs[0], n.inputs[0]) if prim is not None and prim.view and n.inputs else n
    return root, {root.get(n.inputs[0], n.inputs[0]) for n in graph.nodes
                  if getattr(PRIMITIVES.get(n.op), "writes_input", False)}


def _allowed(new, present, root, written):
    """A rewrite, or None where it would turn a copy of an array that is written
    later (x * 1 before an assign to x) into an alias of it: the copy must keep
    the value from before the write."""
    if new is not None and new[-1] in present and root.get(new[-1], new[-1]) in written:
        return None
    return new


def simplify(graph, rules=None):
    rules = RULES if rules is None else rules
    root, written = _written_buffers(graph)
    rename = {}
    out = []
    present = set()
    for n in graph.nodes:
        if rename:
            n.inputs = [rename.get(i, i) for i in n.inputs]
        new = _allowed(None if n.op in ("input", "const") else _first_match(rules, n), present, root, written)
        if new is None:
            out.append(n)
            present.add(n)
            continue
        for _ in range(8):  # a rewritten node may match a rule again
            for m in new:
                if m not in present:
                    out.append(m)
                    present.add(m)
            target = new[-1]
            new = _allowed(None if target.op in ("input", "const") else _first_match(rules, target),
                           present, root, written)
            if new is None:
                break
        rename[n] = target
    graph.nodes = out
    graph.outputs = [rename.get(o, o) for o in graph.outputs]
    return graph
