"""nn.Module: optional base class of layers, as in PyTorch.

Parameters are plain arrays held as attributes: a model is a plain object that
avalon.grad walks.  A module adds names (named_parameters, state_dict), modes
(train/eval) and devices (to).

What is trained follows PyTorch's rule.  A parameter is declared: an array
wrapped in `nn.Parameter(array)` assigned to an attribute (every layer's
weights are made that way, by `layers.basic.new_param`), or one given to
`register_parameter`.  A buffer (BatchNorm's running statistics) is registered
with `register_buffer`: saved in state_dict, never trained.  Any other array
attribute (a mask computed and cached in forward) is neither: not trained
(None in the gradient), not in state_dict, not in parameters().  A module
tells avalon.grad through the `__avalon_nondiff_fields__` protocol of
avalon.tree, and the declared names are part of every compiled signature, so
`requires_grad_(False)` retraces once.  (A plain Python class that is not a
Module keeps avalon's own rule: every float array in it is trained.)

`nn.Parameter(x)` returns x itself, a plain array of its backend (NumPy keeps
working on it, it traces like any array), marked so that the module it is
assigned to records the attribute as a parameter; `isinstance(x, nn.Parameter)`
tells a marked array.  Replacing the array under a parameter's name (loading,
moving, flat buffers) keeps the name a parameter.

Calling a module checks its arguments before forward() runs: an array that no
installed backend owns (a torch tensor, ...) is refused in any argument, and the
argument that Avalon's own layers name `input` (PyTorch's name for the data a
layer computes on) must be an array, a tracer or a scalar.  The error names the
layer, the argument, the type received and the fix.
"""
from __future__ import annotations

import inspect
import weakref
from collections import OrderedDict

import numpy as np

import avalon
from avalon._install import install_hint
from avalon.backends import backend_of, backends
from avalon.errors import AvalonError, DeviceError, at, user_location
from avalon.primitive import Tracer
from avalon.tree import is_array, looks_like_foreign_array

from .registry import export


class LayerInputError(AvalonError, TypeError):
    """A layer was called with something that is not an array: a torch tensor,
    a Python list, None, ..."""


# -- nn.Parameter: a mark on an array, read when a module gets the array ----------------------------------------

_PARAMETER_MARKS: dict = {}   # id(array) -> (a reference to the array, requires_grad)


def _mark(array, requires_grad: bool) -> None:
    key = id(array)
    try:
        ref = weakref.ref(array, lambda _r, key=key: _PARAMETER_MARKS.pop(key, None))
    except TypeError:   # an array type without weak references: kept alive by its mark
        ref = (lambda a: (lambda: a))(array)
    _PARAMETER_MARKS[key] = (ref, requires_grad)


def _parameter_mark(value):
    """requires_grad of a value made by nn.Parameter, or None for any other value."""
    entry = _PARAMETER_MARKS.get(id(value))
    if entry is None or entry[0]() is not value:
        return None
    return entry[1]


class _ParameterType(type):
    def __instancecheck__(cls, value):
        return _parameter_mark(value) is not None


@export("nn", "Basic layers")
class Parameter(metaclass=_ParameterType):
    """Declare an array a parameter, as torch.nn.Parameter: `self.w = nn.Parameter(x)`
    inside a Module makes `w` a parameter (trained, in parameters() and state_dict).

    Returns `data` itself (no copy): a plain floating-point array of its backend,
    usable everywhere an array is; `data=None` gives an empty float32 array.
    `requires_grad=False` declares a frozen parameter (in state_dict and
    parameters(), never given a gradient)."""

    def __new__(cls, data=None, requires_grad: bool = True):
        if data is None:
            data = np.empty((0,), np.float32)
        if not is_array(data):
            raise TypeError(f"nn.Parameter: data must be an array of an installed avalon backend, got "
                            f"{_kind_of(data)}{at(user_location())}; {_fix_for(data)}")
        if requires_grad and np.dtype(data.dtype).kind not in "fc":
            raise avalon.DtypeError(f"nn.Parameter: only arrays of floating point and complex dtype can require "
                                    f"gradients, got {np.dtype(data.dtype).name}{at(user_location())}; pass a "
                                    "float array, or requires_grad=False")
        _mark(data, bool(requires_grad))
        return data


