"""The zoo's models: output shapes, a few training steps that lower the loss,
sampling and reconstruction, RealNVP's invertibility and normalization, input
checks, and every example script run end to end on a small slice.

Training data is a slice of the real Fashion-MNIST when it is installed, else
random images of the same shape (the tests hold on either)."""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import avalon
import avalon.nn.functional as F
import avalon.optim
from avalon_zoo.datasets import fashion_mnist, fashion_mnist_available
from avalon_zoo.models import (VAE, BenchCNN, ExampleCNN, RealNVP, ResNet, SequenceClassifier, bits_per_dim,
                               checkerboard, dequantize, flow_nll_loss, kl_divergence, two_moons, vae_loss)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HAVE_DATA = fashion_mnist_available()
NEEDS_DATA = pytest.mark.skipif(not HAVE_DATA, reason="the real Fashion-MNIST is not installed "
                                "(apt-get install dataset-fashion-mnist, or set AVALON_DATA)")

pytestmark = pytest.mark.filterwarnings("ignore::avalon_layers.registry.ExperimentalWarning")


@pytest.fixture(scope="module")
def batch():
    """64 images (64, 1, 28, 28) in [0, 1] and their int64 labels."""
    if HAVE_DATA:
        x, y = fashion_mnist("test")
        return x[:64].copy(), y[:64].copy()
    return synthetic_images(64)


