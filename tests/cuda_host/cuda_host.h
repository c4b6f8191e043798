// cuda_host.h: run CUDA C kernels on the CPU, to test generated kernels without a GPU.
//
// g++ -include cuda_host.h compiles a .cu source as host C++: the CUDA keywords become
// C++ (`__shared__` is `static`, `__global__` is nothing), and `cuda_host::launch` runs a
// kernel over a grid. Blocks run one after another; the threads of a block run as fibers
// (ucontext), one at a time, each until it reaches a barrier (`__syncthreads`) or a warp
// collective (shuffles, `__syncwarp`, the TF32 mma below), where it hands control back
// to the scheduler. A barrier opens when every live thread of the block waits at it; a
// warp collective completes when every live lane of the warp has arrived.
//
// What it cannot show: races (execution is serial and deterministic, so a missing
// barrier can go unnoticed), memory-model or timing effects, out-of-bounds accesses
// (the Python side guards argument buffers with canaries), and shared-memory limits.
// Atomics are plain read-modify-writes. A warp collective counts the live lanes, not the
// mask argument. Threads that exit stop counting for barriers (as on sm_70+).
#pragma once
#define CUDA_HOST_EMULATION 1

#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cstddef>
#include <type_traits>
#include <utility>

// --- keywords -----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static  // one instance, shared by the threads of the running block
#define __constant__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

namespace cuda_host {

enum State { RUNNING, AT_BARRIER, AT_WARP, DONE };
constexpr int SLOT = 64;  // bytes a lane contributes to a warp collective

struct Thread {
    ucontext_t ctx;
    uint3 idx;
    int lane, warp;
    State state;
    alignas(16) unsigned char slot[SLOT];
};

constexpr int MAX_THREADS = 1024;
constexpr size_t STACK = 256 * 1024;

inline Thread threads[MAX_THREADS];
inline unsigned char (*snapshots)[32][SLOT];  // per warp: the lanes' slots at completion
inline unsigned char* stacks;                   // MAX_THREADS fiber stacks, mapped once
inline ucontext_t scheduler;
// The running fiber. Volatile, so that code reading threadIdx after a switch reloads it.
inline Thread* volatile current;
inline uint3 block_idx;
inline dim3 block_dim, grid_dim;
inline void (*body)(void*);  // the kernel call, type-erased
inline void* body_arg;

// Back to the scheduler, waiting in `state`.
inline void yield(State state) {
    Thread* t = current;
    t->state = state;
    swapcontext(&t->ctx, &scheduler);
}

// Deposit `n` bytes, wait for the warp; returns the warp's deposits (lane i at i*SLOT).
// The scheduler copies them when the last lane arrives, so a lane that moves on to the
// next collective cannot overwrite what a slower lane still has to read.
inline const unsigned char* warp_exchange(const void* mine, size_t n) {
    Thread* t = current;
    memcpy(t->slot, mine, n);
    yield(AT_WARP);
    return &snapshots[t->warp][0][0];
}

inline void fiber_main() {
    body(body_arg);
    current->state = DONE;  // returning resumes the scheduler (uc_link)
}

// Run one block; 0 when every thread finished, 1 on a deadlock (threads of a warp
// waiting at different collectives, or some at a barrier while a warp is incomplete).
inline int run_block(int n) {
    int warps = (n + 31) / 32;
    for (int i = 0; i < n; ++i) {
        Thread& t = threads[i];
        unsigned bx = block_dim.x, by = block_dim.y;
        t.idx = {i % bx, (i / bx) % by, i / (bx * by)};
        t.lane = i % 32;
        t.warp = i / 32;
        t.state = RUNNING;
        getcontext(&t.ctx);
        t.ctx.uc_stack.ss_sp = stacks + (size_t)i * STACK;
        t.ctx.uc_stack.ss_size = STACK;
        t.ctx.uc_link = &scheduler;
        makecontext(&t.ctx, fiber_main, 0);
    }
    for (;;) {
        for (int i = 0; i < n; ++i) {  // run every runnable thread until it blocks or ends
            if (threads[i].state == RUNNING) {
                current = &threads[i];
                swapcontext(&scheduler, &threads[i].ctx);
            }
        }
        int live = 0, at_barrier = 0;
        bool released = false;
        for (int w = 0; w < warps; ++w) {  // complete the warp collectives everyone reached
            int lo = w * 32, hi = lo + 32 < n ? lo + 32 : n, waiting = 0, alive = 0;
            for (int i = lo; i < hi; ++i) {
                alive += threads[i].state != DONE;
                waiting += threads[i].state == AT_WARP;
                at_barrier += threads[i].state == AT_BARRIER;
            }
            live += alive;
            if (waiting > 0 && waiting == alive) {
                for (int i = lo; i < hi; ++i) {
                    memcpy(snapshots[w][i - lo], threads[i].slot, SLOT);
                    if (threads[i].state == AT_WARP) threads[i].state = RUNNING;
                }
                released = true;
            }
        }
        if (live == 0) return 0;
        if (released) continue;
        if (at_barrier != live) return 1;
        for (int i = 0; i < n; ++i)  // everyone alive is at the barrier: open it
            if (threads[i].state == AT_BARRIER) threads[i].state = RUNNING;
    }
}

// Status codes: 0 ok, 1 deadlock, 2 bad launch configuration.
inline int run_grid(const unsigned* dims, void (*fn)(void*), void* arg) {
    grid_dim = dim3(dims[0], dims[1], dims[2]);
    block_dim = dim3(dims[3], dims[4], dims[5]);
    long n = (long)block_dim.x * block_dim.y * block_dim.z;
    if (n < 1 || n > MAX_THREADS) return 2;
    if (!stacks) {
        void* p = mmap(nullptr, MAX_THREADS * STACK, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) return 2;
        stacks = static_cast<unsigned char*>(p);
        snapshots = new unsigned char[MAX_THREADS / 32][32][SLOT];
    }
    body = fn;
    body_arg = arg;
    for (unsigned z = 0; z < grid_dim.z; ++z)
        for (unsigned y = 0; y < grid_dim.y; ++y)
            for (unsigned x = 0; x < grid_dim.x; ++x) {
                block_idx = {x, y, z};
                if (int rc = run_block((int)n)) return rc;
            }
    return 0;
}

// launch(kernel, dims, params): params[i] points at the i-th argument's value, as in
// cuLaunchKernel's kernelParams; dims = grid x, y, z, block x, y, z.
template <class... A, size_t... I>
void call(void (*f)(A...), void** params, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(params[I])...);
}

