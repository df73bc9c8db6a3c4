"""avalon.nn.utils: utilities for training (clip_grad_norm_, ...) from the installed layer sets."""
from .. import layersets as _ls


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _ls.lookup("utils", name, __name__)


def __dir__():
    return sorted(set(globals()) | set(_ls.names("utils")))
