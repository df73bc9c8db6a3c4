"""avalon.nn: layer classes from the installed layer sets (avalon-layers, and
any third-party set registered in the ``avalon`` entry-point group).

    import avalon.nn as nn
    import avalon.nn.functional as F
    from avalon.nn.utils import clip_grad_norm_
"""
from .. import layersets as _ls
from . import functional  # noqa: F401  (avalon.nn.functional after `import avalon`)
from . import utils  # noqa: F401  (avalon.nn.utils, likewise)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _ls.lookup("nn", name, __name__)


def __dir__():
    return sorted(set(globals()) | set(_ls.names("nn")) | {"functional", "utils"})
