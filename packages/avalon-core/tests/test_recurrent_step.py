"""A recurrent training step (an LSTM written with core ops) through the
passes that make it fast: merge_sums (slice gradients into one scatter, the
per-step weight products into one matmul), fuse_views (gate slices read in
place by C kernels) and the batch split across threads (sharding rules of
getitem, getitem_grad, scatter_slices and concatenate).  Gradients are checked
against PyTorch and against the step run whole."""
import numpy as np
import pytest

import avalon
from avalon import parallel, passes
from avalon.ops._sharding import NoSplit, R, S
from avalon.ops.indexing import getitem_p
from avalon.parallel import ShardedFunction
from avalon.passes.sharding import split_batch

torch = pytest.importorskip("torch")
rng = np.random.default_rng(7)
N, T, D, H, C = 8, 5, 3, 16, 3


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_SHARD_ELEMENTS", 0)


def params():
    s = 0.5
    return {"w_ih": rng.standard_normal((4 * H, D)).astype(np.float32) * s,
            "w_hh": rng.standard_normal((4 * H, H)).astype(np.float32) * s,
            "b": rng.standard_normal((4 * H,)).astype(np.float32) * s,
            "w_out": rng.standard_normal((H, C)).astype(np.float32) * s}


def lstm_loss(p, x, y):
    xs = avalon.swapaxes(x, 0, 1)                      # (T, N, D)
    proj = xs @ p["w_ih"].T + p["b"]
    h = avalon.zeros((x.shape[0], H), x.dtype, like=x)
    c = h
    for t in range(xs.shape[0]):
        i, f, g, o = avalon.split(proj[t] + h @ p["w_hh"].T, 4, axis=-1)
        c = avalon.sigmoid(f) * c + avalon.sigmoid(i) * avalon.tanh(g)
        h = avalon.sigmoid(o) * avalon.tanh(c)
    logp = avalon.log_softmax(h @ p["w_out"])
    return -avalon.mean(avalon.take_along_axis(logp, avalon.expand_dims(y, 1), axis=1))


def torch_grads(p, x, y):
    tp = {k: torch.from_numpy(v).requires_grad_(True) for k, v in p.items()}
    xs = torch.from_numpy(x).transpose(0, 1)
    proj = xs @ tp["w_ih"].T + tp["b"]
    h = torch.zeros(x.shape[0], H)
    c = h
    for t in range(xs.shape[0]):
        i, f, g, o = torch.split(proj[t] + h @ tp["w_hh"].T, H, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    torch.nn.functional.cross_entropy(h @ tp["w_out"], torch.from_numpy(y)).backward()
    return {k: v.grad.numpy() for k, v in tp.items()}


def batch():
    return rng.standard_normal((N, T, D)).astype(np.float32), rng.integers(0, C, N)


def test_the_step_graph_is_merged_and_reads_gate_slices_in_place():
    p, (x, y) = params(), batch()
    fn = avalon.value_and_grad(lstm_loss, argnums=0, parallel=False)
    _, (grads, *_) = fn(p, x, y)
    ops = [n.op for n in fn.graph.nodes]
    assert ops.count("getitem_grad") == 0
    assert ops.count("scatter_slices") == T + 1        # the gates of each step, and the input projection
    assert ops.count("getitem") == 0                   # every slice is read inside a kernel
    pipeline = [q for q in passes.default_pipeline() if q[0] != "merge_sums"]
    plain = avalon.value_and_grad(lstm_loss, argnums=0, parallel=False, passes=pipeline)
    plain(p, x, y)
    plain_ops = [n.op for n in plain.graph.nodes]
    assert plain_ops.count("getitem_grad") == T + T * 4   # each step's row, its 4 gates
    # the T products h_t^T @ g_t of dW_hh are one matmul of joined operands
    assert ops.count("matmul") == plain_ops.count("matmul") - (T - 1) and ops.count("concatenate") == 2
    expect = torch_grads(p, x, y)
    for k in p:
        np.testing.assert_allclose(grads[k], expect[k], rtol=1e-4, atol=1e-6)


def test_the_step_is_split_across_threads_and_matches_the_whole_step():
    p, (x, y) = params(), batch()
    split = avalon.value_and_grad(lstm_loss, argnums=0)
    whole = avalon.value_and_grad(lstm_loss, argnums=0, parallel=False)
    l1, (g1, *_) = split(p, x, y)
    l0, (g0, *_) = whole(p, x, y)
    candidates = [type(c) for _, c in split._last().compiled.candidates]
    assert ShardedFunction in candidates
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for k in p:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-5, atol=1e-7)


def _node(op, inputs, attrs, shape):
    from avalon.graph import Node
    return Node(op, inputs, attrs, shape, np.float32)


def test_getitem_keeps_the_batch_axis_only_when_it_takes_it_whole():
    x = _node("input", [], {}, (8, 6))
    rule = getitem_p.rule("sharding")
    whole = _node("getitem", [x], {"index": (("slice", 0, 8, 1), ("slice", 2, 4, 1))}, (8, 2))
    assert rule(whole, [S(0)], None) == S(0)
    row = _node("getitem", [x], {"index": (("new",), ("slice", 0, 8, 1), ("int", 1))}, (1, 8))
    assert rule(row, [S(0)], None) == S(1)
    assert rule(row, [R], None) == R
    part = _node("getitem", [x], {"index": (("slice", 0, 4, 1),)}, (4, 6))
    with pytest.raises(NoSplit):
        rule(part, [S(0)], None)


def test_slicing_into_the_batch_keeps_the_step_whole():
    def f(w, x):
        return avalon.sum(avalon.tanh(x[: N // 2] @ w))
    w, x = rng.standard_normal((D, 2)).astype(np.float32), rng.standard_normal((N, D)).astype(np.float32)
    g = avalon.trace(f, w, x)
    assert split_batch(g, {g.inputs[1]}, 2) is None
