"""A stand-in for the part of CuPy the CUDA runtime uses, on the CPU, to test the runtime's
own logic (device state, frames, graph capture and replay, deferred results, profiles)
without a GPU.

    with fake_cupy.installed(monkeypatch) as fake:   # sys.modules["cupy"], ["cupyx"]
        step = CudaStep(source.encode(), layout, target)   # the "binary" is the CUDA C source

Device arrays are numpy arrays; pointers are addresses into them; kernels run through
the host emulation (HostModule, built from the source passed to Module.load). Work on a
stream runs at once, except while the stream captures: then it is recorded, and a graph
launch runs the recording again. Everything is synchronous, so this tests what the
runtime enqueues and in which order, not timing or overlap. It is strict where CuPy and
CUDA are: `ndarray.set` wants the exact shape, captured streams refuse synchronizing calls
and CuPy's own host transfers (MemoryPointer.copy_*_host_async), and `runtime.memcpyAsync`
copies only within allocations, between pinned host memory and the device for its kind.
"""
from __future__ import annotations

import contextlib
import ctypes
import sys
import types

import numpy as np

from . import HostModule


_STREAMS: dict[int, "Stream"] = {}
_DEVICE: list[np.ndarray] = []  # every allocation, to check raw copies against
_PINNED: list[np.ndarray] = []


class Stream:
    def __init__(self, non_blocking: bool = False):
        self.recording = None
        self.captures = 0
        self.ptr = id(self)
        _STREAMS[self.ptr] = self

    def do(self, fn) -> None:
        if self.recording is not None:
            self.recording.append(fn)
        else:
            fn()

    def begin_capture(self, mode=None) -> None:
        assert self.recording is None, "already capturing"
        self.recording = []

    def end_capture(self) -> "Graph":
        graph, self.recording = Graph(self.recording), None
        self.captures += 1
        return graph

    def synchronize(self) -> None:
        assert self.recording is None, "synchronize while capturing"


class Graph:
    def __init__(self, ops):
        self.ops = ops
        self.launches = 0

    def launch(self, stream=None) -> None:
        self.launches += 1
        for op in self.ops:
            stream.do(op)


