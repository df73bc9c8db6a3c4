"""Code objects of the Python source Avalon generates (a compiled step's module,
each C kernel's wrapper), cached on disk beside the kernels.

Compiling that source costs 0.1-2 ms a module, and a step compiles dozens:
about 10 ms of a step's first call when its kernels are already in the disk
cache.  `code_of` loads the code object with marshal instead (tens of
microseconds), as Python's own .pyc files do.

- Key: the sha256 of the interpreter's bytecode magic number (a code object is
  only valid for the Python that made it), the file name the code reports in
  tracebacks and the source.
- Entry: `cache_dir()/python/<key>.code`, the marshalled code object followed by
  the sha256 of the key and the marshalled bytes; an entry that fails that check
  or does not load is compiled again and rewritten (logged at debug level).
- Atomic: written to a temporary file of its own, then renamed over the entry.
- Never fatal: without a writable cache directory the source is compiled in
  memory, as before.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import marshal
import os
import secrets
from functools import lru_cache
from pathlib import Path

from ..errors import AvalonError
from .native import cache_dir

_log = logging.getLogger(__name__)

_DIGEST_LEN = 32
SUBDIRECTORY = "python"


@lru_cache(maxsize=1024)
def code_of(source: str, filename: str):
    """The code object of `source` compiled in "exec" mode as `filename`."""
    key = hashlib.sha256(importlib.util.MAGIC_NUMBER + filename.encode() + b"\0" + source.encode()).hexdigest()
    directory = _directory()
    entry = directory / f"{key}.code" if directory is not None else None
    code = _load(entry, key) if entry is not None else None
    if code is None:
        code = compile(source, filename, "exec")
        if entry is not None:
            _store(entry, key, code)
    return code


def _directory() -> Path | None:
    try:
        directory = cache_dir() / SUBDIRECTORY
        directory.mkdir(exist_ok=True)
        return directory
    except (OSError, AvalonError) as exc:
        _log.debug("no code cache (%s): compiling in memory", exc)
        return None


def _digest(key: str, payload: bytes) -> bytes:
    return hashlib.sha256(key.encode() + payload).digest()


def _load(entry: Path, key: str):
    try:
        data = entry.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        _log.debug("cannot read %s (%s): compiling again", entry, exc)
        return None
    payload, digest = data[:-_DIGEST_LEN], data[-_DIGEST_LEN:]
    if len(data) <= _DIGEST_LEN or digest != _digest(key, payload):
        _log.debug("%s is damaged (%d bytes, checksum mismatch): compiling again", entry, len(data))
        return None
    try:
        return marshal.loads(payload)
    except (EOFError, ValueError, TypeError) as exc:
        _log.debug("cannot load %s (%s): compiling again", entry, exc)
        return None


def _store(entry: Path, key: str, code) -> None:
    payload = marshal.dumps(code)
    temporary = entry.with_name(f".{entry.stem}-{os.getpid()}-{secrets.token_hex(6)}.tmp")
    try:
        temporary.write_bytes(payload + _digest(key, payload))
        os.replace(temporary, entry)
    except OSError as exc:
        _log.debug("cannot write %s (%s): kept in memory only", entry, exc)
        temporary.unlink(missing_ok=True)


def clear() -> int:
    """Remove the cached code objects; return how many were removed."""
    directory = cache_dir() / SUBDIRECTORY
    removed = 0
    if directory.is_dir():
        for path in directory.iterdir():
            try:
                path.unlink()
                removed += path.suffix == ".code"
            except FileNotFoundError:
                pass
    return removed
