"""How many threads a step runs on: its work, and the cores other processes leave free.

A step on n threads costs about  parallel/n + serial + n>1 ? (phases * BARRIER + HANDOFF) : 0
(the work estimate comes from the kernel program at compile time, `step_work`). A tiny
step -- a few microseconds of work over dozens of phases -- is fastest on one thread;
a large one on every free core. `choose_threads` takes the count that minimizes the
estimate, and more than one only when it saves at least a tenth.

With `--threads auto` (the default) a core another process keeps busy is not free: when
a worker thread shares a core with a busy process, every barrier of every phase waits for
the scheduler to hand that core back (milliseconds), and a two-thread step runs many
times slower than on one thread. `CoreProbe` reads the machine's busy time from
/proc/stat over a short window at start, minus this process's own CPU time, and
`free_cores` counts the cores the others leave idle. While the steps run,
`RunTimeCheck` times a few on one thread now and then against the chosen count: a
competitor that starts later, or a virtual CPU the host takes away for a while, shows
only there.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque

# Estimated seconds per unit of work (single thread), per kind of part: GEMM and
# convolution templates run vectorized register-tiled code; loop nests about an element
# per nanosecond (a reduction's inner iterations count as elements).
# (The convolutions are packed GEMMs on the same microkernel: about three quarters of the
# GEMM's rate on the benchmark models' layers, benchmarks/bench_conv.py.)
SECONDS_PER_FLOP = {"matmul": 1 / 40e9, "conv2d": 1 / 30e9, "conv2d_bwd_data": 1 / 30e9,
                    "conv2d_bwd_filter": 1 / 30e9}
SECONDS_PER_ELEMENT = 0.5e-9
BARRIER = 2e-6      # one barrier between phases, all threads on otherwise idle cores
HANDOFF = 5e-6      # waking the workers for a step and joining them after it
GAIN = 0.9          # more threads only when the estimate falls below this share of one thread's

PROBE_WINDOW = 0.05  # seconds of /proc/stat history needed to call a core busy


def step_work(program) -> list:
    """[parallel seconds, serial seconds, phases]: the step on one thread, estimated. A loop
    counts its body T times, and its body's phases (each ends in a barrier) T times."""
    from dlc.core.kernel import Loop, LoopNest, Template

    def work(entries) -> tuple[float, float, int]:
        parallel = serial = 0.0
        phases: set = set()
        loop_phases = 0
        for k in entries:
            phases.add(k.phase)
            if isinstance(k, Loop):
                p, s, n = work(k.body)
                steps = k.var.extent
                parallel, serial, loop_phases = parallel + steps * p, serial + steps * s, loop_phases + steps * n
                continue
            for part in k.parts:
                if isinstance(part, Template):
                    parallel += _template_seconds(part)
                    if part.epilogue is not None:
                        parallel += _nest_elements(part.epilogue) * SECONDS_PER_ELEMENT
                elif isinstance(part, LoopNest):
                    sec = _nest_elements(part) * SECONDS_PER_ELEMENT
                    if part.serial or not part.outer:
                        serial += sec
                    else:
                        parallel += sec
        return parallel, serial, len(phases) + loop_phases

    return list(work(program.kernels))


def _template_seconds(t) -> float:
    out = _size(t.output.shape)
    if t.op in ("matmul", "batch_matmul"):
        a = t.inputs[0].shape
        k = a[-2] if t.attrs.get("ta") else a[-1]
        return 2.0 * out * k * SECONDS_PER_FLOP["matmul"]
    if t.op in ("conv2d", "conv2d_bwd_data"):
        g_or_x, w = t.inputs  # forward: out = [N, Cout, ...]; bwd data: g = [N, Cout, ...]
        outs = out if t.op == "conv2d" else _size(g_or_x.shape)
        return 2.0 * outs * _size(w.shape) / w.shape[0] * SECONDS_PER_FLOP[t.op]
    if t.op == "conv2d_bwd_filter":
        g = t.inputs[1]
        return 2.0 * _size(g.shape) * out / t.output.shape[0] * SECONDS_PER_FLOP[t.op]
    return (out + sum(_size(b.shape) for b in t.inputs)) * SECONDS_PER_ELEMENT  # pooling, gathers, sums


def _nest_elements(nest) -> float:
    """Iterations of the nest, a reduction's iterations counted in (once per row for one
    that depends on the outer loops only: the emitter hoists it)."""
    from dlc.core.kernel import Reduce
    from dlc.core.kernel.analysis import FreeVars, walk_ex
    free = FreeVars()
    inner_vars = {v.name for v in nest.inner}
    outer = _size([v.extent for v in nest.outer])
    inner = _size([v.extent for v in nest.inner])
    per_row = per_elem = 0
    for e in walk_ex([s.value for s in nest.row_stores] + [s.value for s in nest.stores]):
        if isinstance(e, Reduce):
            if free(e) & inner_vars:
                per_elem += _reduce_size(e)
            else:
                per_row += _reduce_size(e)
    return outer * (len(nest.row_stores) + per_row + inner * (len(nest.stores) + per_elem))


def _reduce_size(e) -> int:
    return _size([v.extent for v in e.vars])


