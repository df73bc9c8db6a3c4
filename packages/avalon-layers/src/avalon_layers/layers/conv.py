"""CNN layers: Conv1d/2d/3d, ConvTranspose1d/2d/3d, max, average and adaptive
pooling, and their functional forms (F.conv2d, F.max_pool2d, ...), over
avalon-core's convolution and pooling primitives.

Layout as in PyTorch: input (N, C, *spatial) or unbatched (C, *spatial);
conv weight (out_channels, in_channels/groups, *kernel); transposed-conv
weight (in_channels, out_channels/groups, *kernel).  Only padding_mode='zeros'
is supported, and pooling without ceil_mode / return_indices.
"""
from __future__ import annotations

import avalon

from ..module import Module
from ..registry import export
from .basic import new_param, place, reset_linear_like, shape_error

_CNN = "CNN"
_SPATIAL = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def _ntuple(name: str, value, nd: int) -> tuple:
    if isinstance(value, int):
        return (value,) * nd
    t = tuple(int(v) for v in value)
    if len(t) == 1 and nd > 1:
        t = t * nd
    if len(t) != nd:
        raise ValueError(f"{name} must be an int or a tuple of {nd} ints, got {value!r}")
    return t


def _check_input(layer, input, nd: int, channels=None) -> None:
    """Rank nd+2 (batched) or nd+1 (unbatched), with `channels` channels when given."""
    shape = tuple(input.shape)
    c = "C" if channels is None else str(channels)
    sp = ", ".join(_SPATIAL[nd])
    expected = f"(N, {c}, {sp}) or ({c}, {sp})"
    if len(shape) not in (nd + 1, nd + 2):
        raise shape_error(layer, expected, shape)
    if channels is not None and shape[len(shape) - nd - 1] != channels:
        raise shape_error(layer, expected, shape)


# -- convolutions -----------------------------------------------------------------------------------------

class _ConvNd(Module):
    """What Conv and ConvTranspose layers share: hyper-parameters, weights, init, repr."""
    _nd = 0
    _transposed = False

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                 padding_mode, output_padding=0, device=None, dtype=None):
        super().__init__()
        nd, name = self._nd, type(self).__name__
        if groups <= 0:
            raise ValueError(f"{name}: groups must be a positive integer")
        if in_channels % groups:
            raise ValueError(f"{name}: in_channels must be divisible by groups")
        if out_channels % groups:
            raise ValueError(f"{name}: out_channels must be divisible by groups")
        if padding_mode != "zeros":
            raise NotImplementedError(f"{name}: only padding_mode='zeros' is supported, got {padding_mode!r}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _ntuple("kernel_size", kernel_size, nd)
        self.stride = _ntuple("stride", stride, nd)
        self.padding = self._padding(padding)
        self.dilation = _ntuple("dilation", dilation, nd)
        self.transposed = self._transposed
        self.output_padding = _ntuple("output_padding", output_padding, nd)
        self.groups, self.padding_mode = int(groups), padding_mode
        if self._transposed:
            shape = (in_channels, out_channels // groups) + self.kernel_size
        else:
            shape = (out_channels, in_channels // groups) + self.kernel_size
        self.weight = new_param(shape, dtype)
        self.bias = new_param((out_channels,), dtype) if bias else None
        self.reset_parameters()
        place(self, device)

    def _padding(self, padding):
        name = type(self).__name__
        if isinstance(padding, str):
            if self._transposed:
                raise ValueError(f"{name}: padding must be an int or a tuple of ints, got {padding!r}")
            if padding not in ("same", "valid"):
                raise ValueError(f"{name}: invalid padding string {padding!r}, should be one of 'same', 'valid'")
            if padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError(f"{name}: padding='same' is not supported for strided convolutions")
            return padding
        return _ntuple("padding", padding, self._nd)

    def reset_parameters(self):
        reset_linear_like(self.weight, self.bias)

    def extra_repr(self):
        nd = self._nd
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * nd:
            s += f", padding={self.padding}"
        if self.dilation != (1,) * nd:
            s += f", dilation={self.dilation}"
        if self.output_padding != (0,) * nd:
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


_CONV_FNS = {1: avalon.conv1d, 2: avalon.conv2d, 3: avalon.conv3d}
_CONV_T_FNS = {1: avalon.conv_transpose1d, 2: avalon.conv_transpose2d, 3: avalon.conv_transpose3d}


class _Conv(_ConvNd):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)

    def forward(self, input):
        _check_input(self, input, self._nd, self.in_channels)
        return _CONV_FNS[self._nd](input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                                   self.groups)


@export("nn", _CNN)
class Conv1d(_Conv):
    """1-D convolution over (N, C_in, L) -> (N, C_out, L_out)."""
    _nd = 1


@export("nn", _CNN)
class Conv2d(_Conv):
    """2-D convolution over (N, C_in, H, W) -> (N, C_out, H_out, W_out); padding may be an int,
    a pair, 'valid' or 'same'."""
    _nd = 2


@export("nn", _CNN)
class Conv3d(_Conv):
    """3-D convolution over (N, C_in, D, H, W)."""
    _nd = 3


class _ConvTranspose(_ConvNd):
    _transposed = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", device=None,
                 dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, output_padding, device=device, dtype=dtype)

    def forward(self, input, output_size=None):
        _check_input(self, input, self._nd, self.in_channels)
        output_padding = self._output_padding(input, output_size)
        return _CONV_T_FNS[self._nd](input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                     self.groups, self.dilation)

    def _output_padding(self, input, output_size):
        """output_padding, or the one that gives `output_size` (several sizes are possible
        when stride > 1), as PyTorch computes it."""
        if output_size is None:
            return self.output_padding
        nd = self._nd
        output_size = tuple(int(s) for s in output_size)
        if len(output_size) > nd:
            output_size = output_size[-nd:]
        if len(output_size) != nd:
            raise ValueError(f"{type(self).__name__}: output_size must have {nd} or {nd + 2} elements, "
                             f"got {len(output_size)}")
        spatial = tuple(input.shape)[-nd:]
        lo = tuple((s - 1) * st - 2 * p + d * (k - 1) + 1 for s, st, p, d, k in
                   zip(spatial, self.stride, self.padding, self.dilation, self.kernel_size))
        hi = tuple(m + st - 1 for m, st in zip(lo, self.stride))
        if any(not a <= o <= b for o, a, b in zip(output_size, lo, hi)):
            raise ValueError(f"{type(self).__name__}: requested an output size of {output_size}, but valid "
                             f"sizes range from {lo} to {hi} (for an input of {spatial})")
        return tuple(o - a for o, a in zip(output_size, lo))


@export("nn", _CNN)
class ConvTranspose1d(_ConvTranspose):
    """1-D transposed convolution; weight (C_in, C_out/groups, K)."""
    _nd = 1


@export("nn", _CNN)
class ConvTranspose2d(_ConvTranspose):
    """2-D transposed convolution; weight (C_in, C_out/groups, kH, kW).  forward(input,
    output_size=None) picks output_padding for a requested output size."""
    _nd = 2


@export("nn", _CNN)
class ConvTranspose3d(_ConvTranspose):
    """3-D transposed convolution."""
    _nd = 3


# -- pooling -------------------------------------------------------------------------------------------------

def _unsupported(name, ceil_mode=False, return_indices=False):
    if ceil_mode:
        raise NotImplementedError(f"{name}: ceil_mode=True is not supported")
    if return_indices:
        raise NotImplementedError(f"{name}: return_indices=True is not supported")


_MAX_FNS = {1: avalon.max_pool1d, 2: avalon.max_pool2d, 3: avalon.max_pool3d}
_AVG_FNS = {1: avalon.avg_pool1d, 2: avalon.avg_pool2d, 3: avalon.avg_pool3d}


class _MaxPoolNd(Module):
    _nd = 0

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False):
        super().__init__()
        _unsupported(type(self).__name__, ceil_mode, return_indices)
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding, self.dilation = padding, dilation
        self.return_indices, self.ceil_mode = return_indices, ceil_mode

    def forward(self, input):
        _check_input(self, input, self._nd)
        return _MAX_FNS[self._nd](input, self.kernel_size, self.stride, self.padding, self.dilation)

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


