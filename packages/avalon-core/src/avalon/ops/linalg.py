"""Batched matrix multiplication (NumPy's matmul semantics: the last two axes
multiply, leading axes broadcast)."""
from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError
from ..primitive import bind, defprim
from . import _batching
from ._rules import broadcast_shapes, result_dtype
from .indexing import _located  # errors name the user's line
from ._sharding import P, R, S, NeedsReduce, NoSplit, on_sharded
from .shape import reshape, swapaxes


def _matmul_rule(a, b):
    if len(a.shape) < 2 or len(b.shape) < 2:
        raise ShapeError(f"matmul: the primitive needs operands of rank >= 2, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not align: "
                         f"{a.shape[-1]} (last axis of the first) != {b.shape[-2]} "
                         "(second-to-last axis of the second)")
    batch = broadcast_shapes("matmul", a.shape[:-2], b.shape[:-2])
    return batch + (a.shape[-2], b.shape[-1]), result_dtype("matmul", a.dtype, b.dtype)


def _matmul_vjp(g, out, a, b):
    from .reduce import sum_to
    ga = matmul(g, swapaxes(b, -1, -2))
    gb = matmul(swapaxes(a, -1, -2), g)
    return sum_to(ga, a.shape), sum_to(gb, b.shape)


def _matmul_impl(xp, a, b, out=None):
    return xp.matmul(a, b, out=out)


def _matmul_sharding(node, states, ctx):
    a, b = node.inputs
    sa, sb = states
    if P in states:
        if (sa == P and sb == R) or (sa == R and sb == P):
            return P
        raise NeedsReduce(a if sa == P else b)
    nd = node.ndim
    if sb == R:  # rows of a (or its batch dims) are sharded
        ax = sa[1]
        if ax == a.ndim - 1:
            raise NoSplit("matmul contracts a sharded axis against a replicated one")
        return S(ax + nd - a.ndim, sa[2])
    if sa == R:
        ax = sb[1]
        if ax == b.ndim - 2:
            raise NoSplit("matmul contracts a sharded axis against a replicated one")
        return S(ax + nd - b.ndim, sb[2])
    if sa[1] == a.ndim - 1 and sb[1] == b.ndim - 2 and sa[2] == sb[2]:
        return P  # contraction over the batch: a weight gradient
    if sa[1] + nd - a.ndim == sb[1] + nd - b.ndim and sa[1] < a.ndim - 2 and sa[2] == sb[2]:
        return S(sa[1] + nd - a.ndim, sa[2])  # batched matmul over the batch axis
    raise NoSplit("matmul sharding")


# merge_sum: sum_t A_t @ B_t (a weight used at every step of a recurrence gets
# one gradient product per step) is ONE product of the operands joined along
# the contracted axis, [A_0 .. A_T] @ [B_0; ..; B_T]: one GEMM instead of T,
# and no T-1 additions of the result.  Joining copies the operands, so the rule
# fires only when that moves less memory than the additions it removes.

def _plain_product(n) -> bool:
    """A matmul whose operands have the result's batch axes (no broadcasting)."""
    a, b = n.inputs
    return a.ndim == b.ndim == n.ndim and a.shape[:-2] == b.shape[:-2] == n.shape[:-2] and a.dtype == b.dtype


def _joined_cheaper(products) -> bool:
    """Memory traffic in elements: T results written and T-1 additions (two
    reads, one write) against copying every operand once (read and write)."""
    out = products[0].size
    separate = len(products) * out + (len(products) - 1) * 3 * out
    joined = sum(2 * (n.inputs[0].size + n.inputs[1].size) for n in products) + out
    return joined < separate


def _swapped_last(n) -> bool:
    perm = n.attrs.get("perm") if n.op == "transpose" else None
    return perm is not None and tuple(perm) == tuple(range(n.ndim - 2)) + (n.ndim - 1, n.ndim - 2)


def _join(parts, axis, loc):
    """New nodes concatenating `parts` along `axis`; transposes of the last two
    axes are joined before the transpose (a contiguous copy, then a free view)."""
    from ..graph import Node
    nd = parts[0].ndim
    if all(_swapped_last(p) for p in parts):
        inner = _join([p.inputs[0] for p in parts], 2 * nd - 3 - axis, loc)
        src = inner[-1]
        perm = tuple(range(nd - 2)) + (nd - 1, nd - 2)
        return inner + [Node("transpose", [src], {"perm": perm}, tuple(src.shape[p] for p in perm), src.dtype, loc)]
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    return [Node("concatenate", list(parts), {"axis": axis}, shape, parts[0].dtype, loc)]


