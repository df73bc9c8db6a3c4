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

import types as _types

# the public ops only (not the submodules they live in)
__all__ = [_n for _n, _v in list(globals().items())
           if not _n.startswith("_") and not isinstance(_v, _types.ModuleType)]
