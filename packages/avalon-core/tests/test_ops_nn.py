"""avalon.ops.nn: convolution and pooling primitives and their torch-style
functions, checked against PyTorch (forward and autograd), against central
finite differences in float64, under avalon.jit, and for their error messages."""

import contextlib
import warnings
import zlib

import numpy as np
import pytest

import avalon
from avalon.autodiff import grad_graph
from avalon.ops import nn as nn_ops
from avalon.primitive import bind

torch = pytest.importorskip("torch")
F = torch.nn.functional

F32 = dict(rtol=1e-4, atol=1e-5)
F64 = dict(rtol=1e-10, atol=1e-12)


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _randn(r, shape, dtype=np.float64):
    return r.standard_normal(shape).astype(dtype)


def _distinct(r, shape, dtype=np.float64):
    """Values at least 0.05 apart (max pooling is smooth there: no ties within eps)."""
    n = int(np.prod(shape))
    return (r.permutation(n) * 0.05 - n * 0.025).reshape(shape).astype(dtype)


def _projected(fn, R):
    """A scalar loss sum(fn(*args) * R) with a fixed random projection R."""
    return lambda *args: (fn(*args) * R).sum()


def torch_value_and_grads(tfn, arrays):
    ts = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = tfn(*ts)
    out.backward()
    return out.detach().numpy(), [t.grad.numpy() for t in ts]


