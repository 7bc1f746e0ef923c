// The CPU emulator's runtime (see cuda_emu.h): fibers for the threads of a block, the
// rendezvous points, guarded memory, and `attn_emu_launch`, which runs one kernel of
// src/*.cu (compiled into this file) over a grid, the way cuLaunchKernel would.
#include "cuda_emu.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <atomic>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "emu_sm80.h"

// The kernels themselves, compiled for the CPU.
#include "../src/dropout.cu"
#include "../src/efficient.cu"
#include "../src/efficient_tc.cu"
#include "../src/flash_bwd.cu"
#include "../src/flash_fwd.cu"

namespace emu {

// Switching between fibers. glibc's swapcontext saves the floating-point environment and makes
// an rt_sigprocmask system call on every switch, and the emulator switches at every warp
// operation: that was three quarters of the emulated tests' time. On x86-64 a switch saves just
// what the calling convention says a callee keeps (rbx, rbp, r12-r15, the MXCSR and x87 control
// words) on the fiber's own stack and swaps stack pointers; elsewhere ucontext stays.
#if defined(__x86_64__)
struct Context {
    void* sp = nullptr;
};

// Saves the running context into `*from`, resumes `to`.
extern "C" void attn_emu_switch(void** from, void* to);
asm(R"(
    .text
    .p2align 4
    .globl attn_emu_switch
    .hidden attn_emu_switch
    .type attn_emu_switch, @function
attn_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size attn_emu_switch, .-attn_emu_switch
)");

inline void switch_context(Context& from, Context& to) { attn_emu_switch(&from.sp, to.sp); }

// A context that, when first switched to, calls `fn` (which must never return) on the stack
// `[base, base + size)`: the frame attn_emu_switch pops, laid out at the stack's top.
void make_context(Context& c, unsigned char* base, size_t size, void (*fn)()) {
    uintptr_t top = ((uintptr_t)(base + size)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;       // `fn`'s return address slot: it never returns
    *--sp = (void*)fn;     // where attn_emu_switch's `ret` goes; `fn` then starts with the
                           // stack 8 bytes off 16-byte alignment, as after a call
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp, rbx, r12-r15
    uint32_t control[2] = {0, 0};
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
    *--sp = *(void**)control;
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void make_context(Context& c, unsigned char* base, size_t size, void (*fn)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = base;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, fn, 0);
}
#endif

constexpr size_t kStack = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;
size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }

struct Fiber {
    Context ctx;
    dim3 tid;
    int lane = 0, warp = 0;
    bool done = false;
    const char* waiting = "running";
    bool at_barrier = false;  // waiting at __syncthreads
    std::vector<AsyncCopy> open;                  // issued, not yet committed
    std::vector<std::vector<AsyncCopy>> groups;  // committed, oldest first
};

struct WarpState {
    int arrived = 0, departed = 0;
    bool reading = false;
    const char* op = nullptr;
    alignas(16) unsigned char slot[32][kSlot];
    // Work shared by the lanes of one operation (see warp_shared): whether a lane filled it yet.
    bool shared_ready = false;
    alignas(16) unsigned char shared[kWarpShared];
};

struct Launch {
    const char* kernel = "";
    dim3 block, bidx;
    void (*body)(void* const*) = nullptr;
    void* const* args = nullptr;
    std::vector<Fiber> fibers;
    std::vector<WarpState> warps;
    int live = 0, bar_arrived = 0;
    unsigned long long bar_gen = 0, events = 0;
    unsigned char* smem = nullptr;
    size_t smem_bytes = 0;
    // cp.async copies land when issued (the earliest the hardware may complete them) instead of
    // at the wait that covers them (the latest): chosen per block, see schedule().
    bool eager_copies = false;
    std::string error;
};

namespace {

// Per OS thread: the launch being run, the scheduler's context and the fiber stacks.
thread_local Launch* L = nullptr;
thread_local Context sched;
thread_local unsigned char* stacks = nullptr;  // kMaxThreads stacks, each above a guard page

[[noreturn]] void fail(std::string msg) {
    char where[160];
    snprintf(where, sizeof where, "%s, block (%u, %u), thread %u: ", L->kernel, L->bidx.x, L->bidx.y,
             current ? current->tid.x : 0u);
    L->error = where + msg;
    switch_context(current->ctx, sched);  // never resumed
    abort();
}

void yield() { switch_context(current->ctx, sched); }

void release_barrier() {
    L->bar_arrived = 0;
    ++L->bar_gen;
    ++L->events;
}

void entry() {
    L->body(L->args);
    Fiber& f = *current;
    WarpState& w = L->warps[f.warp];
    if (w.arrived > w.departed && !w.reading)
        fail(std::string("exited while its warp waits at ") + w.op);
    f.done = true;
    f.waiting = "exited";
    --L->live;
    ++L->events;
    if (L->bar_arrived > 0 && L->bar_arrived == L->live) release_barrier();
    switch_context(f.ctx, sched);  // never resumed
    abort();
}

std::string describe_waits() {
    std::string s;
    for (size_t i = 0; i < L->fibers.size(); i += 32) {
        s += "\n  warp " + std::to_string(i / 32) + ":";
        for (size_t j = i; j < i + 32 && j < L->fibers.size(); ++j) {
            s += " ";
            s += L->fibers[j].waiting;
        }
    }
    return s;
}

struct sigaction previous_segv, previous_bus;

void on_segv(int sig, siginfo_t* info, void*) {
    if (!L) {
        // Not an emulated kernel's fault: hand it back to whoever handled it before (Rust's
        // stack-overflow report, or the default action) by faulting again.
        sigaction(sig, sig == SIGSEGV ? &previous_segv : &previous_bus, nullptr);
        return;
    }
    char msg[320];
    int n = snprintf(msg, sizeof msg,
                     "\nattn-kernels emulator: %s in kernel %s, block (%u, %u), thread %u, address %p "
                     "(outside every buffer the kernel was given)\n",
                     sig == SIGSEGV ? "SIGSEGV" : "SIGBUS", L->kernel, L->bidx.x, L->bidx.y,
                     current ? current->tid.x : 0, info->si_addr);
    if (n > 0) (void)!write(2, msg, (size_t)n);
    _exit(134);
}

// The fault handler (once per process) and an alternate signal stack (once per OS thread, so a
// fault on an exhausted fiber stack can still be reported).
void install_handlers() {
    static std::once_flag process;
    std::call_once(process, [] {
        struct sigaction sa = {};
        sa.sa_sigaction = on_segv;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigaction(SIGSEGV, &sa, &previous_segv);
        sigaction(SIGBUS, &sa, &previous_bus);
    });
    static thread_local bool thread_done = false;
    if (thread_done) return;
    thread_done = true;
    static thread_local unsigned char alt[64 * 1024];
    stack_t ss = {};
    ss.ss_sp = alt;
    ss.ss_size = sizeof alt;
    sigaltstack(&ss, nullptr);
}

// `bytes` of memory between inaccessible pages: ending right below one, so a read or write past
// the end faults, or with `front` starting right above one, so an access before the start
// faults (the end then has up to a page of slack). Returns the start; `base`/`len` receive the
// whole mapping.
unsigned char* guarded(size_t bytes, bool front, void** base, size_t* len) {
    size_t ps = page_size();
    size_t body = (bytes + ps - 1) / ps * ps;
    *len = body + 2 * ps;
    unsigned char* m = (unsigned char*)mmap(nullptr, *len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return nullptr;
    mprotect(m, ps, PROT_NONE);
    mprotect(m + ps + body, ps, PROT_NONE);
    *base = m;
    return front ? m + ps : m + ps + body - bytes;
}

// The order in which a scheduler pass resumes the threads of a block: `start + i * stride`
// (mod threads), stride odd and coprime with the block size, both drawn from the block and pass
// numbers. Between two synchronisation points any order is one a GPU may produce (warps and,
// since Volta, the lanes of a warp run independently), so varying it from pass to pass makes a
// missing __syncthreads or a read of another thread's unsynchronised write show up as a wrong
// result instead of depending on one fixed order. About half the blocks (by the same hash) also
// run warp by warp, each as far as the next __syncthreads, before every pass (warps far apart:
// the schedule that exposes a tile overwritten while another warp still reads it). Odd-numbered
// blocks (by the same hash) land
// their cp.async copies when issued, the others at the covering wait, so both a missing wait
// and a prefetch overwriting a tile still being read can show. ATTN_EMU_SCHEDULE=fixed keeps
// thread order and lands every copy at its wait.
struct Order {
    unsigned start, stride, n;
    unsigned at(unsigned i) const { return (unsigned)((start + (unsigned long long)i * stride) % n); }
};

bool fixed_schedule() {
    static const bool fixed = [] {
        const char* v = getenv("ATTN_EMU_SCHEDULE");
        return v && strcmp(v, "fixed") == 0;
    }();
    return fixed;
}

Order schedule(unsigned block, unsigned pass, unsigned n) {
    if (fixed_schedule()) return {0, 1, n};
    unsigned long long x = ((unsigned long long)block << 32 | pass) * 0x9E3779B97F4A7C15ull;
    x ^= x >> 29;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 32;
    unsigned stride = (unsigned)(x % n) | 1u;
    auto gcd = [](unsigned a, unsigned b) {
        while (b) {
            unsigned t = a % b;
            a = b;
            b = t;
        }
        return a;
    };
    while (gcd(stride, n) != 1) stride += 2;
    return {(unsigned)((x >> 20) % n), stride % n == 0 ? 1 : stride, n};
}

}  // namespace

thread_local Fiber* current = nullptr;

const dim3& thread_idx() { return current->tid; }
const dim3& block_idx() { return L->bidx; }
const dim3& block_dim() { return L->block; }
int lane() { return current->lane; }
unsigned char* dynamic_smem() { return L->smem; }
[[noreturn]] void trap(const char* what) { fail(what); }

void syncthreads() {
    Fiber& f = *current;
    WarpState& w = L->warps[f.warp];
    if (w.arrived > w.departed && !w.reading) fail(std::string("__syncthreads while its warp waits at ") + w.op);
    unsigned long long gen = L->bar_gen;
    ++L->events;
    if (++L->bar_arrived == L->live) {
        release_barrier();
        return;
    }
    f.waiting = "__syncthreads";
    f.at_barrier = true;
    while (L->bar_gen == gen) yield();
    f.at_barrier = false;
    f.waiting = "running";
}

const unsigned char* warp_arrive(const char* op, const void* in, unsigned size) {
    Fiber& f = *current;
    WarpState& w = L->warps[f.warp];
    f.waiting = op;
    while (w.reading) yield();  // the previous operation is still being read
    if (w.arrived == 0)
        w.op = op;
    else if (w.op != op)
        fail(std::string("warp divergence: ") + op + " while other lanes are at " + w.op);
    for (int l = f.warp * 32; l < f.warp * 32 + 32; ++l)
        if (L->fibers[l].done) fail(std::string(op) + " with exited lanes in the warp (mask 0xffffffff)");
    if (size > kSlot) fail(std::string(op) + ": deposit larger than a slot");
    memcpy(w.slot[f.lane], in, size);
    ++L->events;
    if (++w.arrived == 32) {
        w.reading = true;
        w.shared_ready = false;
    } else {
        while (!w.reading) yield();
    }
    f.waiting = "running";
    return &w.slot[0][0];
}

unsigned char* warp_shared(bool* ready) {
    WarpState& w = L->warps[current->warp];
    *ready = w.shared_ready;
    w.shared_ready = true;
    return w.shared;
}

void warp_depart() {
    WarpState& w = L->warps[current->warp];
    if (++w.departed == 32) {
        w.arrived = w.departed = 0;
        w.reading = false;
        ++L->events;
    }
}

float shfl_xor(unsigned mask, float v, int lane_mask) {
    if (mask != 0xffffffffu) fail("__shfl_xor_sync with a partial mask");
    const unsigned char* slots = warp_arrive("__shfl_xor_sync", &v, sizeof v);
    float r;
    memcpy(&r, slots + (current->lane ^ lane_mask) * kSlot, sizeof r);
    warp_depart();
    return r;
}

void check_smem(const char* op, const void* p, unsigned bytes) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    if (reinterpret_cast<uintptr_t>(p) & 15) fail(std::string(op) + ": address not 16-byte aligned");
    if (c < L->smem || c + bytes > L->smem + L->smem_bytes) {
        char m[200];
        snprintf(m, sizeof m, "%s: shared address %td bytes past the start of %zu bytes of dynamic shared memory", op,
                 c - L->smem, L->smem_bytes);
        fail(m);
    }
}

void land(const AsyncCopy& c) {
    memset(c.dst, 0, (size_t)c.bytes);
    if (c.src_bytes) memcpy(c.dst, c.src, (size_t)c.src_bytes);
}

void cp_async_issue(const AsyncCopy& c) {
    if (L->eager_copies)
        land(c);
    else
        current->open.push_back(c);
}
void cp_async_commit() {
    current->groups.push_back(std::move(current->open));
    current->open.clear();
}
void cp_async_wait(int pending) {
    auto& gs = current->groups;
    while ((int)gs.size() > pending) {
        for (const AsyncCopy& c : gs.front()) land(c);
        gs.erase(gs.begin());
    }
}

}  // namespace emu

