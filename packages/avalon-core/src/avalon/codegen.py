"""The code generator: a Graph becomes Python source that calls backend kernels.

Every kernel is bound once, at compile time, as a global of the generated
module; constants are moved to the device once; buffers of the memory plan are
preallocated.  The source is readable (`compiled.source`), one line a node,
with the graph node and the user's line as a comment.

With AVALON_C_DRIVER=1 (read when a graph is compiled; CPU backend) runs of
consecutive nodes with C implementations become one call of a C driver
(avalon.runtime.segments): `compiled.segments` lists them, each with a readable
`.source`; the node-by-node lines stay in the source as the path taken when the
driver refuses a call's arrays.  profile=True and check_finite=True keep one
call per node.
"""
from __future__ import annotations

import re

import numpy as np

from .errors import GraphError, OutOfMemoryError, at
from .graph import short_loc, type_str
from .memory import MemoryPlan, plan_memory
from .primitive import PRIMITIVES
from .runtime.code_cache import code_of



class CompiledGraph:
    """A graph compiled for one backend: call it with the graph's inputs."""

    def __init__(self, fn, source, graph, plan, backend):
        self.fn, self.source, self.graph, self.plan, self.backend = fn, source, graph, plan, backend
        self.segments = []   # runs of nodes called as one C driver call (avalon.runtime.segments)

    def __call__(self, *args):
        return self.fn(*args)


def _ident(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s)


def generate(graph, backend, name: str = "compiled", plan=None, profile: bool = False,
             check_finite: bool = False) -> CompiledGraph:
    """Compile `graph` for `backend`.  With profile=True every kernel call is
    timed into `compiled.timings` (node index -> seconds), for avalon.profile.
    With check_finite=True every input and every value computed is checked,
    and the first non-finite one raises (avalon.detect_anomaly)."""
    if plan is None:
        # checked code keeps every value in its own array, so an error can show
        # the operands as they were (no result written over an operand)
        plan = MemoryPlan() if check_finite else plan_memory(graph, backend)
    fname = _ident(name)
    env: dict = {"_out_of_memory": _OutOfMemory(graph, f"<avalon {fname}>")}
    timings: dict = {}
    if profile:
        import time
        env["_clock"], env["_timings"], env["_sync"] = time.perf_counter, timings, backend.synchronize
    if check_finite:
        from .anomaly import FiniteChecker
        env["_check"] = FiniteChecker(graph, backend)
    slots = _allocate_slots(graph, plan, backend)
    names: dict = {}
    for k, n in enumerate(graph.inputs):
        names[n] = f"a{k}"
    segmented = not profile and not check_finite and _segments_wanted(backend)
    last_use = _last_uses(graph, through_views=segmented)
    outputs = set(graph.outputs)
    steps = []
    builder = None
    if segmented:
        from .runtime.segments import SegmentBuilder
        builder = SegmentBuilder(graph, plan, backend, env, names)
    for k, n in enumerate(graph.nodes):
        if n.op == "input":
            continue
        var = f"v{k}"
        if n.op == "const":
            env[var] = backend.asarray(_host(n.value))
            names[n] = var
            if builder is not None:
                builder.note_const(n, env[var])
            continue
        kname = f"{_ident(n.op)}_{k}"
        env[kname] = _compile_fused(backend, n, k) if n.op == "fused" else backend.node_kernel(n)
        args = ", ".join(names[i] for i in n.inputs)
        comment = f"  # {type_str(n.shape, n.dtype)}{_body_ops(n)}"
        if n.loc:
            comment += f" {short_loc(n.loc)}"
        step = Step(k, n, kname, var)
        steps.append(step)
        if n in plan.elided:
            names[n] = names[n.inputs[0]]
            step.out = "elided"
            step.lines.append(f"# {n.op}: {names[n.inputs[1]]} was written into {names[n.inputs[0]]}")
            continue
        if profile:
            step.lines.append("_t = _clock()")
        sep = ", " if args else ""
        if n in plan.write_into:
            step.out, step.target = "write_into", plan.write_into[n]
            step.lines.append(f"{var} = {kname}({args}{sep}out={names[plan.write_into[n]]}){comment}")
        elif n in plan.slot_of:
            bname = f"b{k}"
            s, offset = plan.slot_of[n], plan.offset_of.get(n, 0)
            env[bname] = slots[s][offset:offset + n.nbytes].view(n.dtype).reshape(n.shape)
            step.target = bname
            if n in plan.assembled:
                step.out = "assembled"
                step.lines.append(f"{var} = {bname}  # {n.op}, its inputs written in place:{comment[3:]}")
            else:
                step.out = "slot"
                step.lines.append(f"{var} = {kname}({args}{sep}out={bname}){comment}")
        else:
            step.lines.append(f"{var} = {kname}({args}){comment}")
        if profile:
            timings[k] = 0.0
            step.lines.append(f"_sync(); _timings[{k}] += _clock() - _t")
        if check_finite:
            step.lines.append(f"_check.value({var}, {k}{', ' if args else ''}{args})")
        names[n] = var
        step.dead = sorted({names[i] for i in set(n.inputs) if last_use.get(i) == k and i not in outputs
                            and i.op not in ("input", "const") and i not in plan.slot_of and i not in plan.elided})
    lines = []
    segments = []
    if builder is not None:
        from .runtime.segments import emit
        lines = emit(builder, builder.group(steps), last_use, outputs, env)
        segments = builder.segments
    else:
        for step in steps:
            lines += step.all_lines()
    rets = []
    for o in graph.outputs:
        rets.append(f"{names[o]}.copy()" if o.op == "const" else names[o])
    params = ", ".join(names[i] for i in graph.inputs)
    if check_finite:
        lines.insert(0, f"_check.inputs({params})")
    lines.append(f"return ({', '.join(rets)}{',' if len(rets) == 1 else ''})")
    # try costs nothing until something raises; then the node that ran out of
    # memory is named (its line of the source says which)
    body = "\n".join("        " + line for line in lines)
    src = (f"def {fname}({params}):\n    try:\n{body}\n"
           f"    except MemoryError as e:\n        raise _out_of_memory(e) from e\n")
    code = code_of(src, f"<avalon {fname}>")
    env["__avalon_source__"] = src
    exec(code, env)
    compiled = CompiledGraph(env[fname], src, graph, plan, backend)
    compiled.timings = timings
    compiled.segments = segments
    return compiled


