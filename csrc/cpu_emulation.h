// CPU emulation of the small CUDA subset that attn_kernels.cuh uses, so that the kernels'
// own code (tiling, addressing, masking, softmax, backward, launch logic) can be run and
// checked against the PyTorch reference on a machine without a GPU
// (tests/test_cuda_build.py::test_emulated_kernels).  Testing aid only: never part of the
// extension build (setup/JIT compile csrc/*.cu and binding.cpp).
//
// Model: the CTAs of a launch run one after another; the threads of a CTA are fibers
// (ucontext) on one OS thread, switched only at __syncthreads/__syncwarp/shuffles, so
// barriers and warp shuffles have their CUDA meaning and there are no data races.  Each
// warp runs as far ahead as the barriers allow before the next warp runs, so a missing
// __syncthreads shows up as a read of data another warp has not produced yet.
// Shared memory is filled with 0xFF (NaN) before every CTA, so reads of uninitialised
// shared memory show up as NaN.  The tensor-core instructions of warp_mma.cuh (ldmatrix,
// mma.sync m16n8k16) are implemented lane by lane from the PTX ISA fragment layouts
// (products in fp32, like tensor cores with fp32 accumulation), with their alignment rules.
// A deadlock (threads waiting at barriers that can never complete) aborts.
//
// cp.async (cp_async16 / cp_async_commit / cp_async_wait<N>) is modelled as the latest
// and the earliest a copy may land: when issued, the destination is overwritten with NaN
// (0xFF bytes) and marked pending; the data arrives only when the issuing thread waits for
// its group.  So a tile read before the wait that covers it (a misplaced or missing
// cp.async.wait_group, or a missing barrier after it: other threads' copies are still
// pending) reads NaN, and a copy into a buffer that another thread still reads (a missing
// barrier before reuse) destroys the data it reads.  ldmatrix rows and the operands of the
// fp32 kernels' warp_mm (AVSTFP_CHECK_READY) are checked to have no pending byte,
// with an explicit message.  Other checks: 16-byte alignment
// of both addresses and a destination inside shared memory; no copy still pending when
// the CTA ends.  16-byte global stores (store16) check their alignment.
//
// Use: one translation unit containing only  #include "cpu_emulation.h"  compiled with
// g++ -std=c++17 -shared -fPIC; the extern "C" entry points are at the bottom.
#pragma once
#define AVSTFP_CPU_EMULATION 1

#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__

using std::max;
using std::min;

// small grid.x, so that every multi-CTA test also covers the wrap onto grid.y
#ifndef AVSTFP_MAX_GRID_X
#define AVSTFP_MAX_GRID_X 3LL
#endif

