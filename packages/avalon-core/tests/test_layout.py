"""The layout pass: convolutional stacks run batch-innermost, with the same results."""
import numpy as np
import pytest

import avalon
from avalon import passes
from avalon.kernels import conv as NC
from avalon.kernels import conv_csn as CSN

rng = np.random.default_rng(11)


def csn(a):
    return np.ascontiguousarray(np.moveaxis(a, 0, -1))


def nc(a):
    return np.moveaxis(a, -1, 0)


CONV_CASES = [  # input shape, out channels, kernel, stride, padding, dilation
    ((4, 3, 9, 8), 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    ((4, 3, 9, 8), 5, (3, 3), (2, 2), (0, 0), (1, 1)),
    ((2, 2, 10, 10), 4, (3, 3), (1, 1), (2, 2), (2, 2)),
    ((3, 1, 7, 7), 2, (2, 3), (1, 2), (1, 0), (1, 1)),
    ((2, 3, 11), 4, (3,), (2,), (1,), (1,)),
    ((2, 2, 5, 6, 4), 3, (3, 2, 3), (1, 1, 1), (1, 0, 1), (1, 1, 1)),
]


@pytest.mark.parametrize("xs, o, k, s, p, d", CONV_CASES)
def test_batch_innermost_conv_kernels_equal_the_nchw_ones(xs, o, k, s, p, d):
    x = rng.standard_normal(xs)
    w = rng.standard_normal((o, xs[1]) + k)
    y = NC.conv_forward(np, x, w, stride=s, padding=p, dilation=d)
    np.testing.assert_allclose(nc(CSN.conv_csn_forward(np, csn(x), w, stride=s, padding=p, dilation=d)), y,
                               rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(y.shape)
    dx = NC.conv_input_grad(np, g, w, input_shape=x.shape, stride=s, padding=p, dilation=d)
    got = CSN.conv_csn_input_grad(np, csn(g), w, input_shape=csn(x).shape, stride=s, padding=p, dilation=d)
    np.testing.assert_allclose(nc(got), dx, rtol=1e-12, atol=1e-12)
    dw = NC.conv_weight_grad(np, x, g, weight_shape=w.shape, stride=s, padding=p, dilation=d)
    got = CSN.conv_csn_weight_grad(np, csn(x), csn(g), weight_shape=w.shape, stride=s, padding=p, dilation=d)
    np.testing.assert_allclose(got, dw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k, s, p, d", [((2, 2), (2, 2), (0, 0), (1, 1)), ((3, 3), (2, 2), (1, 1), (1, 1)),
                                        ((2, 2), (1, 1), (0, 0), (2, 2))])
def test_batch_innermost_max_pool_equals_the_nchw_one_with_ties(k, s, p, d):
    x = rng.integers(0, 3, (4, 3, 9, 8)).astype(np.float64)  # many ties: the first maximum wins
    y = NC.max_pool_forward(np, x, kernel_size=k, stride=s, padding=p, dilation=d)
    got = CSN.max_pool_csn_forward(np, csn(x), kernel_size=k, stride=s, padding=p, dilation=d)
    np.testing.assert_array_equal(nc(got), y)
    g = rng.standard_normal(y.shape)
    dx = NC.max_pool_backward(np, x, g, kernel_size=k, stride=s, padding=p, dilation=d)
    got = CSN.max_pool_csn_backward(np, csn(x), csn(g), kernel_size=k, stride=s, padding=p, dilation=d)
    np.testing.assert_allclose(nc(got), dx, rtol=1e-12, atol=1e-12)
    # given the pooled output (the tiling fast path compares with it instead of searching)
    got = CSN.max_pool_csn_backward(np, csn(x), csn(g), kernel_size=k, stride=s, padding=p, dilation=d, y=csn(y))
    np.testing.assert_allclose(nc(got), dx, rtol=1e-12, atol=1e-12)


def test_tiled_max_pool_gradient_with_nan_windows_matches_the_search():
    x = rng.standard_normal((2, 3, 8, 8))
    x[0, 1, 2, 3] = np.nan
    y = NC.max_pool_forward(np, x, kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1))
    g = rng.standard_normal(y.shape)
    kw = dict(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1))
    dx = NC.max_pool_backward(np, x, g, **kw)
    got = CSN.max_pool_csn_backward(np, csn(x), csn(g), y=csn(y), **kw)
    np.testing.assert_array_equal(nc(got), dx)


def test_tiled_max_pool_gradient_goes_to_the_last_nan_of_a_window():
    x = rng.standard_normal((2, 3, 8, 8))
    x[0, 1, 2, 2] = x[0, 1, 3, 3] = np.nan      # two NaNs in one window: the last one wins
    x[1, 0, 4, 4] = np.nan                       # a NaN first in its window
    x[1, 2, 6, 7] = x[1, 2, 7, 6] = np.inf       # infinities, no NaN
    kw = dict(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1))
    y = NC.max_pool_forward(np, x, **kw)
    g = rng.standard_normal(y.shape)
    dx = NC.max_pool_backward(np, x, g, **kw)
    assert dx[0, 1, 3, 3] == g[0, 1, 1, 1] and dx[0, 1, 2, 2] == 0
    got = CSN.max_pool_csn_backward(np, csn(x), csn(g), y=csn(y), **kw)
    np.testing.assert_array_equal(nc(got), dx)


class _NoHostReads(np.ndarray):
    """An array that refuses what would read a device array back to the host."""

    def _refuse(self, *args, **kwargs):
        raise AssertionError("the kernel read a value back to the host")
    any = all = item = tolist = __bool__ = __float__ = __int__ = _refuse


