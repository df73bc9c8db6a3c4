"""Reliability of the core: compiled functions shared by threads, constants
through every pass, anomaly detection, errors that point at the user's line,
and bad input refused with a clear error."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import avalon
import avalon.nn.functional as F


# -- compiled functions called from several threads at once ---------------------------------

@pytest.fixture(autouse=False)
def fast_thread_switches():
    """Switch threads as often as the interpreter can, so calls interleave
    inside one another and a shared buffer shows at once."""
    import sys
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _run_in_threads(fn, inputs, threads=4, rounds=30):
    """Call fn on each input from `threads` threads at once, `rounds` times; the
    results of every call, per input."""
    results = [[] for _ in inputs]
    errors = []
    start = threading.Barrier(threads)

    def worker(t):
        try:
            start.wait()
            for _ in range(rounds):
                for k in range(t % len(inputs), len(inputs)):
                    results[k].append(fn(inputs[k]))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    return results


def _mlp_inputs(n=4, batch=256, seed=0):
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, 128)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((128, 32)).astype(np.float32) * 0.1
    return [(w1, w2, rng.standard_normal((batch, 64)).astype(np.float32) * (k + 1)) for k in range(n)]


def _mlp(params):
    w1, w2, x = params
    h = avalon.tanh(x @ w1) * 2.0 + 1.0
    return avalon.exp(-(h @ w2) ** 2).sum(axis=1)


def test_jit_function_is_safe_to_call_from_threads(fast_thread_switches):
    f = avalon.jit(_mlp)
    inputs = _mlp_inputs()
    expected = [f(p)[...] .copy() for p in inputs]
    for k, outs in enumerate(_run_in_threads(f, inputs)):
        for out in outs:
            np.testing.assert_array_equal(out, expected[k])


def test_grad_function_is_safe_to_call_from_threads(fast_thread_switches):
    def loss(params):
        return _mlp(params).mean()

    inputs = _mlp_inputs()
    gf = avalon.value_and_grad(loss)
    expected = [gf(p) for p in inputs]
    for k, outs in enumerate(_run_in_threads(gf, inputs)):
        for value, (grads,) in outs:
            np.testing.assert_array_equal(value, expected[k][0])
            for g, e in zip(grads, expected[k][1][0]):
                if e is not None:
                    np.testing.assert_array_equal(g, e)


def test_different_convolution_functions_in_threads_keep_their_work_arrays(fast_thread_switches):
    """Two compiled functions, each in its own thread, share the CPU backend's
    work-array pool (im2col columns): each call must see only its own."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4, 5, 5)).astype(np.float32)
    xs = [rng.standard_normal((32, 4, 16, 16)).astype(np.float32) * (k + 1) for k in range(2)]

    def net(x):
        return F.max_pool2d(F.relu(F.conv2d(x, w, padding=2)), 2)

    fns = [avalon.jit(lambda x: net(x)), avalon.jit(lambda x: net(x) * 1.0)]
    expected = [fn(x).copy() for fn, x in zip(fns, xs)]
    errors = []

    def worker(k):
        try:
            for _ in range(100):
                np.testing.assert_array_equal(fns[k](xs[k]), expected[k])
        except BaseException as e:
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors[0]


# -- constants are one kind of value through every pass -------------------------------------

def test_scalar_chain_after_a_mean_compiles_and_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal((3, 4))
    value, (g,) = avalon.grad(lambda x: x.mean() * 0.5 / 2, x)
    t = torch.tensor(x, requires_grad=True)
    (t.mean() * 0.5 / 2).backward()
    np.testing.assert_allclose(value, (x.mean() * 0.5 / 2), rtol=1e-12)
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("scalar", [np.float32(2.0), 2.0, np.int64(3), True])
def test_const_nodes_hold_arrays_whatever_scalar_they_are_made_from(scalar):
    from avalon.graph import Node
    n = Node("const", (), {}, (), np.asarray(scalar).dtype, value=scalar)
    assert isinstance(n.value, np.ndarray) and n.value.shape == ()
    assert n.value.item() == scalar


def test_graph_check_rejects_a_const_that_is_not_an_array():
    g = avalon.trace(lambda x: x * 2.0, np.ones(3, np.float32))
    const = next(n for n in g.nodes if n.op == "const")
    const.value = np.float32(2.0)  # what a pass might leave behind
    with pytest.raises(avalon.GraphError, match="holds float32, not an array"):
        g.check()


