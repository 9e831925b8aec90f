// sanitizer.h: memcheck, racecheck, initcheck and access recording for the interpret
// backend (included by cuda_emulation.h when CUCONV_SANITIZE_BUILD is defined).
//
// The kernel translation unit is compiled with g++'s -fsanitize=kernel-address in
// callback mode, so every load and store of kernel code calls __asan_{load,store}*_noabort
// below with its address, and __builtin_return_address(0) there is the access's PC. The
// runtime is compiled without instrumentation (CUCONV_RUNTIME), and the calls it makes
// into instrumented library code while a kernel is suspended in it are filtered out by
// tl_in_kernel, so only the kernels' own accesses are checked:
//
//   memcheck   the access lies inside an array argument of the launch (its exact byte
//              extent), the block's static or dynamic shared memory, the thread's own
//              fiber stack, or (loads only) the library's read-only data; and it is
//              aligned to its size. An access outside all of them is reported and never
//              performed: the thread ends there, as if it had exited.
//   racecheck  per shared byte, the last write and the last two distinct readers with
//              their barrier interval (epoch) and their warp's epoch: a conflicting pair
//              in one interval by different threads is a hazard unless both threads are
//              in one warp and a warp barrier (__syncwarp, shuffle, vote) separates them.
//   initcheck  a shared byte read before any thread of the block wrote it.
//
// Static __shared__ variables are thread_local statics, so they live in this library's
// TLS block of the OS thread running the block; dl_iterate_phdr gives its address and
// size (the block also holds the runtime's own thread_locals, which kernels never touch).
// g++ never instruments an access it can prove inside a thread_local (a scalar, a
// constant index), so the instrumented build declares each one through `opaque`
// (cuconv._interpret rewrites the declarations), which hides where the pointer points.
#pragma once

namespace cuconv_emu {
namespace san {

enum Check : uint32_t { kMemcheck = 1, kRacecheck = 2, kInitcheck = 4, kRecord = 8 };
enum Kind : uint32_t { kOutOfBounds = 1, kMisaligned = 2, kRaceHazard = 3, kUninitialized = 4 };
// Where an address lies: >= 0 is the index of an array argument.
enum Region : int32_t { kNowhere = -1, kDynamicShared = -2, kStaticShared = -3, kStack = -4, kReadOnly = -5 };

// One finding; mirrored by cuconv._interpret._Finding.
struct Finding {
  uint32_t kind, write, size, other_write;
  uint32_t block[3], thread[3], other_thread[3];
  int32_t region;
  uint64_t address, region_start, region_bytes, site, other_site, block_order;
};

// One recorded access; the layout of cuconv._interpret.ACCESS_DTYPE.
#pragma pack(push, 1)
struct Record {
  uint64_t site;
  uint32_t block, warp;
  uint8_t lane;
  uint32_t nth;
  uint64_t address;
  uint8_t size, write, space;
};
#pragma pack(pop)
static_assert(sizeof(Record) == 32, "Record must match ACCESS_DTYPE");

struct Trace {
  std::vector<std::vector<Record>> blocks;  // per entry of the launch's block list
  std::vector<uint32_t> barriers;
};

// What Python passes to a checked launch and reads back; mirrored by cuconv._interpret._Launch.
struct Launch {
  uint32_t checks, arrays;
  const uint64_t* array_start;  // per array argument: its first byte (0: null pointer)
  const uint64_t* array_bytes;  // and its byte extent
  const uint64_t* blocks;       // the linear block indices to run, in order (null: all)
  uint64_t block_count;
  uint64_t findings;            // out: how many
  Finding first;                // out: the first (lowest block of the list, then earliest)
  Trace* trace;                 // out with kRecord: freed by cuconv_trace_free
};

struct ShadowAccess {
  uint32_t epoch = 0, warp_epoch = 0, site = 0;
  uint16_t thread = 0;
};
struct ShadowByte {
  ShadowAccess write, read[2];
};

// The per-launch state every worker shares.
struct LaunchState {
  Launch* out;
  uint64_t base = 0;  // the library's load address: sites are PCs relative to it
  std::vector<std::pair<uint64_t, uint64_t>> read_only;
  std::mutex mutex;
};

// One OS thread's state during a checked launch.
struct Worker {
  LaunchState* launch;
  BlockRunner* runner;
  uint64_t static_start = 0, static_bytes = 0;  // this thread's TLS block of the library
  uint64_t block_order = 0, linear_block = 0;
  // Epochs count barrier intervals over the worker's lifetime, so a shadow record of an
  // earlier block never equals the current one and needs no reset between blocks.
  uint32_t epoch = 0, block_start_epoch = 0;
  std::vector<uint32_t> warp_epoch;
  std::vector<ShadowByte> shadow;  // static shared bytes, then dynamic
  std::vector<Record>* trace = nullptr;
  std::unordered_map<uint64_t, uint32_t> executions;  // (site, thread) -> count
  uint32_t barriers = 0;
};

inline thread_local Worker* tl_worker = nullptr;

struct ModuleLookup {
  uint64_t probe;
  LaunchState* launch;
  Worker* worker;
};

// static: its address must be this library's own, never another one's definition.
CUCONV_RUNTIME static int find_module(dl_phdr_info* info, size_t, void* data) {
  auto* q = static_cast<ModuleLookup*>(data);
  bool mine = false;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    const uint64_t start = info->dlpi_addr + ph.p_vaddr;
    if (ph.p_type == PT_LOAD && q->probe >= start && q->probe < start + ph.p_memsz) mine = true;
  }
  if (!mine) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    const uint64_t start = info->dlpi_addr + ph.p_vaddr;
    if (q->launch && ph.p_type == PT_LOAD && !(ph.p_flags & PF_W))
      q->launch->read_only.emplace_back(start, start + ph.p_memsz);
    if (q->worker && ph.p_type == PT_TLS && info->dlpi_tls_data) {
      q->worker->static_start = uint64_t(reinterpret_cast<uintptr_t>(info->dlpi_tls_data));
      q->worker->static_bytes = ph.p_memsz;
    }
  }
  if (q->launch) q->launch->base = info->dlpi_addr;
  return 1;
}

