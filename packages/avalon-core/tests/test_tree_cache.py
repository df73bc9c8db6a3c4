"""avalon.tree remembers the flattened structure of objects whose class opts in
(__avalon_flatten_cache__, as nn.Module does): a later flatten reuses it only
while every attribute of every object in it is the same object, so any change
is seen and the result always equals a fresh walk."""
from __future__ import annotations

import numpy as np

import avalon
from avalon import tree


class Layer:
    __avalon_flatten_cache__ = True

    def __init__(self, n):
        self.w = np.ones((n, n), np.float32)
        self.b = np.zeros(n, np.float32)
        self.training = True
        self.shape = (n, n)


class Net:
    __avalon_flatten_cache__ = True

    def __init__(self):
        self.l1, self.l2 = Layer(3), Layer(3)
        self.scale = 2.0


def _fresh(args):
    """flatten without the cache: what every call must equal."""
    saved = dict(tree._subtrees)
    tree._subtrees.clear()
    try:
        return tree.flatten(args)
    finally:
        tree._subtrees.update(saved)


def _same(args):
    leaves, td = tree.flatten(args)
    want_leaves, want_td = _fresh(args)
    assert td == want_td
    assert len(leaves) == len(want_leaves) and all(a is b for a, b in zip(leaves, want_leaves))
    return leaves, td


def test_a_second_flatten_reuses_the_structure():
    net, x = Net(), np.zeros(3, np.float32)
    _, first = _same((net, x))
    assert net in tree._subtrees
    _, second = _same((net, x))
    assert second is first or second == first


def test_every_kind_of_change_is_seen():
    net, x = Net(), np.zeros(3, np.float32)
    _same((net, x))
    net.l1.w = np.ones((3, 3), np.float32)                 # a replaced array
    leaves, _ = _same((net, x))
    assert leaves[0] is net.l1.w
    object.__setattr__(net.l2, "training", False)          # a flag, set around __setattr__
    _same((net, x))
    net.scale = 3.0                                         # a static value
    _same((net, x))
    net.l2 = Layer(4)                                       # a new sub-object
    _same((net, x))
    del net.l1.b                                            # a removed field
    _same((net, x))
    net.l1.extra = np.zeros(2, np.float32)                  # an added field
    _same((net, x))


def test_a_tie_with_an_earlier_argument_is_recorded():
    net = Net()
    _same((net, np.zeros(3, np.float32)))
    _, td = _same((net.l1.w, net))                          # the same array before the object
    assert any(isinstance(c, tree.Alias) for c in _aliases(td))


def _aliases(td):
    if isinstance(td, tree.TreeDef):
        for c in td.children:
            yield from _aliases(c)
    else:
        yield td


def test_objects_holding_mutable_containers_are_walked_every_time():
    net = Net()
    net.l1.cache = [np.zeros(2, np.float32)]
    tree.flatten((net,))
    assert net not in tree._subtrees and net.l1 not in tree._subtrees
    assert net.l2 in tree._subtrees
    net.l1.cache.append(np.ones(2, np.float32))             # changed in place: must be seen
    leaves, _ = _same((net,))
    assert any(x is net.l1.cache[1] for x in leaves)


def test_modules_use_it_and_compiled_functions_see_changes():
    import avalon.nn as nn
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = np.ones((2, 3), np.float32)
    f = avalon.jit(lambda m, x: m(x))
    first = f(model, x)
    assert model in tree._subtrees
    model[0].weight[...] = 0.0                              # in place: same arrays, new values
    np.testing.assert_allclose(f(model, x), model(x))
    model[2].bias = nn.Parameter(np.full(2, 5.0, np.float32))   # replaced: the call must use the new array
    np.testing.assert_allclose(f(model, x), model(x))
    assert not np.allclose(first, f(model, x))
    model.eval()
    f(model, x)
    assert f.traces == 2   # the training flag is part of the signature: one retrace, as without the cache


class _EqualLayer(Layer):
    """Objects that compare equal to each other: the cache must still tell them apart."""

    def __eq__(self, other):
        return isinstance(other, _EqualLayer)

    def __hash__(self):
        return 0


def test_objects_that_compare_equal_are_still_told_apart():
    a, b = _EqualLayer(2), _EqualLayer(3)
    _same((a,))
    leaves, _ = _same((b,))
    assert leaves[0] is b.w


def test_an_object_that_cannot_be_remembered_is_not_examined_again_on_every_call(monkeypatch):
    """Holding a list keeps a subtree out of the cache; finding that out walks
    the subtree once more, which must not happen on every call while nothing
    changed (it would double the cost of flattening such a model)."""
    net = Net()
    net.history = [np.zeros(2, np.float32)]
    tree.flatten((net,))
    walks = []
    real = tree._collect_objects
    monkeypatch.setattr(tree, "_collect_objects", lambda *a: walks.append(a[0]) or real(*a))
    for _ in range(3):
        leaves, _ = tree.flatten((net,))
        assert leaves[-1] is net.history[0]
    assert net not in walks
    net.history = []            # a changed attribute: examined afresh
    tree.flatten((net,))
    assert net in walks


def test_a_remembered_object_is_not_kept_alive_by_the_cache():
    # a gradient structure is a new object per step: remembering it must not keep it
    # (and every array it holds) alive once the caller drops it
    import gc
    import weakref
    net = Net()
    tree.flatten(net)
    gone = weakref.ref(net)
    arrays = [weakref.ref(x) for x in tree.flatten(net)[0]]
    del net
    gc.collect()
    assert gone() is None
    assert all(a() is None for a in arrays)
