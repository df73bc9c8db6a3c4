"""Per-op knowledge in rule tables: the passes look each op's rules up by
primitive (Primitive.rule), and the pipeline comes from the backend."""
import logging

import numpy as np
import pytest

import avalon
from avalon import passes, plugins
from avalon.backends import Backend
from avalon.backends.cpu import CpuBackend
from avalon.errors import MissingRuleError
from avalon.ops._sharding import on_sharded
from avalon.passes import sharding
from avalon.primitive import PRIMITIVES, RULE_KINDS, Primitive, bind, defprim
from avalon.runtime.threads import Autotuned, ShardedFunction

rng = np.random.default_rng(11)


def _same_shape(x):
    return tuple(x.shape), x.dtype


# -- the rule tables ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(RULE_KINDS))
def test_a_missing_rule_names_the_primitive_and_the_kind(kind):
    prim = Primitive("unruled_test_op", shape=_same_shape, impl=None)
    with pytest.raises(MissingRuleError, match=f"'unruled_test_op' has no {kind} rule") as e:
        prim.rule(kind)
    assert f"defprim('unruled_test_op', {kind}=...)" in str(e.value)
    assert prim.rule(kind, None) is None


def test_the_builtin_primitives_carry_their_rules():
    assert PRIMITIVES["matmul"].rule("sharding") is not None
    assert PRIMITIVES["conv"].rule("layout").converts is not None
    assert PRIMITIVES["reshape"].output_shape_attr == "shape"
    assert PRIMITIVES["random_normal"].rule("shard_attrs") is not None


def test_an_unknown_rule_kind_is_refused_at_registration():
    with pytest.raises(TypeError, match="unknown field or rule kind shardng"):
        defprim("misspelt_test_op", shape=_same_shape, impl=None, shardng=lambda *a: None)
    assert "misspelt_test_op" not in PRIMITIVES


# -- the sharding analysis reads the table -----------------------------------------------------

@pytest.fixture
def test_primitive():
    """Registers primitives for one test (the primitive table's own tests must
    not see them) and removes them afterwards."""
    made = []

    def make(name, **rules):
        made.append(name)
        return defprim(name, shape=_same_shape, impl=lambda xp, x: x * 2,
                       vjp=lambda g, out, x: (g * 2,), **rules)
    yield make
    for name in made:
        PRIMITIVES.pop(name, None)


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(sharding, "MIN_SHARD_ELEMENTS", 0)


def _model_and_batch():
    return {"w": rng.standard_normal((8, 16)).astype(np.float32)}, rng.standard_normal((32, 8)).astype(np.float32)


def _compiled_kinds(fn):
    compiled = fn._last().compiled
    return [type(c) for _, c in compiled.candidates] if isinstance(compiled, Autotuned) else [type(compiled)]


def test_a_primitive_with_its_own_sharding_rule_is_split(test_primitive, small_threshold):
    asked = []

    def rows_stay_rows(node, states, ctx):
        asked.append((node.op, states[0]))
        return states[0]
    doubled_p = test_primitive("doubled_rows_test_op", sharding=on_sharded(rows_stay_rows))
    m, x = _model_and_batch()
    g = avalon.trace(lambda m, x: bind(doubled_p, (avalon.tanh(x @ m["w"]),)), m, x)
    plan = sharding.split_batch(g, {g.inputs[1]}, 2)
    assert plan is not None and asked == [("doubled_rows_test_op", sharding.S(0))]
    f = avalon.jit(lambda m, x: bind(doubled_p, (avalon.tanh(x @ m["w"]),)))
    out = f(m, x)
    assert ShardedFunction in _compiled_kinds(f)
    np.testing.assert_allclose(out, 2 * np.tanh(x @ m["w"]), rtol=1e-6)


