// spqmm on the CPU, torch-free: y = x W^T + bias with W kept packed and its codebook ids decoded
// on the fly. The packed layout (built by dcx.packing.pack, read by the CPU and CUDA kernels):
//
//   Rows are taken 16 at a time: group g holds rows [16 g, 16 g + 16) (the last one may be
//   partial; its missing rows are padding). A group is a sequence of steps; a step holds one slot
//   per row of the group (lane i = row 16 g + i) and one window, the column where a 32-column
//   window of x begins: every live slot of the step reads x[window + offset], offset < 32.
//     codes     int16 [steps, 16]  slot = live << 15 | offset << 8 | id as a uint16: live 1 for a
//                                  weight, 0 for padding (all 16 bits 0); offset in [0, 32); id
//                                  in [0, 256) a codebook index; bits 13 and 14 are 0.
//     windows   int32 [steps]      first column of each step's window; window + offset < K for
//                                  every live slot.
//     group_ptr int32 [G + 1]      G = ceil(N / 16); group g is steps [group_ptr[g], group_ptr[g+1]).
//     chunks    int32 [C + 1]      step boundaries of C work items of about equal size, so one
//                                  dense row does not stall the others: a group may be split
//                                  between chunks and its partial sums are added at the end.
//   The packer fills steps greedily: a step's window begins at the smallest next column of the
//   group's rows, and each row puts its next weight in the step if it lies within the window.
//   A lane therefore always accumulates the same row (no reduction across lanes), and x is read as
//   a 32-float window (two vector loads and a register permute on the CPU, shared memory on a GPU)
//   instead of a gather per weight. At 10% density about 70% of the slots are live: 2.9 bytes per
//   non-zero, 0.29 per original weight (dense fp32: 4, CSR fp32 + int32: 0.8).
//   dense mode (layers kept at, or near, full density): codes uint8 [N, width], the ids only, no
//     positions, at about bits / 8 bytes per weight (4-bit ids two per byte, 5 to 7-bit ids
//     bit-packed, 8-bit one per byte: a 6-bit layer reads 0.75 byte per weight, 5.3x fewer than
//     fp32); the three layouts are at the end of core/spqmm_layout.h. windows, group_ptr and
//     chunks are empty.
//
// Safety without per-element branches: the codebook is read through a zero-padded table (ids >= k
// read a zero) and x through a buffer padded with 32 zeros past K, windows are clamped to K before
// they are read, so any slot reads in bounds; the kernels keep a running maximum of the ids and
// windows they saw, look at the offsets of the few steps whose window reaches past K, and the op
// reports corrupted data after the pass. The pointers (group_ptr, chunks) are checked before it
// (O(G + C)).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/common.h"
#include "core/spqmm_int8.h"
#include "core/spqmm_layout.h"

// DCX_SPQMM_AVX512: the AVX-512 kernels are compiled (for the CPUs that have it, chosen at run
// time), DCX_SPQMM_AVX2 likewise. With DCX_AVX512_EMULATE (the native tests) the AVX-512 kernels
// are compiled against plain-C++ intrinsics (csrc/tests/avx512_emu.h) and run on any CPU.
#if defined(DCX_AVX512_EMULATE)
#include <cmath>
#define DCX_SPQMM_AVX512 1
#define DCX_AVX512_FN
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DCX_SPQMM_AVX2 1
#define DCX_AVX2_FN __attribute__((target("avx2,fma")))
#endif
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__)
#include <immintrin.h>
#define DCX_SPQMM_AVX512 1
#define DCX_SPQMM_AVX2 1
#define DCX_AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define DCX_AVX2_FN __attribute__((target("avx2,fma")))
#endif

// Batched loops vectorise over the batch columns; compiled for AVX-512, AVX2 and the baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    !defined(__SANITIZE_ADDRESS__)
#define DCX_SPQMM_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DCX_SPQMM_MULTIVERSION
#endif

// The chunk walker is inlined into each kernel, so the kernel's per-step lambda (compiled for its
// own target) is inlined too and its accumulators stay in registers.
#if defined(__GNUC__)
#define DCX_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define DCX_ALWAYS_INLINE inline
#endif

