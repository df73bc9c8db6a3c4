"""Checkpoints: avalon.save(model_or_state_dict, path) and avalon.load(path).

A checkpoint is an uncompressed NumPy ``.npz`` archive (a zip file that
``numpy.load`` reads with nothing else installed):

* one ``<key>.npy`` entry per state-dict array, under its state-dict key;
* one ``__avalon__.json`` entry: the format name and version, the Avalon
  versions that wrote it, what was saved (a state dict, or a model and its
  class path) and a manifest giving each array's dtype, shape and the SHA-256
  of its bytes.

Writes are atomic: the archive goes to a temporary file in the target's
directory, is flushed and fsync'ed, and then renamed over the target, so a
crash mid-write leaves the previous checkpoint intact.  Reads check everything
the metadata promises and raise CheckpointError naming the file and the fault.

Each format version has its own loader (``_LOADERS``), so files written by
older releases keep loading after the format moves on.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

import avalon
from avalon.errors import AvalonError
from avalon.tree import is_array

from .registry import export

FORMAT_NAME = "avalon-checkpoint"
FORMAT_VERSION = 1
METADATA_ENTRY = "__avalon__.json"
_ZIP_MAGIC = b"PK\x03\x04"


@export("toplevel", "Checkpoints")
class CheckpointError(AvalonError, ValueError):
    """A checkpoint file that cannot be read: not a checkpoint, truncated,
    corrupted, or written by a newer format version."""


# -- saving -------------------------------------------------------------------

@export("toplevel", "Checkpoints")
def save(model_or_state_dict, path) -> None:
    """Save a model's state dict (or a state dict: a mapping of name -> array)
    to `path`, atomically.  Arrays on any device are copied to the host first.

    A PyTorch state dict converted with ``{k: v.numpy() for k, v in sd.items()}``
    saves as it is."""
    path = os.fspath(path)
    state, kind, class_path = _state_of(model_or_state_dict)
    arrays = OrderedDict((key, _host_array(key, value)) for key, value in state.items())
    meta = _metadata(arrays, kind, class_path)
    _atomic_write(path, lambda f: _write_archive(f, arrays, meta))


def _state_of(obj):
    if isinstance(obj, Mapping):
        return obj, "state_dict", None
    if callable(getattr(obj, "state_dict", None)):
        cls = type(obj)
        return obj.state_dict(), "model", f"{cls.__module__}.{cls.__qualname__}"
    raise TypeError(f"avalon.save expects a model (an object with state_dict()) or a state dict "
                    f"(a mapping of name -> array), not {type(obj).__name__}")


def _host_array(key, value) -> np.ndarray:
    if not isinstance(key, str) or not key:
        raise TypeError(f"state-dict keys must be non-empty strings, not {key!r}")
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor given as is
        value = value.detach().cpu().numpy()
    elif is_array(value):
        from avalon.backends import backend_of
        value = backend_of(value).to_host(value)
    arr = np.asarray(value)
    if arr.dtype.hasobject:
        raise TypeError(f"state-dict entry {key!r} holds Python objects ({arr.dtype}); "
                        "checkpoints store numeric arrays only")
    return arr


def _array_digest(arr: np.ndarray) -> str:
    # The digest covers the array's C-order bytes, independent of its layout in memory.
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return hashlib.sha256(flat).hexdigest()


def _metadata(arrays, kind, class_path) -> dict:
    import avalon_layers
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "class": class_path,
        "avalon_version": avalon.__version__,
        "avalon_layers_version": avalon_layers.__version__,
        "arrays": [{"key": k, "dtype": a.dtype.str, "shape": list(a.shape), "sha256": _array_digest(a)}
                   for k, a in arrays.items()],
    }


def _write_archive(f, arrays, meta) -> None:
    # ZIP_STORED: uncompressed, so numpy.load can memory-map-like read each entry cheaply.
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(METADATA_ENTRY, json.dumps(meta, indent=1))
        for key, arr in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, arr, allow_pickle=False)


def _atomic_write(path: str, write) -> None:
    """Run write(file) on a temporary file beside `path`, then rename it over
    `path`; on any failure the temporary file is removed and `path` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:  # "x": never clobber; the umask sets the mode, as for open(path, "wb")
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself durable on POSIX; directories cannot be opened on Windows.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- loading ------------------------------------------------------------------

