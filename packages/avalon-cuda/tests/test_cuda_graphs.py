"""CUDA-graph replay of compiled functions on a GPU (experimental): a replayed
grad step equals the uncaptured step, a training loop whose grad and update
steps are replayed follows the CPU's loss curve, random draws stay fresh per
replay, and what cannot be captured runs as before.  The core does not call
the hook yet, so these tests do what it would do after code generation:
`entry.compiled = backend.wrap_compiled(entry.compiled)`.  Skipped, with the
reason, where no GPU is usable (test_graphs_bookkeeping.py checks the same
bookkeeping on the CPU)."""
import numpy as np
import pytest

import avalon
from avalon import tree
from avalon.backends import backend_of, get_backend
from avalon.codegen import generate
from avalon_cuda import gpu_available
from avalon_cuda.graphs import CapturedFunction

_OK, _WHY = gpu_available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"needs a usable CUDA GPU: {_WHY}")


def _host(x):
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    return np.asarray(backend_of(x).to_host(x))


def _cuda():
    return get_backend(avalon.device("cuda"))


def loss_fn(params, x, labels):
    h = avalon.relu(x @ params["w0"] + params["b0"])
    h = avalon.tanh(h @ params["w1"] + params["b1"])
    logp = avalon.log_softmax(h @ params["w2"] + params["b2"], axis=-1)
    return -avalon.mean(avalon.take_along_axis(logp, labels[:, None], axis=1))


def init(seed=0, sizes=(16, 48, 32, 4)):
    rng = np.random.default_rng(seed)
    p = {}
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        p[f"w{k}"] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        p[f"b{k}"] = np.zeros(b, np.float32)
    return p


def data(seed=1, n=64):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 16)).astype(np.float32), rng.integers(0, 4, n).astype(np.int64)


def sgd(params, grads, lr):
    return [avalon.assign(params[k], params[k] - lr * grads[k]) for k in sorted(params)]


def hook(fn):
    """What the core would do right after compiling fn's current signature."""
    entry = fn._last()
    entry.compiled = entry.compiled.backend.wrap_compiled(entry.compiled)
    return entry.compiled


def test_a_replayed_grad_step_equals_the_uncaptured_step():
    params = avalon.to_device(init(), "cuda")
    vg = avalon.value_and_grad(loss_fn, argnums=0)
    vg(params, *avalon.to_device(data(), "cuda"))
    compiled = vg._last().compiled
    cap = _cuda().capture(compiled, enabled=True)
    assert isinstance(cap, CapturedFunction)
    for k in range(5):
        leaves = tree.flatten((params, *avalon.to_device(data(seed=k), "cuda")))[0]
        got, want = cap.fn(*leaves), compiled.fn(*leaves)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_allclose(_host(g), _host(w), rtol=1e-6, atol=1e-7)
    assert cap.reason is None, cap.reason
    assert cap.captured and cap.replays == 4


def _train(device, captured, steps=20):
    params = avalon.to_device(init(), device)
    x, labels = avalon.to_device(data(), device)
    lr = avalon.to_device(np.asarray(0.3, np.float32), device)
    vg = avalon.value_and_grad(lambda p, x, y: loss_fn(p, x, y), argnums=0)
    update = avalon.jit(sgd)
    losses, wrapped = [], []
    for step in range(steps):
        loss, (g, _, _) = vg(params, x, labels)
        update(params, g, lr)
        if captured and step == 0:
            wrapped = [hook(vg), hook(update)]
        losses.append(float(_host(loss)))
    return np.array(losses), avalon.to_device(params, "cpu"), wrapped


def test_training_with_replayed_grad_and_update_steps_follows_the_cpu():
    cpu_losses, cpu_params, _ = _train("cpu", captured=False)
    plain_losses, _, _ = _train("cuda", captured=False)
    losses, params, wrapped = _train("cuda", captured=True)
    assert all(isinstance(w, CapturedFunction) and w.captured and w.reason is None for w in wrapped), \
        [getattr(w, "reason", w) for w in wrapped]
    # 19 wrapper calls (steps 2..20): the first runs as compiled, every later one (the first of them
    # captures) launches the graph
    assert wrapped[0].replays == 18 and wrapped[1].replays == 18
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, cpu_losses, rtol=1e-4, atol=1e-5)
    assert losses[-1] < 0.9 * losses[0]
    for k in cpu_params:
        np.testing.assert_allclose(params[k], cpu_params[k], rtol=1e-3, atol=1e-4, err_msg=k)


def test_replays_draw_fresh_random_numbers_and_capture_again_after_manual_seed():
    j = avalon.jit(lambda x: x + avalon.random_normal(x.shape, like=x))
    x = avalon.to_device(np.zeros(4096, np.float32), "cuda")
    j(x)
    cap = hook(j)
    outs = [_host(j(x)) for _ in range(4)]
    assert cap.captured and cap.replays == 3
    for a in range(4):
        for b in range(a + 1, 4):
            assert not np.array_equal(outs[a], outs[b])
        assert abs(outs[a].std() - 1) < 0.1
    graph_before = cap.cuda_graph
    avalon.manual_seed(11)
    j(x)
    assert cap.cuda_graph is not graph_before and cap.captured


def test_what_cannot_be_captured_runs_as_compiled_and_says_why():
    vg = avalon.value_and_grad(loss_fn, argnums=0)
    args = avalon.to_device((init(), *data()), "cuda")
    vg(*args)
    profiled = generate(vg.graph, _cuda(), "profiled", profile=True)
    cap = _cuda().capture(profiled, enabled=True)
    leaves = tree.flatten(args)[0]
    want = vg._last().compiled.fn(*leaves)
    for _ in range(3):
        for g, w in zip(cap.fn(*leaves), want):
            np.testing.assert_allclose(_host(g), _host(w), rtol=1e-6, atol=1e-7)
    assert not cap.captured and "profiling" in cap.reason


def test_AVALON_CUDA_GRAPHS_0_leaves_compiled_functions_alone(monkeypatch):
    vg = avalon.value_and_grad(loss_fn, argnums=0)
    vg(*avalon.to_device((init(), *data()), "cuda"))
    compiled = vg._last().compiled
    monkeypatch.setenv("AVALON_CUDA_GRAPHS", "0")
    assert _cuda().wrap_compiled(compiled) is compiled
    monkeypatch.setenv("AVALON_CUDA_GRAPHS", "1")
    assert isinstance(_cuda().wrap_compiled(compiled), CapturedFunction)
