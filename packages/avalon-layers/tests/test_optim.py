"""Optimizers and LR schedulers match torch.optim step by step; the update is
one compiled function per model that writes into the model's own arrays;
grads that do not fit the model raise errors naming the path."""
import copy

import numpy as np
import pytest
import torch

import avalon
import avalon.nn as nn
import avalon.nn.functional as F
import avalon.optim as optim
from avalon import tree
from avalon_layers.registry import LEVELS

RTOL, ATOL = 1e-5, 1e-6


# -- models ------------------------------------------------------------------------------------

def _arr(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


class Linear:
    def __init__(self, rng, n_in, n_out):
        self.weight, self.bias = _arr(rng, n_out, n_in), _arr(rng, n_out)
        self.activation = "relu"  # a non-array attribute


class PlainNet:
    """A model as a plain object: nested objects, a list, an int array, a 0-d parameter."""

    def __init__(self, rng):
        self.layers = [Linear(rng, 4, 3), Linear(rng, 3, 2)]
        self.scale = np.array(rng.standard_normal(), np.float32)
        self.counts = np.arange(3)  # integer: never updated


class ModuleNet(nn.Module):
    """A model as an nn.Module: a parameter, a child module and a buffer."""

    def __init__(self, rng):
        super().__init__()
        self.weight = nn.Parameter(_arr(rng, 3, 4))
        self.child = Child(rng)
        self.register_buffer("running_mean", np.zeros(3, np.float32))


class Child(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.bias = nn.Parameter(_arr(rng, 3))


def dict_model(rng):
    return {"w": _arr(rng, 3, 4), "b": _arr(rng, 4)}


MODELS = {"dict": dict_model, "plain": PlainNet, "module": ModuleNet}


def _trainable(model):
    """(path, array) of the float arrays an optimizer updates (not buffers)."""
    leaves, td = tree.flatten(model)
    buffers = {id(b) for _, b in model.named_buffers()} if isinstance(model, nn.Module) else set()
    return [(p, x) for p, x in zip(tree.leaf_paths(td), leaves)
            if x.dtype.kind == "f" and id(x) not in buffers]


def _random_grads(model, rng):
    """Gradients with the model's structure (None for integer arrays, as avalon.grad gives)."""
    buffers = {id(b) for _, b in model.named_buffers()} if isinstance(model, nn.Module) else set()
    return tree.tree_map(lambda x: (np.zeros_like(x) if id(x) in buffers else _arr(rng, *x.shape))
                         if x.dtype.kind == "f" else None, model)


def _torch_mirror(model):
    return [torch.tensor(np.array(x)) for _, x in _trainable(model)]


def _feed_torch(tparams, model, grads):
    gleaves = dict(zip(tree.leaf_paths(tree.flatten(grads)[1]), tree.flatten(grads)[0]))
    for t, (path, _) in zip(tparams, _trainable(model)):
        t.grad = torch.tensor(gleaves[path])


def _assert_same(model, tparams, where):
    for (path, x), t in zip(_trainable(model), tparams):
        np.testing.assert_allclose(x, t.numpy(), rtol=RTOL, atol=ATOL, err_msg=f"{path} {where}")


# -- every optimizer and option against torch ----------------------------------------------------------

CONFIGS = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.3)),
    ("SGD", dict(lr=0.1, momentum=0.8, nesterov=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ("SGD", dict(lr=0.1, weight_decay=0.2)),
    ("Adam", dict()),
    ("Adam", dict(lr=0.05, betas=(0.8, 0.95))),
    ("Adam", dict(lr=0.01, eps=1e-3, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict()),
    ("AdamW", dict(lr=0.05, weight_decay=0.3, amsgrad=True)),
    ("RMSprop", dict()),
    ("RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-4)),
    ("RMSprop", dict(lr=0.01, momentum=0.9)),
    ("RMSprop", dict(lr=0.01, centered=True)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.1)),
    ("Adagrad", dict()),
    ("Adagrad", dict(lr=0.1, lr_decay=0.2)),
    ("Adagrad", dict(lr=0.1, weight_decay=0.1, initial_accumulator_value=0.5)),
    ("Adagrad", dict(lr=0.1, eps=1e-3)),
]


def _ids(c):
    return c[0] + "(" + ",".join(f"{k}={v}" for k, v in c[1].items()) + ")"


def _pair(name, kwargs, model):
    tparams = _torch_mirror(model)
    extra = {} if name == "Adagrad" else {"foreach": False}
    return getattr(optim, name)(**kwargs), getattr(torch.optim, name)(tparams, **kwargs, **extra), tparams


@pytest.mark.parametrize("model_kind", sorted(MODELS))
@pytest.mark.parametrize("name, kwargs", CONFIGS, ids=[_ids(c) for c in CONFIGS])
def test_matches_torch_step_by_step(name, kwargs, model_kind):
    rng = np.random.default_rng(0)
    model = MODELS[model_kind](rng)
    opt, topt, tparams = _pair(name, kwargs, model)
    frozen = copy.deepcopy(tree.flatten(model)[0])
    before = None
    for step in range(5):
        grads = _random_grads(model, rng)
        opt.step(model, grads)
        _feed_torch(tparams, model, grads)
        topt.step()
        _assert_same(model, tparams, f"after step {step + 1}")
        if before is None:  # the first step may move a module's parameters into a flat buffer
            before = {id(x): np.array(x) for _, x in _trainable(model)}
    # updated in place: the model holds the same array objects, with new values
    assert {id(x) for _, x in _trainable(model)} == set(before)
    assert all(not np.array_equal(x, before[id(x)]) for _, x in _trainable(model))
    # integer arrays and buffers are untouched
    for x, y in zip(tree.flatten(model)[0], frozen):
        if x.dtype.kind != "f" or (isinstance(model, nn.Module) and x is model.running_mean):
            np.testing.assert_array_equal(x, y)
    assert opt.update_fn.traces == 1


def test_update_is_one_function_writing_into_the_parameters():
    rng = np.random.default_rng(1)
    model = PlainNet(rng)
    opt = optim.Adam(lr=1e-2)
    for _ in range(3):
        opt.step(model, _random_grads(model, rng))
    assert opt.update_fn.traces == 1
    graph = opt.update_fn._last().compiled.graph
    n_params = len(_trainable(model))
    # every parameter and both moment arrays are written in place by fused updates
    # (one multi-output kernel per run of same-shape writes), none by a copy
    assert not [n for n in graph.nodes if n.op == "assign"], graph
    assert sum(n.attrs["n_dest"] for n in graph.nodes if n.op == "fused_update") == 3 * n_params


@pytest.mark.parametrize("name, kwargs", [c for c in CONFIGS if c[1]], ids=[_ids(c) for c in CONFIGS if c[1]])
def test_state_dict_round_trip_continues_identically(name, kwargs):
    rng = np.random.default_rng(2)
    model = dict_model(rng)
    opt, topt, tparams = _pair(name, kwargs, model)
    grads = [_random_grads(model, rng) for _ in range(5)]
    for g in grads[:3]:
        opt.step(model, g)
        _feed_torch(tparams, model, g)
        topt.step()
    saved = opt.state_dict()
    snapshot = copy.deepcopy(saved)
    opt.step(model, grads[3])  # the saved state is a copy, not a view of the live one
    for path, st in snapshot["state"].items():
        for k, v in st.items():
            np.testing.assert_array_equal(saved["state"][path][k], v)
    # a fresh optimizer (default hyperparameters) takes them and the state from the dict
    _feed_torch(tparams, model, grads[3])
    topt.step()
    resumed = getattr(optim, name)()
    resumed.load_state_dict(opt.state_dict())
    assert repr(resumed) == repr(opt)
    resumed.step(model, grads[4])
    _feed_torch(tparams, model, grads[4])
    topt.step()
    _assert_same(model, tparams, "after resuming")
    assert all(st["step"] == 5 for st in resumed.state_dict()["state"].values())


def test_state_dict_contents():
    rng = np.random.default_rng(3)
    model = ModuleNet(rng)
    opt = optim.Adam(lr=0.01, amsgrad=True)
    opt.step(model, _random_grads(model, rng))
    sd = opt.state_dict()
    assert sd["optimizer"] == "Adam"
    assert sd["hyperparameters"] == {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                                     "amsgrad": True}
    assert sorted(sd["state"]) == ["child.bias", "weight"]  # module paths: named_parameters' names
    assert sorted(sd["state"]["weight"]) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"]
    assert sd["state"]["weight"]["step"] == 1
    with pytest.raises(ValueError, match="saved by Adam"):
        optim.SGD(lr=0.1).load_state_dict(sd)


def test_lr_changes_do_not_retrace():
    rng = np.random.default_rng(4)
    model = dict_model(rng)
    opt, topt, tparams = _pair("SGD", dict(lr=0.5, momentum=0.9), model)
    sched, tsched = optim.StepLR(opt, step_size=1, gamma=0.5), torch.optim.lr_scheduler.StepLR(topt, 1, 0.5)
    for step in range(4):
        g = _random_grads(model, rng)
        opt.step(model, g)
        _feed_torch(tparams, model, g)
        topt.step()
        sched.step()
        tsched.step()
        _assert_same(model, tparams, f"after step {step + 1}")
    assert opt.lr == pytest.approx(0.5 / 16)
    assert opt.update_fn.traces == 1


def test_changing_a_static_hyperparameter_retraces_and_applies():
    rng = np.random.default_rng(5)
    model = dict_model(rng)
    opt, topt, tparams = _pair("Adam", dict(lr=0.1), model)
    for amsgrad in (False, True):
        opt.amsgrad = amsgrad
        topt.param_groups[0]["amsgrad"] = amsgrad
        if amsgrad:  # torch creates max_exp_avg_sq only at its first step; start both from zero
            for t in tparams:
                topt.state[t]["max_exp_avg_sq"] = torch.zeros_like(t)
        g = _random_grads(model, rng)
        opt.step(model, g)
        _feed_torch(tparams, model, g)
        topt.step()
        _assert_same(model, tparams, f"amsgrad={amsgrad}")
    assert opt.update_fn.traces == 2


# -- with avalon.grad --------------------------------------------------------------------------------------

def test_training_with_avalon_grad_matches_torch():
    rng = np.random.default_rng(6)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.b1 = nn.Parameter(_arr(rng, 8, 5) * 0.3), nn.Parameter(np.zeros(8, np.float32))
            self.w2, self.b2 = nn.Parameter(_arr(rng, 3, 8) * 0.3), nn.Parameter(np.zeros(3, np.float32))

        def forward(self, x):
            return avalon.linear(avalon.relu(avalon.linear(x, self.w1, self.b1)), self.w2, self.b2)

    def loss_fn(model, x, y):
        return F.cross_entropy(model(x), y)

    model = Net()
    tparams = [torch.tensor(np.array(p)).requires_grad_(True) for p in model.parameters()]
    x, y = _arr(rng, 16, 5), rng.integers(0, 3, 16)
    opt, topt = optim.AdamW(lr=0.05), torch.optim.AdamW(tparams, lr=0.05, foreach=False)
    losses = []
    for _ in range(5):
        loss, (g, _, _) = avalon.grad(loss_fn, model, x, y)
        opt.step(model, g)
        w1, b1, w2, b2 = tparams
        tloss = torch.nn.functional.cross_entropy(
            torch.relu(torch.tensor(x) @ w1.T + b1) @ w2.T + b2, torch.tensor(y))
        topt.zero_grad()
        tloss.backward()
        topt.step()
        np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5)
        losses.append(float(loss))
    for p, t in zip(model.parameters(), tparams):
        np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert losses[-1] < losses[0]


def test_none_gradients_are_skipped_and_tied_weights_updated_once():
    rng = np.random.default_rng(7)
    shared = _arr(rng, 2, 2)
    model = {"a": shared, "b": shared, "c": _arr(rng, 3)}
    c_before = model["c"].copy()
    ga, gb = _arr(rng, 2, 2), _arr(rng, 2, 2)
    t = torch.tensor(shared.copy())
    topt = torch.optim.SGD([t], lr=0.1, momentum=0.9, foreach=False)
    opt = optim.SGD(lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.step(model, {"a": ga, "b": gb, "c": None})
        t.grad = torch.tensor(ga + gb)
        topt.step()
    np.testing.assert_allclose(model["a"], t.numpy(), rtol=RTOL, atol=ATOL)
    assert model["a"] is model["b"] is shared
    np.testing.assert_array_equal(model["c"], c_before)
    assert sorted(opt.state) == ["['a']"]


def test_ignore_leaves_paths_alone():
    rng = np.random.default_rng(8)
    model = ModuleNet(rng)
    w = model.weight.copy()
    optim.SGD(lr=0.1).step(model, _random_grads(model, rng), ignore={"weight"})
    np.testing.assert_array_equal(model.weight, w)


# -- errors -----------------------------------------------------------------------------------------------------

def test_missing_gradient_names_the_path():
    rng = np.random.default_rng(9)
    model = PlainNet(rng)
    grads = _random_grads(model, rng)
    del grads.layers[1].__dict__["bias"]
    with pytest.raises(avalon.AvalonError, match=r"grads has no gradient at \.layers\[1\]\.bias"):
        optim.SGD(lr=0.1).step(model, grads)
    with pytest.raises(avalon.AvalonError, match=r"grads has no gradient at \['b'\]"):
        optim.SGD(lr=0.1).step({"w": _arr(rng, 2), "b": _arr(rng, 2)}, {"w": _arr(rng, 2)})


def test_wrong_gradient_shape_names_the_path():
    rng = np.random.default_rng(10)
    model = ModuleNet(rng)
    grads = _random_grads(model, rng)
    grads.child.bias = _arr(rng, 4)
    with pytest.raises(avalon.ShapeError, match=r"Adam.step: the gradient at child.bias has shape \(4,\) but the "
                                                r"parameter has shape \(3,\)"):
        optim.Adam().step(model, grads)


def test_extra_gradient_and_whole_grad_tuple_are_explained():
    rng = np.random.default_rng(11)
    model = {"w": _arr(rng, 2)}
    with pytest.raises(avalon.AvalonError, match=r"grads has arrays at \['v'\] where the model has none"):
        optim.SGD(lr=0.1).step(model, {"w": _arr(rng, 2), "v": _arr(rng, 2)})
    _, grads = avalon.grad(lambda m, x: avalon.sum(m["w"] * x), model, _arr(rng, 2))
    with pytest.raises(avalon.AvalonError, match="pass its first element"):
        optim.SGD(lr=0.1).step(model, grads)
    optim.SGD(lr=0.1).step(model, grads[0])


def test_state_of_another_shape_names_the_path():
    rng = np.random.default_rng(12)
    opt = optim.Adam()
    opt.step({"w": _arr(rng, 2)}, {"w": _arr(rng, 2)})
    with pytest.raises(avalon.ShapeError, match=r"state 'exp_avg' of \['w'\] has shape \(2,\) but the parameter "
                                                r"has shape \(3,\)"):
        opt.step({"w": _arr(rng, 3)}, {"w": _arr(rng, 3)})


def test_constructor_validation():
    with pytest.raises(ValueError, match="Invalid lr"):
        optim.SGD(lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        optim.Adam(betas=(0.9, 1.0))


# -- schedulers -------------------------------------------------------------------------------------------------

SCHEDULERS = [
    ("StepLR", dict(step_size=3, gamma=0.5)),
    ("ExponentialLR", dict(gamma=0.9)),
    ("CosineAnnealingLR", dict(T_max=5, eta_min=0.01)),
    ("CosineAnnealingLR", dict(T_max=4)),
]


@pytest.mark.parametrize("name, kwargs", SCHEDULERS, ids=[_ids(c) for c in SCHEDULERS])
def test_scheduler_lr_sequence_matches_torch(name, kwargs):
    opt = optim.SGD(lr=0.2)
    topt = torch.optim.SGD([torch.zeros(1)], lr=0.2)
    sched = getattr(optim.lr_scheduler, name)(opt, **kwargs)
    tsched = getattr(torch.optim.lr_scheduler, name)(topt, **kwargs)
    ours, theirs = [sched.get_last_lr()[0]], [tsched.get_last_lr()[0]]
    for _ in range(14):
        topt.step()
        sched.step()
        tsched.step()
        ours.append(sched.get_last_lr()[0])
        theirs.append(tsched.get_last_lr()[0])
        assert opt.lr == ours[-1]
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15)


def test_scheduler_state_dict_resumes():
    opt = optim.SGD(lr=0.2)
    sched = optim.CosineAnnealingLR(opt, T_max=6)
    for _ in range(3):
        sched.step()
    saved_opt, saved = opt.state_dict(), sched.state_dict()
    expect = []
    for _ in range(4):
        sched.step()
        expect.append(opt.lr)
    # PyTorch's order: create the scheduler, then load the optimizer's and the scheduler's states
    opt2 = optim.SGD(lr=0.2)
    sched2 = optim.CosineAnnealingLR(opt2, T_max=6)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved)
    assert opt2.lr == saved_opt["hyperparameters"]["lr"] != 0.2
    got = []
    for _ in range(4):
        sched2.step()
        got.append(opt2.lr)
    np.testing.assert_allclose(got, expect, rtol=1e-12)


def test_scheduler_exports():
    assert optim.lr_scheduler.StepLR is optim.StepLR
    assert optim.lr_scheduler.CosineAnnealingLR is optim.CosineAnnealingLR
    for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "StepLR", "ExponentialLR", "CosineAnnealingLR",
                 "lr_scheduler"):
        assert LEVELS[("optim", name)] == ("Optimizers", "stable")
