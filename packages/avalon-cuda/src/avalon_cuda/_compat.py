"""The one place that imports CuPy.

Everything else in avalon_cuda reads `cupy` from here, so the package (and its
plugin, which avalon-core loads on every machine) imports fine where CuPy is
missing or broken: `cupy` is then None and `CUPY_ERROR` says why, and
`gpu_available()` turns that into the reason `avalon.backends()` shows.
"""
from __future__ import annotations

import functools

from avalon._install import install_command

#: what to run to get CuPy; CuPy 14 wheels exist per CUDA major version
INSTALL_HINT = ("pip install cupy-cuda12x, or the CuPy wheel of your CUDA version, e.g. "
                "pip install cupy-cuda13x; from the root of a clone of the Avalon repository, "
                f"`{install_command('avalon-cuda', 'cuda')}` brings cupy-cuda12x too")

try:
    import cupy
    CUPY_ERROR = ""
except ModuleNotFoundError as e:
    cupy = None
    if e.name == "cupy":
        CUPY_ERROR = f"CuPy is not installed ({INSTALL_HINT})"
    else:  # CuPy is there but one of its own imports is not
        CUPY_ERROR = f"CuPy is installed but failed to import: {e}"
except Exception as e:  # noqa: BLE001 - a broken CUDA install can raise anything at import
    cupy = None
    CUPY_ERROR = f"CuPy is installed but failed to import: {type(e).__name__}: {e}"


@functools.lru_cache(maxsize=None)
def gpu_available() -> tuple[bool, str]:
    """(True, "") when CuPy imports and sees at least one CUDA device, else
    (False, the reason).  Cached: the answer does not change in a process."""
    if cupy is None:
        return False, CUPY_ERROR
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        return False, f"no CUDA device found (CUDA runtime: {e})"
    except Exception as e:  # noqa: BLE001 - e.g. no driver: CuPy raises RuntimeError or ImportError
        return False, f"no CUDA device found ({type(e).__name__}: {e})"
    if count <= 0:
        return False, "no CUDA device found (the CUDA runtime reports 0 devices)"
    return True, ""


def device_count() -> int:
    """How many CUDA devices CuPy sees (0 when it cannot be used)."""
    if not gpu_available()[0]:
        return 0
    return int(cupy.cuda.runtime.getDeviceCount())
