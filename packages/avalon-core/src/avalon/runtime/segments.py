"""Segments: runs of C kernels of a compiled graph called through ctypes ONCE.

The code generator calls one kernel per graph node, and each call costs a few
microseconds of Python with the GIL held.  With segments (the default;
AVALON_C_DRIVER=0, read when a graph is compiled, turns them off: see
`enabled`), a run of consecutive nodes that
all have C implementations of static shapes becomes one call of a small C
driver (this module's `DRIVER_SOURCE`, one shared object per machine): it
checks the per-call arrays, then calls each kernel in turn through its function
pointer, with the GIL released for the whole run.  C-able nodes:

* fused groups and glue kernels built by backends.cpu_native (their C
  function's address, read once the batch is built);
* 2-D float32/float64 matrix products, through the cblas ?gemm of the BLAS
  that AVALON_BLAS selects (runtime.blas: MKL when installed, else the OpenBLAS
  NumPy itself uses), transposed operands as transpose flags; with NumPy's
  OpenBLAS they are made the way NumPy's matmul makes them, so results are the
  same bits.  A product with a vector operand (one row times a matrix, a
  matrix times one column: a one-sample prediction's layers) goes through
  ?gemv, as NumPy's matmul calls it;
* views of static layout (reshape of a C-contiguous value, transpose): pointer
  and strides known at compile time, no call at all.

A thread that set product threads (the "BLAS on N threads" schedule) has each
large product split into pieces across the driver's helper threads, and each
large elementwise kernel too, through its range entry (NAME_part: a loop over
[lo, hi), kernel_ir.render_c): an optimizer's update of a large weight is a
pass over memory that one core's bandwidth alone would bound.

Each segment has a *program*: an int64 table holding the kernels' addresses,
the memory plan's buffers' addresses (fixed per compiled copy: each thread's
copy has its own table) and the layout expected of every array passed per call
(graph inputs, values made by Python kernels, fresh results allocated in
Python before the call: the results the call returns, recycled once the caller
lets go of them, runtime.recycled).  The C source holds no address, so the
disk cache of native builds hits across processes.  When an array passed per call is not what
the program was compiled for (another dtype, size or array type, not
C-contiguous, not aligned) or a written graph input overlaps another array, the
driver returns nonzero before running anything and the generated code runs the
segment's nodes one by one, as without segments.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from dataclasses import dataclass, field

import numpy as np

from ..kernel_ir.ir import elementwise_extent
from ..primitive import PRIMITIVES
from . import native
from .blas import generated_code_blas
from .recycled import RecycledArrays, recycles

__all__ = ["enabled", "blas_gemm", "blas_gemv", "set_product_threads", "driver", "Layout", "SegmentBuilder", "MAX_DYN", "MAX_ARGS"]

#: most arrays one segment takes per call, and most pointer arguments of one kernel
MAX_DYN = 48
MAX_ARGS = 64

_C_CONTIGUOUS, _ALIGNED, _WRITEABLE = 0x0001, 0x0100, 0x0400   # NPY_ARRAY_* flags
_OP_CALL, _OP_GEMM, _OP_GEMV, _OP_PARTS = 0, 1, 2, 3
_NO_TRANS, _TRANS, _ROW_MAJOR, _COL_MAJOR = 111, 112, 101, 102      # CBLAS enums


def enabled() -> bool:
    """Whether compiled graphs use segments: yes unless AVALON_C_DRIVER says no
    ("0", "false", "off", "no")."""
    return native.env_switch("AVALON_C_DRIVER")


# -- the C driver ---------------------------------------------------------------------------------------------

#: the smallest products split across the product threads (set_product_threads):
#: a matrix product's M*N*K, a matrix-vector product's M*N (a smaller one runs
#: whole: a hand-off costs ~1-2 us)
MIN_SPLIT_GEMM_WORK = 1 << 18
MIN_SPLIT_GEMV_WORK = 1 << 15


def splits_product(rows: int, cols: int, inner: int) -> bool:
    """Whether the driver's product threads split a (rows x inner) @ (inner x cols)
    product: one row or column is BLAS's matrix-vector product."""
    if rows == 1 or cols == 1:
        return rows * cols * inner >= MIN_SPLIT_GEMV_WORK
    return rows * cols * inner >= MIN_SPLIT_GEMM_WORK


