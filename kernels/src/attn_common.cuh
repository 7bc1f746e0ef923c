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
    int pad_;
};

// Query segment table: QSEG_FIELDS int64 per segment.
#define QSEG_FIELDS 8
#define QS_Q 0       // element offset of row 0 in q
#define QS_ROW0 1    // first row in the contiguous output row space (o, lse, dq, delta, dout)
#define QS_LEN 2     // rows
#define QS_KV 3      // key/value segment index
#define QS_STREAM 4  // dropout stream
#define QS_MASK 5    // element offset of the mask block
#define QS_COFF 6    // causal offset: key j visible from row i iff j <= i + off
#define QS_CAUSAL 7  // 1 when causal
// Key/value segment table: KVSEG_FIELDS int64 per segment.
#define KVSEG_FIELDS 6
#define KS_K 0
#define KS_V 1
#define KS_ROW0 2  // first row of the contiguous dk/dv row space
#define KS_LEN 3
#define KS_MEM0 4  // member query segments [mem0, mem1)
#define KS_MEM1 5

struct QSeg {
    long long q, row0, mask;
    int len, kv, stream;
    long long coff;
    bool causal;
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
    r.coff = s[QS_COFF];
    r.causal = s[QS_CAUSAL] != 0;
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

// Number of keys visible from query row `row` (clamped to [0, lk]); the CPU's `visible_keys`.
__device__ __forceinline__ int visible_keys(const QSeg& s, int row, int lk) {
    if (!s.causal) return lk;
    long long v = (long long)row + s.coff + 1;
    return (int)(v < 0 ? 0 : (v > lk ? lk : v));
}

// First query row that sees key `col` under the causal mask (clamped to [0, len]).
__device__ __forceinline__ int first_row_seeing(const QSeg& s, int col) {
    if (!s.causal) return 0;
    long long r = (long long)col - s.coff;
    return (int)(r < 0 ? 0 : (r > s.len ? s.len : r));
}

// The backward blocks' walk over query tiles: every member query segment [mi, mem1) of the
// block's key/value segment, from the first row that sees the block's first key k0, a tile at a
// time. Moves (mi, r0) to the first tile with rows at or after it (r0 < 0: the start of segment
// mi); mi == mem1 once no tile is left.
__device__ __forceinline__ void settle_qtile(const long long* qsegs, int mem1, int k0, int& mi, int& r0) {
    for (; mi < mem1; ++mi, r0 = -1) {
        const QSeg s = load_qseg(qsegs, mi);
        if (r0 < 0) r0 = first_row_seeing(s, k0);
        if (r0 < s.len) return;
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

// Scaled, masked score of (row, col) of segment `s` (-inf where masked, causal or out of range).
__device__ __forceinline__ float masked_score(const AttnParams& p, const QSeg& s, const float* bias,
                                              const unsigned char* boolm, float raw, int row, int col, int lk) {
    if (row >= s.len || col >= lk || col >= visible_keys(s, row, lk)) return -INFINITY;
    float x = raw * p.scale;
    if (p.mask_kind != 0) x += mask_term(p, bias, boolm, s.mask + (long long)row * p.mask_rs + (long long)col * p.mask_cs);
    return x;
}
