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