_PRODUCT_THREADS_C = r"""
/* -- products split across helper threads ------------------------------------------------------
   A thread that set avl_set_product_threads(n > 1) runs each large product of its segments
   in n pieces (rows or columns of the result).  The pieces are claimed from a counter: the
   caller runs the first and then claims the rest itself as long as no helper has, so it
   never waits for a helper to wake up, only for pieces a helper is running.  Helpers are
   kept off the caller's CPU (avl_keep_off): Linux wakes a sleeping thread on its waker's
   CPU when the other one looks busy (a virtual CPU after a pause), and the two then shared
   one CPU for tens of milliseconds before the balancer moved one.  A helper spins
   after its piece for the next product of the same call, up to AVL_SPIN_NS.  Once the caller
   sets one thread again (its call is over) it spins only as long as the last pause between
   two calls lasted, twice over: a loop of predictions keeps its helpers awake (a virtual CPU
   woken from sleep ran the next products at a fraction of its speed for milliseconds), a
   training loop, whose optimizer update lies between two calls, lets them sleep and does not
   share its cores with a spinning thread.  One caller at a
   time uses the helpers; another one meanwhile runs its products whole.  Pieces are
   independent products with the same inner dimension, so each element is summed as in
   the whole product. */
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdatomic.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#define AVL_RELAX() __builtin_ia32_pause()
#else
#define AVL_RELAX() ((void)0)
#endif
#define AVL_MAX_HELPERS 15
#define AVL_SPIN_NS 1000000
#define AVL_MIN_GEMM_WORK @MIN_GEMM_WORK@    /* M*N*K below this: whole (a hand-off costs ~1-2 us) */
#define AVL_MIN_GEMV_WORK @MIN_GEMV_WORK@     /* M*N */
#define AVL_PIECE_ALIGN 16

typedef struct {
    _Atomic uint64_t go;            /* the generation of the last product handed over */
    _Atomic int sleeping;
    pthread_mutex_t m;
    pthread_cond_t c;
    pthread_t thread;
    _Atomic int tid;                /* its kernel thread id, once it runs */
    int off;                        /* the CPU it is kept off (-1: none) */
    char pad[64];
} avl_helper;

/* what is being split: a product, or an elementwise kernel's loop (its NAME_part entry,
   kernel_ir.render_c); written by its caller before it publishes avl_claim, stable until
   every piece is done */
typedef void (*avl_part_fn)(void* const*, int64_t, int64_t);
typedef struct {
    const int64_t* q; const char* a; const char* b; char* c; int axis;     /* a product */
    avl_part_fn part; void* const* args;                                   /* or a kernel's range */
    int64_t step, extent;
} avl_job_t;
static avl_job_t avl_job;
static _Atomic uint64_t avl_claim;   /* generation << 32 | next piece to claim */
static _Atomic int avl_pieces;       /* pieces of the product of that generation */
static _Atomic int avl_done;         /* pieces the helpers have finished */
static _Atomic uint64_t avl_rest;    /* bumped when a caller is done with the helpers */
static _Atomic int64_t avl_rest_at;  /* when (avl_now_ns) */
static _Atomic int64_t avl_pause_ns; /* how long the last pause between two calls lasted */
static uint64_t avl_generation;

static avl_helper avl_helpers[AVL_MAX_HELPERS];
static int avl_n_helpers;
static cpu_set_t avl_allowed;         /* the CPUs the process may use, when the driver was loaded */

/* read when the driver is loaded: later, a caller may be pinned to one CPU for a call
   (avalon.runtime.threads) */
__attribute__((constructor)) static void avl_read_allowed(void)
{
    if (sched_getaffinity(0, sizeof avl_allowed, &avl_allowed) != 0)
        CPU_ZERO(&avl_allowed);     /* unknown: helpers left where the system puts them */
}

/* whether helpers are placed off their caller's CPU (AVALON_PIN_THREADS, read in Python) */
AVL_EXPORT void avl_place_helpers(int on)
{
    if (!on)
        CPU_ZERO(&avl_allowed);
}
static pthread_mutex_t avl_pool_lock = PTHREAD_MUTEX_INITIALIZER;
static int avl_atfork_done;
static __thread int avl_product_threads = 1;

static int64_t avl_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

AVL_EXPORT int avl_set_product_threads(int n)
{
    int old = avl_product_threads;
    avl_product_threads = n < 1 ? 1 : (n > AVL_MAX_HELPERS + 1 ? AVL_MAX_HELPERS + 1 : n);
    if (old > 1 && avl_product_threads == 1) {
        atomic_store(&avl_rest_at, avl_now_ns());
        atomic_fetch_add(&avl_rest, 1);
    } else if (old == 1 && avl_product_threads > 1 && atomic_load(&avl_rest_at) != 0) {
        atomic_store(&avl_pause_ns, avl_now_ns() - atomic_load(&avl_rest_at));
    }
    return old;
}

AVL_EXPORT int avl_product_helpers(void)
{
    return avl_n_helpers;
}

/* helper k's kernel thread id (0 before it runs, -1 when there is no such helper) */
AVL_EXPORT int avl_product_helper_tid(int k)
{
    return k >= 0 && k < avl_n_helpers ? atomic_load(&avl_helpers[k].tid) : -1;
}

/* the product at q (a gemv or a gemm op of a program) on pointers a, b, c, restricted
   to n of the result's rows (axis 0) or columns (axis 1) from lo: a gemv's are the
   elements of y = A^T x; the whole product is lo = 0 and n = all of them */
static void avl_product(const int64_t* q, const char* a, const char* b, char* c, int axis, int64_t lo, int64_t n)
{
    const int64_t es = q[2] == 0 ? 4 : 8;
    if (q[0] == AVL_OP_GEMV) {
        a += lo * es * (q[3] == AVL_ROW_MAJOR ? 1 : q[6]);
        c += lo * es * q[8];
        if (q[2] == 0)
            ((avl_sgemv)q[1])((int)q[3], AVL_TRANS, q[4], n, 1.0f, (const float*)a, q[6], (const float*)b, q[7],
                              0.0f, (float*)c, q[8]);
        else
            ((avl_dgemv)q[1])((int)q[3], AVL_TRANS, q[4], n, 1.0, (const double*)a, q[6], (const double*)b, q[7],
                              0.0, (double*)c, q[8]);
        return;
    }
    int64_t m = q[5], nn = q[6];     /* gemm, row-major */
    if (axis == 0) {
        a += lo * es * (q[3] == AVL_NO_TRANS ? q[8] : 1);
        c += lo * es * q[10];
        m = n;
    } else {
        b += lo * es * (q[4] == AVL_NO_TRANS ? 1 : q[9]);
        c += lo * es;
        nn = n;
    }
    if (q[2] == 0)
        ((avl_sgemm)q[1])(AVL_ROW_MAJOR, (int)q[3], (int)q[4], m, nn, q[7], 1.0f, (const float*)a, q[8],
                          (const float*)b, q[9], 0.0f, (float*)c, q[10]);
    else
        ((avl_dgemm)q[1])(AVL_ROW_MAJOR, (int)q[3], (int)q[4], m, nn, q[7], 1.0, (const double*)a, q[8],
                          (const double*)b, q[9], 0.0, (double*)c, q[10]);
}

static void avl_run_piece(int64_t piece)
{
    const int64_t lo = piece * avl_job.step;
    const int64_t hi = lo + avl_job.step < avl_job.extent ? lo + avl_job.step : avl_job.extent;
    if (avl_job.part)
        avl_job.part(avl_job.args, lo, hi);
    else
        avl_product(avl_job.q, avl_job.a, avl_job.b, avl_job.c, avl_job.axis, lo, hi - lo);
}

/* claims the next unclaimed piece of generation gen: its index, or -1 when none is left
   (or the product of gen is over) */
static int64_t avl_claim_piece(uint64_t gen)
{
    uint64_t w = atomic_load(&avl_claim);
    for (;;) {
        const int64_t k = (int64_t)(w & 0xffffffffu);
        if ((w >> 32) != (gen & 0xffffffffu) || k >= atomic_load(&avl_pieces))
            return -1;
        if (atomic_compare_exchange_weak(&avl_claim, &w, w + 1))
            return k;
    }
}

static void* avl_helper_loop(void* arg)
{
    avl_helper* h = (avl_helper*)arg;
    atomic_store(&h->tid, (int)syscall(SYS_gettid));
    uint64_t seen = 0;   /* go is 0 when the thread is made; a product may be handed over before it runs */
    uint64_t rest = atomic_load(&avl_rest);
    for (;;) {
        uint64_t g = atomic_load(&h->go);
        if (g == seen) {
            const int64_t start = avl_now_ns();
            unsigned spins = 0;
            int64_t limit = AVL_SPIN_NS;    /* ns after start */
            int over = 0;
            while ((g = atomic_load(&h->go)) == seen) {
                AVL_RELAX();
                if ((++spins & 63u) != 0)
                    continue;
                if (!over && atomic_load(&avl_rest) != rest) {  /* the call is over */
                    const int64_t bridge = 2 * atomic_load(&avl_pause_ns);
                    over = 1;
                    limit = bridge <= AVL_SPIN_NS ? atomic_load(&avl_rest_at) - start + bridge : 0;
                }
                if (avl_now_ns() - start > limit) {
                    pthread_mutex_lock(&h->m);
                    atomic_store(&h->sleeping, 1);
                    while ((g = atomic_load(&h->go)) == seen)
                        pthread_cond_wait(&h->c, &h->m);
                    atomic_store(&h->sleeping, 0);
                    pthread_mutex_unlock(&h->m);
                    break;
                }
            }
        }
        seen = g;
        rest = atomic_load(&avl_rest);   /* the call this product belongs to is not over */
        for (int64_t k; (k = avl_claim_piece(g)) >= 0;) {
            avl_run_piece(k);
            atomic_fetch_add(&avl_done, 1);
        }
    }
    return 0;
}

static void avl_fork_prepare(void) { pthread_mutex_lock(&avl_pool_lock); }
static void avl_fork_parent(void) { pthread_mutex_unlock(&avl_pool_lock); }
static void avl_fork_child(void)
{
    /* the helpers do not exist in the child: start afresh */
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    avl_pool_lock = fresh;
    avl_n_helpers = 0;
}

/* helper h allowed on every CPU the caller may use but the one it runs on now, when that
   changed since the last call (a system call then; else nothing) */
static void avl_keep_off(avl_helper* h, int cpu)
{
    if (cpu < 0 || cpu == h->off || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &avl_allowed))
        return;
    cpu_set_t others = avl_allowed;
    CPU_CLR(cpu, &others);
    if (CPU_COUNT(&others) > 0 && pthread_setaffinity_np(h->thread, sizeof others, &others) == 0)
        h->off = cpu;
}

/* helpers for n pieces (caller holds the pool lock); 0 when they cannot be started */
static int avl_ensure_helpers(int n)
{
    if (!avl_atfork_done) {
        if (pthread_atfork(avl_fork_prepare, avl_fork_parent, avl_fork_child) != 0)
            return 0;
        avl_atfork_done = 1;
    }

    while (avl_n_helpers < n - 1) {
        avl_helper* h = &avl_helpers[avl_n_helpers];
        pthread_t t;
        atomic_store(&h->go, 0);
        atomic_store(&h->sleeping, 0);
        atomic_store(&h->tid, 0);
        pthread_mutex_init(&h->m, 0);
        pthread_cond_init(&h->c, 0);
        if (pthread_create(&t, 0, avl_helper_loop, h) != 0)
            return 0;
        pthread_detach(t);
        h->thread = t;
        h->off = -1;
        if (CPU_COUNT(&avl_allowed) > 0)    /* not the one CPU of a caller pinned for its call */
            pthread_setaffinity_np(t, sizeof avl_allowed, &avl_allowed);
        avl_n_helpers++;
    }
    return 1;
}

/* `job` (all but its step) in pieces across the helpers, of a multiple of `align` each:
   1 when it ran, 0 when it is the caller's to run whole (one thread, too small, the
   helpers busy with another caller's or not startable) */
static int avl_run_in_pieces(avl_job_t job, int64_t align)
{
    const int n = avl_product_threads;
    int64_t step = (job.extent + n - 1) / n;
    step = (step + align - 1) / align * align;
    const int pieces = (int)((job.extent + step - 1) / step);
    if (pieces < 2 || pthread_mutex_trylock(&avl_pool_lock) != 0)
        return 0;
    if (!avl_ensure_helpers(pieces)) {
        pthread_mutex_unlock(&avl_pool_lock);
        return 0;
    }
    const uint64_t gen = ++avl_generation;
    job.step = step;
    avl_job = job;
    atomic_store(&avl_done, 0);
    atomic_store(&avl_pieces, pieces);
    atomic_store(&avl_claim, (gen & 0xffffffffu) << 32 | 1);   /* piece 0 is the caller's */
    const int cpu = sched_getcpu();
    for (int k = 0; k < pieces - 1; k++) {
        avl_helper* h = &avl_helpers[k];
        avl_keep_off(h, cpu);
        atomic_store(&h->go, gen);
        if (atomic_load(&h->sleeping)) {
            pthread_mutex_lock(&h->m);
            pthread_cond_signal(&h->c);
            pthread_mutex_unlock(&h->m);
        }
    }
    int mine = 1;
    avl_run_piece(0);
    for (int64_t k; (k = avl_claim_piece(gen)) >= 0; mine++)
        avl_run_piece(k);
    unsigned spins = 0;
    while (atomic_load(&avl_done) != pieces - mine)   /* pieces a helper claimed and runs */
        if (++spins > 4096) sched_yield(); else AVL_RELAX();
    pthread_mutex_unlock(&avl_pool_lock);
    return 1;
}

/* the product at q on pointers a, b, c: in pieces across the helpers when it is worth it,
   else whole; 1 when it ran */
static int avl_product_in_pieces(const int64_t* q, const char* a, const char* b, char* c)
{
    avl_job_t job = {q, a, b, c, 1, 0, 0, 0, 0};
    if (avl_product_threads < 2)
        return 0;
    if (q[0] == AVL_OP_GEMV) {
        if (q[4] * q[5] < AVL_MIN_GEMV_WORK)
            return 0;
        job.extent = q[5];
    } else {
        if (q[5] * q[6] * q[7] < AVL_MIN_GEMM_WORK)
            return 0;
        job.axis = q[5] >= q[6] ? 0 : 1;
        job.extent = job.axis == 0 ? q[5] : q[6];
    }
    return avl_run_in_pieces(job, AVL_PIECE_ALIGN);
}

/* an elementwise kernel's loop over [0, extent) through its range entry: in pieces of
   whole cache lines across the helpers when the caller set product threads, else whole */
static void avl_part_call(avl_part_fn part, void* const* args, int64_t extent)
{
    avl_job_t job = {0, 0, 0, 0, 0, part, args, 0, extent};
    if (avl_product_threads < 2 || !avl_run_in_pieces(job, AVL_PIECE_ALIGN))
        part(args, 0, extent);
}
""".replace("@MIN_GEMM_WORK@", str(MIN_SPLIT_GEMM_WORK)).replace("@MIN_GEMV_WORK@", str(MIN_SPLIT_GEMV_WORK))


