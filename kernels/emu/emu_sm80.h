// The sm80 building blocks of mma_sm80.cuh for the CPU emulator, following the PTX ISA's
// definitions (not mma_sm80.cuh's comments) of mma.sync.m16n8k16, ldmatrix.x4 and cp.async.
// Included by mma_sm80.cuh in place of its inline PTX when ATTN_EMU is defined.
#pragma once

#include "cuda_emu.h"

namespace emu {
template <typename T>
float half_to_f32(unsigned short h);
template <>
inline float half_to_f32<__half>(unsigned short h) {
    return f16_to_f32(h);
}
template <>
inline float half_to_f32<__nv_bfloat16>(unsigned short h) {
    return bf16_to_f32(h);
}
// The 16-bit element `i` (0 = low half) of a packed register, as f32.
template <typename T>
inline float half_of(unsigned r, int i) {
    return half_to_f32<T>((unsigned short)(i ? r >> 16 : r & 0xffffu));
}
void check_smem(const char* op, const void* p, unsigned bytes);
struct AsyncCopy {
    void* dst;
    const void* src;
    int bytes;      // cp-size: 4 or 16
    int src_bytes;  // bytes read from src; the rest of `bytes` is zero-filled
};
void cp_async_issue(const AsyncCopy& c);
void cp_async_commit();
void cp_async_wait(int pending);
}  // namespace emu

// d += a * b, m16n8k16, row-major A (16 x 16), column-major B (16 x 8), f32 accumulators.
// PTX ISA fragments (g = lane / 4, t = lane % 4): A register i holds rows g (i even) or g + 8
// (i odd) and columns 2t, 2t + 1 (+ 8 for i >= 2); B register j holds k = 2t, 2t + 1 (+ 8 for
// j = 1) of column g; accumulator e is row g (e < 2) or g + 8, column 2t + (e & 1).
template <typename T>
inline void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    struct Frag {
        unsigned a[4], b[2];
    } in = {{a[0], a[1], a[2], a[3]}, {b0, b1}};
    const unsigned char* slots = emu::warp_arrive("mma.sync.m16n8k16", &in, sizeof(Frag));
    struct Operands {
        float A[16][16], B[16][8];
    };
    static_assert(sizeof(Operands) <= emu::kWarpShared, "warp scratch too small");
    bool ready;
    Operands& op = *reinterpret_cast<Operands*>(emu::warp_shared(&ready));
    if (!ready) {  // the first lane to read decodes the whole tile for the warp
        for (int l = 0; l < 32; ++l) {
            Frag f;
            memcpy(&f, slots + l * emu::kSlot, sizeof f);
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 4; ++i) {
                const int row = g + ((i & 1) ? 8 : 0), col = 2 * t + ((i & 2) ? 8 : 0);
                op.A[row][col] = emu::half_of<T>(f.a[i], 0);
                op.A[row][col + 1] = emu::half_of<T>(f.a[i], 1);
            }
            for (int j = 0; j < 2; ++j) {
                const int kk = 2 * t + 8 * j;
                op.B[kk][g] = emu::half_of<T>(f.b[j], 0);
                op.B[kk + 1][g] = emu::half_of<T>(f.b[j], 1);
            }
        }
    }
    const int l = emu::lane(), g = l >> 2, t = l & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e < 2 ? 0 : 8), col = 2 * t + (e & 1);
        float acc = d[e];
        for (int kk = 0; kk < 16; ++kk) acc = fmaf(op.A[row][kk], op.B[kk][col], acc);
        d[e] = acc;
    }
    emu::warp_depart();
}

