"""The op table: one row per primitive mode and per composite, each with an independent numpy
reference (in the spirit of PyTorch's OpInfo). `tests/test_ops.py` runs the generic checks.

Every reference below is written directly in numpy, from the op's documented meaning. None of
them calls `OpDef.ref` or any other dlc code: a wrong formula in dlc must not agree with itself.
Input domains are chosen per row, away from kinks and poles; shapes are awkward on purpose
(1, 3, 7, 33: not multiples of any vector width; rank 0 where it means something).

A row is `OpCase`:
    op        name in dlc.ops.OPS (primitive rows) or dlc.nn.BUILTINS (composite rows)
    shapes    one shape per tensor operand
    ref       the numpy reference. Primitives: ref(*arrays, **attrs). Composites:
              ref(*arrays, **layer_params_and_state) -> array, or a dict {"out": ...,
              "update:<state>": ...} when the layer updates state
    attrs     primitive attributes / builtin keyword arguments
    inputs    per operand: a (lo, hi) float range (f32 unless `dtypes` says otherwise), or a
              callable (rng, shape) -> array for indices, booleans, integers and ties
    avoid     points float inputs keep away from (kinks): e.g. 0 for abs and relu
    grad      "fd"     gradient checked against central finite differences
              "zero"   autodiff must give an all-zero gradient (stop_gradient)
              "identity" autodiff must give the identity's gradient (straight-through: step, sign)
              "raises" autodiff must raise a clear dlc.DlcError
              "none"   no float input to differentiate
    tol32     (rtol, atol) of the float32 forward comparison
    xfail     {aspect: reason} for known bugs, aspect in "infer", "forward", "forward-f32",
              "forward-f64", "grad", "symbolic"
    symbolic  composites: also build with axis 0 of every operand declared as the symbol B
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from dlc.language import nn
from dlc.language.nn import ParamList
from dlc.core.types import DType, TensorType

F32, F64, I32, BOOL = DType.f32, DType.f64, DType.i32, DType.bool


@dataclass(frozen=True)
class OpCase:
    op: str
    shapes: tuple
    ref: Callable
    attrs: Mapping[str, Any] = field(default_factory=dict)
    inputs: tuple = ()            # per operand: (lo, hi) or callable(rng, shape); default DOMAIN
    dtypes: tuple = ()            # per operand dtype for range inputs; default f32
    avoid: tuple = ()
    targets: tuple = ()           # float operands that are data (a loss's targets): not differentiated
    grad: str = "fd"
    tol32: tuple = (1e-5, 1e-6)
    tol64: tuple | None = None    # (rtol, atol) of float64 runs where not test_ops.F64_TOL
    xfail: Mapping[str, str] = field(default_factory=dict)
    id: str = ""
    # composites only
    composite: bool = False
    call: Callable | None = None  # call(ctx, *values) -> Value; default BUILTINS[op].fn(ctx, *v, **attrs)
    params: Mapping[str, tuple] = field(default_factory=dict)  # layer param/state name -> (lo, hi)
    training: bool = True
    symbolic: bool = True         # also check with the leading (batch) axis declared as a symbol B

    @property
    def name(self) -> str:
        prefix = "nn." if self.composite else ""
        return prefix + self.op + (f"[{self.id}]" if self.id else "")


DOMAIN = (-2.0, 2.0)
PARAM_DOMAIN = (-1.0, 1.0)
MATMUL_TOL = (1e-5, 1e-5)  # float32 sums of up to ~100 products of O(1) terms

# Known bug: GraphBuilder.const stores scalars as float32 arrays (np.asarray(value, float32)), so
# a float64 run of an f32 graph computes with 0.1 = 0.10000000149: composites whose constants are
# not float32-exact are off by ~3e-8 relative in float64. (Gradient checks are unaffected: autodiff
# and finite differences see the same rounded constants.)
CONST_F32 = {"forward-f64": "builder constants are rounded to float32, so the float64 interpreter "
                            "computes with e.g. 0.1 = 0.10000000149 (off by ~3e-8 relative)"}


ERF_TOL = (1e-5, 3e-7)  # erf is Abramowitz & Stegun's formula 7.1.26, within 1.5e-7: float32's precision,
# which float64 runs show


def P(op, shapes, ref, **kw) -> OpCase:
    return OpCase(op, tuple(tuple(s) for s in shapes), ref, **kw)


def C(op, shapes, ref, **kw) -> OpCase:
    return OpCase(op, tuple(tuple(s) for s in shapes), ref, composite=True, **kw)


# --- input makers ---------------------------------------------------------------------------------

def ints(lo, hi):
    """i32 values in [lo, hi)."""
    def make(rng, shape):
        return rng.integers(lo, hi, size=shape).astype(np.int32)
    make.__name__ = f"ints({lo},{hi})"
    return make


def bools(rng, shape):
    return rng.random(size=shape) < 0.5


def small_ints_f32(rng, shape):
    """Float values that are small integers, so comparisons hit ties often."""
    return rng.integers(-2, 3, size=shape).astype(np.float32)


def scalar_i32(value):
    def make(rng, shape):
        return np.asarray(value, dtype=np.int32)
    return make


def probabilities(rng, shape):
    """Rows that are probability distributions (soft cross-entropy targets)."""
    p = rng.uniform(0.1, 1.0, size=shape)
    return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)


def zeros_ones_f32(rng, shape):
    return (rng.random(size=shape) < 0.5).astype(np.float32)


def signs_f32(rng, shape):
    """-1 or +1 (a hinge loss's targets)."""
    return np.where(rng.random(size=shape) < 0.5, -1.0, 1.0).astype(np.float32)


def sparse_probabilities(rng, shape):
    """Probability rows with zeros in them (0 log 0 = 0 in kl_div)."""
    p = rng.uniform(0.1, 1.0, size=shape) * (rng.random(size=shape) < 0.6)
    p[..., 0] += 0.5  # (no row all zeros)
    return (p / p.sum(axis=-1, keepdims=True)).astype(np.float32)


# --- numpy references ---------------------------------------------------------------------------

def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_broadcast(x, shape, axes):
    """x's dim i goes to output axis axes[i] (size 1 stretches); the other axes are new."""
    new = tuple(i for i in range(len(shape)) if i not in axes)
    return np.broadcast_to(np.expand_dims(x, new), shape)


def np_pad(x, lo, hi, interior, value=0.0):
    shape = tuple(l + h + d + max(d - 1, 0) * i for d, l, h, i in zip(x.shape, lo, hi, interior))
    out = np.full(shape, value, dtype=x.dtype)
    where = [l + np.arange(d) * (i + 1) for d, l, i in zip(x.shape, lo, interior)]
    out[np.ix_(*where)] = x
    return out


def np_slice(x, starts, stops, steps):
    idx = [np.arange(s, e, st) for s, e, st in zip(starts, stops, steps)]
    return x[np.ix_(*idx)]


def np_matmul(a, b, ta=False, tb=False):
    a = np.swapaxes(a, 0, 1) if ta else a
    b = np.swapaxes(b, 0, 1) if tb else b
    return np.einsum("ik,kj->ij", a, b)


def np_batch_matmul(a, b, ta=False, tb=False):
    a = np.swapaxes(a, 1, 2) if ta else a
    b = np.swapaxes(b, 1, 2) if tb else b
    return np.einsum("gik,gkj->gij", a, b)


def _out(n, k, s, p, d=1):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _pad_hw(x, pad, fill=0.0):
    return np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])), constant_values=fill)


def np_conv2d(x, w, stride=(1, 1), pad=(0, 0), dilation=(1, 1)):
    """Direct convolution (cross-correlation), one output position at a time; the taps
    `dilation` apart."""
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (dh, dw), xp = stride, dilation, _pad_hw(x, pad)
    oh, ow = _out(h, kh, sh, pad[0], dh), _out(wd, kw, sw, pad[1], dw)
    out = np.zeros((n, o, oh, ow), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            window = xp[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw]
            out[:, :, i, j] = np.einsum("ncij,ocij->no", window, w)
    return out


def np_conv2d_grouped(x, w, stride, pad, dilation, groups):
    """Grouped, dilated convolution: output channel o reads its group's input channels at the
    taps spaced `dilation` apart (PyTorch's Conv2d(groups=, dilation=))."""
    n, c, h, wd = x.shape
    o, per_group, kh, kw = w.shape
    (sh, sw), (dh, dw), xp = stride, dilation, _pad_hw(x, pad)
    oh, ow = (h + 2 * pad[0] - dh * (kh - 1) - 1) // sh + 1, (wd + 2 * pad[1] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, oh, ow), dtype=x.dtype)
    for oc in range(o):
        first = oc // (o // groups) * per_group
        for i in range(oh):
            for j in range(ow):
                taps = xp[:, first:first + per_group, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                          j * sw:j * sw + dw * (kw - 1) + 1:dw]
                out[:, oc, i, j] = np.einsum("ncij,cij->n", taps, w[oc])
    return out


def np_conv1d(x, w, stride=1, pad=0):
    """[N, C, T] (cross-correlation over time), written out on its own."""
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
    k = w.shape[2]
    steps = (xp.shape[2] - k) // stride + 1
    return np.stack([np.einsum("nck,ock->no", xp[:, :, t * stride:t * stride + k], w) for t in range(steps)], axis=2)


def np_pool1d(x, mode, k, stride, pad):
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad)), constant_values=-np.inf if mode == "max" else 0.0)
    steps = (xp.shape[2] - k) // stride + 1
    windows = np.stack([xp[:, :, t * stride:t * stride + k] for t in range(steps)], axis=2)
    return windows.max(axis=3) if mode == "max" else windows.mean(axis=3)


def np_conv_transpose2d(x, w, stride, pad, output_pad, dilation=(1, 1)):
    """PyTorch's conv_transpose2d by its definition: each input cell adds w, scaled by it,
    at its stride-spaced window of the output (taps `dilation` apart); then `pad` cropped
    from each side."""
    (sh, sw), (ph, pw), (oph, opw), (dh, dw) = stride, pad, output_pad, dilation
    n, _, h, wd = x.shape
    kh, kw = w.shape[2:]
    sph, spw = dh * (kh - 1) + 1, dw * (kw - 1) + 1  # the windows' spans
    full = np.zeros((n, w.shape[1], (h - 1) * sh + sph + oph, (wd - 1) * sw + spw + opw))
    for i in range(h):
        for j in range(wd):
            full[:, :, i * sh:i * sh + sph:dh, j * sw:j * sw + spw:dw] += np.einsum("nc,cokl->nokl", x[:, :, i, j], w)
    return full[:, :, ph:full.shape[2] - ph, pw:full.shape[3] - pw]


def np_conv2d_bwd_data(g, w, in_hw, stride, pad, dilation=(1, 1)):
    """d<conv2d(x, w), g>/dx: each output position scatters g * w into its window."""
    n, _, oh, ow = g.shape
    _, c, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dilation
    # (room past the padded input: a window of the last output may reach past it where the
    # stride does not divide the span, and numpy would cut the slice short)
    dxp = np.zeros((n, c, in_hw[0] + 2 * ph + dh * kh, in_hw[1] + 2 * pw + dw * kw), dtype=g.dtype)
    for i in range(oh):
        for j in range(ow):
            dxp[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw] += \
                np.einsum("no,ocij->ncij", g[:, :, i, j], w)
    return dxp[:, :, ph:ph + in_hw[0], pw:pw + in_hw[1]]


def np_conv2d_bwd_filter(x, g, kernel, stride, pad, dilation=(1, 1)):
    """d<conv2d(x, w), g>/dw."""
    (kh, kw), (sh, sw), (dh, dw), xp = kernel, stride, dilation, _pad_hw(x, pad)
    grad = np.zeros((g.shape[1], x.shape[1], kh, kw), dtype=x.dtype)
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            window = xp[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw]
            grad += np.einsum("no,ncij->ocij", g[:, :, i, j], window)
    return grad