def _driver_source(header: int) -> str:
    calls = []
    for n in range(1, MAX_ARGS + 1):
        types = ", ".join(["void*"] * n)
        args = ", ".join(f"a[{j}]" for j in range(n))
        calls.append(f"        case {n}: ((void (*)({types}))fn)({args}); break;")
    entries = []
    for n in range(MAX_DYN + 1):
        params = "".join(f", const void* o{j}" for j in range(n))
        objs = ", ".join(f"o{j}" for j in range(n)) if n else "0"
        entries.append(f"AVL_EXPORT int avl_segment_{n}(const int64_t* p{params})\n"
                       f"{{\n    const void* objs[{max(n, 1)}] = {{{objs}}};\n    return avl_run(p, objs);\n}}")
    return f"""/* avalon segment driver: runs a program of kernel calls (avalon.runtime.segments) */
#define _GNU_SOURCE         /* sched_getcpu, pthread_setaffinity_np */
#include <stdint.h>
#if defined(__GNUC__)
#define AVL_EXPORT __attribute__((visibility("default")))
#else
#define AVL_EXPORT
#endif
#define AVL_OP_GEMV {_OP_GEMV}
#define AVL_NO_TRANS {_NO_TRANS}
#define AVL_TRANS {_TRANS}
#define AVL_ROW_MAJOR {_ROW_MAJOR}
typedef struct {{
    char head[{header}];
    const void* type; char* data; int nd; const intptr_t* dims; const intptr_t* strides;
    const void* base; const void* descr; int flags;
}} avl_ndarray;
typedef void (*avl_sgemm)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
typedef void (*avl_dgemm)(int, int, int, int64_t, int64_t, int64_t, double, const double*, int64_t,
                          const double*, int64_t, double, double*, int64_t);
typedef void (*avl_sgemv)(int, int, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                          float, float*, int64_t);
typedef void (*avl_dgemv)(int, int, int64_t, int64_t, double, const double*, int64_t, const double*, int64_t,
                          double, double*, int64_t);

{_PRODUCT_THREADS_C}
static int avl_disjoint(const char* a, int64_t na, const char* b, int64_t nb)
{{
    return na == 0 || nb == 0 || (uintptr_t)a + (uintptr_t)na <= (uintptr_t)b
        || (uintptr_t)b + (uintptr_t)nb <= (uintptr_t)a;
}}

/* program: n_dyn, n_fixed, n_ops, ndarray type, n_written,
   n_dyn x (descr, size, flags, nbytes), n_fixed x address, n_written x register, ops */
static int avl_run(const int64_t* p, const void* const* objs)
{{
    const int64_t n_dyn = p[0], n_fixed = p[1], n_ops = p[2], n_written = p[4];
    const void* ndarray = (const void*)p[3];
    const int64_t* q = p + 5;
    char* r[n_dyn + n_fixed + 1];
    const int64_t* spec = q;
    for (int64_t k = 0; k < n_dyn; k++, q += 4) {{
        const avl_ndarray* a = (const avl_ndarray*)objs[k];
        if (a->type != ndarray || a->descr != (const void*)q[0] || (a->flags & q[2]) != q[2])
            return 2;
        int64_t n = 1;
        for (int d = 0; d < a->nd; d++)
            n *= a->dims[d];
        if (n != q[1])
            return 2;
        r[k] = a->data;
    }}
    for (int64_t k = 0; k < n_fixed; k++)
        r[n_dyn + k] = (char*)q[k];
    q += n_fixed;
    for (int64_t w = 0; w < n_written; w++) {{
        int64_t i = q[w];
        for (int64_t j = 0; j < n_dyn; j++)
            if (j != i && !avl_disjoint(r[i], spec[4 * i + 3], r[j], spec[4 * j + 3]))
                return 1;
    }}
    q += n_written;
    for (int64_t op = 0; op < n_ops; op++) {{
        if (q[0] == {_OP_CALL}) {{
            const void* fn = (const void*)q[1];
            /* the arguments first, then one call per arity: a call spelling out its
               address arithmetic 64 times over compiled 2x slower */
            void* a[{MAX_ARGS}];
            for (int64_t j = 0; j < q[2] && j < {MAX_ARGS}; j++)
                a[j] = (void*)(r[q[3 + 2 * j]] + q[4 + 2 * j]);
            switch (q[2]) {{
{chr(10).join(calls)}
            default: return 3;
            }}
            q += 3 + 2 * q[2];
        }} else if (q[0] == {_OP_PARTS}) {{
            /* fn (a NAME_part entry), n_args, extent, n_args x (register, offset) */
            void* a[{MAX_ARGS}];
            for (int64_t j = 0; j < q[2] && j < {MAX_ARGS}; j++)
                a[j] = (void*)(r[q[4 + 2 * j]] + q[5 + 2 * j]);
            avl_part_call((avl_part_fn)q[1], a, q[3]);
            q += 4 + 2 * q[2];
        }} else if (q[0] == {_OP_GEMV}) {{
            /* fn, dtype, order, M, N, lda, incx, incy, A, offA, X, offX, Y, offY (A transposed) */
            const char* a = r[q[9]] + q[10];
            const char* x = r[q[11]] + q[12];
            char* y = r[q[13]] + q[14];
            if (!avl_product_in_pieces(q, a, x, y))
                avl_product(q, a, x, y, 1, 0, q[5]);
            q += 15;
        }} else {{
            /* fn, dtype, transA, transB, M, N, K, lda, ldb, ldc, A, offA, B, offB, C, offC */
            const char* a = r[q[11]] + q[12];
            const char* b = r[q[13]] + q[14];
            char* c = r[q[15]] + q[16];
            if (!avl_product_in_pieces(q, a, b, c))
                avl_product(q, a, b, c, 0, 0, q[5]);
            q += 17;
        }}
    }}
    return 0;
}}

{chr(10).join(entries)}
"""


