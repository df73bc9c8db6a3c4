"""One trainer per framework, all with the same small interface, so the
measuring code treats them alike:

    trainer.step(batch) -> float        one training step (batch: tuple of host arrays), its loss
    trainer.predictor(x) -> callable    a no-argument call predicting x, in eval mode
    trainer.evaluate(x, y) -> float     the workload's test metric
    trainer.train()                     back to training mode

AvalonTrainer: avalon.grad of the zoo loss (gradients for the model only) and
an avalon.optim optimizer; predictions by avalon.jit of the forward.
TorchTrainer: the torch twin, eager or through torch.compile.
"""
from __future__ import annotations

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
        self.first_step_builds = None       # C compiler runs in the first step, once it ran
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
        loss, grads = self.avalon.grad(self.loss_fn, self.model, *self._put(batch), argnums=0)
        self.opt.step(self.model, grads[0])
        return float(loss)

    def _first_step(self, batch) -> float:
        """The first step, counting the C compiler's runs in it: none means every
        kernel it compiled came from the disk cache (a warm compile)."""
        from avalon.runtime import native
        before = native.compiler_runs()
        self.first_step_builds = 0
        loss = self.step(batch)
        self.first_step_builds = native.compiler_runs() - before
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
        """avalon.profile of the gradient step on one batch (the optimizer update is a second,
        small compiled function, not included)."""
        step = self.avalon.value_and_grad(self.loss_fn, argnums=0)
        return self.avalon.profile(step, self.model, *self._put(batch))

    def step_breakdown(self, batch, repeats: int = 30) -> dict:
        """Median seconds of the two halves of a training step: the compiled gradient
        call and the optimizer update (to set against the profile's kernel time)."""
        import statistics
        import time
        args = self._put(batch)
        grad_s, update_s = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _, grads = self.avalon.grad(self.loss_fn, self.model, *args, argnums=0)
            t1 = time.perf_counter()
            self.opt.step(self.model, grads[0])
            t2 = time.perf_counter()
            grad_s.append(t1 - t0)
            update_s.append(t2 - t1)
        return {"schedule": self.step_schedule(), "timings": self.step_timings(),
                "gradient_s": statistics.median(grad_s), "optimizer_s": statistics.median(update_s),
                "calls": repeats}

    def step_schedule(self) -> str:
        """The schedule the compiled gradient step runs (what its calls timed fastest)."""
        compiled = self.avalon.value_and_grad(self.loss_fn, argnums=0)._last().compiled
        return getattr(compiled, "label", "one thread (the only schedule compiled)")

    def step_timings(self) -> dict:
        """{schedule: median seconds of an iteration} the gradient step's first calls
        timed its schedules at ({} with a single schedule)."""
        compiled = self.avalon.value_and_grad(self.loss_fn, argnums=0)._last().compiled
        return dict(getattr(compiled, "timings", {}))

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
