"""Direct convolutions of batch-innermost activations (C templates,
avalon.kernel_ir.conv_templates): the kernels of conv_csn and its two
gradients against the NumPy kernels they replace over random geometries
(shapes whose rows are not a multiple of a vector, asymmetric padding, 1x1
and non-square kernels, float32 and float64), whole steps against PyTorch,
the layout pass's choice, and the IR's text and renderers for template
kernels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import avalon
from avalon.backends import cpu_native, device, get_backend
from avalon.graph import Node
from avalon.kernel_ir import CRenderer, CUDARenderer, Kernel, KernelIRError, glue, verify
from avalon.kernel_ir.ir import Buffer, Loop, Var
from avalon.kernel_ir.lower import Unfusable
from avalon.kernels import conv_csn as K
from avalon.primitive import PRIMITIVES
from avalon.runtime import native

pytestmark = pytest.mark.skipif(not native.available(), reason="no usable C compiler")

CPU = get_backend(device("cpu"))


def _node(op, inputs, attrs, shape, dtype):
    ins = [Node("input", [], {}, tuple(i.shape), i.dtype) for i in inputs]
    return Node(op, ins, attrs, tuple(shape), np.dtype(dtype))


def _c_and_numpy(op, inputs, attrs, shape, dtype):
    """(the template's C kernel's result, the NumPy kernel's result)."""
    node = _node(op, inputs, attrs, shape, dtype)
    fallback = CPU.kernel(PRIMITIVES[op], attrs)
    fn = cpu_native.compile_node_c(node, fallback)
    assert fn is not None and fn.native and fn.kernel.template is not None, f"{op}: no template kernel"
    got = fn(*inputs, out=np.full(shape, np.nan, dtype))
    return got, fallback(*inputs, out=np.empty(shape, dtype))


geometries = st.tuples(
    st.integers(1, 7), st.integers(1, 13),                       # in, out channels
    st.integers(1, 9), st.integers(1, 9), st.integers(1, 37),    # H, W, batch
    st.integers(1, 4), st.integers(1, 4),                        # kernel height, width
    st.integers(0, 10**6), st.sampled_from([np.float32, np.float64]))


@pytest.fixture
def any_row(monkeypatch):
    """Direct kernels for rows of any length (their scalar tails included)."""
    monkeypatch.setattr(glue, "DIRECT_MIN_ROW", 1)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometries)
def test_direct_kernels_match_the_numpy_kernels(any_row, case):
    c, o, h, w, n, kh, kw, seed, dtype = case
    rng = np.random.default_rng(seed)
    # padding before each axis at most kernel - 1 (the templates' range), after it anything
    # that leaves at least one output position
    pads = tuple((int(rng.integers(0, k)), int(rng.integers(0, k + 1))) for k in (kh, kw))
    out_sp = tuple(s + lo + hi - k + 1 for s, (lo, hi), k in zip((h, w), pads, (kh, kw)))
    if min(out_sp) < 1:
        pads = tuple((lo, k - 1) for (lo, _), k in zip(pads, (kh, kw)))
        out_sp = tuple(s + lo + hi - k + 1 for s, (lo, hi), k in zip((h, w), pads, (kh, kw)))
    geo = dict(stride=(1, 1), padding=pads, dilation=(1, 1))
    x = rng.standard_normal((c, h, w, n)).astype(dtype)
    wt = rng.standard_normal((o, c, kh, kw)).astype(dtype)
    g = rng.standard_normal((o,) + out_sp + (n,)).astype(dtype)
    rows = dict(tile_rows=out_sp[0], **geo)
    # (op, inputs, attrs, result shape, terms summed into each result)
    for op, inputs, attrs, shape, terms in (
            ("conv_csn", [x, wt], rows, g.shape, c * kh * kw),
            ("conv_csn_input_grad", [g, wt], dict(rows, input_shape=x.shape), x.shape, o * kh * kw),
            ("conv_csn_weight_grad", [x, g], dict(rows, weight_shape=wt.shape), wt.shape, n * out_sp[0] * out_sp[1])):
        got, ref = _c_and_numpy(op, inputs, attrs, shape, dtype)
        _assert_sums_close(op, inputs, attrs, shape, terms, got, ref)


