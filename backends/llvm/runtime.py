"""Running a compiled step: the working arena, the pointer table, native worker threads.

A step is called once per batch through ctypes (which releases the GIL); inside it the
threads run every kernel with barriers between phases: no Python runs between kernels.
Parameters and state stay in the model's numpy arrays, which the step updates in place.

A step of a data-parallel job calls back into this process between two phases (thread 0
only, through a ctypes callback: it takes the GIL, which the other threads never need):
`_host` runs the bucket's exchange with dlc.core.collective's communicator on numpy
views of the arena, and returns to the step.
"""
from __future__ import annotations

import bisect
import ctypes
import itertools
import threading
import time

import numpy as np

from dlc.backends.base import StepLayout
from dlc.core import collective
from dlc.core.kernel import COLLECTIVE_MODES
from dlc.core.types import DType

from .codegen import FIXED_SLOTS

from .jit import Engine, ForkedJob
from .pool import Pool
from .target import Target
from .threads import RunTimeCheck

BARRIER_BYTES = 192  # barrier.py: count, generation, sleepers on their own cache lines


class NativeStep:
    """One loaded specialization: object code, arena, table, threads."""

    def __init__(self, code, layout: StepLayout, target: Target, cache=None):
        """code: object code, or an Engine already holding it (entries of one unit share
        one); the step function is `layout.meta["symbol"]` (default `dlc_step`)."""
        self.layout = layout
        self.engine = code if isinstance(code, Engine) else Engine(code, target)
        self.threads = layout.threads
        self.arena = np.zeros(max(layout.arena_bytes, 64) // 4 + 16, dtype=np.float32)
        self.barrier = np.zeros(BARRIER_BYTES // 8, dtype=np.int64)
        self.scratch = np.zeros(max(layout.scratch_bytes * self.threads, 64) // 4 + 16, dtype=np.float32)
        self.profile = np.zeros(max(len(layout.kernels), 1), dtype=np.int64)
        self.table = (ctypes.c_void_p * (FIXED_SLOTS + len(layout.slots)))()
        self.table[0] = _aligned(self.arena)
        self.table[1] = self.barrier.ctypes.data
        self.table[2] = _aligned(self.scratch)
        self.table[3] = self.profile.ctypes.data
        self._slot = {s[0]: FIXED_SLOTS + i for i, s in enumerate(layout.slots)}
        self._staging = {}      # input name -> aligned buffer for inputs that need a copy
        self._bound = {}        # input name -> the array the table points at (this call's)
        self._checked = {}      # state name -> the array last checked and put in the table
        self._state_starts, self._state_ends = [], []  # their byte spans: starts, running max of ends
        self._state_slots = []  # (name, slot, dtype, shape)
        for name, kind, dtype, shape in layout.slots:
            if kind == "state":
                self._state_slots.append((name, self._slot[name], _np(dtype), tuple(shape)))
            else:
                self._staging[name] = aligned_empty(tuple(shape), _np(dtype))
        self.pool = Pool.get(self.threads, cache) if self.threads > 1 else None
        # `--threads auto`: one thread is tried now and then while the steps run (threads.py)
        self.check = RunTimeCheck(self.threads) if target.auto and self.threads > 1 else None
        self._lock = threading.Lock()
        self.use_code(self.engine)
        self.seconds, self.calls = 0.0, 0  # time spent in this step (for profiles)
        self._outputs = {name: self._view(*spec) for name, spec in layout.outputs.items()
                         if isinstance(spec[0], int)}
        self._slot_outputs = {name: spec[0] for name, spec in layout.outputs.items()
                              if not isinstance(spec[0], int)}
        self._buckets = {int(k): v for k, v in layout.meta.get("collectives", {}).items()}
        self._pending: dict[int, object] = {}  # bucket -> a started exchange
        self._host_error: BaseException | None = None
        self._state: dict = {}
        self._views = {bucket: [self._arrays(specs) for specs in spec] for bucket, spec in self._buckets.items()
                       if all(isinstance(where, int) for specs in spec for where, _, _ in specs)}
        if self._buckets:
            self._host_fn = HOST_FN(self._host)  # kept alive as long as the step
            self.table[4] = ctypes.cast(self._host_fn, ctypes.c_void_p).value

    def use_code(self, engine: Engine) -> None:
        """Run `engine`'s code for this layout from the next call on (the optimized code
        of the quick code this step started with: same layout, same results)."""
        with self._lock:
            if self.check is not None and engine is not self.engine:  # the quick code's times
                self.check = RunTimeCheck(self.threads)                # say nothing of the new code's
            self.engine = engine
            self._step_addr = engine.address(self.layout.meta.get("symbol", "dlc_step"))
            self._step = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32)(self._step_addr)

    def _view(self, offset, dtype, shape):
        base = _aligned(self.arena) - self.arena.ctypes.data
        nbytes = int(np.prod(shape)) * np.dtype(_np(dtype)).itemsize
        raw = self.arena.view(np.uint8)[base + offset: base + offset + nbytes]
        return raw.view(_np(dtype)).reshape(shape)

    def run(self, state: dict, feeds: dict) -> dict:
        """One step. An input of the step's type in C order, larger than _COPIED_BELOW and
        sharing no memory with a state array, is read in place (a step never writes its
        inputs: check_program); any other is copied into a staging buffer;
        parameters and state are used in place (a misaligned or foreign-typed state array is
        replaced in `state` by an aligned copy, once). Returns copies of the results."""
        with self._lock:
            self._bind_state(state)
            self._bind(feeds)
            return self._run(state, feeds)

    def _bind_state(self, state: dict) -> None:
        changed = False
        for name, slot, want, shape in self._state_slots:
            a = state[name]
            if self._checked.get(name) is not a:  # a new array object: check it once
                if (a.dtype != want or a.shape != shape or not a.flags.c_contiguous
                        or a.ctypes.data % ALIGN):
                    if a.shape != shape:
                        raise ValueError(f"state {name} has shape {a.shape}, the step expects {shape}")
                    a = state[name] = aligned_copy(a, want)
                self._checked[name] = a
                self.table[slot] = a.ctypes.data
                changed = True
        if changed:  # the inputs read in place are checked against the new arrays
            self._state_starts, self._state_ends = _spans(self._checked.values())
            self._bound.clear()

    def _bind(self, feeds: dict) -> None:
        for name, buf in self._staging.items():
            value = np.asarray(feeds[name])
            if value.shape != buf.shape:
                raise ValueError(f"{name} has shape {value.shape}, the step expects {buf.shape}")
            if self._bound.get(name) is value:
                continue
            if (value.nbytes <= _COPIED_BELOW or value.dtype != buf.dtype
                    or not (value.flags.c_contiguous and value.flags.aligned) or self._overlaps_state(value)):
                np.copyto(buf, value, casting="unsafe")
                value = buf
            if self._bound.get(name) is not value:
                self._bound[name] = value
                self.table[self._slot[name]] = value.ctypes.data

    def _overlaps_state(self, value: np.ndarray) -> bool:
        """Whether an input shares memory with a parameter or state array, which the step
        writes (the kernels assume their arrays do not alias): then it is copied."""
        lo, hi = value.ctypes.data, value.ctypes.data + value.nbytes
        i = bisect.bisect_left(self._state_starts, hi)
        return i > 0 and self._state_ends[i - 1] > lo

    def _run(self, state: dict, feeds: dict) -> dict:
        start = time.perf_counter()
        self._state = state
        threads = self.check.threads() if self.check is not None else self.threads
        if ForkedJob.busy and threads > 1:  # cores this process's own compiles keep busy
            threads = max(1, threads - ForkedJob.busy)
        if threads > 1:
            self.pool.run(self._step_addr, ctypes.addressof(self.table), threads)
        else:
            self._step(ctypes.addressof(self.table), 0, 1)
        if self.check is not None:
            self.check.record(threads, time.perf_counter() - start)
        out = {k: v.copy() for k, v in self._outputs.items()}
        error, self._host_error = self._host_error, None
        if error is not None:
            raise error
        self.seconds += time.perf_counter() - start
        self.calls += 1
        out.update({k: np.array(state[slot] if slot in state else feeds[slot], copy=True)
                    for k, slot in self._slot_outputs.items()})
        return out

    def _host(self, bucket: int, mode: int) -> None:
        """A Collective part of the step (thread 0, between phases): the exchange of one
        bucket. An error cannot unwind through the native step: it is kept, the step runs
        on, and run() raises it."""
        try:
            sources, targets = self._views.get(bucket) or [self._arrays(specs) for specs in self._buckets[bucket]]
            comm = collective.current()
            what = COLLECTIVE_MODES[mode]
            if what == "sync":
                comm.allreduce(sources, targets)
            elif what == "start":
                self._pending[bucket] = comm.start(sources)
            else:
                comm.finish(self._pending.pop(bucket), targets)
        except BaseException as e:  # noqa: BLE001 - raised by run()
            if self._host_error is None:
                self._host_error = e

    def _arrays(self, specs) -> list[np.ndarray]:
        out = []
        for where, dtype, shape in specs:
            if isinstance(where, int):
                out.append(self._view(where, dtype, tuple(shape)))
            else:
                out.append(self._state[where] if where in self._state else self._bound[where])
        return out

    def profile_rows(self) -> list[tuple[str, tuple, float]]:
        """(kernel, .dln lines, seconds): the step's own cycle counters share out the
        measured time of the native calls."""
        total = float(self.profile.sum())
        if not total:
            return []
        return [(name, tuple(lines), self.seconds * float(cycles) / total)
                for (name, phase, lines), cycles in zip(self.layout.kernels, self.profile)]


_COPIED_BELOW = 4096  # bytes: copying a small input costs less than checking it for reading in place


def _spans(arrays) -> tuple[list[int], list[int]]:
    """The arrays' byte spans sorted by start: the starts, and the running maximum of the
    ends (so one bisection finds an overlap even where one array is a view inside another)."""
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays)
    return [s for s, _ in spans], list(itertools.accumulate((e for _, e in spans), max))


HOST_FN = ctypes.CFUNCTYPE(None, ctypes.c_int32, ctypes.c_int32)
ALIGN = 64  # state arrays start on a cache line (the kernels need element alignment only)


def aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + n].view(dtype).reshape(shape)


def aligned_copy(a: np.ndarray, dtype) -> np.ndarray:
    out = aligned_empty(a.shape, dtype)
    np.copyto(out, a, casting="unsafe")
    return out


def _aligned(a: np.ndarray, align: int = 64) -> int:
    addr = a.ctypes.data
    return addr + (-addr) % align


def _np(dtype: str) -> np.dtype:
    return DType(dtype).np
