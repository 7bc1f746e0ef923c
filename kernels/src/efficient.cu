// Memory-efficient attention (xformers-style) without tensor-core instructions: f32, f16 and bf16
// inputs, f32 arithmetic, additive or boolean masks, any head dim up to 256, causal masks and
// sliding windows with tile skipping, ALiBi, logit soft-capping, dropout, GQA, strided and packed
// inputs. Runs on every architecture the toolkit targets.
//
// Kernels (DT in f32/f16/bf16, DMAX in 64/128/256: the head dims rounded up):
//   eff_fwd_DT_DMAX   one block per (32 query rows, query segment): output and row logsumexp
//   eff_bwd_DT_DMAX   one block per (32 keys, key/value segment): dK, dV, and dQ by f32 atomics
//   eff_dq_DT_DMAX    one block per (32 query rows, query segment): dQ without atomics (deterministic)
//   attn_delta_DT     D_i = dO_i . O_i for the backward passes
// Launch: 128 threads; thread t owns row t / 4 of its tile and columns (t % 4) + 4 j.
#include "attn_common.cuh"

#define EF_THREADS 128
#define EF_ROWS 32   // query rows (forward, dq) or keys (backward) per block
#define EF_CH 64     // head-dim chunk staged in shared memory
#define EF_LD (EF_CH + 1)

// Loads rows [r0, r0 + EF_ROWS) x columns [c0, c0 + EF_CH) of a row-major strided matrix into
// `dst` (stride EF_LD) as f32; rows >= nrows and columns >= ncols read as zero.
template <typename T>
__device__ __forceinline__ void load_chunk(float* dst, const T* src, long long base, long long rs, int r0, int nrows,
                                           int c0, int ncols) {
    for (int i = threadIdx.x; i < EF_ROWS * EF_CH; i += EF_THREADS) {
        int r = i / EF_CH, c = i % EF_CH;
        float x = 0.0f;
        if (r0 + r < nrows && c0 + c < ncols) x = to_f32<T>(src[base + (long long)(r0 + r) * rs + c0 + c]);
        dst[r * EF_LD + c] = x;
    }
}

// acc[i] += A[row] . B[c4 + 4 i] over one staged chunk (both EF_ROWS x EF_CH, stride EF_LD).
__device__ __forceinline__ void chunk_dots(float (&acc)[8], const float* A, const float* B, int row, int c4) {
#pragma unroll 4
    for (int d = 0; d < EF_CH; ++d) {
        float a = A[row * EF_LD + d];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += a * B[(c4 + 4 * i) * EF_LD + d];
    }
}

// S[row][c4 + 4 i] = A-tile . B-tile over the whole head dim `e`, chunk by chunk.
template <typename T>
__device__ __forceinline__ void tile_dots(float (&acc)[8], float* As, float* Bs, const T* a, long long a_base,
                                          long long a_rs, int a_r0, int a_rows, const T* b, long long b_base,
                                          long long b_rs, int b_r0, int b_rows, int e, int row, int c4) {
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    for (int c0 = 0; c0 < e; c0 += EF_CH) {
        __syncthreads();
        load_chunk<T>(As, a, a_base, a_rs, a_r0, a_rows, c0, e);
        load_chunk<T>(Bs, b, b_base, b_rs, b_r0, b_rows, c0, e);
        __syncthreads();
        chunk_dots(acc, As, Bs, row, c4);
    }
}

// ---- forward --------------------------------------------------------------------------------

