"""Convolution / pooling kernels checked against PyTorch (CPU, NumPy backend)."""

import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from avalon.kernels.conv import (  # noqa: E402
    as_tuple,
    avg_pool_backward,
    avg_pool_forward,
    conv_forward,
    conv_input_grad,
    conv_output_shape,
    conv_transpose_forward,
    conv_transpose_output_shape,
    conv_weight_grad,
    max_pool_backward,
    max_pool_forward,
)

TOL = {
    np.float64: dict(rtol=1e-10, atol=1e-12),
    np.float32: dict(rtol=1e-4, atol=1e-5),
}
DTYPES = [np.float64, np.float32]

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(True)


def _close(actual, expected, dtype):
    assert actual.shape == tuple(expected.shape)
    assert actual.dtype == dtype
    np.testing.assert_allclose(actual, expected.detach().numpy(), **TOL[dtype])


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def test_as_tuple():
    assert as_tuple(2, 3) == (2, 2, 2)
    assert as_tuple(np.int64(2), 1) == (2,)
    assert as_tuple((1, 2), 2) == (1, 2)
    assert as_tuple([3], 2) == (3, 3)
    assert all(type(v) is int for v in as_tuple(np.array([1, 2]), 2))


def test_output_shapes():
    assert conv_output_shape((7, 8), (3, 2), (2, 1), (1, 2), (1, 2)) == (4, 10)
    assert conv_output_shape((5,), 3, 1, 0, 1) == (3,)
    assert conv_transpose_output_shape(
        (5, 4), (3, 3), (2, 2), (1, 1), (1, 0), (1, 1)) == (10, 7)
    assert conv_transpose_output_shape((4,), 2, 3, 0, 2, 2) == (14,)


# --------------------------------------------------------------------------
# convolution
# --------------------------------------------------------------------------

# (N, C, O, spatial, kernel, stride, padding, dilation, groups)
CONV_CASES = {
    "1d-basic": (2, 4, 6, (11,), (3,), 1, 0, 1, 1),
    "1d-s2-p1-d2-g2": (2, 4, 6, (12,), (3,), 2, 1, 2, 2),
    "1d-depthwise-k5-p2": (3, 4, 8, (10,), (5,), 1, 2, 1, 4),
    "2d-3x3-p1": (2, 3, 5, (7, 8), (3, 3), 1, 1, 1, 1),
    "2d-nonsquare-mixed-g2": (2, 4, 6, (7, 6), (3, 2), (2, 1), (1, 2), (1, 2), 2),
    "2d-1x1": (2, 4, 3, (5, 6), (1, 1), 1, 0, 1, 1),
    "2d-1x1-s2": (2, 4, 4, (5, 6), (1, 1), 2, 0, 1, 2),
    "2d-depthwise-s2-p1": (2, 4, 4, (8, 7), (3, 3), 2, 1, 1, 4),
    "2d-p2-d2": (1, 3, 4, (9, 9), (3, 3), 1, 2, 2, 1),
    "2d-2x3-s2-d2": (2, 2, 4, (9, 8), (2, 3), (2, 1), (0, 1), (2, 1), 1),
    "2d-s2-p0-uneven": (2, 3, 2, (8, 9), (3, 3), 2, 0, 1, 1),
    "2d-k1x2-p2-s2": (1, 2, 3, (4, 5), (1, 2), 2, 2, 1, 1),
    "3d-3x3x3-p1": (2, 2, 3, (5, 6, 4), (3, 3, 3), 1, 1, 1, 1),
    "3d-mixed-g2": (2, 4, 4, (6, 5, 7), (2, 3, 2), 2, (0, 1, 1), (1, 1, 2), 2),
    "3d-depthwise": (1, 3, 6, (4, 5, 5), (1, 3, 2), (1, 2, 1), (0, 1, 1), 1, 3),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(CONV_CASES), ids=str)
