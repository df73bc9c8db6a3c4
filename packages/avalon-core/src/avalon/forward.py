"""Forward mode and the Jacobian transformations: vjp, jvp, linearize,
jacrev, jacfwd, hessian, hvp.

Forward mode is derived from the reverse mode by transposition, with no JVP
rule per primitive (the "double backward trick" of
torch.autograd.functional.jvp).  The VJP of f at x,

    u -> J(x)^T u,

is linear in the cotangent u, so its own VJP is the JVP:

    J(x) t = d/du <J(x)^T u, t>     (at any u; Avalon takes u = 0)

and both VJPs are nested `avalon.value_and_grad` calls: the inner one is
inlined into the outer one's trace, and each transformation here compiles ONE
graph per input signature (`.traces` on the compiled functions counts the
traces); dead-code elimination and CSE drop what the result does not need.
The cost is one extra backward pass: a JVP costs a forward pass and two
backward passes (the VJP, then the VJP of the VJP) instead of JAX's forward
pass with tangents.  It needs the VJP of every VJP on the path (the
primitives' VJPs are written in primitives with VJPs); a VJP that has none
(`cumprod_grad`) raises MissingRuleError naming it.

Arguments are structures of arrays as for `avalon.grad` (tuples, lists,
dicts, objects); floating-point leaves are differentiated, other leaves
(integer index arrays) are constants: their tangent is ignored (give any
array of the same structure position, e.g. zeros), their cotangent is None.
Outputs may be any structure of arrays; an integer output's tangent is None.
"""
from __future__ import annotations

import weakref
from collections import namedtuple

import numpy as np

from . import ops, tree
from .api import JitFunction, value_and_grad
from .autodiff import differentiable
from .errors import AvalonError, ShapeError, at, user_location
from .primitive import PRIMITIVES, is_tracer

__all__ = ["vjp", "jvp", "linearize", "jacrev", "jacfwd", "hessian", "hvp",
           "compiled_jvp", "compiled_vjp", "compiled_hvp"]


# -- leaves: the transformations work on flat lists of arrays ------------------------------

def _flat(obj):
    return tree.flatten(obj, is_leaf=is_tracer)


def _is_float(x) -> bool:
    return x is not None and differentiable(x.dtype)


def _dot(xs, ys):
    """sum_k <xs[k], ys[k]> over the pairs whose first entry is a float array
    (None and integer entries carry no derivative); None when there is none."""
    total = None
    for x, y in zip(xs, ys):
        if not _is_float(x) or y is None:
            continue
        s = ops.sum(ops.mul(x, y))
        total = s if total is None else ops.add(total, s)
    return total


_Type = namedtuple("_Type", "shape dtype")


def _output_types(f, in_tree, leaves, refuse_effects=None):
    """(shape, dtype) of each output leaf of f and the output structure, from a
    trace of its own: nothing is added to the enclosing trace, so an effect in
    f (a random draw, BatchNorm's in-place statistics) happens once, in the
    transformed computation.  refuse_effects: (what, why) for _refuse_effects."""
    from .api import _trace
    g = _trace(f, leaves, in_tree, _name(f))
    if refuse_effects is not None:
        _refuse_effects(g, *refuse_effects)
    return [_Type(tuple(n.shape), np.dtype(n.dtype)) for n in g.outputs], g.out_tree


def _refuse_effects(graph, what, why):
    """A random draw or an in-place write in f, where the transformation runs f
    more than once (`why`), would give results that do not belong together."""
    for n in graph.nodes:
        prim = PRIMITIVES.get(n.op)
        if prim is not None and (prim.draws_random or prim.writes_input):
            effect = "draws random numbers" if prim.draws_random else f"writes into an array ({n.op})"
            raise AvalonError(f"{what}: {graph.name} {effect}{at(n.loc)}; {why}, so each run would draw (or "
                              "write) again and the results would not belong together. Pass the random numbers "
                              "in as an argument, or use avalon.jvp / avalon.hvp, which run f once.")