// ------------------------------------------------------------------ runtime types
enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
typedef void* cudaStream_t;

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// ------------------------------------------------------------------ 16-bit floats
struct __half { _Float16 v; };
struct __nv_bfloat16 { uint16_t bits; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }   // RNE
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t x = (uint32_t)h.bits << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if (std::isnan(f)) return __nv_bfloat16{0x7fc0};
    x += 0x7fffu + ((x >> 16) & 1u);   // round to nearest even
    return __nv_bfloat16{(uint16_t)(x >> 16)};
}
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit types");
inline unsigned short __half_as_ushort(__half h) {
    unsigned short u;
    std::memcpy(&u, &h, 2);
    return u;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

namespace avstfp_emu {
inline float tof(float x) { return x; }
inline float tof(__half x) { return __half2float(x); }
inline float tof(__nv_bfloat16 x) { return __bfloat162float(x); }

inline std::string g_error;
inline void fail(const std::string& m) {
    if (g_error.empty()) g_error = m;
}

// ------------------------------------------------------------------ fibers
constexpr size_t kStack = 256 * 1024;

struct AsyncCopy {
    unsigned char* dst;
    const unsigned char* src;   // null: zero-fill
};
struct AsyncState {
    std::vector<AsyncCopy> open;                    // issued, not yet committed
    std::vector<std::vector<AsyncCopy>> groups;     // committed, oldest first
};

struct Block {
    unsigned nthreads = 0;
    std::vector<AsyncState> async;
    int cur = -1;
    ucontext_t main_ctx;
    std::vector<ucontext_t> ctx;
    std::vector<char> done;
    unsigned long progress = 0;
    unsigned bar_gen = 0, bar_arrived = 0;
    std::vector<unsigned> wgen, warrived;
    std::vector<float> slot;
    std::vector<const void*> xptr;                 // ldmatrix row addresses, per thread
    std::vector<std::array<uint32_t, 6>> xreg;     // mma A (4) and B (2) registers
    std::function<void()> body;
};
inline Block* g_blk = nullptr;
inline std::vector<std::vector<char>> g_stacks;

inline void yield() { swapcontext(&g_blk->ctx[g_blk->cur], &g_blk->main_ctx); }

inline void trampoline() {
    g_blk->body();
    g_blk->done[g_blk->cur] = 1;
    g_blk->progress++;
}   // returns to main_ctx through uc_link

inline void syncthreads() {
    Block& b = *g_blk;
    const unsigned gen = b.bar_gen;
    b.progress++;
    if (++b.bar_arrived == b.nthreads) {
        b.bar_arrived = 0;
        b.bar_gen++;
        return;
    }
    while (b.bar_gen == gen) yield();
}

inline void syncwarp() {
    Block& b = *g_blk;
    const unsigned w = threadIdx.x / 32;
    const unsigned n = std::min(32u, b.nthreads - 32 * w);
    const unsigned gen = b.wgen[w];
    b.progress++;
    if (++b.warrived[w] == n) {
        b.warrived[w] = 0;
        b.wgen[w]++;
        return;
    }
    while (b.wgen[w] == gen) yield();
}

inline void run_block(unsigned nthreads, const std::function<void()>& body) {
    Block b;
    b.nthreads = nthreads;
    b.ctx.resize(nthreads);
    b.done.assign(nthreads, 0);
    b.wgen.assign((nthreads + 31) / 32, 0);
    b.warrived.assign((nthreads + 31) / 32, 0);
    b.slot.assign(nthreads, 0.f);
    b.xptr.assign(nthreads, nullptr);
    b.xreg.assign(nthreads, {});
    b.async.assign(nthreads, AsyncState{});
    b.body = body;
    while (g_stacks.size() < nthreads) g_stacks.emplace_back(kStack);
    g_blk = &b;
    for (unsigned t = 0; t < nthreads; ++t) {
        getcontext(&b.ctx[t]);
        b.ctx[t].uc_stack.ss_sp = g_stacks[t].data();
        b.ctx[t].uc_stack.ss_size = kStack;
        b.ctx[t].uc_link = &b.main_ctx;
        makecontext(&b.ctx[t], (void (*)())trampoline, 0);
    }
    unsigned long last = b.progress;
    int idle = 0;
    // Warps run as far ahead as their barriers allow: warp 0 runs until it blocks (at a
    // __syncthreads, or done), then warp 1, ...  So a warp that reads data another warp
    // provides without a barrier in between reads it before that warp has produced it.
    const unsigned nwarps = (nthreads + 31) / 32;
    for (;;) {
        bool alive = false;
        for (unsigned w = 0; w < nwarps; ++w) {
            for (;;) {
                const unsigned long before = b.progress;
                bool any = false;
                for (unsigned t = 32 * w; t < std::min(nthreads, 32 * w + 32); ++t) {
                    if (b.done[t]) continue;
                    any = alive = true;
                    b.cur = (int)t;
                    threadIdx = {t, 0, 0};
                    swapcontext(&b.main_ctx, &b.ctx[t]);
                }
                if (!any || b.progress == before) break;
            }
        }
        if (!alive) break;
        if (b.progress == last) {
            if (++idle > 2) {
                std::fprintf(stderr, "cpu_emulation: deadlock in block (%u,%u)\n", blockIdx.x,
                             blockIdx.y);
                std::abort();
            }
        } else {
            idle = 0;
            last = b.progress;
        }
    }
    for (unsigned t = 0; t < nthreads; ++t) {
        bool left = !b.async[t].open.empty();
        for (const auto& g : b.async[t].groups) left = left || !g.empty();
        if (left) {
            fail("cp.async: thread " + std::to_string(t) + " of block (" +
                 std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) +
                 ") ended with copies never waited for");
            break;
        }
    }
    g_blk = nullptr;
}
}  // namespace avstfp_emu

