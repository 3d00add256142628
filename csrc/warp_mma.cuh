// Thin inline-PTX wrappers for the tensor-core path of the fp16/bf16 kernels (sm_80+):
// ldmatrix (shared -> registers, 8x8 matrices of 16-bit elements) and mma.sync m16n8k16
// (fp32 accumulation), plus the warp-level products built from them.  No torch headers.
// The CPU emulation (cpu_emulation.h) implements ldmatrix_x4 / ldmatrix_x4_trans /
// mma_m16n8k16 lane by lane from the layouts below, so the products here run unchanged
// there (tests/test_cuda_build.py checks them against a plain matrix product).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16" and "ldmatrix"), with
// lane = threadIdx.x % 32, g = lane / 4 (the "group"), t = lane % 4:
//   A, 16 x 16 (row-major, 16-bit), four 32-bit registers of two elements each:
//     a[0] = A[g][2t, 2t+1]        a[1] = A[g+8][2t, 2t+1]
//     a[2] = A[g][2t+8, 2t+9]      a[3] = A[g+8][2t+8, 2t+9]
//   B, 16 x 8 (k x n, 16-bit), two registers:
//     b[0] = B[2t, 2t+1][g]        b[1] = B[2t+8, 2t+9][g]
//   C/D, 16 x 8 (fp32), four registers:
//     c[0], c[1] = C[g][2t, 2t+1]  c[2], c[3] = C[g+8][2t, 2t+1]
//   (the low 16 bits of a register hold the element with the smaller column/row index).
//   ldmatrix.x4: lanes 8i..8i+7 give the 16-byte row addresses of 8x8 matrix i; register
//     r[i] of lane receives row g, elements 2t and 2t+1 of matrix i; with .trans it
//     receives column g, elements (rows) 2t and 2t+1 (i.e. the transposed matrix).
// So two neighbouring 16x8 C fragments (columns 0-7 and 8-15) hold exactly the A fragment
// of their 16x16 product once rounded to 16 bits: c-tile 0 gives a[0] (c0,c1), a[1]
// (c2,c3), c-tile 1 gives a[2], a[3] -- FlashAttention-2 feeds P to P V this way.
#pragma once

#include <cstdint>
#include <type_traits>

namespace avstfp {
namespace detail {

#ifndef AVSTFP_CPU_EMULATION
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// r[i]: matrix i, whose row (lane % 8) starts at the address lane 8i + lane % 8 passes.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row)));
}
// d += A B (16x16 times 16x8, fp32 accumulators in place).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
    if constexpr (std::is_same<T, __half>::value)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// Two floats as one register of two 16-bit elements (lo: the lower column/row index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    return bits_of(from_f<T>(lo)) | (bits_of(from_f<T>(hi)) << 16);
}

// A fragments of a warp's 16 x K tile (row-major in shared memory, pitch ld elements; rows
// 16-byte aligned): a[kk] covers columns 16kk .. 16kk+15.
template <typename T, int K>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[K / 16][4], const T* s, int ld) {
    const int lane = threadIdx.x & 31;
    const int r = (lane & 7) + 8 * ((lane >> 3) & 1), c = 8 * (lane >> 4);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) ldmatrix_x4(a[kk], s + r * ld + kk * 16 + c);
}

// acc[16 x N] += A[16 x K] * B^T, with B stored as N rows of K (row-major, pitch ld): the
// S = Q K^T product (B = the key tile).  acc[j] is the C fragment of columns 8j..8j+7.
template <typename T, int N, int K>
__device__ __forceinline__ void mma_abt(float (&acc)[N / 8][4], const uint32_t (&a)[K / 16][4],
                                        const T* s, int ld) {
    static_assert(N % 16 == 0 && K % 16 == 0, "tile sizes are multiples of 16");
    const int lane = threadIdx.x & 31;
    const int r = (lane & 7) + 8 * (lane >> 4), c = 8 * ((lane >> 3) & 1);
#pragma unroll
    for (int j = 0; j < N / 16; ++j) {   // two n8 tiles: rows 16j .. 16j+15 of B
#pragma unroll
        for (int kk = 0; kk < K / 16; ++kk) {
            uint32_t b[4];   // b[0], b[1]: tile 2j; b[2], b[3]: tile 2j+1
            ldmatrix_x4(b, s + (16 * j + r) * ld + kk * 16 + c);
            mma_m16n8k16<T>(acc[2 * j], a[kk], b[0], b[1]);
            mma_m16n8k16<T>(acc[2 * j + 1], a[kk], b[2], b[3]);
        }
    }
}

// acc[16 x N] += P[16 x K] * V, with P given as fp32 C fragments (p[j]: columns 8j..8j+7,
// rounded to T here) and V stored as K rows of N (row-major, pitch ld): the O += P V product.
template <typename T, int N, int K>
__device__ __forceinline__ void mma_pv(float (&acc)[N / 8][4], const float (&p)[K / 8][4],
                                       const T* s, int ld) {
    static_assert(N % 16 == 0 && K % 16 == 0, "tile sizes are multiples of 16");
    const int lane = threadIdx.x & 31;
    const int r = (lane & 7) + 8 * ((lane >> 3) & 1), c = 8 * (lane >> 4);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]),
                               pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                               pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
        for (int j = 0; j < N / 16; ++j) {   // two n8 tiles: columns 16j .. 16j+15 of V
            uint32_t b[4];   // trans: b[0], b[1] tile 2j (rows kk*16 + 0-7, 8-15), b[2], b[3] tile 2j+1
            ldmatrix_x4_trans(b, s + (kk * 16 + r) * ld + 16 * j + c);
            mma_m16n8k16<T>(acc[2 * j], a, b[0], b[1]);
            mma_m16n8k16<T>(acc[2 * j + 1], a, b[2], b[3]);
        }
    }
}

}  // namespace detail
}  // namespace avstfp
