// Memory-efficient attention on tensor cores (sm80+). f16 and bf16 (end of this file) run the
// flash kernels' templates (flash_fwd.cuh, flash_bwd.cuh) with the efficient backend's masks:
// eff_tc_fwd_{f16,bf16}_{64,128,256} and eff_tc_fwd_r128_{f16,bf16}_{64,128} (the two forward
// tilings of flash_fwd.cu), eff_tc_bwd_{f16,bf16}_{64,128} (head dim 256 keeps the CUDA-core
// backward). f32 has kernels of its own, below.
//
// f32 forward and backward, 3xTF32: every product
// a * b runs as a_big * b_big + a_big * b_small + a_small * b_big on mma.sync m16n8k8 tf32, with
// big and small the two tf32 halves of x (split_tf32), which keeps f32's accuracy (the dropped
// a_small * b_small term is about 2^-22 of the product) at tensor-core speed. Same problems as
// eff_fwd_f32 in efficient.cu (additive or boolean masks, causal masks and windows with tile
// skipping, ALiBi, soft cap, dropout, GQA, strided and packed inputs, q/k and v head dims up to
// the bucket), same outputs (output rows and natural-log row logsumexp), so the efficient
// backward reads either forward's result.
//
// Kernels (D = max(e, ev) rounded up; columns past the real head dims are zero-filled):
//   eff_tc_fwd_f32_{64,128,256}  as flash_fwd: one block of 4 warps per (64 query rows, query
//       segment), each warp owns 16 rows and keeps its output tile and softmax statistics in
//       registers; Q stays in shared memory, K and V tiles are double-buffered with cp.async.
//       Dynamic shared memory (64 + 4 BK) (D + 4) 4 bytes (FwdTiling on the Rust side).
//   eff_tc_fwd_r128_f32_{64,128}  the same with 128 query rows per block (two 16-row m-tiles
//       per warp, so each K or V fragment is read and split once for two products) and one K
//       and one V tile of 32 keys, pipelined as flash_fwd_r128: (128 + 2 BK) (D + 4) 4 bytes,
//       as much as the 64-row kernels; the default past 64 rows (ATTN_OP_CUDA_FWD_ROWS).
//   eff_tc_bwd_f32_{64,128}  as flash_bwd: one block of 4 warps per (64 keys, key/value
//       segment), each warp owns 16 keys and keeps their dK and dV in registers while the block
//       walks the query tiles (BQ rows) of every query segment reading it; dQ by f32 atomics
//       (with_dq = 1) or by the deterministic eff_dq_f32 pass of efficient.cu (with_dq = 0).
//       Q and dO tiles are double-buffered (the next tile's cp.async copies land while the
//       block works on this one), each row's logsumexp and D in its padding (row_term), and dS
//       goes over the dO tile for the dQ product. Dynamic shared memory (128 + 4 BQ) (D + 4) 4
//       bytes (eff_tc_bwd_smem): 101,376 at head dim 128, what sm86/sm89 allow a block.
//       Head dim 256 uses eff_bwd_f32_256.
//
// Shared-memory rows are D + 4 floats (4 mod 32 banks), so the fragment reads fall in 32
// distinct banks: A-operand and K/Q reads (row g, column t) hit bank 4 g + t, and reads of a
// B operand whose k index is a row (row 2 t or 2 t + 1, column g; see the key order below) bank
// 8 t + g (+ 4).
#include "flash_bwd.cuh"
#include "flash_fwd.cuh"

#define ET_WARPS 4
#define ET_THREADS (ET_WARPS * 32)

