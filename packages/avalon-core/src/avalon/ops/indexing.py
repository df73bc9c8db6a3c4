"""Indexing primitives: getitem (basic and advanced indexing), concatenate,
pad, take_along_axis, check_index; and stack, split, take, gather, one_hot,
torch's index_select, scatter_add and masked_fill built on them.

Index arrays are graph inputs, never attributes: a concrete NumPy index array
becomes a constant of the graph, a traced integer array (labels) an ordinary
operand, so `logits[np.arange(n), labels]` traces.  The static part of an
index is kept in the attribute `index`, normalized to one entry per indexed
axis (Ellipsis expanded, negative ints and slice bounds resolved):

    ("int", i)                   an integer, 0 <= i < size
    ("slice", start, stop, step) range(start, stop, step) over the axis
    ("new",)                     None / np.newaxis
    ("arr",)                     the next index array operand

Boolean masks must be concrete (their nonzero() positions become integer index
arrays: the result shape depends on the mask's values).  The VJPs scatter-add
the cotangent back (`getitem_grad`, `take_along_axis_grad`), accumulating over
repeated indices; a backend may override them with kernels of its own
(`k_getitem_grad`, `k_take_along_axis_grad`); a sum of getitem_grad of static
slices of one array becomes one `scatter_slices` (avalon.passes.sums).  scatter_add is that same
scatter (`take_along_axis_grad`) added to its input.  `check_index` range-checks
an index array where the kernel runs, so torch-style ops (no negative indices)
raise for a bad traced index inside compiled code too.

Batching (avalon.vmap): the ops along an axis shift it past the batch axis
(`shifted_axis_rule`); getitem and getitem_grad batch their index arrays too
(see the block before getitem's registration).
"""
from __future__ import annotations

import functools
import hashlib
import math

import numpy as np

from ..errors import AvalonError, ConcretizationError, DtypeError, MissingRuleError, ShapeError, at, user_location
from ..primitive import Tracer, bind, defprim
from ._batching import NOT_MAPPED, batch_size, broadcast_batch, move_to_front, shifted_axis_rule
from ._rules import broadcast_shapes, result_dtype
from ._layout import POINTWISE
from ._sharding import P, R, S, NeedsReduce, NoSplit, first_partial, on_sharded, pointwise

__all__ = ["getitem", "concatenate", "stack", "split", "pad", "take", "take_along_axis", "gather",
           "one_hot",
           # torch's index ops and their bounds check
           "check_index", "index_select", "scatter_add", "masked_fill"]


