"""The benchmark's data: Fashion-MNIST when it is installed, else synthetic
images of the same shape, so the two frameworks always see the same arrays.

Both are (N, 1, 28, 28) float32 in [0, 1] with int64 labels 0..9.  The
synthetic set is deterministic (seeded): every process that asks for it,
the benchmark's subprocesses included, gets the same arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avalon_zoo.datasets import fashion_mnist, fashion_mnist_available

SYNTHETIC_SEED = 1234
FULL_SIZES = (60000, 10000)     # train, test: Fashion-MNIST's
QUICK_SYNTHETIC_SIZES = (6000, 1000)


@dataclass
class BenchData:
    kind: str           # "real" (Fashion-MNIST) or "synthetic"
    description: str    # one line for the report
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def mean(self) -> float:
        return float(self.x_train.mean())

    @property
    def std(self) -> float:
        return float(self.x_train.std())


def load(data: str = "auto", quick: bool = False) -> BenchData:
    """data: "auto" (real when installed), "real" (error when missing) or "synthetic"."""
    if data not in ("auto", "real", "synthetic"):
        raise ValueError(f"data must be auto, real or synthetic, not {data!r}")
    if data == "real" or (data == "auto" and fashion_mnist_available()):
        x_train, y_train = fashion_mnist("train")   # raises, saying how to install, when missing
        x_test, y_test = fashion_mnist("test")
        return BenchData("real", "Fashion-MNIST (60,000 train / 10,000 test images)",
                         x_train, y_train, x_test, y_test)
    why = "requested" if data == "synthetic" else "Fashion-MNIST is not installed"
    n_train, n_test = QUICK_SYNTHETIC_SIZES if quick else FULL_SIZES
    x_train, y_train, x_test, y_test = synthetic(n_train, n_test)
    return BenchData("synthetic",
                     f"synthetic images of Fashion-MNIST's shape ({n_train:,} train / {n_test:,} test; {why})",
                     x_train, y_train, x_test, y_test)


def synthetic(n_train: int, n_test: int, seed: int = SYNTHETIC_SEED):
    """Ten classes, each a smooth random template plus pixel noise, clipped to
    [0, 1]: learnable (the losses fall) yet not trivial."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((10, 1, 7, 7), dtype=np.float32)
    templates = coarse.repeat(4, axis=2).repeat(4, axis=3)      # 7x7 blocks -> 28x28

    def draw(n):
        labels = rng.integers(0, 10, n).astype(np.int64)
        noise = rng.standard_normal((n, 1, 28, 28), dtype=np.float32) * np.float32(0.35)
        images = np.clip(templates[labels] + noise, 0.0, 1.0, dtype=np.float32)
        return images, labels

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return x_train, y_train, x_test, y_test
