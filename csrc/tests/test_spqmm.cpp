// Native tests of the spqmm core: pack a small layer here (the greedy steps of dcx.packing.pack,
// written out sequentially), run the portable and (where the CPU has them) AVX-512 and AVX2
// kernels chunk by chunk, add the shared groups' partial sums as the op does, and compare with a
// plain dot product; check the pointer validation and the seen-maximum report. Dense mode: every
// layout packed here too, each kernel (1 to 8 batch rows, more with AVX2), the decode and the
// int8 kernels against plain dot products, with garbage in the padding (never read). Built once
// more with DCX_AVX512_EMULATE, the AVX-512 kernels run on emulated intrinsics on any CPU.
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "core/spqmm_amx.h"
#include "core/spqmm_avx2.h"
#include "core/spqmm_avx512.h"
#include "core/spqmm_portable.h"
#include "tests/check.h"
#include "tests/spqmm_test_layers.h"

namespace {

constexpr int R = dcx::kSpqmmRows;

struct Layer {
  dcx_test::SparseLayer s;   // the packed arrays
  std::vector<float> dense;  // decoded weight [n, k] (times the group scales)
  std::vector<float> scale;  // group scales [n][groups] (exactly: ASan sees a read past them)
  dcx::SpqmmPacked p;        // points into s and scale
};

// Group scales of an [n, k] layer in groups of `group` columns: a few exact float values.
std::vector<float> make_scales(int64_t n, int64_t k, int64_t group) {
  const int64_t groups = (k + group - 1) / group;
  std::vector<float> scale(n * groups);
  for (int64_t i = 0; i < n * groups; ++i) scale[i] = 0.25f * float(1 + (i * 7) % 11);
  return scale;
}

void set_scales(dcx::SpqmmPacked& p, const std::vector<float>& scale, int64_t group) {
  p.set_group_scales(scale.data(), group);
}

// pack_sparse's layer (spqmm_test_layers.h) with ids of `bits` bits and its weights from table;
// group > 0: with group scales of that many columns (and windows kept inside the groups).
Layer make_layer(int64_t n, int64_t k, int bits, int keep, int64_t chunk_steps,
                 const std::vector<float>& table, int64_t group = 0) {
  Layer l;
  l.s = dcx_test::pack_sparse(n, k, 1 << bits, keep, chunk_steps, group);
  l.dense.assign(n * k, 0.f);
  if (group > 0) l.scale = make_scales(n, k, group);
  for (int64_t i = 0; i < n * k; ++i)
    if (l.s.ids[i] >= 0)
      l.dense[i] = table[l.s.ids[i]] *
                   (group > 0 ? l.scale[(i / k) * ((k + group - 1) / group) + (i % k) / group] : 1.f);
  l.p.codes = l.s.codes.data();
  l.p.windows = l.s.windows.data();
  l.p.group_ptr = l.s.group_ptr.data();
  l.p.chunks = l.s.chunks.data();
  l.p.num_chunks = l.s.num_chunks;
  l.p.steps = l.s.steps;
  l.p.groups = l.s.groups;
  l.p.n = n;
  l.p.k = k;
  l.p.bits = bits;
  if (group > 0) set_scales(l.p, l.scale, group);
  return l;
}

// y starts as the bias; chunk(c, y, sums, edge) adds the groups it holds whole, then the edges.
template <typename ChunkFn>
std::vector<float> run(const Layer& l, const std::vector<float>& bias, ChunkFn chunk) {
  std::vector<float> y(bias), sums(l.p.num_chunks * 2 * R, 0.f);
  std::vector<dcx::SpqmmEdge> edges(l.p.num_chunks);
  for (int64_t c = 0; c < l.p.num_chunks; ++c) chunk(c, y.data(), sums.data() + 2 * R * c, &edges[c]);
  for (int64_t c = 0; c < l.p.num_chunks; ++c)
    for (int s = 0; s < 2; ++s)
      if (edges[c].group[s] >= 0)
        for (int i = 0; i < R && edges[c].group[s] * R + i < l.p.n; ++i)
          y[edges[c].group[s] * R + i] += sums[2 * R * c + s * R + i];
  return y;
}

void check_close(const std::vector<float>& y, const Layer& l, const std::vector<float>& x,
                 const std::vector<float>& bias) {
  for (int64_t r = 0; r < l.p.n; ++r) {
    double ref = bias[r], mag = std::fabs(bias[r]);
    for (int64_t j = 0; j < l.p.k; ++j) {
      ref += double(l.dense[r * l.p.k + j]) * x[j];
      mag += std::fabs(double(l.dense[r * l.p.k + j]) * x[j]);
    }
    CHECK(std::fabs(y[r] - ref) <= (l.p.k + 3) * 6e-8 * mag + 1e-30);  // + a scale's product
  }
}

// The batch kernels (the batch rows in the vector lanes) on three rows of x, the first the
// given one: xt [K + 32][8], zero past K and past the three rows; each row of y checked against
// the float64 product, and what the kernel saw against the step kernel's.
void test_batch_kernels(const Layer& l, const std::vector<float>& table, const std::vector<float>& x,
                        const std::vector<float>& bias, const dcx::SpqmmSeen& seen) {
  constexpr int MT = 8, rows = 3;
  const int64_t n = l.p.n, k = l.p.k;
  std::vector<std::vector<float>> xs(rows, std::vector<float>(x.begin(), x.end()));
  for (int m = 1; m < rows; ++m)
    for (int64_t j = 0; j < k; ++j) xs[m][j] = std::cos(0.11f * float(j * (m + 1)));
  std::vector<float> xt((k + dcx::kSpqmmWindow) * MT, 0.f);
  for (int m = 0; m < rows; ++m)
    for (int64_t j = 0; j < k; ++j) xt[j * MT + m] = xs[m][j];
  auto check_rows = [&](const std::vector<float>& y) {
    for (int m = 0; m < rows; ++m)
      check_close(std::vector<float>(y.begin() + m * n, y.begin() + (m + 1) * n), l, xs[m], bias);
  };
  std::vector<float> y(rows * n, -1.f);
  dcx::SpqmmSeen bseen;
  dcx::spqmm_sparse_batch<MT>(l.p, 0, l.p.groups, table.data(), xt.data(), rows, bias.data(),
                              y.data(), n, &bseen);
  check_rows(y);
  if (l.p.steps) CHECK(bseen.max_id == seen.max_id && bseen.max_col == seen.max_col);
#ifdef DCX_SPQMM_AVX512
  if (dcx::avx512::supported()) {  // 16 rows per tile
    std::vector<float> xt16((k + dcx::kSpqmmWindow) * 16, 0.f);
    for (int m = 0; m < rows; ++m)
      for (int64_t j = 0; j < k; ++j) xt16[j * 16 + m] = xs[m][j];
    std::fill(y.begin(), y.end(), -1.f);
    dcx::SpqmmSeen vseen;
    dcx::avx512::with_lut_kind(l.p, [&](auto lut) DCX_AVX512_FN {
      dcx::avx512::sparse_batch<decltype(lut)::value>(l.p, 0, l.p.groups, table.data(), xt16.data(),
                                                      rows, bias.data(), y.data(), n, &vseen);
    });
    check_rows(y);
    if (l.p.steps) CHECK(vseen.max_id == seen.max_id && vseen.max_col == seen.max_col);
  }
#endif
#ifdef DCX_SPQMM_AVX2
  if (dcx::avx2::supported()) {
    std::fill(y.begin(), y.end(), -1.f);
    dcx::SpqmmSeen aseen;
    // Two work items, as the op splits the groups between threads.
    const int64_t half = l.p.groups / 2;
    for (auto [g0, g1] : {std::pair<int64_t, int64_t>{0, half}, {half, l.p.groups}}) {
      if (l.p.bits <= 5) {
        dcx::avx2::sparse_batch<true>(l.p, g0, g1, table.data(), xt.data(), rows, bias.data(), y.data(), n, &aseen);
      } else {
        dcx::avx2::sparse_batch<false>(l.p, g0, g1, table.data(), xt.data(), rows, bias.data(), y.data(), n, &aseen);
      }
    }
    check_rows(y);
    if (l.p.steps) CHECK(aseen.max_id == seen.max_id && aseen.max_col == seen.max_col);
  }
#endif
}

// bf16 compute with AMX (core/spqmm_amx.h), on the hardware where it has AMX and on the emulated
// tiles: one and two activation groups (the C tiles kept in registers), three (stored between
// chunks, an odd last group), against the product in double of the bf16-rounded weights (each
// codebook value times its group scale, rounded once) and activations. run(xv, M, y, seen) runs
// a kernel over activations staged by bf16_stage_pairs (interleaved or not) in two calls, rows of
// W [0, 32) and the rest, as two threads take them. weight(r, j): W as the kernels decode it.
template <typename Weight, typename Run>
void check_amx(int64_t n, int64_t k, const std::vector<float>& bias, bool interleaved, Weight&& weight,
               Run&& run) {
  auto bf16 = [](float v) {
    const uint32_t bits = uint32_t(dcx::bf16_bits(v)) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  };
  const int64_t blocks = (k + 31) / 32;
  for (int64_t M : {1, 20, 40}) {
    std::vector<float> x(M * k);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < k; ++j) x[m * k + j] = std::cos(0.11f * float(j + 7 * m)) * 1.001f;
    const int64_t groups = (M + 15) / 16;
    std::vector<uint32_t> xv(groups * blocks * 256, 0xFFFFFFFFu);
    for (int64_t g = 0; g < groups; ++g) dcx::bf16_stage_pairs(x.data(), M, k, g, interleaved, xv.data() + g * blocks * 256);
    std::vector<float> y(M * n, -1.f);
    run(xv.data(), M, y.data());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < n; ++r) {
        double ref = bias[r], mag = std::fabs(bias[r]);
        for (int64_t j = 0; j < k; ++j) {
          const double p = double(bf16(weight(r, j))) * bf16(x[m * k + j]);
          ref += p;
          mag += std::fabs(p);
        }
        CHECK(std::fabs(y[m * n + r] - ref) <= (k + 3) * 6e-8 * mag + 1e-30);
      }
  }
}

