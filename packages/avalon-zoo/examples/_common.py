"""What the example scripts share: command-line options, Fashion-MNIST loading,
the training and evaluation loops, timing, and the pictures (matplotlib, Agg)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

import avalon  # noqa: E402
from avalon_zoo.datasets import (FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,  # noqa: E402
                                 DatasetNotFoundError, fashion_mnist)

EVAL_BATCH = 500


# -- options and data ------------------------------------------------------------------------------------

def parser(description: str, epochs: int, batch_size: int, lr: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--epochs", type=int, default=epochs, help=f"passes over the training data (default {epochs})")
    p.add_argument("--limit", type=int, default=None, help="train on the first N training examples only")
    p.add_argument("--test-limit", type=int, default=None,
                   help="evaluate on the first N test examples only (default: all 10,000)")
    p.add_argument("--out", type=Path, default=Path("results"), help="where the pictures go (default ./results)")
    p.add_argument("--seed", type=int, default=0, help="seeds initialization, noise and batch order")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"default {batch_size}")
    p.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    return p


def setup(args) -> None:
    """Seed everything and create the output directory."""
    avalon.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)


def load_fashion_mnist(args, flatten: bool = False):
    """(x_train, y_train, x_test, y_test), cut to --limit / --test-limit; exits with
    the loader's explanation when the data is not installed."""
    try:
        x_train, y_train = fashion_mnist("train", flatten=flatten)
        x_test, y_test = fashion_mnist("test", flatten=flatten)
    except DatasetNotFoundError as exc:
        sys.exit(f"{Path(sys.argv[0]).name}: this example trains on the real Fashion-MNIST.\n{exc}")
    return x_train[:args.limit], y_train[:args.limit], x_test[:args.test_limit], y_test[:args.test_limit]


def standardize(x: np.ndarray) -> np.ndarray:
    return (x - np.float32(FASHION_MNIST_MEAN)) / np.float32(FASHION_MNIST_STD)


# -- training and evaluation -------------------------------------------------------------------------------

def interactive() -> bool:
    """Whether someone watches: stdout and stderr are both terminals."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def epoch_bar(total: int, desc: str):
    """A progress bar within an epoch, with avalon-layers' `fit` conventions (tqdm
    on stderr, unit "batch", the running loss), cleared at the end (the script
    prints the epoch's line); silent when not `interactive()` (logs, pipes)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True, leave=False,
                disable=not interactive())


def train_epoch(model, loss_fn, opt, batches, desc: str = "training") -> float:
    """One pass over `batches` ((x, y) pairs, or x alone), showing a progress bar
    labelled `desc` on a terminal; the example-weighted mean loss."""
    model.train()
    total, count = 0.0, 0
    with epoch_bar(len(batches), desc) as bar:
        for batch in batches:
            args = batch if isinstance(batch, tuple) else (batch,)
            loss, grads = avalon.grad(loss_fn, model, *args, argnums=0)
            opt.step(model, grads[0])
            total += float(loss) * len(args[0])
            count += len(args[0])
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    return total / max(count, 1)


@avalon.jit
def _forward(model, x):
    return model(x)


def predict(model, x: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """The model's outputs on x in eval mode, batch by batch (compiled)."""
    model.eval()
    outs = [np.asarray(_forward(model, x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
    model.train()
    return np.concatenate(outs)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(scores, axis=1) == labels))


def mean_over_batches(fn, model, x: np.ndarray, batch_size: int = EVAL_BATCH) -> float:
    """The example-weighted mean of a compiled per-batch scalar fn(model, xb) over x (eval mode)."""
    model.eval()
    total = sum(float(fn(model, x[i:i + batch_size])) * len(x[i:i + batch_size])
                for i in range(0, len(x), batch_size))
    model.train()
    return total / len(x)


class Clock:
    """Wall time since creation, in seconds."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def summary(script: str, **fields) -> None:
    """The final one-line summary every example prints."""
    text = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
    print(f"SUMMARY {script} {text}", flush=True)


# -- pictures ------------------------------------------------------------------------------------------------

def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int = 10) -> np.ndarray:
    m = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(m, (labels, predictions), 1)
    return m


def plot_confusion(matrix: np.ndarray, path: Path, title: str, names=FASHION_MNIST_CLASSES) -> Path:
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    top = matrix.max()
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if count > top / 2 else "black")
    return _save(fig, path)


def plot_image_rows(rows, labels, path: Path, title: str) -> Path:
    """A grid with one row of 28x28 images per entry of `rows` (each (k, 784) or (k, 1, 28, 28))."""
    cols = len(rows[0])
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.9, len(rows) * 1.0 + 0.4), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, labels)):
        for c in range(cols):
            ax = axes[r][c]
            ax.imshow(np.clip(np.asarray(images[c]).reshape(28, 28), 0, 1), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center")
    fig.suptitle(title)
    return _save(fig, path)


def plot_image_grid(images, path: Path, title: str, cols: int = 8) -> Path:
    images = np.asarray(images).reshape(-1, 28, 28)
    rows = int(np.ceil(len(images) / cols))
    canvas = np.ones((rows * 30, cols * 30), dtype=np.float32)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        canvas[r * 30 + 1:r * 30 + 29, c * 30 + 1:c * 30 + 29] = np.clip(img, 0, 1)
    fig, ax = plt.subplots(figsize=(cols * 0.8, rows * 0.8 + 0.4))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    ax.set_title(title)
    return _save(fig, path)


def plot_curves(curves: dict, path: Path, title: str, ylabel: str) -> Path:
    """One line per entry of {label: per-epoch values}."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}", flush=True)
    return path
