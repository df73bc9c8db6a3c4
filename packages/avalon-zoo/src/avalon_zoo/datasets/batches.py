"""Batches: mini-batches of in-memory arrays, reshuffled every epoch, reproducibly.

    train = Batches(images, labels, batch_size=64, seed=0)
    for epoch in range(5):
        for x, y in train:          # each pass over `train` is the next epoch
            ...

Epoch e's order is a permutation drawn from a generator seeded by (seed, e) alone,
so two Batches with the same seed yield the same batches, and `order(e)` hands the
exact permutation to another framework (batch i holds order(e)[i*bs:(i+1)*bs]).

Data-parallel training (avalon.distributed, as torch's DistributedSampler): with
num_replicas ranks, rank r gets its shard of every global batch,
np.array_split(batch, num_replicas)[r].  The global batches are the same for any
world size, the shards of an epoch are disjoint and cover it, and the per-epoch
seed is shared: a seed drawn when seed=None is rank 0's, broadcast to the others.
"""
from __future__ import annotations

import math
import operator

import numpy as np

import avalon
from avalon.errors import ShapeError


class Batches:
    """Iterable over epochs of mini-batches of `x` (and `y`, paired with it along axis 0).

    batch_size: examples per batch; the last batch is smaller unless drop_last drops it.
    shuffle:    a fresh permutation every epoch; otherwise the arrays' own order.
    seed:       base seed of the per-epoch permutations; None draws one (kept in .seed).
    normalize:  None, a callable applied to each x batch, or (mean, std) for (x - mean) / std
                (scalars or arrays broadcasting against a batch, e.g. per-channel (C, 1, 1)).
    device:     where batches go (avalon.to_device); None keeps them as they are.
    num_replicas, rank: the data-parallel world and this process's place in it;
                None takes them from avalon.distributed (one process when it is not
                initialized).  Each batch yielded is this rank's shard of the global batch.

    Yields (x_batch, y_batch), or x_batch alone when y is None.  `epoch` is the number
    of the epoch the next iter() runs; set it to resume.
    """

    def __init__(self, x, y=None, batch_size: int = 64, shuffle: bool = True, seed=None,
                 drop_last: bool = False, normalize=None, device=None, num_replicas=None, rank=None):
        if y is not None and len(y) != len(x):
            raise ShapeError(f"Batches: x holds {len(x)} examples (shape {np.shape(x)}) but y holds {len(y)} "
                             f"(shape {np.shape(y)}); they must match along axis 0")
        self.x, self.y = x, y
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.num_replicas, self.rank = _replicas(num_replicas, rank)
        self.seed = _seed(seed) if seed is not None or self.num_replicas == 1 else _shared_seed()
        self.epoch = 0
        self._normalize = _normalizer(normalize, x)
        self.device = None if device is None else avalon.device(device)
        self._check_shards()

    def _check_shards(self):
        """Every global batch must give each rank at least one example."""
        n, w = len(self.x), self.num_replicas
        smallest = self.batch_size if self.drop_last or n % self.batch_size == 0 else n % self.batch_size
        if len(self) and min(smallest, n) < w:
            raise ValueError(f"Batches: a batch of {min(smallest, n)} examples cannot be split among "
                             f"{w} ranks (one example each at least); use a batch_size of {w} or more, "
                             "or drop_last=True to drop a small last batch")

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of example indices epoch `epoch` visits, as int64 (N,)."""
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"Batches.order: epoch must be >= 0, got {epoch}")
        if not self.shuffle:
            return np.arange(len(self.x), dtype=np.int64)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(epoch,)))
        return rng.permutation(len(self.x)).astype(np.int64, copy=False)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        return self.batches(epoch)

    def batches(self, epoch: int):
        """The batches of epoch `epoch`, without advancing `.epoch`."""
        order = self.order(epoch)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield self._batch(self.shard(order[start:start + self.batch_size]))

    def shard(self, indices):
        """This rank's part of a global batch's indices (all of them for one process)."""
        if self.num_replicas == 1:
            return indices
        return np.array_split(indices, self.num_replicas)[self.rank]

    def _batch(self, indices):
        xb = self.x[indices]
        if self._normalize is not None:
            xb = self._normalize(xb)
        batch = xb if self.y is None else (xb, self.y[indices])
        return batch if self.device is None else avalon.to_device(batch, self.device)

    def __repr__(self) -> str:
        return (f"Batches({len(self.x)} examples, batch_size={self.batch_size}, {len(self)} batches, "
                f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, epoch={self.epoch}"
                + (f", rank {self.rank} of {self.num_replicas}" if self.num_replicas > 1 else "") + ")")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or operator.index(value) < 1:
        raise ValueError(f"Batches: {name} must be a positive integer, got {value!r}")
    return operator.index(value)


def _replicas(num_replicas, rank):
    """(num_replicas, rank), from avalon.distributed where not given."""
    from avalon import distributed
    if num_replicas is None:
        num_replicas = distributed.world_size() if distributed.is_initialized() else 1
    if rank is None:
        rank = distributed.rank() if distributed.is_initialized() and num_replicas > 1 else 0
    num_replicas = _positive_int(num_replicas, "num_replicas")
    rank = operator.index(rank)
    if not 0 <= rank < num_replicas:
        raise ValueError(f"Batches: rank must be in 0..{num_replicas - 1} for num_replicas={num_replicas}, "
                         f"got {rank}")
    return num_replicas, rank


def _shared_seed() -> int:
    """A fresh seed drawn on rank 0 and sent to every rank: all shard one order."""
    from avalon import distributed
    return distributed.broadcast_object(_seed(None) if distributed.rank() == 0 else None, 0)


def _seed(seed) -> int:
    if seed is None:
        return int(np.random.SeedSequence().entropy)
    seed = operator.index(seed)
    if seed < 0:
        raise ValueError(f"Batches: seed must be >= 0, got {seed}")
    return seed


def _normalizer(normalize, x):
    if normalize is None or callable(normalize):
        return normalize
    try:
        mean, std = normalize
    except (TypeError, ValueError):
        raise TypeError(f"Batches: normalize must be None, a callable or (mean, std), got {normalize!r}") from None
    # Integer data (raw pixels) is standardized in float32, float data in its own dtype.
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)
    mean, std = np.asarray(mean, dtype), np.asarray(std, dtype)
    if np.any(std == 0):
        raise ValueError("Batches: normalize std must be nonzero")
    return lambda xb: (xb.astype(dtype, copy=False) - mean) / std
