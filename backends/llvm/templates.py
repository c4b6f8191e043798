"""Code templates for the kernel IR's Template parts: matmul (through gemm.py), pooling
and its gradient, gather and scatter, and column sums; the 2-D convolution and its two
gradients are packed GEMMs in conv.py.

Each template shares its work between threads by the leading axes of its output, and
its epilogue (elementwise ops fused after it) runs over exactly the same share, so no
barrier separates them. Inner loops run along the contiguous last axis so that LLVM
vectorizes them; window bounds are resolved outside the inner loops.
"""
from __future__ import annotations

import math

from llvmlite import ir

from dlc.core.kernel import Template

from .emit import emit_bounded, emit_nest
from .mathlib import fma, maximum
from .gemm import GemmSpec, _Vec, emit_gemm
from .tile import _read_elsewhere, tile_epilogue
from .irutil import F32, I64, const_vector, for_range, gep, hsum, hsums, i64, loop, smax, smin, split


def emit_template(mb, em, t: Template, tid, nthreads) -> None:
    EMITTERS[t.op](mb, em, t, tid, nthreads)


def _ptr(em, buf):
    return em.pointers[buf.name]


def _load(b, ptr, index):
    return b.load(gep(b, ptr, index, F32), typ=F32, align=4)


def _store(b, value, ptr, index):
    b.store(value, gep(b, ptr, index, F32), align=4)


def _dot(b, A, a_at, B, b_at, k: int, w: int, copies: int = 4):
    """The sum over kk < k of A[a_at + kk] * B[b_at + kk]: blocks of `copies` vectors of W
    products, each fused into its own vector accumulator (a multiply-add's latency is
    several cycles), then whole vectors into the first, then the rest one by one; the
    accumulators and lanes summed in one fixed order (irutil.hsum), so that no LLVM
    pipeline changes the result."""
    vt = ir.VectorType(F32, w)

    def products(copies):
        def body(kk, acc):
            at = [b.add(kk, i64(c * w)) if c else kk for c in range(copies)]
            return [fma(b, b.load(gep(b, A, b.add(a_at, x), F32), typ=vt, align=4),
                        b.load(gep(b, B, b.add(b_at, x), F32), typ=vt, align=4), a) for x, a in zip(at, acc)]
        return body
    accs = [const_vector(F32, [0.0] * w)] * copies
    blocks, whole = k - k % (w * copies), k - k % w
    if blocks:
        accs = list(loop(b, 0, blocks, accs, products(copies), name="kk.v", step=w * copies))
    if blocks < whole:
        accs[0] = loop(b, blocks, whole, accs[:1], products(1), name="kk.v1", step=w)[0]
    while len(accs) > 1:
        accs = [b.fadd(x, y) for x, y in zip(accs[::2], accs[1::2])]
    rest = loop(b, whole, k, [ir.Constant(F32, 0.0)],
                lambda kk, acc: [fma(b, _load(b, A, b.add(a_at, kk)), _load(b, B, b.add(b_at, kk)), acc[0])],
                name="kk")[0] if whole < k else ir.Constant(F32, 0.0)
    return b.fadd(hsum(b, accs[0]), rest)


def _flat(b, *terms):
    """sum of index * stride terms (i64 values or ints)."""
    out = i64(0)
    for v, stride in terms:
        v = i64(v) if isinstance(v, int) else v
        out = b.add(out, b.mul(v, i64(stride)) if stride != 1 else v)
    return out


def _epilogue(em, t: Template, bounds_by_axis: list) -> None:
    """The fused elementwise ops over this thread's share of the output."""
    if t.epilogue is None:
        return
    vars_ = list(t.epilogue.outer) + list(t.epilogue.inner)
    bounds = {v.name: r for v, r in zip(vars_, bounds_by_axis) if r is not None}
    emit_nest(em, t.epilogue, None, None, bounds=bounds)


def _share(b, t: Template, lead: int, tid, nthreads):
    """Split the first `lead` output axes (flattened) between threads; returns the flat
    range and the per-axis epilogue bounds when they are expressible as ranges."""
    shape = t.output.shape
    total = math.prod(shape[:lead])
    lo, hi = split(b, total, tid, nthreads)
    return lo, hi, total