def test_every_pass_keeps_constants_arrays():
    from avalon.passes import BUILTIN
    g = avalon.trace(lambda x: (x.mean() * 0.5 / 2 + 1.0) / 3.0, np.ones((3, 4), np.float32))
    for name, p in BUILTIN:
        g = p(g).check()
        for n in g.nodes:
            if n.op == "const":
                assert isinstance(n.value, np.ndarray), f"{name} left {type(n.value)}"


def test_fusion_alone_leaves_a_group_of_constants_unfused():
    """With only fuse_elementwise (no folding first), a chain over constants
    has no array input: it must not become an input-less fused kernel."""
    from avalon.api import compile_graph
    from avalon.graph import Graph
    from avalon.passes import fuse_elementwise
    g = Graph("g")
    x = g.add_input((4,), np.float32)
    c1, c2 = g.add_const(np.asarray(2.0, np.float32)), g.add_const(np.asarray(3.0, np.float32))
    product = g.add_node("mul", [c1, c2], {}, (), np.float32)
    negated = g.add_node("neg", [product], {}, (), np.float32)
    g.outputs = [g.add_node("add", [x, negated], {}, (4,), np.float32)]
    f = compile_graph(g, passes=[fuse_elementwise])
    np.testing.assert_array_equal(f(np.arange(4, dtype=np.float32))[0], np.arange(4) - 6.0)


def test_codegen_refuses_an_input_less_fused_group_naming_the_pass():
    from avalon.api import compile_graph
    from avalon.graph import Graph, Node
    body = Graph("fused")
    body.made_by = "my_pass"
    c = body.add_const(np.asarray(2.0, np.float32))
    body.outputs = [body.add_node("neg", [c], {}, (), np.float32)]
    g = Graph("g")
    x = g.add_input((), np.float32)
    fused = g.add_node("fused", [], {"body": body}, (), np.float32)
    g.outputs = [g.add_node("add", [x, fused], {}, (), np.float32)]
    with pytest.raises(avalon.GraphError, match="fused group with no inputs, made by the pass 'my_pass'"):
        compile_graph(g)


# -- detect_anomaly -------------------------------------------------------------------------

def _line_of(fn, text):
    """'file:line' of the first line of fn's source containing text."""
    import inspect
    lines, first = inspect.getsourcelines(fn)
    k = next(i for i, line in enumerate(lines) if text in line)
    return f"{inspect.getsourcefile(fn)}:{first + k}"


def _log_loss(w, x):
    h = avalon.log(x @ w)
    return (h * h).mean()


def _sqrt_loss(w, x):
    h = avalon.sqrt(x @ w)
    return h.sum()


def test_detect_anomaly_names_the_forward_op_and_the_users_line():
    w, x = np.ones((3, 2)), np.random.default_rng(3).random((4, 3))
    x[1] = -1.0
    with np.errstate(all="ignore"):
        value, _ = avalon.grad(_log_loss, w, x)
        assert np.isnan(value)  # off: the NaN goes through, as in NumPy
        with avalon.detect_anomaly():
            with pytest.raises(avalon.AnomalyError) as err:
                avalon.grad(_log_loss, w, x)
    msg = str(err.value)
    assert "log produced nan (2 of 8 values, the first at index (1, 0))" in msg
    assert "forward pass" in msg and _line_of(_log_loss, "avalon.log") in msg
    assert "f64[4,2] in [-3, " in msg  # the operand, as it was


def test_detect_anomaly_names_the_backward_op():
    w, x = np.ones((3, 2)), np.random.default_rng(4).random((4, 3))
    x[0] = 0.0
    with np.errstate(all="ignore"), avalon.detect_anomaly():
        with pytest.raises(avalon.AnomalyError, match="backward pass") as err:
            avalon.grad(_sqrt_loss, w, x)
    assert _line_of(_sqrt_loss, "avalon.sqrt") in str(err.value)


