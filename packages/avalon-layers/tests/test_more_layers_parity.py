"""Parity with PyTorch of GroupNorm, Dropout2d, SiLU / ReLU6 / Hardtanh / PReLU, Unflatten,
EmbeddingBag, Upsample / F.interpolate, F.pad, F.normalize, F.cosine_similarity and
F.one_hot: forward (eager and through avalon.jit) and gradients (avalon.grad) with respect
to every float input and parameter, after loading the torch module's state_dict; default
initializations against torch's rules."""

import numpy as np
import pytest
import torch

import avalon
import avalon.nn as nn
import avalon.nn.functional as F

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
    assert tuple(np.shape(ours)) == tuple(theirs.shape), f"{what}: shape {np.shape(ours)} vs {theirs.shape}"
    assert np.asarray(ours).dtype == theirs.dtype, f"{what}: dtype {np.asarray(ours).dtype} vs {theirs.dtype}"
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=rtol, atol=atol, err_msg=what)


class _Fn(nn.Module):
    """A function (with fixed keyword arguments) as a parameterless module."""

    def __init__(self, fn, **kw):
        super().__init__()
        self.fn, self.kw = fn, kw

    def forward(self, *xs):
        return self.fn(*xs, **self.kw)


def _torch_value(v):
    return torch.from_numpy(v) if isinstance(v, np.ndarray) else v


def check_parity(m, tm, inputs, consts=(), atol=ATOL, rtol=RTOL):
    """m(*inputs, *consts) against tm: forward (eager and jitted), d/d every float input and
    every parameter.  `consts` (indices, offsets) are passed after the inputs, untraced."""
    if isinstance(tm, torch.nn.Module):
        tm.zero_grad()
    tin = [torch.from_numpy(x.copy()).requires_grad_() for x in inputs]
    tout = tm(*tin, *[_torch_value(c) for c in consts])
    ct = _randn(tuple(tout.shape), seed=7, dtype=tout.detach().numpy().dtype)
    (tout * torch.from_numpy(ct)).sum().backward()
    _close(m(*inputs, *consts), tout, "eager forward", atol, rtol)
    _close(avalon.jit(lambda mod, *xs: mod(*xs, *consts))(m, *inputs), tout, "jitted forward", atol, rtol)
    loss, grads = avalon.grad(lambda mod, ct_, *xs: avalon.sum(mod(*xs, *consts) * ct_), m, ct, *inputs)
    for k, (g, t) in enumerate(zip(grads[2:], tin)):
        _close(g, t.grad, f"d/dinput{k}", atol, rtol)
    if isinstance(tm, torch.nn.Module):
        assert [n for n, _ in tm.named_parameters()] == [n for n, _ in m.named_parameters()]
        for name, p in tm.named_parameters():
            _close(getattr(grads[0], name), p.grad, f"d/d{name}", atol, rtol)


def _pair(name, *args, perturb=True, **kw):
    torch.manual_seed(0)
    tm = getattr(torch.nn, name)(*args, **kw)
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in tm.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 0.2)
    return _load(getattr(nn, name)(*args, **kw), tm), tm


# -- layers with parameters or shapes -------------------------------------------------------------------

