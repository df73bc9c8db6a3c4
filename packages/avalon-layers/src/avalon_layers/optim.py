"""Optimizers: avalon.optim.SGD, Adam, AdamW, RMSprop, Adagrad, Adadelta,
Adamax, NAdam and RAdam, with PyTorch's update rules, defaults, argument names
and state_dict format.

Two ways to use one.  PyTorch's: give the parameters at construction (an
iterable of arrays, `model.parameters()`, or of parameter-group dicts with
their own options) and step with the gradient avalon.grad returned:

    opt = avalon.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        opt.zero_grad()                               # a no-op, kept for ported loops
        loss, grads = avalon.grad(loss_fn, model, x, y)
        opt.step(grads[0])                            # model's arrays updated in place

or without parameters, passing the model with its gradient at each step:

    opt = avalon.optim.Adam(lr=1e-3)
    loss, (g_model, *_) = avalon.grad(loss_fn, model, x, y)
    opt.step(model, g_model)

How `opt.step(grads[0])` finds each parameter's gradient: avalon.grad records
which argument each gradient structure is the gradient of
(`avalon.tree.gradient_source(g)`).  The optimizer walks that object and its
gradient in parallel (the walk is planned once per model structure and
cached), and pairs each of its parameters, by identity, with the gradient at
the same place: an array at two places (tied weights) is updated once with the
sum of its gradients; a parameter whose gradient is None is skipped and its
state left as it was (PyTorch's `p.grad is None`); arrays of the model that
are not the optimizer's parameters (frozen ones) are left alone.  Parameters
given as plain arrays pair positionally with a tuple or list of gradients:
`SGD([w, b])` then `_, (gw, gb) = avalon.grad(f, w, b); opt.step((gw, gb))`.
Anything that does not fit raises an error naming what was expected.

`zero_grad()` exists so that ported loops run unchanged: Avalon's gradients are
values returned by avalon.grad, never accumulated into the parameters, so
there is nothing to reset.

`param_groups` is PyTorch's list of dicts ('params' plus the group's options):
a change to `opt.param_groups[i]['lr']` (what schedulers do) takes effect at
the next step.  `opt.lr`, `opt.betas`, ... read the first group and set every
group.  `state_dict()` is PyTorch's format (state keyed by the parameter's
position over all groups, 'params' as index lists), and `load_state_dict`
also takes a torch optimizer's state_dict (torch tensors inside), so a run
started in PyTorch resumes here step for step.  An optimizer made without
parameters keeps its state per parameter path ("fc1.weight", "['w']").

The update of a group's parameters is one compiled function (`opt.update_fn`,
an avalon.jit function): each new value is written straight into its
parameter or state array with avalon.assign.  Values that change from step to
step (the learning rate, bias corrections) are passed as 0-d arrays, so they
never retrace; fixed hyperparameters (betas, momentum, ...) are static
arguments, so changing one retraces once.  Without parameters at construction
an nn.Module's parameters are moved into flat buffers (avalon_layers.flat) and
updated in one pass; from the second step on, while nothing it depends on has
changed, that update is called again through its bound compilation
(`avalon.jit(...).bind`), without collecting the gradients or looking the
update's signature up again (_RepeatStep).

`avalon.optim.train_step(loss_fn, opt)` compiles the gradient and this update
as one function, each parameter's update right after its gradient's product
(avalon_layers.train_step): the same results as `avalon.grad` then `opt.step`.

Hyperparameters are checked where they are set (the constructor,
add_param_group, load_state_dict) with PyTorch's rules and wording ("Invalid
epsilon value: -1.0"), and a failed check changes nothing.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers
import weakref
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

#: a flat group of at least this many elements per parameter updates each parameter's
#: views with its gradient read where the gradient step wrote it; one of smaller
#: parameters copies the gradients into its flat gradient buffer and runs one kernel
#: (there the copy costs less than a kernel and its arguments per parameter)
READ_GRADIENTS_IN_PLACE = 32768


class OptimizerError(AvalonError, ValueError):
    """An optimizer or scheduler argument out of range (a negative learning
    rate, betas outside [0, 1), ...), a schedule that would make the learning
    rate negative, or an optimizer state that does not fit."""


class _ParametersTypeError(AvalonError, TypeError):
    """`params` of the wrong kind (a model instead of model.parameters(), a
    string, a set): a TypeError as in PyTorch, located at the user's line."""


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
    "rho": ("rho value", "unit interval"),
    "momentum_decay": ("momentum_decay value", "non-negative"),
    "betas": ("betas", "betas"),
}

# Keys of a torch optimizer's param_groups that choose an implementation, not the
# mathematics (foreach/fused kernels, CUDA graphs, autograd through the step).
_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable", "param_names")

# Keys schedulers keep in a group (PyTorch's names): kept by state_dict and load_state_dict.
_SCHEDULER_KEYS = ("initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum")


class _Entry:
    """One parameter to update: its state key (a path, or its position over all
    groups), the array, its gradients (more than one when the same array sits at
    several paths: tied weights) and its group's index."""
    __slots__ = ("path", "param", "grads", "group")

    def __init__(self, path, param, grads, group=0):
        self.path, self.param, self.grads, self.group = path, param, grads, group


