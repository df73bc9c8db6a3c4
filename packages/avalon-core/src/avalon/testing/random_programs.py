"""Random programs for differential testing against PyTorch.

`random_program(seed, index)` builds program `index` of the stream `seed`: a
small random DAG of Avalon ops over random shapes (elementwise ops, scalar
constants, broadcasting binary ops, reductions, reshapes, transposes, slices,
concatenation, matmul, softmax, where) ending in a scalar loss.  Every program
exists twice, as Avalon source and as the equivalent PyTorch source, built line
by line together; `RandomProgram.describe()` prints both, with the seed and
index that rebuild it.

    program = random_program(seed=0, index=17)
    check_against_torch(program, "float64")   # AssertionError naming the program

Programs stay where their ops are smooth, so that gradients are well defined
and comparable: each line is evaluated (in PyTorch, float64) as it is
generated, and an op whose operand is outside its domain gets a guard line
first (log(x) becomes log(square(x) + c); relu(x) near a kink becomes
relu(x + shift)), or is not used; max/min reductions and maximum/minimum are
used only without ties.  Lines whose values are not finite or too large are
dropped.

PyTorch is imported only when a program is built or checked.
"""
from __future__ import annotations

import linecache
from dataclasses import dataclass
from typing import Callable

import numpy as np

import avalon

__all__ = ["Line", "RandomProgram", "random_program", "check_against_torch", "TOLERANCES", "OP_KINDS", "UNARY",
           "BINARY", "REDUCTIONS"]

#: (rtol, atol) for comparing with PyTorch's float64 results, per dtype of the
#: Avalon run; atol is relative to the largest magnitude of the compared array.
#: (The worst error seen over 2000 programs was under a tenth of these.)
TOLERANCES = {"float64": (1e-10, 1e-10), "float32": (1e-4, 1e-4)}

MAX_SIZE = 240          # elements of any value
MAX_MAGNITUDE = 1e3     # a line with a larger value is dropped
KINK_MARGIN = 1e-3      # relative distance kept from kinks and ties


@dataclass(frozen=True)
class Line:
    """`target = avalon_expr` in the Avalon program, `target = torch_expr` in PyTorch's."""
    target: str
    avalon: str
    torch: str
    kind: str           # the op kind that produced it (a guard is "guard")


@dataclass
class RandomProgram:
    seed: int
    index: int
    input_names: list[str]
    inputs: list[np.ndarray]                 # float64; see inputs_as
    constants: dict[str, np.ndarray]         # float64 arrays captured by the program
    lines: list[Line]
    outputs: list[str]                       # the values nothing else uses (the DAG's sinks)
    loss: str = "loss"

    # -- sources ---------------------------------------------------------------------------------
    def source(self, lib: str = "avalon", returns: str | None = None) -> str:
        """The program as Python source: lib "avalon" or "torch"."""
        body = [f"    {ln.target} = {getattr(ln, lib)}" for ln in self.lines]
        ret = returns or self.loss
        return "\n".join([f"def program({', '.join(self.input_names)}):", *body, f"    return {ret}", ""])

    def describe(self) -> str:
        """Everything needed to read and rebuild the program."""
        ins = ", ".join(f"{n}: {_type_text(a)}" for n, a in zip(self.input_names, self.inputs))
        consts = ", ".join(f"{n}: {_type_text(a)}" for n, a in self.constants.items()) or "none"
        return (f"random program seed={self.seed} index={self.index} (rebuild it with "
                f"avalon.testing.random_programs.random_program({self.seed}, {self.index}))\n"
                f"inputs: {ins}\nconstants: {consts}\n"
                f"{self.source('avalon')}\nPyTorch reference:\n{self.source('torch')}")

    # -- callables -------------------------------------------------------------------------------
    def inputs_as(self, dtype) -> list[np.ndarray]:
        return [np.asarray(a, dtype=dtype) for a in self.inputs]

    def avalon_fn(self, dtype="float64", device=None) -> Callable:
        """inputs -> scalar loss, in Avalon."""
        return self._compile("avalon", self.loss, self._avalon_namespace(dtype, device))

    def avalon_forward_fn(self, dtype="float64", device=None) -> Callable:
        """inputs -> (every sink value..., loss), in Avalon."""
        return self._compile("avalon", self._forward_returns(), self._avalon_namespace(dtype, device))

    def torch_fn(self, dtype="float64") -> Callable:
        """tensors -> scalar loss, in PyTorch."""
        return self._compile("torch", self.loss, self._torch_namespace(dtype))

    def torch_forward_fn(self, dtype="float64") -> Callable:
        return self._compile("torch", self._forward_returns(), self._torch_namespace(dtype))

    def _forward_returns(self):
        return ", ".join(self.outputs + [self.loss])

    def _avalon_namespace(self, dtype, device):
        consts = {n: np.asarray(c, dtype=dtype) for n, c in self.constants.items()}
        if device is not None:
            consts = avalon.to_device(consts, device)
        return {"avalon": avalon, "np": np, **consts}

    def _torch_namespace(self, dtype):
        torch = _torch()
        tdtype = getattr(torch, np.dtype(dtype).name)
        consts = {n: torch.tensor(c, dtype=tdtype) for n, c in self.constants.items()}
        return {"torch": torch, "F": torch.nn.functional, **consts}

    def _compile(self, lib, returns, namespace):
        src = self.source(lib, returns)
        # registered with linecache so that tracebacks and Avalon's error
        # locations show the program's lines
        filename = f"<random program {lib} seed={self.seed} index={self.index}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        exec(compile(src, filename, "exec"), namespace)  # noqa: S102 - our own generated source
        return namespace["program"]


