"""PyTorch twins of the zoo models the benchmark trains: same layers, same
parameter names (so state dicts move between the two), same losses.

    TorchBenchCNN   <-> avalon_zoo.models.cnn.BenchCNN
    TorchVAE        <-> avalon_zoo.models.vae.VAE
    torch_vae_loss  <-> avalon_zoo.models.vae.vae_loss (reduction="mean")
    TorchResNet     <-> avalon_zoo.models.resnet.ResNet
    TorchSequenceClassifier <-> avalon_zoo.models.rnn.SequenceClassifier
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


class TorchBasicBlock(tnn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (1x1 strided
    conv + BN on the skip path where the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = tnn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(out_channels)
        self.conv2 = tnn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = tnn.BatchNorm2d(out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = tnn.Sequential(tnn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                           tnn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class TorchResNet(tnn.Module):
    """stem conv 3x3 + BN + relu, stages of BasicBlocks (stride 2 from the second),
    global average pool, linear: logits."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels=(16, 32, 64), blocks=(2, 2, 2)):
        super().__init__()
        self.conv1 = tnn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        self.bn1 = tnn.BatchNorm2d(channels[0])
        layers, width = [], channels[0]
        for stage, (out, count) in enumerate(zip(channels, blocks)):
            for i in range(count):
                layers.append(TorchBasicBlock(width, out, stride=2 if stage > 0 and i == 0 else 1))
                width = out
        self.layers = tnn.Sequential(*layers)
        self.fc = tnn.Linear(width, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class TorchSequenceClassifier(tnn.Module):
    """An LSTM (or GRU) reading a 28x28 image row by row, batch_first; logits from
    the last layer's final hidden state."""

    def __init__(self, kind: str = "lstm", hidden: int = 128, num_layers: int = 1, input_size: int = 28,
                 seq_len: int = 28, num_classes: int = 10):
        super().__init__()
        self.kind, self.input_size, self.seq_len = kind, input_size, seq_len
        rnn = tnn.LSTM if kind == "lstm" else tnn.GRU
        self.rnn = rnn(input_size, hidden, num_layers=num_layers, batch_first=True)
        self.fc = tnn.Linear(hidden, num_classes)

    def forward(self, x):
        _, state = self.rnn(x.reshape(x.shape[0], self.seq_len, self.input_size))
        h_n = state[0] if self.kind == "lstm" else state
        return self.fc(h_n[-1])


def torch_cross_entropy_loss(model, x, y):
    return F.cross_entropy(model(x), y)
