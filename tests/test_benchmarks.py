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
