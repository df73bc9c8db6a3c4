"""avalon.nn.utils.clip_grad_norm_ / clip_grad_value_ clip Avalon's gradient
structures in place exactly as torch.nn.utils clips p.grad."""
import math

import numpy as np
import pytest
import torch

import avalon
import avalon.nn as nn
import avalon.nn.functional as F
from avalon.nn.utils import clip_grad_norm_, clip_grad_value_


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(avalon.tanh(self.fc1(x)))


def _model_grads(scale):
    rng = np.random.default_rng(0)
    model = Net()
    x, y = rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32) * scale
    _, grads = avalon.grad(lambda m, x, y: F.mse_loss(m(x), y), model, x, y)
    return grads[0]


def _arrays(g):
    return [a for _, a in g.named_parameters()]


@pytest.mark.parametrize("norm_type", [2.0, 1, 3.0, math.inf, "inf"])
@pytest.mark.parametrize("max_norm", [0.05, 1e4])
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    g = _model_grads(scale=10.0)
    tparams = [torch.zeros(a.shape, requires_grad=True) for a in _arrays(g)]
    for t, a in zip(tparams, _arrays(g)):
        t.grad = torch.tensor(a.copy())
    arrays = _arrays(g)
    total = clip_grad_norm_(g, max_norm, norm_type=norm_type)
    ttotal = torch.nn.utils.clip_grad_norm_(tparams, max_norm, norm_type=norm_type, foreach=False)
    np.testing.assert_allclose(float(total), ttotal.item(), rtol=1e-6)
    assert all(a is b for a, b in zip(arrays, _arrays(g)))  # in place
    for a, t in zip(_arrays(g), tparams):
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-6, atol=1e-8)
    if max_norm < 1:
        assert float(total) > max_norm  # this case did clip


def test_none_gradients_are_skipped_and_plain_tuples_work():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(4), rng.standard_normal((2, 3))
    ta, tb = torch.zeros(4, dtype=torch.float64, requires_grad=True), torch.zeros((2, 3), dtype=torch.float64,
                                                                                 requires_grad=True)
    ta.grad, tb.grad = torch.tensor(a.copy()), torch.tensor(b.copy())
    skipped = torch.zeros(2, requires_grad=True)  # no grad: torch skips it
    grads = (a, None, b, a)  # None skipped; the same array twice is clipped once
    total = clip_grad_norm_(grads, 0.5)
    ttotal = torch.nn.utils.clip_grad_norm_([ta, skipped, tb], 0.5)
    np.testing.assert_allclose(float(total), ttotal.item(), rtol=1e-12)
    np.testing.assert_allclose(a, ta.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(b, tb.grad.numpy(), rtol=1e-12)
    assert float(clip_grad_norm_((None,), 1.0)) == 0.0


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # inf * 0 is NaN, in torch too
def test_error_if_nonfinite_raises_and_changes_nothing():
    g = (np.array([1.0, np.inf], np.float32), np.ones(2, np.float32))
    before = [x.copy() for x in g]
    with pytest.raises(RuntimeError, match="non-finite, so it cannot be clipped"):
        clip_grad_norm_(g, 1.0, error_if_nonfinite=True)
    for x, y in zip(g, before):
        np.testing.assert_array_equal(x, y)
    tp = [torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True)]
    tp[0].grad, tp[1].grad = torch.tensor(before[0].copy()), torch.tensor(before[1].copy())
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(tp, 1.0, error_if_nonfinite=True)
    total = clip_grad_norm_(g, 1.0)  # without the flag: scaled by the infinite norm, as torch does
    ttotal = torch.nn.utils.clip_grad_norm_(tp, 1.0)
    assert math.isinf(float(total)) and math.isinf(ttotal.item())
    np.testing.assert_array_equal(g[1], tp[1].grad.numpy())


@pytest.mark.parametrize("clip_value", [0.01, 0.5, 100.0])
def test_clip_grad_value_matches_torch(clip_value):
    g = _model_grads(scale=10.0)
    tparams = [torch.zeros(a.shape, requires_grad=True) for a in _arrays(g)]
    for t, a in zip(tparams, _arrays(g)):
        t.grad = torch.tensor(a.copy())
    assert clip_grad_value_(g, clip_value) is None
    torch.nn.utils.clip_grad_value_(tparams, clip_value, foreach=False)
    for a, t in zip(_arrays(g), tparams):
        np.testing.assert_array_equal(a, t.grad.numpy())


def test_a_new_max_norm_does_not_retrace_and_bad_arguments_are_refused():
    from avalon_layers import clip_grad
    clip_grad_norm_(_model_grads(scale=10.0), 0.1)
    traces = clip_grad._SCALE.traces, clip_grad._TOTAL_NORM.traces
    for max_norm in (0.2, 0.3):
        clip_grad_norm_(_model_grads(scale=10.0), max_norm)
    assert (clip_grad._SCALE.traces, clip_grad._TOTAL_NORM.traces) == traces
    with pytest.raises(avalon.AvalonError, match="norm_type=0"):
        clip_grad_norm_((np.ones(2),), 1.0, norm_type=0)
    with pytest.raises(avalon.AvalonError, match="max_norm must be a number"):
        clip_grad_norm_((np.ones(2),), "big")
    with pytest.raises(avalon.AvalonError, match="int64 array"):
        clip_grad_value_((np.ones(2, np.int64),), 1.0)


def test_reachable_as_torch_spells_it():
    from avalon_layers.registry import LEVELS
    assert avalon.nn.utils.clip_grad_norm_ is clip_grad_norm_
    assert "clip_grad_value_" in dir(avalon.nn.utils)
    assert LEVELS[("utils", "clip_grad_norm_")] == ("Optimizers", "stable")
    assert avalon.stability()["symbols"]["avalon.nn.utils.clip_grad_value_"] == ("Optimizers", "stable")
