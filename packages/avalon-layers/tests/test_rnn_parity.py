"""Parity of avalon.nn's recurrent layers (RNN, LSTM, GRU and their cells) with PyTorch.

Same weights (a torch state_dict loaded with load_state_dict) must give the same
outputs, final states and gradients (avalon.grad against torch autograd, with
respect to the input, the initial state and every parameter).  Also covered:
parameter names and shapes, default initialization, dropout between layers,
the experimental-API warning, repr, and the errors for bad shapes.
"""
import subprocess
import sys
import numpy as np
import pytest
import torch

import avalon
import avalon.nn as nn

# The once-per-process warning is tested on its own below, in a fresh process.
pytestmark = pytest.mark.filterwarnings("ignore::avalon_layers.registry.ExperimentalWarning")

RTOL, ATOL = 1e-4, 1e-5
L, N, H_IN, H = 5, 3, 4, 6


# -- helpers -------------------------------------------------------------------------------

def _pair(kind, **kw):
    """A torch layer and an avalon layer holding the same weights."""
    torch.manual_seed(0)
    tm = getattr(torch.nn, kind)(**kw)
    m = getattr(nn, kind)(**kw)
    m.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    return tm, m


def _randn(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def _close(ours, theirs, what):
    assert ours is not None, f"{what}: no gradient"
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    assert tuple(np.shape(ours)) == tuple(theirs.shape), f"{what}: shape {np.shape(ours)} vs {theirs.shape}"
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=RTOL, atol=ATOL, err_msg=what)


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _weighted_loss(outputs, weights):
    """sum_k sum(outputs[k] * weights[k]): touches every output and final state."""
    total = None
    for o, w in zip(outputs, weights):
        term = (o * w).sum()
        total = term if total is None else total + term
    return total


