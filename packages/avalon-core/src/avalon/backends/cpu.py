"""The CPU backend: NumPy.  avalon-core registers it through the ``avalon``
entry-point group, exactly as a third-party backend registers."""
from __future__ import annotations

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

    def compile_fused(self, body):
        return compile_fused_numpy(body, self)


@hookimpl
def avalon_backends():
    return [CpuBackend]
