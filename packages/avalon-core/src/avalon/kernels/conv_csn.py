"""Convolution and max pooling with the batch innermost: layout (C, *spatial, N).

The layout pass (avalon.passes.layout) stores the activations of convolutional
stacks this way.  With the batch as the contiguous axis, im2col and col2im are
one strided copy (or add) per kernel offset, each moving runs of N contiguous
values, and a convolution is ONE matrix product (O, C*K) @ (C*K, out*N) whose
result is already in the same layout.  Pooling reduces over strided slices in
the same way.  Groups are not supported here (the pass leaves grouped
convolutions in PyTorch's layout).

A column matrix bigger than COLUMN_BUDGET_BYTES is not built whole: the
conv_csn_tiled_* kernels walk ranges of output rows (the first spatial axis),
building each range's columns in a small buffer that stays in cache and
feeding them to that range's matrix product (column_tile_rows is the rule, on
sizes only); the ranges may be shared among threads.
"""
from __future__ import annotations

import itertools
import math

from .conv import _lowest, _select, conv_output_shape, max_pool_backward

__all__ = ["im2col_csn", "col2im_csn", "conv_csn_forward", "conv_csn_input_grad", "conv_csn_weight_grad",
           "max_pool_csn_forward", "max_pool_csn_backward", "COLUMN_BUDGET_BYTES", "column_tile_rows",
           "conv_csn_tiled_forward", "conv_csn_tiled_input_grad", "conv_csn_tiled_weight_grad"]


def _offsets(kernel):
    return itertools.product(*(range(k) for k in kernel))


def _window(offset, out, stride, dilation):
    """Slices selecting, for kernel offset `offset`, the input element under
    every output position (over the padded spatial axes)."""
    return tuple(slice(o * d, o * d + s * (n - 1) + 1, s) for o, n, s, d in zip(offset, out, stride, dilation))


def _padded(xp, x, padding, value=0.0, scratch=None):
    """x with its spatial axes padded (a new array; x itself when no padding)."""
    if not any(p for pair in padding for p in pair):
        return x
    shape = (x.shape[0],) + tuple(n + lo + hi for n, (lo, hi) in zip(x.shape[1:-1], padding)) + (x.shape[-1],)
    buf = _empty(xp, scratch, "padded", shape, x.dtype)
    buf.fill(value)
    buf[(slice(None),) + tuple(slice(lo, lo + n) for n, (lo, _) in zip(x.shape[1:-1], padding))] = x
    return buf


def _pairs(padding):
    return tuple(p if isinstance(p, tuple) else (p, p) for p in padding)


def _empty(xp, scratch, tag, shape, dtype):
    """A work array: from the caller's scratch pool (reused call after call,
    so no fresh pages are touched), else newly allocated."""
    return scratch(tag, shape, dtype) if scratch is not None else xp.empty(shape, dtype=dtype)


def _columns(xp, x, kernel, stride, padding, dilation, out_spatial, scratch=None):
    """(C, *K, *out, N) columns of x (C, *S, N)."""
    xpad = _padded(xp, x, padding, scratch=scratch)
    c, n = x.shape[0], x.shape[-1]
    cols = _empty(xp, scratch, "cols", (c,) + tuple(kernel) + tuple(out_spatial) + (n,), x.dtype)
    full = (slice(None),)
    for offset in _offsets(kernel):
        cols[full + offset] = xpad[full + _window(offset, out_spatial, stride, dilation)]
    return cols


