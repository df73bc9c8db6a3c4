"""Train Avalon.jl's example CNN (or the benchmark CNN) on Fashion-MNIST.

    python train_cnn.py                      # ExampleCNN, 3 epochs, Adam lr 1e-3 halved each epoch, batch 32
    python train_cnn.py --model bench        # BenchCNN
    python train_cnn.py --epochs 1 --limit 256 --test-limit 256   # a quick run

`python` is one with Avalon installed: after `python3 -m nox -s tests` at the
repository root, `.nox/tests/bin/python packages/avalon-zoo/examples/train_cnn.py`.

Prints the training loss, test loss and test accuracy after each epoch, with the
wall time, and writes the test set's confusion matrix to OUT/cnn_confusion.png.
"""
from __future__ import annotations

import numpy as np

import avalon
import avalon.nn.functional as F
import avalon.optim
from avalon_zoo.datasets import Batches
from avalon_zoo.models import BenchCNN, ExampleCNN

import _common

MODELS = {"example": ExampleCNN, "bench": BenchCNN}


def nll(model, x, y):
    return F.nll_loss(model(x), y)


def main():
    p = _common.parser(__doc__.splitlines()[0], epochs=3, batch_size=32, lr=1e-3)
    p.add_argument("--model", choices=tuple(MODELS), default="example")
    p.add_argument("--lr-decay", type=float, default=0.5, help="learning rate factor per epoch (default 0.5)")
    args = p.parse_args()
    _common.setup(args)
    x_train, y_train, x_test, y_test = _common.load_fashion_mnist(args)
    x_train, x_test = _common.standardize(x_train), _common.standardize(x_test)
    model = MODELS[args.model]()
    opt = avalon.optim.Adam(lr=args.lr)
    batches = Batches(x_train, y_train, batch_size=args.batch_size, seed=args.seed)
    name = type(model).__name__
    print(f"{name} on Fashion-MNIST: {len(x_train)} training / {len(x_test)} test images, "
          f"{args.epochs} epochs, Adam lr {args.lr} x {args.lr_decay} per epoch, batch {args.batch_size}", flush=True)

    clock = _common.Clock()
    for epoch in range(1, args.epochs + 1):
        opt.lr = args.lr * args.lr_decay ** (epoch - 1)  # passed to the compiled step as data: no retrace
        train_loss = _common.train_epoch(model, nll, opt, batches, f"epoch {epoch}/{args.epochs}")
        scores = _common.predict(model, x_test)
        test_loss = float(F.nll_loss(scores, y_test))
        test_acc = _common.accuracy(scores, y_test)
        print(f"epoch {epoch}: train loss {train_loss:.4f}  test loss {test_loss:.4f}  "
              f"test accuracy {test_acc:.4f}  wall {clock():.1f} s", flush=True)

    matrix = _common.confusion_matrix(y_test, np.argmax(scores, axis=1))
    _common.plot_confusion(matrix, args.out / "cnn_confusion.png",
                           f"{name}, Fashion-MNIST test set: accuracy {test_acc:.2%}")
    _common.summary("train_cnn", model=name, epochs=args.epochs, train=len(x_train), test=len(x_test),
                    wall_s=f"{clock():.1f}", test_loss=test_loss, test_accuracy=test_acc)


if __name__ == "__main__":
    main()
