// spqmm on CPU: y = x W^T + bias, W packed as codebook ids (see csrc/core/spqmm.h for the layout,
// the safety argument and the inner loops).
//
// x [..., K] is staged once per call as float for blocks of MB batch columns: [MB][K + 32 zeros]
// in sparse mode (a step reads a 32-column window of each); in dense mode [MB][K] for the
// AVX-512 and AVX2 kernels (each decoded weight vector multiplies MB rows of x; with AVX2 and
// more than 8 rows all of them at once, each row of W decoded once, dense_many) and transposed to
// [K][MB] for the portable one. Work items are the packed chunks (about equal numbers of steps)
// for sparse mode and row ranges for dense mode, run with at::parallel_for. Past the crossover
// batch the weight is decoded once, in cache-sized blocks of rows each multiplied with at::mm
// (MKL / oneDNN), so dcx is not slower than dense at large batch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "core/spqmm.h"
#include "op_args.h"

namespace dcx {
namespace {

constexpr int kMaxBlock = 8;  // batch columns per pass

// Batch size from which decode + BLAS beats the kernel on CPU. Sparse mode (density: that of the
// slots, padding included): the kernel costs about steps * M vector steps and at 10% density
// beats the dense GEMM even at batch 64 (2.5x, Zen 4 with AVX-512). Dense mode: the AVX2
// kernel decodes each weight once for all batch rows; on an AMD EPYC (Zen 3) without AVX-512, at
// 4 and 6 bits, it ties with the blocked decode + GEMM at about batch 24-32 on 1536 x 384 and
// 384 x 1536 and wins up to about 44 on 4096 x 4096; the AVX-512 kernel is taken to cross at the
// same batch (not measured yet); the portable kernel loses from batch 2.
int64_t auto_crossover_cpu(bool dense_mode, double density, bool vector_kernels) {
  if (dense_mode) return vector_kernels ? 32 : 2;
  return density <= 0.3 ? std::numeric_limits<int64_t>::max() : 64;
}

// The widest kernels this CPU runs: AVX-512 (every mode and batch), AVX2 (dense mode at every
// batch, sparse mode at batch 1) or the portable ones. DCX_CPU_ISA=avx2 or generic asks for narrower ones (tests cover each).
enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa cpu_isa() {
  Isa best = Isa::kGeneric;
#ifdef DCX_SPQMM_AVX512
  best = avx512::supported() ? Isa::kAvx512 : avx2::supported() ? Isa::kAvx2 : Isa::kGeneric;
#endif
  const char* env = std::getenv("DCX_CPU_ISA");
  const std::string want = env ? env : "";
  if (want == "generic") return Isa::kGeneric;
  if (want == "avx2" && best == Isa::kAvx512) return Isa::kAvx2;
  return best;
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

void check_seen(const SpqmmSeen& seen, int64_t k_codebook, int64_t in_features) {
  TORCH_CHECK(seen.max_id < static_cast<uint64_t>(k_codebook),
              "codes hold a codebook id outside the codebook: id ", seen.max_id,
              " >= codebook size ", k_codebook, " (corrupted packed weight)");
  TORCH_CHECK(seen.max_col < in_features, "windows or codes hold a column outside in_features: ",
              "column ", seen.max_col, " >= ", in_features, " (corrupted packed weight)");
}

// The codebook as a zero-padded float table of kSpqmmTable entries.
std::vector<float> make_table(const at::Tensor& codebook) {
  std::vector<float> table(kSpqmmTable, 0.f);
  const at::Tensor cb = codebook.to(at::kFloat).contiguous();
  std::copy(cb.data_ptr<float>(), cb.data_ptr<float>() + cb.numel(), table.begin());
  return table;
}

// Rows [r0, r0 + rows) of W decoded into w ([rows, K] floats) by the widest kernel there is.
void decode_rows(const SpqmmPacked& p, Isa isa, const float* table, int64_t r0, int64_t rows,
                 float* w, SpqmmSeen* seen) {
#ifdef DCX_SPQMM_AVX512
  if (isa == Isa::kAvx512) {
    avx512::with_dense_kind(p, [&](auto lut, auto layout) DCX_AVX512_FN {
      avx512::dense_decode_rows<decltype(lut)::value, decltype(layout)::value>(
          p, r0, r0 + rows, table, w, seen);
    });
    return;
  }
  if (isa == Isa::kAvx2) {
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

// All of W decoded into w ([N, K] floats), whole groups of 16 rows per work item (sparse mode
// decodes a group at a time): past the crossover for one GEMM, and the spqmm_decode op.
void decode_whole(const SpqmmPacked& p, Isa isa, const float* table, float* w, SpqmmSeen* seen) {
  const int64_t groups = (p.n + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, groups / at::get_num_threads());
  std::vector<SpqmmSeen> seen_by(groups);  // by each work item's first group
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const int64_t r0 = g0 * 16, r1 = std::min(p.n, g1 * 16);
    decode_rows(p, isa, table, r0, r1 - r0, w + r0 * p.k, &seen_by[g0]);
  });
  for (const auto& s : seen_by) seen->merge(s);
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
void decode_gemm(const SpqmmPacked& p, const float* table, const at::Tensor& xg,
                 const at::Tensor& bias_f, const at::Tensor& bias_bf16, at::Tensor& y,
                 SpqmmSeen* seen) {
  const int64_t N = p.n, K = p.k;
  const Isa isa = p.dense ? cpu_isa() : Isa::kGeneric;
  const int64_t threads = at::get_num_threads();
  if (N * K <= kWholeWeights && xg.size(0) >= kWholeRows) {
    // Kept from call to call: a fresh allocation of this size is mapped anew and page-faulted in
    // on every call.
    static thread_local std::vector<float> whole;
    if (whole.size() < size_t(N * K)) whole.resize(size_t(N * K));
    float* wp = whole.data();
    decode_whole(p, isa, table, wp, seen);
    gemm_block(xg, at::from_blob(wp, {N, K}, at::kFloat), bias_f, bias_bf16, 0, y);
    return;
  }
  // Blocks of about 8 MB decoded, at least 64 rows so each GEMM is not too thin (but no more
  // than a thread's share, so a small layer keeps every thread busy), and whole groups of 16
  // rows. The number of blocks is a multiple of the threads, so they share the rows evenly.
  const int64_t most = std::max<int64_t>(64, std::min<int64_t>(512, (int64_t(1) << 21) / std::max<int64_t>(K, 1)));
  const int64_t rounds = std::max<int64_t>(1, (N + threads * most - 1) / (threads * most));
  const int64_t rows = std::max<int64_t>(16, (N + threads * rounds - 1) / (threads * rounds) + 15) / 16 * 16;
  const int64_t blocks = (N + rows - 1) / rows;
  std::vector<SpqmmSeen> seen_by(blocks);
  // Grad and inference mode are thread-local: the pool's threads take the caller's, so the BLAS's
  // out= form neither records inputs that require grad nor refuses to write an inference tensor.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const at::ThreadLocalStateGuard state(caller_state);
    // Each thread's decode buffer is kept from call to call (at most 512 x K floats): a fresh
    // allocation of this size is mapped anew and page-faulted in on every call.
    static thread_local std::vector<float> buffer;
    if (buffer.size() < size_t(rows * K)) buffer.resize(size_t(rows * K));
    float* wp = buffer.data();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * rows, rb = std::min(rows, N - r0);
      decode_rows(p, isa, table, r0, rb, wp, &seen_by[b]);
      gemm_block(xg, at::from_blob(wp, {rb, K}, at::kFloat), bias_f, bias_bf16, r0, y);
    }
  });
  for (const auto& s : seen_by) seen->merge(s);
}

template <int MB>
void run_sparse_block(const SpqmmPacked& p, const float* table, const float* xs, int64_t ldx,
                      float* y, int mvalid, std::vector<SpqmmSeen>& seen_by,
                      std::vector<float>& edge_sums, std::vector<SpqmmEdge>& edges) {
  const Isa isa = cpu_isa();
  const bool vec = isa == Isa::kAvx512, avx2_batch1 = MB == 1 && isa == Isa::kAvx2;
  constexpr int64_t kEdge = 2 * MB * kSpqmmRows;
  at::parallel_for(0, p.num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* es = edge_sums.data() + c * kEdge;
#ifdef DCX_SPQMM_AVX512
      if (vec) {
        using avx512::Lut;
        switch (avx512::lut_kind(p.bits)) {
          case Lut::k16: avx512::sparse_chunk<Lut::k16, MB>(p, c, table, xs, ldx, y, p.n, mvalid, es, &edges[c], &seen_by[c]); break;
          case Lut::k32: avx512::sparse_chunk<Lut::k32, MB>(p, c, table, xs, ldx, y, p.n, mvalid, es, &edges[c], &seen_by[c]); break;
          case Lut::k64: avx512::sparse_chunk<Lut::k64, MB>(p, c, table, xs, ldx, y, p.n, mvalid, es, &edges[c], &seen_by[c]); break;
          case Lut::k128: avx512::sparse_chunk<Lut::k128, MB>(p, c, table, xs, ldx, y, p.n, mvalid, es, &edges[c], &seen_by[c]); break;
          case Lut::k256: avx512::sparse_chunk<Lut::k256, MB>(p, c, table, xs, ldx, y, p.n, mvalid, es, &edges[c], &seen_by[c]); break;
        }
        continue;
      }
#endif
#ifdef DCX_SPQMM_AVX512
      if (avx2_batch1) {
        if (p.bits <= 5) {
          avx2::sparse_chunk<true>(p, c, table, xs, y, es, &edges[c], &seen_by[c]);
        } else {
          avx2::sparse_chunk<false>(p, c, table, xs, y, es, &edges[c], &seen_by[c]);
        }
        continue;
      }
#endif
      spqmm_sparse_chunk<MB>(p, c, table, xs, ldx, y, p.n, mvalid, es, &edges[c], &seen_by[c]);
    }
  });
  // Groups shared between chunks: every chunk's partial sums, added in chunk order.
  for (int64_t c = 0; c < p.num_chunks; ++c) {
    for (int side = 0; side < 2; ++side) {
      const int64_t g = edges[c].group[side];
      if (g < 0) continue;
      const int lanes = static_cast<int>(std::min<int64_t>(kSpqmmRows, p.n - g * kSpqmmRows));
      const float* sums = edge_sums.data() + c * kEdge + side * MB * kSpqmmRows;
      for (int m = 0; m < mvalid; ++m)
        for (int i = 0; i < lanes; ++i) y[m * p.n + g * kSpqmmRows + i] += sums[m * kSpqmmRows + i];
    }
    edges[c] = SpqmmEdge();
  }
}

