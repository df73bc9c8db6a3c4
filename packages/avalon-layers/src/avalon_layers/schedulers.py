"""Learning-rate schedulers: avalon.optim.StepLR, MultiStepLR, ExponentialLR,
LambdaLR, LinearLR, CosineAnnealingLR, CosineAnnealingWarmRestarts,
OneCycleLR, SequentialLR and ReduceLROnPlateau (also reachable as
avalon.optim.lr_scheduler.X, PyTorch's path), with PyTorch's formulas
(recursive where PyTorch's are), so their lr sequences are PyTorch's, group by
group.

    opt = avalon.optim.SGD(model.parameters(), lr=0.1)
    sched = avalon.optim.StepLR(opt, step_size=30, gamma=0.1)
    for epoch in range(100):
        train(...)          # opt.step(grads) per batch
        sched.step()        # sets opt.param_groups[i]['lr']

A scheduler sets each parameter group's 'lr' (a Python float; `opt.lr` is the
first group's); the optimizer passes it to its compiled update as a 0-d array,
so a new learning rate never retraces.  It works the same on an optimizer
created without parameters (one group).

A schedule never makes the learning rate negative: parameters that would
(a negative gamma or eta_min) are refused at construction, and a step that
would anyway (a subclass's get_lr) raises and leaves the optimizer's lrs and
the scheduler as they were.
"""
from __future__ import annotations

import math
import sys
import types
from bisect import bisect_right
from collections import Counter

from avalon.errors import at, user_location

from . import registry
from .optim import Optimizer, OptimizerError, _invalid_argument, _real_number
from .registry import export


@export("optim", "Optimizers")
class LRScheduler:
    """Base class: subclasses define get_lr() (one lr per parameter group) from
    self.last_epoch and the groups' current lrs.  Creating a scheduler takes its
    first step (epoch 0)."""

    _is_initial = False

    def __init__(self, optimizer, last_epoch=-1):
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        groups = optimizer.param_groups
        added = []
        if last_epoch == -1:
            for group in groups:
                if "initial_lr" not in group:
                    group["initial_lr"] = group["lr"]
                    added.append(group)
        else:
            for i, group in enumerate(groups):
                if "initial_lr" not in group:
                    raise KeyError(f"param 'initial_lr' is not specified in param_groups[{i}] when resuming a "
                                   f"scheduler with last_epoch >= 0: load the optimizer's state_dict (saved with "
                                   f"its scheduler) before resuming")
        self.base_lrs = [group["initial_lr"] for group in groups]
        self.last_epoch = last_epoch
        try:
            self._initial_step()
        except BaseException:
            for group in added:  # a scheduler that failed to start leaves the optimizer as it was
                del group["initial_lr"]
            raise

    def _initial_step(self) -> None:
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def get_lr(self) -> list:
        raise NotImplementedError

    def step(self) -> None:
        """Advance one epoch and set every group's lr.  A learning rate that
        would be negative or not finite raises OptimizerError, and the
        optimizer and the scheduler stay as they were."""
        self._step_count += 1
        try:
            self._update_lr()
        except BaseException:
            self._step_count -= 1
            raise

    def _update_lr(self, epoch=None) -> None:
        """Compute the new lrs (at `epoch` in closed form when given), check them
        all, then set them; on failure last_epoch is restored."""
        previous = self.last_epoch
        try:
            if epoch is None:
                self.last_epoch += 1
                values = self.get_lr()
            else:
                self.last_epoch = epoch
                closed = getattr(self, "_get_closed_form_lr", None)
                values = closed() if closed is not None else self.get_lr()
            values = [self._checked_lr(lr) for lr in values]
        except BaseException:
            self.last_epoch = previous
            raise
        self._set_lrs(values)

    def _set_lrs(self, values) -> None:
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _checked_lr(self, lr) -> float:
        lr = float(lr)
        if not (math.isfinite(lr) and lr >= 0):
            raise OptimizerError(
                f"{type(self).__name__}.step: the new learning rate would be {lr!r}{at(user_location())}; a "
                f"learning rate must be non-negative and finite, so check the schedule's parameters.  The "
                f"optimizer keeps lr={self.optimizer.lr!r}")
        return lr

    def _group_lrs(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list:
        """The learning rate of each group set by the last step (a list, as in PyTorch)."""
        return list(self._last_lr)

    def state_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict) -> None:
        self.__dict__.update(state_dict)

    def __repr__(self):
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, lr={self.optimizer.lr})"


