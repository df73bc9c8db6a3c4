"""Parity of avalon.nn's attention and transformer layers with PyTorch:
F.scaled_dot_product_attention, nn.MultiheadAttention, TransformerEncoderLayer / Encoder,
TransformerDecoderLayer / Decoder and Transformer.

Each torch module's state_dict is loaded into Avalon's; the forward output (eagerly and
through avalon.jit) and the gradients (avalon.grad of sum(out * cotangent)) with respect to
every float input and every parameter must match torch autograd's.  Masks: bool and float
attention masks, key padding masks, causal masks.  Dropout: p=0 in training mode matches
exactly; with p > 0 the dropped attention weights are checked by structure and frequency.
"""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import avalon
import avalon.nn as nn
import avalon.nn.functional as F
from avalon_layers.module import LayerInputError

pytestmark = [pytest.mark.filterwarnings("ignore::avalon_layers.registry.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:enable_nested_tensor:UserWarning")]

RTOL, ATOL = 1e-5, 2e-5
TF = torch.nn.functional


# -- helpers ------------------------------------------------------------------------------------------

def _randn(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _load(m, tm):
    m.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    return m


def _close(ours, theirs, what, atol=ATOL, rtol=RTOL):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours is not None, f"{what}: no result"
    assert tuple(np.shape(ours)) == tuple(theirs.shape), f"{what}: shape {np.shape(ours)} vs {theirs.shape}"
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=rtol, atol=atol, err_msg=what)


def _attr_path(obj, dotted):
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _torch_value(v):
    return torch.from_numpy(v) if isinstance(v, np.ndarray) else v


class _Fn(nn.Module):
    """A function as a parameterless module, so that one checker serves layers and functions."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs, **kw):
        return self.fn(*xs, **kw)


def check_parity(m, tm, inputs, consts=None, pick=lambda out: out, atol=ATOL, rtol=RTOL):
    """m(*inputs, **consts) against tm: forward (eager and jitted), d/d every input and
    every parameter.  `pick` chooses the output compared (MultiheadAttention returns a pair)."""
    consts = consts or {}
    if isinstance(tm, torch.nn.Module):
        tm.zero_grad()
    if not isinstance(m, nn.Module):
        m = _Fn(m)
    tin = [torch.from_numpy(x.copy()).requires_grad_() for x in inputs]
    tout = pick(tm(*tin, **{k: _torch_value(v) for k, v in consts.items()}))
    ct = _randn(tuple(tout.shape), seed=7, dtype=inputs[0].dtype)
    (tout * torch.from_numpy(ct)).sum().backward()

    _close(pick(m(*inputs, **consts)), tout, "eager forward", atol, rtol)
    jitted = avalon.jit(lambda mod, *xs: pick(mod(*xs, **consts)))
    _close(jitted(m, *inputs), tout, "jitted forward", atol, rtol)
    loss, grads = avalon.grad(lambda mod, ct_, *xs: avalon.sum(pick(mod(*xs, **consts)) * ct_), m, ct, *inputs)
    _close(loss, (tout * torch.from_numpy(ct)).sum(), "loss", atol * 10, rtol)
    for k, (g, t) in enumerate(zip(grads[2:], tin)):
        # torch leaves .grad None for an input the output does not depend on; Avalon gives
        # an array argument zeros there (as torch.func does)
        _close(g, torch.zeros_like(t) if t.grad is None else t.grad, f"d/dinput{k}", atol, rtol)
    if isinstance(tm, torch.nn.Module):
        names = [n for n, _ in tm.named_parameters()]
        assert names == [n for n, _ in m.named_parameters()]
        for name, p in tm.named_parameters():
            if p.grad is None:
                assert _attr_path(grads[0], name) is None, f"d/d{name}: a gradient where torch has none"
                continue
            _close(_attr_path(grads[0], name), p.grad, f"d/d{name}", atol, rtol)


def _pair(name, *args, dtype=np.float32, **kw):
    torch.manual_seed(0)
    tm = getattr(torch.nn, name)(*args, **kw)
    m = getattr(nn, name)(*args, dtype=dtype, **kw) if dtype != np.float32 else getattr(nn, name)(*args, **kw)
    if dtype == np.float64:
        tm = tm.double()
    _perturb_biases(tm)
    return _load(m, tm), tm


def _perturb_biases(tm):
    """Random biases and norm parameters (they start at zeros / ones, which would hide mistakes)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + (1.0 if "norm" in name and
                                                                                   "weight" in name else 0.0))


