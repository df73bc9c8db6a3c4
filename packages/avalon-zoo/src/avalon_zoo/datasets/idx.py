"""The IDX file format (MNIST, Fashion-MNIST) and labeled image sets stored in it.

An IDX file is a header followed by the array's elements, big-endian, in C order:

    bytes 0-1   0x00 0x00
    byte  2     type code: 0x08 ubyte, 0x09 byte, 0x0B short, 0x0C int,
                0x0D float, 0x0E double
    byte  3     number of dimensions
    then        one big-endian uint32 per dimension
    then        the data, exactly prod(dims) * itemsize bytes

Files may be gzip-compressed; `read_idx` tells by the gzip magic bytes, not by the
file name.  Every fault (missing file, bad magic, unknown type code, truncated or
oversized data, corrupt gzip stream) raises DatasetError naming the file.
"""
from __future__ import annotations

import gzip as _gzip
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np

from avalon.errors import AvalonError, DtypeError

GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20

# type code -> big-endian dtype of the stored elements
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF = {dt.newbyteorder("="): code for code, dt in IDX_TYPES.items()}


class DatasetError(AvalonError):
    """A dataset file that is missing, unreadable or not what it should be."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The files of a dataset are not where Avalon looked for them."""


# ---------------------------------------------------------------- reading

def read_idx(path) -> np.ndarray:
    """The array stored in the IDX file at `path` (gzip-compressed or raw), in native byte order."""
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            if compressed:
                with _gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    return _read_stream(stream, path, compressed, None)
            return _read_stream(raw, path, compressed, os.fstat(raw.fileno()).st_size)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{path}: no such file") from None
    except (_gzip.BadGzipFile, EOFError, zlib.error) as exc:
        # EOFError: the gzip stream ends before its end marker (a truncated download).
        raise DatasetError(f"{path}: corrupt or truncated gzip stream ({exc})") from None
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None


def _read_stream(stream, path: Path, compressed: bool, file_size: int | None) -> np.ndarray:
    what = "decompressed data" if compressed else "file"
    dtype, shape = _read_header(stream, path, what)
    header = 4 + 4 * len(shape)
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    # A raw file's size is known up front: check it before allocating anything, so a
    # corrupt header claiming terabytes fails cleanly.
    if file_size is not None and file_size != header + expected:
        raise DatasetError(_size_message(path, what, dtype, shape, header, expected, file_size - header))
    data = _read_exactly(stream, expected)
    if len(data) < expected:
        raise DatasetError(_size_message(path, what, dtype, shape, header, expected, len(data)))
    extra = _count_rest(stream)
    if extra:
        raise DatasetError(_size_message(path, what, dtype, shape, header, expected, expected + extra))
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    if dtype.itemsize > 1:
        return array.astype(dtype.newbyteorder("="))
    return array.view(dtype.newbyteorder("="))  # writable: it views a bytearray


def _read_header(stream, path: Path, what: str):
    magic = stream.read(4)
    if len(magic) < 4:
        raise DatasetError(f"{path}: not an IDX file: the {what} holds {len(magic)} bytes, "
                           f"fewer than the 4-byte magic number")
    if magic[0] != 0 or magic[1] != 0:
        raise DatasetError(f"{path}: not an IDX file: bad magic number 0x{magic.hex()} "
                           f"(an IDX file starts with 0x0000, then the type code and the number of dimensions)")
    code, ndims = magic[2], magic[3]
    if code not in IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_TYPES)
        raise DatasetError(f"{path}: unknown IDX type code 0x{code:02X} in magic number 0x{magic.hex()} "
                           f"(known codes: {known})")
    if ndims == 0:
        raise DatasetError(f"{path}: IDX magic number 0x{magic.hex()} declares 0 dimensions")
    dims = stream.read(4 * ndims)
    if len(dims) < 4 * ndims:
        raise DatasetError(f"{path}: truncated IDX header: {ndims} dimensions need {4 * ndims} bytes "
                           f"after the magic number, found {len(dims)}")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    return IDX_TYPES[code], shape


