"""Train RealNVP normalizing flows: on 2-D two moons, then on Fashion-MNIST.

    python train_realnvp.py                      # both parts: 30 epochs of moons, 5 of Fashion-MNIST
    python train_realnvp.py --data moons         # only the 2-D toy data (seconds)
    python train_realnvp.py --epochs 1 --limit 256 --test-limit 256   # a quick run

`python` is one with Avalon installed: after `python3 -m nox -s tests` at the
repository root, `.nox/tests/bin/python packages/avalon-zoo/examples/train_realnvp.py`.

Two moons (generated with numpy, 20,000 training / 5,000 test points, or --limit
and --test-limit of them): 8 affine couplings with 2-layer MLPs of 128 units,
Adam lr 1e-3 (--lr), batch 256, --moons-epochs epochs (under a second each).
Prints the test log-likelihood (nats per point) after each epoch and writes
OUT/realnvp_moons.png: flow samples beside the data.

Fashion-MNIST: pixels dequantized with uniform noise (fresh for every training
batch, one fixed draw for the test set), logit transform (alpha 0.05),
flattened to 784 values; 6 affine couplings with checkerboard masks and 2-layer
MLPs of 512 units, Adam lr 1e-4 (--fashion-lr), batch 128, --epochs epochs.
Prints the test log-likelihood in bits per pixel (lower is better) after each
epoch and writes OUT/realnvp_samples.png (samples at temperature 1 and 0.7).
"""
from __future__ import annotations

import numpy as np

import avalon
import avalon.optim
from avalon_zoo.datasets import Batches
from avalon_zoo.models import RealNVP, bits_per_dim, dequantize, flow_nll_loss, two_moons

import _common

MOONS_TRAIN, MOONS_TEST = 20000, 5000


def train_flow(model, opt, train, test_log_prob, args, report, prepare=None):
    """Epochs of maximum likelihood; prepare(batch) is applied to each batch, report(epoch,
    train_nll, test log p) prints a line.  Returns the mean test log p per epoch."""
    batches = Batches(train, batch_size=args.batch_size, seed=args.seed, normalize=prepare)
    history = []
    for epoch in range(1, args.epochs + 1):
        train_nll = _common.train_epoch(model, flow_nll_loss, opt, batches, f"epoch {epoch}/{args.epochs}")
        history.append(test_log_prob())
        report(epoch, train_nll, history[-1])
    return history


def moons(args, clock):
    avalon.manual_seed(args.seed)
    train = two_moons(args.limit or MOONS_TRAIN, noise=0.05, seed=args.seed)
    test = two_moons(args.test_limit or MOONS_TEST, noise=0.05, seed=args.seed + 1)
    model = RealNVP(dim=2, num_coupling=8, hidden=128)
    opt = avalon.optim.Adam(lr=args.lr)
    log_prob = avalon.jit(lambda m, x: avalon.mean(m.log_prob(x)))
    print(f"RealNVP on two moons: {len(train)} training / {len(test)} test points, {args.epochs} epochs", flush=True)

    def report(epoch, train_nll, test_lp):
        print(f"  epoch {epoch}: train NLL {train_nll:.4f}  test log-likelihood {test_lp:.4f} nats/point  "
              f"wall {clock():.1f} s", flush=True)

    history = train_flow(model, opt, train, lambda: _common.mean_over_batches(log_prob, model, test),
                         args, report)
    samples = np.asarray(avalon.jit(lambda m: m.sample(2000))(model))
    plot_moons(test[:2000], samples, args.out / "realnvp_moons.png", history[-1])
    return history


def plot_moons(data, samples, path, test_lp):
    plt = _common.plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), sharex=True, sharey=True)
    for ax, points, title, color in ((axes[0], data, "test data", "tab:blue"),
                                     (axes[1], samples, "RealNVP samples", "tab:orange")):
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.5, color=color)
        ax.set_title(title)
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
        ax.set_aspect("equal")
    fig.suptitle(f"two moons: test log-likelihood {test_lp:.3f} nats/point")
    _common._save(fig, path)


def fashion(args, clock):
    avalon.manual_seed(args.seed)
    x_train, _, x_test, _ = _common.load_fashion_mnist(args, flatten=True)
    rng = np.random.default_rng(args.seed)
    test = dequantize(x_test, rng)  # one fixed draw of noise for the test set
    model = RealNVP(dim=784, num_coupling=6, hidden=512, image_shape=(1, 28, 28), logit_alpha=0.05)
    opt = avalon.optim.Adam(lr=args.fashion_lr)
    log_prob = avalon.jit(lambda m, x: avalon.mean(m.log_prob(x)))
    print(f"RealNVP on Fashion-MNIST: {len(x_train)} training / {len(test)} test images, {args.epochs} epochs, "
          f"Adam lr {args.fashion_lr}, batch {args.batch_size}", flush=True)

    def report(epoch, train_nll, test_lp):
        print(f"  epoch {epoch}: train {bits_per_dim(-train_nll, 784):.4f} bits/dim  test log-likelihood "
              f"{test_lp:.1f} nats/image = {bits_per_dim(test_lp, 784):.4f} bits/dim  wall {clock():.1f} s",
              flush=True)

    # fresh dequantization noise for every training batch
    history = train_flow(model, opt, x_train, lambda: _common.mean_over_batches(log_prob, model, test),
                         args, report, prepare=lambda xb: dequantize(xb, rng))
    draw = avalon.jit(lambda m, t: m.sample(32, temperature=t))
    samples = np.concatenate([np.asarray(draw(model, 1.0)), np.asarray(draw(model, 0.7))])
    _common.plot_image_grid(samples, args.out / "realnvp_samples.png",
                            "RealNVP samples: temperature 1.0 (top 4 rows), 0.7 (bottom 4 rows)")
    return history


def main():
    p = _common.parser(__doc__.splitlines()[0], epochs=5, batch_size=128, lr=1e-3)
    p.add_argument("--data", choices=("both", "moons", "fashion"), default="both")
    p.add_argument("--moons-epochs", type=int, default=30, help="epochs on two moons (default 30)")
    p.add_argument("--fashion-lr", type=float, default=1e-4, help="Adam learning rate on Fashion-MNIST")
    args = p.parse_args()
    _common.setup(args)
    fields = {}
    clock = _common.Clock()
    if args.data in ("both", "moons"):
        moons_args = p.parse_args()  # a copy: the moons use their own epochs and batch 256
        moons_args.batch_size, moons_args.epochs = 256, args.moons_epochs
        history = moons(moons_args, clock)
        fields.update(moons_epochs=args.moons_epochs, moons_test_loglik_nats=history[-1],
                      moons_first_epoch_nats=history[0])
    if args.data in ("both", "fashion"):
        history = fashion(args, _common.Clock())
        fields.update(fashion_epochs=args.epochs, fashion_test_bits_per_dim=bits_per_dim(history[-1], 784),
                      fashion_first_epoch_bits_per_dim=bits_per_dim(history[0], 784),
                      fashion_improved_every_epoch=all(b > a for a, b in zip(history, history[1:])))
    _common.summary("train_realnvp", wall_s=f"{clock():.1f}", **fields)


if __name__ == "__main__":
    main()