def _causal_bool(n, s=None):
    return np.triu(np.ones((n, s or n), bool), 1)  # True = masked out (MultiheadAttention's convention)


# -- scaled_dot_product_attention -----------------------------------------------------------------------

def _float_mask(shape, seed=4):
    m = _randn(shape, seed)
    m[..., 0, 1:] = -np.inf  # a query that sees only the first key
    return m


SDPA_CASES = [
    ("plain", (2, 3, 5, 4), (2, 3, 6, 4), (2, 3, 6, 5), {}),
    ("bool mask", (2, 3, 5, 4), (2, 3, 6, 4), (2, 3, 6, 4), dict(attn_mask=~_causal_bool(5, 6))),
    ("float mask", (2, 5, 4), (2, 6, 4), (2, 6, 3), dict(attn_mask=_float_mask((5, 6)))),
    ("broadcast float mask", (2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 4), dict(attn_mask=_float_mask((2, 1, 5, 5)))),
    ("causal", (2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 4), dict(is_causal=True)),
    ("causal rectangular", (1, 2, 4, 4), (1, 2, 6, 4), (1, 2, 6, 4), dict(is_causal=True)),
    ("scale", (2, 5, 8), (2, 7, 8), (2, 7, 8), dict(scale=0.3)),
    ("grouped query", (2, 4, 5, 4), (2, 2, 6, 4), (2, 2, 6, 4), dict(enable_gqa=True)),
]


