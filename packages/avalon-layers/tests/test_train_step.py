"""avalon.optim.train_step: the gradient and the optimizer's update compiled as
one function give what `avalon.grad` then `opt.step` give, step after step,
with every optimizer, with and without parameters given at construction, and
through everything that changes the optimizer or the model between steps."""
import copy
import warnings

import numpy as np
import pytest
import torch

import avalon
import avalon.nn as nn
import avalon.optim as optim
from avalon.errors import AvalonError
from avalon_layers.optim import OptimizerError

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def _experimental_is_known():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", avalon.ExperimentalWarning)
        yield


class Net(nn.Module):
    def __init__(self, unused=False):
        super().__init__()
        self.fc1 = nn.Linear(6, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 3)
        if unused:
            self.spare = nn.Linear(4, 4)    # gets no gradient: never updated, no state

    def forward(self, x):
        return self.fc2(avalon.tanh(self.bn(self.fc1(x))))


def _loss(m, x, y):
    return nn.functional.cross_entropy(m(x), y)


def _loss_with_accuracy(m, x, y):
    logits = m(x)
    return nn.functional.cross_entropy(logits, y), avalon.mean(avalon.argmax(logits, axis=1) == y)


def _batches(n, seed=0, size=16):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((size, 6)).astype(np.float32), rng.integers(0, 3, size)) for _ in range(n)]


def _separately(model, opt, batch, loss_fn=_loss):
    loss, grads = avalon.grad(loss_fn, model, *batch, argnums=0)
    opt.step(model, grads[0])
    return loss


def _twins(make_opt, unused=False):
    model = Net(unused)
    other = copy.deepcopy(model)
    return model, make_opt(model), other, make_opt(other)


def _assert_same(model, opt, other, other_opt):
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL, err_msg=k)
    mine, theirs = opt.state_dict(), other_opt.state_dict()
    assert {k: v for k, v in mine.items() if k != "state"} == {k: v for k, v in theirs.items() if k != "state"}
    assert mine["state"].keys() == theirs["state"].keys()
    for k, st in mine["state"].items():
        for name, v in st.items():
            np.testing.assert_allclose(np.asarray(v), np.asarray(theirs["state"][k][name]), rtol=RTOL, atol=ATOL,
                                       err_msg=f"{k} {name}")


OPTIMIZERS = {
    "Adam": lambda params: optim.Adam(params, lr=1e-2),
    "Adam(amsgrad, weight_decay)": lambda params: optim.Adam(params, lr=1e-2, amsgrad=True, weight_decay=0.1),
    "AdamW": lambda params: optim.AdamW(params, lr=1e-2),
    "SGD(momentum, nesterov)": lambda params: optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
    "SGD": lambda params: optim.SGD(params, lr=0.1),
    "RMSprop(centered)": lambda params: optim.RMSprop(params, lr=1e-2, centered=True),
    "Adagrad": lambda params: optim.Adagrad(params, lr=0.1, initial_accumulator_value=0.3),
    "NAdam": lambda params: optim.NAdam(params, lr=1e-2),
    "RAdam": lambda params: optim.RAdam(params, lr=1e-2),
}


