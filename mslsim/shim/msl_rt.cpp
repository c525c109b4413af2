// Runs a Metal compute kernel, compiled as C++, on the CPU with threadgroup,
// barrier and SIMD-group semantics.
//
// Every GPU thread is a fiber with its own small stack. A threadgroup runs on
// one OS thread in rounds: each runnable fiber runs until it reaches a sync
// point (threadgroup_barrier, any simd_*/quad_* call, or return). When no
// fiber can run, the scheduler resolves, in this order:
//   1. a SIMD group whose live lanes all wait at the same SIMD call site
//      completes (every lane sees the values all lanes published);
//   2. a barrier completes once every live thread waits on it; different
//      sites are a divergent-barrier error, threads that already returned a
//      warning (an error in strict mode);
//   3. otherwise the waiting subset of a SIMD group completes (divergent
//      code: lanes that are not there read poison);
//   4. otherwise it is a deadlock.
// Groups are spread over a few worker threads. The order fibers run in
// (forward, reverse, seeded random) must never change a correct kernel's
// output: that is how missing barriers show up.
//
// This file is compiled without MSL macros and, under TSan, without
// instrumentation, so its own bookkeeping is invisible to the race detector;
// barriers and SIMD ops are explicit release/acquire edges instead.

#include "msl_rt.h"

#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

extern "C" void msl_kernel_entry(void* const* buffers, const msl::rt::ThreadAttrs& attrs);

#if defined(MSL_TSAN)
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif
#if defined(MSL_ASAN)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
}
#endif

namespace msl::rt {
namespace {

// ---------------------------------------------------------------- contexts

#if defined(__x86_64__)
extern "C" void msl_switch_context(void** save_sp, void* load_sp);
extern "C" void msl_fiber_trampoline();
// Saves the callee-saved registers and the FP control words on the current
// stack, stores the stack pointer, and resumes the other context.
asm(R"(
  .text
  .globl msl_switch_context
  .type msl_switch_context,@function
msl_switch_context:
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
  .size msl_switch_context, .-msl_switch_context
  .globl msl_fiber_trampoline
  .type msl_fiber_trampoline,@function
msl_fiber_trampoline:
  movq %rbx, %rdi
  callq *%r12
  ud2
  .size msl_fiber_trampoline, .-msl_fiber_trampoline
)");

struct Context {
  void* sp = nullptr;
};

void context_init(Context& c, char* stack_lo, size_t size, void (*fn)(void*), void* arg) {
  auto* sp = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack_lo) + size) & ~uintptr_t(15));
  *--sp = reinterpret_cast<uint64_t>(&msl_fiber_trampoline);  // return address
  *--sp = 0;                                                  // rbp: ends frame-pointer unwinds
  *--sp = reinterpret_cast<uint64_t>(arg);                    // rbx
  *--sp = reinterpret_cast<uint64_t>(fn);                     // r12
  *--sp = 0;                                                  // r13
  *--sp = 0;                                                  // r14
  *--sp = 0;                                                  // r15
  *--sp = 0x0000037F00001F80ULL;                              // default MXCSR, x87 control word
  c.sp = sp;
}

inline void context_switch(Context& from, Context& to) { msl_switch_context(&from.sp, to.sp); }
#else  // portable but slower: swapcontext saves the signal mask with a syscall
struct Context {
  ucontext_t uc;
};
void (*g_entry_fn)(void*);
void ucontext_entry(unsigned lo, unsigned hi) {
  g_entry_fn(reinterpret_cast<void*>((uintptr_t(hi) << 32) | lo));
}
void context_init(Context& c, char* stack_lo, size_t size, void (*fn)(void*), void* arg) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack_lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  g_entry_fn = fn;
  auto p = reinterpret_cast<uintptr_t>(arg);
  makecontext(&c.uc, reinterpret_cast<void (*)()>(ucontext_entry), 2, unsigned(p), unsigned(p >> 32));
}
inline void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------ state

enum class State : uint8_t { kRunnable, kBarrier, kSimd, kDone };