def _type_text(a) -> str:
    return f"{np.asarray(a).dtype.name}{list(np.shape(a))}"


def _torch():
    import torch
    return torch


# -- the builder: values, lines, and their evaluation in PyTorch (float64) -------------------------

@dataclass
class _Value:
    name: str
    ref: object                    # torch float64 tensor
    is_input: bool = False

    @property
    def shape(self):
        return tuple(self.ref.shape)

    @property
    def ndim(self):
        return self.ref.dim()


class _Builder:
    def __init__(self, rng):
        self.rng = rng
        self.torch = _torch()
        self.values: list[_Value] = []
        self.inputs: list[tuple[str, np.ndarray]] = []
        self.constants: dict[str, np.ndarray] = {}
        self.lines: list[Line] = []
        self.used: set[str] = set()
        self._counter = 0

    # names
    def _fresh(self, prefix):
        self._counter += 1
        return f"{prefix}{self._counter}"

    # leaves
    def new_input(self, shape) -> _Value:
        """A new input; it joins the program only if a line that uses it is kept."""
        data = self.rng.standard_normal(shape)
        return _Value(self._fresh("x"), self.torch.tensor(data, dtype=self.torch.float64), is_input=True)

    def constant(self, shape) -> str:
        name = self._fresh("c")
        self.constants[name] = self.rng.standard_normal(shape)
        return name

    def scalar(self, low=0.25, high=3.0, ints=True) -> str:
        """A Python number, as source text: sometimes an int (x / 2), sometimes negative."""
        if ints and self.rng.random() < 0.25:
            return str(int(self.rng.integers(2, 4)))
        value = float(np.round(self.rng.uniform(low, high), 3))
        return repr(-value if self.rng.random() < 0.3 else value)

    # values
    def pick(self, accept=lambda v: True) -> _Value | None:
        """An existing value, recent ones likelier (deep chains) but any possible (fan-out)."""
        candidates = [v for v in self.values if accept(v)]
        if not candidates:
            return None
        weights = np.arange(1, len(candidates) + 1, dtype=float) ** 2
        return candidates[self.rng.choice(len(candidates), p=weights / weights.sum())]

    def emit(self, kind, avalon_expr, torch_expr, operands, target=None,
             max_magnitude=MAX_MAGNITUDE) -> _Value | None:
        """Evaluate the line in PyTorch; keep it (and any new inputs it uses) when its
        value is finite, at most max_magnitude and of at most MAX_SIZE elements; else
        drop it and return None.  (An expression PyTorch refuses is a bug of the
        generator: it raises.)"""
        ns = {"torch": self.torch, "F": self.torch.nn.functional}
        ns.update({v.name: v.ref for v in operands})
        ns.update({n: self.torch.tensor(c) for n, c in self.constants.items()})
        ref = eval(torch_expr, ns)  # noqa: S307 - our own generated expression
        if not self._acceptable(ref, max_magnitude):
            return None
        for v in operands:
            if v.is_input and v.name not in [n for n, _ in self.inputs]:
                self.inputs.append((v.name, v.ref.numpy().copy()))
                self.values.append(v)
            self.used.add(v.name)
        value = _Value(target or self._fresh("v"), ref)
        self.lines.append(Line(value.name, avalon_expr, torch_expr, kind))
        self.values.append(value)
        return value

    def _acceptable(self, ref, max_magnitude) -> bool:
        t = self.torch
        if not isinstance(ref, t.Tensor) or ref.dtype != t.float64 or ref.numel() > MAX_SIZE:
            return False
        return ref.numel() > 0 and bool(t.isfinite(ref).all()) and float(ref.abs().max()) <= max_magnitude

    # guards: keep an operand inside an op's domain
    def positive(self, v: _Value) -> _Value | None:
        """v itself when it is comfortably positive, else square(v) + c."""
        if float(v.ref.min()) > 0.2:
            return v
        c = repr(float(np.round(self.rng.uniform(0.3, 1.0), 3)))
        return self.emit("guard", f"avalon.square({v.name}) + {c}", f"torch.square({v.name}) + {c}", [v])

    def small(self, v: _Value, bound=4.0) -> _Value | None:
        """v itself when max(v) <= bound (exp stays moderate), else tanh(v)."""
        return v if float(v.ref.max()) <= bound else self.tanh(v)

    def bounded(self, v: _Value, bound=3.0) -> _Value | None:
        """v itself when max |v| <= bound (a moderate exponent), else tanh(v)."""
        return v if float(v.ref.abs().max()) <= bound else self.tanh(v)

    def tanh(self, v: _Value) -> _Value | None:
        return self.emit("guard", f"avalon.tanh({v.name})", f"torch.tanh({v.name})", [v])

    def away_from(self, v: _Value, point=0.0) -> _Value | None:
        """v itself when no element is near `point` (a kink), else v + shift."""
        if _clear_of(v.ref, point):
            return v
        for _ in range(8):
            shift = float(np.round(self.rng.uniform(-1.0, 1.0), 3))
            if _clear_of(v.ref + shift, point):
                return self.emit("guard", f"{v.name} + {shift!r}", f"{v.name} + {shift!r}", [v])
        return None