def np_pool(x, mode, kernel, stride, pad):
    """max: padding never wins; avg: divides by the whole window (padding counts)."""
    (kh, kw), (sh, sw) = kernel, stride
    xp = _pad_hw(x, pad, -np.inf if mode == "max" else 0.0)
    oh, ow = _out(x.shape[2], kh, sh, pad[0]), _out(x.shape[3], kw, sw, pad[1])
    out = np.zeros(x.shape[:2] + (oh, ow), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
            out[:, :, i, j] = win.max(axis=(2, 3)) if mode == "max" else win.sum(axis=(2, 3)) / (kh * kw)
    return out


def np_pool_rounding_up(x, mode, k, s, p, ceil=True, count_pad=True):
    """PyTorch's pools with ceil_mode and count_include_pad, window by window over an NCHW x
    (square windows): a window is the input's cells in [i*s - p, i*s - p + k); an average
    divides by the cells inside the padded input (count_pad) or inside the input."""
    def size(n):
        out = -(-(n + 2 * p - k) // s) + 1 if ceil else (n + 2 * p - k) // s + 1
        return out - 1 if ceil and (out - 1) * s >= n + p else out
    h, w = x.shape[2:]
    out = np.zeros(x.shape[:2] + (size(h), size(w)), dtype=x.dtype)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            r0, c0 = i * s - p, j * s - p
            r1, c1 = min(r0 + k, h + p), min(c0 + k, w + p)
            win = x[:, :, max(r0, 0):min(r1, h), max(c0, 0):min(c1, w)]
            cells = (r1 - r0) * (c1 - c0) if count_pad else win.shape[2] * win.shape[3]
            out[:, :, i, j] = win.max(axis=(2, 3)) if mode == "max" else win.sum(axis=(2, 3)) / cells
    return out


def np_pool_bwd(x, g, mode, kernel, stride, pad):
    """max: each window's g goes to its first maximum (row-major); avg: spread evenly."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    n, c, h, wd = x.shape
    xp = _pad_hw(x, pad, -np.inf)
    dxp = np.zeros_like(xp)
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            rows, cols = slice(i * sh, i * sh + kh), slice(j * sw, j * sw + kw)
            gij = g[:, :, i, j][:, :, None, None]
            if mode == "avg":
                dxp[:, :, rows, cols] += gij / (kh * kw)
            else:
                first = xp[:, :, rows, cols].reshape(n, c, -1).argmax(axis=-1)
                hit = (np.arange(kh * kw) == first[..., None]).reshape(n, c, kh, kw)
                dxp[:, :, rows, cols] += hit * gij
    return dxp[:, :, ph:ph + h, pw:pw + wd]


def np_take(table, idx):
    return np.take(table, idx, axis=0)


def np_scatter_add(g, idx, rows):
    out = np.zeros((rows,) + g.shape[idx.ndim:], dtype=g.dtype)
    flat_g = g.reshape((-1,) + g.shape[idx.ndim:])
    for k, r in enumerate(idx.reshape(-1)):
        out[r] += flat_g[k]
    return out


# random: documented as uniform [0, 1) from murmur3's fmix32 finalizer over
#   key = fmix32(seed ^ fmix32(stream ^ fmix32(step))),  bits_i = fmix32((i * 0x9E3779B1) ^ key),
#   value_i = (bits_i >> 8) * 2^-24.
# Written again here with 64-bit integers and explicit masks (numpy uint64 constants: with
# numpy 1.x's promotion a 0-d uint64 and a Python int meet as float64).
_MASK = 0xFFFFFFFF
_U64 = np.uint64


def _fmix32(h):
    h = np.asarray(h, dtype=np.uint64) & _U64(_MASK)
    h ^= h >> _U64(16)
    h = (h * _U64(0x85EBCA6B)) & _U64(_MASK)
    h ^= h >> _U64(13)
    h = (h * _U64(0xC2B2AE35)) & _U64(_MASK)
    h ^= h >> _U64(16)
    return h


def np_random(seed, step, shape, stream, first=0):
    key = _fmix32(int(seed) & _MASK ^ int(_fmix32(int(stream) ^ int(_fmix32(int(step) & _MASK)))))
    n = int(np.prod(shape))
    index = np.arange(n, dtype=np.uint64) + int(first) * (n // shape[0] if shape else 0)  # from row `first` on
    bits = _fmix32(((index * _U64(0x9E3779B1)) & _U64(_MASK)) ^ key)
    return ((bits >> _U64(8)).astype(np.float64) / 2.0 ** 24).astype(np.float32).reshape(shape)


def np_log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_attention(q, k, v, causal=False, scale=None):
    s = np.einsum("...id,...jd->...ij", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if causal:  # key j after query i: left out
        s = np.where(np.arange(s.shape[-1]) > np.arange(s.shape[-2])[:, None], -np.inf, s)
    return np.einsum("...ij,...jd->...id", np_softmax(s), v)


def np_huber(d, delta):
    a = np.abs(d)
    return np.where(a <= delta, 0.5 * d * d, delta * (a - 0.5 * delta))


def np_layernorm(x, gamma, beta, eps=1e-5, axis=-1):
    over = tuple(range(axis % x.ndim, x.ndim))
    centered = x - x.mean(axis=over, keepdims=True)
    return centered / np.sqrt(x.var(axis=over, keepdims=True) + eps) * gamma + beta


def np_groupnorm(x, groups, gamma=None, beta=None, eps=1e-5):
    """PyTorch's group_norm, written from its definition."""
    g = x.reshape(x.shape[0], groups, -1)
    y = ((g - g.mean(axis=2, keepdims=True)) / np.sqrt(g.var(axis=2, keepdims=True) + eps)).reshape(x.shape)
    per_channel = (-1,) + (1,) * (x.ndim - 2)
    return y if gamma is None else y * gamma.reshape(per_channel) + beta.reshape(per_channel)


def np_batchnorm(x, gamma, beta, running_mean, running_var, training, momentum=0.1, eps=1e-5):
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if not training:
        y = (x - running_mean.reshape(shape)) / np.sqrt(running_var.reshape(shape) + eps)
        return y * gamma.reshape(shape) + beta.reshape(shape)
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)
    n = x.size // x.shape[1]
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * gamma.reshape(shape) + beta.reshape(shape)
    return {"out": y,
            "update:running_mean": (1 - momentum) * running_mean + momentum * mean,
            "update:running_var": (1 - momentum) * running_var + momentum * var * n / max(n - 1, 1)}


def _run_cell(x, carries, step, mask):
    """Apply `step(x_t, carries) -> new carries` over time. With a mask [B, T], a step whose
    mask is false leaves every carry unchanged and outputs zeros (Keras' masking, PyTorch's
    packed sequences). Returns (h at every step [B, T, H], the final carries)."""
    hs = []
    for t in range(x.shape[1]):
        new = step(x[:, t], carries)
        if mask is None:
            carries = new
            hs.append(new[0])
        else:
            keep = mask[:, t][:, None]
            carries = [np.where(keep, n, c) for n, c in zip(new, carries)]
            hs.append(np.where(keep, new[0], 0.0))
    return np.stack(hs, axis=1), carries


def np_rnn(x, wx, wh, b, return_sequences=False, h0=None, mask=None, full=False, act=np.tanh):
    h = np.zeros((x.shape[0], wh.shape[0])) if h0 is None else h0
    hs, finals = _run_cell(x, [h], lambda xt, c: [act(xt @ wx + c[0] @ wh + b)], mask)
    if full:
        return hs, finals
    return hs if return_sequences else finals[0]


def np_lstm(x, w, u, b, return_sequences=False, h0=None, c0=None, mask=None, full=False):
    n_h = u.shape[0]
    h = np.zeros((x.shape[0], n_h)) if h0 is None else h0
    c = np.zeros_like(h) if c0 is None else c0

    def step(xt, hc):
        z = xt @ w + hc[0] @ u + b
        i, f, g, o = (z[:, k * n_h:(k + 1) * n_h] for k in range(4))
        c_new = np_sigmoid(f) * hc[1] + np_sigmoid(i) * np.tanh(g)
        return [np_sigmoid(o) * np.tanh(c_new), c_new]

    hs, finals = _run_cell(x, [h, c], step, mask)
    if full:
        return hs, finals
    return hs if return_sequences else finals[0]


def _blocks(a, n):
    """The n gate blocks packed along the last axis."""
    h = a.shape[-1] // n
    return [a[..., k * h:(k + 1) * h] for k in range(n)]


def np_gru(x, w, u, b, bh, return_sequences=False, h0=None, mask=None, full=False):
    """PyTorch's torch.nn.GRU with weight_ih = w.T, weight_hh = u.T, bias_ih = b, bias_hh = bh:
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr), z = sigmoid(W_iz x + b_iz + W_hz h + b_hz),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h."""
    (w_ir, w_iz, w_in), (w_hr, w_hz, w_hn) = _blocks(w, 3), _blocks(u, 3)
    (b_ir, b_iz, b_in), (b_hr, b_hz, b_hn) = _blocks(b, 3), _blocks(bh, 3)
    h = np.zeros((x.shape[0], u.shape[0])) if h0 is None else h0

    def step(xt, carries):
        h = carries[0]
        r = np_sigmoid(xt @ w_ir + b_ir + h @ w_hr + b_hr)
        z = np_sigmoid(xt @ w_iz + b_iz + h @ w_hz + b_hz)
        n = np.tanh(xt @ w_in + b_in + r * (h @ w_hn + b_hn))
        return [(1 - z) * n + z * h]

    hs, finals = _run_cell(x, [h], step, mask)
    if full:
        return hs, finals
    return hs if return_sequences else finals[0]


RECURRENT = {"rnn": (np_rnn, ("wx", "wh", "b")), "lstm": (np_lstm, ("w", "u", "b")),
             "gru": (np_gru, ("w", "u", "b", "bh"))}


def np_recurrent(layer, x, params, layers=1, bidirectional=False, return_sequences=False, dropout=0.0,
                 training=True, initial=None, mask=None, return_state=False):
    """A stack of `layers` recurrent layers (PyTorch's num_layers, bidirectional, dropout):
    the reverse direction reads time backwards and its outputs are put back in time order;
    directions are concatenated on the feature axis ([forward, reverse]); dropout (while
    training) acts on the inputs of layers above the first. The last state of a direction
    is its state after its last step. Parameters of layer k > 0 carry the suffix _l<k>, of
    the reverse direction _rev.

    initial: the initial states (h0, or (h0, c0) for lstm), each [layers*directions, B, H]
    (index layer*directions + direction) or [B, H] for one layer and direction; mask [B, T]:
    padded steps keep the states and output zeros, in both directions. With return_state,
    (output, final states) with the final states stacked like `initial` ([B, H] for one
    layer and direction)."""
    cell, names = RECURRENT[layer]
    dirs = 2 if bidirectional else 1
    n_states = 2 if layer == "lstm" else 1
    starts = [None] * (layers * dirs)
    if initial is not None:
        parts = list(initial) if isinstance(initial, (tuple, list)) else [initial]
        starts = [[p if p.ndim == 2 else p[i] for p in parts] for i in range(layers * dirs)]
    seq, finals, last = x, [], []
    for depth in range(layers):
        if depth and dropout and training:
            # the mask is drawn over the time-major [T, B, F] layer input, as the layer does
            keep = np_random(DROPOUT_SEED, DROPOUT_STEP, (seq.shape[1], seq.shape[0], seq.shape[2]),
                             DROPOUT_STREAM).transpose(1, 0, 2) >= dropout
            seq = np.where(keep, seq / (1.0 - dropout), 0.0)
        outs, last = [], []
        for reverse in (False, True) if bidirectional else (False,):
            suffix = (f"_l{depth}" if depth else "") + ("_rev" if reverse else "")
            start = starts[len(finals)]
            kw = {} if start is None else dict(zip(("h0", "c0"), start))
            m = None if mask is None else (mask[:, ::-1] if reverse else mask)
            hs, fin = cell(seq[:, ::-1] if reverse else seq, *(params[n + suffix] for n in names),
                           mask=m, full=True, **kw)
            finals.append(fin)
            last.append(fin[0])
            outs.append(hs[:, ::-1] if reverse else hs)
        seq = np.concatenate(outs, axis=-1)
    out = seq if return_sequences else np.concatenate(last, axis=-1)
    if not return_state:
        return out
    states = [np.stack([f[k] for f in finals]) if len(finals) > 1 else finals[0][k] for k in range(n_states)]
    return out, (states[0] if n_states == 1 else tuple(states))


def recurrent_row(layer, shape, hidden, training=True, **options):
    """A composite row for a recurrent layer with options, checked against np_recurrent."""
    ident = "-".join(f"{k}{'' if v is True else v}" for k, v in options.items()) + ("" if training else "-eval")
    return C(layer, [shape], lambda x, **p: np_recurrent(layer, x, p, training=training, **options),
             attrs={"hidden": hidden, **options}, tol32=(1e-5, 1e-5), training=training, id=ident)


def _flat_states(b, out, states):
    """One tensor from a recurrent layer's (output, final states): every part as [B, -1],
    concatenated on the last axis (a row has one result)."""
    parts = [out] + (list(states) if isinstance(states, tuple) else [states])
    rows = []
    for p in parts:
        if p.rank == 3 and p.shape[1] == out.shape[0] and p is not out:  # stacked [L*D, B, H]
            p = b.permute(p, (1, 0, 2))
        rows.append(b.reshape(p, (p.shape[0], math.prod(p.shape[1:]))) if p.rank != 2 else p)
    return b.concat(rows, axis=1)


def _np_flat_states(out, states):
    parts = [out] + (list(states) if isinstance(states, tuple) else [states])
    rows = []
    for p in parts:
        if p.ndim == 3 and p is not out:
            p = p.transpose(1, 0, 2)
        rows.append(p.reshape(p.shape[0], -1))
    return np.concatenate(rows, axis=1)


def state_row(layer, shapes, hidden, inputs=(), mask=False, initial=False, return_state=False, **options):
    """A row for a recurrent layer with initial states (the operands after x: h0, or h0 and c0,
    float, so their gradients are checked too), a mask (the last operand, bool) and/or its final
    states (the row's result is then output and states flattened side by side)."""
    n_states = 2 if layer == "lstm" else 1

    def split(xs):
        x, rest = xs[0], list(xs[1:])
        m = rest.pop() if mask else None
        init = None
        if initial:
            init = rest[0] if n_states == 1 else tuple(rest[:2])
        return x, init, m

    def call(ctx, *vs):
        x, init, m = split(vs)
        r = nn.BUILTINS[layer].fn(ctx, x, hidden, initial=init, mask=m, return_state=return_state, **options)
        return _flat_states(ctx.b, *r) if return_state else r

    def ref(*arrays, **p):
        x, init, m = split(arrays)
        r = np_recurrent(layer, x, p, initial=init, mask=m, return_state=return_state, **options)
        return _np_flat_states(*r) if return_state else r

    ident = "-".join([k for k, v in (("initial", initial), ("mask", mask), ("state", return_state)) if v]
                     + [f"{k}{'' if v is True else v}" for k, v in options.items()])
    return C(layer, shapes, ref, call=call, inputs=tuple(inputs), tol32=(1e-5, 1e-5), id=ident)


def post_padding(rng, shape):
    """A [B, T] mask of real steps followed by padding, lengths 0..T (one row all padding when B > 2)."""
    lengths = rng.integers(1, shape[1] + 1, size=shape[0])
    if shape[0] > 2:
        lengths[1] = 0
    return np.arange(shape[1])[None, :] < lengths[:, None]


def tokens_padded(vocab):
    """i32 tokens in 1..vocab-1 followed by zeros (padding), lengths 1..T."""
    def make(rng, shape):
        keep = post_padding(rng, shape) | (np.arange(shape[1])[None, :] == 0)
        return np.where(keep, rng.integers(1, vocab, size=shape), 0).astype(np.int32)
    make.__name__ = f"tokens_padded({vocab})"
    return make


def padded_steps(rng, shape):
    """A float sequence [B, T, F] whose padded steps (at the end of each row) are all zero."""
    keep = post_padding(rng, shape[:2])
    return np.where(keep[..., None], rng.uniform(0.5, 2.0, size=shape), 0.0).astype(np.float32)


def np_masked_mean(values, mask):
    keep = np.broadcast_to(mask.reshape(mask.shape + (1,) * (values.ndim - mask.ndim)), values.shape)
    return values[keep].sum() / max(keep.sum(), 1)


def np_cross_entropy(z, y, mask=None):
    """Softmax cross-entropy over the last axis, one term per position, averaged over the
    positions (the kept ones, given a mask)."""
    logp = np_log_softmax(z)
    if y.dtype.kind == "i":
        nll = -np.take_along_axis(logp, y[..., None].astype(np.int64), axis=-1)[..., 0]
    else:
        nll = -(y * logp).sum(axis=-1)
    return nll.mean() if mask is None else np_masked_mean(nll, mask)


def np_kl_div(z, t, mask=None):
    terms = np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0) - t * np_log_softmax(z)
    per = terms.sum(axis=-1)
    return per.mean() if mask is None else np_masked_mean(per, mask)


def np_hinge(o, t, margin=1.0, squared=False, mask=None):
    t = 2 * t - 1 if np.all((t == 0) | (t == 1)) else t
    short = np.maximum(margin - t * o, 0.0)
    short = short ** 2 if squared else short
    return short.mean() if mask is None else np_masked_mean(short, mask)


def np_multi_hinge(s, y, margin=1.0, squared=False, mask=None):
    """PyTorch's MultiMarginLoss per position: sum over i != y of max(0, margin - s_y + s_i)^p / K."""
    k = s.shape[-1]
    rows, labels = s.reshape(-1, k), y.reshape(-1)
    short = np.maximum(margin - rows[np.arange(len(labels)), labels][:, None] + rows, 0.0)
    short[np.arange(len(labels)), labels] = 0.0
    per = ((short ** 2 if squared else short).sum(axis=-1) / k).reshape(y.shape)
    return per.mean() if mask is None else np_masked_mean(per, mask)


def np_accuracy(z, y, mask=None):
    hit = (z.argmax(axis=-1) == y).astype(np.float64)
    return hit.mean() if mask is None else np_masked_mean(hit, mask)


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


np_erf = np.vectorize(math.erf, otypes=[np.float64])  # numpy has no erf; the standard library's is exact


def np_gelu_exact(x):
    return 0.5 * x * (1.0 + np_erf(x / math.sqrt(2.0)))


# --- primitive rows -----------------------------------------------------------------------------

M, N = 3, 7  # awkward sizes used throughout

