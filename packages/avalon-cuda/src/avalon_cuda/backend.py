"""The CUDA backend: Avalon's primitives on NVIDIA GPUs through CuPy.

Most primitives need nothing of their own: their reference implementations are
written against an array module `xp`, and with `xp = cupy` they run on the GPU
(ufuncs, reductions, matmul on cuBLAS, and the convolution and pooling kernels
of avalon.kernels.conv, which use only as_strided views and matmul; CuPy 14
ships no cuDNN, and none is needed).  What this backend adds:

* device placement: arrays of `cuda:N` live on GPU N, and every kernel of a
  backend for N > 0 runs with GPU N current;
* `compile_fused`: a fused elementwise group becomes ONE CuPy ElementwiseKernel
  (see avalon_cuda.fusion for the generated C++);
* random draws from a cupy.random.Generator per device, whose state lives on
  the GPU (so CUDA graphs replay fresh draws);
* `capture` / `wrap_compiled`: CUDA-graph replay of compiled functions
  (experimental; see avalon_cuda.graphs).
"""
from __future__ import annotations

import functools

import numpy as np

from avalon.backends import Backend
from avalon.errors import DeviceError

from . import fusion
from ._compat import cupy, device_count, gpu_available


class CudaBackend(Backend):
    name = "cuda"
    package = "avalon-cuda"
    priority = 10          # preferred over the CPU whenever a GPU is usable
    array_types = (cupy.ndarray,) if cupy is not None else ()
    xp = cupy

    def __init__(self, index: int = 0):
        ok, why = gpu_available()
        if not ok:
            raise DeviceError(f"device 'cuda:{index}' is not available: {why}")
        n = device_count()
        if not 0 <= index < n:
            raise DeviceError(f"device 'cuda:{index}' does not exist: this machine has {n} CUDA "
                              f"device{'s' if n != 1 else ''} (cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})")
        super().__init__(index)
        self._fused_cache: dict = {}
        self._on_device: dict = {}

    # -- discovery ------------------------------------------------------------
    @classmethod
    def availability(cls) -> tuple[bool, str]:
        return gpu_available()

    @classmethod
    def device_index(cls, x) -> int:
        return int(x.device.id)

    def _ctx(self):
        """GPU `index` made current for the block (CuPy runs on the current device)."""
        return cupy.cuda.Device(self.index)

    # -- memory ---------------------------------------------------------------
    def asarray(self, x, dtype=None):
        if isinstance(x, cupy.ndarray):
            if x.device.id != self.index:
                with self._ctx():
                    x = x.copy()        # CuPy copies another GPU's array onto the current one
            return x if dtype is None or x.dtype == np.dtype(dtype) else x.astype(dtype)
        with self._ctx():
            return cupy.asarray(x, dtype=dtype)

    def to_host(self, x) -> np.ndarray:
        if isinstance(x, cupy.ndarray):
            return cupy.asnumpy(x)
        return np.asarray(x)

    def empty(self, shape, dtype):
        with self._ctx():
            return cupy.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        with self._ctx():
            return cupy.zeros(shape, dtype=dtype)

    def synchronize(self) -> None:
        cupy.cuda.Device(self.index).synchronize()

    # -- kernels --------------------------------------------------------------
    def kernel(self, prim, attrs):
        k = super().kernel(prim, attrs)
        return k if self.index == 0 else self._current(k)

    def _current(self, fn):
        """fn run with this backend's GPU current.  Device 0 skips the wrapper:
        it is CuPy's current device unless the program changed it."""
        wrapped = self._on_device.get(id(fn))
        if wrapped is None or wrapped[0] is not fn:
            @functools.wraps(fn)
            def on_device(*args, **kwargs):
                with self._ctx():
                    return fn(*args, **kwargs)
            wrapped = self._on_device[id(fn)] = (fn, on_device)
        return wrapped[1]

    def compile_fused(self, body):
        """One ElementwiseKernel for the whole group, cached by the body's text
        form; groups the generator cannot write exactly (a primitive without a
        C expression, float16, complex) run op by op, as on the base backend."""
        key = fusion.cache_key(body)
        fn = self._fused_cache.get(key)
        if fn is None:
            try:
                fn = self._elementwise_kernel(fusion.generate(body))
            except fusion.Unfusable as e:
                fn = self._op_by_op(body, str(e))
            self._fused_cache[key] = fn
        return fn if self.index == 0 else self._current(fn)

    def _elementwise_kernel(self, src: fusion.FusedSource):
        kernel = cupy.ElementwiseKernel(src.in_params, src.out_params, src.operation, src.name)
        shape, dtype, empty = src.out_shape, src.out_dtype, self.empty

        def fused(*inputs, out=None):
            if out is None:
                out = empty(shape, dtype)
            kernel(*inputs, out)
            return out
        fused.source = src.text
        fused.kernel = kernel
        fused.fused_source = src
        fused.fallback_reason = None
        return fused

    def _op_by_op(self, body, reason):
        # the base interpreter passes constants straight to the kernels: they must be device arrays
        body = body.copy()
        for n in body.nodes:
            if n.op == "const" and not isinstance(n.value, cupy.ndarray):
                n.value = self.asarray(np.asarray(n.value))
        fn = Backend.compile_fused(self, body)
        fn.source = f"// not one kernel ({reason}): the group's kernels run in turn\n{body.format(show_loc=False)}\n"
        fn.kernel = None
        fn.fused_source = None
        fn.fallback_reason = reason
        return fn

    # -- randomness -------------------------------------------------------------
    def seed(self, seed) -> None:
        with self._ctx():
            self.rng = cupy.random.default_rng(seed)

    def _draw(self, method, shape, dtype):
        dtype = np.dtype(dtype)
        # CuPy's Generator draws float32 and float64; other float dtypes are cast from float32
        native = dtype if dtype in (np.dtype(np.float32), np.dtype(np.float64)) else np.dtype(np.float32)
        with self._ctx():
            r = getattr(self._rng(), method)(tuple(shape), dtype=native)
            return r if native == dtype else r.astype(dtype)

    def k_random_uniform(self, *, shape, dtype):
        return self._draw("random", shape, dtype)

    def k_random_normal(self, *, shape, dtype):
        return self._draw("standard_normal", shape, dtype)

    # -- CUDA graphs (experimental) -----------------------------------------------
    def capture(self, compiled, *, enabled=None):
        """A callable with the signature of `compiled` (an avalon CompiledGraph)
        that, from the second call on, replays the compiled function's kernels as
        one CUDA graph.  AVALON_CUDA_GRAPHS=0 (or enabled=False) returns
        `compiled` itself.  See avalon_cuda.graphs for when capture is refused."""
        from .graphs import CapturedFunction, graphs_enabled
        if not (graphs_enabled() if enabled is None else enabled):
            return compiled
        return CapturedFunction(compiled, self)

    def wrap_compiled(self, compiled):
        """The hook the core would call on every compiled graph right after code
        generation (avalon.api: `compiled = backend.wrap_compiled(compiled)`);
        the base Backend would return `compiled` unchanged.  Here: CUDA-graph
        replay, when enabled."""
        return self.capture(compiled)
