"""The CUDA C templates (dlc.backends.cuda.templates): every generated kernel
(a) compiles through NVRTC to PTX and to sm_90 machine code without register spills
    (skipped when CuPy/NVRTC are missing), and
(b) runs on the CPU through the host emulation (tests/cuda_host) and matches the numpy
    reference of its op (dlc.core.ops, in float64).

Tolerances are error bounds, elementwise: a float32 sum of K products is within
2*K*u * (the same sum over absolute values) of the exact one, u = 2**-24; TF32 inputs add
2**-10 relative per product. Gathers and max pooling must be exact. Any indexing
mistake is off by O(1), far outside these bounds.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from cuda_host import HostModule
from dlc.backends.cuda import templates as T
from dlc.core import ops
from dlc.core.ops.linalg import conv_out

U = 2.0 ** -24
TF32 = 2.0 ** -10


@dataclass
class Case:
    id: str
    kernels: list            # the CudaKernels, launched in this order
    make: Callable           # () -> (argument tuples per kernel, output array, want, bound)


CASES: list[Case] = []
COMPILE_ONLY: list = []      # production-size kernels: NVRTC only (too slow to emulate)


def _rng(key: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(key.encode()))


def _f32(rng, shape) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


# --- matmul --------------------------------------------------------------------------------------

MATMULS = [  # m, n, k, ta, tb, tile
    (1, 1, 1, False, False, T.TILE_16),
    (5, 3, 7, True, False, T.TILE_16),
    (17, 33, 9, False, True, T.TILE_16),
    (33, 17, 20, True, True, T.TILE_32),
    (64, 64, 16, False, False, T.TILE_32),    # exact multiples: no bounds checks generated
    (40, 70, 300, False, True, T.TILE_32),    # 38 k steps through the double buffer
    (70, 65, 19, True, False, T.TILE_64),
    (130, 129, 20, False, False, T.TILE_128),  # the big tile, ragged on both sides
    (130, 70, 20, True, False, T.TILE_128x64),  # the large tile pick_tile takes (8x4 per thread)
    (8, 100, 12, True, True, None),            # the tile heuristic's choice
]
MATMULS_TF32 = [
    (1, 1, 1, False, False), (37, 50, 19, True, False), (64, 64, 32, False, True),
    (70, 129, 24, True, True), (16, 8, 8, False, False),
]


def _matmul_case(m, n, k, ta, tb, tile=None, tf32=False):
    name = f"mm{'_tf32' if tf32 else ''}_{m}x{n}x{k}{'_ta' if ta else ''}{'_tb' if tb else ''}"
    kern = T.matmul(name, m, n, k, a="A", b="B", out="C", ta=ta, tb=tb, tile=tile, tf32=tf32)

    def make():
        rng = _rng(name)
        a, b = _f32(rng, (k, m) if ta else (m, k)), _f32(rng, (n, k) if tb else (k, n))
        c = np.full((m, n), np.nan, np.float32)
        want = ops.MATMUL.ref(*_f64(a, b), ta=ta, tb=tb)
        scale = ops.MATMUL.ref(*_f64(np.abs(a), np.abs(b)), ta=ta, tb=tb)
        return [(a, b, c)], c, want, ((TF32 if tf32 else 0) + 2 * k * U) * scale
    return Case(name, [kern], make)


CASES += [_matmul_case(*c) for c in MATMULS]
CASES += [_matmul_case(*c, tf32=True) for c in MATMULS_TF32]


STACKED = [  # stacks, m, n, k, ta, tb, tile, tf32, launches (first products of each)
    (3, 5, 7, 9, False, False, T.TILE_16, False, (0,)),
    (4, 17, 9, 33, False, True, T.TILE_32, False, (0,)),      # attention's scores: q @ k^T
    (5, 8, 8, 8, True, False, None, False, (0, 2)),           # two launches, the second from product 2
    (2, 37, 19, 24, True, True, None, True, (0,)),
]


def _stacked_case(stacks, m, n, k, ta, tb, tile, tf32, launches):
    name = f"bmm{'_tf32' if tf32 else ''}_{stacks}x{m}x{n}x{k}{'_ta' if ta else ''}{'_tb' if tb else ''}"
    ends = list(launches[1:]) + [stacks]
    kerns = [T.matmul(f"{name}_{first}", m, n, k, a="A", b="B", out="C", ta=ta, tb=tb, tile=tile, tf32=tf32,
                      stack=end - first, first=first) for first, end in zip(launches, ends)]

    def make():
        rng = _rng(name)
        a = _f32(rng, (stacks,) + ((k, m) if ta else (m, k)))
        b = _f32(rng, (stacks,) + ((n, k) if tb else (k, n)))
        c = np.full((stacks, m, n), np.nan, np.float32)
        want = ops.BATCH_MATMUL.ref(*_f64(a, b), ta=ta, tb=tb)
        scale = ops.BATCH_MATMUL.ref(*_f64(np.abs(a), np.abs(b)), ta=ta, tb=tb)
        return [(a, b, c)] * len(kerns), c, want, ((TF32 if tf32 else 0) + 2 * k * U) * scale
    return Case(name, kerns, make)


CASES += [_stacked_case(*c) for c in STACKED]


# --- split K: slices into a workspace, then split_sum -------------------------------------------------

def _split_case(tag: str, gemm, splits: int, shape_out: tuple, want_bound):
    """gemm(name, splits, part) and its split_sum, launched in order on (inputs..., out, part)."""
    name = f"split_{tag}"
    part_kernel = gemm(f"{name}_part", splits, "P")
    total = int(np.prod(shape_out))
    finish = T.split_sum(name, total, splits, part="P", out="C")

    def make():
        inputs, want, bound = want_bound(_rng(name))
        out = np.full(shape_out, np.nan, np.float32)
        part = np.full(splits * total, np.nan, np.float32)
        return [(*inputs, out, part), (part, out)], out, want, bound
    return Case(name, [part_kernel, finish], make)


def _split_matmul(m, n, k, splits):
    def want_bound(rng):
        a, b = _f32(rng, (m, k)), _f32(rng, (k, n))
        return (a, b), ops.MATMUL.ref(*_f64(a, b)), 2 * k * U * ops.MATMUL.ref(*_f64(np.abs(a), np.abs(b)))
    gemm = lambda name, splits, part: T.matmul(name, m, n, k, a="A", b="B", out="C", tile=T.TILE_16,
                                               splits=splits, part=part)
    return _split_case(f"mm_{m}x{n}x{k}_{splits}", gemm, splits, (m, n), want_bound)


def _split_filter(nb, c, h, w, o, k, s, p, splits):
    oh, ow = conv_out(h, k, s, p), conv_out(w, k, s, p)
    attrs = dict(stride=(s, s), pad=(p, p), dilation=(1, 1), kernel=(k, k))

    def want_bound(rng):
        x, dy = _f32(rng, (nb, c, h, w)), _f32(rng, (nb, o, oh, ow))
        ref = ops.CONV2D_BWD_FILTER.ref
        return (x, dy), ref(*_f64(x, dy), **attrs), 2 * nb * oh * ow * U * ref(*_f64(np.abs(x), np.abs(dy)), **attrs)
    gemm = lambda name, splits, part: T.conv2d_bwd_filter(name, (nb, c, h, w), (nb, o, oh, ow), k, s, p, x="A",
                                                          dy="B", out="C", tile=T.TILE_16, splits=splits, part=part)
    return _split_case(f"dw_{nb}x{c}x{h}x{w}_o{o}_k{k}s{s}p{p}_{splits}", gemm, splits, (o, c, k, k), want_bound)


CASES += [_split_matmul(5, 7, 300, 4),             # 38 k steps: slices of 10, 10, 10, 8
          _split_matmul(17, 3, 300, 3),            # slices of 13, 13, 12; rows past one tile
          _split_filter(2, 3, 9, 8, 4, 3, 1, 1, 5),  # 18 k steps: four slices of 4, one of 2
          _split_filter(3, 2, 9, 9, 3, 3, 2, 1, 2)]  # strided, padded; K = 75: 10 k steps, the last 3 deep


# --- convolutions ----------------------------------------------------------------------------------

CONVS = [  # N, C, H, W, O, kernel, stride, pad
    (1, 1, 5, 5, 1, 1, 1, 0),
    (3, 5, 6, 6, 7, 1, 2, 0),
    (2, 3, 7, 6, 4, 3, 1, 0),
    (2, 3, 7, 6, 4, 3, 1, 1),
    (1, 4, 9, 9, 5, 3, 2, 1),
    (2, 2, 8, 7, 3, 5, 1, 2),
    (1, 3, 11, 10, 2, 5, 2, 2),
    (2, 3, 9, 8, 4, 3, 1, 2, 2),    # dilated, "same" padding
    (1, 2, 12, 11, 3, 3, 2, 1, 3),  # dilated and strided: some rows of dx no tap reaches
]


def _conv_cases(nb, c, h, w, o, k, s, p, d=1, tile=T.TILE_16, tf32=False):
    oh, ow = conv_out(h, k, s, p, d), conv_out(w, k, s, p, d)
    tile_tag = "_tf32" if tf32 else "_auto" if tile is None else "" if tile == T.TILE_16 else f"_t{tile.bm}x{tile.bn}"
    tag = f"{nb}x{c}x{h}x{w}_o{o}_k{k}s{s}p{p}{f'd{d}' if d > 1 else ''}{tile_tag}"
    xs, ws, dys = (nb, c, h, w), (o, c, k, k), (nb, o, oh, ow)
    attrs = dict(stride=(s, s), pad=(p, p), dilation=(d, d))
    extra = TF32 if tf32 else 0
    fwd = T.conv2d(f"conv_{tag}", xs, ws, s, p, d, x="x", w="w", out="y", tile=tile, tf32=tf32)
    bwd_data = T.conv2d_bwd_data(f"conv_dx_{tag}", dys, ws, (h, w), s, p, d, dy="dy", w="w", out="dx",
                                 tile=tile, tf32=tf32)
    bwd_filter = T.conv2d_bwd_filter(f"conv_dw_{tag}", xs, dys, (k, k), s, p, d, x="x", dy="dy", out="dw",
                                     tile=tile, tf32=tf32)

    def data():
        rng = _rng(tag)
        return _f32(rng, xs), _f32(rng, ws), _f32(rng, dys)

    def make_fwd():
        x, wt, _ = data()
        y = np.full((nb, o, oh, ow), np.nan, np.float32)
        bound = (extra + 2 * c * k * k * U) * ops.CONV2D.ref(*_f64(np.abs(x), np.abs(wt)), **attrs)
        return [(x, wt, y)], y, ops.CONV2D.ref(*_f64(x, wt), **attrs), bound

    def make_data():
        _, wt, dy = data()
        dx = np.full(xs, np.nan, np.float32)
        ref = ops.CONV2D_BWD_DATA.ref
        bound = (extra + 2 * o * k * k * U) * ref(*_f64(np.abs(dy), np.abs(wt)), in_hw=(h, w), **attrs)
        return [(dy, wt, dx)], dx, ref(*_f64(dy, wt), in_hw=(h, w), **attrs), bound

    def make_filter():
        x, _, dy = data()
        dw = np.full(ws, np.nan, np.float32)
        ref = ops.CONV2D_BWD_FILTER.ref
        bound = (extra + 2 * nb * oh * ow * U) * ref(*_f64(np.abs(x), np.abs(dy)), kernel=(k, k), **attrs)
        return [(x, dy, dw)], dw, ref(*_f64(x, dy), kernel=(k, k), **attrs), bound

    return [Case(fwd.name, [fwd], make_fwd), Case(bwd_data.name, [bwd_data], make_data),
            Case(bwd_filter.name, [bwd_filter], make_filter)]


for _c in CONVS:
    CASES += _conv_cases(*_c)
CASES += _conv_cases(2, 3, 7, 6, 4, 3, 1, 1, tile=None)        # the heuristic's tile
CASES += _conv_cases(2, 3, 9, 8, 20, 3, 2, 1, tile=T.TILE_128)  # the big tile
CASES += _conv_cases(2, 3, 9, 8, 20, 3, 2, 1, tile=T.TILE_128x64)  # the large tile pick_tile takes
CASES += _conv_cases(2, 3, 7, 6, 4, 3, 1, 1, tile=None, tf32=True)
CASES += _conv_cases(1, 4, 9, 9, 5, 3, 2, 1, tile=None, tf32=True)


# --- pooling -----------------------------------------------------------------------------------------

POOLS = [  # x shape, mode, kernel, stride, pad
    ((2, 3, 8, 8), "max", 2, 2, 0),
    ((1, 2, 7, 9), "max", 3, 2, 1),
    ((2, 2, 6, 5), "max", 3, 1, 1),
    ((1, 1, 1, 1), "max", 1, 1, 0),
    ((2, 2, 5, 6), "avg", 3, 1, 1),
    ((1, 3, 7, 7), "avg", 2, 2, 0),
    ((1, 2, 5, 5), "avg", 3, 2, 1),
]


def _pool_cases(shape, mode, k, s, p):
    tag = f"{mode}{k}s{s}p{p}_{'x'.join(map(str, shape))}"
    oh, ow = conv_out(shape[2], k, s, p), conv_out(shape[3], k, s, p)
    gs = shape[:2] + (oh, ow)
    attrs = dict(mode=mode, kernel=(k, k), stride=(s, s), pad=(p, p))
    fwd = T.pool2d(f"pool_{tag}", shape, mode, k, s, p, x="x", out="y")
    bwd = T.pool2d_bwd(f"pool_bwd_{tag}", shape, mode, k, s, p, x="x", dy="dy", out="dx")

    def data():
        rng = _rng(tag)
        # small integers: max windows have ties, so "the first maximum" is exercised
        return rng.integers(-3, 4, shape).astype(np.float32), _f32(rng, gs)

    def make_fwd():
        x, _ = data()
        y = np.full(gs, np.nan, np.float32)
        bound = 0.0 if mode == "max" else 2 * (k * k + 2) * U * ops.POOL2D.ref(np.abs(x).astype(np.float64), **attrs)
        return [(x, y)], y, ops.POOL2D.ref(x.astype(np.float64), **attrs), bound

    def make_bwd():
        x, dy = data()
        dx = np.full(shape, np.nan, np.float32)
        ref = ops.POOL2D_BWD.ref
        bound = 2 * (k * k + 2) * U * ref(x.astype(np.float64), np.abs(dy).astype(np.float64), **attrs)
        return [(x, dy, dx)], dx, ref(*_f64(x, dy), **attrs), bound

    return [Case(fwd.name, [fwd], make_fwd), Case(bwd.name, [bwd], make_bwd)]


for _p in POOLS:
    CASES += _pool_cases(*_p)


# --- take / scatter_add / colsum ----------------------------------------------------------------------

def _take_case(rows, width, idx_shape):
    count = int(np.prod(idx_shape))
    name = f"take_{rows}x{width}_at_{'x'.join(map(str, idx_shape))}"
    kern = T.take(name, rows, width, count, table="table", idx="idx", out="out")

    def make():
        rng = _rng(name)
        table = _f32(rng, (rows, width))
        idx = rng.integers(-3, rows + 3, idx_shape).astype(np.int32)  # some out of range: clamped
        out = np.full(idx_shape + (width,), np.nan, np.float32)
        return [(table, idx, out)], out, ops.TAKE.ref(table.astype(np.float64), idx), 0.0
    return Case(name, [kern], make)


def _scatter_case(rows, width, count, threads):
    name = f"scatter_add_{rows}x{width}_n{count}_t{threads}"
    index = T.scatter_add_index(f"{name}_index", rows, count, idx="idx", pos="pos", perm="perm",
                                threads=threads)
    gather = T.scatter_add(name, rows, width, count, g="g", pos="pos", perm="perm", out="out")

    def make():
        rng = _rng(name)
        g = _f32(rng, (count, width))
        idx = rng.integers(-2, rows + 2, count).astype(np.int32)  # repeats, and clamped ends
        npos, nperm = T.scatter_add_workspace(rows, count)
        pos, perm = np.full(npos, -7, np.int32), np.full(nperm, -7, np.int32)
        out = np.full((rows, width), np.nan, np.float32)
        ref = ops.SCATTER_ADD.ref
        bound = 2 * count * U * ref(np.abs(g).astype(np.float64), idx, rows=rows)
        return [(idx, pos, perm), (g, pos, perm, out)], out, ref(g.astype(np.float64), idx, rows=rows), bound
    return Case(name, [index, gather], make)


def _colsum_case(rows, cols, strands):
    name = f"colsum_{rows}x{cols}_s{strands}"
    kern = T.colsum(name, rows, cols, x="x", out="out", strands=strands)

    def make():
        x = _f32(_rng(name), (rows, cols))
        out = np.full(cols, np.nan, np.float32)
        return [(x, out)], out, x.astype(np.float64).sum(0), 2 * rows * U * np.abs(x).astype(np.float64).sum(0)
    return Case(name, [kern], make)


CASES += [_take_case(10, 7, (13,)), _take_case(1, 1, (1,)), _take_case(50, 33, (4, 5))]
CASES += [_scatter_case(10, 7, 13, 1024), _scatter_case(3, 1, 100, 32),  # 4 placement chunks
          _scatter_case(1, 5, 1, 32), _scatter_case(2000, 2, 70, 32),    # 63 scan chunks
          _scatter_case(5, 3, 40, 64)]
CASES += [_colsum_case(1, 1, 16), _colsum_case(5, 3, 16), _colsum_case(100, 70, 16), _colsum_case(33, 40, 4)]


# --- epilogues and arena buffers ------------------------------------------------------------------

def _arena_matmul_case():
    """Buffers as arena slices, kernel parameters given, and a fused bias + relu epilogue."""
    m, n, k = 21, 19, 13
    oa, ob, oc = 0, 1024, 2048  # float offsets into the arena
    kern = T.matmul("mm_arena_bias_relu", m, n, k, a=f"(arena + {oa})", b=f"(arena + {ob})",
                    params=["float* __restrict__ arena", "const float* __restrict__ bias"], tile=T.TILE_16,
                    epilogue=lambda i, v: f"(arena + {oc})[{i}] = fmaxf({v} + bias[({i}) % {n}], 0.0f);")

    def make():
        rng = _rng("arena")
        a, b, bias = _f32(rng, (m, k)), _f32(rng, (k, n)), _f32(rng, n)
        arena = np.full(oc + m * n, np.nan, np.float32)
        arena[oa:oa + m * k], arena[ob:ob + k * n] = a.ravel(), b.ravel()
        want = np.maximum(a.astype(np.float64) @ b + bias, 0.0)
        bound = 2 * (k + 1) * U * (np.abs(a).astype(np.float64) @ np.abs(b) + np.abs(bias))
        out = arena[oc:].reshape(m, n)  # a view: the launch writes the arena back in place
        return [(arena, bias)], out, want, bound
    return Case(kern.name, [kern], make)


def _two_output_epilogue_case():
    """An epilogue writing two buffers (the value and its square) after a strided conv."""
    xs, ws = (1, 2, 6, 6), (3, 2, 3, 3)
    kern = T.conv2d("conv_two_outputs", xs, ws, 2, 1, x="x", w="w", tile=T.TILE_16,
                    params=["const float* __restrict__ x", "const float* __restrict__ w",
                            "float* __restrict__ y", "float* __restrict__ y2"],
                    epilogue=lambda i, v: f"y[{i}] = {v};\ny2[{i}] = {v} * {v};")

    def make():
        rng = _rng("two outputs")
        x, w = _f32(rng, xs), _f32(rng, ws)
        both = np.full((2, 1, 3, 3, 3), np.nan, np.float32)
        y, y2 = both  # two views: the launch writes them back into `both`
        ref = ops.CONV2D.ref(*_f64(x, w), stride=(2, 2), pad=(1, 1))
        scale = ops.CONV2D.ref(*_f64(np.abs(x), np.abs(w)), stride=(2, 2), pad=(1, 1))
        bound = 2 * 18 * U * scale
        # y2 = y*y with y off by at most `bound`, then rounded once more
        return [(x, w, y, y2)], both, np.stack([ref, ref * ref]), \
            np.stack([bound, 2 * bound * np.abs(ref) + bound ** 2 + U * ref * ref])
    return Case(kern.name, [kern], make)


def _sgd_scatter_case():
    """The fused embedding update: param[r] -= lr * (sum of the gradient rows at r)."""
    rows, width, count = 6, 4, 9
    index = T.scatter_add_index("sgd_index", rows, count, idx="idx", pos="pos", perm="perm", threads=32)
    gather = T.scatter_add("sgd_scatter", rows, width, count, g="g", pos="pos", perm="perm",
                           params=["const float* __restrict__ g", "const int* __restrict__ pos",
                                   "const int* __restrict__ perm", "float* __restrict__ param", "float lr"],
                           epilogue=lambda i, v: f"param[{i}] -= lr * {v};")

    def make():
        rng = _rng("sgd")
        g, param = _f32(rng, (count, width)), _f32(rng, (rows, width))
        idx = rng.integers(0, rows, count).astype(np.int32)
        pos, perm = np.zeros(rows + 1, np.int32), np.zeros(count, np.int32)
        grad = ops.SCATTER_ADD.ref(g.astype(np.float64), idx, rows=rows)
        bound = 2 * (count + 2) * U * (np.abs(param) + 0.5 * ops.SCATTER_ADD.ref(np.abs(g).astype(np.float64), idx, rows=rows))
        want = param.astype(np.float64) - 0.5 * grad
        return [(idx, pos, perm), (g, pos, perm, param, 0.5)], param, want, bound
    return Case("sgd_scatter", [index, gather], make)


def _scaled_colsum_case():
    kern = T.colsum("colsum_mean", 7, 5, x="x", params=["const float* __restrict__ x", "float* __restrict__ mean"],
                    epilogue=lambda i, v: f"mean[{i}] = {v} * (1.0f / 7.0f);")

    def make():
        x = _f32(_rng("mean"), (7, 5))
        out = np.full(5, np.nan, np.float32)
        return [(x, out)], out, x.astype(np.float64).mean(0), 20 * U * np.abs(x).astype(np.float64).mean(0)
    return Case(kern.name, [kern], make)


CASES += [_arena_matmul_case(), _two_output_epilogue_case(), _sgd_scatter_case(), _scaled_colsum_case()]


# --- production sizes, compiled only ---------------------------------------------------------------

COMPILE_ONLY += [
    T.matmul("big_mm", 1024, 1024, 1024, a="A", b="B", out="C"),
    T.matmul("big_mm_tn", 512, 768, 1000, a="A", b="B", out="C", ta=True, tb=True),
    T.matmul("big_mm_tf32", 1024, 1024, 1024, a="A", b="B", out="C", tf32=True),
    T.conv2d("big_conv3", (32, 64, 56, 56), (64, 64, 3, 3), 1, 1, x="x", w="w", out="y"),
    T.conv2d("big_conv1_s2", (32, 64, 56, 56), (128, 64, 1, 1), 2, 0, x="x", w="w", out="y"),
    T.conv2d("big_conv5", (32, 3, 224, 224), (32, 3, 5, 5), 2, 2, x="x", w="w", out="y"),
    T.conv2d_bwd_data("big_conv3_dx", (32, 64, 28, 28), (64, 128, 3, 3), (56, 56), 2, 1, dy="dy", w="w", out="dx"),
    T.conv2d_bwd_filter("big_conv3_dw", (32, 64, 56, 56), (32, 64, 56, 56), 3, 1, 1, x="x", dy="dy", out="dw"),
    T.conv2d("big_conv3_tf32", (32, 64, 56, 56), (64, 64, 3, 3), 1, 1, x="x", w="w", out="y", tf32=True),
    T.pool2d("big_pool", (32, 64, 112, 112), "max", 3, 2, 1, x="x", out="y"),
    T.pool2d_bwd("big_pool_bwd", (32, 64, 112, 112), "max", 3, 2, 1, x="x", dy="dy", out="dx"),
    T.take("big_take", 50000, 256, 4096, table="t", idx="i", out="o"),
    T.scatter_add_index("big_scatter_index", 50000, 4096, idx="i", pos="p", perm="q"),
    T.scatter_add("big_scatter", 50000, 256, 4096, g="g", pos="p", perm="q", out="o"),
    T.colsum("big_colsum", 4096, 1000, x="x", out="o"),
    # LeNet-5's first filter gradient at batch 64 as the backend splits it
    T.conv2d_bwd_filter("big_dw_split", (64, 1, 28, 28), (64, 6, 28, 28), 5, 1, 2, x="x", dy="dy", out="dw",
                        splits=T.split_k(6, 25, 64 * 28 * 28), part="P"),
    T.split_sum("big_dw_split_sum", 150, T.split_k(6, 25, 64 * 28 * 28), part="P", out="dw"),
]

ALL_KERNELS = [k for c in CASES for k in c.kernels]


def test_kernel_names_are_unique():
    names = [k.name for k in ALL_KERNELS + COMPILE_ONLY]
    assert len(names) == len(set(names))


# --- (a) NVRTC ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nvrtc():
    pytest.importorskip("cupy", reason="CuPy is not installed: pip install 'dlc[cuda]'")
    from dlc.backends.cuda import nvrtc
    have = nvrtc.nvrtc_available()
    if not have:
        pytest.skip(have.reason)
    return nvrtc


@pytest.fixture(scope="module")
def cubin(nvrtc):
    return nvrtc.compile_cuda(T.module(*ALL_KERNELS, *COMPILE_ONLY), "sm_90")


def test_every_kernel_compiles_to_ptx_and_cubin(cubin):
    # one NVRTC run gives both: PTX (the portable form) and sm_90 machine code
    assert cubin.binary[:4] == b"\x7fELF"
    ptx = cubin.ptx.decode()
    for k in ALL_KERNELS + COMPILE_ONLY:
        assert f".entry {k.name}(" in ptx


@pytest.mark.parametrize("kernel", ALL_KERNELS + COMPILE_ONLY, ids=lambda k: k.name)
def test_sm90_without_spills(cubin, kernel):
    report = cubin.kernels[kernel.name]
    assert (report.spill_stores, report.spill_loads, report.stack_frame) == (0, 0, 0), report
    assert report.registers <= 255
    assert report.shared_bytes == kernel.shared_bytes <= 48 * 1024


# --- (b) host emulation vs numpy ------------------------------------------------------------------

@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return HostModule(T.module(*ALL_KERNELS), tmp_path_factory.mktemp("cuda_templates"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_numpy(host, case):
    launches, out, want, bound = case.make()
    for kernel, args in zip(case.kernels, launches):
        host.launch(kernel.name, kernel.grid, kernel.block, *args)
    got = np.asarray(out, dtype=np.float64)
    assert got.shape == want.shape
    assert np.isfinite(got).all(), "elements left unwritten (NaN-filled output)"
    err = np.abs(got - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert (err <= bound).all(), f"at {worst}: got {got[worst]}, want {want[worst]}, bound {np.asarray(bound)[worst]}"


def test_scatter_add_index_lists(host):
    """pos/perm are the stable counting sort of the clamped indices."""
    kern = next(c for c in CASES if c.id == "scatter_add_3x1_n100_t32").kernels[0]
    idx = np.random.default_rng(1).integers(-2, 5, 100).astype(np.int32)
    pos, perm = np.zeros(4, np.int32), np.zeros(100, np.int32)
    host.launch(kern.name, kern.grid, kern.block, idx, pos, perm)
    keys = np.clip(idx, 0, 2)
    np.testing.assert_array_equal(perm, np.argsort(keys, kind="stable"))
    np.testing.assert_array_equal(pos, np.concatenate([[0], np.cumsum(np.bincount(keys, minlength=3))]))


# --- the generators' own checks -----------------------------------------------------------------------

def test_expression_buffers_need_params():
    with pytest.raises(ValueError, match="params"):
        T.matmul("k", 4, 4, 4, a="(arena + 0)", b="B", out="C")


def test_output_or_epilogue_required():
    with pytest.raises(ValueError, match="out"):
        T.take("k", 4, 4, 4, table="t", idx="i")


def test_bad_tiles_and_shapes_are_refused():
    with pytest.raises(ValueError, match="tile"):
        T.matmul("k", 4, 4, 4, a="A", b="B", out="C", tile=T.Tile(16, 16, 8, 3, 2))
    with pytest.raises(ValueError, match="MmaTile"):
        T.matmul("k", 4, 4, 4, a="A", b="B", out="C", tile=T.TILE_16, tf32=True)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        T.matmul("k", 2**16, 2**16, 1, a="A", b="B", out="C")
    with pytest.raises(ValueError, match="65535"):
        T.matmul("k", 4, 4, 4, a="A", b="B", out="C", stack=T.MAX_STACK + 1)
    with pytest.raises(ValueError, match="fit"):
        T.conv2d("k", (1, 1, 2, 2), (1, 1, 3, 3), 1, 0, x="x", w="w", out="y")
    with pytest.raises(ValueError, match="does not match"):
        T.conv2d_bwd_filter("k", (1, 1, 5, 5), (1, 1, 4, 4), 3, 1, 0, x="x", dy="dy", out="dw")
    with pytest.raises(ValueError, match="workspace"):  # split K: slices need somewhere to go
        T.matmul("k", 4, 4, 800, a="A", b="B", out="C", splits=4)
    with pytest.raises(ValueError, match="empty slice"):  # 3 k steps cannot make 4 slices
        T.matmul("k", 4, 4, 24, a="A", b="B", out="C", splits=4, part="P")
    with pytest.raises(ValueError, match="SGEMM only"):
        T.matmul("k", 4, 4, 800, a="A", b="B", out="C", tf32=True, splits=4, part="P")


def test_split_k_fills_the_gpu_only_where_the_output_cannot():
    """A filter gradient (small output, K = batch x pixels) is split into slices of at
    least SPLIT_MIN_STEPS k steps, none empty, about SPLIT_BLOCKS blocks in all; a large
    output or a short K is not split."""
    for m, n, k in ((6, 25, 64 * 28 * 28), (16, 150, 64 * 10 * 10), (64, 32, 64 * 32 * 32)):
        tile = T.pick_tile(m, n)
        steps, blocks = -(-k // tile.bk), -(-m // tile.bm) * -(-n // tile.bn)
        splits = T.split_k(m, n, k)
        per = -(-steps // splits)
        assert splits > 1 and per >= T.SPLIT_MIN_STEPS and -(-steps // per) == splits
        assert splits * blocks <= T.SPLIT_BLOCKS + blocks
    assert T.split_k(1024, 1024, 1 << 20) == 1           # enough blocks already
    assert T.split_k(6, 25, 8 * (T.SPLIT_FROM_STEPS - 1)) == 1  # K too short to be worth a second launch


def test_source_names_the_template_and_shapes():
    src = T.conv2d("c", (2, 3, 7, 6), (4, 3, 3, 3), 1, 1, x="x", w="w", out="y").source
    assert "// dlc conv2d: x[2,3,7,6] w[4,3,3,3] stride 1x1 pad 1x1 -> [2,4,7,6]" in src
    assert 'extern "C" __global__ void __launch_bounds__(' in src