// The kernel over rows [0, 32) of W and the rest, with a fresh (poisoned) buffer for each.
template <typename Kernel>
void amx_passes(int64_t n, int64_t M, Kernel&& kernel) {
#ifdef DCX_SPQMM_AVX512
  const int64_t split = std::min<int64_t>(n, dcx::avx512::kAmxRows);
  for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, split}, {split, n}}) {
    std::vector<int32_t> w(dcx::avx512::kAmxBufferWords, -1);
    std::vector<float> sums(dcx::avx512::amx_sums_floats(M), -1.f);
    if (r0 < r1) kernel(r0, r1, w.data(), sums.data());
  }
#else
  (void)n, (void)M, (void)kernel;
#endif
}

// The sparse AMX kernel: its chunks of 128 columns, windows that reach past them, group scales.
void test_sparse_amx(const Layer& l, const std::vector<float>& table, const std::vector<float>& bias,
                     const dcx::SpqmmSeen& expected) {
#ifdef DCX_SPQMM_AVX512
  if (!dcx::avx512::supports_amx()) return;
  const dcx::avx512::PairTables tab = dcx::avx512::bf16_pair_tables(table.data(), 1 << l.p.bits);
  const dcx::avx512::Table floats = dcx::avx512::load_table(table.data());
  const int64_t k = l.p.k;
  check_amx(l.p.n, k, bias, false, [&](int64_t r, int64_t j) { return l.dense[r * k + j]; },
            [&](const uint32_t* xv, int64_t M, float* y) {
              dcx::SpqmmSeen seen;
              dcx::avx512::with_lut_kind(l.p, [&](auto lut) DCX_AMX_FN {
                amx_passes(l.p.n, M, [&](int64_t r0, int64_t r1, int32_t* w, float* sums) {
                  dcx::avx512::sparse_amx<decltype(lut)::value>(l.p, r0, r1, l.p.group_scale ? floats : tab.lo,
                                                                xv, M, bias.data(), y, l.p.n, w, sums, &seen);
                });
              });
              CHECK(seen.max_id == expected.max_id && seen.max_col == expected.max_col && !seen.descending);
            });
#else
  (void)l, (void)table, (void)bias, (void)expected;
#endif
}

