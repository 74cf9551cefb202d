// spqmm kernels in plain C++ (any machine; the batched loops compiled for AVX-512, AVX2 and the
// baseline by target_clones): the layout and the helpers they share are in core/spqmm.h.
#pragma once

#include "core/spqmm.h"

namespace dcx {

// Generic kernel (any machine): sparse chunk with MB batch columns; xs is [MB][ldx] floats, y
// [MB][ldy] holds the bias already.
template <int MB>
DCX_SPQMM_MULTIVERSION void spqmm_sparse_chunk(const SpqmmPacked& p, int64_t c,
                                               const float* __restrict table,
                                               const float* __restrict xs, int64_t ldx, float* y,
                                               int64_t ldy, int mvalid, float* edge_sums,
                                               SpqmmEdge* edge, SpqmmSeen* seen) {
  uint32_t max_id = 0;
  int64_t max_col = -1;
  float acc[MB][kSpqmmRows] = {};
  SpqmmStepScales scales(p);
  auto step = [&](int64_t s, int64_t g) {
    const uint16_t* slot = p.codes + s * kSpqmmRows;
    const int64_t j0 = spqmm_window(p, s, &max_col);
    float w[kSpqmmRows];
    int32_t col[kSpqmmRows];
    for (int i = 0; i < kSpqmmRows; ++i) {
      const uint32_t v = slot[i];
      max_id = std::max(max_id, v & kSpqmmIdMask);
      w[i] = table[(v & kSpqmmIdMask) | ((~v >> (kSpqmmLiveBit - 8)) & 0x100u)];
      col[i] = static_cast<int32_t>((v >> kSpqmmOffsetShift) & (kSpqmmWindow - 1));
    }
    if (p.group_scale) {
      const float* sc = scales.get(p, g, j0);
      for (int i = 0; i < kSpqmmRows; ++i) w[i] *= sc[i];
    }
    if (j0 + kSpqmmWindow > p.k) {  // only here can a live slot point past K
      for (int i = 0; i < kSpqmmRows; ++i)
        if (slot[i] & kSpqmmLive) max_col = std::max<int64_t>(max_col, j0 + col[i]);
    }
    for (int m = 0; m < MB; ++m) {
      const float* xw = xs + m * ldx + j0;
      for (int i = 0; i < kSpqmmRows; ++i) acc[m][i] += w[i] * xw[col[i]];
    }
  };
  auto flush = [&](int64_t g, int slot) {
    spqmm_flush<MB>(p, g, slot, acc, y, ldy, mvalid, edge_sums, edge);
    for (int m = 0; m < MB; ++m)
      for (int i = 0; i < kSpqmmRows; ++i) acc[m][i] = 0.f;
  };
  spqmm_walk_chunk(p, c, step, flush);
  seen->max_id = std::max(seen->max_id, max_id);
  seen->max_col = std::max(seen->max_col, max_col);
}

// Generic dense-mode rows [r0, r1) with MB batch columns; xt is [K][MB] floats.
template <int MB>
DCX_SPQMM_MULTIVERSION void spqmm_dense_rows(const SpqmmPacked& p, int64_t r0, int64_t r1,
                                             const float* __restrict table,
                                             const float* __restrict xt, const float* bias,
                                             float* y, int64_t ldy, int mvalid, SpqmmSeen* seen) {
  uint32_t max_id = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* code = p.dense_codes + r * p.dense_width;
    float a[MB];
    for (int m = 0; m < MB; ++m) a[m] = 0.f;
    uint32_t row_max = 0;
    for (int64_t j = 0; j < p.k; ++j) {
      const uint32_t id = spqmm_dense_id(code, j, p.bits);
      row_max = std::max(row_max, id);
      const float w = p.group_scale ? table[id] * spqmm_group_scale(p, r, j) : table[id];
      for (int m = 0; m < MB; ++m) a[m] += w * xt[j * MB + m];
    }
    max_id = std::max<uint32_t>(max_id, row_max);
    const float b = bias ? bias[r] : 0.f;
    for (int m = 0; m < mvalid; ++m) y[m * ldy + r] = a[m] + b;
  }
  seen->max_id = std::max(seen->max_id, max_id);
}

// Decode rows [r0, r1) of W into w ([r1 - r0, k] floats; times the group scales, if any), for the
// BLAS past the crossover; the block is zeroed here. Columns are clamped to K - 1 (a corrupted
// entry is reported, never written out of bounds).
inline void spqmm_decode_rows(const SpqmmPacked& p, int64_t r0, int64_t r1, const float* table,
                              float* w, SpqmmSeen* seen) {
  if (p.dense) {
    uint32_t max_id = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* code = p.dense_codes + r * p.dense_width;
      for (int64_t j = 0; j < p.k; ++j) {
        const uint32_t id = spqmm_dense_id(code, j, p.bits);
        max_id = std::max(max_id, id);
        w[(r - r0) * p.k + j] = p.group_scale ? table[id] * spqmm_group_scale(p, r, j) : table[id];
      }
    }
    seen->max_id = std::max(seen->max_id, max_id);
    return;
  }
  std::fill(w, w + (r1 - r0) * p.k, 0.f);
  int64_t max_col = -1;
  for (int64_t g = r0 / kSpqmmRows; g < spqmm_groups(r1); ++g) {
    for (int64_t s = p.group_ptr[g]; s < p.group_ptr[g + 1]; ++s) {
      const int64_t j0 = spqmm_window(p, s, &max_col);
      for (int i = 0; i < kSpqmmRows; ++i) {
        const uint32_t v = p.codes[s * kSpqmmRows + i];
        const int64_t row = g * kSpqmmRows + i, col = j0 + ((v >> kSpqmmOffsetShift) & (kSpqmmWindow - 1));
        seen->max_id = std::max(seen->max_id, v & kSpqmmIdMask);
        if (!(v & kSpqmmLive)) continue;
        max_col = std::max(max_col, col);
        if (row >= r0 && row < r1 && col < p.k)
          w[(row - r0) * p.k + col] = table[v & kSpqmmIdMask] * spqmm_group_scale(p, row, j0);
      }
    }
  }
  seen->max_col = std::max(seen->max_col, max_col);
}