def _margin(ref) -> float:
    return KINK_MARGIN * max(1.0, float(ref.abs().max()))


def _clear_of(ref, point) -> bool:
    return bool(((ref - point).abs() > _margin(ref)).all())


def _no_ties(ref, dims) -> bool:
    """No group of a max/min reduction over `dims` has its two largest (or two
    smallest) elements closer than the margin."""
    t = _torch()
    if ref.dim() == 0:
        return True
    keep = [d for d in range(ref.dim()) if d not in dims]
    groups = ref.permute(*keep, *dims).reshape(-1, int(np.prod([ref.shape[d] for d in dims], dtype=np.int64)))
    if groups.shape[1] < 2:
        return True
    margin = _margin(ref)
    top = t.topk(groups, 2, dim=1).values
    bottom = t.topk(-groups, 2, dim=1).values
    return bool(((top[:, 0] - top[:, 1]) > margin).all() and ((bottom[:, 0] - bottom[:, 1]) > margin).all())


# -- shapes ------------------------------------------------------------------------------------------

def _random_shape(rng, max_rank=3):
    rank = int(rng.choice(np.arange(max_rank + 1), p=_rank_weights(max_rank)))
    return tuple(int(rng.choice([1, 2, 3, 4, 5], p=[0.15, 0.25, 0.25, 0.2, 0.15])) for _ in range(rank))


def _rank_weights(max_rank):
    w = np.array([0.1, 0.3, 0.35, 0.25, 0.1][:max_rank + 1])
    return w / w.sum()


def _broadcast_partner(rng, shape):
    """A shape that broadcasts with `shape`: some axes set to 1, maybe leading
    axes dropped, maybe a new leading axis."""
    out = [s if rng.random() < 0.6 else 1 for s in shape]
    out = out[int(rng.integers(0, len(out) + 1)) if rng.random() < 0.3 else 0:]
    if len(out) < 4 and rng.random() < 0.15:
        out.insert(0, int(rng.integers(2, 4)))
    return tuple(out)


def _broadcasts(a, b) -> bool:
    try:
        return int(np.prod(np.broadcast_shapes(a, b), dtype=np.int64)) <= MAX_SIZE
    except ValueError:
        return False


def _random_axes(rng, ndim):
    """(avalon axis text, torch dim tuple or None for all): None, an int (maybe
    negative), or a tuple of distinct axes."""
    if ndim == 0 or rng.random() < 0.3:
        return "None", None
    if rng.random() < 0.5:
        a = int(rng.integers(0, ndim))
        text = str(a - ndim if rng.random() < 0.3 else a)
        return text, (a,)
    k = int(rng.integers(1, ndim + 1))
    axes = tuple(sorted(int(a) for a in rng.choice(ndim, size=k, replace=False)))
    return repr(axes), axes


def _random_shape_of_size(n, rng, max_rank=4):
    """A random shape of n elements."""
    dims = []
    while n > 1 and len(dims) < max_rank - 1:
        divisors = [d for d in range(2, n + 1) if n % d == 0]
        d = int(rng.choice(divisors))
        dims.append(d)
        n //= d
    dims.append(n)
    if rng.random() < 0.3:
        dims.insert(int(rng.integers(0, len(dims) + 1)), 1)
    rng.shuffle(dims)
    return tuple(int(d) for d in dims)


# -- op kinds: each adds one op (and any guards it needs) or returns None -----------------------------