def im2col_csn(xp, x, *, kernel, stride, padding, dilation, out=None, scratch=None):
    """Columns of x (C, *S, N) as a matrix (C * prod(kernel), prod(out) * N)."""
    padding = _pairs(padding)
    spatial = tuple(x.shape[1:-1])
    out_spatial = conv_output_shape(tuple(s + lo + hi - 2 * lo for s, (lo, hi) in zip(spatial, padding)),
                                    kernel, stride, tuple(lo for lo, _ in padding), dilation)
    c, n = x.shape[0], x.shape[-1]
    shape = (c,) + tuple(kernel) + tuple(out_spatial) + (n,)
    cols = out.reshape(shape) if out is not None else None
    if cols is None:
        cols = _empty(xp, None, "cols", shape, x.dtype)
    xpad = _padded(xp, x, padding, scratch=scratch)
    full = (slice(None),)
    for offset in _offsets(kernel):
        cols[full + offset] = xpad[full + _window(offset, out_spatial, stride, dilation)]
    return cols.reshape(c * math.prod(kernel), -1)


def col2im_csn(xp, cols, *, input_shape, kernel, stride, padding, dilation, out=None, scratch=None):
    """The adjoint of im2col_csn: columns (C * prod(kernel), prod(out) * N) summed
    back into an array of input_shape (C, *S, N)."""
    padding = _pairs(padding)
    c, n = input_shape[0], input_shape[-1]
    spatial = tuple(input_shape[1:-1])
    out_spatial = conv_output_shape(tuple(s + lo + hi - 2 * lo for s, (lo, hi) in zip(spatial, padding)),
                                    kernel, stride, tuple(lo for lo, _ in padding), dilation)
    cols = cols.reshape((c,) + tuple(kernel) + tuple(out_spatial) + (n,))
    padded = (c,) + tuple(s + lo + hi for s, (lo, hi) in zip(spatial, padding)) + (n,)
    has_pad = any(p for pair in padding for p in pair)
    if not has_pad:
        buf = out if out is not None else xp.empty(tuple(input_shape), dtype=cols.dtype)
    else:
        buf = _empty(xp, scratch, "padded", padded, cols.dtype)
    buf.fill(0)
    full = (slice(None),)
    for offset in _offsets(kernel):
        buf[full + _window(offset, out_spatial, stride, dilation)] += cols[full + offset]
    if not has_pad:
        return buf
    crop = full + tuple(slice(lo, lo + s) for s, (lo, _) in zip(spatial, padding))
    if out is None:
        return xp.ascontiguousarray(buf[crop])
    out[...] = buf[crop]
    return out


def conv_csn_forward(xp, x, w, *, stride, padding, dilation, out=None, scratch=None):
    """x (C, *S, N), w (O, C, *K) -> (O, *out, N)."""
    kernel = tuple(w.shape[2:])
    padding = _pairs(padding)
    spatial = tuple(x.shape[1:-1])
    out_spatial = conv_output_shape(tuple(s + lo + hi - 2 * lo for s, (lo, hi) in zip(spatial, padding)),
                                    kernel, stride, tuple(lo for lo, _ in padding), dilation)
    cols = _columns(xp, x, kernel, stride, padding, dilation, out_spatial, scratch)
    o = w.shape[0]
    shape = (o,) + tuple(out_spatial) + (x.shape[-1],)
    if out is None:
        out = xp.empty(shape, dtype=x.dtype)
    xp.matmul(w.reshape(o, -1), cols.reshape(cols.shape[0] * math.prod(kernel), -1), out=out.reshape(o, -1))
    return out


