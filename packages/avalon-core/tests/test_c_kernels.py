"""Fused elementwise groups compiled to C (avalon.backends.cpu_native) against
the NumPy path (cpu_fused.compile_fused_numpy): every primitive with a C
`expr`, over random broadcast shapes and dtypes; in-place and overlapping
`out`; inputs off the fast path; the fallbacks; whole training steps with and
without the C path (AVALON_NATIVE=0).

Arithmetic, comparisons, selects, casts, abs, sign, sqrt and max/min are
bitwise NumPy's (NaN-ness and the sign of zero included).  The transcendental
functions call glibc's (vector) libm, which is not NumPy's own SIMD code: they
agree within a few ulp (measured: 6 at most, for logf; 8 allowed)."""
import re
import threading

import numpy as np
import pytest

import avalon
from avalon.backends import get_backend
from avalon.backends import cpu_native
from avalon.backends.cpu_fused import compile_fused_numpy
from avalon.primitive import PRIMITIVES
from avalon.runtime import native
from avalon.testing.bodies import body_of
from avalon.testing.calls import record_calls

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(not native.available(), reason="no usable C compiler")

CPU = get_backend("cpu")
SETTINGS = settings(max_examples=20, deadline=None, database=None, derandomize=True)

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
SIGNED = tuple(np.dtype(d) for d in (np.int8, np.int16, np.int32, np.int64))
UNSIGNED = tuple(np.dtype(d) for d in (np.uint8, np.uint16, np.uint32, np.uint64))
INTS = SIGNED + UNSIGNED
BOOL = (np.dtype(np.bool_),)
ALL = FLOATS + INTS + BOOL

#: primitive -> (number of operands, dtypes it is tested on, max ulp difference from NumPy)
CASES = {
    "add": (2, ALL, 0), "mul": (2, ALL, 0), "maximum": (2, ALL, 0), "minimum": (2, ALL, 0),
    "sub": (2, FLOATS + INTS, 0), "div": (2, FLOATS, 0), "pow": (2, FLOATS, 8),
    "lt": (2, ALL, 0), "le": (2, ALL, 0), "gt": (2, ALL, 0), "ge": (2, ALL, 0), "eq": (2, ALL, 0),
    "ne": (2, ALL, 0),
    "neg": (1, FLOATS + INTS, 0), "abs": (1, ALL, 0), "sign": (1, FLOATS + SIGNED, 0),
    "sqrt": (1, FLOATS, 0), "relu": (1, FLOATS, 0), "stop_gradient": (1, ALL, 0),
    "exp": (1, FLOATS, 8), "log": (1, FLOATS, 8), "log1p": (1, FLOATS, 8), "expm1": (1, FLOATS, 8),
    "tanh": (1, FLOATS, 8), "sigmoid": (1, FLOATS, 8),
    "where": (3, ALL, 0), "cast": (1, ALL, 0), "binary_cross_entropy": (2, FLOATS, 8),
}


def test_every_primitive_with_a_c_expression_is_tested():
    with_expr = {name for name, p in PRIMITIVES.items() if p.elementwise and p.expr}
    assert with_expr == set(CASES), "add the new primitive to CASES"


# -- helpers ----------------------------------------------------------------------------------------------------

