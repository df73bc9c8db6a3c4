"""The autotuner's choices kept on disk between processes, beside the kernels.

A compiled step with several schedules (runtime.threads.Autotuned) times them
on its first calls: each schedule is compiled when first tried, and ~15 calls
run schedules that lose.  A process that compiles the same step on the same
machine again starts from the schedule an earlier one chose: its first call
compiles that schedule alone, and no call runs a losing one.  The choice is
checked after a quarter of Autotuned.RECHECK calls (the machine's load may
differ from the earlier run's, and a noisy trial there may have chosen
wrongly), and each new choice is written back.

- Key: the sha256 of the step's graph as the passes left it (each node's op,
  operands, type and plain attributes; a fused group's length, not its body:
  a key costs ~0.3 ms, and groups that differ only in their elementwise ops
  run alike), the schedules' labels, the machine (host
  name, cores), the BLAS selection and the avalon-core sources
  (kernel_ir.keys.source_fingerprint).  A different step, schedule set or
  machine has a key of its own.
- Entry: `cache_dir()/tuning/<key>.json`, {"choice": label, "timings": {label:
  seconds}}, written and checked as every `disk_memo.DiskMemo` entry: one that
  is damaged reads as missing and the schedules are timed again.
- AVALON_TUNING_CACHE=0 turns it off: every process times its schedules.
  What the memo can change is speed alone: every schedule computes the same
  step.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform

import numpy as np

from ..graph import Graph
from ..kernel_ir.keys import source_fingerprint
from .blas import choice as blas_choice
from .disk_memo import DiskMemo

SUBDIRECTORY = "tuning"
_MEMO = DiskMemo(SUBDIRECTORY, ".json", lambda v: json.dumps(v, sort_keys=True).encode(), json.loads)


def enabled() -> bool:
    """Whether choices are recalled and kept (AVALON_TUNING_CACHE, on unless 0)."""
    return os.environ.get("AVALON_TUNING_CACHE", "1").strip() != "0"


def key_of(graph: Graph, labels, backend) -> str | None:
    """The memo key of tuning `graph` over the schedules `labels` on `backend`;
    None when the memo is off."""
    if not enabled():
        return None
    h = hashlib.sha256()
    for part in (source_fingerprint(), blas_choice(), platform.node(), str(os.cpu_count()),
                 getattr(backend, "name", type(backend).__name__), "|".join(labels)):
        h.update(part.encode() + b"\0")
    _hash_graph(graph, h)
    return h.hexdigest()


def recall(key: str | None) -> dict | None:
    """{"choice": label, "timings": {label: seconds}} kept under `key`, or None."""
    if key is None:
        return None
    found, value = _MEMO.get(key)
    if not found or not isinstance(value, dict) or not isinstance(value.get("choice"), str):
        return None
    timings = value.get("timings")
    if not isinstance(timings, dict) or not all(isinstance(t, (int, float)) for t in timings.values()):
        return None
    return value


def remember(key: str | None, label: str, timings: dict) -> None:
    """Keep the choice `label` (and the timings it was made on) under `key`."""
    if key is not None:
        _MEMO.put(key, {"choice": label, "timings": {k: float(v) for k, v in timings.items()}})


def _hash_graph(graph: Graph, h) -> None:
    h.update(repr(_graph_rows(graph)).encode())


def _graph_rows(graph: Graph) -> list:
    """Each node as (op, operand positions, shape, dtype, attributes), for one repr."""
    index = {n: k for k, n in enumerate(graph.nodes)}
    rows = [(n.op, tuple(index[i] for i in n.inputs), n.shape, n.dtype.str,
             tuple((name, _attr_value(n.attrs[name])) for name in sorted(n.attrs)) if n.attrs else ())
            for n in graph.nodes]
    rows.append((tuple(index[i] for i in graph.inputs), tuple(index[o] for o in graph.outputs)))
    return rows


def _attr_value(v):
    """Plain values as they are; a body graph (a fused group: elementwise work, its
    size the node's) by its length; an array by its type."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, np.dtype):
        return v.str      # its repr is Python code, and slow
    if isinstance(v, (tuple, list)):
        return tuple(_attr_value(x) for x in v)
    if isinstance(v, Graph):
        return ("graph", len(v.nodes))
    if isinstance(v, np.ndarray):
        return ("array", v.shape, v.dtype.str)
    return ("object", type(v).__name__)
