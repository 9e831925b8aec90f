// cuda_emulation.h: runs cuconv's CUDA kernels on the host, unchanged.
//
// The interpret backend compiles a kernels_cu/*.cu file with the system C++
// compiler and this header force-included (g++ -include). It provides the CUDA
// names the kernels use and a launcher that executes a grid:
//
//   grid    blocks are shared out to OS threads (CUCONV_INTERPRET_THREADS, default
//           all cores); each OS thread runs one block at a time.
//   block   every CUDA thread of the block is a fiber with its own stack. A fiber
//           runs until it reaches a barrier (__syncthreads, a warp shuffle/vote,
//           __syncwarp) or returns; the block scheduler releases a block barrier
//           when every live thread waits at one, and a warp barrier when every live
//           lane of that warp does. A barrier nobody can release (a __syncthreads
//           in divergent code) is reported as an error instead of hanging.
//   memory  __shared__ variables are thread_local statics (one copy per OS thread,
//           i.e. per running block); dynamic shared memory is a per-block buffer
//           filled with 0xFF bytes (NaN for every float type) before each block, so
//           a read of an unwritten element shows up in the results.
//   atomics real host atomics, because blocks run concurrently.
//
// Fibers are entered the first time with swapcontext and switched afterwards with
// _setjmp/_longjmp, which skip the signal-mask system call swapcontext makes on
// every switch (the switch count is threads x barriers, so this dominates).
//
// With CUCONV_SANITIZE_BUILD (the instrumented variant, see sanitizer.h) the runtime
// below is marked CUCONV_RUNTIME, i.e. left uninstrumented, and the kernels read
// threadIdx & co. through accessor functions, so the only memory instrumented kernel
// code touches is its arguments, shared memory, its own stack and read-only data.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>
#include <ucontext.h>

#ifdef CUCONV_SANITIZE_BUILD
#include <dlfcn.h>
#include <link.h>

#include <mutex>
#include <unordered_map>
#define CUCONV_RUNTIME __attribute__((no_sanitize("kernel-address")))
// Also kept out of line, so __builtin_return_address(0) inside is the kernel's PC.
#define CUCONV_RUNTIME_CALL __attribute__((no_sanitize("kernel-address"), noinline))
#else
#define CUCONV_RUNTIME
#define CUCONV_RUNTIME_CALL
#endif

#define CUCONV_INTERPRET 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuconv_emu {

constexpr int kWarpSize = 32;

enum class FiberState : unsigned char { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
  dim3 thread_idx;
  FiberState state = FiberState::Runnable;
  bool started = false;
  jmp_buf resume_point;
  ucontext_t first_entry;
};

// Everything one OS thread needs to run one block.
struct BlockRunner {
  std::vector<Fiber> fibers;
  char* stacks = nullptr;
  size_t stack_bytes = 0;
  std::vector<uint64_t> warp_slots;        // one exchange slot per thread
  std::vector<unsigned char> dynamic_shared;
  void (*run_thread)(void*) = nullptr;     // runs the kernel body for the current fiber
  void* run_thread_arg = nullptr;
  int current = 0;
  jmp_buf scheduler_point;
  ucontext_t scheduler_context;
  std::string error;
};

inline thread_local BlockRunner* tl_runner = nullptr;
inline thread_local dim3 tl_thread_idx, tl_block_idx, tl_block_dim, tl_grid_dim;

// What threadIdx, blockIdx, blockDim and gridDim read.
CUCONV_RUNTIME inline dim3 thread_idx() { return tl_thread_idx; }
CUCONV_RUNTIME inline dim3 block_idx() { return tl_block_idx; }
CUCONV_RUNTIME inline dim3 block_dim() { return tl_block_dim; }
CUCONV_RUNTIME inline dim3 grid_dim() { return tl_grid_dim; }

#ifdef CUCONV_SANITIZE_BUILD
// True while kernel code runs; runtime entry points called from a kernel clear it for
// their duration (RuntimeScope), so the library code they call is not checked.
inline thread_local bool tl_in_kernel = false;
struct RuntimeScope {
  bool saved;
  CUCONV_RUNTIME RuntimeScope() : saved(tl_in_kernel) { tl_in_kernel = false; }
  CUCONV_RUNTIME ~RuntimeScope() { tl_in_kernel = saved; }
};
#else
struct RuntimeScope {};
#endif

}  // namespace cuconv_emu

