"""An op that lays its inputs end to end (concatenate along a leading axis: an RNN's
per-step values joined along time) runs no kernel: avalon.memory writes each input
straight into its place in the op's buffer (a primitive's `assembles` rule)."""
import numpy as np
import pytest

import avalon

rng = np.random.default_rng(3)


def steps(x, w):
    """tanh(x_t @ w) for each row block x_t of x (8 rows each), joined along axis 0."""
    return [avalon.tanh(x[8 * t:8 * (t + 1)] @ w) for t in range(x.shape[0] // 8)]


def joined(x, w):
    return avalon.concatenate(steps(x, w), axis=0) * 2.0


def reference(x, w, axis=0):
    parts = [np.tanh(x[8 * t:8 * (t + 1)] @ w) for t in range(x.shape[0] // 8)]
    return np.concatenate(parts, axis=axis)


def compiled(f, *args):
    fn = avalon.jit(f, parallel=False)
    return fn, fn(*args), fn._last().compiled


def operands(rows=32, k=16, n=32, dtype=np.float32):
    return rng.standard_normal((rows, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype) * 0.3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_concatenation_of_fresh_values_along_axis_0_runs_no_kernel(dtype):
    x, w = operands(dtype=dtype)
    fn, got, c = compiled(joined, x, w)
    (cat,) = [n for n in c.graph.nodes if n.op == "concatenate"]
    assert cat in c.plan.assembled
    parts = cat.inputs
    assert [c.plan.offset_of[p] for p in parts] == [k * parts[0].nbytes for k in range(len(parts))]
    assert all(c.plan.slot_of[p] == c.plan.slot_of[cat] for p in parts)
    assert "its inputs written in place" in c.source
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(got, 2 * reference(x, w), rtol=tol, atol=tol)
    x2, _ = operands(dtype=dtype)
    np.testing.assert_allclose(fn(x2, w), 2 * reference(x2, w), rtol=tol, atol=tol)   # the next call too


def test_parts_read_after_the_concatenation_keep_their_values():
    x, w = operands()

    def f(x, w):
        parts = steps(x, w)
        cat = avalon.concatenate(parts, axis=0)
        scratch = [avalon.exp(cat * float(k)) for k in range(3)]     # buffers the plan may hand out
        return avalon.sum(cat) + avalon.sum(parts[0] * parts[-1]) + sum(avalon.sum(s) for s in scratch)
    _, got, c = compiled(f, x, w)
    assert any(n.op == "concatenate" and n in c.plan.assembled for n in c.graph.nodes)
    r = reference(x, w)
    want = r.sum() + (r[:8] * r[-8:]).sum() + sum(np.exp(r * k).sum() for k in range(3))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_gradients_through_an_assembled_concatenation_match_the_unplanned_graph():
    x, w = operands()

    def loss(w, x):
        return avalon.sum(avalon.concatenate(steps(x, w), axis=0) ** 2)
    planned = avalon.value_and_grad(loss, argnums=(0,))
    (v, g), (v0, g0) = planned(w, x), avalon.value_and_grad(loss, argnums=(0,), passes=[])(w, x)
    assert any(n in planned._last().compiled.plan.assembled for n in planned.graph.nodes)
    np.testing.assert_allclose(v, v0, rtol=1e-6)
    # The weight gradient sums 32 rows of products; the planned and unplanned graphs
    # may group that sum differently, so entries near zero differ by float32 rounding
    # of the gradient's magnitude, not of their own.
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(g[0], g0[0], rtol=1e-5, atol=x.shape[0] * eps * np.abs(g0[0]).max())


@pytest.mark.parametrize("case", ["axis 1", "an output part", "an input part", "a part twice"])
def test_what_cannot_be_written_in_place_is_concatenated(case):
    x, w = operands()
    if case == "axis 1":
        f = lambda x, w: avalon.concatenate(steps(x, w), axis=1) * 2.0                  # noqa: E731
        want = 2 * reference(x, w, axis=1)
    elif case == "an output part":
        f = lambda x, w: (avalon.concatenate(steps(x, w), axis=0) * 2.0, steps(x, w)[0])  # noqa: E731
        want = (2 * reference(x, w), reference(x, w)[:8])
    elif case == "an input part":
        f = lambda x, w: avalon.concatenate([x @ w, x @ w * 3.0, x], axis=1) * 2.0        # noqa: E731
        want = 2 * np.concatenate([x @ w, x @ w * 3, x], axis=1)
    else:
        def f(x, w):
            p = avalon.tanh(x @ w)
            return avalon.concatenate([p, p], axis=0) * 2.0
        want = 2 * np.concatenate([np.tanh(x @ w)] * 2, axis=0)
    _, got, c = compiled(f, x, w)
    cats = [n for n in c.graph.nodes if n.op == "concatenate"]
    if case == "an output part":
        assert not any(n in c.plan.assembled and steps_output_in(n, c) for n in cats)
    else:
        assert cats and not any(n in c.plan.assembled for n in cats)
    for g, wv in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        np.testing.assert_allclose(g, wv, rtol=1e-5, atol=1e-5)


def steps_output_in(cat, c):
    """Whether one of cat's parts is an output of the compiled graph."""
    return any(p in c.graph.outputs for p in cat.inputs)
