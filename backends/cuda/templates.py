"""CUDA C source generators for the kernel IR's Template parts, one `__global__` kernel each,
specialized on static shapes: matmul (tiled SGEMM, optional TF32 tensor cores), conv2d and
its two gradients (implicit GEMM on the same core), pool2d and its gradient, take,
scatter_add (two kernels: an index pass and a gather), colsum.

Calling convention (the same for every generator):
- `name`: the kernel's name; kernels are `extern "C"`, so the name is the symbol.
- Buffers are C expressions chosen by the caller: an identifier ("x") or an arena slice
  ("(arena + 4096)", "(int*)(ws + 64)"). A generator binds each to a local pointer once,
  so offsets baked into the source stay valid inside a captured CUDA graph.
- `params`: the kernel's C parameter list (e.g. ["float* __restrict__ arena"]); by
  default one pointer parameter per buffer, which then must be identifiers.
- `epilogue(index, value) -> str`: C statements run once per output element, by the one
  thread that computed it, after its value is final. `index` is an `int` C expression,
  the element's row-major flat index in the op's output; `value` names a `float` local
  (an lvalue) holding the result. The statements are placed inside their own braces and
  may read any kernel parameter; they must not read output elements other threads write
  (there is no barrier after the main computation). Template locals end with an
  underscore: epilogue code must not declare such names. The default epilogue,
  `store(out)`, writes `out[index] = value;`.
- The result is a `CudaKernel`: its source (with a comment naming the template and
  shapes), its launch grid and block, and its static shared memory.

Semantics follow dlc/core/ops (linalg.py, misc.py): avg pooling divides by the whole
window (padding counts), max pooling's gradient goes to the first maximum of a window in
row-major order (padding as -inf), take and scatter_add clamp indices into the table.
Every sum is computed in a fixed order, so results are deterministic run to run (the
single integer atomic, in scatter_add_index, counts and is exact in any order).

Limits: float32 only; every flat size below 2**31 (int indexing); no split-K, so a GEMM
with small M x N and long K (conv2d_bwd_filter on large batches, colsum on tall inputs)
has few blocks; conv2d_bwd_data with stride > 1 multiplies the zeros between strided
taps (stride**2 more work than needed); tile choices are untuned heuristics.
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import Callable, Sequence

Epilogue = Callable[[str, str], str]
INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class CudaKernel:
    name: str
    source: str                    # a complete extern "C" __global__ function (+ its helpers)
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int = 0          # static shared memory

    @property
    def threads(self) -> int:
        return math.prod(self.block)


def module(*kernels: CudaKernel) -> str:
    """One translation unit holding several kernels."""
    return "\n".join(k.source for k in kernels)


def store(out: str) -> Epilogue:
    """The default epilogue: out[index] = value."""
    return lambda index, value: f"({out})[{index}] = {value};"


# --- shared helpers ------------------------------------------------------------------------------

def _signature(params: Sequence[str] | None, buffers: Sequence[tuple[str | None, str]]) -> str:
    """`params` joined, or one parameter per (expression, C type) buffer."""
    if params is not None:
        return ", ".join(params)
    decls = []
    for expr, ctype in buffers:
        if expr is None:
            continue
        if not expr.isidentifier():
            raise ValueError(f"buffer {expr!r} is an expression: pass `params` to declare the kernel's parameters")
        decls.append(f"{ctype}* __restrict__ {expr}")
    return ", ".join(dict.fromkeys(decls))  # a buffer named twice is one parameter


def _epilogue(epilogue: Epilogue | None, out: str | None) -> Epilogue:
    if epilogue is not None:
        return epilogue
    if out is None:
        raise ValueError("give `out` or an `epilogue`")
    return store(out)


def _emit(epilogue: Epilogue, index: str, value: str, indent: int) -> str:
    """The epilogue's statements in their own block, indented."""
    body = textwrap.indent(textwrap.dedent(epilogue(index, value)).strip(), "    ")
    return textwrap.indent(f"{{\n{body}\n}}", " " * indent)


MAX_STACK = 65535  # a grid's z extent


def _check_sizes(what: str, *sizes: int) -> None:
    for s in sizes:
        if not 0 < s <= INT_MAX:
            raise ValueError(f"{what}: size {s} is outside 1 .. 2**31-1")


def _all(*conds: str) -> str:
    conds = [c for c in conds if c]
    return " && ".join(conds) if conds else "true"


def _plus(var: str, c: int) -> str:
    """`var + c` written plainly: "y_", "y_ + 2", "y_ - 1"."""
    return var if c == 0 else f"{var} + {c}" if c > 0 else f"{var} - {-c}"


