"""Each pass, shown by what it removes, merges, folds, rewrites, fuses or reuses."""
import numpy as np
import pytest

import avalon
from avalon import passes
from avalon.backends import get_backend
from avalon.memory import plan_memory

rng = np.random.default_rng(0)
X = rng.standard_normal((4, 5)).astype(np.float32)
Y = rng.standard_normal((4, 5)).astype(np.float32)
W = rng.standard_normal((5, 5)).astype(np.float32)


def ops_of(g):
    return [n.op for n in g.nodes if n.op not in ("input", "const")]


def run(g, *args):
    return avalon.compile_graph(g, "cpu")(*args)


def test_dce_removes_unused_work():
    def f(x):
        unused = avalon.exp(x) * 3.0  # noqa: F841
        return avalon.tanh(x)
    g = avalon.trace(f, X)
    assert ops_of(g) == ["exp", "mul", "tanh"]
    assert ops_of(passes.dce(g)) == ["tanh"]


def test_cse_merges_repeated_expressions_but_not_random_draws():
    def f(x):
        a = avalon.exp(x) + avalon.exp(x)
        r = avalon.random_normal(x.shape) + avalon.random_normal(x.shape)
        return a, r
    g = passes.cse(avalon.trace(f, X))
    assert ops_of(g).count("exp") == 1
    assert ops_of(g).count("random_normal") == 2
    a, _ = run(g, X)
    np.testing.assert_allclose(a, 2 * np.exp(X), rtol=1e-6)


def _graph_with_constants(scale):
    # Ops on constants alone run eagerly while tracing, so build the graph by hand.
    g = avalon.Graph("f")
    x = g.add_input((4, 5), np.float32)
    c = g.add_const(scale)
    e = g.add_node("exp", [c], {}, scale.shape, np.float32)
    two = g.add_const(np.asarray(2.0, np.float32))
    e2 = g.add_node("mul", [e, two], {}, scale.shape, np.float32)
    g.outputs = [g.add_node("mul", [x, e2], {}, (4, 5), np.float32)]
    return g.check()


def test_constant_fold_computes_constant_subgraphs_once():
    scale = np.full((5,), 3.0, np.float32)
    g = _graph_with_constants(scale)
    assert ops_of(g) == ["exp", "mul", "mul"]
    g = passes.dce(passes.constant_fold(g))
    assert ops_of(g) == ["mul"]
    np.testing.assert_allclose(run(g, X)[0], X * np.exp(scale) * 2, rtol=1e-6)


def test_constant_fold_keeps_large_broadcasts_lazy():
    g = avalon.Graph("f")
    x = g.add_input((400, 500), np.float32)
    one = g.add_const(np.asarray(1.0, np.float32))
    b = g.add_node("broadcast_to", [one], {"shape": (400, 500)}, (400, 500), np.float32)
    g.outputs = [g.add_node("add", [x, b], {}, (400, 500), np.float32)]
    g = passes.constant_fold(g.check())
    assert "broadcast_to" in ops_of(g)


@pytest.mark.parametrize("f, before, after", [
    (lambda x: x * 1.0, ["mul"], []),
    (lambda x: 0.0 + x, ["add"], []),
    (lambda x: -(-x), ["neg", "neg"], []),
    (lambda x: avalon.log(avalon.exp(x)), ["exp", "log"], []),
    (lambda x: x / 4.0, ["div"], ["mul"]),
    (lambda x: x + (-avalon.tanh(x)), ["tanh", "neg", "add"], ["tanh", "sub"]),
    (lambda x: x.reshape(20).reshape(2, 10), ["reshape", "reshape"], ["reshape"]),
    (lambda x: x.T.T, ["transpose", "transpose"], []),
    (lambda x: avalon.stop_gradient(x) * 2.0, ["stop_gradient", "mul"], ["mul"]),
])
def test_simplify_rewrites(f, before, after):
    g = avalon.trace(f, X)
    expected = run(g.copy(), X)[0]
    assert ops_of(g) == before
    g = passes.dce(passes.simplify(g))
    assert ops_of(g) == after
    g.check()
    np.testing.assert_allclose(run(g, X)[0], expected, rtol=1e-5, atol=1e-6)


def test_fusion_groups_elementwise_chains_into_one_kernel():
    g = avalon.trace(lambda x, y: avalon.tanh(avalon.exp(x) * y + 1.0) @ W, X, Y)
    g = passes.fuse_elementwise(g)
    g.check()
    assert ops_of(g) == ["fused", "matmul"]
    body = g.nodes[[n.op for n in g.nodes].index("fused")].attrs["body"]
    assert [n.op for n in body.nodes if n.op not in ("input", "const")] == ["exp", "mul", "add", "tanh"]
    np.testing.assert_allclose(run(g, X, Y)[0], np.tanh(np.exp(X) * Y + 1) @ W, rtol=1e-5)


