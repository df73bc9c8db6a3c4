"""SyncBatchNorm: batch normalization whose statistics are the global batch's,
across the ranks of avalon.distributed (as torch.nn.SyncBatchNorm).

In training mode each rank sums its shard's per-channel values (with its
example count) and all-reduces them (avalon.distributed.all_reduce: inside
avalon.grad a `process_all_reduce` node, whose VJP is the all-reduce of the
cotangents), giving the global mean; a second all-reduce of the centred
squares gives the global biased variance (two passes, as BatchNorm computes
it: no E[x^2] - E[x]^2 cancellation).  The output, the gradients and the
running statistics then equal single-process BatchNorm's on the global batch.
In a world of one process the all-reduces vanish and it is BatchNorm.
"""
from __future__ import annotations

import numpy as np

import avalon
from avalon import distributed

from ..module import Module
from ..registry import export
from .norm import _BatchNorm, _per_channel, _update_running

_COMPONENT = "Distributed"


def _channel_sums(x, axes):
    """Per-channel sums over `axes`, as a (C,) array."""
    return avalon.reshape(avalon.sum(x, axes, keepdims=True), (int(x.shape[1]),))


@export("functional", _COMPONENT)
def sync_batch_norm(input, running_mean, running_var, weight=None, bias=None, momentum=0.1,
                    eps: float = 1e-5):
    """batch_norm in training mode over the global batch: the statistics are
    all-reduced across the ranks of avalon.distributed (see the module docstring)."""
    shape = tuple(input.shape)
    nd = len(shape)
    if nd < 2:
        from .basic import shape_error
        raise shape_error("sync_batch_norm", "(N, C, *spatial)", shape)
    axes = (0,) + tuple(range(2, nd))
    local_n = int(np.prod([shape[a] for a in axes], dtype=np.int64))
    channels = shape[1]
    # [per-channel sums, count] in one all-reduce: the count varies between ranks (a ragged last batch)
    count = np.full((1,), local_n, dtype=input.dtype)
    packed = distributed.all_reduce(avalon.concatenate([_channel_sums(input, axes), count]))
    total = packed[channels]
    mean = avalon.reshape(packed[:channels] / total, (1, channels) + (1,) * (nd - 2))
    centered = input - mean
    sq_sums = distributed.all_reduce(_channel_sums(centered * centered, axes))
    var_c = sq_sums / total
    if running_mean is not None:
        _update_running(running_mean, avalon.stop_gradient(avalon.reshape(mean, (channels,))), momentum)
    if running_var is not None:
        _update_running(running_var, avalon.stop_gradient(var_c * (total / (total - 1.0))), momentum)
    out = centered * (1.0 / avalon.sqrt(_per_channel(var_c, nd) + eps))
    if weight is not None:
        out = out * _per_channel(weight, nd)
    if bias is not None:
        out = out + _per_channel(bias, nd)
    return out


@export("nn", _COMPONENT)
class SyncBatchNorm(_BatchNorm):
    """Batch normalization of (N, C, *) inputs with the global batch's statistics
    across the ranks of avalon.distributed (torch.nn.SyncBatchNorm's signature;
    process_group: only None, the whole world, is supported).  In eval mode,
    or in a world of one process, it is BatchNorm."""
    _ranks = (2, 3, 4, 5)
    _layouts = ("(N, C)", "(N, C, L)", "(N, C, H, W)", "(N, C, D, H, W)")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum=0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        if process_group is not None:
            raise ValueError("SyncBatchNorm: process_group must be None (the whole world of avalon.distributed); "
                             "sub-groups are not supported yet")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)

    def forward(self, input):
        if not self.training or distributed.world_size() == 1:
            return super().forward(input)
        self._check(input)
        momentum = self._momentum(input.dtype) if self.track_running_stats else 0.0
        return sync_batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                               momentum, self.eps)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """`module` with every BatchNorm1d/2d/3d replaced by a SyncBatchNorm holding
        the same arrays (as torch.nn.SyncBatchNorm.convert_sync_batchnorm)."""
        if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
            sync = cls(module.num_features, module.eps, module.momentum, module.affine,
                       module.track_running_stats, process_group)
            for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                setattr(sync, name, getattr(module, name))
            sync.training = module.training
            return sync
        if isinstance(module, Module):
            for name, child in list(module.named_children()):
                setattr(module, name, cls.convert_sync_batchnorm(child, process_group))
        return module
