// spqmm on CPU: y = x W^T + bias, W packed as codebook ids (see csrc/core/spqmm.h for the layout
// and the safety argument; the kernels are in core/spqmm_{portable,avx2,avx512}.h).
//
// Which kernel runs, on how many threads and in what tiles is csrc/core/spqmm_plan.h's decision
// (the table there says what was measured for each entry); this file stages x for it and hands
// out the tiles. Work is cut into many small tiles taken by whichever thread is free
// (for_each_tile), so a thread that loses its core to another process costs its tile, not a fixed
// share of the layer; when even that costs more than one thread would take, the ops run on one
// thread for a while (Straggles). Past the crossover the weight is decoded once, in cache-sized
// blocks of rows each multiplied with at::mm (MKL / oneDNN), so dcx is not slower than dense at
// large batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/Utils.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "core/spqmm_amx.h"
#include "core/spqmm_avx2.h"
#include "core/spqmm_avx512.h"
#include "core/spqmm_plan.h"
#include "core/spqmm_portable.h"
#include "op_args.h"

namespace dcx {
namespace {

// The widest kernels this CPU runs (the VNNI kind needs VBMI too: every CPU with VNNI since Ice
// Lake and Zen 4 has it). DCX_CPU_ISA=avx512vnni (AVX-512 with VNNI, without AMX),
// avx512 (without VNNI), avx2 or generic asks for narrower ones (the tests run each).
SpqmmIsa cpu_isa() {
  SpqmmIsa best = SpqmmIsa::kPortable;
#ifdef DCX_SPQMM_AVX2
  if (avx2::supported()) best = SpqmmIsa::kAvx2;
#endif
#ifdef DCX_SPQMM_AVX512
  if (avx512::supported())
    best = avx512::supports_vnni() && avx512::supports_vbmi() ? SpqmmIsa::kAvx512Vnni : SpqmmIsa::kAvx512;
  if (best == SpqmmIsa::kAvx512Vnni && avx512::supports_amx()) best = SpqmmIsa::kAvx512Amx;
#endif
  const char* env = std::getenv("DCX_CPU_ISA");
  if (env == nullptr) return best;
  const std::string want = env;
  if (want == "generic") return SpqmmIsa::kPortable;
  if (want == "avx2" && best != SpqmmIsa::kPortable) return SpqmmIsa::kAvx2;
  if (want == "avx512" && spqmm_avx512(best)) return SpqmmIsa::kAvx512;
  if (want == "avx512vnni" && (best == SpqmmIsa::kAvx512Vnni || best == SpqmmIsa::kAvx512Amx))
    return SpqmmIsa::kAvx512Vnni;
  return best;
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Whether the ops run on one thread for now. With a core held by another process (a user's
// browser or build), the worker waiting for that core can reach a parallel region's end, or finish
// the tile it holds, a scheduler slice late (several milliseconds) while the others idle, and the
// OpenMP workers, spinning for the next region after each one, leave three threads wanting two
// cores, so the op's own thread loses its core too. No hand-out of tiles avoids that. An op that
// took over twice the time of its parallel work (what one thread would have taken, about) and a
// millisecond more sends the ops after it to one thread, for 20 ms, doubled for each such op in a
// row up to a second; then they try their threads again.
// Measured on a Zen 5 EPYC, two threads, 4096 x 4096 dense 4 bits in int8 compute at 1 / 16 / 128
// rows (interleaved with torch's int8 dynamic), against a build without it: with one core loaded
// it slows the median call (339 / 1,133 / 5,743 us against 212 / 620 / 4,978) and leaves the mean
// about where it was (682 / 1,714 / 7,104 against 601 / 1,627 / 6,071; a second run 564 / 1,648 /
// 6,786 against 889 / 1,701 / 6,387); with both cores loaded it saves the mean 1.7-3x (826 /
// 1,971 against 2,451 / 3,263 at 1 / 16 rows; 10% kept, 5 bits: 561 / 1,056 against 2,471 /
// 2,888). Two other cures did not help: a caller that sleeps rather than spins while it waits for
// a worker (times unchanged), and a pool of dcx's own threads whose caller never waits for a
// helper that has not started (quiet calls took up to twice as long, 1 row 191 -> 318 us: torch's
// OpenMP workers spin for the next region after each torch op and hold the helper's core).
class Straggles {
 public:
  bool solo() const { return now_ns() < solo_until_.load(std::memory_order_relaxed); }
  // An op that ran from `start` to `end`, its parallel work taking `work` of it.
  void record(int64_t start, int64_t end, int64_t work) {
    if (end - start > 2 * work + kSlackNs) {
      const int64_t hold = hold_ns_.load(std::memory_order_relaxed);
      solo_until_.store(end + hold, std::memory_order_relaxed);
      hold_ns_.store(std::min(2 * hold, kMaxHoldNs), std::memory_order_relaxed);
    } else {
      hold_ns_.store(kFirstHoldNs, std::memory_order_relaxed);
    }
  }

 private:
  static constexpr int64_t kSlackNs = 1000000, kFirstHoldNs = 20000000, kMaxHoldNs = 1000000000;
  std::atomic<int64_t> solo_until_{0};
  std::atomic<int64_t> hold_ns_{kFirstHoldNs};
};

Straggles& straggles() {
  static Straggles s;
  return s;
}

// The threads an op runs on, for its lifetime: torch's intra-op thread count, or one while
// Straggles says so; then the calling thread's own OpenMP count is one too, so the ATen calls
// inside the op (casts, copies, the BLAS) run on it as well. The op's parallel work (for_each_tile
// until its first worker runs out of tiles, a multi-threaded BLAS call whole) and its time go to
// Straggles.
class OpThreads {
 public:
  OpThreads() : outer_(current_) {
    current_ = this;
    if (at::in_parallel_region()) return;
    count_ = at::get_num_threads();
#ifdef _OPENMP
    if (count_ > 1 && straggles().solo()) {
      restore_ = count_;
      count_ = 1;
      omp_set_num_threads(1);  // this thread's setting only (the nthreads-var of its task)
    }
#endif
  }
  ~OpThreads() {
    current_ = outer_;
#ifdef _OPENMP
    if (restore_ > 0) omp_set_num_threads(restore_);
#endif
    if (work_ns_ > 0) straggles().record(start_ns_, now_ns(), work_ns_);
  }
  OpThreads(const OpThreads&) = delete;
  OpThreads& operator=(const OpThreads&) = delete;

  int count() const { return count_; }
  // Parallel work of the op running on this thread, if any.
  static void add_work(int64_t ns) {
    if (current_ != nullptr) current_->work_ns_ += ns;
  }

 private:
  int count_ = 1;
  int restore_ = 0;
  OpThreads* outer_;
  int64_t start_ns_ = now_ns();
  int64_t work_ns_ = 0;
  static thread_local OpThreads* current_;
};

thread_local OpThreads* OpThreads::current_ = nullptr;

// f(worker, item) for items [0, n) on up to `threads` workers (worker < threads indexes
// per-worker state). Each worker first walks its own contiguous share of the items, so that its
// reads form one stream for the prefetchers (with items handed out in turn, each thread's reads
// jumped every tile: 4096 x 4096 4-bit at one row, 608 -> 460 us), then takes what is left of the
// others' shares: a worker that loses its core to another process costs a tile, not its share.
// Inside another parallel region, or with one thread, the items run in order on the calling
// thread.
template <typename F>
void for_each_tile(int64_t n, int threads, const F& f) {
  const int64_t workers = std::min<int64_t>(std::max(threads, 1), n);
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(0, i);
    return;
  }
  struct alignas(64) Share {  // a cache line each: the workers' counters do not share one
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  std::unique_ptr<Share[]> shares(new Share[size_t(workers)]);
  for (int64_t w = 0; w < workers; ++w) {
    shares[w].next.store(w * n / workers, std::memory_order_relaxed);
    shares[w].end = (w + 1) * n / workers;
  }
  const int64_t start = now_ns();
  std::atomic<int64_t> first_idle{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w)
      for (int64_t k = 0; k < workers; ++k) {
        Share& s = shares[(w + k) % workers];
        for (int64_t i; (i = s.next.fetch_add(1, std::memory_order_relaxed)) < s.end;) f(w, i);
      }
    const int64_t idle = now_ns();
    for (int64_t seen = first_idle.load(std::memory_order_relaxed);
         idle < seen && !first_idle.compare_exchange_weak(seen, idle, std::memory_order_relaxed);) {
    }
  });
  OpThreads::add_work(first_idle.load(std::memory_order_relaxed) - start);
}

// bf16 dot products in hardware (AVX512-BF16, which every CPU with AMX also has). Without them a
// bf16 GEMM is emulated and several times slower than the fp32 one, which computes the same thing
// here: bf16 x bf16 products are exact in fp32 and the GEMM accumulates in fp32 either way.
bool native_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

SpqmmPacked make_packed(const at::Tensor& codes, const at::Tensor& windows,
                        const at::Tensor& group_ptr, const at::Tensor& chunks, int64_t n, int64_t k,
                        int64_t bits) {
  SpqmmPacked p;
  p.n = n;
  p.k = k;
  p.bits = static_cast<int>(bits);
  if (codes.scalar_type() == at::kByte) {
    p.dense = true;
    p.dense_codes = codes.data_ptr<uint8_t>();
    p.layout = spqmm_dense_layout(bits);
    p.dense_width = spqmm_dense_width(k, bits);
  } else {
    p.codes = reinterpret_cast<const uint16_t*>(codes.data_ptr<int16_t>());
    p.steps = codes.size(0);
    p.windows = windows.data_ptr<int32_t>();
    p.groups = spqmm_groups(n);
    p.group_ptr = group_ptr.data_ptr<int32_t>();
    p.chunks = chunks.data_ptr<int32_t>();
    p.num_chunks = chunks.numel() - 1;
  }
  return p;
}

// The layer's group scales (if any) into the kernels' view of it.
void attach(SpqmmPacked& p, const GroupScales& gs) {
  if (gs.data() != nullptr) p.set_group_scales(gs.data(), gs.group);
}

void check_seen(const SpqmmSeen& seen, int64_t k_codebook, int64_t in_features) {
  TORCH_CHECK(seen.max_id < static_cast<uint64_t>(k_codebook),
              "codes hold a codebook id outside the codebook: id ", seen.max_id,
              " >= codebook size ", k_codebook, " (corrupted packed weight)");
  TORCH_CHECK(seen.max_col < in_features, "windows or codes hold a column outside in_features: ",
              "column ", seen.max_col, " >= ", in_features, " (corrupted packed weight)");
  TORCH_CHECK(!seen.descending, "windows descend within a group of rows (corrupted packed weight)");
}

// v grown to hold n elements past its first 64-byte boundary, and that boundary: the kernels'
// vector and tile loads of rows that straddle cache lines cost more (AMX tile loads of a chunk
// 16-byte aligned, as a vector's storage is: 1.4 times as long).
template <typename T>
T* cache_aligned(std::vector<T>& v, size_t n) {
  constexpr size_t kExtra = 64 / sizeof(T);
  if (v.size() < n + kExtra) v.resize(n + kExtra);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

// What each worker saw, merged after the pass.
struct SeenBy {
  std::vector<SpqmmSeen> by;
  explicit SeenBy(int64_t n) : by(size_t(std::max<int64_t>(n, 1))) {}
  SpqmmSeen* operator[](int64_t i) { return &by[size_t(i)]; }
  SpqmmSeen merged() const {
    SpqmmSeen s;
    for (const auto& b : by) s.merge(b);
    return s;
  }
};

// The codebook as a zero-padded float table of kSpqmmTable entries.
std::vector<float> make_table(const at::Tensor& codebook) {
  std::vector<float> table(kSpqmmTable, 0.f);
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  std::copy(cb.data_ptr<float>(), cb.data_ptr<float>() + cb.numel(), table.begin());
  return table;
}

// Rows [r0, r0 + rows) of W decoded into w ([rows, K] floats) by the widest kernel there is
// (sparse mode: r0 a multiple of 16; a scatter of the kept weights, AVX-512 or portable).
void decode_rows(const SpqmmPacked& p, SpqmmIsa isa, const float* table, int64_t r0, int64_t rows,
                 float* w, SpqmmSeen* seen) {
#ifdef DCX_SPQMM_AVX512
  if (!p.dense && spqmm_avx512(isa)) {
    avx512::with_lut_kind(p, [&](auto lut) DCX_AVX512_FN {
      avx512::sparse_decode_rows<decltype(lut)::value>(p, r0, r0 + rows, table, w, seen);
    });
    return;
  }
  if (p.dense && spqmm_avx512(isa)) {
    avx512::with_dense_kind(p, [&](auto lut, auto layout) DCX_AVX512_FN {
      avx512::dense_decode_rows<decltype(lut)::value, decltype(layout)::value>(
          p, r0, r0 + rows, table, w, seen);
    });
    return;
  }
#endif
#ifdef DCX_SPQMM_AVX2
  if (p.dense && isa != SpqmmIsa::kPortable) {
    avx2::with_dense_kind(p, [&](auto nq, auto layout) DCX_AVX2_FN {
      avx2::dense_decode_rows<decltype(nq)::value, decltype(layout)::value>(
          p, r0, r0 + rows, table, w, seen);
    });
    return;
  }
#endif
  (void)isa;
  spqmm_decode_rows(p, r0, r0 + rows, table, w, seen);
}

// All of W decoded into w ([N, K] floats), in tiles of whole groups of 16 rows (sparse mode
// decodes a group at a time): past the crossover for one GEMM, and the spqmm_decode op.
void decode_whole(const SpqmmPacked& p, SpqmmIsa isa, int threads, const float* table, float* w,
                  SpqmmSeen* seen) {
  const int64_t groups = spqmm_groups(p.n);
  const int64_t per_tile = std::max<int64_t>(1, (int64_t(1) << 17) / (kSpqmmRows * std::max<int64_t>(p.k, 1)));
  const int64_t tiles = (groups + per_tile - 1) / per_tile;
  SeenBy seen_by(tiles);
  for_each_tile(tiles, threads, [&](int64_t, int64_t t) {
    const int64_t r0 = t * per_tile * kSpqmmRows, r1 = std::min(p.n, (t + 1) * per_tile * kSpqmmRows);
    decode_rows(p, isa, table, r0, r1 - r0, w + r0 * p.k, seen_by[t]);
  });
  seen->merge(seen_by.merged());
}

// y = x w^T + bias for a decoded block of rows, written as columns [r0, r0 + rb) of y (the
// BLAS takes y's row stride as its leading dimension, so y is never copied or transposed):
// float32 (MKL), or bfloat16 (oneDNN's bf16 GEMM, fp32 accumulation, the bias inside so the sum
// is rounded to bf16 once; only where the CPU has bf16 dot products, see native_bf16).
void gemm_block(const at::Tensor& xg, const at::Tensor& w, const at::Tensor& bias_f,
                const at::Tensor& bias_bf16, int64_t r0, at::Tensor& y) {
  const int64_t rb = w.size(0);
  at::Tensor cols = y.narrow(1, r0, rb);  // [M, rb] with row stride N
  if (xg.scalar_type() == at::kBFloat16) {
    const at::Tensor wh = w.to(at::kBFloat16).t();
    cols.copy_(bias_bf16.defined() ? at::addmm(bias_bf16.narrow(0, r0, rb), xg, wh) : at::mm(xg, wh));
    return;
  }
  at::mm_out(cols, xg, w.t());
  if (bias_f.defined()) cols.add_(bias_f.narrow(0, r0, rb));
}

// A layer of at most kWholeWeights weights (8 MB of fp32, L3-resident) multiplied with at least
// kWholeRows rows is decoded whole for one GEMM that the BLAS threads itself, as F.linear's:
// measured on 384 x 384, 1536 x 384 and 384 x 1536 (Zen 3, 2 threads), that GEMM took 1.03-1.09x
// F.linear's time at 4096 rows (three runs) against 1.07-1.17x for the per-thread blocks (two),
// which are faster at 128 rows (0.95-1.26x against 1.20-1.26x).
constexpr int64_t kWholeWeights = int64_t(1) << 21;
constexpr int64_t kWholeRows = 1024;

// Past the crossover: decode W once and multiply it with the BLAS in the activations' own type.
// Decoded whole (above) into the calling thread's buffer, or block of rows by block of rows, each
// into a per-thread buffer that stays in cache (so the decoded weight never goes to memory) and
// multiplied there (at::mm, single-threaded inside the parallel region).
void decode_gemm(const SpqmmPacked& p, SpqmmIsa isa, int threads, const float* table,
                 const at::Tensor& xg, const at::Tensor& bias_f, const at::Tensor& bias_bf16,
                 at::Tensor& y, SpqmmSeen* seen) {
  const int64_t N = p.n, K = p.k;
  if (N * K <= kWholeWeights && xg.size(0) >= kWholeRows) {
    // Kept from call to call: a fresh allocation of this size is mapped anew and page-faulted in
    // on every call.
    static thread_local std::vector<float> whole;
    if (whole.size() < size_t(N * K)) whole.resize(size_t(N * K));
    float* wp = whole.data();
    decode_whole(p, isa, threads, table, wp, seen);
    const int64_t start = now_ns();
    gemm_block(xg, at::from_blob(wp, {N, K}, at::kFloat), bias_f, bias_bf16, 0, y);
    if (threads > 1) OpThreads::add_work(now_ns() - start);
    return;
  }
  // Blocks of at most 8 MB decoded (at most 512 rows, at least 64 so each GEMM is not too thin,
  // whole groups of 16 rows), and at least four blocks per thread where the layer allows, so that
  // a thread that loses its core leaves a small remainder to the others.
  const int64_t most = std::max<int64_t>(64, std::min<int64_t>(512, (int64_t(1) << 21) / std::max<int64_t>(K, 1)));
  const int64_t share = (N + 4 * threads - 1) / (4 * threads);
  const int64_t rows = std::max<int64_t>(16, std::min<int64_t>(most, share) + 15) / 16 * 16;
  const int64_t blocks = (N + rows - 1) / rows;
  SeenBy seen_by(blocks);
  // Grad and inference mode are thread-local: the pool's threads take the caller's, so the BLAS's
  // out= form neither records inputs that require grad nor refuses to write an inference tensor.
  const at::ThreadLocalState caller_state;
  for_each_tile(blocks, threads, [&](int64_t, int64_t b) {
    const at::ThreadLocalStateGuard state(caller_state);
    // Each thread's decode buffer is kept from call to call (at most 512 x K floats): a fresh
    // allocation of this size is mapped anew and page-faulted in on every call.
    static thread_local std::vector<float> buffer;
    if (buffer.size() < size_t(rows * K)) buffer.resize(size_t(rows * K));
    const int64_t r0 = b * rows, rb = std::min(rows, N - r0);
    decode_rows(p, isa, table, r0, rb, buffer.data(), seen_by[b]);
    gemm_block(xg, at::from_blob(buffer.data(), {rb, K}, at::kFloat), bias_f, bias_bf16, r0, y);
  });
  seen->merge(seen_by.merged());
}

// Sparse mode, the step kernel for MB batch rows at a time (y [M][N]).
template <int MB>
void sparse_steps(const SpqmmPacked& p, SpqmmIsa isa, int threads, const float* table,
                  const at::Tensor& x2, const float* bias, float* y, SpqmmSeen* seen) {
  const int64_t M = x2.size(0), N = p.n;
  constexpr int64_t kEdge = 2 * MB * kSpqmmRows;
  // [MB][ldx], zero beyond K (windows clamped to K read zeros) and beyond the last batch row.
  const int64_t ldx = spqmm_x_stride(p.k);
  at::Tensor xs = at::empty({MB, ldx}, at::kFloat);
  std::vector<float> edge_sums(size_t(p.num_chunks * kEdge));
  std::vector<SpqmmEdge> edges(size_t(p.num_chunks));
  SeenBy seen_by(p.num_chunks);
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int mvalid = static_cast<int>(std::min<int64_t>(MB, M - m0));
    xs.zero_();
    xs.narrow(0, 0, mvalid).narrow(1, 0, p.k).copy_(x2.narrow(0, m0, mvalid));
    const float* xp = xs.data_ptr<float>();
    float* yb = y + m0 * N;
    for (int m = 0; m < mvalid; ++m) {  // y starts as the bias; the kernels add their sums
      if (bias) std::copy(bias, bias + N, yb + m * N); else std::fill(yb + m * N, yb + (m + 1) * N, 0.f);
    }
    for_each_tile(p.num_chunks, threads, [&](int64_t, int64_t c) {
      float* es = edge_sums.data() + c * kEdge;
#ifdef DCX_SPQMM_AVX512
      if (spqmm_avx512(isa)) {
        avx512::with_lut_kind(p, [&](auto lut) DCX_AVX512_FN {
          avx512::sparse_chunk<decltype(lut)::value, MB>(p, c, table, xp, ldx, yb, N, mvalid, es,
                                                         &edges[size_t(c)], seen_by[c]);
        });
        return;
      }
#endif
#ifdef DCX_SPQMM_AVX2
      if (MB == 1 && isa == SpqmmIsa::kAvx2) {
        if (p.bits <= 5) {
          avx2::sparse_chunk<true>(p, c, table, xp, yb, es, &edges[size_t(c)], seen_by[c]);
        } else {
          avx2::sparse_chunk<false>(p, c, table, xp, yb, es, &edges[size_t(c)], seen_by[c]);
        }
        return;
      }
#endif
      spqmm_sparse_chunk<MB>(p, c, table, xp, ldx, yb, N, mvalid, es, &edges[size_t(c)], seen_by[c]);
    });
    // Groups shared between chunks: every chunk's partial sums, added in chunk order.
    for (int64_t c = 0; c < p.num_chunks; ++c) {
      for (int side = 0; side < 2; ++side) {
        const int64_t g = edges[size_t(c)].group[side];
        if (g < 0) continue;
        const int lanes = static_cast<int>(std::min<int64_t>(kSpqmmRows, N - g * kSpqmmRows));
        const float* sums = edge_sums.data() + c * kEdge + side * MB * kSpqmmRows;
        for (int m = 0; m < mvalid; ++m)
          for (int i = 0; i < lanes; ++i) yb[m * N + g * kSpqmmRows + i] += sums[m * kSpqmmRows + i];
      }
      edges[size_t(c)] = SpqmmEdge();
    }
  }
  seen->merge(seen_by.merged());
}

// Sparse mode with the batch rows in the vector lanes: x staged once, transposed, as
// ceil(M / MT) tiles of [K + 32][MT] (MT = 16 for AVX-512, 8 otherwise; zero past K and past the
// valid rows), as floats or (T = uint16_t) as bf16 bit patterns, x2 holding bf16 values then;
// work items of plan.tile groups of 16 rows, each run over every tile, up to TB tiles per call
// (its codes stay in cache meanwhile): run(g0, g1, first tile, tiles, tile stride, valid rows
// from that tile on, y of that tile, seen).
template <int MT, int TB, typename T, typename Run>
void batch_tiles(const SpqmmPacked& p, const SpqmmPlan& plan, const at::Tensor& x2, float* y,
                 SpqmmSeen* seen, Run&& run) {
  const int64_t M = x2.size(0), K = p.k, tiles = (M + MT - 1) / MT, per_tile = (K + kSpqmmWindow) * MT;
  // Staged on the plan's threads, a tile each (ATen's strided copy of 128 x 4096: 0.64 ms on two
  // threads, 1.24 on one).
  const std::unique_ptr<T[]> xt(new T[tiles * per_tile]);  // every element written below
  const float* xs = x2.data_ptr<float>();
  for_each_tile(tiles, plan.threads, [&](int64_t, int64_t t) {
    T* dst = xt.get() + t * per_tile;
    const int64_t mvalid = std::min<int64_t>(MT, M - t * MT);
    std::fill(dst, dst + per_tile, T(0));
    for (int64_t m = 0; m < mvalid; ++m) {
      const float* row = xs + (t * MT + m) * K;
      if constexpr (std::is_same_v<T, float>) {
        for (int64_t kk = 0; kk < K; ++kk) dst[kk * MT + m] = row[kk];
      } else {
        for (int64_t kk = 0; kk < K; ++kk) dst[kk * MT + m] = bf16_bits(row[kk]);  // exact: bf16 values
      }
    }
  });
  const int64_t items = (p.groups + plan.tile - 1) / plan.tile;
  SeenBy seen_by(plan.threads);
  for_each_tile(items, plan.threads, [&](int64_t w, int64_t i) {
    const int64_t g0 = i * plan.tile, g1 = std::min(p.groups, g0 + plan.tile);
    for (int64_t t = 0; t < tiles; t += TB)
      run(g0, g1, xt.get() + t * per_tile, static_cast<int>(std::min<int64_t>(TB, tiles - t)), per_tile,
          M - t * MT, y + t * MT * p.n, seen_by[w]);
  });
  seen->merge(seen_by.merged());
}

template <int MT>
void sparse_batch(const SpqmmPacked& p, SpqmmIsa isa, const SpqmmPlan& plan, const float* table,
                  const at::Tensor& x2, const float* bias, float* y, SpqmmSeen* seen) {
  batch_tiles<MT, 1, float>(p, plan, x2, y, seen, [&](int64_t g0, int64_t g1, const float* xtile, int,
                                                      int64_t, int64_t rows, float* yt, SpqmmSeen* s) {
    const int mvalid = static_cast<int>(std::min<int64_t>(MT, rows));
#ifdef DCX_SPQMM_AVX512
    if constexpr (MT == 16) {
      avx512::with_lut_kind(p, [&](auto lut) DCX_AVX512_FN {
        avx512::sparse_batch<decltype(lut)::value>(p, g0, g1, table, xtile, mvalid, bias, yt, p.n, s);
      });
      return;
    }
#endif
#ifdef DCX_SPQMM_AVX2
    if (isa != SpqmmIsa::kPortable) {
      if (p.bits <= 5) {
        avx2::sparse_batch<true>(p, g0, g1, table, xtile, mvalid, bias, yt, p.n, s);
      } else {
        avx2::sparse_batch<false>(p, g0, g1, table, xtile, mvalid, bias, yt, p.n, s);
      }
      return;
    }
#endif
    spqmm_sparse_batch<MT>(p, g0, g1, table, xtile, mvalid, bias, yt, p.n, s);
  });
}

#ifdef DCX_SPQMM_AVX512
// Sparse mode in bf16 compute with AVX512-BF16: x2 holds bf16 values, staged as bf16 bits.
void sparse_batch_bf16(const SpqmmPacked& p, const SpqmmPlan& plan, const float* table,
                       const at::Tensor& x2, const float* bias, float* y, SpqmmSeen* seen) {
  TORCH_CHECK(avx512::supports_bf16(), "the sparse bf16 kernel needs AVX512-BF16");
  batch_tiles<16, avx512::kBf16Tiles, uint16_t>(
      p, plan, x2, y, seen,
      [&](int64_t g0, int64_t g1, const uint16_t* xtile, int tiles, int64_t stride, int64_t rows, float* yt,
          SpqmmSeen* s) {
        avx512::with_lut_kind(p, [&](auto lut) DCX_AVX512_FN {
          avx512::sparse_batch_bf16<decltype(lut)::value>(p, g0, g1, table, xtile, tiles, stride, rows, bias,
                                                          yt, p.n, s);
        });
      });
}
#endif

// Dense mode, MB batch rows per pass: x is [MB][K] for the AVX-512 and AVX2 kernels, [K][MB]
// for the portable one (zero past the valid rows either way); tiles of plan.tile rows of W.
template <int MB>
void dense_rows(const SpqmmPacked& p, SpqmmIsa isa, const SpqmmPlan& plan, const float* table,
                const at::Tensor& x2, const float* bias, float* y, SpqmmSeen* seen) {
  const int64_t M = x2.size(0), N = p.n, K = p.k, tiles = (N + plan.tile - 1) / plan.tile;
  const bool by_rows = isa != SpqmmIsa::kPortable;
  at::Tensor xb = by_rows ? at::empty({MB, K}, at::kFloat) : at::empty({K, MB}, at::kFloat);
  SeenBy seen_by(plan.threads);
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int mvalid = static_cast<int>(std::min<int64_t>(MB, M - m0));
    const at::Tensor xm = x2.narrow(0, m0, mvalid);
    xb.zero_();
    (by_rows ? xb.narrow(0, 0, mvalid) : xb.narrow(1, 0, mvalid)).copy_(by_rows ? xm : xm.t());
    const float* xp = xb.data_ptr<float>();
    float* yb = y + m0 * N;
    for_each_tile(tiles, plan.threads, [&](int64_t w, int64_t t) {
      const int64_t r0 = t * plan.tile, r1 = std::min(N, r0 + plan.tile);
      SpqmmSeen* s = seen_by[w];
#ifdef DCX_SPQMM_AVX512
      if (spqmm_avx512(isa)) {
        avx512::with_dense_kind(p, [&](auto lut, auto layout) DCX_AVX512_FN {
          avx512::dense_rows<decltype(lut)::value, decltype(layout)::value, MB>(
              p, r0, r1, table, xp, K, mvalid, bias, yb, N, s);
        });
        return;
      }
#endif
#ifdef DCX_SPQMM_AVX2
      if (isa == SpqmmIsa::kAvx2) {
        avx2::with_dense_kind(p, [&](auto nt, auto layout) DCX_AVX2_FN {
          avx2::dense_rows<decltype(nt)::value, decltype(layout)::value, MB>(
              p, r0, r1, table, xp, K, mvalid, bias, yb, N, s);
        });
        return;
      }
#endif
      spqmm_dense_rows<MB>(p, r0, r1, table, xp, bias, yb, N, mvalid, s);
    });
  }
  seen->merge(seen_by.merged());
}

// Dense mode with AVX2 for many batch rows: x staged once as [M rounded up to 4][K] and each
// tile's rows of W decoded once for all of them (avx2::dense_rows_many, pairs of rows).
void dense_many(const SpqmmPacked& p, const SpqmmPlan& plan, const float* table,
                const at::Tensor& x2, const float* bias, float* y, SpqmmSeen* seen) {
#ifdef DCX_SPQMM_AVX2
  const int64_t M = x2.size(0), K = p.k;
  at::Tensor xs = at::zeros({(M + 3) / 4 * 4, K}, at::kFloat);
  xs.narrow(0, 0, M).copy_(x2);
  const float* xp = xs.data_ptr<float>();
  const int64_t rows = (plan.tile + 1) / 2 * 2, tiles = (p.n + rows - 1) / rows;
  SeenBy seen_by(plan.threads);
  for_each_tile(tiles, plan.threads, [&](int64_t w, int64_t t) {
    static thread_local std::vector<float> decoded;  // two decoded rows
    if (decoded.size() < size_t(2 * K)) decoded.resize(size_t(2 * K));
    const int64_t r0 = t * rows, r1 = std::min(p.n, r0 + rows);
    avx2::with_dense_kind(p, [&](auto nq, auto layout) DCX_AVX2_FN {
      avx2::dense_rows_many<decltype(nq)::value, decltype(layout)::value>(
          p, r0, r1, table, xp, K, M, bias, y, p.n, decoded.data(), seen_by[w]);
    });
  });
  seen->merge(seen_by.merged());
#else
  (void)p, (void)plan, (void)table, (void)x2, (void)bias, (void)y, (void)seen;
  TORCH_CHECK(false, "dense_many needs the AVX2 kernels");
#endif
}

// int8 compute (csrc/core/spqmm_int8.h) for a dense-mode layer. x is quantized once per call
// into [M rounded up to the block][blocks * 32] int8 values (held as int16 for pmaddwd, each block
// in q8_slot order) and [..][blocks] scales, zero past the valid rows and columns; each tile of
// W's rows runs every block of MB activation rows over it, so it is read from memory once and
// then from the thread's cache.
template <int MB>
void q8_rows(const SpqmmPacked& p, int64_t r0, int64_t r1, const int16_t* table, float wscale,
             const int16_t* xq, int64_t ldq, const float* xs, int64_t M, const float* bias,
             float* y, SpqmmIsa isa, SpqmmSeen* seen) {
  const int64_t blocks = q8_blocks(p.k);
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int mvalid = static_cast<int>(std::min<int64_t>(MB, M - m0));
    const int16_t* xb = xq + m0 * ldq;
    const float* sb = xs + m0 * blocks;
    float* yb = y + m0 * p.n;
#ifdef DCX_SPQMM_AVX2
    if (isa != SpqmmIsa::kPortable) {
      avx2::with_q8_kind(p, [&](auto nt, auto layout) DCX_AVX2_FN {
        avx2::q8_dense_rows<decltype(nt)::value, decltype(layout)::value, MB>(
            p, r0, r1, table, wscale, xb, ldq, sb, mvalid, bias, yb, p.n, seen);
      });
      continue;
    }
#endif
    spqmm_q8_dense_rows<MB>(p, r0, r1, table, wscale, xb, ldq, sb, mvalid, bias, yb, p.n, seen);
  }
}

