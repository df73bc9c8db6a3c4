"""Parity of avalon.nn's basic, CNN, normalization and activation layers with PyTorch,
and the statistics of avalon.nn.init's initializers.

For each layer: the torch layer's state_dict is loaded into ours; the forward
output and the gradients (avalon.grad of sum(out * cotangent) against torch
autograd) with respect to the input and every parameter must agree in float32
within RTOL/ATOL (looser ATOL_SUM for layers whose outputs sum many products,
where float32 summation order differs).  BatchNorm is checked in training mode
(including running statistics after a step) and in eval mode.
"""
import math
import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch

import avalon
import avalon.nn as nn
import avalon.nn.functional as F

# torch notes that padding="same" with an even kernel copies the input: irrelevant here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

RTOL, ATOL = 1e-4, 1e-5
ATOL_SUM = 1e-4  # convolutions / whole models: long float32 sums in a different order


# -- helpers -------------------------------------------------------------------------------------------

def _randn(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _load_from_torch(m, tm):
    m.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    return m


def _perturb(tm, seed=1):
    """Random values for every parameter and float buffer (norm layers start at ones/zeros,
    which would hide a swapped weight and bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(tm.named_parameters()) + list(tm.named_buffers()):
            if t.is_floating_point():
                v = torch.randn(t.shape, generator=g) * 0.5
                t.copy_(v.abs() + 0.5 if "var" in name else v)  # variances must stay positive
    return tm


def _loss(m, x, ct):
    return avalon.sum(m(x) * ct)


def _grad(m, x, ct):
    """avalon.grad of sum(m(x) * ct), through a fresh function: every layer here has its own
    signature, so sharing one function would only pile up retrace warnings."""
    return avalon.grad(lambda m_, x_, ct_: _loss(m_, x_, ct_), m, x, ct)


def _attr_path(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _close(ours, theirs, what, atol=ATOL, rtol=RTOL):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert ours is not None, f"{what}: no gradient"
    assert tuple(np.shape(ours)) == tuple(theirs.shape), f"{what}: shape {np.shape(ours)} vs {theirs.shape}"
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=rtol, atol=atol, err_msg=what)


def check_parity(m, tm, x, atol=ATOL, input_grad=True):
    """Forward output and gradients w.r.t. input and every parameter agree with torch."""
    tm.zero_grad()
    tx = torch.from_numpy(x.copy())
    if input_grad:
        tx.requires_grad_()
    tout = tm(tx.clone())  # a non-leaf copy: torch's inplace=True layers refuse leaves
    ct = _randn(tuple(tout.shape), seed=7)
    (tout * torch.from_numpy(ct)).sum().backward()

    _close(m(x), tout, f"{type(m).__name__} forward", atol)
    loss, (gm, gx, _) = _grad(m, x, ct)
    _close(loss, (tout * torch.from_numpy(ct)).sum(), "loss", atol * 10)
    if input_grad:
        _close(gx, tx.grad, f"{type(m).__name__} d/dinput", atol)
    names = [n for n, _ in tm.named_parameters()]
    assert names == [n for n, _ in m.named_parameters()]
    for name, p in tm.named_parameters():
        _close(_attr_path(gm, name), p.grad, f"{type(m).__name__} d/d{name}", atol)


def _pair(name, *args, perturb=False, **kw):
    torch.manual_seed(0)
    tm = getattr(torch.nn, name)(*args, **kw)
    if perturb:
        _perturb(tm)
    m = getattr(nn, name)(*args, **kw)
    return _load_from_torch(m, tm), tm


# -- Linear, Flatten, Identity ---------------------------------------------------------------------------

@pytest.mark.parametrize("kw,shape", [
    (dict(in_features=5, out_features=3), (4, 5)),
    (dict(in_features=5, out_features=3, bias=False), (2, 3, 5)),
    (dict(in_features=7, out_features=2), (7,)),
])
def test_linear(kw, shape):
    m, tm = _pair("Linear", **kw)
    check_parity(m, tm, _randn(shape))


@pytest.mark.parametrize("args,shape", [((), (2, 3, 4, 5)), ((0, 2), (2, 3, 4, 5)), ((2, -1), (2, 3, 4, 5)),
                                        ((1, 1), (3, 4))])
def test_flatten_and_identity(args, shape):
    m, tm = _pair("Flatten", *args)
    check_parity(m, tm, _randn(shape))
    m, tm = _pair("Identity", 3, unused=True)
    check_parity(m, tm, _randn(shape))


# -- convolutions ---------------------------------------------------------------------------------------

CONVS = [
    ("Conv1d", dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1), (2, 3, 9)),
    ("Conv1d", dict(in_channels=3, out_channels=4, kernel_size=3, dilation=2, bias=False), (3, 11)),
    ("Conv2d", dict(in_channels=3, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
                    dilation=(1, 2), groups=3), (2, 3, 8, 9)),
    ("Conv2d", dict(in_channels=2, out_channels=4, kernel_size=4, padding="same"), (2, 2, 7, 6)),
    ("Conv2d", dict(in_channels=2, out_channels=4, kernel_size=3, padding="valid", bias=False), (2, 2, 6, 6)),
    ("Conv2d", dict(in_channels=1, out_channels=3, kernel_size=5), (1, 12, 12)),
    ("Conv3d", dict(in_channels=2, out_channels=4, kernel_size=(2, 3, 3), stride=(1, 2, 1), padding=1),
     (2, 2, 5, 6, 5)),
    ("ConvTranspose1d", dict(in_channels=3, out_channels=2, kernel_size=3, stride=2), (2, 3, 6)),
    ("ConvTranspose2d", dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1,
                             output_padding=1, groups=2), (2, 4, 5, 5)),
    ("ConvTranspose2d", dict(in_channels=3, out_channels=2, kernel_size=(3, 2), stride=(2, 3), dilation=2,
                             bias=False), (2, 3, 4, 5)),
    ("ConvTranspose3d", dict(in_channels=2, out_channels=3, kernel_size=2, stride=2), (1, 2, 3, 3, 3)),
]


@pytest.mark.parametrize("name,kw,shape", CONVS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CONVS)])
def test_conv(name, kw, shape):
    m, tm = _pair(name, **kw)
    check_parity(m, tm, _randn(shape), atol=ATOL_SUM)


def test_conv_transpose_output_size():
    m, tm = _pair("ConvTranspose2d", 3, 2, 3, stride=2, padding=1)
    x = _randn((2, 3, 4, 4))
    for size in [(7, 7), (8, 8), (7, 8), [2, 2, 8, 7]]:
        out = m(x, output_size=size)
        _close(out, tm(torch.from_numpy(x), output_size=list(size)), f"output_size={size}", ATOL_SUM)
    with pytest.raises(ValueError, match="valid sizes range from"):
        m(x, output_size=(10, 10))


# -- pooling -----------------------------------------------------------------------------------------------

POOLS = [
    ("MaxPool1d", (3, 2, 1), {}, (2, 3, 10)),
    ("MaxPool2d", (2,), {}, (2, 3, 8, 8)),
    ("MaxPool2d", (3,), dict(stride=2, padding=1), (2, 3, 9, 7)),
    ("MaxPool2d", (2,), dict(dilation=2), (3, 7, 7)),
    ("MaxPool3d", (2,), {}, (1, 2, 4, 4, 6)),
    ("AvgPool1d", (3, 2, 1), {}, (2, 3, 10)),
    ("AvgPool2d", (2,), {}, (2, 3, 8, 8)),
    ("AvgPool2d", (3, 2, 1), dict(count_include_pad=False), (2, 3, 9, 7)),
    ("AvgPool2d", (2,), dict(divisor_override=3), (2, 3, 6, 6)),
    ("AvgPool3d", (2,), {}, (1, 2, 4, 4, 6)),
    ("AdaptiveAvgPool1d", (2,), {}, (2, 3, 8)),
    ("AdaptiveAvgPool2d", ((2, 3),), {}, (2, 3, 8, 9)),
    ("AdaptiveAvgPool2d", (1,), {}, (2, 3, 5, 7)),
    ("AdaptiveAvgPool2d", ((None, 3),), {}, (2, 3, 5, 6)),
    ("AdaptiveAvgPool3d", (2,), {}, (1, 2, 4, 4, 6)),
    ("AdaptiveMaxPool2d", (2,), {}, (2, 3, 8, 6)),
]


@pytest.mark.parametrize("name,args,kw,shape", POOLS, ids=[f"{p[0]}-{i}" for i, p in enumerate(POOLS)])
def test_pool(name, args, kw, shape):
    m, tm = _pair(name, *args, **kw)
    check_parity(m, tm, _randn(shape))
    assert repr(m) == repr(tm)


# -- normalization ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,kw,shape", [
    ((6,), {}, (3, 6)),
    (((4, 6),), {}, (2, 3, 4, 6)),
    ((6,), dict(elementwise_affine=False), (2, 6)),
    ((6,), dict(bias=False), (5, 6)),
    ((6,), dict(eps=1e-2), (5, 6)),
])
def test_layer_norm(args, kw, shape):
    m, tm = _pair("LayerNorm", *args, perturb=True, **kw)
    check_parity(m, tm, _randn(shape) * 3 + 1)


BATCH_NORMS = [
    ("BatchNorm1d", (5,), {}, (8, 5)),
    ("BatchNorm1d", (5,), {}, (4, 5, 7)),
    ("BatchNorm2d", (4,), {}, (6, 4, 5, 5)),
    ("BatchNorm2d", (4,), dict(momentum=0.3, eps=1e-3), (3, 4, 2, 3)),
    ("BatchNorm2d", (4,), dict(affine=False), (3, 4, 2, 3)),
    ("BatchNorm2d", (4,), dict(bias=False), (3, 4, 2, 3)),
    ("BatchNorm3d", (3,), {}, (2, 3, 2, 3, 4)),
]


def _check_running_stats(m, tm):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        theirs = getattr(tm, name)
        ours = getattr(m, name)
        if name == "num_batches_tracked":
            assert ours.dtype == np.int64 and ours.shape == () and int(ours) == int(theirs)
        else:
            _close(ours, theirs, name)


@pytest.mark.parametrize("name,args,kw,shape", BATCH_NORMS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BATCH_NORMS)])
def test_batch_norm_train_inside_grad(name, args, kw, shape):
    m, tm = _pair(name, *args, perturb=True, **kw)
    x = _randn(shape) * 2 + 0.5
    tx = torch.from_numpy(x.copy()).requires_grad_()
    tout = tm(tx)
    ct = _randn(tuple(tout.shape), seed=7)
    (tout * torch.from_numpy(ct)).sum().backward()
    loss, (gm, gx, _) = _grad(m, x, ct)  # one training step, traced
    _close(gx, tx.grad, "d/dinput", ATOL_SUM)
    for pname, p in tm.named_parameters():
        _close(_attr_path(gm, pname), p.grad, f"d/d{pname}", ATOL_SUM)
    _check_running_stats(m, tm)
    # a second, eager step: output in training mode and updated statistics
    x2 = _randn(shape, seed=3)
    _close(m(x2), tm(torch.from_numpy(x2)), "train forward", ATOL_SUM)
    _check_running_stats(m, tm)


@pytest.mark.parametrize("name,args,kw,shape", BATCH_NORMS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BATCH_NORMS)])
def test_batch_norm_eval(name, args, kw, shape):
    m, tm = _pair(name, *args, perturb=True, **kw)
    m.eval(), tm.eval()
    check_parity(m, tm, _randn(shape))
    _check_running_stats(m, tm)  # untouched in eval mode
    assert int(m.num_batches_tracked) == 0


def test_batch_norm_cumulative_average_and_no_tracking():
    # momentum=None: running stats are the average over every batch seen
    m, tm = _pair("BatchNorm1d", 3, momentum=None)
    for seed in range(3):
        x = _randn((6, 3), seed)
        _grad(m, x, np.ones((6, 3), np.float32))
        tm(torch.from_numpy(x))
    _check_running_stats(m, tm)
    m(_randn((6, 3), 9)), tm(torch.from_numpy(_randn((6, 3), 9)))  # and eagerly
    _check_running_stats(m, tm)
    # track_running_stats=False: batch statistics in both modes, no buffers
    m, tm = _pair("BatchNorm2d", 3, track_running_stats=False, perturb=True)
    assert list(m.state_dict()) == list(tm.state_dict()) == ["weight", "bias"]
    x = _randn((4, 3, 2, 2))
    check_parity(m, tm, x, atol=ATOL_SUM)
    m.eval(), tm.eval()
    check_parity(m, tm, x, atol=ATOL_SUM)


def test_batch_norm_needs_more_than_one_value_per_channel():
    with pytest.raises(avalon.ShapeError, match="more than 1 value per channel"):
        nn.BatchNorm1d(3)(_randn((1, 3)))
    nn.BatchNorm1d(3).eval()(_randn((1, 3)))  # fine with running statistics


def test_functional_norms_match_torch():
    x, w, b = _randn((4, 3, 5)), _randn((3,), 1), _randn((3,), 2)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    trm, trv = torch.zeros(3), torch.ones(3)
    out = F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2)
    tout = torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, torch.from_numpy(w),
                                          torch.from_numpy(b), training=True, momentum=0.2)
    _close(out, tout, "F.batch_norm")
    _close(rm, trm, "running_mean"), _close(rv, trv, "running_var")
    out = F.layer_norm(x, (5,), _randn((5,), 3), _randn((5,), 4))
    _close(out, torch.nn.functional.layer_norm(torch.from_numpy(x), (5,), torch.from_numpy(_randn((5,), 3)),
                                               torch.from_numpy(_randn((5,), 4))), "F.layer_norm")


# -- activations ----------------------------------------------------------------------------------------------

ACTIVATIONS = [
    ("ReLU", (), {}), ("ReLU", (), dict(inplace=True)), ("LeakyReLU", (0.2,), {}), ("ELU", (), dict(alpha=0.7)),
    ("GELU", (), {}), ("GELU", (), dict(approximate="tanh")), ("Sigmoid", (), {}), ("Tanh", (), {}),
    ("Softplus", (), {}), ("Softplus", (), dict(beta=2.0, threshold=5.0)), ("Softsign", (), {}),
    ("LogSigmoid", (), {}), ("Softmax", (), dict(dim=1)), ("Softmax", (), dict(dim=-1)),
    ("LogSoftmax", (), dict(dim=0)), ("LogSoftmax", (), dict(dim=2)),
]


@pytest.mark.parametrize("name,args,kw", ACTIVATIONS, ids=[f"{a[0]}-{i}" for i, a in enumerate(ACTIVATIONS)])
def test_activation_layers(name, args, kw):
    m, tm = _pair(name, *args, **kw)
    check_parity(m, tm, _randn((3, 4, 5)) * 4)
    assert repr(m) == repr(tm)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_over_a_wide_range(approximate):
    # float32 erf built from avalon ops: within a few float32 ulps of torch's
    x = np.linspace(-12, 12, 48001, dtype=np.float32)
    tx = torch.from_numpy(x.copy()).requires_grad_()
    tout = torch.nn.functional.gelu(tx, approximate=approximate)
    tout.sum().backward()
    _close(F.gelu(x, approximate=approximate), tout, "gelu", atol=2e-6, rtol=1e-5)
    _, (gx,) = avalon.grad(lambda v: avalon.sum(F.gelu(v, approximate=approximate)), x)
    _close(gx, tx.grad, "gelu'", atol=2e-6, rtol=1e-5)


def test_functional_activations_and_aliases():
    x = _randn((4, 6)) * 3
    tx = torch.from_numpy(x)
    tf = torch.nn.functional
    pairs = [(F.relu(x), tf.relu(tx)), (F.leaky_relu(x, 0.1), tf.leaky_relu(tx, 0.1)), (F.elu(x), tf.elu(tx)),
             (F.sigmoid(x), torch.sigmoid(tx)), (F.tanh(x), torch.tanh(tx)), (F.softsign(x), tf.softsign(tx)),
             (F.softplus(x, beta=0.5, threshold=3), tf.softplus(tx, beta=0.5, threshold=3)),
             (F.log_sigmoid(x), tf.logsigmoid(tx)), (F.softmax(x, dim=0), tf.softmax(tx, dim=0)),
             (F.log_softmax(x, 1), tf.log_softmax(tx, 1)), (F.softmax(x), tf.softmax(tx, dim=-1)),
             (F.softmax(x, dim=1, dtype=np.float64), tf.softmax(tx, dim=1, dtype=torch.float64))]
    for k, (ours, theirs) in enumerate(pairs):
        _close(ours, theirs, f"pair {k}")
    assert F.logistic is F.sigmoid and F.leakyrelu is F.leaky_relu
    assert F.logsigmoid is F.log_sigmoid and F.logsoftmax is F.log_softmax
    with pytest.raises(avalon.ShapeError, match="dim 2 is out of range"):
        F.softmax(x, dim=2)
    with pytest.raises(ValueError, match="approximate"):
        nn.GELU("exact")


# -- Dropout ----------------------------------------------------------------------------------------------------

def test_dropout_p0_is_the_identity_and_eval_mode_too():
    x = _randn((5, 7))
    for m in (nn.Dropout(0.0), nn.Dropout(0.6).eval()):
        np.testing.assert_array_equal(m(x), x)
        _, (_, gx, _) = _grad(m, x, np.ones_like(x))
        np.testing.assert_array_equal(gx, np.ones_like(x))
    np.testing.assert_array_equal(F.dropout(x, 0.5, training=False), x)
    with pytest.raises(ValueError, match="between 0 and 1"):
        nn.Dropout(1.5)
    assert repr(nn.Dropout(0.25)) == repr(torch.nn.Dropout(0.25))


def test_dropout_training_statistics():
    p = 0.3
    m = nn.Dropout(p)
    x = np.ones((400, 250), np.float32)
    out = m(x)
    dropped = out == 0
    assert abs(dropped.mean() - p) < 0.01  # 100k draws: std of the fraction is ~0.0015
    np.testing.assert_allclose(out[~dropped], 1 / (1 - p), rtol=1e-6)
    assert abs(out.mean() - 1.0) < 0.02   # expectation preserved
    # inside avalon.grad: the gradient is the mask scaled by 1/(1-p), fresh on every call
    # (a separate cotangent: the same array passed twice is one input, whose gradient sums both uses)
    _, (_, g1, _) = _grad(m, x, x.copy())
    _, (_, g2, _) = _grad(m, x, x.copy())
    assert set(np.unique(g1)) <= {0.0, np.float32(1 / (1 - p))}
    assert abs((g1 == 0).mean() - p) < 0.01 and not np.array_equal(g1, g2)
    # reproducible after avalon.manual_seed
    avalon.manual_seed(5)
    a = m(x)
    avalon.manual_seed(5)
    np.testing.assert_array_equal(a, m(x))


# -- Embedding -----------------------------------------------------------------------------------------------------

def test_embedding_with_padding_idx():
    m, tm = _pair("Embedding", 10, 4, padding_idx=2)
    assert np.all(nn.Embedding(10, 4, padding_idx=2).weight[2] == 0)  # default init zeroes the padding row
    _perturb(tm)  # a non-zero padding row: looked up as is, but gets no gradient
    _load_from_torch(m, tm)
    idx = np.array([[1, 2, 2, 9], [0, 1, 1, 2], [5, 5, 5, 3]], dtype=np.int64)
    check_parity(m, tm, idx, input_grad=False)
    assert np.all(tm.weight.grad[2].numpy() == 0)
    assert m.padding_idx == 2 and nn.Embedding(10, 4, padding_idx=-1).padding_idx == 9
    assert repr(m) == repr(tm)
    with pytest.raises(IndexError, match="out of range"):
        m(np.array([10]))
    with pytest.raises(IndexError, match="out of range"):
        m(np.array([-1]))
    with pytest.raises(avalon.DtypeError, match="integers"):
        m(np.array([1.0], np.float32))
    _close(F.embedding(idx, m.weight, padding_idx=2), tm(torch.from_numpy(idx)), "F.embedding")


def test_embedding_int32_indices_and_default_init():
    m, tm = _pair("Embedding", 6, 3)
    idx = np.array([0, 5, 3], dtype=np.int32)
    check_parity(m, tm, idx, input_grad=False)
    big = nn.Embedding(1000, 100).weight
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1.0) < 0.01  # N(0, 1), as torch


# -- whole models ------------------------------------------------------------------------------------------------------

def _small_cnn(lib):
    return lib.Sequential(
        lib.Conv2d(1, 4, 3, padding=1), lib.BatchNorm2d(4), lib.ReLU(), lib.MaxPool2d(2),
        lib.Conv2d(4, 8, 3), lib.ReLU(), lib.AdaptiveAvgPool2d(1), lib.Flatten(),
        lib.Linear(8, 16), lib.GELU(), lib.LayerNorm(16), lib.Dropout(0.0), lib.Linear(16, 3), lib.LogSoftmax(dim=1))


def test_torch_state_dict_of_a_small_cnn_loads_and_matches():
    torch.manual_seed(0)
    tm = _small_cnn(torch.nn)
    _perturb(tm)
    m = _small_cnn(nn)
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    assert list(sd) == list(m.state_dict())
    m.load_state_dict(sd)
    x = _randn((4, 1, 10, 10))
    check_parity(m, tm, x, atol=ATOL_SUM)          # training mode (batch statistics)
    # check_parity ran the model twice (eagerly, then under grad) and torch's once:
    # once more for torch, so both running statistics saw the batch twice
    tm(torch.from_numpy(x))
    _check_running_stats(m[1], tm[1])
    m.eval(), tm.eval()
    check_parity(m, tm, x, atol=ATOL_SUM)          # eval mode (running statistics)
    jitted = avalon.jit(lambda model, v: model(v))
    _close(jitted(m, x), tm(torch.from_numpy(x)), "jit forward", ATOL_SUM)


def test_sequential_with_named_children_matches_torch():
    def build(lib):
        return lib.Sequential(OrderedDict([("fc1", lib.Linear(6, 5)), ("act", lib.Tanh()),
                                           ("fc2", lib.Linear(5, 2))]))
    torch.manual_seed(0)
    tm = build(torch.nn)
    m = _load_from_torch(build(nn), tm)
    assert [n for n, _ in m.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    check_parity(m, tm, _randn((3, 6)))


# -- default initialization -----------------------------------------------------------------------------------------

def _uniform_bound_and_std(a):
    return float(np.abs(a).max()), float(a.std())


@pytest.mark.parametrize("make", [lambda lib: lib.Linear(400, 300), lambda lib: lib.Conv2d(16, 64, 5),
                                  lambda lib: lib.ConvTranspose2d(64, 16, 5)])
def test_default_init_matches_torch_distribution(make):
    torch.manual_seed(0)
    tm, m = make(torch.nn), make(nn)
    for name, tp in tm.named_parameters():
        ours, theirs = _attr_path(m, name), tp.detach().numpy()
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        fan_in = theirs[0].size if theirs.ndim > 1 else _attr_path(tm, "weight")[0].numel()
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) and the bias rule both give this
        (ob, os), (tb, ts) = _uniform_bound_and_std(ours), _uniform_bound_and_std(theirs)
        assert ob <= bound and tb <= bound
        if ours.size >= 1000:  # enough draws for the statistics to be tight
            assert ob > 0.99 * bound
            assert abs(os - bound / math.sqrt(3)) < 0.05 * bound / math.sqrt(3), (name, os, ts)


# -- initializers ---------------------------------------------------------------------------------------------------

init = nn.init


def test_calculate_gain_and_fans_match_torch():
    for nl, param in [("linear", None), ("conv2d", None), ("sigmoid", None), ("tanh", None), ("relu", None),
                      ("leaky_relu", None), ("leaky_relu", 0.2), ("selu", None), ("conv_transpose2d", None)]:
        assert init.calculate_gain(nl, param) == pytest.approx(torch.nn.init.calculate_gain(nl, param))
    for shape in [(3, 4), (8, 3, 5, 5), (2, 6, 3), (4, 2, 1, 2, 3)]:
        assert init._calculate_fan_in_and_fan_out(np.empty(shape)) == \
            torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        init.kaiming_uniform_(np.empty(5, np.float32))
    with pytest.raises(ValueError, match="Unsupported nonlinearity"):
        init.calculate_gain("swish")
    with pytest.raises(ValueError, match="Mode"):
        init.kaiming_normal_(np.empty((3, 3), np.float32), mode="fan_avg")


def _std_close(a, expected, tol=0.03):
    assert abs(float(a.std()) / expected - 1) < tol, (float(a.std()), expected)
    assert abs(float(a.mean())) < 4 * expected / math.sqrt(a.size)


def test_kaiming_and_xavier_statistics():
    w = np.empty((256, 128), np.float32)
    assert init.kaiming_uniform_(w) is w  # in place, returns its argument
    gain = math.sqrt(2.0 / (1 + 0.0 ** 2))
    _std_close(w, gain / math.sqrt(128))
    assert np.abs(w).max() <= math.sqrt(3) * gain / math.sqrt(128)

    conv = np.empty((64, 32, 3, 3), np.float32)
    init.kaiming_normal_(conv, mode="fan_out", nonlinearity="relu")
    _std_close(conv, math.sqrt(2) / math.sqrt(64 * 9))
    init.kaiming_normal_(conv, a=0.5, nonlinearity="leaky_relu")
    _std_close(conv, math.sqrt(2 / 1.25) / math.sqrt(32 * 9))

    init.xavier_uniform_(w, gain=2.0)
    std = 2.0 * math.sqrt(2.0 / (128 + 256))
    _std_close(w, std)
    assert np.abs(w).max() <= math.sqrt(3) * std
    init.xavier_normal_(conv)
    _std_close(conv, math.sqrt(2.0 / (32 * 9 + 64 * 9)))


def test_simple_initializers():
    a = np.empty((300, 200), np.float32)
    init.normal_(a, mean=2.0, std=0.5)
    assert abs(a.mean() - 2.0) < 0.01 and abs(a.std() - 0.5) < 0.01
    init.uniform_(a, -3.0, 1.0)
    assert a.min() >= -3.0 and a.max() < 1.0 and abs(a.mean() + 1.0) < 0.02
    assert init.constant_(a, 0.25) is a and np.all(a == 0.25)
    assert np.all(init.zeros_(a) == 0) and np.all(init.ones_(a) == 1)
    assert a.dtype == np.float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        init.normal_(np.empty((0, 3), np.float32))
    assert any("zero-element" in str(w.message) for w in caught)


def test_orthogonal():
    from avalon_layers import registry
    registry._warned.discard("avalon.nn.init.orthogonal_")  # the warning is once per process
    with pytest.warns(registry.ExperimentalWarning, match="orthogonal_ is experimental"):
        init.orthogonal_(np.empty((2, 2), np.float32))
    for shape, gain in [((6, 10), 1.0), ((10, 6), 1.0), ((8, 4, 3, 3), 2.0), ((5, 5), 0.5)]:
        w = init.orthogonal_(np.empty(shape, np.float32), gain=gain)
        flat = w.reshape(shape[0], -1).astype(np.float64)
        gram = flat @ flat.T if flat.shape[0] <= flat.shape[1] else flat.T @ flat
        np.testing.assert_allclose(gram, gain ** 2 * np.eye(gram.shape[0]), atol=1e-5)
    with pytest.raises(ValueError, match="2 or more dimensions"):
        init.orthogonal_(np.empty(4, np.float32))


def test_initializers_follow_manual_seed_and_generators():
    a, b = np.empty((4, 5), np.float32), np.empty((4, 5), np.float32)
    avalon.manual_seed(11)
    init.kaiming_uniform_(a)
    avalon.manual_seed(11)
    init.kaiming_uniform_(b)
    np.testing.assert_array_equal(a, b)
    init.xavier_normal_(a, generator=np.random.default_rng(3))
    init.xavier_normal_(b, generator=np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    avalon.manual_seed(2)
    l1 = nn.Linear(3, 2)
    avalon.manual_seed(2)
    np.testing.assert_array_equal(l1.weight, nn.Linear(3, 2).weight)


def test_init_exports():
    assert avalon.init_kaiming_normal is init.kaiming_normal_ and avalon.init_constant is init.constant_
    levels = avalon.stability()["symbols"]
    assert levels["avalon.nn.init.kaiming_uniform_"] == ("Initializations", "stable")
    assert levels["avalon.nn.init.orthogonal_"] == ("Initializations", "experimental")
    assert levels["avalon.init_constant"] == ("Initializations", "stable")
