"""avalon.nn.init: parameter initializers with torch.nn.init's semantics.

Each initializer fills an array IN PLACE and returns it, like PyTorch's
trailing-underscore functions.  Arrays may live on any backend (numpy, cupy).
Random numbers come from the array's backend generator, so
avalon.manual_seed(seed) makes initialization repeatable; pass `generator=`
(a numpy.random.Generator) to draw from a generator of your own instead.

The module itself is exported as avalon.nn.init; kaiming_normal_ and
constant_ are also avalon.init_kaiming_normal and avalon.init_constant
(Avalon.jl's names).
"""
from __future__ import annotations

import math
import sys
import warnings

import numpy as np

import avalon
from avalon.backends import backend_of

from . import registry

__all__ = ["calculate_gain", "uniform_", "normal_", "constant_", "zeros_", "ones_", "xavier_uniform_",
           "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_"]

_LINEAR_FNS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
               "conv_transpose3d", "sigmoid")


def calculate_gain(nonlinearity: str, param=None) -> float:
    """The recommended gain for a nonlinearity (torch.nn.init.calculate_gain)."""
    if nonlinearity in _LINEAR_FNS:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, (int, float)) and not isinstance(param, bool):
            slope = param
        else:
            raise ValueError(f"negative_slope {param} not a valid number")
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"Unsupported nonlinearity {nonlinearity}")


# -- helpers -----------------------------------------------------------------------------------

def _check_array(fn: str, tensor) -> None:
    if isinstance(tensor, avalon.Tracer):
        raise avalon.AvalonError(f"init.{fn}: cannot initialize a traced array in place; initialize "
                                 "parameters outside avalon.grad/jit")
    if not avalon.tree.is_array(tensor):
        raise TypeError(f"init.{fn}: expected an array, got {type(tensor).__name__}")


def _check_float(fn: str, tensor) -> None:
    _check_array(fn, tensor)
    if np.dtype(tensor.dtype).kind != "f":
        raise avalon.DtypeError(f"init.{fn}: random initialization needs a floating-point array, got "
                                f"{np.dtype(tensor.dtype).name}")


def _no_op_if_empty(tensor) -> bool:
    if 0 in tuple(tensor.shape):
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=3)
        return True
    return False


def _draw(kind: str, tensor, generator):
    """Standard uniform [0, 1) or standard normal numbers shaped and typed like `tensor`."""
    shape, dtype = tuple(tensor.shape), np.dtype(tensor.dtype)
    if generator is not None:
        host = generator.random(shape) if kind == "uniform" else generator.standard_normal(shape)
        return backend_of(tensor).asarray(np.asarray(host, dtype=dtype))
    draw = avalon.random_uniform if kind == "uniform" else avalon.random_normal
    return draw(shape, dtype, like=tensor)


def _write(tensor, value):
    avalon.assign(tensor, value.astype(tensor.dtype, copy=False))
    return tensor


def _fill_uniform(tensor, a: float, b: float, generator):
    return _write(tensor, _draw("uniform", tensor, generator) * (b - a) + a)


def _fill_normal(tensor, mean: float, std: float, generator):
    return _write(tensor, _draw("normal", tensor, generator) * std + mean)


def _calculate_fan_in_and_fan_out(tensor):
    """(fan_in, fan_out) as PyTorch computes them: dim 1 is the input, dim 0 the output,
    and every further dim is part of the receptive field."""
    shape = tuple(tensor.shape)
    if len(shape) < 2:
        raise ValueError("Fan in and fan out can not be computed for tensor with fewer than 2 dimensions")
    receptive = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def _calculate_correct_fan(tensor, mode: str) -> int:
    mode = mode.lower()
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"Mode {mode} not supported, please use one of fan_in, fan_out")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


# -- initializers ----------------------------------------------------------------------------------

def uniform_(tensor, a: float = 0.0, b: float = 1.0, generator=None):
    """Fill with numbers drawn uniformly from [a, b)."""
    _check_float("uniform_", tensor)
    if _no_op_if_empty(tensor):
        return tensor
    return _fill_uniform(tensor, a, b, generator)


def normal_(tensor, mean: float = 0.0, std: float = 1.0, generator=None):
    """Fill with numbers drawn from N(mean, std^2)."""
    _check_float("normal_", tensor)
    if _no_op_if_empty(tensor):
        return tensor
    return _fill_normal(tensor, mean, std, generator)


def constant_(tensor, val):
    """Fill with the value `val`."""
    _check_array("constant_", tensor)
    if _no_op_if_empty(tensor):
        return tensor
    tensor[...] = val
    return tensor


def zeros_(tensor):
    """Fill with zeros."""
    return constant_(tensor, 0)