def _each_unit(b, lo, hi, shape_lead, body):
    """for f in [lo, hi): body(*unravelled indices)"""
    def step(f, _):
        idx, rest = [], f
        for d in reversed(shape_lead):
            idx.append(b.urem(rest, i64(d)))
            rest = b.udiv(rest, i64(d))
        body(*reversed(idx))
        return []
    loop(b, lo, hi, (), step, name="unit")


def _epilogue_units(em, t, lo, hi, lead):
    """Epilogue over the same units: loop over units, then the remaining axes whole."""
    if t.epilogue is None:
        return
    b = em.b
    shape = t.output.shape
    vars_ = list(t.epilogue.outer) + list(t.epilogue.inner)

    def body(*idx):
        bounds = {v.name: (i, b.add(i, i64(1))) for v, i in zip(vars_[:lead], idx)}
        em.push()
        emit_bounded(em, t.epilogue, bounds)
        em.pop()
    _each_unit(b, lo, hi, shape[:lead], body)


# --- matmul --------------------------------------------------------------------------------------

# Below this many multiply-adds a matmul uses a compact loop nest (vectorized by LLVM)
# instead of the packed register-tiled GEMM: at these sizes the GEMM's packing does not pay,
# and its large code would dominate compile time.
SMALL_MATMUL = 1 << 20
# ...unless it does more than a quarter of SMALL_MATMUL multiply-adds, none of its
# dimensions is under MIN_GEMM_DIM and one of its matrices holds at least WEIGHT_SIZED
# elements: a small batch through a wide layer. There the compact loops read the weights
# once per group of rows (the forward, the data gradient) or run the optimizer's update
# row by row (the weight gradient), and the GEMM, which reads them once and updates them on
# its register tiles, is faster: MLP 784-512-256-10's step at batch 8 0.36 -> 0.29 ms
# (-20% with AVX2 too), 784-256-256-10's at batch 8 and 16 -15% and -20% (a Zen 4 machine),
# for 0.13 s more compile time. At batch 1 the compact loops are twice as fast (a
# 1024-wide layer), and with smaller matrices (LeNet-5's 120 -> 84 at batch 64) the GEMM
# gains nothing for its compile time. A product with a dimension of 1 (one sample, a
# vector-matrix product) never takes the GEMM, whose packing and register tiles have
# nothing to reuse there: training a 2048-wide MLP at batch 1 took 0.77 of the GEMM's
# time, a 4096-wide one 0.92-0.95. (A data gradient at a batch of at most _DOT_MAX_M, a
# short C times a transposed B, takes neither: _dots_in_registers.)
MIN_GEMM_DIM = 4
WEIGHT_SIZED = 1 << 16


def uses_dots(m: int, k: int, ta: bool, tb: bool, w: int) -> bool:
    """Whether C[m, n] = op(A) @ op(B) runs _dots_in_registers (neither the GEMM nor
    small_matmul): a short C times a transposed B, along k at least a vector of W."""
    return tb and not ta and m <= _DOT_MAX_M and k >= w > 1


def uses_gemm(m: int, n: int, k: int) -> bool:
    """Whether C[m, n] = A[m, k] @ B[k, n] gets the GEMM (else small_matmul; see matmul)."""
    macs, shortest = m * n * k, min(m, n, k)
    wide = shortest >= MIN_GEMM_DIM and macs > SMALL_MATMUL // 4 and max(m * k, k * n, m * n) >= WEIGHT_SIZED
    return shortest > 1 and (macs > SMALL_MATMUL or wide)