template <typename T, int DMAX>
__device__ void eff_fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const float* __restrict__ bias, const unsigned char* __restrict__ boolm, T* __restrict__ o,
                        float* __restrict__ lse, const long long* __restrict__ qsegs,
                        const long long* __restrict__ kvsegs, const AttnParams p) {
    __shared__ float As[EF_ROWS * EF_LD];
    __shared__ float Bs[EF_ROWS * EF_LD];
    __shared__ float Ps[EF_ROWS * (EF_ROWS + 1)];
    const QSeg s = load_qseg(qsegs, blockIdx.x);
    const int r0 = (p.tiles - 1 - (int)blockIdx.y) * EF_ROWS;  // heavy (late causal) tiles first
    if (r0 < 0 || r0 >= s.len) return;
    const KvSeg kv = load_kvseg(kvsegs, s.kv);
    const int row = threadIdx.x >> 2, c4 = threadIdx.x & 3;
    const int grow = r0 + row;
    const int rows = min(EF_ROWS, s.len - r0);
    // The tile's rows see keys [kbeg, kend) (a window starts past key 0; when some rows see none,
    // kbeg may pass kend and the loop run over a tile no row sees, harmlessly). The tiles start
    // on multiples of EF_ROWS, which ptxas needs to stay within 72 registers at head dim 64.
    const int kbeg = first_key(s, r0, kv.len), kend = key_end(s, r0 + rows - 1, kv.len);
    // This thread's row sees keys [kf, ke).
    const int kf = first_key(s, grow, kv.len), ke = grow < s.len ? key_end(s, grow, kv.len) : 0;
    const bool xform = has_extras(p, s);
    constexpr int NJ = DMAX / 4;
    float acc[NJ];
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[j] = 0.0f;
    float m = -INFINITY, l = 0.0f;

    for (int k0 = kbeg / EF_ROWS * EF_ROWS; k0 < kend; k0 += EF_ROWS) {
        float sc[8];
        tile_dots<T>(sc, As, Bs, q, s.q, p.q_rs, r0, s.len, k, kv.k, p.k_rs, k0, kv.len, p.e, row, c4);
        if (xform) extras_pass(sc, p, s, grow + s.diag - k0 - c4, 4);
        const float mul = xform ? 1.0f : p.scale;
        float tmax = -INFINITY;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int col = k0 + c4 + 4 * i;
            sc[i] = masked_score(p, s, bias, boolm, sc[i], mul, grow, col, col >= kf && col < ke);
            tmax = fmaxf(tmax, sc[i]);
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
        const float m_new = fmaxf(m, tmax);
        float alpha = 1.0f, sum = 0.0f;
        if (m_new == -INFINITY) {
#pragma unroll
            for (int i = 0; i < 8; ++i) sc[i] = 0.0f;
        } else {
            alpha = expf(m - m_new);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                sc[i] = expf(sc[i] - m_new);
                sum += sc[i];
            }
        }
        // Every lane shuffles (rows without a visible key add zeros): a full-mask shuffle
        // inside the branch above would leave out the lanes of such rows.
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        if (m_new != -INFINITY) {
            l = l * alpha + sum;
            m = m_new;
            if (p.dropout && grow < s.len) {
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    int col = k0 + c4 + 4 * i;
                    if (col < kend) sc[i] *= dropout_factor(p, s.stream, grow, col);
                }
            }
        }
        __syncthreads();  // everyone is done with As/Bs of the score pass and Ps of the last tile
#pragma unroll
        for (int i = 0; i < 8; ++i) Ps[row * (EF_ROWS + 1) + c4 + 4 * i] = sc[i];
        if (alpha != 1.0f) {
#pragma unroll
            for (int j = 0; j < NJ; ++j) acc[j] *= alpha;
        }
        // O += P V, V staged chunk by chunk of head-dim columns.
