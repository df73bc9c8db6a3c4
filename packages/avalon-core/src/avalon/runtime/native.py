"""C kernels built with the system C compiler into shared objects, cached on
disk, loaded with ctypes.

    from avalon.runtime import native
    if native.available():
        lib = native.build(source)                      # compiled once, then cached
        axpy = native.bind(lib, "axpy", (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long))
        axpy(x.ctypes.data, y.ctypes.data, x.size)
    else:
        native.warn_fallback_once("elementwise fusion")  # one RuntimeWarning per process

The compiler is `$CC` (which may carry arguments, "ccache gcc"), else the
first of cc, gcc, clang on PATH; it is detected once per process.

Disk cache (`cache_dir()`): one file `<key>.so` per build, where key is the
sha256 of the source, the compiler (path, arguments, first line of
`--version`), the flags, the machine (and the CPU model and feature flags when
a flag says "native", so a home directory shared by different hosts never
hands one a kernel with instructions it lacks) and FORMAT_VERSION.

- Atomic: each build compiles to a file of its own in the cache directory,
  loads it, and only then renames it over `<key>.so` (os.replace). Two
  processes building the same source both compile and both rename; the last
  rename wins and either file is whole, so readers see an old entry, a new one
  or none, never a partial one.
- Checked: every entry ends in a 48-byte trailer, a magic string and the
  sha256 of the key and the ELF image. dlopen maps only what the program
  headers name, so the trailer is never read by the loader; verifying it
  before loading catches what dlopen's OSError cannot: damage inside the code
  (a flipped or garbage byte in .text loads fine and then computes garbage or
  crashes the process). Zero-length, truncated or garbage entries fail the
  check and are rebuilt transparently (logged at debug level on
  "avalon.runtime.native").
- A failing compile keeps the source and the full compiler output under
  `cache_dir()/failed/` and raises NativeBuildError with the trimmed stderr.
- Bounded: runtime.kernel_cache keeps the directory under its size limit
  (AVALON_CACHE_SIZE), removing the least recently used files first; a load
  from the disk marks an entry used.

In-process: `build` returns the same CDLL for the same (compiler, flags,
source) without hashing or touching the disk. A lock guards that memory cache
and a lock per key makes threads building the same new source compile it once;
different sources compile in parallel.

Calls: functions from a ctypes.CDLL release the GIL for the whole call (unlike
ctypes.PyDLL), so engine threads calling kernels run in parallel; the tests
check it. `bind` sets argtypes and restype once, which is the cheap way to call:
pass array pointers as ints with c_void_p argtypes, read from `array.ctypes.data`
once per buffer where possible. Measured per call of a 3-argument function:
0.5 us with ints kept, 2.8 us reading array.ctypes.data each time, 7.3 us with
numpy.ctypeslib.ndpointer argtypes (which check dtype and flags).

Vector math (libmvec), as verified with gcc 12 and glibc 2.36 on x86_64:
`-O3 -fno-math-errno` (with or without -ftree-vectorize, -fno-trapping-math,
-march=native) does NOT call glibc's vector variants (_ZGVdN8v_expf, ...) by
itself: glibc's math.h declares them only under __FAST_MATH__, and
-ffast-math also assumes no NaN or inf, which Avalon's anomaly checks need.
Redeclaring the functions with `__attribute__((simd("notinbranch")))` (what
`simd_math_declarations()` returns) does: -O3 (or -O2 -ftree-vectorize; plain
-O2 does not) with -fno-math-errno then
vectorizes expf loops into _ZGVdN8v_expf / _ZGVeN16v_expf (-march=native on
AVX-512) or _ZGVbN4v_expf (baseline x86_64), and "-lm" links libmvec too
(glibc's libm.so is a linker script naming libmvec AS_NEEDED); without
-fno-math-errno nothing is vectorized. Measured accuracy of the vector
variants: expf 2.6 ulp, logf 3.6 ulp, tanhf 1.4 ulp at most (scalar glibc:
under 1 ulp), inf and NaN as the scalar ones. Per-lane accumulators for
reductions are the renderer's job (no -ffast-math, so no reassociation).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import platform
import re
import secrets
import shlex
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from ..errors import AvalonError, warn_at_user
from . import kernel_cache

__all__ = ["NativeUnavailable", "NativeBuildError", "CompilerInfo", "compiler", "available",
           "default_flags", "build", "is_built", "cache_key", "load_built", "bind", "cache_dir", "clear_cache",
           "warn_fallback_once", "simd_math_declarations", "FORMAT_VERSION"]

#: part of every cache key: bump when the entry format or the build protocol changes
FORMAT_VERSION = 1
#: a generated source that takes longer than this is a bug, not a big kernel
COMPILE_TIMEOUT_S = 600
#: stderr lines quoted in a NativeBuildError (the whole output is kept in a file)
STDERR_LINES = 30

_CANDIDATES = ("cc", "gcc", "clang")
_MARCH_NATIVE = "-march=native"
_FLAGS = ("-O3", _MARCH_NATIVE, "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared", "-lm")
_MAGIC = b"AVALON-KERNEL-v1"          # 16 bytes, then the 32-byte sha256
_TRAILER_LEN = len(_MAGIC) + 32
_PROBE_SOURCE = "int avalon_probe(void) { return 42; }\n"

_log = logging.getLogger(__name__)


class NativeUnavailable(AvalonError):
    """No usable C compiler: native kernels cannot be built; Avalon runs NumPy kernels."""


class NativeBuildError(AvalonError):
    """A C source that did not compile or load, or a cache directory that cannot be used."""


@dataclass(frozen=True)
class CompilerInfo:
    path: str                 # absolute path of the program run
    version: str              # first line of its `--version`
    argv: tuple[str, ...]     # the command prefix: path plus any arguments $CC carried


class _Probe(NamedTuple):
    usable: bool
    reason: str               # why not usable ("" when usable)
    flags: tuple[str, ...]    # default flags that work (without -march=native where refused)


_detect_lock = threading.Lock()
_probe_lock = threading.Lock()
_memory_lock = threading.Lock()       # guards _loaded, _key_locks and _warned
_detected: tuple[CompilerInfo | None, str] | None = None
_probed: _Probe | None = None
_loaded: dict[tuple, ctypes.CDLL] = {}
_loaded_keys: dict[str, ctypes.CDLL] = {}   # cache key -> library, for load_built
_key_locks: dict[str, threading.Lock] = {}
_warned = False


# -- the compiler ------------------------------------------------------------------------------

def compiler() -> CompilerInfo | None:
    """The C compiler: $CC if set, else the first of cc, gcc, clang on PATH; None if none runs.

    Detected once per process (set CC before the first use)."""
    return _detect()[0]


def _detect() -> tuple[CompilerInfo | None, str]:
    global _detected
    with _detect_lock:
        if _detected is None:
            _detected = _find_compiler()
        return _detected


def _find_compiler() -> tuple[CompilerInfo | None, str]:
    cc = os.environ.get("CC", "").strip()
    if cc:
        # an explicit CC that does not work is reported, not silently replaced by another compiler
        try:
            argv = shlex.split(cc)
        except ValueError as exc:
            return None, f"CC={cc!r} cannot be parsed ({exc})"
        path = shutil.which(argv[0])
        if path is None:
            return None, f"CC={cc!r} names no executable program"
        return _identify(path, argv[1:])
    found = [path for path in map(shutil.which, _CANDIDATES) if path]
    if not found:
        return None, f"none of {', '.join(_CANDIDATES)} is on PATH"
    reasons = []
    for path in found:
        info, reason = _identify(path, [])
        if info is not None:
            return info, ""
        reasons.append(reason)
    return None, "; ".join(reasons)


def _identify(path: str, extra: list[str]) -> tuple[CompilerInfo | None, str]:
    """The compiler at `path`: the first line of its --version, run once per compiler
    program (kept on disk by the program's real path, size and modification time;
    running it cost ~3 ms of every process's first compilation)."""
    argv = (path, *extra)
    memo, key = _versions(), _program_key(argv)
    if key is not None:
        found, version = memo.get(key)
        if found:
            return CompilerInfo(path=path, version=version, argv=argv), ""
    info, reason = _run_version(argv)
    if info is not None and key is not None:
        memo.put(key, info.version)
    return info, reason


_version_memo = None


def _versions():
    """The disk memo of compilers' versions (a DiskMemo: without a usable cache
    directory it finds and keeps nothing)."""
    from .disk_memo import DiskMemo    # disk_memo reads cache_dir from this module
    global _version_memo
    if _version_memo is None:
        _version_memo = DiskMemo("compilers", ".version", str.encode, bytes.decode)
    return _version_memo


def _program_key(argv) -> str | None:
    """What identifies a compiler program's --version: its command and the real path,
    size, modification time and inode of the program it runs; None when it cannot be read."""
    try:
        real = os.path.realpath(argv[0])
        st = os.stat(real)
    except OSError:
        return None
    text = f"{FORMAT_VERSION}\0{argv!r}\0{real}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    return hashlib.sha256(text.encode()).hexdigest()


def _run_version(argv) -> tuple[CompilerInfo | None, str]:
    path = argv[0]
    try:
        result = subprocess.run([*argv, "--version"], capture_output=True, text=True,
                                errors="replace", timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"{shlex.join(argv)} --version failed ({exc})"
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        return None, f"{shlex.join(argv)} --version exited with status {result.returncode}"
    return CompilerInfo(path=path, version=lines[0], argv=argv), ""


def available() -> bool:
    """True when a compiler exists and builds, loads and runs a trivial shared object.

    Checked once per process; the probe's object is cached on disk like any build."""
    return _probe().usable


def default_flags() -> tuple[str, ...]:
    """Flags `build` uses when given none: -O3 -march=native (dropped if the compiler refuses it,
    as gcc does on POWER) -fno-math-errno -fno-trapping-math -fPIC -shared -lm.

    -fno-math-errno lets gcc vectorize math calls (see `simd_math_declarations`);
    -fno-trapping-math lets it if-convert; no -ffast-math: NaN, inf and the order of
    floating-point sums stay as written. "-l" flags are passed after the source."""
    return _probe().flags


def _probe() -> _Probe:
    global _probed
    with _probe_lock:
        if _probed is None:
            _probed = _run_probe()
        return _probed


def _run_probe() -> _Probe:
    info, reason = _detect()
    if info is None:
        return _Probe(False, reason, _FLAGS)
    first_error = None
    for flags in (_FLAGS, tuple(f for f in _FLAGS if f != _MARCH_NATIVE)):
        try:
            if build(_PROBE_SOURCE, flags=flags, name="probe")["avalon_probe"]() == 42:
                return _Probe(True, "", flags)
        except AvalonError as exc:
            first_error = first_error or exc
    why = first_error or "the probe function returned a wrong value"
    return _Probe(False, f"{info.path} cannot build a shared object: {why}", _FLAGS)


def _unavailable_message(reason: str) -> str:
    return (f"no usable C compiler: {reason}. Install one (Debian/Ubuntu: apt-get install gcc; "
            f"Fedora: dnf install gcc; macOS: xcode-select --install) or set CC to a C compiler. "
            f"Until then Avalon falls back to its NumPy kernels (slower).")


def warn_fallback_once(what: str) -> bool:
    """Warn (RuntimeWarning, once per process) that `what` runs on NumPy kernels because no
    C compiler is usable. Does nothing when one is; returns whether it warned."""
    global _warned
    if available():
        return False
    with _memory_lock:
        if _warned:
            return False
        _warned = True
    warn_at_user(f"avalon: no C compiler found ({_probe().reason}); {what} runs on NumPy kernels, "
                 f"slower. Install one (Debian/Ubuntu: apt-get install gcc) or set CC.",
                 RuntimeWarning)
    return True


# -- building ----------------------------------------------------------------------------------

def build(source: str, *, flags: tuple[str, ...] | None = None, name: str = "kernels") -> ctypes.CDLL:
    """Compile the C `source` into a shared object (or find it cached) and load it.

    `flags` default to `default_flags()`; `name` only labels files and messages. The same
    process asking again for the same source, compiler and flags gets the same CDLL.
    Raises NativeUnavailable without a compiler, NativeBuildError when compiling fails."""
    info, reason = _detect()
    if info is None:
        raise NativeUnavailable(_unavailable_message(reason))
    if isinstance(flags, str):
        raise NativeBuildError(f"build(flags=...) takes a tuple of flags, not the string {flags!r}; "
                               f"write flags=({flags!r},) or split it")
    flags = default_flags() if flags is None else tuple(flags)
    memo = (info, flags, source)
    with _memory_lock:
        lib = _loaded.get(memo)
    if lib is not None:
        return lib
    key = _cache_key(source, info, flags)
    with _key_lock(key):
        with _memory_lock:
            lib = _loaded.get(memo)
        if lib is None:
            lib = _load_or_compile(source, info, flags, key, _safe_name(name))
            with _memory_lock:
                _loaded[memo] = _loaded_keys[key] = lib
    return lib


def cache_key(source: str, *, flags: tuple[str, ...] | None = None) -> str | None:
    """The disk cache's key of building `source` with `flags` (default_flags()) on this
    machine's compiler; None without a compiler. The key of a text that is not a whole
    source (one kernel of it, say) names that text for this compiler, flags and machine."""
    info, _ = _detect()
    if info is None:
        return None
    return _cache_key(source, info, default_flags() if flags is None else tuple(flags))


def load_built(key: str) -> ctypes.CDLL | None:
    """The library that `build` made under `key` (cache_key of its source), loaded in this
    process already or from the disk cache; None when it is not there or damaged.
    It never compiles: for finding a function in an object built with other ones."""
    with _memory_lock:
        lib = _loaded_keys.get(key)
    if lib is not None:
        return lib
    if not re.fullmatch(r"[0-9a-f]{64}", key):
        return None
    with _key_lock(key):
        try:
            lib = _load_entry(cache_dir() / f"{key}.so", key)
        except NativeBuildError:
            return None
        if lib is not None:
            with _memory_lock:
                lib = _loaded_keys.setdefault(key, lib)
    return lib


def is_built(source: str, *, flags: tuple[str, ...] | None = None) -> bool:
    """Whether `build(source, flags=flags)` would find its shared object without compiling:
    loaded in this process already, or in the disk cache (checked when it loads)."""
    info, _ = _detect()
    if info is None:
        return False
    flags = default_flags() if flags is None else tuple(flags)
    with _memory_lock:
        if (info, flags, source) in _loaded:
            return True
    try:
        return (cache_dir() / f"{_cache_key(source, info, flags)}.so").is_file()
    except NativeBuildError:
        return False


def _key_lock(key: str) -> threading.Lock:
    with _memory_lock:
        return _key_locks.setdefault(key, threading.Lock())


def _safe_name(name: str) -> str:
    # the name only labels kept files: keep it a plain file-name fragment
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))[:64] or "kernels"


