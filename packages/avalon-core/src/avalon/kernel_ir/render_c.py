"""The C renderer: kernels as C99 functions for the CPU, built with the
system compiler (avalon.runtime.native) and called through ctypes.

    AVL_EXPORT void avl_fused_...(const float* in0, const float* in1, float* out)
    {
        #pragma GCC ivdep
        for (int64_t i0 = 0; i0 < 4096; i0++) {
            const float x0 = in0[i0];
            ...
            out[i0] = t3;
        }
    }

No pointer is `restrict`: the memory planner may pass an input as `out` (an
in-place update).  That is safe for elementwise code, where each element is
read before it is written at the same index, and `#pragma GCC ivdep` tells
the compiler what it needs to vectorize without a runtime overlap check: no
dependence between iterations.  (Partial overlaps, an input that is a shifted
or broadcast view of `out`, are the caller's to avoid: the CPU backend's
wrapper checks for them.)

An elementwise kernel of at least PIECES_MIN_ELEMENTS elements (one loop
whose every load and store is at [i] or at a scalar's [0]: ir.elementwise_extent)
also gets ``NAME_part(void* const* args, int64_t lo, int64_t hi)``, the same
loop over [lo, hi), its buffers in one array of pointers: the segments' driver
runs it in pieces across its threads when the caller set product threads
(avalon.runtime.segments), as it splits large matrix products.

`FLAGS` are the compiler flags the kernels are exact under: no FMA
contraction (-ffp-contract=off: a*b+c rounds twice, as in NumPy), no errno
(math calls become pure, so sqrt is one instruction), IEEE semantics
otherwise (no -ffast-math).  float32 math calls the float functions (expf,
logf, tanhf), float64 the double ones; `CRenderer(vector_math=...)` adds
declarations that let gcc call their vector versions (glibc's libmvec).
bool buffers are uint8_t arrays (gcc 12 does not vectorize loads through
bool*); bool locals are int (0 or 1): gcc 12 vectorizes no loop holding a
one-byte bool next to floats (a comparison cast to float, BCE's gradient),
and does with int.
"""
from __future__ import annotations

from .ir import KernelIRError, Store, Update, elementwise_extent
from .render_cstyle import CStyleRenderer

#: elementwise kernels of at least this many elements also get a NAME_part entry
#: running a range of the loop, which the segments' driver splits across its threads
#: (a hand-off costs 1-2 us; a kernel this size streams ~0.4 MB, 15-30 us)
PIECES_MIN_ELEMENTS = 1 << 15
PART_SUFFIX = "_part"


def has_part(kernel) -> bool:
    """Whether the C renderer gives `kernel` a NAME_part entry (see render_part)."""
    extent = elementwise_extent(kernel)
    return extent is not None and extent >= PIECES_MIN_ELEMENTS


#: NumPy's float maximum/minimum as functions of three selects (a NaN first operand
#: wins, then a NaN second one; ties give the second): gcc 12 vectorizes loops calling
#: them, not the one-expression form `((a > b) | (a != a)) ? a : b` once its results
#: chain through several statements (a max-pooling window)
_MAXMIN = "".join(
    f"static inline {t} avl_{fn}_{name}({t} a, {t} b) "
    f"{{ {t} m = a {cmp} b ? a : b; m = b != b ? b : m; return a != a ? a : m; }}\n"
    for t, name in (("float", "f32"), ("double", "f64")) for fn, cmp in (("max", ">"), ("min", "<")))


#: float32 exp whose vector call (glibc's libmvec) never takes its scalar path.
#: libmvec's expf computes arguments below ln(FLT_MIN) = -87.3365 (results that
#: are denormal or 0) lane by lane with scalar expf, 30x slower per element, and
#: a saturated sigmoid's logits go there as training goes (a VAE's step doubled).
#: The argument is raised to -87.3365 there and the result set to 0, which is
#: what flushing denormals (compiled calls' default) gives; with IEEE denormals
#: (flush_denormals=False) those results are 0 instead of denormals.  The raise
#: is an addition, not a select: gcc turns expf(x < c ? c : x) into a select of
#: expf(c) and expf(x), which hands x to expf after all.
_EXP_F32 = ("static inline float avl_exp_f32(float x) {\n"
            "    const float r = expf(x + (x < -87.3365f ? -87.3365f - x : 0.0f));\n"
            "    return x < -87.33654475f ? 0.0f : r;\n"
            "}\n")


