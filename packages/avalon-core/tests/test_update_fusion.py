"""passes.fuse_updates: a run of in-place writes (an optimizer's update) becomes
ONE fused_update node, a multi-output elementwise kernel that reads each array
once and writes each once, with the graph's read-after-write semantics kept."""
import numpy as np
import pytest

import avalon
from avalon import passes
from avalon.backends import get_backend
from avalon.kernel_ir import lower

rng = np.random.default_rng(0)
N = 1000


def ops_of(g):
    return [n.op for n in g.nodes if n.op not in ("input", "const")]


def _arrays(k=4):
    return [rng.standard_normal(N).astype(np.float32) for _ in range(k)]


def adam_like(p, g, m, v, lr):
    m = avalon.assign(m, m + (g - m) * np.float32(0.1))
    v = avalon.assign(v, v * np.float32(0.999) + g * g * np.float32(0.001))
    avalon.assign(p, p - lr * m / (avalon.sqrt(v) + np.float32(1e-8)))


def _reference(p, g, m, v, lr):
    m = m + (g - m) * np.float32(0.1)
    v = v * np.float32(0.999) + g * g * np.float32(0.001)
    return p - lr * m / (np.sqrt(v) + np.float32(1e-8)), m, v


def _pipeline(g):
    return passes.fuse_updates(passes.fuse_elementwise(passes.dce(g)))


def test_an_adam_like_update_becomes_one_node_of_three_writes():
    p, grad, m, v = _arrays()
    g = _pipeline(avalon.trace(adam_like, p, grad, m, v, np.float32(0.01)))
    g.check()
    assert ops_of(g) == ["fused_update"]
    node = g.nodes[-1]
    assert node.attrs["n_dest"] == 3 and len(node.attrs["body"].outputs) == 3
    kernel = lower(node.attrs["body"])
    assert [b.name for b in kernel.outputs] == ["out0", "out1", "out2"]


@pytest.mark.parametrize("native", ["1", "0"], ids=["C", "NumPy"])
def test_the_fused_update_writes_what_the_separate_writes_wrote(native, monkeypatch):
    monkeypatch.setenv("AVALON_NATIVE", native)
    p, grad, m, v = _arrays()
    v = np.abs(v)
    want_p, want_m, want_v = _reference(p, grad, m, v, np.float32(0.01))
    f = avalon.jit(adam_like)
    f(p, grad, m, v, np.float32(0.01))
    assert "fused_update" in f._last().compiled.source
    np.testing.assert_allclose(m, want_m, rtol=1e-6)
    np.testing.assert_allclose(v, want_v, rtol=1e-6)
    np.testing.assert_allclose(p, want_p, rtol=1e-5, atol=1e-7)


def reads_written_dest_raw(a, b):
    # the graph reads input `a` after writing it: the NEW value (graph order)
    avalon.assign(a, a * np.float32(2.0))
    avalon.assign(b, b + a)


def test_a_later_write_reading_an_earlier_destination_reads_its_new_value():
    a, b = _arrays(2)
    g = _pipeline(avalon.trace(reads_written_dest_raw, a, b))
    assert ops_of(g) == ["fused_update"]
    want_a, want_b = a * 2, b + a * 2
    avalon.compile_graph(g, "cpu")(a, b)
    np.testing.assert_allclose(a, want_a, rtol=1e-6)
    np.testing.assert_allclose(b, want_b, rtol=1e-6)


def reads_old_then_writes(a, b):
    # b's new value reads a's OLD value: b is written after a in the graph, but
    # reads the value a had before (captured before a's write)
    old_a = a * np.float32(1.0) + np.float32(0.0)
    avalon.assign(a, avalon.exp(a))
    avalon.assign(b, old_a * b + np.float32(1.0))


def test_a_read_of_the_old_value_before_a_write_stays_old():
    a, b = _arrays(2)
    want_a, want_b = np.exp(a), a * b + 1
    f = avalon.jit(reads_old_then_writes)
    f(a, b)
    np.testing.assert_allclose(a, want_a, rtol=1e-6)
    np.testing.assert_allclose(b, want_b, rtol=1e-6)


def read_between_writes(a, b):
    avalon.assign(a, a * np.float32(2.0))
    s = avalon.sum(a)          # a reduction reads the new a between the writes
    avalon.assign(b, b * s + np.float32(1.0))
    return s


