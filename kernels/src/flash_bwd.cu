// FlashAttention-2 backward on tensor cores (sm80+): one block of 4 warps per (64 keys, key/value
// segment); warp w owns keys 16w..16w+15 and keeps their dK and dV in registers, while the block
// walks the query tiles of every query segment reading this key/value segment (GQA members too)
// whose rows see one of its keys (causal masks, windows). Per query tile it recomputes
// P^T = exp(scale K Q^T - lse) from the forward's logsumexp, then dV += (P o Z)^T dO,
// dP^T = V dO^T, dS^T = P^T o (dP^T o Z - D) (o (1 - tanh^2) through a soft cap),
// dK += scale dS^T Q, and dQ += scale dS K through shared memory, added to an f32 buffer with
// atomics (with_dq = 1) or left to the deterministic eff_dq pass (with_dq = 0). The Q and dO tiles are double-buffered:
// the next tile's cp.async copies (with each row's logsumexp and D, kept in the row's padding)
// land while the block works on this one, so one barrier per tile orders it all (two with dQ).
//
// Kernels: flash_bwd_{f16,bf16}_{32,64,96,128}; head dim 256 uses the efficient backward.
// Inputs: dout contiguous rows of ev in the output row space; lse and delta f32 per output row.
// Outputs (f32, contiguous): dq (accumulated, zeroed by the caller), dk, dv (written once).
#include "flash_bwd.cuh"

#define FLASH_BWD(NAME, T, D, BQ)                                                                              \
    extern "C" __global__ void __launch_bounds__(FB_THREADS) flash_bwd_##NAME##_##D(                           \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, float* dq,    \
        float* dk, float* dv, const long long* qs, const long long* ks, const AttnParams p, int with_dq) {     \
        flash_bwd<T, D, BQ, false>(q, k, v, nullptr, nullptr, dout, lse, delta, dq, dk, dv, qs, ks, p,        \
                                   with_dq);                                                                  \
    }

#define FLASH_BWD_DTYPE(NAME, T) \
    FLASH_BWD(NAME, T, 32, 64)   \
    FLASH_BWD(NAME, T, 64, 64)   \
    FLASH_BWD(NAME, T, 96, 32)   \
    FLASH_BWD(NAME, T, 128, 32)

FLASH_BWD_DTYPE(f16, __half)
FLASH_BWD_DTYPE(bf16, __nv_bfloat16)
