"""dlc.backends.cuda.nvrtc: the ptxas report parser, availability reasons, target choice
(these run everywhere), and real NVRTC compiles (skipped without CuPy)."""
import sys

import pytest

from dlc.backends.cuda import nvrtc

LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'small' for 'sm_90'
ptxas info    : Function properties for small
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 0 barriers
ptxas info    : Compile time = 2.117 ms
ptxas info    : Compiling entry function 'big' for 'sm_90'
ptxas info    : Function properties for big
ptxas         .     40 bytes stack frame, 36 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16896 bytes smem, 380 bytes cmem[0]
"""


def test_parse_ptxas_log():
    r = nvrtc.parse_ptxas_log(LOG)
    assert r["small"] == nvrtc.KernelReport("small", registers=10)
    assert r["big"] == nvrtc.KernelReport("big", registers=255, spill_stores=36, spill_loads=28, stack_frame=40,
                                          shared_bytes=16896, constant_bytes=380, barriers=1)
    assert r["big"].spills and not r["small"].spills


@pytest.fixture
def fresh_checks():
    checks = (nvrtc.cupy_available, nvrtc.nvrtc_available, nvrtc.gpu_available)
    for f in checks:
        f.cache_clear()
    yield
    for f in checks:
        f.cache_clear()


def test_without_cupy_every_check_says_how_to_install(monkeypatch, fresh_checks):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    for check in (nvrtc.cupy_available, nvrtc.nvrtc_available, nvrtc.gpu_available):
        have = check()
        assert not have and have.reason == "CuPy is not installed: pip install 'dlc[cuda]'"
    with pytest.raises(nvrtc.CudaUnavailable, match="pip install"):
        nvrtc.compile_cuda("")


def test_gpu_check_gives_a_reason(fresh_checks):
    have = nvrtc.gpu_available()
    assert have.ok == (have.reason == "")
    if not have:  # e.g. "no NVIDIA GPU/driver found (cudaErrorInsufficientDriver)"
        assert have.reason.startswith(("no NVIDIA GPU", "CuPy"))


def test_arch_for_falls_back_to_ptx(monkeypatch):
    monkeypatch.setattr(nvrtc, "supported_archs", lambda: (75, 80, 86, 89, 90, 100, 120))
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (13, 5))
    assert nvrtc.arch_for(90) == "sm_90"
    assert nvrtc.arch_for(95) == "compute_90"   # unknown to NVRTC: PTX the driver compiles
    assert nvrtc.arch_for(130) == "compute_120"
    with pytest.raises(ValueError, match="cannot target"):
        nvrtc.arch_for(70)


def test_cache_key_covers_source_target_options_version(monkeypatch):
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (13, 5))
    base = nvrtc.cache_key("src", "sm_90", ["-O3"])
    assert base == nvrtc.cache_key("src", "sm_90", ["-O3"])
    assert len({base, nvrtc.cache_key("src2", "sm_90", ["-O3"]), nvrtc.cache_key("src", "sm_80", ["-O3"]),
                nvrtc.cache_key("src", "sm_90", [])}) == 4
    monkeypatch.setattr(nvrtc, "nvrtc_version", lambda: (13, 6))
    assert nvrtc.cache_key("src", "sm_90", ["-O3"]) != base


# --- with NVRTC ------------------------------------------------------------------------------------

SOURCE = r"""
extern "C" __global__ void __launch_bounds__(128) scale(float* __restrict__ y, const float* __restrict__ x, int n)
{
    __shared__ float s[128];
    const int i = blockIdx.x * 128 + threadIdx.x;
    s[threadIdx.x] = i < n ? x[i] : 0.0f;
    __syncthreads();
    if (i < n) y[i] = 2.0f * s[127 - threadIdx.x];
}
"""


@pytest.fixture(scope="module")
def have_nvrtc():
    pytest.importorskip("cupy", reason="CuPy is not installed: pip install 'dlc[cuda]'")
    have = nvrtc.nvrtc_available()
    if not have:
        pytest.skip(have.reason)


def test_cubin_ptx_and_report(have_nvrtc):
    mod = nvrtc.compile_cuda(SOURCE)
    assert mod.arch == "sm_90" and not mod.is_ptx
    assert mod.binary[:4] == b"\x7fELF"
    assert b".entry scale(" in mod.ptx
    report = mod.kernels["scale"]
    assert report.shared_bytes == 512 and report.barriers == 1 and not report.spills
    assert 0 < report.registers <= 255


def test_ptx_target(have_nvrtc):
    mod = nvrtc.compile_cuda(SOURCE, "compute_90")
    assert mod.is_ptx and mod.binary == mod.ptx and b".target sm_90" in mod.ptx
    assert mod.kernels == {}


def test_compile_error_carries_the_log_and_lines(have_nvrtc):
    bad = SOURCE + "__device__ int f()\n{\n    return undefined_name;\n}\n"
    with pytest.raises(nvrtc.CudaCompileError) as info:
        nvrtc.compile_cuda(bad)
    err = info.value
    assert 'identifier "undefined_name" is undefined' in err.log
    line = bad.splitlines().index("    return undefined_name;") + 1
    assert f"dlc.cu({line}): error" in err.log
    assert f">{line:5d} |     return undefined_name;" in str(err)  # the source line, numbered


def test_version(have_nvrtc):
    major, minor = nvrtc.nvrtc_version()
    assert major >= 12 and minor >= 0
    assert 90 in nvrtc.supported_archs()


def test_bad_arch_is_refused():
    with pytest.raises(ValueError, match="sm_90"):
        nvrtc.compile_cuda(SOURCE, "hopper")