@pytest.mark.parametrize("name,qs,ks,vs,kw", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_scaled_dot_product_attention(name, qs, ks, vs, kw):
    inputs = [_randn(qs, 1), _randn(ks, 2), _randn(vs, 3)]
    check_parity(F.scaled_dot_product_attention, TF.scaled_dot_product_attention, inputs, kw)


def _dead_first_row(shape, as_bool):
    """A mask under which query 0 may attend to no key (bool: True = attend)."""
    mask = _randn(shape, 5) > -0.5
    mask[..., 0, :] = False
    mask[..., :, 0] = mask[..., :, 0] | (np.arange(shape[-2]) > 0)  # every other query sees key 0
    return mask if as_bool else np.where(mask, 0.0, -np.inf).astype(np.float32)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN torch also gives
@pytest.mark.parametrize("as_bool", [True, False])
def test_a_query_that_sees_no_key_gets_zeros_as_in_torch(as_bool):
    inputs = [_randn((2, 5, 4), 1), _randn((2, 6, 4), 2), _randn((2, 6, 4), 3)]
    mask = _dead_first_row((5, 6), as_bool)
    check_parity(F.scaled_dot_product_attention, TF.scaled_dot_product_attention, inputs, dict(attn_mask=mask))
    assert np.all(F.scaled_dot_product_attention(*inputs, attn_mask=mask)[:, 0] == 0)
    # MultiheadAttention: True = masked out.  Zeros without weights, NaN with them, as torch's two paths
    m, tm = _pair("MultiheadAttention", 4, 2, batch_first=True)
    mha_mask = ~mask if as_bool else mask
    check_parity(m, tm, inputs, dict(attn_mask=mha_mask, need_weights=False), pick=lambda out: out[0])
    out, weights = m(*inputs, attn_mask=mha_mask)
    t_out, t_weights = tm(*[torch.from_numpy(x) for x in inputs], attn_mask=torch.from_numpy(mha_mask))
    assert np.all(np.isnan(out[:, 0])) and np.all(np.isnan(weights[:, 0]))
    assert torch.isnan(t_out[:, 0]).all() and torch.isnan(t_weights[:, 0]).all()
    _close(out[:, 1:], t_out[:, 1:], "the other queries")


def test_scaled_dot_product_attention_float64_and_errors():
    inputs = [_randn((2, 5, 4), k, np.float64) for k in (1, 2, 3)]
    check_parity(F.scaled_dot_product_attention, TF.scaled_dot_product_attention, inputs,
                 dict(attn_mask=~_causal_bool(5)), atol=1e-12, rtol=1e-10)
    q = _randn((2, 5, 4))
    with pytest.raises(ValueError, match="either attn_mask or is_causal"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=~_causal_bool(5), is_causal=True)
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.scaled_dot_product_attention(q, q, q, dropout_p=1.5)
    q4, k4 = _randn((1, 3, 5, 4)), _randn((1, 2, 5, 4))
    with pytest.raises(avalon.ShapeError, match="multiple of the key's"):
        F.scaled_dot_product_attention(q4, k4, k4, enable_gqa=True)


def test_scaled_dot_product_attention_dropout():
    # value = identity: the output rows are the (dropped, rescaled) attention weights themselves
    q, k = _randn((200, 8, 4), 1), _randn((200, 8, 4), 2)
    v = np.broadcast_to(np.eye(8, dtype=np.float32), (200, 8, 8)).copy()
    weights = F.scaled_dot_product_attention(q, k, v)
    dropped = F.scaled_dot_product_attention(q, k, v, dropout_p=0.25)
    zero = dropped == 0
    assert abs(zero.mean() - 0.25) < 0.01
    np.testing.assert_allclose(dropped[~zero], weights[~zero] / 0.75, rtol=1e-5)


# -- MultiheadAttention ----------------------------------------------------------------------------------

def _mha_inputs(batch_first, n=2, length=5, source=6, e=8, kdim=None, vdim=None, self_attention=False):
    def layout(t, d):
        return (n, t, d) if batch_first else (t, n, d)
    q = _randn(layout(length, e), 1)
    if self_attention:
        return [q, q.copy(), q.copy()]
    return [q, _randn(layout(source, kdim or e), 2), _randn(layout(source, vdim or e), 3)]


def _padding(n=2, source=6, as_float=False):
    pad = np.zeros((n, source), bool)
    pad[0, -2:] = True
    pad[1, 2] = True  # no query loses every key, even under a causal mask
    return np.where(pad, -np.inf, 0.0).astype(np.float32) if as_float else pad


MHA_CASES = [
    ("plain", dict(), {}, {}),
    ("batch first", dict(batch_first=True), {}, {}),
    ("no bias", dict(bias=False, batch_first=True), {}, {}),
    ("kdim vdim", dict(kdim=5, vdim=3), dict(kdim=5, vdim=3), {}),
    ("bool attn_mask", dict(batch_first=True), {}, dict(attn_mask=_causal_bool(5, 6))),
    ("float attn_mask", dict(), {}, dict(attn_mask=_float_mask((5, 6)))),
    ("per-head attn_mask", dict(batch_first=True), {}, dict(attn_mask=_float_mask((2 * 2, 5, 6)))),
    ("bool key padding", dict(batch_first=True), {}, dict(key_padding_mask=_padding())),
    ("float key padding", dict(), {}, dict(key_padding_mask=_padding(as_float=True))),
    ("both masks", dict(batch_first=True), {}, dict(key_padding_mask=_padding(), attn_mask=_causal_bool(5, 6))),
    ("weights per head", dict(batch_first=True), {}, dict(average_attn_weights=False)),
    ("no weights", dict(), {}, dict(need_weights=False)),
    ("causal hint", dict(batch_first=True), dict(self_attention=True, source=5),
     dict(attn_mask=_causal_bool(5), is_causal=True)),
]


@pytest.mark.parametrize("name,ctor,shapes,kw", MHA_CASES, ids=[c[0] for c in MHA_CASES])
def test_multihead_attention(name, ctor, shapes, kw):
    m, tm = _pair("MultiheadAttention", 8, 2, **ctor)
    inputs = _mha_inputs(ctor.get("batch_first", False), **shapes)
    check_parity(m, tm, inputs, kw, pick=lambda out: out[0])
    if kw.get("need_weights", True):
        check_parity(m, tm, inputs, kw, pick=lambda out: out[1])
    else:
        assert m(*inputs, **kw)[1] is None


def test_multihead_attention_unbatched_and_float64():
    m, tm = _pair("MultiheadAttention", 6, 3)
    inputs = [_randn((4, 6), 1), _randn((5, 6), 2), _randn((5, 6), 3)]
    pad = np.array([False, True, False, False, True])
    check_parity(m, tm, inputs, dict(key_padding_mask=pad), pick=lambda out: out[0])
    check_parity(m, tm, inputs, dict(average_attn_weights=False), pick=lambda out: out[1])
    m, tm = _pair("MultiheadAttention", 6, 2, dtype=np.float64, batch_first=True)
    inputs = [x.astype(np.float64) for x in _mha_inputs(True, e=6)]
    check_parity(m, tm, inputs, dict(attn_mask=_causal_bool(5, 6)), pick=lambda out: out[0], atol=1e-12, rtol=1e-10)


def test_multihead_attention_parameters_and_init_follow_torch():
    torch.manual_seed(0)
    for kw in (dict(), dict(kdim=5, vdim=3), dict(bias=False)):
        m, tm = nn.MultiheadAttention(64, 4, **kw), torch.nn.MultiheadAttention(64, 4, **kw)
        assert list(m.state_dict()) == list(tm.state_dict())
        for name, tp in tm.named_parameters():
            ours = _attr_path(m, name)
            assert ours.shape == tuple(tp.shape) and ours.dtype == np.float32, name
            if name.endswith("bias"):
                assert np.all(ours == 0), name
            elif name == "out_proj.weight":
                assert np.abs(ours).max() <= 1 / math.sqrt(64)  # Linear's default
            else:  # Xavier-uniform over the whole (3E, E) or (E, kdim) matrix
                bound = math.sqrt(6.0 / (ours.shape[0] + ours.shape[1]))
                assert np.abs(ours).max() <= bound and np.abs(ours).max() > 0.95 * bound, name
                assert abs(ours.std() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3), name


def test_multihead_attention_refuses_what_it_cannot_do():
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        nn.MultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.raises(NotImplementedError, match="add_zero_attn"):
        nn.MultiheadAttention(8, 2, add_zero_attn=True)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        nn.MultiheadAttention(8, 3)
    m = nn.MultiheadAttention(8, 2)
    x = _randn((5, 2, 8))
    with pytest.raises(RuntimeError, match="is_causal=True .* needs attn_mask"):  # as torch
        m(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="is_causal=True .* needs attn_mask"):
        nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2)(x, is_causal=True)
    with pytest.raises(LayerInputError, match="query"):
        m(torch.from_numpy(x), x, x)
    with pytest.raises(avalon.ShapeError, match="attn_mask must have shape"):
        m(x, x, x, attn_mask=np.zeros((4, 5), bool))
    with pytest.raises(avalon.ShapeError, match="key_padding_mask must have shape"):
        m(x, x, x, key_padding_mask=np.zeros((5, 2), bool))
    with pytest.raises(avalon.ShapeError, match="must have 8 features"):
        m(x, x[..., :4], x)