#pragma unroll
        for (int cb = 0; cb < DMAX / EF_CH; ++cb) {
            if (cb * EF_CH < p.ev) {
                __syncthreads();
                load_chunk<T>(As, v, kv.v, p.v_rs, k0, kend, cb * EF_CH, p.ev);
                __syncthreads();
#pragma unroll
                for (int jj = 0; jj < EF_CH / 4; ++jj) {
                    float x = 0.0f;
#pragma unroll 8
                    for (int kk = 0; kk < EF_ROWS; ++kk) x += Ps[row * (EF_ROWS + 1) + kk] * As[kk * EF_LD + c4 + 4 * jj];
                    acc[cb * (EF_CH / 4) + jj] += x;
                }
            }
        }
    }
    if (grow < s.len) {
        const long long orow = s.row0 + grow;
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            int d = c4 + 4 * j;
            if (d < p.ev) o[orow * p.ev + d] = from_f32<T>(l > 0.0f ? acc[j] * inv : 0.0f);
        }
        if (c4 == 0) lse[orow] = l > 0.0f ? m + logf(l) : INFINITY;
    }
}

// ---- backward: dK, dV (and dQ by atomics) per key tile ---------------------------------------

// Probabilities and their gradients of a (key tile, query tile) pair, thread (key kr, queries
// c4 + 4 i): P (undropped), PZ = P * dropout and dS = P * (dP * Z - D).
template <typename T>
__device__ __forceinline__ void probs_and_grads(float (&pz)[8], float (&ds)[8], float* As, float* Bs,
                                                const T* q, const T* k, const T* v, const T* dout,
                                                const float* bias, const unsigned char* boolm, const float* lse,
                                                const float* delta, const QSeg& s, const KvSeg& kv, int k0, int r0,
                                                int rf, int re, const AttnParams& p, int kr, int c4) {
    float sc[8], dp[8];
    // S^T: keys are the A rows, queries the B rows.
    tile_dots<T>(sc, As, Bs, k, kv.k, p.k_rs, k0, kv.len, q, s.q, p.q_rs, r0, s.len, p.e, kr, c4);
    // dP^T = V dO^T; dO is contiguous in the row space (row stride ev).
    tile_dots<T>(dp, As, Bs, v, kv.v, p.v_rs, k0, kv.len, dout, s.row0 * p.ev, p.ev, r0, s.len, p.ev, kr, c4);
    const int col = k0 + kr;
    const bool xform = has_extras(p, s);
    float g[8];
    if (xform) extras_pass(sc, g, p, s, r0 + c4 + s.diag - col, -4);
    const float mul = xform ? 1.0f : p.scale;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        int row = r0 + c4 + 4 * i;
        float x = masked_score(p, s, bias, boolm, sc[i], mul, row, col, row >= rf && row < re);
        float pr = 0.0f, dd = 0.0f;
        if (x != -INFINITY) {
            pr = expf(x - lse[s.row0 + row]);
            dd = delta[s.row0 + row];
        }
        float z = (p.dropout && pr != 0.0f) ? dropout_factor(p, s.stream, row, col) : 1.0f;
        pz[i] = pr * z;
        ds[i] = pr * (dp[i] * z - dd);
        if (xform) ds[i] *= g[i];  // through the soft cap
    }
}

