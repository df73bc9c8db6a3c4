"""Per-example weight gradients of a small CNN: conv_weight_grad's batching rule
(one grouped call, the examples as groups) against a Python loop of one call
per example, eagerly (NumPy kernels) and compiled (avalon.jit), with the
summed batch gradient (one ungrouped call over the same data, the same
multiply-adds) as a floor.  Prints a table; run with
`python packages/avalon-core/benchmarks/batching_conv_weight_grad.py [--batch B]`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import avalon
from avalon.ops.nn import conv_weight_grad_p
from avalon.primitive import bind

# (label, one example's input (1, C, H, W), weight (O, C, kH, kW), padding): an MNIST-sized CNN
LAYERS = [
    ("conv1 1->16 28x28 k3", (1, 1, 28, 28), (16, 1, 3, 3), 1),
    ("conv2 16->32 14x14 k3", (1, 16, 14, 14), (32, 16, 3, 3), 1),
    ("conv3 32->64 7x7 k3", (1, 32, 7, 7), (64, 32, 3, 3), 1),
]


def median_time(fn, repeats=15):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_functions(xs, ws, padding, batch):
    nd = len(xs) - 2
    attrs = dict(weight_shape=ws, stride=(1,) * nd, padding=(padding,) * nd, dilation=(1,) * nd, groups=1)
    rule = conv_weight_grad_p.rule("batching")

    def batched(x, g):          # x (B, 1, C, H, W), g (B, 1, O, H', W')
        dw, d = rule((x, g), (0, 0), **attrs)
        return dw

    def loop(x, g):
        return avalon.stack([bind(conv_weight_grad_p, (x[b], g[b]), attrs) for b in range(batch)])

    def summed(x, g):           # the batch's summed gradient: all examples as one N
        return bind(conv_weight_grad_p, (avalon.reshape(x, (batch,) + xs[1:]),
                                         avalon.reshape(g, (batch,) + tuple(g.shape[2:]))), attrs)
    return batched, loop, summed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    batch = ap.parse_args().batch
    r = np.random.default_rng(0)
    print(f"per-example conv weight gradients, {batch} examples, float32, median ms")
    print(f"{'layer':24s} {'mode':6s} {'rule':>8s} {'loop':>8s} {'loop/rule':>9s} {'summed':>8s}")
    for label, xs, ws, padding in LAYERS:
        ys = (1, ws[0]) + tuple(s + 2 * padding - k + 1 for s, k in zip(xs[2:], ws[2:]))
        x = r.standard_normal((batch,) + xs).astype(np.float32)
        g = r.standard_normal((batch,) + ys).astype(np.float32)
        batched, loop, summed = layer_functions(xs, ws, padding, batch)
        np.testing.assert_allclose(np.asarray(batched(x, g)), np.asarray(loop(x, g)), rtol=1e-4, atol=1e-4)
        for mode, wrap in (("eager", lambda f: f), ("jit", avalon.jit)):
            t = [median_time(lambda f=wrap(f): np.asarray(f(x, g))) * 1e3 for f in (batched, loop, summed)]
            print(f"{label:24s} {mode:6s} {t[0]:8.2f} {t[1]:8.2f} {t[1] / t[0]:9.1f} {t[2]:8.2f}")


if __name__ == "__main__":
    main()
