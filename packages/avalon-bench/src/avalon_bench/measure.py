"""Timing: epochs of several trainers interleaved, the first-call overhead,
and prediction latencies, all as medians of repeated, interleaved calls
(the machine is shared and noisy: the frameworks see the same conditions).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

from .progressbar import epoch_bar


@dataclass
class EpochLog:
    seconds: float                                      # the whole epoch, batch slicing included
    step_seconds: list = field(default_factory=list)    # each training step alone
    losses: list = field(default_factory=list)
    step_ends: list = field(default_factory=list)       # seconds since the epoch began, after each step

    def to_dict(self) -> dict:
        return asdict(self)


def run_epoch(trainer, batches, epoch: int, max_batches: int | None = None, epochs: int | None = None) -> EpochLog:
    """One epoch of `trainer` over batches.batches(epoch) (at most max_batches),
    with a progress bar on a terminal (`epochs`: the total, for its label)."""
    log = EpochLog(0.0)
    clock = time.perf_counter
    total = len(batches) if max_batches is None else min(len(batches), max_batches)
    label = f"{trainer.label} epoch {epoch + 1}" + (f"/{epochs}" if epochs else "")
    with epoch_bar(total, label) as bar:
        start = clock()
        for i, batch in enumerate(batches.batches(epoch)):
            if max_batches is not None and i >= max_batches:
                break
            t0 = clock()
            loss = trainer.step(batch if isinstance(batch, tuple) else (batch,))
            t1 = clock()
            log.step_seconds.append(t1 - t0)
            log.losses.append(loss)
            log.step_ends.append(t1 - start)
            bar.update(1)
        log.seconds = clock() - start
    return log


@dataclass
class TrainRecord:
    """Everything measured while one framework trained."""
    epochs: list = field(default_factory=list)          # EpochLog per epoch
    failed: str | None = None                            # why it stopped, if it did

    @property
    def first_step_s(self) -> float:
        return self.epochs[0].step_seconds[0]

    @property
    def median_step_s(self) -> float:
        steps = [s for e in self.epochs for s in e.step_seconds][1:]
        return statistics.median(steps) if steps else self.first_step_s

    @property
    def compile_s(self) -> float:
        """The first call's overhead: first step minus a normal (median) step."""
        return max(0.0, self.first_step_s - self.median_step_s)

    @property
    def epoch_seconds(self) -> list:
        return [e.seconds for e in self.epochs]

    @property
    def steady_epoch_seconds(self) -> list:
        """Epoch times with the first call's overhead taken out of the first epoch."""
        times = self.epoch_seconds
        return [times[0] - self.compile_s] + times[1:] if times else []

    @property
    def time_per_epoch_s(self) -> float:
        return statistics.median(self.steady_epoch_seconds)

    @property
    def total_s(self) -> float:
        """All epochs, compilation included."""
        return sum(self.epoch_seconds)

    @property
    def epoch_mean_losses(self) -> list:
        return [statistics.fmean(e.losses) for e in self.epochs]

    @property
    def final_loss(self) -> float:
        """Mean training loss over the last epoch."""
        return self.epoch_mean_losses[-1]

    def curve(self):
        """(seconds of this framework's own training so far, loss) after every step."""
        times, losses, offset = [], [], 0.0
        for e in self.epochs:
            times.extend(offset + t for t in e.step_ends)
            losses.extend(e.losses)
            offset += e.seconds
        return times, losses

    def summary(self) -> dict:
        if not self.epochs:
            return {"failed": self.failed}
        return {
            "first_step_s": self.first_step_s,
            "median_step_s": self.median_step_s,
            "compile_s": self.compile_s,
            "epoch_s": self.epoch_seconds,
            "steady_epoch_s": self.steady_epoch_seconds,
            "time_per_epoch_s": self.time_per_epoch_s,
            "total_s": self.total_s,
            "steps_per_epoch": [len(e.losses) for e in self.epochs],
            "epoch_mean_losses": self.epoch_mean_losses,
            "final_loss": self.final_loss,
            "failed": self.failed,
        }


def train_interleaved(trainers, batches, epochs: int, max_batches: int | None = None,
                      progress=print) -> dict:
    """Epoch 1 of every trainer in turn, then epoch 2 of every trainer, ...
    A trainer whose epoch raises (torch.compile that cannot compile) is dropped
    from the rest, with the reason kept.  Returns {trainer.key: TrainRecord}."""
    records = {t.key: TrainRecord() for t in trainers}
    for epoch in range(epochs):
        for trainer in trainers:
            record = records[trainer.key]
            if record.failed:
                continue
            try:
                log = trainer.run_epoch(batches, epoch, max_batches) if hasattr(trainer, "run_epoch") \
                    else run_epoch(trainer, batches, epoch, max_batches, epochs)
            except Exception as exc:  # noqa: BLE001 - any failure of an optional framework is reported
                if not getattr(trainer, "optional", False):
                    raise
                record.failed = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                progress(f"  {trainer.label}: failed in epoch {epoch + 1}: {record.failed}")
                continue
            record.epochs.append(log)
            progress(f"  epoch {epoch + 1}/{epochs} {trainer.label:<32} {log.seconds:8.2f} s  "
                     f"mean loss {statistics.fmean(log.losses):.4f}  ({len(log.losses)} steps)")
    return records


#: latency calls each framework makes in a row before the next takes over: a
#: framework's threads (PyTorch's OpenMP pool, BLAS's) spin for a while after a
#: call and would slow the other's next call if the two alternated call by call
LATENCY_BLOCK = 10
#: seconds of quiet before a framework's block: the other framework's threads
#: (OpenBLAS's spin up to ~0.1 s after a call) go idle first
SETTLE_S = 0.25


def settle() -> None:
    time.sleep(SETTLE_S)


#: untimed calls first: they compile, and cover Avalon's schedule trials (three
#: schedules of one warm-up and five timed calls each)
LATENCY_WARMUP = 20


def latencies(calls: dict, repeats: int, warmup: int = LATENCY_WARMUP, block: int = LATENCY_BLOCK) -> dict:
    """Median seconds per call of each no-argument callable in `calls`, after
    `warmup` untimed calls each (which also compile); the callables take turns
    in blocks of `block` calls (a's block, b's block, ..., then the next round
    in the reverse order), each after a pause (`settle`).  A callable that raises is reported as its error."""
    results, alive = {}, {}
    for key, call in calls.items():
        try:
            for _ in range(warmup):
                call()
            alive[key] = []
        except Exception as exc:  # noqa: BLE001 - reported in the output
            results[key] = {"failed": f"{type(exc).__name__}: {exc}"}
    clock = time.perf_counter
    keys = list(alive)
    for r in range(-(-repeats // block)):
        for key in (keys if r % 2 == 0 else keys[::-1]):
            times = alive[key]
            settle()
            for _ in range(min(block, repeats - len(times))):
                t0 = clock()
                calls[key]()
                times.append(clock() - t0)
    for key, times in alive.items():
        results[key] = {"median_s": statistics.median(times), "min_s": min(times), "calls": len(times)}
    return results
