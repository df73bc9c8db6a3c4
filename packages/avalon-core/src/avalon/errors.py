"""Avalon's exceptions, and how they point at the line of user code that caused them."""
from __future__ import annotations

import sys


class AvalonError(Exception):
    """Base class of every error Avalon raises on purpose."""


class ShapeError(AvalonError, ValueError):
    """Operand shapes that do not fit together (matmul, conv, broadcasting, reshape)."""


class DtypeError(AvalonError, TypeError):
    """Operand dtypes that Avalon will not mix silently."""


class ConcretizationError(AvalonError, TypeError):
    """A traced value was used where Python needs a concrete one (if, float(), ...)."""


class DeviceError(AvalonError, RuntimeError):
    """An unknown, missing or unavailable device or backend."""


class GraphError(AvalonError, ValueError):
    """A graph that breaks the IR's invariants (see Graph.check)."""


class MissingRuleError(AvalonError, NotImplementedError):
    """A primitive lacks the rule a transformation needs (a VJP, a kernel)."""


def _is_internal(frame) -> bool:
    name = frame.f_globals.get("__name__", "")
    return name == "avalon" or name.startswith(("avalon.", "avalon_")) and not name.startswith("avalon_zoo.examples")


def user_location(skip_internal: bool = True) -> str | None:
    """'file:line' of the innermost frame outside Avalon's own packages, or None."""
    frame = sys._getframe(1)
    while frame is not None:
        if not (skip_internal and _is_internal(frame)):
            if frame.f_code.co_filename.startswith("<frozen"):
                frame = frame.f_back
                continue
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def at(loc: str | None) -> str:
    """' (at file:line)' for messages, or '' when the location is unknown."""
    return f" (at {loc})" if loc else ""
