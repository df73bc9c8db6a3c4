"""One trainer per framework, all with the same small interface, so the
measuring code treats them alike:

    trainer.step(batch) -> float        one training step (batch: tuple of host arrays), its loss
    trainer.predictor(x) -> callable    a no-argument call predicting x, in eval mode
    trainer.evaluate(x, y) -> float     the workload's test metric
    trainer.train()                     back to training mode

AvalonTrainer: the zoo loss's gradient (for the model only) and an
avalon.optim optimizer's update compiled as one call (avalon.optim.train_step,
what JAX users write as a jitted training step); predictions by avalon.jit of
the forward.
TorchTrainer: the torch twin, eager or through torch.compile.
"""
from __future__ import annotations

import warnings

import numpy as np

from .workloads import Workload

EVAL_CHUNK = 500     # test examples per evaluation call (divides the test sets)


def _forward(model, x):
    return model(x)


class AvalonTrainer:
    key = "avalon"
    label = "Avalon"

    def __init__(self, workload: Workload, torch_model=None, device: str = "cpu"):
        import avalon
        self.avalon = avalon
        self.workload = workload
        self.model = workload.avalon_model(torch_model)
        self.device = avalon.device(device)
        self.on_host = device == "cpu"
        if not self.on_host:
            self.model.to(self.device)
        self.loss_fn = workload.avalon_loss()
        self.opt = workload.avalon_optimizer()
        with warnings.catch_warnings():     # experimental (its API may change): the bench knows
            warnings.simplefilter("ignore", avalon.ExperimentalWarning)
            self.train_step = avalon.optim.train_step(self.loss_fn, self.opt)
        self.first_step_builds = None       # C compiler runs in the first step, once it ran
        self.first_step_remembered = None   # whether it compiled the schedule an earlier run chose
        self.forward = avalon.jit(_forward)
        self.eval_loss = avalon.jit(self.loss_fn)

    def _put(self, arrays):
        return arrays if self.on_host else self.avalon.to_device(arrays, self.device)

    def _host(self, out):
        if self.on_host:
            return out
        from avalon.backends import backend_of
        return self.avalon.tree.tree_map(lambda a: backend_of(a).to_host(a), out)

    def step(self, batch) -> float:
        if self.first_step_builds is None:
            return self._first_step(batch)
        return float(self.train_step(self.model, *self._put(batch)))

    def _first_step(self, batch) -> float:
        """The first step, counting the C compiler's runs in it: none means every
        kernel it compiled came from the disk cache (a warm compile)."""
        from avalon.runtime import native
        before = native.compiler_runs()
        self.first_step_builds = 0
        loss = self.step(batch)
        self.first_step_builds = native.compiler_runs() - before
        self.first_step_remembered = self.schedule_remembered()
        return loss

    def predictor(self, x):
        self.model.eval()
        x = self._put(x)
        return lambda: self._host(self.forward(self.model, x))

    def evaluate(self, x, y=None) -> float:
        self.model.eval()
        values = []
        for start in range(0, len(x), EVAL_CHUNK):
            xb = self._put(x[start:start + EVAL_CHUNK])
            if y is None:
                values.append(float(self.eval_loss(self.model, xb)))
            else:
                logp = self._host(self.forward(self.model, xb))
                values.append(float(np.mean(np.argmax(logp, axis=1) == y[start:start + EVAL_CHUNK])))
        self.train()
        return float(np.mean(values))

    def train(self):
        self.model.train()

    def profile(self, batch):
        """avalon.profile of the gradient call on one batch (the training step without its
        optimizer update, whose kernels only add their passes over the parameters)."""
        step = self.avalon.value_and_grad(self.loss_fn, argnums=0)
        return self.avalon.profile(step, self.model, *self._put(batch))

    def step_breakdown(self, batch, repeats: int = 30) -> dict:
        """Median seconds of a whole training step and of its gradient call alone
        (to set against the profile's kernel time); `fused`: whether the step ran
        gradient and update as one compiled call."""
        import statistics
        import time
        args = self._put(batch)
        grad = self.avalon.value_and_grad(self.loss_fn, argnums=0)

        def timed(call):
            t0 = time.perf_counter()
            call(self.model, *args)
            return time.perf_counter() - t0
        # the steps first, the gradient calls after: a gradient function timing its own
        # schedules would hold the autotuner's turn while the step still times its own
        step_s = [timed(self.train_step) for _ in range(repeats)]
        schedule, timings, fused = self.step_schedule(), self.step_timings(), bool(self.train_step.last_fused)
        grad_s = [timed(grad) for _ in range(repeats)]
        return {"schedule": schedule, "timings": timings, "step_s": statistics.median(step_s),
                "gradient_s": statistics.median(grad_s), "fused": fused, "calls": repeats,
                "remembered": self.schedule_remembered()}

    def _step_compiled(self):
        """The compiled function the training step ran last: gradient and update as one,
        or the gradient call alone (when the update ran on its own)."""
        if self.train_step.last_fused:
            return self.train_step.function._last().compiled
        return self.avalon.value_and_grad(self.loss_fn, argnums=0)._last().compiled

    def step_schedule(self) -> str:
        """The schedule the compiled training step runs (what its calls timed fastest)."""
        return getattr(self._step_compiled(), "label", "one thread (the only schedule compiled)")

    def schedule_remembered(self) -> bool:
        """Whether the step runs the schedule an earlier process chose (the tuning
        cache, avalon.runtime.tuning_memo) rather than one its own calls timed."""
        return bool(getattr(self._step_compiled(), "remembered", False))

    def step_timings(self) -> dict:
        """{schedule: median seconds of an iteration} the training step's first calls
        timed its schedules at ({} with a single schedule)."""
        return dict(getattr(self._step_compiled(), "timings", {}))

    def forward_schedule(self) -> str:
        """The schedule the last prediction's compiled forward runs (what its first calls timed fastest)."""
        compiled = self.forward._last().compiled
        return getattr(compiled, "label", "one thread (the only schedule compiled)")

    def profile_predict(self, x):
        """avalon.profile of the compiled forward (eval mode) on x."""
        self.model.eval()
        try:
            return self.avalon.profile(self.forward, self.model, self._put(x))
        finally:
            self.train()


