"""A short training demo: Avalon.jl's example network, trained with plain
SGD on synthetic 28x28 images (ten classes, each a noisy copy of its own
random template).  Run it with `python -m avalon.demo [--epochs N]`.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import avalon


def kaiming(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


class Net:
    """conv 1->20 5x5, conv 20->50 5x5 (each relu + 2x2 max-pool), linear 800->500->10."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.conv1_w, self.conv1_b = kaiming(rng, (20, 1, 5, 5), 25), np.zeros(20, np.float32)
        self.conv2_w, self.conv2_b = kaiming(rng, (50, 20, 5, 5), 500), np.zeros(50, np.float32)
        self.fc1_w, self.fc1_b = kaiming(rng, (500, 800), 800), np.zeros(500, np.float32)
        self.fc2_w, self.fc2_b = kaiming(rng, (10, 500), 500), np.zeros(10, np.float32)

    def __call__(self, x):
        x = avalon.max_pool2d(avalon.relu(avalon.conv2d(x, self.conv1_w, self.conv1_b)), 2)
        x = avalon.max_pool2d(avalon.relu(avalon.conv2d(x, self.conv2_w, self.conv2_b)), 2)
        x = x.reshape(x.shape[0], 4 * 4 * 50)
        x = avalon.relu(avalon.linear(x, self.fc1_w, self.fc1_b))
        return avalon.log_softmax(avalon.linear(x, self.fc2_w, self.fc2_b))


def nll_loss(model, x, labels):
    logp = model(x)
    onehot = avalon.expand_dims(labels, 1) == np.arange(10)
    return -avalon.sum(logp * onehot) / x.shape[0]


def synthetic_data(n, seed=0):
    rng = np.random.default_rng(seed)
    templates = rng.random((10, 1, 28, 28)).astype(np.float32)
    labels = rng.integers(0, 10, n)
    x = templates[labels] + 0.5 * rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
    return x, labels


def sgd_step(model, grads, lr):
    for name, value in vars(model).items():
        value -= lr * getattr(grads, name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    args, _ = p.parse_known_args(argv)
    x, y = synthetic_data(args.samples)
    model = Net()
    bs = args.batch_size
    print(f"Avalon {avalon.__version__} demo: Avalon.jl's CNN on {args.samples} synthetic 28x28 images, "
          f"device {avalon.best_available_device()}")
    t0 = time.perf_counter()
    avalon.grad(nll_loss, model, x[:bs], y[:bs], argnums=0)
    print(f"trace + compile of the training step: {time.perf_counter() - t0:.2f} s")
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        losses = []
        for i in range(0, len(x) - bs + 1, bs):
            loss, (g, _, _) = avalon.grad(nll_loss, model, x[i:i + bs], y[i:i + bs], argnums=0)
            sgd_step(model, g, args.lr)
            losses.append(float(loss))
        predict = avalon.jit(lambda m, x: avalon.argmax(m(x), axis=1))
        acc = np.mean(np.concatenate([predict(model, x[i:i + bs]) for i in range(0, len(x) - bs + 1, bs)])
                      == y[:len(x) // bs * bs])
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f}, train accuracy {acc:.3f}, "
              f"{time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
