"""A stack of matrices times one matrix (a linear layer on (N, S, F) inputs, a
recurrent layer's input projection over all its time steps) is traced as one
2-D product over all the rows, reshaped back: one GEMM, and in reverse mode the
matrix's gradient is one product too, not a batched product summed over the
stack.  Values and gradients agree with PyTorch; errors still name the user's
shapes; the batch split across threads still applies."""
import numpy as np
import pytest
import torch

import avalon
from avalon import parallel
from avalon.errors import ShapeError

rng = np.random.default_rng(9)


def loss(a, b):
    return avalon.sum(avalon.tanh(a @ b))


def _products(graph):
    return [n for n in graph.nodes if n.op == "matmul"]


@pytest.mark.parametrize("lead", [(5,), (2, 3), (4, 0)], ids=lambda s: "x".join(map(str, s)) or "-")
def test_the_product_and_both_gradients_are_two_dimensional(lead):
    a = rng.standard_normal(lead + (7, 3))
    b = rng.standard_normal((3, 4))
    graph = avalon.trace(avalon.value_and_grad(loss, argnums=(0, 1)), a, b)
    assert _products(graph) and all(m.ndim == 2 for m in _products(graph))
    value, (ga, gb) = avalon.value_and_grad(loss, argnums=(0, 1))(a, b)
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    want = torch.tanh(ta @ tb).sum()
    want.backward()
    np.testing.assert_allclose(value, want.item(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ga, ta.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_a_strided_stack_gives_numpys_product():
    x = rng.standard_normal((6, 5, 3)).astype(np.float32)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    got = avalon.jit(lambda x, w: avalon.swapaxes(x, 0, 1) @ w.T)(x, w)
    np.testing.assert_allclose(got, np.swapaxes(x, 0, 1) @ w.T, rtol=1e-5, atol=1e-5)
    assert got.shape == (5, 6, 4)


def test_a_misaligned_product_names_the_users_shapes():
    with pytest.raises(ShapeError, match=r"shapes \(5, 7, 3\) and \(5, 4\) do not align"):
        avalon.jit(lambda a, b: a @ b)(np.zeros((5, 7, 3)), np.zeros((5, 4)))


def test_a_recurrent_projection_still_splits_across_threads(monkeypatch):
    # the batch is the stack's second axis: merged into the rows, it stays a
    # split axis (strided), and the weight's gradient is a sum of the shares
    monkeypatch.setattr(parallel, "MIN_SHARD_ELEMENTS", 0)
    x = rng.standard_normal((8, 6, 5)).astype(np.float32)       # (batch, steps, features)
    w = rng.standard_normal((4, 5)).astype(np.float32)

    def projection_loss(w, x):
        return avalon.mean(avalon.tanh(avalon.swapaxes(x, 0, 1) @ w.T))
    step = avalon.value_and_grad(projection_loss, argnums=0)
    value, grads = step(w, x)
    compiled = step._last().compiled
    assert "batch split across threads" in [label for label, _ in compiled.candidates]
    tw, tx = torch.tensor(w, requires_grad=True), torch.tensor(x)
    want = torch.tanh(tx.transpose(0, 1) @ tw.T).mean()
    want.backward()
    for k, (label, _) in enumerate(compiled.candidates):
        compiled.choice = k
        value, grads = step(w, x)
        np.testing.assert_allclose(value, want.item(), rtol=1e-5, err_msg=label)
        np.testing.assert_allclose(grads[0], tw.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=label)