# name: (avalon forms, torch form, guard); {x} is the operand
UNARY = {
    "exp": (["avalon.exp({x})", "np.exp({x})"], "torch.exp({x})", "small"),
    "expm1": (["avalon.expm1({x})"], "torch.expm1({x})", "small"),
    "log": (["avalon.log({x})", "np.log({x})"], "torch.log({x})", "positive"),
    "log1p": (["avalon.log1p({x})"], "torch.log1p({x})", "positive"),
    "sqrt": (["avalon.sqrt({x})", "np.sqrt({x})"], "torch.sqrt({x})", "positive"),
    "pow_real": (["{x} ** 1.5", "avalon.pow({x}, 0.5)"], None, "positive"),
    "reciprocal": (["avalon.reciprocal({x})", "1.0 / {x}"], "torch.reciprocal({x})", "positive"),
    "tanh": (["avalon.tanh({x})", "np.tanh({x})"], "torch.tanh({x})", None),
    "sigmoid": (["avalon.sigmoid({x})"], "torch.sigmoid({x})", None),
    "softplus": (["avalon.softplus({x})"], "F.softplus({x})", None),
    "log_sigmoid": (["avalon.log_sigmoid({x})"], "F.logsigmoid({x})", None),
    "softsign": (["avalon.softsign({x})"], "F.softsign({x})", None),
    "relu": (["avalon.relu({x})"], "torch.relu({x})", "kink"),
    "leaky_relu": (["avalon.leaky_relu({x}, 0.1)"], "F.leaky_relu({x}, 0.1)", "kink"),
    "elu": (["avalon.elu({x})"], "F.elu({x})", "kink"),
    "abs": (["avalon.abs({x})", "abs({x})"], "torch.abs({x})", "kink"),
    "neg": (["-{x}", "avalon.neg({x})"], "torch.neg({x})", None),
    "square": (["avalon.square({x})", "{x} ** 2", "{x} * {x}"], "torch.square({x})", None),
    "cube": (["{x} ** 3"], "{x} ** 3", None),
}


def _guarded(b: _Builder, v, guard):
    if guard == "positive":
        return b.positive(v)
    if guard == "small":
        return b.small(v)
    if guard == "kink":
        return b.away_from(v)
    return v


def _unary(b: _Builder):
    name = str(b.rng.choice(sorted(UNARY)))
    forms, torch_form, guard = UNARY[name]
    x = _guarded(b, b.pick(), guard)
    if x is None:
        return None
    form = str(b.rng.choice(forms))
    if torch_form is None:   # the Avalon form is also valid PyTorch (operators, pow)
        torch_form = form.replace("avalon.pow", "torch.pow")
    return b.emit(name, form.format(x=x.name), torch_form.format(x=x.name), [x])


def _clip(b: _Builder):
    x = b.pick(lambda v: v.ref.numel() > 1)
    if x is None:
        return None
    lo, hi = (float(np.round(q, 3)) for q in np.quantile(x.ref.numpy(), sorted(b.rng.uniform(0.1, 0.9, 2))))
    if hi - lo < 0.05 or not (_clear_of(x.ref, lo) and _clear_of(x.ref, hi)):
        return None
    return b.emit("clip", f"avalon.clip({x.name}, {lo!r}, {hi!r})", f"torch.clamp({x.name}, {lo!r}, {hi!r})", [x])


SCALAR_FORMS = ["{x} * {c}", "{c} * {x}", "{x} / {c}", "{x} + {c}", "{c} + {x}", "{x} - {c}", "{c} - {x}",
                "avalon.mul({x}, {c})", "{c} / {x}"]


def _scalar(b: _Builder):
    """x op c for a Python number c, sometimes a chain of two (x.mean() * 0.5 / 2)."""
    x = b.pick()
    for _ in range(1 + int(b.rng.random() < 0.4)):
        form = str(b.rng.choice(SCALAR_FORMS))
        if form == "{c} / {x}":
            x = b.positive(x)
            if x is None:
                return None
        c = b.scalar()
        text = form.format(x=x.name, c=c)
        x = b.emit("scalar", text, text.replace("avalon.mul", "torch.mul"), [x])
        if x is None:
            return None
    return x


BINARY = {
    "add": (["{a} + {b}", "avalon.add({a}, {b})"], "torch.add({a}, {b})"),
    "sub": (["{a} - {b}", "avalon.sub({a}, {b})"], "torch.sub({a}, {b})"),
    "mul": (["{a} * {b}", "avalon.mul({a}, {b})"], "torch.mul({a}, {b})"),
    "div": (["{a} / {b}", "avalon.div({a}, {b})"], "torch.div({a}, {b})"),
    "maximum": (["avalon.maximum({a}, {b})", "np.maximum({a}, {b})"], "torch.maximum({a}, {b})"),
    "minimum": (["avalon.minimum({a}, {b})"], "torch.minimum({a}, {b})"),
    "pow": (["{a} ** {b}", "avalon.pow({a}, {b})"], "torch.pow({a}, {b})"),
}