namespace dcx {

// Codebook table: ids [0, 256) then 256 zeros that padding slots read (id | 256 when not live),
// so the portable kernel needs no branch on the live bit.

struct SpqmmPacked {
  const uint16_t* codes = nullptr;       // sparse mode slots [steps][16]
  const uint8_t* dense_codes = nullptr;  // dense mode ids [n, dense_width]
  const int32_t* windows = nullptr;
  const int32_t* group_ptr = nullptr;
  const int32_t* chunks = nullptr;
  int64_t num_chunks = 0;
  int64_t steps = 0;
  int64_t groups = 0;
  int64_t n = 0;  // out_features
  int64_t k = 0;  // in_features
  int bits = 8;
  bool dense = false;  // dense mode (codes only); an empty layer's pointers may all be null
  SpqmmDense layout = SpqmmDense::kBytes;  // dense mode's layout (core/spqmm_layout.h)
  int64_t dense_width = 0;  // bytes per row in dense mode
};

inline int64_t spqmm_groups(int64_t n) { return (n + kSpqmmRows - 1) / kSpqmmRows; }

// Columns of the staged x: K, then zeros so that a window clamped to K reads in bounds.
inline int64_t spqmm_x_stride(int64_t k) { return (k + kSpqmmWindow + 15) / 16 * 16; }

// Pointer checks for sparse mode, O(G + C): nullptr when the structure is sound.
inline const char* spqmm_check_structure(const SpqmmPacked& p) {
  if (p.group_ptr[0] != 0) return "group_ptr[0] must be 0";
  for (int64_t g = 0; g < p.groups; ++g) {
    if (p.group_ptr[g + 1] < p.group_ptr[g]) return "group_ptr must be non-decreasing";
  }
  if (p.group_ptr[p.groups] != p.steps) return "group_ptr[-1] must equal the number of steps";
  if (p.chunks[0] != 0) return "chunks[0] must be 0";
  for (int64_t c = 0; c < p.num_chunks; ++c) {
    if (p.chunks[c + 1] < p.chunks[c]) return "chunks must be non-decreasing";
  }
  if (p.chunks[p.num_chunks] != p.steps) return "chunks[-1] must equal the number of steps";
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

// A step's window clamped to K (a negative one too: it is compared as unsigned), so that its 32
// columns lie in the staged x; the unclamped value goes to the running maximum.
inline int64_t spqmm_window(const SpqmmPacked& p, int64_t s, int64_t* max_col) {
  const uint32_t w = static_cast<uint32_t>(p.windows[s]);
  *max_col = std::max<int64_t>(*max_col, w);
  return std::min<int64_t>(w, p.k);
}

// Partial sums of the (at most two) groups a chunk shares with its neighbours: slot 0 the group
// that began before the chunk, slot 1 the group that goes on after it.
struct SpqmmEdge {
  int64_t group[2] = {-1, -1};
};

// Walks the steps of chunk c: step(s) for each, flush(g, slot) when group g ends inside the chunk
// or the chunk ends; slot is -1 when the chunk holds the whole group (its sums go to y, which
// holds the bias), else the edge slot its partial sums go to.
template <typename StepFn, typename FlushFn>
DCX_ALWAYS_INLINE void spqmm_walk_chunk(const SpqmmPacked& p, int64_t c, StepFn&& step, FlushFn&& flush) {
  const int64_t s0 = p.chunks[c], s1 = p.chunks[c + 1];
  if (s0 >= s1) return;
  // The group holding step s0: the last g with group_ptr[g] <= s0 (empty groups are skipped).
  int64_t g = std::upper_bound(p.group_ptr, p.group_ptr + p.groups + 1, int32_t(s0)) - p.group_ptr - 1;
  auto slot = [&](int64_t grp) {
    if (p.group_ptr[grp] < s0) return 0;
    return p.group_ptr[grp + 1] > s1 ? 1 : -1;
  };
  int64_t end = p.group_ptr[g + 1];
  for (int64_t s = s0; s < s1; ++s) {
    if (s == end) {
      flush(g, slot(g));
      do {
        ++g;
      } while (p.group_ptr[g + 1] <= s);
      end = p.group_ptr[g + 1];
    }
    step(s);
  }
  flush(g, slot(g));
}

// Adds a group's sums acc[m][lane] to y (rows past n are padding) or stores them in its edge.
template <int MB>
inline void spqmm_flush(const SpqmmPacked& p, int64_t g, int slot, const float (*acc)[kSpqmmRows],
                        float* y, int64_t ldy, int mvalid, float* edge_sums, SpqmmEdge* edge) {
  const int64_t r0 = g * kSpqmmRows;
  const int lanes = static_cast<int>(std::min<int64_t>(kSpqmmRows, p.n - r0));
  if (slot < 0) {
    for (int m = 0; m < mvalid; ++m)
      for (int i = 0; i < lanes; ++i) y[m * ldy + r0 + i] += acc[m][i];
  } else {
    edge->group[slot] = g;
    std::memcpy(edge_sums + slot * MB * kSpqmmRows, acc, sizeof(float) * MB * kSpqmmRows);
  }
}

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
  auto step = [&](int64_t s) {
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
      const float w = table[id];
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
    uint32_t max_id = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* code = p.dense_codes + r * p.dense_width;
      for (int64_t j = 0; j < p.k; ++j) {
        const uint32_t id = spqmm_dense_id(code, j, p.bits);
        max_id = std::max(max_id, id);
        w[(r - r0) * p.k + j] = table[id];
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
        if (row >= r0 && row < r1 && col < p.k) w[(row - r0) * p.k + col] = table[v & kSpqmmIdMask];
      }
    }
  }
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
      for (int m = 0; m < MB; ++m) {
        const int16_t* xb = xq + m * ldq + j0;
        int32_t dot = 0;
        for (int t = 0; t < kQ8Block; ++t) dot += int32_t(xb[t]) * w[t];
        acc[m] += float(dot) * xs[m * blocks + b];
      }
    }
    const float bv = bias ? bias[r] : 0.f;
    for (int m = 0; m < mvalid; ++m) y[m * ldy + r] = acc[m] * wscale + bv;
  }
  seen->max_id = std::max(seen->max_id, max_id);
}

#ifdef DCX_SPQMM_AVX512
// Kernels with AVX-512: 16 slots per step. Codebook lookups are register permutes (<= 16
// entries: one vpermps; 32: one vpermi2ps; 64, 128, 256: 2, 4, 8 of them and a tree of blends on
// the id's high bits), and so is the x lookup in the step's window: never a gather (on Zen 4 a
// 16-lane gather costs about 20 cycles, a permute 1 or 2).
namespace avx512 {

#ifdef DCX_AVX512_EMULATE
#include "tests/avx512_emu.h"
#endif

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

// Sparse chunk with MB batch columns (xs [MB][ldx], y [MB][ldy] holding the bias): per step, one
// 32-byte load of the 16 slots, the weights by register lookup, and per batch column the window
// of x by two loads and one permute; lane i accumulates row 16 g + i all along.
template <Lut L, int MB>
DCX_AVX512_FN void sparse_chunk(const SpqmmPacked& p, int64_t c, const float* table,
                                const float* xs, int64_t ldx, float* y, int64_t ldy, int mvalid,
                                float* edge_sums, SpqmmEdge* edge, SpqmmSeen* seen) {
  const Table tab = load_table(table);
  const __m512i live_bit = _mm512_set1_epi32(kSpqmmLive), id_mask = _mm512_set1_epi32(kSpqmmIdMask);
  __m512i max_id = _mm512_setzero_si512();
  int64_t max_col = -1;
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  auto step = [&](int64_t s) DCX_AVX512_FN {
    // Prefetch the codes 64 steps (2 KB, past the chunk's end too: the thread's next chunk
    // usually follows) and the windows 256 steps ahead: the steps themselves are too short for the
    // out-of-order window to hide a memory latency (measured: 1.4x at 2 threads on Zen 4).
    if ((s & 1) == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(p.codes + std::min(s + 64, p.steps - 1) * kSpqmmRows),
                   _MM_HINT_T0);
      if ((s & 15) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(p.windows + std::min(s + 256, p.steps - 1)),
                     _MM_HINT_T0);
    }
    const int64_t j0 = spqmm_window(p, s, &max_col);
    const __m512i v =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(p.codes + s * kSpqmmRows)));
    const __mmask16 live = _mm512_test_epi32_mask(v, live_bit);
    max_id = _mm512_max_epu32(max_id, _mm512_and_si512(v, id_mask));
    const __m512 w = _mm512_maskz_mov_ps(live, lookup<L>(tab, v));  // lookups use the id's bits
    const __m512i off = _mm512_srli_epi32(v, 8);  // the permute reads its low 5 bits
    if (j0 + kSpqmmWindow > p.k) {  // only here can a live slot point past K
      const __m512i o = _mm512_and_si512(off, _mm512_set1_epi32(kSpqmmWindow - 1));
      if (live) max_col = std::max<int64_t>(max_col, j0 + _mm512_mask_reduce_max_epu32(live, o));
    }
    for (int m = 0; m < MB; ++m) {
      const float* xw = xs + m * ldx + j0;
      const __m512 xv = _mm512_permutex2var_ps(_mm512_loadu_ps(xw), off, _mm512_loadu_ps(xw + 16));
      acc[m] = _mm512_fmadd_ps(w, xv, acc[m]);
    }
  };
  auto flush = [&](int64_t g, int slot) DCX_AVX512_FN {
    alignas(64) float sums[MB][kSpqmmRows];
    for (int m = 0; m < MB; ++m) {
      _mm512_store_ps(sums[m], acc[m]);
      acc[m] = _mm512_setzero_ps();
    }
    spqmm_flush<MB>(p, g, slot, sums, y, ldy, mvalid, edge_sums, edge);
  };
  spqmm_walk_chunk(p, c, step, flush);
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
  seen->max_col = std::max<int64_t>(seen->max_col, max_col);
}

