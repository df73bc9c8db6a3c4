"""Benchmarks of Avalon against PyTorch."""

__version__ = "0.1.0"