#ifdef CUCONV_SANITIZE_BUILD
#include "sanitizer.h"
#else
namespace cuconv_emu::san {
inline void worker_begin(BlockRunner&, void*) {}
inline void worker_end() {}
inline void block_begin(uint64_t, uint64_t) {}
inline void block_end() {}
inline void block_barrier_released() {}
inline void warp_barrier_released(int) {}
inline void on_access(const void*, uint64_t, bool, const void*, bool = false) {}
}  // namespace cuconv_emu::san
#endif

namespace cuconv_emu {

CUCONV_RUNTIME inline int linear_thread() {
  return int(tl_thread_idx.x + tl_block_dim.x * (tl_thread_idx.y + tl_block_dim.y * tl_thread_idx.z));
}

// Suspends the current fiber in `state` and returns when the scheduler resumes it.
CUCONV_RUNTIME inline void wait_at(FiberState state) {
  RuntimeScope scope;
  BlockRunner* r = tl_runner;
  Fiber& f = r->fibers[r->current];
  f.state = state;
  if (!_setjmp(f.resume_point)) _longjmp(r->scheduler_point, 1);
}

CUCONV_RUNTIME inline void fiber_entry() {
  BlockRunner* r = tl_runner;
#ifdef CUCONV_SANITIZE_BUILD
  tl_in_kernel = true;
  r->run_thread(r->run_thread_arg);
  tl_in_kernel = false;
#else
  r->run_thread(r->run_thread_arg);
#endif
  r->fibers[r->current].state = FiberState::Done;
  _longjmp(r->scheduler_point, 1);
}

// Releases the barriers that every live participant has reached; false if none can be.
CUCONV_RUNTIME inline bool release_barriers(BlockRunner& r) {
  const int n = int(r.fibers.size());
  bool released = false, all_at_block = true, any_live = false;
  for (int w0 = 0; w0 < n; w0 += kWarpSize) {
    const int w1 = std::min(n, w0 + kWarpSize);
    bool warp_ready = false, warp_blocked = false;
    for (int i = w0; i < w1; ++i) {
      FiberState s = r.fibers[i].state;
      if (s == FiberState::AtWarpBarrier) warp_ready = true;
      if (s == FiberState::AtBlockBarrier) warp_blocked = true;
    }
    if (warp_ready && !warp_blocked) {
      for (int i = w0; i < w1; ++i)
        if (r.fibers[i].state == FiberState::AtWarpBarrier) r.fibers[i].state = FiberState::Runnable;
      san::warp_barrier_released(w0 / kWarpSize);
      released = true;
    }
  }
  if (released) return true;
  for (auto& f : r.fibers) {
    if (f.state == FiberState::Done) continue;
    any_live = true;
    if (f.state != FiberState::AtBlockBarrier) all_at_block = false;
  }
  if (!any_live || !all_at_block) return false;
  for (auto& f : r.fibers)
    if (f.state == FiberState::AtBlockBarrier) f.state = FiberState::Runnable;
  san::block_barrier_released();
  return true;
}

// Runs every thread of the current block (tl_block_idx) to completion.
CUCONV_RUNTIME inline void run_block(BlockRunner& r) {
  const dim3 bd = tl_block_dim;
  const int n = int(bd.x * bd.y * bd.z);
  for (int i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.thread_idx = dim3(i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y));
    f.state = FiberState::Runnable;
    f.started = false;
  }
  std::fill(r.dynamic_shared.begin(), r.dynamic_shared.end(), (unsigned char)0xFF);
  for (;;) {
    for (int i = 0; i < n; ++i) {
      Fiber& f = r.fibers[i];
      if (f.state != FiberState::Runnable) continue;
      r.current = i;
      tl_thread_idx = f.thread_idx;
      if (_setjmp(r.scheduler_point)) continue;  // the fiber yielded or finished
      if (f.started) _longjmp(f.resume_point, 1);
      f.started = true;
      getcontext(&f.first_entry);
      f.first_entry.uc_stack.ss_sp = r.stacks + size_t(i) * r.stack_bytes;
      f.first_entry.uc_stack.ss_size = r.stack_bytes;
      f.first_entry.uc_link = nullptr;
      makecontext(&f.first_entry, fiber_entry, 0);
      swapcontext(&r.scheduler_context, &f.first_entry);
    }
    bool all_done = true;
    for (int i = 0; i < n; ++i) all_done &= r.fibers[i].state == FiberState::Done;
    if (all_done) return;
    if (!release_barriers(r)) {
      int at_block = 0, at_warp = 0, done = 0;
      for (int i = 0; i < n; ++i) {
        at_block += r.fibers[i].state == FiberState::AtBlockBarrier;
        at_warp += r.fibers[i].state == FiberState::AtWarpBarrier;
        done += r.fibers[i].state == FiberState::Done;
      }
      char msg[256];
      std::snprintf(msg, sizeof msg,
                    "barrier deadlock in block (%u,%u,%u): %d threads at __syncthreads, "
                    "%d at a warp barrier, %d exited (a barrier in divergent code?)",
                    tl_block_idx.x, tl_block_idx.y, tl_block_idx.z, at_block, at_warp, done);
      r.error = msg;
      return;
    }
  }
}

