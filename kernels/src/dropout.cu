// Seeded dropout multipliers, the mask of attn-op's `nn::dropout` on the GPU:
//   keep[row * cols + col] = scale if Philox 4x32-10 word (col % 4) of counter (col / 4, row, 0, 0)
//                            is >= threshold, else 0,
// in the output's dtype (scale rounded to it once). Bit for bit the CPU's mask
// (attn-op/src/philox.rs, `dropout_multipliers`), so a seed drops the same elements everywhere.
//
// Kernels: dropout_keep_{f32,f16,bf16}. Launch: one thread per group of 4 columns of a row (one
// Philox block), DROPOUT_THREADS threads per block, ceil(rows * ceil(cols / 4) / DROPOUT_THREADS)
// blocks; row numbers enter the counter as 32-bit values, as on the CPU.
#include "attn_common.cuh"

#define DROPOUT_THREADS 256

template <typename T>
__device__ void dropout_keep(T* __restrict__ keep, unsigned long long rows, unsigned long long cols,
                             unsigned int seed_lo, unsigned int seed_hi, unsigned int threshold, float scale) {
    const unsigned long long groups = (cols + 3) / 4;
    const unsigned long long i = (unsigned long long)blockIdx.x * DROPOUT_THREADS + threadIdx.x;
    if (i >= rows * groups) return;
    const unsigned long long row = i / groups, c0 = (i % groups) * 4;
    const uint4 w = philox4x32_10(make_uint4((unsigned)(c0 / 4), (unsigned)row, 0u, 0u), make_uint2(seed_lo, seed_hi));
    const T kept = from_f32<T>(scale), dropped = from_f32<T>(0.0f);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        if (c0 + j < cols) keep[row * cols + c0 + j] = word_of(w, j) >= threshold ? kept : dropped;
    }
}

#define DROPOUT_KEEP(NAME, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(DROPOUT_THREADS)                                              \
        dropout_keep_##NAME(T* keep, unsigned long long rows, unsigned long long cols, unsigned int seed_lo,   \
                            unsigned int seed_hi, unsigned int threshold, float scale) {                       \
        dropout_keep<T>(keep, rows, cols, seed_lo, seed_hi, threshold, scale);                                 \
    }

DROPOUT_KEEP(f32, float)
DROPOUT_KEEP(f16, __half)
DROPOUT_KEEP(bf16, __nv_bfloat16)
