"""passes.transposed_products: (a b)^T is computed as b^T a^T, so a weight's
gradient comes out contiguous in the weight's own layout, not as a strided view."""
import numpy as np
import torch

import avalon
from avalon import passes

rng = np.random.default_rng(0)


def ops_of(g):
    return [n.op for n in g.nodes if n.op not in ("input", "const")]


def _weight_grad(a, b):
    return avalon.ops.transpose(a.T @ b)


def test_a_transposed_product_becomes_the_product_of_transposed_operands():
    a, b = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    g = avalon.trace(_weight_grad, a, b)
    assert ops_of(g) == ["transpose", "matmul", "transpose"]
    g = passes.dce(passes.simplify(passes.transposed_products(g)))
    assert ops_of(g) == ["transpose", "matmul"]          # b^T @ a: a's transposes cancel
    out = avalon.compile_graph(g, "cpu")(a, b)[0]
    assert out.flags.c_contiguous
    np.testing.assert_allclose(out, (a.T @ b).T, rtol=1e-6)


def _both_layouts(a, b):
    p = a.T @ b
    return avalon.ops.transpose(p), p * 2.0


def test_a_product_used_elsewhere_too_is_left_alone():
    a, b = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    g = avalon.trace(_both_layouts, a, b)
    before = ops_of(g)
    assert ops_of(passes.dce(passes.transposed_products(g))) == before   # no second product


def _batched(a, b):
    return avalon.ops.transpose(a @ b, (0, 2, 1))


def test_batched_products_are_left_alone():
    a, b = rng.standard_normal((2, 6, 3)).astype(np.float32), rng.standard_normal((2, 3, 4)).astype(np.float32)
    g = avalon.trace(_batched, a, b)
    assert ops_of(passes.transposed_products(g)) == ops_of(avalon.trace(_batched, a, b))


def _mlp_loss(w1, w2, x):
    return avalon.ops.sum(avalon.tanh(avalon.tanh(x @ w1.T) @ w2.T) ** 2)


def test_linear_weight_gradients_come_out_contiguous_and_equal_torch():
    w1 = rng.standard_normal((7, 5)).astype(np.float32)
    w2 = rng.standard_normal((3, 7)).astype(np.float32)
    x = rng.standard_normal((16, 5)).astype(np.float32)
    _, grads = avalon.value_and_grad(_mlp_loss, argnums=(0, 1), parallel=False)(w1, w2, x)
    tw1, tw2 = torch.tensor(w1, requires_grad=True), torch.tensor(w2, requires_grad=True)
    (torch.tanh(torch.tanh(torch.tensor(x) @ tw1.T) @ tw2.T) ** 2).sum().backward()
    for g, t in zip(grads[:2], (tw1, tw2)):
        assert g.flags.c_contiguous, "a weight gradient must not be a transposed view"
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-5, atol=1e-5)
