"""avalon.fit: a convenience training loop, and a template for your own.

    history = avalon.fit(model, X, Y, loss_fn=F.cross_entropy, epochs=5,
                         validation_data=(Xv, Yv), metrics=["accuracy"])

Each batch is one call of a compiled gradient function (what avalon.grad
builds: avalon.GradFunction with argnums=0) and one optimizer step (opt.step,
itself compiled).  Everything else is plain Python, short enough to copy and
change when a model needs more (several inputs, gradient clipping, mixed
objectives): fit is experimental because it is deliberately basic.

Loss conventions:

* supervised (Y given): ``loss_fn(model(xb), yb)``, e.g. F.cross_entropy or
  nn.MSELoss();
* unsupervised (Y is None): ``loss_fn(model, xb)``: the loss receives the
  model and the batch and runs the model itself, as a VAE's loss does
  (reconstruction + KL from the encoder's outputs) or an autoencoder's
  ``lambda m, x: F.mse_loss(m(x), x)``.

The loss must average over the batch (reduction "mean"): epoch values are the
batch losses averaged with batch-size weights.

Data-parallel (``distributed=True``, under ``mpirun -n N``): avalon.distributed
is initialized, rank 0's model is broadcast to every rank, each rank trains on
its shard of every global batch (np.array_split(batch, N)[rank]), each step's
loss and gradients are the global batch's (avalon.distributed.average_gradients:
one all-reduce per step), so every rank takes the same optimizer step and the
reported loss is the global mean.  Only rank 0 shows progress; every rank
returns the same History (metrics and validation run on every rank over all
of their data, not sharded: identical results, repeated work).
"""
from __future__ import annotations

import functools
import sys
import types
from collections import OrderedDict

import numpy as np

import avalon
from avalon import tree
from avalon.backends import backend_of

from .registry import export


class History(dict):
    """What fit returns: a dict of per-epoch lists, ``history["loss"]``,
    ``history["val_loss"]``, ``history["accuracy"]``, ``history["val_accuracy"]``,
    ...; ``history.epochs`` lists the epochs run (early stopping may end
    sooner) and ``history.model`` is the trained model (a copy, when fit had to
    move a model that is not an nn.Module to another device)."""

    def __init__(self):
        super().__init__()
        self.epochs: list[int] = []
        self.model = None

    def _record(self, epoch: int, logs: dict) -> None:
        self.epochs.append(epoch)
        for k, v in logs.items():
            self.setdefault(k, []).append(v)

    def __repr__(self):
        last = ", ".join(f"{k}={v[-1]:.4g}" for k, v in self.items())
        return f"History({len(self.epochs)} epochs; last: {last})"


def _supervised_loss(model, xb, yb, loss_fn):
    return loss_fn(model(xb), yb)


def _unsupervised_loss(model, xb, loss_fn):
    return loss_fn(model, xb)


def _forward(model, xb):
    return model(xb)


class _Steps:
    """The compiled functions of one fit: the training step (what avalon.grad
    builds: a GradFunction with argnums=0) and the evaluation forward.

    They are shared by every fit of a model with the same structure (the tree
    of its arrays and their shapes) and loss: fitting a model again reuses its
    compiled signatures, and avalon's retrace warnings count one model's
    signatures (batch shapes), not those of every model fitted in the process."""

    _cache: "OrderedDict[tuple, _Steps]" = OrderedDict()
    MAX_CACHED = 32

    def __init__(self, supervised):
        loss = _supervised_loss if supervised else _unsupervised_loss
        self.supervised = supervised
        self.grad = avalon.GradFunction(loss, argnums=0)
        self.eval_loss = avalon.jit(_unsupervised_loss)  # the unsupervised loss runs the model itself
        self.forward = avalon.jit(_forward)

    @classmethod
    def of(cls, model, loss_fn, supervised) -> "_Steps":
        leaves, treedef = tree.flatten(model)
        loss_key = loss_fn if isinstance(loss_fn, _FUNCTION_TYPES) else type(loss_fn)  # loss objects: by class
        key = (treedef, tuple((type(x), tuple(x.shape), str(x.dtype)) for x in leaves), loss_key, supervised)
        steps = cls._cache.get(key)
        if steps is None:
            steps = cls._cache[key] = cls(supervised)
            while len(cls._cache) > cls.MAX_CACHED:
                cls._cache.popitem(last=False)
        cls._cache.move_to_end(key)
        return steps


_FUNCTION_TYPES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, functools.partial)