def test_multihead_attention_dropout():
    m, tm = _pair("MultiheadAttention", 8, 2, dropout=0.4, batch_first=True)
    inputs = _mha_inputs(True, n=64, length=10, source=12)
    m.eval(), tm.eval()  # eval: no dropout, as torch
    check_parity(m, tm, inputs, pick=lambda out: out[1])
    full = m(*inputs, average_attn_weights=False)[1]
    m.train()
    _, dropped = m(*inputs, average_attn_weights=False)
    zero = dropped == 0
    assert abs(zero.mean() - 0.4) < 0.02
    np.testing.assert_allclose(dropped[~zero], full[~zero] / 0.6, rtol=1e-5)
    _, g1 = avalon.grad(lambda mod, x: avalon.sum(mod(x, x, x)[0]), m, inputs[0])
    _, g2 = avalon.grad(lambda mod, x: avalon.sum(mod(x, x, x)[0]), m, inputs[0])
    assert not np.array_equal(g1[1], g2[1])  # a fresh mask on every call


# -- transformer layers -------------------------------------------------------------------------------------

ENCODER_CASES = [
    ("post-norm relu", dict(), {}),
    ("pre-norm gelu batch-first", dict(norm_first=True, activation="gelu", batch_first=True), {}),
    ("no bias", dict(bias=False, layer_norm_eps=1e-3), {}),
    ("callable activation", dict(activation=torch.tanh), {}),
    ("causal float mask", dict(), dict(src_mask=torch.nn.Transformer.generate_square_subsequent_mask(5).numpy(),
                                       is_causal=True)),
    ("bool mask and padding", dict(batch_first=True), dict(src_mask=_causal_bool(5),
                                                          src_key_padding_mask=_padding(source=5))),
]