def _check_optimizer(optimizer) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{type(optimizer).__name__} is not an avalon optimizer")


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
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._group_lrs()
        return [lr * self.gamma for lr in self._group_lrs()]

    def _get_closed_form_lr(self):
        return [base * self.gamma ** (self.last_epoch // self.step_size) for base in self.base_lrs]


@export("optim", "Optimizers")
class MultiStepLR(LRScheduler):
    """Multiply the lr by gamma at each milestone epoch (twice at a milestone
    given twice)."""

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1):
        milestones = list(milestones)
        if any(not isinstance(m, int) or isinstance(m, bool) for m in milestones):
            raise _invalid_argument("MultiStepLR", "milestones", milestones, "milestones must be epoch numbers (ints)")
        _check_gamma("MultiStepLR", gamma)
        self.milestones, self.gamma = Counter(milestones), gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self.last_epoch not in self.milestones:
            return self._group_lrs()
        return [lr * self.gamma ** self.milestones[self.last_epoch] for lr in self._group_lrs()]

    def _get_closed_form_lr(self):
        milestones = sorted(self.milestones.elements())
        return [base * self.gamma ** bisect_right(milestones, self.last_epoch) for base in self.base_lrs]


@export("optim", "Optimizers")
class ExponentialLR(LRScheduler):
    """Multiply the lr by gamma every epoch."""

    def __init__(self, optimizer, gamma, last_epoch=-1):
        _check_gamma("ExponentialLR", gamma)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        if self._is_initial:
            return self._group_lrs()
        return [lr * self.gamma for lr in self._group_lrs()]

    def _get_closed_form_lr(self):
        return [base * self.gamma ** self.last_epoch for base in self.base_lrs]


@export("optim", "Optimizers")
class LambdaLR(LRScheduler):
    """lr = initial lr * lr_lambda(epoch); one function for every group, or a
    list with one per group."""

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        _check_optimizer(optimizer)
        n = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise _invalid_argument("LambdaLR", "lr_lambda", lr_lambda,
                                        f"Expected {n} lr_lambdas (one per parameter group), but got {len(lr_lambda)}")
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * n
        for f in self.lr_lambdas:
            if not callable(f):
                raise TypeError(f"LambdaLR: lr_lambda must be a function of the epoch, not {type(f).__name__}"
                                f"{at(user_location())}")
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [base * f(self.last_epoch) for f, base in zip(self.lr_lambdas, self.base_lrs)]

    def state_dict(self) -> dict:
        """As PyTorch: functions are not saved, callable objects' attributes are."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        state["lr_lambdas"] = [None if isinstance(f, types.FunctionType) else dict(f.__dict__)
                               for f in self.lr_lambdas]
        return state

    def load_state_dict(self, state_dict) -> None:
        state = dict(state_dict)
        lambdas = state.pop("lr_lambdas", [None] * len(self.lr_lambdas))
        self.__dict__.update(state)
        for f, saved in zip(self.lr_lambdas, lambdas):
            if saved is not None:
                f.__dict__.update(saved)


@export("optim", "Optimizers")
class LinearLR(LRScheduler):
    """Scale the lr by a factor going linearly from start_factor to end_factor
    over total_iters epochs (a warm-up, usually)."""

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5, last_epoch=-1):
        start, end = _real_number(start_factor), _real_number(end_factor)
        if start is None or start > 1.0 or start <= 0:
            raise _invalid_argument("LinearLR", "start_factor", start_factor, "Starting multiplicative factor "
                                    "expected to be greater than 0 and less or equal to 1.")
        if end is None or end > 1.0 or end < 0:
            raise _invalid_argument("LinearLR", "end_factor", end_factor,
                                    "Ending multiplicative factor expected to be between 0 and 1.")
        if not isinstance(total_iters, int) or isinstance(total_iters, bool) or total_iters <= 0:
            raise _invalid_argument("LinearLR", "total_iters", total_iters, "total_iters must be a positive integer")
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        lrs = self._group_lrs()
        if self.last_epoch == 0:
            return [lr * self.start_factor for lr in lrs]
        if self._is_initial or self.last_epoch > self.total_iters:
            return lrs
        change = self.end_factor - self.start_factor
        factor = 1.0 + change / (self.total_iters * self.start_factor + (self.last_epoch - 1) * change)
        return [lr * factor for lr in lrs]

    def _get_closed_form_lr(self):
        change = self.end_factor - self.start_factor
        return [base * (self.start_factor + change * min(self.total_iters, self.last_epoch) / self.total_iters)
                for base in self.base_lrs]


@export("optim", "Optimizers")
class CosineAnnealingLR(LRScheduler):
    """Cosine annealing from the initial lr down to eta_min over T_max epochs
    (and back up after, as PyTorch's recursive form does)."""

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        t_max = _real_number(T_max)
        if t_max is None or not math.isfinite(t_max) or t_max <= 0:
            raise _invalid_argument("CosineAnnealingLR", "T_max", T_max, "T_max must be a positive number of epochs")
        _check_eta_min("CosineAnnealingLR", eta_min)
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        t, T, eta = self.last_epoch, self.T_max, self.eta_min
        lrs = self._group_lrs()
        if self._is_initial:
            return lrs
        if self._step_count == 1 and t > 0:
            return [eta + (base - eta) * (1 + math.cos(t * math.pi / T)) / 2 for base in self.base_lrs]
        if (t - 1 - T) % (2 * T) == 0:
            return [lr + (base - eta) * (1 - math.cos(math.pi / T)) / 2 for lr, base in zip(lrs, self.base_lrs)]
        return [(1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T)) * (lr - eta) + eta
                for lr in lrs]

    def _get_closed_form_lr(self):
        return [self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
                for base in self.base_lrs]


@export("optim", "Optimizers")
class CosineAnnealingWarmRestarts(LRScheduler):
    """Cosine annealing restarted every T_i epochs (SGDR): T_0 first, each next
    period T_mult times longer.  step(epoch) takes a fractional epoch
    (epoch + batch / batches) as in PyTorch."""

    def __init__(self, optimizer, T_0, T_mult=1, eta_min=0.0, last_epoch=-1):
        if not isinstance(T_0, int) or isinstance(T_0, bool) or T_0 <= 0:
            raise _invalid_argument("CosineAnnealingWarmRestarts", "T_0", T_0, f"Expected positive integer T_0")
        if not isinstance(T_mult, int) or isinstance(T_mult, bool) or T_mult < 1:
            raise _invalid_argument("CosineAnnealingWarmRestarts", "T_mult", T_mult, "Expected integer T_mult >= 1")
        _check_eta_min("CosineAnnealingWarmRestarts", eta_min)
        self.T_0, self.T_i, self.T_mult, self.eta_min = T_0, T_0, T_mult, eta_min
        self.T_cur = last_epoch
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        return [self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * self.T_cur / self.T_i)) / 2
                for base in self.base_lrs]

    def step(self, epoch=None) -> None:
        """Advance one epoch, or go to `epoch` (fractional epochs allowed)."""
        saved = (self.T_cur, self.T_i, self.last_epoch)
        try:
            self._advance(epoch)
            values = [self._checked_lr(lr) for lr in self.get_lr()]
        except BaseException:
            self.T_cur, self.T_i, self.last_epoch = saved
            raise
        self._step_count += 1
        self._set_lrs(values)

    def _advance(self, epoch) -> None:
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        else:
            if epoch < 0:
                raise _invalid_argument("CosineAnnealingWarmRestarts.step", "epoch", epoch,
                                        "Expected non-negative epoch")
            if epoch >= self.T_0:
                if self.T_mult == 1:
                    self.T_cur = epoch % self.T_0
                else:
                    n = int(math.log((epoch / self.T_0 * (self.T_mult - 1) + 1), self.T_mult))
                    self.T_cur = epoch - self.T_0 * (self.T_mult ** n - 1) / (self.T_mult - 1)
                    self.T_i = self.T_0 * self.T_mult ** n
            else:
                self.T_i = self.T_0
                self.T_cur = epoch
        self.last_epoch = math.floor(epoch)