class Event:
    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.recorded = False

    def record(self, stream=None) -> None:
        assert stream is None or stream.recording is None, "an event recorded inside a capture"
        self.recorded = True

    @property
    def done(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def get_elapsed_time(start: Event, end: Event) -> float:
    assert start.recorded and end.recorded
    return 0.01  # milliseconds


class MemoryPointer:
    def __init__(self, owner: np.ndarray, offset: int = 0):
        self.owner, self.offset = owner, offset

    @property
    def ptr(self) -> int:
        return self.owner.ctypes.data + self.offset

    def __add__(self, n: int) -> "MemoryPointer":
        return MemoryPointer(self.owner, self.offset + n)

    def _check(self, nbytes: int) -> None:
        assert 0 <= self.offset and self.offset + nbytes <= self.owner.nbytes, "copy outside the allocation"

    def copy_from_host_async(self, src: int, nbytes: int, stream=None) -> None:
        _refuse_while_capturing(stream, "H2D")
        self._check(nbytes)
        stream.do(lambda: ctypes.memmove(self.ptr, src, nbytes))

    def copy_to_host_async(self, dst: int, nbytes: int, stream=None) -> None:
        _refuse_while_capturing(stream, "D2H")
        self._check(nbytes)
        stream.do(lambda: ctypes.memmove(dst, self.ptr, nbytes))

    def copy_from_device_async(self, src: "MemoryPointer", nbytes: int, stream=None) -> None:
        self._check(nbytes)
        src._check(nbytes)
        stream.do(lambda: ctypes.memmove(self.ptr, src.ptr, nbytes))


def _refuse_while_capturing(stream, what: str) -> None:
    if stream is not None and stream.recording is not None:  # CuPy 14's own message
        raise RuntimeError(f"the current stream is capturing, so {what} transfers are disallowed")


def _inside(ptr: int, nbytes: int, allocations: list) -> bool:
    return any(a.ctypes.data <= ptr and ptr + nbytes <= a.ctypes.data + a.nbytes for a in allocations)


def memcpyAsync(dst: int, src: int, size: int, kind: int, stream: int) -> None:  # noqa: N802 - CuPy's name
    """cupy.cuda.runtime.memcpyAsync: kind 1 host to device, 2 device to host, 3 device to device."""
    dst_kind, src_kind = {1: (_DEVICE, _PINNED), 2: (_PINNED, _DEVICE), 3: (_DEVICE, _DEVICE)}[kind]
    assert _inside(dst, size, dst_kind) and _inside(src, size, src_kind), "copy outside the allocations of its kind"
    _STREAMS[stream].do(lambda: ctypes.memmove(dst, src, size))


class ndarray:  # noqa: N801 - CuPy's name
    def __init__(self, shape, dtype):
        self.host = np.full(shape, 0xAB if np.dtype(dtype).kind in "iub" else np.nan, dtype=dtype)
        _DEVICE.append(self.host)

    shape = property(lambda self: self.host.shape)
    dtype = property(lambda self: self.host.dtype)
    nbytes = property(lambda self: self.host.nbytes)

    @property
    def data(self) -> MemoryPointer:
        return MemoryPointer(self.host.reshape(-1).view(np.uint8))

    def set(self, arr, stream=None) -> None:
        if arr.shape != self.host.shape or arr.dtype != self.host.dtype:
            raise ValueError(f"set: {arr.dtype}{arr.shape} into {self.host.dtype}{self.host.shape}")
        value = np.array(arr, copy=True)
        (stream or Stream()).do(lambda: np.copyto(self.host, value))

    def get(self, stream=None, order="C", out=None, blocking=True):
        assert stream is None or stream.recording is None, "get while capturing"
        return self.host.copy()


def empty(shape, dtype=np.float32) -> ndarray:
    return ndarray(shape, dtype)


def zeros(shape, dtype=np.float32) -> ndarray:
    a = ndarray(shape, dtype)
    a.host[...] = 0
    return a


class Function:
    def __init__(self, module: "Module", name: str):
        self.module, self.name = module, name

    def __call__(self, grid, block, args, shared_mem=0, stream=None, enable_cooperative_groups=False):
        assert isinstance(grid, tuple) and isinstance(block, tuple) and isinstance(args, tuple)
        arrays = [a.host if isinstance(a, ndarray) else a for a in args]
        self.module.calls += 1
        stream.do(lambda: self.module.host.launch(self.name, grid, block, *arrays))


class Module:
    def __init__(self):
        self.host, self.calls = None, 0

    def load(self, binary: bytes) -> None:
        self.host = HostModule(binary.decode())

    def get_function(self, name: str) -> Function:
        if name not in self.host.names:
            raise KeyError(name)
        return Function(self, name)


def empty_pinned(shape, dtype=np.float32, order="C") -> np.ndarray:
    a = np.empty(shape, dtype=dtype, order=order)
    _PINNED.append(a)
    return a


@contextlib.contextmanager
def installed(monkeypatch):
    """Put the fake in sys.modules as `cupy` and `cupyx` for the duration."""
    cupy = types.ModuleType("cupy")
    cuda = types.ModuleType("cupy.cuda")
    function = types.ModuleType("cupy.cuda.function")
    function.Module, function.Function = Module, Function
    cuda.function, cuda.Stream, cuda.Event, cuda.get_elapsed_time = function, Stream, Event, get_elapsed_time
    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.memGetInfo = lambda: (16 << 30, 16 << 30)  # (free, total): a 16 GiB device
    runtime.memcpyAsync = memcpyAsync
    cuda.runtime = runtime
    cupy.cuda, cupy.empty, cupy.zeros, cupy.ndarray = cuda, empty, zeros, ndarray
    cupyx = types.ModuleType("cupyx")
    cupyx.empty_pinned = empty_pinned
    for name, module in (("cupy", cupy), ("cupy.cuda", cuda), ("cupy.cuda.function", function),
                         ("cupy.cuda.runtime", runtime), ("cupyx", cupyx)):
        monkeypatch.setitem(sys.modules, name, module)
    try:
        yield sys.modules[__name__]
    finally:
        for registry in (_STREAMS, _DEVICE, _PINNED):
            registry.clear()
