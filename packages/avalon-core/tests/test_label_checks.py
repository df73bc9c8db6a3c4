"""Class labels are range-checked where the kernels run: eagerly, and inside
compiled code (avalon.jit, avalon.grad, a step split across the engine's
threads).  An out-of-range label raises avalon.LabelError (an IndexError)
naming the loss, the label, its position, the number of classes and the line
of user code, with PyTorch's ignore_index semantics."""
import inspect
import re

import numpy as np
import pytest

import avalon
from avalon import parallel
from avalon.parallel import ShardedFunction

rng = np.random.default_rng(11)


def _next_line():
    """'<this file>:<line>' of the line after the caller's, as error messages print it."""
    frame = inspect.currentframe().f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno + 1}"


def _pick(x, y):
    """A tiny nll: the checked labels select one logit per row."""
    y = avalon.check_labels(y, x.shape[1], -100, name="my_loss")
    return -avalon.mean(avalon.take_along_axis(x, avalon.expand_dims(y, 1), axis=1))


# -- the op -------------------------------------------------------------------------------------------

def test_valid_labels_pass_through_unchanged():
    y = np.array([0, 4, 2, -100])
    out = avalon.check_labels(y, 5, ignore_index=-100)
    np.testing.assert_array_equal(out, y)
    np.testing.assert_array_equal(avalon.check_labels(np.zeros(0, np.int64), 3), np.zeros(0))


@pytest.mark.parametrize("bad", [-1, 5, 7])
def test_eager_error_names_loss_label_position_classes_and_line(bad):
    y = np.array([[0, 1, 2], [3, bad, 4]])
    with pytest.raises(avalon.LabelError) as info:
        where = _next_line()
        avalon.check_labels(y, 5, -100, name="my_loss")
    msg = str(info.value)
    assert msg == (f"my_loss: target {bad} is out of bounds for 5 classes (valid: 0..4, or ignore_index=-100); "
                   f"found at target[1, 1] (at {where})")
    assert isinstance(info.value, IndexError) and isinstance(info.value, avalon.AvalonError)


def test_the_first_bad_label_is_named_and_the_others_counted():
    with pytest.raises(avalon.LabelError, match=r"target 9 is out of bounds .* found at target\[2\] and 2 more "
                                                r"out-of-range labels"):
        avalon.check_labels(np.array([0, 1, 9, -3, 4, 12]), 5)


def test_ignore_index_is_allowed_whatever_its_value():
    np.testing.assert_array_equal(avalon.check_labels(np.array([0, -1, 2]), 3, ignore_index=-1), [0, -1, 2])
    np.testing.assert_array_equal(avalon.check_labels(np.array([0, 7, 2]), 3, ignore_index=7), [0, 7, 2])
    with pytest.raises(avalon.LabelError, match="target -100 is out of bounds for 3 classes .*ignore_index=-1\\)"):
        avalon.check_labels(np.array([0, -100]), 3, ignore_index=-1)
    with pytest.raises(avalon.LabelError, match=r"target -1 .* \(valid: 0\.\.2\);"):
        avalon.check_labels(np.array([0, -1]), 3)  # no ignore_index


def test_float_labels_are_a_dtype_error():
    with pytest.raises(avalon.DtypeError, match="my_loss: class labels must be an integer array, got float32"):
        avalon.check_labels(np.zeros(3, np.float32), 3, name="my_loss")


@pytest.mark.parametrize("bad", [-1, 3])
def test_jit_checks_inside_the_compiled_function(bad):
    where = _next_line()  # the line traced into the graph
    f = avalon.jit(lambda y: avalon.check_labels(y, 3, -100, name="my_loss") * 2)
    np.testing.assert_array_equal(f(np.array([0, 1, 2])), [0, 2, 4])
    with pytest.raises(avalon.LabelError) as info:
        f(np.array([0, bad, 2]))  # the same compiled code: the check is a kernel of the graph
    assert f.traces == 1
    assert str(info.value).endswith(f"found at target[1] (at {where})")
    assert f"my_loss: target {bad} is out of bounds for 3 classes" in str(info.value)