def _cache_key(source: str, info: CompilerInfo, flags: tuple[str, ...]) -> str:
    # the small parts as JSON, the source hashed as it is (JSON-escaping a step's
    # hundreds of kilobytes of C took ~0.4 ms a build)
    parts = {"format": FORMAT_VERSION, "compiler": [info.path, info.version, list(info.argv)],
             "flags": list(flags), "machine": _machine(flags)}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    digest.update(b"\0")
    digest.update(source.encode())
    return digest.hexdigest()


def _machine(flags: tuple[str, ...]) -> str:
    if any("native" in flag for flag in flags):
        return f"{platform.machine()} {_cpu_fingerprint()}"
    return platform.machine()


@lru_cache(maxsize=1)
def _cpu_fingerprint() -> str:
    """The CPU model and feature flags: what -march=native compiles for."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor()
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part", "cpu")
    first = {}
    for line in text.splitlines():
        field, _, value = line.partition(":")
        if field.strip() in wanted:
            first.setdefault(field.strip(), value.strip())
    return hashlib.sha256(json.dumps(first, sort_keys=True).encode()).hexdigest()


def _load_or_compile(source, info, flags, key, name) -> ctypes.CDLL:
    entry = cache_dir() / f"{key}.so"
    lib = _load_entry(entry, key)
    if lib is None:
        lib = _compile_entry(source, info, flags, key, entry, name)
    return lib


def _load_entry(entry: Path, key: str) -> ctypes.CDLL | None:
    """The cached library, or None when it is missing or damaged (to be rebuilt)."""
    try:
        data = entry.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        _log.debug("cannot read %s (%s): rebuilding it", entry, exc)
        return None
    if not _trailer_ok(data, key):
        _log.debug("%s is damaged (%d bytes, checksum mismatch): rebuilding it", entry, len(data))
        return None
    try:
        lib = ctypes.CDLL(str(entry))
    except OSError as exc:  # intact but unloadable, e.g. a library it links was removed
        _log.debug("cannot load %s (%s): rebuilding it", entry, exc)
        return None
    kernel_cache.touch(entry)   # recently used: the last a size-limited cache removes
    return lib


def _digest(key: str, image: bytes) -> bytes:
    # the key is hashed too: an intact entry copied under another key's name is refused
    return hashlib.sha256(key.encode() + image).digest()


def _trailer_ok(data: bytes, key: str) -> bool:
    if len(data) <= _TRAILER_LEN or data[-_TRAILER_LEN:-32] != _MAGIC:
        return False
    return data[-32:] == _digest(key, data[:-_TRAILER_LEN])


_compiler_runs = [0]


def compiler_runs() -> int:
    """How many times this process ran the C compiler: shared objects not found in
    the disk cache (a compilation that ran none was warm)."""
    return _compiler_runs[0]


def _compile_entry(source, info, flags, key, entry: Path, name: str) -> ctypes.CDLL:
    _compiler_runs[0] += 1
    stem = f"{kernel_cache.TMP_PREFIX}{key[:16]}-{os.getpid()}-{secrets.token_hex(6)}"
    src, obj = entry.parent / f"{stem}.c", entry.parent / f"{stem}.so"
    try:
        src.write_text(source, encoding="utf-8")
        command = _command(info, flags, src, obj)
        result = _run(command, info, name)
        if result.returncode != 0:
            raise _compile_error(result, command, src, key, name)
        size = _seal(obj, key)
        lib = _load_fresh(obj, entry, name)
        os.replace(obj, entry)  # published only once it is whole and loads
        lib._name = str(entry)  # for messages and repr: the temp name it was loaded from is gone
        kernel_cache.note_write(size)
        return lib
    finally:
        src.unlink(missing_ok=True)
        obj.unlink(missing_ok=True)


def _seal(obj: Path, key: str) -> int:
    """Append the trailer; return the entry's size."""
    image = obj.read_bytes()
    with open(obj, "ab") as f:
        f.write(_MAGIC + _digest(key, image))
    return len(image) + _TRAILER_LEN


