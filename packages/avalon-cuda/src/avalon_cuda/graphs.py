"""CUDA-graph replay of compiled functions (experimental).

A compiled Avalon function launches one kernel per node, and for small models
the CPU time of those launches, not the GPU, sets the step time.  A CUDA graph
records the launches of one call once and replays them with a single launch.

`CapturedFunction(compiled, backend)` wraps an avalon CompiledGraph (what
codegen.generate returns; the jit/grad cache holds one per input signature,
so every call of it has the same input shapes and dtypes):

1. the first call runs the compiled function as usual (it compiles CuPy's
   kernels, creates cuBLAS handles and the random generator);
2. the second call captures: it allocates static input buffers and copies the
   caller's arrays into them, runs the function once on a side stream (so
   kernels are loaded and the memory pool and cuBLAS workspaces of that stream
   exist), copies the inputs again, and captures one call on the side stream
   into a CUDA graph.  Every allocation of that call comes from a private
   memory pool that nothing else allocates from, so the addresses the graph
   holds (intermediates that codegen does not plan, the outputs) stay the
   graph's own; the memory plan's buffers and the constants were allocated
   at compile time and are held by the compiled function;
3. that call and every later one: copy the caller's arrays into the static
   inputs, launch the graph on the caller's current stream, copy the inputs
   the function writes (avalon.assign: optimizer updates) back into the
   caller's arrays, and return copies of the static outputs (the caller may
   keep them; the next replay overwrites the static ones).

All of it is stream-ordered on the caller's stream: no host synchronization.

Capture is refused, and the function keeps running uncaptured (the reason is
in `.reason`), when a kernel could not be captured: profiling (it
synchronizes after every kernel), host arrays among node attributes (copied
to the device on every call), scatter-add gradients on a CuPy without
`ufunc.at` (its bincount fallback reads a size back to the host), or when the
capture itself fails (any host synchronization raises inside a capture).  A
single call also runs uncaptured when its arrays do not match the signature
or when an array the function writes overlaps another argument (static
buffers would break that aliasing).  Random draws are captured: the
generator's state lives on the GPU, so each replay draws new numbers; after
avalon.manual_seed (a new generator) the graph is captured again.  Capturing
runs the function once more on the static copies, which advances the random
stream by one call's draws.

AVALON_CUDA_GRAPHS=0 turns the whole thing off (`CudaBackend.capture` then
returns the compiled function itself).
"""
from __future__ import annotations

import logging
import os

import numpy as np

from avalon.primitive import PRIMITIVES

from ._compat import cupy

log = logging.getLogger("avalon.cuda.graphs")

ENV = "AVALON_CUDA_GRAPHS"


