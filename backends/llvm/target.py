"""The CPU target: host CPU name and features from LLVM, vector width, thread count.

Part of every cache key and artifact; printed by `dlc run --verbose`. Overridable with
DLC_CPU / DLC_CPU_FEATURES / DLC_THREADS (read once, in Target.host()) or arguments.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import llvmlite.binding as llvm


@functools.lru_cache(maxsize=1)
def _init_llvm() -> None:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()


@dataclass(frozen=True)
class Target:
    cpu: str
    features: str          # LLVM feature string, e.g. "+avx2,+fma,..."
    threads: int
    triple: str

    @staticmethod
    def host(threads: int | None = None) -> "Target":
        _init_llvm()
        cpu = os.environ.get("DLC_CPU") or llvm.get_host_cpu_name()
        features = os.environ.get("DLC_CPU_FEATURES") or llvm.get_host_cpu_features().flatten()
        if threads is None:
            threads = int(os.environ.get("DLC_THREADS", "0")) or min(os.cpu_count() or 1, 8)
        return Target(cpu, features, max(1, threads), llvm.get_process_triple())

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
        return Target(self.cpu, ",".join(flags), self.threads, self.triple)

    def key(self) -> str:
        """What code generated for this target depends on (cache keys, artifacts)."""
        return f"{self.triple}|{self.cpu}|{self.features}|{self.threads}"

    def describe(self) -> str:
        return f"{self.cpu} ({isa(self.features)}, {self.vector_width} float lanes), {self.threads} thread(s)"

    def to_json(self) -> dict:
        """What an artifact records of the machine it was compiled for."""
        return {"cpu": self.cpu, "features": self.features, "threads": self.threads, "triple": self.triple}

    def machine(self):
        _init_llvm()
        t = llvm.Target.from_triple(self.triple)
        # the small code model: constant pools are RIP-relative. (MCJIT's large model
        # addresses them through each object's GOT, which breaks when a step spans several
        # object files -- the kernels are compiled in parallel, one module per core.)
        return t.create_target_machine(cpu=self.cpu, features=self.features, opt=3,
                                       reloc="pic", codemodel="small")


def isa(features: str) -> str:
    """The vector instruction set a feature string enables, in words."""
    f = features.split(",")
    return "AVX-512" if "+avx512f" in f else "AVX2" if "+avx2" in f else "AVX" if "+avx" in f else "SSE"