def test_detect_anomaly_names_a_non_finite_input_and_checks_jit_and_eager():
    x = np.array([1.0, np.inf])
    f = avalon.jit(lambda x: x * 2.0)
    with avalon.detect_anomaly():
        with pytest.raises(avalon.AnomalyError, match=r"called with args\[0\] holding inf"):
            f(x)
        with np.errstate(all="ignore"), pytest.raises(avalon.AnomalyError, match="log produced nan") as err:
            avalon.log(np.array([-1.0, 2.0]))
    assert __file__ in str(err.value)


def test_detect_anomaly_off_again_runs_the_optimized_code_without_retracing():
    w, x = np.ones((3, 2)), np.random.default_rng(5).random((4, 3))
    gf = avalon.value_and_grad(_sqrt_loss)
    expected = gf(w, x)[0]
    with avalon.detect_anomaly():
        np.testing.assert_allclose(gf(w, x)[0], expected)
        assert "_check.value" in gf.source
    traces = gf.traces
    np.testing.assert_allclose(gf(w, x)[0], expected)
    assert gf.traces == traces and "_check" not in gf.source


def test_detect_anomaly_from_the_environment(tmp_path):
    import os
    import subprocess
    import sys
    script = tmp_path / "nan_step.py"
    script.write_text("import numpy as np, avalon\n"
                      "np.seterr(all='ignore')\n"
                      "f = avalon.jit(lambda x: avalon.log(x) + 1.0)\n"
                      "f(np.array([-1.0, 1.0]))\n")
    env = dict(os.environ, AVALON_DETECT_ANOMALY="1")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "AnomalyError" in run.stderr and f"{script}:3" in run.stderr
    env["AVALON_DETECT_ANOMALY"] = "0"
    assert subprocess.run([sys.executable, str(script)], env=env, timeout=120).returncode == 0


# -- warnings and errors point at the user's line -------------------------------------------

def test_the_retrace_warning_points_at_the_callers_line():
    f = avalon.jit(lambda x: x + 1.0)
    with pytest.warns(RuntimeWarning, match="retracing") as record:
        for n in range(1, avalon.api.RETRACE_WARNING_BUDGET + 3):
            f(np.ones(n, np.float32))
    assert {w.filename for w in record} == {__file__}


def test_model_code_in_the_zoo_or_bench_is_the_users_line():
    """Nodes made inside avalon_zoo's models or avalon_bench's steps are
    attributed to their lines there (the profile's line column), not to the
    script that started the run."""
    namespace = {"__name__": "avalon_bench.fake_steps", "avalon": avalon}
    exec(compile("def step(x):\n    return avalon.exp(x) * 2.0\n", "/bench/fake_steps.py", "exec"), namespace)
    g = avalon.trace(namespace["step"], np.ones(3, np.float32))
    assert {n.loc for n in g.nodes if n.op in ("exp", "mul")} == {"/bench/fake_steps.py:2"}


def test_a_memory_plan_too_large_names_the_value_and_the_line():
    # the outer product feeds a matrix product, so it is a planned buffer (a sum of
    # it alone would be fused into one kernel that never holds it)
    def outer_product(x):
        return ((x[:, None] * x[None, :]) @ x).sum()

    f = avalon.jit(outer_product)
    with pytest.raises(avalon.OutOfMemoryError) as err:
        f(np.ones(400_000))
    msg = str(err.value)
    assert "f64[400000,400000]" in msg and _line_of(outer_product, "x[:, None]") in msg
    assert "smaller batch" in msg and isinstance(err.value, MemoryError)


def test_running_out_of_memory_inside_a_kernel_names_the_node():
    def outer(x):
        return x[:, None] * x[None, :]

    f = avalon.jit(outer)
    with pytest.raises(avalon.OutOfMemoryError, match=r"out of memory in mul making f64\[400000,400000\]") as err:
        f(np.ones(400_000))
    assert _line_of(outer, "x[:, None]") in str(err.value)


# -- bad input gets an Avalon error that says what, where and what to do ---------------------

def test_a_torch_tensor_passed_to_grad_jit_or_an_op_is_refused_with_a_hint():
    torch = pytest.importorskip("torch")
    t = torch.ones(3)
    with pytest.raises(avalon.AvalonError, match=r"args\[1\]\['w'\] is a torch.Tensor") as err:
        avalon.grad(lambda x, m: (x * m["w"]).sum(), np.ones(3, np.float32), {"w": t})
    assert "tensor.detach().cpu().numpy()" in str(err.value) and __file__ in str(err.value)
    with pytest.raises(avalon.AvalonError, match=r"args\[0\] is a torch.Tensor"):
        avalon.jit(lambda x: x * 2.0)(t)
    with pytest.raises(avalon.AvalonError, match="torch.Tensor is not an array type") as err:
        avalon.exp(t)
    assert __file__ in str(err.value)