_pure_signatures: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _check_pure(f, primals, what, why):
    """_refuse_effects for f at these primals, traced once per signature."""
    leaves, in_tree = tree.flatten(primals)
    key = (in_tree, tuple((tuple(x.shape), np.dtype(x.dtype)) for x in leaves))
    try:
        seen = _pure_signatures.setdefault(f, set())
    except TypeError:
        seen = set()
    if key in seen:
        return
    from .api import _trace
    _refuse_effects(_trace(f, leaves, in_tree, _name(f)), what, why)
    seen.add(key)


def _zero_scalar(like):
    return ops.sum(ops.mul(like, ops.zeros_like(like)))


def _contraction(f, in_tree):
    """contract(leaves, u) = (<f(leaves)'s float outputs, u>, f's outputs): the
    function whose gradient in `leaves` is the VJP of f with cotangent u."""
    def contract(leaves, u):
        outs, out_tree = _flat(f(*tree.unflatten(in_tree, leaves)))
        floats = [o for o in outs if _is_float(o)]
        s = _dot(floats, u)
        if s is None:  # f has no floating-point output: nothing flows back
            s = _zero_scalar(leaves[_first_float(leaves)])
        return s, (outs, out_tree)
    contract.__qualname__ = f"vjp_of_{_name(f)}"
    return contract


def _first_float(leaves) -> int:
    for k, x in enumerate(leaves):
        if _is_float(x):
            return k
    raise AvalonError(f"forward mode: no floating-point array among the primals{at(user_location())}; "
                      "derivatives are taken with respect to float arrays (pass np.asarray(x, dtype=np.float32))")


def _name(f) -> str:
    return getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or type(f).__name__


def _vjp_leaves(f, in_tree, leaves, u):
    """(output leaves, out_tree, input cotangent leaves: None for non-float)."""
    (_, (outs, out_tree)), (grads, _) = value_and_grad(_contraction(f, in_tree), argnums=0,
                                                       has_aux=True)(leaves, u)
    return outs, out_tree, list(grads)


def _jvp_leaves(f, in_tree, leaves, tangents):
    """(output leaves, out_tree, output tangent leaves) by the double VJP:
    J t = d/du <J^T u, t> at u = 0."""
    like = leaves[_first_float(leaves)]
    probe, out_tree = _output_types(f, in_tree, leaves)
    u0 = [ops.zeros(o.shape, dtype=o.dtype, like=like) for o in probe if _is_float(o)]
    if not u0:  # no floating-point output: no tangent
        outs, out_tree = _flat(f(*tree.unflatten(in_tree, leaves)))
        return outs, out_tree, [None] * len(outs)
    contract = _contraction(f, in_tree)

    def transposed(u, leaves, tangents):
        (_, (outs, _)), (grads, _) = value_and_grad(contract, argnums=0, has_aux=True)(leaves, u)
        s = _dot(list(grads), tangents)
        if s is None:
            s = _zero_scalar(u[0])
        return s, outs
    transposed.__qualname__ = f"jvp_of_{_name(f)}"

    (_, outs), (du, _, _) = value_and_grad(transposed, argnums=0, has_aux=True)(u0, leaves, tangents)
    du = iter(du)
    return outs, out_tree, [next(du) if _is_float(o) else None for o in outs]


def _check_tangents(leaves, tangents, what):
    if len(tangents) != len(leaves):
        raise ShapeError(f"{what}: {len(tangents)} tangent arrays for {len(leaves)} primal arrays"
                         f"{at(user_location())}; give tangents with the primals' structure")
    for k, (x, t) in enumerate(zip(leaves, tangents)):
        if _is_float(x) and (tuple(t.shape) != tuple(x.shape) or np.dtype(t.dtype) != np.dtype(x.dtype)):
            raise ShapeError(f"{what}: tangent {k} is {np.dtype(t.dtype).name}{list(t.shape)}, its primal is "
                             f"{np.dtype(x.dtype).name}{list(x.shape)}{at(user_location())}; a tangent has "
                             "its primal's shape and dtype")


# -- compiled functions, one per f (cached as avalon.value_and_grad caches) ------------------

_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_cache_strong: dict = {}


