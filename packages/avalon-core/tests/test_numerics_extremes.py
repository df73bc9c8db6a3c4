"""Numerics at the extremes, against PyTorch: large and infinite logits
(log_softmax, logsumexp, softmax, cross_entropy), the tails of sigmoid,
log_sigmoid and softplus, and binary cross entropy at probabilities exactly 0
and 1 and at large logits.  Values eagerly and under avalon.jit, gradients
under avalon.grad (the compiled path, through every pass), in float32 and
float64.  Where torch gives inf or nan, so must Avalon, in the same entries."""
import contextlib
import warnings

import numpy as np
import pytest

import avalon

torch = pytest.importorskip("torch")

DTYPES = [np.float32, np.float64]
INF = np.inf


def _tol(dtype):
    # the finite entries agree to a few ulps; below the smallest normal number
    # torch's vectorized kernels may flush what NumPy keeps as a subnormal
    return dict(rtol=2e-6 if dtype == np.float32 else 1e-12, atol=float(np.finfo(dtype).tiny))


def assert_like_torch(got, want, dtype, what):
    """Same dtype and shape, inf and nan in the same entries, finite entries close."""
    got = np.asarray(got)
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (what, got.dtype, got.shape, want.shape)
    np.testing.assert_allclose(got, want, err_msg=what, **_tol(dtype))


@contextlib.contextmanager
def _warnings_as_errors(*arrays):
    """Finite inputs must not make the kernels warn (overflow in exp, log of 0);
    infinite ones may, where NumPy's nan-producing ufuncs say so."""
    with warnings.catch_warnings():
        finite = all(np.all(np.isfinite(a)) for a in arrays)
        warnings.simplefilter("error" if finite else "ignore", RuntimeWarning)
        yield


def check_fn(fn, torch_fn, x, dtype, cotangent=None):
    """fn eagerly and under jit against torch_fn; its gradient under avalon.grad
    against torch's backward of sum(out * cotangent)."""
    x = np.asarray(x, dtype)
    tx = torch.tensor(x, requires_grad=True)
    want = torch_fn(tx)
    ct = np.ones(want.shape, dtype) if cotangent is None else np.asarray(cotangent, dtype)
    (want * torch.tensor(ct)).sum().backward()
    with _warnings_as_errors(x):
        assert_like_torch(fn(x), want, dtype, "eager")
        assert_like_torch(avalon.jit(fn)(x), want, dtype, "jit")
        _, (g, _) = avalon.grad(lambda a, c: avalon.sum(fn(a) * c), x, ct, argnums=0)
    assert_like_torch(g, tx.grad, dtype, "grad")


# -- log_softmax, logsumexp, softmax at large and infinite logits ------------------------------------