// Rows [0, m) of x ([m][k]) quantized by q8_quantize_row into q ([m][ldq]) and scale ([m][lds]),
// compiled for each instruction set: the baseline build calls libm for every rounding.
DCX_SPQMM_MULTIVERSION void q8_quantize_rows(const float* x, int64_t m, int64_t k, int16_t* q,
                                             int64_t ldq, float* scale, int64_t lds) {
  for (int64_t i = 0; i < m; ++i) q8_quantize_row(x + i * k, k, q + i * ldq, scale + i * lds);
}

// bf16_stage_pairs, compiled for each instruction set.
DCX_SPQMM_MULTIVERSION void bf16_stage(const uint16_t* x, int64_t m, int64_t k, int64_t g, bool interleaved,
                                       uint32_t* xv) {
  bf16_stage_pairs(x, m, k, g, interleaved, xv);
}

#ifdef DCX_SPQMM_AVX512
// bf16 compute with AMX (core/spqmm_amx.h): the activations (xb, bf16) staged once in pairs, then
// each tile of W's rows (a multiple of the kernel's 32) decoded chunk by chunk straight into the
// tiles' layout: dense codes by bf16_amx, sparse steps by sparse_amx.
void amx_product(const SpqmmPacked& p, const SpqmmPlan& plan, const at::Tensor& codebook,
                 const at::Tensor& xb, const float* bias, float* y, SpqmmSeen* seen) {
  TORCH_CHECK(avx512::supports_amx(), "the bf16 AMX kernels need AMX");
  TORCH_CHECK(xb.scalar_type() == at::kBFloat16 && xb.is_contiguous(), "the AMX kernels take contiguous bf16 x");
  const int64_t M = xb.size(0), K = p.k, blocks = (K + 31) / 32, groups = (M + 15) / 16;
  std::vector<uint32_t> staged;
  uint32_t* const xv = cache_aligned(staged, size_t(groups * blocks * 256));
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  for_each_tile(groups, plan.threads,
                [&](int64_t, int64_t g) { bf16_stage(xp, M, K, g, p.dense, xv + g * blocks * 256); });
  const std::vector<float> table = make_table(codebook);
  const avx512::PairTables tab = avx512::bf16_pair_tables(table.data(), codebook.numel());
  const avx512::Table floats = avx512::load_table(table.data());
  const int64_t tile = (plan.tile + avx512::kAmxRows - 1) / avx512::kAmxRows * avx512::kAmxRows;
  const int64_t tiles = (p.n + tile - 1) / tile;
  SeenBy seen_by(plan.threads);
  for_each_tile(tiles, plan.threads, [&](int64_t w, int64_t t) {
    // Kept from call to call (a fresh allocation of 256 KB is mapped anew and faulted in each time).
    static thread_local std::vector<int32_t> decoded;  // two chunks of 32 rows of W as bf16 pairs
    static thread_local std::vector<float> sums;       // the C tiles
    int32_t* const wp = cache_aligned(decoded, size_t(avx512::kAmxBufferWords));
    float* const sp = cache_aligned(sums, size_t(avx512::amx_sums_floats(M)));
    const int64_t r0 = t * tile, r1 = std::min(p.n, r0 + tile);
    if (!p.dense) {
      avx512::with_lut_kind(p, [&](auto lut) DCX_AMX_FN {
        avx512::sparse_amx<decltype(lut)::value>(p, r0, r1, p.group_scale ? floats : tab.lo, xv, M,
                                                 bias, y, p.n, wp, sp, seen_by[w]);
      });
      return;
    }
    avx512::with_dense_kind(p, [&](auto lut, auto layout) DCX_AMX_FN {
      avx512::bf16_amx<decltype(lut)::value, decltype(layout)::value>(
          p, r0, r1, table.data(), tab, xv, M, bias, y, p.n, wp, sp, seen_by[w]);
    });
  });
  seen->merge(seen_by.merged());
}
#endif

