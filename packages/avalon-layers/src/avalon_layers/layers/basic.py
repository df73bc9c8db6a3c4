"""Basic layers: Linear, Identity, Flatten, Dropout, Embedding, and the
containers Sequential, ModuleList, ModuleDict, ParameterList and ParameterDict;
F.linear, F.dropout, F.embedding.

Also the helpers the other layer files share: parameter creation in a dtype
(`new_param` declares a layer's parameter, `new_buffer` makes an array for
register_buffer), placement on a device, and the ShapeError a layer raises for
a bad input.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

import avalon
from avalon.errors import at, user_location
from avalon.tree import is_array

from .. import init
from ..module import Module, Parameter
from ..registry import export

_BASIC = "Basic layers"


# -- shared helpers ------------------------------------------------------------------------------------

def new_param(shape, dtype=None):
    """An uninitialized parameter array (float32 unless `dtype` says otherwise),
    declared a parameter (nn.Parameter): the way a layer makes its weights."""
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    if dtype.kind != "f":
        raise avalon.DtypeError(f"parameters must be floating-point, got dtype {dtype.name}")
    return Parameter(np.empty(tuple(int(s) for s in shape), dtype=dtype))


def new_buffer(shape, dtype=None):
    """An uninitialized floating-point array for register_buffer (not a parameter)."""
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    if dtype.kind != "f":
        raise avalon.DtypeError(f"buffers made by new_buffer must be floating-point, got dtype {dtype.name}")
    return np.empty(tuple(int(s) for s in shape), dtype=dtype)


def place(module: Module, device) -> None:
    """Move a freshly built layer to `device` (the device= argument of torch's constructors)."""
    if device is not None:
        module.to(device)


def shape_error(who, expected: str, got) -> avalon.ShapeError:
    """The error of a layer given a wrongly shaped input; `who` is the layer (named by its repr)."""
    name = who if isinstance(who, str) else repr(who)
    return avalon.ShapeError(f"{name} expects input of shape {expected}, got {tuple(got)}"
                             f"{at(user_location())}")


def reset_linear_like(weight, bias) -> None:
    """PyTorch's default initialization of Linear and Conv layers."""
    init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in, _ = init._calculate_fan_in_and_fan_out(weight)
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
        init.uniform_(bias, -bound, bound)


# -- functional forms -------------------------------------------------------------------------------------

@export("functional", _BASIC)
def linear(input, weight, bias=None):
    """input @ weight.T + bias, weight laid out (out_features, in_features)."""
    return avalon.linear(input, weight, bias)


@export("functional", _BASIC)
def dropout(input, p: float = 0.5, training: bool = True, inplace: bool = False):
    """Zero each element with probability p and scale the others by 1/(1-p), in training only."""
    _check_p("dropout", p)
    return avalon.dropout(input, p, bool(training))


def _check_p(who, p):
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{who}: dropout probability has to be between 0 and 1, but got {p}")


@export("functional", _BASIC)
def embedding(input, weight, padding_idx=None, max_norm=None, norm_type: float = 2.0,
              scale_grad_by_freq: bool = False, sparse: bool = False):
    """Rows of `weight` (num_embeddings, embedding_dim) at the integer indices `input`;
    the row padding_idx gets no gradient.  max_norm and scale_grad_by_freq are not supported."""
    return _embedding("embedding", input, weight, padding_idx, max_norm, scale_grad_by_freq)


def _embedding(who, input, weight, padding_idx, max_norm, scale_grad_by_freq):
    if max_norm is not None or scale_grad_by_freq:
        raise NotImplementedError(f"{who}: max_norm and scale_grad_by_freq are not supported")
    if np.dtype(input.dtype).kind not in "iu":
        raise avalon.DtypeError(f"{who}: indices must be integers (int32 or int64), got "
                                f"{np.dtype(input.dtype).name}{at(user_location())}")
    n = int(weight.shape[0])
    # numpy would wrap negative indices around; PyTorch rejects them.  Checked for eager host
    # inputs only: traced indices have no values yet.
    if isinstance(input, np.ndarray) and input.size and (input.min() < 0 or input.max() >= n):
        raise IndexError(f"{who}: index out of range: indices must lie in [0, {n - 1}], got values "
                         f"from {input.min()} to {input.max()}{at(user_location())}")
    out = avalon.getitem(weight, input)
    if padding_idx is None:
        return out
    padding_idx = padding_idx + n if padding_idx < 0 else padding_idx
    # the padding row is looked up as usual, but no gradient flows into it
    at_padding = avalon.expand_dims(avalon.eq(input, padding_idx), -1)
    return avalon.where(at_padding, avalon.stop_gradient(out), out)


# -- layers --------------------------------------------------------------------------------------------------

@export("nn", _BASIC)
class Linear(Module):
    """y = x W^T + b with W (out_features, in_features); input (*, in_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = new_param((out_features, in_features), dtype)
        self.bias = new_param((out_features,), dtype) if bias else None
        self.reset_parameters()
        place(self, device)

    def reset_parameters(self):
        reset_linear_like(self.weight, self.bias)

    def forward(self, input):
        shape = tuple(input.shape)
        if not shape or shape[-1] != self.in_features:
            raise shape_error(self, f"(*, {self.in_features}) (last dim = in_features = {self.in_features})",
                              shape)
        return avalon.linear(input, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@export("nn", _BASIC)
class Identity(Module):
    """Returns its input; accepts and ignores any constructor arguments, as in PyTorch."""

    _array_arguments = ()  # returns anything it is given, as torch.nn.Identity does

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, input):
        return input


@export("nn", _BASIC)
class Flatten(Module):
    """Merges the dims start_dim..end_dim into one: (N, C, H, W) -> (N, C*H*W) by default."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, input):
        shape = tuple(input.shape)
        needed = max(d + 1 if d >= 0 else -d for d in (self.start_dim, self.end_dim))
        if max(len(shape), 1) < needed:
            raise shape_error(self, f"with at least {needed} dims", shape)
        if not shape:
            return avalon.reshape(input, (1,))  # as torch.flatten: a 0-d input becomes (1,)
        nd = len(shape)
        start, end = self.start_dim % nd, self.end_dim % nd
        if start > end:
            raise shape_error(self, f"in which dim start_dim={self.start_dim} does not come after dim "
                                    f"end_dim={self.end_dim}", shape)
        return avalon.flatten(input, start, end)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


@export("nn", _BASIC)
class Dropout(Module):
    """During training, zero each element with probability p and scale the rest by
    1/(1-p); in eval mode, the identity."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        _check_p("Dropout", p)
        self.p, self.inplace = p, inplace

    def forward(self, input):
        return avalon.dropout(input, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}, inplace={self.inplace}"


@export("nn", _BASIC)
class Embedding(Module):
    """A lookup table: integer indices (any shape) -> rows of weight (num_embeddings,
    embedding_dim), initialized N(0, 1).  The padding_idx row starts at zero and
    receives no gradient."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx=None, max_norm=None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False,
                 _weight=None, _freeze: bool = False, device=None, dtype=None):
        super().__init__()
        if max_norm is not None or scale_grad_by_freq:
            raise NotImplementedError("Embedding: max_norm and scale_grad_by_freq are not supported")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.padding_idx = self._padding_index(padding_idx)
        self.max_norm, self.norm_type = max_norm, norm_type
        self.scale_grad_by_freq, self.sparse = scale_grad_by_freq, sparse
        if _weight is None:
            self.weight = new_param((num_embeddings, embedding_dim), dtype)
            self.reset_parameters()
        else:
            self.weight = self._given_weight(_weight, dtype)
        if _freeze:
            self.requires_grad_(False)
        place(self, device)

    def _padding_index(self, padding_idx):
        if padding_idx is None:
            return None
        n = self.num_embeddings
        if not -n <= padding_idx < n:
            raise ValueError(f"Embedding: padding_idx must be within num_embeddings ({n}), got {padding_idx}")
        return padding_idx + n if padding_idx < 0 else padding_idx

    def _given_weight(self, weight, dtype):
        w = np.array(weight, dtype=np.float32 if dtype is None else dtype)
        if w.shape != (self.num_embeddings, self.embedding_dim):
            raise avalon.ShapeError(f"Embedding: _weight has shape {w.shape}, expected "
                                    f"({self.num_embeddings}, {self.embedding_dim})")
        return Parameter(w)

    def reset_parameters(self):
        init.normal_(self.weight)
        if self.padding_idx is not None:
            self.weight[self.padding_idx] = 0

    def forward(self, input):
        return _embedding(repr(self), input, self.weight, self.padding_idx, None, False)

    def extra_repr(self):
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.norm_type != 2:
            s += f", norm_type={self.norm_type}"
        if self.sparse:
            s += ", sparse=True"
        return s