def _partner(b: _Builder, a: _Value) -> _Value:
    """A second operand that broadcasts with a: an existing value or a new input."""
    if b.rng.random() < 0.4:
        other = b.pick(lambda v: v is not a and _broadcasts(a.shape, v.shape))
        if other is not None:
            return other
    shape = _broadcast_partner(b.rng, a.shape)
    return b.new_input(shape if _broadcasts(a.shape, shape) else a.shape)


def _binary(b: _Builder):
    name = str(b.rng.choice(sorted(BINARY)))
    forms, torch_form = BINARY[name]
    x = b.pick()
    y = _partner(b, x)
    if b.rng.random() < 0.5:
        x, y = y, x
    if name == "div":
        y = b.positive(y)
    elif name == "pow":
        x, y = b.positive(x), b.bounded(y)
    if x is None or y is None:
        return None
    if name in ("maximum", "minimum") and not _clear_of(x.ref - y.ref, 0.0):
        return None
    form = str(b.rng.choice(forms))
    return b.emit(name, form.format(a=x.name, b=y.name), torch_form.format(a=x.name, b=y.name), [x, y])


REDUCTIONS = {
    "sum": (["avalon.sum({x}, axis={axis}, keepdims={keepdims})", "{x}.sum(axis={axis}, keepdims={keepdims})",
             "np.sum({x}, axis={axis}, keepdims={keepdims})"], "torch.sum({x}, dim={dims}, keepdim={keepdims})"),
    "mean": (["avalon.mean({x}, axis={axis}, keepdims={keepdims})", "{x}.mean(axis={axis}, keepdims={keepdims})"],
             "torch.mean({x}, dim={dims}, keepdim={keepdims})"),
    "max": (["avalon.max({x}, axis={axis}, keepdims={keepdims})", "{x}.max(axis={axis}, keepdims={keepdims})"],
            "torch.amax({x}, dim={dims}, keepdim={keepdims})"),
    "min": (["avalon.min({x}, axis={axis}, keepdims={keepdims})"], "torch.amin({x}, dim={dims}, keepdim={keepdims})"),
    "logsumexp": (["avalon.logsumexp({x}, axis={axis}, keepdims={keepdims})"],
                  "torch.logsumexp({x}, dim={dims}, keepdim={keepdims})"),
    "var": (["avalon.var({x}, axis={axis}, keepdims={keepdims})"],
            "torch.var({x}, dim={dims}, keepdim={keepdims}, correction=0)"),
}


def _reduction(b: _Builder):
    name = str(b.rng.choice(sorted(REDUCTIONS)))
    forms, torch_form = REDUCTIONS[name]
    x = b.pick()
    axis, dims = _random_axes(b.rng, x.ndim)
    dims = tuple(range(x.ndim)) if dims is None else dims
    if name in ("max", "min") and not _no_ties(x.ref, dims):
        return None
    if x.ndim == 0 and name in ("logsumexp", "var"):
        return None
    keepdims = x.ndim > 0 and b.rng.random() < 0.4
    if axis == "None" and not keepdims and b.rng.random() < 0.5:   # the plain method form: x.mean()
        form = {"sum": "{x}.sum()", "mean": "{x}.mean()", "max": "{x}.max()"}.get(name, forms[0])
    else:
        form = str(b.rng.choice(forms))
    avalon_text = form.format(x=x.name, axis=axis, keepdims=keepdims)
    return b.emit(name, avalon_text, torch_form.format(x=x.name, dims=dims, keepdims=keepdims), [x])


def _reshape(b: _Builder):
    x = b.pick()
    shape = _random_shape_of_size(x.ref.numel(), b.rng)
    if shape == x.shape:
        return None
    text = list(shape)
    if len(shape) > 1 and b.rng.random() < 0.3:
        text[int(b.rng.integers(0, len(shape)))] = -1
    avalon_text = (f"{x.name}.reshape({', '.join(map(str, text))})" if b.rng.random() < 0.5
                   else f"avalon.reshape({x.name}, {tuple(text)!r})")
    return b.emit("reshape", avalon_text, f"{x.name}.reshape({tuple(text)!r})", [x])


def _transpose(b: _Builder):
    x = b.pick(lambda v: v.ndim >= 2)
    if x is None:
        return None
    r = b.rng.random()
    if r < 0.25:
        rev = tuple(reversed(range(x.ndim)))
        return b.emit("transpose", f"{x.name}.T", f"{x.name}.permute{rev!r}", [x])
    if r < 0.5:
        i, j = (int(a) for a in b.rng.choice(x.ndim, size=2, replace=False))
        return b.emit("transpose", f"avalon.swapaxes({x.name}, {i}, {j})", f"torch.swapaxes({x.name}, {i}, {j})",
                      [x])
    perm = tuple(int(p) for p in b.rng.permutation(x.ndim))
    return b.emit("transpose", f"avalon.transpose({x.name}, {', '.join(map(str, perm))})",
                  f"{x.name}.permute{perm!r}", [x])


