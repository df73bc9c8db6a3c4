"""A variational autoencoder for 28x28 images (Kingma & Welling), the model of the
Avalon-vs-PyTorch VAE benchmark.

    encoder: 784 -> 500 relu -> (mu, logvar), 5 each
    z = mu + eps * exp(logvar / 2),  eps ~ N(0, I) drawn with avalon.random_normal
    decoder: 5 -> 500 relu -> 784 sigmoid

eps is a random op inside the traced function, so every call of a compiled
loss (avalon.grad, avalon.jit) draws fresh noise; avalon.manual_seed repeats it.

vae_loss(model, x, reduction) is BCE(reconstruction, x) + KL(q(z|x) || N(0, I)):

    reduction="mean" (default; the benchmark's "BCE(mean) + KL(mean)", Avalon.jl's
        binarycrossentropy and kldiv_normal with agg=mean):
        BCE averaged over all N*784 pixels + KL averaged over all N*5 latent entries,
        KL entry = -0.5 * (1 + logvar - mu^2 - exp(logvar)).
        In PyTorch: F.binary_cross_entropy(recon, x)
                    + (-0.5 * torch.mean(1 + logvar - mu**2 - logvar.exp())).
    reduction="sum": the negative ELBO per example, in nats: BCE summed over the
        784 pixels + KL summed over the 5 latent dims, both averaged over the batch.

"mean" weighs the KL term 784/5 ~ 157 times more, relative to the reconstruction,
than the ELBO does, so its reconstructions are blurrier; "sum" is the one whose
value is a bound on -log p(x).
"""
from __future__ import annotations

import math

import numpy as np

import avalon
import avalon.nn as nn
import avalon.nn.functional as F

from ._shapes import check_input

REDUCTIONS = ("mean", "sum")


class VAE(nn.Module):
    """Fully connected VAE.  forward(x) -> (reconstruction in x's shape, mu, logvar);
    x is (N, 784) or (N, 1, 28, 28) (generally (N, input_dim) or (N, *image_shape))
    with values in [0, 1]."""

    def __init__(self, image_shape=(1, 28, 28), hidden: int = 500, latent: int = 5):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.input_dim = math.prod(self.image_shape)
        self.latent = int(latent)
        self.fc1 = nn.Linear(self.input_dim, hidden)
        self.fc_mu = nn.Linear(hidden, latent)
        self.fc_logvar = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, self.input_dim)

    def _flat(self, x):
        check_input(self, x, (None, self.input_dim), (None, *self.image_shape))
        return x.reshape(x.shape[0], self.input_dim)

    def encode(self, x):
        """(mu, logvar) of q(z | x), each (N, latent)."""
        h = F.relu(self.fc1(self._flat(x)))
        return self.fc_mu(h), self.fc_logvar(h)

    def reparameterize(self, mu, logvar):
        eps = avalon.random_normal(tuple(mu.shape), mu.dtype, like=mu)
        return mu + eps * avalon.exp(logvar * 0.5)

    def decode_logits(self, z):
        """Logits of the pixel probabilities, (N, input_dim)."""
        return self.fc4(F.relu(self.fc3(z)))

    def decode(self, z):
        """Pixel probabilities in (0, 1), (N, input_dim)."""
        return F.sigmoid(self.decode_logits(z))

    def forward(self, x):
        mu, logvar = self.encode(x)
        recon = self.decode(self.reparameterize(mu, logvar))
        return recon.reshape(tuple(x.shape)), mu, logvar

    def reconstruct(self, x):
        """The decoding of the posterior mean (no noise), in x's shape."""
        mu, _ = self.encode(x)
        return self.decode(mu).reshape(tuple(x.shape))

    def sample(self, n: int):
        """n images decoded from z ~ N(0, I): (n, *image_shape), values in (0, 1)."""
        like = self.fc3.weight
        z = avalon.random_normal((int(n), self.latent), np.dtype(like.dtype), like=like)
        return self.decode(z).reshape((int(n),) + self.image_shape)


def kl_divergence(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, I)) per latent entry, (N, latent)."""
    return (1.0 + logvar - mu * mu - avalon.exp(logvar)) * -0.5


def vae_loss(model: VAE, x, reduction: str = "mean"):
    """BCE + KL of one batch x (values in [0, 1]); see the module docstring for
    the two reductions ("mean", the default and the benchmark's, or "sum")."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"vae_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    mu, logvar = model.encode(x)
    logits = model.decode_logits(model.reparameterize(mu, logvar))
    target = x.reshape(x.shape[0], model.input_dim)
    # From logits: the same value as BCE of the sigmoid, without its saturation at 0 and 1.
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    kl = kl_divergence(mu, logvar)
    if reduction == "mean":
        return avalon.mean(bce) + avalon.mean(kl)
    n = x.shape[0]
    return (avalon.sum(bce) + avalon.sum(kl)) * (1.0 / n)