def _assert_sums_close(op, inputs, attrs, shape, terms, got, ref):
    """Sums of `terms` products in another order agree to rounding relative to the
    sum of the products' magnitudes (the op on |inputs|, in float64), not to the
    result: large terms that nearly cancel are only that exact in either order.
    A lost or doubled term moves a result by about magnitude / terms: 1 / (4
    terms^1.5 eps) times the bound, at least 5 at the test's largest sums."""
    eps = np.finfo(got.dtype).eps
    magnitude = CPU.kernel(PRIMITIVES[op], attrs)(*[np.abs(a).astype(np.float64) for a in inputs],
                                                  out=np.empty(shape, np.float64))
    bound = 4 * np.sqrt(terms) * eps * magnitude + eps
    error = np.abs(got.astype(np.float64) - ref)
    assert np.all(error <= bound), f"{op}: error {np.max(error):.3g} where the bound is {bound.flat[np.argmax(error - bound)]:.3g}"


strided = st.tuples(
    st.integers(1, 5), st.integers(1, 9),                        # in, out channels
    st.integers(1, 9), st.integers(1, 9), st.sampled_from([16, 32, 48]),   # H, W, batch (whole vectors)
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),   # kernel, stride
    st.integers(0, 10**6), st.sampled_from([np.float32, np.float64]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(strided)
def test_strided_direct_forward_and_weight_gradient_match_numpy(any_row, case):
    c, o, h, w, n, kh, kw, sh, sw, seed, dtype = case
    rng = np.random.default_rng(seed)
    pads = tuple((int(rng.integers(0, k)), int(rng.integers(0, k))) for k in (kh, kw))
    out_sp = tuple((s + lo + hi - k) // st_ + 1 for s, (lo, hi), k, st_ in zip((h, w), pads, (kh, kw), (sh, sw)))
    if min(out_sp) < 1:
        return
    geo = dict(stride=(sh, sw), padding=pads, dilation=(1, 1), tile_rows=out_sp[0])
    x = rng.standard_normal((c, h, w, n)).astype(dtype)
    wt = rng.standard_normal((o, c, kh, kw)).astype(dtype)
    g = rng.standard_normal((o,) + out_sp + (n,)).astype(dtype)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    got, ref = _c_and_numpy("conv_csn", [x, wt], geo, g.shape, dtype)
    np.testing.assert_allclose(got, ref, **tol)
    got, ref = _c_and_numpy("conv_csn_weight_grad", [x, g], dict(geo, weight_shape=wt.shape), wt.shape, dtype)
    np.testing.assert_allclose(got, ref, **tol)


def test_a_strided_convolution_is_direct_but_for_its_input_gradient():
    """Stride 2 on a batch of whole vectors: the forward and the weight gradient
    are direct kernels, the input gradient a product and col2im; all equal torch."""
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((16, 4, 12, 12)).astype(np.float32), rng.standard_normal((8, 4, 3, 3)).astype(np.float32)

    def loss(w, x):
        return (avalon.conv2d(x, w, stride=2, padding=1) ** 2).mean()
    f = avalon.value_and_grad(loss, argnums=(0, 1), parallel=False)
    value, (gw, gx) = f(w, x)
    ops = {n.op for n in f.graph.nodes}
    assert {"conv_csn", "conv_csn_weight_grad", "col2im_csn"} <= ops and "conv_csn_input_grad" not in ops
    assert "im2col_csn" not in ops
    tw, tx = torch.tensor(w, requires_grad=True), torch.tensor(x, requires_grad=True)
    want = (torch.nn.functional.conv2d(tx, tw, stride=2, padding=1) ** 2).mean()
    want.backward()
    np.testing.assert_allclose(value, want.item(), rtol=1e-5)
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attrs", [dict(stride=(2, 1), padding=((1, 1), (1, 1)), dilation=(1, 1)),   # batch 4
                                   dict(stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(2, 1)),
                                   dict(stride=(1, 1), padding=((3, 0), (0, 0)), dilation=(1, 1))],
                         ids=["stride", "dilation", "padding beyond the kernel"])
def test_geometries_outside_the_templates_have_no_direct_kernel(any_row, attrs):
    assert glue.direct_conv_geometry((2, 8, 8, 4), (3, 2, 3, 3), attrs, np.float32) is None
    assert glue.direct_conv_geometry((2, 8, 8, 4), (3, 2, 3, 3), dict(attrs, stride=(1, 1), dilation=(1, 1),
                                     padding=((1, 1), (1, 1))), np.float32) is not None
    assert glue.direct_conv_geometry((2, 8, 8, 4), (3, 2, 3, 3), dict(stride=(1, 1), dilation=(1, 1),
                                     padding=((1, 1), (1, 1))), np.float16) is None


