"""Shared checks of the ported PyTorch programs.

Each test in this folder holds a public PyTorch program (condensed to what a
training step runs) next to its line-by-line Avalon port.  Both start from the
same weights (the torch model's state_dict loaded into the Avalon model), run
the same batches, and must agree on the loss, every gradient, and every
parameter after a few optimizer steps.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

RTOL = 1e-4  # float32 programs: summation order differs between the frameworks


def grad_at(grads, dotted: str):
    """The gradient at a parameter's dotted name ("layers.0.weight") in a
    gradient structure that mirrors the model."""
    node = grads
    for part in dotted.split("."):
        if isinstance(node, (list, tuple)):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node[part]
        else:
            node = getattr(node, part)
    return node


def _scale(ref: np.ndarray) -> float:
    return float(np.max(np.abs(ref))) if ref.size else 0.0


def assert_close(actual, expected, what: str, rtol: float = RTOL, scale: float = 0.0) -> None:
    """Elementwise agreement relative to the reference's largest magnitude, or
    to `scale` when that is larger (the magnitude of all gradients or all
    parameters of the model: an entry that is zero in exact arithmetic, such as
    the gradient of a bias before a softmax, carries only float32 rounding noise
    of the others' size)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != torch's {expected.shape}"
    tol = rtol * max(_scale(expected), scale, 1e-12)
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    assert err <= tol, f"{what}: max |avalon - torch| = {err:.3g} > {tol:.3g}"


def _model_scale(tensors) -> float:
    """A hundredth of the largest magnitude among the model's tensors."""
    return 0.01 * max((_scale(t.detach().numpy()) for t in tensors if t is not None), default=0.0)


def assert_same_grads(torch_model, avalon_model, grads, step: int, rtol: float = RTOL) -> None:
    """Every torch parameter's .grad equals Avalon's gradient at the same name
    (None where torch has None)."""
    names = [n for n, _ in avalon_model.named_parameters()]
    torch_params = dict(torch_model.named_parameters())
    assert names == list(torch_params), "parameter names or order differ from torch's"
    scale = _model_scale(p.grad for p in torch_params.values())
    for name, p in torch_params.items():
        g = grad_at(grads, name)
        if p.grad is None:
            assert g is None, f"step {step}: {name} has a gradient in Avalon and none in torch"
            continue
        assert g is not None, f"step {step}: {name} has no gradient in Avalon"
        assert_close(g, p.grad.detach().numpy(), f"step {step}: gradient of {name}", rtol, scale)


def assert_same_params(torch_model, avalon_model, step: int, rtol: float = RTOL, zero_grad=None) -> None:
    """Every parameter equals torch's.  zero_grad: {name: (index, bound)} for entries
    whose gradient is zero in exact arithmetic (a bias before a softmax, which
    shifts every score alike): Adam divides their rounding noise by its own
    size, so they may move by up to the learning rate per step in either
    framework; they are checked against `bound`, and their torch gradient
    against noise level."""
    mine = dict(avalon_model.named_parameters())
    scale = _model_scale(torch_model.parameters())
    zero_grad = zero_grad or {}
    for name, p in torch_model.named_parameters():
        ours, theirs = np.asarray(mine[name], np.float64), p.detach().numpy().astype(np.float64)
        what = f"after step {step}: parameter {name}"
        if name in zero_grad:
            index, bound = zero_grad[name]
            noise = np.zeros(theirs.shape, bool)
            noise[index] = True
            grad = p.grad.detach().numpy() if p.grad is not None else np.zeros(theirs.shape)
            assert np.abs(grad[noise]).max(initial=0.0) <= 1e-6 * max(_scale(grad), 1.0), \
                f"{name}: the entries declared zero-gradient have a real gradient in torch"
            assert np.abs(ours[noise] - theirs[noise]).max(initial=0.0) <= bound, what + " (zero-gradient entries)"
            ours, theirs = ours[~noise], theirs[~noise]
        assert_close(ours, theirs, what, rtol, scale)


def assert_same_loss(loss, torch_loss, step: int, rtol: float = RTOL) -> None:
    assert_close(np.asarray(loss), torch_loss.detach().numpy(), f"step {step}: loss", rtol)


@pytest.fixture
def check():
    """The comparisons above, for the tests of this folder."""
    torch.manual_seed(0)
    return SimpleNamespace(grad_at=grad_at, close=assert_close, grads=assert_same_grads,
                           params=assert_same_params, loss=assert_same_loss)
