"""Fused elementwise groups as compiled C on the CPU.

`compile_fused_c(body, backend)` lowers a fused body to the kernel IR
(avalon.kernel_ir), renders it as C and returns a Python callable with the
semantics of `cpu_fused.compile_fused_numpy`'s: ``fused(*inputs, out=None)``
allocates `out` when it is None and returns it; inputs may be NumPy scalars or
0-d arrays.

Building is lazy and batched: a compiled kernel joins the pending batch, and
the first call of any pending group builds every pending kernel into ONE
shared object with the system compiler (avalon.runtime.native: cached on disk,
so a batch is compiled once per machine).  A graph's groups are all compiled
before any runs, so a graph costs one compiler run, not one per group (gcc
takes ~45 ms to start, ~15 ms per kernel at -O3).  A kernel already built in
this process is reused at once; a new batch whose kernels are all in objects
that earlier batches built (the index `objects/` of the disk cache) loads
those objects instead of compiling.  `compile_fused_many(bodies, backend)` builds
right away.  A failed build warns (RuntimeWarning) and the groups run their
NumPy version.

Calling costs little: next to each kernel the module has an entry point that
takes the array *objects* (their addresses, `id(a)`, as c_void_p) and does in
C what costs a microsecond in Python: it checks each array's type, dtype, size
and flags (C-contiguous and aligned; `out` writeable too), reads its data
pointer (NumPy's PyArrayObject fields, whose layout this module verifies on
sample arrays at import; where it differs, `OBJECT_CALLS` is False and the
checks and pointers are done in Python with ``a.ctypes.data``), refuses an
`out` that overlaps an input other than exactly (an in-place update, safe for
elementwise code) and runs the kernel.  Measured, a 4-op float32 chain of 1000
elements: 0.57 us a call (the bare ctypes call: 0.39 us), against 1.4 us with
``a.ctypes.data`` pointers and checks in Python, and 2.0 us for the NumPy ufuncs.

Whatever the entry point refuses takes the slow path, in Python:

* a NumPy scalar (a reduction's result) becomes a 0-d array;
* a non-contiguous or misaligned array (a transposed or broadcast view, a
  thread's share of a batch-innermost array) runs the group's NumPy version,
  whose strided loops beat a copy there (`COPY_MIN` can make large groups
  copy instead);
* an input of another dtype or size than compiled for, or another array type,
  runs the NumPy version of the group (compiled on first need, one per thread);
* an `out` that is not contiguous, not writeable (NumPy then raises), or that
  overlaps an input other than exactly, gets the result through a temporary.

Math functions: float32 calls expf, tanhf, ..., float64 exp, tanh, ...; with
`VECTOR_MATH` (the default) they are declared SIMD (native.simd_math_declarations)
so gcc vectorizes loops calling them into glibc's libmvec.  Measured against
NumPy's own SIMD functions: tanh, log1p, expm1 equal, exp within 4 ulp, log 6
(scalar libm: 2-3 ulp, but 15x slower than NumPy on tanh).

The callable holds no mutable state of its own: concurrent calls are safe
(ctypes releases the GIL while the kernel runs).  AVALON_NATIVE=0 in the
environment keeps every group on NumPy (read when a graph is compiled).
"""
from __future__ import annotations

import ctypes
import functools
import os
import pickle
import threading
import warnings
import weakref

import numpy as np

from ..kernel_ir import CRenderer, Unfusable, lower
from ..kernel_ir.render_c import PART_SUFFIX, has_part
from ..kernel_ir.keys import body_key, node_key
from ..kernel_ir.ir import DTYPES
from ..runtime import native
from ..runtime.code_cache import code_of
from ..runtime.disk_memo import DiskMemo
from ..runtime.native import NativeBuildError, NativeUnavailable
from .cpu_fused import compile_fused_numpy
from ..passes.fusion import body_reduces

__all__ = ["enabled", "flags", "compile_fused_c", "compile_fused_many", "build_pending", "Unfusable",
           "NativeUnavailable", "NativeBuildError"]

#: exactness flags added to native.default_flags(): no FMA contraction (NumPy rounds a*b, then a*b+c)
EXTRA_FLAGS = ("-ffp-contract=off",)


def enabled() -> bool:
    """False when AVALON_NATIVE=0 (or "false", "off", "no") asks for NumPy kernels only."""
    return native.env_switch("AVALON_NATIVE")


def flags() -> tuple:
    """The compiler flags of fused kernels: native.default_flags() and EXTRA_FLAGS."""
    return tuple(native.default_flags()) + EXTRA_FLAGS


