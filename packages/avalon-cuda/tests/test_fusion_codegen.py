"""The C++ that avalon_cuda.fusion writes for fused elementwise groups, checked
without a GPU: its text, its constants, that it compiles as CUDA C++ (nvcc,
where installed), and that it computes what the CPU backend computes (the
same loop body compiled for the host with g++, run on inputs with NaN, inf
and signed zeros).  The GPU tests run the same kernels through CuPy."""
import ctypes
import math
import shutil
import subprocess

import numpy as np
import pytest

import avalon
from avalon.primitive import PRIMITIVES
from avalon.backends import get_backend
from avalon.graph import Graph
from avalon.passes.fusion import body_reduces
from avalon_cuda import fusion

# -- functions whose compiled graphs hold fused groups -------------------------------------


def _mixed(x, y):
    return avalon.tanh(x * y + 1.0) * avalon.sigmoid(x) + avalon.maximum(x, 0.5) - avalon.where(x > y, x, 2.0)


def _nan_rules(x, y):
    return avalon.relu(x) + avalon.minimum(x, y) * avalon.abs(x) - avalon.sign(y) + avalon.maximum(y, x)


def _each_nan_rule(x, y):
    """One small group per op whose NaN and signed-zero behaviour C++ could get
    wrong: nothing else in the group masks a wrong NaN or zero."""
    return (avalon.maximum(x, y) * 2.0, avalon.minimum(x, y) * 2.0, avalon.maximum(y, x) * 2.0,
            avalon.relu(x) * 2.0, avalon.sign(x) * 2.0, avalon.div(1.0, avalon.sign(y) + 0.0),
            avalon.div(1.0, avalon.abs(x)), avalon.div(1.0, avalon.relu(y)), avalon.sigmoid(x) * 2.0)


def _activations(x, y):
    return (avalon.softplus(x) + avalon.log_sigmoid(y) + avalon.elu(x) + avalon.leaky_relu(y, 0.2)
            + avalon.softsign(x))


def _float_math(x, y):
    return avalon.exp(avalon.log1p(avalon.abs(x))) - avalon.expm1(x * 0.1) + avalon.sqrt(avalon.abs(y)) ** 1.5


def _special_constants(x, y):
    big = avalon.where(x > 1.5, float("inf"), x)
    return avalon.where(y < -1.5, float("-inf"), big) * 1e-30 + (-0.0) + avalon.cast(y > 10.0, y.dtype) * 3.4e38


def _ints(i, j):
    k = (i + j) * 3 - avalon.maximum(i, j)
    return avalon.cast(k, np.float32) * 0.5 + avalon.cast(i > j, np.float32)


def _grad_of_tanh_mlp(w, x):
    return avalon.mean(avalon.tanh(x @ w) ** 2 + avalon.relu(x @ w) * 0.1)


FORWARD = [("mixed", _mixed), ("nan_rules", _nan_rules), ("each_nan_rule", _each_nan_rule), ("activations", _activations),
           ("float_math", _float_math), ("special_constants", _special_constants)]


def _fused_bodies(graph):
    """The elementwise groups (groups that end in a reduction are the CPU's C
    kernels; this generator refuses them and the backend runs them op by op),
    without those reading a view in place (the CPU's fuse_views, a pass the
    CUDA pipeline does not run)."""
    return [n.attrs["body"] for n in graph.nodes if n.op == "fused" and not body_reduces(n.attrs["body"])
            and not any(getattr(PRIMITIVES.get(b.op), "view", False) for b in n.attrs["body"].nodes)]


def test_a_group_ending_in_a_reduction_is_refused_so_it_runs_op_by_op():
    g = avalon.value_and_grad(_grad_of_tanh_mlp)
    rng = np.random.default_rng(1)
    g(rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32))
    reducing = [n.attrs["body"] for n in g.graph.nodes if n.op == "fused" and body_reduces(n.attrs["body"])]
    assert reducing, "the CPU graph has a fused reduction to refuse"
    for body in reducing:
        with pytest.raises(fusion.Unfusable, match="no C expression"):
            fusion.generate(body)


def _bodies():
    """(name, body) of every fused group of a set of jit and grad functions."""
    rng = np.random.default_rng(0)
    out = []
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((6, 5)).astype(dtype)
        y = rng.standard_normal((5,)).astype(dtype)
        for name, f in FORWARD:
            j = avalon.jit(f)
            with np.errstate(divide="ignore"):
                j(x, y)
            out += [(f"{name}-{np.dtype(dtype).name}-{k}", b) for k, b in enumerate(_fused_bodies(j.graph))]
    ji = avalon.jit(_ints)
    ji(np.arange(12, dtype=np.int32).reshape(3, 4), np.arange(4, dtype=np.int64))
    out += [(f"ints-{k}", b) for k, b in enumerate(_fused_bodies(ji.graph))]
    g = avalon.value_and_grad(_grad_of_tanh_mlp)
    g(rng.standard_normal((5, 3)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32))
    out += [(f"grad-{k}", b) for k, b in enumerate(_fused_bodies(g.graph))]
    return out


