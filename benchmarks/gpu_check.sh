#!/usr/bin/env bash
# The CUDA backend's checks on a real GPU, prepared for the day one is lent: run it once,
# from the repository root, on the device machine. About 2 minutes on an H200 (1.2-1.9 in
# the forty-fourth session); every stage has its own time limit, so it ends within 10
# minutes whatever happens.
#
#   here, once (lark is the one package that machine lacks; its llvmlite is numba's, which
#   may be older than the 0.48 the cpu target needs -- the tests import it -- so carry one:
#   60 MB, with the repository still inside the 64 MiB a call may carry):
#       echo /.whl/ >> .git/info/exclude
#       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#           --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#           --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#           lark==1.3.1 llvmlite==0.50.0
#   on the device (the tool `run`):
#       command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480
#
# Stages: (1) the gpu-marked tests -- the templates, the op table and every example's
# first training steps on `--target cuda` against the reference interpreter, device
# state, deterministic replays, deferred results, profiles; (2) `dlc run --target cuda`
# with --verbose (registers and spills per kernel) and --profile; (3) the benchmark:
# dlc vs PyTorch CUDA (eager, and CUDA graphs) on gpu_bench.py's workloads (MLP, LeNet-5,
# LSTM, transformer block, MobileNet) and SGEMM 4096^2 vs cuBLAS (TF32 off); (4) each
# workload's kernels timed one by one; (5) the SGEMM template's candidate tiles at 4096^3.
# The benchmark's steps are compiled in the background while the tests run.
#
# Results, under $OUT (or ./gpu-check-out): summary.txt, gpu_tests.log, gpu_tests.xml,
# cli.log, prepare.log, bench.log, bench.json, profile.log, tiles.log.
set -u
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DLC_CACHE_DIR=/tmp/dlc-gpu-check-cache
start=$SECONDS
say() { echo "[$((SECONDS - start)) s] $*" | tee -a "$OUT/summary.txt"; }

# --- setup -----------------------------------------------------------------------------------
llvmlite_ok='import llvmlite, sys; sys.exit(tuple(map(int, llvmlite.__version__.split(".")[:2])) < (0, 48))'
if ! python3 -c "import lark" 2>/dev/null || ! python3 -c "$llvmlite_ok" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { say "lark or llvmlite >= 0.48 is missing, and .whl/ holds no wheels (see the header)"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    python3 -c "import lark" && python3 -c "$llvmlite_ok" || { say "the wheels in .whl/ did not provide lark and llvmlite >= 0.48"; exit 1; }
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$OUT/summary.txt" 2>&1
python3 - >> "$OUT/summary.txt" 2>&1 <<'EOF'
import cupy, torch
from dlc import backends
cuda = backends.backend("cuda")
print("cupy", cupy.__version__, "| torch", torch.__version__, "| target", cuda.target({}).describe())
EOF

# --- the benchmark's compiles, in the background ----------------------------------------------
timeout 240 python3 benchmarks/gpu_bench.py --prepare > "$OUT/prepare.log" 2>&1 &
prepare=$!

# --- 1. the gpu-marked tests -------------------------------------------------------------------
say "gpu tests"
timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider -n 8 --timeout 150 tests/test_cuda_gpu.py \
    --junitxml "$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
say "gpu tests: exit $? -- $(tail -n 1 "$OUT/gpu_tests.log")"

# --- 2. the command line -----------------------------------------------------------------------
say "dlc run --target cuda"
timeout 70 python3 -m dlc run examples/lenet5.dln --target cuda --epochs 2 --verbose --profile \
    > "$OUT/cli.log" 2>&1
say "dlc run: exit $? -- $(grep -m 1 'lenet5:' "$OUT/cli.log")"

# --- 3. the benchmark ------------------------------------------------------------------------------
wait $prepare
say "compiles for the benchmark: exit $?"
timeout 140 python3 benchmarks/gpu_bench.py --out "$OUT/bench.json" > "$OUT/bench.log" 2>&1
say "benchmark: exit $?"
cat "$OUT/bench.log" >> "$OUT/summary.txt"

# --- 4. where the GPU time goes ----------------------------------------------------------------
timeout 100 python3 benchmarks/gpu_bench.py --profile > "$OUT/profile.log" 2>&1
say "profiles: exit $?"
timeout 60 python3 benchmarks/gpu_bench.py --tiles > "$OUT/tiles.log" 2>&1
say "SGEMM tiles: exit $? -- $(tr '\n' ' ' < "$OUT/tiles.log")"
say "done"