def _size(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def estimated_seconds(work, n: int) -> float:
    parallel, serial, phases = work
    return parallel / n + serial + ((phases * BARRIER + HANDOFF) if n > 1 else 0.0)


def choose_threads(work, available: int) -> int:
    """The thread count (1..available) with the least estimated step time; more than one
    only when that saves at least a tenth of one thread's time."""
    best, best_t = 1, estimated_seconds(work, 1)
    for n in range(2, max(1, available) + 1):
        t = estimated_seconds(work, n)
        if t < best_t and t <= GAIN * estimated_seconds(work, 1):
            best, best_t = n, t
    return best


# --- cores other processes keep busy ----------------------------------------------------------

def usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _busy_jiffies(cores) -> float | None:
    """Busy clock ticks summed over `cores` (everything but idle and iowait), or None."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = {f"cpu{c}" for c in cores}
    total = 0.0
    found = 0
    for line in lines:
        parts = line.split()
        if parts and parts[0] in want:
            v = [int(x) for x in parts[1:]]
            total += sum(v) - v[3] - (v[4] if len(v) > 4 else 0)
            found += 1
    return total if found else None


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CoreProbe:
    """Busy time of the usable cores over a window, less this process's own CPU time."""

    def __init__(self, cores=None):
        self.cores = cores or usable_cores()
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = (time.monotonic(), _busy_jiffies(self.cores), _own_seconds())
        self._result = None

    def others_busy(self, window: float = PROBE_WINDOW) -> float | None:
        """Cores' worth of CPU time other processes used since the probe started (waits
        until `window` seconds have passed); None when /proc/stat cannot be read."""
        if self._result is not None:
            return self._result
        t0, busy0, own0 = self.start
        if busy0 is None:
            return None
        wait = window - (time.monotonic() - t0)
        if wait > 0:
            time.sleep(wait)
        t1, busy1, own1 = time.monotonic(), _busy_jiffies(self.cores), _own_seconds()
        if busy1 is None:
            return None
        others = (busy1 - busy0) / self.tick - (own1 - own0)
        self._result = max(0.0, others / max(t1 - t0, 1e-9))
        return self._result


def free_cores(total: int, others_busy: float | None) -> int:
    """Cores left when other processes keep `others_busy` cores' worth busy (a core at
    least 40% busy counts as taken); at least one."""
    if others_busy is None:
        return total
    return max(1, min(total, total - int(others_busy + 0.6)))


_probe: CoreProbe | None = None


def start_probe() -> CoreProbe:
    """The process's probe, started on first use (when a target is made: the window then
    overlaps loading and compiling)."""
    global _probe
    if _probe is None:
        _probe = CoreProbe()
    return _probe


def restart_probe() -> CoreProbe:
    """A new window from now (a benchmark that starts its own competing load)."""
    global _probe
    _probe = CoreProbe()
    return _probe


class RunTimeCheck:
    """`--threads auto` while the steps run: each period ends with a few steps on the other
    count (one thread, or back to the count chosen at load), and their median is compared
    with that of the steps before on the current one; the other count is kept from then on
    when it is faster by SWITCH. Results do not depend on the thread count (each output
    element is computed by one thread, in one order), so a switch changes only the time.

    A period is PERIOD steps of which the last PROBE probe, for steps shorter than
    PROBE_SECONDS / PROBE; a longer step is timed well enough in fewer probe steps (down to
    MIN_PROBE), and its period shrinks with them, so that probing stays 1/32 of the steps
    and a slow phase is answered sooner (the LSTM benchmark's 4 ms step: a period of 96
    steps, 0.4 s, where 256 steps were a second). The first period is sized by the first
    MIN_PROBE steps. Beside a competitor busy 1.5 s and idle 1.5 s in turn, the LSTM's mean
    step on a 2-vCPU VM took 0.89-0.94 of its time with 256-step periods (3 s busy, 3 s
    idle: 0.96); the short MLP steps' periods are as they were. And on a VM whose second
    CPU the host took away for minutes at a time: a two-thread step of the MLP at batch 8
    took 0.31-0.34 ms there, one thread 0.155 ms, and 0.11 ms on two threads when the CPU
    was back."""
    PERIOD = 256
    PROBE = 8
    MIN_PROBE = 3
    PROBE_SECONDS = 0.01
    SWITCH = 0.85

    def __init__(self, chosen: int):
        self.chosen, self.current = chosen, chosen
        self.calls = 0
        self.probe, self.left = self.PROBE, self.PERIOD  # this period's probe steps, and its steps to go
        self.recent = deque(maxlen=self.PROBE)  # the last step times on the current count
        self.probed: list[float] = []           # this period's step times on the other count

    @property
    def other(self) -> int:
        return 1 if self.current > 1 else self.chosen

    def threads(self) -> int:
        """The thread count for the next step."""
        return self.other if self.left <= self.probe else self.current

    def record(self, threads: int, seconds: float) -> None:
        """A step ran on `threads` threads in `seconds`."""
        if threads == self.current:
            self.recent.append(seconds)
        else:
            self.probed.append(seconds)
        self.calls += 1
        self.left -= 1
        if self.calls == self.MIN_PROBE:  # the first steps' times size the first period too
            self._size(statistics.median([*self.recent, *self.probed]), first=True)
        if self.left > 0:
            return
        if (self.probed and len(self.recent) >= self.probe
                and statistics.median(self.probed) < self.SWITCH * statistics.median(self.recent)):
            self.current, self.recent = self.other, deque(self.probed, maxlen=self.PROBE)
        self.probed = []
        self._size(statistics.median(self.recent) if self.recent else seconds)

    def _size(self, step: float, first: bool = False) -> None:
        """The probe steps and the period for a step of `step` seconds: the next period's,
        or what is left of the first."""
        self.probe = max(self.MIN_PROBE, min(self.PROBE, math.ceil(self.PROBE_SECONDS / max(step, 1e-9))))
        period = self.probe * (self.PERIOD // self.PROBE)
        self.left = min(self.left, period - self.calls) if first else period
