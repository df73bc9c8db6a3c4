"""Graph passes: plain functions Graph -> Graph.

The pipeline a compilation runs is a list of (name, pass) pairs: BUILTIN, the
passes every backend runs, with the backend's own placed among them
(`Backend.passes()`: the CPU adds its batch-innermost layout), then plugins'
passes (their `avalon_passes` hook) and the edits made with
`avalon.passes.add_pass(fn, after="cse")` / `remove_pass(name)`.  Forward
graphs are rewritten before differentiation by FORWARD and the backend's
`forward_passes()` (the CPU's pool_first).  `avalon.jit(f, passes=[...])`
replaces the pipeline for one function.
"""
from __future__ import annotations

import logging

from .cse import cse
from .dce import dce
from .fold import constant_fold
from .fusion import fuse_elementwise, recompute_cheap
from .layout import layout
from .pool_first import pool_first
from .products import transposed_products
from .simplify import simplify
from .sums import merge_sums
from .updates import early_updates, fuse_updates
from .views import fuse_views

__all__ = ["dce", "cse", "constant_fold", "simplify", "transposed_products", "layout", "pool_first",
           "fuse_elementwise", "recompute_cheap", "merge_sums", "fuse_views", "fuse_updates", "early_updates",
           "BUILTIN", "FORWARD", "default_pipeline", "forward_pipeline",
           "add_pass", "remove_pass", "run_pipeline", "reset_pipeline", "pipeline_version"]

log = logging.getLogger("avalon.passes")

BUILTIN = [
    ("dce", dce),
    ("transposed_products", transposed_products),
    ("simplify", simplify),
    ("cse", cse),
    # sums of like terms (gradients of slices, per-step weight products) as one node
    ("merge_sums", merge_sums),
    ("constant_fold", constant_fold),
    ("simplify_2", simplify),
    ("cse_2", cse),
    ("constant_fold_2", constant_fold),
    ("dce_2", dce),
    # the backend's rewrites go here (the CPU's layout); these clean up after them
    ("cse_3", cse),
    ("constant_fold_3", constant_fold),
    ("dce_3", dce),
    # cheap values read by several groups are computed in each (after the last cse)
    ("recompute_cheap", recompute_cheap),
    ("fuse_elementwise", fuse_elementwise),
    ("dce_4", dce),
]

#: rewrites of the forward graph every backend runs before differentiation
#: (their savings then carry into the backward pass); a list of (name, pass)
FORWARD: list = []

_pipelines: dict = {}   # backend class -> its pipeline
_edits: list = []       # add_pass / remove_pass calls since the last reset, replayed on every pipeline
_from_plugins: list | None = None
_reported: set = set()
_version = 0


def _insert(pipeline, name, fn, position, stand_ins=None):
    """Put (name, fn) at `position`.  A position naming a pass that this
    pipeline lacks but the default backend adds (layout, on a GPU) is taken
    as that pass's own position (`stand_ins`)."""
    names = [n for n, _ in pipeline]
    if position in (None, "end"):
        pipeline.append((name, fn))
        return
    if position == "start":
        pipeline.insert(0, (name, fn))
        return
    where, _, ref = position.partition(":")
    stand_ins = stand_ins or {}
    if where in ("before", "after") and ref not in names and ref in stand_ins:
        log.debug("pass %r: %r is not in this pipeline; placed where it would be", name, ref)
        others = {k: v for k, v in stand_ins.items() if k != ref}
        return _insert(pipeline, name, fn, stand_ins[ref], others)
    if ref not in names or where not in ("before", "after"):
        raise ValueError(f"bad pass position {position!r}: use 'start', 'end', 'before:<name>' or "
                         f"'after:<name>' with one of {names}")
    pipeline.insert(names.index(ref) + (where == "after"), (name, fn))


def _backend_class(backend):
    """The class of `backend` (an instance or a class); None: the default device's (the CPU)."""
    if backend is None:
        from ..backends import Device, get_backend
        backend = get_backend(Device("cpu"))
    return backend if isinstance(backend, type) else type(backend)


