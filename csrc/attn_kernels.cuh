// Kernel templates of prompted attention (design: see the comment at the top of
// prompted_attention.cu).  Included by one .cu file per dtype; no torch headers.
#pragma once

#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#ifndef AVSTFP_CPU_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
// Kernel launch; the CPU emulation used by the tests (cpu_emulation.h) redefines it.
#define AVSTFP_LAUNCH(kern, grid, block, smem, stream, p) kern<<<grid, block, smem, stream>>>(p)
#endif

// Largest grid.x the launchers use (the CUDA limit; the CPU emulation sets a tiny value so
// that its tests also cover the wrap of the CTA index onto grid.y).
#ifndef AVSTFP_MAX_GRID_X
#define AVSTFP_MAX_GRID_X 2147483647LL
#endif
// Test hook, 0 in every build: the CPU emulation tests compile the kernels with a fault
// and check that the emulation reports it (tests/test_cuda_build.py::
// test_emulation_catches_pipeline_faults).  1: every pipeline waits for one cp.async group
// too few (a misplaced cp.async.wait_group); 2: no unit barrier after the wait (other
// threads' copies of the tile may not have landed).
#ifndef AVSTFP_TEST_FAULT
#define AVSTFP_TEST_FAULT 0
#endif
// The CPU emulation checks that warp_mm's operands have no cp.async in flight; no-op here.
#ifndef AVSTFP_CHECK_READY
#define AVSTFP_CHECK_READY(ptr, rows, cols, ld, what) ((void)0)
#endif

#include "attn_params.h"

namespace avstfp {
namespace detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// 163 KiB: the opt-in limit of sm_80 (sm_90: 227 KiB; sm_86/sm_89: 99 KiB, where configs
// above 99 KiB fail to launch with a clear error, see the table at Config).
constexpr int kMaxSmem = 166912;

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr size_t align128(size_t n) { return (n + 127) / 128 * 128; }

// ------------------------------------------------------------------ element conversions
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Row pitch (elements) of a shared tile of `cols` elements of type T: padded by 16 bytes
// (ldmatrix's 8 row addresses fall in distinct banks; rows stay 16-byte aligned).
template <typename T> __host__ __device__ constexpr int pitch(int cols) {
    return cols + int(16 / sizeof(T));
}

// ------------------------------------------------------------------ warp reductions
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// ------------------------------------------------------------------ batch addressing
struct BatchIdx { int64_t i[AVSTFP_MAX_BDIMS]; };

__device__ __forceinline__ BatchIdx batch_index(const AttnParams& p, int64_t b) {
    BatchIdx bi;
#pragma unroll
    for (int d = AVSTFP_MAX_BDIMS - 1; d >= 0; --d) {
        bi.i[d] = b % p.bsize[d];
        b /= p.bsize[d];
    }
    return bi;
}

__device__ __forceinline__ int64_t boff(const Operand& t, const BatchIdx& bi) {
    int64_t off = 0;
#pragma unroll
    for (int d = 0; d < AVSTFP_MAX_BDIMS; ++d) off += bi.i[d] * t.bstride[d];
    return off;
}

// ------------------------------------------------------------------ asynchronous copies
// cp.async (sm_80+): 16-byte global -> shared copies that bypass the registers and L1
// (.cg); `src_bytes` 0 zero-fills the destination.  Copies issued between two commits form
// a group; wait<N> returns once at most N of this thread's committed groups are pending.
// The CPU emulation (cpu_emulation.h) provides the same four functions and checks their use.
#ifndef AVSTFP_CPU_EMULATION
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
                 "r"(valid ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// 16-byte global store (the pointer is 16-byte aligned: checked by the emulation).  Inline
// PTX: nvcc splits a plain uint4 store built from packed words into four 32-bit stores.
__device__ __forceinline__ void store16(void* dst, const uint4& v) {
    asm volatile(
        "{\n\t.reg .u64 ga;\n\tcvta.to.global.u64 ga, %0;\n\t"
        "st.global.v4.b32 [ga], {%1, %2, %3, %4};\n\t}\n" ::"l"(dst),
        "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
        : "memory");
}
#endif

// Every exit path of a kernel that issued copies drains them: commit whatever is still open
// (copies issued after the last commit belong to no group, and cp.async.wait_group does
// not wait for them) and wait for all groups (= cp.async.wait_all).  A copy still in flight
// when its CTA exits lands in shared memory that the next CTA on the SM may already use.
// The CPU emulation fails any launch whose CTA ends with a copy it never waited for.
__device__ __forceinline__ void cp_async_drain() {
    cp_async_commit();
    cp_async_wait<0>();
}

// Groups a thread may leave pending when it needs the oldest tile of a STAGES-deep pipeline
// (each iteration commits one group; with one stage the tile is waited for right away).
template <int STAGES>
constexpr int kWaitGroups = (STAGES > 1 ? STAGES - 2 : 0) + (AVSTFP_TEST_FAULT == 1 ? 1 : 0);

// ------------------------------------------------------------------ global -> shared
// Issue the copy of a ROWS x D shared tile (pitch pitch<T>(D)) whose rows come from two
// sources: rows [0, n1) from g1 (row stride rs1 elements), rows [n1, n1 + n2) from g2
// (row stride rs2; a key tile that ends the segment's keys and starts its prompts); later
// rows are zero-filled.  Last dims are dense.  The NT threads of a unit (thread `tid`)
// share the work.  vec16: cp.async, 16 bytes per copy (complete after the caller's
// commit + wait); otherwise plain element copies (complete at once; only for layouts whose
// pointers or strides are not 16-byte aligned).
template <typename T, int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile2(T* s, const T* g1, int64_t rs1, int n1, const T* g2,
                                           int64_t rs2, int n2, bool vec16, int tid) {
    constexpr int LD = pitch<T>(D);
    if (vec16) {
        constexpr int EPC = 16 / int(sizeof(T)), CH = D / EPC;   // chunks per row
        constexpr int N = ROWS * CH;
        const T* any = n1 > 0 ? g1 : g2;   // a valid address for zero-filling copies
#pragma unroll
        for (int k = 0; k < cdiv(N, NT); ++k) {   // all copies issued back to back
            const int i = tid + k * NT;
            if (N % NT == 0 || i < N) {
                const int r = i / CH, c = (i % CH) * EPC;
                const bool a = r < n1, b = !a && r < n1 + n2;
                const T* src = a ? g1 + (int64_t)r * rs1 + c
                                 : (b ? g2 + (int64_t)(r - n1) * rs2 + c : any);
                cp_async16(s + r * LD + c, src, a || b);
            }
        }
    } else {
        for (int i = tid; i < ROWS * D; i += NT) {
            const int r = i / D, c = i % D;
            T val = from_f<T>(0.f);
            if (r < n1)
                val = g1[(int64_t)r * rs1 + c];
            else if (r < n1 + n2)
                val = g2[(int64_t)(r - n1) * rs2 + c];
            s[r * LD + c] = val;
        }
    }
}

template <typename T, int ROWS, int D, int NT>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t rstride, int nvalid,
                                          bool vec16, int tid) {
    load_tile2<T, ROWS, D, NT>(s, g, rstride, nvalid, g, 0, 0, vec16, tid);
}

// ------------------------------------------------------------------ shared -> global
// The bits of from_f<T>(x[i] * m) for the elements of one 32-bit word (2 x 16 bit or 1 x 32).
__device__ __forceinline__ uint32_t bits_of(__half h) { return __half_as_ushort(h); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 h) { return __bfloat16_as_ushort(h); }
template <typename T>
__device__ __forceinline__ uint32_t pack_word(const float* x, float m) {
    if constexpr (std::is_same<T, float>::value)
        return __float_as_uint(x[0] * m);
    else
        return bits_of(from_f<T>(x[0] * m)) | (bits_of(from_f<T>(x[1] * m)) << 16);
}

}  // namespace detail
}  // namespace avstfp
#include "warp_mma.cuh"
namespace avstfp {
namespace detail {

// out[r, c] = from_f<T>(s[r, c] * rowmul[r] * mul) for r < nrows (rowmul may be null), by
// the NT threads of a unit; vec16: one 16-byte store per 16/sizeof(T) elements.
template <typename T, int D, int NT>
__device__ __forceinline__ void store_tile(T* g, int64_t rstride, const float* s, int lds,
                                           int nrows, const float* rowmul, float mul,
                                           bool vec16, int tid) {
    if (vec16) {
        constexpr int EPC = 16 / int(sizeof(T)), CH = D / EPC;
        for (int i = tid; i < nrows * CH; i += NT) {
            const int r = i / CH, c = (i % CH) * EPC;
            const float m = rowmul ? rowmul[r] * mul : mul;
            const float* x = s + r * lds + c;
            constexpr int W = 4 / int(sizeof(T));   // elements per 32-bit word
            store16(g + (int64_t)r * rstride + c,
                    make_uint4(pack_word<T>(x, m), pack_word<T>(x + W, m),
                               pack_word<T>(x + 2 * W, m), pack_word<T>(x + 3 * W, m)));
        }
    } else {
        for (int i = tid; i < nrows * D; i += NT) {
            const int r = i / D, c = i % D;
            const float m = rowmul ? rowmul[r] * mul : mul;
            g[(int64_t)r * rstride + c] = from_f<T>(s[r * lds + c] * m);
        }
    }
}

// ------------------------------------------------------------------ warp matrix product (fp32)
// C[16][N] (float, pitch ldc) = (accumulate ? C : 0) + A[16][K] * B, one warp, plain FMA
// (the fp32 kernels; no TF32, to meet the 1e-5 bound).  A: row-major (pitch lda).
// B_COL=false: B is K x N row-major (pitch ldb); B_COL=true: B is stored transposed, as N
// rows of K (i.e. the product is A * B_stored^T).  fp16/bf16 use warp_mma.cuh instead.
template <typename T, int N, int K, bool B_COL>
__device__ __forceinline__ void warp_mm(const T* A, int lda, const T* B, int ldb, float* C,
                                        int ldc, bool accumulate) {
    static_assert(std::is_same<T, float>::value, "fp16/bf16 products use warp_mma.cuh");
    static_assert(N % 16 == 0 && K % 16 == 0, "tile sizes are multiples of 16");
    __syncwarp();
    AVSTFP_CHECK_READY(A, 16, K, lda, "warp_mm operand A");
    AVSTFP_CHECK_READY(B, B_COL ? N : K, B_COL ? K : N, ldb, "warp_mm operand B");
    const int lane = threadIdx.x & 31;
    for (int i = lane; i < 16 * N; i += 32) {
        const int r = i / N, c = i % N;
        float acc = accumulate ? C[r * ldc + c] : 0.f;
        const float* a = A + r * lda;
#pragma unroll 8
        for (int kk = 0; kk < K; ++kk)
            acc = fmaf(a[kk], B_COL ? B[c * ldb + kk] : B[kk * ldb + c], acc);
        C[r * ldc + c] = acc;
    }
    __syncwarp();
}

// ------------------------------------------------------------------ work units
// A CTA runs PACK units of UT threads.  PACK = 1: one unit of BM/16 (or BN/16) warps, the
// whole CTA.  PACK > 1 (packed short tiles): one warp per unit, each on its own sequence,
// so several short sequences share a CTA.  Units never share data: a unit barrier is
// __syncwarp for one-warp units, __syncthreads otherwise.
template <int UT>
__device__ __forceinline__ void unit_sync() {
    if constexpr (UT == 32)
        __syncwarp();
    else
        __syncthreads();
}

// Work item of this unit: units are numbered CTA-major (CTA index = blockIdx.y * gridDim.x
// + blockIdx.x), and work item w is (sequence w / tiles, tile w % tiles): the tiles of one
// sequence are neighbours in launch order, so they share its K/V in L2.
template <int PACK>
__device__ __forceinline__ int64_t work_item(int unit) {
    return ((int64_t)blockIdx.y * gridDim.x + blockIdx.x) * PACK + unit;
}

// Grid for `work` items, PACK per CTA: grid.x up to AVSTFP_MAX_GRID_X, the rest on grid.y.
inline bool make_grid(int64_t work, int pack, dim3& grid) {
    const int64_t ctas = cdiv64(work, pack);
    const int64_t gx = ctas < (int64_t)AVSTFP_MAX_GRID_X ? ctas : (int64_t)AVSTFP_MAX_GRID_X;
    const int64_t gy = cdiv64(ctas, gx);
    if (ctas <= 0 || gy > 65535) return false;
    grid = dim3((unsigned)gx, (unsigned)gy);
    return true;
}

// ------------------------------------------------------------------ tile bookkeeping
// Query tiles of BM rows, segment by segment (forward and dQ work items).
__host__ __device__ inline int num_q_tiles(const AttnParams& p, int BM) {
    int n = 0;
    for (int s = 0; s < p.nseg; ++s) n += cdiv(p.q_len[s], BM);
    return n;
}

__device__ __forceinline__ void decode_q_tile(const AttnParams& p, int BM, int t, int& seg,
                                              int& q0, int& nq) {
    for (int s = 0; s < p.nseg; ++s) {
        const int n = cdiv(p.q_len[s], BM);
        if (t < n) {
            seg = s;
            q0 = p.q_start[s] + t * BM;
            nq = min(BM, p.q_start[s] + p.q_len[s] - q0);
            return;
        }
        t -= n;
    }
}

// The work item of a query-tile unit (forward, dQ): sequence b and the query rows
// [q0, q0 + nq) of segment seg; false when the unit has none.
template <int PACK>
__device__ __forceinline__ bool q_tile_item(const AttnParams& p, int BM, int unit, int64_t& b,
                                            int& seg, int& q0, int& nq) {
    const int tiles = num_q_tiles(p, BM);
    const int64_t w = work_item<PACK>(unit);
    if (w >= (int64_t)tiles * p.nseq) return false;
    b = w / tiles;
    seg = q0 = nq = 0;
    decode_q_tile(p, BM, (int)(w % tiles), seg, q0, nq);
    return true;
}

// Keys of segment s: its k_len rows of k followed by its P prompt rows, one sequence of
// k_len + P rows cut into tiles of BN: a tile may end the real keys and start the prompts
// (the temporal stage's 10 keys + 2 prompts are one 16-row tile).
__host__ __device__ inline int num_prompts(const AttnParams& p, int s) {
    return (p.pk[s].ptr != nullptr && p.n_prompt[s] > 0) ? p.n_prompt[s] : 0;
}

__host__ __device__ inline int num_key_tiles(const AttnParams& p, int s, int BN) {
    return cdiv(p.k_len[s] + num_prompts(p, s), BN);
}

__host__ __device__ inline int num_key_tiles_all(const AttnParams& p, int BN) {
    int n = 0;
    for (int s = 0; s < p.nseg; ++s) n += num_key_tiles(p, s, BN);
    return n;
}

// Key tile j of segment s: rows [0, nk) from k (first row k0, absolute in Lk), then rows
// [nk, nk + np) from the prompts (first prompt row p0).
struct KeyTile {
    const void *k, *v, *pk, *pv;   // first row of each part
    int nk, np;                    // rows of each part
    int k0, p0;
};

template <typename T>
__device__ __forceinline__ KeyTile key_tile(const AttnParams& p, int s, int j, int BN,
                                            const BatchIdx& bi) {
    KeyTile t;
    const int v0 = j * BN;                       // first row of the tile in k ++ prompts
    const int n = min(BN, p.k_len[s] + num_prompts(p, s) - v0);
    t.nk = max(0, min(n, p.k_len[s] - v0));
    t.np = n - t.nk;
    t.k0 = p.k_start[s] + min(v0, p.k_len[s]);
    t.p0 = max(0, v0 - p.k_len[s]);
    t.k = (const T*)p.k.ptr + boff(p.k, bi) + (int64_t)t.k0 * p.k.rstride;
    t.v = (const T*)p.v.ptr + boff(p.v, bi) + (int64_t)t.k0 * p.v.rstride;
    if (t.np > 0) {
        t.pk = (const T*)p.pk[s].ptr + boff(p.pk[s], bi) + (int64_t)t.p0 * p.pk[s].rstride;
        t.pv = (const T*)p.pv[s].ptr + boff(p.pv[s], bi) + (int64_t)t.p0 * p.pv[s].rstride;
    } else {
        t.pk = t.k;
        t.pv = t.v;
    }
    return t;
}

// Issue the K and V tiles j of segment s into one pipeline stage.
template <typename T, int BN, int D, int UT>
__device__ __forceinline__ void issue_kv(const AttnParams& p, int s, int j, const BatchIdx& bi,
                                         T* sK, T* sV, bool vec, int tid) {
    const KeyTile kt = key_tile<T>(p, s, j, BN, bi);
    load_tile2<T, BN, D, UT>(sK, (const T*)kt.k, p.k.rstride, kt.nk, (const T*)kt.pk,
                             kt.np > 0 ? p.pk[s].rstride : 0, kt.np, vec, tid);
    load_tile2<T, BN, D, UT>(sV, (const T*)kt.v, p.v.rstride, kt.nk, (const T*)kt.pv,
                             kt.np > 0 ? p.pv[s].rstride : 0, kt.np, vec, tid);
}

// What the forward and dQ bodies share (the twin of DkvTile, which streams query tiles
// past fixed keys): the unit's work item (sequence b, query rows [q0, q0 + nq) of segment
// seg), its shared memory (layout L: K/V stages at L::kv, L::tile bytes each), and the
// cp.async pipeline over the segment's key tiles, one K/V tile per stage.  The bodies load
// Q (and dO) by load_rows before start(), so those copies join the first group.  Each body
// still opens with the same few lines (thread ids, init, its own names for the fields):
// what follows differs (fragments in registers vs tiles in shared memory), and one body
// template over both would hide that more than the repeated declarations do.
template <typename T, int D, int BM, int BN, int STAGES, class L>
struct QTile {
    static constexpr int UT = BM * 2;
    unsigned char* base;   // this unit's shared memory
    int tid, seg, q0, nq, ntiles;
    int64_t b;
    BatchIdx bi;
    bool vec;

