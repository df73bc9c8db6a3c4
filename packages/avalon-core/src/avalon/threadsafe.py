"""Compiled functions shared by several Python threads.

A compiled schedule owns mutable memory: the memory plan's buffers, the fused
kernels' scratch arrays, the autotuner's timings, the split step's barriers.
Two threads running one schedule at once would write each other's values, so
each call runs on a copy that no other call is running: the tuned schedule
when it is free (always, in a single-threaded program: one non-blocking lock
acquire), otherwise a spare copy compiled on first need and kept for later
concurrent calls.  Spare copies run in their caller's thread, unsplit: the
threads that share the function already keep the cores busy.
"""
from __future__ import annotations

import copy
import threading


class SharedCompiled:
    """One compiled graph, safe to call from any number of threads at once.

    `primary` is the schedule chosen for the graph (anything with .fn, .graph,
    .plan and .source); `make_spare()` compiles another copy with buffers of
    its own."""

    def __init__(self, primary, make_spare):
        self.primary = primary
        self._make_spare = make_spare
        self._primary_busy = threading.Lock()
        self._spares: list = []
        self.spares_made = 0

    graph = property(lambda self: self.primary.graph)
    plan = property(lambda self: self.primary.plan)
    source = property(lambda self: self.primary.source)
    backend = property(lambda self: getattr(self.primary, "backend", None))

    def fn(self, *args):
        if self._primary_busy.acquire(blocking=False):
            try:
                return self.primary.fn(*args)
            finally:
                self._primary_busy.release()
        return self._run_spare(args)

    __call__ = fn

    def _run_spare(self, args):
        try:
            spare = self._spares.pop()  # list.pop and append are atomic
        except IndexError:
            spare = self._make_spare()
            self.spares_made += 1
        try:
            return spare.fn(*args)
        finally:
            self._spares.append(spare)


def private_backend(backend):
    """A copy of `backend` whose kernels and work arrays are its own (the
    random generator stays shared: a draw is atomic)."""
    b = copy.copy(backend)
    b._kernel_cache = {}
    b.__dict__.pop("_scratch", None)
    return b
