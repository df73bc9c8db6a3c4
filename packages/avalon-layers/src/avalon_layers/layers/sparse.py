"""Index-based layers: EmbeddingBag (sums, means or maxima of bags of embeddings) and
F.embedding_bag, F.one_hot.

Bags are formed with ordinary ops, so the offsets may be traced: a membership matrix
(bag b holds position n when offsets[b] <= n < offsets[b + 1]) is compared from the
offsets, and a bag's sum is that matrix times the looked-up rows.
"""
from __future__ import annotations

import numpy as np

import avalon
from avalon.errors import at, user_location

from .. import init
from ..module import Module
from ..registry import export
from .basic import _embedding, new_param, place

_BASIC = "Basic layers"
_MODES = ("sum", "mean", "max")


@export("functional", _BASIC)
def one_hot(tensor, num_classes: int = -1):
    """int64 array of tensor's shape + (num_classes,) with a 1 at each label.  num_classes=-1
    takes max(label) + 1, which needs concrete labels (pass it explicitly inside a trace)."""
    if not hasattr(tensor, "dtype") or np.dtype(tensor.dtype).kind not in "iu":
        raise avalon.DtypeError(f"one_hot: labels must be an integer array, got "
                                f"{getattr(tensor, 'dtype', type(tensor).__name__)}{at(user_location())}")
    if isinstance(tensor, np.ndarray) and tensor.size:
        if tensor.min() < 0:
            raise ValueError(f"one_hot: class values must be non-negative, got {tensor.min()}"
                             f"{at(user_location())}")
        if num_classes >= 0 and tensor.max() >= num_classes:
            raise ValueError(f"one_hot: class values must be smaller than num_classes={num_classes}, got "
                             f"{tensor.max()}{at(user_location())}")
    return avalon.one_hot(tensor, num_classes, dtype=np.int64)


def _check_bag_arguments(input, offsets, mode, per_sample_weights, include_last_offset):
    if mode not in _MODES:
        raise ValueError(f"embedding_bag: mode must be one of {_MODES}, got {mode!r}")
    nd = len(input.shape)
    if nd == 2 and offsets is not None:
        raise ValueError("embedding_bag: offsets must be None for a 2-D input (each row is a bag)"
                         f"{at(user_location())}")
    if nd == 1 and offsets is None:
        raise ValueError("embedding_bag: a 1-D input needs offsets (the start of each bag)"
                         f"{at(user_location())}")
    if nd not in (1, 2):
        raise avalon.ShapeError(f"embedding_bag: input must be 1-D (with offsets) or 2-D (B, L), got shape "
                                f"{tuple(input.shape)}{at(user_location())}")
    if offsets is not None:
        if len(offsets.shape) != 1 or np.dtype(offsets.dtype).kind not in "iu":
            raise avalon.ShapeError(f"embedding_bag: offsets must be a 1-D integer array, got "
                                    f"{tuple(offsets.shape)} {np.dtype(offsets.dtype).name}{at(user_location())}")
        if include_last_offset and offsets.shape[0] < 1:
            raise ValueError("embedding_bag: include_last_offset=True needs at least one offset")
        if isinstance(offsets, np.ndarray) and offsets.size and offsets[0] != 0:
            raise ValueError(f"embedding_bag: offsets[0] must be 0, got {offsets[0]}{at(user_location())}")
    if per_sample_weights is not None:
        if mode != "sum":
            raise NotImplementedError(f"embedding_bag: per_sample_weights are only supported with mode='sum', "
                                      f"got mode={mode!r}{at(user_location())}")
        if tuple(per_sample_weights.shape) != tuple(input.shape):
            raise avalon.ShapeError(f"embedding_bag: per_sample_weights of shape {tuple(per_sample_weights.shape)}"
                                    f" must have the input's shape {tuple(input.shape)}{at(user_location())}")


def _membership(offsets, n, include_last_offset, dtype):
    """(B, n) array: 1 where position n belongs to bag b, else 0."""
    starts = offsets[:-1] if include_last_offset else offsets
    ends = offsets[1:] if include_last_offset else avalon.concatenate(
        [offsets[1:], np.array([n], dtype=offsets.dtype)])
    positions = np.arange(n, dtype=np.dtype(offsets.dtype))[None, :]
    after_start = avalon.ge(positions, avalon.expand_dims(starts, 1))
    before_end = avalon.lt(positions, avalon.expand_dims(ends, 1))
    return avalon.cast(after_start, dtype) * avalon.cast(before_end, dtype)