    // The work item of unit `unit`; false (and no copies issued) when there is none.
    template <int PACK>
    __device__ __forceinline__ bool init(const AttnParams& p, unsigned char* smem, int unit,
                                         int tid_) {
        if (!q_tile_item<PACK>(p, BM, unit, b, seg, q0, nq)) return false;
        tid = tid_;
        base = smem + unit * L::bytes;
        bi = batch_index(p, b);
        vec = p.vec16 != 0;
        ntiles = num_key_tiles(p, seg, BN);
        return true;
    }

    __device__ __forceinline__ T* stK(int st) const {
        return reinterpret_cast<T*>(base + L::kv + 2 * st * L::tile);
    }
    __device__ __forceinline__ T* stV(int st) const {
        return reinterpret_cast<T*>(base + L::kv + (2 * st + 1) * L::tile);
    }

    // The tile's rows of operand o (q or dout) into s, asynchronously.
    __device__ __forceinline__ void load_rows(const Operand& o, T* s) const {
        load_tile<T, BM, D, UT>(s, (const T*)o.ptr + boff(o, bi) + (int64_t)q0 * o.rstride,
                                o.rstride, nq, vec, tid);
    }

    // The first STAGES-1 K/V tiles in flight, one commit group each.
    __device__ __forceinline__ void start(const AttnParams& p) const {
#pragma unroll 1
        for (int st = 0; st < STAGES - 1; ++st) {
            if (st < ntiles) issue_kv<T, BN, D, UT>(p, seg, st, bi, stK(st), stV(st), vec, tid);
            cp_async_commit();
        }
    }

    // Key tile j resident in its stage (returned) for the whole unit (with tile 0: the
    // rows of load_rows too); the next tile's copies are in flight.
    __device__ __forceinline__ int acquire(const AttnParams& p, int j) const {
        if constexpr (STAGES == 1) {   // no prefetch: load tile j once tile j-1 is consumed
            unit_sync<UT>();
            issue_kv<T, BN, D, UT>(p, seg, j, bi, stK(0), stV(0), vec, tid);
            cp_async_commit();
        }
        cp_async_wait<kWaitGroups<STAGES>>();   // my copies of tile j landed
        if (AVSTFP_TEST_FAULT != 2)
            unit_sync<UT>();   // everyone's copies landed; tile j-1's stage is free
        if constexpr (STAGES > 1) {
            const int jn = j + STAGES - 1, st = jn % STAGES;
            if (jn < ntiles) issue_kv<T, BN, D, UT>(p, seg, jn, bi, stK(st), stV(st), vec, tid);
            cp_async_commit();
        }
        return j % STAGES;
    }
};

// ================================================================== forward
// Shared memory of one unit.  fp16/bf16 (MMA: the register-resident forward below): the
// Q tile and the K/V stages only.  fp32: also S, O and the row statistics; P is written
// over S in place (same type and pitch; each element is read and then written by the
// same lane).
template <typename T, int D, int BM, int BN, int STAGES>
struct FwdSmem {
    static constexpr bool F32 = std::is_same<T, float>::value;
    static constexpr bool MMA = !F32;
    static constexpr int LDT = pitch<T>(D), LDS = pitch<float>(BN), LDP = pitch<T>(BN),
                         LDO = pitch<float>(D);
    static constexpr size_t tile = align128(sizeof(T) * BN * LDT);   // one K or V tile
    static constexpr size_t q = 0;
    static constexpr size_t kv = q + align128(sizeof(T) * BM * LDT);   // stage i: K, V
    static constexpr size_t s = kv + 2 * STAGES * tile;
    static constexpr size_t pm = F32 ? s : s + align128(sizeof(float) * BM * LDS);
    static constexpr size_t o = pm + align128(F32 ? sizeof(float) * BM * LDS
                                                  : sizeof(T) * BM * LDP);
    static constexpr size_t stat = o + align128(sizeof(float) * BM * LDO);
    static constexpr size_t bytes = MMA ? s : stat + align128(sizeof(float) * 2 * BM);
    // fp32 tiles of scores (S) and accumulators (O) in this layout (static contract)
    static constexpr size_t score_bytes = MMA ? 0 : sizeof(float) * BM * LDS;
    static constexpr size_t acc_bytes = MMA ? 0 : sizeof(float) * BM * LDO;
};

template <typename T, int D, int BM, int BN, int STAGES, int PACK>
__device__ __forceinline__ void fwd_mma_body(const AttnParams& p);
template <typename T, int D, int BM, int BN, int STAGES, int PACK>
__device__ __forceinline__ void fwd_smem_body(const AttnParams& p);

// CTAs per SM the forward asks ptxas to fit (registers <= 64K / (128 * n)): the packed
// 16-bit forward at head dim <= 64 fits 4 CTAs (16 warps) per SM in <= 128 registers
// without spills (checked by the static contract, sm_80 and sm_90a).
template <typename T, int D, int PACK>
constexpr int kFwdMinBlocks = (!std::is_same<T, float>::value && D <= 64) ? 4 : 1;

// Forward: fp16/bf16 keep scores, probabilities, the online softmax and O in registers
// (fwd_mma_body, mma.sync + ldmatrix: FlashAttention-2's structure); fp32 keeps the
// shared-memory FMA path (fwd_smem_body), whose products meet the 1e-5 bound without TF32.
template <typename T, int D, int BM, int BN, int STAGES, int PACK>
__global__ void __launch_bounds__(PACK * BM * 2, kFwdMinBlocks<T, D, PACK>)
fwd_kernel(const __grid_constant__ AttnParams p) {
    if constexpr (FwdSmem<T, D, BM, BN, STAGES>::MMA)
        fwd_mma_body<T, D, BM, BN, STAGES, PACK>(p);
    else
        fwd_smem_body<T, D, BM, BN, STAGES, PACK>(p);
}

// C fragments acc[D/8][4] of a warp's 16 x D tile, times mul, into shared rows s (pitch
// ld, type T): the staging step before 16-byte global stores.
template <typename T, int D>
__device__ __forceinline__ void stage_frags(T* s, int ld, const float (&acc)[D / 8][4],
                                            float mul0, float mul1) {
    const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    uint32_t* s32 = reinterpret_cast<uint32_t*>(s);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        s32[(g * ld + n * 8 + 2 * tq) / 2] = pack2<T>(acc[n][0] * mul0, acc[n][1] * mul0);
        s32[((g + 8) * ld + n * 8 + 2 * tq) / 2] = pack2<T>(acc[n][2] * mul1, acc[n][3] * mul1);
    }
}

// Rows [0, rows) (rows <= 16) of a warp's staged T tile s (pitch ld) to global g (row
// stride rstride), by the 32 lanes: 16-byte stores when vec16, else element by element.
template <typename T, int D>
__device__ __forceinline__ void warp_store_rows(T* g, int64_t rstride, const T* s, int ld,
                                                int rows, bool vec16) {
    const int lane = threadIdx.x & 31;
    if (vec16) {
        constexpr int EPC = 16 / int(sizeof(T)), CH = D / EPC;
        for (int i = lane; i < rows * CH; i += 32) {
            const int r = i / CH, c = (i % CH) * EPC;
            const uint32_t* x = reinterpret_cast<const uint32_t*>(s + r * ld + c);
            store16(g + (int64_t)r * rstride + c, make_uint4(x[0], x[1], x[2], x[3]));
        }
    } else {
        for (int i = lane; i < rows * D; i += 32)
            g[(int64_t)(i / D) * rstride + i % D] = s[(i / D) * ld + i % D];
    }
}

// The warp's 16 output rows from C fragments acc (times m0 for rows g, m1 for rows g + 8)
// to global memory: staged in shared rows s (the warp's own, no longer read), then `rows`
// of them stored by warp_store_rows.
template <typename T, int D>
__device__ __forceinline__ void warp_store_frags(T* g, int64_t rstride, T* s, int ld,
                                                 const float (&acc)[D / 8][4], float m0,
                                                 float m1, int rows, bool vec16) {
    __syncwarp();   // every lane is done reading s
    stage_frags<T, D>(s, ld, acc, m0, m1);
    __syncwarp();
    warp_store_rows<T, D>(g, rstride, s, ld, rows, vec16);
}

// One warp owns 16 query rows.  Per key tile: S = Q K^T into C fragments (Q's A fragments
// loaded once by ldmatrix, K's by ldmatrix.x4), masked and scaled in registers; the row max
// and the rescale factor come from the 4 lanes that share a row (two xor shuffles); P stays
// in the same registers and becomes the A operand of O += P V (V by ldmatrix.x4.trans).
// The row sum is kept per lane and reduced once at the end.  The output goes through the
// warp's own (no longer needed) Q rows in shared memory, for 16-byte stores.
template <typename T, int D, int BM, int BN, int STAGES, int PACK>
__device__ __forceinline__ void fwd_mma_body(const AttnParams& p) {
    using L = FwdSmem<T, D, BM, BN, STAGES>;
    constexpr int UT = BM * 2;
    extern __shared__ __align__(128) unsigned char smem[];
    const int unit = threadIdx.x / UT, tid = threadIdx.x % UT;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;

    QTile<T, D, BM, BN, STAGES, L> t;   // the same preamble in all four bodies: see QTile
    if (!t.template init<PACK>(p, smem, unit, tid)) return;
    const int64_t b = t.b;
    const int seg = t.seg, q0 = t.q0, nq = t.nq, ntiles = t.ntiles;
    const BatchIdx& bi = t.bi;
    unsigned char* base = t.base;
    T* sQ = reinterpret_cast<T*>(base + L::q);
    const float sl2 = p.scale * kLog2e;

    t.load_rows(p.q, sQ);
    t.start(p);

    T* Qw = sQ + warp * 16 * L::LDT;
    uint32_t qf[D / 16][4];                    // Q's A fragments (loaded with tile 0)
    float o[D / 8][4];                         // O, C fragments: columns 8j .. 8j+7
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY};       // running max (log2 units): rows g, g+8
    float l[2] = {0.f, 0.f};                   // this lane's part of the running sum

#pragma unroll 1
    for (int j = 0; j < ntiles; ++j) {
        const int stage = t.acquire(p, j);
        if (j == 0) load_a_frags<T, D>(qf, Qw, L::LDT);
        const T* sK = t.stK(stage);
        const T* sV = t.stV(stage);
        const KeyTile kt = key_tile<T>(p, seg, j, BN, bi);
        const int nk = kt.nk + kt.np;   // valid keys of the tile (>= 1)

        float s[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        mma_abt<T, BN, D>(s, qf, sK, L::LDT);                    // S = Q K^T

        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = n * 8 + 2 * tq + (i & 1);
                s[n][i] = c < nk ? s[n][i] * sl2 : -INFINITY;
                mx[i >> 1] = fmaxf(mx[i >> 1], s[n][i]);
            }
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {   // the 4 lanes of a row: xor 1, 2
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
            mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
            const float m_new = fmaxf(m[h], mx[h]);   // finite: the tile has a key
            alpha[h] = exp2f(m[h] - m_new);          // 0 on the first tile
            m[h] = m_new;
        }
        float sum[2] = {0.f, 0.f};
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                s[n][i] = exp2f(s[n][i] - m[i >> 1]);   // masked keys: exp2(-inf) = 0
                sum[i >> 1] += s[n][i];
            }
#pragma unroll
        for (int h = 0; h < 2; ++h) l[h] = l[h] * alpha[h] + sum[h];
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= alpha[0];
            o[n][1] *= alpha[0];
            o[n][2] *= alpha[1];
            o[n][3] *= alpha[1];
        }
        mma_pv<T, D, BN>(o, s, sV, L::LDT);                      // O += P V
    }
    cp_async_drain();   // nothing left in flight on any exit path

    float inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        inv[h] = 1.f / l[h];
        const int r = warp * 16 + g + 8 * h;
        if (tq == 0 && r < nq) p.lse[b * p.Lq + q0 + r] = (m[h] + log2f(l[h])) * kLn2;
    }
    // O / l through this warp's Q rows (their fragments are in registers) to global
    warp_store_frags<T, D>((T*)p.o.ptr + boff(p.o, bi) + (int64_t)(q0 + warp * 16) * p.o.rstride,
                           p.o.rstride, Qw, L::LDT, o, inv[0], inv[1], min(16, nq - warp * 16),
                           p.vec16_out != 0);
}

