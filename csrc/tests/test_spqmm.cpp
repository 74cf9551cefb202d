// Native tests of the spqmm core: pack a small layer by hand, run the portable and (where the
// CPU has them) AVX-512 kernels chunk by chunk, add the shared rows' partial sums as the op does,
// and compare with a plain dot product; check the pointer validation and the seen-maximum report.
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/spqmm.h"
#include "tests/check.h"

namespace {

struct Layer {
  std::vector<uint16_t> codes;
  std::vector<int32_t> seg_ptr, chunks;
  std::vector<float> dense;  // decoded weight [n, k]
  dcx::SpqmmPacked p;
};

// Row r keeps column j when (r * 7 + j * 3) % 5 < keep; id = (r + j) % k_ids. Every `chunk_segs`
// segments start a chunk, so rows are split between chunks.
Layer make_layer(int64_t n, int64_t k, int bits, int keep, int64_t chunk_segs,
                 const std::vector<float>& table) {
  Layer l;
  const int64_t tile = int64_t(1) << (16 - bits), tiles = dcx::spqmm_tiles(k, bits);
  const int k_ids = 1 << bits;
  l.dense.assign(n * k, 0.f);
  l.seg_ptr.push_back(0);
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t t = 0; t < tiles; ++t) {
      for (int64_t j = t * tile; j < std::min(k, (t + 1) * tile); ++j) {
        if ((r * 7 + j * 3) % 5 >= keep) continue;
        const uint32_t id = uint32_t((r + j) % k_ids);
        l.codes.push_back(uint16_t(((j - t * tile) << bits) | id));
        l.dense[r * k + j] = table[id];
      }
      l.seg_ptr.push_back(int32_t(l.codes.size()));
    }
  }
  for (int64_t s = 0; s < n * tiles; s += chunk_segs) l.chunks.push_back(int32_t(s));
  l.chunks.push_back(int32_t(n * tiles));
  l.p.codes = l.codes.data();
  l.p.seg_ptr = l.seg_ptr.data();
  l.p.chunks = l.chunks.data();
  l.p.num_chunks = int64_t(l.chunks.size()) - 1;
  l.p.nnz = int64_t(l.codes.size());
  l.p.n = n;
  l.p.k = k;
  l.p.tiles = tiles;
  l.p.bits = bits;
  return l;
}

template <typename ChunkFn>
std::vector<float> run(const Layer& l, const std::vector<float>& bias, ChunkFn chunk) {
  std::vector<float> y(l.p.n, -999.f), sums(l.p.num_chunks * 2, 0.f);
  std::vector<dcx::SpqmmEdge> edges(l.p.num_chunks);
  for (int64_t c = 0; c < l.p.num_chunks; ++c) chunk(c, y.data(), sums.data() + 2 * c, &edges[c]);
  for (int64_t c = 0; c < l.p.num_chunks; ++c)
    for (int s = 0; s < 2; ++s)
      if (edges[c].row[s] >= 0) y[edges[c].row[s]] = bias[edges[c].row[s]];
  for (int64_t c = 0; c < l.p.num_chunks; ++c)
    for (int s = 0; s < 2; ++s)
      if (edges[c].row[s] >= 0) y[edges[c].row[s]] += sums[2 * c + s];
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

void test_kernels(int64_t n, int64_t k, int bits, int keep, int64_t chunk_segs) {
  std::vector<float> table(dcx::kSpqmmTable, 0.f), bias(n);
  for (int i = 0; i < (1 << bits); ++i) table[i] = 0.25f * float(i) - 1.5f;
  for (int64_t r = 0; r < n; ++r) bias[r] = 0.5f * float(r % 3);
  const Layer l = make_layer(n, k, bits, keep, chunk_segs, table);
  CHECK(dcx::spqmm_check_structure(l.p) == nullptr);
  const int64_t padded = l.p.tiles << (16 - bits);
  std::vector<float> x(padded, 0.f);
  for (int64_t j = 0; j < k; ++j) x[j] = std::sin(0.37f * float(j));
  dcx::SpqmmSeen seen;
  const auto generic = run(l, bias, [&](int64_t c, float* y, float* sums, dcx::SpqmmEdge* e) {
    dcx::spqmm_sparse_chunk<1>(l.p, c, table.data(), x.data(), bias.data(), y, n, 1, sums, e, &seen);
  });
  check_close(generic, l, x, bias);
  if (l.p.nnz) {
    CHECK(seen.max_id == uint32_t((1 << bits) - 1) || bits > 3);
    CHECK(seen.max_col < k);
  }
#ifdef DCX_SPQMM_AVX512
  if (dcx::avx512::supported()) {
    using dcx::avx512::Lut;
    dcx::SpqmmSeen vseen;
    const auto vec = run(l, bias, [&](int64_t c, float* y, float* sums, dcx::SpqmmEdge* e) {
      switch (dcx::avx512::lut_kind(bits)) {
        case Lut::k16: dcx::avx512::sparse_chunk<Lut::k16, true>(l.p, c, table.data(), x.data(), bias.data(), y, n, sums, e, &vseen); break;
        case Lut::k32: dcx::avx512::sparse_chunk<Lut::k32, true>(l.p, c, table.data(), x.data(), bias.data(), y, n, sums, e, &vseen); break;
        case Lut::k64: dcx::avx512::sparse_chunk<Lut::k64, true>(l.p, c, table.data(), x.data(), bias.data(), y, n, sums, e, &vseen); break;
        case Lut::k128: dcx::avx512::sparse_chunk<Lut::k128, true>(l.p, c, table.data(), x.data(), bias.data(), y, n, sums, e, &vseen); break;
        case Lut::k256: dcx::avx512::sparse_chunk<Lut::k256, true>(l.p, c, table.data(), x.data(), bias.data(), y, n, sums, e, &vseen); break;
      }
    });
    check_close(vec, l, x, bias);
    CHECK(vseen.max_id == seen.max_id && vseen.max_col <= seen.max_col && vseen.max_col < k);
  }
#endif
}

void test_structure_errors() {
  std::vector<float> table(dcx::kSpqmmTable, 1.f);
  Layer l = make_layer(4, 100, 5, 3, 1, table);
  l.seg_ptr[2] = l.seg_ptr[1] - 1;
  CHECK(dcx::spqmm_check_structure(l.p) != nullptr);
  l = make_layer(4, 100, 5, 3, 1, table);
  l.seg_ptr.back() += 1;
  CHECK(dcx::spqmm_check_structure(l.p) != nullptr);
  l = make_layer(4, 100, 5, 3, 1, table);
  l.chunks.back() = 3;
  CHECK(dcx::spqmm_check_structure(l.p) != nullptr);
}

}  // namespace

int main() {
  for (int bits : {1, 3, 4, 5, 6, 8}) {
    test_kernels(7, 97, bits, 2, 3);      // several rows per chunk
    test_kernels(3, 5000, bits, 5, 1);    // full rows, one segment per chunk: rows split
    test_kernels(5, 4097, bits, 0, 2);    // all pruned
  }
  test_structure_errors();
  return dcx_test::finish("test_spqmm");
}
