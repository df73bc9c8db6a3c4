"""A product a @ b.T with fewer rows than columns (a linear layer's forward on
a batch smaller than its outputs) is computed as (b @ a.T).T by the CPU's
passes.products.wide_products, and its elementwise users read the transposed
view in place; products it would make a copy of are left alone."""
import numpy as np
import pytest

import avalon
from avalon import passes
from avalon.passes import products

rng = np.random.default_rng(5)


def linear_relu(x, w, b):
    return avalon.relu(x @ w.T + b)


def _args(rows, cols, inner=12, dtype=np.float32):
    return (rng.standard_normal((rows, inner)).astype(dtype), rng.standard_normal((cols, inner)).astype(dtype),
            rng.standard_normal(cols).astype(dtype))


def _rewritten(f, *args):
    graph = avalon.trace(f, *args)
    return products.wide_products(graph)


def _products(graph):
    return [n for n in graph.nodes if n.op == "matmul"]


def test_a_product_with_fewer_rows_than_columns_is_computed_transposed():
    x, w, b = _args(rows=6, cols=20)
    g = _rewritten(linear_relu, x, w, b)
    (m,) = _products(g)
    assert m.shape == (20, 6) and m.inputs[0].op == "input"              # w @ x.T: w read as it is
    assert m.inputs[1].op == "transpose" and m.inputs[1].inputs[0].op == "input"
    (t,) = [n for n in g.nodes if n.op == "transpose" and n.inputs[0] is m]
    assert t.shape == (6, 20)
    g.check()                                                              # raises when not well formed


@pytest.mark.parametrize("rows, cols", [(20, 6), (12, 12), (1, 20), (20, 1)])
def test_as_many_rows_or_a_vector_product_keeps_the_product(rows, cols):
    x, w, b = _args(rows, cols)
    (m,) = _products(_rewritten(linear_relu, x, w, b))
    assert m.shape == (rows, cols) and m.inputs[1].op == "transpose"


def test_a_product_returned_or_copied_by_its_user_is_left_alone():
    x, w, _ = _args(rows=6, cols=20)
    (m,) = _products(_rewritten(lambda x, w: x @ w.T, x, w))                     # a graph output
    assert m.shape == (6, 20)
    (m,) = _products(_rewritten(lambda x, w: avalon.concatenate([x @ w.T, x], axis=1), x, w))
    assert m.shape == (6, 20)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_values_and_gradients_match_the_unrewritten_graph(dtype, monkeypatch):
    monkeypatch.setenv("AVALON_BLAS", "numpy")          # the pipeline rewrites for OpenBLAS
    x, w, b = _args(rows=7, cols=33, inner=19, dtype=dtype)
    w2, b2 = rng.standard_normal((40, 33)).astype(dtype) * 0.2, rng.standard_normal(40).astype(dtype)

    def loss(w, b, w2, b2, x):
        return avalon.sum(avalon.tanh(linear_relu(linear_relu(x, w, b), w2, b2)) ** 2)
    rewritten = avalon.value_and_grad(loss, argnums=(0, 1, 2, 3))
    plain = avalon.value_and_grad(loss, argnums=(0, 1, 2, 3), passes=[])
    (v, grads), (v0, grads0) = rewritten(w, b, w2, b2, x), plain(w, b, w2, b2, x)
    assert sum(n.op == "matmul" and n.shape in ((33, 7), (40, 7)) for n in rewritten.graph.nodes) == 2
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(v, v0, rtol=tol)
    for g, g0 in zip(grads[:4], grads0[:4]):
        np.testing.assert_allclose(g, g0, rtol=tol, atol=tol)
    np.testing.assert_allclose(avalon.jit(linear_relu)(x, w, b), np.maximum(x @ w.T + b, 0), rtol=tol, atol=tol)


def _compiled_product_shapes(f, *args):
    compiled = avalon.jit(f)
    compiled(*args)
    return {n.shape for n in compiled.graph.nodes if n.op == "matmul"}


def test_the_pipeline_rewrites_for_openblas_only(monkeypatch):
    """MKL multiplies by a transposed right operand as fast with few rows: there the
    rewrite would only make the product's readers read strided."""
    from avalon.runtime import blas
    x, w, b = _args(rows=6, cols=20)
    monkeypatch.setenv("AVALON_BLAS", "numpy")
    assert _compiled_product_shapes(linear_relu, x, w, b) == {(20, 6)}
    if blas.mkl_reason() is not None:
        pytest.skip(f"MKL: {blas.mkl_reason()}")
    monkeypatch.setenv("AVALON_BLAS", "mkl")
    assert _compiled_product_shapes(linear_relu, x, w, b) == {(6, 20)}


def test_it_is_a_cpu_pass():
    from avalon.backends.cpu import CpuBackend
    assert "wide_products" in [name for name, _ in passes.default_pipeline(CpuBackend)]
    assert "wide_products" not in [name for name, _ in passes.BUILTIN]
