"""Port of pytorch/examples dcgan/main.py: transposed-convolution generator,
convolutional discriminator with BatchNorm, `weights_init` through
`Module.apply`, BCELoss, two Adam optimizers with betas (0.5, 0.999).

Sizes are shrunk (16x16 images, three generator stages) so the test stays
short; the layer pattern is the example's.  The discriminator step applies D
to the real and to the fake batch, so D's BatchNorm running statistics are
updated twice per step, in order, as in torch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as tnn

import avalon
import avalon.nn as nn
import avalon.optim as optim

nz, ngf, ndf, nc = 8, 8, 8, 3
real_label, fake_label = 1., 0.


# -- PyTorch, as in the example -------------------------------------------------------------------------------

def tweights_init(m):
    classname = m.__class__.__name__
    if classname.find('Conv') != -1:
        torch.nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find('BatchNorm') != -1:
        torch.nn.init.normal_(m.weight, 1.0, 0.02)
        torch.nn.init.zeros_(m.bias)


class TGenerator(tnn.Module):
    def __init__(self):
        super().__init__()
        self.main = tnn.Sequential(
            tnn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False),
            tnn.BatchNorm2d(ngf * 4),
            tnn.ReLU(True),
            tnn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            tnn.BatchNorm2d(ngf * 2),
            tnn.ReLU(True),
            tnn.ConvTranspose2d(ngf * 2, nc, 4, 2, 1, bias=False),
            tnn.Tanh()
        )

    def forward(self, input):
        return self.main(input)


class TDiscriminator(tnn.Module):
    def __init__(self):
        super().__init__()
        self.main = tnn.Sequential(
            tnn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            tnn.LeakyReLU(0.2, inplace=True),
            tnn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            tnn.BatchNorm2d(ndf * 2),
            tnn.LeakyReLU(0.2, inplace=True),
            tnn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False),
            tnn.Sigmoid()
        )

    def forward(self, input):
        output = self.main(input)
        return output.view(-1, 1).squeeze(1)


# -- Avalon, line by line -----------------------------------------------------------------------------------

def weights_init(m):
    classname = m.__class__.__name__
    if classname.find('Conv') != -1:
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find('BatchNorm') != -1:
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, nc, 4, 2, 1, bias=False),
            nn.Tanh()
        )

    def forward(self, input):
        return self.main(input)


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 4, 1, 0, bias=False),
            nn.Sigmoid()
        )

    def forward(self, input):
        output = self.main(input)
        return output.reshape(-1, 1).squeeze(1)


criterion = nn.BCELoss()


def d_loss(netD, real_cpu, fake):
    # (1) Update D network: maximize log(D(x)) + log(1 - D(G(z))); G's output is a constant here
    b_size = real_cpu.shape[0]
    label = avalon.full((b_size,), real_label, dtype=real_cpu.dtype)
    errD_real = criterion(netD(real_cpu), label)
    label = avalon.full((b_size,), fake_label, dtype=real_cpu.dtype)
    errD_fake = criterion(netD(fake), label)
    return errD_real + errD_fake


def g_loss(netG, netD, noise):
    # (2) Update G network: maximize log(D(G(z)))
    label = avalon.full((noise.shape[0],), real_label, dtype=noise.dtype)
    return criterion(netD(netG(noise)), label)


def _batches(n, batch=6, seed=1):
    # (seed 0 puts one discriminator BatchNorm output within float32 rounding of
    # LeakyReLU's kink, where the two frameworks' roundings may pick different
    # slopes: a legitimate difference no tolerance should hide)
    rng = np.random.default_rng(seed)
    return [(np.tanh(rng.standard_normal((batch, nc, 16, 16))).astype(np.float32),
             rng.standard_normal((batch, nz, 1, 1)).astype(np.float32)) for _ in range(n)]


def test_dcgan_trains_like_torch(check):
    tnetG, tnetD = TGenerator(), TDiscriminator()
    tnetG.apply(tweights_init)
    tnetD.apply(tweights_init)
    tcriterion = tnn.BCELoss()
    toptimizerD = torch.optim.Adam(tnetD.parameters(), lr=2e-3, betas=(0.5, 0.999))
    toptimizerG = torch.optim.Adam(tnetG.parameters(), lr=2e-3, betas=(0.5, 0.999))

    netG, netD = Generator(), Discriminator()
    netG.apply(weights_init)
    netD.apply(weights_init)
    netG.load_state_dict(tnetG.state_dict())
    netD.load_state_dict(tnetD.state_dict())
    optimizerD = optim.Adam(netD.parameters(), lr=2e-3, betas=(0.5, 0.999))
    optimizerG = optim.Adam(netG.parameters(), lr=2e-3, betas=(0.5, 0.999))

    for step, (real_cpu, noise) in enumerate(_batches(3)):
        treal, tnoise = torch.from_numpy(real_cpu), torch.from_numpy(noise)
        b_size = treal.size(0)
        # torch: D step
        tnetD.zero_grad()
        label = torch.full((b_size,), real_label, dtype=torch.float)
        errD_real = tcriterion(tnetD(treal), label)
        errD_real.backward()
        tfake = tnetG(tnoise)
        label.fill_(fake_label)
        errD_fake = tcriterion(tnetD(tfake.detach()), label)
        errD_fake.backward()
        toptimizerD.step()

        # Avalon: D step on the same fake batch (G's forward, whose BatchNorm
        # statistics update happens here once, as in torch's single G forward)
        fake = netG(noise)
        lossD, gradsD = avalon.grad(d_loss, netD, real_cpu, fake)
        check.loss(lossD, errD_real + errD_fake, step)
        check.grads(tnetD, netD, gradsD[0], step)
        optimizerD.step(gradsD[0])
        check.params(tnetD, netD, step)
        check.close(netD.main[3].running_mean, tnetD.main[3].running_mean.numpy(),
                    f"step {step}: D's BatchNorm running_mean after two batches")
        check.close(netD.main[3].running_var, tnetD.main[3].running_var.numpy(),
                    f"step {step}: D's BatchNorm running_var after two batches")
        assert int(netD.main[3].num_batches_tracked) == int(tnetD.main[3].num_batches_tracked)

        # torch: G step
        tnetG.zero_grad()
        label.fill_(real_label)
        errG = tcriterion(tnetD(tfake), label)
        errG.backward()

        # Avalon: G step.  G runs forward again here; torch reuses its fake
        # batch, so G's running statistics are compared only through D.
        lossG, gradsG = avalon.grad(g_loss, netG, netD, noise, argnums=0)
        check.loss(lossG, errG, step)
        check.grads(tnetG, netG, gradsG[0], step)
        toptimizerG.step()
        optimizerG.step(gradsG[0])
        check.params(tnetG, netG, step)
