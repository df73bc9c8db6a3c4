"""LR schedulers give torch's learning rates epoch by epoch, group by group,
on optimizers with parameter groups and on the form without parameters."""
import math

import numpy as np
import pytest
import torch

import avalon
import avalon.optim as optim


def _lambda(epoch):
    return 0.95 ** epoch + 0.1 * (epoch % 3)


SCHEDULERS = [
    ("StepLR", lambda o: dict(step_size=4, gamma=0.5)),
    ("MultiStepLR", lambda o: dict(milestones=[3, 7, 7, 15], gamma=0.5)),
    ("ExponentialLR", lambda o: dict(gamma=0.9)),
    ("LambdaLR", lambda o: dict(lr_lambda=_lambda)),
    ("LambdaLR", lambda o: dict(lr_lambda=[_lambda, lambda e: 1 / (1 + e)][:len(o.param_groups)])),
    ("LinearLR", lambda o: dict()),
    ("LinearLR", lambda o: dict(start_factor=0.1, end_factor=0.5, total_iters=8)),
    ("CosineAnnealingLR", lambda o: dict(T_max=6, eta_min=0.001)),
    ("CosineAnnealingWarmRestarts", lambda o: dict(T_0=3)),
    ("CosineAnnealingWarmRestarts", lambda o: dict(T_0=2, T_mult=2, eta_min=0.001)),
    ("OneCycleLR", lambda o: dict(max_lr=0.5, total_steps=30)),
    ("OneCycleLR", lambda o: dict(max_lr=[0.5, 0.2][:len(o.param_groups)], epochs=5, steps_per_epoch=6,
                                  anneal_strategy="linear", three_phase=True, pct_start=0.25)),
]


def _ids(entry):
    return entry[0]


def _pair(optimizer, groups):
    """Avalon's and torch's optimizers, with `groups` parameter groups (0: the form without parameters)."""
    kw = dict(lr=0.1, momentum=0.9)
    if groups == 0:
        ours = getattr(optim, optimizer)(**kw) if optimizer == "SGD" else getattr(optim, optimizer)(lr=0.1)
        tparams = [torch.zeros(1, requires_grad=True)]
        theirs = getattr(torch.optim, optimizer)(tparams, **(kw if optimizer == "SGD" else dict(lr=0.1)))
        return ours, theirs
    arrays = [np.zeros(2, np.float32) for _ in range(groups)]
    tparams = [torch.zeros(2, requires_grad=True) for _ in range(groups)]
    lrs = [0.1, 0.02, 0.3][:groups]
    extra = kw if optimizer == "SGD" else dict(lr=0.1)
    ours = getattr(optim, optimizer)([{"params": [a], "lr": lr} for a, lr in zip(arrays, lrs)], **extra)
    theirs = getattr(torch.optim, optimizer)([{"params": [t], "lr": lr} for t, lr in zip(tparams, lrs)], **extra)
    return ours, theirs


@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("name, make_kwargs", SCHEDULERS, ids=[_ids(e) for e in SCHEDULERS])
def test_lrs_match_torch_epoch_by_epoch(name, make_kwargs, groups):
    for optimizer in ("SGD", "Adam"):
        opt, topt = _pair(optimizer, groups)
        sched = getattr(optim.lr_scheduler, name)(opt, **make_kwargs(opt))
        tsched = getattr(torch.optim.lr_scheduler, name)(topt, **make_kwargs(topt))
        steps = 29 if name == "OneCycleLR" else 25
        for epoch in range(steps + 1):
            ours, theirs = sched.get_last_lr(), tsched.get_last_lr()
            np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-15, err_msg=f"{optimizer} epoch {epoch}")
            assert [g["lr"] for g in opt.param_groups] == ours
            assert opt.lr == ours[0]
            if name == "OneCycleLR":  # momentum (SGD) or beta1 (Adam) cycles too
                key = "momentum" if optimizer == "SGD" else "betas"
                for g, tg in zip(opt.param_groups, topt.param_groups):
                    np.testing.assert_allclose(np.ravel(g[key]), np.ravel(tg[key]), rtol=1e-12)
            if epoch < steps:
                topt.step()
                sched.step()
                tsched.step()


def test_cosine_warm_restarts_takes_fractional_epochs():
    opt, topt = _pair("SGD", 2)
    sched = optim.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=2)
    tsched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(topt, T_0=2, T_mult=2)
    for epoch in range(8):
        for batch in range(4):
            sched.step(epoch + batch / 4)
            tsched.step(epoch + batch / 4)
            np.testing.assert_allclose(sched.get_last_lr(), tsched.get_last_lr(), rtol=1e-12)


@pytest.mark.parametrize("kwargs", [dict(), dict(mode="max", factor=0.5, patience=2, threshold=0.1, cooldown=2),
                                    dict(threshold_mode="abs", patience=1, min_lr=[0.05, 0.001], factor=0.3),
                                    dict(patience=0, eps=0.05)])
def test_reduce_lr_on_plateau_matches_torch(kwargs):
    opt, topt = _pair("SGD", 2)
    sched = optim.ReduceLROnPlateau(opt, **kwargs)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, **kwargs)
    rng = np.random.default_rng(0)
    metrics = np.concatenate([np.linspace(1, 0.5, 5), 0.5 + 0.01 * rng.standard_normal(30)])
    changes = 0
    for m in metrics:
        before = opt.lr
        sched.step(m)
        tsched.step(m)
        changes += opt.lr != before
        np.testing.assert_allclose(sched.get_last_lr(), tsched.get_last_lr(), rtol=1e-12)
        np.testing.assert_allclose([g["lr"] for g in opt.param_groups], [g["lr"] for g in topt.param_groups])
    assert changes > 0


