"""The kernel IR (avalon.kernel_ir): lowering of fused bodies, the text form
(golden), the verifier, and the C and CUDA renderers (compiled with cc and nvcc
where they work)."""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest

import avalon
from avalon import passes
from avalon.errors import GraphError
from avalon.kernel_ir import (Binary, Buffer, Call, Const, CRenderer, CUDARenderer, Index, Kernel, KernelIRError,
                              Let, Load, Loop, Store, Unfusable, Var, lower, verify)
from avalon.kernel_ir.lower import collapse, broadcast_strides, parse_template
from avalon.primitive import PRIMITIVES
from avalon.testing.bodies import body_of

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def chain_body(shape=(4, 8)):
    return body_of([(shape, F32), (shape, F32)],
                   lambda op, x, y: op("add", op("tanh", op("mul", x, y)), (1.0, F32)))


def broadcast_body():
    return body_of([((4, 1), F32), ((1, 8), F32)], lambda op, col, row: op("sigmoid", op("sub", col, row)))


def where_body():
    return body_of([((3, 5), F32), ((3, 1), F32), ((), np.bool_)],
                   lambda op, x, y, flag: op("where", op("ne", op("gt", x, y), flag),
                                             op("maximum", x, (0.0, F32)), op("mul", y, (0.5, F32))))


# -- golden text forms --------------------------------------------------------------------------------------

GOLDEN_CHAIN = """\
kernel chain(in0: f32[32], in1: f32[32]) -> (out: f32[32]) {
  for i0 in [0, 32) {
    let x0: f32 = in0[i0]
    let x1: f32 = in1[i0]
    let t2: f32 = (x0 * x1)
    let t3: f32 = tanh(t2)
    let t5: f32 = (t3 + 1.0:f32)
    out[i0] = t5
  }
}"""

GOLDEN_BROADCAST = """\
kernel bcast(in0: f32[4], in1: f32[8]) -> (out: f32[32]) {
  for i0 in [0, 4) {
    for i1 in [0, 8) {
      let x0: f32 = in0[i0]
      let x1: f32 = in1[i1]
      let t2: f32 = (x0 - x1)
      let t3_0: f32 = abs(t2)
      let t3_1: f32 = -t3_0
      let t3_2: f32 = exp(t3_1)
      let t3: f32 = (select((t2 >= 0.0:f32), 1.0:f32, t3_2) / (1.0:f32 + t3_2))
      out[i0*8 + i1] = t3
    }
  }
}"""

GOLDEN_WHERE = """\
kernel mix(in0: f32[15], in1: f32[3], in2: bool[1]) -> (out: f32[15]) {
  for i0 in [0, 3) {
    for i1 in [0, 5) {
      let x0: f32 = in0[i0*5 + i1]
      let x1: f32 = in1[i0]
      let x2: bool = in2[0]
      let t3: bool = (x0 > x1)
      let t4: bool = (t3 != x2)
      let t6: f32 = max(x0, 0.0:f32)
      let t8: f32 = (x1 * 0.5:f32)
      let t9: f32 = select(t4, t6, t8)
      out[i0*5 + i1] = t9
    }
  }
}"""


@pytest.mark.parametrize("make, name, golden", [(chain_body, "chain", GOLDEN_CHAIN),
                                                (broadcast_body, "bcast", GOLDEN_BROADCAST),
                                                (where_body, "mix", GOLDEN_WHERE)])
def test_golden_text(make, name, golden):
    kernel = lower(make(), name=name)
    assert str(kernel) == golden
    assert verify(kernel) is kernel


def test_default_names_are_hashes_of_the_code():
    a, b = lower(chain_body()), lower(chain_body())
    assert a.name == b.name and a.name.startswith("avl_fused_")
    assert lower(chain_body((8, 4))).name == a.name      # the same flat loop
    assert lower(chain_body((5, 8))).name != a.name


def test_a_traced_fused_group_lowers():
    x = np.ones((4, 5), np.float32)
    g = passes.fuse_elementwise(avalon.trace(lambda x, y: avalon.sigmoid(x * y - 1.0) * 2.0, x, x))
    body = [n for n in g.nodes if n.op == "fused"][0].attrs["body"]
    k = lower(body)
    assert [type(s).__name__ for s in k.body] == ["Loop"] and k.body[0].extent == 20


# -- loop structure ---------------------------------------------------------------------------------------------