def test_conv_against_torch(case, dtype):
    n, c, o, spatial, kernel, stride, padding, dilation, groups = CONV_CASES[case]
    nd = len(spatial)
    rng = _rng("conv", case)
    x = rng.standard_normal((n, c) + spatial).astype(dtype)
    w = rng.standard_normal((o, c // groups) + kernel).astype(dtype)
    kw = dict(stride=as_tuple(stride, nd), padding=as_tuple(padding, nd),
              dilation=as_tuple(dilation, nd), groups=groups)

    tx, tw = _t(x), _t(w)
    ty = CONV[nd](tx, tw, **kw)
    y = conv_forward(np, x, w, **kw)
    _close(y, ty, dtype)
    assert y.flags.c_contiguous

    g = rng.standard_normal(y.shape).astype(dtype)
    ty.backward(torch.from_numpy(g))
    dx = conv_input_grad(np, g, w, input_shape=x.shape, **kw)
    dw = conv_weight_grad(np, x, g, weight_shape=w.shape, **kw)
    _close(dx, tx.grad, dtype)
    _close(dw, tw.grad, dtype)
    assert dx.flags.c_contiguous


def test_conv_accepts_int_params():
    rng = _rng("conv-int")
    x = rng.standard_normal((2, 2, 6, 7))
    w = rng.standard_normal((3, 2, 3, 3))
    y = conv_forward(np, x, w, stride=2, padding=1, dilation=1, groups=1)
    ref = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2, padding=1)
    np.testing.assert_allclose(y, ref.numpy(), **TOL[np.float64])


def test_conv_noncontiguous_input():
    rng = _rng("conv-noncontig")
    base = rng.standard_normal((2, 9, 8, 3))
    x = base.transpose(0, 3, 1, 2)[:, :, ::2]          # (2, 3, 5, 8), strided
    w = rng.standard_normal((4, 3, 3, 3))
    kw = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)
    y = conv_forward(np, x, w, **kw)
    ref = F.conv2d(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(w),
                   **kw)
    np.testing.assert_allclose(y, ref.numpy(), **TOL[np.float64])
    g = rng.standard_normal(y.shape)[..., ::-1]          # negative strides
    dw = conv_weight_grad(np, x, g, weight_shape=w.shape, **kw)
    dw_ref = conv_weight_grad(np, np.ascontiguousarray(x), np.ascontiguousarray(g),
                              weight_shape=w.shape, **kw)
    np.testing.assert_allclose(dw, dw_ref, **TOL[np.float64])


# --------------------------------------------------------------------------
# transposed convolution
# --------------------------------------------------------------------------