@export("nn", _CNN)
class MaxPool1d(_MaxPoolNd):
    """Max over sliding windows of (N, C, L)."""
    _nd = 1


@export("nn", _CNN)
class MaxPool2d(_MaxPoolNd):
    """Max over sliding windows of (N, C, H, W); stride defaults to kernel_size."""
    _nd = 2


@export("nn", _CNN)
class MaxPool3d(_MaxPoolNd):
    """Max over sliding windows of (N, C, D, H, W)."""
    _nd = 3


class _AvgPoolNd(Module):
    _nd = 0

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override=None):
        super().__init__()
        _unsupported(type(self).__name__, ceil_mode)
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding, self.ceil_mode = padding, ceil_mode
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def forward(self, input):
        _check_input(self, input, self._nd)
        args = (input, self.kernel_size, self.stride, self.padding, False, self.count_include_pad)
        if self._nd == 1:
            return avalon.avg_pool1d(*args)
        return _AVG_FNS[self._nd](*args, self.divisor_override)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


@export("nn", _CNN)
class AvgPool1d(_AvgPoolNd):
    """Average over sliding windows of (N, C, L)."""
    _nd = 1

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True):
        # PyTorch stores AvgPool1d's sizes as 1-tuples (visible in its repr)
        super().__init__(_ntuple("kernel_size", kernel_size, 1),
                         _ntuple("stride", stride if stride is not None else kernel_size, 1),
                         _ntuple("padding", padding, 1), ceil_mode, count_include_pad)


@export("nn", _CNN)
class AvgPool2d(_AvgPoolNd):
    """Average over sliding windows of (N, C, H, W); stride defaults to kernel_size."""
    _nd = 2


@export("nn", _CNN)
class AvgPool3d(_AvgPoolNd):
    """Average over sliding windows of (N, C, D, H, W)."""
    _nd = 3