def test_fusion_leaves_values_used_outside_the_group():
    def f(x):
        e = avalon.exp(x)
        return avalon.tanh(e + 1.0) @ W, e @ W
    g = passes.fuse_elementwise(avalon.trace(f, X))
    assert ops_of(g).count("exp") == 1  # e is read by a matmul: it stays a value of its own
    assert ops_of(g).count("fused") == 1


def _scaled_by_row_and_column(x, r, c):
    return avalon.tanh(x * avalon.ops.broadcast_to(r, (4, 5))) + avalon.ops.broadcast_to(c, (4, 5))


@pytest.mark.parametrize("native", [True, False], ids=["C", "NumPy"])
def test_fusion_reads_broadcast_inputs_through_zero_strides(native, monkeypatch):
    # a broadcast view as a kernel's operand would take the strided (NumPy) path:
    # the group takes the small array and broadcasts it itself
    monkeypatch.setenv("AVALON_NATIVE", "1" if native else "0")
    r, c = rng.standard_normal((1, 5)).astype(np.float32), rng.standard_normal((4, 1)).astype(np.float32)
    g = passes.fuse_elementwise(avalon.trace(_scaled_by_row_and_column, X, r, c))
    g.check()
    assert ops_of(g) == ["fused"]
    fused = g.nodes[-1]
    assert sorted(i.shape for i in fused.inputs) == [(1, 5), (4, 1), (4, 5)]
    np.testing.assert_allclose(run(g, X, r, c)[0], np.tanh(X * r) + c, rtol=1e-6)


def test_a_broadcast_used_outside_the_group_stays_a_view():
    def f(x, r):
        b = avalon.ops.broadcast_to(r, (4, 5))
        return avalon.exp(x * b), b @ W
    r = rng.standard_normal((1, 5)).astype(np.float32)
    g = passes.fuse_elementwise(avalon.trace(f, X, r))
    assert ops_of(g).count("broadcast_to") == 1 and ops_of(g).count("fused") == 1


def test_cpu_fused_kernel_runs_in_place_in_scratch():
    g = passes.fuse_elementwise(avalon.trace(lambda x, y: avalon.sigmoid(x * y - 1.0) * 2.0, X, Y))
    fused = [n for n in g.nodes if n.op == "fused"][0]
    # the NumPy form of a group (what runs without a C compiler)
    from avalon.backends.cpu_fused import compile_fused_numpy
    kernel = compile_fused_numpy(fused.attrs["body"], get_backend("cpu"))
    assert kernel.source.count("s0") >= 3 and "s1" not in kernel.source  # one scratch array, reused
    out = np.empty((4, 5), np.float32)
    assert kernel(X, Y, out=out) is out
    np.testing.assert_allclose(out, 2 / (1 + np.exp(-(X * Y - 1))), rtol=1e-5)


def _mlp_grad():
    layers = [rng.standard_normal((5, 5)).astype(np.float32) * 0.3 for _ in range(4)]

    def loss(ws, x):
        for w in ws:
            x = avalon.tanh(x @ w)
        return avalon.mean(x * x)
    return loss, layers


def test_memory_plan_reuses_dead_buffers_and_accumulates_in_place():
    loss, ws = _mlp_grad()
    gf = avalon.value_and_grad(loss)
    gf(ws, X)
    plan = gf.memory_plan
    assert len(plan.slot_of) > 2 * len(plan.slot_nbytes)  # many values share few buffers
    assert plan.inplace  # some ops write over an input that dies there
    assert "out=b" in gf.source
    outputs = set(gf.graph.outputs)
    assert not outputs & set(plan.slot_of)  # returned arrays are never planned buffers


def test_in_place_gradient_accumulation():
    # x is used twice: its two gradient contributions are summed by an add that
    # writes over one of them.
    def f(x, w):
        return avalon.sum((x @ w) * (x @ w.T))
    gf = avalon.value_and_grad(f, passes=[("dce", passes.dce), ("cse", passes.cse)])
    _, (gx, gw) = gf(X, W)
    plan, graph = gf.memory_plan, gf.graph
    adds = [n for n in graph.nodes if n.op == "add"]
    assert adds and all(n in plan.slot_of or n in graph.outputs for n in adds)
    a, b = X @ W, X @ W.T
    np.testing.assert_allclose(gx, b @ W.T + a @ W, rtol=1e-4)


