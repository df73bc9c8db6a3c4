"""Flat parameter buffers: the parameters an optimizer updates, their
gradients and the optimizer's state, each in one contiguous buffer.

At its first step on an nn.Module an optimizer moves the parameters it updates
into one buffer per (dtype, device) and points the module's attributes at
views of it: the model's arrays are still its parameters (same shapes, same
names, updated in place from then on), and the whole update is one compiled
pass over a few long arrays instead of one small pass per parameter and per
operation.  The gradients are gathered into a flat buffer too (one copy each,
which also reads a transposed weight gradient once instead of in every
operation of the update), and the state (momentum, moments) lives in flat
buffers whose per-parameter views are what `opt.state[path]` holds.

A model whose arrays were replaced since (load_state_dict, to(device), an
assignment) is noticed at the next step: the buffers are built again from the
current arrays.  Models this cannot serve exactly (not an nn.Module, tied
weights, parameters that are views of other arrays, mixed dtypes or devices)
keep the per-parameter update.

Hold the model, not its arrays, across the first step: an array taken from the
model before it (`w = model.fc.weight`) is no longer the parameter afterwards.
"""
from __future__ import annotations

import weakref

import numpy as np

from avalon.backends import backend_of

from .module import Module


_PARAMETER_BUFFERS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


class FlatGroup:
    """Parameters at `paths` (in this order) stored in one buffer."""

    def __init__(self, model, entries):
        first = entries[0].param
        self.backend, self.dtype = backend_of(first), np.dtype(first.dtype)
        self.paths = tuple(e.path for e in entries)
        self.shapes = [tuple(e.param.shape) for e in entries]
        self.offsets = np.cumsum([0] + [int(np.prod(s, dtype=np.int64)) for s in self.shapes]).tolist()
        self.params = self.backend.empty((self.offsets[-1],), self.dtype)
        _PARAMETER_BUFFERS[id(self.params)] = self.params
        self.grad = self.backend.empty((self.offsets[-1],), self.dtype)
        self.param_views = self._views(self.params)
        self.grad_views = self._views(self.grad)
        self.states: dict = {}          # state name -> flat buffer
        self.state_views: dict = {}     # state name -> views, one per path
        owners = _owners(model, entries)
        for e, view, (module, attr) in zip(entries, self.param_views, owners):
            view[...] = e.param
            object.__setattr__(module, attr, view)
            # the entry now names the model's array: a per-parameter update of this
            # step (when the flat one cannot serve it) must write where the model reads
            e.param = view

    @property
    def size(self) -> int:
        """Elements of the flat buffers."""
        return self.offsets[-1]

    def _views(self, flat):
        return [flat[a:b].reshape(shape) for a, b, shape in zip(self.offsets, self.offsets[1:], self.shapes)]

    def serves(self, entries) -> bool:
        """Whether `entries` are still exactly this group's parameters (the model's
        arrays were not replaced since)."""
        return (len(entries) == len(self.paths)
                and all(e.path == p and e.param is v for e, p, v in zip(entries, self.paths, self.param_views)))

    def gather_gradients(self, entries) -> None:
        for e, view in zip(entries, self.grad_views):
            view[...] = e.grads[0]

    def flat_states(self, per_path_states, names, zeros=frozenset()) -> dict:
        """The flat state buffers, after copying in any per-parameter state that is
        not already a view of them (fresh, or loaded); the per-path dicts then
        hold the views.  `zeros`: ids of per-path arrays known to hold zeros, not
        copied into a buffer made here (it is made zero-filled): the copy read
        every page of the fresh zeros and wrote the buffer's, ~2 ms of an Adam's
        first step over 0.8 M parameters."""
        for name in names:
            arrays = [st.get(name) for st in per_path_states]
            if any(a is None for a in arrays):
                continue
            made_here = name not in self.states
            views = self._state_views(name)
            for st, a, view in zip(per_path_states, arrays, views):
                if a is not view:
                    if not (made_here and id(a) in zeros):
                        view[...] = a
                    st[name] = view
        return {name: self.states[name] for name in names if name in self.states
                and all(st.get(name) is v for st, v in zip(per_path_states, self.state_views[name]))}

    def _state_views(self, name):
        if name not in self.states:
            # written here, not left to calloc: the update's threads then met its pages
            # unmapped, each page faulting twice (read, then write), and the first
            # update over 0.8 M parameters took 25 ms more
            self.states[name] = self.backend.empty((self.offsets[-1],), self.dtype)
            self.states[name][...] = 0
            self.state_views[name] = self._views(self.states[name])
        return self.state_views[name]


def flat_group_for(model, entries, current):
    """`current` when it still serves `entries`, a new FlatGroup when the model
    can be served flat, else None (the per-parameter update)."""
    if current is not None and current.serves(entries):
        return current
    if not _eligible(model, entries):
        return None
    return FlatGroup(model, entries)


def _eligible(model, entries) -> bool:
    if not isinstance(model, Module) or not entries:
        return False
    first = entries[0].param
    backend, dtype = backend_of(first), np.dtype(first.dtype)
    for e in entries:
        p = e.param
        if len(e.grads) != 1 or np.dtype(p.dtype) != dtype or backend_of(p) is not backend:
            return False  # tied weights, or several dtypes or devices
        if getattr(p, "base", None) is not None and not _is_flat_view(p):
            return False  # a view of another array: moving it would cut that tie
    return _owners(model, entries) is not None


def _is_flat_view(p) -> bool:
    """A view of the parameter buffer of a group (an earlier one, whose model's
    arrays were replaced since, or another optimizer's)."""
    base = p.base
    return base is not None and _PARAMETER_BUFFERS.get(id(base)) is base


def _owners(model, entries):
    """(module, attribute) holding each entry's parameter, or None when one is
    not a plain attribute of a module of the model, or is held by two (tied
    weights: the optimizer sees one parameter, at its first path; moving it
    into the buffer would cut the tie)."""
    modules = dict(model.named_modules())
    held = {}
    for module in modules.values():
        for value in vars(module).values():
            held[id(value)] = held.get(id(value), 0) + 1
    owners = []
    for e in entries:
        name, _, attr = e.path.rpartition(".")
        module = modules.get(name)
        if module is None or module.__dict__.get(attr) is not e.param or held.get(id(e.param)) != 1:
            return None
        owners.append((module, attr))
    return owners
