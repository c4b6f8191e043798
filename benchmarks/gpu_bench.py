"""dlc on an NVIDIA GPU beside PyTorch CUDA (eager, and the same step captured as a CUDA
graph) and cuBLAS, in one process.

    python benchmarks/gpu_bench.py [--out FILE] [--quick]
    python benchmarks/gpu_bench.py --dry     # no GPU: compile every dlc step (NVRTC) and stop
    python benchmarks/gpu_bench.py --prepare # compile every dlc step into the compile cache
                                             # (DLC_CACHE_DIR), e.g. while other checks run
    python benchmarks/gpu_bench.py --profile # where each workload's step spends its GPU time:
                                             # the kernels one by one between CUDA events
    python benchmarks/gpu_bench.py --tiles   # the SGEMM template at 4096^3 with each candidate
                                             # tile (for pick_tile), against cuBLAS

Workloads (models/*.dln, the same as run.py's CPU benchmark):
  mlp_b128, mlp_b1   MLP 784-512-256-10, SGD with momentum, batch 128 and 1
  lenet_b64          LeNet-5 on 1x28x28, Adam, batch 64
  lstm_b32           LSTM T=32, input 64, hidden 128, Adam, batch 32
  transformer_b32    a transformer encoder block (4 heads, T=64), Adam, batch 32 (PyTorch:
                     nn.TransformerEncoderLayer)
  mobilenet_b64      a 3x3 convolution and three depthwise-separable blocks on 3x32x32, SGD
                     with momentum, batch 64 (PyTorch: Conv2d with groups=)
  sgemm_4096         4096 x 4096 @ 4096 x 4096 in float32: dlc's matmul kernel (its CUDA-event
                     time in a profiled step) against cupy.matmul (cuBLAS, TF32 off)

A training-step figure is the median over repeats of (time of N steps, then a device
synchronize) / N: dlc's steps as its trainer runs them (submitted, results read behind),
PyTorch's with no .item() per step. `dlc_sync_ms` is dlc's Session.train_step, which
reads the loss after every step. Compare ratios within one run only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import dlc  # noqa: E402

WORKLOADS = [  # name, model file, torch kind (run.py's torch_models), batch, steps per timing
    ("mlp_b128", "mlp784.dln", "mlp", 128, 200),
    ("mlp_b1", "mlp784.dln", "mlp", 1, 300),
    ("lenet_b64", "lenet28.dln", "lenet", 64, 100),
    ("lstm_b32", "lstm32.dln", "lstm", 32, 50),
    ("transformer_b32", "transformer.dln", "transformer", 32, 50),
    ("mobilenet_b64", "mobilenet.dln", "mobilenet", 64, 50),
]
GEMM_N = 4096


def median_time(run_block, steps: int, repeats: int) -> float:
    """Median over repeats of the seconds per step of run_block(steps) (which synchronizes)."""
    run_block(max(2, steps // 10))  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_block(steps)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def _inputs(m, batch: int):
    name, t = m.input_types[0]
    rng = np.random.default_rng(0)
    x = rng.random((batch,) + tuple(int(d) for d in t.shape[1:]), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    return x, y


# --- dlc -------------------------------------------------------------------------------------------

def dlc_session(file: str, batch: int, cache: str | None):
    m = dlc.load(HERE / "models" / file)
    session = m.session(m.train_config, "cuda", cache_dir=cache)
    x, y = _inputs(m, batch)
    return session, x, y


def dlc_pipelined(session, x, y):
    """N steps as fit runs them: submitted, results read behind, all read at the end."""
    def block(n):
        ran = [session.submit(x, y, 0.01) for _ in range(n)]
        for p in ran:
            session.collect(p)
    return block


def dlc_synced(session, x, y):
    def block(n):
        for _ in range(n):
            session.train_step(x, y, 0.01)
    return block


def dlc_gemm_program(cache: str | None, n: int):
    """The evaluation step of models/gemm.dln at N = n, profiled (kernel times by CUDA events)."""
    from dlc.pipeline import step_graph
    from dlc.program import make_program
    src = (HERE / "models" / "gemm.dln").read_text().replace("[N,", f"[{n},").replace("N]", f"{n}]")
    m = dlc.load(src)
    graph = m.built("eval").graph.copy()
    graph.outputs = {"output": graph.outputs["output"]}
    graph.remove_unused(keep_inputs=False)
    return make_program("cuda", step_graph(graph, None), dict(m.state), data_name="x",
                        options={"profile": True, "cache_dir": cache})


def dlc_gemm_kernel_seconds(cache: str | None, n: int) -> float:
    """The matmul kernel's time per call (CUDA events in a profiled evaluation step)."""
    program = dlc_gemm_program(cache, n)
    x = np.random.default_rng(0).random((n, n), dtype=np.float32)
    for _ in range(5):
        np.asarray(program.run({"x": x})["output"])
    rows = [r for r in program.profile_rows() if "matmul" in r[0]]
    return sum(sec for _, _, sec in rows) / program.calls