// x as a tf32 pair (f32 bit patterns with the low 13 bits zero, the tf32 layout cvt.rna.tf32.f32
// produces): big = x rounded to nearest (ties away: what that cvt compiles to, an add and a mask,
// without its test for infinity and NaN, which this rounding leaves infinite or NaN except NaNs
// whose payload is only in the low bits, made infinite: NaN either way once multiplied),
// small = x - big (exact) truncated. Four integer and float operations instead of the seven of
// two cvt.rna; the truncation costs at most 2^-11 of small, about 2^-21 of x.
__device__ __forceinline__ void split_tf32(float x, unsigned& big, unsigned& small) {
    big = (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
    small = __float_as_uint(x - __uint_as_float(big)) & 0xffffe000u;
}

// The A fragment whose a0 is at `a` (row g, k index t), split: a1 is `row8` further (8 rows),
// a2 `k4` further (k index t + 4), a3 both.
__device__ __forceinline__ void split_a(const float* a, int row8, int k4, unsigned (&ab)[4], unsigned (&as)[4]) {
    split_tf32(a[0], ab[0], as[0]);
    split_tf32(a[row8], ab[1], as[1]);
    split_tf32(a[k4], ab[2], as[2]);
    split_tf32(a[row8 + k4], ab[3], as[3]);
}

// The A fragment made of a product's C fragment `c` (columns 2t and 2t + 1 of rows g and g + 8),
// split; k index t stands for column 2t and t + 4 for 2t + 1 (the paired order, see below).
__device__ __forceinline__ void split_c(const float (&c)[4], unsigned (&ab)[4], unsigned (&as)[4]) {
    split_tf32(c[0], ab[0], as[0]);
    split_tf32(c[2], ab[1], as[1]);
    split_tf32(c[1], ab[2], as[2]);
    split_tf32(c[3], ab[3], as[3]);
}

// B's fragment read at `b` (b0, k index t of column g) and `b + k4` (b1, k index t + 4), split.
__device__ __forceinline__ void split_b(const float* b, int k4, unsigned (&bb)[2], unsigned (&bs)[2]) {
    split_tf32(b[0], bb[0], bs[0]);
    split_tf32(b[k4], bb[1], bs[1]);
}

// d += A * B in 3xTF32 (small terms first, then the big product), operands split.
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const unsigned (&ab)[4], const unsigned (&as)[4],
                                           const unsigned (&bb)[2], const unsigned (&bs)[2]) {
    mma1688_tf32(d, as, bb[0], bb[1]);
    mma1688_tf32(d, ab, bs[0], bs[1]);
    mma1688_tf32(d, ab, bb[0], bb[1]);
}

// d += A * B in 3xTF32 with B's fragment read at `b` and `b + k4` and split here (split_b).
__device__ __forceinline__ void mma_3xtf32(float (&d)[4], const unsigned (&ab)[4], const unsigned (&as)[4],
                                           const float* b, int k4) {
    unsigned bb[2], bs[2];
    split_b(b, k4, bb, bs);
    mma_3xtf32(d, ab, as, bb, bs);
}

