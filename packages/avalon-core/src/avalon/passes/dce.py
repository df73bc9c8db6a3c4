"""Dead-code elimination: drop every node the outputs do not depend on
(writes into inputs, such as assign, are kept: they are the point)."""
from ..primitive import PRIMITIVES


def dce(graph):
    live = set(graph.outputs)
    live.update(n for n in graph.nodes if getattr(PRIMITIVES.get(n.op), "writes_input", False))
    for n in reversed(graph.nodes):
        if n in live:
            live.update(n.inputs)
    graph.nodes = [n for n in graph.nodes if n in live or n.op == "input"]
    return graph
