"""Flat parameter buffers: an optimizer's first step on an nn.Module moves the
parameters it updates into one buffer (the model's arrays become views of it)
and updates them, their gradients and its state as a few long arrays."""
import copy

import numpy as np
import pytest

import avalon
import avalon.nn as nn
import avalon.optim as optim
from avalon import tree


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(avalon.tanh(self.bn(self.fc1(x))))


def _loss(m, x, y):
    return nn.functional.cross_entropy(m(x), y)


def _batch(rng):
    return rng.standard_normal((8, 6)).astype(np.float32), rng.integers(0, 3, 8)


def _params(model):
    return dict(model.named_parameters())


def _train(model, opt, steps, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        _, (g, _, _) = avalon.grad(_loss, model, *_batch(rng))
        opt.step(model, g)


def _per_parameter_reference(model, opt_factory, steps, seed=0):
    """The same training with the per-parameter update (a plain dict of the
    arrays: not a Module, so never flat)."""
    rng = np.random.default_rng(seed)
    opt = opt_factory()
    arrays = {k: np.array(v) for k, v in _params(model).items()}
    for _ in range(steps):
        x, y = _batch(rng)
        for k, v in arrays.items():
            model_attr(model, k)[...] = v
        _, (g, _, _) = avalon.grad(_loss, model, x, y)
        grads = dict(g.named_parameters())
        opt.step(arrays, {k: grads[k] for k in arrays})
    return arrays


def model_attr(model, path):
    mod, _, attr = path.rpartition(".")
    return getattr(dict(model.named_modules())[mod], attr)


@pytest.mark.parametrize("factory", [lambda: optim.Adam(lr=1e-2), lambda: optim.SGD(lr=0.1, momentum=0.9),
                                     lambda: optim.RMSprop(lr=1e-2, centered=True),
                                     lambda: optim.Adam(lr=1e-2, amsgrad=True),
                                     lambda: optim.Adagrad(lr=0.1, initial_accumulator_value=0.3)])
def test_flat_update_equals_the_per_parameter_update_bit_for_bit(factory):
    model = Net()
    reference_model = copy.deepcopy(model)
    opt = factory()
    _train(model, opt, 4)
    expected = _per_parameter_reference(reference_model, factory, 4)
    for k, v in _params(model).items():
        np.testing.assert_array_equal(v, expected[k], err_msg=k)


@pytest.mark.parametrize("factory", [lambda: optim.Adam(lr=1e-2), lambda: optim.SGD(lr=0.1, momentum=0.9)])
def test_large_parameters_read_their_gradients_in_place_with_the_same_bits(factory, monkeypatch):
    """Parameters of many elements each: the update reads each gradient where the
    gradient step wrote it (no copy into the flat gradient buffer), one kernel per
    parameter over the flat buffers' views; the result is the copying update's."""
    from avalon_layers import flat, optim as layer_optim
    model = Net()
    copied, copied_opt = copy.deepcopy(model), factory()
    _train(copied, copied_opt, 3)
    monkeypatch.setattr(layer_optim, "READ_GRADIENTS_IN_PLACE", 1)

    def no_copy(self, entries):
        raise AssertionError("the gradients were copied into the flat buffer")
    monkeypatch.setattr(flat.FlatGroup, "gather_gradients", no_copy)
    opt = factory()
    _train(model, opt, 3)
    for k, v in _params(model).items():
        np.testing.assert_array_equal(v, _params(copied)[k], err_msg=k)
        assert v.base is opt._flat.params        # still views of the flat buffer
    for path, st in opt.state.items():
        for name, value in st.items():
            if name != "step":
                np.testing.assert_array_equal(value, copied_opt.state[path][name], err_msg=f"{path} {name}")


def test_the_models_arrays_are_views_of_one_buffer_and_stay_its_parameters():
    model, opt = Net(), optim.Adam(lr=1e-2)
    _train(model, opt, 1)
    params = _params(model)
    flat = opt._flat.params
    assert all(p.base is flat for p in params.values())
    assert flat.size == sum(p.size for p in params.values())
    ids = {k: id(p) for k, p in params.items()}
    before = {k: p.copy() for k, p in params.items()}
    _train(model, opt, 2, seed=1)
    assert {k: id(p) for k, p in _params(model).items()} == ids        # updated in place
    assert all(not np.array_equal(p, before[k]) for k, p in _params(model).items())
    # buffers (BatchNorm's running statistics) are not moved, and the state is flat too
    assert model.bn.running_mean.base is None
    for path, st in opt.state.items():
        assert st["exp_avg"].base is opt._flat.states["exp_avg"] and st["step"] == 3


def test_replaced_arrays_are_noticed_and_training_goes_on_from_them():
    model, opt = Net(), optim.Adam(lr=1e-2)
    _train(model, opt, 2)
    saved = {k: np.array(v) for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    _train(model, opt, 3, seed=5)
    # back to the saved point: load_state_dict replaces the arrays, then train on
    model.load_state_dict(saved)
    opt.load_state_dict(opt_state)
    _train(model, opt, 2, seed=7)
    fresh, fresh_opt = Net(), optim.Adam(lr=1e-2)
    fresh.load_state_dict(saved)
    fresh_opt.load_state_dict(opt_state)
    _train(fresh, fresh_opt, 2, seed=7)
    for k, v in _params(model).items():
        np.testing.assert_array_equal(v, _params(fresh)[k], err_msg=k)
        assert v.base is opt._flat.params


def test_tied_weights_keep_the_per_parameter_update():
    model = Net()
    model.fc2.weight = model.fc2.weight  # noqa: PLW0127 (a plain re-assignment: no tie)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    opt = optim.SGD(lr=0.1)
    x = np.ones((2, 4), np.float32)
    _, (g, _) = avalon.grad(lambda m, x: m(x).sum(), tied, x)
    opt.step(tied, g)
    assert opt._flat is None and tied[1].weight is tied[0].weight


def test_a_model_that_is_not_a_module_is_updated_per_parameter():
    arrays = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    ids = {k: id(v) for k, v in arrays.items()}
    opt = optim.Adam(lr=0.1)
    opt.step(arrays, {"w": np.ones((3, 2), np.float32), "b": np.ones(2, np.float32)})
    assert opt._flat is None and {k: id(v) for k, v in arrays.items()} == ids
    assert tree.flatten(arrays)[0][0][0, 0] != 1.0


def test_state_loaded_before_the_first_step_is_what_the_flat_buffers_start_from():
    """Fresh zero state is not copied into the flat buffers (they start zeroed);
    state loaded before the first step is."""
    model = Net()
    reference_model = copy.deepcopy(model)
    opt, reference = optim.Adam(lr=1e-2), optim.Adam(lr=1e-2)
    _train(reference_model, reference, 1)
    loaded = copy.deepcopy(reference.state_dict())
    opt.load_state_dict(loaded)
    for k, v in _params(reference_model).items():
        model_attr(model, k)[...] = v
    _train(model, opt, 2, seed=1)
    _train(reference_model, reference, 2, seed=1)
    for k, v in _params(model).items():
        np.testing.assert_array_equal(v, _params(reference_model)[k], err_msg=k)
    for path, st in opt.state.items():
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(st[name], reference.state[path][name], err_msg=f"{path} {name}")
            assert st[name].base is opt._flat.states[name]
