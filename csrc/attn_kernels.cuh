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
#include <mma.h>
// Kernel launch; the CPU emulation used by the tests (cpu_emulation.h) redefines it.
#define AVSTFP_LAUNCH(kern, grid, block, smem, stream, p) kern<<<grid, block, smem, stream>>>(p)
#endif

#include "attn_params.h"

namespace avstfp {
namespace detail {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxSmem = 101376;   // 99 KiB: the opt-in limit of sm_86/sm_89 (sm_80: 163 KiB)

__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }
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
// (fewer bank conflicts; keeps every 16-row/16-column WMMA sub-tile 32-byte aligned).
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

// ------------------------------------------------------------------ global -> shared
// Copy `nvalid` rows (row stride `rstride` elements, last dim dense) into a shared tile of
// ROWS x D with pitch pitch<T>(D); rows >= nvalid are zero-filled.  All threads of the CTA.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t rstride, int nvalid,
                                          bool vec16) {
    constexpr int LD = pitch<T>(D);
    if (vec16) {
        constexpr int CH = D * int(sizeof(T)) / 16;   // 16-byte chunks per row
        for (int i = threadIdx.x; i < ROWS * CH; i += blockDim.x) {
            const int r = i / CH, c = i % CH;
            uint4 val = make_uint4(0u, 0u, 0u, 0u);
            if (r < nvalid) val = reinterpret_cast<const uint4*>(g + (int64_t)r * rstride)[c];
            reinterpret_cast<uint4*>(s + r * LD)[c] = val;
        }
    } else {
        for (int i = threadIdx.x; i < ROWS * D; i += blockDim.x) {
            const int r = i / D, c = i % D;
            T val = from_f<T>(0.f);
            if (r < nvalid) val = g[(int64_t)r * rstride + c];
            s[r * LD + c] = val;
        }
    }
}

// ------------------------------------------------------------------ warp matrix product
// C[16][N] (float, pitch ldc) = (accumulate ? C : 0) + A[16][K] * B, one warp.
// A: row-major T (pitch lda).  B_COL=false: B is K x N row-major (pitch ldb);
// B_COL=true: B is stored transposed, as N rows of K (i.e. the product is A * B_stored^T).
// fp16/bf16: tensor cores through WMMA 16x16x16 with float accumulation; fp32: plain FMA.
template <typename T, int N, int K, bool B_COL>
__device__ __forceinline__ void warp_mm(const T* A, int lda, const T* B, int ldb, float* C,
                                        int ldc, bool accumulate) {
    static_assert(N % 16 == 0 && K % 16 == 0, "tile sizes are multiples of 16");
    __syncwarp();
    if constexpr (std::is_same<T, float>::value) {
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
    } else {
        namespace wmma = nvcuda::wmma;
        using BLayout = typename std::conditional<B_COL, wmma::col_major, wmma::row_major>::type;
#pragma unroll
        for (int nt = 0; nt < N / 16; ++nt) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            if (accumulate)
                wmma::load_matrix_sync(acc, C + nt * 16, ldc, wmma::mem_row_major);
            else
                wmma::fill_fragment(acc, 0.f);
#pragma unroll
            for (int kt = 0; kt < K / 16; ++kt) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b;
                wmma::load_matrix_sync(a, A + kt * 16, lda);
                const T* bp = B_COL ? B + nt * 16 * ldb + kt * 16 : B + kt * 16 * ldb + nt * 16;
                wmma::load_matrix_sync(b, bp, ldb);
                wmma::mma_sync(acc, a, b, acc);
            }
            wmma::store_matrix_sync(C + nt * 16, acc, ldc, wmma::mem_row_major);
        }
    }
    __syncwarp();
}

// ------------------------------------------------------------------ tile bookkeeping
// Query tiles of BM rows, segment by segment (forward and dQ grids).
__device__ __forceinline__ bool decode_q_tile(const AttnParams& p, int BM, int& seg, int& q0,
                                              int& nq) {
    int t = blockIdx.y;
    for (int s = 0; s < p.nseg; ++s) {
        const int n = cdiv(p.q_len[s], BM);
        if (t < n) {
            seg = s;
            q0 = p.q_start[s] + t * BM;
            nq = min(BM, p.q_start[s] + p.q_len[s] - q0);
            return true;
        }
        t -= n;
    }
    return false;
}

