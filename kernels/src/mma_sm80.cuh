// Tensor-core building blocks for sm80+: mma.sync m16n8k16 (f16/bf16 in, f32 accumulate),
// ldmatrix and cp.async, plus the tile loader shared by the flash kernels.
//
// Fragment layouts (lane = 32-thread lane, g = lane / 4, t = lane % 4):
//   A 16x16 (row-major): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 8+2t..), a3 (g+8, 8+2t..)
//   B 16x8  (k x n):     b0 (k 2t..2t+1, n g), b1 (k 8+2t.., n g)
//   C 16x8:              c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
// Two C tiles side by side (n 0-7 and 8-15) are exactly one A tile of k 0-15, which is how
// probabilities go from the score product into the next product without shared memory.
#pragma once

#include "attn_common.cuh"

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ATTN_HAS_MMA 1
#else
#define ATTN_HAS_MMA 0
#endif

template <typename T>
struct MmaType;
template <>
struct MmaType<__half> {
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&h);
    }
};
template <>
struct MmaType<__nv_bfloat16> {
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<unsigned*>(&h);
    }
};

#ifdef ATTN_EMU
#include "emu_sm80.h"  // the CPU emulator's versions of the primitives below (kernels/emu)
#else
// d += a * b for one m16n8k16 tile.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if ATTN_HAS_MMA
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                        unsigned b1) {
#if ATTN_HAS_MMA
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// d += a * b for one m16n8k8 tile of tf32 operands (registers holding f32 bit patterns whose
// low 13 bits are zero, as cvt.rna.tf32.f32 makes them; see split_tf32 in efficient_tc.cu). Fragments (g = lane / 4, t = lane % 4): A 16x8
// a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); B 8x8 b0 (k t, n g), b1 (k t+4, n g);
// C as for m16n8k16.
__device__ __forceinline__ void mma1688_tf32(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if ATTN_HAS_MMA
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
#if ATTN_HAS_MMA
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
#if ATTN_HAS_MMA
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
#endif
}

// 16-byte asynchronous copy global -> shared; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
#if ATTN_HAS_MMA
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
#endif
}
// 4-byte asynchronous copy global -> shared (through L1); src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
#if ATTN_HAS_MMA
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if ATTN_HAS_MMA
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if ATTN_HAS_MMA
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}
#endif  // ATTN_EMU

// Loads rows [r0, r0 + ROWS) x columns [0, D) of a strided row-major matrix into shared memory
// (row stride LDS elements). Rows >= nrows and columns >= ncols become zero. With `vec` (every row
// start 16-byte aligned and ncols a multiple of 16 bytes' elements: p.vec_ok) it issues cp.async
// copies; otherwise it stores element by element synchronously. Either way the caller commits,
// waits and synchronizes.
template <typename T, int ROWS, int D, int LDS, int THREADS>
__device__ __forceinline__ void load_tile(T* dst, const T* __restrict__ src, long long base, long long rs, int r0,
                                          int nrows, int ncols, bool vec) {
    constexpr int EPC = 16 / (int)sizeof(T);  // elements per 16-byte chunk
    constexpr int CPR = D / EPC;              // chunks per row
    if (vec) {
#pragma unroll
        for (int i = threadIdx.x; i < ROWS * CPR; i += THREADS) {
            int r = i / CPR, c = (i % CPR) * EPC;
            bool ok = (r0 + r < nrows) && (c < ncols);
            const T* g = ok ? src + base + (long long)(r0 + r) * rs + c : src;
            cp_async16(dst + r * LDS + c, g, ok ? 16 : 0);
        }
    } else {
        for (int i = threadIdx.x; i < ROWS * D; i += THREADS) {
            int r = i / D, c = i % D;
            bool ok = (r0 + r < nrows) && (c < ncols);
            dst[r * LDS + c] = ok ? src[base + (long long)(r0 + r) * rs + c] : from_f32<T>(0.0f);
        }
    }
}

