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
// A broadcast dim has bstride 0 (batch-shared prompts and their summed gradients).
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
    Operand dpk[AVSTFP_MAX_SEGS], dpv[AVSTFP_MAX_SEGS];  // prompt grads, prompts' dtype:
                 // (*lead, P, E) with lead the prompts' own batch shape (bstride 0 on the
                 // batch dims the prompts are shared over: those are summed)

    float* lse;      // float32, dense (nseq, Lq): natural-log row log-sum-exp
    float* delta;    // float32, dense (nseq, Lq): rowsum(dout * o), written by dq_kernel
                     // for its query tile and read by dkv_kernel (backward scratch)
    float* part;     // float32 prompt-gradient partials (backward scratch, prompt_part_offset)
    int* tickets;    // int32 ticket counters, one per (segment, prompt row set): 0 before
                     // a launch and after it (the last unit of a row set resets its own)

    int Lq;
    int nseg;
    int q_start[AVSTFP_MAX_SEGS], q_len[AVSTFP_MAX_SEGS];
    int k_start[AVSTFP_MAX_SEGS], k_len[AVSTFP_MAX_SEGS];
    int n_prompt[AVSTFP_MAX_SEGS];

    float scale;          // softmax scale applied to q.k
    int head_dim;         // 32, 64 or 128 (value dim is equal)
    int dtype;            // DType
    int vec16;            // 1: every pointer and stride allows 16-byte vector loads
    int atomic_prompt_grads;   // always 0 (version 2 plans): prompt gradients are summed
                               // in a fixed order in every mode (see prompt_part_offset)
    int short_tiles;      // 1: every segment has <= 16 queries: packed 16x16 tiles (4 sequences
                          //    per CTA, one warp each) where the dtype/head dim has them
    int vec16_out;        // 1: o/dq/dk/dv pointers and strides allow 16-byte vector stores
    int64_t seq_reps;     // short backward (seq_bwd_kernel), 0 = off: one warp owns the
                          //    seq_reps sequences b = r * (nseq / seq_reps) + g (r < seq_reps)
                          //    that share their prompts, in order, and sums their prompt
                          //    gradients itself (a running sum in `part`, the last
                          //    sequence writes dpk/dpv: no zero-fill, no atomics, no cast)
};

// ------------------------------------------------------------------ prompt-gradient scratch
// Host and device (binding.cpp checks the buffers' sizes by these, the kernels address them).
#if defined(__CUDACC__)
#define AVSTFP_HD __host__ __device__
#else
#define AVSTFP_HD
#endif
// The sequences that share a prompt row set of segment s: those that differ only in the
// batch dims dpk[s] is broadcast over (bstride 0, size > 1).  prompt_reps: how many share
// one (R); the row sets number nseq / R.
AVSTFP_HD inline int64_t prompt_reps(const AttnParams& p, int s) {
    int64_t r = 1;
    for (int d = 0; d < AVSTFP_MAX_BDIMS; ++d)
        if (p.bsize[d] > 1 && p.dpk[s].bstride[d] == 0) r *= p.bsize[d];
    return r;
}
// `part` holds, per segment with prompts (in segment order), the fp32 partial gradients
// (2, slots, P, E): [0] for prompt_k, [1] for prompt_v.  Without seq_reps one slot per
// sequence, written by the units that own the sequence's prompt rows and summed over the
// row set in sequence order by the last of them; with seq_reps one slot per row set
// (nseq / seq_reps), the running sum of the warp that owns the row set.  `tickets` holds
// one counter per (segment, row set).
AVSTFP_HD inline int64_t prompt_part_slots(const AttnParams& p) {
    return p.seq_reps > 0 ? p.nseq / p.seq_reps : p.nseq;
}
AVSTFP_HD inline int64_t prompt_part_offset(const AttnParams& p, int s) {
    int64_t o = 0;
    for (int t = 0; t < s; ++t) o += 2 * prompt_part_slots(p) * p.n_prompt[t] * p.head_dim;
    return o;
}
AVSTFP_HD inline int64_t prompt_ticket_offset(const AttnParams& p, int s) {
    int64_t o = 0;
    for (int t = 0; t < s; ++t)
        if (p.n_prompt[t] > 0) o += p.nseq / prompt_reps(p, t);
    return o;
}


// ------------------------------------------------------------------ launch plan
// Everything but the pointers comes from one launch plan computed in Python
// (avstfp_fast/ops/layout.py, LaunchPlan.ints(): merged batch sizes, every operand's
// strides, the segment table), for the torch binding and the CPU-emulation tests alike.
// Layout of the plan (int64):
//   [0, 16)   version, nseq, bsize[4], Lq, nseg, head_dim, dtype, vec16, vec16_out,
//             short_tiles, atomic_prompt_grads, scale (float32 bits), seq_reps
//   then per segment s < 4:  q_start, q_len, k_start, k_len, n_prompt
//   then per operand i < kNumOperands (order of operand_at):  bstride[4], rstride
// Pointers: kNumOperands operand pointers in the same order (null: absent), then lse, delta,
// part, tickets.
constexpr int kPlanVersion = 2;   // 2: dpk/dpv in the prompts' dtype, part + tickets
constexpr int kNumOperands = 8 + 4 * AVSTFP_MAX_SEGS;   // q k v o dout dq dk dv pk pv dpk dpv
constexpr int kPlanHeader = 16;
constexpr int kPlanInts = kPlanHeader + 5 * AVSTFP_MAX_SEGS + (AVSTFP_MAX_BDIMS + 1) * kNumOperands;
constexpr int kNumPointers = kNumOperands + 4;