@pytest.mark.parametrize("groups", [0, 2])
def test_sequential_lr_matches_torch(groups):
    opt, topt = _pair("SGD", groups)

    def make(o, lib):
        warm = lib.LinearLR(o, start_factor=0.1, total_iters=4)
        cos = lib.CosineAnnealingLR(o, T_max=8, eta_min=0.001)
        decay = lib.ExponentialLR(o, gamma=0.8)
        return lib.SequentialLR(o, [warm, cos, decay], milestones=[4, 12])

    sched, tsched = make(opt, optim.lr_scheduler), make(topt, torch.optim.lr_scheduler)
    for epoch in range(22):
        np.testing.assert_allclose(sched.get_last_lr(), tsched.get_last_lr(), rtol=1e-12, err_msg=f"epoch {epoch}")
        np.testing.assert_allclose([g["lr"] for g in opt.param_groups], [g["lr"] for g in topt.param_groups],
                                   rtol=1e-12)
        topt.step()
        sched.step()
        tsched.step()


def test_one_cycle_momentum_cycling_does_not_retrace_and_trains_as_torch():
    rng = np.random.default_rng(1)
    w = rng.standard_normal(4).astype(np.float32)
    t = torch.tensor(w.copy(), requires_grad=True)
    opt, topt = optim.Adam([w], lr=0.1), torch.optim.Adam([t], lr=0.1, foreach=False)
    sched = optim.OneCycleLR(opt, max_lr=0.3, total_steps=10)
    tsched = torch.optim.lr_scheduler.OneCycleLR(topt, max_lr=0.3, total_steps=10)
    for _ in range(10):
        g = rng.standard_normal(4).astype(np.float32)
        opt.step([g])
        t.grad = torch.tensor(g)
        topt.step()
        sched.step()
        tsched.step()
    np.testing.assert_allclose(w, t.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert opt.update_fn.traces == 1
    with pytest.raises(ValueError, match="Tried to step 11 times"):
        sched.step()
    assert sched.last_epoch == 10  # the failed step changed nothing


def test_scheduler_state_resumes_through_the_optimizers_torch_format_state():
    w = np.zeros(2, np.float32)
    opt = optim.SGD([w], lr=0.2, momentum=0.9)
    sched = optim.OneCycleLR(opt, max_lr=1.0, total_steps=12)
    for _ in range(4):
        sched.step()
    saved_opt, saved = opt.state_dict(), sched.state_dict()
    expect = []
    for _ in range(4):
        sched.step()
        expect.append((opt.lr, opt.momentum))
    opt2 = optim.SGD([w], lr=0.2, momentum=0.9)
    sched2 = optim.OneCycleLR(opt2, max_lr=1.0, total_steps=12)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved)
    got = []
    for _ in range(4):
        sched2.step()
        got.append((opt2.lr, opt2.momentum))
    np.testing.assert_allclose(got, expect, rtol=1e-12)


@pytest.mark.parametrize("make, words", [
    (lambda o: optim.MultiStepLR(o, milestones=[2], gamma=-0.1), "Invalid gamma: -0.1"),
    (lambda o: optim.LambdaLR(o, lr_lambda=[_lambda, _lambda]), "Expected 1 lr_lambdas"),
    (lambda o: optim.LinearLR(o, start_factor=0.0), "Starting multiplicative factor"),
    (lambda o: optim.LinearLR(o, end_factor=1.5), "Ending multiplicative factor"),
    (lambda o: optim.CosineAnnealingWarmRestarts(o, T_0=0), "Expected positive integer T_0"),
    (lambda o: optim.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=0), "T_mult >= 1"),
    (lambda o: optim.OneCycleLR(o, max_lr=0.1), "either total_steps OR (epochs AND steps_per_epoch)"),
    (lambda o: optim.OneCycleLR(o, max_lr=0.1, total_steps=5, pct_start=1.5), "pct_start"),
    (lambda o: optim.OneCycleLR(optim.Adagrad(lr=0.1), max_lr=0.1, total_steps=5), "momentum or beta1"),
    (lambda o: optim.ReduceLROnPlateau(o, factor=1.0), "Factor should be < 1.0"),
    (lambda o: optim.ReduceLROnPlateau(o, mode="best"), "mode best is unknown"),
    (lambda o: optim.SequentialLR(o, [optim.StepLR(o, 2)], milestones=[3]), "one more than the number of milestone"),
])
def test_bad_scheduler_arguments_are_refused(make, words):
    opt = optim.SGD(lr=0.1, momentum=0.9)
    with pytest.raises(ValueError) as err:
        make(opt)
    assert words in str(err.value)


def test_a_lambda_that_makes_lr_negative_is_refused_and_changes_nothing():
    opt = optim.SGD([{"params": [np.zeros(2)]}, {"params": [np.zeros(3)], "lr": 0.2}], lr=0.1)
    sched = optim.LambdaLR(opt, lambda e: 1 - 0.5 * e)
    sched.step()
    with pytest.raises(ValueError, match="would be -0.0|would be -"):
        for _ in range(3):
            sched.step()
    assert sched.last_epoch == 2 and [g["lr"] for g in opt.param_groups] == [0.0, 0.0]


def test_new_schedulers_are_exported():
    from avalon_layers.registry import LEVELS
    for name in ("MultiStepLR", "LambdaLR", "LinearLR", "OneCycleLR", "CosineAnnealingWarmRestarts",
                 "ReduceLROnPlateau", "SequentialLR", "Adadelta", "Adamax", "NAdam", "RAdam"):
        assert LEVELS[("optim", name)] == ("Optimizers", "stable")
        assert getattr(avalon.optim, name) is getattr(optim.lr_scheduler if name.endswith(("LR", "Restarts",
                                                                                          "Plateau")) else optim,
                                                      name)