@export("optim", "Optimizers")
class Optimizer:
    """Base class, with PyTorch's constructor: `params` (an iterable of arrays
    or of parameter-group dicts; None for the form stepped with the model) and
    `defaults` (each hyperparameter's value for groups that do not set it).

    A subclass lists its `hyperparameters` (constructor order) and
    `state_names`, and defines `_init_state`, `_coefficients` (host-side
    per-step scalars) and `_rule` (the update of one parameter, in avalon ops)."""

    hyperparameters: tuple = ("lr",)
    #: hyperparameters passed to the compiled update as 0-d arrays (a change never
    #: retraces: schedulers change lr every step, OneCycleLR momentum and beta1 too)
    dynamic: tuple = ("lr",)
    state_names: tuple = ()
    #: values a torch param_group may hold for keys this optimizer has no option for
    torch_fixed: dict = {"maximize": False}
    #: whether torch's state of this optimizer counts steps (SGD's does not)
    torch_counts_steps = True
    #: the positional order of the form without parameters, where it differs from the constructor's
    legacy_positional = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _taking_parameters(cls.__dict__["__init__"])

    def __init__(self, params, defaults):
        self._validate(defaults)
        object.__setattr__(self, "defaults", dict(defaults))
        object.__setattr__(self, "param_groups", [])
        self.state: dict = {}  # key (path, or position over all groups) -> {"step": int, name: array}
        self._plans: dict = {}
        self._complete: set = set()  # (key, options) whose state has every array the options need
        self._flat = None       # the FlatGroup of the model being trained (see avalon_layers.flat)
        self._repeat = None     # the last flat step, to repeat while nothing it depends on changed (_RepeatStep)
        self._given = params is not None
        self._index: dict = {}  # id(parameter) -> (position over all groups, group index)
        self._indexed: tuple = ()  # the ids of the parameters _index was built from, in order
        self._parameters_by_position: dict = {}
        # Moments of parameters that stop getting gradient decay into denormals within
        # ~800 steps, where x86 arithmetic is ~3x slower: the update flushes them to zero
        self.update_fn = avalon.jit(self._update_all, flush_denormals=True)
        if params is None:
            self.param_groups.append({"params": [], **self.defaults})
            return
        for group in _as_groups(self, params):
            self.add_param_group(group)

    # -- hyperparameters as attributes: opt.lr reads the first group and sets every group ----
    def __getattr__(self, name):
        groups = self.__dict__.get("param_groups")
        if groups and (name in type(self).hyperparameters or name == "initial_lr") and name in groups[0]:
            return groups[0][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in type(self).hyperparameters or name == "initial_lr":
            for group in self.param_groups:
                group[name] = value
        else:
            object.__setattr__(self, name, value)

    def __delattr__(self, name):
        if name == "initial_lr":
            for group in self.param_groups:
                group.pop(name, None)
        else:
            object.__delattr__(self, name)

    # -- PyTorch's API -----------------------------------------------------------------------
    def add_param_group(self, param_group) -> None:
        """Add a group of parameters (a dict with 'params' and any options; the
        others are the constructor's), as torch.optim.Optimizer.add_param_group."""
        if not isinstance(param_group, dict):
            raise _params_error(self, f"add_param_group: param_group must be a dict, not "
                                      f"{type(param_group).__name__}")
        if "params" not in param_group:
            raise OptimizerError(f"{type(self).__name__}.add_param_group: the group has no 'params'"
                                 f"{at(user_location())}; pass {{'params': [arrays...], 'lr': ...}}")
        if not self._given:
            raise OptimizerError(f"{type(self).__name__}.add_param_group: this optimizer was created without "
                                 f"parameters{at(user_location())}; create it with its parameters, "
                                 f"{type(self).__name__}(model.parameters(), ...)")
        names, params = _parameter_list(self, param_group["params"])
        unknown = [k for k in param_group if k != "params" and k not in self.defaults
                   and k not in _SCHEDULER_KEYS and k != "param_names"]
        if unknown:
            raise OptimizerError(f"{type(self).__name__}.add_param_group: unknown option {unknown[0]!r}"
                                 f"{at(user_location())}; {type(self).__name__} has "
                                 f"{', '.join(self.hyperparameters)}")
        group = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        self._validate(group)
        self._refresh_index()
        if any(id(p) in self._index for p in params):
            raise OptimizerError(f"{type(self).__name__}: some parameters appear in more than one parameter "
                                 f"group{at(user_location())}; give each array to one group only")
        if names is not None:
            group["param_names"] = names
        self.param_groups.append({"params": params, **group})
        self._refresh_index()

    def _refresh_index(self) -> None:
        """Rebuild the parameter positions after param_groups' 'params' lists were
        changed in place (as torch allows); state follows its parameter."""
        params = self._parameters()
        ids = tuple(id(p) for p in params)
        if ids == self._indexed:
            return
        if len(set(ids)) != len(ids):
            raise OptimizerError(f"{type(self).__name__}: some parameters appear more than once in param_groups"
                                 f"{at(user_location())}; give each array to one group, once")
        old = {i: self._parameters_by_position.get(i) for i in self.state} if self._indexed else {}
        index, position = {}, 0
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                index[id(p)] = (position, g)
                position += 1
        if old:  # positions moved: state keyed by position follows its array
            self.state = {index[id(p)][0]: self.state[i] for i, p in old.items()
                          if p is not None and id(p) in index}
        self._index, self._indexed = index, ids
        self._parameters_by_position = dict(enumerate(params))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Does nothing, so that loops ported from PyTorch run unchanged: Avalon's
        gradients are values returned by avalon.grad, never accumulated into the
        parameters, so there is nothing to reset."""

    def step(self, model=None, grads=None, ignore=()) -> None:
        """Update the parameters in place.

        opt.step(grads): for an optimizer given its parameters, `grads` is what
        avalon.grad returned for the model (`grads[0]` for its first argument),
        or a tuple/list with one gradient (or None) per parameter, in order.
        opt.step(model, grads): `grads` has the model's structure; every
        floating-point array of the model with a gradient is updated (only the
        optimizer's parameters, when it was given some).  Paths in `ignore` are
        not updated."""
        if model is None and grads is None:
            raise OptimizerError(f"{type(self).__name__}.step() needs the gradients{at(user_location())}: Avalon has "
                                 f"no loss.backward() filling p.grad; take them with `loss, grads = "
                                 f"avalon.grad(loss_fn, model, x, y)` and pass opt.step(grads[0])")
        if self._given:
            self._refresh_index()
        if grads is None:
            entries = self._entries_from_gradients(model, frozenset(ignore))
            if entries:
                self._apply_groups(entries)
            return
        ignore = frozenset(ignore)
        if not self._given and self._repeat is not None and self._repeat.run(self, model, grads, ignore):
            return
        entries = self._collect(model, grads, ignore)
        if self._given:
            entries = self._own(entries, what=f"the model ({type(model).__name__})")
            if entries:
                self._apply_groups(entries)
            return
        if not entries:
            self._check_has_parameters(model)
            return
        self._apply_functional(model, grads, ignore, entries)

    # -- applying the update -----------------------------------------------------------------
    def _apply_functional(self, model, grads, ignore, entries):
        self._repeat = None
        group = self.param_groups[0]
        hp = self._static(group)
        self._flat = flat_group_for(model, entries, self._flat)
        if self._flat is not None:
            call = self._step_flat(self._flat, entries, hp, group)
            if call is not None:
                self._repeat = _RepeatStep.after(self, model, grads, ignore, entries, hp, call)
                return
        self._apply_group(entries, group, hp)

    def _apply_groups(self, entries):
        by_group: dict = {}
        for e in entries:
            by_group.setdefault(e.group, []).append(e)
        for index, group_entries in sorted(by_group.items()):
            group = self.param_groups[index]
            self._apply_group(group_entries, group, self._static(group))

    def _apply_group(self, entries, group, hp):
        states, coefs, steps = [], [], []
        cache: dict = {}
        for e in entries:
            st = self._state_of(e, group, hp)
            step = st["step"] + 1
            steps.append((st, step))
            states.append({k: st[k] for k in self.state_names if k in st})
            coefs.append(self._coefficient_arrays(step, e.param, cache, group))
        self.update_fn(hp, [e.param for e in entries], [tuple(e.grads) for e in entries], states, coefs)
        for st, step in steps:
            st["step"] = step

    def _flat_state(self, flat, entries, hp, group):
        """(per-parameter state dicts, the step they take now, the flat state
        buffers by name), each dict holding views of those buffers; None when the
        parameters are at different step counts (state loaded for some only) or
        their state cannot all be flat."""
        made_now = [e.path not in self.state for e in entries]
        per_path = [self._state_of(e, group, hp) for e in entries]
        step = per_path[0]["step"] + 1
        if any(st["step"] + 1 != step for st in per_path):
            return None
        zeros = _made_as_zeros([st for st, now in zip(per_path, made_now) if now], self.state_names)
        states = flat.flat_states(per_path, self.state_names, zeros)
        if len(states) != sum(1 for k in self.state_names if k in per_path[0]):
            return None
        return per_path, step, states

    def _step_flat(self, flat, entries, hp, group):
        """One compiled update over the flat buffers: the arguments it was called
        with, or None (nothing done) when the parameters are at different step
        counts (state loaded for some only)."""
        prepared = self._flat_state(flat, entries, hp, group)
        if prepared is None:
            return None
        per_path, step, states = prepared
        coefs = self._coefficient_arrays(step, flat.params, {}, group)
        if flat.size >= READ_GRADIENTS_IN_PLACE * len(entries):
            # one kernel per parameter over the views of the flat buffers, reading each
            # gradient where the gradient step wrote it (no copy into the flat gradient)
            views = [{name: flat.state_views[name][k] for name in states} for k in range(len(entries))]
            args = (hp, flat.param_views, [e.grads[0] for e in entries], views, coefs)
        else:
            flat.gather_gradients(entries)
            args = (hp, [flat.params], [(flat.grad,)], [states], [coefs])
        self.update_fn(*args)
        for st in per_path:
            st["step"] = step
        return args

    # -- finding each parameter's gradient ------------------------------------------------------
    def _entries_from_gradients(self, grads, ignore):
        name = type(self).__name__
        if not self._given:
            raise OptimizerError(f"{name}.step got only gradients, but this optimizer was created without "
                                 f"parameters{at(user_location())}; pass the model too, opt.step(model, grads), "
                                 f"or create it with them: {name}(model.parameters(), lr=...)")
        if callable(grads) and not tree.is_array(grads) and not isinstance(grads, (list, tuple, dict, Module)):
            raise OptimizerError(f"{name}.step got a closure{at(user_location())}; Avalon computes gradients "
                                 f"with avalon.grad: `loss, grads = avalon.grad(loss_fn, model, x, y)`, then "
                                 f"opt.step(grads[0])")
        source = tree.gradient_source(grads)
        if source is not None:
            return self._own(self._collect(source, grads, ignore), what=f"the {type(source).__name__} "
                             f"these gradients were taken of")
        if isinstance(grads, (list, tuple)) and all(g is None or tree.is_array(g) for g in grads):
            return self._positional(grads)
        if isinstance(grads, tuple) and any(tree.gradient_source(g) is not None for g in grads):
            raise OptimizerError(f"{name}.step got the whole tuple avalon.grad returns (one gradient per argument)"
                                 f"{at(user_location())}; pass the model's: opt.step(grads[0])")
        raise OptimizerError(
            f"{name}.step: cannot tell which parameters this {type(grads).__name__} holds the gradients "
            f"of{at(user_location())}: it was not returned by avalon.grad (or is a dict/list gradient older than "
            f"the last two avalon.grad calls).  Pass what avalon.grad returned for the model (grads[0] of "
            f"`loss, grads = avalon.grad(loss_fn, model, ...)`), a tuple with one gradient per parameter in "
            f"order, or the model with its gradient: opt.step(model, grads)")

    def _parameters(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _positional(self, grads):
        params = self._parameters()
        name = type(self).__name__
        if len(grads) != len(params):
            raise OptimizerError(f"{name}.step got {len(grads)} gradients for {len(params)} parameters"
                                 f"{at(user_location())}; pass one gradient (or None) per parameter, in the order "
                                 f"the parameters were given")
        entries = []
        for g, p in zip(grads, params):
            if g is None:
                continue
            index, group = self._index[id(p)]
            self._check_gradient(f"parameter {index}", p, g)
            entries.append(_Entry(index, p, [g], group))
        return entries

    def _own(self, entries, what):
        """The entries whose arrays are this optimizer's parameters, keyed by position."""
        own = []
        for e in entries:
            found = self._index.get(id(e.param))
            if found is not None:
                own.append(_Entry(found[0], e.param, e.grads, found[1]))
        if entries and not own:
            raise OptimizerError(
                f"{type(self).__name__}.step: none of the arrays of {what} is a parameter of this optimizer"
                f"{at(user_location())}; create the optimizer with this model's parameters "
                f"(model.parameters()), after anything that replaces its arrays (load_state_dict, to(device))")
        return own

    def _check_gradient(self, where, p, g):
        if not tree.is_array(g):
            raise OptimizerError(f"{type(self).__name__}.step: the gradient of {where} is a "
                                 f"{type(g).__name__}, not an array{at(user_location())}")
        if tuple(g.shape) != tuple(p.shape):
            raise ShapeError(f"{type(self).__name__}.step: the gradient at {where} has shape {tuple(g.shape)} "
                             f"but the parameter has shape {tuple(p.shape)}")
        if g.dtype != p.dtype:
            raise DtypeError(f"{type(self).__name__}.step: the gradient at {where} is "
                             f"{np.dtype(g.dtype).name} but the parameter is {np.dtype(p.dtype).name}")

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
            self._check_gradient(path, p, g)
            e = groups.get(id(p))
            if e is None:
                groups[id(p)] = _Entry(path, p, [g])
            else:  # the same array at a second path (tied weights): one update, gradients summed
                e.grads.append(g)
        return list(groups.values())

    # -- state_dict ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """PyTorch's format for an optimizer given its parameters: {"state":
        {position: {name: array, "step": n}}, "param_groups": [{options...,
        "params": [positions]}]}, host copies of the arrays.  Without
        parameters: {"optimizer", "hyperparameters", "state": {path: {...}}}."""
        if not self._given:
            state = {path: {k: (_host_copy(v) if tree.is_array(v) else v) for k, v in st.items()}
                     for path, st in self.state.items()}
            hp = {k: self.param_groups[0][k] for k in self.hyperparameters}
            if "initial_lr" in self.param_groups[0]:
                hp["initial_lr"] = self.param_groups[0]["initial_lr"]
            return {"optimizer": type(self).__name__, "hyperparameters": hp, "state": state}
        self._refresh_index()
        group_of = {index: self.param_groups[g] for index, g in self._index.values()}
        state = {key: self._torch_state(st, group_of[key]) for key, st in sorted(self.state.items())}
        groups, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(start, start + n))})
            start += n
        return {"state": state, "param_groups": groups}

    def _torch_state(self, st, group) -> dict:
        out = {k: (_host_copy(v) if tree.is_array(v) else v) for k, v in st.items() if k != "step"}
        if self.torch_counts_steps:
            out["step"] = st["step"]
        return out

    def load_state_dict(self, state_dict) -> None:
        """Restore what state_dict() returned (or avalon.load read back), or a
        torch optimizer's state_dict (torch tensors inside) for an optimizer given
        the same parameters.  Arrays move to the parameters' device at the next
        step.  Everything is checked before anything is set: a state that does not
        fit (another number of parameters, another shape, an unknown option)
        raises and leaves the optimizer as it was."""
        if "param_groups" in state_dict:
            self._load_torch_format(state_dict)
            return
        name = type(self).__name__
        if self._given:
            raise OptimizerError(f"{name}.load_state_dict: this state was saved by an optimizer created without "
                                 f"parameters (keyed by parameter paths){at(user_location())}; load it into "
                                 f"{name}(lr=...) stepped with opt.step(model, grads)")
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
        self._validate({**{k: self.param_groups[0][k] for k in self.hyperparameters}, **loaded})
        state = {path: {k: (np.array(v) if tree.is_array(v) else copy.deepcopy(v)) for k, v in st.items()}
                 for path, st in state_dict.get("state", {}).items()}
        self.param_groups[0].update(loaded)
        self._complete = set()
        self.state = state

    def _load_torch_format(self, state_dict) -> None:
        name = type(self).__name__
        if not self._given:
            raise OptimizerError(f"{name}.load_state_dict: this state (PyTorch's format: state keyed by parameter "
                                 f"position) needs the parameters{at(user_location())}; create the optimizer with "
                                 f"them, {name}(model.parameters(), ...), then load it")
        self._refresh_index()
        saved_groups = list(state_dict["param_groups"])
        if len(saved_groups) != len(self.param_groups):
            raise OptimizerError(f"{name}.load_state_dict: the state has {len(saved_groups)} parameter groups but "
                                 f"this optimizer has {len(self.param_groups)}{at(user_location())}; create it "
                                 f"with the same groups as the saved one")
        new_groups, positions = [], {}
        for i, (saved, ours) in enumerate(zip(saved_groups, self.param_groups)):
            ids = list(saved.get("params", ()))
            if len(ids) != len(ours["params"]):
                raise OptimizerError(f"{name}.load_state_dict: parameter group {i} of the state has {len(ids)} "
                                     f"parameters but this optimizer's has {len(ours['params'])}"
                                     f"{at(user_location())}; create it with the same parameters as the saved one")
            for saved_id, p in zip(ids, ours["params"]):
                positions[_position_key(saved_id)] = p
            new_groups.append(self._loaded_options(i, saved))
        for opts in new_groups:
            self._validate(opts)
        state = {}
        for key, saved_state in dict(state_dict.get("state", {})).items():
            p = positions.get(_position_key(key))
            if p is None:
                raise OptimizerError(f"{name}.load_state_dict: the state has an entry for parameter {key!r}, which "
                                     f"no parameter group lists{at(user_location())}")
            index, group = self._index[id(p)]
            state[index] = self._loaded_state(index, p, dict(saved_state), new_groups[group])
        for group, opts in zip(self.param_groups, new_groups):
            for k in [k for k in group if k not in ("params", "param_names")]:
                del group[k]
            group.update(opts)
        self._complete = set()
        self.state = state

    def _loaded_options(self, i, saved) -> dict:
        """A saved group's options, checked: this optimizer's hyperparameters
        (all of them), initial_lr, and torch's keys that do not change the
        mathematics or hold the one value this optimizer implements."""
        name = type(self).__name__
        opts = {}
        for k, v in saved.items():
            if k in ("params",) or k in _IMPLEMENTATION_KEYS:
                continue
            if k in self.hyperparameters or k in _SCHEDULER_KEYS:
                opts[k] = _plain(v)
            elif k in self.torch_fixed:
                if bool(v) != bool(self.torch_fixed[k]):
                    raise OptimizerError(f"{name}.load_state_dict: parameter group {i} has {k}={v!r}, which "
                                         f"Avalon's {name} does not implement{at(user_location())}; it needs "
                                         f"{k}={self.torch_fixed[k]!r}")
            else:
                raise OptimizerError(f"{name}.load_state_dict: parameter group {i} has an unknown option {k!r}"
                                     f"{at(user_location())}; {name} has {', '.join(self.hyperparameters)} "
                                     f"(was the state saved by another kind of optimizer?)")
        if "lr" not in opts:
            raise OptimizerError(f"{name}.load_state_dict: parameter group {i} has no 'lr'"
                                 f"{at(user_location())}; was the state saved by another kind of optimizer?")
        for k in self.hyperparameters:  # an option newer than the saving version: its default, as torch does
            if k not in opts:
                default = _default_of(type(self), k)
                opts[k] = self.defaults[k] if default is _MISSING else default
        if "betas" in opts:
            opts["betas"] = tuple(float(b) for b in opts["betas"])
        return opts

    def _loaded_state(self, index, p, saved, group) -> dict:
        name = type(self).__name__
        st = {"step": 0}
        for k, v in saved.items():
            if k == "step":
                st["step"] = _step_count(name, index, v)
            elif k in self.state_names:
                if v is None:
                    continue
                arr = _host_array(v)
                if arr.shape != tuple(p.shape):
                    raise ShapeError(f"{name}.load_state_dict: state {k!r} of parameter {index} has shape "
                                     f"{arr.shape} but the parameter has shape {tuple(p.shape)}")
                st[k] = arr.astype(p.dtype)
            elif k in self.scalar_state:
                st[k] = float(_host_array(v))
            else:
                raise OptimizerError(f"{name}.load_state_dict: the state of parameter {index} has an unknown entry "
                                     f"{k!r}{at(user_location())}; {name} keeps "
                                     f"{', '.join(('step',) + self.state_names)}")
        if not self.torch_counts_steps and any(k in st for k in self.state_names):
            st["step"] = 1  # SGD's buffer exists once a step was taken
        self._check_loaded_state(index, st, group)
        return st

    #: host-side scalars a torch state holds beside the arrays (NAdam's mu_product)
    scalar_state: tuple = ()

    def _check_loaded_state(self, index, st, group) -> None:
        """Subclasses check scalars they recompute (NAdam's mu_product)."""

    def __repr__(self):
        options = self.param_groups[0] if self.param_groups else self.defaults
        args = ", ".join(f"{k}={options[k]!r}" for k in self.hyperparameters)
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
        if name == "lr" and _real_number(value) is None and isinstance(value, (list, tuple, Module, Iterable)) \
                and not isinstance(value, (str, bytes)):
            raise OptimizerError(f"{type(self).__name__} got parameters ({type(value).__name__}) as lr"
                                 f"{at(user_location())}; the parameters come first, as in PyTorch: "
                                 f"{type(self).__name__}(model.parameters(), lr=...)")
        if rule == "betas":
            self._check_betas(value)
            return
        x = _real_number(value)
        if x is None:
            raise self._invalid(name, label, value, f"it must be a number, not {type(value).__name__}")
        if rule == "unit interval" and not 0.0 <= x <= 1.0:
            raise self._invalid(name, label, value, "it must be in [0, 1]")
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

    def _check_has_parameters(self, model) -> None:
        leaves, _ = tree.flatten(model)
        if not any(np.dtype(x.dtype).kind == "f" for x in leaves):
            raise OptimizerError(
                f"{type(self).__name__}.step got an empty parameter list: the model holds no floating-point "
                f"arrays to update{at(user_location())}; pass the model being trained (what avalon.grad "
                f"differentiated) and its gradients")

    # -- for subclasses -----------------------------------------------------------------
    def _init_state(self, p, group) -> dict:
        return {}

    def _coefficients(self, step: int, group) -> dict:
        return {"lr": group["lr"]}

    def _rule(self, p, grad, state, k, hp) -> None:
        raise NotImplementedError

    def _static(self, group) -> dict:
        """The options the compiled update is specialized on (a change retraces once)."""
        return {name: group[name] for name in self.hyperparameters if name not in self.dynamic}

    # -- the compiled update --------------------------------------------------------------
    def _update_all(self, hp, params, grads, states, coefs):
        """grads: per parameter, its gradient or a tuple of gradients to add (tied
        uses); coefs: per parameter, or one dict every parameter shares."""
        if isinstance(coefs, dict):
            coefs = [coefs] * len(params)
        for p, gs, st, k in zip(params, grads, states, coefs):
            gs = gs if isinstance(gs, (tuple, list)) else (gs,)
            g = gs[0]
            for extra in gs[1:]:
                g = g + extra
            self._rule(p, g, st, k, hp)

    def _coefficient_arrays(self, step, p, cache, group):
        backend = backend_of(p)
        key = (step, np.dtype(p.dtype), id(backend))
        arrays = cache.get(key)
        if arrays is None:
            arrays = {k: backend.asarray(np.asarray(v, dtype=p.dtype))
                      for k, v in self._coefficients(step, group).items()}
            cache[key] = arrays
        return arrays

    def _state_of(self, e, group, hp):
        options = (e.path, tuple(sorted(hp.items())))
        st = self.state.get(e.path)
        if st is None:
            st = {"step": 0, **self._init_state(e.param, group)}
            self.state[e.path] = st
            self._complete.add(options)
            return st
        if options not in self._complete:
            # state loaded, or kept from before an option changed (amsgrad turned on, ...)
            for k, v in self._init_state(e.param, group).items():
                st.setdefault(k, v)
            self._complete.add(options)
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


class _RepeatStep:
    """A flat update (Optimizer._step_flat) made ready to run again: its compiled
    update bound to the step's signature (avalon.jit's bind), and where the
    gradients and the per-step coefficients go among its flat arguments.

    The next opt.step(model, grads) runs it without collecting the gradients
    again, checking its state, or looking the update's signature up, as long as
    nothing the full path would decide differently on has changed: the same
    model, of the same structure, whose arrays are still the flat buffer's
    views; a gradient of the same structure, each array of the signature's type,
    shape and dtype; the same fixed hyperparameters; every parameter's state
    the same dict, holding the flat buffers' views at the same step count; and
    the same compilation (no pass registered, no anomaly mode changed).
    Anything else takes the full path, which raises what it raises."""
    __slots__ = ("model", "ignore", "td", "gtd", "params", "grad_leaves", "paths", "states", "views", "step",
                 "hp", "bound", "grad_slots", "coef_slots", "gather", "flat")

    @classmethod
    def after(cls, opt, model, grads, ignore, entries, hp, args):
        if any(e.param is not v for e, v in zip(entries, opt._flat.param_views)):
            return None
        self = cls()
        try:
            self.model = weakref.ref(model)   # the optimizer does not keep a dropped model alive
        except TypeError:
            return None
        self.ignore, self.hp, self.flat = ignore, dict(hp), opt._flat
        leaves, self.td = tree.flatten(model)
        gleaves, self.gtd = tree.flatten(grads)
        where, gwhere = {id(x): i for i, x in enumerate(leaves)}, {id(g): j for j, g in enumerate(gleaves)}
        grads_now = [e.grads[0] for e in entries]
        if any(id(e.param) not in where for e in entries) or any(id(g) not in gwhere for g in grads_now):
            return None
        self.params = [(where[id(e.param)], e.param) for e in entries]
        self.grad_leaves = [gwhere[id(g)] for g in grads_now]
        self.paths = [e.path for e in entries]
        self.states = [opt.state[e.path] for e in entries]
        self.step = self.states[0]["step"]
        names = [n for n in opt.state_names if n in opt._flat.state_views]
        self.views = [[(n, opt._flat.state_views[n][k]) for n in names] for k in range(len(entries))]
        self.bound = opt.update_fn.bind(*args)
        slot = {id(x): k for k, x in enumerate(self.bound.leaves)}
        coefs = args[4] if isinstance(args[4], dict) else args[4][0]
        self.gather = args[1] is not opt._flat.param_views   # the gradients copied into the flat one
        self.grad_slots = [] if self.gather else [slot[id(g)] for g in grads_now]
        self.coef_slots = [(name, slot[id(a)]) for name, a in coefs.items()]
        for k in self.grad_slots + [k for _, k in self.coef_slots]:
            self.bound.leaves[k] = None       # filled at each step: this step's arrays are not kept
        return self

    def run(self, opt, model, grads, ignore) -> bool:
        """Repeat the step with these gradients: True when done, False when the
        full path must decide (nothing was changed)."""
        if model is not self.model() or ignore != self.ignore or not self.bound.current():
            return False
        leaves, td = tree.flatten(model)
        gleaves, gtd = tree.flatten(grads)
        group = opt.param_groups[0]
        if td != self.td or gtd != self.gtd or opt._static(group) != self.hp or opt._flat is not self.flat:
            return False
        if any(leaves[i] is not p for i, p in self.params):
            return False
        state = opt.state
        for path, st, views in zip(self.paths, self.states, self.views):
            if state.get(path) is not st or st["step"] != self.step or any(st.get(n) is not v for n, v in views):
                return False
        grads_now = [gleaves[j] for j in self.grad_leaves]
        call = list(self.bound.leaves)
        if self.gather:
            if any(type(g) is not type(p) or g.shape != p.shape or g.dtype != p.dtype
                   for g, (_, p) in zip(grads_now, self.params)):
                return False
        else:
            for k, g in zip(self.grad_slots, grads_now):
                call[k] = g
            if not self.bound.matches(call, self.grad_slots):
                return False
        step = self.step + 1
        coefs = opt._coefficient_arrays(step, self.flat.params, {}, group)
        for name, k in self.coef_slots:
            call[k] = coefs[name]
        if self.gather:
            for view, g in zip(self.flat.grad_views, grads_now):
                view[...] = g
        self.bound.call(call)
        for st in self.states:
            st["step"] = step
        self.step = step
        return True


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


#: arrays _zeros_like made as zeros, by id (Optimizer._step_flat does not copy them)
_ZEROS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _made_as_zeros(states, names) -> set:
    """Ids of the arrays in `states` (made by this step's _init_state, untouched
    since) that _zeros_like made as zeros."""
    return {id(a) for st in states for n in names
            if (a := st.get(n)) is not None and _ZEROS.get(id(a)) is a}


def _zeros_like(p, value=0.0):
    z = backend_of(p).zeros(tuple(p.shape), p.dtype)
    if value:
        z[...] = value
    else:
        _ZEROS[id(z)] = z
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


def _default_of(cls, name):
    try:
        param = inspect.signature(cls.__init__).parameters.get(name)
    except (TypeError, ValueError):
        return _MISSING
    return _MISSING if param is None or param.default is param.empty else param.default




def _taking_parameters(init):
    """`init`, also taking the form without parameters: SGD(0.1, momentum=0.9),
    SGD(lr=0.1).  A first positional argument that is a number is the learning
    rate (params is None then).  functools.wraps keeps init's signature."""
    @functools.wraps(init)
    def init_with_parameters(self, *args, **kwargs):
        if args and "params" not in kwargs and _real_number(args[0]) is not None:
            legacy = type(self).legacy_positional
            if legacy is not None:  # the order of the form without parameters (SGD's differed from torch's)
                if len(args) > len(legacy):
                    raise _ParametersTypeError(f"{type(self).__name__}() takes at most {len(legacy)} "
                                               f"positional arguments after lr{at(user_location())}")
                kwargs = {**dict(zip(legacy, args)), **kwargs}
                args = ()
            args = (None, *args)
        init(self, *args, **kwargs)
    return init_with_parameters


def _as_groups(opt, params) -> list:
    """PyTorch's `params`: an iterable of arrays (or (name, array) pairs), or of
    parameter-group dicts; a list of group dicts."""
    name = type(opt).__name__
    if tree.is_array(params) or isinstance(params, (Module, dict, str, bytes)) or not isinstance(params, Iterable):
        hint = " (pass model.parameters())" if isinstance(params, Module) else ""
        raise _params_error(opt, f"params argument given to the optimizer should be an iterable of arrays or dicts, "
                                 f"but got {type(params).__name__}{hint}")
    if isinstance(params, (set, frozenset)):
        raise _params_error(opt, "optimizer parameters need to be organized in ordered collections, but the "
                                 "ordering of arrays in sets will change between runs; pass a list")
    items = list(params)
    if not items:
        raise OptimizerError(f"{name} got an empty parameter list{at(user_location())}; pass the arrays to train "
                             f"(model.parameters()), or create it without them, {name}(lr=...), and step it with "
                             f"opt.step(model, grads)")
    dicts = [isinstance(x, dict) for x in items]
    if all(dicts):
        return [dict(g) for g in items]
    if any(dicts):
        raise _params_error(opt, "params mixes parameter-group dicts and arrays; pass either arrays or dicts "
                                 "{'params': [...], ...}")
    return [{"params": items}]


def _parameter_list(opt, params):
    """(names or None, the arrays) of a group's 'params': one array, or an
    iterable of arrays or of (name, array) pairs; an array given twice counts once."""
    if tree.is_array(params):
        params = [params]
    elif isinstance(params, (set, frozenset)):
        raise _params_error(opt, "optimizer parameters need to be organized in ordered collections, but the "
                                 "ordering of arrays in sets will change between runs; pass a list")
    elif isinstance(params, Module):
        raise _params_error(opt, f"a group's 'params' is a {type(params).__name__}; pass its parameters(), a list "
                                 f"of arrays")
    items = list(params)
    names = None
    if items and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in items):
        names, items = [n for n, _ in items], [p for _, p in items]
    arrays, seen = [], set()
    for p in items:
        if not tree.is_array(p):
            raise _params_error(opt, f"optimizer can only optimize arrays, but one of the params is "
                                     f"{type(p).__name__}")
        if np.dtype(p.dtype).kind != "f":
            raise OptimizerError(f"{type(opt).__name__}: one of the params is a {np.dtype(p.dtype).name} array"
                                 f"{at(user_location())}; only floating-point arrays can be trained")
        if id(p) not in seen:  # the same array twice (tied weights): one parameter
            seen.add(id(p))
            arrays.append(p)
    if names is not None and len(names) != len(arrays):
        names = None
    return names, arrays


def _params_error(opt, message) -> "_ParametersTypeError":
    """A TypeError about `params` (as PyTorch raises), located at the user's line."""
    head, _, tail = message.partition("; ")
    where = at(user_location())
    return _ParametersTypeError(f"{type(opt).__name__}: {head}{where}" + (f"; {tail}" if tail else ""))


def _position_key(key):
    """A state/param key as an int: torch's ints, or strings after a round trip through a file."""
    if isinstance(key, str) and key.lstrip("-").isdigit():
        return int(key)
    return key


def _host_array(v) -> np.ndarray:
    """A NumPy copy of an array, a torch tensor or a number."""
    if tree.is_array(v):
        return _host_copy(v)
    if hasattr(v, "detach") and hasattr(v, "cpu"):  # a torch tensor
        return np.array(v.detach().cpu().numpy())
    return np.array(v)


def _plain(v):
    """A hyperparameter from a saved group as a Python value (torch may hold a tensor lr)."""
    if isinstance(v, (list, tuple)):
        return tuple(_plain(x) for x in v)
    if hasattr(v, "detach") or tree.is_array(v) or isinstance(v, np.generic):
        return _host_array(v).item()
    return v


def _step_count(owner, index, v) -> int:
    x = float(_host_array(v))
    if not (math.isfinite(x) and x >= 0 and x == int(x)):
        raise OptimizerError(f"{owner}.load_state_dict: the step count of parameter {index} is {x!r}"
                             f"{at(user_location())}; it must be a whole number of steps")
    return int(x)


# -- SGD -----------------------------------------------------------------------------------

@export("optim", "Optimizers")
class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum (PyTorch's form:
    the buffer starts as the first gradient), dampening, Nesterov momentum and
    L2 weight decay."""

    hyperparameters = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    dynamic = ("lr", "momentum", "dampening")
    state_names = ("momentum_buffer",)
    torch_counts_steps = False
    legacy_positional = ("lr", "momentum", "dampening", "nesterov", "weight_decay")

    def __init__(self, params=None, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov))

    def _check_together(self, values):
        if values.get("nesterov") and (values["momentum"] <= 0 or values["dampening"] != 0):
            raise OptimizerError(f"SGD: Nesterov momentum requires a momentum and zero dampening (got momentum="
                                 f"{values['momentum']!r}, dampening={values['dampening']!r}){at(user_location())}; "
                                 f"pass momentum > 0 and dampening=0, or nesterov=False")

    def _init_state(self, p, group):
        return {"momentum_buffer": _zeros_like(p)} if group["momentum"] != 0 else {}

    def _coefficients(self, step, group):
        first = step == 1
        # the first step sets the buffer to the gradient: buf * 0 + g * 1
        return {"lr": group["lr"], "buf_keep": 0.0 if first else group["momentum"],
                "grad_scale": 1.0 if first else 1.0 - group["dampening"], "momentum": group["momentum"]}

    def _static(self, group):
        return {**super()._static(group), "with_momentum": group["momentum"] != 0}

    def _rule(self, p, g, state, k, hp):
        if hp["weight_decay"] != 0:
            g = g + p * hp["weight_decay"]
        if hp["with_momentum"]:
            buf = avalon.assign(state["momentum_buffer"],
                                state["momentum_buffer"] * k["buf_keep"] + g * k["grad_scale"])
            g = g + buf * k["momentum"] if hp["nesterov"] else buf
        avalon.assign(p, p - k["lr"] * g)


# -- Adam and AdamW ---------------------------------------------------------------------------

@export("optim", "Optimizers")
class Adam(Optimizer):
    """Adam (Kingma & Ba) with PyTorch's bias correction, optional L2 weight
    decay (added to the gradient) and AMSGrad."""

    hyperparameters = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    dynamic = ("lr", "betas")
    state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    decoupled = False
    torch_fixed = {"maximize": False, "decoupled_weight_decay": False}

    def __init__(self, params=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False):
        self._validate({"betas": betas})
        super().__init__(params, dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad))

    def _init_state(self, p, group):
        st = {"exp_avg": _zeros_like(p), "exp_avg_sq": _zeros_like(p)}
        if group["amsgrad"]:
            st["max_exp_avg_sq"] = _zeros_like(p)
        return st

    def _coefficients(self, step, group):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        # in float64 on the host, as PyTorch computes them
        k = {"step_size": lr / (1 - beta1 ** step), "bc2_sqrt": math.sqrt(1 - beta2 ** step), **_beta_terms(group)}
        if self.decoupled:
            k["decay"] = 1 - lr * group["weight_decay"]
        return k

    def _rule(self, p, g, state, k, hp):
        wd = hp["weight_decay"]
        param = p
        if wd != 0:
            if self.decoupled:
                param = p * k["decay"]
            else:
                g = g + p * wd
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m = avalon.assign(m, m + (g - m) * k["one_minus_beta1"])
        v = avalon.assign(v, v * k["beta2"] + (g * g) * k["one_minus_beta2"])
        if hp["amsgrad"]:
            v = avalon.assign(state["max_exp_avg_sq"], avalon.maximum(state["max_exp_avg_sq"], v))
        denom = avalon.sqrt(v) / k["bc2_sqrt"] + hp["eps"]
        avalon.assign(p, param - k["step_size"] * (m / denom))


@export("optim", "Optimizers")
class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): the parameter
    shrinks by lr * weight_decay before the Adam step."""

    decoupled = True
    torch_fixed = {"maximize": False, "decoupled_weight_decay": True}

    def __init__(self, params=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)


# -- RMSprop, Adagrad and Adadelta -------------------------------------------------------------

@export("optim", "Optimizers")
class RMSprop(Optimizer):
    """RMSprop (Hinton) with PyTorch's options: momentum, centered (divide by
    the estimated variance instead of the raw second moment), weight decay."""

    hyperparameters = ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")
    dynamic = ("lr", "momentum")
    state_names = ("square_avg", "grad_avg", "momentum_buffer")

    def __init__(self, params=None, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered))

    def _init_state(self, p, group):
        st = {"square_avg": _zeros_like(p)}
        if group["momentum"] > 0:
            st["momentum_buffer"] = _zeros_like(p)
        if group["centered"]:
            st["grad_avg"] = _zeros_like(p)
        return st

    def _static(self, group):
        return {**super()._static(group), "with_momentum": group["momentum"] > 0}

    def _coefficients(self, step, group):
        return {"lr": group["lr"], "momentum": group["momentum"]}

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
        if hp["with_momentum"]:
            buf = avalon.assign(state["momentum_buffer"], state["momentum_buffer"] * k["momentum"] + g / avg)
            avalon.assign(p, p - k["lr"] * buf)
        else:
            avalon.assign(p, p - k["lr"] * (g / avg))


