"""Lowered kernels remembered between processes (backends.cpu_native through
kernel_ir.keys and runtime.disk_memo): what the keys tell apart, a kernel read
back instead of lowered again, a damaged entry lowered again, and what has no
key."""
import importlib

import numpy as np
import pytest

import avalon
from avalon.backends import cpu_native, get_backend
from avalon.kernel_ir import glue, keys
from avalon.primitive import PRIMITIVES
from avalon.runtime import native
from avalon.testing.bodies import body_of
from avalon.testing.calls import record_calls

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)

pytestmark = pytest.mark.skipif(not native.available(), reason="no usable C compiler")


def _body(shape=(4, 8), dtype=F32, scale=2.0, axes=(1,)):
    return body_of([(shape, dtype), (shape, dtype)],
                   lambda o, x, y: o("sum", o("mul", o("exp", x), (scale, dtype)), axes=axes, keepdims=False))


@pytest.fixture
def fresh_process(tmp_path, monkeypatch):
    """An empty disk cache, and a function forgetting what this process lowered."""
    monkeypatch.setenv("AVALON_CACHE_DIR", str(tmp_path))

    def forget():
        cpu_native._REMEMBERED.clear()
        cpu_native._LOWERED.clear()
        cpu_native._BODY_KERNELS.clear()
    forget()
    yield forget
    forget()


def test_equal_bodies_have_equal_keys_and_any_difference_makes_another():
    base = keys.body_key(_body())
    assert base == keys.body_key(_body())
    others = [_body(shape=(4, 9)), _body(dtype=F64), _body(scale=2.5), _body(axes=(0,))]
    assert len({base, *map(keys.body_key, others)}) == 5
    assert keys.body_key(_body(), "c") != base


def test_a_tunable_of_the_lowering_is_part_of_the_key(monkeypatch):
    base = keys.body_key(_body())
    monkeypatch.setattr(glue, "DIRECT_MIN_ROW", glue.DIRECT_MIN_ROW + 1)
    assert keys.body_key(_body()) != base
    monkeypatch.undo()
    assert keys.body_key(_body()) == base


def test_what_has_no_faithful_text_has_no_key():
    body = _body()
    body.nodes[-1].attrs["table"] = np.arange(3)      # an array attribute
    assert keys.body_key(body) is None


def test_a_primitive_from_a_plugin_has_no_key(monkeypatch):
    def plugin_shape(x):
        return x.shape, x.dtype
    plugin_shape.__module__ = "someone_elses_layers.ops"
    prim = PRIMITIVES["exp"]
    monkeypatch.setattr(prim, "shape_rule", plugin_shape)
    monkeypatch.setattr(keys, "_OWN", {})
    assert keys.body_key(_body()) is None


def _counting_lower(monkeypatch):
    return record_calls(monkeypatch, cpu_native, "lower")


def test_a_body_lowered_in_an_earlier_process_is_read_back(fresh_process, monkeypatch):
    calls = _counting_lower(monkeypatch)
    first = cpu_native._lowered_body(_body())
    assert len(calls) == 1
    fresh_process()
    again = cpu_native._lowered_body(_body())
    assert len(calls) == 1 and again.text == first.text and again.name == first.name
    x, y = np.random.default_rng(0).standard_normal((2, 4, 8)).astype(np.float32)
    fn = cpu_native.compile_fused_c(_body(), get_backend("cpu"))
    np.testing.assert_allclose(fn(x, y), (np.exp(x) * 2.0).sum(axis=1), rtol=1e-6)


def test_a_damaged_entry_is_lowered_again(fresh_process, monkeypatch, tmp_path):
    calls = _counting_lower(monkeypatch)
    first = cpu_native._lowered_body(_body())
    (entry,) = (tmp_path / "lowered").glob("*.kernel")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x10
    entry.write_bytes(bytes(data))
    fresh_process()
    again = cpu_native._lowered_body(_body())
    assert len(calls) == 2 and again.text == first.text


def test_a_node_rule_declining_is_remembered_too(fresh_process):
    node = avalon.trace(lambda x: avalon.sum(x), np.ones((3, 4), np.float32)).nodes[-1]

    def declines(n):
        declines.calls += 1
        return None
    declines.calls = 0
    assert cpu_native._lowered(node, declines) is None
    fresh_process()
    assert cpu_native._lowered(node, declines) is None and declines.calls == 1


def test_a_fused_update_is_lowered_once_for_its_body(fresh_process, monkeypatch):
    calls = _counting_lower(monkeypatch)
    calls_in_rule = record_calls(monkeypatch, importlib.import_module("avalon.kernel_ir.lower"), "lower")

    def step(p, m, g):
        avalon.assign(m, m * 0.9 + g)
        avalon.assign(p, p - 0.1 * m)
        return g + 1.0
    p, m, g = np.ones(1000, np.float32), np.zeros(1000, np.float32), np.full(1000, 2.0, np.float32)
    avalon.jit(step, parallel=False)(p, m, g)
    lowered, bodies = len(calls_in_rule), len(calls)
    assert lowered >= 1, "the writes are a fused update, lowered by its rule"
    fresh_process()
    q, n = np.ones(1000, np.float32), np.zeros(1000, np.float32)
    avalon.jit(step, parallel=False)(q, n, g)
    np.testing.assert_allclose(q, 0.8, rtol=1e-6)
    assert len(calls_in_rule) == lowered and len(calls) == bodies


def test_a_kernel_read_back_brings_its_c_source(fresh_process, monkeypatch):
    """The C text is rendered before a new kernel is kept, so a later process
    neither lowers nor renders it again."""
    from avalon.kernel_ir import CRenderer
    first = cpu_native._c_text(cpu_native._lowered_body(_body()))
    fresh_process()
    rendered = record_calls(monkeypatch, CRenderer, "render_kernel")
    again = cpu_native._lowered_body(_body())
    assert cpu_native._c_text(again) == first and rendered == []
    monkeypatch.setattr(cpu_native, "VECTOR_MATH", not cpu_native.VECTOR_MATH)   # another renderer setting
    assert cpu_native._c_text(again) == CRenderer(vector_math=cpu_native._vector_math(
        cpu_native.VECTOR_MATH)).render_kernel(again) and len(rendered) == 2


def test_the_source_fingerprint_sees_each_python_file_and_skips_bytecode(tmp_path):
    (tmp_path / "pkg" / "__pycache__").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    (tmp_path / "pkg" / "__pycache__" / "c.py").write_text("stale\n")

    def listing():
        out = []
        keys._source_files(str(tmp_path), "", out)
        return out
    first = listing()
    assert [line.split(":")[0] for line in first] == ["b.py", "pkg/a.py"]
    (tmp_path / "pkg" / "a.py").write_text("x = 10\n")          # another size
    assert listing() != first
