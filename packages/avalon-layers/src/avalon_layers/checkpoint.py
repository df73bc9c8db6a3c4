"""Checkpoints: avalon.save(obj, path) and avalon.load(path).

A checkpoint is an uncompressed NumPy ``.npz`` archive (a zip file that
``numpy.load`` reads with nothing else installed):

* one ``<name>.npy`` entry per array;
* one ``__avalon__.json`` entry: the format name and version, the Avalon
  versions that wrote it, what was saved (a state dict, or a model and its
  class path) and a manifest giving each array's dtype, shape and the SHA-256
  of its bytes.

Each file is written in the oldest format version that holds what is saved,
so that older releases keep reading what they can:

* version 1: a flat state dict (name -> array, as Module.state_dict() and
  PyTorch's state dicts are), each array under its state-dict key;
* version 2: any nesting of dicts, lists and tuples holding arrays, numbers,
  strings and None (an optimizer's state_dict(), or ``{"model": ...,
  "optimizer": ..., "epoch": 3}``).  The metadata adds ``tree``: the structure
  in JSON, each array replaced by a reference to its entry, so that everything
  loads back as it was saved (tuples as tuples, ints as ints).

Writes are atomic: the archive goes to a temporary file in the target's
directory, is flushed and fsync'ed, and then renamed over the target, so a
crash mid-write leaves the previous checkpoint intact.  The temporary file is
locked while it is written; the next save to the same path removes the
unlocked ones, which a process killed mid-save left behind.

Reads check everything the metadata promises and raise CheckpointError naming
the file and the fault, whatever the damage (a flipped bit anywhere, a
truncation at any length).  Each format version has its own loader
(``_LOADERS``), so files written by older releases keep loading.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
import struct
import uuid
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

import avalon
from avalon.errors import AvalonError
from avalon.tree import is_array

from .module import Module
from .registry import export

try:
    import fcntl
except ImportError:  # Windows: there an open file cannot be deleted, which protects a live save's file
    fcntl = None

FORMAT_NAME = "avalon-checkpoint"
FORMAT_VERSION = 2  # the newest version this avalon-layers reads and writes
METADATA_ENTRY = "__avalon__.json"
_ZIP_MAGIC = b"PK\x03\x04"
_FLAT, _TREE = 1, 2  # the versions written for a flat state dict and for anything nested
_READ_CHUNK = 1 << 24


@export("toplevel", "Checkpoints")
class CheckpointError(AvalonError, ValueError):
    """A checkpoint file that cannot be read: not a checkpoint, truncated,
    corrupted, or written by a newer format version."""


# -- saving -------------------------------------------------------------------

@export("toplevel", "Checkpoints")
def save(model_or_state_dict, path) -> None:
    """Save a model's state dict (or any object's: an optimizer's), or a state
    dict, to `path`, atomically.  A state dict is a mapping of name -> array,
    or any nesting of dicts, lists and tuples of arrays, numbers, strings and
    None (``opt.state_dict()``, ``{"model": ..., "optimizer": ...}``), which
    avalon.load gives back as it was.  Arrays on any device are copied to the
    host first.

    A PyTorch state dict converted with ``{k: v.numpy() for k, v in sd.items()}``
    saves as it is.

    In a data-parallel job (avalon.distributed with more than one rank) rank 0
    writes the file and every rank returns once it is written (or raises
    rank 0's error): the ranks hold the same model."""
    _check_argument_order(model_or_state_dict, path)
    if _ranks() > 1:
        return _on_rank_zero(lambda: _save(model_or_state_dict, path))
    return _save(model_or_state_dict, path)


def _ranks() -> int:
    from avalon import distributed
    return distributed.world_size() if distributed.is_initialized() else 1


def _on_rank_zero(action):
    """Run `action` on rank 0; its result (or its error, raised again on every
    rank) goes to all ranks."""
    from avalon import distributed
    result = error = None
    if distributed.rank() == 0:
        try:
            result = action()
        except Exception as e:  # noqa: BLE001 - sent to every rank, then raised on each
            error = e
    result, error = distributed.broadcast_object((result, error), 0)
    if error is not None:
        raise error
    return result


def _save(model_or_state_dict, path) -> None:
    path = os.fspath(path)
    state, kind, class_path = _state_of(model_or_state_dict)
    arrays = OrderedDict()
    if _is_flat(state):
        for key, value in state.items():
            arrays[key] = _host_array(key, value)
        meta = _metadata(_FLAT, arrays, kind, class_path)
    else:
        meta = _metadata(_TREE, arrays, kind, class_path, tree=_encode(state, (), arrays))
    _atomic_write(path, lambda f: _write_archive(f, arrays, meta))


def _check_argument_order(obj, path) -> None:
    if isinstance(obj, (str, bytes, os.PathLike)) and not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"avalon.save takes the object first and the path second: "
                        f"avalon.save(obj, {os.fspath(obj)!r}), as torch.save(obj, path)")


