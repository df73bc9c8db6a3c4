"""Rematerialization figures: the memory a deep MLP's gradient step holds with
and without avalon.checkpoint, and what the recomputation costs in time.

The MLP has L tanh layers of width D on a batch of B; the checkpointed version
wraps each run of S layers in avalon.checkpoint, so the step keeps one
activation per segment (its input) instead of one per layer, and recomputes a
segment's activations when the backward pass reaches it.  Figures per variant:
the compiled step's preallocated buffers (its memory plan, where activations
live), the peak of what the call allocates besides them (tracemalloc: outputs,
the weight gradients), and the median step time.  Run with
`python packages/avalon-core/benchmarks/remat_memory.py [--layers L --width D --batch B --segment S]`.
"""
from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

import numpy as np

import avalon


def segment(h, *ws):
    for w in ws:
        h = avalon.tanh(h @ w)
    return h


def make_step(run_segment, layers, seg):
    def loss(ws, x):
        h = x
        for k in range(0, layers, seg):
            h = run_segment(h, *ws[k:k + seg])
        return (h * h).mean()
    # one thread: the batch split keeps a plan per shard, which would blur the figure
    return avalon.value_and_grad(loss, argnums=0, parallel=False)


def measure(step, ws, x, repeats=5):
    loss, grads = step(ws, x)  # compile
    tracemalloc.start()
    step(ws, x)
    _, transient = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(ws, x)
        times.append(time.perf_counter() - t0)
    return {"buffers": step.memory_plan.total_bytes, "transient": transient,
            "time": statistics.median(times), "loss": float(loss), "grads": grads[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--segment", type=int, default=4)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal((a.width, a.width)) / np.sqrt(a.width)).astype(np.float32)
          for _ in range(a.layers)]
    x = rng.standard_normal((a.batch, a.width)).astype(np.float32)
    act = a.batch * a.width * 4 / 2**20
    print(f"MLP: {a.layers} tanh layers of width {a.width}, batch {a.batch} (one activation: {act:.1f} MiB); "
          f"checkpoint segments of {a.segment} layers")
    rows = [("stored activations", measure(make_step(segment, a.layers, a.segment), ws, x)),
            ("avalon.checkpoint", measure(make_step(avalon.checkpoint(segment), a.layers, a.segment), ws, x))]
    print(f"{'':20} {'step buffers':>13} {'+ allocated':>12} {'total':>10} {'step time':>10}")
    for name, r in rows:
        total = (r["buffers"] + r["transient"]) / 2**20
        print(f"{name:20} {r['buffers'] / 2**20:10.1f} MiB {r['transient'] / 2**20:8.1f} MiB "
              f"{total:6.1f} MiB {r['time'] * 1e3:7.1f} ms")
    (_, plain), (_, remat) = rows
    saved = 1 - (remat["buffers"] + remat["transient"]) / (plain["buffers"] + plain["transient"])
    same = all(np.allclose(g, h, rtol=1e-5, atol=1e-7) for g, h in zip(plain["grads"], remat["grads"]))
    print(f"peak memory saved: {saved:.0%}; time cost: {remat['time'] / plain['time'] - 1:+.0%}; "
          f"same loss and gradients: {remat['loss'] == plain['loss'] and same}")


if __name__ == "__main__":
    main()
