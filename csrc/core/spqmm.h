// spqmm on the CPU, torch-free: y = x W^T + bias with W kept packed and its codebook ids decoded
// on the fly. The packed layout (built by dcx.nn.pack, read by the CPU and CUDA kernels):
//
//   bits b in [1, 8]; codebook of k <= 2^b entries; tile width T = 2^(16 - b) columns;
//   S = ceil(K / T) tiles per row; segment s = row * S + tile.
//   sparse mode:
//     codes   int16 [nnz]  each a uint16 (column - tile * T) << b | id: a fixed-width 16-bit field,
//                          decoded with one shift and one mask (no prefix sum); the entries of a
//                          row come in tile order, segment after segment.
//     seg_ptr int32 [N*S+1] segment s is codes[seg_ptr[s] : seg_ptr[s+1]].
//     chunks  int32 [C+1]   segment boundaries of C work items of about equal non-zeros (plus a
//                          cost per segment), so one dense row does not stall the others: a row
//                          may be split between chunks and its partial sums are added at the end.
//     At 10% density and 5 bits: 0.2 bytes per original weight (dense fp32: 4, CSR fp32 + int32:
//     0.8), and the x tile an entry points into is at most 2^(16-b) floats.
//   dense mode (layers kept at, or near, full density): codes uint8 [N, K], one id per weight, no
//     positions (1 byte per weight, 4x fewer than fp32); seg_ptr and chunks are empty.
//
// Safety without per-element branches: the codebook is read through a 256-entry table (ids >= k
// read a zero) and x through a buffer padded with zeros to S * T columns, so any 16-bit entry
// reads in bounds; the kernels keep a running maximum of the ids and columns they saw (one vector
// max per 16 entries) and the op reports corrupted data after the pass. The pointers (seg_ptr,
// chunks) are checked before it (O(N * S)).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "core/common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#include <immintrin.h>
#define DCX_SPQMM_AVX512 1
#define DCX_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#endif

// Batched loops vectorise over the batch columns; compiled for AVX-512, AVX2 and the baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    !defined(__SANITIZE_ADDRESS__)
#define DCX_SPQMM_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DCX_SPQMM_MULTIVERSION
#endif

