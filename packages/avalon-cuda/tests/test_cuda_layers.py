"""Training on the GPU gives what training on the CPU gives: a small MLP's
gradients, and its loss curve over 20 SGD steps, on cuda equal the CPU
backend's within float32 noise; the same for a small CNN built from
avalon.nn layers with an avalon.optim optimizer (convolution and pooling run
the xp-generic kernels: as_strided views and cuBLAS matmuls).  Skipped, with
the reason, where no GPU is usable."""
import copy

import numpy as np
import pytest

import avalon
from avalon.backends import backend_of
from avalon_cuda import gpu_available

_OK, _WHY = gpu_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"needs a usable CUDA GPU: {_WHY}")

STEPS = 20


def _host(x):
    if isinstance(x, (np.ndarray, np.generic)):   # the CPU gives 0-d results as NumPy scalars
        return np.asarray(x)
    return np.asarray(backend_of(x).to_host(x))


def init_mlp(seed=0, sizes=(20, 64, 32, 5)):
    rng = np.random.default_rng(seed)
    params = {}
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"w{k}"] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        params[f"b{k}"] = np.zeros(b, np.float32)
    return params


def mlp_loss(params, x, labels):
    h = x
    n = len(params) // 2
    for k in range(n):
        h = h @ params[f"w{k}"] + params[f"b{k}"]
        if k < n - 1:
            h = avalon.tanh(h) if k % 2 else avalon.relu(h)
    logp = avalon.log_softmax(h, axis=-1)
    return -avalon.mean(avalon.take_along_axis(logp, labels[:, None], axis=1))


def batch(seed=1, n=128, d=20, classes=5):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    labels = rng.integers(0, classes, n).astype(np.int64)
    return x, labels


def train_mlp(device, steps=STEPS, lr=0.2):
    """Loss per step of plain SGD; the update is a compiled function that
    writes each parameter in place (avalon.assign), as optimizers do."""
    params = avalon.to_device(init_mlp(), device)
    x, labels = avalon.to_device(batch(), device)
    lr = avalon.to_device(np.asarray(lr, np.float32), device)
    update = avalon.jit(lambda p, g, lr: [avalon.assign(p[k], p[k] - lr * g[k]) for k in sorted(p)])
    losses = []
    for _ in range(steps):
        loss, (g, _, _) = avalon.grad(mlp_loss, params, x, labels, argnums=0)
        update(params, g, lr)
        losses.append(float(_host(loss)))
    return np.array(losses), avalon.to_device(params, "cpu")


def test_mlp_gradients_on_cuda_equal_the_cpu():
    params, (x, labels) = init_mlp(), batch()
    ref_loss, ref_g = avalon.grad(mlp_loss, params, x, labels, argnums=0)
    loss, g = avalon.grad(mlp_loss, *avalon.to_device((params, x, labels), "cuda"), argnums=0)
    assert backend_of(loss).name == "cuda" and g[1] is None and g[2] is None
    np.testing.assert_allclose(_host(loss), ref_loss, rtol=1e-5)
    for k in params:
        assert backend_of(g[0][k]).name == "cuda"
        np.testing.assert_allclose(_host(g[0][k]), ref_g[0][k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_mlp_loss_curve_over_20_sgd_steps_equals_the_cpu():
    cpu_losses, cpu_params = train_mlp("cpu")
    gpu_losses, gpu_params = train_mlp("cuda")
    assert cpu_losses[-1] < 0.8 * cpu_losses[0]                 # it does learn
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-4, atol=1e-5)
    for k in cpu_params:
        np.testing.assert_allclose(gpu_params[k], cpu_params[k], rtol=1e-3, atol=1e-4, err_msg=k)


# -- with avalon.nn layers ------------------------------------------------------------------------

def _cnn():
    pytest.importorskip("avalon_layers")
    import avalon.nn as nn
    avalon.manual_seed(0)
    np.random.seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 3 * 3, 4))


def train_cnn(model, device, steps=STEPS):
    """Loss per step; trains a copy (the optimizer updates arrays in place)."""
    import avalon.nn as nn
    model = avalon.to_device(copy.deepcopy(model), device)
    rng = np.random.default_rng(2)
    x = avalon.to_device(rng.standard_normal((16, 3, 16, 16)).astype(np.float32), device)
    y = avalon.to_device(rng.integers(0, 4, 16).astype(np.int64), device)
    criterion = nn.CrossEntropyLoss()
    opt = avalon.optim.SGD(lr=0.05, momentum=0.9)

    def loss_fn(m, x, y):
        return criterion(m(x), y)
    losses = []
    for _ in range(steps):
        loss, (g, _, _) = avalon.grad(loss_fn, model, x, y, argnums=0)
        opt.step(model, g)
        losses.append(float(_host(loss)))
    return np.array(losses), model


def test_cnn_of_nn_layers_trains_on_cuda_as_on_the_cpu():
    model = _cnn()
    cpu_losses, cpu_model = train_cnn(model, "cpu")
    gpu_losses, gpu_model = train_cnn(model, "cuda")
    assert cpu_losses[-1] < cpu_losses[0]
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=2e-4, atol=1e-5)
    cpu_state = cpu_model.state_dict()
    gpu_state = avalon.to_device(gpu_model.state_dict(), "cpu")
    for k in cpu_state:
        np.testing.assert_allclose(gpu_state[k], cpu_state[k], rtol=2e-3, atol=2e-4, err_msg=k)
