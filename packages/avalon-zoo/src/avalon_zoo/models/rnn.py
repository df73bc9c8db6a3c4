"""SequenceClassifier: an LSTM or GRU that reads a 28x28 image row by row (a
sequence of 28 rows of 28 pixels, batch_first) and classifies it from the last
layer's final hidden state.  Returns logits: train it with F.cross_entropy."""
from __future__ import annotations

import avalon.nn as nn

from ._shapes import check_input

KINDS = {"lstm": nn.LSTM, "gru": nn.GRU}


class SequenceClassifier(nn.Module):
    """kind "lstm" or "gru"; input (N, 28, 28) or (N, 1, 28, 28) (generally
    (N, seq_len, input_size)); output (N, num_classes) logits."""

    def __init__(self, kind: str = "lstm", hidden: int = 128, num_layers: int = 1, input_size: int = 28,
                 seq_len: int = 28, num_classes: int = 10):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"SequenceClassifier: kind must be one of {tuple(KINDS)}, got {kind!r}")
        self.kind, self.input_size, self.seq_len = kind, int(input_size), int(seq_len)
        self.rnn = KINDS[kind](input_size, hidden, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        rows = (None, self.seq_len, self.input_size)
        if check_input(self, x, rows, (None, 1, self.seq_len, self.input_size)) == 1:
            x = x.reshape(x.shape[0], self.seq_len, self.input_size)
        _, state = self.rnn(x)
        h_n = state[0] if self.kind == "lstm" else state  # LSTM returns (h_n, c_n)
        return self.fc(h_n[-1])                            # the last layer's final hidden state

    def extra_repr(self):
        return f"kind={self.kind!r}"
