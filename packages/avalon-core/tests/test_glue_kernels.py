"""The batch-innermost glue ops (im2col, col2im, max pooling and its gradient)
as C kernels lowered by their primitives' `lower` rules (avalon.kernel_ir.glue),
against the NumPy kernels they replace: bit for bit, over random shapes,
strides, paddings and dilations, float32 and float64, NaN and ties included."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avalon.backends import cpu_native, device, get_backend
from avalon.graph import Node
from avalon.kernel_ir import glue, verify
from avalon.kernels import conv_csn as K
from avalon.primitive import PRIMITIVES
from avalon.runtime import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no usable C compiler")

CPU = get_backend(device("cpu"))


def _node(op, inputs, attrs, shape, dtype):
    ins = [Node("input", [], {}, tuple(i.shape), i.dtype) for i in inputs]
    return Node(op, ins, attrs, tuple(shape), np.dtype(dtype))


def _both(op, inputs, attrs, shape, dtype):
    """(C kernel's result, NumPy kernel's result) for the op on `inputs`."""
    node = _node(op, inputs, attrs, shape, dtype)
    fallback = CPU.kernel(PRIMITIVES[op], attrs)
    fn = cpu_native.compile_node_c(node, fallback)
    assert fn is not None and fn.native, f"{op} got no C kernel for {attrs}"
    got = fn(*inputs, out=np.full(shape, np.nan, dtype))
    return got, fallback(*inputs, out=np.empty(shape, dtype))


conv_cases = st.tuples(
    st.integers(1, 3), st.integers(1, 2),                 # channels, spatial rank
    st.integers(1, 4),                                    # batch
    st.integers(1, 3), st.integers(1, 2), st.integers(0, 2), st.integers(1, 2),  # kernel, stride, pad, dilation
    st.integers(0, 10**6), st.sampled_from([np.float32, np.float64]))


@settings(max_examples=40, deadline=None)
@given(conv_cases)
def test_im2col_and_col2im_match_numpy(case):
    c, nd, n, k, s, p, d, seed, dtype = case
    rng = np.random.default_rng(seed)
    spatial = tuple(int(v) for v in rng.integers(d * (k - 1) + 1, 8, nd))
    attrs = dict(kernel=(k,) * nd, stride=(s,) * nd, padding=(p,) * nd, dilation=(d,) * nd)
    x = rng.standard_normal((c,) + spatial + (n,)).astype(dtype)
    ref = K.im2col_csn(np, x, **attrs)
    got, numpy = _both("im2col_csn", [x], attrs, ref.shape, dtype)
    np.testing.assert_array_equal(got, numpy)
    cols = rng.standard_normal(ref.shape).astype(dtype)
    attrs2 = dict(attrs, input_shape=x.shape)
    got, numpy = _both("col2im_csn", [cols], attrs2, x.shape, dtype)
    np.testing.assert_array_equal(got, numpy)   # same order of additions: bit for bit


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 5), st.integers(1, 3), st.integers(0, 10**6),
       st.sampled_from([np.float32, np.float64]))
def test_tiled_max_pooling_and_its_gradient_match_numpy(c, nd, n, k, seed, dtype):
    rng = np.random.default_rng(seed)
    spatial = tuple(int(v) for v in rng.integers(k, 3 * k + 2, nd))   # not always a multiple of k
    x = rng.integers(-2, 3, (c,) + spatial + (n,)).astype(dtype)       # many ties
    x.flat[rng.integers(0, x.size, 3)] = np.nan                          # NaN windows
    attrs = dict(kernel_size=(k,) * nd, stride=(k,) * nd, padding=(0,) * nd, dilation=(1,) * nd)
    y = K.max_pool_csn_forward(np, x, **attrs)
    got, numpy = _both("max_pool_csn", [x], attrs, y.shape, dtype)
    np.testing.assert_array_equal(got, numpy)
    g = rng.standard_normal(y.shape).astype(dtype)
    got, numpy = _both("max_pool_csn_grad", [x, y, g], attrs, x.shape, dtype)
    np.testing.assert_array_equal(got, numpy)


def test_overlapping_or_padded_pooling_keeps_the_numpy_kernel():
    x = np.zeros((2, 6, 6, 3), np.float32)
    for attrs in (dict(kernel_size=(3, 3), stride=(2, 2), padding=(0, 0), dilation=(1, 1)),
                  dict(kernel_size=(2, 2), stride=(2, 2), padding=(1, 1), dilation=(1, 1))):
        node = _node("max_pool_csn", [x], attrs, (2, 3, 3, 3), np.float32)
        assert glue.lower_max_pool_csn(node) is None
        assert cpu_native.compile_node_c(node, lambda *a, **k: None) is None


def test_non_contiguous_inputs_run_the_numpy_kernel():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 5, 8)).astype(np.float32)[..., ::2]   # a share of the batch
    attrs = dict(kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    ref = K.im2col_csn(np, np.ascontiguousarray(x), **attrs)
    calls = []

    def fallback(*a, out=None):
        calls.append(1)
        return K.im2col_csn(np, *a, out=out, **attrs)
    fn = cpu_native.compile_node_c(_node("im2col_csn", [x], attrs, ref.shape, np.float32), fallback)
    np.testing.assert_array_equal(fn(x), ref)
    assert calls == [1]


@pytest.mark.parametrize("direct, kernels", [
    (False, {"im2col_csn", "col2im_csn", "max_pool_csn", "max_pool_csn_grad"}),
    (True, {"conv_csn", "conv_csn_input_grad", "conv_csn_weight_grad", "max_pool_csn", "max_pool_csn_grad"})],
    ids=["columns", "direct convolutions"])
def test_the_glue_ops_run_as_c_in_a_compiled_convolution_step(monkeypatch, direct, kernels):
    import avalon
    from avalon.backends import cpu
    monkeypatch.setattr(cpu, "_builds_c_kernels", lambda: direct)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    x = rng.standard_normal((8, 2, 10, 10)).astype(np.float32)

    def loss(w, x):
        y = avalon.max_pool2d(avalon.relu(avalon.conv2d(x, w, padding=1)), 2)
        return (y * y).mean()
    f = avalon.value_and_grad(loss, parallel=False)
    value, (gw, _) = f(w, x)
    native_ops = {op for op in kernels | {"im2col_csn", "col2im_csn", "conv_csn"}
                  if any(getattr(fn, "native", False) for name, fn in f._last().compiled.fn.__globals__.items()
                         if name.rsplit("_", 1)[0] == op)}
    assert native_ops == kernels
    import torch
    tw, tx = torch.tensor(w, requires_grad=True), torch.tensor(x)
    ty = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(tx, tw, padding=1)), 2)
    tl = (ty * ty).mean()
    tl.backward()
    np.testing.assert_allclose(value, tl.item(), rtol=1e-5)
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_kernel_ir_text_of_a_max_pooling_kernel():
    x = np.zeros((1, 2, 2, 1), np.float32)
    attrs = dict(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1))
    kernel = verify(glue.lower_max_pool_csn(_node("max_pool_csn", [x], attrs, (1, 1, 1, 1), np.float32)))
    body = str(kernel).split("\n", 1)[1]
    assert body == """\
  for c in [0, 1) {
    for o0 in [0, 1) {
      for o1 in [0, 1) {
        for b2 in [0, 1) {
          let x3: f32 = x[c*4 + o0*4 + o1*2 + b2]
          let x4: f32 = x[c*4 + o0*4 + o1*2 + b2 + 1]
          let x5: f32 = x[c*4 + o0*4 + o1*2 + b2 + 2]
          let x6: f32 = x[c*4 + o0*4 + o1*2 + b2 + 3]
          let m7: f32 = max(x3, x4)
          let m8: f32 = max(m7, x5)
          let m9: f32 = max(m8, x6)
          out[c + o0 + o1 + b2] = m9
        }
      }
    }
  }
}"""


# -- scatter_slices: the gradient of an array read through several basic slices ----------------------------------

def _slice(a, b, c=1):
    return ("slice", a, b, c)


@pytest.mark.parametrize("shape, indices", [
    ((64, 512), tuple((_slice(0, 64), _slice(128 * j, 128 * (j + 1))) for j in range(4))),   # an LSTM's gates
    ((28, 6, 16), tuple((("int", t),) for t in range(28))),                                 # every step of a sequence
    ((6, 8), ((_slice(0, 6, 2), _slice(1, 5)), (_slice(0, 3), _slice(2, 8)),                # overlaps, gaps,
              (("int", 5), _slice(7, -1, -2)))),                                             # a reversed slice
    ((3, 4), ((("new",), _slice(0, 3), ("int", 1)), (("int", 2),))),                          # a new axis
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_scatter_slices_as_a_c_kernel_equals_numpy(shape, indices, dtype):
    from avalon.ops.indexing import _Aval, _getitem_rule
    rng = np.random.default_rng(13)
    values = [(rng.standard_normal(_getitem_rule(_Aval(shape, np.dtype(dtype)), index=ix)[0]) * 10).astype(dtype)
              for ix in indices]
    got, want = _both("scatter_slices", values, {"shape": shape, "indices": indices}, shape, dtype)
    np.testing.assert_array_equal(got, want)


def test_scatter_slices_run_in_the_segments_of_an_rnn_gradient():
    import avalon
    x = np.random.default_rng(14).standard_normal((5, 3, 8)).astype(np.float32)
    w = np.random.default_rng(15).standard_normal((8, 8)).astype(np.float32)

    def loss(w, x):
        h = avalon.zeros((3, 2), np.float32)
        total = 0.0
        for t in range(5):
            g = x[t] @ w
            h = avalon.tanh(g[:, :2] + h) * avalon.sigmoid(g[:, 2:4])
            total = total + (h * g[:, 4:6]).sum()
        return total
    f = avalon.value_and_grad(loss, argnums=(0, 1), parallel=False)
    (value, (gw, gx)) = f(w, x)
    ops = [n.op for n in f.graph.nodes]
    assert "scatter_slices" in ops
    import re
    calls = [line for line in f.source.splitlines() if re.match(r"\s*v\d+ = scatter_slices_\d+\(", line)]
    assert calls and all(line.startswith(" " * 12) for line in calls)   # only on the driver's fallback path
    eps, k = 1e-3, (2, 1)
    wp, wm = w.copy(), w.copy()
    wp[k] += eps
    wm[k] -= eps
    fd = (float(avalon.jit(loss)(wp, x)) - float(avalon.jit(loss)(wm, x))) / (2 * eps)
    np.testing.assert_allclose(gw[k], fd, rtol=2e-2, atol=2e-3)
