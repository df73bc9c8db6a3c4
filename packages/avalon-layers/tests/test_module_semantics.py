"""Module semantics as PyTorch's, for programs ported line by line: buffers
updated twice in one step, tied weights, unused and frozen parameters,
declared parameters and buffers, the containers and registration methods."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import avalon
import avalon.nn as nn


def _copy_to_torch(model, tmodel):
    tmodel.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})


# -- a buffer updated twice in one traced function ----------------------------------------------------------

def _two_batches(momentum):
    rng = np.random.default_rng(0)
    bn = nn.BatchNorm1d(3, momentum=momentum)
    bn.weight[...] = rng.standard_normal(3)
    real = rng.standard_normal((5, 3)).astype(np.float32)
    fake = (rng.standard_normal((4, 3)) * 3 + 1).astype(np.float32)
    tbn = torch.nn.BatchNorm1d(3, momentum=momentum)
    _copy_to_torch(bn, tbn)
    return bn, tbn, real, fake


def _discriminator_loss(bn, real, fake):
    return (bn(real) * bn(real)).mean() - (bn(fake) * 0.5).sum()


def _torch_discriminator_loss(tbn, real, fake):
    real, fake = torch.from_numpy(real), torch.from_numpy(fake)
    return (tbn(real) * tbn(real)).mean() - (tbn(fake) * 0.5).sum()


def _assert_stats_match(bn, tbn):
    np.testing.assert_allclose(bn.running_mean, tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == int(tbn.num_batches_tracked)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_applied_to_several_batches_in_one_grad_updates_in_order_as_torch(momentum):
    bn, tbn, real, fake = _two_batches(momentum)
    for step in range(2):
        loss, grads = avalon.grad(_discriminator_loss, bn, real, fake)
        tloss = _torch_discriminator_loss(tbn, real, fake)
        tloss.backward()
        np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5, atol=1e-5)
        _assert_stats_match(bn, tbn)
        assert int(bn.num_batches_tracked) == 3 * (step + 1)
        np.testing.assert_allclose(grads[0].weight, tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grads[0].bias, tbn.bias.grad.numpy(), rtol=1e-4, atol=1e-5)
        tbn.zero_grad()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_applied_to_several_batches_in_one_jit_updates_in_order_as_torch(momentum):
    bn, tbn, real, fake = _two_batches(momentum)
    f = avalon.jit(lambda m, a, b: (m(a), m(b)))
    out_real, out_fake = f(bn, real, fake)
    with torch.no_grad():
        t_real, t_fake = tbn(torch.from_numpy(real)), tbn(torch.from_numpy(fake))
    np.testing.assert_allclose(out_real, t_real.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_fake, t_fake.numpy(), rtol=1e-5, atol=1e-5)
    _assert_stats_match(bn, tbn)


# -- tied weights (GPT's lm_head.weight = wte.weight) ---------------------------------------------------------

class _TinyLM:
    """The same model in both libraries: an embedding whose table is also the output layer."""

    @staticmethod
    def build(lib):
        class TinyLM(lib.Module):
            def __init__(self):
                super().__init__()
                self.wte = lib.Embedding(7, 4)
                self.ln = lib.LayerNorm(4)
                self.lm_head = lib.Linear(4, 7, bias=False)
                self.lm_head.weight = self.wte.weight

            def forward(self, idx):
                return self.lm_head(self.ln(self.wte(idx)))
        return TinyLM()


def _tied_pair():
    avalon.manual_seed(0)
    model, tmodel = _TinyLM.build(nn), _TinyLM.build(torch.nn)
    tmodel.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})
    return model, tmodel


_IDX = np.array([[1, 3, 3, 6], [0, 2, 5, 1]])
_TARGET = np.array([[3, 3, 6, 0], [2, 5, 1, 4]])


def _lm_loss(m, idx, target):
    logits = m(idx)
    return nn.functional.cross_entropy(avalon.reshape(logits, (-1, 7)), avalon.reshape(target, (-1,)))


def _torch_lm_loss(tm):
    logits = tm(torch.from_numpy(_IDX))
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 7), torch.from_numpy(_TARGET).reshape(-1))


def test_tied_weights_are_listed_once_and_saved_under_both_names_as_torch():
    model, tmodel = _tied_pair()
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in tmodel.named_parameters()]
    assert list(model.state_dict()) == list(tmodel.state_dict())
    assert sum(p.size for p in model.parameters()) == sum(p.numel() for p in tmodel.parameters())
    assert len(list(model.named_parameters(remove_duplicate=False))) == 4


def test_tied_weights_get_one_gradient_the_sum_of_both_uses_as_torch():
    model, tmodel = _tied_pair()
    loss, (g, _, _) = avalon.grad(_lm_loss, model, _IDX, _TARGET)
    tloss = _torch_lm_loss(tmodel)
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5)
    np.testing.assert_allclose(g.wte.weight, tmodel.wte.weight.grad.numpy(), rtol=1e-4, atol=1e-6)
    assert g.lm_head.weight is g.wte.weight
    np.testing.assert_allclose(g.ln.weight, tmodel.ln.weight.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_tied_weights_are_updated_once_and_stay_tied_as_torch(name):
    model, tmodel = _tied_pair()
    opt = getattr(avalon.optim, name)(lr=0.1)
    topt = getattr(torch.optim, name)(tmodel.parameters(), lr=0.1)
    for _ in range(3):
        _, (g, _, _) = avalon.grad(_lm_loss, model, _IDX, _TARGET)
        opt.step(model, g)
        topt.zero_grad()
        _torch_lm_loss(tmodel).backward()
        topt.step()
    assert model.lm_head.weight is model.wte.weight
    np.testing.assert_allclose(model.wte.weight, tmodel.wte.weight.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_load_state_dict_copies_into_the_arrays_so_ties_survive():
    model, tmodel = _tied_pair()
    table = model.wte.weight
    state = {k: v.detach().numpy() * 2 for k, v in tmodel.state_dict().items()}
    model.load_state_dict(state)
    assert model.wte.weight is table and model.lm_head.weight is table
    np.testing.assert_allclose(table, state["wte.weight"])


# -- parameters a step does not use: no gradient, no update ---------------------------------------------------

def _two_heads(lib):
    class TwoHeads(lib.Module):
        def __init__(self):
            super().__init__()
            self.body = lib.Linear(3, 4)
            self.head_a = lib.Linear(4, 2)
            self.head_b = lib.Linear(4, 2)

        def forward(self, x):
            return self.head_a(self.body(x))   # head_b is not used in this step
    return TwoHeads()


@pytest.mark.parametrize("name, kwargs", [("SGD", dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
                                          ("Adam", dict(lr=0.1, weight_decay=0.1))])
def test_an_unused_parameter_gets_none_and_no_update_as_torch(name, kwargs):
    model, tmodel = _two_heads(nn), _two_heads(torch.nn)
    _copy_to_torch(model, tmodel)
    x = np.random.default_rng(3).standard_normal((5, 3)).astype(np.float32)
    before = model.head_b.weight.copy()
    opt = getattr(avalon.optim, name)(**kwargs)
    topt = getattr(torch.optim, name)(tmodel.parameters(), **kwargs)
    for _ in range(2):
        _, (g, _) = avalon.grad(lambda m, x: (m(x) ** 2).mean(), model, x)
        assert g.head_b.weight is None and g.head_b.bias is None
        opt.step(model, g)
        topt.zero_grad()
        (tmodel(torch.from_numpy(x)) ** 2).mean().backward()
        assert tmodel.head_b.weight.grad is None
        topt.step()
    np.testing.assert_array_equal(model.head_b.weight, before)
    np.testing.assert_allclose(model.head_a.weight, tmodel.head_a.weight.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert not any("head_b" in k for k in opt.state_dict().get("state", {}))


# -- declared parameters ----------------------------------------------------------------------------------------

class _Cached(nn.Module):
    """A parameter, a buffer, and a float array cached in forward (neither)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(np.ones(3, np.float32))
        self.register_buffer("scale", np.full(3, 2.0, np.float32))
        self.mask = None

    def forward(self, x):
        if self.mask is None:
            self.mask = np.tril(np.ones((3, 3), np.float32))
        return (x @ self.mask) * self.w * self.scale


