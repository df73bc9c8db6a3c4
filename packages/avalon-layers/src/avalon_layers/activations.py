"""Activations: functional forms (avalon.nn.functional.relu, ...) and layer
classes (avalon.nn.ReLU, ...) with torch.nn's signatures and reprs.

`inplace=True` is accepted for source compatibility (model definitions use it
often) but the result is always a new array: traced code has no in-place
activations.  The Avalon.jl names logistic, leakyrelu, logsigmoid and
logsoftmax are aliases.
"""
from __future__ import annotations

import math
import warnings

import avalon
from avalon.errors import at, user_location

from . import init as _init
from .layers.basic import new_param, place
from .module import Module
from .registry import export

_ACT = "Activations"


# -- erfc, for the exact GELU ---------------------------------------------------------------------

# erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2), for z >= 0 (Numerical Recipes' erfcc: relative
# error < 1.2e-7 everywhere), and erfc(-z) = 2 - erfc(z).  GELU is written as 0.5 x erfc(-x/sqrt 2):
# the tail is a product, not 1 + erf(x) with erf(x) near -1, so neither the value nor the
# derivative (which autodiff takes of this same formula) suffers cancellation.
_ERFC_P = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418,
           0.37409196, 1.00002368, -1.26551223)


def _erfc(z):
    """The complementary error function, from avalon ops (differentiable, traceable)."""
    a = avalon.minimum(avalon.abs(z), 10.0)  # erfc(10) underflows float32 anyway; keeps a*a finite
    t = 1.0 / (1.0 + 0.5 * a)
    p = _ERFC_P[0]
    for c in _ERFC_P[1:]:
        p = p * t + c
    tail = t * avalon.exp(p - a * a)
    return avalon.where(avalon.ge(z, 0.0), tail, 2.0 - tail)


# -- functional forms ----------------------------------------------------------------------------------

@export("functional", _ACT)
def relu(input, inplace: bool = False):
    """max(x, 0)."""
    return avalon.relu(input)


@export("functional", _ACT, aliases=("leakyrelu",))
def leaky_relu(input, negative_slope: float = 0.01, inplace: bool = False):
    """x where x > 0, else negative_slope * x."""
    return avalon.leaky_relu(input, negative_slope)


@export("functional", _ACT)
def elu(input, alpha: float = 1.0, inplace: bool = False):
    """x where x > 0, else alpha * (exp(x) - 1)."""
    return avalon.elu(input, alpha)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@export("functional", _ACT)
def gelu(input, approximate: str = "none"):
    """x * Phi(x), Phi the standard normal CDF (approximate='none'), or the tanh
    approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (approximate='tanh')."""
    if approximate == "none":
        return 0.5 * input * _erfc(input * (-1.0 / math.sqrt(2.0)))
    if approximate == "tanh":
        inner = _SQRT_2_OVER_PI * (input + 0.044715 * input * input * input)
        return 0.5 * input * (1.0 + avalon.tanh(inner))
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


@export("functional", _ACT)
def silu(input, inplace: bool = False):
    """x * sigmoid(x) (also called swish)."""
    return input * avalon.sigmoid(input)


@export("functional", _ACT)
def hardtanh(input, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False):
    """x clamped to [min_val, max_val]; as in PyTorch, the gradient is 1 strictly inside the
    interval and 0 at and beyond its ends."""
    if min_val > max_val:
        raise ValueError(f"hardtanh: min_val ({min_val}) cannot be greater than max_val ({max_val})")
    lo, hi = float(min_val), float(max_val)
    # the value: x clamped, NaN staying NaN; the gradient flows only strictly inside (lo, hi)
    clamped = avalon.stop_gradient(avalon.where(avalon.lt(input, lo), lo, avalon.where(avalon.gt(input, hi), hi,
                                                                                       input)))
    return avalon.where(avalon.gt(input, lo), avalon.where(avalon.lt(input, hi), input, clamped), clamped)


