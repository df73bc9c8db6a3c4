"""The directory that keeps compiled kernels and memos between processes: where
it is, how much it holds, and keeping it under a size limit.

    from avalon.runtime import kernel_cache
    kernel_cache.cache_dir()          # $AVALON_CACHE_DIR, else $XDG_CACHE_HOME/avalon/kernels,
                                      # else ~/.cache/avalon/kernels
    kernel_cache.usage()              # Usage(files=..., bytes=...)
    kernel_cache.prune()              # drop the least recently used files down to the limit
    kernel_cache.clear_cache()        # drop everything

    python -m avalon.cache [--prune [SIZE] | --clear]

What it holds: `<key>.so` shared objects at the top (runtime.native), and one
subdirectory per DiskMemo (lowered kernels, code objects of generated Python,
tuning choices, compiler versions) plus `failed/` (sources that did not
compile). Every key hashes what the value depends on, so an entry never goes
stale; it only stops being asked for (a new Avalon release, an edited model).

Size limit: `AVALON_CACHE_SIZE` (bytes, or a number with K, M, G or T: "500M",
"2G"; "0" or "none" for no limit), else DEFAULT_LIMIT. Writers call
`note_write()`; once a day per cache directory (a stamp file says when any
process last did), or sooner once a process has written a quarter of the
limit, a background thread measures the directory, and when it is over the
limit removes the least recently used files until it is under LOW_WATER of
the limit, so that pruning does not run again at the next write. "Used" is the later of a file's modification and access time:
runtime.native touches a shared object each time a process loads it, and the
small memo files rely on the access time that Linux's default `relatime`
mount option keeps (updated at most daily; on a `noatime` filesystem they age
from their writing). Removing a file another process is about to read is
safe: the reader finds it missing and computes it again, and a library
already loaded stays mapped.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import AvalonError

_log = logging.getLogger(__name__)

__all__ = ["cache_dir", "cache_path", "clear_cache", "usage", "prune", "size_limit", "parse_size", "note_write",
           "touch", "wait_for_prune", "Usage", "Pruned", "CacheDirError", "CacheSizeError", "DEFAULT_LIMIT", "LOW_WATER",
           "PRUNE_INTERVAL_S"]

DEFAULT_LIMIT = 2 << 30            # 2 GiB: about ten models' kernels over many releases
LOW_WATER = 0.8                     # a prune leaves the directory at this share of the limit
PRUNE_INTERVAL_S = 24 * 3600        # how often a process measures the directory at most
ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.so")   # runtime.native's shared objects
TMP_PREFIX = "tmp-"                 # runtime.native's files being compiled
ORPHAN_AGE_S = 600                  # a temp file this old belongs to a process that died
_BLOCK = 4096                       # a file's disk space, for note_write's estimate
STAMP = ".measured"                 # touched by each prune: when the directory was last measured
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class CacheSizeError(AvalonError):
    """AVALON_CACHE_SIZE does not say a size."""


class CacheDirError(AvalonError):
    """The cache directory cannot be made or named."""


@dataclass(frozen=True)
class Usage:
    files: int
    bytes: int


@dataclass(frozen=True)
class Pruned:
    removed: int        # files removed
    freed: int          # their bytes
    left: Usage         # what the directory holds now
    limit: int | None   # the limit pruned to (None: no limit, nothing removed)


# -- where -----------------------------------------------------------------------------------

def cache_dir() -> Path:
    """$AVALON_CACHE_DIR, else $XDG_CACHE_HOME/avalon/kernels, else ~/.cache/avalon/kernels;
    created on demand."""
    path = cache_path()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheDirError(f"cannot create the kernel cache directory {path} ({exc}); "
                          f"set AVALON_CACHE_DIR to a writable directory") from None
    return path


def cache_path() -> Path:
    """Where the cache is, without creating it."""
    explicit = os.environ.get("AVALON_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore a relative path
        return Path(xdg) / "avalon" / "kernels"
    try:
        return Path.home() / ".cache" / "avalon" / "kernels"
    except RuntimeError:
        raise CacheDirError("no home directory to hold the kernel cache; "
                          "set AVALON_CACHE_DIR to a writable directory") from None


# -- what it holds ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _File:
    path: str
    size: int
    used: float


def _files(directory: Path) -> list[_File]:
    """The cache's files: shared objects at the top, everything in its subdirectories,
    and temp files that dead processes left (not those of writes running now)."""
    found = []
    for top in _scan(directory):
        if top.is_dir(follow_symlinks=False):
            found.extend(_file(entry) for entry in _scan(Path(top.path))
                         if entry.is_file(follow_symlinks=False) and not _in_progress(entry))
        elif ENTRY_NAME.fullmatch(top.name) or (top.name.startswith(TMP_PREFIX) and not _in_progress(top)):
            found.append(_file(top))
    return [f for f in found if f is not None]


def _in_progress(entry: os.DirEntry) -> bool:
    """A temp file (runtime.native's "tmp-...", DiskMemo's ".<key>-...tmp") younger than
    ORPHAN_AGE_S: a write running now in some process."""
    if not (entry.name.startswith(TMP_PREFIX) or entry.name.startswith(".")):
        return False
    held = _file(entry)
    return held is not None and time.time() - held.used <= ORPHAN_AGE_S


def _scan(directory: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return list(it)
    except OSError:     # missing, not a directory, unreadable: nothing of it to count or remove
        return []


def _file(entry: os.DirEntry) -> _File | None:
    try:
        st = entry.stat(follow_symlinks=False)
    except OSError:     # removed by another process meanwhile
        return None
    return _File(entry.path, _disk_bytes(st), max(st.st_mtime, st.st_atime))


def _disk_bytes(st: os.stat_result) -> int:
    """The disk space a file takes (its blocks: a 300-byte memo file holds a whole 4 KiB
    block), what `du` counts and the limit means; its length where blocks are unknown."""
    blocks = getattr(st, "st_blocks", None)
    return blocks * 512 if blocks is not None else st.st_size


def usage() -> Usage:
    """How many files the cache holds and the disk space they take, in bytes (0, 0 when
    it does not exist)."""
    files = _files(cache_path())
    return Usage(len(files), sum(f.size for f in files))


# -- the limit -------------------------------------------------------------------------------

def size_limit() -> int | None:
    """The cache's size limit in bytes from AVALON_CACHE_SIZE, else DEFAULT_LIMIT; None: no limit."""
    text = os.environ.get("AVALON_CACHE_SIZE")
    if text is None or not text.strip():
        return DEFAULT_LIMIT
    return parse_size(text)


