"""Channel-wise dropout: Dropout2d and F.dropout2d (whole feature maps are zeroed)."""
from __future__ import annotations

import avalon

from ..module import Module
from ..registry import export
from .basic import _check_p, shape_error

_BASIC = "Basic layers"


@export("functional", _BASIC)
def dropout2d(input, p: float = 0.5, training: bool = True, inplace: bool = False):
    """Zero each channel (input[n, c], a whole feature map) with probability p and scale the
    others by 1/(1-p), in training only.  As in PyTorch, a 3-D input is read as (N, C, L)."""
    _check_p("dropout2d", p)
    shape = tuple(input.shape)
    if len(shape) not in (3, 4):
        raise shape_error("dropout2d", "(N, C, H, W) or (N, C, L)", shape)
    if not training or p == 0.0:
        return input
    if p == 1.0:
        return input * 0.0
    # one uniform draw per (sample, channel), broadcast over the feature map
    draws = avalon.random_uniform(shape[:2] + (1,) * (len(shape) - 2), input.dtype, like=input)
    return avalon.where(avalon.ge(draws, p), input * (1.0 / (1.0 - p)), 0.0)


@export("nn", _BASIC)
class Dropout2d(Module):
    """dropout2d as a layer: in training, zero whole channels of (N, C, H, W) inputs with
    probability p and scale the rest by 1/(1-p); in eval mode, the identity."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        _check_p("Dropout2d", p)
        self.p, self.inplace = p, inplace

    def forward(self, input):
        return dropout2d(input, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}, inplace={self.inplace}"