constexpr size_t kTgLimit = 32 * 1024;  // Metal's threadgroup memory limit
constexpr size_t kTgGap = 64;           // poisoned canary after every array
constexpr int kTgSlots = 64;
constexpr size_t kTgArena = kTgLimit + kTgSlots * (kTgGap + 64) + 4096;
constexpr long kSpinLimit = 1 << 20;    // rounds of pure atomic spinning before "deadlock"
#if defined(MSL_ASAN) || defined(MSL_TSAN)
constexpr size_t kStackSize = 256 * 1024;
#else
constexpr size_t kStackSize = 64 * 1024;
#endif

struct Worker;

struct Fiber {
  Context ctx;
  State state = State::kDone;
  unsigned line = 0, col = 0, flags = 0;
  uint32_t gen = 0;
  int tid = 0;
  ThreadAttrs attrs{};
  char* stack_lo = nullptr;
  Worker* worker = nullptr;
#if defined(MSL_TSAN)
  void* tsan = nullptr;
#endif
#if defined(MSL_ASAN)
  void* fake = nullptr;
#endif
};

struct SimdGroup {
  uint32_t gen = 0;
  SimdSnapshot snap;
  alignas(16) unsigned char pending[kSimdWidth][kSlotBytes];
  char sync[2];  // TSan release/acquire addresses, alternating per completion
};

struct TgSlot {
  unsigned char* ptr = nullptr;
  size_t size = 0;
};

struct Launch {
  const msl_launch_config* cfg = nullptr;
  void* const* buffers = nullptr;
  uint32_t groups[3] = {1, 1, 1};
  std::vector<uint32_t> order;  // group visiting order
  std::atomic<uint32_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string error, warnings;
  const uint64_t* ranges = nullptr;
  int nranges = 0;

  void fail(const std::string& m) {
    std::lock_guard<std::mutex> lock(mu);
    if (error.empty()) error = m;
    failed = true;
  }
  void warn(const std::string& m) {
    std::lock_guard<std::mutex> lock(mu);
    if (warnings.find(m) == std::string::npos) warnings += "warning: " + m + "\n";
  }
};

struct Worker {
  Launch* launch = nullptr;
  Context sched;
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> simds;
  Fiber* current = nullptr;
  uint32_t gpos[3] = {0, 0, 0};
  int nthreads = 0;
  uint32_t barrier_gen = 0;
  char barrier_sync[2];
  char* stacks = nullptr;
  size_t stacks_bytes = 0;
  unsigned char* arena = nullptr;
  size_t arena_used = 0, tg_total = 0;
  TgSlot slots[kTgSlots];
  std::vector<uint64_t> counts;
  uint64_t rng = 0;
  bool progress = false, spun = false;
#if defined(MSL_TSAN)
  void* tsan_main = nullptr;
#endif
#if defined(MSL_ASAN)
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  void* sched_fake = nullptr;
#endif
};

thread_local Worker* tl_worker = nullptr;
thread_local uint64_t* tl_counts = nullptr;
const uint64_t* g_ranges = nullptr;
int g_nranges = 0;

std::string where(const Worker& w) {
  char buf[96];
  snprintf(buf, sizeof buf, "threadgroup (%u, %u, %u)", w.gpos[0], w.gpos[1], w.gpos[2]);
  return buf;
}

// Plain loops, not memcpy/memset: under TSan the libc calls are intercepted
// and would make the scheduler's copies look like racing accesses.
void copy_slot(unsigned char* dst, const unsigned char* src) { __builtin_memcpy(dst, src, kSlotBytes); }
void fill_bytes(unsigned char* dst, size_t n, unsigned char v) {
  for (size_t i = 0; i < n; ++i) reinterpret_cast<volatile unsigned char*>(dst)[i] = v;
}

// --------------------------------------------------------------- switching

