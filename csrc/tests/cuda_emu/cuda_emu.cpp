// The runtime of cuda_emu.h: CUDA threads as fibers (ucontext), barriers, warp collectives,
// shared memory, launches, and the few CUDA runtime API calls the dcx launchers make (host-side
// stand-ins; device memory is host memory, streams run in order, at once).
//
// Scheduling: the threads of one block are fibers on the calling OS thread; a fiber runs until
// it waits (__syncthreads, a warp collective) or returns. EMU_SCHEDULE picks the order in which
// runnable fibers go: "forward" (thread 0 first), "reverse", "warp" / "warp-reverse" (a warp
// released from a collective goes on at once: one warp runs ahead of the others), or "random"
// (EMU_SEED); a kernel that reads shared memory another thread writes without a barrier between
// gives different results in different orders. Blocks run one after another
// (EMU_BLOCK_ORDER_REVERSE=1 runs the last first).
//
// Built with ThreadSanitizer, each fiber is a TSan fiber and the only happens-before edges
// between CUDA threads are the ones CUDA gives: barriers (__syncthreads, warp collectives),
// atomics, and kernel boundaries; blocks of one grid are unordered, so TSan reports races within
// a block (a missing __syncthreads) and between blocks. This file itself should be compiled
// without -fsanitize=thread (its bookkeeping is shared by all fibers without locks: one OS thread).
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif
#if defined(EMU_TSAN_FIBERS)  // set when the kernels are built with -fsanitize=thread
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
void __tsan_acquire(void* addr);
void __tsan_release(void* addr);
}
#endif

namespace emu {

namespace {

int env_int(const char* name, int def) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : def;
}

// NAME_DEV<d> for device d, else NAME, else def: tests can give each device id other limits.
int env_dev(const char* name, int dev, int def) {
  const std::string per = std::string(name) + "_DEV" + std::to_string(dev);
  const char* v = std::getenv(per.c_str());
  return v && *v ? std::atoi(v) : env_int(name, def);
}

std::mutex g_mu;  // launch-level state below (host threads may launch concurrently)
cudaError_t g_last_error = cudaSuccess;
std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncSetAttribute

constexpr int kDefaultSmem = 48 * 1024;
int smem_optin() { return env_int("EMU_SMEM_PER_BLOCK", 227 * 1024); }

const char* op_name(Op op) {
  switch (op) {
    case Op::kIdx: return "__shfl_sync";
    case Op::kDown: return "__shfl_down_sync";
    case Op::kUp: return "__shfl_up_sync";
    case Op::kXor: return "__shfl_xor_sync";
    case Op::kAny: return "__any_sync";
    case Op::kAll: return "__all_sync";
    case Op::kBallot: return "__ballot_sync";
    case Op::kSyncwarp: return "__syncwarp";
  }
  return "?";
}

struct Stats {
  unsigned long long launches = 0, blocks = 0, threads = 0, switches = 0;
  ~Stats() {
    if (env_int("EMU_STATS", 0))
      std::fprintf(stderr, "cuda_emu: %llu launches, %llu blocks, %llu threads, %llu fiber switches\n",
                   launches, blocks, threads, switches);
  }
};
Stats& stats() {
  static Stats s;
  return s;
}

}  // namespace

struct Where {
  const char* file = "";
  unsigned line = 0;
};

struct Warp {
  unsigned lanes_mask = 0;  // lanes that exist in this warp
  unsigned exited = 0;      // lanes that returned from the kernel
  unsigned arrived = 0;     // lanes waiting in the pending collective
  unsigned mask = 0;        // the pending collective's mask
  Op op = Op::kIdx;
  Where where;
  int width = 32;
  uint64_t value[32] = {};
  int arg[32] = {};
  uint64_t result[32] = {};
  // TSan: the collective's happens-before edge, one token per instance in a ring: a lane that
  // runs ahead into a later collective must not publish what it wrote since to lanes still
  // waking from this one. With full masks every lane wakes from instance g before g + 1 can
  // complete, so two would do; lanes of disjoint masks may run a few collectives ahead.
  char sync_token[8] = {};
  unsigned generation = 0;
};

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  size_t stack_size = 0;
  ThreadState ts;
  bool done = false;
  const char* waiting = nullptr;  // what it waits in, for deadlock reports
  Where waiting_at;
  void* tsan = nullptr;
};