def synthetic_images(n, seed=0):
    """Stand-ins for Fashion-MNIST that a model can learn: dim noise plus a bright
    band of rows whose position is the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.random((n, 1, 28, 28), dtype=np.float32) * 0.3
    for i, k in enumerate(y):
        x[i, 0, 2 * k + 3:2 * k + 6] = 1.0
    return x, y


def train_steps(model, loss_fn, args, steps=8, lr=1e-3):
    """Adam steps on one batch; the losses before each step."""
    opt = avalon.optim.Adam(lr=lr)
    losses = []
    for _ in range(steps):
        loss, grads = avalon.grad(loss_fn, model, *args, argnums=0)
        opt.step(model, grads[0])
        losses.append(float(loss))
    return losses


def nll(model, x, y):
    return F.nll_loss(model(x), y)


def cross_entropy(model, x, y):
    return F.cross_entropy(model(x), y)


# -- classifiers ------------------------------------------------------------------------------------------

CLASSIFIERS = {  # name: (constructor, loss, Adam learning rate)
    "ExampleCNN": (ExampleCNN, nll, 3e-3),
    "BenchCNN": (BenchCNN, nll, 3e-3),
    "ResNet": (lambda: ResNet(blocks=(1, 1, 1)), cross_entropy, 3e-3),
    "LSTM": (lambda: SequenceClassifier("lstm", hidden=32), cross_entropy, 1e-2),
    "GRU": (lambda: SequenceClassifier("gru", hidden=32), cross_entropy, 1e-2),
}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_output_and_training(name, batch):
    make, loss_fn, lr = CLASSIFIERS[name]
    avalon.manual_seed(0)
    model = make()
    x, y = batch
    out = np.asarray(model(x))
    assert out.shape == (64, 10) and out.dtype == np.float32
    if loss_fn is nll:  # log-probabilities
        np.testing.assert_allclose(np.exp(out).sum(axis=1), 1.0, rtol=1e-5)
    losses = train_steps(model, loss_fn, (x, y), steps=10, lr=lr)
    after = float(loss_fn(model, x, y))
    assert all(np.isfinite(losses)) and after < losses[0] - 0.15, (losses, after)


def test_example_cnn_layout():
    shapes = {k: v.shape for k, v in ExampleCNN().state_dict().items()}
    assert shapes == {"conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,), "conv2.weight": (50, 20, 5, 5),
                      "conv2.bias": (50,), "fc1.weight": (500, 800), "fc1.bias": (500,),
                      "fc2.weight": (10, 500), "fc2.bias": (10,)}
    assert BenchCNN().fc.weight.shape == (10, 288)


def test_resnet_sizes_and_batchnorm():
    avalon.manual_seed(0)
    model = ResNet(num_classes=7, in_channels=3, blocks=(1, 1, 1))
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    assert model(x).shape == (4, 7)
    bn = model.bn1
    assert int(bn.num_batches_tracked) == 1 and np.any(bn.running_mean != 0)
    model.eval()
    first = np.asarray(model(x))
    np.testing.assert_array_equal(first, np.asarray(model(x)))  # running statistics: deterministic
    assert int(bn.num_batches_tracked) == 1
    assert ResNet(blocks=(2, 2, 2))(np.zeros((2, 1, 28, 28), np.float32)).shape == (2, 10)


def test_sequence_classifier_layouts(batch):
    model = SequenceClassifier("gru", hidden=16, num_layers=2)
    x = batch[0][:3]
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(model(x[:, 0])), rtol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        SequenceClassifier("transformer")


# -- VAE ------------------------------------------------------------------------------------------------------

def test_vae_shapes(batch):
    avalon.manual_seed(0)
    model = VAE()
    x = batch[0][:8]
    recon, mu, logvar = model(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (8, 5)
    assert model(x.reshape(8, 784))[0].shape == (8, 784)
    assert model.reconstruct(x).shape == x.shape
    samples = np.asarray(model.sample(6))
    assert samples.shape == (6, 1, 28, 28) and samples.min() >= 0 and samples.max() <= 1


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_vae_trains(reduction, batch):
    avalon.manual_seed(0)
    model = VAE()
    losses = train_steps(model, lambda m, x: vae_loss(m, x, reduction), (batch[0],), steps=10)
    assert losses[-1] < losses[0], losses


def test_vae_loss_definitions(batch):
    """With logvar forced to -40 the noise is negligible (std e^-20): the loss is then a
    function of the weights alone, checked here against the documented formulas."""
    model = VAE()
    model.fc_logvar.weight[...] = 0
    model.fc_logvar.bias[...] = -40.0
    x = batch[0][:16].astype(np.float64)
    mu, logvar = (np.asarray(a, np.float64) for a in model.encode(batch[0][:16]))
    p = np.asarray(model.decode(mu.astype(np.float32)), np.float64)
    t = x.reshape(16, 784)
    bce = -(t * np.log(p) + (1 - t) * np.log1p(-p))
    kl = -0.5 * (1 + logvar - mu ** 2 - np.exp(logvar))
    np.testing.assert_allclose(np.asarray(kl_divergence(mu, logvar)), kl)
    np.testing.assert_allclose(float(vae_loss(model, batch[0][:16])), bce.mean() + kl.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(vae_loss(model, batch[0][:16], "sum")), (bce.sum() + kl.sum()) / 16,
                               rtol=1e-4)
    with pytest.raises(ValueError, match="reduction"):
        vae_loss(model, batch[0], "batchmean")


def test_vae_noise_is_fresh_per_compiled_call(batch):
    model = VAE()
    loss = avalon.jit(vae_loss)
    avalon.manual_seed(3)
    a, b = float(loss(model, batch[0])), float(loss(model, batch[0]))
    assert a != b  # a new eps on each call
    avalon.manual_seed(3)
    assert float(loss(model, batch[0])) == a  # and the same eps after the same seed


# -- RealNVP ---------------------------------------------------------------------------------------------------

def perturbed_flow(**kwargs):
    """A flow whose couplings are not the identity (the untrained flow is)."""
    avalon.manual_seed(0)
    flow = RealNVP(**kwargs)
    rng = np.random.default_rng(0)
    for layer in flow.couplings:
        last = layer.net[len(layer.net) - 1]
        last.weight[...] = rng.normal(0, 0.3, last.weight.shape)
        last.bias[...] = rng.normal(0, 0.3, last.bias.shape)
    return flow


def test_realnvp_round_trip_2d():
    flow = perturbed_flow(dim=2, num_coupling=6, hidden=32)
    x = two_moons(100, seed=1)
    z, logdet = flow.transform(x)
    assert np.abs(np.asarray(z) - x).max() > 0.1  # the flow does something
    np.testing.assert_allclose(np.asarray(flow.inverse(z)), x, atol=1e-5)
    assert logdet.shape == (100,)


def test_realnvp_density_integrates_to_one():
    """Change of variables, checked numerically: exp(log p) summed over a fine grid is 1."""
    flow = perturbed_flow(dim=2, num_coupling=4, hidden=16)
    ticks = np.linspace(-8, 8, 401, dtype=np.float32)
    grid = np.stack(np.meshgrid(ticks, ticks), -1).reshape(-1, 2)
    cell = float(ticks[1] - ticks[0]) ** 2
    assert abs(np.exp(np.asarray(flow.log_prob(grid), np.float64)).sum() * cell - 1) < 1e-2


def test_realnvp_logit_density_integrates_to_one():
    """With the logit transform the density lives on the square that the logit maps
    onto the whole plane, [-a/(1-2a), (1-a)/(1-2a)]^2 (slightly larger than [0, 1]^2)."""
    a = 0.05
    flow = perturbed_flow(dim=2, num_coupling=2, hidden=16, logit_alpha=a)
    lo, hi = -a / (1 - 2 * a), (1 - a) / (1 - 2 * a)
    n = 500
    ticks = (lo + (np.arange(n) + 0.5) * (hi - lo) / n).astype(np.float32)
    grid = np.stack(np.meshgrid(ticks, ticks), -1).reshape(-1, 2)
    cell = ((hi - lo) / n) ** 2
    assert abs(np.exp(np.asarray(flow.log_prob(grid), np.float64)).sum() * cell - 1) < 1e-2


def test_realnvp_images_round_trip_and_sample(batch):
    flow = perturbed_flow(dim=784, num_coupling=2, hidden=32, image_shape=(1, 28, 28), logit_alpha=0.05)
    x = dequantize(batch[0][:8], np.random.default_rng(0))
    z, _ = flow.transform(x)
    np.testing.assert_allclose(np.asarray(flow.inverse(z)), x, atol=1e-4)
    samples = flow.sample(5)
    assert samples.shape == (5, 1, 28, 28)
    log_p = np.asarray(flow.log_prob(samples))
    assert log_p.shape == (5,) and np.all(np.isfinite(log_p))
    z, _ = flow.transform(samples)  # sample -> z -> sample
    np.testing.assert_allclose(np.asarray(flow.inverse(z)), np.asarray(samples), atol=1e-4)


def test_realnvp_trains_on_moons():
    avalon.manual_seed(0)
    flow = RealNVP(dim=2, num_coupling=4, hidden=32)
    losses = train_steps(flow, flow_nll_loss, (two_moons(256),), steps=30, lr=3e-3)
    assert losses[-1] < losses[0] - 0.1, losses
    assert np.all(np.isfinite(np.asarray(flow.log_prob(np.asarray(flow.sample(64))))))


def test_realnvp_trains_on_images(batch):
    avalon.manual_seed(0)
    flow = RealNVP(dim=784, num_coupling=2, hidden=64, image_shape=(1, 28, 28), logit_alpha=0.05)
    x = dequantize(batch[0], np.random.default_rng(0))
    losses = train_steps(flow, flow_nll_loss, (x,), steps=6)
    assert losses[-1] < losses[0], losses


def test_flow_helpers():
    assert checkerboard(4).tolist() == [1, 0, 1, 0]
    assert checkerboard(4, (2, 2), parity=1).tolist() == [0, 1, 1, 0]
    x = np.array([[0.0, 1.0, 128 / 255]], np.float32)
    d = dequantize(x, np.random.default_rng(0))
    levels = np.array([0, 255, 128])
    assert np.all(d >= levels / 256) and np.all(d < (levels + 1) / 256)
    assert bits_per_dim(np.zeros(3), 784) == pytest.approx(8.0)  # uniform on [0, 1]^D: 8 bits per pixel
    assert bits_per_dim(np.full(3, -784 * math.log(2)), 784) == pytest.approx(9.0)
    moons = two_moons(2000)
    assert moons.shape == (2000, 2) and moons.dtype == np.float32
    assert np.all(np.abs(moons.mean(0)) < 0.1) and np.all(np.abs(moons.std(0) - 1) < 0.2)


# -- input checks ---------------------------------------------------------------------------------------------

WRONG = {
    "ExampleCNN": (ExampleCNN, (2, 3, 28, 28), r"ExampleCNN expects input of shape \(N, 1, 28, 28\), "
                                               r"got \(2, 3, 28, 28\)"),
    "BenchCNN": (BenchCNN, (2, 784), r"BenchCNN expects input of shape \(N, 1, 28, 28\), got \(2, 784\)"),
    "VAE": (VAE, (2, 28, 28), r"VAE expects input of shape \(N, 784\) or \(N, 1, 28, 28\), got \(2, 28, 28\)"),
    "ResNet": (ResNet, (2, 3, 32, 32), r"ResNet expects input of shape \(N, 1, \*, \*\), got \(2, 3, 32, 32\)"),
    "RealNVP": (RealNVP, (2, 3), r"RealNVP expects input of shape \(N, 2\), got \(2, 3\)"),
    "SequenceClassifier": (SequenceClassifier, (2, 28, 14),
                           r"SequenceClassifier expects input of shape \(N, 28, 28\) or \(N, 1, 28, 28\), "
                           r"got \(2, 28, 14\)"),
}


@pytest.mark.parametrize("name", WRONG)
def test_wrong_input_shape(name):
    make, shape, message = WRONG[name]
    model = make()
    with pytest.raises(avalon.ShapeError, match=message) as info:
        model(np.zeros(shape, np.float32))
    assert "test_models.py" in str(info.value)  # points at the caller's line


def test_wrong_shape_inside_grad():
    with pytest.raises(avalon.ShapeError, match="ExampleCNN expects"):
        avalon.grad(nll, ExampleCNN(), np.zeros((2, 1, 32, 32), np.float32), np.zeros(2, np.int64), argnums=0)


def test_small_images_rejected_by_resnet():
    with pytest.raises(avalon.ShapeError, match="at least 8x8"):
        ResNet()(np.zeros((1, 1, 4, 4), np.float32))


def test_flow_inverse_and_image_checks():
    flow = RealNVP(dim=784, num_coupling=2, hidden=8, image_shape=(1, 28, 28))
    with pytest.raises(avalon.ShapeError, match=r"\(N, 784\) or \(N, 1, 28, 28\)"):
        flow.log_prob(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(avalon.ShapeError, match=r"RealNVP expects input of shape \(N, 784\)"):
        flow.inverse(np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(ValueError, match="image_shape"):
        RealNVP(dim=10, image_shape=(1, 28, 28))


# -- example scripts ------------------------------------------------------------------------------------------

SCRIPTS = {
    "train_cnn": (["cnn_confusion.png"], [], True),
    "train_vae": (["vae_reconstructions.png", "vae_samples.png"], [], True),
    "train_resnet": (["resnet_confusion.png"], ["--blocks", "1"], True),
    "train_rnn": (["rnn_accuracy.png"], [], True),
    "train_realnvp": (["realnvp_moons.png", "realnvp_samples.png"], [], True),
    "train_realnvp_moons": (["realnvp_moons.png"], ["--data", "moons"], False),
}


def run_example(script, extra, out):
    cmd = [sys.executable, str(EXAMPLES / f"{script}.py"), "--epochs", "1", "--limit", "256",
           "--test-limit", "256", "--out", str(out), *extra]
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=out, env=env)


@pytest.mark.parametrize("name", SCRIPTS)
def test_example_runs(name, tmp_path):
    pictures, extra, needs_data = SCRIPTS[name]
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("the examples draw with matplotlib, which is not installed")
    if needs_data and not HAVE_DATA:
        pytest.skip("the example trains on the real Fashion-MNIST, which is not installed")
    result = run_example(name.removesuffix("_moons"), extra, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUMMARY" in result.stdout.splitlines()[-1]
    assert "batch/s" not in result.stderr  # no progress bar in a pipe
    for picture in pictures:
        data = (tmp_path / picture).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, picture