// Lanes of the 16 elements from j that lie below k.
DCX_AVX512_FN inline __mmask16 tail_mask(int64_t k, int64_t j) {
  return k - j >= 16 ? __mmask16(0xFFFF) : k <= j ? __mmask16(0) : __mmask16((1u << (k - j)) - 1);
}

// Dense mode: every layout (core/spqmm_layout.h) read 16 consecutive columns at a time, as one
// vector of 16 ids: nibbles by a shift and a mask of their 64-byte block (whose 32-bit lane d
// holds columns 16 t + d in nibble t); bit-packed ids by one masked load of the 2 * bits bytes
// that hold 16 ids, broadcast to the four 128-bit lanes, a byte shuffle putting each id's bytes
// in its own 32-bit lane, a variable shift and a mask (AVX-512BW, no VBMI); bytes by a widening
// load. Columns past K get id 0 and read x as 0: padding is never read as a weight, nor checked.
DCX_AVX512_FN inline __m512i nibble_ids(__m512i block, int t) {
  return _mm512_and_si512(_mm512_srl_epi32(block, _mm_cvtsi32_si128(4 * t)), _mm512_set1_epi32(15));
}

// Constants of the bit-packed reader for ids of `bits` bits.
struct BitIds {
  __m512i shuffle, shift, mask;
  __mmask16 load;  // the 2 * bits bytes of 16 ids
  int bits = 8;
};

DCX_AVX512_FN inline BitIds bit_ids_setup(int bits) {
  BitIds b;
  alignas(64) int8_t shuffle[64];
  alignas(64) int32_t shift[16];
  for (int i = 0; i < 16; ++i) {
    const int bit = i * bits, byte = bit >> 3;
    shift[i] = bit & 7;
    for (int t = 0; t < 4; ++t) shuffle[4 * i + t] = byte + t < 2 * bits ? int8_t(byte + t) : int8_t(-128);
  }
  b.shuffle = _mm512_load_si512(shuffle);
  b.shift = _mm512_load_si512(shift);
  b.mask = _mm512_set1_epi32((1 << bits) - 1);
  b.load = __mmask16((1u << (2 * bits)) - 1);
  b.bits = bits;
  return b;
}

DCX_AVX512_FN inline __m512i bit_ids(const uint8_t* chunk, const BitIds& b) {
  const __m512i bytes = _mm512_broadcast_i32x4(_mm_maskz_loadu_epi8(b.load, chunk));
  return _mm512_and_si512(_mm512_srlv_epi32(_mm512_shuffle_epi8(bytes, b.shuffle), b.shift), b.mask);
}

// Columns per block of layout D; the ids of columns [cols * blk + 16 t, + 16) of a row.
template <SpqmmDense D>
constexpr int kBlockCols = D == SpqmmDense::kNibbles ? kSpqmmNibbleBlock : kSpqmmBitBlock;

template <SpqmmDense D>
DCX_AVX512_FN inline __m512i ids16(const uint8_t* row, int64_t blk, int t, const BitIds& b,
                                   __mmask16 valid) {
  if constexpr (D == SpqmmDense::kNibbles) {
    return nibble_ids(_mm512_loadu_si512(row + (kSpqmmNibbleBlock / 2) * blk), t);
  } else if constexpr (D == SpqmmDense::kBits) {
    return bit_ids(row + blk * (kSpqmmBitBlock / 8) * b.bits + t * 2 * b.bits, b);
  } else {  // rows are not padded: a masked load, so the last row's tail is not read
    return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(valid, row + kSpqmmBitBlock * blk + 16 * t));
  }
}

// Dense rows [r0, r1) for MB batch rows of x ([MB][ldx], zero past the valid ones): each weight
// is decoded once (16 at a time, a register lookup) and applied to every batch row; at MB = 1 four
// accumulators in turn keep four FMAs in flight.
template <Lut L, SpqmmDense D, int MB>
DCX_AVX512_FN void dense_rows(const SpqmmPacked& p, int64_t r0, int64_t r1, const float* table,
                              const float* x, int64_t ldx, int mvalid, const float* bias,
                              float* y, int64_t ldy, SpqmmSeen* seen) {
  constexpr int kAcc = MB >= 4 ? 1 : 4 / MB;
  constexpr int kCols = kBlockCols<D>, kT = kCols / 16;
  const Table tab = load_table(table);
  const BitIds bi = bit_ids_setup(D == SpqmmDense::kBits ? p.bits : 8);
  const int64_t K = p.k, blocks = (K + kCols - 1) / kCols;
  __m512i max_id = _mm512_setzero_si512();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.dense_codes + r * p.dense_width;
    __m512 acc[MB][kAcc];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < kAcc; ++a) acc[m][a] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const bool whole = kCols * (blk + 1) <= K;
