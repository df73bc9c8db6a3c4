"""The CUDA renderer: kernels as `extern "C" __global__` functions for
cupy.RawModule (NVRTC) or nvcc.

The loop nest becomes one grid-stride loop over the flat output index; each
loop variable is recovered from it by a division and a remainder by constant
extents (the compiler turns them into multiplications):

    extern "C" __global__ void avl_fused_...(const float* in0, const float* in1, float* out)
    {
        for (long long flat = (long long)blockIdx.x * blockDim.x + threadIdx.x; flat < 4096LL;
             flat += (long long)blockDim.x * gridDim.x) {
            const int f = (int)flat;
            const int i1 = f % 64;
            const int i0 = (f / 64);
            ...
        }
    }

The grid-stride counter is a long long (it cannot wrap, whatever the
launch); the index arithmetic is int when every index fits, else long long.  Types are
C++'s builtin ones (NVRTC has no <stdint.h>); non-finite constants come from
their bits (__int_as_float).  Launch with any grid: each thread handles the
flat indexes congruent to its own.
"""
from __future__ import annotations

import numpy as np

from .render_cstyle import CStyleRenderer


class CUDARenderer(CStyleRenderer):
    language = "cuda"
    TYPES = {
        np.dtype(np.bool_): "bool",
        np.dtype(np.int8): "signed char", np.dtype(np.int16): "short",
        np.dtype(np.int32): "int", np.dtype(np.int64): "long long",
        np.dtype(np.uint8): "unsigned char", np.dtype(np.uint16): "unsigned short",
        np.dtype(np.uint32): "unsigned int", np.dtype(np.uint64): "unsigned long long",
        np.dtype(np.float32): "float", np.dtype(np.float64): "double",
    }
    WRAP = {1: "unsigned int", 2: "unsigned int", 4: "unsigned int", 8: "unsigned long long"}

    def float_from_bits(self, dtype, bits: int) -> str:
        if dtype.itemsize == 4:
            return f"__int_as_float((int)0x{bits:08x}u)"
        return f"__longlong_as_double((long long)0x{bits:016x}ULL)"

    def render_kernel(self, kernel) -> str:
        if kernel.template is not None:
            from .lower import Unfusable
            raise Unfusable(f"kernel {kernel.name} is a {kernel.template.language} template; the CUDA renderer "
                            "has none for it")
        nest = kernel.loops()
        if kernel.locals:
            from .lower import Unfusable
            raise Unfusable(f"kernel {kernel.name}: the CUDA renderer does not render reductions "
                            "(kernels with local accumulators); the group runs op by op")
        if nest is None:
            raise ValueError(f"kernel {kernel.name}: the CUDA renderer needs a perfect loop nest")
        extents = [loop.extent for loop in nest]
        total = int(np.prod(extents, dtype=object)) if extents else 1
        biggest = max([total] + [b.size for b in kernel.params])
        it = "int" if biggest < 2**31 else "long long"
        lines = [self.comment(kernel),
                 f'extern "C" __global__ void {kernel.name}({self.params(kernel)})', "{",
                 f"    for (long long flat = (long long)blockIdx.x * blockDim.x + threadIdx.x; flat < {total}LL;"
                 f" flat += (long long)blockDim.x * gridDim.x) {{"]
        if nest:
            lines.append(f"        const {it} f = ({it})flat;")
        inner = 1
        decomposed = []
        for loop in reversed(nest):
            v = loop.var.name
            scaled = "f" if inner == 1 else f"(f / {inner})"
            value = scaled if loop is nest[0] else f"{scaled} % {loop.extent}"
            decomposed.append(f"        const {it} {v} = {value};")
            inner *= loop.extent
        lines += reversed(decomposed)
        for s in kernel.innermost():
            lines += self.statement(s, "        ")
        lines += ["    }", "}"]
        return "\n".join(lines) + "\n"