inline void __syncthreads() { avstfp_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { avstfp_emu::syncwarp(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    avstfp_emu::Block& b = *avstfp_emu::g_blk;
    const unsigned t = threadIdx.x;
    b.slot[t] = v;
    avstfp_emu::syncwarp();
    const unsigned src = (t & ~31u) | ((t & 31u) ^ (unsigned)o);
    const float r = src < b.nthreads ? b.slot[src] : v;
    avstfp_emu::syncwarp();
    return r;
}
inline float atomicAdd(float* a, float v) {
    const float old = *a;
    *a = old + v;
    return old;
}
// Ticket counters (attn_kernels.cuh last_of_row_set).  CTAs run one after another here, so
// the last CTA of a row set in launch order draws the last ticket; the kernels' fixed
// summation order makes the result independent of which CTA that is on a GPU.
inline int atomicAdd(int* a, int v) {
    const int old = *a;
    *a = old + v;
    return old;
}
inline void __threadfence() {}

// ------------------------------------------------------------------ cp.async
namespace avstfp {
namespace detail {
constexpr size_t kEmuSmem = 232448;   // sm_90 opt-in maximum
alignas(128) unsigned char smem[kEmuSmem];
}  // namespace detail
}  // namespace avstfp

namespace avstfp_emu {
inline std::vector<unsigned short> g_pending(avstfp::detail::kEmuSmem, 0);   // per smem byte

inline bool in_smem(const void* p, size_t n) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    const auto lo = reinterpret_cast<uintptr_t>(avstfp::detail::smem);
    return a >= lo && a + n <= lo + avstfp::detail::kEmuSmem;
}

// Fails if any byte of rows x cols elements (pitch ld) at p has a cp.async in flight.
template <class T>
inline void check_ready(const T* p, int rows, int cols, unsigned ld, const char* what) {
    if (!in_smem(p, sizeof(T))) return;
    const size_t base = reinterpret_cast<const unsigned char*>(p) - avstfp::detail::smem;
    const size_t n = cols * sizeof(T);
    auto pending = [&](size_t off) { return off < avstfp::detail::kEmuSmem && g_pending[off]; };
    for (int r = 0; r < rows; ++r) {   // copies are aligned 16-byte chunks: one byte per chunk
        const size_t row = base + r * ld * sizeof(T);
        bool bad = pending(row) || pending(row + n - 1);
        for (size_t o = (row + 15) / 16 * 16; !bad && o < row + n; o += 16) bad = pending(o);
        if (bad) {
            fail(std::string(what) + ": reads shared memory whose cp.async has not been "
                 "waited for (cp.async.wait_group misplaced, or no barrier after it)");
            return;
        }
    }
}

}  // namespace avstfp_emu
#define AVSTFP_CHECK_READY(ptr, rows, cols, ld, what) \
    ::avstfp_emu::check_ready(ptr, rows, cols, ld, what)
namespace avstfp_emu {

inline void land(const AsyncCopy& c) {
    if (c.src)
        std::memcpy(c.dst, c.src, 16);
    else
        std::memset(c.dst, 0, 16);
    const size_t off = c.dst - avstfp::detail::smem;
    for (size_t i = 0; i < 16; ++i) g_pending[off + i]--;
}
}  // namespace avstfp_emu

inline void cp_async16(void* dst, const void* src, bool valid) {
    using namespace avstfp_emu;
    if (!in_smem(dst, 16)) return fail("cp.async: destination is not in shared memory");
    if (reinterpret_cast<uintptr_t>(dst) % 16 || reinterpret_cast<uintptr_t>(src) % 16)
        return fail("cp.async: 16-byte copy with an address not 16-byte aligned");
    if (valid && src == nullptr) return fail("cp.async: null source");
    auto* d = static_cast<unsigned char*>(dst);
    std::memset(d, 0xFF, 16);   // may land any time from now on: old contents are gone
    const size_t off = d - avstfp::detail::smem;
    for (size_t i = 0; i < 16; ++i) g_pending[off + i]++;
    g_blk->async[threadIdx.x].open.push_back(
        {d, valid ? static_cast<const unsigned char*>(src) : nullptr});
}

inline void cp_async_commit() {
    auto& a = avstfp_emu::g_blk->async[threadIdx.x];
    a.groups.push_back(std::move(a.open));
    a.open.clear();
}

template <int N>
inline void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group needs N >= 0");
    auto& a = avstfp_emu::g_blk->async[threadIdx.x];
    while (a.groups.size() > (size_t)N) {
        for (const auto& c : a.groups.front()) avstfp_emu::land(c);
        a.groups.erase(a.groups.begin());
    }
}

