"""Compiling a fused elementwise group for NumPy: the group's ufuncs run one
after another on preallocated scratch arrays (out=), so a chain of N ops makes
no temporary allocations.  The generated source is kept on the function."""
from __future__ import annotations

import numpy as np

from ..primitive import PRIMITIVES


def compile_fused_numpy(body, backend):
    env = {"np": np}
    lines = []
    names = {}
    for k, n in enumerate(body.inputs):
        names[n] = f"i{k}"
    live_until = {}
    for idx, n in enumerate(body.nodes):
        for i in n.inputs:
            live_until[i] = idx
    out_node = body.outputs[0]
    scratch: list = []     # (name, dtype, shape) of allocated scratch arrays
    free: list = []        # names of scratch arrays no longer in use
    owner: dict = {}       # node -> scratch name it lives in
    for idx, n in enumerate(body.nodes):
        if n.op == "input":
            continue
        if n.op == "const":
            cname = f"c{len(env)}"
            env[cname] = n.value
            names[n] = cname
            continue
        prim = PRIMITIVES[n.op]
        kname = f"k_{n.op}_{idx}"
        env[kname] = backend.kernel(prim, n.attrs)
        args = ", ".join(names[i] for i in n.inputs)
        # release scratch of inputs that die here: elementwise ops may write in place
        dying = list({i: None for i in n.inputs if live_until.get(i) == idx and i in owner})
        if prim.inplace:
            free.extend(owner.pop(i) for i in dying)
        if n is out_node:
            target = "out"
        else:
            target = _take(free, scratch, n, env)
            owner[n] = target
        if not prim.inplace:
            free.extend(owner.pop(i) for i in dying)
        if backend.supports_out(prim):
            lines.append(f"    {kname}({args}, out={target})")
        else:
            lines.append(f"    {target}[...] = {kname}({args})")
        names[n] = target
    env["_empty"] = backend.empty
    src = (f"def fused({', '.join(names[i] for i in body.inputs)}, out=None):\n"
           f"    if out is None:\n        out = _empty({out_node.shape!r}, np.{out_node.dtype.name})\n"
           + "\n".join(lines) + "\n    return out\n")
    exec(compile(src, "<avalon fused>", "exec"), env)
    fn = env["fused"]
    fn.source = src
    return fn


def _take(free, scratch, n, env):
    for k, name in enumerate(free):
        arr = env[name]
        if arr.dtype == n.dtype and arr.shape == n.shape:
            return free.pop(k)
    name = f"s{len(scratch)}"
    env[name] = np.empty(n.shape, n.dtype)
    scratch.append(name)
    return name
