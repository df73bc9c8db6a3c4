"""Batch splitting across engine-owned threads (avalon.parallel)."""
import numpy as np
import pytest

import avalon
from avalon import parallel
from avalon.parallel import ShardedFunction

rng = np.random.default_rng(5)


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch):
    monkeypatch.setattr(parallel, "MIN_SHARD_ELEMENTS", 0)


def mlp():
    return {"w1": rng.standard_normal((8, 16)).astype(np.float32) * 0.3,
            "w2": rng.standard_normal((16, 4)).astype(np.float32) * 0.3}


def mean_loss(m, x, y):
    h = avalon.tanh(x @ m["w1"])
    logp = avalon.log_softmax(h @ m["w2"])
    return -avalon.mean(avalon.take_along_axis(logp, avalon.expand_dims(y, 1), axis=1))


def compiled_kind(fn):
    """ShardedFunction when a batch-split schedule was compiled (it is timed
    against the one-thread schedules and may or may not win)."""
    compiled = fn._last().compiled
    if isinstance(compiled, parallel.Autotuned):
        kinds = [type(c) for _, c in compiled.candidates]
        return ShardedFunction if ShardedFunction in kinds else kinds[0]
    return type(compiled)


def test_a_batch_mean_loss_is_split_and_matches_one_thread():
    m, x, y = mlp(), rng.standard_normal((32, 8)).astype(np.float32), rng.integers(0, 4, 32)
    split = avalon.GradFunction(mean_loss)
    whole = avalon.GradFunction(mean_loss, parallel=False)
    l1, (g1, gx1, _) = split(m, x, y)
    l0, (g0, gx0, _) = whole(m, x, y)
    assert compiled_kind(split) is ShardedFunction and compiled_kind(whole) is not ShardedFunction
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for k in m:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gx1, gx0, rtol=1e-5, atol=1e-7)  # per-example gradients are joined
    assert "runs in 2 threads" in split.source


def _sharded(fn):
    return [c for _, c in fn._last().compiled.candidates if isinstance(c, ShardedFunction)][0]


def _sum_of_weights(m, x):
    return avalon.sum(x @ m["w1"]) + avalon.sum(m["w2"])


def test_summed_shares_are_new_arrays_each_call_and_the_first_share_is_not_copied(monkeypatch):
    own = np.random.default_rng(11)   # the module's generator feeds the other tests' data
    m = {"w1": own.standard_normal((8, 16)).astype(np.float32), "w2": own.standard_normal((16, 4)).astype(np.float32)}
    x = own.standard_normal((32, 8)).astype(np.float32)
    f = avalon.GradFunction(_sum_of_weights, argnums=0)
    f(m, x)
    sharded = _sharded(f)
    leaves = f._lookup((m, x))[1]
    first = sharded(*leaves)
    kept = [np.array(g) for g in first]
    made = []
    real = sharded._pool.run

    def spy(jobs):   # the arrays each thread's share returned
        out = real(jobs)
        made.extend(id(a) for r in out for a in r)
        return out
    monkeypatch.setattr(sharded._pool, "run", spy)   # the pool is shared: put back after the test
    second = sharded(*[a * 2 if a.ndim == 2 and a.shape == x.shape else a for a in leaves])
    for a, b in zip(first, kept):        # a later call leaves earlier results alone
        np.testing.assert_array_equal(a, b)
    # the gradient of w1 (a matrix product in each share, summed) is summed into the
    # first share's array, not into a copy of it
    gw1 = second[1 + list(m).index("w1")]
    assert id(gw1) in made
    whole = avalon.GradFunction(_sum_of_weights, argnums=0, parallel=False)(m, x * 2)[1][0]
    np.testing.assert_allclose(gw1, whole["w1"], rtol=1e-5)


