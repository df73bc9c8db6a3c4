"""Attention: F.scaled_dot_product_attention and nn.MultiheadAttention, with PyTorch's
signatures, parameter names and layouts (in_proj_weight (3E, E) packs the query, key and
value projections; out_proj is a Linear), masks and initialization.

Masks follow PyTorch.  In scaled_dot_product_attention a boolean attn_mask marks the
positions that TAKE PART (True = attend); in MultiheadAttention boolean attn_mask and
key_padding_mask mark the positions that are MASKED OUT (True = ignore).  Float masks are
added to the attention scores in both.  A query whose every key is masked gets zeros from
scaled_dot_product_attention and from MultiheadAttention with need_weights=False, and NaN
from MultiheadAttention with need_weights=True: PyTorch's results on its two paths.
"""
from __future__ import annotations

import math

import numpy as np

import avalon
from avalon.errors import at, user_location

from .. import init
from ..module import Module
from ..registry import export
from .basic import Linear, _check_p, new_param, place

_ATTENTION = "Attention"


def _is_bool(mask) -> bool:
    return np.dtype(mask.dtype) == np.bool_


def _causal_mask(length: int, source_length: int) -> np.ndarray:
    """(L, S) bool, True on and below the diagonal (top-left aligned, as PyTorch's is_causal)."""
    return np.tril(np.ones((length, source_length), dtype=bool))


def _repeat_heads(x, times: int):
    """(..., H, S, E) -> (..., H * times, S, E), each head repeated `times` times in a row."""
    if times == 1:
        return x
    heads = int(x.shape[-3])
    return avalon.take(x, np.repeat(np.arange(heads), times), len(x.shape) - 3)


def _safe_softmax(scores):
    """softmax over the last axis, with zeros (and zero gradients) for rows that are all -inf,
    as PyTorch's scaled_dot_product_attention gives for a query that may attend to nothing."""
    dead = avalon.eq(avalon.stop_gradient(avalon.max(scores, -1, keepdims=True)), -np.inf)
    return avalon.where(dead, 0.0, avalon.softmax(avalon.where(dead, 0.0, scores), -1))


@export("functional", _ATTENTION)
def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale=None, enable_gqa: bool = False):
    """softmax(query @ key^T * scale + mask) @ value over the last two axes: query (..., L, E),
    key (..., S, E), value (..., S, Ev) -> (..., L, Ev).  scale defaults to 1/sqrt(E).
    attn_mask: bool (True = attend) or float (added); is_causal: the lower-triangular mask;
    dropout_p: dropout on the attention weights (always applied when > 0, as in PyTorch);
    enable_gqa: key and value may have fewer heads (axis -3), each shared by a group of
    query heads."""
    _check_p("scaled_dot_product_attention", dropout_p)
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: give either attn_mask or is_causal=True, not both"
                         f"{at(user_location())}")
    if enable_gqa:
        if len(query.shape) < 3 or len(key.shape) < 3 or int(query.shape[-3]) % int(key.shape[-3]):
            raise avalon.ShapeError(f"scaled_dot_product_attention: with enable_gqa=True the query's heads (axis -3) "
                                    f"must be a multiple of the key's, got shapes {tuple(query.shape)} and "
                                    f"{tuple(key.shape)}{at(user_location())}")
        groups = int(query.shape[-3]) // int(key.shape[-3])
        key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    length, source_length = int(query.shape[-2]), int(key.shape[-2])
    if scale is None:
        scale = 1.0 / math.sqrt(int(query.shape[-1]))
    scores = avalon.matmul(query, avalon.swapaxes(key, -1, -2)) * float(scale)
    if is_causal:
        attn_mask = _causal_mask(length, source_length)
    if attn_mask is not None:
        scores = avalon.where(attn_mask, scores, -np.inf) if _is_bool(attn_mask) else scores + attn_mask
    weights = _safe_softmax(scores) if attn_mask is not None else avalon.softmax(scores, -1)
    if dropout_p > 0.0:
        weights = avalon.dropout(weights, dropout_p, True)
    return avalon.matmul(weights, value)


def _masked(scores, mask):
    """Scores with a MultiheadAttention mask applied: bool True = masked out, float added."""
    return avalon.where(mask, -np.inf, scores) if _is_bool(mask) else scores + mask