def test_grad_of_python_numbers_only_says_there_is_nothing_to_differentiate():
    with pytest.raises(avalon.AvalonError, match=r"nothing to differentiate.*args\[0\] holds no floating-point "
                                                 r"array.*np.asarray"):
        avalon.grad(lambda xs: sum(v * v for v in xs), [1.0, 2.0])


def test_item_assignment_on_a_traced_array_suggests_the_functional_form():
    def f(x):
        x[0] = 5.0
        return x.sum()

    with pytest.raises(avalon.AvalonError, match=r"item assignment on a traced f32\[3\] array") as err:
        avalon.grad(f, np.ones(3, np.float32))
    assert "avalon.where" in str(err.value) and _line_of(f, "x[0] = 5.0") in str(err.value)


@pytest.mark.parametrize("make, message", [
    (lambda: avalon.zeros((-1, 3)), r"full: dimension 0 of shape \(-1, 3\) is -1"),
    (lambda: avalon.ones((2, 2.5)), r"dimension 1 of shape \(2, 2.5\) is 2.5 \(float\)"),
    (lambda: avalon.full((2.0,), 1.0), r"dimension 0 of shape \(2.0,\) is 2.0 \(float\)"),
    (lambda: avalon.random_normal((3, -2)), r"random_normal: dimension 1 of shape \(3, -2\) is -2"),
    (lambda: avalon.reshape(np.ones(6), (-2, -3)), r"reshape: dimension 0 of shape \(-2, -3\) is -2"),
    (lambda: avalon.reshape(np.ones(6), (2, 1.5)), r"reshape: dimension 1 of shape \(2, 1.5\) is 1.5"),
])
def test_negative_or_fractional_dimensions_are_refused(make, message):
    with pytest.raises(avalon.ShapeError, match=message) as err:
        make()
    assert __file__ in str(err.value) and "non-negative integers" in str(err.value)


def test_dimensions_inside_a_trace_are_checked_too():
    with pytest.raises(avalon.ShapeError, match=r"dimension 0 of shape \(1.5, 3\)"):
        avalon.jit(lambda x: x + avalon.zeros((1.5, 3), like=x))(np.ones((1, 3), np.float32))


# -- a failed split step leaves the engine's threads ready for the next -------------------------

def test_a_split_step_that_fails_in_the_calling_thread_leaves_the_next_call_right(monkeypatch):
    from avalon import parallel
    if parallel.shard_count() < 2:
        pytest.skip("the engine runs one thread here")
    monkeypatch.setattr(parallel, "MIN_SHARD_ELEMENTS", 0)
    rng = np.random.default_rng(6)
    w = rng.standard_normal((256, 64)).astype(np.float32) * 0.1
    x = rng.standard_normal((4096, 256)).astype(np.float32)

    def loss(w, x, y):
        y = avalon.check_labels(y, 64, ignore_index=-100)  # fails at once; the other thread works on
        logp = avalon.log_softmax(avalon.tanh(avalon.tanh(x @ w) @ w.T @ w))
        return -avalon.mean(avalon.take_along_axis(logp, avalon.expand_dims(y, 1), axis=1))

    good = rng.integers(0, 64, 4096)
    split, whole = avalon.GradFunction(loss, argnums=0), avalon.GradFunction(loss, argnums=0, parallel=False)
    expected = whole(w, x, good)
    for _ in range(6):  # through the schedules' timing calls too
        bad = good.copy()
        bad[4000] = 99  # in the last share: the calling thread's own
        with pytest.raises(avalon.LabelError):
            split(w, x * 2.0, bad)  # the other thread's share differs from the next call's
        value, (g, _, _) = split(w, x, good)
        np.testing.assert_allclose(value, expected[0], rtol=1e-6)
        np.testing.assert_allclose(g, expected[1][0], rtol=1e-5, atol=1e-6)