UNARY = [
    P("neg", [(M, N)], np.negative),
    P("neg", [()], np.negative, id="rank0"),
    P("exp", [(33,)], np.exp),
    P("exp", [()], np.exp, id="rank0"),
    P("log", [(M, N)], np.log, inputs=[(0.1, 3.0)]),
    P("sqrt", [(1, 33)], np.sqrt, inputs=[(0.1, 3.0)]),
    P("tanh", [(M, N)], np.tanh, inputs=[(-3.0, 3.0)]),
    P("sigmoid", [(M, N)], np_sigmoid, inputs=[(-6.0, 6.0)]),
    P("abs", [(33,)], np.abs, avoid=(0.0,)),
    P("abs", [(M, N)], np.abs, dtypes=[I32], inputs=[ints(-5, 5)], grad="none", id="i32"),
    P("sign", [(M, N)], np.sign, avoid=(0.0,)),
    P("stop_gradient", [(M, N)], lambda x: x, grad="zero"),
]

CASTS = [
    P("cast", [(M, N)], lambda x, dtype: x.astype(np.float64), attrs={"dtype": F64}, id="f32->f64"),
    P("cast", [(M, N)], lambda x, dtype: np.trunc(x).astype(np.int32), attrs={"dtype": I32},
      inputs=[(-4.0, 4.0)], avoid=(-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0), id="f32->i32"),
    P("cast", [(M, N)], lambda x, dtype: x.astype(np.float32), attrs={"dtype": F32},
      inputs=[ints(-5, 5)], grad="none", id="i32->f32"),
    P("cast", [(33,)], lambda x, dtype: x.astype(np.float32), attrs={"dtype": F32},
      inputs=[bools], grad="none", id="bool->f32"),
]