def test_broadcast_strides():
    assert broadcast_strides((3, 4), (2, 3, 4)) == [0, 4, 1]
    assert broadcast_strides((3, 1), (3, 4)) == [1, 0]
    assert broadcast_strides((), (3, 4)) == [0, 0]
    with pytest.raises(Unfusable, match="does not broadcast"):
        broadcast_strides((3,), (4,))


def test_collapse_merges_contiguous_dims_and_drops_size_one():
    out = (2, 3, 1, 4)
    assert collapse(out, [broadcast_strides(out, out)]) == [(24, [1])]
    # a bias over the channel axis of NCHW: batch, channel, H*W
    nchw = (8, 3, 5, 5)
    assert collapse(nchw, [broadcast_strides(nchw, nchw), broadcast_strides((1, 3, 1, 1), nchw)]) == \
        [(8, [75, 0]), (3, [25, 1]), (25, [1, 0])]
    # a scalar and a full array: one flat loop
    assert collapse((6, 7), [[7, 1], [0, 0]]) == [(42, [1, 0])]
    assert collapse((3, 0, 2), [[0, 2, 1]]) == [(0, [0])]
    assert collapse((), [[]]) == []


def test_scalar_and_empty_outputs():
    scalar = lower(body_of([((), F32), ((), F32)], lambda op, x, y: op("exp", op("add", x, y))))
    assert not any(isinstance(s, Loop) for s in scalar.body)
    empty = lower(body_of([((0, 3), F32), ((1, 3), F32)], lambda op, x, y: op("exp", op("add", x, y))))
    assert empty.body[0].extent == 0 and empty.outputs[0].size == 0


# -- typing of templates --------------------------------------------------------------------------------------

def test_literals_are_weak_and_operands_are_promoted():
    k = lower(body_of([((4,), F64)], lambda op, x: op("sigmoid", x)), name="s")
    assert "1.0:f64" in str(k) and "f32" not in str(k)
    # int8 + int8 stays int8 (C would compute in int); bool and float mix: the bool is cast
    k = lower(body_of([((4,), np.int8), ((4,), np.int8)], lambda op, x, y: op("neg", op("add", x, y))))
    assert "i32" not in str(k) and "i64" not in str(k)
    k = lower(body_of([((4,), np.bool_), ((4,), F32)], lambda op, c, y: op("mul", op("cast", c, dtype=F32), y)))
    assert "f32(x0)" in str(k)


@pytest.mark.parametrize("build, reason", [
    (lambda: body_of([((4,), np.float16)], lambda op, x: op("exp", op("neg", x))), "float16"),
    (lambda: body_of([((4,), np.complex64)], lambda op, x: op("neg", op("neg", x))), "complex64"),
    (lambda: body_of([((4,), np.int32), ((4,), np.int32)], lambda op, x, y: op("pow", x, y)), "pow of int32"),
    (lambda: body_of([((4,), np.int32), ((4,), np.int32)], lambda op, x, y: op("div", x, y)), "divides int32"),
    (lambda: body_of([((4,), np.bool_)], lambda op, x: op("neg", x)), "negates a bool"),
    (lambda: body_of([((4,), np.uint8)], lambda op, x: op("sign", x)), "does not fit uint8"),
])
def test_unfusable_groups_say_why(build, reason):
    with pytest.raises(Unfusable, match=reason):
        lower(build())


def test_a_primitive_without_expr_is_unfusable(monkeypatch):
    monkeypatch.setattr(PRIMITIVES["tanh"], "expr", None)
    with pytest.raises(Unfusable, match="no C expression"):
        lower(chain_body())


def test_renderer_tables_override_templates():
    body = body_of([((4,), F32)], lambda op, x: op("tanh", x))
    k = lower(body, exprs={"tanh": "({0} * 2)"})
    assert "(x0 * 2.0:f32)" in str(k)


def test_template_parser():
    assert parse_template("(({T})1 / (({T})1 + exp(-{0})))")[0] == "bin"
    assert parse_template("({0} ? {1} : {2})") == ("sel", ("arg", 0), ("arg", 1), ("arg", 2))
    with pytest.raises(Unfusable, match="unknown function"):
        parse_template("erfcx({0})")
    with pytest.raises(Unfusable, match="cannot read"):
        parse_template("{0} @ {1}")


# -- the verifier ---------------------------------------------------------------------------------------------

def _kernel(stmts, size=8):
    a, out = Buffer("in0", F32, size, "in"), Buffer("out", F32, 8, "out")
    return Kernel("broken", (a, out), stmts), a, out


def test_verify_accepts_a_lowered_kernel():
    verify(lower(where_body()))