def graphs_enabled() -> bool:
    """False when AVALON_CUDA_GRAPHS is 0/false/no/off."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


class CupyRuntime:
    """What CapturedFunction needs from CuPy, in one place (tests swap in a
    NumPy stand-in to check the bookkeeping without a GPU)."""

    def __init__(self, backend):
        self.backend = backend
        self.array_type = cupy.ndarray

    def has_scatter_add(self) -> bool:
        return getattr(cupy.add, "at", None) is not None

    def empty(self, shape, dtype):
        return self.backend.empty(shape, dtype)

    def copy(self, dst, src) -> None:
        with self.backend._ctx():
            cupy.copyto(dst, src)

    def copy_new(self, a):
        with self.backend._ctx():
            return a.copy()

    def extent(self, a) -> tuple[int, int]:
        return _extent(a.data.ptr, a.shape, a.strides, a.itemsize)

    def capture(self, fn, static_in, refill):
        """(outputs, graph, keep-alive) of one call of fn on static_in,
        captured on a side stream with a private memory pool."""
        pool = cupy.cuda.MemoryPool()
        with self.backend._ctx(), cupy.cuda.using_allocator(pool.malloc):
            stream = cupy.cuda.Stream(non_blocking=True)
            caller = cupy.cuda.get_current_stream()
            stream.wait_event(caller.record())
            with stream:
                fn(*static_in)          # warm-up on the capture stream; results dropped
            caller.wait_event(stream.record())
            refill()                    # the warm-up may have written into the static inputs
            stream.wait_event(caller.record())
            with stream:
                stream.begin_capture()
                try:
                    outs = fn(*static_in)
                except BaseException:
                    _end_quietly(stream)
                    raise
                graph = stream.end_capture()
        return outs, graph, (pool, stream)

    def launch(self, graph) -> None:
        with self.backend._ctx():
            graph.launch(stream=cupy.cuda.get_current_stream())


def _end_quietly(stream):
    try:
        stream.end_capture()
    except Exception:  # noqa: BLE001 - an invalidated capture raises here; the first error matters
        pass


def _extent(ptr, shape, strides, itemsize) -> tuple[int, int]:
    """[lo, hi) bytes an array view can touch."""
    if any(s == 0 for s in shape):
        return ptr, ptr
    lo = ptr + sum(min(0, (s - 1) * st) for s, st in zip(shape, strides))
    hi = ptr + sum(max(0, (s - 1) * st) for s, st in zip(shape, strides)) + itemsize
    return lo, hi


def written_inputs(graph) -> set[int]:
    """Positions of the graph inputs the function writes into (assign targets,
    through views)."""
    root = {}
    for n in graph.nodes:
        prim = PRIMITIVES.get(n.op)
        root[n] = root.get(n.inputs[0], n.inputs[0]) if (prim is not None and prim.view and n.inputs) else n
    position = {n: k for k, n in enumerate(graph.inputs)}
    out = set()
    for n in graph.nodes:
        prim = PRIMITIVES.get(n.op)
        if prim is not None and prim.writes_input:
            r = root.get(n.inputs[0], n.inputs[0])
            if r in position:
                out.add(position[r])
    return out


def capture_blockers(compiled, runtime) -> list[str]:
    """Why `compiled` cannot be captured at all (empty when it may be)."""
    graph = getattr(compiled, "graph", None)
    if graph is None or not callable(getattr(compiled, "fn", None)):
        return [f"{type(compiled).__name__} is not a single compiled graph"]
    reasons = []
    if getattr(compiled, "timings", None):
        reasons.append("compiled for profiling, which synchronizes after every kernel")
    scatter = {"getitem_grad", "take_along_axis_grad"}
    for n in graph.nodes:
        if any(isinstance(v, np.ndarray) for v in n.attrs.values()):
            reasons.append(f"node {n.op} holds a host array that is copied to the device on every call")
        if n.op in scatter and not runtime.has_scatter_add():
            reasons.append(f"{n.op} needs ufunc.at (this CuPy's fallback synchronizes with the host)")
    return sorted(set(reasons))


class CapturedFunction:
    """A compiled graph replayed as a CUDA graph from its second call on; the
    same signature as the compiled function (`fn(*arrays) -> tuple`), and the
    compiled graph's attributes (`source`, `graph`, `plan`, ...)."""

    def __init__(self, compiled, backend, runtime=None, warmup_calls: int = 1):
        self.compiled = compiled
        self.backend = backend
        self.runtime = runtime if runtime is not None else CupyRuntime(backend)
        self.warmup_calls = warmup_calls
        blockers = capture_blockers(compiled, self.runtime)
        self.reason = "; ".join(blockers) or None   # why calls run uncaptured, when they all do
        self.calls = 0
        self.replays = 0
        self.cuda_graph = None
        if self.reason is None:
            g = compiled.graph
            self._specs = [(tuple(n.shape), np.dtype(n.dtype)) for n in g.inputs]
            self._written = written_inputs(g)
            self._random = any(PRIMITIVES[n.op].effectful and not PRIMITIVES[n.op].writes_input
                               for n in g.nodes if n.op in PRIMITIVES)
        self.fn = self.__call__

    def __getattr__(self, name):
        # source, graph, plan, timings ... of the compiled function
        if name == "compiled":
            raise AttributeError(name)
        return getattr(self.compiled, name)

    @property
    def captured(self) -> bool:
        return self.cuda_graph is not None

    def __call__(self, *args):
        self.calls += 1
        if self.reason is not None or self.calls <= self.warmup_calls or not self._fits(args):
            return self.compiled.fn(*args)
        if self._random and self.cuda_graph is not None and self.backend.rng is not self._rng:
            log.debug("random generator replaced (manual_seed): capturing again")
            self._drop()
        if self.cuda_graph is None:
            try:
                self._capture(args)
            except Exception as e:  # noqa: BLE001 - anything uncapturable: run as before
                self._drop()
                self.reason = f"capture failed: {type(e).__name__}: {e}"
                log.info("CUDA graph capture of %s refused: %s", getattr(self.compiled.graph, "name", "?"),
                         self.reason)
                return self.compiled.fn(*args)
        return self._replay(args)

    # -- one call ------------------------------------------------------------------------
    def _fits(self, args) -> bool:
        if len(args) != len(self._specs):
            return False
        for a, (shape, dtype) in zip(args, self._specs):
            if not isinstance(a, self.runtime.array_type) or a.shape != shape or a.dtype != dtype:
                return False
        return not self._aliased_write(args)

    def _aliased_write(self, args) -> bool:
        """Whether an argument the function writes overlaps another argument."""
        if not self._written:
            return False
        spans = sorted((*self.runtime.extent(a), k) for k, a in enumerate(args))
        active: list = []
        for lo, hi, k in spans:
            active = [(h, j) for h, j in active if h > lo]
            if lo < hi and any(k in self._written or j in self._written for _, j in active):
                return True
            if lo < hi:
                active.append((hi, k))
        return False

    def _capture(self, args):
        rt = self.runtime
        static = [rt.empty(shape, dtype) for shape, dtype in self._specs]

        def refill():
            for s, a in zip(static, args):
                rt.copy(s, a)
        refill()
        outs, graph, keep = rt.capture(self.compiled.fn, static, refill)
        self._static_in, self._static_out, self._keep = static, tuple(outs), keep
        self._rng = getattr(self.backend, "rng", None)
        self.cuda_graph = graph

    def _replay(self, args):
        rt = self.runtime
        for s, a in zip(self._static_in, args):
            rt.copy(s, a)
        rt.launch(self.cuda_graph)
        for k in self._written:
            rt.copy(args[k], self._static_in[k])
        self.replays += 1
        return tuple(rt.copy_new(o) for o in self._static_out)

    def _drop(self):
        self.cuda_graph = None
        self._static_in = self._static_out = self._keep = None