// The sparse bf16 kernel (AVX512-BF16) on 40 batch rows, three tiles of 16 (the last partial):
// one call for all three (their accumulators in L1 between runs of steps) and one call per tile
// (in registers), each over the groups in two work items; every row against the product in double
// of the bf16-rounded weights (each codebook value times its group scale, rounded once) and
// activations, with what the kernel saw against the step kernel's.
void test_sparse_bf16(const Layer& l, const std::vector<float>& table, const std::vector<float>& bias,
                      const dcx::SpqmmSeen& expected) {
#ifdef DCX_SPQMM_AVX512
  if (!dcx::avx512::supports_bf16()) return;
  constexpr int M = 40, MT = 16, tiles = (M + MT - 1) / MT;
  const int64_t n = l.p.n, k = l.p.k, stride = (k + dcx::kSpqmmWindow) * MT;
  auto bf16 = [](float v) {
    const uint32_t u = uint32_t(dcx::bf16_bits(v)) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  std::vector<float> xs(M * k);
  std::vector<uint16_t> xt(tiles * stride, 0);
  for (int m = 0; m < M; ++m)
    for (int64_t j = 0; j < k; ++j) {
      xs[m * k + j] = bf16(std::cos(0.13f * float(j * (m + 1)) + 0.5f * float(m)));
      xt[(m / MT) * stride + j * MT + m % MT] = dcx::bf16_bits(xs[m * k + j]);
    }
  auto check_rows = [&](const std::vector<float>& y) {
    for (int m = 0; m < M; ++m)
      for (int64_t r = 0; r < n; ++r) {
        double ref = bias[r], mag = std::fabs(bias[r]);
        for (int64_t j = 0; j < k; ++j) {
          const double prod = double(bf16(l.dense[r * k + j])) * xs[m * k + j];
          ref += prod;
          mag += std::fabs(prod);
        }
        CHECK(std::fabs(y[m * n + r] - ref) <= (k + 3) * 6e-8 * mag + 1e-30);
      }
  };
  const int64_t half = l.p.groups / 2;
  for (int per_call : {tiles, 1}) {
    std::vector<float> y(M * n, -1.f);
    dcx::SpqmmSeen seen;
    for (auto [g0, g1] : {std::pair<int64_t, int64_t>{0, half}, {half, l.p.groups}})
      for (int t = 0; t < tiles; t += per_call)
        dcx::avx512::with_lut_kind(l.p, [&](auto lut) DCX_AVX512_FN {
          dcx::avx512::sparse_batch_bf16<decltype(lut)::value>(l.p, g0, g1, table.data(), xt.data() + t * stride,
                                                               std::min(per_call, tiles - t), stride, M - t * MT,
                                                               bias.data(), y.data() + t * MT * n, n, &seen);
        });
    check_rows(y);
    if (l.p.steps) CHECK(seen.max_id == expected.max_id && seen.max_col == expected.max_col);
  }
#else
  (void)l, (void)table, (void)bias, (void)expected;
#endif
}

// The AVX-512 sparse decode and int8 quantization equal the portable decode (and
// q8_quantize_whole_row of its rows), over all rows and from the second group on (a partial last
// group where n is not a multiple of 16), with the same largest id and the same verdict on
// columns past K.
void test_sparse_decode(const Layer& l, const std::vector<float>& table, const dcx::SpqmmSeen& seen) {
#ifdef DCX_SPQMM_AVX512
  if (!dcx::avx512::supported()) return;
  const int64_t n = l.p.n, k = l.p.k;
  for (int64_t r0 : {int64_t(0), int64_t(16)}) {
    if (r0 >= n) continue;
    const int64_t rows = n - r0;
    std::vector<float> w(rows * k, -1.f), wv(rows * k, -1.f), sw(rows, -1.f), swq(rows, -1.f);
    std::vector<int8_t> q(rows * k, 99), qv(rows * k, 99);
    dcx::SpqmmSeen pseen, vseen, qseen;
    dcx::spqmm_decode_rows(l.p, r0, n, table.data(), w.data(), &pseen);
    dcx::avx512::with_lut_kind(l.p, [&](auto lut) DCX_AVX512_FN {
      dcx::avx512::sparse_decode_rows<decltype(lut)::value>(l.p, r0, n, table.data(), wv.data(), &vseen);
      dcx::avx512::sparse_quantize_rows<decltype(lut)::value>(l.p, r0, n, table.data(), qv.data(),
                                                              swq.data(), &qseen);
    });
    for (int64_t i = 0; i < rows * k; ++i) CHECK(w[i] == wv[i]);
    for (int64_t r = 0; r < rows; ++r) sw[r] = dcx::q8_quantize_whole_row(w.data() + r * k, k, q.data() + r * k);
    for (int64_t i = 0; i < rows * k; ++i) CHECK(q[i] == qv[i]);
    for (int64_t r = 0; r < rows; ++r) CHECK(sw[r] == swq[r]);
    // The vector kernels look at the columns only in steps that reach past K: whether one does.
    CHECK((vseen.max_col >= k) == (pseen.max_col >= k) && (qseen.max_col >= k) == (pseen.max_col >= k));
    if (r0 == 0) CHECK(vseen.max_id == seen.max_id && qseen.max_id == seen.max_id);
  }
#else
  (void)l, (void)table, (void)seen;
#endif
}

// y ([M][n]) against the int8 GEMM's rule written out in double: x and W quantized per row (xq
// [M][k] with scales sx, wq [n][k] with scales sw), exact int64 dots, then the epilogue's float
// roundings (a few units in the last place of the products' magnitude).
void check_q8_rule(const std::vector<float>& y, const std::vector<int8_t>& xq, const std::vector<int8_t>& wq,
                   const std::vector<float>& sx, const std::vector<float>& sw, const std::vector<float>& bias,
                   int64_t M, int64_t n, int64_t k) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < n; ++r) {
      int64_t dot = 0;
      for (int64_t j = 0; j < k; ++j) dot += int64_t(xq[m * k + j]) * wq[r * k + j];
      const double ref = double(dot) * sx[m] * sw[r] + bias[r];
      const double mag = std::fabs(double(dot) * sx[m] * sw[r]) + std::fabs(bias[r]);
      CHECK(std::fabs(y[m * n + r] - ref) <= 4 * 6e-8 * mag + 1e-30);
    }
}

