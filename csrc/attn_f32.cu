// Instantiates the prompted-attention kernels for one dtype (float).  One translation unit
// per dtype so that the three compile in parallel.  Design: prompted_attention.cu.
#include "attn_kernels.cuh"

namespace avstfp {

cudaError_t launch_forward_f32(const AttnParams& p, cudaStream_t stream) {
    return detail::launch_fwd_t<float>(p, stream);
}

cudaError_t launch_backward_f32(const AttnParams& p, cudaStream_t stream) {
    return detail::launch_bwd_t<float>(p, stream);
}

}  // namespace avstfp
