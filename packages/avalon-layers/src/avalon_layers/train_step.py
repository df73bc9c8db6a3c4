"""avalon.optim.train_step: a training step compiled as one function, the
gradient and the optimizer's update together.

    step = avalon.optim.train_step(loss_fn, opt)
    for x, y in batches:
        loss = step(model, x, y)

does what

    loss, grads = avalon.grad(loss_fn, model, x, y, argnums=0)
    opt.step(model, grads[0])

does, with the update traced into the gradient's graph (as a JAX user jits
the whole training step).  Each parameter's update then runs in the same
compiled call as the product that computed its gradient, reading that
gradient while it is still in the core's cache, and the gradients, which the
caller never sees, need no memory beyond the call.  An optimizer update is a
pass over memory (Adam reads and writes 28 bytes per parameter), so on a
model of large weights this saves a good part of it.

The optimizer is used as opt.step uses it: the same state (per path, or per
position for an optimizer given its parameters; an nn.Module's parameters
moved into flat buffers at the first call), the same update rule, the same
step counts.  `opt.state_dict()`, `load_state_dict` and changes to
`param_groups` (a scheduler's new lr) take effect at the next call; a changed
fixed hyperparameter (betas, weight decay) compiles the step again, once.

How it is built: a first call traces the gradient alone to learn its
structure (which parameters get a gradient, tied ones once), prepares the
optimizer's state for those parameters as opt.step would, and compiles
`grad + update` as one avalon.jit function (`step.function`: its `.source`,
`.graph`) with the state arrays and the step's coefficients (learning rate,
bias corrections: 0-d arrays) as arguments.  Later calls check that nothing
this plan rests on has changed (the model's arrays, the optimizer's state
dicts and step counts, its fixed hyperparameters, the arguments' signature)
and call it; anything else plans again.  Where the update cannot join the
gradient exactly as opt.step would run it (parameters at different step
counts after a partial load), the call runs the two separately, with the
same result; `step.last_fused` says which ran.
"""
from __future__ import annotations

import weakref

import numpy as np

import avalon
from avalon import tree
from avalon.api import JitFunction
from avalon.errors import AvalonError, at, user_location
from avalon.primitive import active_graph, is_tracer
from avalon.runtime.gc_pause import gc_paused

from .flat import flat_group_for
from .optim import Optimizer, OptimizerError
from .registry import export

#: arguments of the compiled step before the loss's own batch: hyperparameters, spec,
#: model, optimizer state, coefficients (none of them carries the batch)
_STEP_ARGUMENTS = 5

_STALE = object()
_UNBOUND = object()


class _StepFunction(JitFunction):
    """The compiled step: batch inputs are the loss's arguments only (the
    optimizer's state has parameter shapes, never the batch)."""

    def _unbatched_arguments(self, n_args) -> set:
        return set(range(_STEP_ARGUMENTS))


class TrainStep:
    """`step(model, *args)`: loss_fn's value (with has_aux, (value, aux)) after
    one optimizer step on its gradient with respect to the model."""

    def __init__(self, loss_fn, optimizer, has_aux: bool = False):
        if not isinstance(optimizer, Optimizer):
            raise OptimizerError(f"train_step: optimizer is a {type(optimizer).__name__}, not an avalon.optim "
                                 f"optimizer{at(user_location())}; pass one, train_step(loss_fn, "
                                 f"avalon.optim.Adam(lr=1e-3))")
        if not callable(loss_fn):
            raise TypeError(f"train_step: loss_fn is a {type(loss_fn).__name__}, not a function of "
                            f"(model, *batch){at(user_location())}")
        self.loss_fn, self.optimizer, self.has_aux = loss_fn, optimizer, bool(has_aux)
        self._grad = avalon.value_and_grad(loss_fn, argnums=0, has_aux=self.has_aux)
        self.function = _StepFunction(self._traced_step)
        self.function.__name__ = "train_step_" + getattr(loss_fn, "__name__", type(loss_fn).__name__)
        self._plan = None
        self._structures: dict = {}    # signature of (model, *args) -> _gradient_structure's result
        self.last_fused = None     # whether the last call ran gradient and update as one function

    def __call__(self, model, *args):
        if active_graph() is not None:
            raise AvalonError(f"train_step updates the model's arrays in place and cannot run inside "
                              f"avalon.jit, avalon.grad or avalon.vmap{at(user_location())}; call it outside, "
                              f"once per batch")
        plan = self._plan
        if plan is not None:
            out = plan.run(model, args)
            if out is not _STALE:
                self.last_fused = True
                return out
        with gc_paused():   # planning traces the gradient: no full collection in the middle of it
            plan = self._plan = _Plan.make(self, model, args)
        if plan is None:
            self.last_fused = False
            return self._separately(model, args)
        self.last_fused = True
        return plan.run(model, args)

    def _separately(self, model, args):
        out, grads = self._grad(model, *args)
        self.optimizer.step(model, grads[0])
        return out

    def _traced_step(self, hps, spec, model, states, coefs, *args):
        """What self.function traces: the gradient, then each group's update."""
        out, grads = self._grad(model, *args)
        leaves = tree.flatten(model, is_leaf=is_tracer)[0]
        gleaves = tree.flatten(grads[0], is_leaf=is_tracer)[0]
        for hp, members, group_states, group_coefs in zip(hps, spec, states, coefs):
            params = [leaves[i] for i, _ in members]
            grads_of = [tuple(gleaves[j] for j in js) for _, js in members]
            self.optimizer._update_all(hp, params, grads_of, group_states, group_coefs)
        return out

    def _structure_of(self, model, args):
        """_gradient_structure for this signature, traced once (a step that runs
        separately plans again at every call)."""
        key = _signature((model,) + tuple(args))
        found = self._structures.get(key)
        if found is None:
            found = self._structures[key] = self._gradient_structure(model, args)
        return found

    def _gradient_structure(self, model, args):
        """What avalon.grad returns for the model on these arguments, with a
        zero-strided placeholder in place of each gradient (traced, not run: the
        traced gradient is the one the compiled step then inlines)."""
        return self._grad.output_structure(model, *args)[1][0]

    def __repr__(self):
        name = getattr(self.loss_fn, "__name__", type(self.loss_fn).__name__)
        return f"train_step({name}, {type(self.optimizer).__name__})"


