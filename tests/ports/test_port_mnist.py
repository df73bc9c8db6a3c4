"""Port of pytorch/examples mnist/main.py: a two-conv network trained with
Adadelta and StepLR.

The dropout rates are constructor arguments here (the example hard-codes 0.25
and 0.5) so that the comparison can switch dropout off: the two frameworks
draw different masks.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as TF
import torch.optim as toptim
from torch.optim.lr_scheduler import StepLR as TorchStepLR

import avalon
import avalon.nn as nn
import avalon.nn.functional as F
import avalon.optim as optim
from avalon.optim.lr_scheduler import StepLR


# -- PyTorch, as in the example -------------------------------------------------------------------------------

class TorchNet(tnn.Module):
    def __init__(self, p1=0.25, p2=0.5):
        super().__init__()
        self.conv1 = tnn.Conv2d(1, 32, 3, 1)
        self.conv2 = tnn.Conv2d(32, 64, 3, 1)
        self.dropout1 = tnn.Dropout(p1)
        self.dropout2 = tnn.Dropout(p2)
        self.fc1 = tnn.Linear(9216, 128)
        self.fc2 = tnn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = TF.relu(x)
        x = self.conv2(x)
        x = TF.relu(x)
        x = TF.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = self.fc1(x)
        x = TF.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = TF.log_softmax(x, dim=1)
        return output


# -- Avalon, line by line -----------------------------------------------------------------------------------

class Net(nn.Module):
    def __init__(self, p1=0.25, p2=0.5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(p1)
        self.dropout2 = nn.Dropout(p2)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = avalon.flatten(x, 1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def loss_fn(model, data, target):
    output = model(data)
    return F.nll_loss(output, target)


def _batches(n_steps, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32),
             rng.integers(0, 10, batch).astype(np.int64)) for _ in range(n_steps)]


def test_mnist_example_trains_like_torch(check):
    tmodel = TorchNet(0.0, 0.0)
    toptimizer = toptim.Adadelta(tmodel.parameters(), lr=1.0)
    tscheduler = TorchStepLR(toptimizer, step_size=1, gamma=0.7)

    model = Net(0.0, 0.0)
    model.load_state_dict(tmodel.state_dict())
    optimizer = optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = StepLR(optimizer, step_size=1, gamma=0.7)

    for step, (data, target) in enumerate(_batches(3)):
        toptimizer.zero_grad()
        toutput = tmodel(torch.from_numpy(data))
        tloss = TF.nll_loss(toutput, torch.from_numpy(target))
        tloss.backward()

        optimizer.zero_grad()
        loss, grads = avalon.grad(loss_fn, model, data, target)

        check.loss(loss, tloss, step)
        check.grads(tmodel, model, grads[0], step)
        toptimizer.step()
        optimizer.step(grads[0])
        check.params(tmodel, model, step)
        tscheduler.step()  # the example steps its scheduler once per epoch
        scheduler.step()
        assert scheduler.get_last_lr() == tscheduler.get_last_lr()


def test_mnist_example_runs_with_its_dropout_and_evaluates(check):
    model = Net()
    optimizer = optim.Adadelta(model.parameters(), lr=1.0)
    (data, target), = _batches(1, batch=16, seed=1)
    model.train()
    loss, grads = avalon.grad(loss_fn, model, data, target)
    optimizer.step(grads[0])
    assert np.isfinite(loss)
    model.eval()  # dropout off: two evaluations agree exactly
    first, second = model(data), model(data)
    np.testing.assert_array_equal(first, second)
    pred = first.argmax(axis=1)
    assert pred.shape == (16,)