@export("nn", "Basic layers")
class Module:
    """Base class: subclasses set parameters (`nn.Parameter(array)`), buffers
    (`register_buffer`) and sub-modules as attributes in __init__ (after
    super().__init__()) and define forward().  Only declared parameters are
    trained (see the module docstring)."""

    #: avalon.tree remembers a module's flattened structure between calls of a
    #: compiled function, checked against a fingerprint of its attributes
    __avalon_flatten_cache__ = True

    def __init__(self):
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_buffer_names", frozenset())
        object.__setattr__(self, "_parameter_names", frozenset())
        object.__setattr__(self, "_frozen_names", frozenset())         # parameters with requires_grad=False
        object.__setattr__(self, "_non_persistent", frozenset())       # buffers kept out of state_dict

    def __setattr__(self, name, value):
        requires_grad = _parameter_mark(value)
        if requires_grad is not None:
            self._declare_parameter(name, requires_grad)
        elif isinstance(value, Module):
            self._unregister(name)
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        object.__delattr__(self, name)
        self._unregister(name)

    def _names_of(self, kind: str) -> frozenset:
        return self.__dict__.get(kind) or frozenset()

    def _set_names_of(self, kind: str, names) -> None:
        object.__setattr__(self, kind, frozenset(names))

    def _declare_parameter(self, name: str, requires_grad: bool) -> None:
        self._unregister(name)
        self._set_names_of("_parameter_names", self._names_of("_parameter_names") | {name})
        if not requires_grad:
            self._set_names_of("_frozen_names", self._names_of("_frozen_names") | {name})

    def _unregister(self, name: str) -> None:
        for kind in ("_parameter_names", "_frozen_names", "_buffer_names", "_non_persistent"):
            if name in self._names_of(kind):
                self._set_names_of(kind, self._names_of(kind) - {name})

    def __avalon_nondiff_fields__(self):
        """avalon.tree's protocol: the array attributes that are not trained
        (buffers, frozen parameters, and arrays that are neither)."""
        trainable = self._names_of("_parameter_names") - self._names_of("_frozen_names")
        return [name for name, value in vars(self).items() if name not in trainable and is_array(value)]

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    #: Arguments of forward() that must be arrays when forward() is Avalon's own:
    #: PyTorch's name for the data a layer computes on.  (A loss's `target` may be
    #: a list or a scalar, which the losses convert, as their functions do.)  Layers
    #: that pass their input through untouched (Identity, Sequential) set ().
    _array_arguments = ("input",)

    def __call__(self, *args, **kwargs):
        _check_arguments(self, args, kwargs)
        return self.forward(*args, **kwargs)

    # -- structure -------------------------------------------------------------
    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        """Add a buffer: an array saved in state_dict (unless persistent=False), never trained."""
        self._check_new_name("buffer", name)
        if tensor is not None and not is_array(tensor):
            raise TypeError(f"cannot assign {_kind_of(tensor)} object to buffer '{name}' (an array or None "
                            f"required){at(user_location())}")
        self._unregister(name)
        self._set_names_of("_buffer_names", self._names_of("_buffer_names") | {name})
        if not persistent:
            self._set_names_of("_non_persistent", self._names_of("_non_persistent") | {name})
        object.__setattr__(self, name, tensor)

    def register_parameter(self, name: str, param) -> None:
        """Add a parameter (an array, trained unless nn.Parameter(x, requires_grad=False)
        made it, or None), as torch.nn.Module.register_parameter."""
        self._check_new_name("parameter", name)
        if param is not None and not is_array(param):
            raise TypeError(f"cannot assign {_kind_of(param)} object to parameter '{name}' (nn.Parameter, an "
                            f"array or None required){at(user_location())}")
        requires_grad = _parameter_mark(param)
        self._declare_parameter(name, True if requires_grad is None else requires_grad)
        object.__setattr__(self, name, param)

    def add_module(self, name: str, module) -> None:
        """Add a child module (or None) under `name`, as torch.nn.Module.add_module."""
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass")
        self._check_new_name("module", name)
        self._unregister(name)
        object.__setattr__(self, name, module)

    def register_module(self, name: str, module) -> None:
        """Alias of add_module."""
        self.add_module(name, module)

    def _check_new_name(self, what: str, name) -> None:
        if not isinstance(name, str):
            raise TypeError(f"{what} name should be a string. Got {type(name).__name__}")
        if "." in name:
            raise KeyError(f'{what} name can\'t contain "."')
        if name == "":
            raise KeyError(f'{what} name can\'t be empty string ""')
        if hasattr(type(self), name) or (name in vars(self) and not self._is_registered(name)
                                          and not isinstance(vars(self)[name], Module)):
            raise KeyError(f"attribute '{name}' already exists")

    def _is_registered(self, name: str) -> bool:
        return name in self._names_of("_parameter_names") or name in self._names_of("_buffer_names")

    def requires_grad_(self, requires_grad: bool = True):
        """Freeze (False) or unfreeze every parameter of this module and its children:
        a frozen parameter gets no gradient (None) and no optimizer update."""
        for m in self.modules():
            m._set_names_of("_frozen_names", () if requires_grad else m._names_of("_parameter_names"))
        return self

    def named_children(self):
        seen = set()
        for name, value in vars(self).items():
            if isinstance(value, Module) and id(value) not in seen:
                seen.add(id(value))
                yield name, value

    def children(self):
        return [m for _, m in self.named_children()]

    def named_modules(self, memo=None, prefix: str = "", remove_duplicate: bool = True):
        """(dotted name, module) of this module and every descendant, each once
        (unless remove_duplicate=False), as torch."""
        if memo is None:
            memo = set()
        if remove_duplicate:
            if id(self) in memo:
                return
            memo.add(id(self))
        yield prefix, self
        for name, child in vars(self).items():
            if isinstance(child, Module):
                yield from child.named_modules(memo, f"{prefix}.{name}" if prefix else name, remove_duplicate)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def _own_arrays(self, buffers: bool):
        kind = "_buffer_names" if buffers else "_parameter_names"
        if kind in self.__dict__ and self.__dict__[kind] is None:
            # a gradient (which mirrors a module, with None for its non-array
            # fields) holds arrays exactly where parameters get gradients
            yield from ((n, v) for n, v in vars(self).items() if not buffers and is_array(v))
            return
        names = self._names_of(kind)
        for name, value in vars(self).items():
            if name in names and is_array(value):
                yield name, value

    def _named_members(self, buffers: bool, prefix: str, recurse: bool, remove_duplicate: bool):
        modules = self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate) if recurse else [(prefix, self)]
        seen = set()
        for mod_name, mod in modules:
            for name, value in mod._own_arrays(buffers):
                if remove_duplicate:
                    if id(value) in seen:
                        continue
                    seen.add(id(value))
                yield (f"{mod_name}.{name}" if mod_name else name), value

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        """(dotted name, array) of every parameter, a tied one once (its first name), as torch."""
        yield from self._named_members(False, prefix, recurse, remove_duplicate)

    def parameters(self, recurse: bool = True):
        return [p for _, p in self.named_parameters(recurse=recurse)]

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from self._named_members(True, prefix, recurse, remove_duplicate)

    def buffers(self, recurse: bool = True):
        return [b for _, b in self.named_buffers(recurse=recurse)]

    def get_submodule(self, target: str) -> "Module":
        """The module at dotted path `target` ("" is self)."""
        mod = self
        for item in target.split(".") if target else ():
            child = mod.__dict__.get(item)
            if not isinstance(child, Module):
                raise AttributeError(f"{type(mod).__name__} has no attribute `{item}`" if child is None
                                     else f"`{item}` is not an nn.Module")
            mod = child
        return mod

    def get_parameter(self, target: str):
        """The parameter at dotted path `target`."""
        return self._get_member(target, "_parameter_names", "parameter")

    def get_buffer(self, target: str):
        """The buffer at dotted path `target`."""
        return self._get_member(target, "_buffer_names", "buffer")

    def _get_member(self, target, kind, what):
        mod_path, _, name = target.rpartition(".")
        mod = self.get_submodule(mod_path)
        if name not in mod.__dict__:
            raise AttributeError(f"{type(mod).__name__} has no attribute `{name}`")
        if name not in mod._names_of(kind):
            raise AttributeError(f"`{name}` is not a {what}")
        return mod.__dict__[name]

    # -- state -------------------------------------------------------------------
    def state_dict(self, destination=None, prefix: str = "", keep_vars: bool = False) -> "OrderedDict[str, object]":
        """Parameters, then persistent buffers, of each module by dotted name, as in
        PyTorch (same names, order and layouts; a tied weight under each of its names)."""
        out = OrderedDict() if destination is None else destination
        for mod_name, mod in self.named_modules(prefix=prefix.rstrip("."), remove_duplicate=False):
            skip = mod._names_of("_non_persistent")
            for buffers in (False, True):
                for name, value in mod._own_arrays(buffers):
                    if name not in skip:
                        out[f"{mod_name}.{name}" if mod_name else name] = value
        return out

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy arrays in by name.  Everything is checked before anything
        changes: missing and unexpected keys (with strict=True), mis-shaped
        values, and values the model's dtype cannot hold without losing
        information (fractions or out-of-range numbers for an integer buffer,
        complex numbers for a real array, strings, objects) raise one error
        listing all of them, and leave the model as it was.  The values are
        copied into the model's own arrays (never the given arrays themselves),
        so a weight tied under two names stays tied.  Returns (missing_keys,
        unexpected_keys)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        converted, misshaped, mistyped = _convert_all(own, state_dict)
        if misshaped or mistyped or (strict and (missing or unexpected)):
            raise self._load_error(missing, unexpected, misshaped, mistyped)
        # Device copies first, writes last: a failure here (out of device memory)
        # still leaves every array of the model as it was.  Each value is copied
        # into the model's own array, so arrays shared by two names (tied
        # weights) and views of flat parameter buffers stay what they are.
        new = {key: backend_of(own[key]).asarray(host) for key, host in converted.items()}
        for key, value in new.items():
            avalon.assign(own[key], value)
        return missing, unexpected

    def _load_error(self, missing, unexpected, misshaped, mistyped) -> AvalonError:
        parts = []
        if missing:
            parts.append("missing keys: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected))
        if misshaped:
            parts.append("mis-shaped keys: " + "; ".join(misshaped))
        if mistyped:
            parts.append("mis-typed keys: " + "; ".join(mistyped))
        hint = ("; nothing was loaded.  Load a state dict saved from this architecture, or pass strict=False "
                "to load the matching keys" if missing or unexpected else "; nothing was loaded")
        # a wrong shape or a missing key is a structural mismatch; otherwise only the dtypes are wrong
        kind = avalon.ShapeError if misshaped or (missing or unexpected) else avalon.DtypeError
        return kind(f"load_state_dict into {type(self).__name__} failed{at(user_location())}: "
                    + "; ".join(parts) + hint)

    # -- modes and devices ---------------------------------------------------------
    def train(self, mode: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def to(self, device):
        """Move every array of the module to `device`, in place; returns self."""
        moved = avalon.to_device(self, device)
        for (_, mine), (_, theirs) in zip(self.named_modules(), moved.named_modules()):
            for name, value in vars(theirs).items():
                if is_array(value):
                    object.__setattr__(mine, name, value)
        return self

    def apply(self, fn):
        """fn(module) on every child (recursively, children first), then on self, as torch."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # -- printing --------------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        children = list(self.named_children())
        head = f"{type(self).__name__}({self.extra_repr()}"
        if not children:
            return head + ")"
        lines = [head]
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + "\n)"


# -- load_state_dict: values the model's arrays can take ----------------------------------------------------------

def _convert_all(own, state_dict):
    """({key: a fresh host array of the model's dtype}, mis-shaped keys,
    mis-typed keys) for the keys of `own` found in `state_dict`."""
    converted, misshaped, mistyped = {}, [], []
    for key, target in own.items():
        if key not in state_dict:
            continue
        dtype, value = np.dtype(target.dtype), state_dict[key]
        try:
            host = _to_host(value)
        except (TypeError, ValueError) as e:
            mistyped.append(f"{key}: model {dtype.name}, given {_kind_of(value)} that is not an array ({e})")
            continue
        if tuple(host.shape) != tuple(target.shape):
            misshaped.append(f"{key}: model {tuple(target.shape)}, given {tuple(host.shape)}")
            continue
        problem = _lossy_cast(host, dtype)
        if problem is not None:
            mistyped.append(f"{key}: model {dtype.name}, given {_dtype_label(host.dtype)} {problem}")
            continue
        with np.errstate(over="ignore"):  # overflow to infinity was ruled out by _lossy_cast
            converted[key] = host.astype(dtype, copy=True)
    return converted, misshaped, mistyped


def _dtype_label(dtype: np.dtype) -> str:
    return dtype.name if dtype.kind in "biufc" else str(dtype)  # '<U5' rather than 'str160'


def _to_host(value) -> np.ndarray:
    """A NumPy array of a state-dict value: an array of any backend, a torch
    tensor, a NumPy or Python scalar, or a (nested) list of numbers."""
    if is_array(value):
        return np.asarray(backend_of(value).to_host(value))
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor
        tensor = value.detach().cpu()
        try:
            return tensor.numpy()
        except TypeError:
            if not tensor.is_floating_point():
                raise
            # NumPy has no bfloat16 or float8: float32 holds their values exactly
            return tensor.float().numpy()
    return np.asarray(value)


def _lossy_cast(host: np.ndarray, dtype: np.dtype):
    """Why `host` cannot become `dtype` without losing information, or None."""
    src = host.dtype
    if src.kind not in "biufc":
        return "values, which are not numbers: convert them to numbers first"
    if src.kind == "c" and dtype.kind != "c":
        return ("(complex values do not fit a real array; pass value.real to drop their imaginary parts "
                "on purpose)")
    if dtype.kind in "biu":
        return _lossy_integer_cast(host, dtype)
    if dtype.kind in "fc" and not np.can_cast(src, dtype, "safe"):
        with np.errstate(over="ignore", invalid="ignore"):
            overflow = np.isinf(host.astype(dtype)) & np.isfinite(host)
        if overflow.any():
            return (f"with values outside the range of {dtype.name} (e.g. {host[overflow].flat[0]!r}); "
                    f"rescale them or give the model a wider dtype")
    return None


def _lossy_integer_cast(host: np.ndarray, dtype: np.dtype):
    """Why real numbers `host` cannot become integer or bool `dtype` exactly, or None."""
    if host.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            fractional = ~np.isfinite(host) | (host != np.trunc(host))
        if fractional.any():
            return (f"with non-integer values (e.g. {host[fractional].flat[0]!r}) for an integer array; "
                    f"round them first (np.round(value).astype(np.{dtype.name})) if that is meant")
    low, high = (0, 1) if dtype.kind == "b" else (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
    # high + 1 is exact in floating point where high itself may round up (2**63 - 1 -> 2**63)
    outside = (host < low) | (host >= high + 1) if host.dtype.kind == "f" else (host < low) | (host > high)
    if outside.any():
        return f"with values outside the range of {dtype.name} (e.g. {host[outside].flat[0]!r})"
    return None


# -- checking the arguments of a call ---------------------------------------------------------------------------

_ALWAYS_USABLE = (np.ndarray, Tracer, np.generic, bool, int, float, complex)
_OWN_PACKAGES = ("avalon.", "avalon_layers.")
_NESTING_CHECKED = 3  # levels of lists, tuples and dicts searched for a foreign array
_forward_specs: "weakref.WeakKeyDictionary[type, tuple]" = weakref.WeakKeyDictionary()


def _check_arguments(module, args, kwargs) -> None:
    names, strict = _forward_spec(type(module))
    for i, value in enumerate(args):
        name = names[i] if i < len(names) else f"argument {i + 1}"
        _check_argument(module, name, value, name in strict)
    for name, value in kwargs.items():
        _check_argument(module, name, value, name in strict)


def _forward_spec(cls):
    """(names of forward's positional parameters, names that must be arrays), per class."""
    spec = _forward_specs.get(cls)
    if spec is None:
        spec = _forward_specs[cls] = _make_forward_spec(cls)
    return spec


def _make_forward_spec(cls):
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]  # after self
    except (TypeError, ValueError):
        params = []
    names = []
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name)
    # Only Avalon's own forward() has a known contract; a user's forward takes what it likes.
    own = (getattr(cls.forward, "__module__", None) or "").startswith(_OWN_PACKAGES)
    return tuple(names), frozenset(cls._array_arguments) if own else frozenset()


def _check_argument(module, name: str, value, must_be_array: bool) -> None:
    if isinstance(value, _ALWAYS_USABLE) or _is_backend_array(value):
        return
    if must_be_array:
        raise _input_error(module, value, f"as {name}")
    foreign = _foreign_array_in(value, _NESTING_CHECKED)
    if foreign is not None:
        raise _input_error(module, foreign, f"as {name}" if foreign is value else f"inside {name}")


def _is_backend_array(x) -> bool:
    if is_array(x):
        return True
    if not looks_like_foreign_array(x):
        return False
    try:
        backend_of(x)  # also finds array types of backends not looked up yet (CuPy's)
    except DeviceError:
        return False
    return True


def _foreign_array_in(value, depth: int):
    """The first array in `value` (searched `depth` levels into lists, tuples
    and dicts) that no installed backend owns, or None."""
    if isinstance(value, (list, tuple)):
        items = value
    elif isinstance(value, dict):
        items = value.values()
    else:
        usable = isinstance(value, _ALWAYS_USABLE) or not looks_like_foreign_array(value) or _is_backend_array(value)
        return None if usable else value
    if depth == 0:
        return None
    for item in items:
        found = _foreign_array_in(item, depth - 1)
        if found is not None:
            return found
    return None


def _input_error(module, value, where: str) -> LayerInputError:
    return LayerInputError(f"{_describe(module)} got {_kind_of(value)} {where}{at(user_location())}; "
                           f"{_fix_for(value)}")


def _describe(module) -> str:
    try:
        return f"{type(module).__name__}({module.extra_repr()})"
    except Exception:  # a user's extra_repr that fails must not hide the real error
        return type(module).__name__


def _kind_of(value) -> str:
    t = type(value)
    if value is None:
        return "None"
    if t in (list, tuple, dict):
        return f"a Python {t.__name__}"
    if t.__module__ == "builtins":
        return f"a {t.__name__}"
    return f"a {t.__module__}.{t.__qualname__}"


def _fix_for(value) -> str:
    library = type(value).__module__.partition(".")[0]
    if library == "torch":
        return ("pass a NumPy array (tensor.numpy(), or tensor.detach().cpu().numpy() for a tensor that "
                "requires grad or lives on a GPU) or an avalon array")
    if library == "cupy":
        return (f"no installed avalon backend takes CuPy arrays: {install_hint('avalon-cuda')}; "
                "or pass a NumPy array (value.get())")
    if isinstance(value, (list, tuple)):
        return "pass an array instead: np.asarray(value, dtype=np.float32), with the dtype the layer needs"
    return f"pass a NumPy array or an array of an installed avalon backend ({_backend_names()})"


def _backend_names() -> str:
    try:
        return ", ".join(b.name for b in backends() if b.available) or "none available"
    except Exception:  # only decorates a message: never replace the error being raised
        return "see avalon.backends()"