BINARY = [
    P("add", [(M, N), (M, N)], np.add),
    P("add", [(), ()], np.add, id="rank0"),
    P("add", [(M, N), (M, N)], np.add, inputs=[ints(-9, 9), ints(-9, 9)], grad="none", id="i32"),
    P("sub", [(1, 33), (1, 33)], np.subtract),
    P("mul", [(M, N), (M, N)], np.multiply),
    P("mul", [(33,), (33,)], np.multiply, inputs=[ints(-9, 9), ints(-9, 9)], grad="none", id="i32"),
    P("div", [(M, N), (M, N)], np.divide, inputs=[DOMAIN, (0.5, 2.0)]),
    P("div", [(M, N), (M, N)], np.divide, inputs=[DOMAIN, (-2.0, -0.5)], id="negative-divisor"),
    # integer division of non-negative numbers (floor and truncation agree there)
    P("div", [(33,), (33,)], lambda a, b: a // b, inputs=[ints(0, 50), ints(1, 7)], grad="none", id="i32"),
    P("pow", [(M, N), (M, N)], np.power, inputs=[(0.5, 2.0), (-2.0, 2.0)]),
    P("max", [(M, N), (M, N)], np.maximum),
    P("max", [(33,), (33,)], np.maximum, inputs=[ints(-3, 3), ints(-3, 3)], grad="none", id="i32"),
    P("min", [(M, N), (M, N)], np.minimum),
]

COMPARE = []
for _name, _fn in [("lt", np.less), ("le", np.less_equal), ("gt", np.greater),
                   ("ge", np.greater_equal), ("eq", np.equal), ("ne", np.not_equal)]:
    # f32 without ties: the gradient through a comparison is zero
    COMPARE.append(P(_name, [(M, N), (M, N)], _fn))
    # small integers stored as f32 (ties on purpose: le/ge/eq must be true there); no gradient
    COMPARE.append(P(_name, [(M, N), (M, N)], _fn, inputs=[small_ints_f32, small_ints_f32],
                     grad="none", id="ties"))
    COMPARE.append(P(_name, [(33,), (33,)], _fn, inputs=[ints(-2, 3), ints(-2, 3)], grad="none", id="i32"))
COMPARE.append(P("and", [(M, N), (M, N)], np.logical_and, inputs=[bools, bools], grad="none"))

WHERE = [
    P("where", [(M, N), (M, N), (M, N)], np.where, inputs=[bools, DOMAIN, DOMAIN]),
    P("where", [(), (), ()], np.where, inputs=[bools, DOMAIN, DOMAIN], id="rank0"),
    P("where", [(33,), (33,), (33,)], np.where, inputs=[bools, ints(-5, 5), ints(-5, 5)], grad="none",
      id="i32"),
]

REDUCE = [
    P("reduce_sum", [(M, 1, N)], lambda x, axes: x.sum(axis=axes), attrs={"axes": (0, 2)}, id="axes02"),
    P("reduce_sum", [(M, 1, N)], lambda x, axes: x.sum(axis=axes), attrs={"axes": (0, 1, 2)}, id="all"),
    P("reduce_sum", [(33, 1)], lambda x, axes: x.sum(axis=axes), attrs={"axes": (1,)}, id="size1-axis"),
    P("reduce_sum", [(M, N)], lambda x, axes: x.sum(axis=axes), attrs={"axes": ()}, id="no-axes"),
    # enough leading rows for the CPU backend's column-sum template (COLSUM_ROWS)
    P("reduce_sum", [(70, 3, 5)], lambda x, axes: x.sum(axis=axes), attrs={"axes": (0,)}, id="column-sum"),
    P("reduce_sum", [(9, 8, 7)], lambda x, axes: x.sum(axis=axes), attrs={"axes": (0, 1)}, id="column-sum-2axes"),
    P("reduce_max", [(M, N)], lambda x, axes: x.max(axis=axes), attrs={"axes": (1,)}, id="axis1"),
    P("reduce_max", [(M, 1, N)], lambda x, axes: x.max(axis=axes), attrs={"axes": (0, 2)}, id="axes02"),
    P("reduce_max", [(33,)], lambda x, axes: x.max(axis=axes), attrs={"axes": (0,)}, id="all"),
    P("reduce_max", [(M, N)], lambda x, axes: x.max(axis=axes), attrs={"axes": ()}, id="no-axes"),
    P("argmax", [(M, N)], lambda x, axis: x.argmax(axis=axis).astype(np.int32), attrs={"axis": 1}),
    P("argmax", [(33,)], lambda x, axis: x.argmax(axis=axis).astype(np.int32), attrs={"axis": 0}, id="rank1"),
    # ties: the first maximum wins
    P("argmax", [(N, M)], lambda x, axis: x.argmax(axis=axis).astype(np.int32), attrs={"axis": 0},
      inputs=[ints(0, 3)], grad="none", id="i32-ties"),
]

MOVEMENT = [
    P("reshape", [(M, N)], lambda x, shape: x.reshape(shape), attrs={"shape": (N, 1, M)}),
    P("reshape", [()], lambda x, shape: x.reshape(shape), attrs={"shape": (1, 1)}, id="rank0"),
    P("reshape", [(1, 1, 1)], lambda x, shape: x.reshape(shape), attrs={"shape": ()}, id="to-rank0"),
    P("permute", [(M, 1, N)], lambda x, perm: np.transpose(x, perm), attrs={"perm": (2, 0, 1)}),
    P("permute", [(M, N)], lambda x, perm: np.transpose(x, perm), attrs={"perm": (1, 0)}, id="2d"),
    P("broadcast", [(M, 1)], np_broadcast, attrs={"shape": (2, M, N), "axes": (1, 2)}, id="new+stretched"),
    P("broadcast", [()], np_broadcast, attrs={"shape": (M, N), "axes": ()}, id="rank0"),
    P("broadcast", [(N,)], np_broadcast, attrs={"shape": (N, 33), "axes": (0,)}, id="new-trailing"),
    P("broadcast", [(1, 1)], np_broadcast, attrs={"shape": (1, 33), "axes": (0, 1)}, id="stretch-only"),
    P("slice", [(N, 33)], np_slice, attrs={"starts": (1, 0), "stops": (N, 33), "steps": (2, 5)}, id="steps"),
    P("slice", [(M, N, 1)], np_slice, attrs={"starts": (0, 2, 0), "stops": (M, 5, 1), "steps": (1, 1, 1)},
      id="window"),
    P("slice", [(33,)], np_slice, attrs={"starts": (3,), "stops": (32,), "steps": (7,)}, id="step7"),
    P("pad", [(M, N)], np_pad, attrs={"lo": (1, 0), "hi": (2, 3), "interior": (1, 2), "value": 0.0},
      id="interior"),
    P("pad", [(1, 33)], np_pad, attrs={"lo": (0, 2), "hi": (1, 0), "interior": (3, 0), "value": 1.5},
      id="value"),
    P("pad", [(N,)], np_pad, attrs={"lo": (0,), "hi": (0,), "interior": (2,), "value": 0.0},
      id="interior-only"),
    P("concat", [(M, 1), (M, N), (M, 2)], lambda *xs, axis: np.concatenate(xs, axis=axis),
      attrs={"axis": 1}, id="3-inputs"),
    P("concat", [(1, N), (2, N)], lambda *xs, axis: np.concatenate(xs, axis=axis), attrs={"axis": 0},
      id="axis0"),
]

MATMUL = [
    P("matmul", [(M, N), (N, 5)], np_matmul, attrs={"ta": False, "tb": False}, tol32=MATMUL_TOL, id="nn"),
    P("matmul", [(N, M), (N, 5)], np_matmul, attrs={"ta": True, "tb": False}, tol32=MATMUL_TOL, id="tn"),
    P("matmul", [(M, 33), (1, 33)], np_matmul, attrs={"ta": False, "tb": True}, tol32=MATMUL_TOL, id="nt"),
    P("matmul", [(N, 1), (M, N)], np_matmul, attrs={"ta": True, "tb": True}, tol32=MATMUL_TOL, id="tt"),
    P("matmul", [(1, 33), (33, 1)], np_matmul, attrs={"ta": False, "tb": False}, tol32=MATMUL_TOL,
      id="dot"),
    # the CPU backend's register rows: several column blocks and a partial last group of
    # rows; a transposed B with a short k (transposed first) and a long one (dot products)
    P("matmul", [(9, 3), (3, 140)], np_matmul, attrs={"ta": False, "tb": False}, tol32=MATMUL_TOL,
      id="nn-wide"),
    P("matmul", [(9, 10), (40, 10)], np_matmul, attrs={"ta": False, "tb": True}, tol32=MATMUL_TOL,
      id="nt-short-k"),
    P("matmul", [(5, 40), (6, 40)], np_matmul, attrs={"ta": False, "tb": True}, tol32=MATMUL_TOL,
      id="nt-long-k"),
    # a short C times a transposed B (dot products in registers, a few rows of B at once):
    # 8 rows (3 of B at once, 13 = 4 blocks and one row), a k of whole vectors; 2 rows and
    # a k with a masked last vector
    P("matmul", [(8, 64), (13, 64)], np_matmul, attrs={"ta": False, "tb": True}, tol32=MATMUL_TOL,
      id="nt-dots"),
    P("matmul", [(2, 37), (11, 37)], np_matmul, attrs={"ta": False, "tb": True}, tol32=MATMUL_TOL,
      id="nt-dots-tail"),
    # stacks of products (attention's scores q @ k^T and weighted sums a @ v); one matrix alone
    P("batch_matmul", [(3, M, N), (3, N, 5)], np_batch_matmul, attrs={"ta": False, "tb": False},
      tol32=MATMUL_TOL, id="nn"),
    P("batch_matmul", [(2, N, M), (2, N, 5)], np_batch_matmul, attrs={"ta": True, "tb": False},
      tol32=MATMUL_TOL, id="tn"),
    P("batch_matmul", [(4, M, 33), (4, 9, 33)], np_batch_matmul, attrs={"ta": False, "tb": True},
      tol32=MATMUL_TOL, id="nt"),
    P("batch_matmul", [(2, N, 1), (2, M, N)], np_batch_matmul, attrs={"ta": True, "tb": True},
      tol32=MATMUL_TOL, id="tt"),
    P("batch_matmul", [(1, 5, 40), (1, 40, 6)], np_batch_matmul, attrs={"ta": False, "tb": False},
      tol32=MATMUL_TOL, id="one"),
]

CONV = [
    P("conv2d", [(2, 3, 7, 6), (4, 3, 3, 2)], np_conv2d, attrs={"stride": (1, 1), "pad": (0, 0)},
      tol32=MATMUL_TOL, id="plain"),
    P("conv2d", [(2, 3, 8, 7), (4, 3, 3, 3)], np_conv2d, attrs={"stride": (2, 2), "pad": (1, 1)},
      tol32=MATMUL_TOL, id="stride2-pad1"),
    P("conv2d", [(1, 2, 5, 7), (3, 2, 1, 3)], np_conv2d, attrs={"stride": (1, 3), "pad": (2, 0)},
      tol32=MATMUL_TOL, id="asymmetric"),
    P("conv2d_bwd_data", [(2, 4, 4, 5), (4, 3, 3, 2)], np_conv2d_bwd_data,
      attrs={"in_hw": (8, 6), "stride": (2, 1), "pad": (1, 0)}, tol32=MATMUL_TOL, id="stride2-pad1"),
    P("conv2d_bwd_data", [(1, 3, 5, 4), (3, 2, 3, 3)], np_conv2d_bwd_data,
      attrs={"in_hw": (7, 6), "stride": (1, 1), "pad": (0, 0)}, tol32=MATMUL_TOL, id="plain"),
    P("conv2d_bwd_filter", [(2, 3, 8, 6), (2, 4, 4, 5)], np_conv2d_bwd_filter,
      attrs={"kernel": (3, 2), "stride": (2, 1), "pad": (1, 0)}, tol32=MATMUL_TOL, id="stride2-pad1"),
    P("conv2d_bwd_filter", [(1, 2, 7, 6), (1, 3, 5, 4)], np_conv2d_bwd_filter,
      attrs={"kernel": (3, 3), "stride": (1, 1), "pad": (0, 0)}, tol32=MATMUL_TOL, id="plain"),
    # taps spaced apart: "same" padding; dilated and strided along one axis, each along its own
    P("conv2d", [(2, 3, 7, 6), (4, 3, 3, 2)], np_conv2d, attrs={"stride": (1, 1), "pad": (2, 1), "dilation": (2, 2)},
      tol32=MATMUL_TOL, id="dilated"),
    P("conv2d", [(1, 2, 9, 8), (3, 2, 2, 3)], np_conv2d, attrs={"stride": (2, 1), "pad": (1, 0), "dilation": (3, 2)},
      tol32=MATMUL_TOL, id="dilated-strided"),
    P("conv2d_bwd_data", [(2, 4, 3, 3), (4, 3, 3, 2)], np_conv2d_bwd_data,
      attrs={"in_hw": (8, 6), "stride": (2, 1), "pad": (1, 0), "dilation": (2, 3)}, tol32=MATMUL_TOL, id="dilated"),
    P("conv2d_bwd_filter", [(2, 3, 8, 6), (2, 4, 4, 6)], np_conv2d_bwd_filter,
      attrs={"kernel": (3, 2), "stride": (2, 1), "pad": (2, 1), "dilation": (2, 2)}, tol32=MATMUL_TOL,
      id="dilated"),
]

# The CPU backend's convolution templates (im2col packed on the fly into GEMM panels): each
# packing mode (a whole plane contiguous, grid rows, stride-2 shuffles, gathers), bwd data
# by output phases (vector and scalar interleave, phases no tap reaches), several K and
# column blocks, channels that are not multiples of the register tile or vector width,
# batches split by image and by channel. The templates are the gradients, so no finite
# differences (and the shapes are larger than those rows allow; their float32 sums are long).
def _conv(op, shapes, ref, attrs, id, tol32=(1e-4, 1e-4)):
    return P(op, shapes, ref, attrs=attrs, tol32=tol32, grad="none", id=id)  # long float32 sums


def _s(stride, pad):
    return {"stride": stride, "pad": pad}


def conv_layer_rows(x, w, attrs, id):
    """The template rows of one layer: its forward, data gradient and filter gradient, for
    input shape x, weights w and conv2d's attributes (stride, pad, maybe dilation)."""
    hw, kernel = x[2:], w[2:]
    g = (x[0], w[0]) + tuple(_out(n, k, s, p, d) for n, k, s, p, d in zip(
        hw, kernel, attrs["stride"], attrs["pad"], attrs.get("dilation", (1, 1))))
    return [_conv("conv2d", [x, w], np_conv2d, attrs, id),
            _conv("conv2d_bwd_data", [g, w], np_conv2d_bwd_data, dict(attrs, in_hw=hw), id),
            _conv("conv2d_bwd_filter", [x, g], np_conv2d_bwd_filter, dict(attrs, kernel=kernel), id)]


CONV_TEMPLATES = [
    _conv("conv2d", [(2, 5, 6, 7), (3, 5, 1, 1)], np_conv2d, _s((1, 1), (0, 0)), "t-1x1"),
    _conv("conv2d", [(3, 17, 9, 11), (19, 17, 3, 3)], np_conv2d, _s((1, 1), (1, 1)), "t-3x3-pad1-odd-channels"),
    _conv("conv2d", [(5, 3, 12, 13), (4, 3, 5, 5)], np_conv2d, _s((1, 1), (2, 2)), "t-5x5-pad2"),
    _conv("conv2d", [(2, 6, 9, 11), (7, 6, 3, 3)], np_conv2d, _s((2, 2), (1, 1)), "t-stride2-pad1-odd"),
    _conv("conv2d", [(1, 4, 10, 9), (5, 4, 3, 2)], np_conv2d, _s((3, 3), (1, 0)), "t-stride3-gather"),
    _conv("conv2d", [(4, 3, 10, 19), (6, 3, 3, 3)], np_conv2d, _s((1, 1), (0, 0)), "t-valid-rows"),
    _conv("conv2d", [(2, 2, 6, 5), (2, 2, 3, 2)], np_conv2d, _s((1, 1), (0, 0)), "t-narrow-rows"),
    _conv("conv2d", [(1, 48, 20, 20), (9, 48, 3, 3)], np_conv2d, _s((1, 1), (1, 1)), "t-batch1-blocks"),
    # K = 47*9 = 423: two K blocks of 212 rows, the boundary inside a channel's taps (and below)
    _conv("conv2d", [(1, 47, 7, 9), (13, 47, 3, 3)], np_conv2d, _s((1, 1), (1, 1)), "t-kblock-mid-channel"),
    # stride 2 and gathers over one or two planes
    _conv("conv2d", [(2, 2, 9, 11), (5, 2, 3, 3)], np_conv2d, _s((2, 2), (1, 1)), "t-stride2-few-planes"),
    _conv("conv2d", [(1, 1, 10, 9), (5, 1, 3, 2)], np_conv2d, _s((3, 3), (1, 0)), "t-gather-few-planes"),
    _conv("conv2d_bwd_data", [(2, 3, 4, 4), (3, 5, 1, 1)], np_conv2d_bwd_data,
          dict(_s((2, 2), (0, 0)), in_hw=(8, 7)), "t-1x1-stride2"),
    _conv("conv2d_bwd_data", [(3, 6, 5, 7), (6, 4, 1, 1)], np_conv2d_bwd_data,
          dict(_s((1, 1), (0, 0)), in_hw=(5, 7)), "t-1x1-data"),
    _conv("conv2d_bwd_data", [(5, 19, 9, 11), (19, 17, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (1, 1)), in_hw=(9, 11)), "t-3x3-pad1-odd-channels"),
    _conv("conv2d_bwd_data", [(1, 4, 12, 13), (4, 3, 5, 5)], np_conv2d_bwd_data,
          dict(_s((1, 1), (2, 2)), in_hw=(12, 13)), "t-5x5-pad2-batch1"),
    _conv("conv2d_bwd_data", [(3, 7, 5, 6), (7, 6, 3, 3)], np_conv2d_bwd_data,
          dict(_s((2, 2), (1, 1)), in_hw=(9, 11)), "t-stride2-pad1-odd"),
    # rows of more than two vectors (AVX-512: 37 columns), the last one partial, interleaved
    _conv("conv2d_bwd_data", [(2, 4, 10, 19), (4, 3, 3, 3)], np_conv2d_bwd_data,
          dict(_s((2, 2), (1, 1)), in_hw=(20, 37)), "t-stride2-wide-rows"),
    _conv("conv2d_bwd_data", [(2, 5, 4, 3), (5, 4, 3, 2)], np_conv2d_bwd_data,
          dict(_s((3, 3), (1, 0)), in_hw=(10, 9)), "t-stride3"),
    _conv("conv2d_bwd_data", [(4, 6, 8, 17), (6, 3, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (0, 0)), in_hw=(10, 19)), "t-valid-rows"),
    _conv("conv2d_bwd_data", [(1, 48, 20, 20), (48, 9, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (1, 1)), in_hw=(20, 20)), "t-batch1-blocks"),
    _conv("conv2d_bwd_data", [(2, 47, 7, 9), (47, 5, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (1, 1)), in_hw=(7, 9)), "t-kblock-mid-channel"),
    _conv("conv2d_bwd_filter", [(2, 5, 8, 7), (2, 3, 4, 4)], np_conv2d_bwd_filter,
          dict(_s((2, 2), (0, 0)), kernel=(1, 1)), "t-1x1-stride2"),
    _conv("conv2d_bwd_filter", [(3, 17, 9, 11), (3, 19, 9, 11)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (1, 1)), kernel=(3, 3)), "t-3x3-pad1-odd-channels"),
    _conv("conv2d_bwd_filter", [(1, 3, 12, 13), (1, 4, 12, 13)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (2, 2)), kernel=(5, 5)), "t-5x5-pad2-batch1"),
    _conv("conv2d_bwd_filter", [(2, 6, 9, 11), (2, 7, 5, 6)], np_conv2d_bwd_filter,
          dict(_s((2, 2), (1, 1)), kernel=(3, 3)), "t-stride2-pad1-odd"),
    _conv("conv2d_bwd_filter", [(1, 4, 10, 9), (1, 5, 4, 3)], np_conv2d_bwd_filter,
          dict(_s((3, 3), (1, 0)), kernel=(3, 2)), "t-stride3-gather"),
    _conv("conv2d_bwd_filter", [(2, 3, 30, 30), (2, 6, 30, 30)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (1, 1)), kernel=(3, 3)), "t-position-blocks"),
    _conv("conv2d_bwd_filter", [(1, 48, 6, 6), (1, 9, 6, 6)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (1, 1)), kernel=(3, 3)), "t-many-rows"),
    # a first layer's filter gradient (<= 3 input channels, stride 1) runs directly: a last
    # block of output channels shorter than the others, rows wider than a vector, no padding
    _conv("conv2d_bwd_filter", [(3, 1, 11, 21), (3, 7, 11, 21)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (2, 2)), kernel=(5, 5)), "t-direct-1-channel-5x5"),
    _conv("conv2d_bwd_filter", [(2, 3, 6, 9), (2, 13, 4, 7)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (0, 0)), kernel=(3, 3)), "t-direct-3-channels-valid"),
    # ... or, where "same" padding makes x's rows as wide as g's and they leave lanes idle
    # (AVX-512), over each plane's positions as one flat range, every thread its own
    # images: LeNet's first layer (whole vectors; 4-tap groups along the kernel rows,
    # then down its last column, then one tap); planes of 99 positions (a short last
    # vector), 2 channels, groups of 5 taps across rows; a 3x5 kernel unpadded along y;
    # 14 output channels (2 taps a group) from one image, so that threads get none
    _conv("conv2d_bwd_filter", [(4, 1, 28, 28), (4, 6, 28, 28)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (2, 2)), kernel=(5, 5)), "t-flat-filter-lenet"),
    _conv("conv2d_bwd_filter", [(3, 2, 9, 11), (3, 5, 9, 11)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (1, 1)), kernel=(3, 3)), "t-flat-filter-short-vector"),
    _conv("conv2d_bwd_filter", [(2, 3, 8, 13), (2, 4, 6, 13)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (0, 2)), kernel=(3, 5)), "t-flat-filter-3x5"),
    _conv("conv2d_bwd_filter", [(1, 1, 10, 10), (1, 14, 10, 10)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (1, 1)), kernel=(3, 3)), "t-flat-filter-one-image"),
    # ... and a wider layer's too where its output rows fill the vectors (AVX-512): four
    # blocks of output channels, the last short, padding on every side
    _conv("conv2d_bwd_filter", [(4, 11, 16, 16), (4, 20, 16, 16)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (2, 2)), kernel=(5, 5)), "t-wide-direct"),
    # ... but a 3x3 or smaller kernel's over a window of input rows kept in registers
    # (AVX-512): a first layer on rows of two vectors, its last block of output channels
    # short and a last row after the unrolled triples; an unpadded 2x2 kernel (6 channels
    # a block, then one) on rows of a vector and a quarter, rows left after the pairs;
    # 11 -> 20 channels on 16x16; padding of 2 rows, so that two input rows above the
    # image and two below read zeros
    _conv("conv2d_bwd_filter", [(3, 3, 13, 32), (3, 5, 13, 32)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (1, 1)), kernel=(3, 3)), "t-window-filter-first"),
    _conv("conv2d_bwd_filter", [(2, 2, 10, 21), (2, 7, 9, 20)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (0, 0)), kernel=(2, 2)), "t-window-filter-2x2"),
    _conv("conv2d_bwd_filter", [(4, 11, 16, 16), (4, 20, 16, 16)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (1, 1)), kernel=(3, 3)), "t-window-filter-wide"),
    _conv("conv2d_bwd_filter", [(2, 1, 7, 16), (2, 3, 9, 16)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (2, 1)), kernel=(3, 3)), "t-window-filter-pad2"),
    # 5x5 taps over grid rows narrower than the source: the packer loops over a tap table
    _conv("conv2d", [(3, 7, 13, 14), (5, 7, 5, 5)], np_conv2d, _s((1, 1), (0, 0)), "t-5x5-valid-tap-table"),
    _conv("conv2d_bwd_data", [(2, 5, 9, 10), (5, 7, 5, 5)], np_conv2d_bwd_data,
          dict(_s((1, 1), (0, 0)), in_hw=(13, 14)), "t-5x5-valid-tap-table"),
    _conv("conv2d_bwd_filter", [(2, 7, 13, 14), (2, 5, 9, 10)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (0, 0)), kernel=(5, 5)), "t-5x5-valid-tap-table"),
    # ... and over vectors of 16 output channels where those rows would leave lanes idle
    # (AVX-512): LeNet's second layer; stride 2 and padding over 30 positions (a short last
    # block of g to transpose), two channels a tile; a 3x2 kernel, three channels a tile;
    # two vectors of channels, both in each tile; a 1x1 kernel over three vectors of
    # channels, 20 channels a tile; 2-wide rows; four vectors of channels in two tiles of
    # two (a thread may span both)
    _conv("conv2d_bwd_filter", [(2, 6, 14, 14), (2, 16, 10, 10)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (0, 0)), kernel=(5, 5)), "t-vector-filter-lenet"),
    _conv("conv2d_bwd_filter", [(3, 4, 9, 11), (3, 16, 5, 6)], np_conv2d_bwd_filter,
          dict(_s((2, 2), (1, 1)), kernel=(3, 3)), "t-vector-filter-stride2"),
    _conv("conv2d_bwd_filter", [(2, 3, 7, 8), (2, 16, 9, 9)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (2, 1)), kernel=(3, 2)), "t-vector-filter-3x2"),
    _conv("conv2d_bwd_filter", [(2, 6, 9, 11), (2, 32, 5, 6)], np_conv2d_bwd_filter,
          dict(_s((2, 2), (1, 1)), kernel=(3, 3)), "t-vector-filter-two-vectors"),
    _conv("conv2d_bwd_filter", [(2, 20, 7, 16), (2, 48, 7, 16)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (0, 0)), kernel=(1, 1)), "t-vector-filter-1x1"),
    # rows so narrow that every position has a tap outside the row
    _conv("conv2d_bwd_filter", [(2, 3, 4, 2), (2, 16, 4, 2)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (1, 1)), kernel=(3, 3)), "t-vector-filter-narrow"),
    _conv("conv2d_bwd_filter", [(2, 12, 6, 16), (2, 64, 6, 16)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (0, 0)), kernel=(1, 1)), "t-vector-filter-pairs"),
    # a filter gradient as a GEMM over several blocks of positions (the last partial; its
    # 24-wide rows leave too many lanes idle for the direct form), and with more output
    # channels than a vector holds
    _conv("conv2d_bwd_filter", [(1, 4, 24, 24), (1, 17, 24, 24)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (1, 1)), kernel=(3, 3)), "t-gemm-position-blocks"),
    _conv("conv2d_bwd_filter", [(2, 6, 7, 8), (2, 40, 7, 8)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (1, 1)), kernel=(3, 3)), "t-gemm-40-channels"),
    # a data gradient whose input is much larger than g is scattered (w^T g, then col2im):
    # more input channels than a register tile has rows, taps clipped by padding on every side
    _conv("conv2d_bwd_data", [(3, 5, 8, 8), (5, 11, 7, 7)], np_conv2d_bwd_data,
          dict(_s((1, 1), (1, 1)), in_hw=(12, 12)), "t-col2im-pad1-groups"),
    _conv("conv2d_bwd_data", [(2, 16, 10, 10), (16, 6, 5, 5)], np_conv2d_bwd_data,
          dict(_s((1, 1), (0, 0)), in_hw=(14, 14)), "t-col2im-lenet"),
    # ... and a plane too large for its col2im to be written out tap by tap (a loop)
    _conv("conv2d_bwd_data", [(1, 3, 18, 18), (3, 2, 7, 7)], np_conv2d_bwd_data,
          dict(_s((1, 1), (0, 0)), in_hw=(24, 24)), "t-col2im-loop"),
    # 16 output channels, at least 64 taps, rows of at most 16, a batch split by images:
    # the direct forward (AVX-512), in tiles of whole rows (2 rows of 8, the last tile one
    # row; 3 rows of 5, then one), padded or not
    _conv("conv2d", [(32, 8, 9, 8), (16, 8, 3, 3)], np_conv2d, _s((1, 1), (1, 1)), "t-direct-forward-pad"),
    _conv("conv2d", [(33, 3, 11, 9), (16, 3, 5, 5)], np_conv2d, _s((1, 1), (0, 0)), "t-direct-forward-5x5"),
    # a first layer with few output channels, a batch split by images: the plane-wise
    # direct forward (AVX-512), in tiles of rows of every channel (LeNet's first layer;
    # 12-wide rows in tiles of 4, then one; a 3x5 kernel padded along one axis only)
    _conv("conv2d", [(32, 1, 28, 28), (6, 1, 5, 5)], np_conv2d, _s((1, 1), (2, 2)), "t-planes-forward-lenet"),
    _conv("conv2d", [(33, 3, 15, 14), (5, 3, 3, 3)], np_conv2d, _s((1, 1), (0, 0)), "t-planes-forward-valid"),
    _conv("conv2d", [(32, 2, 9, 20), (3, 2, 3, 5)], np_conv2d, _s((1, 1), (1, 0)), "t-planes-forward-3x5"),
    # ... and, wider, in tiles of some output channels (two blocks of 6 channels x 4 rows,
    # then 3 rows)
    _conv("conv2d", [(32, 5, 7, 14), (12, 5, 3, 3)], np_conv2d, _s((1, 1), (1, 1)), "t-planes-forward-blocks"),
    # rows of two vectors, read in place: padded, three channels; unpadded, the last
    # vector's lanes past the row masked off
    _conv("conv2d", [(32, 3, 9, 26), (4, 3, 3, 3)], np_conv2d, _s((1, 1), (1, 1)), "t-planes-forward-in-place"),
    _conv("conv2d", [(32, 2, 6, 28), (3, 2, 3, 3)], np_conv2d, _s((1, 1), (0, 0)),
          "t-planes-forward-in-place-valid"),
    # a stride-1 data gradient the same way, over g padded by the flipped kernel: one block
    # of every channel; two blocks of a 5x3 kernel padded unevenly; an unpadded layer
    # (g padded by 2, its last tile 2 rows)
    _conv("conv2d_bwd_data", [(32, 12, 7, 14), (12, 5, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (1, 1)), in_hw=(7, 14)), "t-planes-data-pad1"),
    _conv("conv2d_bwd_data", [(33, 4, 6, 30), (4, 8, 5, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (2, 1)), in_hw=(6, 30)), "t-planes-data-5x3"),
    _conv("conv2d_bwd_data", [(32, 6, 12, 12), (6, 4, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (0, 0)), in_hw=(14, 14)), "t-planes-data-valid"),
    # padded by more than the kernel spans (3 for a 3x3): a GEMM, g padded by -1 otherwise
    _conv("conv2d_bwd_data", [(32, 4, 14, 16), (4, 3, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (3, 3)), in_hw=(10, 12)), "t-overpadded-data"),
    # a strided data gradient onto whole vectors of channels, directly (AVX-512), rows of
    # dx in tiles of 16 positions: 10-wide rows (one short tile; the last row and column
    # reached by taps past g's end); two blocks of channels, strides (2, 1) on 19-wide
    # rows (a full tile, then a short one; taps before g's first row and past its last);
    # 2x2 at stride 3 (positions no tap reaches)
    _conv("conv2d_bwd_data", [(32, 5, 5, 5), (5, 16, 3, 3)], np_conv2d_bwd_data,
          dict(_s((2, 2), (1, 1)), in_hw=(10, 10)), "t-strided-data-pad1"),
    _conv("conv2d_bwd_data", [(33, 4, 3, 17), (4, 32, 3, 3)], np_conv2d_bwd_data,
          dict(_s((2, 1), (0, 0)), in_hw=(8, 19)), "t-strided-data-blocks"),
    _conv("conv2d_bwd_data", [(32, 3, 3, 3), (3, 16, 2, 2)], np_conv2d_bwd_data,
          dict(_s((3, 3), (0, 0)), in_hw=(8, 8)), "t-strided-data-gaps"),
    # a batch of 32 images or more is split over images whatever the thread count
    _conv("conv2d", [(33, 3, 5, 6), (4, 3, 3, 3)], np_conv2d, _s((1, 1), (1, 1)), "t-batch33-by-images"),
    _conv("conv2d_bwd_data", [(33, 4, 3, 3), (4, 3, 3, 3)], np_conv2d_bwd_data,
          dict(_s((2, 2), (1, 1)), in_hw=(5, 6)), "t-batch33-by-images"),
    # dilated kernels (the packed-GEMM form, each tap read at its spaced offset), on shapes
    # whose undilated layers take the direct forms: "same" padding over whole planes (32
    # channels on 16-wide rows, the DeepLab layers' shape), unpadded rows, dilation along one
    # axis with a stride along it (the data gradient's phases: some no tap reaches) and a
    # gathered stride of 3
    *[row for name, stride, pad, dil, x, w in [
        ("same", (1, 1), (2, 2), (2, 2), (2, 32, 16, 16), (32, 32, 3, 3)),
        ("valid", (1, 1), (0, 0), (3, 2), (3, 5, 12, 13), (16, 5, 3, 3)),
        ("strided", (2, 1), (2, 1), (2, 3), (2, 16, 11, 10), (7, 16, 3, 2)),
        ("gather", (3, 3), (1, 2), (2, 2), (1, 4, 13, 12), (5, 4, 3, 3))]
      for row in conv_layer_rows(x, w, dict(_s(stride, pad), dilation=dil), f"t-dilated-{name}")],
    # ... and where the plane-wise direct form takes them (AVX-512, a batch of 32 or more):
    # the forward from a padded copy (14-wide rows) and in place (rows of two vectors,
    # dilated 2 x 3, padded unevenly); the data gradient the same two ways, the second
    # padded by more than the kernel spans along its rows (a GEMM instead: g would be
    # padded by -2)
    _conv("conv2d", [(32, 3, 12, 14), (8, 3, 3, 3)], np_conv2d, dict(_s((1, 1), (2, 2)), dilation=(2, 2)),
          "t-dilated-planes-forward"),
    _conv("conv2d", [(32, 2, 9, 30), (4, 2, 3, 2)], np_conv2d, dict(_s((1, 1), (2, 1)), dilation=(2, 3)),
          "t-dilated-planes-forward-in-place"),
    _conv("conv2d_bwd_data", [(32, 8, 12, 14), (8, 3, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (2, 2)), dilation=(2, 2), in_hw=(12, 14)), "t-dilated-planes-data"),
    _conv("conv2d_bwd_data", [(33, 4, 11, 32), (4, 3, 3, 2)], np_conv2d_bwd_data,
          dict(_s((1, 1), (3, 4)), dilation=(2, 2), in_hw=(9, 26)), "t-dilated-planes-data-overpadded"),
    _conv("conv2d_bwd_data", [(32, 4, 10, 28), (4, 3, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (1, 1)), dilation=(1, 2), in_hw=(10, 30)), "t-dilated-planes-data-in-place"),
    # Winograd (AVX-512 or AVX2, 32 channels or more each way, a batch of 32 or more), F(2x2):
    # odd sizes (a last row and column of tiles half outside the output), unpadded with
    # output channels not a whole number of register tiles, dilated 2 x 3 and padded
    # unevenly (tiles of each output phase); the data gradient padded, unpadded (g padded
    # by 2) and dilated
    _conv("conv2d", [(32, 64, 7, 9), (64, 64, 3, 3)], np_conv2d, _s((1, 1), (1, 1)), "t-winograd-odd"),
    _conv("conv2d", [(33, 64, 10, 12), (80, 64, 3, 3)], np_conv2d, _s((1, 1), (0, 0)), "t-winograd-valid"),
    _conv("conv2d", [(32, 64, 11, 12), (64, 64, 3, 3)], np_conv2d, dict(_s((1, 1), (2, 1)), dilation=(2, 3)),
          "t-winograd-dilated"),
    _conv("conv2d_bwd_data", [(32, 64, 7, 9), (64, 96, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (1, 1)), in_hw=(7, 9)), "t-winograd-data"),
    _conv("conv2d_bwd_data", [(32, 64, 10, 12), (64, 64, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (0, 0)), in_hw=(12, 14)), "t-winograd-data-valid"),
    _conv("conv2d_bwd_data", [(32, 80, 9, 10), (80, 64, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (2, 2)), dilation=(2, 2), in_hw=(9, 10)), "t-winograd-data-dilated"),
    # ... and F(4x4) (16 tiles of 4x4 or more): odd sizes, several panels of tiles (96 -> 64
    # channels) with a last row of tiles 3/4 outside the output; the data gradient dilated
    # (DeepLab's 32 channels, d = 2) and unpadded
    _conv("conv2d", [(32, 32, 30, 34), (32, 32, 3, 3)], np_conv2d, _s((1, 1), (1, 1)), "t-winograd4-odd"),
    _conv("conv2d", [(32, 96, 29, 33), (64, 96, 3, 3)], np_conv2d, _s((1, 1), (1, 1)), "t-winograd4-panels"),
    _conv("conv2d_bwd_data", [(32, 32, 32, 32), (32, 32, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (2, 2)), dilation=(2, 2), in_hw=(32, 32)), "t-winograd4-data-dilated"),
    _conv("conv2d_bwd_data", [(32, 48, 30, 30), (48, 32, 3, 3)], np_conv2d_bwd_data,
          dict(_s((1, 1), (0, 0)), in_hw=(32, 32)), "t-winograd4-data-valid"),
    # ... and the filter gradient (chunks of images; panels of several images' tiles or of
    # one image's): F(2x2), odd sizes onto 80 channels, 33 images (chunks of 5, the last of
    # 3; panels of 2 images, the last of 1), and dilated 2 x 3, padded unevenly; F(4x4),
    # several panels an image (96 -> 64 channels), DeepLab's 32 channels dilated by 2, and
    # unpadded onto 48 channels from 33 images. Each element sums 2,000-32,000 products of
    # normal numbers (RMS 45-180), and F(4x4)'s error is 1.2-1.7e-6 of that RMS (the
    # direct forms' 0.3-0.8e-6): an absolute tolerance of 1e-2 (as checked, 10x the row's)
    # is 5.5e-5 of it at most
    _conv("conv2d_bwd_filter", [(33, 64, 7, 9), (33, 80, 7, 9)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (1, 1)), kernel=(3, 3)), "t-wino-filter-odd", (1e-4, 1e-3)),
    _conv("conv2d_bwd_filter", [(32, 64, 11, 12), (32, 64, 11, 8)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (2, 1)), dilation=(2, 3), kernel=(3, 3)), "t-wino-filter-dilated", (1e-4, 1e-3)),
    _conv("conv2d_bwd_filter", [(32, 96, 29, 33), (32, 64, 29, 33)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (1, 1)), kernel=(3, 3)), "t-wino-filter4-panels", (1e-4, 1e-3)),
    _conv("conv2d_bwd_filter", [(32, 32, 32, 32), (32, 32, 32, 32)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (2, 2)), dilation=(2, 2), kernel=(3, 3)), "t-wino-filter4-dilated", (1e-4, 1e-3)),
    _conv("conv2d_bwd_filter", [(33, 32, 16, 16), (33, 48, 14, 14)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (0, 0)), kernel=(3, 3)), "t-wino-filter4-valid", (1e-4, 1e-3)),
    # rows of a narrow grid strided down the columns only, packed by a loop over taps
    _conv("conv2d", [(2, 3, 8, 3), (4, 3, 3, 3)], np_conv2d, _s((2, 1), (1, 0)), "t-stride2x1-tap-loop"),
    _conv("conv2d", [(1, 1, 8, 6), (3, 1, 3, 2)], np_conv2d, dict(_s((2, 1), (1, 0)), dilation=(1, 3)),
          "t-dilated-stride2x1-tap-loop"),
    # the direct filter gradient's: a first layer (rows wider than a vector, padded
    # unevenly, a short last block of output channels) and, with AVX-512, a wider one
    _conv("conv2d_bwd_filter", [(3, 2, 11, 21), (3, 7, 11, 17)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (2, 1)), dilation=(2, 3), kernel=(3, 3)), "t-dilated-direct-filter"),
    _conv("conv2d_bwd_filter", [(4, 11, 16, 16), (4, 20, 16, 16)], np_conv2d_bwd_filter,
          dict(_s((1, 1), (2, 2)), dilation=(2, 2), kernel=(3, 3)), "t-dilated-direct-filter-wide"),
]