class _Group:
    """One parameter group's part of a plan: its parameters' state dicts (and
    the arrays in them the step was compiled with), their step count."""
    __slots__ = ("index", "hp", "entries", "states", "arrays", "step")

    def __init__(self, index, hp, entries, states, names):
        self.index, self.hp, self.entries, self.states = index, hp, entries, states
        self.arrays = [{n: st[n] for n in names if n in st} for st in states]
        self.step = states[0]["step"]


class _Plan:
    """A TrainStep compiled for one model, argument signature and optimizer
    state; `run` calls it while all of them are as planned."""

    @classmethod
    def make(cls, step: TrainStep, model, args):
        """The plan for this call, or None when the update cannot join the
        gradient exactly as opt.step would run it."""
        opt = step.optimizer
        if opt._given:
            opt._refresh_index()
        structure = step._structure_of(model, args)
        entries = opt._collect(model, structure, frozenset())
        if opt._given:
            entries = opt._own(entries, what=f"the model ({type(model).__name__})")
        if not entries:
            return None
        groups = cls._groups(opt, model, entries)
        if groups is None:
            return None
        self = cls()
        self.step, self.groups = step, groups
        self.model = weakref.ref(model)
        self.indexed = opt._indexed
        leaves, self.td = tree.flatten(model)
        gleaves = tree.flatten(structure)[0]
        where, gwhere = {id(x): i for i, x in enumerate(leaves)}, {id(g): j for j, g in enumerate(gleaves)}
        self.params = [(where[id(e.param)], e.param) for g in groups for e in g.entries]
        self.spec = tuple(tuple((where[id(e.param)], tuple(gwhere[id(x)] for x in e.grads)) for e in g.entries)
                          for g in groups)
        self.hps = tuple(g.hp for g in groups)
        self.args_key = _signature(args)
        self.bound = _UNBOUND      # bound at the first call (BoundCall), or None
        return self

    @staticmethod
    def _groups(opt, model, entries):
        """Each group's _Group, its state prepared as opt.step prepares it (an
        nn.Module's parameters moved into flat buffers); None when a group's
        parameters are at different step counts."""
        if not opt._given:
            group = opt.param_groups[0]
            hp = opt._static(group)
            opt._flat = flat = flat_group_for(model, entries, opt._flat)
            if flat is not None:
                prepared = opt._flat_state(flat, entries, hp, group)
                if prepared is None:
                    return None
                per_path, _, names = prepared
                return [_Group(0, hp, entries, per_path, names)]
        by_group: dict = {}
        for e in entries:
            by_group.setdefault(e.group, []).append(e)
        groups = []
        for index, members in sorted(by_group.items()):
            group = opt.param_groups[index]
            hp = opt._static(group)
            states = [opt._state_of(e, group, hp) for e in members]
            if len({st["step"] for st in states}) != 1:
                return None
            groups.append(_Group(index, hp, members, states, opt.state_names))
        return groups

    def _coefficients(self, opt):
        """Each group's per-parameter coefficient dicts for its next step (one dict
        per dtype and device, shared: the compiled step takes each array once)."""
        coefs = []
        for g in self.groups:
            group, cache = opt.param_groups[g.index], {}
            coefs.append([opt._coefficient_arrays(g.step + 1, e.param, cache, group) for e in g.entries])
        return coefs

    def _bind(self, model, args, coefs):
        """The compiled step bound to this call's signature (api.BoundCall): later
        calls put their batch and coefficients at known positions of its flat
        arguments instead of flattening all of them and looking the signature up.
        None when the positions cannot be told apart (an array passed twice)."""
        bound = self.step.function.bind(self.hps, self.spec, model, [g.arrays for g in self.groups], coefs, *args)
        model_leaves = tree.flatten(model)[0]
        arg_leaves, self.args_td = tree.flatten(args)
        lead = len(bound.leaves) - len(arg_leaves)
        if (lead < len(model_leaves) or any(a is not b for a, b in zip(bound.leaves, model_leaves))
                or any(a is not b for a, b in zip(bound.leaves[lead:], arg_leaves))):
            return None
        slot = {id(x): k for k, x in enumerate(bound.leaves[:lead])}
        self.coef_slots = [(gi, ei, name, slot[id(a)]) for gi, per_entry in enumerate(coefs)
                           for ei, c in enumerate(per_entry) for name, a in c.items()]
        self.n_model, self.lead = len(model_leaves), lead
        self.arg_positions = range(lead, len(bound.leaves))
        for k in [k for *_, k in self.coef_slots] + list(self.arg_positions):
            bound.leaves[k] = None      # filled at each call: no call's arrays are kept
        return bound

    def run(self, model, args):
        """The step's output, or _STALE (nothing done) when anything planned on changed."""
        opt = self.step.optimizer
        if model is not self.model():
            return _STALE
        if opt._given:
            opt._refresh_index()
            if opt._indexed != self.indexed:
                return _STALE
        leaves, td = tree.flatten(model)
        if td != self.td or any(leaves[i] is not p for i, p in self.params):
            return _STALE
        for g in self.groups:
            if g.index >= len(opt.param_groups) or opt._static(opt.param_groups[g.index]) != g.hp \
                    or not _state_unchanged(opt, g):
                return _STALE
        coefs = self._coefficients(opt)
        if self.bound is _UNBOUND:
            self.bound = self._bind(model, args, coefs)
        out = self._call_bound(leaves, args, coefs) if self.bound is not None else _STALE
        if out is _STALE:
            if self.bound is not None or _signature(args) != self.args_key:
                return _STALE
            out = self.step.function(self.hps, self.spec, model, [g.arrays for g in self.groups], coefs, *args)
        for g in self.groups:
            g.step += 1
            for st in g.states:
                st["step"] = g.step
        return out

    def _call_bound(self, model_leaves, args, coefs):
        bound = self.bound
        arg_leaves, args_td = tree.flatten(args)
        if args_td != self.args_td or not bound.current() \
                or any(a is not b for a, b in zip(model_leaves, bound.leaves[:self.n_model])):
            return _STALE
        leaves = list(bound.leaves)
        leaves[self.lead:] = arg_leaves
        if not bound.matches(leaves, self.arg_positions):
            return _STALE
        for gi, ei, name, k in self.coef_slots:
            leaves[k] = coefs[gi][ei][name]
        return tree.unflatten(bound.entry.out_tree, bound.call(leaves))


