// What the tensor-core kernels (flash_fwd.cuh, flash_bwd.cuh, efficient_tc.cu) do to a warp's
// mma C fragments besides the products: online softmax, dropout, the output rows, the
// backward's probabilities and their gradients, and the gradient writes. A C fragment
// acc[n][e] of n-block n holds row g (e < 2) or g + 8 and column 8 n + 2 t + (e & 1)
// (g = lane / 4, t = lane % 4, see mma_sm80.cuh).
#pragma once

#include "mma_sm80.cuh"

// The scores of key tile k0 for a warp's MT m-tiles (rows row_a + 64 i and row_a + 64 i + 8 of
// segment s), raw products in, base 2 out: scaled (with the soft cap and ALiBi when `xform`),
// and with `need_mask` (tile-uniform: the tile is not inside every row's keys, or a mask is
// on) -inf outside each row's keys and, with MASK, the efficient backend's mask added.
template <int MT, int NB, bool MASK>
__device__ __forceinline__ void finish_scores(float (&sacc)[MT][NB][4], const AttnParams& p, const QSeg& s,
                                              const float* __restrict__ bias, const unsigned char* __restrict__ boolm,
                                              int row_a, int k0, int tq, int lk, bool need_mask, bool xform) {
    const float log2e = 1.4426950408889634f;
    const int c0 = k0 + 2 * tq;  // element (nb, e) is column c0 + 8 nb + (e & 1)
    if (xform) {
#pragma unroll
        for (int i = 0; i < MT; ++i) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const float dist = (float)(row_a + i * 64 + 8 * h + s.diag - c0);
#pragma unroll
                for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                    for (int e = 2 * h; e < 2 * h + 2; ++e) {
                        float t;
                        sacc[i][nb][e] = extras_score(p, s.slope, sacc[i][nb][e], dist - (float)(nb * 8 + (e & 1)), t);
                    }
                }
            }
        }
    }
    const float mul = xform ? log2e : p.scale * log2e;
    if (!need_mask) {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int nb = 0; nb < NB; ++nb)
#pragma unroll
                for (int e = 0; e < 4; ++e) sacc[i][nb][e] *= mul;
        return;
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = row_a + i * 64 + 8 * h;
            const Span keys = row_span(s, row, lk, c0);
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
                for (int e = 2 * h; e < 2 * h + 2; ++e) {
                    const int c = nb * 8 + (e & 1);
                    float x = sacc[i][nb][e] * mul;
                    if (!keys.has(c)) {
                        x = -INFINITY;
                    } else if (MASK && p.mask_kind != 0) {
                        const long long off = s.mask + (long long)row * p.mask_rs + (long long)(c0 + c) * p.mask_cs;
                        x += mask_term(p, bias, boolm, off) * log2e;
                    }
                    sacc[i][nb][e] = x;
                }
            }
        }
    }
}

// Online softmax of one key tile: the scores of the warp's rows in `sacc` (base 2, -inf where
// masked) become probabilities; the running maximum `m`, the per-thread partial sums `l` and
// the output accumulators `oacc` of rows h = 0 (g) and h = 1 (g + 8) are rescaled. The 4 lanes
// of a quad share a row.
template <int NB, int ND>
__device__ __forceinline__ void online_softmax(float (&sacc)[NB][4], float (&oacc)[ND][4], float (&m)[2],
                                               float (&l)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float mx = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) mx = fmaxf(mx, fmaxf(sacc[nb][2 * h], sacc[nb][2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[h], mx);
        if (m_new == -INFINITY) {
#pragma unroll
            for (int nb = 0; nb < NB; ++nb) sacc[nb][2 * h] = sacc[nb][2 * h + 1] = 0.0f;
            continue;
        }
        const float alpha = exp2f(m[h] - m_new);
        float sum = 0.0f;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
            float a0 = exp2f(sacc[nb][2 * h] - m_new), a1 = exp2f(sacc[nb][2 * h + 1] - m_new);
            sacc[nb][2 * h] = a0;
            sacc[nb][2 * h + 1] = a1;
            sum += a0 + a1;
        }
        l[h] = l[h] * alpha + sum;  // per-thread partial sum; the quad adds them up at the end
        m[h] = m_new;
#pragma unroll
        for (int nb = 0; nb < ND; ++nb) {
            oacc[nb][2 * h] *= alpha;
            oacc[nb][2 * h + 1] *= alpha;
        }
    }
}

// Zeroes the output accumulators and starts the softmax statistics of a warp's MT m-tiles.
template <int MT, int ND>
__device__ __forceinline__ void init_rows(float (&oacc)[MT][ND][4], float (&m)[MT][2], float (&l)[MT][2]) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
        for (int n = 0; n < ND; ++n) oacc[i][n][0] = oacc[i][n][1] = oacc[i][n][2] = oacc[i][n][3] = 0.0f;
        m[i][0] = m[i][1] = -INFINITY;
        l[i][0] = l[i][1] = 0.0f;
    }
}

