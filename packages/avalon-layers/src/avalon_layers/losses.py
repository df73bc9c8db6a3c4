"""Loss functions (avalon.nn.functional.nll_loss, ...) and loss modules
(avalon.nn.CrossEntropyLoss, ...) with PyTorch's signatures and semantics.

Every loss is a composition of avalon ops, so it runs eagerly on arrays and
traces (and differentiates) inside avalon.grad / avalon.jit.  Class labels are
integer arrays; when traced they are ordinary int inputs of the graph, picked
with take_along_axis, so changing the labels never retraces.  `reduction` is
"mean", "sum" or "none" (kl_div also takes "batchmean").  Float targets follow
the input's dtype: they are data, not parameters.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np

import avalon
from avalon.errors import DtypeError, ShapeError, _is_internal
from avalon.primitive import Tracer

from .module import Module
from .registry import alias, export

_REDUCTIONS = ("mean", "sum", "none")


# -- helpers -----------------------------------------------------------------------

def _warn(message):
    """A UserWarning attributed to the first caller outside Avalon's packages."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is our caller
    while frame is not None and _is_internal(frame):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, UserWarning, stacklevel=level)


def _legacy_reduction(size_average, reduce, reduction):
    """PyTorch's deprecated size_average/reduce flags, mapped onto `reduction`."""
    if size_average is None and reduce is None:
        return reduction
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    out = ("mean" if size_average else "sum") if reduce else "none"
    _warn(f"size_average and reduce args will be deprecated, please use reduction='{out}' instead.")
    return out


def _check_reduction(name, reduction, allowed=_REDUCTIONS):
    if reduction not in allowed:
        raise ValueError(f"{name}: reduction must be one of {', '.join(map(repr, allowed))}, got {reduction!r}")


def _reduce(loss, reduction):
    if reduction == "none":
        return loss
    return avalon.sum(loss) if reduction == "sum" else avalon.mean(loss)


def _as_array(x):
    return x if isinstance(x, Tracer) or (hasattr(x, "shape") and hasattr(x, "dtype")) else np.asarray(x)


def _is_concrete(x) -> bool:
    return not isinstance(x, Tracer)


def _check_float(name, what, x):
    if np.dtype(x.dtype).kind != "f":
        raise DtypeError(f"{name}: {what} must be a floating-point array, got {np.dtype(x.dtype).name}")


def _float_like(name, what, x, input):
    """A float operand (target, weight) in the input's dtype."""
    x = _as_array(x)
    if np.dtype(x.dtype).kind not in "fiub":
        raise DtypeError(f"{name}: {what} must be numeric, got {np.dtype(x.dtype).name}")
    return avalon.cast(x, input.dtype)


def _shape(x):
    return tuple(x.shape)


def _same_shape(name, input, target):
    if _shape(input) != _shape(target):
        raise ShapeError(f"{name}: target of shape {_shape(target)} must have the input's shape "
                         f"{_shape(input)}")


def _warn_broadcast(name, input, target):
    """PyTorch warns (and broadcasts) when an elementwise loss gets differently shaped operands."""
    if _shape(input) != _shape(target):
        try:
            np.broadcast_shapes(_shape(input), _shape(target))
        except ValueError:
            raise ShapeError(f"{name}: input of shape {_shape(input)} and target of shape {_shape(target)} "
                             "cannot be broadcast together") from None
        _warn(f"{name}: using a target of shape {_shape(target)} that is different from the input "
              f"shape {_shape(input)}; they are broadcast, which is likely not what you want")


def _elementwise_weight(name, weight, input):
    if weight is None:
        return None
    weight = _float_like(name, "weight", weight, input)
    if _shape(weight) != _shape(input):
        raise ShapeError(f"{name}: weight of shape {_shape(weight)} must have the input's shape {_shape(input)}")
    return weight


def _weighted_reduce(loss, weight, reduction):
    """mse_loss/l1_loss with weight: the mean divides by the sum of the weights."""
    if weight is None:
        return _reduce(loss, reduction)
    loss = loss * weight
    if reduction == "mean":
        return avalon.sum(loss) / avalon.sum(weight)
    return _reduce(loss, reduction)


# -- class-index losses ------------------------------------------------------------

