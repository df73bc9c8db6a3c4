"""Datasets for Avalon: IDX files, Fashion-MNIST (local), MNIST (local or downloaded), and Batches.

    from avalon_zoo.datasets import fashion_mnist, Batches
    x, y = fashion_mnist("train")                    # (60000, 1, 28, 28) float32 in [0, 1], int64 labels
    for xb, yb in Batches(x, y, batch_size=64, seed=0):
        ...
"""
from .batches import Batches
from .fashion_mnist import (FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD, fashion_mnist,
                            fashion_mnist_available)
from .idx import DatasetError, DatasetNotFoundError, read_idx, read_labeled_images, write_idx
from .mnist import MNIST_CLASSES, MNIST_MD5, MNIST_MEAN, MNIST_MIRRORS, MNIST_STD, mnist

__all__ = [
    "Batches",
    "DatasetError",
    "DatasetNotFoundError",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_CLASSES",
    "MNIST_MD5",
    "MNIST_MEAN",
    "MNIST_MIRRORS",
    "MNIST_STD",
    "fashion_mnist",
    "fashion_mnist_available",
    "mnist",
    "read_idx",
    "read_labeled_images",
    "write_idx",
]