void int8_product(const SpqmmPacked& p, SpqmmIsa isa, const SpqmmPlan& plan,
                  const at::Tensor& codebook, const at::Tensor& x2, const float* bias, float* y,
                  SpqmmSeen* seen) {
  const bool many = plan.kernel == SpqmmKernel::kInt8Many && isa != SpqmmIsa::kPortable;
  const int64_t M = x2.size(0), K = p.k, mb = many ? 4 : plan.block;
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  int16_t table[256];
  const float wscale = q8_codebook(cb.data_ptr<float>(), cb.numel(), table);
  const int64_t blocks = q8_blocks(K), ldq = blocks * kQ8Block, rows = (M + mb - 1) / mb * mb;
  at::Tensor xq = at::zeros({rows, ldq}, at::kShort);
  at::Tensor xs = at::zeros({rows, std::max<int64_t>(blocks, 1)}, at::kFloat);
  const float* xp = x2.data_ptr<float>();
  int16_t* qp = xq.data_ptr<int16_t>();
  float* sp = xs.data_ptr<float>();
  // Quantized on the plan's threads, 16 rows a tile, when there is enough of it (at 128 x 1536
  // on one thread it took a sixth of the VNNI kernel's call).
  const int64_t per_tile = M * K >= (int64_t(1) << 16) ? 16 : std::max<int64_t>(M, 1);
  for_each_tile((M + per_tile - 1) / per_tile, plan.threads, [&](int64_t, int64_t t) {
    const int64_t m0 = t * per_tile, m1 = std::min(M, m0 + per_tile);
    q8_quantize_rows(xp + m0 * K, m1 - m0, K, qp + m0 * ldq, ldq, sp + m0 * blocks, blocks);
  });
  const int64_t tile = many ? (plan.tile + 1) / 2 * 2 : plan.tile;
  const int64_t tiles = (p.n + tile - 1) / tile;
  SeenBy seen_by(plan.threads);
  for_each_tile(tiles, plan.threads, [&](int64_t w, int64_t t) {
    const int64_t r0 = t * tile, r1 = std::min(p.n, r0 + tile);
#ifdef DCX_SPQMM_AVX2
    if (many) {
      static thread_local std::vector<int16_t> decoded;  // two rows of W as int16, kept
      if (decoded.size() < size_t(2 * ldq)) decoded.resize(size_t(2 * ldq));
      avx2::with_q8_kind(p, [&](auto nt, auto layout) DCX_AVX2_FN {
        avx2::q8_dense_many<decltype(nt)::value, decltype(layout)::value>(
            p, r0, r1, table, wscale, qp, ldq, sp, M, bias, y, p.n, decoded.data(), ldq, seen_by[w]);
      });
      return;
    }
#endif
    switch (mb) {
      case 1: q8_rows<1>(p, r0, r1, table, wscale, qp, ldq, sp, M, bias, y, isa, seen_by[w]); break;
      case 2: q8_rows<2>(p, r0, r1, table, wscale, qp, ldq, sp, M, bias, y, isa, seen_by[w]); break;
      case 4: q8_rows<4>(p, r0, r1, table, wscale, qp, ldq, sp, M, bias, y, isa, seen_by[w]); break;
      default: q8_rows<8>(p, r0, r1, table, wscale, qp, ldq, sp, M, bias, y, isa, seen_by[w]);
    }
  });
  seen->merge(seen_by.merged());
}

