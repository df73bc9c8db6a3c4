"""What a traced function does to the state it is given, as eager code does:
arrays written twice (avalon.assign), arrays reached under two names (tied
weights) and inputs the result does not depend on (no gradient: None)."""
from __future__ import annotations

import numpy as np

import avalon


# -- assign: later reads of an array see what was written into it ---------------------------------------------

def _two_writes(a, x):
    avalon.assign(a, a + x)
    avalon.assign(a, a * 2.0)
    return avalon.sum(a * x)


def test_assign_twice_in_jit_applies_both_writes_in_order_as_eager():
    x = np.arange(4, dtype=np.float32)
    eager_a = np.ones(4, np.float32)
    expected = _two_writes(eager_a, x)
    f = avalon.jit(_two_writes)
    for call in range(2):  # the second call starts from the first call's result
        a = np.ones(4, np.float32)
        got = f(a, x)
        np.testing.assert_allclose(a, eager_a)
        np.testing.assert_allclose(got, expected)
    assert f.traces == 1


def test_assign_twice_in_grad_writes_the_final_value_into_the_input():
    a, x = np.ones(4, np.float32), np.arange(4, dtype=np.float32)
    loss, grads = avalon.grad(_two_writes, a, x, argnums=1)
    np.testing.assert_allclose(a, (1.0 + x) * 2.0)
    np.testing.assert_allclose(loss, np.sum((1.0 + x) * 2.0 * x))
    # the written value is a constant for the gradient (assign passes none through)
    np.testing.assert_allclose(grads[1], (1.0 + x) * 2.0)


def test_a_read_between_two_writes_sees_the_first():
    def f(a):
        avalon.assign(a, a + 1.0)
        middle = a * 1.0
        avalon.assign(a, a * 10.0)
        return middle + a
    a = np.zeros(3, np.float32)
    out = avalon.jit(f)(a)
    np.testing.assert_allclose(a, np.full(3, 10.0))
    np.testing.assert_allclose(out, np.full(3, 11.0))


# -- tied arrays: one leaf, one input, one summed gradient -------------------------------------------------------

class _Tied:
    def __init__(self):
        rng = np.random.default_rng(1)
        self.wte = rng.standard_normal((5, 3)).astype(np.float32)
        self.head = self.wte          # GPT's lm_head.weight = wte.weight


def _tied_loss(m, x):
    h = m.wte[x]                      # (n, 3)
    return avalon.sum(avalon.tanh(h @ m.head.T))


def test_the_same_array_at_two_places_flattens_to_one_leaf_and_an_alias():
    m = _Tied()
    leaves, td = avalon.tree.flatten(m)
    assert len(leaves) == 1 and leaves[0] is m.wte
    assert avalon.tree.leaf_paths(td) == [".wte"]
    assert avalon.tree.alias_paths(td) == [(".head", 0)]
    rebuilt = avalon.tree.unflatten(td, [np.zeros((5, 3), np.float32)])
    assert rebuilt.head is rebuilt.wte
    untied = _Tied()
    untied.head = untied.wte.copy()
    assert avalon.tree.flatten(untied)[1] != td   # the tie is part of the signature