_lock = threading.Lock()
_driver_lib: list = []     # [CDLL] once built, [None] when it cannot be

#: longest a fork waits for a driver being loaded (backends.cpu loads it in a background thread)
FORK_WAIT_S = 30.0
_held_for_fork: list = []


def _before_fork():
    # a child forked while another thread loads the driver would find the lock held forever
    _held_for_fork.append(_lock.acquire(timeout=FORK_WAIT_S))


def _after_fork_in_parent():
    if _held_for_fork.pop():
        _lock.release()


def _after_fork_in_child():
    global _lock
    _held_for_fork.clear()
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)


def driver():
    """The driver's shared object (built once per machine, cached on disk), or
    None when it cannot be built or NumPy's array layout is not the one the
    driver reads (backends.cpu_native.OBJECT_CALLS)."""
    with _lock:
        if not _driver_lib:
            _driver_lib.append(_build_driver())
        return _driver_lib[0]


def driver_flags() -> tuple:
    """The kernels' flags at -O1: the driver is a dispatch loop with nothing to
    vectorize, and -O1 builds it in a quarter of -O3's time (part of a first
    compilation on each machine)."""
    return tuple("-O1" if f.startswith("-O") else f for f in native.default_flags()) + ("-pthread",)


def _build_driver():
    from ..backends import cpu_native
    if not cpu_native.OBJECT_CALLS or not native.available():
        return None
    header = object.__basicsize__ - ctypes.sizeof(ctypes.c_void_p)
    try:
        lib = native.build(_driver_source(header), flags=driver_flags(), name="segments")
    except (native.NativeBuildError, native.NativeUnavailable):
        return None
    lib.avl_place_helpers.argtypes = [ctypes.c_int]
    lib.avl_place_helpers(int(native.placing_threads()))
    return lib