LAYERS = [
    ("GroupNorm", (2, 6), {}, (3, 6, 4, 5)),
    ("GroupNorm", (3, 6), dict(eps=1e-3), (2, 6, 7)),
    ("GroupNorm", (1, 4), dict(affine=False), (2, 4, 3, 3)),
    ("GroupNorm", (4, 4), {}, (3, 4, 3)),
    ("GroupNorm", (2, 4), dict(bias=False), (3, 4, 2)),
    ("SiLU", (), {}, (3, 4, 5)),
    ("ReLU6", (), {}, (3, 4, 5)),
    ("Hardtanh", (), {}, (3, 4, 5)),
    ("Hardtanh", (-2.0, 0.5), {}, (3, 4, 5)),
    ("PReLU", (), {}, (3, 4, 5)),
    ("PReLU", (4,), {}, (3, 4, 5)),
    ("PReLU", (4,), dict(init=0.1), (2, 4)),
    ("PReLU", (), {}, (7,)),
    ("Unflatten", (1, (3, 4)), {}, (2, 12, 5)),
    ("Unflatten", (-1, (2, -1)), {}, (2, 3, 8)),
    ("Dropout2d", (0.0,), {}, (2, 3, 4, 5)),
    ("Upsample", (), dict(scale_factor=2), (2, 3, 4, 5)),
    ("Upsample", (), dict(size=(7, 3)), (2, 3, 4, 5)),
    ("Upsample", (), dict(scale_factor=3, mode="nearest"), (2, 3, 4)),
    ("Upsample", (), dict(scale_factor=(1.5, 2.5), mode="bilinear"), (2, 3, 4, 5)),
    ("Upsample", (), dict(size=(6, 9), mode="bilinear", align_corners=True), (2, 3, 4, 5)),
    ("Upsample", (), dict(size=11, mode="linear"), (2, 3, 4)),
    ("Upsample", (), dict(scale_factor=2, mode="trilinear", align_corners=False), (1, 2, 3, 4, 2)),
    ("Upsample", (), dict(size=(3, 4), mode="nearest-exact"), (1, 2, 7, 9)),
]


@pytest.mark.parametrize("name,args,kw,shape", LAYERS, ids=[f"{c[0]}-{i}" for i, c in enumerate(LAYERS)])
def test_layer(name, args, kw, shape):
    m, tm = _pair(name, *args, **kw)
    x = _randn(shape) * 3
    x.flat[:3] = [0.0, 6.0, -1.0]  # the ends of ReLU6 / Hardtanh, where the gradient is 0
    check_parity(m, tm, [x])
    assert repr(m) == repr(tm)


def test_layers_in_float64():
    torch.manual_seed(0)
    tm = torch.nn.GroupNorm(2, 4).double()
    m = _load(nn.GroupNorm(2, 4, dtype=np.float64), tm)
    check_parity(m, tm, [_randn((3, 4, 5), dtype=np.float64)], atol=1e-12, rtol=1e-10)
    check_parity(_Fn(F.interpolate, scale_factor=1.7, mode="bilinear"),
                 lambda x: TF.interpolate(x, scale_factor=1.7, mode="bilinear"),
                 [_randn((2, 2, 5, 4), dtype=np.float64)], atol=1e-12, rtol=1e-10)


def test_default_inits_follow_torch():
    assert np.all(nn.PReLU(3).weight == 0.25) and nn.PReLU(3).weight.shape == (3,)
    assert np.all(nn.PReLU(init=0.1).weight == np.float32(0.1))
    g = nn.GroupNorm(2, 6)
    assert np.all(g.weight == 1) and np.all(g.bias == 0) and g.weight.shape == (6,)
    assert nn.GroupNorm(2, 6, affine=False).state_dict() == {}
    bag = nn.EmbeddingBag(1000, 100, padding_idx=3)
    assert abs(bag.weight.mean()) < 0.01 and abs(bag.weight.std() - 1) < 0.01 and np.all(bag.weight[3] == 0)


def test_hardtanh_takes_torchs_deprecated_keywords():
    with pytest.warns(FutureWarning, match="deprecated"):
        m = nn.Hardtanh(min_value=-2.0, max_value=3.0)
    assert (m.min_val, m.max_val) == (-2.0, 3.0) and repr(m) == "Hardtanh(min_val=-2.0, max_val=3.0)"


def test_constructor_errors():
    with pytest.raises(ValueError, match="divisible by num_groups"):
        nn.GroupNorm(4, 6)
    with pytest.raises(avalon.ShapeError, match=r"\(N, 6, \*\)"):
        nn.GroupNorm(2, 6)(_randn((2, 4, 3)))
    with pytest.raises(ValueError, match="cannot be greater"):
        nn.Hardtanh(1.0, -1.0)
    with pytest.raises(avalon.ShapeError, match="3 slopes"):
        nn.PReLU(3)(_randn((2, 4)))
    with pytest.raises(avalon.ShapeError, match="splits exactly"):
        nn.Unflatten(1, (5, 2))(_randn((2, 12)))
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.Dropout2d(2.0)


# -- Dropout2d -------------------------------------------------------------------------------------------------

