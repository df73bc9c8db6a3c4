"""Graph passes: plain functions Graph -> Graph.

The default pipeline is a list of (name, pass) pairs.  Add your own with
`avalon.passes.add_pass(fn, after="cse")`, through a plugin's
`avalon_passes` hook, or per function with `avalon.jit(f, passes=[...])`.
"""
from __future__ import annotations

from .cse import cse
from .dce import dce
from .fold import constant_fold
from .fusion import fuse_elementwise
from .layout import layout
from .pool_first import pool_first
from .simplify import simplify

__all__ = ["dce", "cse", "constant_fold", "simplify", "layout", "pool_first", "fuse_elementwise",
           "FORWARD", "default_pipeline",
           "add_pass", "remove_pass", "run_pipeline", "reset_pipeline"]

BUILTIN = [
    ("dce", dce),
    ("simplify", simplify),
    ("cse", cse),
    ("constant_fold", constant_fold),
    ("simplify_2", simplify),
    ("cse_2", cse),
    ("constant_fold_2", constant_fold),
    ("dce_2", dce),
    ("layout", layout),
    ("cse_3", cse),
    ("constant_fold_3", constant_fold),
    ("dce_3", dce),
    ("fuse_elementwise", fuse_elementwise),
    ("dce_4", dce),
]

#: rewrites of the forward graph, run before differentiation (their savings
#: then carry into the backward pass); a list of (name, pass) like BUILTIN
FORWARD = [
    ("pool_first", pool_first),
]

_pipeline: list | None = None
_version = 0


def _insert(pipeline, name, fn, position):
    names = [n for n, _ in pipeline]
    if position in (None, "end"):
        pipeline.append((name, fn))
    elif position == "start":
        pipeline.insert(0, (name, fn))
    else:
        where, _, ref = position.partition(":")
        if ref not in names or where not in ("before", "after"):
            raise ValueError(f"bad pass position {position!r}: use 'start', 'end', 'before:<name>' or "
                             f"'after:<name>' with one of {names}")
        k = names.index(ref) + (where == "after")
        pipeline.insert(k, (name, fn))


def default_pipeline() -> list:
    """The (name, pass) list every compilation runs, plugins' passes included."""
    global _pipeline
    if _pipeline is None:
        from ..plugins import call_each, report
        pipeline = list(BUILTIN)
        for plugin, extra in call_each("avalon_passes"):
            for item in extra:
                try:
                    name, fn, position = item
                    _insert(pipeline, name, fn, position)
                except Exception as e:
                    report(plugin, f"bad pass {item!r}: {e}")
        _pipeline = pipeline
    return _pipeline


def pipeline_version() -> int:
    """Changes whenever the pipeline does (compiled functions recompile)."""
    return _version


def add_pass(fn, name: str | None = None, *, before: str | None = None, after: str | None = None):
    """Add a pass (Graph -> Graph) to the default pipeline; returns fn so it
    can be used as a decorator."""
    global _version
    position = f"before:{before}" if before else (f"after:{after}" if after else "end")
    _insert(default_pipeline(), name or fn.__name__, fn, position)
    _version += 1
    return fn


def remove_pass(name: str) -> None:
    global _version
    pipeline = default_pipeline()
    pipeline[:] = [(n, f) for n, f in pipeline if n != name]
    _version += 1


def reset_pipeline() -> None:
    global _pipeline, _version
    _pipeline = None
    _version += 1


def run_pipeline(graph, passes=None, check: bool = False):
    """Run `passes` (default: the default pipeline) over `graph`."""
    items = default_pipeline() if passes is None else [
        p if isinstance(p, tuple) else (getattr(p, "__name__", "pass"), p) for p in passes]
    for name, fn in items:
        out = fn(graph)
        if out is None:
            raise TypeError(f"graph pass {name!r} returned None; a pass must return the graph")
        graph = out
        if check:
            graph.check()
    return graph
