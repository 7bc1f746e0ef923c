// Shared definitions of the attention kernels: launch parameters, the segment tables built by
// attn-op's geometry, Philox 4x32-10 dropout (bit-identical to attn-op/src/philox.rs) and
// element conversions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// The block's dynamic shared memory (the CPU emulator in kernels/emu defines its own).
#ifndef ATTN_DYNAMIC_SMEM
#define ATTN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// Scalar launch parameters. Mirrors `KernelParams` in attn-op/src/kernel_plan.rs field by field
// (#[repr(C)]; 8-byte fields first so both sides agree without padding).
struct AttnParams {
    long long q_rs, k_rs, v_rs;  // row strides of q, k, v in elements (last dim has stride 1)
    long long mask_rs, mask_cs;  // mask strides (0 without a mask)
    int e, ev;                   // head dims of q/k and of v
    int n_qseg, n_kvseg;         // segment counts
    int tiles;                   // tiles per segment in grid.y (max over segments)
    int mask_kind;               // 0: none, 1: additive f32 bias, 2: u8 boolean (nonzero = attend)
    float scale;                 // softmax scale
    float keep_scale;            // 1 / (1 - p) when dropout is on
    unsigned int seed_lo, seed_hi;
    unsigned int threshold;      // keep iff philox word >= threshold
    int dropout;                 // 1 when dropout is on
    int vec_ok;                  // 1 when every row start is 16-byte aligned (cp.async / vector loads)
    float softcap;               // logit soft cap c (scores c tanh(scale x / c)); 0 for none
    float cap_u2;                // 2 log2(e) scale / c, 0 without a cap (see extras_score)
    float cap_lin;               // scale without a cap, 0 with one
};

// Query segment table: QSEG_FIELDS int64 per segment.
#define QSEG_FIELDS 10
#define QS_Q 0       // element offset of row 0 in q
#define QS_ROW0 1    // first row in the contiguous output row space (o, lse, dq, delta, dout)
#define QS_LEN 2     // rows
#define QS_KV 3      // key/value segment index
#define QS_STREAM 4  // dropout stream
#define QS_MASK 5    // element offset of the mask block
#define QS_LO 6      // band: row i sees key j iff i + lo <= j <= i + hi (an unlimited side is
#define QS_HI 7      //   clamped to cover every key, so both always apply)
#define QS_SLOPE 8   // ALiBi slope (f32 bits; 0 for none)
#define QS_DIAG 9    // ALiBi diagonal: -slope |i + diag - j| is added to the scaled score
// Key/value segment table: KVSEG_FIELDS int64 per segment.
#define KVSEG_FIELDS 6
#define KS_K 0
#define KS_V 1
#define KS_ROW0 2  // first row of the contiguous dk/dv row space
#define KS_LEN 3
#define KS_MEM0 4  // member query segments [mem0, mem1)
#define KS_MEM1 5

// The host keeps lo and hi in [-len - 1, lk] and len + lk + 1 within int, so the band arithmetic
// below never overflows.
struct QSeg {
    long long q, row0, mask;
    int len, kv, stream;
    int lo, hi, diag;
    float slope;
};

struct KvSeg {
    long long k, v, row0;
    int len, mem0, mem1;
};

__device__ __forceinline__ QSeg load_qseg(const long long* t, int i) {
    const long long* s = t + (long long)i * QSEG_FIELDS;
    QSeg r;
    r.q = s[QS_Q];
    r.row0 = s[QS_ROW0];
    r.len = (int)s[QS_LEN];
    r.kv = (int)s[QS_KV];
    r.stream = (int)s[QS_STREAM];
    r.mask = s[QS_MASK];
    r.lo = (int)s[QS_LO];
    r.hi = (int)s[QS_HI];
    r.slope = __uint_as_float((unsigned)s[QS_SLOPE]);
    r.diag = (int)s[QS_DIAG];
    return r;
}

__device__ __forceinline__ KvSeg load_kvseg(const long long* t, int i) {
    const long long* s = t + (long long)i * KVSEG_FIELDS;
    KvSeg r;
    r.k = s[KS_K];
    r.v = s[KS_V];
    r.row0 = s[KS_ROW0];
    r.len = (int)s[KS_LEN];
    r.mem0 = (int)s[KS_MEM0];
    r.mem1 = (int)s[KS_MEM1];
    return r;
}