inline Operand* operand_at(AttnParams& p, int i) {
    Operand* fixed[8] = {&p.q, &p.k, &p.v, &p.o, &p.dout, &p.dq, &p.dk, &p.dv};
    if (i < 8) return fixed[i];
    i -= 8;
    Operand* arr[4] = {p.pk, p.pv, p.dpk, p.dpv};
    return &arr[i / AVSTFP_MAX_SEGS][i % AVSTFP_MAX_SEGS];
}

// Operands read through 16-byte cp.async (q k v dout pk pv) and written through 16-byte
// stores (o dq dk dv); the prompt gradients are neither (scalar stores).
inline bool operand_loaded(int i) { return i <= 2 || i == 4 || (i >= 8 && i < 8 + 2 * AVSTFP_MAX_SEGS); }
inline bool operand_stored(int i) { return i == 3 || (i >= 5 && i < 8); }

// Fill p from a plan and the pointers.  vec16/vec16_out: the plan's stride condition and
// 16-byte aligned pointers.  Returns nullptr, or what is wrong with the plan.
inline const char* unpack_params(const int64_t* plan, int64_t n, void* const* ptrs,
                                 AttnParams& p) {
    if (n != kPlanInts) return "launch plan: wrong length";
    if (plan[0] != kPlanVersion) return "launch plan: wrong version";
    AttnParams z{};
    p = z;
    p.nseq = plan[1];
    int64_t prod = 1;
    for (int d = 0; d < AVSTFP_MAX_BDIMS; ++d) {
        p.bsize[d] = plan[2 + d];
        if (p.bsize[d] < 0) return "launch plan: negative batch size";
        prod *= p.bsize[d];
    }
    p.Lq = (int)plan[6];
    p.nseg = (int)plan[7];
    p.head_dim = (int)plan[8];
    p.dtype = (int)plan[9];
    p.vec16 = (int)plan[10];
    p.vec16_out = (int)plan[11];
    p.short_tiles = (int)plan[12];
    p.atomic_prompt_grads = (int)plan[13];
    const uint32_t bits = (uint32_t)plan[14];
    static_assert(sizeof(float) == sizeof(uint32_t), "float32");
    __builtin_memcpy(&p.scale, &bits, 4);
    p.seq_reps = plan[15];
    if (p.seq_reps < 0 || (p.seq_reps > 0 && p.nseq % p.seq_reps != 0))
        return "launch plan: bad seq_reps";
    if (p.nseq != prod) return "launch plan: nseq != product of bsize";
    if (p.nseg < 1 || p.nseg > AVSTFP_MAX_SEGS) return "launch plan: bad number of segments";
    const int64_t* seg = plan + kPlanHeader;
    int64_t qsum = 0;
    for (int s = 0; s < AVSTFP_MAX_SEGS; ++s) {
        p.q_start[s] = (int)seg[5 * s];
        p.q_len[s] = (int)seg[5 * s + 1];
        p.k_start[s] = (int)seg[5 * s + 2];
        p.k_len[s] = (int)seg[5 * s + 3];
        p.n_prompt[s] = (int)seg[5 * s + 4];
        if (s < p.nseg) {
            if (p.q_start[s] != qsum || p.q_len[s] < 0 || p.k_len[s] < 0 || p.n_prompt[s] < 0)
                return "launch plan: bad segment table";
            if (p.q_len[s] > 0 && p.k_len[s] + p.n_prompt[s] == 0)
                return "launch plan: a segment has queries but no keys and no prompts";
            qsum += p.q_len[s];
        }
    }
    if (qsum != p.Lq) return "launch plan: segments do not sum to Lq";
    const int64_t* st = seg + 5 * AVSTFP_MAX_SEGS;
    for (int i = 0; i < kNumOperands; ++i) {
        Operand& op = *operand_at(p, i);
        op.ptr = ptrs[i];
        for (int d = 0; d < AVSTFP_MAX_BDIMS; ++d) op.bstride[d] = st[5 * i + d];
        op.rstride = st[5 * i + 4];
        if (op.ptr != nullptr && reinterpret_cast<uintptr_t>(op.ptr) % 16 != 0) {
            if (operand_loaded(i)) p.vec16 = 0;
            if (operand_stored(i)) p.vec16_out = 0;
        }
    }
    for (int s = 0; s < AVSTFP_MAX_SEGS; ++s)   // a prompt is there iff its pointer is
        if ((p.pk[s].ptr == nullptr) != (p.n_prompt[s] == 0) ||
            (p.pv[s].ptr == nullptr) != (p.n_prompt[s] == 0))
            return "launch plan: prompt pointers do not match n_prompt";
    p.lse = static_cast<float*>(ptrs[kNumOperands]);
    p.delta = static_cast<float*>(ptrs[kNumOperands + 1]);
    p.part = static_cast<float*>(ptrs[kNumOperands + 2]);
    p.tickets = static_cast<int*>(ptrs[kNumOperands + 3]);
    if (p.atomic_prompt_grads) return "launch plan: atomic_prompt_grads must be 0";
    return nullptr;
}

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