// Dropout on the probabilities of key tile k0 that multiply V (the normalizer keeps the
// undropped ones); rows row_a (h = 0) and row_b of segment s.
template <int NB>
__device__ __forceinline__ void drop_probs(float (&sacc)[NB][4], const AttnParams& p, const QSeg& s, int row_a,
                                           int row_b, int k0, int tq, int lk) {
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        const int col = k0 + nb * 8 + 2 * tq;  // even: col and col + 1 share a Philox block
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = h == 0 ? row_a : row_b;
            if (row < s.len && col < lk) {
                uint4 w = dropout_block(p, s.stream, row, col);
                sacc[nb][2 * h] *= word_of(w, col & 3) >= p.threshold ? p.keep_scale : 0.0f;
                sacc[nb][2 * h + 1] *= word_of(w, (col & 3) + 1) >= p.threshold ? p.keep_scale : 0.0f;
            }
        }
    }
}

// online_softmax and, with dropout, drop_probs for each of a warp's MT m-tiles of key tile k0;
// m-tile i holds rows row_a + 64 i and row_a + 64 i + 8 of segment s.
template <int MT, int NB, int ND>
__device__ __forceinline__ void softmax_tiles(float (&sacc)[MT][NB][4], float (&oacc)[MT][ND][4], float (&m)[MT][2],
                                              float (&l)[MT][2], const AttnParams& p, const QSeg& s, int row_a,
                                              int k0, int tq, int lk) {
#pragma unroll
    for (int i = 0; i < MT; ++i) {
        online_softmax(sacc[i], oacc[i], m[i], l[i]);
        if (p.dropout) drop_probs(sacc[i], p, s, row_a + i * 64, row_a + i * 64 + 8, k0, tq, lk);
    }
}

// Normalizes the output accumulators of rows row_a and row_b and writes them with their
// natural-log logsumexp (+inf, and a zero row, for a row that saw no key).
template <typename T, int ND>
__device__ __forceinline__ void write_rows(T* __restrict__ o, float* __restrict__ lse, const float (&oacc)[ND][4],
                                           const float (&m)[2], const float (&l)[2], const AttnParams& p,
                                           const QSeg& s, int row_a, int row_b, int tq) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float lt = l[h];
        lt += __shfl_xor_sync(0xffffffffu, lt, 1);
        lt += __shfl_xor_sync(0xffffffffu, lt, 2);
        const int row = h == 0 ? row_a : row_b;
        if (row >= s.len) continue;
        const long long orow = s.row0 + row;
        const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
#pragma unroll
        for (int nb = 0; nb < ND; ++nb) {
            const int col = nb * 8 + 2 * tq;
            if (col < p.ev) o[orow * p.ev + col] = from_f32<T>(oacc[nb][2 * h] * inv);
            if (col + 1 < p.ev) o[orow * p.ev + col + 1] = from_f32<T>(oacc[nb][2 * h + 1] * inv);
        }
        if (tq == 0) lse[orow] = lt > 0.0f ? (m[h] + log2f(lt)) * 0.6931471805599453f : INFINITY;
    }
}

// The dropout decisions of the backward's transposed tile (see probs_and_grads): bit 4 nb + e
// set when element (nb, e) is kept, for elements a key's `rows` span has (the others have no
// probability). One pass shared by both of probs_and_grads' loops, so the Philox rounds are
// compiled once.
template <int NQ>
__device__ __forceinline__ unsigned dropout_bits(const AttnParams& p, const QSeg& s, int r0, int key_a, int key_b,
                                                 int tq, const Span (&rows)[2]) {
    static_assert(NQ * 4 <= 32, "one bit per element");
    unsigned keep = 0;
#pragma unroll
    for (int nb = 0; nb < NQ; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = nb * 8 + (e & 1);
            if (rows[e >> 1].has(c)) {
                const int key = e < 2 ? key_a : key_b;
                const unsigned w = word_of(dropout_block(p, s.stream, r0 + 2 * tq + c, key), key & 3);
                keep |= (w >= p.threshold ? 1u : 0u) << (nb * 4 + e);
            }
        }
    }
    return keep;
}

// probs_and_grads' per-element loop. XFORM: with the soft cap and ALiBi, done first in place
// (so that no value lives from one loop to the other): the scores become extras_score's, and
// dp the soft cap's 1 - t^2 times dP o Z - D, which the main loop then only multiplies by P.
template <int NQ, bool MASK, int RS, bool XFORM>
__device__ __forceinline__ void probs_and_grads_loop(float (&st)[NQ][4], float (&dp)[NQ][4], const float* lse_s,
                                                     const float* dl_s, const AttnParams& p, const QSeg& s,
                                                     const float* __restrict__ bias,
                                                     const unsigned char* __restrict__ boolm, int r0, int key_a,
                                                     int key_b, int tq, const Span (&rows)[2], unsigned keep) {
    const float log2e = 1.4426950408889634f;
    const float zk = p.dropout ? p.keep_scale : 1.0f;
    const int c0 = r0 + 2 * tq;  // element (nb, e) is query c0 + 8 nb + (e & 1)
    if (XFORM) {
#pragma unroll
        for (int nb = 0; nb < NQ; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c = nb * 8 + (e & 1);
                const int key = e < 2 ? key_a : key_b;
                const float z = (keep >> (nb * 4 + e)) & 1u ? zk : 0.0f;
                float t;
                st[nb][e] = extras_score(p, s.slope, st[nb][e], (float)(c0 + c + s.diag - key), t);
                dp[nb][e] = (dp[nb][e] * z - dl_s[(2 * tq + c) * RS]) * (1.0f - t * t);
            }
        }
    }
