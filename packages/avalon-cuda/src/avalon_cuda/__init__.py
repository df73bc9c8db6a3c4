"""CuPy (CUDA) backend plugin for Avalon: ``avalon.device("cuda")``.

Installed, it registers the ``cuda`` device kind through the ``avalon``
entry-point group (see ``avalon_cuda.plugin``); ``gpu_available()`` says whether
it can be used here, and why not.
"""

__version__ = "0.1.0"

from ._compat import gpu_available  # noqa: E402

__all__ = ["__version__", "gpu_available"]
