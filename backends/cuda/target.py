"""The CUDA target: the GPU architecture the code is compiled for and the NVRTC that does it.

Part of every cache key (`key()`) and artifact (`to_json()`). With a GPU, the architecture
is the device's (its sm_XX, or PTX for the newest one NVRTC knows when it does not know
the device); without one (dumps, tests, CI) it is DEFAULT_ARCH.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import nvrtc


@dataclass(frozen=True)
class CudaTarget:
    arch: str          # "sm_90", or "compute_90" (PTX the driver compiles when it loads it)
    nvrtc: str         # NVRTC's version, "13.5" ("none" when it does not load)
    device: str = ""   # the GPU's name, "" without one

    @staticmethod
    def detect(arch: str | None = None) -> "CudaTarget":
        device = ""
        if arch is None and nvrtc.gpu_available():
            import cupy
            dev = cupy.cuda.Device()
            capability = int(dev.compute_capability)
            device = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode(errors="replace")
            arch = nvrtc.arch_for(capability)
        version = ".".join(map(str, nvrtc.nvrtc_version())) if nvrtc.nvrtc_available() else "none"
        return CudaTarget(arch or nvrtc.DEFAULT_ARCH, version, device)

    def key(self) -> str:
        """What the compiled code depends on."""
        return f"cuda|{self.arch}|nvrtc {self.nvrtc}"

    def describe(self) -> str:
        where = self.device or "no GPU here: code for dumps and tests"
        return f"{self.arch} ({where}), NVRTC {self.nvrtc}"

    def to_json(self) -> dict:
        return {"arch": self.arch, "nvrtc": self.nvrtc}