template <typename T, int DMAX>
__device__ void eff_bwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const float* __restrict__ bias, const unsigned char* __restrict__ boolm,
                        const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                        float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,
                        const long long* __restrict__ qsegs, const long long* __restrict__ kvsegs,
                        const AttnParams p, int with_dq) {
    __shared__ float As[EF_ROWS * EF_LD];
    __shared__ float Bs[EF_ROWS * EF_LD];
    __shared__ float PZs[EF_ROWS * (EF_ROWS + 1)];  // [query][key]
    __shared__ float DSs[EF_ROWS * (EF_ROWS + 1)];  // [query][key]
    const KvSeg kv = load_kvseg(kvsegs, blockIdx.x);
    const int k0 = (int)blockIdx.y * EF_ROWS;
    if (k0 >= kv.len) return;
    const int kr = threadIdx.x >> 2, c4 = threadIdx.x & 3;
    constexpr int NJ = DMAX / 4;
    float dka[NJ], dva[NJ];
#pragma unroll
    for (int j = 0; j < NJ; ++j) dka[j] = dva[j] = 0.0f;

    for (int mi = kv.mem0; mi < kv.mem1; ++mi) {
        const QSeg s = load_qseg(qsegs, mi);
        // Query tiles with rows that see a key of [k0, min(k0 + EF_ROWS, lk)); rows [rf, re)
        // see this thread's key.
        const int rend = row_end_seeing(s, min(k0 + EF_ROWS, kv.len) - 1);
        const int rf = first_row_seeing(s, k0 + kr), re = k0 + kr < kv.len ? row_end_seeing(s, k0 + kr) : 0;
        for (int r0 = first_row_seeing(s, k0); r0 < rend; r0 += EF_ROWS) {
            float pz[8], ds[8];
            probs_and_grads<T>(pz, ds, As, Bs, q, k, v, dout, bias, boolm, lse, delta, s, kv, k0, r0, rf, re, p, kr,
                               c4);
            __syncthreads();
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                PZs[(c4 + 4 * i) * (EF_ROWS + 1) + kr] = pz[i];
                DSs[(c4 + 4 * i) * (EF_ROWS + 1) + kr] = ds[i];
            }
            // dV[kr] += sum_q PZ[q][kr] dO[q]
#pragma unroll
            for (int cb = 0; cb < DMAX / EF_CH; ++cb) {
                if (cb * EF_CH < p.ev) {
                    __syncthreads();
                    load_chunk<T>(As, dout, s.row0 * p.ev, p.ev, r0, s.len, cb * EF_CH, p.ev);
                    __syncthreads();
#pragma unroll
                    for (int jj = 0; jj < EF_CH / 4; ++jj) {
                        float x = 0.0f;
#pragma unroll 8
                        for (int qq = 0; qq < EF_ROWS; ++qq)
                            x += PZs[qq * (EF_ROWS + 1) + kr] * As[qq * EF_LD + c4 + 4 * jj];
                        dva[cb * (EF_CH / 4) + jj] += x;
                    }
                }
            }
            // dK[kr] += sum_q dS[q][kr] Q[q]; dQ[q] += sum_k dS[q][k] K[k] (scaled at the end / here)
#pragma unroll
            for (int cb = 0; cb < DMAX / EF_CH; ++cb) {
                if (cb * EF_CH < p.e) {
                    __syncthreads();
                    load_chunk<T>(As, q, s.q, p.q_rs, r0, s.len, cb * EF_CH, p.e);
                    if (with_dq) load_chunk<T>(Bs, k, kv.k, p.k_rs, k0, kv.len, cb * EF_CH, p.e);
                    __syncthreads();
#pragma unroll
                    for (int jj = 0; jj < EF_CH / 4; ++jj) {
                        float x = 0.0f;
#pragma unroll 8
                        for (int qq = 0; qq < EF_ROWS; ++qq)
                            x += DSs[qq * (EF_ROWS + 1) + kr] * As[qq * EF_LD + c4 + 4 * jj];
                        dka[cb * (EF_CH / 4) + jj] += x;
                    }
                    if (with_dq) {
                        // Thread now owns query row kr of the tile.
                        const int row = r0 + kr;
                        if (row < s.len) {
#pragma unroll
                            for (int jj = 0; jj < EF_CH / 4; ++jj) {
                                int d = cb * EF_CH + c4 + 4 * jj;
                                float x = 0.0f;
#pragma unroll 8
                                for (int kk = 0; kk < EF_ROWS; ++kk)
                                    x += DSs[kr * (EF_ROWS + 1) + kk] * Bs[kk * EF_LD + c4 + 4 * jj];
                                if (d < p.e && x != 0.0f) atomicAdd(&dq[(s.row0 + row) * p.e + d], x * p.scale);
                            }
                        }
                    }
                }
            }
        }
    }
    const int key = k0 + kr;
    if (key < kv.len) {
        const long long krow = kv.row0 + key;
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            int d = c4 + 4 * j;
            if (d < p.e) dk[krow * p.e + d] = dka[j] * p.scale;
            if (d < p.ev) dv[krow * p.ev + d] = dva[j];
        }
    }
}