def _index_item(rng, n):
    """One axis of an index: a slice with a positive step, or an int."""
    if n > 1 and rng.random() < 0.2:
        i = int(rng.integers(-n, n))
        return str(i)
    if rng.random() < 0.3:
        return ":"
    start = int(rng.integers(0, n))
    stop = int(rng.integers(start + 1, n + 1))
    step = int(rng.integers(1, 3))
    text = f"{start if start else ''}:{stop if stop != n else ''}"
    return text + (f":{step}" if step > 1 else "")


def _getitem(b: _Builder):
    x = b.pick(lambda v: v.ndim >= 1)
    if x is None:
        return None
    k = int(b.rng.integers(1, x.ndim + 1))
    items = [_index_item(b.rng, n) for n in x.shape[:k]]
    if b.rng.random() < 0.15:
        items.insert(int(b.rng.integers(0, len(items) + 1)), "None")
    if k < x.ndim and b.rng.random() < 0.2:
        items = ["..."] + [_index_item(b.rng, n) for n in x.shape[x.ndim - k:]]
    text = f"{x.name}[{', '.join(items)}]"
    return b.emit("getitem", text, text, [x])


def _joins(a, b, axis) -> bool:
    """Shapes a and b can be concatenated along `axis` (stacked when axis is None)."""
    if len(a) != len(b):
        return False
    return all(s == t for i, (s, t) in enumerate(zip(a, b)) if i != axis)


def _concatenate(b: _Builder):
    x = b.pick(lambda v: v.ndim >= 1)
    if x is None:
        return None
    axis = int(b.rng.integers(0, x.ndim))
    stack = b.rng.random() < 0.25
    other = b.pick(lambda v: _joins(v.shape, x.shape, None if stack else axis)) if b.rng.random() < 0.4 else None
    if other is None:
        shape = list(x.shape)
        if not stack:
            shape[axis] = int(b.rng.integers(1, 4))
        other = b.new_input(tuple(shape))
    pair = f"[{x.name}, {other.name}]" if b.rng.random() < 0.5 else f"[{other.name}, {x.name}]"
    if stack:
        return b.emit("stack", f"avalon.stack({pair}, axis={axis})", f"torch.stack({pair}, dim={axis})", [x, other])
    return b.emit("concatenate", f"avalon.concatenate({pair}, axis={axis})", f"torch.cat({pair}, dim={axis})",
                  [x, other])


def _expand_squeeze(b: _Builder):
    x = b.pick()
    ones = [i for i, s in enumerate(x.shape) if s == 1]
    if ones and b.rng.random() < 0.5:
        a = int(b.rng.choice(ones))
        return b.emit("squeeze", f"avalon.squeeze({x.name}, {a})", f"{x.name}.squeeze({a})", [x])
    if b.rng.random() < 0.5 and x.ndim < 4:
        a = int(b.rng.integers(-(x.ndim + 1), x.ndim + 1))
        return b.emit("expand_dims", f"avalon.expand_dims({x.name}, {a})", f"{x.name}.unsqueeze({a})", [x])
    target = [s if s != 1 else int(b.rng.integers(1, 4)) for s in x.shape]
    if len(target) < 4 and b.rng.random() < 0.5:
        target.insert(0, int(b.rng.integers(2, 4)))
    target = tuple(target)
    return b.emit("broadcast_to", f"avalon.broadcast_to({x.name}, {target!r})", f"{x.name}.expand({target!r})", [x])


def _matmul(b: _Builder):
    x = b.pick(lambda v: v.ndim >= 1)
    if x is None:
        return None
    forms = ["{a} @ {b}", "avalon.matmul({a}, {b})", "np.matmul({a}, {b})"]
    m = int(b.rng.integers(1, 5))
    if x.ndim >= 2 and b.rng.random() < 0.2:      # a Gram matrix: x @ x^T
        return b.emit("matmul", f"{x.name} @ {x.name}.mT", f"{x.name} @ {x.name}.mT", [x])
    if b.rng.random() < 0.5:                       # x @ w
        lead = x.shape[:-2] if (x.ndim > 2 and b.rng.random() < 0.3) else ()
        w = b.new_input(lead + (x.shape[-1], m))
        a, c = x, w
    else:                                          # w @ x
        k = x.shape[0] if x.ndim == 1 else x.shape[-2]
        w = b.new_input((m, k))
        a, c = w, x
    form = str(b.rng.choice(forms))
    return b.emit("matmul", form.format(a=a.name, b=c.name), f"torch.matmul({a.name}, {c.name})", [a, c])