CUCONV_RUNTIME inline size_t fiber_stack_bytes() {
  const char* env = std::getenv("CUCONV_INTERPRET_STACK_KB");
  size_t kb = env ? size_t(std::strtoul(env, nullptr, 10)) : 256;
  return std::max<size_t>(kb, 16) * 1024;
}

CUCONV_RUNTIME inline int worker_count(unsigned long long blocks) {
  const char* env = std::getenv("CUCONV_INTERPRET_THREADS");
  long n = env ? std::strtol(env, nullptr, 10) : long(std::thread::hardware_concurrency());
  n = std::max(1L, n);
  return int(std::min<unsigned long long>(blocks, (unsigned long long)n));
}

// Launches run_thread(arg) for every thread of every block (or of the `listed` linear
// block indices, if given); returns "" or an error. `sanitizer` is a checked launch's
// san::LaunchState, null otherwise.
CUCONV_RUNTIME inline std::string launch_grid(dim3 grid, dim3 block, size_t dynamic_shared_bytes,
                                              void (*run_thread)(void*), void* arg, void* sanitizer = nullptr,
                                              const uint64_t* listed = nullptr, uint64_t listed_count = 0) {
  const unsigned long long blocks = listed ? listed_count : 1ull * grid.x * grid.y * grid.z;
  const int threads_per_block = int(block.x * block.y * block.z);
  if (blocks == 0 || threads_per_block == 0) return "empty grid or block";
  if (threads_per_block > 1024) return "more than 1024 threads per block";
  std::atomic<unsigned long long> next_block{0};
  std::vector<std::string> errors(worker_count(blocks));
  auto worker = [&](int w) {
    BlockRunner r;
    r.fibers.resize(threads_per_block);
    r.stack_bytes = fiber_stack_bytes();
    r.stacks = static_cast<char*>(std::malloc(r.stack_bytes * threads_per_block));
    if (!r.stacks) { errors[w] = "out of memory for fiber stacks"; return; }
    r.warp_slots.assign(threads_per_block, 0);
    r.dynamic_shared.assign(dynamic_shared_bytes, 0);
    r.run_thread = run_thread;
    r.run_thread_arg = arg;
    tl_runner = &r;
    tl_block_dim = block;
    tl_grid_dim = grid;
    san::worker_begin(r, sanitizer);
    for (unsigned long long i; (i = next_block.fetch_add(1)) < blocks && r.error.empty();) {
      const unsigned long long b = listed ? listed[i] : i;
      tl_block_idx = dim3(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y),
                          unsigned(b / (1ull * grid.x * grid.y)));
      san::block_begin(i, b);
      run_block(r);
      san::block_end();
    }
    san::worker_end();
    std::free(r.stacks);
    tl_runner = nullptr;
    errors[w] = r.error;
  };
  std::vector<std::thread> pool;
  for (int w = 1; w < int(errors.size()); ++w) pool.emplace_back(worker, w);
  worker(0);
  for (auto& t : pool) t.join();
  for (auto& e : errors)
    if (!e.empty()) return e;
  return "";
}

// --- warp exchange: every lane publishes a value, waits, reads a peer's, waits again ---
template <typename T>
CUCONV_RUNTIME inline T exchange(T value, int (*source_lane)(int lane, int arg, int width), int arg, int width) {
  static_assert(sizeof(T) <= 8, "warp exchange of a type wider than 8 bytes");
  RuntimeScope scope;
  BlockRunner* r = tl_runner;
  const int me = linear_thread();
  const int base = me - me % kWarpSize;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  r->warp_slots[me] = bits;
  wait_at(FiberState::AtWarpBarrier);
  const int src = source_lane(me - base, arg, width);
  T out = value;
  if (src >= 0 && base + src < int(r->fibers.size())) std::memcpy(&out, &r->warp_slots[base + src], sizeof(T));
  wait_at(FiberState::AtWarpBarrier);  // nobody overwrites a slot before every lane has read
  return out;
}