_POOL = [("max", (2, 2), (2, 2), (0, 0), (2, 3, 7, 5), "k2"),
         ("max", (3, 3), (2, 2), (1, 1), (2, 3, 7, 6), "k3-s2-pad1"),
         ("max", (3, 1), (1, 1), (0, 0), (1, 2, 5, 3), "k31-s1"),
         ("avg", (2, 2), (2, 2), (0, 0), (2, 3, 7, 5), "k2"),
         ("avg", (3, 3), (2, 2), (1, 1), (2, 3, 7, 6), "k3-s2-pad1")]
POOL = []
for _mode, _k, _s, _p, _shape, _id in _POOL:
    _attrs = {"mode": _mode, "kernel": _k, "stride": _s, "pad": _p}
    _gshape = _shape[:2] + (_out(_shape[2], _k[0], _s[0], _p[0]), _out(_shape[3], _k[1], _s[1], _p[1]))
    POOL.append(P("pool2d", [_shape], np_pool, attrs=_attrs, id=f"{_mode}-{_id}"))
    # max mode has no second derivative: autodiff must refuse it with a DlcError
    POOL.append(P("pool2d_bwd", [_shape, _gshape], np_pool_bwd, attrs=_attrs, id=f"{_mode}-{_id}",
                  grad="raises" if _mode == "max" else "fd"))

# ties: the vectorized max gradient sends each window's gradient to its first maximum
POOL += [P("pool2d_bwd", [(2, 3, 9, 37), (2, 3, 4, 18)], np_pool_bwd, inputs=[small_ints_f32, DOMAIN],
           attrs={"mode": "max", "kernel": (2, 2), "stride": (2, 2), "pad": (0, 0)}, grad="none", id="max-k2-ties"),
         P("pool2d", [(2, 3, 9, 37)], np_pool, inputs=[small_ints_f32],
           attrs={"mode": "max", "kernel": (3, 2), "stride": (1, 2), "pad": (1, 0)}, grad="none", id="max-k32-s12")]

GATHER = [
    P("take", [(N, 4), (2, 5)], np_take, inputs=[DOMAIN, ints(0, N)], id="repeats"),
    P("take", [(N, 4), ()], np_take, inputs=[DOMAIN, ints(0, N)], id="rank0-index"),
    P("take", [(33,), (M,)], np_take, inputs=[DOMAIN, ints(0, 33)], id="rank1-table"),
    P("scatter_add", [(2, 5, 4), (2, 5)], np_scatter_add, attrs={"rows": N}, inputs=[DOMAIN, ints(0, N)],
      id="repeats"),
    P("scatter_add", [(4,), ()], np_scatter_add, attrs={"rows": M}, inputs=[DOMAIN, ints(0, M)],
      id="rank0-index"),
]

SOURCES = [
    P("iota", [], lambda shape, axis, dtype: np.indices(shape)[axis].astype(np.int32),
      attrs={"shape": (M, N), "axis": 1, "dtype": I32}, grad="none", id="i32-axis1"),
    P("iota", [], lambda shape, axis, dtype: np.indices(shape)[axis].astype(np.float32),
      attrs={"shape": (33, 1, 2), "axis": 0, "dtype": F32}, grad="none", id="f32-axis0"),
    P("size", [(M, N, 2)], lambda x, axes: np.float32(np.prod([x.shape[a] for a in axes])),
      attrs={"axes": (0, 2)}),
    P("size", [(M, N)], lambda x, axes: np.float32(1.0), attrs={"axes": ()}, id="no-axes"),
    P("random", [(), ()], np_random, attrs={"shape": (M, N), "stream": 5},
      inputs=[scalar_i32(7), scalar_i32(3)], grad="none"),
    P("random", [(), ()], np_random, attrs={"shape": (33,), "stream": 0},
      inputs=[scalar_i32(-1), scalar_i32(0)], grad="none", id="negative-seed"),
    P("random", [(), (), ()], lambda seed, step, first, shape, stream: np_random(seed, step, shape, stream, first),
      attrs={"shape": (M, N), "stream": 5}, inputs=[scalar_i32(7), scalar_i32(3), scalar_i32(11)], grad="none",
      id="from-row-11"),
    P("random", [(), (), (), ()], lambda seed, step, first, total, shape, stream, axis:
      np_random(seed, step, (2, int(total), 5), stream)[:, first:first + 3],
      attrs={"shape": (2, 3, 5), "stream": 9, "axis": 1},
      inputs=[scalar_i32(4), scalar_i32(1), scalar_i32(2), scalar_i32(7)], grad="none", id="slice-of-axis-1"),
]

