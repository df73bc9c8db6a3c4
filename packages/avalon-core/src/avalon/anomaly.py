"""Finding the first non-finite value (as torch's detect_anomaly and JAX's debug_nans).

    with avalon.detect_anomaly():
        loss, grads = avalon.grad(loss_fn, model, x, y)

or AVALON_DETECT_ANOMALY=1 in the environment.  While it is on, compiled
functions are compiled again without optimization (each value computed by
one kernel of its own, no fusion, no batch split) and every value is checked
as it is made; eager operations are checked too.  The first non-finite value
raises AnomalyError naming the operation, whether it ran in the forward or the
backward pass, and the user's line that made it.  Off, it costs one global
read per call: compiled functions are cached per mode.
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

from .errors import AvalonError
from .graph import type_str

_ENV = "AVALON_DETECT_ANOMALY"
_depth = 0   # open detect_anomaly() blocks (process-wide)
_from_env = os.environ.get(_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


class AnomalyError(AvalonError, FloatingPointError):
    """A non-finite value appeared while avalon.detect_anomaly() was on."""


def is_enabled() -> bool:
    return _from_env or _depth > 0


@contextlib.contextmanager
def detect_anomaly(enabled: bool = True):
    """Check every value computed inside the block (see the module's doc);
    usable as a context manager or a decorator.  enabled=False is a no-op."""
    global _depth
    if not enabled:
        yield
        return
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def _non_finite(xp, value):
    """None when every value is finite (or the dtype has no NaN), else a description."""
    if np.dtype(value.dtype).kind not in "fc" or bool(xp.isfinite(value).all()):
        return None
    bad = ~xp.isfinite(value)
    kinds = [name for name, mask in (("nan", xp.isnan(value)), ("inf", xp.isinf(value))) if bool(mask.any())]
    first = tuple(int(i) for i in np.unravel_index(int(xp.argmax(bad.reshape(-1))), value.shape)) \
        if value.ndim else ()
    return (f"{' and '.join(kinds)} ({int(bad.sum())} of {value.size} values"
            + (f", the first at index {first}" if value.ndim else "") + ")")


def _describe_operand(xp, value):
    if value.size == 0 or np.dtype(value.dtype).kind not in "fciub":
        return type_str(value.shape, value.dtype)
    host = value if xp is np else None
    lo, hi = (xp.min(value), xp.max(value)) if host is None else (host.min(), host.max())
    return f"{type_str(value.shape, value.dtype)} in [{float(lo):.4g}, {float(hi):.4g}]"


class FiniteChecker:
    """Called by code compiled with check_finite=True: `inputs(*arrays)` before
    the first kernel, `value(array, k)` after node k's kernel."""

    def __init__(self, graph, backend):
        self.graph, self.xp = graph, backend.xp
        self.backward = getattr(graph, "backward_nodes", frozenset())

    def inputs(self, *arrays):
        for node, value in zip(self.graph.inputs, arrays):
            bad = _non_finite(self.xp, value)
            if bad is not None:
                name = node.attrs.get("name", "an input")
                raise AnomalyError(f"avalon.detect_anomaly: {self.graph.name} was called with {name} "
                                   f"holding {bad}, before any operation ran")

    def value(self, array, k, *operands):
        bad = _non_finite(self.xp, array)
        if bad is None:
            return
        node = self.graph.nodes[k]
        phase = "backward pass (the gradient)" if node in self.backward else "forward pass"
        raise AnomalyError(f"avalon.detect_anomaly: {node.op} produced {bad} in the {phase} of "
                           f"{self.graph.name}, made at {node.loc or 'an unknown line'}; its operands: "
                           f"{_operands(self.xp, operands)}")


def _operands(xp, arrays):
    return ", ".join(_describe_operand(xp, a) for a in arrays if hasattr(a, "dtype")) or "none"


def check_eager(prim, arrays, result, xp, loc):
    """An eager operation's result, checked while detection is on."""
    bad = _non_finite(xp, result) if hasattr(result, "dtype") else None
    if bad is not None:
        raise AnomalyError(f"avalon.detect_anomaly: {prim.name} produced {bad} at {loc or 'an unknown line'}; "
                           f"its operands: {_operands(xp, arrays)}")