def test_dropout2d_zeroes_whole_channels():
    p = 0.3
    m = nn.Dropout2d(p)
    x = np.ones((100, 50, 3, 4), np.float32)
    out = m(x)
    per_channel = out.reshape(100, 50, -1)
    assert np.all(per_channel.min(-1) == per_channel.max(-1))  # each feature map kept or dropped whole
    dropped = per_channel[..., 0] == 0
    assert abs(dropped.mean() - p) < 0.02  # 5000 channels: std of the fraction ~0.0065
    np.testing.assert_allclose(per_channel[~dropped], 1 / (1 - p), rtol=1e-6)
    _, (_, g) = avalon.grad(lambda mod, v: avalon.sum(mod(v)), m, x)  # the gradient is the same mask
    g = g.reshape(100, 50, -1)
    assert np.all(g.min(-1) == g.max(-1)) and abs((g[..., 0] == 0).mean() - p) < 0.02
    m.eval()
    np.testing.assert_array_equal(m(x), x)
    np.testing.assert_array_equal(F.dropout2d(x, 0.5, training=False), x)
    seq = nn.Dropout2d(0.5)(np.ones((40, 30, 7), np.float32))  # 3-D: (N, C, L), as torch
    assert np.all(seq.min(-1) == seq.max(-1))


# -- EmbeddingBag ------------------------------------------------------------------------------------------------

IDX = np.array([1, 2, 4, 5, 4, 3, 2, 9, 0, 0], dtype=np.int64)
OFFSETS = np.array([0, 2, 2, 5], dtype=np.int64)  # bag 1 is empty
BAGS = [
    (dict(mode="sum"), (IDX, OFFSETS)),
    (dict(mode="mean"), (IDX, OFFSETS)),
    (dict(mode="max"), (IDX, OFFSETS)),
    (dict(mode="mean"), (IDX.reshape(2, 5),)),
    (dict(mode="max"), (IDX.reshape(5, 2),)),
    (dict(mode="sum", include_last_offset=True), (IDX, np.array([0, 3, 3, 8, 10]))),
    (dict(mode="mean", padding_idx=4), (IDX, OFFSETS)),
    (dict(mode="sum", padding_idx=0), (IDX.reshape(2, 5),)),
    (dict(mode="max", padding_idx=2), (IDX.astype(np.int32), OFFSETS.astype(np.int32))),
    (dict(mode="max", padding_idx=0), (IDX.reshape(5, 2),)),  # the last bag holds only padding
    (dict(mode="mean", padding_idx=0), (IDX.reshape(5, 2),)),
    (dict(mode="mean", include_last_offset=True), (IDX, np.array([0, 3, 3, 10]))),
    (dict(mode="max", include_last_offset=True), (IDX, np.array([0, 1, 10]))),
]


@pytest.mark.parametrize("kw,args", BAGS, ids=[f"bag-{i}" for i in range(len(BAGS))])
def test_embedding_bag(kw, args):
    m, tm = _pair("EmbeddingBag", 10, 3, **kw)
    tm.zero_grad()
    tout = tm(*[torch.from_numpy(a) for a in args])
    ct = _randn(tuple(tout.shape), 7)
    (tout * torch.from_numpy(ct)).sum().backward()
    _close(m(*args), tout, "forward")
    # the indices and offsets traced too: the bags are formed by ops, not from their values
    _, (gm, *_) = avalon.grad(lambda mod, *a: avalon.sum(mod(*a) * ct), m, *args)
    _close(gm.weight, tm.weight.grad, "d/dweight")
    assert repr(m) == repr(tm)