CUCONV_RUNTIME inline int lane_idx(int lane, int src, int width) { return (lane & ~(width - 1)) + (src & (width - 1)); }
CUCONV_RUNTIME inline int lane_down(int lane, int delta, int width) {
  int s = lane + delta;
  return (s & ~(width - 1)) == (lane & ~(width - 1)) ? s : lane;
}
CUCONV_RUNTIME inline int lane_up(int lane, int delta, int width) {
  int s = lane - delta;
  return s >= (lane & ~(width - 1)) ? s : lane;
}
CUCONV_RUNTIME inline int lane_xor(int lane, int mask, int width) {
  int s = lane ^ mask;
  return (s & ~(width - 1)) == (lane & ~(width - 1)) ? s : lane;
}

CUCONV_RUNTIME inline unsigned ballot(bool predicate) {
  RuntimeScope scope;
  BlockRunner* r = tl_runner;
  const int me = linear_thread();
  const int base = me - me % kWarpSize;
  r->warp_slots[me] = predicate ? 1 : 0;
  wait_at(FiberState::AtWarpBarrier);
  unsigned mask = 0;
  const int n = int(r->fibers.size());
  for (int l = 0; l < kWarpSize && base + l < n; ++l)
    if (r->fibers[base + l].state != FiberState::Done && r->warp_slots[base + l]) mask |= 1u << l;
  wait_at(FiberState::AtWarpBarrier);
  return mask;
}

// An atomic read-modify-write; `pc` is the kernel's call site, for the sanitizers.
template <typename T, typename F>
CUCONV_RUNTIME inline T atomic_update(T* address, F op, const void* pc) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomic on an unsupported width");
  san::on_access(address, sizeof(T), true, pc, /*atomic=*/true);
  RuntimeScope scope;
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits* a = reinterpret_cast<Bits*>(address);
  Bits seen = __atomic_load_n(a, __ATOMIC_RELAXED);
  for (;;) {
    T old;
    std::memcpy(&old, &seen, sizeof(T));
    T updated = op(old);
    Bits want;
    std::memcpy(&want, &updated, sizeof(T));
    if (__atomic_compare_exchange_n(a, &seen, want, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return old;
  }
}

CUCONV_RUNTIME inline unsigned char* dynamic_shared_memory() { return tl_runner->dynamic_shared.data(); }

// Calls kernel(args...) with each argument read from the pointer array a launcher gets.
template <typename... Args>
struct KernelCall {
  void (*kernel)(Args...);
  void** args;
  template <size_t... I>
  CUCONV_RUNTIME void call(std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<Args>>*>(args[I])...);
  }
  CUCONV_RUNTIME static void run(void* self) { static_cast<KernelCall*>(self)->call(std::index_sequence_for<Args...>{}); }
};

// The parameter count of a kernel: the launcher's args array must hold exactly this many.
template <typename... Args>
constexpr int kernel_arity(void (*)(Args...)) {
  return int(sizeof...(Args));
}

template <typename... Args>
CUCONV_RUNTIME inline int launch(void (*kernel)(Args...), const unsigned* grid, const unsigned* block,
                                 unsigned long long shared_bytes, void** args, char* error, int error_bytes) {
  KernelCall<Args...> call{kernel, args};
  std::string e = launch_grid(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]),
                              size_t(shared_bytes), &KernelCall<Args...>::run, &call);
  if (e.empty()) return 0;
  std::snprintf(error, size_t(error_bytes), "%s", e.c_str());
  return 1;
}