def test_batch_statistics_are_summed_across_threads():
    def batchnorm_like(m, x):
        h = x @ m["w1"]
        h = (h - avalon.mean(h, axis=0)) / avalon.sqrt(avalon.var(h, axis=0) + 1e-5)
        return avalon.sum(avalon.tanh(h @ m["w2"]))
    m, x = mlp(), rng.standard_normal((32, 8)).astype(np.float32)
    f = avalon.GradFunction(batchnorm_like)
    l1, (g1, gx1) = f(m, x)
    l0, (g0, gx0) = avalon.GradFunction(batchnorm_like, parallel=False)(m, x)
    assert compiled_kind(f) is ShardedFunction
    assert any(n.op == "allreduce_sum" for n in f.graph.nodes)  # the mean and variance need every shard
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for k in m:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gx1, gx0, rtol=1e-4, atol=1e-5)


def test_a_mean_over_a_data_dependent_count_is_split():
    def masked_mean(m, x, keep):
        per_example = avalon.sum(avalon.tanh(x @ m["w1"]) ** 2, axis=1) * keep
        return avalon.sum(per_example) / avalon.sum(keep)
    m, x = mlp(), rng.standard_normal((32, 8)).astype(np.float32)
    keep = (rng.random(32) > 0.3).astype(np.float32)
    f = avalon.GradFunction(masked_mean, argnums=0)
    l1, (g1, _, _) = f(m, x, keep)
    l0, (g0, _, _) = avalon.GradFunction(masked_mean, argnums=0, parallel=False)(m, x, keep)
    assert compiled_kind(f) is ShardedFunction
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    np.testing.assert_allclose(g1["w1"], g0["w1"], rtol=1e-4, atol=1e-6)


def test_an_error_in_one_thread_does_not_leave_the_other_waiting():
    def masked_mean(m, x, keep):
        return avalon.sum(avalon.sum(x @ m["w1"], axis=1) * keep) / avalon.sum(keep)
    m, x = mlp(), rng.standard_normal((32, 8)).astype(np.float32)
    keep = np.ones(32, np.float32)
    f = avalon.GradFunction(masked_mean, argnums=0)
    f(m, x, keep)
    sharded = [c for _, c in f._last().compiled.candidates if isinstance(c, ShardedFunction)][0]
    backend, compiled = sharded.copies[0]
    real = compiled.fn

    def failing(*args):
        raise RuntimeError("kernel failed")
    compiled.fn = failing
    with pytest.raises(RuntimeError, match="kernel failed"):
        sharded(*avalon.tree.flatten((m, x, keep))[0])
    compiled.fn = real
    loss, _ = f(m, x, keep)  # the barriers work again
    assert np.isfinite(loss)


def test_a_max_over_the_batch_keeps_the_graph_whole():
    f = avalon.GradFunction(lambda m, x: avalon.max(x @ m["w1"]))
    f(mlp(), rng.standard_normal((32, 8)).astype(np.float32))
    assert compiled_kind(f) is not ShardedFunction


def test_jit_prediction_is_split_and_joined():
    m, x = mlp(), rng.standard_normal((32, 8)).astype(np.float32)
    f = avalon.jit(lambda m, x: avalon.softmax(avalon.tanh(x @ m["w1"]) @ m["w2"]))
    out = f(m, x)
    assert compiled_kind(f) is ShardedFunction
    np.testing.assert_allclose(out, avalon.jit(f.f, parallel=False)(m, x), rtol=1e-6)


def test_split_and_unsplit_steps_draw_the_same_numbers():
    def noisy(m, x):
        return avalon.mean((x @ m["w1"] + avalon.random_normal((x.shape[0], 16))) ** 2)
    m, x = mlp(), rng.standard_normal((32, 8)).astype(np.float32)
    split = avalon.GradFunction(noisy, argnums=0)
    whole = avalon.GradFunction(noisy, argnums=0, parallel=False)
    avalon.manual_seed(3)
    a = [float(split(m, x)[0]) for _ in range(12)]  # through the timing of every schedule
    avalon.manual_seed(3)
    b = [float(whole(m, x)[0]) for _ in range(12)]
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_random_draws_in_shards_repeat_after_manual_seed():
    def noisy(m, x):
        return avalon.mean((x @ m["w1"] + avalon.random_normal((x.shape[0], 16))) ** 2)
    m, x = mlp(), rng.standard_normal((32, 8)).astype(np.float32)
    f = avalon.GradFunction(noisy, argnums=0)
    avalon.manual_seed(7)
    a = f(m, x)[0]
    b = f(m, x)[0]
    avalon.manual_seed(7)
    assert compiled_kind(f) is ShardedFunction
    assert a != b and f(m, x)[0] == a and f(m, x)[0] == b


