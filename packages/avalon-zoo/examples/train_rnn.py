"""Train row-by-row sequence classifiers (LSTM and GRU, hidden 128) on Fashion-MNIST:
each image is a sequence of 28 rows of 28 pixels.

    python train_rnn.py                      # LSTM then GRU, 5 epochs each, Adam lr 1e-3, batch 64
    python train_rnn.py --kinds lstm         # the LSTM only
    python train_rnn.py --epochs 1 --limit 256 --test-limit 256   # a quick run

`python` is one with Avalon installed: after `python3 -m nox -s tests` at the
repository root, `.nox/tests/bin/python packages/avalon-zoo/examples/train_rnn.py`.

Prints the training loss, test loss and test accuracy after each epoch, with
the wall time, and writes the test accuracy curves to OUT/rnn_accuracy.png.
"""
from __future__ import annotations

import avalon
import avalon.nn.functional as F
import avalon.optim
from avalon_zoo.datasets import Batches
from avalon_zoo.models import SequenceClassifier

import _common


def cross_entropy(model, x, y):
    return F.cross_entropy(model(x), y)


def train(kind, args, data):
    x_train, y_train, x_test, y_test = data
    avalon.manual_seed(args.seed)
    model = SequenceClassifier(kind, hidden=args.hidden, num_layers=args.layers)
    opt = avalon.optim.Adam(lr=args.lr)
    batches = Batches(x_train, y_train, batch_size=args.batch_size, seed=args.seed)
    print(f"{kind.upper()} (hidden {args.hidden}, {args.layers} layer(s)) on Fashion-MNIST rows: "
          f"{len(x_train)} training / {len(x_test)} test images, {args.epochs} epochs, Adam lr {args.lr}, "
          f"batch {args.batch_size}", flush=True)
    clock, accuracies = _common.Clock(), []
    for epoch in range(1, args.epochs + 1):
        train_loss = _common.train_epoch(model, cross_entropy, opt, batches, f"epoch {epoch}/{args.epochs}")
        scores = _common.predict(model, x_test)
        test_loss = float(F.cross_entropy(scores, y_test))
        accuracies.append(_common.accuracy(scores, y_test))
        print(f"  epoch {epoch}: train loss {train_loss:.4f}  test loss {test_loss:.4f}  "
              f"test accuracy {accuracies[-1]:.4f}  wall {clock():.1f} s", flush=True)
    return accuracies, test_loss, clock()


def main():
    p = _common.parser(__doc__.splitlines()[0], epochs=5, batch_size=64, lr=1e-3)
    p.add_argument("--kinds", default="lstm,gru", help="comma-separated: lstm, gru (default both)")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=1)
    args = p.parse_args()
    _common.setup(args)
    x_train, y_train, x_test, y_test = _common.load_fashion_mnist(args)
    # rows as sequences: (N, 28 steps, 28 features), standardized pixels
    data = [_common.standardize(x_train)[:, 0], y_train, _common.standardize(x_test)[:, 0], y_test]
    curves, fields = {}, {}
    for kind in args.kinds.split(","):
        accuracies, test_loss, wall = train(kind, args, data)
        curves[kind.upper()] = accuracies
        fields[f"{kind}_test_accuracy"] = accuracies[-1]
        fields[f"{kind}_wall_s"] = f"{wall:.1f}"
    _common.plot_curves(curves, args.out / "rnn_accuracy.png",
                        "Fashion-MNIST read row by row: test accuracy", "test accuracy")
    _common.summary("train_rnn", epochs=args.epochs, train=len(x_train), test=len(x_test), **fields)


if __name__ == "__main__":
    main()
