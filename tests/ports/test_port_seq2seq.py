"""Port of the PyTorch tutorial "NLP From Scratch: Translation with a Sequence
to Sequence Network and Attention" (intermediate/seq2seq_translation_tutorial):
a GRU encoder, a GRU decoder with Bahdanau (additive) attention and teacher
forcing, NLLLoss, and one Adam optimizer per network, both networks
differentiated in one loss.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as TF

import avalon
import avalon.nn as nn
import avalon.nn.functional as F
import avalon.optim as optim

SOS_token, MAX_LENGTH = 0, 6
input_lang_n_words, output_lang_n_words, hidden_size = 30, 25, 16


# -- PyTorch, as in the tutorial -------------------------------------------------------------------------------

class TEncoderRNN(tnn.Module):
    def __init__(self, input_size, hidden_size, dropout_p=0.1):
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = tnn.Embedding(input_size, hidden_size)
        self.gru = tnn.GRU(hidden_size, hidden_size, batch_first=True)
        self.dropout = tnn.Dropout(dropout_p)

    def forward(self, input):
        embedded = self.dropout(self.embedding(input))
        output, hidden = self.gru(embedded)
        return output, hidden


class TBahdanauAttention(tnn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.Wa = tnn.Linear(hidden_size, hidden_size)
        self.Ua = tnn.Linear(hidden_size, hidden_size)
        self.Va = tnn.Linear(hidden_size, 1)

    def forward(self, query, keys):
        scores = self.Va(torch.tanh(self.Wa(query) + self.Ua(keys)))
        scores = scores.squeeze(2).unsqueeze(1)
        weights = TF.softmax(scores, dim=-1)
        context = torch.bmm(weights, keys)
        return context, weights


class TAttnDecoderRNN(tnn.Module):
    def __init__(self, hidden_size, output_size, dropout_p=0.1):
        super().__init__()
        self.embedding = tnn.Embedding(output_size, hidden_size)
        self.attention = TBahdanauAttention(hidden_size)
        self.gru = tnn.GRU(2 * hidden_size, hidden_size, batch_first=True)
        self.out = tnn.Linear(hidden_size, output_size)
        self.dropout = tnn.Dropout(dropout_p)

    def forward(self, encoder_outputs, encoder_hidden, target_tensor=None):
        batch_size = encoder_outputs.size(0)
        decoder_input = torch.empty(batch_size, 1, dtype=torch.long).fill_(SOS_token)
        decoder_hidden = encoder_hidden
        decoder_outputs = []
        attentions = []
        for i in range(MAX_LENGTH):
            decoder_output, decoder_hidden, attn_weights = self.forward_step(
                decoder_input, decoder_hidden, encoder_outputs)
            decoder_outputs.append(decoder_output)
            attentions.append(attn_weights)
            if target_tensor is not None:
                decoder_input = target_tensor[:, i].unsqueeze(1)  # Teacher forcing
            else:
                _, topi = decoder_output.topk(1)
                decoder_input = topi.squeeze(-1).detach()
        decoder_outputs = torch.cat(decoder_outputs, dim=1)
        decoder_outputs = TF.log_softmax(decoder_outputs, dim=-1)
        attentions = torch.cat(attentions, dim=1)
        return decoder_outputs, decoder_hidden, attentions

    def forward_step(self, input, hidden, encoder_outputs):
        embedded = self.dropout(self.embedding(input))
        query = hidden.permute(1, 0, 2)
        context, attn_weights = self.attention(query, encoder_outputs)
        input_gru = torch.cat((embedded, context), dim=2)
        output, hidden = self.gru(input_gru, hidden)
        output = self.out(output)
        return output, hidden, attn_weights


# -- Avalon, line by line -----------------------------------------------------------------------------------

class EncoderRNN(nn.Module):
    def __init__(self, input_size, hidden_size, dropout_p=0.1):
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(input_size, hidden_size)
        self.gru = nn.GRU(hidden_size, hidden_size, batch_first=True)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, input):
        embedded = self.dropout(self.embedding(input))
        output, hidden = self.gru(embedded)
        return output, hidden


class BahdanauAttention(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.Wa = nn.Linear(hidden_size, hidden_size)
        self.Ua = nn.Linear(hidden_size, hidden_size)
        self.Va = nn.Linear(hidden_size, 1)

    def forward(self, query, keys):
        scores = self.Va(avalon.tanh(self.Wa(query) + self.Ua(keys)))
        scores = avalon.expand_dims(scores.squeeze(2), 1)
        weights = F.softmax(scores, dim=-1)
        context = weights @ keys
        return context, weights


class AttnDecoderRNN(nn.Module):
    def __init__(self, hidden_size, output_size, dropout_p=0.1):
        super().__init__()
        self.embedding = nn.Embedding(output_size, hidden_size)
        self.attention = BahdanauAttention(hidden_size)
        self.gru = nn.GRU(2 * hidden_size, hidden_size, batch_first=True)
        self.out = nn.Linear(hidden_size, output_size)
        self.dropout = nn.Dropout(dropout_p)

    def forward(self, encoder_outputs, encoder_hidden, target_tensor=None):
        batch_size = encoder_outputs.shape[0]
        decoder_input = np.full((batch_size, 1), SOS_token, dtype=np.int64)
        decoder_hidden = encoder_hidden
        decoder_outputs = []
        attentions = []
        for i in range(MAX_LENGTH):
            decoder_output, decoder_hidden, attn_weights = self.forward_step(
                decoder_input, decoder_hidden, encoder_outputs)
            decoder_outputs.append(decoder_output)
            attentions.append(attn_weights)
            if target_tensor is not None:
                decoder_input = target_tensor[:, i:i + 1]  # Teacher forcing
            else:
                _, topi = avalon.topk(decoder_output, 1)
                decoder_input = avalon.stop_gradient(topi.squeeze(-1))
        decoder_outputs = avalon.concatenate(decoder_outputs, axis=1)
        decoder_outputs = F.log_softmax(decoder_outputs, dim=-1)
        attentions = avalon.concatenate(attentions, axis=1)
        return decoder_outputs, decoder_hidden, attentions

    def forward_step(self, input, hidden, encoder_outputs):
        embedded = self.dropout(self.embedding(input))
        query = hidden.transpose(1, 0, 2)
        context, attn_weights = self.attention(query, encoder_outputs)
        input_gru = avalon.concatenate((embedded, context), axis=2)
        output, hidden = self.gru(input_gru, hidden)
        output = self.out(output)
        return output, hidden, attn_weights


criterion = nn.NLLLoss()


def train_loss(encoder, decoder, input_tensor, target_tensor):
    encoder_outputs, encoder_hidden = encoder(input_tensor)
    decoder_outputs, _, _ = decoder(encoder_outputs, encoder_hidden, target_tensor)
    return criterion(decoder_outputs.reshape(-1, decoder_outputs.shape[-1]), target_tensor.reshape(-1))


def _batches(n, batch=5, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(1, input_lang_n_words, (batch, MAX_LENGTH)).astype(np.int64),
             rng.integers(1, output_lang_n_words, (batch, MAX_LENGTH)).astype(np.int64)) for _ in range(n)]


def test_seq2seq_with_attention_trains_like_torch(check):
    tencoder = TEncoderRNN(input_lang_n_words, hidden_size, dropout_p=0.0)
    tdecoder = TAttnDecoderRNN(hidden_size, output_lang_n_words, dropout_p=0.0)
    encoder = EncoderRNN(input_lang_n_words, hidden_size, dropout_p=0.0)
    decoder = AttnDecoderRNN(hidden_size, output_lang_n_words, dropout_p=0.0)
    encoder.load_state_dict(tencoder.state_dict())
    decoder.load_state_dict(tdecoder.state_dict())
    tcriterion = tnn.NLLLoss()
    tencoder_optimizer = torch.optim.Adam(tencoder.parameters(), lr=1e-2)
    tdecoder_optimizer = torch.optim.Adam(tdecoder.parameters(), lr=1e-2)
    encoder_optimizer = optim.Adam(encoder.parameters(), lr=1e-2)
    decoder_optimizer = optim.Adam(decoder.parameters(), lr=1e-2)

    for step, (input_tensor, target_tensor) in enumerate(_batches(3)):
        tinput, ttarget = torch.from_numpy(input_tensor), torch.from_numpy(target_tensor)
        tencoder_optimizer.zero_grad()
        tdecoder_optimizer.zero_grad()
        encoder_outputs, encoder_hidden = tencoder(tinput)
        decoder_outputs, _, _ = tdecoder(encoder_outputs, encoder_hidden, ttarget)
        tloss = tcriterion(decoder_outputs.view(-1, decoder_outputs.size(-1)), ttarget.view(-1))
        tloss.backward()

        loss, grads = avalon.grad(train_loss, encoder, decoder, input_tensor, target_tensor)
        check.loss(loss, tloss, step)
        check.grads(tencoder, encoder, grads[0], step)
        check.grads(tdecoder, decoder, grads[1], step)
        tencoder_optimizer.step()
        tdecoder_optimizer.step()
        encoder_optimizer.step(grads[0])
        decoder_optimizer.step(grads[1])
        check.params(tencoder, encoder, step)
        # Va's bias adds the same amount to every attention score, which the softmax
        # cancels: its gradient is zero in exact arithmetic
        check.params(tdecoder, decoder, step, zero_grad={"attention.Va.bias": (slice(None), 1e-2 * (step + 1))})


def test_seq2seq_greedy_decoding_matches_torch(check):
    tencoder = TEncoderRNN(input_lang_n_words, hidden_size, dropout_p=0.0).eval()
    tdecoder = TAttnDecoderRNN(hidden_size, output_lang_n_words, dropout_p=0.0).eval()
    encoder = EncoderRNN(input_lang_n_words, hidden_size).eval()
    decoder = AttnDecoderRNN(hidden_size, output_lang_n_words).eval()
    encoder.load_state_dict(tencoder.state_dict())
    decoder.load_state_dict(tdecoder.state_dict())
    (input_tensor, _), = _batches(1, seed=4)

    @avalon.jit
    def evaluate(encoder, decoder, input_tensor):
        encoder_outputs, encoder_hidden = encoder(input_tensor)
        decoder_outputs, _, attentions = decoder(encoder_outputs, encoder_hidden)
        return decoder_outputs, attentions

    with torch.no_grad():
        toutputs, _, tattn = tdecoder(*tencoder(torch.from_numpy(input_tensor)))
    outputs, attn = evaluate(encoder, decoder, input_tensor)
    check.close(outputs, toutputs.numpy(), "greedy decoder log-probabilities")
    check.close(attn, tattn.numpy(), "attention weights")
    np.testing.assert_array_equal(outputs.argmax(-1), toutputs.argmax(-1).numpy())
