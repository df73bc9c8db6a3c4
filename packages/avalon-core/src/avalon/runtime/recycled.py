"""Arrays a compiled function returns, recycled once their caller lets go of them.

Each call of a compiled function returns fresh arrays (a step's gradients):
the caller may keep them.  Allocating them anew each call is costly on its
own: glibc serves an allocation of this size either with a fresh mmap or from
the top of its heap, which it hands back to the system when it is freed, so
the next call's arrays start as unmapped pages and every page written faults
once (~2 us in a virtual machine: a 3 MiB gradient costs ~1.5 ms, half of a
small model's step).

`RecycledArrays` keeps the last arrays it handed out for one output of one
compiled copy and hands one out again when nothing but itself still refers
to it: no variable, container or view of the caller's (a view refers to the
array it views), no weak reference either.  A training loop holds the last
step's gradients while the next step runs, so two arrays alternate.  An array
still held is never touched, so nothing the caller keeps changes; a caller
who keeps every call's results gets new arrays, as without recycling.

A compiled copy runs one call at a time (avalon.threadsafe), so its
`RecycledArrays` need no lock.
"""
from __future__ import annotations

import math
import sys
import weakref

import numpy as np

__all__ = ["RecycledArrays", "KEPT", "MIN_BYTES"]

#: arrays kept per output: the one the caller still holds from the last call, and one to reuse
KEPT = 2

#: smaller results come from NumPy's own cache of small blocks, or a heap that keeps them
MIN_BYTES = 4096


def _references(kept, k):
    """How many references array kept[k] has, counted the way `take` counts them."""
    return sys.getrefcount(kept[k])


# what `_references` counts for an array referred to by its list alone (the interpreter's
# own temporaries included: their number differs between Python versions)
_ONLY_KEPT = _references([np.empty(0)], 0)


class RecycledArrays:
    """Hands out uninitialized C-contiguous arrays of one shape and dtype, like
    np.empty, reusing one of the last KEPT it handed out that no one else
    refers to anymore."""

    __slots__ = ("shape", "dtype", "kept")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.kept: list = []

    def __call__(self) -> np.ndarray:
        kept = self.kept
        for k in range(len(kept)):
            if _references(kept, k) == _ONLY_KEPT and self._as_made(kept[k]):
                return kept[k]
        fresh = np.empty(self.shape, self.dtype)
        if len(kept) < KEPT:
            kept.append(fresh)
        else:
            # all of them still held (the caller keeps results): the oldest one is left to its holder
            kept.pop(0)
            kept.append(fresh)
        return fresh

    def _as_made(self, a) -> bool:
        """Whether `a`, referred to by nothing else, is still what it was made as: the
        caller may have reshaped it in place (a.shape = ...), changed its dtype or
        made it read-only before letting go of it, or keep a weak reference to it."""
        return (a.shape == self.shape and a.dtype == self.dtype and a.flags.c_contiguous and a.flags.writeable
                and not weakref.getweakrefcount(a))

    def __repr__(self):
        return f"RecycledArrays({self.shape}, {self.dtype.name}, kept={len(self.kept)})"


def recycles(shape, dtype) -> bool:
    """Whether results of this type are worth recycling (see MIN_BYTES)."""
    return int(math.prod(shape)) * np.dtype(dtype).itemsize >= MIN_BYTES
