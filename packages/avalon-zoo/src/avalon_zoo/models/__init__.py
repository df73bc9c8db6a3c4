"""Predefined models, plain avalon.nn.Module classes (PyTorch-style, float32).

    from avalon_zoo.models import ExampleCNN
    model = ExampleCNN()
    loss, (g, *_) = avalon.grad(lambda m, x, y: F.nll_loss(m(x), y), model, x, y, argnums=0)

- ExampleCNN, BenchCNN: CNNs for 28x28 images returning log-probabilities.
- VAE (with vae_loss): fully connected variational autoencoder.
- ResNet (BasicBlock): small 3-stage ResNet with BatchNorm, returning logits.
- RealNVP (AffineCoupling): normalizing flow with log_prob and sample, for 2-D
  data (two_moons) and flattened images (dequantize, bits_per_dim).
- SequenceClassifier: LSTM or GRU reading images row by row, returning logits.

A wrongly shaped input raises avalon.ShapeError naming the model, the shapes it
accepts and the shape it got.
"""
from .cnn import BenchCNN, ExampleCNN
from .realnvp import AffineCoupling, RealNVP, bits_per_dim, checkerboard, dequantize, two_moons
from .realnvp import nll_loss as flow_nll_loss
from .resnet import BasicBlock, ResNet
from .rnn import SequenceClassifier
from .vae import VAE, kl_divergence, vae_loss

__all__ = [
    "AffineCoupling",
    "BasicBlock",
    "BenchCNN",
    "ExampleCNN",
    "RealNVP",
    "ResNet",
    "SequenceClassifier",
    "VAE",
    "bits_per_dim",
    "checkerboard",
    "dequantize",
    "flow_nll_loss",
    "kl_divergence",
    "two_moons",
    "vae_loss",
]
