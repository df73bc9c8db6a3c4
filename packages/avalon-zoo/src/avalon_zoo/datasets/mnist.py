"""MNIST: 70,000 28x28 grayscale handwritten digits, read from `root`, downloaded on request.

`mnist(root, download=True)` fetches the missing files of the requested split from
MNIST_MIRRORS (tried in order) into `root`.  Each download streams into a temporary
file beside its target, is checked against MNIST_MD5 and only then renamed into
place (os.replace), so a failed or corrupted download leaves nothing behind.

About the checksums: MNIST_MD5 holds the MD5 digests torchvision publishes for the
four files (torchvision.datasets.MNIST.resources).  No SHA-256 digests are
recorded: none is published with the files, and computing them needs the real
files, which could not be downloaded where this module was written (no network
access there).  MD5 guards here against truncated or corrupted downloads, not
against a deliberate forgery.

Files already present (placed by hand, gzip-compressed or not) are not checksummed:
they are checked structurally when read (IDX header, sizes, counts, label range).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .idx import DatasetError, DatasetNotFoundError, find_idx_file, images_to_array, read_labeled_images

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # the mirror torchvision tries first
    "http://yann.lecun.com/exdb/mnist/",
)
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_CLASSES = tuple(str(digit) for digit in range(10))
# Pixel mean and standard deviation of the training images scaled to [0, 1].
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
COUNTS = {"train": 60000, "test": 10000}
TIMEOUT_S = 60
_CHUNK = 1 << 16
_STANDARD = object()  # default of _expected_count: the real dataset's COUNTS


def mnist(root, split: str = "train", download: bool = False, normalize: bool = True,
          flatten: bool = False, dtype=np.float32, *, _expected_count=_STANDARD):
    """(images, labels) of the MNIST `split` ("train": 60,000, "test": 10,000) stored in `root`.

    images: (N, 1, 28, 28) `dtype` scaled to [0, 1] when normalize (else 0..255); (N, 784) when flatten.
    labels: (N,) int64 in 0..9.
    download: fetch the split's missing files into `root` (checked against MNIST_MD5).
    """
    if split not in FILES:
        raise ValueError(f"mnist: split must be 'train' or 'test', not {split!r}")
    root = Path(root)
    names = FILES[split]
    paths = [find_idx_file(root, name) for name in names]
    missing = [name for name, path in zip(names, paths) if path is None]
    if missing and not download:
        raise DatasetNotFoundError(
            f"MNIST {split} files missing from {root}: {', '.join(f'{n}.gz' for n in missing)}. "
            f"Pass download=True, or {_manual_instructions(root, missing)}")
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        paths = [path or _download_for_split(root, name, missing) for name, path in zip(names, paths)]
    expected = COUNTS[split] if _expected_count is _STANDARD else _expected_count
    images, labels = read_labeled_images(*paths, expected_count=expected)
    return images_to_array(images, normalize, flatten, dtype), labels


def download_file(root, filename: str) -> Path:
    """Download MNIST's `filename` into `root`, trying each mirror until one gives the right MD5."""
    return _download(Path(root), filename, [filename.removesuffix(".gz")])


def _download_for_split(root: Path, name: str, missing) -> Path:
    # A failure's instructions name every file the split still lacks, not just this one.
    return _download(root, f"{name}.gz", missing[missing.index(name):])


def _download(root: Path, filename: str, to_place) -> Path:
    if filename not in MNIST_MD5:
        raise DatasetError(f"no checksum recorded for {filename!r}; MNIST files are {', '.join(MNIST_MD5)}")
    failures = []
    for mirror in MNIST_MIRRORS:
        url = mirror + filename
        try:
            return _fetch_verified(url, root / filename, MNIST_MD5[filename])
        except (OSError, http.client.HTTPException, DatasetError) as exc:
            # URLError, HTTPError and timeouts are OSErrors; try the next mirror.
            failures.append(f"{url}: {exc}")
    raise DatasetError(f"MNIST download failed for {filename}:\n  " + "\n  ".join(failures)
                       + f"\nTo proceed without network access, {_manual_instructions(root, to_place)}")


def _fetch_verified(url: str, target: Path, md5: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise DatasetError(f"checksum mismatch: expected MD5 {md5}, got {digest.hexdigest()}; "
                               f"the download was discarded")
        os.replace(tmp, target)
        return target
    finally:
        if os.path.exists(tmp):  # any failure: leave no partial file behind
            os.unlink(tmp)


def _manual_instructions(root: Path, names) -> str:
    files = ", ".join(f"{name}.gz" for name in names)
    return (f"place the files manually: download {files} from one of {', '.join(MNIST_MIRRORS)} "
            f"into {root} (gzip-compressed as downloaded, or uncompressed without the .gz suffix)")


__all__ = ["MNIST_CLASSES", "MNIST_MD5", "MNIST_MEAN", "MNIST_MIRRORS", "MNIST_STD", "download_file", "mnist"]
