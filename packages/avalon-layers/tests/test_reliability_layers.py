"""Reliability of avalon-layers under bad input: load_state_dict checks every
key, shape and dtype before changing anything; layers name the layer, the
argument and the type when given a torch tensor, a list or another non-array;
optimizers and schedulers refuse hyperparameters PyTorch refuses (and learning
rates a schedule would drive negative), leaving the optimizer as it was."""
import math
import re
import warnings

import numpy as np
import pytest
import torch

import avalon
import avalon.nn as nn
import avalon.optim as optim

THIS_FILE = "test_reliability_layers.py"


def _located(message: str) -> bool:
    """Whether an error message points at a line of this file."""
    return f"{THIS_FILE}:" in message


# -- A. load_state_dict validates everything before changing anything -----------------------------------------

class Tiny(nn.Module):
    """A parameter, a child with a parameter, a float buffer and (last) an int buffer."""

    def __init__(self, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.weight = nn.Parameter(rng.standard_normal((3, 4)).astype(np.float32))
        self.head = Head(rng)


class Head(nn.Module):
    def __init__(self, rng):
        super().__init__()
        self.bias = nn.Parameter(rng.standard_normal(3).astype(np.float32))
        self.register_buffer("running_mean", rng.standard_normal(3).astype(np.float32))
        self.register_buffer("num_batches_tracked", np.array(7, np.int64))


def _snapshot(model):
    return {k: (v, v.copy()) for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    now = model.state_dict()
    assert list(now) == list(snapshot)
    for key, (obj, copy) in snapshot.items():
        assert now[key] is obj, f"{key} was replaced"
        assert now[key].dtype == copy.dtype and now[key].tobytes() == copy.tobytes(), f"{key} changed"


def _state_with_last(model, value):
    """A state dict of another model with good values everywhere but the last key."""
    state = {k: v.copy() for k, v in Tiny(seed=9).state_dict().items()}
    last = list(state)[-1]
    assert last == "head.num_batches_tracked"
    state[last] = value
    return state


@pytest.mark.parametrize("value, words", [
    (np.array(2.5), ["head.num_batches_tracked", "int64", "float64", "non-integer"]),
    (np.array(np.nan), ["head.num_batches_tracked", "non-integer"]),
    (np.array(2.0 ** 70), ["head.num_batches_tracked", "outside the range of int64"]),
    (np.array("seven"), ["head.num_batches_tracked", "not numbers"]),
    (np.array(b"7"), ["head.num_batches_tracked", "not numbers"]),
    (np.array(object()), ["head.num_batches_tracked", "not numbers"]),
    (np.array(7 + 1j), ["head.num_batches_tracked", "complex"]),
    ([1, [2, 3]], ["head.num_batches_tracked", "not an array"]),
], ids=["fraction", "nan", "overflow", "str", "bytes", "object", "complex", "ragged-list"])
def test_a_bad_last_value_leaves_every_earlier_key_as_it_was(value, words):
    model = Tiny()
    before = _snapshot(model)
    with pytest.raises(avalon.DtypeError) as err:
        model.load_state_dict(_state_with_last(model, value))
    message = str(err.value)
    for word in words:
        assert word in message, message
    assert "Tiny" in message and _located(message)
    _assert_unchanged(model, before)


def test_a_complex_value_for_a_float_parameter_is_refused():
    model = Tiny()
    before = _snapshot(model)
    state = {k: v.copy() for k, v in model.state_dict().items()}
    state["head.running_mean"] = state["head.running_mean"] + 1j
    with pytest.raises(avalon.DtypeError, match=r"head.running_mean: model float32, given complex\d+ .*complex"):
        model.load_state_dict(state)
    _assert_unchanged(model, before)


def test_a_float64_that_overflows_float16_is_refused():
    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(np.zeros(2, np.float16))

    model = Half()
    with pytest.raises(avalon.DtypeError, match="outside the range of float16"):
        model.load_state_dict({"w": np.array([1.0, 1e6])})
    model.load_state_dict({"w": np.array([1.0, np.inf])})  # an infinity stays an infinity: nothing lost
    assert model.w.dtype == np.float16 and model.w[1] == np.inf


def test_every_problem_is_listed_in_one_error():
    model = Tiny()
    state = _state_with_last(model, np.array(2.5))
    state["weight"] = np.zeros((4, 3), np.float32)
    with pytest.raises(avalon.ShapeError) as err:
        model.load_state_dict(state)
    message = str(err.value)
    assert "mis-shaped keys: weight: model (3, 4), given (4, 3)" in message
    assert "head.num_batches_tracked" in message and "non-integer" in message


def test_lossless_conversions_still_load():
    model = Tiny()
    source = Tiny(seed=3)
    state = {k: v.astype(np.float64) for k, v in source.state_dict().items()}  # float64 for float32
    state["head.num_batches_tracked"] = np.array(11.0)  # an integral float for the int buffer
    model.load_state_dict(state)
    np.testing.assert_array_equal(model.weight, source.weight)
    assert model.weight.dtype == np.float32
    assert model.head.num_batches_tracked.dtype == np.int64 and model.head.num_batches_tracked == 11


def test_torch_tensors_load_including_bfloat16():
    model = Tiny()
    source = Tiny(seed=4)
    state = {k: torch.from_numpy(v.copy()) for k, v in source.state_dict().items()}
    state["weight"] = state["weight"].to(torch.bfloat16)  # NumPy has no bfloat16: widened, losslessly
    model.load_state_dict(state)
    np.testing.assert_array_equal(model.weight, state["weight"].float().numpy())
    np.testing.assert_array_equal(model.head.bias, source.head.bias)


def test_loaded_arrays_are_copies_not_views_of_the_given_dict():
    model = Tiny()
    state = {k: v.copy() for k, v in Tiny(seed=5).state_dict().items()}
    model.load_state_dict(state)
    state["weight"][...] = 0  # changing the dict afterwards must not change the model
    assert np.all(model.weight != 0)


# -- B. bad input to a layer ------------------------------------------------------------------------------

LINEAR = "Linear(in_features=4, out_features=2, bias=True)"


def _input_error(call, *words):
    with pytest.raises(avalon.AvalonError) as err:
        call()
    assert isinstance(err.value, TypeError)
    message = str(err.value)
    for word in words:
        assert word in message, message
    assert _located(message), message
    return message


def test_a_torch_tensor_names_the_layer_the_argument_and_the_fix():
    layer = nn.Linear(4, 2)
    _input_error(lambda: layer(torch.ones(2, 4)), LINEAR, "got a torch.Tensor as input", "tensor.numpy()")
    _input_error(lambda: layer(input=torch.ones(2, 4)), "torch.Tensor as input")


def test_a_python_list_or_other_non_array_is_named():
    layer = nn.Linear(4, 2)
    _input_error(lambda: layer([[1.0, 2.0, 3.0, 4.0]]), LINEAR, "got a Python list as input", "np.asarray")
    _input_error(lambda: layer((1.0, 2.0, 3.0, 4.0)), "got a Python tuple as input")
    _input_error(lambda: layer("x"), "got a str as input")
    _input_error(lambda: layer(None), "got None as input")
    _input_error(lambda: nn.ReLU()([1.0, -2.0]), "ReLU() got a Python list as input")


def test_a_loss_names_the_target():
    x = np.ones(3, np.float32)
    _input_error(lambda: nn.MSELoss()(x, torch.ones(3)), "MSELoss", "torch.Tensor as target")
    _input_error(lambda: nn.MSELoss()(x.tolist(), x), "MSELoss", "Python list as input")
    # a target may be a list, which the losses convert (as F.mse_loss does)
    assert nn.MSELoss()(x, [1.0, 1.0, 1.0]) == 0


def test_a_torch_tensor_in_a_recurrent_state_is_named():
    x = np.ones((4, 1, 3), np.float32)
    h = np.zeros((1, 1, 2), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LSTM is experimental
        lstm = nn.LSTM(3, 2)
        _input_error(lambda: lstm(x, (torch.zeros(1, 1, 2), h)), "LSTM(", "torch.Tensor inside hx")
        lstm(x, [h, h])  # a list holding arrays is still a valid state, as in PyTorch


def test_inside_a_user_model_the_error_points_at_the_users_line():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    message = _input_error(lambda: Model()(torch.ones(1, 4)), "Model() got a torch.Tensor as x")
    assert _located(message)
    message = _input_error(lambda: Model()([[1.0, 2.0, 3.0, 4.0]]), LINEAR, "Python list as input")


def test_arrays_scalars_and_tracers_keep_working():
    assert nn.ReLU()(3.0) == 3.0
    assert nn.Tanh()(np.float32(0.5)) == np.tanh(np.float32(0.5))
    layer = nn.Linear(4, 2)
    x = np.ones((3, 4), np.float32)
    eager = layer(x)
    np.testing.assert_allclose(avalon.jit(lambda m, v: m(v))(layer, x), eager, rtol=1e-6)
    loss, (grads, _) = avalon.grad(lambda m, v: avalon.sum(m(v)), layer, x)
    assert grads.weight.shape == (2, 4)
    assert nn.Identity()([1, 2]) == [1, 2]  # Identity returns anything, as torch.nn.Identity does
    assert nn.Sequential(nn.Identity())("anything") == "anything"


def test_user_models_take_what_they_like_but_never_a_torch_tensor():
    class Pair(nn.Module):
        def forward(self, input, scale=1.0):
            a, b = input
            return (a + b) * scale

    a = np.ones(2, np.float32)
    np.testing.assert_array_equal(Pair()((a, a), scale=2.0), np.full(2, 4, np.float32))
    _input_error(lambda: Pair()((a, torch.ones(2))), "Pair() got a torch.Tensor inside input")


# -- C. optimizer and scheduler arguments --------------------------------------------------------------------

@pytest.mark.parametrize("make, words", [
    (lambda: optim.SGD(lr=-1.0), ["SGD", "Invalid lr (learning rate): -1.0", "lr=0.001"]),
    (lambda: optim.Adam(lr=float("nan")), ["Invalid lr (learning rate): nan", "finite"]),
    (lambda: optim.Adam(lr="0.1"), ["Invalid lr (learning rate): '0.1'", "a number"]),
    (lambda: optim.Adam(eps=-1e-8), ["Invalid epsilon value: -1e-08", "eps=1e-08"]),
    (lambda: optim.Adam(betas=(0.9,)), ["Invalid betas: (0.9,)", "pair"]),
    (lambda: optim.Adam(betas=0.9), ["Invalid betas: 0.9", "pair"]),
    (lambda: optim.Adam(betas=(0.9, 0.999, 0.5)), ["Invalid betas"]),
    (lambda: optim.Adam(betas=(-0.1, 0.999)), ["Invalid beta parameter at index 0: -0.1", "[0, 1)"]),
    (lambda: optim.AdamW(betas=(0.9, 1.0)), ["AdamW", "Invalid beta parameter at index 1: 1.0"]),
    (lambda: optim.AdamW(weight_decay=-0.01), ["Invalid weight_decay value: -0.01"]),
    (lambda: optim.SGD(lr=0.1, momentum=-0.9), ["Invalid momentum value: -0.9"]),
    (lambda: optim.SGD(lr=0.1, dampening=float("inf")), ["Invalid dampening value: inf"]),
    (lambda: optim.RMSprop(alpha=-0.5), ["Invalid alpha value: -0.5"]),
    (lambda: optim.RMSprop(momentum=-1), ["Invalid momentum value: -1"]),
    (lambda: optim.Adagrad(lr_decay=-1), ["Invalid lr_decay value: -1"]),
    (lambda: optim.Adagrad(initial_accumulator_value=-1), ["Invalid initial_accumulator_value value: -1"]),
], ids=lambda v: None if callable(v) else v[0])
def test_bad_hyperparameters_are_refused_like_pytorch(make, words):
    with pytest.raises(avalon.AvalonError) as err:
        make()
    assert isinstance(err.value, ValueError)
    message = str(err.value)
    for word in words:
        assert word in message, message
    assert _located(message), message


def test_pytorch_refuses_the_same_values():
    p = [torch.zeros(1, requires_grad=True)]
    for make in (lambda: torch.optim.SGD(p, lr=-1.0), lambda: torch.optim.Adam(p, eps=-1e-8),
                 lambda: torch.optim.Adam(p, betas=(0.9, 1.0)), lambda: torch.optim.SGD(p, lr=0.1, momentum=-0.9),
                 lambda: torch.optim.RMSprop(p, alpha=-0.5), lambda: torch.optim.Adagrad(p, lr_decay=-1)):
        with pytest.raises(ValueError, match="Invalid"):
            make()


def test_parameters_given_in_a_form_pytorch_refuses_are_explained():
    model = nn.Linear(2, 2)
    for make, words in [(lambda: optim.Adam([]), "an empty parameter list"),
                        (lambda: optim.SGD(lr=[]), "the parameters come first"),
                        (lambda: optim.SGD(model, lr=0.1, momentum=0.9), "pass model.parameters()")]:
        with pytest.raises(avalon.AvalonError, match=re.escape(words)) as err:
            make()
        assert _located(str(err.value))
    assert optim.Adam(model.parameters()).param_groups[0]["params"] == model.parameters()


def test_a_model_without_parameters_is_an_empty_parameter_list():
    opt = optim.SGD(lr=0.1)
    with pytest.raises(avalon.AvalonError, match="empty parameter list"):
        opt.step({"counts": np.arange(3)}, {"counts": None})
    assert opt.state == {}


def test_load_state_dict_checks_every_hyperparameter_before_setting_any():
    opt = optim.Adam(lr=0.01)
    state = optim.Adam(lr=0.5, eps=1e-6).state_dict()
    state["hyperparameters"]["betas"] = (0.9, 1.5)
    with pytest.raises(avalon.AvalonError, match="Invalid beta parameter at index 1: 1.5"):
        opt.load_state_dict(state)
    assert (opt.lr, opt.eps, opt.betas) == (0.01, 1e-8, (0.9, 0.999))
    state["hyperparameters"]["betas"] = (0.9, 0.99)
    state["hyperparameters"]["nonsense"] = 1
    with pytest.raises(avalon.AvalonError, match="unknown hyperparameter 'nonsense'"):
        opt.load_state_dict(state)
    assert (opt.lr, opt.eps, opt.betas) == (0.01, 1e-8, (0.9, 0.999))


@pytest.mark.parametrize("make, words", [
    (lambda o: optim.StepLR(o, step_size=2, gamma=-0.5), ["StepLR", "Invalid gamma: -0.5", "negative"]),
    (lambda o: optim.ExponentialLR(o, gamma=-0.9), ["ExponentialLR", "Invalid gamma: -0.9"]),
    (lambda o: optim.ExponentialLR(o, gamma=float("nan")), ["Invalid gamma: nan"]),
    (lambda o: optim.CosineAnnealingLR(o, T_max=5, eta_min=-0.01), ["Invalid eta_min: -0.01", "negative"]),
])
def test_a_schedule_that_would_go_negative_is_refused_at_construction(make, words):
    opt = optim.SGD(lr=0.1)
    with pytest.raises(avalon.AvalonError) as err:
        make(opt)
    for word in words:
        assert word in str(err.value), str(err.value)
    assert _located(str(err.value))
    assert opt.lr == 0.1 and not hasattr(opt, "initial_lr")  # the optimizer is as it was


def test_a_step_that_would_make_lr_negative_is_refused_and_changes_nothing():
    class Falling(optim.LRScheduler):
        """lr - 0.125 per epoch (exact in binary): 0.25, 0.125, 0.0, then negative."""

        def get_lr(self):
            return [self.optimizer.lr if self.last_epoch == 0 else self.optimizer.lr - 0.125]

    opt = optim.SGD(lr=0.25)
    sched = Falling(opt)
    sched.step()
    sched.step()
    lr, epoch = opt.lr, sched.last_epoch
    assert lr == 0.0
    with pytest.raises(avalon.AvalonError, match=r"Falling.step: the new learning rate would be -0.125 .*keeps lr=0.0"):
        sched.step()
    assert opt.lr == lr and sched.last_epoch == epoch and sched.get_last_lr() == [lr]


def test_valid_schedules_still_match_pytorch():
    opt = optim.SGD(lr=0.2)
    topt = torch.optim.SGD([torch.zeros(1)], lr=0.2)
    ours = optim.CosineAnnealingLR(opt, T_max=3, eta_min=0.0)
    theirs = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=3, eta_min=0.0)
    for _ in range(8):
        topt.step()
        ours.step()
        theirs.step()
        assert opt.lr >= 0
        assert math.isclose(opt.lr, theirs.get_last_lr()[0], rel_tol=1e-12, abs_tol=1e-15)
