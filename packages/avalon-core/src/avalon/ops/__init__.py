"""Avalon's ops: primitives (one registration block each) and composites."""
from .elementwise import *  # noqa: F401,F403
from .elementwise import (abs, add, cast, clip, div, elu, eq, exp, expm1, ge, gt, le, leaky_relu, log,  # noqa: F401
                          log1p, log_sigmoid, logistic, lt, maximum, minimum, mul, ne, neg, pow, reciprocal,
                          relu, sigmoid, sign, softplus, softsign, sqrt, square, stop_gradient, sub, tanh, where)
from .shape import (assign, broadcast_to, expand_dims, flatten, full, ones, permute, reshape, squeeze, swapaxes,  # noqa: F401
                    transpose, zeros)
from .reduce import (argmax, argmin, log_softmax, logsumexp, max, mean, min, softmax, sum, sum_to,  # noqa: F401
                     var)
from .linalg import linear, matmul  # noqa: F401
from .random import dropout, random_normal, random_uniform  # noqa: F401
from .indexing import *  # noqa: F401,F403
from .nn import *  # noqa: F401,F403
# contractions, repeats and constants of static shape
from .linalg import einsum  # noqa: F401
from .shape import arange, full_like, ones_like, repeat, tile, zeros_like  # noqa: F401
# sorting, scans, norms, flips and triangles (NumPy's signatures; topk as torch's)
from .sort_scan import argsort, cumprod, cumsum, sort, topk  # noqa: F401
from .reduce import all, any, norm, std  # noqa: F401,A004
from .shape import flip, roll, tril, triu  # noqa: F401

import types as _types

# the public ops only (not the submodules they live in)
__all__ = [_n for _n, _v in list(globals().items())
           if not _n.startswith("_") and not isinstance(_v, _types.ModuleType)]


def _with_numpy_keywords():
    """Every public op, called as avalon.<op>, raises ArgumentError naming the
    user's line and NumPy's spelling for a keyword it does not take
    (avalon.sum(x, dim=1) -> axis=), instead of a bare TypeError."""
    import sys
    from ._keywords import numpy_keywords
    made = {}   # one wrapper per function: aliases (maxpool2d = max_pool2d) stay one object
    for name in __all__:
        fn = globals()[name]
        if isinstance(fn, _types.FunctionType) and fn.__module__.startswith(__name__ + "."):
            wrapped = globals()[name] = made.setdefault(fn, numpy_keywords(fn))
            home = sys.modules[fn.__module__]
            if getattr(home, name, None) is fn:   # one object: avalon.sum is avalon.ops.reduce.sum
                setattr(home, name, wrapped)


_with_numpy_keywords()
