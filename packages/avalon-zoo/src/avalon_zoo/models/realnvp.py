"""RealNVP (Dinh et al. 2017): a normalizing flow of affine coupling layers, for
flat data: 2-D toy data, or 28x28 images flattened to 784 values.

Each coupling layer keeps the entries where its binary mask is 1 and moves the others:

    y = m * x + (1 - m) * (x * exp(s) + t),   (s, t) = net(m * x),
    s = scale * tanh(raw s)                   (bounded: stable exp)
    log|det dy/dx| = sum over the moved entries of s

Masks alternate between a checkerboard and its complement (on images, (i + j) % 2
over the pixel grid; on vectors, i % 2), so every entry is moved by every other
layer.  The s/t networks are MLPs whose last layer starts at zero: the untrained
flow is the identity.  z = f(x) has a standard normal base density, so

    log p(x) = log N(f(x); 0, I) + sum of the layers' log-determinants.

Images (logit_alpha set): pixels x in [0, 1], dequantized beforehand (see
`dequantize`), go through the logit transform y = logit(alpha + (1 - 2 alpha) x)
first; its log-determinant is part of log_prob, so log_prob is the density of
the dequantized pixels in [0, 1]^D and `bits_per_dim` turns it into bits per
pixel of the 8-bit images.
"""
from __future__ import annotations

import math

import numpy as np

import avalon
import avalon.nn as nn

from ._shapes import check_input

LOG_2PI = math.log(2 * math.pi)


def checkerboard(dim: int, image_shape=None, parity: int = 0) -> np.ndarray:
    """Float32 mask of `dim` entries: 1 where (row + column) % 2 == parity on the
    image grid (image_shape (C, H, W) or (H, W)), or where index % 2 == parity."""
    if image_shape is None:
        return (np.arange(dim) % 2 == parity).astype(np.float32)
    h, w = image_shape[-2:]
    grid = (np.add.outer(np.arange(h), np.arange(w)) % 2 == parity).astype(np.float32)
    return np.broadcast_to(grid, tuple(image_shape)).reshape(-1).copy()