namespace dcx {

constexpr int kSpqmmTable = 256;  // codebook table size: every 8-bit id reads in bounds

struct SpqmmPacked {
  const uint16_t* codes = nullptr;       // sparse mode entries
  const uint8_t* dense_codes = nullptr;  // dense mode ids [n, k]
  const int32_t* seg_ptr = nullptr;
  const int32_t* chunks = nullptr;
  int64_t num_chunks = 0;
  int64_t nnz = 0;
  int64_t n = 0;  // out_features
  int64_t k = 0;  // in_features
  int64_t tiles = 0;
  int bits = 8;
  bool dense = false;  // dense mode (codes only); an empty layer's pointers may all be null
};

inline int64_t spqmm_tiles(int64_t k, int bits) {
  const int64_t t = int64_t(1) << (16 - bits);
  return (k + t - 1) / t;
}

// Pointer checks for sparse mode, O(N * S + C): nullptr when the structure is sound.
inline const char* spqmm_check_structure(const SpqmmPacked& p) {
  const int64_t nseg = p.n * p.tiles;
  if (p.seg_ptr[0] != 0) return "seg_ptr[0] must be 0";
  for (int64_t s = 0; s < nseg; ++s) {
    if (p.seg_ptr[s + 1] < p.seg_ptr[s]) return "seg_ptr must be non-decreasing";
  }
  if (p.seg_ptr[nseg] != p.nnz) return "seg_ptr[-1] must equal the number of codes";
  if (p.chunks[0] != 0) return "chunks[0] must be 0";
  for (int64_t c = 0; c < p.num_chunks; ++c) {
    if (p.chunks[c + 1] < p.chunks[c]) return "chunks must be non-decreasing";
  }
  if (p.chunks[p.num_chunks] != nseg) return "chunks[-1] must equal out_features * tiles";
  return nullptr;
}

// What a pass saw: the largest id and column (the op compares them with k and K).
struct SpqmmSeen {
  uint32_t max_id = 0;
  int64_t max_col = -1;
  void merge(const SpqmmSeen& o) {
    max_id = std::max(max_id, o.max_id);
    max_col = std::max(max_col, o.max_col);
  }
};

// Partial sums of the (at most two) rows a chunk shares with its neighbours.
struct SpqmmEdge {
  int64_t row[2] = {-1, -1};
};

// Walks the segments of chunk c, calling seg(s, column_base, acc) for each, and flushes a row's
// MB sums when it ends: rows wholly inside the chunk go to y (+ bias), shared rows to `edge`
// (slot 0: the row that began before the chunk, slot 1: the row that goes on after it).
template <int MB, typename SegFn>
inline void spqmm_walk_chunk(const SpqmmPacked& p, int64_t c, const float* bias, float* y,
                             int64_t ldy, int mvalid, float* edge_sums, SpqmmEdge* edge,
                             SegFn&& seg) {
  const int64_t s0 = p.chunks[c], s1 = p.chunks[c + 1];
  if (s0 >= s1) return;
  const int64_t S = p.tiles;
  const int64_t T = int64_t(1) << (16 - p.bits);
  float acc[MB];
  int64_t row = s0 / S;
  for (int m = 0; m < MB; ++m) acc[m] = 0.f;
  auto flush = [&](int64_t r) {
    const bool starts_inside = r * S >= s0, ends_inside = (r + 1) * S <= s1;
    if (starts_inside && ends_inside) {
      const float b = bias ? bias[r] : 0.f;
      for (int m = 0; m < mvalid; ++m) y[m * ldy + r] = acc[m] + b;
    } else {
      const int slot = starts_inside ? 1 : 0;
      edge->row[slot] = r;
      for (int m = 0; m < MB; ++m) edge_sums[slot * MB + m] = acc[m];
    }
    for (int m = 0; m < MB; ++m) acc[m] = 0.f;
  };
  int64_t tile = s0 - row * S;
  for (int64_t s = s0; s < s1; ++s) {
    if (tile == S) {
      flush(row);
      ++row;
      tile = 0;
    }
    seg(s, tile * T, acc);
    ++tile;
  }
  flush(row);
}

// Generic kernel (any machine): sparse chunk with MB batch columns; xt is [S*T][MB] floats.
template <int MB>
DCX_SPQMM_MULTIVERSION void spqmm_sparse_chunk(const SpqmmPacked& p, int64_t c,
                                               const float* __restrict table,
                                               const float* __restrict xt, const float* bias,
                                               float* y, int64_t ldy, int mvalid, float* edge_sums,
                                               SpqmmEdge* edge, SpqmmSeen* seen) {
  const uint32_t idmask = (1u << p.bits) - 1;
  const int bits = p.bits;
  uint32_t max_id = 0;
  int64_t max_col = -1;
  spqmm_walk_chunk<MB>(p, c, bias, y, ldy, mvalid, edge_sums, edge,
                       [&](int64_t s, int64_t base, float* acc) {
                         const int32_t lo = p.seg_ptr[s], hi = p.seg_ptr[s + 1];
                         uint32_t seg_max_off = 0;
                         float a[MB];
                         for (int m = 0; m < MB; ++m) a[m] = 0.f;
                         for (int32_t e = lo; e < hi; ++e) {
                           const uint32_t v = p.codes[e];
                           const uint32_t id = v & idmask, off = v >> bits;
                           max_id = std::max(max_id, id);
                           seg_max_off = std::max(seg_max_off, off);
                           const float w = table[id];
                           const float* xr = xt + (base + off) * MB;
                           for (int m = 0; m < MB; ++m) a[m] += w * xr[m];
                         }
                         if (hi > lo) max_col = std::max(max_col, base + int64_t(seg_max_off));
                         for (int m = 0; m < MB; ++m) acc[m] += a[m];
                       });
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
    const uint8_t* code = p.dense_codes + r * p.k;
    float a[MB];
    for (int m = 0; m < MB; ++m) a[m] = 0.f;
    uint8_t row_max = 0;
    for (int64_t j = 0; j < p.k; ++j) {
      row_max = std::max(row_max, code[j]);
      const float w = table[code[j]];
      for (int m = 0; m < MB; ++m) a[m] += w * xt[j * MB + m];
    }
    max_id = std::max<uint32_t>(max_id, row_max);
    const float b = bias ? bias[r] : 0.f;
    for (int m = 0; m < mvalid; ++m) y[m * ldy + r] = a[m] + b;
  }
  seen->max_id = std::max(seen->max_id, max_id);
}

// Decode rows [r0, r1) of W into w ([r1 - r0, k] floats), for the BLAS past the crossover; the
// block is zeroed here. Columns are clamped to K - 1 (a corrupted entry is reported, never
// written out of bounds).
inline void spqmm_decode_rows(const SpqmmPacked& p, int64_t r0, int64_t r1, const float* table,
                              float* w, SpqmmSeen* seen) {
  if (p.dense) {
    uint8_t max_id = 0;
    const uint8_t* code = p.dense_codes + r0 * p.k;
    for (int64_t i = 0; i < (r1 - r0) * p.k; ++i) {
      max_id = std::max(max_id, code[i]);
      w[i] = table[code[i]];
    }
    seen->max_id = std::max<uint32_t>(seen->max_id, max_id);
    return;
  }
  std::fill(w, w + (r1 - r0) * p.k, 0.f);
  const uint32_t idmask = (1u << p.bits) - 1;
  const int64_t T = int64_t(1) << (16 - p.bits);
  for (int64_t s = r0 * p.tiles; s < r1 * p.tiles; ++s) {
    const int64_t row = s / p.tiles - r0, base = (s % p.tiles) * T;
    for (int32_t e = p.seg_ptr[s]; e < p.seg_ptr[s + 1]; ++e) {
      const uint32_t v = p.codes[e];
      const uint32_t id = v & idmask;
      const int64_t col = base + (v >> p.bits);
      seen->max_id = std::max(seen->max_id, id);
      seen->max_col = std::max(seen->max_col, col);
      w[row * p.k + std::min(col, p.k - 1)] = table[id];
    }
  }
}