def values(rng, shape, dtype, domain=None):
    """Random values of `dtype`: integers over their whole range (wrapping arithmetic),
    floats of several scales with NaN, infinities and signed zeros mixed in."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.asarray(rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True))
    if domain == "unit":
        x = np.asarray(rng.random(shape))
        x[np.asarray(rng.random(shape) < 0.1)] = 0.0
        x[np.asarray(rng.random(shape) < 0.1)] = 1.0
        return x.astype(dtype)
    x = np.asarray(rng.standard_normal(shape) * rng.choice([0.1, 1.0, 10.0, 1e3], size=shape))
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0])
    mask = np.asarray(rng.random(shape) < 0.12)
    x[mask] = rng.choice(special, size=int(mask.sum()))
    return x.astype(dtype)


def _ordered(a):
    """Floats as integers in the same order (adjacent floats differ by 1)."""
    bits = a.view(np.int32).astype(np.int64) if a.itemsize == 4 else a.view(np.int64)
    low = np.int64(-2**31) if a.itemsize == 4 else np.int64(-2**63)
    return np.where(bits < 0, low - bits, bits)


def assert_same(got, want, ulps=0, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape, what)
    if want.dtype.kind != "f":
        np.testing.assert_array_equal(got, want, err_msg=what)
        return
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"NaN positions differ: {what}")
    g, w = got[~nan], want[~nan]
    if ulps == 0:
        uint = np.uint32 if g.itemsize == 4 else np.uint64
        bad = g.view(uint) != w.view(uint)
        assert not bad.any(), f"not bitwise equal: {what}\n got {g[bad][:5]}\nwant {w[bad][:5]}"
        return
    np.testing.assert_array_equal(np.isinf(g), np.isinf(w), err_msg=what)
    np.testing.assert_array_equal(np.signbit(g), np.signbit(w), err_msg=what)
    finite = np.isfinite(w)
    d = np.abs(_ordered(g[finite]) - _ordered(w[finite]))
    assert d.size == 0 or d.max() <= ulps, f"{d.max()} ulp apart (at most {ulps}): {what}"


def compile_c(body):
    """The group through the C path, whatever AVALON_NATIVE says."""
    return cpu_native.compile_fused_c(body, CPU)


def numpy_result(body, inputs, out=None):
    with np.errstate(all="ignore"):
        return compile_fused_numpy(body, CPU)(*inputs, out=out)


# -- every primitive, random broadcast shapes ------------------------------------------------------------------

@st.composite
def broadcast_shapes(draw, n_inputs=3):
    nd = draw(st.integers(0, 3))
    sides = st.sampled_from([1, 2, 3, 5, 8, 17]) if draw(st.integers(0, 9)) else st.sampled_from([0, 1, 3])
    out = tuple(draw(sides) for _ in range(nd))
    shapes = []
    for _ in range(n_inputs):
        keep = draw(st.integers(0, nd))
        shapes.append(tuple(1 if draw(st.booleans()) and draw(st.booleans()) else s for s in out[nd - keep:]))
    return shapes


def _bodies_for(dtype, shapes, rng):
    """(name, body, inputs, ulps) of each primitive that takes `dtype`, on `shapes`."""
    out = []
    for name, (arity, dtypes, ulps) in CASES.items():
        if dtype not in dtypes:
            continue
        if name == "where":
            ins = [(shapes[2], np.bool_), (shapes[0], dtype), (shapes[1], dtype)]
            body = body_of(ins, lambda op, c, a, b: op("where", c, a, b))
        elif name == "cast":
            target = ALL[rng.integers(len(ALL))]
            ins = [(shapes[0], dtype)]
            body = body_of(ins, lambda op, x, t=target: op("cast", x, dtype=t))
        elif arity == 1:
            ins = [(shapes[0], dtype)]
            body = body_of(ins, lambda op, x, name=name: op(name, x))
        else:
            ins = [(shapes[0], dtype), (shapes[1], dtype)]
            body = body_of(ins, lambda op, x, y, name=name: op(name, x, y))
        domain = "unit" if name == "binary_cross_entropy" else None
        inputs = [values(rng, s, d, domain) for s, d in ins]
        if name == "cast" and dtype.kind == "f" and body.outputs[0].dtype.kind in "iu":
            # float -> int of NaN, inf or an out-of-range value is undefined (NumPy warns)
            info = np.iinfo(body.outputs[0].dtype)
            x = np.nan_to_num(inputs[0].astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            inputs[0] = np.clip(x, max(info.min, -2.0**24), min(info.max, 2.0**24)).astype(dtype)
        out.append((name, body, inputs, ulps))
    return out


@SETTINGS
@given(dtype=st.sampled_from(ALL), shapes=broadcast_shapes(), seed=st.integers(0, 2**32 - 1))
def test_every_primitive_matches_numpy(dtype, shapes, seed):
    rng = np.random.default_rng(seed)
    cases = _bodies_for(dtype, shapes, rng)
    fns = cpu_native.compile_fused_many([b for _, b, _, _ in cases], CPU)   # one compiler run per core
    for (name, body, inputs, ulps), fn in zip(cases, fns):
        what = f"{name} {dtype.name} {[a.shape for a in inputs]}\n{fn.kernel}"
        assert_same(fn(*inputs), numpy_result(body, inputs), ulps, what)


OPS_1 = ["neg", "abs", "exp", "tanh", "sigmoid", "relu", "sqrt", "log1p", "sign"]
OPS_2 = ["add", "sub", "mul", "div", "maximum", "minimum", "pow"]
EXACT = {"neg", "abs", "relu", "sqrt", "sign", "add", "sub", "mul", "div", "maximum", "minimum"}


@SETTINGS
@given(dtype=st.sampled_from(FLOATS), shapes=broadcast_shapes(3), seed=st.integers(0, 2**32 - 1),
       program=st.lists(st.tuples(st.sampled_from(OPS_1 + OPS_2 + ["where"]), st.integers(0, 99),
                                  st.integers(0, 99)), min_size=2, max_size=6))
def test_random_chains_match_numpy(dtype, shapes, seed, program):
    rng = np.random.default_rng(seed)
    ins = [(s, dtype) for s in shapes]

    def build(op, *xs):
        vals = list(xs)
        for name, i, j in program:
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            if name == "where":
                vals.append(op("where", op("gt", a, b), a, op("mul", b, (0.5, dtype))))
            else:
                vals.append(op(name, a) if name in OPS_1 else op(name, a, b))
        last = vals[-1]
        for x in xs:   # every input reaches the output (as in the groups fusion makes), values unchanged
            last = op("where", op("eq", x, x), last, last)
        return last
    body = body_of(ins, build)
    fn = compile_c(body)
    assert getattr(fn, "native", False)
    inputs = [values(rng, s, d) for s, d in ins]
    want = numpy_result(body, inputs)
    got = fn(*inputs)
    if all(name in EXACT or name == "where" for name, _, _ in program):
        assert_same(got, want, 0, str(fn.kernel))
    else:   # libm's functions are not NumPy's: errors of a few ulp, amplified along the chain
        np.testing.assert_allclose(got, want, rtol=2e-5 if dtype == np.float32 else 1e-12, atol=1e-30,
                                   equal_nan=True, err_msg=str(fn.kernel))


# -- the callable: out, aliasing, inputs off the fast path --------------------------------------------------------

def _chain(shape=(64, 33), dtype=np.float32, bshape=None):
    return body_of([(shape, dtype), (bshape or shape, dtype)],
                   lambda op, x, y: op("add", op("mul", op("maximum", x, (0.0, dtype)), y), (1.0, dtype)))


def test_a_large_batch_builds_as_one_object_per_core_at_once(monkeypatch):
    import os
    from avalon.runtime import native
    names, build = [], native.build
    monkeypatch.setattr(native, "build", lambda source, **kw: names.append(kw.get("name")) or build(source, **kw))
    shapes = [(29 + k, 13) for k in range(cpu_native.PARALLEL_BUILD_MIN + 2)]   # kernels no other test builds
    fns = cpu_native.compile_fused_many([_chain(s) for s in shapes], CPU)
    assert len(names) == min(os.cpu_count() or 1, len(shapes) // (cpu_native.PARALLEL_BUILD_MIN // 2))
    rng = np.random.default_rng(0)
    for shape, fn in zip(shapes, fns):
        x, y = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_array_equal(fn(x, y), np.maximum(x, np.float32(0)) * y + np.float32(1))


@pytest.fixture(params=[True, False], ids=["object-calls", "python-checks"])
def calls(request, monkeypatch):
    """Both wrappers: checks and pointers in C (the default where NumPy's array
    layout is verified), and in Python."""
    if request.param and not cpu_native.OBJECT_CALLS:
        pytest.skip("NumPy's array layout is not the one the C entry points read")
    monkeypatch.setattr(cpu_native, "OBJECT_CALLS", request.param)
    return request.param


def test_out_is_allocated_or_written_and_returned(calls):
    rng = np.random.default_rng(0)
    body = _chain()
    fn = compile_c(body)
    assert fn.native
    x, y = values(rng, (64, 33), np.float32), values(rng, (64, 33), np.float32)
    want = numpy_result(body, [x, y])
    r = fn(x, y)
    assert r.shape == (64, 33) and r.dtype == np.float32
    assert_same(r, want, 0)
    out = np.empty((64, 33), np.float32)
    assert fn(x, y, out=out) is out
    assert_same(out, want, 0)


def test_out_may_be_an_input(calls):
    """The memory planner writes in place: out is one of the inputs."""
    rng = np.random.default_rng(1)
    body = body_of([((50, 20), np.float32), ((1, 20), np.float32), ((50, 20), np.float32)],
                   lambda op, x, b, y: op("sub", op("mul", op("add", x, b), y), x))
    fn = compile_c(body)
    for k in (0, 2):
        ins = [values(rng, n.shape, np.float32) for n in body.inputs]
        want = numpy_result(body, [a.copy() for a in ins])
        assert fn(*ins, out=ins[k]) is ins[k]
        assert_same(ins[k], want)


def test_out_overlapping_an_input_otherwise_goes_through_a_temporary(calls):
    rng = np.random.default_rng(2)
    body = body_of([((40,), np.float32), ((1,), np.float32)], lambda op, x, s: op("mul", op("add", x, s), x))
    fn = compile_c(body)
    for case in ("shifted", "broadcast"):
        buf = values(rng, (41,), np.float32)
        if case == "shifted":   # out is the input moved by one element
            x, s, out = buf[1:], np.ones(1, np.float32), buf[:40]
        else:                   # the broadcast input is out's first element
            x, out = values(rng, (40,), np.float32), buf[:40]
            s = buf[:1]
        want = numpy_result(body, [x.copy(), s.copy()])
        assert fn(x, s, out=out) is out
        assert_same(out, want, 0, case)


def test_inputs_off_the_fast_path(calls):
    rng = np.random.default_rng(3)
    body = _chain((16, 24), bshape=())
    fn = compile_c(body)
    x = values(rng, (24, 16), np.float32)
    s = np.float32(0.75)
    want = numpy_result(body, [np.ascontiguousarray(x.T), np.asarray(s)])
    assert_same(fn(x.T, s), want, 0, "transposed input, NumPy scalar")
    assert_same(fn(x.T.copy(), np.asarray(s)), want, 0, "0-d array")
    assert_same(fn(np.broadcast_to(x.T[:1], (16, 24)), s),
                numpy_result(body, [np.ascontiguousarray(np.broadcast_to(x.T[:1], (16, 24))), np.asarray(s)]), 0)
    misaligned = np.frombuffer(bytearray(16 * 24 * 4 + 1), np.uint8)[1:].view(np.float32).reshape(16, 24)
    misaligned[...] = x.T
    assert not misaligned.flags.aligned
    assert_same(fn(misaligned, s), want, 0, "misaligned input")
    # another dtype than compiled for: the group's NumPy version runs
    x64 = x.T.astype(np.float64)
    np.testing.assert_allclose(fn(x64, s), numpy_result(body, [x64, s]), rtol=1e-6)
    out = np.empty((24, 16), np.float32).T    # a non-contiguous out
    assert fn(x.T, s, out=out) is out
    assert_same(out, want, 0, "non-contiguous out")


def test_a_read_only_out_raises_as_numpy_does(calls):
    body = _chain((8,))
    fn = compile_c(body)
    out = np.empty(8, np.float32)
    out.flags.writeable = False
    x = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="read-only"):
        fn(x, x, out=out)


def test_empty_and_scalar_outputs(calls):
    body = _chain((0, 5), bshape=(1, 5))
    fn = compile_c(body)
    r = fn(np.empty((0, 5), np.float32), np.ones((1, 5), np.float32))
    assert r.shape == (0, 5)
    body = _chain(())
    fn = compile_c(body)
    assert fn.native
    r = fn(np.float32(0.5), np.asarray(np.float32(2.0)))
    assert r.shape == () and r.dtype == np.float32
    assert_same(r, numpy_result(body, [np.asarray(np.float32(0.5)), np.asarray(np.float32(2.0))]), 0)


def test_concurrent_calls_are_safe(calls):
    body = _chain((256, 64))
    fn = compile_c(body)
    rng = np.random.default_rng(4)
    jobs = [[values(rng, (256, 64), np.float32) for _ in range(2)] for _ in range(8)]
    wants = [numpy_result(body, j) for j in jobs]
    errors = []

    def run(k):
        try:
            for _ in range(50):
                assert_same(fn(*jobs[k]), wants[k], 0)
        except AssertionError as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


# -- falling back --------------------------------------------------------------------------------------------------

def test_unfusable_groups_run_on_numpy():
    body = body_of([((4,), np.int32), ((4,), np.int32)], lambda op, x, y: op("add", op("pow", x, y), x))
    fn = CPU.compile_fused(body)
    assert not getattr(fn, "native", False) and "np" in fn.source
    x = np.arange(4, dtype=np.int32)
    np.testing.assert_array_equal(fn(x, x), x ** x + x)


def test_avalon_native_0_keeps_numpy(monkeypatch):
    monkeypatch.setenv("AVALON_NATIVE", "0")
    fn = CPU.compile_fused(_chain((4,)))
    assert not getattr(fn, "native", False)


def test_no_compiler_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setenv("AVALON_NATIVE", "1")
    monkeypatch.setattr(native, "available", lambda: False)
    monkeypatch.setattr(native, "_warned", False)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        fn = CPU.compile_fused(_chain((4,)))
    assert not getattr(fn, "native", False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CPU.compile_fused(_chain((5,)))   # no second warning


# -- whole steps: the C path against AVALON_NATIVE=0 -------------------------------------------------------------

def _fused_kernels(gf):
    compiled = gf._last().compiled          # parallel=False: one CompiledGraph
    env = compiled.fn.__globals__
    return [v for k, v in env.items() if k.startswith("fused_")]


def _step(f, args, monkeypatch, native_on):
    monkeypatch.setenv("AVALON_NATIVE", "1" if native_on else "0")
    gf = avalon.value_and_grad(f, parallel=False)
    result = gf(*args)
    kernels = _fused_kernels(gf)
    assert kernels and all(getattr(k, "native", False) == native_on for k in kernels)
    return result


def _mlp(params, x, y):
    (w1, b1), (w2, b2), (w3, b3) = params
    h = avalon.tanh(x @ w1 + b1)
    h = avalon.sigmoid(h @ w2 + b2) * h
    logits = h @ w3 + b3
    err = logits - y
    # a Huber-like loss: where and maximum
    loss = avalon.where(avalon.abs(err) < 1.0, 0.5 * err * err, avalon.abs(err) - 0.5)
    return avalon.mean(avalon.maximum(loss, 0.01 * logits * logits))


def _conv(params, x, y):
    w1, b1, w2 = params
    h = avalon.nn.functional.conv2d(x, w1, b1, padding=1)
    h = avalon.maximum(h, 0.0) + 0.1 * avalon.sigmoid(h)
    h = avalon.mean(h, axis=(2, 3)) @ w2
    return avalon.mean(avalon.nn.functional.binary_cross_entropy(avalon.sigmoid(h), y))


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_grad_of_models_agrees_with_the_numpy_path(model, monkeypatch):
    rng = np.random.default_rng(5)
    f32 = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    if model == "mlp":
        params = [(f32(12, 16), f32(16)), (f32(16, 16), f32(16)), (f32(16, 3), f32(3))]
        args = (params, f32(32, 12), f32(32, 3))
        f = _mlp
    else:
        params = [f32(6, 3, 3, 3), f32(6), f32(6, 2)]
        args = (params, f32(8, 3, 10, 10), (rng.random((8, 2)) > 0.5).astype(np.float32))
        f = _conv
    loss_c, grads_c = _step(f, args, monkeypatch, True)
    loss_n, grads_n = _step(f, args, monkeypatch, False)
    np.testing.assert_allclose(loss_c, loss_n, rtol=1e-5)
    for gc, gn in zip(avalon.tree.flatten(grads_c)[0], avalon.tree.flatten(grads_n)[0]):
        np.testing.assert_allclose(gc, gn, rtol=2e-4, atol=1e-6)


# -- building: lazily, one shared object per batch ----------------------------------------------------------------

def _count_builds(monkeypatch):
    return record_calls(monkeypatch, native, "build")


def test_groups_compiled_together_build_as_one_shared_object(monkeypatch):
    cpu_native.build_pending()
    calls = _count_builds(monkeypatch)
    bodies = [_chain((3, 11 + k), dtype=np.float64) for k in range(3)]
    fns = [compile_c(b) for b in bodies]
    assert not calls                                   # nothing is built before a call
    x = np.ones((3, 12), np.float64)
    assert_same(fns[1](x, x), numpy_result(bodies[1], [x, x]))
    assert len(calls) == 1 and all(f.kernel.name in calls[0] for f in fns)
    x = np.ones((3, 13), np.float64)
    assert_same(fns[2](x, x), numpy_result(bodies[2], [x, x]))
    assert len(calls) == 1                             # built with the first
    again = compile_c(bodies[0])                       # the same kernel: already built in this process
    assert cpu_native.build_pending() == 0 and again.__globals__["_entry"] is fns[0].__globals__["_entry"]


def test_a_failed_build_warns_and_runs_numpy(monkeypatch):
    cpu_native.build_pending()

    def failing(source, **kw):
        raise native.NativeBuildError("the C compiler failed on 'fused' (a test)")
    monkeypatch.setattr(native, "build", failing)
    body = _chain((2, 3, 29))
    fn = compile_c(body)
    x = values(np.random.default_rng(7), (2, 3, 29), np.float32)
    with pytest.warns(RuntimeWarning, match="did not build.*a test"), np.errstate(all="ignore"):
        r = fn(x, x)
    assert_same(r, numpy_result(body, [x, x]))
    with np.errstate(all="ignore"):
        assert_same(fn(x, x, out=np.empty_like(x)), numpy_result(body, [x, x]))
    with pytest.raises(native.NativeBuildError):
        cpu_native.compile_fused_many([_chain((2, 3, 31))], CPU)


# -- float32 exp beyond the normal range -------------------------------------------------------------------------

F32_EXP_POINTS = np.array([-np.inf, -1e30, -200.0, -103.0, -87.5, -87.3366, -87.33654, -87.3365, -87.0, -50.0,
                           0.0, 1.0, 80.0, 88.0, 88.7, 89.0, np.inf, np.nan], np.float32)


def _exp_kernel():
    body = body_of([((F32_EXP_POINTS.size,), np.dtype(np.float32))], lambda op, x: op("exp", x))
    return cpu_native.compile_fused_c(body, get_backend("cpu"))


@pytest.mark.skipif(not native.available(), reason="needs a C compiler")
def test_float32_exp_beyond_the_normal_range_matches_numpy_with_denormals_flushed():
    # glibc's vector expf computes arguments below ln(FLT_MIN) lane by lane; the kernel
    # keeps them from it and gives what flushing denormals gives: 0
    with native.denormals_flushed(), np.errstate(over="ignore"):
        got = _exp_kernel()(F32_EXP_POINTS)
        want = np.exp(F32_EXP_POINTS)
    tiny = np.finfo(np.float32).tiny
    want = np.where(np.abs(want) < tiny, np.float32(0.0), want)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    np.testing.assert_allclose(got[ok], want[ok], rtol=5e-5, atol=0)   # 5e-5: the last 4e-5 above ln(FLT_MIN)
    assert got[0] == 0.0 and got[-2] == np.inf


@pytest.mark.skipif(not native.available(), reason="needs a C compiler")
def test_float32_exp_gives_zero_for_denormal_results_without_flushing():
    got = _exp_kernel()(F32_EXP_POINTS)
    below = F32_EXP_POINTS < np.float32(-87.33655)
    assert np.all(got[below] == 0.0)                        # no denormals, also in IEEE mode
    normal = (F32_EXP_POINTS >= np.float32(-87.0)) & (F32_EXP_POINTS <= np.float32(88.0))
    np.testing.assert_allclose(got[normal], np.exp(F32_EXP_POINTS[normal]), rtol=5e-7)


@pytest.mark.skipif(not native.available(), reason="needs a C compiler")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_in_kernels_takes_exp_of_minus_abs_x_only(dtype):
    # exp(-x) of a very negative x overflows (and glibc's vector expf computes it lane
    # by lane): the kernel's form exp(-|x|) gives the same values over the whole line
    x = np.array([-np.inf, -1e4, -200.0, -90.0, -20.0, -1.0, 0.0, 1.0, 20.0, 90.0, 1e4, np.inf, np.nan], dtype)
    body = body_of([(x.shape, np.dtype(dtype))], lambda op, a: op("sigmoid", a))
    text = str(cpu_native.lower(body))
    assert text.count("exp(") == 1                       # one exp, of -|x|
    assert re.search(r"let (t\d+_\d+): \w+ = abs\(x0\)\n\s+let (t\d+_\d+): \w+ = -\1\n\s+let \w+: \w+ = exp\(\2\)", text)
    got = cpu_native.compile_fused_c(body, get_backend("cpu"))(x)
    with np.errstate(over="ignore"):
        want = (1 / (1 + np.exp(-x.astype(np.float64)))).astype(dtype)
    if dtype == np.float32:   # float32 exp gives 0 below FLT_MIN (as flushing denormals does)
        want = np.where(np.abs(want) < np.finfo(dtype).tiny, dtype(0), want)
    np.testing.assert_allclose(got, want, rtol=4 * np.finfo(dtype).eps, atol=0)
