"""avalon.grad / value_and_grad with has_aux=True: the function returns
(value, aux); aux comes back from the same compiled step, undifferentiated."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import avalon


def _loss_and_state(w, x, h):
    new_h = avalon.tanh(x @ w + h)
    return avalon.sum(new_h * new_h), {"h": new_h, "mean": avalon.mean(new_h), "step": 3}


def test_aux_comes_back_with_the_value_and_gradients_match_torch():
    rng = np.random.default_rng(0)
    w, x, h = (rng.standard_normal(s).astype(np.float32) for s in ((3, 4), (2, 3), (2, 4)))
    f = avalon.value_and_grad(_loss_and_state, argnums=0, has_aux=True)
    (value, aux), (gw, gx, gh) = f(w, x, h)
    tw = torch.tensor(w, requires_grad=True)
    th = torch.tanh(torch.tensor(x) @ tw + torch.tensor(h))
    (th * th).sum().backward()
    np.testing.assert_allclose(value, (th * th).sum().item(), rtol=1e-6)
    np.testing.assert_allclose(aux["h"], th.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(aux["mean"], th.mean().item(), rtol=1e-6)
    assert aux["step"] == 3 and gx is None and gh is None
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-5)
    f(w, x, h)
    assert f.traces == 1, "a second call with the same signature must not retrace"


def test_has_aux_is_a_separate_compiled_function():
    def loss(w):
        return avalon.sum(w * w), w * 2.0
    w = np.ones(3, np.float32)
    assert avalon.value_and_grad(loss, has_aux=True) is not avalon.value_and_grad(loss)
    (value, doubled), (g,) = avalon.grad(loss, w, has_aux=True)
    np.testing.assert_array_equal(doubled, 2 * w)
    np.testing.assert_array_equal(g, 2 * w)


@pytest.mark.parametrize("returned", [lambda w: avalon.sum(w), lambda w: (avalon.sum(w), w, w),
                                      lambda w: (1.0, w)], ids=["no pair", "triple", "python value"])
def test_a_function_that_does_not_return_a_pair_is_refused(returned):
    with pytest.raises(avalon.AvalonError, match="has_aux"):
        avalon.grad(returned, np.ones(3, np.float32), has_aux=True)


def test_returning_more_than_one_value_without_has_aux_says_to_use_it():
    with pytest.raises(avalon.AvalonError, match="has_aux=True"):
        avalon.grad(lambda w: (avalon.sum(w), w), np.ones(3, np.float32))


def test_has_aux_inside_another_gradient():
    def inner(w):
        return avalon.sum(w * w * w), avalon.sum(w)

    def outer(w):
        (value, total), (g,) = avalon.grad(inner, w, has_aux=True)
        return avalon.sum(g) + total

    w = np.array([1.0, 2.0, 3.0])
    _, (gg,) = avalon.grad(outer, w)
    np.testing.assert_allclose(gg, 6 * w + 1)   # d/dw (sum 3w^2 + sum w)
