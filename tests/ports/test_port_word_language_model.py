"""Port of pytorch/examples word_language_model (model.py's RNNModel and
main.py's train loop): embedding, 2-layer LSTM or GRU, decoder tied to the
encoder, truncated backpropagation through time with the hidden state carried
between batches, gradient clipping, and plain SGD.

main.py updates with `p.data.add_(p.grad, alpha=-lr)` per parameter; the port
writes that as `optim.SGD(model.parameters(), lr=lr).step(grads)`, the same
update.  The loss function returns the new hidden state as an auxiliary
output (`has_aux=True`), which `repackage_hidden`'s detach becomes: the next
step receives it as a plain array.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF

import avalon
import avalon.nn as nn
import avalon.nn.functional as F
import avalon.optim as optim

ntokens, emsize, nhid, nlayers, bptt, batch_size, clip, lr = 50, 24, 24, 2, 7, 4, 0.25, 5.0


# -- PyTorch, as in the example -------------------------------------------------------------------------------

class TRNNModel(tnn.Module):
    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False):
        super().__init__()
        self.ntoken = ntoken
        self.drop = tnn.Dropout(dropout)
        self.encoder = tnn.Embedding(ntoken, ninp)
        self.rnn = getattr(tnn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = tnn.Linear(nhid, ntoken)
        if tie_weights:
            if nhid != ninp:
                raise ValueError('When using the tied flag, nhid must be equal to emsize')
            self.decoder.weight = self.encoder.weight
        self.init_weights()
        self.rnn_type = rnn_type
        self.nhid = nhid
        self.nlayers = nlayers

    def init_weights(self):
        initrange = 0.1
        tnn.init.uniform_(self.encoder.weight, -initrange, initrange)
        tnn.init.zeros_(self.decoder.bias)
        tnn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.view(-1, self.ntoken)
        return TF.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        if self.rnn_type == 'LSTM':
            return (weight.new_zeros(self.nlayers, bsz, self.nhid),
                    weight.new_zeros(self.nlayers, bsz, self.nhid))
        return weight.new_zeros(self.nlayers, bsz, self.nhid)


def trepackage_hidden(h):
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(trepackage_hidden(v) for v in h)


# -- Avalon, line by line -----------------------------------------------------------------------------------

class RNNModel(nn.Module):
    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            if nhid != ninp:
                raise ValueError('When using the tied flag, nhid must be equal to emsize')
            self.decoder.weight = self.encoder.weight
        self.init_weights()
        self.rnn_type = rnn_type
        self.nhid = nhid
        self.nlayers = nlayers

    def init_weights(self):
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.reshape(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(iter(self.parameters()))
        if self.rnn_type == 'LSTM':
            return (np.zeros((self.nlayers, bsz, self.nhid), weight.dtype),
                    np.zeros((self.nlayers, bsz, self.nhid), weight.dtype))
        return np.zeros((self.nlayers, bsz, self.nhid), weight.dtype)


criterion = nn.NLLLoss()


def loss_fn(model, data, targets, hidden):
    output, hidden = model(data, hidden)
    return criterion(output, targets), hidden


# -- main.py's data handling, shared ------------------------------------------------------------------------

def batchify(data, bsz):
    nbatch = data.shape[0] // bsz
    data = data[:nbatch * bsz]
    return np.ascontiguousarray(data.reshape(bsz, -1).T)


def get_batch(source, i):
    seq_len = min(bptt, len(source) - 1 - i)
    data = source[i:i + seq_len]
    target = source[i + 1:i + 1 + seq_len].reshape(-1)
    return data, target


@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU"])
def test_word_language_model_trains_like_torch(check, rnn_type):
    corpus = np.random.default_rng(0).integers(0, ntokens, 4 * bptt * batch_size + batch_size).astype(np.int64)
    train_data = batchify(corpus, batch_size)

    tmodel = TRNNModel(rnn_type, ntokens, emsize, nhid, nlayers, dropout=0.0, tie_weights=True)
    model = RNNModel(rnn_type, ntokens, emsize, nhid, nlayers, dropout=0.0, tie_weights=True)
    model.load_state_dict(tmodel.state_dict())
    assert model.decoder.weight is model.encoder.weight
    optimizer = optim.SGD(model.parameters(), lr=lr)

    tmodel.train()
    model.train()
    thidden = tmodel.init_hidden(batch_size)
    hidden = model.init_hidden(batch_size)
    for step, i in enumerate(range(0, train_data.shape[0] - 1, bptt)):
        data, targets = get_batch(train_data, i)
        tmodel.zero_grad()
        thidden = trepackage_hidden(thidden)
        toutput, thidden = tmodel(torch.from_numpy(data), thidden)
        tloss = TF.nll_loss(toutput, torch.from_numpy(targets))
        tloss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_(tmodel.parameters(), clip)

        (loss, hidden), grads = avalon.grad(loss_fn, model, data, targets, hidden, argnums=0, has_aux=True)
        norm = nn.utils.clip_grad_norm_(grads[0], clip)

        check.loss(loss, tloss, step)
        check.close(norm, tnorm.numpy(), f"step {step}: total gradient norm")
        check.grads(tmodel, model, grads[0], step)
        for p in tmodel.parameters():
            p.data.add_(p.grad, alpha=-lr)
        optimizer.step(grads[0])
        check.params(tmodel, model, step)
        states = [(hidden, thidden)] if rnn_type == "GRU" else list(zip(hidden, thidden))
        for mine, theirs in states:
            check.close(mine, theirs.detach().numpy(), f"step {step}: carried hidden state")
    assert step >= 3