void switch_to_scheduler(Worker& w, Fiber& f, bool finished) {
#if defined(MSL_TSAN)
  // A finished fiber syncs with the scheduler so that freeing its group's
  // memory is not a race; a suspended one must not (that would hide races).
  __tsan_switch_to_fiber(w.tsan_main, finished ? 0 : 1);
#endif
#if defined(MSL_ASAN)
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake, w.main_bottom, w.main_size);
#endif
  context_switch(f.ctx, w.sched);
#if defined(MSL_ASAN)
  __sanitizer_finish_switch_fiber(f.fake, nullptr, nullptr);
#endif
  (void)finished;
}

void run_fiber(Worker& w, Fiber& f) {
  w.current = &f;
#if defined(MSL_TSAN)
  __tsan_switch_to_fiber(f.tsan, 1);
#endif
#if defined(MSL_ASAN)
  __sanitizer_start_switch_fiber(&w.sched_fake, f.stack_lo, kStackSize);
#endif
  context_switch(w.sched, f.ctx);
#if defined(MSL_ASAN)
  __sanitizer_finish_switch_fiber(w.sched_fake, nullptr, nullptr);
#endif
  w.current = nullptr;
}

void fiber_main(void* arg) {
  auto& f = *static_cast<Fiber*>(arg);
  Worker& w = *f.worker;
#if defined(MSL_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &w.main_bottom, &w.main_size);
#endif
  msl_kernel_entry(w.launch->buffers, f.attrs);
  f.state = State::kDone;
  w.progress = true;
  switch_to_scheduler(w, f, true);
  __builtin_trap();  // a finished fiber is never resumed
}

// A fault found inside a GPU thread: record it and never resume the thread.
[[noreturn]] void abort_thread(const std::string& msg) {
  Worker& w = *tl_worker;
  w.launch->fail(msg);
  switch_to_scheduler(w, *w.current, false);
  __builtin_trap();
}

// ------------------------------------------------------------- scheduling