def _located(fn):
    """Errors raised by a public op name the user's line, as bind's do."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AvalonError as e:
            loc = user_location()
            if "(at " in str(e) or not loc:
                raise
            raise type(e)(f"{e}{at(loc)}") from None
    return wrapper


class _Aval:
    """A shape and dtype standing in for an array in shape rules."""
    __slots__ = ("shape", "dtype")

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)


def _is_array_like(a) -> bool:
    return isinstance(a, Tracer) or (hasattr(a, "shape") and hasattr(a, "dtype"))


def _on_backend_of(a, ref):
    """A concrete NumPy operand moved to the device of eager array `ref` (inside
    a trace it stays NumPy and becomes a graph constant)."""
    if type(a) is not np.ndarray or isinstance(ref, Tracer) or not _is_array_like(ref) or type(ref) is np.ndarray:
        return a
    from ..backends import backend_of
    b = backend_of(ref)
    return a if backend_of(a) is b else b.asarray(a)


def _host(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    from ..backends import backend_of
    return np.asarray(backend_of(a).to_host(a))


def _check_int_index(opname, dtype):
    if np.dtype(dtype).kind not in "iu":
        raise DtypeError(f"{opname}: index arrays must have an integer dtype, got {np.dtype(dtype).name}")


# -- the index: parsing and normalization --------------------------------------------------

def _slice_entry(s: slice, n: int):
    start, stop, step = s.indices(n)  # raises ValueError for step 0
    if len(range(start, stop, step)) == 0:
        return ("slice", 0, 0, 1)
    return ("slice", start, stop, step)


def _is_full(e, n) -> bool:
    return e[0] == "slice" and e[1:] == (0, n, 1)


def _classify(obj, shape):
    """One item of a user index -> (kind, payload); kinds: new, ellipsis, slice,
    int, arr (integer array, concrete or traced), mask (concrete bool array)."""
    if obj is None:
        return "new", None
    if obj is Ellipsis:
        return "ellipsis", None
    if isinstance(obj, slice):
        return "slice", obj
    if isinstance(obj, (bool, np.bool_)):
        raise AvalonError(f"getitem: a bare boolean index ({obj!r}) is not supported (array of shape "
                          f"{tuple(shape)}); use a boolean array mask or None")
    if isinstance(obj, (int, np.integer)):
        return "int", int(obj)
    if isinstance(obj, Tracer):
        kind = np.dtype(obj.dtype).kind
        if kind == "b":
            raise ConcretizationError(
                f"getitem: indexing with a traced boolean mask{at(user_location())} would give a result whose "
                "shape depends on the mask's values; use avalon.where(mask, x, 0) instead, or pass the mask as "
                "a concrete NumPy array")
        _check_int_index("getitem", obj.dtype)
        return "arr", obj
    if not _is_array_like(obj):
        if isinstance(obj, (list, tuple)) and any(isinstance(v, Tracer) for v in obj):
            raise AvalonError("getitem: a list index may not contain traced values; use avalon.stack(...) "
                              "to build a traced index array")
        obj = np.asarray(obj)
        if obj.size == 0 and obj.dtype.kind == "f":  # x[[]]
            obj = obj.astype(np.intp)
    kind = np.dtype(obj.dtype).kind
    if kind == "b":
        mask = _host(obj)
        if mask.ndim == 0:
            raise AvalonError(f"getitem: a 0-d boolean index is not supported (array of shape {tuple(shape)})")
        return "mask", mask
    if kind not in "iu":
        raise DtypeError(f"getitem: only integers, slices, None, Ellipsis and integer or boolean arrays are "
                         f"valid indices; got an array of dtype {np.dtype(obj.dtype).name}")
    if len(obj.shape) == 0:
        return "int", int(_host(obj))
    return "arr", obj


def _normalize_index(shape, index):
    """A user index -> (entries, index arrays); see the module docstring."""
    shape = tuple(shape)
    items = [_classify(obj, shape) for obj in (index if isinstance(index, tuple) else (index,))]
    if sum(k == "ellipsis" for k, _ in items) > 1:
        raise ShapeError(f"getitem: an index can only have a single Ellipsis (...); array of shape {shape}")
    used = sum(p.ndim if k == "mask" else (k in ("int", "slice", "arr")) for k, p in items)
    if used > len(shape):
        raise ShapeError(f"getitem: too many indices for an array of shape {shape}: {used} axes indexed, "
                         f"but it has {len(shape)}")
    entries, arrays, full = [], [], []
    d = 0
    for kind, p in items:
        if kind == "new":
            entries.append(("new",))
            full.append(False)
        elif kind == "ellipsis":
            for _ in range(len(shape) - used):
                entries.append(("slice", 0, shape[d], 1))
                full.append(True)
                d += 1
        elif kind == "slice":
            e = _slice_entry(p, shape[d])
            entries.append(e)
            full.append(_is_full(e, shape[d]))
            d += 1
        elif kind == "int":
            n = shape[d]
            if not -n <= p < n:
                raise ShapeError(f"getitem: index {p} is out of range for axis {d} with size {n} "
                                 f"(array of shape {shape})")
            entries.append(("int", p % n))
            full.append(False)
            d += 1
        elif kind == "arr":
            if isinstance(p, np.ndarray) and p.size:
                lo, hi = int(p.min()), int(p.max())
                if lo < -shape[d] or hi >= shape[d]:
                    bad = lo if lo < -shape[d] else hi
                    raise ShapeError(f"getitem: index {bad} is out of range for axis {d} with size {shape[d]} "
                                     f"(array of shape {shape})")
            entries.append(("arr",))
            full.append(False)
            arrays.append(p)
            d += 1
        else:  # mask
            k = p.ndim
            if p.shape != shape[d:d + k]:
                raise ShapeError(f"getitem: boolean index of shape {p.shape} does not match axes {d}..{d + k - 1} "
                                 f"of an array of shape {shape}")
            for nz in p.nonzero():
                entries.append(("arr",))
                full.append(False)
                arrays.append(nz)
            d += k
    while entries and full[-1]:  # x[i, :, :] is x[i]
        entries.pop()
        full.pop()
    return tuple(entries), arrays


def _build_index(index, arrays):
    """Normalized entries and index arrays -> a Python index tuple for xp."""
    it = iter(arrays)
    out = []
    for e in index:
        k = e[0]
        if k == "int":
            out.append(e[1])
        elif k == "slice":
            start, stop, step = e[1:]
            out.append(slice(start, None if stop < 0 else stop, step))
        elif k == "new":
            out.append(None)
        else:
            out.append(next(it))
    return tuple(out)


# -- getitem ---------------------------------------------------------------------------

def _getitem_rule(x, *arrays, index):
    shape = tuple(x.shape)
    advanced = any(e[0] == "arr" for e in index)
    out, adv_pos, adv_shapes = [], [], []
    insert_at = None
    d = k = 0
    for pos, e in enumerate(index):
        kind = e[0]
        if kind == "new":
            out.append(1)
            continue
        if d >= len(shape):
            raise ShapeError(f"getitem: too many indices for an array of shape {shape}")
        n = shape[d]
        if kind == "slice":
            out.append(len(range(*e[1:])))
        else:
            if kind == "int":
                if not 0 <= e[1] < n:
                    raise ShapeError(f"getitem: index {e[1]} is out of range for axis {d} with size {n} "
                                     f"(array of shape {shape})")
                ishape = ()
            elif kind == "arr":
                if k >= len(arrays):
                    raise ShapeError(f"getitem: the index needs more than the {len(arrays)} index arrays given")
                _check_int_index("getitem", arrays[k].dtype)
                ishape = tuple(arrays[k].shape)
                k += 1
            else:
                raise ShapeError(f"getitem: bad index entry {e!r}")
            if advanced:
                if insert_at is None:
                    insert_at = len(out)
                adv_pos.append(pos)
                adv_shapes.append(ishape)
        d += 1
    if k != len(arrays):
        raise ShapeError(f"getitem: {len(arrays)} index arrays given, the index uses {k}")
    out.extend(shape[d:])
    if advanced:
        bshape = broadcast_shapes("getitem: index arrays", *adv_shapes)
        if adv_pos[-1] - adv_pos[0] + 1 != len(adv_pos):
            insert_at = 0  # advanced indices split by a slice or None: their axes go first (NumPy's rule)
        out[insert_at:insert_at] = bshape
    return tuple(out), x.dtype


def _getitem_impl(xp, x, *arrays, index):
    return x[_build_index(index, arrays)]


# batching (avalon.vmap): getitem and getitem_grad on a batch of examples.  Without a
# mapped index array the batch axis is one more full slice in front; with one, the
# index gets an advanced index of its own, arange(batch), in front, each index array
# its batch axis in front (size 1 when unmapped), and the result's axes are put back
# in the order one example's result has (NumPy moves advanced axes to the front when
# other entries separate them).

def _index_layout(index, arrays, adims):
    """For one example: (advanced, split, n_pre, n_adv): whether the index has
    advanced entries, whether they are separated (their axes then come first),
    the result axes before them, and how many axes they give (the arrays are
    batched as adims says)."""
    advanced = any(e[0] == "arr" for e in index)
    if not advanced:
        return False, False, 0, 0
    pos = [k for k, e in enumerate(index) if e[0] in ("int", "arr")]
    split = pos[-1] - pos[0] + 1 != len(pos)
    n_pre = sum(e[0] in ("slice", "new") for e in index[:pos[0]])
    n_adv = max((len(a.shape) - (d is not NOT_MAPPED) for a, d in zip(arrays, adims)), default=0)
    return True, split, n_pre, n_adv


def _reshaped(a, shape):
    from .shape import reshape
    return a.reshape(shape) if type(a) is np.ndarray else reshape(a, shape)


def _batched_index(index, arrays, adims, size, n_adv):
    """The index of a batch whose examples have their own index arrays: an
    arange(size) index in front, every index array batched at axis 0 and
    padded to n_adv example axes, so they broadcast to (size,) + one example's."""
    out = [_reshaped(np.arange(size, dtype=np.int64), (size,) + (1,) * n_adv)]
    for a, d in zip(arrays, adims):
        if d is NOT_MAPPED:
            out.append(_reshaped(a, (1,) * (1 + n_adv - len(a.shape)) + tuple(a.shape)))
        else:
            a = move_to_front(a, d)
            ex = tuple(a.shape[1:])
            out.append(_reshaped(a, (int(a.shape[0]),) + (1,) * (n_adv - len(ex)) + ex))
    return (("arr",),) + tuple(index), out


def _batch_first_layout(index, arrays, adims, size):
    """(index, arrays, perm) for indexing an array batched at axis 0 so that
    transpose(x[index], perm) is the batch (axis 0) of the examples' results;
    perm is None when no transpose is needed."""
    advanced, split, n_pre, n_adv = _index_layout(index, arrays, adims)
    if all(d is NOT_MAPPED for d in adims):
        index = (("slice", 0, size, 1),) + tuple(index)
        if advanced and split:  # the advanced axes come first, the batch after them
            return index, list(arrays), (n_adv,) + tuple(range(n_adv)), n_adv
        return index, list(arrays), None, 0
    index, arrays = _batched_index(index, arrays, adims, size, n_adv)
    if split or n_pre == 0:
        return index, arrays, None, 0
    # one example's advanced axes sat after n_pre axes; now they come first, after the batch
    perm = (0,) + tuple(range(1 + n_adv, 1 + n_adv + n_pre)) + tuple(range(1, 1 + n_adv))
    return index, arrays, perm, n_pre


def _full_perm(perm, ndim):
    return tuple(perm) + tuple(range(len(perm), ndim))