def _merge_matmul_sum(nodes):
    from ..graph import Node
    products = [n for n in nodes if _plain_product(n)]
    if len(products) < 2 or len({(n.inputs[0].dtype, n.inputs[1].dtype) for n in products}) > 1:
        return None
    if not _joined_cheaper(products):
        return None
    first = products[0]
    nd, loc = first.ndim, first.loc
    left = _join([n.inputs[0] for n in products], nd - 1, loc)
    right = _join([n.inputs[1] for n in products], nd - 2, loc)
    product = Node("matmul", [left[-1], right[-1]], {}, first.shape, first.dtype, loc)
    return left + right + [product], products


# vmap: the batch axes of the operands aligned in front of NumPy's broadcast
# batch dims (an unmapped operand broadcasts over the batch), then one matmul
matmul_p = defprim("matmul", shape=_matmul_rule, impl=_matmul_impl, accepts_out=True, vjp=_matmul_vjp,
                   sharding=on_sharded(_matmul_sharding, reads_partials=True),
                   batching=_batching.elementwise_rule("matmul"), merge_sum=_merge_matmul_sum)


def matmul(a, b):
    """a @ b; 1-D operands are promoted as in NumPy (a vector is a row on the
    left, a column on the right) and the added axis is removed again."""
    a_nd, b_nd = len(a.shape), len(b.shape)
    if a_nd == 0 or b_nd == 0:
        raise ShapeError(f"matmul: scalar operands are not allowed (shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}); use * for scaling")
    if a_nd == 1:
        a = reshape(a, (1, a.shape[0]))
    if b_nd == 1:
        b = reshape(b, (b.shape[0], 1))
    if a_nd == 1 and b_nd == 1 and a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"matmul: shapes ({a.shape[-1]},) and ({b.shape[-2]},) do not align")
    from .elementwise import _promote
    if len(a.shape) > 2 and len(b.shape) == 2 and a.shape[-1] == b.shape[-2]:   # (else the shape rule says why not)
        r = _stack_times_matrix(a, b, _promote)
    else:
        r = bind(matmul_p, _promote(a, b))
    if a_nd == 1:
        r = reshape(r, r.shape[:-2] + r.shape[-1:])
    if b_nd == 1:
        r = reshape(r, r.shape[:-1])
    return r


def _stack_times_matrix(a, b, promote):
    """A stack of matrices times one matrix as ONE 2-D product over all their rows,
    reshaped back: one GEMM where a batched product makes one per matrix, and in
    reverse mode the matrix's gradient is one product over all the rows too, not a
    batched product summed over the stack (a recurrent layer's input projection over
    all its time steps: 28 products and a sum -> 1 product)."""
    rows = int(math.prod(a.shape[:-1]))
    flat = bind(matmul_p, promote(reshape(a, (rows, a.shape[-1])), b))
    return reshape(flat, tuple(a.shape[:-1]) + (b.shape[-1],))


def linear(x, weight, bias=None):
    """x @ weight.T + bias, with weight laid out (out_features, in_features) as in PyTorch."""
    from .elementwise import add
    y = matmul(x, swapaxes(weight, -1, -2))
    return add(y, bias) if bias is not None else y


# -- einsum ----------------------------------------------------------------------------------
# A composite: each operand's own labels are summed out (and repeated labels
# reduced to their diagonal), then operands are contracted left to right, each
# contraction one (batched) matmul over transposed and reshaped operands, so the
# code generator keeps calling BLAS and gradients come from those primitives.
# Labels are letters; the axes an ellipsis stands for get the labels 0, 1, ...
# (ints), aligned from the right as in broadcasting.

def _einsum_error(msg):
    from ..errors import ShapeError
    return ShapeError(f"einsum: {msg}")


