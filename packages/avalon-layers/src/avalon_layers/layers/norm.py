"""Normalization layers: BatchNorm1d/2d/3d and LayerNorm, and F.batch_norm /
F.layer_norm.

In training mode BatchNorm normalizes with the batch's statistics (biased
variance) and moves running_mean / running_var (unbiased variance) towards
them with avalon.assign, so the update happens in place both eagerly and
inside avalon.grad / avalon.jit.  num_batches_tracked is an int64 0-d buffer,
as in PyTorch, so torch state_dicts load unchanged.
"""
from __future__ import annotations

import numpy as np

import avalon

from .. import init
from ..module import Module
from ..registry import export
from .basic import new_buffer, new_param, place, shape_error

_BASIC = "Basic layers"


# -- functional forms ---------------------------------------------------------------------------------

def _per_channel(v, nd: int):
    """(C,) -> (1, C, 1, ...) to broadcast against an (N, C, *spatial) input."""
    return avalon.reshape(v, (1, int(v.shape[0])) + (1,) * (nd - 2))


def _update_running(running, batch_stat, momentum):
    """running <- (1 - momentum) running + momentum batch_stat, in place."""
    avalon.assign(running, (1.0 - momentum) * running + momentum * batch_stat)


@export("functional", _BASIC)
def batch_norm(input, running_mean, running_var, weight=None, bias=None, training: bool = False,
               momentum=0.1, eps: float = 1e-5):
    """Normalize each channel (axis 1) of input (N, C, *spatial).  training=True: with the
    batch's mean and biased variance, and running_mean / running_var (when given) updated in
    place with the unbiased variance; training=False: with the running statistics."""
    shape = tuple(input.shape)
    nd = len(shape)
    if nd < 2:
        raise shape_error("batch_norm", "(N, C, *spatial)", shape)
    axes = (0,) + tuple(range(2, nd))
    if training:
        n = int(np.prod([shape[a] for a in axes], dtype=np.int64))
        if n <= 1:
            raise avalon.ShapeError(f"batch_norm: expected more than 1 value per channel when training, "
                                    f"got input size {shape}")
        mean = avalon.mean(input, axes, keepdims=True)
        centered = input - mean
        var = avalon.mean(centered * centered, axes, keepdims=True)
        channels = (shape[1],)
        if running_mean is not None:
            _update_running(running_mean, avalon.stop_gradient(avalon.reshape(mean, channels)), momentum)
        if running_var is not None:
            unbiased = avalon.reshape(var, channels) * (n / (n - 1))
            _update_running(running_var, avalon.stop_gradient(unbiased), momentum)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: running_mean and running_var are needed when training=False")
        centered = input - _per_channel(running_mean, nd)
        var = _per_channel(running_var, nd)
    out = centered * (1.0 / avalon.sqrt(var + eps))
    if weight is not None:
        out = out * _per_channel(weight, nd)
    if bias is not None:
        out = out + _per_channel(bias, nd)
    return out


def _reset_affine(layer) -> None:
    """A normalization layer's affine parameters to the identity: weight 1, bias 0."""
    if layer.weight is not None:
        init.ones_(layer.weight)
    if layer.bias is not None:
        init.zeros_(layer.bias)


def _normalized_shape(normalized_shape) -> tuple:
    if isinstance(normalized_shape, (int, np.integer)):
        return (int(normalized_shape),)
    return tuple(int(s) for s in normalized_shape)


@export("functional", _BASIC)
def layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    """Normalize over the trailing dims `normalized_shape` (mean and biased variance), then
    scale by weight and shift by bias (both of shape normalized_shape) when given."""
    ns = _normalized_shape(normalized_shape)
    shape = tuple(input.shape)
    if len(shape) < len(ns) or shape[len(shape) - len(ns):] != ns:
        raise shape_error(f"layer_norm with normalized_shape={ns}", f"(*, {', '.join(map(str, ns))})", shape)
    return _layer_norm(input, ns, weight, bias, eps)


def _layer_norm(input, ns, weight, bias, eps):
    axes = tuple(range(len(input.shape) - len(ns), len(input.shape)))
    mean = avalon.mean(input, axes, keepdims=True)
    centered = input - mean
    var = avalon.mean(centered * centered, axes, keepdims=True)
    out = centered * (1.0 / avalon.sqrt(var + eps))
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


# -- layers --------------------------------------------------------------------------------------------------