def test_shard_count_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("AVALON_THREADS", "1")
    assert parallel.shard_count() == 1
    monkeypatch.setenv("AVALON_THREADS", "3")
    assert parallel.shard_count() == 3


def test_an_odd_batch_is_not_split():
    m = mlp()
    f = avalon.GradFunction(mean_loss)
    f(m, rng.standard_normal((33, 8)).astype(np.float32), rng.integers(0, 4, 33))
    assert compiled_kind(f) is not ShardedFunction


def test_a_cnn_in_batch_innermost_layout_is_split():
    def loss(m, x, y):
        h = avalon.max_pool2d(avalon.relu(avalon.conv2d(x, m["c"], m["b"], padding=1)), 2)
        logp = avalon.log_softmax(h.reshape(h.shape[0], -1) @ m["fc"])
        return -avalon.mean(avalon.take_along_axis(logp, avalon.expand_dims(y, 1), axis=1))
    m = {"c": rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "b": np.zeros(4, np.float32),
         "fc": rng.standard_normal((4 * 4 * 4, 3)).astype(np.float32) * 0.1}
    x, y = rng.standard_normal((16, 1, 8, 8)).astype(np.float32), rng.integers(0, 3, 16)
    split = avalon.GradFunction(loss, argnums=0)
    l1, (g1, _, _) = split(m, x, y)
    l0, (g0, _, _) = avalon.GradFunction(loss, argnums=0, parallel=False)(m, x, y)
    assert compiled_kind(split) is ShardedFunction
    assert {"im2col_csn", "conv_csn"} & {n.op for n in split.graph.nodes}   # batch-innermost convolutions
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for k in m:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-5, atol=1e-6)


def test_independent_updates_run_as_parts_in_threads():
    a, b = (np.ones((700, 700), np.float32) for _ in range(2))
    ga, gb = (rng.standard_normal((700, 700)).astype(np.float32) for _ in range(2))

    def update(ps, gs, lr):
        for p, g in zip(ps, gs):
            avalon.assign(p, p - lr * avalon.tanh(g) * 2.0)
    f = avalon.jit(update)
    lr = np.float32(0.1)
    for _ in range(9):  # through the timing of both schedules
        f([a, b], [ga, gb], lr)
    compiled = f._last().compiled
    assert any(isinstance(c, parallel.ComponentParallel) for _, c in compiled.candidates)
    expected = 1.0 - 9 * (np.float32(0.1) * np.tanh(ga) * 2.0)
    np.testing.assert_allclose(a, expected, rtol=1e-5, atol=1e-5)


def test_parts_that_share_a_written_array_stay_together():
    a = np.ones((700, 700), np.float32)
    g = avalon.trace(lambda a, x: (avalon.assign(a, x * 2.0), avalon.sum(a * x)), a, a.copy())
    assert parallel.split_components(g) is None


def test_profile_of_a_split_step_with_barriers_runs_one_shard():
    def masked_mean(m, x, keep):
        return avalon.sum(avalon.sum(avalon.tanh(x @ m["w1"]), axis=1) * keep) / avalon.sum(keep)
    m, x = mlp(), rng.standard_normal((32, 8)).astype(np.float32)
    keep = np.ones(32, np.float32)
    f = avalon.GradFunction(masked_mean, argnums=0)
    report = avalon.profile(f, m, x, keep, repeat=2)
    assert report.total > 0


# -- BatchNorm in a split step: batch statistics summed across threads, running statistics written once --