def test_a_reader_between_the_writes_keeps_them_apart():
    a, b = _arrays(2)
    g = _pipeline(avalon.trace(read_between_writes, a, b))
    assert "fused_update" not in ops_of(g)
    want_a = a * 2
    want_b = b * want_a.sum(dtype=np.float32) + 1
    avalon.jit(read_between_writes)(a, b)
    np.testing.assert_allclose(b, want_b, rtol=1e-4)


def writes_and_returns(a, b):
    a2 = avalon.assign(a, a * np.float32(2.0))
    avalon.assign(b, b + np.float32(1.0))
    return a2 * np.float32(3.0)


def test_a_write_whose_result_is_used_elsewhere_is_not_merged():
    a, b = _arrays(2)
    g = _pipeline(avalon.trace(writes_and_returns, a, b))
    assert "fused_update" not in ops_of(g)


def writes_and_returns_the_last(p, m, g):
    avalon.assign(m, m * np.float32(0.9) + g)
    return avalon.assign(p, p - np.float32(0.1) * m)


@pytest.mark.parametrize("returned", ["the last write", "a destination"])
def test_a_function_returning_what_it_wrote_compiles_and_returns_the_new_value(returned):
    """The returned write is not merged (the merged node stands for no single write's
    result): compiling it used to fail inside the memory planner."""
    def returns_dest(p, m, g):
        writes_and_returns_the_last(p, m, g)
        return p
    f = writes_and_returns_the_last if returned == "the last write" else returns_dest
    p, m, g = np.ones(1000, np.float32), np.zeros(1000, np.float32), np.full(1000, 2.0, np.float32)
    out = avalon.jit(f, parallel=False)(p, m, g)
    np.testing.assert_allclose(out, 0.8, rtol=1e-6)
    np.testing.assert_allclose(p, 0.8, rtol=1e-6)
    np.testing.assert_allclose(m, 2.0, rtol=1e-6)


def test_the_c_entry_refuses_destinations_that_overlap():
    p, grad, m, v = _arrays()
    g = _pipeline(avalon.trace(adam_like, p, grad, m, v, np.float32(0.01)))
    node = g.nodes[-1]
    op = get_backend("cpu").node_kernel(node)
    assert getattr(op, "native", False), "the update runs as a C kernel"
    n_dest = node.attrs["n_dest"]
    given = dict(zip(g.inputs, (p, grad, m, np.abs(v), np.float32(0.01))))
    values = [np.asarray(given[i]) if i.op == "input" else np.asarray(i.value) for i in node.inputs[n_dest:]]
    op(*[given[d] for d in node.inputs[:n_dest]], *values)      # builds the kernel
    entry = op.__globals__["_entry"]
    dests = [given[d] for d in node.inputs[:n_dest]]
    keep = [x.copy() for x in dests]
    # two destinations in one array: the entry says so (1) and runs nothing
    assert entry(*[id(a) for a in values], id(dests[0]), id(dests[1]), id(dests[1])) == 1
    for a, b in zip(dests, keep):
        np.testing.assert_array_equal(a, b)
    # an array the kernel was not compiled for (another size): 2, nothing run
    assert entry(*[id(a) for a in values], id(dests[0]), id(dests[1]), id(np.empty(N + 1, np.float32))) == 2
    assert entry(*[id(a) for a in values], *[id(d) for d in dests]) == 0


def test_the_cpu_pipeline_fuses_updates_after_elementwise_fusion():
    names = [n for n, _ in passes.default_pipeline(get_backend("cpu"))]
    assert names.index("fuse_updates") > names.index("fuse_elementwise")


def writes_a_sum(a, b, x):
    avalon.assign(a, avalon.sum(x * np.float32(2.0), axis=0))     # a fused group ending in a reduction
    avalon.assign(b, b + a)


def test_a_group_ending_in_a_reduction_is_not_merged_into_an_update():
    a, b = _arrays(2)
    x = rng.standard_normal((3, N)).astype(np.float32)
    g = _pipeline(avalon.trace(writes_a_sum, a, b, x))
    assert "fused_update" not in ops_of(g)
    want_a = (x * 2).sum(axis=0)
    want_b = b + want_a
    avalon.jit(writes_a_sum)(a, b, x)
    np.testing.assert_allclose(a, want_a, rtol=1e-5)
    np.testing.assert_allclose(b, want_b, rtol=1e-5)
