"""Classification metrics on concrete arrays (NumPy on the host): accuracy,
confusion_matrix, precision, recall, f1.  Exported as avalon.accuracy, ...,
and as the module avalon.metrics (avalon.metrics.accuracy).

Predictions may be class indices (same shape as the labels), per-class scores
or logits with a class axis (argmax is taken: (N, C) against (N,) labels, or
(N, C, d1, ...) against (N, d1, ...)), or, for accuracy, binary probabilities
of the labels' shape (thresholded).  Metrics are not differentiable: call them
on the outputs of a model, outside avalon.grad.
"""
from __future__ import annotations

import sys

import numpy as np

from avalon.backends import backend_of
from avalon.errors import ShapeError

from . import registry
from .registry import export


def _host(x, name, what):
    if isinstance(x, (list, tuple, int, float, np.generic)):
        return np.asarray(x)
    try:
        return np.asarray(backend_of(x).to_host(x))
    except Exception:
        raise TypeError(f"{name}: {what} must be a concrete array (metrics cannot run on traced values); "
                        f"got {type(x).__name__}") from None


def _labels(name, y_pred, y_true, threshold=None):
    """(predicted labels, true labels) as host integer arrays of one shape."""
    y_pred, y_true = _host(y_pred, name, "y_pred"), _host(y_true, name, "y_true")
    if y_pred.ndim == y_true.ndim + 1 and y_pred.ndim >= 1:
        axis = 0 if y_pred.ndim == 1 else 1
        if y_pred.shape[:axis] + y_pred.shape[axis + 1:] != y_true.shape:
            raise ShapeError(f"{name}: scores of shape {y_pred.shape} (N, C, ...) do not match labels of shape "
                             f"{y_true.shape}")
        y_pred = np.argmax(y_pred, axis=axis)
    elif y_pred.shape != y_true.shape:
        raise ShapeError(f"{name}: predictions of shape {y_pred.shape} do not match labels of shape "
                         f"{y_true.shape} (pass class indices of the labels' shape, or scores (N, C, ...))")
    elif y_pred.dtype.kind == "f" and threshold is not None:
        y_pred = (y_pred > threshold).astype(np.int64)
    return y_pred, y_true


@export("toplevel", "Fitting API")
def accuracy(y_pred, y_true, threshold=0.5) -> float:
    """Fraction of correct predictions.  y_pred: labels, scores/logits with a
    class axis (argmax), or probabilities of y_true's shape (> threshold)."""
    y_pred, y_true = _labels("accuracy", y_pred, y_true, threshold)
    if y_true.size == 0:
        return float("nan")
    return float(np.mean(y_pred == y_true))


@export("toplevel", "Fitting API")
def confusion_matrix(y_true, y_pred, num_classes=None) -> np.ndarray:
    """Counts: m[i, j] = how many samples of true class i were predicted as j
    (int64, num_classes x num_classes; default: 1 + the largest label seen)."""
    return _confusion_matrix("confusion_matrix", y_true, y_pred, num_classes)


def _confusion_matrix(name, y_true, y_pred, num_classes):
    y_pred, y_true = _labels(name, y_pred, y_true)
    y_pred, y_true = y_pred.astype(np.int64).ravel(), y_true.astype(np.int64).ravel()
    if num_classes is None:
        num_classes = int(max(y_true.max(initial=-1), y_pred.max(initial=-1))) + 1
    for what, a in (("y_true", y_true), ("y_pred", y_pred)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name}: {what} has labels outside 0..{num_classes - 1}")
    m = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def _divide(num, den):
    """num / den with 0 where den == 0 (no warning), as scikit-learn's default."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den != 0)


def _counts(name, y_true, y_pred, num_classes):
    m = _confusion_matrix(name, y_true, y_pred, num_classes)
    tp = np.diag(m)
    return tp, m.sum(axis=0) - tp, m.sum(axis=1) - tp  # tp, fp, fn per class


def _averaged(name, per_class, tp, fp, fn, micro, average):
    if average is None:
        return per_class
    if average == "micro":
        return float(micro(tp.sum(), fp.sum(), fn.sum()))
    if average == "macro":
        return float(per_class.mean()) if per_class.size else 0.0
    raise ValueError(f"{name}: average must be 'macro', 'micro' or None, got {average!r}")


def _precision(tp, fp, fn):
    return _divide(tp, tp + fp)


def _recall(tp, fp, fn):
    return _divide(tp, tp + fn)


def _f1(tp, fp, fn):
    return _divide(2 * tp, 2 * tp + fp + fn)


@export("toplevel", "Fitting API")
def precision(y_true, y_pred, average="macro", num_classes=None):
    """tp / (tp + fp) per class (average=None: an array), or its unweighted mean
    over classes ("macro"), or from the summed counts ("micro").  0 where a
    class is never predicted."""
    tp, fp, fn = _counts("precision", y_true, y_pred, num_classes)
    return _averaged("precision", _precision(tp, fp, fn), tp, fp, fn, _precision, average)


@export("toplevel", "Fitting API")
def recall(y_true, y_pred, average="macro", num_classes=None):
    """tp / (tp + fn) per class, macro- or micro-averaged as precision."""
    tp, fp, fn = _counts("recall", y_true, y_pred, num_classes)
    return _averaged("recall", _recall(tp, fp, fn), tp, fp, fn, _recall, average)


@export("toplevel", "Fitting API")
def f1(y_true, y_pred, average="macro", num_classes=None):
    """Harmonic mean of precision and recall, 2 tp / (2 tp + fp + fn), per class,
    macro- or micro-averaged as precision."""
    tp, fp, fn = _counts("f1", y_true, y_pred, num_classes)
    return _averaged("f1", _f1(tp, fp, fn), tp, fp, fn, _f1, average)


# avalon.metrics.accuracy: this module, served as a top-level name
_this = sys.modules[__name__]
_this.__avalon_stability__ = "experimental"
_this.__avalon_component__ = "Fitting API"
registry.EXPORTS["toplevel"]["metrics"] = _this
registry.LEVELS[("toplevel", "metrics")] = ("Fitting API", "experimental")