#ifdef CUCONV_SANITIZE_BUILD
// A checked launch: runs the grid (or out->blocks) with out->checks, filling out's findings and trace.
template <typename... Args>
CUCONV_RUNTIME inline int launch_checked(void (*kernel)(Args...), const unsigned* grid, const unsigned* block,
                                         unsigned long long shared_bytes, void** args, san::Launch* out,
                                         char* error, int error_bytes) {
  san::LaunchState state;
  state.out = out;
  san::locate_module(&state, nullptr);
  out->findings = 0;
  out->first = san::Finding{};
  out->trace = nullptr;
  const uint64_t count = out->blocks ? out->block_count : 1ull * grid[0] * grid[1] * grid[2];
  if (out->checks & san::kRecord) {
    out->trace = new san::Trace();
    out->trace->blocks.resize(count);
    out->trace->barriers.assign(count, 0);
  }
  KernelCall<Args...> call{kernel, args};
  std::string e = launch_grid(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]),
                              size_t(shared_bytes), &KernelCall<Args...>::run, &call, &state, out->blocks,
                              count);
  if (e.empty()) return 0;
  std::snprintf(error, size_t(error_bytes), "%s", e.c_str());
  return 1;
}
#endif

}  // namespace cuconv_emu

#define threadIdx (::cuconv_emu::thread_idx())
#define blockIdx (::cuconv_emu::block_idx())
#define blockDim (::cuconv_emu::block_dim())
#define gridDim (::cuconv_emu::grid_dim())
#define warpSize 32

CUCONV_RUNTIME inline void __syncthreads() { cuconv_emu::wait_at(cuconv_emu::FiberState::AtBlockBarrier); }
CUCONV_RUNTIME inline void __syncwarp(unsigned = 0xffffffffu) { cuconv_emu::wait_at(cuconv_emu::FiberState::AtWarpBarrier); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T> inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  return cuconv_emu::exchange(v, cuconv_emu::lane_idx, src, width);
}
template <typename T> inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  return cuconv_emu::exchange(v, cuconv_emu::lane_down, int(delta), width);
}
template <typename T> inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  return cuconv_emu::exchange(v, cuconv_emu::lane_up, int(delta), width);
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  return cuconv_emu::exchange(v, cuconv_emu::lane_xor, mask, width);
}
inline unsigned __ballot_sync(unsigned, int pred) { return cuconv_emu::ballot(pred != 0); }
inline int __any_sync(unsigned, int pred) { return cuconv_emu::ballot(pred != 0) != 0; }
inline int __all_sync(unsigned, int pred) {
  const unsigned live = cuconv_emu::ballot(true);
  return cuconv_emu::ballot(pred != 0) == live;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(unsigned(v)); }

#define CUCONV_PC __builtin_return_address(0)
template <typename T> CUCONV_RUNTIME_CALL inline T atomicAdd(T* a, T v) {
  return cuconv_emu::atomic_update(a, [v](T o) { return T(o + v); }, CUCONV_PC);
}
template <typename T> CUCONV_RUNTIME_CALL inline T atomicMax(T* a, T v) {
  return cuconv_emu::atomic_update(a, [v](T o) { return o < v ? v : o; }, CUCONV_PC);
}
template <typename T> CUCONV_RUNTIME_CALL inline T atomicMin(T* a, T v) {
  return cuconv_emu::atomic_update(a, [v](T o) { return v < o ? v : o; }, CUCONV_PC);
}
template <typename T> CUCONV_RUNTIME_CALL inline T atomicExch(T* a, T v) {
  return cuconv_emu::atomic_update(a, [v](T) { return v; }, CUCONV_PC);
}
template <typename T> CUCONV_RUNTIME_CALL inline T atomicCAS(T* a, T compare, T v) {
  return cuconv_emu::atomic_update(a, [compare, v](T o) { return o == compare ? v : o; }, CUCONV_PC);
}
#undef CUCONV_PC

template <typename T> inline T __ldg(const T* p) { return *p; }
using std::fma;
using std::max;
using std::min;
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float v) { return std::exp(v); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }

// --- half and bfloat16 with the conversion functions of cuda_fp16.h / cuda_bf16.h ---
struct __half {
  _Float16 value;
  __half() = default;
};
inline float __half2float(__half h) { return float(h.value); }
inline __half __float2half(float f) { __half h; h.value = _Float16(f); return h; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __double2half(double d) { __half h; h.value = _Float16(d); return h; }
inline unsigned short __half_as_ushort(__half h) { unsigned short u; std::memcpy(&u, &h, 2); return u; }
inline __half __ushort_as_half(unsigned short u) { __half h; std::memcpy(&h, &u, 2); return h; }

struct __nv_bfloat16 {
  unsigned short bits;
  __nv_bfloat16() = default;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, as cuda_bf16.h and ml_dtypes do; NaN stays a (quiet) NaN.
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.bits = uint16_t((u >> 16) | 0x0040u);
    return b;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  b.bits = uint16_t(u >> 16);
  return b;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