// Dense mode for MB batch rows: x is [MB][K] for the AVX-512 and AVX2 kernels, [K][MB] for the
// portable one (zero past the valid rows either way). Rows are split in pieces of about 32K
// weights, so a small layer still keeps every thread busy.
template <int MB>
void run_dense_block(const SpqmmPacked& p, const float* table, const float* x, const float* bias,
                     float* y, int mvalid, std::vector<SpqmmSeen>& seen_by) {
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(p.k, 1));
  const Isa isa = cpu_isa();
  at::parallel_for(0, p.n, grain, [&](int64_t r0, int64_t r1) {
    SpqmmSeen& seen = seen_by[at::get_thread_num()];
#ifdef DCX_SPQMM_AVX512
    if (isa == Isa::kAvx512) {
      avx512::with_dense_kind(p, [&](auto lut, auto layout) DCX_AVX512_FN {
        avx512::dense_rows<decltype(lut)::value, decltype(layout)::value, MB>(
            p, r0, r1, table, x, p.k, mvalid, bias, y, p.n, &seen);
      });
      return;
    }
    if (isa == Isa::kAvx2) {
      avx2::with_dense_kind(p, [&](auto nt, auto layout) DCX_AVX2_FN {
        avx2::dense_rows<decltype(nt)::value, decltype(layout)::value, MB>(
            p, r0, r1, table, x, p.k, mvalid, bias, y, p.n, &seen);
      });
      return;
    }
#endif
    spqmm_dense_rows<MB>(p, r0, r1, table, x, bias, y, p.n, mvalid, &seen);
  });
}

