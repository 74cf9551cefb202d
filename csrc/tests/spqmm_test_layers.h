// Packed spqmm layers for the tests, native (test_spqmm.cpp) and emulated CUDA
// (cuda_emu/test_spqmm*_kernel.cpp): the greedy steps of dcx.packing.pack written out sequentially for
// sparse mode, and each dense layout of core/spqmm_layout.h written bit by bit. The ids follow
// fixed formulas, so every test knows the weight at (r, j) without unpacking.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "core/spqmm_layout.h"

namespace dcx_test {

struct SparseLayer {
  std::vector<uint16_t> codes;  // [steps, kSpqmmRows] slots
  std::vector<int32_t> windows, group_ptr, chunks;
  std::vector<int32_t> ids;  // [n, k]: the codebook id of each weight, -1 where pruned
  int64_t n = 0, k = 0, groups = 0, steps = 0, num_chunks = 0;
};

// Row r keeps column j when (r * 7 + j * 3) % 5 < keep (keep 0..5), or for keep 6 one column
// of each block of 41, at a place among the block's first 32 hashed from r and the block (a step
// then holds a block's slots at offsets up to 31, the next one's window 41 or so columns on); its
// id is (r + j) % k_ids.
// A chunk starts every `chunk_steps` steps, so groups are split between chunks. scale_group > 0
// (a multiple of 32): windows for group scales, each within one column group (window %
// scale_group + 32 <= scale_group): a window that would cross its group's end starts 32 columns
// before that end instead (still at or before the smallest next column).
inline SparseLayer pack_sparse(int64_t n, int64_t k, int k_ids, int keep, int64_t chunk_steps,
                               int64_t scale_group = 0) {
  constexpr int R = dcx::kSpqmmRows, W = dcx::kSpqmmWindow;
  SparseLayer l;
  l.n = n;
  l.k = k;
  l.ids.assign(n * k, -1);
  std::vector<std::vector<int64_t>> cols(n);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t j = 0; j < k; ++j)
      if (keep == 6 ? j % 41 == ((uint32_t(r) * 2654435761u ^ uint32_t(j / 41) * 40503u) * 2246822519u >> 27)
                    : (r * 7 + j * 3) % 5 < keep) {
        cols[r].push_back(j);
        l.ids[r * k + j] = int32_t((r + j) % k_ids);
      }
  l.groups = (n + R - 1) / R;
  l.group_ptr.push_back(0);
  for (int64_t g = 0; g < l.groups; ++g) {
    std::vector<size_t> next(R, 0);
    auto has = [&](int i) { return g * R + i < n && next[i] < cols[g * R + i].size(); };
    while (true) {
      int64_t window = -1;  // the smallest next column of the group's rows
      for (int i = 0; i < R; ++i)
        if (has(i) && (window < 0 || cols[g * R + i][next[i]] < window)) window = cols[g * R + i][next[i]];
      if (window < 0) break;
      if (scale_group > 0 && window % scale_group + W > scale_group)
        window = window - window % scale_group + scale_group - W;
      l.windows.push_back(int32_t(window));
      for (int i = 0; i < R; ++i) {
        uint16_t slot = 0;
        if (has(i) && cols[g * R + i][next[i]] >= window && cols[g * R + i][next[i]] < window + W) {
          const int64_t r = g * R + i, j = cols[r][next[i]++];
          slot = uint16_t(dcx::kSpqmmLive | (j - window) << dcx::kSpqmmOffsetShift | l.ids[r * k + j]);
        }
        l.codes.push_back(slot);
      }
    }
    l.group_ptr.push_back(int32_t(l.windows.size()));
  }
  l.steps = int64_t(l.windows.size());
  for (int64_t s = 0; s < l.steps; s += chunk_steps) l.chunks.push_back(int32_t(s));
  l.chunks.push_back(int32_t(l.steps));
  l.num_chunks = int64_t(l.chunks.size()) - 1;
  return l;
}

struct DenseLayer {
  std::vector<uint8_t> codes;  // [n, spqmm_dense_width(k, bits)]
  std::vector<int32_t> ids;    // [n, k]
  int64_t n = 0, k = 0, width = 0;
  int bits = 0;
};

// Column j of row r has id (r * 5 + j * 3 + (j >> 3)) % k_ids; the padding past K stays all
// ones, which no kernel may read as a weight.
inline DenseLayer pack_dense(int64_t n, int64_t k, int bits, int k_ids) {
  DenseLayer l;
  l.n = n;
  l.k = k;
  l.bits = bits;
  l.width = dcx::spqmm_dense_width(k, bits);
  l.codes.assign(n * l.width, 0xFF);
  l.ids.resize(n * k);
  const dcx::SpqmmDense layout = dcx::spqmm_dense_layout(bits);
  for (int64_t r = 0; r < n; ++r) {
    uint8_t* row = l.codes.data() + r * l.width;
    for (int64_t j = 0; j < k; ++j) {
      const uint32_t id = uint32_t((r * 5 + j * 3 + (j >> 3)) % k_ids);
      l.ids[r * k + j] = int32_t(id);
      if (layout == dcx::SpqmmDense::kNibbles) {
        const int64_t t = (j >> 4) & 7, d = j & 15;
        uint8_t& byte = row[(j / dcx::kSpqmmNibbleBlock) * (dcx::kSpqmmNibbleBlock / 2) + 4 * d + (t >> 1)];
        byte = uint8_t((byte & ~(15u << (4 * (t & 1)))) | id << (4 * (t & 1)));
      } else if (layout == dcx::SpqmmDense::kBits) {
        for (int b = 0; b < bits; ++b) {
          uint8_t& byte = row[(j * bits + b) >> 3];
          const uint8_t bit = uint8_t(1u << ((j * bits + b) & 7));
          byte = uint8_t((id >> b & 1) ? byte | bit : byte & ~bit);
        }
      } else {
        row[j] = uint8_t(id);
      }
    }
    for (int64_t j = 0; j < k; ++j)
      if (dcx::spqmm_dense_id(row, j, bits) != uint32_t(l.ids[r * k + j])) {
        std::fprintf(stderr, "pack_dense: column %lld of row %lld reads back wrong\n", (long long)j, (long long)r);
        std::abort();
      }
  }
  return l;
}

}  // namespace dcx_test