// MT 16-row m-tiles per warp (BQ = 64 MT query rows per block; each K or V fragment a warp
// reads and splits then feeds MT products) and STAGES of K/V tiles, as flash_fwd (flash_fwd.cuh).
template <int D, int BK, int MT, int STAGES>
__device__ void eff_tc_fwd(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                           const float* __restrict__ bias, const unsigned char* __restrict__ boolm,
                           float* __restrict__ o, float* __restrict__ lse, const long long* __restrict__ qsegs,
                           const long long* __restrict__ kvsegs, const AttnParams p) {
#if ATTN_HAS_MMA
    static_assert(STAGES == 1 || STAGES == 2, "one or two K/V stages");
    constexpr int LDS = D + 4;
    constexpr int NB = BK / 8;  // score n-blocks (and P.V k-steps) per warp
    constexpr int ND = D / 8;   // output n-blocks per warp
    constexpr int BQ = ET_WARPS * 16 * MT;
    ATTN_DYNAMIC_SMEM(smem_raw);
    float* Qs = reinterpret_cast<float*>(smem_raw);  // [BQ][LDS]
    float* Ks = Qs + BQ * LDS;                       // [STAGES][BK][LDS]
    float* Vs = Ks + STAGES * BK * LDS;              // [STAGES][BK][LDS]

    const QSeg s = load_qseg(qsegs, blockIdx.x);
    const int r0 = (p.tiles - 1 - (int)blockIdx.y) * BQ;  // heavy causal tiles first
    if (r0 < 0 || r0 >= s.len) return;
    const KvSeg kv = load_kvseg(kvsegs, s.kv);
    const int lk = kv.len;
    const int rows = min(BQ, s.len - r0);
    int j0, ntiles, kin0, kin1;  // key tiles [j0, ntiles); no mask inside [kin0, kin1) (as flash_fwd)
    tile_bounds<BK>(s, r0, rows, lk, j0, ntiles, kin0, kin1);
    const bool vec = p.vec_ok != 0;
    const bool xform = has_extras(p, s);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, tq = lane & 3;
    const int row_a = r0 + warp * 16 + g;  // this thread's rows in m-tile i: row_a + 64 i (+ 8)

    load_tile<float, BQ, D, LDS, ET_THREADS>(Qs, q, s.q, p.q_rs, r0, s.len, p.e, vec);
    if (j0 < ntiles) {
        const int st = kv_stage<BK, LDS, STAGES>(j0);
        load_tile<float, BK, D, LDS, ET_THREADS>(Ks + st, k, kv.k, p.k_rs, j0 * BK, lk, p.e, vec);
        if (STAGES == 2) load_tile<float, BK, D, LDS, ET_THREADS>(Vs + st, v, kv.v, p.v_rs, j0 * BK, lk, p.ev, vec);
    }
    cp_async_commit();

    float oacc[MT][ND][4], m[MT][2], l[MT][2];
    init_rows(oacc, m, l);
    const float* qa = Qs + (warp * 16 + g) * LDS + tq;  // A fragment of k-step kk, m-tile i: qa[(64 i) LDS + 8 kk]

    for (int j = j0; j < ntiles; ++j) {
        const int k0 = j * BK;
        const int st =
            kv_tile_start<float, BK, D, LDS, ET_THREADS, STAGES>(Ks, Vs, k, v, kv, p, j, ntiles, vec);
        const float* Kt = Ks + st * BK * LDS;
        const float* Vt = Vs + st * BK * LDS;

        // S = Q K^T for the warp's MT x 16 rows; each split K fragment feeds MT products.
        float sacc[MT][NB][4];
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int n = 0; n < NB; ++n) sacc[i][n][0] = sacc[i][n][1] = sacc[i][n][2] = sacc[i][n][3] = 0.0f;
#pragma unroll 4
        for (int kk = 0; kk < D / 8; ++kk) {
            unsigned ab[MT][4], as[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) split_a(qa + i * 64 * LDS + kk * 8, 8 * LDS, 4, ab[i], as[i]);
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
                unsigned bb[2], bs[2];
                split_b(Kt + (nb * 8 + g) * LDS + kk * 8 + tq, 4, bb, bs);
#pragma unroll
                for (int i = 0; i < MT; ++i) mma_3xtf32(sacc[i][nb], ab[i], as[i], bb, bs);
            }
        }

        const bool need_mask = p.mask_kind != 0 || k0 < kin0 || k0 + BK > kin1;
        finish_scores<MT, NB, true>(sacc, p, s, bias, boolm, row_a, k0, tq, lk, need_mask, xform);
        kv_tile_mid<float, BK, D, LDS, ET_THREADS, STAGES>(Ks, k, kv, p, j, ntiles, vec);
        softmax_tiles(sacc, oacc, m, l, p, s, row_a, k0, tq, lk);
        // O += P V. The scores of key block kb sit in the C layout (row g / g + 8, keys 2t and
        // 2t + 1), not in the A layout of m16n8k8 (keys t and t + 4). The sum over keys does not
        // care about their order, so k-index t stands for key 2t and t + 4 for key 2t + 1, and
        // the B fragment reads V's rows in the same order: no shuffles.
#pragma unroll
        for (int kb = 0; kb < NB; ++kb) {
            unsigned ab[MT][4], as[MT][4];
#pragma unroll
            for (int i = 0; i < MT; ++i) split_c(sacc[i][kb], ab[i], as[i]);
            const float* vb = Vt + (kb * 8 + 2 * tq) * LDS + g;
#pragma unroll
            for (int db = 0; db < ND; ++db) {
                unsigned bb[2], bs[2];
                split_b(vb + db * 8, LDS, bb, bs);
#pragma unroll
                for (int i = 0; i < MT; ++i) mma_3xtf32(oacc[i][db], ab[i], as[i], bb, bs);
            }
        }
        if (STAGES == 2) __syncthreads();  // this stage is refilled by the next iteration's prefetch
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < MT; ++i)
        write_rows<float>(o, lse, oacc[i], m[i], l[i], p, s, row_a + i * 64, row_a + i * 64 + 8, tq);
