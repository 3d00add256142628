// The dynamic shared memory of a (dtype, head dim, short) launch by dtype code: one
// definition for the compiled library (prompted_attention.cu) and the CPU emulation, so a
// test compares the built extension's answer with the emulated source's.  A header of its
// own: the per-dtype kernel files (attn_*.cu) need none of it.
#pragma once

#include "attn_kernels.cuh"

namespace avstfp {
namespace detail {

template <typename T>
int max_smem_t(int head_dim, bool short_tiles) {
    switch (head_dim) {
        case 32: return (int)max_smem_d<T, 32>(short_tiles);
        case 64: return (int)max_smem_d<T, 64>(short_tiles);
        case 128: return (int)max_smem_d<T, 128>(short_tiles);
        default: return -1;
    }
}

// max_smem_bytes (attn_params.h) by dtype code; -1 for an unsupported dtype or head dim.
inline int max_smem_bytes_of(int dtype, int head_dim, int short_tiles) {
    switch (dtype) {
        case kF16: return max_smem_t<__half>(head_dim, short_tiles != 0);
        case kBF16: return max_smem_t<__nv_bfloat16>(head_dim, short_tiles != 0);
        case kF32: return max_smem_t<float>(head_dim, short_tiles != 0);
        default: return -1;
    }
}

}  // namespace detail
}  // namespace avstfp
