"""Shape primitives: reshape, transpose, broadcast_to; and expand_dims,
squeeze, flatten built from them.  Each may return a view of its input."""
from __future__ import annotations

import math

import numpy as np

from ..errors import AvalonError, ShapeError
from ..primitive import Tracer, bind, defprim
from . import _batching
from ._rules import checked_shape, normalize_axes
from .indexing import _located  # errors name the user's line
from ._sharding import P, R, S, NeedsReduce, NoSplit, created, on_sharded


def _reshape_rule(x, *, shape):
    if int(math.prod(shape)) != int(math.prod(x.shape)):
        raise ShapeError(f"reshape: cannot reshape an array of shape {tuple(x.shape)} "
                         f"({int(np.prod(x.shape))} elements) into shape {tuple(shape)}")
    return tuple(shape), x.dtype


def _reshape_sharding(node, states, ctx):
    """Where the batch factor lands when a reshape splits or merges axes."""
    (s,) = states
    if s == P:
        return P
    src = node.inputs[0]
    flat = s[2] * int(math.prod(src.shape[s[1] + 1:]))  # flat distance of batch entries
    after = 1  # product of the output axes after axis b
    for b in range(node.ndim - 1, -1, -1):
        size = node.shape[b]
        if after <= flat < after * size:
            stride = flat // after
            if flat % after == 0 and size % (stride * ctx.n) == 0:
                return S(b, stride)
            break
        after *= size
    raise NoSplit("reshape splits the batch factor")


def _reshape_batching(args, dims, *, shape):
    """Each example reshaped: the batch axis in front, kept whole."""
    x = _batching.move_to_front(args[0], dims[0])
    return bind(reshape_p, (x,), {"shape": (x.shape[0],) + tuple(shape)}), 0


def _merge_view_sum(nodes):
    """merge_sum rule of transpose and reshape: f(a) + f(b) + ... = f(a + b + ...)
    for one view f (same op and attributes) of arrays of one shape and dtype.
    The sum costs the same before the view, and its terms meet again there:
    per-step weight-gradient products, transposed by matmul's VJP, can then
    merge into one product (matmul's merge_sum rule)."""
    from ..graph import Node
    from ..primitive import PRIMITIVES, infer_type
    groups: dict = {}
    for n in nodes:
        src = n.inputs[0]
        key = (n.op, repr(sorted(n.attrs.items())), src.shape, src.dtype)
        groups.setdefault(key, []).append(n)
    group = max(groups.values(), key=len)
    if len(group) < 2:
        return None
    add_p = PRIMITIVES["add"]
    total = group[0].inputs[0]
    new = []
    for n in group[1:]:
        shape, dtype = infer_type(add_p, [total, n.inputs[0]], {})
        total = Node("add", [total, n.inputs[0]], {}, shape, dtype, n.loc)
        new.append(total)
    first = group[0]
    new.append(Node(first.op, [total], first.attrs, first.shape, first.dtype, first.loc))
    return new, group


def _c_strides(shape):
    return tuple(int(math.prod(shape[d + 1:])) for d in range(len(shape)))


def _reshape_strided(node):
    """strided_view rule: a reshape of a C-contiguous array is C-contiguous."""
    return 0, _c_strides(node.shape)


reshape_p = defprim("reshape", shape=_reshape_rule, view=True, output_shape_attr="shape",
                    strided_view=_reshape_strided,
                    impl=lambda xp, x, *, shape: xp.reshape(x, shape),
                    vjp=lambda g, out, x, *, shape: (reshape(g, x.shape),),
                    sharding=on_sharded(_reshape_sharding, reads_partials=True), batching=_reshape_batching,
                    merge_sum=_merge_view_sum)


def _transpose_rule(x, *, perm):
    if sorted(perm) != list(range(len(x.shape))):
        raise ShapeError(f"transpose: axes {perm} are not a permutation of the {len(x.shape)} axes "
                         f"of an array of shape {tuple(x.shape)}")
    return tuple(x.shape[p] for p in perm), x.dtype


def _transpose_sharding(node, states, ctx):
    (s,) = states
    return P if s == P else S(list(node.attrs["perm"]).index(s[1]), s[2])