@export("optim", "Optimizers")
class Adagrad(Optimizer):
    """Adagrad (Duchi et al.): steps scaled by the root of the summed squared
    gradients, with PyTorch's lr_decay, initial_accumulator_value and eps."""

    hyperparameters = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")
    state_names = ("sum",)

    def __init__(self, params=None, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps))

    def _init_state(self, p, group):
        return {"sum": _zeros_like(p, group["initial_accumulator_value"])}

    def _coefficients(self, step, group):
        return {"clr": group["lr"] / (1 + (step - 1) * group["lr_decay"])}

    def _rule(self, p, g, state, k, hp):
        if hp["weight_decay"] != 0:
            g = g + p * hp["weight_decay"]
        s = avalon.assign(state["sum"], state["sum"] + g * g)
        avalon.assign(p, p - k["clr"] * (g / (avalon.sqrt(s) + hp["eps"])))


@export("optim", "Optimizers")
class Adadelta(Optimizer):
    """Adadelta (Zeiler): steps scaled by the ratio of running RMS of the
    updates and of the gradients, with PyTorch's rho, eps and lr."""

    hyperparameters = ("lr", "rho", "eps", "weight_decay")
    state_names = ("square_avg", "acc_delta")

    def __init__(self, params=None, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay))

    def _init_state(self, p, group):
        return {"square_avg": _zeros_like(p), "acc_delta": _zeros_like(p)}

    def _rule(self, p, g, state, k, hp):
        rho, eps = hp["rho"], hp["eps"]
        if hp["weight_decay"] != 0:
            g = g + p * hp["weight_decay"]
        sq = avalon.assign(state["square_avg"], state["square_avg"] * rho + (g * g) * (1 - rho))
        delta = avalon.sqrt(state["acc_delta"] + eps) / avalon.sqrt(sq + eps) * g
        avalon.assign(state["acc_delta"], state["acc_delta"] * rho + (delta * delta) * (1 - rho))
        avalon.assign(p, p - k["lr"] * delta)


