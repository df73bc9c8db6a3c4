"""The two benchmarks, as data: the model on each side, the loss, the
optimizer and its hyperparameters, how batches are cut, the test metric.

    CNN: avalon_zoo's BenchCNN, standardized images, nll_loss, batch 64, SGD lr 0.01,
         test accuracy.
    VAE: avalon_zoo's VAE, flattened images in [0, 1], vae_loss (BCE mean + KL mean),
         batch 100, Adam lr 1e-3, test loss.

Both sides start from the same weights: torch's initialization (seeded), copied
into the Avalon model with load_state_dict.  Both sides iterate the same
Batches (same seed), so epoch e visits the same batches in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avalon_zoo.datasets import Batches

from .data import BenchData

WEIGHT_SEED = 0      # torch.manual_seed before building the torch model
BATCH_SEED = 0       # Batches(seed=...): the per-epoch batch order


@dataclass(frozen=True)
class Workload:
    name: str            # "cnn" or "vae": the --which value
    title: str
    batch_size: int
    optimizer: str       # "SGD" or "Adam"
    lr: float
    metric: str          # what evaluate() returns
    higher_is_better: bool
    cpu_epoch_goal: float  # target: Avalon's time per epoch / PyTorch eager's, on the CPU

    # -- data ---------------------------------------------------------------------
    def batches(self, data: BenchData) -> Batches:
        """The training batches; the last partial batch is dropped so every step
        has the same shape (one compilation per framework)."""
        if self.name == "cnn":
            return Batches(data.x_train, data.y_train, batch_size=self.batch_size, seed=BATCH_SEED,
                           drop_last=True, normalize=(data.mean, data.std))
        return Batches(_flat(data.x_train), None, batch_size=self.batch_size, seed=BATCH_SEED,
                       drop_last=True)

    def test_set(self, data: BenchData, limit: int | None = None):
        """(inputs, labels or None) prepared like the training batches."""
        x, y = data.x_test[:limit], data.y_test[:limit]
        if self.name == "cnn":
            return ((x - np.float32(data.mean)) / np.float32(data.std)).astype(np.float32), y
        return _flat(x), None

    # -- models -------------------------------------------------------------------
    def torch_model(self):
        import torch

        from .twins import TorchBenchCNN, TorchVAE
        torch.manual_seed(WEIGHT_SEED)
        return TorchBenchCNN() if self.name == "cnn" else TorchVAE()

    def avalon_model(self, torch_model=None):
        """The zoo model; with torch_model, loaded with a copy of its weights."""
        if self.name == "cnn":
            from avalon_zoo.models.cnn import BenchCNN
            model = BenchCNN()
        else:
            from avalon_zoo.models.vae import VAE
            model = VAE()
        if torch_model is not None:
            model.load_state_dict({k: v.detach().cpu().numpy().copy()
                                   for k, v in torch_model.state_dict().items()})
        return model

    # -- losses and optimizers ---------------------------------------------------------
    def avalon_loss(self):
        """loss(model, *batch) for avalon.grad."""
        if self.name == "cnn":
            return _avalon_cnn_loss
        from avalon_zoo.models.vae import vae_loss
        return vae_loss

    def torch_loss(self):
        from .twins import torch_cnn_loss, torch_vae_loss
        return torch_cnn_loss if self.name == "cnn" else torch_vae_loss

    def avalon_optimizer(self):
        import avalon.optim as optim
        return getattr(optim, self.optimizer)(lr=self.lr)

    def torch_optimizer(self, params):
        import torch
        return getattr(torch.optim, self.optimizer)(params, lr=self.lr)

    def hyperparameters(self) -> dict:
        return {"batch_size": self.batch_size, "optimizer": self.optimizer, "lr": self.lr,
                "loss": "nll_loss (mean)" if self.name == "cnn" else "vae_loss: BCE (mean) + KL (mean)",
                "metric": self.metric, "drop_last": True}


def _avalon_cnn_loss(model, x, y):
    import avalon.nn.functional as F
    return F.nll_loss(model(x), y)


def _flat(x):
    return x.reshape(x.shape[0], -1)


CNN = Workload("cnn", "CNN (conv 1->16->32->32 3x3 pad 1, relu + 2x2 max-pool each, linear 288->10)",
               batch_size=64, optimizer="SGD", lr=0.01, metric="test accuracy", higher_is_better=True,
               cpu_epoch_goal=0.6)
VAE = Workload("vae", "VAE (784->500->(5 mu, 5 logvar), 5->500->784 sigmoid; BCE + KL)",
               batch_size=100, optimizer="Adam", lr=1e-3, metric="test loss", higher_is_better=False,
               cpu_epoch_goal=0.55)
WORKLOADS = {"cnn": CNN, "vae": VAE}
GPU_EPOCH_GOAL = 0.5


def selected(which: str) -> list[Workload]:
    if which == "all":
        return list(WORKLOADS.values())
    return [WORKLOADS[which]] if which in WORKLOADS else []
