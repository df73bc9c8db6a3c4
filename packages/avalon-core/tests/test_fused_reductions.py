"""Reductions (sum, max, min) fused with the elementwise ops that compute
their input: the fusion rule (passes.fusion), the kernel IR's loop nests with
per-lane accumulators (kernel_ir.lower) and their C (backends.cpu_native),
against NumPy in float64 over random shapes, axes and dtypes; whole gradient
steps that end in such sums against torch."""
import numpy as np
import pytest

import avalon
from avalon import passes
from avalon.backends import cpu_native, get_backend
from avalon.backends.cpu_fused import compile_fused_numpy
from avalon.kernel_ir import Unfusable, lower
from avalon.kernel_ir.ir import Buffer, Index, Kernel, KernelIRError, Load, Loop, Store, Update, Var, verify
from avalon.kernel_ir.lower import BLOCK_ITERS, COLUMN_BLOCK, LANE_BYTES
from avalon.runtime import native
from avalon.testing.bodies import body_of

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(not native.available(), reason="no usable C compiler")

CPU = get_backend("cpu")
SETTINGS = settings(max_examples=40, deadline=None, database=None, derandomize=True)
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


def compile_c(body):
    """The body through the C path, whatever AVALON_NATIVE says."""
    fn = cpu_native.compile_fused_c(body, CPU)
    assert fn.native
    return fn


def square_body(shape, dtype, op, axes, keepdims):
    """op(x * y, axes): a reduction of an elementwise product."""
    return body_of([(shape, dtype), (shape, dtype)],
                   lambda o, x, y: o(op, o("mul", x, y), axes=axes, keepdims=keepdims))


def sum_bound(terms, axes, dtype):
    """The error bound kernel_ir.lower states for a float sum of n terms:
    rows (BLOCK_ITERS + log2(lanes) + n / block), columns n; twice that, eps of
    the dtype, times sum |terms| (plus the final rounding)."""
    n = int(np.prod([terms.shape[a] for a in axes], dtype=np.int64))
    lanes = LANE_BYTES // dtype.itemsize
    factor = max(BLOCK_ITERS + np.log2(lanes) + n / (lanes * BLOCK_ITERS), n) + 2
    return 2 * factor * np.finfo(dtype).eps * np.sum(np.abs(terms), axis=axes)


# -- random shapes, axes, keepdims, dtypes against float64 ------------------------------------------------------

@st.composite
def reductions(draw):
    nd = draw(st.integers(1, 4))
    sides = st.sampled_from([1, 2, 3, 5, 16, 17, 40, 131]) if draw(st.integers(0, 7)) else st.sampled_from([0, 1, 3])
    shape = tuple(draw(sides) for _ in range(nd))
    axes = tuple(sorted(draw(st.sets(st.integers(0, nd - 1), min_size=1))))
    return shape, axes, draw(st.booleans()), draw(st.sampled_from([F32, F64])), draw(st.sampled_from(["sum", "max",
                                                                                                        "min"]))


@SETTINGS
@given(reductions(), st.integers(0, 2**31))
def test_fused_reductions_match_numpy(case, seed):
    shape, axes, keepdims, dtype, op = case
    rng = np.random.default_rng(seed)
    x, y = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    body = square_body(shape, dtype, op, axes, keepdims)
    terms = x.astype(np.float64) * y.astype(np.float64)
    empty = terms.size == 0 or any(shape[a] == 0 for a in axes)
    if op != "sum" and empty and np.prod([shape[d] for d in range(len(shape)) if d not in axes]) > 0:
        with pytest.raises(Unfusable, match="empty"):
            lower(body)          # NumPy raises for a max of nothing: the group keeps NumPy's path
        return
    got = compile_c(body)(x, y)
    want = getattr(np, op)(terms, axis=axes, keepdims=keepdims)
    assert got.shape == want.shape and got.dtype == dtype
    if op == "sum":
        assert np.all(np.abs(got - want) <= sum_bound(terms, axes, dtype).reshape(want.shape))
    else:   # max and min are exact: the product rounded once, as NumPy's own
        np.testing.assert_array_equal(got, compile_fused_numpy(body, CPU)(x, y))


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint16, np.bool_])
@pytest.mark.parametrize("op", ["sum", "max", "min"])
@pytest.mark.parametrize("shape, axes", [((7, 300), (1,)), ((300, 7), (0,)), ((3, 4, 5), (0, 2)), ((2, 1, 3), (1,))])
def test_integer_and_bool_reductions_are_exact(dtype, op, shape, axes):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, shape).astype(dtype) if dtype == np.bool_ else rng.integers(-50, 50, shape).astype(dtype)
    body = body_of([(shape, dtype)], lambda o, a: o(op, o("abs", a), axes=axes, keepdims=False))
    np.testing.assert_array_equal(compile_c(body)(x), compile_fused_numpy(body, CPU)(x))