def _getitem_batch(args, dims, *, index):
    from .shape import transpose
    (x, *arrays), (xd, *adims) = args, dims
    size = batch_size(args, dims)
    if xd is NOT_MAPPED:  # the index arrays carry the batch: index x with them
        _, split, n_pre, n_adv = _index_layout(index, arrays, adims)
        idx, arrays = _batched_index(index, arrays, adims, size, n_adv)
        out = bind(getitem_p, (x, *arrays[1:]), {"index": idx[1:]})
        return out, (0 if split else n_pre)
    idx, arrays, perm, _ = _batch_first_layout(index, arrays, adims, size)
    out = bind(getitem_p, (move_to_front(x, xd), *arrays), {"index": idx})
    if perm is None:
        return out, 0
    return transpose(out, *_full_perm(perm, len(out.shape))), 0


def _getitem_grad_batch(args, dims, *, index, shape):
    from .shape import transpose
    (g, *arrays), (gd, *adims) = args, dims
    size = batch_size(args, dims)
    idx, arrays, perm, _ = _batch_first_layout(index, arrays, adims, size)
    g = broadcast_batch(g, gd, size)
    if perm is not None:  # g in the order x[idx] gives, the inverse of perm
        full = _full_perm(perm, len(g.shape))
        g = transpose(g, *np.argsort(full).tolist())
    return bind(getitem_grad_p, (g, *arrays), {"index": idx, "shape": (size,) + tuple(shape)}), 0


def _getitem_vjp(g, out, x, *arrays, index):
    gx = bind(getitem_grad_p, (g, *arrays), {"index": index, "shape": tuple(x.shape)})
    return (gx,) + (None,) * len(arrays)


# sharding (a batch split across threads, avalon.passes.sharding): a basic index
# that takes the batch axis whole (a full slice, or no entry) keeps the batch on
# the result's matching axis; in a shard graph that entry is the shard's full
# slice (shard attrs).  Ints and partial slices of the batch axis, and index
# arrays, leave the step unsplit.  Partial sums pass through: indexing is linear.

def _index_axes(index, ndim):
    """[(input axis, result axis or None for an int, position in index or None)]
    of a basic index of an array of rank ndim."""
    axes, d, o = [], 0, 0
    for pos, e in enumerate(index):
        if e[0] == "new":
            o += 1
            continue
        axes.append((d, None if e[0] == "int" else o, pos))
        d += 1
        o += e[0] != "int"
    for dd in range(d, ndim):
        axes.append((dd, o, None))
        o += 1
    return axes


def _takes_whole(index, pos, size) -> bool:
    return pos is None or _is_full(index[pos], size)


def _with_whole(index, pos, size):
    """index with entry `pos` the full slice of an axis of `size` (a shard's)."""
    if pos is None:
        return tuple(index)
    return tuple(index[:pos]) + (("slice", 0, size, 1),) + tuple(index[pos + 1:])


def _getitem_sharding(node, states, ctx):
    (s, *rest), index, x = states, node.attrs["index"], node.inputs[0]
    if rest or not _basic_index(index):
        raise NoSplit("getitem by index arrays")
    if s == P:
        return P
    for d, o, pos in _index_axes(index, x.ndim):
        if d == s[1]:
            if o is None or not _takes_whole(index, pos, x.shape[d]):
                raise NoSplit("getitem indexes into the batch axis")
            return S(o, s[2])
    raise NoSplit("getitem: the batch axis is not indexed")  # pragma: no cover - every axis is listed


def _getitem_shard_attrs(node, full_shape, axis):
    index = node.attrs["index"]
    for d, o, pos in _index_axes(index, node.inputs[0].ndim):
        if o == axis:
            return dict(node.attrs, index=_with_whole(index, pos, node.shape[axis]))
    return node.attrs


def _getitem_strided(node):
    """strided_view rule: a basic index is an offset and a stride per result axis
    (0 for a new axis) over the input's C order; index arrays are not."""
    index = node.attrs["index"]
    if len(node.inputs) != 1 or not _basic_index(index):
        return None
    shape = node.inputs[0].shape
    c_strides = [int(math.prod(shape[d + 1:])) for d in range(len(shape))]
    offset, strides, d = 0, [], 0
    for e in index:
        if e[0] == "new":
            strides.append(0)
            continue
        offset += e[1] * c_strides[d]
        if e[0] == "slice":
            strides.append(e[3] * c_strides[d])
        d += 1
    return offset, tuple(strides) + tuple(c_strides[d:])


getitem_p = defprim("getitem", shape=_getitem_rule, impl=_getitem_impl, view=True, vjp=_getitem_vjp,
                    batching=_getitem_batch, strided_view=_getitem_strided,
                    sharding=on_sharded(_getitem_sharding, reads_partials=True), shard_attrs=_getitem_shard_attrs,
                    doc="x[index]: basic indexing (a view) and advanced indexing by integer arrays.")


def _getitem_grad_rule(g, *arrays, index, shape):
    expect, _ = _getitem_rule(_Aval(shape, g.dtype), *arrays, index=index)
    if tuple(g.shape) != expect:
        raise ShapeError(f"getitem_grad: cotangent of shape {tuple(g.shape)} does not fit an index of an array "
                         f"of shape {tuple(shape)}, which gives shape {expect}")
    return tuple(shape), g.dtype


def _scatter_add(xp, z, index, values):
    """z[index] += values, accumulating over repeated indices: NumPy's add.at
    (CuPy >= 12 has it too); for an array module without ufunc.at, the flat
    positions of the indexed elements summed with bincount."""
    at_ = getattr(xp.add, "at", None)
    if at_ is not None:
        at_(z, index, values)
        return
    pos = xp.arange(z.size).reshape(z.shape)[index]
    vals = xp.broadcast_to(values, pos.shape)
    sums = xp.bincount(pos.reshape(-1), weights=vals.reshape(-1), minlength=z.size)
    z += sums.reshape(z.shape).astype(z.dtype)


def _getitem_grad_impl(xp, g, *arrays, index, shape, out=None):
    if out is None:
        out = xp.zeros(shape, dtype=g.dtype)
    else:
        out.fill(0)
    idx = _build_index(index, arrays)
    if arrays:
        _scatter_add(xp, out, idx, g)
    else:
        out[idx] = g  # basic indices never repeat an element
    return out


def _getitem_grad_vjp(ct, out, g, *arrays, index, shape):
    return (bind(getitem_p, (ct, *arrays), {"index": index}),) + (None,) * len(arrays)


# -- scatter_slices: one buffer holding several gradients of basic slices -------------------------
# A value read through many static slices (an RNN's per-step input projection
# x_proj[t], the gates split out of one matrix) gets one getitem_grad per read:
# each a zero array of the full shape with its slice written, then summed.
# `merge_sums` (avalon.passes.sums) turns such a sum into one scatter_slices
# node through the `merge_sum` rule below: zeros once (none when the slices
# tile the array), each piece written in place (added where slices overlap).

def _basic_index(index) -> bool:
    return all(e[0] in ("int", "slice", "new") for e in index)


