"""Fashion-MNIST from local files: 70,000 28x28 grayscale images of clothing in 10 classes.

Nothing is downloaded.  `fashion_mnist()` looks, in this order, in

1. the `root` argument,
2. the directory named by the AVALON_DATA environment variable,
3. Debian's install location /usr/share/datasets/fashion-mnist
   (`sudo apt-get install dataset-fashion-mnist`),

accepting in each either the directory holding the four files or a parent holding
them under `fashion-mnist/`.  The files are Zalando's (gzip-compressed or not):

    train-images-idx3-ubyte(.gz)  train-labels-idx1-ubyte(.gz)
    t10k-images-idx3-ubyte(.gz)   t10k-labels-idx1-ubyte(.gz)

The first place holding any of them is the one used; if it lacks the files of the
requested split, the error lists the missing ones.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .idx import DatasetNotFoundError, find_idx_file, images_to_array, read_labeled_images

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# Pixel mean and standard deviation of the training images scaled to [0, 1]
# (computed from the 60,000 training images), for Batches(normalize=(mean, std)).
FASHION_MNIST_MEAN = 0.2860406
FASHION_MNIST_STD = 0.3530242

SUBDIR = "fashion-mnist"
SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)
ENV_VAR = "AVALON_DATA"

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
COUNTS = {"train": 60000, "test": 10000}
_STANDARD = object()  # default of _expected_count: the real dataset's COUNTS

HOW_TO_GET = (
    "To get Fashion-MNIST: `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs to "
    f"{SYSTEM_DIRS[0]}), or run packages/avalon-zoo/scripts/install_fashion_mnist.sh, or download the four "
    "files from https://github.com/zalandoresearch/fashion-mnist into a directory and set "
    f"{ENV_VAR} to it (or to its parent, naming the directory '{SUBDIR}'), or pass root=."
)


def fashion_mnist(split: str = "train", root=None, normalize: bool = True, flatten: bool = False,
                  dtype=np.float32, *, _expected_count=_STANDARD):
    """(images, labels) of the Fashion-MNIST `split` ("train": 60,000, "test": 10,000).

    images: (N, 1, 28, 28) `dtype`, pixels scaled to [0, 1] when normalize (else 0..255);
            (N, 784) when flatten.  Standardize with FASHION_MNIST_MEAN / FASHION_MNIST_STD.
    labels: (N,) int64 in 0..9, indexing FASHION_MNIST_CLASSES.

    Raises DatasetNotFoundError saying where it looked and how to get the data, and
    DatasetError for damaged files or a wrong number of examples.
    """
    images_name, labels_name = _split_files(split)
    directory = _locate(root)
    paths = [find_idx_file(directory, name) for name in (images_name, labels_name)]
    missing = [name for name, path in zip((images_name, labels_name), paths) if path is None]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST directory {directory} lacks the {split} files: "
            f"{', '.join(f'{name}.gz (or {name})' for name in missing)}. {HOW_TO_GET}")
    expected = COUNTS[split] if _expected_count is _STANDARD else _expected_count
    images, labels = read_labeled_images(*paths, expected_count=expected)
    return images_to_array(images, normalize, flatten, dtype), labels


def fashion_mnist_available(root=None) -> bool:
    """Whether fashion_mnist() finds all four files (both splits) without raising."""
    try:
        directory = _locate(root)
    except DatasetNotFoundError:
        return False
    return all(find_idx_file(directory, name) for names in FILES.values() for name in names)


def _split_files(split: str):
    if split not in FILES:
        raise ValueError(f"fashion_mnist: split must be 'train' or 'test', not {split!r}")
    return FILES[split]


def _candidates(root):
    """(directory, where it came from) in search order; each directory is also tried with /fashion-mnist."""
    places = []
    if root is not None:
        places.append((Path(root), "root argument"))
    if os.environ.get(ENV_VAR):
        places.append((Path(os.environ[ENV_VAR]), f"${ENV_VAR}"))
    places.extend((Path(d), "Debian package dataset-fashion-mnist") for d in SYSTEM_DIRS)
    for base, origin in places:
        yield base, origin
        yield base / SUBDIR, origin


def _holds_any(directory: Path) -> bool:
    return any(find_idx_file(directory, name) for names in FILES.values() for name in names)


def _locate(root) -> Path:
    looked = []
    for directory, origin in _candidates(root):
        if _holds_any(directory):
            return directory
        looked.append(f"{directory} ({origin})")
    where = "; ".join(looked) if looked else "nowhere"
    raise DatasetNotFoundError(f"Fashion-MNIST not found. Looked in: {where}. {HOW_TO_GET}")


__all__ = ["FASHION_MNIST_CLASSES", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "fashion_mnist",
           "fashion_mnist_available"]
