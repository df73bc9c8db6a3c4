"""nn.Module behaviour of avalon.nn's layers against PyTorch's: parameter and
state_dict names and shapes, load_state_dict's errors, train/eval, repr, the
containers (Sequential, ModuleList), the errors for badly shaped inputs, and
plain (non-Module) classes holding layers under avalon.grad.
"""
from collections import OrderedDict

import numpy as np
import pytest
import torch

import avalon
import avalon.nn as nn
import avalon.nn.functional as F

RTOL, ATOL = 1e-4, 1e-5
THIS_FILE = "test_module.py"


def _randn(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _net(lib, functional):
    """The same architecture written against torch.nn or avalon.nn."""

    class Net(lib.Module):
        def __init__(self):
            super().__init__()
            self.features = lib.Sequential(lib.Conv2d(3, 8, 3, padding=1), lib.BatchNorm2d(8), lib.ReLU(),
                                           lib.MaxPool2d(2))
            self.flatten = lib.Flatten()
            self.blocks = lib.ModuleList([lib.Linear(8 * 4 * 4, 16), lib.Linear(16, 16)])
            self.norm = lib.LayerNorm(16)
            self.drop = lib.Dropout(0.25)
            self.head = lib.Linear(16, 4, bias=False)

        def forward(self, x):
            h = self.flatten(self.features(x))
            for block in self.blocks:
                h = functional.relu(block(h))
            return self.head(self.drop(self.norm(h)))

    return Net()


def _pair():
    torch.manual_seed(0)
    tm = _net(torch.nn, torch.nn.functional)
    m = _net(nn, F)
    m.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    return m, tm


# -- names, shapes, state_dict -------------------------------------------------------------------------------

def test_parameter_names_and_shapes_match_torch():
    m, tm = _pair()
    ours = [(n, tuple(p.shape)) for n, p in m.named_parameters()]
    theirs = [(n, tuple(p.shape)) for n, p in tm.named_parameters()]
    assert ours == theirs
    assert len(m.parameters()) == len(list(tm.parameters()))
    assert sum(p.size for p in m.parameters()) == sum(p.numel() for p in tm.parameters())
    assert [n for n, _ in m.named_modules()] == [n for n, _ in tm.named_modules()]
    assert [n for n, _ in m.named_children()] == [n for n, _ in tm.named_children()]


def test_state_dict_keys_shapes_and_dtypes_match_torch():
    m, tm = _pair()
    ours, theirs = m.state_dict(), tm.state_dict()
    assert list(ours) == list(theirs)
    for k in theirs:
        assert tuple(ours[k].shape) == tuple(theirs[k].shape), k
        assert ours[k].dtype == theirs[k].numpy().dtype, k  # num_batches_tracked is int64 as in torch
    np.testing.assert_array_equal(ours["blocks.1.weight"], theirs["blocks.1.weight"].numpy())


def test_float_buffers_are_not_parameters():
    m, _ = _pair()
    params = {n for n, _ in m.named_parameters()}
    assert "features.1.running_mean" not in params and "features.1.running_var" not in params
    assert {"features.1.running_mean", "features.1.running_var"} <= {n for n, _ in m.named_buffers()}


def test_load_state_dict_strict_errors_list_every_problem():
    m, tm = _pair()
    sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
    del sd["head.weight"], sd["features.1.running_var"]
    sd["extra.weight"] = np.zeros(3, np.float32)
    sd["blocks.0.bias"] = np.zeros(15, np.float32)
    with pytest.raises(avalon.ShapeError) as err:
        m.load_state_dict(sd)
    msg = str(err.value)
    for key in ("head.weight", "features.1.running_var", "extra.weight", "blocks.0.bias"):
        assert key in msg
    assert "missing" in msg and "unexpected" in msg and "(16,)" in msg and "(15,)" in msg
    # strict=False still refuses a wrong shape, as torch does ...
    with pytest.raises(avalon.ShapeError, match="blocks.0.bias"):
        m.load_state_dict(sd, strict=False)
    # ... and otherwise loads what matches and reports the rest
    sd["blocks.0.bias"] = np.full(16, 0.5, np.float32)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["features.1.running_var", "head.weight"] and unexpected == ["extra.weight"]
    np.testing.assert_array_equal(m.blocks[0].bias, np.full(16, 0.5, np.float32))


def test_loaded_torch_weights_give_torch_outputs_and_gradients():
    m, tm = _pair()
    m.eval(), tm.eval()
    x = _randn((2, 3, 8, 8))
    tx = torch.from_numpy(x.copy()).requires_grad_()
    tout = tm(tx)
    tout.sum().backward()
    np.testing.assert_allclose(m(x), tout.detach().numpy(), rtol=RTOL, atol=1e-4)
    _, (g, gx) = avalon.grad(lambda mm, xx: avalon.sum(mm(xx)), m, x)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=RTOL, atol=1e-4)
    for name, p in tm.named_parameters():
        ours = g
        for part in name.split("."):
            ours = ours[int(part)] if part.isdigit() else getattr(ours, part)
        np.testing.assert_allclose(ours, p.grad.numpy(), rtol=RTOL, atol=1e-4, err_msg=name)