@pytest.mark.parametrize("op", ["max", "min"])
@pytest.mark.parametrize("axis", [0, 1])
def test_nan_propagates_through_max_and_min(op, axis):
    x = np.arange(60 * 70, dtype=np.float32).reshape(60, 70) / 7
    x[3, 5] = x[40, 66] = np.nan
    body = body_of([(x.shape, F32)], lambda o, a: o(op, o("mul", a, (2.0, F32)), axes=(axis,), keepdims=False))
    got = compile_c(body)(x)
    want = getattr(np, op)(x * 2, axis=axis)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_a_long_row_is_summed_within_the_stated_bound_not_sequentially(dtype):
    # a million terms of one sign: a single float32 accumulator drifts by ~1e-3 relative
    x = (np.random.default_rng(2).random((1, 1 << 20)) + 0.5).astype(dtype)
    body = body_of([(x.shape, dtype)], lambda o, a: o("sum", o("mul", a, a), axes=(1,), keepdims=False))
    terms = x.astype(np.float64) ** 2
    got = compile_c(body)(x)
    exact = terms.sum(axis=1)
    assert np.abs(got - exact) <= sum_bound(terms, (1,), dtype)
    sequential = np.cumsum(terms.astype(dtype), axis=1, dtype=dtype)[:, -1]   # one accumulator
    assert np.abs(got - exact) < np.abs(sequential - exact) / 10 or dtype == F64


@pytest.mark.parametrize("shape, axes", [((4096, 3), (0,)), ((300, 1100), (0,)), ((70, 3, 530), (0, 1)),
                                         ((5, 300, 2, 9), (1,))])
def test_a_long_column_is_summed_block_by_block(shape, axes):
    # the output row in chunks (1100 = 2 * 512 + 76), the reduced rows in blocks of COLUMN_BLOCK values
    x = (np.random.default_rng(11).random(shape) + 0.5).astype(np.float32)
    body = body_of([(shape, F32)], lambda o, a: o("sum", o("mul", a, a), axes=axes, keepdims=False))
    kernel = lower(body)
    assert [b.name for b in kernel.locals] == ["part"]
    terms = x.astype(np.float64) ** 2
    n = int(np.prod([shape[a] for a in axes]))
    got = compile_c(body)(x)
    exact = terms.sum(axis=axes)
    bound = (COLUMN_BLOCK + n / COLUMN_BLOCK + 2) * np.finfo(np.float32).eps * np.abs(terms).sum(axis=axes)
    assert np.all(np.abs(got - exact) <= bound)


def test_sum_of_an_empty_axis_is_zero_and_a_reduction_over_size_one_axes_is_a_copy():
    zeros = body_of([((0, 4), F32)], lambda o, a: o("sum", o("exp", a), axes=(0,), keepdims=False))
    np.testing.assert_array_equal(compile_c(zeros)(np.zeros((0, 4), np.float32)), np.zeros(4, np.float32))
    x = np.random.default_rng(3).standard_normal((3, 1, 5)).astype(np.float32)
    ones = body_of([(x.shape, F32)], lambda o, a: o("max", o("mul", a, (2.0, F32)), axes=(1,), keepdims=True))
    np.testing.assert_array_equal(compile_c(ones)(x), x * 2)