// The library's load address and read-only segments (launch), or the calling thread's
// TLS block of it (worker).
CUCONV_RUNTIME inline void locate_module(LaunchState* launch, Worker* worker) {
  ModuleLookup q{uint64_t(reinterpret_cast<uintptr_t>(&find_module)), launch, worker};
  dl_iterate_phdr(find_module, &q);
}

// What a static __shared__ variable is accessed through in this build: g++ cannot see
// which variable the result points to, so it instruments every access.
template <typename T>
CUCONV_RUNTIME_CALL T* opaque(T* p) {
  asm volatile("" : "+r"(p));
  return p;
}

CUCONV_RUNTIME inline void worker_begin(BlockRunner& r, void* state) {
  if (!state) return;
  Worker* w = new Worker();
  w->launch = static_cast<LaunchState*>(state);
  w->runner = &r;
  locate_module(nullptr, w);  // after tl_runner is set, so this thread's TLS block exists
  tl_worker = w;
}

CUCONV_RUNTIME inline void worker_end() {
  delete tl_worker;
  tl_worker = nullptr;
}

CUCONV_RUNTIME inline void block_begin(uint64_t order, uint64_t linear) {
  Worker* w = tl_worker;
  if (!w) return;
  w->block_order = order;
  w->linear_block = linear;
  w->block_start_epoch = ++w->epoch;
  w->warp_epoch.assign((w->runner->fibers.size() + kWarpSize - 1) / kWarpSize, 0);
  w->executions.clear();
  w->barriers = 0;
  Launch* out = w->launch->out;
  w->trace = (out->checks & kRecord) ? &out->trace->blocks[order] : nullptr;
}

CUCONV_RUNTIME inline void block_end() {
  Worker* w = tl_worker;
  if (w && w->trace) w->launch->out->trace->barriers[w->block_order] = w->barriers;
}

CUCONV_RUNTIME inline void block_barrier_released() {
  if (Worker* w = tl_worker) {
    ++w->epoch;
    ++w->barriers;
  }
}

CUCONV_RUNTIME inline void warp_barrier_released(int warp) {
  if (Worker* w = tl_worker) ++w->warp_epoch[warp];
}

CUCONV_RUNTIME inline void report(Worker* w, Finding f) {
  BlockRunner& r = *w->runner;
  const dim3 t = r.fibers[r.current].thread_idx;
  f.block[0] = tl_block_idx.x, f.block[1] = tl_block_idx.y, f.block[2] = tl_block_idx.z;
  f.thread[0] = t.x, f.thread[1] = t.y, f.thread[2] = t.z;
  f.block_order = w->block_order;
  std::lock_guard<std::mutex> lock(w->launch->mutex);
  Launch* out = w->launch->out;
  if (out->findings++ == 0 || f.block_order < out->first.block_order) out->first = f;
}

// Whether [a, a + size) lies in [s, s + n); if not, tracks the nearest such region.
struct Nearest {
  uint64_t distance = ~0ull, start = 0, bytes = 0;
  int32_t region = kNowhere;
};
CUCONV_RUNTIME inline bool inside(uint64_t a, uint64_t size, int32_t region, uint64_t s, uint64_t n,
                                  Nearest& nearest) {
  if (a >= s && a + size <= s + n) return true;
  const uint64_t d = a < s ? s - a : a + size - (s + n);
  if (d < nearest.distance) nearest = Nearest{d, s, n, region};
  return false;
}

