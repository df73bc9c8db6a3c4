"""Loading plugins from the ``avalon`` entry-point group.

A plugin that fails to import, or whose hook raises, is reported (a warning, and
an entry in ``avalon.plugin_errors()``) and skipped: one broken plugin never
stops Avalon from working with the others.
"""
from __future__ import annotations

import importlib.metadata
import warnings

import pluggy

from . import hookspecs

hookimpl = pluggy.HookimplMarker("avalon")

_manager: pluggy.PluginManager | None = None
_errors: list[tuple[str, str]] = []


def manager() -> pluggy.PluginManager:
    """The plugin manager, with every entry point of group ``avalon`` loaded."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager("avalon")
        pm.add_hookspecs(hookspecs)
        for ep in _entry_points():
            try:
                plugin = ep.load()
                if pm.get_plugin(ep.name) is None:
                    pm.register(plugin, name=ep.name)
            except Exception as e:  # a broken plugin is reported, not fatal
                report(ep.name, f"failed to load {ep.value!r}: {type(e).__name__}: {e}")
        _manager = pm
    return _manager


def _entry_points():
    eps = importlib.metadata.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group="avalon"))
    return list(eps.get("avalon", []))  # pragma: no cover (Python < 3.10)


def call_each(hook_name: str) -> list[tuple[str, object]]:
    """Call a hook on every plugin separately; return (plugin name, result) pairs,
    reporting plugins whose implementation raises."""
    pm = manager()
    out = []
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        try:
            result = impl.function()
        except Exception as e:
            report(impl.plugin_name, f"hook {hook_name} raised {type(e).__name__}: {e}")
            continue
        if result is not None:
            out.append((impl.plugin_name, result))
    return out


def report(plugin: str, message: str) -> None:
    _errors.append((plugin, message))
    warnings.warn(f"avalon plugin {plugin!r} is broken and was skipped: {message}", RuntimeWarning, stacklevel=3)


def plugin_errors() -> list[tuple[str, str]]:
    """(plugin name, what went wrong) for every plugin that was skipped."""
    manager()
    return list(_errors)


def register(plugin, name: str | None = None) -> None:
    """Register a plugin object at run time (as an entry point would), and
    forget what was collected from the previous set of plugins."""
    manager().register(plugin, name=name)
    _forget_collected()


def unregister(name: str) -> None:
    pm = manager()
    plugin = pm.get_plugin(name)
    if plugin is not None:
        pm.unregister(plugin)
    _forget_collected()


def _forget_collected():
    from .backends import reset
    from .layersets import reset as reset_layer_sets
    from .passes import reset_pipeline
    reset()
    reset_pipeline()
    reset_layer_sets()
