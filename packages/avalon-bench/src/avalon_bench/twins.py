"""PyTorch twins of the zoo models the benchmark trains: same layers, same
parameter names (so state dicts move between the two), same losses.

    TorchBenchCNN   <-> avalon_zoo.models.cnn.BenchCNN
    TorchVAE        <-> avalon_zoo.models.vae.VAE
    torch_vae_loss  <-> avalon_zoo.models.vae.vae_loss (reduction="mean")
"""
from __future__ import annotations

import torch
import torch.nn as tnn
import torch.nn.functional as F


class TorchBenchCNN(tnn.Module):
    """conv 1->16, 16->32, 32->32 (3x3, padding 1; each relu + 2x2 max-pool),
    linear 288->10, log_softmax."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = tnn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = tnn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = tnn.Conv2d(32, 32, 3, padding=1)
        self.fc = tnn.Linear(32 * 3 * 3, num_classes)

    def forward(self, x):
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        x = x.reshape(x.shape[0], 32 * 3 * 3)
        return F.log_softmax(self.fc(x), dim=1)


def torch_cnn_loss(model, x, y):
    return F.nll_loss(model(x), y)


class TorchVAE(tnn.Module):
    """784 -> 500 relu -> (mu, logvar) of 5; z = mu + eps * exp(logvar / 2);
    5 -> 500 relu -> 784 sigmoid.  forward(x) -> (reconstruction, mu, logvar)."""

    def __init__(self, input_dim: int = 784, hidden: int = 500, latent: int = 5):
        super().__init__()
        self.input_dim = input_dim
        self.fc1 = tnn.Linear(input_dim, hidden)
        self.fc_mu = tnn.Linear(hidden, latent)
        self.fc_logvar = tnn.Linear(hidden, latent)
        self.fc3 = tnn.Linear(latent, hidden)
        self.fc4 = tnn.Linear(hidden, input_dim)

    def encode(self, x):
        h = F.relu(self.fc1(x.reshape(x.shape[0], self.input_dim)))
        return self.fc_mu(h), self.fc_logvar(h)

    def reparameterize(self, mu, logvar):
        return mu + torch.randn_like(mu) * torch.exp(logvar * 0.5)

    def decode_logits(self, z):
        return self.fc4(F.relu(self.fc3(z)))

    def forward(self, x):
        mu, logvar = self.encode(x)
        recon = torch.sigmoid(self.decode_logits(self.reparameterize(mu, logvar)))
        return recon.reshape(x.shape), mu, logvar


def torch_vae_loss(model, x):
    """The zoo's vae_loss with reduction="mean": BCE (from logits) averaged over
    all pixels + KL averaged over all latent entries."""
    mu, logvar = model.encode(x)
    logits = model.decode_logits(model.reparameterize(mu, logvar))
    target = x.reshape(x.shape[0], model.input_dim)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    kl = -0.5 * torch.mean(1.0 + logvar - mu * mu - torch.exp(logvar))
    return bce + kl
