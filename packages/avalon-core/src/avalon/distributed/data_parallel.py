"""Data-parallel training with PyTorch DistributedDataParallel's semantics.

    step = avalon.distributed.DataParallel(loss_fn)      # or DataParallel(avalon.value_and_grad(loss_fn))
    for xb, yb in batches:                               # each rank: its shard of the global batch
        loss, (g, _, _) = step(model, xb, yb)            # loss and g: the global batch's
        opt.step(model, g)

* The first call with a model broadcasts its arrays (parameters and buffers)
  from rank 0, so every rank starts from the same model.
* Each step's gradients are averaged across the ranks before they are
  returned: they are packed into ONE flat buffer per dtype, with the loss and
  the rank's example count appended, and that buffer goes through one
  all-reduce.  One message per step, not one per parameter: per-message
  latency dominates small parameters, and one buffer is what flat.py's
  optimizer update reads anyway.  (Buckets, as DDP uses to overlap the
  all-reduce with the backward pass, would not overlap anything here: the
  compiled gradient returns all gradients at once.)
* Weighted mean: each rank's loss and gradients count with its number of
  examples (the leading size of the argument `batch_arg`), so the result is the
  loss and gradient of the global batch even when the shards differ in size
  (a ragged last batch).  With equal shards this is DDP's plain average.
  The loss must be a mean over the batch.
"""
from __future__ import annotations

import weakref

import numpy as np

from .. import tree
from ..api import GradFunction, value_and_grad
from ..backends import backend_of
from . import _world
from ..primitive import PRIMITIVES
from .backends import DistributedError
from .collectives import broadcast, pack, unpack


class DataParallel:
    """A compiled gradient function whose gradients and loss are the global
    batch's, averaged across the ranks (see the module docstring).

    f: a loss function (compiled with avalon.value_and_grad(f, argnums)) or a
    GradFunction.  batch_arg: the positional argument whose leading dimension
    counts this rank's examples (None: every rank counts one, DDP's average)."""

    def __init__(self, f, argnums=0, batch_arg=1, broadcast_parameters=True):
        self.grad_fn = f if isinstance(f, GradFunction) else value_and_grad(f, argnums)
        self.batch_arg = batch_arg
        self.broadcast_parameters = broadcast_parameters
        self._synced: "weakref.WeakSet" = weakref.WeakSet()
        self._shards = EqualShardCheck()
        self.__wrapped__ = self.grad_fn

    def __call__(self, *args):
        if self.broadcast_parameters:
            self._sync(args[0])
        examples = self._examples(args)
        communicates = self._shards.before_step(self.grad_fn, args, examples)
        loss, grads = self.grad_fn(*args)
        return average_gradients(loss, grads, examples, equal_shards=communicates)

    def _sync(self, model):
        """Broadcast the model from rank 0 the first time it is seen."""
        try:
            if model in self._synced:
                return
            self._synced.add(model)
        except TypeError:  # not weak-referenceable: broadcast every call (correct, slower)
            pass
        broadcast(model, src=0)

    def _examples(self, args) -> int:
        if self.batch_arg is None or self.batch_arg >= len(args):
            return 1
        leaves, _ = tree.flatten(args[self.batch_arg])
        return int(leaves[0].shape[0]) if leaves and leaves[0].ndim else 1

    # what the compiled function shows, for reading
    def __getattr__(self, name):
        grad_fn = self.__dict__.get("grad_fn")
        if grad_fn is None:
            raise AttributeError(name)
        return getattr(grad_fn, name)


class EqualShardCheck:
    """Refuses unequal shards BEFORE a step that all-reduces inside
    (SyncBatchNorm), so the refused step changes nothing (running statistics
    included).  Whether a step communicates is read from its compiled graph
    (compiled first if need be, as the call would), once per signature; only
    such steps pay the check (one small all-gather of the ranks' counts)."""

    def __init__(self):
        self._known: dict = {}  # id(compiled signature) -> (signature, communicates)

    def before_step(self, grad_fn, args, examples) -> bool:
        entry, _ = grad_fn._lookup(args)
        known = self._known.get(id(entry))
        if known is None or known[0] is not entry:
            known = self._known[id(entry)] = (entry, holds_collectives(grad_fn))
        if known[1]:
            check_equal_shards(examples)
        return known[1]


