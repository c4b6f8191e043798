"""The CUDA templates on a real GPU: every case of test_cuda_templates, compiled by NVRTC
for the device (its sm_XX, or PTX when NVRTC does not know it), launched through CuPy and
held to the same numpy bounds. Skipped, with the reason, where there is no GPU (CI).

Arrays go to the device before each launch and come back after it, so a case's kernels
share state (scatter_add's index lists) through the host arrays as in the emulation.
"""
import numpy as np
import pytest

import test_cuda_templates as tt
from dlc.backends.cuda import nvrtc


@pytest.fixture(scope="module")
def device():
    pytest.importorskip("cupy", reason="CuPy is not installed: pip install 'dlc[cuda]'")
    have = nvrtc.gpu_available()
    if not have:
        pytest.skip(have.reason)
    import cupy
    arch = nvrtc.arch_for(int(cupy.cuda.Device().compute_capability))
    compiled = nvrtc.compile_cuda(tt.T.module(*tt.ALL_KERNELS), arch)
    module = cupy.cuda.function.Module()
    module.load(compiled.binary)  # a cubin, or PTX the driver compiles
    return module


def _to_device(a):
    import cupy
    if isinstance(a, np.ndarray):
        return cupy.asarray(a)
    return np.int32(a) if isinstance(a, int) else np.float32(a)


@pytest.mark.parametrize("case", tt.CASES, ids=lambda c: c.id)
def test_matches_numpy_on_gpu(device, case):
    launches, out, want, bound = case.make()
    for kernel, args in zip(case.kernels, launches):
        on_device = [_to_device(a) for a in args]
        device.get_function(kernel.name)(kernel.grid, kernel.block, tuple(on_device))
        for host, dev in zip(args, on_device):
            if isinstance(host, np.ndarray):
                host[...] = dev.get()
    got = np.asarray(out, dtype=np.float64)
    assert np.isfinite(got).all(), "elements left unwritten (NaN-filled output)"
    assert (np.abs(got - want) <= bound).all()