# -- Adamax, NAdam and RAdam ---------------------------------------------------------------------

@export("optim", "Optimizers")
class Adamax(Optimizer):
    """Adamax (Kingma & Ba): Adam with the infinity norm of the gradients in
    place of the second moment."""

    hyperparameters = ("lr", "betas", "eps", "weight_decay")
    dynamic = ("lr", "betas")
    state_names = ("exp_avg", "exp_inf")

    def __init__(self, params=None, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self._validate({"betas": betas})
        super().__init__(params, dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps,
                                      weight_decay=weight_decay))

    def _init_state(self, p, group):
        return {"exp_avg": _zeros_like(p), "exp_inf": _zeros_like(p)}

    def _coefficients(self, step, group):
        return {"clr": group["lr"] / (1 - group["betas"][0] ** step), **_beta_terms(group)}

    def _rule(self, p, g, state, k, hp):
        if hp["weight_decay"] != 0:
            g = g + p * hp["weight_decay"]
        m = avalon.assign(state["exp_avg"], state["exp_avg"] + (g - state["exp_avg"]) * k["one_minus_beta1"])
        u = avalon.assign(state["exp_inf"], avalon.maximum(state["exp_inf"] * k["beta2"], avalon.abs(g) + hp["eps"]))
        avalon.assign(p, p - k["clr"] * (m / u))


