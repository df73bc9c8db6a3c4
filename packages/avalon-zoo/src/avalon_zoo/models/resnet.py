"""A small ResNet (He et al. 2016, the 3-stage CIFAR layout) with BatchNorm, for
28x28 or 32x32 images.

    stem:    conv 3x3 in_channels -> 16, BatchNorm, relu
    stage 1: `blocks[0]` basic blocks of 16 channels
    stage 2: `blocks[1]` basic blocks of 32 channels, the first one with stride 2
    stage 3: `blocks[2]` basic blocks of 64 channels, the first one with stride 2
    head:    global average pool, linear 64 -> num_classes (logits: train with
             F.cross_entropy)

A basic block is conv3x3-BN-relu-conv3x3-BN plus a shortcut (the identity, or a
1x1 strided conv + BN where the shape changes), then relu.  BatchNorm uses the
batch's statistics in train() mode and its running statistics in eval() mode.
"""
from __future__ import annotations

import avalon
import avalon.nn as nn
import avalon.nn.functional as F

from ._shapes import check_input


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + skip)


class ResNet(nn.Module):
    """ResNet for (N, in_channels, H, W) images, H and W >= 8 (28x28, 32x32, ...);
    returns logits (N, num_classes).  blocks=(1, 1, 1) is ResNet-8, (3, 3, 3) ResNet-20."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, channels=(16, 32, 64), blocks=(2, 2, 2)):
        super().__init__()
        if len(channels) != len(blocks):
            raise ValueError(f"ResNet: channels {channels} and blocks {blocks} must have the same length")
        self.in_channels = int(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0])
        layers, width = [], channels[0]
        for stage, (out, count) in enumerate(zip(channels, blocks)):
            for i in range(count):
                layers.append(BasicBlock(width, out, stride=2 if stage > 0 and i == 0 else 1))
                width = out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        check_input(self, x, (None, self.in_channels, None, None))
        if min(x.shape[2:]) < 8:
            raise avalon.ShapeError(f"ResNet expects images of at least 8x8 (two stride-2 stages), "
                                    f"got input of shape {tuple(x.shape)}")
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = avalon.mean(x, axis=(2, 3))  # global average pool: any image size
        return self.fc(x)