# (N, C_in, C_out, spatial, kernel, stride, padding, output_padding, dilation,
#  groups)
CONV_T_CASES = {
    "2d-s2-p1-op1": (2, 4, 6, (5, 4), (3, 3), 2, 1, 1, 1, 1),
    "2d-nonsquare-op-g2": (2, 4, 6, (4, 5), (3, 2), (2, 3), (0, 1), (1, 2), 1, 2),
    "2d-depthwise-d2-op1": (2, 4, 4, (4, 4), (3, 3), 2, 1, 1, 2, 4),
    "2d-s1-p0": (1, 3, 2, (5, 6), (2, 3), 1, 0, 0, 1, 1),
    "2d-k2-s2": (2, 3, 5, (4, 3), (2, 2), 2, 0, 0, 1, 1),
    "1d-s3-op2-d2": (2, 4, 2, (6,), (3,), 3, 1, 2, 2, 2),
    "3d-s2-p1-op1": (1, 2, 3, (3, 4, 3), (3, 2, 3), 2, 1, (1, 0, 1), 1, 1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(CONV_T_CASES), ids=str)
def test_conv_transpose_against_torch(case, dtype):
    (n, cin, cout, spatial, kernel, stride, padding, output_padding, dilation,
     groups) = CONV_T_CASES[case]
    nd = len(spatial)
    rng = _rng("convT", case)
    x = rng.standard_normal((n, cin) + spatial).astype(dtype)
    w = rng.standard_normal((cin, cout // groups) + kernel).astype(dtype)
    stride, padding = as_tuple(stride, nd), as_tuple(padding, nd)
    dilation = as_tuple(dilation, nd)
    output_padding = as_tuple(output_padding, nd)

    tx, tw = _t(x), _t(w)
    ty = CONV_T[nd](tx, tw, stride=stride, padding=padding,
                    output_padding=output_padding, groups=groups,
                    dilation=dilation)
    y = conv_transpose_forward(np, x, w, stride=stride, padding=padding,
                               output_padding=output_padding,
                               dilation=dilation, groups=groups)
    _close(y, ty, dtype)
    assert y.shape[2:] == conv_transpose_output_shape(
        spatial, kernel, stride, padding, output_padding, dilation)

    # Its gradients are the forward conv and the conv weight grad, swapped.
    g = rng.standard_normal(y.shape).astype(dtype)
    ty.backward(torch.from_numpy(g))
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    _close(conv_forward(np, g, w, **kw), tx.grad, dtype)
    _close(conv_weight_grad(np, g, x, weight_shape=w.shape, **kw), tw.grad, dtype)


# --------------------------------------------------------------------------
# max pooling
# --------------------------------------------------------------------------

# (N, C, spatial, kernel, stride, padding, dilation)
MAX_POOL_CASES = {
    "1d-k2s2": (2, 3, (12,), 2, 2, 0, 1),
    "1d-k3s2p1": (2, 3, (11,), 3, 2, 1, 1),
    "1d-k3s1p1d2": (2, 2, (10,), 3, 1, 1, 2),
    "2d-k2s2-fast": (2, 3, (8, 8), 2, 2, 0, 1),
    "2d-k2s2-fast-uneven": (2, 3, (9, 7), 2, 2, 0, 1),
    "2d-k3s3-fast": (2, 2, (9, 6), 3, 3, 0, 1),
    "2d-k3s2p1-overlap": (2, 3, (9, 8), 3, 2, 1, 1),
    "2d-k3s1p1": (1, 2, (7, 6), 3, 1, 1, 1),
    "2d-k3s1p1d2": (2, 2, (9, 9), 3, 1, 1, 2),
    "2d-k2s1-d2": (1, 2, (7, 8), 2, 1, 0, 2),
    "2d-nonsquare": (2, 2, (9, 7), (3, 2), (2, 1), (1, 0), (1, 2)),
    "3d-k2s2-fast": (1, 2, (6, 6, 4), 2, 2, 0, 1),
    "3d-k3s2p1": (1, 2, (7, 6, 5), 3, 2, 1, 1),
    "3d-k2s1d2": (1, 2, (5, 6, 5), 2, 1, 0, 2),
}
INPUT_KINDS = ["normal", "constant", "integers", "nonfinite"]


def _pool_input(kind, shape, dtype, rng):
    if kind == "normal":
        return rng.standard_normal(shape).astype(dtype)
    if kind == "constant":
        return np.full(shape, 0.5, dtype=dtype)
    x = rng.integers(-2, 3, size=shape).astype(dtype)   # many ties
    if kind == "nonfinite":
        x[rng.random(shape) < 0.15] = np.nan
        x[rng.random(shape) < 0.1] = np.inf
        x[rng.random(shape) < 0.1] = -np.inf
    return x


@pytest.mark.parametrize("kind", INPUT_KINDS)
@pytest.mark.parametrize("case", list(MAX_POOL_CASES), ids=str)
def test_max_pool_against_torch(case, kind):
    n, c, spatial, kernel, stride, padding, dilation = MAX_POOL_CASES[case]
    nd = len(spatial)
    kw = dict(kernel_size=as_tuple(kernel, nd), stride=as_tuple(stride, nd),
              padding=as_tuple(padding, nd), dilation=as_tuple(dilation, nd))
    rng = _rng("maxpool", case, kind)
    for dtype in DTYPES:
        x = _pool_input(kind, (n, c) + spatial, dtype, rng)
        tx = _t(x)
        ty = MAX_POOL[nd](tx, **kw)
        y = max_pool_forward(np, x, **kw)
        assert y.dtype == dtype
        np.testing.assert_array_equal(y, ty.detach().numpy())   # exact, NaN too
        # Integer-valued upstream gradients make accumulation order irrelevant,
        # so the routing of gradients (ties included) must match exactly.
        g = rng.integers(1, 9, size=y.shape).astype(dtype)
        if kind == "nonfinite":
            g[rng.random(g.shape) < 0.1] = np.inf
        ty.backward(torch.from_numpy(g))
        dx = max_pool_backward(np, x, g, **kw)
        assert dx.dtype == dtype and dx.shape == x.shape
        np.testing.assert_array_equal(dx, tx.grad.numpy())


def test_max_pool_first_max_wins():
    x = np.array([[[[1.0, 3.0, 3.0, 0.0], [3.0, 2.0, 3.0, 3.0]]]])
    g = np.array([[[[10.0, 20.0]]]])
    kw = dict(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1))
    dx = max_pool_backward(np, x, g, **kw)
    np.testing.assert_array_equal(
        dx, [[[[0.0, 10.0, 20.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])
    kw = dict(kernel_size=(2, 2), stride=(1, 1), padding=(0, 0), dilation=(1, 1))
    dx = max_pool_backward(np, x, np.ones((1, 1, 1, 3)), **kw)
    np.testing.assert_array_equal(
        dx, [[[[0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])


# --------------------------------------------------------------------------
# average pooling
# --------------------------------------------------------------------------

# (N, C, spatial, kernel, stride, padding)
AVG_POOL_CASES = {
    "1d-k3s2p1": (2, 3, (11,), 3, 2, 1),
    "2d-k2s2-fast": (2, 3, (8, 8), 2, 2, 0),
    "2d-k2s2-fast-uneven": (2, 3, (9, 7), 2, 2, 0),
    "2d-k3s2p1": (2, 3, (9, 7), 3, 2, 1),
    "2d-k3s1p1": (1, 2, (6, 7), 3, 1, 1),
    "2d-nonsquare": (2, 2, (8, 7), (3, 2), (1, 2), (1, 1)),
    "3d-k3s2p1": (1, 2, (6, 5, 7), 3, 2, 1),
    "3d-k2s2-fast": (1, 2, (4, 6, 4), 2, 2, 0),
}


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("case", list(AVG_POOL_CASES), ids=str)
def test_avg_pool_against_torch(case, dtype, count_include_pad):
    n, c, spatial, kernel, stride, padding = AVG_POOL_CASES[case]
    nd = len(spatial)
    kw = dict(kernel_size=as_tuple(kernel, nd), stride=as_tuple(stride, nd),
              padding=as_tuple(padding, nd), count_include_pad=count_include_pad)
    rng = _rng("avgpool", case)
    x = rng.standard_normal((n, c) + spatial).astype(dtype)
    tx = _t(x)
    ty = AVG_POOL[nd](tx, **kw)
    y = avg_pool_forward(np, x, **kw)
    _close(y, ty, dtype)
    g = rng.standard_normal(y.shape).astype(dtype)
    ty.backward(torch.from_numpy(g))
    dx = avg_pool_backward(np, g, input_shape=x.shape, **kw)
    _close(dx, tx.grad, dtype)
