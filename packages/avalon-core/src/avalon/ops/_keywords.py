"""Keyword arguments as NumPy spells them.

Avalon's ops, and the methods and np.* functions of traced arrays, take
NumPy's keywords (axis=, keepdims=, ddof=).  A keyword they do not take
raises ArgumentError (a TypeError) naming the user's line and, where the
keyword is a PyTorch habit (dim=, keepdim=), the NumPy spelling, instead of
being ignored: `x.sum(dim=1)` reducing over every axis would be a silent
wrong answer.
"""
from __future__ import annotations

import functools
import inspect

from ..errors import ArgumentError, AvalonError, at, user_location

#: keywords of other libraries (mostly PyTorch) -> what to write instead
SPELLINGS = {
    "dim": "axis=",
    "dims": "axis=",
    "keepdim": "keepdims=",
    "input": "the array as the first positional argument",
    "unbiased": "ddof= (ddof=1 for the unbiased estimate)",
    "descending": "flip the sorted result (np.flip(np.sort(x, axis), axis)), or avalon.topk(x, k, axis, "
                  "largest=True)",
    "p": "ord=",
    "diagonal": "k=",
    "shifts": "shift=",
    "out": "the returned array (traced arrays are immutable, so out= cannot be honoured)",
    "dtype": "x.astype(dtype) before the call",
}


def _hint(name: str, accepted) -> str | None:
    """'dim= -> axis=' when the op takes axis= (or its keywords are not known)."""
    spelling = SPELLINGS.get(name)
    if not spelling:
        return None
    keyword = spelling.partition("=")[0]
    if keyword.isidentifier() and accepted and keyword not in accepted:
        return None
    return f"{name}= -> {spelling}"


def unknown_keywords(opname: str, names, accepted=()) -> ArgumentError:
    """The error for keywords `names` that `opname` does not take."""
    names = sorted(names)
    hints = [h for h in (_hint(n, accepted) for n in names) if h]
    text = (f"{opname}() got an unexpected keyword argument{'s' if len(names) > 1 else ''} "
            f"{', '.join(repr(n) for n in names)}{at(user_location())}")
    if hints:
        text += "; Avalon follows NumPy's spelling: " + "; ".join(hints)
    if accepted:
        text += f" (keywords taken: {', '.join(accepted)})"
    return ArgumentError(text)


def check_keywords(opname: str, extra: dict, accepted=()) -> None:
    """Raise for the keywords a NumPy-signature function collected in **extra."""
    if extra:
        raise unknown_keywords(opname, extra, accepted)


def reject_options(opname: str, **given) -> None:
    """NumPy options Avalon does not implement (out=, where=, initial=): a
    non-default value raises instead of being ignored."""
    for name, value in given.items():
        default = True if name == "where" else None   # np's where=True means "everywhere"
        if value is not default:
            raise ArgumentError(f"{opname}: {_OPTIONS.get(name, name + '=')} is not supported"
                                f"{at(user_location())}")


_OPTIONS = {"out": "out= (traced arrays are immutable: use the returned array)",
            "where": "where= (mask the input with avalon.where(mask, x, fill) first)",
            "initial": "initial= (combine the result with the initial value instead)",
            "order": "order= (structured arrays are not supported)"}


def numpy_keywords(fn):
    """`fn` (an op without **kwargs), raising ArgumentError with a NumPy hint
    for an unknown keyword, and naming the user's line in every AvalonError
    it raises (the errors of composites, raised before any bind, too); a
    function with **kwargs is returned unchanged."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return fn
    accepted = tuple(p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL
                     and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
    taken = frozenset(accepted)
    # the keywords after the array (the first parameter), for the message
    listed = accepted[1:] if accepted else ()

    array_first = bool(accepted) and accepted[0] == "x"   # the op's first parameter is an array

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if kwargs and not taken.issuperset(kwargs):
            raise unknown_keywords(fn.__name__, set(kwargs) - taken, listed) from None
        if array_first and args and type(args[0]) in (list, tuple):
            raise _sequence_error(fn.__name__, args[0]) from None
        try:
            return fn(*args, **kwargs)
        except AvalonError as e:
            located = _located(e)
            if located is None:
                raise
            raise located from None
    call.__numpy_keywords__ = True
    return call


def _sequence_error(opname, value):
    from ..tree import ForeignArrayError, conversion_hint
    return ForeignArrayError(f"{opname}: x is a Python {type(value).__name__}, not an array"
                             f"{at(user_location())}; {conversion_hint(value)}")


def _located(error):
    """`error` again with the user's line, or None when it names one already."""
    loc = user_location()
    if not loc or "(at " in str(error):
        return None
    try:
        return type(error)(f"{error}{at(loc)}")
    except TypeError:   # an error class with a constructor of its own
        return None