def _state_unchanged(opt, group: _Group) -> bool:
    """Whether the group's parameters still have the state dicts, arrays and
    step count the plan holds (opt.load_state_dict replaces them)."""
    state = opt.state
    for e, st, arrays in zip(group.entries, group.states, group.arrays):
        if state.get(e.path) is not st or st["step"] != group.step:
            return False
        if any(st.get(n) is not a for n, a in arrays.items()):
            return False
    return True


def _signature(args):
    leaves, td = tree.flatten(args)
    return td, tuple((type(x), tuple(x.shape), np.dtype(x.dtype)) for x in leaves)


@export("optim", "Fitting API")
def train_step(loss_fn, optimizer, *, has_aux: bool = False) -> TrainStep:
    """A training step as one compiled function: `step(model, *args)` takes
    loss_fn(model, *args)'s gradient with respect to the model and runs
    `optimizer`'s update on it, returning the loss (with has_aux=True, loss_fn
    returns (loss, aux) and so does the step).  Same results as
    `loss, grads = avalon.grad(loss_fn, model, *args, argnums=0);
    optimizer.step(model, grads[0])`, with each parameter's update compiled
    into the gradient's function (see avalon_layers.train_step)."""
    return TrainStep(loss_fn, optimizer, has_aux=has_aux)