// ---- backward: deterministic dQ per query tile -----------------------------------------------

template <typename T, int DMAX>
__device__ void eff_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const float* __restrict__ bias, const unsigned char* __restrict__ boolm,
                       const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                       float* __restrict__ dq, const long long* __restrict__ qsegs,
                       const long long* __restrict__ kvsegs, const AttnParams p) {
    __shared__ float As[EF_ROWS * EF_LD];
    __shared__ float Bs[EF_ROWS * EF_LD];
    __shared__ float DSs[EF_ROWS * (EF_ROWS + 1)];  // [query][key]
    const QSeg s = load_qseg(qsegs, blockIdx.x);
    const int r0 = (p.tiles - 1 - (int)blockIdx.y) * EF_ROWS;
    if (r0 < 0 || r0 >= s.len) return;
    const KvSeg kv = load_kvseg(kvsegs, s.kv);
    const int row = threadIdx.x >> 2, c4 = threadIdx.x & 3;
    const int grow = r0 + row;
    const int last = min(r0 + EF_ROWS, s.len) - 1;
    const int kbeg = first_key(s, r0, kv.len), kend = key_end(s, last, kv.len);
    // This thread's row sees keys [kf, ke).
    const int kf = first_key(s, grow, kv.len), ke = grow < s.len ? key_end(s, grow, kv.len) : 0;
    const bool xform = has_extras(p, s);
    constexpr int NJ = DMAX / 4;
    float acc[NJ];
#pragma unroll
    for (int j = 0; j < NJ; ++j) acc[j] = 0.0f;
    const float lse_r = grow < s.len ? lse[s.row0 + grow] : INFINITY;
    const float d_r = grow < s.len ? delta[s.row0 + grow] : 0.0f;

    for (int k0 = kbeg / EF_ROWS * EF_ROWS; k0 < kend; k0 += EF_ROWS) {
        float sc[8], dp[8];
        tile_dots<T>(sc, As, Bs, q, s.q, p.q_rs, r0, s.len, k, kv.k, p.k_rs, k0, kv.len, p.e, row, c4);
        tile_dots<T>(dp, As, Bs, dout, s.row0 * p.ev, p.ev, r0, s.len, v, kv.v, p.v_rs, k0, kv.len, p.ev, row, c4);
        __syncthreads();
        if (xform) {
            // Only dS = P (1 - t^2) (dP Z - D) is needed here, so the soft cap's 1 - t^2 goes
            // into P's exponent instead of 8 more live registers.
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float t;
                sc[i] = extras_score(p, s.slope, sc[i], (float)(grow + s.diag - k0 - c4 - 4 * i), t);
                sc[i] += __logf(1.0f - t * t);
            }
        }
        const float mul = xform ? 1.0f : p.scale;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            int col = k0 + c4 + 4 * i;
            float x = masked_score(p, s, bias, boolm, sc[i], mul, grow, col, col >= kf && col < ke);
            float pr = x == -INFINITY ? 0.0f : expf(x - lse_r);
            float z = (p.dropout && pr != 0.0f) ? dropout_factor(p, s.stream, grow, col) : 1.0f;
            DSs[row * (EF_ROWS + 1) + c4 + 4 * i] = pr * (dp[i] * z - d_r);
        }