__host__ inline int num_q_tiles(const AttnParams& p, int BM) {
    int n = 0;
    for (int s = 0; s < p.nseg; ++s) n += cdiv(p.q_len[s], BM);
    return n;
}

__device__ __forceinline__ bool has_prompts(const AttnParams& p, int s) {
    return p.pk[s].ptr != nullptr && p.n_prompt[s] > 0;
}

// Key tiles of segment s: first ceil(k_len/BN) tiles of k/v, then ceil(P/BN) of the prompts.
__host__ __device__ inline int num_key_tiles(const AttnParams& p, int s, int BN) {
    const int np = (p.pk[s].ptr != nullptr && p.n_prompt[s] > 0) ? cdiv(p.n_prompt[s], BN) : 0;
    return cdiv(p.k_len[s], BN) + np;
}

struct KeyTile {
    const void* k;      // first row of the tile (k or prompt_k)
    const void* v;
    int64_t rk, rv;     // row strides
    int nk;             // valid rows
    bool prompt;
    int row0;           // first row index within its source (k: absolute in Lk; prompt: 0..P)
};

template <typename T>
__device__ __forceinline__ KeyTile key_tile(const AttnParams& p, int s, int j, int BN,
                                            const BatchIdx& bi) {
    KeyTile t;
    const int nkb = cdiv(p.k_len[s], BN);
    if (j < nkb) {
        const int k0 = p.k_start[s] + j * BN;
        t.nk = min(BN, p.k_start[s] + p.k_len[s] - k0);
        t.rk = p.k.rstride;
        t.rv = p.v.rstride;
        t.k = (const T*)p.k.ptr + boff(p.k, bi) + (int64_t)k0 * t.rk;
        t.v = (const T*)p.v.ptr + boff(p.v, bi) + (int64_t)k0 * t.rv;
        t.prompt = false;
        t.row0 = k0;
    } else {
        const int k0 = (j - nkb) * BN;
        t.nk = min(BN, p.n_prompt[s] - k0);
        t.rk = p.pk[s].rstride;
        t.rv = p.pv[s].rstride;
        t.k = (const T*)p.pk[s].ptr + boff(p.pk[s], bi) + (int64_t)k0 * t.rk;
        t.v = (const T*)p.pv[s].ptr + boff(p.pv[s], bi) + (int64_t)k0 * t.rv;
        t.prompt = true;
        t.row0 = k0;
    }
    return t;
}

// ================================================================== forward
template <typename T, int D, int BM, int BN>
struct FwdSmem {
    static constexpr int LDT = pitch<T>(D), LDS = pitch<float>(BN), LDP = pitch<T>(BN),
                         LDO = pitch<float>(D);
    static constexpr size_t q = 0;
    static constexpr size_t k = q + align128(sizeof(T) * BM * LDT);
    static constexpr size_t v = k + align128(sizeof(T) * BN * LDT);
    static constexpr size_t s = v + align128(sizeof(T) * BN * LDT);
    static constexpr size_t pm = s + align128(sizeof(float) * BM * LDS);
    static constexpr size_t o = pm + align128(sizeof(T) * BM * LDP);
    static constexpr size_t stat = o + align128(sizeof(float) * BM * LDO);
    static constexpr size_t bytes = stat + align128(sizeof(float) * 2 * BM);
    static_assert(bytes <= kMaxSmem, "forward tile config exceeds 99 KiB of shared memory");
};