#pragma GCC unroll 8
      for (int t = 0; t < kT; ++t) {
        const int64_t j = kCols * blk + 16 * t;
        const __mmask16 valid = whole ? __mmask16(0xFFFF) : tail_mask(K, j);
        __m512i id = ids16<D>(row, blk, t, bi, valid);
        if (!whole) id = _mm512_maskz_mov_epi32(valid, id);
        max_id = _mm512_max_epu32(max_id, id);
        const __m512 w = lookup<L>(tab, id);
        for (int m = 0; m < MB; ++m) {
          const __m512 xv = whole ? _mm512_loadu_ps(x + m * ldx + j)
                                  : _mm512_maskz_loadu_ps(valid, x + m * ldx + j);
          acc[m][t % kAcc] = _mm512_fmadd_ps(w, xv, acc[m][t % kAcc]);
        }
      }
    }
    const float b = bias ? bias[r] : 0.f;
    for (int m = 0; m < mvalid; ++m) {
      __m512 sum = acc[m][0];
      for (int a = 1; a < kAcc; ++a) sum = _mm512_add_ps(sum, acc[m][a]);
      y[m * ldy + r] = hsum(sum) + b;
    }
  }
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
}

// Dense decode of rows [r0, r1) into w ([r1 - r0, K] floats), 16 columns per lookup.
template <Lut L, SpqmmDense D>
DCX_AVX512_FN void dense_decode_rows(const SpqmmPacked& p, int64_t r0, int64_t r1,
                                     const float* table, float* w, SpqmmSeen* seen) {
  constexpr int kCols = kBlockCols<D>, kT = kCols / 16;
  const Table tab = load_table(table);
  const BitIds bi = bit_ids_setup(D == SpqmmDense::kBits ? p.bits : 8);
  const int64_t K = p.k, blocks = (K + kCols - 1) / kCols;
  __m512i max_id = _mm512_setzero_si512();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.dense_codes + r * p.dense_width;
    float* wr = w + (r - r0) * K;
    for (int64_t blk = 0; blk < blocks; ++blk) {
#pragma GCC unroll 8
      for (int t = 0; t < kT; ++t) {
        const int64_t j = kCols * blk + 16 * t;
        if (j >= K) break;
        const __mmask16 valid = tail_mask(K, j);
        const __m512i id = _mm512_maskz_mov_epi32(valid, ids16<D>(row, blk, t, bi, valid));
        max_id = _mm512_max_epu32(max_id, id);
        _mm512_mask_storeu_ps(wr + j, valid, lookup<L>(tab, id));
      }
    }
  }
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
}

// The kernel for a layer's lookup kind and layout: f<L, D>() called with the caller's arguments.
template <typename F>
DCX_AVX512_FN inline void with_dense_kind(const SpqmmPacked& p, F&& f) {
  auto by_layout = [&](auto lut) DCX_AVX512_FN {
    constexpr Lut L = decltype(lut)::value;
    switch (p.layout) {
      case SpqmmDense::kNibbles: f(std::integral_constant<Lut, L>(), std::integral_constant<SpqmmDense, SpqmmDense::kNibbles>()); break;
      case SpqmmDense::kBits: f(std::integral_constant<Lut, L>(), std::integral_constant<SpqmmDense, SpqmmDense::kBits>()); break;
      default: f(std::integral_constant<Lut, L>(), std::integral_constant<SpqmmDense, SpqmmDense::kBytes>()); break;
    }
  };
  switch (lut_kind(p.bits)) {
    case Lut::k16: by_layout(std::integral_constant<Lut, Lut::k16>()); break;
    case Lut::k32: by_layout(std::integral_constant<Lut, Lut::k32>()); break;
    case Lut::k64: by_layout(std::integral_constant<Lut, Lut::k64>()); break;
    case Lut::k128: by_layout(std::integral_constant<Lut, Lut::k128>()); break;
    case Lut::k256: by_layout(std::integral_constant<Lut, Lut::k256>()); break;
  }
}

inline bool supported() {
#ifdef DCX_AVX512_EMULATE
  return true;
#else
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#endif
}

}  // namespace avx512

#ifdef DCX_SPQMM_AVX2

// Batch-1 sparse kernel with AVX2 (machines without AVX-512): each step as two halves of 8
// lanes. A 32-entry table (the window of x, or a codebook of <= 32 entries) is held in 4 ymm
// registers and read with vpermps, which picks within each quarter by the index's low 3 bits,
// and two blends on bits 3 and 4; larger codebooks are gathered from the table, whose zero half
// serves padding slots.
namespace avx2 {

DCX_AVX2_FN inline __m256 lookup32(const __m256* t, __m256i idx) {
  const __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // to the sign bit
  const __m256 bit4 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27));
  const __m256 lo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[0], idx),
                                     _mm256_permutevar8x32_ps(t[1], idx), bit3);
  const __m256 hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(t[2], idx),
                                     _mm256_permutevar8x32_ps(t[3], idx), bit3);
  return _mm256_blendv_ps(lo, hi, bit4);
}

