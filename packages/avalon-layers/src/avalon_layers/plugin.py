"""Registers avalon-layers with avalon-core through the ``avalon`` entry-point group."""
import avalon
from avalon.layersets import LayerSet


@avalon.hookimpl
def avalon_layer_sets():
    from . import registry
    from . import _load_all  # noqa: F401  (importing the modules fills the registry)
    return [LayerSet("avalon-layers", "avalon-layers", nn=dict(registry.EXPORTS["nn"]),
                     functional=dict(registry.EXPORTS["functional"]), utils=dict(registry.EXPORTS["utils"]),
                     optim=dict(registry.EXPORTS["optim"]), toplevel=dict(registry.EXPORTS["toplevel"]))]
