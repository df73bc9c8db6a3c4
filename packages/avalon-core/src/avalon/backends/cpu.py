"""The CPU backend: NumPy.  avalon-core registers it through the ``avalon``
entry-point group, exactly as a third-party backend registers."""
from __future__ import annotations

import os
import threading

import numpy as np

from ..plugins import hookimpl
from .base import Backend
from ..kernels import conv_csn
from ..runtime.blas import loaded_blas, prefetch as prefetch_blas
from .cpu_fused import compile_fused_numpy


#: bytes a compiled function's buffers are aligned to: a cache line, one AVX-512 vector
BUFFER_ALIGNMENT = 64


class CpuBackend(Backend):
    name = "cpu"
    package = "avalon-core"
    priority = 0
    array_types = (np.ndarray,)
    xp = np

    def __init__(self, index: int = 0):
        super().__init__(index)
        _own_blas_threads()
        if not _prefetched:
            _prefetched.append(True)
            prefetch_blas()        # loads while the first graph is traced
            _prefetch_driver()
        from ..runtime.threads import shard_count
        self.parallel_shards = shard_count()

    def buffer(self, nbytes: int):
        """A cache-line-aligned buffer: NumPy aligns large arrays to 16 bytes, and
        the C kernels' 64-byte vector loads that straddle two cache lines made a
        direct convolution's weight gradient 25-40% slower."""
        raw = np.empty(nbytes + BUFFER_ALIGNMENT, dtype=np.uint8)
        start = -raw.ctypes.data % BUFFER_ALIGNMENT
        return raw[start:start + nbytes]

    @classmethod
    def passes(cls):
        # convolutional stacks batch-innermost: each convolution a direct C kernel, or
        # im2col and one large matrix product (the shapes NumPy's BLAS runs fastest)
        from ..passes.updates import early_updates, fuse_updates
        from ..passes.views import fuse_views
        # slices read in place by the C kernels of fused groups (they lower strided loads);
        # in-place updates (an optimizer's) as one multi-output C kernel: one pass over memory
        # a transposed weight many products read (an RNN's), copied once: OpenBLAS's
        # products by a transposed right operand are 20-50% slower
        from ..passes.products import shared_transposed_operands
        # an op or a reduction alone as a C kernel: in the segments' driver calls (no
        # Python dispatch between them), and NumPy's pairwise sum is 2-2.5x slower
        from ..passes.fusion import fuse_lone_ops
        return [("layout", _cpu_layout, "after:dce_2"),
                ("shared_transposed_operands", shared_transposed_operands, "after:dce_3"),
                # products with fewer rows than columns computed transposed where OpenBLAS runs them
                ("wide_products", _wide_products_on_openblas, "after:shared_transposed_operands"),
                ("fuse_lone_ops", fuse_lone_ops, "after:fuse_elementwise"),
                ("fuse_views", fuse_views, "after:fuse_lone_ops"),
                ("fuse_updates", fuse_updates, "after:fuse_views"),
                # each update right after its gradient, which it then reads from the cache
                ("early_updates", early_updates, "after:fuse_updates")]

    @classmethod
    def forward_passes(cls):
        # max pooling before monotone activations: they run on the pooled tensor
        from ..passes.pool_first import pool_first
        return [("pool_first", pool_first, "start")]

    out_kernels = ("where", "im2col_csn", "col2im_csn")

    def node_kernel(self, node):
        """Ops with a `lower` rule (the batch-innermost glue: im2col, col2im, max
        pooling) as C kernels specialized to the node's shapes (cpu_native), with
        the NumPy kernel for arrays they were not compiled for; NumPy alone when
        AVALON_NATIVE=0 or no C compiler is usable."""
        from . import cpu_native
        fallback = super().node_kernel(node)
        if not cpu_native.enabled():
            return fallback
        return cpu_native.compile_node_c(node, fallback) or fallback

    def compile_fused(self, body):
        """A fused elementwise group as ONE compiled C kernel (avalon.kernel_ir, built
        with the system compiler: cpu_native); the group's NumPy ufuncs in turn
        (compile_fused_numpy) when it has no exact C kernel, when no C compiler is
        usable (warned once) or when AVALON_NATIVE=0."""
        from . import cpu_native
        if not cpu_native.enabled():
            return compile_fused_numpy(body, self)
        try:
            return cpu_native.compile_fused_c(body, self)
        except cpu_native.Unfusable:
            return compile_fused_numpy(body, self)
        except cpu_native.NativeUnavailable:
            from ..runtime import native
            native.warn_fallback_once("elementwise fusion")
            return compile_fused_numpy(body, self)
        except cpu_native.NativeBuildError as e:
            import warnings
            warnings.warn(f"avalon: a fused kernel did not build, so its group runs on NumPy: {e}",
                          RuntimeWarning, stacklevel=2)
            return compile_fused_numpy(body, self)

    def set_blas_threads(self, n: int) -> None:
        """Threads for the matrix products of the calls that follow (C calls: cheap).

        Where the segment driver is built, the products of compiled segments are
        split across its helper threads, each piece a one-thread BLAS call (they
        rest between steps, where BLAS's own threads busy-wait ~0.1 s after each
        call and slow the work that follows); BLAS's own thread count stays as
        _own_blas_threads set it.  Without the driver, BLAS's threads serve."""
        from ..runtime.segments import set_product_threads
        if set_product_threads(n):
            return
        for lib in _blas_libs:
            lib.set_num_threads(n)

    def product_threads_pay(self, products) -> bool:
        """With the segment driver, its helper threads split every 2-D product big
        enough (segments.splits_product) and rest between calls, so one such product
        is reason enough: a one-sample VAE prediction, matrix-vector products with a
        784x500 weight, took 78 us on two threads against 155 us on one.  Without the
        driver, BLAS's own threads spin after each call (Backend's rule)."""
        if not _segments_split_products():
            return super().product_threads_pay(products)
        from ..runtime.segments import splits_product
        return any(n.ndim == 2 and n.dtype in (np.float32, np.float64) and n.inputs[0].ndim == 2
                   and splits_product(n.shape[0], n.shape[1], n.inputs[0].shape[1]) for n in products)

    @property
    def blas_threads_available(self) -> int:
        return (os.cpu_count() or 1) if _blas_libs and "AVALON_BLAS_THREADS" not in os.environ else 1

    # -- convolutions with work arrays from a pool: no fresh pages every step --
    def scratch(self, tag, shape, dtype):
        """A work array reused by every call that asks for the same (tag, shape,
        dtype); only for use within one kernel call.  The pool is per thread
        (two threads running kernels at once never share a work array) and
        per backend copy (see avalon.threadsafe.private_backend)."""
        local = self.__dict__.get("_scratch")
        if local is None:
            local = self.__dict__.setdefault("_scratch", threading.local())
        pool = getattr(local, "pool", None)
        if pool is None:
            pool = local.pool = {}
        key = (tag, tuple(shape), np.dtype(dtype))
        arr = pool.get(key)
        if arr is None:
            arr = pool[key] = np.empty(shape, dtype)
        return arr

    def k_im2col_csn(self, x, out=None, **attrs):
        return conv_csn.im2col_csn(np, x, out=out, scratch=self.scratch, **attrs)

    def k_col2im_csn(self, cols, out=None, **attrs):
        return conv_csn.col2im_csn(np, cols, out=out, scratch=self.scratch, **attrs)

    def k_where(self, c, a, b, out=None):
        """where() by bit masks: several times faster than np.where on random
        masks, and exact for every value (inf and NaN included)."""
        dtype = np.result_type(a, b)
        if (dtype.itemsize not in _UINT or a.dtype != dtype or b.dtype != dtype
                or c.dtype != np.bool_ or c.ndim == 0):
            r = np.where(c, a, b)
            if out is None:
                return r
            out[...] = r
            return out
        shape = np.broadcast_shapes(c.shape, a.shape, b.shape)
        if out is None:
            out = np.empty(shape, dtype)
        u = _UINT[dtype.itemsize]
        mask = np.negative(c.view(np.uint8), dtype=u, casting="unsafe")  # 0 or all ones
        ou = out.view(u)
        np.bitwise_and(np.asarray(a).view(u), mask, out=ou)
        if b.ndim == 0 and not b.any():
            return out
        np.invert(mask, out=mask)
        rest = np.bitwise_and(np.asarray(b).view(u), mask, out=mask if mask.shape == shape else None)
        np.bitwise_or(ou, rest, out=ou)
        return out


