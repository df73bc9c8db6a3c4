"""Transformer layers as torch.nn's: TransformerEncoderLayer, TransformerEncoder,
TransformerDecoderLayer, TransformerDecoder and Transformer, with PyTorch's submodule
names (self_attn, linear1, norm1, ...) so that torch state_dicts load, post-norm or
pre-norm (norm_first) blocks, and PyTorch's masks (see attention.py).

The stacks hold deep copies of the layer they are given, as PyTorch's do: every layer
starts with the same parameters.
"""
from __future__ import annotations

import copy

import numpy as np

import avalon

from .. import activations, init
from ..module import Module
from ..registry import export
from .attention import MultiheadAttention
from .basic import Dropout, Linear, ModuleList, place
from .norm import LayerNorm

_ATTENTION = "Attention"


def _activation(activation):
    if isinstance(activation, str):
        if activation == "relu":
            return activations.relu
        if activation == "gelu":
            return activations.gelu
        raise RuntimeError(f"activation should be relu/gelu, not {activation}")
    if not callable(activation):
        raise TypeError(f"activation must be 'relu', 'gelu' or a callable, got {activation!r}")
    return activation


def _part(cls, *args, **kwargs):
    """An experimental layer built as a part of another one: the user was warned once about
    the layer they built, so its parts skip their own warning (registry wraps __init__)."""
    obj = cls.__new__(cls)
    getattr(cls.__init__, "__wrapped__", cls.__init__)(obj, *args, **kwargs)
    return obj


def _clones(module, n):
    return ModuleList([copy.deepcopy(module) for _ in range(int(n))])


class _FeedForwardBlocks(Module):
    """What encoder and decoder layers share: the feed-forward block linear2(dropout(act(linear1(x))))."""

    def _init_feedforward(self, d_model, dim_feedforward, dropout, bias, dtype):
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, dtype=dtype)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, dtype=dtype)

    def _ff_block(self, x, dropout):
        return dropout(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    @staticmethod
    def _attend(attention, x, memory, mask, key_padding_mask, is_causal, dropout):
        return dropout(attention(x, memory, memory, attn_mask=mask, key_padding_mask=key_padding_mask,
                                 need_weights=False, is_causal=is_causal)[0])


@export("nn", _ATTENTION)
class TransformerEncoderLayer(_FeedForwardBlocks):
    """Self-attention then a feed-forward block, each with a residual connection and a
    LayerNorm (after the residual add, or before the block with norm_first=True)."""

    _array_arguments = ("src",)

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=activations.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.self_attn = _part(MultiheadAttention, d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            dtype=dtype)
        self._init_feedforward(d_model, dim_feedforward, dropout, bias, dtype)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.dropout1, self.dropout2 = Dropout(dropout), Dropout(dropout)
        self.activation = _activation(activation)
        place(self, device)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        x = src
        if self.norm_first:
            h = self.norm1(x)
            x = x + self._attend(self.self_attn, h, h, src_mask, src_key_padding_mask, is_causal, self.dropout1)
            return x + self._ff_block(self.norm2(x), self.dropout2)
        x = self.norm1(x + self._attend(self.self_attn, x, x, src_mask, src_key_padding_mask, is_causal,
                                        self.dropout1))
        return self.norm2(x + self._ff_block(x, self.dropout2))


@export("nn", _ATTENTION)
class TransformerDecoderLayer(_FeedForwardBlocks):
    """Self-attention over the target, attention to the memory (the encoder's output), then a
    feed-forward block; residual connections and LayerNorms as in TransformerEncoderLayer."""

    _array_arguments = ("tgt", "memory")

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=activations.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.self_attn = _part(MultiheadAttention, d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            dtype=dtype)
        self.multihead_attn = _part(MultiheadAttention, d_model, nhead, dropout=dropout, bias=bias,
                                                 batch_first=batch_first, dtype=dtype)
        self._init_feedforward(d_model, dim_feedforward, dropout, bias, dtype)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.dropout1, self.dropout2, self.dropout3 = Dropout(dropout), Dropout(dropout), Dropout(dropout)
        self.activation = _activation(activation)
        place(self, device)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal: bool = False, memory_is_causal: bool = False):
        x = tgt
        if self.norm_first:
            h = self.norm1(x)
            x = x + self._attend(self.self_attn, h, h, tgt_mask, tgt_key_padding_mask, tgt_is_causal,
                                 self.dropout1)
            x = x + self._attend(self.multihead_attn, self.norm2(x), memory, memory_mask, memory_key_padding_mask,
                                 memory_is_causal, self.dropout2)
            return x + self._ff_block(self.norm3(x), self.dropout3)
        x = self.norm1(x + self._attend(self.self_attn, x, x, tgt_mask, tgt_key_padding_mask, tgt_is_causal,
                                        self.dropout1))
        x = self.norm2(x + self._attend(self.multihead_attn, x, memory, memory_mask, memory_key_padding_mask,
                                        memory_is_causal, self.dropout2))
        return self.norm3(x + self._ff_block(x, self.dropout3))


@export("nn", _ATTENTION)
class TransformerEncoder(Module):
    """num_layers copies of encoder_layer applied in turn, then `norm` when given."""

    _array_arguments = ("src",)

    def __init__(self, encoder_layer, num_layers: int, norm=None, enable_nested_tensor: bool = True,
                 mask_check: bool = True):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers, self.norm = int(num_layers), norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return self.norm(out) if self.norm is not None else out


@export("nn", _ATTENTION)
class TransformerDecoder(Module):
    """num_layers copies of decoder_layer applied in turn to the target, each attending to
    the memory, then `norm` when given."""

    _array_arguments = ("tgt", "memory")

    def __init__(self, decoder_layer, num_layers: int, norm=None):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers, self.norm = int(num_layers), norm

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal: bool = False):
        out = tgt
        for layer in self.layers:
            out = layer(out, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                        tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return self.norm(out) if self.norm is not None else out


@export("nn", _ATTENTION)
class Transformer(Module):
    """An encoder-decoder transformer as torch.nn.Transformer: every parameter with more
    than one dim re-initialized Xavier-uniform."""

    _array_arguments = ("src", "tgt")

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=activations.relu, custom_encoder=None, custom_decoder=None, layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True, device=None, dtype=None):
        super().__init__()
        layer_args = dict(dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                          layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first,
                          bias=bias, dtype=dtype)
        self.encoder = custom_encoder if custom_encoder is not None else _part(
            TransformerEncoder, _part(TransformerEncoderLayer, d_model, nhead, **layer_args), num_encoder_layers,
            LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype))
        self.decoder = custom_decoder if custom_decoder is not None else _part(
            TransformerDecoder, _part(TransformerDecoderLayer, d_model, nhead, **layer_args), num_decoder_layers,
            LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype))
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first
        self._reset_parameters()
        place(self, device)

    def _reset_parameters(self):
        for p in self.parameters():
            if p.ndim > 1:
                init.xavier_uniform_(p)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                memory_is_causal: bool = False):
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                              is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device=None, dtype=None):
        """(sz, sz) float mask: -inf above the diagonal (future positions), 0 elsewhere."""
        mask = np.triu(np.full((sz, sz), -np.inf, dtype=np.float32 if dtype is None else dtype), k=1)
        return mask if device is None else avalon.to_device(mask, device)