def _bag_reduce(rows, member, mode):
    """Reduce looked-up rows (N, D) into bags with `member` (B, N), weights already applied."""
    counts = avalon.sum(member, 1, keepdims=True)
    if mode == "max":
        inside = avalon.gt(avalon.expand_dims(member, 2), 0.0)
        biggest = avalon.max(avalon.where(inside, avalon.expand_dims(rows, 0), -np.inf), 1)
        return avalon.where(avalon.gt(counts, 0.0), biggest, 0.0)  # an empty bag gives zeros
    total = avalon.matmul(member, rows)
    if mode == "sum":
        return total
    return total / avalon.maximum(counts, 1.0)


@export("functional", _BASIC)
def embedding_bag(input, weight, offsets=None, max_norm=None, norm_type: float = 2, scale_grad_by_freq: bool = False,
                  mode: str = "mean", sparse: bool = False, per_sample_weights=None,
                  include_last_offset: bool = False, padding_idx=None):
    """Sum, mean or max of bags of rows of `weight`: each row of a 2-D input is a bag, or a
    1-D input is cut into bags starting at `offsets`.  Entries equal to padding_idx are left
    out of their bag; an empty bag gives zeros.  Returns (B, embedding_dim)."""
    _check_bag_arguments(input, offsets, mode, per_sample_weights, include_last_offset)
    rows = _embedding("embedding_bag", input, weight, None, max_norm, scale_grad_by_freq)
    dtype = weight.dtype
    if len(input.shape) == 2:  # (B, L) -> one bag per row: the membership is the identity per row
        b, length = (int(s) for s in input.shape)
        input = avalon.reshape(input, (b * length,))
        rows = avalon.reshape(rows, (b * length, int(weight.shape[1])))
        member = np.repeat(np.eye(b, dtype=dtype), length, axis=1)
        if per_sample_weights is not None:
            per_sample_weights = avalon.reshape(per_sample_weights, (b * length,))
    else:
        member = _membership(offsets, int(input.shape[0]), include_last_offset, dtype)
    if padding_idx is not None:
        padding_idx = padding_idx + int(weight.shape[0]) if padding_idx < 0 else padding_idx
        member = member * avalon.cast(avalon.ne(input, padding_idx), dtype)
    if per_sample_weights is not None:
        # sum mode only: weighting the membership weights each entry of its bag
        return avalon.matmul(member * per_sample_weights, rows)
    return _bag_reduce(rows, member, mode)


@export("nn", _BASIC)
class EmbeddingBag(Module):
    """embedding_bag as a layer: weight (num_embeddings, embedding_dim) initialized N(0, 1),
    the padding_idx row (left out of every bag) at zero."""

    def __init__(self, num_embeddings: int, embedding_dim: int, max_norm=None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False, _weight=None,
                 include_last_offset: bool = False, padding_idx=None, device=None, dtype=None):
        super().__init__()
        if max_norm is not None or scale_grad_by_freq:
            raise NotImplementedError("EmbeddingBag: max_norm and scale_grad_by_freq are not supported")
        if mode not in _MODES:
            raise ValueError(f"EmbeddingBag: mode must be one of {_MODES}, got {mode!r}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"EmbeddingBag: padding_idx must be within num_embeddings ({num_embeddings}), "
                                 f"got {padding_idx}")
            padding_idx = padding_idx + num_embeddings if padding_idx < 0 else padding_idx
        self.max_norm, self.norm_type, self.scale_grad_by_freq = max_norm, norm_type, scale_grad_by_freq
        self.mode, self.sparse, self.include_last_offset = mode, sparse, include_last_offset
        self.padding_idx = padding_idx
        if _weight is None:
            self.weight = new_param((num_embeddings, embedding_dim), dtype)
            self.reset_parameters()
        else:
            given = np.asarray(_weight)
            if given.shape != (self.num_embeddings, self.embedding_dim):
                raise avalon.ShapeError(f"EmbeddingBag: _weight has shape {given.shape}, expected "
                                        f"({self.num_embeddings}, {self.embedding_dim})")
            self.weight = new_param(given.shape, dtype)
            self.weight[...] = given
        place(self, device)

    def reset_parameters(self):
        init.normal_(self.weight)
        if self.padding_idx is not None:
            self.weight[self.padding_idx] = 0

    def forward(self, input, offsets=None, per_sample_weights=None):
        return embedding_bag(input, self.weight, offsets, mode=self.mode, per_sample_weights=per_sample_weights,
                             include_last_offset=self.include_last_offset, padding_idx=self.padding_idx)

    def extra_repr(self):
        s = f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s