// Dense mode with AVX2 for more than kMaxBlock batch rows (below the crossover): x staged once
// as [M rounded up to 4][K] and each thread's rows decoded once for all of them
// (avx2::dense_rows_many), in pairs of rows of about 32K weights per work item.
void dense_many(const SpqmmPacked& p, const float* table, const at::Tensor& x2, const float* bias,
                at::Tensor& y, SpqmmSeen* seen) {
#ifdef DCX_SPQMM_AVX512
  const int64_t M = x2.size(0), K = p.k;
  at::Tensor xs = at::zeros({(M + 3) / 4 * 4, K}, at::kFloat);
  xs.narrow(0, 0, M).copy_(x2);
  const float* xp = xs.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(K, 1)) * 2;
  std::vector<SpqmmSeen> seen_by(at::get_num_threads());
  at::parallel_for(0, p.n, grain, [&](int64_t r0, int64_t r1) {
    static thread_local std::vector<float> w;  // two decoded rows
    if (w.size() < size_t(2 * K)) w.resize(size_t(2 * K));
    SpqmmSeen* s = &seen_by[at::get_thread_num()];
    avx2::with_dense_kind(p, [&](auto nq, auto layout) DCX_AVX2_FN {
      avx2::dense_rows_many<decltype(nq)::value, decltype(layout)::value>(
          p, r0, r1, table, xp, K, M, bias, yp, p.n, w.data(), s);
    });
  });
  for (const auto& s : seen_by) seen->merge(s);
