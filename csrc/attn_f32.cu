// Instantiates the prompted-attention kernels for one dtype (float).  One translation unit
// per dtype so that the three compile in parallel.  Design: prompted_attention.cu.
#include "attn_kernels.cuh"

AVSTFP_DTYPE_ENTRY_POINTS(f32, float)