# --- torch -------------------------------------------------------------------------------------------

def torch_step(kind: str, batch: int, graph: bool):
    import torch
    sys.path.insert(0, str(HERE))
    from run import torch_models
    make, shape, opt = torch_models()[kind]
    model = make().cuda()
    params = list(model.parameters())
    optimizer = opt(params)
    if graph and isinstance(optimizer, torch.optim.Adam):
        optimizer = torch.optim.Adam(params, lr=1e-3, capturable=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.rand((batch,) + shape, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    if not graph:
        def block(n):
            for _ in range(n):
                step()
            torch.cuda.synchronize()
        return block
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    def replay(n):
        for _ in range(n):
            g.replay()
        torch.cuda.synchronize()
    return replay


def event_seconds(launch, runs: int = 10) -> float:
    """Seconds per call of launch() on the GPU: CUDA events around `runs` calls, after 3."""
    import cupy
    for _ in range(3):
        launch()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(runs):
        launch()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3 / runs


def cublas_gemm_seconds(n: int) -> float:
    import cupy
    a = cupy.random.random((n, n), dtype=cupy.float32)
    b = cupy.random.random((n, n), dtype=cupy.float32)
    return event_seconds(lambda: cupy.matmul(a, b))


# --- the run -------------------------------------------------------------------------------------------

def dry(cache: str) -> int:
    """Without a GPU: compile every benchmark step for sm_90 (NVRTC) and report spills."""
    from dlc import backends
    from dlc.pipeline import kernel_program, lower
    cuda = backends.backend("cuda", runnable=False)
    target = cuda.target({"arch": "sm_90"})
    for name, file, _, batch, _ in WORKLOADS:
        m = dlc.load(HERE / "models" / file)
        program = kernel_program(lower(m.compile_graph("train", m.train_config), batch), cuda.templates)
        compiled = cuda.compile(program, target)
        spills = [n for n in compiled.notes if " 0 B spill stores, 0 B spill loads" not in n and "registers" in n]
        print(f"{name}: {len(compiled.layout.kernels)} launches, spills: {spills or 'none'}")
    return 0


def prepare() -> int:
    """Compile every dlc step the benchmark runs into the compile cache (a GPU is needed
    for the target; the timed run then only loads them)."""
    for name, file, _, batch, _ in WORKLOADS:
        session, _, _ = dlc_session(file, batch, None)
        session.train_program.compiled(batch)
        print(f"compiled {name}", flush=True)
    dlc_gemm_program(None, GEMM_N).compiled(GEMM_N)
    print(f"compiled sgemm_{GEMM_N}")
    return 0


def profile(steps: int = 20) -> int:
    """Each workload's kernels timed one by one (CUDA events, no graph): the top rows."""
    for name, file, _, batch, _ in WORKLOADS:
        m = dlc.load(HERE / "models" / file)
        session = m.session(m.train_config, "cuda", profile=True)
        x, y = _inputs(m, batch)
        for _ in range(steps):
            session.train_step(x, y, 0.01)
        print(f"== {name}\n{session.profile_report(top=8)}", flush=True)
    return 0


TILE_CANDIDATES = {  # name -> templates.Tile(bm, bn, bk, tm, tn)
    "128x128x8 (TILE_128)": (128, 128, 8, 8, 8),
    "128x128x16": (128, 128, 16, 8, 8),
    "256x128x8": (256, 128, 8, 8, 8),
    "128x64x8 (TILE_128x64)": (128, 64, 8, 8, 4),
    "64x64x8 (TILE_64)": (64, 64, 8, 4, 4),
}


def tiles(n: int = GEMM_N) -> int:
    """The SGEMM template at n^3 with each candidate tile: TFLOP/s (CUDA events, the mean
    of 10 launches after 3), checked against cuBLAS."""
    import cupy
    from dlc.backends.cuda import nvrtc, templates as T
    arch = nvrtc.arch_for(int(cupy.cuda.Device().compute_capability))
    a = cupy.random.random((n, n), dtype=cupy.float32)
    b = cupy.random.random((n, n), dtype=cupy.float32)
    want = cupy.matmul(a, b)
    print(f"cuBLAS: {2 * n ** 3 / cublas_gemm_seconds(n) / 1e12:.1f} TFLOP/s")
    for label, shape in TILE_CANDIDATES.items():
        kernel = T.matmul("mm", n, n, n, a="A", b="B", out="C", tile=T.Tile(*shape))
        module = cupy.cuda.function.Module()
        module.load(nvrtc.compile_cuda(kernel.source, arch).binary)
        fn, c = module.get_function("mm"), cupy.empty((n, n), cupy.float32)
        seconds = event_seconds(lambda: fn(kernel.grid, kernel.block, (a, b, c)))
        error = float(cupy.abs(c - want).max() / cupy.abs(want).max())
        print(f"  {label:<22}{2 * n ** 3 / seconds / 1e12:6.1f} TFLOP/s  (max error {error:.1e} of the largest)",
              flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "gpu_results.json"))
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    ap.add_argument("--dry", action="store_true", help="compile only (no GPU needed)")
    ap.add_argument("--prepare", action="store_true", help="fill the compile cache and stop")
    ap.add_argument("--profile", action="store_true", help="each workload's kernel times, and stop")
    ap.add_argument("--tiles", action="store_true", help="the SGEMM template's candidate tiles, and stop")
    args = ap.parse_args()
    if args.profile:
        return profile()
    if args.tiles:
        return tiles()
    if args.dry:
        return dry(tempfile.mkdtemp(prefix="dlc-gpu-bench-"))
    if args.prepare:
        return prepare()
    cache = None  # the compile cache (DLC_CACHE_DIR): --prepare may have filled it
    import cupy
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    repeats, scale = (3, 0.3) if args.quick else (5, 1.0)
    props = cupy.cuda.runtime.getDeviceProperties(0)
    info = {"gpu": props["name"].decode(), "torch": torch.__version__, "cupy": cupy.__version__, "dlc": dlc.__version__}
    print(f"dlc {info['dlc']} on {info['gpu']}; torch {info['torch']}; cupy {info['cupy']}")
    rows = []
    for name, file, kind, batch, steps in WORKLOADS:
        steps = max(5, int(steps * scale))
        row = {"workload": name}
        try:
            session, x, y = dlc_session(file, batch, cache)
            row["dlc_ms"] = 1e3 * median_time(dlc_pipelined(session, x, y), steps, repeats)
            row["dlc_sync_ms"] = 1e3 * median_time(dlc_synced(session, x, y), steps, repeats)
        except Exception as e:  # report and go on: one failure must not hide the rest
            row["dlc_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for label, graph in (("torch_eager_ms", False), ("torch_graph_ms", True)):
            try:
                row[label] = 1e3 * median_time(torch_step(kind, batch, graph), steps, repeats)
            except Exception as e:
                row[label.replace("_ms", "_error")] = f"{type(e).__name__}: {str(e)[:300]}"
        for peer in ("torch_eager_ms", "torch_graph_ms"):
            if "dlc_ms" in row and peer in row:
                row[f"dlc/{peer[:-3]}"] = row["dlc_ms"] / row[peer]
        rows.append(row)
        print("  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    row = {"workload": f"sgemm_{GEMM_N}"}
    try:
        row["dlc_kernel_ms"] = 1e3 * dlc_gemm_kernel_seconds(cache, GEMM_N)
    except Exception as e:
        row["dlc_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    row["cublas_ms"] = 1e3 * cublas_gemm_seconds(GEMM_N)
    flops = 2 * GEMM_N ** 3
    for k in ("dlc_kernel_ms", "cublas_ms"):
        if k in row:
            row[k.replace("_ms", "_tflops")] = flops / (row[k] / 1e3) / 1e12
    rows.append(row)
    print("  " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
