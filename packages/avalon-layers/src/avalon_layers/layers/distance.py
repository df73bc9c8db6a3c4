"""Norms and similarities: F.normalize, F.cosine_similarity and nn.CosineSimilarity."""
from __future__ import annotations

import avalon
from avalon.ops._rules import broadcast_shapes

from ..module import Module
from ..registry import export

_BASIC = "Basic layers"


def _clamped_norm(x, p, dim, eps):
    """max(||x||_p along dim, eps), keepdims.  The clamp is applied to the p-th power
    (max(sum |x|^p, eps^p)^(1/p) is the same number) so that an all-zero slice gets a zero
    gradient, as in PyTorch, rather than the 0 * inf of a root taken at 0."""
    if p == float("inf"):
        return avalon.maximum(avalon.max(avalon.abs(x), dim, keepdims=True), float(eps))
    if p == 2:
        return avalon.sqrt(avalon.maximum(avalon.sum(x * x, dim, keepdims=True), float(eps) ** 2))
    if p == 1:
        return avalon.maximum(avalon.sum(avalon.abs(x), dim, keepdims=True), float(eps))
    powered = avalon.sum(avalon.pow(avalon.abs(x), float(p)), dim, keepdims=True)
    return avalon.pow(avalon.maximum(powered, float(eps) ** p), 1.0 / p)


@export("functional", _BASIC)
def normalize(input, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out=None):
    """input / max(||input||_p along dim, eps): unit-norm slices along `dim`."""
    if out is not None:
        raise TypeError("normalize: out= is not supported (Avalon arrays are not written in place); "
                        "use the returned array")
    if not p > 0:
        raise ValueError(f"normalize: p must be positive, got {p}")
    return input / _clamped_norm(input, p, dim, eps)


@export("functional", _BASIC)
def cosine_similarity(x1, x2, dim: int = 1, eps: float = 1e-8):
    """Cosine of the angle between x1 and x2 along `dim` (inputs broadcast against each other);
    each norm is clamped below at eps, as in PyTorch."""
    shape = broadcast_shapes("cosine_similarity", tuple(x1.shape), tuple(x2.shape))
    x1, x2 = avalon.broadcast_to(x1, shape), avalon.broadcast_to(x2, shape)
    unit1 = x1 / _clamped_norm(x1, 2, dim, eps)
    unit2 = x2 / _clamped_norm(x2, 2, dim, eps)
    return avalon.sum(unit1 * unit2, dim)


@export("nn", _BASIC)
class CosineSimilarity(Module):
    """cosine_similarity(x1, x2, dim, eps) as a layer."""

    _array_arguments = ("x1", "x2")

    def __init__(self, dim: int = 1, eps: float = 1e-8):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x1, x2):
        return cosine_similarity(x1, x2, self.dim, self.eps)
