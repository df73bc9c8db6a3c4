"""User-defined gradients: avalon.custom_vjp.

    @avalon.custom_vjp
    def clip_gradient(x):
        return x

    def fwd(x):                 # -> (output, residuals kept for the backward pass)
        return x, ()

    def bwd(residuals, ct):     # -> one cotangent per argument of the function
        return (avalon.clip(ct, -1.0, 1.0),)

    clip_gradient.defvjp(fwd, bwd)

Called eagerly, the function runs as it is.  Inside a trace (jit, grad, or a
function they call), `fwd` is traced and each output array goes through a
`custom_vjp_call` node: the identity on the output, whose VJP calls `bwd`.  So
the forward ops of `fwd` carry no gradient of their own (as if under
stop_gradient), and the gradient with respect to the arguments is exactly what
`bwd` returns.  `bwd` is traced into the gradient graph like any VJP rule, so
a custom gradient composes with jit and with grad of grad: an enclosing grad
differentiates the ops `bwd` wrote (and those computing the residuals).
After differentiation the node is removed (simplify), so the compiled graph
pays nothing for it.

A function with several output arrays gets one node per output; each calls
`bwd` with that output's cotangent and zeros for the others (bwd is linear in
its cotangent, so the sum is the full VJP).
"""
from __future__ import annotations

import functools

import numpy as np

from . import tree
from .errors import AvalonError, MissingRuleError, ShapeError, at, user_location
from .graph import type_str
from .primitive import PRIMITIVES, active_graph, bind, bind_into, defprim, inline, is_tracer


class _VJPRule:
    """The attribute of a custom_vjp_call node: how to call the user's bwd.
    Compared by identity (one per traced call)."""
    __slots__ = ("name", "bwd", "arg_tree", "n_args", "res_tree", "out_tree", "out_avals", "index")

    def __init__(self, name, bwd, arg_tree, n_args, res_tree, out_tree, out_avals, index):
        self.name, self.bwd, self.arg_tree, self.n_args = name, bwd, arg_tree, n_args
        self.res_tree, self.out_tree, self.out_avals, self.index = res_tree, out_tree, out_avals, index

    def __repr__(self):
        return f"<custom_vjp {self.name} output {self.index}>"


def _call_rule(y, *rest, rule):
    return tuple(y.shape), y.dtype


def _call_vjp(ct, out, y, *rest, rule):
    from . import ops
    args, res = rest[:rule.n_args], rest[rule.n_args:]
    cts = [ct if k == rule.index else ops.zeros(shape, dtype) for k, (shape, dtype) in enumerate(rule.out_avals)]
    result = rule.bwd(tree.unflatten(rule.res_tree, list(res)), tree.unflatten(rule.out_tree, cts))
    return (None, *_arg_cotangents(rule, result, args), *([None] * len(res)))


def _call_batch(args, dims, *, rule):
    """Batching (avalon.vmap): the node on the batch, every operand batched at
    axis 0 (unmapped ones broadcast, so each argument's cotangent has the
    batch too and sums back through the broadcast), with a rule whose bwd is
    the user's bwd under avalon.vmap: the custom gradient of each example."""
    from .ops._batching import batch_size, broadcast_batch
    size = batch_size(args, dims)
    operands = tuple(broadcast_batch(a, d, size) for a, d in zip(args, dims))
    batched = _VJPRule(rule.name, _vmapped_bwd(rule.bwd, rule.name), rule.arg_tree, rule.n_args, rule.res_tree,
                       rule.out_tree, tuple(((size,) + tuple(shape), dtype) for shape, dtype in rule.out_avals),
                       rule.index)
    return bind(custom_vjp_call_p, operands, {"rule": batched}), 0


def _vmapped_bwd(bwd, name):
    """bwd(residuals, cotangents) for a batch: avalon.vmap(bwd), every
    residual and cotangent batched at axis 0, each cotangent it returns too."""
    def batched_bwd(residuals, cotangents):
        import avalon
        vmap = getattr(avalon, "vmap", None)
        if vmap is None:
            raise MissingRuleError(f"custom_vjp {name}: the gradient of a batched custom_vjp call runs its bwd "
                                   "under avalon.vmap, which is not available in this build")
        return vmap(bwd)(residuals, cotangents)
    return batched_bwd


custom_vjp_call_p = defprim(
    "custom_vjp_call", shape=_call_rule, impl=lambda xp, y, *rest, rule: y, view=True, vjp=_call_vjp,
    batching=_call_batch,
    doc="The identity on a custom_vjp function's output (its first operand); its VJP calls the user's "
        "bwd with the residuals (the operands after the function's arguments).")


