"""Threads on a shared machine: the thread count a step chooses from its work and the free
cores, the load probe, and the barrier's spin-yield-sleep path (results unchanged)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import dlc
from dlc.backends.llvm import barrier, threads
from dlc.backends.llvm.target import Target
from dlc.program import make_program

EXAMPLES = Path(__file__).parent.parent / "examples"


def _lenet5_steps(batch: int, steps: int):
    """LeNet-5's training graph (the model's state initialized) and `steps` feeds of `batch`
    random 8x8 images."""
    m = dlc.load(EXAMPLES / "lenet5.dln")
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.random((batch, 1, 8, 8), dtype=np.float32),
              "label": rng.integers(0, 10, batch).astype(np.int32), "lr": np.float32(0.01)}
             for _ in range(steps)]
    return m, graph, feeds


# --- the decision ---------------------------------------------------------------------------

def test_a_tiny_step_runs_on_one_thread():
    work = [1e-6, 1e-6, 3]  # microseconds of work over a few phases: barriers would cost more
    assert threads.choose_threads(work, 2) == 1
    assert threads.choose_threads(work, 8) == 1


def test_a_large_step_uses_every_free_core():
    work = [20e-3, 0.1e-3, 60]
    assert threads.choose_threads(work, 2) == 2
    assert threads.choose_threads(work, 8) == 8
    assert threads.choose_threads(work, 1) == 1


def test_many_phases_of_little_work_stay_on_one_thread():
    # 200 phases of 0.5 us each: 400 us of barriers on two threads against 100 us of work
    assert threads.choose_threads([100e-6, 0.0, 200], 2) == 1
    # the same work in 5 phases is worth sharing
    assert threads.choose_threads([100e-6, 0.0, 5], 2) == 2


def test_more_threads_only_for_a_real_saving():
    """Two threads must beat one by a tenth: a step whose serial part dominates keeps one."""
    work = [30e-6, 200e-6, 2]
    assert threads.estimated_seconds(work, 2) < threads.estimated_seconds(work, 1)
    assert threads.choose_threads(work, 2) == 1


def test_the_count_minimizes_the_estimate():
    work = [400e-6, 0.0, 40]
    n = threads.choose_threads(work, 16)
    costs = [threads.estimated_seconds(work, k) for k in range(1, 17)]
    assert costs[n - 1] == min(costs)


@pytest.mark.parametrize("busy,total,free", [(None, 2, 2), (0.0, 2, 2), (0.2, 2, 2), (0.5, 2, 1), (1.0, 2, 1),
                                             (1.9, 2, 1), (5.0, 2, 1), (1.0, 8, 7), (2.5, 8, 5)])
def test_a_busy_core_is_left_alone(busy, total, free):
    assert threads.free_cores(total, busy) == free


def test_the_probe_subtracts_this_process(monkeypatch):
    """All the busy time in the window was this process's own: no other core is busy."""
    clock = iter([0.0, 1.0, 1.0])
    busy = iter([100.0, 150.0])                  # jiffies: 0.5 s at 100 ticks per second
    own = iter([10.0, 10.5])                     # this process used exactly that
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(threads, "_busy_jiffies", lambda cores: next(busy))
    monkeypatch.setattr(threads, "_own_seconds", lambda: next(own))
    probe = threads.CoreProbe(cores=[0, 1])
    probe.tick = 100
    assert probe.others_busy() == pytest.approx(0.0)
    clock, busy, own = iter([0.0, 1.0, 1.0]), iter([0.0, 150.0]), iter([0.0, 0.5])  # another process: 1 s of 1 s
    probe = threads.CoreProbe(cores=[0, 1])
    probe.tick = 100
    assert probe.others_busy() == pytest.approx(1.0)
    assert threads.free_cores(2, probe.others_busy()) == 1


def test_the_probe_reads_this_machine():
    busy = threads.CoreProbe().others_busy(window=0.05)
    assert busy is None or 0.0 <= busy <= len(threads.usable_cores()) + 0.5


