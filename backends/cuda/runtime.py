"""Running a compiled step on the GPU through CuPy.

Device state. The parameters and optimizer state of one `state` dict live on the device in
a DeviceState, shared by every step that runs on that dict (a session's training and
evaluation steps), with the one stream all of them use. Before a step, arrays the host
may have changed are uploaded (all of them after a sync_state, or one whose host array
object was replaced); after it, the device copy is the newer one until `sync_state(state)`
(Backend.sync_state, called by the driver before it reads or writes the host arrays)
copies it back.

A step. Each step's working arena and input buffers are allocated once. Inputs are
copied into pinned host staging buffers and from there to the device asynchronously;
the whole step -- input copies, every kernel in order (a loop's body once per iteration,
each launch with its t), the program's copies, results to pinned host buffers -- is
captured once as a CUDA graph and replayed: one launch from
Python. Two frames (staging, results, graph, an event) alternate, so the host fills the
next batch while the GPU runs the current one. Results are DeviceValues: read on first
use, `ready()` says whether that would wait; a frame about to be reused first hands its
pending results their values. With `profile`, kernels run one by one between CUDA
events instead of as a graph, and their times are summed per kernel.
"""
from __future__ import annotations

import weakref

import numpy as np

from dlc.backends.base import StepLayout
from dlc.core.types import DType

from .render import VAR_ARG, Launch, LoopStep, launches_of, steps_from_json

ALIGN = 64
FRAMES = 2
_HOST_TO_DEVICE, _DEVICE_TO_HOST, _DEVICE_TO_DEVICE = 1, 2, 3  # cudaMemcpyKind


def _copy(dst: int, src: int, nbytes: int, kind: int, stream) -> None:
    """cudaMemcpyAsync on `stream`. CuPy's MemoryPointer copies refuse host transfers while
    the stream is capturing a graph; with pinned host buffers, as here, CUDA records them."""
    from cupy.cuda import runtime
    runtime.memcpyAsync(dst, src, nbytes, kind, stream.ptr)


class DeviceState:
    """The device copy of one host `state` dict, and the stream its steps run on."""

    def __init__(self, state: dict):
        import cupy
        self.state = state                 # kept alive with this copy (so its id stays unique)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.arrays: dict[str, object] = {}
        self.uploaded: dict[str, object] = {}  # name -> the host array object last uploaded
        self.current: set[str] = set()         # names whose device copy is the host's too
        self.device_is_newer = False

    def prepare(self, slots) -> None:
        """Device arrays for the step's state slots (allocated once: captured graphs keep
        their addresses), uploaded where the host copy may be newer."""
        import cupy
        for name, dtype, shape in slots:
            host = self.state[name]
            if host.shape != shape:
                raise ValueError(f"state {name} has shape {host.shape}, the step expects {shape}")
            dev = self.arrays.get(name)
            if dev is None:
                dev = self.arrays[name] = cupy.empty(shape, dtype)
            if name not in self.current or self.uploaded.get(name) is not host:
                dev.set(np.asarray(host, dtype=dtype, order="C"), stream=self.stream)  # (0-d stays 0-d)
                self.uploaded[name] = host
                self.current.add(name)

    def sync(self) -> None:
        """Copy the device arrays back into the host arrays (in place); the next step
        re-uploads the host arrays, which the caller may change meanwhile."""
        if self.device_is_newer:
            self.stream.synchronize()
            for name, dev in self.arrays.items():
                host = self.state.get(name)
                if host is not None and host is self.uploaded.get(name):  # not replaced meanwhile
                    host[...] = dev.get(stream=self.stream).reshape(host.shape)
            self.device_is_newer = False
        self.current.clear()


_DEVICE_STATES: "weakref.WeakValueDictionary[int, DeviceState]" = weakref.WeakValueDictionary()


def device_state(state: dict) -> DeviceState:
    found = _DEVICE_STATES.get(id(state))
    if found is None or found.state is not state:
        found = _DEVICE_STATES[id(state)] = DeviceState(state)
    return found


def sync_state(state: dict) -> None:
    """Backend.sync_state: nothing to do unless a step ran on this dict."""
    found = _DEVICE_STATES.get(id(state))
    if found is not None and found.state is state:
        found.sync()


