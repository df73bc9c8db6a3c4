"""Merging sums: a sum of many terms of one kind becomes fewer, cheaper nodes.

Reverse-mode differentiation sums the cotangents of a value read in many
places, one addition at a time.  When the reads are alike, so are the terms:
an RNN reads its input projection x_proj[t] at every step, and each read's
gradient is a zero array of the full shape with one slice written; a weight
used at every step gets one product h_t^T @ g_t per step.  Added one by one,
those cost O(steps x size) memory traffic where one node costs O(size).

This pass finds each sum (a tree of `add` nodes whose inner additions are read
by the tree alone) and hands its terms to their primitives' `merge_sum` rules
(see `avalon.primitive.defprim`): terms whose ops share a rule go to it
together, and the rule returns new nodes for the subset it merges (or None
when merging would not be cheaper).  The sum is rebuilt from what the rules
made and the terms they left.  Rounds repeat while something merged, so a
rule's result can merge further (a sum of transposed products becomes the
transpose of a sum of products, then one product).

A term is merged only when the tree alone reads it and no write into an input
(assign) lies between it and the sum: the rule's nodes read the term's operands
where the sum is, not where the term was.
"""
from __future__ import annotations

from ..graph import Node
from ..primitive import PRIMITIVES, infer_type
from .dce import dce
from .fusion import write_epochs

ADD = "add"

#: rounds of merging at most (each round merges what the previous one made mergeable)
MAX_ROUNDS = 4


def merge_sums(graph):
    for _ in range(MAX_ROUNDS):
        graph = dce(graph)
        if not _merge_round(graph):
            break
    return graph


def _merge_round(graph) -> bool:
    users = graph.uses()
    outputs = set(graph.outputs)
    epoch = write_epochs(graph)
    changed = False
    for root in list(graph.nodes):
        if root.op != ADD or _inner_addition(root, root, users, outputs):
            continue
        terms = _terms(root, users, outputs)
        merged = _merge_terms(root, terms, users, outputs, epoch)
        if merged is not None:
            _rebuild(graph, root, *merged)
            changed = True
    return changed


def _inner_addition(n, root, users, outputs) -> bool:
    """n is an addition inside a larger sum: read only by one addition of the
    root's shape and dtype, and not an output."""
    readers = users.get(n, ())
    return (n.op == ADD and n.shape == root.shape and n.dtype == root.dtype and n not in outputs
            and len(readers) == 1 and readers[0].op == ADD and readers[0].shape == root.shape
            and readers[0].dtype == root.dtype)


def _terms(root, users, outputs):
    """[(term, the addition reading it)] of the sum at `root`, left to right."""
    terms = []
    stack = [(root, None)]
    while stack:
        n, parent = stack.pop()
        if n is root or (n.op == ADD and parent is not None and _inner_addition(n, root, users, outputs)):
            stack.extend((i, n) for i in reversed(n.inputs))
        else:
            terms.append((n, parent))
    return terms


def _mergeable(term, parent, root, users, outputs, epoch) -> bool:
    return (term.op in PRIMITIVES and term.shape == root.shape and term.dtype == root.dtype
            and term not in outputs and users.get(term) == [parent] and epoch[term] == epoch[root])


def _merge_terms(root, terms, users, outputs, epoch):
    """(new nodes, the terms they replace, the terms left) or None."""
    by_rule: dict = {}
    for term, parent in terms:
        if _mergeable(term, parent, root, users, outputs, epoch):
            rule = PRIMITIVES[term.op].rule("merge_sum", None)
            if rule is not None:
                by_rule.setdefault(rule, []).append(term)
    new_nodes, results, replaced = [], [], set()
    for rule, group in by_rule.items():
        if len(group) < 2:
            continue
        made = rule(group)
        if made is None:
            continue
        nodes, used = made
        new_nodes += nodes
        results.append(nodes[-1])
        replaced.update(used)
    if not results:
        return None
    left = [t for t, _ in terms if t not in replaced]
    return new_nodes, results + left


def _rebuild(graph, root, new_nodes, summands):
    """Insert new_nodes and the additions of `summands` before `root`, and make
    every reader of root read their sum."""
    add_p = PRIMITIVES[ADD]
    total = summands[0]
    for s in summands[1:]:
        shape, dtype = infer_type(add_p, [total, s], {})
        total = Node(ADD, [total, s], {}, shape, dtype, root.loc)
        new_nodes.append(total)
    at = graph.nodes.index(root)
    graph.nodes[at:at] = new_nodes
    graph.replace_all_uses(root, total)