def _scatter_slices_rule(*values, shape, indices):
    if not values or len(values) != len(indices):
        raise ShapeError(f"scatter_slices: {len(values)} values for {len(indices)} indices; give one index "
                         "per value (and at least one)")
    dtypes = {np.dtype(v.dtype) for v in values}
    if len(dtypes) > 1:
        raise DtypeError(f"scatter_slices: values of different dtypes {sorted(d.name for d in dtypes)}")
    dtype = dtypes.pop()
    for k, (v, index) in enumerate(zip(values, indices)):
        if not _basic_index(index):
            raise ShapeError(f"scatter_slices: index {k} ({index!r}) is not a basic index (ints, slices, None)")
        expect, _ = _getitem_rule(_Aval(shape, dtype), index=index)
        if tuple(v.shape) != expect:
            raise ShapeError(f"scatter_slices: value {k} has shape {tuple(v.shape)}, but index {index!r} of an "
                             f"array of shape {tuple(shape)} selects shape {expect}")
    return tuple(shape), dtype


def _axis_ranges(index, shape):
    """The positions a basic index selects on each axis of `shape`, as ranges."""
    ranges = [range(e[1], e[1] + 1) if e[0] == "int" else range(*e[1:]) for e in index if e[0] != "new"]
    return ranges + [range(n) for n in shape[len(ranges):]]


def _ranges_meet(a, b) -> bool:
    if not a or not b:
        return False
    if a.step == b.step == 1:
        return a.start < b.stop and b.start < a.stop
    return not set(a).isdisjoint(b)


@functools.lru_cache(maxsize=512)
def _scatter_plan(shape, indices):
    """(whether the buffer must be zeroed first, per piece whether it overlaps an
    earlier one and so must be added rather than written).  No zeroing when the
    pieces are disjoint and together cover every element."""
    ranges = [_axis_ranges(index, shape) for index in indices]
    adds = tuple(any(all(_ranges_meet(a, b) for a, b in zip(r, q)) for q in ranges[:k])
                 for k, r in enumerate(ranges))
    covered = sum(int(math.prod([len(a) for a in r])) for r in ranges)
    tiles = not any(adds) and covered == int(math.prod(shape))
    return not tiles, adds


@functools.lru_cache(maxsize=512)
def _scatter_steps(shape, indices):
    """_scatter_plan with each piece's Python index: (zero, ((index, add), ...))."""
    zero, adds = _scatter_plan(shape, indices)
    return zero, tuple((_build_index(index, ()), add) for index, add in zip(indices, adds))


def _scatter_slices_impl(xp, *values, shape, indices, out=None):
    zero, steps = _scatter_steps(tuple(shape), tuple(indices))
    if out is None:
        out = (xp.zeros if zero else xp.empty)(shape, dtype=values[0].dtype)
    elif zero:
        out.fill(0)
    for v, (where, add) in zip(values, steps):
        if add:
            out[where] += v
        else:
            out[where] = v
    return out


def _scatter_slices_vjp(ct, out, *values, shape, indices):
    return tuple(bind(getitem_p, (ct,), {"index": index}) if index else ct for index in indices)


def _scatter_slices_batch(args, dims, *, shape, indices):
    size = batch_size(args, dims)
    values = [broadcast_batch(v, d, size) for v, d in zip(args, dims)]
    whole = ("slice", 0, size, 1)
    return bind(scatter_slices_p, values, {"shape": (size,) + tuple(shape),
                                           "indices": tuple((whole,) + tuple(ix) for ix in indices)}), 0


def _placed_axis(index, shape, o, what):
    """The axis of `shape` that a basic index places whole at result axis o."""
    for d, out, pos in _index_axes(index, len(shape)):
        if out == o:
            if not _takes_whole(index, pos, shape[d]):
                raise NoSplit(f"{what} places values into part of the batch axis")
            return d
    raise NoSplit(f"{what}: the batch axis is dropped")  # pragma: no cover - o is a result axis


def _scatter_slices_sharding(node, states, ctx):
    if P in states:
        if any(st != P for st in states):
            raise NeedsReduce(first_partial(node, states))
        return P
    if R in states:
        raise NoSplit("scatter_slices of sharded and replicated values")
    axes = {(_placed_axis(ix, node.shape, st[1], "scatter_slices"), st[2])
            for ix, st in zip(node.attrs["indices"], states)}
    if len(axes) != 1:
        raise NoSplit("scatter_slices of values sharded on different axes")
    return S(*axes.pop())


def _scatter_slices_shard_attrs(node, full_shape, axis):
    indices = []
    for index in node.attrs["indices"]:
        pos = next(p for d, _, p in _index_axes(index, node.ndim) if d == axis)
        indices.append(_with_whole(index, pos, node.shape[axis]))
    return dict(node.attrs, shape=node.shape, indices=tuple(indices))


def _getitem_grad_sharding(node, states, ctx):
    (s, *rest), index = states, node.attrs["index"]
    if rest or not _basic_index(index):
        raise NoSplit("getitem_grad by index arrays")
    if s == P:
        return P
    return S(_placed_axis(index, node.shape, s[1], "getitem_grad"), s[2])


def _getitem_grad_shard_attrs(node, full_shape, axis):
    index = node.attrs["index"]
    pos = next(p for d, _, p in _index_axes(index, node.ndim) if d == axis)
    return dict(node.attrs, shape=node.shape, index=_with_whole(index, pos, node.shape[axis]))


def _placed_pieces(node):
    """[(value node, basic index)] when `node` is zeros of its shape with each
    value added at its index (getitem_grad by a basic index, scatter_slices), else None."""
    if node.op == "scatter_slices":
        return list(zip(node.inputs, node.attrs["indices"]))
    if node.op == "getitem_grad" and len(node.inputs) == 1 and _basic_index(node.attrs["index"]):
        return [(node.inputs[0], node.attrs["index"])]
    return None


def _merge_slice_sum(nodes):
    """merge_sum rule of getitem_grad and scatter_slices: a sum of several of
    them (same shape and dtype) is one scatter_slices of all their pieces."""
    from ..graph import Node
    used, pieces = [], []
    for n in nodes:
        p = _placed_pieces(n)
        if p is not None:
            used.append(n)
            pieces += p
    if len(used) < 2:
        return None
    first = used[0]
    merged = Node("scatter_slices", [v for v, _ in pieces],
                  {"shape": first.shape, "indices": tuple(tuple(ix) for _, ix in pieces)},
                  first.shape, first.dtype, first.loc)
    return [merged], used