#else
  (void)p, (void)table, (void)x2, (void)bias, (void)y, (void)seen;
  TORCH_CHECK(false, "dense_many needs the AVX2 kernels");
#endif
}

// y[m0 : m0 + MB] for one block of batch columns: stage x, run the kernel.
template <int MB>
void run_block(const SpqmmPacked& p, const float* table, const at::Tensor& x2, int64_t m0,
               const float* bias, float* y, std::vector<SpqmmSeen>& seen_by,
               std::vector<float>& edge_sums, std::vector<SpqmmEdge>& edges) {
  const int64_t M = x2.size(0);
  const int mvalid = static_cast<int>(std::min<int64_t>(MB, M - m0));
  float* yb = y + m0 * p.n;
  const at::Tensor xm = x2.narrow(0, m0, mvalid);
  if (p.dense) {
    // [MB][K] rows (AVX-512, AVX2) or [K][MB] columns (portable), zero beyond the valid rows.
    const bool rows = cpu_isa() != Isa::kGeneric;
    at::Tensor xb = rows ? at::zeros({MB, p.k}, at::kFloat) : at::zeros({p.k, MB}, at::kFloat);
    (rows ? xb.narrow(0, 0, mvalid) : xb.narrow(1, 0, mvalid)).copy_(rows ? xm : xm.t());
    run_dense_block<MB>(p, table, xb.data_ptr<float>(), bias, yb, mvalid, seen_by);
    return;
  }
  // [MB][ldx], zero beyond K (windows clamped to K read zeros) and beyond the last batch column.
  const int64_t ldx = spqmm_x_stride(p.k);
  at::Tensor xs = at::zeros({MB, ldx}, at::kFloat);
  xs.narrow(0, 0, mvalid).narrow(1, 0, p.k).copy_(xm);
  // y starts as the bias; the kernels add their sums.
  for (int m = 0; m < mvalid; ++m) {
    float* row = yb + m * p.n;
    if (bias) std::copy(bias, bias + p.n, row); else std::fill(row, row + p.n, 0.f);
  }
  edge_sums.assign(p.num_chunks * 2 * MB * kSpqmmRows, 0.f);
  run_sparse_block<MB>(p, table, xs.data_ptr<float>(), ldx, yb, mvalid, seen_by, edge_sums, edges);
}

