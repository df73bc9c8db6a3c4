"""The parent side of the benchmark's subprocesses (see worker.py): peak-memory
runs, and the PyTorch eager trainer with a tuned glibc allocator.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from .measure import EpochLog

# glibc malloc tuned for a training loop: large blocks stay in the heap instead of
# being mmap'ed and unmapped at every step (32 MiB, the largest threshold glibc
# accepts on 64-bit), and freed memory is not trimmed back to the OS (1 GiB).
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
                "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024 * 1024)}


def _worker_cmd(*args) -> list:
    return [sys.executable, "-m", "avalon_bench.worker", *args]


def _fresh_rss_cmd(cmd: list) -> list:
    """cmd run as a grandchild through a small shell.  Linux keeps a process's peak
    RSS (ru_maxrss) across fork and exec, so a worker forked straight from this
    (large) process would start with this process's peak; forked from the shell,
    it starts from the shell's.  (The shell must fork: a command after it keeps it
    from exec'ing in place.)"""
    return ["/bin/sh", "-c", '"$@"; exit $?', "sh", *cmd]


class TunedAllocatorTrainer:
    """PyTorch eager in a subprocess started with TUNED_MALLOC; run_epoch runs one
    epoch there (the same data, batches and order) and returns its EpochLog."""
    key = "torch_tuned_malloc"
    label = "PyTorch eager, tuned malloc"
    optional = True

    def __init__(self, which: str, data: str, quick: bool, device: str):
        env = dict(os.environ, **TUNED_MALLOC)
        self.proc = subprocess.Popen(_worker_cmd("serve"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)
        self.info = self._ask({"cmd": "setup", "which": which, "data": data, "quick": quick,
                               "device": device})

    def _ask(self, msg: dict) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the tuned-allocator worker exited (code {self.proc.wait()}); see its stderr")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def run_epoch(self, batches, epoch: int, max_batches: int | None = None) -> EpochLog:
        return EpochLog(**self._ask({"cmd": "epoch", "epoch": epoch, "max_batches": max_batches}))

    def close(self):
        if self.proc.poll() is None:
            try:
                self._ask({"cmd": "quit"})
            except (RuntimeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def peak_memory(which: str, frameworks, steps: int, device: str) -> dict:
    """{framework: worker's memory dict, or {"failed": why}}, one fresh process per
    framework; they run side by side (memory, not time, is measured)."""
    procs = {fw: subprocess.Popen(_fresh_rss_cmd(_worker_cmd("memory", "--which", which, "--framework", fw,
                                                             "--steps", str(steps), "--device", device)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for fw in frameworks}
    results = {}
    for fw, proc in procs.items():
        out, err = proc.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if proc.returncode == 0 and lines:
            results[fw] = json.loads(lines[-1])
        else:
            tail = (err.strip().splitlines() or ["no output"])[-1]
            results[fw] = {"failed": f"exit code {proc.returncode}: {tail}"}
    return results