template <bool kSmallCodebook>
DCX_AVX2_FN void sparse_chunk(const SpqmmPacked& p, int64_t c, const float* table,
                              const float* xs, float* y, float* edge_sums, SpqmmEdge* edge,
                              SpqmmSeen* seen) {
  __m256 tab[4];
  for (int i = 0; i < 4; ++i) tab[i] = _mm256_loadu_ps(table + 8 * i);
  const __m256i id_mask = _mm256_set1_epi32(kSpqmmIdMask);
  __m256i max_id = _mm256_setzero_si256();
  int64_t max_col = -1;
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  auto step = [&](int64_t s) DCX_AVX2_FN {
    const int64_t j0 = spqmm_window(p, s, &max_col);
    __m256 xw[4];
    for (int i = 0; i < 4; ++i) xw[i] = _mm256_loadu_ps(xs + j0 + 8 * i);
    for (int h = 0; h < 2; ++h) {
      const __m256i v = _mm256_cvtepu16_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.codes + s * kSpqmmRows + 8 * h)));
      const __m256i id = _mm256_and_si256(v, id_mask);
      max_id = _mm256_max_epu32(max_id, id);
      __m256 w;
      if (kSmallCodebook) {  // padding slots: the live bit (15) moved to the sign bit selects 0
        const __m256 live = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        w = _mm256_blendv_ps(_mm256_setzero_ps(), lookup32(tab, v), live);
      } else {  // ids of padding slots read the zero half of the table
        const __m256i dead = _mm256_andnot_si256(_mm256_srli_epi32(v, 7), _mm256_set1_epi32(0x100));
        w = _mm256_i32gather_ps(table, _mm256_or_si256(id, dead), 4);
      }
      const __m256i off = _mm256_srli_epi32(v, 8);  // lookup32 reads bits 0-4
      acc[h] = _mm256_fmadd_ps(w, lookup32(xw, off), acc[h]);
      if (j0 + kSpqmmWindow > p.k) {  // only here can a live slot point past K
        alignas(32) uint32_t o[8], sv[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(o), off);
        _mm256_store_si256(reinterpret_cast<__m256i*>(sv), v);
        for (int i = 0; i < 8; ++i)
          if (sv[i] & kSpqmmLive) max_col = std::max<int64_t>(max_col, j0 + (o[i] & (kSpqmmWindow - 1)));
      }
    }
  };
  auto flush = [&](int64_t g, int slot) DCX_AVX2_FN {
    alignas(32) float sums[1][kSpqmmRows];
    _mm256_store_ps(sums[0], acc[0]);
    _mm256_store_ps(sums[0] + 8, acc[1]);
    acc[0] = acc[1] = _mm256_setzero_ps();
    spqmm_flush<1>(p, g, slot, sums, y, p.n, 1, edge_sums, edge);
  };
  spqmm_walk_chunk(p, c, step, flush);
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), max_id);
  seen->max_id = std::max(seen->max_id, *std::max_element(lanes, lanes + 8));
  seen->max_col = std::max(seen->max_col, max_col);
}

// Dense mode with AVX2 (CPUs without AVX-512), fp32 and int8 compute alike: 32 columns at a
// time. Their ids come as 32 bytes in column order (ids32): one load in the byte layout; nibbles
// by byte shuffles of their 64-byte block; bit-packed ids (5 to 7 bits: the 4 * bits bytes of
// 32 columns) by a dword permute putting each half's bytes in its 128-bit lane, byte shuffles
// giving each id the 16-bit word that holds it, a multiply by 2^(8 - shift) (AVX2 has no
// variable 16-bit shift) whose high byte is the id, and a pack. Codebook entries are looked up
// by pshufb on byte planes of the codebook in 16-entry quarters (a tree of blends on the id's
// bits 4..): two planes for int16 weights, four for fp32 ones, whose bytes unpack into the
// weights of 8 consecutive columns each. An AVX2 gather costs about 12 cycles per 8 weights on
// Zen 3 (the whole 6-bit kernel did 16-19 cycles per 8 weights with it), the 6-bit plane lookup
// about 40 simple ops per 32; only 8-bit codebooks (16 quarters) are still gathered.
// Columns past K get id 0 and read x as 0 (padding is never read as a weight, nor checked).
struct BitIds32 {
  __m256i halves, pick[2], scale[2], mask;
  int bits = 8;
};

DCX_AVX2_FN inline BitIds32 bit_ids32_setup(int bits) {
  BitIds32 b;
  b.halves = b.pick[0] = b.pick[1] = b.scale[0] = b.scale[1] = _mm256_setzero_si256();
  b.bits = bits;
  b.mask = _mm256_set1_epi8(char((1 << bits) - 1));
  if (bits < 5 || bits > 7) return b;
  // Lane 1 takes dwords base .. base + 3 of the 32 ids' bytes (ids 16..31 begin at byte 2 bits).
  const int base = bits / 2;
  alignas(32) int32_t halves[8];
  alignas(32) int8_t pick[2][32];
  alignas(32) int16_t scale[2][16];
  for (int i = 0; i < 4; ++i) {
    halves[i] = i;
    halves[4 + i] = base + i;
  }
  for (int lane = 0; lane < 2; ++lane) {
    for (int i = 0; i < 16; ++i) {  // id 16 lane + i: word i % 8 of lane `lane` in vector i / 8
      const int bit = (16 * lane + i) * bits - 32 * base * lane;  // in the lane's 16 bytes
      const int byte = bit >> 3, shift = bit & 7;
      int8_t* at = pick[i / 8] + 16 * lane + 2 * (i % 8);
      at[0] = int8_t(byte);
      at[1] = shift + bits > 8 ? int8_t(byte + 1) : int8_t(-128);  // a zero byte when not needed
      scale[i / 8][8 * lane + i % 8] = int16_t(1 << (8 - shift));  // high byte = bits shift..+8
    }
  }
  b.halves = _mm256_load_si256(reinterpret_cast<const __m256i*>(halves));
  for (int v = 0; v < 2; ++v) {
    b.pick[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(pick[v]));
    b.scale[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(scale[v]));
  }
  return b;
}

DCX_AVX2_FN inline __m256i tail_mask8(int64_t left) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(std::min<int64_t>(left, 8))), lane);
}

// Bytes [0, left) kept, the rest zeroed (left < 32).
DCX_AVX2_FN inline __m256i keep_bytes(__m256i v, int64_t left) {
  const __m256i lane = _mm256_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                        17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
  return _mm256_and_si256(v, _mm256_cmpgt_epi8(_mm256_set1_epi8(char(left)), lane));
}

// 32 bytes at `at`, or the `n` there (the rest 0) where 32 would run past `end`.
DCX_AVX2_FN inline __m256i load32(const uint8_t* at, int64_t n, const uint8_t* end) {
  if (at + 32 <= end) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at));
  alignas(32) uint8_t copy[32] = {};
  std::memcpy(copy, at, size_t(n));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(copy));
}

DCX_AVX2_FN inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

DCX_AVX2_FN inline uint32_t hmax_u8(__m256i v) {
  alignas(32) uint8_t lanes[32];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
  return *std::max_element(lanes, lanes + 32);
}