// Rows [0, m) of v ([m][k]) quantized whole by q8_quantize_whole_row, compiled for each
// instruction set.
DCX_SPQMM_MULTIVERSION void q8_quantize_whole_rows(const float* v, int64_t m, int64_t k, int8_t* q,
                                                   float* scale) {
  for (int64_t i = 0; i < m; ++i) scale[i] = q8_quantize_whole_row(v + i * k, k, q + i * k);
}

// y[i, j] = sx[i] sw[j] acc[i - i0, j] + bias[j] for rows [i0, i1) of y, acc a block of x W^T
// ([i1 - i0][n]); compiled for each instruction set.
DCX_SPQMM_MULTIVERSION void q8_gemm_epilogue_rows(const int32_t* acc, const float* sx, const float* sw,
                                                  const float* bias, int64_t i0, int64_t i1, int64_t n,
                                                  float* y) {
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t j = 0; j < n; ++j)
      y[i * n + j] = float(acc[(i - i0) * n + j]) * (sx[i] * sw[j]) + (bias != nullptr ? bias[j] : 0.f);
}

// y[i, j] = sx[i] sw[j] acc[j - j0, i - i0] + bias[j] for rows [i0, i1) and columns [j0, j1) of y
// (row stride n), acc holding a block of W x^T with rows of lda: 64 rows of y at a time through a
// small block, so that acc is read and y written along their rows. Compiled for each instruction
// set.
DCX_SPQMM_MULTIVERSION void q8_gemm_epilogue(const int32_t* acc, int64_t lda, const float* sx,
                                             const float* sw, const float* bias, int64_t i0,
                                             int64_t i1, int64_t j0, int64_t j1, int64_t n, float* y) {
  constexpr int64_t kRows = 64, kCols = 16;
  float block[kCols][kRows];
  for (int64_t c0 = j0; c0 < j1; c0 += kCols) {
    const int64_t c1 = std::min(j1, c0 + kCols);
    for (int64_t r0 = i0; r0 < i1; r0 += kRows) {
      const int64_t rb = std::min(kRows, i1 - r0);
      for (int64_t j = c0; j < c1; ++j) {
        const int32_t* a = acc + (j - j0) * lda + (r0 - i0);
        const float b = bias != nullptr ? bias[j] : 0.f;
        for (int64_t i = 0; i < rb; ++i) block[j - c0][i] = float(a[i]) * (sx[r0 + i] * sw[j]) + b;
      }
      for (int64_t i = 0; i < rb; ++i)
        for (int64_t j = c0; j < c1; ++j) y[(r0 + i) * n + j] = block[j - c0][i];
    }
  }
}

