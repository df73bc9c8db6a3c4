"""Compatibility module: engine-owned threads now live in two places.

* avalon.passes.sharding, the analysis: whether a step can run split across the
  batch (split_batch, ShardPlan, the all-reduces it needs) or as independent
  parts (split_components);
* avalon.runtime.threads, the execution: ShardedFunction, ComponentParallel,
  BlasThreads, Autotuned, shard_count.

The names are re-exported here.  The analysis's tunables (MIN_SHARD_ELEMENTS,
MAX_REDUCTIONS, ELEMENTS_PER_REDUCTION) read and write through to avalon.passes.sharding, so
`monkeypatch.setattr(avalon.parallel, "MIN_SHARD_ELEMENTS", 0)` still reaches
the code that reads it.
"""
from __future__ import annotations

import sys
import types

from .passes import sharding as _sharding
from .passes.sharding import P, R, ShardPlan, allreduce_sum_p, split_components  # noqa: F401
from .runtime.threads import Autotuned, BlasThreads, ComponentParallel, ShardedFunction, shard_count  # noqa: F401


def split_batch(graph, batch_inputs, shards: int | None = None):
    """avalon.passes.sharding.split_batch, with the engine's thread count by default."""
    return _sharding.split_batch(graph, batch_inputs, shard_count() if shards is None else shards)


def _tunable(name):
    """A module attribute that reads and writes avalon.passes.sharding's."""
    return property(lambda module: getattr(_sharding, name), lambda module, value: setattr(_sharding, name, value))


class _ForwardingModule(types.ModuleType):
    MIN_SHARD_ELEMENTS = _tunable("MIN_SHARD_ELEMENTS")
    MAX_REDUCTIONS = _tunable("MAX_REDUCTIONS")
    ELEMENTS_PER_REDUCTION = _tunable("ELEMENTS_PER_REDUCTION")


sys.modules[__name__].__class__ = _ForwardingModule
