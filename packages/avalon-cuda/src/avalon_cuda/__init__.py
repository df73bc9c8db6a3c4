"""CuPy (CUDA) backend plugin for Avalon."""

__version__ = "0.1.0"