#: a non-contiguous input is copied (then the kernel runs) when the output has at least
#: this many elements; below, the group's NumPy version runs.  On its own a copy pays
#: from ~4k elements (4-op float32 chain, transposed input: 64k elements, copy 96 us
#: against NumPy's 128 us), but in a step split across the engine's threads every
#: batch-innermost input is a strided share, and copying them made a CNN step 30%
#: slower (17.9 ms against 13.7 ms): None, never copy, until kernels take strides.
COPY_MIN = None

#: vector math functions (glibc's libmvec) in loops; False: scalar libm calls only.  Set before compiling.
VECTOR_MATH = True


@functools.lru_cache(maxsize=None)
def _vector_math(on: bool) -> str:
    return native.simd_math_declarations() if on else ""


def _renderer():
    return CRenderer(vector_math=_vector_math(VECTOR_MATH))


def _c_text(kernel) -> str:
    """The kernel's C source, rendered once per kernel and renderer setting and
    kept on the kernel: a kernel lowered now is rendered before it is stored
    (`_with_text`), so one read of the disk memo of lowerings gives both."""
    texts = kernel.__dict__.setdefault("_c_texts", {})
    text = texts.get(VECTOR_MATH)
    if text is None:
        text = texts[VECTOR_MATH] = _renderer().render_kernel(kernel)
    return text


def _with_text(kernel):
    if kernel is not None:
        _c_text(kernel)
    return kernel


def compile_fused_c(body, backend):
    """The fused group as one C kernel, built lazily: the kernel joins the
    pending batch, and the first call of any pending group builds the whole
    batch as ONE shared object (see `build_pending`).  Raises Unfusable (no
    exact kernel) or NativeUnavailable (no compiler)."""
    return _compile(body, backend)


def compile_fused_many(bodies, backend):
    """Callables for several fused groups, built now, into one shared object
    (with any other pending group).  Raises Unfusable when a group has no exact
    kernel, NativeUnavailable without a compiler, NativeBuildError when the
    build fails."""
    fns = [_compile(b, backend) for b in bodies]
    build_pending(raise_errors=True)
    return fns


def _code(src, filename):
    """The code object of a wrapper's source, compiled once (runtime.code_cache: in
    memory, each schedule of a step and each thread's copy wrap the same kernels;
    on disk, for the next process)."""
    return code_of(src, filename)


_BODY_KERNELS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # body Graph -> its Kernel


def _lowered_body(body):
    """lower(body), once per body graph (the threads' copies of a step share theirs),
    and from the disk for a body lowered in an earlier process."""
    kernel = _BODY_KERNELS.get(body)
    if kernel is None:
        kernel = _BODY_KERNELS[body] = _remembered(body_key(body, "c"),
                                                   lambda: _with_text(lower(body, exprs=CRenderer.EXPR)))
    return kernel


#: lowered kernels of earlier processes: lowering and verifying a step's kernels costs
#: ~10 ms of its first call when its shared objects are already built
_LOWERINGS = DiskMemo("lowered", ".kernel", functools.partial(pickle.dumps, protocol=pickle.HIGHEST_PROTOCOL),
                      pickle.loads)


def _remembered(key, lower_now):
    """lower_now(), or what it returned before for the same key (None: no key), in this
    process or an earlier one."""
    if key is None:
        return lower_now()
    if key in _REMEMBERED:
        return _REMEMBERED[key]
    found, kernel = _LOWERINGS.get(key)
    if not found:
        kernel = lower_now()
        _LOWERINGS.put(key, kernel)
    if len(_REMEMBERED) >= _LOWERED_MAX:
        _REMEMBERED.clear()
    _REMEMBERED[key] = kernel
    return kernel


_REMEMBERED: dict = {}    # key -> kernel, for this process


def _compile(body, backend):
    kernel = _lowered_body(body)
    if not native.available():
        raise NativeUnavailable("no usable C compiler (avalon.runtime.native.available() is False)")
    key = (kernel.name, OBJECT_CALLS)
    with _lock:
        built = _built.get(key)
        if built is None:
            entry = _pending.get(key)
            if entry is None:
                # a reduction's kernel reads inputs after it wrote its output (a column's
                # accumulators): an output that IS an input takes the slow path
                entry = _pending[key] = _Pending(kernel, _c_text(kernel), OBJECT_CALLS,
                                                 in_place=not body_reduces(body))
            source = entry.source
        else:
            source = built.source
        fn = _wrapper(body, kernel, built, backend)
        if built is None:
            entry.envs.append(fn.__globals__)
    fn.kernel = kernel
    fn.source = source
    fn.native = True
    fn.in_place = not body_reduces(body)   # whether `out` may be exactly an input (callers without
    return fn                              # the entry point's checks, runtime.segments, read it)


