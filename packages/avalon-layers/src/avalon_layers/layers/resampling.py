"""Resizing and padding: F.interpolate and nn.Upsample (nearest, nearest-exact, linear,
bilinear, trilinear), F.pad (constant, reflect, replicate, circular).

Both are gathers along one axis at a time with index arrays (and, for the linear modes,
weights) computed with NumPy when the function is called: the shapes are static, so the
graph sees ordinary take / multiply / add ops and their gradients scatter back.
"""
from __future__ import annotations

import math

import numpy as np

import avalon
from avalon.errors import at, user_location

from ..module import Module
from ..registry import export
from .basic import shape_error

_CNN = "CNN"
_LINEAR_MODES = {"linear": 1, "bilinear": 2, "trilinear": 3}  # mode -> spatial dims it needs
_NEAREST_MODES = ("nearest", "nearest-exact")


# -- interpolate ----------------------------------------------------------------------------------------------

def _per_dim(value, dims, what, convert):
    if isinstance(value, (list, tuple)):
        if len(value) != dims:
            raise ValueError(f"interpolate: the input has {dims} spatial dims but {what} has {len(value)} "
                             f"entries ({value!r}){at(user_location())}")
        return [convert(v) for v in value]
    return [convert(value)] * dims


def _sizes_and_scales(spatial, size, scale_factor, recompute_scale_factor):
    """(output sizes, scales given by the user or None per dim), as torch computes them."""
    dims = len(spatial)
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate: give exactly one of size or scale_factor"
                         f"{at(user_location())}")
    if size is not None:
        if recompute_scale_factor:
            raise ValueError("interpolate: recompute_scale_factor is not meaningful with an explicit size")
        return _per_dim(size, dims, "size", int), [None] * dims
    scales = _per_dim(scale_factor, dims, "scale_factor", float)
    sizes = [int(math.floor(n * s)) for n, s in zip(spatial, scales)]
    return sizes, ([None] * dims if recompute_scale_factor else scales)