def _transpose_batching(args, dims, *, perm):
    """The example axes permuted around the batch axis, left where it is."""
    x, d = args[0], dims[0]
    example_axes = [k for k in range(len(x.shape)) if k != d]   # example axis i is batch axis example_axes[i]
    full = [example_axes[p] for p in perm]
    full.insert(d, d)
    return bind(transpose_p, (x,), {"perm": tuple(full)}), d


def _transpose_strided(node):
    """strided_view rule: the input's C strides, permuted."""
    c = _c_strides(node.inputs[0].shape)
    return 0, tuple(c[p] for p in node.attrs["perm"])


transpose_p = defprim("transpose", shape=_transpose_rule, view=True, strided_view=_transpose_strided,
                      impl=lambda xp, x, *, perm: xp.transpose(x, perm),
                      vjp=lambda g, out, x, *, perm: (transpose(g, tuple(np.argsort(perm).tolist())),),
                      sharding=on_sharded(_transpose_sharding, reads_partials=True), batching=_transpose_batching,
                      merge_sum=_merge_view_sum)


def _contiguous_impl(xp, x, out=None):
    if out is None:
        return xp.ascontiguousarray(x)
    xp.copyto(out, x)
    return out


def _contiguous_batching(args, dims):
    return bind(contiguous_p, (args[0],), {}), dims[0]


# a C-ordered copy of a strided view: the CPU's passes.products.shared_transposed_operands
# makes one of a transposed matrix that many products read (BLAS reads it faster so)
contiguous_p = defprim("contiguous", shape=lambda x: (tuple(x.shape), x.dtype), accepts_out=True,
                       impl=_contiguous_impl, vjp=lambda g, out, x: (g,),
                       sharding=on_sharded(lambda node, states, ctx: states[0], reads_partials=True),
                       batching=_contiguous_batching,
                       doc="x copied into a C-contiguous array (same values; a view becomes its own array).")


def _broadcast_rule(x, *, shape):
    shape = tuple(shape)
    lead = len(shape) - len(x.shape)
    if lead < 0 or any(s != 1 and s != t for s, t in zip(x.shape, shape[lead:])):
        raise ShapeError(f"broadcast_to: cannot broadcast shape {tuple(x.shape)} to {shape}")
    return shape, x.dtype


def _broadcast_vjp(g, out, x, *, shape):
    from .reduce import sum_to
    return (sum_to(g, x.shape),)


def _broadcast_sharding(node, states, ctx):
    """A replicated value broadcast to the batch size on a new (or size-1) axis
    becomes sharded on it: its values do not depend on the position."""
    (s,) = states
    src = node.inputs[0]
    lead = node.ndim - src.ndim
    if s == P:
        raise NeedsReduce(src)
    if s != R:
        return S(s[1] + lead, s[2])
    for k, size in enumerate(node.shape):
        if size == ctx.n and (k < lead or src.shape[k - lead] == 1):
            return S(k)
    return R


def _broadcast_batching(args, dims, *, shape):
    """Each example broadcast to `shape`: the batch axis in front, the example
    padded with leading size-1 axes to the target's rank (NumPy's alignment)."""
    x = _batching.move_to_front(args[0], dims[0])
    n, example = x.shape[0], tuple(x.shape[1:])
    padded = (n,) + (1,) * (len(shape) - len(example)) + example
    if padded != tuple(x.shape):
        x = bind(reshape_p, (x,), {"shape": padded})
    return bind(broadcast_to_p, (x,), {"shape": (n,) + tuple(shape)}), 0


# fusible: inside an elementwise group, the group's kernel reads x through zero
# strides (a broadcast view as a kernel's operand would take its strided path);
# recompute: every group reading it reads x so
broadcast_to_p = defprim("broadcast_to", shape=_broadcast_rule, view=True, output_shape_attr="shape",
                         fusible=True, recompute=True, expr="{0}",
                         impl=lambda xp, x, *, shape: xp.broadcast_to(x, shape), vjp=_broadcast_vjp,
                         sharding=_broadcast_sharding, batching=_broadcast_batching)


# -- public functions ---------------------------------------------------------------