@export("toplevel", "Fitting API")
def fit(model, X, Y=None, *, loss_fn, epochs: int = 1, batch_size: int = 32, opt=None, device=None,
        shuffle: bool = True, seed=None, validation_data=None, metrics=(), callbacks=(), verbose: int = 1,
        drop_last: bool = False, distributed: bool = False) -> History:
    """Train `model` on the samples X (and targets Y) for `epochs` epochs.

    - loss_fn: ``loss_fn(model(xb), yb)``, or ``loss_fn(model, xb)`` when Y is
      None (unsupervised: see the module docstring).
    - opt: an avalon.optim optimizer; default ``avalon.optim.Adam(lr=1e-3)``.
    - device: where to train; the model is moved there (``model.to(device)``
      for an nn.Module, in place; a copy by avalon.to_device otherwise, read it
      from ``history.model``) and each batch is moved there.  Default: the
      device the model's arrays are on.
    - shuffle, seed: batches are drawn in a fresh random order each epoch from
      ``numpy.random.default_rng(seed)`` (seed does not seed dropout: call
      avalon.manual_seed for that).
    - drop_last: skip the last batch when it is smaller than batch_size.  Kept
      (the default), it has its own shape, so the step compiles once more for it.
    - validation_data: ``(X_val, Y_val)``, or ``X_val`` when Y is None;
      evaluated after each epoch in eval mode: ``val_loss`` and ``val_<metric>``.
    - metrics: names from avalon_layers.metrics (``"accuracy"``, ``"f1"``),
      callables ``metric(y_pred, y_true) -> float``, or a {name: metric}
      dict; computed after each epoch on all of the training data (``<name>``,
      in eval mode: one extra forward pass) and on the validation data
      (``val_<name>``).  Supervised only.
    - callbacks: objects with optional ``on_batch_end(batch, logs)`` and
      ``on_epoch_end(epoch, logs)``; ``on_epoch_end`` returning True stops
      training (early stopping).  logs holds the values recorded so far.
    - verbose: 0 silent, 1 a tqdm progress bar per epoch with the running
      loss, 2 one line per epoch (both on stderr).

    - distributed: data-parallel training across the ranks of avalon.distributed
      (start the script with ``mpirun -n N python train.py``): batch_size is the
      global batch, split among the ranks; see the module docstring.

    The model is in train mode while training and in eval mode for
    evaluation (when it has train/eval), and ends in the mode it started in.
    Returns a History (a dict of per-epoch lists)."""
    supervised = Y is not None
    n = _check_data(X, Y)
    _check_sizes(epochs, batch_size, n, drop_last)
    metric_fns = _metric_functions(metrics, supervised)
    if opt is None:
        from .optim import Adam
        opt = Adam(lr=1e-3)
    model, dev = _place_model(model, device)
    world = _DataParallelWorld(model, batch_size, seed) if distributed else _ONE_PROCESS
    seed, verbose = world.seed(seed), world.verbose(verbose)
    val = _validation_arrays(validation_data, supervised)
    history = History()
    history.model = model
    was_training = getattr(model, "training", None)
    rng = np.random.default_rng(seed)
    try:
        _set_mode(model, True)
        steps = _Steps.of(model, loss_fn, supervised)  # keyed by the model in train mode
        for epoch in range(epochs):
            order = rng.permutation(n) if shuffle else None
            with _progress(verbose, epoch, epochs, n, batch_size, drop_last) as bar:
                _set_mode(model, True)
                batches = _batches(n, order, batch_size, drop_last)
                logs = {"loss": _train_epoch(steps, model, X, Y, batches, loss_fn, opt, dev, callbacks, bar,
                                             world)}
                _set_mode(model, False)
                logs.update(_evaluate(steps, model, X, Y, loss_fn, metric_fns, dev, batch_size, with_loss=False))
                if val is not None:
                    logs.update(_evaluate(steps, model, *val, loss_fn, metric_fns, dev, batch_size, prefix="val_"))
                bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, refresh=True)
            history._record(epoch, logs)
            _report(verbose, epoch, epochs, logs)
            if _stop_requested(callbacks, epoch, logs):
                break
    finally:
        if was_training is not None:
            _set_mode(model, was_training)
    return history


# -- checks and set-up ------------------------------------------------------------------------------

def _check_data(X, Y) -> int:
    if not tree.is_array(X):
        raise TypeError(f"fit: X must be an array (samples along the first axis), not {type(X).__name__}")
    if Y is not None and not tree.is_array(Y):
        raise TypeError(f"fit: Y must be an array (targets along the first axis), not {type(Y).__name__}")
    n = X.shape[0] if X.ndim else 0
    if Y is not None and (Y.ndim == 0 or Y.shape[0] != n):
        raise avalon.ShapeError(f"fit: X has {n} samples (shape {tuple(X.shape)}) but Y has shape "
                                f"{tuple(Y.shape)}: they need the same first dimension")
    if n == 0:
        raise avalon.ShapeError(f"fit: X has no samples (shape {tuple(X.shape)})")
    return n


