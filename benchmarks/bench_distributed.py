"""Data-parallel scaling on this machine: N ranks x T threads against one process.

    python benchmarks/bench_distributed.py [--rounds 5] [--steps 40] [--out results_distributed.json]

For the MLP (784-512-256-10, SGD momentum, global batch 128) and LeNet-5 (Adam, global
batch 64), each configuration trains in its own process(es), started afresh every round
and interleaved with the others (A, B, C, A, B, C, ...), so a slow minute on this shared
machine hits every configuration alike; each figure is the median over rounds of the
median step time over blocks of steps. Configurations:

  1x2           one process, two threads (the default on a 2-core machine)
  1x1           one process, one thread
  2x1           two ranks (mpiexec), one thread each, the default schedule: gradients in
                buckets of 1 MiB, each bucket's exchange started (thread 0 calling the
                host) in the phase where it is ready and waited for only before its first
                reader (the updates, which run after the last start)
  2x1 sync      the same buckets, each exchanged at once where it is ready, the step
                going on when the exchange is done
  2x1 one bucket  every gradient in one exchange, at the end of the backward pass

`comm` is the share of rank 0's step spent in the exchanges (waiting for the other rank
included). Needs mpi4py and mpich (pip install 'dlc[mpi]').

    python benchmarks/bench_distributed.py --ab [--blocks 40]

compares the 2x1 schedules more finely: one 2-rank job holds the three compiled steps
and alternates blocks of steps between them, so all see the same minute of a shared
machine; it prints the medians and the median of the paired ratios to the default.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

MODELS = {"mlp": (HERE / "models" / "mlp784.dln", 128), "lenet": (HERE / "models" / "lenet28.dln", 64)}
CONFIGS = {"1x2": (1, 2, {}), "1x1": (1, 1, {}),
           "2x1": (2, 1, {}),  # the default: 1 MiB buckets, overlapped exchanges
           "2x1 sync": (2, 1, {"overlap": False}),
           "2x1 one bucket": (2, 1, {"overlap": False, "bucket_bytes": 64 << 20})}
AB = ("2x1", "2x1 sync", "2x1 one bucket")


def worker(model: str, threads: int, steps: int, blocks: int, options: dict) -> None:
    """One configuration's run (every rank runs this); rank 0 prints a JSON line."""
    import dlc
    from dlc.runtime.distributed import world_from_env
    path, batch = MODELS[model]
    world = world_from_env()
    m = dlc.load(path)
    session = m.session(m.train_config, "cpu", world, threads=threads, **options)
    t = m.input_types[0][1]
    rng = np.random.default_rng(0)
    x = rng.random((batch,) + tuple(int(d) for d in t.shape[1:]), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    for _ in range(3):
        session.train_step(x, y, 0.01)  # compile (or load from the cache) and warm up
    times, comm = [], []
    for _ in range(blocks):
        c0 = world.comm_seconds if world else 0.0
        start = time.perf_counter()
        for _ in range(steps):
            session.train_step(x, y, 0.01)
        times.append((time.perf_counter() - start) / steps)
        comm.append(((world.comm_seconds if world else 0.0) - c0) / steps)
    if world is None or world.lead:
        print(json.dumps({"step": statistics.median(times), "comm": statistics.median(comm)}), flush=True)
    if world is not None:
        world.end(0)


def ab_worker(model: str, steps: int, blocks: int) -> None:
    """Both 2x1 schedules in one job, blocks of steps alternating between them."""
    import dlc
    from dlc.runtime.distributed import world_from_env
    path, batch = MODELS[model]
    world = world_from_env()
    sessions = {}
    for name in AB:
        m = dlc.load(path)
        sessions[name] = m.session(m.train_config, "cpu", world, threads=1, **CONFIGS[name][2])
    t = m.input_types[0][1]
    rng = np.random.default_rng(0)
    x = rng.random((batch,) + tuple(int(d) for d in t.shape[1:]), dtype=np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    for s in sessions.values():
        for _ in range(3):
            s.train_step(x, y, 0.01)
    times: dict = {name: [] for name in sessions}
    comm: dict = {name: [] for name in sessions}
    for _ in range(blocks):
        for name, s in sessions.items():
            c0, start = world.comm_seconds, time.perf_counter()
            for _ in range(steps):
                s.train_step(x, y, 0.01)
            times[name].append((time.perf_counter() - start) / steps)
            comm[name].append((world.comm_seconds - c0) / steps)
    if world.lead:
        print(json.dumps({"times": times, "comm": comm}), flush=True)
    world.end(0)


def ab(models, steps: int, blocks: int) -> None:
    from dlc.runtime.distributed import find_mpiexec
    print(f"{'model':<7}{'config':<16}{'ms/step':>9}{'vs 2x1':>8}{'comm':>7}")
    for model in models:
        cmd = [find_mpiexec(), "-n", "2", sys.executable, __file__, "--ab-worker", model, "--steps", str(steps),
               "--blocks", str(blocks)]
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        base = out["times"]["2x1"]
        for name in AB:
            t = out["times"][name]
            ratio = statistics.median(y / x for x, y in zip(base, t))
            share = statistics.median(c / s for c, s in zip(out["comm"][name], t))
            print(f"{model:<7}{name:<16}{statistics.median(t) * 1e3:>9.3f}{ratio:>8.3f}{share:>7.0%}")


def run_config(model: str, config: str, steps: int, blocks: int) -> dict:
    ranks, threads, options = CONFIGS[config]
    cmd = [sys.executable, __file__, "--worker", model, "--threads", str(threads), "--steps", str(steps),
           "--blocks", str(blocks), "--options", json.dumps(options)]
    if ranks > 1:
        from dlc.runtime.distributed import find_mpiexec
        cmd = [find_mpiexec(), "-n", str(ranks)] + cmd
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="steps per timed block")
    ap.add_argument("--blocks", type=int, default=5, help="timed blocks per run")
    ap.add_argument("--models", default="mlp,lenet")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--out", default=str(HERE / "results_distributed.json"))
    ap.add_argument("--ab", action="store_true", help="compare the two 2-rank schedules in one job")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ab-worker", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.threads, args.steps, args.blocks, json.loads(args.options))
        return
    if args.ab_worker:
        ab_worker(args.ab_worker, args.steps, args.blocks)
        return
    if args.ab:
        ab(args.models.split(","), args.steps, args.blocks)
        return
    models, configs = args.models.split(","), args.configs.split(",")
    runs: dict = {(m, c): [] for m in models for c in configs}
    for r in range(args.rounds):
        for m in models:
            for c in configs:
                runs[(m, c)].append(run_config(m, c, args.steps, args.blocks))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    results = {}
    print(f"{'model':<7}{'config':<16}{'ms/step':>9}{'comm':>8}{'vs 1x2':>9}   ms/step per round")
    for m in models:
        base = statistics.median(x["step"] for x in runs[(m, "1x2")]) if "1x2" in configs else None
        for c in configs:
            step = statistics.median(x["step"] for x in runs[(m, c)])
            comm = statistics.median(x["comm"] / x["step"] for x in runs[(m, c)])
            spread = ", ".join(f"{x['step'] * 1e3:.2f}" for x in runs[(m, c)])
            ratio = f"{base / step:8.2f}x" if base else ""
            print(f"{m:<7}{c:<16}{step * 1e3:>9.3f}{comm:>8.0%}{ratio:>9}   [{spread}]")
            results[f"{m} {c}"] = {"ms_per_step": step * 1e3, "comm_share": comm,
                                   "rounds_ms": [x["step"] * 1e3 for x in runs[(m, c)]]}
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