// int8 compute at many rows (SpqmmKernel::kInt8Gemm; the rule in core/spqmm_int8.h): x quantized
// per row, W decoded group by group into each thread's float buffer and quantized per row into
// one int8 copy (kept from call to call, as decode_gemm's), then ATen's int8 GEMM (oneDNN's VNNI
// kernels; cpu_plan takes this only where torch runs it through oneDNN), in tiles or blocks as
// said below, each followed by its epilogue.
void int8_gemm(const SpqmmPacked& p, SpqmmIsa isa, const SpqmmPlan& plan, const float* table,
               const at::Tensor& x2, const float* bias, float* y, SpqmmSeen* seen) {
  const int64_t M = x2.size(0), N = p.n, K = p.k;
  at::Tensor xq = at::empty({M, K}, at::kChar);
  at::Tensor xs = at::empty({M}, at::kFloat);
  const float* xp = x2.data_ptr<float>();
  int8_t* qp = xq.data_ptr<int8_t>();
  float* sxp = xs.data_ptr<float>();
  const int64_t x_tile = 16;
  for_each_tile((M + x_tile - 1) / x_tile, plan.threads, [&](int64_t, int64_t t) {
    const int64_t m0 = t * x_tile, m1 = std::min(M, m0 + x_tile);
    q8_quantize_whole_rows(xp + m0 * K, m1 - m0, K, qp + m0 * K, sxp + m0);
  });
  static thread_local std::vector<int8_t> whole;  // the caller's: the workers write through wp
  if (whole.size() < size_t(N * K)) whole.resize(size_t(N * K));
  int8_t* const wp = whole.data();
  std::vector<float> sw(static_cast<size_t>(N));
  // Tiles of whole groups of 16 rows, about 32K weights each (a descheduled thread costs one).
  const int64_t per_tile = std::max<int64_t>(1, (int64_t(1) << 15) / (kSpqmmRows * std::max<int64_t>(K, 1)));
  const int64_t tiles = (spqmm_groups(N) + per_tile - 1) / per_tile;
  SeenBy seen_by(tiles);
  // Decoded a few rows at a time (16 KB of floats, in L1 when quantized; sparse mode a group of
  // 16 rows at a time, as its steps interleave them).
  const int64_t sub = p.dense ? std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)) : kSpqmmRows;
  for_each_tile(tiles, plan.threads, [&](int64_t, int64_t t) {
    const int64_t r0 = t * per_tile * kSpqmmRows, r1 = std::min(N, (t + 1) * per_tile * kSpqmmRows);
#ifdef DCX_SPQMM_AVX512
    if (!p.dense && spqmm_avx512(isa)) {  // straight into int8, no float rows
      avx512::with_lut_kind(p, [&](auto lut) DCX_AVX512_FN {
        avx512::sparse_quantize_rows<decltype(lut)::value>(p, r0, r1, table, wp + r0 * K,
                                                           sw.data() + r0, seen_by[t]);
      });
      return;
    }
#endif
    static thread_local std::vector<float> buffer;
    if (buffer.size() < size_t(sub * K)) buffer.resize(size_t(sub * K));
    for (int64_t r = r0; r < r1; r += sub) {
      const int64_t rows = std::min(sub, r1 - r);
      decode_rows(p, isa, table, r, rows, buffer.data(), seen_by[t]);
      q8_quantize_whole_rows(buffer.data(), rows, K, wp + r * K, sw.data() + r);
    }
  });
  seen->merge(seen_by.merged());
  // Fewer rows of x than of W: W x^T, as oneDNN reads a transposed B slower (4096 x 4096, 9 / 64 /
  // 128 rows: 3.7 / 5.5 / 8.0 ms for x W^T against 2.3 / 3.7 / 6.3), in tiles of 512 rows of W,
  // each a single-threaded GEMM and its epilogue (acc turned back 16 columns of y at a time), so
  // a thread that loses its core costs a tile (4096 x 4096, 4 bits, 128 / 64 rows, median of 30
  // interleaved calls: quiet 10.2 / 6.0 ms against 9.7 / 5.8 for one GEMM threaded by oneDNN;
  // with one core loaded 15.1 / 8.4 against 19.5 / 10.1). Otherwise x W^T (the two orders took
  // the same time at 4096 rows of all-MiniLM-L6-v2's layers, where turning acc back cost more
  // than the GEMM), in blocks of 1024 rows of x whose int32 results (6 MB at 1536 columns) the
  // epilogue reads from L3 (4096 x 384 -> 1536, median of 40 interleaved calls: 10.7 ms against
  // 15.6 in one block, 17.9 in blocks of 512; 4096 x 1536 -> 384 and 4096 x 384 -> 384 alike
  // within 5%).
  const at::Tensor wq = at::from_blob(wp, {N, K}, at::kChar);
  if (M < N) {
    constexpr int64_t kTileRows = 512;
    const at::ThreadLocalState caller_state;
    for_each_tile((N + kTileRows - 1) / kTileRows, plan.threads, [&](int64_t, int64_t t) {
      const at::ThreadLocalStateGuard state(caller_state);
      const int64_t r0 = t * kTileRows, r1 = std::min(N, r0 + kTileRows);
      const at::Tensor acc = at::_int_mm(wq.narrow(0, r0, r1 - r0), xq.t());
      q8_gemm_epilogue(acc.data_ptr<int32_t>(), M, sxp, sw.data(), bias, 0, M, r0, r1, N, y);
    });
    return;
  }
  constexpr int64_t kBlockRows = 1024;
  for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
    const int64_t m1 = std::min(M, m0 + kBlockRows);
    const int64_t gemm_start = now_ns();
    const at::Tensor acc = at::_int_mm(xq.narrow(0, m0, m1 - m0), wq.t());
    if (plan.threads > 1) OpThreads::add_work(now_ns() - gemm_start);
    const int32_t* ap = acc.data_ptr<int32_t>();
    const int64_t y_tile = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(N, 1));
    for_each_tile((m1 - m0 + y_tile - 1) / y_tile, plan.threads, [&](int64_t, int64_t t) {
      const int64_t i0 = m0 + t * y_tile;
      q8_gemm_epilogue_rows(ap + (i0 - m0) * N, sxp, sw.data(), bias, i0, std::min(m1, i0 + y_tile), N, y);
    });
  }
}