template <class... A>
int launch(void (*f)(A...), const unsigned* dims, void** params) {
    struct Call { void (*f)(A...); void** params; } c{f, params};
    auto run = [](void* p) {
        auto* c = static_cast<Call*>(p);
        call(c->f, c->params, std::index_sequence_for<A...>{});
    };
    return run_grid(dims, run, &c);
}

}  // namespace cuda_host

// --- built-in variables -------------------------------------------------------------------------
#define threadIdx (::cuda_host::current->idx)
#define blockIdx (::cuda_host::block_idx)
#define blockDim (::cuda_host::block_dim)
#define gridDim (::cuda_host::grid_dim)
constexpr int warpSize = 32;

// --- synchronization and warp collectives -------------------------------------------------------
inline void __syncthreads() { cuda_host::yield(cuda_host::AT_BARRIER); }
inline void __syncwarp(unsigned = 0xffffffffu) {
    char none = 0;
    cuda_host::warp_exchange(&none, 0);
}
inline void __threadfence() {}
inline void __threadfence_block() {}

namespace cuda_host {
// Every lane deposits `v` and reads the value of lane src(own lane).
template <class T, class Src>
T shuffle(T v, Src src) {
    static_assert(sizeof(T) <= SLOT, "shuffled type too large");
    int lane = current->lane;
    const unsigned char* all = warp_exchange(&v, sizeof v);
    T out;
    memcpy(&out, all + src(lane) * SLOT, sizeof out);
    return out;
}
}  // namespace cuda_host

// Lanes outside the caller's `width` segment give back the caller's own value (CUDA rules).
template <class T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
    return cuda_host::shuffle(v, [=](int l) { return (l & ~(width - 1)) + (src & (width - 1)); });
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
    return cuda_host::shuffle(v, [=](int l) {
        int s = l + (int)d;
        return s < (l & ~(width - 1)) + width ? s : l;
    });
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) {
    return cuda_host::shuffle(v, [=](int l) {
        int s = l - (int)d;
        return s >= (l & ~(width - 1)) ? s : l;
    });
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    return cuda_host::shuffle(v, [=](int l) {
        int s = l ^ mask;
        return s < (l & ~(width - 1)) + width ? s : l;
    });
}
inline unsigned __ballot_sync(unsigned, int pred) {
    int p = pred != 0;
    const unsigned char* all = cuda_host::warp_exchange(&p, sizeof p);
    unsigned bits = 0;
    for (int i = 0; i < 32; ++i) {
        int q;
        memcpy(&q, all + i * cuda_host::SLOT, sizeof q);
        bits |= (unsigned)(q == 1) << i;  // lanes that never deposited hold stale bytes
    }
    return bits;
}
inline unsigned __activemask() { return 0xffffffffu; }

// --- atomics (no other thread runs in between, so plain updates are atomic) -------------------
template <class T>
T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T>
T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }
template <class T>
T atomicMin(T* p, T v) { T old = *p; *p = old < v ? old : v; return old; }
template <class T>
T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <class T>
T atomicCAS(T* p, T expected, T v) { T old = *p; if (old == expected) *p = v; return old; }

// --- math -----------------------------------------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; memcpy(&x, &i, 4); return x; }
template <class T>
T __ldg(const T* p) { return *p; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }

// --- TF32 tensor-core helpers (the templates' inline-PTX versions, emulated) ---------------------
// The templates define these with inline PTX unless DLC_TF32_HELPERS is already defined.
#define DLC_TF32_HELPERS 1

// cvt.rna.tf32.f32: round to nearest, ties away from zero, keeping 10 mantissa bits.
inline unsigned dlc_to_tf32(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;  // finite: round (may carry into exponent)
    return u & 0xffffe000u;
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 d, a, b, d: D(16x8) += A(16x8) B(8x8),
// distributed over the warp as the PTX ISA specifies (g = lane / 4, t = lane % 4):
//   a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]
//   b0 = B[t][g], b1 = B[t+4][g];   d[q] = D[g + 8 * (q / 2)][2 * t + q % 2]
inline void dlc_mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    unsigned mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    const unsigned char* all = cuda_host::warp_exchange(mine, sizeof mine);
    auto reg = [&](int lane, int r) {
        float v;
        memcpy(&v, all + lane * cuda_host::SLOT + r * 4, 4);
        return v;
    };
    auto A = [&](int row, int k) {  // the lane and register holding A[row][k]
        return reg((row % 8) * 4 + k % 4, (row >= 8) + 2 * (k >= 4));
    };
    auto B = [&](int k, int col) { return reg(col * 4 + k % 4, 4 + (k >= 4)); };
    int lane = cuda_host::current->lane, g = lane / 4, t = lane % 4;
    for (int q = 0; q < 4; ++q) {
        int row = g + 8 * (q / 2), col = 2 * t + q % 2;
        float acc = d[q];
        for (int k = 0; k < 8; ++k) acc = fmaf(A(row, k), B(k, col), acc);
        d[q] = acc;
    }
}