def _source_scale(n_in, n_out, scale, align_corners):
    """The step in the input per output position (torch's area_pixel_compute_scale)."""
    if align_corners:
        return (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    return 1.0 / scale if scale is not None and scale > 0 else n_in / n_out


def _nearest_indices(n_in, n_out, scale, exact):
    step = np.float32(_source_scale(n_in, n_out, scale, False))  # torch computes it as a C float
    dst = np.arange(n_out, dtype=np.float32)
    src = np.floor((dst + np.float32(0.5)) * step) if exact else np.floor(dst * step)
    return np.minimum(src.astype(np.int64), n_in - 1)


def _linear_indices_and_weights(n_in, n_out, scale, align_corners, dtype):
    step = _source_scale(n_in, n_out, scale, align_corners)
    dst = np.arange(n_out, dtype=dtype)
    src = dst * dtype.type(step) if align_corners else np.maximum(
        (dst + dtype.type(0.5)) * dtype.type(step) - dtype.type(0.5), 0)
    low = np.minimum(src.astype(np.int64), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = (src - low).astype(dtype)
    return low, high, (1 - frac).astype(dtype), frac


def _along(weights, axis, nd):
    """Weights (n,) shaped to broadcast along `axis` of an nd-array."""
    return np.reshape(weights, (1,) * axis + (-1,) + (1,) * (nd - axis - 1))


def _resize_axis(x, axis, n_out, scale, mode, align_corners):
    n_in, nd = int(x.shape[axis]), len(x.shape)
    if mode in _NEAREST_MODES:
        return avalon.take(x, _nearest_indices(n_in, n_out, scale, mode == "nearest-exact"), axis)
    low, high, w_low, w_high = _linear_indices_and_weights(n_in, n_out, scale, align_corners,
                                                           np.dtype(x.dtype))
    return (avalon.take(x, low, axis) * _along(w_low, axis, nd)
            + avalon.take(x, high, axis) * _along(w_high, axis, nd))


def _check_mode(mode, shape, align_corners, antialias):
    nd = len(shape)
    if antialias:
        raise NotImplementedError("interpolate: antialias=True is not supported; resize without it"
                                  f"{at(user_location())}")
    if mode in _NEAREST_MODES:
        if align_corners is not None:
            raise ValueError("interpolate: align_corners option can only be set with the interpolating modes: "
                             f"linear | bilinear | trilinear{at(user_location())}")
        if nd not in (3, 4, 5):
            raise shape_error(f"interpolate(mode={mode!r})", "(N, C, L), (N, C, H, W) or (N, C, D, H, W)",
                              shape)
        return
    if mode not in _LINEAR_MODES:
        raise NotImplementedError(f"interpolate: mode={mode!r} is not supported; use one of "
                                  f"{list(_NEAREST_MODES) + list(_LINEAR_MODES)}{at(user_location())}")
    if nd - 2 != _LINEAR_MODES[mode]:
        raise avalon.ShapeError(f"interpolate: mode={mode!r} needs a {_LINEAR_MODES[mode] + 2}-D input "
                                f"(N, C, and {_LINEAR_MODES[mode]} spatial dims), got {nd}-D{at(user_location())}")


@export("functional", _CNN)
def interpolate(input, size=None, scale_factor=None, mode: str = "nearest", align_corners=None,
                recompute_scale_factor=None, antialias: bool = False):
    """Resize the spatial dims of input (N, C, *spatial) to `size`, or by `scale_factor`
    (output size floor(n * scale)), as torch.nn.functional.interpolate: modes "nearest",
    "nearest-exact", and "linear" / "bilinear" / "trilinear" (for 1 / 2 / 3 spatial dims,
    with align_corners)."""
    shape = tuple(input.shape)
    _check_mode(mode, shape, align_corners, antialias)
    sizes, scales = _sizes_and_scales(shape[2:], size, scale_factor, recompute_scale_factor)
    if any(s <= 0 for s in sizes):
        raise ValueError(f"interpolate: the output size {tuple(sizes)} must be positive (input {shape})"
                         f"{at(user_location())}")
    out = input
    for k, (n_out, scale) in enumerate(zip(sizes, scales)):
        out = _resize_axis(out, 2 + k, n_out, scale, mode, bool(align_corners))
    return out


@export("nn", _CNN)
class Upsample(Module):
    """interpolate as a layer: Upsample(scale_factor=2, mode="nearest"), ..."""

    def __init__(self, size=None, scale_factor=None, mode: str = "nearest", align_corners=None,
                 recompute_scale_factor=None):
        super().__init__()
        self.name = type(self).__name__
        self.size = size
        if isinstance(scale_factor, tuple):
            self.scale_factor = tuple(float(f) for f in scale_factor)
        else:
            self.scale_factor = float(scale_factor) if scale_factor else None
        self.mode, self.align_corners = mode, align_corners
        self.recompute_scale_factor = recompute_scale_factor

    def forward(self, input):
        return interpolate(input, self.size, self.scale_factor, self.mode, self.align_corners,
                           recompute_scale_factor=self.recompute_scale_factor)

    def extra_repr(self):
        info = f"scale_factor={self.scale_factor!r}" if self.scale_factor is not None else f"size={self.size!r}"
        return info + f", mode={self.mode!r}"


# -- pad ---------------------------------------------------------------------------------------------------------

_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}  # torch -> np.pad's mode


def _pad_pairs(pad, nd):
    """torch's pad tuple (last dim first: left, right, then the dim before, ...) -> {axis: (before, after)}."""
    pad = tuple(int(p) for p in pad)
    if len(pad) % 2 or len(pad) // 2 > nd:
        raise ValueError(f"pad: the padding length must be even and at most twice the number of dims ({nd}), "
                         f"got {len(pad)} ({pad}){at(user_location())}")
    return {nd - 1 - k: (pad[2 * k], pad[2 * k + 1]) for k in range(len(pad) // 2)}


def _pad_constant(input, pairs, value):
    nd = len(input.shape)
    crop = tuple(slice(max(-b, 0), int(input.shape[a]) - max(-e, 0)) if a in pairs else slice(None)
                 for a, (b, e) in ((a, pairs.get(a, (0, 0))) for a in range(nd)))
    for a, (b, e) in pairs.items():
        if int(input.shape[a]) + b + e < 0:
            raise ValueError(f"pad: padding {(b, e)} shrinks dim {a} of size {input.shape[a]} below zero"
                             f"{at(user_location())}")
    if any(b < 0 or e < 0 for b, e in pairs.values()):
        input = avalon.getitem(input, crop)
    widths = [(max(b, 0), max(e, 0)) for b, e in (pairs.get(a, (0, 0)) for a in range(nd))]
    return avalon.pad(input, widths, constant_values=value)


def _pad_by_indices(input, pairs, mode):
    out = input
    for axis, (before, after) in pairs.items():
        n = int(input.shape[axis])
        if before < 0 or after < 0:
            raise NotImplementedError(f"pad: negative padding is only supported with mode='constant', got "
                                      f"{(before, after)} with mode={mode!r}{at(user_location())}")
        limit = n - 1 if mode == "reflect" else n if mode == "circular" else None
        if limit is not None and max(before, after) > limit:
            raise ValueError(f"pad: with mode={mode!r}, padding {(before, after)} must be at most {limit} for "
                             f"dim {axis} of size {n}{at(user_location())}")
        if n == 0:
            raise ValueError(f"pad: mode={mode!r} needs a non-empty dim {axis}{at(user_location())}")
        if before or after:
            out = avalon.take(out, np.pad(np.arange(n), (before, after), mode=_PAD_MODES[mode]), axis)
    return out


@export("functional", _CNN)
def pad(input, pad, mode: str = "constant", value=None):
    """Pad input as torch.nn.functional.pad: `pad` lists (left, right) for the last dim, then
    for the dim before it, and so on.  mode "constant" (with value, default 0; negative
    padding crops), "reflect", "replicate" or "circular"."""
    nd = len(input.shape)
    pairs = _pad_pairs(pad, nd)
    if mode == "constant":
        return _pad_constant(input, pairs, 0.0 if value is None else value)
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"pad: mode={mode!r} is not supported; use 'constant', 'reflect', 'replicate' "
                                  f"or 'circular'{at(user_location())}")
    if value is not None and value != 0:
        raise ValueError(f"pad: value={value!r} is only meaningful with mode='constant' (got mode={mode!r})")
    k = len(pairs)
    if not 1 <= k <= 3 or nd not in (k + 1, k + 2):
        raise NotImplementedError(f"pad: mode={mode!r} pads the last 1, 2 or 3 dims of a (C, *) or (N, C, *) "
                                  f"input (a pad of length 2k for a (k+1)-D or (k+2)-D input); got a pad of "
                                  f"length {2 * k} for a {nd}-D input{at(user_location())}")
    return _pad_by_indices(input, pairs, mode)
