"""The repeated flat step: after a flat update (avalon_layers.flat) the next
opt.step(model, grads) runs the same compiled update, bound to its signature,
without collecting the gradients or checking the state again, as long as
nothing the full step decides on has changed.  Each case below runs the same
training twice, once as it runs and once with every step taking the full path,
and the two must agree bit for bit."""
import copy

import numpy as np
import pytest

import avalon
import avalon.nn as nn
import avalon.optim as optim
from avalon.errors import DtypeError
from avalon.testing.calls import record_calls
from avalon_layers import optim as layer_optim


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(avalon.tanh(self.fc1(x)))


def _loss(m, x, y):
    return nn.functional.cross_entropy(m(x), y)


def _grads(model, rng):
    x, y = rng.standard_normal((8, 6)).astype(np.float32), rng.integers(0, 3, 8)
    return avalon.grad(_loss, model, x, y)[1][0]


def _set_lr(model, opt, grads):
    opt.lr = opt.lr * 0.5


def _set_fixed_option(model, opt, grads):
    opt.weight_decay = 0.1      # a static option: the update is traced again


def _replace_array(model, opt, grads):
    model.fc1.bias = np.full(5, 0.25, np.float32)


def _replace_state(model, opt, grads):
    st = opt.state["fc2.weight"]
    name = "exp_avg" if "exp_avg" in st else "momentum_buffer"
    st[name] = np.full_like(st[name], 0.5)


def _reset_step_count(model, opt, grads):
    opt.state["fc1.weight"]["step"] = 0


def _reload(model, opt, grads):
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def _drop_a_gradient(model, opt, grads):
    grads.fc2.bias = None


#: what happens before the 4th step: each changes something the full step reads
EVENTS = {"nothing": None, "lr": _set_lr, "fixed option": _set_fixed_option, "replaced array": _replace_array,
          "replaced state": _replace_state, "step count": _reset_step_count, "load_state_dict": _reload,
          "a gradient None": _drop_a_gradient}

OPTIMIZERS = {"adam": lambda: optim.Adam(lr=1e-2), "sgd": lambda: optim.SGD(lr=0.1, momentum=0.9)}


_START = Net()


def _train(factory, event, steps=7):
    model, opt = copy.deepcopy(_START), factory()
    rng = np.random.default_rng(0)
    for k in range(steps):
        grads = _grads(model, rng)
        if k == 3 and event is not None:
            event(model, opt, grads)
        opt.step(model, grads)
    return model, opt


def _assert_same(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    for (k, v), (_, w) in zip(model_a.named_parameters(), model_b.named_parameters()):
        np.testing.assert_array_equal(v, w, err_msg=k)
    assert opt_a.state.keys() == opt_b.state.keys()
    for path, st in opt_a.state.items():
        assert st["step"] == opt_b.state[path]["step"], path
        for name, value in st.items():
            if name != "step":
                np.testing.assert_array_equal(value, opt_b.state[path][name], err_msg=f"{path} {name}")


@pytest.fixture(params=["copied gradients", "gradients read in place"])
def gradient_mode(request, monkeypatch):
    if request.param == "gradients read in place":
        monkeypatch.setattr(layer_optim, "READ_GRADIENTS_IN_PLACE", 1)
    return request.param


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("event", EVENTS)
def test_repeated_steps_equal_full_steps_bit_for_bit(optimizer, event, gradient_mode, monkeypatch):
    torch_like = _train(OPTIMIZERS[optimizer], EVENTS[event])
    monkeypatch.setattr(layer_optim._RepeatStep, "run", lambda *args: False)
    full = _train(OPTIMIZERS[optimizer], EVENTS[event])
    _assert_same(torch_like, full)


def test_steps_after_the_first_skip_collecting_and_the_signature_lookup(gradient_mode, monkeypatch):
    model, opt = Net(), optim.Adam(lr=1e-2)
    rng = np.random.default_rng(0)
    opt.step(model, _grads(model, rng))
    collected = record_calls(monkeypatch, layer_optim.Optimizer, "_collect")
    looked_up = record_calls(monkeypatch, type(opt.update_fn), "_find")
    for _ in range(3):
        opt.step(model, _grads(model, rng))
    assert collected == [] and looked_up == []
    assert opt.state["fc1.weight"]["step"] == 4


def test_a_gradient_of_another_dtype_raises_as_on_the_full_path(gradient_mode):
    model, opt = Net(), optim.Adam(lr=1e-2)
    rng = np.random.default_rng(0)
    opt.step(model, _grads(model, rng))
    grads = _grads(model, rng)
    grads.fc1.weight = grads.fc1.weight.astype(np.float64)
    before = {k: np.array(v) for k, v in model.named_parameters()}
    with pytest.raises(DtypeError, match="fc1.weight is float64 but the parameter is float32"):
        opt.step(model, grads)
    for k, v in model.named_parameters():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    assert opt.state["fc1.weight"]["step"] == 1


def test_anomaly_mode_turned_on_between_steps_takes_the_full_path(monkeypatch):
    """detect_anomaly compiles checked code: the bound compilation is not it."""
    model, opt = Net(), optim.Adam(lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(2):
        opt.step(model, _grads(model, rng))
    looked_up = record_calls(monkeypatch, type(opt.update_fn), "_find")
    with avalon.detect_anomaly():
        opt.step(model, _grads(model, rng))
    assert looked_up, "the bound update ran"


def test_the_repeated_step_does_not_keep_a_dropped_model_alive():
    import gc
    import weakref
    model, opt = Net(), optim.Adam(lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(2):
        opt.step(model, _grads(model, rng))
    assert opt._repeat is not None
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
