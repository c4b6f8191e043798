"""Run CUDA C kernels on the CPU: compile the source as host C++ with g++ and the
cuda_host.h header, then launch a kernel over a grid on numpy arrays through ctypes.

    mod = HostModule(source)                       # builds (or reuses) a shared library
    mod.launch("k", grid=(4, 1, 1), block=(128, 1, 1), y, x, 1000)

Arguments: numpy arrays become pointers to their data (written back in place, as a
device round trip would), Python ints become `int`, floats `float`; pass a ctypes
value for any other scalar type. Each array travels inside a buffer with a guard zone of
0xFF bytes on both sides (NaN as float, -1 as int): a kernel writing outside its array
raises `OutOfBounds`; one reading outside it sees NaNs.

It tests arithmetic and indexing, not concurrency: see cuda_host.h for what it cannot show.
Built libraries are cached by content hash in a temporary directory.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HEADER = Path(__file__).with_name("cuda_host.h")
FLAGS = ("-std=c++17", "-O0", "-fPIC", "-shared", "-fno-strict-aliasing", "-w")
GUARD = 1024  # bytes on each side of an array argument

_KERNEL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")


class OutOfBounds(AssertionError):
    pass


def kernel_names(source: str) -> list[str]:
    return _KERNEL.findall(source)


def _launchers(names) -> str:
    """One C entry point per kernel: launch_<k>(dims[6], params) -> status."""
    return "\n".join(f'extern "C" int launch_{n}(const unsigned* dims, void** params) '
                     f"{{ return cuda_host::launch({n}, dims, params); }}" for n in names)


class HostModule:
    def __init__(self, source: str, build_dir: str | os.PathLike | None = None):
        self.source = source
        self.names = kernel_names(source)
        full = f"{source}\n\n// --- host launchers ---\n{_launchers(self.names)}\n"
        key = hashlib.sha256((HEADER.read_text() + "\0".join(FLAGS) + full).encode()).hexdigest()[:24]
        directory = Path(build_dir or Path(tempfile.gettempdir()) / "dlc-cuda-host")
        directory.mkdir(parents=True, exist_ok=True)
        lib = directory / f"{key}.so"
        if not lib.exists():
            _build(full, directory / f"{key}.cu", lib)
        self.lib = ctypes.CDLL(str(lib))

    def launch(self, name: str, grid, block, *args) -> None:
        if name not in self.names:
            raise KeyError(f"no kernel {name!r} in the module (kernels: {', '.join(self.names)})")
        dims = (ctypes.c_uint * 6)(*_dim3(grid), *_dim3(block))
        values, guarded = [], []
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                buf = _Guarded(a, i)
                guarded.append(buf)
                values.append(ctypes.c_void_p(buf.address))
            elif isinstance(a, (bool, np.bool_)):
                values.append(ctypes.c_bool(a))
            elif isinstance(a, (int, np.integer)):
                values.append(ctypes.c_int(int(a)))
            elif isinstance(a, (float, np.floating)):
                values.append(ctypes.c_float(float(a)))
            elif isinstance(a, ctypes._SimpleCData):
                values.append(a)
            else:
                raise TypeError(f"argument {i}: cannot pass {type(a).__name__} to a kernel")
        params = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
        fn = getattr(self.lib, f"launch_{name}")
        fn.restype = ctypes.c_int
        rc = fn(dims, params)
        if rc == 1:
            raise RuntimeError(f"{name}: deadlock (threads wait at different barriers or warp collectives)")
        if rc == 2:
            raise ValueError(f"{name}: bad launch configuration grid={grid} block={block}")
        for buf in guarded:
            buf.finish()


def _dim3(d) -> tuple[int, int, int]:
    d = (d,) if isinstance(d, int) else tuple(d)
    return tuple(d) + (1,) * (3 - len(d))


def _build(source: str, cu: Path, lib: Path) -> None:
    own = cu.with_suffix(f".{os.getpid()}.cu")  # a concurrent build of the same key writes its own
    own.write_text(source)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = ["g++", *FLAGS, "-include", str(HEADER), "-x", "c++", str(own), "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"g++ failed on {own}:\n{done.stderr[-6000:]}")
    os.replace(own, cu)   # the source beside its library, for reading
    os.replace(tmp, lib)  # atomic: a concurrent build of the same key is harmless


class _Guarded:
    """An array copied into the middle of a 0xFF-filled buffer; finish() checks the
    guard zones and copies the data back."""

    def __init__(self, array: np.ndarray, position: int):
        if not array.flags.c_contiguous:
            raise ValueError(f"argument {position}: arrays must be C-contiguous")
        self.array, self.position = array, position
        self.raw = np.full(array.nbytes + 2 * GUARD, 0xFF, dtype=np.uint8)
        self.body = self.raw[GUARD:GUARD + array.nbytes]
        self.body[:] = array.reshape(-1).view(np.uint8)
        self.address = self.body.ctypes.data

    def finish(self) -> None:
        for side, zone in (("before", self.raw[:GUARD]), ("after", self.raw[GUARD + self.array.nbytes:])):
            if not (zone == 0xFF).all():
                raise OutOfBounds(f"argument {self.position}: the kernel wrote {side} the array")
        self.array.reshape(-1).view(np.uint8)[:] = self.body