uint64_t next_random(uint64_t& s) {  // splitmix64
  uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

void complete_simd(Worker& w, int sg, uint32_t mask) {
  SimdGroup& s = w.simds[sg];
  const auto poison = static_cast<unsigned char>(w.launch->cfg->poison);
  for (int lane = 0; lane < kSimdWidth; ++lane) {
    if (mask >> lane & 1u) {
      copy_slot(s.snap.data[lane], s.pending[lane]);
      w.fibers[sg * kSimdWidth + lane].state = State::kRunnable;
    } else {
      fill_bytes(s.snap.data[lane], kSlotBytes, poison);
    }
  }
  s.snap.mask = mask;
  s.gen++;
}

std::string site(const Fiber& f) { return "line " + std::to_string(f.line) + ":" + std::to_string(f.col); }

// Rules 1-4 of the header comment. Returns false after recording a fault.
bool resolve(Worker& w) {
  const int n = w.nthreads, nsg = (n + kSimdWidth - 1) / kSimdWidth;
  bool progressed = false;
  // 1. SIMD groups whose live lanes all wait at one SIMD call site.
  for (int sg = 0; sg < nsg; ++sg) {
    uint32_t live = 0;
    bool same = true;
    const Fiber* first = nullptr;
    for (int lane = 0; lane < kSimdWidth && sg * kSimdWidth + lane < n; ++lane) {
      const Fiber& f = w.fibers[sg * kSimdWidth + lane];
      if (f.state == State::kDone) continue;
      live |= 1u << lane;
      if (f.state != State::kSimd) { same = false; continue; }
      if (!first) first = &f;
      else if (f.line != first->line || f.col != first->col) same = false;
    }
    if (live && same && first) {
      complete_simd(w, sg, live);
      progressed = true;
    }
  }
  if (progressed) return true;

  // 2. The threadgroup barrier.
  const Fiber* waiting = nullptr;
  int done = 0;
  bool all_at_barrier = true;
  for (int t = 0; t < n; ++t) {
    const Fiber& f = w.fibers[t];
    if (f.state == State::kDone) { ++done; continue; }
    if (f.state != State::kBarrier) { all_at_barrier = false; continue; }
    if (!waiting) {
      waiting = &f;
    } else if (f.line != waiting->line || f.col != waiting->col) {
      w.launch->fail("divergent threadgroup_barrier in " + where(w) + ": thread " + std::to_string(waiting->tid) +
                     " waits at " + site(*waiting) + ", thread " + std::to_string(f.tid) + " at " + site(f));
      return false;
    }
  }
  if (all_at_barrier && waiting) {
    if (done) {
      std::string msg = std::to_string(n - done) + " threads wait at threadgroup_barrier (" + site(*waiting) +
                        ") that " + std::to_string(done) + " returned threads never reach";
      if (w.launch->cfg->strict) {
        w.launch->fail("deadlock on real hardware is possible: " + msg + " in " + where(w));
        return false;
      }
      w.launch->warn(msg);
    }
    w.barrier_gen++;
    for (int t = 0; t < n; ++t)
      if (w.fibers[t].state == State::kBarrier) w.fibers[t].state = State::kRunnable;
    return true;
  }

  // 3. Divergent SIMD code: the lanes waiting at one site go ahead alone.
  for (int sg = 0; sg < nsg; ++sg) {
    const Fiber* first = nullptr;
    uint32_t mask = 0;
    for (int lane = 0; lane < kSimdWidth && sg * kSimdWidth + lane < n; ++lane) {
      const Fiber& f = w.fibers[sg * kSimdWidth + lane];
      if (f.state != State::kSimd) continue;
      if (!first) first = &f;
      if (f.line == first->line && f.col == first->col) mask |= 1u << lane;
    }
    if (mask) {
      complete_simd(w, sg, mask);
      progressed = true;
    }
  }
  if (progressed) return true;

  // 4. Nothing can move.
  w.launch->fail("deadlock in " + where(w) + ": no thread can run and no barrier or SIMD operation can complete");
  return false;
}

bool check_arena(Worker& w) {
  const auto poison = static_cast<unsigned char>(w.launch->cfg->poison);
  for (int s = 0; s < kTgSlots; ++s) {
    const TgSlot& slot = w.slots[s];
    if (!slot.ptr) continue;
#if !defined(MSL_ASAN)
    for (size_t i = 0; i < kTgGap; ++i) {
      if (slot.ptr[slot.size + i] != poison) {
        w.launch->fail("threadgroup array #" + std::to_string(s) + " (" + std::to_string(slot.size) +
                       " bytes) was written past its end in " + where(w));
        return false;
      }
    }
#endif
  }
  return true;
}

void release_slots(Worker& w) {
  for (auto& slot : w.slots) {
#if defined(MSL_ASAN)
    free(slot.ptr);
#endif
    slot = TgSlot{};
  }
#if !defined(MSL_ASAN)
  if (w.arena_used) fill_bytes(w.arena, w.arena_used + kTgGap, static_cast<unsigned char>(w.launch->cfg->poison));
#endif
  w.arena_used = 0;
  w.tg_total = 0;
}

void map_stacks(Worker& w, int n) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  w.stacks_bytes = static_cast<size_t>(n) * (kStackSize + page);
  void* p = mmap(nullptr, w.stacks_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    perror("mslsim: mmap fiber stacks");
    abort();
  }
  w.stacks = static_cast<char*>(p);
  for (int i = 0; i < n; ++i) mprotect(w.stacks + i * (kStackSize + page), page, PROT_NONE);  // guard page
}

void unmap_stacks(Worker& w) {
  if (w.stacks) munmap(w.stacks, w.stacks_bytes);
  w.stacks = nullptr;
}