def _parse_term(term, ndim, what):
    """A subscript term ('ij', 'b...i') of an array with `ndim` axes -> labels
    (letters, and for the ellipsis the ints of the broadcast axes it covers)."""
    if term.count("...") > 1 or ("." in term.replace("...", "")):
        raise _einsum_error(f"{what} {term!r} has a stray '.'; an ellipsis is exactly '...', at most once")
    head, _, tail = term.partition("...")
    for c in head + tail:
        if not c.isalpha():
            raise _einsum_error(f"{what} {term!r} holds {c!r}; subscripts are letters a-z, A-Z and '...'")
    if "..." not in term:
        if len(term) != ndim:
            raise _einsum_error(f"{what} {term!r} has {len(term)} subscripts for an array with {ndim} axes")
        return list(term)
    n_ell = ndim - len(head) - len(tail)
    if n_ell < 0:
        raise _einsum_error(f"{what} {term!r} has {len(head) + len(tail)} subscripts for an array with "
                            f"{ndim} axes")
    return list(head) + [-n_ell + k for k in range(n_ell)] + list(tail)


def _parse_einsum(subscripts, shapes):
    """-> (labels of each operand, output labels, size of each label)."""
    spec = subscripts.replace(" ", "")
    inputs, arrow, output = spec.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(shapes):
        raise _einsum_error(f"{subscripts!r} names {len(terms)} operands, but {len(shapes)} were given")
    labels = [_parse_term(t, len(s), f"operand {k}'s subscripts") for k, (t, s) in enumerate(zip(terms, shapes))]
    n_ell = max([-min([lab for lab in ls if isinstance(lab, int)], default=0) for ls in labels])
    ell = list(range(-n_ell, 0))  # ellipsis labels, right-aligned: -1 is the last broadcast axis
    sizes = {}
    for k, (ls, shape) in enumerate(zip(labels, shapes)):
        own = {}
        for lab, n in zip(ls, shape):
            if own.setdefault(lab, n) != n:
                raise _einsum_error(f"subscript {lab!r} is repeated in operand {k} over axes of sizes {own[lab]} "
                                    f"and {n}; a repeated subscript takes a diagonal and needs equal sizes")
        for lab, n in own.items():
            old = sizes.get(lab, 1)
            if n != old and old != 1 and n != 1:
                name = f"subscript {lab!r}" if isinstance(lab, str) else "the axes of '...'"
                raise _einsum_error(f"{name} has size {old} in an earlier operand and {n} in operand {k} (shapes "
                                    f"{', '.join(str(tuple(s)) for s in shapes)}); sizes must be equal or 1")
            if lab not in sizes or old == 1:
                sizes[lab] = n
    letters = [lab for ls in labels for lab in ls if isinstance(lab, str)]
    if not arrow:
        out = ell + sorted({c for c in letters if letters.count(c) == 1})
    else:
        if "->" in output or "-" in output or ">" in output:
            raise _einsum_error(f"{subscripts!r} has more than one '->'")
        if "..." not in output and any(sizes.get(e, 1) != 1 for e in ell):
            raise _einsum_error(f"the operands have axes under '...' but the output {output!r} has no '...' "
                                "to keep them; add '...' to the output (or sum them out first)")
        out = _parse_term(output, len(output.replace("...", "")) + (n_ell if "..." in output else 0), "the output")
        for lab in out:
            if isinstance(lab, str) and lab not in letters:
                raise _einsum_error(f"output subscript {lab!r} appears in no operand of {subscripts!r}")
        if len(set(out)) != len(out):
            raise _einsum_error(f"the output {output!r} repeats a subscript")
    return labels, out, sizes


def _diagonal(x, labels):
    """Repeated labels of one operand ('ii') -> their diagonal, one axis each
    (_parse_einsum has checked that their sizes agree)."""
    from .indexing import getitem
    from .shape import transpose
    while len(set(labels)) != len(labels):
        lab = next(lab for lab in labels if labels.count(lab) > 1)
        i, j = [k for k, v in enumerate(labels) if v == lab][:2]
        rest = [k for k in range(len(labels)) if k not in (i, j)]
        x = transpose(x, tuple(rest + [i, j]))
        diag = np.arange(x.shape[-1])
        x = getitem(x, (Ellipsis, diag, diag))
        labels = [labels[k] for k in rest] + [lab]
    return x, labels


def _sum_labels(x, labels, keep):
    """Sum out the axes whose labels are not in `keep`."""
    from .reduce import sum as sum_
    axes = tuple(k for k, lab in enumerate(labels) if lab not in keep)
    if not axes:
        return x, labels
    return sum_(x, axis=axes), [lab for lab in labels if lab in keep]