__device__ __forceinline__ int clamp_to(int x, int n) { return x < 0 ? 0 : (x > n ? n : x); }

// Row `row` sees keys [first_key, key_end) of lk (the CPU's Bounds::keys); both are
// nondecreasing in the row, so a block of rows sees [first_key(first row), key_end(last row)).
__device__ __forceinline__ int first_key(const QSeg& s, int row, int lk) { return clamp_to(row + s.lo, lk); }
__device__ __forceinline__ int key_end(const QSeg& s, int row, int lk) { return clamp_to(row + s.hi + 1, lk); }

// Rows [first_row_seeing, row_end_seeing) of the segment see key `col` (Bounds::rows).
__device__ __forceinline__ int first_row_seeing(const QSeg& s, int col) { return clamp_to(col - s.hi, s.len); }
__device__ __forceinline__ int row_end_seeing(const QSeg& s, int col) { return clamp_to(col - s.lo + 1, s.len); }

// A contiguous range of visible indices as offsets from a base c0: index c0 + c is visible iff
// has(c). Made once per row (or key) so that the per-element test is one subtraction and one
// unsigned compare.
struct Span {
    int a;       // first visible index - c0
    unsigned w;  // visible count (0: none)
    __device__ __forceinline__ bool has(int c) const { return (unsigned)(c - a) < w; }
};
__device__ __forceinline__ Span span_of(int first, int end, int c0) {
    Span r;
    r.a = first - c0;
    r.w = end > first ? (unsigned)(end - first) : 0u;
    return r;
}
// The keys row `row` sees (none past the segment's rows), from key c0.
__device__ __forceinline__ Span row_span(const QSeg& s, int row, int lk, int c0) {
    return span_of(first_key(s, row, lk), row < s.len ? key_end(s, row, lk) : 0, c0);
}
// The rows that see key `col` (none for a key past lk), from row r0.
__device__ __forceinline__ Span key_span(const QSeg& s, int col, int lk, int r0) {
    return span_of(first_row_seeing(s, col), col < lk ? row_end_seeing(s, col) : 0, r0);
}

// A forward block's rows [r0, r0 + rows) of segment s against lk keys in tiles of BK: they see
// keys [first_key(r0), key_end(last row)), in key tiles [j0, ntiles) (none when that is empty),
// and every one of them sees [kin0, kin1) (empty when kin0 >= kin1): a key tile inside that
// needs no per-element mask.
template <int BK>
__device__ __forceinline__ void tile_bounds(const QSeg& s, int r0, int rows, int lk, int& j0, int& ntiles, int& kin0,
                                            int& kin1) {
    const int last = r0 + rows - 1;
    const int kbeg = first_key(s, r0, lk), kend = key_end(s, last, lk);
    j0 = kbeg / BK;
    ntiles = kbeg < kend ? (kend + BK - 1) / BK : j0;
    kin0 = first_key(s, last, lk);
    kin1 = key_end(s, r0, lk);
}

// The backward blocks' walk over query tiles: every member query segment [mi, mem1) of the
// block's key/value segment, over the rows that see a key of the block's keys [k0, k1] (first
// the rows that see k0, last those that see k1), a tile at a time. Moves (mi, r0) to the first
// tile with rows at or after it (r0 < 0: the start of segment mi); mi == mem1 once no tile is left.
__device__ __forceinline__ void settle_qtile(const long long* qsegs, int mem1, int k0, int k1, int& mi, int& r0) {
    for (; mi < mem1; ++mi, r0 = -1) {
        const QSeg s = load_qseg(qsegs, mi);
        if (r0 < 0) r0 = first_row_seeing(s, k0);
        if (r0 < row_end_seeing(s, k1)) return;
    }
}