def bn_step(m, x, running):
    """Two batch-normalized layers; each updates `running` (read back after the first
    update, as BatchNorm applied twice in one step does)."""
    h = x
    for w in (m["w1"], m["w2"]):
        h = h @ w
        mean = avalon.mean(h, axis=0)
        avalon.assign(running, 0.9 * running + 0.1 * avalon.stop_gradient(avalon.sum(mean)))
        h = avalon.tanh((h - mean) / avalon.sqrt(avalon.var(h, axis=0) + 1e-5) + running)
    return avalon.sum(h)


@pytest.fixture
def cheap_barriers(monkeypatch):
    """Steps this small would not pay for a dozen thread barriers."""
    monkeypatch.setattr(parallel, "ELEMENTS_PER_REDUCTION", 1)


def _sharded(f):
    return [c for _, c in f._last().compiled.candidates if isinstance(c, ShardedFunction)][0]


def test_running_statistics_are_written_once_after_the_shards_as_in_one_thread(cheap_barriers):
    m, x = mlp(), rng.standard_normal((32, 8)).astype(np.float32)
    running_whole, running_split = np.full(1, 0.5, np.float32), np.full(1, 0.5, np.float32)
    whole = avalon.GradFunction(bn_step, argnums=0, parallel=False)
    l0, g0 = whole(m, x, running_whole)
    f = avalon.GradFunction(bn_step, argnums=0)
    f(m, x, running_split.copy())                       # compile (a copy: the state under test stays fresh)
    sharded = _sharded(f)
    assert len(sharded.plan.writes) == 2                # both updates are deferred to the caller
    assert not any(n.op == "assign" for n in sharded.plan.graph.nodes)
    l1, g1 = sharded(*avalon.tree.flatten((m, x, running_split))[0])[:2]
    np.testing.assert_allclose(running_split, running_whole, rtol=1e-6)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)


def test_a_split_step_that_fails_writes_no_running_statistic(cheap_barriers):
    m, x = mlp(), rng.standard_normal((32, 8)).astype(np.float32)
    running = np.full(1, 0.5, np.float32)
    f = avalon.GradFunction(bn_step, argnums=0)
    f(m, x, running.copy())
    sharded = _sharded(f)
    compiled = sharded.copies[1][1]
    real = compiled.fn

    def failing(*args):
        raise RuntimeError("kernel failed")
    compiled.fn = failing
    with pytest.raises(RuntimeError, match="kernel failed"):
        sharded(*avalon.tree.flatten((m, x, running))[0])
    compiled.fn = real
    np.testing.assert_array_equal(running, [0.5])


def test_writing_a_value_that_differs_between_shards_keeps_the_step_whole(cheap_barriers):
    def keep_activations(m, x, store):
        h = avalon.tanh(x @ m["w1"])
        avalon.assign(store, avalon.stop_gradient(h))   # per example: each shard has only its half
        return avalon.sum(h)
    f = avalon.GradFunction(keep_activations, argnums=0)
    store = np.zeros((32, 16), np.float32)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    f(mlp(), x, store)
    assert compiled_kind(f) is not ShardedFunction


def two_connected_statistics(state, x):
    """Two running statistics written from one batch mean, the second reading
    the first's new value: passes.fuse_updates makes them ONE fused_update."""
    m, v = state
    m2 = avalon.assign(m, m * np.float32(0.9) + avalon.mean(x, axis=0) * np.float32(0.1))
    avalon.assign(v, v * np.float32(0.9) + m2 * m2 * np.float32(0.1))
    return avalon.sum(avalon.tanh(x))