// The sparse int8 kernel (core/spqmm_avx512.h sparse_q8) against the int8 GEMM's rule written out
// in double (each row of x and of the decoded W quantized whole, exact int32 dots), for M rows of
// x in passes of 16, 8, 4, 2 and 1, over the groups in two work items, with a zero row of x
// (scale 0); what it saw against the step kernel's.
void test_sparse_q8(const Layer& l, const std::vector<float>& table, const std::vector<float>& bias,
                    const dcx::SpqmmSeen& expected) {
#ifdef DCX_SPQMM_AVX512
  if (!dcx::avx512::supports_vnni() || !dcx::avx512::supports_vbmi()) return;
  const int64_t n = l.p.n, k = l.p.k, ldx = (k + 128 + 63) / 64 * 64;
  const dcx::avx512::FusedTables ft = dcx::avx512::fused_tables(table.data(), int64_t(1) << l.p.bits, l.p.bits);
  std::vector<int8_t> wq(n * k);
  std::vector<float> sw(n);
  for (int64_t r = 0; r < n; ++r) sw[r] = dcx::q8_quantize_whole_row(l.dense.data() + r * k, k, wq.data() + r * k);
  for (int64_t M : {1, 2, 7, 24, 33}) {
    std::vector<float> x(M * k), sx(M);
    std::vector<int8_t> xq(M * k);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t j = 0; j < k; ++j) x[m * k + j] = std::sin(0.37f * float(j + 5 * m)) * float(1 + j % 7);
      if (m == 1) std::fill(x.begin() + m * k, x.begin() + (m + 1) * k, 0.f);
      sx[m] = dcx::q8_quantize_whole_row(x.data() + m * k, k, xq.data() + m * k);
    }
    std::vector<uint8_t> staged(M * ldx + 64);  // 64-byte aligned rows
    uint8_t* xs = staged.data() + (64 - reinterpret_cast<uintptr_t>(staged.data()) % 64) % 64;
    dcx::avx512::stage_units(xq.data(), M, k, dcx::SpqmmDense::kBytes, xs, ldx);
    std::vector<int32_t> sums(M * dcx::kQ8Lanes);
    std::vector<float> y(M * n, -1.f);
    dcx::SpqmmSeen seen;
    const int64_t half = l.p.groups / 2;
    for (auto [g0, g1] : {std::pair<int64_t, int64_t>{0, half}, {half, l.p.groups}})
      dcx::avx512::with_lut_kind(l.p, [&](auto lut) DCX_AVX512_Q8_FN {
        dcx::avx512::sparse_q8<decltype(lut)::value>(l.p, g0, g1, table.data(), ft, xs, ldx, sx.data(), M,
                                                     bias.data(), y.data(), n, sums.data(), &seen);
      });
    check_q8_rule(y, xq, wq, sx, sw, bias, M, n, k);
    if (l.p.steps) CHECK(seen.max_id == expected.max_id && seen.max_col == expected.max_col);
  }
#else
  (void)l, (void)table, (void)bias, (void)expected;
#endif
}

void test_kernels(int64_t n, int64_t k, int bits, int keep, int64_t chunk_steps, int64_t group = 0) {
  std::vector<float> table(dcx::kSpqmmTable, 0.f), bias(n);
  for (int i = 0; i < (1 << bits); ++i) table[i] = 0.25f * float(i) - 1.5f;
  for (int64_t r = 0; r < n; ++r) bias[r] = 0.5f * float(r % 3);
  const Layer l = make_layer(n, k, bits, keep, chunk_steps, table, group);
  CHECK(dcx::spqmm_check_structure(l.p) == nullptr);
  std::vector<float> x(dcx::spqmm_x_stride(k), 0.f);
  for (int64_t j = 0; j < k; ++j) x[j] = std::sin(0.37f * float(j));
  dcx::SpqmmSeen seen;
  const auto generic = run(l, bias, [&](int64_t c, float* y, float* sums, dcx::SpqmmEdge* e) {
    dcx::spqmm_sparse_chunk<1>(l.p, c, table.data(), x.data(), 0, y, n, 1, sums, e, &seen);
  });
  check_close(generic, l, x, bias);
  if (l.p.steps) {
    CHECK(seen.max_id == uint32_t((1 << bits) - 1) || bits > 3);
    CHECK(seen.max_col < k);
  }
#ifdef DCX_SPQMM_AVX512
  if (dcx::avx512::supported()) {
    using dcx::avx512::Lut;
    dcx::SpqmmSeen vseen;
    const auto vec = run(l, bias, [&](int64_t c, float* y, float* sums, dcx::SpqmmEdge* e) {
      const float* t = table.data();
      switch (dcx::avx512::lut_kind(bits)) {
        case Lut::k16: dcx::avx512::sparse_chunk<Lut::k16, 1>(l.p, c, t, x.data(), 0, y, n, 1, sums, e, &vseen); break;
        case Lut::k32: dcx::avx512::sparse_chunk<Lut::k32, 1>(l.p, c, t, x.data(), 0, y, n, 1, sums, e, &vseen); break;
        case Lut::k64: dcx::avx512::sparse_chunk<Lut::k64, 1>(l.p, c, t, x.data(), 0, y, n, 1, sums, e, &vseen); break;
        case Lut::k128: dcx::avx512::sparse_chunk<Lut::k128, 1>(l.p, c, t, x.data(), 0, y, n, 1, sums, e, &vseen); break;
        case Lut::k256: dcx::avx512::sparse_chunk<Lut::k256, 1>(l.p, c, t, x.data(), 0, y, n, 1, sums, e, &vseen); break;
      }
    });
    check_close(vec, l, x, bias);
    CHECK(vseen.max_id == seen.max_id && vseen.max_col == seen.max_col);
  }
#endif
#ifdef DCX_SPQMM_AVX2
  if (dcx::avx2::supported()) {
    dcx::SpqmmSeen aseen;
    const auto vec = run(l, bias, [&](int64_t c, float* y, float* sums, dcx::SpqmmEdge* e) {
      if (bits <= 5) dcx::avx2::sparse_chunk<true>(l.p, c, table.data(), x.data(), y, sums, e, &aseen);
      else dcx::avx2::sparse_chunk<false>(l.p, c, table.data(), x.data(), y, sums, e, &aseen);
    });
    check_close(vec, l, x, bias);
    CHECK(aseen.max_id == seen.max_id && aseen.max_col == seen.max_col);
  }
#endif
  test_batch_kernels(l, table, x, bias, seen);
  test_sparse_bf16(l, table, bias, seen);
  test_sparse_q8(l, table, bias, seen);
  test_sparse_amx(l, table, bias, seen);
  test_sparse_decode(l, table, seen);
}

void test_structure_errors() {
  std::vector<float> table(dcx::kSpqmmTable, 0.f);
  std::fill(table.begin(), table.begin() + 256, 1.f);
  Layer l = make_layer(40, 100, 5, 3, 1, table);
  l.s.group_ptr[2] = l.s.group_ptr[1] - 1;
  CHECK(dcx::spqmm_check_structure(l.p) != nullptr);
  l = make_layer(40, 100, 5, 3, 1, table);
  l.s.group_ptr.back() += 1;
  CHECK(dcx::spqmm_check_structure(l.p) != nullptr);
  l = make_layer(40, 100, 5, 3, 1, table);
  l.s.chunks.back() = 3;
  CHECK(dcx::spqmm_check_structure(l.p) != nullptr);
}

