"""Benchmark: the generated SGEMM (backends/llvm/gemm.py) against numpy.matmul (OpenBLAS).

    python benchmarks/bench_gemm_kernel.py [--threads 2] [--repeats 11] [--width 16|8]
                                           [--runner pool|threads] [--only LABEL]

Square sizes 256..2048 and the MLP shapes dlc trains (forward X @ W + bias, ReLU, and the
two backward products). Each row is checked against numpy, then dlc and numpy are timed
in alternating rounds (medians). Columns:

  dlc      dlc's GEMM on --threads threads, driven by --runner: `pool` is dlc's native
           worker pool (backends/llvm/pool.py: spinning native threads, as compiled
           steps run), `threads` is persistent Python threads, pinned one per CPU, each
           calling the compiled function for its tid through ctypes (which drops the GIL)
  dlc 1T   the same code on one thread (no hand-off at all)
  others   the share of the machine's CPU time used by other processes during the row;
           above a few percent the row's timings are not trustworthy
"""
from __future__ import annotations

import argparse
import ctypes
import os
import threading
import time

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir

from dlc.backends.llvm.gemm import GemmSpec, emit_gemm
from dlc.backends.llvm.target import Target

SHAPES = [  # (label, spec)
    ("square 256", GemmSpec(256, 256, 256)),
    ("square 512", GemmSpec(512, 512, 512)),
    ("square 1024", GemmSpec(1024, 1024, 1024)),
    ("square 2048", GemmSpec(2048, 2048, 2048)),
    ("mlp fwd b128", GemmSpec(128, 512, 784, bias=True, relu=True)),
    ("mlp dX b128 (B^T)", GemmSpec(128, 784, 512, tb=True)),
    ("mlp dW b128 (A^T)", GemmSpec(784, 512, 128, ta=True)),
    ("mlp fwd b8", GemmSpec(8, 512, 784, bias=True, relu=True)),
    ("mlp fwd b1", GemmSpec(1, 512, 784, bias=True, relu=True)),
    ("mlp out b128", GemmSpec(128, 10, 256, bias=True)),
]

_GEMM = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 5, ctypes.c_int32, ctypes.c_int32)
_PTR, _I32, _I64 = ir.PointerType(), ir.IntType(32), ir.IntType(64)


def _emit_step(module: ir.Module, gemm: str) -> None:
    """void step(ptr table, i32 tid, i32 n): the pool's calling convention. The table holds
    A, B, C, bias, workspace base, workspace bytes per thread."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [_PTR, _I32, _I32]), name="step")
    table, tid, n = fn.args
    b = ir.IRBuilder(fn.append_basic_block())
    slots = [b.load(b.gep(table, [ir.Constant(_I64, i)], source_etype=_PTR), typ=_PTR)
             for i in range(5)]
    per_thread = b.load(b.gep(table, [ir.Constant(_I64, 5)], source_etype=_I64), typ=_I64)
    offset = b.mul(b.sext(tid, _I64), per_thread)
    slots[4] = b.gep(slots[4], [offset], source_etype=ir.IntType(8))
    b.call(module.globals[gemm], slots + [tid, n])
    b.ret_void()


def jit(spec: GemmSpec, width: int, target: Target):
    """Compile one GEMM (and a pool step calling it): host target machine, O3, MCJIT."""
    module = ir.Module("bench")
    module.triple = llvm.get_process_triple()
    info = emit_gemm(module, "gemm", spec, width, target=target)
    _emit_step(module, "gemm")
    mod = llvm.parse_assembly(str(module))
    mod.verify()
    tm = llvm.Target.from_default_triple().create_target_machine(
        cpu=target.cpu, features=target.features, opt=3)
    pb = llvm.create_pass_builder(tm, llvm.create_pipeline_tuning_options(speed_level=3))
    pb.getModulePassManager().run(mod, pb)
    engine = llvm.create_mcjit_compiler(mod, tm)
    engine.finalize_object()
    return info, engine


_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def _pin(tid: int) -> None:
    """Pin the calling thread to one CPU, as a native pool would: otherwise Linux may wake
    a worker on its waker's CPU and run the two halves one after the other."""
    if _CPUS:
        os.sched_setaffinity(0, {_CPUS[tid % len(_CPUS)]})


def _machine_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process) so far."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return busy, time.process_time()


