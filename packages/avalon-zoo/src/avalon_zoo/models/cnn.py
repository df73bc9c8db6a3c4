"""Two small CNNs for 28x28 grayscale images (MNIST, Fashion-MNIST).

ExampleCNN is the network of Avalon.jl's README; BenchCNN is the CNN of the
Avalon-vs-PyTorch benchmark.  Both return log-probabilities (log_softmax over
the 10 classes): train them with F.nll_loss.
"""
from __future__ import annotations

import avalon.nn as nn
import avalon.nn.functional as F

from ._shapes import check_input

IMAGE = (None, 1, 28, 28)


class ExampleCNN(nn.Module):
    """conv 1->20 5x5, conv 20->50 5x5 (each relu + 2x2 max-pool), linear
    800->500 relu -> 10, log_softmax.  Input (N, 1, 28, 28); output (N, 10)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)     # 28 -> 24, pooled to 12
        self.conv2 = nn.Conv2d(20, 50, 5)    # 12 -> 8, pooled to 4
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        check_input(self, x, IMAGE)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.reshape(x.shape[0], 4 * 4 * 50)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


class BenchCNN(nn.Module):
    """conv 1->16, 16->32, 32->32 (3x3, padding 1; each relu + 2x2 max-pool:
    28 -> 14 -> 7 -> 3), linear 288->10, log_softmax.  Input (N, 1, 28, 28);
    output (N, 10).  The benchmark trains it with nll_loss, batch 64, SGD lr 0.01."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 3 * 3, num_classes)

    def forward(self, x):
        check_input(self, x, IMAGE)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        x = x.reshape(x.shape[0], 32 * 3 * 3)
        return F.log_softmax(self.fc(x), dim=1)
