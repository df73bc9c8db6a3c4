"""Index-based layers: EmbeddingBag (sums, means or maxima of bags of embeddings) and
F.embedding_bag, F.one_hot.

Bags are formed with ordinary ops, so the offsets may be traced: each position's bag is
the number of bag starts at or before it, minus one, and the sums of bags are a
scatter-add of the looked-up rows (getitem's VJP primitive).  The maximum compares a
(bags, positions, embedding_dim) array: its cost grows with the number of bags times
the input's length.
"""
from __future__ import annotations

import numpy as np

import avalon
from avalon.errors import at, user_location
from avalon.ops.indexing import getitem_grad_p
from avalon.primitive import bind

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
        if isinstance(offsets, np.ndarray):  # traced offsets have no values to check yet
            _check_offsets(offsets, int(input.shape[0]), include_last_offset)
    if per_sample_weights is not None:
        if mode != "sum":
            raise NotImplementedError(f"embedding_bag: per_sample_weights are only supported with mode='sum', "
                                      f"got mode={mode!r}{at(user_location())}")
        if tuple(per_sample_weights.shape) != tuple(input.shape):
            raise avalon.ShapeError(f"embedding_bag: per_sample_weights of shape {tuple(per_sample_weights.shape)}"
                                    f" must have the input's shape {tuple(input.shape)}{at(user_location())}")


def _check_offsets(offsets, n, include_last_offset):
    """Offsets start at 0, never decrease and stay within the input; with include_last_offset
    the last one is the input's length (PyTorch's result is undefined otherwise)."""
    if offsets.size and offsets[0] != 0:
        raise ValueError(f"embedding_bag: offsets[0] must be 0, got {offsets[0]}{at(user_location())}")
    if np.any(np.diff(offsets) < 0) or (offsets.size and offsets.max() > n):
        raise ValueError(f"embedding_bag: offsets must be non-decreasing and at most the input's length {n}, got "
                         f"{offsets.tolist()}{at(user_location())}")
    if include_last_offset and offsets[-1] != n:
        raise ValueError(f"embedding_bag: with include_last_offset=True the last offset must be the input's length "
                         f"{n}, got {offsets[-1]}{at(user_location())}")


def _segment_sum(values, segment_ids, num_segments: int):
    """Sums of the rows of `values` (N, *rest) that share a segment id -> (num_segments, *rest).
    This is getitem's VJP primitive (zeros, with `values` scatter-added at the ids: linear in N),
    whose own VJP is the gather values[segment_ids]."""
    shape = (int(num_segments),) + tuple(values.shape[1:])
    return bind(getitem_grad_p, (values, segment_ids), {"index": (("arr",),), "shape": shape})


def _max_of_bags(rows, member):
    """Elementwise max of the rows (…, N, D) each bag (member (…, B, N) bool) holds; 0 for an empty bag."""
    inside = avalon.expand_dims(member, -1)
    biggest = avalon.max(avalon.where(inside, avalon.expand_dims(rows, -3), -np.inf), -2)
    nonempty = avalon.gt(avalon.sum(avalon.cast(inside, rows.dtype), -2), 0.0)
    return avalon.where(nonempty, biggest, 0.0)


def _fixed_bags(rows, keep, weights, mode):
    """Bags that are the rows of a 2-D input: rows (B, L, D), keep (B, L) 0/1 or None."""
    if mode == "max":
        if keep is None:
            return avalon.max(rows, 1)
        return _max_of_bags(rows, avalon.expand_dims(avalon.gt(keep, 0.0), 1))[:, 0]
    scale = keep if weights is None else weights if keep is None else keep * weights
    total = avalon.sum(rows if scale is None else rows * avalon.expand_dims(scale, -1), 1)
    if mode == "sum":
        return total
    count = float(rows.shape[1]) if keep is None else avalon.maximum(avalon.sum(keep, 1, keepdims=True), 1.0)
    return total / count


def _offset_bags(rows, offsets, keep, weights, mode, include_last_offset):
    """Bags cut from a 1-D input at `offsets`: rows (N, D), keep (N,) 0/1 or None.  Offsets may
    be traced: each position's bag is the number of bag starts at or before it, minus one."""
    n, dtype = int(rows.shape[0]), rows.dtype
    starts = offsets[:-1] if include_last_offset else offsets
    bags = int(starts.shape[0])
    positions = np.arange(n, dtype=np.dtype(offsets.dtype))
    started = avalon.ge(positions[None, :], avalon.expand_dims(starts, 1))
    bag_of = avalon.maximum(avalon.sum(avalon.cast(started, np.int64), 0) - 1, 0)
    # positions outside [offsets[0], end) belong to no bag
    inside = avalon.cast(avalon.ge(positions, offsets[0]), dtype)
    if include_last_offset:
        inside = inside * avalon.cast(avalon.lt(positions, offsets[-1]), dtype)
    keep = inside if keep is None else keep * inside
    if mode == "max":
        member = avalon.eq(bag_of[None, :], np.arange(bags, dtype=np.int64)[:, None])
        return _max_of_bags(rows, avalon.where(avalon.gt(keep, 0.0), member, False))
    scale = keep if weights is None else keep * weights
    total = _segment_sum(rows * avalon.expand_dims(scale, 1), bag_of, bags)
    if mode == "sum":
        return total
    return total / avalon.maximum(avalon.expand_dims(_segment_sum(keep, bag_of, bags), 1), 1.0)


@export("functional", _BASIC)
def embedding_bag(input, weight, offsets=None, max_norm=None, norm_type: float = 2, scale_grad_by_freq: bool = False,
                  mode: str = "mean", sparse: bool = False, per_sample_weights=None,
                  include_last_offset: bool = False, padding_idx=None):
    """Sum, mean or max of bags of rows of `weight`: each row of a 2-D input is a bag, or a
    1-D input is cut into bags starting at `offsets`.  Entries equal to padding_idx are left
    out of their bag; an empty bag gives zeros.  Returns (B, embedding_dim)."""
    _check_bag_arguments(input, offsets, mode, per_sample_weights, include_last_offset)
    rows = _embedding("embedding_bag", input, weight, None, max_norm, scale_grad_by_freq)
    keep = None
    if padding_idx is not None:  # padding entries are left out of their bag (and of a mean's count)
        padding_idx = padding_idx + int(weight.shape[0]) if padding_idx < 0 else padding_idx
        keep = avalon.cast(avalon.ne(input, padding_idx), weight.dtype)
    if len(input.shape) == 2:
        return _fixed_bags(rows, keep, per_sample_weights, mode)
    return _offset_bags(rows, offsets, keep, per_sample_weights, mode, include_last_offset)


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