template <typename T, int D, int BM, int BN, int STAGES, int PACK>
__device__ __forceinline__ void fwd_smem_body(const AttnParams& p) {
    using L = FwdSmem<T, D, BM, BN, STAGES>;
    constexpr int UT = BM * 2;
    extern __shared__ __align__(128) unsigned char smem[];
    const int unit = threadIdx.x / UT, tid = threadIdx.x % UT;
    const int warp = tid >> 5, lane = tid & 31;

    QTile<T, D, BM, BN, STAGES, L> t;   // the same preamble in all four bodies: see QTile
    if (!t.template init<PACK>(p, smem, unit, tid)) return;
    const int64_t b = t.b;
    const int seg = t.seg, q0 = t.q0, nq = t.nq, ntiles = t.ntiles;
    const BatchIdx& bi = t.bi;
    unsigned char* base = t.base;
    T* sQ = reinterpret_cast<T*>(base + L::q);
    float* sS = reinterpret_cast<float*>(base + L::s);
    T* sP = reinterpret_cast<T*>(base + L::pm);
    float* sO = reinterpret_cast<float*>(base + L::o);
    float* sM = reinterpret_cast<float*>(base + L::stat);   // running max (log2 units)
    float* sL = sM + BM;                                      // running sum
    const float sl2 = p.scale * kLog2e;

    // prologue: Q and the first STAGES-1 K/V tiles in flight (Q joins the first group)
    t.load_rows(p.q, sQ);
    t.start(p);
    for (int i = tid; i < BM * L::LDO; i += UT) sO[i] = 0.f;
    for (int i = tid; i < BM; i += UT) {
        sM[i] = -INFINITY;
        sL[i] = 0.f;
    }

    // this warp's 16 query rows
    const T* Qw = sQ + warp * 16 * L::LDT;
    float* Sw = sS + warp * 16 * L::LDS;
    T* Pw = sP + warp * 16 * L::LDP;
    float* Ow = sO + warp * 16 * L::LDO;

    for (int j = 0; j < ntiles; ++j) {
        const int stage = t.acquire(p, j);
        const T* sK = t.stK(stage);
        const T* sV = t.stV(stage);
        const KeyTile kt = key_tile<T>(p, seg, j, BN, bi);
        const int nk = kt.nk + kt.np;   // valid keys of the tile

        warp_mm<T, BN, D, true>(Qw, L::LDT, sK, L::LDT, Sw, L::LDS, false);   // S = Q K^T

        {   // online softmax: lanes 2r and 2r+1 own row r (even / odd columns)
            const int r = lane >> 1, h = lane & 1;
            const int row = warp * 16 + r;
            const float* Sr = Sw + r * L::LDS;
            T* Pr = Pw + r * L::LDP;
            float* Or = Ow + r * L::LDO;
            float mx = -INFINITY;
            for (int c = h; c < nk; c += 2) mx = fmaxf(mx, Sr[c] * sl2);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            const float m_old = sM[row];
            const float m_new = fmaxf(m_old, mx);          // finite: the tile has a key
            float sum = 0.f;
            for (int c = h; c < BN; c += 2) {
                const float e = c < nk ? exp2f(Sr[c] * sl2 - m_new) : 0.f;
                Pr[c] = from_f<T>(e);
                sum += e;
            }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            const float alpha = exp2f(m_old - m_new);       // 0 on the first tile
            for (int c = h; c < D; c += 2) Or[c] *= alpha;
            __syncwarp();                                   // both lanes have read sM[row]
            if (h == 0) {
                sM[row] = m_new;
                sL[row] = sL[row] * alpha + sum;
            }
        }
        warp_mm<T, D, BN, false>(Pw, L::LDP, sV, L::LDT, Ow, L::LDO, true);   // O += P V
    }
    cp_async_drain();   // nothing left in flight on any exit path
    unit_sync<UT>();

    for (int r = tid; r < nq; r += UT) {
        p.lse[b * p.Lq + q0 + r] = (sM[r] + log2f(sL[r])) * kLn2;
        sL[r] = 1.f / sL[r];
    }
    unit_sync<UT>();
    store_tile<T, D, UT>((T*)p.o.ptr + boff(p.o, bi) + (int64_t)q0 * p.o.rstride, p.o.rstride,
                         sO, L::LDO, nq, sL, 1.f, p.vec16_out != 0, tid);
}

// ================================================================== backward: prompt gradients
// The prompt gradients leave the backward finished, in the prompts' dtype and shape (dpk,
// dpv), with no zero-fill, no atomics on data and no cast after it.  Every unit that owns
// prompt rows of a sequence writes them as fp32 partials (prompt_part_offset: one slice
// per sequence); then the unit takes a ticket for its (segment, prompt row set).  The last
// unit of a row set (the one that draws ticket `total - 1`) resets the counter to 0 and
// sums the row set's partials in sequence order, so the result does not depend on which
// unit finishes last: deterministic, and bit-exact between runs.  Memory order is the
// threadFenceReduction pattern: every writer fences its partials before the unit barrier
// that precedes the ticket, and the last unit reads them through L2 (ld.global.cg).
#ifndef AVSTFP_CPU_EMULATION
__device__ __forceinline__ float4 load_cg(const float4* a) { return __ldcg(a); }
#else
inline float4 load_cg(const float4* a) {
    if (reinterpret_cast<uintptr_t>(a) % 16 != 0) avstfp_emu::fail("misaligned float4 load");
    return *a;
}
#endif

__device__ __forceinline__ bool prompt_reduced(const AttnParams& p, int s, int d) {
    return p.bsize[d] > 1 && p.dpk[s].bstride[d] == 0;
}

// Row-major index of the row set of sequence bi (over the dims the prompts keep).
__device__ __forceinline__ int64_t prompt_group(const AttnParams& p, int s, const BatchIdx& bi) {
    int64_t g = 0;
#pragma unroll
    for (int d = 0; d < AVSTFP_MAX_BDIMS; ++d)
        if (!prompt_reduced(p, s, d)) g = g * p.bsize[d] + bi.i[d];
    return g;
}

// Slot b's fp32 partial of prompt row 0 (which: 0 prompt_k, 1 prompt_v); b: the sequence,
// or with seq_reps the row set.
__device__ __forceinline__ float* prompt_part(const AttnParams& p, int s, int which, int64_t b) {
    return p.part + prompt_part_offset(p, s) +
           ((int64_t)which * prompt_part_slots(p) + b) * p.n_prompt[s] * p.head_dim;
}

// After this unit wrote its partials: true in the unit that completes the row set (all
// `total` units counted), whose counter is back at 0.  flag: one int of the unit's shared
// memory that no thread reads or writes around the call.
template <int UT>
__device__ __forceinline__ bool last_of_row_set(int* ticket, int total, int* flag, int tid) {
    __threadfence();
    unit_sync<UT>();
    if (tid == 0) {
        const bool last = atomicAdd(ticket, 1) == total - 1;
        if (last) *ticket = 0;   // every other unit of the row set has drawn its ticket
        *flag = last;
    }
    unit_sync<UT>();
    const bool last = *flag != 0;
    unit_sync<UT>();             // flag may be reused after the call
    if (last) __threadfence();
    return last;
}