def _net(x, w1, w2, w3):
    import avalon.nn.functional as F
    h = F.relu(F.conv2d(x, w1, padding=1))
    h = F.relu(F.conv2d(h, w2, stride=2, padding=1))    # stride 2: im2col + matmul
    h = F.conv2d(h, w3, padding=(2, 0))                  # 5x3 kernel, asymmetric extent
    return (h ** 2).mean()


def _torch_net(x, w1, w2, w3):
    import torch.nn.functional as F
    h = F.relu(F.conv2d(x, w1, padding=1))
    h = F.relu(F.conv2d(h, w2, stride=2, padding=1))
    h = F.conv2d(h, w3, padding=(2, 0))
    return (h ** 2).mean()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_steps_with_direct_convolutions_equal_torch(any_row, dtype):
    rng = np.random.default_rng(3)
    args = [rng.standard_normal(s).astype(dtype) for s in ((6, 3, 11, 10), (8, 3, 3, 3), (5, 8, 3, 3), (4, 5, 5, 3))]
    f = avalon.value_and_grad(_net, argnums=(0, 1, 2, 3))
    loss, grads = f(*args)
    ops = [n.op for n in f.graph.nodes]
    assert ops.count("conv_csn") == 2 and ops.count("conv_csn_weight_grad") == 2, ops
    assert "im2col_csn" in ops   # the stride-2 convolution
    ts = [torch.tensor(a, requires_grad=True) for a in args]
    want = _torch_net(*ts)
    want.backward()
    eps = 1e-5 if dtype == np.float32 else 1e-12   # cancellation: tolerances scale with each array's largest
    np.testing.assert_allclose(loss, want.item(), rtol=10 * eps)
    for got, t in zip(grads, ts):
        ref = t.grad.numpy()
        np.testing.assert_allclose(got, ref, rtol=10 * eps, atol=eps * np.abs(ref).max())


def test_one_image_runs_columns_not_direct_kernels():
    """Rows of one image (N = 1) are too short for the vector tiles."""
    attrs = dict(stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1))
    assert glue.direct_conv_geometry((16, 28, 28, 1), (32, 16, 3, 3), attrs, np.float32) is None
    assert glue.direct_conv_geometry((16, 28, 28, 32), (32, 16, 3, 3), attrs, np.float32) is not None
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((1, 3, 12, 12)).astype(np.float32), rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    f = avalon.jit(lambda x, w: avalon.conv2d(x, w, padding=1))
    got = f(x, w)
    assert "conv_csn" not in {n.op for n in f.graph.nodes}
    want = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), padding=1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_layout_without_direct_convolutions_builds_columns():
    from avalon.passes.layout import layout
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((16, 3, 6, 6)).astype(np.float32), rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = avalon.trace(lambda x, w: avalon.conv2d(x, w, padding=1), x, w)
    assert "im2col_csn" in {n.op for n in layout(graph).nodes}
    direct = layout(graph, direct_convs=True)
    assert {n.op for n in direct.nodes} & {"im2col_csn", "matmul"} == set()
    assert "conv_csn" in {n.op for n in direct.nodes}


def _template_kernel():
    node = _node("conv_csn", [np.zeros((2, 4, 5, 3), np.float32), np.zeros((3, 2, 3, 3), np.float32)],
                 dict(tile_rows=4, stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1)), (3, 4, 5, 3),
                 np.float32)
    return glue.lower_conv_csn(node)


def test_template_kernel_text_is_stable(any_row):
    k = _template_kernel()
    body = str(k).splitlines()
    assert body[0] == f"kernel {k.name}(x: f32[120], w: f32[54]) -> (out: f32[180]) {{"
    assert body[1] == ("  c conv_csn_forward template: in 2 x 4x5 x 3 -> out 3 x 4x5 x 3, kernel 3x3, padding "
                       "(1, 1); 6 channels x 4 vectors a tile")
    assert body[2:] == ["}"]


def test_template_kernels_render_for_c_only_and_verify(any_row):
    k = _template_kernel()
    src = CRenderer().render_module([k, k])
    assert src.count("#define AVL_CONV_HELPERS_F32") == 1 and f"void {k.name}(" in src
    with pytest.raises(Unfusable, match="template"):
        CUDARenderer().render_kernel(k)
    bad = Kernel(k.name, k.params, (Loop(Var("i"), 1, ()),), template=k.template)
    with pytest.raises(KernelIRError, match="template"):
        verify(bad)