# allreduce: the sum over the ranks of a data-parallel job; a test process is a job of one
COLLECTIVES = [
    P("allreduce", [(M, N)], lambda x, bucket, part: x, attrs={"bucket": -1, "part": 0}),
    P("allreduce", [()], lambda x, bucket, part: x, attrs={"bucket": 3, "part": 1}, id="scalar"),
]

PRIMITIVES: list[OpCase] = (UNARY + CASTS + BINARY + COMPARE + WHERE + REDUCE + MOVEMENT + MATMUL + CONV
                            + CONV_TEMPLATES + POOL + GATHER + SOURCES + COLLECTIVES)


# --- composite rows ------------------------------------------------------------------------------

def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _axes(x, axis):
    return None if axis is None else (axis if isinstance(axis, int) else tuple(axis))


DROPOUT_SEED, DROPOUT_STEP, DROPOUT_STREAM = 11, 4, 77  # what the test LayerContext's rng() gives


def _dropout_ref(x, p):
    keep = np_random(DROPOUT_SEED, DROPOUT_STEP, x.shape, DROPOUT_STREAM) >= p
    return np.where(keep, x / (1.0 - p), 0.0)


COMPOSITES: list[OpCase] = [
    # layers
    C("dense", [(M, N)], lambda x, w, b: x @ w + b, attrs={"units": 5}, tol32=MATMUL_TOL),
    C("dense", [(2, M, N)], lambda x, w: np.einsum("abk,kn->abn", x, w), attrs={"units": 1, "bias": False},
      tol32=MATMUL_TOL, id="rank3-nobias"),
    C("conv2d", [(2, 3, 7, 6)], lambda x, w, b: np_conv2d(x, w, (2, 2), (1, 1)) + b[None, :, None, None],
      attrs={"channels": 4, "kernel": 3, "stride": 2, "pad": 1}, tol32=MATMUL_TOL),
    C("conv2d", [(2, 4, 6, 5)], lambda x, w, b: np_conv2d_grouped(x, w, (1, 1), (1, 1), (1, 1), 2) + b[None, :, None, None],
      attrs={"channels": 6, "kernel": 3, "pad": 1, "groups": 2}, tol32=MATMUL_TOL, id="groups"),
    # depthwise (a group per input channel), two outputs per channel, strided
    C("conv2d", [(2, 3, 7, 6)], lambda x, w: np_conv2d_grouped(x, w, (2, 1), (1, 0), (1, 1), 3),
      attrs={"channels": 6, "kernel": [3, 2], "stride": [2, 1], "pad": [1, 0], "groups": 3, "bias": False},
      tol32=MATMUL_TOL, id="depthwise"),
    C("conv2d", [(1, 2, 8, 7)], lambda x, w, b: np_conv2d_grouped(x, w, (1, 1), (2, 2), (2, 2), 1) + b[None, :, None, None],
      attrs={"channels": 3, "kernel": 3, "pad": "same", "dilation": 2}, tol32=MATMUL_TOL, id="dilated"),
    C("conv2d", [(2, 2, 9, 8)], lambda x, w: np_conv2d_grouped(x, w, (2, 2), (1, 0), (3, 2), 2),
      attrs={"channels": 2, "kernel": 2, "stride": 2, "pad": [1, 0], "dilation": [3, 2], "groups": 2, "bias": False},
      tol32=MATMUL_TOL, id="depthwise-dilated"),
    # dilated rows, strided columns
    C("conv2d", [(2, 3, 9, 8)], lambda x, w, b: np_conv2d_grouped(x, w, (1, 2), (3, 1), (3, 1), 1) + b[None, :, None, None],
      attrs={"channels": 4, "kernel": [2, 3], "stride": [1, 2], "pad": [3, 1], "dilation": [3, 1]},
      tol32=MATMUL_TOL, id="dilated-rows"),
    C("conv_transpose2d", [(2, 3, 4, 5)],
      lambda x, w, b: np_conv_transpose2d(x, w, (2, 2), (1, 1), (1, 1)) + b[None, :, None, None],
      attrs={"channels": 2, "kernel": 3, "stride": 2, "pad": 1, "output_pad": 1}, tol32=MATMUL_TOL),
    C("conv_transpose2d", [(1, 2, 3, 3)], lambda x, w: np_conv_transpose2d(x, w, (1, 2), (0, 1), (0, 0)),
      attrs={"channels": 3, "kernel": [2, 4], "stride": [1, 2], "pad": [0, 1], "bias": False}, tol32=MATMUL_TOL,
      id="rectangular"),
    C("conv_transpose2d", [(2, 3, 4, 3)],
      lambda x, w, b: np_conv_transpose2d(x, w, (2, 1), (2, 1), (1, 0), (2, 3)) + b[None, :, None, None],
      attrs={"channels": 2, "kernel": [3, 2], "stride": [2, 1], "pad": [2, 1], "output_pad": [1, 0],
             "dilation": [2, 3]}, tol32=MATMUL_TOL, id="dilated"),
    C("conv2d", [(1, 2, 5, 5)], lambda x, w, b: np_conv2d(x, w, (1, 1), (1, 2)) + b[None, :, None, None],
      attrs={"channels": 3, "kernel": (3, 5), "pad": "same"}, tol32=MATMUL_TOL, id="same"),
    C("maxpool", [(2, 3, 7, 5)], lambda x: np_pool(x, "max", (2, 2), (2, 2), (0, 0))),
    C("maxpool", [(1, 2, 7, 7)], lambda x: np_pool(x, "max", (3, 3), (2, 2), (1, 1)),
      attrs={"kernel": 3, "stride": 2, "pad": 1}, id="k3-s2-pad1"),
    C("avgpool", [(2, 3, 7, 5)], lambda x: np_pool(x, "avg", (2, 2), (2, 2), (0, 0))),
    C("avgpool", [(1, 2, 7, 7)], lambda x: np_pool(x, "avg", (3, 3), (2, 2), (1, 1)),
      attrs={"kernel": 3, "stride": 2, "pad": 1}, id="k3-s2-pad1"),
    C("maxpool", [(2, 2, 7, 6)], lambda x: np_pool_rounding_up(x, "max", 2, 2, 0),
      attrs={"kernel": 2, "ceil": True}, id="ceil"),
    C("maxpool", [(1, 2, 7, 8)], lambda x: np_pool_rounding_up(x, "max", 3, 2, 1),
      attrs={"kernel": 3, "stride": 2, "pad": 1, "ceil": True}, id="ceil-k3-s2-pad1"),
    C("avgpool", [(2, 2, 7, 6)], lambda x: np_pool_rounding_up(x, "avg", 3, 2, 0),
      attrs={"kernel": 3, "stride": 2, "ceil": True}, id="ceil"),
    C("avgpool", [(1, 2, 7, 7)], lambda x: np_pool_rounding_up(x, "avg", 3, 2, 1, ceil=False, count_pad=False),
      attrs={"kernel": 3, "stride": 2, "pad": 1, "count_pad": False}, id="count-pad-false"),
    C("avgpool", [(1, 2, 6, 7)], lambda x: np_pool_rounding_up(x, "avg", 3, 2, 1, count_pad=False),
      attrs={"kernel": 3, "stride": 2, "pad": 1, "ceil": True, "count_pad": False}, id="ceil-count-pad-false"),
    C("maxpool", [(2, 3, 7)],  # (the last window holds the last step alone)
      lambda x: np_pool1d(np.pad(x, ((0, 0), (0, 0), (0, 1)), constant_values=-np.inf), "max", 2, 2, 0),
      attrs={"ceil": True}, id="over-time-ceil"),
    C("global_avgpool", [(2, 3, 7, 5)], lambda x: x.mean(axis=(2, 3))),
    C("global_avgpool", [(2, 3, 7)], lambda x: x.mean(axis=2), id="over-time"),
    C("conv1d", [(2, 3, 9)], lambda x, w, b: np_conv1d(x, w, 2, 1) + b[None, :, None],
      attrs={"channels": 4, "kernel": 3, "stride": 2, "pad": 1}, tol32=MATMUL_TOL),
    C("conv1d", [(1, 2, 6)], lambda x, w, b: np_conv1d(x, w, 1, 2) + b[None, :, None],
      attrs={"channels": 3, "kernel": 5, "pad": "same"}, tol32=MATMUL_TOL, id="same"),
    C("conv1d", [(2, 4, 11)],
      lambda x, w, b: np_conv2d_grouped(x[:, :, None], w[:, :, None], (1, 1), (0, 2), (1, 2), 2)[:, :, 0]
      + b[None, :, None], attrs={"channels": 4, "kernel": 3, "pad": "same", "dilation": 2, "groups": 2},
      tol32=MATMUL_TOL, id="dilated-groups"),
    C("conv1d", [(2, 3, 20)], lambda x, w: np_conv2d_grouped(x[:, :, None], w[:, :, None], (1, 1), (0, 0), (1, 8), 1)[:, :, 0],
      attrs={"channels": 2, "kernel": 2, "dilation": 8, "bias": False}, tol32=MATMUL_TOL, id="wide-dilation"),
    C("maxpool", [(2, 3, 7)], lambda x: np_pool1d(x, "max", 2, 2, 0), id="over-time"),
    C("maxpool", [(1, 2, 8)], lambda x: np_pool1d(x, "max", 3, 2, 1), attrs={"kernel": 3, "stride": 2, "pad": 1},
      id="over-time-k3-s2-pad1"),
    C("avgpool", [(1, 2, 8)], lambda x: np_pool1d(x, "avg", 3, 1, 1), attrs={"kernel": 3, "stride": 1, "pad": 1},
      id="over-time-k3-s1-pad1"),
    C("flatten", [(2, 3, 1, 7)], lambda x: x.reshape(x.shape[0], -1)),
    C("dropout", [(M, 33)], lambda x: _dropout_ref(x, 0.25), attrs={"p": 0.25}, id="train"),
    C("dropout", [(M, N)], lambda x: x, attrs={"p": 0.5}, training=False, id="eval"),
    C("batchnorm", [(5, M)], lambda x, **p: np_batchnorm(x, training=True, **p),
      params={"gamma": (0.5, 1.5), "running_var": (0.5, 2.0)}, id="train-2d"),
    C("batchnorm", [(2, M, 3, 2)], lambda x, **p: np_batchnorm(x, training=True, **p),
      params={"gamma": (0.5, 1.5), "running_var": (0.5, 2.0)}, id="train-4d"),
    C("batchnorm", [(2, M, 3, 2)], lambda x, **p: np_batchnorm(x, training=True, **p), attrs={"sync": True},
      params={"gamma": (0.5, 1.5), "running_var": (0.5, 2.0)}, id="train-4d-sync"),
    C("batchnorm", [(2, M, 3, 2)], lambda x, **p: np_batchnorm(x, training=False, **p),
      params={"gamma": (0.5, 1.5), "running_var": (0.5, 2.0)}, training=False, id="eval-4d"),
    C("layernorm", [(5, N)], lambda x, gamma, beta: np_layernorm(x, gamma, beta), params={"gamma": (0.5, 1.5)}),
    C("layernorm", [(2, M, 4)], lambda x, gamma, beta: np_layernorm(x, gamma, beta, 0.1), attrs={"eps": 0.1},
      params={"gamma": (0.5, 1.5)}, id="rank3-eps"),
    C("layernorm", [(M, N)], lambda x, gamma, beta: np_layernorm(x, gamma, beta), training=False,
      params={"gamma": (0.5, 1.5)}, id="eval"),
    C("layernorm", [(2, M, 4, 2)], lambda x, gamma, beta: np_layernorm(x, gamma, beta, axis=1), attrs={"axis": 1},
      params={"gamma": (0.5, 1.5)}, id="over-chw"),
    C("layernorm", [(2, M, 4)], lambda x, gamma, beta: np_layernorm(x, gamma, beta, axis=-2), attrs={"axis": -2},
      params={"gamma": (0.5, 1.5)}, id="last-two"),
    C("groupnorm", [(2, 6, 3, 2)], lambda x, gamma, beta: np_groupnorm(x, 3, gamma, beta), attrs={"groups": 3},
      params={"gamma": (0.5, 1.5), "beta": (-0.5, 0.5)}),
    C("groupnorm", [(2, 4, 5)], lambda x: np_groupnorm(x, 4, eps=0.1), attrs={"groups": 4, "eps": 0.1,
                                                                              "affine": False}, id="instance"),
    C("groupnorm", [(3, M)], lambda x, gamma, beta: np_groupnorm(x, 1, gamma, beta), attrs={"groups": 1},
      params={"gamma": (0.5, 1.5)}, id="one-group"),
    C("embedding", [(2, 5)], lambda x, table: table[x], attrs={"vocab": N, "dim": 4}, inputs=[ints(0, N)]),
    C("rnn", [(2, M, 4)], lambda x, wx, wh, b: np_rnn(x, wx, wh, b), attrs={"hidden": 5}, tol32=(1e-5, 1e-5)),
    C("rnn", [(2, M, 4)], lambda x, wx, wh, b: np_rnn(x, wx, wh, b, True, act=lambda z: np.maximum(z, 0.0)),
      attrs={"hidden": 5, "activation": "relu", "return_sequences": True}, tol32=(1e-5, 1e-5), id="relu"),
    C("rnn", [(1, 2, 3)], lambda x, wx, wh, b: np_rnn(x, wx, wh, b, True),
      attrs={"hidden": 2, "return_sequences": True}, tol32=(1e-5, 1e-5), id="sequences"),
    C("lstm", [(2, M, 4)], lambda x, w, u, b: np_lstm(x, w, u, b), attrs={"hidden": 3}, tol32=(1e-5, 1e-5)),
    C("lstm", [(1, 2, 3)], lambda x, w, u, b: np_lstm(x, w, u, b, True),
      attrs={"hidden": 2, "return_sequences": True}, tol32=(1e-5, 1e-5), id="sequences"),
    C("gru", [(2, M, 4)], lambda x, w, u, b, bh: np_gru(x, w, u, b, bh), attrs={"hidden": 5},
      tol32=(1e-5, 1e-5)),
    C("gru", [(1, 2, 3)], lambda x, w, u, b, bh: np_gru(x, w, u, b, bh, True),
      attrs={"hidden": 2, "return_sequences": True}, tol32=(1e-5, 1e-5), id="sequences"),
    # options: stacked layers, both directions, dropout between layers (odd sizes throughout)
    recurrent_row("rnn", (2, 2, 3), 2, layers=2, bidirectional=True, return_sequences=True),
    recurrent_row("rnn", (1, M, 3), 3, bidirectional=True),
    recurrent_row("rnn", (3, 2, 1), 1, layers=3),
    recurrent_row("rnn", (2, 2, 3), 3, layers=2, dropout=0.3),
    recurrent_row("lstm", (2, 2, 5), 3, layers=2),
    recurrent_row("lstm", (1, M, 2), 2, bidirectional=True, return_sequences=True),
    recurrent_row("lstm", (2, 2, 3), 2, layers=2, bidirectional=True),
    recurrent_row("lstm", (2, 2, 3), 2, layers=2, dropout=0.5, return_sequences=True),
    recurrent_row("gru", (2, 2, 3), 2, layers=2, bidirectional=True, return_sequences=True),
    recurrent_row("gru", (1, M, 2), 3, bidirectional=True),
    recurrent_row("gru", (2, 2, 1), 1, layers=3, return_sequences=True),
    recurrent_row("gru", (2, 2, 3), 3, layers=2, dropout=0.4),
    recurrent_row("gru", (2, 2, 3), 3, layers=2, dropout=0.4, training=False),
    # initial states (their gradients checked too), final states, masks of padded steps
    state_row("rnn", [(2, M, 4), (2, 3)], 3, initial=True),
    state_row("rnn", [(3, 4, 2), (3, 4)], 2, inputs=[DOMAIN, post_padding], mask=True,
              return_sequences=True),
    state_row("rnn", [(3, 4, 2), (2, 3, 2), (3, 4)], 2, inputs=[DOMAIN, DOMAIN, post_padding], initial=True,
              mask=True, return_state=True, layers=2),
    state_row("lstm", [(2, M, 3), (2, 2), (2, 2)], 2, initial=True, return_state=True),
    state_row("lstm", [(2, M, 3), (1, 2, 2), (1, 2, 2)], 2, initial=True, return_state=True,
              return_sequences=True),
    state_row("lstm", [(3, 4, 2), (3, 4)], 3, inputs=[DOMAIN, post_padding], mask=True, return_state=True),
    state_row("lstm", [(3, 4, 2), (3, 4)], 2, inputs=[DOMAIN, post_padding], mask=True,
              return_sequences=True, bidirectional=True),
    state_row("lstm", [(3, 4, 2), (4, 3, 2), (4, 3, 2), (3, 4)], 2, inputs=[DOMAIN] * 3 + [post_padding],
              initial=True, mask=True, return_state=True, layers=2, bidirectional=True),
    state_row("gru", [(3, 3, 2), (2, 3, 3)], 3, initial=True, return_state=True, bidirectional=True),
    state_row("gru", [(3, 4, 2), (3, 4)], 2, inputs=[DOMAIN, post_padding], mask=True, layers=2,
              return_sequences=True),
    state_row("gru", [(3, 4, 2), (3, 2), (3, 4)], 2, inputs=[DOMAIN, DOMAIN, post_padding], initial=True,
              mask=True, return_state=True, bidirectional=False),
    # embedding(mask_zero=true): the recurrent layer reads the mask its input carries
    C("embedding", [(3, 5)], lambda tok, table, w, u, b: np_lstm(table[tok], w, u, b, True, mask=tok != 0),
      call=lambda ctx, tok: nn.lstm(ctx, nn.embedding(ctx, tok, N, 4, mask_zero=True), 3, return_sequences=True),
      inputs=[tokens_padded(N)], tol32=(1e-5, 1e-5), id="mask_zero-lstm"),
    C("embedding", [(3, 5)], lambda tok, table, w, u, b, bh: np_gru(table[tok], w, u, b, bh, mask=tok != 0),
      call=lambda ctx, tok: nn.gru(ctx, nn.embedding(ctx, tok, N, 4, mask_zero=True), 3),
      inputs=[tokens_padded(N)], tol32=(1e-5, 1e-5), id="mask_zero-gru-final"),
    C("padding_mask", [(3, 5)], lambda tok: tok != 0, inputs=[tokens_padded(N)], grad="none", id="tokens"),
    C("padding_mask", [(3, 5)], lambda tok: tok != 2, attrs={"pad": 2}, inputs=[ints(0, 4)], grad="none",
      id="tokens-pad2"),
    C("padding_mask", [(3, 4, 2)], lambda x: np.any(x != 0, axis=-1), inputs=[padded_steps], grad="none",
      id="features"),
    # activations
    C("relu", [(M, 33)], lambda x: np.maximum(x, 0.0), avoid=(0.0,)),
    C("leaky_relu", [(M, N)], lambda x: np.where(x > 0, x, 0.2 * x), attrs={"alpha": 0.2}, avoid=(0.0,)),
    C("leaky_relu", [(33,)], lambda x: np.where(x > 0, x, 0.01 * x), avoid=(0.0,), id="default-alpha"),
    C("sigmoid", [(M, N)], np_sigmoid, inputs=[(-6.0, 6.0)]),
    C("tanh", [(M, N)], np.tanh),
    C("softmax", [(M, N)], np_softmax, inputs=[(-4.0, 4.0)]),
    C("softmax", [(M, N)], lambda x: np_softmax(x, 0), attrs={"axis": 0}, id="axis0"),
    C("softmax", [(1, 1)], np_softmax, id="one-class"),
    C("attention", [(2, 5, 4), (2, 5, 4), (2, 5, 3)], np_attention, inputs=[(-2.0, 2.0)] * 3),
    C("attention", [(2, 2, 5, 4), (2, 2, 5, 4), (2, 2, 5, 3)], lambda q, k, v: np_attention(q, k, v, causal=True),
      attrs={"causal": True}, inputs=[(-2.0, 2.0)] * 3, id="causal-heads"),
    C("attention", [(1, 3, 4), (1, 6, 4), (1, 6, 2)], lambda q, k, v: np_attention(q, k, v, True, 0.3),
      attrs={"causal": True, "scale": 0.3}, inputs=[(-2.0, 2.0)] * 3, id="cross-causal-scale"),
    C("log_softmax", [(M, N)], np_log_softmax, inputs=[(-4.0, 4.0)]),
    C("log_softmax", [(N, 2, M)], lambda x: np_log_softmax(x, 1), attrs={"axis": 1}, id="axis1"),
    C("log_softmax", [(M, N)], np_log_softmax, inputs=[(40.0, 60.0)], id="large-logits"),
    C("gelu", [(M, 33)], np_gelu_tanh, inputs=[(-3.0, 3.0)]),
    C("gelu", [(M, 33)], np_gelu_exact, attrs={"approximate": "none"}, inputs=[(-4.0, 4.0)], tol64=ERF_TOL,
      id="exact"),
    C("erf", [(M, 33)], np_erf, inputs=[(-3.0, 3.0)], tol64=ERF_TOL),
    C("erf", [(7,)], np_erf, grad="none", tol64=ERF_TOL, id="tails",
      inputs=[lambda rng, s: np.array([-1e30, -9.0, -0.0, 0.0, 1e-30, 5.0, 1e30], np.float32)]),
    C("elu", [(M, 33)], lambda x: np.where(x > 0, x, np.expm1(x)), inputs=[(-3.0, 3.0)], avoid=(0.0,)),
    C("elu", [(M, N)], lambda x: np.where(x > 0, x, 0.5 * np.expm1(x)), attrs={"alpha": 0.5}, avoid=(0.0,),
      id="alpha"),
    C("elu", [(4,)], lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0))), grad="none", id="overflow",
      inputs=[lambda rng, s: np.array([-1e30, -100.0, 100.0, 1e30], np.float32)]),
    C("selu", [(M, 33)], lambda x: nn.SELU_SCALE * np.where(x > 0, x, nn.SELU_ALPHA * np.expm1(x)),
      inputs=[(-3.0, 3.0)], avoid=(0.0,)),
    C("softplus", [(M, 33)], lambda x: np.logaddexp(0.0, x), inputs=[(-6.0, 6.0)], avoid=(0.0,)),
    C("softplus", [(4,)], lambda x: np.logaddexp(0.0, x), grad="none", tol32=(1e-5, 1e-6), id="large",
      inputs=[lambda rng, s: np.array([-200.0, -30.0, 30.0, 200.0], np.float32)]),
    C("silu", [(M, 33)], lambda x: x / (1.0 + np.exp(-x)), inputs=[(-6.0, 6.0)]),
    # the perceptron's activations: exact forward values, straight-through (identity) gradients
    C("step", [(M, 33)], lambda x: (x > 0).astype(x.dtype), avoid=(0.0,), grad="identity"),
    C("step", [(4,)], lambda x: (x > 0).astype(x.dtype),
      inputs=[lambda rng, s: np.array([-1e8, -0.0, 0.0, 1e8], np.float32)], grad="identity", id="large-and-zero"),
    C("sign", [(M, N)], np.sign, avoid=(0.0,), grad="identity"),
    # math functions
    C("exp", [(M, N)], np.exp),
    C("stop_gradient", [(M, N)], lambda x: x, grad="zero"),
    C("log", [(M, N)], np.log, inputs=[(0.1, 3.0)]),
    C("sqrt", [(M, N)], np.sqrt, inputs=[(0.1, 3.0)]),
    C("abs", [(M, N)], np.abs, avoid=(0.0,)),
    C("sum", [(M, 1, N)], lambda x: x.sum()),
    C("sum", [(M, 1, N)], lambda x: x.sum(axis=(0, 2), keepdims=True), attrs={"axis": [0, -1], "keepdims": True},
      id="axes-keepdims"),
    C("mean", [(M, N)], lambda x: x.mean()),
    C("mean", [(M, 1, N)], lambda x: x.mean(axis=-1), attrs={"axis": -1}, id="last-axis"),
    C("mean", [(M, 2, N)], lambda x: x.mean(axis=(0, 1), keepdims=True), attrs={"axis": [0, 1], "keepdims": True},
      id="axes-keepdims"),
    C("max", [(M, N)], lambda x: x.max()),
    C("max", [(M, 2, N)], lambda x: x.max(axis=1, keepdims=True), attrs={"axis": 1, "keepdims": True},
      id="axis-keepdims"),
    C("min", [(M, N)], lambda x: x.min()),
    C("min", [(M, 2, N)], lambda x: x.min(axis=(1, 2), keepdims=True), attrs={"axis": [1, 2], "keepdims": True},
      id="axes-keepdims"),
    C("maximum", [(M, N), (M, N)], np.maximum),
    C("maximum", [(M, N)], lambda x: np.maximum(x, 0.5), attrs={"y": 0.5}, avoid=(0.5,), id="scalar"),
    C("maximum", [(M, N), (N,)], np.maximum, id="broadcast"),
    C("minimum", [(M, N), (M, N)], np.minimum),
    C("minimum", [(1, 33)], lambda x: np.minimum(x, -0.25), attrs={"y": -0.25}, avoid=(-0.25,), id="scalar"),
    C("clip", [(M, 33)], lambda x: np.clip(x, -0.5, 1.0), attrs={"lo": -0.5, "hi": 1.0}, avoid=(-0.5, 1.0)),
    C("reshape", [(M, N)], lambda x: x.reshape(N, M), attrs={"shape": [-1, M]}, symbolic=False),
    C("reshape", [(2, M, N)], lambda x: x.reshape(2, 1, 21), attrs={"shape": [2, 1, 21]}, symbolic=False,
      id="explicit"),
    C("transpose", [(M, 1, N)], lambda x: np.transpose(x)),
    C("transpose", [(M, 1, N)], lambda x: np.transpose(x, (1, 2, 0)), attrs={"perm": [1, 2, 0]}, id="perm"),
    C("concat", [(M, 1), (M, N), (M, 2)], lambda *xs: np.concatenate(xs, axis=-1),
      call=lambda ctx, *xs: nn.concat(ctx, list(xs)), id="3-inputs"),
    C("concat", [(1, N), (2, N)], lambda *xs: np.concatenate(xs, axis=0),
      call=lambda ctx, *xs: nn.concat(ctx, list(xs), axis=0), id="axis0"),
    C("pad", [(2, M, 4)], lambda x: np_pad(x, (0, 1, 0), (0, 2, 3), (0, 0, 0), -1.5),
      attrs={"lo": [0, 1, 0], "hi": [0, 2, 3], "value": -1.5}),
    C("upsample", [(2, 3, 4, 5)], lambda x: x.repeat(2, axis=2).repeat(2, axis=3)),
    C("upsample", [(2, 2, 3, 2)], lambda x: x.repeat(3, axis=2).repeat(2, axis=3), attrs={"scale": [3, 2]},
      id="3x2"),
    C("upsample", [(2, 3, 5)], lambda x: x.repeat(3, axis=2), attrs={"scale": 3}, id="over-time"),
    C("broadcast_to", [(M, 1, N)], lambda x: np.broadcast_to(x, (2, M, 3, N)), attrs={"shape": [2, M, 3, N]},
      symbolic=False),  # (a literal shape: the batch size written out)
    C("logical_and", [(M, N), (M, N)], np.logical_and, inputs=[bools, bools], grad="none"),
    C("logical_or", [(M, 1), (M, N)], np.logical_or, inputs=[bools, bools], grad="none", id="broadcast"),
    C("logical_not", [(M, N)], np.logical_not, inputs=[bools], grad="none"),
    C("where", [(M, 1), (M, N), (N,)], lambda c, x, y: np.where(c, x, y), inputs=[bools, DOMAIN, DOMAIN],
      id="broadcast"),
    C("where", [(M, N), (M, N)], lambda c, y: np.where(c, 0.5, y), inputs=[bools, DOMAIN],
      call=lambda ctx, c, y: nn.where(ctx, c, 0.5, y), id="number"),
    C("pad", [(2, 3, 4, 5)], lambda x: np.pad(x, ((0, 0), (0, 2), (3, 1), (4, 0)), mode="reflect"),
      attrs={"lo": [0, 0, 3, 4], "hi": [0, 2, 1, 0], "mode": "reflect"}, id="reflect"),
    C("pad", [(2, M, 4)], lambda x: np.pad(x, ((0, 0), (2, 0), (1, 6)), mode="edge"),
      attrs={"lo": [0, 2, 1], "hi": [0, 0, 6], "mode": "edge"}, id="edge"),
    C("pad", [(2, 3, 4)], lambda x: np.pad(x, ((0, 0), (3, 1), (0, 4)), mode="wrap"),
      attrs={"lo": [0, 3, 0], "hi": [0, 1, 4], "mode": "wrap"}, id="wrap"),
    # losses
    C("mse", [(M, N), (M, N)], lambda o, t: np.mean((o - t) ** 2)),
    C("mae", [(M, N), (M, N)], lambda o, t: np.mean(np.abs(o - t))),
    C("huber", [(M, 33), (M, 33)], lambda o, t: np.mean(np_huber(o - t, 1.0))),
    C("huber", [(M, N), (M, N)], lambda o, t: np.mean(np_huber(o - t, 0.5)), attrs={"delta": 0.5}, id="delta"),
    C("cross_entropy", [(5, N), (5,)], lambda z, y: -np.mean(np_log_softmax(z)[np.arange(len(y)), y]),
      inputs=[(-3.0, 3.0), ints(0, N)], id="int-labels"),
    C("cross_entropy", [(5, N), (5, N)], lambda z, t: -np.mean(np.sum(t * np_log_softmax(z), axis=1)),
      inputs=[(-3.0, 3.0), probabilities], id="soft-targets"),
    C("cross_entropy", [(1, 1), (1,)], lambda z, y: -np.mean(np_log_softmax(z)[np.arange(len(y)), y]),
      inputs=[DOMAIN, ints(0, 1)], id="one-class"),
    # label smoothing: the target (1 - e) one-hot + e/K, written out as a distribution
    C("cross_entropy", [(5, N), (5,)],
      lambda z, y: -np.mean(np.sum((0.9 * np.eye(N)[y] + 0.1 / N) * np_log_softmax(z), axis=1)),
      attrs={"smoothing": 0.1}, inputs=[(-3.0, 3.0), ints(0, N)], id="smoothing"),
    C("cross_entropy", [(3, 4, N), (3, 4, N), (3, 4)],
      lambda z, t, m: np_masked_mean(-np.sum((0.75 * t + 0.25 / N) * np_log_softmax(z), axis=-1), m),
      call=lambda ctx, z, t, m: nn.cross_entropy(ctx, z, t, mask=m, smoothing=0.25),
      inputs=[(-3.0, 3.0), probabilities, post_padding], id="smoothing-soft-masked"),
    # per step: [B, T, K] logits, [B, T] labels; masked: the mean over the kept steps only
    C("cross_entropy", [(3, 4, N), (3, 4)], np_cross_entropy, inputs=[(-3.0, 3.0), ints(0, N)], id="per-step"),
    C("cross_entropy", [(3, 4, N), (3, 4, N)], np_cross_entropy, inputs=[(-3.0, 3.0), probabilities],
      id="per-step-soft"),
    C("cross_entropy", [(3, 4, N), (3, 4), (3, 4)], np_cross_entropy,
      call=lambda ctx, z, y, m: nn.cross_entropy(ctx, z, y, mask=m),
      inputs=[(-3.0, 3.0), ints(0, N), post_padding], id="per-step-masked"),
    C("cross_entropy", [(5, N), (5,), (5,)], np_cross_entropy, call=lambda ctx, z, y, m: nn.cross_entropy(ctx, z, y, mask=m),
      inputs=[(-3.0, 3.0), ints(0, N), bools], id="sample-mask"),
    C("cross_entropy", [(3, 4, N), (3, 4), (3, 4)], lambda z, y, m: np_accuracy(z, y, m),
      call=lambda ctx, z, y, m: nn.accuracy(ctx.b, z, y, "cross_entropy", mask=m),
      inputs=[(-3.0, 3.0), ints(0, N), post_padding], grad="zero", id="token-accuracy-masked"),
    C("cross_entropy", [(3, 4, N), (3, 4)], np_accuracy, call=lambda ctx, z, y: nn.accuracy(ctx.b, z, y, "cross_entropy"),
      inputs=[(-3.0, 3.0), ints(0, N)], grad="zero", id="token-accuracy"),
    # the mask a sequence carries (embedding(mask_zero=true) -> rnn(return_sequences) -> dense)
    C("cross_entropy", [(3, 5), (3, 5)],
      lambda tok, y, table, wx, wh, b: np_cross_entropy(np_rnn(table[tok], wx, wh, b, True, mask=tok != 0), y,
                                                        tok != 0),
      call=lambda ctx, tok, y: nn.cross_entropy(
          ctx, nn.rnn(ctx, nn.embedding(ctx, tok, N, 4, mask_zero=True), 3, return_sequences=True), y),
      inputs=[tokens_padded(N), ints(0, 3)], tol32=(1e-5, 1e-5), id="carried-mask"),
    C("bce", [(M, N), (M, N)], lambda p, t: -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)),
      inputs=[(0.05, 0.95), zeros_ones_f32], id="probabilities"),
    C("bce", [(M, N), (M, N)], lambda z, t: np.mean(np.logaddexp(0.0, z) - z * t),
      attrs={"from_logits": True}, inputs=[(-4.0, 4.0), zeros_ones_f32], avoid=(0.0,), id="from-logits"),
    C("bce", [(33,), (33,)], lambda z, t: np.mean(np.logaddexp(0.0, z) - z * t),
      attrs={"from_logits": True}, inputs=[(-4.0, 4.0), (0.0, 1.0)], avoid=(0.0,), id="from-logits-soft"),
    C("bce", [(3, 4), (3, 4), (3, 4)], lambda z, t, m: np_masked_mean(np.logaddexp(0.0, z) - z * t, m),
      call=lambda ctx, z, t, m: nn.bce(ctx, z, t, from_logits=True, mask=m),
      inputs=[(-4.0, 4.0), zeros_ones_f32, post_padding], avoid=(0.0,), id="masked"),
    C("bce", [(3, 4, 1), (3, 4, 1), (3, 4)], lambda p, t, m: np_masked_mean(-(t * np.log(p) + (1 - t) * np.log(1 - p)), m),
      call=lambda ctx, p, t, m: nn.bce(ctx, p, t, mask=m),
      inputs=[(0.05, 0.95), zeros_ones_f32, post_padding], id="masked-probabilities"),
    C("kl_div", [(5, N), (5, N)], np_kl_div, inputs=[(-3.0, 3.0), sparse_probabilities], targets=(1,)),
    C("kl_div", [(3, 4, N), (3, 4, N), (3, 4)], np_kl_div, call=lambda ctx, z, t, m: nn.kl_div(ctx, z, t, mask=m),
      inputs=[(-3.0, 3.0), probabilities, post_padding], id="per-step-masked"),
    C("hinge", [(M, 1), (M, 1)], np_hinge, inputs=[(-3.0, 3.0), signs_f32], avoid=(-1.0, 1.0), id="signs"),
    C("hinge", [(M, N), (M, N)], np_hinge, inputs=[(-3.0, 3.0), zeros_ones_f32], avoid=(-1.0, 1.0),
      targets=(1,), id="zeros-ones"),
    C("hinge", [(M, N), (M, N)], lambda o, t: np_hinge(o, t, 0.5, True), attrs={"margin": 0.5, "squared": True},
      inputs=[(-3.0, 3.0), signs_f32], avoid=(-0.5, 0.5), id="squared-margin"),
    C("hinge", [(3, 4), (3, 4), (3, 4)], lambda o, t, m: np_hinge(o, t, mask=m),
      call=lambda ctx, o, t, m: nn.hinge(ctx, o, t, mask=m), inputs=[(-3.0, 3.0), signs_f32, post_padding],
      avoid=(-1.0, 1.0), id="masked"),
    C("hinge", [(M, 1), (M, 1)], lambda o, t: np.mean((o > 0) == (t > 0)),
      call=lambda ctx, o, t: nn.accuracy(ctx.b, o, t, "hinge"), inputs=[(-3.0, 3.0), signs_f32], grad="zero",
      id="accuracy"),
    C("multi_hinge", [(5, N), (5,)], np_multi_hinge, inputs=[(-3.0, 3.0), ints(0, N)]),
    C("multi_hinge", [(5, N), (5,)], lambda s, y: np_multi_hinge(s, y, 2.0, True), attrs={"margin": 2.0, "squared": True},
      inputs=[(-3.0, 3.0), ints(0, N)], id="squared-margin"),
    C("multi_hinge", [(3, 4, N), (3, 4), (3, 4)], lambda s, y, m: np_multi_hinge(s, y, mask=m),
      call=lambda ctx, s, y, m: nn.multi_hinge(ctx, s, y, mask=m), inputs=[(-3.0, 3.0), ints(0, N), post_padding],
      id="per-step-masked"),
    C("mse", [(3, 4, 2), (3, 4, 2), (3, 4)], lambda o, t, m: np_masked_mean((o - t) ** 2, m),
      call=lambda ctx, o, t, m: nn.mse(ctx, o, t, mask=m), inputs=[DOMAIN, DOMAIN, post_padding], id="masked"),
    C("huber", [(3, 4, 2), (3, 4, 2), (3, 4)], lambda o, t, m: np_masked_mean(np_huber(o - t, 1.0), m),
      call=lambda ctx, o, t, m: nn.huber(ctx, o, t, mask=m), inputs=[DOMAIN, DOMAIN, post_padding], id="masked"),
    # regularizers
    C("l1", [(M, N), (33,)], lambda a, b: np.abs(a).sum() + np.abs(b).sum(), avoid=(0.0,),
      call=lambda ctx, a, b: nn.l1(ctx, ParamList([a, b]))),
    C("l2", [(M, N), (33,)], lambda a, b: (a * a).sum() + (b * b).sum(),
      call=lambda ctx, a, b: nn.l2(ctx, ParamList([a, b]))),
    C("l2", [(N,)], lambda a: (a * a).sum(), call=lambda ctx, a: nn.l2(ctx, ParamList([a])), id="one-param"),
]