def set_product_threads(n: int) -> bool:
    """Split the large products of the segments the calling thread runs next
    across n threads (1: whole); see the driver's helper threads.  False when
    there is no driver (nothing set)."""
    lib = driver()
    if lib is None:
        return False
    lib.avl_set_product_threads(int(n))
    return True


def blas_gemm() -> dict:
    """{dtype: address} of the cblas sgemm/dgemm compiled code calls (the BLAS
    AVALON_BLAS selects: runtime.blas), or {} (no products in segments)."""
    return _routines("gemm")


def blas_gemv() -> dict:
    """{dtype: address} of its cblas sgemv/dgemv, or {} (vector products stay NumPy calls)."""
    return _routines("gemv")


def _routines(name: str) -> dict:
    blas = generated_code_blas()
    return {dt: a for (routine, dt), a in blas.routines.items() if routine == name} if blas else {}


# -- layouts known at compile time ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where a value lives: `base` is ("fixed", address) or ("dyn", node) (an array
    passed per call, C-contiguous), plus a byte offset and strides in bytes."""
    base: tuple
    offset: int
    shape: tuple
    strides: tuple
    dtype: np.dtype

    @property
    def contiguous(self) -> bool:
        return self.strides == _c_strides(self.shape, self.dtype.itemsize)

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * self.dtype.itemsize


def _c_strides(shape, itemsize):
    strides, step = [], itemsize
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def contiguous_layout(base, node) -> Layout:
    return Layout(base, 0, tuple(node.shape), _c_strides(node.shape, node.dtype.itemsize), np.dtype(node.dtype))


def _reshape_view(node, src):
    if not src.contiguous:
        return None                        # NumPy copies: not a view
    return Layout(src.base, src.offset, tuple(node.shape), _c_strides(node.shape, src.dtype.itemsize), src.dtype)


def _transpose_view(node, src):
    perm = node.attrs.get("perm")
    if perm is None:
        perm = tuple(reversed(range(len(src.shape))))
    return Layout(src.base, src.offset, tuple(src.shape[p] for p in perm), tuple(src.strides[p] for p in perm),
                  src.dtype)


#: ops whose result is a view with a layout computed from its input's (None: not static)
VIEWS = {"reshape": _reshape_view, "transpose": _transpose_view}


#: ops the driver runs itself (the method of SegmentBuilder making the op), in place
#: of the primitive's reference kernel (NumPy's matmul: cblas ?gemm, as NumPy calls it)
DRIVER_OPS = {"matmul": "gemm_op"}


def _reference_kernel(fn, node) -> bool:
    """Whether the node's kernel is its primitive's NumPy implementation (no backend override)."""
    impl = PRIMITIVES[node.op].impl
    return isinstance(fn, functools.partial) and fn.func is impl and fn.args == (np,)


def _letter(dtype):
    return "s" if dtype == np.float32 else "d"


def _blasable(outer, inner, n_inner, size) -> bool:
    """NumPy's is_blasable2d: unit inner stride, an outer stride of whole items spanning the inner extent."""
    return inner == size and outer % size == 0 and outer // size >= n_inner


def _gemm_operand(lay):
    """(transpose flag, leading dimension) as NumPy's matmul picks them, or None."""
    m, n = lay.shape
    size = lay.dtype.itemsize
    sm, sn = lay.strides
    if sn == size and sm % size == 0 and sm // size >= n:
        return _NO_TRANS, sm // size
    if sm == size and sn % size == 0 and sn // size >= m:
        return _TRANS, sn // size
    return None


# -- building one compiled copy's segments --------------------------------------------------------------------

@dataclass
class Segment:
    """One run of C-able nodes: its program (built at first call) and a readable listing."""
    index: int
    nodes: list = field(default_factory=list)          # graph node indices
    dyn: list = field(default_factory=list)            # nodes whose arrays are passed per call
    fresh: list = field(default_factory=list)          # nodes allocated in Python before the call
    written: set = field(default_factory=set)          # dyn nodes written by the segment
    ops: list = field(default_factory=list)            # (kind, payload) in order
    listing: list = field(default_factory=list)

    @property
    def source(self) -> str:
        return "\n".join(self.listing)


