"""Single-precision GEMM as LLVM IR: packed panels, an FMA register-tile microkernel, threads.

`emit_gemm` writes one externally visible function into an existing llvmlite module:

    void name(ptr A, ptr B, ptr C, ptr bias, ptr workspace, i32 tid, i32 nthreads)

It computes C = op(A) @ op(B) (or C += ... with `accumulate`), then adds `bias[n]` per
column and applies ReLU when the spec asks for them. Thread `tid` of `nthreads` computes a
static share of C (whole register tiles along N, or along M when N is too narrow to split),
so calling it from `nthreads` threads at once, one call per tid, computes all of C.

Calling convention
------------------
* All matrices are float32, row-major, with leading dimensions from the spec.
* `bias` may be null unless `spec.bias`.
* `workspace` is the scratch area of *this* thread: `GemmInfo.workspace_bytes` bytes,
  64-byte aligned, used by no other thread during the call. The caller allocates one per
  thread and passes thread tid's own pointer (e.g. `base + tid * workspace_bytes`;
  `workspace_bytes` is a multiple of 64). It may be null when `workspace_bytes == 0`.
* The function does not allocate, lock, or call anything outside the module; threads
  write disjoint parts of C (`GemmInfo.thread_share` gives each one's rows and columns),
  so different tids of one call may run concurrently. C must not overlap A, B or bias.

Algorithm (Goto / BLIS)
-----------------------
    for jc in this thread's columns, step NC:
      for pc in 0..k, step KC:                    K blocks (even sizes)
        pack B[pc:pc+kc, jc:jc+nc] into NR-wide panels     (large B, or tb)
        for ic in this thread's rows, step MC:
          pack A[ic:ic+mc, pc:pc+kc] into MR-tall panels   (large A)
          for jr in 0..nc, step NR:  for ir in 0..mc, step MR:
            microkernel: MR x NR tile of C += A panel @ B panel over kc
Unpacked operands are read in place (strides are compile-time constants); `plan_gemm`
packs only where the copy pays for itself (large operands with long strides), and gives
short C (m <= MR, e.g. batch 1..8) one tile row up to 16 vectors wide so that B streams
through once.
The microkernel keeps MR x NR/W accumulators (`<W x float>`) in registers, loads NR/W
vectors of B and broadcasts MR elements of A per k, and fuses the epilogue (add old C,
bias, ReLU) into the stores of the last K block. Tiles that cross the M or N edge use a
second kernel with masked loads and stores (built only where C has such tiles; with
AVX-512, whose masks cost nothing, that one kernel does every tile); packed panels are zero padded, unpacked
operands are read with masks (N) or clamped rows (M), so nothing reads out of bounds.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from llvmlite import ir

from .irutil import const_vector, for_range, set_target, splat
from .target import Target

F32 = ir.FloatType()
I1 = ir.IntType(1)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
PTR = ir.PointerType()
VOID = ir.VoidType()

# Kernel `mode` bits, decided per K block by the driver.
_ADD_C = 1      # add the tile already in C (later K blocks, or spec.accumulate)
_EPILOGUE = 2   # last K block: apply bias and ReLU

# Accumulator registers the microkernel may use (the rest hold B vectors and a broadcast).
_MAX_ACCUMULATORS = {4: 12, 8: 12, 16: 28}


# --------------------------------------------------------------------------- spec, plan, info


@dataclass(frozen=True, eq=False)
class TileEpilogue:
    """Elementwise work the microkernel applies to its register tile in the last K block,
    before storing it (e.g. the optimizer update of the weight whose gradient C is).

    args: names of extra pointer arguments the GEMM function takes after `nthreads` (in
    this order) and hands to `emit`; store_c: whether C itself is still stored;
    emit(b, vec, pointers: {name: ptr}, row: i64, col: i64, x: <W x float>, mask or None)
    emits the work for row `row`, columns col .. col+W-1 (lanes outside `mask` are past
    the N edge and must not be touched) and returns the value to store in C there."""
    key: object
    args: tuple
    store_c: bool
    emit: Callable
    prefetch: Callable | None = None  # (b, vec, pointers, row, col): touch what emit will


@dataclass(frozen=True)
class GemmSpec:
    """C[m,n] (+)= op(A) @ op(B) (+ bias[n]) (relu), float32.

    A is [m,k] row-major, or [k,m] when `ta`; B is [k,n], or [n,k] when `tb`. The leading
    dimensions (row strides, in elements) default to the contiguous ones.
    """
    m: int
    n: int
    k: int
    ta: bool = False
    tb: bool = False
    accumulate: bool = False
    bias: bool = False
    relu: bool = False
    lda: int | None = None
    ldb: int | None = None
    ldc: int | None = None

    def __post_init__(self):
        if min(self.m, self.n) < 1 or self.k < 0:
            raise ValueError(f"bad GEMM shape m={self.m} n={self.n} k={self.k}")
        for name, need in (("lda", self.m if self.ta else self.k),
                           ("ldb", self.k if self.tb else self.n), ("ldc", self.n)):
            ld = getattr(self, name)
            if ld is not None and ld < need:
                raise ValueError(f"{name}={ld} is smaller than the row length {need}")

    @property
    def a_ld(self) -> int:
        return self.lda if self.lda is not None else (self.m if self.ta else self.k)

    @property
    def b_ld(self) -> int:
        return self.ldb if self.ldb is not None else (self.k if self.tb else self.n)

    @property
    def c_ld(self) -> int:
        return self.ldc if self.ldc is not None else self.n

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k


@dataclass(frozen=True)
class GemmPlan:
    """Blocking and code-shape choices; `plan_gemm` picks them, a tuner may override them."""
    mr: int                 # register tile rows (A broadcasts)
    nv: int                 # register tile columns, in vectors: NR = nv * W
    kc: int                 # K block (A and B panels hold kc rows of k)
    mc: int                 # M block (packed A block: mc x kc, sized for L2)
    nc: int                 # N block (packed B block: kc x nc)
    pack_a: bool
    pack_b: bool
    split: str              # "n" or "m": the dimension shared out between threads
    unroll: int = 4         # k steps per microkernel loop iteration
    jr_outer: bool = True   # loop order inside a block: for jr: for ir (B panel stays in L1)
    prefetch_c: bool = True  # prefetch the C tile while the kernel runs its K loop
    prefetch_b: int = 0     # prefetch the B panel this many k steps ahead (0: off; each of
                            # the tile's vectors when B is unpacked)
    prefetch_a: int = 0     # prefetch the A panel this many k steps ahead (0: off)


@dataclass(frozen=True)
class GemmInfo:
    """What the caller needs to run an emitted GEMM."""
    name: str
    spec: GemmSpec
    vector_width: int
    plan: GemmPlan
    workspace_bytes: int    # per thread; a multiple of 64 (0 when nothing is packed)
    parallel_units: int     # tiles shared out between threads; more threads than this idle

    @property
    def mr(self) -> int:
        return self.plan.mr

    @property
    def nr(self) -> int:
        return self.plan.nv * self.vector_width

    @property
    def split(self) -> str:
        """The dimension threads share out: "n" (column tiles of C) or "m" (row tiles)."""
        return self.plan.split

    @property
    def split_tile(self) -> int:
        """Columns (split "n") or rows (split "m") per parallel unit."""
        return self.nr if self.plan.split == "n" else self.mr

    def thread_share(self, tid: int, nthreads: int) -> tuple[range, range]:
        """(rows, columns) of C that thread tid computes: units [tid*U//T, (tid+1)*U//T)
        of the split dimension (U = parallel_units, T = nthreads), the whole of the other.
        The emitted code uses exactly this formula, so a caller can run its own epilogue
        over the same share without a barrier."""
        u0 = tid * self.parallel_units // nthreads
        u1 = (tid + 1) * self.parallel_units // nthreads
        m, n, tile = self.spec.m, self.spec.n, self.split_tile
        if self.plan.split == "n":
            return range(m), range(u0 * tile, min(u1 * tile, n))
        return range(u0 * tile, min(u1 * tile, m)), range(n)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _cdiv(a, b) * b


# Register tile (mr rows, nv vectors) per vector width, and the widest tile for short C.
_TILE = {4: (6, 2), 8: (6, 2), 16: (8, 2)}
_MAX_NV = 16                    # widest tile (vectors) for short C
_A_BLOCK_BYTES = 256 * 1024    # packed A block (mc x kc floats), half of a small L2
_PACK_A_BYTES = 4 << 20         # pack A when it is larger (beyond L2 + a share of L3)
_L2_BYTES = 1 << 20             # a B share this large leaves a core's L2 (1-2 MiB)
_PREFETCH_B_ROWS = 16           # software prefetch distance for short C (see plan_gemm)


def _balanced_nv(n: int, w: int, most: int, nthreads: int) -> int:
    """Tile width (vectors, at most `most`) that minimizes the busiest thread's work: its
    vector columns, plus a quarter for each A broadcast shared by fewer FMAs in a narrow
    tile (a 1-vector tile is load-bound on AVX2 parts)."""
    def cost(nv):
        return _cdiv(_cdiv(n, nv * w), nthreads) * nv * (1 + 0.25 / nv)
    return min(range(1, most + 1), key=lambda nv: (cost(nv), -nv))


def plan_gemm(spec: GemmSpec, vector_width: int, nthreads: int = 2) -> GemmPlan:
    """Default blocking for `spec`, for `nthreads` threads sharing the work.

    Measured on Zen 4 (AVX-512, 32 KiB L1d, 1 MiB L2 per core): the B micro-panel
    (kc x NR) is re-read from L1/L2 for every A micro-panel of an mc x kc A block held in
    L2, and the kc x nc B block sits in L2/L3.
    """
    w = vector_width
    m, n, k = spec.m, spec.n, spec.k
    mr, nv = _TILE[w]
    if m <= mr:
        # Short C: one tile row covering all of m, as wide as the registers allow, so B
        # streams through once in long contiguous runs (m=1: 16 vectors, 1 KiB per k).
        mr, nv = m, min(_MAX_ACCUMULATORS[w] // m, _MAX_NV)
    widest = nv
    nv = _balanced_nv(n, w, widest, nthreads)
    m_tiles, n_tiles = _cdiv(m, mr), _cdiv(n, nv * w)
    # Share out N tiles (each thread packs only its own B) unless N has too few of them.
    split = "n" if n_tiles >= 2 * nthreads or n_tiles >= m_tiles else "m"
    if split == "m":                        # every thread computes all the columns
        nv = _balanced_nv(n, w, widest, 1)
        n_tiles = _cdiv(n, nv * w)
    nr = nv * w
    my_n_tiles = _cdiv(n_tiles, nthreads) if split == "n" else n_tiles
    # Packing costs one pass over the operand, so it needs reuse. Packed B (measured on
    # each thread's share): +15-25% for 1024^3 / 2048^3 and for every 8-wide tile (one
    # cache line per k row of an unpacked B panel streams poorly), +-3% for the 16-wide
    # MLP shapes. Unpacked is better for a few tile rows over a B share that stays in L2
    # (a recurrent layer's weights, read every time step: 32 x 512 x 128 5% faster alone,
    # the LSTM's T=128 step 0-3% in three A/Bs; 40 x 512 x 784 4%); packed from 6 tile rows
    # (56 x 512 x 256: +3%) or a 2 MiB share (32 x 1024 x 1024: +10%). Packed A: +-3% up
    # to 2048^3 (the kernel's MR row streams do well), so only for A beyond L2 and a
    # share of L3. A transposed B is always packed: the kernel reads B rows as vectors.
    b_share = 4 * k * (_cdiv(n, nthreads) if split == "n" else n)
    pack_b = spec.tb or m_tiles >= 6 or (m_tiles >= 4 and b_share > _L2_BYTES)
    pack_a = my_n_tiles > 4 and 4 * m * k > _PACK_A_BYTES
    kc = 384 if w == 16 else 256
    nkb = max(1, _cdiv(k, kc))
    kc = _round_up(_cdiv(max(k, 1), nkb), 4)    # equal K blocks
    mc = _round_up(min(m, max(mr, _A_BLOCK_BYTES // (4 * kc) // mr * mr)), mr)
    nc = _round_up(min(n, 4096), nr)
    # Short C of a few rows over a narrow tile (MLP batch 8: 8 x 32 columns) walks B's rows
    # a few cache lines at a time, a row apart: the hardware prefetchers miss that stride,
    # so the kernel prefetches B this many rows ahead (MLP 784-512-256-10 training step at
    # batch 8: 9-10% faster; a single row, m = 1, streams wide rows and was slower with it)
    prefetch_b = _PREFETCH_B_ROWS if 2 <= m <= _TILE[w][0] and not pack_b and nv <= 4 else 0
    return GemmPlan(mr=mr, nv=nv, kc=kc, mc=mc, nc=nc, pack_a=pack_a, pack_b=pack_b,
                    split=split, prefetch_b=prefetch_b)


# --------------------------------------------------------------------------- IR helpers


def _i64(v) -> ir.Value:
    return ir.Constant(I64, v) if isinstance(v, int) else v


def _for_range(b: ir.IRBuilder, start, stop, step=1, name="i"):
    """for (i = start; i < stop; i += step): yields i (i64) with the builder in the body."""
    return for_range(b, start, stop, name, step)


def _smin(b: ir.IRBuilder, x, y) -> ir.Value:
    x, y = _i64(x), _i64(y)
    return b.select(b.icmp_signed("<", x, y), x, y)


class _Vec:
    """Vector helpers bound to one builder and width (intrinsics declared on first use)."""

    def __init__(self, b: ir.IRBuilder, w: int, fused: bool = True):
        self.b, self.w, self.fused = b, w, fused
        self.ty = ir.VectorType(F32, w)
        self.mty = ir.VectorType(I1, w)
        self.zero = const_vector(F32, [0.0] * w)
        self.lanes = const_vector(I64, range(w))
        self.module = b.module

    def _intrinsic(self, name: str, ret, args) -> ir.Function:
        fn = self.module.globals.get(name)
        if fn is None:
            fn = ir.Function(self.module, ir.FunctionType(ret, args), name=name)
        return fn

    def at(self, ptr, offset) -> ir.Value:
        """ptr + offset floats."""
        if isinstance(offset, int) and offset == 0:
            return ptr
        return self.b.gep(ptr, [_i64(offset)], source_etype=F32)

    def load(self, ptr, mask=None) -> ir.Value:
        if mask is None:
            return self.b.load(ptr, typ=self.ty, align=4)
        fn = self._intrinsic(f"llvm.masked.load.v{self.w}f32.p0", self.ty,
                             [PTR, self.mty, self.ty])
        return self.b.call(fn, [ptr, mask, self.zero])

    def store(self, value, ptr, mask=None) -> None:
        if mask is None:
            self.b.store(value, ptr, align=4)
            return
        fn = self._intrinsic(f"llvm.masked.store.v{self.w}f32.p0", VOID,
                             [self.ty, PTR, self.mty])
        self.b.call(fn, [value, ptr, mask])

    def mask(self, first_lane, limit) -> ir.Value:
        """Lanes first_lane + l < limit."""
        b = self.b
        base, lim = splat(b, _i64(first_lane), self.w), splat(b, _i64(limit), self.w)
        return b.icmp_signed("<", b.add(base, self.lanes), lim)

    def splat(self, scalar) -> ir.Value:
        return splat(self.b, scalar, self.w)

    def transpose(self, rows: list) -> list:
        """W vectors of W (a W x W block, row-major) -> its W columns, by log2(W) rounds
        of interleaving vector i with vector i + W/2."""
        w, b = self.w, self.b
        lo = ir.Constant(ir.VectorType(I32, w), [x for i in range(w // 2) for x in (i, w + i)])
        hi = ir.Constant(ir.VectorType(I32, w),
                         [x for i in range(w // 2, w) for x in (i, w + i)])
        for _ in range(w.bit_length() - 1):
            pairs = [(rows[i], rows[i + w // 2]) for i in range(w // 2)]
            rows = [b.shuffle_vector(x, y, mask) for x, y in pairs for mask in (lo, hi)]
        return rows

    def fma(self, x, y, z) -> ir.Value:
        # Without FMA hardware (SSE, AVX1) llvm.fma would become a libm call per lane;
        # fmuladd is a multiply and an add there.
        op = "llvm.fma" if self.fused else "llvm.fmuladd"
        fn = self._intrinsic(f"{op}.v{self.w}f32", self.ty, [self.ty] * 3)
        return self.b.call(fn, [x, y, z])

    def relu(self, x) -> ir.Value:
        # olt is false for NaN, so NaN propagates like numpy.maximum(x, 0).
        return self.b.select(self.b.fcmp_ordered("<", x, self.zero), self.zero, x)

    def prefetch(self, ptr, write: bool, locality: int = 3) -> None:
        fn = self._intrinsic("llvm.prefetch.p0", VOID, [PTR, I32, I32, I32])
        self.b.call(fn, [ptr, ir.Constant(I32, int(write)), ir.Constant(I32, locality),
                         ir.Constant(I32, 1)])


def _new_function(module, name, args, target, w, linkage=None) -> ir.Function:
    fn = ir.Function(module, ir.FunctionType(VOID, [t for t, _ in args]), name=name)
    for arg, (_, arg_name) in zip(fn.args, args):
        arg.name = arg_name
    if linkage:
        fn.linkage = linkage
    set_target(fn, target, w)
    return fn


# --------------------------------------------------------------------------- microkernel


@dataclass(frozen=True)
class _Layout:
    """Where the microkernel finds its operands (strides in elements, compile time; a_rs
    and ldc may be None: then they are arguments, so one kernel serves operands of
    several shapes)."""
    a_rs: int | None   # A element (i, p) at a + i*a_rs + p*a_cs
    a_cs: int
    b_rs: int          # B element (p, j) at b + p*b_rs + j
    ldc: int | None
    a_packed: bool
    b_packed: bool


def free_masks(target: Target) -> bool:
    """Whether masked vector loads and stores cost what plain ones do (AVX-512's mask
    registers; AVX2's vmaskmov stores are slower): then one kernel with masks serves the
    full tiles and those crossing an edge (measured on LeNet-5, the CIFAR CNN and the
    residual network: the same step times, 5-11% less LLVM time)."""
    return target.has("avx512f")


def _emit_kernel(module, name, plan: GemmPlan, lay: _Layout, spec: GemmSpec, w: int,
                 target: Target, edge: bool, tile: TileEpilogue | None = None) -> ir.Function:
    """void kernel(a, b, c, bias, i64 kc, i32 mode, i64 m_valid, i64 n_valid
                   [, i64 row, i64 col, ptr <tile.args>...] [, i64 a_rs] [, i64 ldc]).

    The full kernel ignores m_valid/n_valid; the edge kernel stores only rows < m_valid
    and columns < n_valid, and reads unpacked operands only inside those bounds. With a
    tile epilogue, (row, col) is the tile's place in C and the extra pointers are the
    epilogue's buffers. a_rs and ldc are arguments where the layout leaves them None.
    """
    args = [(PTR, "a"), (PTR, "b"), (PTR, "c"), (PTR, "bias"), (I64, "kc"), (I32, "mode"),
            (I64, "m_valid"), (I64, "n_valid")]
    if tile is not None:
        args += [(I64, "row"), (I64, "col")] + [(PTR, f"e.{n}") for n in tile.args]
    strides = [name for name, value in (("a_rs", lay.a_rs), ("ldc", lay.ldc)) if value is None]
    args += [(I64, name) for name in strides]
    fn = _new_function(module, name, args, target, w, linkage="internal")
    for i in list(range(4)) + list(range(10, len(args) - len(strides))):
        fn.args[i].add_attribute("noalias")
    a, bp, c, bias, kc, mode, m_valid, n_valid = fn.args[:8]
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    v = _Vec(b, w, fused=target.has("fma"))
    mr, nv = plan.mr, plan.nv
    # in the entry block, before any branch: only there do LLVM's SROA and mem2reg put the
    # accumulators in registers without other passes first (the quick tier runs no others)
    acc = [[b.alloca(v.ty, name=f"acc{i}_{j}") for j in range(nv)] for i in range(mr)]
    # the tile epilogue runs as a loop over the tile's rows (its code once, not MR times:
    # a long epilogue such as an Adam update was most of the kernel's code and compile
    # time); the accumulators are copied into this array for it, once per tile
    tile_rows = b.alloca(ir.ArrayType(v.ty, mr * nv), name="tile") if tile is not None else None
    given = dict(zip(strides, fn.args[len(args) - len(strides):]))
    a_rs, ldc = given.get("a_rs", lay.a_rs), given.get("ldc", lay.ldc)

    def times(i: int, stride, plus: int = 0):
        """i * stride + plus: an int where the stride is a constant."""
        return i * stride + plus if isinstance(stride, int) else b.add(b.mul(_i64(i), stride), _i64(plus))

    # Row offsets into A; the edge kernel clamps rows past m_valid onto the last valid one
    # (their results are never stored) so unpacked A is never read out of bounds.
    row_off = []
    for i in range(mr):
        if edge and not lay.a_packed and i > 0:
            row = _smin(b, i, b.sub(m_valid, _i64(1)))
            row_off.append(b.mul(row, _i64(a_rs)))
        else:
            row_off.append(_i64(times(i, a_rs)))
    col_mask = [v.mask(j * w, n_valid) if edge else None for j in range(nv)]
    b_mask = col_mask if not lay.b_packed else [None] * nv

    if plan.prefetch_c:
        for i in range(mr):
            for j in range(nv):
                v.prefetch(v.at(c, times(i, ldc, j * w)), write=True)
    epi = b.icmp_unsigned("!=", b.and_(mode, ir.Constant(I32, _EPILOGUE)), ir.Constant(I32, 0))
    if tile is not None and tile.prefetch is not None:
        # in the K block that ends with the epilogue, its buffers (an optimizer's weights
        # and moments) arrive while the K loop runs instead of stalling the epilogue after
        # it: the training step of the MLP at batch 8 -15%, of the wide MLP -5%
        ptrs = dict(zip(tile.args, fn.args[10:]))
        with b.if_then(epi):
            for i in range(mr):
                for j in range(nv):
                    tile.prefetch(b, v, ptrs, b.add(fn.args[8], _i64(i)), b.add(fn.args[9], _i64(j * w)))

    for row in acc:
        for slot in row:
            b.store(v.zero, slot)

    def k_step(p):
        bvec = [v.load(v.at(bp, b.add(b.mul(p, _i64(lay.b_rs)), _i64(j * w))), b_mask[j])
                for j in range(nv)]
        if plan.prefetch_b:
            for j in range(nv if not lay.b_packed else 1):
                v.prefetch(v.at(bp, b.add(b.mul(p, _i64(lay.b_rs)),
                                          _i64(plan.prefetch_b * lay.b_rs + j * w))), write=False)
        if plan.prefetch_a and lay.a_packed:
            v.prefetch(v.at(a, b.add(b.mul(p, _i64(lay.a_cs)),
                                     _i64(plan.prefetch_a * lay.a_cs))), write=False)
        pa = b.mul(p, _i64(lay.a_cs))
        for i in range(mr):
            s = b.load(v.at(a, b.add(pa, row_off[i])), typ=F32, align=4)
            s = v.splat(s)
            for j in range(nv):
                b.store(v.fma(s, bvec[j], b.load(acc[i][j], typ=v.ty)), acc[i][j])

    u = plan.unroll
    main = b.mul(b.udiv(kc, _i64(u)), _i64(u))
    with _for_range(b, 0, main, u, name="k") as p:
        for t in range(u):
            k_step(b.add(p, _i64(t)) if t else p)
    with _for_range(b, main, kc, 1, name="ktail") as p:
        k_step(p)

    # Epilogue: select rather than branch on mode, so the stores stay straight-line code.
    add_c = b.icmp_unsigned("!=", b.and_(mode, ir.Constant(I32, _ADD_C)), ir.Constant(I32, 0))
    bias_vec = [v.load(v.at(bias, j * w), col_mask[j]) if spec.bias else None
                for j in range(nv)]

    def store_tile(last):
        """The tile into C. last: None (the bias and ReLU where mode says it is the last K
        block, by selects), or False (not the last block of a kernel with a tile epilogue)."""
        for i in range(mr):
            if edge and i > 0:
                then = b.append_basic_block(f"row{i}")
                done = b.append_basic_block(f"row{i}.done")
                b.cbranch(b.icmp_signed("<", _i64(i), m_valid), then, done)
                b.position_at_end(then)
            for j in range(nv):
                ptr = v.at(c, times(i, ldc, j * w))
                x = b.load(acc[i][j], typ=v.ty)
                x = b.select(add_c, b.fadd(x, v.load(ptr, col_mask[j])), x)
                if spec.bias or spec.relu:
                    y = b.fadd(x, bias_vec[j]) if spec.bias else x
                    y = v.relu(y) if spec.relu else y
                    x = x if last is False else b.select(epi, y, x)
                v.store(x, ptr, col_mask[j])
            if edge and i > 0:
                b.branch(done)
                b.position_at_end(done)

    def epilogue_rows():
        """The last K block with a tile epilogue: for each stored row, its vectors."""
        row0, col0 = fn.args[8], fn.args[9]
        ptrs = dict(zip(tile.args, fn.args[10:]))
        slot = lambda i, j: b.gep(tile_rows, [_i64(0), b.add(b.mul(i, _i64(nv)), _i64(j))])  # noqa: E731
        for i in range(mr):
            for j in range(nv):
                b.store(b.load(acc[i][j], typ=v.ty), slot(_i64(i), j))
        with _for_range(b, 0, m_valid if edge else mr, name="row") as i:
            for j in range(nv):
                ptr = v.at(c, b.add(b.mul(i, _i64(ldc)), _i64(j * w)))
                x = b.load(slot(i, j), typ=v.ty)
                x = b.select(add_c, b.fadd(x, v.load(ptr, col_mask[j])), x)
                x = b.fadd(x, bias_vec[j]) if spec.bias else x
                x = v.relu(x) if spec.relu else x
                x = tile.emit(b, v, ptrs, b.add(row0, i), b.add(col0, _i64(j * w)), x, col_mask[j])
                if tile.store_c:
                    v.store(x, ptr, col_mask[j])

    if tile is None:
        store_tile(None)
    else:
        with b.if_else(epi) as (then, otherwise):
            with then:
                epilogue_rows()
            with otherwise:
                store_tile(False)
    b.ret_void()
    return fn


# --------------------------------------------------------------------------- packing


def _emit_pack_a(module, name, mr: int, ta: bool, w: int, target: Target) -> ir.Function:
    """void pack_a(A, Ap, i64 lda, i64 ic, i64 mc, i64 pc, i64 kc): MR-row panels, k-major,
    zero padded. The leading dimension is an argument, so GEMMs of every shape share one.

    Panel r holds rows ic+r .. ic+r+MR-1 as Ap[r*kc + p*MR + i]."""
    fn = _new_function(module, name, [(PTR, "A"), (PTR, "Ap"), (I64, "lda"), (I64, "ic"),
                                      (I64, "mc"), (I64, "pc"), (I64, "kc")], target, w, "internal")
    fn.attributes.add("optsize")
    src, dst, lda, ic, mc, pc, kc = fn.args
    src.add_attribute("noalias")
    dst.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    v = _Vec(b, w)
    a_rs, a_cs = (_i64(1), lda) if ta else (lda, _i64(1))
    # A row-major (not ta) with a small tile: read T values of k from each row as one
    # vector and transpose T x T blocks in registers (T: the power of two >= MR).
    t = 1 << (mr - 1).bit_length()
    by_blocks = not ta and t <= w
    vt = _Vec(b, t)
    with _for_range(b, 0, mc, mr, name="r") as r:
        panel = v.at(dst, b.mul(r, kc))
        base = v.at(src, b.add(b.mul(b.add(ic, r), a_rs), b.mul(pc, a_cs)))
        rows = b.sub(mc, r)
        full = b.icmp_signed(">=", rows, _i64(mr))
        # Rows past the edge read the last valid row (in bounds) and store zeros.
        last = b.sub(rows, _i64(1))
        offs = [b.mul(_smin(b, i, last), a_rs) for i in range(mr)]
        keep = [b.icmp_signed("<", _i64(i), rows) for i in range(mr)]
        kt = _i64(0)
        if by_blocks:
            kt = b.mul(b.udiv(kc, _i64(t)), _i64(t))
            first_lanes = ir.Constant(ir.VectorType(I32, mr), list(range(mr)))
            with _for_range(b, 0, kt, t, name="pb") as p:
                at_p = v.at(base, p)
                block = [b.select(keep[i], vt.load(v.at(at_p, offs[i])), vt.zero)
                         for i in range(mr)]
                block += [vt.zero] * (t - mr)
                out = v.at(panel, b.mul(p, _i64(mr)))
                for j, col in enumerate(vt.transpose(block)):
                    if mr < t:
                        col = b.shuffle_vector(col, col, first_lanes)
                    b.store(col, v.at(out, j * mr), align=4)
        with b.if_else(full) as (then, otherwise):
            with then:
                with _for_range(b, kt, kc, name="p") as p:
                    col = v.at(base, b.mul(p, a_cs))
                    out = v.at(panel, b.mul(p, _i64(mr)))
                    for i in range(mr):
                        x = b.load(v.at(col, b.mul(_i64(i), a_rs)), typ=F32, align=4)
                        b.store(x, v.at(out, i), align=4)
            with otherwise:
                with _for_range(b, kt, kc, name="pe") as p:
                    col = v.at(base, b.mul(p, a_cs))
                    out = v.at(panel, b.mul(p, _i64(mr)))
                    for i in range(mr):
                        x = b.load(v.at(col, offs[i]), typ=F32, align=4)
                        b.store(b.select(keep[i], x, ir.Constant(F32, 0.0)), v.at(out, i),
                                align=4)
    b.ret_void()
    return fn


def shared_pack_b(helper, module, name, tb: bool, w: int, target: Target, nv: int | None = None):
    """The build's B packer for (tb, nv) through `helper` (see emit_gemm): one function
    whether a GEMM or a convolution asks for it first (nv only matters untransposed)."""
    return helper(("gemm.pack_b", tb, None if tb else nv),
                  lambda: _emit_pack_b(module, name, tb, w, target, nv))


def _emit_pack_b(module, name, tb: bool, w: int, target: Target, nv: int | None = None) -> ir.Function:
    """void pack_b(B, Bp, i64 ldb, i64 pc, i64 kc, i64 jc, i64 nc, i64 nr): NR-column
    panels (NR a multiple of W), zero padded. The leading dimension is an argument, so
    GEMMs and convolutions of every shape share a packer: the transposing one (tb) packs
    W columns at a time for any NR; the plain one copies a row's NR = nv * W columns at
    once (one vector per loop iteration was 1.7% slower on the MLP's step) and is built
    per nv.

    Panel q holds columns jc+q .. jc+q+NR-1 as Bp[q*kc + p*NR + j]."""
    fn = _new_function(module, name, [(PTR, "B"), (PTR, "Bp"), (I64, "ldb"), (I64, "pc"),
                                      (I64, "kc"), (I64, "jc"), (I64, "nc"), (I64, "nr")],
                       target, w, "internal")
    fn.attributes.add("optsize")  # vector code already: LLVM's unrolling only makes it longer
    src, dst, ldb, pc, kc, jc, nc, nr = fn.args
    src.add_attribute("noalias")
    dst.add_attribute("noalias")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    v = _Vec(b, w)
    if not tb:
        # B[p, j] at B[p*ldb + j]: NR contiguous floats per k, copied as vectors.
        nr = nv * w
        with _for_range(b, 0, nc, nr, name="q") as q:
            panel = v.at(dst, b.mul(q, kc))
            cols = b.sub(nc, q)
            base = v.at(src, b.add(b.mul(pc, ldb), b.add(jc, q)))
            with b.if_else(b.icmp_signed(">=", cols, _i64(nr))) as (then, otherwise):
                for masked, branch in ((False, then), (True, otherwise)):
                    with branch:
                        masks = [v.mask(j * w, cols) if masked else None for j in range(nv)]
                        with _for_range(b, 0, kc, name="p") as p:
                            row = v.at(base, b.mul(p, ldb))
                            out = v.at(panel, b.mul(p, _i64(nr)))
                            for j in range(nv):
                                v.store(v.load(v.at(row, j * w), masks[j]), v.at(out, j * w))
        b.ret_void()
        return fn
    panels = b.udiv(b.add(nc, b.sub(nr, _i64(1))), nr)
    per_panel = b.udiv(nr, _i64(w))  # groups of W columns
    last = b.sub(nc, _i64(1))
    with _for_range(b, 0, b.mul(panels, per_panel), name="g") as g:
        q = b.mul(b.udiv(g, per_panel), nr)  # the panel's first column
        col0 = b.add(q, b.mul(b.urem(g, per_panel), _i64(w)))  # the group's
        out0 = v.at(dst, b.add(b.mul(q, kc), b.sub(col0, q)))
        # B[p, j] at B[j*ldb + p]: each column's k run is contiguous, so load W x W
        # blocks (W columns, W values of p) and transpose them in registers. Columns
        # past the edge read the last valid column and are replaced by zeros.
        cols = [b.add(col0, _i64(j)) for j in range(w)]
        col_off = [b.mul(b.add(jc, _smin(b, c, last)), ldb) for c in cols]
        col_ok = [b.icmp_signed("<", c, nc) for c in cols]
        kv = b.mul(b.udiv(kc, _i64(w)), _i64(w))
        with _for_range(b, 0, kv, w, name="p") as p:
            src_p = v.at(src, b.add(pc, p))
            out = v.at(out0, b.mul(p, nr))
            rows = [b.select(col_ok[j], v.load(v.at(src_p, col_off[j])), v.zero) for j in range(w)]
            for t, vec in enumerate(v.transpose(rows)):
                v.store(vec, v.at(out, b.mul(_i64(t), nr)))
        with _for_range(b, kv, kc, name="pt") as p:
            src_p = v.at(src, b.add(pc, p))
            out = v.at(out0, b.mul(p, nr))
            for j in range(w):
                x = b.load(v.at(src_p, col_off[j]), typ=F32, align=4)
                b.store(b.select(col_ok[j], x, ir.Constant(F32, 0.0)), v.at(out, j), align=4)
    b.ret_void()
    return fn


# --------------------------------------------------------------------------- driver


def _workspace_layout(spec: GemmSpec, plan: GemmPlan, w: int) -> tuple[int, int]:
    """(bytes for the packed A block, bytes for the packed B block), each a multiple of 64."""
    nr = plan.nv * w
    a = _round_up(min(plan.mc, spec.m), plan.mr) * plan.kc * 4 if plan.pack_a else 0
    b = plan.kc * _round_up(min(plan.nc, spec.n), nr) * 4 if plan.pack_b else 0
    return _round_up(a, 64), _round_up(b, 64)


def emit_gemm(module: ir.Module, name: str, spec: GemmSpec, vector_width: int,
              plan: GemmPlan | None = None, target: Target | None = None,
              nthreads: int = 2, tile: TileEpilogue | None = None, helper=None) -> GemmInfo:
    """Emit `void name(A, B, C, bias, workspace, i32 tid, i32 nthreads)` into `module`
    (plus internal helpers named `name.*`); see the module docstring for the contract.
    With `tile`, the function takes one more pointer per `tile.args` after `nthreads`, and
    the microkernel runs the tile epilogue on every tile of the last K block.

    vector_width: float lanes per vector (16 for AVX-512F, 8 for AVX2; see Target.vector_width).
    plan: blocking; `plan_gemm(spec, vector_width, nthreads)` when None.
    target: CPU for the function attributes; the host when None.
    nthreads: the thread count the default plan balances for; the emitted function is
        correct for any count passed at run time.
    helper: `helper(key, build)` returns the packer `build()` made for `key` (one shared
        by every GEMM of the build: codegen.ModuleBuilder.helper); None: build each here.
    """
    helper = helper or (lambda key, build: build())
    w = vector_width
    if w not in _MAX_ACCUMULATORS:
        raise ValueError(f"vector_width must be 4, 8 or 16, not {w}")
    target = target or Target.host()
    if plan is None:
        plan = plan_gemm(spec, w, nthreads)
        if tile is not None:
            # the epilogue streams its buffers through the tiles: walk them along rows, so
            # each of a tile's rows continues where the previous tile's ended (prefetchable)
            plan = replace(plan, jr_outer=False)
    if plan.mr * plan.nv > _MAX_ACCUMULATORS[w]:
        raise ValueError(f"{plan.mr}x{plan.nv} tile needs more than {_MAX_ACCUMULATORS[w]} "
                         f"accumulator registers at width {w}")
    m, n, k = spec.m, spec.n, spec.k
    mr, nr = plan.mr, plan.nv * w
    kc = plan.kc
    nkb = max(1, _cdiv(k, kc))
    a_bytes, b_bytes = _workspace_layout(spec, plan, w)

    # Operand layouts seen by the microkernel.
    a_rs, a_cs = (1, spec.a_ld) if spec.ta else (spec.a_ld, 1)
    if not plan.pack_b and spec.tb:
        raise ValueError("a transposed B must be packed")
    lay = _Layout(a_rs=1 if plan.pack_a else a_rs, a_cs=mr if plan.pack_a else a_cs,
                  b_rs=nr if plan.pack_b else spec.b_ld, ldc=spec.c_ld,
                  a_packed=plan.pack_a, b_packed=plan.pack_b)
    # a tile crosses the edge of C only where a block or C itself is not a whole number of
    # tiles; without such tiles the edge kernel (as large as the full one) is not built;
    # with them, where masks cost nothing, the edge kernel does every tile
    edges = bool(m % mr or n % nr or plan.mc % mr or plan.nc % nr)
    kern_edge = _emit_kernel(module, f"{name}.kernel_edge", plan, lay, spec, w, target,
                             edge=True, tile=tile) if edges else None
    if kern_edge is not None and free_masks(target):
        kern, kern_edge = kern_edge, None
        def limits(rows, cols):
            return [_smin(b, rows, mr), _smin(b, cols, nr)]
    else:
        kern = _emit_kernel(module, f"{name}.kernel", plan, lay, spec, w, target, edge=False, tile=tile)
        def limits(rows, cols):
            return [_i64(mr), _i64(nr)]
    kern.attributes.add("noinline")
    pack_a = helper(("gemm.pack_a", mr, spec.ta), lambda: _emit_pack_a(
        module, f"{name}.pack_a", mr, spec.ta, w, target)) if plan.pack_a else None
    pack_b = shared_pack_b(helper, module, f"{name}.pack_b", spec.tb, w, target,
                           plan.nv) if plan.pack_b else None

    extra = [(PTR, f"e.{n}") for n in tile.args] if tile is not None else []
    fn = _new_function(module, name, [(PTR, "A"), (PTR, "B"), (PTR, "C"), (PTR, "bias"),
                                      (PTR, "workspace"), (I32, "tid"), (I32, "nthreads")] + extra,
                       target, w)
    A, B, C, bias, ws, tid, nthreads = fn.args[:7]
    extra_args = list(fn.args[7:])
    for arg in [A, B, C, bias, ws] + extra_args:
        arg.add_attribute("noalias")        # C, the workspace and the inputs are disjoint
        arg.add_attribute("captures(none)")
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    v = _Vec(b, w)

    # Static partition: thread t gets tiles [t*U/T, (t+1)*U/T) of the split dimension.
    units = _cdiv(n, nr) if plan.split == "n" else _cdiv(m, mr)
    t, nt = b.sext(tid, I64), b.sext(nthreads, I64)
    u0 = b.sdiv(b.mul(t, _i64(units)), nt)
    u1 = b.sdiv(b.mul(b.add(t, _i64(1)), _i64(units)), nt)
    if plan.split == "n":
        i0, i1 = _i64(0), _i64(m)
        j0, j1 = b.mul(u0, _i64(nr)), _smin(b, b.mul(u1, _i64(nr)), n)
    else:
        i0, i1 = b.mul(u0, _i64(mr)), _smin(b, b.mul(u1, _i64(mr)), m)
        j0, j1 = _i64(0), _i64(n)
    empty = b.or_(b.icmp_signed(">=", i0, i1), b.icmp_signed(">=", j0, j1))
    with b.if_then(empty, likely=False):
        b.ret_void()

    a_pack_buf = ws
    b_pack_buf = v.at(ws, a_bytes // 4)
    with _for_range(b, j0, j1, plan.nc, name="jc") as jc:
        nc = _smin(b, b.sub(j1, jc), plan.nc)
        with _for_range(b, 0, nkb, name="kb") as kb:
            pc = b.mul(kb, _i64(kc))
            kcur = _smin(b, b.sub(_i64(k), pc), kc)
            first = b.icmp_signed("==", kb, _i64(0))
            last = b.icmp_signed("==", kb, _i64(nkb - 1))
            add_c = ir.Constant(I1, 1) if spec.accumulate else b.not_(first)
            mode = b.or_(b.select(add_c, ir.Constant(I32, _ADD_C), ir.Constant(I32, 0)),
                         b.select(last, ir.Constant(I32, _EPILOGUE), ir.Constant(I32, 0)))
            if pack_b is not None:
                b.call(pack_b, [B, b_pack_buf, _i64(spec.b_ld), pc, kcur, jc, nc, _i64(nr)])
            with _for_range(b, i0, i1, plan.mc, name="ic") as ic:
                mc = _smin(b, b.sub(i1, ic), plan.mc)
                if pack_a is not None:
                    b.call(pack_a, [A, a_pack_buf, _i64(spec.a_ld), ic, mc, pc, kcur])

                def tile(ir_, jr):
                    if plan.pack_a:
                        ap = v.at(a_pack_buf, b.mul(ir_, kcur))
                    else:
                        ap = v.at(A, b.add(b.mul(b.add(ic, ir_), _i64(a_rs)),
                                           b.mul(pc, _i64(a_cs))))
                    if plan.pack_b:
                        bp = v.at(b_pack_buf, b.mul(jr, kcur))
                    else:
                        bp = v.at(B, b.add(b.mul(pc, _i64(spec.b_ld)), b.add(jc, jr)))
                    col = b.add(jc, jr)
                    cp = v.at(C, b.add(b.mul(b.add(ic, ir_), _i64(spec.c_ld)), col))
                    biasp = v.at(bias, col) if spec.bias else bias
                    where = [b.add(ic, ir_), col] + extra_args if tile is not None else []
                    rows, cols = b.sub(mc, ir_), b.sub(nc, jr)
                    if kern_edge is None:
                        b.call(kern, [ap, bp, cp, biasp, kcur, mode] + limits(rows, cols) + where)
                        return
                    full = b.and_(b.icmp_signed(">=", rows, _i64(mr)),
                                  b.icmp_signed(">=", cols, _i64(nr)))
                    with b.if_else(full, likely=True) as (then, otherwise):
                        with then:
                            b.call(kern, [ap, bp, cp, biasp, kcur, mode, _i64(mr), _i64(nr)]
                                   + where)
                        with otherwise:
                            b.call(kern_edge, [ap, bp, cp, biasp, kcur, mode,
                                               _smin(b, rows, mr), _smin(b, cols, nr)] + where)

                if plan.jr_outer:
                    with _for_range(b, 0, nc, nr, name="jr") as jr:
                        with _for_range(b, 0, mc, mr, name="ir") as ir_:
                            tile(ir_, jr)
                else:
                    with _for_range(b, 0, mc, mr, name="ir") as ir_:
                        with _for_range(b, 0, nc, nr, name="jr") as jr:
                            tile(ir_, jr)
    b.ret_void()
    return GemmInfo(name=name, spec=spec, vector_width=w, plan=plan,
                    workspace_bytes=a_bytes + b_bytes, parallel_units=units)