// dpk/dpv of the row set of sequence bi: the sum of its R sequences' partials in sequence
// order, written in the prompts' dtype.  Each thread owns 4 consecutive elements (16-byte
// loads through L2) and keeps kLoads of the R loads in flight before it adds them, in
// order, so the unit that finishes a row set is not bound by one load's latency per
// sequence (R is 80 in the spatial stage).  Every slice is 16-byte aligned (E % 4 == 0,
// 16-byte aligned scratch).
template <typename T, int D, int UT>
__device__ __noinline__ void finish_prompt_grads(const AttnParams& p, int s, const BatchIdx& bi,
                                                 int tid) {
    constexpr int kLoads = 8;
    const int P = p.n_prompt[s];
    const int64_t R = prompt_reps(p, s);
    int64_t b0 = 0, step[AVSTFP_MAX_BDIMS], acc = 1;   // first member; flat stride per dim
#pragma unroll
    for (int d = AVSTFP_MAX_BDIMS - 1; d >= 0; --d) {
        step[d] = acc;
        if (!prompt_reduced(p, s, d)) b0 += bi.i[d] * acc;
        acc *= p.bsize[d];
    }
    const Operand& ok = p.dpk[s];
    const Operand& ov = p.dpv[s];
    T* gk = (T*)ok.ptr + boff(ok, bi);
    T* gv = (T*)ov.ptr + boff(ov, bi);
    const int nvec = P * D / 4;                              // float4s per prompt (k or v)
    const int64_t vslice = nvec;                              // one sequence's slice
    const float4* part = reinterpret_cast<const float4*>(p.part + prompt_part_offset(p, s));
    for (int e = tid; e < 2 * nvec; e += UT) {
        const int which = e >= nvec;
        const int v = e - which * nvec;
        const float4* src = part + (int64_t)which * prompt_part_slots(p) * vslice + v;
        float sum[4] = {0.f, 0.f, 0.f, 0.f};
        int64_t idx[AVSTFP_MAX_BDIMS] = {0, 0, 0, 0};   // odometer over the reduced dims
        int64_t b = b0;
        for (int64_t m = 0; m < R; m += kLoads) {
            float4 x[kLoads];
#pragma unroll
            for (int u = 0; u < kLoads; ++u) {
                if (m + u >= R) break;
                x[u] = load_cg(src + b * vslice);
                for (int d = AVSTFP_MAX_BDIMS - 1; d >= 0; --d) {   // next member
                    if (!prompt_reduced(p, s, d)) continue;
                    b += step[d];
                    if (++idx[d] < p.bsize[d]) break;
                    b -= idx[d] * step[d];
                    idx[d] = 0;
                }
            }
#pragma unroll
            for (int u = 0; u < kLoads; ++u) {   // in member order
                if (m + u >= R) break;
                sum[0] += x[u].x;
                sum[1] += x[u].y;
                sum[2] += x[u].z;
                sum[3] += x[u].w;
            }
        }
        const int r = 4 * v / D, c = 4 * v % D;
        T* dst = which ? gv + (int64_t)r * ov.rstride + c : gk + (int64_t)r * ok.rstride + c;
#pragma unroll
        for (int i = 0; i < 4; ++i) dst[i] = from_f<T>(sum[i]);
    }
}

// A unit that owns prompt rows of sequence bi of segment s has written their partials: it
// takes its ticket; the last of the `total` units of the row set finishes dpk/dpv.
template <typename T, int D, int UT>
__device__ __forceinline__ void prompt_rows_done(const AttnParams& p, int s, const BatchIdx& bi,
                                                 int tid, int total, int* flag) {
    int* ticket = p.tickets + prompt_ticket_offset(p, s) + prompt_group(p, s, bi);
    if (last_of_row_set<UT>(ticket, total, flag, tid)) finish_prompt_grads<T, D, UT>(p, s, bi, tid);
}

// Key tiles of BN rows of segment s that hold prompt rows (units per sequence that take a
// ticket in dK/dV).
__host__ __device__ inline int prompt_key_tiles(const AttnParams& p, int s, int BN) {
    return num_prompts(p, s) > 0 ? num_key_tiles(p, s, BN) - p.k_len[s] / BN : 0;
}

// rowsum(dO o O) of `rows` query rows (dO in shared memory, O from global memory) by one
// warp, lane 0 writes them to p.delta; returns the values of rows g and g + 8 (fragment
// rows of this lane).  What the former delta pre-pass kernel did, done by the
// dQ kernel for its own query tile (dK/dV, launched after it, reads p.delta).
template <typename T, int D>
__device__ __forceinline__ void warp_delta(const AttnParams& p, const T* sdO, int ld,
                                           const T* o, int64_t ostride, int rows, float* out,
                                           float (&mine)[2]) {
    const int lane = threadIdx.x & 31, g = lane >> 2;
    mine[0] = mine[1] = 0.f;
#pragma unroll 1
    for (int r = 0; r < rows; ++r) {
        float a = 0.f;
#pragma unroll
        for (int c = lane; c < D; c += 32)
            a += to_f(sdO[r * ld + c]) * to_f(o[(int64_t)r * ostride + c]);
        a = warp_sum(a);
        if (lane == 0) out[r] = a;
        if (r == g) mine[0] = a;
        if (r == g + 8) mine[1] = a;
    }
}

// ================================================================== backward: dQ
// fp32: dS is written over S in place.
template <typename T, int D, int BM, int BN, int STAGES>
struct DqSmem {
    static constexpr bool F32 = std::is_same<T, float>::value;
    static constexpr int LDT = pitch<T>(D), LDS = pitch<float>(BN), LDP = pitch<T>(BN),
                         LDA = pitch<float>(D);
    static constexpr size_t tile = align128(sizeof(T) * BN * LDT);
    static constexpr size_t q = 0;
    static constexpr size_t dout = q + align128(sizeof(T) * BM * LDT);
    static constexpr size_t kv = dout + align128(sizeof(T) * BM * LDT);
    static constexpr size_t s = kv + 2 * STAGES * tile;
    static constexpr size_t dp = s + align128(sizeof(float) * BM * LDS);
    static constexpr size_t ds = F32 ? s : dp + align128(sizeof(float) * BM * LDS);
    static constexpr size_t dq = F32 ? dp + align128(sizeof(float) * BM * LDS)
                                     : ds + align128(sizeof(T) * BM * LDP);
    static constexpr size_t stat = dq + align128(sizeof(float) * BM * LDA);
    static constexpr bool MMA = !F32;   // fp16/bf16: Q, dO and the K/V stages only
    static constexpr size_t bytes = MMA ? s : stat + align128(sizeof(float) * 2 * BM);
    static constexpr size_t score_bytes = MMA ? 0 : 2 * sizeof(float) * BM * LDS;   // S, dP
    static constexpr size_t acc_bytes = MMA ? 0 : sizeof(float) * BM * LDA;         // dQ
};

template <typename T, int D, int BM, int BN, int STAGES, int PACK>
__device__ __forceinline__ void dq_mma_body(const AttnParams& p);
template <typename T, int D, int BM, int BN, int STAGES, int PACK>
__device__ __forceinline__ void dq_smem_body(const AttnParams& p);

// dQ: fp16/bf16 in registers (dq_mma_body), fp32 through shared memory (dq_smem_body).
template <typename T, int D, int BM, int BN, int STAGES, int PACK>
__global__ void __launch_bounds__(PACK * BM * 2, 1)
dq_kernel(const __grid_constant__ AttnParams p) {
    if constexpr (DqSmem<T, D, BM, BN, STAGES>::MMA)
        dq_mma_body<T, D, BM, BN, STAGES, PACK>(p);
    else
        dq_smem_body<T, D, BM, BN, STAGES, PACK>(p);
}

// One warp owns 16 query rows: Q's and dO's A fragments loaded once; per key tile
// S = Q K^T and dP = dO V^T into C fragments, P = exp2(S log2e scale - lse log2e) and
// dS = P (dP - delta) in the same registers, which become the A operand of dQ += dS K.
template <typename T, int D, int BM, int BN, int STAGES, int PACK>
__device__ __forceinline__ void dq_mma_body(const AttnParams& p) {
    using L = DqSmem<T, D, BM, BN, STAGES>;
    constexpr int UT = BM * 2;
    extern __shared__ __align__(128) unsigned char smem[];
    const int unit = threadIdx.x / UT, tid = threadIdx.x % UT;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;

    QTile<T, D, BM, BN, STAGES, L> t;   // the same preamble in all four bodies: see QTile
    if (!t.template init<PACK>(p, smem, unit, tid)) return;
    const int64_t b = t.b;
    const int seg = t.seg, q0 = t.q0, nq = t.nq, ntiles = t.ntiles;
    const BatchIdx& bi = t.bi;
    unsigned char* base = t.base;
    T* sQ = reinterpret_cast<T*>(base + L::q);
    T* sdO = reinterpret_cast<T*>(base + L::dout);
    const float sl2 = p.scale * kLog2e;

    t.load_rows(p.q, sQ);
    t.load_rows(p.dout, sdO);
    t.start(p);
    float lse[2], dlt[2] = {0.f, 0.f};   // rows g, g+8 of this warp (lse in log2 units);
#pragma unroll                              // padded rows: 0
    for (int h = 0; h < 2; ++h) {
        const int r = warp * 16 + g + 8 * h;
        lse[h] = r < nq ? p.lse[b * p.Lq + q0 + r] * kLog2e : 0.f;
    }
    const int wrows = max(0, min(16, nq - warp * 16));   // this warp's query rows

    T* Qw = sQ + warp * 16 * L::LDT;
    const T* dOw = sdO + warp * 16 * L::LDT;
    uint32_t qf[D / 16][4], df[D / 16][4];
    float dq[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;

#pragma unroll 1
    for (int j = 0; j < ntiles; ++j) {
        const int stage = t.acquire(p, j);
        if (j == 0) {
            load_a_frags<T, D>(qf, Qw, L::LDT);
            load_a_frags<T, D>(df, dOw, L::LDT);
            // delta of the warp's rows, for dS here and for dK/dV: with several key
            // tiles rowsum(dO o O); with one, rowsum(P o dP) below (no extra product)
            if (ntiles > 1)
                warp_delta<T, D>(p, dOw, L::LDT,
                                 (const T*)p.o.ptr + boff(p.o, bi) + (int64_t)(q0 + warp * 16) * p.o.rstride,
                                 p.o.rstride, wrows, p.delta + b * p.Lq + q0 + warp * 16, dlt);
        }
        const T* sK = t.stK(stage);
        const T* sV = t.stV(stage);
        const KeyTile kt = key_tile<T>(p, seg, j, BN, bi);
        const int nk = kt.nk + kt.np;

        float sc[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) sc[n][i] = dp[n][i] = 0.f;
        mma_abt<T, BN, D>(sc, qf, sK, L::LDT);    // S = Q K^T
        mma_abt<T, BN, D>(dp, df, sV, L::LDT);    // dP = dO V^T
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = n * 8 + 2 * tq + (i & 1);
                sc[n][i] = c < nk ? exp2f(sc[n][i] * sl2 - lse[i >> 1]) : 0.f;   // P
            }
        if (ntiles == 1) {   // every key in this tile: delta = rowsum(P o dP) in fp32, exact
            // where the rounded O of rowsum(dO o O) is not (few keys: dP - delta cancels)
            dlt[0] = dlt[1] = 0.f;
#pragma unroll
            for (int n = 0; n < BN / 8; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) dlt[i >> 1] += sc[n][i] * dp[n][i];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                dlt[h] += __shfl_xor_sync(0xffffffffu, dlt[h], 1);
                dlt[h] += __shfl_xor_sync(0xffffffffu, dlt[h], 2);
                if (tq == 0 && g + 8 * h < wrows) p.delta[b * p.Lq + q0 + warp * 16 + g + 8 * h] = dlt[h];
            }
        }
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) sc[n][i] *= dp[n][i] - dlt[i >> 1];   // dS
        mma_pv<T, D, BN>(dq, sc, sK, L::LDT);     // dQ += dS K
    }
    cp_async_drain();   // nothing left in flight on any exit path

    warp_store_frags<T, D>((T*)p.dq.ptr + boff(p.dq, bi) + (int64_t)(q0 + warp * 16) * p.dq.rstride,
                           p.dq.rstride, Qw, L::LDT, dq, p.scale, p.scale,
                           min(16, nq - warp * 16), p.vec16_out != 0);
}

