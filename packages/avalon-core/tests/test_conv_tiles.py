"""Convolutions whose column matrices exceed the cache budget run over tiles of
output rows (kernels.conv_csn.conv_csn_tiled_*), with the same results."""
import threading

import numpy as np
import pytest
import torch

import avalon
from avalon.kernels import conv_csn as K
from avalon.runtime import threads

rng = np.random.default_rng(5)


def csn(a):
    return np.ascontiguousarray(np.moveaxis(a, 0, -1))


CASES = [  # input shape, out channels, kernel, stride, padding, dilation
    ((4, 3, 9, 8), 5, (3, 3), (1, 1), (1, 1), (1, 1)),
    ((4, 3, 9, 8), 5, (3, 3), (2, 2), (0, 0), (1, 1)),
    ((2, 2, 10, 10), 4, (3, 3), (1, 1), (2, 2), (2, 2)),
    ((3, 1, 7, 7), 2, (2, 3), (1, 2), (1, 0), (1, 1)),
    ((3, 2, 11, 5), 3, (3, 1), (3, 1), ((2, 1), (0, 0)), (1, 1)),   # asymmetric padding
    ((2, 3, 11), 4, (3,), (2,), (1,), (1,)),
    ((2, 2, 5, 6, 4), 3, (3, 2, 3), (1, 1, 1), (1, 0, 1), (1, 1, 1)),
]


