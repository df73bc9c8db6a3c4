"""Train the VAE (784-500-5) on Fashion-MNIST pixels.

    python train_vae.py                      # 10 epochs, Adam lr 1e-3, batch 100, the negative ELBO
    python train_vae.py --reduction mean     # train on vae_loss's default, the benchmark's loss
    python train_vae.py --epochs 1 --limit 256 --test-limit 256   # a quick run

`python` is one with Avalon installed: after `python3 -m nox -s tests` at the
repository root, `.nox/tests/bin/python packages/avalon-zoo/examples/train_vae.py`.

Prints the training and test loss after each epoch (the loss trained on; the
test set's negative ELBO in nats per image is printed beside it), and writes
OUT/vae_reconstructions.png (test inputs above their reconstructions) and
OUT/vae_samples.png (images decoded from z ~ N(0, I)).

The script trains on reduction="sum" (the negative ELBO) rather than vae_loss's
default "mean" (the benchmark's BCE(mean) + KL(mean)): "mean" weighs the KL term
so heavily that the posterior collapses to the prior and every reconstruction
is the same average garment (see the README).
"""
from __future__ import annotations

import functools

import avalon
import avalon.optim
from avalon_zoo.datasets import Batches
from avalon_zoo.models import VAE, vae_loss

import _common


def main():
    p = _common.parser(__doc__.splitlines()[0], epochs=10, batch_size=100, lr=1e-3)
    p.add_argument("--reduction", choices=("mean", "sum"), default="sum",
                   help="vae_loss reduction: 'sum' (negative ELBO, the default here) or 'mean' (the benchmark's)")
    args = p.parse_args()
    _common.setup(args)
    x_train, _, x_test, _ = _common.load_fashion_mnist(args)
    model = VAE()
    opt = avalon.optim.Adam(lr=args.lr)
    loss_fn = functools.partial(vae_loss, reduction=args.reduction)
    test_loss_fn = avalon.jit(loss_fn)
    test_elbo_fn = avalon.jit(functools.partial(vae_loss, reduction="sum"))
    batches = Batches(x_train, batch_size=args.batch_size, seed=args.seed)
    print(f"VAE on Fashion-MNIST: {len(x_train)} training / {len(x_test)} test images, {args.epochs} epochs, "
          f"Adam lr {args.lr}, batch {args.batch_size}, vae_loss reduction={args.reduction!r}", flush=True)

    clock = _common.Clock()
    test_losses = []
    for epoch in range(1, args.epochs + 1):
        train_loss = _common.train_epoch(model, loss_fn, opt, batches, f"epoch {epoch}/{args.epochs}")
        test_losses.append(_common.mean_over_batches(test_loss_fn, model, x_test))
        test_elbo = _common.mean_over_batches(test_elbo_fn, model, x_test)
        print(f"epoch {epoch}: train loss {train_loss:.4f}  test loss {test_losses[-1]:.4f}  "
              f"(test -ELBO {test_elbo:.1f} nats/image)  wall {clock():.1f} s", flush=True)

    model.eval()
    shown = x_test[:10]
    _common.plot_image_rows([shown, avalon.jit(lambda m, x: m.reconstruct(x))(model, shown)],
                            ["input", "recon."], args.out / "vae_reconstructions.png",
                            f"VAE reconstructions after {args.epochs} epochs (test images)")
    _common.plot_image_grid(avalon.jit(lambda m: m.sample(64))(model), args.out / "vae_samples.png",
                            "VAE samples, z ~ N(0, I)")
    falling = all(b < a for a, b in zip(test_losses, test_losses[1:]))
    _common.summary("train_vae", model="VAE", epochs=args.epochs, train=len(x_train), test=len(x_test),
                    wall_s=f"{clock():.1f}", reduction=args.reduction, test_loss=test_losses[-1],
                    test_neg_elbo_nats=test_elbo, test_loss_falling_every_epoch=falling)


if __name__ == "__main__":
    main()