def _beta_terms(group) -> dict:
    """The moment averages' coefficients, passed as data: OneCycleLR changes beta1
    every step, which must not retrace."""
    beta1, beta2 = group["betas"]
    return {"one_minus_beta1": 1 - beta1, "beta2": beta2, "one_minus_beta2": 1 - beta2}


def _nadam_mu(beta1, momentum_decay, step):
    return beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))


def _weight_decay(p, g, hp, k):
    """(the parameter to update, the gradient) after weight decay: decoupled (AdamW's
    p * (1 - lr * wd)) or L2 (g + wd * p), as torch's NAdam and RAdam choose."""
    if hp["weight_decay"] == 0:
        return p, g
    if hp["decoupled_weight_decay"]:
        return p * k["decay"], g
    return p, g + p * hp["weight_decay"]


def _adam_moments(state, g, k):
    """Adam's running moments, updated in place: (exp_avg, exp_avg_sq)."""
    m = avalon.assign(state["exp_avg"], state["exp_avg"] + (g - state["exp_avg"]) * k["one_minus_beta1"])
    v = avalon.assign(state["exp_avg_sq"], state["exp_avg_sq"] * k["beta2"] + (g * g) * k["one_minus_beta2"])
    return m, v


@export("optim", "Optimizers")
class NAdam(Optimizer):
    """NAdam (Dozat): Adam with Nesterov momentum and PyTorch's momentum
    schedule (momentum_decay); decoupled_weight_decay=True decays the
    parameter as AdamW does."""

    hyperparameters = ("lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay")
    dynamic = ("lr", "betas")
    state_names = ("exp_avg", "exp_avg_sq")
    scalar_state = ("mu_product",)

    def __init__(self, params=None, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False):
        self._validate({"betas": betas})
        super().__init__(params, dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps,
                                      weight_decay=weight_decay, momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay))

    def _init_state(self, p, group):
        return {"exp_avg": _zeros_like(p), "exp_avg_sq": _zeros_like(p)}

    @staticmethod
    def _mu_product(group, step) -> float:
        # a float32 running product, as torch keeps it (a scalar tensor of the default dtype)
        beta1, decay = group["betas"][0], group["momentum_decay"]
        product = np.float32(1.0)
        for t in range(1, step + 1):
            product = product * np.float32(_nadam_mu(beta1, decay, t))
        return float(product)

    def _coefficients(self, step, group):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        mu, mu_next = _nadam_mu(beta1, group["momentum_decay"], step), \
            _nadam_mu(beta1, group["momentum_decay"], step + 1)
        product = self._mu_product(group, step)
        return {"decay": 1 - lr * group["weight_decay"], "bc2": 1 - beta2 ** step,
                "grad_coef": lr * (1 - mu) / (1 - product),
                "avg_coef": lr * mu_next / (1 - product * mu_next), **_beta_terms(group)}

    def _rule(self, p, g, state, k, hp):
        param, g = _weight_decay(p, g, hp, k)
        m, v = _adam_moments(state, g, k)
        denom = avalon.sqrt(v / k["bc2"]) + hp["eps"]
        avalon.assign(p, param - k["grad_coef"] * (g / denom) - k["avg_coef"] * (m / denom))

    def _torch_state(self, st, group):
        out = super()._torch_state(st, group)
        out["mu_product"] = self._mu_product(group, st["step"])
        return out

    def _check_loaded_state(self, index, st, group):
        saved = st.pop("mu_product", None)
        if saved is None:
            return
        expected = self._mu_product(group, st["step"])
        if not math.isclose(saved, expected, rel_tol=1e-5):
            raise OptimizerError(f"NAdam.load_state_dict: parameter {index}'s mu_product is {saved!r} but "
                                 f"{st['step']} steps with betas={group['betas']} and momentum_decay="
                                 f"{group['momentum_decay']} give {expected!r}{at(user_location())}; Avalon "
                                 f"recomputes it from the step count, so it cannot resume this state")