class Runner:
    """Runs the GEMM on `nthreads` threads: `run(A, B, C, bias)` pointers."""

    def __init__(self, info, engine, nthreads: int, kind: str):
        self.nthreads, self.kind = nthreads, kind
        self.bytes = max(info.workspace_bytes, 64)
        self._space = np.zeros(self.bytes * nthreads // 4 + 16, np.float32)
        self.space = self._space.ctypes.data + (-self._space.ctypes.data) % 64
        self.gemm = _GEMM(engine.get_function_address("gemm"))
        self.table = (ctypes.c_void_p * 6)()
        if kind == "pool" and nthreads > 1:
            from dlc.backends.llvm.pool import Pool
            self.pool, self.step = Pool.get(nthreads), engine.get_function_address("step")
        elif nthreads > 1:
            self._go = [threading.Lock() for _ in range(nthreads)]
            self._done = [threading.Lock() for _ in range(nthreads)]
            _pin(0)
            for tid in range(1, nthreads):
                self._go[tid].acquire()
                self._done[tid].acquire()
                threading.Thread(target=self._worker, args=(tid,), daemon=True).start()

    def _worker(self, tid):
        # One lock per direction: a single futex wake per call, half a Barrier's cost.
        _pin(tid)
        while True:
            self._go[tid].acquire()
            self.gemm(*self.args, self.space + tid * self.bytes, tid, self.nthreads)
            self._done[tid].release()

    def __call__(self, *pointers):
        if self.nthreads == 1:
            self.gemm(*pointers, self.space, 0, 1)
        elif self.kind == "pool":
            self.table[:] = [*pointers, self.space, self.bytes]
            self.pool.run(self.step, ctypes.addressof(self.table), self.nthreads)
        else:
            self.args = pointers
            for tid in range(1, self.nthreads):
                self._go[tid].release()
            self.gemm(*pointers, self.space, 0, self.nthreads)
            for tid in range(1, self.nthreads):
                self._done[tid].acquire()


def operands(spec: GemmSpec, rng):
    A = rng.standard_normal((spec.k, spec.m) if spec.ta else (spec.m, spec.k), np.float32)
    B = rng.standard_normal((spec.n, spec.k) if spec.tb else (spec.k, spec.n), np.float32)
    return A, B, rng.standard_normal(spec.n, np.float32)


def numpy_gemm(spec: GemmSpec, A, B, bias):
    y = np.matmul(A.T if spec.ta else A, B.T if spec.tb else B)
    if spec.bias:
        y += bias
    if spec.relu:
        np.maximum(y, 0, out=y)
    return y


def bench(spec: GemmSpec, width: int, target: Target, nthreads: int, repeats: int,
          runner: str):
    """Median seconds of (dlc on nthreads, dlc on 1 thread, numpy), and the others' load."""
    rng = np.random.default_rng(0)
    A, B, bias = operands(spec, rng)
    C = np.empty((spec.m, spec.n), np.float32)
    info, engine = jit(spec, width, target)
    team, solo = Runner(info, engine, nthreads, runner), Runner(info, engine, 1, runner)
    ptrs = (A.ctypes.data, B.ctypes.data, C.ctypes.data, bias.ctypes.data)
    for run in (team, solo):
        C.fill(np.nan)
        run(*ptrs)
        np.testing.assert_allclose(C, numpy_gemm(spec, A, B, bias), rtol=1e-3,
                                   atol=1e-4 * max(spec.k, 1))

    # Bursts of >= ~20 ms. OpenBLAS's threads keep spinning for ~0.1 s after a call and
    # would steal a core from dlc's second thread, so each round starts with a pause and
    # numpy goes last.
    t0 = time.perf_counter()
    solo(*ptrs)
    burst = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
    calls = [lambda: team(*ptrs), lambda: solo(*ptrs), lambda: numpy_gemm(spec, A, B, bias)]
    samples = [[] for _ in calls]
    busy0, mine0, wall0 = *_machine_busy(), time.perf_counter()
    for _ in range(repeats):
        time.sleep(0.15)
        for call, times in zip(calls, samples):
            call()
            t0 = time.perf_counter()
            for _ in range(burst):
                call()
            times.append((time.perf_counter() - t0) / burst)
    busy1, mine1, wall1 = *_machine_busy(), time.perf_counter()
    others = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / ((wall1 - wall0) * os.cpu_count())
    del engine
    return (info, *(float(np.median(t)) for t in samples), others)


def _blas_name() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas['version']}"
    except Exception:                   # older numpy: no dict mode
        return "BLAS"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--width", type=int, default=None,
                    help="vector width (default: the host's; 8 also turns AVX-512 off)")
    ap.add_argument("--runner", choices=("pool", "threads"), default="pool")
    ap.add_argument("--only", default=None, help="run only shapes whose label contains this")
    args = ap.parse_args()

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    target = Target.host()
    width = args.width or target.vector_width
    if width == 8 and target.vector_width == 16:
        target = target.without("avx512")
    print(f"cpu {target.cpu}, vector width {width}, dlc {args.threads} threads "
          f"({args.runner}), numpy {np.__version__} ({_blas_name()}), "
          f"medians of {args.repeats}")
    head = (f"{'shape':18s} {'m':>5s} {'n':>5s} {'k':>5s} {'tile':>6s} {'dlc GF/s':>9s} "
            f"{'dlc 1T':>7s} {'numpy':>7s} {'dlc/numpy':>9s} {'others':>6s}")
    print(head)
    print("-" * len(head))
    for label, spec in SHAPES:
        if args.only and args.only not in label:
            continue
        info, ours, solo, theirs, others = bench(spec, width, target, args.threads,
                                                  args.repeats, args.runner)
        gf = lambda t: spec.flops / t / 1e9  # noqa: E731
        print(f"{label:18s} {spec.m:5d} {spec.n:5d} {spec.k:5d} {info.mr:>2d}x{info.nr:<3d} "
              f"{gf(ours):9.1f} {gf(solo):7.1f} {gf(theirs):7.1f} {theirs / ours:9.2f} "
              f"{100 * others:5.0f}%", flush=True)


if __name__ == "__main__":
    main()