@pytest.mark.parametrize("given", [False, True], ids=["flat", "given parameters"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_step_is_what_grad_then_step_gives(name, given):
    make = OPTIMIZERS[name]
    model, opt, other, other_opt = _twins(lambda m: make(m.parameters() if given else None))
    step = optim.train_step(_loss, opt)
    for batch in _batches(12):      # enough calls for the autotuner to run every schedule
        np.testing.assert_allclose(step(model, *batch), _separately(other, other_opt, batch), rtol=RTOL)
        assert step.last_fused
    _assert_same(model, opt, other, other_opt)
    if not given:   # the model's arrays are still its parameters: views of the flat buffer
        assert model.fc1.weight.base is opt._flat.params


def test_each_update_runs_right_after_the_product_of_its_gradient():
    model, opt = Net(), optim.Adam(lr=1e-2)
    step = optim.train_step(_loss, opt)
    step(model, *_batches(1)[0])
    nodes = [n for n in step.function.graph.nodes if n.op not in ("input", "const")]
    weights = {id(model.fc1.weight), id(model.fc2.weight)}
    updates = [n for n in nodes if n.op == "fused_update" and len(n.inputs[0].shape) == 2]
    assert len(updates) == len(weights)
    for u in updates:
        producers = {i for i in u.inputs if i.op not in ("input", "const")}
        just_before = nodes[nodes.index(u) - 1]
        assert just_before in producers or any(p in just_before.inputs for p in producers), \
            [n.op for n in nodes[nodes.index(u) - 3:nodes.index(u) + 1]]


def test_parameter_groups_with_their_own_learning_rates_and_a_frozen_layer():
    def make(m):
        return optim.Adam([{"params": m.fc1.parameters(), "lr": 1e-2}, {"params": m.fc2.parameters(), "lr": 1e-3}])
    model, opt, other, other_opt = _twins(make)
    frozen = np.array(model.bn.weight)
    step = optim.train_step(_loss, opt)
    for batch in _batches(4):
        np.testing.assert_allclose(step(model, *batch), _separately(other, other_opt, batch), rtol=RTOL)
    assert step.last_fused
    _assert_same(model, opt, other, other_opt)
    np.testing.assert_array_equal(model.bn.weight, frozen)


def test_a_scheduler_and_a_changed_fixed_option_take_effect_at_the_next_step():
    model, opt, other, other_opt = _twins(lambda m: optim.Adam(lr=1e-2))
    step = optim.train_step(_loss, opt)
    scheds = [optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, other_opt)]
    for k, batch in enumerate(_batches(6)):
        if k == 3:
            opt.param_groups[0]["weight_decay"] = other_opt.param_groups[0]["weight_decay"] = 0.1
        np.testing.assert_allclose(step(model, *batch), _separately(other, other_opt, batch), rtol=RTOL)
        for s in scheds:
            s.step()
    _assert_same(model, opt, other, other_opt)
    assert step.function.traces == 2     # weight decay is compiled in: once more; the lr is an argument


def test_state_and_weights_loaded_between_steps_are_what_the_next_step_starts_from():
    model, opt, other, other_opt = _twins(lambda m: optim.Adam(lr=1e-2))
    step = optim.train_step(_loss, opt)
    batches = _batches(6)
    for batch in batches[:2]:
        step(model, *batch)
        _separately(other, other_opt, batch)
    saved_opt, saved_model = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    for batch in batches[2:4]:
        step(model, *batch)
        _separately(other, other_opt, batch)
    for m, o in ((model, opt), (other, other_opt)):
        o.load_state_dict(copy.deepcopy(saved_opt))
        m.load_state_dict(copy.deepcopy(saved_model))
    for batch in batches[4:]:
        np.testing.assert_allclose(step(model, *batch), _separately(other, other_opt, batch), rtol=RTOL)
        assert step.last_fused
    _assert_same(model, opt, other, other_opt)
    assert model.fc1.weight.base is opt._flat.params     # the loaded arrays moved into a new buffer


def test_parameters_at_different_step_counts_are_updated_separately_with_the_same_result():
    model, opt, other, other_opt = _twins(lambda m: optim.Adam(lr=1e-2))
    batches = _batches(3)
    for m, o in ((model, opt), (other, other_opt)):
        _separately(m, o, batches[0])
        sd = o.state_dict()
        sd["state"]["fc2.bias"]["step"] = 5      # one parameter ahead (a partial load)
        o.load_state_dict(sd)
    step = optim.train_step(_loss, opt)
    for batch in batches[1:]:
        np.testing.assert_allclose(step(model, *batch), _separately(other, other_opt, batch), rtol=RTOL)
        assert step.last_fused is False
    _assert_same(model, opt, other, other_opt)


def test_a_step_run_separately_learns_the_gradient_structure_once(monkeypatch):
    """The fallback does not trace the gradient again at every call."""
    model, opt = Net(), optim.Adam(lr=1e-2)
    _separately(model, opt, _batches(1)[0])
    sd = opt.state_dict()
    sd["state"]["fc2.bias"]["step"] = 5
    opt.load_state_dict(sd)
    step = optim.train_step(_loss, opt)
    traced = []
    real = step._gradient_structure
    monkeypatch.setattr(step, "_gradient_structure", lambda m, a: traced.append(1) or real(m, a))
    for batch in _batches(4):
        step(model, *batch)
        assert step.last_fused is False
    assert len(traced) == 1


def test_a_parameter_without_gradient_is_left_alone_without_state():
    model, opt, other, other_opt = _twins(lambda m: optim.Adam(lr=1e-2), unused=True)
    spare = np.array(model.spare.weight)
    step = optim.train_step(_loss, opt)
    for batch in _batches(3):
        step(model, *batch)
        _separately(other, other_opt, batch)
    assert step.last_fused and not any(k.startswith("spare") for k in opt.state)
    np.testing.assert_array_equal(model.spare.weight, spare)
    _assert_same(model, opt, other, other_opt)


def test_has_aux_returns_the_loss_and_the_aux():
    model, opt, other, other_opt = _twins(lambda m: optim.SGD(lr=0.1, momentum=0.9))
    step = optim.train_step(_loss_with_accuracy, opt, has_aux=True)
    for batch in _batches(3):
        loss, accuracy = step(model, *batch)
        (want_loss, want_accuracy), grads = avalon.grad(_loss_with_accuracy, other, *batch, argnums=0,
                                                        has_aux=True)
        other_opt.step(other, grads[0])
        np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
        assert float(accuracy) == float(want_accuracy)
    _assert_same(model, opt, other, other_opt)


def test_training_matches_torch():
    torch.manual_seed(0)
    tmodel = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    topt = torch.optim.Adam(tmodel.parameters(), lr=1e-2, foreach=False)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    model.load_state_dict({k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()})
    step = optim.train_step(lambda m, x, y: nn.functional.cross_entropy(m(x), y), optim.Adam(lr=1e-2))
    for x, y in _batches(5):
        loss = step(model, x, y)
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(tmodel(torch.tensor(x)), torch.tensor(y))
        tloss.backward()
        topt.step()
        np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5)
    for k, v in tmodel.state_dict().items():
        np.testing.assert_allclose(np.asarray(model.state_dict()[k]), v.numpy(), rtol=1e-4, atol=1e-6, err_msg=k)


def test_a_train_step_inside_a_trace_raises():
    model = Net()
    step = optim.train_step(_loss, optim.Adam(lr=1e-2))
    with pytest.raises(AvalonError, match="cannot run inside avalon.jit"):
        avalon.jit(lambda m, x, y: step(m, x, y))(model, *_batches(1)[0])


def test_what_is_not_an_optimizer_or_a_loss_is_refused():
    with pytest.raises(OptimizerError, match="not an avalon.optim optimizer"):
        optim.train_step(_loss, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))
    with pytest.raises(TypeError, match="not a function"):
        optim.train_step(3, optim.SGD(lr=0.1))


def test_the_first_call_traces_with_the_collector_paused():
    """A full collection in the middle of the first call's traces (10-13 ms with
    PyTorch loaded) would land in the compile time of every first step."""
    import gc
    enabled = []

    def loss(m, x, y):
        enabled.append(gc.isenabled())
        return _loss(m, x, y)
    model, opt = Net(), optim.Adam(lr=1e-3)
    step = optim.train_step(loss, opt)
    assert gc.isenabled()
    step(model, *_batches(1)[0])
    assert step.last_fused and enabled and not any(enabled)
    assert gc.isenabled(), "resumed after"