# -- modes ---------------------------------------------------------------------------------------------------

def test_train_and_eval_are_recursive():
    m, _ = _pair()
    assert all(mod.training for mod in m.modules())
    assert m.eval() is m
    assert not any(mod.training for mod in m.modules())
    x = _randn((2, 3, 8, 8))
    np.testing.assert_array_equal(m(x), m(x))  # no dropout, running statistics: deterministic
    m.train()
    assert all(mod.training for mod in m.modules())
    assert not np.array_equal(m.drop(np.ones((50, 50), np.float32)), np.ones((50, 50), np.float32))
    m.features.eval()
    assert not m.features[1].training and m.training and m.drop.training


# -- repr ----------------------------------------------------------------------------------------------------

def test_repr_matches_torch():
    m, tm = _pair()
    assert repr(m) == repr(tm)

    def small(lib):
        return lib.Sequential(lib.Conv2d(1, 20, 5), lib.ReLU(), lib.Conv2d(20, 64, 5, stride=2, padding=2),
                              lib.ReLU(inplace=True), lib.Flatten(), lib.Linear(4, 3),
                              lib.Sequential(lib.Linear(3, 3, bias=False), lib.Sigmoid()))
    assert repr(small(nn)) == repr(small(torch.nn))
    assert repr(nn.Linear(4, 3)) == "Linear(in_features=4, out_features=3, bias=True)"
    assert repr(nn.Conv2d(1, 20, 5)) == "Conv2d(1, 20, kernel_size=(5, 5), stride=(1, 1))"
    mods = [nn.ReLU(), nn.ReLU(), nn.Linear(2, 2), nn.Linear(2, 2), nn.Tanh()]
    torch_mods = [torch.nn.ReLU(), torch.nn.ReLU(), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Tanh()]
    assert repr(nn.ModuleList(mods)) == repr(torch.nn.ModuleList(torch_mods))
    assert repr(nn.ModuleList()) == repr(torch.nn.ModuleList())


# -- containers ----------------------------------------------------------------------------------------------

def test_sequential_container_operations():
    a, b, c = nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)
    seq = nn.Sequential(a, b)
    assert len(seq) == 2 and list(seq) == [a, b] and seq[0] is a and seq[-1] is b
    assert seq.append(c) is seq and seq[2] is c and [n for n, _ in seq.named_children()] == ["0", "1", "2"]
    head = seq[:2]
    assert isinstance(head, nn.Sequential) and list(head) == [a, b]
    tail = seq[1:]
    assert [n for n, _ in tail.named_children()] == ["1", "2"]  # torch keeps the names of a slice
    x = _randn((4, 2))
    np.testing.assert_allclose(seq(x), c(b(a(x))), rtol=1e-6)
    del seq[1]
    assert list(seq) == [a, c] and [n for n, _ in seq.named_children()] == ["0", "1"]
    seq.insert(1, b)
    assert list(seq) == [a, b, c]
    seq[1] = nn.Tanh()
    assert isinstance(seq[1], nn.Tanh) and [n for n, _ in seq.named_parameters()] == \
        ["0.weight", "0.bias", "2.weight", "2.bias"]
    with pytest.raises(IndexError):
        seq[3]
    with pytest.raises(TypeError, match="not a Module"):
        nn.Sequential(a, lambda v: v)
    named = nn.Sequential(OrderedDict([("enc", nn.Linear(2, 2)), ("act", nn.ReLU())]))
    assert [n for n, _ in named.named_parameters()] == ["enc.weight", "enc.bias"]
    assert named.enc is named[0]


def test_module_list_operations():
    layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
    assert len(layers) == 3
    layers.append(nn.Linear(2, 1)).extend([nn.ReLU()])
    assert len(layers) == 5 and isinstance(layers[-1], nn.ReLU)
    assert [n for n, _ in layers.named_parameters()][:2] == ["0.weight", "0.bias"]
    assert len(layers.parameters()) == 8
    with pytest.raises(NotImplementedError):
        layers(_randn((1, 2)))


