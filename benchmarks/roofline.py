"""How far a training step is from this machine's roofline, kernel by kernel.

The machine's two ceilings are measured in the same run: dlc's own GEMM rate (multiply-
adds per second of a 1024^3 product, the rate the convolution and matmul templates aim
for) and the memory bandwidth (a STREAM-style copy of 256 MiB per core with numpy, every
core at once: bytes read + bytes written per second). The step is profiled (each kernel's
time, from the cycle counter) and each kernel's floor is

    max(multiply-adds / GEMM rate, bytes touched / bandwidth)

with `bytes touched` every buffer the kernel reads or writes counted once (a lower bound:
a kernel that rereads a buffer from memory moves more). A step's roofline is the sum of
its kernels' floors; `of roofline` is that over the measured kernel time. GEMM-like
kernels (matmul and convolution templates) are reported as their multiply-add rate over
the GEMM rate, the others (elementwise, reductions, pooling, optimizer updates) as their
bytes per second over the bandwidth.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

import dlc
from dlc.core.kernel import Loop, bytes_touched, multiply_adds
from dlc.pipeline import kernel_program, lower


def bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second (read + written) of `threads` concurrent numpy copies of `mib` MiB
    each; the best of `repeats`."""
    n = mib * (1 << 20) // 4
    pairs = [(np.ones(n, np.float32), np.empty(n, np.float32)) for _ in range(threads)]
    best = 0.0
    for _ in range(repeats):
        go = threading.Barrier(threads + 1)

        def copy(src, dst):
            go.wait()
            np.copyto(dst, src)
        workers = [threading.Thread(target=copy, args=pair) for pair in pairs]
        for w in workers:
            w.start()
        go.wait()
        start = time.perf_counter()
        for w in workers:
            w.join()
        best = max(best, 2 * 4 * n * threads / (time.perf_counter() - start))
    return best


def kernel_work(session, batch: int) -> dict[str, tuple[int, int]]:
    """{kernel name: (multiply-adds, bytes touched)} per training step (kernels in a loop
    body count once per iteration)."""
    program = session.train_program.program
    lowered = lower(program.graph("train"), batch, overlap=program.overlap)
    work: dict[str, tuple[int, int]] = {}

    def walk(entries, times: int):
        for k in entries:
            if isinstance(k, Loop):
                walk(k.body, times * k.var.extent)
                continue
            macs = sum(multiply_adds(p) for p in k.parts)
            moved = sum(bytes_touched(p) for p in k.parts)
            work[k.name] = (macs * times, moved * times)
    walk(kernel_program(lowered, program.templates).kernels, 1)
    return work


def profile(path: Path, batch: int, threads: int | None, steps: int) -> dict:
    """One workload against the ceilings: kernel seconds per step by kind."""
    m = dlc.load(path)
    session = m.session(m.train_config, "cpu", threads=threads, profile=True)
    name, t = m.input_types[0]
    rng = np.random.default_rng(0)
    x = rng.random((batch,) + tuple(int(d) for d in t.shape[1:]), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    for _ in range(3):
        session.train_step(x, y, 0.01)  # compiled, warm (these calls are profiled too)
    calls0 = session.train_program.calls
    before = {k: s for k, _, s in session.train_program.profile_rows()}
    for _ in range(steps):
        session.train_step(x, y, 0.01)
    calls = session.train_program.calls - calls0
    seconds = {k: (s - before.get(k, 0.0)) / calls for k, _, s in session.train_program.profile_rows()}
    return {"seconds": seconds, "work": kernel_work(session, batch)}


def report(label: str, measured: dict, gemm_rate: float, bytes_rate: float) -> dict:
    """Per step: kernel time, the GEMM-like kernels' share and rate, the others' bandwidth
    share, and the roofline over the measured time."""
    gemm_s = gemm_macs = other_s = other_bytes = floor = 0.0
    for name, sec in measured["seconds"].items():
        macs, moved = measured["work"].get(name, (0, 0))
        floor += max(macs / gemm_rate, moved / bytes_rate)
        if macs:
            gemm_s, gemm_macs = gemm_s + sec, gemm_macs + macs
        else:
            other_s, other_bytes = other_s + sec, other_bytes + moved
    total = gemm_s + other_s
    row = {"workload": label, "kernel_ms": total * 1e3, "gemm_like_ms": gemm_s * 1e3,
           "gemm_like_of_gemm_rate": gemm_macs / gemm_s / gemm_rate if gemm_s else None,
           "other_ms": other_s * 1e3, "other_of_bandwidth": other_bytes / other_s / bytes_rate if other_s else None,
           "roofline_ms": floor * 1e3, "of_roofline": floor / total if total else None}
    gemm_part = (f"GEMM-like {row['gemm_like_ms']:7.3f} ms at {row['gemm_like_of_gemm_rate']:4.0%} of the GEMM rate"
                 if gemm_s else "no GEMM-like kernels" + " " * 21)
    other_part = (f"other {row['other_ms']:7.3f} ms at {row['other_of_bandwidth']:4.0%} of bandwidth"
                  if other_s else "")
    print(f"  {label:<16} kernels {row['kernel_ms']:8.3f} ms: {gemm_part}; {other_part}; "
          f"roofline {row['roofline_ms']:7.3f} ms ({row['of_roofline']:.0%} of it)")
    return row
