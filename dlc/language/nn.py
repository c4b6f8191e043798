"""Composites: layers, activations, math functions, losses and regularizers.

Each is a plain function over the GraphBuilder. Its Python signature is the .dln
signature: the frontend binds call arguments to it and checks them against the
annotations (Tensor, int, float, bool, str, Pair, Init). Layers take a LayerContext
first, which creates their parameters and state under stable names.
"""
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Optional, Union

from dlc.core import ops
from dlc.core.builder import GraphBuilder, Value
from dlc.core.diagnostics import ArgumentError
from dlc.language.initializers import GLOROT_UNIFORM, HE_NORMAL, ONES, ZEROS, Init
from dlc.core.types import FLOAT32_MAX, DType, ShapeError, Sym, TensorType, broadcast_shapes, dim_div, dim_mul, numel


class Tensor:
    """Annotation: a tensor argument."""


class Pair:
    """Annotation: an int, or [int, int] for (height, width)."""


class ParamList(list):
    """Annotation and value: a list of parameter tensors (`params`, `weights`)."""


class States:
    """Annotation: a recurrent layer's initial state, a tensor or a tuple (or list) of them."""


class LayerContext:
    """What a layer may do besides emitting nodes: own parameters and state, draw randomness."""

    b: GraphBuilder
    prefix: str
    training: bool

    def param(self, name: str, shape, init: Init, fan_in: int = 0, fan_out: int = 0) -> Value: ...
    def state(self, name: str, shape, init: Init, dtype: DType = DType.f32) -> Value: ...
    def update(self, state: Value, new: Value) -> None: ...
    def rng(self) -> tuple[Value, Value, int]: ...

    # Masks (Keras-style): a bool [B, T] tensor attached to a value whose leading axes are
    # [B, T], marking the real (not padded) time steps. `embedding(mask_zero=true)` attaches
    # one, the functions in KEEPS_MASK pass it on, recurrent layers and losses read it.
    def mask_of(self, x) -> Optional[Value]:
        return self.__dict__.get("_masks", {}).get(x.id) if isinstance(x, Value) else None

    def set_mask(self, x: Value, mask: Optional[Value]) -> None:
        if mask is not None:
            self.__dict__.setdefault("_masks", {})[x.id] = mask

    def used_loss_mask(self, mask: Value) -> None:
        """A loss averaged over the steps this mask keeps (accuracy then does the same)."""


@dataclass(frozen=True)
class Builtin:
    name: str
    fn: Callable
    kind: str  # layer | activation | function | loss | regularizer
    doc: str

    @property
    def owns_params(self) -> bool:
        return self.kind == "layer"


BUILTINS: dict[str, Builtin] = {}


def builtin(kind: str, name: Optional[str] = None):
    def register(fn):
        key = name or fn.__name__
        BUILTINS[key] = Builtin(key, fn, kind, (fn.__doc__ or "").strip())
        return fn
    return register


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def arg_error(message: str, arg: str | None = None, hint: str | None = None) -> ArgumentError:
    """An ArgumentError about one argument: the frontend points the caret at that argument."""
    err = ArgumentError(message, hint=hint)
    err.arg = arg
    return err


def _float(x: Value, layer: str, f32: bool = False, arg: str = "x") -> None:
    """Layers with (f32) parameters need f32 input; other functions any float."""
    if f32 and x.dtype != DType.f32:
        raise arg_error(f"`{layer}` needs an f32 input, got {x.type}", arg)
    if not x.dtype.is_float:
        raise arg_error(f"`{layer}` needs a floating-point input, got {x.type}", arg)


def _window(layer: str, kernel, stride) -> tuple[tuple[int, int], tuple[int, int]]:
    k, s = pair(kernel), pair(stride)
    for what, v in (("kernel", k), ("stride", s)):
        if min(v) < 1:
            raise arg_error(f"`{layer}`: argument `{what}` must be positive, got "
                            f"{list(v) if v[0] != v[1] else v[0]}", what)
    return k, s


def _matmul_last(b: GraphBuilder, x: Value, w: Value) -> Value:
    """x[..., k] @ w[k, n] for any rank of x (leading axes are flattened into rows)."""
    if x.rank == 2:
        return b.matmul(x, w)
    lead = x.shape[:-1]
    rows = numel(lead)
    out = b.matmul(b.reshape(x, (rows, x.shape[-1])), w)
    return b.reshape(out, tuple(lead) + (w.shape[1],))


def _batch_matmul(b: GraphBuilder, x: Value, y: Value) -> Value:
    """x[..., m, k] @ y[..., k, n] over equal leading axes (flattened into one stack)."""
    if x.rank == 3:
        return b.batch_matmul(x, y)
    lead = x.shape[:-2]
    g = numel(lead)
    out = b.batch_matmul(b.reshape(x, (g,) + tuple(x.shape[-2:])), b.reshape(y, (g,) + tuple(y.shape[-2:])))
    return b.reshape(out, tuple(lead) + tuple(out.shape[1:]))


def _features(x: Value, layer: str) -> int:
    if not x.rank:
        raise arg_error(f"`{layer}` needs a tensor with a feature axis, got the scalar {x.type}", "x")
    d = x.shape[-1]
    if not isinstance(d, int):
        raise arg_error(f"`{layer}` needs a known number of input features, but the last "
                        f"dimension of {x.type} is {d}", "x")
    return d


# --- layers ----------------------------------------------------------------------------------

@builtin("layer")
def dense(ctx: LayerContext, x: Tensor, units: int, bias: bool = True, init: Init = GLOROT_UNIFORM) -> Value:
    """Fully connected layer: x @ w + b over the last axis; w is [in, units]."""
    _positive(units, "units", "dense")
    _float(x, "dense", f32=True)
    n_in = _features(x, "dense")
    w = ctx.param("w", (n_in, units), init, n_in, units)
    if x.rank <= 2:
        y = _matmul_last(ctx.b, x, w)
        return y + ctx.param("b", (units,), ZEROS) if bias else y
    # [B, T, in]: rows [B*T, in] @ w + b, then [B, T, units] (the bias's gradient sums rows)
    lead = tuple(x.shape[:-1])
    y = ctx.b.matmul(ctx.b.reshape(x, (numel(lead), n_in)), w)
    return ctx.b.reshape(y + ctx.param("b", (units,), ZEROS) if bias else y, lead + (units,))


