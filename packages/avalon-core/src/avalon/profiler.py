"""Kernel-by-kernel profile of a compiled function.

    report = avalon.profile(avalon.value_and_grad(loss_fn), model, x, y)
    print(report)        # one row per kernel: time, share, op, shape, source line

The function is compiled again with a timer around every kernel call (the
graph and memory plan are those of the normal compilation), run `repeat`
times, and the per-node times are averaged.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import tree
from .codegen import generate
from .graph import short_loc, type_str
from .threadsafe import private_backend


@dataclass
class ProfileRow:
    index: int
    op: str
    type: str
    loc: str
    seconds: float


class ProfileReport:
    def __init__(self, rows, total, name):
        self.rows, self.total, self.name = rows, total, name

    def by_op(self) -> dict:
        out: dict = {}
        for r in self.rows:
            out[r.op] = out.get(r.op, 0.0) + r.seconds
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def __str__(self):
        lines = [f"profile of {self.name}: {self.total * 1e3:.2f} ms per call in kernels",
                 f"{'ms':>8} {'share':>6}  {'op':<22} {'type':<22} line"]
        for r in sorted(self.rows, key=lambda r: -r.seconds):
            lines.append(f"{r.seconds * 1e3:8.3f} {r.seconds / max(self.total, 1e-12):6.1%}  {r.op:<22} "
                         f"{r.type:<22} {short_loc(r.loc) if r.loc else ''}")
        lines.append("by op: " + ", ".join(f"{op} {t * 1e3:.2f} ms" for op, t in self.by_op().items()))
        return "\n".join(lines)


def profile(fn, *args, repeat: int = 10, warmup: int = 2) -> ProfileReport:
    """Profile compiled function `fn` (from avalon.jit or avalon.value_and_grad) on args."""
    from .runtime.threads import Autotuned, ShardedFunction
    fn(*args)  # compile through the normal path (and warm the caches)
    compiled = fn._last().compiled
    if isinstance(compiled, Autotuned):
        compiled = compiled.current()
    compiled = getattr(compiled, "compiled", compiled) if not isinstance(compiled, ShardedFunction) else compiled
    leaves, _ = tree.flatten(args)
    name = compiled.graph.name
    if isinstance(compiled, ShardedFunction):
        # profile one shard's kernels (each thread runs the same code on its share of the batch)
        plan = compiled.plan
        for i in plan.batch_input_index:
            leaves[i] = leaves[i][:leaves[i].shape[0] // plan.shards]
        name += f" (one of {plan.shards} shards)"
    backend = compiled.backend
    if isinstance(compiled, ShardedFunction):
        backend = _solo_shard(backend)
    timed = generate(compiled.graph, backend, compiled.graph.name, plan=None, profile=True)
    for _ in range(warmup):
        timed.fn(*leaves)
    for k in timed.timings:
        timed.timings[k] = 0.0
    for _ in range(repeat):
        timed.fn(*leaves)
    rows = []
    nodes = compiled.graph.nodes
    for k, t in timed.timings.items():
        n = nodes[k]
        rows.append(ProfileRow(k, n.op, type_str(n.shape, n.dtype), n.loc or "", t / repeat))
    return ProfileReport(rows, sum(r.seconds for r in rows), name)


class _Solo:
    """Stands in for the other threads' partial sums when one shard runs alone."""

    def reduce(self, index, value):
        return value.copy()


def _solo_shard(backend):
    import collections
    b = private_backend(backend)
    b._shard_index = 0
    b._reducers = collections.defaultdict(_Solo)
    return b
