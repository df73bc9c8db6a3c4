"""The BLAS libraries of this process: the ones threadpoolctl finds loaded, and
the one Avalon's generated code calls for its matrix products.

Found once per process: threadpoolctl walks every shared object the process
has loaded (~2 ms), and both the CPU backend (which sets BLAS's thread count)
and the segment driver (which calls a BLAS directly) need them.  A BLAS
library loaded after the first call (a later `import torch`) is not seen;
NumPy's, loaded with NumPy, always is.

The products of compiled CPU code (runtime.segments) call the BLAS that
AVALON_BLAS names, read when a graph is compiled:

* ``auto`` (the default): Intel's MKL when the ``mkl`` package is installed
  (avalon-core's ``mkl`` extra), else NumPy's OpenBLAS;
* ``mkl``: MKL, and an error saying what is missing when it cannot be loaded;
* ``numpy``: the OpenBLAS NumPy uses, whose results are then the same bits as
  NumPy's matmul.

Why MKL: on the small products of a training step (a recurrent layer's
32x128 by 128x512, a VAE's 100x784 by 784x500) it ran 1.15-1.7x faster than
OpenBLAS on one core here.  It is loaded with its sequential threading layer:
Avalon's engine owns the threads (a schedule that wants a product on several
threads splits it across the segment driver's helpers), so no OpenMP runtime
joins the process.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .._install import install_hint

__all__ = ["loaded_blas", "GeneratedCodeBlas", "BlasUnavailable", "generated_code_blas", "mkl_reason", "prefetch",
           "choice", "CHOICES"]

CHOICES = ("auto", "mkl", "numpy")

# MKL_Set_Threading_Layer's code (mkl_service.h)
_MKL_SEQUENTIAL = 1


class BlasUnavailable(RuntimeError):
    """AVALON_BLAS names a BLAS this process cannot load."""


@functools.lru_cache(maxsize=1)
def loaded_blas() -> tuple:
    """threadpoolctl's controllers of the BLAS libraries loaded now (user_api "blas")."""
    from threadpoolctl import ThreadpoolController
    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@dataclass(frozen=True)
class GeneratedCodeBlas:
    """The BLAS compiled code calls: its cblas ?gemm and ?gemv (64-bit integer
    interface) by (routine, dtype)."""
    name: str
    routines: dict

    def address(self, routine: str, dtype) -> Optional[int]:
        return self.routines.get((routine, np.dtype(dtype)))


def choice() -> str:
    """AVALON_BLAS, checked: one of CHOICES."""
    value = os.environ.get("AVALON_BLAS", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"AVALON_BLAS={os.environ.get('AVALON_BLAS')!r} is not one of {', '.join(CHOICES)}: "
                         "set it to 'mkl' (Intel MKL, from the mkl package), 'numpy' (NumPy's OpenBLAS) "
                         "or 'auto' (MKL when installed), or unset it")
    return value


def generated_code_blas() -> Optional[GeneratedCodeBlas]:
    """The BLAS that AVALON_BLAS selects now, or None when there is none to call
    (the products then stay NumPy calls).  Raises BlasUnavailable when AVALON_BLAS
    is ``mkl`` and MKL cannot be loaded."""
    wanted = choice()
    if wanted != "numpy":
        try:
            return _mkl()
        except BlasUnavailable:
            if wanted == "mkl":
                raise
    return _numpy_openblas()


def will_use_mkl() -> bool:
    """Whether compiled code will multiply with MKL, without waiting for it to load
    (a compilation's passes ask while prefetch loads it): the loaded answer once
    there is one, else whether AVALON_BLAS asks for MKL and its library is
    installed.  A guess for choosing rewrites, never for calling."""
    wanted = choice()
    if wanted == "numpy":
        return False
    if _load_mkl.cache_info().currsize:
        return not isinstance(_load_mkl(), BlasUnavailable)
    try:
        _mkl_rt_path()
    except BlasUnavailable:
        return False
    return True


def mkl_reason() -> Optional[str]:
    """Why MKL cannot be loaded here, or None when it can."""
    try:
        _mkl()
    except BlasUnavailable as e:
        return str(e)
    return None


def prefetch() -> None:
    """Load the BLAS AVALON_BLAS selects in a background thread, with one tiny
    product so that MKL maps its kernels' libraries (~7 ms, a seventh of a warm
    first compilation), while the first graph is being traced: compiling it then
    finds the library ready.  Errors are left for the compilation to raise."""
    try:
        if choice() == "numpy":
            return
    except ValueError:
        return               # said when a graph is compiled
    threading.Thread(target=_warm, name="avalon-blas-prefetch", daemon=True).start()


