"""Direct convolutions of batch-innermost activations as C templates.

A convolution of activations stored (C, H, W, N) (avalon.passes.layout) with
stride 1 and no dilation reads, for output row y and kernel offset (dy, dx),
the input row y + dy - pad shifted by (dx - pad) * N elements: an output row
is a contiguous run of W * N values, and so is every input row it reads.  The
convolution is then a matrix product whose right operand (the im2col columns)
is never built: the kernels read shifted input rows in place (an "implicit
GEMM").  Each is a register-blocked loop nest (Inductor's CPP GEMM template and
BLAS micro-kernels do the same): a block of output channels times a few
vectors of a row held in vector registers, fed by one broadcast weight and one
vector load per multiply-add, so the arithmetic runs near the core's peak
(measured 110-135 GFLOP/s per core against 55-80 for OpenBLAS's sgemm on the
im2col columns, which are never written either).

* forward: y[o, y, x, n] = sum_{c, dy, dx} w[o, c, dy, dx] x[c, y+dy-ph, x+dx-pw, n];
* input gradient: the forward of the cotangent with the weight flipped and its
  channels swapped, padding k - 1 - pad;
* weight gradient: for each (o, c, dy, dx) the dot product of a cotangent row
  and the shifted input row, summed over rows, with per-lane accumulators (a
  block of output channels times a block of taps at a time).

The kernels' vectors are 64 bytes: buffers aligned to a cache line (the CPU
backend's `buffer`) keep the loads from straddling two lines, which made the
weight gradient 25-40% slower.

With a stride s > 1 (the forward and the weight gradient), output column x
reads input column s*x + dx - pad: the N images of one column are still
contiguous, the columns are not, so each vector is read from its own column
(the batch must be a whole number of vectors: glue.STRIDED_BATCH_MULTIPLE).

Kernel offsets that read padding are skipped, not multiplied by zero: for each
output row the valid dy range, and for each run of output columns the valid dx
range, are worked out as the loops go (a column run splits only at the edges).
A weight that is inf or NaN must still make the outputs it meets in the
padding NaN (0 * inf, as the zeros of im2col's columns do): the forward checks
its weights (a pass over a few thousand values) and runs on a zero-padded copy
of its input when one is not finite.  The input gradient needs nothing (col2im
drops what falls outside too).  The weight gradient's taps that read padding
read a row of zeros instead (so its inner loop has no branch): an inf in the
cotangent meeting them gives NaN, as im2col's zero columns do.

Sums are in another order than im2col + BLAS (and use fused multiply-adds), so
results agree with the NumPy kernels to rounding, not bit for bit.  The code is
plain C with GCC vector extensions (GCC and Clang): 64-byte vectors where the
target has AVX-512, 32-byte ones otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Template:
    """A kernel body written by hand for one target: `label` is its text form
    (what `str(kernel)` shows), `helpers` code the body calls (emitted once per
    translation unit under `guard`), `body` the statements of the function, over
    the kernel's buffer names."""
    label: str
    language: str
    guard: str
    helpers: str
    body: str


_CTYPE = {np.dtype(np.float32): ("float", "f32"), np.dtype(np.float64): ("double", "f64")}

#: output channels x row vectors held in registers by the forward's micro-kernel
FWD_CHANNELS, FWD_VECTORS = 6, 4
#: output channels x taps (input channel, dy, dx) held by the weight gradient's
WG_CHANNELS, WG_PAIRS = 4, 6


def supported(dtype) -> bool:
    return np.dtype(dtype) in _CTYPE