#pragma unroll
    for (int nb = 0; nb < NQ; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int c = nb * 8 + (e & 1);
            const int qi = 2 * tq + c;
            const int key = e < 2 ? key_a : key_b;
            const bool in = rows[e >> 1].has(c);
            float y = XFORM ? st[nb][e] : st[nb][e] * p.scale;
            if (MASK && in && p.mask_kind != 0)
                y += mask_term(p, bias, boolm, s.mask + (long long)(c0 + c) * p.mask_rs + (long long)key * p.mask_cs);
            const float pr = in ? exp2f((y - lse_s[qi * RS]) * log2e) : 0.0f;
            const float z = (keep >> (nb * 4 + e)) & 1u ? zk : 0.0f;
            st[nb][e] = pr * z;
            dp[nb][e] = XFORM ? pr * dp[nb][e] : pr * (dp[nb][e] * z - dl_s[qi * RS]);
        }
    }
}

// Backward, transposed tile (rows: the warp's keys key_a and key_b; columns: queries r0 + 8 n +
// 2 t + (e & 1) of segment s): the raw scores `st` and dP^T = V dO^T in `dp` become P o Z and
// dS = P o (dP o Z - D) (o (1 - tanh^2) through a soft cap), from the row logsumexp (natural
// log) and D of query tile row i at lse_s[i RS] and dl_s[i RS]. Each key's visible queries are
// found once (key_span); with MASK the efficient backend's masks apply too.
template <int NQ, bool MASK, int RS>
__device__ __forceinline__ void probs_and_grads(float (&st)[NQ][4], float (&dp)[NQ][4], const float* lse_s,
                                                const float* dl_s, const AttnParams& p, const QSeg& s,
                                                const float* __restrict__ bias, const unsigned char* __restrict__ boolm,
                                                int r0, int key_a, int key_b, int tq, int lk) {
    const Span rows[2] = {key_span(s, key_a, lk, r0 + 2 * tq), key_span(s, key_b, lk, r0 + 2 * tq)};
    const unsigned keep = p.dropout ? dropout_bits<NQ>(p, s, r0, key_a, key_b, tq, rows) : ~0u;
    if (has_extras(p, s))
        probs_and_grads_loop<NQ, MASK, RS, true>(st, dp, lse_s, dl_s, p, s, bias, boolm, r0, key_a, key_b, tq, rows,
                                                 keep);
    else
        probs_and_grads_loop<NQ, MASK, RS, false>(st, dp, lse_s, dl_s, p, s, bias, boolm, r0, key_a, key_b, tq, rows,
                                                  keep);
}

// dQ += scale acc for a 16-row block (rows qrow_a, qrow_a + 8 of segment s) and N n-blocks whose
// columns start at col0 + 8 n, by f32 atomics; zeros are skipped.
template <int N>
__device__ __forceinline__ void add_dq(float* __restrict__ dq, const float (&acc)[N][4], const AttnParams& p,
                                       const QSeg& s, int qrow_a, int col0, int tq) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = qrow_a + (e < 2 ? 0 : 8);
            const int col = col0 + n * 8 + 2 * tq + (e & 1);
            if (row < s.len && col < p.e && acc[n][e] != 0.0f)
                atomicAdd(&dq[(s.row0 + row) * p.e + col], acc[n][e] * p.scale);
        }
    }
}

// Writes dK (scaled) and dV of the warp's keys key_a and key_b.
template <int ND>
__device__ __forceinline__ void write_kv_grads(float* __restrict__ dk, float* __restrict__ dv,
                                               const float (&dka)[ND][4], const float (&dva)[ND][4],
                                               const AttnParams& p, const KvSeg& kv, int key_a, int key_b, int tq) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int key = h == 0 ? key_a : key_b;
        if (key >= kv.len) continue;
        const long long krow = kv.row0 + key;
#pragma unroll
        for (int nb = 0; nb < ND; ++nb) {
#pragma unroll
            for (int x = 0; x < 2; ++x) {
                const int col = nb * 8 + 2 * tq + x;
                if (col < p.e) dk[krow * p.e + col] = dka[nb][2 * h + x] * p.scale;
                if (col < p.ev) dv[krow * p.ev + col] = dva[nb][2 * h + x];
            }
        }
    }
}