@export("functional", _ACT)
def relu6(input, inplace: bool = False):
    """min(max(x, 0), 6): hardtanh(x, 0, 6)."""
    return hardtanh(input, 0.0, 6.0)


@export("functional", _ACT)
def prelu(input, weight):
    """x where x > 0, else weight * x; weight has one slope per channel (axis 1 of the input,
    the only axis of a 1-D input) or a single slope for all."""
    n = int(weight.shape[0]) if len(weight.shape) else 1
    nd = len(input.shape)
    if n != 1:
        channels = int(input.shape[1 if nd >= 2 else 0]) if nd else 0
        if channels != n:
            raise avalon.ShapeError(f"prelu: weight has {n} slopes but the input of shape {tuple(input.shape)} has "
                                    f"{channels} channels (axis {1 if nd >= 2 else 0}); use num_parameters=1 or "
                                    f"the channel count{at(user_location())}")
        if nd >= 2:
            weight = avalon.reshape(weight, (1, n) + (1,) * (nd - 2))
    elif len(weight.shape):
        weight = avalon.reshape(weight, ())
    return avalon.where(avalon.gt(input, 0.0), input, weight * input)


@export("functional", _ACT, aliases=("logistic",))
def sigmoid(input):
    """1 / (1 + exp(-x))."""
    return avalon.sigmoid(input)


@export("functional", _ACT)
def tanh(input):
    """The hyperbolic tangent."""
    return avalon.tanh(input)


@export("functional", _ACT)
def softplus(input, beta: float = 1.0, threshold: float = 20.0):
    """log(1 + exp(beta x)) / beta; x itself where beta x > threshold."""
    return avalon.softplus(input, beta, threshold)


@export("functional", _ACT)
def softsign(input):
    """x / (1 + |x|)."""
    return avalon.softsign(input)


@export("functional", _ACT, aliases=("logsigmoid",))
def log_sigmoid(input):
    """log(sigmoid(x)), computed stably."""
    return avalon.log_sigmoid(input)


def _dim(fn: str, input, dim):
    """The softmax axis.  dim=None means the last axis (PyTorch's implicit choice is deprecated)."""
    nd = len(input.shape)
    if dim is None:
        return -1
    if not -max(nd, 1) <= dim < max(nd, 1):
        raise avalon.ShapeError(f"{fn}: dim {dim} is out of range for an input of shape {tuple(input.shape)} "
                                f"(expected a dim in [{-max(nd, 1)}, {max(nd, 1) - 1}])")
    return dim


def _cast(input, dtype):
    return input if dtype is None else avalon.cast(input, dtype)


@export("functional", _ACT)
def softmax(input, dim=None, dtype=None):
    """exp(x) / sum(exp(x)) along `dim` (default: the last axis)."""
    return avalon.softmax(_cast(input, dtype), _dim("softmax", input, dim))


@export("functional", _ACT, aliases=("logsoftmax",))
def log_softmax(input, dim=None, dtype=None):
    """x - logsumexp(x) along `dim` (default: the last axis)."""
    return avalon.log_softmax(_cast(input, dtype), _dim("log_softmax", input, dim))


# -- layer classes ------------------------------------------------------------------------------------

def _inplace(s: str, inplace: bool) -> str:
    if not inplace:
        return s
    return f"{s}, inplace=True" if s else "inplace=True"