def _scatter_slices_lower(node):
    """The op as one loop-level kernel: zeros where the plan says so, then each value
    written (or added, where it overlaps an earlier one) at its slice, a loop nest per
    value whose innermost loop runs along the slice's last axis.  None for a dtype
    kernels do not compute in."""
    from ..kernel_ir.ir import Buffer, Const, Index, Kernel, Load, Loop, Store, Update, Var, verify
    from ..kernel_ir.lower import Unfusable, kernel_dtype
    shape, indices = tuple(node.attrs["shape"]), tuple(node.attrs["indices"])
    try:
        dtype = kernel_dtype(node.dtype)
    except Unfusable:
        return None
    zero, adds = _scatter_plan(shape, indices)
    size = int(math.prod(shape))
    out = Buffer("out", dtype, size, "out")
    ins = [Buffer(f"in{k}", dtype, int(math.prod(v.shape)), "in") for k, v in enumerate(node.inputs)]
    strides = [int(math.prod(shape[d + 1:])) for d in range(len(shape))]
    stmts = []
    if zero:
        z = Var("z")
        stmts.append(Loop(z, size, (Store(out, Index(((z.name, 1),)), Const(0, dtype)),)))
    for k, (index, add) in enumerate(zip(indices, adds)):
        ranges = _axis_ranges(index, shape)
        lens = [len(r) for r in ranges]
        if 0 in lens:
            continue
        kept = [d for d, n in enumerate(lens) if n > 1]    # axes of length 1 need no loop
        var = {d: Var(f"i{k}_{d}") for d in kept}
        dst = Index(tuple((var[d].name, ranges[d].step * strides[d]) for d in kept),
                    sum(r.start * st for r, st in zip(ranges, strides)))
        src = Index(tuple((var[d].name, int(math.prod(lens[d + 1:]))) for d in kept), 0)
        body = (Update(out, dst, "add", Load(ins[k], src)) if add else Store(out, dst, Load(ins[k], src)),)
        for d in reversed(kept):
            body = (Loop(var[d], lens[d], body),)
        stmts += body
    sig = repr((shape, indices, [tuple(i.shape) for i in node.inputs], dtype.str))
    return verify(Kernel(f"avl_scatter_slices_{hashlib.sha1(sig.encode()).hexdigest()[:12]}", tuple(ins) + (out,),
                         tuple(stmts)))


scatter_slices_p = defprim("scatter_slices", shape=_scatter_slices_rule, impl=_scatter_slices_impl,
                           accepts_out=True, vjp=_scatter_slices_vjp, batching=_scatter_slices_batch,
                           lower=_scatter_slices_lower,
                           merge_sum=_merge_slice_sum,
                           sharding=on_sharded(_scatter_slices_sharding, reads_partials=True),
                           shard_attrs=_scatter_slices_shard_attrs,
                           doc="zeros(shape) with each value added at its basic index (ints, slices, None); "
                               "a sum of getitem_grad of static slices, made by avalon.passes.sums.")


getitem_grad_p = defprim("getitem_grad", shape=_getitem_grad_rule, impl=_getitem_grad_impl, accepts_out=True,
                         vjp=_getitem_grad_vjp, batching=_getitem_grad_batch,
                         merge_sum=_merge_slice_sum,
                         sharding=on_sharded(_getitem_grad_sharding, reads_partials=True),
                         shard_attrs=_getitem_grad_shard_attrs,
                         doc="zeros(shape) with g added at index (repeated indices accumulate): "
                             "the VJP of getitem.")


@_located
def getitem(x, index):
    """x[index] with NumPy semantics: ints, slices (any step), None, Ellipsis,
    integer arrays or lists (concrete or traced) and concrete boolean masks."""
    entries, arrays = _normalize_index(x.shape, index)
    if not entries:
        return x
    if not any(isinstance(a, Tracer) for a in (x, *arrays)):
        arrays = [_on_backend_of(a, x) for a in arrays]
    return bind(getitem_p, (x, *arrays), {"index": entries})


def _axis_slice(ndim, axis, start, stop):
    return (slice(None),) * axis + (slice(start, stop),) + (slice(None),) * (ndim - axis - 1)


def _norm_axis(opname, axis, ndim, shape):
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ShapeError(f"{opname}: axis {axis} is out of range for an array of shape {tuple(shape)}")
    return axis % ndim


# -- concatenate, stack, split ------------------------------------------------------------

def _concat_rule(*xs, axis):
    if not xs:
        raise ShapeError("concatenate: needs at least one array")
    first = tuple(xs[0].shape)
    nd = len(first)
    if nd == 0:
        raise ShapeError("concatenate: zero-dimensional arrays (shape ()) cannot be concatenated")
    if not 0 <= axis < nd:
        raise ShapeError(f"concatenate: axis {axis} is out of range for arrays of shape {first}")
    for x in xs[1:]:
        s = tuple(x.shape)
        if len(s) != nd:
            raise ShapeError(f"concatenate: all arrays must have the same number of dimensions; shapes {first} "
                             f"and {s} differ")
        if any(a != b for i, (a, b) in enumerate(zip(first, s)) if i != axis):
            raise ShapeError(f"concatenate: shapes {first} and {s} differ outside axis {axis}; all sizes but the "
                             "concatenation axis must match")
    dtypes = {np.dtype(x.dtype) for x in xs}
    if len(dtypes) > 1:
        raise DtypeError(f"concatenate: operands have different dtypes {sorted(d.name for d in dtypes)}")
    out = list(first)
    out[axis] = sum(int(x.shape[axis]) for x in xs)
    return tuple(out), np.dtype(xs[0].dtype)


def _concat_impl(xp, *xs, axis, out=None):
    return xp.concatenate(xs, axis=axis, out=out)


def _concat_vjp(g, out, *xs, axis):
    cts, off = [], 0
    for x in xs:
        n = int(x.shape[axis])
        cts.append(getitem(g, _axis_slice(len(x.shape), axis, off, off + n)))
        off += n
    return tuple(cts)


def _concat_sharding(node, states, ctx):
    """Pieces sharded alike give a result sharded so: on another axis, or on
    the joined axis when the batch is each piece's outer factor there (the
    result is [pieces..., batch, stride] merged: the batch stays outermost
    within each piece, as after a reshape)."""
    if P in states or R in states:
        raise NoSplit("concatenate of replicated, partial or differently sharded values")
    if len(set(states)) != 1:
        raise NoSplit("concatenate of values sharded on different axes")
    s = states[0]
    axis = node.attrs["axis"]
    if s[1] == axis and any(x.shape[axis] != ctx.n * s[2] for x in node.inputs):
        raise NoSplit("concatenate along an axis where the batch is not each piece's outer factor")
    return s


def _concat_assembles(node):
    """Byte offsets of the inputs in the output where they are consecutive blocks of
    it (every axis before the joined one of size 1: an RNN's per-step values joined
    along time), else None."""
    axis = node.attrs["axis"]
    if any(int(d) != 1 for d in node.shape[:axis]):
        return None
    offsets, at = [], 0
    for x in node.inputs:
        offsets.append(at)
        at += x.nbytes
    return offsets


concatenate_p = defprim("concatenate", shape=_concat_rule, impl=_concat_impl, accepts_out=True,
                        vjp=_concat_vjp, batching=shifted_axis_rule("concatenate"),
                        sharding=on_sharded(_concat_sharding), assembles=_concat_assembles)