inline void store16(void* dst, const uint4& v) {
    if (reinterpret_cast<uintptr_t>(dst) % 16)
        return avstfp_emu::fail("16-byte global store to an address not 16-byte aligned");
    std::memcpy(dst, &v, 16);
}

// ------------------------------------------------------------------ ldmatrix / mma.sync
// The warp-level tensor-core instructions of warp_mma.cuh, lane by lane from the PTX ISA
// fragment layouts (documented there): every lane posts its operand (a row address, or its
// A/B registers), the warp meets, each lane computes its own result registers from the
// posted operands, the warp meets again.  Row addresses are checked: in shared memory,
// 16-byte aligned, no cp.async pending on the 16 bytes.  Products are exact in fp32 (a
// product of two 16-bit floats is), summed in k order on top of the accumulator.
namespace avstfp_emu {
inline float half_bits_to_float(uint16_t h, bool bf16) {
    if (bf16) {
        const uint32_t x = (uint32_t)h << 16;
        float f;
        std::memcpy(&f, &x, 4);
        return f;
    }
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return (float)v;
}

template <bool TRANS>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    Block& b = *g_blk;
    const unsigned t = threadIdx.x, w0 = t & ~31u, lane = t & 31u;
    if (!in_smem(row, 16) || reinterpret_cast<uintptr_t>(row) % 16)
        fail("ldmatrix: row address not 16-byte aligned shared memory");
    else
        check_ready(static_cast<const uint16_t*>(row), 1, 8, 8, "ldmatrix");
    b.xptr[t] = row;
    syncwarp();
    const unsigned g = lane / 4, tq = lane % 4;
    for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!TRANS) {   // row g, elements 2t, 2t+1
            const auto* p = static_cast<const uint16_t*>(b.xptr[w0 + 8 * i + g]);
            lo = p ? p[2 * tq] : 0;
            hi = p ? p[2 * tq + 1] : 0;
        } else {        // column g, rows 2t, 2t+1
            const auto* p0 = static_cast<const uint16_t*>(b.xptr[w0 + 8 * i + 2 * tq]);
            const auto* p1 = static_cast<const uint16_t*>(b.xptr[w0 + 8 * i + 2 * tq + 1]);
            lo = p0 ? p0[g] : 0;
            hi = p1 ? p1[g] : 0;
        }
        r[i] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    syncwarp();
}

template <bool BF16>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    Block& b = *g_blk;
    const unsigned t = threadIdx.x, w0 = t & ~31u, lane = t & 31u;
    b.xreg[t] = {a[0], a[1], a[2], a[3], b0, b1};
    syncwarp();
    auto el = [](uint32_t reg, int hi) { return (uint16_t)(hi ? reg >> 16 : reg & 0xffffu); };
    float A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; ++l) {   // scatter every lane's registers (layouts above)
        const auto& x = b.xreg[w0 + l];
        const unsigned g = l / 4, tq = l % 4;
        for (int h = 0; h < 2; ++h) {
            A[g][2 * tq + h] = half_bits_to_float(el(x[0], h), BF16);
            A[g + 8][2 * tq + h] = half_bits_to_float(el(x[1], h), BF16);
            A[g][2 * tq + 8 + h] = half_bits_to_float(el(x[2], h), BF16);
            A[g + 8][2 * tq + 8 + h] = half_bits_to_float(el(x[3], h), BF16);
            B[2 * tq + h][g] = half_bits_to_float(el(x[4], h), BF16);
            B[2 * tq + 8 + h][g] = half_bits_to_float(el(x[5], h), BF16);
        }
    }
    const unsigned g = lane / 4, tq = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const unsigned row = g + 8 * (i / 2), col = 2 * tq + (i % 2);
        float acc = d[i];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        d[i] = acc;
    }
    syncwarp();
}
}  // namespace avstfp_emu

namespace avstfp {
namespace detail {
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    avstfp_emu::ldmatrix_x4<false>(r, row);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    avstfp_emu::ldmatrix_x4<true>(r, row);
}
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    avstfp_emu::mma_m16n8k16<std::is_same<T, __nv_bfloat16>::value>(d, a, b0, b1);
}
}  // namespace detail
}  // namespace avstfp


// ------------------------------------------------------------------ launch

