"""nn.Module: optional base class of layers, as in PyTorch.

Parameters are plain arrays held as attributes: a model is a plain object that
avalon.grad walks.  A module adds names (named_parameters, state_dict), modes
(train/eval) and devices (to).  Buffers (BatchNorm's running statistics) are
arrays registered with register_buffer: saved in state_dict, never trained.

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


def _is_float_array(x) -> bool:
    return is_array(x) and np.dtype(x.dtype).kind == "f"


@export("nn", "Basic layers")
class Module:
    """Base class: subclasses set arrays and sub-modules as attributes in
    __init__ (after super().__init__()) and define forward()."""

    def __init__(self):
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_buffer_names", frozenset())

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
    def register_buffer(self, name: str, value) -> None:
        object.__setattr__(self, "_buffer_names", self.__dict__.get("_buffer_names", frozenset()) | {name})
        setattr(self, name, value)

    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def children(self):
        return [m for _, m in self.named_children()]

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def _own_arrays(self, buffers: bool):
        # gradients (which mirror a module) hold None for its non-array fields
        names = self.__dict__.get("_buffer_names") or frozenset()
        for name, value in vars(self).items():
            if buffers and name in names and is_array(value):
                yield name, value
            elif not buffers and name not in names and _is_float_array(value):
                yield name, value

    def named_parameters(self, prefix: str = ""):
        for mod_name, mod in self.named_modules(prefix):
            for name, value in mod._own_arrays(buffers=False):
                yield (f"{mod_name}.{name}" if mod_name else name), value

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = ""):
        for mod_name, mod in self.named_modules(prefix):
            for name, value in mod._own_arrays(buffers=True):
                yield (f"{mod_name}.{name}" if mod_name else name), value

    def buffers(self):
        return [b for _, b in self.named_buffers()]

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, object]":
        """Parameters and buffers by dotted name, as in PyTorch (same names and layouts)."""
        out = OrderedDict()
        for mod_name, mod in self.named_modules():
            names = mod.__dict__.get("_buffer_names") or frozenset()
            for name, value in vars(mod).items():
                if _is_float_array(value) or (name in names and is_array(value)):
                    out[f"{mod_name}.{name}" if mod_name else name] = value
        return out

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy arrays in by name.  Everything is checked before anything
        changes: missing and unexpected keys (with strict=True), mis-shaped
        values, and values the model's dtype cannot hold without losing
        information (fractions or out-of-range numbers for an integer buffer,
        complex numbers for a real array, strings, objects) raise one error
        listing all of them, and leave the model as it was.  The model gets
        copies, never the given arrays themselves.  Returns (missing_keys,
        unexpected_keys)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        converted, misshaped, mistyped = _convert_all(own, state_dict)
        if misshaped or mistyped or (strict and (missing or unexpected)):
            raise self._load_error(missing, unexpected, misshaped, mistyped)
        # Device copies first, assignments last: a failure here (out of device memory)
        # still leaves every array of the model as it was.
        new = {key: backend_of(own[key]).asarray(host) for key, host in converted.items()}
        modules = dict(self.named_modules())
        for key, value in new.items():
            mod_name, _, attr = key.rpartition(".")
            object.__setattr__(modules[mod_name], attr, value)
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
        for m in self.modules():
            fn(m)
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