template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BM * 2)
fwd_kernel(const __grid_constant__ AttnParams p) {
    using L = FwdSmem<T, D, BM, BN>;
    extern __shared__ __align__(128) unsigned char smem[];
    T* sQ = reinterpret_cast<T*>(smem + L::q);
    T* sK = reinterpret_cast<T*>(smem + L::k);
    T* sV = reinterpret_cast<T*>(smem + L::v);
    float* sS = reinterpret_cast<float*>(smem + L::s);
    T* sP = reinterpret_cast<T*>(smem + L::pm);
    float* sO = reinterpret_cast<float*>(smem + L::o);
    float* sM = reinterpret_cast<float*>(smem + L::stat);   // running max (log2 units)
    float* sL = sM + BM;                                      // running sum

    int seg, q0, nq;
    if (!decode_q_tile(p, BM, seg, q0, nq)) return;
    const int64_t b = blockIdx.x;
    const BatchIdx bi = batch_index(p, b);
    const bool vec = p.vec16 != 0;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float sl2 = p.scale * kLog2e;

    load_tile<T, BM, D>(sQ, (const T*)p.q.ptr + boff(p.q, bi) + (int64_t)q0 * p.q.rstride,
                        p.q.rstride, nq, vec);
    for (int i = threadIdx.x; i < BM * L::LDO; i += blockDim.x) sO[i] = 0.f;
    for (int i = threadIdx.x; i < BM; i += blockDim.x) {
        sM[i] = -INFINITY;
        sL[i] = 0.f;
    }

    // this warp's 16 query rows
    const T* Qw = sQ + warp * 16 * L::LDT;
    float* Sw = sS + warp * 16 * L::LDS;
    T* Pw = sP + warp * 16 * L::LDP;
    float* Ow = sO + warp * 16 * L::LDO;

    const int ntiles = num_key_tiles(p, seg, BN);
    for (int j = 0; j < ntiles; ++j) {
        const KeyTile kt = key_tile<T>(p, seg, j, BN, bi);
        __syncthreads();   // previous K/V tile consumed; Q, O, stats initialised
        load_tile<T, BN, D>(sK, (const T*)kt.k, kt.rk, kt.nk, vec);
        load_tile<T, BN, D>(sV, (const T*)kt.v, kt.rv, kt.nk, vec);
        __syncthreads();

        warp_mm<T, BN, D, true>(Qw, L::LDT, sK, L::LDT, Sw, L::LDS, false);   // S = Q K^T

        {   // online softmax: lanes 2r and 2r+1 own row r (even / odd columns)
            const int r = lane >> 1, h = lane & 1;
            const int row = warp * 16 + r;
            const float* Sr = Sw + r * L::LDS;
            T* Pr = Pw + r * L::LDP;
            float* Or = Ow + r * L::LDO;
            float mx = -INFINITY;
            for (int c = h; c < kt.nk; c += 2) mx = fmaxf(mx, Sr[c] * sl2);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            const float m_old = sM[row];
            const float m_new = fmaxf(m_old, mx);          // finite: the tile has a key
            float sum = 0.f;
            for (int c = h; c < BN; c += 2) {
                const float e = c < kt.nk ? exp2f(Sr[c] * sl2 - m_new) : 0.f;
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
    __syncthreads();

    T* go = (T*)p.o.ptr + boff(p.o, bi) + (int64_t)q0 * p.o.rstride;
    for (int i = threadIdx.x; i < nq * D; i += blockDim.x) {
        const int r = i / D, c = i % D;
        go[(int64_t)r * p.o.rstride + c] = from_f<T>(sO[r * L::LDO + c] / sL[r]);
    }
    for (int r = threadIdx.x; r < nq; r += blockDim.x)
        p.lse[b * p.Lq + q0 + r] = (sM[r] + log2f(sL[r])) * kLn2;
}

// ================================================================== backward: delta
// delta[b, r] = sum_c dout[b, r, c] * o[b, r, c]  (float32), one warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(256) delta_kernel(const __grid_constant__ AttnParams p) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= p.nseq * p.Lq) return;
    const int lane = threadIdx.x & 31;
    const int64_t b = row / p.Lq;
    const int r = (int)(row % p.Lq);
    const BatchIdx bi = batch_index(p, b);
    const T* o = (const T*)p.o.ptr + boff(p.o, bi) + (int64_t)r * p.o.rstride;
    const T* d = (const T*)p.dout.ptr + boff(p.dout, bi) + (int64_t)r * p.dout.rstride;
    float acc = 0.f;
    for (int c = lane; c < D; c += 32) acc += to_f(o[c]) * to_f(d[c]);
    acc = warp_sum(acc);
    if (lane == 0) p.delta[row] = acc;
}

// ================================================================== backward: dQ
template <typename T, int D, int BM, int BN>
struct DqSmem {
    static constexpr int LDT = pitch<T>(D), LDS = pitch<float>(BN), LDP = pitch<T>(BN),
                         LDA = pitch<float>(D);
    static constexpr size_t q = 0;
    static constexpr size_t dout = q + align128(sizeof(T) * BM * LDT);
    static constexpr size_t k = dout + align128(sizeof(T) * BM * LDT);
    static constexpr size_t v = k + align128(sizeof(T) * BN * LDT);
    static constexpr size_t s = v + align128(sizeof(T) * BN * LDT);
    static constexpr size_t dp = s + align128(sizeof(float) * BM * LDS);
    static constexpr size_t ds = dp + align128(sizeof(float) * BM * LDS);
    static constexpr size_t dq = ds + align128(sizeof(T) * BM * LDP);
    static constexpr size_t stat = dq + align128(sizeof(float) * BM * LDA);
    static constexpr size_t bytes = stat + align128(sizeof(float) * 2 * BM);
    static_assert(bytes <= kMaxSmem, "dQ tile config exceeds 99 KiB of shared memory");
};

template <typename T, int D, int BM, int BN>
__global__ void __launch_bounds__(BM * 2)
dq_kernel(const __grid_constant__ AttnParams p) {
    using L = DqSmem<T, D, BM, BN>;
    extern __shared__ __align__(128) unsigned char smem[];
    T* sQ = reinterpret_cast<T*>(smem + L::q);
    T* sdO = reinterpret_cast<T*>(smem + L::dout);
    T* sK = reinterpret_cast<T*>(smem + L::k);
    T* sV = reinterpret_cast<T*>(smem + L::v);
    float* sS = reinterpret_cast<float*>(smem + L::s);
    float* sdP = reinterpret_cast<float*>(smem + L::dp);
    T* sdS = reinterpret_cast<T*>(smem + L::ds);
    float* sdQ = reinterpret_cast<float*>(smem + L::dq);
    float* sLse = reinterpret_cast<float*>(smem + L::stat);   // log2 units
    float* sDelta = sLse + BM;

    int seg, q0, nq;
    if (!decode_q_tile(p, BM, seg, q0, nq)) return;
    const int64_t b = blockIdx.x;
    const BatchIdx bi = batch_index(p, b);
    const bool vec = p.vec16 != 0;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float sl2 = p.scale * kLog2e;

    load_tile<T, BM, D>(sQ, (const T*)p.q.ptr + boff(p.q, bi) + (int64_t)q0 * p.q.rstride,
                        p.q.rstride, nq, vec);
    load_tile<T, BM, D>(sdO,
                        (const T*)p.dout.ptr + boff(p.dout, bi) + (int64_t)q0 * p.dout.rstride,
                        p.dout.rstride, nq, vec);
    for (int i = threadIdx.x; i < BM * L::LDA; i += blockDim.x) sdQ[i] = 0.f;
    for (int r = threadIdx.x; r < BM; r += blockDim.x) {
        sLse[r] = r < nq ? p.lse[b * p.Lq + q0 + r] * kLog2e : 0.f;
        sDelta[r] = r < nq ? p.delta[b * p.Lq + q0 + r] : 0.f;
    }

    const T* Qw = sQ + warp * 16 * L::LDT;
    const T* dOw = sdO + warp * 16 * L::LDT;
    float* Sw = sS + warp * 16 * L::LDS;
    float* dPw = sdP + warp * 16 * L::LDS;
    T* dSw = sdS + warp * 16 * L::LDP;
    float* dQw = sdQ + warp * 16 * L::LDA;

    const int ntiles = num_key_tiles(p, seg, BN);
    for (int j = 0; j < ntiles; ++j) {
        const KeyTile kt = key_tile<T>(p, seg, j, BN, bi);
        __syncthreads();
        load_tile<T, BN, D>(sK, (const T*)kt.k, kt.rk, kt.nk, vec);
        load_tile<T, BN, D>(sV, (const T*)kt.v, kt.rv, kt.nk, vec);
        __syncthreads();

        warp_mm<T, BN, D, true>(Qw, L::LDT, sK, L::LDT, Sw, L::LDS, false);    // S = Q K^T
        warp_mm<T, BN, D, true>(dOw, L::LDT, sV, L::LDT, dPw, L::LDS, false);  // dP = dO V^T
        for (int i = lane; i < 16 * BN; i += 32) {
            const int r = i / BN, c = i % BN;
            const int row = warp * 16 + r;
            const float pr = c < kt.nk ? exp2f(Sw[r * L::LDS + c] * sl2 - sLse[row]) : 0.f;
            dSw[r * L::LDP + c] = from_f<T>(pr * (dPw[r * L::LDS + c] - sDelta[row]));
        }
        warp_mm<T, D, BN, false>(dSw, L::LDP, sK, L::LDT, dQw, L::LDA, true);  // dQ += dS K
    }
    __syncthreads();

    T* g = (T*)p.dq.ptr + boff(p.dq, bi) + (int64_t)q0 * p.dq.rstride;
    for (int i = threadIdx.x; i < nq * D; i += blockDim.x) {
        const int r = i / D, c = i % D;
        g[(int64_t)r * p.dq.rstride + c] = from_f<T>(sdQ[r * L::LDA + c] * p.scale);
    }
}

// ================================================================== backward: dK, dV
// BN key rows per CTA (one warp per 16 keys), looping over query tiles of BM rows.
template <typename T, int D, int BN, int BM>
struct DkvSmem {
    static constexpr int LDT = pitch<T>(D), LDS = pitch<float>(BM), LDP = pitch<T>(BM),
                         LDA = pitch<float>(D);
    static constexpr size_t k = 0;
    static constexpr size_t v = k + align128(sizeof(T) * BN * LDT);
    static constexpr size_t q = v + align128(sizeof(T) * BN * LDT);
    static constexpr size_t dout = q + align128(sizeof(T) * BM * LDT);
    static constexpr size_t s = dout + align128(sizeof(T) * BM * LDT);
    static constexpr size_t dp = s + align128(sizeof(float) * BN * LDS);
    static constexpr size_t pm = dp + align128(sizeof(float) * BN * LDS);
    static constexpr size_t ds = pm + align128(sizeof(T) * BN * LDP);
    static constexpr size_t dk = ds + align128(sizeof(T) * BN * LDP);
    static constexpr size_t dv = dk + align128(sizeof(float) * BN * LDA);
    static constexpr size_t stat = dv + align128(sizeof(float) * BN * LDA);
    static constexpr size_t bytes = stat + align128(sizeof(float) * 2 * BM);
    static_assert(bytes <= kMaxSmem, "dK/dV tile config exceeds 99 KiB of shared memory");
};

template <typename T, int D, int BN, int BM>
__global__ void __launch_bounds__(BN * 2)
dkv_kernel(const __grid_constant__ AttnParams p) {
    using L = DkvSmem<T, D, BN, BM>;
    extern __shared__ __align__(128) unsigned char smem[];
    T* sK = reinterpret_cast<T*>(smem + L::k);
    T* sV = reinterpret_cast<T*>(smem + L::v);
    T* sQ = reinterpret_cast<T*>(smem + L::q);
    T* sdO = reinterpret_cast<T*>(smem + L::dout);
    float* sS = reinterpret_cast<float*>(smem + L::s);     // S^T: keys x queries
    float* sdP = reinterpret_cast<float*>(smem + L::dp);   // dP^T
    T* sP = reinterpret_cast<T*>(smem + L::pm);            // P^T
    T* sdS = reinterpret_cast<T*>(smem + L::ds);           // dS^T
    float* sdK = reinterpret_cast<float*>(smem + L::dk);
    float* sdV = reinterpret_cast<float*>(smem + L::dv);
    float* sLse = reinterpret_cast<float*>(smem + L::stat);   // per query, log2 units
    float* sDelta = sLse + BM;

    // decode (segment, key tile) from blockIdx.y
    int seg = -1, j = 0;
    {
        int t = blockIdx.y;
        for (int s = 0; s < p.nseg; ++s) {
            const int n = num_key_tiles(p, s, BN);
            if (t < n) { seg = s; j = t; break; }
            t -= n;
        }
    }
    if (seg < 0) return;
    const int64_t b = blockIdx.x;
    const BatchIdx bi = batch_index(p, b);
    const bool vec = p.vec16 != 0;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float sl2 = p.scale * kLog2e;
    const KeyTile kt = key_tile<T>(p, seg, j, BN, bi);

    load_tile<T, BN, D>(sK, (const T*)kt.k, kt.rk, kt.nk, vec);
    load_tile<T, BN, D>(sV, (const T*)kt.v, kt.rv, kt.nk, vec);
    for (int i = threadIdx.x; i < BN * L::LDA; i += blockDim.x) {
        sdK[i] = 0.f;
        sdV[i] = 0.f;
    }

    const T* Kw = sK + warp * 16 * L::LDT;
    const T* Vw = sV + warp * 16 * L::LDT;
    float* Sw = sS + warp * 16 * L::LDS;
    float* dPw = sdP + warp * 16 * L::LDS;
    T* Pw = sP + warp * 16 * L::LDP;
    T* dSw = sdS + warp * 16 * L::LDP;
    float* dKw = sdK + warp * 16 * L::LDA;
    float* dVw = sdV + warp * 16 * L::LDA;

    const int nqt = cdiv(p.q_len[seg], BM);
    for (int i = 0; i < nqt; ++i) {
        const int q0 = p.q_start[seg] + i * BM;
        const int nq = min(BM, p.q_start[seg] + p.q_len[seg] - q0);
        __syncthreads();   // previous Q/dO tile consumed; K, V, dK, dV initialised
        load_tile<T, BM, D>(sQ, (const T*)p.q.ptr + boff(p.q, bi) + (int64_t)q0 * p.q.rstride,
                            p.q.rstride, nq, vec);
        load_tile<T, BM, D>(sdO,
                            (const T*)p.dout.ptr + boff(p.dout, bi) +
                                (int64_t)q0 * p.dout.rstride,
                            p.dout.rstride, nq, vec);
        for (int r = threadIdx.x; r < BM; r += blockDim.x) {
            // padded queries: lse = +inf makes their probabilities exactly 0
            sLse[r] = r < nq ? p.lse[b * p.Lq + q0 + r] * kLog2e : INFINITY;
            sDelta[r] = r < nq ? p.delta[b * p.Lq + q0 + r] : 0.f;
        }
        __syncthreads();

        warp_mm<T, BM, D, true>(Kw, L::LDT, sQ, L::LDT, Sw, L::LDS, false);    // S^T = K Q^T
        warp_mm<T, BM, D, true>(Vw, L::LDT, sdO, L::LDT, dPw, L::LDS, false);  // dP^T = V dO^T
        for (int e = lane; e < 16 * BM; e += 32) {
            const int r = e / BM, c = e % BM;     // r: key (this warp), c: query
            const float pr = exp2f(Sw[r * L::LDS + c] * sl2 - sLse[c]);
            Pw[r * L::LDP + c] = from_f<T>(pr);
            dSw[r * L::LDP + c] = from_f<T>(pr * (dPw[r * L::LDS + c] - sDelta[c]));
        }
        warp_mm<T, D, BM, false>(Pw, L::LDP, sdO, L::LDT, dVw, L::LDA, true);  // dV += P^T dO
        warp_mm<T, D, BM, false>(dSw, L::LDP, sQ, L::LDT, dKw, L::LDA, true);  // dK += dS^T Q
    }
    __syncthreads();

    if (!kt.prompt) {
        T* gk = (T*)p.dk.ptr + boff(p.dk, bi) + (int64_t)kt.row0 * p.dk.rstride;
        T* gv = (T*)p.dv.ptr + boff(p.dv, bi) + (int64_t)kt.row0 * p.dv.rstride;
        for (int i = threadIdx.x; i < kt.nk * D; i += blockDim.x) {
            const int r = i / D, c = i % D;
            gk[(int64_t)r * p.dk.rstride + c] = from_f<T>(sdK[r * L::LDA + c] * p.scale);
            gv[(int64_t)r * p.dv.rstride + c] = from_f<T>(sdV[r * L::LDA + c]);
        }
    } else {
        // prompt gradients (float32): reduced over the batch either by atomics into the
        // un-broadcast buffer (broadcast strides 0), or stored per sequence (deterministic)
        // and summed afterwards by the caller.
        const Operand& ok = p.dpk[seg];
        const Operand& ov = p.dpv[seg];
        float* gk = (float*)ok.ptr + boff(ok, bi) + (int64_t)kt.row0 * ok.rstride;
        float* gv = (float*)ov.ptr + boff(ov, bi) + (int64_t)kt.row0 * ov.rstride;
        const bool atomic = p.atomic_prompt_grads != 0;
        for (int i = threadIdx.x; i < kt.nk * D; i += blockDim.x) {
            const int r = i / D, c = i % D;
            const float vk = sdK[r * L::LDA + c] * p.scale;
            const float vv = sdV[r * L::LDA + c];
            float* ak = gk + (int64_t)r * ok.rstride + c;
            float* av = gv + (int64_t)r * ov.rstride + c;
            if (atomic) {
                atomicAdd(ak, vk);
                atomicAdd(av, vv);
            } else {
                *ak = vk;
                *av = vv;
            }
        }
    }
}

// ================================================================== host launchers
// Tile configurations.  W = bytes per row of q (head_dim * sizeof(T)).  Every config stays
// under 99 KiB of shared memory (static_asserts above).
template <typename T, int D>
struct Config {
    static constexpr int W = D * int(sizeof(T));
    static constexpr int FWD_M = W >= 512 ? 32 : 64;
    static constexpr int FWD_N = W >= 256 ? 32 : 64;
    static constexpr int DQ_M = W >= 256 ? 32 : 64;
    static constexpr int DQ_N = 32;
    static constexpr int DKV_N = W >= 256 ? 32 : 64;
    static constexpr int DKV_M = W >= 512 ? 16 : 32;
};

template <typename Kernel>
inline cudaError_t prepare(Kernel kern, size_t smem) {
    if (smem > 48 * 1024)
        return cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    (int)smem);
    return cudaSuccess;
}

inline bool grid_ok(const AttnParams& p, int tiles) {
    return p.nseq > 0 && p.nseq <= INT_MAX && tiles > 0 && tiles <= 65535;
}

template <typename T, int D, int BM, int BN>
cudaError_t launch_fwd_cfg(const AttnParams& p, cudaStream_t st) {
    const int tiles = num_q_tiles(p, BM);
    if (p.nseq == 0 || tiles == 0) return cudaSuccess;
    if (!grid_ok(p, tiles)) return cudaErrorInvalidConfiguration;
    auto kern = fwd_kernel<T, D, BM, BN>;
    const size_t smem = FwdSmem<T, D, BM, BN>::bytes;
    cudaError_t e = prepare(kern, smem);
    if (e != cudaSuccess) return e;
    AVSTFP_LAUNCH(kern, dim3((unsigned)p.nseq, (unsigned)tiles), BM * 2, smem, st, p);
    return cudaGetLastError();
}

template <typename T, int D, int BM, int BN, int KN, int KM>
cudaError_t launch_bwd_cfg(const AttnParams& p, cudaStream_t st) {
    if (p.nseq == 0) return cudaSuccess;
    cudaError_t e;
    // 1. delta = rowsum(dO * O)
    {
        const int64_t rows = p.nseq * p.Lq;
        if (rows > 0) {
            const int64_t blocks = (rows + 7) / 8;
            if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
            auto kern = delta_kernel<T, D>;
            AVSTFP_LAUNCH(kern, dim3((unsigned)blocks), 256, 0, st, p);
            if ((e = cudaGetLastError()) != cudaSuccess) return e;
        }
    }
    // 2. dQ: one CTA per (sequence, query tile)
    {
        const int tiles = num_q_tiles(p, BM);
        if (tiles > 0) {
            if (!grid_ok(p, tiles)) return cudaErrorInvalidConfiguration;
            auto kern = dq_kernel<T, D, BM, BN>;
            const size_t smem = DqSmem<T, D, BM, BN>::bytes;
            if ((e = prepare(kern, smem)) != cudaSuccess) return e;
            AVSTFP_LAUNCH(kern, dim3((unsigned)p.nseq, (unsigned)tiles), BM * 2, smem, st, p);
            if ((e = cudaGetLastError()) != cudaSuccess) return e;
        }
    }
    // 3. dK, dV and prompt grads: one CTA per (sequence, key tile incl. prompt tiles)
    {
        int tiles = 0;
        for (int s = 0; s < p.nseg; ++s) tiles += num_key_tiles(p, s, KN);
        if (tiles > 0) {
            if (!grid_ok(p, tiles)) return cudaErrorInvalidConfiguration;
            auto kern = dkv_kernel<T, D, KN, KM>;
            const size_t smem = DkvSmem<T, D, KN, KM>::bytes;
            if ((e = prepare(kern, smem)) != cudaSuccess) return e;
            AVSTFP_LAUNCH(kern, dim3((unsigned)p.nseq, (unsigned)tiles), KN * 2, smem, st, p);
            if ((e = cudaGetLastError()) != cudaSuccess) return e;
        }
    }
    return cudaSuccess;
}

// ------------------------------------------------------------------ configuration table
// Every kernel instance the launchers can start, for tools (bench/static_sm90_cuda.py reads
// it through the CPU emulation and joins it with ptxas/SASS data by kernel name).
struct KernelInfo {
    char name[96];        // as demangled: "fwd_kernel<__half, 64, 64, 64>"
    int threads;          // per CTA
    size_t smem;          // dynamic shared memory per CTA (bytes)
    int stages;           // K/V (or Q/dO) tile buffers
    size_t stage_bytes;   // bytes of global memory one stage copies
    int loads_tiles;      // 1: loops over K/V (or Q/dO) tiles
};

template <typename T> constexpr const char* type_name();
template <> constexpr const char* type_name<__half>() { return "__half"; }
template <> constexpr const char* type_name<__nv_bfloat16>() { return "__nv_bfloat16"; }
template <> constexpr const char* type_name<float>() { return "float"; }

template <typename T, int D, int BM, int BN, class F>
void info_fwd(F&& f) {
    KernelInfo k{};
    std::snprintf(k.name, sizeof k.name, "fwd_kernel<%s, %d, %d, %d>", type_name<T>(), D, BM, BN);
    k.threads = BM * 2; k.smem = FwdSmem<T, D, BM, BN>::bytes; k.stages = 1;
    k.stage_bytes = 2 * size_t(BN) * D * sizeof(T); k.loads_tiles = 1;
    f(k);
}
template <typename T, int D, int BM, int BN, class F>
void info_dq(F&& f) {
    KernelInfo k{};
    std::snprintf(k.name, sizeof k.name, "dq_kernel<%s, %d, %d, %d>", type_name<T>(), D, BM, BN);
    k.threads = BM * 2; k.smem = DqSmem<T, D, BM, BN>::bytes; k.stages = 1;
    k.stage_bytes = 2 * size_t(BN) * D * sizeof(T); k.loads_tiles = 1;
    f(k);
}
template <typename T, int D, int KN, int KM, class F>
void info_dkv(F&& f) {
    KernelInfo k{};
    std::snprintf(k.name, sizeof k.name, "dkv_kernel<%s, %d, %d, %d>", type_name<T>(), D, KN, KM);
    k.threads = KN * 2; k.smem = DkvSmem<T, D, KN, KM>::bytes; k.stages = 1;
    k.stage_bytes = 2 * size_t(KM) * D * sizeof(T); k.loads_tiles = 1;
    f(k);
}

template <typename T, int D, class F>
void kernel_infos_d(F&& f) {
    using C = Config<T, D>;
    info_fwd<T, D, 16, 16>(f);
    info_fwd<T, D, C::FWD_M, C::FWD_N>(f);
    info_dq<T, D, 16, 16>(f);
    info_dq<T, D, C::DQ_M, C::DQ_N>(f);
    info_dkv<T, D, 16, 16>(f);
    info_dkv<T, D, C::DKV_N, C::DKV_M>(f);
    KernelInfo k{};
    std::snprintf(k.name, sizeof k.name, "delta_kernel<%s, %d>", type_name<T>(), D);
    k.threads = 256;
    f(k);
}

template <class F>
void kernel_infos(F&& f) {
    kernel_infos_d<__half, 32>(f); kernel_infos_d<__half, 64>(f); kernel_infos_d<__half, 128>(f);
    kernel_infos_d<__nv_bfloat16, 32>(f); kernel_infos_d<__nv_bfloat16, 64>(f);
    kernel_infos_d<__nv_bfloat16, 128>(f);
    kernel_infos_d<float, 32>(f); kernel_infos_d<float, 64>(f); kernel_infos_d<float, 128>(f);
}

template <typename T, int D>
cudaError_t launch_fwd_d(const AttnParams& p, cudaStream_t st) {
    using C = Config<T, D>;
    if (p.short_tiles) return launch_fwd_cfg<T, D, 16, 16>(p, st);
    return launch_fwd_cfg<T, D, C::FWD_M, C::FWD_N>(p, st);
}

template <typename T, int D>
cudaError_t launch_bwd_d(const AttnParams& p, cudaStream_t st) {
    using C = Config<T, D>;
    if (p.short_tiles) return launch_bwd_cfg<T, D, 16, 16, 16, 16>(p, st);
    return launch_bwd_cfg<T, D, C::DQ_M, C::DQ_N, C::DKV_N, C::DKV_M>(p, st);
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

}  // namespace detail
}  // namespace avstfp