class Program:
    """Turns a segment into the driver's int64 table (addresses of this process
    and compiled copy: never in any C source)."""

    def __init__(self, segment: Segment):
        self.segment = segment

    def table(self, kernel_address, part_address=lambda fn: None):
        seg = self.segment
        fixed, regs = [], {}
        for k, node in enumerate(seg.dyn):
            regs[("dyn", node)] = k

        def reg(base):
            if base not in regs:
                regs[base] = len(seg.dyn) + len(fixed)
                fixed.append(base[1])
            return regs[base]

        body = []
        for kind, payload in seg.ops:
            if kind == "call":
                fn, operands = payload
                part = part_address(fn)
                if part is not None:
                    body += [_OP_PARTS, part, len(operands), elementwise_extent(fn.kernel)]
                else:
                    body += [_OP_CALL, kernel_address(fn), len(operands)]
                for lay in operands:
                    body += [reg(lay.base), lay.offset]
            elif kind == "gemv":
                address, dt, order, m, n, lda, incx, incy, a, x, y = payload
                body += [_OP_GEMV, address, 0 if dt == np.float32 else 1, order, m, n, lda, incx, incy]
                for lay in (a, x, y):
                    body += [reg(lay.base), lay.offset]
            else:
                address, dt, ta, tb, m, n, kk, lda, ldb, ldc, a, b, c = payload
                body += [_OP_GEMM, address, 0 if dt == np.float32 else 1, ta, tb, m, n, kk, lda, ldb, ldc]
                for lay in (a, b, c):
                    body += [reg(lay.base), lay.offset]
        head = [len(seg.dyn), len(fixed), len(seg.ops), id(np.ndarray), len(seg.written)]
        specs = []
        for node in seg.dyn:
            flags = _C_CONTIGUOUS | _ALIGNED | (_WRITEABLE if node in seg.written else 0)
            specs += [id(np.dtype(node.dtype)), int(math.prod(node.shape)), flags, node.nbytes]
        written = [regs[("dyn", n)] for n in seg.dyn if n in seg.written and n not in seg.fresh]
        head[4] = len(written)
        return np.array(head + specs + fixed + written + body, dtype=np.int64)


class Unavailable(Exception):
    """A kernel of a segment did not build: the segment always runs node by node."""


def _kernel_address(fn):
    """The address of the C function a cpu_native wrapper calls (its `_k`): one
    pointer argument per buffer of its kernel, the only calls the driver makes."""
    cfn = getattr(fn, "__globals__", {}).get("_k")
    if not isinstance(cfn, ctypes._CFuncPtr) or tuple(cfn.argtypes or ()) != (ctypes.c_void_p,) * len(fn.kernel.params):
        raise Unavailable(fn)
    return ctypes.cast(cfn, ctypes.c_void_p).value


def _part_address(fn):
    """The address of the kernel's NAME_part entry (an elementwise loop the driver may
    run in pieces: kernel_ir.render_c.render_part), or None when it has none."""
    part = getattr(fn, "__globals__", {}).get("_kp")
    if not isinstance(part, ctypes._CFuncPtr):
        return None
    return ctypes.cast(part, ctypes.c_void_p).value


def _node_by_node(*args):
    return 1


#: a segment whose driver refused this many calls (arrays passed per call not laid out
#: as compiled: a strided share, another dtype) runs node by node from then on
REFUSALS = 8


class Refusals:
    """Counts each segment's refused calls (called on the node-by-node path only,
    so the fast path pays nothing) and retires a segment refused REFUSALS times."""

    def __init__(self, env):
        self.env, self.counts = env, {}

    def __call__(self, index):
        n = self.counts[index] = self.counts.get(index, 0) + 1
        if n >= REFUSALS:
            self.env[f"_seg{index}"] = _node_by_node


class FirstCall:
    """Stands for a segment's driver call in the generated module until its first
    call: then builds every pending kernel, fills the program with their
    addresses and rebinds the module's names to the ctypes function and table."""

    def __init__(self, env, segment, fn_name, table_name):
        self.env, self.segment, self.fn_name, self.table_name = env, segment, fn_name, table_name

    def __call__(self, _table, *objects):
        from ..backends import cpu_native
        cpu_native.build_pending()
        lib = driver()
        try:
            if lib is None:
                raise Unavailable("driver")
            table = Program(self.segment).table(_kernel_address, _part_address)
        except Unavailable:
            self.env[self.fn_name] = _node_by_node
            return 1
        fn = lib[f"avl_segment_{len(self.segment.dyn)}"]
        fn.argtypes = (ctypes.c_void_p,) * (1 + len(self.segment.dyn))
        fn.restype = ctypes.c_int
        self.segment.table = table            # keeps the program alive with the compiled copy
        self.env[self.table_name] = table.ctypes.data
        self.env[self.fn_name] = fn
        return fn(table.ctypes.data, *objects)


