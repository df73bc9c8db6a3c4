"""avalon.optim.lr_scheduler: the learning-rate schedulers, as torch.optim.lr_scheduler.

The schedulers are also in avalon.optim itself; this module serves the layer
set's `lr_scheduler` export (its schedulers module) under torch's import path."""
from .. import layersets as _ls


def _schedulers():
    return _ls.lookup("optim", "lr_scheduler", "avalon.optim")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return getattr(_schedulers(), name)
    except AttributeError:
        raise AttributeError(f"module 'avalon.optim.lr_scheduler' has no attribute {name!r}; the schedulers are: "
                             f"{', '.join(__dir__())}") from None


def __dir__():
    """The names the layer set exports from its schedulers module."""
    module = _schedulers()
    return sorted(n for n in _ls.names("optim")
                  if getattr(getattr(module, n, None), "__module__", None) == module.__name__)