def _size_message(path, what, dtype, shape, header, expected, actual) -> str:
    problem = "truncated" if actual < expected else "oversized"
    return (f"{path}: {problem} IDX data: shape {shape} of {dtype.newbyteorder('=').name} needs "
            f"{expected} data bytes after the {header}-byte header ({header + expected} bytes in all), "
            f"the {what} holds {actual} ({header + actual} in all)")


def _read_exactly(stream, size: int) -> bytearray:
    # Grow the buffer as data arrives instead of allocating `size` bytes up front:
    # a gzip header cannot be checked against the (unknown) decompressed size.
    data = bytearray()
    while len(data) < size:
        chunk = stream.read(min(_CHUNK, size - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def _count_rest(stream) -> int:
    # Reading to the end also makes gzip check the stream's CRC and length trailer.
    extra = 0
    while chunk := stream.read(_CHUNK):
        extra += len(chunk)
    return extra


# ---------------------------------------------------------------- writing

def write_idx(path, array, gzip: bool = True) -> Path:
    """Write `array` to `path` as an IDX file (gzip-compressed unless gzip=False); returns the path.

    The file appears atomically: it is written to a temporary file beside the target
    and renamed over it.
    """
    path = Path(path)
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODE_OF:
        names = ", ".join(dt.name for dt in _CODE_OF)
        raise DtypeError(f"write_idx: IDX cannot store dtype {array.dtype} (it stores {names})")
    if array.ndim == 0 or array.ndim > 255:
        raise DatasetError(f"write_idx: IDX stores arrays of 1 to 255 dimensions, not {array.ndim}")
    if max(array.shape) >= 1 << 32:
        raise DatasetError(f"write_idx: dimension sizes must fit in 32 bits, got shape {array.shape}")
    header = bytes([0, 0, _CODE_OF[native], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    if gzip:
        payload = _gzip.compress(payload, mtime=0)  # mtime=0: the same array gives the same bytes
    _write_atomically(path, payload)
    return path


def _write_atomically(path: Path, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------- labeled image sets

def find_idx_file(directory, name: str) -> Path | None:
    """`directory/name.gz` or `directory/name` (uncompressed), whichever exists first; None if neither."""
    for candidate in (Path(directory) / f"{name}.gz", Path(directory) / name):
        if candidate.is_file():
            return candidate
    return None


def read_labeled_images(images_path, labels_path, image_shape=(28, 28), num_classes: int = 10,
                        expected_count: int | None = None):
    """(uint8 images (N, *image_shape), int64 labels (N,)) from an MNIST-layout pair of IDX files.

    Checks the shapes and dtypes, that both files hold the same number of examples
    (and `expected_count` of them when given) and that labels lie in [0, num_classes).
    """
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.shape[1:] != tuple(image_shape):
        raise DatasetError(f"{images_path}: expected uint8 images of shape (N, {', '.join(map(str, image_shape))}), "
                           f"found {images.dtype} of shape {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(f"{labels_path}: expected uint8 labels of shape (N,), "
                           f"found {labels.dtype} of shape {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    if expected_count is not None and len(images) != expected_count:
        raise DatasetError(f"{images_path}: expected {expected_count} images, found {len(images)} "
                           f"(an incomplete or different dataset?)")
    if len(labels) and labels.max() >= num_classes:
        raise DatasetError(f"{labels_path}: label {int(labels.max())} is outside 0..{num_classes - 1}")
    return images, labels.astype(np.int64)


def images_to_array(images: np.ndarray, normalize: bool = True, flatten: bool = False,
                    dtype=np.float32) -> np.ndarray:
    """uint8 images (N, H, W) as `dtype`, shape (N, 1, H, W) (or (N, H*W) when flatten),
    scaled to [0, 1] when normalize, else keeping the pixel values 0..255."""
    dtype = np.dtype(dtype)
    if normalize and dtype.kind != "f":
        raise DtypeError(f"normalize=True scales pixels to [0, 1], which needs a float dtype, not {dtype}")
    out = images.astype(dtype)
    if normalize:
        out /= dtype.type(255)  # in place: the full training set is ~190 MB as float32
    return out.reshape(len(images), -1) if flatten else out[:, None]
