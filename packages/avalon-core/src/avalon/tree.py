"""Walking user objects: models are plain Python objects holding arrays.

`flatten(obj)` returns the array leaves of any nesting of lists, tuples, dicts,
namedtuples, dataclasses and plain class instances, plus a hashable `TreeDef`
that records the structure and every non-array value (ints, flags, strings,
callables).  `unflatten(treedef, leaves)` builds the same structure again, with
new leaves, so gradients come back with the shape of the model they belong to.

Two rules make a model's arrays mean what they mean in PyTorch:

* the same array object reached twice (tied weights: `lm_head.weight is
  wte.weight`) is one leaf; its second place is an `Alias` of the first in the
  TreeDef (so the tie is part of a compiled function's signature), and
  `unflatten` puts the same new leaf at both places;
* an object may say which of its array fields are not trained by defining
  `__avalon_nondiff_fields__(self)` (the protocol nn.Module implements: its
  buffers, frozen parameters and arrays it merely caches).  Arrays inside
  those fields are `FROZEN` leaves: still inputs of a compiled function, never
  differentiated (`trainable_leaves(treedef)` says which leaves are).
"""
from __future__ import annotations

import dataclasses
import functools
import types
import weakref

import numpy as np

from .errors import AvalonError

# Types that are never walked into: they are static values of the signature.
_OPAQUE = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           types.ModuleType, functools.partial, str, bytes, int, float, complex,
           bool, type(None), np.dtype, range, slice)

_array_types: tuple[type, ...] = (np.ndarray,)
_extra_array_types: set[type] = set()


def register_array_type(t: type) -> None:
    """Make instances of `t` tree leaves (backends call this for their array type)."""
    global _array_types
    if t not in _array_types:
        _array_types = _array_types + (t,)


def is_array(x) -> bool:
    return isinstance(x, _array_types)


_ARRAY_PROTOCOLS = ("__array__", "__dlpack__", "__array_interface__", "__cuda_array_interface__")
_foreign_types: dict = {}   # type -> whether it speaks an array protocol (flatten asks per object)


def looks_like_foreign_array(x) -> bool:
    """An array of another library (a torch tensor, a JAX array...): something
    NumPy could convert, that no installed backend holds as its own."""
    if isinstance(x, _array_types):
        return False
    t = type(x)
    foreign = _foreign_types.get(t)
    if foreign is None:
        foreign = _foreign_types[t] = any(hasattr(t, a) for a in _ARRAY_PROTOCOLS)
    return foreign


def conversion_hint(x) -> str:
    """What to do with a value Avalon cannot take as an array."""
    t = type(x)
    if t.__module__.partition(".")[0] == "torch":
        return "convert it with tensor.detach().cpu().numpy()"
    if isinstance(x, (list, tuple)):
        return "convert it with np.asarray(x, dtype=np.float32)"
    return "convert it with np.asarray(x)"


class ForeignArrayError(AvalonError, TypeError):
    """A value of another array library where Avalon needs one of its own."""


class Static:
    """A non-array leaf: compared by value when hashable, else by identity."""
    __slots__ = ("value", "_key")

    def __init__(self, value):
        self.value = value
        try:
            hash(value)
            self._key = (type(value), value)
        except TypeError:
            self._key = ("id", id(value))

    def __eq__(self, other):
        return isinstance(other, Static) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        return f"Static({self.value!r})"


ARRAY = "*"  # marks an array leaf in a TreeDef
FROZEN = "-"  # marks an array leaf that is never differentiated (see __avalon_nondiff_fields__)
NONDIFF_PROTOCOL = "__avalon_nondiff_fields__"


class Alias:
    """The second place of an array already flattened: leaf number `index`."""
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def __eq__(self, other):
        return isinstance(other, Alias) and self.index == other.index

    def __hash__(self):
        return hash(("alias", self.index))

    def __repr__(self):
        return f"Alias({self.index})"


class TreeDef:
    """The structure of a flattened object; hashable and comparable."""
    __slots__ = ("kind", "meta", "children", "_hash")

    def __init__(self, kind, meta, children):
        self.kind, self.meta, self.children = kind, meta, tuple(children)
        self._hash = hash((kind, meta, self.children))

    def __eq__(self, other):
        return (isinstance(other, TreeDef) and self._hash == other._hash and self.kind == other.kind
                and self.meta == other.meta and self.children == other.children)

    def __hash__(self):
        return self._hash

    def __repr__(self):
        return f"TreeDef({self.kind}, {self.meta!r}, {list(self.children)!r})"


class _Foreign(Exception):
    def __init__(self, value):
        self.value = value