def _helpers(dtype) -> tuple[str, str]:
    t, s = _CTYPE[np.dtype(dtype)]
    guard = f"AVL_CONV_HELPERS_{s.upper()}"
    ob, nv, wo, wp = FWD_CHANNELS, FWD_VECTORS, WG_CHANNELS, WG_PAIRS
    code = f"""#ifndef {guard}
#define {guard}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif
#if defined(__AVX512F__)
#define AVL_CONV_VBYTES 64
#else
#define AVL_CONV_VBYTES 32
#endif
typedef {t} avl_cv_{s} __attribute__((vector_size(AVL_CONV_VBYTES), aligned(sizeof({t}))));
#define AVL_CL_{s} ((int64_t)(AVL_CONV_VBYTES / sizeof({t})))

static inline int64_t avl_cmax(int64_t a, int64_t b) {{ return a > b ? a : b; }}
static inline int64_t avl_cmin(int64_t a, int64_t b) {{ return a < b ? a : b; }}

/* the kernel offsets dx reading inside the input for output column x (stride sw) */
static inline void avl_dx_range(int64_t x, int64_t W, int64_t KW, int64_t pw, int64_t sw, int64_t* lo, int64_t* hi)
{{
    *lo = avl_cmax(0, pw - x * sw);
    *hi = avl_cmin(KW, W + pw - x * sw);
}}

/* the offset in an input row of output lane j of a row (column j / Nb, image j % Nb) for dx = 0 */
static inline int64_t avl_lane_offset(int64_t j, int64_t Nb, int64_t sw, int64_t pw)
{{
    return (sw == 1 ? j : j + (j / Nb) * (sw - 1) * Nb) - pw * Nb;
}}

/* the end of the run of output columns from xa whose in-bounds kernel offsets dx are xa's, [lo, hi) */
static inline int64_t avl_dx_run(int64_t xa, int64_t Wo, int64_t W, int64_t KW, int64_t pw, int64_t sw,
                                 int64_t* lo, int64_t* hi)
{{
    int64_t lo2, hi2, xb = xa + 1;
    avl_dx_range(xa, W, KW, pw, sw, lo, hi);
    for (; xb < Wo; xb++) {{
        avl_dx_range(xb, W, KW, pw, sw, &lo2, &hi2);
        if (lo2 != *lo || hi2 != *hi) break;
    }}
    return xb;
}}

/* y[o0 + o, j .. j + nv*lanes) for one output row: x holds C input rows of L
   elements (row yi0 + dy of channel c at (c*H + yi0 + dy)*L), vector v read
   from xoff[v] + dx*Nb (with a stride, vectors of one column are contiguous,
   the columns are not); wt is (C, KH, KW, OP) */
static inline __attribute__((always_inline)) void avl_conv_tile_{s}(
    const {t}* x, const {t}* wt, {t}* y, int64_t nv, int64_t C, int64_t H, int64_t L, int64_t Nb,
    int64_t KH, int64_t KW, int64_t OP, int64_t o0, int64_t ob, int64_t yi0, int64_t dylo, int64_t dyhi,
    int64_t dxlo, int64_t dxhi, const int64_t* xoff, int64_t yj, int64_t ostride)
{{
    avl_cv_{s} acc[{ob}][{nv}];
    for (int o = 0; o < {ob}; o++)
        for (int v = 0; v < {nv}; v++)
            for (int l = 0; l < AVL_CL_{s}; l++) acc[o][v][l] = 0;
    for (int64_t c = 0; c < C; c++)
        for (int64_t dy = dylo; dy < dyhi; dy++) {{
            const {t}* row = x + (c * H + yi0 + dy) * L;
            const {t}* w = wt + ((c * KH + dy) * KW) * OP + o0;
            for (int64_t dx = dxlo; dx < dxhi; dx++) {{
                const {t}* p = row + dx * Nb;
                const {t}* wd = w + dx * OP;
                avl_cv_{s} xv[{nv}];
                for (int v = 0; v < nv; v++) xv[v] = *(const avl_cv_{s}*)(p + xoff[v]);
                for (int o = 0; o < {ob}; o++) {{
                    const {t} wv = wd[o];
                    for (int v = 0; v < nv; v++) acc[o][v] += wv * xv[v];
                }}
            }}
        }}
    for (int o = 0; o < ob; o++)
        for (int v = 0; v < nv; v++)
            *(avl_cv_{s}*)(y + (o0 + o) * ostride + yj + v * AVL_CL_{s}) = acc[o][v];
}}

/* the same for one element at a time (the end of a run shorter than a vector) */
static inline void avl_conv_scalar_{s}(
    const {t}* x, const {t}* wt, {t}* y, int64_t C, int64_t H, int64_t L, int64_t Nb, int64_t KH, int64_t KW,
    int64_t OP, int64_t o0, int64_t ob, int64_t yi0, int64_t dylo, int64_t dyhi, int64_t dxlo, int64_t dxhi,
    int64_t xj, int64_t yj, int64_t ostride)
{{
    {t} acc[{ob}] = {{0}};
    for (int64_t c = 0; c < C; c++)
        for (int64_t dy = dylo; dy < dyhi; dy++)
            for (int64_t dx = dxlo; dx < dxhi; dx++) {{
                const {t} xv = x[(c * H + yi0 + dy) * L + xj + dx * Nb];
                const {t}* wd = wt + ((c * KH + dy) * KW + dx) * OP + o0;
                for (int o = 0; o < {ob}; o++) acc[o] += wd[o] * xv;
            }}
    for (int o = 0; o < ob; o++) y[(o0 + o) * ostride + yj] = acc[o];
}}

/* out (O, Ho, Wo, Nb) = conv of x (C, H, W, Nb) with wt (C, KH, KW, OP), OP the
   output channels rounded up to the block (zero weights past O) */
/* one compiled copy per translation unit, whatever the shapes: gcc would otherwise clone it for each
   kernel's constants, and compile each clone's unrolled tiles again (seconds per graph) */
static __attribute__((noinline, noclone)) void avl_conv_rows_{s}(const {t}* x, const {t}* wt, {t}* out, int64_t C, int64_t H, int64_t W,
                              int64_t Nb, int64_t O, int64_t OP, int64_t Ho, int64_t Wo, int64_t KH, int64_t KW,
                              int64_t ph, int64_t pw, int64_t sh, int64_t sw)
{{
    const int64_t L = W * Nb, Lo = Wo * Nb, ostride = Ho * Lo;
    const int64_t wide = {nv} * AVL_CL_{s};
    for (int64_t o0 = 0; o0 < O; o0 += {ob}) {{
        const int64_t ob = avl_cmin({ob}, O - o0);
        for (int64_t yo = 0; yo < Ho; yo++) {{
            const int64_t dylo = avl_cmax(0, ph - yo * sh), dyhi = avl_cmin(KH, H + ph - yo * sh);
            const int64_t yi0 = yo * sh - ph;
            int64_t xa = 0;
            while (xa < Wo) {{
                int64_t lo, hi, xoff[{nv}];
                const int64_t xb = avl_dx_run(xa, Wo, W, KW, pw, sw, &lo, &hi);
                int64_t j = xa * Nb;
                const int64_t end = xb * Nb;
                if (dylo < dyhi && lo < hi) {{
                    for (; j + wide <= end; j += wide) {{
                        for (int v = 0; v < {nv}; v++) xoff[v] = avl_lane_offset(j + v * AVL_CL_{s}, Nb, sw, pw);
                        avl_conv_tile_{s}(x, wt, out, {nv}, C, H, L, Nb, KH, KW, OP, o0, ob, yi0, dylo, dyhi,
                                          lo, hi, xoff, yo * Lo + j, ostride);
                    }}
                    for (; j + AVL_CL_{s} <= end; j += AVL_CL_{s}) {{
                        xoff[0] = avl_lane_offset(j, Nb, sw, pw);
                        avl_conv_tile_{s}(x, wt, out, 1, C, H, L, Nb, KH, KW, OP, o0, ob, yi0, dylo, dyhi,
                                          lo, hi, xoff, yo * Lo + j, ostride);
                    }}
                    for (; j < end; j++)
                        avl_conv_scalar_{s}(x, wt, out, C, H, L, Nb, KH, KW, OP, o0, ob, yi0, dylo, dyhi,
                                            lo, hi, avl_lane_offset(j, Nb, sw, pw), yo * Lo + j, ostride);
                }} else {{
                    for (int64_t o = 0; o < ob; o++)
                        for (int64_t k = j; k < end; k++) out[(o0 + o) * ostride + yo * Lo + k] = 0;
                }}
                xa = xb;
            }}
        }}
    }}
}}

/* whether a[0 .. n) holds no inf or NaN */
static inline int avl_all_finite_{s}(const {t}* a, int64_t n)
{{
    int ok = 1;
    for (int64_t i = 0; i < n; i++) ok &= (a[i] - a[i]) == 0;
    return ok;
}}

/* avl_conv_rows on a zero-padded copy of x, every kernel offset multiplied in: a weight that is inf
   or NaN then makes the outputs it meets in the padding NaN (0 * inf), as the columns' zeros do */
static __attribute__((noinline)) void avl_conv_padded_{s}(const {t}* x, const {t}* wt, {t}* out, int64_t C,
        int64_t H, int64_t W, int64_t Nb, int64_t O, int64_t OP, int64_t Ho, int64_t Wo, int64_t KH, int64_t KW,
        int64_t ph, int64_t pw, int64_t sh, int64_t sw)
{{
    const int64_t Hp = avl_cmax(H + ph, (Ho - 1) * sh + KH), Wp = avl_cmax(W + pw, (Wo - 1) * sw + KW);
    {t}* xp = ({t}*)calloc((size_t)(C * Hp * Wp * Nb), sizeof({t}));
    if (!xp) return;
    for (int64_t c = 0; c < C; c++)
        for (int64_t y = 0; y < H; y++)
            memcpy(xp + ((c * Hp + y + ph) * Wp + pw) * Nb, x + (c * H + y) * W * Nb, (size_t)(W * Nb) * sizeof({t}));
    avl_conv_rows_{s}(xp, wt, out, C, Hp, Wp, Nb, O, OP, Ho, Wo, KH, KW, 0, 0, sh, sw);
    free(xp);
}}

/* what a tap reads where it falls in the padding: zeros, so that the inner loop multiplies every tap of
   a block without a branch (and 0 * an inf cotangent is NaN there, as im2col's zero columns make it) */
#define AVL_WG_ZEROS 4096
static const {t} avl_wg_zeros_{s}[AVL_WG_ZEROS + 64];

/* acc[o][q] += n vectors of the cotangent rows (from grow[o] + j) times the input rows (from xrow[q]) */
static inline __attribute__((always_inline)) void avl_wg_tile_{s}(avl_cv_{s} acc[{wo}][{wp}], const {t}* const* grow,
        const {t}* const* xrow, int64_t j, int64_t n)
{{
    for (int64_t v = 0; v < n; v++) {{
        avl_cv_{s} gv[{wo}];
        for (int o = 0; o < {wo}; o++) gv[o] = *(const avl_cv_{s}*)(grow[o] + j + v * AVL_CL_{s});
        for (int q = 0; q < {wp}; q++) {{
            const avl_cv_{s} xv = *(const avl_cv_{s}*)(xrow[q] + v * AVL_CL_{s});
            for (int o = 0; o < {wo}; o++) acc[o][q] += gv[o] * xv;
        }}
    }}
}}

/* the same one lane at a time (the end of a run shorter than a vector) */
static inline void avl_wg_lanes_{s}({t} tail[{wo}][{wp}], const {t}* const* grow, const {t}* const* xrow,
                                    int64_t j, int64_t r, int64_t n)
{{
    for (int64_t v = 0; v < n; v++)
        for (int q = 0; q < {wp}; q++)
            for (int o = 0; o < {wo}; o++) tail[o][q] += grow[o][j + v] * xrow[q][r + v];
}}

/* dw (O, C, KH, KW) = sum over rows of g (O, Ho, Wo, Nb) times shifted rows of x (C, H, W, Nb): for a
   block of output channels and a block of taps (c, dy, dx), per-lane accumulators over every row; a run
   of output columns whose taps read the same padding is cut into chunks of at most AVL_WG_ZEROS lanes,
   in each of which a tap reads its input row or the zeros */
static __attribute__((noinline, noclone)) void avl_conv_wgrad_{s}(const {t}* x, const {t}* g, {t}* dw, int64_t C, int64_t H, int64_t W,
                               int64_t Nb, int64_t O, int64_t Ho, int64_t Wo, int64_t KH, int64_t KW,
                               int64_t ph, int64_t pw, int64_t sh, int64_t sw)
{{
    const int64_t L = W * Nb, Lo = Wo * Nb, K = C * KH * KW;
    const int64_t chunk = AVL_WG_ZEROS;     /* lanes: a multiple of the vector */
    for (int64_t o0 = 0; o0 < O; o0 += {wo}) {{
        const int64_t ob = avl_cmin({wo}, O - o0);
        for (int64_t k0 = 0; k0 < K; k0 += {wp}) {{
            const int64_t kb = avl_cmin({wp}, K - k0);
            int64_t pc[{wp}], py[{wp}], pd[{wp}];
            for (int q = 0; q < {wp}; q++) {{
                const int64_t k = k0 + (q < kb ? q : 0);
                pc[q] = k / (KH * KW);
                py[q] = k / KW % KH;
                pd[q] = k % KW;
            }}
            avl_cv_{s} acc[{wo}][{wp}];
            {t} tail[{wo}][{wp}];
            for (int o = 0; o < {wo}; o++)
                for (int q = 0; q < {wp}; q++) {{
                    tail[o][q] = 0;
                    for (int l = 0; l < AVL_CL_{s}; l++) acc[o][q][l] = 0;
                }}
            for (int64_t yo = 0; yo < Ho; yo++) {{
                const {t}* grow[{wo}];
                for (int o = 0; o < {wo}; o++) grow[o] = g + ((o0 + (o < ob ? o : 0)) * Ho + yo) * Lo;
                int rowok[{wp}];
                for (int q = 0; q < {wp}; q++) {{
                    const int64_t yi = yo * sh + py[q] - ph;
                    rowok[q] = q < kb && yi >= 0 && yi < H;
                }}
                int64_t xa = 0;
                while (xa < Wo) {{
                    int64_t lo, hi;
                    const int64_t xb = avl_dx_run(xa, Wo, W, KW, pw, sw, &lo, &hi);
                    int on[{wp}];
                    const {t}* xrow[{wp}];
                    for (int q = 0; q < {wp}; q++) on[q] = rowok[q] && pd[q] >= lo && pd[q] < hi;
                    if (sw == 1) {{
                        /* the run's lanes are contiguous in g and in every input row */
                        for (int64_t j0 = xa * Nb; j0 < xb * Nb; j0 += chunk) {{
                            const int64_t n = avl_cmin(chunk, xb * Nb - j0), jx0 = j0 - pw * Nb;
                            for (int q = 0; q < {wp}; q++)
                                xrow[q] = on[q] ? x + (pc[q] * H + yo * sh + py[q] - ph) * L + pd[q] * Nb + jx0
                                                : avl_wg_zeros_{s};
                            avl_wg_tile_{s}(acc, grow, xrow, j0, n / AVL_CL_{s});
                            const int64_t done = n / AVL_CL_{s} * AVL_CL_{s};
                            avl_wg_lanes_{s}(tail, grow, xrow, j0 + done, done, n - done);
                        }}
                    }} else {{
                        /* a whole number of vectors per column (glue.STRIDED_BATCH_MULTIPLE), column by column */
                        for (int64_t xo = xa; xo < xb; xo++)
                            for (int64_t v0 = 0; v0 < Nb; v0 += chunk) {{
                                const int64_t n = avl_cmin(chunk, Nb - v0), jx0 = (xo * sw - pw) * Nb + v0;
                                for (int q = 0; q < {wp}; q++)
                                    xrow[q] = on[q] ? x + (pc[q] * H + yo * sh + py[q] - ph) * L + pd[q] * Nb + jx0
                                                    : avl_wg_zeros_{s};
                                avl_wg_tile_{s}(acc, grow, xrow, xo * Nb + v0, n / AVL_CL_{s});
                            }}
                    }}
                    xa = xb;
                }}
            }}
            for (int o = 0; o < ob; o++)
                for (int q = 0; q < kb; q++) {{
                    {t} s = tail[o][q];
                    for (int l = 0; l < AVL_CL_{s}; l++) s += acc[o][q][l];
                    dw[((o0 + o) * C + pc[q]) * KH * KW + py[q] * KW + pd[q]] = s;
                }}
        }}
    }}
}}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
#endif
"""
    return guard, code


