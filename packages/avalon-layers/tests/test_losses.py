"""Losses match PyTorch: forward values (eager and traced) and gradients with
respect to the input, for every reduction and option; bad shapes and dtypes
raise errors that name the loss and the shapes."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import avalon
import avalon.nn as nn
import avalon.nn.functional as F
from avalon_layers.registry import LEVELS, ExperimentalWarning

RTOL, ATOL = 1e-5, 1e-6
REDUCTIONS = ("mean", "sum", "none")

pytestmark = pytest.mark.filterwarnings("ignore::avalon_layers.registry.ExperimentalWarning")


def _t(a, grad=False):
    t = torch.tensor(np.asarray(a))
    return t.requires_grad_(True) if grad else t


def _scalarize(out, ct):
    """A scalar from a loss of any shape, for gradients of 'none' reductions."""
    return out if ct is None else (out * ct).sum()


def check(av_fn, torch_fn, x, *rest, rtol=RTOL, atol=ATOL):
    """Forward (eager and under avalon.grad) and d/dx agree with PyTorch."""
    xt = _t(x, grad=True)
    expect = torch_fn(xt, *[_t(r) if isinstance(r, np.ndarray) else r for r in rest])
    eager = av_fn(x, *rest)
    np.testing.assert_allclose(np.asarray(eager), expect.detach().numpy(), rtol=rtol, atol=atol)
    ct = None if expect.dim() == 0 else np.random.default_rng(7).standard_normal(expect.shape).astype(np.float32)
    _scalarize(expect, None if ct is None else torch.tensor(ct)).backward()
    loss, grads = avalon.grad(lambda x, *r: _scalarize(av_fn(x, *r), ct), x, *rest)
    np.testing.assert_allclose(loss, _scalarize(expect, None if ct is None else torch.tensor(ct)).item(),
                               rtol=rtol, atol=atol)
    np.testing.assert_allclose(grads[0], xt.grad.numpy(), rtol=rtol, atol=atol)
    return grads


def _rng(seed=0):
    return np.random.default_rng(seed)


def _logits(shape, seed=0):
    return _rng(seed).standard_normal(shape).astype(np.float32)


def _labels(shape, c, seed=1, ignore=None):
    y = _rng(seed).integers(0, c, size=shape).astype(np.int64)
    if ignore is not None:
        y.flat[::3] = ignore
    return y


CLASS_SHAPES = [((6, 4), (6,)), ((3, 4, 5), (3, 5)), ((2, 3, 4, 2), (2, 4, 2)), ((5,), ())]


# -- nll_loss and cross_entropy -----------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", CLASS_SHAPES, ids=str)
def test_nll_loss_matches_torch(shapes, reduction):
    xs, ys = shapes
    c = xs[0] if len(xs) == 1 else xs[1]
    logp = np.asarray(TF.log_softmax(_t(_logits(xs)), dim=0 if len(xs) == 1 else 1))
    y = _labels(ys, c)
    check(lambda x, y: F.nll_loss(x, y, reduction=reduction),
          lambda x, y: TF.nll_loss(x, y, reduction=reduction), logp, y)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [-100, 1])
def test_nll_loss_weight_and_ignore_index(reduction, ignore_index):
    logp = np.asarray(TF.log_softmax(_t(_logits((7, 3, 2))), dim=1))
    y = _labels((7, 2), 3, ignore=ignore_index)
    w = np.array([0.2, 1.5, 0.7], np.float32)
    check(lambda x, y: F.nll_loss(x, y, weight=w, ignore_index=ignore_index, reduction=reduction),
          lambda x, y: TF.nll_loss(x, y, weight=_t(w), ignore_index=ignore_index, reduction=reduction), logp, y)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shapes", CLASS_SHAPES, ids=str)
def test_cross_entropy_matches_torch(shapes, reduction):
    xs, ys = shapes
    c = xs[0] if len(xs) == 1 else xs[1]
    check(lambda x, y: F.cross_entropy(x, y, reduction=reduction),
          lambda x, y: TF.cross_entropy(x, y, reduction=reduction), _logits(xs), _labels(ys, c))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_weight_ignore_smoothing(reduction, weighted, smoothing):
    x, y = _logits((8, 4, 3)), _labels((8, 3), 4, ignore=-100)
    w = np.array([0.5, 2.0, 1.0, 0.25], np.float32) if weighted else None
    check(lambda x, y: F.cross_entropy(x, y, weight=w, reduction=reduction, label_smoothing=smoothing),
          lambda x, y: TF.cross_entropy(x, y, weight=None if w is None else _t(w), reduction=reduction,
                                        label_smoothing=smoothing), x, y)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4), (3,)], ids=str)
def test_cross_entropy_probability_targets(shape, reduction, weighted, smoothing):
    axis = 0 if len(shape) == 1 else 1
    p = np.asarray(TF.softmax(_t(_logits(shape, seed=3)), dim=axis))
    c = shape[axis]
    w = np.linspace(0.5, 1.5, c).astype(np.float32) if weighted else None
    check(lambda x, p: F.cross_entropy(x, p, weight=w, reduction=reduction, label_smoothing=smoothing),
          lambda x, p: TF.cross_entropy(x, p, weight=None if w is None else _t(w), reduction=reduction,
                                        label_smoothing=smoothing), _logits(shape), p)


def test_cross_entropy_all_ignored_mean_is_nan_as_torch():
    x, y = _logits((3, 4)), np.full(3, -100)
    expect = TF.cross_entropy(_t(x), _t(y)).item()
    with np.errstate(invalid="ignore"):
        got = float(F.cross_entropy(x, y))
    assert np.isnan(expect) and np.isnan(got)


def test_cross_entropy_traces_once_for_new_labels():
    x = _logits((6, 5))
    gf = avalon.value_and_grad(lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1))
    for seed in range(3):
        y = _labels((6,), 5, seed=seed)
        loss, (gx, gy) = gf(x, y)
        xt = _t(x, grad=True)
        TF.cross_entropy(xt, _t(y), label_smoothing=0.1).backward()
        np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=RTOL, atol=ATOL)
        assert gy is None
    assert gf.traces == 1


# -- regression losses ------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["mse_loss", "l1_loss"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_and_l1_match_torch(name, reduction, weighted):
    x, t = _logits((4, 5)), _logits((4, 5), seed=9)
    w = _rng(4).uniform(0.1, 2.0, (4, 5)).astype(np.float32) if weighted else None
    check(lambda x, t: getattr(F, name)(x, t, reduction=reduction, weight=w),
          lambda x, t: getattr(TF, name)(x, t, reduction=reduction, weight=None if w is None else _t(w)), x, t)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_smooth_l1_matches_torch(reduction, beta):
    x, t = 2 * _logits((6, 3)), _logits((6, 3), seed=5)
    check(lambda x, t: F.smooth_l1_loss(x, t, reduction=reduction, beta=beta),
          lambda x, t: TF.smooth_l1_loss(x, t, reduction=reduction, beta=beta), x, t)


def test_mse_broadcast_warns_like_torch():
    x, t = _logits((4, 1)), _logits((4,), seed=2)
    with pytest.warns(UserWarning, match=r"mse_loss: using a target of shape \(4,\).*\(4, 1\)") as record:
        got = F.mse_loss(x, t)
    assert record[0].filename == __file__  # the warning points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expect = TF.mse_loss(_t(x), _t(t)).item()
    np.testing.assert_allclose(got, expect, rtol=RTOL)


def test_float64_target_follows_the_input_dtype():
    x, t = _logits((3, 2)), _logits((3, 2), seed=1).astype(np.float64)
    out = F.mse_loss(x, t)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.mean((x - t.astype(np.float32)) ** 2), rtol=RTOL)


# -- binary cross entropy ------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_binary_cross_entropy_matches_torch(reduction, weighted):
    x = _rng(0).uniform(0.02, 0.98, (5, 3)).astype(np.float32)
    t = _rng(1).uniform(0, 1, (5, 3)).astype(np.float32)
    w = _rng(2).uniform(0.5, 2, (3,)).astype(np.float32) if weighted else None
    check(lambda x, t: F.binary_cross_entropy(x, t, weight=w, reduction=reduction),
          lambda x, t: TF.binary_cross_entropy(x, t, weight=None if w is None else _t(w), reduction=reduction),
          x, t)


def test_binary_cross_entropy_clamps_log_like_torch():
    x = np.array([0.0, 1.0, 0.0, 1.0, 0.5], np.float32)
    t = np.array([0.0, 1.0, 1.0, 0.0, 1.0], np.float32)
    expect = TF.binary_cross_entropy(_t(x), _t(t), reduction="none").numpy()
    np.testing.assert_allclose(F.binary_cross_entropy(x, t, reduction="none"), expect, rtol=RTOL)
    assert expect[2] == pytest.approx(100.0)
    _, (g, _) = avalon.grad(lambda x, t: F.binary_cross_entropy(x, t), x, t)
    xt = _t(x, grad=True)
    TF.binary_cross_entropy(xt, _t(t)).backward()
    # at x = 0 or 1 too the gradient is torch's: (x - t) / max(x (1 - x), 1e-12)
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=RTOL)
    assert g[2] == pytest.approx(-1e12 / 5, rel=1e-6) and g[0] == 0.0


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pos_weighted", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_bce_with_logits_matches_torch(reduction, pos_weighted, weighted):
    x = 3 * _logits((6, 4))
    x[0, :2] = [60.0, -60.0]  # far in the tails: stable, no overflow
    t = (_rng(3).uniform(0, 1, (6, 4)) > 0.5).astype(np.float32)
    pw = _rng(4).uniform(0.5, 3, (4,)).astype(np.float32) if pos_weighted else None
    w = _rng(5).uniform(0.5, 2, (6, 1)).astype(np.float32) if weighted else None
    check(lambda x, t: F.binary_cross_entropy_with_logits(x, t, weight=w, reduction=reduction, pos_weight=pw),
          lambda x, t: TF.binary_cross_entropy_with_logits(x, t, weight=None if w is None else _t(w),
                                                           reduction=reduction,
                                                           pos_weight=None if pw is None else _t(pw)), x, t)


# -- kl_div --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS + ("batchmean",))
@pytest.mark.parametrize("log_target", [False, True])
def test_kl_div_matches_torch(reduction, log_target):
    logq = np.asarray(TF.log_softmax(_t(_logits((4, 5))), dim=1))
    p = np.asarray(TF.softmax(_t(_logits((4, 5), seed=8)), dim=1))
    p[0, 0] = 0.0  # 0 log 0 counts as 0
    target = np.log(p + 1e-30).astype(np.float32) if log_target else p
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        check(lambda x, t: F.kl_div(x, t, reduction=reduction, log_target=log_target),
              lambda x, t: TF.kl_div(x, t, reduction=reduction, log_target=log_target), logq, target)


def test_kl_div_mean_warns_like_torch():
    with pytest.warns(UserWarning, match="batchmean"):
        F.kl_div(_logits((2, 3)), np.full((2, 3), 1 / 3, np.float32))


# -- modules -----------------------------------------------------------------------------------------

MODULE_CASES = [
    ("NLLLoss", dict(weight=[1.0, 2.0, 0.5], ignore_index=2), "logp"),
    ("CrossEntropyLoss", dict(weight=[1.0, 2.0, 0.5], label_smoothing=0.1, reduction="sum"), "logits"),
    ("CrossEntropyLoss", dict(), "logits"),
    ("MSELoss", dict(reduction="none"), "regression"),
    ("L1Loss", dict(), "regression"),
    ("SmoothL1Loss", dict(beta=0.3), "regression"),
    ("BCELoss", dict(weight=[0.5, 1.0, 2.0]), "probs"),
    ("BCEWithLogitsLoss", dict(pos_weight=[2.0, 1.0, 0.5]), "binary_logits"),
    ("KLDivLoss", dict(reduction="batchmean", log_target=True), "kl"),
]


def _module_inputs(kind):
    x = _logits((6, 3))
    if kind == "logp":
        return np.asarray(TF.log_softmax(_t(x), dim=1)), _labels((6,), 3)
    if kind == "logits":
        return x, _labels((6,), 3, ignore=-100)
    if kind == "regression":
        return x, _logits((6, 3), seed=4)
    if kind == "probs":
        return np.asarray(torch.sigmoid(_t(x))), _rng(6).uniform(0, 1, (6, 3)).astype(np.float32)
    if kind == "binary_logits":
        return x, (_rng(6).uniform(0, 1, (6, 3)) > 0.5).astype(np.float32)
    return np.asarray(TF.log_softmax(_t(x), dim=1)), np.asarray(TF.log_softmax(_t(_logits((6, 3), 2)), dim=1))


@pytest.mark.parametrize("name, kwargs, kind", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_loss_modules_match_torch(name, kwargs, kind):
    x, y = _module_inputs(kind)
    tkw = {k: (torch.tensor(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
    akw = {k: (np.asarray(v, np.float32) if isinstance(v, list) else v) for k, v in kwargs.items()}
    ours, theirs = getattr(nn, name)(**akw), getattr(torch.nn, name)(**tkw)
    check(lambda x, y: ours(x, y), theirs, x, y)
    assert isinstance(ours, nn.Module)
    assert list(ours.named_parameters()) == []  # class weights are buffers, never trained
    assert repr(ours) == f"{name}()"


def test_loss_module_legacy_reduction_flags():
    with pytest.warns(UserWarning, match="reduction='sum'"):
        loss = nn.MSELoss(size_average=False)
    assert loss.reduction == "sum"


def test_loss_module_works_inside_a_model_under_grad():
    class Model:
        def __init__(self):
            self.w = _logits((4, 3))
            self.loss = nn.CrossEntropyLoss(weight=np.array([1.0, 2.0, 3.0], np.float32))

    m, x, y = Model(), _logits((5, 4), seed=3), _labels((5,), 3)
    loss, (gm, _, _) = avalon.grad(lambda m, x, y: m.loss(x @ m.w, y), m, x, y)
    wt = _t(m.w, grad=True)
    expect = torch.nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))(_t(x) @ wt, _t(y))
    expect.backward()
    np.testing.assert_allclose(loss, expect.item(), rtol=RTOL)
    np.testing.assert_allclose(gm.w, wt.grad.numpy(), rtol=RTOL, atol=ATOL)


# -- errors ----------------------------------------------------------------------------------------------

def test_class_target_shape_error_names_loss_and_shapes():
    with pytest.raises(avalon.ShapeError, match=r"cross_entropy: input of shape \(4, 3\) \(N, C\) needs a target "
                                                r"of class indices of shape \(4,\), got target of shape \(5,\)"):
        F.cross_entropy(_logits((4, 3)), np.zeros(5, np.int64))
    with pytest.raises(avalon.ShapeError, match=r"nll_loss: input of shape \(2, 3, 4\) \(N, C, d1, \.\.\.\) "
                                                r"needs .* shape \(2, 4\), got target of shape \(2, 3\)"):
        F.nll_loss(_logits((2, 3, 4)), np.zeros((2, 3), np.int64))


def test_shape_error_under_tracing_names_the_loss():
    with pytest.raises(avalon.ShapeError, match=r"nll_loss: input of shape \(4, 3\)"):
        avalon.grad(lambda x, y: F.nll_loss(x, y), _logits((4, 3)), np.zeros((4, 1), np.int64))


def test_float_class_target_is_a_dtype_error():
    with pytest.raises(avalon.DtypeError, match="nll_loss: target of class indices must be an integer array, "
                                                "got float32"):
        F.nll_loss(_logits((4, 3)), np.zeros(4, np.float32))


def test_out_of_range_label_is_reported():
    with pytest.raises(IndexError, match="cross_entropy: target 3 is out of bounds for 3 classes"):
        F.cross_entropy(_logits((2, 3)), np.array([0, 3]))
    with pytest.raises(IndexError, match="target -1 is out of bounds"):
        F.cross_entropy(_logits((2, 3)), np.array([0, -1]))


def test_weight_of_wrong_size():
    with pytest.raises(avalon.ShapeError, match=r"cross_entropy: weight of shape \(2,\) must have one entry per "
                                                r"class, shape \(3,\)"):
        F.cross_entropy(_logits((2, 3)), np.array([0, 1]), weight=np.ones(2, np.float32))


def test_binary_losses_need_equal_shapes():
    with pytest.raises(avalon.ShapeError, match=r"binary_cross_entropy_with_logits: target of shape \(4,\) must "
                                                r"have the input's shape \(4, 1\)"):
        F.binary_cross_entropy_with_logits(_logits((4, 1)), np.zeros(4, np.float32))
    with pytest.raises(avalon.ShapeError, match=r"binary_cross_entropy: target of shape \(3, 2\)"):
        F.binary_cross_entropy(np.full((2, 3), 0.5, np.float32), np.zeros((3, 2), np.float32))


def test_bce_rejects_values_outside_unit_interval():
    with pytest.raises(ValueError, match="binary_cross_entropy: all elements of input should be between 0 and 1"):
        F.binary_cross_entropy(np.array([1.5, 0.5], np.float32), np.zeros(2, np.float32))


def test_unknown_reduction_and_bad_options():
    with pytest.raises(ValueError, match="mse_loss: reduction must be one of 'mean', 'sum', 'none', got 'avg'"):
        F.mse_loss(_logits((2,)), _logits((2,)), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(_logits((2, 3)), np.array([0, 1]), label_smoothing=1.5)
    with pytest.raises(avalon.ShapeError, match="mse_loss: input of shape \\(2, 3\\) and target of shape \\(4,\\)"):
        F.mse_loss(_logits((2, 3)), _logits((4,)))


# -- exports ---------------------------------------------------------------------------------------------

def test_exports_and_stability_levels():
    stable = ["nll_loss", "cross_entropy", "mse_loss", "l1_loss", "binary_cross_entropy",
              "binary_cross_entropy_with_logits"]
    for name in stable:
        assert LEVELS[("functional", name)] == ("Losses", "stable")
    for name in ("smooth_l1_loss", "kl_div"):
        assert LEVELS[("functional", name)] == ("Losses", "experimental")
    for name in ("SmoothL1Loss", "KLDivLoss"):
        assert LEVELS[("nn", name)] == ("Losses", "experimental")
    for name in ("NLLLoss", "CrossEntropyLoss", "MSELoss", "L1Loss", "BCELoss", "BCEWithLogitsLoss"):
        assert LEVELS[("nn", name)] == ("Losses", "stable")
    assert F.nllloss is F.nll_loss and F.crossentropyloss is F.cross_entropy and F.mseloss is F.mse_loss


def test_experimental_loss_warns_once(monkeypatch):
    from avalon_layers import registry
    monkeypatch.setattr(registry, "_warned", set())
    with pytest.warns(ExperimentalWarning, match="avalon.nn.functional.smooth_l1_loss is experimental"):
        F.smooth_l1_loss(_logits((2,)), _logits((2,)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExperimentalWarning)
        F.smooth_l1_loss(_logits((2,)), _logits((2,)))
