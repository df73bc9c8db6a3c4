"""Collectives over trees of arrays, named as torch.distributed names them.

A tree is anything avalon.tree flattens: a single array, a gradient structure
as avalon.grad returns it, a model.  Its arrays are packed into one contiguous
buffer per (device, dtype) and each buffer goes through one collective, so a
model of a hundred parameters costs one message, not a hundred.
"""
from __future__ import annotations

import numpy as np

from .. import tree
from ..backends import backend_of
from . import _world
from .backends import REDUCE_OPS, DistributedError
from .ops import all_reduce_value


def _groups(leaves):
    """Leaf indices grouped by (array type, dtype): one buffer each, in first-seen order."""
    groups: dict = {}
    for k, x in enumerate(leaves):
        groups.setdefault((type(x), np.dtype(x.dtype)), []).append(k)
    return groups.values()


def pack(arrays):
    """One contiguous 1-D buffer holding `arrays` one after the other (a copy)."""
    xp = backend_of(arrays[0]).xp
    return xp.concatenate([xp.ravel(a) for a in arrays]) if len(arrays) > 1 else xp.array(
        arrays[0], copy=True).ravel()


def unpack(buf, like):
    """Views of `buf` with the shapes of `like`."""
    out, start = [], 0
    for a in like:
        stop = start + int(np.prod(a.shape, dtype=np.int64))
        out.append(buf[start:stop].reshape(a.shape))
        start = stop
    return out


def _check_op(op, dtype):
    if op not in REDUCE_OPS:
        raise ValueError(f"all_reduce: op must be one of {', '.join(map(repr, REDUCE_OPS))}, not {op!r}")
    if op == "mean" and dtype.kind not in "fc":
        raise DistributedError(f"all_reduce(op='mean') of {dtype.name} arrays: a mean of integers is not an "
                               "integer; cast them to a float dtype first, or use op='sum'")


def all_reduce(obj, op="sum"):
    """Every rank's `obj` combined elementwise (op: "sum", "mean" or "max"),
    returned with obj's structure (new arrays; obj is unchanged).  Inside a
    traced function (avalon.grad, avalon.jit) it records the differentiable
    process_all_reduce op instead (sum and mean)."""
    leaves, treedef = tree.flatten(obj, is_leaf=_traced)
    for x in leaves:
        _check_op(op, np.dtype(x.dtype))
    if any(_traced(x) for x in leaves):
        return tree.unflatten(treedef, [all_reduce_value(x, op) for x in leaves])
    out = list(leaves)
    for idx in _groups(leaves):
        arrays = [leaves[k] for k in idx]
        buf = pack(arrays)
        _world.backend_for_arrays([buf]).all_reduce_(buf, op)
        for k, view in zip(idx, unpack(buf, arrays)):
            out[k] = view
    return tree.unflatten(treedef, out)


def broadcast(obj, src=0):
    """Rank `src`'s arrays copied into every rank's `obj`, in place (a model's
    parameters are updated where they live, as torch.distributed.broadcast
    does); returns obj.  Every rank must pass the same structure."""
    _check_src(src)
    leaves, _ = tree.flatten(obj)
    for idx in _groups(leaves):
        arrays = [leaves[k] for k in idx]
        buf = pack(arrays)
        _world.backend_for_arrays([buf]).broadcast_(buf, src)
        for a, view in zip(arrays, unpack(buf, arrays)):
            a[...] = view
    return obj


def all_gather(array):
    """Every rank's `array`, as a list indexed by rank (torch.distributed's
    all_gather fills such a list).  The arrays must have the same shape and
    dtype on every rank: checked first, and an error names the ranks that differ."""
    backend = _world.backend_for_arrays([array])
    _check_same_signature(array)
    return backend.all_gather(backend_of(array).xp.ascontiguousarray(array))


def _check_same_signature(array):
    host = _world.host()
    if host.size == 1:
        return
    header = np.full(10, -1, np.int64)
    header[0], header[1] = array.ndim, np.dtype(array.dtype).num
    header[2:2 + min(array.ndim, 8)] = array.shape[:8]
    headers = host.all_gather(header)
    differ = [r for r, h in enumerate(headers) if not np.array_equal(h, headers[0])]
    if differ:
        raise DistributedError(f"all_gather: rank {host.rank} has a {np.dtype(array.dtype).name} array of shape "
                               f"{tuple(array.shape)}; ranks {differ} hold arrays of another shape or dtype "
                               "than rank 0's: every rank must pass the same shape and dtype")


def barrier():
    """Wait until every rank gets here."""
    _world.host().barrier()


def broadcast_object(obj, src=0):
    """A picklable Python object from rank `src` to every rank."""
    _check_src(src)
    return _world.host().broadcast_object(obj, src)


def _check_src(src):
    size = _world.world_size()
    if not isinstance(src, (int, np.integer)) or not 0 <= src < size:
        raise ValueError(f"src must be a rank in 0..{size - 1}, not {src!r}")


def _traced(x) -> bool:
    from ..primitive import Tracer
    return isinstance(x, Tracer)