@export("optim", "Optimizers")
class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith): the lr rises from max_lr / div_factor to
    max_lr over pct_start of the total steps, then anneals to
    initial_lr / final_div_factor; momentum (or Adam's beta1) cycles the other
    way.  Step it after every batch."""

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None, pct_start=0.3,
                 anneal_strategy="cos", cycle_momentum=True, base_momentum=0.85, max_momentum=0.95,
                 div_factor=25.0, final_div_factor=1e4, three_phase=False, last_epoch=-1):
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        self.total_steps = _total_steps(total_steps, epochs, steps_per_epoch)
        if not isinstance(pct_start, float) or not 0 <= pct_start <= 1:
            raise _invalid_argument("OneCycleLR", "pct_start", pct_start, "Expected float between 0 and 1 pct_start")
        if anneal_strategy not in ("cos", "linear"):
            raise _invalid_argument("OneCycleLR", "anneal_strategy", anneal_strategy,
                                    "anneal_strategy must be one of 'cos' or 'linear'")
        for label, value in (("div_factor", div_factor), ("final_div_factor", final_div_factor)):
            x = _real_number(value)
            if x is None or not math.isfinite(x) or x <= 0:
                raise _invalid_argument("OneCycleLR", label, value, f"{label} must be a positive number")
        self._schedule_phases = _one_cycle_phases(self.total_steps, pct_start, three_phase)
        self._anneal_func_type = anneal_strategy
        self.cycle_momentum = cycle_momentum
        groups = optimizer.param_groups
        max_lrs = _per_group("OneCycleLR", "max_lr", groups, max_lr)
        if cycle_momentum:
            if "momentum" not in optimizer.defaults and "betas" not in optimizer.defaults:
                raise OptimizerError(f"OneCycleLR: optimizer must support momentum or beta1 with `cycle_momentum` "
                                     f"option enabled{at(user_location())}; {type(optimizer).__name__} has neither: "
                                     f"pass cycle_momentum=False")
            self.use_beta1 = "betas" in optimizer.defaults
            max_momentums = _per_group("OneCycleLR", "max_momentum", groups, max_momentum)
            base_momentums = _per_group("OneCycleLR", "base_momentum", groups, base_momentum)
        if last_epoch == -1:
            for i, group in enumerate(groups):
                group["initial_lr"] = max_lrs[i] / div_factor
                group["max_lr"] = max_lrs[i]
                group["min_lr"] = group["initial_lr"] / final_div_factor
                if cycle_momentum:
                    self._set_momentum(group, max_momentums[i])
                    group["max_momentum"], group["base_momentum"] = max_momentums[i], base_momentums[i]
        super().__init__(optimizer, last_epoch)

    def _set_momentum(self, group, value) -> None:
        if self.use_beta1:
            group["betas"] = (value, *group["betas"][1:])
        else:
            group["momentum"] = value

    def _anneal(self, start, end, pct):
        if self._anneal_func_type == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self):
        step = self.last_epoch
        if step > self.total_steps:
            raise OptimizerError(f"OneCycleLR: Tried to step {step} times. The specified number of total steps is "
                                 f"{self.total_steps}{at(user_location())}; create it with the number of batches "
                                 f"of the whole run (total_steps, or epochs and steps_per_epoch)")
        lrs = []
        for group in self.optimizer.param_groups:
            start_step = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end_step = phase["end_step"]
                if step <= end_step or i == len(self._schedule_phases) - 1:
                    pct = (step - start_step) / (end_step - start_step)
                    lrs.append(self._anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct))
                    if self.cycle_momentum:
                        self._set_momentum(group, self._anneal(group[phase["start_momentum"]],
                                                               group[phase["end_momentum"]], pct))
                    break
                start_step = phase["end_step"]
        return lrs


def _total_steps(total_steps, epochs, steps_per_epoch) -> int:
    def positive_int(x):
        return isinstance(x, int) and not isinstance(x, bool) and x > 0
    if total_steps is not None:
        if not positive_int(total_steps):
            raise _invalid_argument("OneCycleLR", "total_steps", total_steps, "Expected positive integer total_steps")
        return total_steps
    if epochs is not None and steps_per_epoch is not None:
        if not positive_int(epochs):
            raise _invalid_argument("OneCycleLR", "epochs", epochs, "Expected positive integer epochs")
        if not positive_int(steps_per_epoch):
            raise _invalid_argument("OneCycleLR", "steps_per_epoch", steps_per_epoch,
                                    "Expected positive integer steps_per_epoch")
        return epochs * steps_per_epoch
    raise OptimizerError(f"OneCycleLR: You must define either total_steps OR (epochs AND steps_per_epoch)"
                         f"{at(user_location())}")


def _one_cycle_phases(total, pct_start, three_phase) -> list:
    def phase(end_step, start_lr, end_lr, start_m, end_m):
        return {"end_step": end_step, "start_lr": start_lr, "end_lr": end_lr, "start_momentum": start_m,
                "end_momentum": end_m}
    if three_phase:
        return [phase(float(pct_start * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                phase(float(2 * pct_start * total) - 2, "max_lr", "initial_lr", "base_momentum", "max_momentum"),
                phase(total - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum")]
    return [phase(float(pct_start * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
            phase(total - 1, "max_lr", "min_lr", "base_momentum", "max_momentum")]


def _per_group(owner, name, groups, value) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise _invalid_argument(owner, name, value, f"expected {len(groups)} values of {name} (one per "
                                    f"parameter group), got {len(value)}")
        return list(value)
    return [value] * len(groups)


@export("optim", "Optimizers")
class SequentialLR(LRScheduler):
    """Run `schedulers` one after the other, switching at each of `milestones`
    (one fewer than the schedulers); each starts from its own epoch 0."""

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1):
        _check_optimizer(optimizer)
        schedulers, milestones = list(schedulers), list(milestones)
        if not schedulers:
            raise _invalid_argument("SequentialLR", "schedulers", schedulers,
                                    "SequentialLR expects at least one scheduler, but got no scheduler.")
        for i, s in enumerate(schedulers):
            if isinstance(s, ReduceLROnPlateau):
                raise OptimizerError(f"SequentialLR does not support `ReduceLROnPlateau` scheduler as it requires "
                                     f"additional kwargs to be specified when calling `step`, but got one at index "
                                     f"{i} in the given schedulers sequence{at(user_location())}")
            if getattr(s, "optimizer", None) is not optimizer:
                raise OptimizerError(f"SequentialLR expects all schedulers to belong to the same optimizer, but got "
                                     f"scheduler {type(s).__name__} at index {i} with another one"
                                     f"{at(user_location())}")
        if len(milestones) != len(schedulers) - 1:
            raise OptimizerError(f"Sequential Schedulers expects number of schedulers provided to be one more than "
                                 f"the number of milestone points, but got number of schedulers {len(schedulers)} "
                                 f"and the number of milestones to be equal to {len(milestones)}"
                                 f"{at(user_location())}")
        self._schedulers, self._milestones = schedulers, milestones
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        for group in optimizer.param_groups:  # undo the steps the schedulers took when they were created
            group["lr"] = group["initial_lr"]
        self._undo_steps(self)
        first = self._schedulers[bisect_right(self._milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def _undo_steps(self, sched) -> None:
        if hasattr(sched, "_schedulers"):
            for s in sched._schedulers:
                self._undo_steps(s)
        elif hasattr(sched, "last_epoch"):
            sched.last_epoch -= 1

    def step(self) -> None:
        self.last_epoch += 1
        idx = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[idx]
        try:
            if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
                scheduler._update_lr(0)
            else:
                scheduler.step()
        except BaseException:
            self.last_epoch -= 1
            raise
        self._last_lr = scheduler.get_last_lr()

    def state_dict(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_schedulers")}
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict) -> None:
        state = dict(state_dict)
        saved = state.pop("_schedulers")
        self.__dict__.update(state)
        for s, st in zip(self._schedulers, saved):
            s.load_state_dict(st)


@export("optim", "Optimizers")
class ReduceLROnPlateau(LRScheduler):
    """Multiply the lr by `factor` when a metric has stopped improving for
    `patience` epochs: step(metric) after each validation."""

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4, threshold_mode="rel",
                 cooldown=0, min_lr=0, eps=1e-8):
        f = _real_number(factor)
        if f is None or not 0 <= f < 1.0:
            raise _invalid_argument("ReduceLROnPlateau", "factor", factor,
                                    "Factor should be < 1.0 (and non-negative: the lr is multiplied by it)")
        _check_optimizer(optimizer)
        if mode not in ("min", "max"):
            raise _invalid_argument("ReduceLROnPlateau", "mode", mode, f"mode {mode} is unknown! Use 'min' or 'max'")
        if threshold_mode not in ("rel", "abs"):
            raise _invalid_argument("ReduceLROnPlateau", "threshold_mode", threshold_mode,
                                    f"threshold mode {threshold_mode} is unknown! Use 'rel' or 'abs'")
        groups = optimizer.param_groups
        if isinstance(min_lr, (list, tuple)):
            self.default_min_lr, self.min_lrs = None, _per_group("ReduceLROnPlateau", "min_lr", groups, min_lr)
        else:
            self.default_min_lr, self.min_lrs = min_lr, [min_lr] * len(groups)
        for m in self.min_lrs:
            _check_eta_min("ReduceLROnPlateau", m, label="min_lr")
        self.optimizer, self.factor, self.patience, self.cooldown, self.eps = optimizer, factor, patience, \
            cooldown, eps
        self.mode, self.threshold, self.threshold_mode = mode, threshold, threshold_mode
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.last_epoch = 0
        self._step_count = 0
        self._last_lr = self._group_lrs()
        self.best, self.cooldown_counter, self.num_bad_epochs = self.mode_worse, 0, 0

    def step(self, metrics) -> None:
        """Record this epoch's metric; reduce the lrs after `patience` epochs without improvement."""
        current = float(metrics)
        self.last_epoch += 1
        if self._is_better(current, self.best):
            self.best, self.num_bad_epochs = current, 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs in cooldown do not count
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0
        self._last_lr = self._group_lrs()

    def _reduce_lr(self) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise OptimizerError(f"ReduceLROnPlateau: the optimizer has {len(groups)} parameter groups but "
                                     f"min_lr has {len(self.min_lrs)} values (a group was added since?)"
                                     f"{at(user_location())}; set scheduler.min_lrs to one value per group")
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs):
            old = float(group["lr"])
            new = max(old * self.factor, min_lr)
            if old - new > self.eps:
                group["lr"] = new

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def _is_better(self, a, best) -> bool:
        if self.mode == "min":
            return a < best * (1.0 - self.threshold) if self.threshold_mode == "rel" else a < best - self.threshold
        return a > best * (self.threshold + 1.0) if self.threshold_mode == "rel" else a > best + self.threshold


def _check_gamma(owner: str, gamma) -> None:
    x = _real_number(gamma)
    if x is None or not math.isfinite(x) or x < 0:
        raise _invalid_argument(owner, "gamma", gamma, "gamma must be a non-negative finite number: the learning "
                                "rate is multiplied by it, and a negative gamma would make it negative")


def _check_eta_min(owner: str, eta_min, label="eta_min") -> None:
    eta = _real_number(eta_min)
    if eta is None or not math.isfinite(eta) or eta < 0:
        raise _invalid_argument(owner, label, eta_min,
                                f"the learning rate anneals down to {label}, so it must be a non-negative "
                                f"finite number (PyTorch's default: 0.0)")


# PyTorch's path: avalon.optim.lr_scheduler.StepLR is this module's StepLR.
_this = sys.modules[__name__]
_this.__avalon_stability__ = "stable"
_this.__avalon_component__ = "Optimizers"
registry.EXPORTS["optim"]["lr_scheduler"] = _this
registry.LEVELS[("optim", "lr_scheduler")] = ("Optimizers", "stable")