@export("toplevel", "Checkpoints")
def load(path, model=None, strict: bool = True):
    """Read a checkpoint written by avalon.save.

    Returns the state dict (an OrderedDict of NumPy arrays, in saved order).
    With `model`, loads it into the model (``model.load_state_dict(state,
    strict)``, which also puts the arrays on the model's device) and returns
    the model."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(len(_ZIP_MAGIC))
        if not head:
            raise _error(path, "the file is empty")
        if head != _ZIP_MAGIC:
            raise _error(path, f"not an Avalon checkpoint: it does not start with the zip/npz signature "
                               f"(first bytes {head!r})")
        f.seek(0)
        try:
            zf = zipfile.ZipFile(f)
        except zipfile.BadZipFile as e:
            raise _error(path, f"truncated or corrupt archive ({e})") from None
        with zf:
            meta = _read_metadata(path, zf)
            state = _LOADERS[meta["format_version"]](path, zf, meta)
    if model is not None:
        model.load_state_dict(state, strict=strict)
        return model
    return state


def _error(path, what) -> CheckpointError:
    return CheckpointError(f"cannot load checkpoint {path!r}: {what}")


def _read_metadata(path, zf) -> dict:
    if METADATA_ENTRY not in zf.namelist():
        raise _error(path, f"no {METADATA_ENTRY} entry, so it was not written by avalon.save (a plain "
                           "numpy .npz, or a PyTorch file? load those with numpy.load / torch.load and "
                           "pass {name: array} to load_state_dict)")
    try:
        meta = json.loads(zf.read(METADATA_ENTRY).decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, ValueError) as e:
        raise _error(path, f"unreadable {METADATA_ENTRY} ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise _error(path, f"{METADATA_ENTRY} does not describe an {FORMAT_NAME!r} file")
    version = meta.get("format_version")
    if type(version) is not int or version not in _LOADERS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = (f"it was written by a newer avalon-layers; upgrade avalon-layers (this one reads format "
                f"versions {sorted(_LOADERS)})" if newer else f"readable versions are {sorted(_LOADERS)}")
        raise _error(path, f"unknown format version {version!r}: {hint}")
    return meta


def _load_v1(path, zf, meta) -> "OrderedDict[str, np.ndarray]":
    try:
        manifest = [(e["key"], np.dtype(e["dtype"]), tuple(e["shape"]), e["sha256"]) for e in meta["arrays"]]
    except (KeyError, TypeError, ValueError) as e:
        raise _error(path, f"malformed array manifest in {METADATA_ENTRY} ({e!r})") from None
    entries = {n for n in zf.namelist() if n != METADATA_ENTRY}
    listed = {key + ".npy" for key, *_ in manifest}
    if entries - listed:
        raise _error(path, f"entries not in the manifest: {', '.join(sorted(entries - listed))}")
    state = OrderedDict()
    for key, dtype, shape, digest in manifest:
        arr = _read_array(path, zf, key)
        if arr.dtype != dtype or arr.shape != shape:
            raise _error(path, f"array {key!r} is {arr.dtype.str} {arr.shape}, but the manifest says "
                               f"{dtype.str} {shape}")
        if _array_digest(arr) != digest:
            raise _error(path, f"checksum mismatch for array {key!r}: its bytes were altered after saving")
        state[key] = arr
    return state


def _read_array(path, zf, key) -> np.ndarray:
    name = key + ".npy"
    try:
        with zf.open(name) as entry:
            return np.lib.format.read_array(entry, allow_pickle=False)
    except KeyError:
        raise _error(path, f"array {key!r} is listed in the manifest but missing from the archive") from None
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        # zipfile checks each entry's CRC-32 on read: flipped bytes land here.
        raise _error(path, f"array {key!r} is corrupt ({e})") from None


#: format version -> loader(path, zipfile, metadata) -> state dict
_LOADERS = {1: _load_v1}