def test_embedding_bag_per_sample_weights():
    m, tm = _pair("EmbeddingBag", 10, 3, mode="sum")
    w = _randn(IDX.shape, 5)
    tw = torch.from_numpy(w.copy()).requires_grad_()
    tout = tm(torch.from_numpy(IDX), torch.from_numpy(OFFSETS), per_sample_weights=tw)
    ct = _randn(tuple(tout.shape), 7)
    (tout * torch.from_numpy(ct)).sum().backward()
    _close(m(IDX, OFFSETS, per_sample_weights=w), tout, "forward")
    _, (gm, gw) = avalon.grad(lambda mod, w_: avalon.sum(mod(IDX, OFFSETS, w_) * ct), m, w)
    _close(gm.weight, tm.weight.grad, "d/dweight")
    _close(gw, tw.grad, "d/dper_sample_weights")
    _close(F.embedding_bag(IDX, m.weight, OFFSETS, mode="sum", per_sample_weights=w), tout, "F.embedding_bag")
    with pytest.raises(NotImplementedError, match="only supported with mode='sum'"):
        nn.EmbeddingBag(10, 3)(IDX, OFFSETS, per_sample_weights=w)
    with pytest.raises(ValueError, match="offsets must be None"):
        m(IDX.reshape(2, 5), OFFSETS)
    with pytest.raises(ValueError, match="needs offsets"):
        m(IDX)
    with pytest.raises(ValueError, match=r"offsets\[0\] must be 0"):
        m(IDX, OFFSETS + 1)
    with pytest.raises(ValueError, match="non-decreasing"):
        m(IDX, np.array([0, 3, 2]))
    with pytest.raises(ValueError, match="at most the input's length 10"):
        m(IDX, np.array([0, 11]))
    with pytest.raises(ValueError, match="last offset must be the input's length 10"):
        nn.EmbeddingBag(10, 3, include_last_offset=True)(IDX, np.array([0, 3, 8]))
    with pytest.raises(NotImplementedError, match="max_norm"):
        nn.EmbeddingBag(10, 3, max_norm=1.0)
    given = _randn((10, 3))
    np.testing.assert_array_equal(nn.EmbeddingBag(10, 3, _weight=given).weight, given)
    with pytest.raises(avalon.ShapeError, match="_weight has shape"):
        nn.EmbeddingBag(10, 4, _weight=given)


# -- functions ---------------------------------------------------------------------------------------------------

FUNCTIONS = [
    ("silu", F.silu, TF.silu, {}, (3, 5)),
    ("relu6", F.relu6, TF.relu6, {}, (3, 5)),
    ("hardtanh", F.hardtanh, TF.hardtanh, dict(min_val=-0.5, max_val=2.0), (3, 5)),
    ("interpolate nearest", F.interpolate, TF.interpolate, dict(scale_factor=0.6), (2, 3, 7, 9)),
    ("interpolate bilinear", F.interpolate, TF.interpolate, dict(size=(5, 3), mode="bilinear"), (1, 2, 7, 9)),
    ("interpolate recompute", F.interpolate, TF.interpolate,
     dict(scale_factor=1.7, mode="bilinear", recompute_scale_factor=True), (1, 2, 3, 5)),
    ("interpolate linear corners", F.interpolate, TF.interpolate,
     dict(size=1, mode="linear", align_corners=True), (2, 3, 5)),
    ("pad constant", F.pad, TF.pad, dict(pad=(1, 2)), (2, 3, 4)),
    ("pad constant value", F.pad, TF.pad, dict(pad=(1, 2, 0, 1, 2, 0), value=-3.5), (2, 3, 4)),
    ("pad negative crops", F.pad, TF.pad, dict(pad=(-1, 2, 1, -2)), (2, 3, 5, 4)),
    ("pad reflect", F.pad, TF.pad, dict(pad=(2, 3), mode="reflect"), (2, 3, 5)),
    ("pad reflect 2-D", F.pad, TF.pad, dict(pad=(1, 2, 3, 0), mode="reflect"), (2, 3, 5, 4)),
    ("pad replicate", F.pad, TF.pad, dict(pad=(4, 1, 2, 2), mode="replicate"), (3, 5, 4)),
    ("pad replicate 3-D", F.pad, TF.pad, dict(pad=(1, 1, 0, 2, 1, 0), mode="replicate"), (1, 2, 3, 4, 2)),
    ("pad circular", F.pad, TF.pad, dict(pad=(2, 1, 1, 3), mode="circular"), (2, 3, 4, 5)),
    ("normalize", F.normalize, TF.normalize, {}, (4, 5)),
    ("normalize p1 dim -1", F.normalize, TF.normalize, dict(p=1.0, dim=-1), (3, 4, 5)),
    ("normalize p3", F.normalize, TF.normalize, dict(p=3.0, dim=0), (4, 5)),
    ("normalize p inf", F.normalize, TF.normalize, dict(p=float("inf")), (4, 5)),
]