def _ours(kw):
    return dict(kw, activation=F.tanh) if kw.get("activation") is torch.tanh else kw


@pytest.mark.parametrize("name,ctor,kw", ENCODER_CASES, ids=[c[0] for c in ENCODER_CASES])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_encoder_layer(name, ctor, kw, mode):
    torch.manual_seed(0)
    tm = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, **ctor)
    m = _load(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, **_ours(ctor)), _perturb_biases(tm) or tm)
    m.train(mode == "train"), tm.train(mode == "train")
    x = _randn((2, 5, 8) if ctor.get("batch_first") else (5, 2, 8))
    check_parity(m, tm, [x], kw)


DECODER_CASES = [
    ("post-norm", dict(), {}),
    ("pre-norm batch-first", dict(norm_first=True, batch_first=True), {}),
    ("masks", dict(batch_first=True),
     dict(tgt_mask=_causal_bool(4), memory_mask=_float_mask((4, 6)), tgt_key_padding_mask=_padding(source=4),
          memory_key_padding_mask=_padding(source=6, as_float=True))),
    ("causal target", dict(), dict(tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(4).numpy(),
                                   tgt_is_causal=True)),
]


@pytest.mark.parametrize("name,ctor,kw", DECODER_CASES, ids=[c[0] for c in DECODER_CASES])
def test_transformer_decoder_layer(name, ctor, kw):
    torch.manual_seed(0)
    tm = torch.nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, activation="gelu", **ctor)
    m = _load(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, activation="gelu", **ctor), _perturb_biases(tm) or tm)
    bf = ctor.get("batch_first", False)
    tgt, memory = _randn((2, 4, 8) if bf else (4, 2, 8), 1), _randn((2, 6, 8) if bf else (6, 2, 8), 2)
    check_parity(m, tm, [tgt, memory], kw)


def test_transformer_encoder_and_decoder_stacks():
    torch.manual_seed(0)
    tl = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    tenc = torch.nn.TransformerEncoder(tl, 3, norm=torch.nn.LayerNorm(8), enable_nested_tensor=False)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), 3, norm=nn.LayerNorm(8))
    assert list(enc.state_dict()) == list(tenc.state_dict())
    _load(enc, _perturb_biases(tenc) or tenc)
    x = _randn((5, 2, 8))
    check_parity(enc, tenc, [x], dict(mask=_causal_bool(5), src_key_padding_mask=_padding(source=5)))

    tdl = torch.nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    tdec = torch.nn.TransformerDecoder(tdl, 2)
    dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2)
    assert list(dec.state_dict()) == list(tdec.state_dict())
    _load(dec, _perturb_biases(tdec) or tdec)
    check_parity(dec, tdec, [_randn((2, 4, 8), 1), _randn((2, 6, 8), 2)], dict(tgt_mask=_causal_bool(4)))