def _check_sizes(epochs, batch_size, n, drop_last):
    if not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise ValueError(f"fit: epochs must be a non-negative int, not {epochs!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"fit: batch_size must be a positive int, not {batch_size!r}")
    if drop_last and n < batch_size:
        raise ValueError(f"fit: drop_last=True with {n} samples and batch_size={batch_size} leaves no batch")


def _metric_functions(metrics, supervised) -> list:
    """[(name, metric(y_pred, y_true))] from names, callables or a {name: callable} dict."""
    if isinstance(metrics, str) or callable(metrics):
        metrics = [metrics]
    items = metrics.items() if isinstance(metrics, dict) else [(None, m) for m in metrics]
    out = []
    for name, m in items:
        if isinstance(m, str):
            out.append((name or m, _named_metric(m)))
        elif callable(m):
            out.append((name or getattr(m, "__name__", type(m).__name__), m))
        else:
            raise TypeError(f"fit: a metric is a name or a callable, not {m!r}")
    if out and not supervised:
        raise ValueError("fit: metrics compare predictions with targets, so they need Y (this fit is unsupervised)")
    return out


def _named_metric(name):
    from . import metrics as metrics_module
    fn = getattr(metrics_module, name, None)
    if name.startswith("_") or not callable(fn) or getattr(fn, "__module__", None) != metrics_module.__name__:
        raise ValueError(f"fit: unknown metric {name!r}; give a name from avalon_layers.metrics (accuracy, "
                         "precision, recall, f1) or a callable metric(y_pred, y_true)")
    # by keyword: the metrics of avalon_layers.metrics do not all take (y_pred, y_true) in that order
    return lambda y_pred, y_true: fn(y_pred=y_pred, y_true=y_true)


def _place_model(model, device):
    """The model on the training device, and that device."""
    if device is None:
        leaves, _ = tree.flatten(model)
        arrays = [x for x in leaves if not isinstance(x, np.generic)]
        return model, (backend_of(arrays[0]).device if arrays else avalon.device("cpu"))
    dev = avalon.device(device)
    if callable(getattr(model, "to", None)) and hasattr(model, "state_dict"):
        return model.to(dev), dev
    return avalon.to_device(model, dev), dev


def _validation_arrays(validation_data, supervised):
    if validation_data is None:
        return None
    if supervised:
        if not (isinstance(validation_data, (tuple, list)) and len(validation_data) == 2):
            raise TypeError("fit: validation_data must be (X_val, Y_val) for a supervised fit")
        Xv, Yv = validation_data
    else:
        Xv, Yv = (validation_data[0] if isinstance(validation_data, (tuple, list)) else validation_data), None
    _check_data(Xv, Yv)
    return Xv, Yv


def _set_mode(model, training: bool) -> None:
    if callable(getattr(model, "train", None)) and callable(getattr(model, "eval", None)):
        model.train() if training else model.eval()


# -- the loops --------------------------------------------------------------------------------------

def _batches(n, order, batch_size, drop_last):
    """Index arrays (or slices, without shuffling) of each batch."""
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if drop_last and stop - start < batch_size:
            return
        yield order[start:stop] if order is not None else slice(start, stop)


class _OneProcess:
    """fit in one process: batches and gradients as they are."""

    def seed(self, seed):
        return seed

    def verbose(self, verbose):
        return verbose

    def shard(self, idx):
        return idx

    def before_step(self, grad_fn, args, size):
        return False

    def reduce(self, loss, grads, size, communicates):
        return loss, grads


_ONE_PROCESS = _OneProcess()


class _DataParallelWorld:
    """fit across the ranks of avalon.distributed: rank 0's model and seed, a
    shard of each batch per rank, the global batch's loss and gradients."""

    def __init__(self, model, batch_size, seed):
        from avalon import distributed
        self.dist = distributed
        distributed.init()
        self.rank, self.size = distributed.rank(), distributed.world_size()
        if batch_size < self.size:
            raise ValueError(f"fit: batch_size={batch_size} is the global batch, split among {self.size} ranks: "
                             f"it must be at least {self.size}")
        distributed.broadcast(model, src=0)
        from avalon.distributed.data_parallel import EqualShardCheck
        self.shards = EqualShardCheck()

    def seed(self, seed):
        if seed is None:  # one order for every rank: rank 0's
            seed = self.dist.broadcast_object(int(np.random.SeedSequence().entropy) if self.rank == 0 else None)
        return seed

    def verbose(self, verbose):
        return verbose if self.rank == 0 else 0

    def shard(self, idx):
        if isinstance(idx, slice):
            idx = np.arange(idx.start, idx.stop)
        if len(idx) < self.size:
            raise ValueError(f"fit: a batch of {len(idx)} examples cannot be split among {self.size} ranks; "
                             "pass drop_last=True to drop a small last batch")
        return np.array_split(idx, self.size)[self.rank]

    def before_step(self, grad_fn, args, size):
        """Whether the step all-reduces inside; if so, the shards are checked equal first."""
        return self.shards.before_step(grad_fn, args, size)

    def reduce(self, loss, grads, size, communicates):
        return self.dist.average_gradients(loss, grads, size, equal_shards=communicates)


def _take(A, idx, dev):
    return avalon.to_device(A[idx], dev)


def _train_epoch(steps, model, X, Y, batches, loss_fn, opt, dev, callbacks, bar, world=_ONE_PROCESS) -> float:
    """One pass over the batches; returns the mean loss (batch losses weighted by batch size)."""
    total, count = 0.0, 0
    for b, idx in enumerate(batches):
        size = idx.stop - idx.start if isinstance(idx, slice) else len(idx)  # the global batch's
        mine = world.shard(idx)
        xb = _take(X, mine, dev)
        args = (model, xb, _take(Y, mine, dev), loss_fn) if Y is not None else (model, xb, loss_fn)
        communicates = world.before_step(steps.grad, args, xb.shape[0])
        loss, grads = world.reduce(*steps.grad(*args), xb.shape[0], communicates)
        opt.step(model, grads[0])
        value = _to_float(loss)
        total, count = total + value * size, count + size
        bar.update(1)
        bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
        for cb in callbacks:
            if hasattr(cb, "on_batch_end"):
                cb.on_batch_end(b, {"loss": value, "batch_size": size})
    return total / count if count else float("nan")


def _evaluate(steps, model, X, Y, loss_fn, metric_fns, dev, batch_size, prefix="", with_loss=True) -> dict:
    """Loss and metrics over all of X in eval mode, batch by batch."""
    if not with_loss and not metric_fns:
        return {}
    n = X.shape[0]
    total, preds = 0.0, []
    for idx in _batches(n, None, batch_size, False):
        xb = _take(X, idx, dev)
        if Y is None:
            total += _to_float(steps.eval_loss(model, xb, loss_fn)) * xb.shape[0]
            continue
        out = steps.forward(model, xb)
        if with_loss:
            total += _to_float(loss_fn(out, _take(Y, idx, dev))) * xb.shape[0]
        if metric_fns:
            preds.append(_host(out))
    logs = {prefix + "loss": total / n} if with_loss else {}
    if metric_fns:
        y_pred, y_true = np.concatenate(preds), _host(Y)
        for name, fn in metric_fns:
            logs[prefix + name] = _scalar(name, fn(y_pred, y_true))
    return logs


def _scalar(name, value) -> float:
    if np.ndim(value) != 0:
        raise ValueError(f"fit: metric {name!r} returned an array of shape {np.shape(value)}; fit records one "
                         "number per metric and epoch")
    return float(value)


def _host(x) -> np.ndarray:
    return np.asarray(backend_of(x).to_host(x)) if tree.is_array(x) else np.asarray(x)


def _to_float(x) -> float:
    return float(_host(x))


def _stop_requested(callbacks, epoch, logs) -> bool:
    stop = False
    for cb in callbacks:
        if hasattr(cb, "on_epoch_end") and cb.on_epoch_end(epoch, dict(logs)) is True:
            stop = True  # every callback still sees the epoch
    return stop


# -- reporting ----------------------------------------------------------------------------------------

class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        pass

    def set_postfix(self, *args, **kw):
        pass


def _progress(verbose, epoch, epochs, n, batch_size, drop_last):
    if verbose != 1:
        return _NoBar()
    from tqdm.auto import tqdm
    total = n // batch_size if drop_last else -(-n // batch_size)
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", file=sys.stderr,
                dynamic_ncols=True, leave=True)


def _report(verbose, epoch, epochs, logs):
    if verbose == 2:
        values = "  ".join(f"{k}={v:.4f}" for k, v in logs.items())
        print(f"epoch {epoch + 1}/{epochs}  {values}", file=sys.stderr, flush=True)
