"""The hooks a plugin may implement.  Plugins are found through the entry-point
group ``avalon``; Avalon's own CPU backend registers through the same path.

A plugin module defines functions marked with ``avalon.hookimpl`` (or
``pluggy.HookimplMarker("avalon")``) and names the module in its
pyproject.toml::

    [project.entry-points.avalon]
    mybackend = "my_package.plugin"
"""
import pluggy

hookspec = pluggy.HookspecMarker("avalon")


@hookspec(firstresult=False, historic=False)
def avalon_backends():
    """Return a list of backend classes (subclasses of ``avalon.backends.Backend``).

    Every implementation is called; their lists are concatenated.  Each class
    names its device kind (``name = "cuda"``), the package that provides it
    (``package``) and a ``priority`` used by ``avalon.best_available_device()``.
    A class whose ``availability()`` reports False is listed by
    ``avalon.backends()`` with its reason and cannot be selected.
    Not firstresult: several plugins may each contribute backends.
    Not historic: backends are collected when first needed, after all plugins load.
    """


@hookspec(firstresult=False, historic=False)
def avalon_passes():
    """Return a list of ``(name, pass_fn, position)`` graph passes to add to the
    default compilation pipeline.

    ``pass_fn`` is a function Graph -> Graph; ``position`` is ``"start"``,
    ``"end"``, ``"before:<name>"`` or ``"after:<name>"`` relative to the
    built-in passes (see ``avalon.passes.default_pipeline()``).
    Not firstresult: every plugin's passes are added, in plugin load order.
    Not historic: collected once when the pipeline is first built.
    """


@hookspec(firstresult=False, historic=False)
def avalon_layer_sets():
    """Return a list of ``avalon.layersets.LayerSet`` objects.

    A layer set fills the namespaces ``avalon.nn`` (layer classes),
    ``avalon.nn.functional`` (functions), ``avalon.optim`` (optimizers) and
    top-level ``avalon.<name>`` helpers (such as ``fit``).  avalon-layers is one
    such set; a third-party set registers the same way.  Two sets defining the
    same name in one namespace is an error that names both sets.
    Not firstresult: every installed set contributes.
    Not historic: sets are collected on first access to one of the namespaces.
    """