def _class_shapes(name, input, target):
    """Check an (N, C, d1, ...) input against an (N, d1, ...) integer target."""
    ishape, tshape = _shape(input), _shape(target)
    if len(ishape) == 0:
        raise ShapeError(f"{name}: input must have a class dimension: (C,), (N, C) or (N, C, d1, ...); "
                         "got a 0-d input")
    expected = () if len(ishape) == 1 else (ishape[0],) + ishape[2:]
    if tshape != expected:
        layout = "(C,)" if len(ishape) == 1 else "(N, C)" if len(ishape) == 2 else "(N, C, d1, ...)"
        raise ShapeError(f"{name}: input of shape {ishape} {layout} needs a target of class indices of shape "
                         f"{expected}, got target of shape {tshape}")
    if np.dtype(target.dtype).kind not in "iu":
        raise DtypeError(f"{name}: target of class indices must be an integer array, got "
                         f"{np.dtype(target.dtype).name}"
                         + (" (class probabilities need a target of the input's shape)"
                            if np.dtype(target.dtype).kind == "f" else ""))


def _class_target(name, input, target, ignore_index):
    """The class-index target, its shape checked against the input's and its
    labels range-checked as PyTorch does, eagerly or when the compiled step runs
    (the check is a kernel of the graph): an out-of-range label raises
    avalon.LabelError (an IndexError) naming the loss, the label, its position
    and the caller's line."""
    target = _as_array(target)
    _class_shapes(name, input, target)
    return avalon.check_labels(target, _shape(input)[_class_axis(input)], ignore_index, name=name)


def _class_weight(name, weight, input):
    if weight is None:
        return None
    weight = _float_like(name, "weight", weight, input)
    c = _shape(input)[0 if len(_shape(input)) == 1 else 1]
    if _shape(weight) != (c,):
        raise ShapeError(f"{name}: weight of shape {_shape(weight)} must have one entry per class, "
                         f"shape ({c},), for an input of shape {_shape(input)}")
    return weight


def _batched(input, target):
    """A (C,) input with a 0-d target becomes a batch of one."""
    if len(_shape(input)) == 1:
        return avalon.reshape(input, (1, -1)), avalon.reshape(target, (1,)), True
    return input, target, False


def _nll_terms(logp, target, weight, ignore_index):
    """Per-element -w[t] * logp[t] and the per-element weights w[t] (0 where ignored)."""
    ignored = target == ignore_index
    safe = avalon.where(ignored, 0, target)
    picked = avalon.squeeze(avalon.take_along_axis(logp, avalon.expand_dims(safe, 1), axis=1), 1)
    keep = avalon.cast(target != ignore_index, logp.dtype)
    w = keep if weight is None else avalon.take(weight, safe, axis=0) * keep
    return -picked * w, w


def _nll(logp, target, weight, ignore_index, reduction):
    """nll_loss of a checked target (_class_target) with checked weights."""
    logp, target, single = _batched(logp, target)
    loss, w = _nll_terms(logp, target, weight, ignore_index)
    if reduction == "none":
        return avalon.reshape(loss, ()) if single else loss
    if reduction == "sum":
        return avalon.sum(loss)
    return avalon.sum(loss) / avalon.sum(w)


@export("functional", "Losses", level="stable")
def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean"):
    """Negative log-likelihood of log-probabilities `input` (C,), (N, C) or
    (N, C, d1, ...) at the integer class indices `target` (), (N,) or (N, d1, ...).
    Entries equal to `ignore_index` count for nothing; the mean divides by the
    summed class weights of the other entries."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _check_reduction("nll_loss", reduction)
    _check_float("nll_loss", "input", input)
    target = _class_target("nll_loss", input, target, ignore_index)
    weight = _class_weight("nll_loss", weight, input)
    return _nll(input, target, weight, ignore_index, reduction)


def _class_axis(input):
    return 0 if len(_shape(input)) == 1 else 1


def _smoothing_term(logp, target, weight, ignore_index, reduction):
    """PyTorch's label-smoothing part: -sum_c w_c logp_c, 0 where ignored."""
    logp_b, target_b, single = _batched(logp, target)
    if weight is not None:
        wshape = (1, -1) + (1,) * (len(_shape(logp_b)) - 2)
        logp_b = logp_b * avalon.reshape(weight, wshape)
    smooth = -avalon.sum(logp_b, axis=1)
    ignored = target_b == ignore_index
    smooth = avalon.where(ignored, 0.0, smooth)
    if reduction == "none":
        return avalon.reshape(smooth, ()) if single else smooth
    if reduction == "sum":
        return avalon.sum(smooth)
    keep = avalon.cast(target_b != ignore_index, logp.dtype)
    if weight is not None:
        safe = avalon.where(ignored, 0, target_b)
        keep = avalon.take(weight, safe, axis=0) * keep
    return avalon.sum(smooth) / avalon.sum(keep)