@pytest.mark.parametrize("bad", [-1, 4])
def test_grad_checks_inside_the_compiled_step(bad):
    x = rng.standard_normal((6, 4)).astype(np.float32)
    loss, (g, _) = avalon.grad(_pick, x, np.array([0, 1, 2, 3, 0, 1]))
    assert np.isfinite(loss) and g[5, 1] == pytest.approx(-1 / 6)
    with pytest.raises(avalon.LabelError, match=rf"my_loss: target {bad} is out of bounds for 4 classes "
                                                r"\(valid: 0\.\.3, or ignore_index=-100\); found at target\[5\] "
                                                rf"\(at {re.escape(__file__)}:\d+\)"):
        avalon.grad(_pick, x, np.array([0, 1, 2, 3, 0, bad]))


def test_the_check_survives_the_passes_and_is_merged_by_cse():
    def twice(x, y):  # two checks on one line: equal attributes, one kernel
        return avalon.check_labels(y, 4, name="my_loss") + avalon.check_labels(y, 4, name="my_loss")
    f = avalon.jit(lambda x, y: twice(x, y) * x[0, 0])
    y = np.array([0, 1, 2, 3])
    f(np.ones((4, 4), np.float32), y)
    ops = [n.op for n in f.graph.nodes] + [b.op for n in f.graph.nodes if n.op == "fused"
                                           for b in n.attrs["body"].nodes]
    assert ops.count("check_labels") == 1
    with pytest.raises(avalon.LabelError):
        f(np.ones((4, 4), np.float32), np.array([0, 1, 2, 4]))


# -- a step split across the engine's threads ---------------------------------------------------------

def _mean_nll(m, x, y):
    logits = x @ m["w"]
    logp = avalon.log_softmax(logits)
    y = avalon.check_labels(y, logits.shape[1], -100, name="my_loss")
    return -avalon.mean(avalon.take_along_axis(logp, avalon.expand_dims(y, 1), axis=1))


def _first_schedule(fn):
    compiled = fn._last().compiled
    return compiled.candidates[0][1] if isinstance(compiled, parallel.Autotuned) else compiled


@pytest.mark.skipif(parallel.shard_count() < 2, reason="the engine runs one thread here")
@pytest.mark.parametrize("bad", [-1, 100])
def test_a_step_split_across_threads_still_raises(bad):
    # a realistic batch: 2048 x 128 inputs, 100 classes, large enough to be split
    m = {"w": rng.standard_normal((128, 100)).astype(np.float32) * 0.1}
    x = rng.standard_normal((2048, 128)).astype(np.float32)
    y = rng.integers(0, 100, 2048)
    step = avalon.GradFunction(_mean_nll, argnums=0)
    whole = avalon.GradFunction(_mean_nll, argnums=0, parallel=False)
    loss, (g, _, _) = step(m, x, y)
    assert isinstance(_first_schedule(step), ShardedFunction), "the check must not keep the step whole"
    np.testing.assert_allclose(loss, whole(m, x, y)[0], rtol=1e-6)
    for row in (3, 1500):  # in the first and in the second thread's share
        y_bad = y.copy()
        y_bad[row] = bad
        calls = list(step._last().compiled.calls)
        with pytest.raises(avalon.LabelError) as info:
            step(m, x, y_bad)
        assert step._last().compiled.calls[0] == calls[0] + 1  # it ran split
        msg = str(info.value)
        assert msg.startswith(f"my_loss: target {bad} is out of bounds for 100 classes")
        assert (f"found at target[{row % 1024}] (the step ran split across 2 threads: a position within one "
                "thread's share of the batch)") in msg
        assert f"(at {__file__}:" in msg
