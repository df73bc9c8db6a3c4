"""Classification metrics against hand-computed values and the textbook
formulas (no scikit-learn): accuracy, confusion_matrix, precision, recall, f1."""
import warnings

import numpy as np
import pytest

import avalon
from avalon_layers import metrics
from avalon_layers.registry import LEVELS, ExperimentalWarning

pytestmark = pytest.mark.filterwarnings("ignore::avalon_layers.registry.ExperimentalWarning")

# 3 classes, 8 samples; worked out by hand below
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 1, 0, 1, 2, 2, 2, 0])
CM = np.array([[2, 1, 0],    # true 0: two right, one called 1
               [0, 1, 1],    # true 1: one right, one called 2
               [1, 0, 2]])   # true 2: two right, one called 0
# per class: tp = (2, 1, 2); fp = column sum - tp = (1, 1, 1); fn = row sum - tp = (1, 1, 1)
PRECISION = np.array([2 / 3, 1 / 2, 2 / 3])
RECALL = np.array([2 / 3, 1 / 2, 2 / 3])
F1 = 2 * PRECISION * RECALL / (PRECISION + RECALL)


def test_accuracy_on_labels_and_logits():
    assert metrics.accuracy(Y_PRED, Y_TRUE) == pytest.approx(5 / 8)
    logits = np.eye(3, dtype=np.float32)[Y_PRED] * 2.0 - 1.0  # argmax = Y_PRED
    assert metrics.accuracy(logits, Y_TRUE) == pytest.approx(5 / 8)
    # (N, C, d) scores against (N, d) labels: the class axis is 1
    scores = np.stack([logits[:4], logits[4:]], axis=2)  # (4, 3, 2)
    labels = np.stack([Y_TRUE[:4], Y_TRUE[4:]], axis=1)  # (4, 2)
    assert metrics.accuracy(scores, labels) == pytest.approx(5 / 8)


def test_accuracy_of_binary_probabilities_thresholds():
    p = np.array([0.9, 0.2, 0.6, 0.4], np.float32)
    y = np.array([1, 0, 0, 0])
    assert metrics.accuracy(p, y) == pytest.approx(3 / 4)
    assert metrics.accuracy(p, y, threshold=0.7) == pytest.approx(1.0)


def test_accuracy_rejects_mismatched_shapes():
    with pytest.raises(avalon.ShapeError, match=r"accuracy: predictions of shape \(3,\) do not match labels of "
                                                r"shape \(4,\)"):
        metrics.accuracy(np.zeros(3, np.int64), np.zeros(4, np.int64))
    with pytest.raises(avalon.ShapeError, match=r"accuracy: scores of shape \(3, 5\) \(N, C, \.\.\.\) do not match "
                                                r"labels of shape \(4,\)"):
        metrics.accuracy(np.zeros((3, 5), np.float32), np.zeros(4, np.int64))


def test_confusion_matrix():
    np.testing.assert_array_equal(metrics.confusion_matrix(Y_TRUE, Y_PRED), CM)
    m = metrics.confusion_matrix(Y_TRUE, Y_PRED, num_classes=5)
    assert m.shape == (5, 5) and m.dtype == np.int64
    np.testing.assert_array_equal(m[:3, :3], CM)
    assert m[3:].sum() == 0 and m[:, 3:].sum() == 0
    assert m.sum() == len(Y_TRUE)
    with pytest.raises(ValueError, match=r"confusion_matrix: y_true has labels outside 0\.\.1"):
        metrics.confusion_matrix(Y_TRUE, Y_PRED, num_classes=2)


def test_per_class_precision_recall_f1():
    np.testing.assert_allclose(metrics.precision(Y_TRUE, Y_PRED, average=None), PRECISION)
    np.testing.assert_allclose(metrics.recall(Y_TRUE, Y_PRED, average=None), RECALL)
    np.testing.assert_allclose(metrics.f1(Y_TRUE, Y_PRED, average=None), F1)


def test_macro_and_micro_averages():
    assert metrics.precision(Y_TRUE, Y_PRED) == pytest.approx(PRECISION.mean())
    assert metrics.recall(Y_TRUE, Y_PRED, average="macro") == pytest.approx(RECALL.mean())
    assert metrics.f1(Y_TRUE, Y_PRED, average="macro") == pytest.approx(F1.mean())
    # micro: from summed counts tp = 5, fp = 3, fn = 3; single-label micro P = R = F1 = accuracy
    for fn in (metrics.precision, metrics.recall, metrics.f1):
        assert fn(Y_TRUE, Y_PRED, average="micro") == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="average must be 'macro', 'micro' or None"):
        metrics.f1(Y_TRUE, Y_PRED, average="weighted")


def test_uneven_classes_differ_between_macro_and_micro():
    y_true = np.array([0, 0, 0, 0, 1, 1])
    y_pred = np.array([0, 0, 0, 1, 1, 0])
    # class 0: tp 3, fp 1, fn 1; class 1: tp 1, fp 1, fn 1
    assert metrics.precision(y_true, y_pred) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert metrics.recall(y_true, y_pred) == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert metrics.f1(y_true, y_pred, average="micro") == pytest.approx(4 / 6)


def test_class_never_predicted_scores_zero_without_warning():
    y_true, y_pred = np.array([0, 1, 2]), np.array([0, 0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        p = metrics.precision(y_true, y_pred, average=None)
        r = metrics.recall(y_true, y_pred, average=None)
        f = metrics.f1(y_true, y_pred, average=None)
    np.testing.assert_allclose(p, [1 / 3, 0, 0])
    np.testing.assert_allclose(r, [1, 0, 0])
    np.testing.assert_allclose(f, [0.5, 0, 0])


def test_metrics_take_logits_and_lists():
    logits = np.eye(3, dtype=np.float32)[Y_PRED]
    np.testing.assert_array_equal(metrics.confusion_matrix(list(Y_TRUE), logits), CM)
    assert metrics.f1(Y_TRUE, logits) == pytest.approx(F1.mean())


def test_metrics_refuse_traced_values():
    with pytest.raises(TypeError, match="accuracy: y_pred must be a concrete array"):
        avalon.jit(lambda p, y: metrics.accuracy(p, y))(Y_PRED.astype(np.float32), Y_TRUE)


def test_exports():
    for name in ("accuracy", "confusion_matrix", "precision", "recall", "f1"):
        assert getattr(avalon, name) is getattr(metrics, name)
        assert getattr(avalon.metrics, name) is getattr(metrics, name)
        assert LEVELS[("toplevel", name)] == ("Fitting API", "experimental")
    assert avalon.metrics is metrics


def test_metrics_are_experimental(monkeypatch):
    from avalon_layers import registry
    monkeypatch.setattr(registry, "_warned", set())
    with pytest.warns(ExperimentalWarning, match="avalon.accuracy is experimental"):
        avalon.accuracy(Y_PRED, Y_TRUE)