// ---- Philox 4x32-10 -------------------------------------------------------------------------

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
    const unsigned int M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
    const unsigned int W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k.x += W0;
            k.y += W1;
        }
        unsigned int hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        unsigned int hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        uint4 n;
        n.x = hi1 ^ c.y ^ k.x;
        n.y = lo1;
        n.z = hi0 ^ c.w ^ k.y;
        n.w = lo0;
        c = n;
    }
    return c;
}

// The four Philox words of columns [4*(col/4), 4*(col/4)+4) of (stream, row).
__device__ __forceinline__ uint4 dropout_block(const AttnParams& p, int stream, int row, int col) {
    return philox4x32_10(make_uint4((unsigned)(col >> 2), (unsigned)row, (unsigned)stream, 0u),
                         make_uint2(p.seed_lo, p.seed_hi));
}

__device__ __forceinline__ unsigned int word_of(uint4 b, int i) {
    return i == 0 ? b.x : (i == 1 ? b.y : (i == 2 ? b.z : b.w));
}

// Dropout factor of element (stream, row, col): keep_scale when kept, 0 when dropped.
__device__ __forceinline__ float dropout_factor(const AttnParams& p, int stream, int row, int col) {
    uint4 b = dropout_block(p, stream, row, col);
    return word_of(b, col & 3) >= p.threshold ? p.keep_scale : 0.0f;
}

// ---- element conversions --------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Mask value added to a scaled score (bias), or -inf for a masked boolean entry.
__device__ __forceinline__ float mask_term(const AttnParams& p, const float* bias, const unsigned char* boolm,
                                           long long off) {
    if (p.mask_kind == 1) return bias[off];
    if (p.mask_kind == 2) return boolm[off] ? 0.0f : -INFINITY;
    return 0.0f;
}

// Whether scores need more than the scale: a soft cap or ALiBi (block-uniform).
__device__ __forceinline__ bool has_extras(const AttnParams& p, const QSeg& s) {
    return p.softcap > 0.0f || s.slope != 0.0f;
}

// The soft cap and ALiBi of one raw score, branch-free so that the unrolled loops over fragments
// carry one copy: c tanh(scale raw / c) with a cap, scale raw without, minus slope |dist|; t gets
// the tanh (0 without a cap, so that 1 - t^2 = 1). tanh(u) is 1 - 2 / (e^(2u) + 1) on the
// hardware exponential, a few instructions (absolute error about 1e-7, +-1 at +-inf): libdevice's
// tanhf inlined in every fragment loop multiplies nvcc's time. The cap's constants come from the
// parameter block (host-computed), which costs the tensor-core backward no registers.
__device__ __forceinline__ float extras_score(const AttnParams& p, float slope, float raw, float dist, float& t) {
    t = 1.0f - __fdividef(2.0f, exp2f(raw * p.cap_u2) + 1.0f);
    return fmaf(raw, p.cap_lin, p.softcap * t) - slope * fabsf(dist);
}

// The soft cap and ALiBi of a SIMT thread's 8 scores (efficient.cu): element i at distance
// dist0 - step i from the diagonal (row + diag - col) becomes the scaled score; g[i] = 1 - t^2.
__device__ __forceinline__ void extras_pass(float (&sc)[8], float (&g)[8], const AttnParams& p, const QSeg& s,
                                            int dist0, int step) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        float t;
        sc[i] = extras_score(p, s.slope, sc[i], (float)(dist0 - step * i), t);
        g[i] = 1.0f - t * t;
    }
}
__device__ __forceinline__ void extras_pass(float (&sc)[8], const AttnParams& p, const QSeg& s, int dist0, int step) {
    float g[8];
    extras_pass(sc, g, p, s, dist0, step);
}

// Score `x` of (row, col) of segment `s` times `mul` (the scale, or 1 after extras_pass), with
// the mask in the CPU's order (cpu::prepare_scores), -inf where `in` (the band and the tails) is false.
__device__ __forceinline__ float masked_score(const AttnParams& p, const QSeg& s, const float* bias,
                                              const unsigned char* boolm, float x, float mul, int row, int col, bool in) {
    if (!in) return -INFINITY;
    x *= mul;
    if (p.mask_kind != 0) x += mask_term(p, bias, boolm, s.mask + (long long)row * p.mask_rs + (long long)col * p.mask_cs);
    return x;
}
