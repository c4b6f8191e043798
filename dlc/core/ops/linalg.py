"""Contractions and windows: matmul (and batched), 2-D convolution and pooling, with their backward ops."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from dlc.core.types import ShapeError, TensorType
from dlc.core.ops.base import Kind, OpDef, register, require_float, same_dtype


# matmul --------------------------------------------------------------------------------
# matmul(a, b, ta, tb) = op(a) @ op(b) with op = transpose when the flag is set; rank 2.
def _matmul_infer(a: TensorType, b: TensorType, ta: bool = False, tb: bool = False) -> TensorType:
    if a.rank != 2 or b.rank != 2:
        raise ShapeError(f"matmul needs two matrices, got {a} and {b}")
    dtype = same_dtype("matmul", a, b)
    m, k1 = (a.shape[1], a.shape[0]) if ta else a.shape
    k2, n = (b.shape[1], b.shape[0]) if tb else b.shape
    if k1 != k2:
        raise ShapeError(f"cannot multiply {a} by {b}: inner dimensions {k1} and {k2} differ")
    return TensorType(dtype, (m, n))


def _matmul_ref(a, b, ta=False, tb=False):
    return (a.T if ta else a) @ (b.T if tb else b)


def _matmul_vjp(b_, g, y, a, b, ta=False, tb=False):
    # C = A'B' with A' = op(A), B' = op(B):  dA' = G B'^T,  dB' = A'^T G
    da = b_.matmul(b, g, ta=tb, tb=True) if ta else b_.matmul(g, b, ta=False, tb=not tb)
    db = b_.matmul(g, a, ta=True, tb=ta) if tb else b_.matmul(a, g, ta=not ta, tb=False)
    return da, db


MATMUL = register(OpDef("matmul", Kind.MATMUL, _matmul_infer, _matmul_ref, _matmul_vjp, 2,
                        attrs=("ta", "tb")))


# batch_matmul ----------------------------------------------------------------------------
# batch_matmul(a, b, ta, tb)[g] = op(a[g]) @ op(b[g]): G independent products (attention's
# scores and its weighted sums), the flags transposing the last two axes; rank 3.
def _batch_matmul_infer(a: TensorType, b: TensorType, ta: bool = False, tb: bool = False) -> TensorType:
    if a.rank != 3 or b.rank != 3:
        raise ShapeError(f"batch_matmul needs two stacks of matrices [G, rows, cols], got {a} and {b}")
    if a.shape[0] != b.shape[0]:
        raise ShapeError(f"batch_matmul: {a} and {b} stack different numbers of matrices")
    m = _matmul_infer(a.with_shape(a.shape[1:]), b.with_shape(b.shape[1:]), ta, tb)
    return m.with_shape((a.shape[0],) + m.shape)


def _batch_matmul_ref(a, b, ta=False, tb=False):
    return np.matmul(a.swapaxes(1, 2) if ta else a, b.swapaxes(1, 2) if tb else b)


def _batch_matmul_vjp(b_, g, y, a, b, ta=False, tb=False):
    # as matmul's, per matrix of the stack
    bmm = b_.batch_matmul
    da = bmm(b, g, ta=tb, tb=True) if ta else bmm(g, b, ta=False, tb=not tb)
    db = bmm(g, a, ta=True, tb=ta) if tb else bmm(a, g, ta=not ta, tb=False)
    return da, db


BATCH_MATMUL = register(OpDef("batch_matmul", Kind.MATMUL, _batch_matmul_infer, _batch_matmul_ref,
                              _batch_matmul_vjp, 2, attrs=("ta", "tb")))


# conv2d --------------------------------------------------------------------------------
# The three convolution ops take `dilation` (the spacing of the kernel's taps) only where
# it is not 1: an undilated convolution's node, IR and kernels read as they always have.
def conv_out(size: int, k: int, stride: int, pad: int, dilation: int = 1) -> int:
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def dilation_attr(dilation) -> dict:
    """The `dilation` attribute to emit a convolution op with: none where it is (1, 1)."""
    return {} if tuple(dilation) == (1, 1) else {"dilation": tuple(dilation)}


def _spatial(name: str, x: TensorType) -> tuple[int, int]:
    if x.rank != 4:
        raise ShapeError(f"{name} needs an NCHW tensor of rank 4, got {x}")
    h, w = x.shape[2], x.shape[3]
    if not isinstance(h, int) or not isinstance(w, int):
        raise ShapeError(f"{name}: spatial dimensions of {x} must be known numbers")
    return h, w


def _out_hw(name, hw, kernel, stride, pad, dilation=(1, 1)) -> tuple[int, int]:
    out = tuple(conv_out(s, k, st, p, d) for s, k, st, p, d in zip(hw, kernel, stride, pad, dilation))
    if min(out) < 1:
        dilated = f" dilated by {list(dilation)}" if tuple(dilation) != (1, 1) else ""
        raise ShapeError(f"{name}: a {kernel[0]}x{kernel[1]} window{dilated} with stride {stride[0]} and "
                         f"padding {pad[0]} does not fit a {hw[0]}x{hw[1]} input")
    return out


def _windows(x, kernel, stride, pad, fill=0.0, dilation=(1, 1)):
    """[N, C, OH, OW, KH, KW] view of the padded input."""
    (ph, pw), (sh, sw), (dh, dw) = pad, stride, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    spanned = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation))
    win = sliding_window_view(xp, spanned, axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw]


def _conv_infer(x: TensorType, w: TensorType, stride=(1, 1), pad=(0, 0), dilation=(1, 1)) -> TensorType:
    hw = _spatial("conv2d", x)
    if w.rank != 4:
        raise ShapeError(f"conv2d weights must be [out, in, kh, kw], got {w}")
    if x.shape[1] != w.shape[1]:
        raise ShapeError(f"conv2d: input has {x.shape[1]} channels but the weights expect {w.shape[1]}")
    require_float("conv2d", x)
    oh, ow = _out_hw("conv2d", hw, w.shape[2:], stride, pad, dilation)
    return TensorType(same_dtype("conv2d", x, w), (x.shape[0], w.shape[0], oh, ow))


def _conv_ref(x, w, stride=(1, 1), pad=(0, 0), dilation=(1, 1)):
    win = _windows(x, w.shape[2:], stride, pad, dilation=dilation)
    return np.tensordot(win, w, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)


def _conv_vjp(b, g, y, x, w, stride=(1, 1), pad=(0, 0), dilation=(1, 1)):
    dil = dilation_attr(dilation)
    dx = b.emit(CONV2D_BWD_DATA, (g, w), in_hw=tuple(x.shape[2:]), stride=stride, pad=pad, **dil)
    dw = b.emit(CONV2D_BWD_FILTER, (x, g), kernel=tuple(w.shape[2:]), stride=stride, pad=pad, **dil)
    return dx, dw


CONV2D = register(OpDef("conv2d", Kind.CONV, _conv_infer, _conv_ref, _conv_vjp, 2,
                        attrs=("stride", "pad", "dilation")))


# conv2d_bwd_data(g, w) = the input gradient of conv2d; bilinear, so its own gradients
# are conv2d and conv2d_bwd_filter again.
def _bwd_data_infer(g: TensorType, w: TensorType, in_hw, stride, pad, dilation=(1, 1)) -> TensorType:
    if g.rank != 4 or w.rank != 4 or g.shape[1] != w.shape[0]:
        raise ShapeError(f"conv2d_bwd_data: gradient {g} does not match weights {w}")
    if tuple(g.shape[2:]) != _out_hw("conv2d_bwd_data", in_hw, w.shape[2:], stride, pad, dilation):
        raise ShapeError(f"conv2d_bwd_data: gradient {g} does not match input size {list(in_hw)}")
    return TensorType(same_dtype("conv2d_bwd_data", g, w), (g.shape[0], w.shape[1]) + tuple(in_hw))


def _bwd_data_ref(g, w, in_hw, stride, pad, dilation=(1, 1)):
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    n, _, oh, ow = g.shape
    kh, kw = w.shape[2:]
    dx = np.zeros((n, w.shape[1], in_hw[0] + 2 * ph, in_hw[1] + 2 * pw), dtype=g.dtype)
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i * dh:i * dh + sh * oh:sh, j * dw:j * dw + sw * ow:sw] += \
                np.einsum("nohw,oc->nchw", g, w[:, :, i, j])
    return dx[:, :, ph:ph + in_hw[0], pw:pw + in_hw[1]]


def _bwd_data_vjp(b, c, y, g, w, in_hw, stride, pad, dilation=(1, 1)):
    dil = dilation_attr(dilation)
    dg = b.emit(CONV2D, (c, w), stride=stride, pad=pad, **dil)
    dw = b.emit(CONV2D_BWD_FILTER, (c, g), kernel=tuple(w.shape[2:]), stride=stride, pad=pad, **dil)
    return dg, dw


CONV2D_BWD_DATA = register(OpDef("conv2d_bwd_data", Kind.CONV, _bwd_data_infer, _bwd_data_ref,
                                 _bwd_data_vjp, 2, attrs=("in_hw", "stride", "pad", "dilation")))


def _bwd_filter_infer(x: TensorType, g: TensorType, kernel, stride, pad, dilation=(1, 1)) -> TensorType:
    hw = _spatial("conv2d_bwd_filter", x)
    if g.rank != 4 or g.shape[0] != x.shape[0] or tuple(g.shape[2:]) != _out_hw(
            "conv2d_bwd_filter", hw, kernel, stride, pad, dilation):
        raise ShapeError(f"conv2d_bwd_filter: gradient {g} does not match input {x}")
    return TensorType(same_dtype("conv2d_bwd_filter", x, g), (g.shape[1], x.shape[1]) + tuple(kernel))


def _bwd_filter_ref(x, g, kernel, stride, pad, dilation=(1, 1)):
    win = _windows(x, kernel, stride, pad, dilation=dilation)
    return np.tensordot(g, win, axes=([0, 2, 3], [0, 2, 3]))


def _bwd_filter_vjp(b, c, y, x, g, kernel, stride, pad, dilation=(1, 1)):
    dil = dilation_attr(dilation)
    dx = b.emit(CONV2D_BWD_DATA, (g, c), in_hw=tuple(x.shape[2:]), stride=stride, pad=pad, **dil)
    dg = b.emit(CONV2D, (x, c), stride=stride, pad=pad, **dil)
    return dx, dg


CONV2D_BWD_FILTER = register(OpDef("conv2d_bwd_filter", Kind.CONV, _bwd_filter_infer,
                                   _bwd_filter_ref, _bwd_filter_vjp, 2,
                                   attrs=("kernel", "stride", "pad", "dilation")))


# pooling ---------------------------------------------------------------------------------
# pool2d(x, mode, kernel, stride, pad): mode "max" pads with -inf, "avg" divides by the
# full window (padding counts, as PyTorch's default count_include_pad=True).
def _pool_infer(x: TensorType, mode: str, kernel, stride, pad) -> TensorType:
    hw = _spatial(f"{mode}pool", x)
    if mode not in ("max", "avg"):
        raise ShapeError(f"pool2d: unknown mode {mode!r}")
    if any(2 * p > k for p, k in zip(pad, kernel)):
        raise ShapeError(f"`{mode}pool`: padding {list(pad)} is more than half the window {list(kernel)}")
    oh, ow = _out_hw(f"{mode}pool", hw, kernel, stride, pad)
    return x.with_shape((x.shape[0], x.shape[1], oh, ow))


def _pool_ref(x, mode, kernel, stride, pad):
    win = _windows(x, kernel, stride, pad, fill=-np.inf if mode == "max" else 0.0)
    return win.max(axis=(4, 5)) if mode == "max" else win.mean(axis=(4, 5), dtype=x.dtype)


def _pool_vjp(b, g, y, x, mode, kernel, stride, pad):
    return (b.emit(POOL2D_BWD, (x, g), mode=mode, kernel=kernel, stride=stride, pad=pad),)


POOL2D = register(OpDef("pool2d", Kind.POOL, _pool_infer, _pool_ref, _pool_vjp, 1,
                        attrs=("mode", "kernel", "stride", "pad")))


def _pool_bwd_infer(x: TensorType, g: TensorType, mode, kernel, stride, pad) -> TensorType:
    if g != _pool_infer(x, mode, kernel, stride, pad):
        raise ShapeError(f"pool2d_bwd: gradient {g} does not match input {x}")
    return x


def _pool_bwd_ref(x, g, mode, kernel, stride, pad):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, w = x.shape
    oh, ow = g.shape[2:]
    dx = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=g.dtype)
    if mode == "avg":
        for i in range(kh):
            for j in range(kw):
                dx[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += g / (kh * kw)
    else:  # the gradient goes to the first maximum of each window, in row-major order
        win = _windows(x, kernel, stride, pad, fill=-np.inf).reshape(n, c, oh, ow, kh * kw)
        arg = win.argmax(axis=-1)
        rows = np.arange(oh)[None, None, :, None] * sh + arg // kw
        cols = np.arange(ow)[None, None, None, :] * sw + arg % kw
        ni, ci = np.indices((n, c, oh, ow))[:2]
        np.add.at(dx, (ni, ci, rows, cols), g)
    return dx[:, :, ph:ph + h, pw:pw + w]


def _pool_bwd_vjp(b, c, y, x, g, mode, kernel, stride, pad):
    if mode == "avg":  # linear in g, independent of x
        return None, b.emit(POOL2D, (c,), mode="avg", kernel=kernel, stride=stride, pad=pad)
    raise NotImplementedError("the second derivative of max pooling is not supported")


POOL2D_BWD = register(OpDef("pool2d_bwd", Kind.POOL, _pool_bwd_infer, _pool_bwd_ref, _pool_bwd_vjp, 2,
                            attrs=("mode", "kernel", "stride", "pad")))
