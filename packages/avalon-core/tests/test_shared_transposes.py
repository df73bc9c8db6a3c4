"""A transposed matrix that many products read as their right operand (an RNN's
recurrent weight, h @ w.T at every step) is copied into C order once, by the
CPU's passes.products.shared_transposed_operands: OpenBLAS multiplies by a
C-ordered operand faster.  The `contiguous` primitive the pass inserts."""
import numpy as np
import pytest

import avalon
from avalon import passes
from avalon.passes import products

rng = np.random.default_rng(3)
T = 8


def rnn(w, x):
    """T steps of h = tanh(x_t + h @ w.T), then the sum of squares of h."""
    h = avalon.zeros((x.shape[1], w.shape[0]), x.dtype, like=x)
    for t in range(x.shape[0]):
        h = avalon.tanh(x[t] + h @ w.T)
    return avalon.sum(h * h)


def numpy_rnn(w, x):
    h = np.zeros((x.shape[1], w.shape[0]), x.dtype)
    for t in range(x.shape[0]):
        h = np.tanh(x[t] + h @ w.T)
    return np.sum(h * h)


def case(batch, dtype=np.float32):
    w = (rng.standard_normal((24, 24)) * 0.3).astype(dtype)
    return w, rng.standard_normal((T, batch, 24)).astype(dtype)


def optimized(f, *args):
    return passes.run_pipeline(avalon.trace(f, *args), check=True)


def test_a_transposed_weight_read_by_every_step_is_copied_once():
    w, x = case(batch=32)                 # 8 products of 32 rows: 256 in all
    g = optimized(rnn, w, x)
    copies = [n for n in g.nodes if n.op == "contiguous"]
    assert len(copies) == 1 and copies[0].inputs[0].op == "transpose"
    readers = [n for n in g.nodes if n.op == "matmul"]
    assert len(readers) == T and all(m.inputs[1] is copies[0] for m in readers)


def test_few_rows_in_all_keep_the_transpose_flag():
    w, x = case(batch=4)                  # 32 rows in all: the copy would cost more than it saves
    g = optimized(rnn, w, x)
    assert not any(n.op == "contiguous" for n in g.nodes)


def test_a_single_product_keeps_the_transpose_flag():
    w = rng.standard_normal((24, 24)).astype(np.float32)
    g = optimized(lambda w, x: avalon.tanh(x @ w.T), w, rng.standard_normal((512, 24)).astype(np.float32))
    assert not any(n.op == "contiguous" for n in g.nodes)


@pytest.mark.parametrize("split", [False, True], ids=["one-thread", "split"])
def test_values_and_gradients_are_unchanged(split):
    w, x = case(batch=32, dtype=np.float64)
    step = avalon.value_and_grad(rnn, argnums=(0, 1), parallel=split)
    value, (gw, gx) = step(w, x)
    np.testing.assert_allclose(value, numpy_rnn(w, x), rtol=1e-12)
    eps = 1e-6
    for k in [(0, 0), (3, 7), (23, 11)]:
        dw = np.zeros_like(w)
        dw[k] = eps
        fd = (numpy_rnn(w + dw, x) - numpy_rnn(w - dw, x)) / (2 * eps)
        np.testing.assert_allclose(gw[k], fd, rtol=1e-6, atol=1e-8)
    assert any(n.op == "contiguous" for n in step._last().compiled.graph.nodes)


def test_the_threshold_is_the_rows_of_all_products(monkeypatch):
    w, x = case(batch=4)
    monkeypatch.setattr(products, "SHARED_TRANSPOSE_MIN_ROWS", 4 * T)
    assert sum(n.op == "contiguous" for n in optimized(rnn, w, x).nodes) == 1


def test_contiguous_copies_a_view_and_passes_gradients_and_batches_through():
    from avalon.ops.shape import contiguous_p
    from avalon.primitive import bind
    a = rng.standard_normal((5, 3)).astype(np.float32)
    out = avalon.jit(lambda a: bind(contiguous_p, (a.T,), {}) * 2.0)(a)
    np.testing.assert_array_equal(out, a.T * 2.0)
    _, (g,) = avalon.value_and_grad(lambda a: avalon.sum(bind(contiguous_p, (a.T,), {}) ** 2), argnums=(0,))(a)
    np.testing.assert_allclose(g, 2 * a, rtol=1e-6)
    batched = avalon.vmap(lambda r: bind(contiguous_p, (r,), {}) + 1.0)(a)
    np.testing.assert_array_equal(batched, a + 1.0)


def test_products_after_a_write_to_the_weight_read_the_written_weight():
    """h @ w.T before and after w is written in place: one copy made before the
    write must not serve the products after it."""
    def f(w, x):
        wt = w.T                     # a view taken before the write, read after it too
        h = x
        for _ in range(4):
            h = avalon.tanh(h @ wt)
        avalon.assign(w, w * 0.5)
        for _ in range(4):
            h = avalon.tanh(h @ wt)
        return avalon.sum(h * h)

    w, x = case(batch=64)
    x = x[0]
    w_run = w.copy()
    got = avalon.jit(f, parallel=False)(w_run, x)
    h = x
    for _ in range(4):
        h = np.tanh(h @ w.T)
    for _ in range(4):
        h = np.tanh(h @ (w * 0.5).T)
    np.testing.assert_allclose(got, np.sum(h * h), rtol=1e-4)
    np.testing.assert_allclose(w_run, w * 0.5)
