"""The BLAS libraries loaded in this process, as threadpoolctl finds them.

Found once per process: threadpoolctl walks every shared object the process
has loaded (~2 ms), and both the CPU backend (which sets BLAS's thread count)
and the segment driver (which calls NumPy's OpenBLAS directly) need them.
A BLAS library loaded after the first call (a later `import torch`) is not
seen; NumPy's, loaded with NumPy, always is.
"""
from __future__ import annotations

import functools

__all__ = ["loaded_blas"]


@functools.lru_cache(maxsize=1)
def loaded_blas() -> tuple:
    """threadpoolctl's controllers of the BLAS libraries loaded now (user_api "blas")."""
    from threadpoolctl import ThreadpoolController
    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)
