"""Port of torchvision's ResNet (models/resnet.py: BasicBlock, _make_layer,
the init loop over `self.modules()`), trained as the ImageNet reference
recipe does (SGD with Nesterov momentum and weight decay, label smoothing, a
one-cycle schedule stepped per batch), and resumed from a torch checkpoint
(`torch.save` of the model's and the optimizer's state_dicts).

Widths are a quarter of resnet18's and each stage has one block, so the test
stays short; the code paths are torchvision's.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as tnn

import avalon
import avalon.nn as nn
import avalon.optim as optim
from avalon.optim.lr_scheduler import OneCycleLR

WIDTH = 16


# -- PyTorch, as in torchvision ------------------------------------------------------------------------------

def tconv3x3(in_planes, out_planes, stride=1):
    return tnn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def tconv1x1(in_planes, out_planes, stride=1):
    return tnn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class TBasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = tconv3x3(inplanes, planes, stride)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.relu = tnn.ReLU(inplace=True)
        self.conv2 = tconv3x3(planes, planes)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class TResNet(tnn.Module):
    def __init__(self, block, layers, num_classes=10, zero_init_residual=False):
        super().__init__()
        self.inplanes = WIDTH
        self.conv1 = tnn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = tnn.BatchNorm2d(self.inplanes)
        self.relu = tnn.ReLU(inplace=True)
        self.maxpool = tnn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, WIDTH, layers[0])
        self.layer2 = self._make_layer(block, WIDTH * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, WIDTH * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, WIDTH * 8, layers[3], stride=2)
        self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
        self.fc = tnn.Linear(WIDTH * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, tnn.Conv2d):
                tnn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (tnn.BatchNorm2d, tnn.GroupNorm)):
                tnn.init.constant_(m.weight, 1)
                tnn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, TBasicBlock) and m.bn2.weight is not None:
                    tnn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = tnn.Sequential(tconv1x1(self.inplanes, planes * block.expansion, stride),
                                        tnn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return tnn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


# -- Avalon, line by line -----------------------------------------------------------------------------------

def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=10, zero_init_residual=False):
        super().__init__()
        self.inplanes = WIDTH
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, WIDTH, layers[0])
        self.layer2 = self._make_layer(block, WIDTH * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, WIDTH * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, WIDTH * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(WIDTH * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = avalon.flatten(x, 1)
        x = self.fc(x)
        return x


criterion = nn.CrossEntropyLoss(label_smoothing=0.1)


def loss_fn(model, images, target):
    output = model(images)
    return criterion(output, target)


def _batches(n, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, 3, 32, 32)).astype(np.float32),
             rng.integers(0, 10, batch).astype(np.int64)) for _ in range(n)]


def _torch_step(tmodel, toptimizer, images, target, tcriterion):
    toptimizer.zero_grad()
    tloss = tcriterion(tmodel(torch.from_numpy(images)), torch.from_numpy(target))
    tloss.backward()
    return tloss


def _compare_buffers(tmodel, model, step, check):
    mine = dict(model.named_buffers())
    for name, b in tmodel.named_buffers():
        if b.dtype.is_floating_point:
            check.close(mine[name], b.numpy(), f"after step {step}: buffer {name}")
        else:
            assert int(mine[name]) == int(b), f"after step {step}: buffer {name}"


def test_resnet_trains_like_torch_with_one_cycle(check):
    tmodel = TResNet(TBasicBlock, [1, 1, 1, 1])
    model = ResNet(BasicBlock, [1, 1, 1, 1])
    model.load_state_dict(tmodel.state_dict())
    tcriterion = tnn.CrossEntropyLoss(label_smoothing=0.1)
    toptimizer = torch.optim.SGD(tmodel.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    tscheduler = torch.optim.lr_scheduler.OneCycleLR(toptimizer, max_lr=0.2, total_steps=8)
    scheduler = OneCycleLR(optimizer, max_lr=0.2, total_steps=8)
    tmodel.train()
    model.train()
    for step, (images, target) in enumerate(_batches(3)):
        tloss = _torch_step(tmodel, toptimizer, images, target, tcriterion)
        loss, grads = avalon.grad(loss_fn, model, images, target)
        check.loss(loss, tloss, step)
        check.grads(tmodel, model, grads[0], step)
        toptimizer.step()
        optimizer.step(grads[0])
        tscheduler.step()
        scheduler.step()
        np.testing.assert_allclose(scheduler.get_last_lr(), tscheduler.get_last_lr(), rtol=1e-12)
        check.params(tmodel, model, step)
        _compare_buffers(tmodel, model, step, check)


def test_resnet_resumes_from_a_torch_checkpoint(check, tmp_path):
    tmodel = TResNet(TBasicBlock, [1, 1, 1, 1])
    tcriterion = tnn.CrossEntropyLoss(label_smoothing=0.1)
    toptimizer = torch.optim.SGD(tmodel.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    # (seed 3 puts one BatchNorm output within float32 rounding of ReLU's kink, where
    # summation orders may pick different slopes: a legitimate difference no tolerance should hide)
    batches = _batches(5, seed=4)
    for images, target in batches[:2]:
        _torch_step(tmodel, toptimizer, images, target, tcriterion)
        toptimizer.step()
    torch.save({"model": tmodel.state_dict(), "optimizer": toptimizer.state_dict()}, tmp_path / "ckpt.pt")

    checkpoint = torch.load(tmp_path / "ckpt.pt")
    model = ResNet(BasicBlock, [1, 1, 1, 1])
    model.load_state_dict(checkpoint["model"])
    optimizer = optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    optimizer.load_state_dict(checkpoint["optimizer"])
    for step, (images, target) in enumerate(batches[2:], start=2):
        tloss = _torch_step(tmodel, toptimizer, images, target, tcriterion)
        loss, grads = avalon.grad(loss_fn, model, images, target)
        check.loss(loss, tloss, step)
        toptimizer.step()
        optimizer.step(grads[0])
        check.params(tmodel, model, step)
        _compare_buffers(tmodel, model, step, check)