LARGE_ROWS = [[1e7, 1e7], [1e4, 1e4 + 1], [-1e7, -1e7], [3e4, -3e4], [1e7, 1e7 - 1]]
INF_ROWS = [[-INF, 1.0, 2.0], [-INF, -INF, 0.0], [INF, 1.0, 2.0], [INF, INF, 0.0], [-INF, -INF, -INF],
            [INF, -INF, 0.0]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_keeps_log2_at_huge_logits(dtype):
    out = avalon.log_softmax(np.array([[1e7, 1e7]], dtype))
    np.testing.assert_allclose(out, [[-0.6931472, -0.6931472]], rtol=1e-6)
    check_fn(lambda x: avalon.log_softmax(x, -1), lambda t: torch.log_softmax(t, -1), LARGE_ROWS, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_with_infinite_logits(dtype):
    for row in INF_ROWS:
        check_fn(lambda x: avalon.log_softmax(x, -1), lambda t: torch.log_softmax(t, -1), [row], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_over_axis0_with_infinite_logits(dtype):
    x = np.array(INF_ROWS[:2], dtype).T  # the class axis first
    check_fn(lambda a: avalon.log_softmax(a, 0), lambda t: torch.log_softmax(t, 0), x, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_at_huge_logits(dtype):
    x = np.array(LARGE_ROWS, dtype)
    want = torch.logsumexp(torch.tensor(x), -1)
    assert_like_torch(avalon.logsumexp(x, -1), want, dtype, "eager")
    assert_like_torch(avalon.jit(lambda a: avalon.logsumexp(a, -1))(x), want, dtype, "jit")
    # the gradient is softmax(x).  torch's backward, exp(x - logsumexp(x)), reads the
    # rounded result: at 1e7 in float32 that is off by up to half an ulp (0.5), so its
    # gradient is not a distribution; compare with the softmax of the shifted logits
    _, (g,) = avalon.grad(lambda a: avalon.sum(avalon.logsumexp(a, -1)), x)
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    np.testing.assert_allclose(g, e / e.sum(-1, keepdims=True), **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row", INF_ROWS, ids=lambda r: "_".join(map(str, r)))
def test_logsumexp_with_infinite_entries(dtype, row):
    check_fn(lambda x: avalon.logsumexp(x, -1), lambda t: torch.logsumexp(t, -1), [row], dtype)


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # log(0) = -inf
@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_of_only_minus_infinity_is_minus_infinity(dtype):
    assert avalon.logsumexp(np.array([-INF, -INF], dtype)) == -INF
    out = avalon.logsumexp(np.array([[-INF, -INF], [0.0, 0.0]], dtype), axis=1, keepdims=True)
    np.testing.assert_allclose(out, [[-INF], [np.log(2.0)]], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_with_infinite_logits(dtype):
    for row in INF_ROWS + LARGE_ROWS[:1]:
        check_fn(lambda x: avalon.softmax(x, -1), lambda t: torch.softmax(t, -1), [row], dtype,
                 cotangent=[np.arange(1.0, len(row) + 1)])


# -- sigmoid, log_sigmoid, softplus in their tails ----------------------------------------------------

TAILS = [-800.0, -100.0, -30.0, -20.0, -1.0, 0.0, 1.0, 20.0, 30.0, 100.0, 800.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_tails(dtype):
    assert avalon.sigmoid(np.array(-20.0, np.float32)) == pytest.approx(2.0611537e-9, rel=1e-6)
    assert avalon.sigmoid(np.array(-100.0, np.float64)) == pytest.approx(3.720075976020836e-44, rel=1e-12)
    check_fn(avalon.sigmoid, torch.sigmoid, TAILS, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_of_infinities(dtype):
    check_fn(avalon.sigmoid, torch.sigmoid, [-INF, INF], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_in_a_fused_chain(dtype):
    # fused with its neighbours, the compiled kernel must stay exact in the tail too
    check_fn(lambda x: avalon.sigmoid(x * 2.0) + 0.0 * x, lambda t: torch.sigmoid(t * 2.0) + 0.0 * t,
             [-50.0, -10.0, 0.5, 10.0], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_sigmoid_tails(dtype):
    check_fn(avalon.log_sigmoid, torch.nn.functional.logsigmoid, TAILS, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softplus_tails(dtype):
    check_fn(avalon.softplus, torch.nn.functional.softplus, TAILS, dtype)
    check_fn(lambda x: avalon.softplus(x, beta=2.0, threshold=10.0),
             lambda t: torch.nn.functional.softplus(t, beta=2.0, threshold=10.0), TAILS, dtype)


# -- binary cross entropy ---------------------------------------------------------------------------

def _bce_points(dtype):
    tiny = 1e-45 if dtype == np.float32 else 1e-300
    x = np.array([0.0, 0.0, 1.0, 1.0, 0.5, 1e-30, 1 - 1e-7, tiny, 0.3], dtype)
    t = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.25], dtype)
    return x, t


def _check_bce(fn, torch_fn, x, t, dtype, input_grad=None):
    """Values (eager, jit) and the gradients for input and target (avalon.grad)
    against torch; `input_grad` replaces torch's input gradient as the reference.
    The points include a denormal input, so the compiled calls keep IEEE denormals
    (as torch computes) instead of flushing them."""
    tx, tt = torch.tensor(x, requires_grad=True), torch.tensor(t, requires_grad=True)
    want = torch_fn(tx, tt)
    want.sum().backward()
    with _warnings_as_errors(x, t):
        assert_like_torch(fn(x, t), want, dtype, "eager")
        assert_like_torch(avalon.jit(fn, flush_denormals=False)(x, t), want, dtype, "jit")
        _, (gx, gt) = avalon.grad(lambda a, b: avalon.sum(fn(a, b)), x, t, flush_denormals=False)
    assert_like_torch(gx, tx.grad if input_grad is None else input_grad, dtype, "grad of input")
    assert_like_torch(gt, tt.grad, dtype, "grad of target")


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_cross_entropy_at_0_and_1_matches_torch(dtype):
    # torch clamps each log to >= -100 and its backward divides by max(x (1 - x), 1e-12):
    # at x = 0, t = 1 the gradient is -1e12, not 0
    x, t = _bce_points(dtype)
    _check_bce(avalon.binary_cross_entropy,
               lambda a, b: torch.nn.functional.binary_cross_entropy(a, b, reduction="none"), x, t, dtype)
    _, (gx, _) = avalon.grad(lambda a, b: avalon.sum(avalon.binary_cross_entropy(a, b)),
                             np.array([0.0, 1.0], dtype), np.array([1.0, 0.0], dtype))
    np.testing.assert_allclose(gx, [-1e12, 1e12], rtol=1e-6)


# the target's gradient sums inf (at x = 0) and -inf (at x = 1) to nan, as in torch
@pytest.mark.filterwarnings("ignore:invalid value encountered in reduce:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_cross_entropy_broadcasts_and_scales_its_gradient(dtype):
    x = np.array([[0.0, 0.25, 1.0]], dtype)
    t = np.array([[1.0], [0.0]], dtype)
    tx, tt = torch.tensor(x, requires_grad=True), torch.tensor(t, requires_grad=True)
    c = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype)
    want = torch.nn.functional.binary_cross_entropy(tx.expand(2, 3), tt.expand(2, 3), reduction="none")
    (want * torch.tensor(c)).sum().backward()
    _, (gx, gt, _) = avalon.grad(lambda a, b, w: avalon.sum(avalon.binary_cross_entropy(a, b) * w), x, t, c)
    assert_like_torch(gx, tx.grad, dtype, "grad of input")
    assert_like_torch(gt, tt.grad, dtype, "grad of target")


# -- the losses of avalon-layers built on these ops ---------------------------------------------------

@pytest.fixture
def F():
    pytest.importorskip("avalon_layers")
    import avalon.nn.functional as F
    return F


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_at_huge_logits(F, dtype):
    logits = np.array([[1e7, 1e7], [1e4, 1e4 + 1], [-3e4, 3e4], [1e7, -INF]], dtype)
    y = np.array([0, 1, 0, 0])
    assert F.cross_entropy(logits[:1], y[:1]) == pytest.approx(0.6931472, rel=1e-6)
    tl = torch.tensor(logits, requires_grad=True)
    want = torch.nn.functional.cross_entropy(tl, torch.tensor(y))
    want.backward()
    assert_like_torch(F.cross_entropy(logits, y), want, dtype, "eager")
    loss, (g, _) = avalon.grad(lambda a, b: F.cross_entropy(a, b), logits, y)
    assert_like_torch(loss, want, dtype, "grad's loss")
    assert_like_torch(g, tl.grad, dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_with_a_minus_infinity_logit(F, dtype):
    # a class masked out with -inf: finite loss unless the label is that class
    logits = np.array([[-INF, 1.0, 2.0], [-INF, 1.0, 2.0]], dtype)
    for y in (np.array([1, 2]), np.array([0, 2])):
        tl = torch.tensor(logits, requires_grad=True)
        want = torch.nn.functional.cross_entropy(tl, torch.tensor(y), reduction="none")
        want.sum().backward()
        assert_like_torch(F.cross_entropy(logits, y, reduction="none"), want, dtype, "eager")
        _, (g, _) = avalon.grad(lambda a, b: avalon.sum(F.cross_entropy(a, b, reduction="none")), logits, y)
        assert_like_torch(g, tl.grad, dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_functional_binary_cross_entropy_at_0_and_1(F, dtype, reduction):
    x, t = _bce_points(dtype)
    w = np.linspace(0.5, 2.0, x.size).astype(dtype)
    _check_bce(lambda a, b: F.binary_cross_entropy(a, b, weight=w, reduction=reduction),
               lambda a, b: torch.nn.functional.binary_cross_entropy(a, b, weight=torch.tensor(w),
                                                                      reduction=reduction), x, t, dtype)


LOGITS = np.array([-1e4, -100.0, -30.0, -20.0, 0.0, 20.0, 30.0, 100.0, 1e4, -30.0, 30.0, 2.0])
LOGIT_TARGETS = np.array([1.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.0, 0.25, 0.75, 1.0])


def _expit(z):
    """sigmoid in float64 without cancellation in either tail."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _softplus(z):
    return np.maximum(z, 0.0) + np.log1p(np.exp(-np.abs(z)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_weight", [None, 3.0])
def test_binary_cross_entropy_with_logits_at_large_logits(F, dtype, pos_weight):
    # torch computes (1 - t) z - pw' log_sigmoid(z) and its gradient as sigmoid(z) - t:
    # both cancel in a tail (at z = -30, t = 0 the float64 loss is 1.3% off, in float32
    # it is 0 instead of 9e-14; at z = 30, t = 1 the float64 gradient is 1e-3 off).
    # The reference is the exact loss (1 - t) softplus(z) + pw t softplus(-z) and its
    # gradient (1 - t) sigmoid(z) - pw t sigmoid(-z); torch agrees up to its cancellation
    z, t = LOGITS.astype(dtype), LOGIT_TARGETS.astype(dtype)
    pw = 1.0 if pos_weight is None else pos_weight
    pw_arg = None if pos_weight is None else np.full(z.shape, pos_weight, dtype)
    exact = (1 - LOGIT_TARGETS) * _softplus(LOGITS) + pw * LOGIT_TARGETS * _softplus(-LOGITS)
    exact_grad = (1 - LOGIT_TARGETS) * _expit(LOGITS) - pw * LOGIT_TARGETS * _expit(-LOGITS)

    def fn(a, b):
        return F.binary_cross_entropy_with_logits(a, b, pos_weight=pw_arg, reduction="none")
    tz, tt = torch.tensor(z, requires_grad=True), torch.tensor(t, requires_grad=True)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        tz, tt, pos_weight=None if pw_arg is None else torch.tensor(pw_arg), reduction="none")
    want.sum().backward()
    with _warnings_as_errors(z, t):
        got, jitted = fn(z, t), avalon.jit(fn)(z, t)
        _, (gz, gt) = avalon.grad(lambda a, b: avalon.sum(fn(a, b)), z, t)
    for what, value in (("eager", got), ("jit", jitted)):
        assert_like_torch(value, exact.astype(dtype), dtype, what)
        np.testing.assert_allclose(value, want.detach().numpy(), rtol=1e-6, atol=1e-8, err_msg=what)
    assert_like_torch(gz, exact_grad.astype(dtype), dtype, "grad of input")
    np.testing.assert_allclose(gz, tz.grad.numpy(), rtol=1e-6, atol=1e-8)
    assert_like_torch(gt, tt.grad, dtype, "grad of target")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pos_weight", [None, 3.0])
def test_binary_cross_entropy_with_logits_at_infinite_logits(F, dtype, pos_weight):
    z = np.array([INF, INF, INF, -INF, -INF, -INF], dtype)
    t = np.array([0.0, 0.5, 1.0, 0.0, 0.5, 1.0], dtype)
    pw_arg = None if pos_weight is None else np.full(z.shape, pos_weight, dtype)

    def fn(a, b):
        return F.binary_cross_entropy_with_logits(a, b, pos_weight=pw_arg, reduction="none")
    tz, tt = torch.tensor(z, requires_grad=True), torch.tensor(t, requires_grad=True)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        tz, tt, pos_weight=None if pw_arg is None else torch.tensor(pw_arg), reduction="none")
    want.sum().backward()
    # as torch: inf where the label is wrong, nan for 0 * inf at a saturated right label;
    # where torch computes 0 * -inf = nan at z = -inf, t > 0 the loss is its limit, inf
    expect = np.array([INF, INF, np.nan, np.nan, INF, INF], dtype)
    torch_expect = np.array([INF, INF, np.nan, np.nan, np.nan, np.nan], dtype)
    np.testing.assert_array_equal(want.detach().numpy(), torch_expect)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        np.testing.assert_array_equal(fn(z, t), expect)
        np.testing.assert_array_equal(avalon.jit(fn)(z, t), expect)
        _, (gz, gt) = avalon.grad(lambda a, b: avalon.sum(fn(a, b)), z, t)
    assert_like_torch(gz, tz.grad, dtype, "grad of input")
    assert_like_torch(gt, tt.grad, dtype, "grad of target")


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_cross_entropy_with_logits_gradient_in_the_tails_is_exact(F, dtype):
    # the gradient is sigmoid(z) - t: 2e-9 at z = -20, t = 0, not 1 - (1 - 2e-9) = 0
    z = np.array([-20.0, -30.0, 20.0], dtype)
    t = np.array([0.0, 0.0, 1.0], dtype)
    _, (g, _) = avalon.grad(lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction="sum"), z, t)
    expect = [2.0611536e-09, 9.357623e-14, -2.0611536e-09]
    np.testing.assert_allclose(g, expect, rtol=1e-5)