# -- containers -----------------------------------------------------------------------------------------------

class _Container(Module):
    """Children held as attributes named "0", "1", ... (or given names), in order, so
    that parameter names ("0.weight") are PyTorch's."""

    def _add(self, name: str, module) -> None:
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__}: {type(module).__name__} is not a Module subclass")
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"{type(self).__name__}: module name must be a non-empty string without '.', "
                           f"got {name!r}")
        if name in vars(self) and not isinstance(vars(self)[name], Module) or hasattr(type(self), name):
            raise KeyError(f"{type(self).__name__}: attribute {name!r} already exists")
        setattr(self, name, module)

    def _names(self):
        return [name for name, _ in self.named_children()]

    def _index(self, idx: int) -> str:
        names = self._names()
        if not -len(names) <= idx < len(names):
            raise IndexError(f"index {idx} is out of range for {type(self).__name__} of length {len(names)}")
        return names[idx]

    def _renumber(self, modules) -> None:
        """Hold exactly `modules`, named "0", "1", ... (after deletions and insertions)."""
        for name in self._names():
            delattr(self, name)
        for i, m in enumerate(modules):
            self._add(str(i), m)

    def __len__(self):
        return len(self._names())

    def __iter__(self):
        return iter(self.children())

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return type(self)(OrderedDict(list(self.named_children())[idx]))
        return getattr(self, self._index(idx))

    def __setitem__(self, idx: int, module) -> None:
        name = self._index(idx)
        if not isinstance(module, Module):
            raise TypeError(f"{type(self).__name__}: {type(module).__name__} is not a Module subclass")
        setattr(self, name, module)

    def __delitem__(self, idx) -> None:
        keep = list(self.children())
        gone = set(range(len(keep))[idx]) if isinstance(idx, slice) else {self._names().index(self._index(idx))}
        self._renumber([m for i, m in enumerate(keep) if i not in gone])

    def append(self, module):
        """Add `module` at the end (named str(len(self)))."""
        self._add(str(len(self)), module)
        return self

    def extend(self, modules):
        """Append every module of an iterable."""
        for m in modules:
            self.append(m)
        return self

    def insert(self, index: int, module) -> None:
        """Insert `module` before position `index`; children are renumbered."""
        mods = list(self.children())
        n = len(mods)
        if not -n <= index <= n:
            raise IndexError(f"index {index} is out of range for {type(self).__name__} of length {n}")
        mods.insert(index, module)
        self._renumber(mods)


