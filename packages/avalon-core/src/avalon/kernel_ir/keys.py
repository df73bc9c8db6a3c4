"""Keys of what a lowering reads, for remembering lowered kernels between
processes (backends.cpu_native keeps them on disk): equal keys, equal kernels.

A key is the canonical text of the lowered thing (a fused body, a node with
its attributes and operand types) and of everything else the lowering reads:
the sources of avalon-core (path, size and modification time of each file:
any edit makes new keys) and the tunables of the lowering modules (their
upper-case module constants, read at each call, so that a test changing one
gets kernels of its own).  What has no faithful text (an array attribute, a
primitive defined outside avalon-core, whose rules the file list does not
cover) has no key: None, and it is lowered each time.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import sys
from functools import lru_cache

import numpy as np

#: modules whose constants steer lowering (block sizes, lanes, which geometries get templates)
TUNABLE_MODULES = ("avalon.kernel_ir.lower", "avalon.kernel_ir.glue", "avalon.kernel_ir.conv_templates",
                   "avalon.passes.updates")

_PLAIN = (bool, int, float, str, type(None))


def body_key(body, extra: str = "") -> str | None:
    """The key of lowering the fused body (a Graph); `extra`: what else the caller passes."""
    parts = [extra]
    if not _graph_text(body, parts):
        return None
    return _digest("body", parts)


def node_key(node) -> str | None:
    """The key of lowering the node by its primitive's `lower` rule."""
    from ..primitive import PRIMITIVES
    if not _own_primitive(PRIMITIVES.get(node.op)):
        return None
    parts = [node.op, _type(node)]
    for i in node.inputs:
        parts.append(_type(i))
    if not _attrs_text(node.attrs, parts):
        return None
    return _digest("node", parts)


def _digest(kind, parts) -> str:
    h = _prefix().copy()
    h.update(f"{kind}\0".encode())
    h.update("\0".join(parts).encode())
    return h.hexdigest()


def _type(n) -> str:
    return f"{n.shape}{n.dtype.str}"     # a node's dtype is an np.dtype


def _graph_text(graph, parts) -> bool:
    from ..primitive import PRIMITIVES
    index = {n: k for k, n in enumerate(graph.nodes)}
    for k, n in enumerate(graph.nodes):
        if n.op not in ("input", "const") and not _own_primitive(PRIMITIVES.get(n.op)):
            return False
        parts.append(f"{k}={n.op}({','.join(str(index[i]) for i in n.inputs)}){_type(n)}")
        if n.op == "const":
            value = np.asarray(n.value)
            parts.append(f"{value.dtype.str}{value.shape}{value.tobytes().hex()}")
        if not _attrs_text(n.attrs, parts):
            return False
    parts.append(f"in{[index[i] for i in graph.inputs]}out{[index[o] for o in graph.outputs]}")
    return True


def _attrs_text(attrs, parts) -> bool:
    for name in sorted(attrs):
        parts.append(name)
        if not _value_text(attrs[name], parts):
            return False
    return True


def _value_text(v, parts) -> bool:
    from ..graph import Graph
    if isinstance(v, (tuple, list)):
        parts.append(f"{type(v).__name__}{len(v)}")
        return all(_value_text(x, parts) for x in v)
    if isinstance(v, Graph):
        parts.append("graph")
        return _graph_text(v, parts)
    if isinstance(v, np.dtype):
        parts.append(f"dtype {v.str}")
        return True
    if type(v) in _PLAIN:
        parts.append(f"{type(v).__name__} {v!r}")
        return True
    return False


def _own_primitive(prim) -> bool:
    """Whether the primitive and its rules come from avalon-core (the source fingerprint
    covers them), not from a plugin."""
    if prim is None:
        return False
    own = _OWN.get(id(prim))
    if own is None or own[0] is not prim:
        functions = [prim.shape_rule, prim.impl, prim.vjp, *prim.rules.values()]
        own = _OWN[id(prim)] = (prim, all((getattr(f, "__module__", None) or "avalon.").startswith("avalon.")
                                          for f in functions if callable(f)))
    return own[1]


_OWN: dict = {}   # id(primitive) -> (primitive, whether it is avalon-core's)


@lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """The avalon-core sources (each file's path, size and modification time), numpy's
    version and the interpreter's."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256(f"{sys.version}\0{np.__version__}\0".encode())
    files: list = []
    _source_files(root, "", files)
    h.update("".join(files).encode())
    return h.hexdigest()


def _source_files(directory, relative, out) -> None:
    """Every .py file under `directory` as 'path:size:mtime_ns' (NUL-terminated), in
    path order; scandir, skipping __pycache__, takes a quarter of os.walk's time."""
    with os.scandir(directory) as found:
        entries = sorted(found, key=lambda e: e.name)
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            if e.name != "__pycache__":
                _source_files(e.path, f"{relative}{e.name}/", out)
        elif e.name.endswith(".py"):
            st = e.stat()
            out.append(f"{relative}{e.name}:{st.st_size}:{st.st_mtime_ns}\0")


_tunable_names: list = []      # [(module, name)] of the tunables, found once
_last_prefix: list = [None, None]   # [the tunables' values, the hash of the sources and them]


def _prefix():
    """A sha256 of the sources and of the tunables' current values (rebuilt when one changed)."""
    if not _tunable_names:
        for module_name in TUNABLE_MODULES:
            module = sys.modules.get(module_name) or importlib.import_module(module_name)
            _tunable_names.extend((module, name) for name, value in sorted(vars(module).items())
                                  if name.isupper() and type(value) in _PLAIN)
    values = tuple(getattr(module, name) for module, name in _tunable_names)
    if _last_prefix[0] != values:
        text = ";".join(f"{m.__name__}.{n}={v!r}" for (m, n), v in zip(_tunable_names, values))
        _last_prefix[:] = [values, hashlib.sha256(f"{source_fingerprint()}\0{text}\0".encode())]
    return _last_prefix[1]