// A window past K (or negative) is clamped before x is read and reported after the pass.
void test_bad_window_is_reported() {
  std::vector<float> table(dcx::kSpqmmTable, 0.f), bias(40, 0.f);
  std::fill(table.begin(), table.begin() + 256, 1.f);
  for (int32_t bad : {100, 1 << 30, -7}) {
    Layer l = make_layer(40, 100, 5, 3, 4, table);
    l.s.windows[l.s.windows.size() / 2] = bad;
    std::vector<float> x(dcx::spqmm_x_stride(100), 1.f);
    dcx::SpqmmSeen seen;
    run(l, bias, [&](int64_t c, float* y, float* sums, dcx::SpqmmEdge* e) {
      dcx::spqmm_sparse_chunk<1>(l.p, c, table.data(), x.data(), 0, y, 40, 1, sums, e, &seen);
    });
    CHECK(seen.max_col >= 100);
  }
#ifdef DCX_SPQMM_AVX512
  // The sparse AMX kernel reads the steps in order: a window below the one before it is reported.
  if (dcx::avx512::supports_amx()) {
    const dcx::avx512::PairTables tab = dcx::avx512::bf16_pair_tables(table.data(), 32);
    for (int32_t bad : {1 << 30, 0}) {
      Layer l = make_layer(40, 300, 5, 3, 4, table);
      l.s.windows[l.s.group_ptr[1] - 2] = bad;  // late in group 0: past its first chunk
      std::vector<uint32_t> xv(10 * 256, 0u);
      std::vector<int32_t> w(dcx::avx512::kAmxBufferWords);
      std::vector<float> sums(dcx::avx512::amx_sums_floats(1)), y(40);
      dcx::SpqmmSeen seen;
      dcx::avx512::sparse_amx<dcx::avx512::Lut::k32>(l.p, 0, 32, tab.lo, xv.data(), 1, nullptr, y.data(), 40,
                                                     w.data(), sums.data(), &seen);
      CHECK(bad == 0 ? seen.descending : seen.max_col >= 300);
    }
  }
  // So does the sparse int8 kernel (its units need windows in order), in both of its decodes
  // (5 bits: the word path; 6 bits: sparse_step); a window past K or negative reaches max_col.
  if (dcx::avx512::supports_vnni() && dcx::avx512::supports_vbmi()) {
    for (int bits : {5, 6})
      for (int32_t bad : {1 << 30, -7, 0}) {
        std::vector<float> t(dcx::kSpqmmTable, 0.f);
        for (int i = 0; i < (1 << bits); ++i) t[i] = 0.5f * float(i) - 3.f;
        Layer l = make_layer(40, 300, bits, 3, 4, t);
        l.s.windows[l.s.group_ptr[1] - 2] = bad;
        const dcx::avx512::FusedTables ft = dcx::avx512::fused_tables(t.data(), int64_t(1) << bits, bits);
        const int64_t ldx = (300 + 128 + 63) / 64 * 64;
        std::vector<uint8_t> staged(2 * ldx + 64, 0x80);
        uint8_t* xs = staged.data() + (64 - reinterpret_cast<uintptr_t>(staged.data()) % 64) % 64;
        std::vector<float> sx(2, 1.f), y(2 * 40);
        std::vector<int32_t> sums(2 * dcx::kQ8Lanes);
        dcx::SpqmmSeen seen;
        dcx::avx512::with_lut_kind(l.p, [&](auto lut) DCX_AVX512_Q8_FN {
          dcx::avx512::sparse_q8<decltype(lut)::value>(l.p, 0, l.p.groups, t.data(), ft, xs, ldx, sx.data(), 2,
                                                       nullptr, y.data(), 40, sums.data(), &seen);
        });
        CHECK(bad == 0 ? seen.descending : seen.max_col >= 300);
      }
  }
#endif
}

// pack_dense's layer (spqmm_test_layers.h): every id of `bits` bits, padding past K all ones.
struct DenseLayer {
  dcx_test::DenseLayer d;
  std::vector<uint32_t> ids;  // [n, k]
  std::vector<float> scale;   // group scales [n][groups], or none
  dcx::SpqmmPacked p;         // points into d and scale
  // Weight (r, j) as the kernels decode it: table[id] times its group scale, one float product.
  float weight(const std::vector<float>& table, int64_t r, int64_t j) const {
    return table[ids[r * p.k + j]] * dcx::spqmm_group_scale(p, r, j);
  }
};

DenseLayer make_dense(int64_t n, int64_t k, int bits, int64_t group = 0) {
  DenseLayer l;
  l.d = dcx_test::pack_dense(n, k, bits, 1 << bits);
  l.ids.assign(l.d.ids.begin(), l.d.ids.end());
  l.p.dense = true;
  l.p.dense_codes = l.d.codes.data();
  l.p.layout = dcx::spqmm_dense_layout(bits);
  l.p.dense_width = l.d.width;
  l.p.n = n;
  l.p.k = k;
  l.p.bits = bits;
  if (group > 0) {
    l.scale = make_scales(n, k, group);
    set_scales(l.p, l.scale, group);
  }
  return l;
}

// y [MB][n] against plain dot products of the ids' weights with x [MB][k].
template <int MB>
void check_dense(const std::vector<float>& y, const DenseLayer& l, const std::vector<float>& table,
                 const std::vector<float>& x, const std::vector<float>& bias, int mvalid) {
  for (int m = 0; m < mvalid; ++m)
    for (int64_t r = 0; r < l.p.n; ++r) {
      double ref = bias[r], mag = std::fabs(bias[r]);
      for (int64_t j = 0; j < l.p.k; ++j) {
        const double w = l.weight(table, r, j);
        ref += w * x[m * l.p.k + j];
        mag += std::fabs(w * x[m * l.p.k + j]);
      }
      CHECK(std::fabs(y[m * l.p.n + r] - ref) <= (l.p.k + 3) * 6e-8 * mag + 1e-30);
    }
}