@export("nn", _BASIC)
class Sequential(_Container):
    """Calls its layers in order.  Sequential(l1, l2, ...) names them "0", "1", ...;
    Sequential(OrderedDict([("conv", ...), ...])) uses the given names."""

    _array_arguments = ()  # its first layer checks the input: whatever that layer takes, Sequential takes

    def __init__(self, *args):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for name, module in args[0].items():
                self._add(name, module)
        else:
            for i, module in enumerate(args):
                self._add(str(i), module)

    def forward(self, input):
        for module in self:
            input = module(input)
        return input


@export("nn", _BASIC)
class ModuleList(_Container):
    """A list of layers, registered as children ("0", "1", ...) so that their parameters
    are the list's; it has no forward of its own."""

    def __init__(self, modules=None):
        super().__init__()
        if isinstance(modules, OrderedDict):  # what slicing passes
            modules = modules.values()
        for module in modules or ():
            self.append(module)

    def __repr__(self):
        # PyTorch compresses runs of identical children: "(0-2): 3 x ReLU()"
        reprs = [repr(m) for m in self]
        if not reprs:
            return "ModuleList()"
        runs = []  # [start, end, repr]
        for i, r in enumerate(reprs):
            if runs and runs[-1][2] == r:
                runs[-1][1] = i
            else:
                runs.append([i, i, r])
        lines = []
        for start, end, r in runs:
            head = f"({start}): " if start == end else f"({start}-{end}): {end - start + 1} x "
            lines.append((head + r).replace("\n", "\n  "))
        return "ModuleList(\n  " + "\n  ".join(lines) + "\n)"