BODIES = _bodies()


def test_every_function_produced_fused_groups():
    names = {n.split("-")[0] for n, _ in BODIES}
    assert names == {"mixed", "nan_rules", "each_nan_rule", "activations", "float_math", "special_constants", "ints", "grad"}


# -- the text --------------------------------------------------------------------------------

def test_the_kernel_text_types_every_value_and_inlines_constants():
    body = next(b for n, b in BODIES if n.startswith("mixed-float32"))
    src = fusion.generate(body)
    assert src.in_params == "float32 in0, float32 in1"
    assert src.out_params == "float32 out"
    assert src.name.startswith("avalon_fused_") and src.name.isidentifier()
    op = src.operation
    assert "tanh(" in op and "((float)1.0)" in op and "((float)2.0)" in op
    assert "bool t" in op                                        # the comparison is a bool local
    assert "in0 != in0" in op                                    # maximum propagates NaN
    assert "((float)1 / ((float)1 + exp(-in0)))" in op           # sigmoid stays in float, exact in the tail
    assert op.splitlines()[-1].startswith("out = t")
    assert src.text.startswith(f"// avalon fused kernel {src.name}: float32[6,5]")
    # one statement a node of the body, plus the store
    ops = [n for n in body.nodes if n.op not in ("input", "const")]
    assert len(op.splitlines()) == len(ops) + 1


def test_binary_operands_are_cast_to_their_common_type():
    body = next(b for n, b in BODIES if n.startswith("ints"))
    src = fusion.generate(body)
    assert "int32 in0" in src.in_params and "int64 in1" in src.in_params
    assert "((long long)in0)" in src.operation                   # int32 + int64 adds in int64, as NumPy


def test_equal_code_gives_equal_names_and_the_same_kernel_text():
    a = fusion.generate(next(b for n, b in BODIES if n.startswith("mixed-float32")))
    b = fusion.generate(next(b for n, b in BODIES if n.startswith("mixed-float32")))
    c = fusion.generate(next(b for n, b in BODIES if n.startswith("mixed-float64")))
    assert a == b and a.name != c.name and "double" in c.operation


@pytest.mark.parametrize("value,dtype,text", [
    (0.1, np.float32, "((float)0.10000000149011612)"),
    (-0.0, np.float32, "((float)-0.0)"),
    (1e-45, np.float32, "((float)1.401298464324817e-45)"),
    (math.inf, np.float32, "__int_as_float(2139095040)"),
    (-math.inf, np.float32, "__int_as_float(-8388608)"),
    (math.inf, np.float64, "__longlong_as_double(9218868437227405312LL)"),
    (0.1, np.float64, "((double)0.1)"),
    (-2**63, np.int64, "((long long)(-9223372036854775807LL - 1))"),
    (2**64 - 1, np.uint64, "((unsigned long long)18446744073709551615ULL)"),
    (-7, np.int8, "((signed char)-7LL)"),
    (True, np.bool_, "true"),
])
def test_literals_spell_the_exact_value_in_the_exact_type(value, dtype, text):
    assert fusion.c_literal(np.asarray(value, dtype=dtype), dtype) == text


def test_nan_literals_are_nan_bit_patterns():
    lit = fusion.c_literal(np.float32("nan"), np.float32)
    assert lit.startswith("__int_as_float(")
    bits = np.int32(int(lit[len("__int_as_float("):-1]))
    assert np.isnan(bits.view(np.float32))


def _body(op, dtype, attrs=None, n_in=1):
    g = Graph("fused")
    ins = [g.add_input((3,), dtype) for _ in range(n_in)]
    g.outputs = [g.add_node(op, ins, attrs or {}, (3,), dtype)]
    return g


@pytest.mark.parametrize("body,why", [
    (lambda: _body("exp", np.float16), "float16"),
    (lambda: _body("pow", np.int32, n_in=2), "integer pow"),
    (lambda: _body("sum", np.float32, {"axes": (0,), "keepdims": True}), "no C expression"),
])
def test_what_cannot_be_one_exact_kernel_says_why(body, why):
    with pytest.raises(fusion.Unfusable, match=why):
        fusion.generate(body())


def test_the_cache_key_tells_apart_bodies_that_differ_only_in_a_constant():
    def body(c):
        g = Graph("fused")
        x = g.add_input((3,), np.float32)
        k = g.add_const(np.asarray(c, np.float32))
        g.outputs = [g.add_node("mul", [x, k], {}, (3,), np.float32)]
        return g
    assert fusion.cache_key(body(2.0)) == fusion.cache_key(body(2.0))
    assert fusion.cache_key(body(2.0)) != fusion.cache_key(body(3.0))


# -- compiling the generated code --------------------------------------------------------------