#ifdef DCX_SPQMM_AVX512
// The many-rows int8 rule fused (SpqmmKernel::kInt8Fused and, for a few rows, kInt8Dots; core/
// spqmm_avx512.h): x quantized per row and staged with the batch rows in the lanes (or a row at a
// time), then each tile of W's rows (a multiple of 8) decoded into int8 by tables of their own and
// multiplied by u8 x s8 dot products.
void int8_fused(const SpqmmPacked& p, const SpqmmPlan& plan, const at::Tensor& codebook,
                const at::Tensor& x2, const float* bias, float* y, SpqmmSeen* seen) {
  const int64_t M = x2.size(0), K = p.k, groups = q8_lane_groups(M);
  const int64_t quads = q8_units(p.layout, K) * 16;
  const bool dots = plan.kernel == SpqmmKernel::kInt8Dots;
  std::vector<int8_t> quantized(static_cast<size_t>(M * K));
  std::vector<float> sx(static_cast<size_t>(M));
  std::vector<int32_t> staged;  // the lanes order's quads, or the dots order's bytes (fewer)
  int32_t* const xv = cache_aligned(staged, size_t(groups * quads * kQ8Lanes));
  const float* xp = x2.data_ptr<float>();
  for_each_tile(groups, plan.threads, [&](int64_t, int64_t g) {
    const int64_t m0 = g * kQ8Lanes, m1 = std::min(M, m0 + kQ8Lanes);
    q8_quantize_whole_rows(xp + m0 * K, m1 - m0, K, quantized.data() + m0 * K, sx.data() + m0);
    if (dots) {
      avx512::stage_units(quantized.data() + m0 * K, m1 - m0, K, p.layout,
                          reinterpret_cast<uint8_t*>(xv) + m0 * quads * 4);
    } else {
      static thread_local std::vector<uint8_t> rows;  // the group's rows in unit order
      uint8_t* const rp = cache_aligned(rows, size_t(kQ8Lanes * quads * 4));
      avx512::stage_quads(quantized.data(), M, K, p.layout, g, rp, xv + g * quads * kQ8Lanes);
    }
  });
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const avx512::FusedTables ft = avx512::fused_tables(cb.data_ptr<float>(), cb.numel(), int(p.bits));
  const int64_t tile = (plan.tile + avx512::kFusedRows - 1) / avx512::kFusedRows * avx512::kFusedRows;
  const int64_t tiles = (p.n + tile - 1) / tile;
  SeenBy seen_by(plan.threads);
  for_each_tile(tiles, plan.threads, [&](int64_t w, int64_t t) {
    static thread_local std::vector<int8_t> decoded;  // a chunk of 8 rows of W, int8
    static thread_local std::vector<int32_t> sums;    // their dots with every activation row
    int8_t* const wp = cache_aligned(decoded, size_t(avx512::kFusedRows * avx512::kFusedChunk * 64));
    int32_t* const sp = cache_aligned(sums, size_t((dots ? M : groups) * avx512::kFusedRows * kQ8Lanes));
    const int64_t r0 = t * tile, r1 = std::min(p.n, r0 + tile);
    avx512::with_dense_kind(p, [&](auto lut, auto layout) DCX_AVX512_Q8_FN {
      constexpr avx512::Lut L = decltype(lut)::value;
      constexpr SpqmmDense D = decltype(layout)::value;
      if (dots) {
        avx512::q8_fused<L, D, avx512::FusedOrder::kDots>(p, r0, r1, ft, xv, sx.data(), M, bias, y, p.n, wp, sp, seen_by[w]);
      } else {
        avx512::q8_fused<L, D>(p, r0, r1, ft, xv, sx.data(), M, bias, y, p.n, wp, sp, seen_by[w]);
      }
    });
  });
  seen->merge(seen_by.merged());
}
#endif