def _softmax(b: _Builder):
    x = b.pick(lambda v: v.ndim >= 1)
    if x is None:
        return None
    axis = int(b.rng.integers(-x.ndim, x.ndim))
    name = "softmax" if b.rng.random() < 0.5 else "log_softmax"
    return b.emit(name, f"avalon.{name}({x.name}, axis={axis})", f"torch.{name}({x.name}, dim={axis})", [x])


def _where(b: _Builder):
    """where(s > t, a, other): the threshold t kept away from every element of s."""
    s = b.pick()
    t = float(np.round(np.quantile(s.ref.numpy(), b.rng.uniform(0.2, 0.8)) + b.rng.uniform(-0.05, 0.05), 3))
    if not _clear_of(s.ref, t):
        return None
    a = s if b.rng.random() < 0.4 else b.pick(lambda v: _broadcasts(v.shape, s.shape))
    other_is_number = b.rng.random() < 0.25
    other = None if other_is_number else _partner(b, a)
    if other is not None and not _broadcasts(np.broadcast_shapes(a.shape, s.shape), other.shape):
        return None
    o = b.scalar(ints=False) if other_is_number else other.name
    operands = [s, a] + ([] if other is None else [other])
    return b.emit("where", f"avalon.where({s.name} > {t!r}, {a.name}, {o})",
                  f"torch.where({s.name} > {t!r}, {a.name}, {o})", operands)


#: op kind -> (weight, generator)
OP_KINDS = {
    "unary": (24, _unary), "clip": (2, _clip), "scalar": (14, _scalar), "binary": (20, _binary),
    "reduction": (12, _reduction), "reshape": (4, _reshape), "transpose": (4, _transpose),
    "getitem": (5, _getitem), "concatenate": (3, _concatenate), "expand_squeeze": (3, _expand_squeeze),
    "matmul": (5, _matmul), "softmax": (4, _softmax), "where": (4, _where),
}


# -- programs ----------------------------------------------------------------------------------------

def random_program(seed: int, index: int, max_ops: int = 8) -> RandomProgram:
    """Program `index` of the stream `seed` (each independent of the others)."""
    rng = np.random.default_rng([seed, index])
    b = _Builder(rng)
    for _ in range(int(rng.integers(1, 3))):
        first = b.new_input(_random_shape(rng))
        b.values.append(first)
        b.inputs.append((first.name, first.ref.numpy().copy()))
    kinds = sorted(OP_KINDS)
    weights = np.array([OP_KINDS[k][0] for k in kinds], dtype=float)
    n_ops, attempts = int(rng.integers(2, max_ops + 1)), 0
    added = 0
    while added < n_ops and attempts < 10 * n_ops:
        attempts += 1
        kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
        added += OP_KINDS[kind][1](b) is not None
    sinks = _add_loss(b)
    return RandomProgram(seed, index, [n for n, _ in b.inputs], [a for _, a in b.inputs], dict(b.constants),
                         list(b.lines), [s.name for s in sinks if not s.is_input])


LOSS_TERMS = [
    ("avalon.sum({s} * {c})", "torch.sum({s} * {c})"),
    ("{s}.mean()", "torch.mean({s})"),
    ("avalon.sum({s})", "torch.sum({s})"),
    ("avalon.mean(avalon.square({s}))", "torch.mean(torch.square({s}))"),
]


def _add_loss(b: _Builder) -> list[_Value]:
    """loss = a scalar term per sink (so every value computed reaches the loss),
    summed, then maybe scaled by a chain of constants.  Returns the sinks."""
    sinks = [v for v in b.values if v.name not in b.used and not v.is_input] or [b.values[-1]]
    terms = []
    for s in sinks:
        if s.shape == () and b.rng.random() < 0.5:
            terms.append(s)
            continue
        avalon_form, torch_form = LOSS_TERMS[int(b.rng.integers(0, len(LOSS_TERMS)))]
        c = b.constant(s.shape) if "{c}" in avalon_form else None
        term = b.emit("loss", avalon_form.format(s=s.name, c=c), torch_form.format(s=s.name, c=c), [s])
        if term is None:   # too large: fall back to a mean, which stays as large as the values
            term = b.emit("loss", f"{s.name}.mean()", f"torch.mean({s.name})", [s])
        terms.append(term)
    total = " + ".join(t.name for t in terms)
    if b.rng.random() < 0.3:
        total = f"({total}) * {b.scalar()} / {b.scalar()}"
    # a sum of in-range terms times at most 3 / 0.25 stays far below this bound
    loss = b.emit("loss", total, total, terms, target="loss", max_magnitude=1e9)
    assert loss is not None, total
    return sinks