// The region holding [a, a + size) with its `start` and `bytes`, or kNowhere (then
// `nearest` is the closest region, for the report).
CUCONV_RUNTIME inline int32_t classify(Worker* w, uint64_t a, uint64_t size, bool write, uint64_t& start,
                                       uint64_t& bytes, Nearest& nearest) {
  BlockRunner& r = *w->runner;
  Launch* out = w->launch->out;
  for (uint32_t i = 0; i < out->arrays; ++i) {
    start = out->array_start[i], bytes = out->array_bytes[i];
    if (start && inside(a, size, int32_t(i), start, bytes, nearest)) return int32_t(i);
  }
  start = uint64_t(reinterpret_cast<uintptr_t>(r.dynamic_shared.data())), bytes = r.dynamic_shared.size();
  if (bytes && inside(a, size, kDynamicShared, start, bytes, nearest)) return kDynamicShared;
  start = w->static_start, bytes = w->static_bytes;
  if (bytes && inside(a, size, kStaticShared, start, bytes, nearest)) return kStaticShared;
  start = uint64_t(reinterpret_cast<uintptr_t>(r.stacks)) + uint64_t(r.current) * r.stack_bytes;
  bytes = r.stack_bytes;
  if (inside(a, size, kStack, start, bytes, nearest)) return kStack;
  if (!write)
    for (auto& [s, e] : w->launch->read_only)
      if (a >= s && a + size <= e) {
        start = s, bytes = e - s;
        return kReadOnly;
      }
  return kNowhere;
}

CUCONV_RUNTIME inline bool unordered(const ShadowAccess& a, const ShadowAccess& b) {
  if (a.thread == b.thread) return false;
  return a.thread / kWarpSize != b.thread / kWarpSize || a.warp_epoch >= b.warp_epoch;
}

// racecheck and initcheck of one shared-memory access; `offset` indexes w->shadow.
CUCONV_RUNTIME inline void check_shared(Worker* w, uint64_t offset, uint64_t size, bool write, bool atomic,
                                        uint32_t site, uint64_t address) {
  const uint32_t checks = w->launch->out->checks;
  if (!(checks & (kRacecheck | kInitcheck))) return;
  BlockRunner& r = *w->runner;
  if (w->shadow.empty()) w->shadow.resize(w->static_bytes + r.dynamic_shared.size());
  const int thread = r.current;
  const ShadowAccess now{w->epoch, w->warp_epoch[thread / kWarpSize], site, uint16_t(thread)};
  bool reported = false;
  auto hazard = [&](const ShadowAccess& earlier, bool earlier_write, Kind kind) {
    if (reported) return;
    reported = true;
    Finding f{};
    f.kind = kind, f.write = write, f.size = uint32_t(size), f.other_write = earlier_write;
    f.address = address, f.site = site, f.other_site = earlier.site;
    f.region = offset < w->static_bytes ? kStaticShared : kDynamicShared;
    f.region_start = offset < w->static_bytes ? w->static_start
                                           : uint64_t(reinterpret_cast<uintptr_t>(r.dynamic_shared.data()));
    f.region_bytes = offset < w->static_bytes ? w->static_bytes : r.dynamic_shared.size();
    const dim3 t = r.fibers[earlier.thread].thread_idx;
    f.other_thread[0] = t.x, f.other_thread[1] = t.y, f.other_thread[2] = t.z;
    report(w, f);
  };
  const bool race = (checks & kRacecheck) && !atomic;
  for (uint64_t i = 0; i < size; ++i) {
    ShadowByte& s = w->shadow[offset + i];
    if (write) {
      if (race && s.write.epoch == now.epoch && unordered(s.write, now)) hazard(s.write, true, kRaceHazard);
      for (auto& rd : s.read)
        if (race && rd.epoch == now.epoch && unordered(rd, now)) hazard(rd, false, kRaceHazard);
      s.write = now;
    } else {
      if ((checks & kInitcheck) && s.write.epoch < w->block_start_epoch) hazard(now, false, kUninitialized);
      else if (race && s.write.epoch == now.epoch && unordered(s.write, now)) hazard(s.write, true, kRaceHazard);
      // Keep the two most recent distinct readers of this interval.
      if (s.read[0].epoch != now.epoch) {
        s.read[0] = now;
        s.read[1].epoch = 0;
      } else if (s.read[0].thread != now.thread) {
        s.read[1] = s.read[0];
        s.read[0] = now;
      } else {
        s.read[0] = now;
      }
    }
  }
}

[[noreturn]] CUCONV_RUNTIME inline void end_thread(BlockRunner& r) {
  r.fibers[r.current].state = FiberState::Done;
  tl_in_kernel = false;
  _longjmp(r.scheduler_point, 1);
}