#else
    __trap();  // tensor-core kernels need sm80+; the launcher picks eff_fwd_f32 on older devices
#endif
}

#define EFF_TC_FWD(NAME, D, BK, MT, STAGES)                                                                   \
    extern "C" __global__ void __launch_bounds__(ET_THREADS, 1)                                                \
        NAME(const float* q, const float* k, const float* v, const float* bias, const unsigned char* bm,       \
             float* o, float* lse, const long long* qs, const long long* ks, const AttnParams p) {             \
        eff_tc_fwd<D, BK, MT, STAGES>(q, k, v, bias, bm, o, lse, qs, ks, p);                                  \
    }

EFF_TC_FWD(eff_tc_fwd_f32_64, 64, 32, 1, 2)
EFF_TC_FWD(eff_tc_fwd_f32_128, 128, 32, 1, 2)
EFF_TC_FWD(eff_tc_fwd_f32_256, 256, 16, 1, 2)
EFF_TC_FWD(eff_tc_fwd_r128_f32_64, 64, 32, 2, 1)
EFF_TC_FWD(eff_tc_fwd_r128_f32_128, 128, 32, 2, 1)

// ---- backward ---------------------------------------------------------------------------------

#define EB_BK 64  // keys per block

template <int D, int BQ>
__device__ void eff_tc_bwd(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                           const float* __restrict__ bias, const unsigned char* __restrict__ boolm,
                           const float* __restrict__ dout, const float* __restrict__ lse,
                           const float* __restrict__ delta, float* __restrict__ dq, float* __restrict__ dk,
                           float* __restrict__ dv, const long long* __restrict__ qsegs,
                           const long long* __restrict__ kvsegs, const AttnParams p, int with_dq) {
#if ATTN_HAS_MMA
    constexpr int LDS = D + 4;
    constexpr int NQ = BQ / 8;          // query n-blocks of the transposed score tile
    constexpr int ND = D / 8;           // head-dim n-blocks of dK / dV
    constexpr int QB = BQ / 16;         // 16-row query blocks of the dQ product
    constexpr int NDG = ET_WARPS / QB;  // head-dim groups of the dQ product
    constexpr int DG = D / NDG;
    static_assert(QB * NDG == ET_WARPS && DG % 8 == 0, "dQ work split");
    static_assert(EB_BK <= D, "the dS tile lies over the dO tile's columns");
    ATTN_DYNAMIC_SMEM(smem_raw);
    float* Ks = reinterpret_cast<float*>(smem_raw);  // [EB_BK][LDS]
    float* Vs = Ks + EB_BK * LDS;                    // [EB_BK][LDS]
    float* Qb = Vs + EB_BK * LDS;                    // [2][BQ][LDS]: Q tiles, double-buffered
    float* Ob = Qb + 2 * BQ * LDS;                   // [2][BQ][LDS]: dO tiles (and the dS tile)

    const KvSeg kv = load_kvseg(kvsegs, blockIdx.x);
    const int k0 = (int)blockIdx.y * EB_BK;
    if (k0 >= kv.len) return;
    const int lk = kv.len;
    const bool vec = p.vec_ok != 0;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane >> 2, tq = lane & 3;
    const int key_a = k0 + warp * 16 + g, key_b = key_a + 8;  // keys of this thread's C rows

    load_tile<float, EB_BK, D, LDS, ET_THREADS>(Ks, k, kv.k, p.k_rs, k0, lk, p.e, vec);
    load_tile<float, EB_BK, D, LDS, ET_THREADS>(Vs, v, kv.v, p.v_rs, k0, lk, p.ev, vec);
    cp_async_commit();

    float dka[ND][4], dva[ND][4];
#pragma unroll
    for (int i = 0; i < ND; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[i][e] = dva[i][e] = 0.0f;
    const float* ka = Ks + (warp * 16 + g) * LDS + tq;  // A fragments of the warp's keys
    const float* va = Vs + (warp * 16 + g) * LDS + tq;

    // Query tiles (mi, r0), each prefetched into the other stage while the block works on the one
    // before it (as flash_bwd).
    int mi = kv.mem0, r0 = -1;
    const int k1 = min(k0 + EB_BK, lk) - 1;  // the block's last key
    load_qtile<float, BQ, D, LDS, ET_THREADS>(Qb, Ob, q, dout, lse, delta, qsegs, kv.mem1, k0, k1, p, vec, mi, r0);
    for (int stage = 0; mi < kv.mem1; stage ^= 1) {
        cp_async_wait<0>();
        __syncthreads();  // this tile has landed, and every warp is done with the previous one
        const QSeg s = load_qseg(qsegs, mi);
        int next_mi = mi, next_r0 = r0 + BQ;
        load_qtile<float, BQ, D, LDS, ET_THREADS>(Qb + (stage ^ 1) * BQ * LDS, Ob + (stage ^ 1) * BQ * LDS, q,
                                                  dout, lse, delta, qsegs, kv.mem1, k0, k1, p, vec, next_mi,
                                                  next_r0);
        float* Qs = Qb + stage * BQ * LDS;
        float* Os = Ob + stage * BQ * LDS;
        // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x BQ queries.
        float st[NQ][4], dp[NQ][4];
#pragma unroll
        for (int i = 0; i < NQ; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[i][e] = dp[i][e] = 0.0f;
#pragma unroll 2
        for (int kk = 0; kk < D / 8; ++kk) {
            // K's fragment against the Q tile, then V's against the dO tile (fewer live registers).
#pragma unroll
            for (int w = 0; w < 2; ++w) {
                const float* a = w == 0 ? ka : va;
                const float* bt = w == 0 ? Qs : Os;
                unsigned ab[4], as[4];
                split_a(a + kk * 8, 8 * LDS, 4, ab, as);
#pragma unroll
                for (int nb = 0; nb < NQ; ++nb)
                    mma_3xtf32(w == 0 ? st[nb] : dp[nb], ab, as, bt + (nb * 8 + g) * LDS + kk * 8 + tq, 4);
            }
        }
        // P o Z and dS in place, masks as in the forward.
        probs_and_grads<NQ, true, LDS>(st, dp, row_term<float, D, LDS>(Qs, 0), row_term<float, D, LDS>(Os, 0), p,
                                       s, bias, boolm, r0, key_a, key_b, tq, lk);
        // dV += (P o Z)^T dO and dK += dS^T Q; queries are the k dimension, in the order of
        // the forward's P V (k index t is query 2t of the block, t + 4 is query 2t + 1).
#pragma unroll
        for (int kb = 0; kb < NQ; ++kb) {
#pragma unroll
            for (int w = 0; w < 2; ++w) {
                unsigned ab[4], as[4];
                split_c(w == 0 ? st[kb] : dp[kb], ab, as);
                const float* bt = (w == 0 ? Os : Qs) + (kb * 8 + 2 * tq) * LDS + g;
#pragma unroll
                for (int db = 0; db < ND; ++db)
                    mma_3xtf32(w == 0 ? dva[db] : dka[db], ab, as, bt + db * 8, LDS);
            }
        }
        if (with_dq) {
            // dS to shared memory as [query][key] over the dO tile (its first EB_BK columns,
            // once every warp is done with dV), then dQ += scale dS K: warp (qb, d-group)
            // takes 16 query rows and DG head-dim columns; keys in the same paired order.
            float* Ss = Os;
            __syncthreads();
#pragma unroll
            for (int nb = 0; nb < NQ; ++nb) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int qi = nb * 8 + 2 * tq + (e & 1);
                    Ss[qi * LDS + warp * 16 + g + (e < 2 ? 0 : 8)] = dp[nb][e];
                }
            }
            __syncthreads();
            const int qb = warp % QB, d0 = (warp / QB) * DG;
            float acc[DG / 8][4];
#pragma unroll
            for (int i = 0; i < DG / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
            const float* sa = Ss + (qb * 16 + g) * LDS + 2 * tq;
#pragma unroll 2
            for (int kb = 0; kb < EB_BK / 8; ++kb) {
                unsigned ab[4], as[4];
                split_a(sa + kb * 8, 8 * LDS, 1, ab, as);  // keys 2t, 2t + 1: the paired order
                const float* kbp = Ks + (kb * 8 + 2 * tq) * LDS + d0 + g;
#pragma unroll
                for (int db = 0; db < DG / 8; ++db) mma_3xtf32(acc[db], ab, as, kbp + db * 8, LDS);
            }
            add_dq(dq, acc, p, s, r0 + qb * 16 + g, d0, tq);
        }
        mi = next_mi;
        r0 = next_r0;
    }
    cp_async_wait<0>();
    write_kv_grads(dk, dv, dka, dva, p, kv, key_a, key_b, tq);
#else
    __trap();  // tensor-core kernels need sm80+; the launcher picks eff_bwd_f32 on older devices
#endif
}

#define EFF_TC_BWD(D, BQ)                                                                                       \
    extern "C" __global__ void __launch_bounds__(ET_THREADS, 1) eff_tc_bwd_f32_##D(                                \
        const float* q, const float* k, const float* v, const float* bias, const unsigned char* bm,             \
        const float* dout, const float* lse, const float* delta, float* dq, float* dk, float* dv,               \
        const long long* qs, const long long* ks, const AttnParams p, int with_dq) {                            \
        eff_tc_bwd<D, BQ>(q, k, v, bias, bm, dout, lse, delta, dq, dk, dv, qs, ks, p, with_dq);                 \
    }

