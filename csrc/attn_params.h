// Plain-C parameter block shared by the CUDA kernels (*.cu) and the torch binding
// (binding.cpp).  No torch headers here or in the .cu files: the kernels see raw pointers,
// element strides and sizes only.  See prompted_attention.cu for the kernel design.
#pragma once

#include <cstdint>
#ifndef AVSTFP_CPU_EMULATION
#include <cuda_runtime.h>
#endif

#define AVSTFP_MAX_BDIMS 4   // batch dims after merging mergeable neighbours
#define AVSTFP_MAX_SEGS 4    // segments (blocks of the block-diagonal attention)

namespace avstfp {

enum DType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };

// One (*batch, rows, head_dim) operand: the element at (batch index b_0..b_3, row r, col c)
// lives at  ptr + sum_i b_i * bstride[i] + r * rstride + c   (elements, last dim dense).
// A broadcast dim has bstride 0 (batch-shared prompts; atomically reduced prompt grads).
struct Operand {
    void* ptr;
    int64_t bstride[AVSTFP_MAX_BDIMS];
    int64_t rstride;
};

struct AttnParams {
    // batch: bsize[0..3] row-major (unused dims have size 1); nseq = product.
    int64_t bsize[AVSTFP_MAX_BDIMS];
    int64_t nseq;

    Operand q, k, v, o;          // o: the forward output
    Operand dout, dq, dk, dv;    // backward only
    Operand pk[AVSTFP_MAX_SEGS], pv[AVSTFP_MAX_SEGS];    // prompts of segment s (ptr null: none)
    Operand dpk[AVSTFP_MAX_SEGS], dpv[AVSTFP_MAX_SEGS];  // float32 prompt-grad buffers

    float* lse;      // float32, dense (nseq, Lq): natural-log row log-sum-exp
    float* delta;    // float32, dense (nseq, Lq): rowsum(dout * o) (backward scratch)

    int Lq;
    int nseg;
    int q_start[AVSTFP_MAX_SEGS], q_len[AVSTFP_MAX_SEGS];
    int k_start[AVSTFP_MAX_SEGS], k_len[AVSTFP_MAX_SEGS];
    int n_prompt[AVSTFP_MAX_SEGS];

    float scale;          // softmax scale applied to q.k
    int head_dim;         // 32, 64 or 128 (value dim is equal)
    int dtype;            // DType
    int vec16;            // 1: every pointer and stride allows 16-byte vector loads
    int atomic_prompt_grads;   // 1: atomicAdd into dpk/dpv (broadcast strides 0);
                               // 0: plain stores (each sequence owns its slice)
    int short_tiles;      // 1: every segment has <= 16 queries: packed 16x16 tiles (4 sequences
                          //    per CTA, one warp each) where the dtype/head dim has them
    int vec16_out;        // 1: o/dq/dk/dv pointers and strides allow 16-byte vector stores
};

// Launchers (return the first CUDA error, cudaSuccess otherwise; never throw).
// Each checks cudaGetLastError() after every launch.
cudaError_t launch_forward(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_backward(const AttnParams& p, cudaStream_t stream);

// Per-dtype entry points (one translation unit each, compiled in parallel).
cudaError_t launch_forward_f16(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_forward_bf16(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_forward_f32(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_backward_f16(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_backward_bf16(const AttnParams& p, cudaStream_t stream);
cudaError_t launch_backward_f32(const AttnParams& p, cudaStream_t stream);

// Dynamic shared memory each kernel of a configuration needs (for error messages/tests).
int max_smem_bytes(int dtype, int head_dim, int short_tiles);

}  // namespace avstfp
