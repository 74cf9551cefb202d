// Native tests of the spqmm core: pack a small layer here (the greedy steps of dcx.nn.pack,
// written out sequentially), run the portable and (where the CPU has them) AVX-512 and AVX2
// kernels chunk by chunk, add the shared groups' partial sums as the op does, and compare with a
// plain dot product; check the pointer validation and the seen-maximum report.
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/spqmm.h"
#include "tests/check.h"

namespace {

constexpr int R = dcx::kSpqmmRows, W = dcx::kSpqmmWindow;

struct Layer {
  std::vector<uint16_t> codes;
  std::vector<int32_t> windows, group_ptr, chunks;
  std::vector<float> dense;  // decoded weight [n, k]
  dcx::SpqmmPacked p;
};

// Row r keeps column j when (r * 7 + j * 3) % 5 < keep; id = (r + j) % 2^bits. Every
// `chunk_steps` steps start a chunk, so groups are split between chunks.
Layer make_layer(int64_t n, int64_t k, int bits, int keep, int64_t chunk_steps,
                 const std::vector<float>& table) {
  Layer l;
  const int k_ids = 1 << bits;
  l.dense.assign(n * k, 0.f);
  std::vector<std::vector<int64_t>> cols(n);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < k; ++j)
      if ((r * 7 + j * 3) % 5 < keep) {
        cols[r].push_back(j);
        l.dense[r * k + j] = table[(r + j) % k_ids];
      }
  const int64_t groups = dcx::spqmm_groups(n);
  l.group_ptr.push_back(0);
  for (int64_t g = 0; g < groups; ++g) {
    std::vector<size_t> next(R, 0);
    auto has = [&](int i) { return g * R + i < n && next[i] < cols[g * R + i].size(); };
    while (true) {
      int64_t window = -1;
      for (int i = 0; i < R; ++i)
        if (has(i) && (window < 0 || cols[g * R + i][next[i]] < window)) window = cols[g * R + i][next[i]];
      if (window < 0) break;
      l.windows.push_back(int32_t(window));
      for (int i = 0; i < R; ++i) {
        uint16_t slot = 0;
        if (has(i) && cols[g * R + i][next[i]] < window + W) {
          const int64_t r = g * R + i, j = cols[r][next[i]++];
          slot = uint16_t(dcx::kSpqmmLive | (j - window) << 8 | (r + j) % k_ids);
        }
        l.codes.push_back(slot);
      }
    }
    l.group_ptr.push_back(int32_t(l.windows.size()));
  }
  const int64_t steps = int64_t(l.windows.size());
  for (int64_t s = 0; s < steps; s += chunk_steps) l.chunks.push_back(int32_t(s));
  l.chunks.push_back(int32_t(steps));
  l.p.codes = l.codes.data();
  l.p.windows = l.windows.data();
  l.p.group_ptr = l.group_ptr.data();
  l.p.chunks = l.chunks.data();
  l.p.num_chunks = int64_t(l.chunks.size()) - 1;
  l.p.steps = steps;
  l.p.groups = groups;
  l.p.n = n;
  l.p.k = k;
  l.p.bits = bits;
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
    CHECK(std::fabs(y[r] - ref) <= (l.p.k + 2) * 6e-8 * mag + 1e-30);
  }
}

void test_kernels(int64_t n, int64_t k, int bits, int keep, int64_t chunk_steps) {
  std::vector<float> table(dcx::kSpqmmTable, 0.f), bias(n);
  for (int i = 0; i < (1 << bits); ++i) table[i] = 0.25f * float(i) - 1.5f;
  for (int64_t r = 0; r < n; ++r) bias[r] = 0.5f * float(r % 3);
  const Layer l = make_layer(n, k, bits, keep, chunk_steps, table);
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
}

void test_structure_errors() {
  std::vector<float> table(dcx::kSpqmmTable, 0.f);
  std::fill(table.begin(), table.begin() + 256, 1.f);
  Layer l = make_layer(40, 100, 5, 3, 1, table);
  l.group_ptr[2] = l.group_ptr[1] - 1;
  CHECK(dcx::spqmm_check_structure(l.p) != nullptr);
  l = make_layer(40, 100, 5, 3, 1, table);
  l.group_ptr.back() += 1;
  CHECK(dcx::spqmm_check_structure(l.p) != nullptr);
  l = make_layer(40, 100, 5, 3, 1, table);
  l.chunks.back() = 3;
  CHECK(dcx::spqmm_check_structure(l.p) != nullptr);
}

// A window past K (or negative) is clamped before x is read and reported after the pass.
void test_bad_window_is_reported() {
  std::vector<float> table(dcx::kSpqmmTable, 0.f), bias(40, 0.f);
  std::fill(table.begin(), table.begin() + 256, 1.f);
  for (int32_t bad : {100, 1 << 30, -7}) {
    Layer l = make_layer(40, 100, 5, 3, 4, table);
    l.windows[l.windows.size() / 2] = bad;
    std::vector<float> x(dcx::spqmm_x_stride(100), 1.f);
    dcx::SpqmmSeen seen;
    run(l, bias, [&](int64_t c, float* y, float* sums, dcx::SpqmmEdge* e) {
      dcx::spqmm_sparse_chunk<1>(l.p, c, table.data(), x.data(), 0, y, 40, 1, sums, e, &seen);
    });
    CHECK(seen.max_col >= 100);
  }
}

}  // namespace

int main() {
  for (int bits : {1, 3, 4, 5, 6, 8}) {
    test_kernels(7, 97, bits, 2, 3);      // one partial group, split between chunks
    test_kernels(35, 5000, bits, 5, 7);   // full rows: a step per column, groups split
    test_kernels(40, 333, bits, 1, 1000); // several groups per chunk
    test_kernels(5, 4097, bits, 0, 2);    // all pruned
  }
  test_structure_errors();
  test_bad_window_is_reported();
  return dcx_test::finish("test_spqmm");
}