@export("optim", "Optimizers")
class RAdam(Optimizer):
    """RAdam (Liu et al.): Adam with the variance of the adaptive learning rate
    rectified, and plain momentum SGD while too few steps were taken;
    decoupled_weight_decay=True decays the parameter as AdamW does."""

    hyperparameters = ("lr", "betas", "eps", "weight_decay", "decoupled_weight_decay")
    dynamic = ("lr", "betas")
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False):
        self._validate({"betas": betas})
        super().__init__(params, dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps,
                                      weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay))

    def _init_state(self, p, group):
        return {"exp_avg": _zeros_like(p), "exp_avg_sq": _zeros_like(p)}

    def _coefficients(self, step, group):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2 ** step) / bc2
        rectified = rho_t > 5.0
        rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) \
            if rectified else 0.0
        # rectified: p -= lr/bc1 * m * rect * sqrt(bc2) / (sqrt(v) + eps); else p -= lr/bc1 * m
        return {"decay": 1 - lr * group["weight_decay"], "step_size": lr / bc1,
                "adaptive": rect * math.sqrt(bc2), "plain": 0.0 if rectified else 1.0, **_beta_terms(group)}

    def _rule(self, p, g, state, k, hp):
        param, g = _weight_decay(p, g, hp, k)
        m, v = _adam_moments(state, g, k)
        scale = k["adaptive"] / (avalon.sqrt(v) + hp["eps"]) + k["plain"]
        avalon.assign(p, param - k["step_size"] * (m * scale))
