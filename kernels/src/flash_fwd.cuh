// The FlashAttention-2 forward of flash_fwd.cu as a template (see there), shared with the
// efficient backend's f16/bf16 tensor-core kernels of efficient_tc.cu, which add masks.
#pragma once

#include "fragments.cuh"

#define FF_WARPS 4
#define FF_THREADS (FF_WARPS * 32)

// MT: 16-row m-tiles per warp, so BQ = 64 MT query rows per block; each K or V fragment a warp
// reads from shared memory then feeds MT products. STAGES: 2 double-buffers the K and V tiles
// (tile j + 1 lands while the block works on tile j); 1 keeps one K and one V tile and splits
// the pipeline as FlashAttention-2 does (V of tile j lands during S = Q K^T, K of tile j + 1
// during the softmax and P V), for 2 BK (D + 8) 2 bytes less shared memory. Either way two
// barriers per key tile. With MASK, the efficient backend's masks too (p.mask_kind: additive
// bias or boolean, read through masked_score); the flash kernels instantiate it without.
template <typename T, int D, int BK, int MT, int STAGES, bool MASK>
__device__ void flash_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const float* __restrict__ bias, const unsigned char* __restrict__ boolm,
                          T* __restrict__ o, float* __restrict__ lse, const long long* __restrict__ qsegs,
                          const long long* __restrict__ kvsegs, const AttnParams p) {
#if ATTN_HAS_MMA
    static_assert(STAGES == 1 || STAGES == 2, "one or two K/V stages");
    constexpr int LDS = D + 8;  // padded rows: ldmatrix row addresses fall in distinct banks
    constexpr int NB = BK / 8;  // score n-blocks per warp
    constexpr int ND = D / 8;   // output n-blocks per warp
    constexpr int BQ = FF_WARPS * 16 * MT;
    ATTN_DYNAMIC_SMEM(smem_raw);
    T* Qs = reinterpret_cast<T*>(smem_raw);  // [BQ][LDS]
    T* Ks = Qs + BQ * LDS;                   // [STAGES][BK][LDS]
    T* Vs = Ks + STAGES * BK * LDS;          // [STAGES][BK][LDS]

    const QSeg s = load_qseg(qsegs, blockIdx.x);
    const int r0 = (p.tiles - 1 - (int)blockIdx.y) * BQ;  // heavy causal tiles first
    if (r0 < 0 || r0 >= s.len) return;
    const KvSeg kv = load_kvseg(kvsegs, s.kv);
    const int lk = kv.len;
    const int rows = min(BQ, s.len - r0);
    // The tile's rows see keys [kbeg, kend): key tiles [j0, ntiles). Every row sees [kin0, kin1),
    // so a key tile inside it needs no mask (see tile_bounds).
    int j0, ntiles, kin0, kin1;
    tile_bounds<BK>(s, r0, rows, lk, j0, ntiles, kin0, kin1);
    const bool vec = p.vec_ok != 0;
    const bool xform = has_extras(p, s);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, tq = lane & 3;
    // Rows of this thread in m-tile i: row_a + 64 i and row_a + 64 i + 8.
    const int row_a = r0 + warp * 16 + g;

    load_tile<T, BQ, D, LDS, FF_THREADS>(Qs, q, s.q, p.q_rs, r0, s.len, p.e, vec);
    if (j0 < ntiles) {
        const int st = kv_stage<BK, LDS, STAGES>(j0);
        load_tile<T, BK, D, LDS, FF_THREADS>(Ks + st, k, kv.k, p.k_rs, j0 * BK, lk, p.e, vec);
        if (STAGES == 2) load_tile<T, BK, D, LDS, FF_THREADS>(Vs + st, v, kv.v, p.v_rs, j0 * BK, lk, p.ev, vec);
    }
    cp_async_commit();

    float oacc[MT][ND][4], m[MT][2], l[MT][2];
    init_rows(oacc, m, l);

    for (int j = j0; j < ntiles; ++j) {
        const int k0 = j * BK;
        const int st = kv_tile_start<T, BK, D, LDS, FF_THREADS, STAGES>(Ks, Vs, k, v, kv, p, j, ntiles, vec);
        const T* Kt = Ks + st * BK * LDS;
        const T* Vt = Vs + st * BK * LDS;

        // S = Q K^T for the warp's MT x 16 rows; each K fragment feeds MT products.
        float sacc[MT][NB][4];
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int n = 0; n < NB; ++n) sacc[i][n][0] = sacc[i][n][1] = sacc[i][n][2] = sacc[i][n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned a[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i)
                ldmatrix_x4(a[i], Qs + (i * 64 + warp * 16 + (lane & 15)) * LDS + kk * 16 + 8 * (lane >> 4));
#pragma unroll
            for (int nbp = 0; nbp < NB / 2; ++nbp) {
                unsigned b[4];
                ldmatrix_x4(b, Kt + (nbp * 16 + (lane & 7) + 8 * (lane >> 4)) * LDS + kk * 16 + 8 * ((lane >> 3) & 1));
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    mma16816<T>(sacc[i][2 * nbp], a[i], b[0], b[1]);
                    mma16816<T>(sacc[i][2 * nbp + 1], a[i], b[2], b[3]);
                }
            }
        }

        const bool need_mask = (MASK && p.mask_kind != 0) || k0 < kin0 || k0 + BK > kin1;
        finish_scores<MT, NB, MASK>(sacc, p, s, bias, boolm, row_a, k0, tq, lk, need_mask, xform);
        kv_tile_mid<T, BK, D, LDS, FF_THREADS, STAGES>(Ks, k, kv, p, j, ntiles, vec);
        softmax_tiles(sacc, oacc, m, l, p, s, row_a, k0, tq, lk);
        // O += P V: the score accumulators are the A fragments of the next product; each V
        // fragment feeds MT products.
#pragma unroll
        for (int kb = 0; kb < BK / 16; ++kb) {
            unsigned a[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                a[i][0] = MmaType<T>::pack(sacc[i][2 * kb][0], sacc[i][2 * kb][1]);
                a[i][1] = MmaType<T>::pack(sacc[i][2 * kb][2], sacc[i][2 * kb][3]);
                a[i][2] = MmaType<T>::pack(sacc[i][2 * kb + 1][0], sacc[i][2 * kb + 1][1]);
                a[i][3] = MmaType<T>::pack(sacc[i][2 * kb + 1][2], sacc[i][2 * kb + 1][3]);
            }
#pragma unroll
            for (int dbp = 0; dbp < ND / 2; ++dbp) {
                unsigned b[4];
                ldmatrix_x4_trans(b, Vt + (kb * 16 + (lane & 7) + 8 * ((lane >> 3) & 1)) * LDS + dbp * 16 + 8 * (lane >> 4));
#pragma unroll
                for (int i = 0; i < MT; ++i) {
                    mma16816<T>(oacc[i][2 * dbp], a[i], b[0], b[1]);
                    mma16816<T>(oacc[i][2 * dbp + 1], a[i], b[2], b[3]);
                }
            }
        }
        if (STAGES == 2) __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < MT; ++i)
        write_rows<T>(o, lse, oacc[i], m[i], l[i], p, s, row_a + i * 64, row_a + i * 64 + 8, tq);
#else
    __trap();  // flash kernels need sm80+; the launcher refuses older devices
#endif
}
