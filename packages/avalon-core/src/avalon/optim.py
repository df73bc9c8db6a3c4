"""avalon.optim: optimizers and learning-rate schedulers from the installed layer sets."""
from . import layersets as _ls


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _ls.lookup("optim", name, __name__)


def __dir__():
    return sorted(set(globals()) | set(_ls.names("optim")))