def _blocks(total: int, per: int) -> int:
    return -(-total // per)


# --- the GEMM core ---------------------------------------------------------------------------------
# C[row, col] = sum_kk A(row, kk) * B(kk, col) for row < m, col < n, kk < k, where A and B
# are C expressions (plain loads for matmul, computed gathers for convolutions).

@dataclass(frozen=True)
class Tile:
    """An SGEMM block tile: bm x bn outputs per block, bk deep per step, tm x tn per thread."""
    bm: int = 128
    bn: int = 128
    bk: int = 8
    tm: int = 8
    tn: int = 8

    @property
    def threads(self) -> int:
        return (self.bm // self.tm) * (self.bn // self.tn)

    def check(self) -> None:
        t = self.threads
        ok = (self.bm % self.tm == 0 and self.bn % self.tn == 0 and (self.bm * self.bk) % t == 0
              and (self.bn * self.bk) % t == 0 and t <= 1024 and t % 32 == 0)
        if not ok:
            raise ValueError(f"bad tile {self}: tm | bm, tn | bn, threads | bm*bk and bn*bk, "
                             f"32 | threads <= 1024")


@dataclass(frozen=True)
class MmaTile:
    """A TF32 tensor-core block tile: bm x bn per block, bk deep per step (a multiple of 8),
    warps of wm x wn outputs (multiples of 16 x 8), one m16n8k8 mma per 16x8x8 piece."""
    bm: int = 64
    bn: int = 64
    bk: int = 16
    wm: int = 32
    wn: int = 32

    @property
    def threads(self) -> int:
        return 32 * (self.bm // self.wm) * (self.bn // self.wn)

    def check(self) -> None:
        t = self.threads
        ok = (self.bm % self.wm == 0 and self.bn % self.wn == 0 and self.wm % 16 == 0 and self.wn % 8 == 0
              and self.bk % 8 == 0 and (self.bm * self.bk) % t == 0 and (self.bn * self.bk) % t == 0
              and t <= 1024)
        if not ok:
            raise ValueError(f"bad mma tile {self}")


TILE_128 = Tile(128, 128, 8, 8, 8)  # 256 threads
TILE_128x64 = Tile(128, 64, 8, 8, 4)  # 256 threads
TILE_64 = Tile(64, 64, 8, 4, 4)     # 256 threads
TILE_32 = Tile(32, 32, 8, 4, 4)     # 64 threads
TILE_16 = Tile(16, 16, 8, 2, 2)     # 64 threads
MMA_64 = MmaTile(64, 64, 16, 32, 32)  # 128 threads, 4 warps of 2x4 mma tiles

SMS = 132  # streaming multiprocessors of an H100/H200, for the tile heuristic


def pick_tile(m: int, n: int) -> Tile:
    """The largest tile that still gives every SM a block; the smallest otherwise. Where
    128x128 tiles would do, 128x64 ones (8x4 per thread) run: 37.0 TFLOP/s against 25.8 at
    4096^3 on an H200 (`gpu_bench.py --tiles`). Choosing 128x64 before 64x64 by the same
    rule made LeNet-5's [6 x 12544] data gradient a third slower (rows 6..127 idle)."""
    for tile in (TILE_128, TILE_64, TILE_32):
        if _blocks(m, tile.bm) * _blocks(n, tile.bn) >= SMS:
            return TILE_128x64 if tile is TILE_128 else tile
    return TILE_16 if max(m, n) <= 16 else TILE_32


SPLIT_BLOCKS = 4 * SMS   # blocks a split GEMM aims for
SPLIT_MIN_STEPS = 8      # k steps each slice keeps at least
SPLIT_FROM_STEPS = 64    # a shorter K is not split: a second launch would cost about what it saves


def split_k(m: int, n: int, k: int, tile: Tile | None = None) -> int:
    """Slices of K for a GEMM whose output gives too few blocks to fill the GPU (a
    filter gradient: [O] x [C*KH*KW] over N*OH*OW): each block sums one slice into a
    workspace, and split_sum adds the slices in order. 1: no split."""
    tile = tile or pick_tile(m, n)
    blocks, steps = _blocks(m, tile.bm) * _blocks(n, tile.bn), _blocks(k, tile.bk)
    if blocks >= SMS or steps < SPLIT_FROM_STEPS:
        return 1
    splits = max(1, min(_blocks(SPLIT_BLOCKS, blocks), steps // SPLIT_MIN_STEPS, MAX_STACK))
    return _blocks(steps, _blocks(steps, splits))  # no empty slice


@dataclass(frozen=True)
class _Gemm:
    """What a GEMM-shaped template feeds the core."""
    m: int
    n: int
    k: int
    a: Callable[[str, str], str]          # (row, kk) -> float; called with row < m, kk < k
    b: Callable[[str, str], str]          # (kk, col) -> float; called with kk < k, col < n
    a_kfast: bool                         # consecutive kk are adjacent in memory (coalesce on k)
    b_kfast: bool
    out_index: Callable[[str, str], str]  # (row, col) -> the output's flat index
    binds: Sequence[str]                  # pointer bindings at the top of the kernel
    helpers: str = ""                     # __device__ functions placed before the kernel
    what: str = ""                        # the comment naming template and shapes
    stack: int = 1                        # independent products, one per blockIdx.z


def _vec(t: int) -> int:
    """Fragment vector width: float4 / float2 / scalar shared-memory reads."""
    return 4 if t % 4 == 0 else 2 if t % 2 == 0 else 1


def _loaders(g: _Gemm, bm: int, bn: int, bk: int, threads: int, a_slot: str, b_slot: str,
             convert: str = "{}") -> str:
    """C lambdas: load_tile_(k0_) fetches the A and B tiles at depth k0_ into registers
    (zero outside the matrices); store_tile_(buf_) writes them to shared memory at a_slot /
    b_slot (C lvalues in buf_, kk_ and rc_, the row or column within the tile), each value
    wrapped in `convert`."""
    la, lb = bm * bk // threads, bn * bk // threads

    def decode(kfast: bool, extent: int) -> str:
        return (f"const int rc_ = l_ / {bk}, kk_ = l_ % {bk};" if kfast else
                f"const int kk_ = l_ / {extent}, rc_ = l_ % {extent};")

    a_ok = _all(f"m0_ + rc_ < {g.m}" if g.m % bm else "", f"k0_ + kk_ < {g.k}" if g.k % bk else "")
    b_ok = _all(f"n0_ + rc_ < {g.n}" if g.n % bn else "", f"k0_ + kk_ < {g.k}" if g.k % bk else "")
    a_val, b_val = g.a("m0_ + rc_", "k0_ + kk_"), g.b("k0_ + kk_", "n0_ + rc_")
    a_load = a_val if a_ok == "true" else f"({a_ok}) ? {a_val} : 0.0f"
    b_load = b_val if b_ok == "true" else f"({b_ok}) ? {b_val} : 0.0f"
    return f"""\
    float ra_[{la}], rb_[{lb}];  // the next tiles, on their way from global to shared memory
    auto load_tile_ = [&](int k0_) {{
        #pragma unroll
        for (int e_ = 0; e_ < {la}; ++e_) {{
            const int l_ = tid_ + e_ * {threads};
            {decode(g.a_kfast, bm)}
            ra_[e_] = {a_load};
        }}
        #pragma unroll
        for (int e_ = 0; e_ < {lb}; ++e_) {{
            const int l_ = tid_ + e_ * {threads};
            {decode(g.b_kfast, bn)}
            rb_[e_] = {b_load};
        }}
    }};
    auto store_tile_ = [&](int buf_) {{
        #pragma unroll
        for (int e_ = 0; e_ < {la}; ++e_) {{
            const int l_ = tid_ + e_ * {threads};
            {decode(g.a_kfast, bm)}
            {a_slot} = {convert.format("ra_[e_]")};
        }}
        #pragma unroll
        for (int e_ = 0; e_ < {lb}; ++e_) {{
            const int l_ = tid_ + e_ * {threads};
            {decode(g.b_kfast, bn)}
            {b_slot} = {convert.format("rb_[e_]")};
        }}
    }};
"""


def _sgemm(name: str, g: _Gemm, tile: Tile, signature: str, epilogue: Epilogue,
           splits: int = 1, part: str | None = None) -> CudaKernel:
    """Shared-memory SGEMM: double-buffered shared tiles (one barrier per k step, the next
    tiles prefetched into registers during the math), a tm x tn register tile per thread
    read with vector loads, rows and columns of a thread strided so that a warp's
    shared-memory reads are conflict-free and its global stores coalesce. With `splits`,
    blockIdx.z is a slice of K and the block stores its sums at part[z][output index]
    instead of running the epilogue (split_sum adds the slices)."""
    tile.check()
    bm, bn, bk, tm, tn, threads = tile.bm, tile.bn, tile.bk, tile.tm, tile.tn, tile.threads
    vm, vn = _vec(tm), _vec(tn)
    sm, sn = bm * vm // tm, bn * vn // tn  # stride between a thread's vector groups
    pad = 4  # keeps float4 alignment; breaks bank conflicts of transposed stores
    ksteps = _blocks(g.k, bk)
    per = _blocks(ksteps, splits)
    if splits > 1 and (g.stack != 1 or part is None or _blocks(ksteps, per) != splits):
        raise ValueError(f"{g.what}: {splits} slices of {ksteps} k steps need one product, a workspace "
                         f"and no empty slice")
    if splits > 1:
        binds = [*g.binds, f"float* __restrict__ part_ = ({part});"]
        steps, start, k_at = "steps_", f"first_ * {bk}", f"(first_ + ks_ + 1) * {bk}"
        first = (f"\n    const int first_ = blockIdx.z * {per}, steps_ = min({per}, {ksteps} - first_);"
                 f"  // this block's slice of K")
        finish = " " * 16 + f"part_[blockIdx.z * {g.m * g.n} + idx_] = acc_[mi_][nj_];"
        grid_z, note = splits, f", {splits} slices of {per} (blockIdx.z)"
    else:
        binds, steps, start, k_at, first = g.binds, ksteps, "0", f"(ks_ + 1) * {bk}", ""
        finish = " " * 16 + "float v_ = acc_[mi_][nj_];\n" + _emit(epilogue, "idx_", "v_", 16)
        grid_z, note = g.stack, ""
    loaders = _loaders(g, bm, bn, bk, threads, "as_[buf_][kk_][rc_]", "bs_[buf_][kk_][rc_]")

    def frag(dst: str, count: int, v: int, stride: int, src: str, me: str) -> str:
        vt = {4: "float4", 2: "float2", 1: "float"}[v]
        parts = {4: ("x", "y", "z", "w"), 2: ("x", "y"), 1: ()}[v]
        fill = " ".join(f"{dst}[g_ * {v} + {i}] = q_.{p};" for i, p in enumerate(parts)) or f"{dst}[g_] = q_;"
        return (f"#pragma unroll\n"
                f"for (int g_ = 0; g_ < {count // v}; ++g_) {{\n"
                f"    const {vt} q_ = *reinterpret_cast<const {vt}*>(&{src}[cur_][kk_][g_ * {stride} + {me} * {v}]);\n"
                f"    {fill}\n"
                f"}}")

    row = f"m0_ + mi_ / {vm} * {sm} + ty_ * {vm} + mi_ % {vm}"
    col = f"n0_ + nj_ / {vn} * {sn} + tx_ * {vn} + nj_ % {vn}"
    ok = _all(f"row_ < {g.m}" if g.m % bm else "", f"col_ < {g.n}" if g.n % bn else "")
    smem = 2 * bk * (bm + pad) * 4 + 2 * bk * (bn + pad) * 4
    source = f"""\
{g.helpers}// dlc {g.what}
// SGEMM tile {bm}x{bn}x{bk}, {tm}x{tn} per thread, {threads} threads, {ksteps} k steps{note}
// (at least one block per SM: ptxas may then give a long fused epilogue registers rather
// than spill it, which it did for a 2x2 tile at 40 registers)
extern "C" __global__ void __launch_bounds__({threads}, 1) {name}({signature})
{{
{_binds(binds)}
    __shared__ __align__(16) float as_[2][{bk}][{bm + pad}];
    __shared__ __align__(16) float bs_[2][{bk}][{bn + pad}];
    const int tid_ = threadIdx.x, tx_ = tid_ % {bn // tn}, ty_ = tid_ / {bn // tn};
    const int m0_ = blockIdx.y * {bm}, n0_ = blockIdx.x * {bn};{first}
{loaders}
    float acc_[{tm}][{tn}];
    #pragma unroll
    for (int mi_ = 0; mi_ < {tm}; ++mi_)
        #pragma unroll
        for (int nj_ = 0; nj_ < {tn}; ++nj_) acc_[mi_][nj_] = 0.0f;

    load_tile_({start});
    store_tile_(0);
    __syncthreads();
    #pragma unroll 1
    for (int ks_ = 0; ks_ < {steps}; ++ks_) {{
        const int cur_ = ks_ & 1;
        if (ks_ + 1 < {steps}) load_tile_({k_at});
        #pragma unroll
        for (int kk_ = 0; kk_ < {bk}; ++kk_) {{
            float fa_[{tm}], fb_[{tn}];
{textwrap.indent(frag("fa_", tm, vm, sm, "as_", "ty_"), " " * 12)}
{textwrap.indent(frag("fb_", tn, vn, sn, "bs_", "tx_"), " " * 12)}
            #pragma unroll
            for (int mi_ = 0; mi_ < {tm}; ++mi_)
                #pragma unroll
                for (int nj_ = 0; nj_ < {tn}; ++nj_) acc_[mi_][nj_] = fmaf(fa_[mi_], fb_[nj_], acc_[mi_][nj_]);
        }}
        if (ks_ + 1 < {steps}) store_tile_(cur_ ^ 1);
        __syncthreads();
    }}

    #pragma unroll
    for (int mi_ = 0; mi_ < {tm}; ++mi_) {{
        const int row_ = {row};
        #pragma unroll
        for (int nj_ = 0; nj_ < {tn}; ++nj_) {{
            const int col_ = {col};
            if ({ok}) {{
                const int idx_ = {g.out_index("row_", "col_")};
{finish}
            }}
        }}
    }}
}}
"""
    return CudaKernel(name, source, (_blocks(g.n, bn), _blocks(g.m, bm), grid_z), (threads, 1, 1), smem)


TF32_HELPERS = r"""#ifndef DLC_TF32_HELPERS
#define DLC_TF32_HELPERS 1
// round to TF32 (10 mantissa bits, to nearest, ties away), as the tensor cores read it
__device__ __forceinline__ unsigned dlc_to_tf32(float x)
{
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}
// d (16x8) += a (16x8, row) * b (8x8, col), one warp; fragments as in the PTX ISA
__device__ __forceinline__ void dlc_mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2])
{
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif
"""


def _tf32_gemm(name: str, g: _Gemm, tile: MmaTile, signature: str, epilogue: Epilogue) -> CudaKernel:
    """Tensor-core GEMM on TF32 inputs with float accumulation (sm_80+): the same double-
    buffered loads as the SGEMM, values rounded to TF32 on their way into shared memory,
    each warp a wm x wn tile of m16n8k8 mma.sync. Shared layouts avoid bank conflicts on
    fragment reads: as_[buf_][row][kk] (row pitch bk + 4), bs_[buf_][kk][col] (pitch bn + 8)."""
    tile.check()
    bm, bn, bk, wm, wn, threads = tile.bm, tile.bn, tile.bk, tile.wm, tile.wn, tile.threads
    mi, ni = wm // 16, wn // 8
    ksteps = _blocks(g.k, bk)
    loaders = _loaders(g, bm, bn, bk, threads, "as_[buf_][rc_][kk_]", "bs_[buf_][kk_][rc_]", "dlc_to_tf32({})")
    row = f"m0_ + wr_ * {wm} + i_ * 16 + gq_ + 8 * (q_ / 2)"
    col = f"n0_ + wc_ * {wn} + j_ * 8 + 2 * tq_ + q_ % 2"
    ok = _all(f"row_ < {g.m}" if g.m % bm else "", f"col_ < {g.n}" if g.n % bn else "")
    smem = 2 * bm * (bk + 4) * 4 + 2 * bk * (bn + 8) * 4
    source = f"""\
{TF32_HELPERS}{g.helpers}// dlc {g.what}
// TF32 tensor cores: tile {bm}x{bn}x{bk}, warps of {wm}x{wn}, {threads} threads, {ksteps} k steps
extern "C" __global__ void __launch_bounds__({threads}) {name}({signature})
{{
{_binds(g.binds)}
    __shared__ __align__(16) unsigned as_[2][{bm}][{bk + 4}];
    __shared__ __align__(16) unsigned bs_[2][{bk}][{bn + 8}];
    const int tid_ = threadIdx.x, lane_ = tid_ % 32, warp_ = tid_ / 32;
    const int wr_ = warp_ / {bn // wn}, wc_ = warp_ % {bn // wn};  // this warp's tile
    const int gq_ = lane_ / 4, tq_ = lane_ % 4;  // fragment coordinates (PTX: groupID, threadID_in_group)
    const int m0_ = blockIdx.y * {bm}, n0_ = blockIdx.x * {bn};
{loaders}
    float acc_[{mi}][{ni}][4];
    #pragma unroll
    for (int i_ = 0; i_ < {mi}; ++i_)
        #pragma unroll
        for (int j_ = 0; j_ < {ni}; ++j_)
            #pragma unroll
            for (int q_ = 0; q_ < 4; ++q_) acc_[i_][j_][q_] = 0.0f;

    load_tile_(0);
    store_tile_(0);
    __syncthreads();
    #pragma unroll 1
    for (int ks_ = 0; ks_ < {ksteps}; ++ks_) {{
        const int cur_ = ks_ & 1;
        if (ks_ + 1 < {ksteps}) load_tile_((ks_ + 1) * {bk});
        #pragma unroll
        for (int k8_ = 0; k8_ < {bk}; k8_ += 8) {{
            unsigned fa_[{mi}][4], fb_[{ni}][2];
            #pragma unroll
            for (int i_ = 0; i_ < {mi}; ++i_) {{
                const int r_ = wr_ * {wm} + i_ * 16 + gq_;
                fa_[i_][0] = as_[cur_][r_][k8_ + tq_];
                fa_[i_][1] = as_[cur_][r_ + 8][k8_ + tq_];
                fa_[i_][2] = as_[cur_][r_][k8_ + tq_ + 4];
                fa_[i_][3] = as_[cur_][r_ + 8][k8_ + tq_ + 4];
            }}
            #pragma unroll
            for (int j_ = 0; j_ < {ni}; ++j_) {{
                const int c_ = wc_ * {wn} + j_ * 8 + gq_;
                fb_[j_][0] = bs_[cur_][k8_ + tq_][c_];
                fb_[j_][1] = bs_[cur_][k8_ + tq_ + 4][c_];
            }}
            #pragma unroll
            for (int i_ = 0; i_ < {mi}; ++i_)
                #pragma unroll
                for (int j_ = 0; j_ < {ni}; ++j_) dlc_mma_tf32(acc_[i_][j_], fa_[i_], fb_[j_]);
        }}
        if (ks_ + 1 < {ksteps}) store_tile_(cur_ ^ 1);
        __syncthreads();
    }}

    #pragma unroll
    for (int i_ = 0; i_ < {mi}; ++i_)
        #pragma unroll
        for (int j_ = 0; j_ < {ni}; ++j_)
            #pragma unroll
            for (int q_ = 0; q_ < 4; ++q_) {{
                const int row_ = {row}, col_ = {col};
                if ({ok}) {{
                    const int idx_ = {g.out_index("row_", "col_")};
                    float v_ = acc_[i_][j_][q_];
{_emit(epilogue, "idx_", "v_", 20)}
                }}
            }}
}}
"""
    return CudaKernel(name, source, (_blocks(g.n, bn), _blocks(g.m, bm), g.stack), (threads, 1, 1), smem)


def _binds(binds: Sequence[str]) -> str:
    return "\n".join(f"    {b}" for b in binds)


def _gemm(name, g: _Gemm, tile, tf32: bool, signature: str, epilogue: Epilogue,
          splits: int = 1, part: str | None = None) -> CudaKernel:
    _check_sizes(g.what, g.m, g.n, g.k, g.m * g.n)
    if tile is not None and isinstance(tile, MmaTile) != tf32:
        raise ValueError(f"{g.what}: tf32={tf32} takes {'an MmaTile' if tf32 else 'a Tile'}, got {tile}")
    if tf32 and splits > 1:
        raise ValueError(f"{g.what}: K is split in the SGEMM only")
    if tf32:
        return _tf32_gemm(name, g, tile or MMA_64, signature, epilogue)
    return _sgemm(name, g, tile or pick_tile(g.m, g.n), signature, epilogue, splits, part)


def split_sum(name: str, total: int, splits: int, *, part: str, out: str | None = None,
              epilogue: Epilogue | None = None, params: Sequence[str] | None = None) -> CudaKernel:
    """The second kernel of a split GEMM: out[i] = part[0][i] + part[1][i] + ... in slice
    order (the same bits every run), then the epilogue."""
    sig = _signature(params, [(part, "const float"), (out, "float")])
    body = f"""\
        float v_ = part_[idx_];
        for (int z_ = 1; z_ < {splits}; ++z_) v_ += part_[z_ * {total} + idx_];"""
    return _per_element(name, total, sig, [f"const float* __restrict__ part_ = ({part});"], body,
                        _epilogue(epilogue, out), f"split_sum: {splits} slices of [{total}]")


# --- matmul ------------------------------------------------------------------------------------------

def matmul(name: str, m: int, n: int, k: int, *, a: str, b: str, out: str | None = None,
           ta: bool = False, tb: bool = False, epilogue: Epilogue | None = None,
           params: Sequence[str] | None = None, tile: Tile | MmaTile | None = None,
           tf32: bool = False, stack: int = 1, first: int = 0, splits: int = 1,
           part: str | None = None) -> CudaKernel:
    """C[m, n] = op(A) @ op(B): A is [m, k] ([k, m] when ta), B is [k, n] ([n, k] when tb).
    `tf32` uses tensor cores (inputs rounded to 10 mantissa bits; sm_80+). With `stack` > 1,
    products `first` .. `first + stack - 1` of stacks of matrices A, B and C side by side
    (batch_matmul), each a z-slice of the grid (at most MAX_STACK). With `splits` > 1
    (split_k), the slices of K go to `part` and split_sum finishes."""
    if not 0 < stack <= MAX_STACK:
        raise ValueError(f"matmul: {stack} products in one launch; a grid holds 1 .. {MAX_STACK}")
    _check_sizes("matmul", (first + stack) * m * k, (first + stack) * k * n, (first + stack) * m * n)
    z = (f"(blockIdx.z + {first})" if first else "blockIdx.z") if stack > 1 or first else None
    at, bt, ct = (f" + {z} * {m * k}", f" + {z} * {k * n}", f"{z} * {m * n} + ") if z else ("", "", "")
    g = _Gemm(m, n, k,
              a=lambda r, kk: f"a_[({kk}) * {m} + ({r})]" if ta else f"a_[({r}) * {k} + ({kk})]",
              b=lambda kk, c: f"b_[({c}) * {k} + ({kk})]" if tb else f"b_[({kk}) * {n} + ({c})]",
              a_kfast=not ta, b_kfast=tb,
              out_index=lambda r, c: f"{ct}({r}) * {n} + ({c})",
              binds=[f"const float* __restrict__ a_ = ({a}){at};", f"const float* __restrict__ b_ = ({b}){bt};"],
              what=(f"matmul: C[{m}x{n}] = {'A^T' if ta else 'A'}[{m}x{k}] @ {'B^T' if tb else 'B'}[{k}x{n}]"
                    + (f", {stack} of them" if stack > 1 else "")),
              stack=stack)
    sig = _signature(params, [(a, "const float"), (b, "const float"), (out, "float"), (part, "float")])
    return _gemm(name, g, tile, tf32, sig, _epilogue(epilogue, out), splits, part)


# --- convolutions as implicit GEMMs -----------------------------------------------------------------

def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _conv_out(size: int, k: int, stride: int, pad: int, dilation: int = 1) -> int:
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


@dataclass(frozen=True)
class _ConvShape:
    n: int
    c: int
    h: int
    w: int
    o: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int = 1
    dw: int = 1

    @property
    def oh(self) -> int:
        return _conv_out(self.h, self.kh, self.sh, self.ph, self.dh)

    @property
    def ow(self) -> int:
        return _conv_out(self.w, self.kw, self.sw, self.pw, self.dw)

    @property
    def x(self) -> str:
        return f"x[{self.n},{self.c},{self.h},{self.w}]"

    @property
    def wt(self) -> str:
        return f"w[{self.o},{self.c},{self.kh},{self.kw}]"

    @property
    def y(self) -> str:
        return f"[{self.n},{self.o},{self.oh},{self.ow}]"

    @property
    def window(self) -> str:
        dilated = f" dilation {self.dh}x{self.dw}" if (self.dh, self.dw) != (1, 1) else ""
        return f"stride {self.sh}x{self.sw} pad {self.ph}x{self.pw}{dilated}"

    def text(self) -> str:
        return f"{self.x} {self.wt} {self.window} -> {self.y}"


def _conv_shape(x_shape, w_shape, stride, pad, dilation=1) -> _ConvShape:
    n, c, h, w = x_shape
    o, c2, kh, kw = w_shape
    if c != c2:
        raise ValueError(f"conv2d: input has {c} channels, weights expect {c2}")
    s = _ConvShape(n, c, h, w, o, kh, kw, *_pair(stride), *_pair(pad), *_pair(dilation))
    if s.oh < 1 or s.ow < 1:
        raise ValueError(f"conv2d: the window does not fit: {s.text()}")
    return s


def _x_gather(fn: str, s: _ConvShape) -> str:
    """float fn(x, cij, nyx): x[n, c, oy*s+i*d-p, ox*s+j*d-p] for the conv GEMM's (c,i,j) and
    (n,oy,ox) coordinates; 0 in the padding."""
    inside = _all(*(f"iy >= 0 && iy < {s.h}" if s.ph else "",), *(f"ix >= 0 && ix < {s.w}" if s.pw else "",))
    at = f"x[((n * {s.c} + c) * {s.h} + iy) * {s.w} + ix]"
    return f"""\
// x at conv-GEMM coordinates: cij = (c, i, j) of the kernel window, nyx = (n, oy, ox)
__device__ __forceinline__ float {fn}(const float* __restrict__ x, int cij, int nyx)
{{
    const int c = cij / {s.kh * s.kw}, i = cij / {s.kw} % {s.kh}, j = cij % {s.kw};
    const int n = nyx / {s.oh * s.ow}, oy = nyx / {s.ow} % {s.oh}, ox = nyx % {s.ow};
    const int iy = oy * {s.sh} + i * {s.dh} - {s.ph}, ix = ox * {s.sw} + j * {s.dw} - {s.pw};
    return {at if inside == "true" else f"({inside}) ? {at} : 0.0f"};
}}
"""


def conv2d(name: str, x_shape, w_shape, stride=1, pad=0, dilation=1, *, x: str, w: str, out: str | None = None,
           epilogue: Epilogue | None = None, params: Sequence[str] | None = None,
           tile: Tile | MmaTile | None = None, tf32: bool = False) -> CudaKernel:
    """y[n,o,oy,ox] = sum_{c,i,j} x[n,c,oy*s+i*d-p,ox*s+j*d-p] * w[o,c,i,j], as the GEMM
    [O] x [N*OH*OW] over K = C*KH*KW, x gathered on the fly (no im2col buffer)."""
    s = _conv_shape(x_shape, w_shape, stride, pad, dilation)
    p, kdim = s.oh * s.ow, s.c * s.kh * s.kw
    _check_sizes("conv2d", s.n * s.c * s.h * s.w, s.n * s.o * p)
    g = _Gemm(s.o, s.n * p, kdim,
              a=lambda r, kk: f"w_[({r}) * {kdim} + ({kk})]",
              b=lambda kk, c: f"{name}_x(x_, {kk}, {c})",
              a_kfast=True, b_kfast=False,
              out_index=lambda r, c: f"({c}) / {p} * {s.o * p} + ({r}) * {p} + ({c}) % {p}",
              binds=[f"const float* __restrict__ x_ = ({x});", f"const float* __restrict__ w_ = ({w});"],
              helpers=_x_gather(f"{name}_x", s), what=f"conv2d: {s.text()}")
    sig = _signature(params, [(x, "const float"), (w, "const float"), (out, "float")])
    return _gemm(name, g, tile, tf32, sig, _epilogue(epilogue, out))


def conv2d_bwd_data(name: str, dy_shape, w_shape, in_hw, stride=1, pad=0, dilation=1, *, dy: str, w: str,
                    out: str | None = None, epilogue: Epilogue | None = None,
                    params: Sequence[str] | None = None, tile: Tile | MmaTile | None = None,
                    tf32: bool = False) -> CudaKernel:
    """dx[n,c,y,x] = sum_{o,i,j} dy[n,o,(y+p-i*d)/s,(x+p-j*d)/s] * w[o,c,i,j] over the taps
    where the division is exact and in range: the GEMM [C] x [N*H*W] over K = O*KH*KW."""
    n, o, oh, ow = dy_shape
    h, wd = in_hw
    s = _conv_shape((n, w_shape[1], h, wd), w_shape, stride, pad, dilation)
    if (s.o, s.oh, s.ow) != (o, oh, ow):
        raise ValueError(f"conv2d_bwd_data: gradient {list(dy_shape)} does not match {s.text()}")
    hw, taps = h * wd, s.kh * s.kw
    _check_sizes("conv2d_bwd_data", n * o * oh * ow, n * s.c * hw)
    terms = [f"ty >= 0 && ty / {s.sh} < {oh}" if s.ph or s.sh > 1 else "",
             f"ty % {s.sh} == 0" if s.sh > 1 else "",
             f"tx >= 0 && tx / {s.sw} < {ow}" if s.pw or s.sw > 1 else "",
             f"tx % {s.sw} == 0" if s.sw > 1 else ""]
    # without padding or stride, y - i is always a valid row: y - i >= 0 needs checking
    terms += [f"ty >= 0 && ty < {oh}" if not (s.ph or s.sh > 1) else "",
              f"tx >= 0 && tx < {ow}" if not (s.pw or s.sw > 1) else ""]
    inside = _all(*terms)
    helper = f"""\
// dy at conv-gradient GEMM coordinates: oij = (o, i, j), nyx = (n, y, x) of dx; 0 off the taps
__device__ __forceinline__ float {name}_dy(const float* __restrict__ dy, int oij, int nyx)
{{
    const int o = oij / {taps}, i = oij / {s.kw} % {s.kh}, j = oij % {s.kw};
    const int n = nyx / {hw}, y = nyx / {wd} % {h}, x = nyx % {wd};
    const int ty = y + {s.ph} - i * {s.dh}, tx = x + {s.pw} - j * {s.dw};  // oy * stride, ox * stride
    return ({inside}) ? dy[((n * {o} + o) * {oh} + ty / {s.sh}) * {ow} + tx / {s.sw}] : 0.0f;
}}
"""
    g = _Gemm(s.c, n * hw, o * taps,
              a=lambda r, kk: f"w_[({kk}) / {taps} * {s.c * taps} + ({r}) * {taps} + ({kk}) % {taps}]",
              b=lambda kk, c: f"{name}_dy(dy_, {kk}, {c})",
              a_kfast=True, b_kfast=False,
              out_index=lambda r, c: f"({c}) / {hw} * {s.c * hw} + ({r}) * {hw} + ({c}) % {hw}",
              binds=[f"const float* __restrict__ dy_ = ({dy});", f"const float* __restrict__ w_ = ({w});"],
              helpers=helper, what=f"conv2d_bwd_data: dy{s.y} {s.wt} {s.window} -> dx[{n},{s.c},{h},{wd}]")
    sig = _signature(params, [(dy, "const float"), (w, "const float"), (out, "float")])
    return _gemm(name, g, tile, tf32, sig, _epilogue(epilogue, out))


def conv2d_bwd_filter(name: str, x_shape, dy_shape, kernel, stride=1, pad=0, dilation=1, *, x: str, dy: str,
                      out: str | None = None, epilogue: Epilogue | None = None,
                      params: Sequence[str] | None = None, tile: Tile | MmaTile | None = None,
                      tf32: bool = False, splits: int = 1, part: str | None = None) -> CudaKernel:
    """dw[o,c,i,j] = sum_{n,oy,ox} dy[n,o,oy,ox] * x[n,c,oy*s+i*d-p,ox*s+j*d-p]: the GEMM
    [O] x [C*KH*KW] over K = N*OH*OW, whose output is small beside K: with `splits` > 1
    (split_k), the slices of K go to `part` and split_sum finishes."""
    kh, kw = _pair(kernel)
    o = dy_shape[1]
    s = _conv_shape(x_shape, (o, x_shape[1], kh, kw), stride, pad, dilation)
    if tuple(dy_shape) != (s.n, s.o, s.oh, s.ow):
        raise ValueError(f"conv2d_bwd_filter: gradient {list(dy_shape)} does not match {s.text()}")
    p, cols = s.oh * s.ow, s.c * kh * kw
    _check_sizes("conv2d_bwd_filter", s.n * s.c * s.h * s.w, s.n * o * p)
    g = _Gemm(o, cols, s.n * p,
              a=lambda r, kk: f"dy_[({kk}) / {p} * {o * p} + ({r}) * {p} + ({kk}) % {p}]",
              b=lambda kk, c: f"{name}_x(x_, {c}, {kk})",
              a_kfast=True, b_kfast=True,
              out_index=lambda r, c: f"({r}) * {cols} + ({c})",
              binds=[f"const float* __restrict__ x_ = ({x});", f"const float* __restrict__ dy_ = ({dy});"],
              helpers=_x_gather(f"{name}_x", s), what=f"conv2d_bwd_filter: {s.x} dy{s.y} {s.window} -> d{s.wt}")
    sig = _signature(params, [(x, "const float"), (dy, "const float"), (out, "float"), (part, "float")])
    return _gemm(name, g, tile, tf32, sig, _epilogue(epilogue, out), splits, part)


# --- elementwise-shaped templates: one thread per output element ----------------------------------

ELEMENT_THREADS = 256
NEG_INF = "__int_as_float(0xff800000)"


def _per_element(name: str, total: int, signature: str, binds: Sequence[str], body: str,
                 epilogue: Epilogue, what: str, helpers: str = "") -> CudaKernel:
    """A kernel with one thread per output element: `body` computes `float v_` for flat
    output index idx_ (locals ending in _), then the epilogue runs."""
    _check_sizes(name, total)
    t = ELEMENT_THREADS
    source = f"""\
{helpers}// dlc {what}
extern "C" __global__ void __launch_bounds__({t}) {name}({signature})
{{
{_binds(binds)}
    const int idx_ = blockIdx.x * {t} + threadIdx.x;
    if (idx_ >= {total}) return;
{textwrap.indent(textwrap.dedent(body).strip(), "    ")}
{_emit(epilogue, "idx_", "v_", 4)}
}}
"""
    return CudaKernel(name, source, (_blocks(total, t), 1, 1), (t, 1, 1))


def _max_update(best: str, v: str) -> str:
    """best = max(best, v), NaN winning (as numpy's max)."""
    return f"if ({v} > {best} || ({v} != {v} && {best} == {best})) {best} = {v};"


def pool2d(name: str, x_shape, mode: str, kernel, stride, pad=0, *, x: str, out: str | None = None,
           epilogue: Epilogue | None = None, params: Sequence[str] | None = None) -> CudaKernel:
    """y[n,c,oy,ox] = max or mean of the window x[n,c,oy*s-p+i, ox*s-p+j]; max pads with
    -inf, mean divides by the whole window (padding counts as 0)."""
    if mode not in ("max", "avg"):
        raise ValueError(f"pool2d: unknown mode {mode!r}")
    n, c, h, w = x_shape
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(pad)
    oh, ow = _conv_out(h, kh, sh, ph), _conv_out(w, kw, sw, pw)
    if oh < 1 or ow < 1:
        raise ValueError(f"pool2d: a {kh}x{kw} window does not fit {list(x_shape)}")
    update = _max_update("v_", "t_") if mode == "max" else "v_ += t_;"
    body = f"""
        const int ox_ = idx_ % {ow}, oy_ = idx_ / {ow} % {oh};
        const float* __restrict__ plane_ = x_ + idx_ / {oh * ow} * {h * w};
        float v_ = {NEG_INF if mode == "max" else "0.0f"};
        #pragma unroll
        for (int i_ = 0; i_ < {kh}; ++i_) {{
            const int iy_ = oy_ * {sh} + i_ - {ph};
            if (iy_ < 0 || iy_ >= {h}) continue;
            #pragma unroll
            for (int j_ = 0; j_ < {kw}; ++j_) {{
                const int ix_ = ox_ * {sw} + j_ - {pw};
                if (ix_ < 0 || ix_ >= {w}) continue;
                const float t_ = plane_[iy_ * {w} + ix_];
                {update}
            }}
        }}
    """ + ("" if mode == "max" else f"    v_ *= {1.0 / (kh * kw)!r}f;\n")
    what = f"pool2d {mode} {kh}x{kw} stride {sh}x{sw} pad {ph}x{pw}: x[{n},{c},{h},{w}] -> [{n},{c},{oh},{ow}]"
    return _per_element(name, n * c * oh * ow, _signature(params, [(x, "const float"), (out, "float")]),
                        [f"const float* __restrict__ x_ = ({x});"], body, _epilogue(epilogue, out), what)


def pool2d_bwd(name: str, x_shape, mode: str, kernel, stride, pad=0, *, x: str, dy: str,
               out: str | None = None, epilogue: Epilogue | None = None,
               params: Sequence[str] | None = None) -> CudaKernel:
    """dx[n,c,y,x] = the sum of dy over the windows containing (y, x): dy / window size
    for avg; for max, dy of each window whose first maximum (row-major, padding as -inf)
    is at (y, x). Each dx element gathers its windows, so no two threads write the same
    element; max windows are re-scanned per element (no argmax buffer)."""
    if mode not in ("max", "avg"):
        raise ValueError(f"pool2d_bwd: unknown mode {mode!r}")
    n, c, h, w = x_shape
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(pad)
    oh, ow = _conv_out(h, kh, sh, ph), _conv_out(w, kw, sw, pw)
    if oh < 1 or ow < 1:
        raise ValueError(f"pool2d_bwd: a {kh}x{kw} window does not fit {list(x_shape)}")
    if mode == "max":
        contribution = f"""
            // the window's first maximum, row-major, padding as -inf (numpy's argmax)
            float best_ = {NEG_INF};
            int arg_ = 0;
            #pragma unroll
            for (int i_ = 0; i_ < {kh}; ++i_) {{
                const int iy_ = oy_ * {sh} + i_ - {ph};
                #pragma unroll
                for (int j_ = 0; j_ < {kw}; ++j_) {{
                    const int ix_ = ox_ * {sw} + j_ - {pw};
                    const bool in_ = iy_ >= 0 && iy_ < {h} && ix_ >= 0 && ix_ < {w};
                    const float t_ = in_ ? plane_[iy_ * {w} + ix_] : {NEG_INF};
                    if ((i_ == 0 && j_ == 0) || t_ > best_ || (t_ != t_ && best_ == best_)) {{
                        best_ = t_;
                        arg_ = i_ * {kw} + j_;
                    }}
                }}
            }}
            if (arg_ == ({_plus("y_", ph)} - oy_ * {sh}) * {kw} + {_plus("x_", pw)} - ox_ * {sw})
                v_ += gplane_[oy_ * {ow} + ox_];"""
        scale = ""
    else:
        contribution = f"v_ += gplane_[oy_ * {ow} + ox_];"
        scale = f"v_ *= {1.0 / (kh * kw)!r}f;"
    inner = textwrap.indent(textwrap.dedent(contribution).strip(), " " * 16)
    plane = f"const float* __restrict__ plane_ = xin_ + nc_ * {h * w};\n        " if mode == "max" else ""

    def first(v: str, p: int, k: int, s: int) -> str:  # the first window reaching v: ceil((v+p-k+1)/s), >= 0
        t = _plus(v, p - k + 1)
        return f"{t} > 0 ? ({_plus(v, p - k + s)}) / {s} : 0" if p - k + 1 < 0 else f"({t} + {s - 1}) / {s}"
    body = f"""
        const int x_ = idx_ % {w}, y_ = idx_ / {w} % {h}, nc_ = idx_ / {h * w};
        {plane}const float* __restrict__ gplane_ = dy_ + nc_ * {oh * ow};
        // the windows containing (y, x): oy * stride - pad <= y < oy * stride - pad + kernel, likewise ox
        const int ylo_ = {first("y_", ph, kh, sh)}, yhi_ = min(({_plus("y_", ph)}) / {sh}, {oh - 1});
        const int xlo_ = {first("x_", pw, kw, sw)}, xhi_ = min(({_plus("x_", pw)}) / {sw}, {ow - 1});
        float v_ = 0.0f;
        for (int oy_ = ylo_; oy_ <= yhi_; ++oy_) {{
            for (int ox_ = xlo_; ox_ <= xhi_; ++ox_) {{
{inner}
            }}
        }}
        {scale}
    """
    what = (f"pool2d_bwd {mode} {kh}x{kw} stride {sh}x{sw} pad {ph}x{pw}: "
            f"x[{n},{c},{h},{w}], dy[{n},{c},{oh},{ow}] -> dx")
    sig = _signature(params, [(x, "const float"), (dy, "const float"), (out, "float")])
    binds = [f"const float* __restrict__ xin_ = ({x});", f"const float* __restrict__ dy_ = ({dy});"]
    return _per_element(name, n * c * h * w, sig, binds, body, _epilogue(epilogue, out), what)


# --- gather / scatter ----------------------------------------------------------------------------------

def take(name: str, rows: int, width: int, count: int, *, table: str, idx: str, out: str | None = None,
         epilogue: Epilogue | None = None, params: Sequence[str] | None = None) -> CudaKernel:
    """out[i, j] = table[clamp(idx[i], 0, rows-1), j]: table [rows, width] (trailing axes
    flattened), idx `count` int32 indices (any shape, flattened)."""
    _check_sizes("take", rows * width)
    body = f"""
        const int i_ = idx_ / {width}, j_ = idx_ % {width};
        const int r_ = min(max(ids_[i_], 0), {rows - 1});
        float v_ = table_[r_ * {width} + j_];
    """
    sig = _signature(params, [(table, "const float"), (idx, "const int"), (out, "float")])
    binds = [f"const float* __restrict__ table_ = ({table});", f"const int* __restrict__ ids_ = ({idx});"]
    what = f"take: table[{rows},{width}] at idx[{count}] -> [{count},{width}]"
    return _per_element(name, count * width, sig, binds, body, _epilogue(epilogue, out), what)


def scatter_add_workspace(rows: int, count: int) -> tuple[int, int]:
    """Sizes, in int32 elements, of the index lists scatter_add_index builds: (pos, perm)."""
    return rows + 1, count


def scatter_add_index(name: str, rows: int, count: int, *, idx: str, pos: str, perm: str,
                      params: Sequence[str] | None = None, threads: int = 1024) -> CudaKernel:
    """First half of scatter_add: sort the indices by row, stably, without sorting:
    afterwards the i with clamp(idx[i]) == r are perm[pos[r] .. pos[r+1]), ascending.
    One block: count rows (integer atomics: exact in any order), scan the counts, then
    place the indices in chunks of `threads`, each ranked among the chunk's equal keys.
    Reusable by every scatter_add over the same indices."""
    if threads & (threads - 1) or not 32 <= threads <= 1024:
        raise ValueError("threads must be a power of two in 32 .. 1024")
    _check_sizes("scatter_add_index", rows + 1, count)
    clamp = f"min(max(idx_[i_], 0), {rows - 1})"
    sig = _signature(params, [(idx, "const int"), (pos, "int"), (perm, "int")])
    source = f"""\
// dlc scatter_add_index: idx[{count}] (rows clamped to 0..{rows - 1}) -> pos[{rows + 1}], perm[{count}]
// the indices i of row r, ascending, are perm[pos[r] .. pos[r+1]); one block of {threads} threads
extern "C" __global__ void __launch_bounds__({threads}) {name}({sig})
{{
    const int* __restrict__ idx_ = ({idx});
    int* __restrict__ pos_ = ({pos});
    int* __restrict__ perm_ = ({perm});
    __shared__ int keys_[{threads}];
    __shared__ int sums_[{threads}];
    const int t_ = threadIdx.x;

    // 1. pos[r + 1] = the number of indices of row r
    for (int r_ = t_; r_ <= {rows}; r_ += {threads}) pos_[r_] = 0;
    __syncthreads();
    for (int i_ = t_; i_ < {count}; i_ += {threads}) atomicAdd(&pos_[{clamp} + 1], 1);
    __syncthreads();

    // 2. exclusive scan, chunk by chunk: pos[r + 1] = where row r starts
    int carry_ = 0;
    for (int base_ = 0; base_ < {rows}; base_ += {threads}) {{
        const int r_ = base_ + t_;
        const int n_ = r_ < {rows} ? pos_[r_ + 1] : 0;
        sums_[t_] = n_;
        __syncthreads();
        for (int d_ = 1; d_ < {threads}; d_ *= 2) {{  // Hillis-Steele inclusive scan
            const int add_ = t_ >= d_ ? sums_[t_ - d_] : 0;
            __syncthreads();
            sums_[t_] += add_;
            __syncthreads();
        }}
        if (r_ < {rows}) pos_[r_ + 1] = carry_ + sums_[t_] - n_;
        carry_ += sums_[{threads - 1}];
        __syncthreads();
    }}

    // 3. place the indices in order: pos[r + 1] is row r's cursor and ends as its end
    for (int base_ = 0; base_ < {count}; base_ += {threads}) {{
        const int i_ = base_ + t_;
        const int key_ = i_ < {count} ? {clamp} : -1;
        keys_[t_] = key_;
        __syncthreads();
        int rank_ = 0;  // equal keys earlier in the chunk
        bool last_ = true;  // no equal key later in the chunk
        const int chunk_ = min({threads}, {count} - base_);
        for (int u_ = 0; u_ < chunk_; ++u_) {{
            const bool same_ = keys_[u_] == key_;
            rank_ += same_ && u_ < t_;
            last_ = last_ && !(same_ && u_ > t_);
        }}
        const int at_ = key_ >= 0 ? pos_[key_ + 1] + rank_ : 0;
        if (key_ >= 0) perm_[at_] = i_;
        __syncthreads();  // all cursors read before the last of each key moves its cursor
        if (key_ >= 0 && last_) pos_[key_ + 1] = at_ + 1;
        __syncthreads();
    }}
}}
"""
    return CudaKernel(name, source, (1, 1, 1), (threads, 1, 1), 8 * threads)


def scatter_add(name: str, rows: int, width: int, count: int, *, g: str, pos: str, perm: str,
                out: str | None = None, epilogue: Epilogue | None = None,
                params: Sequence[str] | None = None) -> CudaKernel:
    """Second half of scatter_add: out[r, j] = sum of g[i, j] over the i of row r, in
    ascending i (pos/perm from scatter_add_index): one thread per output element, no
    atomics, deterministic; rows nobody indexes get 0."""
    _check_sizes("scatter_add", rows * width, count * width)
    body = f"""
        const int r_ = idx_ / {width}, j_ = idx_ % {width};
        const int end_ = pos_[r_ + 1];
        float v_ = 0.0f;
        for (int p_ = pos_[r_]; p_ < end_; ++p_) v_ += g_[perm_[p_] * {width} + j_];
    """
    sig = _signature(params, [(g, "const float"), (pos, "const int"), (perm, "const int"), (out, "float")])
    binds = [f"const float* __restrict__ g_ = ({g});", f"const int* __restrict__ pos_ = ({pos});",
             f"const int* __restrict__ perm_ = ({perm});"]
    what = f"scatter_add: g[{count},{width}] added at rows of [{rows},{width}] (lists from scatter_add_index)"
    return _per_element(name, rows * width, sig, binds, body, _epilogue(epilogue, out), what)


# --- colsum ----------------------------------------------------------------------------------------------

def colsum(name: str, rows: int, cols: int, *, x: str, out: str | None = None,
           epilogue: Epilogue | None = None, params: Sequence[str] | None = None,
           strands: int = 16) -> CudaKernel:
    """out[j] = sum_r x[r, j] for x [rows, cols]: blocks of 32 columns x `strands` rows;
    strand t sums rows t, t + strands, ... in order, then a fixed tree adds the strands."""
    if strands & (strands - 1) or not 1 <= strands <= 32:
        raise ValueError("strands must be a power of two in 1 .. 32")
    _check_sizes("colsum", rows * cols)
    sig = _signature(params, [(x, "const float"), (out, "float")])
    source = f"""\
// dlc colsum: x[{rows},{cols}] -> [{cols}], {strands} row strands per column, then a tree
extern "C" __global__ void __launch_bounds__({32 * strands}) {name}({sig})
{{
    const float* __restrict__ x_ = ({x});
    __shared__ float part_[{strands}][33];
    const int tx_ = threadIdx.x, ty_ = threadIdx.y, col_ = blockIdx.x * 32 + tx_;
    float v_ = 0.0f;
    if (col_ < {cols})
        for (int r_ = ty_; r_ < {rows}; r_ += {strands}) v_ += x_[r_ * {cols} + col_];
    part_[ty_][tx_] = v_;
    __syncthreads();
    for (int half_ = {strands // 2}; half_ > 0; half_ /= 2) {{
        if (ty_ < half_) part_[ty_][tx_] += part_[ty_ + half_][tx_];
        __syncthreads();
    }}
    if (ty_ == 0 && col_ < {cols}) {{
        const int idx_ = col_;
        v_ = part_[0][tx_];
{_emit(_epilogue(epilogue, out), "idx_", "v_", 8)}
    }}
}}
"""
    return CudaKernel(name, source, (_blocks(cols, 32), 1, 1), (32, strands, 1), strands * 33 * 4)
