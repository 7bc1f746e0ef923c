// FlashAttention-2 forward on tensor cores (sm80+): one block of 4 warps per query tile of a query
// segment; each warp owns 16 rows of every 64, keeps its output tiles and softmax statistics in
// registers, and runs S = Q K^T and O += P V with mma.sync m16n8k16 (f32 accumulation). Q stays in
// shared memory; K and V tiles arrive by cp.async (see flash_fwd.cuh for the pipelines). Causal
// masks and windows skip the key tiles no row of the query tile sees and mask only the tiles some
// row sees in part; ALiBi and the soft cap are one pass over the scores (finish_scores).
//
// Kernels (the head dim rounded up; columns past the real head dim are zero-filled):
//   flash_fwd_{f16,bf16}_{32,64,96,128,256}: 64-row query tiles (16 rows per warp), K and V
//       double-buffered, key tiles of 64 (32 at head dim 256);
//   flash_fwd_r128_{f16,bf16}_{32,64,96,128}: 128-row query tiles (two 16-row m-tiles per warp,
//       each K and V fragment read once for both), one K and one V tile of 64 keys pipelined as
//       FlashAttention-2 does: FlashAttention-2's own tiling for these head dims.
// Dynamic shared memory: flash_fwd_smem (see the Rust side, kernel_plan.rs).
#include "flash_fwd.cuh"

// BOUNDS: the launch bounds. ptxas gives the 64-row kernels up to head dim 64 more than 128
// registers on sm_90 (one block per SM fewer than their shared memory allows) unless told 4 blocks.
#define FLASH_FWD(NAME, T, D, BK, BOUNDS)                                                                     \
    extern "C" __global__ void __launch_bounds__ BOUNDS                                                       \
        flash_fwd_##NAME##_##D(const T* q, const T* k, const T* v, T* o, float* lse, const long long* qs,     \
                               const long long* ks, const AttnParams p) {                                     \
        flash_fwd<T, D, BK, 1, 2, false>(q, k, v, nullptr, nullptr, o, lse, qs, ks, p);                       \
    }
#define FLASH_FWD_R128(NAME, T, D, BK)                                                                          \
    extern "C" __global__ void __launch_bounds__(FF_THREADS)                                                  \
        flash_fwd_r128_##NAME##_##D(const T* q, const T* k, const T* v, T* o, float* lse, const long long* qs, \
                                    const long long* ks, const AttnParams p) {                                \
        flash_fwd<T, D, BK, 2, 1, false>(q, k, v, nullptr, nullptr, o, lse, qs, ks, p);                       \
    }

#define FLASH_FWD_DTYPE(NAME, T)                \
    FLASH_FWD(NAME, T, 32, 64, (FF_THREADS, 4)) \
    FLASH_FWD(NAME, T, 64, 64, (FF_THREADS, 4)) \
    FLASH_FWD(NAME, T, 96, 64, (FF_THREADS))    \
    FLASH_FWD(NAME, T, 128, 64, (FF_THREADS))   \
    FLASH_FWD(NAME, T, 256, 32, (FF_THREADS))   \
    FLASH_FWD_R128(NAME, T, 32, 64)  \
    FLASH_FWD_R128(NAME, T, 64, 64)  \
    FLASH_FWD_R128(NAME, T, 96, 32)  \
    FLASH_FWD_R128(NAME, T, 128, 32)

FLASH_FWD_DTYPE(f16, __half)
FLASH_FWD_DTYPE(bf16, __nv_bfloat16)