def matmul(mb, em, t: Template, tid, nthreads) -> None:
    b = em.b
    a_buf, b_buf = t.inputs
    m, n = t.output.shape
    ta, tb = t.attrs.get("ta", False), t.attrs.get("tb", False)
    k = a_buf.shape[0] if ta else a_buf.shape[1]
    if uses_dots(m, k, ta, tb, mb.target.vector_width):
        lo, hi = split(b, n, tid, nthreads)
        _dots_in_registers(b, mb, _ptr(em, a_buf), _ptr(em, b_buf), _ptr(em, t.output), m, n, k, lo, hi)
        _epilogue(em, t, [(i64(0), i64(m)), (lo, hi)])
        return
    if not uses_gemm(m, n, k):
        small_matmul(mb, em, t, m, n, k, ta, tb, tid, nthreads)
        return
    # the epilogue on the register tile (one function per template then), else after
    tile = tile_epilogue(mb.program, t) if t.epilogue is not None else None
    fn, info = _gemm_function(mb, GemmSpec(m, n, k, ta=ta, tb=tb), tile)
    null = ir.Constant(ir.PointerType(), None)
    extra = [em.pointers[name] for name in tile.args] if tile else []
    b.call(fn, [_ptr(em, a_buf), _ptr(em, b_buf), _ptr(em, t.output), null,
                em.pointers["__scratch__"], tid, nthreads] + extra)
    if t.epilogue is None or tile is not None:
        return
    # the epilogue covers exactly the tiles this thread computed (gemm.py's static split)
    plan = info.plan
    tile_n = info.nr if plan.split == "n" else info.mr
    units = -(-(n if plan.split == "n" else m) // tile_n)
    u0, u1 = split(b, units, tid, nthreads)
    r0, r1 = b.mul(u0, i64(tile_n)), smin(b, b.mul(u1, i64(tile_n)), i64(n if plan.split == "n" else m))
    if plan.split == "n":
        _epilogue(em, t, [(i64(0), i64(m)), (r0, r1)])
    else:
        _epilogue(em, t, [(r0, r1), (i64(0), i64(n))])


def _gemm_function(mb, spec: GemmSpec, tile=None):
    """(the callee, GemmInfo) of the GEMM function for spec (and register-tile epilogue):
    one per shape and module, or the one in a module already handed over to be compiled
    (ModuleBuilder.build_first)."""
    key = (mb.modules.index(mb.module), spec, tile.key if tile else None)
    built = key if key in mb.gemms else next((k for k in mb.gemms if k[1:] == key[1:] and k[0] in mb.closed), key)
    if built not in mb.gemms:
        name = f"gemm.{key[0]}.{len(mb.gemms)}.{mb.tag}"
        mb.gemms[key] = emit_gemm(mb.module, name, spec, mb.target.vector_width, target=mb.target, tile=tile,
                                  helper=mb.helper)
    info = mb.gemms[built]
    mb.layout.scratch_bytes = max(mb.layout.scratch_bytes, info.workspace_bytes)
    return mb.callee(mb.modules[built[0]].globals[info.name]), info


def small_matmul(mb, em, t: Template, m, n, k, ta, tb, tid, nthreads) -> None:
    """C = op(A) @ op(B) row by row, a few rows at a time held in registers
    (_rows_in_registers); a transposed B is transposed into scratch first when its k is
    short, else each element is a contiguous dot product (vectorized along k). Rows are
    shared out; the epilogue runs on each row as soon as it is computed (while it is in
    L1), and when nothing else reads C the rows are computed in this thread's scratch
    space instead of C (a weight gradient consumed only by its optimizer update never
    reaches memory)."""
    b = em.b
    A, B = _ptr(em, t.inputs[0]), _ptr(em, t.inputs[1])
    out = t.output.name
    per_row = t.epilogue is not None and len(t.epilogue.outer) == 1 and not t.epilogue.row_stores
    in_scratch = per_row and not _read_elsewhere(mb.program, t)
    if in_scratch:  # a group of rows (_rows_in_registers) at most
        mb.layout.scratch_bytes = max(mb.layout.scratch_bytes, -(-_MAX_GROUP * n * 4 // 64) * 64)

    def a_at(i, kk):
        return _load(b, A, b.add(b.mul(kk, i64(m)), i) if ta else b.add(b.mul(i, i64(k)), kk))

    lo, hi = split(b, m, tid, nthreads)

    def c_row(i, slot=i64(0)):
        """Where row i of C goes: row `slot` of this thread's scratch, or C itself."""
        if in_scratch:  # C[i, j] lives at scratch[slot*n + j]
            return em.pointers["__scratch__"], b.mul(slot, i64(n))
        return _ptr(em, t.output), b.mul(i, i64(n))

    def finish(i, slot=i64(0)):
        """The epilogue of row i, just computed (into scratch row `slot`)."""
        saved = em.pointers[out]
        if in_scratch:  # the epilogue's C[i*n + j] is scratch[slot*n + j]
            em.pointers[out] = b.gep(em.pointers["__scratch__"], [b.mul(b.sub(slot, i), i64(n))],
                                     source_etype=F32)
        em.push()
        emit_bounded(em, t.epilogue, {t.epilogue.outer[0].name: (i, b.add(i, i64(1)))})
        em.pop()
        em.pointers[out] = saved

    if not tb:
        _rows_in_registers(b, mb, a_at, lo, hi, B, m, n, k, c_row, finish if per_row else None)
    elif k <= _SHORT_K:
        # a short dot product (the gradient through an output layer of 10 classes) does
        # not vectorize along k: transpose B into this thread's scratch, after C's rows
        at = -(-_MAX_GROUP * n // 16) * 16
        mb.layout.scratch_bytes = max(mb.layout.scratch_bytes, (at + k * n) * 4)
        Bt = _transposed(b, B, b.gep(em.pointers["__scratch__"], [i64(at)], source_etype=F32), n, k)
        _rows_in_registers(b, mb, a_at, lo, hi, Bt, m, n, k, c_row, finish if per_row else None)
    else:  # C[i, j] = sum_k A[i, k] * B[j, k]
        with for_range(b, lo, hi, "mi") as i:
            C, row = c_row(i)
            with for_range(b, 0, n, "nj") as j:
                B_j = b.mul(j, i64(k))
                if ta:  # A's column: no vectors
                    def dot(kk, acc):
                        return [fma(b, a_at(i, kk), _load(b, B, b.add(B_j, kk)), acc[0])]
                    total = loop(b, 0, k, [ir.Constant(F32, 0.0)], dot, name="kk")[0]
                else:
                    total = _dot(b, A, b.mul(i, i64(k)), B, B_j, k, mb.target.vector_width)
                _store(b, total, C, b.add(row, j))
            if per_row:
                finish(i)
    if t.epilogue is not None and not per_row:
        _epilogue(em, t, [(lo, hi), (i64(0), i64(n))])


def batch_matmul(mb, em, t: Template, tid, nthreads) -> None:
    """C[g] = op(A[g]) @ op(B[g]): the matrices of the stack shared out between threads,
    each computed whole, then its epilogue while it is in cache. Attention's products are
    many (batch x heads), and small at short sequences (64 x 64 x 32): those run
    _rows_in_registers (a transposed B transposed into this thread's scratch first);
    one large enough for the GEMM (uses_gemm: from about 256 steps) calls the GEMM
    function on this thread alone (32 products q @ kᵀ of 256 x 64 by 64 x 256: 2.90 ms in
    register rows, 1.09 ms in the GEMM; PyTorch's bmm 1.56 ms). A stack of fewer matrices
    than threads leaves the other threads idle."""
    b = em.b
    a_buf, b_buf = t.inputs
    groups, m, n = t.output.shape
    ta, tb = t.attrs.get("ta", False), t.attrs.get("tb", False)
    k = a_buf.shape[1] if ta else a_buf.shape[2]
    gemm = _gemm_function(mb, GemmSpec(m, n, k, ta=ta, tb=tb))[0] if uses_gemm(m, n, k) else None
    if tb and gemm is None:
        mb.layout.scratch_bytes = max(mb.layout.scratch_bytes, k * n * 4)
    lo, hi = split(b, groups, tid, nthreads)
    with for_range(b, lo, hi, "bg") as g:
        A = gep(b, _ptr(em, a_buf), b.mul(g, i64(m * k)), F32)
        B = gep(b, _ptr(em, b_buf), b.mul(g, i64(k * n)), F32)
        C = gep(b, _ptr(em, t.output), b.mul(g, i64(m * n)), F32)

        def a_at(i, kk):
            return _load(b, A, b.add(b.mul(kk, i64(m)), i) if ta else b.add(b.mul(i, i64(k)), kk))
        if gemm is not None:  # thread 0 of 1: the whole product, in this thread's workspace
            one = ir.Constant(ir.IntType(32), 1)
            b.call(gemm, [A, B, C, ir.Constant(ir.PointerType(), None), em.pointers["__scratch__"],
                          ir.Constant(ir.IntType(32), 0), one])
        else:
            if tb:  # B[g] is [n, k]: its transpose into scratch, so that rows of B are vectors
                B = _transposed(b, B, em.pointers["__scratch__"], n, k)
            _rows_in_registers(b, mb, a_at, i64(0), i64(m), B, m, n, k,
                               lambda i, slot=None: (C, b.mul(i, i64(n))), None)
        if t.epilogue is not None:
            em.push()
            emit_bounded(em, t.epilogue, {t.epilogue.outer[0].name: (g, b.add(g, i64(1)))})
            em.pop()


def _transposed(b, B, Bt, n: int, k: int):
    """Bt [k, n] (this thread's scratch), B [n, k] transposed into it."""
    with for_range(b, 0, n, "tj") as j:
        with for_range(b, 0, k, "tk") as kk:
            _store(b, _load(b, B, b.add(b.mul(j, i64(k)), kk)), Bt, b.add(b.mul(kk, i64(n)), j))
    return Bt


def _dots_in_registers(b, mb, A, B, C, m: int, n: int, k: int, lo, hi) -> None:
    """C[i, j] = sum_kk A[i, kk] * B[j, kk] for every row i < m and the columns j in [lo,
    hi) (a short C times a transposed B, whose rows run along k: a dense layer's data
    gradient at a small batch): a few rows of B at once, each vector of them multiplied
    with the same vector of every row of A (A is small: in L1) into m x rows vector
    accumulators over the whole k, then the accumulators' lanes summed (irutil.hsums).
    B is read once, in place. The GEMM packed (transposed) B first, a pass over it as
    long as the products: MLP 784-512-256-10's data gradient at batch 8, 8 x 512 x 256,
    took 19 us on one thread in the GEMM and takes 11 us here (Zen 5)."""
    w = mb.target.vector_width
    v = _Vec(b, w, fused=mb.target.has("fma"))
    rows = max(1, min(_DOT_MAX_ROWS, _DOT_ACCUMULATORS[w] // m))
    whole = k - k % w
    tail = v.mask(whole, k) if whole < k else None
    with for_range(b, lo, hi, "nj", step=rows) as j0:
        last = b.sub(hi, i64(1))
        b_rows = [b.mul(smin(b, b.add(j0, i64(r)), last), i64(k)) for r in range(rows)]  # past hi: the last again

        def step(kk, acc, mask=None):
            bv = [v.load(v.at(B, b.add(at, kk)), mask) for at in b_rows]
            out = []
            for i in range(m):
                a = v.load(v.at(A, b.add(i64(i * k), kk)), mask)
                out += [v.fma(a, x, acc[i * rows + r]) for r, x in enumerate(bv)]
            return out
        acc = loop(b, 0, whole, [v.zero] * (m * rows), step, name="kk", step=w) if whole else [v.zero] * (m * rows)
        if tail is not None:
            acc = step(i64(whole), acc, tail)
        sums = hsums(b, acc)
        for r in range(rows):
            with b.if_then(b.icmp_signed("<", b.add(j0, i64(r)), hi)):
                for i in range(m):
                    _store(b, sums[i * rows + r], C, b.add(i64(i * n), b.add(j0, i64(r))))


# A short C (at most _DOT_MAX_M rows) times a transposed B runs _dots_in_registers, with
# accumulators for m x (at most _DOT_MAX_ROWS) dot products (by vector width)
_DOT_MAX_M = 8
_DOT_MAX_ROWS = 4
_DOT_ACCUMULATORS = {4: 12, 8: 12, 16: 24}

# B's columns per register block (vectors) and rows at most per group in
# _rows_in_registers; a transposed B with at most _SHORT_K rows is transposed first
# (small_matmul)
_COLUMN_BLOCK = 8
_MAX_GROUP = 8
_SHORT_K = 32


def _rows_in_registers(b, mb, a_at, lo, hi, B, m: int, n: int, k: int, c_row, finish) -> None:
    """C[i, :] = sum_k A[i, k] * B[k, :] for rows [lo, hi) of m: a few rows times up to
    _COLUMN_BLOCK vectors of columns held in registers over the whole k loop (masked
    past n; each B vector loaded once for all the rows, their FMA chains independent)
    and stored once; then `finish` (the epilogue; None: none) runs on each row. As a
    loop nest the row lived in memory, and rows narrower than a vector (an output
    layer's 10 classes) never vectorized: MLP 784-512-256-10's products with its
    10-wide layer ran at ~10 G multiply-adds/s."""
    w = mb.target.vector_width
    v = _Vec(b, w, fused=mb.target.has("fma"))
    nvec = -(-n // w)
    blocks = [range(j, min(j + _COLUMN_BLOCK, nvec)) for j in range(0, nvec, _COLUMN_BLOCK)]
    # rows at once: accumulator chains enough to hide the FMA latency, within registers,
    # and no more than a thread's share of the rows when two threads split them (a last
    # group past the share rereads its last row rather than have code of its own)
    group = max(1, min(_MAX_GROUP, 24 // len(blocks[0]), -(-m // 2)))
    masks = [v.mask(j * w, n) if (j + 1) * w > n else None for j in range(nvec)]

    with for_range(b, lo, hi, "mi", step=group) as i0:
        last = b.sub(hi, i64(1))
        at = [smin(b, b.add(i0, i64(r)), last) for r in range(group)]  # past hi: reread the last row
        acc = {}
        for block in blocks:
            def step(kk, carried, block=block):
                brow = b.gep(B, [b.mul(kk, i64(n))], source_etype=F32)
                bvec = [v.load(v.at(brow, j * w), masks[j]) for j in block]
                out = []
                for r in range(group):
                    a = v.splat(a_at(at[r], kk))
                    out += [v.fma(a, bv, x) for bv, x in zip(bvec, carried[r * len(block):(r + 1) * len(block)])]
                return out
            sums = loop(b, 0, k, [v.zero] * (group * len(block)), step, name="kk")
            for r in range(group):
                for c, j in enumerate(block):
                    acc[r, j] = sums[r * len(block) + c]
        for r in range(group):
            with b.if_then(b.icmp_signed("<", b.add(i0, i64(r)), hi)):
                C, row = c_row(b.add(i0, i64(r)), i64(r))
                for j in range(nvec):
                    v.store(acc[r, j], v.at(b.gep(C, [row], source_etype=F32), j * w), masks[j])
        if finish is not None:
            with for_range(b, 0, smin(b, i64(group), b.sub(hi, i0)), "fr") as r:  # the epilogue's code once
                finish(b.add(i0, r), r)


# --- pooling --------------------------------------------------------------------------------------

def pool2d(mb, em, t: Template, tid, nthreads) -> None:
    if pooling.pool2d(mb, em, t, tid, nthreads):
        return
    b = em.b
    (xb,) = t.inputs
    N, C, H, W = xb.shape
    _, _, OH, OW = t.output.shape
    (kh, kw), (sh, sw), (ph, pw) = t.attrs["kernel"], t.attrs["stride"], t.attrs["pad"]
    is_max = t.attrs["mode"] == "max"
    X, Y = _ptr(em, xb), _ptr(em, t.output)
    lo, hi, _ = _share(b, t, 2, tid, nthreads)

    def unit(n, c):
        plane = _flat(b, (n, C * H * W), (c, H * W))
        oplane = _flat(b, (n, C * OH * OW), (c, OH * OW))
        with for_range(b, 0, OH, "oy") as oy:
            with for_range(b, 0, OW, "ox") as ox:
                acc = ir.Constant(F32, -math.inf if is_max else 0.0)
                for i in range(kh):
                    for j in range(kw):
                        iy = b.sub(b.add(b.mul(oy, i64(sh)), i64(i)), i64(ph))
                        ix = b.sub(b.add(b.mul(ox, i64(sw)), i64(j)), i64(pw))
                        ok = b.and_(b.and_(b.icmp_signed(">=", iy, i64(0)), b.icmp_signed("<", iy, i64(H))),
                                    b.and_(b.icmp_signed(">=", ix, i64(0)), b.icmp_signed("<", ix, i64(W))))
                        at = b.add(plane, b.add(b.mul(smin(b, smax(b, iy, i64(0)), i64(H - 1)), i64(W)),
                                                smin(b, smax(b, ix, i64(0)), i64(W - 1))))
                        v = _load(b, X, at)
                        if is_max:
                            acc = b.select(ok, maximum(b, acc, v), acc)
                        else:
                            acc = b.fadd(acc, b.select(ok, v, ir.Constant(F32, 0.0)))
                if not is_max:
                    acc = b.fmul(acc, ir.Constant(F32, 1.0 / (kh * kw)))
                _store(b, acc, Y, b.add(oplane, b.add(b.mul(oy, i64(OW)), ox)))
    _each_unit(b, lo, hi, (N, C), unit)
    _epilogue_units(em, t, lo, hi, 2)


def pool2d_bwd(mb, em, t: Template, tid, nthreads) -> None:
    """Max: the gradient goes to the first maximum of each window (row-major), as the
    reference does; avg: spread evenly over the window."""
    if pooling.pool2d_bwd(mb, em, t, tid, nthreads):
        return
    b = em.b
    xb, gb = t.inputs
    N, C, H, W = xb.shape
    _, _, OH, OW = gb.shape
    (kh, kw), (sh, sw), (ph, pw) = t.attrs["kernel"], t.attrs["stride"], t.attrs["pad"]
    is_max = t.attrs["mode"] == "max"
    X, G, DX = _ptr(em, xb), _ptr(em, gb), _ptr(em, t.output)
    lo, hi, _ = _share(b, t, 2, tid, nthreads)

    def unit(n, c):
        plane = _flat(b, (n, C * H * W), (c, H * W))
        gplane = _flat(b, (n, C * OH * OW), (c, OH * OW))
        with for_range(b, 0, H * W, "z") as z:
            _store(b, ir.Constant(F32, 0.0), DX, b.add(plane, z))
        with for_range(b, 0, OH, "oy") as oy:
            with for_range(b, 0, OW, "ox") as ox:
                g = _load(b, G, b.add(gplane, b.add(b.mul(oy, i64(OW)), ox)))
                best, best_at = ir.Constant(F32, -math.inf), i64(-1)
                cells = []
                for i in range(kh):
                    for j in range(kw):
                        iy = b.sub(b.add(b.mul(oy, i64(sh)), i64(i)), i64(ph))
                        ix = b.sub(b.add(b.mul(ox, i64(sw)), i64(j)), i64(pw))
                        ok = b.and_(b.and_(b.icmp_signed(">=", iy, i64(0)), b.icmp_signed("<", iy, i64(H))),
                                    b.and_(b.icmp_signed(">=", ix, i64(0)), b.icmp_signed("<", ix, i64(W))))
                        at = b.add(plane, b.add(b.mul(iy, i64(W)), ix))
                        cells.append((ok, at))
                        if is_max:
                            safe = b.select(ok, at, plane)
                            v = _load(b, X, safe)
                            take = b.and_(ok, b.or_(b.fcmp_ordered(">", v, best),
                                                     b.icmp_signed("<", best_at, i64(0))))
                            best = b.select(take, v, best)
                            best_at = b.select(take, at, best_at)
                if is_max:
                    with b.if_then(b.icmp_signed(">=", best_at, i64(0))):
                        _store(b, b.fadd(_load(b, DX, best_at), g), DX, best_at)
                else:
                    share = b.fmul(g, ir.Constant(F32, 1.0 / (kh * kw)))
                    for ok, at in cells:
                        with b.if_then(ok):
                            _store(b, b.fadd(_load(b, DX, at), share), DX, at)
    _each_unit(b, lo, hi, (N, C), unit)
    _epilogue_units(em, t, lo, hi, 2)


# --- gather / scatter -------------------------------------------------------------------------------

def take(mb, em, t: Template, tid, nthreads) -> None:
    b = em.b
    table, idx = t.inputs
    rows = table.shape[0]
    width = math.prod(table.shape[1:])
    count = math.prod(idx.shape)
    T, I, Y = _ptr(em, table), _ptr(em, idx), _ptr(em, t.output)
    lo, hi = split(b, count, tid, nthreads)

    def row(i, _):
        r = b.sext(b.load(gep(b, I, i, ir.IntType(32)), typ=ir.IntType(32)), I64)
        r = smin(b, smax(b, r, i64(0)), i64(rows - 1))
        with for_range(b, 0, width, "j") as j:
            _store(b, _load(b, T, b.add(b.mul(r, i64(width)), j)), Y, b.add(b.mul(i, i64(width)), j))
        return []
    loop(b, lo, hi, (), row, name="row")
    _epilogue_units(em, t, lo, hi, len(idx.shape)) if len(idx.shape) == 1 else _epilogue_serial(em, t, tid)


def scatter_add(mb, em, t: Template, tid, nthreads) -> None:
    """Rows may repeat, so one thread does it all."""
    b = em.b
    g, idx = t.inputs
    rows = t.output.shape[0]
    width = math.prod(t.output.shape[1:])
    count = math.prod(idx.shape)
    Gp, I, Y = _ptr(em, g), _ptr(em, idx), _ptr(em, t.output)
    with b.if_then(b.icmp_signed("==", tid, ir.Constant(ir.IntType(32), 0))):
        with for_range(b, 0, rows * width, "z") as z:
            _store(b, ir.Constant(F32, 0.0), Y, z)
        with for_range(b, 0, count, "i") as i:
            r = b.sext(b.load(gep(b, I, i, ir.IntType(32)), typ=ir.IntType(32)), I64)
            r = smin(b, smax(b, r, i64(0)), i64(rows - 1))
            with for_range(b, 0, width, "j") as j:
                at = b.add(b.mul(r, i64(width)), j)
                _store(b, b.fadd(_load(b, Y, at), _load(b, Gp, b.add(b.mul(i, i64(width)), j))), Y, at)
    _epilogue_serial(em, t, tid)


def colsum(mb, em, t: Template, tid, nthreads) -> None:
    """out = the sum of the input's rows (over its leading axes): each thread adds whole rows
    into its share of out, along the contiguous axis, instead of walking columns."""
    b = em.b
    shape = t.output.shape
    width = math.prod(shape)
    rows = math.prod(t.inputs[0].shape) // width
    inner = width // shape[0]
    X, Y = _ptr(em, t.inputs[0]), _ptr(em, t.output)
    lo, hi = split(b, shape[0], tid, nthreads)
    first, last = b.mul(lo, i64(inner)), b.mul(hi, i64(inner))
    with for_range(b, first, last, "j") as j:
        _store(b, ir.Constant(F32, 0.0), Y, j)
    with for_range(b, 0, rows, "r") as r:
        row = b.mul(r, i64(width))
        with for_range(b, first, last, "j") as j:
            _store(b, b.fadd(_load(b, Y, j), _load(b, X, b.add(row, j))), Y, j)
    _epilogue(em, t, [(lo, hi)] + [None] * (len(shape) - 1))


def _epilogue_serial(em, t: Template, tid) -> None:
    if t.epilogue is None:
        return
    b = em.b
    with b.if_then(b.icmp_signed("==", tid, ir.Constant(ir.IntType(32), 0))):
        emit_bounded(em, t.epilogue, {})


from . import conv as _conv  # noqa: E402
from . import pooling  # noqa: E402

EMITTERS = {"matmul": matmul, "batch_matmul": batch_matmul, **_conv.EMITTERS, "pool2d": pool2d,
            "pool2d_bwd": pool2d_bwd,
            "take": take, "scatter_add": scatter_add, "colsum": colsum}
# Templates whose emitters vectorize and unroll their code themselves (conv.py: register
# tiles, taps and lanes unrolled, every other loop marked not to unroll, epilogues
# vectorized by emit.py): codegen puts them in modules of their own, which LLVM compiles
# with a short pipeline (jit.PRETUNED_PASSES) instead of O3.
PRETUNED_TEMPLATES = frozenset(_conv.EMITTERS)