// mma.sync.m16n8k8 with .tf32 operands, f32 accumulators. PTX ISA fragments (g = lane / 4,
// t = lane % 4): A register i holds row g (i even) or g + 8 (i odd), column t (+ 4 for i >= 2);
// B register j holds k = t + 4 j of column g; accumulators as for m16n8k16. The tensor cores
// read only the 19 tf32 bits of an operand, so the low 13 bits are dropped here too.
inline void mma1688_tf32(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    struct Frag {
        unsigned a[4], b[2];
    } in = {{a[0], a[1], a[2], a[3]}, {b0, b1}};
    const unsigned char* slots = emu::warp_arrive("mma.sync.m16n8k8.tf32", &in, sizeof(Frag));
    struct Operands {
        float A[16][8], B[8][8];
    };
    static_assert(sizeof(Operands) <= emu::kWarpShared, "warp scratch too small");
    bool ready;
    Operands& op = *reinterpret_cast<Operands*>(emu::warp_shared(&ready));
    if (!ready) {
        for (int l = 0; l < 32; ++l) {
            Frag f;
            memcpy(&f, slots + l * emu::kSlot, sizeof f);
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 4; ++i) op.A[g + ((i & 1) ? 8 : 0)][t + ((i & 2) ? 4 : 0)] = emu::bits_f32(f.a[i] & 0xffffe000u);
            for (int j = 0; j < 2; ++j) op.B[t + 4 * j][g] = emu::bits_f32(f.b[j] & 0xffffe000u);
        }
    }
    const int l = emu::lane(), g = l >> 2, t = l & 3;
    for (int e = 0; e < 4; ++e) {
        const int row = g + (e < 2 ? 0 : 8), col = 2 * t + (e & 1);
        float acc = d[e];
        for (int kk = 0; kk < 8; ++kk) acc = fmaf(op.A[row][kk], op.B[kk][col], acc);
        d[e] = acc;
    }
    emu::warp_depart();
}

// ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8i..8i+7 give the addresses of rows 0..7 of matrix
// i (16 bytes each); lane l receives in register i the elements (row l / 4, columns 2 (l % 4)
// and 2 (l % 4) + 1) of matrix i, or with .trans (rows 2 (l % 4), 2 (l % 4) + 1 of column l / 4).
inline void emu_ldmatrix(unsigned (&r)[4], const void* p, bool trans) {
    emu::check_smem(trans ? "ldmatrix.trans" : "ldmatrix", p, 16);
    const unsigned char* slots = emu::warp_arrive(trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", &p, sizeof p);
    auto row_of = [slots](int l) {
        const unsigned short* r;
        memcpy(&r, slots + l * emu::kSlot, sizeof r);
        return r;
    };
    const int l = emu::lane();
    for (int i = 0; i < 4; ++i) {
        unsigned short lo, hi;
        if (!trans) {
            const unsigned short* row = row_of(8 * i + l / 4);
            lo = row[2 * (l % 4)];
            hi = row[2 * (l % 4) + 1];
        } else {
            lo = row_of(8 * i + 2 * (l % 4))[l / 4];
            hi = row_of(8 * i + 2 * (l % 4) + 1)[l / 4];
        }
        r[i] = (unsigned)lo | ((unsigned)hi << 16);
    }
    emu::warp_depart();
}
inline void ldmatrix_x4(unsigned (&r)[4], const void* p) { emu_ldmatrix(r, p, false); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) { emu_ldmatrix(r, p, true); }

// cp.async.{cg,ca}.shared.global [dst], [src], BYTES, src_bytes: copies src_bytes bytes and
// zero-fills the rest of the BYTES; the copy lands at the cp.async.wait_group that covers its
// group. Both addresses must be aligned to BYTES.
template <int BYTES>
inline void emu_cp_async(void* dst, const void* src, int src_bytes) {
    emu::check_smem("cp.async destination", dst, BYTES);
    if (reinterpret_cast<uintptr_t>(dst) % BYTES) emu::trap("cp.async: destination not aligned to its size");
    if (src_bytes != 0 && src_bytes != BYTES) emu::trap("cp.async: src_bytes must be 0 or the copy size here");
    if (src_bytes && (reinterpret_cast<uintptr_t>(src) % BYTES)) emu::trap("cp.async: source not aligned to its size");
    emu::cp_async_issue({dst, src, BYTES, src_bytes});
}
inline void cp_async16(void* dst, const void* src, int src_bytes) { emu_cp_async<16>(dst, src, src_bytes); }
inline void cp_async4(void* dst, const void* src, int src_bytes) { emu_cp_async<4>(dst, src, src_bytes); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
    emu::cp_async_wait(N);
}