class _Threads:
    """A runner with `threads` threads, as kernel_threads() returns."""

    def __init__(self, n):
        self.threads = n

    def __call__(self, jobs):
        out = [None] * len(jobs)

        def one(k):
            out[k] = jobs[k]()
        ts = [threading.Thread(target=one, args=(k,)) for k in range(len(jobs))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return out


@pytest.mark.parametrize("run", [None, _Threads(2), _Threads(3)], ids=["alone", "2 threads", "3 threads"])
@pytest.mark.parametrize("xs, o, k, s, p, d", CASES)
def test_tiled_kernels_equal_the_whole_column_ones(xs, o, k, s, p, d, run):
    x = csn(rng.standard_normal(xs))
    w = rng.standard_normal((o, xs[1]) + k)
    geo = dict(stride=s, padding=p, dilation=d)
    y = K.conv_csn_forward(np, x, w, **geo)
    g = rng.standard_normal(y.shape)
    dx = K.conv_csn_input_grad(np, g, w, input_shape=x.shape, **geo)
    dw = K.conv_csn_weight_grad(np, x, g, weight_shape=w.shape, **geo)
    for rows in (1, 2, 3, y.shape[1]):   # tiles that do and do not divide the output rows
        # the same sums of products (BLAS may block a narrower product differently: rounding only)
        got = K.conv_csn_tiled_forward(np, x, w, tile_rows=rows, run=run, **geo)
        np.testing.assert_allclose(got, y, rtol=1e-12, atol=1e-12)
        got = K.conv_csn_tiled_input_grad(np, g, w, input_shape=x.shape, tile_rows=rows, run=run, **geo)
        np.testing.assert_allclose(got, dx, rtol=1e-12, atol=1e-12)
        got = K.conv_csn_tiled_weight_grad(np, x, g, weight_shape=w.shape, tile_rows=rows, run=run, **geo)
        np.testing.assert_allclose(got, dw, rtol=1e-12, atol=1e-12)


def test_tiled_kernels_write_into_a_given_output():
    x, w = csn(rng.standard_normal((2, 3, 6, 5))).astype(np.float32), rng.standard_normal((4, 3, 3, 3))
    w = w.astype(np.float32)
    geo = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    want = K.conv_csn_forward(np, x, w, **geo)
    out = np.full(want.shape, np.nan, np.float32)
    assert K.conv_csn_tiled_forward(np, x, w, tile_rows=2, out=out, **geo) is out
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    dx = np.full(x.shape, np.nan, np.float32)
    assert K.conv_csn_tiled_input_grad(np, want, w, input_shape=x.shape, tile_rows=2, out=dx, **geo) is dx
    np.testing.assert_allclose(dx, K.conv_csn_input_grad(np, want, w, input_shape=x.shape, **geo), rtol=1e-5)


def test_tiling_rule_fires_only_above_the_budget():
    # (C*K, out*N) columns of 4-byte values; 10 output rows
    assert K.column_tile_rows((100, 1000), (10, 5), 4, budget=400_000) is None     # exactly the budget
    # a row is 100 * 100 * 4 = 40 kB: tiles of at most half the budget
    assert K.column_tile_rows((100, 1000), (10, 5), 4, budget=399_999) == 4
    assert K.column_tile_rows((100, 1000), (10, 5), 4, budget=200_000) == 2
    assert K.column_tile_rows((100, 1000), (10, 5), 4, budget=1000) == 1               # at least a row
    assert K.column_tile_rows((100, 1000), (10, 5), 8, budget=399_999) == 2             # dtype size counts


def conv_bn_loss(params, x):
    """conv -> batch norm (training statistics) -> relu, twice, then a scalar."""
    h = x
    for w, gamma, beta, geo in params:
        h = avalon.conv2d(h, w, None, **geo)
        mean = avalon.mean(h, (0, 2, 3), keepdims=True)
        centered = h - mean
        var = avalon.mean(centered * centered, (0, 2, 3), keepdims=True)
        h = centered / avalon.sqrt(var + 1e-5) * gamma.reshape(1, -1, 1, 1) + beta.reshape(1, -1, 1, 1)
        h = avalon.relu(h)
    return avalon.sum(h * h) / h.size


def torch_conv_bn_loss(params, x):
    h = x
    for w, gamma, beta, geo in params:
        h = torch.nn.functional.conv2d(h, w, **geo)
        h = torch.nn.functional.batch_norm(h, None, None, gamma, beta, training=True, eps=1e-5)
        h = torch.relu(h)
    return (h * h).sum() / h.numel()


def _conv_bn_net():
    layers = [(5, 3, (3, 3), dict(stride=1, padding=1, dilation=1)),
              (6, 5, (3, 2), dict(stride=2, padding=(2, 1), dilation=(2, 1)))]
    return [(rng.standard_normal((o, c) + k).astype(np.float32) * 0.4,
             (1 + 0.1 * rng.standard_normal(o)).astype(np.float32),
             (0.1 * rng.standard_normal(o)).astype(np.float32), geo) for o, c, k, geo in layers]


@pytest.fixture
def columns_path(monkeypatch):
    """The layout pass without direct convolutions: im2col + matmul, tiled above the budget."""
    from avalon.backends import cpu
    monkeypatch.setattr(cpu, "_builds_c_kernels", lambda: False)


def _tiled_ops(f):
    return [n for n in f.graph.nodes if n.op in ("conv_csn", "conv_csn_input_grad", "conv_csn_weight_grad")]


@pytest.mark.parametrize("budget, tiled", [(None, False), (64, True)], ids=["default budget", "tiny budget"])
def test_conv_batch_norm_gradients_equal_torch_tiled_or_not(monkeypatch, columns_path, budget, tiled):
    if budget is not None:
        monkeypatch.setattr(K, "COLUMN_BUDGET_BYTES", budget)
    params, x = _conv_bn_net(), rng.standard_normal((7, 3, 13, 11)).astype(np.float32)
    f = avalon.GradFunction(conv_bn_loss, argnums=(0, 1))
    loss, (gp, gx) = f(params, x)
    # the rule, on sizes: these columns are far below the default budget, above a 64-byte one
    ops = _tiled_ops(f)
    assert bool(ops) == tiled
    if tiled:
        assert "im2col_csn" not in {n.op for n in f.graph.nodes}
        assert all(n.attrs["tile_rows"] == 1 for n in ops)
    tp = [tuple(torch.tensor(a, requires_grad=True) for a in (w, gm, bt)) + (geo,) for w, gm, bt, geo in params]
    tx = torch.tensor(x, requires_grad=True)
    want = torch_conv_bn_loss(tp, tx)
    want.backward()
    np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-4, atol=1e-6)
    for (gw, ggm, gbt, _), (w, gm, bt, _) in zip(gp, tp):
        for got, ref in ((gw, w), (ggm, gm), (gbt, bt)):
            np.testing.assert_allclose(got, ref.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_tiled_and_whole_column_steps_agree(monkeypatch, columns_path):
    params, x = _conv_bn_net(), rng.standard_normal((6, 3, 12, 9)).astype(np.float32)
    whole = avalon.GradFunction(conv_bn_loss, argnums=(0, 1))
    l0, (gp0, gx0) = whole(params, x)
    # the first layer's columns (27 x 648 floats, 70 kB) are over the budget, the second's (21.6 kB) not
    monkeypatch.setattr(K, "COLUMN_BUDGET_BYTES", 40_000)
    tiled = avalon.GradFunction(conv_bn_loss, argnums=(0, 1))
    l1, (gp1, gx1) = tiled(params, x)
    assert not _tiled_ops(whole)
    assert [n.attrs["tile_rows"] for n in _tiled_ops(tiled)] == [3, 3, 3]   # 5.8 kB rows, 20 kB tiles
    assert "im2col_csn" in {n.op for n in tiled.graph.nodes}
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(gx1, gx0, rtol=1e-5, atol=1e-7)
    for a, b in zip(gp1, gp0):
        for u, v in zip(a[:3], b[:3]):
            np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_kernel_threads_run_alone_inside_a_share_of_the_engine_threads():
    if threads.shard_count() < 2:
        pytest.skip("one core: kernels never share out their work")
    assert threads.kernel_threads() is not None
    seen = threads._workers(threads.shard_count() - 1).run(
        [(threads.kernel_threads, ())] * threads.shard_count())
    assert seen == [None] * threads.shard_count()   # workers and the caller's own share alike
    assert threads.kernel_threads() is not None     # and the caller is free again afterwards


def test_kernel_threads_give_each_job_its_result_with_fewer_jobs_than_threads():
    run = threads.kernel_threads()
    if run is None:
        pytest.skip("one core")
    assert run([lambda: "a"]) == ["a"]
    assert run([lambda k=k: k * k for k in range(run.threads)]) == [k * k for k in range(run.threads)]