class AffineCoupling(nn.Module):
    """One affine coupling layer with a fixed mask (a buffer: saved, never trained)."""

    def __init__(self, mask: np.ndarray, hidden: int = 256, num_hidden_layers: int = 2):
        super().__init__()
        dim = int(mask.shape[0])
        self.dim = dim
        self.register_buffer("mask", np.asarray(mask, np.float32))
        layers, width = [], dim
        for _ in range(num_hidden_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        last = nn.Linear(width, 2 * dim)
        last.weight[...] = 0  # start as the identity map
        last.bias[...] = 0
        self.net = nn.Sequential(*layers, last)
        self.scale = nn.Parameter(np.ones(dim, np.float32))

    def _scale_shift(self, kept):
        h = self.net(kept)
        moved = 1.0 - self.mask
        s = self.scale * avalon.tanh(h[:, :self.dim]) * moved
        t = h[:, self.dim:] * moved
        return s, t

    def forward(self, x):
        """(y, log|det dy/dx| per example)."""
        kept = x * self.mask
        s, t = self._scale_shift(kept)
        y = kept + (1.0 - self.mask) * (x * avalon.exp(s) + t)
        return y, avalon.sum(s, axis=1)

    def inverse(self, y):
        kept = y * self.mask
        s, t = self._scale_shift(kept)
        return kept + (1.0 - self.mask) * ((y - t) * avalon.exp(-s))


class RealNVP(nn.Module):
    """Normalizing flow over `dim`-dimensional data.

    image_shape: (C, H, W) of images flattened to dim (checkerboard masks on the
        pixel grid, inputs (N, dim) or (N, C, H, W), samples shaped as images).
    logit_alpha: apply the logit transform to pixels in [0, 1] first (images; 0.05
        as in the RealNVP paper); None for data that is already unbounded.
    """

    def __init__(self, dim: int = 2, num_coupling: int = 8, hidden: int = 256, num_hidden_layers: int = 2,
                 image_shape=None, logit_alpha=None):
        super().__init__()
        self.dim = int(dim)
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)
        if self.image_shape is not None and math.prod(self.image_shape) != self.dim:
            raise ValueError(f"RealNVP: image_shape {self.image_shape} does not hold dim={dim} values")
        self.logit_alpha = None if logit_alpha is None else float(logit_alpha)
        self.couplings = nn.ModuleList([
            AffineCoupling(checkerboard(self.dim, self.image_shape, parity=k % 2), hidden, num_hidden_layers)
            for k in range(num_coupling)])

    # -- shapes ------------------------------------------------------------------------------
    def _flat(self, x):
        layouts = [(None, self.dim)] + ([(None, *self.image_shape)] if self.image_shape else [])
        check_input(self, x, *layouts)
        return x.reshape(x.shape[0], self.dim)

    # -- the logit transform of pixels ----------------------------------------------------------
    def _to_logit(self, x):
        a = self.logit_alpha
        p = x * (1.0 - 2.0 * a) + a
        log_p, log_q = avalon.log(p), avalon.log(1.0 - p)
        logdet = avalon.sum(-log_p - log_q, axis=1) + self.dim * math.log(1.0 - 2.0 * a)
        return log_p - log_q, logdet

    def _from_logit(self, y):
        a = self.logit_alpha
        return (avalon.sigmoid(y) - a) * (1.0 / (1.0 - 2.0 * a))

    # -- the flow -----------------------------------------------------------------------------------
    def transform(self, x):
        """x (data space) -> (z, log|det dz/dx| per example), z (N, dim)."""
        x = self._flat(x)
        logdet = 0.0
        if self.logit_alpha is not None:
            x, logdet = self._to_logit(x)
        for layer in self.couplings:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z):
        """z (N, dim) -> x in the data space, (N, dim) (or (N, *image_shape))."""
        check_input(self, z, (None, self.dim))
        for layer in reversed(list(self.couplings)):
            z = layer.inverse(z)
        if self.logit_alpha is not None:
            z = self._from_logit(z)
        return z if self.image_shape is None else z.reshape((z.shape[0],) + self.image_shape)

    def log_prob(self, x):
        """log p(x) per example, (N,), in nats (for images: the density of the
        dequantized pixels in [0, 1]^dim)."""
        z, logdet = self.transform(x)
        log_pz = avalon.sum(z * z, axis=1) * -0.5 - 0.5 * self.dim * LOG_2PI
        return log_pz + logdet

    def forward(self, x):
        return self.log_prob(x)

    def sample(self, n: int, temperature: float = 1.0):
        """n draws from the flow: z ~ N(0, temperature^2 I) mapped back to the data
        space (temperature < 1 trades variety for typical-looking samples)."""
        like = self.couplings[0].scale
        z = avalon.random_normal((int(n), self.dim), np.dtype(like.dtype), like=like)
        return self.inverse(z if temperature == 1.0 else z * float(temperature))


def nll_loss(model: RealNVP, x):
    """The mean negative log-likelihood of a batch, in nats per example."""
    return -avalon.mean(model.log_prob(x))


def dequantize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixels in [0, 1] (k / 255) -> continuous values (k + u) / 256, u ~ U(0, 1):
    each 8-bit level becomes its own interval of width 1/256."""
    u = rng.random(x.shape, dtype=np.float32)
    return ((np.rint(x * 255.0) + u) / 256.0).astype(np.float32)


def bits_per_dim(log_prob, dim: int) -> float:
    """Negative log-likelihood of 8-bit data in bits per dimension, from log p of
    its dequantization in [0, 1]^dim (nats): each level's interval has width 1/256."""
    mean = float(np.mean(np.asarray(log_prob, dtype=np.float64)))
    return (-mean / dim + math.log(256.0)) / math.log(2.0)


def two_moons(n: int, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """n float32 points (n, 2) on two interleaved half circles with Gaussian noise
    (scikit-learn's make_moons layout), standardized to mean 0 and unit variance."""
    rng = np.random.default_rng(seed)
    upper = rng.random(n) < 0.5
    angle = rng.random(n) * np.pi
    x = np.where(upper, np.cos(angle), 1.0 - np.cos(angle))
    y = np.where(upper, np.sin(angle), 0.5 - np.sin(angle))
    points = np.stack([x, y], axis=1) + rng.normal(0.0, noise, (n, 2))
    points = (points - np.array([0.5, 0.25])) / np.array([0.87, 0.5])  # the moons' own mean and spread
    return points.astype(np.float32)