void run_group(Worker& w, uint32_t index) {
  const msl_launch_config& cfg = *w.launch->cfg;
  const uint32_t* groups = w.launch->groups;
  w.gpos[0] = index % groups[0];
  w.gpos[1] = index / groups[0] % groups[1];
  w.gpos[2] = index / (groups[0] * groups[1]);
  uint32_t size[3];
  for (int d = 0; d < 3; ++d) {
    // Edge groups are partial: dispatchThreads runs exactly `grid` threads.
    uint32_t start = w.gpos[d] * uint32_t(cfg.threadgroup[d]);
    size[d] = std::min<uint32_t>(cfg.threadgroup[d], uint32_t(cfg.grid[d]) - start);
  }
  const int n = int(size[0] * size[1] * size[2]);
  const int dispatch_n = cfg.threadgroup[0] * cfg.threadgroup[1] * cfg.threadgroup[2];
  w.nthreads = n;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
#if defined(MSL_TSAN)
  map_stacks(w, n);  // fresh memory per group: no stale race-detector history
  w.arena = static_cast<unsigned char*>(malloc(kTgArena));
  fill_bytes(w.arena, kTgArena, static_cast<unsigned char>(cfg.poison));
#endif
  w.simds.assign((n + kSimdWidth - 1) / kSimdWidth, SimdGroup{});
  w.barrier_gen = 0;
  for (int t = 0; t < n; ++t) {
    Fiber& f = w.fibers[t];
    f = Fiber{};
    f.tid = t;
    f.worker = &w;
    f.state = State::kRunnable;
    f.stack_lo = w.stacks + t * (kStackSize + page) + page;
    ThreadAttrs& a = f.attrs;
    uint32_t lp[3] = {t % size[0], t / size[0] % size[1], t / (size[0] * size[1])};
    for (int d = 0; d < 3; ++d) {
      a.thread_position_in_threadgroup[d] = lp[d];
      a.threadgroup_position_in_grid[d] = w.gpos[d];
      a.thread_position_in_grid[d] = w.gpos[d] * cfg.threadgroup[d] + lp[d];
      a.threads_per_threadgroup[d] = size[d];
      a.dispatch_threads_per_threadgroup[d] = cfg.threadgroup[d];
      a.threadgroups_per_grid[d] = groups[d];
      a.threads_per_grid[d] = cfg.grid[d];
    }
    a.thread_index_in_threadgroup = t;
    a.simdgroup_index_in_threadgroup = t / kSimdWidth;
    a.thread_index_in_simdgroup = t % kSimdWidth;
    a.simdgroups_per_threadgroup = (n + kSimdWidth - 1) / kSimdWidth;
    a.dispatch_simdgroups_per_threadgroup = (dispatch_n + kSimdWidth - 1) / kSimdWidth;
    a.quadgroup_index_in_threadgroup = t / 4;
    a.thread_index_in_quadgroup = t % 4;
    a.quadgroups_per_threadgroup = (n + 3) / 4;
    a.dispatch_quadgroups_per_threadgroup = (dispatch_n + 3) / 4;
    context_init(f.ctx, f.stack_lo, kStackSize, fiber_main, &f);
#if defined(MSL_TSAN)
    f.tsan = __tsan_create_fiber(0);
#endif
  }

  w.rng = cfg.seed ^ (0xD1B54A32D192ED03ULL * (index + 1));
  std::vector<int> order(n);
  for (int t = 0; t < n; ++t) order[t] = cfg.schedule == MSL_REVERSE ? n - 1 - t : t;
  long stalled = 0;
  bool ok = true;
  for (;;) {
    if (cfg.schedule == MSL_RANDOM)
      for (int i = n - 1; i > 0; --i) std::swap(order[i], order[next_random(w.rng) % uint64_t(i + 1)]);
    w.progress = w.spun = false;
    for (int t : order) {
      if (w.fibers[t].state != State::kRunnable) continue;
      run_fiber(w, w.fibers[t]);
      if (w.launch->failed) { ok = false; break; }
    }
    if (!ok) break;
    int done = 0, runnable = 0;
    for (int t = 0; t < n; ++t) {
      done += w.fibers[t].state == State::kDone;
      runnable += w.fibers[t].state == State::kRunnable;
    }
    if (done == n) break;
    if (runnable) {
      stalled = (w.spun && !w.progress) ? stalled + 1 : 0;
      if (stalled > kSpinLimit) {
        w.launch->fail("deadlock in " + where(w) + ": threads spin on atomics and nothing else progresses");
        ok = false;
        break;
      }
      continue;
    }
    if (!resolve(w)) { ok = false; break; }
  }
  if (ok) check_arena(w);
  release_slots(w);
#if defined(MSL_TSAN)
  if (ok) {
    for (int t = 0; t < n; ++t) __tsan_destroy_fiber(w.fibers[t].tsan);
    unmap_stacks(w);
    free(w.arena);
    w.arena = nullptr;
  }
#endif
}

