"""Imports every module of avalon-layers so that their @export declarations run."""
import importlib
import pkgutil

import avalon_layers

for _info in pkgutil.walk_packages(avalon_layers.__path__, "avalon_layers."):
    if not _info.name.rsplit(".", 1)[-1].startswith("_") and _info.name != "avalon_layers.plugin":
        importlib.import_module(_info.name)
