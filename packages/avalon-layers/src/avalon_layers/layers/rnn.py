"""Recurrent layers: RNN, LSTM, GRU and their single-step cells (avalon.nn.*).

Constructor signatures, parameter names (weight_ih_l0, ..._reverse), layouts,
gate orders (LSTM: i, f, g, o; GRU: r, z, n) and initialization follow PyTorch,
so a torch state_dict converted with {k: v.detach().numpy()} loads unchanged.

The time loop is a Python loop: under avalon.grad/jit it is unrolled into the
trace.  The input projections of all time steps are computed by one matmul per
layer and direction before the loop; only the hidden-to-hidden product runs
per step.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

import avalon
from avalon.errors import at, user_location

from ..module import Module, Parameter
from ..registry import export

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


# -- initialization and checks ---------------------------------------------------------

def _uniform(shape, bound, dtype, device):
    """A parameter drawn from U(-bound, bound), from avalon's generator (repeatable after
    avalon.manual_seed)."""
    u = avalon.random_uniform(shape, dtype, device=device)
    return Parameter(((u * 2.0 - 1.0) * bound).astype(dtype, copy=False))


def _shape_error(layer, msg):
    return avalon.ShapeError(f"{layer!r}: {msg}{at(user_location())}")


def _param_dtype(dtype):
    dtype = np.dtype(np.float32 if dtype is None else dtype)
    if dtype.kind != "f":
        raise avalon.DtypeError(f"recurrent layers need a floating dtype, got {dtype}")
    return dtype


# -- one time step of each cell kind ---------------------------------------------------------
# `xp` is the precomputed input projection W_ih x + b_ih of this step.

def _rnn_step(nonlinearity, xp, h, w_hh, b_hh):
    pre = xp + avalon.linear(h, w_hh, b_hh)
    return avalon.tanh(pre) if nonlinearity == "tanh" else avalon.relu(pre)


def _lstm_step(xp, h, c, w_hh, b_hh, w_hr=None):
    gates = xp + avalon.linear(h, w_hh, b_hh)
    i, f, g, o = avalon.split(gates, 4, axis=-1)
    c = avalon.sigmoid(f) * c + avalon.sigmoid(i) * avalon.tanh(g)
    h = avalon.sigmoid(o) * avalon.tanh(c)
    if w_hr is not None:
        h = avalon.linear(h, w_hr)
    return h, c


def _gru_step(xp, h, w_hh, b_hh):
    x_r, x_z, x_n = avalon.split(xp, 3, axis=-1)
    h_r, h_z, h_n = avalon.split(avalon.linear(h, w_hh, b_hh), 3, axis=-1)
    r = avalon.sigmoid(x_r + h_r)
    z = avalon.sigmoid(x_z + h_z)
    n = avalon.tanh(x_n + r * h_n)  # torch: b_hn stays inside r * (...)
    return (1.0 - z) * n + z * h


# -- multi-layer sequence modules ----------------------------------------------------------

class _RNNBase(Module):
    """Shared machinery of RNN, LSTM and GRU (PyTorch's RNNBase)."""

    def __init__(self, mode, input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__()
        self._check_config(mode, input_size, hidden_size, num_layers, dropout, proj_size)
        self.mode = mode
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.num_layers, self.bias = int(num_layers), bool(bias)
        self.batch_first, self.dropout = bool(batch_first), float(dropout)
        self.bidirectional, self.proj_size = bool(bidirectional), int(proj_size)
        self._init_parameters(_param_dtype(dtype), device)

    @staticmethod
    def _check_config(mode, input_size, hidden_size, num_layers, dropout, proj_size):
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout <= 1):
            raise ValueError("dropout should be a number in range [0, 1] representing the probability of "
                             "an element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers=1",
                          UserWarning, stacklevel=5)
        if int(input_size) <= 0 or int(hidden_size) <= 0 or int(num_layers) <= 0:
            raise ValueError(f"input_size, hidden_size and num_layers must be positive, got {input_size}, "
                             f"{hidden_size}, {num_layers}")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size and mode != "LSTM":
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

    @property
    def num_directions(self):
        return 2 if self.bidirectional else 1

    @property
    def _out_size(self):
        return self.proj_size or self.hidden_size

    def _init_parameters(self, dtype, device):
        # Attribute order is torch's _flat_weights_names order, so named_parameters matches.
        gates, bound = _GATES[self.mode] * self.hidden_size, 1.0 / math.sqrt(self.hidden_size)
        for layer in range(self.num_layers):
            layer_in = self.input_size if layer == 0 else self._out_size * self.num_directions
            for suffix in ("", "_reverse")[:self.num_directions]:
                shapes = {"weight_ih": (gates, layer_in), "weight_hh": (gates, self._out_size)}
                if self.bias:
                    shapes.update(bias_ih=(gates,), bias_hh=(gates,))
                if self.proj_size:
                    shapes["weight_hr"] = (self.proj_size, self.hidden_size)
                for kind, shape in shapes.items():
                    setattr(self, f"{kind}_l{layer}{suffix}", _uniform(shape, bound, dtype, device))

    def _weights(self, layer, suffix):
        get = lambda kind: getattr(self, f"{kind}_l{layer}{suffix}", None)  # noqa: E731
        return get("weight_ih"), get("bias_ih"), get("weight_hh"), get("bias_hh"), get("weight_hr")

    def flatten_parameters(self):
        """No-op, for code written against PyTorch (cuDNN weight packing)."""

    # -- input handling ------------------------------------------------------------------------
    def _check_input(self, x):
        shape = tuple(x.shape)
        layout = "(N, L, H_in)" if self.batch_first else "(L, N, H_in)"
        if len(shape) not in (2, 3):
            raise _shape_error(self, f"expected an input of rank 3 {layout} or rank 2 (L, H_in) "
                                     f"with H_in={self.input_size}, got shape {shape}")
        if shape[-1] != self.input_size:
            raise _shape_error(self, f"input.size(-1) must be equal to input_size={self.input_size}: "
                                     f"expected {layout} with H_in={self.input_size}, got shape {shape}")

    def _check_state(self, state, name, batch, size, batched):
        expected = (self.num_layers * self.num_directions,) + ((batch,) if batched else ()) + (size,)
        if tuple(state.shape) != expected:
            raise _shape_error(self, f"expected {name} of shape {expected}, got shape {tuple(state.shape)}")

    def _initial_states(self, hx, x, batch, batched):
        """Per-(layer, direction) lists of the initial h (and c for LSTM), each (N, H)."""
        sizes = [("h0", self._out_size)] + ([("c0", self.hidden_size)] if self.mode == "LSTM" else [])
        if hx is None:
            count = self.num_layers * self.num_directions
            zero = lambda size: avalon.zeros((batch, size), x.dtype, like=x)  # noqa: E731
            return [[zero(size) for _ in range(count)] for _, size in sizes]
        states = hx if self.mode == "LSTM" else (hx,)
        if self.mode == "LSTM" and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError(f"{type(self).__name__}: hx must be a tuple (h0, c0)")
        out = []
        for (name, size), s in zip(sizes, states):
            self._check_state(s, name, batch, size, batched)
            if not batched:
                s = avalon.expand_dims(s, 1)
            out.append([s[k] for k in range(s.shape[0])])
        return out

    # -- the recurrence ------------------------------------------------------------------------
    def forward(self, input, hx=None):
        """input (L, N, H_in) ((N, L, H_in) with batch_first, or unbatched (L, H_in));
        returns (output, h_n), or (output, (h_n, c_n)) for LSTM, as in PyTorch."""
        self._check_input(input)
        batched = len(input.shape) == 3
        x = input if batched else avalon.expand_dims(input, 1)
        if batched and self.batch_first:
            x = avalon.swapaxes(x, 0, 1)
        states = self._initial_states(hx, x, x.shape[1], batched)
        finals = [[] for _ in states]
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = avalon.dropout(x, self.dropout, self.training)
            outs = []
            for d, suffix in enumerate(("", "_reverse")[:self.num_directions]):
                k = layer * self.num_directions + d
                y, last = self._run_direction(x, [s[k] for s in states], self._weights(layer, suffix), d == 1)
                outs.append(y)
                for f, s in zip(finals, last):
                    f.append(s)
            x = outs[0] if len(outs) == 1 else avalon.concatenate(outs, axis=-1)
        return self._pack_result(x, [avalon.stack(f, 0) for f in finals], batched)

    def _run_direction(self, x, state, weights, reverse):
        """One layer in one direction over the whole sequence x (L, N, H): returns (outputs, final state)."""
        w_ih, b_ih, w_hh, b_hh, w_hr = weights
        proj = avalon.linear(x, w_ih, b_ih)  # every time step's input projection in one matmul
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        outputs = [None] * x.shape[0]
        for t in steps:
            state = self._step(proj[t], state, w_hh, b_hh, w_hr)
            outputs[t] = state[0]
        return avalon.stack(outputs, 0), state

    def _step(self, xp, state, w_hh, b_hh, w_hr):
        if self.mode == "LSTM":
            return list(_lstm_step(xp, state[0], state[1], w_hh, b_hh, w_hr))
        if self.mode == "GRU":
            return [_gru_step(xp, state[0], w_hh, b_hh)]
        return [_rnn_step("tanh" if self.mode == "RNN_TANH" else "relu", xp, state[0], w_hh, b_hh)]

    def _pack_result(self, y, finals, batched):
        if not batched:
            y = avalon.squeeze(y, 1)
            finals = [avalon.squeeze(f, 1) for f in finals]
        elif self.batch_first:
            y = avalon.swapaxes(y, 0, 1)
        return y, (tuple(finals) if self.mode == "LSTM" else finals[0])

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        return s


@export("nn", "RNN")
class RNN(_RNNBase):
    """Elman RNN: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh) (or relu), as torch.nn.RNN."""

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True,
                 batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None):
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        super().__init__(modes[nonlinearity], input_size, hidden_size, num_layers, bias, batch_first,
                         dropout, bidirectional, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity


@export("nn", "RNN")
class LSTM(_RNNBase):
    """Long short-term memory (gates i, f, g, o; optional projection proj_size), as torch.nn.LSTM.
    hx is (h0, c0); returns (output, (h_n, c_n))."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None):
        super().__init__("LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, proj_size, device=device, dtype=dtype)


@export("nn", "RNN")
class GRU(_RNNBase):
    """Gated recurrent unit (gates r, z, n; n = tanh(W_in x + b_in + r * (W_hn h + b_hn))), as torch.nn.GRU."""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None):
        super().__init__("GRU", input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, device=device, dtype=dtype)


# -- single-step cells -----------------------------------------------------------------------

class _CellBase(Module):
    """Shared machinery of RNNCell, LSTMCell and GRUCell (PyTorch's RNNCellBase)."""

    def __init__(self, input_size, hidden_size, bias, gates, device, dtype):
        super().__init__()
        if int(input_size) <= 0 or int(hidden_size) <= 0:
            raise ValueError(f"input_size and hidden_size must be positive, got {input_size}, {hidden_size}")
        self.input_size, self.hidden_size, self.bias = int(input_size), int(hidden_size), bool(bias)
        dtype, bound = _param_dtype(dtype), 1.0 / math.sqrt(self.hidden_size)
        self.weight_ih = _uniform((gates * self.hidden_size, self.input_size), bound, dtype, device)
        self.weight_hh = _uniform((gates * self.hidden_size, self.hidden_size), bound, dtype, device)
        if self.bias:
            self.bias_ih = _uniform((gates * self.hidden_size,), bound, dtype, device)
            self.bias_hh = _uniform((gates * self.hidden_size,), bound, dtype, device)
        else:
            self.bias_ih = self.bias_hh = None

    def _prepare(self, input, states):
        """Checks shapes; returns (input projection, states), batched (N, ...), and whether input was batched."""
        shape = tuple(input.shape)
        if len(shape) not in (1, 2) or shape[-1] != self.input_size:
            raise _shape_error(self, f"expected an input of shape (N, {self.input_size}) or ({self.input_size},), "
                                     f"got shape {shape}")
        batched = len(shape) == 2
        x = input if batched else avalon.expand_dims(input, 0)
        expected = ((shape[0],) if batched else ()) + (self.hidden_size,)
        out = []
        for name, s in states:
            if s is None:
                s = avalon.zeros((x.shape[0], self.hidden_size), x.dtype, like=x)
            elif tuple(s.shape) != expected:
                raise _shape_error(self, f"expected {name} of shape {expected} for an input of shape {shape}, "
                                         f"got shape {tuple(s.shape)}")
            elif not batched:
                s = avalon.expand_dims(s, 0)
            out.append(s)
        return avalon.linear(x, self.weight_ih, self.bias_ih), out, batched

    @staticmethod
    def _unbatch(results, batched):
        return results if batched else [avalon.squeeze(r, 0) for r in results]

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        return s


@export("nn", "RNN")
class RNNCell(_CellBase):
    """One step of an Elman RNN: h' = tanh(W_ih x + b_ih + W_hh h + b_hh) (or relu), as torch.nn.RNNCell."""

    def __init__(self, input_size, hidden_size, bias=True, nonlinearity="tanh", device=None, dtype=None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity: {nonlinearity}")
        super().__init__(input_size, hidden_size, bias, 1, device, dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input, hx=None):
        xp, (h,), batched = self._prepare(input, [("hx", hx)])
        return self._unbatch([_rnn_step(self.nonlinearity, xp, h, self.weight_hh, self.bias_hh)], batched)[0]


@export("nn", "RNN")
class LSTMCell(_CellBase):
    """One LSTM step; hx is (h, c) or None; returns (h', c'), as torch.nn.LSTMCell."""

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, 4, device, dtype)

    def forward(self, input, hx=None):
        if hx is not None and not (isinstance(hx, (tuple, list)) and len(hx) == 2):
            raise TypeError("LSTMCell: hx must be a tuple (h, c)")
        h, c = (None, None) if hx is None else hx
        xp, (h, c), batched = self._prepare(input, [("h", h), ("c", c)])
        return tuple(self._unbatch(_lstm_step(xp, h, c, self.weight_hh, self.bias_hh), batched))


@export("nn", "RNN")
class GRUCell(_CellBase):
    """One GRU step (n = tanh(W_in x + b_in + r * (W_hn h + b_hn))), as torch.nn.GRUCell."""

    def __init__(self, input_size, hidden_size, bias=True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, 3, device, dtype)

    def forward(self, input, hx=None):
        xp, (h,), batched = self._prepare(input, [("hx", hx)])
        return self._unbatch([_gru_step(xp, h, self.weight_hh, self.bias_hh)], batched)[0]