def test_a_reduction_never_writes_over_an_input_it_still_reads():
    # out is exactly the (3,)-sized input: the column kernel initializes out first,
    # so the wrapper must not treat out as an in-place input
    g = np.random.default_rng(4).standard_normal((4, 3)).astype(np.float32)
    v = np.random.default_rng(5).standard_normal(3).astype(np.float32)
    body = body_of([((4, 3), F32), ((3,), F32)], lambda o, a, b: o("sum", o("mul", a, b), axes=(0,), keepdims=False))
    want = (g * v).sum(axis=0)
    out = compile_c(body)(g, v, out=v)
    np.testing.assert_allclose(out, want, rtol=1e-6)


# -- the kernel IR ---------------------------------------------------------------------------------------------

def row_body():
    return body_of([((2, 40), F32), ((2, 1), F32)],
                   lambda o, x, m: o("sum", o("exp", o("sub", x, m)), axes=(1,), keepdims=False))


def column_body():
    return body_of([((3, 5), F32), ((3, 5), F32)],
                   lambda o, g, x: o("sum", o("mul", g, o("gt", x, (0.0, F32))), axes=(0,), keepdims=True))


GOLDEN_ROW = """\
kernel row(in0: f32[80], in1: f32[2]) -> (out: f32[2]) {
  local acc: f32[16]
  local tot: f32[1]
  for i0 in [0, 2) {
    tot[0] = 0.0:f32
    for i1l_r0 in [0, 16) lanes {
      acc[i1l_r0] = 0.0:f32
    }
    for i1j_r in [0, 2) {
      for i1l_r in [0, 16) lanes {
        let x0_r: f32 = in0[i0*40 + i1j_r*16 + i1l_r]
        let x1_r: f32 = in1[i0]
        let t2_r: f32 = (x0_r - x1_r)
        let t3_r: f32 = exp(t2_r)
        acc[i1l_r] += t3_r
      }
    }
    for i1t_r in [0, 8) {
      let x0_rt: f32 = in0[i0*40 + i1t_r + 32]
      let x1_rt: f32 = in1[i0]
      let t2_rt: f32 = (x0_rt - x1_rt)
      let t3_rt: f32 = exp(t2_rt)
      acc[0] += t3_rt
    }
    let c_r_0_0: f32 = (acc[0] + acc[8])
    let c_r_0_1: f32 = (acc[1] + acc[9])
    let c_r_0_2: f32 = (acc[2] + acc[10])
    let c_r_0_3: f32 = (acc[3] + acc[11])
    let c_r_0_4: f32 = (acc[4] + acc[12])
    let c_r_0_5: f32 = (acc[5] + acc[13])
    let c_r_0_6: f32 = (acc[6] + acc[14])
    let c_r_0_7: f32 = (acc[7] + acc[15])
    let c_r_1_0: f32 = (c_r_0_0 + c_r_0_4)
    let c_r_1_1: f32 = (c_r_0_1 + c_r_0_5)
    let c_r_1_2: f32 = (c_r_0_2 + c_r_0_6)
    let c_r_1_3: f32 = (c_r_0_3 + c_r_0_7)
    let c_r_2_0: f32 = (c_r_1_0 + c_r_1_2)
    let c_r_2_1: f32 = (c_r_1_1 + c_r_1_3)
    let c_r_3_0: f32 = (c_r_2_0 + c_r_2_1)
    tot[0] += c_r_3_0
    out[i0] = tot[0]
  }
}"""

GOLDEN_COLUMN = """\
kernel col(in0: f32[15], in1: f32[15]) -> (out: f32[5]) {
  for i1z in [0, 5) {
    out[i1z] = 0.0:f32
  }
  for i0 in [0, 3) {
    for i1 in [0, 5) {
      let x0: f32 = in0[i0*5 + i1]
      let x1: f32 = in1[i0*5 + i1]
      let t3: bool = (x1 > 0.0:f32)
      let t4: f32 = (x0 * f32(t3))
      out[i1] += t4
    }
  }
}"""


