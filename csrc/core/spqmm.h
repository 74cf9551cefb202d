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
//                                  every live slot; not descending within a group.
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
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/common.h"
#include "core/spqmm_int8.h"
#include "core/spqmm_layout.h"

// DCX_SPQMM_AVX512: the AVX-512 kernels are compiled (for the CPUs that have it, chosen at run
// time; those that need VNNI are marked DCX_AVX512_VNNI_FN, VBMI DCX_AVX512_VBMI_FN, the bf16 dot
// products DCX_AVX512_BF16_FN, the AMX ones DCX_AMX_FN),
// DCX_SPQMM_AVX2 likewise. With DCX_AVX512_EMULATE (the native tests) the AVX-512 and AMX kernels
// are compiled against plain-C++ intrinsics (csrc/tests/avx512_emu.h) and run on any CPU.
#if defined(DCX_AVX512_EMULATE)
#include <cmath>
#define DCX_SPQMM_AVX512 1
#define DCX_AVX512_FN
#define DCX_AVX512_VNNI_FN
#define DCX_AVX512_VBMI_FN
#define DCX_AVX512_Q8_FN
#define DCX_AVX512_BF16_FN
#define DCX_AMX_FN
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
#define DCX_AVX512_VNNI_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define DCX_AVX512_VBMI_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi")))
#define DCX_AVX512_Q8_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni")))
#define DCX_AVX512_BF16_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define DCX_AMX_FN \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,amx-tile,amx-bf16")))
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

// bf16 bits of a float, rounded to nearest even (NaN stays NaN).
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

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
  // Entries of the codebook (0: unknown). A kernel may skip tracking the largest id when every id
  // its layout can hold is below it (4-bit nibbles of a 16-entry codebook).
  int64_t codebook_size = 0;
  // Group scales (a group-scaled codebook: W[r][j] = group_scale[r][j / scale_group] * codebook[id]),
  // float32 [n][scale_groups] row major, scale_group a multiple of 32 columns (so every 32-column
  // block of a dense row, and every step's window in sparse mode, lies in one group: the packer
  // keeps window % scale_group + 32 <= scale_group). Null: unscaled, or row scales, which the op
  // applies to each output after the kernels (one multiply per output).
  const float* group_scale = nullptr;
  int64_t scale_group = 0;
  int64_t scale_groups = 0;  // ceil(k / scale_group)
  int scale_shift = -1;      // log2(scale_group) when it is a power of two (a shift, not a division)

  void set_group_scales(const float* scale, int64_t group) {
    group_scale = scale;
    scale_group = group;
    scale_groups = (k + group - 1) / group;
    scale_shift = -1;
    for (int b = 0; b < 63; ++b)
      if (group == int64_t(1) << b) scale_shift = b;
  }
};

// The column group of column j (clamped: a corrupted window past K still reads a scale in range).
inline int64_t spqmm_col_group(const SpqmmPacked& p, int64_t j) {
  return std::min(p.scale_shift >= 0 ? j >> p.scale_shift : j / p.scale_group, p.scale_groups - 1);
}

// Row r's scale for the block of columns that starts at j (1 when the layer has no group scales).
inline float spqmm_group_scale(const SpqmmPacked& p, int64_t r, int64_t j) {
  return p.group_scale ? p.group_scale[r * p.scale_groups + spqmm_col_group(p, j)] : 1.f;
}

// The 16 lane scales of a sparse step of group g whose window starts at j0: scale[16 g + i][group
// of j0] (rows past n, padding, read the last row's). Windows do not decrease within a group, so
// a step costs a few compares: a new row group copies its 16 rows' scales once, column group by
// column group ([G][16], 16 G floats), and a new column group only moves a pointer. (Reading
// the 16 rows' scales, 16 cache lines, at each column group cost a quarter of the step kernel
// at 10% density.)
struct SpqmmStepScales {
  int64_t g = -1, lo = 0, hi = 0;  // the row group and the columns [lo, hi) of `at`
  const float* at = nullptr;
  std::vector<float> rows;  // [scale_groups][16]: the row group's scales
  // Sized here, so that a new row group is a plain inline copy: a call inside a kernel's step
  // loop, however rare, clobbers every vector register, and GCC then keeps the kernel's
  // accumulators on the stack (a load and a store around each FMA).
  explicit SpqmmStepScales(const SpqmmPacked& p)
      : rows(p.group_scale ? size_t(p.scale_groups * kSpqmmRows) : size_t(0)) {}
  DCX_ALWAYS_INLINE const float* get(const SpqmmPacked& p, int64_t grp, int64_t j0) {
    if (__builtin_expect(grp != g || j0 < lo || j0 >= hi, 0)) {
      if (grp != g) load_rows(p, grp);
      const int64_t cg = spqmm_col_group(p, j0);
      lo = cg * p.scale_group;
      hi = cg == p.scale_groups - 1 ? INT64_MAX : lo + p.scale_group;
      at = rows.data() + cg * kSpqmmRows;
    }
    return at;
  }
  DCX_ALWAYS_INLINE void load_rows(const SpqmmPacked& p, int64_t grp) {
    const int64_t groups = p.scale_groups;
    float* out = rows.data();
    for (int i = 0; i < kSpqmmRows; ++i) {
      const float* src = p.group_scale + std::min<int64_t>(grp * kSpqmmRows + i, p.n - 1) * groups;
      for (int64_t c = 0; c < groups; ++c) out[c * kSpqmmRows + i] = src[c];
    }
    g = grp;
  }
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

// Group scales: nullptr when every window lies within one column group. O(steps): a mask for a
// power-of-two group, in a loop the compiler vectorises (about 10 us for 160K steps, where a
// division per step cost more than the product at batch 1). Skipped with check=False (the
// kernels stay in bounds either way: a window across groups only scales wrongly).
inline const char* spqmm_check_scale_windows(const SpqmmPacked& p) {
  if (p.group_scale == nullptr || p.dense) return nullptr;
  const uint32_t span = uint32_t(p.scale_group - kSpqmmWindow), group = uint32_t(p.scale_group);
  bool bad = false;
  if (p.scale_shift >= 0) {
    for (int64_t s = 0; s < p.steps; ++s) bad |= (uint32_t(p.windows[s]) & (group - 1)) > span;
  } else {
    for (int64_t s = 0; s < p.steps; ++s) bad |= uint32_t(p.windows[s]) % group > span;
  }
  return bad ? "a window crosses a scale group (windows must keep window % group_size + 32 <= "
               "group_size)"
             : nullptr;
}

// What a pass saw: the largest id and column (the op compares them with k and K), and whether a
// window descended.
struct SpqmmSeen {
  uint32_t max_id = 0;
  int64_t max_col = -1;
  bool descending = false;  // a window below its group's previous one (the sparse AMX kernel)
  void merge(const SpqmmSeen& o) {
    max_id = std::max(max_id, o.max_id);
    max_col = std::max(max_col, o.max_col);
    descending |= o.descending;
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

// Walks the steps of chunk c: step(s, g) for each (g its group), flush(g, slot) when group g ends inside the chunk
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
    step(s, g);
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

}  // namespace dcx