def _resolve_shape(size, shape, opname="reshape"):
    shape = list(checked_shape(opname, shape, allow_infer=True))
    if shape.count(-1) > 1:
        raise ShapeError(f"{opname}: only one dimension can be -1, got {tuple(shape)}")
    if -1 in shape:
        known = int(math.prod([s for s in shape if s != -1]))
        if known == 0 or size % known:
            raise ShapeError(f"{opname}: cannot infer the -1 in {tuple(shape)} for {size} elements")
        shape[shape.index(-1)] = size // known
    return tuple(int(s) for s in shape)


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    size = int(math.prod(x.shape))
    shape = _resolve_shape(size, shape)
    if tuple(x.shape) == shape:
        return x
    return bind(reshape_p, (x,), {"shape": shape})


def transpose(x, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = axes[0]
    nd = len(x.shape)
    perm = tuple(int(a) % nd for a in axes) if axes else tuple(reversed(range(nd)))
    if perm == tuple(range(nd)):
        return x
    return bind(transpose_p, (x,), {"perm": perm})


def permute(x, *dims):
    return transpose(x, *dims)


def swapaxes(x, a, b):
    perm = list(range(len(x.shape)))
    perm[a], perm[b] = perm[b], perm[a]
    return transpose(x, tuple(perm))


def broadcast_to(x, shape):
    shape = tuple(int(s) for s in shape)
    if tuple(x.shape) == shape:
        return x
    return bind(broadcast_to_p, (x,), {"shape": shape})


def expand_dims(x, axis):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    nd = len(x.shape) + len(axes)
    axes = sorted(a % nd for a in axes)
    shape = list(x.shape)
    for a in axes:
        shape.insert(a, 1)
    return reshape(x, tuple(shape))


def squeeze(x, axis=None):
    if axis is None:
        axes = tuple(i for i, s in enumerate(x.shape) if s == 1)
    else:
        axes = normalize_axes("squeeze", axis, len(x.shape))
        for a in axes:
            if x.shape[a] != 1:
                raise ShapeError(f"squeeze: axis {a} of shape {tuple(x.shape)} has size {x.shape[a]}, not 1")
    return reshape(x, tuple(s for i, s in enumerate(x.shape) if i not in axes))


def flatten(x, start_dim=0, end_dim=-1):
    nd = max(len(x.shape), 1)
    for d in (start_dim, end_dim):
        if not -nd <= d < nd:
            raise ShapeError(f"flatten: dimension {d} is out of range for an array of shape {tuple(x.shape)}")
    s, e = start_dim % nd, end_dim % nd
    if s > e:
        raise ShapeError(f"flatten: start_dim {start_dim} comes after end_dim {end_dim} "
                         f"for an array of shape {tuple(x.shape)}")
    if not x.shape:
        return reshape(x, (1,))
    shape = tuple(x.shape[:s]) + (int(math.prod(x.shape[s:e + 1])),) + tuple(x.shape[e + 1:])
    return reshape(x, shape)


def _full_impl(xp, *, shape, dtype, value, out=None):
    if out is None:
        return xp.full(shape, value, dtype=dtype)
    out.fill(value)
    return out


# No batching rule: full has no operand, so vmap never maps it; it re-emits the
# node as it is, one array every example shares (avalon.vmap).
full_p = defprim("full", shape=lambda *, shape, dtype, value: (tuple(shape), np.dtype(dtype)),
                 impl=_full_impl, accepts_out=True, foldable=False, nondiff=True, output_shape_attr="shape",
                 sharding=created)


def _fill_dtype(fill_value, dtype):
    """np.full's dtype: the fill value's, except that a Python float gives float32
    (Avalon's default float, so it mixes with float32 arrays without a cast)."""
    if dtype is not None:
        return np.dtype(dtype)
    if hasattr(fill_value, "dtype"):  # NumPy scalars, arrays, tracers keep theirs
        return np.dtype(fill_value.dtype)
    inferred = np.asarray(fill_value).dtype
    return np.dtype(np.float32) if inferred.kind == "f" else inferred


def full(shape, fill_value, dtype=None, *, like=None):
    """np.full: an array of `shape` filled with `fill_value` (dtype None: the fill
    value's, a Python float giving float32).  Inside a trace it is a node of the
    trace (like=<traced array> picks the trace; else the one in progress);
    eagerly it is made on `like`'s device, else on the CPU.  A traced or array
    fill value is broadcast to `shape` (and carries its gradient)."""
    from ..primitive import Tracer, active_graph, bind_on, current_location
    shape = checked_shape("full", shape)
    dtype = _fill_dtype(fill_value, dtype)
    if (isinstance(fill_value, np.generic) or type(fill_value) is np.ndarray) and not np.shape(fill_value):
        fill_value = fill_value.item()  # a NumPy scalar: its value
    elif hasattr(fill_value, "shape"):  # traced, on a device, or not 0-d: broadcast, on its device
        from .elementwise import cast
        return broadcast_to(cast(fill_value, dtype), shape)
    attrs = {"shape": shape, "dtype": dtype, "value": fill_value}
    graph = like.graph if isinstance(like, Tracer) else (active_graph() if like is None else None)
    if graph is not None:
        return Tracer(graph, graph.add_node("full", (), attrs, attrs["shape"], attrs["dtype"], current_location()))
    from ..backends import backend_of, get_backend, Device
    backend = backend_of(like) if like is not None else get_backend(Device("cpu"))
    return bind_on(backend, full_p, attrs)


def zeros(shape, dtype=np.float32, *, like=None):
    """An array of zeros (float32 unless `dtype` says otherwise); see `full`."""
    return full(shape, 0, dtype, like=like)


def ones(shape, dtype=np.float32, *, like=None):
    """An array of ones (float32 unless `dtype` says otherwise); see `full`."""
    return full(shape, 1, dtype, like=like)


def _assign_rule(dst, src):
    from ._rules import broadcast_shapes
    if broadcast_shapes("assign", dst.shape, src.shape) != tuple(dst.shape):
        raise ShapeError(f"assign: cannot write a value of shape {tuple(src.shape)} into an array of "
                         f"shape {tuple(dst.shape)}")
    return tuple(dst.shape), dst.dtype


def _assign_impl(xp, dst, src):
    xp.copyto(dst, src, casting="same_kind")
    return dst


def _assign_batching(args, dims, **attrs):
    """Each example's dst written with its src: src is laid out as dst is (its
    batch axis, or a size-1 axis when src is shared, at dst's batch axis d), so
    the write goes into dst's own buffer, not a transposed copy.  A mapped src
    into a dst every example shares is refused: the examples would overwrite
    one another and only the last would remain."""
    (dst, src), (d, ds) = args, dims
    if d is _batching.NOT_MAPPED:
        raise AvalonError("vmap: assign writes a value that differs between examples (mapped) into an array "
                          f"every example shares (shape {tuple(dst.shape)}, not mapped): "
                          "the examples would overwrite one another. Map the destination too (give it a batch "
                          "axis in in_axes), or compute a new array instead of writing in place")
    rank = len(dst.shape) - 1
    src = _batching.move_to_front(src, ds) if ds is not _batching.NOT_MAPPED else expand_dims(src, 0)
    example = tuple(src.shape[1:])
    src = reshape(src, (src.shape[0],) + (1,) * (rank - len(example)) + example)
    if d != 0:
        src = transpose(src, _front_to(d, rank + 1))
    return bind(assign_p, (dst, src), attrs), d


def _front_to(d, nd):
    """The permutation moving axis 0 to position d."""
    perm = list(range(1, nd))
    perm.insert(d, 0)
    return tuple(perm)


assign_p = defprim("assign", shape=_assign_rule, impl=_assign_impl, writes_input=True, nondiff=True,
                   batching=_assign_batching,
                   doc="Write src into the array dst in place (optimizer updates).")


def assign(dst, src):
    """Write `src` into the array `dst` in place and return dst.  In a compiled
    function the op producing src writes straight into dst when it can.

    Traced, `dst` (a tracer) is rebound to the written value, so every later
    read of it sees that value, as eager code does: a buffer updated twice in
    one step (BatchNorm applied to two batches) takes both updates in order."""
    out = bind(assign_p, (dst, src))
    if isinstance(dst, Tracer):
        dst.node = out.node
        return dst
    return out


# -- repeat, tile: broadcasts and reshapes (a gather for per-element repeats) -----------------

def _static_counts(opname, what, value):
    """Repeat counts as Python ints: they fix the result's shape, so they must be concrete."""
    from ..errors import ConcretizationError, at, user_location
    from ..primitive import Tracer
    if isinstance(value, Tracer):
        raise ConcretizationError(f"{opname}: {what} is being traced{at(user_location())}, but it sets the "
                                  "result's shape; pass it as a concrete int, list or NumPy array")
    counts = np.asarray(value)
    if counts.dtype.kind not in "iub" or counts.ndim > 1 or (counts < 0).any():
        raise ShapeError(f"{opname}: {what} must be a non-negative int or a 1-D sequence of them, got {value!r}")
    return counts.astype(np.int64)


@_located
def repeat(a, repeats, axis=None):
    """np.repeat: each element of `a` repeated along `axis` (None: of the flattened
    array), `repeats` times (an int) or repeats[i] times for element i (a sequence)."""
    from .indexing import _norm_axis, take
    if not hasattr(a, "shape"):
        a = np.asarray(a)
    counts = _static_counts("repeat", "repeats", repeats)
    if axis is None:
        a, axis = reshape(a, (-1,)), 0
    if not a.shape:
        a, axis = reshape(a, (1,)), 0
    axis = _norm_axis("repeat", axis, len(a.shape), a.shape)
    n = a.shape[axis]
    if counts.ndim == 1 and counts.size not in (1, n):
        raise ShapeError(f"repeat: {counts.size} repeat counts for an axis of size {n} (array of shape "
                         f"{tuple(a.shape)}); give one count, or one per element")
    if counts.ndim == 1 and counts.size == n and n != 1 and len(set(counts.tolist())) > 1:
        return take(a, np.repeat(np.arange(n), counts), axis=axis)
    r = int(counts.reshape(-1)[0]) if counts.size else 1
    shape = tuple(a.shape)
    stretched = broadcast_to(expand_dims(a, axis + 1), shape[:axis + 1] + (r,) + shape[axis + 1:])
    return reshape(stretched, shape[:axis] + (n * r,) + shape[axis + 1:])


@_located
def tile(A, reps):  # noqa: N803 - NumPy's parameter name
    """np.tile: `A` repeated reps[k] times along axis k; a shorter `reps` is
    padded with 1s on the left, a shorter `A` gains leading axes of size 1."""
    if not hasattr(A, "shape"):
        A = np.asarray(A)  # noqa: N806
    counts = tuple(int(r) for r in _static_counts("tile", "reps", reps).reshape(-1))
    nd = max(len(A.shape), len(counts))
    shape = (1,) * (nd - len(A.shape)) + tuple(A.shape)
    counts = (1,) * (nd - len(counts)) + counts
    if all(r == 1 for r in counts):
        return reshape(A, shape)
    spread = reshape(A, tuple(d for s in shape for d in (1, s)))
    stretched = broadcast_to(spread, tuple(d for r, s in zip(counts, shape) for d in (r, s)))
    return reshape(stretched, tuple(r * s for r, s in zip(counts, shape)))


# -- constants of static shape: arange and the *_like fills -----------------------------------

def _like_args(opname, order, device):
    """NumPy's layout and device arguments: results are C-ordered, on a's device."""
    from ..errors import AvalonError
    if order not in ("K", "A", "C") or device is not None:
        raise AvalonError(f"{opname}: order={order!r} and device={device!r} are not supported; the result is "
                          "C-ordered, on the device of the array given (move it with avalon.to_device)")


@_located
def full_like(a, fill_value, dtype=None, order="K", subok=True, shape=None, *, device=None):
    """np.full_like: an array of a's shape (or `shape`) and dtype (or `dtype`),
    filled with `fill_value`, on a's device; inside a trace, a node of a's trace.
    No gradient flows to `a`."""
    _like_args("full_like", order, device)  # subok: Avalon's arrays are base arrays already
    if not hasattr(a, "shape"):
        a = np.asarray(a)
    shape = tuple(a.shape) if shape is None else shape
    return full(shape, fill_value, np.dtype(a.dtype) if dtype is None else dtype, like=a)


@_located
def zeros_like(a, dtype=None, order="K", subok=True, shape=None, *, device=None):
    """np.zeros_like; see `full_like`."""
    return full_like(a, 0, dtype, order, subok, shape, device=device)


@_located
def ones_like(a, dtype=None, order="K", subok=True, shape=None, *, device=None):
    """np.ones_like; see `full_like`."""
    return full_like(a, 1, dtype, order, subok, shape, device=device)


@_located
def arange(start, stop=None, step=None, dtype=None, *, like=None):
    """np.arange: evenly spaced values in [start, stop) (one argument: [0, start)).
    dtype None: int64 for integer bounds, float32 for float ones (Avalon's default
    float; NumPy would give float64).  The bounds are static numbers.  Inside a
    trace the result is a constant of the trace; eagerly an array on `like`'s
    device, else on the CPU."""
    from ..errors import ConcretizationError, at, user_location
    from ..primitive import Tracer, active_graph, current_location
    bounds = [v for v in (start, stop, step) if v is not None]
    if any(isinstance(v, Tracer) for v in bounds):
        raise ConcretizationError(f"arange: a bound is being traced{at(user_location())}, but the bounds set the "
                                  "result's length; pass them as Python numbers")
    if step == 0:
        raise ShapeError(f"arange: step must not be zero{at(user_location())}")
    values = np.arange(start, stop, step, dtype=dtype)
    if dtype is None and values.dtype.kind == "f":
        values = values.astype(np.float32)
    graph = like.graph if isinstance(like, Tracer) else (active_graph() if like is None else None)
    if graph is not None:
        return Tracer(graph, graph.add_const(values, current_location()))
    if like is None or type(like) is np.ndarray:
        return values
    from ..backends import backend_of
    return backend_of(like).asarray(values)
# -- flip, roll, tril, triu (composites) ------------------------------------------------

def flip(x, axis=None):
    """np.flip: x with the order of `axis` (None: every axis; or a tuple) reversed,
    a view (getitem with step -1)."""
    from .indexing import getitem
    nd = len(x.shape)
    axes = tuple(range(nd)) if axis is None else normalize_axes("flip", axis, nd)
    if not axes:
        return x
    return getitem(x, tuple(slice(None, None, -1) if d in axes else slice(None) for d in range(nd)))


def _shifts_and_axes(shift, axes):
    """shift and axis broadcast against each other, as in np.roll."""
    shifts = tuple(shift) if isinstance(shift, (tuple, list)) else (shift,)
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in shifts):
        raise ShapeError(f"roll: shift={shift!r} must be an integer or a tuple of integers (static values)")
    if len(shifts) == 1:
        shifts = shifts * len(axes)
    elif len(axes) == 1:
        axes = axes * len(shifts)
    if len(shifts) != len(axes):
        raise ShapeError(f"roll: shift={shift!r} and axis={axes!r} must have the same length (or one be a "
                         "scalar)")
    return shifts, axes