def test_only_declared_parameters_are_trained_saved_and_listed():
    m = _Cached()
    x = np.ones((2, 3), np.float32)
    m(x)  # caches the mask
    assert [n for n, _ in m.named_parameters()] == ["w"]
    assert list(m.state_dict()) == ["w", "scale"]
    _, (g, _) = avalon.grad(lambda m, x: m(x).sum(), m, x)
    assert g.mask is None and g.scale is None
    np.testing.assert_allclose(g.w, (x @ m.mask).sum(0) * 2.0)


def test_nn_parameter_returns_the_array_itself_marked():
    a = np.zeros(3, np.float32)
    p = nn.Parameter(a)
    assert p is a and type(p) is np.ndarray and isinstance(p, nn.Parameter)
    assert not isinstance(np.zeros(3, np.float32), nn.Parameter)
    with pytest.raises(avalon.DtypeError, match="floating point"):
        nn.Parameter(np.zeros(3, np.int64))
    assert nn.Parameter(np.zeros(3, np.int64), requires_grad=False).dtype == np.int64


def test_every_layer_declares_its_parameters_as_torch():
    cases = [(nn.Linear(3, 2), torch.nn.Linear(3, 2)), (nn.Conv2d(2, 3, 3), torch.nn.Conv2d(2, 3, 3)),
             (nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)), (nn.LayerNorm(4), torch.nn.LayerNorm(4)),
             (nn.Embedding(5, 2), torch.nn.Embedding(5, 2)), (nn.LSTM(3, 4, 2), torch.nn.LSTM(3, 4, 2)),
             (nn.GRUCell(3, 4), torch.nn.GRUCell(3, 4))]
    for ours, theirs in cases:
        assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()], ours
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()], ours
        assert list(ours.state_dict()) == list(theirs.state_dict()), ours