_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _cpu_layout(graph):
    """The layout pass, with convolutions that fit them as direct C kernels where
    C kernels build (no columns at all); asked at each compilation (pipelines are
    kept, AVALON_NATIVE is read per compilation)."""
    from ..passes.layout import layout
    return layout(graph, direct_convs=_builds_c_kernels())


def _wide_products_on_openblas(graph):
    """passes.products.wide_products when the graph's products run on OpenBLAS
    (NumPy's matmul, or segments calling NumPy's OpenBLAS), whose products by a
    transposed right operand gain from more rows.  MKL, which segments call when
    it is installed (runtime.blas), shows no such gap: the VAE's training step took
    the same time either way, and the transposed view only cost its elementwise
    readers strided loads (the VAE decoder's bias + sigmoid over 100x784: a batch
    prediction 0.80 ms as it is against 0.87 ms rewritten, on two threads).
    Asked at each compilation, like AVALON_BLAS, without waiting for MKL to load
    (runtime.blas.prefetch loads it meanwhile)."""
    from ..passes.products import wide_products
    from ..runtime.blas import will_use_mkl
    if _segments_split_products() and will_use_mkl():     # not waiting for MKL to load
        return graph
    return wide_products(graph)


def _segments_split_products() -> bool:
    """Whether compiled graphs run their 2-D products in segments (the C driver
    builds and AVALON_C_DRIVER allows it), with segments' BLAS and product threads."""
    from ..runtime import segments
    return segments.enabled() and segments.driver() is not None


