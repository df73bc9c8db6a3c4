"""Port of nanoGPT (karpathy/nanoGPT model.py and the train.py step): a GPT
with tied token-embedding / output weights, causal self-attention (the
`scaled_dot_product_attention` path and the masked_fill path), AdamW with
decay / no-decay parameter groups, gradient clipping, and the learning rate
written into `param_groups` each iteration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as tnn
import torch.nn.functional as TF

import avalon
import avalon.nn as nn
import avalon.nn.functional as F
import avalon.optim as optim


@dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = 61
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True
    flash: bool = True


# -- PyTorch, as in nanoGPT ----------------------------------------------------------------------------------

class TLayerNorm(tnn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = tnn.Parameter(torch.ones(ndim))
        self.bias = tnn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input):
        return TF.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class TCausalSelfAttention(tnn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = tnn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = tnn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = tnn.Dropout(config.dropout)
        self.resid_dropout = tnn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = config.flash
        if not self.flash:
            self.register_buffer("bias", torch.tril(torch.ones(config.block_size, config.block_size))
                                 .view(1, 1, config.block_size, config.block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = TF.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                                dropout_p=self.dropout if self.training else 0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float('-inf'))
            att = TF.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return y


class TMLP(tnn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = tnn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = tnn.GELU()
        self.c_proj = tnn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = tnn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class TBlock(tnn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = TLayerNorm(config.n_embd, bias=config.bias)
        self.attn = TCausalSelfAttention(config)
        self.ln_2 = TLayerNorm(config.n_embd, bias=config.bias)
        self.mlp = TMLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class TGPT(tnn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = tnn.ModuleDict(dict(
            wte=tnn.Embedding(config.vocab_size, config.n_embd),
            wpe=tnn.Embedding(config.block_size, config.n_embd),
            drop=tnn.Dropout(config.dropout),
            h=tnn.ModuleList([TBlock(config) for _ in range(config.n_layer)]),
            ln_f=TLayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = tnn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, tnn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, tnn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = TF.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        param_dict = {pn: p for pn, p in self.named_parameters()}
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {'params': decay_params, 'weight_decay': weight_decay},
            {'params': nodecay_params, 'weight_decay': 0.0},
        ]
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas)


# -- Avalon, line by line -----------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(np.ones(ndim, np.float32))
        self.bias = nn.Parameter(np.zeros(ndim, np.float32)) if bias else None

    def forward(self, input):
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = config.flash
        if not self.flash:
            self.register_buffer("bias", avalon.tril(np.ones((config.block_size, config.block_size), np.float32))
                                 .reshape(1, 1, config.block_size, config.block_size))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = avalon.split(self.c_attn(x), 3, axis=2)
        k = k.reshape(B, T, self.n_head, C // self.n_head).swapaxes(1, 2)
        q = q.reshape(B, T, self.n_head, C // self.n_head).swapaxes(1, 2)
        v = v.reshape(B, T, self.n_head, C // self.n_head).swapaxes(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                               dropout_p=self.dropout if self.training else 0, is_causal=True)
        else:
            att = (q @ k.swapaxes(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
            att = avalon.masked_fill(att, self.bias[:, :, :T, :T] == 0, float('-inf'))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.swapaxes(1, 2).reshape(B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return y


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        n_params = sum(p.size for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.size
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        b, t = idx.shape
        pos = avalon.arange(0, t, dtype=np.int64)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        param_dict = {pn: p for pn, p in self.named_parameters()}
        decay_params = [p for n, p in param_dict.items() if p.ndim >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.ndim < 2]
        optim_groups = [
            {'params': decay_params, 'weight_decay': weight_decay},
            {'params': nodecay_params, 'weight_decay': 0.0},
        ]
        return optim.AdamW(optim_groups, lr=learning_rate, betas=betas)


def gpt_loss(model, X, Y):
    logits, loss = model(X, Y)
    return loss


# -- train.py's learning-rate schedule, shared --------------------------------------------------------------

def get_lr(it, learning_rate=6e-3, warmup_iters=2, lr_decay_iters=6, min_lr=6e-4):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def _batches(config, n, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, config.vocab_size, 400)
    out = []
    for _ in range(n):
        ix = rng.integers(0, len(data) - config.block_size, batch)
        x = np.stack([data[i:i + config.block_size] for i in ix]).astype(np.int64)
        y = np.stack([data[i + 1:i + 1 + config.block_size] for i in ix]).astype(np.int64)
        out.append((x, y))
    return out


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "masked_fill"])
def test_nanogpt_trains_like_torch(check, flash):
    config = GPTConfig(flash=flash)
    tmodel = TGPT(config)
    model = GPT(config)
    model.load_state_dict(tmodel.state_dict())
    assert model.transformer.wte.weight is model.lm_head.weight, "load_state_dict broke the weight tie"
    assert model.get_num_params() == tmodel.get_num_params()
    toptimizer = tmodel.configure_optimizers(0.1, 6e-3, (0.9, 0.95))
    optimizer = model.configure_optimizers(0.1, 6e-3, (0.9, 0.95))
    assert [len(g['params']) for g in optimizer.param_groups] == [len(g['params']) for g in toptimizer.param_groups]

    for it, (X, Y) in enumerate(_batches(config, 4)):
        lr = get_lr(it)
        for param_group in toptimizer.param_groups:
            param_group['lr'] = lr
        for param_group in optimizer.param_groups:
            param_group['lr'] = lr

        _, tloss = tmodel(torch.from_numpy(X), torch.from_numpy(Y))
        tloss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)

        loss, grads = avalon.grad(gpt_loss, model, X, Y)
        norm = nn.utils.clip_grad_norm_(grads[0], 1.0)

        check.loss(loss, tloss, it)
        check.close(norm, tnorm.numpy(), f"step {it}: total gradient norm")
        check.grads(tmodel, model, grads[0], it)
        toptimizer.step()
        toptimizer.zero_grad(set_to_none=True)
        optimizer.step(grads[0])
        optimizer.zero_grad(set_to_none=True)
        # the key projection's bias adds q . b_k to every score of a query's row, which
        # the softmax cancels: its gradient is zero in exact arithmetic
        keys = slice(config.n_embd, 2 * config.n_embd)
        check.params(tmodel, model, it, zero_grad={f"transformer.h.{i}.attn.c_attn.bias": (keys, 6e-3 * (it + 1))
                                                   for i in range(config.n_layer)})
    assert model.transformer.wte.weight is model.lm_head.weight, "the optimizer broke the weight tie"