@_located
def concatenate(arrays, axis=0):
    """Join arrays along an existing axis (axis=None: flatten them first)."""
    from .elementwise import cast
    from .shape import reshape
    arrays = list(arrays)
    if not arrays:
        raise ShapeError("concatenate: needs at least one array")
    if axis is None:
        arrays = [reshape(a, (-1,)) for a in arrays]
        axis = 0
    dtype = result_dtype("concatenate", *(a.dtype for a in arrays))
    arrays = [cast(a, dtype) for a in arrays]
    nd = len(arrays[0].shape)
    if nd == 0:
        raise ShapeError("concatenate: zero-dimensional arrays (shape ()) cannot be concatenated")
    axis = _norm_axis("concatenate", axis, nd, arrays[0].shape)
    if len(arrays) == 1:
        _concat_rule(arrays[0], axis=axis)
        return arrays[0]
    traced = any(isinstance(a, Tracer) for a in arrays)
    if not traced:
        ref = next((a for a in arrays if type(a) is not np.ndarray), arrays[0])
        arrays = [_on_backend_of(a, ref) for a in arrays]
    return bind(concatenate_p, arrays, {"axis": axis})


@_located
def stack(arrays, axis=0):
    """Join arrays of one shape along a new axis."""
    from .shape import expand_dims
    arrays = list(arrays)
    if not arrays:
        raise ShapeError("stack: needs at least one array")
    first = tuple(arrays[0].shape)
    for a in arrays[1:]:
        if tuple(a.shape) != first:
            raise ShapeError(f"stack: all arrays must have the same shape; shapes {first} and {tuple(a.shape)} "
                             "differ")
    nd = len(first) + 1
    axis = int(axis)
    if not -nd <= axis < nd:
        raise ShapeError(f"stack: axis {axis} is out of range for stacking arrays of shape {first}")
    axis %= nd
    return concatenate([expand_dims(a, axis) for a in arrays], axis)