@export("nn", _BASIC)
class ModuleDict(Module):
    """Layers by name, registered as children under their keys (insertion order), as
    torch.nn.ModuleDict; it has no forward of its own."""

    _array_arguments = ()

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key: str):
        if key not in self:
            raise KeyError(key)
        return self.__dict__[key]

    def __setitem__(self, key: str, module) -> None:
        self.add_module(key, module)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        delattr(self, key)

    def __len__(self):
        return len(self.keys())

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and isinstance(self.__dict__.get(key), Module)

    def keys(self):
        return [name for name, _ in self.named_children()]

    def items(self):
        return list(self.named_children())

    def values(self):
        return self.children()

    def clear(self) -> None:
        for key in self.keys():
            del self[key]

    def pop(self, key: str):
        module = self[key]
        del self[key]
        return module

    def update(self, modules) -> None:
        """Add (name, module) pairs from a mapping or an iterable of pairs."""
        pairs = modules.items() if hasattr(modules, "items") else modules
        for key, module in pairs:
            self[key] = module


class _ParameterContainer(Module):
    """Arrays registered as parameters under names, in insertion order."""

    _array_arguments = ()

    def _keys(self):
        names = self._names_of("_parameter_names")
        return [name for name in vars(self) if name in names]

    def _put(self, name: str, value) -> None:
        if not is_array(value):
            raise TypeError(f"{type(self).__name__}: {type(value).__name__} is not an array")
        if not isinstance(value, Parameter):
            value = Parameter(value)
        self.register_parameter(name, value)

    def __len__(self):
        return len(self._keys())

    def extra_repr(self):
        return "\n".join(f"({k}): Parameter containing: [{np.dtype(v.dtype).name} of size {tuple(v.shape)}]"
                         for k, v in ((k, self.__dict__[k]) for k in self._keys()))


@export("nn", _BASIC)
class ParameterList(_ParameterContainer):
    """A list of parameters named "0", "1", ..., as torch.nn.ParameterList; arrays
    given that are not nn.Parameter yet are made parameters."""

    def __init__(self, values=None):
        super().__init__()
        self.extend(values or ())

    def _key(self, idx: int) -> str:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} is out of range for ParameterList of length {n}")
        return str(idx % n)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return ParameterList([self[i] for i in range(len(self))[idx]])
        return self.__dict__[self._key(idx)]

    def __setitem__(self, idx: int, value) -> None:
        self._put(self._key(idx), value)

    def __iter__(self):
        return iter([self.__dict__[k] for k in self._keys()])

    def append(self, value):
        self._put(str(len(self)), value)
        return self

    def extend(self, values):
        for v in values:
            self.append(v)
        return self


@export("nn", _BASIC)
class ParameterDict(_ParameterContainer):
    """Parameters by name, as torch.nn.ParameterDict; arrays given that are not
    nn.Parameter yet are made parameters."""

    def __init__(self, parameters=None):
        super().__init__()
        if parameters is not None:
            self.update(parameters)

    def __getitem__(self, key: str):
        if key not in self:
            raise KeyError(key)
        return self.__dict__[key]

    def __setitem__(self, key: str, value) -> None:
        self._put(key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        delattr(self, key)

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key in self._names_of("_parameter_names") and key in self.__dict__

    def __iter__(self):
        return iter(self._keys())

    def keys(self):
        return self._keys()

    def items(self):
        return [(k, self.__dict__[k]) for k in self._keys()]

    def values(self):
        return [self.__dict__[k] for k in self._keys()]

    def pop(self, key: str):
        value = self[key]
        del self[key]
        return value

    def update(self, parameters) -> None:
        pairs = parameters.items() if hasattr(parameters, "items") else parameters
        for key, value in pairs:
            self[key] = value