class Step:
    """One node's line(s) of generated code, and where its result goes: "slot" (the
    plan's buffer `target`), "write_into" (the array of node `target`), "elided"
    (an assign made free), "assembled" (the plan's buffer `target`, its inputs
    written there: no op runs) or "fresh" (the kernel allocates it)."""

    def __init__(self, k, node, kname, var):
        self.k, self.node, self.kname, self.var = k, node, kname, var
        self.out, self.target = "fresh", None
        self.lines: list = []
        self.dead: list = []

    def all_lines(self):
        return self.lines + ([f"del {', '.join(self.dead)}"] if self.dead else [])


def _segments_wanted(backend) -> bool:
    """Segments (avalon.runtime.segments) for this compile: AVALON_C_DRIVER=1, a CPU
    backend and a driver that builds (a C compiler, NumPy's array layout known)."""
    from .runtime import segments
    return segments.enabled() and getattr(backend, "name", None) == "cpu" and segments.driver() is not None


def _last_uses(graph, through_views=False):
    """node -> index of the node reading it last.  through_views: a use of a view
    counts as a use of the array it views (segments pass that array, by name)."""
    root = {}
    last_use = {}
    for k, n in enumerate(graph.nodes):
        prim = PRIMITIVES.get(n.op)
        root[n] = root.get(n.inputs[0], n.inputs[0]) if through_views and prim is not None and prim.view \
            and n.inputs else n
        for i in n.inputs:
            last_use[i] = k
            if through_views and root.get(i, i) is not i:
                last_use[root[i]] = k
    return last_use


def _allocate_slots(graph, plan, backend):
    slots = []
    for s, nbytes in enumerate(plan.slot_nbytes):
        try:
            slots.append(backend.buffer(nbytes))
        except MemoryError as e:
            users = [n for n, slot in plan.slot_of.items() if slot == s]
            raise OutOfMemoryError(
                f"compiling {graph.name}: cannot allocate buffer {s} of its memory plan ({_size(nbytes)}; the "
                f"plan holds {_size(plan.total_bytes)} in {len(plan.slot_nbytes)} buffers). Its largest "
                f"values: {_largest(users)}. Make these values smaller (a smaller batch, fewer features) or "
                f"run on a device with more memory.") from e
    return slots


def _body_ops(node, most=6) -> str:
    """What a fused group computes, for its line's comment: " = relu", " = mul, add, sum"."""
    body = node.attrs.get("body") if node.op == "fused" else None
    if body is None:
        return ""
    ops = [n.op for n in body.nodes if n.op not in ("input", "const")]
    return " = " + ", ".join(ops[:most]) + (", ..." if len(ops) > most else "")


def _op_name(node):
    """The op a user wrote: a fused group is named by the op that makes its value."""
    body = node.attrs.get("body") if node.op == "fused" else None
    return body.outputs[0].op if body is not None and body.outputs else node.op


class _OutOfMemory:
    """Turns a MemoryError raised inside generated code into an OutOfMemoryError
    naming the node whose kernel could not allocate its result."""

    def __init__(self, graph, filename):
        self.graph, self.filename = graph, filename

    def __call__(self, error):
        node = self._failed_node(error)
        where = f"{_op_name(node)} making {type_str(node.shape, node.dtype)} ({_size(node.nbytes)}){at(node.loc)}" \
            if node is not None else "a kernel"
        return OutOfMemoryError(f"{self.graph.name}: out of memory in {where}: {error}. Make the value "
                                "smaller (a smaller batch, fewer features) or free other arrays first.")

    def _failed_node(self, error):
        tb, line = error.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == self.filename:
                line = _source_line(tb)
            tb = tb.tb_next
        match = _ASSIGNED.match(line or "")
        return self.graph.nodes[int(match.group(1))] if match else None


def _source_line(tb):
    """The generated source line a traceback entry points at."""
    source = tb.tb_frame.f_globals.get("__avalon_source__", "")
    lines = source.splitlines()
    k = tb.tb_lineno - 1
    return lines[k] if 0 <= k < len(lines) else None


_ASSIGNED = re.compile(r"\s*v(\d+) = ")


def _size(nbytes):
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _largest(nodes, count=3):
    nodes = sorted(nodes, key=lambda n: -n.nbytes)[:count]
    return "; ".join(f"{n.op} {type_str(n.shape, n.dtype)} ({_size(n.nbytes)}){at(n.loc)}" for n in nodes)


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
