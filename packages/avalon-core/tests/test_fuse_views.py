"""fuse_views (avalon.passes.views): fused C kernels read basic slices of their
operands in place (getitem's `strided_view` rule, strided loads lowered by
avalon.kernel_ir.lower).  Shown by the graph (no getitem left between the
slice and its kernel, the kernel's loads) and by results equal to NumPy's,
including slices that broadcast, strided and int indices, new axes, and the
views it must leave alone."""
import numpy as np
import pytest

import avalon
from avalon import passes
from avalon.kernel_ir import lower
from avalon.ops.indexing import _getitem_strided
from avalon.runtime import native

rng = np.random.default_rng(1)


def ops_of(graph):
    return [n.op for n in graph.nodes if n.op not in ("input", "const")]


def compiled(f, *args):
    fn = avalon.jit(f)
    out = fn(*args)
    return out, fn.graph


def bodies(graph):
    return [n.attrs["body"] for n in graph.nodes if n.op == "fused"]


def gates(x):
    i, f, g, o = avalon.split(x, 4, axis=-1)
    return avalon.sigmoid(i), avalon.sigmoid(f) * avalon.tanh(g), avalon.sigmoid(o)


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_elementwise_ops_on_slices_read_them_in_place():
    x = rng.standard_normal((6, 32)).astype(np.float32)
    (i, fg, o), graph = compiled(gates, x)
    assert "getitem" not in ops_of(graph) and "sigmoid" not in ops_of(graph)
    assert all(n.op == "fused" for n in graph.nodes if n.op not in ("input", "const"))
    for body in bodies(graph):     # each kernel reads x itself, at its slice's offset
        assert [m.op for m in body.nodes if m.op not in ("input", "const")][0] == "getitem"
        assert [b.shape for b in body.inputs] == [(6, 32)]
    np.testing.assert_allclose(i, np_sigmoid(x[:, :8]), rtol=1e-6)
    np.testing.assert_allclose(fg, np_sigmoid(x[:, 8:16]) * np.tanh(x[:, 16:24]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(o, np_sigmoid(x[:, 24:]), rtol=1e-6)


def test_without_the_pass_the_slices_stay_views():
    x = rng.standard_normal((6, 32)).astype(np.float32)
    pipeline = [p for p in passes.default_pipeline() if p[0] != "fuse_views"]
    fn = avalon.jit(gates, passes=pipeline)
    fn(x)
    computed = ops_of(fn.graph) + [m.op for n in fn.graph.nodes if n.op == "fused" for m in n.attrs["body"].nodes]
    assert ops_of(fn.graph).count("getitem") == 4 and "sigmoid" in computed
    assert not any(m.op == "getitem" for n in fn.graph.nodes if n.op == "fused" for m in n.attrs["body"].nodes)


@pytest.mark.parametrize("index", [
    np.s_[2], np.s_[1:5:2], np.s_[:, ::3], np.s_[3, 1:], np.s_[None, 1, :], np.s_[::-1, 2:4],
])
def test_strided_views_of_every_kind_give_numpys_values(index):
    x = rng.standard_normal((5, 6)).astype(np.float32)
    out, graph = compiled(lambda x: avalon.tanh(x[index]) * 3.0 + 1.0, x)
    assert "getitem" not in ops_of(graph)
    np.testing.assert_allclose(out, np.tanh(x[index]) * 3.0 + 1.0, rtol=1e-6, atol=1e-6)


def test_a_slice_that_broadcasts_against_the_output():
    x = rng.standard_normal((4, 6)).astype(np.float32)
    y = rng.standard_normal((2, 3, 3)).astype(np.float32)
    out, graph = compiled(lambda x, y: avalon.exp(y) * x[2, ::2] + x[None, 1:, 0:1] ** 2, x, y)
    assert "getitem" not in ops_of(graph)
    np.testing.assert_allclose(out, np.exp(y) * x[2, ::2] + x[None, 1:, 0:1] ** 2, rtol=1e-6)


def test_the_kernel_loads_at_the_slice_offset_and_strides():
    x = rng.standard_normal((6, 32)).astype(np.float32)
    _, graph = compiled(lambda x: avalon.sigmoid(x[:, 8:16]), x)
    (body,) = bodies(graph)
    kernel = lower(body)
    assert "8 +" in kernel.text or "+ 8" in kernel.text       # the offset of column 8
    assert _getitem_strided(body.nodes[1]) == (8, (32, 1))


def test_views_it_must_leave_alone():
    x = rng.standard_normal((5, 6)).astype(np.float32)
    rows = np.array([0, 2, 2])

    def f(x):   # an advanced index (a copy), and a slice of a transposed view
        return avalon.tanh(x[rows]) * 2.0, avalon.tanh(x.T[1:4]) * 2.0
    (a, b), graph = compiled(f, x)
    assert ops_of(graph).count("getitem") == 2
    np.testing.assert_allclose(a, np.tanh(x[rows]) * 2.0, rtol=1e-6)
    np.testing.assert_allclose(b, np.tanh(x.T[1:4]) * 2.0, rtol=1e-6)


@pytest.mark.skipif(not native.available(), reason="no usable C compiler")
def test_sliced_kernels_run_compiled_code_not_numpy(monkeypatch):
    from avalon.backends import cpu_native
    slow = []
    original = cpu_native._Slow.__call__
    monkeypatch.setattr(cpu_native._Slow, "__call__", lambda self, *a: slow.append(1) or original(self, *a))
    x = rng.standard_normal((64, 512)).astype(np.float32)
    fn = avalon.jit(gates)
    fn(x)
    slow.clear()
    i, fg, o = fn(x)
    assert not slow
    np.testing.assert_allclose(o, np_sigmoid(x[:, 384:]), rtol=1e-6)


def test_recurrent_gradients_unchanged_by_the_pass():
    w = rng.standard_normal((4, 16)).astype(np.float32)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)

    def loss(w, x):
        h = avalon.zeros((3, 4), np.float32)
        c = h
        for t in range(x.shape[1]):
            i, f, g, o = avalon.split(x[:, t] + h @ w, 4, axis=-1)
            c = avalon.sigmoid(f) * c + avalon.sigmoid(i) * avalon.tanh(g)
            h = avalon.sigmoid(o) * avalon.tanh(c)
        return avalon.sum(h * h)
    with_views = avalon.value_and_grad(loss)(w, x)[1]
    pipeline = [p for p in passes.default_pipeline() if p[0] != "fuse_views"]
    without = avalon.value_and_grad(loss, passes=pipeline)(w, x)[1]
    for a, b in zip(with_views, without):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# -- transposed views: a permutation of a contiguous array's strides -------------------------------------------

def _transposed_product(a, b):
    # the product is computed contiguous (and returned, so it is not computed
    # transposed instead); its transpose feeds the elementwise kernel
    p = a @ b
    return avalon.tanh(avalon.ops.transpose(p)) * np.float32(2.0), p


def test_a_transposed_view_of_a_computed_value_is_read_in_place():
    a, b = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((5, 7)).astype(np.float32)
    (out, _), graph = compiled(_transposed_product, a, b)
    assert "transpose" not in ops_of(graph)          # the kernel reads the product's strides itself
    np.testing.assert_allclose(out, np.tanh((a @ b).T) * 2, rtol=1e-5)


def _transposed_reshaped(a, b):
    p = avalon.ops.reshape(a @ b, (3, 2, 7))
    return avalon.exp(avalon.ops.transpose(p, (2, 0, 1))) + np.float32(1.0)


def test_a_transpose_of_a_reshaped_computed_value_is_read_in_place():
    a, b = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((5, 7)).astype(np.float32)
    out, graph = compiled(_transposed_reshaped, a, b)
    assert "transpose" not in ops_of(graph)
    np.testing.assert_allclose(out, np.exp((a @ b).reshape(3, 2, 7).transpose(2, 0, 1)) + 1, rtol=1e-5)


def _transposed_slice(a, b):
    s = (a @ b)[:, ::2]                   # a strided slice: not contiguous, so its transpose stays a view
    return avalon.tanh(avalon.ops.transpose(s)) + np.float32(1.0)


def test_a_transpose_of_a_strided_view_is_left_alone():
    a, b = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal((5, 8)).astype(np.float32)
    out, graph = compiled(_transposed_slice, a, b)
    assert "transpose" in ops_of(graph)
    np.testing.assert_allclose(out, np.tanh((a @ b)[:, ::2].T) + 1, rtol=1e-5)
