"""Random primitives and dropout.  They are effectful: each call of a compiled
function draws fresh numbers from its backend's generator, and the draws repeat
after avalon.manual_seed(seed).

Under avalon.vmap each example gets numbers of its own: a draw of shape S in a
function mapped over n examples is one draw of shape (n,) + S, example k its
k-th slice, so the batch holds the numbers that drawing the examples one after
another, in order, would give (dropout masks differ between the examples, as
in a batched layer).  The rule is called with no operands; the batch size is
the vmap's in progress (avalon.ops._batching.current_batch_size), or an
`axis_size` keyword (AXIS_SIZE) where a caller gives it."""
from __future__ import annotations

import numpy as np

from ..primitive import Tracer, bind, bind_on, defprim
from ._rules import checked_shape
from ._sharding import created


def _random_rule(*, shape, dtype, full_shape=None, shard_axis=None):
    # full_shape/shard_axis: a shard of a split step draws the whole array and
    # keeps its slice, so its numbers equal the unsplit step's (_draw_slice)
    return tuple(shape), np.dtype(dtype)


def _draw_slice(node, full_shape, axis):
    """In a shard graph: draw the whole array, keep this thread's slice along `axis`."""
    return dict(node.attrs, full_shape=full_shape, shard_axis=axis)


def _batched_attrs(args, dims, *, shape, dtype, axis_size=None, full_shape=None, shard_axis=None):
    """The attributes of the batched draw: one draw with the examples' axis in
    front (see the module doc)."""
    if axis_size is None:
        from ._batching import current_batch_size
        axis_size = current_batch_size()
    attrs = {"shape": (int(axis_size),) + tuple(shape), "dtype": np.dtype(dtype)}
    if full_shape is not None:  # a shard's slice of a whole draw: the whole draw is batched too
        attrs.update(full_shape=(int(axis_size),) + tuple(full_shape), shard_axis=shard_axis + 1)
    return attrs


def _batching(name):
    def rule(args, dims, **attrs):
        from ..primitive import PRIMITIVES
        return _draw(PRIMITIVES[name], _batched_attrs(args, dims, **attrs), [], None), 0
    return rule


# Kernels come from Backend.k_random_uniform / k_random_normal (they own the generator).
random_uniform_p = defprim("random_uniform", shape=_random_rule, impl=None, effectful=True, draws_random=True,
                           nondiff=True, output_shape_attr="shape", sharding=created, shard_attrs=_draw_slice,
                           batching=_batching("random_uniform"))
random_normal_p = defprim("random_normal", shape=_random_rule, impl=None, effectful=True, draws_random=True,
                          nondiff=True, output_shape_attr="shape", sharding=created, shard_attrs=_draw_slice,
                          batching=_batching("random_normal"))


def _current_trace(like):
    for x in like:
        if isinstance(x, Tracer):
            return x.graph
    from ..primitive import active_graph
    return active_graph()


def _random(prim, shape, dtype, like, device):
    attrs = {"shape": checked_shape(prim.name, shape), "dtype": np.dtype(dtype)}
    return _draw(prim, attrs, like, device)


def _draw(prim, attrs, like, device):
    """A node drawing with `attrs` in the current trace, or the numbers themselves."""
    from ..backends import backend_of, get_backend, device as to_dev
    graph = _current_trace(like)
    if graph is not None:
        from ..primitive import current_location
        node = graph.add_node(prim.name, (), attrs, attrs["shape"], attrs["dtype"], current_location())
        return Tracer(graph, node)
    if like:
        backend = backend_of(like[0])
    else:
        backend = get_backend(to_dev(device or "cpu"))
    return bind_on(backend, prim, attrs)


def random_uniform(shape, dtype=np.float32, *, like=None, device=None):
    """Uniform numbers in [0, 1).  Inside a traced function pass `like=x` (any
    traced array) so the draw becomes part of the trace."""
    return _random(random_uniform_p, shape, dtype, [like] if like is not None else [], device)


def random_normal(shape, dtype=np.float32, *, like=None, device=None):
    """Standard normal numbers; see random_uniform for `like`."""
    return _random(random_normal_p, shape, dtype, [like] if like is not None else [], device)


def dropout(x, p=0.5, training=True):
    """Zero each element with probability p and scale the rest by 1/(1-p)."""
    from .elementwise import ge, mul, where
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return mul(x, 0.0)
    keep = ge(random_uniform(x.shape, x.dtype, like=x), p)
    return where(keep, mul(x, 1.0 / (1.0 - p)), 0.0)
