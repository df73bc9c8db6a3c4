"""nn.Module: optional base class of layers, as in PyTorch.

Parameters are plain arrays held as attributes: a model is a plain object that
avalon.grad walks.  A module adds names (named_parameters, state_dict), modes
(train/eval) and devices (to).  Buffers (BatchNorm's running statistics) are
arrays registered with register_buffer: saved in state_dict, never trained.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

import avalon
from avalon.backends import backend_of
from avalon.tree import is_array

from .registry import export


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

    def __call__(self, *args, **kwargs):
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
        """Copy arrays in by name.  With strict=True, missing, unexpected and
        mis-shaped keys raise one error listing all of them.  Returns
        (missing_keys, unexpected_keys)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        misshaped = [f"{k}: model {tuple(own[k].shape)}, given {tuple(np.shape(state_dict[k]))}"
                     for k in own if k in state_dict and tuple(own[k].shape) != tuple(np.shape(state_dict[k]))]
        if misshaped or (strict and (missing or unexpected)):
            parts = []
            if missing:
                parts.append("missing keys: " + ", ".join(missing))
            if unexpected:
                parts.append("unexpected keys: " + ", ".join(unexpected))
            if misshaped:
                parts.append("mis-shaped keys: " + "; ".join(misshaped))
            raise avalon.ShapeError(f"load_state_dict into {type(self).__name__} failed: " + "; ".join(parts))
        modules = dict(self.named_modules())
        for key, value in state_dict.items():
            if key not in own:
                continue
            mod_name, _, attr = key.rpartition(".")
            mod = modules[mod_name]
            target = own[key]
            host = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
            new = backend_of(target).asarray(host.astype(target.dtype, copy=False))
            object.__setattr__(mod, attr, new)
        return missing, unexpected

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