#ifdef DCX_SPQMM_AVX512
// Sparse mode in int8 compute (SpqmmKernel::kSparseInt8; core/spqmm_avx512.h sparse_q8): x
// quantized per row and staged as unsigned bytes with 128 bytes of zeros past K, then work items
// of plan.tile groups of W, each against every row of x.
void sparse_int8(const SpqmmPacked& p, const SpqmmPlan& plan, const float* table, const at::Tensor& codebook,
                 const at::Tensor& x2, const float* bias, float* y, SpqmmSeen* seen) {
  TORCH_CHECK(avx512::supports_vnni() && avx512::supports_vbmi(), "the sparse int8 kernel needs AVX-512 VNNI and VBMI");
  const int64_t M = x2.size(0), K = p.k, ldx = (K + 128 + 63) / 64 * 64;
  std::vector<int8_t> quantized(static_cast<size_t>(M * K));
  std::vector<float> sx(static_cast<size_t>(M));
  std::vector<uint8_t> staged;
  uint8_t* const xs = cache_aligned(staged, size_t(M * ldx));
  const float* xp = x2.data_ptr<float>();
  for_each_tile(q8_lane_groups(M), plan.threads, [&](int64_t, int64_t t) {
    const int64_t m0 = t * kQ8Lanes, m1 = std::min(M, m0 + kQ8Lanes);
    q8_quantize_whole_rows(xp + m0 * K, m1 - m0, K, quantized.data() + m0 * K, sx.data() + m0);
    avx512::stage_units(quantized.data() + m0 * K, m1 - m0, K, SpqmmDense::kBytes, xs + m0 * ldx, ldx);
  });
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  const avx512::FusedTables ft = avx512::fused_tables(cb.data_ptr<float>(), cb.numel(), int(p.bits));
  const int64_t items = (p.groups + plan.tile - 1) / plan.tile;
  SeenBy seen_by(plan.threads);
  for_each_tile(items, plan.threads, [&](int64_t w, int64_t i) {
    static thread_local std::vector<int32_t> sums;  // a group's dots with every row of x
    int32_t* const sp = cache_aligned(sums, size_t(M * kQ8Lanes));
    const int64_t g0 = i * plan.tile, g1 = std::min(p.groups, g0 + plan.tile);
    avx512::with_lut_kind(p, [&](auto lut) DCX_AVX512_Q8_FN {
      avx512::sparse_q8<decltype(lut)::value>(p, g0, g1, table, ft, xs, ldx, sx.data(), M, bias, y, p.n, sp,
                                              seen_by[w]);
    });
  });
  seen->merge(seen_by.merged());
}
#endif

// The product for a plan: y [M, N] float32 (every element written).
void run_plan(const SpqmmPacked& p, SpqmmIsa isa, const SpqmmPlan& plan, const at::Tensor& codebook,
              const at::Tensor& xc, const at::Tensor& bias_c, at::Tensor& y, SpqmmSeen* seen) {
  const at::Tensor bias_f = bias_c.defined() ? bias_c.to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
#ifdef DCX_SPQMM_AVX512
  // The AMX kernels stage xc's bf16 values themselves (no float copy: at 16 rows of a small
  // layer each conversion costs about as much as the kernel's decode).
  if (plan.kernel == SpqmmKernel::kBf16Amx || plan.kernel == SpqmmKernel::kSparseAmx) {
    amx_product(p, plan, codebook, xc.contiguous(), bp, yp, seen);
    return;
  }
#endif
  const at::Tensor x2 = xc.to(at::kFloat).contiguous();
#ifdef DCX_SPQMM_AVX512
  if (spqmm_fused_int8(plan.kernel)) {
    TORCH_CHECK(avx512::supports_vnni() && avx512::supports_vbmi(), "the fused int8 kernel needs AVX-512 VNNI and VBMI");
    int8_fused(p, plan, codebook, x2, bp, yp, seen);
    return;
  }
#endif
  if (plan.kernel == SpqmmKernel::kInt8Rows || plan.kernel == SpqmmKernel::kInt8Many) {
    int8_product(p, isa, plan, codebook, x2, bp, yp, seen);
    return;
  }
  const std::vector<float> table = make_table(codebook);
  const float* tp = table.data();
  switch (plan.kernel) {
    case SpqmmKernel::kInt8Gemm:
      int8_gemm(p, isa, plan, tp, x2, bp, yp, seen);
      return;
    case SpqmmKernel::kDecodeGemm: {
      // bf16 activations run oneDNN's bf16 GEMM where the CPU has bf16 dot products.
      const bool bf16 = xc.scalar_type() == at::kBFloat16 && native_bf16();
      const at::Tensor xg = bf16 ? xc.contiguous() : x2;
      const at::Tensor bias_bf16 = bf16 && bias_c.defined() ? bias_c.to(at::kBFloat16).contiguous() : at::Tensor();
      decode_gemm(p, isa, plan.threads, tp, xg, bias_f, bias_bf16, y, seen);
      return;
    }
#ifdef DCX_SPQMM_AVX512
    case SpqmmKernel::kSparseBatchBf16:
      sparse_batch_bf16(p, plan, tp, x2, bp, yp, seen);
      return;
    case SpqmmKernel::kSparseInt8:
      sparse_int8(p, plan, tp, codebook, x2, bp, yp, seen);
      return;
#endif
    case SpqmmKernel::kSparseBatch:
      if (spqmm_avx512(isa)) {
        sparse_batch<16>(p, isa, plan, tp, x2, bp, yp, seen);
      } else {
        sparse_batch<8>(p, isa, plan, tp, x2, bp, yp, seen);
      }
      return;
    case SpqmmKernel::kSparseSteps:
      switch (plan.block) {
        case 1: sparse_steps<1>(p, isa, plan.threads, tp, x2, bp, yp, seen); return;
        case 2: sparse_steps<2>(p, isa, plan.threads, tp, x2, bp, yp, seen); return;
        case 4: sparse_steps<4>(p, isa, plan.threads, tp, x2, bp, yp, seen); return;
        default: sparse_steps<8>(p, isa, plan.threads, tp, x2, bp, yp, seen); return;
      }
    case SpqmmKernel::kDenseMany:
      dense_many(p, plan, tp, x2, bp, yp, seen);
      return;
    default:
      switch (plan.block) {
        case 1: dense_rows<1>(p, isa, plan, tp, x2, bp, yp, seen); return;
        case 2: dense_rows<2>(p, isa, plan, tp, x2, bp, yp, seen); return;
        case 4: dense_rows<4>(p, isa, plan, tp, x2, bp, yp, seen); return;
        default: dense_rows<8>(p, isa, plan, tp, x2, bp, yp, seen); return;
      }
  }
}

// Sparse mode's slot density (padding included: the kernels pay for every slot).
double slot_density(const SpqmmPacked& p) {
  return p.dense ? 1.0 : double(p.steps * kSpqmmRows) / std::max(1.0, double(p.n) * double(p.k));
}

// The plan for a call, and the kernels it may use on this machine (a plan kernel the build or
// the CPU lacks falls back to the portable one of the same family).
SpqmmPlan cpu_plan(const SpqmmPacked& p, SpqmmIsa isa, SpqmmCompute compute, at::ScalarType dtype,
                   int64_t rows, int threads, int64_t crossover) {
  const bool int8 = compute == SpqmmCompute::kInt8, bf16 = dtype == at::kBFloat16;
  const SpqmmMode mode = !p.dense ? (int8 ? SpqmmMode::kSparseInt8 : bf16 ? SpqmmMode::kSparseBf16 : SpqmmMode::kSparse)
                         : int8   ? SpqmmMode::kInt8
                         : bf16   ? SpqmmMode::kBf16
                                  : SpqmmMode::kDense;
  SpqmmPlan plan = spqmm_plan(isa, mode, p.bits, slot_density(p), p.n, p.k, rows, threads, crossover);
  // The fused kernel's tables are per row: a layer with scales per group of columns takes the
  // int8 GEMM, which computes the same rule, where the fused kernel would run many rows, and the
  // fp32 rows kernel where that runs (a few rows): the GEMM first decodes all of W (4096 x 4096,
  // groups of 128 columns, Zen 5, two threads, the fp32 kernels / the GEMM: 4 bits, 2 rows 905 /
  // 2,911 us, 8 rows 1,980 / 2,964, 12 rows (decode + GEMM) 5,929 / 3,760; 6 bits, 1 row 861 /
  // 3,224, 8 rows 2,203 / 4,549, 12 rows 6,972 / 5,080).
  // (The fused kernel only runs below a forced crossover: the fp32 rules are asked without it, so
  // that one past every dense kernel's bound does not make the rows kernel take many rows.)
  if (spqmm_fused_int8(plan.kernel) && p.group_scale != nullptr) {
    const SpqmmPlan fp32 = spqmm_plan(isa, SpqmmMode::kDense, p.bits, 1.0, p.n, p.k, rows, threads);
    if (fp32.kernel == SpqmmKernel::kDenseRows) {
      plan = fp32;
    } else {
      plan.kernel = SpqmmKernel::kInt8Gemm;
      spqmm_size_tiles(plan, mode, 1.0, p.n, p.k, rows, threads);
    }
  }
  // torch runs at::_int_mm through oneDNN only with VNNI and oneDNN enabled (a plain loop
  // otherwise), and the int32 sums bound K (the fused and sparse int8 kernels' too): without them
  // a layer takes the float32 rules of its mode.
  if ((plan.kernel == SpqmmKernel::kInt8Gemm &&
       (p.k > kQ8GemmMaxK || !at::globalContext().userEnabledMkldnn() || !at::cpu::is_avx512_vnni_supported())) ||
      ((spqmm_fused_int8(plan.kernel) || plan.kernel == SpqmmKernel::kSparseInt8) && p.k > kQ8GemmMaxK)) {
    plan = spqmm_plan(isa, p.dense ? SpqmmMode::kDense : SpqmmMode::kSparse, p.bits, slot_density(p), p.n,
                      p.k, rows, threads, crossover);
  }
  // The sparse bf16 kernel needs AVX512-BF16 (Ice Lake has the VNNI kind without it): the sparse
  // rules serve bf16 compute there, as they do where no bf16 rule is.
#ifdef DCX_SPQMM_AVX512
  const bool bf16_dots = avx512::supports_bf16();
#else
  const bool bf16_dots = false;
#endif
  if (plan.kernel == SpqmmKernel::kSparseBatchBf16 && !bf16_dots)
    plan = spqmm_plan(isa, SpqmmMode::kSparse, p.bits, slot_density(p), p.n, p.k, rows, threads, crossover);
  if (plan.kernel == SpqmmKernel::kDenseMany && isa == SpqmmIsa::kPortable) {
    plan.kernel = SpqmmKernel::kDenseRows;
    plan.block = spqmm_rows_block(rows);
  }
  return plan;
}

