"""Cheap elementwise values recomputed in each consumer's kernel instead of
stored (passes.fusion.recompute_cheap): which values are, that the graph then
writes fewer full-size arrays, and that results do not change."""
import numpy as np
import pytest

import avalon
from avalon import passes
from avalon.primitive import PRIMITIVES

rng = np.random.default_rng(5)
X = rng.standard_normal((6, 40)).astype(np.float32)
ROW = rng.standard_normal((1, 40)).astype(np.float32)


def optimized(f, *args):
    return passes.run_pipeline(avalon.trace(f, *args), check=True)


def stored(graph, shape):
    """Nodes of the graph (not inputs) that write an array of `shape`."""
    return [n for n in graph.nodes if n.op not in ("input", "const") and n.shape == tuple(shape)
            and not PRIMITIVES[n.op].view]


def normalize(x, m):
    """A normalization: (x - m) is read by a sum of squares and by the output."""
    centered = x - m
    var = avalon.mean(centered * centered, axis=0, keepdims=True)
    return avalon.relu(centered * (1.0 / avalon.sqrt(var + 1e-5)) * 2.0 + 0.5)


def test_a_centred_value_read_by_two_kernels_is_computed_in_each_not_stored():
    g = optimized(normalize, X, ROW)
    # only the output is written at full size: x - m and its scaled copies are recomputed
    assert [n.op for n in stored(g, X.shape)] == ["fused"]
    assert g.outputs == stored(g, X.shape)
    sums = [n for n in g.nodes if n.op == "fused" and n.shape == (1, 40)]
    assert sums and any(b.op == "sub" for b in sums[0].attrs["body"].nodes)


def test_without_the_pass_the_centred_value_is_stored():
    pipeline = [p for p in passes.default_pipeline() if p[0] != "recompute_cheap"]
    g = passes.run_pipeline(avalon.trace(normalize, X, ROW), pipeline, check=True)
    assert len(stored(g, X.shape)) >= 2


def test_results_are_unchanged():
    centered = X - ROW
    var = np.mean(centered * centered, axis=0, keepdims=True)
    want = np.maximum(centered / np.sqrt(var + 1e-5) * 2.0 + 0.5, 0)
    np.testing.assert_allclose(avalon.jit(normalize)(X, ROW), want, rtol=2e-5, atol=1e-6)


def test_a_costly_op_is_stored_once():
    def f(x):
        e = avalon.exp(x)
        return avalon.sum(e * e, axis=0), e + 1.0
    g = optimized(f, X)
    exps = [n for n in g.nodes if n.op == "exp" or (n.op == "fused" and any(
        b.op == "exp" for b in n.attrs["body"].nodes))]
    assert len(exps) == 1


def _muls(g):
    return sum(1 for n in g.nodes if n.op == "mul" or (n.op == "fused" and any(
        b.op == "mul" for b in n.attrs["body"].nodes)))


def test_a_cheap_op_of_two_stored_arrays_is_recomputed_for_two_readers_only():
    y = rng.standard_normal(X.shape).astype(np.float32)
    # two readers: copies read 2 x 2 arrays; storing reads 2, writes 1, and is read twice
    g = optimized(lambda x, y: (avalon.sum(avalon.relu(x * y), axis=0), avalon.tanh(x * y)), X, y)
    assert _muls(g) == 2
    # three readers: copies would read 3 x 2 arrays, storing moves 2 + 1 + 3
    g = optimized(lambda x, y: (avalon.sum(avalon.relu(x * y), axis=0), avalon.tanh(x * y),
                                avalon.exp(x * y)), X, y)
    assert _muls(g) == 1


def test_a_value_the_graph_returns_is_stored_and_not_recomputed():
    g = optimized(lambda x, m: (x - m, avalon.sum((x - m) ** 2, axis=0)), X, ROW)
    subs = [n for n in g.nodes if n.op == "sub" or (n.op == "fused" and any(
        b.op == "sub" for b in n.attrs["body"].nodes))]
    assert len(subs) == 1


@pytest.mark.parametrize("split", [False, True], ids=["one-thread", "split"])
def test_a_batchnorm_step_matches_torch(split):
    torch = pytest.importorskip("torch")
    from avalon import nn
    x = rng.standard_normal((32, 4, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.3
    gamma, beta = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)

    def loss(p, x):
        h = avalon.conv2d(x, p["w"], padding=1)
        h = nn.functional.batch_norm(h, None, None, p["gamma"], p["beta"], training=True)
        return avalon.mean(avalon.relu(h) ** 2)
    p = {"w": w, "gamma": gamma, "beta": beta}
    value, (grads, _) = avalon.value_and_grad(loss, argnums=(0, 1), parallel=split)(p, x)

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}
    h = torch.nn.functional.conv2d(torch.tensor(x), tp["w"], padding=1)
    h = torch.nn.functional.batch_norm(h, None, None, tp["gamma"], tp["beta"], training=True)
    tl = torch.mean(torch.relu(h) ** 2)
    tl.backward()
    np.testing.assert_allclose(value, tl.item(), rtol=1e-5)
    for k in p:
        np.testing.assert_allclose(grads[k], tp[k].grad.numpy(), rtol=2e-4, atol=2e-5, err_msg=k)


def test_the_batch_splits_work_counts_what_fused_groups_compute():
    """Fusing and recomputing make fewer, larger kernels: the sharded work a
    split is weighed by (against its thread barriers) must not shrink."""
    from avalon.passes import sharding
    x = rng.standard_normal((16, 8, 5, 5)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.3

    def loss(w, x):
        h = x
        for _ in range(3):
            h = avalon.conv2d(h, w, padding=1)
            h = avalon.relu(avalon.nn.functional.batch_norm(h, None, None, training=True))
        return avalon.mean(h ** 2)
    traced = avalon.trace(avalon.value_and_grad(loss), w, x)

    def work(pipeline):
        g = passes.run_pipeline(traced.copy(), pipeline)
        batch = {g.inputs[1]}
        state, ctx = sharding._propagate(g, batch, 16, set())
        return sharding.sharded_work(state, ctx), len(g.nodes)
    full = passes.default_pipeline()
    unfused, n_unfused = work([p for p in full if p[0] not in ("recompute_cheap", "fuse_elementwise")])
    fused, n_fused = work(full)
    assert n_fused < n_unfused
    assert fused >= unfused


def test_a_copy_never_reads_through_a_view_an_array_written_before_it():
    """v = x - p (p read through a reshape) is read before and after p is
    written: a copy of v placed after the write would read the new p."""
    def f(p, x):
        v = x - p.reshape(1, 40)
        before = avalon.sum(v * v, axis=0)
        avalon.assign(p, p * 0.5 + 1.0)
        return before, avalon.relu(v) * 2.0 + 0.5

    p = rng.standard_normal(40).astype(np.float32)
    v = X - p.reshape(1, 40)
    want = (np.sum(v * v, axis=0), np.maximum(v, 0) * 2.0 + 0.5)
    p_run = p.copy()
    got = avalon.jit(f)(p_run, X)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(p_run, p * 0.5 + 1.0, rtol=1e-6)