def check_against_torch(afn, tfn, arrays, out_shape, r, tol=F32):
    """Forward output, and the gradient of a random projection w.r.t. every array, vs torch."""
    R = _randn(r, out_shape, arrays[0].dtype)
    y = afn(*arrays)
    ty = tfn(*[torch.tensor(a) for a in arrays]).numpy()
    assert y.shape == ty.shape and y.dtype == ty.dtype
    np.testing.assert_allclose(y, ty, **tol)
    loss, grads = avalon.grad(_projected(afn, R), *arrays)
    tloss, tgrads = torch_value_and_grads(lambda *ts: (tfn(*ts) * torch.tensor(R)).sum(), arrays)
    assert isinstance(grads, tuple) and len(grads) == len(arrays)
    np.testing.assert_allclose(loss, tloss, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    for g, tg, a in zip(grads, tgrads, arrays):
        assert g.shape == a.shape and g.dtype == a.dtype
        np.testing.assert_allclose(g, tg, **tol)


def check_finite_differences(loss_fn, arrays, r, n_coords=20, eps=1e-6, rtol=1e-6, atol=1e-8):
    """avalon.grad of a scalar float64 loss vs central differences of the eager loss:
    on up to n_coords random coordinates of each argument and along one random direction."""
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    _, grads = avalon.grad(loss_fn, *arrays)

    def loss_at(k, a):
        args = list(arrays)
        args[k] = a
        return float(loss_fn(*args))

    for k, (a, g) in enumerate(zip(arrays, grads)):
        assert g.shape == a.shape
        for i in r.choice(a.size, min(n_coords, a.size), replace=False):
            e = np.zeros(a.size)
            e[i] = eps
            e = e.reshape(a.shape)
            fd = (loss_at(k, a + e) - loss_at(k, a - e)) / (2 * eps)
            np.testing.assert_allclose(g.reshape(-1)[i], fd, rtol=rtol, atol=atol,
                                       err_msg=f"argument {k}, flat index {i}")
        v = r.standard_normal(a.shape)
        fd = (loss_at(k, a + eps * v) - loss_at(k, a - eps * v)) / (2 * eps)
        np.testing.assert_allclose(np.sum(g * v), fd, rtol=rtol, atol=atol, err_msg=f"argument {k}, direction")


# ---------------------------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------------------------

CONV = {1: (avalon.conv1d, F.conv1d), 2: (avalon.conv2d, F.conv2d), 3: (avalon.conv3d, F.conv3d)}

# (N, C, O, spatial, kernel, stride, padding, dilation, groups)
CONV_CASES = [
    (2, 3, 4, (9,), (3,), 1, 0, 1, 1),
    (2, 4, 6, (11,), (3,), 2, 2, 2, 2),
    (2, 3, 4, (6, 7), (3, 3), 1, 1, 1, 1),
    (2, 4, 6, (7, 8), (3, 2), (2, 1), (1, 0), (1, 2), 2),
    (1, 6, 6, (6, 6), (3, 3), 2, 1, 1, 6),                     # depthwise
    (2, 3, 2, (5, 6), (1, 1), 1, 0, 1, 1),                     # 1x1
    (1, 2, 4, (4, 5, 4), (2, 3, 2), 1, (1, 0, 1), 1, 1),
    (2, 4, 4, (5, 5, 6), (3, 2, 2), (2, 1, 2), 1, (1, 2, 1), 2),
]


def _conv_arrays(case, dtype, r):
    n, c, o, sp, k, stride, padding, dilation, groups = case
    x = _randn(r, (n, c) + sp, dtype)
    w = _randn(r, (o, c // groups) + k, dtype)
    b = _randn(r, (o,), dtype)
    return x, w, b


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{len(c[3])}d-s{c[5]}-p{c[6]}-d{c[7]}-g{c[8]}")
def test_conv_matches_torch(case):
    r = _rng("conv-torch", case)
    nd = len(case[3])
    fn, tfn = CONV[nd]
    _, _, _, _, _, stride, padding, dilation, groups = case
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x, w, b = _conv_arrays(case, np.float32, r)
    out_shape = tfn(torch.tensor(x), torch.tensor(w), **kw).shape
    check_against_torch(lambda x, w, b: fn(x, w, b, **kw), lambda x, w, b: tfn(x, w, b, **kw),
                        [x, w, b], out_shape, r)
    # without bias, positional arguments as in torch
    x64, w64, _ = _conv_arrays(case, np.float64, r)
    np.testing.assert_allclose(fn(x64, w64, None, stride, padding, dilation, groups),
                               tfn(torch.tensor(x64), torch.tensor(w64), None, stride, padding, dilation,
                                   groups).numpy(), **F64)


@pytest.mark.parametrize("case", CONV_CASES[1::2], ids=lambda c: f"{len(c[3])}d-s{c[5]}-g{c[8]}")
def test_conv_finite_differences(case):
    r = _rng("conv-fd", case)
    fn, tfn = CONV[len(case[3])]
    _, _, _, _, _, stride, padding, dilation, groups = case
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    x, w, b = _conv_arrays(case, np.float64, r)
    R = _randn(r, tfn(torch.tensor(x), torch.tensor(w), **kw).shape)
    check_finite_differences(_projected(lambda x, w, b: fn(x, w, b, **kw), R), [x, w, b], r)


@pytest.mark.parametrize("nd,kernel,dilation", [(1, (4,), 1), (2, (3, 4), (1, 1)), (2, (2, 3), (3, 2)),
                                                 (3, (2, 3, 1), 1)])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_conv_string_padding(nd, kernel, dilation, padding):
    r = _rng("conv-pad", nd, kernel, dilation, padding)
    fn, tfn = CONV[nd]
    x = _randn(r, (2, 2) + (7, 6, 5)[:nd], np.float32)
    w = _randn(r, (3, 2) + kernel, np.float32)
    b = _randn(r, (3,), np.float32)
    kw = dict(padding=padding, dilation=dilation)
    with _quiet():
        out_shape = tfn(torch.tensor(x), torch.tensor(w), **kw).shape
    if padding == "same":
        assert tuple(out_shape[2:]) == x.shape[2:]
    check_against_torch(lambda x, w, b: fn(x, w, b, **kw), lambda x, w, b: tfn(x, w, b, **kw),
                        [x, w, b], out_shape, r)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # torch warns about 'same' with even kernels
        yield


def test_conv_same_padding_odd_total_finite_differences():
    # an even kernel with padding='same' pads one more on the high side: asymmetric padding
    r = _rng("conv-same-fd")
    x, w = _randn(r, (1, 2, 6, 5)), _randn(r, (2, 2, 2, 4))
    y = avalon.conv2d(x, w, padding="same")
    assert y.shape == (1, 2, 6, 5)
    check_finite_differences(_projected(lambda x, w: avalon.conv2d(x, w, padding="same"), _randn(r, y.shape)),
                             [x, w], r)


def test_conv_unbatched_input():
    r = _rng("conv-unbatched")
    x, w, b = _randn(r, (3, 6, 5), np.float32), _randn(r, (4, 3, 3, 3), np.float32), _randn(r, (4,), np.float32)
    check_against_torch(lambda x, w, b: avalon.conv2d(x, w, b, padding=1),
                        lambda x, w, b: F.conv2d(x, w, b, padding=1), [x, w, b], (4, 6, 5), r)
    x1, w1 = _randn(r, (2, 9), np.float32), _randn(r, (3, 2, 3), np.float32)
    np.testing.assert_allclose(avalon.conv1d(x1, w1, stride=2),
                               F.conv1d(torch.tensor(x1), torch.tensor(w1), stride=2).numpy(), **F32)


# ---------------------------------------------------------------------------------------------
# the backward primitives are differentiable too (bilinear: each VJP uses the other two)
# ---------------------------------------------------------------------------------------------

BACKWARD_CASES = [
    dict(x=(2, 4, 7, 6), w=(6, 2, 3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    dict(x=(1, 2, 6, 5), w=(3, 2, 2, 4), stride=(1, 1), padding=(0, (1, 2)), dilation=(1, 1), groups=1),
    dict(x=(2, 3, 8), w=(3, 1, 3), stride=(3,), padding=(2,), dilation=(2,), groups=3),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=["2d-groups", "2d-asym-pad", "1d-depthwise"])
def test_conv_backward_primitives_finite_differences(case):
    r = _rng("conv-bwd", repr(case))
    attrs = {k: v for k, v in case.items() if k not in ("x", "w")}
    x, w = _randn(r, case["x"]), _randn(r, case["w"])
    g = bind(nn_ops.conv_p, (x, w), attrs)
    # the kernels agree with the primitive they differentiate
    np.testing.assert_allclose(
        bind(nn_ops.conv_input_grad_p, (g, w), dict(input_shape=x.shape, **attrs)).sum(),
        avalon.grad(lambda x: (bind(nn_ops.conv_p, (x, w), attrs) * g).sum(), x)[1][0].sum(), rtol=1e-10)
    g = _randn(r, g.shape)
    cig = lambda g, w: bind(nn_ops.conv_input_grad_p, (g, w), dict(input_shape=x.shape, **attrs))  # noqa: E731
    cwg = lambda x, g: bind(nn_ops.conv_weight_grad_p, (x, g), dict(weight_shape=w.shape, **attrs))  # noqa: E731
    check_finite_differences(_projected(cig, _randn(r, x.shape)), [g, w], r, n_coords=12)
    check_finite_differences(_projected(cwg, _randn(r, w.shape)), [x, g], r, n_coords=12)


def test_conv_backward_primitives_match_torch_double_backward():
    r = _rng("conv-double")
    kw = dict(stride=2, padding=1, groups=2)
    attrs = dict(stride=(2, 2), padding=(1, 1), dilation=(1, 1), groups=2)
    x, w = _randn(r, (2, 4, 6, 5)), _randn(r, (4, 2, 3, 3))
    g = _randn(r, F.conv2d(torch.tensor(x), torch.tensor(w), **kw).shape)
    R = _randn(r, x.shape)
    # d/d(g, w) of <R, d conv / dx>
    _, (gg, gw) = avalon.grad(lambda g, w: (bind(nn_ops.conv_input_grad_p, (g, w),
                                                   dict(input_shape=x.shape, **attrs)) * R).sum(), g, w)
    tx, tw, tg = (torch.tensor(a, requires_grad=True) for a in (x, w, g))
    (dx,) = torch.autograd.grad(F.conv2d(tx, tw, **kw), tx, tg, create_graph=True)
    tgg, tgw = torch.autograd.grad((dx * torch.tensor(R)).sum(), (tg, tw))
    np.testing.assert_allclose(gg, tgg.numpy(), **F64)
    np.testing.assert_allclose(gw, tgw.numpy(), **F64)


# ---------------------------------------------------------------------------------------------
# transposed convolution
# ---------------------------------------------------------------------------------------------

CONV_T = {1: (avalon.conv_transpose1d, F.conv_transpose1d), 2: (avalon.conv_transpose2d, F.conv_transpose2d),
          3: (avalon.conv_transpose3d, F.conv_transpose3d)}

# (N, C_in, C_out, spatial, kernel, stride, padding, output_padding, groups, dilation)
CONV_T_CASES = [
    (2, 4, 6, (4, 5), (3, 3), 2, 1, 1, 2, 1),
    (1, 3, 2, (3, 3), (2, 3), (3, 2), (0, 1), (2, 1), 1, (1, 2)),
    (2, 3, 3, (5, 4), (3, 3), 1, 0, 0, 1, 1),
    (2, 3, 4, (5,), (3,), 2, 1, 1, 1, 2),
    (1, 2, 2, (3, 3, 2), (2, 2, 3), 2, 0, (1, 0, 1), 1, 1),
]


def _conv_t_arrays(case, dtype, r):
    n, ci, co, sp, k, stride, padding, output_padding, groups, dilation = case
    return (_randn(r, (n, ci) + sp, dtype), _randn(r, (ci, co // groups) + k, dtype), _randn(r, (co,), dtype))


def _conv_t_kw(case):
    return dict(zip(("stride", "padding", "output_padding", "groups", "dilation"), case[5:]))


@pytest.mark.parametrize("case", CONV_T_CASES, ids=lambda c: f"{len(c[3])}d-s{c[5]}-op{c[7]}-g{c[8]}")
def test_conv_transpose_matches_torch(case):
    r = _rng("convT-torch", case)
    fn, tfn = CONV_T[len(case[3])]
    kw = _conv_t_kw(case)
    x, w, b = _conv_t_arrays(case, np.float32, r)
    out_shape = tfn(torch.tensor(x), torch.tensor(w), **kw).shape
    check_against_torch(lambda x, w, b: fn(x, w, b, **kw), lambda x, w, b: tfn(x, w, b, **kw),
                        [x, w, b], out_shape, r)


@pytest.mark.parametrize("case", CONV_T_CASES[:2] + CONV_T_CASES[3:4], ids=["2d-op1-g2", "2d-dil", "1d"])
def test_conv_transpose_finite_differences(case):
    r = _rng("convT-fd", case)
    fn, tfn = CONV_T[len(case[3])]
    kw = _conv_t_kw(case)
    x, w, b = _conv_t_arrays(case, np.float64, r)
    R = _randn(r, tfn(torch.tensor(x), torch.tensor(w), **kw).shape)
    check_finite_differences(_projected(lambda x, w, b: fn(x, w, b, **kw), R), [x, w, b], r)


def test_conv_transpose_unbatched_and_positional():
    r = _rng("convT-unbatched")
    x, w = _randn(r, (4, 3, 3), np.float32), _randn(r, (4, 3, 2, 2), np.float32)
    y = avalon.conv_transpose2d(x, w, None, 2, 0, 1, 1, 1)
    ty = F.conv_transpose2d(torch.tensor(x), torch.tensor(w), None, 2, 0, 1, 1, 1).numpy()
    assert y.shape == ty.shape == (3, 7, 7)
    np.testing.assert_allclose(y, ty, **F32)


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------

MAX_POOL = {1: (avalon.max_pool1d, F.max_pool1d), 2: (avalon.max_pool2d, F.max_pool2d),
            3: (avalon.max_pool3d, F.max_pool3d)}

# (shape, kernel_size, stride, padding, dilation)
MAX_POOL_CASES = [
    ((2, 3, 7, 7), 3, 2, 1, 1),                  # overlapping windows
    ((1, 2, 6, 6), 2, 1, 0, 1),                  # stride 1: every element in up to 4 windows
    ((2, 2, 8, 7), (3, 2), (2, 1), (1, 1), (2, 1)),
    ((2, 2, 6, 6), 2, None, 0, 1),               # tiled
    ((2, 3, 10), 3, 2, 1, 1),
    ((1, 2, 5, 5, 4), 2, None, 0, 1),
    ((1, 1, 5, 6, 5), 3, 2, 1, (1, 2, 1)),
]


@pytest.mark.parametrize("case", MAX_POOL_CASES, ids=lambda c: f"{len(c[0]) - 2}d-k{c[1]}-s{c[2]}-p{c[3]}")
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_max_pool_matches_torch(case, ties):
    shape, k, s, p, d = case
    r = _rng("maxpool", case, ties)
    fn, tfn = MAX_POOL[len(shape) - 2]
    x = (r.integers(0, 3, shape) if ties else _distinct(r, shape)).astype(np.float32)
    out_shape = tfn(torch.tensor(x), k, s, p, d).shape
    check_against_torch(lambda x: fn(x, k, s, p, d), lambda x: tfn(x, k, s, p, d), [x], out_shape, r)


@pytest.mark.parametrize("case", MAX_POOL_CASES[:3] + MAX_POOL_CASES[4:5])
def test_max_pool_finite_differences(case):
    shape, k, s, p, d = case
    r = _rng("maxpool-fd", case)
    fn, tfn = MAX_POOL[len(shape) - 2]
    x = _distinct(r, shape)
    R = _randn(r, tfn(torch.tensor(x), k, s, p, d).shape)
    check_finite_differences(_projected(lambda x: fn(x, k, s, p, d), R), [x], r, n_coords=30)


def test_max_pool_unbatched_and_alias():
    r = _rng("maxpool-unbatched")
    x = _distinct(r, (3, 6, 6), np.float32)
    assert avalon.maxpool2d is avalon.max_pool2d
    check_against_torch(lambda x: avalon.maxpool2d(x, 2), lambda x: F.max_pool2d(x, 2), [x], (3, 3, 3), r)


@pytest.mark.parametrize("attrs", [
    dict(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0), dilation=(1, 1)),
    dict(kernel_size=(3, 3), stride=(1, 2), padding=(1, 1), dilation=(1, 1)),   # overlapping, padded
    dict(kernel_size=(2, 2), stride=(1, 1), padding=(0, 1), dilation=(2, 1)),
], ids=["disjoint", "overlap_pad", "dilated"])
def test_max_pool_grad_vjp_is_its_adjoint(attrs):
    """max_pool_grad is linear in g; its VJP (max_pool_gather) is its adjoint:
    <max_pool_grad(x, g), c> == <g, max_pool_gather(x, c)>, so max pooling
    has second derivatives."""
    r = _rng("maxpool-grad-grad")
    x = _distinct(r, (2, 3, 5, 6), np.float64)
    g = avalon.trace(lambda x: bind(nn_ops.max_pool_p, (x,), attrs), x).outputs[0]
    g = r.standard_normal(g.shape)
    c = r.standard_normal(x.shape)
    lhs = np.sum(bind(nn_ops.max_pool_grad_p, (x, g), attrs) * c)
    gathered = bind(nn_ops.max_pool_gather_p, (x, c), attrs)
    np.testing.assert_allclose(lhs, np.sum(g * gathered), rtol=1e-12)
    _, (gx, gg) = avalon.grad(lambda x, g: (bind(nn_ops.max_pool_grad_p, (x, g), attrs) * c).sum(), x, g)
    np.testing.assert_array_equal(gx, np.zeros_like(x))
    np.testing.assert_allclose(gg, gathered, rtol=1e-12)


AVG_POOL = {1: (avalon.avg_pool1d, F.avg_pool1d), 2: (avalon.avg_pool2d, F.avg_pool2d),
            3: (avalon.avg_pool3d, F.avg_pool3d)}

# (shape, kernel_size, stride, padding, count_include_pad)
AVG_POOL_CASES = [
    ((2, 3, 7, 7), 3, 2, 1, True),
    ((2, 3, 7, 7), 3, 2, 1, False),
    ((1, 2, 6, 5), (2, 3), 1, (1, 1), False),     # overlapping
    ((2, 2, 6, 6), 2, None, 0, True),             # tiled
    ((2, 2, 9), 3, 2, 1, False),
    ((1, 2, 4, 5, 6), 2, (1, 2, 2), 1, True),
]


@pytest.mark.parametrize("case", AVG_POOL_CASES, ids=lambda c: f"{len(c[0]) - 2}d-k{c[1]}-s{c[2]}-p{c[3]}-{c[4]}")
def test_avg_pool_matches_torch(case):
    shape, k, s, p, cip = case
    r = _rng("avgpool", case)
    fn, tfn = AVG_POOL[len(shape) - 2]
    x = _randn(r, shape, np.float32)
    out_shape = tfn(torch.tensor(x), k, s, p, count_include_pad=cip).shape
    check_against_torch(lambda x: fn(x, k, s, p, count_include_pad=cip),
                        lambda x: tfn(x, k, s, p, count_include_pad=cip), [x], out_shape, r)


@pytest.mark.parametrize("case", AVG_POOL_CASES[1:3] + AVG_POOL_CASES[4:5])
def test_avg_pool_finite_differences(case):
    shape, k, s, p, cip = case
    r = _rng("avgpool-fd", case)
    fn, tfn = AVG_POOL[len(shape) - 2]
    x = _randn(r, shape)
    R = _randn(r, tfn(torch.tensor(x), k, s, p, count_include_pad=cip).shape)
    check_finite_differences(_projected(lambda x: fn(x, k, s, p, count_include_pad=cip), R), [x], r)


def test_avg_pool_divisor_override_and_positional_ceil_mode():
    r = _rng("avgpool-div")
    x = _randn(r, (2, 2, 7, 6), np.float32)
    for cip in (True, False):
        kw = dict(count_include_pad=cip, divisor_override=3)
        check_against_torch(lambda x: avalon.avg_pool2d(x, 3, 2, 1, **kw),
                            lambda x: F.avg_pool2d(x, 3, 2, 1, **kw), [x], (2, 2, 4, 3), r)
    # torch's positional order: (x, kernel_size, stride, padding, ceil_mode, count_include_pad)
    np.testing.assert_allclose(avalon.avg_pool2d(x, 3, 2, 1, False, False),
                               F.avg_pool2d(torch.tensor(x), 3, 2, 1, False, False).numpy(), **F32)


def test_avg_pool_grad_primitive_finite_differences():
    r = _rng("avgpool-grad-fd")
    attrs = dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), count_include_pad=False)
    x = _randn(r, (1, 2, 6, 5))
    g = _randn(r, bind(nn_ops.avg_pool_p, (x,), attrs).shape)
    fn = lambda g: bind(nn_ops.avg_pool_grad_p, (g,), dict(input_shape=x.shape, **attrs))  # noqa: E731
    check_finite_differences(_projected(fn, _randn(r, x.shape)), [g], r)


@pytest.mark.parametrize("nd,shape,output_size", [(2, (2, 3, 8, 6), (4, 3)), (2, (2, 3, 8, 6), (2, None)),
                                                  (2, (3, 4, 4), 1), (2, (1, 2, 6, 6), 6),
                                                  (1, (2, 3, 12), 4), (3, (1, 2, 4, 6, 2), (2, 3, 1))])
def test_adaptive_pools_match_torch(nd, shape, output_size):
    r = _rng("adaptive", shape, output_size)
    x = _distinct(r, shape, np.float32)
    for fn, tfn in ((getattr(avalon, f"adaptive_avg_pool{nd}d"), getattr(F, f"adaptive_avg_pool{nd}d")),
                    (getattr(avalon, f"adaptive_max_pool{nd}d"), getattr(F, f"adaptive_max_pool{nd}d"))):
        out_shape = tfn(torch.tensor(x), output_size).shape
        check_against_torch(lambda x: fn(x, output_size) * 1.0, lambda x: tfn(x, output_size) * 1.0, [x],
                            out_shape, r)


# ---------------------------------------------------------------------------------------------
# a small CNN end to end, jit and the graphs
# ---------------------------------------------------------------------------------------------

def _cnn_params(r, dtype=np.float32):
    return dict(w1=_randn(r, (6, 2, 3, 3), dtype) * 0.3, b1=_randn(r, (6,), dtype) * 0.1,
                w2=_randn(r, (6 * 4 * 4, 5), dtype) * 0.1, b2=_randn(r, (5,), dtype) * 0.1)


def _cnn_loss(p, x, onehot, act=avalon.relu):
    h = act(avalon.conv2d(x, p["w1"], p["b1"], padding=1))
    h = avalon.max_pool2d(h, 2)
    h = avalon.reshape(h, (x.shape[0], -1))
    logits = avalon.add(avalon.matmul(h, p["w2"]), p["b2"])
    return avalon.mean(avalon.neg(avalon.sum(avalon.log_softmax(logits, -1) * onehot, -1)))


def _torch_cnn_loss(p, x, onehot):
    h = F.max_pool2d(torch.relu(F.conv2d(x, p["w1"], p["b1"], padding=1)), 2)
    logits = h.reshape(x.shape[0], -1) @ p["w2"] + p["b2"]
    return (-(torch.log_softmax(logits, -1) * onehot).sum(-1)).mean()


def test_small_cnn_grads_match_torch():
    r = _rng("cnn")
    p = _cnn_params(r)
    x = _randn(r, (4, 2, 8, 8), np.float32)
    onehot = np.eye(5, dtype=np.float32)[r.integers(0, 5, 4)]
    loss, (gp, gx, _) = avalon.grad(_cnn_loss, p, x, onehot)
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    tx = torch.tensor(x, requires_grad=True)
    tloss = _torch_cnn_loss(tp, tx, torch.tensor(onehot))
    tloss.backward()
    np.testing.assert_allclose(loss, tloss.item(), **F32)
    np.testing.assert_allclose(gx, tx.grad.numpy(), **F32)
    for k in p:
        np.testing.assert_allclose(gp[k], tp[k].grad.numpy(), **F32, err_msg=k)
    # eager evaluation gives the same loss
    np.testing.assert_allclose(_cnn_loss(p, x, onehot), loss, **F32)


@pytest.mark.parametrize("act", [pytest.param(avalon.relu, id="relu"),
                                 pytest.param(lambda h: avalon.maximum(h, 0.0), id="maximum")])
def test_small_cnn_finite_differences(act):
    r = _rng("cnn-fd")
    p = _cnn_params(r, np.float64)
    x = _randn(r, (2, 2, 8, 8))
    onehot = np.eye(5)[r.integers(0, 5, 2)]
    names = sorted(p)
    fn = lambda *ws: _cnn_loss(dict(zip(names, ws)), x, onehot, act)  # noqa: E731
    check_finite_differences(fn, [p[k] for k in names], r, n_coords=10, rtol=1e-5, atol=1e-8)


def test_jit_equals_eager():
    r = _rng("jit")
    x = _randn(r, (2, 4, 9, 8), np.float32)
    w, b = _randn(r, (6, 2, 3, 3), np.float32), _randn(r, (6,), np.float32)
    wt = _randn(r, (6, 3, 2, 2), np.float32)

    x1, w1 = _randn(r, (4, 9), np.float32), _randn(r, (6, 2, 3), np.float32)

    def f(x, w, b, wt, x1, w1):
        h = avalon.relu(avalon.conv2d(x, w, b, stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2))
        t = avalon.conv_transpose2d(h, wt, stride=2, output_padding=1)
        return (avalon.max_pool2d(h, 3, 2, 1), avalon.avg_pool2d(t, 2, count_include_pad=False, padding=1),
                avalon.adaptive_avg_pool2d(h, 1), avalon.conv1d(x1, w1, padding="same", groups=2))

    jf = avalon.jit(f)
    for got, want in zip(jf(x, w, b, wt, x1, w1), f(x, w, b, wt, x1, w1)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    jcnn = avalon.jit(_cnn_loss)
    p = _cnn_params(r)
    xs = _randn(r, (3, 2, 8, 8), np.float32)
    onehot = np.eye(5, dtype=np.float32)[[0, 3, 1]]
    np.testing.assert_allclose(jcnn(p, xs, onehot), _cnn_loss(p, xs, onehot), rtol=1e-6)


def test_graphs_check_and_name_the_primitives():
    r = _rng("graph")
    x, w = _randn(r, (2, 4, 6, 6), np.float32), _randn(r, (4, 2, 3, 3), np.float32)
    wt = _randn(r, (4, 2, 2, 2), np.float32)

    def f(x, w, wt):
        h = avalon.conv2d(x, w, padding="same", groups=2)
        h = avalon.conv_transpose2d(avalon.max_pool2d(h, 2), wt, stride=2)
        return avalon.avg_pool2d(h, 2, 1).sum()

    g = avalon.trace(f, x, w, wt).check()
    assert {"conv", "conv_transpose", "max_pool", "avg_pool"} <= {n.op for n in g.nodes}
    gg = grad_graph(g, [True, True, True]).check()
    assert {"conv_input_grad", "conv_weight_grad", "max_pool_grad", "avg_pool_grad"} <= {n.op for n in gg.nodes}


# ---------------------------------------------------------------------------------------------
# error messages
# ---------------------------------------------------------------------------------------------

def _z(*shape, dtype=np.float32):
    return np.zeros(shape, dtype)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: avalon.conv2d(_z(3, 8), _z(4, 3, 3, 3)), avalon.ShapeError,
     r"conv2d: expected a 4-D input \(N, C, H, W\) \(or a 3-D unbatched one without N\), got shape \(3, 8\)"),
    (lambda: avalon.conv2d(_z(1, 3, 8, 8), _z(4, 3, 3)), avalon.ShapeError,
     r"conv2d: expected a 4-D weight .* got shape \(4, 3, 3\)"),
    (lambda: avalon.conv2d(_z(2, 3, 8, 8), _z(16, 1, 3, 3)), avalon.ShapeError,
     r"conv2d: input has 3 channels but weight \(16, 1, 3, 3\) expects 1 \(in_channels/groups = 1"),
    (lambda: avalon.conv2d(_z(2, 4, 8, 8), _z(16, 1, 3, 3), groups=2), avalon.ShapeError,
     r"conv2d: input has 4 channels but weight \(16, 1, 3, 3\) expects 2 \(in_channels/groups = 1, groups = 2"),
    (lambda: avalon.conv2d(_z(2, 4, 8, 8), _z(5, 2, 3, 3), groups=2), avalon.ShapeError,
     r"conv2d: weight \(5, 2, 3, 3\) has 5 output channels, which is not divisible by groups = 2"),
    (lambda: avalon.conv2d(_z(1, 1, 4, 4), _z(1, 1, 5, 5)), avalon.ShapeError,
     r"conv2d: kernel \(5, 5\) of extent \(5, 5\) is larger than the padded input \(4, 4\)"),
    (lambda: avalon.conv1d(_z(1, 1, 6), _z(1, 1, 3), dilation=3), avalon.ShapeError,
     r"conv1d: kernel \(3,\) dilated by \(3,\) to extent \(7,\) is larger than the padded input \(6,\)"),
    (lambda: avalon.conv2d(_z(1, 3, 8, 8), _z(4, 3, 3, 3, dtype=np.float64)), avalon.DtypeError,
     r"conv2d: input is float32 but weight is float64; cast"),
    (lambda: avalon.conv2d(_z(1, 3, 8, 8, dtype=np.int64), _z(4, 3, 3, 3)), avalon.DtypeError,
     r"conv2d: input has dtype int64, but it needs floating-point"),
    (lambda: avalon.conv2d(_z(1, 3, 8, 8), _z(4, 3, 3, 3), _z(3)), avalon.ShapeError,
     r"conv2d: bias must have shape \(4,\)"),
    (lambda: avalon.conv2d(_z(1, 3, 8, 8), _z(4, 3, 3, 3), padding="same", stride=2), avalon.ShapeError,
     r"conv2d: padding='same' needs stride 1"),
    (lambda: avalon.conv2d(_z(1, 3, 8, 8), _z(4, 3, 3, 3), stride=(1, 2, 3)), avalon.ShapeError,
     r"conv2d: stride must be an int or a tuple of 2 ints"),
    (lambda: avalon.conv3d(_z(3, 8, 8), _z(4, 3, 3, 3, 3)), avalon.ShapeError,
     r"conv3d: expected a 5-D input \(N, C, D, H, W\)"),
    (lambda: avalon.conv_transpose2d(_z(1, 3, 4, 4), _z(4, 2, 3, 3)), avalon.ShapeError,
     r"conv_transpose2d: input has 3 channels but weight \(4, 2, 3, 3\) expects 4 \(the weight layout of a "
     r"transposed convolution is \(in_channels, out_channels/groups"),
    (lambda: avalon.conv_transpose2d(_z(1, 4, 4, 4), _z(4, 2, 3, 3), stride=2, output_padding=2),
     avalon.ShapeError, r"conv_transpose2d: output_padding \(2, 2\) must be smaller than stride \(2, 2\)"),
    (lambda: avalon.max_pool2d(_z(1, 1, 6, 6), 2, padding=2), avalon.ShapeError,
     r"max_pool2d: padding \(2, 2\) must be at most half the kernel_size \(2, 2\)"),
    (lambda: avalon.max_pool2d(_z(1, 1, 3, 3), 4), avalon.ShapeError,
     r"max_pool2d: pooling window \(4, 4\) of extent \(4, 4\) is larger than the padded input \(3, 3\)"),
    (lambda: avalon.max_pool2d(_z(1, 1, 6, 6), 2, ceil_mode=True), avalon.ShapeError,
     r"max_pool2d: ceil_mode=True is not supported"),
    (lambda: avalon.max_pool1d(_z(6), 2), avalon.ShapeError,
     r"max_pool1d: expected a 3-D input \(N, C, L\)"),
    (lambda: avalon.avg_pool2d(_z(1, 1, 6, 6, dtype=np.int64), 2), avalon.DtypeError,
     r"avg_pool2d: input has dtype int64, but it needs floating-point"),
    (lambda: avalon.adaptive_avg_pool2d(_z(1, 3, 7, 7), 2), avalon.ShapeError,
     r"adaptive_avg_pool2d: the input's spatial size \(7, 7\) is not divisible by output_size \(2, 2\)"),
    (lambda: bind(nn_ops.conv_p, (_z(1, 3, 8, 8), _z(4, 2, 3, 3)),
                  dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)), avalon.ShapeError,
     r"conv: input has 3 channels but weight \(4, 2, 3, 3\) expects 2"),
])
def test_error_messages(call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call()
    assert "test_ops_nn.py" in str(info.value)   # points at the caller's line


def test_errors_while_tracing_point_at_the_user_line():
    x, w = _z(2, 3, 8, 8), _z(16, 1, 3, 3)
    with pytest.raises(avalon.ShapeError, match=r"conv2d: input has 3 channels .*\(at .*test_ops_nn.py:\d+\)"):
        avalon.jit(lambda x, w: avalon.conv2d(x, w))(x, w)
    with pytest.raises(avalon.ShapeError, match=r"max_pool2d: pooling window"):
        avalon.grad(lambda x: avalon.max_pool2d(x, 9).sum(), x)