void worker_main(Worker* w) {
  tl_worker = w;
  tl_counts = w->counts.data();
  const msl_launch_config& cfg = *w->launch->cfg;
  const int max_threads = cfg.threadgroup[0] * cfg.threadgroup[1] * cfg.threadgroup[2];
  w->fibers.resize(max_threads);
#if defined(MSL_TSAN)
  w->tsan_main = __tsan_get_current_fiber();
#else
  map_stacks(*w, max_threads);
  w->arena = static_cast<unsigned char*>(malloc(kTgArena));
  fill_bytes(w->arena, kTgArena, static_cast<unsigned char>(cfg.poison));
#endif
  Launch& L = *w->launch;
  for (;;) {
    uint32_t i = L.next.fetch_add(1);
    if (i >= L.order.size() || L.failed) break;
    run_group(*w, L.order[i]);
  }
#if !defined(MSL_TSAN)
  // After a fault the abandoned fibers' stacks are simply dropped.
  unmap_stacks(*w);
  free(w->arena);
#endif
  tl_worker = nullptr;
  tl_counts = nullptr;
}

void count_load(const void* p, uint64_t n) {
  if (!tl_counts) return;
  const auto a = reinterpret_cast<uint64_t>(p);
  for (int i = 0; i < g_nranges; ++i) {
    if (a >= g_ranges[2 * i] && a < g_ranges[2 * i + 1]) {
      tl_counts[i] += n;
      return;
    }
  }
}

}  // namespace

// ------------------------------------------------------------ sync points

const SimdSnapshot* simd_sync(const void* value, unsigned nbytes, unsigned line, unsigned col) {
  Worker& w = *tl_worker;
  Fiber& f = *w.current;
  if (nbytes > unsigned(kSlotBytes)) abort_thread("mslsim: SIMD operation on a value over 64 bytes");
  SimdGroup& s = w.simds[f.tid / kSimdWidth];
  copy_slot(s.pending[f.tid % kSimdWidth], static_cast<const unsigned char*>(value));
  f.state = State::kSimd;
  f.line = line;
  f.col = col;
  f.gen = s.gen;
  w.progress = true;
#if defined(MSL_TSAN)
  __tsan_release(&s.sync[f.gen & 1]);
#endif
  switch_to_scheduler(w, f, false);
#if defined(MSL_TSAN)
  __tsan_acquire(&s.sync[f.gen & 1]);
#endif
  return &s.snap;
}

void barrier(unsigned mem_flags, unsigned line, unsigned col) {
  Worker& w = *tl_worker;
  Fiber& f = *w.current;
  f.state = State::kBarrier;
  f.line = line;
  f.col = col;
  f.flags = mem_flags;
  f.gen = w.barrier_gen;
  w.progress = true;
  // mem_none orders execution only: no memory edge, so TSan still sees races.
#if defined(MSL_TSAN)
  if (mem_flags) __tsan_release(&w.barrier_sync[f.gen & 1]);
#endif
  switch_to_scheduler(w, f, false);
#if defined(MSL_TSAN)
  if (mem_flags) __tsan_acquire(&w.barrier_sync[f.gen & 1]);
#endif
}

void spin_point() {
  Worker& w = *tl_worker;
  w.spun = true;
  switch_to_scheduler(w, *w.current, false);
}

