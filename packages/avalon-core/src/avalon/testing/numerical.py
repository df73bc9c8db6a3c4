"""Finite differences, the reference gradients of tests that need no framework."""
from __future__ import annotations

import numpy as np


def numerical_gradient(f, x, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of the scalar function f at x, in float64
    (x is copied to float64; f gets perturbed copies)."""
    x = np.array(x, dtype=np.float64)
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (float(f(xp)) - float(f(xm))) / (2 * eps)
    return g
