"""Dead-code elimination: drop every node the outputs do not depend on."""


def dce(graph):
    live = set(graph.outputs)
    for n in reversed(graph.nodes):
        if n in live:
            live.update(n.inputs)
    graph.nodes = [n for n in graph.nodes if n in live or n.op == "input"]
    return graph