// ids32's byte shuffles of a nibble block's two 32-byte halves for the 32 columns at 32 h of it
// (h < 4): bytes h, 4 + h, 8 + h, 12 + h of each 128-bit lane, to lane bytes 0-3 from the low
// half and 4-7 from the high half (-128: a zero byte).
struct NibblePicks {
  alignas(32) int8_t from_low[4][32];
  alignas(32) int8_t from_high[4][32];
};

constexpr NibblePicks make_nibble_picks() {
  NibblePicks t{};
  for (int h = 0; h < 4; ++h)
    for (int i = 0; i < 32; ++i) {
      const int b = i % 16;
      t.from_low[h][i] = b < 4 ? int8_t(4 * b + h) : int8_t(-128);
      t.from_high[h][i] = b >= 4 && b < 8 ? int8_t(4 * (b - 4) + h) : int8_t(-128);
    }
  return t;
}

inline constexpr NibblePicks kNibblePicks = make_nibble_picks();

// The ids of columns j .. j + 31 (j a multiple of 32) of a dense row as bytes in column order,
// 0 past the row's `left` columns; `end`: the end of the codes.
template <SpqmmDense D>
DCX_AVX2_FN inline __m256i ids32(const uint8_t* row, int64_t j, const BitIds32& b,
                                 const uint8_t* end, int64_t left) {
  __m256i ids;
  if constexpr (D == SpqmmDense::kBytes) {
    ids = load32(row + j, std::min<int64_t>(left, 32), end);
  } else if constexpr (D == SpqmmDense::kNibbles) {
    // Columns 32 h + d and 32 h + 16 + d (d < 16) are the low and high nibbles of byte 4 d + h of
    // their 64-byte block: pick those 16 bytes from the block's two halves by byte shuffles (within
    // 128-bit lanes) and a dword permute, then split them into nibbles.
    const uint8_t* blk = row + (j / kSpqmmNibbleBlock) * (kSpqmmNibbleBlock / 2);
    const int h = int(j >> 5) & 3;  // the picks come from memory as the shuffles' operands
    const __m256i pick_a = _mm256_load_si256(reinterpret_cast<const __m256i*>(kNibblePicks.from_low[h]));
    const __m256i pick_b = _mm256_load_si256(reinterpret_cast<const __m256i*>(kNibblePicks.from_high[h]));
    const __m256i both = _mm256_or_si256(
        _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk)), pick_a),
        _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32)), pick_b));
    const __m128i bytes = _mm256_castsi256_si128(
        _mm256_permutevar8x32_epi32(both, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0)));
    const __m128i low = _mm_set1_epi8(15);
    ids = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
  } else {
    // The 32 ids' 4 * bits bytes lie in the row (whose blocks are of 64 columns).
    const __m256i v = _mm256_permutevar8x32_epi32(load32(row + (j >> 3) * b.bits, 4 * b.bits, end),
                                                  b.halves);
    __m256i words[2];
    for (int t = 0; t < 2; ++t)
      words[t] = _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(v, b.pick[t]), b.scale[t]), 8);
    ids = _mm256_and_si256(_mm256_packus_epi16(words[0], words[1]), b.mask);
  }
  return left >= 32 ? ids : keep_bytes(ids, left);
}

// One byte plane of the entries of 32 ids (< 128, or the mask below): entries [16 q, 16 q + 16)
// of the plane, in both 128-bit lanes, in t[q].
template <int NQ>
DCX_AVX2_FN inline __m256i lookup_plane(const __m256i* t, __m256i id) {
  // pshufb reads bits 0-3 of an id and zeroes where bit 7 is set: only 8-bit ids need the mask
  const __m256i low = NQ == 16 ? _mm256_and_si256(id, _mm256_set1_epi8(15)) : id;
  __m256i v[NQ];
  for (int q = 0; q < NQ; ++q) v[q] = _mm256_shuffle_epi8(t[q], low);
  for (int width = NQ, bit = 4; width > 1; width /= 2, ++bit) {
    const __m256i high = _mm256_slli_epi16(id, 7 - bit);  // bit `bit` of each byte to its bit 7
    for (int q = 0; q < width / 2; ++q) v[q] = _mm256_blendv_epi8(v[2 * q], v[2 * q + 1], high);
  }
  return v[0];
}

// Byte `plane` of the first 16 * nq entries of a table of `Entry`s as nq quarters, each in both
// lanes of t[q].
template <typename Entry>
DCX_AVX2_FN inline void load_plane(const Entry* table, int plane, int nq, __m256i* t) {
  alignas(16) uint8_t bytes[16];
  for (int q = 0; q < nq; ++q) {
    for (int i = 0; i < 16; ++i) {
      Entry e = table[16 * q + i];
      uint8_t raw[sizeof(Entry)];
      std::memcpy(raw, &e, sizeof(Entry));
      bytes[i] = raw[plane];  // little-endian: plane 0 the low byte
    }
    t[q] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes)));
  }
}

// The fp32 weights of 32 ids (column order) as w[q] = columns 8 q .. 8 q + 7: four byte planes
// (planes[k * NQ + q]: byte k of quarter q) or, for NQ = 0, gathers from the table. The ids are
// first put in the order (dwords 0, 2, 4, 6 | 1, 3, 5, 7) in which the in-lane unpacks of the
// planes' bytes come out as consecutive columns.
template <int NQ>
DCX_AVX2_FN inline void lookup32_f32(const __m256i* planes, const float* table, __m256i id,
                                     __m256* w) {
  if constexpr (NQ == 0) {
    const __m128i lo = _mm256_castsi256_si128(id), hi = _mm256_extracti128_si256(id, 1);
    w[0] = _mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(lo), 4);
    w[1] = _mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)), 4);
    w[2] = _mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(hi), 4);
    w[3] = _mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)), 4);
  } else {
    const __m256i order = _mm256_permutevar8x32_epi32(id, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
    __m256i b[4];
    for (int k = 0; k < 4; ++k) b[k] = lookup_plane<NQ>(planes + k * NQ, order);
    const __m256i lo01 = _mm256_unpacklo_epi8(b[0], b[1]), hi01 = _mm256_unpackhi_epi8(b[0], b[1]);
    const __m256i lo23 = _mm256_unpacklo_epi8(b[2], b[3]), hi23 = _mm256_unpackhi_epi8(b[2], b[3]);
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
  }
}