namespace avstfp_emu {
inline std::vector<size_t> g_smem_log;

template <class P>
inline void launch(void (*kern)(P), dim3 grid, unsigned block, size_t smem_bytes, const P& p) {
    if (smem_bytes > avstfp::detail::kEmuSmem) {
        fail("dynamic shared memory request too large");
        return;
    }
    if (block == 0 || block > 1024 || block % 32) {
        fail("bad block size");
        return;
    }
    if (grid.x == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
        fail("grid.y/z above 65535");
        return;
    }
    g_smem_log.push_back(smem_bytes);
    gridDim = grid;
    blockDim = dim3(block);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = {x, y, z};
                std::memset(avstfp::detail::smem, 0xFF, avstfp::detail::kEmuSmem);
                std::memset(g_pending.data(), 0, g_pending.size() * sizeof(g_pending[0]));
                run_block(block, [&] { kern(p); });
            }
}
}  // namespace avstfp_emu

template <class K>
inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int v) {
    return v <= (int)avstfp::detail::kEmuSmem ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetLastError() {
    return avstfp_emu::g_error.empty() ? cudaSuccess : cudaErrorLaunchFailure;
}

#define AVSTFP_LAUNCH(kern, grid, block, smem_bytes, stream, p) \
    ::avstfp_emu::launch(kern, grid, block, smem_bytes, p)

#include "attn_kernels.cuh"
#include "attn_smem.h"

// ------------------------------------------------------------------ entry points
extern "C" {

// Plan size, so that the Python side (avstfp_fast/ops/layout.py) can check it agrees.
int emu_plan_ints() { return avstfp::kPlanInts; }
int emu_num_pointers() { return avstfp::kNumPointers; }

const char* emu_error() { return avstfp_emu::g_error.c_str(); }

// The dynamic shared memory the library reports (attn_params.h max_smem_bytes), from the
// emulated source: the built extension's smem_bytes op must agree.
int emu_max_smem_bytes(int dtype, int head_dim, int short_tiles) {
    return avstfp::detail::max_smem_bytes_of(dtype, head_dim, short_tiles);
}

// One line per kernel instance:
// name|threads|smem|stages|stage_bytes|loads_tiles|pack|score_smem|acc_smem
const char* emu_kernel_table() {
    static std::string out;
    out.clear();
    avstfp::detail::kernel_infos([](const avstfp::detail::KernelInfo& k) {
        out += std::string(k.name) + "|" + std::to_string(k.threads) + "|" +
               std::to_string(k.smem) + "|" + std::to_string(k.stages) + "|" +
               std::to_string(k.stage_bytes) + "|" + std::to_string(k.loads_tiles) + "|" +
               std::to_string(k.pack) + "|" + std::to_string(k.score_smem) + "|" +
               std::to_string(k.acc_smem) + "\n";
    });
    return out.c_str();
}

// Fragment test of warp_mma.cuh (tests/test_cuda_build.py::test_emulated_mma_fragments):
// one warp computes S = A B^T (A: 16 x D, B: N rows of D; load_a_frags + mma_abt) and
// O = S V (S rounded to the input type, V: N rows of D; mma_pv), the two products of the
// forward, from row-major inputs copied into padded shared tiles, and writes S and O
// (row-major fp32) from the C fragments.
}  // extern "C"
namespace avstfp_emu {
struct FragArgs { const void *a, *b, *v; float *s, *o; };
template <typename T, int D, int N>
inline void frag_kernel(FragArgs f) {
    using namespace avstfp::detail;
    constexpr int LD = pitch<T>(D);
    T* sA = reinterpret_cast<T*>(avstfp::detail::smem);
    T* sB = sA + 16 * LD;
    T* sV = sB + N * LD;
    const int lane = threadIdx.x & 31;
    for (int i = lane; i < 16 * D; i += 32) sA[(i / D) * LD + i % D] = ((const T*)f.a)[i];
    for (int i = lane; i < N * D; i += 32) {
        sB[(i / D) * LD + i % D] = ((const T*)f.b)[i];
        sV[(i / D) * LD + i % D] = ((const T*)f.v)[i];
    }
    __syncwarp();
    uint32_t a[D / 16][4];
    load_a_frags<T, D>(a, sA, LD);
    float sacc[N / 8][4] = {};
    mma_abt<T, N, D>(sacc, a, sB, LD);
    float oacc[D / 8][4] = {};
    mma_pv<T, D, N>(oacc, sacc, sV, LD);
    const int g = lane / 4, tq = lane % 4;
    for (int j = 0; j < N / 8; ++j)
        for (int i = 0; i < 4; ++i) f.s[(g + 8 * (i / 2)) * N + 8 * j + 2 * tq + i % 2] = sacc[j][i];
    for (int j = 0; j < D / 8; ++j)
        for (int i = 0; i < 4; ++i) f.o[(g + 8 * (i / 2)) * D + 8 * j + 2 * tq + i % 2] = oacc[j][i];
}
template <typename T>
inline int frag_run(int D, int N, FragArgs f) {
#define AVSTFP_FRAG(D_, N_) \
    if (D == D_ && N == N_) { AVSTFP_LAUNCH((frag_kernel<T, D_, N_>), dim3(1), 32, 0, nullptr, f); return (int)cudaGetLastError(); }
    AVSTFP_FRAG(32, 16) AVSTFP_FRAG(64, 16) AVSTFP_FRAG(128, 16)
    AVSTFP_FRAG(32, 32) AVSTFP_FRAG(64, 32) AVSTFP_FRAG(128, 32)
    AVSTFP_FRAG(32, 64) AVSTFP_FRAG(64, 64) AVSTFP_FRAG(128, 64)
#undef AVSTFP_FRAG
    return -1;
}
}  // namespace avstfp_emu
extern "C" {

int emu_mma_fragments(int bf16, int D, int N, const void* a, const void* b, const void* v,
                      float* s, float* o) {
    avstfp_emu::g_error.clear();
    const avstfp_emu::FragArgs f{a, b, v, s, o};
    return bf16 ? avstfp_emu::frag_run<__nv_bfloat16>(D, N, f)
                : avstfp_emu::frag_run<__half>(D, N, f);
}

// Self-test of the pending-copy check at CTA exit: a one-warp kernel whose lane 0 issues a
// 16-byte cp.async and then (which = 0) exits without committing it, (1) commits it and
// exits without waiting, (2) drains it as the kernels do.  Returns the launch's error code
// (cudaErrorLaunchFailure for 0 and 1, cudaSuccess for 2).
namespace avstfp_emu {
alignas(16) inline unsigned char g_selftest_buf[16];
inline void selftest_kernel(int which) {
    if ((threadIdx.x & 31) == 0) {
        cp_async16(avstfp::detail::smem, g_selftest_buf, true);
        if (which >= 1) cp_async_commit();
        if (which == 2) cp_async_wait<0>();
    }
}
}  // namespace avstfp_emu

int emu_selftest_pending_copy(int which) {
    avstfp_emu::g_error.clear();
    AVSTFP_LAUNCH(avstfp_emu::selftest_kernel, dim3(2), 32, 16, nullptr, which);
    return (int)cudaGetLastError();
}

// Forward / backward from a launch plan (LaunchPlan.ints()) and the pointers, unpacked by
// the same unpack_params as the torch binding.  Returns a cudaError_t; the message is
// emu_error() (a plan error is reported as cudaErrorInvalidValue).
static int emu_run(const int64_t* plan, int64_t n, void* const* ptrs, bool backward) {
    using namespace avstfp;
    avstfp_emu::g_error.clear();
    AttnParams p;
    if (const char* err = unpack_params(plan, n, ptrs, p)) {
        avstfp_emu::g_error = err;
        return cudaErrorInvalidValue;
    }
    if (p.nseq == 0) return cudaSuccess;
    switch (p.dtype) {
        case kF16: return backward ? detail::launch_bwd_t<__half>(p, nullptr)
                                   : detail::launch_fwd_t<__half>(p, nullptr);
        case kBF16: return backward ? detail::launch_bwd_t<__nv_bfloat16>(p, nullptr)
                                    : detail::launch_fwd_t<__nv_bfloat16>(p, nullptr);
        case kF32: return backward ? detail::launch_bwd_t<float>(p, nullptr)
                                   : detail::launch_fwd_t<float>(p, nullptr);
        default: avstfp_emu::g_error = "bad dtype code"; return cudaErrorInvalidValue;
    }
}

int emu_forward(const int64_t* plan, int64_t n, void* const* ptrs) {
    return emu_run(plan, n, ptrs, false);
}

int emu_backward(const int64_t* plan, int64_t n, void* const* ptrs) {
    return emu_run(plan, n, ptrs, true);
}

}  // extern "C"
