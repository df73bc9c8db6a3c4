"""The code generator: a Graph becomes Python source that calls backend kernels.

Every kernel is bound once, at compile time, as a global of the generated
module; constants are moved to the device once; buffers of the memory plan are
preallocated.  The source is readable (`compiled.source`), one line a node,
with the graph node and the user's line as a comment.
"""
from __future__ import annotations

import numpy as np

from .errors import GraphError, at
from .graph import short_loc, type_str
from .memory import plan_memory
from .primitive import PRIMITIVES

_UINT8 = np.dtype(np.uint8)


class CompiledGraph:
    """A graph compiled for one backend: call it with the graph's inputs."""

    def __init__(self, fn, source, graph, plan, backend):
        self.fn, self.source, self.graph, self.plan, self.backend = fn, source, graph, plan, backend

    def __call__(self, *args):
        return self.fn(*args)


def _ident(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)


def generate(graph, backend, name: str = "compiled", plan=None, profile: bool = False) -> CompiledGraph:
    """Compile `graph` for `backend`.  With profile=True every kernel call is
    timed into `compiled.timings` (node index -> seconds), for avalon.profile."""
    plan = plan_memory(graph, backend) if plan is None else plan
    env: dict = {}
    timings: dict = {}
    if profile:
        import time
        env["_clock"], env["_timings"], env["_sync"] = time.perf_counter, timings, backend.synchronize
    slots = [backend.empty((nb,), _UINT8) for nb in plan.slot_nbytes]
    names: dict = {}
    for k, n in enumerate(graph.inputs):
        names[n] = f"a{k}"
    last_use = {}
    for k, n in enumerate(graph.nodes):
        for i in n.inputs:
            last_use[i] = k
    outputs = set(graph.outputs)
    lines = []
    for k, n in enumerate(graph.nodes):
        if n.op == "input":
            continue
        var = f"v{k}"
        if n.op == "const":
            env[var] = backend.asarray(_host(n.value))
            names[n] = var
            continue
        prim = PRIMITIVES[n.op]
        kname = f"{_ident(n.op)}_{k}"
        env[kname] = _compile_fused(backend, n, k) if n.op == "fused" else backend.kernel(prim, n.attrs)
        args = ", ".join(names[i] for i in n.inputs)
        comment = f"  # {type_str(n.shape, n.dtype)}"
        if n.loc:
            comment += f" {short_loc(n.loc)}"
        if n in plan.elided:
            names[n] = names[n.inputs[0]]
            lines.append(f"    # {n.op}: {names[n.inputs[1]]} was written into {names[n.inputs[0]]}")
            continue
        if profile:
            lines.append("    _t = _clock()")
        if n in plan.write_into:
            sep = ", " if args else ""
            lines.append(f"    {var} = {kname}({args}{sep}out={names[plan.write_into[n]]}){comment}")
        elif n in plan.slot_of:
            bname = f"b{k}"
            s = plan.slot_of[n]
            env[bname] = slots[s][:n.nbytes].view(n.dtype).reshape(n.shape)
            sep = ", " if args else ""
            lines.append(f"    {var} = {kname}({args}{sep}out={bname}){comment}")
        else:
            lines.append(f"    {var} = {kname}({args}){comment}")
        if profile:
            timings[k] = 0.0
            lines.append(f"    _sync(); _timings[{k}] += _clock() - _t")
        names[n] = var
        dead = [names[i] for i in set(n.inputs) if last_use.get(i) == k and i not in outputs
                and i.op not in ("input", "const") and i not in plan.slot_of and i not in plan.elided]
        if dead:
            lines.append(f"    del {', '.join(sorted(dead))}")
    rets = []
    for o in graph.outputs:
        rets.append(f"{names[o]}.copy()" if o.op == "const" else names[o])
    params = ", ".join(names[i] for i in graph.inputs)
    fname = _ident(name)
    src = f"def {fname}({params}):\n" + "\n".join(lines) + f"\n    return ({', '.join(rets)}{',' if len(rets) == 1 else ''})\n"
    code = compile(src, f"<avalon {fname}>", "exec")
    exec(code, env)
    compiled = CompiledGraph(env[fname], src, graph, plan, backend)
    compiled.timings = timings
    return compiled


def _compile_fused(backend, node, k):
    body = node.attrs["body"]
    if not body.inputs or not node.inputs:
        made_by = getattr(body, "made_by", "an unknown pass")
        raise GraphError(f"internal error: node {k} is a fused group with no inputs, made by the pass "
                         f"{made_by!r}{at(node.loc)}; a group of constants must be folded instead. "
                         "Please report this with the graph (print(avalon.trace(f, *args))).")
    return backend.compile_fused(body)


def _host(v):
    return v if isinstance(v, np.ndarray) else np.asarray(v)