// Sparse mode for many batch rows, which sit in the vector lanes: x transposed as xt [K + 32][MT]
// (zero past K and past the valid rows), so a slot's weight multiplies one contiguous row of MT
// activations (a broadcast and MT / 8 FMAs with AVX2) instead of being decoded again for each
// batch row. Groups [g0, g1); y [MT][ldy] gets bias + products for the mvalid rows (every element
// of those rows in the groups written). Padding slots read the table's zero half.
template <int MT>
DCX_SPQMM_MULTIVERSION void spqmm_sparse_batch(const SpqmmPacked& p, int64_t g0, int64_t g1,
                                               const float* __restrict table,
                                               const float* __restrict xt, int mvalid,
                                               const float* bias, float* y, int64_t ldy,
                                               SpqmmSeen* seen) {
  uint32_t max_id = 0;
  int64_t max_col = -1;
  SpqmmStepScales scales(p);
  for (int64_t g = g0; g < g1; ++g) {
    float acc[kSpqmmRows][MT] = {};
    for (int64_t s = p.group_ptr[g]; s < p.group_ptr[g + 1]; ++s) {
      const int64_t j0 = spqmm_window(p, s, &max_col);
      const bool edge = j0 + kSpqmmWindow > p.k;  // only here can a live slot point past K
      const uint16_t* slot = p.codes + s * kSpqmmRows;
      const float* sc = p.group_scale ? scales.get(p, g, j0) : nullptr;
      for (int i = 0; i < kSpqmmRows; ++i) {
        const uint32_t v = slot[i];
        max_id = std::max(max_id, v & kSpqmmIdMask);
        float w = table[(v & kSpqmmIdMask) | ((~v >> (kSpqmmLiveBit - 8)) & 0x100u)];
        if (sc) w *= sc[i];
        const int64_t col = j0 + ((v >> kSpqmmOffsetShift) & (kSpqmmWindow - 1));
        if (edge && (v & kSpqmmLive)) max_col = std::max(max_col, col);
        const float* xr = xt + col * MT;
        for (int m = 0; m < MT; ++m) acc[i][m] += w * xr[m];
      }
    }
    const int64_t r0 = g * kSpqmmRows;
    const int lanes = static_cast<int>(std::min<int64_t>(kSpqmmRows, p.n - r0));
    for (int i = 0; i < lanes; ++i) {
      const float b = bias ? bias[r0 + i] : 0.f;
      for (int m = 0; m < mvalid; ++m) y[m * ldy + r0 + i] = acc[i][m] + b;
    }
  }
  seen->max_id = std::max(seen->max_id, max_id);
  seen->max_col = std::max(seen->max_col, max_col);
}

// int8 compute (core/spqmm_int8.h), any machine: dense rows [r0, r1) for MB activation rows
// (xq [MB][ldq] int16 in q8_slot order and xs [MB][blocks] scales, zero past the valid rows);
// table: the int16 codebook (256 entries), wscale its scale.
template <int MB>
DCX_SPQMM_MULTIVERSION void spqmm_q8_dense_rows(const SpqmmPacked& p, int64_t r0, int64_t r1,
                                                const int16_t* table, float wscale,
                                                const int16_t* __restrict xq, int64_t ldq,
                                                const float* __restrict xs, int mvalid,
                                                const float* bias, float* y, int64_t ldy,
                                                SpqmmSeen* seen) {
  const int64_t blocks = q8_blocks(p.k);
  uint32_t max_id = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* code = p.dense_codes + r * p.dense_width;
    float acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t j0 = b * kQ8Block, n = std::min<int64_t>(kQ8Block, p.k - j0);
      int32_t w[kQ8Block] = {};  // in q8_slot order, as x is staged
      for (int t = 0; t < n; ++t) {
        const uint32_t id = spqmm_dense_id(code, j0 + t, p.bits);
        max_id = std::max(max_id, id);
        w[q8_slot(t)] = table[id];
      }
      const float gs = spqmm_group_scale(p, r, j0);  // 1 without group scales
      for (int m = 0; m < MB; ++m) {
        const int16_t* xb = xq + m * ldq + j0;
        int32_t dot = 0;
        for (int t = 0; t < kQ8Block; ++t) dot += int32_t(xb[t]) * w[t];
        acc[m] += float(dot) * (xs[m * blocks + b] * gs);
      }
    }
    const float bv = bias ? bias[r] : 0.f;
    for (int m = 0; m < mvalid; ++m) y[m * ldy + r] = acc[m] * wscale + bv;
  }
  seen->max_id = std::max(seen->max_id, max_id);
}
}  // namespace dcx
