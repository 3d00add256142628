// Instantiates the prompted-attention kernels for one dtype (__nv_bfloat16).  One translation unit
// per dtype so that the three compile in parallel.  Design: prompted_attention.cu.
#include "attn_kernels.cuh"

namespace avstfp {

cudaError_t launch_forward_bf16(const AttnParams& p, cudaStream_t stream) {
    return detail::launch_fwd_t<__nv_bfloat16>(p, stream);
}

cudaError_t launch_backward_bf16(const AttnParams& p, cudaStream_t stream) {
    return detail::launch_bwd_t<__nv_bfloat16>(p, stream);
}

}  // namespace avstfp