class SegmentBuilder:
    """Groups a compiled graph's steps (codegen.Step) into segments and writes
    the generated code: per segment, fresh results allocated, one driver call,
    and the nodes one by one when the driver refuses the call's arrays."""

    def __init__(self, graph, plan, backend, env, names):
        self.graph, self.plan, self.backend, self.env, self.names = graph, plan, backend, env, names
        self.gemm = blas_gemm() if backend.xp is np else {}
        self.gemv = blas_gemv() if self.gemm else {}
        self.loc: dict = {}               # node -> Layout known at compile time
        self.segments: list = []
        self.listing_line = None          # the readable line of the op c_ops just made
        for n in graph.inputs:
            self.loc[n] = contiguous_layout(("dyn", n), n)

    # -- which nodes a segment can run -------------------------------------------------------------------------

    def note_const(self, node, array):
        if (type(array) is np.ndarray and array.flags.c_contiguous and array.flags.aligned
                and array.dtype == node.dtype and array.shape == tuple(node.shape)):
            self.loc[node] = contiguous_layout(("fixed", array.ctypes.data), node)

    def result_layout(self, step):
        """The layout of a step's result when known at compile time (a buffer of
        the plan, an assigned array), before deciding anything else."""
        n = step.node
        if step.out in ("slot", "assembled"):
            return contiguous_layout(("fixed", self.env[step.target].ctypes.data), n)
        if step.out == "write_into":
            lay = self.loc.get(step.target)
            return lay if lay is not None and lay.contiguous else None
        return None

    def c_ops(self, step):
        """(ops, result layout, fresh) when the step can run in a segment, else None."""
        n = step.node
        if step.out == "elided":
            lay = self.loc.get(n.inputs[0])
            return ([], lay, False) if lay is not None else None
        if step.out == "assembled":          # its inputs were written in place: nothing to run
            return [], self.result_layout(step), False
        view = VIEWS.get(n.op)
        if view is not None:
            src = self.loc.get(n.inputs[0])
            lay = view(n, src) if src is not None else None
            return ([], lay, False) if lay is not None else None
        fresh = step.out == "fresh"
        out = contiguous_layout(("dyn", n), n) if fresh else self.result_layout(step)
        if PRIMITIVES[n.op].writes_input:
            out = self.loc.get(n.inputs[0])
            fresh = False
        if out is None or not out.contiguous:
            return None
        driver_op = DRIVER_OPS.get(n.op)
        if driver_op is not None:
            op = getattr(self, driver_op)(step, out) if _reference_kernel(self.env[step.kname], n) else None
        else:
            op = self.call_op(step, out)
        return ([op], out, fresh) if op is not None else None

    def call_op(self, step, out):
        n, fn = step.node, self.env[step.kname]
        kernel = getattr(fn, "kernel", None)
        if not getattr(fn, "native", False) or kernel is None or len(kernel.params) > MAX_ARGS:
            return None
        if PRIMITIVES[n.op].writes_input:
            nd = len(kernel.outputs)
            operands = list(n.inputs[nd:]) + list(n.inputs[:nd])
            in_place, n_in = True, len(operands) - nd
        else:
            operands = list(n.inputs) + [None]
            # an output may be exactly an input where the kernel's own entry point allows it:
            # elementwise groups (cpu_native builds their entries with in_place=True)
            in_place = getattr(fn, "in_place", n.op == "fused")
            n_in = len(n.inputs)
        if len(operands) != len(kernel.params):
            return None
        lays = [self.loc.get(i) if i is not None else out for i in operands]
        for lay, b in zip(lays, kernel.params):
            if lay is None or not lay.contiguous or lay.dtype != b.dtype or lay.nbytes != b.size * b.dtype.itemsize:
                return None
        if not _no_partial_overlap(lays[:n_in], lays[n_in:], in_place):
            return None
        self.listing_line = f"{kernel.name}({', '.join(_show(lay, self.names) for lay in lays)})"
        return ("call", (fn, lays))

    def gemm_op(self, step, out):
        n = step.node
        a, b = (self.loc.get(i) for i in n.inputs)
        if (a is None or b is None or len(a.shape) != 2 or len(b.shape) != 2
                or not (a.dtype == b.dtype == out.dtype)):
            return None
        m, kk = a.shape
        p = b.shape[1]
        if kk <= 1 or m == 0 or p == 0 or (m == 1 and p == 1):
            return None   # NumPy's matmul: its own loop, or dot
        if m == 1 or p == 1:
            return self.gemv_op(a, b, out)
        address = self.gemm.get(np.dtype(n.dtype))
        if address is None:
            return None
        if a.base == b.base and a.offset == b.offset:
            return None   # A @ A.T: NumPy's matmul calls syrk
        fa, fb = _gemm_operand(a), _gemm_operand(b)
        if fa is None or fb is None or not _no_partial_overlap([a, b], [out], False):
            return None
        self.listing_line = (f"cblas_{_letter(out.dtype)}gemm(RowMajor, "
                             f"{'T' if fa[0] == _TRANS else 'N'}, {'T' if fb[0] == _TRANS else 'N'}, {m}, {p}, {kk}, "
                             f"{_show(a, self.names)}, {fa[1]}, {_show(b, self.names)}, {fb[1]}, {_show(out, self.names)}, {p})")
        return ("gemm", (address, out.dtype, fa[0], fb[0], m, p, kk, fa[1], fb[1], p, a, b, out))

    def gemv_op(self, a, b, out):
        """A row times a matrix (m == 1) or a matrix times a column (p == 1) as
        NumPy's matmul computes it: cblas ?gemv of the matrix, transposed, in the
        order its strides allow (column-major first), the vector's stride as incx."""
        address = self.gemv.get(out.dtype)
        if address is None:
            return None
        size = out.dtype.itemsize
        if a.shape[0] == 1:     # x @ B: y = B^T x, B (K, P) read by its strides along P, then K
            matrix, (s_out, s_in), (n_out, n_in) = b, b.strides[::-1], b.shape[::-1]
            vector, s_vec, s_y = a, a.strides[1], out.strides[1]
        else:                   # A @ x: y = A x, A (M, K)
            matrix, (s_out, s_in), (n_out, n_in) = a, a.strides, a.shape
            vector, s_vec, s_y = b, b.strides[0], out.strides[0]
        if _blasable(s_out, s_in, n_in, size):
            order, lda = _COL_MAJOR, s_out // size
        elif _blasable(s_in, s_out, n_out, size):
            order, lda = _ROW_MAJOR, s_in // size
        else:
            return None
        if s_vec % size or s_vec < size or s_y % size or s_y < size:
            return None
        if not _no_partial_overlap([a, b], [out], False):
            return None
        incx, incy = s_vec // size, s_y // size
        self.listing_line = (f"cblas_{_letter(out.dtype)}gemv({'ColMajor' if order == _COL_MAJOR else 'RowMajor'}, "
                             f"T, {n_in}, {n_out}, {_show(matrix, self.names)}, {lda}, {_show(vector, self.names)}, "
                             f"{incx}, {_show(out, self.names)}, {incy})")
        return ("gemv", (address, out.dtype, order, n_in, n_out, lda, incx, incy, matrix, vector, out))

    # -- grouping ------------------------------------------------------------------------------------------------

    def group(self, steps):
        """[step or Segment-with-steps] in order: runs of C-able steps become segments."""
        items, current = [], None

        def close():
            nonlocal current
            if current is not None:
                seg, seg_steps = current
                if len(seg.ops) >= 2:
                    items.append((seg, seg_steps))
                else:
                    for s in seg_steps:
                        items.append(s)
                current = None

        for step in steps:
            self.listing_line = None
            done = self.c_ops(step)
            if done is not None and current is not None and self._too_many(current[0], done):
                close()
            if done is not None and self._too_many(Segment(-1), done):
                done = None      # more arrays per call than the driver's entry points take
            if done is None:
                close()
                self.note_python(step)
                items.append(step)
                continue
            ops, lay, fresh = done
            if current is None:
                current = (Segment(len(self.segments) + len(items)), [])
            seg, seg_steps = current
            self.add(seg, step, ops, lay, fresh)
            seg_steps.append(step)
        close()
        for item in items:
            if isinstance(item, tuple):
                item[0].index = len(self.segments)
                self.segments.append(item[0])
        return items

    def _too_many(self, seg, done):
        ops, lay, fresh = done
        new = {lay.base[1]} if fresh else set()
        for _, payload in ops:
            for o in _operand_layouts(payload):
                if o.base[0] == "dyn":
                    new.add(o.base[1])
        return len(set(seg.dyn) | new) > MAX_DYN

    def add(self, seg, step, ops, lay, fresh):
        n = step.node
        self.loc[n] = lay
        seg.nodes.append(step.k)
        if fresh:
            seg.fresh.append(n)
            seg.dyn.append(n)
        for kind, payload in ops:
            layouts = _operand_layouts(payload)
            for o in layouts:
                if o.base[0] == "dyn" and o.base[1] not in seg.dyn:
                    seg.dyn.append(o.base[1])
            for o in _written(kind, payload, n):
                if o.base[0] == "dyn":
                    seg.written.add(o.base[1])
            seg.ops.append((kind, payload))
        if ops:
            what = self.listing_line
        elif step.out == "assembled":
            what = f"{n.op}: its inputs written in place, {_show(lay, self.names)}"
        else:
            what = f"{n.op}: a view, {_show(lay, self.names)}"
        seg.listing.append(f"/* v{step.k} */ {what};")

    def note_python(self, step):
        """A step run by Python: its result's layout, where it is static or checked per call."""
        n = step.node
        if step.out == "elided":
            if n.inputs[0] in self.loc:
                self.loc[n] = self.loc[n.inputs[0]]
            return
        lay = self.result_layout(step)
        prim = PRIMITIVES[n.op]
        if lay is None and step.out == "fresh" and n.ndim > 0 and not prim.view and not prim.writes_input:
            lay = contiguous_layout(("dyn", n), n)    # checked by the driver at each call
        if lay is not None:
            self.loc[n] = lay