@builtin("layer")
def conv2d(ctx: LayerContext, x: Tensor, channels: int, kernel: Pair, stride: Pair = 1,
           pad: Union[Pair, str] = 0, bias: bool = True, init: Init = HE_NORMAL, dilation: Pair = 1,
           groups: int = 1) -> Value:
    """2-D convolution over NCHW input; pad is a number, [h, w] or "same" (odd kernels, stride
    1). dilation spaces the kernel's taps; groups splits the channels into groups convolved
    apart (groups = input channels: depthwise), with weights [channels, in/groups, kh, kw]."""
    _positive(channels, "channels", "conv2d")
    if x.rank != 4:
        raise arg_error(f"`conv2d` needs an NCHW input of rank 4, got {x.type}", "x")
    _float(x, "conv2d", f32=True)
    k, s = _window("conv2d", kernel, stride)
    d = _dilation("conv2d", dilation)
    if pad == "same":
        if s != (1, 1) or k[0] % 2 == 0 or k[1] % 2 == 0:
            raise arg_error('`conv2d`: pad="same" needs stride 1 and an odd kernel', "pad")
        p = (d[0] * (k[0] // 2), d[1] * (k[1] // 2))
    elif isinstance(pad, str):
        raise arg_error(f'`conv2d`: argument `pad` must be a number, [h, w] or "same", got "{pad}"', "pad")
    else:
        p = pair(pad)
    c_in = x.shape[1]
    if not isinstance(c_in, int):
        raise arg_error(f"`conv2d` needs a known number of input channels, got {x.type}", "x")
    _groups("conv2d", groups, c_in, channels)
    w = ctx.param("w", (channels, c_in // groups) + k, init, c_in // groups * k[0] * k[1], channels * k[0] * k[1])
    y = _convolve(ctx.b, x, w, s, p, d, groups, "conv2d")
    if bias:
        bvec = ctx.param("b", (channels,), ZEROS)
        y = y + ctx.b.broadcast(bvec, y.shape, (1,))
    return y


def _dilation(layer: str, dilation) -> tuple[int, int]:
    d = pair(dilation)
    if min(d) < 1:
        raise arg_error(f"`{layer}`: argument `dilation` must be positive, got {_show(list(d))}", "dilation")
    return d


def _groups(layer: str, groups: int, c_in: int, channels: int) -> None:
    _positive(groups, "groups", layer)
    for what, n in (("input channels", c_in), ("`channels`", channels)):
        if n % groups:
            raise arg_error(f"`{layer}`: {groups} groups do not divide the {n} {what}", "groups",
                            hint="both the input's channels and `channels` must be multiples of `groups`")


def _convolve(b: GraphBuilder, x: Value, w: Value, stride, pad, dilation, groups: int, layer: str) -> Value:
    """conv2d of x [N, C, H, W] with w [O, C/groups, kh, kw] (PyTorch's layout), composed from
    primitives: a depthwise convolution (one input channel per group) as a sum of the
    kernel's shifted, strided views of x, each times its tap; other groups as a convolution
    per group. The result is recorded as one `conv2d` composite, which export writes as one
    Conv."""
    if not all(isinstance(d, int) for d in x.shape[2:]):
        raise arg_error(f"`{layer}`: spatial dimensions of {x.type} must be known numbers", "x")
    spanned = tuple(dd * (kk - 1) + 1 for dd, kk in zip(dilation, w.shape[2:]))
    out_hw = tuple(map(ops.linalg.conv_out, x.shape[2:], w.shape[2:], stride, pad, dilation))
    if min(out_hw) < 1:
        dilated = " (the kernel, dilated)" if dilation != (1, 1) else ""
        raise arg_error(f"`{layer}`: a {spanned[0]}x{spanned[1]} window{dilated} with stride {stride[0]} and padding "
                        f"{pad[0]} does not fit a {x.shape[2]}x{x.shape[3]} input", "kernel")
    if groups > 1 and w.shape[1] == 1:
        y = _depthwise(b, x, w, stride, pad, dilation, out_hw)
    else:
        dilated = ops.linalg.dilation_attr(dilation)
        y = _grouped(b, x, w, groups, lambda x, w: b.emit(ops.CONV2D, (x, w), stride=stride, pad=pad, **dilated))
    b.composite(y, "conv2d", (x, w), stride=stride, pad=pad, dilation=dilation, groups=groups)
    return y


def _grouped(b: GraphBuilder, x: Value, w: Value, groups: int, conv) -> Value:
    """conv(x, w) per group of channels, the results joined on the channel axis."""
    if groups == 1:
        return conv(x, w)
    n, c, h, wd = x.shape
    c_in, c_out = c // groups, w.shape[0] // groups
    return b.concat([conv(b.slice(x, (0, g * c_in, 0, 0), (n, (g + 1) * c_in, h, wd)),
                          b.slice(w, (g * c_out, 0, 0, 0), ((g + 1) * c_out,) + tuple(w.shape[1:])))
                     for g in range(groups)], 1)


def _depthwise(b: GraphBuilder, x: Value, w: Value, stride, pad, dilation, out_hw) -> Value:
    """Output channel c*m + j (m outputs per input channel) = the sum over taps (i, j') of
    x's channel c shifted by the tap, times w[c*m + j, 0, i, j']: elementwise work the fusion
    pass joins, with no multiply-add wasted on other channels. Each tap's view is the strided
    part of x it reads, padded with zeros where the window hangs over x's edge (so the
    gradient of x is a sum over x's own shape, computed in one kernel)."""
    n, c = x.shape[:2]
    o, _, kh, kw = w.shape
    m = o // c
    grid = (n, c, m) + out_hw if m > 1 else (n, c) + out_hw  # (no axis of 1: its gradient would be a sum)
    total = None
    for i in range(kh):
        for j in range(kw):
            ranges = [_tap_range(size, out, tap * dd - pp, ss) for size, out, tap, dd, pp, ss in
                      zip(x.shape[2:], out_hw, (i, j), dilation, pad, stride)]
            if any(r is None for r in ranges):
                continue  # the tap only ever reads padding
            (first_y, count_y, at_y), (first_x, count_x, at_x) = ranges
            view = b.slice(x, (0, 0, at_y, at_x), (n, c, at_y + (count_y - 1) * stride[0] + 1,
                                                   at_x + (count_x - 1) * stride[1] + 1), (1, 1) + tuple(stride))
            view = b.pad(view, (0, 0, first_y, first_x),
                         (0, 0, out_hw[0] - first_y - count_y, out_hw[1] - first_x - count_x))
            tap = b.reshape(b.slice(w, (0, 0, i, j), (o, 1, i + 1, j + 1)), (c, m) if m > 1 else (c,))
            term = (b.broadcast(view, grid, (0, 1, 3, 4)) if m > 1 else view) * \
                b.broadcast(tap, grid, (1, 2) if m > 1 else (1,))
            total = term if total is None else total + term
    if total is None:
        return b.broadcast(b.const(0.0, x.dtype), (n, o) + out_hw, ())
    return b.reshape(total, (n, o) + out_hw)


def _tap_range(size: int, out: int, offset: int, stride: int):
    """Along one axis, the outputs whose window reads x at out_index*stride + offset within
    [0, size): (the first such output, how many, the x index it reads), or None."""
    first = max(0, -(offset // stride))  # the least o with o*stride + offset >= 0
    last = min(out - 1, (size - 1 - offset) // stride) if size - 1 - offset >= 0 else -1
    if last < first:
        return None
    return first, last - first + 1, first * stride + offset


@builtin("layer")
def conv_transpose2d(ctx: LayerContext, x: Tensor, channels: int, kernel: Pair, stride: Pair = 1, pad: Pair = 0,
                     output_pad: Pair = 0, bias: bool = True, init: Init = HE_NORMAL, dilation: Pair = 1) -> Value:
    """Transposed 2-D convolution over NCHW input (PyTorch's ConvTranspose2d, the upsampling of
    decoders): every input cell adds the kernel, scaled, into a stride-spaced window of the
    output (its taps dilation apart); H_out = (H - 1)·stride - 2·pad + dilation·(kernel - 1) +
    1 + output_pad. It is the input gradient of conv2d, and runs as that kernel."""
    _positive(channels, "channels", "conv_transpose2d")
    if x.rank != 4:
        raise arg_error(f"`conv_transpose2d` needs an NCHW input of rank 4, got {x.type}", "x")
    _float(x, "conv_transpose2d", f32=True)
    k, s = _window("conv_transpose2d", kernel, stride)
    d = _dilation("conv_transpose2d", dilation)
    p, extra = pair(pad), pair(output_pad)
    if min(p + extra) < 0 or any(e >= st for e, st in zip(extra, s)):
        raise arg_error(f"`conv_transpose2d`: argument `output_pad` must be at least 0 and less than the stride "
                        f"{list(s)}, got {_show(list(extra))}", "output_pad")
    c_in = x.shape[1]
    if not isinstance(c_in, int) or not all(isinstance(d, int) for d in x.shape[2:]):
        raise arg_error(f"`conv_transpose2d` needs known channels and sizes, got {x.type}", "x")
    spanned = tuple((n - 1) * st - 2 * pp + dd * (kk - 1) + 1 for n, st, pp, dd, kk in zip(x.shape[2:], s, p, d, k))
    if min(spanned) < 1:
        dilated = f" dilated by {_show(list(d))}" if d != (1, 1) else ""
        raise arg_error(f"`conv_transpose2d`: padding {list(p)} leaves no output of a {x.shape[2]}x{x.shape[3]} "
                        f"input with a {k[0]}x{k[1]} kernel{dilated}", "pad")
    w = ctx.param("w", (c_in, channels) + k, init, c_in * k[0] * k[1], channels * k[0] * k[1])
    y = ctx.b.emit(ops.CONV2D_BWD_DATA, (x, w), in_hw=tuple(n + e for n, e in zip(spanned, extra)), stride=s, pad=p,
                   **ops.linalg.dilation_attr(d))
    if bias:
        bvec = ctx.param("b", (channels,), ZEROS)
        y = y + ctx.b.broadcast(bvec, y.shape, (1,))
    return y


@builtin("layer")
def conv1d(ctx: LayerContext, x: Tensor, channels: int, kernel: int, stride: int = 1,
           pad: Union[int, str] = 0, bias: bool = True, init: Init = HE_NORMAL, dilation: int = 1,
           groups: int = 1) -> Value:
    """1-D convolution over [N, C, T] input (channels first, as PyTorch's Conv1d); pad is a
    number or "same" (odd kernels, stride 1); dilation and groups as in conv2d. Computed as
    conv2d over [N, C, 1, T]."""
    _positive(channels, "channels", "conv1d")
    if x.rank != 3:
        raise arg_error(f"`conv1d` needs an [N, C, T] input of rank 3, got {x.type}", "x")
    _float(x, "conv1d", f32=True)
    _window("conv1d", kernel, stride)
    _dilation("conv1d", dilation)
    if pad == "same":
        if stride != 1 or kernel % 2 == 0:
            raise arg_error('`conv1d`: pad="same" needs stride 1 and an odd kernel', "pad")
        pad = dilation * (kernel // 2)
    elif isinstance(pad, str):
        raise arg_error(f'`conv1d`: argument `pad` must be a number or "same", got "{pad}"', "pad")
    c_in = x.shape[1]
    if not isinstance(c_in, int) or not isinstance(x.shape[2], int):
        raise arg_error(f"`conv1d` needs a known number of input channels and steps, got {x.type}", "x")
    _groups("conv1d", groups, c_in, channels)
    b = ctx.b
    w = ctx.param("w", (channels, c_in // groups, kernel), init, c_in // groups * kernel, channels * kernel)
    n, _, t = x.shape
    y = _convolve(b, b.reshape(x, (n, c_in, 1, t)), b.reshape(w, (channels, c_in // groups, 1, kernel)),
                  (1, stride), (0, pad), (1, dilation), groups, "conv1d")
    y = b.reshape(y, (n, channels, y.shape[3]))
    b.composite(y, "conv1d", (x, w), stride=stride, pad=pad, dilation=dilation, groups=groups)
    if bias:
        y = y + b.broadcast(ctx.param("b", (channels,), ZEROS), y.shape, (1,))
    return y


def _pool(ctx, x, mode, kernel, stride, pad, ceil=False, count_pad=True):
    if x.rank == 3:  # [N, C, T]: one row of an NCHW image
        for what, v in (("kernel", kernel), ("stride", stride), ("pad", pad)):
            if not isinstance(v, (int, type(None))):
                raise arg_error(f"`{mode}pool` over [N, C, T] takes a number for `{what}`, got {list(v)}", what)
        _window(f"{mode}pool", kernel, stride if stride is not None else kernel)
        n, c, t = x.shape
        y = _pool(ctx, ctx.b.reshape(x, (n, c, 1, t)), mode, (1, kernel), (1, stride or kernel), (0, pad),
                  ceil, count_pad)
        return ctx.b.reshape(y, (n, c, y.shape[3]))
    if x.rank != 4:
        raise arg_error(f"`{mode}pool` needs an NCHW input of rank 4 (or [N, C, T]), got {x.type}", "x")
    _float(x, f"{mode}pool")
    k, s = _window(f"{mode}pool", kernel, stride if stride is not None else kernel)
    p = pair(pad)
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise arg_error(f"`{mode}pool`: argument `pad` can be at most half the window "
                        f"({k[0]}x{k[1]}), got {list(p) if p[0] != p[1] else p[0]}", "pad")
    b = ctx.b
    size = x.shape[2:]
    if (ceil or not count_pad) and not all(isinstance(d, int) for d in size):
        raise arg_error(f"`{mode}pool` with ceil=true or count_pad=false needs a known height and width, "
                        f"got {x.type}", "x")
    if ceil:  # rows and columns past the end, so that the last windows (which start inside) fit
        extra = [max(0, (pooled_size(n, kk, st, pp, True) - 1) * st + kk - 2 * pp - n)
                 for n, kk, st, pp in zip(size, k, s, p)]
        fill = -FLOAT32_MAX if mode == "max" else 0.0  # (which no max takes, and no sum counts)
        x = b.pad(x, (0, 0, 0, 0), (0, 0, *extra), value=fill)
    y = b.emit(ops.POOL2D, (x,), mode=mode, kernel=k, stride=s, pad=p)
    if mode == "avg" and (ceil or not count_pad):  # the sums over the cells PyTorch counts
        grid = tuple(y.shape[2:])
        cells = [_window_cells(b, grid, axis, *a, count_pad) for axis, a in enumerate(zip(size, k, s, p))]
        y = y * b.broadcast((k[0] * k[1]) / (cells[0] * cells[1]), y.shape, (2, 3))
    return y


def pooled_size(n: int, k: int, s: int, p: int, ceil: bool) -> int:
    """A pool's output size along one axis (PyTorch's rule: with ceil, a last window that
    would start in the padding past the end is dropped)."""
    out = (n + 2 * p - k + (s - 1 if ceil else 0)) // s + 1
    return out - 1 if ceil and (out - 1) * s >= n + p else out


def _window_cells(b: GraphBuilder, grid: tuple, axis: int, n: int, k: int, s: int, p: int,
                  count_pad: bool) -> Value:
    """Along one axis of the [OH, OW] grid of windows, the cells each window averages: within
    the padded input (count_pad), or within the input itself. (From iota: computed where it
    is read, not stored.)"""
    start = b.cast(b.iota(grid, axis), DType.f32) * float(s) - float(p)
    end = b.minimum(start + float(k), float(n + p))
    if count_pad:
        return end - start
    return b.minimum(end, float(n)) - b.maximum(start, 0.0)


@builtin("function")
def maxpool(ctx: LayerContext, x: Tensor, kernel: Pair = 2, stride: Optional[Pair] = None, pad: Pair = 0,
            ceil: bool = False) -> Value:
    """Max pooling over NCHW windows, or over time in [N, C, T] (stride defaults to the kernel
    size; ceil=true rounds the output size up, as PyTorch's ceil_mode)."""
    return _pool(ctx, x, "max", kernel, stride, pad, ceil)


@builtin("function")
def avgpool(ctx: LayerContext, x: Tensor, kernel: Pair = 2, stride: Optional[Pair] = None, pad: Pair = 0,
            ceil: bool = False, count_pad: bool = True) -> Value:
    """Average pooling over NCHW windows, or over time in [N, C, T] (stride defaults to the
    kernel size; ceil=true rounds the output size up, as PyTorch's ceil_mode; count_pad=false
    averages over the cells inside the input only, as count_include_pad=False)."""
    return _pool(ctx, x, "avg", kernel, stride, pad, ceil, count_pad)


@builtin("function")
def global_avgpool(ctx: LayerContext, x: Tensor) -> Value:
    """Mean over the spatial axes: [N, C, H, W] -> [N, C] (over time: [N, C, T] -> [N, C])."""
    if x.rank not in (3, 4):
        raise arg_error(f"`global_avgpool` needs an NCHW input of rank 4 (or [N, C, T]), got {x.type}", "x")
    _float(x, "global_avgpool")
    return ctx.b.mean(x, tuple(range(2, x.rank)))


@builtin("function")
def flatten(ctx: LayerContext, x: Tensor) -> Value:
    """[N, d1, d2, ...] -> [N, d1*d2*...]."""
    if x.rank < 2:
        raise arg_error(f"`flatten` needs a batch axis and at least one more, got {x.type}", "x")
    return ctx.b.reshape(x, (x.shape[0], numel(x.shape[1:])))


@builtin("layer")
def dropout(ctx: LayerContext, x: Tensor, p: float = 0.5) -> Value:
    """Zeroes each element with probability p while training (scaling the rest by 1/(1-p));
    the identity in evaluation."""
    if not 0.0 <= p < 1.0:
        raise arg_error(f"`dropout`: the rate `p` must be in [0, 1), got {p}", "p")
    if not ctx.training or p == 0.0:
        return x
    b = ctx.b
    seed, step, stream = ctx.rng()
    keep = b.ge(b.emit(ops.RANDOM, (seed, step), shape=tuple(x.shape), stream=stream), p)
    return b.where(keep, x * (1.0 / (1.0 - p)), 0.0)


@builtin("layer")
def batchnorm(ctx: LayerContext, x: Tensor, momentum: float = 0.1, eps: float = 1e-5, sync: bool = False) -> Value:
    """Batch normalization over axis 1 ([N, C] or [N, C, H, W]); batch statistics while
    training (updating running statistics), running statistics in evaluation. With
    sync=true, the statistics of a data-parallel job's global batch (summed over ranks),
    instead of each rank's shard's."""
    if x.rank not in (2, 4):
        raise arg_error(f"`batchnorm` needs [N, C] or [N, C, H, W], got {x.type}", "x")
    _float(x, "batchnorm", f32=True)
    if not 0.0 <= momentum <= 1.0:
        raise arg_error(f"`batchnorm`: argument `momentum` must be in [0, 1], got {momentum}", "momentum")
    if not eps > 0.0:
        raise arg_error(f"`batchnorm`: argument `eps` must be positive, got {eps}", "eps")
    b = ctx.b
    c = x.shape[1]
    if not isinstance(c, int):
        raise arg_error(f"`batchnorm` needs a known number of channels, got {x.type}", "x")
    gamma = ctx.param("gamma", (c,), ONES)
    beta = ctx.param("beta", (c,), ZEROS)
    run_mean = ctx.state("running_mean", (c,), ZEROS)
    run_var = ctx.state("running_var", (c,), ONES)
    axes = (0,) if x.rank == 2 else (0, 2, 3)

    def per_channel(v):
        return b.broadcast(v, x.shape, (1,))

    if ctx.training:
        if x.rank == 2 or x.shape[2:] == (1, 1):  # the trainer refuses batches of one: no variance
            b.graph.meta.setdefault("one_value_per_channel", b.span)
    if ctx.training and sync:
        # sums and counts over every rank's shard (a rank without samples this step counts 0)
        has = b.cast(b.gt(_hyper(b, "shard_weight", DType.f32), 0.0), DType.f32)
        n = b.emit(ops.ALLREDUCE, (b.size(x, axes) * has,))
        mean = b.emit(ops.ALLREDUCE, (b.sum(x, axes) * has,)) / n
        centered = x - per_channel(mean)
        var = b.emit(ops.ALLREDUCE, (b.sum(centered * centered, axes) * has,)) / n
        unbiased = var * n / b.maximum(n - 1.0, 1.0)
        ctx.update(run_mean, run_mean * (1.0 - momentum) + mean * momentum)
        ctx.update(run_var, run_var * (1.0 - momentum) + unbiased * momentum)
    elif ctx.training:
        mean = b.mean(x, axes)
        centered = x - per_channel(mean)
        var = b.mean(centered * centered, axes)
        n = b.size(x, axes)
        unbiased = var * n / b.maximum(n - 1.0, 1.0)
        ctx.update(run_mean, run_mean * (1.0 - momentum) + mean * momentum)
        ctx.update(run_var, run_var * (1.0 - momentum) + unbiased * momentum)
    else:
        centered, var = x - per_channel(run_mean), run_var
    scale = gamma / b.sqrt(var + eps)
    return centered * per_channel(scale) + per_channel(beta)


@builtin("layer")
def layernorm(ctx: LayerContext, x: Tensor, eps: float = 1e-5, axis: int = -1) -> Value:
    """Layer normalization over the last axis: each sample's (and time step's) features
    centered and scaled to unit variance, then times gamma plus beta ([F] each). With
    `axis`, over that axis and every one after it, gamma and beta shaped like them
    (axis=1 of an NCHW batch: over C, H and W, as PyTorch's LayerNorm([C, H, W])). The
    same computation in training and evaluation (no running statistics)."""
    _float(x, "layernorm", f32=True)
    if not eps > 0.0:
        raise arg_error(f"`layernorm`: argument `eps` must be positive, got {eps}", "eps")
    if not x.rank:
        raise arg_error(f"`layernorm` needs a tensor with features, got {x.type}", "x")
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.rank <= axis < x.rank or \
            axis % x.rank == 0 and x.rank > 1:
        raise arg_error(f"`layernorm`: argument `axis` must name an axis of {x.type} after the batch axis "
                        f"(the first), got {_show(axis)}", "axis",
                        hint="it normalizes over that axis and every one after it")
    shape = x.shape[axis % x.rank:]
    if not all(isinstance(d, int) for d in shape):
        raise arg_error(f"`layernorm` needs known sizes on the axes it normalizes, got {x.type}", "x")
    b = ctx.b
    over = -1 if len(shape) == 1 else tuple(range(axis % x.rank, x.rank))
    gamma = ctx.param("gamma", shape, ONES)
    beta = ctx.param("beta", shape, ZEROS)
    centered = x - b.mean(x, over, keepdims=True)
    var = b.mean(centered * centered, over, keepdims=True)
    return centered / b.sqrt(var + eps) * gamma + beta


@builtin("layer")
def groupnorm(ctx: LayerContext, x: Tensor, groups: int, eps: float = 1e-5, affine: bool = True) -> Value:
    """Group normalization (Wu and He): the channels of [N, C, ...] split into `groups`
    groups of consecutive channels, each sample's group centered and scaled to unit variance
    over its channels and positions, then times gamma plus beta ([C] each) unless
    affine=false. groups = C is instance normalization, groups = 1 a layer normalization over
    C and the rest with gamma and beta per channel. The same in training and evaluation."""
    _float(x, "groupnorm", f32=True)
    _positive(groups, "groups", "groupnorm")
    if not eps > 0.0:
        raise arg_error(f"`groupnorm`: argument `eps` must be positive, got {eps}", "eps")
    if x.rank < 2 or not all(isinstance(d, int) for d in x.shape[1:]):
        raise arg_error(f"`groupnorm` needs channels [N, C, ...] of known sizes, got {x.type}", "x")
    c, rest = x.shape[1], tuple(x.shape[2:])
    if c % groups:
        raise arg_error(f"`groupnorm`: {groups} groups do not divide the {c} channels of {x.type}", "groups")
    b = ctx.b
    g = b.reshape(x, (x.shape[0], groups, c // groups) + rest)
    over = tuple(range(2, g.rank))
    centered = g - b.mean(g, over, keepdims=True)
    var = b.mean(centered * centered, over, keepdims=True)
    y = b.reshape(centered / b.sqrt(var + eps), tuple(x.shape))
    if not affine:
        return y
    per_channel = (c,) + (1,) * len(rest)
    gamma = b.reshape(ctx.param("gamma", (c,), ONES), per_channel)
    beta = b.reshape(ctx.param("beta", (c,), ZEROS), per_channel)
    return y * gamma + beta


@builtin("layer")
def embedding(ctx: LayerContext, x: Tensor, vocab: int, dim: int, init: Init = Init("normal", (0.0, 1.0)),
              mask_zero: bool = False) -> Value:
    """Rows of a [vocab, dim] table picked by integer indices: i32[...] -> f32[..., dim].
    With mask_zero=true, index 0 is padding: the result carries the mask `x != 0`, which
    recurrent layers and losses respect."""
    _positive(vocab, "vocab", "embedding")
    _positive(dim, "dim", "embedding")
    if x.dtype != DType.i32:
        raise arg_error(f"`embedding` needs integer indices (i32), got {x.type}", "x")
    if mask_zero and x.rank != 2:
        raise arg_error(f"`embedding`: mask_zero=true needs [batch, time] indices, got {x.type}", "x")
    table = ctx.param("table", (vocab, dim), init, vocab, dim)
    out = ctx.b.emit(ops.TAKE, (table, x))
    if mask_zero:
        ctx.set_mask(out, ctx.b.ne(x, 0))
    return out


@builtin("function")
def padding_mask(ctx: LayerContext, x: Tensor, pad: float = 0) -> Value:
    """The steps that are not padding, bool [B, T]: for integer tokens [B, T], x != pad; for
    float sequences [B, T, F], the steps where some feature differs from pad (Keras' Masking)."""
    b = ctx.b
    if x.dtype == DType.i32:
        if x.rank != 2:
            raise arg_error(f"`padding_mask` needs tokens [batch, time] or a sequence [batch, time, "
                            f"features], got {x.type}", "x")
        if pad != int(pad):
            raise arg_error(f"`padding_mask`: the pad of integer tokens must be a whole number, got {pad}", "pad")
        return b.ne(x, int(pad))
    if not x.dtype.is_float or x.rank != 3:
        raise arg_error(f"`padding_mask` needs tokens [batch, time] or a sequence [batch, time, "
                        f"features], got {x.type}", "x")
    return b.gt(b.sum(b.cast(b.ne(x, pad), DType.i32), 2), 0)


def _sequence(x: Value, layer: str) -> int:
    _float(x, layer, f32=True)
    if x.rank != 3 or not isinstance(x.shape[1], int):
        raise arg_error(f"`{layer}` needs a [batch, time, features] input with a known number of "
                        f"time steps, got {x.type}", "x")
    return x.shape[1]


def _step_mask(ctx: LayerContext, x: Value, layer: str, mask: Optional[Value]) -> Optional[Value]:
    """The bool [B, T] mask a recurrent layer follows: `mask=`, else the one its input carries."""
    if mask is None:
        return ctx.mask_of(x)
    if mask.dtype != DType.bool or tuple(mask.shape) != tuple(x.shape[:2]):
        raise arg_error(f"`{layer}`: `mask` must be a bool [batch, time] tensor, bool[{x.shape[0]},"
                        f"{x.shape[1]}] here, got {mask.type}", "mask",
                        hint="padding_mask(tokens) gives one; true marks a real step, false padding")
    return mask


def _initial_states(ctx: LayerContext, layer: str, initial, n_states: int, count: int, x: Value,
                    hidden: int) -> list:
    """`initial=` as one list of carries per layer-direction (None: zeros). A state is
    [layers·directions, B, hidden], index layer·directions + direction (PyTorch's h_0),
    or [B, hidden] when there is one layer and one direction."""
    if initial is None:
        return [None] * count
    parts = list(initial) if isinstance(initial, (tuple, list)) else [initial]
    want = "a pair (h0, c0) of tensors" if n_states == 2 else "one tensor h0"
    if len(parts) != n_states or not all(isinstance(p, Value) for p in parts):
        raise arg_error(f"`{layer}`: `initial` must be {want}, got {_show(initial)}", "initial")
    batch = x.shape[0]
    stacked = (count, batch, hidden)
    for name, p in zip(("h0", "c0"), parts):
        if p.dtype != DType.f32 or (tuple(p.shape) != stacked and not (count == 1 and tuple(p.shape) == (batch, hidden))):
            shapes = f"f32[{batch},{hidden}] (or f32[1,{batch},{hidden}])" if count == 1 else \
                f"f32[{count},{batch},{hidden}] ([layers·directions, batch, hidden])"
            raise arg_error(f"`{layer}`: the initial state {name} must be {shapes}, got {p.type}", "initial")
    b = ctx.b
    return [[p if p.rank == 2 else b.take_axis(p, 0, i) for p in parts] for i in range(count)]


def _finish_step(sb: GraphBuilder, old: list, new: list, m: Optional[Value]) -> tuple[list, list]:
    """A step's carries and output. Masked, a padded step (m false) keeps every carry as it
    was and outputs zeros: `where(m_t, new, old)`."""
    if m is None:
        return new, [new[0]]
    keep = sb.broadcast(m, new[0].shape, (0,))
    return [sb.where(keep, n, o) for n, o in zip(new, old)], [sb.where(keep, new[0], 0.0)]


def _recurrent(ctx: LayerContext, x: Value, layer: str, hidden: int, return_sequences: bool, layers: int,
               bidirectional: bool, dropout_p: float, cell, initial=None, return_state: bool = False,
               mask: Optional[Value] = None, n_states: int = 1):
    """The layer around a cell: time-major stacking, directions, dropout between layers,
    initial and final states, masks.

    `cell(seq, suffix, reverse, init, mseq) -> (hs [T, B, hidden], final carries)` runs one
    direction of one layer over a time-major sequence [T, B, F] as one scan, from the
    carries `init` (None: zeros) and following the time-major mask `mseq` [T, B] (None: every
    step is real), creating its parameters with the name suffix: "" (first layer), "_l1",
    "_l2", ... for the layers above, and "_rev" more for the reverse direction (PyTorch's
    `_reverse`)."""
    _positive(hidden, "hidden", layer)
    _positive(layers, "layers", layer)
    if not 0.0 <= dropout_p < 1.0:
        raise arg_error(f"`{layer}`: the rate `dropout` must be in [0, 1), got {dropout_p}", "dropout")
    _sequence(x, layer)
    _features(x, layer)
    b = ctx.b
    dirs = 2 if bidirectional else 1
    m = _step_mask(ctx, x, layer, mask)
    inits = _initial_states(ctx, layer, initial, n_states, layers * dirs, x, hidden)
    mseq = b.permute(m, (1, 0)) if m is not None else None
    seq = b.permute(x, (1, 0, 2))  # time-major: a scan slices its sequences along axis 0
    finals: list[list[Value]] = []  # per layer-direction, its final carries
    for depth in range(layers):
        if depth and dropout_p:
            seq = dropout(ctx, seq, dropout_p)  # between layers, while training (as PyTorch)
        outs = []
        for reverse in ((False, True) if bidirectional else (False,)):
            suffix = (f"_l{depth}" if depth else "") + ("_rev" if reverse else "")
            hs, last = cell(seq, suffix, reverse, inits[len(finals)], mseq)
            outs.append(hs)
            finals.append(last)
        seq = b.concat(outs, axis=2)
    if return_sequences:
        out = b.permute(seq, (1, 0, 2))
        ctx.set_mask(out, m)
    else:
        out = b.concat([f[0] for f in finals[-dirs:]], axis=1)
    if not return_state:
        return out

    def stack(vs):
        return vs[0] if len(vs) == 1 else b.concat([b.reshape(v, (1,) + tuple(v.shape)) for v in vs], axis=0)

    states = [stack([f[k] for f in finals]) for k in range(n_states)]
    return (out, states[0]) if n_states == 1 else (out, tuple(states))


_RECURRENT_DOC = """
    Options: `layers` stacks that many layers, each reading the previous one's outputs;
    `bidirectional=true` adds a second scan over reversed time per layer, with outputs
    concatenated on the feature axis ([forward, reverse], 2*hidden features, as PyTorch);
    `dropout` is the rate of dropout between stacked layers while training. Without
    return_sequences the result is the final state of each direction ([forward final,
    reverse final]: the reverse scan's final state is the one after reading x_0).
    Parameters of layer k > 0 and of the reverse direction are named with the suffixes
    _l<k> and _rev (w_l1, w_rev, w_l1_rev); each layer-direction is one loop (scan).
    States: `initial` starts the carries (zeros by default) and `return_state=true` returns
    the final ones too, each [B, hidden] for one layer and direction, else stacked
    [layers·directions, B, hidden] (index layer·directions + direction, PyTorch's order).
    Masks: `mask` (bool [B, T]; by default the mask the input carries, as from
    embedding(mask_zero=true)) marks real steps; at a padded step every carry stays as it
    was and the output is zero, so the final state is the one after the last real step."""


def _scan_carries(b: GraphBuilder, init, batch, hidden: int, n: int) -> list:
    return list(init) if init is not None else [b.full(0.0, (batch, hidden)) for _ in range(n)]


RNN_ACTIVATIONS = ("tanh", "relu")


def rnn(ctx: LayerContext, x: Tensor, hidden: int, return_sequences: bool = False, layers: int = 1,
        bidirectional: bool = False, dropout: float = 0.0, init: Init = GLOROT_UNIFORM,
        initial: Optional[States] = None, return_state: bool = False, mask: Optional[Tensor] = None,
        activation: str = "tanh"):
    b = ctx.b
    if activation not in RNN_ACTIVATIONS:
        raise arg_error(f"`rnn`: argument `activation` must be \"tanh\" or \"relu\", got \"{activation}\"",
                        "activation")

    def cell(seq, suffix, reverse, start, mseq):
        n_in = seq.shape[2]
        wx = ctx.param("wx" + suffix, (n_in, hidden), init, n_in, hidden)
        wh = ctx.param("wh" + suffix, (hidden, hidden), init, hidden, hidden)
        bias = ctx.param("b" + suffix, (hidden,), ZEROS)
        xw = _matmul_last(b, seq, wx) + bias  # every time step's input projection in one matmul

        def step(sb, hs, xs, ws):
            z = xs[0] + sb.matmul(hs[0], ws[0])
            h = sb.tanh(z) if activation == "tanh" else sb.maximum(z, 0.0)
            return _finish_step(sb, hs, [h], xs[1] if len(xs) > 1 else None)

        last, (hs,) = b.scan(step, _scan_carries(b, start, seq.shape[1], hidden, 1),
                             [xw] + ([mseq] if mseq is not None else []), [wh], reverse=reverse,
                             name="rnn_step")
        return hs, last

    return _recurrent(ctx, x, "rnn", hidden, return_sequences, layers, bidirectional, dropout, cell,
                      initial, return_state, mask)


rnn.__doc__ = """Elman RNN: h_t = tanh(x_t @ wx + h_{t-1} @ wh + b), h_0 = 0 (relu instead of
    tanh with activation="relu", PyTorch's nonlinearity='relu'). Returns the last
    state [B, hidden], or all of them [B, T, hidden] with return_sequences=true; with
    return_state=true, the pair (that, final h).""" + _RECURRENT_DOC
builtin("layer")(rnn)  # registered once documented


def lstm(ctx: LayerContext, x: Tensor, hidden: int, return_sequences: bool = False, layers: int = 1,
         bidirectional: bool = False, dropout: float = 0.0, init: Init = GLOROT_UNIFORM,
         initial: Optional[States] = None, return_state: bool = False, mask: Optional[Tensor] = None):
    b = ctx.b

    def cell(seq, suffix, reverse, start, mseq):
        n_in = seq.shape[2]
        w = ctx.param("w" + suffix, (n_in, 4 * hidden), init, n_in, 4 * hidden)
        u = ctx.param("u" + suffix, (hidden, 4 * hidden), init, hidden, 4 * hidden)
        bias = ctx.param("b" + suffix, (4 * hidden,), ZEROS)
        xw = _matmul_last(b, seq, w) + bias

        def step(sb, hc, xs, ws):
            h, c = hc
            z = xs[0] + sb.matmul(h, ws[0])
            rows = z.shape[0]

            def gate(k):
                return sb.slice(z, (0, k * hidden), (rows, (k + 1) * hidden))

            i, f, g, o = sb.sigmoid(gate(0)), sb.sigmoid(gate(1)), sb.tanh(gate(2)), sb.sigmoid(gate(3))
            c_new = f * c + i * g
            h_new = o * sb.tanh(c_new)
            return _finish_step(sb, [h, c], [h_new, c_new], xs[1] if len(xs) > 1 else None)

        last, (hs,) = b.scan(step, _scan_carries(b, start, seq.shape[1], hidden, 2),
                             [xw] + ([mseq] if mseq is not None else []), [u], reverse=reverse,
                             name="lstm_step")
        return hs, last

    return _recurrent(ctx, x, "lstm", hidden, return_sequences, layers, bidirectional, dropout, cell,
                      initial, return_state, mask, n_states=2)


lstm.__doc__ = """LSTM with gates (i, f, g, o) packed along the last axis of w [in, 4h] and u [h, 4h]:
    c_t = f * c_{t-1} + i * g, h_t = o * tanh(c_t), h_0 = c_0 = 0 (PyTorch's equations; b is
    PyTorch's b_ih + b_hh). Returns the last hidden state [B, hidden], or all of them with
    return_sequences=true; with return_state=true, the pair (that, (final h, final c)), and
    `initial` is the pair (h0, c0).""" + _RECURRENT_DOC
builtin("layer")(lstm)  # registered once documented


def gru(ctx: LayerContext, x: Tensor, hidden: int, return_sequences: bool = False, layers: int = 1,
        bidirectional: bool = False, dropout: float = 0.0, init: Init = GLOROT_UNIFORM,
        initial: Optional[States] = None, return_state: bool = False, mask: Optional[Tensor] = None):
    b = ctx.b

    def cell(seq, suffix, reverse, start, mseq):
        n_in = seq.shape[2]
        w = ctx.param("w" + suffix, (n_in, 3 * hidden), init, n_in, 3 * hidden)
        u = ctx.param("u" + suffix, (hidden, 3 * hidden), init, hidden, 3 * hidden)
        bias = ctx.param("b" + suffix, (3 * hidden,), ZEROS)
        bias_h = ctx.param("bh" + suffix, (3 * hidden,), ZEROS)
        xw = _matmul_last(b, seq, w) + bias

        def step(sb, hs, xs, ws):
            (h,), xw_t, (u_, bh) = hs, xs[0], ws
            hu = sb.matmul(h, u_) + bh
            rows = h.shape[0]

            def part(v, k):
                return sb.slice(v, (0, k * hidden), (rows, (k + 1) * hidden))

            r = sb.sigmoid(part(xw_t, 0) + part(hu, 0))
            z = sb.sigmoid(part(xw_t, 1) + part(hu, 1))
            n = sb.tanh(part(xw_t, 2) + r * part(hu, 2))
            h_new = (1.0 - z) * n + z * h
            return _finish_step(sb, [h], [h_new], xs[1] if len(xs) > 1 else None)

        last, (hs,) = b.scan(step, _scan_carries(b, start, seq.shape[1], hidden, 1),
                             [xw] + ([mseq] if mseq is not None else []), [u, bias_h],
                             reverse=reverse, name="gru_step")
        return hs, last

    return _recurrent(ctx, x, "gru", hidden, return_sequences, layers, bidirectional, dropout, cell,
                      initial, return_state, mask)


gru.__doc__ = """GRU in PyTorch's convention, gates (r, z, n) packed along the last axis of
    w [in, 3h], u [h, 3h] and the biases b (input side) and bh (hidden side), [3h] each:
    r = sigmoid(x_t w_r + b_r + h u_r + bh_r), z = sigmoid(x_t w_z + b_z + h u_z + bh_z),
    n = tanh(x_t w_n + b_n + r * (h u_n + bh_n)), h_t = (1 - z) * n + z * h_{t-1}, h_0 = 0
    (w, u are PyTorch's weight_ih, weight_hh transposed; b, bh its bias_ih, bias_hh).
    Returns the last state [B, hidden], or all of them with return_sequences=true; with
    return_state=true, the pair (that, final h).""" + _RECURRENT_DOC
builtin("layer")(gru)  # registered once documented


# --- activations ----------------------------------------------------------------------------

@builtin("activation")
def relu(ctx: LayerContext, x: Tensor) -> Value:
    """max(x, 0)"""
    return ctx.b.maximum(x, 0.0)


@builtin("activation")
def leaky_relu(ctx: LayerContext, x: Tensor, alpha: float = 0.01) -> Value:
    """x where x > 0, else alpha * x"""
    b = ctx.b
    return b.where(b.gt(x, 0.0), x, x * alpha)


@builtin("activation")
def sigmoid(ctx: LayerContext, x: Tensor) -> Value:
    """1 / (1 + exp(-x))"""
    return ctx.b.sigmoid(x)


@builtin("activation")
def tanh(ctx: LayerContext, x: Tensor) -> Value:
    """hyperbolic tangent"""
    return ctx.b.tanh(x)


def _log_softmax(b: GraphBuilder, x: Value, axis: int) -> Value:
    # Subtracting the (gradient-free) max keeps exp in range; it cancels mathematically.
    shifted = x - b.stop_gradient(b.max(x, axis, keepdims=True))
    return shifted - b.log(b.sum(b.exp(shifted), axis, keepdims=True))


@builtin("activation")
def log_softmax(ctx: LayerContext, x: Tensor, axis: int = -1) -> Value:
    """x - log(sum(exp(x))) along axis, computed stably"""
    _float(x, "log_softmax")
    return _log_softmax(ctx.b, x, axis)


@builtin("activation")
def softmax(ctx: LayerContext, x: Tensor, axis: int = -1) -> Value:
    """exp(x) / sum(exp(x)) along axis, computed stably"""
    _float(x, "softmax")
    b = ctx.b
    e = b.exp(x - b.stop_gradient(b.max(x, axis, keepdims=True)))
    return e / b.sum(e, axis, keepdims=True)


@builtin("function")
def attention(ctx: LayerContext, q: Tensor, k: Tensor, v: Tensor, causal: bool = False,
              scale: Optional[float] = None) -> Value:
    """Scaled dot-product attention over the last two axes: softmax(q @ kᵀ · scale) @ v, with
    q [..., Tq, d], k [..., Tk, d], v [..., Tk, dv] -> [..., Tq, dv] (scale 1/√d unless
    given); with causal=true, query i sees keys 0..i only (a decoder's self-attention)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.rank < 3:
            raise arg_error(f"`attention`: `{name}` needs a stack of matrices [..., T, d] of rank 3 or more, "
                            f"got {t.type}", name)
        _float(t, "attention", arg=name)
    lead = tuple(q.shape[:-2])
    if tuple(k.shape[:-2]) != lead or tuple(v.shape[:-2]) != lead or k.dtype != q.dtype or v.dtype != q.dtype:
        raise arg_error(f"`attention`: q, k and v need the same leading axes and dtype, got {q.type}, {k.type} "
                        f"and {v.type}", "k")
    if k.shape[-1] != q.shape[-1]:
        raise arg_error(f"`attention`: queries and keys need the same width, got {q.type} and {k.type}", "k")
    if v.shape[-2] != k.shape[-2]:
        raise arg_error(f"`attention`: there must be a value per key, got {k.type} and {v.type}", "v")
    if scale is not None and not (scale > 0 and math.isfinite(scale)):
        raise arg_error(f"`attention`: `scale` must be a positive number, got {scale}", "scale")
    b = ctx.b
    swap = list(range(k.rank - 2)) + [k.rank - 1, k.rank - 2]
    scores = _batch_matmul(b, q, b.permute(k, swap)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:  # a key after the query gets a score that exp takes to 0 (-inf would make inf - inf)
        steps = tuple(scores.shape[-2:])
        later = b.gt(b.iota(steps, 1), b.iota(steps, 0))
        later = b.broadcast(later, tuple(scores.shape), (scores.rank - 2, scores.rank - 1))
        scores = b.where(later, b.lift(-1e30, scores.dtype), scores)
    return _batch_matmul(b, softmax(ctx, scores), v)


def _straight_through(b: GraphBuilder, x: Value, y: Value) -> Value:
    """y forward, with the gradient of the identity: y + (x - stop_gradient(x)). The difference
    is exactly 0 for every finite x, so the forward value is y itself, bit for bit."""
    return y + (x - b.stop_gradient(x))


@builtin("activation")
def step(ctx: LayerContext, x: Tensor) -> Value:
    """Heaviside step: 1 where x > 0, else 0. Its true derivative is 0 (almost everywhere), which
    would train nothing below it; its gradient here is the identity's (straight-through), which
    with `perceptron()` gives Rosenblatt's rule."""
    _float(x, "step")
    return _straight_through(ctx.b, x, ctx.b.cast(ctx.b.gt(x, 0.0), x.dtype))


@builtin("activation")
def sign(ctx: LayerContext, x: Tensor) -> Value:
    """-1, 0 or 1 by the sign of x; gradient straight through, as `step`'s."""
    _float(x, "sign")
    return _straight_through(ctx.b, x, ctx.b.sign(x))


GELU_FORMS = ("tanh", "none")


@builtin("activation")
def gelu(ctx: LayerContext, x: Tensor, approximate: str = "tanh") -> Value:
    """Gaussian error linear unit: its tanh approximation, or with approximate="none" the
    exact x·Φ(x) through erf (PyTorch's default form)"""
    _float(x, "gelu")
    if approximate not in GELU_FORMS:
        raise arg_error(f"`gelu`: argument `approximate` must be \"tanh\" or \"none\", got {_show(approximate)}",
                        "approximate")
    if approximate == "none":
        return x * 0.5 * (_erf(ctx.b, x * math.sqrt(0.5)) + 1.0)
    inner = (x + x * x * x * 0.044715) * math.sqrt(2.0 / math.pi)
    return x * 0.5 * (ctx.b.tanh(inner) + 1.0)


@builtin("function")
def erf(ctx: LayerContext, x: Tensor) -> Value:
    """The error function, 2/√π ∫₀ˣ e^(−t²) dt (absolute error below 2e-7 in float32)"""
    _float(x, "erf")
    return _erf(ctx.b, x)


# Abramowitz & Stegun 7.1.26: erf(a) = 1 - t·P(t)·e^(-a²), t = 1/(1 + p·a), for a >= 0
ERF_P, ERF_COEFFS = 0.3275911, (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)


def _erf(b: GraphBuilder, x: Value) -> Value:
    """erf from exp and arithmetic, so every backend and the exporter have it. Its gradient is
    the exact 2/√π·e^(−x²): the formula's own derivative is off by up to 1e-3 (its kink at 0)."""
    e = b.exp(-(x * x))
    t = 1.0 / (b.abs(x) * ERF_P + 1.0)
    poly = t * ERF_COEFFS[0]
    for c in ERF_COEFFS[1:]:
        poly = (poly + c) * t
    value = b.sign(x) * (1.0 - poly * e)
    return b.stop_gradient(value) + (x - b.stop_gradient(x)) * b.stop_gradient(e * (2.0 / math.sqrt(math.pi)))


@builtin("activation")
def elu(ctx: LayerContext, x: Tensor, alpha: float = 1.0) -> Value:
    """x where x > 0, else alpha * (exp(x) - 1)"""
    _float(x, "elu")
    return _elu(ctx.b, x, alpha)


def _elu(b: GraphBuilder, x: Value, alpha: float) -> Value:
    # relu(x) + alpha * (exp(min(x, 0)) - 1): exactly x above 0, and exp never overflows
    # (nor does its gradient, which a select would still compute for the branch not taken)
    return b.maximum(x, 0.0) + (b.exp(b.minimum(x, 0.0)) - 1.0) * alpha


SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805


@builtin("activation")
def selu(ctx: LayerContext, x: Tensor) -> Value:
    """scale * elu(x, alpha) with the self-normalizing constants (alpha 1.6733, scale 1.0507)"""
    _float(x, "selu")
    return _elu(ctx.b, x, SELU_ALPHA) * SELU_SCALE


@builtin("activation")
def softplus(ctx: LayerContext, x: Tensor) -> Value:
    """log(1 + exp(x)), computed stably"""
    _float(x, "softplus")
    b = ctx.b
    # relu(x) + log(1 + exp(-|x|)): the same function, with exp never above 1
    return b.maximum(x, 0.0) + b.log(b.exp(-b.abs(x)) + 1.0)


@builtin("activation")
def silu(ctx: LayerContext, x: Tensor) -> Value:
    """x * sigmoid(x) (also called swish)"""
    _float(x, "silu")
    return x * ctx.b.sigmoid(x)


# --- math functions -------------------------------------------------------------------------

def _unary(name, doc, method):
    def fn(ctx: LayerContext, x: Tensor) -> Value:
        return getattr(ctx.b, method)(x)
    fn.__name__, fn.__doc__ = name, doc
    return builtin("function")(fn)


_unary("exp", "e to the x, elementwise", "exp")
_unary("log", "natural logarithm, elementwise", "log")
_unary("sqrt", "square root, elementwise", "sqrt")
_unary("abs", "absolute value, elementwise", "abs")


def _axes(axis):
    if axis is None:
        return None
    if isinstance(axis, list) and not all(isinstance(a, int) and not isinstance(a, bool) for a in axis):
        raise arg_error(f"`axis` must be an integer or a list of integers, got {_show(axis)}", "axis")
    return axis if isinstance(axis, int) else tuple(axis)


@builtin("function", name="sum")
def sum_(ctx: LayerContext, x: Tensor, axis: Optional[Union[int, list]] = None, keepdims: bool = False) -> Value:
    """Sum over axis (all axes when omitted); booleans are counted (as i32)."""
    if x.dtype == DType.bool:
        x = ctx.b.cast(x, DType.i32)
    return ctx.b.sum(x, _axes(axis), keepdims)


@builtin("function")
def mean(ctx: LayerContext, x: Tensor, axis: Optional[Union[int, list]] = None, keepdims: bool = False) -> Value:
    """Mean over axis (all axes when omitted)."""
    _float(x, "mean")
    return ctx.b.mean(x, _axes(axis), keepdims)


@builtin("function", name="max")
def max_(ctx: LayerContext, x: Tensor, axis: Optional[Union[int, list]] = None, keepdims: bool = False) -> Value:
    """Maximum over axis (all axes when omitted)."""
    return ctx.b.max(x, _axes(axis), keepdims)


@builtin("function", name="min")
def min_(ctx: LayerContext, x: Tensor, axis: Optional[Union[int, list]] = None, keepdims: bool = False) -> Value:
    """Minimum over axis (all axes when omitted)."""
    if x.dtype == DType.bool:
        raise arg_error(f"`min` needs numbers, got {x.type}", "x")
    return -ctx.b.max(-x, _axes(axis), keepdims)


@builtin("function")
def stop_gradient(ctx: LayerContext, x: Tensor) -> Value:
    """x, through which no gradient flows: what is computed from x is not trained through it."""
    return ctx.b.stop_gradient(x)


@builtin("function")
def maximum(ctx: LayerContext, x: Tensor, y: Union[Tensor, float]) -> Value:
    """Elementwise maximum of two tensors (or a tensor and a number)."""
    return ctx.b.maximum(x, y)


@builtin("function")
def minimum(ctx: LayerContext, x: Tensor, y: Union[Tensor, float]) -> Value:
    """Elementwise minimum of two tensors (or a tensor and a number)."""
    return ctx.b.minimum(x, y)


@builtin("function")
def where(ctx: LayerContext, cond: Tensor, x: Union[Tensor, float], y: Union[Tensor, float]) -> Value:
    """x where cond is true, else y, elementwise (numpy's broadcasting); cond is a bool tensor,
    such as `h > 0`. The gradient flows to x where cond holds and to y elsewhere."""
    if cond.dtype != DType.bool:
        raise arg_error(f"`where`: argument `cond` must be a bool tensor (a comparison such as `x > 0`), "
                        f"got {cond.type}", "cond")
    tensors = [v for v in (x, y) if isinstance(v, Value)]
    if len({t.dtype for t in tensors}) > 1:
        raise arg_error(f"`where` selects between values of one dtype, got {x.type} and {y.type}", "y")
    if not tensors:
        x = ctx.b.const(float(x))
    return ctx.b.where(cond, x, y)


def _bools(name: str, *xs: Value) -> None:
    for arg, x in zip(("a", "b"), xs):
        if x.dtype != DType.bool:
            raise arg_error(f"`{name}` needs bool tensors (comparisons such as `x > 0`), got {x.type}", arg)


@builtin("function")
def logical_and(ctx: LayerContext, a: Tensor, b: Tensor) -> Value:
    """True where both bool tensors are, elementwise (numpy's broadcasting)."""
    _bools("logical_and", a, b)
    return ctx.b.where(a, b, False)


@builtin("function")
def logical_or(ctx: LayerContext, a: Tensor, b: Tensor) -> Value:
    """True where either bool tensor is, elementwise (numpy's broadcasting)."""
    _bools("logical_or", a, b)
    return ctx.b.where(a, True, b)


@builtin("function")
def logical_not(ctx: LayerContext, a: Tensor) -> Value:
    """True where the bool tensor is false."""
    _bools("logical_not", a)
    return ctx.b.where(a, False, ctx.b.const(True, DType.bool))


@builtin("function")
def clip(ctx: LayerContext, x: Tensor, lo: float, hi: float) -> Value:
    """Limits every element to [lo, hi]."""
    return ctx.b.minimum(ctx.b.maximum(x, lo), hi)


@builtin("function")
def reshape(ctx: LayerContext, x: Tensor, shape: list) -> Value:
    """Reshape to `shape` (one entry may be -1; the batch keeps its symbol)."""
    return ctx.b.reshape(x, _reshape_target(x, shape))


@builtin("function")
def broadcast_to(ctx: LayerContext, x: Tensor, shape: list) -> Value:
    """x repeated along its axes of size 1 and new leading axes, to `shape` (numpy's broadcast_to)."""
    if not all(isinstance(d, Sym) or isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape):
        raise arg_error(f"`broadcast_to`: a dimension must be a positive integer or a symbol, got {_show(shape)}",
                        "shape")
    try:
        fits = len(shape) >= x.rank and broadcast_shapes(x.shape, tuple(shape)) == tuple(shape)
    except ShapeError:
        fits = False
    if not fits:
        raise arg_error(f"`broadcast_to`: {x.type} does not broadcast to {_show(shape)} (each of its axes, "
                        "aligned from the last, must be 1 or the size there)", "shape")
    return ctx.b.broadcast(x, tuple(shape))


@builtin("function")
def upsample(ctx: LayerContext, x: Tensor, scale: Pair = 2) -> Value:
    """Nearest-neighbour upsampling of NCHW (or [N, C, T]) input by whole factors: each cell
    repeated scale times along each spatial axis (PyTorch's Upsample(mode="nearest"))."""
    if x.rank not in (3, 4):
        raise arg_error(f"`upsample` needs an NCHW or [N, C, T] input, got {x.type}", "x")
    if not all(isinstance(d, int) for d in x.shape[1:]):
        raise arg_error(f"`upsample` needs known channels and sizes, got {x.type}", "x")
    factors = pair(scale) if x.rank == 4 else (scale,)
    if len(factors) != x.rank - 2 or not all(isinstance(f, int) and not isinstance(f, bool) and f >= 1
                                             for f in factors):
        raise arg_error("`upsample`: argument `scale` must be a positive integer"
                        + (" or [h, w]" if x.rank == 4 else "") + f", got {_show(scale)}", "scale")
    b, (n, c), sizes = ctx.b, x.shape[:2], x.shape[2:]
    spread = (n, c) + tuple(d for size in sizes for d in (size, 1))  # [N, C, H, 1, W, 1]
    repeated = (n, c) + tuple(d for size, f in zip(sizes, factors) for d in (size, f))
    return b.reshape(b.broadcast(b.reshape(x, spread), repeated),
                     (n, c) + tuple(size * f for size, f in zip(sizes, factors)))


@builtin("function")
def transpose(ctx: LayerContext, x: Tensor, perm: Optional[list] = None) -> Value:
    """Permute axes (reverses them when perm is omitted)."""
    perm = list(range(x.rank))[::-1] if perm is None else perm
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in perm) or \
            sorted(perm) != list(range(x.rank)):
        raise arg_error(f"`transpose`: {_show(perm)} is not a permutation of the axes of {x.type}", "perm")
    return ctx.b.permute(x, perm)


@builtin("function")
def pad(ctx: LayerContext, x: Tensor, lo: list, hi: list, value: float = 0.0, mode: str = "constant") -> Value:
    """x with lo[i] cells before and hi[i] after it on axis i (a list per axis; the batch axis
    gets none): `value` in them, or x's own cells mirrored ("reflect"), repeated from its edge
    ("edge") or from its other end ("wrap")"""
    if mode not in PAD_MODES:
        hint = {"replicate": "edge", "circular": "wrap"}.get(mode)
        choices = ", ".join(f'"{m}"' for m in PAD_MODES)
        raise arg_error(f"`pad`: argument `mode` must be one of {choices}, got {_show(mode)}"
                        + (f" (PyTorch's {mode} is \"{hint}\" here)" if hint else ""), "mode")
    for what, v in (("lo", lo), ("hi", hi)):
        if not isinstance(v, list) or len(v) != x.rank or \
                not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v):
            raise arg_error(f"`pad`: argument `{what}` must list a count of cells (0 or more) for each of the "
                            f"{x.rank} axes of {x.type}, got {_show(v)}", what)
    if x.rank > 1 and (lo[0] or hi[0]):
        raise arg_error(f"`pad` adds no samples: the batch axis (the first) takes 0 cells, got {lo[0]} and "
                        f"{hi[0]}", "lo" if lo[0] else "hi")
    if not all(isinstance(d, int) for i, d in enumerate(x.shape) if lo[i] or hi[i]):
        raise arg_error(f"`pad` needs known sizes on the axes it pads, got {x.type}", "x")
    if mode == "constant":
        return ctx.b.pad(x, tuple(lo), tuple(hi), value=float(value))
    if value != 0.0:
        raise arg_error(f"`pad`: a `value` fills only mode \"constant\"; mode \"{mode}\" reuses x's cells", "value")
    for axis, n in enumerate(x.shape):
        if not (lo[axis] or hi[axis]):
            continue
        most = n - 1 if mode == "reflect" else n  # cells of x that can be reused
        if mode != "edge" and max(lo[axis], hi[axis]) > most:
            raise arg_error(f"`pad`: mode \"{mode}\" takes at most {most} cells on axis {axis} of {x.type}, got "
                            f"{max(lo[axis], hi[axis])}", "lo" if lo[axis] > hi[axis] else "hi")
        x = _pad_from_cells(ctx.b, x, axis, lo[axis], hi[axis], mode)
    return x


PAD_MODES = ("constant", "reflect", "edge", "wrap")


def _pad_from_cells(b, x: Value, axis: int, lo: int, hi: int, mode: str) -> Value:
    """One axis padded with x's own cells, as slices of it joined by a concat (so autodiff,
    every backend and export have it already)."""
    n = x.shape[axis]

    def cells(start: int, stop: int) -> Value:
        return b.slice(x, [start if i == axis else 0 for i in range(x.rank)],
                       [stop if i == axis else d for i, d in enumerate(x.shape)])

    if mode == "wrap":
        before, after = [cells(n - lo, n)] if lo else [], [cells(0, hi)] if hi else []
    elif mode == "edge":  # (the edge cell concatenated, not broadcast: an ONNX Expand would not import back)
        before, after = [cells(0, 1)] * lo, [cells(n - 1, n)] * hi
    else:  # reflect: the cells next to the edge, mirrored, the edge itself not repeated
        before = [cells(k, k + 1) for k in range(lo, 0, -1)]
        after = [cells(k, k + 1) for k in range(n - 2, n - 2 - hi, -1)]
    return b.concat(before + [x] + after, axis)


@builtin("function")
def concat(ctx: LayerContext, xs: list, axis: int = -1) -> Value:
    """Joins a list of tensors along axis."""
    if not xs or not all(isinstance(v, Value) for v in xs):
        raise arg_error("`concat` needs a non-empty list of tensors", "xs")
    if not -xs[0].rank <= axis < xs[0].rank:
        raise arg_error(f"`concat`: axis {axis} is out of range for {xs[0].type}", "axis")
    return ctx.b.concat(xs, axis % xs[0].rank)


def _reshape_target(x: Value, shape: list) -> tuple:
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, (int, Sym)) or (isinstance(d, int) and d < 1 and d != -1):
            raise arg_error(f"`reshape`: a dimension must be a positive integer, a symbol or -1, "
                            f"got {_show(d)}", "shape")
    if shape.count(-1) > 1:
        raise arg_error("`reshape`: only one dimension can be -1", "shape")
    known = 1
    for d in shape:
        if d != -1:
            known = dim_mul(known, d)
    total = numel(x.shape)
    if -1 in shape:
        rest = dim_div(total, known)
        if rest is None:
            raise arg_error(f"`reshape`: cannot reshape {x.type} into {_show(shape)}", "shape")
        shape = [rest if d == -1 else d for d in shape]
    return tuple(shape)


# --- losses and regularizers ----------------------------------------------------------------

def _show(v) -> str:
    """A .dln-looking rendering of an argument value: `[B, 5, -1]`, `"a"`."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show(d) for d in v) + "]"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Value):
        return f"a tensor {v.type}"
    return str(v)


def _same_shape(name, output: Value, target: Value):
    if output.shape != target.shape:
        raise ArgumentError(f"`{name}`: output {output.type} and target {target.type} have different shapes")


def _loss_mask(ctx: LayerContext, name: str, x: Value, mask: Optional[Value], positions: tuple) -> Optional[Value]:
    """The bool mask of the positions a loss averages over: `mask=`, else the one `x` carries
    (the output of a model whose sequences came from embedding(mask_zero=true)). Its shape
    is a prefix of `positions` (the loss's per-position shape); None: every position."""
    explicit = mask is not None
    mask = mask if explicit else ctx.mask_of(x)
    if mask is None:
        return None
    if mask.dtype != DType.bool or tuple(mask.shape) != tuple(positions[:mask.rank]):
        if not explicit:
            return None  # the value kept a mask its shape no longer fits
        want = "[" + ", ".join(str(d) for d in positions[:2]) + "]"
        raise arg_error(f"`{name}`: `mask` must be bool {want} (the positions the loss averages "
                        f"over), got {mask.type}", "mask")
    ctx.used_loss_mask(mask)
    return mask


def _masked_mean(b: GraphBuilder, values: Value, mask: Optional[Value]) -> Value:
    """The mean of `values` over the positions `mask` keeps (its shape a prefix of theirs):
    sum(where(mask, values, 0)) / max(count, 1). A batch of padding only gives 0."""
    if mask is None:
        return b.mean(values)
    keep = b.broadcast(mask, values.shape, tuple(range(mask.rank)))
    total = b.sum(b.where(keep, values, 0.0))
    count = b.sum(b.cast(keep, values.dtype))
    mean = total / b.maximum(count, 1.0)
    # a mean over positions, not samples: a data-parallel job's ranks share it out by their
    # kept positions (passes/data_parallel.py)
    b.graph.meta["masked_means"] = b.graph.meta.get("masked_means", ()) + (mean.id,)
    return mean


@builtin("loss")
def mse(ctx: LayerContext, output: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Value:
    """Mean squared error over all elements (over the unmasked steps, given a mask)."""
    _float(output, "mse", arg="output")
    _same_shape("mse", output, target)
    d = output - target
    return _masked_mean(ctx.b, d * d, _loss_mask(ctx, "mse", output, mask, tuple(output.shape)))


@builtin("loss")
def mae(ctx: LayerContext, output: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Value:
    """Mean absolute error over all elements (over the unmasked steps, given a mask)."""
    _float(output, "mae", arg="output")
    _same_shape("mae", output, target)
    d = ctx.b.abs(output - target)
    return _masked_mean(ctx.b, d, _loss_mask(ctx, "mae", output, mask, tuple(output.shape)))


@builtin("loss")
def huber(ctx: LayerContext, output: Tensor, target: Tensor, delta: float = 1.0,
          mask: Optional[Tensor] = None) -> Value:
    """Huber loss: 0.5·d² where |d| <= delta, else delta·(|d| - 0.5·delta), d = output - target;
    the mean over all elements (over the unmasked steps, given a mask)."""
    _float(output, "huber", arg="output")
    _same_shape("huber", output, target)
    if not delta > 0.0:
        raise arg_error(f"`huber`: argument `delta` must be positive, got {delta}", "delta")
    b = ctx.b
    a = b.abs(output - target)
    q = b.minimum(a, delta)  # the quadratic part's |d|; the rest of |d| counts linearly
    per = q * q * 0.5 + (a - q) * delta
    return _masked_mean(b, per, _loss_mask(ctx, "huber", output, mask, tuple(output.shape)))


@builtin("loss")
def cross_entropy(ctx: LayerContext, logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None,
                  smoothing: float = 0.0) -> Value:
    """Softmax cross-entropy from logits [..., K] (classes on the last axis) and integer
    labels [...] (or target probabilities [..., K]), averaged over every position: the batch
    for [B, K], the batch and time steps for [B, T, K] -- only the unmasked steps when the
    logits carry a mask or `mask` is given. log-softmax is built in. With smoothing=e, the
    target is (1 - e) times the label plus e spread evenly over the K classes (label
    smoothing, as PyTorch's label_smoothing)."""
    b = ctx.b
    if not 0.0 <= smoothing < 1.0:
        raise arg_error(f"`cross_entropy`: `smoothing` must be in [0, 1), got {smoothing}", "smoothing")
    logits, labels, keep = _class_rows(ctx, "cross_entropy", logits, labels, mask)
    logp = _log_softmax(b, logits, -1)
    if labels.dtype == DType.i32:
        picked = b.where(_one_hot(b, labels, logits.shape), logp, 0.0)
    else:
        picked = logp * labels
    per_row = b.sum(picked, 1)
    if smoothing:  # -sum of ((1 - e) target + e/K) log p = (1 - e) CE + e/K times -sum of log p
        per_row = per_row * (1.0 - smoothing) + b.sum(logp, 1) * (smoothing / logits.shape[-1])
    return -_masked_mean(b, per_row, keep)


def _class_rows(ctx: LayerContext, name: str, logits: Value, labels: Value, mask: Optional[Value],
                integer_labels: bool = True, probabilities: bool = True, args=("logits", "labels")):
    """Logits (or scores) [..., K], classes on the last axis, and their labels -- integers
    [...] or target probabilities [..., K] -- checked and made rows: ([R, K], [R] or [R, K],
    the bool [R] mask of the positions kept, or None)."""
    b = ctx.b
    what = args[0]  # logits or scores
    if not logits.dtype.is_float:
        raise arg_error(f"`{name}` needs floating-point {what}, got {logits.type}", what)
    if logits.rank < 2:
        raise ArgumentError(f"`{name}` needs {what} [B, classes] (or [B, T, classes]), got {logits.type}")
    positions = tuple(logits.shape[:-1])
    want = "i32[" + ",".join(str(d) for d in positions) + "]"
    if labels.dtype == DType.i32 and not integer_labels:
        raise arg_error(f"`{name}` needs target probabilities shaped like the {what} {logits.type}, got integer "
                        f"labels {labels.type}", args[1], hint="cross_entropy takes integer class labels")
    if labels.dtype != DType.i32 and not probabilities:
        raise arg_error(f"`{name}` needs integer class labels {want}, got {labels.type}", args[1])
    if labels.dtype == DType.i32 and tuple(labels.shape) != positions:
        raise arg_error(f"`{name}`: labels {labels.type} do not match {what} {logits.type}; "
                        f"integer labels need the {what}' shape without the class axis, {want}", args[1])
    if labels.dtype != DType.i32:
        _same_shape(name, logits, labels)
    keep = _loss_mask(ctx, name, logits, mask, positions)
    if logits.rank > 2:  # every position a row: [B, T, K] is computed as [B*T, K]
        rows = numel(positions)
        if keep is not None:
            keep = b.reshape(b.broadcast(keep, positions, tuple(range(keep.rank))), (rows,))
        logits = b.reshape(logits, (rows, logits.shape[-1]))
        labels = b.reshape(labels, (rows,) + ((logits.shape[-1],) if labels.dtype != DType.i32 else ()))
    return logits, labels, keep


def _one_hot(b: GraphBuilder, labels: Value, shape) -> Value:
    """bool [R, K]: true at each row's label."""
    return b.eq(b.broadcast(labels, shape, (0,)), b.iota(shape, 1))


@builtin("loss")
def kl_div(ctx: LayerContext, logits: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Value:
    """Kullback-Leibler divergence of softmax(logits) from the target distribution [..., K]
    (classes on the last axis): sum_k t_k (log t_k - log_softmax(logits)_k), with 0 log 0 = 0,
    averaged over the positions (PyTorch's KLDivLoss with reduction="batchmean", which
    takes log-probabilities: those pass through log_softmax unchanged)."""
    b = ctx.b
    logits, target, keep = _class_rows(ctx, "kl_div", logits, target, mask, integer_labels=False,
                                       args=("logits", "target"))
    entropy_term = b.where(b.gt(target, 0.0), target * b.log(b.maximum(target, 1e-30)), 0.0)
    return _masked_mean(b, b.sum(entropy_term - target * _log_softmax(b, logits, -1), 1), keep)


@builtin("loss")
def hinge(ctx: LayerContext, output: Tensor, target: Tensor, margin: float = 1.0, squared: bool = False,
          mask: Optional[Tensor] = None) -> Value:
    """The hinge loss of a binary classifier (a support vector machine's): the mean of
    max(0, margin - t*output) (squared with squared=true) over all elements, for targets t
    of -1 or +1; targets that are all 0 or 1 count as -1 and +1 (as Keras does)."""
    b = ctx.b
    _float(output, "hinge", arg="output")
    _same_shape("hinge", output, target)
    if not margin > 0.0:
        raise arg_error(f"`hinge`: argument `margin` must be positive, got {margin}", "margin")
    keep = _loss_mask(ctx, "hinge", output, mask, tuple(output.shape))
    zero_one = b.eq(b.max(b.abs(target * (target - 1.0))), 0.0)  # every target 0 or 1
    t = b.where(b.broadcast(zero_one, target.shape, ()), target * 2.0 - 1.0, target)
    short = b.maximum(margin - t * output, 0.0)
    return _masked_mean(b, short * short if squared else short, keep)


@builtin("loss")
def multi_hinge(ctx: LayerContext, scores: Tensor, labels: Tensor, margin: float = 1.0, squared: bool = False,
                mask: Optional[Tensor] = None) -> Value:
    """The multi-class hinge loss (Weston and Watkins; PyTorch's MultiMarginLoss): per
    position, sum over the classes i other than the label y of max(0, margin - s_y + s_i)
    (squared with squared=true), over the number of classes; averaged over the positions.
    Scores [..., K], integer labels [...]."""
    b = ctx.b
    if not margin > 0.0:
        raise arg_error(f"`multi_hinge`: argument `margin` must be positive, got {margin}", "margin")
    scores, labels, keep = _class_rows(ctx, "multi_hinge", scores, labels, mask, probabilities=False,
                                        args=("scores", "labels"))
    true = _one_hot(b, labels, scores.shape)
    s_y = b.broadcast(b.sum(b.where(true, scores, 0.0), 1), scores.shape, (0,))
    short = b.where(true, 0.0, b.maximum(scores - s_y + margin, 0.0))
    per_row = b.sum(short * short if squared else short, 1) / float(scores.shape[-1])
    return _masked_mean(b, per_row, keep)


@builtin("loss")
def bce(ctx: LayerContext, output: Tensor, target: Tensor, from_logits: bool = False,
        mask: Optional[Tensor] = None) -> Value:
    """Binary cross-entropy of probabilities (or logits with from_logits=true) against 0/1
    targets, averaged over all elements (over the unmasked steps, given a mask)."""
    b = ctx.b
    _float(output, "bce", arg="output")
    _same_shape("bce", output, target)
    keep = _loss_mask(ctx, "bce", output, mask, tuple(output.shape))
    if from_logits:  # max(z, 0) - z*y + log(1 + exp(-|z|)), stable for any z
        z = output
        return _masked_mean(b, b.maximum(z, 0.0) - z * target + b.log(b.exp(-b.abs(z)) + 1.0), keep)
    p = b.minimum(b.maximum(output, 1e-7), 1.0 - 1e-7)
    return -_masked_mean(b, target * b.log(p) + (1.0 - target) * b.log(1.0 - p), keep)


@builtin("regularizer")
def l1(ctx: LayerContext, ps: ParamList) -> Value:
    """Sum of absolute values of the given parameters."""
    return _total(ctx.b, [ctx.b.sum(ctx.b.abs(p)) for p in ps])


@builtin("regularizer")
def l2(ctx: LayerContext, ps: ParamList) -> Value:
    """Sum of squares of the given parameters."""
    return _total(ctx.b, [ctx.b.sum(p * p) for p in ps])


def _total(b: GraphBuilder, terms: list) -> Value:
    if not terms:
        return b.const(0.0)
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


# the losses that make a model a classifier, and how its outputs give classes: the argmax
# over the last axis, or a threshold per element (bce's 0.5, or 0 on logits; hinge's 0)
CLASSIFIERS = {"cross_entropy": "argmax", "bce": "threshold", "kl_div": "argmax", "hinge": "threshold",
               "multi_hinge": "argmax"}
CLASSIFICATION_LOSSES = ", ".join(f"`{name}`" for name in list(CLASSIFIERS)[:-1]) + f" or `{list(CLASSIFIERS)[-1]}`"


def accuracy(b: GraphBuilder, output: Value, label: Value, loss_fn: str, logits: bool = False,
             mask: Optional[Value] = None) -> Value:
    """Fraction of correct predictions: argmax for the losses over classes (cross_entropy,
    kl_div, multi_hinge); for bce a 0.5 threshold on probabilities (0 on logits), for hinge
    the sign. Per position (per token for [B, T, K] logits), over the positions `mask`
    keeps (its shape a prefix of theirs) when given."""
    if CLASSIFIERS[loss_fn] == "argmax" and label.dtype == DType.i32:
        hit = b.eq(b.argmax(output, -1), label)
    elif CLASSIFIERS[loss_fn] == "argmax":
        hit = b.eq(b.argmax(output, -1), b.argmax(label, -1))
    elif loss_fn == "hinge":
        hit = b.eq(b.gt(output, 0.0), b.gt(label, 0.0))
    else:
        hit = b.eq(b.gt(output, 0.0 if logits else 0.5), b.gt(label, 0.5))
    if mask is not None and tuple(mask.shape) != tuple(hit.shape[:mask.rank]):
        mask = None
    return _masked_mean(b, b.cast(hit, DType.f32), mask)


# the functions whose result keeps the mask of their first tensor argument: elementwise
# ones and those acting on the feature axis (the frontend also passes masks through
# arithmetic); anything else (reshape, indexing, reductions, concat) drops it, and so do
# those of AXIS_ARGUMENT given another axis than the last
KEEPS_MASK = frozenset({"dense", "dropout", "layernorm", "relu", "leaky_relu", "sigmoid", "tanh", "softmax",
                        "log_softmax", "gelu", "elu", "selu", "softplus", "silu", "exp", "log", "sqrt", "abs", "erf",
                        "clip", "maximum", "minimum", "where"})
AXIS_ARGUMENT = frozenset({"layernorm", "softmax", "log_softmax"})


def _hyper(b: GraphBuilder, name: str, dtype: DType) -> Value:
    """The scalar input `name` (role hyper: fed by the runtime every step), created once."""
    try:
        return b.value(b.graph.input_named(name))
    except KeyError:
        with b.at(None):
            return b.input(name, TensorType(dtype, ()), "hyper")


def _positive(v: int, name: str, layer: str) -> None:
    if v < 1:
        raise arg_error(f"`{layer}`: argument `{name}` must be a positive integer, got {v}", name)


def stream_id(name: str) -> int:
    """A stable random-stream number for a layer name."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF
