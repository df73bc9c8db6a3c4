"""The graph IR: stable text form, editing, and the verifier."""
import numpy as np
import pytest

import avalon
from avalon import GraphError
from avalon.graph import Node

X = np.ones((2, 3), np.float32)
W = np.ones((3, 4), np.float32)


def small(x, w):
    return avalon.sum(avalon.tanh(x @ w) * 2.0, axis=1)


def test_printed_form_is_stable():
    g = avalon.trace(small, X, W)
    assert g.format(show_loc=False) == (
        "small(%0: f32[2,3], %1: f32[3,4]) {\n"
        "  %2 = matmul(%0, %1) : f32[2,4]\n"
        "  %3 = tanh(%2) : f32[2,4]\n"
        "  %4 = const 2.0 : f32[]\n"
        "  %5 = mul(%3, %4) : f32[2,4]\n"
        "  %6 = sum(%5) {axes=(1,), keepdims=False} : f32[2]\n"
        "  return (%6)\n"
        "}")


def test_nodes_remember_the_users_source_line():
    g = avalon.trace(small, X, W)
    matmul = [n for n in g.nodes if n.op == "matmul"][0]
    assert matmul.loc.endswith(f"test_graph.py:{small.__code__.co_firstlineno + 1}")
    assert "# test_graph.py:" in str(g)


def test_traced_structures_come_back_in_the_output_tree():
    g = avalon.trace(lambda d: {"y": d["a"] + 1.0, "n": 3}, {"a": X})
    assert len(g.inputs) == 1 and len(g.outputs) == 1
    assert avalon.tree.unflatten(g.out_tree, ["Y"]) == {"y": "Y", "n": 3}


def test_editing_replace_insert_remove_and_check():
    g = avalon.trace(small, X, W)
    tanh = [n for n in g.nodes if n.op == "tanh"][0]
    relu = Node("relu", tanh.inputs, {}, tanh.shape, tanh.dtype)
    g.insert_after(tanh, relu)
    g.replace_all_uses(tanh, relu)
    with pytest.raises(GraphError, match="still has uses"):
        g.remove(tanh.inputs[0])
    g.remove(tanh)
    g.check()
    assert [n.op for n in g.nodes if n.op not in ("input", "const")] == ["matmul", "relu", "mul", "sum"]
    fn = avalon.compile_graph(g, "cpu")
    (out,) = fn(X, W)
    np.testing.assert_allclose(out, (np.maximum(X @ W, 0) * 2).sum(1))


def test_check_finds_use_before_definition():
    g = avalon.trace(small, X, W)
    g.nodes.reverse()
    with pytest.raises(GraphError, match="not defined before it"):
        g.check()


def test_check_finds_a_wrong_recorded_shape():
    g = avalon.trace(small, X, W)
    tanh = [n for n in g.nodes if n.op == "tanh"][0]
    tanh.shape = (4, 2)
    with pytest.raises(GraphError, match=r"tanh\) records f32\[4,2\] but its shape rule gives f32\[2,4\]"):
        g.check()


def test_check_finds_unknown_ops_and_dangling_outputs():
    g = avalon.trace(small, X, W)
    g.nodes[-1].op = "frobnicate"
    with pytest.raises(GraphError, match="unknown op 'frobnicate'"):
        g.check()
    g = avalon.trace(small, X, W)
    g.outputs = [Node("tanh", [g.inputs[0]], {}, (2, 3), np.float32)]
    with pytest.raises(GraphError, match="not defined"):
        g.check()


def test_copy_is_independent():
    g = avalon.trace(small, X, W)
    h = g.copy()
    h.nodes[-1].op = "max"
    assert g.nodes[-1].op == "sum"
    assert h.format(show_loc=False).replace("max(", "sum(") == g.format(show_loc=False)
