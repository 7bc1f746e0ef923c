// The FlashAttention-2 forward of flash_fwd.cu as a template (see there), shared with the
// efficient backend's f16/bf16 tensor-core kernels of efficient_tc.cu, which add masks.
#pragma once

#include "fragments.cuh"

#define FF_WARPS 4
#define FF_THREADS (FF_WARPS * 32)
#define FF_BQ 64

// With MASK, the efficient backend's masks too (p.mask_kind: additive bias or boolean, read
// through masked_score); the flash kernels instantiate it without.
template <typename T, int D, int BK, bool MASK>
__device__ void flash_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const float* __restrict__ bias, const unsigned char* __restrict__ boolm,
                          T* __restrict__ o, float* __restrict__ lse, const long long* __restrict__ qsegs,
                          const long long* __restrict__ kvsegs, const AttnParams p) {
#if ATTN_HAS_MMA
    constexpr int LDS = D + 8;  // padded rows: ldmatrix row addresses fall in distinct banks
    constexpr int NB = BK / 8;  // score n-blocks per warp
    constexpr int ND = D / 8;   // output n-blocks per warp
    ATTN_DYNAMIC_SMEM(smem_raw);
    T* Qs = reinterpret_cast<T*>(smem_raw);
    T* Ks = Qs + FF_BQ * LDS;      // [2][BK][LDS]
    T* Vs = Ks + 2 * BK * LDS;     // [2][BK][LDS]

    const QSeg s = load_qseg(qsegs, blockIdx.x);
    const int r0 = (p.tiles - 1 - (int)blockIdx.y) * FF_BQ;  // heavy causal tiles first
    if (r0 < 0 || r0 >= s.len) return;
    const KvSeg kv = load_kvseg(kvsegs, s.kv);
    const int lk = kv.len;
    const int rows = min(FF_BQ, s.len - r0);
    const int kend = visible_keys(s, r0 + rows - 1, lk);
    const int ntiles = (kend + BK - 1) / BK;
    const bool vec = p.vec_ok != 0;

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, tq = lane & 3;
    // Rows of this thread in the segment: g and g + 8 of the warp's 16.
    const int row_a = r0 + warp * 16 + g, row_b = row_a + 8;
    const float sl2 = p.scale * 1.4426950408889634f;  // scale * log2(e): softmax in base 2

    load_tile<T, FF_BQ, D, LDS, FF_THREADS>(Qs, q, s.q, p.q_rs, r0, s.len, p.e, vec);
    if (ntiles > 0) {
        load_tile<T, BK, D, LDS, FF_THREADS>(Ks, k, kv.k, p.k_rs, 0, lk, p.e, vec);
        load_tile<T, BK, D, LDS, FF_THREADS>(Vs, v, kv.v, p.v_rs, 0, lk, p.ev, vec);
    }
    cp_async_commit();

    float oacc[ND][4];
#pragma unroll
    for (int i = 0; i < ND; ++i) oacc[i][0] = oacc[i][1] = oacc[i][2] = oacc[i][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    for (int j = 0; j < ntiles; ++j) {
        const int k0 = j * BK;
        const int st = j & 1;
        if (j + 1 < ntiles) {
            T* kn = Ks + (st ^ 1) * BK * LDS;
            T* vn = Vs + (st ^ 1) * BK * LDS;
            load_tile<T, BK, D, LDS, FF_THREADS>(kn, k, kv.k, p.k_rs, k0 + BK, lk, p.e, vec);
            load_tile<T, BK, D, LDS, FF_THREADS>(vn, v, kv.v, p.v_rs, k0 + BK, lk, p.ev, vec);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const T* Kt = Ks + st * BK * LDS;
        const T* Vt = Vs + st * BK * LDS;

        // S = Q K^T for the warp's 16 rows.
        float sacc[NB][4];
#pragma unroll
        for (int i = 0; i < NB; ++i) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned a[4];
            ldmatrix_x4(a, Qs + (warp * 16 + (lane & 15)) * LDS + kk * 16 + 8 * (lane >> 4));
#pragma unroll
            for (int nbp = 0; nbp < NB / 2; ++nbp) {
                unsigned b[4];
                ldmatrix_x4(b, Kt + (nbp * 16 + (lane & 7) + 8 * (lane >> 4)) * LDS + kk * 16 + 8 * ((lane >> 3) & 1));
                mma16816<T>(sacc[2 * nbp], a, b[0], b[1]);
                mma16816<T>(sacc[2 * nbp + 1], a, b[2], b[3]);
            }
        }

        // Scale to base 2, mask the tail and the causal diagonal (tile-uniform test first).
        const bool need_mask = (MASK && p.mask_kind != 0) || (k0 + BK > lk) ||
                               (s.causal && (long long)k0 + BK - 1 > (long long)r0 + s.coff);
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = sacc[nb][e] * sl2;
                if (need_mask) {
                    int col = k0 + nb * 8 + 2 * tq + (e & 1);
                    int row = e < 2 ? row_a : row_b;
                    if (MASK) {
                        x = masked_score(p, s, bias, boolm, sacc[nb][e], row, col, lk) * 1.4426950408889634f;
                    } else if (col >= lk || (s.causal && (long long)col > (long long)row + s.coff)) {
                        x = -INFINITY;
                    }
                }
                sacc[nb][e] = x;
            }
        }
        online_softmax(sacc, oacc, m, l);
        if (p.dropout) drop_probs(sacc, p, s, row_a, row_b, k0, tq, lk);
        // O += P V: the score accumulators are the A fragments of the next product.
#pragma unroll
        for (int kb = 0; kb < BK / 16; ++kb) {
            unsigned a[4];
            a[0] = MmaType<T>::pack(sacc[2 * kb][0], sacc[2 * kb][1]);
            a[1] = MmaType<T>::pack(sacc[2 * kb][2], sacc[2 * kb][3]);
            a[2] = MmaType<T>::pack(sacc[2 * kb + 1][0], sacc[2 * kb + 1][1]);
            a[3] = MmaType<T>::pack(sacc[2 * kb + 1][2], sacc[2 * kb + 1][3]);
#pragma unroll
            for (int dbp = 0; dbp < ND / 2; ++dbp) {
                unsigned b[4];
                ldmatrix_x4_trans(b, Vt + (kb * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDS + dbp * 16 + 8 * (lane >> 4));
                mma16816<T>(oacc[2 * dbp], a, b[0], b[1]);
                mma16816<T>(oacc[2 * dbp + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }
    cp_async_wait<0>();

    write_rows<T>(o, lse, oacc, m, l, p, s, row_a, row_b, tq);
#else
    __trap();  // flash kernels need sm80+; the launcher refuses older devices
#endif
}

