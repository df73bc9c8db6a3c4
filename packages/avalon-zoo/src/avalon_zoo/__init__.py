"""Predefined models and datasets for Avalon."""

__version__ = "0.1.0"
