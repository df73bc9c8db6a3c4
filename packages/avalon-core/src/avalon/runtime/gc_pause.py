"""The cyclic garbage collector paused while Avalon compiles.

A compilation allocates many short-lived objects (graph nodes, rule results,
generated code), and CPython starts a collection after every 700 net allocations;
every tenth of those looks at the older generation, and the full collection at
the end of the chain traverses every object the process holds.  With PyTorch
loaded beside Avalon such a full collection took 10-13 ms, and it fell inside a
40 ms first step of the VAE benchmark (its trace: 1.3 ms alone, 14 ms with the
collection).  Compiling makes no reference cycles of its own that need collecting
while it runs, so the collector is paused for its duration and resumed after
(when it was enabled before), collecting then as usual.
"""
from __future__ import annotations

import contextlib
import gc
import os
import threading

__all__ = ["gc_paused"]

_lock = threading.Lock()
_depth = 0              # compilations running now, in any thread
_resume = False         # whether the collector was enabled when the first of them began


def _after_fork_in_child():
    # a fork while another thread compiled: that thread is not in the child, so
    # no block of it will end there; the child gets the collector back
    global _depth, _lock
    _lock = threading.Lock()
    if _depth:
        _depth = 0
        if _resume:
            gc.enable()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def gc_paused():
    """Pause the cyclic garbage collector for the block; nested and concurrent
    blocks resume it when the last one ends, and only if it was enabled."""
    global _depth, _resume
    with _lock:
        if _depth == 0:
            _resume = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _resume:
                gc.enable()
