"""Training steps of models the CNN and VAE benchmarks never saw: the zoo's
ResNet and LSTM classifier against their PyTorch twins, from the same weights
on the same batches.  The code generator's rules must hold for any model, so
these rows carry the same kind of goal as the benchmarks (a ratio of step
times), without tuning for them.

The two frameworks run interleaved in blocks of a few steps (BLOCK_STEPS,
their order alternating), on the same batches; the first steps are warm-up
(Avalon compiles and times its schedules there), and the figure is the median
of the timed steps: time per training step, gradient and optimizer update
together.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

from avalon_zoo.datasets import Batches

from .data import BenchData
from .measure import settle
from .progressbar import epoch_bar
from .report import schedule_timings_text
from .workloads import BATCH_SEED, WEIGHT_SEED


@dataclass(frozen=True)
class StepWorkload:
    """A model trained by steps: the interface AvalonTrainer and TorchTrainer use."""
    name: str
    title: str
    batch_size: int
    optimizer: str
    lr: float
    step_goal: float        # target: Avalon's time per step / PyTorch eager's
    make_torch: Callable    # () -> the PyTorch twin
    make_avalon: Callable   # () -> the zoo model

    def torch_model(self):
        import torch
        torch.manual_seed(WEIGHT_SEED)
        return self.make_torch()

    def avalon_model(self, torch_model=None):
        model = self.make_avalon()
        if torch_model is not None:
            model.load_state_dict({k: v.detach().cpu().numpy().copy()
                                   for k, v in torch_model.state_dict().items()})
        return model

    def avalon_loss(self):
        return _avalon_cross_entropy

    def torch_loss(self):
        from .twins import torch_cross_entropy_loss
        return torch_cross_entropy_loss

    def avalon_optimizer(self):
        import avalon.optim as optim
        return getattr(optim, self.optimizer)(lr=self.lr)

    def torch_optimizer(self, params):
        import torch
        return getattr(torch.optim, self.optimizer)(params, lr=self.lr)

    def batches(self, data: BenchData) -> Batches:
        return Batches(data.x_train, data.y_train, batch_size=self.batch_size, seed=BATCH_SEED,
                       drop_last=True, normalize=(data.mean, data.std))


def _avalon_cross_entropy(model, x, y):
    import avalon.nn.functional as F
    return F.cross_entropy(model(x), y)


def _torch_resnet():
    from .twins import TorchResNet
    return TorchResNet()


def _avalon_resnet():
    from avalon_zoo.models.resnet import ResNet
    return ResNet()


def _torch_lstm():
    from .twins import TorchSequenceClassifier
    return TorchSequenceClassifier("lstm")


def _avalon_lstm():
    from avalon_zoo.models.rnn import SequenceClassifier
    return SequenceClassifier("lstm")


RESNET = StepWorkload("resnet", "ResNet-14 (3 stages of 2 BasicBlocks, 16/32/64 channels, BatchNorm), "
                      "batch 64, SGD lr 0.01", batch_size=64, optimizer="SGD", lr=0.01, step_goal=1.0,
                      make_torch=_torch_resnet, make_avalon=_avalon_resnet)
LSTM = StepWorkload("lstm", "LSTM classifier (28 rows of 28 pixels, hidden 128, linear 128->10), "
                    "batch 64, Adam lr 1e-3", batch_size=64, optimizer="Adam", lr=1e-3, step_goal=1.0,
                    make_torch=_torch_lstm, make_avalon=_avalon_lstm)
STEP_WORKLOADS = {"resnet": RESNET, "lstm": LSTM}


def selected_steps(which: str) -> list[StepWorkload]:
    if which == "all":
        return list(STEP_WORKLOADS.values())
    return [STEP_WORKLOADS[which]] if which in STEP_WORKLOADS else []


#: steps each framework runs in a row before the other takes over: a framework's
#: threads (PyTorch's OpenMP pool, BLAS's) spin for a while after its step and
#: would slow the other's next step if the two alternated step by step; and the
#: first steps after the other's block are slower (an LSTM's first three steps
#: after a pause: 17 ms against 12), so a block is long enough for its median
#: to be the steady state
BLOCK_STEPS = 10


def measure_steps(trainers: dict, batches: list, warmup: int, desc: str = "steps") -> dict:
    """Run every batch through each trainer, in blocks of BLOCK_STEPS batches
    interleaved between the trainers with alternating order, each block after a
    pause (measure.settle) (a progress bar on a
    terminal); per trainer key: seconds of each step and its loss."""
    seconds = {k: [] for k in trainers}
    losses = {k: [] for k in trainers}
    keys = list(trainers)
    blocks = [batches[i:i + BLOCK_STEPS] for i in range(0, len(batches), BLOCK_STEPS)]
    with epoch_bar(len(batches), desc) as bar:
        for b, block in enumerate(blocks):
            for key in (keys if b % 2 == 0 else keys[::-1]):
                settle()
                for batch in block:
                    t0 = time.perf_counter()
                    loss = trainers[key].step(batch)
                    seconds[key].append(time.perf_counter() - t0)
                    losses[key].append(loss)
            bar.update(len(block))
    return {k: {"first_step_s": seconds[k][0],
                "step_s": statistics.median(seconds[k][warmup:]),
                "steps_timed": len(seconds[k]) - warmup,
                "losses": [float(f"{v:.6g}") for v in losses[k]]} for k in trainers}


def run_step_workload(wl: StepWorkload, data: BenchData, steps: int, warmup: int, device: str,
                      progress) -> dict:
    from .frameworks import AvalonTrainer, TorchTrainer
    progress(f"== {wl.name.upper()} (training steps): {wl.title}")
    torch_model = wl.torch_model()
    trainers = {"avalon": AvalonTrainer(wl, torch_model, device), "torch_eager": TorchTrainer(wl, torch_model, device)}
    batches = []
    for batch in wl.batches(data).batches(0):
        batches.append(batch)
        if len(batches) == warmup + steps:
            break
    figures = measure_steps(trainers, batches, warmup, desc=f"{wl.name} steps (both frameworks)")
    schedule = trainers["avalon"].step_schedule()
    timings = trainers["avalon"].step_timings()
    remembered = trainers["avalon"].schedule_remembered()
    a, t = figures["avalon"], figures["torch_eager"]
    ratio = a["step_s"] / t["step_s"]
    drift = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a["losses"], t["losses"]))
    progress(f"  step: Avalon {a['step_s'] * 1e3:.2f} ms, PyTorch eager {t['step_s'] * 1e3:.2f} ms "
             f"({ratio:.2f}x); largest loss difference {drift:.2e}")
    return {"workload": {"name": wl.name, "title": wl.title, "batch_size": wl.batch_size,
                         "optimizer": wl.optimizer, "lr": wl.lr},
            "warmup_steps": warmup, "frameworks": figures, "ratio": ratio, "goal": wl.step_goal,
            "met": bool(ratio <= wl.step_goal), "max_relative_loss_difference": drift,
            "losses_agree": bool(drift < 1e-2), "avalon_schedule": schedule,
            "avalon_schedule_timings": timings, "avalon_schedule_remembered": remembered}


def markdown(results: dict) -> str:
    if not results:
        return ""
    lines = ["## Training steps of models the benchmarks never saw", "",
             "Median time of one training step (gradient and optimizer update) after "
             f"{next(iter(results.values()))['warmup_steps']} warm-up steps, the two frameworks "
             f"interleaved in blocks of {BLOCK_STEPS} steps, same weights and batches.", "",
             "| model | Avalon | PyTorch eager | Avalon / PyTorch eager | goal | met? | first step (Avalon) "
             "| largest loss difference | Avalon's schedule |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results.values():
        a, t = r["frameworks"]["avalon"], r["frameworks"]["torch_eager"]
        lines.append(f"| {r['workload']['title']} | {a['step_s'] * 1e3:.2f} ms | {t['step_s'] * 1e3:.2f} ms | "
                     f"{r['ratio']:.2f}x | <= {r['goal']:.2f}x | {'yes' if r['met'] else 'no'} | "
                     f"{a['first_step_s']:.2f} s | {r['max_relative_loss_difference']:.1e} | "
                     f"{r.get('avalon_schedule', '—')} |")
    timed = [(r["workload"]["name"], r.get("avalon_schedule_timings")) for r in results.values()]
    if any(t for _, t in timed):
        lines += ["", "What Avalon's autotuner timed each schedule at (median iteration, the choice made on it; "
                  "\"kept\": timed by an earlier run, whose choice the tuning cache held):", ""]
        kept = {r["workload"]["name"]: r.get("avalon_schedule_remembered") for r in results.values()}
        lines += [f"- {name}{' (kept)' if kept.get(name) else ''}: {schedule_timings_text(t)}"
                  for name, t in timed if t]
    return "\n".join(lines) + "\n"