template <typename T, int D, int BM, int BN, int STAGES, int PACK>
__device__ __forceinline__ void dq_smem_body(const AttnParams& p) {
    using L = DqSmem<T, D, BM, BN, STAGES>;
    constexpr int UT = BM * 2;
    extern __shared__ __align__(128) unsigned char smem[];
    const int unit = threadIdx.x / UT, tid = threadIdx.x % UT;
    const int warp = tid >> 5, lane = tid & 31;

    QTile<T, D, BM, BN, STAGES, L> t;   // the same preamble in all four bodies: see QTile
    if (!t.template init<PACK>(p, smem, unit, tid)) return;
    const int64_t b = t.b;
    const int seg = t.seg, q0 = t.q0, nq = t.nq, ntiles = t.ntiles;
    const BatchIdx& bi = t.bi;
    unsigned char* base = t.base;
    T* sQ = reinterpret_cast<T*>(base + L::q);
    T* sdO = reinterpret_cast<T*>(base + L::dout);
    float* sS = reinterpret_cast<float*>(base + L::s);
    float* sdP = reinterpret_cast<float*>(base + L::dp);
    T* sdS = reinterpret_cast<T*>(base + L::ds);
    float* sdQ = reinterpret_cast<float*>(base + L::dq);
    float* sLse = reinterpret_cast<float*>(base + L::stat);   // log2 units
    float* sDelta = sLse + BM;
    const float sl2 = p.scale * kLog2e;

    t.load_rows(p.q, sQ);
    t.load_rows(p.dout, sdO);
    t.start(p);
    for (int i = tid; i < BM * L::LDA; i += UT) sdQ[i] = 0.f;
    for (int r = tid; r < BM; r += UT) sLse[r] = r < nq ? p.lse[b * p.Lq + q0 + r] * kLog2e : 0.f;

    const T* Qw = sQ + warp * 16 * L::LDT;
    const T* dOw = sdO + warp * 16 * L::LDT;
    float* Sw = sS + warp * 16 * L::LDS;
    float* dPw = sdP + warp * 16 * L::LDS;
    T* dSw = sdS + warp * 16 * L::LDP;
    float* dQw = sdQ + warp * 16 * L::LDA;

    for (int j = 0; j < ntiles; ++j) {
        const int stage = t.acquire(p, j);
        if (j == 0) {   // delta = rowsum(dO o O) of the warp's rows (sDelta: warp-owned rows)
            float mine[2];
            warp_delta<T, D>(p, dOw, L::LDT,
                             (const T*)p.o.ptr + boff(p.o, bi) + (int64_t)(q0 + warp * 16) * p.o.rstride,
                             p.o.rstride, max(0, min(16, nq - warp * 16)),
                             p.delta + b * p.Lq + q0 + warp * 16, mine);
            if ((lane & 3) == 0) {
                sDelta[warp * 16 + (lane >> 2)] = mine[0];
                sDelta[warp * 16 + (lane >> 2) + 8] = mine[1];
            }
            __syncwarp();
        }
        const T* sK = t.stK(stage);
        const T* sV = t.stV(stage);
        const KeyTile kt = key_tile<T>(p, seg, j, BN, bi);
        const int nk = kt.nk + kt.np;

        warp_mm<T, BN, D, true>(Qw, L::LDT, sK, L::LDT, Sw, L::LDS, false);    // S = Q K^T
        warp_mm<T, BN, D, true>(dOw, L::LDT, sV, L::LDT, dPw, L::LDS, false);  // dP = dO V^T
        for (int i = lane; i < 16 * BN; i += 32) {
            const int r = i / BN, c = i % BN;
            const int row = warp * 16 + r;
            const float pr = c < nk ? exp2f(Sw[r * L::LDS + c] * sl2 - sLse[row]) : 0.f;
            dSw[r * L::LDP + c] = from_f<T>(pr * (dPw[r * L::LDS + c] - sDelta[row]));
        }
        warp_mm<T, D, BN, false>(dSw, L::LDP, sK, L::LDT, dQw, L::LDA, true);  // dQ += dS K
    }
    cp_async_drain();   // nothing left in flight on any exit path
    unit_sync<UT>();

    store_tile<T, D, UT>((T*)p.dq.ptr + boff(p.dq, bi) + (int64_t)q0 * p.dq.rstride,
                         p.dq.rstride, sdQ, L::LDA, nq, nullptr, p.scale, p.vec16_out != 0, tid);
}

// ================================================================== backward: dK, dV
// BN key rows per unit (one warp per 16 keys), looping over query tiles of BM rows that
// stream through a STAGES-deep pipeline (Q, dO by cp.async; lse, delta by plain loads).
// fp32: P^T is written over S^T and dS^T over dP^T in place.
template <typename T, int D, int BN, int BM, int STAGES>
struct DkvSmem {
    static constexpr bool F32 = std::is_same<T, float>::value;
    static constexpr int LDT = pitch<T>(D), LDS = pitch<float>(BM), LDP = pitch<T>(BM),
                         LDA = pitch<float>(D);
    static constexpr size_t qtile = align128(sizeof(T) * BM * LDT);
    static constexpr size_t stat_stage = align128(sizeof(float) * 2 * BM);
    static constexpr size_t k = 0;
    static constexpr size_t v = k + align128(sizeof(T) * BN * LDT);
    static constexpr size_t qd = v + align128(sizeof(T) * BN * LDT);   // stage i: Q, dO
    static constexpr size_t stat = qd + 2 * STAGES * qtile;             // stage i: lse, delta
    static constexpr size_t s = stat + STAGES * stat_stage;
    static constexpr size_t dp = s + align128(sizeof(float) * BN * LDS);
    static constexpr size_t pm = F32 ? s : dp + align128(sizeof(float) * BN * LDS);
    static constexpr size_t ds = F32 ? dp : pm + align128(sizeof(T) * BN * LDP);
    static constexpr size_t dk = F32 ? dp + align128(sizeof(float) * BN * LDS)
                                     : ds + align128(sizeof(T) * BN * LDP);
    static constexpr size_t dv = dk + align128(sizeof(float) * BN * LDA);
    static constexpr bool MMA = !F32;   // fp16/bf16: K, V, the Q/dO and lse/delta stages only
    static constexpr size_t bytes = MMA ? s : dv + align128(sizeof(float) * BN * LDA);
    static constexpr size_t score_bytes = MMA ? 0 : 2 * sizeof(float) * BN * LDS;  // S^T, dP^T
    static constexpr size_t acc_bytes = MMA ? 0 : 2 * sizeof(float) * BN * LDA;    // dK, dV
};

template <typename T, int D, int BN, int BM, int STAGES, int PACK>
__device__ __forceinline__ void dkv_mma_body(const AttnParams& p);
template <typename T, int D, int BN, int BM, int STAGES, int PACK>
__device__ __forceinline__ void dkv_smem_body(const AttnParams& p);

// dK/dV: fp16/bf16 in registers (dkv_mma_body), fp32 through shared memory (dkv_smem_body).
template <typename T, int D, int BN, int BM, int STAGES, int PACK>
__global__ void __launch_bounds__(PACK * BN * 2, 1)
dkv_kernel(const __grid_constant__ AttnParams p) {
    if constexpr (DkvSmem<T, D, BN, BM, STAGES>::MMA)
        dkv_mma_body<T, D, BN, BM, STAGES, PACK>(p);
    else
        dkv_smem_body<T, D, BN, BM, STAGES, PACK>(p);
}

// What both dK/dV bodies share: the work item's (sequence, segment, key tile), the unit's
// shared-memory stages, and the cp.async pipeline over the segment's query tiles.  Every
// path commits the same groups: start() one K/V group (no copies for a segment without
// queries: segments=(0, n) with prompts, or Lq = 0; its keys' gradients are zero), then one
// Q/dO group per prefetched stage; each acquire() one group.  The bodies drain what is left
// before they exit.  The key tile (key_tile(seg, j)) stays a local of each body: kept in
// this struct, it costs the fp16/bf16 head-dim-128 kernel 2 registers.
template <typename T, int D, int BN, int BM, int STAGES>
struct DkvTile {
    using L = DkvSmem<T, D, BN, BM, STAGES>;
    static constexpr int UT = BN * 2;
    unsigned char* base;   // this unit's shared memory
    int tid, seg, j, nqt;  // key tile j of segment seg; nqt: query tiles of the segment
    int64_t b;
    BatchIdx bi;
    bool vec;
    float sl2;   // scale in log2 units
    const T *gq, *gdo;

    // The work item of unit `unit`; false (and no copies issued) when there is none.
    template <int PACK>
    __device__ __forceinline__ bool init(const AttnParams& p, unsigned char* smem, int unit,
                                         int tid_) {
        const int tiles = num_key_tiles_all(p, BN);
        const int64_t w = work_item<PACK>(unit);
        if (w >= (int64_t)tiles * p.nseq) return false;
        tid = tid_;
        b = w / tiles;
        seg = 0;
        j = (int)(w % tiles);   // (segment, key tile) from the tile index
        while (j >= num_key_tiles(p, seg, BN)) j -= num_key_tiles(p, seg++, BN);
        base = smem + unit * L::bytes;
        bi = batch_index(p, b);
        vec = p.vec16 != 0;
        sl2 = p.scale * kLog2e;
        nqt = cdiv(p.q_len[seg], BM);
        gq = (const T*)p.q.ptr + boff(p.q, bi);
        gdo = (const T*)p.dout.ptr + boff(p.dout, bi);
        return true;
    }

    __device__ __forceinline__ T* sK() const { return reinterpret_cast<T*>(base + L::k); }
    __device__ __forceinline__ T* sV() const { return reinterpret_cast<T*>(base + L::v); }
    __device__ __forceinline__ T* stQ(int st) const {
        return reinterpret_cast<T*>(base + L::qd + 2 * st * L::qtile);
    }
    __device__ __forceinline__ T* stdO(int st) const {
        return reinterpret_cast<T*>(base + L::qd + (2 * st + 1) * L::qtile);
    }
    __device__ __forceinline__ float* stLse(int st) const {
        return reinterpret_cast<float*>(base + L::stat + st * L::stat_stage);
    }

    // query tile i into stage st: Q, dO asynchronously; lse, delta (per query, log2 units;
    // padded queries get lse = +inf, so their probabilities are exactly 0) by plain stores
    __device__ __forceinline__ void issue_q(const AttnParams& p, int i, int st) const {
        const int q0 = p.q_start[seg] + i * BM;
        const int nq = min(BM, p.q_start[seg] + p.q_len[seg] - q0);
        load_tile<T, BM, D, UT>(stQ(st), gq + (int64_t)q0 * p.q.rstride, p.q.rstride, nq, vec,
                                tid);
        load_tile<T, BM, D, UT>(stdO(st), gdo + (int64_t)q0 * p.dout.rstride, p.dout.rstride,
                                nq, vec, tid);
        float* lse = stLse(st);
        for (int r = tid; r < BM; r += UT) {
            lse[r] = r < nq ? p.lse[b * p.Lq + q0 + r] * kLog2e : INFINITY;
            lse[BM + r] = r < nq ? p.delta[b * p.Lq + q0 + r] : 0.f;
        }
    }

    // K and V of tile kt as a commit group of their own (older than every Q/dO group, so
    // the pipeline's waits cover it), then the first STAGES-1 query tiles.
    __device__ __forceinline__ void start(const AttnParams& p, const KeyTile& kt) const {
        if (nqt > 0) {
            const int64_t rpk = kt.np > 0 ? p.pk[seg].rstride : 0;
            const int64_t rpv = kt.np > 0 ? p.pv[seg].rstride : 0;
            load_tile2<T, BN, D, UT>(sK(), (const T*)kt.k, p.k.rstride, kt.nk, (const T*)kt.pk,
                                     rpk, kt.np, vec, tid);
            load_tile2<T, BN, D, UT>(sV(), (const T*)kt.v, p.v.rstride, kt.nk, (const T*)kt.pv,
                                     rpv, kt.np, vec, tid);
        }
        cp_async_commit();
#pragma unroll 1
        for (int st = 0; st < STAGES - 1; ++st) {
            if (st < nqt) issue_q(p, st, st);
            cp_async_commit();
        }
    }

    // Query tile i resident in its stage (returned) for the whole unit; the next tile's
    // copies are in flight.
    __device__ __forceinline__ int acquire(const AttnParams& p, int i) const {
        if constexpr (STAGES == 1) {
            unit_sync<UT>();
            issue_q(p, i, 0);
            cp_async_commit();
        }
        cp_async_wait<kWaitGroups<STAGES>>();
        if (AVSTFP_TEST_FAULT != 2) unit_sync<UT>();
        if constexpr (STAGES > 1) {
            const int in = i + STAGES - 1;
            if (in < nqt) issue_q(p, in, in % STAGES);
            cp_async_commit();
        }
        return i % STAGES;
    }
};

// One warp owns 16 key rows (keys, then prompts): K's and V's A fragments loaded once;
// per query tile S^T = K Q^T and dP^T = V dO^T into C fragments (columns: queries),
// P^T = exp2(S^T log2e scale - lse) and dS^T = P^T (dP^T - delta) in the same registers,
// which become the A operands of dV += P^T dO and dK += dS^T Q; dK and dV stay in
// registers until the end.  Key rows go out through the warp's own K/V rows in shared
// memory (16-byte stores); prompt rows go from the registers to this sequence's fp32
// partials, summed by the last unit of the row set (prompt_rows_done).
template <typename T, int D, int BN, int BM, int STAGES, int PACK>
__device__ __forceinline__ void dkv_mma_body(const AttnParams& p) {
    using L = DkvSmem<T, D, BN, BM, STAGES>;
    constexpr int UT = BN * 2;
    extern __shared__ __align__(128) unsigned char smem[];
    const int unit = threadIdx.x / UT, tid = threadIdx.x % UT;
    const int warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;

    DkvTile<T, D, BN, BM, STAGES> t;
    if (!t.template init<PACK>(p, smem, unit, tid)) return;
    const KeyTile kt = key_tile<T>(p, t.seg, t.j, BN, t.bi);
    t.start(p, kt);

    T* Kw = t.sK() + warp * 16 * L::LDT;
    T* Vw = t.sV() + warp * 16 * L::LDT;
    // Head dim 128: dK and dV alone take 128 registers, so K's and V's fragments (64 more)
    // are reloaded from shared memory for every query tile instead of kept (no spills).
    constexpr bool kKeepKV = D <= 32;
    uint32_t kf[D / 16][4], vf[kKeepKV ? D / 16 : 1][4];
    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) dk[n][i] = dv[n][i] = 0.f;