def flatten(obj, is_leaf=None, name: str = "args") -> tuple[list, TreeDef]:
    """The array leaves of `obj` and its TreeDef.  An array of another library
    inside it raises ForeignArrayError naming where (`name` is obj's own name)."""
    leaves: list = []
    try:
        treedef = _flatten(obj, leaves, is_leaf, set(), {}, ARRAY)
    except _Foreign as e:
        from .errors import at, user_location
        t = type(e.value)
        path = _path_to(obj, e.value, name) or "a value"
        raise ForeignArrayError(f"{path} is a {t.__module__}.{t.__qualname__}, not an array of an installed "
                                f"Avalon backend{at(user_location())}; {conversion_hint(e.value)}") from None
    return leaves, treedef


def _path_to(obj, target, path, depth=0):
    """The path of `target` inside obj, for error messages (not on a hot path)."""
    if obj is target:
        return path
    if depth > 32 or isinstance(obj, _OPAQUE) or isinstance(obj, np.generic):
        return None
    if isinstance(obj, dict):
        children = ((f"{path}[{k!r}]", v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        children = ((f"{path}[{k}]", v) for k, v in enumerate(obj))
    else:
        try:
            children = ((f"{path}.{f}", getattr(obj, f)) for f in _object_fields(obj))
        except Exception:
            return None
    for child_path, child in children:
        found = _path_to(child, target, child_path, depth + 1)
        if found:
            return found
    return None


def _object_fields(obj):
    if dataclasses.is_dataclass(obj) and not hasattr(obj, "__dict__"):
        return [f.name for f in dataclasses.fields(obj)]
    if hasattr(obj, "__dict__"):
        return list(vars(obj))
    slots = []
    for cls in type(obj).__mro__:
        for s in getattr(cls, "__slots__", ()):
            if s not in ("__dict__", "__weakref__") and hasattr(obj, s):
                slots.append(s)
    return slots


def _flatten(obj, leaves, is_leaf, active, seen, mark):
    """`seen`: id -> leaf index of the arrays met so far; `mark`: ARRAY, or
    FROZEN inside a field its object declares not trained."""
    # an is_leaf value (a tracer, when a trace flattens its arguments) is an array
    # leaf like any other: the same one reached twice is tied, and a field its
    # object declares untrained is FROZEN, inside a nested grad as at top level
    if isinstance(obj, _array_types) or (is_leaf is not None and is_leaf(obj)):
        first = seen.get(id(obj))
        if first is not None and leaves[first] is obj:
            return Alias(first)
        seen[id(obj)] = len(leaves)
        leaves.append(obj)
        return mark
    t = type(obj)
    if isinstance(obj, _OPAQUE) or isinstance(obj, np.generic):
        return Static(obj)
    if looks_like_foreign_array(obj):
        raise _Foreign(obj)
    oid = id(obj)
    if oid in active:
        raise AvalonError(f"cannot walk a {t.__name__} that contains itself (a reference cycle); "
                          "keep back-references out of models passed to avalon.grad/jit")
    active.add(oid)
    try:
        if t is list or t is tuple:
            return TreeDef(t, None, [_flatten(c, leaves, is_leaf, active, seen, mark) for c in obj])
        if isinstance(obj, tuple) and hasattr(t, "_fields"):  # namedtuple
            return TreeDef(t, None, [_flatten(c, leaves, is_leaf, active, seen, mark) for c in obj])
        if isinstance(obj, dict):
            keys = tuple(obj)
            return TreeDef(t, keys, [_flatten(obj[k], leaves, is_leaf, active, seen, mark) for k in keys])
        if isinstance(obj, (list, tuple)):
            return TreeDef(t, None, [_flatten(c, leaves, is_leaf, active, seen, mark) for c in obj])
        if is_leaf is None and getattr(t, CACHE_PROTOCOL, False):
            cached = _cached_subtree(obj, leaves, seen, mark)
            if cached is not None:
                return cached
            start = len(leaves)
            td = _flatten_object(obj, t, leaves, is_leaf, active, seen, mark)
            _remember_subtree(obj, td, leaves, start, mark)
            return td
        return _flatten_object(obj, t, leaves, is_leaf, active, seen, mark)
    finally:
        active.discard(oid)


def _flatten_object(obj, t, leaves, is_leaf, active, seen, mark):
    """The TreeDef of an object with fields (its leaves appended to `leaves`)."""
    fields = _object_fields(obj)
    if not fields and not hasattr(obj, "__dict__"):
        return Static(obj)
    nondiff = _nondiff_fields(obj)
    return TreeDef("obj", (t, tuple(fields)),
                   [_flatten(getattr(obj, f), leaves, is_leaf, active, seen,
                             FROZEN if f in nondiff else mark) for f in fields])


# -- the flattening of a model, remembered between calls ----------------------------------------
# A compiled function flattens its arguments on every call to find its
# signature: for a model of a few dozen modules that walk costs ~100-200 us,
# more than a small model's prediction.  A class that sets
# __avalon_flatten_cache__ = True (nn.Module does) has its objects' subtrees
# remembered with a fingerprint: every object of the subtree, the names of its
# fields and the identity of each field's value.  A later flatten reuses the
# subtree when the fingerprint still holds, which takes one pass over the
# objects' __dict__s and no TreeDef building.  Any assignment (setattr,
# object.__setattr__, train(), a replaced array) changes an identity and is
# seen; values that could change in place (lists, dicts, sets, arbitrary
# objects without a __dict__) make a subtree ineligible, so they are always
# walked.

CACHE_PROTOCOL = "__avalon_flatten_cache__"
_IMMUTABLE = (str, bytes, int, float, complex, bool, type(None), np.dtype, range, type, types.FunctionType,
              types.BuiltinFunctionType, functools.partial, frozenset, np.generic)
_subtrees: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# objects found ineligible, with the identities of their own attributes then: not
# examined again (a second walk per call) until one of those changes.  Only the
# cache's use depends on this, never a result.
_ineligible: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Subtree:
    """A remembered subtree.  The root object (the cache's key) is held weakly:
    an entry holding it would keep it alive in the WeakKeyDictionary for ever,
    and with it every array it holds (a step's gradients, a new object per step,
    piled up; the allocator then faulted fresh pages in on every step)."""
    __slots__ = ("offset", "mark", "treedef", "leaves", "root", "root_names", "root_ids", "objects", "ids")

    def __init__(self, offset, mark, treedef, leaves, objects):
        self.offset, self.mark, self.treedef, self.leaves = offset, mark, treedef, leaves
        root, self.root_names = objects[0]
        self.root = weakref.ref(root)
        self.root_ids = tuple(map(id, vars(root).values()))
        self.objects = objects[1:]                  # [(obj, field names)] below the root
        self.ids = [tuple(map(id, vars(o).values())) for o, _ in self.objects]


def _cached_subtree(obj, leaves, seen, mark):
    try:
        entry = _subtrees.get(obj)
    except TypeError:   # unhashable (a dataclass with eq=True)
        return None
    # (a class defining __eq__ could find another object's entry: the identity decides)
    if entry is None or entry.root() is not obj or entry.offset != len(leaves) or entry.mark is not mark:
        return None
    d = vars(obj)
    if len(d) != len(entry.root_names) or tuple(map(id, d.values())) != entry.root_ids or tuple(d) != entry.root_names:
        return None
    for (o, names), ids in zip(entry.objects, entry.ids):
        d = vars(o)
        if len(d) != len(names) or tuple(map(id, d.values())) != ids or tuple(d) != names:
            return None
    if any(id(x) in seen for x in entry.leaves):
        return None   # an array also met before this object: its tie must be recorded afresh
    for k, x in enumerate(entry.leaves, len(leaves)):
        seen[id(x)] = k
    leaves.extend(entry.leaves)
    return entry.treedef


def _remember_subtree(obj, td, leaves, start, mark):
    own = tuple(map(id, vars(obj).values()))
    try:
        if _ineligible.get(obj) == own:
            return
    except TypeError:   # unhashable: never remembered
        return
    objects = []
    if not _collect_objects(obj, objects, set()):
        _ineligible[obj] = own
        return
    if _refers_before(td, start):
        return
    try:
        _subtrees[obj] = _Subtree(start, mark, td, leaves[start:], objects)
    except TypeError:   # not weakly referable
        pass


def _collect_objects(obj, out, done) -> bool:
    """Every object with a __dict__ in obj's subtree, with its field names, into
    `out`; False when a value could change without an assignment (a list, a
    dict, an object without a __dict__) or an object is its own ancestor."""
    if id(obj) in done:
        return True
    done.add(id(obj))
    d = getattr(obj, "__dict__", None)
    if d is None:
        return False
    out.append((obj, tuple(d)))
    return all(_eligible(v, out, done) for v in d.values())


def _eligible(v, out, done) -> bool:
    if isinstance(v, _array_types) or isinstance(v, _IMMUTABLE):
        return True
    if type(v) is tuple:
        return all(_eligible(x, out, done) for x in v)
    if isinstance(v, (list, dict, set, bytearray)) or looks_like_foreign_array(v):
        return False
    return _collect_objects(v, out, done)


def _refers_before(td, start) -> bool:
    """Whether the subtree holds an Alias of a leaf flattened before it."""
    if isinstance(td, Alias):
        return td.index < start
    if isinstance(td, TreeDef):
        return any(_refers_before(c, start) for c in td.children)
    return False


def _nondiff_fields(obj) -> frozenset:
    declare = getattr(type(obj), NONDIFF_PROTOCOL, None)
    return frozenset(declare(obj)) if declare is not None else frozenset()


def trainable_leaves(treedef) -> list[bool]:
    """For each array leaf, whether it may be differentiated (not FROZEN)."""
    out: list[bool] = []
    _marks(treedef, out)
    return out


def leaves_in_objects(treedef) -> list[bool]:
    """For each array leaf, whether it is a field of an object (a model's
    parameter) rather than an argument itself or an item of a list, tuple or dict."""
    out: list[bool] = []
    _in_objects(treedef, False, out)
    return out


def _in_objects(td, inside, out):
    if isinstance(td, str):
        out.append(inside)
    elif isinstance(td, TreeDef):
        for c in td.children:
            _in_objects(c, inside or td.kind == "obj", out)


def _marks(td, out):
    if isinstance(td, str):
        out.append(td is ARRAY)
    elif isinstance(td, TreeDef):
        for c in td.children:
            _marks(c, out)


_KEEP = object()


def unflatten(treedef, leaves, static=_KEEP):
    """Rebuild the structure with `leaves`; non-array values are kept, or all
    replaced by `static` when it is given (grads use None)."""
    return _unflatten(treedef, _Leaves(leaves), static)


class _Leaves:
    """The leaves handed out in order, remembered for aliases."""
    __slots__ = ("it", "given")

    def __init__(self, leaves):
        self.it, self.given = iter(leaves), []

    def __next__(self):
        x = next(self.it)
        self.given.append(x)
        return x


def _unflatten(td, it, static=_KEEP):
    if td is ARRAY or td is FROZEN:
        return next(it)
    if isinstance(td, Alias):
        return it.given[td.index] if td.index < len(it.given) else None
    if isinstance(td, Static):
        return td.value if static is _KEEP else static
    kind = td.kind
    if kind is list:
        return [_unflatten(c, it, static) for c in td.children]
    if kind is tuple:
        return tuple(_unflatten(c, it, static) for c in td.children)
    if kind == "obj":
        cls, fields = td.meta
        new = object.__new__(cls)
        for f, c in zip(fields, td.children):
            object.__setattr__(new, f, _unflatten(c, it, static))
        return new
    if isinstance(kind, type) and issubclass(kind, dict):
        d = kind() if kind is dict else kind.__new__(kind)
        for k, c in zip(td.meta, td.children):
            dict.__setitem__(d, k, _unflatten(c, it, static))
        return d
    if hasattr(kind, "_fields"):
        return kind(*[_unflatten(c, it, static) for c in td.children])
    return kind([_unflatten(c, it, static) for c in td.children])


def leaf_paths(treedef, prefix: str = "") -> list[str]:
    """Readable paths ('.conv1.weight', '[0]', "['w']") of the array leaves, in order."""
    out: list[str] = []
    _paths(treedef, prefix, out, arrays=True)
    return out


def static_paths(treedef, prefix: str = "") -> list[tuple[str, object]]:
    out: list = []
    _paths(treedef, prefix, out, arrays=False)
    return out


def alias_paths(treedef, prefix: str = "") -> list[tuple[str, int]]:
    """(path, index of the leaf it repeats) of each second place of an array."""
    out: list = []
    _paths(treedef, prefix, out, arrays=Alias)
    return out


def _paths(td, prefix, out, arrays):
    if isinstance(td, Alias):
        if arrays is Alias:
            out.append((prefix, td.index))
        return
    if isinstance(td, str):
        if arrays is True:
            out.append(prefix)
        return
    if isinstance(td, Static):
        if arrays is False:
            out.append((prefix, td.value))
        return
    if td.kind == "obj":
        for f, c in zip(td.meta[1], td.children):
            _paths(c, f"{prefix}.{f}", out, arrays)
    elif isinstance(td.kind, type) and issubclass(td.kind, dict):
        for k, c in zip(td.meta, td.children):
            _paths(c, f"{prefix}[{k!r}]", out, arrays)
    else:
        for i, c in enumerate(td.children):
            _paths(c, f"{prefix}[{i}]", out, arrays)


def number_sequences(treedef, prefix: str = "args") -> list[tuple[str, str]]:
    """(path, description) of each list of Python numbers (nested or not), and
    of each tuple holding a float, in a structure: static values to jit and
    grad, not arrays, though often meant as data ("args[0] is a list of 3
    Python numbers").  Tuples of ints (shapes, strides) are left out."""
    out: list = []
    _number_sequences(treedef, prefix, out)
    return out


def _has_float(td) -> bool:
    if isinstance(td, Static):
        return isinstance(td.value, float)
    return any(_has_float(c) for c in td.children)


def _all_numbers(td) -> bool:
    if isinstance(td, Static):
        return isinstance(td.value, (int, float)) and not isinstance(td.value, bool)
    return isinstance(td, TreeDef) and td.kind in (list, tuple) and bool(td.children) and \
        all(_all_numbers(c) for c in td.children)


def _number_sequences(td, prefix, out):
    if not isinstance(td, TreeDef):
        return
    if td.kind in (list, tuple) and _all_numbers(td) and (td.kind is list or _has_float(td)):
        what = "number" if all(isinstance(c, Static) for c in td.children) else "sequence"
        n = len(td.children)
        out.append((prefix, f"a {td.kind.__name__} of {n} Python {what}{'s' if n > 1 else ''}"))
        return
    if td.kind == "obj":
        named = [f".{f}" for f in td.meta[1]]
    elif isinstance(td.kind, type) and issubclass(td.kind, dict):
        named = [f"[{k!r}]" for k in td.meta]
    else:
        named = [f"[{i}]" for i in range(len(td.children))]
    for name, c in zip(named, td.children):
        _number_sequences(c, prefix + name, out)


def tree_map(fn, obj, is_leaf=None):
    """Apply fn to every array leaf of obj and rebuild the structure."""
    leaves, td = flatten(obj, is_leaf)
    return unflatten(td, [fn(x) for x in leaves])


def describe(td) -> str:
    """A short type description of a TreeDef node (for retrace messages)."""
    if isinstance(td, Alias):
        return f"the array of leaf {td.index} again"
    if isinstance(td, str):
        return "array" if td is ARRAY else "array not trained"
    if isinstance(td, Static):
        return f"{type(td.value).__name__} {td.value!r}"
    if td.kind == "obj":
        return f"{td.meta[0].__name__} with fields {list(td.meta[1])}"
    if isinstance(td.kind, type) and issubclass(td.kind, dict):
        return f"dict with keys {list(td.meta)}"
    return f"{getattr(td.kind, '__name__', td.kind)} of length {len(td.children)}"


# -- which object a gradient structure is the gradient of ----------------------------------------
#
# avalon.grad returns, for each argument, a new structure of that argument's
# classes holding gradients.  An optimizer given parameters at construction
# (avalon.optim.SGD(model.parameters())) is then stepped with that structure
# alone, opt.step(grads[0]), and must find which array each gradient belongs
# to: grad records the argument it differentiated ("the source") here, and the
# optimizer walks the source and the gradient in parallel.  Objects that take
# weak references (class instances, nn.Modules) are held weakly; dicts, lists
# and tuples cannot be, so the last few such gradient structures are kept
# alive (with their sources) by a short ring that each new record pushes.

_SOURCE_RING = 2
_sources_weak: dict = {}    # id(grad) -> (weakref to grad, weakref or strong ref to the source)
_sources_ring: list = []    # (grad, source) for gradients that take no weak reference


def record_gradient_source(grad, source) -> None:
    """Record that `grad` (a structure returned by avalon.grad) is the gradient of `source`."""
    try:
        source_ref = weakref.ref(source)
    except TypeError:
        source_ref = lambda source=source: source  # noqa: E731  (a dict or list model: held strongly)
    key = id(grad)
    try:
        grad_ref = weakref.ref(grad, lambda _, key=key: _sources_weak.pop(key, None))
    except TypeError:
        _sources_ring.append((grad, source_ref))
        del _sources_ring[:-_SOURCE_RING]
        return
    _sources_weak[key] = (grad_ref, source_ref)


def gradient_source(grad):
    """The object `grad` is the gradient of (the argument avalon.grad
    differentiated), or None when grad was not returned by avalon.grad (or is
    a dict, list or tuple gradient older than the last two recorded)."""
    entry = _sources_weak.get(id(grad))
    if entry is not None and entry[0]() is grad:
        return entry[1]()
    for g, source_ref in reversed(_sources_ring):
        if g is grad:
            return source_ref()
    return None