at::Tensor spqmm_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& windows,
                     const at::Tensor& group_ptr, const at::Tensor& chunks,
                     const at::Tensor& codebook, int64_t out_features,
                     int64_t in_features, int64_t bits, const std::optional<at::Tensor>& bias,
                     int64_t crossover, bool /*check: the CPU checks cost nothing extra*/) {
  check_spqmm_args(x, codes, windows, group_ptr, chunks, codebook, out_features, in_features, bits,
                   bias);
  // The ATen calls inside (casts, the BLAS) are the kernel's own arithmetic, not a graph to record.
  const at::NoGradGuard no_grad;
  const int64_t N = out_features, K = in_features;
  const SpqmmPacked p = make_packed(codes, windows, group_ptr, chunks, N, K, bits);
  const bool dense_mode = p.dense;
  if (!dense_mode) {
    const char* bad = spqmm_check_structure(p);
    TORCH_CHECK(bad == nullptr, bad, " (corrupted packed weight)");
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor x2 = x.reshape({M, K}).to(at::kFloat);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_f = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = has_bias ? bias_f.data_ptr<float>() : nullptr;
  const std::vector<float> table = make_table(codebook);
  SpqmmSeen seen;

  // Slots per weight: the non-zero density plus the padding (about 1.4x at 10%).
  const double density = dense_mode ? 1.0
                                    : double(p.steps * kSpqmmRows) /
                                          std::max<double>(1.0, double(N) * double(K));
  const int64_t cross = crossover >= 0 ? crossover
                                        : auto_crossover_cpu(dense_mode, density, cpu_isa() != Isa::kGeneric);
  at::Tensor y = at::empty({M, N}, at::kFloat);
  if (M > 0 && N > 0) {
    if (K == 0) {
      y.copy_(has_bias ? bias_f.expand({M, N}) : at::zeros({M, N}, at::kFloat));
    } else if (M >= std::max<int64_t>(cross, 1)) {
      const bool bf16 = x.scalar_type() == at::kBFloat16 && native_bf16();
      const at::Tensor xg = bf16 ? x.reshape({M, K}).contiguous() : x2.contiguous();
      decode_gemm(p, table.data(), xg, bias_f, bf16 && has_bias ? bias->contiguous() : at::Tensor(),
                  y, &seen);
      check_seen(seen, codebook.numel(), K);
    } else if (dense_mode && M > kMaxBlock && cpu_isa() == Isa::kAvx2) {
      dense_many(p, table.data(), x2, bp, y, &seen);
      check_seen(seen, codebook.numel(), K);
    } else {
      const int64_t items = dense_mode ? at::get_num_threads() : p.num_chunks;
      std::vector<SpqmmSeen> seen_by(items);
      std::vector<float> edge_sums;
      std::vector<SpqmmEdge> edges(dense_mode ? 0 : p.num_chunks);
      float* yp = y.data_ptr<float>();
      const int64_t mb = M == 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : kMaxBlock;
      for (int64_t m0 = 0; m0 < M; m0 += mb) {
        switch (mb) {
          case 1: run_block<1>(p, table.data(), x2, m0, bp, yp, seen_by, edge_sums, edges); break;
          case 2: run_block<2>(p, table.data(), x2, m0, bp, yp, seen_by, edge_sums, edges); break;
          case 4: run_block<4>(p, table.data(), x2, m0, bp, yp, seen_by, edge_sums, edges); break;
          default: run_block<kMaxBlock>(p, table.data(), x2, m0, bp, yp, seen_by, edge_sums, edges);
        }
      }
      for (const auto& s : seen_by) seen.merge(s);
      check_seen(seen, codebook.numel(), K);
    }
  }
  return y.to(x.scalar_type()).reshape(out_shape);
}

// W [out_features, in_features] in the codebook's dtype, every element written (0 where pruned):
// the backward of spqmm (grad_x = grad_y W) and dcx's unpacking read it.
at::Tensor spqmm_decode_cpu(const at::Tensor& codes, const at::Tensor& windows,
                            const at::Tensor& group_ptr, const at::Tensor& chunks,
                            const at::Tensor& codebook, int64_t out_features, int64_t in_features,
                            int64_t bits) {
  check_spqmm_decode_args(codes, windows, group_ptr, chunks, codebook, out_features, in_features,
                          bits);
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
    decode_whole(p, p.dense ? cpu_isa() : Isa::kGeneric, table.data(), w.data_ptr<float>(), &seen);
    check_seen(seen, codebook.numel(), in_features);
  }
  return w.to(codebook.scalar_type());
}