def _state_of(obj):
    if isinstance(obj, Mapping):
        return obj, "state_dict", None
    if callable(getattr(obj, "state_dict", None)):
        cls = type(obj)
        return obj.state_dict(), "model", f"{cls.__module__}.{cls.__qualname__}"
    raise TypeError(f"avalon.save expects a model (an object with state_dict()) or a state dict "
                    f"(a mapping of name -> array), not {type(obj).__name__}")


def _is_array_value(value) -> bool:
    return (isinstance(value, (np.ndarray, np.generic)) or is_array(value)
            or (hasattr(value, "detach") and hasattr(value, "numpy")))  # a torch tensor


def _is_flat(state) -> bool:
    """A mapping of name -> array only: written as version 1, which every release reads."""
    return all(_is_array_value(v) for v in state.values())


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


def _encode(value, path: tuple, arrays: OrderedDict):
    """The JSON form of `value` (version 2's tree); its arrays go into `arrays`
    under entry names made from their paths.  Containers are tagged objects
    ({"dict": [[key, value], ...]}, {"list": [...]}, {"tuple": [...]}, {"array":
    name}, {"scalar": name}); numbers, strings, booleans and None are themselves."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if _is_array_value(value):  # before float: np.float64 is a float, and must come back as one
        name = _entry_name(path, arrays)
        arrays[name] = _host_array(name, value)
        return {"scalar" if isinstance(value, np.generic) else "array": name}
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}  # JSON has no nan or inf
    if isinstance(value, Mapping):
        return {"dict": [[_tree_key(k, path), _encode(v, path + (k,), arrays)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        tag = "tuple" if isinstance(value, tuple) else "list"
        return {tag: [_encode(v, path + (i,), arrays) for i, v in enumerate(value)]}
    raise TypeError(f"avalon.save cannot store a {type(value).__name__} at {_path_text(path)}: checkpoints hold "
                    f"arrays, numbers, strings, None, and dicts, lists and tuples of them")


def _tree_key(key, path):
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise TypeError(f"avalon.save: dict keys must be strings or integers, not {key!r} (at {_path_text(path)})")
    return key


def _path_text(path) -> str:
    return "".join(f"[{p!r}]" for p in path) or "the top level"


def _entry_name(path, taken) -> str:
    """A readable, unique archive name for the array at `path` ("state/fc.weight/exp_avg")."""
    # zipfile cuts names at a NUL, and control characters make unreadable listings
    base = re.sub(r"[\x00-\x1f]", "_", "/".join(str(p) for p in path)) or "value"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}~{n}"
    return name


def _array_digest(arr: np.ndarray) -> str:
    # The digest covers the array's C-order bytes, independent of its layout in memory.
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return hashlib.sha256(flat).hexdigest()


def _metadata(version, arrays, kind, class_path, tree=None) -> dict:
    import avalon_layers
    meta = {
        "format": FORMAT_NAME,
        "format_version": version,
        "kind": kind,
        "class": class_path,
        "avalon_version": avalon.__version__,
        "avalon_layers_version": avalon_layers.__version__,
        "arrays": [{"key": k, "dtype": a.dtype.str, "shape": list(a.shape), "sha256": _array_digest(a)}
                   for k, a in arrays.items()],
    }
    if version >= _TREE:
        meta["tree"] = tree
    return meta


def _write_archive(f, arrays, meta) -> None:
    # ZIP_STORED: uncompressed, so numpy.load can memory-map-like read each entry cheaply.
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(METADATA_ENTRY, json.dumps(meta, indent=1, allow_nan=False))
        for key, arr in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, arr, allow_pickle=False)


# -- atomic writes and the temporary files of killed saves ------------------------

def _atomic_write(path: str, write) -> None:
    """Run write(file) on a temporary file beside `path`, then rename it over
    `path`; on any failure the temporary file is removed and `path` is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    _remove_abandoned_temp_files(directory, base)
    f, tmp = _new_locked_temp_file(directory, base)
    try:
        with f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if os.name != "nt":
                os.replace(tmp, path)  # still locked: no other save's cleanup can take the file first
        if os.name == "nt":
            os.replace(tmp, path)  # Windows cannot rename an open file
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)