# -- single ops lowered by their primitive's `lower` rule (avalon.kernel_ir.glue) -------------------------------

def compile_node_c(node, fallback):
    """The node's op as one C kernel (its primitive's `lower` rule), built lazily
    like fused groups: a callable f(*inputs, out=None) that runs the kernel on
    contiguous arrays of the compiled shapes and dtypes and `fallback` (the
    NumPy kernel, same signature) on anything else.  None when the op has no
    kernel for this node (no rule, the rule declines, or no compiler)."""
    from ..primitive import PRIMITIVES
    rule = PRIMITIVES[node.op].rule("lower", None)
    if rule is None or not OBJECT_CALLS or not native.available():
        return None
    kernel = _lowered(node, rule)
    if kernel is None:
        return None
    # an op writing its inputs in place (fused_update) reads each element before
    # writing it, at the same index: an output may be exactly an input
    in_place = PRIMITIVES[node.op].writes_input
    key = (kernel.name, "node")
    with _lock:
        built = _built.get(key)
        if built is None:
            entry = _pending.get(key)
            if entry is None:
                entry = _pending[key] = _Pending(kernel, _c_text(kernel), True, in_place=in_place)
            source = entry.source
        else:
            source = built.source
        env = {"_empty": np.empty, "_id": id, "_slow": fallback,
               "_SHAPE": tuple(node.shape), "_DT": np.dtype(node.dtype)}
        env["_entry"] = built.entry if built is not None else _Stub(env, "_entry")
        env["_k"] = built.cfn if built is not None else _Stub(env, "_k")
        env["_kp"] = built.part if built is not None else None
        if built is None:
            entry.envs.append(env)
    src = _updating_op_source(kernel) if in_place else _node_op_source(kernel)
    exec(_code(src, f"<avalon C {kernel.name}>"), env)
    fn = env["op"]
    if kernel.template is not None:
        env["_slow"] = _contiguous_first(fn, fallback)
    fn.kernel, fn.source, fn.native = kernel, source, True
    return fn


def _contiguous_first(op, fallback):
    """The slow path of a template kernel (a direct convolution): strided
    inputs (a transposed graph input, a thread's share of a batch) are copied to
    C order and the kernel runs on the copies, several times faster than the
    NumPy kernel on the strided arrays; anything else the kernel refuses runs
    `fallback`."""
    def slow(*args, out=None):
        if any(isinstance(a, np.ndarray) and not a.flags.c_contiguous for a in args):
            return op(*[np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a for a in args], out=out)
        return fallback(*args, out=out)
    return slow


_LOWERED: dict = {}     # a node's signature -> its lowered Kernel (or None)
_LOWERED_MAX = 4096


def _lowered(node, rule):
    """rule(node), remembered by the node's signature (op, attributes, operand and
    result types): each schedule of a step (one thread, each thread's share, ...)
    compiles the same ops, and lowering and verifying a glue kernel costs ms; on
    disk (kernel_ir.keys) for the next process."""
    if all(_plain(v) for v in node.attrs.values()):
        key = (node.op, tuple(sorted(node.attrs.items())), tuple((i.shape, i.dtype.str) for i in node.inputs),
               node.shape, node.dtype.str)
    else:   # a graph (a fused update's body): its text is the key
        key = node_key(node)
        if key is None:     # an array: no faithful key
            return rule(node)
    if key not in _LOWERED:
        if len(_LOWERED) >= _LOWERED_MAX:
            _LOWERED.clear()
        _LOWERED[key] = _remembered(key if isinstance(key, str) else node_key(node), lambda: _with_text(rule(node)))
    return _LOWERED[key]


def _plain(v) -> bool:
    """Whether an attribute value is a plain value (equal values, equal kernels)."""
    if isinstance(v, (tuple, list)):
        return all(_plain(x) for x in v)
    return v is None or isinstance(v, (bool, int, float, str, np.dtype))