def _command(info: CompilerInfo, flags, src: Path, obj: Path) -> list[str]:
    # libraries after the source: linkers resolve -l only for objects named before it
    libraries = [flag for flag in flags if flag.startswith("-l")]
    options = [flag for flag in flags if not flag.startswith("-l")]
    return [*info.argv, *options, "-o", str(obj), str(src), *libraries]


def _run(command: list[str], info: CompilerInfo, name: str) -> subprocess.CompletedProcess:
    try:
        with _on_every_cpu():
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    errors="replace")
    except OSError as exc:
        raise NativeBuildError(f"cannot run the C compiler {info.path} ({exc}); "
                               f"check that it is installed, or set CC to another one") from None
    try:
        out, err = proc.communicate(timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise NativeBuildError(f"{info.path} ran longer than {COMPILE_TIMEOUT_S} s compiling "
                               f"{name!r}; the source is too large or the compiler hangs") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@contextlib.contextmanager
def _on_every_cpu():
    """The calling thread allowed on every CPU of this process while it starts a
    compiler: the compiler and the processes it starts (cc1, as, ld) inherit its
    CPUs, and a compilation finishing inside a split call runs in a thread held to
    one CPU (runtime.threads), where a CNN step's compilers, one per core, took
    1.9 s instead of 1.3 s."""
    cpus = process_cpus()
    try:
        mine = os.sched_getaffinity(0) if len(cpus) > 1 else cpus
    except OSError:
        mine = cpus
    widen = mine != cpus
    if widen:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:     # the CPUs restricted from outside: as it is
            widen = False
    try:
        yield
    finally:
        if widen:
            try:
                os.sched_setaffinity(0, mine)
            except OSError:
                pass


def _read_process_cpus() -> frozenset:
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):       # not Linux
        return frozenset()


