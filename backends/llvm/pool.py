"""The process-wide worker pool that runs compiled steps on every core.

Workers are native threads started once with pthread_create; they never touch Python.
A job is (step function, pointer table, thread count): `dlc_pool_run` publishes it by
bumping a generation counter, runs tid 0 itself, and returns when the step's final
barrier has been passed by everyone. Between jobs a worker spins for about
YIELD_CYCLES (training steps follow each other within tens of microseconds), yields
its core to other runnable threads until SPIN_CYCLES, then sleeps on a futex, so an
idle process burns no CPU and a busy machine gets its cores back quickly. The caller
waiting for the workers to finish yields too after a short spin. The module is textual
LLVM IR because the worker calls the step through a function pointer; its object code
is compiled once per machine and kept in the compile cache.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading

import numpy as np

from .jit import Engine, compile_ir_text
from .target import Target

YIELD_CYCLES = 60_000    # about 30 microseconds of spinning, then yielding the core
SPIN_CYCLES = 400_000    # about 0.2 ms in all before sleeping
# Linux futex syscall numbers; elsewhere workers sleep with sched_yield only.
_FUTEX = {"x86_64": 202, "aarch64": 98}

# pool layout: i32 generation at byte 0 (the futex word), step fn at 64, table at 72,
# i64 nthreads at 80, i64 quit at 88, i32 sleepers at 128, i32 finished at 192 (each on
# its own cache line). dlc_pool_run returns only when every worker has left the step
# function, so its code may be freed as soon as the call returns.
_POOL_IR = r"""
declare i64 @syscall(i64, ...)
declare i32 @sched_yield()
declare i64 @llvm.readcyclecounter()
{pause_decl}

define internal void @relax() {{
  {pause_call}
  ret void
}}

define internal void @sleep_until_changed(ptr %pool, i32 %seen) {{
entry:
  %sleepers = getelementptr i8, ptr %pool, i64 128
  %0 = atomicrmw add ptr %sleepers, i32 1 seq_cst
  {sleep}
  %1 = atomicrmw sub ptr %sleepers, i32 1 seq_cst
  ret void
}}

define ptr @dlc_pool_worker(ptr %arg) {{
entry:
  %pool = load ptr, ptr %arg
  %tidp = getelementptr i64, ptr %arg, i64 1
  %tid64 = load i64, ptr %tidp
  %tid = trunc i64 %tid64 to i32
  %fnp = getelementptr i8, ptr %pool, i64 64
  %tablep = getelementptr i8, ptr %pool, i64 72
  %np = getelementptr i8, ptr %pool, i64 80
  %quitp = getelementptr i8, ptr %pool, i64 88
  br label %wait

wait:
  %seen = phi i32 [ 0, %entry ], [ %g, %job ], [ %g, %skip ]
  %t0 = call i64 @llvm.readcyclecounter()
  br label %spin

spin:
  %g = load atomic i32, ptr %pool acquire, align 4
  %new = icmp ne i32 %g, %seen
  br i1 %new, label %got, label %idle

idle:
  call void @relax()
  %t = call i64 @llvm.readcyclecounter()
  %dt = sub i64 %t, %t0
  %long = icmp ugt i64 %dt, {spin_cycles}
  br i1 %long, label %sleep, label %maybe_yield

maybe_yield:
  %yield = icmp ugt i64 %dt, {yield_cycles}
  br i1 %yield, label %do_yield, label %spin

do_yield:
  %y = call i32 @sched_yield()
  br label %spin

sleep:
  call void @sleep_until_changed(ptr %pool, i32 %seen)
  br label %spin

got:
  %quit = load atomic i64, ptr %quitp acquire, align 8
  %stop = icmp ne i64 %quit, 0
  br i1 %stop, label %exit, label %check

check:
  %n64 = load i64, ptr %np
  %n = trunc i64 %n64 to i32
  %mine = icmp slt i32 %tid, %n
  br i1 %mine, label %job, label %skip

job:
  %fn = load ptr, ptr %fnp
  %table = load ptr, ptr %tablep
  call void %fn(ptr %table, i32 %tid, i32 %n)
  %finished = getelementptr i8, ptr %pool, i64 192
  %2 = atomicrmw add ptr %finished, i32 1 release
  br label %wait

skip:
  br label %wait

exit:
  ret ptr null
}}

