"""The generated SGEMM (backends/llvm/gemm.py) against a float64 numpy reference.

Awkward sizes (1, 7, 33, 100, 257), transposed operands, accumulate, bias + ReLU, leading
dimensions, every packing path, 1-3 threads (real Python threads), and the AVX2 and SSE
code paths (wider features turned off in the function's target features). Each test
compiles its GEMMs into one module with a minimal JIT (the backend has its own).
"""
from __future__ import annotations

import ctypes
import itertools
import threading
from dataclasses import replace

import llvmlite.binding as llvm
import numpy as np
import pytest
from llvmlite import ir

from dlc.backends.llvm.gemm import GemmSpec, emit_gemm, plan_gemm
from dlc.backends.llvm.target import Target

llvm.initialize_native_target()
llvm.initialize_native_asmprinter()

HOST = Target.host()
W = HOST.vector_width
AWKWARD = (1, 7, 33, 100, 257)
_GEMM_FN = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 5, ctypes.c_int32, ctypes.c_int32)
_ENGINES = []   # keep JIT engines (and so the compiled code) alive for the whole session


def _target_machine(target: Target):
    return llvm.Target.from_default_triple().create_target_machine(
        cpu=target.cpu, features=target.features, opt=3)


def compile_gemms(cases, width=W, target=HOST, asm=False):
    """cases: [(spec, plan or None)] -> ([(info, cfunc)], assembly text or None)."""
    module = ir.Module("gemm_test")
    module.triple = llvm.get_process_triple()
    infos = [emit_gemm(module, f"gemm{i}", spec, width, plan=plan, target=target)
             for i, (spec, plan) in enumerate(cases)]
    mod = llvm.parse_assembly(str(module))
    mod.verify()
    tm = _target_machine(target)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(mod, pb)
    text = tm.emit_assembly(mod) if asm else None
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    _ENGINES.append(engine)
    return [(info, _GEMM_FN(engine.get_function_address(info.name))) for info in infos], text