# -- registration, containers, traversal -------------------------------------------------------------------------

def _registered(lib, array):
    class Reg(lib.Module):
        def __init__(self):
            super().__init__()
            self.register_parameter("p", lib.Parameter(array(np.ones(2, np.float32))))
            self.register_buffer("kept", array(np.zeros(2, np.float32)))
            self.register_buffer("scratch", array(np.zeros(2, np.float32)), persistent=False)
            self.add_module("fc", lib.Linear(2, 2))
            self.register_module("blocks", lib.ModuleDict({"a": lib.Linear(2, 2), "b": lib.ReLU()}))
            self.plist = lib.ParameterList([lib.Parameter(array(np.ones(2, np.float32))),
                                            lib.Parameter(array(np.ones(3, np.float32)))])
            self.pdict = lib.ParameterDict({"x": lib.Parameter(array(np.ones(1, np.float32)))})
            self.shared = self.fc  # the same module twice
    return Reg()


def test_registration_containers_and_names_match_torch():
    ours, theirs = _registered(nn, lambda a: a), _registered(torch.nn, torch.from_numpy)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert [n for n, _ in ours.named_children()] == [n for n, _ in theirs.named_children()]
    assert ours.get_submodule("blocks.a") is ours.blocks["a"]
    assert ours.get_parameter("plist.1") is ours.plist[1]
    assert ours.get_buffer("scratch") is ours.scratch
    assert list(ours.blocks) == ["a", "b"] and len(ours.plist) == 2 and "x" in ours.pdict
    with pytest.raises(KeyError, match="contain"):
        ours.register_buffer("a.b", np.zeros(1, np.float32))


def test_apply_visits_children_first_then_self_as_torch():
    ours, theirs = _registered(nn, lambda a: a), _registered(torch.nn, torch.from_numpy)
    seen, tseen = [], []
    ours.apply(lambda m: seen.append(type(m).__name__))
    theirs.apply(lambda m: tseen.append(type(m).__name__))
    assert seen == tseen


# -- freezing ---------------------------------------------------------------------------------------------------

def test_a_frozen_module_gets_no_gradient_and_no_update_and_retraces_once():
    model, tmodel = _two_heads(nn), _two_heads(torch.nn)
    _copy_to_torch(model, tmodel)
    x = np.random.default_rng(4).standard_normal((5, 3)).astype(np.float32)
    loss_fn = lambda m, x: (m(x) ** 2).mean()  # noqa: E731
    f = avalon.value_and_grad(loss_fn)
    opt, topt = avalon.optim.Adam(lr=0.1), torch.optim.Adam(tmodel.parameters(), lr=0.1)
    f(model, x)
    assert f.traces == 1
    model.body.requires_grad_(False)
    tmodel.body.requires_grad_(False)
    frozen = model.body.weight.copy()
    for _ in range(2):
        _, (g, _) = f(model, x)
        assert g.body.weight is None and g.body.bias is None
        opt.step(model, g)
        topt.zero_grad()
        (tmodel(torch.from_numpy(x)) ** 2).mean().backward()
        topt.step()
    assert f.traces == 2          # the freeze retraced once, the next call did not
    np.testing.assert_array_equal(model.body.weight, frozen)
    np.testing.assert_allclose(model.head_a.weight, tmodel.head_a.weight.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in tmodel.named_parameters()]
    model.body.requires_grad_(True)
    tmodel.body.requires_grad_(True)
    for _ in range(2):   # unfrozen: trained again, its optimizer state starting now, as torch's
        _, (g, _) = f(model, x)
        opt.step(model, g)
        topt.zero_grad()
        (tmodel(torch.from_numpy(x)) ** 2).mean().backward()
        topt.step()
    assert g.body.weight is not None and f.traces == 2   # the unfrozen signature was compiled first
    for name, p in tmodel.named_parameters():
        np.testing.assert_allclose(model.get_parameter(name), p.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_one_parameter_frozen_with_requires_grad_false():
    model = _two_heads(nn)
    model.head_a.register_parameter("bias", nn.Parameter(model.head_a.bias, requires_grad=False))
    x = np.ones((2, 3), np.float32)
    _, (g, _) = avalon.grad(lambda m, x: m(x).sum(), model, x)
    assert g.head_a.bias is None and g.head_a.weight is not None
    assert "head_a.bias" in dict(model.named_parameters()) and "head_a.bias" in model.state_dict()


def test_a_module_with_only_undeclared_arrays_says_how_to_declare_them():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = np.ones(3, np.float32)   # not declared: not a parameter, as in torch

    with pytest.raises(avalon.AvalonError, match=r"nn.Parameter\(array\)"):
        avalon.grad(lambda m: (m.w * 2.0).sum(), Raw())
    assert Raw().parameters() == [] and list(Raw().state_dict()) == []