class _BatchNorm(Module):
    """BatchNorm over axis 1 of inputs with one of `_ranks` ranks (`_layouts` for messages)."""
    _ranks: tuple = ()
    _layouts: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True):
        super().__init__()
        self.num_features, self.eps, self.momentum = int(num_features), eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = new_param((num_features,), dtype) if affine else None
        self.bias = new_param((num_features,), dtype) if affine and bias else None
        if track_running_stats:
            self.register_buffer("running_mean", new_buffer((num_features,), dtype))
            self.register_buffer("running_var", new_buffer((num_features,), dtype))
            self.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.reset_parameters()
        place(self, device)

    def reset_running_stats(self):
        if self.track_running_stats:
            init.zeros_(self.running_mean)
            init.ones_(self.running_var)
            init.zeros_(self.num_batches_tracked)

    def reset_parameters(self):
        self.reset_running_stats()
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def _check(self, input):
        shape = tuple(input.shape)
        expected = " or ".join(layout.replace("C", str(self.num_features)) for layout in self._layouts)
        if len(shape) not in self._ranks or shape[1] != self.num_features:
            raise shape_error(self, expected, shape)

    def _momentum(self, dtype):
        """The weight of this batch in the running statistics, after counting it (as PyTorch:
        `momentum`, or 1 / num_batches_tracked for a cumulative average when momentum is None)."""
        if self.num_batches_tracked is not None:
            avalon.assign(self.num_batches_tracked, avalon.add(self.num_batches_tracked, 1))
            if self.momentum is None:
                return 1.0 / avalon.cast(self.num_batches_tracked, dtype)
        return 0.0 if self.momentum is None else self.momentum

    def forward(self, input):
        self._check(input)
        if self.training and self.track_running_stats:
            momentum = self._momentum(input.dtype)
        else:
            momentum = 0.0 if self.momentum is None else self.momentum
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        return batch_norm(input, self.running_mean if update or not use_batch_stats else None,
                          self.running_var if update or not use_batch_stats else None,
                          self.weight, self.bias, use_batch_stats, momentum, self.eps)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")


@export("nn", _BASIC)
class BatchNorm1d(_BatchNorm):
    """Batch normalization of (N, C) or (N, C, L) inputs over every axis but C."""
    _ranks = (2, 3)
    _layouts = ("(N, C)", "(N, C, L)")


@export("nn", _BASIC)
class BatchNorm2d(_BatchNorm):
    """Batch normalization of (N, C, H, W) inputs over N, H and W."""
    _ranks = (4,)
    _layouts = ("(N, C, H, W)",)


@export("nn", _BASIC)
class BatchNorm3d(_BatchNorm):
    """Batch normalization of (N, C, D, H, W) inputs over N, D, H and W."""
    _ranks = (5,)
    _layouts = ("(N, C, D, H, W)",)


@export("nn", _BASIC)
class LayerNorm(Module):
    """Normalization over the trailing dims normalized_shape of each sample, with an
    elementwise affine transform (weight ones, bias zeros) when elementwise_affine."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        self.weight = new_param(self.normalized_shape, dtype) if elementwise_affine else None
        self.bias = new_param(self.normalized_shape, dtype) if elementwise_affine and bias else None
        self.reset_parameters()
        place(self, device)

    def reset_parameters(self):
        _reset_affine(self)

    def forward(self, input):
        ns = self.normalized_shape
        shape = tuple(input.shape)
        if len(shape) < len(ns) or shape[len(shape) - len(ns):] != ns:
            raise shape_error(self, f"(*, {', '.join(map(str, ns))})", shape)
        return _layer_norm(input, ns, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")


# -- GroupNorm ------------------------------------------------------------------------------------------------

@export("functional", _BASIC)
def group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    """Split the channels (axis 1) of input (N, C, *) into num_groups groups and normalize
    each group of each sample (mean and biased variance), then scale and shift per channel."""
    shape = tuple(input.shape)
    if len(shape) < 2 or shape[1] % num_groups:
        raise shape_error(f"group_norm with num_groups={num_groups}",
                          f"(N, C, *) with C divisible by {num_groups}", shape)
    grouped = avalon.reshape(input, (shape[0], num_groups, -1))
    mean = avalon.mean(grouped, 2, keepdims=True)
    centered = grouped - mean
    var = avalon.mean(centered * centered, 2, keepdims=True)
    out = avalon.reshape(centered * (1.0 / avalon.sqrt(var + eps)), shape)
    if weight is not None:
        out = out * _per_channel(weight, len(shape))
    if bias is not None:
        out = out + _per_channel(bias, len(shape))
    return out


@export("nn", _BASIC)
class GroupNorm(Module):
    """Group normalization of (N, C, *) inputs: num_groups groups of C / num_groups
    channels, with a per-channel affine transform (weight ones, bias zeros unless bias=False)
    when affine."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 device=None, dtype=None, *, bias: bool = True):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels ({num_channels}) must be divisible by num_groups "
                             f"({num_groups})")
        self.num_groups, self.num_channels = int(num_groups), int(num_channels)
        self.eps, self.affine = eps, affine
        self.weight = new_param((num_channels,), dtype) if affine else None
        self.bias = new_param((num_channels,), dtype) if affine and bias else None
        self.reset_parameters()
        place(self, device)

    def reset_parameters(self):
        _reset_affine(self)

    def forward(self, input):
        shape = tuple(input.shape)
        if len(shape) < 2 or shape[1] != self.num_channels:
            raise shape_error(self, f"(N, {self.num_channels}, *)", shape)
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")