@export("nn", _ATTENTION)
class MultiheadAttention(Module):
    """Multi-head attention as torch.nn.MultiheadAttention: inputs (L, N, E) (or (N, L, E)
    with batch_first=True, or unbatched (L, E)); forward returns (output, attention weights
    averaged over heads, or per head, or None).  add_bias_kv and add_zero_attn are not
    supported."""

    _array_arguments = ("query", "key", "value")

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("MultiheadAttention: add_bias_kv=True and add_zero_attn=True are not "
                                      "supported; concatenate learned or zero key/value rows yourself")
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads}), both positive")
        _check_p("MultiheadAttention", dropout)
        self.embed_dim, self.num_heads, self.dropout = int(embed_dim), int(num_heads), dropout
        self.kdim = int(kdim) if kdim is not None else self.embed_dim
        self.vdim = int(vdim) if vdim is not None else self.embed_dim
        self._qkv_same_embed_dim = self.kdim == self.embed_dim and self.vdim == self.embed_dim
        self.batch_first, self.head_dim = batch_first, self.embed_dim // self.num_heads
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = new_param((3 * e, e), dtype)
        else:
            self.q_proj_weight = new_param((e, e), dtype)
            self.k_proj_weight = new_param((e, self.kdim), dtype)
            self.v_proj_weight = new_param((e, self.vdim), dtype)
        self.in_proj_bias = new_param((3 * e,), dtype) if bias else None
        self.out_proj = Linear(e, e, bias=bias, dtype=dtype)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()
        place(self, device)

    def _reset_parameters(self):
        """PyTorch's: Xavier-uniform projections, zero biases; out_proj.weight keeps Linear's init."""
        if self._qkv_same_embed_dim:
            init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            init.zeros_(self.in_proj_bias)
            init.zeros_(self.out_proj.bias)

    # -- forward ----------------------------------------------------------------------------------------------

    def _projection_weights(self):
        e = self.embed_dim
        if self._qkv_same_embed_dim:
            weights = [self.in_proj_weight[i * e:(i + 1) * e] for i in range(3)]
        else:
            weights = [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]
        biases = ([None] * 3 if self.in_proj_bias is None
                  else [self.in_proj_bias[i * e:(i + 1) * e] for i in range(3)])
        return weights, biases

    def _heads(self, x):
        """(N, T, E) -> (N, H, T, head_dim)."""
        n, t = int(x.shape[0]), int(x.shape[1])
        return avalon.swapaxes(avalon.reshape(x, (n, t, self.num_heads, self.head_dim)), 1, 2)

    def _check_inputs(self, query, key, value):
        nd = len(query.shape)
        if nd not in (2, 3) or len(key.shape) != nd or len(value.shape) != nd:
            raise avalon.ShapeError(f"{type(self).__name__}: query, key and value must all be 3-D (batched) or "
                                    f"2-D (unbatched), got shapes {tuple(query.shape)}, {tuple(key.shape)}, "
                                    f"{tuple(value.shape)}{at(user_location())}")
        for name, x, dim in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if int(x.shape[-1]) != dim:
                raise avalon.ShapeError(f"{type(self).__name__}: {name} must have {dim} features (last dim), got "
                                        f"shape {tuple(x.shape)}{at(user_location())}")
        if key.shape[:-1] != value.shape[:-1]:
            raise avalon.ShapeError(f"{type(self).__name__}: key {tuple(key.shape)} and value {tuple(value.shape)} "
                                    f"must agree in every dim but the last{at(user_location())}")

    def _batch_first(self, x, batched):
        if not batched:
            return avalon.expand_dims(x, 0)
        return x if self.batch_first else avalon.swapaxes(x, 0, 1)

    def _attn_mask(self, mask, n, length, source_length):
        """attn_mask (L, S) or (N * num_heads, L, S) -> broadcastable against (N, H, L, S)."""
        shape = tuple(mask.shape)
        if shape == (length, source_length):
            return mask
        if shape == (n * self.num_heads, length, source_length):
            return avalon.reshape(mask, (n, self.num_heads, length, source_length))
        raise avalon.ShapeError(f"{type(self).__name__}: attn_mask must have shape ({length}, {source_length}) or "
                                f"({n * self.num_heads}, {length}, {source_length}), got {shape}"
                                f"{at(user_location())}")

    def _key_padding_mask(self, mask, n, source_length, batched):
        expected = (n, source_length) if batched else (source_length,)
        if tuple(mask.shape) != expected:
            raise avalon.ShapeError(f"{type(self).__name__}: key_padding_mask must have shape {expected}, got "
                                    f"{tuple(mask.shape)}{at(user_location())}")
        return avalon.reshape(mask, (n, 1, 1, source_length))

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        self._check_inputs(query, key, value)
        if is_causal and attn_mask is None:
            raise RuntimeError(f"{type(self).__name__}: is_causal=True is a hint that attn_mask is the causal mask, "
                             "and needs attn_mask; pass attn_mask=nn.Transformer.generate_square_subsequent_mask(L)"
                             f"{at(user_location())}")
        batched = len(query.shape) == 3
        q, k, v = (self._batch_first(x, batched) for x in (query, key, value))
        n, length, source_length = int(q.shape[0]), int(q.shape[1]), int(k.shape[1])
        weights, biases = self._projection_weights()
        q, k, v = (self._heads(avalon.linear(x, w, b)) for x, w, b in zip((q, k, v), weights, biases))
        scores = avalon.matmul(q * (1.0 / math.sqrt(self.head_dim)), avalon.swapaxes(k, -1, -2))
        if attn_mask is not None:
            scores = _masked(scores, self._attn_mask(attn_mask, n, length, source_length))
        if key_padding_mask is not None:
            scores = _masked(scores, self._key_padding_mask(key_padding_mask, n, source_length, batched))
        masked = attn_mask is not None or key_padding_mask is not None
        # PyTorch's two paths differ for a query with every key masked: NaN weights when they
        # are returned, zeros from its fused attention when they are not
        attention = _safe_softmax(scores) if masked and not need_weights else avalon.softmax(scores, -1)
        if self.training and self.dropout > 0.0:
            attention = avalon.dropout(attention, self.dropout, True)
        out = avalon.reshape(avalon.swapaxes(avalon.matmul(attention, v), 1, 2), (n, length, self.embed_dim))
        out = self.out_proj(out)
        out = avalon.squeeze(out, 0) if not batched else out if self.batch_first else avalon.swapaxes(out, 0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            attention = avalon.mean(attention, 1)
        return out, (attention if batched else avalon.squeeze(attention, 0))