@_located
def split(x, indices_or_sections, axis=0):
    """NumPy's split: an int N cuts the axis into N equal parts; a sequence of
    increasing split points cuts it there.  Returns a list."""
    nd = len(x.shape)
    if nd == 0:
        raise ShapeError("split: cannot split a zero-dimensional array")
    axis = _norm_axis("split", axis, nd, x.shape)
    n = int(x.shape[axis])
    if isinstance(indices_or_sections, (int, np.integer)):
        sections = int(indices_or_sections)
        if sections <= 0:
            raise ShapeError(f"split: the number of sections must be positive, got {sections}")
        if n % sections:
            raise ShapeError(f"split: an array of shape {tuple(x.shape)} does not split into {sections} equal "
                             f"sections along axis {axis} (size {n})")
        step = n // sections
        points = [step * k for k in range(1, sections)]
    else:
        points = [int(p) for p in indices_or_sections]
    bounds = [0] + points + [n]
    return [getitem(x, _axis_slice(nd, axis, a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


# -- pad ---------------------------------------------------------------------------------

def _pad_rule(x, *, pad_width, value):
    shape = tuple(x.shape)
    if len(pad_width) != len(shape):
        raise ShapeError(f"pad: pad_width has {len(pad_width)} (before, after) pairs for an array of shape "
                         f"{shape}; give one pair per axis")
    return tuple(s + b + a for s, (b, a) in zip(shape, pad_width)), x.dtype


def _pad_impl(xp, x, *, pad_width, value, out=None):
    shape = tuple(s + b + a for s, (b, a) in zip(x.shape, pad_width))
    if out is None:
        out = xp.empty(shape, dtype=x.dtype)
    inner = tuple(slice(b, b + s) for s, (b, _) in zip(x.shape, pad_width))
    if not isinstance(value, tuple):
        out.fill(value)
    else:
        # per-axis (before, after) values, axis by axis as np.pad: a corner takes the value of its last axis
        for ax, ((b, a), (vb, va)) in enumerate(zip(pad_width, value)):
            lead = (slice(None),) * ax
            rest = inner[ax + 1:]
            out[lead + (slice(0, b),) + rest] = vb
            out[lead + (slice(b + x.shape[ax], None),) + rest] = va
    out[inner] = x
    return out


def _pad_vjp(g, out, x, *, pad_width, value):
    return (getitem(g, tuple(slice(b, b + s) for s, (b, _) in zip(x.shape, pad_width))),)


def _pad_batch(args, dims, *, pad_width, value):
    """No padding along the batch axis (moved to the front); a per-axis value
    gets a pair for it too, never written (its width is 0)."""
    (x,), (d,) = args, dims
    if isinstance(value, tuple):
        value = (value[0],) + value
    return bind(pad_p, (move_to_front(x, d),), {"pad_width": ((0, 0),) + tuple(pad_width), "value": value}), 0


pad_p = defprim("pad", shape=_pad_rule, impl=_pad_impl, accepts_out=True, vjp=_pad_vjp, batching=_pad_batch)


def _as_pairs(opname, value, ndim, what, integral):
    arr = np.asarray(value)
    if arr.dtype == object or arr.ndim > 2:
        raise ShapeError(f"{opname}: {what} must be a number, a (before, after) pair or one pair per axis; "
                         f"got {value!r}")
    try:
        pairs = np.broadcast_to(arr, (ndim, 2))
    except ValueError:
        raise ShapeError(f"{opname}: {what} {value!r} does not fit an array with {ndim} axes; give a number, a "
                         "(before, after) pair or one pair per axis") from None
    if integral:
        if pairs.dtype.kind not in "iu" or (pairs < 0).any():
            raise ShapeError(f"{opname}: {what} must be non-negative integers, got {value!r}")
        return tuple((int(b), int(a)) for b, a in pairs)
    return tuple((b.item(), a.item()) for b, a in pairs)


@_located
def pad(x, pad_width, mode="constant", constant_values=0, **kwargs):
    """np.pad in "constant" mode: pad_width is an int, a (before, after) pair, or
    one pair per axis; constant_values likewise (a number or pairs)."""
    if mode != "constant":
        raise MissingRuleError(f"pad: mode={mode!r} is not supported; only mode='constant' is (pad with "
                               "constant_values=...)")
    if kwargs:
        raise AvalonError(f"pad: unexpected arguments {sorted(kwargs)} for mode='constant'")
    if _is_array_like(constant_values):
        raise AvalonError("pad: constant_values must be static numbers, not arrays")
    nd = len(x.shape)
    widths = _as_pairs("pad", pad_width, nd, "pad_width", integral=True)
    values = _as_pairs("pad", constant_values, nd, "constant_values", integral=False) if nd else ()
    flat = {v for pair in values for v in pair}
    value = flat.pop() if len(flat) == 1 else (values or 0)
    if all(w == (0, 0) for w in widths):
        return x
    return bind(pad_p, (x,), {"pad_width": widths, "value": value})


# -- take_along_axis, gather, take -----------------------------------------------------------

def _tala_shape(opname, xshape, ishape, axis):
    xshape, ishape = tuple(xshape), tuple(ishape)
    if len(xshape) != len(ishape):
        raise ShapeError(f"{opname}: indices of shape {ishape} must have as many dimensions as the array of "
                         f"shape {xshape}")
    if not 0 <= axis < len(xshape):
        raise ShapeError(f"{opname}: axis {axis} is out of range for an array of shape {xshape}")
    out = []
    for d, (a, b) in enumerate(zip(xshape, ishape)):
        if d == axis:
            out.append(b)
        elif a == b or b == 1 or a == 1:
            out.append(a if b == 1 else b)
        else:
            raise ShapeError(f"{opname}: indices of shape {ishape} do not broadcast against the array of shape "
                             f"{xshape} outside axis {axis}")
    return tuple(out)


def _tala_rule(x, idx, *, axis):
    _check_int_index("take_along_axis", idx.dtype)
    return _tala_shape("take_along_axis", x.shape, idx.shape, axis), x.dtype


def _tala_impl(xp, x, idx, *, axis):
    return xp.take_along_axis(x, idx, axis=axis)


def _tala_vjp(g, out, x, idx, *, axis):
    return bind(tala_grad_p, (g, idx), {"axis": axis, "shape": tuple(x.shape)}), None


def _off_the_batch_axis(node, states, ctx):
    """Values and indices sharded alike, gathered (or scattered) along another axis."""
    if states[0] == states[1] and states[0] != P and node.attrs["axis"] != states[0][1]:
        return states[0]
    raise NoSplit(f"{node.op} along the batch axis")


take_along_axis_p = defprim("take_along_axis", shape=_tala_rule, impl=_tala_impl, vjp=_tala_vjp,
                            sharding=on_sharded(_off_the_batch_axis), batching=shifted_axis_rule("take_along_axis"))


def _tala_grad_rule(g, idx, *, axis, shape):
    _check_int_index("take_along_axis_grad", idx.dtype)
    expect = _tala_shape("take_along_axis_grad", shape, idx.shape, axis)
    if tuple(g.shape) != expect:
        raise ShapeError(f"take_along_axis_grad: cotangent of shape {tuple(g.shape)} does not match indices of "
                         f"shape {tuple(idx.shape)} into an array of shape {tuple(shape)}")
    return tuple(shape), g.dtype


def _tala_grad_impl(xp, g, idx, *, axis, shape, out=None):
    if out is None:
        out = xp.zeros(shape, dtype=g.dtype)
    else:
        out.fill(0)
    nd = len(shape)
    index = tuple(idx if d == axis else xp.arange(shape[d]).reshape((1,) * d + (-1,) + (1,) * (nd - d - 1))
                  for d in range(nd))
    _scatter_add(xp, out, index, g)
    return out


def _tala_grad_vjp(ct, out, g, idx, *, axis, shape):
    return bind(take_along_axis_p, (ct, idx), {"axis": axis}), None


tala_grad_p = defprim("take_along_axis_grad", shape=_tala_grad_rule, impl=_tala_grad_impl, accepts_out=True,
                      vjp=_tala_grad_vjp, output_shape_attr="shape", sharding=on_sharded(_off_the_batch_axis),
                      batching=shifted_axis_rule("take_along_axis_grad", shape_attr="shape"),
                      doc="zeros(shape) with g added at take_along_axis's positions (repeats accumulate).")


def _concrete_index_array(opname, idx, axis_size, shape):
    """Validate a concrete index array (dtype, bounds); lists become arrays."""
    if isinstance(idx, Tracer):
        _check_int_index(opname, idx.dtype)
        return idx
    if not _is_array_like(idx):
        idx = np.asarray(idx)
        if idx.size == 0:
            idx = idx.astype(np.intp)
    _check_int_index(opname, idx.dtype)
    if isinstance(idx, np.ndarray) and idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -axis_size or hi >= axis_size:
            bad = lo if lo < -axis_size else hi
            raise ShapeError(f"{opname}: index {bad} is out of range for an axis of size {axis_size} "
                             f"(array of shape {tuple(shape)})")
    return idx


@_located
def take_along_axis(x, indices, axis=-1):
    """np.take_along_axis: out[..., i, ...] = x[..., indices[..., i, ...], ...]
    along `axis` (None: of the flattened array); indices may be traced."""
    from .shape import reshape
    if axis is None:
        x = reshape(x, (-1,))
        axis = 0
    nd = len(x.shape)
    if nd == 0:
        raise ShapeError("take_along_axis: x must have at least one dimension (got shape ())")
    axis = _norm_axis("take_along_axis", axis, nd, x.shape)
    indices = _concrete_index_array("take_along_axis", indices, x.shape[axis], x.shape)
    if not any(isinstance(a, Tracer) for a in (x, indices)):
        indices = _on_backend_of(indices, x)
    return bind(take_along_axis_p, (x, indices), {"axis": axis})


@_located
def gather(x, dim, index):
    """torch.gather: out[i][j][k] = x[index[i][j][k]][j][k] (dim=0), and so on.
    index has x's rank; its size along each other axis may be smaller than x's.
    Indices must lie in [0, size) (checked where the kernel runs, as torch)."""
    nd = len(x.shape)
    ishape = tuple(index.shape) if _is_array_like(index) else np.shape(index)
    if len(ishape) != nd:
        raise ShapeError(f"gather: index of shape {tuple(ishape)} must have as many dimensions as the input of "
                         f"shape {tuple(x.shape)}")
    dim = _norm_axis("gather", dim, nd, x.shape)
    for d in range(nd):
        if d != dim and ishape[d] > x.shape[d]:
            raise ShapeError(f"gather: index of shape {tuple(ishape)} is larger than the input of shape "
                             f"{tuple(x.shape)} along dimension {d}")
    index = check_index(index, x.shape[dim], dim=dim, name="gather")
    if any(ishape[d] != x.shape[d] for d in range(nd) if d != dim):
        x = getitem(x, tuple(slice(None) if d == dim else slice(0, ishape[d]) for d in range(nd)))
    return take_along_axis(x, index, dim)


@_located
def take(x, indices, axis=None):
    """np.take: elements of x at integer `indices` along `axis` (None: of the
    flattened array); the result has indices' shape in place of that axis."""
    from .shape import reshape
    if axis is None:
        x = reshape(x, (-1,))
        axis = 0
    axis = _norm_axis("take", axis, len(x.shape), x.shape)
    if not _is_array_like(indices) and not isinstance(indices, (int, np.integer)):
        indices = np.asarray(indices)
    if not isinstance(indices, (int, np.integer)):
        indices = check_index(indices, x.shape[axis], dim=axis, name="take", negative_ok=True)
    return getitem(x, (slice(None),) * axis + (indices,))


# -- one_hot -------------------------------------------------------------------------------

@_located
def one_hot(labels, num_classes=-1, dtype=np.float32):
    """labels[..., None] == arange(num_classes), as `dtype`.  num_classes=-1
    takes max(labels) + 1, which needs concrete labels."""
    from .elementwise import cast, eq
    from .shape import expand_dims
    if not _is_array_like(labels):
        labels = np.asarray(labels)
    _check_int_index("one_hot", labels.dtype)
    if num_classes is None or int(num_classes) < 0:
        if isinstance(labels, Tracer):
            raise ConcretizationError(f"one_hot: num_classes=-1 needs concrete labels, but they are being traced"
                                      f"{at(user_location())}; pass num_classes explicitly")
        host = _host(labels)
        num_classes = int(host.max()) + 1 if host.size else 0
    classes = _on_backend_of(np.arange(int(num_classes), dtype=np.dtype(labels.dtype)), labels)
    return cast(eq(expand_dims(labels, -1), classes), dtype)


# -- torch's index ops: index_select, scatter_add, masked_fill; the bounds check -----------------

def _check_index_rule(index, *, size, dim, negative_ok, name, loc, traced_shape):
    _check_int_index(name, index.dtype)
    return tuple(index.shape), index.dtype


def _check_index_impl(xp, index, *, size, dim, negative_ok, name, loc, traced_shape):
    low = -size if negative_ok else 0
    # the common case costs two reductions and no temporaries
    if index.size == 0 or (index.min() >= low and index.max() < size):
        return index
    bad = (index < low) | (index >= size)
    first = int(xp.argmax(bad.reshape(-1)))
    value = int(index.reshape(-1)[first])
    where_ = ""
    if index.ndim:
        where_ = f"; found at index[{', '.join(str(int(i)) for i in np.unravel_index(first, index.shape))}]"
    count = int(bad.sum())
    if count > 1:
        where_ += f" and {count - 1} more out-of-range ind{'ices' if count > 2 else 'ex'}"
    if tuple(index.shape) != tuple(traced_shape):
        where_ += " (a position within one thread's share of the batch: the step ran split across threads)"
    raise ShapeError(f"{name}: index {value} is out of range for dimension {dim} with size {size} (valid: "
                     f"{low}..{size - 1}){where_}{at(loc)}")


check_index_p = defprim(
    "check_index", shape=_check_index_rule, impl=_check_index_impl, nondiff=True,
    # as check_labels: elementwise (the batch split shards it with the indices), and a
    # view (it returns its input, so the memory plan gives it no buffer of its own)
    elementwise=True, view=True, sharding=pointwise(), layout=POINTWISE,
    # a batch of index arrays is checked as one (traced_shape: the batched array's, which it checks)
    batching=lambda args, dims, **attrs: (bind(check_index_p, args, dict(attrs, traced_shape=tuple(args[0].shape))),
                                          dims[0]),
    doc="The index array itself, checked when the kernel runs (eagerly or in compiled code): an index "
        "outside [0, size) (or [-size, size) with negative_ok) raises ShapeError naming the op (attribute "
        "name), the index, its position and the user's line (attribute loc).")


def check_index(index, size, *, dim=0, name="check_index", negative_ok=False):
    """`index` itself, its values checked when the kernel runs, eagerly or inside
    compiled code: an index outside [0, size) (with negative_ok, [-size, size))
    raises ShapeError naming `name`, the index, its position and the calling
    line.  Use the returned array: the check runs only where its result is used."""
    from ..primitive import current_location
    if not _is_array_like(index):
        index = np.asarray(index)
        if index.size == 0:
            index = index.astype(np.intp)
    attrs = dict(size=int(size), dim=int(dim), negative_ok=bool(negative_ok), name=str(name),
                 loc=current_location(), traced_shape=tuple(index.shape))
    return bind(check_index_p, (index,), attrs)


@_located
def index_select(input, dim, index):  # noqa: A002 - torch's argument names
    """torch.index_select: the entries of `input` at the positions `index` (a 1-D
    integer array, concrete or traced; 0-d counts as one entry) along `dim`.
    Indices must lie in [0, size); the gradient scatters back, adding repeats."""
    from .shape import reshape
    nd = len(input.shape)
    if nd == 0:
        raise ShapeError("index_select: input must have at least one dimension (got shape ())")
    dim = _norm_axis("index_select", dim, nd, input.shape)
    if not _is_array_like(index):
        index = np.asarray(index)
    if len(index.shape) > 1:
        raise ShapeError(f"index_select: index must be 1-D (a vector of positions), got shape {tuple(index.shape)}")
    if not index.shape:
        index = reshape(index, (1,))
    index = check_index(index, input.shape[dim], dim=dim, name="index_select")
    return getitem(input, (slice(None),) * dim + (index,))


def _scatter_add_shapes(ishape, xshape, sshape, dim):
    if not len(ishape) == len(xshape) == len(sshape):
        raise ShapeError(f"scatter_add: input {xshape}, index {ishape} and src {sshape} must have the same "
                         "number of dimensions")
    for d, (i, x, s) in enumerate(zip(ishape, xshape, sshape)):
        if i > s or (d != dim and i > x):
            raise ShapeError(f"scatter_add: index of shape {ishape} is larger than src {sshape} or, outside "
                             f"dimension {dim}, than input {xshape} (along dimension {d})")


@_located
def scatter_add(input, dim, index, src):  # noqa: A002 - torch's argument names
    """torch.scatter_add (out of place): a copy of `input` with src[i][j][k]
    added at [index[i][j][k]][j][k] (dim=0), and so on; repeated indices add up.
    Only the part of src the shape of `index` is read.  Gradients: the cotangent
    itself to `input`, and to `src` the cotangent gathered at `index` (zero
    where src is not read); `index` gets none."""
    from .elementwise import add
    nd = len(input.shape)
    index, src = (a if _is_array_like(a) else np.asarray(a) for a in (index, src))
    if nd == 0:
        raise ShapeError("scatter_add: input must have at least one dimension (got shape ())")
    dim = _norm_axis("scatter_add", dim, nd, input.shape)
    ishape, xshape, sshape = tuple(index.shape), tuple(input.shape), tuple(src.shape)
    _scatter_add_shapes(ishape, xshape, sshape, dim)
    if np.dtype(src.dtype) != np.dtype(input.dtype):
        raise DtypeError(f"scatter_add: src ({np.dtype(src.dtype).name}) and input ({np.dtype(input.dtype).name}) "
                         "must have the same dtype; cast one (src.astype(input.dtype))")
    index = check_index(index, xshape[dim], dim=dim, name="scatter_add")
    if sshape != ishape:
        src = getitem(src, tuple(slice(0, n) for n in ishape))
    reach = tuple(xshape[d] if d == dim else ishape[d] for d in range(nd))  # the part of input written
    if not any(isinstance(a, Tracer) for a in (src, index)):
        index = _on_backend_of(index, src)
    added = bind(tala_grad_p, (src, index), {"axis": dim, "shape": reach})
    if reach != xshape:
        added = pad(added, [(0, x - r) for x, r in zip(xshape, reach)])
    return add(input, added)


@_located
def masked_fill(input, mask, value):  # noqa: A002 - torch's argument names
    """torch.masked_fill (out of place): `value` where the boolean `mask` is true,
    else `input`; mask and input broadcast together.  `value` (a number, or a 0-d
    array, which then gets a gradient) is converted to input's dtype, as torch
    does.  Built on avalon.where."""
    from .elementwise import cast, where
    if not _is_array_like(mask):
        mask = np.asarray(mask)
    if np.dtype(mask.dtype) != np.bool_:
        raise DtypeError(f"masked_fill: mask must be a boolean array, got {np.dtype(mask.dtype).name}; "
                         "compare first (mask = x > 0) or cast (mask.astype(bool))")
    if _is_array_like(value):
        if len(value.shape):
            raise ShapeError(f"masked_fill: value must be a number or a 0-d array, got shape {tuple(value.shape)}")
        value = cast(value, input.dtype)
    else:  # a Python number of input's kind: a weak scalar, made on input's device
        value = np.asarray(value).astype(input.dtype).item()
    return where(mask, value, input)
