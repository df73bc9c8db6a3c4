"""The benchmark's subprocesses (started by avalon_bench itself).

    python -m avalon_bench.worker memory --which cnn --framework avalon --steps 20
        Peak memory of one framework: a fresh process imports everything, makes a few
        batches of the workload's shape, reads its peak RSS (getrusage ru_maxrss), builds
        the model and optimizer, runs `steps` training steps and a few batch and one-sample
        predictions, and reads the peak RSS again.  Prints one JSON line.

    python -m avalon_bench.worker serve
        A PyTorch eager trainer driven over stdin/stdout (one JSON object per line), so
        that it runs in a process of its own, with its own environment (the tuned glibc
        allocator: MALLOC_* variables act only when set before the process starts), yet
        its epochs interleave with the main process's.  Commands:
            {"cmd": "setup", "which": "cnn", "data": "real", "quick": false, "device": "cpu"}
            {"cmd": "epoch", "epoch": 0, "max_batches": null}    -> an EpochLog
            {"cmd": "quit"}
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys

# Not the original stdout: replies go there, anything libraries print goes to stderr.
_REPLY = None


def set_torch_threads():
    import torch
    torch.set_num_threads(cpu_cores())


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _vm_hwm_mib() -> float | None:
    """The peak RSS of this process image alone (VmHWM), a cross-check of ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def measure_memory(which: str, framework: str, steps: int, device: str = "cpu") -> dict:
    import gc

    import numpy as np

    # Everything either framework needs is imported before the baseline.
    import avalon  # noqa: F401
    import avalon.nn  # noqa: F401
    import avalon.optim  # noqa: F401
    import avalon_zoo.models.cnn  # noqa: F401
    import avalon_zoo.models.vae  # noqa: F401
    import torch  # noqa: F401

    from . import twins  # noqa: F401
    from .frameworks import make_trainer
    from .workloads import WORKLOADS

    set_torch_threads()
    workload = WORKLOADS[which]
    rng = np.random.default_rng(0)
    n = workload.batch_size

    def batch():
        x = rng.random((n, 1, 28, 28), dtype=np.float32)
        if which == "cnn":
            return x, rng.integers(0, 10, n).astype(np.int64)
        return (x.reshape(n, 784),)

    batches = [batch() for _ in range(4)]
    gc.collect()
    baseline, baseline_hwm = _peak_rss_mib(), _vm_hwm_mib()
    # The Avalon side needs no torch model: its own initialization takes the same memory.
    torch_model = workload.torch_model() if framework != "avalon" else None
    trainer = make_trainer(framework, workload, torch_model, device)
    for i in range(steps):
        trainer.step(batches[i % len(batches)])
    for x in (batches[0][0], batches[0][0][:1]):
        predict = trainer.predictor(x)
        for _ in range(3):
            predict()
    peak, peak_hwm = _peak_rss_mib(), _vm_hwm_mib()
    return {"framework": framework, "which": which, "steps": steps, "baseline_mib": baseline,
            "peak_mib": peak, "delta_mib": peak - baseline,
            "vm_hwm_delta_mib": None if peak_hwm is None else peak_hwm - baseline_hwm}


def serve(stdin, reply):
    """The command loop of `serve`."""
    from .data import load
    from .frameworks import TorchTrainer
    from .measure import run_epoch
    from .workloads import WORKLOADS

    trainer = batches = None
    for line in stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "setup":
            set_torch_threads()
            workload = WORKLOADS[msg["which"]]
            data = load(msg["data"], quick=msg["quick"])
            batches = workload.batches(data)
            trainer = TorchTrainer(workload, workload.torch_model(), msg["device"])
            reply({"ok": True, "data": data.kind,
                   "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}})
        elif cmd == "epoch":
            log = run_epoch(trainer, batches, msg["epoch"], msg.get("max_batches"))
            reply(log.to_dict())
        elif cmd == "quit":
            reply({"ok": True})
            return
        else:
            reply({"error": f"unknown command {cmd!r}"})


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m avalon_bench.worker")
    sub = parser.add_subparsers(dest="mode", required=True)
    mem = sub.add_parser("memory")
    mem.add_argument("--which", choices=("cnn", "vae"), required=True)
    mem.add_argument("--framework", choices=("avalon", "torch_eager", "torch_compile"), required=True)
    mem.add_argument("--steps", type=int, default=20)
    mem.add_argument("--device", default="cpu")
    sub.add_parser("serve")
    args = parser.parse_args(argv)

    # Replies get a private copy of stdout; file descriptor 1 itself (Python's and C
    # libraries' prints) is pointed at stderr, so nothing else can garble them.
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    if args.mode == "memory":
        reply(measure_memory(args.which, args.framework, args.steps, args.device))
    else:
        serve(sys.stdin, reply)


if __name__ == "__main__":
    main()
