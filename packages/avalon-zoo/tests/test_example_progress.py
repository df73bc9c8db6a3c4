"""The example scripts' progress bar within an epoch: tqdm on stderr with the
running loss when someone watches at a terminal, nothing in logs and pipes."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import avalon
import avalon.nn as nn
import avalon.nn.functional as F
import avalon.optim
from avalon_zoo.datasets import Batches

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

if importlib.util.find_spec("matplotlib") is None:
    pytest.skip("the examples draw with matplotlib, which is not installed", allow_module_level=True)


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    sys.modules.pop("_common", None)
    import _common
    return _common


def mse(model, x, y):
    return F.mse_loss(model(x), y)


def _train_one_epoch(common):
    avalon.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3)).astype(np.float32)
    y = rng.standard_normal((40, 2)).astype(np.float32)
    model = nn.Linear(3, 2)
    return common.train_epoch(model, mse, avalon.optim.SGD(lr=0.1), Batches(x, y, batch_size=8, seed=0),
                              "epoch 1/3")


def test_a_bar_with_the_running_loss_on_a_terminal(common, monkeypatch, capsys):
    monkeypatch.setattr(common, "interactive", lambda: True)
    loss = _train_one_epoch(common)
    err = capsys.readouterr().err
    assert "epoch 1/3" in err and "/5" in err and "batch" in err
    assert np.isfinite(loss)


def test_nothing_when_not_on_a_terminal(common, monkeypatch, capsys):
    monkeypatch.setattr(common, "interactive", lambda: False)
    loss = _train_one_epoch(common)
    assert capsys.readouterr().err == ""
    assert np.isfinite(loss)


def test_interactive_needs_both_streams_on_a_terminal(common, monkeypatch):
    class Stream:
        def __init__(self, tty):
            self.tty = tty

        def isatty(self):
            return self.tty

    for out, err, expected in [(True, True, True), (True, False, False), (False, True, False)]:
        monkeypatch.setattr("sys.stdout", Stream(out))
        monkeypatch.setattr("sys.stderr", Stream(err))
        assert common.interactive() is expected