def _cross_entropy_probs(name, input, target, weight, reduction, label_smoothing):
    axis = _class_axis(input)
    c = _shape(input)[axis]
    logp = avalon.log_softmax(input, axis=axis)
    target = _float_like(name, "target", target, input)
    if label_smoothing > 0:
        target = target * (1 - label_smoothing) + label_smoothing / c
    prod = logp * target
    if weight is not None:
        prod = prod * avalon.reshape(weight, (-1,) + (1,) * (len(_shape(input)) - axis - 1))
    if reduction == "none":
        return -avalon.sum(prod, axis=axis)
    total = -avalon.sum(prod)
    if reduction == "sum":
        return total
    return total / float(max(int(np.prod(_shape(input))) // c, 1))


@export("functional", "Losses", level="stable")
def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0):
    """Cross entropy of unnormalized logits `input` (C,), (N, C) or (N, C, d1, ...)
    against integer class indices (shape (), (N,) or (N, d1, ...)) or class
    probabilities (a float target of the input's shape).  label_smoothing mixes
    the target with the uniform distribution, as in PyTorch."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _check_reduction("cross_entropy", reduction)
    _check_float("cross_entropy", "input", input)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    target = _as_array(target)
    if len(_shape(input)) == 0:
        raise ShapeError("cross_entropy: input must have a class dimension: (C,), (N, C) or (N, C, d1, ...); "
                         "got a 0-d input")
    weight = _class_weight("cross_entropy", weight, input)
    if np.dtype(target.dtype).kind == "f" and _shape(target) == _shape(input):
        return _cross_entropy_probs("cross_entropy", input, target, weight, reduction, label_smoothing)
    target = _class_target("cross_entropy", input, target, ignore_index)
    logp = avalon.log_softmax(input, axis=_class_axis(input))
    nll = _nll(logp, target, weight, ignore_index, reduction)
    if label_smoothing == 0:
        return nll
    c = _shape(input)[_class_axis(input)]
    smooth = _smoothing_term(logp, target, weight, ignore_index, reduction)
    return nll * (1 - label_smoothing) + smooth * (label_smoothing / c)


# -- regression losses ---------------------------------------------------------------

@export("functional", "Losses", level="stable")
def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Mean squared error (input - target)**2; with `weight` (input's shape) the
    mean is sum(w * se) / sum(w), as in PyTorch."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _check_reduction("mse_loss", reduction)
    _check_float("mse_loss", "input", input)
    target = _float_like("mse_loss", "target", target, input)
    _warn_broadcast("mse_loss", input, target)
    weight = _elementwise_weight("mse_loss", weight, input)
    d = input - target
    return _weighted_reduce(d * d, weight, reduction)


@export("functional", "Losses", level="stable")
def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Mean absolute error |input - target| (weighted mean as mse_loss)."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    _check_reduction("l1_loss", reduction)
    _check_float("l1_loss", "input", input)
    target = _float_like("l1_loss", "target", target, input)
    _warn_broadcast("l1_loss", input, target)
    weight = _elementwise_weight("l1_loss", weight, input)
    return _weighted_reduce(avalon.abs(input - target), weight, reduction)


def _smooth_l1(input, target, reduction, beta):
    if beta < 0:
        raise ValueError(f"smooth_l1_loss: beta must be non-negative, got {beta}")
    _check_reduction("smooth_l1_loss", reduction)
    _check_float("smooth_l1_loss", "input", input)
    target = _float_like("smooth_l1_loss", "target", target, input)
    _warn_broadcast("smooth_l1_loss", input, target)
    d = avalon.abs(input - target)
    if beta == 0:
        return _reduce(d, reduction)
    loss = avalon.where(d < beta, (d * d) * (0.5 / beta), d - 0.5 * beta)
    return _reduce(loss, reduction)


@export("functional", "Losses", level="experimental")
def smooth_l1_loss(input, target, size_average=None, reduce=None, reduction="mean", beta=1.0):
    """Huber-like loss: 0.5 d**2 / beta where |d| < beta, else |d| - 0.5 beta
    (beta=0 is l1_loss)."""
    return _smooth_l1(input, target, _legacy_reduction(size_average, reduce, reduction), beta)


# -- binary classification -------------------------------------------------------------

def _check_probabilities(name, x):
    if not _is_concrete(x):
        return
    from avalon.backends import backend_of
    host = backend_of(x).to_host(x)
    if host.size and not (np.all(host >= 0) and np.all(host <= 1)):
        raise ValueError(f"{name}: all elements of input should be between 0 and 1 (found values in "
                         f"[{float(np.nanmin(host))}, {float(np.nanmax(host))}]); for logits use "
                         "binary_cross_entropy_with_logits")


@export("functional", "Losses", level="stable")
def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None, reduction="mean"):
    """-w (t log(x) + (1 - t) log(1 - x)) for probabilities x in [0, 1]; both
    logs are clamped to >= -100 so that x = 0 or 1 gives a finite loss, and the
    gradient there is PyTorch's, (x - t) / max(x (1 - x), 1e-12)."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    name = "binary_cross_entropy"
    _check_reduction(name, reduction)
    _check_float(name, "input", input)
    target = _float_like(name, "target", target, input)
    _same_shape(name, input, target)
    _check_probabilities(name, input)
    loss = avalon.binary_cross_entropy(input, target)
    if weight is not None:
        loss = loss * _broadcast_weight(name, weight, input)
    return _reduce(loss, reduction)


def _broadcast_weight(name, weight, input, what="weight"):
    weight = _float_like(name, what, weight, input)
    try:
        shape = np.broadcast_shapes(_shape(weight), _shape(input))
    except ValueError:
        shape = None
    if shape != _shape(input):
        raise ShapeError(f"{name}: {what} of shape {_shape(weight)} does not broadcast to the input's shape "
                         f"{_shape(input)}")
    return weight


@export("functional", "Losses", level="stable")
def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    """binary_cross_entropy(sigmoid(input), target) computed stably from logits,
    exact in both tails (value and gradient).  pos_weight weighs the
    positive class and broadcasts along the last (class) dimension."""
    reduction = _legacy_reduction(size_average, reduce, reduction)
    name = "binary_cross_entropy_with_logits"
    _check_reduction(name, reduction)
    _check_float(name, "input", input)
    target = _float_like(name, "target", target, input)
    _same_shape(name, input, target)
    if pos_weight is not None:
        pos_weight = _broadcast_weight(name, pos_weight, input, "pos_weight")
    loss = _bce_with_logits_terms(input, target, pos_weight)
    if weight is not None:
        loss = loss * _broadcast_weight(name, weight, input)
    return _reduce(loss, reduction)


def _bce_with_logits_terms(x, t, pos_weight):
    """-(pw t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))), written as
    (1 - t) max(x, 0) + pw t max(-x, 0) + (1 - t + pw t) log1p(exp(-|x|)).
    Every term stays exact in both tails, value and gradient: the gradient
    (1 - t) sigmoid(x) - pw t sigmoid(-x) does not cancel, where PyTorch's
    form (1 - t) x - log_sigmoid(x) gives 1 - (1 - 2e-9) = 0 at x = -20, t = 0."""
    positive = t if pos_weight is None else pos_weight * t
    # maximum splits its tie at 0, which gives the true gradient 1/2 - t there
    hinge = (1.0 - t) * avalon.maximum(x, 0.0) + positive * avalon.maximum(-x, 0.0)
    tail = avalon.log1p(avalon.exp(-avalon.abs(x)))
    return hinge + (tail if pos_weight is None else ((1.0 - t) + positive) * tail)


# -- distributions -------------------------------------------------------------------------

def _kl_div(input, target, reduction, log_target):
    name = "kl_div"
    _check_reduction(name, reduction, _REDUCTIONS + ("batchmean",))
    _check_float(name, "input", input)
    target = _float_like(name, "target", target, input)
    if log_target:
        loss = avalon.exp(target) * (target - input)
    else:
        # xlogy(t, t) - t * input, with 0 log 0 = 0
        pos = target > 0
        xlogx = avalon.where(pos, target * avalon.log(avalon.where(pos, target, 1.0)), 0.0)
        loss = xlogx - target * input
    if reduction == "batchmean":
        total = avalon.sum(loss)
        return total / float(_shape(input)[0]) if len(_shape(input)) else total
    return _reduce(loss, reduction)


@export("functional", "Losses", level="experimental")
def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """KL divergence with `input` given as log-probabilities and `target` as
    probabilities (log-probabilities with log_target=True).  "batchmean" divides
    the sum by the batch size (the mathematical KL); "mean" divides by the number
    of elements, as in PyTorch, which warns about it."""
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce, reduction)
    elif reduction == "mean":
        _warn("kl_div: reduction='mean' divides the total loss by both the batch size and the support "
              "size; 'batchmean' divides only by the batch size and matches the KL divergence")
    return _kl_div(input, target, reduction, log_target)