struct Block {
  unsigned nthreads = 0;
  unsigned exited = 0;
  unsigned bar_arrived = 0;
  Where bar_where;
  // TSan: __syncthreads' happens-before edge per instance, alternating (every thread wakes from
  // barrier g before any can pass g + 1, so a thread running ahead never publishes to them).
  char bar_token[2] = {};
  unsigned bar_generation = 0;
  char start_token = 0;  // TSan: the launch happens before the block's threads
  std::vector<Warp> warps;
  char* arena = nullptr;  // TSan builds: shared memory carved from one mapping per block
  size_t arena_size = 0, arena_used = 0;
  // shared memory
  std::pair<const void*, void*> vars[64];  // (no heap allocation in fibers, see Ring)
  unsigned nvars = 0;
  std::vector<std::pair<void*, size_t>> allocations;
  size_t static_bytes = 0;
  void* dyn = nullptr;
  size_t dyn_bytes = 0;
  uint3 bid{};

  ~Block() {
    for (auto& a : allocations) ::operator delete(a.first, std::align_val_t(a.second));
    if (arena) munmap(arena, arena_size);  // (TSan forgets the range's history)
  }
};

namespace {

// The ready queue: a fixed ring (no heap allocation while fibers run: under ThreadSanitizer the
// emulator's own allocations would look like races between CUDA threads).
struct Ring {
  static constexpr unsigned kCap = 2048;  // > 1024 threads
  unsigned buf[kCap];
  unsigned head = 0, count = 0;
  bool empty() const { return count == 0; }
  void clear() { head = count = 0; }
  void push_back(unsigned v) { buf[(head + count++) % kCap] = v; }
  void push_front(unsigned v) {
    head = (head + kCap - 1) % kCap;
    buf[head] = v;
    ++count;
  }
  unsigned pop_front() {
    const unsigned v = buf[head];
    head = (head + 1) % kCap;
    --count;
    return v;
  }
  template <typename Rng>
  void shuffle(Rng& rng) {  // Fisher-Yates in place
    for (unsigned i = count; i > 1; --i) {
      const unsigned j = unsigned(rng() % i);
      std::swap(buf[(head + i - 1) % kCap], buf[(head + j) % kCap]);
    }
  }
};

// The scheduler of the OS thread that runs a grid.
struct Sched {
  ucontext_t main_ctx;
  std::vector<std::unique_ptr<Fiber>> fibers;  // reused across blocks (their stacks)
  Ring ready;
  Fiber* current = nullptr;
  Block* block = nullptr;
  const std::function<void()>* body = nullptr;
  std::mt19937_64 rng{uint64_t(env_int("EMU_SEED", 1))};
  int order = 0;  // 0 forward, 1 reverse, 2 random
  void* main_tsan = nullptr;
  char* grid_end = nullptr;  // TSan: every thread of the grid happens before the launch returns
#ifdef EMU_ASAN
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
#endif
};

thread_local Sched* t_sched = nullptr;
ThreadState t_outside;  // self() outside kernels: fails

}  // namespace