def test_tiled_max_pool_gradient_reads_nothing_back_to_the_host():
    x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    x[1, 2, 3, 0] = np.nan
    kw = dict(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1))
    y = CSN.max_pool_csn_forward(np, x, **kw)
    g = rng.standard_normal(y.shape).astype(np.float32)
    want = CSN.max_pool_csn_backward(np, x, g, y=y, **kw)
    got = CSN.max_pool_csn_backward(np, *(a.view(_NoHostReads) for a in (x, g)), y=y.view(_NoHostReads), **kw)
    np.testing.assert_array_equal(np.asarray(got), want)


def cnn_loss(m, x, y):
    h = x
    for w, b, stride, groups in m["convs"]:
        h = avalon.relu(avalon.conv2d(h, w, b, stride=stride, padding=1, groups=groups))
        h = avalon.max_pool2d(h, 2)
    h = avalon.avg_pool2d(h, 1)
    logits = h.reshape(h.shape[0], -1) @ m["fc"]
    return -avalon.mean(avalon.take_along_axis(avalon.log_softmax(logits), avalon.expand_dims(y, 1), axis=1))


def make_cnn(groups=1):
    def conv(o, i, stride=1, g=1):
        return (rng.standard_normal((o, i // g, 3, 3)).astype(np.float32) * 0.3,
                rng.standard_normal(o).astype(np.float32) * 0.1, stride, g)
    return {"convs": [conv(8, 1), conv(8, 8, 1, groups), conv(6, 8, 2)],
            "fc": rng.standard_normal((6, 5)).astype(np.float32) * 0.3}


@pytest.fixture
def columns_path(monkeypatch):
    """The layout pass without direct convolutions: im2col + matmul for every convolution."""
    from avalon.backends import cpu
    monkeypatch.setattr(cpu, "_builds_c_kernels", lambda: False)


@pytest.mark.parametrize("groups", [1, 2])
def test_layout_pass_keeps_losses_and_gradients(groups, columns_path):
    m, x, y = make_cnn(groups), rng.standard_normal((6, 1, 17, 17)).astype(np.float32), rng.integers(0, 5, 6)
    without = [p for p in passes.default_pipeline() if p[0] != "layout"]
    ref = avalon.value_and_grad(cnn_loss, argnums=0, passes=without, parallel=False)
    new = avalon.GradFunction(cnn_loss, argnums=0, parallel=False)
    l0, (g0, _, _) = ref(m, x, y)
    l1, (g1, _, _) = new(m, x, y)
    ops = {n.op for n in new.graph.nodes}
    assert {"im2col_csn", "col2im_csn", "max_pool_csn", "max_pool_csn_grad"} <= ops
    # the forward product and the weight gradient share each layer's columns
    assert sum(n.op == "im2col_csn" for n in new.graph.nodes) == 3 - (groups == 2)
    if groups == 2:
        assert "conv" in ops  # the grouped convolution keeps PyTorch's layout
    new.graph.check()
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for (w0, b0, _, _), (w1, b1, _, _) in zip(g0["convs"], g1["convs"]):
        np.testing.assert_allclose(w1, w0, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b1, b0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g1["fc"], g0["fc"], rtol=1e-4, atol=1e-6)


def test_layout_pass_leaves_graphs_without_convolutions_alone():
    g = avalon.trace(lambda x: avalon.tanh(x) * 2.0, np.ones((2, 3, 4, 5), np.float32))
    before = g.format(show_loc=False)
    assert passes.layout(g).format(show_loc=False) == before


def test_bias_and_activation_stay_batch_innermost():
    m, x, y = make_cnn(), rng.standard_normal((4, 1, 17, 17)).astype(np.float32), rng.integers(0, 5, 4)
    f = avalon.GradFunction(cnn_loss, argnums=0, parallel=False, passes=[
        p for p in passes.default_pipeline() if p[0] not in ("fuse_elementwise", "fuse_lone_ops")])
    f(m, x, y)
    g = f.graph
    relus = [n for n in g.nodes if n.op == "relu"]
    assert relus and all(n.shape[-1] == 4 for n in relus)  # (C, H, W, N): batch last
    # one transpose in from the input, one out before the flatten, and the small bias-gradient ones
    # (2-D transposes of the column matrices are views read by the matrix products)
    big = [n for n in g.nodes if n.op == "transpose" and n.ndim >= 3 and n.size >= 4 * 17 * 17]
    assert len(big) <= 2


def _scaled_conv(x, w, s):
    return avalon.conv2d(x, w, padding=1) * avalon.broadcast_to(s, (4, 3, 6, 6))


def test_a_broadcast_read_batch_innermost_is_broadcast_from_its_permuted_operand():
    """A broadcast (a batch mean's gradient) read by a batch-innermost op is
    broadcast again from its permuted operand, not transposed: a transposed
    broadcast is a strided view no kernel reads in place."""
    import torch
    x, w = rng.standard_normal((4, 2, 6, 6)).astype(np.float32), rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    s = rng.standard_normal((1, 3, 1, 1)).astype(np.float32)
    out = passes.dce(passes.layout(avalon.trace(_scaled_conv, x, w, s)))
    assert [n.shape for n in out.nodes if n.op == "broadcast_to"] == [(3, 6, 6, 4)]
    assert not any(n.op == "transpose" and n.inputs[0].op == "broadcast_to" for n in out.nodes)
    got = avalon.jit(_scaled_conv)(x, w, s)
    want = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), padding=1) * torch.tensor(s)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