def test_tied_weights_get_the_sum_of_both_uses_at_both_places_as_torch():
    import torch
    m, x = _Tied(), np.array([0, 3, 3, 1])
    loss, (g, _) = avalon.grad(_tied_loss, m, x)
    w = torch.from_numpy(m.wte.copy()).requires_grad_(True)
    tloss = torch.tanh(w[torch.from_numpy(x)] @ w.T).sum()
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5)
    np.testing.assert_allclose(g.wte, w.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert g.head is g.wte
    assert len(avalon.value_and_grad(_tied_loss)._last().compiled.graph.inputs) == 2


# -- an input the result does not depend on has no gradient ------------------------------------------------------

class _Params:
    """A model as a plain object: its arrays are parameters, as a Module's are."""

    def __init__(self, **arrays):
        self.__dict__.update(arrays)


def test_an_unused_parameter_gets_none_not_zeros():
    params = _Params(used=np.ones(3, np.float32), unused=np.ones(2, np.float32))
    loss, (g,) = avalon.grad(lambda p: avalon.sum(p.used * 2.0), params)
    np.testing.assert_allclose(g.used, np.full(3, 2.0))
    assert g.unused is None


def test_an_unused_array_outside_a_model_gets_zeros_as_in_torch_func():
    params = {"used": np.ones(3, np.float32), "unused": np.ones(2, np.float32)}
    loss, (g, x_grad) = avalon.grad(lambda p, x: avalon.sum(p["used"] * 2.0), params, np.ones(4, np.float32))
    np.testing.assert_array_equal(g["unused"], np.zeros(2, np.float32))
    np.testing.assert_array_equal(x_grad, np.zeros(4, np.float32))
    assert g["unused"].dtype == np.float32


def test_an_array_reached_only_through_stop_gradient_gets_none():
    params = _Params(w=np.ones(3, np.float32), c=np.ones(3, np.float32))
    _, (g,) = avalon.grad(lambda p: avalon.sum(p.w * avalon.stop_gradient(p.c)), params)
    assert g.c is None and g.w is not None


# -- objects declare which of their arrays are not trained -------------------------------------------------------

class _WithCache:
    """A plain class using the protocol: `mask` is cached, not trained."""

    def __init__(self):
        self.w = np.ones(3, np.float32)
        self.mask = np.ones(3, np.float32)

    def __avalon_nondiff_fields__(self):
        return ("mask",)


def test_fields_declared_not_trained_get_no_gradient_and_are_part_of_the_signature():
    m = _WithCache()
    f = avalon.value_and_grad(lambda m: avalon.sum(m.w * m.mask))
    loss, (g,) = f(m)
    assert g.mask is None
    np.testing.assert_allclose(g.w, np.ones(3))
    _, td = avalon.tree.flatten(m)
    assert avalon.tree.trainable_leaves(td) == [True, False]
    f(m)
    assert f.traces == 1


def test_equal_gradients_of_two_arrays_are_two_arrays():
    # both gradients are the same value (CSE computes it once): they must stay two arrays
    params = {"a": np.zeros(3, np.float32), "b": np.zeros(3, np.float32)}
    _, (g,) = avalon.grad(lambda p: avalon.sum(p["a"]) + avalon.sum(p["b"]), params)
    assert g["a"] is not g["b"]
    np.testing.assert_array_equal(g["a"], g["b"])


def test_a_value_computed_before_the_first_write_is_written_second():
    def f(a, x):
        second = x * 3.0
        avalon.assign(a, x * 2.0)
        avalon.assign(a, second)
        return avalon.sum(a)
    a, x = np.zeros(3, np.float32), np.ones(3, np.float32)
    np.testing.assert_allclose(avalon.jit(f)(a, x), 9.0)
    np.testing.assert_allclose(a, np.full(3, 3.0))


def test_the_retrace_log_says_which_array_was_frozen(caplog):
    import logging
    m = _WithCache()
    f = avalon.value_and_grad(lambda m: avalon.sum(m.w * m.mask))
    f(m)
    _WithCache.__avalon_nondiff_fields__ = lambda self: ("mask", "w")
    try:
        with caplog.at_level(logging.DEBUG, logger="avalon.trace"), \
                __import__("pytest").raises(avalon.AvalonError, match="declared not trained"):
            f(m)
    finally:
        _WithCache.__avalon_nondiff_fields__ = lambda self: ("mask",)
    assert "args[0].w is no longer trained" in caplog.text


def test_an_array_passed_in_two_arguments_is_differentiated_for_either():
    w = np.arange(3, dtype=np.float32)
    f = lambda a, b: avalon.sum(a * b)  # noqa: E731
    _, grads = avalon.grad(f, w, w, argnums=1)
    np.testing.assert_allclose(grads[1], 2 * w)   # d/dw sum(w * w), as torch for one tensor used twice
    assert grads[1] is grads[0]


def test_tied_and_frozen_arrays_keep_their_meaning_in_a_nested_grad():
    """A grad inlined into another trace (jit of grad) sees tied weights as one
    input, as a top-level grad does, and leaves untrained fields alone."""
    w = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    x = np.array([[1.0, -1.0]], np.float32)

    def loss(p, x):
        return avalon.sum((x @ p["a"]) @ p["b"])

    top = avalon.grad(loss, {"a": w, "b": w}, x)[1][0]
    nested = avalon.jit(lambda p, x: avalon.grad(loss, p, x)[1][0])({"a": w, "b": w}, x)
    np.testing.assert_allclose(nested["a"], top["a"])
    np.testing.assert_allclose(nested["a"], nested["b"])

    model = _WithCache()
    inner = avalon.jit(lambda m: avalon.grad(lambda m: avalon.sum(m.w * m.mask), m)[1][0])(model)
    assert inner.mask is None and inner.w is not None