#ifdef DCX_SPQMM_AVX512
// Batch-1 kernels with AVX-512: 16 entries per step. Codebook lookups are register permutes
// (<= 16 entries: one vpermps; 32: one vpermi2ps; 64, 128, 256: 2, 4, 8 of them and a tree of
// blends on the id's high bits), never a gather (on Zen 4 a table gather costs more than the
// 8-permute tree); x is gathered from the padded, cache-resident buffer.
namespace avx512 {

enum class Lut { k16, k32, k64, k128, k256 };

inline Lut lut_kind(int bits) {
  return bits <= 4 ? Lut::k16 : bits == 5 ? Lut::k32 : bits == 6 ? Lut::k64 : bits == 7 ? Lut::k128 : Lut::k256;
}

struct Table {
  __m512 t[16];
};

DCX_AVX512_FN inline Table load_table(const float* table) {
  Table t;
  for (int i = 0; i < 16; ++i) t.t[i] = _mm512_loadu_ps(table + 16 * i);
  return t;
}

// Entries [32 * j, 32 * j + 32) for the low 5 bits of id, for each pair j of table vectors.
template <int Pairs>
DCX_AVX512_FN inline __m512 lookup_tree(const Table& t, __m512i id) {
  __m512 v[Pairs];
  for (int j = 0; j < Pairs; ++j) v[j] = _mm512_permutex2var_ps(t.t[2 * j], id, t.t[2 * j + 1]);
  for (int width = Pairs, bit = 32; width > 1; width /= 2, bit *= 2) {
    const __mmask16 high = _mm512_test_epi32_mask(id, _mm512_set1_epi32(bit));
    for (int j = 0; j < width / 2; ++j) v[j] = _mm512_mask_blend_ps(high, v[2 * j], v[2 * j + 1]);
  }
  return v[0];
}

template <Lut L>
DCX_AVX512_FN inline __m512 lookup(const Table& t, __m512i id) {
  if constexpr (L == Lut::k16) {
    return _mm512_permutexvar_ps(id, t.t[0]);
  } else if constexpr (L == Lut::k32) {
    return _mm512_permutex2var_ps(t.t[0], id, t.t[1]);
  } else if constexpr (L == Lut::k64) {
    return lookup_tree<2>(t, id);
  } else if constexpr (L == Lut::k128) {
    return lookup_tree<4>(t, id);
  } else {
    return lookup_tree<8>(t, id);
  }
}

DCX_AVX512_FN inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// kCheckIds: the codebook has fewer than 2^bits entries, so an id may lie outside it and the
// running maximum of ids is kept; with a full codebook no id can. Columns can only pass K in a
// row's last tile: only there is the maximum offset reduced.
template <Lut L, bool kCheckIds>
DCX_AVX512_FN void sparse_chunk(const SpqmmPacked& p, int64_t c, const float* table,
                                const float* xt, const float* bias, float* y, int64_t ldy,
                                float* edge_sums, SpqmmEdge* edge, SpqmmSeen* seen) {
  const Table tab = load_table(table);
  const __m512i idmask = _mm512_set1_epi32((1 << p.bits) - 1);
  const __m128i shift = _mm_cvtsi32_si128(p.bits);
  const int64_t tile_w = int64_t(1) << (16 - p.bits);
  __m512i max_id = _mm512_setzero_si512();
  int64_t max_col = -1;
  // Vector sums run over a row's segments; one horizontal add per row (or chunk end), not per
  // segment: at 8 bits a segment spans only 256 columns.
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  const int64_t s_end = p.chunks[c + 1];
  spqmm_walk_chunk<1>(p, c, bias, y, ldy, 1, edge_sums, edge,
                      [&](int64_t s, int64_t base, float* acc) DCX_AVX512_FN {
    const uint16_t* e = p.codes + p.seg_ptr[s];
    const int64_t n = p.seg_ptr[s + 1] - p.seg_ptr[s];
    const float* xb = xt + base;  // the tile's x: gathers take the offsets as they are
    __m512i max_off = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      const __m512i v0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(e + i)));
      const __m512i v1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(e + i + 16)));
      const __m512i id0 = _mm512_and_si512(v0, idmask), id1 = _mm512_and_si512(v1, idmask);
      const __m512i off0 = _mm512_srl_epi32(v0, shift), off1 = _mm512_srl_epi32(v1, shift);
      if (kCheckIds) max_id = _mm512_max_epu32(max_id, _mm512_max_epu32(id0, id1));
      max_off = _mm512_max_epu32(max_off, _mm512_max_epu32(off0, off1));
      a0 = _mm512_fmadd_ps(lookup<L>(tab, id0), _mm512_i32gather_ps(off0, xb, 4), a0);
      a1 = _mm512_fmadd_ps(lookup<L>(tab, id1), _mm512_i32gather_ps(off1, xb, 4), a1);
    }
    for (; i < n; i += 16) {
      const __mmask16 m = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
      const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, e + i));
      const __m512i id = _mm512_and_si512(v, idmask);
      const __m512i off = _mm512_srl_epi32(v, shift);
      if (kCheckIds) max_id = _mm512_max_epu32(max_id, id);
      max_off = _mm512_max_epu32(max_off, off);  // masked-off lanes loaded 0
      const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, off, xb, 4);
      a0 = _mm512_fmadd_ps(lookup<L>(tab, id), xv, a0);
    }
    if (n > 0 && base + tile_w > p.k) {
      max_col = std::max<int64_t>(max_col, base + _mm512_reduce_max_epu32(max_off));
    }
    if ((s + 1) % p.tiles == 0 || s + 1 == s_end) {
      acc[0] += hsum(_mm512_add_ps(a0, a1));
      a0 = a1 = _mm512_setzero_ps();
    }
  });
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
  seen->max_col = std::max<int64_t>(seen->max_col, max_col);
}