ALL = PRIMITIVES + COMPOSITES


# --- shape-rule errors: (op, operand types, attrs, id) -------------------------------------------

def T(shape, dtype=F32) -> TensorType:
    return TensorType(dtype, tuple(shape))


BAD_SHAPES = [
    ("add", [T((3, 7)), T((7, 3))], {}, "add-different-shapes"),
    ("add", [T((3, 7)), T((3, 7), I32)], {}, "add-different-dtypes"),
    ("mul", [T((3, 7)), T((3, 1))], {}, "mul-no-implicit-broadcast"),
    ("exp", [T((3,), I32)], {}, "exp-of-int"),
    ("pow", [T((3,), I32), T((3,), I32)], {}, "pow-of-int"),
    ("where", [T((3,), F32), T((3,)), T((3,))], {}, "where-float-condition"),
    ("where", [T((3,), BOOL), T((3,)), T((4,))], {}, "where-different-shapes"),
    ("matmul", [T((3, 7)), T((3, 7))], {}, "matmul-inner-mismatch"),
    ("matmul", [T((3, 7)), T((7, 3))], {"tb": True}, "matmul-inner-mismatch-tb"),
    ("matmul", [T((2, 3, 7)), T((7, 3))], {}, "matmul-rank3"),
    ("matmul", [T((3, 7)), T((7, 3), F64)], {}, "matmul-dtypes"),
    ("batch_matmul", [T((2, 3, 7)), T((2, 3, 7))], {}, "batch-matmul-inner-mismatch"),
    ("batch_matmul", [T((2, 3, 7)), T((3, 7, 3))], {}, "batch-matmul-stacks"),
    ("batch_matmul", [T((3, 7)), T((7, 3))], {}, "batch-matmul-rank2"),
    ("batch_matmul", [T((2, 3, 7)), T((2, 7, 3))], {"tb": True}, "batch-matmul-inner-mismatch-tb"),
    ("batch_matmul", [T((2, 3, 7)), T((2, 7, 3), F64)], {}, "batch-matmul-dtypes"),
    ("conv2d", [T((1, 3, 5, 5)), T((4, 2, 3, 3))], {}, "conv-channel-mismatch"),
    ("conv2d", [T((1, 3, 2, 2)), T((4, 3, 3, 3))], {}, "conv-window-too-big"),
    ("conv2d", [T((3, 5, 5)), T((4, 3, 3, 3))], {}, "conv-rank3-input"),
    ("conv2d", [T((1, 3, 5, 5), I32), T((4, 3, 3, 3), I32)], {}, "conv-int"),
    ("conv2d_bwd_data", [T((1, 4, 3, 3)), T((4, 3, 3, 3))], {"in_hw": (6, 6), "stride": (1, 1), "pad": (0, 0)},
     "conv-bwd-data-size"),
    ("conv2d_bwd_filter", [T((1, 3, 5, 5)), T((2, 4, 3, 3))], {"kernel": (3, 3), "stride": (1, 1), "pad": (0, 0)},
     "conv-bwd-filter-batch"),
    ("pool2d", [T((1, 3, 5, 5))], {"mode": "min", "kernel": (2, 2), "stride": (2, 2), "pad": (0, 0)},
     "pool-unknown-mode"),
    ("pool2d", [T((1, 3, 1, 5))], {"mode": "max", "kernel": (2, 2), "stride": (2, 2), "pad": (0, 0)},
     "pool-window-too-big"),
    ("pool2d_bwd", [T((1, 3, 4, 4)), T((1, 3, 3, 2))],
     {"mode": "max", "kernel": (2, 2), "stride": (2, 2), "pad": (0, 0)}, "pool-bwd-gradient-shape"),
    ("reshape", [T((3, 7))], {"shape": (4, 5)}, "reshape-element-count"),
    ("permute", [T((3, 7, 1))], {"perm": (0, 0, 1)}, "permute-repeated-axis"),
    ("permute", [T((3, 7))], {"perm": (0, 1, 2)}, "permute-too-many-axes"),
    ("broadcast", [T((3,))], {"shape": (2, 4), "axes": (1,)}, "broadcast-incompatible"),
    ("broadcast", [T((3, 1))], {"shape": (3, 4), "axes": (1, 0)}, "broadcast-unsorted-axes"),
    ("broadcast", [T((3,))], {"shape": (3,), "axes": (1,)}, "broadcast-axis-out-of-range"),
    ("broadcast", [T((3, 4))], {"shape": (3, 4, 5), "axes": (0,)}, "broadcast-too-few-axes"),
    ("slice", [T((3, 7))], {"starts": (0, 0), "stops": (3, 8), "steps": (1, 1)}, "slice-stop-out-of-range"),
    ("slice", [T((3, 7))], {"starts": (0, 5), "stops": (3, 5), "steps": (1, 1)}, "slice-empty"),
    ("slice", [T((3, 7))], {"starts": (0, 0), "stops": (3, 7), "steps": (1, 0)}, "slice-step-0"),
    ("slice", [T((3, 7))], {"starts": (0,), "stops": (3,), "steps": (1,)}, "slice-too-few-axes"),
    ("pad", [T((3, 7))], {"lo": (0, -1), "hi": (0, 0), "interior": (0, 0)}, "pad-negative"),
    ("pad", [T((3, 7))], {"lo": (0,), "hi": (0,), "interior": (0,)}, "pad-too-few-axes"),
    ("concat", [T((3, 1)), T((4, 2))], {"axis": 1}, "concat-off-axis-mismatch"),
    ("concat", [T((3, 1)), T((3, 1))], {"axis": 2}, "concat-axis-out-of-range"),
    ("concat", [T((3, 1)), T((3, 1, 1))], {"axis": 0}, "concat-ranks"),
    ("concat", [T((3, 1)), T((3, 1), I32)], {"axis": 0}, "concat-dtypes"),
    ("reduce_sum", [T((3, 7))], {"axes": (2,)}, "reduce-axis-out-of-range"),
    ("reduce_max", [T((3, 7))], {"axes": (1, 1)}, "reduce-repeated-axis"),
    ("argmax", [T((3, 7))], {"axis": -1}, "argmax-negative-axis"),
    ("take", [T((7, 4)), T((2,))], {}, "take-float-indices"),
    ("scatter_add", [T((2, 4)), T((3,), I32)], {"rows": 7}, "scatter-index-shape"),
    ("iota", [], {"shape": (3, 7), "axis": 2, "dtype": I32}, "iota-axis-out-of-range"),
    ("size", [T((3, 7))], {"axes": (2,)}, "size-axis-out-of-range"),
    ("random", [T((), F32), T((), I32)], {"shape": (3,), "stream": 0}, "random-float-seed"),
    ("random", [T((2,), I32), T((), I32)], {"shape": (3,), "stream": 0}, "random-vector-seed"),
]

# Bad calls that shape rules once accepted (each was a bug, now fixed).
BAD_SHAPES_XFAIL: dict[str, str] = {}
BAD_SHAPES += [
    ("and", [T((3,)), T((3,))], {}, "and-of-floats"),
    ("sign", [T((3,), BOOL)], {}, "sign-of-bool"),
    ("neg", [T((3,), BOOL)], {}, "neg-of-bool"),
    ("size", [T((3, 7))], {"axes": (1, 1)}, "size-repeated-axis"),
    ("pool2d", [T((1, 1, 3, 3))], {"mode": "max", "kernel": (2, 2), "stride": (1, 1), "pad": (2, 2)},
     "pool-pad-not-smaller-than-kernel"),
    ("reshape", [T((3, 7))], {"shape": (-3, -7)}, "reshape-negative-dims"),
    ("concat", [], {"axis": 0}, "concat-no-operands"),
]