def _warm() -> None:
    try:
        blas = generated_code_blas()
        address = blas.address("gemm", np.float32) if blas is not None else None
        if address:
            gemm = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64,
                                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
                                    ctypes.c_int64)(address)
            one = np.ones(1, np.float32)
            out = np.empty(1, np.float32)
            # row-major, neither operand transposed (the CBLAS enums): 1x1 times 1x1
            gemm(101, 111, 111, 1, 1, 1, 1.0, one.ctypes.data, 1, one.ctypes.data, 1, 0.0, out.ctypes.data, 1)
    except Exception:  # noqa: BLE001 - a compilation asking for this BLAS raises it
        pass


_mkl_lock = threading.Lock()


def _after_fork_in_child():
    # a fork while the prefetch thread loaded MKL copied the lock held, by a thread
    # the child does not have: the child's first compilation would wait forever
    global _mkl_lock
    _mkl_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _mkl() -> GeneratedCodeBlas:
    with _mkl_lock:          # the prefetch thread and a compilation may ask at once
        loaded = _load_mkl()
    if isinstance(loaded, BlasUnavailable):
        raise loaded
    return loaded


@functools.lru_cache(maxsize=1)
def _load_mkl():
    """MKL, or why not (kept as well: every compilation asks again, and without MKL
    the answer would cost a search of the installed distributions each time)."""
    try:
        return _open_mkl()
    except BlasUnavailable as e:
        return e


def _open_mkl() -> GeneratedCodeBlas:
    path = _mkl_rt_path()
    try:
        lib = ctypes.CDLL(path)
    except OSError as e:
        raise BlasUnavailable(f"MKL's {path} did not load: {e}") from e
    lib.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
    layer = lib.MKL_Set_Threading_Layer(_MKL_SEQUENTIAL)
    if layer != _MKL_SEQUENTIAL:
        # another library of this process loaded MKL first, with threads of its own
        raise BlasUnavailable(f"MKL is already loaded in this process with threading layer {layer}, "
                              "not the sequential one Avalon's threads call")
    routines = {(routine, np.dtype(dt)): ctypes.cast(lib[f"cblas_{letter}{routine}_64"], ctypes.c_void_p).value
                for routine in ("gemm", "gemv") for letter, dt in (("s", np.float32), ("d", np.float64))}
    return GeneratedCodeBlas(f"MKL {_mkl_version(lib)} (sequential)", routines)


def _mkl_rt_path() -> str:
    """libmkl_rt of the installed mkl package: where pip puts its libraries
    (<prefix>/lib), else as the distribution's files say (importlib.metadata
    costs ~30 ms in a first compilation when nothing has imported it yet)."""
    import glob
    import sys
    found = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    if found:
        return os.path.realpath(found[-1])
    from importlib import metadata
    try:
        dist = metadata.distribution("mkl")
    except metadata.PackageNotFoundError:
        raise BlasUnavailable("the mkl package is not installed: for avalon-core's mkl extra, "
                              + install_hint("avalon-core", "mkl")) from None
    for f in dist.files or ():
        if re.fullmatch(r"libmkl_rt\.so(\.\d+)*", os.path.basename(str(f))):
            path = str(dist.locate_file(f))
            if os.path.exists(path):
                return os.path.realpath(path)
    raise BlasUnavailable(f"the mkl package {dist.version} holds no libmkl_rt shared library for this system")


def _mkl_version(lib) -> str:
    buf = ctypes.create_string_buffer(256)
    try:
        lib.MKL_Get_Version_String(buf, len(buf))
    except AttributeError:
        return "(version unknown)"
    found = re.search(r"\d{4}(\.\d+)*", buf.value.decode(errors="replace"))
    return found.group(0) if found else buf.value.decode(errors="replace").strip()


@functools.lru_cache(maxsize=1)
def _numpy_openblas() -> Optional[GeneratedCodeBlas]:
    """The 64-bit-integer cblas of the OpenBLAS NumPy uses (found through
    threadpoolctl), or None when there is none."""
    try:
        libs = [c for c in loaded_blas() if c.internal_api == "openblas"]
    except Exception:  # noqa: BLE001 - no BLAS found: no products in segments
        return None
    # NumPy's own copy (numpy.libs); another OpenBLAS (torch's, the system's) only
    # when it is the one loaded, as when NumPy links the system's
    ours = [c for c in libs if "numpy" in (c.filepath or "")]
    if not ours and len(libs) == 1:
        ours = libs
    for controller in ours:
        try:
            lib = ctypes.CDLL(controller.filepath)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            try:
                routines = {(routine, np.dtype(dt)): ctypes.cast(lib[f"{prefix}cblas_{letter}{routine}64_"],
                                                                 ctypes.c_void_p).value
                            for routine in ("gemm", "gemv") for letter, dt in (("s", np.float32), ("d", np.float64))}
            except AttributeError:
                continue
            return GeneratedCodeBlas(f"OpenBLAS {controller.version} (NumPy's)", routines)
    return None