template <int MB>
void test_dense_batch(const DenseLayer& l, const std::vector<float>& table,
                      const std::vector<float>& bias, uint32_t max_id) {
  const int64_t n = l.p.n, k = l.p.k;
  const int mvalid = MB > 1 ? MB - 1 : 1;  // a partial block: the last row of x is zeros
  std::vector<float> x(MB * k, 0.f), xt(k * MB, 0.f);
  for (int m = 0; m < mvalid; ++m)
    for (int64_t j = 0; j < k; ++j) x[m * k + j] = xt[j * MB + m] = std::cos(0.11f * float(j + 7 * m));
  std::vector<float> y(MB * n, -1.f);
  dcx::SpqmmSeen seen;
  dcx::spqmm_dense_rows<MB>(l.p, 0, n, table.data(), xt.data(), bias.data(), y.data(), n, mvalid, &seen);
  check_dense<MB>(y, l, table, x, bias, mvalid);
  CHECK(seen.max_id == max_id);
#ifdef DCX_SPQMM_AVX512
  if (dcx::avx512::supported()) {
    std::vector<float> yv(MB * n, -1.f);
    dcx::SpqmmSeen vseen;
    // Two row ranges, as the threads take them.
    dcx::avx512::with_dense_kind(l.p, [&](auto lut, auto layout) DCX_AVX512_FN {
      for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, n / 2}, {n / 2, n}})
        dcx::avx512::dense_rows<decltype(lut)::value, decltype(layout)::value, MB>(
            l.p, r0, r1, table.data(), x.data(), k, mvalid, bias.data(), yv.data(), n, &vseen);
    });
    check_dense<MB>(yv, l, table, x, bias, mvalid);
    CHECK(vseen.max_id == max_id);
    // A codebook with an entry for every id the layout holds: the 4-bit kernel reads whole blocks
    // untracked, with the same products.
    dcx::SpqmmPacked full = l.p;
    full.codebook_size = 256;
    std::vector<float> yf(MB * n, -1.f);
    dcx::SpqmmSeen fseen;
    dcx::avx512::with_dense_kind(full, [&](auto lut, auto layout) DCX_AVX512_FN {
      dcx::avx512::dense_rows<decltype(lut)::value, decltype(layout)::value, MB>(
          full, 0, n, table.data(), x.data(), k, mvalid, bias.data(), yf.data(), n, &fseen);
    });
    check_dense<MB>(yf, l, table, x, bias, mvalid);
    CHECK(fseen.max_id <= max_id);
  }
#endif
#ifdef DCX_SPQMM_AVX2
  if (dcx::avx2::supported()) {
    std::vector<float> ya(MB * n, -1.f);
    dcx::SpqmmSeen aseen;
    dcx::avx2::with_dense_kind(l.p, [&](auto nt, auto layout) DCX_AVX2_FN {
      for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, n / 2}, {n / 2, n}})
        dcx::avx2::dense_rows<decltype(nt)::value, decltype(layout)::value, MB>(
            l.p, r0, r1, table.data(), x.data(), k, mvalid, bias.data(), ya.data(), n, &aseen);
    });
    check_dense<MB>(ya, l, table, x, bias, mvalid);
    CHECK(aseen.max_id == max_id);
  }
#endif
}

// More than 8 batch rows with AVX2: each row pair decoded once for all of them; odd row counts
// and batch rows that are not a multiple of 4 (x zero past them).
void test_dense_many(const DenseLayer& l, const std::vector<float>& table,
                     const std::vector<float>& bias, uint32_t max_id) {
#ifdef DCX_SPQMM_AVX2
  if (!dcx::avx2::supported()) return;
  const int64_t n = l.p.n, k = l.p.k;
  for (int64_t M : {9, 13, 16}) {
    std::vector<float> x((M + 3) / 4 * 4 * k, 0.f), y(M * n, -1.f), w(2 * k);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < k; ++j) x[m * k + j] = std::cos(0.11f * float(j + 7 * m));
    dcx::SpqmmSeen seen;
    dcx::avx2::with_dense_kind(l.p, [&](auto nq, auto layout) DCX_AVX2_FN {
      for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, n / 2}, {n / 2, n}})
        dcx::avx2::dense_rows_many<decltype(nq)::value, decltype(layout)::value>(
            l.p, r0, r1, table.data(), x.data(), k, M, bias.data(), y.data(), n, w.data(), &seen);
    });
    check_dense<1>(y, l, table, x, bias, int(M));
    CHECK(seen.max_id == max_id);
  }
#else
  (void)l, (void)table, (void)bias, (void)max_id;
#endif
}

// int8 compute (core/spqmm_int8.h): the portable and AVX2 kernels against the rule written out
// in double (exact int32 block dots, so only the float sums over blocks may differ by rounding).
template <int MB>
void test_q8_batch(const DenseLayer& l, const std::vector<float>& table, int bits,
                   const std::vector<float>& bias, uint32_t max_id) {
  const int64_t n = l.p.n, k = l.p.k, blocks = dcx::q8_blocks(k), ldq = blocks * dcx::kQ8Block;
  int16_t cq[256];
  const float wscale = dcx::q8_codebook(table.data(), 1 << bits, cq);
  const int mvalid = MB > 1 ? MB - 1 : 1;  // a partial block: the last row is zeros
  std::vector<float> x(MB * k, 0.f), xs(MB * std::max<int64_t>(blocks, 1), 0.f);
  std::vector<int16_t> xq(MB * ldq, 0);
  for (int m = 0; m < mvalid; ++m) {
    for (int64_t j = 0; j < k; ++j) x[m * k + j] = std::sin(0.37f * float(j + 5 * m)) * float(1 + j % 7);
    dcx::q8_quantize_row(x.data() + m * k, k, xq.data() + m * ldq, xs.data() + m * blocks);
  }
  auto check = [&](const std::vector<float>& y) {
    for (int m = 0; m < mvalid; ++m)
      for (int64_t r = 0; r < n; ++r) {
        double ref = 0.0, mag = 0.0;
        for (int64_t b = 0; b < blocks; ++b) {
          int64_t dot = 0, abs_dot = 0;
          for (int t = 0; t < dcx::kQ8Block && b * dcx::kQ8Block + t < k; ++t) {
            const int64_t j = b * dcx::kQ8Block + t;
            const int64_t v = int64_t(xq[m * ldq + b * dcx::kQ8Block + dcx::q8_slot(t)]) * cq[l.ids[r * k + j]];
            dot += v;
            abs_dot += v < 0 ? -v : v;
          }
          const double gs = dcx::spqmm_group_scale(l.p, r, b * dcx::kQ8Block);
          ref += double(dot) * xs[m * blocks + b] * gs;
          mag += double(abs_dot) * xs[m * blocks + b] * gs;
        }
        ref = ref * wscale + bias[r];
        mag = mag * wscale + std::fabs(bias[r]);
        CHECK(std::fabs(y[m * n + r] - ref) <= double(8 * blocks + 10) * 6e-8 * mag + 1e-30);
      }
  };
  std::vector<float> y(MB * n, -1.f);
  dcx::SpqmmSeen seen;
  dcx::spqmm_q8_dense_rows<MB>(l.p, 0, n, cq, wscale, xq.data(), ldq, xs.data(), mvalid,
                               bias.data(), y.data(), n, &seen);
  check(y);
  CHECK(seen.max_id == max_id);
#ifdef DCX_SPQMM_AVX2
  if (dcx::avx2::supported()) {
    std::vector<float> ya(MB * n, -1.f);
    dcx::SpqmmSeen aseen;
    dcx::avx2::with_q8_kind(l.p, [&](auto nt, auto layout) DCX_AVX2_FN {
      for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, n / 2}, {n / 2, n}})
        dcx::avx2::q8_dense_rows<decltype(nt)::value, decltype(layout)::value, MB>(
            l.p, r0, r1, cq, wscale, xq.data(), ldq, xs.data(), mvalid, bias.data(), ya.data(),
            n, &aseen);
    });
    check(ya);
    CHECK(aseen.max_id == max_id);
    if (MB >= 4) {  // rows of W decoded once for every activation row (x padded to 4 rows)
      std::vector<float> ym(MB * n, -1.f);
      std::vector<int16_t> w(2 * ldq);
      dcx::SpqmmSeen mseen;
      dcx::avx2::with_q8_kind(l.p, [&](auto nt, auto layout) DCX_AVX2_FN {
        for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, n / 2}, {n / 2, n}})
          dcx::avx2::q8_dense_many<decltype(nt)::value, decltype(layout)::value>(
              l.p, r0, r1, cq, wscale, xq.data(), ldq, xs.data(), mvalid, bias.data(), ym.data(),
              n, w.data(), ldq, &mseen);
      });
      check(ym);
      CHECK(mseen.max_id == max_id);
    }
  }