def _aligned(nbytes: int) -> tuple[np.ndarray, int]:
    """A NaN-filled buffer and the address of its first 64-byte aligned byte."""
    buf = np.full(nbytes // 4 + 16, np.nan, np.float32)
    return buf, buf.ctypes.data + (-buf.ctypes.data) % 64


def run_and_check(info, fn, nthreads: int, seed: int = 0) -> None:
    spec = info.spec
    rng = np.random.default_rng(seed)
    m, n, k = spec.m, spec.n, spec.k
    # Operands live in larger buffers when the spec has leading dimensions.
    a_rows, a_cols = (k, m) if spec.ta else (m, k)
    b_rows, b_cols = (n, k) if spec.tb else (k, n)
    A = rng.standard_normal((a_rows, spec.a_ld)).astype(np.float32)
    B = rng.standard_normal((b_rows, spec.b_ld)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    guard = 64      # sentinel elements after C's last row catch stray stores
    c_buf = np.full(m * spec.c_ld + guard, 12345.0, np.float32)
    C = c_buf[:m * spec.c_ld].reshape(m, spec.c_ld)
    c_init = rng.standard_normal((m, n)).astype(np.float32)
    C[:, :n] = c_init if spec.accumulate else np.nan   # NaN: C must not be read
    outside = c_buf.copy()

    a = A[:, :a_cols].astype(np.float64)
    b = B[:, :b_cols].astype(np.float64)
    expect = (a.T if spec.ta else a) @ (b.T if spec.tb else b)
    if spec.accumulate:
        expect += c_init
    if spec.bias:
        expect += bias
    if spec.relu:
        expect = np.maximum(expect, 0)

    spaces = [_aligned(info.workspace_bytes) for _ in range(nthreads)]
    args = (A.ctypes.data, B.ctypes.data, C.ctypes.data, bias.ctypes.data if spec.bias else None)
    threads = [threading.Thread(target=fn, args=(*args, spaces[t][1], t, nthreads))
               for t in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    scale = np.abs(A).max(initial=0) * np.abs(B).max(initial=0)
    atol = 4 * max(k, 1) * np.finfo(np.float32).eps * scale + 1e-6
    np.testing.assert_allclose(C[:, :n], expect, rtol=1e-4, atol=atol,
                               err_msg=f"{spec} plan={info.plan} threads={nthreads}")
    written = np.zeros(c_buf.shape, bool)
    written[:m * spec.c_ld].reshape(m, spec.c_ld)[:, :n] = True
    np.testing.assert_array_equal(c_buf[~written], outside[~written],
                                  err_msg=f"stores outside C: {spec}")


def check_all(cases, width=W, target=HOST, threads=(1, 2)):
    for info, fn in compile_gemms(cases, width, target)[0]:
        for nthreads in threads:
            run_and_check(info, fn, nthreads)


# A cover of the awkward sizes: every value appears in every dimension, mixed with others.
SHAPES = [(1, 1, 1), (1, 257, 33), (7, 33, 100), (7, 1, 257), (33, 100, 257), (33, 7, 1),
          (100, 257, 7), (100, 33, 33), (257, 1, 100), (257, 257, 257), (257, 7, 1)]


def test_awkward_shapes():
    assert all({shape[d] for shape in SHAPES} == set(AWKWARD) for d in range(3))
    check_all([(GemmSpec(m, n, k), None) for m, n, k in SHAPES], threads=(1, 2, 3))


def test_mlp_shapes():
    shapes = [(128, 512, 784), (8, 512, 784), (1, 512, 784), (128, 10, 256)]
    check_all([(GemmSpec(m, n, k, bias=True, relu=True), None) for m, n, k in shapes])


@pytest.mark.parametrize("ta,tb", list(itertools.product((False, True), repeat=2)))
def test_transposed_operands_and_epilogue(ta, tb):
    cases = [(GemmSpec(257, 33, 100, ta=ta, tb=tb), None),
             (GemmSpec(7, 100, 257, ta=ta, tb=tb, accumulate=True, bias=True, relu=True), None)]
    check_all(cases)


def test_every_packing_path_and_block_edge():
    # Tiny blocks force several K, M and N blocks (the epilogue must run only once, after
    # the last K block) on a shape with tails in every dimension.
    spec = GemmSpec(100, 257, 100, accumulate=True, bias=True, relu=True)
    base = replace(plan_gemm(spec, W), kc=24, mc=2 * plan_gemm(spec, W).mr, nc=3 * 2 * W)
    cases = [(spec, replace(base, pack_a=pack_a, pack_b=pack_b, split=split, jr_outer=pack_a))
             for pack_a, pack_b, split in [(False, False, "m"), (False, True, "n"),
                                           (True, False, "n"), (True, True, "m")]]
    cases.append((replace(spec, ta=True, tb=True), replace(base, pack_a=True, pack_b=True)))
    cases.append((spec, replace(base, mr=3, nv=1, prefetch_a=8, prefetch_b=8,
                                prefetch_c=False, unroll=3)))
    check_all(cases, threads=(1, 2))


def test_leading_dimensions_and_empty_k():
    cases = [(GemmSpec(33, 100, 7, lda=40, ldb=128, ldc=101), None),
             (GemmSpec(100, 33, 257, ta=True, tb=True, lda=128, ldb=300, ldc=64,
                       accumulate=True), None),
             (GemmSpec(7, 33, 0, bias=True, relu=True), None),
             (GemmSpec(7, 33, 0, accumulate=True), None)]
    check_all(cases)


def test_avx2_path():
    # The 8-wide kernels, compiled with AVX-512 off: the code the AVX2 machines run.
    target = HOST.without("avx512")
    cases = [(GemmSpec(m, n, k), None) for m, n, k in [(257, 100, 33), (7, 257, 100), (1, 33, 7)]]
    cases += [(GemmSpec(100, 33, 257, ta=True, tb=True, accumulate=True, bias=True, relu=True),
               None)]
    compiled, asm = compile_gemms(cases, width=8, target=target, asm=True)
    assert "ymm" in asm and "zmm" not in asm
    for info, fn in compiled:
        assert info.nr == 8 * info.plan.nv
        for nthreads in (1, 2):
            run_and_check(info, fn, nthreads)


def test_sse_path():
    # 4-wide without AVX or FMA (fmuladd becomes mul + add).
    target = HOST.without("avx", "fma", "f16c", "vaes", "vpclmulqdq", "gfni")
    spec = GemmSpec(33, 100, 7, tb=True, accumulate=True, bias=True, relu=True)
    compiled, asm = compile_gemms([(spec, None)], width=4, target=target, asm=True)
    assert "xmm" in asm and "ymm" not in asm and "vfmadd" not in asm
    run_and_check(*compiled[0], nthreads=2)


def test_b_is_packed_where_the_copy_pays_for_itself():
    """A few tile rows over a B share that stays in L2 (a recurrent layer's weights, read
    every time step) read B in place; more rows, a share beyond L2, or a transposed B pack it."""
    assert not plan_gemm(GemmSpec(32, 512, 128), 16, 2).pack_b
    assert not plan_gemm(GemmSpec(40, 512, 784), 16, 2).pack_b
    assert plan_gemm(GemmSpec(32, 1024, 1024), 16, 2).pack_b       # 2 MiB per thread
    assert plan_gemm(GemmSpec(64, 512, 784), 16, 2).pack_b          # 8 tile rows
    assert plan_gemm(GemmSpec(32, 512, 128, tb=True), 16, 2).pack_b


def test_plan_and_info():
    big = GemmSpec(1024, 1024, 1024)
    info = emit_gemm(ir.Module(), "g", big, W)
    assert info.workspace_bytes % 64 == 0 and info.workspace_bytes > 0
    assert info.parallel_units >= 2
    assert emit_gemm(ir.Module(), "g", GemmSpec(1, 512, 784), W).workspace_bytes == 0
    for spec in (GemmSpec(257, 100, 7), GemmSpec(100, 10, 7), GemmSpec(1, 257, 7)):
        info = emit_gemm(ir.Module(), "g", spec, W)     # IR only: the plan and the share
        for nthreads in (1, 2, 3):
            owner = np.zeros((spec.m, spec.n), int)
            for tid in range(nthreads):
                rows, cols = info.thread_share(tid, nthreads)
                owner[rows.start:rows.stop, cols.start:cols.stop] += 1
            assert (owner == 1).all()
    with pytest.raises(ValueError):
        GemmSpec(4, 4, 4, lda=3)
    with pytest.raises(ValueError):
        emit_gemm(ir.Module(), "g", big, 16, plan=replace(plan_gemm(big, 16), mr=16, nv=2))
