"""--quick-start: a cache miss starts on the quick tier's code while the optimized code
compiles in a forked process, which caches it; the program swaps it in between steps.
The results are the same bits all along (every LLVM pipeline computes the same bits:
test_backend_cpu.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc.cache import Cache
from dlc.core.diagnostics import DlcWarning

SOURCE = """model m(x: f32[B, 20]) -> f32[B, 5] {
    h = relu(batchnorm(dense(x, 32)))
    return dense(h, 5)
}
train m {
    data = arrays()
    loss = cross_entropy(output, label)
    optimizer = adam(lr=0.01)
    batch = 16
}"""
STEPS = 12


def _train(options: dict, steps: int = STEPS, swap_at: int | None = None):
    """A fresh model trained `steps` steps; swap_at: wait there until the optimized code
    is ready (the next step swaps it in)."""
    m = dlc.load(SOURCE)
    session = m.session(m.train_config, "cpu", threads=1, **options)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 20), dtype=np.float32)
    y = rng.integers(0, 5, 16).astype(np.int32)
    losses = []
    for i in range(steps):
        if i == swap_at:
            for optimizing, *_ in session.train_program._optimizing.values():
                while not optimizing.ready():
                    time.sleep(0.01)
        losses.append(session.train_step(x, y, 0.01)["loss"])
    return session, losses, {k: v.copy() for k, v in m.state.items()}


def test_the_optimized_code_replaces_the_quick_code_without_changing_a_result(tmp_path, monkeypatch):
    """Quick code for the first steps, the optimized code from step 4 on: the losses and
    the trained state are the very bits of a run on the optimized code throughout; the
    swap is in the verbose log; the cache holds the optimized objects (the ones swapped
    in), never the quick ones, and the next run loads them."""
    from dlc.backends.llvm import CpuBackend
    swapped, quick_engines = [], []
    replace = CpuBackend.replace_code

    def recorded(self, steps, compiled, target):
        swapped.append(compiled.blobs)
        quick_engines.extend(step.engine for step in steps.values())
        replace(self, steps, compiled, target)
    monkeypatch.setattr(CpuBackend, "replace_code", recorded)
    log = []
    session, losses, state = _train({"cache_dir": tmp_path, "quick_start": True, "verbose": log.append}, swap_at=4)
    _, want_losses, want = _train({"no_cache": True, "quick_start": False})
    assert losses == want_losses
    for k in want:
        assert np.array_equal(state[k], want[k]), k
    assert any("quick code (the optimized code follows)" in line for line in log), log
    assert any(line.startswith("optimized code in use") and "4 step(s) later" in line for line in log), log
    program = session.train_program
    assert len(swapped) == 1 and not program._optimizing
    engines = {id(step.engine) for step in program.units[16].values()}  # train and eval: one engine
    assert len(engines) == 1 and not engines & {id(e) for e in quick_engines}
    key = program._cache_key(16)
    cached, damage = Cache(tmp_path).lookup(key)
    assert damage is None and cached[0] == swapped[0]
    again = []
    _train({"cache_dir": tmp_path, "quick_start": True, "verbose": again.append}, steps=1)
    assert any(line.startswith(f"compile cache hit {key[:12]}") for line in again), again


def test_a_failed_optimized_compile_leaves_the_quick_code_running(monkeypatch):
    """The optimizing process fails (an LLVM error at O3, say): a warning says so, and
    training goes on on the quick code with the same results."""
    from dlc.backends.llvm import jit
    real = jit._compile_one

    def no_o3(module, target, pipeline="O3", lsr=False):
        if pipeline == "O3":
            raise ValueError("O3 is out of order")
        return real(module, target, pipeline, lsr)
    monkeypatch.setattr(jit, "_compile_one", no_o3)
    with pytest.warns(DlcWarning, match="optimized code of m train\\+eval, batch 16 failed .*O3 is out of "
                                        "order.*the quick code runs on"):
        _, losses, state = _train({"no_cache": True, "quick_start": True}, swap_at=4)
    monkeypatch.setattr(jit, "_compile_one", real)
    _, want_losses, want = _train({"no_cache": True, "quick_start": False})
    assert losses == want_losses
    for k in want:
        assert np.array_equal(state[k], want[k]), k


def test_quick_start_is_asked_for_and_never_reaches_an_artifact(tmp_path, monkeypatch):
    """Off unless asked for (quick_start=True, --quick-start or DLC_QUICK_START=1); and
    `dlc compile -o` writes the optimized code even then: only a step that is run starts
    on quick code."""
    monkeypatch.delenv("DLC_QUICK_START", raising=False)
    m = dlc.load(SOURCE)
    assert not m.session(m.train_config, "cpu", no_cache=True).train_program.quick_start
    monkeypatch.setenv("DLC_QUICK_START", "1")
    program = m.session(m.train_config, "cpu", cache_dir=tmp_path).train_program
    assert program.quick_start
    program.compiled(16)  # what compile_artifact writes
    assert not program._optimizing
    assert program.origins[16] == "compiled"


EXITING = """
import sys, time, numpy as np, dlc
from dlc.backends.llvm import jit
real = jit._compile_one
def slow(module, target, pipeline="O3", lsr=False):  # the optimizing process takes its time
    if pipeline == "O3" and module.name.endswith(".0"):
        time.sleep(float(sys.argv[3]))
    return real(module, target, pipeline, lsr)