def parse_size(text: str) -> int | None:
    if text.strip().lower() in ("0", "none", "unlimited"):
        return None
    match = _SIZE.fullmatch(text)
    if match is None:
        raise CacheSizeError(f"AVALON_CACHE_SIZE={text!r} is not a size: give bytes or a number with "
                             f"K, M, G or T (\"500M\", \"2G\"), or 0 for no limit")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


_FROM_ENV = object()


def prune(limit=_FROM_ENV) -> Pruned:
    """Remove the least recently used files until the cache holds at most LOW_WATER of
    `limit` bytes (an int, or None for no limit; default size_limit()); nothing when it
    is under the limit already."""
    limit = size_limit() if limit is _FROM_ENV else limit
    directory = cache_path()
    files = _files(directory)
    total = sum(f.size for f in files)
    removed = freed = 0
    if limit is not None and total > limit:
        target = int(limit * LOW_WATER)
        for f in sorted(files, key=lambda f: f.used):
            if total - freed <= target:
                break
            if _unlink(f.path):
                removed += 1
                freed += f.size
    _stamp(directory)
    return Pruned(removed, freed, Usage(len(files) - removed, total - freed), limit)


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:     # another process removed it first, or it cannot be removed: kept
        return False


def _stamp(directory: Path) -> None:
    """Record that the directory was measured now, for every process."""
    try:
        (directory / STAMP).touch()
    except OSError:
        pass