# -- errors for bad inputs -----------------------------------------------------------------------------------

def _message(layer, x):
    with pytest.raises(avalon.ShapeError) as err:
        layer(x)
    return str(err.value)


def test_bad_inputs_name_the_layer_and_the_shapes():
    msg = _message(nn.Conv2d(3, 16, kernel_size=(3, 3)), _randn((8, 1, 28, 28)))
    assert msg.startswith("Conv2d(3, 16, kernel_size=(3, 3), stride=(1, 1)) expects input of shape "
                          "(N, 3, H, W) or (3, H, W), got (8, 1, 28, 28)")
    assert THIS_FILE in msg  # points at the caller's line
    assert "got (28, 28)" in _message(nn.Conv2d(1, 4, 3), _randn((28, 28)))
    assert "(N, 2, L) or (2, L), got (4, 3, 5)" in _message(nn.Conv1d(2, 4, 3), _randn((4, 3, 5)))
    msg = _message(nn.Linear(4, 3), _randn((8, 5)))
    assert "Linear(in_features=4, out_features=3, bias=True)" in msg and "in_features" in msg \
        and "(8, 5)" in msg
    assert "(N, 3, H, W), got (2, 3, 4)" in _message(nn.BatchNorm2d(3), _randn((2, 3, 4)))
    assert "(N, 3) or (N, 3, L), got (2, 4)" in _message(nn.BatchNorm1d(3), _randn((2, 4)))
    assert "LayerNorm((4,)" in _message(nn.LayerNorm(4), _randn((2, 5)))
    assert "MaxPool2d(kernel_size=2" in _message(nn.MaxPool2d(2), _randn((4, 4)))
    assert "ConvTranspose2d(3, 2" in _message(nn.ConvTranspose2d(3, 2, 3), _randn((1, 2, 4, 4)))


def test_bad_input_inside_a_model_and_inside_grad():
    m, _ = _pair()
    x = _randn((2, 1, 8, 8))
    assert "Conv2d(3, 8, kernel_size=(3, 3)" in _message(m, x)
    with pytest.raises(avalon.ShapeError, match=r"expects input of shape \(N, 3, H, W\)") as err:
        avalon.grad(lambda mm, xx: avalon.sum(mm(xx)), m, x)
    assert THIS_FILE in str(err.value)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible by groups"):
        nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="strided"):
        nn.Conv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(NotImplementedError, match="padding_mode"):
        nn.Conv2d(3, 4, 3, padding_mode="reflect")
    with pytest.raises(NotImplementedError, match="ceil_mode"):
        nn.MaxPool2d(2, ceil_mode=True)
    with pytest.raises(ValueError, match="padding_idx"):
        nn.Embedding(4, 2, padding_idx=4)


# -- plain classes, dtypes -----------------------------------------------------------------------------------

class PlainMLP:
    """Not an nn.Module: avalon.grad walks any object holding layers."""

    def __init__(self, lib):
        self.fc1, self.act, self.fc2 = lib.Linear(4, 8), lib.Tanh(), lib.Linear(8, 2)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_plain_class_holding_layers_works_with_grad():
    torch.manual_seed(0)
    tm, m = PlainMLP(torch.nn), PlainMLP(nn)
    for name in ("fc1", "fc2"):
        getattr(m, name).load_state_dict({k: v.detach().numpy() for k, v in getattr(tm, name).state_dict().items()})
    x = _randn((5, 4))
    tout = tm(torch.from_numpy(x))
    (tout ** 2).sum().backward()
    loss, (g, _) = avalon.grad(lambda mm, xx: avalon.sum(mm(xx) ** 2), m, x)
    assert isinstance(g, PlainMLP)
    np.testing.assert_allclose(loss, (tout ** 2).sum().item(), rtol=RTOL)
    for name in ("fc1", "fc2"):
        for pname in ("weight", "bias"):
            np.testing.assert_allclose(getattr(getattr(g, name), pname), getattr(getattr(tm, name), pname).grad.numpy(),
                                       rtol=RTOL, atol=ATOL, err_msg=f"{name}.{pname}")


def test_dtype_argument_and_float64_layers():
    lin = nn.Linear(3, 2, dtype=np.float64)
    assert lin.weight.dtype == np.float64 and lin.bias.dtype == np.float64
    bn = nn.BatchNorm1d(2, dtype=np.float64)
    assert bn.running_mean.dtype == np.float64 and bn.num_batches_tracked.dtype == np.int64
    x = np.random.default_rng(0).standard_normal((4, 3))
    assert bn(lin(x)).dtype == np.float64 and bn.running_var.dtype == np.float64
