"""The multi-process side of test_distributed.py: run under
`mpirun -n 2 python distributed_job.py OUT SCENARIO...`; each rank writes what
it computed to OUT/<scenario>.rank<r>.npz, which the test compares with one
process training on the same global batches (distributed_reference below).

Scenarios: train_mlp, train_cnn, sync_bn, shards, fit, checkpoint; and the
faults: raise_on_rank1, kill_rank1, rank1_stalls.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

import avalon
import avalon.distributed as dist
import avalon.nn as nn
import avalon.nn.functional as F
from avalon_zoo.datasets import Batches
from avalon_zoo.models.cnn import BenchCNN

GLOBAL_BATCH, STEPS = 8, 3


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class BNNet(nn.Module):
    """conv -> BatchNorm (or SyncBatchNorm) -> relu -> linear."""

    def __init__(self, norm):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(2, 4, 3), norm(4), nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.reshape(x.shape[0], 4 * 4 * 4))


def data(kind):
    rng = np.random.default_rng(1)
    n = GLOBAL_BATCH * STEPS
    x = rng.standard_normal((n, 12) if kind == "mlp" else (n, 1, 28, 28) if kind == "cnn" else (n, 2, 6, 6))
    return x.astype(np.float32), rng.integers(0, 3, n)


def model(kind, seed):
    avalon.manual_seed(seed)
    return {"mlp": MLP, "cnn": BenchCNN}[kind]()


def loss_fn(m, x, y):
    return F.cross_entropy(m(x), y)


def train(kind, world_rank=0, world=1):
    """STEPS optimizer steps on the global batches of Batches(seed=5); rank r
    starts from another init (seed r): DataParallel's broadcast must fix it."""
    m = model(kind, seed=world_rank)
    x, y = data(kind)
    opt = avalon.optim.SGD(lr=0.1, momentum=0.9) if kind == "mlp" else avalon.optim.Adam(lr=1e-3)
    step = dist.DataParallel(loss_fn)
    losses = []
    for xb, yb in Batches(x, y, batch_size=GLOBAL_BATCH, seed=5, num_replicas=world, rank=world_rank):
        loss, grads = step(m, xb, yb)
        opt.step(m, grads[0])
        losses.append(float(loss))
    return {"losses": np.array(losses), **{k: np.asarray(v) for k, v in m.state_dict().items()}}


def sync_bn(world_rank=0, world=1):
    """Loss, gradients and running statistics of one step of BNNet on the
    global batch (SyncBatchNorm on shards vs BatchNorm2d on the whole), read
    before a second call with ragged shards, which must be refused."""
    norm = nn.SyncBatchNorm if world > 1 else nn.BatchNorm2d
    avalon.manual_seed(0)
    m = BNNet(norm)
    x, y = data("bn")
    x, y = x[:GLOBAL_BATCH], y[:GLOBAL_BATCH]
    part = np.array_split(np.arange(GLOBAL_BATCH), world)[world_rank]
    step = dist.DataParallel(loss_fn)
    loss, grads = step(m, x[part], y[part])
    loss, grads, running_var = np.array(loss), grads, np.array(m.bn.running_var)
    running_mean = np.array(m.bn.running_mean)
    if world > 1:  # ragged shards (4 and 3 of 7 examples) are refused, not averaged wrongly
        try:
            step(m, x[part][:4 - world_rank], y[part][:4 - world_rank])
        except dist.DistributedError as e:
            unchanged = np.array_equal(m.bn.running_var, running_var) and int(m.bn.num_batches_tracked) == 1
            print(f"rank {world_rank} refused ragged SyncBatchNorm shards (state unchanged: {unchanged}): {e}",
                  flush=True)
    g = {f"grad.{k}": np.asarray(v) for k, v in grads[0].state_dict().items() if v is not None
         and k not in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked")}
    return {"loss": np.asarray(loss), "running_mean": running_mean,
            "running_var": np.array(running_var), **g}


def shards():
    b = Batches(np.arange(50), batch_size=8, seed=None)  # seed None: rank 0's, shared
    return {f"epoch{e}": np.concatenate(list(b.batches(e))) for e in range(2)} | {
        f"order{e}": b.order(e) for e in range(2)}


def fit_mlp(distributed):
    m = model("mlp", seed=dist.rank())
    x, y = data("mlp")
    # batches of 7, 7, 7 and 3 of the 24 examples: the ranks' shards differ (4 and 3, 2 and 1)
    h = avalon.fit(m, x, y, loss_fn=F.cross_entropy, epochs=2, batch_size=7, seed=7,
                   opt=avalon.optim.SGD(lr=0.1), verbose=2, distributed=distributed)
    return {"loss": np.array(h["loss"]), **{k: np.asarray(v) for k, v in m.state_dict().items()}}


def checkpoint(out):
    m = model("mlp", seed=dist.rank())
    path = os.path.join(out, "model.ckpt")
    dist.broadcast(m, 0)
    avalon.save(m, path)
    other = model("mlp", seed=10 + dist.rank())
    avalon.load(path, other)
    try:  # rank 0's error reaches every rank
        avalon.load(os.path.join(out, "missing.ckpt"))
        failure = ""
    except OSError as e:
        failure = type(e).__name__
    return {"failure": np.array(failure), **{k: np.asarray(v) for k, v in other.state_dict().items()}}


def main(out, scenarios):
    dist.init()
    r, w = dist.rank(), dist.world_size()
    for name in scenarios:
        if name == "raise_on_rank1":
            if r == 1:
                raise RuntimeError("deliberate failure on rank 1")
            dist.barrier()  # rank 0 waits here for a rank that is gone
        elif name == "rank1_stalls":
            if r == 1:
                time.sleep(20)  # alive but not in the collective: rank 0's barrier times out
            dist.barrier()
        elif name == "kill_rank1":
            if r == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            dist.barrier()
        else:
            result = {"train_mlp": lambda: train("mlp", r, w), "train_cnn": lambda: train("cnn", r, w),
                      "sync_bn": lambda: sync_bn(r, w), "shards": shards,
                      "fit": lambda: fit_mlp(True), "checkpoint": lambda: checkpoint(out)}[name]()
            np.savez(os.path.join(out, f"{name}.rank{r}.npz"), **result)
    time.sleep(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