def _cached(kind, f, key, make):
    try:
        table = _cache.setdefault(f, {})
    except TypeError:
        table = _cache_strong.setdefault(f, {})
    fn = table.get((kind, key))
    if fn is None:
        fn = table[(kind, key)] = make()
    return fn


def _as_tuple(primals, what):
    if not isinstance(primals, (tuple, list)):
        raise AvalonError(f"{what}: primals and tangents are tuples (one entry per argument of f), got "
                          f"{type(primals).__name__}{at(user_location())}")
    return tuple(primals)


def compiled_jvp(f) -> JitFunction:
    """The compiled (primals, tangents) -> (f(*primals), J t) behind avalon.jvp
    (one per f; `.traces` counts its traces)."""
    def jvp_step(primals, tangents):
        leaves, in_tree = _flat(primals)
        t_leaves, _ = _flat(tangents)
        _check_tangents(leaves, t_leaves, "jvp")
        outs, out_tree, touts = _jvp_leaves(f, in_tree, leaves, t_leaves)
        return tree.unflatten(out_tree, outs), tree.unflatten(out_tree, touts, static=None)
    jvp_step.__qualname__ = f"jvp_{_name(f)}"
    return _cached("jvp", f, None, lambda: JitFunction(jvp_step))


def compiled_vjp(f) -> JitFunction:
    """The compiled (primals, cotangents) -> input cotangents behind avalon.vjp."""
    def vjp_step(primals, cotangents):
        leaves, in_tree = _flat(primals)
        cts, _ = _flat(cotangents)
        probe, _ = _output_types(f, in_tree, leaves)
        u = [c for c, o in zip(cts, probe) if _is_float(o)]
        _, _, grads = _vjp_leaves(f, in_tree, leaves, u)
        return tree.unflatten(in_tree, grads, static=None)
    vjp_step.__qualname__ = f"vjp_{_name(f)}"
    return _cached("vjp", f, None, lambda: JitFunction(vjp_step))


def vjp(f, *primals):
    """out, vjp_fn = avalon.vjp(f, *primals), as jax.vjp / torch.func.vjp.

    vjp_fn(cotangents) (cotangents with out's structure) returns a tuple of
    cotangents, one per primal, each with its structure (None for non-float
    leaves).  vjp_fn is compiled once per signature (it recomputes the forward
    pass it needs: no residuals are kept between the calls, so f may not draw
    random numbers or write in place: refused with an error)."""
    _check_pure(f, primals, "vjp", "vjp_fn runs f again to compute the cotangents")
    out = _cached("value", f, None, lambda: JitFunction(f))(*primals)
    step = compiled_vjp(f)

    def vjp_fn(cotangents):
        return tuple(step(primals, cotangents))
    vjp_fn.compiled = step
    return out, vjp_fn


def jvp(f, primals, tangents):
    """(f(*primals), J t) = avalon.jvp(f, primals, tangents), as jax.jvp:
    primals and tangents are tuples with one entry per argument of f (each a
    structure of arrays, the tangent with its primal's structure, shapes and
    dtypes).  Computed by transposing the VJP (the module docstring), compiled
    once per signature (compiled_jvp(f))."""
    primals, tangents = _as_tuple(primals, "jvp"), _as_tuple(tangents, "jvp")
    return compiled_jvp(f)(primals, tangents)


def linearize(f, *primals):
    """out, f_jvp = avalon.linearize(f, *primals), as jax.linearize:
    f_jvp(*tangents) = J t at the primals.  f_jvp is compiled once and reused
    for every tangent; each call recomputes the forward values the JVP needs
    (three passes: forward, VJP, VJP of the VJP) rather than storing them, so
    f may not draw random numbers or write in place (refused with an error)."""
    _check_pure(f, primals, "linearize", "f_jvp runs f again on each call")
    out = _cached("value", f, None, lambda: JitFunction(f))(*primals)
    step = _cached("linearized", f, None, lambda: JitFunction(lambda p, t: compiled_jvp(f)(p, t)[1]))

    def f_jvp(*tangents):
        return step(primals, tangents)
    f_jvp.compiled = step
    return out, f_jvp


# -- Jacobians --------------------------------------------------------------------------------

def _argnums(argnums):
    return (argnums,) if isinstance(argnums, int) else tuple(argnums)


