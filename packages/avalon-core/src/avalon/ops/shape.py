"""Shape primitives: reshape, transpose, broadcast_to; and expand_dims,
squeeze, flatten built from them.  Each may return a view of its input."""
from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from ..primitive import Tracer, bind, defprim
from ._rules import checked_shape, normalize_axes
from ._sharding import P, R, S, NeedsReduce, NoSplit, created, on_sharded


def _reshape_rule(x, *, shape):
    if int(np.prod(shape, dtype=np.int64)) != int(np.prod(x.shape, dtype=np.int64)):
        raise ShapeError(f"reshape: cannot reshape an array of shape {tuple(x.shape)} "
                         f"({int(np.prod(x.shape))} elements) into shape {tuple(shape)}")
    return tuple(shape), x.dtype


def _reshape_sharding(node, states, ctx):
    """Where the batch factor lands when a reshape splits or merges axes."""
    (s,) = states
    if s == P:
        return P
    src = node.inputs[0]
    flat = s[2] * int(np.prod(src.shape[s[1] + 1:], dtype=np.int64))  # flat distance of batch entries
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


reshape_p = defprim("reshape", shape=_reshape_rule, view=True, output_shape_attr="shape",
                    impl=lambda xp, x, *, shape: xp.reshape(x, shape),
                    vjp=lambda g, out, x, *, shape: (reshape(g, x.shape),),
                    sharding=on_sharded(_reshape_sharding, reads_partials=True))


def _transpose_rule(x, *, perm):
    if sorted(perm) != list(range(len(x.shape))):
        raise ShapeError(f"transpose: axes {perm} are not a permutation of the {len(x.shape)} axes "
                         f"of an array of shape {tuple(x.shape)}")
    return tuple(x.shape[p] for p in perm), x.dtype


def _transpose_sharding(node, states, ctx):
    (s,) = states
    return P if s == P else S(list(node.attrs["perm"]).index(s[1]), s[2])


transpose_p = defprim("transpose", shape=_transpose_rule, view=True,
                      impl=lambda xp, x, *, perm: xp.transpose(x, perm),
                      vjp=lambda g, out, x, *, perm: (transpose(g, tuple(np.argsort(perm).tolist())),),
                      sharding=on_sharded(_transpose_sharding, reads_partials=True))


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


broadcast_to_p = defprim("broadcast_to", shape=_broadcast_rule, view=True, output_shape_attr="shape",
                         impl=lambda xp, x, *, shape: xp.broadcast_to(x, shape), vjp=_broadcast_vjp,
                         sharding=_broadcast_sharding)


# -- public functions ---------------------------------------------------------------

def _resolve_shape(size, shape, opname="reshape"):
    shape = list(checked_shape(opname, shape, allow_infer=True))
    if shape.count(-1) > 1:
        raise ShapeError(f"{opname}: only one dimension can be -1, got {tuple(shape)}")
    if -1 in shape:
        known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
        if known == 0 or size % known:
            raise ShapeError(f"{opname}: cannot infer the -1 in {tuple(shape)} for {size} elements")
        shape[shape.index(-1)] = size // known
    return tuple(int(s) for s in shape)


def reshape(x, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    size = int(np.prod(x.shape, dtype=np.int64))
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
    shape = tuple(x.shape[:s]) + (int(np.prod(x.shape[s:e + 1], dtype=np.int64)),) + tuple(x.shape[e + 1:])
    return reshape(x, shape)


def _full_impl(xp, *, shape, dtype, value, out=None):
    if out is None:
        return xp.full(shape, value, dtype=dtype)
    out.fill(value)
    return out


full_p = defprim("full", shape=lambda *, shape, dtype, value: (tuple(shape), np.dtype(dtype)),
                 impl=_full_impl, accepts_out=True, foldable=False, nondiff=True, output_shape_attr="shape",
                 sharding=created)


def full(shape, value, dtype=np.float32, *, like=None):
    """An array filled with `value` (inside a trace, pass like=<traced array>)."""
    from ..primitive import Tracer, active_graph, bind_on, current_location
    attrs = {"shape": checked_shape("full", shape), "dtype": np.dtype(dtype), "value": value}
    graph = like.graph if isinstance(like, Tracer) else (active_graph() if like is None else None)
    if graph is not None:
        return Tracer(graph, graph.add_node("full", (), attrs, attrs["shape"], attrs["dtype"], current_location()))
    from ..backends import backend_of, get_backend, Device
    backend = backend_of(like) if like is not None else get_backend(Device("cpu"))
    return bind_on(backend, full_p, attrs)


def zeros(shape, dtype=np.float32, *, like=None):
    return full(shape, 0, dtype, like=like)


def ones(shape, dtype=np.float32, *, like=None):
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


assign_p = defprim("assign", shape=_assign_rule, impl=_assign_impl, writes_input=True, nondiff=True,
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