// The fp32 kernels' lookup state: the codebook's four byte planes (NQ quarters each).
template <int NQ>
struct Planes32 {
  __m256i t[NQ > 0 ? 4 * NQ : 1];
  DCX_AVX2_FN explicit Planes32(const float* table) {
    for (int k = 0; k < 4 && NQ > 0; ++k) load_plane(table, k, NQ, t + k * NQ);
  }
};

// The fp32 weights of dense rows, 32 columns per lookup: the lookup state built once, and the
// largest id seen kept for the op's check.
template <int NQ, SpqmmDense D>
struct DenseDecoder {
  const SpqmmPacked& p;
  const float* table;
  const Planes32<NQ> planes;
  const BitIds32 bi;
  const uint8_t* end;
  __m256i max_id = _mm256_setzero_si256();

  DCX_AVX2_FN DenseDecoder(const SpqmmPacked& packed, const float* tab)
      : p(packed), table(tab), planes(tab), bi(bit_ids32_setup(packed.bits)),
        end(packed.dense_codes + packed.n * packed.dense_width) {}

  DCX_AVX2_FN const uint8_t* codes(int64_t r) const { return p.dense_codes + r * p.dense_width; }

  // Columns j .. j + 31 (j a multiple of 32) of a row: w[q] = columns j + 8 q .. j + 8 q + 7,
  // 0 past the row's `left` columns.
  DCX_AVX2_FN void weights32(const uint8_t* row, int64_t j, int64_t left, __m256* w) {
    const __m256i id = ids32<D>(row, j, bi, end, left);
    max_id = _mm256_max_epu8(max_id, id);
    lookup32_f32<NQ>(planes.t, table, id, w);
  }

  // Row r's K weights into w.
  DCX_AVX2_FN void row(int64_t r, float* w) {
    const uint8_t* row_codes = codes(r);
    for (int64_t j = 0; j < p.k; j += 32) {
      const int64_t left = p.k - j;
      __m256 v[4];
      weights32(row_codes, j, left, v);
      for (int q = 0; q < 4 && 8 * q < left; ++q) {
        // plain stores: a masked store costs many cycles on AMD CPUs (only the row's last 8)
        if (left - 8 * q >= 8) {
          _mm256_storeu_ps(w + j + 8 * q, v[q]);
        } else {
          _mm256_maskstore_ps(w + j + 8 * q, tail_mask8(left - 8 * q), v[q]);
        }
      }
    }
  }

  DCX_AVX2_FN void report(SpqmmSeen* seen) const {
    seen->max_id = std::max(seen->max_id, hmax_u8(max_id));
  }
};

// Dense rows [r0, r1) for MB batch rows of x ([MB][ldx], zero past the valid ones): each weight
// decoded once and applied to every batch row; at MB = 1 and 2, several accumulators per row.
template <int NQ, SpqmmDense D, int MB>
DCX_AVX2_FN void dense_rows(const SpqmmPacked& p, int64_t r0, int64_t r1, const float* table,
                            const float* x, int64_t ldx, int mvalid, const float* bias, float* y,
                            int64_t ldy, SpqmmSeen* seen) {
  constexpr int kAcc = MB >= 4 ? 1 : 4 / MB;
  DenseDecoder<NQ, D> decode(p, table);
  const int64_t K = p.k;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = decode.codes(r);
    __m256 acc[MB][kAcc];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < kAcc; ++a) acc[m][a] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= K; j += 32) {
      __m256 w[4];
      decode.weights32(row, j, 32, w);
      for (int q = 0; q < 4; ++q)
        for (int m = 0; m < MB; ++m)
          acc[m][q % kAcc] = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(x + m * ldx + j + 8 * q),
                                             acc[m][q % kAcc]);
    }
    if (j < K) {  // the last K % 32 columns
      const int64_t left = K - j;
      __m256 w[4];
      decode.weights32(row, j, left, w);
      for (int q = 0; 8 * q < left; ++q) {
        const __m256i valid = tail_mask8(left - 8 * q);
        for (int m = 0; m < MB; ++m)
          acc[m][0] = _mm256_fmadd_ps(w[q], _mm256_maskload_ps(x + m * ldx + j + 8 * q, valid),
                                      acc[m][0]);
      }
    }
    const float b = bias ? bias[r] : 0.f;
    for (int m = 0; m < mvalid; ++m) {
      __m256 sum = acc[m][0];
      for (int a = 1; a < kAcc; ++a) sum = _mm256_add_ps(sum, acc[m][a]);
      y[m * ldy + r] = hsum8(sum) + b;
    }
  }
  decode.report(seen);
}

// Dense decode of rows [r0, r1) into w ([r1 - r0, K] floats).
template <int NQ, SpqmmDense D>
DCX_AVX2_FN void dense_decode_rows(const SpqmmPacked& p, int64_t r0, int64_t r1,
                                   const float* table, float* w, SpqmmSeen* seen) {
  DenseDecoder<NQ, D> decode(p, table);
  for (int64_t r = r0; r < r1; ++r) decode.row(r, w + (r - r0) * p.k);
  decode.report(seen);
}

// R decoded rows (w [R][K]) applied to M batch rows (x [M rounded up to 4][ldx]) 4 at a time:
// each x load feeds R FMAs, so x, which outgrows L1 at large K, is streamed half as often.
template <int R>
DCX_AVX2_FN inline void apply_rows(const float* w, int64_t K, const float* x, int64_t ldx,
                                   int64_t M, const float* bias, int64_t r, float* y, int64_t ldy) {
  constexpr int kRows = 4;
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const float* xb = x + m0 * ldx;
    __m256 acc[R][kRows];
    for (int i = 0; i < R; ++i)
      for (int m = 0; m < kRows; ++m) acc[i][m] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= K; j += 8) {
      __m256 wv[R];
      for (int i = 0; i < R; ++i) wv[i] = _mm256_loadu_ps(w + i * K + j);
      for (int m = 0; m < kRows; ++m) {
        const __m256 xv = _mm256_loadu_ps(xb + m * ldx + j);
        for (int i = 0; i < R; ++i) acc[i][m] = _mm256_fmadd_ps(wv[i], xv, acc[i][m]);
      }
    }
    if (j < K) {
      const __m256i valid = tail_mask8(K - j);
      for (int m = 0; m < kRows; ++m) {
        const __m256 xv = _mm256_maskload_ps(xb + m * ldx + j, valid);
        for (int i = 0; i < R; ++i)
          acc[i][m] = _mm256_fmadd_ps(_mm256_maskload_ps(w + i * K + j, valid), xv, acc[i][m]);
      }
    }
    const int mvalid = static_cast<int>(std::min<int64_t>(kRows, M - m0));
    for (int i = 0; i < R; ++i) {
      const float b = bias ? bias[r + i] : 0.f;
      for (int m = 0; m < mvalid; ++m) y[(m0 + m) * ldy + r + i] = hsum8(acc[i][m]) + b;
    }
  }
}

