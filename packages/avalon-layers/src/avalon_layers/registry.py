"""What avalon-layers exports, where, and how stable each symbol is.

Every public symbol is declared with `@export(namespace, component)`; the
plugin hands the collected tables to avalon-core, which serves them as
avalon.nn, avalon.nn.functional, avalon.optim and avalon.<name>.  Stability
follows Avalon.jl's table: a component is stable, experimental, or "mostly"
stable, in which case each symbol says which of the two it is.
"""
from __future__ import annotations

import functools
import inspect
import warnings

NAMESPACES = ("nn", "functional", "utils", "optim", "toplevel")
STABLE, EXPERIMENTAL = "stable", "experimental"
#: namespace -> the qualified prefix of its symbols
PREFIXES = {"nn": "avalon.nn.", "functional": "avalon.nn.functional.", "utils": "avalon.nn.utils.",
            "optim": "avalon.optim.", "toplevel": "avalon."}

#: component -> level, as in Avalon.jl's README
COMPONENTS = {
    "Basic layers": "stable",
    "CNN": "stable",
    "RNN": "experimental",
    "Attention": "experimental",
    "Losses": "mostly stable",
    "Activations": "stable",
    "Initializations": "mostly stable",
    "Optimizers": "stable",
    "Device API": "stable",
    "Fitting API": "experimental",
    "Checkpoints": "stable",
    "Stability API": "stable",
    "Distributed": "experimental",
}

EXPORTS: dict[str, dict] = {ns: {} for ns in NAMESPACES}
LEVELS: dict[tuple[str, str], tuple[str, str]] = {}  # (namespace, name) -> (component, level)


class ExperimentalWarning(UserWarning):
    """Use of an experimental Avalon symbol: its API may still change."""


_warned: set = set()


def _warn_once(qualname: str, component: str) -> None:
    if qualname in _warned:
        return
    _warned.add(qualname)
    warnings.warn(f"{qualname} is experimental ({component}): its API may change in a later release",
                  ExperimentalWarning, stacklevel=3)


def _wrap_experimental(obj, qualname, component):
    if inspect.isclass(obj):
        init = obj.__init__

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            _warn_once(qualname, component)
            init(self, *args, **kwargs)
        obj.__init__ = __init__
        return obj

    @functools.wraps(obj)
    def wrapper(*args, **kwargs):
        _warn_once(qualname, component)
        return obj(*args, **kwargs)
    return wrapper


def export(namespace: str, component: str, name: str | None = None, level: str | None = None,
           aliases: tuple = ()):
    """Declare a public symbol.  `level` is required for "mostly stable" components."""
    if namespace not in NAMESPACES:
        raise ValueError(f"unknown namespace {namespace!r}")
    comp_level = COMPONENTS[component]
    if level is None:
        if comp_level == "mostly stable":
            raise ValueError(f"component {component!r} is mostly stable: give each symbol a level")
        level = comp_level
    if level not in (STABLE, EXPERIMENTAL):
        raise ValueError(f"bad stability level {level!r}")

    def decorate(obj):
        public = name or obj.__name__
        qual = PREFIXES[namespace] + public
        if level == EXPERIMENTAL:
            obj = _wrap_experimental(obj, qual, component)
        obj.__avalon_stability__ = level
        obj.__avalon_component__ = component
        for n in (public, *aliases):
            if n in EXPORTS[namespace] and EXPORTS[namespace][n] is not obj:
                raise ValueError(f"{namespace}.{n} is exported twice inside avalon-layers")
            EXPORTS[namespace][n] = obj
            LEVELS[(namespace, n)] = (component, level)
        return obj
    return decorate


def alias(namespace: str, new: str, existing: str) -> None:
    """Export an existing symbol under a second name (Avalon.jl's names)."""
    EXPORTS[namespace][new] = EXPORTS[namespace][existing]
    LEVELS[(namespace, new)] = LEVELS[(namespace, existing)]


def stability() -> dict:
    """{"components": {component: level}, "symbols": {qualified name: (component, level)}}."""
    return {"components": dict(COMPONENTS),
            "symbols": {PREFIXES[ns] + n: v for (ns, n), v in sorted(LEVELS.items())}}


export("toplevel", "Stability API")(stability)
export("toplevel", "Stability API")(ExperimentalWarning)