#pragma unroll 1
    for (int i = 0; i < t.nqt; ++i) {
        const int st = t.acquire(p, i);
        const T* sQ = t.stQ(st);
        const T* sdO = t.stdO(st);
        const float* sLse = t.stLse(st);
        const float* sDelta = sLse + BM;

        float pt[BM / 8][4], dst[BM / 8][4];
#pragma unroll
        for (int n = 0; n < BM / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) pt[n][e] = dst[n][e] = 0.f;
        if constexpr (kKeepKV) {   // K, V fragments loaded once, live across the loop
            if (i == 0) {
                load_a_frags<T, D>(kf, Kw, L::LDT);
                load_a_frags<T, D>(vf, Vw, L::LDT);
            }
            mma_abt<T, BM, D>(pt, kf, sQ, L::LDT);     // S^T = K Q^T
            mma_abt<T, BM, D>(dst, vf, sdO, L::LDT);   // dP^T = V dO^T
        } else {                   // reloaded per query tile, one at a time
            load_a_frags<T, D>(kf, Kw, L::LDT);
            mma_abt<T, BM, D>(pt, kf, sQ, L::LDT);
            load_a_frags<T, D>(kf, Vw, L::LDT);
            mma_abt<T, BM, D>(dst, kf, sdO, L::LDT);
        }
#pragma unroll
        for (int n = 0; n < BM / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = n * 8 + 2 * tq + (e & 1);   // query
                const float pr = exp2f(pt[n][e] * t.sl2 - sLse[c]);
                pt[n][e] = pr;                             // P^T
                dst[n][e] = pr * (dst[n][e] - sDelta[c]);  // dS^T
            }
        mma_pv<T, D, BM>(dv, pt, sdO, L::LDT);     // dV += P^T dO
        mma_pv<T, D, BM>(dk, dst, sQ, L::LDT);     // dK += dS^T Q
    }
    cp_async_drain();   // nothing left in flight on any exit path

    // key rows [0, nk) of the tile: staged in the warp's own K/V rows, 16-byte stores
    const int r0 = warp * 16;
    const int nkw = min(16, kt.nk - r0);
    if (nkw > 0) {
        const bool v16 = p.vec16_out != 0;
        warp_store_frags<T, D>((T*)p.dk.ptr + boff(p.dk, t.bi) + (int64_t)(kt.k0 + r0) * p.dk.rstride,
                               p.dk.rstride, Kw, L::LDT, dk, p.scale, p.scale, nkw, v16);
        warp_store_frags<T, D>((T*)p.dv.ptr + boff(p.dv, t.bi) + (int64_t)(kt.k0 + r0) * p.dv.rstride,
                               p.dv.rstride, Vw, L::LDT, dv, 1.f, 1.f, nkw, v16);
    }
    // prompt rows [nk, nk + np): this sequence's fp32 partials from the registers; the
    // last unit of the row set writes dpk/dpv (prompt_rows_done)
    if (kt.np > 0) {
        if (r0 + 16 > kt.nk && r0 < kt.nk + kt.np) {
            float* gk = prompt_part(p, t.seg, 0, t.b) + (int64_t)kt.p0 * D;
            float* gv = prompt_part(p, t.seg, 1, t.b) + (int64_t)kt.p0 * D;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = r0 + g + 8 * h - kt.nk;   // prompt row within the tile's prompts
                if (r < 0 || r >= kt.np) continue;
#pragma unroll
                for (int n = 0; n < D / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int c = n * 8 + 2 * tq + e;
                        gk[r * D + c] = dk[n][2 * h + e] * p.scale;
                        gv[r * D + c] = dv[n][2 * h + e];
                    }
            }
        }
        prompt_rows_done<T, D, UT>(p, t.seg, t.bi, tid,
                                   (int)prompt_reps(p, t.seg) * prompt_key_tiles(p, t.seg, BN),
                                   reinterpret_cast<int*>(t.base + L::qd));
    }
}

template <typename T, int D, int BN, int BM, int STAGES, int PACK>
__device__ __forceinline__ void dkv_smem_body(const AttnParams& p) {
    using L = DkvSmem<T, D, BN, BM, STAGES>;
    constexpr int UT = BN * 2;
    extern __shared__ __align__(128) unsigned char smem[];
    const int unit = threadIdx.x / UT, tid = threadIdx.x % UT;
    const int warp = tid >> 5, lane = tid & 31;

    DkvTile<T, D, BN, BM, STAGES> t;
    if (!t.template init<PACK>(p, smem, unit, tid)) return;
    const KeyTile kt = key_tile<T>(p, t.seg, t.j, BN, t.bi);
    t.start(p, kt);
    unsigned char* base = t.base;
    float* sS = reinterpret_cast<float*>(base + L::s);     // S^T: keys x queries
    float* sdP = reinterpret_cast<float*>(base + L::dp);   // dP^T
    T* sP = reinterpret_cast<T*>(base + L::pm);            // P^T
    T* sdS = reinterpret_cast<T*>(base + L::ds);           // dS^T
    float* sdK = reinterpret_cast<float*>(base + L::dk);
    float* sdV = reinterpret_cast<float*>(base + L::dv);
    for (int i = tid; i < BN * L::LDA; i += UT) {
        sdK[i] = 0.f;
        sdV[i] = 0.f;
    }

    const T* Kw = t.sK() + warp * 16 * L::LDT;
    const T* Vw = t.sV() + warp * 16 * L::LDT;
    float* Sw = sS + warp * 16 * L::LDS;
    float* dPw = sdP + warp * 16 * L::LDS;
    T* Pw = sP + warp * 16 * L::LDP;
    T* dSw = sdS + warp * 16 * L::LDP;
    float* dKw = sdK + warp * 16 * L::LDA;
    float* dVw = sdV + warp * 16 * L::LDA;

    for (int i = 0; i < t.nqt; ++i) {
        const int st = t.acquire(p, i);
        const T* sQ = t.stQ(st);
        const T* sdO = t.stdO(st);
        const float* sLse = t.stLse(st);
        const float* sDelta = sLse + BM;

        warp_mm<T, BM, D, true>(Kw, L::LDT, sQ, L::LDT, Sw, L::LDS, false);    // S^T = K Q^T
        warp_mm<T, BM, D, true>(Vw, L::LDT, sdO, L::LDT, dPw, L::LDS, false);  // dP^T = V dO^T
        for (int e = lane; e < 16 * BM; e += 32) {
            const int r = e / BM, c = e % BM;     // r: key (this warp), c: query
            const float pr = exp2f(Sw[r * L::LDS + c] * t.sl2 - sLse[c]);
            const float ds = pr * (dPw[r * L::LDS + c] - sDelta[c]);
            Pw[r * L::LDP + c] = from_f<T>(pr);
            dSw[r * L::LDP + c] = from_f<T>(ds);
        }
        warp_mm<T, D, BM, false>(Pw, L::LDP, sdO, L::LDT, dVw, L::LDA, true);  // dV += P^T dO
        warp_mm<T, D, BM, false>(dSw, L::LDP, sQ, L::LDT, dKw, L::LDA, true);  // dK += dS^T Q
    }
    cp_async_drain();   // nothing left in flight on any exit path
    unit_sync<UT>();

    if (kt.nk > 0) {   // rows [0, nk): keys
        const bool v16 = p.vec16_out != 0;
        store_tile<T, D, UT>((T*)p.dk.ptr + boff(p.dk, t.bi) + (int64_t)kt.k0 * p.dk.rstride,
                             p.dk.rstride, sdK, L::LDA, kt.nk, nullptr, p.scale, v16, tid);
        store_tile<T, D, UT>((T*)p.dv.ptr + boff(p.dv, t.bi) + (int64_t)kt.k0 * p.dv.rstride,
                             p.dv.rstride, sdV, L::LDA, kt.nk, nullptr, 1.f, v16, tid);
    }
    if (kt.np > 0) {
        // rows [nk, nk + np): this sequence's fp32 partials; the last unit of the row set
        // writes dpk/dpv (prompt_rows_done)
        float* gk = prompt_part(p, t.seg, 0, t.b) + (int64_t)kt.p0 * D;
        float* gv = prompt_part(p, t.seg, 1, t.b) + (int64_t)kt.p0 * D;
        const float* dK = sdK + kt.nk * L::LDA;
        const float* dV = sdV + kt.nk * L::LDA;
        for (int i = tid; i < kt.np * D; i += UT) {
            const int r = i / D, c = i % D;
            gk[i] = dK[r * L::LDA + c] * p.scale;
            gv[i] = dV[r * L::LDA + c];
        }
        prompt_rows_done<T, D, UT>(p, t.seg, t.bi, tid,
                                   (int)prompt_reps(p, t.seg) * prompt_key_tiles(p, t.seg, BN),
                                   reinterpret_cast<int*>(base + L::qd));
    }
}

// ================================================================== short-sequence backward
// fp16/bf16, every segment <= 16 queries (short_tiles: the temporal stage).  One warp owns
// one (sequence, segment) and computes all of its gradients in one launch: no delta
// pre-pass (delta = rowsum(P o dP) is computed here from the recomputed P and dP, in fp32,
// not from the rounded output), no dQ accumulator in global memory (dQ stays in registers
// and is written once), and the prompts share the key tiles (10 keys + 2 prompts: one
// 16-row tile).  Pass 1 over the key tiles: delta.  Pass 2: per key tile, dS for dQ
// (query rows) and, with transposed products (S^T = K Q^T, dP^T = V dO^T), dV = P^T dO and
// dK = dS^T Q of the tile's 16 keys/prompts, written at once (one owner per key row).
// PACK such warps share a CTA; each has its own shared memory.  Prompt gradients: with
// p.seq_reps = R > 0 a warp owns the R sequences b = r * (nseq / R) + g that share one
// prompt row set and runs them in order r = 0 .. R-1, keeping a running fp32 sum in the
// row set's partial slot (each lane its own elements; r = 0 stores, later ones add) and
// writing dpk/dpv in the prompts' dtype at r = R-1: no zero-fill, no atomics, no
// cast, one fixed order.  Without seq_reps each warp writes its sequence's partials and
// the last warp of the row set sums them (prompt_rows_done).
enum SeqPromptMode : int { kPartOwn = 0, kSumFirst, kSumAdd, kSumLast, kSumOnly };

// One key tile's dV (which = 0) or dK (which = 1) of the short-sequence backward, from C
// fragments acc (times mul): key rows [0, nk) staged in shared rows s (16 x D, the tile's
// own V or K rows, no longer read) and written with 16-byte stores; prompt rows [nk,
// nk + np) from the registers by `mode` (SeqPromptMode): partials of sequence b, or the
// running sum of row set grp (slice grp), the last step writing dpv/dpk (prompts' dtype).
template <typename T, int D>
__device__ __forceinline__ void seq_bwd_store_tile(const AttnParams& p, int seg,
                                                   const BatchIdx& bi, const KeyTile& kt,
                                                   const float (&acc)[D / 8][4], float mul,
                                                   T* s, int which, bool v16, int mode,
                                                   int64_t b, int64_t grp) {
    const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    constexpr int LD = pitch<T>(D);
    if (kt.nk > 0) {
        const Operand& o = which == 0 ? p.dv : p.dk;
        warp_store_frags<T, D>((T*)o.ptr + boff(o, bi) + (int64_t)kt.k0 * o.rstride, o.rstride, s,
                               LD, acc, mul, mul, kt.nk, v16);
    }
    if (kt.np > 0) {
        const int pw = 1 - which;   // partial index: 0 prompt_k, 1 prompt_v
        float* part = prompt_part(p, seg, pw, mode == kPartOwn ? b : grp) + (int64_t)kt.p0 * D;
        const Operand& o = which == 0 ? p.dpv[seg] : p.dpk[seg];
        T* out = (T*)o.ptr + boff(o, bi) + (int64_t)kt.p0 * o.rstride;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = g + 8 * h - kt.nk;
            if (r < 0 || r >= kt.np) continue;
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = n * 8 + 2 * tq + e;
                    float* a = part + r * D + c;
                    const float v = acc[n][2 * h + e] * mul;
                    if (mode == kPartOwn || mode == kSumFirst)
                        *a = v;
                    else if (mode == kSumAdd)
                        *a += v;   // this lane's own element of the previous sequence
                    else
                        out[(int64_t)r * o.rstride + c] = from_f<T>(mode == kSumLast ? *a + v : v);
                }
        }
    }
}