def _split_args(args, argnums):
    """(the differentiated arguments, the others with None in their places):
    two separate lists, so no array is reached twice (an alias is one leaf)."""
    return [args[k] for k in argnums], [None if k in argnums else a for k, a in enumerate(args)]


def _substituting(f, argnums):
    """g(xs, rest) = f(*rest with rest[argnums[k]] replaced by xs[k])."""
    def g(*leaves_and_args):
        xs, args = leaves_and_args[0], leaves_and_args[1]
        args = list(args)
        for k, x in zip(argnums, xs):
            args[k] = x
        return f(*args)
    g.__qualname__ = _name(f)
    return g


def _check_jac_args(args, argnums, what):
    for k in argnums:
        if not -len(args) <= k < len(args):
            raise AvalonError(f"{what}: argnums {k} is out of range for {len(args)} arguments"
                              f"{at(user_location())}")
        x = args[k]
        if not (tree.is_array(x) or is_tracer(x)) or not differentiable(x.dtype):
            raise AvalonError(f"{what}: argument {k} must be a floating-point array, got "
                              f"{type(x).__name__}{at(user_location())}")


def _basis(shape, dtype):
    """The unit arrays of a shape, in row-major order."""
    n = int(np.prod(shape, dtype=np.int64))
    eye = np.eye(n, dtype=dtype)
    return [eye[i].reshape(shape) for i in range(n)]


def _stacked(parts, lead_shape, tail_shape, dtype):
    """parts (one array per element of lead_shape) stacked into lead + tail."""
    if not parts:
        return ops.zeros(tuple(lead_shape) + tuple(tail_shape), dtype=dtype)
    return ops.reshape(ops.stack(parts, 0), tuple(lead_shape) + tuple(tail_shape))


def _result(per_output, argnums, out_tree):
    """Per output leaf a list over argnums -> out's structure of Jacobians
    (a tuple of them per leaf when argnums is a tuple)."""
    return _rebuild(out_tree, [js[0] if isinstance(argnums, int) else tuple(js) for js in per_output])


def _rebuild(out_tree, leaves):
    """out's structure with each leaf replaced (by a Jacobian, or a tuple of them)."""
    return tree.unflatten(out_tree, leaves)


def jacrev(f, argnums=0) -> JitFunction:
    """The Jacobian of f with respect to args[argnums] by reverse mode (one VJP
    per output element, in one compiled graph), as jax.jacrev: for an output
    of shape S and an argument of shape T, an array of shape S + T; argnums a
    tuple gives a tuple (one per argument); a structure of outputs gives that
    structure of Jacobians."""
    argnums_ = _argnums(argnums)

    def jacrev_step(*args):
        _check_jac_args(args, argnums_, "jacrev")
        nums = tuple(k % len(args) for k in argnums_)
        g = _substituting(f, nums)
        xs, rest = _split_args(args, nums)
        leaves, in_tree = _flat((xs, rest))
        contract = _contraction(g, in_tree)
        outs, out_tree = _output_types(g, in_tree, leaves, ("jacrev", "jacrev runs f once per output element"))
        per_output = []
        for j, o in enumerate(outs):
            if not _is_float(o):
                per_output.append([None] * len(nums))
                continue
            rows = []
            for e in _basis(tuple(o.shape), o.dtype):
                u = [e if i == j else np.zeros(p.shape, p.dtype) for i, p in enumerate(outs) if _is_float(p)]
                (_, _), (grads, _) = value_and_grad(contract, argnums=0, has_aux=True)(leaves, u)
                rows.append(grads[:len(nums)])
            per_output.append([_stacked([r[k] for r in rows], o.shape, xs[k].shape, o.dtype)
                               for k in range(len(nums))])
        return _result(per_output, argnums, out_tree)
    jacrev_step.__qualname__ = f"jacrev_{_name(f)}"
    return _cached("jacrev", f, argnums_ if not isinstance(argnums, int) else argnums,
                   lambda: JitFunction(jacrev_step))


