// A CPU emulation of the part of CUDA the attention kernels use, so `src/*.cu` compile as plain
// C++ and run on the CPU: every CUDA thread is a fiber of the launching OS thread, the threads of
// one block run together (blocks one after another; each OS thread has its own emulator state), __syncthreads and the warp-wide operations
// (__shfl_xor_sync, mma.sync, ldmatrix) are rendezvous points where the fibers switch.
//
// What it checks besides computing: a warp operation must be reached by all 32 lanes with the
// same operation (no divergence, no exited lanes); ldmatrix and cp.async addresses must be
// 16-byte aligned and inside the launch's dynamic shared memory; a deadlock (threads waiting at
// different barriers) is an error; dynamic shared memory starts filled with NaN bytes, so a
// read of a tile element nobody wrote shows up in the results; cp.async copies land only at the
// cp.async.wait_group that covers them (the latest moment the hardware may complete them).
// Thread order, warp spacing and when cp.async copies land vary (see schedule() in runtime.cpp),
// so a missing barrier tends to change the results. What it cannot see: the speed of anything,
// and races the varied orders happen not to expose.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#define ATTN_EMU 1

#define __device__
#define __global__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared arrays: an OS thread runs one block at a time, so a function-static,
// thread-local array is shared by the block's threads exactly as __shared__ memory is (and
// launches on different OS threads, e.g. parallel tests, do not meet).
#define __shared__ static thread_local
#define ATTN_DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem()

struct dim3 {
    unsigned x = 0, y = 0, z = 0;
};
struct uint2 {
    unsigned x, y;
};
struct uint4 {
    unsigned x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

template <typename A, typename B>
inline auto min(A a, B b) -> decltype(a + b) {
    return a < b ? a : b;
}

namespace emu {
struct Fiber;
extern thread_local Fiber* current;
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
unsigned char* dynamic_smem();
void syncthreads();
float shfl_xor(unsigned mask, float v, int lane_mask);
[[noreturn]] void trap(const char* what);
int lane();

// Bytes of a lane's slot in a warp rendezvous.
constexpr unsigned kSlot = 64;
// A rendezvous of the 32 lanes of the current warp: every lane deposits `in` (at most kSlot
// bytes) and gets back the 32 deposits (lane i's at byte i * kSlot), valid until it calls
// warp_depart. Fails on divergence (lanes at different operations) or exited lanes.
const unsigned char* warp_arrive(const char* op, const void* in, unsigned size);
// Bytes of scratch the lanes of one warp operation share, e.g. operands decoded once for all
// 32 lanes. Between warp_arrive and warp_depart: `*ready` says whether an earlier lane of this
// operation already filled it.
constexpr unsigned kWarpShared = 2048;
unsigned char* warp_shared(bool* ready);
void warp_depart();
}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx())
#define blockDim (emu::block_dim())

inline void __syncthreads() { emu::syncthreads(); }
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) { return emu::shfl_xor(mask, v, lane_mask); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
// One OS thread runs every fiber and fibers switch only at rendezvous points: a plain addition
// is atomic here.
inline float atomicAdd(float* p, float v) {
    float old = *p;
    *p = old + v;
    return old;
}
#define __trap() emu::trap("__trap() reached")

// ---- 16-bit floats (bit layouts and round-to-nearest-even conversions) ------------------------

namespace emu {
inline unsigned f32_bits(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline float bits_f32(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned short f32_to_bf16(float f) {
    unsigned u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float bf16_to_f32(unsigned short h) { return bits_f32((unsigned)h << 16); }
inline float f16_to_f32(unsigned short h) {
    unsigned sign = (unsigned)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        float x = ldexpf((float)man, -24);
        return sign ? -x : x;
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}
inline unsigned short f32_to_f16(float f) {
    unsigned u = f32_bits(f), sign = (u >> 16) & 0x8000u;
    unsigned a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (a < 0x38800000u) {                                         // below 2^-14: subnormal
        float x = bits_f32(a);
        float q = nearbyintf(x * 16777216.0f);                     // units of 2^-24, ties to even
        return (unsigned short)(sign | (unsigned)q);
    }
    unsigned e = (a >> 23) - 112, m = a & 0x7fffffu;
    unsigned h = (e << 10) | (m >> 13);
    unsigned rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return (unsigned short)(sign | h);
}
}  // namespace emu

inline unsigned __float_as_uint(float x) { return emu::f32_bits(x); }
inline float __uint_as_float(unsigned u) { return emu::bits_f32(u); }
// The fast division and logarithm (approximations on a GPU), exact here.
inline float __fdividef(float a, float b) { return a / b; }
inline float __logf(float x) { return logf(x); }

struct __half {
    unsigned short bits;
};
struct __nv_bfloat16 {
    unsigned short bits;
};
struct __half2 {
    __half x, y;
};
struct __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
inline float __half2float(__half h) { return emu::f16_to_f32(h.bits); }
inline __half __float2half_rn(float f) { return {emu::f32_to_f16(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return emu::bf16_to_f32(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return {emu::f32_to_bf16(f)}; }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
    return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