def _temp_file_pattern(base: str):
    return re.compile(re.escape(f".{base}.") + r"[0-9a-f]{12}\.tmp\Z")


def _new_locked_temp_file(directory: str, base: str):
    """(open file, its path): a new temporary file beside the target, locked so
    that other saves to the same path know it is being written."""
    while True:
        tmp = os.path.join(directory, f".{base}.{uuid.uuid4().hex[:12]}.tmp")
        f = open(tmp, "xb")  # "x": never clobber; the umask sets the mode, as for open(path, "wb")
        try:
            if not _lock(f.fileno(), wait=True) or os.fstat(f.fileno()).st_nlink > 0:
                return f, tmp
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        # another save's cleanup removed it in the instant between creating and locking it
        f.close()


def _lock(fd: int, wait: bool) -> bool:
    """Take the exclusive lock of an open file; False where it is held by
    another open file (when not waiting) or where locks are unavailable."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _remove_abandoned_temp_files(directory: str, base: str) -> None:
    """Delete the temporary files of saves to this path that no process writes
    any more (a save killed midway).  Only files named as this path's
    temporary files are candidates, and only unlocked ones are removed: a live
    save holds the lock of its file until it has renamed it."""
    pattern = _temp_file_pattern(base)
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if pattern.match(name):
            _remove_if_abandoned(os.path.join(directory, name))


def _remove_if_abandoned(tmp: str) -> None:
    if fcntl is None:
        try:
            os.unlink(tmp)  # Windows refuses while a live save has it open
        except OSError:
            pass
        return
    try:
        fd = os.open(tmp, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))  # write access: NFS needs it to lock
    except OSError:
        return
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or not _lock(fd, wait=False):
            return
        # The name may have moved on since we opened it (renamed to the target): remove only this file.
        now = os.stat(tmp, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino):
            os.unlink(tmp)
    except OSError:
        pass
    finally:
        os.close(fd)


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

# What reading damaged zip bytes raises besides BadZipFile: a flipped compression method or flag bit
# (NotImplementedError, a RuntimeError "encrypted", zlib.error), sizes and offsets past the end (OSError,
# EOFError, OverflowError), garbled zip64 fields (struct.error), undecodable names (UnicodeDecodeError,
# a ValueError).  A CheckpointError is a ValueError too: it is re-raised as it is.
_DAMAGE = (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, RuntimeError,
           OverflowError, struct.error, zlib.error)


@export("toplevel", "Checkpoints")
def load(path, model=None, strict: bool = True):
    """Read a checkpoint written by avalon.save.

    Returns what was saved: the state dict (an OrderedDict of NumPy arrays, in
    saved order), or, for a nested state (an optimizer's), its dicts, lists
    and tuples with NumPy arrays in them.  With `model`, loads it into the
    model (``model.load_state_dict(state, strict)``, which also puts the arrays
    on the model's device; an optimizer's ``load_state_dict(state)``) and
    returns the model.

    In a data-parallel job rank 0 reads the file and sends its contents to
    every rank (no shared file system needed): every rank loads the same state."""
    path = os.fspath(path)
    state = _on_rank_zero(lambda: _read(path)) if _ranks() > 1 else _read(path)
    if model is None:
        return state
    if isinstance(model, Module):
        model.load_state_dict(state, strict=strict)
    else:
        model.load_state_dict(state)
    return model


def _read(path):
    with open(path, "rb") as f:
        return _read_checkpoint(path, f)


def _error(path, what) -> CheckpointError:
    return CheckpointError(f"cannot load checkpoint {path!r}: {what}")


def _read_checkpoint(path, f):
    head = f.read(len(_ZIP_MAGIC))
    if not head:
        raise _error(path, "the file is empty")
    if head != _ZIP_MAGIC:
        raise _error(path, f"not an Avalon checkpoint: it does not start with the zip/npz signature "
                           f"(first bytes {head!r})")
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as zf:
            meta = _read_metadata(path, zf)
            return _LOADERS[meta["format_version"]](path, zf, meta)
    except CheckpointError:
        raise
    except _DAMAGE as e:
        raise _error(path, f"truncated or corrupt archive ({type(e).__name__}: {e})") from None


def _read_metadata(path, zf) -> dict:
    if METADATA_ENTRY not in zf.namelist():
        raise _error(path, f"no {METADATA_ENTRY} entry, so it was not written by avalon.save (a plain "
                           "numpy .npz, or a PyTorch file? load those with numpy.load / torch.load and "
                           "pass {name: array} to load_state_dict)")
    try:
        meta = json.loads(zf.read(METADATA_ENTRY).decode("utf-8"))
    except (zipfile.BadZipFile, ValueError, RecursionError) as e:
        raise _error(path, f"unreadable {METADATA_ENTRY} ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise _error(path, f"{METADATA_ENTRY} does not describe an {FORMAT_NAME!r} file")
    version = meta.get("format_version")
    if type(version) is not int or version not in _LOADERS:
        newer = type(version) is int and version > FORMAT_VERSION
        hint = (f"it was written by a newer avalon-layers; upgrade avalon-layers (this one reads format "
                f"versions {sorted(_LOADERS)})" if newer else f"readable versions are {sorted(_LOADERS)}")
        raise _error(path, f"unknown format version {version!r}: {hint}")
    return meta


class _ManifestEntry:
    __slots__ = ("key", "dtype", "shape", "digest")

    def __init__(self, entry):
        if not isinstance(entry, dict):
            raise TypeError(f"{entry!r} is not an object")
        key, dtype, shape, digest = entry["key"], entry["dtype"], entry["shape"], entry["sha256"]
        if not isinstance(key, str) or not key:
            raise TypeError(f"key {key!r} is not a non-empty string")
        if not isinstance(dtype, str):
            raise TypeError(f"dtype {dtype!r} is not a string")
        self.dtype = np.dtype(dtype)
        if self.dtype.hasobject:
            raise TypeError(f"dtype {dtype!r} holds Python objects")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise TypeError(f"shape {shape!r} is not a list of sizes")
        if not isinstance(digest, str):
            raise TypeError(f"sha256 {digest!r} is not a string")
        self.key, self.shape, self.digest = key, tuple(shape), digest


def _manifest(path, meta) -> list:
    def malformed(what):
        return _error(path, f"malformed array manifest in {METADATA_ENTRY} ({what})")
    if "arrays" not in meta:
        raise malformed("no 'arrays'")
    if not isinstance(meta["arrays"], list):
        raise malformed("'arrays' is not a list")
    manifest, seen = [], set()
    for i, raw in enumerate(meta["arrays"]):
        try:
            entry = _ManifestEntry(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise malformed(f"entry {i}: {e}") from None
        if entry.key in seen:
            raise malformed(f"array {entry.key!r} is listed twice")
        seen.add(entry.key)
        manifest.append(entry)
    return manifest


def _load_v1(path, zf, meta) -> "OrderedDict[str, np.ndarray]":
    manifest = _manifest(path, meta)
    entries = {n for n in zf.namelist() if n != METADATA_ENTRY}
    listed = {entry.key + ".npy" for entry in manifest}
    if entries - listed:
        raise _error(path, f"entries not in the manifest: {', '.join(sorted(entries - listed))}")
    return OrderedDict((entry.key, _read_array(path, zf, entry)) for entry in manifest)


def _read_array(path, zf, entry: _ManifestEntry) -> np.ndarray:
    try:
        info = zf.getinfo(entry.key + ".npy")
    except KeyError:
        raise _error(path, f"array {entry.key!r} is listed in the manifest but missing from the archive") from None
    try:
        with zf.open(info) as f:
            arr = _read_npy(path, f, entry)
    except CheckpointError:
        raise
    except _DAMAGE as e:
        # zipfile checks each entry's CRC-32 on read: flipped bytes land here.
        raise _error(path, f"array {entry.key!r} is corrupt ({e})") from None
    if _array_digest(arr) != entry.digest:
        raise _error(path, f"checksum mismatch for array {entry.key!r}: its bytes were altered after saving")
    return arr


def _read_npy(path, f, entry: _ManifestEntry) -> np.ndarray:
    """The array of an open .npy entry, whose header must agree with the
    manifest before any memory is set aside for the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    if dtype != entry.dtype or tuple(shape) != entry.shape:
        raise _error(path, f"array {entry.key!r} is {dtype.str} {tuple(shape)}, but the manifest says "
                           f"{entry.dtype.str} {entry.shape}")
    count = math.prod(entry.shape)
    data = _read_exactly(f, count * entry.dtype.itemsize)
    if f.read(1):
        raise ValueError("the entry holds more bytes than its header describes")
    if not data:
        return np.zeros(entry.shape, entry.dtype)
    flat = np.frombuffer(data, entry.dtype, count)  # writable: data is a bytearray
    return flat.reshape(entry.shape[::-1]).T if fortran_order else flat.reshape(entry.shape)


def _read_exactly(f, n: int) -> bytearray:
    """n bytes read in chunks, so that a damaged size never reserves more memory than the file holds."""
    data = bytearray()
    while len(data) < n:
        chunk = f.read(min(_READ_CHUNK, n - len(data)))
        if not chunk:
            raise EOFError(f"the entry ends after {len(data)} of its {n} bytes of data")
        data += chunk
    return data


def _load_v2(path, zf, meta):
    arrays = _load_v1(path, zf, meta)
    if "tree" not in meta:
        raise _error(path, f"malformed tree in {METADATA_ENTRY} (no 'tree')")
    try:
        return _decode(meta["tree"], arrays)
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise _error(path, f"malformed tree in {METADATA_ENTRY} ({e})") from None


def _decode(node, arrays):
    """The value a version-2 tree node stands for (the inverse of _encode)."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if not (isinstance(node, dict) and len(node) == 1):
        raise ValueError(f"{node!r:.80} is not a tree node")
    ((tag, body),) = node.items()
    if tag == "dict" and isinstance(body, list):
        return {_decoded_key(pair): _decode(pair[1], arrays) for pair in body}
    if tag in ("list", "tuple") and isinstance(body, list):
        items = [_decode(v, arrays) for v in body]
        return tuple(items) if tag == "tuple" else items
    if tag == "array" and isinstance(body, str):
        return arrays[body]
    if tag == "scalar" and isinstance(body, str) and arrays[body].ndim == 0:
        return arrays[body][()]
    if tag == "float" and body in ("nan", "inf", "-inf"):
        return float(body)
    raise ValueError(f"{node!r:.80} is not a tree node")


def _decoded_key(pair):
    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int))
            and not isinstance(pair[0], bool)):
        raise ValueError(f"{pair!r:.80} is not a [key, value] pair")
    return pair[0]


#: format version -> loader(path, zipfile, metadata) -> state dict
_LOADERS = {1: _load_v1, 2: _load_v2}
