"""Benchmark: dlc's convolution templates against dlc's own GEMM, in one process.

    python benchmarks/bench_conv.py [--threads N] [--rounds 9] [--only LABEL] [--torch]

Each row is one template (forward, gradient of the input, gradient of the filter) on one
layer shape of the benchmark models, compiled alone (one-op step) and called natively
(no Python between calls, no copies of results). Every program -- the conv kernels and a
512^3 GEMM compiled the same way -- is timed in the same rounds, and each figure is the
median over rounds. In each round every row's block of calls follows a block of the
GEMM's, and `of GEMM` is the median over rounds of the row's FLOP rate over that GEMM
block's: a shared virtual machine's speed changes over seconds (on the twenty-seventh
session's Zen 5 machine everything, the GEMM included, ran at half speed for seconds at
a time), and two blocks 10 ms apart see the same machine where a whole round may not.
A row whose bytes (its inputs and output, each counted once) take longer at the measured
memory bandwidth than its FLOPs at the GEMM rate is memory-bound (`mem`): its ceiling is
the bandwidth, not the GEMM, and `of roofline` is its floor -- bytes / bandwidth, as in
roofline.py -- over its time (`of GEMM` for the others). --quantile 0.1 reports the
fastest tenth of the rounds' times instead of the median (on a loaded machine the
closest to an unshared core; `of GEMM` stays the median of the rounds' ratios). --clock
cpu times by the process's CPU time instead of the wall clock: with --threads 1 on a
machine with more runnable processes than cores, time spent descheduled then does not
count (cache contention from the neighbours still does). With --torch, PyTorch's own
convolution (mkldnn) of the same shape is timed in the same rounds too.
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent.parent))

from dlc import backends  # noqa: E402
from dlc.core import ops  # noqa: E402
from dlc.core.builder import GraphBuilder  # noqa: E402
from dlc.core.graph import Graph  # noqa: E402
from dlc.core.types import DType, TensorType  # noqa: E402
from dlc.pipeline import kernel_program, lower  # noqa: E402
from roofline import bandwidth  # noqa: E402

# label: (N, C, H, W, O, k, stride, pad, kinds)
SHAPES = {
    "cnn.c1 3>32 32x32 k3": (64, 3, 32, 32, 32, 3, 1, 1, "fw"),
    "cnn.c2 32>64 16x16 k3": (64, 32, 16, 16, 64, 3, 1, 1, "fdw"),
    "cnn.c3 64>64 8x8 k3": (64, 64, 8, 8, 64, 3, 1, 1, "fdw"),
    "res.a 16>16 32x32 k3": (64, 16, 32, 32, 16, 3, 1, 1, "fdw"),
    "res.b 16>32 32x32 k3 s2": (64, 16, 32, 32, 32, 3, 2, 1, "fdw"),
    "res.sc 16>32 32x32 k1 s2": (64, 16, 32, 32, 32, 1, 2, 0, "fdw"),
    "res.c 32>32 16x16 k3": (64, 32, 16, 16, 32, 3, 1, 1, "fdw"),
    "1x1 64>64 16x16": (64, 64, 16, 16, 64, 1, 1, 0, "fdw"),
    "lenet.c1 1>6 28x28 k5 p2": (64, 1, 28, 28, 6, 5, 1, 2, "fw"),
    "lenet.c2 6>16 14x14 k5": (64, 6, 14, 14, 16, 5, 1, 0, "fdw"),
    "5x5 32>32 16x16 p2": (64, 32, 16, 16, 32, 5, 1, 2, "fdw"),
    # wide layers: Winograd, F(4x4, 3x3) on 16x16 and F(2x2, 3x3) on 8x8 (conv.py)
    "wide 128>128 16x16 k3": (64, 128, 16, 16, 128, 3, 1, 1, "fdw"),
    "wide 256>256 8x8 k3": (64, 256, 8, 8, 256, 3, 1, 1, "fdw"),
}
KIND = {"f": "forward", "d": "bwd data", "w": "bwd filter"}

CPU = backends.backend("cpu")


def _out(n, k, s, p):
    return (n + 2 * p - k) // s + 1


def graph_for(kind: str, N, C, H, W, O, k, s, p) -> tuple[Graph, dict, float, int]:
    """One-op graph, its feeds, its multiply-add FLOPs, the bytes of its inputs and output."""
    OH, OW = _out(H, k, s, p), _out(W, k, s, p)
    g = Graph("bench")
    b = GraphBuilder(g)
    rng = np.random.default_rng(0)
    f32 = DType.f32
    shapes = {"f": [(N, C, H, W), (O, C, k, k)], "d": [(N, O, OH, OW), (O, C, k, k)],
              "w": [(N, C, H, W), (N, O, OH, OW)]}[kind]
    values, feeds = [], {}
    for i, shape in enumerate(shapes):
        values.append(b.input(f"x{i}", TensorType(f32, shape), "param"))
        feeds[f"x{i}"] = rng.standard_normal(shape).astype(np.float32)
    attrs = {"stride": (s, s), "pad": (p, p)}
    op = {"f": "conv2d", "d": "conv2d_bwd_data", "w": "conv2d_bwd_filter"}[kind]
    if kind == "d":
        attrs["in_hw"] = (H, W)
    if kind == "w":
        attrs["kernel"] = (k, k)
    out = b.emit(ops.OPS[op], tuple(values), **attrs)
    g.outputs["out"] = out.id
    moved = 4 * (sum(int(np.prod(shape)) for shape in shapes) + int(np.prod(out.type.shape)))
    return g, feeds, 2.0 * N * O * C * k * k * OH * OW, moved


def gemm_graph(n: int):
    g = Graph("gemm")
    b = GraphBuilder(g)
    rng = np.random.default_rng(0)
    xs = [b.input(f"x{i}", TensorType(DType.f32, (n, n)), "param") for i in range(2)]
    out = b.emit(ops.OPS["matmul"], tuple(xs), ta=False, tb=False)
    g.outputs["out"] = out.id
    return g, {f"x{i}": rng.standard_normal((n, n)).astype(np.float32) for i in range(2)}, 2.0 * n ** 3


class Native:
    """A compiled one-op step, called without copying its result."""

    def __init__(self, graph, feeds, threads):
        target = CPU.target({"threads": threads})
        compiled = CPU.compile(kernel_program(lower(graph, 1), CPU.templates), target)
        self.step = CPU.load(compiled.blobs, compiled.layout, target)
        self.state = {k: v.copy() for k, v in feeds.items()}
        self.out = self.step.run(self.state, feeds)["out"]  # binds the state arrays
        s = self.step
        if s.pool is not None:
            self.call = lambda: s.pool.run(s._step_addr, ctypes.addressof(s.table), s.threads)
        else:
            self.call = lambda: s._step(ctypes.addressof(s.table), 0, 1)


def torch_fn(kind, N, C, H, W, O, k, s, p):
    import torch
    import torch.nn.functional as F
    x = torch.randn(N, C, H, W)
    w = torch.randn(O, C, k, k)
    y = F.conv2d(x, w, stride=s, padding=p)
    g = torch.randn_like(y)
    if kind == "f":
        return lambda: F.conv2d(x, w, stride=s, padding=p)
    if kind == "d":
        return lambda: torch.nn.grad.conv2d_input(x.shape, w, g, stride=s, padding=p)
    return lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, stride=s, padding=p)


def _loadavg() -> list[str]:
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return ["?"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--seconds", type=float, default=0.01, help="time per program per round")
    ap.add_argument("--quantile", type=float, default=0.5,
                    help="report this quantile of the rounds (0.5: median; a low one, e.g. 0.1, "
                         "filters out rounds slowed by other processes on a loaded machine)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: this process's CPU time (all its threads: use it "
                         "with --threads 1, where nothing else of the process runs)")
    ap.add_argument("--only", default=None, help="rows whose label contains this")
    ap.add_argument("--kinds", default="fdw", help="f (forward), d (bwd data), w (bwd filter)")
    ap.add_argument("--torch", action="store_true", help="also time PyTorch's convolutions")
    args = ap.parse_args()
    if args.torch:
        import torch
        torch.set_num_threads(args.threads)
    progs = {}  # label -> (call, flops)
    moved = {}  # label -> bytes of its inputs and output
    g, feeds, flops = gemm_graph(512)
    progs["GEMM 512^3"] = (Native(g, feeds, args.threads).call, flops)
    rows = []
    for label, (N, C, H, W, O, k, s, p, kinds) in SHAPES.items():
        if args.only and args.only not in label:
            continue
        for kind in kinds:
            if kind not in args.kinds:
                continue
            name = f"{label} {KIND[kind]}"
            g, feeds, flops, moved[name] = graph_for(kind, N, C, H, W, O, k, s, p)
            progs[name] = (Native(g, feeds, args.threads).call, flops)
            if args.torch:
                progs[name + " [torch]"] = (torch_fn(kind, N, C, H, W, O, k, s, p), flops)
            rows.append(name)
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    def block(fn) -> float:
        """The mean time of a call over a block of calls lasting args.seconds."""
        start, calls = clock(), 0
        while True:
            fn()
            calls += 1
            spent = clock() - start
            if spent >= args.seconds and calls >= 2:
                return spent / calls

    def at_quantile(values):
        return sorted(values)[min(len(values) - 1, int(args.quantile * len(values)))]

    gemm, gemm_flops = progs.pop("GEMM 512^3")
    times = {name: [] for name in progs}
    of_gemm = {name: [] for name in rows}  # per round: the row's rate over its GEMM block's
    gemm_times = []
    for fn, _ in progs.values():
        fn()
    for _ in range(args.rounds):
        for name, (fn, flops) in progs.items():
            if name in of_gemm:
                gemm_times.append(block(gemm))
                times[name].append(block(fn))
                of_gemm[name].append(flops / times[name][-1] / (gemm_flops / gemm_times[-1]))
            else:
                times[name].append(block(fn))
    med = {name: at_quantile(t) for name, t in times.items()}
    gemm_time = at_quantile(gemm_times)
    gemm_rate = gemm_flops / gemm_time
    bytes_rate = bandwidth(args.threads)
    print(f"threads {args.threads}; {args.clock} clock; load average {' '.join(_loadavg())}")
    print(f"GEMM 512^3 {gemm_time * 1e3:.3f} ms = {gemm_rate / 1e9:.1f} GFLOP/s; "
          f"memory bandwidth {bytes_rate / 1e9:.1f} GB/s")
    print(f"{'workload':<40} {'ms':>9} {'GFLOP/s':>8} {'of GEMM':>8} {'bound':>6} {'of roofline':>12}"
          + ("   torch ms  dlc/torch" if args.torch else ""))
    for name in rows:
        rate, share = progs[name][1] / med[name], float(np.median(of_gemm[name]))
        compute, memory = progs[name][1] / gemm_rate, moved[name] / bytes_rate
        line = (f"{name:<40} {med[name] * 1e3:9.3f} {rate / 1e9:8.1f} {share:8.0%} "
                f"{'mem' if memory > compute else 'FLOPs':>6} "
                f"{memory / med[name] if memory > compute else share:12.0%}")
        if args.torch:
            line += f"   {med[name + ' [torch]'] * 1e3:8.3f}  {med[name] / med[name + ' [torch]']:8.2f}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
