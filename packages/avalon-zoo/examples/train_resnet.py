"""Train the small ResNet (3 stages of basic blocks, 16/32/64 channels, BatchNorm)
on Fashion-MNIST.

    python train_resnet.py                   # ResNet-14 (2 blocks per stage), 3 epochs, Adam lr 1e-3, batch 128
    python train_resnet.py --blocks 1        # ResNet-8
    python train_resnet.py --epochs 1 --limit 256 --test-limit 256   # a quick run

`python` is one with Avalon installed: after `python3 -m nox -s tests` at the
repository root, `.nox/tests/bin/python packages/avalon-zoo/examples/train_resnet.py`.

Prints the training loss, test loss and test accuracy (eval mode: BatchNorm's
running statistics) after each epoch, with the wall time, and writes the test
set's confusion matrix to OUT/resnet_confusion.png.
"""
from __future__ import annotations

import numpy as np

import avalon
import avalon.nn.functional as F
import avalon.optim
from avalon_zoo.datasets import Batches
from avalon_zoo.models import ResNet

import _common


def cross_entropy(model, x, y):
    return F.cross_entropy(model(x), y)


def main():
    p = _common.parser(__doc__.splitlines()[0], epochs=3, batch_size=128, lr=1e-3)
    p.add_argument("--blocks", type=int, default=2, help="basic blocks per stage (default 2: ResNet-14)")
    args = p.parse_args()
    _common.setup(args)
    x_train, y_train, x_test, y_test = _common.load_fashion_mnist(args)
    x_train, x_test = _common.standardize(x_train), _common.standardize(x_test)
    model = ResNet(num_classes=10, in_channels=1, blocks=(args.blocks,) * 3)
    depth = 6 * args.blocks + 2
    opt = avalon.optim.Adam(lr=args.lr)
    batches = Batches(x_train, y_train, batch_size=args.batch_size, seed=args.seed)
    print(f"ResNet-{depth} on Fashion-MNIST: {len(x_train)} training / {len(x_test)} test images, "
          f"{args.epochs} epochs, Adam lr {args.lr}, batch {args.batch_size}", flush=True)

    clock = _common.Clock()
    for epoch in range(1, args.epochs + 1):
        train_loss = _common.train_epoch(model, cross_entropy, opt, batches, f"epoch {epoch}/{args.epochs}")
        scores = _common.predict(model, x_test)
        test_loss = float(F.cross_entropy(scores, y_test))
        test_acc = _common.accuracy(scores, y_test)
        print(f"epoch {epoch}: train loss {train_loss:.4f}  test loss {test_loss:.4f}  "
              f"test accuracy {test_acc:.4f}  wall {clock():.1f} s", flush=True)

    matrix = _common.confusion_matrix(y_test, np.argmax(scores, axis=1))
    _common.plot_confusion(matrix, args.out / "resnet_confusion.png",
                           f"ResNet-{depth}, Fashion-MNIST test set: accuracy {test_acc:.2%}")
    _common.summary("train_resnet", model=f"ResNet-{depth}", epochs=args.epochs, train=len(x_train),
                    test=len(x_test), wall_s=f"{clock():.1f}", test_loss=test_loss, test_accuracy=test_acc)


if __name__ == "__main__":
    main()
