"""Compile CUDA C to PTX or to machine code (cubin) with NVRTC, through CuPy's bindings.

    mod = compile_cuda(source)                      # sm_90: cubin, its PTX, a ptxas report
    mod.binary, mod.ptx, mod.kernels["k"].registers, mod.kernels["k"].spill_stores
    mod = compile_cuda(source, arch="compute_90")   # PTX only (binary == ptx), no report

No GPU is needed to compile: NVRTC is a library. `gpu_available()` says whether one can
also run the result. Every availability check returns an `Availability`: truthy or not,
with a one-sentence reason when not, for messages and for pytest skips.

Limits: the report comes from ptxas' `-v` log, so it exists only for real architectures
(sm_XX), not for PTX; its format is not a stable interface and is parsed leniently (a
field missing from the log reads as 0). One source is one NVRTC program: kernels must be
`extern "C"` for their names to survive (no name-expression lowering is done).
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field

DEFAULT_ARCH = "sm_90"
INSTALL_HINT = "pip install 'dlc[cuda]'"


# --- availability ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""  # one sentence, empty when ok

    def __bool__(self) -> bool:
        return self.ok


@functools.lru_cache(maxsize=None)
def cupy_available() -> Availability:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return Availability(False, f"CuPy is not installed: {INSTALL_HINT}")
    except Exception as e:  # a broken install raises other errors at import
        return Availability(False, f"CuPy does not import ({type(e).__name__}: {_first_line(e)})")
    return Availability(True)


@functools.lru_cache(maxsize=None)
def nvrtc_available() -> Availability:
    have = cupy_available()
    if not have:
        return have
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()  # loads the library
    except Exception as e:
        return Availability(False, f"the NVRTC library does not load ({_first_line(e)}): "
                                   f"pip install nvidia-cuda-nvrtc")
    return Availability(True)


@functools.lru_cache(maxsize=None)
def gpu_available() -> Availability:
    have = cupy_available()
    if not have:
        return have
    try:
        from cupy.cuda import runtime
        count = runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: cudaErrorInsufficientDriver / NoDevice
        name = _first_line(e).split(":")[0]
        return Availability(False, f"no NVIDIA GPU/driver found ({name})")
    if count < 1:
        return Availability(False, "no NVIDIA GPU found (the driver reports 0 devices)")
    return Availability(True)


@functools.lru_cache(maxsize=None)
def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library, e.g. (13, 5): part of every cache key."""
    from cupy.cuda import nvrtc
    return tuple(nvrtc.getVersion())


@functools.lru_cache(maxsize=None)
def supported_archs() -> tuple[int, ...]:
    """Compute capabilities NVRTC can target, e.g. (75, 80, ..., 90, ...)."""
    from cupy.cuda import nvrtc
    return tuple(nvrtc.getSupportedArchs())


def arch_for(capability: int) -> str:
    """The target for a device of compute capability `capability` (e.g. 90): its own
    machine code when NVRTC knows it, else PTX for the newest older architecture NVRTC
    knows (the driver compiles that PTX for the device when it loads it)."""
    archs = supported_archs()
    if capability in archs:
        return f"sm_{capability}"
    older = [a for a in archs if a <= capability]
    if not older:
        raise ValueError(f"NVRTC {nvrtc_version()} cannot target compute capability {capability}")
    return f"compute_{max(older)}"


def cache_key(source: str, arch: str = DEFAULT_ARCH, options=()) -> str:
    """A hex digest identifying a compilation: source, target, options, NVRTC version."""
    h = hashlib.sha256()
    for part in (source, arch, "\0".join(options), repr(nvrtc_version())):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()


# --- compiling ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelReport:
    """What ptxas said about one kernel (byte counts, as ptxas prints them)."""
    name: str
    registers: int = 0
    spill_stores: int = 0  # bytes
    spill_loads: int = 0   # bytes
    stack_frame: int = 0   # bytes
    shared_bytes: int = 0  # static shared memory
    constant_bytes: int = 0
    barriers: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


