// CUDA backend of avstfp_fast.prompted_attention (contract: docs/design.md, "The op
// contract"): entry points by dtype.
//
// ============================================================================ DESIGN
// What is computed.  For every sequence b of the batch and every segment s (block-diagonal
// attention inside one buffer; one segment when `segments` is not given):
//     out[b, q_s] = softmax(scale * q[b, q_s] [k[b, k_s]; pk_s[b]]^T) [v[b, k_s]; pv_s[b]]
// where the prompt keys/values pk_s/pv_s are a *second key source* of the same online
// softmax: nothing is concatenated, expanded, permuted or copied.
//
// Addressing (attn_params.h).  Every operand is (*batch, rows, head_dim) with a dense last
// dim and arbitrary strides elsewhere.  The launch plan (avstfp_fast/ops/layout.py,
// LaunchPlan, read by unpack_params in attn_params.h) merges mergeable batch dims and
// gives at most 4 batch sizes plus, per operand, 4 batch strides and a row stride (in
// elements); the binding only adds the pointers.
// A work item's flat sequence index b is un-flattened row-major into (b0..b3) and
// sum_i b_i * bstride[i] is added to each base pointer.  The temporal stage is then simply
// a (B, N, H) batch over a (B, M, N, 3, H, d) buffer with sequence dim M; spatial/fusion a
// (B, M, H) batch with sequence dim N.  Prompts are operands like any other: a
// batch-shared prompt (H, P, d) has bstride 0 in the broadcast dims, a per-position one
// (N, H, P, d) has nonzero strides for N and H.  Segments: up to 4, each with its own
// (q_start, q_len, k_start, k_len, P) and prompt operands, all kernel scalar arguments
// (the parameter block is a __grid_constant__ struct, no pointer tables in memory).
//
// Work items and grid.  A work item is (sequence, tile): forward/dQ tiles are the query
// tiles of all segments in order; dK/dV tiles are key tiles.  The keys of a segment are
// its k rows followed by its prompt rows, cut into tiles as one sequence: a tile may end
// the real keys and start the prompts (each part loaded from its own base pointer and row
// stride), so the temporal stage's 10 keys + 2 prompts are one tile.  Items are numbered
// with the tile fastest, so the query tiles of one sequence run next to each other and
// re-read its K/V from L2, not HBM.
// A CTA runs PACK consecutive items ("units"); CTA c = blockIdx.y * gridDim.x + blockIdx.x
// (grid.x up to 2^31-1, the rest on grid.y: any batch product up to 2^31-1).
//   * 64-row tiles: PACK = 1, one unit of 4 warps; each warp owns 16 rows of the tile.
//   * short sequences (every segment <= 16 queries, the temporal stage: 10 frames):
//     PACK = 4 one-warp units of 16 x 16 tiles, i.e. 4 sequences per 4-warp CTA.  Each
//     unit has its own shared memory and masks keys/queries past its own sequence, so the
//     CTA computes a block-diagonal attention over the 4 packed sequences.
// Apart from the cooperative tile loads a warp only touches its own rows, so the only
// barriers are the unit's (__syncthreads for a 4-warp unit, __syncwarp for a 1-warp one).
//
// Pipeline.  Q (and dO for dQ; K and V for dK/dV) are loaded once.  The streamed tiles
// (K/V for forward and dQ; Q/dO for dK/dV) go through a STAGES-deep ring of shared
// buffers filled by cp.async.cg (16-byte copies, zero-filled past the end): the prologue
// issues tiles 0..STAGES-2, one commit group each; iteration j waits until at most
// STAGES-2 groups are pending (tile j landed for this thread), passes the unit barrier
// (everyone's copies landed and tile j-1's buffer is free), issues tile j+STAGES-1 into
// that buffer, then computes on tile j.  Layouts whose pointers/strides are not 16-byte
// aligned fall back to plain element copies (same schedule).  Outputs (O, dQ, dK, dV) are
// written with 16-byte stores when aligned (vec16_out), else element by element.
// Matrix products, fp16/bf16 (FlashAttention-2's structure): mma.sync m16n8k16 with fp32
// accumulation and ldmatrix operand loads, through the thin inline-PTX wrappers of
// warp_mma.cuh (fragment layouts documented there).  Each warp owns 16 rows; its A
// operand (Q, or K/V in dK/dV) is loaded into registers once; scores, probabilities, dP,
// dS, the online softmax and the accumulators (O, dQ, dK, dV) stay in registers; P and dS
// are rounded to the input dtype only as the A operand of the next product (the C
// fragments of two n8 tiles are the A fragment of their k16 product).  No fp32 tile passes
// through shared memory; outputs are staged through the warp's own (no longer needed)
// input rows for 16-byte stores.  fp32: one helper, warp_mm, with plain FMA (no TF32, to
// meet the 1e-5 tolerance) and scores/accumulators in shared memory.  Tile shapes and
// stages per (dtype, head dim) are the table at Config (attn_kernels.cuh), each under the
// sm_80 limit of 163 KiB of shared memory; occupancy and bytes in flight of every kernel
// are in bench/results/static-sm90-cuda.md (bench/static_sm90_cuda.py checks them in CI).
//
// Forward (fwd_kernel): per unit, loop over the key tiles of the segment (keys, then
// prompts): S = Q K^T; online softmax in log2 units (running max m, sum l, O rescaled by
// exp2(m_old - m_new); fp16/bf16: the 4 lanes that share a row reduce with two xor
// shuffles, fp32: two lanes per row); O += P V.  Finally out = O / l (input
// dtype, any strides) and lse = (m + log2 l) ln 2 (fp32, dense (*batch, Lq)).
//
// Backward (FlashAttention-2 algebra, with dS = P o (dP - delta), dP = dO V^T), two
// launches in stream order:
//   1. dq_kernel: one unit per (sequence, query tile); first delta = rowsum(dO o O) of its
//      own rows in fp32 (dO is in shared memory already, O read once), written to the
//      scratch for dkv_kernel; then loops over the key tiles (keys, then prompts)
//      recomputing P = exp2(S log2e - lse log2e); dQ = scale * sum dS K.  Each dQ row is
//      owned by one unit: no atomics.
//   2. dkv_kernel: one unit per (sequence, key tile; prompt rows included); loops over the
//      query tiles of the segment with transposed products (S^T = K Q^T, dP^T = V dO^T),
//      dV = sum P^T dO, dK = scale * sum dS^T Q.  Key rows are owned by one unit: no
//      atomics for dk/dv, which are written into the given (possibly strided, possibly
//      one packed QKV-gradient buffer) tensors; the prompt rows of a tile go to the
//      prompt gradients (below).
//   Short sequences (every segment <= 16 queries, fp16/bf16): one kernel instead,
//   seq_bwd_kernel: one warp per (sequence, segment) computes delta = rowsum(P o dP) from
//   the recomputed P and dP (pass 1), then dQ in registers and every key tile's dK/dV
//   with transposed products (pass 2); no delta pass, no dQ buffer, one launch.
//   Recomputing S in two kernels instead of atomically adding dQ costs little for these
//   short, memory-bound sequences and makes dq/dk/dv deterministic by construction.
//   Prompt gradients need a reduction over the sequences that share a prompt row set.
//   The last kernel does it and writes dpk/dpv finished, in the prompts' dtype: the units
//   that own prompt rows store fp32 partials per sequence, and the last unit of a row set
//   (an int32 ticket counter per row set, reset by that unit) sums them in sequence order
//   (attn_kernels.cuh, "backward: prompt gradients").  No zero-fill, no float atomics, no
//   cast kernel; the same bits on every run, in every mode.  seq_bwd_kernel with seq_reps
//   (a warp owns all sequences of a row set) keeps a running sum instead.
//
// Every exit path drains its copies (cp_async_drain: commit + wait_group 0); a program
// with nothing to compute (a dK/dV tile of a segment without queries) issues none.
//
// Testing without a GPU.  cpu_emulation.h runs this very code on the CPU (threads as
// fibers, WMMA emulated, cp.async modelled with late landing and early clobber plus a
// pending-read check and a fatal check for copies still pending when a CTA ends, launches through AVSTFP_LAUNCH with a tiny grid.x so the grid.y
// wrap is always exercised); tests/test_cuda_build.py checks it against the float64
// reference, and checks that deliberately broken pipelines (a misplaced cp.async wait, a
// missing barrier after it: AVSTFP_TEST_FAULT) fail there.
//
// Error handling.  Launchers never throw: they return the first cudaError_t (including
// cudaGetLastError() after every launch); the binding turns it into a TORCH_CHECK message.
// ============================================================================
#include "attn_kernels.cuh"
#include "attn_smem.h"

namespace avstfp {

cudaError_t launch_forward(const AttnParams& p, cudaStream_t stream) {
    switch (p.dtype) {
        case kF16: return launch_forward_f16(p, stream);
        case kBF16: return launch_forward_bf16(p, stream);
        case kF32: return launch_forward_f32(p, stream);
        default: return cudaErrorInvalidValue;
    }
}

cudaError_t launch_backward(const AttnParams& p, cudaStream_t stream) {
    switch (p.dtype) {
        case kF16: return launch_backward_f16(p, stream);
        case kBF16: return launch_backward_bf16(p, stream);
        case kF32: return launch_backward_f32(p, stream);
        default: return cudaErrorInvalidValue;
    }
}

int max_smem_bytes(int dtype, int head_dim, int short_tiles) {
    return detail::max_smem_bytes_of(dtype, head_dim, short_tiles);
}

}  // namespace avstfp