def roll(x, shift, axis=None):
    """np.roll: entries shifted by `shift` along `axis`, those pushed off the end
    coming back at the start (axis=None: of the flattened array, then reshaped;
    shift and axis may be tuples, several shifts of one axis add up)."""
    from .indexing import concatenate, getitem
    if axis is None:
        return reshape(roll(reshape(x, (-1,)), shift, 0), tuple(x.shape))
    nd = len(x.shape)
    shifts, axes = _shifts_and_axes(shift, (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis))
    total = {}
    for a, s in zip(axes, shifts):
        (a,) = normalize_axes("roll", a, nd)
        total[a] = total.get(a, 0) + int(s)
    for a, s in sorted(total.items()):
        n = x.shape[a]
        s = s % n if n else 0
        if s:
            cut = (slice(None),) * a
            x = concatenate([getitem(x, cut + (slice(n - s, n),)), getitem(x, cut + (slice(0, n - s),))], axis=a)
    return x


def _triangle(opname, x, k, lower):
    from .elementwise import where
    from .indexing import _on_backend_of
    from ..primitive import Tracer
    if len(x.shape) < 2:
        raise ShapeError(f"{opname}: needs an array of at least 2 dimensions (..., M, N), got shape "
                         f"{tuple(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ShapeError(f"{opname}: k={k!r} must be an integer (a static value)")
    m, n = x.shape[-2:]
    keep = np.tri(m, n, int(k), dtype=bool) if lower else ~np.tri(m, n, int(k) - 1, dtype=bool)
    if not isinstance(x, Tracer):
        keep = _on_backend_of(keep, x)
    zero = 0.0 if np.dtype(x.dtype).kind in "fc" else (False if np.dtype(x.dtype).kind == "b" else 0)
    return where(keep, x, zero)


def tril(x, k=0):
    """np.tril: x with the entries above the k-th diagonal of its last two axes
    set to zero (k > 0: above the diagonal, k < 0: below it)."""
    return _triangle("tril", x, k, lower=True)


def triu(x, k=0):
    """np.triu: x with the entries below the k-th diagonal of its last two axes
    set to zero."""
    return _triangle("triu", x, k, lower=False)