#pragma unroll
        for (int cb = 0; cb < DMAX / EF_CH; ++cb) {
            if (cb * EF_CH < p.e) {
                __syncthreads();
                load_chunk<T>(As, k, kv.k, p.k_rs, k0, kv.len, cb * EF_CH, p.e);
                __syncthreads();
#pragma unroll
                for (int jj = 0; jj < EF_CH / 4; ++jj) {
                    float x = 0.0f;
#pragma unroll 8
                    for (int kk = 0; kk < EF_ROWS; ++kk) x += DSs[row * (EF_ROWS + 1) + kk] * As[kk * EF_LD + c4 + 4 * jj];
                    acc[cb * (EF_CH / 4) + jj] += x;
                }
            }
        }
    }
    if (grow < s.len) {
#pragma unroll
        for (int j = 0; j < NJ; ++j) {
            int d = c4 + 4 * j;
            if (d < p.e) dq[(s.row0 + grow) * p.e + d] = acc[j] * p.scale;
        }
    }
}

// ---- small helpers ---------------------------------------------------------------------------

// delta[r] = sum_d dout[r][d] * o[r][d] over `rows` contiguous rows of width `ev`; one warp a row.
template <typename T>
__device__ void attn_delta(const T* __restrict__ o, const T* __restrict__ dout, float* __restrict__ delta,
                           long long rows, int ev) {
    long long r = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;
    float x = 0.0f;
    for (int d = threadIdx.x % 32; d < ev; d += 32) x += to_f32<T>(o[r * ev + d]) * to_f32<T>(dout[r * ev + d]);
#pragma unroll
    for (int w = 16; w > 0; w >>= 1) x += __shfl_xor_sync(0xffffffffu, x, w);
    if (threadIdx.x % 32 == 0) delta[r] = x;
}

// FWD_BOUNDS: eff_fwd's launch bounds. At head dim 64 ptxas aims at the 7 blocks per SM that its
// shared memory allows, in 72 registers, and spills around the soft cap / ALiBi pass; at 5 blocks
// it takes 96 registers (what it chose before that pass existed) and does not spill.
#define EFF_KERNELS(NAME, T, DMAX, FWD_BOUNDS)                                                                  \
    extern "C" __global__ void __launch_bounds__ FWD_BOUNDS                                                     \
        eff_fwd_##NAME##_##DMAX(const T* q, const T* k, const T* v, const float* bias, const unsigned char* bm, \
                                T* o, float* lse, const long long* qs, const long long* ks, const AttnParams p) { \
        eff_fwd<T, DMAX>(q, k, v, bias, bm, o, lse, qs, ks, p);                                                 \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(EF_THREADS) eff_bwd_##NAME##_##DMAX(                           \
        const T* q, const T* k, const T* v, const float* bias, const unsigned char* bm, const T* dout,          \
        const float* lse, const float* delta, float* dq, float* dk, float* dv, const long long* qs,             \
        const long long* ks, const AttnParams p, int with_dq) {                                                 \
        eff_bwd<T, DMAX>(q, k, v, bias, bm, dout, lse, delta, dq, dk, dv, qs, ks, p, with_dq);                  \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(EF_THREADS) eff_dq_##NAME##_##DMAX(                            \
        const T* q, const T* k, const T* v, const float* bias, const unsigned char* bm, const T* dout,          \
        const float* lse, const float* delta, float* dq, const long long* qs, const long long* ks,             \
        const AttnParams p) {                                                                                   \
        eff_dq<T, DMAX>(q, k, v, bias, bm, dout, lse, delta, dq, qs, ks, p);                                    \
    }

#define EFF_DTYPE(NAME, T)                                                                                     \
    EFF_KERNELS(NAME, T, 64, (EF_THREADS, 5))                                                                  \
    EFF_KERNELS(NAME, T, 128, (EF_THREADS))                                                                    \
    EFF_KERNELS(NAME, T, 256, (EF_THREADS))                                                                    \
    extern "C" __global__ void attn_delta_##NAME(const T* o, const T* dout, float* delta, long long rows,      \
                                                 int ev) {                                                     \
        attn_delta<T>(o, dout, delta, rows, ev);                                                               \
    }

EFF_DTYPE(f32, float)
EFF_DTYPE(f16, __half)
EFF_DTYPE(bf16, __nv_bfloat16)
