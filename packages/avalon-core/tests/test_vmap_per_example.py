"""Per-example gradients of a small CNN (differential privacy's first step):
vmap of a compiled gradient over the examples, one batched graph, against
torch.func.vmap(grad) and a loop of per-example avalon.grad calls."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as TF
from torch.func import functional_call, grad as tgrad, vmap as tvmap

import avalon

RNG = np.random.default_rng(0)
PARAMS = {
    "conv_w": (RNG.standard_normal((4, 2, 3, 3)) * 0.3).astype(np.float32),
    "conv_b": (RNG.standard_normal(4) * 0.1).astype(np.float32),
    "fc_w": (RNG.standard_normal((3, 4 * 3 * 3)) * 0.2).astype(np.float32),
    "fc_b": np.zeros(3, np.float32),
}


def _logits(lib, p, x):
    conv2d, relu, max_pool2d = ((avalon.conv2d, avalon.relu, avalon.max_pool2d) if lib == "avalon"
                                else (TF.conv2d, torch.relu, TF.max_pool2d))
    h = max_pool2d(relu(conv2d(x, p["conv_w"], p["conv_b"], padding=1)), 2)
    h = h.reshape(x.shape[0], -1)
    return h @ p["fc_w"].T + p["fc_b"]


def example_loss(p, x, y):
    """The loss of ONE example: x (C, H, W), y a 0-d label."""
    logits = _logits("avalon", p, x[None])
    return -avalon.log_softmax(logits, axis=1)[0, y]


def torch_example_loss(p, x, y):
    logits = _logits("torch", p, x[None])
    return -torch.log_softmax(logits, dim=1)[0].gather(0, y[None])[0]   # torch.func.vmap refuses [0, y]


def test_per_example_gradients_of_a_cnn_match_torch_func_and_a_loop():
    xs = RNG.standard_normal((5, 2, 6, 6)).astype(np.float32)
    ys = RNG.integers(0, 3, 5).astype(np.int64)
    per_example = avalon.vmap(avalon.value_and_grad(example_loss, argnums=0), in_axes=(None, 0, 0))
    losses, (grads, *_) = per_example(PARAMS, xs, ys)

    tparams = {k: torch.tensor(v) for k, v in PARAMS.items()}
    tgrads = tvmap(tgrad(torch_example_loss), in_dims=(None, 0, 0))(tparams, torch.tensor(xs), torch.tensor(ys))
    for k in PARAMS:
        assert grads[k].shape == (5,) + PARAMS[k].shape
        np.testing.assert_allclose(grads[k], tgrads[k].numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
    for i in range(5):
        loss_i, (g_i, *_) = avalon.grad(example_loss, PARAMS, xs[i], ys[i])
        np.testing.assert_allclose(losses[i], loss_i, rtol=1e-5)
        for k in PARAMS:
            np.testing.assert_allclose(grads[k][i], g_i[k], rtol=1e-4, atol=1e-6, err_msg=f"{k}, example {i}")

    norms = np.sqrt(sum((grads[k].reshape(5, -1) ** 2).sum(1) for k in PARAMS))
    tnorms = np.sqrt(sum((tgrads[k].reshape(5, -1) ** 2).sum(1).numpy() for k in PARAMS))
    np.testing.assert_allclose(norms, tnorms, rtol=1e-4)

    per_example(PARAMS, xs, ys)
    assert per_example.traces == 1, "a second call with the same shapes must not retrace"


def test_clipped_per_example_gradients_average_in_one_compiled_step():
    """DP-SGD's step: clip each example's gradient to norm 1, then average; the
    whole step is one jit of a vmap of a grad."""
    xs = RNG.standard_normal((4, 2, 6, 6)).astype(np.float32)
    ys = RNG.integers(0, 3, 4).astype(np.int64)

    @avalon.jit
    def dp_step(p, xs, ys):
        _, (g, *_) = avalon.vmap(avalon.value_and_grad(example_loss, argnums=0), in_axes=(None, 0, 0))(p, xs, ys)
        norms = avalon.sqrt(sum(avalon.sum(avalon.reshape(v, (4, -1)) ** 2, axis=1) for v in g.values()))
        scale = 1.0 / avalon.maximum(norms, 1.0)
        return {k: avalon.mean(v * avalon.reshape(scale, (4,) + (1,) * (v.ndim - 1)), axis=0) for k, v in g.items()}

    got = dp_step(PARAMS, xs, ys)
    expected = {k: 0.0 for k in PARAMS}
    for i in range(4):
        _, (g, *_) = avalon.grad(example_loss, PARAMS, xs[i], ys[i])
        norm = np.sqrt(sum((v ** 2).sum() for v in g.values()))
        for k in PARAMS:
            expected[k] = expected[k] + g[k] / max(norm, 1.0) / 4
    for k in PARAMS:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-6, err_msg=k)
    dp_step(PARAMS, xs, ys)
    assert dp_step.traces == 1