[[noreturn]] void fail(const char* fmt, ...) {
  std::fflush(stdout);
  std::fprintf(stderr, "cuda_emu: ");
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  if (t_sched && t_sched->current) {
    const ThreadState& t = t_sched->current->ts;
    std::fprintf(stderr, " [block (%u,%u,%u) thread (%u,%u,%u)]", t.bid.x, t.bid.y, t.bid.z, t.tid.x,
                 t.tid.y, t.tid.z);
  }
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

ThreadState& self() {
  if (!t_sched || !t_sched->current) fail("device code (threadIdx, blockIdx, ...) used outside a kernel");
  return t_sched->current->ts;
}

namespace {

void tsan_release(void* token) {
#ifdef EMU_TSAN_FIBERS
  __tsan_release(token);
#else
  (void)token;
#endif
}
void tsan_acquire(void* token) {
#ifdef EMU_TSAN_FIBERS
  __tsan_acquire(token);
#else
  (void)token;
#endif
}

// Fiber -> scheduler: the fiber waits (or is done) until made ready again.
void to_scheduler() {
  Sched& s = *t_sched;
  Fiber* f = s.current;
  ++stats().switches;
#ifdef EMU_TSAN_FIBERS
  __tsan_switch_to_fiber(s.main_tsan, 1 /* no sync: edges come from the annotations */);
#endif
#ifdef EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(f->done ? nullptr : &fake, s.main_stack_bottom, s.main_stack_size);
#endif
  swapcontext(&f->ctx, &s.main_ctx);
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// Orders: 0 forward, 1 reverse (FIFO: every thread reaches its next barrier before a released
// one goes on), 2 warp, 3 warp-reverse (LIFO: released threads go on at once, so one warp runs
// ahead of the others as far as it can), 4 random (EMU_SEED).
void make_ready(Sched& s, unsigned* ids, unsigned n) {
  const bool reverse = s.order == 1 || s.order == 3;
  if (reverse) std::reverse(ids, ids + n);
  if (s.order == 4) std::shuffle(ids, ids + n, s.rng);
  if (s.order == 2 || s.order == 3) {
    for (unsigned i = n; i-- > 0;) s.ready.push_front(ids[i]);
  } else {
    for (unsigned i = 0; i < n; ++i) s.ready.push_back(ids[i]);
  }
  if (s.order == 4) s.ready.shuffle(s.rng);
}

void wait_here(const char* what, const std::source_location& loc) {
  Fiber* f = t_sched->current;
  f->waiting = what;
  f->waiting_at = {loc.file_name(), loc.line()};
  to_scheduler();
  f->waiting = nullptr;
}

bool same_where(const Where& a, const std::source_location& l) {
  return a.line == l.line() && std::strcmp(a.file, l.file_name()) == 0;
}

}  // namespace

void syncthreads(const std::source_location& loc) {
  Sched& s = *t_sched;
  Block& b = *self().block;
  if (b.exited > 0)
    fail("__syncthreads at %s:%u after %u thread(s) of the block exited (undefined behaviour)",
         loc.file_name(), loc.line(), b.exited);
  if (b.bar_arrived == 0) {
    b.bar_where = {loc.file_name(), loc.line()};
  } else if (!same_where(b.bar_where, loc)) {
    fail("__syncthreads at different call sites in one block: %s:%u and %s:%u (divergent barrier)",
         b.bar_where.file, b.bar_where.line, loc.file_name(), loc.line());
  }
  char* token = &b.bar_token[b.bar_generation & 1];
  tsan_release(token);
  if (++b.bar_arrived == b.nthreads) {
    b.bar_arrived = 0;
    ++b.bar_generation;
    unsigned waiters[1024], n = 0, me = s.current->ts.linear;
    for (unsigned t = 0; t < b.nthreads; ++t)
      if (t != me) waiters[n++] = t;
    make_ready(s, waiters, n);
    // this thread waits too, so that the order of the next phase is the scheduler's
    make_ready(s, &me, 1);
    wait_here("__syncthreads (released)", loc);
  } else {
    wait_here("__syncthreads", loc);
  }
  tsan_acquire(token);
}

namespace {

// The result of lane l of a completed collective (CUDA semantics for width, out-of-range lanes).
uint64_t collective_result(const Warp& w, unsigned l) {
  const int width = w.width;
  const unsigned base = l & ~unsigned(width - 1);
  auto read = [&](unsigned src) -> uint64_t {
    if (!((w.mask >> src) & 1u))
      fail("%s at %s:%u: lane %u reads lane %u, which is not in the mask 0x%08x (undefined)",
           op_name(w.op), w.where.file, w.where.line, l, src, w.mask);
    return w.value[src];
  };
  switch (w.op) {
    case Op::kIdx: return read(base + (unsigned(w.arg[l]) & unsigned(width - 1)));
    case Op::kDown: {
      const unsigned src = (l & unsigned(width - 1)) + unsigned(w.arg[l]);
      return src < unsigned(width) ? read(base + src) : w.value[l];
    }
    case Op::kUp: {
      const int src = int(l & unsigned(width - 1)) - w.arg[l];
      return src >= 0 ? read(base + unsigned(src)) : w.value[l];
    }
    case Op::kXor: {
      const unsigned src = l ^ unsigned(w.arg[l]);
      return src < base + unsigned(width) && src < 32 ? read(src) : w.value[l];
    }
    case Op::kAny:
    case Op::kAll:
    case Op::kBallot: {
      uint64_t ballot = 0;
      for (unsigned i = 0; i < 32; ++i)
        if (((w.mask >> i) & 1u) && w.value[i]) ballot |= 1ull << i;
      if (w.op == Op::kBallot) return ballot;
      if (w.op == Op::kAny) return ballot != 0;
      return ballot == w.mask;
    }
    case Op::kSyncwarp: return 0;
  }
  return 0;
}

}  // namespace

uint64_t warp_collective(Op op, unsigned mask, uint64_t value, int arg, int width,
                         const std::source_location& loc) {
  Sched& s = *t_sched;
  ThreadState& t = self();
  Block& b = *t.block;
  Warp& w = b.warps[t.warp];
  const unsigned me = 1u << t.lane;
  if (!(mask & me))
    fail("%s at %s:%u: the calling lane %u is not in the mask 0x%08x", op_name(op), loc.file_name(),
         loc.line(), t.lane, mask);
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail("%s at %s:%u: width %d is not a power of 2 in [1, 32]", op_name(op), loc.file_name(),
         loc.line(), width);
  if (mask & ~w.lanes_mask)
    fail("%s at %s:%u: mask 0x%08x names lanes that do not exist (the warp has lanes 0x%08x)",
         op_name(op), loc.file_name(), loc.line(), mask, w.lanes_mask);
  if (mask & w.exited)
    fail("%s at %s:%u: mask 0x%08x names lanes that already exited (0x%08x): undefined",
         op_name(op), loc.file_name(), loc.line(), mask, w.exited);
  if (w.arrived == 0) {
    w.op = op;
    w.mask = mask;
    w.width = width;
    w.where = {loc.file_name(), loc.line()};
  } else if (w.op != op || w.mask != mask || w.width != width || !same_where(w.where, loc)) {
    fail("warp %u: lanes in different collectives at once: %s (mask 0x%08x) at %s:%u and %s "
         "(mask 0x%08x) at %s:%u (divergent warp collective)",
         t.warp, op_name(w.op), w.mask, w.where.file, w.where.line, op_name(op), mask,
         loc.file_name(), loc.line());
  }
  w.value[t.lane] = value;
  w.arg[t.lane] = arg;
  w.arrived |= me;
  char* token = &w.sync_token[w.generation % 8];
  tsan_release(token);
  if (w.arrived == w.mask) {
    for (unsigned l = 0; l < 32; ++l)
      if ((w.mask >> l) & 1u) w.result[l] = collective_result(w, l);
    w.arrived = 0;
    ++w.generation;
    unsigned lanes[32], n = 0;
    for (unsigned l = 0; l < 32; ++l)
      if ((w.mask >> l) & 1u) lanes[n++] = t.warp * 32 + l;
    make_ready(s, lanes, n);  // the caller too: the scheduler orders the lanes' next steps
    wait_here("warp collective (released)", loc);
  } else {
    wait_here(op_name(op), loc);
  }
  tsan_acquire(token);
  return w.result[t.lane];
}

namespace {

void thread_exit(Block& b, const ThreadState& t) {
  Warp& w = b.warps[t.warp];
  const unsigned me = 1u << t.lane;
  if (w.arrived != 0 && (w.mask & me))
    fail("lane %u of warp %u exited while lanes 0x%08x wait for it in %s at %s:%u (undefined)",
         t.lane, t.warp, w.arrived, op_name(w.op), w.where.file, w.where.line);
  w.exited |= me;
  ++b.exited;
  if (b.bar_arrived > 0)
    fail("a thread exited while %u thread(s) wait at __syncthreads at %s:%u (divergent barrier)",
         b.bar_arrived, b.bar_where.file, b.bar_where.line);
}

unsigned char smem_fill() { return static_cast<unsigned char>(env_int("EMU_SMEM_FILL", 0xFF)); }

void trampoline() {
  Sched& s = *t_sched;
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &s.main_stack_bottom, &s.main_stack_size);
#endif
  Fiber* f = s.current;
  tsan_acquire(&s.block->start_token);  // the launch happens before the kernel's threads
  (*s.body)();
  thread_exit(*s.block, f->ts);
  tsan_release(s.grid_end);  // ... and they before the end of the grid
  f->done = true;
  to_scheduler();
  fail("a finished fiber was resumed");
}

void deadlock(Sched& s, unsigned nthreads) {
  std::string msg;
  for (unsigned t = 0; t < nthreads; ++t) {
    const Fiber& f = *s.fibers[t];
    if (f.done || !f.waiting) continue;
    char line[256];
    std::snprintf(line, sizeof line, "\n  thread %u (warp %u lane %u) waits in %s at %s:%u", t, t / 32,
                  t % 32, f.waiting, f.waiting_at.file, f.waiting_at.line);
    msg += line;
    if (msg.size() > 3000) {
      msg += "\n  ...";
      break;
    }
  }
  s.current = nullptr;
  fail("deadlock in block (%u,%u,%u): %u thread(s) exited, the others wait and no barrier can "
       "complete (divergent __syncthreads or warp collective):%s",
       s.block->bid.x, s.block->bid.y, s.block->bid.z, s.block->exited, msg.c_str());
}

// A guard page: the address of extern __shared__ memory in a launch without any (a kernel may
// form the pointer; touching it faults).
void* no_dynamic_smem() {
  static void* p = mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p;
}

}  // namespace

void* shared_var(const void* key, size_t size, size_t align) {
  Block& b = *self().block;
  for (unsigned i = 0; i < b.nvars; ++i)
    if (b.vars[i].first == key) return b.vars[i].second;
  if (b.nvars == 64) fail("more than 64 __shared__ variables in one kernel");
  align = std::max<size_t>(align, 16);
  void* p;
  if (b.arena) {  // filled by the scheduler before the block: no thread of the block wrote it
    b.arena_used = (b.arena_used + align - 1) / align * align;
    if (b.arena_used + size > b.arena_size) fail("static shared memory past the emulator's arena");
    p = b.arena + b.arena_used;
    b.arena_used += size;
  } else {  // one heap allocation per variable: AddressSanitizer checks its bounds
    p = ::operator new(size, std::align_val_t(align));
    std::memset(p, smem_fill(), size);
    b.allocations.push_back({p, align});
  }
  b.vars[b.nvars++] = {key, p};
  b.static_bytes += size;
  return p;
}

void* dynamic_smem() {
  Block& b = *self().block;
  return b.dyn_bytes ? b.dyn : no_dynamic_smem();
}

void run_grid(const Config& c, const void* key, const std::function<void()>& body) {
#if defined(EMU_FMA_KERNELS) && (defined(__x86_64__) || defined(__i386__))
  // The kernels were compiled with -mfma (DCX_CUDA_EMU_FMA): say so rather than die of SIGILL.
  static const bool has_fma = __builtin_cpu_supports("fma");
  if (!has_fma) fail("the kernels were built with FMA contraction (DCX_CUDA_EMU_FMA=ON); this CPU has no FMA");
#endif
  const unsigned long long nthreads = 1ull * c.block.x * c.block.y * c.block.z;
  const unsigned long long nblocks = 1ull * c.grid.x * c.grid.y * c.grid.z;
  // const: swapcontext returns twice as far as the compiler knows, so locals it writes after
  // the first switch could be clobbered (-Wclobbered).
  const int max_dyn = [&] {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_max_dynamic_smem.find(key);
    return key && it != g_max_dynamic_smem.end() ? it->second : kDefaultSmem;
  }();
  {
    std::lock_guard<std::mutex> lock(g_mu);
    cudaError_t err = cudaSuccess;
    if (nthreads == 0 || nthreads > 1024 || c.block.z > 64 || nblocks == 0 ||
        c.grid.x > 0x7fffffffu || c.grid.y > 65535 || c.grid.z > 65535) {
      err = cudaErrorInvalidConfiguration;
    } else if (c.smem > size_t(max_dyn)) {
      err = cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) {
      if (g_last_error == cudaSuccess) g_last_error = err;
      if (env_int("EMU_VERBOSE", 0))
        std::fprintf(stderr, "cuda_emu: launch refused: grid (%u,%u,%u) block (%u,%u,%u) smem %zu\n",
                     c.grid.x, c.grid.y, c.grid.z, c.block.x, c.block.y, c.block.z, c.smem);
      return;
    }
  }
  const unsigned long long max_blocks = static_cast<unsigned long long>(env_int("EMU_MAX_BLOCKS", 1 << 16));
  if (nblocks > max_blocks)
    fail("grid of %llu blocks: more than EMU_MAX_BLOCKS=%llu (keep emulated problems small)", nblocks,
         max_blocks);
  stats().launches++;
  stats().blocks += nblocks;
  stats().threads += nblocks * nthreads;

  thread_local Sched sched;
  Sched& s = sched;
  if (t_sched) fail("a kernel launched from device code (dynamic parallelism) is not emulated");
  t_sched = &s;
  const char* order = std::getenv("EMU_SCHEDULE");
  s.order = 0;
  if (order && *order) {
    const char* names[] = {"forward", "reverse", "warp", "warp-reverse", "random"};
    s.order = -1;
    for (int i = 0; i < 5; ++i)
      if (!std::strcmp(order, names[i])) s.order = i;
    if (s.order < 0) fail("EMU_SCHEDULE=%s: not forward, reverse, warp, warp-reverse or random", order);
  }
  s.body = &body;
#ifdef EMU_TSAN_FIBERS
  s.main_tsan = __tsan_get_current_fiber();
#endif
  const size_t stack_size = size_t(env_int("EMU_STACK_KB", 256)) * 1024;
  while (s.fibers.size() < nthreads) {
    auto f = std::make_unique<Fiber>();
    f->stack_size = stack_size;
    f->stack = static_cast<char*>(mmap(nullptr, stack_size, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (f->stack == MAP_FAILED) fail("cannot map a fiber stack");
    s.fibers.push_back(std::move(f));
  }
  const unsigned nw = unsigned((nthreads + 31) / 32);
  const bool reverse_blocks = env_int("EMU_BLOCK_ORDER_REVERSE", 0) != 0;
  [[maybe_unused]] const bool fresh_fibers = env_int("EMU_TSAN_FRESH_FIBERS", 0) != 0;
  // One token for the whole grid: the launch happens before every block and every block before
  // the return, but the blocks are unordered among themselves (TSan then sees inter-block races).
  char grid_end = 0;
  s.grid_end = &grid_end;
  for (unsigned long long bi = 0; bi < nblocks; ++bi) {
    const unsigned long long lin = reverse_blocks ? nblocks - 1 - bi : bi;
    Block b;
    b.nthreads = unsigned(nthreads);
    b.bid = {unsigned(lin % c.grid.x), unsigned((lin / c.grid.x) % c.grid.y),
             unsigned(lin / (1ull * c.grid.x * c.grid.y))};
    b.warps = std::vector<Warp>(nw);
    for (unsigned w = 0; w < nw; ++w) {
      const unsigned lanes = unsigned(std::min<unsigned long long>(32, nthreads - 32ull * w));
      b.warps[w].lanes_mask = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
#ifdef EMU_TSAN_FIBERS
    // One fresh mapping per block (TSan resets a new mapping's history), filled here, by the
    // launching side, so the block's threads see it as written before them.
    b.arena_size = (size_t(std::max(max_dyn, kDefaultSmem)) + c.smem + 4095) / 4096 * 4096;
    b.arena = static_cast<char*>(mmap(nullptr, b.arena_size, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (b.arena == MAP_FAILED) fail("cannot map shared memory");
    std::memset(b.arena, smem_fill(), b.arena_size);
    if (c.smem > 0) {
      b.dyn = b.arena;
      b.arena_used = c.smem;
      b.dyn_bytes = c.smem;
    }
#else
    if (c.smem > 0) {
      b.dyn = ::operator new(c.smem, std::align_val_t(16));
      std::memset(b.dyn, smem_fill(), c.smem);
      b.allocations.push_back({b.dyn, 16});
      b.dyn_bytes = c.smem;
    }
#endif
    s.block = &b;
    std::vector<unsigned> all;
    all.reserve(nthreads);
    for (unsigned i = 0; i < nthreads; ++i) {
      Fiber& f = *s.fibers[i];
#ifdef EMU_TSAN_FIBERS
      // A fresh stack per block: the blocks are unordered for TSan, so reusing a stack another
      // block's thread wrote would be reported as a race.
      munmap(f.stack, f.stack_size);
      f.stack = static_cast<char*>(mmap(nullptr, f.stack_size, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
      if (f.stack == MAP_FAILED) fail("cannot map a fiber stack");
#endif
      f.done = false;
      f.waiting = nullptr;
      f.ts.tid = {i % c.block.x, (i / c.block.x) % c.block.y, unsigned(i / (1ull * c.block.x * c.block.y))};
      f.ts.bid = b.bid;
      f.ts.bdim = c.block;
      f.ts.gdim = c.grid;
      f.ts.linear = i;
      f.ts.lane = i % 32;
      f.ts.warp = i / 32;
      f.ts.block = &b;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack;
      f.ctx.uc_stack.ss_size = f.stack_size;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, trampoline, 0);
#ifdef EMU_TSAN_FIBERS
      // TSan fibers are costly to create (a thread each): reused by default, which orders thread
      // i of a block after thread i of the block before it, hiding most races between blocks.
      // EMU_TSAN_FRESH_FIBERS=1 makes new ones per block (blocks unordered; about 6x slower).
      if (fresh_fibers && f.tsan) {
        __tsan_destroy_fiber(f.tsan);
        f.tsan = nullptr;
      }
      if (!f.tsan) f.tsan = __tsan_create_fiber(0);
#endif
      all.push_back(i);
    }
    s.ready.clear();
    make_ready(s, all.data(), unsigned(all.size()));
    // The scheduler has acquired nothing from this grid's threads yet, so what it releases here
    // orders the launch, not the earlier blocks, before this block.
    tsan_release(&b.start_token);
    unsigned finished = 0;
    while (finished < nthreads) {
      if (s.ready.empty()) deadlock(s, unsigned(nthreads));
      const unsigned i = s.ready.pop_front();
      Fiber& f = *s.fibers[i];
      s.current = &f;
#ifdef EMU_TSAN_FIBERS
      __tsan_switch_to_fiber(f.tsan, 1);
#endif
#ifdef EMU_ASAN
      void* fake = nullptr;
      __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_size);
#endif
      swapcontext(&s.main_ctx, &f.ctx);
#ifdef EMU_ASAN
      __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
      s.current = nullptr;
      if (f.done) ++finished;
    }
    s.block = nullptr;
    if (b.static_bytes + b.dyn_bytes > size_t(std::max(max_dyn, kDefaultSmem)))
      fail("block used %zu bytes of static + %zu of dynamic shared memory: over the limit %d",
           b.static_bytes, b.dyn_bytes, std::max(max_dyn, kDefaultSmem));
  }
  tsan_acquire(&grid_end);
  s.grid_end = nullptr;
  t_sched = nullptr;
}

}  // namespace emu

// ---- the CUDA runtime calls the launchers make ----
extern "C" {

cudaError_t CUDARTAPI cudaGetLastError(void) {
  std::lock_guard<std::mutex> lock(emu::g_mu);
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t CUDARTAPI cudaPeekAtLastError(void) {
  std::lock_guard<std::mutex> lock(emu::g_mu);
  return emu::g_last_error;
}

cudaError_t CUDARTAPI cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
  std::memset(p, value, count);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int dev) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::env_dev("EMU_SMS", dev, 4); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = emu::env_dev("EMU_SMEM_PER_SM", dev, 228 * 1024);
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = emu::smem_optin(); return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t CUDARTAPI cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value > emu::smem_optin()) return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(emu::g_mu);
  emu::g_max_dynamic_smem[func] = value;
  return cudaSuccess;
}

// Static shared memory is taken from the block's arena as the kernel runs, so none is known
// here: sharedSizeBytes is 0 (a kernel's own static use shows at launch, against the limit).
cudaError_t CUDARTAPI cudaFuncGetAttributes(struct cudaFuncAttributes* attr, const void*) {
  std::memset(attr, 0, sizeof(*attr));
  attr->maxThreadsPerBlock = 1024;
  attr->maxDynamicSharedSizeBytes = 48 * 1024;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* num_blocks, const void*,
                                                                    int, size_t) {
  *num_blocks = emu::env_int("EMU_BLOCKS_PER_SM", 2);
  return cudaSuccess;
}

}  // extern "C"
