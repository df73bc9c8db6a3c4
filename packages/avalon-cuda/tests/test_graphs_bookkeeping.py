"""CapturedFunction's bookkeeping, checked without a GPU: a NumPy stand-in for
the CUDA runtime records a "graph" whose launch reruns the function on the
static inputs and writes into the outputs the capture returned, as a real
graph writes into the addresses it recorded.  What is checked: when it
captures, that replays equal uncaptured calls, that writes into inputs
(avalon.assign) reach the caller's arrays, that outputs are fresh arrays, and
every case that must run uncaptured.  test_cuda_graphs.py checks the real
capture on a GPU."""
import numpy as np
import pytest

import avalon
from avalon.backends import get_backend
from avalon.codegen import CompiledGraph, generate
from avalon_cuda import graphs
from avalon_cuda.graphs import CapturedFunction, capture_blockers, written_inputs

CPU = get_backend(avalon.device("cpu"))


class FakeGraph:
    def __init__(self, fn, static_in, outs):
        self.fn, self.static_in, self.outs, self.launches = fn, static_in, outs, 0

    def launch(self):
        self.launches += 1
        for o, new in zip(self.outs, self.fn(*self.static_in)):
            np.copyto(o, new)


class NumpyRuntime:
    """The runtime interface of graphs.CupyRuntime, on NumPy arrays."""
    array_type = np.ndarray

    def __init__(self, fail_capture=None, scatter_add=True):
        self.fail_capture, self.scatter_add = fail_capture, scatter_add
        self.captures = 0

    def has_scatter_add(self):
        return self.scatter_add

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def copy(self, dst, src):
        np.copyto(dst, src)

    def copy_new(self, a):
        return a.copy()

    def extent(self, a):
        return graphs._extent(a.__array_interface__["data"][0], a.shape, a.strides, a.itemsize)

    def capture(self, fn, static_in, refill):
        self.captures += 1
        fn(*static_in)                       # the warm-up on the capture stream
        refill()
        if self.fail_capture:
            raise RuntimeError(self.fail_capture)
        # a capture executes nothing: run it, then put the inputs back as they were
        before = [s.copy() for s in static_in]
        # NumPy gives 0-d results as scalars; CuPy as arrays the graph writes into
        outs = tuple(o if isinstance(o, np.ndarray) else np.array(o) for o in fn(*static_in))
        for s, b in zip(static_in, before):
            np.copyto(s, b)
        return outs, FakeGraph(fn, static_in, outs), None

    def launch(self, graph):
        graph.launch()


def _loss(w, b, x, y):
    h = avalon.tanh(x @ w + b)
    return avalon.mean((h - y) ** 2)


def _sgd(params, grads, lr):
    return [avalon.assign(p, p - lr * g) for p, g in zip(params, grads)]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 3)).astype(np.float32)
    b = np.zeros(3, np.float32)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    y = rng.standard_normal((8, 3)).astype(np.float32)
    return w, b, x, y


def _compiled(f, *args):
    f(*args)
    compiled = f._last().compiled
    assert isinstance(compiled, CompiledGraph)
    return compiled


def _grad_and_update():
    w, b, x, y = _data()
    vg = avalon.value_and_grad(_loss)
    grad_c = _compiled(vg, w, b, x, y)
    lr = np.asarray(0.1, np.float32)
    upd = avalon.jit(_sgd)
    upd_c = _compiled(upd, [w.copy(), b.copy()], [w, b], lr)
    return grad_c, upd_c


def test_written_inputs_are_the_assign_targets():
    grad_c, upd_c = _grad_and_update()
    assert written_inputs(grad_c.graph) == set()
    assert written_inputs(upd_c.graph) == {0, 1}          # the params; not the grads, not lr


def test_the_first_call_runs_as_compiled_then_the_graph_is_captured_and_replayed():
    grad_c, _ = _grad_and_update()
    rt = NumpyRuntime()
    cap = CapturedFunction(grad_c, CPU, runtime=rt)
    assert cap.fn == cap.__call__ and cap.source == grad_c.source and cap.graph is grad_c.graph
    for k in range(5):
        args = _data(seed=k)                             # new values, same signature
        got = cap.fn(*args)
        want = grad_c.fn(*args)
        assert len(got) == len(want)
        for g, r in zip(got, want):
            np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-7)
        assert cap.captured == (k >= 1), k
    assert rt.captures == 1 and cap.replays == 4 and cap.cuda_graph.launches == 4 and cap.reason is None


def test_outputs_are_fresh_arrays_the_next_replay_does_not_overwrite():
    grad_c, _ = _grad_and_update()
    cap = CapturedFunction(grad_c, CPU, runtime=NumpyRuntime())
    cap.fn(*_data(0))
    first = cap.fn(*_data(1))
    kept = [a.copy() for a in first]
    second = cap.fn(*_data(2))
    for a, k in zip(first, kept):
        np.testing.assert_array_equal(a, k)
    assert all(a is not s for a in second for s in cap._static_out)