#endif
}

// The fused int8 kernel (core/spqmm_avx512.h q8_fused) against the int8 GEMM's rule written out
// in double: each row of x and of W quantized whole (core/spqmm_int8.h), exact int32 dots; M
// rows of x in one or more lane groups (pairs and a single one), two row ranges of W as the
// threads take them, and a codebook entry no row uses as the largest (the scale must not see it).
void test_q8_fused(const DenseLayer& l, const std::vector<float>& table, int bits,
                   const std::vector<float>& bias, uint32_t max_id) {
#ifdef DCX_SPQMM_AVX512
  if (!dcx::avx512::supports_vnni() || !dcx::avx512::supports_vbmi() || l.p.group_scale) return;
  const int64_t n = l.p.n, k = l.p.k;
  std::vector<float> cb(table.begin(), table.begin() + (1 << bits));
  std::vector<bool> used(cb.size(), false);
  for (uint32_t id : l.ids) used[id] = true;
  for (size_t i = 0; i < cb.size(); ++i)
    if (!used[i]) cb[i] = -1000.f;  // never in a row: outside every row's scale
  const dcx::avx512::FusedTables ft = dcx::avx512::fused_tables(cb.data(), int64_t(cb.size()), bits);
  std::vector<int8_t> wq(n * k);
  std::vector<float> sw(n);
  for (int64_t r = 0; r < n; ++r) {
    std::vector<float> w(k);
    for (int64_t j = 0; j < k; ++j) w[j] = cb[l.ids[r * k + j]];
    sw[r] = dcx::q8_quantize_whole_row(w.data(), k, wq.data() + r * k);
  }
  for (int64_t M : {1, 2, 5, 7, 16, 20, 33}) {  // dots: passes of 8, 4, 2 and 1 rows
    std::vector<float> x(M * k), sx(M);
    std::vector<int8_t> xq(M * k);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t j = 0; j < k; ++j) x[m * k + j] = std::sin(0.37f * float(j + 5 * m)) * float(1 + j % 7);
      if (m == 1) std::fill(x.begin() + m * k, x.begin() + (m + 1) * k, 0.f);  // scale 0
      sx[m] = dcx::q8_quantize_whole_row(x.data() + m * k, k, xq.data() + m * k);
    }
    const int64_t groups = dcx::q8_lane_groups(M), quads = dcx::q8_units(l.p.layout, k) * 16;
    // Both orders: the batch rows in the lanes (q8_stage_quads) and a row at a time (stage_units,
    // its bytes past the last unit of the last row never read: -1 there).
    std::vector<int32_t> xv(groups * quads * dcx::kQ8Lanes, -1), xu(M * quads + 16, -1);
    for (int64_t g = 0; g < groups; ++g) {
      dcx::q8_stage_quads(xq.data(), M, k, l.p.layout, g, xv.data() + g * quads * dcx::kQ8Lanes);
      // The vectorised staging the op uses: the same words.
      std::vector<uint8_t> rows(dcx::kQ8Lanes * quads * 4);
      std::vector<int32_t> fast(quads * dcx::kQ8Lanes, -1);
      dcx::avx512::stage_quads(xq.data(), M, k, l.p.layout, g, rows.data(), fast.data());
      CHECK(std::equal(fast.begin(), fast.end(), xv.begin() + g * quads * dcx::kQ8Lanes));
    }
    dcx::avx512::stage_units(xq.data(), M, k, l.p.layout, reinterpret_cast<uint8_t*>(xu.data()));
    std::vector<int8_t> w(dcx::avx512::kFusedRows * dcx::avx512::kFusedChunk * 64);
    std::vector<int32_t> sums(std::max(groups, M) * dcx::avx512::kFusedRows * dcx::kQ8Lanes);
    for (bool dots : {false, true}) {
      std::vector<float> y(M * n, -1.f);
      dcx::SpqmmSeen seen;
      dcx::avx512::with_dense_kind(l.p, [&](auto lut, auto layout) DCX_AVX512_Q8_FN {
        constexpr dcx::avx512::Lut L = decltype(lut)::value;
        constexpr dcx::SpqmmDense D = decltype(layout)::value;
        for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, n / 2}, {n / 2, n}}) {
          if (dots) {
            dcx::avx512::q8_fused<L, D, dcx::avx512::FusedOrder::kDots>(
                l.p, r0, r1, ft, xu.data(), sx.data(), M, bias.data(), y.data(), n, w.data(), sums.data(), &seen);
          } else {
            dcx::avx512::q8_fused<L, D>(l.p, r0, r1, ft, xv.data(), sx.data(), M, bias.data(), y.data(), n,
                                        w.data(), sums.data(), &seen);
          }
        }
      });
      check_q8_rule(y, xq, wq, sx, sw, bias, M, n, k);
      CHECK(seen.max_id == max_id);
    }
  }