_PROCESS_CPUS = _read_process_cpus()


def env_switch(name: str) -> bool:
    """Whether the switch `name` of the environment is on: unset, or anything but
    "0", "false", "off", "no" (any case)."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "off", "no")


def placing_threads() -> bool:
    """Whether the engine keeps its threads off their caller's CPU (runtime.threads,
    the segment driver's product helpers): yes unless AVALON_PIN_THREADS says no;
    read when a pool of threads starts, and when the segment driver is loaded."""
    return env_switch("AVALON_PIN_THREADS")


def process_cpus() -> frozenset:
    """The CPUs this process may run on, as the thread that imported Avalon saw them
    (a thread held to one CPU for a call later sees one); empty where unknown."""
    return _PROCESS_CPUS


def _load_fresh(obj: Path, entry: Path, name: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(obj))
    except OSError as exc:
        raise NativeBuildError(
            f"{name!r} compiled but cannot be loaded ({exc}). If {entry.parent} is on a "
            f"filesystem mounted noexec, set AVALON_CACHE_DIR to a directory on another one; "
            f"an undefined symbol means the source calls a function no linked library has"
        ) from None


def _compile_error(result, command, src: Path, key: str, name: str) -> NativeBuildError:
    kept, log = _keep_failure(src, result.stderr, key, name)
    stderr = result.stderr.replace(str(src), str(kept))
    rerun = {str(src): str(kept), command[command.index("-o") + 1]: str(kept.with_suffix(".so"))}
    command = [rerun.get(arg, arg) for arg in command]
    return NativeBuildError(
        f"the C compiler failed on {name!r} (exit status {result.returncode}):\n"
        f"{_trim(stderr, log)}\n"
        f"The source is kept at {kept} and the whole compiler output at {log}; "
        f"command: {shlex.join(command)}. Unless you wrote this source, it is a bug in the code "
        f"that rendered it: please report it with those two files.")


def _keep_failure(src: Path, stderr: str, key: str, name: str) -> tuple[Path, Path]:
    failed = src.parent / "failed"
    failed.mkdir(exist_ok=True)
    kept = failed / f"{name}-{key[:16]}.c"
    log = kept.with_suffix(".log")
    os.replace(src, kept)
    tmp = failed / f"{kernel_cache.TMP_PREFIX}{secrets.token_hex(6)}.log"
    tmp.write_text(stderr, encoding="utf-8")
    os.replace(tmp, log)
    return kept, log


def _trim(stderr: str, log: Path) -> str:
    lines = stderr.rstrip().splitlines()
    shown = [line[:300] for line in lines[:STDERR_LINES]]
    if len(lines) > STDERR_LINES:
        shown.append(f"... {len(lines) - STDERR_LINES} more lines in {log}")
    return "\n".join(shown) or "(the compiler printed nothing)"


# -- the cache directory -----------------------------------------------------------------------

def cache_dir() -> Path:
    """$AVALON_CACHE_DIR, else $XDG_CACHE_HOME/avalon/kernels, else ~/.cache/avalon/kernels;
    created on demand (runtime.kernel_cache, which also keeps it under its size limit)."""
    try:
        return kernel_cache.cache_dir()
    except kernel_cache.CacheDirError as exc:
        raise NativeBuildError(str(exc)) from None


def clear_cache() -> int:
    """Remove the cached shared objects (and kept failing sources, what runtime.disk_memo
    keeps: code objects of generated Python, lowered kernels; and temp files that dead
    processes left); return how many shared objects were removed.

    Libraries already loaded in this process stay loaded and usable."""
    return kernel_cache.clear_cache()


# -- calling -----------------------------------------------------------------------------------

def bind(lib: ctypes.CDLL, name: str, argtypes) -> ctypes._CFuncPtr:
    """The function `name` of `lib` with argtypes set and restype None, ready to call.

    Each call returns its own function object (lib[name], not lib.name, which ctypes shares),
    so two bindings of one symbol cannot overwrite each other's argtypes. The GIL is released
    during the call."""
    try:
        function = lib[name]
    except AttributeError:
        raise NativeBuildError(f"the kernel library {lib._name} has no function {name!r}; check the "
                               f"name in the rendered source (a static function is not exported)"
                               ) from None
    function.argtypes = tuple(argtypes)
    function.restype = None
    return function


# -- vector math -------------------------------------------------------------------------------

#: glibc release -> math functions whose x86_64 vector variants (libmvec) it added
_LIBMVEC = {
    (2, 22): ("exp", "log", "sin", "cos", "pow"),
    (2, 35): ("acos", "acosh", "asin", "asinh", "atan", "atanh", "cbrt", "cosh", "erf", "erfc",
              "exp10", "exp2", "expm1", "log10", "log1p", "log2", "sinh", "tan", "tanh",
              "atan2", "hypot"),
}
_BINARY = {"pow", "atan2", "hypot"}


def simd_math_declarations() -> str:
    """C declarations that let gcc vectorize loops calling math functions into glibc's libmvec
    (expf -> _ZGVdN8v_expf) without -ffast-math; put them after `#include <math.h>`.

    Empty where that does not apply (not x86_64, not glibc). The vector variants are less
    exact than the scalar ones (measured: up to 3.6 ulp for logf): the caller chooses."""
    release = _glibc_release()
    if platform.machine() not in ("x86_64", "AMD64") or release is None:
        return ""
    lines = ["#if defined(__GNUC__) && !defined(__clang__)  /* clang ignores the simd attribute */"]
    for since, functions in _LIBMVEC.items():
        if release >= since:
            lines += [_simd_declaration(fn + suffix, ctype, fn in _BINARY)
                      for fn in functions for suffix, ctype in (("f", "float"), ("", "double"))]
    lines.append("#endif")
    return "\n".join(lines) + "\n"


def _simd_declaration(function: str, ctype: str, binary: bool) -> str:
    params = f"{ctype}, {ctype}" if binary else ctype
    return f'{ctype} {function}({params}) __attribute__((simd("notinbranch")));'


def _glibc_release() -> tuple[int, int] | None:
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except (ValueError, OSError, AttributeError):
        return None


# -- denormals ----------------------------------------------------------------------------------
# x86 arithmetic on denormal numbers (below ~1.2e-38 in float32) takes a slow
# microcode path, ~3x slower per loop here.  An optimizer's moments for a
# parameter that stops getting gradient decay into that range within about
# 800 Adam steps, and the whole update slows down.  XLA's CPU code runs with
# denormals flushed to zero (FTZ) and read as zero (DAZ); so do Avalon's
# compiled functions unless asked not to (avalon.jit(f, flush_denormals=False)),
# and the engine's threads run each share of a call in its caller's mode.

_FPENV_SOURCE = r"""
#include <xmmintrin.h>
__attribute__((visibility("default"))) unsigned int avl_flush_denormals(void)
{ unsigned int old = _mm_getcsr(); _mm_setcsr(old | 0x8040u); return old; }   /* FTZ | DAZ */
__attribute__((visibility("default"))) void avl_restore_fp(unsigned int old) { _mm_setcsr(old); }
__attribute__((visibility("default"))) unsigned int avl_fp_mode(void) { return _mm_getcsr(); }
"""
_fpenv = None          # (flush, restore, mode) once built; False where unsupported
_fpenv_lock = threading.Lock()


def _fp_functions():
    global _fpenv
    if _fpenv is None:
        with _fpenv_lock:
            if _fpenv is None:
                _fpenv = _build_fp_functions()
    return _fpenv


def _build_fp_functions():
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386") or not available():
        return False
    try:
        lib = build(_FPENV_SOURCE, name="fpenv")
    except (NativeBuildError, NativeUnavailable):
        return False
    flush = bind(lib, "avl_flush_denormals", ())
    flush.restype = ctypes.c_uint
    restore = bind(lib, "avl_restore_fp", (ctypes.c_uint,))
    mode = bind(lib, "avl_fp_mode", ())
    mode.restype = ctypes.c_uint
    return flush, restore, mode


@contextlib.contextmanager
def denormals_flushed():
    """Run the block with denormal results flushed to zero and denormal operands
    read as zero, in the calling thread (x86's FTZ and DAZ), then restore the
    thread's previous mode.  Elsewhere, or without a C compiler, it changes nothing
    (`flushes_denormals()` says which)."""
    fns = _fp_functions()
    if not fns:
        yield
        return
    flush, restore, _ = fns
    old = flush()
    try:
        yield
    finally:
        restore(old)


def flushes_denormals() -> bool:
    """Whether denormals_flushed() takes effect on this machine."""
    return bool(_fp_functions())


def fp_mode():
    """The calling thread's floating-point mode (x86's MXCSR), to hand to another
    thread with `in_fp_mode`; None where denormals_flushed() changes nothing."""
    fns = _fp_functions()
    return fns[2]() if fns else None


def in_fp_mode(mode, fn, *args):
    """fn(*args) run in floating-point mode `mode` (from fp_mode()), the thread's
    own mode restored afterwards."""
    if mode is None:
        return fn(*args)
    _, restore, current = _fp_functions()
    old = current()
    if old == mode:
        return fn(*args)
    restore(mode)
    try:
        return fn(*args)
    finally:
        restore(old)


# -- tests -------------------------------------------------------------------------------------

def _reset_for_tests() -> None:
    """Forget the detected compiler, the probe, the loaded libraries and the warning, so a test
    can change CC, PATH or the cache directory. Libraries stay mapped in the process."""
    global _detected, _probed, _warned
    with _probe_lock, _detect_lock, _memory_lock:  # the order _run_probe takes them in
        _detected, _probed, _warned = None, None, False
        _loaded.clear()
        _loaded_keys.clear()
        _key_locks.clear()
    kernel_cache._reset_for_tests()