def _node_op_source(kernel):
    """op(a0, ..., out=None): the kernel's output in `out` (allocated when None)."""
    args = [f"a{k}" for k in range(len(kernel.inputs))]
    return "\n".join([f"def op({', '.join(args + ['out=None'])}):",
                      "    if out is None:",
                      "        out = _empty(_SHAPE, _DT)",
                      f"    if _entry({', '.join(f'_id({a})' for a in args + ['out'])}):",
                      f"        return _slow({', '.join(args)}, out=out)",
                      "    return out"]) + "\n"


def _updating_op_source(kernel):
    """op(d0, ..., a0, ...): the kernel's outputs written into the destinations d
    (the op's first inputs), from the values a; returns d0."""
    dests = [f"d{j}" for j in range(len(kernel.outputs))]
    args = [f"a{k}" for k in range(len(kernel.inputs))]
    return "\n".join([f"def op({', '.join(dests + args)}):",
                      f"    if _entry({', '.join(f'_id({a})' for a in args + dests)}):",
                      f"        return _slow({', '.join(dests + args)})",
                      "    return d0"]) + "\n"


# -- building: one shared object for every group compiled since the last build -------------------------------------

class _Pending:
    def __init__(self, kernel, source, object_calls, in_place=True):
        self.kernel, self.source, self.object_calls = kernel, source, object_calls
        self.in_place = in_place
        self.envs = []       # globals of the wrappers waiting for this kernel


class _Built:
    def __init__(self, source, cfn, entry, part):
        self.source, self.cfn, self.entry = source, cfn, entry
        self.part = part     # NAME_part (render_c.has_part), or None


_lock = threading.RLock()
_pending: dict = {}      # (kernel name, object calls) -> _Pending
_built: dict = {}        # (kernel name, object calls) -> _Built: bound functions, for this process


def build_pending(raise_errors=False) -> int:
    """Build every pending kernel into one shared object and bind the waiting
    groups to it; returns how many kernels were built.  When the build fails the
    groups run their NumPy version (a RuntimeWarning says why), or, with
    raise_errors, the NativeBuildError propagates."""
    with _lock:
        if not _pending:
            return 0
        batch = list(_pending.items())
        _pending.clear()
        try:
            fns = _build([entry for _, entry in batch])
        except (NativeBuildError, NativeUnavailable) as e:
            for _, entry in batch:
                for env in entry.envs:
                    env["_k"] = env["_entry"] = _refuse
            if raise_errors:
                raise
            warnings.warn(f"avalon: fused kernels did not build, so their groups run on NumPy: {e}",
                          RuntimeWarning, stacklevel=3)
            return 0
        for (key, entry), (cfn, ent, part) in zip(batch, fns):
            _built[key] = _Built(entry.source, cfn, ent, part)
            for env in entry.envs:
                _bind(env, cfn, ent, part)
        return len(batch)


#: a batch of at least this many kernels is built as several shared objects, one
#: compiler process per core at once (a CNN step's 23 kernels: 1.28 s in one)
PARALLEL_BUILD_MIN = 8