@export("nn", _ACT)
class ReLU(Module):
    """relu as a layer."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, input):
        return relu(input)

    def extra_repr(self):
        return _inplace("", self.inplace)


@export("nn", _ACT)
class LeakyReLU(Module):
    """leaky_relu as a layer."""

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False):
        super().__init__()
        self.negative_slope, self.inplace = negative_slope, inplace

    def forward(self, input):
        return leaky_relu(input, self.negative_slope)

    def extra_repr(self):
        return _inplace(f"negative_slope={self.negative_slope}", self.inplace)


@export("nn", _ACT)
class ELU(Module):
    """elu as a layer."""

    def __init__(self, alpha: float = 1.0, inplace: bool = False):
        super().__init__()
        self.alpha, self.inplace = alpha, inplace

    def forward(self, input):
        return elu(input, self.alpha)

    def extra_repr(self):
        return _inplace(f"alpha={self.alpha}", self.inplace)


@export("nn", _ACT)
class GELU(Module):
    """gelu as a layer (approximate='none' or 'tanh')."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, input):
        return gelu(input, self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


@export("nn", _ACT)
class SiLU(Module):
    """silu as a layer."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, input):
        return silu(input)

    def extra_repr(self):
        return _inplace("", self.inplace)


@export("nn", _ACT)
class Hardtanh(Module):
    """hardtanh as a layer."""

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False, min_value=None,
                 max_value=None):
        super().__init__()
        if min_value is not None or max_value is not None:  # torch's deprecated spellings
            warnings.warn("Hardtanh: the keyword arguments `min_value` and `max_value` are deprecated and renamed "
                          "to `min_val` and `max_val`", FutureWarning, stacklevel=2)
            min_val = min_val if min_value is None else min_value
            max_val = max_val if max_value is None else max_value
        if min_val > max_val:
            raise ValueError(f"Hardtanh: min_val ({min_val}) cannot be greater than max_val ({max_val})")
        self.min_val, self.max_val, self.inplace = min_val, max_val, inplace

    def forward(self, input):
        return hardtanh(input, self.min_val, self.max_val)

    def extra_repr(self):
        return _inplace(f"min_val={self.min_val}, max_val={self.max_val}", self.inplace)


@export("nn", _ACT)
class ReLU6(Hardtanh):
    """relu6 as a layer."""

    def __init__(self, inplace: bool = False):
        super().__init__(0.0, 6.0, inplace)

    def extra_repr(self):
        return _inplace("", self.inplace)


@export("nn", _ACT)
class PReLU(Module):
    """prelu as a layer: a learned slope for negative inputs, one shared
    (num_parameters=1) or one per channel, all starting at `init`."""

    def __init__(self, num_parameters: int = 1, init: float = 0.25, device=None, dtype=None):
        super().__init__()
        self.num_parameters, self.init = int(num_parameters), init
        self.weight = new_param((self.num_parameters,), dtype)
        self.reset_parameters()
        place(self, device)

    def reset_parameters(self):
        _init.constant_(self.weight, self.init)

    def forward(self, input):
        return prelu(input, self.weight)

    def extra_repr(self):
        return f"num_parameters={self.num_parameters}"


@export("nn", _ACT)
class Sigmoid(Module):
    """sigmoid as a layer."""

    def forward(self, input):
        return sigmoid(input)


@export("nn", _ACT)
class Tanh(Module):
    """tanh as a layer."""

    def forward(self, input):
        return tanh(input)


@export("nn", _ACT)
class Softplus(Module):
    """softplus as a layer."""

    def __init__(self, beta: float = 1.0, threshold: float = 20.0):
        super().__init__()
        self.beta, self.threshold = beta, threshold

    def forward(self, input):
        return softplus(input, self.beta, self.threshold)

    def extra_repr(self):
        return f"beta={self.beta}, threshold={self.threshold}"


@export("nn", _ACT)
class Softsign(Module):
    """softsign as a layer."""

    def forward(self, input):
        return softsign(input)


@export("nn", _ACT)
class LogSigmoid(Module):
    """log_sigmoid as a layer."""

    def forward(self, input):
        return log_sigmoid(input)


@export("nn", _ACT)
class Softmax(Module):
    """softmax along `dim` as a layer (dim=None: the last axis)."""

    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def forward(self, input):
        return softmax(input, self.dim)

    def extra_repr(self):
        return f"dim={self.dim}"


@export("nn", _ACT)
class LogSoftmax(Module):
    """log_softmax along `dim` as a layer (dim=None: the last axis)."""

    def __init__(self, dim=None):
        super().__init__()
        self.dim = dim

    def forward(self, input):
        return log_softmax(input, self.dim)

    def extra_repr(self):
        return f"dim={self.dim}"

