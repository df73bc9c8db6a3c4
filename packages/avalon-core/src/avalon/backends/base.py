"""The backend contract: a base class written against an array module `xp`.

A backend subclass sets `xp` (numpy, cupy, ...) and its array type, and
overrides only what it does faster: a method `k_<primitive>(self, *arrays,
**attrs)` replaces that primitive's reference implementation, and
`compile_fused` may turn a fused elementwise group into one kernel.  Everything
else falls back to the primitive's xp implementation.
"""
from __future__ import annotations

import functools

import numpy as np

from ..errors import MissingRuleError

#: a graph gets a schedule with BLAS on several threads only from this many
#: floating-point operations in its matrix products: below, the products are too
#: small to gain from threads, and the BLAS threads' spinning after each call
#: would only slow the schedules timed after it
BLAS_THREADS_MIN_FLOPS = 4_000_000


def product_flops(products) -> int:
    """2 * m * n * k summed over matmul nodes (batched: times the batch)."""
    total = 0
    for n in products:
        a = n.inputs[0]
        total += 2 * int(np.prod(n.shape)) * (int(a.shape[-1]) if a.ndim else 1)
    return total


class Backend:
    name = "base"          # the device kind: avalon.device("<name>[:index]")
    package = "avalon-core"  # what to pip install to get it
    priority = 0           # best_available_device() picks the highest available
    array_types: tuple = ()
    xp = np
    parallel_shards = 1    # threads a compiled step may be split into (see avalon.runtime.threads)

    def __init__(self, index: int = 0):
        self.index = index
        self._kernel_cache: dict = {}
        self.rng = None

    # -- discovery ------------------------------------------------------------
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(available, reason when not)."""
        return True, ""

    @classmethod
    def device_index(cls, x) -> int:
        """The device index an array of this backend lives on."""
        return 0

    @property
    def device(self):
        from . import Device
        return Device(self.name, self.index)

    # -- memory ---------------------------------------------------------------
    def asarray(self, x, dtype=None):
        """An array on this device from a host (NumPy) array or Python value."""
        return self.xp.asarray(x, dtype=dtype)

    def to_host(self, x) -> np.ndarray:
        return np.asarray(x)

    def empty(self, shape, dtype):
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return self.xp.zeros(shape, dtype=dtype)

    def buffer(self, nbytes: int):
        """A flat uint8 buffer of nbytes that a compiled function's memory plan
        places its values in (each value starts at the buffer's start)."""
        return self.xp.empty((nbytes,), dtype=np.uint8)

    def synchronize(self) -> None:
        """Wait until queued work is done (for timing); CPU work is synchronous."""

    # -- compilation ------------------------------------------------------------
    @classmethod
    def passes(cls) -> list:
        """This backend's own graph passes, as (name, pass, position) triples
        placed among avalon.passes.BUILTIN; positions as for the avalon_passes
        hook ("start", "end", "before:<name>", "after:<name>")."""
        return []

    @classmethod
    def forward_passes(cls) -> list:
        """This backend's rewrites of the forward graph, run before
        differentiation (among avalon.passes.FORWARD), in the same form."""
        return []

    # -- kernels --------------------------------------------------------------
    def run(self, prim, arrays, attrs):
        r = self.kernel(prim, attrs)(*arrays)
        # reductions to 0-d give NumPy scalars; eager results are always arrays
        return r if isinstance(r, self.array_types) else self.asarray(r)

    def kernel(self, prim, attrs):
        """A callable(*arrays[, out=]) computing `prim` with static `attrs`."""
        key = (prim.name, _freeze(attrs))
        try:
            return self._kernel_cache[key]
        except (KeyError, TypeError):
            pass
        k = self._make_kernel(prim, attrs)
        try:
            self._kernel_cache[key] = k
        except TypeError:
            pass
        return k

    def node_kernel(self, node):
        """The kernel of one graph node, which knows its static shapes and dtypes:
        a backend may return one specialized to them (the CPU's C kernels); by
        default, `kernel(prim, attrs)`."""
        from ..primitive import PRIMITIVES
        return self.kernel(PRIMITIVES[node.op], node.attrs)

    def _make_kernel(self, prim, attrs):
        override = getattr(self, "k_" + prim.name, None)
        if override is not None:
            return functools.partial(override, **attrs) if attrs else override
        if prim.ufunc is not None and not attrs:
            return getattr(self.xp, prim.ufunc)
        if prim.impl is None:
            raise MissingRuleError(f"backend {self.name!r} has no kernel for primitive {prim.name!r} "
                                   f"and the primitive has no reference implementation")
        return functools.partial(prim.impl, self.xp, **attrs)

    def supports_out(self, prim) -> bool:
        """Whether this backend's kernel for `prim` accepts out=."""
        if getattr(self, "k_" + prim.name, None) is not None:
            return prim.name in getattr(self, "out_kernels", ())
        return prim.accepts_out

    def compile_fused(self, body):
        """Compile a fused elementwise group (a Graph) into one callable
        f(*inputs, out=None).  This default runs the group's kernels in turn;
        backends override it to emit a single kernel."""
        from ..primitive import PRIMITIVES
        steps = []
        index = {n: ("in", k) for k, n in enumerate(body.inputs)}
        for n in body.nodes:
            if n.op == "input":
                continue
            if n.op == "const":
                index[n] = ("const", n.value)
                continue
            prim = PRIMITIVES[n.op]
            steps.append((self.kernel(prim, n.attrs), [index[i] for i in n.inputs]))
            index[n] = ("tmp", len(steps) - 1)
        result = index[body.outputs[0]]

        def fused(*inputs, out=None):
            tmps = []
            def get(ref):
                kind, v = ref
                return inputs[v] if kind == "in" else (v if kind == "const" else tmps[v])
            for k, refs in steps:
                tmps.append(k(*[get(r) for r in refs]))
            r = get(result)
            if out is not None:
                out[...] = r
                return out
            return r
        return fused

    # -- randomness -------------------------------------------------------------
    def seed(self, seed: int) -> None:
        self.rng = self.xp.random.default_rng(seed)

    def _rng(self):
        if self.rng is None:
            from . import current_seed
            self.seed(current_seed(self))
        return self.rng

    def k_random_uniform(self, *, shape, dtype, full_shape=None, shard_axis=None):
        return self._shard_of(_drawn(self._rng().random, full_shape or shape, dtype), shape, shard_axis)

    def k_random_normal(self, *, shape, dtype, full_shape=None, shard_axis=None):
        return self._shard_of(_drawn(self._rng().standard_normal, full_shape or shape, dtype), shape, shard_axis)

    def _shard_of(self, full, shape, axis):
        if axis is None or tuple(full.shape) == tuple(shape):
            return full
        k = shape[axis]
        index = (slice(None),) * axis + (slice(self._shard_index * k, (self._shard_index + 1) * k),)
        return full[index]

    def k_allreduce_sum(self, x, *, key):
        """Sum over the threads of a split step (see avalon.runtime.threads)."""
        return self._reducers[key].reduce(self._shard_index, x)

    def product_threads_pay(self, products) -> bool:
        """Whether a schedule running these matmul nodes on several BLAS threads is
        worth timing against the others (avalon.runtime.threads.Autotuned)."""
        return product_flops(products) >= BLAS_THREADS_MIN_FLOPS

    def wrap_compiled(self, compiled):
        """A chance to wrap a freshly compiled graph (a GPU backend captures it
        as a CUDA graph); the result must keep .fn, .source, .graph and .plan."""
        return compiled


def _drawn(draw, shape, dtype):
    """Generators draw float32/float64 only: half precision is drawn in float32."""
    dtype = np.dtype(dtype)
    if dtype in (np.float32, np.float64):
        return draw(shape, dtype=dtype)
    return draw(shape, dtype=np.float32).astype(dtype)


def _freeze(attrs):
    return tuple(sorted((k, _hashable(v)) for k, v in attrs.items()))


def _hashable(v):
    if isinstance(v, np.ndarray):
        return ("ndarray", v.shape, v.dtype.str, v.tobytes())
    if isinstance(v, list):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, tuple):
        return tuple(_hashable(x) for x in v)
    return v