// The forwards' K/V pipeline (flash_fwd.cuh, eff_tc_fwd in efficient_tc.cu) over key tiles of BK
// rows of key/value segment kv. STAGES 2: tile j + 1 is prefetched into the other stage while
// tile j is used, and the caller synchronizes after its P V; STAGES 1: one K and one V tile, V of
// tile j lands during Q K^T and K of tile j + 1 during the softmax and P V (kv_tile_mid).
// kv_tile_start runs at the top of iteration j of tiles [j0, ntiles) (the prologue loaded K of
// tile j0, and its V with two stages, into stage j0 & 1: kv_stage) and returns the stage to read.
template <typename T, int BK, int D, int LDS, int THREADS, int STAGES>
__device__ __forceinline__ int kv_tile_start(T* Ks, T* Vs, const T* __restrict__ k, const T* __restrict__ v,
                                             const KvSeg& kv, const AttnParams& p, int j, int ntiles, bool vec) {
    const int k0 = j * BK;
    if (STAGES == 2) {
        const int st = j & 1;
        if (j + 1 < ntiles) {
            load_tile<T, BK, D, LDS, THREADS>(Ks + (st ^ 1) * BK * LDS, k, kv.k, p.k_rs, k0 + BK, kv.len, p.e, vec);
            load_tile<T, BK, D, LDS, THREADS>(Vs + (st ^ 1) * BK * LDS, v, kv.v, p.v_rs, k0 + BK, kv.len, p.ev, vec);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        return st;
    }
    cp_async_wait<0>();
    __syncthreads();  // K of this tile has landed; every warp is done with the last V
    load_tile<T, BK, D, LDS, THREADS>(Vs, v, kv.v, p.v_rs, k0, kv.len, p.ev, vec);
    cp_async_commit();
    return 0;
}

// Offset of key tile j's stage in the K and V tiles. Stages follow the tile's parity rather than
// counting from the first tile, which costs ptxas some 25 registers in the 64-row flash forward.
template <int BK, int LDS, int STAGES>
__device__ __forceinline__ int kv_stage(int j) {
    return STAGES == 2 ? (j & 1) * BK * LDS : 0;
}

// With one stage, between Q K^T and the softmax of tile j: waits for V of tile j and starts K of
// tile j + 1. Nothing with two stages.
template <typename T, int BK, int D, int LDS, int THREADS, int STAGES>
__device__ __forceinline__ void kv_tile_mid(T* Ks, const T* __restrict__ k, const KvSeg& kv, const AttnParams& p,
                                            int j, int ntiles, bool vec) {
    if (STAGES != 1) return;
    cp_async_wait<0>();
    __syncthreads();  // V of this tile has landed; every warp is done with this K
    if (j + 1 < ntiles) {
        load_tile<T, BK, D, LDS, THREADS>(Ks, k, kv.k, p.k_rs, (j + 1) * BK, kv.len, p.e, vec);
        cp_async_commit();
    }
}

// The f32 row term kept in the padding of row r of a shared-memory tile with D used columns
// and rows of LDS elements (the backward keeps each query row's logsumexp and D there).
template <typename T, int D, int LDS>
__device__ __forceinline__ float* row_term(T* tile, int r) {
    static_assert((LDS - D) * sizeof(T) >= sizeof(float) && (D * sizeof(T)) % sizeof(float) == 0,
                  "the row padding must hold an aligned float");
    return reinterpret_cast<float*>(tile + r * LDS + D);
}

// The backward's next query tile for the block's keys [k0, k1]: moves (mi, r0) to the first
// tile with rows at or after it that see one of them (settle_qtile) and, if there is one, loads
// rows [r0, r0 + BQ) of query segment mi of Q (into Qs) and of dO (into Os; dout holds
// contiguous rows of ev in the output row space), each row with its row terms in its padding
// (row_term): the forward's logsumexp (natural log) beside the Q row, D = rowsum(dO o O) beside
// the dO row; rows past the segment are zeros. Issues and commits one cp.async group (element
// stores where rows are not 16-byte aligned); the caller waits and synchronizes.
template <typename T, int BQ, int D, int LDS, int THREADS>
__device__ __forceinline__ void load_qtile(T* Qs, T* Os, const T* __restrict__ q, const T* __restrict__ dout,
                                           const float* __restrict__ lse, const float* __restrict__ delta,
                                           const long long* qsegs, int mem1, int k0, int k1, const AttnParams& p,
                                           bool vec, int& mi, int& r0) {
    settle_qtile(qsegs, mem1, k0, k1, mi, r0);
    if (mi >= mem1) return;
    const QSeg s = load_qseg(qsegs, mi);
    load_tile<T, BQ, D, LDS, THREADS>(Qs, q, s.q, p.q_rs, r0, s.len, p.e, vec);
    load_tile<T, BQ, D, LDS, THREADS>(Os, dout, s.row0 * p.ev, p.ev, r0, s.len, p.ev,
                                      vec && p.ev % (16 / (int)sizeof(T)) == 0);
    for (int i = threadIdx.x; i < BQ; i += THREADS) {
        const bool ok = r0 + i < s.len;
        const long long row = ok ? s.row0 + r0 + i : 0;
        cp_async4(row_term<T, D, LDS>(Qs, i), lse + row, ok ? 4 : 0);
        cp_async4(row_term<T, D, LDS>(Os, i), delta + row, ok ? 4 : 0);
    }
    cp_async_commit();
}