template <typename T, int D>
struct SeqBwdSmem {
    static constexpr int LDT = pitch<T>(D);
    static constexpr size_t tile = align128(sizeof(T) * 16 * LDT);
    static constexpr size_t q = 0, dout = tile, k = 2 * tile, v = 3 * tile, stat = 4 * tile;
    static constexpr size_t bytes = stat + align128(sizeof(float) * 2 * 16);   // lse, delta
};

template <typename T, int D, int PACK>
__global__ void __launch_bounds__(PACK * 32, 1) seq_bwd_kernel(const __grid_constant__ AttnParams p) {
    using L = SeqBwdSmem<T, D>;
    constexpr int LD = L::LDT;
    extern __shared__ __align__(128) unsigned char smem[];
    const int unit = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int64_t w = work_item<PACK>(unit);
    const int64_t reps = p.seq_reps > 0 ? p.seq_reps : 1, groups = p.nseq / reps;
    if (w >= groups * p.nseg) return;
    const int64_t grp = w / p.nseg;
    const int seg = (int)(w % p.nseg);
    const int nq = p.q_len[seg], q0 = p.q_start[seg];
    const int ntiles = num_key_tiles(p, seg, 16);

    unsigned char* base = smem + unit * L::bytes;
    T* sQ = reinterpret_cast<T*>(base + L::q);
    T* sdO = reinterpret_cast<T*>(base + L::dout);
    T* sK = reinterpret_cast<T*>(base + L::k);
    T* sV = reinterpret_cast<T*>(base + L::v);
    float* sLse = reinterpret_cast<float*>(base + L::stat);   // per query (log2 units)
    float* sDelta = sLse + 16;

    const bool vec = p.vec16 != 0, v16 = p.vec16_out != 0;
    const float sl2 = p.scale * kLog2e;
    constexpr bool kKeepQ = D <= 64;   // head dim 128: reload Q/dO fragments per tile
#pragma unroll 1
    for (int64_t rep = 0; rep < reps; ++rep) {
    const int mode = p.seq_reps == 0 ? kPartOwn
                     : reps == 1      ? kSumOnly
                     : rep == 0       ? kSumFirst
                     : rep == reps - 1 ? kSumLast
                                       : kSumAdd;
    const int64_t b = rep * groups + grp;
    const BatchIdx bi = batch_index(p, b);
    __syncwarp();   // the previous sequence's dQ staging in sQ is read by every lane

    if (nq > 0) {
        load_tile<T, 16, D, 32>(sQ, (const T*)p.q.ptr + boff(p.q, bi) + (int64_t)q0 * p.q.rstride,
                                p.q.rstride, nq, vec, lane);
        load_tile<T, 16, D, 32>(sdO,
                                (const T*)p.dout.ptr + boff(p.dout, bi) + (int64_t)q0 * p.dout.rstride,
                                p.dout.rstride, nq, vec, lane);
    }
    cp_async_commit();
    float lse[2];   // rows g, g+8; padded rows +inf: their P is exactly 0
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = g + 8 * h;
        lse[h] = r < nq ? p.lse[b * p.Lq + q0 + r] * kLog2e : INFINITY;
    }
    auto load_kv = [&](int j) {
        __syncwarp();   // every lane is done with the previous tile
        const KeyTile kt = key_tile<T>(p, seg, j, 16, bi);
        load_tile2<T, 16, D, 32>(sK, (const T*)kt.k, p.k.rstride, kt.nk, (const T*)kt.pk,
                                 kt.np > 0 ? p.pk[seg].rstride : 0, kt.np, vec, lane);
        load_tile2<T, 16, D, 32>(sV, (const T*)kt.v, p.v.rstride, kt.nk, (const T*)kt.pv,
                                 kt.np > 0 ? p.pv[seg].rstride : 0, kt.np, vec, lane);
        cp_async_commit();
        cp_async_wait<0>();
        __syncwarp();
    };
    uint32_t qf[kKeepQ ? D / 16 : 1][4], df[kKeepQ ? D / 16 : 1][4];
    uint32_t fa[D / 16][4];   // a transient A operand
    // S = Q K^T and dP = dO V^T of the current tile, query rows; P in s, dP in dp
    auto row_products = [&](float (&s)[2][4], float (&dp)[2][4], int nk) {
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[n][i] = dp[n][i] = 0.f;
        if constexpr (kKeepQ) {
            mma_abt<T, 16, D>(s, qf, sK, LD);
            mma_abt<T, 16, D>(dp, df, sV, LD);
        } else {
            load_a_frags<T, D>(fa, sQ, LD);
            mma_abt<T, 16, D>(s, fa, sK, LD);
            load_a_frags<T, D>(fa, sdO, LD);
            mma_abt<T, 16, D>(dp, fa, sV, LD);
        }
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = n * 8 + 2 * tq + (i & 1);
                s[n][i] = c < nk ? exp2f(s[n][i] * sl2 - lse[i >> 1]) : 0.f;
            }
    };

    float dq[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.f;
    if (nq > 0) {
        cp_async_wait<0>();
        __syncwarp();
        if constexpr (kKeepQ) {
            load_a_frags<T, D>(qf, sQ, LD);
            load_a_frags<T, D>(df, sdO, LD);
        }
        // pass 1: delta = rowsum(P o dP) over every key tile
        float dsum[2] = {0.f, 0.f};
#pragma unroll 1
        for (int j = 0; j < ntiles; ++j) {
            load_kv(j);
            const KeyTile kt = key_tile<T>(p, seg, j, 16, bi);
            float s[2][4], dp[2][4];
            row_products(s, dp, kt.nk + kt.np);
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) dsum[i >> 1] += s[n][i] * dp[n][i];
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            dsum[h] += __shfl_xor_sync(0xffffffffu, dsum[h], 1);
            dsum[h] += __shfl_xor_sync(0xffffffffu, dsum[h], 2);
        }
        if (tq == 0) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                sLse[g + 8 * h] = lse[h];
                sDelta[g + 8 * h] = dsum[h];
            }
        }
        __syncwarp();
        // pass 2: dQ (registers) and each tile's dK, dV
#pragma unroll 1
        for (int j = 0; j < ntiles; ++j) {
            if (ntiles > 1) load_kv(j);   // one tile: still in shared memory from pass 1
            const KeyTile kt = key_tile<T>(p, seg, j, 16, bi);
            {
                float s[2][4], dp[2][4];
                row_products(s, dp, kt.nk + kt.np);
#pragma unroll
                for (int n = 0; n < 2; ++n)
#pragma unroll
                    for (int i = 0; i < 4; ++i) s[n][i] *= dp[n][i] - dsum[i >> 1];   // dS
                mma_pv<T, D, 16>(dq, s, sK, LD);                  // dQ += dS K
            }
            float pt[2][4], dst[2][4];                           // keys x queries
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) pt[n][i] = dst[n][i] = 0.f;
            load_a_frags<T, D>(fa, sK, LD);
            mma_abt<T, 16, D>(pt, fa, sQ, LD);                    // S^T = K Q^T
            load_a_frags<T, D>(fa, sV, LD);
            mma_abt<T, 16, D>(dst, fa, sdO, LD);                  // dP^T = V dO^T
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int c = n * 8 + 2 * tq + (i & 1);       // query
                    const float pr = exp2f(pt[n][i] * sl2 - sLse[c]);
                    pt[n][i] = pr;
                    dst[n][i] = pr * (dst[n][i] - sDelta[c]);
                }
            float acc[D / 8][4];
#pragma unroll
            for (int half = 0; half < 2; ++half) {   // 0: dV = P^T dO, 1: dK = dS^T Q
#pragma unroll
                for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
                if (half == 0)
                    mma_pv<T, D, 16>(acc, pt, sdO, LD);
                else
                    mma_pv<T, D, 16>(acc, dst, sQ, LD);
                const float mul = half == 0 ? 1.f : p.scale;
                seq_bwd_store_tile<T, D>(p, seg, bi, kt, acc, mul, half == 0 ? sV : sK, half, v16,
                                         mode, b, grp);
            }
        }
    } else {
        // no queries: the segment's keys and prompts get zero gradients
        float acc[D / 8][4];
#pragma unroll
        for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
#pragma unroll 1
        for (int j = 0; j < ntiles; ++j) {
            const KeyTile kt = key_tile<T>(p, seg, j, 16, bi);
            seq_bwd_store_tile<T, D>(p, seg, bi, kt, acc, 1.f, sV, 0, v16, mode, b, grp);
            seq_bwd_store_tile<T, D>(p, seg, bi, kt, acc, 1.f, sK, 1, v16, mode, b, grp);
        }
    }
    cp_async_drain();   // nothing left in flight on any exit path
    if (nq > 0)
        warp_store_frags<T, D>((T*)p.dq.ptr + boff(p.dq, bi) + (int64_t)q0 * p.dq.rstride,
                               p.dq.rstride, sQ, LD, dq, p.scale, p.scale, nq, v16);
    }   // rep
    if (p.seq_reps == 0 && num_prompts(p, seg) > 0)    // one warp per sequence (b = grp): R
        prompt_rows_done<T, D, 32>(p, seg, batch_index(p, grp), lane, (int)prompt_reps(p, seg),
                                   reinterpret_cast<int*>(sdO));
}

// ================================================================== configurations
// Tiles per stage shape.  Every unit has 4 warps (64 query rows, or 64 key rows for dK/dV)
// or, for short sequences (every segment <= 16 queries: the temporal stage), PACK = 4
// one-warp units of 16 x 16 tiles in one CTA.  N: key rows per K/V stage (dK/dV: query
// rows per Q/dO stage), S: stages.  64-row configs: chosen per (dtype, head dim) for the
// most bytes in flight per H100/H200 SM under the 163 KiB limit (sm_80).  Packed configs
// have one stage: a short sequence's keys and prompts are usually one tile (temporal: 10 +
// 2) and it has one query tile, so there is nothing to prefetch; a smaller footprint
// fits more CTAs per SM instead, and the 4 independent warps of a CTA overlap one
// another's loads and math.  Occupancy and bytes in flight of each config are in
// bench/results/static-sm90-cuda.md (bench/static_sm90_cuda.py).
//
//   dtype      d  | fwd N S | dq N S | dkv M S | packed 4 x 16x16
//   fp16/bf16  32 |  64  3  |  32  3 |  32  3  |  S = 1
//   fp16/bf16  64 |  32  3  |  32  3 |  32  3  |  S = 1
//   fp16/bf16 128 |  32  2  |  16  3 |  16  3  |  S = 1
//   fp32       32 |  32  3  |  32  3 |  32  3  |  S = 1
//   fp32       64 |  32  3  |  32  2 |  16  3  |  S = 1
//   fp32      128 |  32  1  |  16  2 |  16  1  |  none (the 4 dQ units exceed 163 KiB)
template <typename T, int D> struct Config;
#define AVSTFP_CONFIG(T_, D_, FN, FS, QN, QS, KM, KS, PF, PQ, PK)                     \
    template <> struct Config<T_, D_> {                                                \
        static constexpr int FWD_N = FN, FWD_S = FS, DQ_N = QN, DQ_S = QS, DKV_M = KM, \
                             DKV_S = KS, PACK_FWD_S = PF, PACK_DQ_S = PQ,              \
                             PACK_DKV_S = PK;                                          \
    };
AVSTFP_CONFIG(__half, 32, 64, 3, 32, 3, 32, 3, 1, 1, 1)
AVSTFP_CONFIG(__half, 64, 32, 3, 32, 3, 32, 3, 1, 1, 1)
AVSTFP_CONFIG(__half, 128, 32, 2, 16, 3, 16, 3, 1, 1, 1)
AVSTFP_CONFIG(__nv_bfloat16, 32, 64, 3, 32, 3, 32, 3, 1, 1, 1)
AVSTFP_CONFIG(__nv_bfloat16, 64, 32, 3, 32, 3, 32, 3, 1, 1, 1)
AVSTFP_CONFIG(__nv_bfloat16, 128, 32, 2, 16, 3, 16, 3, 1, 1, 1)
AVSTFP_CONFIG(float, 32, 32, 3, 32, 3, 32, 3, 1, 1, 1)
AVSTFP_CONFIG(float, 64, 32, 3, 32, 2, 16, 3, 1, 1, 1)
AVSTFP_CONFIG(float, 128, 32, 1, 16, 2, 16, 1, 0, 0, 0)
#undef AVSTFP_CONFIG
constexpr int kRows = 64;   // query rows (fwd, dq) or key rows (dkv) of a 4-warp unit
constexpr int kPack = 4;    // one-warp units per CTA for short sequences

