"""Optimizers: avalon.optim.SGD, Adam, AdamW, RMSprop and Adagrad, with
PyTorch's update rules and defaults.

    opt = avalon.optim.Adam(lr=1e-3)              # no parameters at construction
    loss, (g_model, *_) = avalon.grad(loss_fn, model, x, y)
    opt.step(model, g_model)                      # model's arrays updated in place

`step` walks the model and its gradients in parallel (same structure, as
avalon.grad returns them) and updates every floating-point array that has a
gradient; None gradients and nn.Module buffers are left alone.  Optimizer state
(momentum, moments) is kept per parameter path ("fc1.weight", "['w']") and
created at the first step that sees the parameter.

The update of all parameters is one compiled function per model signature
(`opt.update_fn`, an avalon.jit function): each new value is written straight
into its parameter or state array with avalon.assign.  Values that change from
step to step (the learning rate a scheduler sets, Adam's bias corrections) are
passed as 0-d arrays, so they never retrace; fixed hyperparameters (betas,
momentum, ...) are static arguments, so changing one retraces once.

Hyperparameters are checked where they are set (the constructor,
load_state_dict) with PyTorch's rules and wording ("Invalid epsilon value:
-1.0"), and a failed check changes nothing.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers
from collections.abc import Iterable

import numpy as np

import avalon
from avalon import tree
from avalon.backends import backend_of
from avalon.errors import AvalonError, DtypeError, ShapeError, at, user_location

from .flat import flat_group_for
from .module import Module
from .registry import export

_MISSING = object()


class OptimizerError(AvalonError, ValueError):
    """An optimizer or scheduler argument out of range (a negative learning
    rate, betas outside [0, 1), ...), a schedule that would make the learning
    rate negative, or an optimizer state that does not fit."""


# How each hyperparameter is checked: PyTorch's name for it in messages, and the rule.
_RULES = {
    "lr": ("lr (learning rate)", "non-negative"),
    "initial_lr": ("initial_lr (learning rate)", "non-negative"),
    "eps": ("epsilon value", "non-negative"),
    "weight_decay": ("weight_decay value", "non-negative"),
    "momentum": ("momentum value", "non-negative"),
    "alpha": ("alpha value", "non-negative"),
    "lr_decay": ("lr_decay value", "non-negative"),
    "initial_accumulator_value": ("initial_accumulator_value value", "non-negative"),
    "dampening": ("dampening value", "finite"),
    "betas": ("betas", "betas"),
}


class _Entry:
    """One parameter to update: its state key, the array, and its gradients
    (more than one when the same array sits at several paths: tied weights)."""
    __slots__ = ("path", "param", "grads")

    def __init__(self, path, param, grads):
        self.path, self.param, self.grads = path, param, grads


@export("optim", "Optimizers")
class Optimizer:
    """Base class.  A subclass lists its `hyperparameters` (constructor order)
    and `state_names`, and defines `_init_state`, `_coefficients` (host-side
    per-step scalars) and `_rule` (the update of one parameter, in avalon ops)."""

    hyperparameters: tuple = ("lr",)
    state_names: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _refusing_parameters(cls.__dict__["__init__"])

    def __init__(self, lr):
        self._validate({"lr": lr})
        self.lr = float(lr)
        self.state: dict = {}  # path -> {"step": int, name: array}
        self._plans: dict = {}
        self._complete: set = set()  # paths whose state has every array the options need
        self._complete_for = None
        self._flat = None       # the FlatGroup of the model being trained (see avalon_layers.flat)
        self.update_fn = avalon.jit(self._update_all)

    # -- the public API ----------------------------------------------------------------
    def step(self, model, grads, ignore=()) -> None:
        """Update `model` in place from `grads` (same structure as the model, as
        avalon.grad returns it).  Paths in `ignore` are not updated."""
        entries = self._collect(model, grads, frozenset(ignore))
        if not entries:
            self._check_has_parameters(model)
            return
        hp = self._static()
        if hp != self._complete_for:
            self._complete, self._complete_for = set(), hp
        self._flat = flat_group_for(model, entries, self._flat)
        if self._flat is not None and self._step_flat(self._flat, entries, hp):
            return
        states, coefs, steps = [], [], []
        cache: dict = {}
        for e in entries:
            st = self._state_of(e)
            step = st["step"] + 1
            steps.append((st, step))
            states.append({k: st[k] for k in self.state_names if k in st})
            coefs.append(self._coefficient_arrays(step, e.param, cache))
        self.update_fn(hp, [e.param for e in entries], [tuple(e.grads) for e in entries],
                       states, coefs)
        for st, step in steps:
            st["step"] = step

    def _step_flat(self, group, entries, hp) -> bool:
        """One compiled update over the flat buffers; False (nothing done) when the
        parameters are at different step counts (state loaded for some only)."""
        per_path = [self._state_of(e) for e in entries]
        step = per_path[0]["step"] + 1
        if any(st["step"] + 1 != step for st in per_path):
            return False
        states = group.flat_states(per_path, self.state_names)
        if len(states) != sum(1 for k in self.state_names if k in per_path[0]):
            return False
        group.gather_gradients(entries)
        coefs = self._coefficient_arrays(step, group.params, {})
        self.update_fn(hp, [group.params], [(group.grad,)], [states], [coefs])
        for st in per_path:
            st["step"] = step
        return True

    def state_dict(self) -> dict:
        """Hyperparameters and per-path state (host copies of the arrays, step counts)."""
        state = {path: {k: (_host_copy(v) if tree.is_array(v) else v) for k, v in st.items()}
                 for path, st in self.state.items()}
        hp = {k: getattr(self, k) for k in self.hyperparameters}
        if hasattr(self, "initial_lr"):
            hp["initial_lr"] = self.initial_lr
        return {"optimizer": type(self).__name__, "hyperparameters": hp, "state": state}

    def load_state_dict(self, state_dict) -> None:
        """Restore what state_dict() returned (or avalon.load read back); arrays
        move to the parameters' device at the next step.  Everything is checked
        before anything is set: a bad state leaves the optimizer as it was."""
        name = type(self).__name__
        kind = state_dict.get("optimizer")
        if kind is not None and kind != name:
            raise OptimizerError(f"{name}.load_state_dict: the state was saved by {kind}{at(user_location())}; "
                                 f"load it into a {kind}")
        loaded = {}
        for k, v in state_dict.get("hyperparameters", {}).items():
            if k not in self.hyperparameters and k != "initial_lr":
                raise OptimizerError(f"{name}.load_state_dict: unknown hyperparameter {k!r}{at(user_location())}; "
                                     f"{name} has {', '.join(self.hyperparameters)}")
            loaded[k] = tuple(v) if isinstance(v, list) else v
        self._validate({**{k: getattr(self, k) for k in self.hyperparameters}, **loaded})
        state = {path: {k: (np.array(v) if tree.is_array(v) else copy.deepcopy(v)) for k, v in st.items()}
                 for path, st in state_dict.get("state", {}).items()}
        for k, v in loaded.items():
            setattr(self, k, v)
        self._complete = set()
        self.state = state

    def __repr__(self):
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.hyperparameters)
        return f"{type(self).__name__}({args})"

    # -- checking hyperparameters -----------------------------------------------------------
    def _validate(self, values: dict) -> None:
        """Raise OptimizerError for the first invalid value of `values` (name -> value)."""
        for name, value in values.items():
            rule = _RULES.get(name)
            if rule is not None:
                self._check_value(name, value, *rule)
        self._check_together(values)

    def _check_together(self, values: dict) -> None:
        """Rules that tie hyperparameters together (SGD's Nesterov momentum)."""

    def _check_value(self, name, value, label, rule) -> None:
        if name == "lr" and _looks_like_parameters(value):
            raise self._parameters_given(value)
        if rule == "betas":
            self._check_betas(value)
            return
        x = _real_number(value)
        if x is None:
            raise self._invalid(name, label, value, f"it must be a number, not {type(value).__name__}")
        if not math.isfinite(x) or (rule == "non-negative" and x < 0):
            need = "a non-negative finite number" if rule == "non-negative" else "a finite number"
            raise self._invalid(name, label, value, f"it must be {need}")

    def _check_betas(self, betas) -> None:
        try:
            pair = len(betas) == 2
        except TypeError:
            pair = False
        if not pair:
            raise self._invalid("betas", "betas", betas, "betas must be a pair (beta1, beta2) of numbers in [0, 1)")
        for i, b in enumerate(betas):
            x = _real_number(b)
            if x is None or not 0.0 <= x < 1.0:
                raise self._invalid("betas", f"beta parameter at index {i}", b, "each beta must be in [0, 1)")

    def _invalid(self, name, label, value, requirement) -> OptimizerError:
        default = _default_of(type(self), name)
        hint = "" if default is _MISSING else f"; the default is {name}={default!r}"
        return _invalid_argument(type(self).__name__, label, value, requirement + hint)

    def _parameters_given(self, value) -> OptimizerError:
        name = type(self).__name__
        empty = isinstance(value, (list, tuple, dict)) and not value
        got = "an empty parameter list" if empty else f"parameters ({type(value).__name__})"
        return OptimizerError(
            f"{name} got {got} as its first argument, lr{at(user_location())}; {name} takes no parameters at "
            f"construction (unlike torch.optim.{name}(model.parameters(), lr=...)): create it with "
            f"{name}(lr=...) and pass the model and its gradients at each step: opt.step(model, grads)")

    def _check_has_parameters(self, model) -> None:
        leaves, _ = tree.flatten(model)
        if not any(np.dtype(x.dtype).kind == "f" for x in leaves):
            raise OptimizerError(
                f"{type(self).__name__}.step got an empty parameter list: the model holds no floating-point "
                f"arrays to update{at(user_location())}; pass the model being trained (what avalon.grad "
                f"differentiated) and its gradients")

    # -- for subclasses -----------------------------------------------------------------
    def _init_state(self, p) -> dict:
        return {}

    def _coefficients(self, step: int) -> dict:
        return {"lr": self.lr}

    def _rule(self, p, grad, state, k, hp) -> None:
        raise NotImplementedError

    def _static(self) -> dict:
        return {name: getattr(self, name) for name in self.hyperparameters if name != "lr"}

    # -- the compiled update --------------------------------------------------------------
    def _update_all(self, hp, params, grads, states, coefs):
        for p, gs, st, k in zip(params, grads, states, coefs):
            g = gs[0]
            for extra in gs[1:]:
                g = g + extra
            self._rule(p, g, st, k, hp)

    def _coefficient_arrays(self, step, p, cache):
        backend = backend_of(p)
        key = (step, np.dtype(p.dtype), id(backend))
        arrays = cache.get(key)
        if arrays is None:
            arrays = {k: backend.asarray(np.asarray(v, dtype=p.dtype)) for k, v in self._coefficients(step).items()}
            cache[key] = arrays
        return arrays

    def _state_of(self, e):
        st = self.state.get(e.path)
        if st is None:
            st = {"step": 0, **self._init_state(e.param)}
            self.state[e.path] = st
            self._complete.add(e.path)
            return st
        if e.path not in self._complete:
            # state loaded, or kept from before an option changed (amsgrad turned on, ...)
            for k, v in self._init_state(e.param).items():
                st.setdefault(k, v)
            self._complete.add(e.path)
        for k in self.state_names:
            v = st.get(k)
            if v is None:
                continue
            if tuple(v.shape) != tuple(e.param.shape):
                raise ShapeError(f"{type(self).__name__}: state {k!r} of {e.path} has shape {tuple(v.shape)} "
                                 f"but the parameter has shape {tuple(e.param.shape)}")
            if type(v) is not type(e.param) or v.dtype != e.param.dtype:
                st[k] = backend_of(e.param).asarray(_host_copy(v).astype(e.param.dtype))
        return st

    # -- walking the model and its gradients ------------------------------------------------
    def _collect(self, model, grads, ignore):
        leaves, td = tree.flatten(model)
        gleaves, gtd = tree.flatten(grads)
        key = (td, gtd, ignore)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _plan(model, leaves, td, gtd, grads, ignore)
        groups: dict = {}
        for path, i, j in plan:
            p, g = leaves[i], gleaves[j]
            if np.dtype(p.dtype).kind != "f":
                continue
            if tuple(g.shape) != tuple(p.shape):
                raise ShapeError(f"{type(self).__name__}.step: the gradient at {path} has shape {tuple(g.shape)} "
                                 f"but the parameter has shape {tuple(p.shape)}")
            if g.dtype != p.dtype:
                raise DtypeError(f"{type(self).__name__}.step: the gradient at {path} is "
                                 f"{np.dtype(g.dtype).name} but the parameter is {np.dtype(p.dtype).name}")
            e = groups.get(id(p))
            if e is None:
                groups[id(p)] = _Entry(path, p, [g])
            else:  # the same array at a second path (tied weights): one update, gradients summed
                e.grads.append(g)
        return list(groups.values())


def _plan(model, leaves, td, gtd, grads, ignore):
    """(path, model leaf index, grads leaf index) for every array to update;
    checks that grads has the model's structure."""
    paths = tree.leaf_paths(td)
    gpaths = tree.leaf_paths(gtd)
    gindex = {p: j for j, p in enumerate(gpaths)}
    gstatic = dict(tree.static_paths(gtd))
    buffers = _buffer_ids(model)
    strip = isinstance(model, Module)
    plan = []
    for i, path in enumerate(paths):
        name = path[1:] if strip and path.startswith(".") else path
        if id(leaves[i]) in buffers or name in ignore or path in ignore:
            continue
        if path in gindex:
            plan.append((name, i, gindex[path]))
        elif gstatic.get(path, _MISSING) is not None:
            raise AvalonError(f"optimizer step: grads has no gradient at {name} (found "
                              f"{_what(gstatic.get(path, _MISSING))}); {_hint(model, grads)}")
    # a tied array's second place (an alias in the model's tree): a gradient given
    # there separately is added to the first place's (avalon.grad gives the sum at both)
    aliases = tree.alias_paths(td)
    for path, i in aliases:
        if path in gindex and any(k == i for _, k, _ in plan):
            plan.append((next(n for n, k, _ in plan if k == i), i, gindex[path]))
    extra = sorted(set(gpaths) - set(paths) - {p for p, _ in aliases})
    if extra:
        raise AvalonError(f"optimizer step: grads has arrays at {', '.join(extra[:5])} where the model has none; "
                          f"{_hint(model, grads)}")
    return plan


def _what(v):
    return "nothing there" if v is _MISSING else f"{type(v).__name__} {v!r}"


def _hint(model, grads):
    if isinstance(grads, tuple) and not isinstance(model, tuple) and grads and type(grads[0]) is type(model):
        return ("grads is the tuple avalon.grad returns (one entry per argument): pass its first element, "
                "the gradient of the model")
    return "pass the gradient of this model, with its structure (as avalon.grad returns it)"


def _buffer_ids(model):
    """ids of the buffers of every nn.Module inside the model (never updated)."""
    mods, _ = tree.flatten(model, is_leaf=lambda x: isinstance(x, Module))
    return {id(b) for m in mods if isinstance(m, Module) for _, b in m.named_buffers()}


def _host_copy(x):
    return np.array(backend_of(x).to_host(x))


def _zeros_like(p, value=0.0):
    z = backend_of(p).zeros(tuple(p.shape), p.dtype)
    if value:
        z[...] = value
    return z


def _invalid_argument(owner: str, label: str, value, requirement: str) -> OptimizerError:
    """The error for an invalid argument, in PyTorch's words ("Invalid epsilon
    value: -1.0"), with the caller's line and what is required."""
    return OptimizerError(f"{owner}: Invalid {label}: {value!r}{at(user_location())}; {requirement}")


def _real_number(value):
    """float(value) for a real number (Python or NumPy, or a 0-d numeric
    array), else None: strings, booleans and sequences are not numbers here."""
    if isinstance(value, (bool, np.bool_, str, bytes)):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and getattr(getattr(value, "dtype", None), "kind", "") in ("i", "u", "f"):
        return float(value)
    return None


def _looks_like_parameters(value) -> bool:
    """What PyTorch's habit passes first: model.parameters(), a list of arrays, a model."""
    if isinstance(value, (str, bytes)) or _real_number(value) is not None:
        return False
    return isinstance(value, (Iterable, Module))


def _refusing_parameters(init):
    """`init`, first refusing parameters given as its first argument.  PyTorch's
    habit, Adam(model.parameters(), lr=1e-3), would otherwise fail in Python's
    argument binding ("got multiple values for argument 'lr'"), before any check
    could explain it.  functools.wraps keeps init's signature for inspect."""
    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        if args and _looks_like_parameters(args[0]):
            raise self._parameters_given(args[0])
        init(self, *args, **kwargs)
    return checked_init


def _default_of(cls, name):
    try:
        param = inspect.signature(cls.__init__).parameters.get(name)
    except (TypeError, ValueError):
        return _MISSING
    return _MISSING if param is None or param.default is param.empty else param.default


# -- SGD -----------------------------------------------------------------------------------

@export("optim", "Optimizers")
class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (PyTorch's form:
    the buffer starts as the first gradient), dampening, Nesterov momentum and
    L2 weight decay."""

    hyperparameters = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    state_names = ("momentum_buffer",)

    def __init__(self, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        self._validate({"lr": lr, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
                        "weight_decay": weight_decay})
        super().__init__(lr)
        self.momentum, self.dampening = momentum, dampening
        self.nesterov, self.weight_decay = nesterov, weight_decay

    def _check_together(self, values):
        if values.get("nesterov") and (values["momentum"] <= 0 or values["dampening"] != 0):
            raise OptimizerError(f"SGD: Nesterov momentum requires a momentum and zero dampening (got momentum="
                                 f"{values['momentum']!r}, dampening={values['dampening']!r}){at(user_location())}; "
                                 f"pass momentum > 0 and dampening=0, or nesterov=False")

    def _init_state(self, p):
        return {"momentum_buffer": _zeros_like(p)} if self.momentum != 0 else {}

    def _coefficients(self, step):
        first = step == 1
        # the first step sets the buffer to the gradient: buf * 0 + g * 1
        return {"lr": self.lr, "buf_keep": 0.0 if first else self.momentum,
                "grad_scale": 1.0 if first else 1.0 - self.dampening}

    def _rule(self, p, g, state, k, hp):
        if hp["weight_decay"] != 0:
            g = g + p * hp["weight_decay"]
        if hp["momentum"] != 0:
            buf = avalon.assign(state["momentum_buffer"],
                                state["momentum_buffer"] * k["buf_keep"] + g * k["grad_scale"])
            g = g + buf * hp["momentum"] if hp["nesterov"] else buf
        avalon.assign(p, p - k["lr"] * g)


# -- Adam and AdamW ---------------------------------------------------------------------------

@export("optim", "Optimizers")
class Adam(Optimizer):
    """Adam (Kingma & Ba) with PyTorch's bias correction, optional L2 weight
    decay (added to the gradient) and AMSGrad."""

    hyperparameters = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False):
        self._validate({"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        super().__init__(lr)
        self.betas, self.eps = tuple(float(b) for b in betas), eps
        self.weight_decay, self.amsgrad = weight_decay, amsgrad

    def _init_state(self, p):
        st = {"exp_avg": _zeros_like(p), "exp_avg_sq": _zeros_like(p)}
        if self.amsgrad:
            st["max_exp_avg_sq"] = _zeros_like(p)
        return st

    def _coefficients(self, step):
        beta1, beta2 = self.betas
        # in float64 on the host, as PyTorch computes them
        k = {"step_size": self.lr / (1 - beta1 ** step), "bc2_sqrt": math.sqrt(1 - beta2 ** step)}
        if self.decoupled:
            k["decay"] = 1 - self.lr * self.weight_decay
        return k

    def _rule(self, p, g, state, k, hp):
        (beta1, beta2), wd = hp["betas"], hp["weight_decay"]
        param = p
        if wd != 0:
            if self.decoupled:
                param = p * k["decay"]
            else:
                g = g + p * wd
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m = avalon.assign(m, m + (g - m) * (1 - beta1))
        v = avalon.assign(v, v * beta2 + (g * g) * (1 - beta2))
        if hp["amsgrad"]:
            v = avalon.assign(state["max_exp_avg_sq"], avalon.maximum(state["max_exp_avg_sq"], v))
        denom = avalon.sqrt(v) / k["bc2_sqrt"] + hp["eps"]
        avalon.assign(p, param - k["step_size"] * (m / denom))


@export("optim", "Optimizers")
class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): the parameter
    shrinks by lr * weight_decay before the Adam step."""

    decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(lr, betas, eps, weight_decay, amsgrad)


# -- RMSprop and Adagrad ---------------------------------------------------------------------

@export("optim", "Optimizers")
class RMSprop(Optimizer):
    """RMSprop (Hinton) with PyTorch's options: momentum, centered (divide by
    the estimated variance instead of the raw second moment), weight decay."""

    hyperparameters = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
    state_names = ("square_avg", "grad_avg", "momentum_buffer")

    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False):
        self._validate({"lr": lr, "alpha": alpha, "eps": eps, "weight_decay": weight_decay, "momentum": momentum})
        super().__init__(lr)
        self.alpha, self.eps, self.weight_decay = alpha, eps, weight_decay
        self.momentum, self.centered = momentum, centered

    def _init_state(self, p):
        st = {"square_avg": _zeros_like(p)}
        if self.momentum > 0:
            st["momentum_buffer"] = _zeros_like(p)
        if self.centered:
            st["grad_avg"] = _zeros_like(p)
        return st

    def _rule(self, p, g, state, k, hp):
        alpha = hp["alpha"]
        if hp["weight_decay"] != 0:
            g = g + p * hp["weight_decay"]
        sq = avalon.assign(state["square_avg"], state["square_avg"] * alpha + (g * g) * (1 - alpha))
        if hp["centered"]:
            ga = state["grad_avg"]
            ga = avalon.assign(ga, ga + (g - ga) * (1 - alpha))
            avg = avalon.sqrt(sq - ga * ga) + hp["eps"]
        else:
            avg = avalon.sqrt(sq) + hp["eps"]
        if hp["momentum"] > 0:
            buf = avalon.assign(state["momentum_buffer"], state["momentum_buffer"] * hp["momentum"] + g / avg)
            avalon.assign(p, p - k["lr"] * buf)
        else:
            avalon.assign(p, p - k["lr"] * (g / avg))


@export("optim", "Optimizers")
class Adagrad(Optimizer):
    """Adagrad (Duchi et al.): steps scaled by the root of the summed squared
    gradients, with PyTorch's lr_decay, initial_accumulator_value and eps."""

    hyperparameters = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    state_names = ("sum",)

    def __init__(self, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10):
        self._validate({"lr": lr, "lr_decay": lr_decay, "weight_decay": weight_decay,
                        "initial_accumulator_value": initial_accumulator_value, "eps": eps})
        super().__init__(lr)
        self.lr_decay, self.weight_decay = lr_decay, weight_decay
        self.initial_accumulator_value, self.eps = initial_accumulator_value, eps

    def _init_state(self, p):
        return {"sum": _zeros_like(p, self.initial_accumulator_value)}

    def _coefficients(self, step):
        return {"clr": self.lr / (1 + (step - 1) * self.lr_decay)}

    def _rule(self, p, g, state, k, hp):
        if hp["weight_decay"] != 0:
            g = g + p * hp["weight_decay"]
        s = avalon.assign(state["sum"], state["sum"] + g * g)
        avalon.assign(p, p - k["clr"] * (g / (avalon.sqrt(s) + hp["eps"])))