def test_writes_into_inputs_reach_the_callers_arrays():
    grad_c, upd_c = _grad_and_update()
    cap = CapturedFunction(upd_c, CPU, runtime=NumpyRuntime())
    w, b, x, y = _data()
    lr = np.asarray(0.1, np.float32)
    ref_w, ref_b = w.copy(), b.copy()
    for step in range(6):
        _, (gw, gb, _, _) = avalon.grad(_loss, w, b, x, y)
        cap.fn(w, b, gw, gb, lr)                    # leaves: params, grads, lr
        upd_c.fn(ref_w, ref_b, gw, gb, lr)
        np.testing.assert_allclose(w, ref_w, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
        np.testing.assert_allclose(b, ref_b, rtol=1e-6, atol=1e-7, err_msg=f"step {step}")
    assert cap.replays == 5


def test_a_failed_capture_falls_back_for_good_and_says_why():
    grad_c, _ = _grad_and_update()
    rt = NumpyRuntime(fail_capture="operation not permitted when stream is capturing")
    cap = CapturedFunction(grad_c, CPU, runtime=rt)
    for k in range(4):
        args = _data(k)
        for g, r in zip(cap.fn(*args), grad_c.fn(*args)):
            np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-7)
    assert not cap.captured and rt.captures == 1
    assert "capture failed: RuntimeError: operation not permitted" in cap.reason


def test_calls_that_do_not_fit_the_signature_run_uncaptured():
    grad_c, _ = _grad_and_update()

    class Spy:
        graph, source = grad_c.graph, grad_c.source
        calls = []

        def fn(self, *args):
            self.calls.append(args)
            return grad_c.fn(*args)
    spy = Spy()
    cap = CapturedFunction(spy, CPU, runtime=NumpyRuntime())
    w, b, x, y = _data()
    cap.fn(w, b, x, y)
    cap.fn(w, b, x, y)
    assert cap.captured and cap.replays == 1
    for bad in [(w.astype(np.float64), b, x, y), (w, b, x[:4], y), (w, b, x), (w.tolist(), b, x, y)]:
        assert not cap._fits(bad)
    n = len(spy.calls)
    wrong = (w, b, x[:4], y[:4])
    with pytest.raises(ValueError):                     # handed to the compiled function, which refuses it
        cap.fn(*wrong)
    assert len(spy.calls) == n + 1 and spy.calls[-1][2].shape == (4, 4)
    assert cap.replays == 1


def test_an_aliased_written_argument_runs_uncaptured():
    _, upd_c = _grad_and_update()
    cap = CapturedFunction(upd_c, CPU, runtime=NumpyRuntime())
    w, b, _, _ = _data()
    lr = np.asarray(0.1, np.float32)
    g = np.ones_like(w)
    cap.fn(w, b, g, np.ones_like(b), lr)
    cap.fn(w, b, g, np.ones_like(b), lr)
    assert cap.replays == 1
    ref = w.copy()
    cap.fn(w, b, w, np.ones_like(b), lr)                # the gradient IS the parameter
    np.testing.assert_allclose(w, ref - 0.1 * ref, rtol=1e-6)
    assert cap.replays == 1
    # read-only arguments may alias each other
    cap.fn(w, b, g, g[0], lr)
    assert cap.replays == 2


def test_re_seeding_captures_again():
    def noisy(x):
        return x + avalon.random_normal(x.shape, like=x)
    j = avalon.jit(noisy)
    x = np.zeros(5, np.float32)
    compiled = _compiled(j, x)
    rt = NumpyRuntime()
    cap = CapturedFunction(compiled, CPU, runtime=rt)
    cap.fn(x), cap.fn(x), cap.fn(x)
    assert rt.captures == 1
    avalon.manual_seed(3)                               # a new generator: the old graph holds the old one
    cap.fn(x)
    assert rt.captures == 2 and cap.captured


def test_profiling_and_missing_scatter_add_block_capture():
    grad_c, _ = _grad_and_update()
    profiled = generate(grad_c.graph, CPU, "profiled", profile=True)
    assert "profiling" in capture_blockers(profiled, NumpyRuntime())[0]
    cap = CapturedFunction(profiled, CPU, runtime=NumpyRuntime())
    args = _data()
    cap.fn(*args), cap.fn(*args)
    assert not cap.captured and "profiling" in cap.reason

    def pick(x, i):
        return avalon.sum(x[i] ** 2)
    vg = avalon.value_and_grad(pick, argnums=0)
    c = _compiled(vg, np.ones((4, 3), np.float32), np.array([0, 2, 2]))
    assert any("getitem_grad" in r for r in capture_blockers(c, NumpyRuntime(scatter_add=False)))
    assert capture_blockers(c, NumpyRuntime(scatter_add=True)) == []


@pytest.mark.parametrize("value,enabled", [(None, True), ("1", True), ("0", False), ("off", False),
                                           ("false", False), ("yes", True)])
def test_AVALON_CUDA_GRAPHS_switches_capture(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv(graphs.ENV, raising=False)
    else:
        monkeypatch.setenv(graphs.ENV, value)
    assert graphs.graphs_enabled() is enabled