class DeviceValue:
    """A result of a step on its way to the host: `np.asarray(v)`, `float(v)` wait for the
    step (once); `ready()` says whether they would wait."""

    __slots__ = ("_frame", "_name", "_value")

    def __init__(self, frame: "_Frame", name: str):
        self._frame, self._name, self._value = frame, name, None

    def ready(self) -> bool:
        return self._value is not None or self._frame.done.done

    def numpy(self) -> np.ndarray:
        if self._value is None:
            self._frame.done.synchronize()
            self._value = self._frame.results[self._name].copy()
            self._frame = None
        return self._value

    def __array__(self, dtype=None, copy=None):
        v = self.numpy()
        return v if dtype is None else v.astype(dtype)

    def __float__(self) -> float:
        return float(self.numpy())

    def __int__(self) -> int:
        return int(self.numpy())

    @property
    def shape(self) -> tuple:
        return self.numpy().shape

    def __repr__(self) -> str:
        return f"DeviceValue({self._name}: {self.numpy()!r})"


class _Frame:
    """Pinned staging for the inputs, pinned results, the event that ends the step, the
    captured graph, and the results not read yet."""

    def __init__(self, inputs: dict, outputs: dict):
        import cupy
        import cupyx
        self.staging = {name: cupyx.empty_pinned(shape, dtype) for name, (dtype, shape) in inputs.items()}
        self.results = {name: cupyx.empty_pinned(shape, dtype) for name, (dtype, shape) in outputs.items()}
        self.done = cupy.cuda.Event(disable_timing=True)
        self.done.record()  # "finished" until first used
        self.graph, self.graph_state = None, None
        self.pending: list[DeviceValue] = []

    def reuse(self) -> None:
        """Wait for this frame's last step and give its unread results their values."""
        self.done.synchronize()
        for v in self.pending:
            v.numpy()
        self.pending = []