template <Lut L>
DCX_AVX512_FN void dense_rows(const SpqmmPacked& p, int64_t r0, int64_t r1, const float* table,
                              const float* x, const float* bias, float* y, SpqmmSeen* seen) {
  const Table tab = load_table(table);
  const int64_t K = p.k;
  __m128i max_id = _mm_setzero_si128();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* code = p.dense_codes + r * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= K; j += 32) {
      const __m128i c0 = _mm_loadu_si128((const __m128i*)(code + j));
      const __m128i c1 = _mm_loadu_si128((const __m128i*)(code + j + 16));
      max_id = _mm_max_epu8(max_id, _mm_max_epu8(c0, c1));
      a0 = _mm512_fmadd_ps(lookup<L>(tab, _mm512_cvtepu8_epi32(c0)), _mm512_loadu_ps(x + j), a0);
      a1 = _mm512_fmadd_ps(lookup<L>(tab, _mm512_cvtepu8_epi32(c1)), _mm512_loadu_ps(x + j + 16),
                           a1);
    }
    for (; j < K; j += 16) {
      const __mmask16 m = K - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - j)) - 1);
      const __m128i c = _mm_maskz_loadu_epi8(m, code + j);
      max_id = _mm_max_epu8(max_id, c);
      a0 = _mm512_fmadd_ps(lookup<L>(tab, _mm512_cvtepu8_epi32(c)), _mm512_maskz_loadu_ps(m, x + j),
                           a0);
    }
    y[r] = hsum(_mm512_add_ps(a0, a1)) + (bias ? bias[r] : 0.f);
  }
  alignas(16) uint8_t lanes[16];
  _mm_store_si128((__m128i*)lanes, max_id);
  seen->max_id = std::max<uint32_t>(seen->max_id, *std::max_element(lanes, lanes + 16));
}

// Dense mode decode of rows [r0, r1) into w: 16 ids per step through the register table.
template <Lut L>
DCX_AVX512_FN void dense_decode_rows(const SpqmmPacked& p, int64_t r0, int64_t r1,
                                     const float* table, float* w, SpqmmSeen* seen) {
  const Table tab = load_table(table);
  const uint8_t* code = p.dense_codes + r0 * p.k;
  const int64_t count = (r1 - r0) * p.k;
  __m128i max_id = _mm_setzero_si128();
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 m = count - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (count - i)) - 1);
    const __m128i c = _mm_maskz_loadu_epi8(m, code + i);
    max_id = _mm_max_epu8(max_id, c);
    _mm512_mask_storeu_ps(w + i, m, lookup<L>(tab, _mm512_cvtepu8_epi32(c)));
  }
  alignas(16) uint8_t lanes[16];
  _mm_store_si128((__m128i*)lanes, max_id);
  seen->max_id = std::max<uint32_t>(seen->max_id, *std::max_element(lanes, lanes + 16));
}

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

}  // namespace avx512
#endif  // DCX_SPQMM_AVX512

}  // namespace dcx
