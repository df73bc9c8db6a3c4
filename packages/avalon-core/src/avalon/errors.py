"""Avalon's exceptions, and how they point at the line of user code that caused them."""
from __future__ import annotations

import sys
import warnings


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


class LeakedTracerError(AvalonError):
    """A traced value used after its trace finished (kept on a model, in a
    global), or in a trace that does not enclose its own."""


class GraphError(AvalonError, ValueError):
    """A graph that breaks the IR's invariants (see Graph.check)."""


class MissingRuleError(AvalonError, NotImplementedError):
    """A primitive lacks the rule a transformation needs (a VJP, a kernel)."""


class LabelError(AvalonError, IndexError):
    """A class label outside [0, num_classes) that is not the ignore_index."""


class OutOfMemoryError(AvalonError, MemoryError):
    """A compiled function's buffers (or a value) do not fit in the device's memory."""


class ArgumentError(AvalonError, TypeError):
    """A call with an argument Avalon does not take: an unknown keyword (often a
    PyTorch spelling such as dim= for NumPy's axis=), or a NumPy option Avalon
    does not support (out=, where=).  The message names the accepted spelling."""


class TracerAttributeError(AvalonError, AttributeError):
    """An attribute a traced array does not have, often a PyTorch tensor method
    (x.view, x.unsqueeze); the message names the NumPy or Avalon spelling."""


#: the engine and library packages.  Model code in the others (avalon_zoo's
#: models, avalon_bench's steps) is where graph nodes are attributed (the
#: profile's line column), while errors and warnings point past every Avalon
#: package, at the line that called into Avalon.
LIBRARY_PACKAGES = ("avalon", "avalon_layers", "avalon_cuda")


def _is_frozen(frame) -> bool:
    return frame.f_code.co_filename.startswith("<frozen")


def _is_internal(frame) -> bool:
    found = _INTERNAL.get(frame.f_code)
    if found is None:
        name = frame.f_globals.get("__name__", "")
        found = _remember(_INTERNAL, frame, (name == "avalon" or name.startswith(("avalon.", "avalon_"))
                                             and not name.startswith("avalon_zoo.examples")) or _is_frozen(frame))
    return found


def _is_library(frame) -> bool:
    found = _LIBRARY.get(frame.f_code)
    if found is None:
        found = _remember(_LIBRARY, frame, frame.f_globals.get("__name__", "").partition(".")[0] in LIBRARY_PACKAGES
                          or _is_frozen(frame))
    return found


# Each traced node asks where its user's line is, walking ~15 frames: the answer
# for a frame is its code's (a function's code runs in its module's globals),
# remembered.  Bounded: code made at run time (exec) would otherwise pile up.
_INTERNAL: dict = {}
_LIBRARY: dict = {}
_REMEMBERED_MAX = 8192


def _remember(table, frame, value: bool) -> bool:
    if len(table) >= _REMEMBERED_MAX:
        table.clear()
    table[frame.f_code] = value
    return value


def user_location(skip_internal: bool = True) -> str | None:
    """'file:line' of the innermost frame outside Avalon's own packages, or None."""
    return _first_frame(_is_internal if skip_internal else _is_frozen)


def model_location() -> str | None:
    """'file:line' of the innermost frame outside Avalon's library packages
    (model code in avalon_zoo or avalon_bench counts as the user's)."""
    return _first_frame(_is_library)


def _first_frame(skip) -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        if not skip(frame):
            return f"{frame.f_code.co_filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def warn_at_user(message: str, category=UserWarning) -> None:
    """warnings.warn attributed to the innermost frame outside Avalon's library
    packages (the user's line), however deep inside Avalon the caller is."""
    level, frame = 1, sys._getframe(0)
    while frame is not None and _is_internal(frame):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)


def at(loc: str | None) -> str:
    """' (at file:line)' for messages, or '' when the location is unknown."""
    return f" (at {loc})" if loc else ""