def test_stacks_copy_their_layer():
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    enc = nn.TransformerEncoder(layer, 2)
    a, b = enc.layers[0].linear1.weight, enc.layers[1].linear1.weight
    np.testing.assert_array_equal(a, b)  # same start, as torch's deep copies
    assert a is not b and a is not layer.linear1.weight


def test_transformer_whole_model():
    torch.manual_seed(0)
    tm = torch.nn.Transformer(8, 2, 2, 2, 16, dropout=0.0)
    m = nn.Transformer(8, 2, 2, 2, 16, dropout=0.0)
    assert list(m.state_dict()) == list(tm.state_dict())
    _load(m, _perturb_biases(tm) or tm)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(4)
    np.testing.assert_array_equal(tgt_mask, torch.nn.Transformer.generate_square_subsequent_mask(4).numpy())
    np.testing.assert_array_equal(np.asarray(nn.Transformer.generate_square_subsequent_mask(4, device="cpu",
                                                                                            dtype=np.float64)),
                                  torch.nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64))
    check_parity(m, tm, [_randn((6, 2, 8), 1), _randn((4, 2, 8), 2)],
                 dict(tgt_mask=tgt_mask, src_key_padding_mask=_padding(source=6)), atol=5e-5)


def test_transformer_init_is_xavier_for_matrices():
    m = nn.Transformer(32, 4, 1, 1, 64)
    for name, p in m.named_parameters():
        if p.ndim > 1:
            bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
            assert np.abs(p).max() <= bound and np.abs(p).max() > 0.9 * bound, name
    enc_layer = nn.TransformerEncoderLayer(32, 4, 64)
    assert np.all(enc_layer.norm1.weight == 1) and np.all(enc_layer.norm1.bias == 0)
    assert abs(np.abs(enc_layer.linear1.weight).max() - 1 / math.sqrt(32)) < 0.01 / math.sqrt(32)


def test_transformer_layer_dropout_in_training():
    x = _randn((5, 2, 8))
    for quiet in (nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), nn.MultiheadAttention(8, 2, dropout=0.0)):
        args = (x,) if isinstance(quiet, nn.TransformerEncoderLayer) else (x, x, x)
        train_out = quiet.train()(*args)
        eval_out = quiet.eval()(*args)
        if isinstance(quiet, nn.MultiheadAttention):
            train_out, eval_out = train_out[0], eval_out[0]
        np.testing.assert_array_equal(train_out, eval_out)  # p=0: training is exactly evaluation
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5)
    layer.eval()
    np.testing.assert_array_equal(layer(x), layer(x))
    layer.train()
    assert not np.allclose(layer(x), layer(x))  # dropout draws a new mask each call
    with pytest.raises(RuntimeError, match="activation should be relu/gelu"):
        nn.TransformerEncoderLayer(8, 2, activation="swish")


def test_a_transformer_warns_once_not_for_each_of_its_parts():
    code = ("import warnings, avalon.nn as nn\n"
            "from avalon_layers.registry import ExperimentalWarning\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    nn.Transformer(8, 2, 1, 1, 16)\n"
            "    first = [str(w.message).split()[0] for w in caught if w.category is ExperimentalWarning]\n"
            "    nn.TransformerEncoderLayer(8, 2, 16)\n"
            "print(first, [str(w.message).split()[0] for w in caught if w.category is ExperimentalWarning])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == ("['avalon.nn.Transformer'] "
                                       "['avalon.nn.Transformer', 'avalon.nn.TransformerEncoderLayer']")


def test_attention_layers_are_experimental():
    levels = avalon.stability()["symbols"]
    for name in ("MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder", "TransformerDecoderLayer",
                 "TransformerDecoder", "Transformer"):
        assert levels[f"avalon.nn.{name}"] == ("Attention", "experimental")
    assert levels["avalon.nn.functional.scaled_dot_product_attention"] == ("Attention", "experimental")
