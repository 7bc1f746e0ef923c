// FlashAttention-2 forward on tensor cores (sm80+): one block of 4 warps per (64 query rows,
// query segment); each warp owns 16 rows, keeps its output tile and softmax statistics in
// registers, and runs S = Q K^T and O += P V with mma.sync m16n8k16 (f32 accumulation). K and V
// tiles are double-buffered in shared memory with cp.async; Q stays in shared memory.
//
// Kernels: flash_fwd_{f16,bf16}_{32,64,96,128,256} (the head dim rounded up; columns past the real
// head dim are zero-filled). Dynamic shared memory: flash_fwd_smem(D, BK) bytes (see the Rust side).
#include "flash_fwd.cuh"

#define FLASH_FWD(NAME, T, D, BK)                                                                             \
    extern "C" __global__ void __launch_bounds__(FF_THREADS)                                                  \
        flash_fwd_##NAME##_##D(const T* q, const T* k, const T* v, T* o, float* lse, const long long* qs,     \
                               const long long* ks, const AttnParams p) {                                     \
        flash_fwd<T, D, BK, false>(q, k, v, nullptr, nullptr, o, lse, qs, ks, p);                             \
    }

#define FLASH_FWD_DTYPE(NAME, T) \
    FLASH_FWD(NAME, T, 32, 64)   \
    FLASH_FWD(NAME, T, 64, 64)   \
    FLASH_FWD(NAME, T, 96, 64)   \
    FLASH_FWD(NAME, T, 128, 64)  \
    FLASH_FWD(NAME, T, 256, 32)

FLASH_FWD_DTYPE(f16, __half)
FLASH_FWD_DTYPE(bf16, __nv_bfloat16)