#else
  (void)l, (void)table, (void)bits, (void)bias, (void)max_id;
#endif
}

void test_bf16_amx(const DenseLayer& l, const std::vector<float>& table,
                   const std::vector<float>& bias, uint32_t max_id) {
#ifdef DCX_SPQMM_AVX512
  if (!dcx::avx512::supports_amx()) return;
  const dcx::avx512::PairTables tab = dcx::avx512::bf16_pair_tables(table.data(), 1 << l.p.bits);
  check_amx(l.p.n, l.p.k, bias, true, [&](int64_t r, int64_t j) { return l.weight(table, r, j); },
            [&](const uint32_t* xv, int64_t M, float* y) {
              dcx::SpqmmSeen seen;
              dcx::avx512::with_dense_kind(l.p, [&](auto lut, auto layout) DCX_AMX_FN {
                amx_passes(l.p.n, M, [&](int64_t r0, int64_t r1, int32_t* w, float* sums) {
                  dcx::avx512::bf16_amx<decltype(lut)::value, decltype(layout)::value>(
                      l.p, r0, r1, table.data(), tab, xv, M, bias.data(), y, l.p.n, w, sums, &seen);
                });
              });
              CHECK(seen.max_id == max_id);
            });
#else
  (void)l, (void)table, (void)bias, (void)max_id;
#endif
}

void test_dense(int64_t n, int64_t k, int bits, int64_t group = 0) {
  std::vector<float> table(dcx::kSpqmmTable, 0.f), bias(n);
  for (int i = 0; i < (1 << bits); ++i) table[i] = 0.125f * float(i % 23) - 1.25f;
  for (int64_t r = 0; r < n; ++r) bias[r] = 0.25f * float(r % 5);
  const DenseLayer l = make_dense(n, k, bits, group);
  auto decoded = [&](const std::vector<float>& w) {  // every weight as the kernels decode it
    for (int64_t i = 0; i < n * k; ++i) CHECK(w[i] == l.weight(table, i / k, i % k));
  };
  uint32_t max_id = 0;
  for (uint32_t id : l.ids) max_id = std::max(max_id, id);
  test_dense_batch<1>(l, table, bias, max_id);
  test_dense_batch<2>(l, table, bias, max_id);
  test_dense_batch<4>(l, table, bias, max_id);
  test_dense_batch<8>(l, table, bias, max_id);
  test_dense_many(l, table, bias, max_id);
  test_q8_batch<1>(l, table, bits, bias, max_id);
  test_q8_batch<4>(l, table, bits, bias, max_id);
  test_q8_batch<8>(l, table, bits, bias, max_id);
  test_q8_batch<20>(l, table, bits, bias, max_id);
  test_q8_fused(l, table, bits, bias, max_id);
  test_bf16_amx(l, table, bias, max_id);
  // The decode past the crossover: every weight as the table holds it.
  std::vector<float> w(n * k, -1.f);
  dcx::SpqmmSeen seen;
  dcx::spqmm_decode_rows(l.p, 0, n, table.data(), w.data(), &seen);
  decoded(w);
  CHECK(seen.max_id == max_id);
#ifdef DCX_SPQMM_AVX512
  if (dcx::avx512::supported()) {
    std::vector<float> wv(n * k, -1.f);
    dcx::SpqmmSeen vseen;
    dcx::avx512::with_dense_kind(l.p, [&](auto lut, auto layout) DCX_AVX512_FN {
      dcx::avx512::dense_decode_rows<decltype(lut)::value, decltype(layout)::value>(
          l.p, 0, n, table.data(), wv.data(), &vseen);
    });
    decoded(wv);
    CHECK(vseen.max_id == max_id);
  }
#endif
#ifdef DCX_SPQMM_AVX2
  if (dcx::avx2::supported()) {
    std::vector<float> wa(n * k, -1.f);
    dcx::SpqmmSeen aseen;
    dcx::avx2::with_dense_kind(l.p, [&](auto nt, auto layout) DCX_AVX2_FN {
      dcx::avx2::dense_decode_rows<decltype(nt)::value, decltype(layout)::value>(
          l.p, 0, n, table.data(), wa.data(), &aseen);
    });
    decoded(wa);
    CHECK(aseen.max_id == max_id);
  }
#endif
}

// Group scales need every window inside one group: the structure check refuses one that crosses.
void test_group_windows() {
  const std::vector<float> table(dcx::kSpqmmTable, 0.5f);
  const Layer grouped = make_layer(40, 333, 4, 1, 1000, table, 64);
  CHECK(dcx::spqmm_check_scale_windows(grouped.p) == nullptr);
  Layer loose = make_layer(40, 333, 4, 1, 1000, table);
  const std::vector<float> scale = make_scales(40, 333, 64);
  CHECK(dcx::spqmm_check_scale_windows(loose.p) == nullptr);
  set_scales(loose.p, scale, 64);
  CHECK(dcx::spqmm_check_scale_windows(loose.p) != nullptr);
}

}  // namespace

int main() {
  for (int bits : {1, 3, 4, 5, 6, 8}) {
    test_kernels(7, 97, bits, 2, 3);      // one partial group, split between chunks
    test_kernels(35, 5000, bits, 5, 7);   // full rows: a step per column, groups split
    test_kernels(40, 333, bits, 1, 1000); // several groups per chunk
    test_kernels(5, 4097, bits, 0, 2);    // all pruned
    test_kernels(40, 5000, bits, 6, 9);   // a block of 41 columns a step
  }
  for (int bits : {1, 2, 4, 5, 6, 7, 8})
    for (int64_t k : {1, 15, 16, 63, 64, 65, 127, 128, 129, 300}) test_dense(5, k, bits);
  test_dense(33, 1000, 6);
  test_dense(33, 1100, 4);  // fused int8: chunks of 512 columns, 8-row blocks and a rest; AMX: of 256
  // Group scales: every kernel above scales each weight by its row's scale for its column group.
  for (int bits : {3, 5, 8})
    for (int64_t group : {32, 64, 96}) {
      test_kernels(7, 97, bits, 2, 3, group);
      test_kernels(35, 1000, bits, 5, 7, group);
      test_kernels(40, 333, bits, 1, 1000, group);
    }
  for (int bits : {2, 4, 6, 8})
    for (int64_t k : {31, 64, 129, 300}) test_dense(5, k, bits, 64);
  test_dense(33, 1000, 5, 32);
  test_dense(19, 700, 4, 64);
  test_group_windows();
  test_structure_errors();
  test_bad_window_is_reported();
  return dcx_test::finish("test_spqmm");
}
