"""PyTorch-style layers, losses, optimizers and fit for Avalon."""

__version__ = "0.1.0"