class TorchTrainer:
    key = "torch_eager"
    label = "PyTorch eager"

    def __init__(self, workload: Workload, torch_model, device: str = "cpu", compiled: bool = False):
        import torch
        self.torch = torch
        self.device = torch.device(device)
        self.model = torch_model.to(self.device)
        self.loss_fn = workload.torch_loss()
        self.opt = workload.torch_optimizer(self.model.parameters())
        if compiled:
            self.key, self.label = "torch_compile", "torch.compile"
            _cold_compiles()
            # The whole loss (model and loss function) is compiled, forward and backward;
            # the prediction compiles the model.  The optimizer step stays eager.
            self.train_loss = torch.compile(self.loss_fn)
            self.forward = torch.compile(self.model)
        else:
            self.train_loss, self.forward = self.loss_fn, self.model

    def _put(self, arrays):
        return tuple(self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays)

    def step(self, batch) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.train_loss(self.model, *self._put(batch))
        loss.backward()
        self.opt.step()
        return loss.item()

    def predictor(self, x):
        self.model.eval()
        (x,) = self._put((x,))
        torch = self.torch
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def call():
            with torch.no_grad():
                out = self.forward(x)
            sync()
            return out
        return call

    def evaluate(self, x, y=None) -> float:
        """With the eager model (for torch.compile too: same weights, no extra compilation)."""
        torch = self.torch
        self.model.eval()
        values = []
        with torch.no_grad():
            for start in range(0, len(x), EVAL_CHUNK):
                (xb,) = self._put((x[start:start + EVAL_CHUNK],))
                if y is None:
                    values.append(float(self.loss_fn(self.model, xb)))
                else:
                    pred = self.model(xb).argmax(dim=1).cpu().numpy()
                    values.append(float(np.mean(pred == y[start:start + EVAL_CHUNK])))
        self.train()
        return float(np.mean(values))

    def train(self):
        self.model.train()


def _cold_compiles():
    """Make torch.compile compile from scratch, as Avalon does: Inductor otherwise
    reuses what an earlier process left in its on-disk caches, and its first-call
    time would depend on what ran before."""
    try:
        import torch._inductor.config as inductor_config
        inductor_config.force_disable_caches = True
    except (ImportError, AttributeError):
        pass


def make_trainer(key: str, workload: Workload, torch_model, device: str = "cpu"):
    """key: "avalon", "torch_eager" or "torch_compile"."""
    if key == "avalon":
        return AvalonTrainer(workload, torch_model, device)
    if key in ("torch_eager", "torch_compile"):
        return TorchTrainer(workload, torch_model, device, compiled=key == "torch_compile")
    raise ValueError(f"unknown framework {key!r}")
