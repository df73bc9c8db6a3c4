"""Learning-rate schedulers: avalon.optim.StepLR, ExponentialLR and
CosineAnnealingLR (also reachable as avalon.optim.lr_scheduler.X, PyTorch's
path), with PyTorch's recursive formulas, so their lr sequences are PyTorch's.

    opt = avalon.optim.SGD(lr=0.1)
    sched = avalon.optim.StepLR(opt, step_size=30, gamma=0.1)
    for epoch in range(100):
        train(...)          # opt.step(model, grads) per batch
        sched.step()        # sets opt.lr

A scheduler changes `opt.lr`, a Python float; the optimizer passes it to its
compiled update as a 0-d array, so a new learning rate never retraces.

A schedule never makes the learning rate negative: parameters that would
(a negative gamma or eta_min) are refused at construction, and a step that
would anyway (a subclass's get_lr) raises and leaves the optimizer's lr and
the scheduler as they were.
"""
from __future__ import annotations

import math
import sys

from avalon.errors import at, user_location

from . import registry
from .optim import Optimizer, OptimizerError, _invalid_argument, _real_number
from .registry import export


@export("optim", "Optimizers")
class LRScheduler:
    """Base class: subclasses define get_lr() from self.last_epoch and the
    optimizer's current lr.  Creating a scheduler takes its first step (epoch 0)."""

    def __init__(self, optimizer, last_epoch=-1):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an avalon optimizer")
        self.optimizer = optimizer
        sets_initial_lr = last_epoch == -1 and not hasattr(optimizer, "initial_lr")
        if sets_initial_lr:
            optimizer.initial_lr = optimizer.lr
        elif not hasattr(optimizer, "initial_lr"):
            raise KeyError("the optimizer has no 'initial_lr' (set by a scheduler created with last_epoch=-1): "
                           "load the optimizer's state_dict before resuming a scheduler with last_epoch >= 0")
        self.base_lrs = [optimizer.initial_lr]
        self.last_epoch = last_epoch
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        except BaseException:
            if sets_initial_lr:  # a scheduler that failed to start leaves the optimizer as it was
                del optimizer.initial_lr
            raise
        self._is_initial = False

    def get_lr(self) -> list:
        raise NotImplementedError

    def step(self) -> None:
        """Advance one epoch and set the optimizer's lr.  A learning rate that
        would be negative or not finite raises OptimizerError, and the
        optimizer and the scheduler stay as they were."""
        self._step_count += 1
        self.last_epoch += 1
        try:
            (lr,) = self.get_lr()
            lr = self._checked_lr(lr)
        except BaseException:
            self._step_count -= 1
            self.last_epoch -= 1
            raise
        self.optimizer.lr = lr
        self._last_lr = [lr]

    def _checked_lr(self, lr) -> float:
        lr = float(lr)
        if not (math.isfinite(lr) and lr >= 0):
            raise OptimizerError(
                f"{type(self).__name__}.step: the new learning rate would be {lr!r}{at(user_location())}; a "
                f"learning rate must be non-negative and finite, so check the schedule's parameters.  The "
                f"optimizer keeps lr={self.optimizer.lr!r}")
        return lr

    def get_last_lr(self) -> list:
        """[the learning rate set by the last step] (a list, as in PyTorch)."""
        return list(self._last_lr)

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict) -> None:
        self.__dict__.update(state_dict)

    def __repr__(self):
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, lr={self.optimizer.lr})"


@export("optim", "Optimizers")
class StepLR(LRScheduler):
    """Multiply the lr by gamma every step_size epochs."""

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        if not isinstance(step_size, int) or isinstance(step_size, bool) or step_size <= 0:
            raise _invalid_argument("StepLR", "step_size", step_size, "step_size must be a positive integer")
        _check_gamma("StepLR", gamma)
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        lr = self.optimizer.lr
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return [lr]
        return [lr * self.gamma]


@export("optim", "Optimizers")
class ExponentialLR(LRScheduler):
    """Multiply the lr by gamma every epoch."""

    def __init__(self, optimizer, gamma, last_epoch=-1):
        _check_gamma("ExponentialLR", gamma)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        lr = self.optimizer.lr
        return [lr] if self._is_initial else [lr * self.gamma]


@export("optim", "Optimizers")
class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from the initial lr down to eta_min over T_max epochs
    (and back up after, as PyTorch's recursive form does)."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        t_max = _real_number(T_max)
        if t_max is None or not math.isfinite(t_max) or t_max <= 0:
            raise _invalid_argument("CosineAnnealingLR", "T_max", T_max, "T_max must be a positive number of epochs")
        eta = _real_number(eta_min)
        if eta is None or not math.isfinite(eta) or eta < 0:
            raise _invalid_argument("CosineAnnealingLR", "eta_min", eta_min,
                                    "the learning rate anneals down to eta_min, so it must be a non-negative "
                                    "finite number (PyTorch's default: 0.0)")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        lr, base, t, T = self.optimizer.lr, self.base_lrs[0], self.last_epoch, self.T_max
        if self._is_initial:
            return [lr]
        if self._step_count == 1 and t > 0:
            return [self.eta_min + (base - self.eta_min) * (1 + math.cos(t * math.pi / T)) / 2]
        if (t - 1 - T) % (2 * T) == 0:
            return [lr + (base - self.eta_min) * (1 - math.cos(math.pi / T)) / 2]
        return [(1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T)) * (lr - self.eta_min)
                + self.eta_min]


def _check_gamma(owner: str, gamma) -> None:
    x = _real_number(gamma)
    if x is None or not math.isfinite(x) or x < 0:
        raise _invalid_argument(owner, "gamma", gamma, "gamma must be a non-negative finite number: the learning "
                                "rate is multiplied by it, and a negative gamma would make it negative")


# PyTorch's path: avalon.optim.lr_scheduler.StepLR is this module's StepLR.
_this = sys.modules[__name__]
_this.__avalon_stability__ = "stable"
_this.__avalon_component__ = "Optimizers"
registry.EXPORTS["optim"]["lr_scheduler"] = _this
registry.LEVELS[("optim", "lr_scheduler")] = ("Optimizers", "stable")