def _stand_ins(cls):
    """Positions of the default backend's own passes, for pipelines that lack them."""
    default = _backend_class(None)
    return {} if cls is default else {name: position for name, _, position in default.passes()}


def default_pipeline(backend=None) -> list:
    """The (name, pass) list every compilation for `backend` runs (default: the
    CPU's): BUILTIN with the backend's own passes, plugins' passes, and the
    add_pass / remove_pass edits."""
    cls = _backend_class(backend)
    if cls not in _pipelines:
        _pipelines[cls] = _build(cls)
    return _pipelines[cls]


def _build(cls):
    pipeline = list(BUILTIN)
    for name, fn, position in cls.passes():
        _insert(pipeline, name, fn, position)
    stand_ins = _stand_ins(cls)
    for plugin, item in _plugin_passes():
        try:
            name, fn, position = item
            _insert(pipeline, name, fn, position, stand_ins)
        except Exception as e:
            _report_once(plugin, f"bad pass {item!r}: {e}")
    for edit in _edits:
        edit(pipeline, stand_ins)
    return pipeline


def _plugin_passes():
    """(plugin, item) for each pass the plugins' avalon_passes hooks return (asked once)."""
    global _from_plugins
    if _from_plugins is None:
        from ..plugins import call_each
        _from_plugins = [(plugin, item) for plugin, extra in call_each("avalon_passes") for item in extra]
    return _from_plugins


def _report_once(plugin, message):
    """A broken plugin pass is reported once, not once per backend's pipeline."""
    from ..plugins import report
    if (plugin, message) not in _reported:
        _reported.add((plugin, message))
        report(plugin, message)


def forward_pipeline(backend=None) -> list:
    """The (name, pass) list run on forward graphs before differentiation for
    `backend` (default: the CPU): FORWARD with the backend's forward_passes()."""
    pipeline = list(FORWARD)
    for name, fn, position in _backend_class(backend).forward_passes():
        _insert(pipeline, name, fn, position)
    return pipeline


def pipeline_version() -> int:
    """Changes whenever the pipeline does (compiled functions recompile)."""
    return _version


def _edit(change):
    """Record a change, replayed when each backend's pipeline is next built."""
    global _version
    _edits.append(change)
    _pipelines.clear()
    _version += 1


def add_pass(fn, name: str | None = None, *, before: str | None = None, after: str | None = None):
    """Add a pass (Graph -> Graph) to the default pipeline of every backend;
    returns fn so it can be used as a decorator."""
    position = f"before:{before}" if before else (f"after:{after}" if after else "end")
    name = name or fn.__name__
    _insert(list(default_pipeline()), name, fn, position)  # a bad position raises here, not later
    _edit(lambda pipeline, stand_ins: _insert(pipeline, name, fn, position, stand_ins))
    return fn


def remove_pass(name: str) -> None:
    """Remove every pass called `name` from the default pipeline of every backend."""
    def remove(pipeline, stand_ins):
        pipeline[:] = [(n, f) for n, f in pipeline if n != name]
    _edit(remove)


def reset_pipeline() -> None:
    """Back to the built-in and plugins' passes (after plugins change): edits are dropped."""
    global _version, _from_plugins
    _pipelines.clear()
    _edits.clear()
    _reported.clear()
    _from_plugins = None
    _version += 1


def run_pipeline(graph, passes=None, check: bool = False, backend=None):
    """Run `passes` (default: the default pipeline of `backend`, the CPU's
    when None) over `graph`."""
    items = default_pipeline(backend) if passes is None else [
        p if isinstance(p, tuple) else (getattr(p, "__name__", "pass"), p) for p in passes]
    for name, fn in items:
        out = fn(graph)
        if out is None:
            raise TypeError(f"graph pass {name!r} returned None; a pass must return the graph")
        graph = out
        if check:
            graph.check()
    return graph