def _padded(o: int) -> int:
    return -(-o // FWD_CHANNELS) * FWD_CHANNELS


def _weights_block(t, name, src, cin, cout, kh, kw, flip):
    """Declare and fill `name` (cin, kh, kw, OP) from the weight src (O, C, KH, KW):
    forward: [c][dy][dx][o] = w[o][c][dy][dx]; flipped (input gradient, cin = O,
    cout = C): [o][dy][dx][c] = w[o][c][KH-1-dy][KW-1-dx]."""
    op = _padded(cout)
    if flip:
        read = f"{src}[((i * {cout} + j) * {kh} + ({kh} - 1 - dy)) * {kw} + ({kw} - 1 - dx)]"
    else:
        read = f"{src}[((j * {cin} + i) * {kh} + dy) * {kw} + dx]"
    return (f"    {t}* {name} = ({t}*)calloc({cin * kh * kw * op}, sizeof({t}));\n"
            f"    if (!{name}) return;\n"
            f"    for (int64_t i = 0; i < {cin}; i++)\n"
            f"        for (int64_t dy = 0; dy < {kh}; dy++)\n"
            f"            for (int64_t dx = 0; dx < {kw}; dx++)\n"
            f"                for (int64_t j = 0; j < {cout}; j++)\n"
            f"                    {name}[((i * {kh} + dy) * {kw} + dx) * {op} + j] = {read};\n")


def conv_forward(dtype, *, channels, out_channels, spatial, out_spatial, batch, kernel, pad_lo, stride=(1, 1),
                 x="x", w="w", out="out") -> Template:
    """out (O, Ho, Wo, N) = conv of x (C, H, W, N) with w (O, C, KH, KW), stride 1,
    padding pad_lo before each axis (what comes after follows from the shapes)."""
    return _rows(dtype, "conv_csn_forward", x, w, out, channels, out_channels, spatial, out_spatial, batch,
                 kernel, pad_lo, flip=False, stride=tuple(stride))


def conv_input_grad(dtype, *, channels, out_channels, spatial, out_spatial, batch, kernel, pad_lo, stride=(1, 1),
                    g="g", w="w", out="out") -> Template:
    """out (C, H, W, N), the gradient of conv_forward's input, from the cotangent
    g (O, Ho, Wo, N): the forward of g with the flipped weight, padding k-1-pad."""
    if tuple(stride) != (1, 1):
        raise ValueError(f"conv_input_grad: the template takes stride 1, not {tuple(stride)}")
    flipped = tuple(k - 1 - p for k, p in zip(kernel, pad_lo))
    return _rows(dtype, "conv_csn_input_grad", g, w, out, out_channels, channels, out_spatial, spatial, batch,
                 kernel, flipped, flip=True)


def _rows(dtype, label, src, w, out, cin, cout, spatial, out_spatial, batch, kernel, pads, flip, stride=(1, 1)):
    t, s = _CTYPE[np.dtype(dtype)]
    guard, helpers = _helpers(dtype)
    (h, wd), (ho, wo), (kh, kw), (ph, pw) = spatial, out_spatial, kernel, pads
    args = (f"{src}, wt, {out}, {cin}, {h}, {wd}, {batch}, {cout}, {_padded(cout)}, "
            f"{ho}, {wo}, {kh}, {kw}, {ph}, {pw}, {stride[0]}, {stride[1]}")
    if flip:   # the input gradient: col2im drops what falls outside too, so skipping is exact
        run = f"    avl_conv_rows_{s}({args});\n"
    else:
        run = (f"    if (avl_all_finite_{s}(wt, {cin * kh * kw * _padded(cout)}))\n"
               f"        avl_conv_rows_{s}({args});\n"
               f"    else\n        avl_conv_padded_{s}({args});\n")
    body = _weights_block(t, "wt", w, cin, cout, kh, kw, flip) + run + "    free(wt);\n"
    text = (f"{label} template: in {cin} x {h}x{wd} x {batch} -> out {cout} x {ho}x{wo} x {batch}, "
            f"kernel {kh}x{kw}, padding ({ph}, {pw}){_stride_text(stride)}{', weight flipped' if flip else ''}; "
            f"{FWD_CHANNELS} channels x {FWD_VECTORS} vectors a tile")
    return Template(text, "c", guard, helpers, body)


def _stride_text(stride):
    return "" if tuple(stride) == (1, 1) else f", stride {tuple(stride)}"


def conv_weight_grad(dtype, *, channels, out_channels, spatial, out_spatial, batch, kernel, pad_lo, stride=(1, 1),
                     x="x", g="g", out="out") -> Template:
    """out (O, C, KH, KW): the gradient of conv_forward's weight from its input x
    and the cotangent g."""
    t, s = _CTYPE[np.dtype(dtype)]
    guard, helpers = _helpers(dtype)
    (h, wd), (ho, wo), (kh, kw), (ph, pw) = spatial, out_spatial, kernel, pad_lo
    body = (f"    avl_conv_wgrad_{s}({x}, {g}, {out}, {channels}, {h}, {wd}, {batch}, {out_channels}, "
            f"{ho}, {wo}, {kh}, {kw}, {ph}, {pw}, {stride[0]}, {stride[1]});\n")
    text = (f"conv_csn_weight_grad template: in {channels} x {h}x{wd} x {batch}, cotangent {out_channels} x "
            f"{ho}x{wo} x {batch} -> {out_channels}x{channels}x{kh}x{kw}, padding ({ph}, {pw}){_stride_text(stride)}; "
            f"{WG_CHANNELS} channels x {WG_PAIRS} taps a tile")
    return Template(text, "c", guard, helpers, body)
