"""avalon.nn.utils.clip_grad_norm_ and clip_grad_value_: torch.nn.utils'
gradient clipping, on the gradient structures avalon.grad returns.

    loss, grads = avalon.grad(loss_fn, model, x, y)
    total = avalon.nn.utils.clip_grad_norm_(grads[0], max_norm=1.0)
    opt.step(grads[0])

PyTorch clips `p.grad` of the parameters it is given; Avalon's gradients are
values, so these take the gradients themselves: any structure of arrays (what
avalon.grad returns for a model, a tuple or list of arrays, one array).  The
arrays are changed in place; None entries (no gradient) are skipped, and an
array that appears twice is clipped once.  The norm and the scaling are each
one compiled function per gradient structure (avalon.jit), with max_norm and
the clip value passed as data, so changing them never retraces.
"""
from __future__ import annotations

import math

import numpy as np

import avalon
from avalon import tree
from avalon.backends import backend_of
from avalon.errors import AvalonError, at, user_location

from .registry import export


class NonFiniteNormError(AvalonError, RuntimeError):
    """clip_grad_norm_(..., error_if_nonfinite=True) met a NaN or infinite total norm."""


@export("utils", "Optimizers")
def clip_grad_norm_(grads, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """Scale the gradients in place so that their total norm (of order
    `norm_type`, over all arrays together, as if concatenated) is at most
    `max_norm`, as torch.nn.utils.clip_grad_norm_: every array is multiplied by
    min(1, max_norm / (total_norm + 1e-6)).  Returns the total norm before
    clipping, a 0-d array.  norm_type: a positive number or inf ('inf').
    error_if_nonfinite=True raises (changing nothing) when the norm is NaN or
    infinite.  `foreach` is accepted for PyTorch's signature; it changes nothing."""
    order = _norm_order(norm_type)
    max_norm = _number("clip_grad_norm_", "max_norm", max_norm)
    arrays = _gradient_arrays(grads)
    if not arrays:
        return np.zeros((), np.float32)
    total = _TOTAL_NORM(order, arrays)
    host_total = float(backend_of(total).to_host(total))
    if error_if_nonfinite and not math.isfinite(host_total):
        raise NonFiniteNormError(
            f"clip_grad_norm_: The total norm of order {norm_type} for gradients from `grads` is non-finite, so it "
            f"cannot be clipped{at(user_location())}. To disable this error and scale the gradients by the "
            f"non-finite norm anyway, set `error_if_nonfinite=False`")
    dtype = np.dtype(total.dtype)
    # in the gradients' precision, as torch computes clip_coef from its tensors
    coef = dtype.type(max_norm) / (dtype.type(host_total) + dtype.type(1e-6))
    if not coef < 1:  # multiplying by 1 changes nothing
        return total
    _SCALE(arrays, backend_of(arrays[0]).asarray(np.asarray(coef, dtype)))
    return total


@export("utils", "Optimizers")
def clip_grad_value_(grads, clip_value, foreach=None) -> None:
    """Clamp every gradient value into [-clip_value, clip_value] in place, as
    torch.nn.utils.clip_grad_value_.  `foreach` is accepted for PyTorch's
    signature; it changes nothing."""
    clip_value = _number("clip_grad_value_", "clip_value", clip_value)
    arrays = _gradient_arrays(grads)
    if arrays:
        _CLAMP(arrays, backend_of(arrays[0]).asarray(np.asarray(clip_value, arrays[0].dtype)))


def _gradient_arrays(grads) -> list:
    """The distinct non-empty arrays of a gradient structure (None entries are not arrays)."""
    leaves, _ = tree.flatten(grads, name="grads")
    seen, arrays = set(), []
    for g in leaves:
        if id(g) not in seen and g.size:
            seen.add(id(g))
            arrays.append(g)
    kinds = {np.dtype(g.dtype).kind for g in arrays}
    if kinds - {"f"}:
        raise AvalonError(f"clip_grad: the gradients hold a {next(g.dtype for g in arrays if g.dtype.kind != 'f')} "
                          f"array{at(user_location())}; gradients are floating-point arrays: pass what "
                          f"avalon.grad returned")
    return arrays


def _norm_order(norm_type):
    if isinstance(norm_type, str) and norm_type.lower() == "inf":
        return math.inf
    x = _number("clip_grad_norm_", "norm_type", norm_type, allow_inf=True)
    if not x > 0:
        raise AvalonError(f"clip_grad_norm_: norm_type={norm_type!r}{at(user_location())}; Avalon computes norms of "
                          f"a positive order or inf ('inf')")
    return x


def _number(owner, name, value, allow_inf=False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise AvalonError(f"{owner}: {name} must be a number, not {type(value).__name__}{at(user_location())}") \
            from None
    if math.isnan(x) or (math.isinf(x) and not allow_inf):
        raise AvalonError(f"{owner}: {name}={value!r}{at(user_location())}; it must be a finite number")
    return x


def _total_norm(order, arrays):
    if order == math.inf:
        total = avalon.max(avalon.abs(arrays[0]))
        for g in arrays[1:]:
            total = avalon.maximum(total, avalon.max(avalon.abs(g)))
        return total
    if order == 2.0:
        total = avalon.sum(arrays[0] * arrays[0])
        for g in arrays[1:]:
            total = total + avalon.sum(g * g)
        return avalon.sqrt(total)
    if order == 1.0:
        total = avalon.sum(avalon.abs(arrays[0]))
        for g in arrays[1:]:
            total = total + avalon.sum(avalon.abs(g))
        return total
    total = avalon.sum(avalon.abs(arrays[0]) ** order)
    for g in arrays[1:]:
        total = total + avalon.sum(avalon.abs(g) ** order)
    return total ** (1.0 / order)


def _scale(arrays, coef):
    for g in arrays:
        avalon.assign(g, g * coef)


def _clamp(arrays, limit):
    for g in arrays:
        avalon.assign(g, avalon.minimum(avalon.maximum(g, -limit), limit))


_TOTAL_NORM = avalon.jit(_total_norm)
_SCALE = avalon.jit(_scale)
_CLAMP = avalon.jit(_clamp)