def test_a_fused_update_of_a_batch_statistic_keeps_the_step_whole(cheap_barriers):
    """The batch split defers an assign's value past the shards; a fused_update
    writes several arrays from one body and has no single value to defer (it
    once handed its second destination's old value over as the first's)."""
    x = rng.standard_normal((64, 16)).astype(np.float32)
    m, v = np.ones(16, np.float32), np.ones(16, np.float32)
    want_m = m * np.float32(0.9) + x.mean(axis=0) * np.float32(0.1)
    want_v = v * np.float32(0.9) + want_m * want_m * np.float32(0.1)
    f = avalon.jit(two_connected_statistics)
    f((m, v), x)
    np.testing.assert_allclose(m, want_m, rtol=1e-6)
    np.testing.assert_allclose(v, want_v, rtol=1e-6)
    assert compiled_kind(f) is not ShardedFunction
    assert any(n.op == "fused_update" for n in f.graph.nodes)


def sgd_step(state, x):
    """A loss and an update of its weights by their gradient, a sum over the
    batch: what avalon.optim.train_step traces."""
    w, m = state
    loss = avalon.sum(avalon.tanh(x @ w))
    g = x.T @ (1 - avalon.tanh(x @ w) ** 2)
    m2 = avalon.assign(m, m * np.float32(0.9) + g)
    avalon.assign(w, w - np.float32(0.01) * m2)
    return loss


