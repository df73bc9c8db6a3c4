"""Unflatten: one axis split into several (the inverse of Flatten)."""
from __future__ import annotations

import numpy as np

import avalon

from ..module import Module
from ..registry import export
from .basic import shape_error

_BASIC = "Basic layers"


@export("nn", _BASIC)
class Unflatten(Module):
    """Splits axis `dim` of the input into `unflattened_size` (a tuple of ints, one of which
    may be -1): (N, 12) -> (N, 3, 4) with Unflatten(1, (3, 4))."""

    def __init__(self, dim: int, unflattened_size):
        super().__init__()
        if isinstance(unflattened_size, (int, np.integer)) or not all(
                isinstance(s, (int, np.integer)) for s in unflattened_size):
            raise TypeError(f"Unflatten: unflattened_size must be a tuple of ints, got {unflattened_size!r}")
        self.dim, self.unflattened_size = dim, tuple(int(s) for s in unflattened_size)

    def forward(self, input):
        shape = tuple(input.shape)
        if not -len(shape) <= self.dim < len(shape):
            raise shape_error(self, f"with a dim {self.dim}", shape)
        d = self.dim % len(shape)
        sizes = self.unflattened_size
        known = int(np.prod([s for s in sizes if s != -1], dtype=np.int64))
        if sizes.count(-1) > 1 or (-1 not in sizes and known != shape[d]) or (
                -1 in sizes and (known == 0 or shape[d] % known)):
            raise shape_error(self, f"whose dim {self.dim} has a size that unflattened_size={sizes} "
                                    f"splits exactly", shape)
        return avalon.reshape(input, shape[:d] + sizes + shape[d + 1:])

    def extra_repr(self):
        return f"dim={self.dim}, unflattened_size={self.unflattened_size}"