def test_verify_rejects_an_undefined_variable():
    k, a, out = _kernel([])
    i = Var("i0")
    k = Kernel("broken", k.params, [Loop(i, 8, [Store(out, Index((("i0", 1),)), Var("t9", F32))])])
    with pytest.raises(KernelIRError, match="t9 is used but not defined"):
        verify(k)


def test_verify_rejects_mismatched_dtypes():
    _, a, out = _kernel([])
    x = Var("x", F32)
    bad = Binary("add", x, Const(1.0, F64), F32)
    k = Kernel("broken", (a, out), [Loop(Var("i0"), 8, [Let(x, Load(a, Index((("i0", 1),)))),
                                                        Let(Var("t", F32), bad)])])
    with pytest.raises(KernelIRError, match="operands of add have dtypes f32 and f64"):
        verify(k)
    k = Kernel("broken", (a, out), [Loop(Var("i0"), 8, [Store(out, Index((("i0", 1),)), Const(1, F64))])])
    with pytest.raises(KernelIRError, match="value is f64 but the buffer holds f32"):
        verify(k)


def test_verify_rejects_an_index_out_of_bounds():
    k, a, out = _kernel([], size=4)
    k = Kernel("broken", k.params, [Loop(Var("i0"), 8, [
        Let(Var("x", F32), Load(a, Index((("i0", 1),)))),
        Store(out, Index((("i0", 1),)), Var("x", F32))])])
    with pytest.raises(KernelIRError, match=r"index i0 of in0 spans \[0, 7\], outside the buffer's 4 elements"):
        verify(k)
    assert issubclass(KernelIRError, GraphError)


def test_verify_rejects_other_broken_kernels():
    _, a, out = _kernel([])
    i = Var("i0")
    ix = Index((("i0", 1),))
    x = Var("x", F32)
    cases = {
        "x is defined twice": [Loop(i, 8, [Let(x, Load(a, ix)), Let(x, Load(a, ix))])],
        "buffer out is 'out' but is loaded from": [Loop(i, 8, [Let(x, Load(out, ix))])],
        "exp of i32": [Loop(i, 8, [Let(Var("y", np.int32), Call("exp", (Const(1, np.int32),), np.int32))])],
        "uses i1, which is not defined": [Loop(i, 8, [Let(x, Load(a, Index((("i1", 1),))))])],
    }
    for message, stmts in cases.items():
        with pytest.raises(KernelIRError, match=message):
            verify(Kernel("broken", (a, out), stmts))


# -- renderers ----------------------------------------------------------------------------------------------------

def test_c_rendering_spells_exact_c():
    src = CRenderer().render_module([lower(where_body(), name="mix"), lower(chain_body(), name="chain")])
    assert src.count("#include <math.h>") == 1 and "void mix(" in src and "void chain(" in src
    assert "restrict" not in src and "#pragma GCC ivdep" in src
    assert "tanhf(" in src and "avl_max_f32(x0, 0.0f)" in src
    # NumPy's maximum: a NaN first operand wins, then a NaN second one, ties give the second
    assert ("static inline float avl_max_f32(float a, float b) "
            "{ float m = a > b ? a : b; m = b != b ? b : m; return a != a ? a : m; }") in src
    f64 = CRenderer().render(lower(body_of([((4,), F64)], lambda op, x: op("tanh", op("exp", x)))))
    assert "tanh(" in f64 and "exp(" in f64 and "tanhf" not in f64
    ints = CRenderer().render(lower(body_of([((4,), np.int32), ((4,), np.int32)],
                                            lambda op, x, y: op("mul", op("add", x, y), y))))
    assert "((int32_t)((uint32_t)x0 + (uint32_t)x1))" in ints   # wraps as NumPy does


def _step_body():
    """BCE's gradient form: comparisons cast to float, next to float math."""
    return body_of([((64, 40), F32), ((64, 40), F32)],
                   lambda op, x, t: op("mul", op("add", op("cast", op("gt", x, (0.0, F32)), dtype=F32),
                                                 op("mul", op("cast", op("eq", x, (0.0, F32)), dtype=F32),
                                                    (0.5, F32))), t))