class CudaStep:
    """One loaded specialization: the modules, the arena, device inputs, two frames."""

    def __init__(self, binaries: list[bytes], layout: StepLayout, target):
        import cupy
        self.layout = layout
        self.calls = 0
        self.modules = []
        for binary in binaries:  # the translation units (layout.meta["units"] names their kernels)
            self.modules.append(cupy.cuda.function.Module())
            self.modules[-1].load(binary)
        home = {kernel: i for i, kernels in enumerate(layout.meta.get("units", ())) for kernel in kernels}
        self.steps = steps_from_json(layout.meta["steps"])
        self.launches = launches_of(self.steps)
        self._launch_index = {id(s): i for i, s in enumerate(self.launches)}
        self.functions = {s.kernel: self.modules[home.get(s.kernel, 0)].get_function(s.kernel) for s in self.launches}
        self.profile = bool(layout.meta.get("profile"))
        size = -(-layout.arena_bytes // ALIGN) * ALIGN + layout.scratch_bytes
        self.arena = cupy.zeros(max(size, ALIGN), dtype=np.uint8)
        inputs, self.state_slots = {}, []
        for name, kind, dtype, shape in layout.slots:
            spec = (DType(dtype).np, tuple(shape))
            if kind == "state":
                self.state_slots.append((name, *spec))
            else:
                inputs[name] = spec
        self.inputs = {name: cupy.empty(shape, dtype) for name, (dtype, shape) in inputs.items()}
        outputs = {name: (DType(dtype).np, tuple(shape)) for name, (_, dtype, shape) in layout.outputs.items()}
        self.frames = [_Frame(inputs, outputs) for _ in range(FRAMES)]
        self.seconds = np.zeros(len(self.launches))
        self.use_graph = not self.profile
        self._states: dict[int, DeviceState] = {}
        self._events: list = []

    # --- one step -----------------------------------------------------------------------------
    def run(self, state: dict, feeds: dict) -> dict:
        ds = self._states[id(state)] = device_state(state)  # alive as long as this step
        ds.prepare(self.state_slots)
        frame = self.frames[self.calls % FRAMES]
        frame.reuse()
        for name, buf in frame.staging.items():
            value = np.asarray(feeds[name])
            if value.shape != buf.shape:
                raise ValueError(f"{name} has shape {value.shape}, the step expects {buf.shape}")
            np.copyto(buf, value, casting="unsafe")
        if self.use_graph:
            self._replay(frame, ds)
        else:
            self._enqueue(frame, ds, timed=self.profile)
        frame.done.record(ds.stream)
        ds.device_is_newer = True
        self.calls += 1
        out = {name: DeviceValue(frame, name) for name in frame.results}
        frame.pending = list(out.values())
        if self.profile:
            self._collect_times()
        return out

    def _replay(self, frame: _Frame, ds: DeviceState) -> None:
        if frame.graph is None or frame.graph_state is not ds:
            frame.graph = self._capture(frame, ds)
            frame.graph_state = ds
            if frame.graph is None:  # capture unsupported here: launch one by one
                self.use_graph = False
                self._enqueue(frame, ds)
                return
        frame.graph.launch(ds.stream)

    def _capture(self, frame: _Frame, ds: DeviceState):
        stream = ds.stream
        try:
            stream.begin_capture()
        except Exception:
            return None
        try:
            self._enqueue(frame, ds)
        finally:
            graph = stream.end_capture()
        return graph

    def _enqueue(self, frame: _Frame, ds: DeviceState, timed: bool = False) -> None:
        """The step's work on the stream: inputs in, kernels and copies in order, results out."""
        stream = ds.stream
        for name, dev in self.inputs.items():
            host = frame.staging[name]
            _copy(dev.data.ptr, host.ctypes.data, host.nbytes, _HOST_TO_DEVICE, stream)
        self._events = []
        self._enqueue_steps(self.steps, ds, timed, {})
        for name, (where, dtype, shape) in self.layout.outputs.items():
            host = frame.results[name]
            src = self._pointer(("arena", where) if isinstance(where, int) else ("array", where), ds)
            _copy(host.ctypes.data, src, host.nbytes, _DEVICE_TO_HOST, stream)

    def _enqueue_steps(self, steps, ds: DeviceState, timed: bool, env: dict) -> None:
        """Kernels and copies in order; a loop's body once per value of its variable (a host
        loop: captured in a graph, one launch per body kernel and iteration)."""
        stream = ds.stream
        for s in steps:
            if isinstance(s, LoopStep):
                for t in s.values():
                    self._enqueue_steps(s.steps, ds, timed, {**env, s.var: t})
            elif isinstance(s, Launch):
                args = tuple(self.arena if a == "arena" else np.int32(env[a[len(VAR_ARG):]])
                             if a.startswith(VAR_ARG) else self._array(a, ds) for a in s.args)
                if timed:
                    import cupy
                    start, end = cupy.cuda.Event(), cupy.cuda.Event()
                    start.record(stream)
                self.functions[s.kernel](tuple(s.grid), tuple(s.block), args, shared_mem=0, stream=stream)
                if timed:
                    end.record(stream)
                    self._events.append((self._launch_index[id(s)], start, end))
            else:
                _copy(self._pointer(s.dst, ds), self._pointer(s.src, ds), s.nbytes, _DEVICE_TO_DEVICE, stream)

    def _array(self, name: str, ds: DeviceState):
        return self.inputs[name] if name in self.inputs else ds.arrays[name]

    def _pointer(self, ref, ds: DeviceState) -> int:
        kind, at = ref
        return self.arena.data.ptr + at if kind == "arena" else self._array(at, ds).data.ptr

    def _collect_times(self) -> None:
        import cupy
        if self._events:
            self._events[-1][2].synchronize()
        for i, start, end in self._events:  # (a launch in a loop body adds every iteration's time)
            self.seconds[i] += cupy.cuda.get_elapsed_time(start, end) / 1e3

    def profile_rows(self) -> list[tuple[str, tuple, float]]:
        """(kernel, .dln lines, seconds) per launch, from CUDA events (profiled steps only)."""
        if not self.profile or not self.calls:
            return []
        return [(name, tuple(lines), float(sec)) for (name, phase, lines), sec in zip(self.layout.kernels, self.seconds)]