def _harness_params(src):
    """Raw pointers in place of CuPy's CArray parameters, bound to the names
    the operation reads exactly as CuPy binds them (`const T &in0 = ...`)."""
    decls, binds = [], []
    for k, p in enumerate([p for p in src.in_params.split(", ") if p]):
        dtype, name = p.split()
        ct = fusion.c_type(np.dtype(dtype))
        decls.append(f"const {ct}* _raw_{name}")
        binds.append(f"const {ct} &{name} = _raw_{name}[i];")
    oct_ = fusion.c_type(src.out_dtype)
    decls.append(f"{oct_}* _raw_out")
    binds.append(f"{oct_} &out = _raw_out[i];")
    return decls, binds


def _device_kernel(src):
    decls, binds = _harness_params(src)
    body = "\n    ".join(binds + src.operation.splitlines())
    return (f'extern "C" __global__ void {src.name}({", ".join(decls)}, long long n) {{\n'
            f"  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n"
            f"  if (i < n) {{\n    {body}\n  }}\n}}\n")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) is not installed")
def test_every_generated_kernel_compiles_as_cuda_cpp(tmp_path):
    sources = {fusion.generate(b).name: fusion.generate(b) for _, b in BODIES}
    cu = tmp_path / "fused.cu"
    cu.write_text("\n".join(_device_kernel(s) for s in sources.values()))
    r = subprocess.run(["nvcc", "-ptx", "-Werror", "all-warnings", str(cu), "-o", str(tmp_path / "fused.ptx")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:] + "\n" + cu.read_text()[:4000]
    ptx = (tmp_path / "fused.ptx").read_text()
    for name in sources:
        assert f".entry {name}(" in ptx


_HOST_PRELUDE = """
#include <cmath>
#include <cstring>
using namespace std;
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
"""


def _host_kernel(src):
    decls, binds = _harness_params(src)
    ins = [d for d in decls if d.startswith("const")]
    unpack = [f"{d.rsplit(' ', 1)[0]} {d.rsplit(' ', 1)[1]} = ({d.rsplit(' ', 1)[0]})args[{k}];"
              for k, d in enumerate(ins)]
    outd = decls[-1].rsplit(" ", 1)
    body = "\n    ".join(binds + src.operation.splitlines())
    return (f'extern "C" void {src.name}(void** args, void* outp, long long n) {{\n  '
            + "\n  ".join(unpack) + f"\n  {outd[0]} {outd[1]} = ({outd[0]})outp;\n"
            f"  for (long long i = 0; i < n; ++i) {{\n    {body}\n  }}\n}}\n")


def _inputs(body, rng):
    out = []
    for n in body.inputs:
        if n.dtype.kind == "f":
            a = np.array(rng.standard_normal(n.shape) * 2, dtype=n.dtype)   # an array even of shape ()
            specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1.5, -1.5], dtype=n.dtype)
            mask = rng.random(n.shape) < 0.4     # each input its own positions: NaN meets numbers
            a[mask] = rng.choice(specials, int(mask.sum()))
        elif n.dtype.kind == "b":
            a = rng.random(n.shape) > 0.5
        else:
            a = rng.integers(-50, 50, n.shape).astype(n.dtype)
        out.append(a)
    return out


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_the_generated_code_computes_what_the_cpu_backend_computes(tmp_path):
    sources = {}
    for name, b in BODIES:
        sources.setdefault(fusion.generate(b).name, (name, b, fusion.generate(b)))
    cpp = tmp_path / "fused.cpp"
    cpp.write_text(_HOST_PRELUDE + "\n".join(_host_kernel(s) for _, _, s in sources.values()))
    lib_path = tmp_path / "fused.so"
    r = subprocess.run(["g++", "-O1", "-std=c++17", "-shared", "-fPIC", str(cpp), "-o", str(lib_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ctypes.CDLL(str(lib_path))
    cpu = get_backend(avalon.device("cpu"))
    rng = np.random.default_rng(1)
    for kname, (name, body, src) in sources.items():
        inputs = _inputs(body, rng)
        with np.errstate(all="ignore"):
            want = np.asarray(cpu.compile_fused(body)(*inputs))
        shape = tuple(body.outputs[0].shape)
        flat = [np.ascontiguousarray(np.broadcast_to(a, shape)) for a in inputs]
        got = np.empty(shape, src.out_dtype)
        ptrs = (ctypes.c_void_p * max(1, len(flat)))(*[a.ctypes.data for a in flat])
        getattr(lib, kname)(ptrs, ctypes.c_void_p(got.ctypes.data), ctypes.c_longlong(got.size))
        assert got.dtype == want.dtype, name
        if want.dtype.kind == "f":
            tol = 2e-6 if want.dtype == np.float32 else 1e-13
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, equal_nan=True,
                                       err_msg=f"{name}\n{src.text}")
            zero = want == 0                      # and the sign of every zero
            np.testing.assert_array_equal(np.signbit(got[zero]), np.signbit(want[zero]),
                                          err_msg=f"signs of zeros, {name}\n{src.text}")
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{name}\n{src.text}")