jit._compile_one = slow
m = dlc.load(sys.argv[1])
s = m.session(m.train_config, "cpu", threads=1, quick_start=True,
              **({"cache_dir": sys.argv[2]} if sys.argv[2] else {"no_cache": True}))
x = np.zeros((16, 20), np.float32); y = np.zeros(16, np.int32)
s.train_step(x, y, 0.01)
optimizing = next(iter(s.train_program._optimizing.values()))[0]
print(optimizing.pid, s.train_program._cache_key(16))
"""


@pytest.mark.parametrize("cached", [True, False])
def test_a_run_that_ends_first_neither_waits_nor_loses_the_optimized_code(cached, tmp_path):
    """A run that ends before its optimized code is ready (its first module's O3 compile
    made to take 4 s, or 100 s) exits at once, exit status 0 (its output closes: the
    optimizing process holds none of its files). With a cache, the optimizing
    process goes on alone and caches the code for the next run; without one it is
    stopped."""
    src = tmp_path / "m.dln"
    src.write_text(SOURCE)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "DLC_VERIFY": "0"}
    started = time.monotonic()
    args = [str(src), str(cache) if cached else "", "4" if cached else "100"]
    r = subprocess.run([sys.executable, "-c", EXITING, *args], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - started < 4  # (it imports, compiles and runs a step in about 1 s)
    pid, key = r.stdout.split()
    pid = int(pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    assert not _alive(pid)
    if cached:
        hit, damage = Cache(cache).lookup(key)
        assert hit is not None and damage is None
    else:
        assert not cache.exists()


def _alive(pid: int) -> bool:
    """Whether a process (an orphan: reaped by init, so no zombie lingers) still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_steps_leave_the_cores_of_an_optimizing_process_alone(monkeypatch):
    """While this process's optimizing compile keeps a core busy (ForkedJob.busy), a
    two-thread step runs on one thread (two threads and the compile on two cores would
    wait at every barrier for the scheduler); once it is done, on two again."""
    from dlc.backends.llvm import jit, pool
    pooled = []  # the thread counts the worker pool ran steps on
    real = pool.Pool.run
    monkeypatch.setattr(pool.Pool, "run", lambda self, fn, table, n: pooled.append(n) or real(self, fn, table, n))
    m = dlc.load(SOURCE)
    session = m.session(m.train_config, "cpu", threads=2, no_cache=True, quick_start=False)
    x, y = np.zeros((16, 20), np.float32), np.zeros(16, np.int32)
    session.train_step(x, y, 0.01)
    monkeypatch.setattr(jit.ForkedJob, "busy", 1)
    session.train_step(x, y, 0.01)
    monkeypatch.setattr(jit.ForkedJob, "busy", 0)
    session.train_step(x, y, 0.01)
    assert pooled == [2, 2]