void* tg_alloc(int slot, size_t size, size_t align) {
  Worker& w = *tl_worker;
  if (slot < 0 || slot >= kTgSlots) abort_thread("mslsim: more than 64 threadgroup declarations");
  TgSlot& s = w.slots[slot];
  if (s.ptr) {
    if (s.size != size) abort_thread("mslsim: threadgroup declaration #" + std::to_string(slot) + " changed size");
    return s.ptr;
  }
  w.tg_total += size;
  if (w.tg_total > kTgLimit)
    abort_thread("threadgroup memory: " + std::to_string(w.tg_total) +
                 " bytes declared, Metal allows 32 KiB per threadgroup");
  align = align < 16 ? 16 : align;
#if defined(MSL_ASAN)
  // Exact-size allocations: AddressSanitizer reports any access outside.
  s.ptr = static_cast<unsigned char*>(aligned_alloc(align, (size + align - 1) / align * align));
  memset(s.ptr, w.launch->cfg->poison, size);
#else
  size_t offset = (w.arena_used + align - 1) / align * align;
  s.ptr = w.arena + offset;
  w.arena_used = offset + size + kTgGap;
#endif
  s.size = size;
  return s.ptr;
}

unsigned current_lane() { return unsigned(tl_worker->current->tid % kSimdWidth); }

}  // namespace msl::rt

// Load counting: kernels compiled with -fsanitize-coverage=func,trace-loads
// call these on every load; bytes that fall in a registered buffer count.
#if !defined(MSL_ASAN) && !defined(MSL_TSAN)
extern "C" {
void __sanitizer_cov_load1(uint8_t* p) { msl::rt::count_load(p, 1); }
void __sanitizer_cov_load2(uint16_t* p) { msl::rt::count_load(p, 2); }
void __sanitizer_cov_load4(uint32_t* p) { msl::rt::count_load(p, 4); }
void __sanitizer_cov_load8(uint64_t* p) { msl::rt::count_load(p, 8); }
void __sanitizer_cov_load16(__int128* p) { msl::rt::count_load(p, 16); }
}
#endif

extern "C" int msl_launch(const msl_launch_config* cfg, void* const* buffers, const uint64_t* count_ranges,
                          uint64_t* counts, char* msg, int msg_len) {
  using namespace msl::rt;
  Launch L;
  L.cfg = cfg;
  L.buffers = buffers;
  size_t ngroups = 1;
  for (int d = 0; d < 3; ++d) {
    L.groups[d] = uint32_t((cfg->grid[d] + cfg->threadgroup[d] - 1) / cfg->threadgroup[d]);
    ngroups *= L.groups[d];
  }
  L.order.resize(ngroups);
  for (size_t i = 0; i < ngroups; ++i) L.order[i] = uint32_t(cfg->schedule == MSL_REVERSE ? ngroups - 1 - i : i);
  if (cfg->schedule == MSL_RANDOM) {
    uint64_t s = cfg->seed;
    for (size_t i = ngroups; i > 1; --i) std::swap(L.order[i - 1], L.order[next_random(s) % i]);
  }
  g_ranges = count_ranges;
  g_nranges = cfg->ncount;

  const int nworkers = std::max(1, std::min<int>(cfg->workers, int(ngroups)));
  // After a fault, fibers stay suspended mid-kernel; under TSan freeing what
  // they touched would be reported as a race, so that state is leaked.
  auto& workers = *new std::vector<Worker>(nworkers);
  std::vector<std::thread> threads;
  for (auto& w : workers) {
    w.launch = &L;
    w.counts.assign(cfg->ncount + 1, 0);
    threads.emplace_back(worker_main, &w);
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < cfg->ncount; ++i) {
    counts[i] = 0;
    for (auto& w : workers) counts[i] += w.counts[i];
  }
  g_ranges = nullptr;
  g_nranges = 0;
  const bool failed = L.failed;
  snprintf(msg, size_t(msg_len), "%s", (failed ? L.error : L.warnings).c_str());
#if defined(MSL_TSAN)
  if (!failed) delete &workers;
#else
  delete &workers;
#endif
  return failed ? 1 : 0;
}