// Each float of y (contiguous) rounded to the nearest bf16 value, as y.to(bfloat16) rounds it.
void round_to_bf16(at::Tensor& y, int threads) {
  float* v = y.data_ptr<float>();
  const int64_t n = y.numel(), per_tile = int64_t(1) << 16;
  for_each_tile((n + per_tile - 1) / per_tile, threads, [&](int64_t, int64_t t) {
    for (int64_t i = t * per_tile; i < std::min(n, (t + 1) * per_tile); ++i) {
      const uint32_t bits = uint32_t(bf16_bits(v[i])) << 16;
      std::memcpy(v + i, &bits, 4);
    }
  });
}

at::Tensor spqmm_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& windows,
                     const at::Tensor& group_ptr, const at::Tensor& chunks,
                     const at::Tensor& codebook, int64_t out_features, int64_t in_features,
                     int64_t bits, const std::optional<at::Tensor>& bias, int64_t crossover,
                     bool check, c10::string_view compute,
                     const std::optional<at::Tensor>& scale, int64_t group_size) {
  check_spqmm_args(x, codes, windows, group_ptr, chunks, codebook, out_features, in_features, bits,
                   bias);
  const OpThreads threads;
  check_spqmm_scale(scale, group_size, x, out_features, in_features);
  const SpqmmCompute mode = parse_spqmm_compute(compute);
  // The ATen calls inside (casts, the BLAS) are the kernel's own arithmetic, not a graph to record.
  const at::NoGradGuard no_grad;
  const int64_t N = out_features, K = in_features;
  SpqmmPacked p = make_packed(codes, windows, group_ptr, chunks, N, K, bits);
  p.codebook_size = codebook.numel();
  const GroupScales gs(scale, group_size);
  attach(p, gs);
  const bool scaled = row_scaled(scale, group_size);
  if (!p.dense) {
    const char* bad = spqmm_check_structure(p);
    // The only check the kernels do not do for free: O(steps), skipped with check=False.
    if (bad == nullptr && check) bad = spqmm_check_scale_windows(p);
    TORCH_CHECK(bad == nullptr, bad, " (corrupted packed weight)");
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor y = at::empty({M, N}, at::kFloat);
  if (M > 0 && N > 0) {
    const at::ScalarType dtype = spqmm_compute_dtype(mode, x.scalar_type());
    const at::Tensor xc = x.reshape({M, K}).to(dtype);
    const at::Tensor bias_c = has_bias ? bias->to(dtype) : at::Tensor();
    if (K == 0) {
      y.copy_(has_bias ? bias_c.to(at::kFloat).expand({M, N}) : at::zeros({M, N}, at::kFloat));
    } else {
      const SpqmmIsa isa = cpu_isa();
      const SpqmmPlan plan = cpu_plan(p, isa, mode, dtype, M, threads.count(), crossover);
      SpqmmSeen seen;
      // Row scales: the kernels sum codebook values, the row scale and bias come after.
      run_plan(p, isa, plan, codebook, xc, scaled ? at::Tensor() : bias_c, y, &seen);
      check_seen(seen, codebook.numel(), K);
      if (scaled) apply_row_scale(y, *scale, bias_c);
    }
    // bfloat16 compute: the result as the bf16 product rounds it, whatever x's dtype (float32 x:
    // rounded in place, one pass instead of two conversions).
    if (dtype == at::kBFloat16 && x.scalar_type() == at::kFloat) {
      round_to_bf16(y, threads.count());
    } else if (dtype == at::kBFloat16 && x.scalar_type() != at::kBFloat16) {
      y = y.to(at::kBFloat16);
    }
  }
  return y.to(x.scalar_type()).reshape(out_shape);
}

// W [out_features, in_features] in the codebook's dtype, every element written (0 where pruned):
// the backward of spqmm (grad_x = grad_y W) and dcx's unpacking read it.
at::Tensor spqmm_decode_cpu(const at::Tensor& codes, const at::Tensor& windows,
                            const at::Tensor& group_ptr, const at::Tensor& chunks,
                            const at::Tensor& codebook, int64_t out_features, int64_t in_features,
                            int64_t bits, bool /*check: free on the CPU*/) {
  check_spqmm_decode_args(codes, windows, group_ptr, chunks, codebook, out_features, in_features,
                          bits);
  const OpThreads threads;
  const at::NoGradGuard no_grad;
  const SpqmmPacked p = make_packed(codes, windows, group_ptr, chunks, out_features, in_features, bits);
  if (!p.dense) {
    const char* bad = spqmm_check_structure(p);
    TORCH_CHECK(bad == nullptr, bad, " (corrupted packed weight)");
  }
  at::Tensor w = at::empty({out_features, in_features}, at::kFloat);
  if (w.numel() > 0) {
    const std::vector<float> table = make_table(codebook);
    SpqmmSeen seen;
    decode_whole(p, cpu_isa(), threads.count(), table.data(),
                 w.data_ptr<float>(), &seen);
    check_seen(seen, codebook.numel(), in_features);
  }
  return w.to(codebook.scalar_type());
}

// spqmm_int8: the int8 kernels for every batch size (the plan's int8 entries cross to float32
// kernels where those are faster; this op never does, for tests and benchmarks).
at::Tensor spqmm_int8_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                          int64_t out_features, int64_t in_features, int64_t bits,
                          const std::optional<at::Tensor>& bias, bool /*check: free on the CPU*/,
                          const std::optional<at::Tensor>& scale, int64_t group_size) {
  check_spqmm_int8_args(x, codes, codebook, out_features, in_features, bits, bias);
  const OpThreads threads;
  check_spqmm_scale(scale, group_size, x, out_features, in_features);
  const at::NoGradGuard no_grad;
  const int64_t N = out_features, K = in_features;
  const at::Tensor none;
  SpqmmPacked p = make_packed(codes, none, none, none, N, K, bits);
  const GroupScales gs(scale, group_size);
  attach(p, gs);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_f = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, at::kFloat);
  if (M > 0 && N > 0) {
    const at::Tensor x2 = x.reshape({M, K}).to(at::kFloat).contiguous();
    const SpqmmIsa isa = cpu_isa();
    SpqmmPlan plan = spqmm_plan(isa, SpqmmMode::kInt8, p.bits, 1.0, N, K, M, threads.count());
    if (plan.kernel != SpqmmKernel::kInt8Rows && plan.kernel != SpqmmKernel::kInt8Many) {
      plan.kernel = isa != SpqmmIsa::kPortable && M > 8 ? SpqmmKernel::kInt8Many : SpqmmKernel::kInt8Rows;
      plan.block = spqmm_rows_block(M);
      spqmm_size_tiles(plan, SpqmmMode::kInt8, 1.0, N, K, M, threads.count());
    }
    SpqmmSeen seen;
    const bool scaled = row_scaled(scale, group_size);
    int8_product(p, isa, plan, codebook, x2, has_bias && !scaled ? bias_f.data_ptr<float>() : nullptr,
                 y.data_ptr<float>(), &seen);
    check_seen(seen, codebook.numel(), K);
    if (scaled) apply_row_scale(y, *scale, bias_f);
  }
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace
}  // namespace dcx

TORCH_LIBRARY_IMPL(dcx, CPU, m) {
  m.impl("spqmm", &dcx::spqmm_cpu);
  m.impl("spqmm_int8", &dcx::spqmm_int8_cpu);
  m.impl("spqmm_decode", &dcx::spqmm_decode_cpu);
}