def test_step_work_orders_the_examples():
    """The estimate ranks a logistic regression far below a residual network."""
    from dlc.pipeline import kernel_program, lower
    from dlc.backends.llvm import BACKEND
    work = {}
    for name in ("logreg", "digits_mlp", "resnet_bn"):
        m = dlc.load(EXAMPLES / f"{name}.dln")
        program = kernel_program(lower(m.compile_graph("train", m.train_config), 32), BACKEND.templates)
        work[name] = threads.step_work(program)
    seconds = {k: threads.estimated_seconds(w, 1) for k, w in work.items()}
    assert seconds["logreg"] < 1e-5 < seconds["digits_mlp"] < seconds["resnet_bn"]
    assert threads.choose_threads(work["logreg"], 2) == 1
    assert threads.choose_threads(work["resnet_bn"], 2) == 2


def test_auto_target_and_explicit_counts(monkeypatch):
    monkeypatch.delenv("DLC_THREADS", raising=False)
    auto = Target.host(None)
    assert auto.auto and auto.threads == min(len(threads.usable_cores()), 8)
    assert Target.host("auto").auto
    three = Target.host(3)
    assert not three.auto and three.threads == 3
    assert three.key() == auto.key()  # the code does not depend on the thread count
    monkeypatch.setenv("DLC_THREADS", "1")
    assert Target.host(None) == Target(auto.cpu, auto.features, 1, auto.triple, False)


# --- the check while the steps run --------------------------------------------------------------

def _drive(check, seconds_on, steps):
    """Run `steps` steps through `check`, each taking seconds_on(thread count, step)."""
    used = []
    for i in range(steps):
        n = check.threads()
        used.append(n)
        check.record(n, seconds_on(n, i))
    return used


MS = 1e-3  # a short step's time scale: its periods are PERIOD steps, PROBE of them probes


def test_one_thread_is_tried_now_and_then_and_kept_when_faster():
    check = threads.RunTimeCheck(2)
    period, probe = check.PERIOD, check.PROBE
    used = _drive(check, lambda n, i: (1.0 if n == 2 else 0.5) * MS, period)
    assert used[:period - probe] == [2] * (period - probe) and used[period - probe:] == [1] * probe
    assert check.current == 1                      # twice as fast on one thread: kept
    used = _drive(check, lambda n, i: (1.0 if n == 2 else 0.5) * MS, period)
    assert used[-probe:] == [2] * probe and check.current == 1  # two threads tried again, slower


def test_the_chosen_count_stays_unless_one_thread_is_clearly_faster():
    check = threads.RunTimeCheck(2)
    _drive(check, lambda n, i: (1.0 if n == 2 else 0.9) * MS, 3 * check.PERIOD)   # 10%: not enough
    assert check.current == 2
    _drive(check, lambda n, i: (1.0 if n == 2 else 1.4) * MS, check.PERIOD)
    assert check.current == 2


def test_back_to_the_chosen_count_when_its_cores_come_back():
    check = threads.RunTimeCheck(3)
    busy = 2 * check.PERIOD  # the second core is taken for the first two periods
    _drive(check, lambda n, i: ((3.0 if i < busy else 0.4) if n == 3 else 1.0) * MS, 4 * check.PERIOD)
    assert check.current == 3 and check.other == 1


def test_long_steps_are_probed_in_fewer_steps_and_shorter_periods():
    """A 4 ms step (the LSTM benchmark's): 3 probe steps in 96, the first period too (sized
    after its first 3 steps), so a competitor that takes a core is answered within 96
    steps (0.4 s), not 256 (1 s)."""
    check = threads.RunTimeCheck(2)
    used = _drive(check, lambda n, i: 4 * MS, 96)
    assert used == [2] * 93 + [1] * 3 and check.current == 2  # as fast on one thread: stays
    used = _drive(check, lambda n, i: (8 if n == 2 else 5) * MS, 96)  # now two threads are slower
    assert used == [2] * 93 + [1] * 3 and check.current == 1
    assert sum(n == 2 for n in _drive(check, lambda n, i: (8 if n == 2 else 5) * MS, 96 * 4)) == 4 * 3
    assert check.current == 1  # two threads tried 3 steps a period, and left alone


def test_steps_all_run_on_fewer_threads_than_the_check_asked_for():
    """Steps the runtime ran on one thread whatever the check said (a compile in the
    background held a core): every time is a probe's, none the current count's; the
    check sizes its periods from them and keeps its count."""
    check = threads.RunTimeCheck(2)
    for _ in range(3 * check.PERIOD):
        check.threads()
        check.record(1, 4 * MS)
    assert check.current == 2 and check.probe == check.MIN_PROBE


