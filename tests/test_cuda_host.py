"""The host emulation of CUDA (tests/cuda_host) on kernels whose threads cooperate:
barriers, shared memory, warp shuffles, the emulated TF32 mma, and its failure reports."""
import numpy as np
import pytest

from cuda_host import HostModule, OutOfBounds, kernel_names

SOURCE = r"""
// block-wide tree reduction over shared memory: one partial sum per block
extern "C" __global__ void __launch_bounds__(128) tree_sum(const float* __restrict__ x, float* __restrict__ out, int n)
{
    __shared__ float s[128];
    const int t = threadIdx.x, i = blockIdx.x * 128 + t;
    s[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int half = 64; half > 0; half /= 2) {
        if (t < half) s[t] += s[t + half];
        __syncthreads();
    }
    if (t == 0) out[blockIdx.x] = s[0];
}

// warp-shuffle reduction: each warp sums 32 values with __shfl_down_sync, then warp 0
// sums the warps' results with __shfl_xor_sync (every lane ends with the total)
extern "C" __global__ void shfl_sum(const float* __restrict__ x, float* __restrict__ out, int n)
{
    __shared__ float warp_sums[32];
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    float v = 0.0f;
    for (int i = t; i < n; i += blockDim.x) v += x[i];
    for (int d = 16; d > 0; d /= 2) v += __shfl_down_sync(0xffffffffu, v, d);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x / 32) ? warp_sums[lane] : 0.0f;
        for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
        out[lane] = v;
    }
}

// threads of a 2-D block see their own threadIdx after barriers; a 3-D grid
extern "C" __global__ void coords(int* out)
{
    const int t = threadIdx.y * blockDim.x + threadIdx.x;
    const int b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    __syncthreads();
    out[(b * blockDim.x * blockDim.y + t) * 2] = threadIdx.x;
    __syncthreads();
    out[(b * blockDim.x * blockDim.y + t) * 2 + 1] = threadIdx.y;
}

// lanes 0..15 wait at a shuffle, lanes 16..31 at a barrier: a deadlock
extern "C" __global__ void divergent(float* out)
{
    float v = 1.0f;
    if (threadIdx.x < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
    else __syncthreads();
    out[threadIdx.x] = v;
}

extern "C" __global__ void writes_past_end(float* out, int n)
{
    out[threadIdx.x] = 1.0f;  // no bounds check
}

// D = A B with one m16n8k8 TF32 mma: fragments loaded as the PTX ISA lays them out
extern "C" __global__ void mma_16x8x8(const float* a, const float* b, float* d)
{
    const int lane = threadIdx.x, g = lane / 4, t = lane % 4;
    unsigned fa[4] = {dlc_to_tf32(a[g * 8 + t]), dlc_to_tf32(a[(g + 8) * 8 + t]),
                      dlc_to_tf32(a[g * 8 + t + 4]), dlc_to_tf32(a[(g + 8) * 8 + t + 4])};
    unsigned fb[2] = {dlc_to_tf32(b[t * 8 + g]), dlc_to_tf32(b[(t + 4) * 8 + g])};
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    dlc_mma_tf32(acc, fa, fb);
    for (int q = 0; q < 4; ++q) d[(g + 8 * (q / 2)) * 8 + 2 * t + q % 2] = acc[q];
}
"""


@pytest.fixture(scope="module")
def mod(tmp_path_factory):
    return HostModule(SOURCE, tmp_path_factory.mktemp("cuda_host"))


def test_kernel_names():
    assert kernel_names(SOURCE) == ["tree_sum", "shfl_sum", "coords", "divergent", "writes_past_end",
                                    "mma_16x8x8"]


@pytest.mark.parametrize("n", [1, 127, 128, 300])
def test_shared_memory_tree_reduction(mod, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    blocks = -(-n // 128)
    out = np.zeros(blocks, np.float32)
    mod.launch("tree_sum", blocks, 128, x, out, n)
    want = [x[i * 128:(i + 1) * 128].astype(np.float64).sum() for i in range(blocks)]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads,n", [(32, 32), (64, 1000), (256, 257)])
def test_warp_shuffle_reduction(mod, threads, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    out = np.zeros(32, np.float32)
    mod.launch("shfl_sum", 1, threads, x, out, n)
    np.testing.assert_allclose(out, np.full(32, x.astype(np.float64).sum()), rtol=1e-5, atol=1e-4)


def test_thread_and_block_indices(mod):
    grid, block = (2, 3, 2), (4, 3, 1)
    out = np.full((12, 12, 2), -1, np.int32)
    mod.launch("coords", grid, block, out)
    tx, ty = np.meshgrid(np.arange(4), np.arange(3))
    for b in range(12):
        np.testing.assert_array_equal(out[b, :, 0], tx.ravel())
        np.testing.assert_array_equal(out[b, :, 1], ty.ravel())


def test_divergent_collectives_are_a_deadlock(mod):
    with pytest.raises(RuntimeError, match="deadlock"):
        mod.launch("divergent", 1, 32, np.zeros(32, np.float32))


def test_writes_outside_an_array_are_caught(mod):
    with pytest.raises(OutOfBounds, match="argument 0"):
        mod.launch("writes_past_end", 1, 40, np.zeros(32, np.float32), 32)


def test_tf32_mma_fragment_layout(mod):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal((8, 8)).astype(np.float32)
    d = np.zeros((16, 8), np.float32)
    mod.launch("mma_16x8x8", 1, 32, a, b, d)
    # TF32 keeps 10 mantissa bits: relative rounding error 2^-11 per input
    np.testing.assert_allclose(d, a.astype(np.float64) @ b, rtol=0, atol=8 * 2.0 ** -10 * 4)
    assert not np.allclose(d, a.astype(np.float64) @ b, rtol=0, atol=1e-6)  # really rounded