def _measured_ago(directory: Path) -> float:
    try:
        return time.time() - (directory / STAMP).stat().st_mtime
    except OSError:
        return float("inf")


# per cache directory: (when this process last looked at the stamp, bytes it wrote since)
_state: dict[str, tuple[float, int]] = {}
_lock = threading.Lock()
_pruner: threading.Thread | None = None


def note_write(nbytes: int) -> None:
    """Writers call this after adding `nbytes` to the cache. When a prune is due (no
    process measured the directory for PRUNE_INTERVAL_S, or this process wrote a quarter
    of the limit since it last looked), one runs on a background thread, so the
    writer never waits for the directory scan."""
    global _pruner
    limit = size_limit()
    if limit is None:
        return
    directory = cache_path()
    key, now = str(directory), time.monotonic()
    with _lock:
        looked, written = _state.get(key, (-float("inf"), 0))
        written += -(-nbytes // _BLOCK) * _BLOCK      # whole blocks, as the limit counts them
        due = written > limit // 4
        if not due and now - looked > PRUNE_INTERVAL_S:     # once a day per process: one stat
            looked = now
            due = _measured_ago(directory) > PRUNE_INTERVAL_S
        if due and _pruner is not None and _pruner.is_alive():
            due = False     # one is running: it sees this write too
        if due:
            looked, written = now, 0
            _pruner = threading.Thread(target=_prune_quietly, args=(limit,), daemon=True,
                                       name="avalon-cache-prune")
        _state[key] = (looked, written)
        if due:
            _pruner.start()


def _prune_quietly(limit: int) -> None:
    try:
        pruned = prune(limit)
    except Exception as exc:  # noqa: BLE001 - a cache that cannot be pruned still works
        _log.debug("pruning the kernel cache failed (%s)", exc)
        return
    if pruned.removed:
        _log.info("kernel cache over its limit of %s: removed the %d least recently used files (%s)",
                  _human(limit), pruned.removed, _human(pruned.freed))


def wait_for_prune(timeout: float | None = None) -> None:
    """Wait for a background prune that note_write started (tests, tools)."""
    pruner = _pruner
    if pruner is not None:
        pruner.join(timeout)


def touch(path) -> None:
    """Mark a file as used now (for the least-recently-used order), where the filesystem allows."""
    try:
        os.utime(path)
    except OSError:     # read-only cache, or removed meanwhile: only the order suffers
        pass


def clear_cache() -> int:
    """Remove every file the cache holds (temp files of compiles running now excepted);
    return how many shared objects were removed. Libraries already loaded in this
    process stay loaded and usable."""
    directory = cache_path()
    removed = 0
    for f in _files(directory):
        if _unlink(f.path) and ENTRY_NAME.fullmatch(os.path.basename(f.path)):
            removed += 1
    return removed


def _reset_for_tests() -> None:
    wait_for_prune()
    with _lock:
        _state.clear()


# -- command line ----------------------------------------------------------------------------

def _human(n: int | None) -> str:
    if n is None:
        return "no limit"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m avalon.cache",
                                     description="Show, prune or clear Avalon's kernel cache.")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--prune", nargs="?", const="env", metavar="SIZE",
                        help="remove the least recently used files down to SIZE (default: the limit)")
    action.add_argument("--clear", action="store_true", help="remove every file")
    args = parser.parse_args(argv)
    try:
        if args.clear:
            clear_cache()
        elif args.prune is not None:
            pruned = prune(size_limit() if args.prune == "env" else parse_size(args.prune))
            print(f"removed {pruned.removed} files, {_human(pruned.freed)}")
        held = usage()
        print(f"{cache_path()}: {held.files} files, {_human(held.bytes)} (limit: {_human(size_limit())})")
    except AvalonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