// ---- the kernel table ------------------------------------------------------------------------

namespace {

template <typename... A, size_t... I>
void call_with(void (*f)(A...), void* const* args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_const_t<A>*>(args[I])...);
}

struct Entry {
    const char* name;
    unsigned nargs;
    void* fn;
    void (*call)(void* fn, void* const* args);
};

template <typename... A>
Entry entry_of(const char* name, void (*f)(A...)) {
    return {name, (unsigned)sizeof...(A), reinterpret_cast<void*>(f), [](void* fn, void* const* args) {
                call_with(reinterpret_cast<void (*)(A...)>(fn), args, std::index_sequence_for<A...>{});
            }};
}

#define E(fn) entry_of(#fn, &fn)
#define EFF(T, D) E(eff_fwd_##T##_##D), E(eff_bwd_##T##_##D), E(eff_dq_##T##_##D)
#define FF(T) E(flash_fwd_##T##_32), E(flash_fwd_##T##_64), E(flash_fwd_##T##_96), E(flash_fwd_##T##_128), E(flash_fwd_##T##_256), \
    E(flash_fwd_r128_##T##_32), E(flash_fwd_r128_##T##_64), E(flash_fwd_r128_##T##_96), E(flash_fwd_r128_##T##_128)
#define ETC(T) E(eff_tc_fwd_##T##_64), E(eff_tc_fwd_##T##_128), E(eff_tc_fwd_##T##_256), E(eff_tc_bwd_##T##_64), E(eff_tc_bwd_##T##_128), \
    E(eff_tc_fwd_r128_##T##_64), E(eff_tc_fwd_r128_##T##_128)
#define FB(T) E(flash_bwd_##T##_32), E(flash_bwd_##T##_64), E(flash_bwd_##T##_96), E(flash_bwd_##T##_128)

const Entry kKernels[] = {
    EFF(f32, 64), EFF(f32, 128), EFF(f32, 256), EFF(f16, 64), EFF(f16, 128), EFF(f16, 256),
    EFF(bf16, 64), EFF(bf16, 128), EFF(bf16, 256), E(attn_delta_f32), E(attn_delta_f16), E(attn_delta_bf16),
    FF(f16), FF(bf16), FB(f16), FB(bf16), E(dropout_keep_f32), E(dropout_keep_f16), E(dropout_keep_bf16),
    ETC(f32), ETC(f16), ETC(bf16),
};

thread_local const Entry* chosen = nullptr;
void run_chosen(void* const* args) { chosen->call(chosen->fn, args); }

int error_out(char* err, size_t len, const std::string& msg) {
    if (len) snprintf(err, len, "%s", msg.c_str());
    return 1;
}

}  // namespace

extern "C" {

/// `bytes` of host memory that ends right before an inaccessible page (a kernel reading or
/// writing past its end faults), or with `front` nonzero starts right after one (an access
/// before its start faults); free with attn_emu_free(ptr, bytes, front).
void* attn_emu_alloc(size_t bytes, int front) {
    void* base;
    size_t len;
    return emu::guarded(bytes ? bytes : 1, front != 0, &base, &len);
}

void attn_emu_free(void* p, size_t bytes, int front) {
    size_t ps = emu::page_size();
    size_t body = ((bytes ? bytes : 1) + ps - 1) / ps * ps;
    unsigned char* start = static_cast<unsigned char*>(p);
    unsigned char* base = front ? start - ps : start + (bytes ? bytes : 1) - body - ps;
    munmap(base, body + 2 * ps);
}

/// Runs kernel `name` on a grid of (gx, gy) blocks of `threads` threads with `smem` bytes of
/// dynamic shared memory. `args[i]` points to argument i, as for cuLaunchKernel. Returns 0, or
/// 1 with a message in `err` (unknown kernel, wrong argument count, a check of cuda_emu.h).
int attn_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned threads, size_t smem, void* const* args,
                    unsigned nargs, char* err, size_t errlen) {
    using namespace emu;
    chosen = nullptr;
    for (const Entry& e : kKernels)
        if (strcmp(e.name, name) == 0) chosen = &e;
    if (!chosen) return error_out(err, errlen, std::string("no kernel named ") + name);
    if (chosen->nargs != nargs)
        return error_out(err, errlen, std::string(name) + ": takes " + std::to_string(chosen->nargs) + " arguments, got " +
                                          std::to_string(nargs));
    if (threads == 0 || threads > kMaxThreads || threads % 32 != 0)
        return error_out(err, errlen, "threads per block must be a multiple of 32 up to 1024");
    install_handlers();
    size_t ps = page_size();
    if (!stacks) {
        stacks = (unsigned char*)mmap(nullptr, kMaxThreads * (kStack + ps), PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (stacks == MAP_FAILED) return error_out(err, errlen, "cannot map fiber stacks");
        for (unsigned t = 0; t < kMaxThreads; ++t) mprotect(stacks + t * (kStack + ps), ps, PROT_NONE);
    }
    void* smem_base = nullptr;
    size_t smem_len = 0;
    // The shared memory borders an inaccessible page at its end in even launches, at its start
    // in odd ones.
    static std::atomic<unsigned long> launches{0};
    bool front = launches.fetch_add(1, std::memory_order_relaxed) % 2 == 1;
    unsigned char* smem_ptr = guarded(smem ? smem : 1, front, &smem_base, &smem_len);
    if (!smem_ptr) return error_out(err, errlen, "cannot map shared memory");

    Launch launch;
    launch.kernel = chosen->name;
    launch.block.x = threads;
    launch.block.y = launch.block.z = 1;
    launch.body = run_chosen;
    launch.args = args;
    launch.smem = smem_ptr;
    launch.smem_bytes = smem;
    L = &launch;
    for (unsigned by = 0; by < gy && launch.error.empty(); ++by) {
        for (unsigned bx = 0; bx < gx && launch.error.empty(); ++bx) {
            launch.bidx.x = bx;
            launch.bidx.y = by;
            launch.bidx.z = 0;
            launch.fibers.assign(threads, Fiber());
            launch.warps.assign(threads / 32, WarpState());
            launch.live = (int)threads;
            launch.bar_arrived = 0;
            launch.eager_copies = !fixed_schedule() && (schedule(by * gx + bx, 0, threads).start & 1);
            memset(smem_ptr, 0xff, smem);  // NaN in every float format: unwritten tile data shows
            for (unsigned t = 0; t < threads; ++t) {
                Fiber& f = launch.fibers[t];
                f.tid.x = t;
                f.lane = (int)(t % 32);
                f.warp = (int)(t / 32);
                make_context(f.ctx, stacks + t * (kStack + ps) + ps, kStack, entry);
            }
            const bool greedy = !fixed_schedule() && (schedule(by * gx + bx, 1, threads).start & 1);
            for (unsigned pass = 0;; ++pass) {
                unsigned long long before = launch.events;
                bool all_done = true;
                const Order order = schedule(by * gx + bx, pass, threads);
                auto resume = [&](Fiber& f) {
                    current = &f;
                    switch_context(sched, f.ctx);
                    current = nullptr;
                };
                if (greedy) {
                    // Warp by warp (in a permuted order), each run until all its threads wait
                    // at __syncthreads or are done: warps get as far ahead of each other as the
                    // barriers allow.
                    const Order warps = schedule(by * gx + bx, pass + 0x8000u, threads / 32);
                    const Order lanes = schedule(by * gx + bx, pass + 0x4000u, 32);
                    for (unsigned wi = 0; wi < threads / 32 && launch.error.empty(); ++wi) {
                        const unsigned w = warps.at(wi);
                        for (bool moved = true; moved && launch.error.empty();) {
                            unsigned long long ev = launch.events;
                            bool runnable = false;
                            for (unsigned i = 0; i < 32 && launch.error.empty(); ++i) {
                                Fiber& f = launch.fibers[w * 32 + lanes.at(i)];
                                if (f.done || f.at_barrier) continue;
                                runnable = true;
                                resume(f);
                            }
                            moved = runnable && launch.events != ev;
                        }
                    }
                }
                for (unsigned i = 0; i < threads && launch.error.empty(); ++i) {
                    Fiber& f = launch.fibers[order.at(i)];
                    if (f.done) continue;
                    resume(f);
                    if (!f.done) all_done = false;
                }
                if (!launch.error.empty() || all_done) break;
                if (launch.events == before) {
                    char m[120];
                    snprintf(m, sizeof m, "%s, block (%u, %u): deadlock; what each thread waits at:", launch.kernel, bx, by);
                    launch.error = m + describe_waits();
                    break;
                }
            }
        }
    }
    L = nullptr;
    munmap(smem_base, smem_len);
    if (!launch.error.empty()) return error_out(err, errlen, launch.error);
    return 0;
}

}  // extern "C"
