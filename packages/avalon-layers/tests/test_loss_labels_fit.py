"""nll_loss and cross_entropy check their class labels wherever they run:
eagerly, under avalon.jit and avalon.grad, in fit, and in a training step split
across the engine's threads.  A label below 0 (other than ignore_index) or >= C
raises avalon.LabelError, an IndexError naming the loss, the label, its
position, the number of classes and the user's line; before, compiled code
read the last class for -1 and raised NumPy's bare IndexError for C."""
import inspect
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import avalon
import avalon.nn as nn
import avalon.nn.functional as F
from avalon import parallel
from avalon.parallel import ShardedFunction

pytestmark = pytest.mark.filterwarnings("ignore::avalon_layers.registry.ExperimentalWarning")

rng = np.random.default_rng(3)
LOSSES = {"nll_loss": F.nll_loss, "cross_entropy": F.cross_entropy}  # inputs: log-probabilities


def _next_line():
    """'<this file>:<line>' of the line after the caller's, as error messages print it."""
    frame = inspect.currentframe().f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno + 1}"


def _message(name, bad, classes, position, where, ignore_index=-100):
    return (f"{name}: target {bad} is out of bounds for {classes} classes (valid: 0..{classes - 1}, "
            f"or ignore_index={ignore_index}); found at target[{position}] (at {where})")


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [-1, 3])
def test_eager_error(name, bad):
    x, y = rng.standard_normal((4, 3)).astype(np.float32), np.array([0, 1, bad, 2])
    with pytest.raises(avalon.LabelError) as info:
        where = _next_line()
        LOSSES[name](x, y)
    assert str(info.value) == _message(name, bad, 3, 2, where)
    assert isinstance(info.value, IndexError)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [-1, 3])
def test_error_under_grad(name, bad):
    x, y = rng.standard_normal((4, 3)).astype(np.float32), np.array([0, 1, 2, 2])

    def loss(a, b):
        return LOSSES[name](a, b)
    where = f"{__file__}:{inspect.getsourcelines(loss)[1] + 1}"  # the line inside loss, traced
    step = avalon.value_and_grad(loss, argnums=0)
    step(x, y)
    y[3] = bad
    with pytest.raises(avalon.LabelError) as info:
        step(x, y)  # the compiled step of the first call: no retrace, no eager check
    assert step.traces == 1
    assert str(info.value) == _message(name, bad, 3, 3, where)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("bad", [-1, 5])
def test_error_under_jit_with_spatial_labels(name, bad):
    # (N, C, d1) logits and (N, d1) labels: the position has two indices
    where = _next_line()
    f = avalon.jit(lambda a, b: LOSSES[name](a, b, reduction="none"))
    x, y = rng.standard_normal((2, 5, 3)).astype(np.float32), rng.integers(0, 5, (2, 3))
    assert f(x, y).shape == (2, 3)
    y[1, 2] = bad
    with pytest.raises(avalon.LabelError) as info:
        f(x, y)
    assert str(info.value) == _message(name, bad, 5, "1, 2", where)


@pytest.mark.parametrize("ignore_index", [-1, 1, 7])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_ignore_index_labels_are_allowed_with_torchs_semantics(ignore_index, label_smoothing):
    x = rng.standard_normal((6, 4)).astype(np.float32)
    y = np.array([0, ignore_index, 3, ignore_index, 2, 1])
    xt = torch.tensor(x, requires_grad=True)
    want = TF.cross_entropy(xt, torch.tensor(y), ignore_index=ignore_index, label_smoothing=label_smoothing)
    want.backward()

    def loss(a, b):
        return F.cross_entropy(a, b, ignore_index=ignore_index, label_smoothing=label_smoothing)
    np.testing.assert_allclose(loss(x, y), want.item(), rtol=1e-5)
    value, (g, _) = avalon.grad(loss, x, y)
    np.testing.assert_allclose(value, want.item(), rtol=1e-5)
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-5, atol=1e-7)
    if ignore_index != -1:
        with pytest.raises(avalon.LabelError, match=rf"target -1 .*ignore_index={ignore_index}\)"):
            avalon.grad(loss, x, np.array([0, -1, 3, 0, 2, 1]))


def test_an_unbatched_input_reports_no_position():
    with pytest.raises(avalon.LabelError, match=r"^cross_entropy: target 4 is out of bounds for 3 classes "
                                                r"\(valid: 0\.\.2, or ignore_index=-100\) \(at "):
        avalon.grad(F.cross_entropy, np.zeros(3, np.float32), np.array(4))


def test_loss_modules_check_too():
    x = rng.standard_normal((4, 3)).astype(np.float32)
    with pytest.raises(avalon.LabelError, match="cross_entropy: target 3 is out of bounds for 3 classes"):
        avalon.grad(lambda a, b: nn.CrossEntropyLoss()(a, b), x, np.array([0, 1, 2, 3]))
    with pytest.raises(avalon.LabelError, match="nll_loss: target -2 .*ignore_index=0\\)"):
        avalon.grad(lambda a, b: nn.NLLLoss(ignore_index=0)(a, b), x, np.array([0, 1, -2, 0]))


# -- fit, and the step split across threads ------------------------------------------------------------

def _classification(n, d, c):
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X, rng.integers(0, c, n)


@pytest.mark.parametrize("bad", [-1, 10])
def test_fit_reports_the_bad_label_and_the_fit_call(bad):
    X, Y = _classification(64, 8, 10)
    Y[37] = bad
    model = nn.Linear(8, 10)
    with pytest.raises(avalon.LabelError) as info:
        where = _next_line()
        avalon.fit(model, X, Y, loss_fn=F.cross_entropy, epochs=1, batch_size=64, shuffle=False, verbose=0)
    assert str(info.value) == _message("cross_entropy", bad, 10, 37, where)


@pytest.mark.skipif(parallel.shard_count() < 2, reason="the engine runs one thread here")
@pytest.mark.parametrize("bad", [-1, 100])
def test_fit_with_a_batch_split_across_threads(bad, monkeypatch):
    from avalon_layers.fit import _Steps
    monkeypatch.setattr(_Steps, "_cache", OrderedDict())  # a fresh step: its first calls run split
    # batches of 2048 x 128 inputs, 100 classes: the training step runs split in two threads
    X, Y = _classification(4096, 128, 100)
    model = nn.Linear(128, 100)
    Y[2048 + 1500] = bad  # second batch, second thread's share
    with pytest.raises(avalon.LabelError) as info:
        avalon.fit(model, X, Y, loss_fn=F.cross_entropy, epochs=1, batch_size=2048, shuffle=False, verbose=0)
    schedule = _Steps.of(model, F.cross_entropy, supervised=True).grad._last().compiled
    assert isinstance(schedule.candidates[0][1], ShardedFunction), "the check must not keep the step whole"
    assert schedule.calls[0] == 2  # both batches ran split
    msg = str(info.value)
    assert msg.startswith(f"cross_entropy: target {bad} is out of bounds for 100 classes")
    assert ("found at target[476] (the step ran split across 2 threads: a position within one thread's share "
            "of the batch)") in msg
    assert re.search(rf"\(at {re.escape(__file__)}:\d+\)$", msg)