class _AdaptivePoolNd(Module):
    _nd = 0
    _fns: dict = {}

    def __init__(self, output_size):
        super().__init__()
        self.output_size = output_size

    def forward(self, input):
        _check_input(self, input, self._nd)
        return self._fns[self._nd](input, self.output_size)

    def extra_repr(self):
        return f"output_size={self.output_size}"


class _AdaptiveAvgPoolNd(_AdaptivePoolNd):
    _fns = {1: avalon.adaptive_avg_pool1d, 2: avalon.adaptive_avg_pool2d, 3: avalon.adaptive_avg_pool3d}


@export("nn", _CNN)
class AdaptiveAvgPool1d(_AdaptiveAvgPoolNd):
    """Average pooling to a given output length (input lengths divisible by it)."""
    _nd = 1


@export("nn", _CNN)
class AdaptiveAvgPool2d(_AdaptiveAvgPoolNd):
    """Average pooling to a given (H_out, W_out) (input sizes divisible by it; None keeps an axis)."""
    _nd = 2


@export("nn", _CNN)
class AdaptiveAvgPool3d(_AdaptiveAvgPoolNd):
    """Average pooling to a given (D_out, H_out, W_out) (input sizes divisible by it)."""
    _nd = 3


class _AdaptiveMaxPoolNd(_AdaptivePoolNd):
    _fns = {1: avalon.adaptive_max_pool1d, 2: avalon.adaptive_max_pool2d, 3: avalon.adaptive_max_pool3d}

    def __init__(self, output_size, return_indices: bool = False):
        _unsupported(type(self).__name__, return_indices=return_indices)
        super().__init__(output_size)
        self.return_indices = return_indices


@export("nn", _CNN)
class AdaptiveMaxPool1d(_AdaptiveMaxPoolNd):
    """Max pooling to a given output length (input lengths divisible by it)."""
    _nd = 1


@export("nn", _CNN)
class AdaptiveMaxPool2d(_AdaptiveMaxPoolNd):
    """Max pooling to a given (H_out, W_out) (input sizes divisible by it)."""
    _nd = 2


@export("nn", _CNN)
class AdaptiveMaxPool3d(_AdaptiveMaxPoolNd):
    """Max pooling to a given (D_out, H_out, W_out) (input sizes divisible by it)."""
    _nd = 3


# -- functional forms (torch.nn.functional's signatures) -------------------------------------------------------

@export("functional", _CNN)
def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """1-D convolution: input (N, C_in, L), weight (C_out, C_in/groups, K)."""
    return avalon.conv1d(input, weight, bias, stride, padding, dilation, groups)


@export("functional", _CNN)
def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution: input (N, C_in, H, W), weight (C_out, C_in/groups, kH, kW)."""
    return avalon.conv2d(input, weight, bias, stride, padding, dilation, groups)


@export("functional", _CNN)
def conv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """3-D convolution: input (N, C_in, D, H, W)."""
    return avalon.conv3d(input, weight, bias, stride, padding, dilation, groups)


@export("functional", _CNN)
def conv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """1-D transposed convolution: weight (C_in, C_out/groups, K)."""
    return avalon.conv_transpose1d(input, weight, bias, stride, padding, output_padding, groups, dilation)


@export("functional", _CNN)
def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """2-D transposed convolution: weight (C_in, C_out/groups, kH, kW)."""
    return avalon.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)


@export("functional", _CNN)
def conv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """3-D transposed convolution."""
    return avalon.conv_transpose3d(input, weight, bias, stride, padding, output_padding, groups, dilation)


@export("functional", _CNN)
def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Max pooling over (N, C, L)."""
    return avalon.max_pool1d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


@export("functional", _CNN)
def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Max pooling over (N, C, H, W); stride defaults to kernel_size."""
    return avalon.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


@export("functional", _CNN)
def max_pool3d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Max pooling over (N, C, D, H, W)."""
    return avalon.max_pool3d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


@export("functional", _CNN)
def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """Average pooling over (N, C, L)."""
    return avalon.avg_pool1d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)


@export("functional", _CNN)
def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """Average pooling over (N, C, H, W)."""
    return avalon.avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


@export("functional", _CNN)
def avg_pool3d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
               divisor_override=None):
    """Average pooling over (N, C, D, H, W)."""
    return avalon.avg_pool3d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


@export("functional", _CNN)
def adaptive_avg_pool1d(input, output_size):
    """Average pooling to an output length that divides the input's."""
    return avalon.adaptive_avg_pool1d(input, output_size)


@export("functional", _CNN)
def adaptive_avg_pool2d(input, output_size):
    """Average pooling to an output size that divides the input's."""
    return avalon.adaptive_avg_pool2d(input, output_size)


@export("functional", _CNN)
def adaptive_avg_pool3d(input, output_size):
    """Average pooling to an output size that divides the input's."""
    return avalon.adaptive_avg_pool3d(input, output_size)


@export("functional", _CNN)
def adaptive_max_pool2d(input, output_size, return_indices=False):
    """Max pooling to an output size that divides the input's."""
    return avalon.adaptive_max_pool2d(input, output_size, return_indices)
