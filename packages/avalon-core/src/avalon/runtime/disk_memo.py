"""Values kept on disk between processes, beside the compiled kernels: what a
step's compilation computes again in every process although its inputs did
not change (the code objects of generated Python, lowered kernels).

    memo = DiskMemo("python", ".code", marshal.dumps, marshal.loads)
    found, value = memo.get(key)        # key: a hex digest of everything the value depends on
    if not found:
        value = compute()
        memo.put(key, value)

- Entry: `cache_dir()/<subdirectory>/<key><suffix>`, the serialized value
  followed by the sha256 of the key and the serialized bytes; an entry that
  fails that check or does not load reads as missing (logged at debug level),
  and the next `put` rewrites it.
- Atomic: written to a temporary file of its own, then renamed over the entry.
- Never fatal: without a writable cache directory `get` finds nothing and
  `put` keeps nothing.
- Bounded: entries count towards the cache's size limit (runtime.kernel_cache),
  which removes the least recently used first.
"""
from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path

from ..errors import AvalonError
from . import kernel_cache
from .native import cache_dir

_log = logging.getLogger(__name__)

_DIGEST_LEN = 32
#: the environment variables that say where cache_dir() is
_WHERE = ("AVALON_CACHE_DIR", "XDG_CACHE_HOME", "HOME")


class DiskMemo:
    def __init__(self, subdirectory: str, suffix: str, dumps, loads):
        self.subdirectory, self.suffix, self.dumps, self.loads = subdirectory, suffix, dumps, loads
        self._made: dict = {}    # the environment that names the cache -> the directory made for it

    def directory(self) -> Path | None:
        where = tuple(os.environ.get(name) for name in _WHERE)
        if where in self._made:     # made already: no syscalls on the cached path
            return self._made[where]
        try:
            directory = cache_dir() / self.subdirectory
            directory.mkdir(exist_ok=True)
        except (OSError, AvalonError) as exc:
            _log.debug("no %s cache (%s): nothing kept between processes", self.subdirectory, exc)
            directory = None
        self._made[where] = directory
        return directory

    def get(self, key: str) -> tuple[bool, object]:
        """(True, value) for an intact entry, else (False, None)."""
        directory = self.directory()
        if directory is None:
            return False, None
        entry = directory / f"{key}{self.suffix}"
        try:
            data = entry.read_bytes()
        except FileNotFoundError:
            return False, None
        except OSError as exc:
            _log.debug("cannot read %s (%s)", entry, exc)
            return False, None
        payload, digest = data[:-_DIGEST_LEN], data[-_DIGEST_LEN:]
        if len(data) <= _DIGEST_LEN or digest != _digest(key, payload):
            _log.debug("%s is damaged (%d bytes, checksum mismatch): computing it again", entry, len(data))
            return False, None
        try:
            return True, self.loads(payload)
        except Exception as exc:  # noqa: BLE001 - any failure to deserialize reads as a missing entry
            _log.debug("cannot load %s (%s): computing it again", entry, exc)
            return False, None

    def put(self, key: str, value) -> None:
        directory = self.directory()
        if directory is None:
            return
        entry = directory / f"{key}{self.suffix}"
        payload = self.dumps(value)
        temporary = directory / f".{key}-{os.getpid()}-{secrets.token_hex(6)}.tmp"
        try:
            temporary.write_bytes(payload + _digest(key, payload))
            os.replace(temporary, entry)
        except OSError as exc:
            _log.debug("cannot write %s (%s): kept in memory only", entry, exc)
            temporary.unlink(missing_ok=True)
            return
        kernel_cache.note_write(len(payload) + _DIGEST_LEN)


def _digest(key: str, payload: bytes) -> bytes:
    return hashlib.sha256(key.encode() + payload).digest()