@dataclass(frozen=True)
class CudaModule:
    arch: str                 # "sm_90" (binary is a cubin) or "compute_90" (binary is PTX)
    binary: bytes
    ptx: bytes                # the PTX NVRTC generated on the way (for either kind of arch)
    log: str
    kernels: dict[str, KernelReport] = field(default_factory=dict)  # empty for PTX

    @property
    def is_ptx(self) -> bool:
        return self.arch.startswith("compute_")


class CudaUnavailable(RuntimeError):
    """CuPy or NVRTC is missing; the message says which and how to install it."""


class CudaCompileError(RuntimeError):
    """NVRTC rejected the source; `log` is NVRTC's log, the message adds the source lines
    it points at (numbered as in the log)."""

    def __init__(self, log: str, source: str, filename: str):
        self.log, self.source = log, source
        super().__init__(f"CUDA compilation failed:\n{log.strip()}\n{_quote_lines(log, source, filename)}")


def compile_cuda(source: str, arch: str = DEFAULT_ARCH, options=(), *, fast_math: bool = False,
                 filename: str = "dlc.cu") -> CudaModule:
    """Compile `source` for `arch`: "sm_XX" gives a cubin and a per-kernel report,
    "compute_XX" gives PTX. Raises CudaCompileError on a compile error, CudaUnavailable
    (with the reason) when CuPy or NVRTC is missing."""
    if not re.fullmatch(r"(sm|compute)_\d+[af]?", arch):
        raise ValueError(f"arch must look like sm_90 or compute_90, got {arch!r}")
    have = nvrtc_available()
    if not have:
        raise CudaUnavailable(have.reason)
    from cupy.cuda import nvrtc
    opts = [f"--gpu-architecture={arch}", "--std=c++17", *options]
    if fast_math:
        opts.append("--use_fast_math")
    ptx = arch.startswith("compute_")
    if not ptx:
        opts.append("-Xptxas=-v")
    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError:
            raise CudaCompileError(nvrtc.getProgramLog(prog), source, filename) from None
        log, text = nvrtc.getProgramLog(prog), _as_bytes(nvrtc.getPTX(prog))
        if ptx:
            return CudaModule(arch, text, text, log)
        return CudaModule(arch, _as_bytes(nvrtc.getCUBIN(prog)), text, log, parse_ptxas_log(log))
    finally:
        nvrtc.destroyProgram(prog)


# --- the ptxas report ---------------------------------------------------------------------------
# ptxas info    : Compiling entry function 'k' for 'sm_90'
# ptxas info    : Function properties for k
# ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
# ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem, 368 bytes cmem[0]

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FIELDS = {
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
    "barriers": re.compile(r"used (\d+) barriers"),
    "shared_bytes": re.compile(r"(\d+) bytes smem"),
    "constant_bytes": re.compile(r"(\d+) bytes cmem\[0\]"),
}


def parse_ptxas_log(log: str) -> dict[str, KernelReport]:
    """Per-kernel figures from a `-Xptxas=-v` log (only entry functions are reported)."""
    reports, name, values = {}, None, {}
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            if name is not None:
                reports[name] = KernelReport(name, **values)
            name, values = m.group(1), {}
            continue
        if name is None:
            continue
        for key, pattern in _FIELDS.items():
            hit = pattern.search(line)
            if hit:
                values[key] = int(hit.group(1))
    if name is not None:
        reports[name] = KernelReport(name, **values)
    return reports


# --- helpers ------------------------------------------------------------------------------------

def _as_bytes(data) -> bytes:
    return data if isinstance(data, bytes) else str(data).encode()


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def _quote_lines(log: str, source: str, filename: str, context: int = 1) -> str:
    """The source lines named by `file(LINE): error` entries of the log, numbered."""
    lines = source.splitlines()
    wanted = sorted({int(n) for n in re.findall(rf"{re.escape(filename)}\((\d+)\)", log)})
    shown = sorted({i for n in wanted for i in range(n - context, n + context + 1) if 1 <= i <= len(lines)})
    out, last = [], None
    for i in shown:
        if last is not None and i != last + 1:
            out.append("   ...")
        out.append(f"{'>' if i in wanted else ' '}{i:5d} | {lines[i - 1]}")
        last = i
    return "\n".join(out)
