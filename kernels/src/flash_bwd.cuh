// The FlashAttention-2 backward of flash_bwd.cu as a template (see there), shared with the
// efficient backend's f16/bf16 tensor-core kernels of efficient_tc.cu, which add masks.
#pragma once

#include "fragments.cuh"

#define FB_WARPS 4
#define FB_THREADS (FB_WARPS * 32)
#define FB_BK 64

// With MASK, the efficient backend's masks too (see flash_fwd.cuh).
template <typename T, int D, int BQ, bool MASK>
__device__ void flash_bwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const float* __restrict__ bias, const unsigned char* __restrict__ boolm,
                          const T* __restrict__ dout, const float* __restrict__ lse,
                          const float* __restrict__ delta, float* __restrict__ dq, float* __restrict__ dk,
                          float* __restrict__ dv, const long long* __restrict__ qsegs,
                          const long long* __restrict__ kvsegs, const AttnParams p, int with_dq) {
#if ATTN_HAS_MMA
    constexpr int LDS = D + 8;
    constexpr int LDSS = FB_BK + 8;
    constexpr int NQ = BQ / 8;   // query n-blocks of the transposed score tile
    constexpr int ND = D / 8;    // head-dim n-blocks of dK / dV
    constexpr int QB = BQ / 16;  // 16-row query blocks of the dQ product
    constexpr int NDG = FB_WARPS / QB;  // head-dim groups of the dQ product
    constexpr int DG = D / NDG;
    constexpr int RS = LDS * sizeof(T) / 4;  // row-term stride in floats (see row_term)
    static_assert(DG % 16 == 0, "dQ head-dim groups must be multiples of 16");
    ATTN_DYNAMIC_SMEM(smem_raw);
    T* Ks = reinterpret_cast<T*>(smem_raw);  // [FB_BK][LDS]
    T* Vs = Ks + FB_BK * LDS;                // [FB_BK][LDS]
    T* Qb = Vs + FB_BK * LDS;                // [2][BQ][LDS]: Q tiles, double-buffered
    T* Ob = Qb + 2 * BQ * LDS;               // [2][BQ][LDS]: dO tiles
    T* Ss = Ob + 2 * BQ * LDS;               // dS tile [BQ][LDSS]

    const KvSeg kv = load_kvseg(kvsegs, blockIdx.x);
    const int k0 = (int)blockIdx.y * FB_BK;
    if (k0 >= kv.len) return;
    const int lk = kv.len;
    const bool vec = p.vec_ok != 0;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, tq = lane & 3;
    const int key_a = k0 + warp * 16 + g, key_b = key_a + 8;  // keys of this thread's C rows

    load_tile<T, FB_BK, D, LDS, FB_THREADS>(Ks, k, kv.k, p.k_rs, k0, lk, p.e, vec);
    load_tile<T, FB_BK, D, LDS, FB_THREADS>(Vs, v, kv.v, p.v_rs, k0, lk, p.ev, vec);
    cp_async_commit();

    float dka[ND][4], dva[ND][4];
#pragma unroll
    for (int i = 0; i < ND; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[i][e] = dva[i][e] = 0.0f;

    // Query tiles (mi, r0), each prefetched into the other stage while the block works on the one
    // before it.
    int mi = kv.mem0, r0 = -1;
    const int k1 = min(k0 + FB_BK, lk) - 1;  // the block's last key
    load_qtile<T, BQ, D, LDS, FB_THREADS>(Qb, Ob, q, dout, lse, delta, qsegs, kv.mem1, k0, k1, p, vec, mi, r0);
    for (int stage = 0; mi < kv.mem1; stage ^= 1) {
        cp_async_wait<0>();
        __syncthreads();  // this tile has landed, and every warp is done with the previous one
        const QSeg s = load_qseg(qsegs, mi);
        int next_mi = mi, next_r0 = r0 + BQ;
        load_qtile<T, BQ, D, LDS, FB_THREADS>(Qb + (stage ^ 1) * BQ * LDS, Ob + (stage ^ 1) * BQ * LDS, q, dout,
                                              lse, delta, qsegs, kv.mem1, k0, k1, p, vec, next_mi, next_r0);
        T* Qs = Qb + stage * BQ * LDS;
        T* Os = Ob + stage * BQ * LDS;
        // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x BQ queries.
        float st[NQ][4], dp[NQ][4];
#pragma unroll
        for (int i = 0; i < NQ; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[i][e] = dp[i][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned ak[4], av[4];
            ldmatrix_x4(ak, Ks + (warp * 16 + (lane & 15)) * LDS + kk * 16 + 8 * (lane >> 4));
            ldmatrix_x4(av, Vs + (warp * 16 + (lane & 15)) * LDS + kk * 16 + 8 * (lane >> 4));
#pragma unroll
            for (int nbp = 0; nbp < NQ / 2; ++nbp) {
                const int off = (nbp * 16 + (lane & 7) + 8 * (lane >> 4)) * LDS + kk * 16 + 8 * ((lane >> 3) & 1);
                unsigned b[4];
                ldmatrix_x4(b, Qs + off);
                mma16816<T>(st[2 * nbp], ak, b[0], b[1]);
                mma16816<T>(st[2 * nbp + 1], ak, b[2], b[3]);
                ldmatrix_x4(b, Os + off);
                mma16816<T>(dp[2 * nbp], av, b[0], b[1]);
                mma16816<T>(dp[2 * nbp + 1], av, b[2], b[3]);
            }
        }
        // P, dropout, dS (in place: st <- P o Z, dp <- dS).
        probs_and_grads<NQ, MASK, RS>(st, dp, row_term<T, D, LDS>(Qs, 0), row_term<T, D, LDS>(Os, 0), p, s, bias,
                                      boolm, r0, key_a, key_b, tq, lk);
        // dV += (P o Z)^T dO and dK += dS^T Q (queries are the k dimension).
#pragma unroll
        for (int kb = 0; kb < BQ / 16; ++kb) {
            unsigned ap[4], as[4];
            ap[0] = MmaType<T>::pack(st[2 * kb][0], st[2 * kb][1]);
            ap[1] = MmaType<T>::pack(st[2 * kb][2], st[2 * kb][3]);
            ap[2] = MmaType<T>::pack(st[2 * kb + 1][0], st[2 * kb + 1][1]);
            ap[3] = MmaType<T>::pack(st[2 * kb + 1][2], st[2 * kb + 1][3]);
            as[0] = MmaType<T>::pack(dp[2 * kb][0], dp[2 * kb][1]);
            as[1] = MmaType<T>::pack(dp[2 * kb][2], dp[2 * kb][3]);
            as[2] = MmaType<T>::pack(dp[2 * kb + 1][0], dp[2 * kb + 1][1]);
            as[3] = MmaType<T>::pack(dp[2 * kb + 1][2], dp[2 * kb + 1][3]);
#pragma unroll
            for (int dbp = 0; dbp < ND / 2; ++dbp) {
                const int off = (kb * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDS + dbp * 16 + 8 * (lane >> 4);
                unsigned b[4];
                ldmatrix_x4_trans(b, Os + off);
                mma16816<T>(dva[2 * dbp], ap, b[0], b[1]);
                mma16816<T>(dva[2 * dbp + 1], ap, b[2], b[3]);
                ldmatrix_x4_trans(b, Qs + off);
                mma16816<T>(dka[2 * dbp], as, b[0], b[1]);
                mma16816<T>(dka[2 * dbp + 1], as, b[2], b[3]);
            }
        }
        if (with_dq) {
            // dS to shared memory as [query][key], then dQ += scale dS K.
#pragma unroll
            for (int nb = 0; nb < NQ; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = nb * 8 + 2 * tq + (e & 1);
                    const int kl = warp * 16 + g + (e < 2 ? 0 : 8);
                    Ss[qi * LDSS + kl] = from_f32<T>(dp[nb][e]);
                }
            }
            __syncthreads();
            const int qb = warp % QB, d0 = (warp / QB) * DG;
            unsigned a[FB_BK / 16][4];
#pragma unroll
            for (int kb = 0; kb < FB_BK / 16; ++kb)
                ldmatrix_x4(a[kb], Ss + (qb * 16 + (lane & 15)) * LDSS + kb * 16 + 8 * (lane >> 4));
            const int qrow_a = r0 + qb * 16 + g;
#pragma unroll
            for (int dbp = 0; dbp < DG / 16; ++dbp) {
                float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
                for (int kb = 0; kb < FB_BK / 16; ++kb) {
                    unsigned b[4];
                    ldmatrix_x4_trans(b, Ks + (kb * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDS + d0 + dbp * 16 +
                                             8 * (lane >> 4));
                    mma16816<T>(acc[0], a[kb], b[0], b[1]);
                    mma16816<T>(acc[1], a[kb], b[2], b[3]);
                }
                add_dq(dq, acc, p, s, qrow_a, d0 + dbp * 16, tq);
            }
        }
        mi = next_mi;
        r0 = next_r0;
    }
    cp_async_wait<0>();
    write_kv_grads(dk, dv, dka, dva, p, kv, key_a, key_b, tq);
#else
    __trap();  // flash kernels need sm80+; the launcher refuses older devices
#endif
}