@pytest.mark.parametrize("make, name, golden", [(row_body, "row", GOLDEN_ROW), (column_body, "col", GOLDEN_COLUMN)])
def test_golden_text_of_row_and_column_reductions(make, name, golden):
    assert str(lower(make(), name=name)) == golden


def test_row_reductions_render_lanes_loops_and_no_ivdep_on_accumulators():
    from avalon.kernel_ir import CRenderer
    src = CRenderer().render_kernel(lower(row_body(), name="row"))
    assert "float acc[16];" in src and "float tot[1];" in src
    lanes_loops = src.count("#pragma GCC unroll 1\n")   # kept loops: gcc vectorizes across the lanes
    assert lanes_loops == 2
    # the scalar tail updates acc[0] every iteration: a dependence ivdep must not deny
    tail = src.split("i1t_r = 0")[0].rsplit("\n", 2)[-2]
    assert "ivdep" not in tail


def test_max_updates_print_and_verify():
    acc = Buffer("acc", F32, 4, "local")
    inp, out = Buffer("in0", F32, 4, "in"), Buffer("out", F32, 1, "out")
    k = Kernel("k", [inp, out], [Loop(Var("i"), 4, [Update(acc, Index((("i", 1),)), "max",
                                                          Load(inp, Index((("i", 1),))))], lanes=True),
                                 Store(out, Index(), Load(acc, Index((), 3)))], [acc])
    verify(k)
    assert "acc[i] max= in0[i]" in str(k) and "local acc: f32[4]" in str(k) and "lanes" in str(k)


def test_verify_rejects_a_local_out_of_bounds_and_a_store_to_an_input():
    acc = Buffer("acc", F32, 4, "local")
    inp, out = Buffer("in0", F32, 8, "in"), Buffer("out", F32, 1, "out")
    bad = Kernel("k", [inp, out], [Loop(Var("i"), 8, [Update(acc, Index((("i", 1),)), "add",
                                                            Load(inp, Index((("i", 1),))))])], [acc])
    with pytest.raises(KernelIRError, match="outside the buffer's 4 elements"):
        verify(bad)
    bad = Kernel("k", [inp, out], [Store(inp, Index(), Load(acc, Index()))], [acc])
    with pytest.raises(KernelIRError, match="is 'in' but is stored to"):
        verify(bad)


def test_a_reduction_inside_a_body_is_unfusable():
    body = body_of([((3, 4), F32)], lambda o, x: o("exp", o("sum", x, axes=(1,), keepdims=True)))
    with pytest.raises(Unfusable, match="may only be the body's output"):
        lower(body)


def test_the_cuda_renderer_refuses_reductions():
    from avalon.kernel_ir.render_cuda import CUDARenderer
    with pytest.raises(Unfusable, match="does not render reductions"):
        CUDARenderer().render_kernel(lower(row_body()))


# -- the fusion pass ----------------------------------------------------------------------------------------------

X = np.random.default_rng(6).standard_normal((8, 10)).astype(np.float32)


def ops_of(g):
    return [n.op for n in g.nodes if n.op not in ("input", "const")]


def test_a_group_ends_in_the_reduction_of_its_value():
    g = passes.fuse_elementwise(avalon.trace(lambda x: avalon.sum(avalon.exp(x) * 2.0, axis=1), X))
    g.check()
    assert ops_of(g) == ["fused"]
    body = g.nodes[-1].attrs["body"]
    assert ops_of(body) == ["exp", "mul", "sum"]
    assert g.nodes[-1].shape == (8,)


def test_a_reduction_does_not_take_a_value_used_outside():
    def f(x):
        e = avalon.exp(x) * 2.0
        return avalon.sum(e, axis=0), e
    g = passes.fuse_elementwise(avalon.trace(f, X))
    assert ops_of(g) == ["fused", "sum"]    # e is an output: the sum reads it


def test_a_reduction_rule_is_what_the_pass_reads():
    from avalon.primitive import PRIMITIVES
    assert {n for n, p in PRIMITIVES.items() if p.rule("reduction", None) is not None} >= {"sum", "max", "min"}
    assert PRIMITIVES["argmax"].rule("reduction", None) is None   # an index, not a fold