def test_c_bool_locals_are_int_so_gcc_vectorizes_their_loop(tmp_path):
    kernel = lower(_step_body(), name="step")
    src = CRenderer().render_module([kernel])
    assert "const bool " not in src and "const int t" in src
    version = subprocess.run(["cc", "--version"], capture_output=True, text=True)
    if version.returncode != 0 or "Free Software Foundation" not in version.stdout:
        pytest.skip("vectorization reports checked with gcc only")
    c = tmp_path / "k.c"
    c.write_text(src)
    r = subprocess.run(["cc", *CRenderer.FLAGS, "-fopt-info-vec-optimized", "-c", str(c),
                        "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "loop vectorized" in r.stderr


def test_non_finite_constants_keep_their_bits():
    body = body_of([((4,), F32)], lambda op, x: op("add", op("maximum", x, (-np.inf, F32)), (np.nan, F32)))
    k = lower(body)
    assert "-inf:f32" in str(k) and "nan:f32" in str(k)
    assert "avl_f32_bits(0xff800000u)" in CRenderer().render(k)
    assert "__int_as_float((int)0x7fc00000u)" in CUDARenderer().render(k)


def test_cuda_rendering_is_a_grid_stride_loop():
    src = CUDARenderer().render_module([lower(broadcast_body(), name="bcast")])
    assert 'extern "C" __global__ void bcast(const float* in0, const float* in1, float* out)' in src
    assert "flat += (long long)blockDim.x * gridDim.x" in src
    assert "const int i0 = (f / 8);" in src and "const int i1 = f % 8;" in src


def _bodies_for_compilers():
    return [lower(b) for b in (
        chain_body(), broadcast_body(), where_body(),
        body_of([((3, 4), np.int8), ((4,), np.int8)], lambda op, x, y: op("abs", op("mul", x, y))),
        body_of([((5,), np.uint16), ((5,), np.uint16)], lambda op, x, y: op("lt", op("mul", x, y), x)),
        body_of([((6,), F64), ((6,), F64)], lambda op, x, y: op("binary_cross_entropy", x, y)),
        body_of([((6,), F32)], lambda op, x: op("sign", op("expm1", op("log1p", x)))),
        body_of([((2, 3), np.int64)], lambda op, x: op("cast", op("neg", x), dtype=F32)),
        body_of([((0, 3), F32)], lambda op, x: op("sqrt", op("abs", x))),
    )]


def _nvcc_problem():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "nvcc is not on PATH"
    try:
        r = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvcc does not run: {e}"
    return None if r.returncode == 0 else f"nvcc --version fails: {r.stderr[-300:]}"


def test_cuda_output_compiles_with_nvcc(tmp_path):
    problem = _nvcc_problem()
    if problem:
        pytest.skip(problem)
    cu = tmp_path / "kernels.cu"
    cu.write_text(CUDARenderer().render_module(_bodies_for_compilers()))
    r = subprocess.run([shutil.which("nvcc"), "-c", "-o", str(tmp_path / "kernels.o"), str(cu)],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("cannot find" in r.stderr or "No such file" in r.stderr):
        pytest.skip(f"nvcc is installed but cannot compile here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-4000:]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) on PATH")
def test_c_output_compiles_with_cc_and_matches_numpy(tmp_path):
    from avalon.backends import get_backend
    from avalon.backends.cpu_fused import compile_fused_numpy
    bodies = [chain_body(), broadcast_body(), where_body(),
              body_of([((3, 4), np.int8), ((4,), np.int8)], lambda op, x, y: op("abs", op("mul", x, y)))]
    kernels = [lower(b) for b in bodies]
    c = tmp_path / "kernels.c"
    c.write_text(CRenderer().render_module(kernels))
    so = tmp_path / "kernels.so"
    r = subprocess.run(["cc", *CRenderer.FLAGS, "-fPIC", "-shared", "-o", str(so), str(c), "-lm"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ctypes.CDLL(str(so))
    rng = np.random.default_rng(0)
    cpu = get_backend("cpu")
    for body, kernel in zip(bodies, kernels):
        inputs = [np.asarray(rng.standard_normal(n.shape) * 50).astype(n.dtype) for n in body.inputs]
        want = compile_fused_numpy(body, cpu)(*inputs)
        got = np.empty_like(want)
        fn = getattr(lib, kernel.name)
        fn.argtypes = (ctypes.c_void_p,) * len(kernel.params)
        fn(*[a.ctypes.data for a in inputs], got.ctypes.data)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=str(kernel))


def test_a_call_a_template_repeats_is_computed_once():
    body = body_of([((16,), F32)], lambda op, x: op("tanh", x))
    text = str(lower(body, name="twice", exprs={"tanh": "tanh(-abs({0})) * (1 + tanh(-abs({0})))"}))
    assert text.count("tanh(") == 1 and text.count("abs(") == 1
    lines = [line.strip() for line in text.splitlines()]
    assert "let t1_2: f32 = tanh(t1_1)" in lines and "let t1: f32 = (t1_2 * (1.0:f32 + t1_2))" in lines
