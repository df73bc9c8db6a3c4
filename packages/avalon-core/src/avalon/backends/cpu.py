"""The CPU backend: NumPy.  avalon-core registers it through the ``avalon``
entry-point group, exactly as a third-party backend registers."""
from __future__ import annotations

import os

import numpy as np

from ..plugins import hookimpl
from .base import Backend
from .cpu_fused import compile_fused_numpy


class CpuBackend(Backend):
    name = "cpu"
    package = "avalon-core"
    priority = 0
    array_types = (np.ndarray,)
    xp = np

    def __init__(self, index: int = 0):
        super().__init__(index)
        _own_blas_threads()

    def compile_fused(self, body):
        return compile_fused_numpy(body, self)


def _own_blas_threads():
    """Run BLAS single-threaded (AVALON_BLAS_THREADS overrides).

    On small machines OpenBLAS's own threads busy-wait between calls and fight
    every other thread of the process, which made a CNN training step several
    times slower than with one BLAS thread; Avalon schedules its own threads
    instead.  threadpoolctl is the maintained way to set this at run time."""
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=int(os.environ.get("AVALON_BLAS_THREADS", "1")), user_api="blas")


@hookimpl
def avalon_backends():
    return [CpuBackend]