def test_a_primitive_without_a_sharding_rule_is_not_split(test_primitive, small_threshold, caplog):
    doubled_p = test_primitive("unsharded_test_op")
    m, x = _model_and_batch()
    g = avalon.trace(lambda m, x: bind(doubled_p, (avalon.tanh(x @ m["w"]),)), m, x)
    with caplog.at_level(logging.DEBUG, logger="avalon.sharding"):
        assert sharding.split_batch(g, {g.inputs[1]}, 2) is None
    assert "no sharding rule for unsharded_test_op" in caplog.text
    # on replicated values it is harmless: the rest of the step is still split
    g = avalon.trace(lambda m, x: avalon.tanh(x @ bind(doubled_p, (m["w"],))), m, x)
    assert sharding.split_batch(g, {g.inputs[1]}, 2) is not None


def test_the_old_module_still_reaches_the_analysis(monkeypatch):
    from avalon import parallel
    monkeypatch.setattr(parallel, "MIN_SHARD_ELEMENTS", 7)
    assert sharding.MIN_SHARD_ELEMENTS == 7 and parallel.MIN_SHARD_ELEMENTS == 7
    assert parallel.ShardedFunction is ShardedFunction and parallel.split_components is sharding.split_components


# -- the pipeline comes from the backend -------------------------------------------------------

class _GpuLike(Backend):
    """A backend with no passes of its own, computing with the base class's NumPy kernels."""
    name = "gpulike_test"
    package = "avalon-gpulike-test"
    priority = -5


class _GpuLikePlugin:
    @avalon.hookimpl
    def avalon_backends(self):
        return [_GpuLike]


def _names(pipeline):
    return [name for name, _ in pipeline]


def test_cpu_only_passes_come_from_the_cpu_backend():
    cpu, gpu = _names(passes.default_pipeline(CpuBackend)), _names(passes.default_pipeline(_GpuLike))
    # fuse_views: C kernels read slices in place; shared transposes: OpenBLAS's slower transposed operands;
    # lone reductions: NumPy's sums are slower than C's; wide products: OpenBLAS's row-count gap;
    # updates: one C kernel per run of in-place writes, each moved up to just after its gradient
    cpu_only = ("layout", "shared_transposed_operands", "wide_products", "fuse_lone_ops", "fuse_views",
                "fuse_updates", "early_updates")
    assert all(n in cpu and n not in gpu for n in cpu_only)
    assert [n for n in cpu if n not in cpu_only] == gpu == _names(passes.BUILTIN)
    assert _names(passes.forward_pipeline(CpuBackend)) == ["pool_first"]
    assert passes.forward_pipeline(_GpuLike) == []
    assert _names(passes.default_pipeline()) == cpu  # the default device's


def test_a_pass_placed_by_a_cpu_only_pass_goes_where_that_pass_would_be():
    def mark(graph):
        return graph
    passes.add_pass(mark, after="layout")
    try:
        cpu, gpu = _names(passes.default_pipeline(CpuBackend)), _names(passes.default_pipeline(_GpuLike))
        assert cpu[cpu.index("layout") + 1] == "mark"
        assert gpu[gpu.index("dce_2") + 1] == "mark"
    finally:
        passes.remove_pass("mark")
    assert "mark" not in _names(passes.default_pipeline(_GpuLike))


def _cnn(x, w):
    return avalon.max_pool2d(avalon.relu(avalon.conv2d(x, w, padding=1)), 2)


def test_a_gpu_like_backend_compiles_without_the_cpu_layout():
    x, w = rng.standard_normal((4, 2, 8, 8)).astype(np.float32), rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    plugins.register(_GpuLikePlugin(), name="gpulike-test-plugin")
    try:
        on_gpu = avalon.compile_graph(avalon.trace(_cnn, x, w), "gpulike_test", passes=None)
        on_cpu = avalon.compile_graph(avalon.trace(_cnn, x, w), "cpu", passes=None)
        assert {"conv_csn", "im2col_csn"} & {n.op for n in on_cpu.graph.nodes}
        assert not {"conv_csn", "im2col_csn", "max_pool_csn"} & {n.op for n in on_gpu.graph.nodes}
        np.testing.assert_allclose(on_gpu.fn(x, w)[0], on_cpu.fn(x, w)[0], rtol=1e-5, atol=1e-6)
    finally:
        plugins.unregister("gpulike-test-plugin")