# Avalon.jl's names
alias("functional", "nllloss", "nll_loss")
alias("functional", "crossentropyloss", "cross_entropy")
alias("functional", "mseloss", "mse_loss")


# -- modules -------------------------------------------------------------------------------

class _Loss(Module):
    def __init__(self, size_average=None, reduce=None, reduction="mean"):
        super().__init__()
        self.reduction = _legacy_reduction(size_average, reduce, reduction)


class _WeightedLoss(_Loss):
    """A loss holding class weights as a buffer (saved, never trained)."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean"):
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", _weight_array(weight))


def _weight_array(w):
    if w is None:
        return None
    if hasattr(w, "detach"):  # a torch tensor
        w = w.detach().cpu().numpy()
    w = _as_array(w)
    return w if np.dtype(w.dtype).kind == "f" else np.asarray(w, dtype=np.float32)


@export("nn", "Losses", level="stable")
class NLLLoss(_WeightedLoss):
    """nll_loss as a module: NLLLoss(weight=None, ignore_index=-100, reduction='mean')."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean"):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index

    def forward(self, input, target):
        return nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index,
                        reduction=self.reduction)


@export("nn", "Losses", level="stable")
class CrossEntropyLoss(_WeightedLoss):
    """cross_entropy as a module (logits in, class indices or probabilities as target)."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction="mean",
                 label_smoothing=0.0):
        super().__init__(weight, size_average, reduce, reduction)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing

    def forward(self, input, target):
        return cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing)


@export("nn", "Losses", level="stable")
class MSELoss(_Loss):
    """mse_loss as a module."""

    def forward(self, input, target):
        return mse_loss(input, target, reduction=self.reduction)


@export("nn", "Losses", level="stable")
class L1Loss(_Loss):
    """l1_loss as a module."""

    def forward(self, input, target):
        return l1_loss(input, target, reduction=self.reduction)


@export("nn", "Losses", level="experimental")
class SmoothL1Loss(_Loss):
    """smooth_l1_loss as a module."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", beta=1.0):
        super().__init__(size_average, reduce, reduction)
        self.beta = beta

    def forward(self, input, target):
        return _smooth_l1(input, target, self.reduction, self.beta)


@export("nn", "Losses", level="stable")
class BCELoss(_WeightedLoss):
    """binary_cross_entropy as a module (probabilities in)."""

    def forward(self, input, target):
        return binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


@export("nn", "Losses", level="stable")
class BCEWithLogitsLoss(_Loss):
    """binary_cross_entropy_with_logits as a module (logits in)."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean", pos_weight=None):
        super().__init__(size_average, reduce, reduction)
        self.register_buffer("weight", _weight_array(weight))
        self.register_buffer("pos_weight", _weight_array(pos_weight))

    def forward(self, input, target):
        return binary_cross_entropy_with_logits(input, target, weight=self.weight, reduction=self.reduction,
                                                pos_weight=self.pos_weight)


@export("nn", "Losses", level="experimental")
class KLDivLoss(_Loss):
    """kl_div as a module (log-probabilities in)."""

    def __init__(self, size_average=None, reduce=None, reduction="mean", log_target=False):
        super().__init__(size_average, reduce, reduction)
        self.log_target = log_target

    def forward(self, input, target):
        return _kl_div(input, target, self.reduction, self.log_target)