def test_writes_of_summed_gradients_run_once_after_the_shards(cheap_barriers):
    """The update reads each gradient summed over the shards: it runs after them
    (ShardPlan.tail), on the combined sums, with no thread barrier inside."""
    x = rng.standard_normal((64, 16)).astype(np.float32)
    w0, m0 = rng.standard_normal((16, 8)).astype(np.float32), np.ones((16, 8), np.float32)
    whole = (w0.copy(), m0.copy())
    want = avalon.jit(sgd_step, parallel=False)(whole, x)
    f = avalon.jit(sgd_step)
    f((w0.copy(), m0.copy()), x)                                  # compile the schedules
    sharded = [c for _, c in f._last().compiled.candidates if isinstance(c, ShardedFunction)][0]
    assert sharded.plan.tail is not None and not sharded.plan.writes
    assert not any(n.op in ("assign", "fused_update", "allreduce_sum") for n in sharded.plan.graph.nodes)
    state = (w0.copy(), m0.copy())
    got = sharded(*avalon.tree.flatten((state, x))[0])
    np.testing.assert_allclose(got[0], want, rtol=1e-5)
    np.testing.assert_allclose(state[1], whole[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state[0], whole[0], rtol=1e-5, atol=1e-6)


def deep_bn(m, x):
    h = x
    for _ in range(6):    # 6 layers of batch statistics: more all-reduces than MAX_REDUCTIONS
        h = h @ m["sq"]
        h = avalon.tanh((h - avalon.mean(h, axis=0)) / avalon.sqrt(avalon.var(h, axis=0) + 1e-5))
    return avalon.sum(h)


@pytest.mark.parametrize("per_reduction, split", [(1, True), (10**9, False)])
def test_thread_barriers_are_allowed_in_proportion_to_the_work(monkeypatch, per_reduction, split):
    monkeypatch.setattr(parallel, "ELEMENTS_PER_REDUCTION", per_reduction)
    m, x = {"sq": rng.standard_normal((16, 16)).astype(np.float32) * 0.3}, rng.standard_normal((64, 16))
    f = avalon.GradFunction(deep_bn, argnums=0)
    l1, g1 = f(m, x.astype(np.float32))
    assert (compiled_kind(f) is ShardedFunction) == split
    if split:
        reduces = sum(n.op == "allreduce_sum" for n in _sharded(f).plan.graph.nodes)
        assert reduces > parallel.MAX_REDUCTIONS
        l0, g0 = avalon.GradFunction(deep_bn, argnums=0, parallel=False)(m, x.astype(np.float32))
        np.testing.assert_allclose(l1, l0, rtol=1e-4)
        np.testing.assert_allclose(g1[0]["sq"], g0[0]["sq"], rtol=1e-3, atol=1e-4)


def test_an_all_reduce_gives_every_thread_the_same_total_even_if_a_partial_is_reused_at_once():
    import threading
    from avalon.runtime.threads import _Reducer
    reducer = _Reducer(2)
    partials = [np.full(3, 0.1, np.float32), np.full(3, 0.2, np.float32)]
    totals = [None, None]

    def shard(k):
        totals[k] = reducer.reduce(k, partials[k])
        partials[k][:] = 1e6            # the thread's next kernel writes into the same buffer
    threads = [threading.Thread(target=shard, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = np.full(3, 0.1, np.float32) + np.full(3, 0.2, np.float32)
    for total in totals:
        np.testing.assert_array_equal(total, want)


def test_a_conv_batchnorm_net_split_across_threads_matches_torch(cheap_barriers):
    torch = pytest.importorskip("torch")
    import avalon.nn as nn
    import avalon.nn.functional as F

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(2, 5, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(5)
            self.conv2 = nn.Conv2d(5, 4, (3, 2), stride=2, padding=(2, 1), dilation=(2, 1), bias=False)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            h = F.relu(self.bn1(self.conv1(x)))
            return avalon.mean(F.relu(self.bn2(self.conv2(h))), axis=(2, 3))

    net, x = Net(), rng.standard_normal((8, 2, 9, 7)).astype(np.float32)
    y = rng.integers(0, 4, 8)
    tnet = torch.nn.Sequential(torch.nn.Conv2d(2, 5, 3, padding=1, bias=False), torch.nn.BatchNorm2d(5),
                               torch.nn.ReLU(), torch.nn.Conv2d(5, 4, (3, 2), stride=2, padding=(2, 1),
                                                                dilation=(2, 1), bias=False),
                               torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    with torch.no_grad():
        tnet[0].weight.copy_(torch.tensor(np.asarray(net.conv1.weight)))
        tnet[3].weight.copy_(torch.tensor(np.asarray(net.conv2.weight)))
    f = avalon.value_and_grad(lambda m, x, y: F.cross_entropy(m(x), y))
    loss, (grads, _, _) = f(net, x, y)
    compiled = f._last().compiled
    assert isinstance(compiled.candidates[0][1], ShardedFunction) and compiled.calls[0] == 1  # this call was split
    tx = torch.tensor(x)
    want = torch.nn.functional.cross_entropy(tnet(tx).mean(dim=(2, 3)), torch.tensor(y))
    want.backward()
    np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
    np.testing.assert_allclose(grads.conv1.weight, tnet[0].weight.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads.conv2.weight, tnet[3].weight.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads.bn2.weight, tnet[4].weight.grad.numpy(), rtol=1e-4, atol=1e-6)
    for ours, theirs in ((net.bn1, tnet[1]), (net.bn2, tnet[4])):   # written once, after both threads
        np.testing.assert_allclose(ours.running_mean, theirs.running_mean.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ours.running_var, theirs.running_var.numpy(), rtol=1e-5, atol=1e-7)
        assert int(ours.num_batches_tracked) == 1


def test_a_forked_child_runs_a_split_step_the_parent_compiled(in_forked_child):
    """Only the forking thread exists in a child: the engine's workers start again
    there (they did not, and the child waited for them forever)."""
    from avalon.runtime import threads
    m, x, y = mlp(), rng.standard_normal((64, 8)).astype(np.float32), rng.integers(0, 4, 64)
    fn = avalon.value_and_grad(mean_loss, argnums=(0,))
    for _ in range(3):
        fn(m, x, y)
    tuned = fn._last().compiled
    labels = [label for label, _ in tuned.candidates]
    tuned.choice = labels.index("batch split across threads")   # the split schedule from now on
    tuned._since, tuned._next_check = 0, 10 ** 9
    v, g = fn(m, x, y)
    assert threads._pools, "the split step ran on the engine's workers"

    def split_step():
        value, grads = fn(m, x, y)
        return float(value), np.asarray(grads[0]["w1"])
    value, grad = in_forked_child(split_step)
    assert value == pytest.approx(float(v), rel=1e-6)
    np.testing.assert_allclose(grad, g[0]["w1"], rtol=1e-5, atol=1e-7)
