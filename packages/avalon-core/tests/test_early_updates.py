"""passes.early_updates: each in-place write moves up to just after the last
node it must follow (its operands, earlier readers and writers of what it
writes, earlier writers of what it reads), so an optimizer update traced after
the whole gradient runs right after its own gradient's product."""
import numpy as np
import pytest

import avalon
from avalon import passes

rng = np.random.default_rng(0)


def _arrays(*shapes):
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _ops(g):
    return [n.op for n in g.nodes if n.op not in ("input", "const")]


def _moved(f, *args):
    g = passes.dce(avalon.trace(f, *args))
    before = _ops(g)
    g = passes.early_updates(g)
    g.check()
    return before, _ops(g)


def gradient_then_unrelated_work(w, x, m):
    g = x.T @ x @ w
    s = avalon.exp(x).sum()
    avalon.assign(m, m + g)
    return s


def reads_the_destination_through_a_view(w, x):
    y = x @ w.T                     # reads w through its transpose
    s = avalon.exp(y).sum()
    avalon.assign(w, w * np.float32(0.5))
    return s


def writes_what_a_later_write_reads(a, b, c):
    avalon.assign(a, a + np.float32(1))
    s = avalon.exp(c).sum()
    avalon.assign(b, a)             # the new a
    return s


def test_a_write_moves_up_to_just_after_the_product_it_reads():
    before, after = _moved(gradient_then_unrelated_work, *_arrays((8, 8), (4, 8), (8, 8)))
    assert before.index("assign") > before.index("exp")
    assert after[after.index("assign") - 2:after.index("assign")] == ["matmul", "add"]
    assert after.index("assign") < after.index("exp")


def test_a_write_stays_after_a_read_of_its_destination_through_a_view():
    before, after = _moved(reads_the_destination_through_a_view, *_arrays((6, 5), (3, 5)))
    assert after.index("assign") > after.index("matmul")
    assert after.index("assign") < after.index("exp")


def test_a_write_stays_after_the_write_of_an_array_it_reads():
    before, after = _moved(writes_what_a_later_write_reads, *_arrays(7, 7, 7))
    first, second = [k for k, op in enumerate(after) if op == "assign"]
    assert second == first + 1 and after.index("exp") > second


@pytest.mark.parametrize("native", ["1", "0"], ids=["C", "NumPy"])
@pytest.mark.parametrize("case", ["gradient", "view", "write"])
def test_compiled_functions_compute_what_the_trace_order_computes(case, native, monkeypatch):
    monkeypatch.setenv("AVALON_NATIVE", native)
    if case == "gradient":
        w, x, m = _arrays((8, 8), (4, 8), (8, 8))
        want_s, want = np.exp(x).sum(), {"m": m + x.T @ x @ w}
        got_s = avalon.jit(gradient_then_unrelated_work)(w, x, m)
        got = {"m": m}
    elif case == "view":
        w, x = _arrays((6, 5), (3, 5))
        want_s, want = np.exp(x @ w.T).sum(), {"w": w * np.float32(0.5)}
        got_s = avalon.jit(reads_the_destination_through_a_view)(w, x)
        got = {"w": w}
    else:
        a, b, c = _arrays(7, 7, 7)
        want_s, want = np.exp(c).sum(), {"a": a + 1, "b": a + 1}
        got_s = avalon.jit(writes_what_a_later_write_reads)(a, b, c)
        got = {"a": a, "b": b}
    np.testing.assert_allclose(got_s, want_s, rtol=1e-5)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, err_msg=name)


def test_the_cpu_pipeline_moves_updates_after_fusing_them():
    names = [name for name, _ in passes.default_pipeline()]
    assert names.index("early_updates") == names.index("fuse_updates") + 1