// Dense rows [r0, r1) for M > 8 batch rows (x [M rounded up to 4][ldx], zero past the valid
// rows): each pair of rows decoded once into w (2 K floats, in L1), then applied to every batch
// row, so the decode, which costs several times the 8 FMAs a weight gets per 8 batch rows, is
// paid once however many rows there are.
template <int NQ, SpqmmDense D>
DCX_AVX2_FN void dense_rows_many(const SpqmmPacked& p, int64_t r0, int64_t r1, const float* table,
                                 const float* x, int64_t ldx, int64_t M, const float* bias,
                                 float* y, int64_t ldy, float* w, SpqmmSeen* seen) {
  const int64_t K = p.k;
  DenseDecoder<NQ, D> decode(p, table);
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) {
    decode.row(r, w);
    decode.row(r + 1, w + K);
    apply_rows<2>(w, K, x, ldx, M, bias, r, y, ldy);
  }
  if (r < r1) {
    decode.row(r, w);
    apply_rows<1>(w, K, x, ldx, M, bias, r, y, ldy);
  }
  decode.report(seen);
}

// f(nq, layout) with the layer's dense layout as a compile-time constant (nq: the caller's).
template <int NQ, typename F>
DCX_AVX2_FN inline void with_layout(const SpqmmPacked& p, F&& f) {
  using N = std::integral_constant<int, NQ>;
  switch (p.layout) {
    case SpqmmDense::kNibbles: f(N(), std::integral_constant<SpqmmDense, SpqmmDense::kNibbles>()); break;
    case SpqmmDense::kBits: f(N(), std::integral_constant<SpqmmDense, SpqmmDense::kBits>()); break;
    default: f(N(), std::integral_constant<SpqmmDense, SpqmmDense::kBytes>()); break;
  }
}

// The fp32 kernel for a layer's codebook size and layout: f<NQ, D>() with NQ 16-entry quarters
// per byte plane (0: gathered).
template <typename F>
DCX_AVX2_FN inline void with_dense_kind(const SpqmmPacked& p, F&& f) {
  switch (p.bits <= 4 ? 1 : p.bits == 8 ? 0 : 1 << (p.bits - 4)) {
    case 1: with_layout<1>(p, f); break;
    case 2: with_layout<2>(p, f); break;
    case 4: with_layout<4>(p, f); break;
    case 8: with_layout<8>(p, f); break;
    default: with_layout<0>(p, f); break;
  }
}

// int8 compute (core/spqmm_int8.h): the int16 weights of 32 ids from the low and high byte
// planes, interleaved into two vectors of 16 weights (columns 0-7 and 16-23, then 8-15 and 24-31:
// x is staged in that order, q8_slot), then per activation row two pmaddwd and an add give 8
// int32 partial dots (exact: |partial| <= 4 * 127 * 32767 < 2^24, so the float conversion is
// exact too), scaled by the block's activation scale into 8 float sums.

// Rows [r0, r1) for MB activation rows (xq [MB][ldq] int16 in q8_slot order, xs [MB][blocks],
// zero past the valid ones).
template <int NT, SpqmmDense D, int MB>
DCX_AVX2_FN void q8_dense_rows(const SpqmmPacked& p, int64_t r0, int64_t r1, const int16_t* table,
                               float wscale, const int16_t* xq, int64_t ldq, const float* xs,
                               int mvalid, const float* bias, float* y, int64_t ldy,
                               SpqmmSeen* seen) {
  __m256i lo[NT], hi[NT];
  load_plane(table, 0, NT, lo);
  load_plane(table, 1, NT, hi);
  const BitIds32 bi = bit_ids32_setup(p.bits);
  const int64_t K = p.k, blocks = q8_blocks(K);
  const uint8_t* end = p.dense_codes + p.n * p.dense_width;
  __m256i max_id = _mm256_setzero_si256();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.dense_codes + r * p.dense_width;
    __m256 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t j = b * kQ8Block;
      const __m256i id = ids32<D>(row, j, bi, end, K - j);
      max_id = _mm256_max_epu8(max_id, id);
      const __m256i wl = lookup_plane<NT>(lo, id), wh = lookup_plane<NT>(hi, id);
      const __m256i wa = _mm256_unpacklo_epi8(wl, wh), wb = _mm256_unpackhi_epi8(wl, wh);
      for (int m = 0; m < MB; ++m) {
        const int16_t* xr = xq + m * ldq + j;
        const __m256i dot = _mm256_add_epi32(
            _mm256_madd_epi16(wa, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))),
            _mm256_madd_epi16(wb, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16))));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(xs + m * blocks + b), acc[m]);
      }
    }
    const float bv = bias ? bias[r] : 0.f;
    for (int m = 0; m < mvalid; ++m) y[m * ldy + r] = hsum8(acc[m]) * wscale + bv;
  }
  seen->max_id = std::max(seen->max_id, hmax_u8(max_id));
}

// The int8 kernel for a layer's codebook size and layout: f<NT, D>() with NT = 16-entry quarters.
template <typename F>
DCX_AVX2_FN inline void with_q8_kind(const SpqmmPacked& p, F&& f) {
  switch (p.bits <= 4 ? 1 : 1 << (p.bits - 4)) {
    case 1: with_layout<1>(p, f); break;
    case 2: with_layout<2>(p, f); break;
    case 4: with_layout<4>(p, f); break;
    case 8: with_layout<8>(p, f); break;
    default: with_layout<16>(p, f); break;
  }
}

inline bool supported() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

}  // namespace avx2
#endif  // DCX_SPQMM_AVX2
#endif  // DCX_SPQMM_AVX512

}  // namespace dcx
