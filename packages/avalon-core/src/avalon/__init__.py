"""Avalon: a tracing autograd engine with an optimizing code generator.

    import avalon
    loss, grads = avalon.grad(loss_fn, model, x, y)   # traced, compiled, cached
    predict = avalon.jit(model_forward)
    print(avalon.trace(loss_fn, model, x, y))         # the graph, readable
"""
__version__ = "0.1.0"

import numpy as _np

from . import tracer_methods as _tracer_methods  # noqa: F401  (installs Tracer's array surface)
from .ops import *  # noqa: F401,F403
from .ops import sum, max, min, abs, pow  # noqa: F401,A004
from . import ops, passes, tree  # noqa: F401
from . import layersets as _layersets
from . import nn, optim  # noqa: F401  (namespaces that layer sets fill)
from .api import (CompiledFunction, GradFunction, JitFunction, compile_graph, grad, jit, trace,  # noqa: F401
                  value_and_grad)
from .api import VmapFunction, vmap  # noqa: F401
from .backends import (Backend, Device, backends, best_available_device, device, manual_seed,  # noqa: F401
                       to_device)
from .custom_vjp import custom_vjp  # noqa: F401
from .remat import checkpoint  # noqa: F401
from .forward import hessian, hvp, jacfwd, jacrev, jvp, linearize, vjp  # noqa: F401
from .anomaly import AnomalyError, detect_anomaly  # noqa: F401
from .errors import (ArgumentError, AvalonError, ConcretizationError, DeviceError, DtypeError,  # noqa: F401
                     GraphError, LabelError, LeakedTracerError, MissingRuleError, OutOfMemoryError, ShapeError,
                     TracerAttributeError)
from .graph import Graph, Node  # noqa: F401
from .plugins import hookimpl, plugin_errors  # noqa: F401
from .profiler import profile  # noqa: F401
from .primitive import PRIMITIVES, Primitive, Tracer, bind, defprim  # noqa: F401
from . import distributed  # noqa: F401,E402  (data-parallel collectives; MPI is imported only when used)

float16, float32, float64 = _np.float16, _np.float32, _np.float64
int32, int64, bool_ = _np.int32, _np.int64, _np.bool_


def __getattr__(name):
    # Top-level helpers contributed by layer sets (avalon.fit, avalon.save, ...).
    if name.startswith("__"):
        raise AttributeError(name)
    return _layersets.lookup("toplevel", name, __name__)