def _arg_cotangents(rule, result, args):
    """bwd's result (one entry per positional argument: a cotangent with the
    argument's structure, or None) as one cotangent per argument leaf."""
    n_positional = len(rule.arg_tree.children)
    if not isinstance(result, (tuple, list)) or len(result) != n_positional:
        got = f"a {type(result).__name__} of {len(result)}" if isinstance(result, (tuple, list)) else \
            type(result).__name__
        raise AvalonError(f"custom_vjp {rule.name}: bwd must return a tuple with one cotangent per argument "
                          f"({n_positional}), it returned {got}")
    leaves = []
    for k, (sub, part) in enumerate(zip(rule.arg_tree.children, result)):
        n = len(tree.leaf_paths(sub))
        if part is None:
            leaves.extend([None] * n)
            continue
        got = tree.flatten(part, is_leaf=lambda x: x is None or is_tracer(x))[0]
        if len(got) != n:
            raise AvalonError(f"custom_vjp {rule.name}: bwd's cotangent for argument {k} has {len(got)} arrays; "
                              f"the argument has {n}")
        leaves.extend(got)
    return [_checked_cotangent(rule, c, a, k) for k, (c, a) in enumerate(zip(leaves, args))]


def _checked_cotangent(rule, c, arg, k):
    if c is None:
        return None
    if tuple(c.shape) != tuple(arg.shape):
        raise ShapeError(f"custom_vjp {rule.name}: bwd gave a cotangent of shape {tuple(c.shape)} for argument "
                         f"array {k} of type {type_str(arg.shape, arg.dtype)}")
    if not is_tracer(c):  # a constant cotangent (np.zeros): a node of the gradient graph
        c = bind_into(active_graph(), PRIMITIVES["stop_gradient"], [c], {})
    return c


class custom_vjp:
    """A function with a gradient of the user's own (JAX's jax.custom_vjp).

    Decorate the function, then give it `defvjp(fwd, bwd)`:
    fwd(*args) -> (output, residuals): the output (any structure of arrays)
        and whatever bwd needs (a structure of arrays);
    bwd(residuals, cotangent) -> a tuple with one entry per argument of the
        function: a cotangent of the argument's structure, or None (no gradient).

    See the module's doc for how it is traced and how it composes.  Related:
    `avalon.stop_gradient(x)` (x with no gradient at all) and
    `avalon.checkpoint(f)` (recompute f in the backward pass)."""

    def __init__(self, fun):
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.fwd = self.bwd = None

    def defvjp(self, fwd, bwd):
        """Set the forward and backward functions; returns the custom_vjp function."""
        self.fwd, self.bwd = fwd, bwd
        return self

    @property
    def name(self):
        return getattr(self.fun, "__qualname__", None) or getattr(self.fun, "__name__", "function")

    def __call__(self, *args):
        if self.fwd is None:
            raise AvalonError(f"custom_vjp {self.name} has no gradient rule{at(user_location())}: call "
                              f"{self.name}.defvjp(fwd, bwd) before using it")
        leaves, arg_tree = tree.flatten(args, is_leaf=is_tracer)
        if active_graph() is None and not any(map(is_tracer, leaves)):
            return self.fun(*args)  # eager: no gradient is being taken
        return self._traced(leaves, arg_tree, args)

    def _traced(self, leaves, arg_tree, args):
        out, residuals = self._forward(leaves, arg_tree)
        out_leaves, out_tree = tree.flatten(out, is_leaf=is_tracer)
        res_leaves, res_tree = tree.flatten(residuals, is_leaf=is_tracer)
        avals = [(tuple(y.shape), y.dtype) for y in out_leaves]
        outs = []
        for k, y in enumerate(out_leaves):
            rule = _VJPRule(self.name, self.bwd, arg_tree, len(leaves), res_tree, out_tree, avals, k)
            outs.append(bind(custom_vjp_call_p, [y, *leaves, *res_leaves], {"rule": rule}))
        return tree.unflatten(out_tree, outs)

    def _forward(self, leaves, arg_tree):
        """fwd(*args), traced on its own first: a floating-point value of an
        enclosing trace that fwd uses without taking it as an argument would
        get no gradient (bwd returns cotangents for the arguments only), so it
        is refused; then fwd's ops are inlined into the caller's trace."""
        from .api import _trace
        graph = _trace(self._checked_fwd, leaves, arg_tree, f"{self.name}_fwd")
        captures = list(graph.__dict__.get("captures", ()))
        for t in captures:
            if np.dtype(t.dtype).kind in "fc":
                made = at(t.node.loc) if t.node.loc else f" (an argument of {t.graph.name})"
                raise AvalonError(
                    f"custom_vjp {self.name}: fwd uses a traced {type_str(t.shape, t.dtype)} value that is not one of "
                    f"its arguments{made}; its gradient would be lost, since bwd gives cotangents for the "
                    "arguments only. Pass it to the function as an argument (bwd then returns its cotangent too).")
        return tree.unflatten(graph.out_tree, inline(graph, list(leaves) + captures))

    def _checked_fwd(self, *args):
        got = self.fwd(*args)
        if not isinstance(got, tuple) or len(got) != 2:
            raise AvalonError(f"custom_vjp {self.name}: fwd must return a pair (output, residuals), it returned "
                              f"{type(got).__name__}{at(user_location())}")
        return got