EFF_TC_BWD(64, 32)
EFF_TC_BWD(128, 16)

// ---- f16 / bf16: the flash kernels with masks ------------------------------------------------

#define EFF_TC_HALF_FWD(KERNEL, T, D, BK, MT, STAGES, BOUNDS)                                                   \
    extern "C" __global__ void __launch_bounds__ BOUNDS                                                         \
        KERNEL(const T* q, const T* k, const T* v, const float* bias, const unsigned char* bm, T* o, float* lse, \
               const long long* qs, const long long* ks, const AttnParams p) {                                  \
        flash_fwd<T, D, BK, MT, STAGES, true>(q, k, v, bias, bm, o, lse, qs, ks, p);                            \
    }
#define EFF_TC_HALF_BWD(NAME, T, D, BQ)                                                                         \
    extern "C" __global__ void __launch_bounds__(FB_THREADS) eff_tc_bwd_##NAME##_##D(                           \
        const T* q, const T* k, const T* v, const float* bias, const unsigned char* bm, const T* dout,          \
        const float* lse, const float* delta, float* dq, float* dk, float* dv, const long long* qs,             \
        const long long* ks, const AttnParams p, int with_dq) {                                                 \
        flash_bwd<T, D, BQ, true>(q, k, v, bias, bm, dout, lse, delta, dq, dk, dv, qs, ks, p, with_dq);         \
    }