def jacfwd(f, argnums=0) -> JitFunction:
    """The Jacobian of f with respect to args[argnums] by forward mode (one JVP
    per input element, in one compiled graph), as jax.jacfwd; same layout as
    jacrev."""
    argnums_ = _argnums(argnums)

    def jacfwd_step(*args):
        _check_jac_args(args, argnums_, "jacfwd")
        nums = tuple(k % len(args) for k in argnums_)
        g = _substituting(f, nums)
        xs, rest = _split_args(args, nums)
        leaves, in_tree = _flat((xs, rest))
        outs, out_tree = _output_types(g, in_tree, leaves, ("jacfwd", "jacfwd runs f once per input element"))
        cols = [[] for _ in nums]   # cols[k][i]: tangent outputs for basis vector i of xs[k]
        for k, x in enumerate(xs):
            for e in _basis(tuple(x.shape), x.dtype):
                t = [np.zeros(l.shape, l.dtype) for l in leaves]
                t[k] = e
                _, _, touts = _jvp_leaves(g, in_tree, leaves, t)
                cols[k].append(touts)
        per_output = []
        for j, o in enumerate(outs):
            if not _is_float(o):
                per_output.append([None] * len(nums))
                continue
            per_output.append([_columns([c[j] for c in cols[k]], o.shape, xs[k].shape, o.dtype)
                               for k in range(len(nums))])
        return _result(per_output, argnums, out_tree)
    jacfwd_step.__qualname__ = f"jacfwd_{_name(f)}"
    return _cached("jacfwd", f, argnums_ if not isinstance(argnums, int) else argnums,
                   lambda: JitFunction(jacfwd_step))


def _columns(parts, out_shape, in_shape, dtype):
    """J t_i for each input unit vector t_i, laid out as out_shape + in_shape."""
    if not parts:
        return ops.zeros(tuple(out_shape) + tuple(in_shape), dtype=dtype)
    stacked = ops.stack(parts, len(out_shape))   # out_shape + (n_in,)
    return ops.reshape(stacked, tuple(out_shape) + tuple(in_shape))


def hessian(f, argnums=0) -> JitFunction:
    """The Hessian of scalar f with respect to args[argnums]: jacfwd(jacrev(f)),
    as jax.hessian (forward over reverse), one compiled graph; for an argument
    of shape T an array of shape T + T."""
    return _cached("hessian", f, argnums if isinstance(argnums, int) else tuple(argnums),
                   lambda: jacfwd(jacrev(f, argnums), argnums))


def compiled_hvp(f) -> JitFunction:
    """The compiled (primals, tangents) -> (grad f, H v) behind avalon.hvp."""
    def hvp_step(primals, tangents):
        leaves, in_tree = _flat(primals)
        t_leaves, _ = _flat(tangents)
        _check_tangents(leaves, t_leaves, "hvp")

        def directional(leaves, t_leaves):
            value, grads = value_and_grad(lambda ls: f(*tree.unflatten(in_tree, ls)), argnums=0)(leaves)
            grads = list(grads[0])
            s = _dot(grads, t_leaves)
            return (s if s is not None else _zero_scalar(leaves[_first_float(leaves)])), grads
        directional.__qualname__ = f"hvp_of_{_name(f)}"
        (_, grads), (hv, _) = value_and_grad(directional, argnums=0, has_aux=True)(leaves, t_leaves)
        return (tree.unflatten(in_tree, grads, static=None), tree.unflatten(in_tree, list(hv), static=None))
    hvp_step.__qualname__ = f"hvp_{_name(f)}"
    return _cached("hvp", f, None, lambda: JitFunction(hvp_step))


def hvp(f, primals, tangents):
    """(grad f, H v) = avalon.hvp(f, primals, tangents) for scalar f: the
    gradient at the primals and the Hessian-vector product with the tangents
    (each a tuple with one entry per argument, structured as the primals), as
    jax.jvp(jax.grad(f), primals, tangents) gives, without building the
    Hessian: reverse over reverse, grad_x <grad f(x), v> (two backward passes),
    one compiled graph per signature (compiled_hvp(f))."""
    primals, tangents = _as_tuple(primals, "hvp"), _as_tuple(tangents, "hvp")
    return compiled_hvp(f)(primals, tangents)