def test_planned_results_survive_the_next_call():
    loss, ws = _mlp_grad()
    gf = avalon.value_and_grad(loss)
    _, g1 = gf(ws, X)
    keep = [g.copy() for g in g1[0]]
    gf(ws, Y)
    for a, b in zip(g1[0], keep):
        np.testing.assert_array_equal(a, b)


def test_optimized_and_unoptimized_gradients_agree():
    loss, ws = _mlp_grad()
    l1, g1 = avalon.value_and_grad(loss)(ws, X)
    l0, g0 = avalon.value_and_grad(loss, passes=[])(ws, X)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    for a, b in zip(g1[0], g0[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_a_user_pass_joins_the_pipeline():
    seen = []

    def count_nodes(graph):
        seen.append(len(graph.nodes))
        return graph
    passes.add_pass(count_nodes, after="cse")
    try:
        assert "count_nodes" in [n for n, _ in passes.default_pipeline()]
        avalon.jit(lambda x: avalon.exp(x) * 2.0)(X)
        assert seen
    finally:
        passes.remove_pass("count_nodes")
    assert "count_nodes" not in [n for n, _ in passes.default_pipeline()]


def test_a_user_pass_can_rewrite_the_graph():
    def exp_to_tanh(graph):
        for n in graph.nodes:
            if n.op == "exp":
                n.op = "tanh"
        return graph
    f = avalon.jit(lambda x: avalon.exp(x), passes=[exp_to_tanh])
    np.testing.assert_allclose(f(X), np.tanh(X), rtol=1e-6)
    assert "tanh" in f.source


def test_a_pass_that_returns_nothing_is_an_error():
    with pytest.raises(TypeError, match="must return the graph"):
        avalon.jit(lambda x: x + 1.0, passes=[lambda g: None])(X)


def _conv_block(x, w, b, bias_shape=(1, 4, 1, 1)):
    h = avalon.conv2d(x, w, padding=1) + b.reshape(bias_shape)
    return avalon.max_pool2d(avalon.relu(h), 2)


def test_pool_first_moves_bias_and_relu_after_the_pooling():
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    g = avalon.trace(lambda x, w, b: avalon.sum(_conv_block(x, w, b) ** 2), x, w, b)
    expected = run(g.copy(), x, w, b)[0]
    assert ops_of(g)[:5] == ["conv", "reshape", "add", "relu", "max_pool"]
    g = passes.pool_first(g)
    g.check()
    assert ops_of(g)[:5] == ["conv", "reshape", "max_pool", "add", "relu"]
    np.testing.assert_allclose(run(g, x, w, b)[0], expected, rtol=1e-5)
    # and gradients through the rewritten graph agree with the original
    f = lambda x, w, b: avalon.sum(_conv_block(x, w, b) ** 2)  # noqa: E731
    _, g1 = avalon.GradFunction(f)(x, w, b)
    _, g0 = avalon.GradFunction(f, passes=[])(x, w, b)
    for a, c in zip(g1, g0):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def test_a_gradient_inlined_into_another_trace_gets_the_forward_rewrites_too():
    """jit(grad(f)) differentiates f's forward after the forward passes, as grad(f)
    compiled alone does: its backward then reads the pooled tensor, not the whole."""
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)

    def loss(x, w, b):
        return avalon.sum(_conv_block(x, w, b) ** 2)
    alone = avalon.value_and_grad(loss, argnums=(1, 2))
    inlined = avalon.jit(lambda x, w, b: alone(x, w, b))
    want, got = alone(x, w, b), inlined(x, w, b)
    traced = avalon.trace(lambda x, w, b: alone(x, w, b), x, w, b)
    relu_at, pool_at = ops_of(traced).index("relu"), ops_of(traced).index("max_pool")
    assert pool_at < relu_at      # pool_first ran before differentiation
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for a, c in zip(got[1][1:], want[1][1:]):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def test_pool_first_keeps_ops_that_vary_inside_a_window():
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    per_pixel = rng.standard_normal((8, 8)).astype(np.float32)
    g = avalon.trace(lambda x, w, b: _conv_block(x, w, b, (8, 8)), x, w, per_pixel)
    # the per-pixel add stays before the pooling; the relu after it may still move
    assert ops_of(passes.pool_first(g)) == ["conv", "add", "max_pool", "relu"]


def test_pool_first_keeps_values_that_are_used_elsewhere():
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)

    def f(x, w):
        h = avalon.relu(avalon.conv2d(x, w, padding=1))
        return avalon.max_pool2d(h, 2), h
    g = passes.pool_first(avalon.trace(f, x, w))
    assert ops_of(g) == ["conv", "relu", "max_pool"]