def _build(entries):
    """(kernel function, entry point) of each entry, from one shared object, or
    from one per core when the batch is large (compilers run at once)."""
    parts = min(os.cpu_count() or 1, len(entries) // (PARALLEL_BUILD_MIN // 2) or 1)
    if parts < 2:
        return _build_alone(entries)
    # template kernels (direct convolutions) share one chunk of their own: each object compiles
    # their helpers once (0.35 s at -O3), and a CNN step's templates then take as long as all
    # its other kernels (0.7 s and 0.63 s; with a quarter of the others as well, 1.06 s)
    templates = [e for e in entries if e.kernel.template is not None]
    others = [e for e in entries if e.kernel.template is None]
    chunks = [templates] if templates else []
    k = parts - len(chunks)
    chunks += [others[j::k] for j in range(k)]
    chunks = [c for c in chunks if c]
    sources = [_object_source(c) for c in chunks]
    if all(native.is_built(source, flags=flags()) for source in sources):
        # nothing to compile, only to load: threads would only take turns at the GIL
        built = [_build_one(c, source) for c, source in zip(chunks, sources)]
    else:
        found = _from_index(entries)
        if found is not None:
            return found
        # imported here: a process whose kernels are all built never needs it (~2 ms to import)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(len(chunks)) as pool:   # each thread waits on its compiler process
            built = list(pool.map(_build_one, chunks, sources))
        for chunk, source in zip(chunks, sources):
            _index(chunk, source)
    where = {id(e): r for chunk, rs in zip(chunks, built) for e, r in zip(chunk, rs)}
    return [where[id(e)] for e in entries]


def _build_alone(entries):
    """_build_one for a batch built as one object: from the index when the batch is
    new but each kernel is in an object built before."""
    source = _object_source(entries)
    if native.is_built(source, flags=flags()):
        return _build_one(entries, source)
    found = _from_index(entries)
    if found is not None:
        return found
    built = _build_one(entries, source)
    _index(entries, source)
    return built


# -- which object holds a kernel: a batch of kernels built before, in other batches, is loaded, not compiled --------

#: kernel (its C text, entry point and flags) -> the cache key of a shared object holding it. An object
#: holds one build batch, and a step compiled again in another order (the autotuner's kept schedule
#: alone, another model sharing kernels) makes other batches of the same kernels
_OBJECTS = DiskMemo("objects", ".key", str.encode, bytes.decode)


def _unit_key(entry) -> str | None:
    """The key of what an entry needs from an object: its kernel's text and, when it is
    called with array objects, its entry point (for this compiler, flags and machine)."""
    unit = entry.source
    if entry.object_calls:
        unit += _ENTRY_PRELUDE + _entry_source(entry.kernel, entry.in_place)
    return native.cache_key(unit, flags=flags())


def _index(entries, source) -> None:
    """Record that the object built from `source` holds each entry's kernel."""
    key = native.cache_key(source, flags=flags())
    for e in entries:
        unit = _unit_key(e)
        if key is not None and unit is not None:
            _OBJECTS.put(unit, key)


def _from_index(entries):
    """[(kernel function, entry point, part)] of each entry from objects built before,
    or None when one of them is in none (or its object is gone or damaged)."""
    groups: dict = {}
    for e in entries:
        unit = _unit_key(e)
        found, key = _OBJECTS.get(unit) if unit is not None else (False, None)
        if not found:
            return None
        groups.setdefault(key, []).append(e)
    bound = {}
    for key, group in groups.items():
        lib = native.load_built(key)
        if lib is None:
            return None
        try:
            if any(e.object_calls for e in group):
                _fill_tables(lib)
            bound.update((id(e), _bind_entry(lib, e)) for e in group)
        except (NativeBuildError, ValueError):   # an index entry naming an object without the kernel
            return None
    return [bound[id(e)] for e in entries]


def _object_source(entries) -> str:
    """The C source of one shared object holding the entries' kernels."""
    source = _renderer().assemble([e.source for e in entries])
    objects = [e for e in entries if e.object_calls]
    if objects:
        source += _ENTRY_PRELUDE + "".join(_entry_source(e.kernel, e.in_place) for e in objects)
    return source


def _build_one(entries, source=None):
    if source is None:
        source = _object_source(entries)
    objects = [e for e in entries if e.object_calls]
    name = entries[0].kernel.name if len(entries) == 1 else f"fused{len(entries)}"
    lib = native.build(source, flags=flags(), name=name)
    if objects:
        _fill_tables(lib)
    return [_bind_entry(lib, e) for e in entries]


def _bind_entry(lib, e):
    """(kernel function, entry point or None, part function or None) of entry e in lib."""
    argtypes = (ctypes.c_void_p,) * len(e.kernel.params)
    cfn = native.bind(lib, e.kernel.name, argtypes)
    entry = None
    if e.object_calls:
        entry = native.bind(lib, e.kernel.name + "_objects", argtypes)
        entry.restype = ctypes.c_int
    part = None
    if has_part(e.kernel):
        part = native.bind(lib, e.kernel.name + PART_SUFFIX, (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64))
    return cfn, entry, part


def _bind(env, cfn, entry, part):
    env["_k"] = cfn
    env["_entry"] = entry
    env["_kp"] = part


def _refuse(*args):
    return 2   # "not for this kernel": the wrapper takes its slow path, which runs NumPy


class _Stub:
    """Stands for a pending kernel in a wrapper's globals: the first call builds
    the batch (which rebinds the wrapper to the real function) and runs it."""
    __slots__ = ("env", "name")

    def __init__(self, env, name):
        self.env, self.name = env, name

    def __call__(self, *args):
        build_pending()
        fn = self.env[self.name]
        if fn is self:  # pragma: no cover - the batch always rebinds its wrappers
            raise NativeBuildError("internal error: a fused kernel was not bound by its batch")
        return fn(*args)


# -- NumPy's array object, as C sees it ----------------------------------------------------------------------

_HEADER = object.__basicsize__   # PyObject_HEAD; ob_type is its last pointer
_C_CONTIGUOUS, _ALIGNED, _WRITEABLE = 0x0001, 0x0100, 0x0400   # NPY_ARRAY_* flags


class _ArrayFields(ctypes.Structure):
    """The head of NumPy's PyArrayObject_fields (numpy/ndarraytypes.h)."""
    _fields_ = [("head", ctypes.c_char * (_HEADER - ctypes.sizeof(ctypes.c_void_p))),
                ("type", ctypes.c_void_p), ("data", ctypes.c_void_p), ("nd", ctypes.c_int),
                ("dims", ctypes.POINTER(ctypes.c_ssize_t)), ("strides", ctypes.POINTER(ctypes.c_ssize_t)),
                ("base", ctypes.c_void_p), ("descr", ctypes.c_void_p), ("flags", ctypes.c_int)]


def _layout_matches() -> bool:
    """Whether arrays of this NumPy have the layout _ArrayFields describes: checked
    field by field on arrays of several kinds against NumPy's Python attributes."""
    try:
        base = np.arange(24, dtype=np.float64).reshape(4, 6)
        ro = np.ones(3, np.int8)
        ro.flags.writeable = False
        odd = np.frombuffer(bytearray(17), np.uint8)[1:].view(np.int32)  # misaligned
        samples = [base, base.T, base[:, ::2], np.zeros((), np.bool_), np.empty((2, 0), np.float32),
                   np.broadcast_to(np.float32(1), (3, 3)), ro, odd]
        for a in samples:
            f = _ArrayFields.from_address(id(a))
            flags = f.flags
            if (f.type != id(type(a)) or f.data != a.ctypes.data or f.nd != a.ndim
                    or tuple(f.dims[k] for k in range(a.ndim)) != a.shape
                    or tuple(f.strides[k] for k in range(a.ndim)) != a.strides or f.descr != id(a.dtype)
                    or bool(flags & _C_CONTIGUOUS) != a.flags.c_contiguous
                    or bool(flags & _ALIGNED) != a.flags.aligned
                    or bool(flags & _WRITEABLE) != a.flags.writeable):
                return False
        return True
    except Exception:  # noqa: BLE001 - any surprise means: do it in Python
        return False


#: entry points that take array objects (see the module docstring); False: Python checks
OBJECT_CALLS = _layout_matches()

_ENTRY_PRELUDE = f"""
/* entry points taking NumPy arrays (PyArrayObject*): checks, data pointers, overlap, in C */
typedef struct {{
    char head[{_HEADER - ctypes.sizeof(ctypes.c_void_p)}];
    const void* type; char* data; int nd; const intptr_t* dims; const intptr_t* strides;
    const void* base; const void* descr; int flags;
}} avl_ndarray;
AVL_EXPORT const void* avl_ndarray_type = 0;      /* numpy.ndarray, set after loading */
AVL_EXPORT const void* avl_descr[{len(DTYPES)}];  /* the builtin dtype of each kernel dtype */
/* noinline: compiled once, not once per array of every entry point (gcc -O3 vectorizes each copy's loop) */
static __attribute__((noinline)) char* avl_data(const void* o, int descr, intptr_t size, int flags)
{{
    const avl_ndarray* a = (const avl_ndarray*)o;
    if (a->type != avl_ndarray_type || a->descr != avl_descr[descr] || (a->flags & flags) != flags)
        return 0;
    intptr_t n = 1;
    for (int d = 0; d < a->nd; d++)
        n *= a->dims[d];
    return n == size ? a->data : 0;
}}
static inline int avl_overlap(const char* p, intptr_t nbytes, const char* o, intptr_t onbytes)
{{
    return nbytes > 0 && onbytes > 0 && (uintptr_t)p < (uintptr_t)o + (uintptr_t)onbytes
        && (uintptr_t)o < (uintptr_t)p + (uintptr_t)nbytes;
}}
"""


def _entry_source(kernel, in_place=True) -> str:
    """int NAME_objects(in0, ..., out): 0 = ran, 1 = an output overlaps an input or
    another output, 2 = an array the kernel was not compiled for (the caller takes
    the slow path).  in_place: an input may be exactly an output (elementwise code
    reads each element before writing it)."""
    ins, outs = kernel.inputs, kernel.outputs
    ctypes_of = CRenderer()
    params = ", ".join(f"const void* o_{b.name}" for b in kernel.params)
    lines = [f"AVL_EXPORT int {kernel.name}_objects({params})", "{"]
    need = {"in": _C_CONTIGUOUS | _ALIGNED, "out": _C_CONTIGUOUS | _ALIGNED | _WRITEABLE}
    for b in kernel.params:
        lines.append(f"    char* p_{b.name} = avl_data(o_{b.name}, {DTYPES.index(b.dtype)}, {b.size}, "
                     f"{need[b.role]});")
        lines.append(f"    if (!p_{b.name}) return 2;")
    for k, outb in enumerate(outs):
        onb = outb.size * outb.dtype.itemsize
        for b in ins:
            nb = b.size * b.dtype.itemsize
            same_layout = in_place and b.size == outb.size and b.dtype.itemsize == outb.dtype.itemsize
            exact = f"p_{b.name} != p_{outb.name} && " if same_layout else ""
            lines.append(f"    if ({exact}avl_overlap(p_{b.name}, {nb}, p_{outb.name}, {onb})) return 1;")
        for other in outs[:k]:   # two outputs in one array: the later store would win
            lines.append(f"    if (avl_overlap(p_{other.name}, {other.size * other.dtype.itemsize}, "
                         f"p_{outb.name}, {onb})) return 1;")
    args = ", ".join(f"({'const ' if b.role == 'in' else ''}{ctypes_of.buffer_type(b.dtype)}*)p_{b.name}"
                     for b in kernel.params)
    lines += [f"    {kernel.name}({args});", "    return 0;", "}", ""]
    return "\n".join(lines)


def _fill_tables(lib):
    """Point the module's tables at numpy.ndarray and the builtin dtypes (this
    process's addresses: they are not in the source, which stays cacheable)."""
    ctypes.c_void_p.in_dll(lib, "avl_ndarray_type").value = id(np.ndarray)
    table = (ctypes.c_void_p * len(DTYPES)).in_dll(lib, "avl_descr")
    for k, d in enumerate(DTYPES):
        table[k] = id(d)


# -- the callable ---------------------------------------------------------------------------------------------

def _wrapper(body, kernel, built, backend):
    """Python source specialized to the group's signature, compiled with exec.
    `built` is the bound kernel, or None while it waits in the pending batch."""
    out_node = body.outputs[0]
    args = [f"a{k}" for k in range(len(kernel.inputs))]
    env = {"_nd": np.ndarray, "_id": id, "_empty": np.empty,
           "_SHAPE": tuple(out_node.shape), "_DT": np.dtype(out_node.dtype)}
    env["_slow"] = _Slow(body, kernel, env, backend)
    if built is None:
        env["_k"], env["_entry"], env["_kp"] = _Stub(env, "_k"), _Stub(env, "_entry"), None
    else:
        env["_k"], env["_entry"], env["_kp"] = built.cfn, built.entry, built.part
    allargs = ", ".join(args + ["out"])
    if OBJECT_CALLS:
        lines = [f"def fused({', '.join(args + ['out=None'])}):",
                 "    if out is None:",
                 "        out = _empty(_SHAPE, _DT)",
                 f"    if _entry({', '.join(f'_id({a})' for a in args + ['out'])}):",
                 f"        return _slow({allargs})",
                 "    return out"]
    else:
        lines = _python_checked(kernel, args, env, in_place=not body_reduces(body))
    src = "\n".join(lines) + "\n"
    exec(_code(src, f"<avalon fused C {kernel.name}>"), env)
    fn = env["fused"]
    fn.wrapper_source = src
    return fn


def _python_checked(kernel, args, env, in_place=True):
    """The wrapper where NumPy's array layout is not the one C is told of:
    checks in Python, pointers from a.ctypes.data, overlap through _slow."""
    outb = kernel.outputs[0]
    conds = []
    for k, b in enumerate(kernel.inputs):
        env[f"_D{k}"] = b.dtype
        conds.append(f"type(a{k}) is not _nd or a{k}.dtype is not _D{k} or a{k}.size != {b.size} "
                     f"or not a{k}.flags.c_contiguous or not a{k}.flags.aligned")
    conds.append(f"type(out) is not _nd or out.dtype is not _DT or out.size != {outb.size} "
                 "or not out.flags.c_contiguous or not out.flags.aligned or not out.flags.writeable")
    allargs = ", ".join(args + ["out"])
    lines = [f"def fused({', '.join(args + ['out=None'])}):",
             "    fresh = out is None",
             "    if fresh:",
             "        out = _empty(_SHAPE, _DT)",
             "    if (" + "\n            or ".join(conds) + "):",
             f"        return _slow({allargs})"]
    overlap = []
    onb = outb.size * outb.dtype.itemsize
    for k, b in enumerate(kernel.inputs):
        nb = b.size * b.dtype.itemsize
        if nb and onb:
            same = in_place and b.size == outb.size and b.dtype.itemsize == outb.dtype.itemsize
            cond = f"p{k} < po + {onb} and po < p{k} + {nb}"
            overlap.append(f"(p{k} != po and {cond})" if same else f"({cond})")
    lines.append("    po = out.ctypes.data")
    lines += [f"    p{k} = a{k}.ctypes.data" for k in range(len(args))]
    if overlap:
        lines.append("    if not fresh and (" + "\n            or ".join(overlap) + "):")
        lines.append(f"        return _slow({allargs})")
    lines += [f"    if _k({', '.join([f'p{k}' for k in range(len(args))] + ['po'])}):",   # None: it ran
              f"        return _slow({allargs})",
              "    return out"]
    return lines


class _Slow:
    """Everything off the fast path, in Python: scalars become 0-d arrays,
    non-contiguous or misaligned arrays are copied, and an `out` the kernel
    cannot write directly (not contiguous or writeable, overlapping an input)
    gets the result through a temporary; other dtypes and sizes (and other
    array types) run the group's NumPy version, as does a kernel that did not
    build."""

    def __init__(self, body, kernel, env, backend):
        self.body, self.kernel, self.env, self.backend = body, kernel, env, backend
        self.copy_inputs = COPY_MIN is not None and kernel.outputs[0].size >= COPY_MIN
        self.in_place = not body_reduces(body)   # an input may be exactly `out`
        self._local = threading.local()

    def numpy(self):
        """The group's NumPy version, one per thread (it owns scratch arrays)."""
        fn = getattr(self._local, "fn", None)
        if fn is None:
            fn = self._local.fn = compile_fused_numpy(self.body, self.backend)
        return fn

    def __call__(self, *args):
        *inputs, out = args
        if isinstance(self.env["_k"], _Stub):
            build_pending()
        if self.env["_k"] is _refuse:
            return self.numpy()(*inputs, out=out)
        fixed = self.fixed_inputs(inputs)
        if fixed is None:
            return self.numpy()(*inputs, out=out)
        if out is not None and self.run(fixed, out):
            return out
        target = np.empty(tuple(self.body.outputs[0].shape), self.kernel.outputs[0].dtype)
        if not self.run(fixed, target):  # pragma: no cover - fresh arrays of the exact kind
            return self.numpy()(*inputs, out=out)
        if out is None:
            return target
        out[...] = target   # raises as NumPy does for a read-only or mismatched out
        return out

    def fixed_inputs(self, inputs):
        """The inputs as C-contiguous, aligned arrays of the compiled dtypes, or None."""
        fixed = []
        for a, b in zip(inputs, self.kernel.inputs):
            if type(a) is not np.ndarray:
                if not isinstance(a, np.generic):
                    return None
                a = np.asarray(a)
            if a.dtype != b.dtype or a.size != b.size:
                return None
            if not (a.flags.c_contiguous and a.flags.aligned):
                if not self.copy_inputs:
                    return None                   # small: NumPy's strided loops win
                a = np.array(a, order="C")       # a fresh copy: contiguous and aligned
            if a.dtype is not b.dtype:
                a = a.view(b.dtype)               # an equal dtype object: the builtin one
            fixed.append(a)
        return fixed

    def run(self, arrays, out) -> bool:
        """Run the kernel on `arrays` into `out` if it can write `out` directly."""
        entry = self.env["_entry"]
        if entry is not None:
            return entry(*[id(a) for a in arrays], id(out)) == 0
        outb = self.kernel.outputs[0]
        if (type(out) is not np.ndarray or out.dtype != outb.dtype or out.size != outb.size
                or not (out.flags.c_contiguous and out.flags.aligned and out.flags.writeable)
                or any(_overlaps(out, a, self.in_place) for a in arrays)):
            return False
        if outb.size:
            self.env["_k"](*[a.ctypes.data for a in arrays], out.ctypes.data)
        return True


def _overlaps(out, a, in_place=True):
    """True unless `a` and `out` are disjoint or (in_place) exactly the same memory and layout."""
    if a.size == 0 or out.size == 0:
        return False
    pa, po = a.ctypes.data, out.ctypes.data
    if in_place and pa == po and a.size == out.size and a.itemsize == out.itemsize:
        return False
    return pa < po + out.nbytes and po < pa + a.nbytes
