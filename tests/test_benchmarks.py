"""The benchmark scripts run: a smoke test of their command lines, never their timings."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_conv_prints_each_row_against_its_paired_gemm_blocks():
    """One layer's forward and data gradient, two rounds: the GEMM's line, then a row per
    template with its time, rate, share of the GEMM rate, bound and roofline share."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_conv.py"), "--only", "lenet.c2",
                          "--kinds", "fd", "--rounds", "2", "--seconds", "0.001"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert re.search(r"^GEMM 512\^3 [\d.]+ ms = [\d.]+ GFLOP/s; memory bandwidth [\d.]+ GB/s$", out, re.M)
    rows = re.findall(r"^lenet\.c2 6>16 14x14 k5 (forward|bwd data) +[\d.]+ +[\d.]+ +\d+% +(FLOPs|mem) +\d+%$",
                      out, re.M)
    assert [kind for kind, _ in rows] == ["forward", "bwd data"]


def test_run_says_how_much_cpu_time_the_host_took_in_each_section(tmp_path, monkeypatch):
    """benchmarks/run.py ends each section with the host's share of the CPU time while it
    ran (steal, from /proc/stat), and writes it with the figures."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    ticks = iter([[100, 0, 10, 50, 0, 0, 0, 0], [160, 0, 20, 50, 0, 0, 0, 20],  # training's start, end
                  [160, 0, 20, 50, 0, 0, 0, 20], [160, 0, 20, 150, 0, 0, 0, 20]])  # shared's
    monkeypatch.setattr(run.StealMeter, "_ticks", staticmethod(lambda: next(ticks)))
    meter = run.StealMeter()
    meter.start("training")
    meter.start("shared")  # ends "training": 20 of 90 ticks were the host's
    meter.stop()
    assert meter.shares == {"training": 20 / 90, "shared": 0.0}
    if not Path("/proc/stat").exists():
        return
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--only", "inference",
                          "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert re.search(r"^  \(the host took \d+\.\d% of the CPU time while inference ran: steal\)$", out, re.M)
    assert set(json.loads((tmp_path / "r.json").read_text())["info"]["steal"]) == {"inference"}