def _builds_c_kernels() -> bool:
    """Whether node kernels are built as C here (AVALON_NATIVE allows it and a
    C compiler is usable)."""
    from . import cpu_native
    from ..runtime import native
    return cpu_native.enabled() and native.available() and cpu_native.OBJECT_CALLS


_blas_libs: list = []
_prefetched: list = []


def _prefetch_driver():
    """Load the segments' driver (runtime.segments.driver: a shared object from the
    disk cache, or built on a machine's first compilation) in a background thread
    while the first graph is traced (3-4 ms of a warm first compilation).  The
    modules it needs are imported here, in the caller's thread: the background
    thread imports nothing, so a fork meanwhile finds no import half done."""
    from ..runtime import disk_memo, segments  # noqa: F401
    from . import cpu_native  # noqa: F401

    def load():
        try:
            if _segments_split_products():
                segments.driver()
        except Exception:  # noqa: BLE001 - a compilation asking for the driver meets the error again
            pass
    threading.Thread(target=load, name="avalon-driver-prefetch", daemon=True).start()


def _own_blas_threads():
    """Run BLAS single-threaded (AVALON_BLAS_THREADS overrides).

    On small machines OpenBLAS's own threads busy-wait between calls and fight
    every other thread of the process, which made a CNN training step several
    times slower than with one BLAS thread; Avalon schedules its own threads
    instead.  threadpoolctl is the maintained way to set this at run time."""
    if not _blas_libs:
        _blas_libs.extend(loaded_blas())
    for lib in _blas_libs:
        lib.set_num_threads(int(os.environ.get("AVALON_BLAS_THREADS", "1")))


@hookimpl
def avalon_backends():
    return [CpuBackend]
