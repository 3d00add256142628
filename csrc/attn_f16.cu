// Instantiates the prompted-attention kernels for one dtype (__half).  One translation unit
// per dtype so that the three compile in parallel.  Design: prompted_attention.cu.
#include "attn_kernels.cuh"

namespace avstfp {

cudaError_t launch_forward_f16(const AttnParams& p, cudaStream_t stream) {
    return detail::launch_fwd_t<__half>(p, stream);
}

cudaError_t launch_backward_f16(const AttnParams& p, cudaStream_t stream) {
    return detail::launch_bwd_t<__half>(p, stream);
}

}  // namespace avstfp