// int8 compute (csrc/core/spqmm_int8.h) for a dense-mode layer. x is quantized once per call
// into [M rounded up to the block][blocks * 32] int8 values (held as int16 for pmaddwd, each block
// in q8_slot order) and [..][blocks] scales, zero past the valid rows and columns; each thread
// takes a range of W's rows and runs every block of MB activation rows over it, so its share of W
// is read from memory once and then from its own cache.
template <int MB>
void q8_rows(const SpqmmPacked& p, int64_t r0, int64_t r1, const int16_t* table, float wscale,
             const int16_t* xq, int64_t ldq, const float* xs, int64_t M, const float* bias,
             float* y, Isa isa, SpqmmSeen* seen) {
  const int64_t blocks = q8_blocks(p.k);
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int mvalid = static_cast<int>(std::min<int64_t>(MB, M - m0));
    const int16_t* xb = xq + m0 * ldq;
    const float* sb = xs + m0 * blocks;
    float* yb = y + m0 * p.n;
#ifdef DCX_SPQMM_AVX512
    if (isa != Isa::kGeneric) {
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

at::Tensor spqmm_int8_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                          int64_t out_features, int64_t in_features, int64_t bits,
                          const std::optional<at::Tensor>& bias, bool /*check: free on the CPU*/) {
  check_spqmm_int8_args(x, codes, codebook, out_features, in_features, bits, bias);
  const at::NoGradGuard no_grad;
  const int64_t N = out_features, K = in_features;
  const at::Tensor none;
  const SpqmmPacked p = make_packed(codes, none, none, none, N, K, bits);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor bias_f = has_bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, at::kFloat);
  if (M > 0 && N > 0) {
    const at::Tensor x2 = x.reshape({M, K}).to(at::kFloat).contiguous();
    const at::Tensor cb = codebook.to(at::kFloat).contiguous();
    int16_t table[256];
    const float wscale = q8_codebook(cb.data_ptr<float>(), cb.numel(), table);
    const int64_t mb = M == 1 ? 1 : M <= 2 ? 2 : M <= 4 ? 4 : kMaxBlock;
    const int64_t blocks = q8_blocks(K), ldq = blocks * kQ8Block, rows = (M + mb - 1) / mb * mb;
    at::Tensor xq = at::zeros({rows, ldq}, at::kShort);
    at::Tensor xs = at::zeros({rows, std::max<int64_t>(blocks, 1)}, at::kFloat);
    const float* xp = x2.data_ptr<float>();
    int16_t* qp = xq.data_ptr<int16_t>();
    float* sp = xs.data_ptr<float>();
    at::parallel_for(0, M, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(K, 1)),
                     [&](int64_t m0, int64_t m1) {
                       for (int64_t m = m0; m < m1; ++m)
                         q8_quantize_row(xp + m * K, K, qp + m * ldq, sp + m * blocks);
                     });
    // Rows in pieces of about 32K weights (at least a row), so a small layer keeps every thread busy.
    const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(K, 1));
    const Isa isa = cpu_isa();
    std::vector<SpqmmSeen> seen_by(at::get_num_threads());
    const float* bp = has_bias ? bias_f.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
      SpqmmSeen* seen = &seen_by[at::get_thread_num()];
      switch (mb) {
        case 1: q8_rows<1>(p, r0, r1, table, wscale, qp, ldq, sp, M, bp, yp, isa, seen); break;
        case 2: q8_rows<2>(p, r0, r1, table, wscale, qp, ldq, sp, M, bp, yp, isa, seen); break;
        case 4: q8_rows<4>(p, r0, r1, table, wscale, qp, ldq, sp, M, bp, yp, isa, seen); break;
        default: q8_rows<kMaxBlock>(p, r0, r1, table, wscale, qp, ldq, sp, M, bp, yp, isa, seen);
      }
    });
    SpqmmSeen seen;
    for (const auto& s : seen_by) seen.merge(s);
    check_seen(seen, codebook.numel(), K);
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