// Tile sizes as the flash kernels' buckets of the same head dim (flash_fwd.cu, flash_bwd.cu),
// both forward tilings up to head dim 128. The 64-row ones at head dims 64 and 128 are held to
// 3 and 2 blocks per SM, what they ran at before windows and the soft cap (at 128 shared memory
// allows no more on sm_90): ptxas otherwise aims higher on sm_90 and spills.
#define EFF_TC_HALF(NAME, T)                                                                 \
    EFF_TC_HALF_FWD(eff_tc_fwd_##NAME##_64, T, 64, 64, 1, 2, (FF_THREADS, 3))                \
    EFF_TC_HALF_FWD(eff_tc_fwd_##NAME##_128, T, 128, 64, 1, 2, (FF_THREADS, 2))              \
    EFF_TC_HALF_FWD(eff_tc_fwd_##NAME##_256, T, 256, 32, 1, 2, (FF_THREADS))                 \
    EFF_TC_HALF_FWD(eff_tc_fwd_r128_##NAME##_64, T, 64, 64, 2, 1, (FF_THREADS))              \
    EFF_TC_HALF_FWD(eff_tc_fwd_r128_##NAME##_128, T, 128, 32, 2, 1, (FF_THREADS))            \
    EFF_TC_HALF_BWD(NAME, T, 64, 64)                                                         \
    EFF_TC_HALF_BWD(NAME, T, 128, 32)

EFF_TC_HALF(f16, __half)
EFF_TC_HALF(bf16, __nv_bfloat16)