class CRenderer(CStyleRenderer):
    language = "c"
    FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off")
    FUNCS = {**CStyleRenderer.FUNCS,
             "exp": {**CStyleRenderer.FUNCS["exp"], "float32": "avl_exp_f32({0})"},
             "max": {**CStyleRenderer.FUNCS["max"], "float32": "avl_max_f32({0}, {1})",
                     "float64": "avl_max_f64({0}, {1})"},
             "min": {**CStyleRenderer.FUNCS["min"], "float32": "avl_min_f32({0}, {1})",
                     "float64": "avl_min_f64({0}, {1})"}}

    def __init__(self, vector_math: str = ""):
        # declarations after <math.h> that let the compiler call vector versions of
        # the math functions (avalon.runtime.native.simd_math_declarations(): glibc's
        # libmvec), so loops calling expf or tanhf vectorize too
        self.vector_math = vector_math

    def prelude(self) -> str:
        return ("#include <stdbool.h>\n#include <stdint.h>\n#include <stdlib.h>\n#include <string.h>\n#include <math.h>\n"
                + self.vector_math +
                "#if defined(__GNUC__)\n#define AVL_EXPORT __attribute__((visibility(\"default\")))\n"
                "#else\n#define AVL_EXPORT\n#endif\n"
                "static inline float avl_f32_bits(uint32_t u) { float f; memcpy(&f, &u, sizeof f); return f; }\n"
                "static inline double avl_f64_bits(uint64_t u) { double f; memcpy(&f, &u, sizeof f); return f; }\n"
                + _MAXMIN + _EXP_F32)

    def float_from_bits(self, dtype, bits: int) -> str:
        if dtype.itemsize == 4:
            return f"avl_f32_bits(0x{bits:08x}u)"
        return f"avl_f64_bits(0x{bits:016x}ULL)"

    # gcc 12 does not vectorize loops that load through a bool pointer (it does
    # through uint8_t): bool buffers are uint8_t arrays of 0 and 1, locals stay bool
    def buffer_type(self, dtype) -> str:
        return "uint8_t" if dtype.kind == "b" else self.c_type(dtype)

    # a loop holding a bool local next to float ones is not vectorized by gcc 12
    # ("no vectype"); with int locals (comparisons give 0 or 1 either way) it is
    def local_type(self, dtype) -> str:
        return "int" if dtype.kind == "b" else self.c_type(dtype)

    def load(self, e) -> str:
        text = super().load(e)
        return f"({text} != 0)" if e.dtype.kind == "b" else text

    def loop(self, loop, indent, start="0", stop=None):
        lines = super().loop(loop, indent, start, stop)
        if loop.lanes:
            # kept a loop (not unrolled), the lanes loop is what gcc vectorizes: one vector
            # of accumulators, math calls through their vector versions (libmvec); fully
            # unrolled, gcc would vectorize the loop around it as an in-order float
            # reduction or call the math functions lane by lane (2x slower for log1p/exp)
            lines.insert(0, f"{indent}#pragma GCC unroll 1")
        elif not any(hasattr(s, "extent") for s in loop.body) and not _writes_local(loop.body):
            # the innermost loop; one updating an accumulator carries a dependence ivdep must not deny
            lines.insert(0, f"{indent}#pragma GCC ivdep")
        return lines

    def render_kernel(self, kernel) -> str:
        if kernel.template is not None:
            return self.render_template(kernel)
        lines = [self.comment(kernel), f"AVL_EXPORT void {kernel.name}({self.params(kernel)})", "{"]
        lines += self.locals(kernel, "    ")
        for s in kernel.body:
            lines += self.statement(s, "    ")
        lines.append("}")
        if has_part(kernel):
            lines += self.render_part(kernel)
        return "\n".join(lines) + "\n"

    def render_part(self, kernel) -> list[str]:
        """NAME_part(args, lo, hi): the elementwise kernel's loop over [lo, hi)
        only, its buffers passed as one array of pointers (one signature for
        every kernel: the segments' driver runs the pieces on its threads)."""
        lines = [f"AVL_EXPORT void {kernel.name}{PART_SUFFIX}(void* const* args, int64_t lo, int64_t hi)", "{"]
        for k, b in enumerate(kernel.params):
            t = ("const " if b.role == "in" else "") + self.buffer_type(b.dtype)
            lines.append(f"    {t}* {b.name} = ({t}*)args[{k}];")
        lines += self.loop(kernel.body[0], "    ", "lo", "hi")
        lines.append("}")
        return lines

    def render_template(self, kernel) -> str:
        """A kernel whose body is a C template (kernel_ir.conv_templates): its
        helpers (once per translation unit, under their guard), then the function."""
        t = kernel.template
        if t.language != self.language:
            raise KernelIRError(f"kernel {kernel.name} is a {t.language} template; the {self.language} "
                                "renderer cannot render it")
        return (t.helpers + self.comment(kernel) + "\n"
                + f"AVL_EXPORT void {kernel.name}({self.params(kernel)})\n{{\n{t.body}}}\n")


def _writes_local(stmts) -> bool:
    return any(isinstance(s, (Store, Update)) and s.buffer.role == "local" for s in stmts)