@pytest.mark.parametrize("example", sorted(p.stem for p in EXAMPLES.glob("*.dln")))
def test_every_example_trains_bit_for_bit_the_same_on_one_and_two_threads(example, tmp_path):
    """What lets the run-time check switch counts mid-run: three training steps of each
    example give the same outputs and state, bit for bit, on one thread and on two."""
    from example_models import example_feeds
    m = dlc.load(EXAMPLES / f"{example}.dln")
    graph = m.compile_graph("train", m.train_config)
    m.ensure_state(graph)
    feeds = example_feeds(m, m.train_config.batch, np.random.default_rng(0))
    runs = []
    for n in (1, 2):
        state = {k: v.copy() for k, v in m.state.items()}
        p = make_program("cpu", graph, state, options={"threads": n, "cache_dir": tmp_path})
        runs.append(([p.run(feeds) for _ in range(3)], state))
    (out1, s1), (out2, s2) = runs
    for a, b in zip(out1, out2):
        for k in a:
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k]), equal_nan=True), k
    for k in s1:
        assert np.array_equal(s1[k], s2[k], equal_nan=True), k


def test_steps_switching_thread_counts_give_the_same_results(monkeypatch):
    """`--threads auto` on two threads, the run-time check forced to alternate two and one
    thread every step: the same losses and parameters, bit for bit, as on two threads.
    (Two cores as `auto` sees them, also where the process may use one or DLC_THREADS
    says 1: there `auto` would be one thread, with no check to force.)"""
    m, graph, feeds = _lenet5_steps(64, 12)
    monkeypatch.setattr(threads, "usable_cores", lambda: [0, 1])
    monkeypatch.delenv("DLC_THREADS", raising=False)
    monkeypatch.setattr(threads, "choose_threads", lambda work, available: available)  # 2, however small
    monkeypatch.setattr(threads, "free_cores", lambda total, busy: total)
    used = []

    class Alternate(threads.RunTimeCheck):
        def threads(self):
            n = 2 if self.calls % 2 == 0 else 1
            used.append(n)
            return n
    from dlc.backends.llvm import pool, runtime
    monkeypatch.setattr(runtime, "RunTimeCheck", Alternate)
    pooled = []  # the thread counts the worker pool ran steps on
    real_run = pool.Pool.run
    monkeypatch.setattr(pool.Pool, "run", lambda self, fn, table, n: pooled.append(n) or real_run(self, fn, table, n))
    results = []
    for option in ("auto", 2):
        state = {k: v.copy() for k, v in m.state.items()}
        p = make_program("cpu", graph, state, options={"threads": option, "no_cache": True})
        losses = [float(p.run(f)["loss"]) for f in feeds]
        results.append((losses, state))
    assert used == [2, 1] * 6 and pooled == [2] * 6 + [2] * 12  # auto's one-thread steps ran without the pool
    (l1, s1), (l2, s2) = results
    assert l1 == l2
    for k in s1:
        assert np.array_equal(s1[k], s2[k]), k


# --- the barrier, forced to sleep at once ------------------------------------------------------

@pytest.mark.parametrize("nthreads", [2, 3])
def test_barrier_that_sleeps_at_once_gives_the_same_results(nthreads, tmp_path, monkeypatch):
    """With no spinning at all every wait goes to the futex (more threads than cores make
    sure some wait): 40 steps equal the single-thread steps."""
    monkeypatch.setattr(barrier, "SPIN_CYCLES", 0)
    monkeypatch.setattr(barrier, "YIELD_CYCLES", 0)
    monkeypatch.setattr(barrier, "SPIN_LIMIT", 0)
    m, graph, feeds = _lenet5_steps(16, 40)
    results = []
    for n in (1, nthreads):
        state = {k: v.copy() for k, v in m.state.items()}
        p = make_program("cpu", graph, state, options={"threads": n, "no_cache": True})
        losses = [float(p.run(f)["loss"]) for f in feeds]
        assert p.step_for(16).threads == n
        results.append((losses, state))
    (l1, s1), (l2, s2) = results
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for k in s1:
        np.testing.assert_allclose(s2[k], s1[k], rtol=1e-4, atol=1e-6, err_msg=k)