def ones_(tensor):
    """Fill with ones."""
    return constant_(tensor, 1)


def xavier_uniform_(tensor, gain: float = 1.0, generator=None):
    """Glorot uniform: U(-a, a) with a = gain * sqrt(6 / (fan_in + fan_out))."""
    _check_float("xavier_uniform_", tensor)
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    if _no_op_if_empty(tensor):
        return tensor
    a = math.sqrt(3.0) * gain * math.sqrt(2.0 / float(fan_in + fan_out))
    return _fill_uniform(tensor, -a, a, generator)


def xavier_normal_(tensor, gain: float = 1.0, generator=None):
    """Glorot normal: N(0, std^2) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    _check_float("xavier_normal_", tensor)
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    if _no_op_if_empty(tensor):
        return tensor
    return _fill_normal(tensor, 0.0, gain * math.sqrt(2.0 / float(fan_in + fan_out)), generator)


def _kaiming_std(tensor, a, mode, nonlinearity):
    fan = _calculate_correct_fan(tensor, mode)
    return calculate_gain(nonlinearity, a) / math.sqrt(fan)


def kaiming_uniform_(tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                     generator=None):
    """He uniform: U(-bound, bound) with bound = gain * sqrt(3 / fan); fan is fan_in or fan_out
    (`mode`), gain = calculate_gain(nonlinearity, a)."""
    _check_float("kaiming_uniform_", tensor)
    if _no_op_if_empty(tensor):
        return tensor
    bound = math.sqrt(3.0) * _kaiming_std(tensor, a, mode, nonlinearity)
    return _fill_uniform(tensor, -bound, bound, generator)


def kaiming_normal_(tensor, a: float = 0, mode: str = "fan_in", nonlinearity: str = "leaky_relu",
                    generator=None):
    """He normal: N(0, std^2) with std = gain / sqrt(fan)."""
    _check_float("kaiming_normal_", tensor)
    if _no_op_if_empty(tensor):
        return tensor
    return _fill_normal(tensor, 0.0, _kaiming_std(tensor, a, mode, nonlinearity), generator)


def orthogonal_(tensor, gain: float = 1, generator=None):
    """A (semi-)orthogonal matrix, as torch.nn.init.orthogonal_: the array is viewed as
    (shape[0], prod(shape[1:])); its rows (or columns, if fewer) are orthonormal, times gain."""
    _check_float("orthogonal_", tensor)
    if len(tensor.shape) < 2:
        raise ValueError("Only tensors with 2 or more dimensions are supported")
    if _no_op_if_empty(tensor):
        return tensor
    rows = int(tensor.shape[0])
    cols = int(np.prod(tensor.shape, dtype=np.int64)) // rows
    backend = backend_of(tensor)
    # QR runs on the host in float64: the draw is (rows, cols) so it follows the seeded generator
    flat = np.asarray(backend.to_host(_draw("normal", np.empty((rows, cols), tensor.dtype), generator)),
                      dtype=np.float64)
    if rows < cols:
        flat = flat.T
    q, r = np.linalg.qr(flat)
    q = q * np.sign(np.diag(r))  # makes the decomposition unique (uniform over orthogonal matrices)
    if rows < cols:
        q = q.T
    value = backend.asarray(np.ascontiguousarray((q * gain).reshape(tuple(tensor.shape)), dtype=tensor.dtype))
    return _write(tensor, value)


# -- exports ----------------------------------------------------------------------------------------

_LEVELS = {"calculate_gain": "stable", "uniform_": "stable", "normal_": "stable", "constant_": "stable",
           "zeros_": "stable", "ones_": "stable", "xavier_uniform_": "stable", "xavier_normal_": "stable",
           "kaiming_uniform_": "stable", "kaiming_normal_": "stable", "orthogonal_": "experimental"}


def _declare(name: str, level: str):
    """Record a function of avalon.nn.init in the stability table (and make experimental ones warn)."""
    fn = globals()[name]
    if level == registry.EXPERIMENTAL:
        fn = registry._wrap_experimental(fn, f"avalon.nn.init.{name}", "Initializations")
        globals()[name] = fn
    fn.__avalon_stability__ = level
    fn.__avalon_component__ = "Initializations"
    registry.LEVELS[("nn", "init." + name)] = ("Initializations", level)


for _name, _level in _LEVELS.items():
    _declare(_name, _level)

registry.EXPORTS["nn"]["init"] = sys.modules[__name__]
registry.LEVELS[("nn", "init")] = ("Initializations", registry.STABLE)
registry.export("toplevel", "Initializations", name="init_kaiming_normal", level="stable")(kaiming_normal_)
registry.export("toplevel", "Initializations", name="init_constant", level="stable")(constant_)
