"""Avalon's kernel generator: a loop-level kernel IR, lowering of fused
elementwise groups (and the sum, max or min a group may end in: loop nests
with per-lane accumulators) to it, and renderers to C (CPU) and CUDA (which
refuses reductions: those groups run op by op there).

    body (a fused group's Graph)  --lower-->  Kernel  --CRenderer / CUDARenderer-->  source

- `ir`: the IR (`Kernel`, `Loop`, `Let`, `Store`, `Update`, local buffers, typed expressions), its
  text form (`str(kernel)`) and its verifier (`verify`).
- `lower`: `lower(body)` -> Kernel; `Unfusable` when a group has no exact kernel.
- `render_cstyle`, `render_c`, `render_cuda`: `CStyleRenderer` and its C and
  CUDA subclasses; `render_module(kernels)` puts several kernels in one
  translation unit.
- `glue`: the `lower` rules of the batch-innermost glue ops (im2col, col2im,
  max pooling) and of the direct convolutions.
- `conv_templates`: direct convolutions and their gradients as C templates
  (`Kernel.template`: a body written for one target, which the C renderer
  emits and the CUDA renderer refuses).

The CPU backend builds fused groups with the C renderer when a C compiler is
available (avalon.backends.cpu_native); AVALON_NATIVE=0 keeps the NumPy path.
"""
from .ir import (Binary, Buffer, Call, Cast, Const, Expr, Index, Kernel, KernelIRError, Let, Load, Loop,
                 Select, Store, Unary, Var, elementwise_extent, verify)
from .lower import Unfusable, lower
from .render_c import CRenderer
from .render_cstyle import CStyleRenderer
from .render_cuda import CUDARenderer

__all__ = ["Binary", "Buffer", "Call", "Cast", "Const", "Expr", "Index", "Kernel", "KernelIRError", "Let",
           "Load", "Loop", "Select", "Store", "Unary", "Var", "verify", "elementwise_extent", "Unfusable", "lower",
           "CStyleRenderer", "CRenderer", "CUDARenderer"]