// ================================================================== host launchers
template <typename Kernel>
inline cudaError_t prepare(Kernel kern, size_t smem) {
    if (smem > 48 * 1024)
        return cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)smem);
    return cudaSuccess;
}

// Launch `kern` for `work` units of `ut` threads, PACK units per CTA.
template <typename Kernel>
inline cudaError_t launch_units(Kernel kern, int64_t work, int pack, int ut, size_t smem,
                                const AttnParams& p, cudaStream_t st) {
    if (work <= 0) return cudaSuccess;
    dim3 grid;
    if (!make_grid(work, pack, grid)) return cudaErrorInvalidConfiguration;
    cudaError_t e = prepare(kern, smem);
    if (e != cudaSuccess) return e;
    AVSTFP_LAUNCH(kern, grid, pack * ut, smem, st, p);
    (void)st;
    return cudaGetLastError();
}

template <typename T, int D, int BM, int BN, int S, int PACK>
cudaError_t launch_fwd_cfg(const AttnParams& p, cudaStream_t st) {
    using L = FwdSmem<T, D, BM, BN, S>;
    static_assert(PACK * L::bytes <= kMaxSmem, "forward config exceeds the shared memory limit");
    return launch_units(fwd_kernel<T, D, BM, BN, S, PACK>, (int64_t)num_q_tiles(p, BM) * p.nseq,
                        PACK, BM * 2, PACK * L::bytes, p, st);
}

template <typename T, int D, int BM, int BN, int S, int PACK>
cudaError_t launch_dq_cfg(const AttnParams& p, cudaStream_t st) {
    using L = DqSmem<T, D, BM, BN, S>;
    static_assert(PACK * L::bytes <= kMaxSmem, "dQ config exceeds the shared memory limit");
    return launch_units(dq_kernel<T, D, BM, BN, S, PACK>, (int64_t)num_q_tiles(p, BM) * p.nseq,
                        PACK, BM * 2, PACK * L::bytes, p, st);
}

template <typename T, int D, int BN, int BM, int S, int PACK>
cudaError_t launch_dkv_cfg(const AttnParams& p, cudaStream_t st) {
    using L = DkvSmem<T, D, BN, BM, S>;
    static_assert(PACK * L::bytes <= kMaxSmem, "dK/dV config exceeds the shared memory limit");
    return launch_units(dkv_kernel<T, D, BN, BM, S, PACK>,
                        (int64_t)num_key_tiles_all(p, BN) * p.nseq, PACK, BN * 2,
                        PACK * L::bytes, p, st);
}

// Packed configs exist for sequences <= 16 queries when Config has them (PACK_*_S > 0).
template <typename T, int D>
constexpr bool has_packed() { return Config<T, D>::PACK_FWD_S > 0; }

template <typename T, int D>
cudaError_t launch_fwd_d(const AttnParams& p, cudaStream_t st) {
    using C = Config<T, D>;
    if constexpr (has_packed<T, D>())
        if (p.short_tiles) return launch_fwd_cfg<T, D, 16, 16, (C::PACK_FWD_S > 0 ? C::PACK_FWD_S : 1), kPack>(p, st);
    return launch_fwd_cfg<T, D, kRows, C::FWD_N, C::FWD_S, 1>(p, st);
}

template <typename T, int D>
cudaError_t launch_bwd_d(const AttnParams& p, cudaStream_t st) {
    using C = Config<T, D>;
    if (p.nseq == 0) return cudaSuccess;
    if constexpr (!std::is_same<T, float>::value) {
        if (p.short_tiles) {   // one launch: seq_bwd_kernel computes delta itself
            using SL = SeqBwdSmem<T, D>;
            static_assert(kPack * SL::bytes <= kMaxSmem, "short backward exceeds shared memory");
            const int64_t groups = p.nseq / (p.seq_reps > 0 ? p.seq_reps : 1);
            return launch_units(seq_bwd_kernel<T, D, kPack>, groups * p.nseg, kPack, 32,
                                kPack * SL::bytes, p, st);
        }
    }
    // dQ (which also writes delta = rowsum(dO o O) of its query tile), then dK/dV, which
    // reads delta: two launches in stream order
    if (p.delta == nullptr && p.Lq > 0) return cudaErrorInvalidValue;   // scratch too small
    cudaError_t e;
    if constexpr (has_packed<T, D>() && std::is_same<T, float>::value) {
        if (p.short_tiles) {
            e = launch_dq_cfg<T, D, 16, 16, (C::PACK_DQ_S > 0 ? C::PACK_DQ_S : 1), kPack>(p, st);
            if (e != cudaSuccess) return e;
            return launch_dkv_cfg<T, D, 16, 16, (C::PACK_DKV_S > 0 ? C::PACK_DKV_S : 1), kPack>(p, st);
        }
    }
    e = launch_dq_cfg<T, D, kRows, C::DQ_N, C::DQ_S, 1>(p, st);
    if (e != cudaSuccess) return e;
    return launch_dkv_cfg<T, D, kRows, C::DKV_M, C::DKV_S, 1>(p, st);
}

template <typename T>
cudaError_t launch_fwd_t(const AttnParams& p, cudaStream_t st) {
    switch (p.head_dim) {
        case 32: return launch_fwd_d<T, 32>(p, st);
        case 64: return launch_fwd_d<T, 64>(p, st);
        case 128: return launch_fwd_d<T, 128>(p, st);
        default: return cudaErrorInvalidValue;
    }
}

template <typename T>
cudaError_t launch_bwd_t(const AttnParams& p, cudaStream_t st) {
    switch (p.head_dim) {
        case 32: return launch_bwd_d<T, 32>(p, st);
        case 64: return launch_bwd_d<T, 64>(p, st);
        case 128: return launch_bwd_d<T, 128>(p, st);
        default: return cudaErrorInvalidValue;
    }
}

// Dynamic shared memory of the largest kernel a (dtype, head dim, short) launch uses.
template <typename T, int D>
size_t max_smem_d(bool short_tiles) {
    using C = Config<T, D>;
    size_t a, b, c;
    if (short_tiles && has_packed<T, D>()) {
        a = kPack * FwdSmem<T, D, 16, 16, (C::PACK_FWD_S > 0 ? C::PACK_FWD_S : 1)>::bytes;
        b = kPack * DqSmem<T, D, 16, 16, (C::PACK_DQ_S > 0 ? C::PACK_DQ_S : 1)>::bytes;
        c = kPack * DkvSmem<T, D, 16, 16, (C::PACK_DKV_S > 0 ? C::PACK_DKV_S : 1)>::bytes;
        if (!std::is_same<T, float>::value) b = c = kPack * SeqBwdSmem<T, D>::bytes;
    } else {
        a = FwdSmem<T, D, kRows, C::FWD_N, C::FWD_S>::bytes;
        b = DqSmem<T, D, kRows, C::DQ_N, C::DQ_S>::bytes;
        c = DkvSmem<T, D, kRows, C::DKV_M, C::DKV_S>::bytes;
    }
    return a > b ? (a > c ? a : c) : (b > c ? b : c);
}

// ------------------------------------------------------------------ configuration table
// Every kernel instance the launchers can start, for tools (bench/static_sm90_cuda.py reads
// it through the CPU emulation and joins it with ptxas/SASS data by kernel name).
struct KernelInfo {
    char name[96];        // as demangled: "fwd_kernel<__half, 64, 64, 32, 3, 1>"
    int threads;          // per CTA
    size_t smem;          // dynamic shared memory per CTA (bytes)
    int stages;           // K/V (or Q/dO) tile buffers
    size_t stage_bytes;   // bytes of global memory one stage copies, per CTA
    int loads_tiles;      // 1: loops over K/V (or Q/dO) tiles
    int pack;             // units (sequences/tiles) per CTA
    size_t score_smem;    // bytes per CTA of fp32 score-shaped tiles (S, dP) in shared memory
    size_t acc_smem;      // bytes per CTA of fp32 accumulators (O, dQ, dK, dV) in shared memory
};

template <typename T> constexpr const char* type_name();
template <> constexpr const char* type_name<__half>() { return "__half"; }
template <> constexpr const char* type_name<__nv_bfloat16>() { return "__nv_bfloat16"; }
template <> constexpr const char* type_name<float>() { return "float"; }

template <class F>
void info(F&& f, const char* kern, const char* tn, int d, int a, int b, int s, int pack,
          size_t unit_smem, int stage_rows, size_t unit_score, size_t unit_acc) {
    KernelInfo k{};
    std::snprintf(k.name, sizeof k.name, "%s<%s, %d, %d, %d, %d, %d>", kern, tn, d, a, b, s,
                  pack);
    k.threads = pack * a * 2;
    k.smem = pack * unit_smem;
    k.stages = s;
    k.stage_bytes = (size_t)pack * 2 * stage_rows * d *
                    (std::strcmp(tn, "float") == 0 ? 4 : 2);
    k.loads_tiles = 1;
    k.pack = pack;
    k.score_smem = pack * unit_score;
    k.acc_smem = pack * unit_acc;
    f(k);
}

template <typename T, int D, int BM, int FN, int FS, int QN, int QS, int KM, int KS, int PACK,
          class F>
void kernel_infos_set(F&& f) {
    const char* tn = type_name<T>();
    // fp32 score tiles: forward S (fp32 writes P over it), dQ S and dP, dK/dV S^T and dP^T
    using LF = FwdSmem<T, D, BM, FN, FS>;
    using LQ = DqSmem<T, D, BM, QN, QS>;
    using LK = DkvSmem<T, D, BM, KM, KS>;
    info(f, "fwd_kernel", tn, D, BM, FN, FS, PACK, LF::bytes, FN, LF::score_bytes,
         LF::acc_bytes);
    // packed 16-bit backward: seq_bwd_kernel instead of dq/dkv (not instantiated)
    if (PACK > 1 && !std::is_same<T, float>::value) return;
    info(f, "dq_kernel", tn, D, BM, QN, QS, PACK, LQ::bytes, QN, LQ::score_bytes,
         LQ::acc_bytes);
    info(f, "dkv_kernel", tn, D, BM, KM, KS, PACK, LK::bytes, KM, LK::score_bytes,
         LK::acc_bytes);
}

template <typename T, int D, class F>
void kernel_infos_d(F&& f) {
    using C = Config<T, D>;
    if constexpr (has_packed<T, D>())
        kernel_infos_set<T, D, 16, 16, C::PACK_FWD_S, 16, C::PACK_DQ_S, 16, C::PACK_DKV_S,
                         kPack>(f);
    kernel_infos_set<T, D, kRows, C::FWD_N, C::FWD_S, C::DQ_N, C::DQ_S, C::DKV_M, C::DKV_S, 1>(f);
    if constexpr (!std::is_same<T, float>::value) {   // the short-sequence backward
        KernelInfo s{};
        std::snprintf(s.name, sizeof s.name, "seq_bwd_kernel<%s, %d, %d>", type_name<T>(), D,
                      kPack);
        s.threads = kPack * 32;
        s.smem = kPack * SeqBwdSmem<T, D>::bytes;
        s.stages = 1;
        s.stage_bytes = (size_t)kPack * 2 * 16 * D * sizeof(T);   // one K and V tile per warp
        s.loads_tiles = 1;
        s.pack = kPack;
        f(s);
    }
}

template <class F>
void kernel_infos(F&& f) {
    kernel_infos_d<__half, 32>(f); kernel_infos_d<__half, 64>(f); kernel_infos_d<__half, 128>(f);
    kernel_infos_d<__nv_bfloat16, 32>(f); kernel_infos_d<__nv_bfloat16, 64>(f);
    kernel_infos_d<__nv_bfloat16, 128>(f);
    kernel_infos_d<float, 32>(f); kernel_infos_d<float, 64>(f); kernel_infos_d<float, 128>(f);
}

}  // namespace detail
}  // namespace avstfp

// The entry points of attn_params.h for one dtype: csrc/attn_{f16,bf16,f32}.cu each expand
// this once (one translation unit per dtype, compiled in parallel).
#define AVSTFP_DTYPE_ENTRY_POINTS(SUFFIX, T)                                                 \
    namespace avstfp {                                                                      \
    cudaError_t launch_forward_##SUFFIX(const AttnParams& p, cudaStream_t stream) {         \
        return detail::launch_fwd_t<T>(p, stream);                                          \
    }                                                                                       \
    cudaError_t launch_backward_##SUFFIX(const AttnParams& p, cudaStream_t stream) {        \
        return detail::launch_bwd_t<T>(p, stream);                                          \
    }                                                                                       \
    }