# -- checking against PyTorch ----------------------------------------------------------------------------

def _torch_reference(program: RandomProgram):
    """(forward outputs, loss, grads) of PyTorch in float64; unused inputs get None, as in avalon."""
    torch = _torch()
    xs = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in program.inputs]
    outs = program.torch_forward_fn("float64")(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = outs[-1]
    grads = torch.autograd.grad(loss, xs, allow_unused=True)
    grads = [None if g is None else g.numpy() for g in grads]
    return [o.detach().numpy() for o in outs], grads


def _host(x):
    from .conformance import to_host
    return None if x is None else to_host(x)


def _compare(got, want, dtype, what):
    got = _host(got)
    problems = []
    if got.shape != want.shape:
        return [f"{what}: shape {got.shape}, PyTorch gives {want.shape}"]
    if got.dtype != np.dtype(dtype):
        problems.append(f"{what}: dtype {got.dtype}, expected {dtype}")
    rtol, atol = TOLERANCES[np.dtype(dtype).name]
    atol *= max(1.0, float(np.abs(want).max(initial=0.0)))
    bad = ~np.isclose(got.astype(np.float64), want, rtol=rtol, atol=atol)
    if bad.any():
        err = np.abs(got.astype(np.float64) - want)
        problems.append(f"{what}: {int(bad.sum())} of {bad.size} elements differ (max abs error "
                        f"{err.max():.3g}, tolerance rtol={rtol:g} atol={atol:.3g})\n  got:  "
                        f"{np.array2string(got.ravel()[:8], precision=6)}\n  want: "
                        f"{np.array2string(want.ravel()[:8], precision=6)}")
    return problems


def check_against_torch(program: RandomProgram, dtype="float64", device=None) -> None:
    """avalon.grad (value and gradients) and avalon.jit (every sink and the loss)
    of the program, run in `dtype` (on `device`), equal PyTorch's float64
    results within TOLERANCES[dtype], and still do after a second call of the
    compiled functions (which reuses their buffers).  Raises AssertionError
    naming the program."""
    ref_outs, ref_grads = _torch_reference(program)
    inputs = program.inputs_as(dtype)
    if device is not None:
        inputs = avalon.to_device(inputs, device)
    try:
        problems = _check_grad(program, dtype, device, inputs, ref_outs[-1], ref_grads)
        problems += _check_jit(program, dtype, device, inputs, ref_outs)
    except Exception as e:  # noqa: BLE001 - a crash is a failure of the program, reported with it
        raise AssertionError(_report(program, dtype, [f"{type(e).__name__}: {e}"])) from e
    if problems:
        raise AssertionError(_report(program, dtype, problems))


def _check_grad(program, dtype, device, inputs, ref_loss, ref_grads):
    grad_fn = avalon.value_and_grad(program.avalon_fn(dtype, device))
    value, grads = grad_fn(*inputs)
    first = [_host(value)] + [_host(g) for g in grads]   # copies, taken before the second call
    again = grad_fn(*inputs)
    problems = []
    for when, (v, gs) in (("first call", (value, grads)), ("second call", again)):
        problems += _compare(v, ref_loss, dtype, f"grad ({when}): loss value")
        for name, g, want in zip(program.input_names, gs, ref_grads):
            if g is None:
                problems.append(f"grad ({when}): gradient of {name} is None; an array argument gets one")
                continue
            if want is None:   # no path from the input to the loss: torch.autograd's None, torch.func's zeros
                want = np.zeros(np.shape(_host(g)), np.float64)
            problems += _compare(g, want, dtype, f"grad ({when}): gradient of {name}")
    problems += _changed_by_second_call(first, [value, *grads], "grad")
    return problems


def _check_jit(program, dtype, device, inputs, ref_outs):
    fn = avalon.jit(program.avalon_forward_fn(dtype, device))
    outs = _as_tuple(fn(*inputs))
    first = [_host(o) for o in outs]
    problems = []
    for when, got in (("first call", outs), ("second call", _as_tuple(fn(*inputs)))):
        for name, o, want in zip(program.outputs + [program.loss], got, ref_outs):
            problems += _compare(o, want, dtype, f"jit ({when}): {name}")
    problems += _changed_by_second_call(first, outs, "jit")
    return problems


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _changed_by_second_call(before, results, what):
    """A result handed to the caller must not be overwritten by the next call."""
    changed = [k for k, (b, r) in enumerate(zip(before, results))
               if b is not None and not np.array_equal(b, _host(r), equal_nan=True)]
    return [f"{what}: results {changed} of the first call changed when the function was called again"] if changed \
        else []


def _report(program, dtype, problems):
    return f"{dtype} run differs from PyTorch:\n" + "\n".join(problems) + "\n\n" + program.describe()