def test_a_lone_reduction_is_a_group_of_its_own_for_the_cpu():
    def f(x):
        e = avalon.exp(x) * 2.0
        return avalon.sum(e, axis=0), avalon.max(x, axis=1), e
    g = passes.fuse_elementwise(avalon.trace(f, X))
    assert ops_of(g) == ["fused", "sum", "max"]
    g = passes.fusion.fuse_lone_ops(g)
    g.check()
    assert ops_of(g) == ["fused", "fused", "fused"]
    assert [ops_of(n.attrs["body"]) for n in g.nodes[-2:]] == [["sum"], ["max"]]
    cpu_passes = [name for name, _, _ in CPU.passes()]
    assert "fuse_lone_ops" in cpu_passes


def test_a_lone_elementwise_op_is_a_group_of_its_own_and_runs_in_the_segments():
    """tanh(x) is returned and read by a later group: fusion leaves it alone, and as a
    NumPy call it cut the step's segment (one C driver call) in two."""
    def f(x, y):
        t = avalon.tanh(x)
        return t, avalon.exp(t * y) + 1.0
    x, y = np.random.default_rng(12).standard_normal((2, 64, 128)).astype(np.float32)
    g = passes.fuse_elementwise(avalon.trace(f, x, y))
    assert ops_of(g) == ["tanh", "fused"]
    assert ops_of(passes.fusion.fuse_lone_ops(g)) == ["fused", "fused"]
    jf = avalon.jit(f, parallel=False)
    t, e = jf(x, y)
    np.testing.assert_allclose(t, np.tanh(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(e, np.exp(np.tanh(x) * y) + 1.0, rtol=1e-5)
    compiled = jf._last().compiled
    assert len(compiled.segments) == 1 and "tanh_" not in compiled.source


def test_lone_reductions_run_as_c_kernels_in_a_jitted_function():
    x = np.random.default_rng(11).standard_normal((16, 7, 7, 40)).astype(np.float32)
    f = avalon.jit(lambda x: (avalon.sum(x, axis=(1, 2, 3), keepdims=True), avalon.sum(x, axis=0),
                              avalon.min(x, axis=3), avalon.exp(x) * 2.0), parallel=False)
    rows, columns, minima, _ = f(x)
    np.testing.assert_allclose(rows, x.astype(np.float64).sum(axis=(1, 2, 3), keepdims=True), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(columns, x.astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(minima, x.min(axis=3))
    env = f._last().compiled.fn.__globals__
    kernels = [k for name, k in env.items() if name.startswith("fused_")]
    assert len(kernels) == 4 and all(getattr(k, "native", False) for k in kernels)


def test_a_graph_without_fused_groups_keeps_its_library_calls():
    """A lone op joins the C kernels a graph builds anyway; alone, it would be a C
    build of its own (0.1-0.2 s) for one call."""
    g = avalon.trace(lambda x: (avalon.sum(x, axis=0), avalon.tanh(x)), X)
    assert ops_of(passes.fusion.fuse_lone_ops(passes.fuse_elementwise(g))) == ["sum", "tanh"]


@pytest.mark.parametrize("native_on", [True, False], ids=["C", "NumPy"])
def test_fused_reductions_run_in_jitted_functions(native_on, monkeypatch):
    monkeypatch.setenv("AVALON_NATIVE", "1" if native_on else "0")
    f = avalon.jit(lambda x: (avalon.sum(avalon.exp(x) * 2.0, axis=1), avalon.max(x * x, axis=0, keepdims=True)))
    s, m = f(X)
    np.testing.assert_allclose(s, np.sum(np.exp(X) * 2.0, axis=1), rtol=1e-5)
    np.testing.assert_array_equal(m, np.max(X * X, axis=0, keepdims=True))


# -- gradient steps against torch ------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
F = avalon.nn.functional


def _fused_reduction_bodies(gf):
    compiled = gf._last().compiled
    env = compiled.fn.__globals__
    return [k for name, k in env.items() if name.startswith("fused_") and getattr(k, "native", False)
            and any(isinstance(s, Loop) and _has_update(s) for s in k.kernel.body)]


def _has_update(stmt):
    if isinstance(stmt, Update):
        return True
    return isinstance(stmt, Loop) and any(_has_update(s) for s in stmt.body)


def _softmax_step(w, b, x, y):
    return avalon.mean(F.softmax(x @ w + b, dim=-1) * y)


def _nll_step(w, b, x, y):
    return F.nll_loss(F.log_softmax(x @ w + b, dim=-1), y)


def _bce_step(w, b, x, y):
    return F.binary_cross_entropy_with_logits(x @ w + b, y)


def _torch_loss(name, w, b, x, y):
    z = x @ w + b
    if name == "softmax":
        return (torch.softmax(z, -1) * y).mean()
    if name == "nll":
        return torch.nn.functional.nll_loss(torch.log_softmax(z, -1), y)
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y)


@pytest.mark.parametrize("name, step", [("softmax", _softmax_step), ("nll", _nll_step), ("bce", _bce_step)])
def test_gradients_of_losses_ending_in_fused_sums_match_torch(name, step, monkeypatch):
    monkeypatch.setenv("AVALON_NATIVE", "1")
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((20, 37)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(37) * 0.1).astype(np.float32)   # bias: its gradient is a column sum
    x = rng.standard_normal((64, 20)).astype(np.float32)
    y = (rng.integers(0, 37, 64) if name == "nll" else (rng.random((64, 37)) > 0.5).astype(np.float32))
    gf = avalon.value_and_grad(step, parallel=False)
    loss, (gw, gb, _, _) = gf(w, b, x, y)
    assert _fused_reduction_bodies(gf), "no reduction ran inside a fused C kernel"
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    ty = torch.tensor(y)
    tl = _torch_loss(name, tw, tb, torch.tensor(x), ty)
    tl.backward()
    np.testing.assert_allclose(loss, tl.item(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gw, tw.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-4, atol=1e-6)


# -- the batch split across threads ----------------------------------------------------------------------------------

def test_a_fused_sum_over_the_batch_is_a_partial_sum_of_each_shard():
    from avalon.ops._sharding import P
    from avalon.passes.sharding import split_batch
    x = np.random.default_rng(8).standard_normal((512, 1024)).astype(np.float32)
    g = passes.fuse_elementwise(avalon.trace(lambda a: avalon.sum(avalon.exp(a) * 2.0, axis=0), x))
    assert ops_of(g) == ["fused"]
    plan = split_batch(g, [g.inputs[0]], 2)
    assert plan is not None and plan.output_states == [P]
    body = plan.graph.nodes[-1].attrs["body"]
    assert body.inputs[0].shape == (256, 1024) and body.outputs[0].shape == (1024,)
    shard_fn = avalon.compile_graph(plan.graph, "cpu")
    halves = [shard_fn(part)[0] for part in (x[:256], x[256:])]
    np.testing.assert_allclose(halves[0] + halves[1], np.sum(np.exp(x) * 2.0, axis=0), rtol=1e-5)


def test_a_body_of_a_lone_reduction_of_an_input_lowers():
    x = np.random.default_rng(9).standard_normal((5, 33)).astype(np.float32)
    body = body_of([(x.shape, F32)], lambda o, a: o("max", a, axes=(1,), keepdims=False))
    np.testing.assert_array_equal(compile_c(body)(x), x.max(axis=1))


@pytest.mark.parametrize("axis", [0, 1])
def test_a_fused_reduction_assigned_into_an_input_it_reads(axis):
    # v is read broadcast along the reduced axis and overwritten by the sum
    def f(v, x):
        shape = (1, 3) if axis == 0 else (3, 1)
        avalon.assign(v, avalon.sum(x * avalon.reshape(v, shape), axis=axis))
        return v
    rng = np.random.default_rng(10)
    v = rng.standard_normal(3).astype(np.float32)
    x = rng.standard_normal((3, 3)).astype(np.float32)
    want = (x * (v[None, :] if axis == 0 else v[:, None])).sum(axis=axis)
    avalon.jit(f)(v, x)
    np.testing.assert_allclose(v, want, rtol=1e-6)