CUCONV_RUNTIME inline void on_access(const void* p, uint64_t size, bool write, const void* pc, bool atomic = false) {
  Worker* w = tl_worker;
  if (!w || !tl_in_kernel || size == 0) return;
  const uint64_t a = uint64_t(reinterpret_cast<uintptr_t>(p));
  const uint64_t site = uint64_t(reinterpret_cast<uintptr_t>(pc)) - w->launch->base;
  const uint32_t checks = w->launch->out->checks;
  uint64_t start = 0, bytes = 0;
  RuntimeScope scope;  // what the checks call (std::, lambdas) is instrumented: not kernel code
  Nearest nearest;
  const int32_t region = classify(w, a, size, write, start, bytes, nearest);
  if (region == kNowhere) {
    // Outside all known memory: reported (memcheck's bounds check is always on in an
    // instrumented build, so a bad access is never silent) and never performed.
    Finding f{};
    f.kind = kOutOfBounds, f.write = write, f.size = uint32_t(size), f.address = a, f.site = site;
    f.region = nearest.region, f.region_start = nearest.start, f.region_bytes = nearest.bytes;
    report(w, f);
    end_thread(*w->runner);
  }
  const bool shared = region == kDynamicShared || region == kStaticShared;
  if ((checks & kMemcheck) && region != kStack && (size & (size - 1)) == 0 && size <= 16 && a % size) {
    Finding f{};
    f.kind = kMisaligned, f.write = write, f.size = uint32_t(size), f.address = a, f.site = site;
    f.region = region, f.region_start = start, f.region_bytes = bytes;
    report(w, f);
  }
  if (w->trace) {
    BlockRunner& r = *w->runner;
    const uint64_t key = (site << 11) | uint64_t(r.current);
    Record rec;
    rec.site = site;
    rec.block = uint32_t(w->linear_block);
    rec.warp = uint32_t(r.current / kWarpSize);
    rec.lane = uint8_t(r.current % kWarpSize);
    rec.nth = w->executions[key]++;
    rec.address = a;
    rec.size = uint8_t(std::min<uint64_t>(size, 255));
    rec.write = write;
    rec.space = shared ? 1 : region == kStack ? 2 : 0;
    w->trace->push_back(rec);
  }
  if (shared) {
    const uint64_t offset =
        region == kStaticShared ? a - w->static_start : w->static_bytes + (a - start);
    check_shared(w, offset, size, write, atomic, uint32_t(site), a);
  }
}

}  // namespace san

}  // namespace cuconv_emu

#define CUCONV_SAN_CALLBACKS(n)                                                                             \
  extern "C" CUCONV_RUNTIME void __asan_load##n##_noabort(void* p) {                                         \
    cuconv_emu::san::on_access(p, n, false, __builtin_return_address(0));                                    \
  }                                                                                                          \
  extern "C" CUCONV_RUNTIME void __asan_store##n##_noabort(void* p) {                                        \
    cuconv_emu::san::on_access(p, n, true, __builtin_return_address(0));                                     \
  }
CUCONV_SAN_CALLBACKS(1)
CUCONV_SAN_CALLBACKS(2)
CUCONV_SAN_CALLBACKS(4)
CUCONV_SAN_CALLBACKS(8)
CUCONV_SAN_CALLBACKS(16)
#undef CUCONV_SAN_CALLBACKS
// g++ declares these with a signed size.
extern "C" CUCONV_RUNTIME void __asan_loadN_noabort(void* p, long n) {
  cuconv_emu::san::on_access(p, uint64_t(n), false, __builtin_return_address(0));
}
extern "C" CUCONV_RUNTIME void __asan_storeN_noabort(void* p, long n) {
  cuconv_emu::san::on_access(p, uint64_t(n), true, __builtin_return_address(0));
}
extern "C" CUCONV_RUNTIME void __asan_handle_no_return() {}


// The recorded trace of a kRecord launch, handed to Python in block-list order.
extern "C" CUCONV_RUNTIME unsigned long long cuconv_trace_size(const cuconv_emu::san::Launch* out) {
  unsigned long long n = 0;
  for (auto& b : out->trace->blocks) n += b.size();
  return n;
}
extern "C" CUCONV_RUNTIME void cuconv_trace_copy(const cuconv_emu::san::Launch* out, void* accesses,
                                                 unsigned* barriers) {
  auto* dst = static_cast<cuconv_emu::san::Record*>(accesses);
  for (auto& b : out->trace->blocks) dst = std::copy(b.begin(), b.end(), dst);
  std::copy(out->trace->barriers.begin(), out->trace->barriers.end(), barriers);
}
extern "C" CUCONV_RUNTIME void cuconv_trace_free(cuconv_emu::san::Launch* out) {
  delete out->trace;
  out->trace = nullptr;
}