@pytest.mark.parametrize("name,ours,theirs,kw,shape", FUNCTIONS, ids=[c[0] for c in FUNCTIONS])
def test_function(name, ours, theirs, kw, shape):
    check_parity(_Fn(ours, **kw), lambda x: theirs(x, **kw), [_randn(shape) * 2])


def test_clamps_keep_nan_as_torch():
    x = np.array([np.nan, -np.inf, np.inf, -7.0, 0.5, 7.0], np.float32)
    for ours, theirs in [(F.hardtanh, TF.hardtanh), (F.relu6, TF.relu6), (nn.ReLU6(), torch.nn.ReLU6())]:
        _close(ours(x), theirs(torch.from_numpy(x)), repr(ours))


def test_normalize_of_a_zero_slice_has_zero_gradient_as_torch():
    x = _randn((3, 4))
    x[1] = 0
    check_parity(_Fn(F.normalize), TF.normalize, [x])


@pytest.mark.parametrize("kw,shapes", [({}, ((4, 5), (4, 5))), (dict(dim=-1), ((2, 3, 6), (3, 6))),
                                       (dict(dim=0, eps=1e-3), ((5, 2), (5, 1)))])
def test_cosine_similarity(kw, shapes):
    a, b = _randn(shapes[0], 1), _randn(shapes[1], 2)
    check_parity(_Fn(F.cosine_similarity, **kw), lambda x, y: TF.cosine_similarity(x, y, **kw), [a, b])
    _close(nn.CosineSimilarity(**kw)(a, b), torch.nn.CosineSimilarity(**kw)(torch.from_numpy(a),
                                                                             torch.from_numpy(b)), "layer")


def test_one_hot():
    labels = np.array([[0, 3], [2, 1]], dtype=np.int64)
    for n in (-1, 6):
        ours, theirs = F.one_hot(labels, n), TF.one_hot(torch.from_numpy(labels), n)
        _close(ours, theirs, f"one_hot num_classes={n}")
    _close(F.one_hot(labels.astype(np.int32), 4), TF.one_hot(torch.from_numpy(labels), 4), "int32 labels")
    jitted = avalon.jit(lambda v: F.one_hot(v, 5))(labels)
    _close(jitted, TF.one_hot(torch.from_numpy(labels), 5), "traced")
    with pytest.raises(ValueError, match="smaller than num_classes=3"):
        F.one_hot(labels, 3)
    with pytest.raises(ValueError, match="non-negative"):
        F.one_hot(np.array([-1, 0]))
    with pytest.raises(avalon.DtypeError, match="integer"):
        F.one_hot(np.array([0.0, 1.0]))


def test_interpolate_and_pad_refuse_what_they_cannot_do():
    x = _randn((1, 2, 4, 4))
    with pytest.raises(NotImplementedError, match="mode='bicubic' is not supported"):
        F.interpolate(x, scale_factor=2, mode="bicubic")
    with pytest.raises(NotImplementedError, match="antialias"):
        F.interpolate(x, scale_factor=2, mode="bilinear", antialias=True)
    with pytest.raises(avalon.ShapeError, match="needs a 4-D input"):
        F.interpolate(_randn((1, 2, 4)), scale_factor=2, mode="bilinear")
    with pytest.raises(ValueError, match="align_corners option"):
        F.interpolate(x, scale_factor=2, align_corners=True)
    with pytest.raises(ValueError, match="exactly one of size or scale_factor"):
        F.interpolate(x)
    with pytest.raises(NotImplementedError, match="mode='edge' is not supported"):
        F.pad(x, (1, 1), mode="edge")
    with pytest.raises(ValueError, match="at most 3"):
        F.pad(_randn((1, 2, 4)), (4, 0), mode="reflect")
    with pytest.raises(NotImplementedError, match="negative padding"):
        F.pad(x, (-1, 0, 1, 1), mode="replicate")
    with pytest.raises(ValueError, match="must be even"):
        F.pad(x, (1, 1, 1))
    with pytest.raises(NotImplementedError, match="pads the last 1, 2 or 3 dims"):
        F.pad(x, (1, 1), mode="reflect")