def conv_csn_input_grad(xp, g, w, *, input_shape, stride, padding, dilation, out=None, scratch=None):
    """g (O, *out, N), w (O, C, *K) -> dx of shape input_shape = (C, *S, N)."""
    kernel = tuple(w.shape[2:])
    padding = _pairs(padding)
    o, c = w.shape[:2]
    out_spatial = tuple(g.shape[1:-1])
    cols = _empty(xp, scratch, "cols", (c * math.prod(kernel), g.size // o), g.dtype)
    xp.matmul(w.reshape(o, -1).T, g.reshape(o, -1), out=cols)       # (C*K, out*N)
    cols = cols.reshape((c,) + kernel + out_spatial + (g.shape[-1],))
    spatial = tuple(input_shape[1:-1])
    padded = (c,) + tuple(s + lo + hi for s, (lo, hi) in zip(spatial, padding)) + (input_shape[-1],)
    has_pad = any(p for pair in padding for p in pair)
    buf = out if (out is not None and not has_pad) else _empty(xp, scratch, "padded", padded, g.dtype)
    buf.fill(0)
    full = (slice(None),)
    for offset in _offsets(kernel):
        buf[full + _window(offset, out_spatial, stride, dilation)] += cols[full + offset]
    if buf is out:
        return out
    crop = full + tuple(slice(lo, lo + s) for s, (lo, _) in zip(spatial, padding))
    if out is None:
        return xp.ascontiguousarray(buf[crop]) if has_pad else buf.copy()
    out[...] = buf[crop]
    return out


def conv_csn_weight_grad(xp, x, g, *, weight_shape, stride, padding, dilation, out=None, scratch=None):
    """x (C, *S, N), g (O, *out, N) -> dw of shape weight_shape = (O, C, *K)."""
    kernel = tuple(weight_shape[2:])
    padding = _pairs(padding)
    cols = _columns(xp, x, kernel, stride, padding, dilation, tuple(g.shape[1:-1]), scratch)
    o = weight_shape[0]
    if out is None:
        out = xp.empty(weight_shape, dtype=g.dtype)
    xp.matmul(g.reshape(o, -1), cols.reshape(-1, g.size // o).T, out=out.reshape(o, -1))
    return out


# -- convolutions over tiles of output rows ---------------------------------------------------------------------

#: Column matrices up to this size are built whole (one im2col, one matrix
#: product); bigger ones a few output rows at a time, each tile at most half
#: of this.  Measured on a 2-core Xeon with 2 MiB of L2 per core and a large
#: L3: a budget of 2 MiB made a ResNet step (columns of 7-29 MB) no faster
#: (its products are compute-bound once the columns sit in L3) and a small CNN
#: step 40% slower (the whole-matrix path has C im2col kernels and shares the
#: columns between the forward product and the weight gradient).  So tiles are
#: kept for column matrices too big to be worth holding in memory at all.
COLUMN_BUDGET_BYTES = 64 << 20


def column_tile_rows(cols_shape, out_spatial, itemsize, budget=None):
    """The rule: None when the (C*K, out*N) column matrix of a convolution
    fits `budget` bytes (COLUMN_BUDGET_BYTES by default) (built whole); else how many output rows (first
    spatial axis) each tile covers so that its columns take at most half the
    budget (at least one row)."""
    budget = COLUMN_BUDGET_BYTES if budget is None else budget
    rows, cols = int(cols_shape[0]), int(cols_shape[1])
    if rows * cols * itemsize <= budget:
        return None
    row_bytes = rows * (cols // int(out_spatial[0])) * itemsize
    return max(1, min(int(out_spatial[0]), (budget // 2) // row_bytes))


def _geometry(x_spatial, kernel, stride, padding, dilation):
    """(padding pairs, output spatial shape) of a convolution."""
    padding = _pairs(padding)
    out_spatial = conv_output_shape(tuple(s + lo + hi - 2 * lo for s, (lo, hi) in zip(x_spatial, padding)),
                                    kernel, stride, tuple(lo for lo, _ in padding), dilation)
    return padding, tuple(out_spatial)


def _row_tiles(out_spatial, tile_rows):
    """(first output row, row count) of each tile."""
    return [(r0, min(tile_rows, out_spatial[0] - r0)) for r0 in range(0, out_spatial[0], tile_rows)]


def _shares(tiles, run):
    """The tiles in contiguous shares, one per thread of `run` (see _run_shares)."""
    k = max(1, min(len(tiles), getattr(run, "threads", 1) if run is not None else 1))
    step, extra = divmod(len(tiles), k)
    out, at = [], 0
    for i in range(k):
        size = step + (i < extra)
        out.append(tiles[at:at + size])
        at += size
    return out


def _run_shares(run, jobs):
    """Results of the zero-argument jobs: in the threads of `run` (a callable
    taking the list of jobs, with a `threads` count; NumPy's copies and the
    BLAS products release the GIL), or one after the other without it."""
    if run is None or len(jobs) == 1:
        return [job() for job in jobs]
    return run(jobs)


def _tile_window(offset, r0, rows, out_spatial, stride, dilation, base=0):
    """_window for output rows [r0, r0 + rows) only, its first axis counted
    from padded row `base`."""
    first = _window(offset, (rows,) + tuple(out_spatial[1:]), stride, dilation)
    s0 = first[0]
    shift = r0 * stride[0] - base
    return (slice(s0.start + shift, s0.stop + shift, s0.step),) + first[1:]


def _input_rows(tiles, kernel, stride, dilation):
    """[first, stop) of the padded input rows that a share of tiles reads."""
    (r0, _), (r1, rows) = tiles[0], tiles[-1]
    return r0 * stride[0], (r1 + rows - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1


class _TileColumns:
    """One reusable buffer for the columns of a tile of output rows,
    (C, *K, rows, *out[1:], N) contiguous for any row count."""

    def __init__(self, xp, c, kernel, out_spatial, n, tile_rows, dtype):
        self.head, self.tail = (c,) + tuple(kernel), tuple(out_spatial[1:]) + (n,)
        self.flat = xp.empty(math.prod(self.head) * tile_rows * math.prod(self.tail), dtype=dtype)

    def view(self, rows):
        shape = self.head + (rows,) + self.tail
        return self.flat[:math.prod(shape)].reshape(shape)


def _fill_tile(cols, xpad, r0, rows, kernel, out_spatial, stride, dilation):
    full = (slice(None),)
    for offset in _offsets(kernel):
        cols[full + offset] = xpad[full + _tile_window(offset, r0, rows, out_spatial, stride, dilation)]
    return cols.reshape(math.prod(cols.shape[:1 + len(kernel)]), -1)


def _row_columns(m, r0, rows, row_len):
    """Columns [r0 * row_len, (r0 + rows) * row_len) of a matrix: a strided view
    the matrix product reads (and writes) in place."""
    return m[:, r0 * row_len:(r0 + rows) * row_len]


def conv_csn_tiled_forward(xp, x, w, *, stride, padding, dilation, tile_rows, out=None, run=None):
    """conv_csn_forward, the columns built `tile_rows` output rows at a time
    (the tiles shared among the threads of `run`, if given)."""
    kernel = tuple(w.shape[2:])
    padding, out_spatial = _geometry(tuple(x.shape[1:-1]), kernel, stride, padding, dilation)
    o, n = w.shape[0], x.shape[-1]
    if out is None:
        out = xp.empty((o,) + out_spatial + (n,), dtype=x.dtype)
    xpad = _padded(xp, x, padding)
    wm, om, row_len = w.reshape(o, -1), out.reshape(o, -1), math.prod(out_spatial[1:]) * n

    def share(tiles):
        tile = _TileColumns(xp, x.shape[0], kernel, out_spatial, n, tile_rows, x.dtype)
        for r0, rows in tiles:
            cols = _fill_tile(tile.view(rows), xpad, r0, rows, kernel, out_spatial, stride, dilation)
            xp.matmul(wm, cols, out=_row_columns(om, r0, rows, row_len))
    _run_shares(run, [lambda t=t: share(t) for t in _shares(_row_tiles(out_spatial, tile_rows), run)])
    return out


def conv_csn_tiled_input_grad(xp, g, w, *, input_shape, stride, padding, dilation, tile_rows, out=None,
                              run=None):
    """conv_csn_input_grad, each tile's columns summed into the input gradient
    as soon as its product makes them (equal up to the order of the sums).
    With threads, each share after the first sums into a slab of its own (the
    input rows it reads), added in afterwards in order."""
    kernel = tuple(w.shape[2:])
    padding, out_spatial = _geometry(tuple(input_shape[1:-1]), kernel, stride, padding, dilation)
    o, c, n = w.shape[0], w.shape[1], input_shape[-1]
    spatial = tuple(input_shape[1:-1])
    padded = (c,) + tuple(s + lo + hi for s, (lo, hi) in zip(spatial, padding)) + (n,)
    has_pad = any(p for pair in padding for p in pair)
    buf = out if (out is not None and not has_pad) else xp.empty(padded, dtype=g.dtype)
    buf.fill(0)
    wt, gm, row_len = w.reshape(o, -1).T, g.reshape(o, -1), math.prod(out_spatial[1:]) * n
    full = (slice(None),)

    def share(tiles, first):
        lo, hi = (0, padded[1]) if first else _input_rows(tiles, kernel, stride, dilation)
        into = buf if first else xp.zeros((c, hi - lo) + padded[2:], dtype=g.dtype)
        tile = _TileColumns(xp, c, kernel, out_spatial, n, tile_rows, g.dtype)
        for r0, rows in tiles:
            cols = tile.view(rows)
            xp.matmul(wt, _row_columns(gm, r0, rows, row_len), out=cols.reshape(c * math.prod(kernel), -1))
            for offset in _offsets(kernel):
                into[full + _tile_window(offset, r0, rows, out_spatial, stride, dilation, lo)] += cols[full + offset]
        return lo, hi, into
    shares = _shares(_row_tiles(out_spatial, tile_rows), run)
    slabs = _run_shares(run, [lambda t=t, k=k: share(t, k == 0) for k, t in enumerate(shares)])
    for lo, hi, slab in slabs[1:]:
        buf[:, lo:hi] += slab
    if buf is out:
        return out
    crop = full + tuple(slice(lo, lo + s) for s, (lo, _) in zip(spatial, padding))
    if out is None:
        return xp.ascontiguousarray(buf[crop]) if has_pad else buf
    out[...] = buf[crop]
    return out


def conv_csn_tiled_weight_grad(xp, x, g, *, weight_shape, stride, padding, dilation, tile_rows, out=None,
                               run=None):
    """conv_csn_weight_grad as a sum of one product per tile of output rows
    (with threads: each share's sum, then the shares' sums in order)."""
    kernel = tuple(weight_shape[2:])
    padding, out_spatial = _geometry(tuple(x.shape[1:-1]), kernel, stride, padding, dilation)
    o, n = weight_shape[0], x.shape[-1]
    if out is None:
        out = xp.empty(tuple(weight_shape), dtype=g.dtype)
    xpad = _padded(xp, x, padding)
    gm, row_len = g.reshape(o, -1), math.prod(out_spatial[1:]) * n

    def share(tiles, dw):
        tile = _TileColumns(xp, x.shape[0], kernel, out_spatial, n, tile_rows, x.dtype)
        part = None
        for k, (r0, rows) in enumerate(tiles):
            cols = _fill_tile(tile.view(rows), xpad, r0, rows, kernel, out_spatial, stride, dilation)
            if k == 0:
                xp.matmul(_row_columns(gm, r0, rows, row_len), cols.T, out=dw)
                continue
            part = xp.matmul(_row_columns(gm, r0, rows, row_len), cols.T, out=part)
            dw += part
        return dw
    shares = _shares(_row_tiles(out_spatial, tile_rows), run)
    sums = _run_shares(run, [lambda t=t, k=k: share(t, out.reshape(o, -1) if k == 0 else
                                                     xp.empty((o, out.size // o), dtype=g.dtype))
                             for k, t in enumerate(shares)])
    for part in sums[1:]:
        sums[0] += part
    return out


def _tiled_max_pool_backward(xp, x, y, g, kernel, out):
    """Windows that tile the input: each window's gradient goes to the element
    max_pool_backward would pick (_winners), found by comparing with the pooled
    output y instead of searching again.  Branch-free: nothing is read back to
    the host, so the step needs no synchronization (a GPU backend can capture
    it in a CUDA graph)."""
    out = xp.empty(x.shape, dtype=g.dtype) if out is None else out
    out_spatial = tuple(y.shape[1:-1])
    covered = all(k * n == s for k, n, s in zip(kernel, out_spatial, x.shape[1:-1]))
    if not covered:
        out.fill(0)
    tiles = _tiles(kernel, out_spatial)
    winner = _winners(xp, x, y, tiles)
    for i, idx in enumerate(tiles):
        out[idx] = _select(xp, xp.equal(winner, i), g)
    return out


def _tiles(kernel, out_spatial):
    """For each kernel offset, the slices of the input under every (tiling) window."""
    ones = (1,) * len(kernel)
    return [(slice(None),) + _window(offset, out_spatial, kernel, ones) for offset in _offsets(kernel)]


def _winners(xp, x, y, tiles):
    """The kernel offset that takes each window's gradient: its first element
    equal to the maximum y (ties resolved by a running 'taken' mask) or, in a
    window holding NaN (y is NaN, which nothing equals), its last NaN.  NaNs
    are only ever found in NaN windows, so one pass does both."""
    winner = xp.zeros(y.shape, dtype=xp.int8 if len(tiles) < 128 else xp.int32)  # offset 0 unless later
    nan = xp.isnan(x) if x.dtype.kind == "f" else None  # one contiguous pass: cheaper than one per offset
    taken = None
    for i, idx in enumerate(tiles):
        hit = xp.equal(x[idx], y)
        if taken is None:
            taken = hit
            continue
        xp.greater(hit, taken, out=hit)          # equal, and no earlier element was
        xp.logical_or(taken, hit, out=taken)
        if nan is not None:
            xp.logical_or(hit, nan[idx], out=hit)  # every later NaN takes over
        # winner < i everywhere, so max(winner, hit * i) sets winner = i where hit
        xp.maximum(winner, xp.multiply(hit, i, dtype=winner.dtype), out=winner)
    return winner


def max_pool_csn_forward(xp, x, *, kernel_size, stride, padding, dilation, out=None):
    """x (C, *S, N) -> (C, *out, N), padding with -inf."""
    padding = _pairs(padding)
    spatial = tuple(x.shape[1:-1])
    out_spatial = conv_output_shape(spatial, kernel_size, stride, tuple(lo for lo, _ in padding), dilation)
    xpad = _padded(xp, x, padding, _lowest(xp, x.dtype))
    full = (slice(None),)
    y = out
    for k, offset in enumerate(_offsets(kernel_size)):
        v = xpad[full + _window(offset, out_spatial, stride, dilation)]
        if k == 0:
            y = v.copy() if y is None else xp.copyto(y, v) or y
        else:
            xp.maximum(y, v, out=y)
    return y


def max_pool_csn_backward(xp, x, g, *, kernel_size, stride, padding, dilation, out=None, y=None):
    """Gradient of max_pool_csn_forward: each window's gradient goes to its
    first maximal element (PyTorch's rule; NaN wins); overlaps accumulate.
    With the pooled output y of tiling windows, the maxima are found by
    comparing with y instead of being searched again."""
    padding = _pairs(padding)
    if (y is not None and not any(p for pair in padding for p in pair)
            and all(s == k for k, s in zip(kernel_size, stride)) and all(d == 1 for d in dilation)):
        return _tiled_max_pool_backward(xp, x, y, g, kernel_size, out)
    # windows that overlap, pad or dilate (rare in convolutional stacks): the
    # (N, C, *S) kernel does it, on the batch moved back to the front
    dx = max_pool_backward(xp, xp.moveaxis(x, -1, 0), xp.moveaxis(g, -1, 0), kernel_size=kernel_size,
                           stride=stride, padding=tuple(lo for lo, _ in padding), dilation=dilation)
    dx = xp.moveaxis(dx, 0, -1)
    if out is None:
        return xp.ascontiguousarray(dx)
    out[...] = dx
    return out