def _operand_layouts(payload):
    if len(payload) == 2:
        return payload[1]
    return payload[-3:]          # a product's operands and result


def _written(kind, payload, node):
    if kind in ("gemm", "gemv"):
        return [payload[-1]]
    fn, lays = payload
    n_out = len(fn.kernel.outputs)
    return lays[len(lays) - n_out:]


def _no_partial_overlap(ins, outs, in_place):
    """Whether every output is disjoint from every input (or exactly one, where
    the kernel may run in place) and from the other outputs; arrays on different
    bases are distinct allocations (per-call ones are checked by the driver)."""
    for k, o in enumerate(outs):
        for j, i in enumerate(list(ins) + list(outs[:k])):
            if i.base != o.base or i.offset + i.nbytes <= o.offset or o.offset + o.nbytes <= i.offset:
                continue
            if in_place and j < len(ins) and (i.offset, i.nbytes, i.strides) == (o.offset, o.nbytes, o.strides):
                continue
            return False
    return True


def _show(lay, names):
    where = names.get(lay.base[1], "?") if lay.base[0] == "dyn" else f"@{lay.base[1]:#x}"
    off = f"+{lay.offset}" if lay.offset else ""
    return f"{where}{off}{list(lay.shape)}"


def emit(builder, items, last_use, outputs, env) -> list:
    """The generated lines of `items` (steps and (Segment, steps) from `group`)."""
    lines = []
    for item in items:
        if isinstance(item, tuple):
            lines += _segment_lines(builder, *item, last_use, outputs, env)
        else:
            lines += item.all_lines()
    return lines


def _segment_lines(builder, seg, steps, last_use, outputs, env):
    names, i = builder.names, seg.index
    fn_name, table_name = f"_seg{i}", f"_P{i}"
    env[fn_name] = FirstCall(env, seg, fn_name, table_name)
    env[table_name] = 0
    env.setdefault("_id", id)
    env.setdefault("_empty", np.empty)
    env.setdefault("_refused", Refusals(env))
    lines = [f"# segment {i}: nodes {seg.nodes[0]}..{seg.nodes[-1]} in one C call (compiled.segments[{i}].source)"]
    for n in seg.fresh:
        lines.append(_fresh_line(env, names[n], n))
    args = "".join(f", _id({names[n]})" for n in seg.dyn)
    lines.append(f"if {fn_name}({table_name}{args}):")
    lines.append(f"    _refused({i})")
    for step in steps:
        lines += ["    " + line for line in step.all_lines()]
    fast = _fast_lines(builder, seg, steps, last_use, outputs)
    lines.append("else:")
    lines += ["    " + line for line in fast] or ["    pass"]
    return lines


def _fresh_line(env, var, node):
    """The line allocating a result the segment writes and the call returns: from
    the node's RecycledArrays when it is large enough to be worth it."""
    if recycles(node.shape, node.dtype):
        name = f"_fresh_{var}"
        env[name] = RecycledArrays(node.shape, node.dtype)
        return f"{var} = {name}()"
    dt = f"_dt_{np.dtype(node.dtype).name}"
    env[dt] = np.dtype(node.dtype)
    return f"{var} = _empty({tuple(node.shape)!r}, {dt})"


def _fast_lines(builder, seg, steps, last_use, outputs):
    """What the generated code does after the driver ran the segment: bind the
    names later code reads, drop those the nodes' code would have dropped."""
    names = builder.names
    end = seg.nodes[-1]
    inside = {s.node: s for s in steps}
    needed = set()
    for step in reversed(steps):
        n = step.node
        if n in outputs or last_use.get(n, -1) > end or n in needed:
            needed.add(n)
            if step.out == "elided" or VIEWS.get(n.op) is not None:
                src = n.inputs[0]
                if src in inside:
                    needed.add(src)
    lines = []
    for step in steps:
        n = step.node
        if n not in needed or step.out == "elided" or n in seg.fresh:
            continue
        if VIEWS.get(n.op) is not None:
            lines.append(step.lines[0])
        elif step.out in ("slot", "assembled"):
            lines.append(f"{step.var} = {step.target}")
        elif step.out == "write_into":
            lines.append(f"{step.var} = {names[step.target]}")
        else:   # an op writing its first input
            lines.append(f"{step.var} = {names[n.inputs[0]]}")
    bound_here = {names[s.node] for s in steps if s.node in needed or s.node in seg.fresh}
    made_here = {names[s.node] for s in steps}
    dead = sorted({d for s in steps for d in s.dead if d not in made_here or d in bound_here})
    if dead:
        lines.append(f"del {', '.join(dead)}")
    return lines