def check_equal_shards(examples):
    """Raise DistributedError on every rank unless all ranks have `examples` examples."""
    h = _world.host()
    if h.size == 1:
        return
    counts = [int(c[0]) for c in h.all_gather(np.array([examples], np.int64))]
    if len(set(counts)) > 1:
        raise DistributedError(f"the ranks have {counts} examples (rank {h.rank}: {examples}): a step that "
                               "all-reduces inside (SyncBatchNorm) needs equal shards on every rank; make the "
                               "global batch a multiple of the world size (drop_last=True drops a small last "
                               "batch)")


def holds_collectives(grad_fn) -> bool:
    """Whether the last compiled signature of grad_fn communicates inside (SyncBatchNorm)."""
    return any(getattr(PRIMITIVES.get(n.op), "collective", False) for n in grad_fn.graph.nodes)


def average_gradients(loss, grads, examples=1, equal_shards=False):
    """(loss, grads) of this rank -> the global batch's (loss, grads): every
    rank's values weighted by its `examples` and averaged, in one all-reduce
    (gradients, loss and count in one buffer: gradients must share the loss's
    dtype).  A wrapper around avalon.grad's result:

        loss, grads = avalon.distributed.average_gradients(*avalon.grad(f, model, xb, yb), len(xb))

    equal_shards=True: the step all-reduced values inside (SyncBatchNorm): its
    backward summed the ranks' unweighted cotangents, so the weighted mean is
    exact only when every rank has as many examples; otherwise every rank
    raises DistributedError (each sees the total differ from its count times
    the world size) instead of returning wrong gradients.  DataParallel and fit
    check the counts before such a step too, so a refused step changes nothing.
    """
    h = _world.host()
    if h.size == 1:
        return loss, grads
    leaves, treedef = tree.flatten(grads)
    loss_arr = backend_of(loss).xp.asarray(loss) if tree.is_array(loss) else np.asarray(loss, np.float32)
    groups = _dtype_groups(leaves, loss_arr)
    out = list(leaves)
    (idx,) = groups.values()
    arrays = [leaves[k] for k in idx]
    # [grads..., loss, 1] * examples, summed over the ranks: [sum n g, sum n loss, N]
    buf = pack(arrays + [loss_arr.reshape(1), _full_like(loss_arr, 1.0)])
    buf *= examples
    _world.backend_for_arrays([buf]).all_reduce_(buf, "sum")
    total = buf[-1:].copy()
    if equal_shards and float(total[0]) != examples * h.size:
        raise DistributedError(f"rank {h.rank} has {examples} examples but the ranks have {float(total[0]):g} "
                               "in all: a step that all-reduces inside (SyncBatchNorm) needs equal shards on every "
                               "rank; make the global batch a multiple of the world size (drop_last=True drops a "
                               "small last batch)")
    buf /= total
    total_loss = buf[-2].reshape(loss_arr.shape)
    for k, view in zip(idx, unpack(buf[:-2], arrays)):
        out[k] = view
    return total_loss, tree.unflatten(treedef, out)


def _full_like(a, value):
    xp = backend_of(a).xp if tree.is_array(a) else np
    return xp.full((1,), value, dtype=a.dtype)


def _dtype_groups(leaves, loss_arr):
    """Gradient leaves by (type, dtype): one group, the loss's (the loss and the
    example count ride in its buffer).  Gradients of another dtype or device
    are refused rather than averaged with the wrong weights."""
    groups: dict = {(type(loss_arr), np.dtype(loss_arr.dtype)): []}
    for k, x in enumerate(leaves):
        groups.setdefault((type(x), np.dtype(x.dtype)), []).append(k)
    if len(groups) > 1:
        other = [f"{d.name}" for (_, d) in list(groups)[1:]]
        raise DistributedError(f"average_gradients: the loss is {loss_arr.dtype.name} but gradients are also "
                               f"{', '.join(other)}; keep the model and the loss in one dtype (cast the loss "
                               "to the parameters' dtype)")
    return groups