def test_direct_weight_gradient_of_a_split_batch_sums_the_shares(monkeypatch):
    """The batch split across the engine's threads: each thread's weight
    gradient is a partial sum over its share of the batch."""
    from avalon.runtime.threads import ShardedFunction, shard_count
    if shard_count() < 2:
        pytest.skip("one engine thread")
    rng = np.random.default_rng(5)
    from avalon.passes import sharding
    monkeypatch.setattr(sharding, "MIN_SHARD_ELEMENTS", 0)   # split however small
    x, w = rng.standard_normal((16, 3, 9, 9)).astype(np.float32), rng.standard_normal((4, 3, 3, 3)).astype(np.float32)

    def loss(w, x):
        return (avalon.conv2d(x, w, padding=1) ** 2).sum()
    f = avalon.value_and_grad(loss, argnums=0)
    for _ in range(12):                  # every schedule tried, the batch split among them
        value, gw = f(w, x)
    split = [c for _, c in f._last().compiled.candidates if isinstance(c, ShardedFunction)]
    assert split, "no batch-split schedule"
    value, gw = split[0].fn(w, x)
    tw, tx = torch.tensor(w, requires_grad=True), torch.tensor(x)
    want = (torch.nn.functional.conv2d(tx, tw, padding=1) ** 2).sum()
    want.backward()
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-4)


def test_strided_inputs_are_copied_and_run_the_c_kernel(any_row):
    """A transposed graph input (the first convolution's) is copied to C order
    for the template kernel rather than sent to the NumPy kernel."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 2, 7, 5)).astype(np.float32).transpose(1, 2, 3, 0)   # (C, H, W, N), strided
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    attrs = dict(tile_rows=7, stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1))
    node = _node("conv_csn", [x, w], attrs, (3, 7, 5, 6), np.float32)

    def numpy_kernel(*args, out=None):
        raise AssertionError("the NumPy kernel ran")
    fn = cpu_native.compile_node_c(node, numpy_kernel)
    got = fn(x, w)
    ref = CPU.kernel(PRIMITIVES["conv_csn"], attrs)(np.ascontiguousarray(x), w)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_a_weight_that_is_not_finite_makes_the_border_nan_as_the_columns_do(any_row, bad):
    """0 * inf in the padding: the direct kernels must not skip what the columns multiply."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 6, 5, 16)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w[1, 2, 0, 0] = bad
    g = rng.standard_normal((4, 6, 5, 16)).astype(np.float32)
    geo = dict(stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), tile_rows=6)
    for op, inputs, attrs, shape in (("conv_csn", [x, w], geo, g.shape),
                                     ("conv_csn_input_grad", [g, w], dict(geo, input_shape=x.shape), x.shape)):
        got, ref = _c_and_numpy(op, inputs, attrs, shape, np.float32)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        assert np.isnan(ref).any() or op == "conv_csn_input_grad"   # col2im drops what falls outside
        np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
@pytest.mark.parametrize("stride", [(1, 1), (2, 2)], ids=["stride 1", "stride 2"])
def test_a_cotangent_that_is_not_finite_makes_the_weight_gradient_nan_as_the_columns_do(any_row, bad, stride):
    """An inf in the cotangent where a tap reads padding: the columns multiply it by
    their zeros (NaN); the direct weight gradient multiplies that tap by zeros too."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 6, 6, 16)).astype(np.float32)
    ho = 6 // stride[0]
    g = rng.standard_normal((4, ho, ho, 16)).astype(np.float32)
    g[1, 0, 0, 5] = bad          # the top-left output: taps dy = 0 and dx = 0 read padding
    attrs = dict(stride=stride, padding=((1, 1), (1, 1)), dilation=(1, 1), tile_rows=6, weight_shape=(4, 3, 3, 3))
    got, ref = _c_and_numpy("conv_csn_weight_grad", [x, g], attrs, (4, 3, 3, 3), np.float32)
    assert np.isnan(ref[1, :, 0, :]).all() and np.isnan(ref[1, :, :, 0]).all()   # taps reading the padding
    assert np.isfinite(np.delete(ref, 1, axis=0)).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)
