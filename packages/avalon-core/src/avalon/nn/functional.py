"""avalon.nn.functional: functions (activations, losses, ...) from the installed layer sets."""
from .. import layersets as _ls


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _ls.lookup("functional", name, __name__)


def __dir__():
    return sorted(set(globals()) | set(_ls.names("functional")))
