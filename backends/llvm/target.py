"""The CPU target: host CPU name and features from LLVM, vector width, thread count.

Part of every cache key and artifact; printed by `dlc run --verbose`. Overridable with
DLC_CPU / DLC_CPU_FEATURES / DLC_THREADS (read once, in Target.host()) or arguments.

`threads` is the most threads a step may use; the compiled code takes the count at run
time, so it is not part of the cache key. With `auto` (no count given) each step picks
its own count from its work and the cores other processes leave free (threads.py).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import llvmlite
import llvmlite.binding as llvm

# The IR the backend writes is LLVM 22's (llvmlite 0.48): with 0.44-0.47 (LLVM 20) the
# masked loads and stores fail to verify, and 0.43 has no opaque pointers. pyproject.toml
# asks pip for it; an environment that installed around that (--no-deps, a pinned
# llvmlite) finds the cpu target unavailable, saying why (CpuBackend.unavailable, which
# every command's backends.backend("cpu") consults).
LLVMLITE_MIN = (0, 48)


# LLVM fully unrolls a loop whose unrolled body stays under this many instructions (its
# default at O3: 300). Kernels' static trip counts made it unroll reductions over whole
# windows and batches into kilobytes of code that took most of the compile time; at 100
# the steps measured within noise (docs/performance.md, "Compile time").
UNROLL_THRESHOLD = 100


def llvmlite_too_old(version: str | None = None) -> str | None:
    """Why this llvmlite (or `version`) cannot serve the cpu target, or None."""
    version = version or llvmlite.__version__
    try:
        have = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:  # a development build: let it try
        return None
    if have >= LLVMLITE_MIN:
        return None
    need = ".".join(map(str, LLVMLITE_MIN))
    return (f"it needs llvmlite >= {need} (LLVM 22); this Python has llvmlite {version} "
            f"(pip install 'llvmlite>={need}')")


@functools.lru_cache(maxsize=1)
def _init_llvm() -> None:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.set_option("dlc", f"-unroll-threshold={UNROLL_THRESHOLD}")


@dataclass(frozen=True)
class Target:
    cpu: str
    features: str          # LLVM feature string, e.g. "+avx2,+fma,..."
    threads: int
    triple: str
    auto: bool = False     # choose each step's thread count (<= threads) from its work and the free cores

    @staticmethod
    def host(threads: int | str | None = None) -> "Target":
        """threads: a count, or None / "auto" (DLC_THREADS, else every usable core, at most 8,
        each step choosing how many of them it uses)."""
        _init_llvm()
        cpu = os.environ.get("DLC_CPU") or llvm.get_host_cpu_name()
        features = os.environ.get("DLC_CPU_FEATURES") or llvm.get_host_cpu_features().flatten()
        if threads in (None, "auto"):
            env = os.environ.get("DLC_THREADS", "auto")
            threads = None if env in ("", "0", "auto") else int(env)
        auto = threads is None
        if auto:
            from .threads import start_probe, usable_cores
            start_probe()  # measures the other processes' load while the model loads and compiles
            threads = min(len(usable_cores()), 8)
        return Target(cpu, features, max(1, int(threads)), llvm.get_process_triple(), auto)

    def has(self, feature: str) -> bool:
        return f"+{feature}" in self.features.split(",")

    @property
    def vector_width(self) -> int:
        """float32 lanes of the widest vector unit the code uses."""
        if self.has("avx512f"):
            return 16
        if self.has("avx2") or self.has("avx"):
            return 8
        return 4

    def without(self, *prefixes: str) -> "Target":
        """The same CPU with every feature starting with one of `prefixes` turned off, e.g.
        without("avx512") to generate and run the AVX2 code path on an AVX-512 host."""
        flags = [("-" + f[1:]) if f[1:].startswith(prefixes) else f for f in self.features.split(",")]
        return Target(self.cpu, ",".join(flags), self.threads, self.triple, self.auto)

    def key(self) -> str:
        """What code generated for this target depends on (cache keys, artifacts); not the
        thread count, which the code takes at run time."""
        return f"{self.triple}|{self.cpu}|{self.features}"

    def describe(self) -> str:
        threads = f"auto: up to {self.threads} threads" if self.auto else f"{self.threads} thread(s)"
        return f"{self.cpu} ({isa(self.features)}, {self.vector_width} float lanes), {threads}"

    def to_json(self) -> dict:
        """What an artifact records of the machine it was compiled for."""
        return {"cpu": self.cpu, "features": self.features, "threads": self.threads, "triple": self.triple}

    def machine(self, opt: int = 3):
        """LLVM's code generator for this CPU at optimization level `opt` (instruction
        selection and register allocation; the quick tier's is 1)."""
        _init_llvm()
        t = llvm.Target.from_triple(self.triple)
        # the small code model: constant pools are RIP-relative. (MCJIT's large model
        # addresses them through each object's GOT, which breaks when a step spans several
        # object files -- the kernels are compiled in parallel, one module per core.)
        return t.create_target_machine(cpu=self.cpu, features=self.features, opt=opt,
                                       reloc="pic", codemodel="small")


def isa(features: str) -> str:
    """The vector instruction set a feature string enables, in words."""
    f = features.split(",")
    return "AVX-512" if "+avx512f" in f else "AVX2" if "+avx2" in f else "AVX" if "+avx" in f else "SSE"
