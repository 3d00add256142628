// Instantiates the prompted-attention kernels for one dtype (__half).  One translation unit
// per dtype so that the three compile in parallel.  Design: prompted_attention.cu.
#include "attn_kernels.cuh"

AVSTFP_DTYPE_ENTRY_POINTS(f16, __half)
