"""Module semantics as PyTorch's, for programs ported line by line: buffers
updated twice in one step, tied weights, unused and frozen parameters,
declared parameters and buffers, the containers and registration methods."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import avalon
import avalon.nn as nn


def _copy_to_torch(model, tmodel):
    tmodel.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in model.state_dict().items()})


# -- a buffer updated twice in one traced function ----------------------------------------------------------

def _two_batches(momentum):
    rng = np.random.default_rng(0)
    bn = nn.BatchNorm1d(3, momentum=momentum)
    bn.weight[...] = rng.standard_normal(3)
    real = rng.standard_normal((5, 3)).astype(np.float32)
    fake = (rng.standard_normal((4, 3)) * 3 + 1).astype(np.float32)
    tbn = torch.nn.BatchNorm1d(3, momentum=momentum)
    _copy_to_torch(bn, tbn)
    return bn, tbn, real, fake


def _discriminator_loss(bn, real, fake):
    return (bn(real) * bn(real)).mean() - (bn(fake) * 0.5).sum()


def _torch_discriminator_loss(tbn, real, fake):
    real, fake = torch.from_numpy(real), torch.from_numpy(fake)
    return (tbn(real) * tbn(real)).mean() - (tbn(fake) * 0.5).sum()


def _assert_stats_match(bn, tbn):
    np.testing.assert_allclose(bn.running_mean, tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.running_var, tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == int(tbn.num_batches_tracked)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_applied_to_several_batches_in_one_grad_updates_in_order_as_torch(momentum):
    bn, tbn, real, fake = _two_batches(momentum)
    for step in range(2):
        loss, grads = avalon.grad(_discriminator_loss, bn, real, fake)
        tloss = _torch_discriminator_loss(tbn, real, fake)
        tloss.backward()
        np.testing.assert_allclose(loss, tloss.item(), rtol=1e-5, atol=1e-5)
        _assert_stats_match(bn, tbn)
        assert int(bn.num_batches_tracked) == 3 * (step + 1)
        np.testing.assert_allclose(grads[0].weight, tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grads[0].bias, tbn.bias.grad.numpy(), rtol=1e-4, atol=1e-5)
        tbn.zero_grad()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_applied_to_several_batches_in_one_jit_updates_in_order_as_torch(momentum):
    bn, tbn, real, fake = _two_batches(momentum)
    f = avalon.jit(lambda m, a, b: (m(a), m(b)))
    out_real, out_fake = f(bn, real, fake)
    with torch.no_grad():
        t_real, t_fake = tbn(torch.from_numpy(real)), tbn(torch.from_numpy(fake))
    np.testing.assert_allclose(out_real, t_real.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out_fake, t_fake.numpy(), rtol=1e-5, atol=1e-5)
    _assert_stats_match(bn, tbn)