define void @dlc_pool_run(ptr %pool, ptr %fn, ptr %table, i32 %n) {{
entry:
  %fnp = getelementptr i8, ptr %pool, i64 64
  %tablep = getelementptr i8, ptr %pool, i64 72
  %np = getelementptr i8, ptr %pool, i64 80
  store ptr %fn, ptr %fnp
  store ptr %table, ptr %tablep
  %n64 = sext i32 %n to i64
  store i64 %n64, ptr %np
  %finished = getelementptr i8, ptr %pool, i64 192
  store i32 0, ptr %finished
  %0 = atomicrmw add ptr %pool, i32 1 seq_cst
  %sleepers = getelementptr i8, ptr %pool, i64 128
  %s = load atomic i32, ptr %sleepers seq_cst, align 4
  %any = icmp ne i32 %s, 0
  br i1 %any, label %wake, label %run

wake:
  {wake}
  br label %run

run:
  call void %fn(ptr %table, i32 0, i32 %n)
  %others = sub i32 %n, 1
  br label %join

join:
  %k = phi i32 [ 0, %run ], [ %k1, %relax_join ], [ %k1, %yield_join ]
  %f = load atomic i32, ptr %finished acquire, align 4
  %all = icmp sge i32 %f, %others
  br i1 %all, label %done, label %relax_join

relax_join:
  call void @relax()
  %k1 = add i32 %k, 1
  %patient = icmp ult i32 %k, 2000
  br i1 %patient, label %join, label %yield_join

yield_join:
  %y = call i32 @sched_yield()
  br label %join

done:
  ret void
}}
"""


def _module_text(triple: str) -> str:
    arch = platform.machine()
    x86 = arch in ("x86_64", "AMD64")
    futex = _FUTEX.get(arch) if platform.system() == "Linux" else None
    if futex:
        sleep = f"%r = call i64 (i64, ...) @syscall(i64 {futex}, ptr %pool, i32 128, i32 %seen, ptr null)"
        wake = f"%w = call i64 (i64, ...) @syscall(i64 {futex}, ptr %pool, i32 129, i32 2147483647, ptr null)"
    else:
        sleep, wake = "%r = call i32 @sched_yield()", "%w = add i32 0, 0"
    return f'target triple = "{triple}"\n' + _POOL_IR.format(
        pause_decl="declare void @llvm.x86.sse2.pause()" if x86 else "",
        pause_call="call void @llvm.x86.sse2.pause()" if x86 else "",
        sleep=sleep, wake=wake, spin_cycles=SPIN_CYCLES, yield_cycles=YIELD_CYCLES)


def pool_object(target: Target, cache=None) -> bytes:
    """The pool module's object code: from the cache, or compiled (and cached)."""
    import hashlib
    import llvmlite
    text = _module_text(target.triple)
    key = hashlib.sha256("\0".join(["dlc worker pool", text, target.key(), llvmlite.__version__]).encode()).hexdigest()
    hit = cache.get(key) if cache is not None else None
    if hit is not None and len(hit[0]) == 1:
        return hit[0][0]
    obj = compile_ir_text(text, target)
    if cache is not None:
        cache.put(key, [obj], "{}")
    return obj


class Pool:
    """Worker threads 1..size-1; `run(fn, table, n)` runs a step on n <= size threads."""

    _pools: dict[int, "Pool"] = {}
    _lock = threading.Lock()

    @classmethod
    def get(cls, threads: int, cache=None) -> "Pool":
        """The process's pool of `threads` threads; `cache` (get/put, the driver's compile
        cache) keeps the pool's object code between processes."""
        with cls._lock:
            pool = cls._pools.get(threads)
            if pool is None:
                pool = cls._pools[threads] = Pool(threads, cache)
            return pool

    def __init__(self, size: int, cache=None):
        target = Target.host(1)
        self.engine = Engine(pool_object(target, cache), target)
        self.state = np.zeros(64, dtype=np.int64)        # 512 bytes; 256 used, 64-byte aligned
        self.base = self.state.ctypes.data + (-self.state.ctypes.data) % 64
        self.size = size
        self.args = np.zeros((max(size - 1, 1), 2), dtype=np.int64)
        self._run = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_int32)(self.engine.address("dlc_pool_run"))
        lib = ctypes.CDLL(ctypes.util.find_library("c"))
        if not hasattr(lib, "pthread_create"):
            lib = ctypes.CDLL(ctypes.util.find_library("pthread"))
        lib.pthread_create.argtypes = [ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_void_p]
        worker = self.engine.address("dlc_pool_worker")
        self.threads = []
        for i in range(size - 1):
            self.args[i] = (self.base, i + 1)
            handle = ctypes.c_ulong()
            if lib.pthread_create(ctypes.byref(handle), None, worker, self.args[i].ctypes.data):
                raise OSError("pthread_create failed")
            self.threads.append(handle.value)
        # the workers live as long as the process (they sleep when idle)

    def run(self, fn: int, table: int, n: int) -> None:
        self._run(self.base, fn, table, n)
