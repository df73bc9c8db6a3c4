"""avalon.optim: optimizers and learning-rate schedulers from the installed layer sets.

    import avalon.optim as optim
    from avalon.optim.lr_scheduler import StepLR     # as torch.optim.lr_scheduler
"""
from .. import layersets as _ls
from . import lr_scheduler  # noqa: F401  (avalon.optim.lr_scheduler after `import avalon`)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _ls.lookup("optim", name, __name__)


def __dir__():
    return sorted(set(globals()) | set(_ls.names("optim")) | {"lr_scheduler"})
