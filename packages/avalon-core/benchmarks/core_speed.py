"""Core speed figures: the cost of a cache-hit call of a compiled function
against the kernels it runs, and how long tracing + compiling a training step
takes.  Prints a table; run with `python packages/avalon-core/benchmarks/core_speed.py`.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

import avalon
from avalon.demo import Net, nll_loss


def per_call(fn, n=20000, repeats=5):
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best.append((time.perf_counter() - t0) / n)
    return min(best)


def overhead():
    rows = []
    for size in (1, 1000):
        x = np.random.default_rng(0).standard_normal(size).astype(np.float32)
        f = avalon.jit(lambda x: avalon.exp(x))
        f(x)
        t_jit = per_call(lambda: f(x))
        t_np = per_call(lambda: np.exp(x))
        rows.append((f"jit(exp) on f32[{size}]", t_jit * 1e6, t_np * 1e6))
    return rows


class Bench:
    """The benchmark CNN: conv 1->16->32->32 3x3 pad 1, relu + 2x2 max-pool, linear 288->10."""

    def __init__(self, rng):
        def w(*s):
            return (rng.standard_normal(s) * np.sqrt(2 / np.prod(s[1:]))).astype(np.float32)
        self.c1, self.b1 = w(16, 1, 3, 3), np.zeros(16, np.float32)
        self.c2, self.b2 = w(32, 16, 3, 3), np.zeros(32, np.float32)
        self.c3, self.b3 = w(32, 32, 3, 3), np.zeros(32, np.float32)
        self.fc, self.fcb = w(10, 288), np.zeros(10, np.float32)

    def __call__(self, x):
        for w, b in ((self.c1, self.b1), (self.c2, self.b2), (self.c3, self.b3)):
            x = avalon.max_pool2d(avalon.relu(avalon.conv2d(x, w, b, padding=1)), 2)
        return avalon.log_softmax(avalon.linear(x.reshape(x.shape[0], 288), self.fc, self.fcb))


def compile_times():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    rows = []
    for name, model in (("Avalon.jl example CNN", Net()), ("benchmark CNN", Bench(rng))):
        times, steps = [], []
        for _ in range(3):
            gf = avalon.GradFunction(nll_loss, argnums=0)  # a fresh cache: measures a cold compile
            t0 = time.perf_counter()
            gf(model, x, y)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(5):
                gf(model, x, y)
            steps.append((time.perf_counter() - t0) / 5)
        rows.append((name, statistics.median(times), statistics.median(steps), len(gf.graph.nodes)))
    return rows


def main():
    print("| call | compiled (us) | numpy alone (us) | overhead (us) |")
    print("| --- | --- | --- | --- |")
    for name, a, b in overhead():
        print(f"| {name} | {a:.2f} | {b:.2f} | {a - b:.2f} |")
    print()
    print("| training step (batch 64) | trace + compile (s) | step, cache hit (ms) | graph nodes |")
    print("| --- | --- | --- | --- |")
    for name, tc, step, nodes in compile_times():
        print(f"| {name} | {tc:.3f} | {step * 1e3:.1f} | {nodes} |")


if __name__ == "__main__":
    main()
