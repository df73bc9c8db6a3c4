"""avalon-cuda's entry in the ``avalon`` entry-point group (pyproject.toml:
``[project.entry-points.avalon] cuda = "avalon_cuda.plugin"``).

It imports without CuPy: the backend class is then listed by
``avalon.backends()`` as unavailable, with the reason (CuPy missing, no CUDA
device), and ``avalon.device("cuda")`` raises avalon.DeviceError saying so.
"""
import avalon

from .backend import CudaBackend


@avalon.hookimpl
def avalon_backends():
    return [CudaBackend]
