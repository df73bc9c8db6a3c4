"""CompiledFunction.bind: a compiled function bound to one signature, called
again on flat leaves without flattening or looking the signature up."""
import numpy as np

import avalon


def _f(x, y):
    return avalon.tanh(x) * 2.0 + y


def test_a_bound_call_runs_the_compiled_function_on_new_leaves():
    f = avalon.jit(_f)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 3, 4)).astype(np.float32)
    bound = f.bind(x, y)
    assert [a is b for a, b in zip(bound.leaves, (x, y))] == [True, True]
    x2 = rng.standard_normal((3, 4)).astype(np.float32)
    leaves = list(bound.leaves)
    leaves[0] = x2
    (out,) = bound.call(leaves)
    np.testing.assert_allclose(out, np.tanh(x2) * 2.0 + y, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out, f(x2, y))


def test_matches_compares_type_shape_and_dtype_at_the_given_positions():
    x, y = np.ones((3, 4), np.float32), np.zeros((3, 4), np.float32)
    bound = avalon.jit(_f).bind(x, y)
    assert len(bound.leaves) == 2
    assert bound.matches([x, x], [0, 1])
    assert not bound.matches([np.ones((4, 3), np.float32), x], [0])
    assert not bound.matches([x, np.ones((3, 4), np.float64)], [1])
    assert bound.matches([np.ones((4, 3), np.float32), x], [1])    # position 0 not asked


def test_a_gradient_function_binds_to_its_flat_value_and_gradients():
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    y = np.full((3, 4), 0.5, np.float32)
    g = avalon.value_and_grad(lambda x, y: avalon.sum(_f(x, y) ** 2))
    bound = g.bind(x, y)
    value, gx, gy = bound.call(list(bound.leaves))
    (v_ref, (gx_ref, gy_ref)) = g(x, y)
    np.testing.assert_array_equal(value, v_ref)
    np.testing.assert_array_equal(gx, gx_ref)
    np.testing.assert_array_equal(gy, gy_ref)


def test_a_bound_call_is_not_current_under_another_anomaly_mode():
    x, y = np.ones((3, 4), np.float32), np.zeros((3, 4), np.float32)
    bound = avalon.jit(_f).bind(x, y)
    assert bound.current()
    with avalon.detect_anomaly():
        assert not bound.current()
    assert bound.current()