def _flat_outputs(result):
    """(output, h_n) / (output, (h_n, c_n)) / h' / (h', c') -> a flat tuple of arrays."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], (tuple, list)):
        return (result[0],) + tuple(result[1])
    return _as_tuple(result)


def _check_parity(tm, m, x, state):
    """Forward outputs, loss and gradients (input, state, every parameter) agree with torch."""
    rng = np.random.default_rng(7)
    tx = torch.from_numpy(x.copy()).requires_grad_()
    tstate = None if state is None else tuple(torch.from_numpy(s.copy()).requires_grad_() for s in _as_tuple(state))
    targ = () if tstate is None else ((tstate if isinstance(state, tuple) else tstate[0]),)
    touts = _flat_outputs(tm(tx, *targ))
    weights = tuple(_randn(rng, tuple(o.shape)) for o in touts)
    tloss = sum((o * torch.from_numpy(w)).sum() for o, w in zip(touts, weights))
    tloss.backward()

    outs = _flat_outputs(m(x, state))
    assert len(outs) == len(touts)
    for k, (o, t) in enumerate(zip(outs, touts)):
        _close(o, t, f"forward output {k}")

    def loss(model, x, state, weights):
        return _weighted_loss(_flat_outputs(model(x, state)), weights)

    value, (gm, gx, gstate, gw) = avalon.grad(loss, m, x, state, weights, argnums=(0, 1, 2))
    assert all(g is None for g in gw)  # weights are not differentiated (argnums)
    _close(value, tloss, "loss")
    _close(gx, tx.grad, "d loss / d input")
    if state is not None:
        for k, (g, t) in enumerate(zip(_as_tuple(gstate), tstate)):
            _close(g, t.grad, f"d loss / d initial state {k}")
    names = [n for n, _ in tm.named_parameters()]
    assert names, "the torch layer has parameters"
    for name, p in tm.named_parameters():
        _close(getattr(gm, name), p.grad, f"d loss / d {name}")


def _sequence_inputs(kind, *, batch_first=False, bidirectional=False, with_state=False, batched=True,
                     seq_len=L, out_size=H, num_layers=2):
    rng = np.random.default_rng(3)
    xshape = ((N, seq_len, H_IN) if batch_first else (seq_len, N, H_IN)) if batched else (seq_len, H_IN)
    x = _randn(rng, xshape)
    if not with_state:
        return x, None
    lead = ((2 if bidirectional else 1) * num_layers,) + ((N,) if batched else ())
    h0 = _randn(rng, lead + (out_size,))
    return x, ((h0, _randn(rng, lead + (H,))) if kind == "LSTM" else h0)


# -- sequence layers: forward and gradient parity ------------------------------------------------

@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_sequence_parity(kind, bidirectional, batch_first, with_state):
    tm, m = _pair(kind, input_size=H_IN, hidden_size=H, num_layers=2, batch_first=batch_first,
                  bidirectional=bidirectional)
    x, state = _sequence_inputs(kind, batch_first=batch_first, bidirectional=bidirectional, with_state=with_state)
    _check_parity(tm, m, x, state)


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_sequence_parity_without_bias(kind):
    tm, m = _pair(kind, input_size=H_IN, hidden_size=H, num_layers=2, bias=False, bidirectional=True)
    assert not any("bias" in name for name, _ in m.named_parameters())
    _check_parity(tm, m, *_sequence_inputs(kind, bidirectional=True, with_state=True))


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_unbatched_sequence_parity(kind):
    tm, m = _pair(kind, input_size=H_IN, hidden_size=H, num_layers=2, bidirectional=True)
    _check_parity(tm, m, *_sequence_inputs(kind, bidirectional=True, with_state=True, batched=False))


def test_relu_rnn_parity():
    tm, m = _pair("RNN", input_size=H_IN, hidden_size=H, num_layers=2, nonlinearity="relu", bidirectional=True)
    _check_parity(tm, m, *_sequence_inputs("RNN", bidirectional=True, with_state=True))


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "given_state"])
def test_lstm_projection_parity(with_state):
    tm, m = _pair("LSTM", input_size=H_IN, hidden_size=H, num_layers=2, proj_size=3, bidirectional=True)
    _check_parity(tm, m, *_sequence_inputs("LSTM", bidirectional=True, with_state=with_state, out_size=3))


def test_single_layer_long_sequence_parity():
    # MNIST-by-rows shape: 28 steps, batch first.
    tm, m = _pair("LSTM", input_size=H_IN, hidden_size=H, batch_first=True)
    _check_parity(tm, m, *_sequence_inputs("LSTM", batch_first=True, with_state=True, seq_len=28, num_layers=1))


def test_jit_forward_matches_eager():
    _, m = _pair("GRU", input_size=H_IN, hidden_size=H, num_layers=2, bidirectional=True, batch_first=True)
    x, state = _sequence_inputs("GRU", batch_first=True, bidirectional=True, with_state=True)
    y, h = m(x, state)
    jy, jh = avalon.jit(lambda model, x, h0: model(x, h0))(m, x, state)
    np.testing.assert_allclose(jy, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jh, h, rtol=1e-6, atol=1e-6)


# -- cells ------------------------------------------------------------------------------------

def _cell_inputs(kind, with_state, batched=True):
    rng = np.random.default_rng(5)
    lead = (N,) if batched else ()
    x = _randn(rng, lead + (H_IN,))
    if not with_state:
        return x, None
    h = _randn(rng, lead + (H,))
    return x, ((h, _randn(rng, lead + (H,))) if kind == "LSTMCell" else h)


CELLS = [("RNNCell", {}), ("RNNCell", {"nonlinearity": "relu"}), ("LSTMCell", {}), ("GRUCell", {})]


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("kind,extra", CELLS, ids=["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_cell_parity(kind, extra, with_state):
    tm, m = _pair(kind, input_size=H_IN, hidden_size=H, **extra)
    _check_parity(tm, m, *_cell_inputs(kind, with_state))


@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cell_parity_without_bias(kind):
    tm, m = _pair(kind, input_size=H_IN, hidden_size=H, bias=False)
    _check_parity(tm, m, *_cell_inputs(kind, True))


@pytest.mark.parametrize("kind", ["RNNCell", "LSTMCell", "GRUCell"])
def test_unbatched_cell_parity(kind):
    tm, m = _pair(kind, input_size=H_IN, hidden_size=H)
    _check_parity(tm, m, *_cell_inputs(kind, True, batched=False))


# -- dropout between layers ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_dropout_in_eval_mode_matches_torch_eval(kind):
    tm, m = _pair(kind, input_size=H_IN, hidden_size=H, num_layers=3, dropout=0.5, bidirectional=True)
    tm.eval()
    assert m.eval() is m and not m.training
    _check_parity(tm, m, *_sequence_inputs(kind, bidirectional=True, with_state=True, num_layers=3))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_dropout_of_one_in_training_matches_torch(kind):
    # p=1 zeroes deterministically: this pins dropout to the inputs of layers 2.., as in torch
    # (not the first layer's input, not the last layer's output).
    tm, m = _pair(kind, input_size=H_IN, hidden_size=H, num_layers=2, dropout=1.0, bidirectional=True)
    assert tm.training and m.training
    _check_parity(tm, m, *_sequence_inputs(kind, bidirectional=True, with_state=True))


def test_dropout_in_training_differs_from_eval_and_repeats_after_seed():
    _, m = _pair("LSTM", input_size=H_IN, hidden_size=H, num_layers=2, dropout=0.5)
    x, _ = _sequence_inputs("LSTM")
    eval_y, _ = m.eval()(x)
    m.train()
    avalon.manual_seed(11)
    y1, (h1, _) = m(x)
    y2, _ = m(x)
    avalon.manual_seed(11)
    y1_again, (h1_again, _) = m(x)
    assert np.abs(y1 - eval_y).max() > 1e-3, "training-mode dropout changed nothing"
    assert np.abs(y1 - y2).max() > 1e-3, "two draws gave the same dropout mask"
    np.testing.assert_array_equal(y1, y1_again)
    np.testing.assert_array_equal(h1, h1_again)
    # The first layer sees no dropout: its final state (h_n[0]) equals the eval one.
    _, (eval_h, _) = m.eval()(x)
    np.testing.assert_allclose(h1[0], eval_h[0], rtol=1e-6, atol=1e-7)
    assert np.abs(h1[1] - eval_h[1]).max() > 1e-3


def test_dropout_in_training_under_grad_repeats_after_seed():
    _, m = _pair("GRU", input_size=H_IN, hidden_size=H, num_layers=2, dropout=0.5)
    x, _ = _sequence_inputs("GRU")

    def loss(model, x):
        y, h = model(x)
        return (y * y).sum() + h.sum()

    avalon.manual_seed(5)
    v1, (g1, _) = avalon.grad(loss, m, x)
    v2, _ = avalon.grad(loss, m, x)
    avalon.manual_seed(5)
    v1_again, (g1_again, _) = avalon.grad(loss, m, x)
    eval_value, _ = avalon.grad(loss, m.eval(), x)
    assert v1 != v2 and v1 != eval_value
    assert v1 == v1_again
    np.testing.assert_array_equal(g1.weight_ih_l1, g1_again.weight_ih_l1)


def test_dropout_with_one_layer_warns_like_torch():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        nn.GRU(H_IN, H, dropout=0.2)


# -- structure, initialization, repr -------------------------------------------------------------

CONFIGS = [
    ("RNN", dict(num_layers=3, bidirectional=True, nonlinearity="relu")),
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3)),
    ("LSTM", dict(num_layers=2, bias=False, batch_first=True, dropout=0.25)),
    ("GRU", dict(num_layers=2, bias=False, bidirectional=True)),
    ("GRU", dict()),
    ("RNNCell", dict(bias=False, nonlinearity="relu")),
    ("LSTMCell", dict()),
    ("GRUCell", dict(bias=False)),
]
CONFIG_IDS = [f"{k}-{'-'.join(f'{a}={b}' for a, b in kw.items())}" for k, kw in CONFIGS]


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=CONFIG_IDS)
def test_parameter_names_shapes_and_repr_match_torch(kind, kw):
    tm = getattr(torch.nn, kind)(H_IN, H, **kw)
    m = getattr(nn, kind)(H_IN, H, **kw)
    assert [(n, tuple(p.shape)) for n, p in m.named_parameters()] == \
           [(n, tuple(p.shape)) for n, p in tm.named_parameters()]
    assert list(m.state_dict()) == list(tm.state_dict())
    assert repr(m) == repr(tm)


@pytest.mark.parametrize("kind,kw", CONFIGS, ids=CONFIG_IDS)
def test_default_initialization_is_torchs_uniform(kind, kw):
    hidden = 64  # enough draws per tensor to test the spread
    bound = 1.0 / np.sqrt(hidden)
    avalon.manual_seed(3)
    m = getattr(nn, kind)(H_IN, hidden, **kw)
    avalon.manual_seed(3)
    again = getattr(nn, kind)(H_IN, hidden, **kw)
    params = dict(m.named_parameters())
    for name, p in params.items():
        assert p.dtype == np.float32, name
        assert np.abs(p).max() <= bound, name
        assert abs(p.std() - bound / np.sqrt(3)) < 0.15 * bound / np.sqrt(3), name  # U(-b, b) has std b/sqrt(3)
        np.testing.assert_array_equal(p, getattr(again, name), err_msg=f"{name} not reproducible after manual_seed")
    firsts = [float(p.ravel()[0]) for p in params.values()]
    assert len(set(firsts)) == len(firsts), "parameters share their draws"


def test_float64_parameters_on_request():
    m = nn.LSTM(H_IN, H, dtype=np.float64)
    assert {p.dtype for p in m.parameters()} == {np.dtype(np.float64)}
    y, (h, c) = m(np.zeros((L, N, H_IN)))
    assert y.dtype == h.dtype == c.dtype == np.float64


def test_experimental_warning_is_emitted_once_per_class():
    code = (
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "import avalon.nn as nn\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for cls in (nn.RNN, nn.LSTM, nn.GRU):\n"
        "        cls(2, 3); cls(2, 3)\n"
        "    for cls in (nn.RNNCell, nn.LSTMCell, nn.GRUCell):\n"
        "        cls(2, 3); cls(2, 3)\n"
        "print('|'.join(f'{x.category.__name__}:{x.filename.rsplit(chr(47), 1)[-1]}:{x.message}' for x in w))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    records = out.split("|")
    names = ["RNN", "LSTM", "GRU", "RNNCell", "LSTMCell", "GRUCell"]
    assert len(records) == len(names), records
    for record, name in zip(records, names):
        assert record.startswith(f"ExperimentalWarning:<string>:avalon.nn.{name} is experimental (RNN)"), record
    table = avalon.stability()["symbols"]
    assert all(table[f"avalon.nn.{n}"] == ("RNN", "experimental") for n in names)


# -- errors -------------------------------------------------------------------------------------

def test_wrong_input_rank_names_layer_and_shapes():
    m = nn.LSTM(H_IN, H, batch_first=True)
    with pytest.raises(avalon.ShapeError) as err:
        m(np.zeros((2, 3, 4, H_IN), np.float32))
    msg = str(err.value)
    assert "LSTM(4, 6, batch_first=True)" in msg and "(N, L, H_in)" in msg and "(2, 3, 4, 4)" in msg
    assert "test_rnn_parity.py" in msg  # points at the calling line


def test_wrong_input_size_names_layer_and_shapes():
    m = nn.GRU(H_IN, H, num_layers=2)
    with pytest.raises(avalon.ShapeError, match=r"GRU\(4, 6, num_layers=2\).*input_size=4.*got shape \(5, 3, 7\)"):
        m(np.zeros((L, N, 7), np.float32))


def test_wrong_input_size_is_reported_while_tracing():
    m = nn.RNN(H_IN, H)
    with pytest.raises(avalon.ShapeError, match=r"RNN\(4, 6\).*got shape \(5, 3, 2\)"):
        avalon.grad(lambda model, x: model(x)[0].sum(), m, np.zeros((L, N, 2), np.float32))


def test_wrong_initial_state_shape():
    m = nn.RNN(H_IN, H, num_layers=2)
    x = np.zeros((L, N, H_IN), np.float32)
    with pytest.raises(avalon.ShapeError, match=r"expected h0 of shape \(2, 3, 6\), got shape \(1, 3, 6\)"):
        m(x, np.zeros((1, N, H), np.float32))
    lstm = nn.LSTM(H_IN, H, bidirectional=True)
    with pytest.raises(avalon.ShapeError, match=r"expected c0 of shape \(2, 3, 6\), got shape \(2, 3, 5\)"):
        lstm(x, (np.zeros((2, N, H), np.float32), np.zeros((2, N, 5), np.float32)))
    with pytest.raises(TypeError, match=r"\(h0, c0\)"):
        lstm(x, np.zeros((2, N, H), np.float32))


def test_cell_shape_errors():
    with pytest.raises(avalon.ShapeError, match=r"LSTMCell\(4, 6\).*\(N, 4\).*got shape \(3, 5\)"):
        nn.LSTMCell(H_IN, H)(np.zeros((N, 5), np.float32))
    with pytest.raises(avalon.ShapeError, match=r"GRUCell\(4, 6\).*got shape \(2, 3, 4\)"):
        nn.GRUCell(H_IN, H)(np.zeros((2, N, H_IN), np.float32))
    with pytest.raises(avalon.ShapeError, match=r"RNNCell\(4, 6\): expected hx of shape \(3, 6\).*got shape \(3, 7\)"):
        nn.RNNCell(H_IN, H)(np.zeros((N, H_IN), np.float32), np.zeros((N, 7), np.float32))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="nonlinearity"):
        nn.RNN(H_IN, H, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="dropout"):
        nn.LSTM(H_IN, H, num_layers=2, dropout=1.5)
    with pytest.raises(ValueError, match="proj_size has to be smaller than hidden_size"):
        nn.LSTM(H_IN, H, proj_size=H)