def _broadcast_labels(x, labels, sizes):
    """Size-1 axes stretched to their label's size (einsum broadcasts them)."""
    from .shape import broadcast_to
    full = tuple(sizes[lab] for lab in labels)
    return (x if tuple(x.shape) == full else broadcast_to(x, full)), labels


def _arrange(x, labels, order, shape):
    """x with its axes in `order` (labels), reshaped to `shape`."""
    from .shape import transpose
    x = transpose(x, tuple(labels.index(lab) for lab in order))
    return reshape(x, shape)


def _contract(a, la, b, lb, keep, sizes):
    """Two operands -> their product over shared labels, summed over those not in `keep`.
    Result labels: shared kept ones (batch), then a's own, then b's own."""
    from .elementwise import mul
    batch = [lab for lab in la if lab in lb and lab in keep]
    summed = [lab for lab in la if lab in lb and lab not in keep]
    a_own = [lab for lab in la if lab not in lb]
    b_own = [lab for lab in lb if lab not in la]
    size = lambda ls: int(math.prod([sizes[lab] for lab in ls]))  # noqa: E731
    bshape = [sizes[lab] for lab in batch]
    out_labels = batch + a_own + b_own
    if not summed:  # an outer or elementwise product: broadcasting, no matmul
        a = _arrange(a, la, batch + a_own, bshape + [sizes[lab] for lab in a_own] + [1] * len(b_own))
        b = _arrange(b, lb, batch + b_own, bshape + [1] * len(a_own) + [sizes[lab] for lab in b_own])
        return mul(a, b), out_labels
    lead = [size(batch)] if batch else []
    a = _arrange(a, la, batch + a_own + summed, lead + [size(a_own), size(summed)])
    b = _arrange(b, lb, batch + summed + b_own, lead + [size(summed), size(b_own)])
    out = matmul(a, b)
    return reshape(out, tuple(bshape + [sizes[lab] for lab in a_own + b_own])), out_labels


@_located
def einsum(subscripts, *operands, out=None, dtype=None, order="K", casting="safe", optimize=False):
    """np.einsum in the subscripts-string form: 'ij,jk->ik', implicit output
    ('ij,jk': the subscripts used once, in alphabetical order), '...' for
    broadcast axes, repeated subscripts in one operand for a diagonal ('ii->i').
    Operands are contracted left to right, each step one matmul (BLAS); `optimize`
    is accepted and changes nothing.  `dtype` casts the operands first; `out`,
    `order` and `casting` other than their defaults are refused."""
    from ..errors import AvalonError
    from .elementwise import cast
    from .shape import transpose
    if not isinstance(subscripts, str):
        raise AvalonError("einsum: only the subscripts-string form einsum('ij,jk->ik', a, b) is supported, not "
                          "the interleaved einsum(a, [0, 1], b, [1, 2]) form")
    if out is not None or order != "K" or casting != "safe":
        raise AvalonError("einsum: out=, order= and casting= are not supported (results are new arrays)")
    if not operands:
        raise _einsum_error("needs at least one operand")
    operands = [np.asarray(o) if not hasattr(o, "shape") else o for o in operands]
    if dtype is not None:
        operands = [cast(o, dtype) for o in operands]
    labels, out_labels, sizes = _parse_einsum(subscripts, [tuple(o.shape) for o in operands])
    prepared = []
    for k, (x, ls) in enumerate(zip(operands, labels)):
        x, ls = _diagonal(x, ls)
        needed = set(out_labels).union(*(labels[j] for j in range(len(operands)) if j != k))
        x, ls = _sum_labels(x, ls, needed)
        prepared.append(_broadcast_labels(x, ls, sizes))
    acc, la = prepared[0]
    for k in range(1, len(prepared)):
        b, lb = prepared[k]
        keep = set(out_labels).union(*(labels[j] for j in range(k + 1, len(operands))))
        acc, la = _sum_labels(acc, la, keep | set(lb))
        acc, la = _contract(acc, la, b, lb, keep, sizes)
    acc, la = _sum_labels(acc, la, set(out_labels))
    return transpose(acc, tuple(la.index(lab) for lab in out_labels))
