// spqmm kernels with AVX-512 (chosen at run time on CPUs that have it; the native tests compile
// them against plain-C++ intrinsics, csrc/tests/avx512_emu.h). Layout and helpers: core/spqmm.h.
#pragma once

#include "core/spqmm.h"

#ifdef DCX_SPQMM_AVX512
namespace dcx {
// Kernels with AVX-512: 16 slots per step. Codebook lookups are register permutes (<= 16
// entries: one vpermps; 32: one vpermi2ps; 64, 128, 256: 2, 4, 8 of them and a tree of blends on
// the id's high bits), and so is the x lookup in the step's window: never a gather (on Zen 4 a
// 16-lane gather costs about 20 cycles, a permute 1 or 2).
namespace avx512 {

#ifdef DCX_AVX512_EMULATE
#include "tests/avx512_emu.h"
#endif

// Whether this CPU has the instructions of the kernels below (the emulated ones: always).
inline bool supported() {
#ifdef DCX_AVX512_EMULATE
  return true;
#else
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#endif
}

inline bool supports_vbmi() {
#ifdef DCX_AVX512_EMULATE
  return true;
#else
  static const bool ok = supported() && __builtin_cpu_supports("avx512vbmi");
  return ok;
#endif
}

inline bool supports_vnni() {
#ifdef DCX_AVX512_EMULATE
  return true;
#else
  static const bool ok = supported() && __builtin_cpu_supports("avx512vnni");
  return ok;
#endif
}

// AVX512-BF16's dot products (vdpbf16ps: Cooper Lake, Sapphire Rapids, Zen 4 and later).
inline bool supports_bf16() {
#ifdef DCX_AVX512_EMULATE
  return true;
#else
  static const bool ok = supported() && __builtin_cpu_supports("avx512bf16");
  return ok;
#endif
}

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

// Lanes of the 16 elements from j that lie below k.
DCX_AVX512_FN inline __mmask16 tail_mask(int64_t k, int64_t j) {
  return k - j >= 16 ? __mmask16(0xFFFF) : k <= j ? __mmask16(0) : __mmask16((1u << (k - j)) - 1);
}

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
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  SpqmmStepScales scales(p);
  auto step = [&](int64_t s, int64_t g) DCX_AVX512_FN {
    // Prefetch the codes 192 steps (6 KB, past the chunk's end too: the thread's next chunk
    // usually follows) and the windows 256 steps ahead: the steps themselves are too short for the
    // out-of-order window to hide a memory latency (measured: 1.4x at 2 threads on Zen 4; 64
    // steps ahead, as before, left one row of 4096 x 4096 at 10% kept waiting on memory on Zen 5,
    // 180 -> 161 us, and 384 gained nothing more).
    if ((s & 1) == 0) {
      _mm_prefetch(reinterpret_cast<const char*>(p.codes + std::min(s + 192, p.steps - 1) * kSpqmmRows),
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
    __m512 w = _mm512_maskz_mov_ps(live, lookup<L>(tab, v));  // lookups use the id's bits
    if (p.group_scale) w = _mm512_mul_ps(w, _mm512_loadu_ps(scales.get(p, g, j0)));
    const __m512i off = _mm512_srli_epi32(v, 8);  // the permute reads its low 5 bits
    if (j0 + kSpqmmWindow > p.k) {  // only here can a live slot point past K
      const __m512i o = _mm512_and_si512(off, _mm512_set1_epi32(kSpqmmWindow - 1));
      if (live) max_col = std::max<int64_t>(max_col, j0 + _mm512_mask_reduce_max_epu32(live, o));
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const float* xw = xs + m * ldx + j0;
      const __m512 xv = _mm512_permutex2var_ps(_mm512_loadu_ps(xw), off, _mm512_loadu_ps(xw + 16));
      acc[m] = _mm512_fmadd_ps(w, xv, acc[m]);
    }
  };
  // As spqmm_flush, in vector stores at constant indices of acc: a call in the walk (spqmm_flush,
  // or the memcpy inside it) clobbers every vector register, and GCC then kept the accumulators
  // on the stack, a load and a store around each FMA (4096 x 4096, 10% kept, 8 rows, two threads:
  // 63 cycles a step, then 51).
  auto flush = [&](int64_t g, int slot) DCX_AVX512_FN {
    if (slot >= 0) {
      edge->group[slot] = g;
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) _mm512_storeu_ps(edge_sums + (slot * MB + m) * kSpqmmRows, acc[m]);
    } else {
      const int64_t r0 = g * kSpqmmRows;
      const __mmask16 lanes = tail_mask(p.n, r0);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) {
        if (m >= mvalid) break;
        float* yr = y + m * ldy + r0;
        _mm512_mask_storeu_ps(yr, lanes, _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, yr), acc[m]));
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  };
  spqmm_walk_chunk(p, c, step, flush);
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
  seen->max_col = std::max<int64_t>(seen->max_col, max_col);
}

// One step s of group g as vectors, for the batch kernel and the decodes below: its window (clamped to K), live lanes,
// weights (group scales included; padding zeroed after the scale, so that an inf scale cannot make
// it a NaN) and columns; its ids and window go to the running maxima, and so do its live columns
// where the window reaches past K (only there can one point past K).
struct SparseStep {
  int64_t j0;
  __mmask16 live;
  __m512 w;
  __m512i col;
};

template <Lut L>
DCX_AVX512_FN inline SparseStep sparse_step(const SpqmmPacked& p, const Table& tab,
                                            SpqmmStepScales& scales, int64_t s, int64_t g,
                                            __m512i* max_id, int64_t* max_col) {
  SparseStep st;
  st.j0 = spqmm_window(p, s, max_col);
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(p.codes + s * kSpqmmRows)));
  st.live = _mm512_test_epi32_mask(v, _mm512_set1_epi32(kSpqmmLive));
  *max_id = _mm512_max_epu32(*max_id, _mm512_and_si512(v, _mm512_set1_epi32(kSpqmmIdMask)));
  __m512 w = lookup<L>(tab, v);
  if (p.group_scale) w = _mm512_mul_ps(w, _mm512_loadu_ps(scales.get(p, g, st.j0)));
  st.w = _mm512_maskz_mov_ps(st.live, w);
  st.col = _mm512_add_epi32(_mm512_set1_epi32(int32_t(st.j0)),
                            _mm512_and_si512(_mm512_srli_epi32(v, 8), _mm512_set1_epi32(kSpqmmWindow - 1)));
  if (st.j0 + kSpqmmWindow > p.k && st.live)
    *max_col = std::max<int64_t>(*max_col, _mm512_mask_reduce_max_epu32(st.live, st.col));
  return st;
}

// Lanes of group g whose rows lie in [r0, r1).
inline uint32_t rows_in_range(int64_t g, int64_t r1) {
  const int64_t rows = std::min<int64_t>(kSpqmmRows, r1 - g * kSpqmmRows);
  return rows >= kSpqmmRows ? 0xFFFFu : (1u << rows) - 1;
}

// The batch kernels' epilogue for group g: y[m][16 g + i] = acc[i] lane m + bias, for the mvalid
// batch rows and the group's rows below N. Every accumulator is stored at constant indices, so that
// all 16 stay in registers through the steps (a store at a run-time index, i < lanes, had put them
// on the stack: a load and a store around each FMA).
DCX_AVX512_FN DCX_ALWAYS_INLINE void batch_store(const SpqmmPacked& p, int64_t g, const __m512* acc, int mvalid,
                                                 const float* bias, float* y, int64_t ldy) {
  alignas(64) float sums[kSpqmmRows][16];
#pragma GCC unroll 16
  for (int i = 0; i < kSpqmmRows; ++i) _mm512_store_ps(sums[i], acc[i]);
  const int64_t r0 = g * kSpqmmRows;
  const int lanes = static_cast<int>(std::min<int64_t>(kSpqmmRows, p.n - r0));
  for (int i = 0; i < lanes; ++i) {
    const float b = bias ? bias[r0 + i] : 0.f;
    for (int m = 0; m < mvalid; ++m) y[m * ldy + r0 + i] = sums[i][m] + b;
  }
}

// Sparse mode for 12 to 16 batch rows (a tile of xt [K + 32][16], the batch rows in the lanes,
// zero past K and past the valid rows), groups [g0, g1), in two phases per run of kBatchSteps
// steps: first each step's 16 weights and columns (sparse_step) stored in a small buffer; then per
// slot a broadcast load of its weight, a load of its column and one FMA with the 16 activations
// of that column (one 64-byte load) into its row's accumulator; the 16 rows of a group stay in
// registers. Decoding a run ahead of its FMAs lets the stores retire before they are read back:
// read back within the step (a 64-byte store, then 4-byte loads of it), a step cost about 80
// cycles; taken out of the registers (a permute and an extract per slot), about 100.
// y [16][ldy] gets bias + products for the mvalid rows.
constexpr int kBatchSteps = 32;

template <Lut L>
DCX_AVX512_FN void sparse_batch(const SpqmmPacked& p, int64_t g0, int64_t g1, const float* table,
                                const float* xt, int mvalid, const float* bias, float* y,
                                int64_t ldy, SpqmmSeen* seen) {
  constexpr int MT = 16;
  const Table tab = load_table(table);
  __m512i max_id = _mm512_setzero_si512();
  int64_t max_col = -1;
  alignas(64) float wb[kBatchSteps][kSpqmmRows];
  alignas(64) int32_t cb[kBatchSteps][kSpqmmRows];  // the slot's column (window + offset)
  SpqmmStepScales scales(p);
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[kSpqmmRows];
#pragma GCC unroll 16
    for (int i = 0; i < kSpqmmRows; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t s0 = p.group_ptr[g], end = p.group_ptr[g + 1]; s0 < end; s0 += kBatchSteps) {
      const int run = static_cast<int>(std::min<int64_t>(kBatchSteps, end - s0));
      for (int t = 0; t < run; ++t) {
        const SparseStep st = sparse_step<L>(p, tab, scales, s0 + t, g, &max_id, &max_col);
        _mm512_store_ps(wb[t], st.w);
        _mm512_storeu_si512(cb[t], st.col);
      }
      for (int t = 0; t < run; ++t) {
#pragma GCC unroll 16
        for (int i = 0; i < kSpqmmRows; ++i)  // 64-bit offsets: K * MT may pass 2^31
          acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(wb[t][i]), _mm512_loadu_ps(xt + int64_t(cb[t][i]) * MT),
                                   acc[i]);
      }
    }
    batch_store(p, g, acc, mvalid, bias, y, ldy);
  }
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
  seen->max_col = std::max<int64_t>(seen->max_col, max_col);
}

// acc + the products of one pair of slots for 16 batch rows: the 16 bf16 activations of the first
// slot's column (32 bytes at xa) interleaved with the second's (at xb) by one word permute
// (interleave), times the slots' two bf16 weights (the 32-bit word at w, broadcast within
// vdpbf16ps). In assembly: GCC 12 moved each loaded half into another register before the permute
// and, short of registers then, kept an accumulator on the stack.
DCX_AVX512_BF16_FN DCX_ALWAYS_INLINE __m512 dpbf16_pair(__m512 acc, const char* xa, const char* xb,
                                                        __m512i interleave, const uint32_t* w) {
#if defined(DCX_AVX512_EMULATE)
  const __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)xa));
  const __m512i b = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)xb));
  return _mm512_dpbf16_ps(acc, _mm512_permutex2var_epi16(a, interleave, b), _mm512_set1_epi32(int(*w)));
#else
  __m512i a, b;
  asm("vmovdqu16 %[pa], %t[a]\n\t"
      "vmovdqu16 %[pb], %t[b]\n\t"
      "vpermt2w %g[b], %g[idx], %g[a]\n\t"
      "vdpbf16ps %[w]%{1to16%}, %g[a], %g[acc]"
      : [acc] "+v"(acc), [a] "=&v"(a), [b] "=&v"(b)
      : [pa] "m"(*reinterpret_cast<const __m256i*>(xa)), [pb] "m"(*reinterpret_cast<const __m256i*>(xb)),
        [idx] "v"(interleave), [w] "m"(*w));
  return acc;
#endif
}

// 32-bit words of two bf16 values each: a[i] rounded to bf16 in the low half of word i, b[i] in
// the high half (vcvtne2ps2bf16: to nearest even, denormals read as zero, as vdpbf16ps reads
// them; then one word permute, pair_words).
DCX_AVX512_BF16_FN DCX_ALWAYS_INLINE __m512i bf16_pairs(__m512 a, __m512 b, __m512i pair_words) {
#if defined(DCX_AVX512_EMULATE)
  const __m512i halves = _mm512_cvtne2ps_pbh(b, a);
#else
  const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(b, a);
#endif
  return _mm512_permutexvar_epi16(pair_words, halves);
}

// The columns of a step's live slots (its 16 codes, window j0) to the running maximum: the
// kernels that read ids without sparse_step call it for the steps whose window reaches past K,
// the only ones where a live slot can point past K.
inline void live_columns(const uint16_t* step, int64_t j0, int64_t* max_col) {
  for (int i = 0; i < kSpqmmRows; ++i)
    if (step[i] & kSpqmmLive)
      *max_col = std::max<int64_t>(*max_col, j0 + ((step[i] >> kSpqmmOffsetShift) & (kSpqmmWindow - 1)));
}

// Steps s and (if second) s + 1 of a codebook of up to 32 entries, no group scales, for
// sparse_batch_bf16: their 32 codes in one load, put in pair order (pair_words), each live
// slot's id looked up in the 32 bf16 words of bf16_table by one word permute (padding zeroed),
// so that wb holds lane i's two bf16 weights in word i; ca / cb the byte offsets (32 a column) of
// lane i's columns in a tile; the ids' maximum in max_id_words (padding's id is 0) and the
// windows' in max_col, with the live columns of a step whose window reaches past K.
DCX_AVX512_BF16_FN DCX_ALWAYS_INLINE void bf16_step_pair(const SpqmmPacked& p, int64_t s, bool second,
                                                         __m512i bf16_table, __m512i pair_words, uint32_t* wb,
                                                         int32_t* ca, int32_t* cb, __m512i* max_id_words,
                                                         int64_t* max_col) {
  const int64_t ja = spqmm_window(p, s, max_col), jb = second ? spqmm_window(p, s + 1, max_col) : ja;
  const uint16_t* c = p.codes + s * kSpqmmRows;
  const __m512i codes = _mm512_maskz_loadu_epi16(second ? ~__mmask32(0) : __mmask32(0xFFFF), c);
  *max_id_words = _mm512_max_epu16(*max_id_words, _mm512_and_si512(codes, _mm512_set1_epi16(kSpqmmIdMask)));
  const __m512i paired = _mm512_permutexvar_epi16(pair_words, codes);
  const __mmask32 live = _mm512_test_epi16_mask(paired, _mm512_set1_epi16(int16_t(kSpqmmLive)));
  _mm512_store_si512(wb, _mm512_maskz_permutexvar_epi16(live, paired, bf16_table));  // the id's low 5 bits
  // (code >> 8 & 31) * 32: the offset's bytes in a tile
  const __m512i off = _mm512_and_si512(_mm512_srli_epi16(codes, 3), _mm512_set1_epi16((kSpqmmWindow - 1) << 5));
  _mm512_store_si512(ca, _mm512_add_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(off)),
                                          _mm512_set1_epi32(int32_t(ja * 32))));
  _mm512_store_si512(cb, _mm512_add_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(off, 1)),
                                          _mm512_set1_epi32(int32_t(jb * 32))));
  if (ja + kSpqmmWindow > p.k) live_columns(c, ja, max_col);
  if (second && jb + kSpqmmWindow > p.k) live_columns(c + kSpqmmRows, jb, max_col);
}

// Sparse mode in bfloat16 compute (AVX512-BF16), 16 batch rows in the lanes: sparse_batch with the
// steps of a group taken in pairs. Lane i of two steps holds two weights of the same row (16 g +
// i): they are rounded to bf16 and packed into one 32-bit word (bf16_pairs, the first step's in
// the low half), and their two columns' activations interleaved by one word permute, so that one
// vdpbf16ps, the weight pair broadcast within it, does both slots' products for 16 batch rows:
// two loads of 32 bytes, a permute and a dot product per two slots, where the float kernel takes a
// broadcast, a 64-byte load and an FMA per slot (on Zen 4 about 1.3 cycles a slot against 2.3).
// A group's odd last step is paired with a zero weight. Products are exact in float, sums float,
// denormals read as zero (the instructions' rule).
//
// xt: `tiles` (1 to kBf16Tiles) tiles of 16 batch rows, tile_stride elements apart, each bf16 bit
// patterns [K + 32][16] (zero past K and past the valid rows); rows: the valid batch rows from
// the first tile on; y [rows][ldy] gets bias + products. Each run of steps is decoded once for
// all the tiles (the decode costs about what the products of one tile do); with one tile the
// accumulators stay in registers, with more they go to L1 between runs.
constexpr int kBf16Pairs = 16;  // pairs of steps decoded ahead of their products
constexpr int kBf16Tiles = 4;   // tiles per decode: 64 batch rows, 512 KB of x at K = 4096 (L2)

template <Lut L>
DCX_AVX512_BF16_FN void sparse_batch_bf16(const SpqmmPacked& p, int64_t g0, int64_t g1, const float* table,
                                          const uint16_t* xt, int tiles, int64_t tile_stride, int64_t rows,
                                          const float* bias, float* y, int64_t ldy, SpqmmSeen* seen) {
  const Table tab = load_table(table);
  __m512i max_id = _mm512_setzero_si512();
  int64_t max_col = -1;
  alignas(64) uint32_t wb[kBf16Pairs][kSpqmmRows];  // the pair's two bf16 weights
  alignas(64) int32_t ca[kBf16Pairs][kSpqmmRows];   // byte offsets in a tile of the pair's two columns
  alignas(64) int32_t cb[kBf16Pairs][kSpqmmRows];
  alignas(64) float partial[kBf16Tiles][kSpqmmRows][16];  // accumulators of the tiles between runs
  // Word 2 d of the permute's result: word d of the first column's 16; word 2 d + 1: of the second's.
  alignas(64) static const uint16_t kInterleave[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                       8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  // vcvtne2ps2bf16 puts the first step's 16 weights in words 0 to 15, the second's in 16 to 31.
  alignas(64) static const uint16_t kPairWords[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_loadu_si512(kInterleave), pair_words = _mm512_loadu_si512(kPairWords);
  // Codebooks of up to 32 entries without group scales: the codebook as 32 bf16 words, and the
  // weights of a pair of steps looked up in one word permute (bf16_step_pair); else sparse_step's
  // float weights, rounded in pairs. (vdpbf16ps reads a denormal as zero, as vcvtne2ps2bf16 would
  // have made it, so both give the same products.)
  const bool word_table = (L == Lut::k16 || L == Lut::k32) && p.group_scale == nullptr;
  alignas(64) uint16_t table_words[32];
  for (int i = 0; i < 32; ++i) table_words[i] = bf16_bits(table[i]);
  const __m512i bf16_table = _mm512_loadu_si512(table_words);
  __m512i max_id_words = _mm512_setzero_si512();
  SpqmmStepScales scales(p);
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[kSpqmmRows];
#pragma GCC unroll 16
    for (int i = 0; i < kSpqmmRows; ++i) acc[i] = _mm512_setzero_ps();
    if (tiles > 1) std::memset(partial, 0, sizeof partial);
    for (int64_t s0 = p.group_ptr[g], end = p.group_ptr[g + 1]; s0 < end; s0 += 2 * kBf16Pairs) {
      const int pairs = static_cast<int>((std::min<int64_t>(2 * kBf16Pairs, end - s0) + 1) / 2);
      for (int t = 0; t < pairs; ++t) {
        // The codes 64 steps ahead (a pair's are one cache line) and the windows 256 ahead, as
        // sparse_chunk fetches them: the hardware prefetcher left the decode waiting on memory.
        const int64_t s = s0 + 2 * t;
        _mm_prefetch(reinterpret_cast<const char*>(p.codes + std::min(s + 64, p.steps - 1) * kSpqmmRows), _MM_HINT_T0);
        if ((s & 15) < 2)  // once per 16 steps (64 bytes of windows), s being odd or even
          _mm_prefetch(reinterpret_cast<const char*>(p.windows + std::min(s + 256, p.steps - 1)), _MM_HINT_T0);
        if (word_table) {
          bf16_step_pair(p, s, s + 1 < end, bf16_table, pair_words, wb[t], ca[t], cb[t], &max_id_words, &max_col);
          continue;
        }
        const SparseStep a = sparse_step<L>(p, tab, scales, s, g, &max_id, &max_col);
        __m512 w_b = _mm512_setzero_ps();
        __m512i col_b = a.col;
        if (s + 1 < end) {
          const SparseStep b = sparse_step<L>(p, tab, scales, s + 1, g, &max_id, &max_col);
          w_b = b.w;
          col_b = b.col;
        }
        _mm512_store_si512(wb[t], bf16_pairs(a.w, w_b, pair_words));
        _mm512_store_si512(ca[t], _mm512_slli_epi32(a.col, 5));  // 32 bytes a column
        _mm512_store_si512(cb[t], _mm512_slli_epi32(col_b, 5));
      }
      for (int tile = 0; tile < tiles; ++tile) {
        const char* xb = reinterpret_cast<const char*>(xt + tile * tile_stride);
        if (tiles > 1) {
#pragma GCC unroll 16
          for (int i = 0; i < kSpqmmRows; ++i) acc[i] = _mm512_load_ps(partial[tile][i]);
        }
        for (int t = 0; t < pairs; ++t) {
#pragma GCC unroll 16
          for (int i = 0; i < kSpqmmRows; ++i)
            acc[i] = dpbf16_pair(acc[i], xb + ca[t][i], xb + cb[t][i], interleave, &wb[t][i]);
        }
        if (tiles > 1) {
#pragma GCC unroll 16
          for (int i = 0; i < kSpqmmRows; ++i) _mm512_store_ps(partial[tile][i], acc[i]);
        }
      }
    }
    for (int tile = 0; tile < tiles; ++tile) {
      if (tiles > 1) {
#pragma GCC unroll 16
        for (int i = 0; i < kSpqmmRows; ++i) acc[i] = _mm512_load_ps(partial[tile][i]);
      }
      const int mvalid = static_cast<int>(std::min<int64_t>(16, rows - 16 * tile));
      batch_store(p, g, acc, mvalid, bias, y + tile * 16 * ldy, ldy);
    }
  }
  max_id = _mm512_max_epu32(max_id, _mm512_max_epu32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(max_id_words)),
                                                       _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(max_id_words, 1))));
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
  seen->max_col = std::max<int64_t>(seen->max_col, max_col);
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

// Bytes ahead of the codes being read that a dense row kernel prefetches: the rows of a tile are
// one contiguous stream, and without it the core stalls on each line the hardware prefetcher has
// not brought yet (4096 x 4096 4-bit, one row, two threads: 1,175 us without, about 450 with 8 KB;
// 2 and 4 KB were slower, 12 and 16 KB no faster).
constexpr int64_t kDensePrefetch = 8192;

// Dense rows [r0, r1) for MB batch rows of x ([MB][ldx], zero past the valid ones): each weight
// is decoded once (16 at a time, a register lookup) and applied to every batch row; at MB = 1 four
// accumulators in turn keep four FMAs in flight. A whole block of 4-bit nibbles (16-entry lookup)
// costs per 16 weights one shift, one permute and the FMAs: the permute reads only an index's low
// 4 bits, so the ids need no mask, and their maximum is taken per byte only when the codebook has
// fewer than 16 entries.
template <Lut L, SpqmmDense D, int MB>
DCX_AVX512_FN void dense_rows(const SpqmmPacked& p, int64_t r0, int64_t r1, const float* table,
                              const float* x, int64_t ldx, int mvalid, const float* bias,
                              float* y, int64_t ldy, SpqmmSeen* seen) {
  constexpr int kAcc = MB >= 4 ? 1 : 4 / MB;
  constexpr int kCols = kBlockCols<D>, kT = kCols / 16;
  constexpr bool kNibbles16 = D == SpqmmDense::kNibbles && L == Lut::k16;
  const Table tab = load_table(table);
  const BitIds bi = bit_ids_setup(D == SpqmmDense::kBits ? p.bits : 8);
  const int64_t K = p.k, blocks = (K + kCols - 1) / kCols;
  const int64_t block_bytes = D == SpqmmDense::kBits ? kCols / 8 * p.bits : D == SpqmmDense::kNibbles ? kCols / 2 : kCols;
  const bool track_nibbles = p.codebook_size < 16;
  const __m512i nibble = _mm512_set1_epi32(0x0F0F0F0F);
  __m512i max_id = _mm512_setzero_si512(), max_nibble = _mm512_setzero_si512();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.dense_codes + r * p.dense_width;
    __m512 acc[MB][kAcc];
    for (int m = 0; m < MB; ++m)
      for (int a = 0; a < kAcc; ++a) acc[m][a] = _mm512_setzero_ps();
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const bool whole = kCols * (blk + 1) <= K;
      _mm_prefetch(reinterpret_cast<const char*>(row + block_bytes * blk + kDensePrefetch), _MM_HINT_T0);
      if constexpr (kNibbles16) {
        if (whole && !p.group_scale) {
          const __m512i block = _mm512_loadu_si512(row + block_bytes * blk);
          if (track_nibbles) {
            max_nibble = _mm512_max_epu8(max_nibble, _mm512_and_si512(block, nibble));
            max_nibble = _mm512_max_epu8(max_nibble, _mm512_and_si512(_mm512_srli_epi32(block, 4), nibble));
          }
#pragma GCC unroll 8
          for (int t = 0; t < kT; ++t) {
            const __m512 w = _mm512_permutexvar_ps(t == 0 ? block : _mm512_srli_epi32(block, 4 * t), tab.t[0]);
            const int64_t j = kCols * blk + 16 * t;
            for (int m = 0; m < MB; ++m)
              acc[m][t % kAcc] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * ldx + j), acc[m][t % kAcc]);
          }
          continue;
        }
      }
#pragma GCC unroll 8
      for (int t = 0; t < kT; ++t) {
        const int64_t j = kCols * blk + 16 * t;
        const __mmask16 valid = whole ? __mmask16(0xFFFF) : tail_mask(K, j);
        __m512i id = ids16<D>(row, blk, t, bi, valid);
        if (!whole) id = _mm512_maskz_mov_epi32(valid, id);
        max_id = _mm512_max_epu32(max_id, id);
        __m512 w = lookup<L>(tab, id);
        if (p.group_scale) w = _mm512_mul_ps(w, _mm512_set1_ps(spqmm_group_scale(p, r, j)));
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
  uint32_t most = _mm512_reduce_max_epu32(max_id);
  if (kNibbles16 && track_nibbles) {
    alignas(64) uint8_t nibbles[64];
    _mm512_storeu_si512(nibbles, max_nibble);
    for (uint8_t v : nibbles) most = std::max<uint32_t>(most, v);
  }
  seen->max_id = std::max<uint32_t>(seen->max_id, most);
}

// Sparse decode of rows [r0, r1) (r0 a multiple of 16) into w ([r1 - r0, K] floats, zeroed
// here): per step sparse_step's vectors, then one scalar store per live slot, found by the bits of
// the live mask (padding slots are skipped: one at a column a row's weight holds would overwrite
// it). A live slot at column K or past (corrupted data) is not written; the running maxima report
// it. (The portable decode, a branch and a table read per slot, took 24 cycles a slot.)
template <Lut L>
DCX_AVX512_FN void sparse_decode_rows(const SpqmmPacked& p, int64_t r0, int64_t r1,
                                      const float* table, float* w, SpqmmSeen* seen) {
  const int64_t K = p.k;
  std::fill(w, w + (r1 - r0) * K, 0.f);
  const Table tab = load_table(table);
  __m512i max_id = _mm512_setzero_si512();
  int64_t max_col = -1;
  alignas(64) float wb[kSpqmmRows];
  alignas(64) int32_t cb[kSpqmmRows];
  SpqmmStepScales scales(p);
  for (int64_t g = r0 / kSpqmmRows; g < spqmm_groups(r1); ++g) {
    const uint32_t in_range = rows_in_range(g, r1);
    float* wg = w + (g * kSpqmmRows - r0) * K;
    for (int64_t s = p.group_ptr[g]; s < p.group_ptr[g + 1]; ++s) {
      const SparseStep st = sparse_step<L>(p, tab, scales, s, g, &max_id, &max_col);
      _mm512_store_ps(wb, st.w);
      _mm512_storeu_si512(cb, st.col);
      for (uint32_t todo = uint32_t(st.live) & in_range; todo; todo &= todo - 1) {
        const int i = __builtin_ctz(todo);
        if (cb[i] < K) wg[i * K + cb[i]] = wb[i];
      }
    }
  }
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
  seen->max_col = std::max<int64_t>(seen->max_col, max_col);
}

// q8_round on 16 lanes: round half to even, clamped to [-127, 127], a NaN to -127 (max_ps returns
// its second operand when one is NaN).
DCX_AVX512_FN DCX_ALWAYS_INLINE __m512i q8_round16(__m512 v, __m512 inverse) {
  const __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-kQ8Max)), _mm512_set1_ps(kQ8Max)));
}

// Sparse rows [r0, r1) (r0 a multiple of 16) straight into int8 rows q ([r1 - r0, K], zeroed
// here) with their scales sw ([r1 - r0]), as q8_quantize_whole_row quantizes the decoded rows (the
// int8 GEMM's rule, core/spqmm_int8.h), without them: per group a pass over its steps for each
// row's largest |weight| (its lane's maximum of the bit patterns), then a second one that rounds
// each live slot's weight and stores one byte. (Decoding into floats first cost a 256 KB buffer
// per group, zeroed, written and read again.) Padding and columns past K as sparse_decode_rows.
template <Lut L>
DCX_AVX512_FN void sparse_quantize_rows(const SpqmmPacked& p, int64_t r0, int64_t r1,
                                        const float* table, int8_t* q, float* sw, SpqmmSeen* seen) {
  const int64_t K = p.k;
  std::fill(q, q + (r1 - r0) * K, int8_t(0));
  const Table tab = load_table(table);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  __m512i max_id = _mm512_setzero_si512(), unused_id = max_id;
  int64_t max_col = -1, unused_col = -1;
  alignas(64) float inv[kSpqmmRows];
  alignas(64) int32_t cb[kBatchSteps * kSpqmmRows], qb[kBatchSteps * kSpqmmRows];
  uint32_t live[kBatchSteps];
  alignas(64) uint32_t amax_bits[kSpqmmRows];
  SpqmmStepScales scales(p);
  for (int64_t g = r0 / kSpqmmRows; g < spqmm_groups(r1); ++g) {
    const uint32_t in_range = rows_in_range(g, r1);
    __m512i most = _mm512_setzero_si512();
    for (int64_t s = p.group_ptr[g]; s < p.group_ptr[g + 1]; ++s) {
      const SparseStep st = sparse_step<L>(p, tab, scales, s, g, &max_id, &max_col);
      most = _mm512_max_epu32(most, _mm512_and_si512(_mm512_castps_si512(st.w), abs_mask));
    }
    _mm512_storeu_si512(amax_bits, most);
    for (int i = 0; i < kSpqmmRows; ++i) {
      inv[i] = 0.f;
      if (!((in_range >> i) & 1)) continue;
      float amax;
      std::memcpy(&amax, amax_bits + i, sizeof(amax));
      inv[i] = q8_inverse(amax);
      sw[g * kSpqmmRows - r0 + i] = q8_scale(amax);
    }
    int8_t* qg = q + (g * kSpqmmRows - r0) * K;
    const __m512 inv_v = _mm512_load_ps(inv);
    // The maxima seen already: runs of kBatchSteps steps quantized into buffers, then stored a
    // byte a slot (read back straight after its 64-byte store, a step cost three times as much).
    for (int64_t s0 = p.group_ptr[g]; s0 < p.group_ptr[g + 1]; s0 += kBatchSteps) {
      const int run = static_cast<int>(std::min<int64_t>(kBatchSteps, p.group_ptr[g + 1] - s0));
      for (int t = 0; t < run; ++t) {
        const SparseStep st = sparse_step<L>(p, tab, scales, s0 + t, g, &unused_id, &unused_col);
        _mm512_storeu_si512(qb + t * kSpqmmRows, q8_round16(st.w, inv_v));
        _mm512_storeu_si512(cb + t * kSpqmmRows, st.col);
        live[t] = uint32_t(st.live) & in_range;
      }
      for (int t = 0; t < run; ++t)
        for (uint32_t todo = live[t]; todo; todo &= todo - 1) {
          const int i = __builtin_ctz(todo);
          const int32_t col = cb[t * kSpqmmRows + i];
          if (col < K) qg[i * K + col] = int8_t(qb[t * kSpqmmRows + i]);
        }
    }
  }
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
  seen->max_col = std::max<int64_t>(seen->max_col, max_col);
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
        __m512 v = lookup<L>(tab, id);
        if (p.group_scale) v = _mm512_mul_ps(v, _mm512_set1_ps(spqmm_group_scale(p, r, j)));
        _mm512_mask_storeu_ps(wr + j, valid, v);
      }
    }
  }
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
}

// Rows of W decoded into pairs of 16-bit weights (one int32 per pair of columns), the layout the
// bf16 AMX kernels (core/spqmm_amx.h) read: a 16-bit table of the codebook (its bf16 bit
// patterns) looked up by the ids.

// A 16-bit codebook table as two lookup tables of int32 bit patterns (read through the float lookups,
// which move bits unchanged): entry i zero-extended (the low half of a pair) and shifted left by
// 16 (the high half).
// The first 128 entries also as byte planes (bytes: entry i's low byte at byte i, its high byte
// at byte 128 + i), for the VBMI decode of 5 to 7-bit ids.
struct PairTables {
  Table lo, hi;
  __m512i bytes[4];
};

DCX_AVX512_FN inline PairTables pair_tables(const int16_t* table) {
  alignas(64) uint32_t lo[256], hi[256];
  alignas(64) uint8_t bytes[256];
  for (int i = 0; i < 256; ++i) {
    lo[i] = uint16_t(table[i]);
    hi[i] = lo[i] << 16;
    if (i < 128) {
      bytes[i] = uint8_t(lo[i]);
      bytes[128 + i] = uint8_t(lo[i] >> 8);
    }
  }
  PairTables t;
  for (int i = 0; i < 4; ++i) t.bytes[i] = _mm512_load_si512(bytes + 64 * i);
  float bits[256];
  std::memcpy(bits, lo, sizeof bits);
  t.lo = load_table(bits);
  std::memcpy(bits, hi, sizeof bits);
  t.hi = load_table(bits);
  return t;
}

// Columns [j0, j1) of rows [r0, r1) of W as int16 pairs into w ([r1 - r0][ldw] int32, pair d of
// the block of 32 columns from j0 + 32 c at w[.][16 c + d]), the pair holding columns 32 c + d
// (low half) and 32 c + 16 + d (high half); j0 a multiple of the layout's block (128 or 64
// columns), j1 too or K. Columns past K read id 0 (their activations are zero).
template <Lut L, SpqmmDense D>
DCX_AVX512_FN void q8_decode_pairs(const SpqmmPacked& p, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                                   const PairTables& tab, int32_t* w, int64_t ldw, SpqmmSeen* seen) {
  constexpr int kCols = kBlockCols<D>, kU = kCols / kQ8Block;
  const BitIds bi = bit_ids_setup(D == SpqmmDense::kBits ? p.bits : 8);
  const int64_t K = p.k, blk0 = j0 / kCols, blk1 = (std::min(j1, K) + kCols - 1) / kCols;
  __m512i max_id = _mm512_setzero_si512(), max_nibble = _mm512_setzero_si512();
  const __m512i nibble = _mm512_set1_epi32(0x0F0F0F0F);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.dense_codes + r * p.dense_width;
    int32_t* out = w + (r - r0) * ldw;  // block b of the row at out[(b - j0 / 32) * 16]
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      if constexpr (D == SpqmmDense::kNibbles && L == Lut::k16) {
        // A whole block of 4-bit ids: byte u of 32-bit lane d holds columns 32 u + d and 32 u +
        // 16 + d, exactly a pair, and the 16-entry lookup reads only an index's low 4 bits, so a
        // pair costs two shifts, two lookups and an or; the ids' maximum is taken per byte.
        if (kCols * (blk + 1) <= K) {
          const __m512i block = _mm512_loadu_si512(row + (kSpqmmNibbleBlock / 2) * blk);
          max_nibble = _mm512_max_epu8(max_nibble, _mm512_and_si512(block, nibble));
          max_nibble = _mm512_max_epu8(max_nibble, _mm512_and_si512(_mm512_srli_epi32(block, 4), nibble));
#pragma GCC unroll 4
          for (int u = 0; u < kU; ++u) {
            const __m512i v = _mm512_srli_epi32(block, 8 * u);
            const __m512i pair = _mm512_or_si512(
                _mm512_castps_si512(lookup<L>(tab.lo, v)),
                _mm512_castps_si512(lookup<L>(tab.hi, _mm512_srli_epi32(v, 4))));
            _mm512_storeu_si512(out + ((kCols * blk - j0) / kQ8Block + u) * kQ8Pairs, pair);
          }
          continue;
        }
      }
#pragma GCC unroll 4
      for (int u = 0; u < kU; ++u) {
        const int64_t j = kCols * blk + kQ8Block * u;
        if (j >= K) break;
        const __mmask16 va = tail_mask(K, j), vb = tail_mask(K, j + 16);
        const __m512i ida = _mm512_maskz_mov_epi32(va, ids16<D>(row, blk, 2 * u, bi, va));
        const __m512i idb = _mm512_maskz_mov_epi32(vb, ids16<D>(row, blk, 2 * u + 1, bi, vb));
        max_id = _mm512_max_epu32(max_id, _mm512_max_epu32(ida, idb));
        const __m512i pair = _mm512_or_si512(_mm512_castps_si512(lookup<L>(tab.lo, ida)),
                                             _mm512_castps_si512(lookup<L>(tab.hi, idb)));
        _mm512_storeu_si512(out + ((j - j0) / kQ8Block) * kQ8Pairs, pair);
      }
    }
  }
  alignas(64) uint8_t nibbles[64];
  _mm512_storeu_si512(nibbles, max_nibble);
  uint32_t most = _mm512_reduce_max_epu32(max_id);
  for (uint8_t v : nibbles) most = std::max<uint32_t>(most, v);
  seen->max_id = std::max(seen->max_id, most);
}

// The columns j, j + 1, ... of a 64-byte block that lie below k, as a byte mask.
inline __mmask64 columns_below(int64_t j, int64_t k) {
  return j >= k ? __mmask64(0) : k - j >= 64 ? ~__mmask64(0) : (__mmask64(1) << (k - j)) - 1;
}

// 64 ids of a dense row a unit (q8_unit_column order), for layout D; bit-packed ids (5 to 7
// bits, a unit of 8 * bits bytes) by one byte permute that puts the bytes of each group of 8 ids
// at the start of a 64-bit lane and one multishift that moves each id to its own byte.
template <SpqmmDense D>
struct UnitIds {
  __m512i spread, shifts, id_mask;
  __mmask64 bit_load;
  int bits;
  DCX_AVX512_VBMI_FN explicit UnitIds(int b) : bits(b) {
    alignas(64) uint8_t sp[64], sh[64];
    for (int g = 0; g < 8; ++g)
      for (int t = 0; t < 8; ++t) {
        sp[8 * g + t] = uint8_t(std::min(g * b + t, 63));
        sh[8 * g + t] = uint8_t(t * b);
      }
    spread = _mm512_load_si512(sp);
    shifts = _mm512_load_si512(sh);
    id_mask = _mm512_set1_epi8(char(D == SpqmmDense::kNibbles ? 0x0F : (1 << std::min(b, 7)) - 1));
    bit_load = b < 8 ? (uint64_t(1) << (8 * b)) - 1 : ~uint64_t(0);
  }
  // f(u, ids) for the units [u0, u1), every column of them below K (nibbles: u0 and u1 even; one
  // load yields two units).
  template <class F>
  DCX_AVX512_VBMI_FN DCX_ALWAYS_INLINE void each_full(const uint8_t* row, int64_t u0, int64_t u1, F&& f) const {
    if constexpr (D == SpqmmDense::kNibbles) {
      for (int64_t u = u0; u < u1; u += 2) {
        const __m512i v = _mm512_loadu_si512(row + 32 * u);
        f(u, _mm512_and_si512(v, id_mask));
        f(u + 1, _mm512_and_si512(_mm512_srli_epi32(v, 4), id_mask));
      }
    } else {
      for (int64_t u = u0; u < u1; ++u) f(u, get(row, u, ~__mmask64(0)));
    }
  }
  // Unit u's ids; `valid` its columns below K (the bytes layout reads no further).
  DCX_AVX512_VBMI_FN __m512i get(const uint8_t* row, int64_t u, __mmask64 valid) const {
    if constexpr (D == SpqmmDense::kNibbles) {
      const __m512i v = _mm512_loadu_si512(row + 64 * (u >> 1));
      return _mm512_and_si512((u & 1) ? _mm512_srli_epi32(v, 4) : v, id_mask);
    } else if constexpr (D == SpqmmDense::kBits) {
      const __m512i raw = _mm512_maskz_loadu_epi8(bit_load, row + u * 8 * bits);
      return _mm512_and_si512(_mm512_multishift_epi64_epi8(shifts, _mm512_permutexvar_epi8(spread, raw)), id_mask);
    } else {
      return _mm512_maskz_loadu_epi8(valid, row + 64 * u);
    }
  }
};

// q8_decode_pairs for 5 to 7-bit ids (the bit-packed layout) with AVX-512 VBMI, a block of 64
// columns (8 bits bytes) at a time: one byte permute puts the `bits` bytes of each group of 8 ids
// at the start of a 64-bit lane, one multishift moves each id to its own byte, two byte permutes
// (vpermi2b for 7 bits) look up the low and high bytes of its 16-bit entry, and one two-source
// byte permute per 32 columns interleaves them into pairs: about a dozen instructions for 64
// weights, where the 32-bit lanes of q8_decode_pairs took five times as many. j0 a multiple of 64.
template <Lut L>
DCX_AVX512_VBMI_FN void q8_decode_pairs_vbmi(const SpqmmPacked& p, int64_t r0, int64_t r1, int64_t j0,
                                             int64_t j1, const PairTables& tab, int32_t* w, int64_t ldw,
                                             SpqmmSeen* seen) {
  const UnitIds<SpqmmDense::kBits> unit(p.bits);
  const int64_t K = p.k, blk0 = j0 / kSpqmmBitBlock;
  const int64_t blk1 = (std::min(j1, K) + kSpqmmBitBlock - 1) / kSpqmmBitBlock;
  alignas(64) uint8_t pairs[2][64];
  // Pair d of the 32 columns from 32 u: bytes (low, high) of column 32 u + d, then of 32 u + 16 + d;
  // the high bytes are the second source (index + 64).
  for (int u = 0; u < 2; ++u)
    for (int d = 0; d < 16; ++d) {
      pairs[u][4 * d] = uint8_t(32 * u + d);
      pairs[u][4 * d + 1] = uint8_t(64 + 32 * u + d);
      pairs[u][4 * d + 2] = uint8_t(32 * u + 16 + d);
      pairs[u][4 * d + 3] = uint8_t(64 + 32 * u + 16 + d);
    }
  const __m512i pairs0 = _mm512_load_si512(pairs[0]), pairs1 = _mm512_load_si512(pairs[1]);
  __m512i max_id = _mm512_setzero_si512();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.dense_codes + r * p.dense_width;
    int32_t* out = w + (r - r0) * ldw;
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const int64_t j = kSpqmmBitBlock * blk;
      const __mmask64 valid = columns_below(j, K);
      const __m512i live = _mm512_maskz_mov_epi8(valid, unit.get(row, blk, valid));  // past K: id 0
      max_id = _mm512_max_epu8(max_id, live);
      __m512i lo, hi;
      if constexpr (L == Lut::k128) {
        lo = _mm512_permutex2var_epi8(tab.bytes[0], live, tab.bytes[1]);
        hi = _mm512_permutex2var_epi8(tab.bytes[2], live, tab.bytes[3]);
      } else {
        lo = _mm512_permutexvar_epi8(live, tab.bytes[0]);
        hi = _mm512_permutexvar_epi8(live, tab.bytes[2]);
      }
      int32_t* o = out + ((j - j0) / kQ8Block) * kQ8Pairs;
      _mm512_storeu_si512(o, _mm512_permutex2var_epi8(lo, pairs0, hi));
      if (j + kQ8Block < K) _mm512_storeu_si512(o + kQ8Pairs, _mm512_permutex2var_epi8(lo, pairs1, hi));
    }
  }
  alignas(64) uint8_t most[64];
  _mm512_storeu_si512(most, max_id);
  for (uint8_t v : most) seen->max_id = std::max<uint32_t>(seen->max_id, v);
}

// Fetch the cache line at p into L1. Inline assembly, because GCC deletes a loop whose only
// statements are __builtin_prefetch (it has no effect the language can observe).
DCX_ALWAYS_INLINE void prefetch_line(const uint8_t* p) {
#if defined(__x86_64__) && defined(__GNUC__)
  asm volatile("prefetcht0 %0" : : "m"(*p));
#else
  (void)p;
#endif
}

// The codes of rows [row0, row0 + rows) (those that exist), columns [j0, j0 + cols), fetched into
// L1: the dense kernels that decode a chunk of rows at a time fetch the next chunk's this way.
DCX_ALWAYS_INLINE void prefetch_chunk(const SpqmmPacked& p, int64_t row0, int64_t rows, int64_t j0,
                                      int64_t cols) {
  const int64_t K = std::max<int64_t>(p.k, 1);
  const int64_t from = std::min(p.dense_width, j0 * p.dense_width / K);
  const int64_t to = std::min(p.dense_width, from + std::max<int64_t>(1, p.dense_width * cols / K));
  for (int64_t row = row0; row < std::min(p.n, row0 + rows); ++row)
    for (int64_t at = from; at < to; at += 64) prefetch_line(p.dense_codes + row * p.dense_width + at);
}

// ---- The many-rows int8 rule fused (SpqmmKernel::kInt8Fused; core/spqmm_int8.h) ----
// Each row of W quantized whole to int8 as the int8 GEMM's rule does, but in one pass and with no
// copy of W: a first pass over the row's ids finds its largest weight (the largest rank of |c| by
// one byte permute per 64 ids), which gives the row's scale and its own table, id -> q; the row
// is then decoded chunk by chunk by one permute per 64 ids and multiplied by vpdpbusd (64 u8 x
// s8 products an instruction, twice vpdpwssd's), a weight's 4 bytes broadcast from memory within
// the instruction against 16 batch rows' 4 activations, staged as x + 128 (unsigned). The 128
// adds 128 times the row of W's sum to each dot, taken off at the end. (With the weights as the
// unsigned operand, broadcast by an instruction of their own, the products ran at 2.6 cycles a
// vpdpbusd.) Needs VNNI and VBMI.

// Per call: the codebook's order by magnitude and its entries (256, zero past the codebook).
struct FusedTables {
  alignas(64) uint8_t rank[256];  // id -> rank of |c[id]| (largest bit pattern last)
  float by_rank[256];             // rank -> |c|
  float codebook[256];
  int entries = 16;               // table entries a row builds: 2^bits, at least 16
};

// The tables of a codebook of n <= 256 entries, ranked by the bit pattern of |c| (a NaN is the
// largest, so a row that uses it gets a NaN scale, as the GEMM's rule does).
inline FusedTables fused_tables(const float* codebook, int64_t n, int bits) {
  FusedTables ft;
  n = std::min<int64_t>(n, 256);
  std::memset(ft.rank, 0, sizeof(ft.rank));
  std::fill(ft.by_rank, ft.by_rank + 256, 0.f);
  std::fill(ft.codebook, ft.codebook + 256, 0.f);
  std::vector<std::pair<uint32_t, int64_t>> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, codebook + i, sizeof(b));
    order[size_t(i)] = {b & 0x7fffffffu, i};
    ft.codebook[i] = codebook[i];
  }
  std::sort(order.begin(), order.end());
  for (int64_t j = 0; j < n; ++j) {
    ft.rank[order[size_t(j)].second] = uint8_t(j);
    std::memcpy(ft.by_rank + j, &order[size_t(j)].first, sizeof(float));
  }
  ft.entries = std::max(16, 1 << std::min(bits, 8));
  return ft;
}

constexpr int kFusedRows = 8;         // rows of W per pass (the accumulators: 8 per lane group)
// Units of 64 ids per chunk: 8 rows x 512 bytes in L1 (the few-rows order too: 4096 x 4096, 4
// bits, 4 rows, two threads, chunks of 4 / 8 / 16 / 32 units: 345 / 302 / 336 / 436 us).
constexpr int64_t kFusedChunk = 8;

// Bytes of a 256-entry table t (4 vectors; only the first 2^bits entries read) at 64 ids.
template <Lut L>
DCX_AVX512_Q8_FN __m512i lookup_bytes(__m512i ids, const __m512i* t) {
  if constexpr (L == Lut::k128) {
    return _mm512_permutex2var_epi8(t[0], ids, t[1]);
  } else if constexpr (L == Lut::k256) {
    const __m512i lo = _mm512_permutex2var_epi8(t[0], ids, t[1]);
    const __m512i hi = _mm512_permutex2var_epi8(t[2], ids, t[3]);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(ids), lo, hi);
  } else {
    return _mm512_permutexvar_epi8(ids, t[0]);
  }
}

// Unit u's columns below K, as a byte mask.
inline __mmask64 unit_valid(SpqmmDense layout, int64_t u, int64_t K) {
  const int64_t base = layout == SpqmmDense::kNibbles ? 128 * (u >> 1) : 64 * u;
  if (base + (layout == SpqmmDense::kNibbles ? 128 : 64) <= K) return ~__mmask64(0);
  __mmask64 valid = 0;
  for (int i = 0; i < 64; ++i)
    if (q8_unit_column(layout, u, i) < K) valid |= __mmask64(1) << i;
  return valid;
}

// acc + x (unsigned bytes) times the 4 signed bytes at w, broadcast within the instruction
// ({1to16}; GCC 12 emits a vpbroadcastd of its own for _mm512_set1_epi32, which took a vector
// pipe slot of its own: 2.6 cycles a vpdpbusd at one lane group).
DCX_AVX512_Q8_FN DCX_ALWAYS_INLINE __m512i dpbusd_broadcast(__m512i acc, __m512i x, const int32_t* w) {
#if defined(DCX_AVX512_EMULATE)
  return _mm512_dpbusd_epi32(acc, x, _mm512_set1_epi32(*w));
#else
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(x), "m"(*w));
  return acc;
#endif
}

// sums [G][kFusedRows][16] += the decoded rows w (int32 words of 4 int8, ldw a row) times quads
// [0, quads) of G lane groups of staged activations (x, ldx words a group).
template <int G>
DCX_AVX512_Q8_FN void fused_apply(const int32_t* w, int64_t ldw, int64_t quads, const int32_t* x,
                                  int64_t ldx, int32_t* sums) {
  __m512i acc[G][kFusedRows];
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int i = 0; i < kFusedRows; ++i) acc[g][i] = _mm512_loadu_si512(sums + (g * kFusedRows + i) * kQ8Lanes);
  for (int64_t d = 0; d < quads; ++d) {
    __m512i xd[G];
#pragma GCC unroll 2
    for (int g = 0; g < G; ++g) xd[g] = _mm512_loadu_si512(x + g * ldx + d * kQ8Lanes);
#pragma GCC unroll 8
    for (int i = 0; i < kFusedRows; ++i)
#pragma GCC unroll 2
      for (int g = 0; g < G; ++g) acc[g][i] = dpbusd_broadcast(acc[g][i], xd[g], w + i * ldw + d);
  }
#pragma GCC unroll 16
  for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
    for (int i = 0; i < kFusedRows; ++i) _mm512_storeu_si512(sums + (g * kFusedRows + i) * kQ8Lanes, acc[g][i]);
}

// The few-rows order (SpqmmKernel::kInt8Dots): with fewer batch rows than lanes, the lanes of
// fused_apply sit idle (4 rows: three quarters of each vpdpbusd wasted), so each row of x is
// staged whole in unit order and multiplied by the decoded rows of W a unit at a time, the 16
// lanes of a product holding partial dots (a lane per 4 columns), summed once a row of W ends.

// Rows of xq ([m][k] int8, quantized whole) in unit order as unsigned bytes x + 128 (128, a
// zero, past k): xu [m][ldu] (ldu 0: units * 64; bytes layout, a multiple of 64 past that, the
// rest 128 too), byte i of unit u of a row its column q8_unit_column(u, i).
DCX_AVX512_Q8_FN void stage_units(const int8_t* xq, int64_t m, int64_t k, SpqmmDense layout, uint8_t* xu,
                                  int64_t ldu = 0) {
  const int64_t units = q8_units(layout, k);
  if (ldu == 0) ldu = units * 64;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  alignas(64) uint8_t order[2][64];  // nibbles: a block of 128 columns -> its two units
  for (int h = 0; h < 2; ++h)
    for (int i = 0; i < 64; ++i) order[h][i] = uint8_t(q8_unit_column(SpqmmDense::kNibbles, h, i));
  const __m512i low = _mm512_load_si512(order[0]), high = _mm512_load_si512(order[1]);
  for (int64_t row = 0; row < m; ++row) {
    const int8_t* q = xq + row * k;
    uint8_t* out = xu + row * ldu;
    if (layout == SpqmmDense::kNibbles) {
      for (int64_t u = 0; u < units; u += 2) {
        const int64_t j = 64 * u;
        const __m512i a = _mm512_maskz_loadu_epi8(columns_below(j, k), q + j);
        const __m512i b = _mm512_maskz_loadu_epi8(columns_below(j + 64, k), q + std::min(j + 64, k));
        _mm512_storeu_si512(out + 64 * u, _mm512_xor_si512(_mm512_permutex2var_epi8(a, low, b), flip));
        _mm512_storeu_si512(out + 64 * u + 64, _mm512_xor_si512(_mm512_permutex2var_epi8(a, high, b), flip));
      }
    } else {
      for (int64_t u = 0; u < ldu / 64; ++u)
        _mm512_storeu_si512(out + 64 * u, _mm512_xor_si512(_mm512_maskz_loadu_epi8(columns_below(64 * u, k), q + std::min(64 * u, k)), flip));
    }
  }
}

// q8_stage_quads (core/spqmm_int8.h) for lane group g, vectorised: the group's rows staged a row at
// a time by stage_units into rows ([16][units * 64] bytes; rows past m all 128, a zero), then
// each quad of the 16 rows gathered into one vector (quad q of a row is its bytes 4q .. 4q + 3).
// The scalar staging cost about 3.5 cycles a byte, 7% of the lanes order's time at 128 rows.
DCX_AVX512_Q8_FN void stage_quads(const int8_t* xq, int64_t m, int64_t k, SpqmmDense layout, int64_t g,
                                  uint8_t* rows, int32_t* xv) {
  const int64_t units = q8_units(layout, k), ldu = units * 64, m0 = g * kQ8Lanes;
  const int64_t here = std::max<int64_t>(0, std::min<int64_t>(kQ8Lanes, m - m0));
  stage_units(xq + m0 * k, here, k, layout, rows);
  std::memset(rows + here * ldu, 0x80, size_t((kQ8Lanes - here) * ldu));
  alignas(64) int32_t starts[kQ8Lanes];  // each row's first quad
  for (int l = 0; l < kQ8Lanes; ++l) starts[l] = static_cast<int32_t>(l * (ldu / 4));
  const __m512i at = _mm512_load_si512(starts);
  for (int64_t q = 0; q < units * 16; ++q)
    _mm512_storeu_si512(xv + q * kQ8Lanes, _mm512_i32gather_epi32(at, rows + 4 * q, 4));
}

// sums [kFusedRows][M][16] (ld: M * 16 between rows of W) += the decoded rows w (ldw bytes a
// row) times MB staged rows x (ldx bytes a row), over `units` units: IB rows of W by MB of x
// in registers, each weight vector loaded once for the MB rows, each row of x once for the IB.
template <int MB, int IB>
DCX_AVX512_Q8_FN void dots_apply(const int8_t* w, int64_t ldw, int64_t units, const uint8_t* x, int64_t ldx,
                                 int32_t* sums, int64_t ld) {
  __m512i acc[IB][MB];
#pragma GCC unroll 8
  for (int i = 0; i < IB; ++i)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[i][m] = _mm512_loadu_si512(sums + i * ld + m * kQ8Lanes);
  for (int64_t u = 0; u < units; ++u) {
    __m512i xm[MB];
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) xm[m] = _mm512_loadu_si512(x + m * ldx + u * 64);
#pragma GCC unroll 8
    for (int i = 0; i < IB; ++i) {
      const __m512i wv = _mm512_loadu_si512(w + i * ldw + u * 64);
#pragma GCC unroll 8
      for (int m = 0; m < MB; ++m) acc[i][m] = _mm512_dpbusd_epi32(acc[i][m], xm[m], wv);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < IB; ++i)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) _mm512_storeu_si512(sums + i * ld + m * kQ8Lanes, acc[i][m]);
}

// The two orders of the fused kernel's activations and sums.
enum class FusedOrder { kLanes, kDots };

// Rows [r0, r1) of W for M activation rows (sx their scales), staged as the order reads them:
// kLanes, q8_stage_quads' int32 quads of every lane group; kDots, stage_units' bytes.
// y[m][r] = sx[m] sw[r] (acc - 128 wsum[r]) + bias[r], as the GEMM's epilogue.
// w: kFusedRows * kFusedChunk * 64 bytes; sums: kFusedRows * 16 int32 per lane group (kLanes) or
// per row of x (kDots).
template <Lut L, SpqmmDense D, FusedOrder O = FusedOrder::kLanes>
DCX_AVX512_Q8_FN void q8_fused(const SpqmmPacked& p, int64_t r0, int64_t r1, const FusedTables& ft,
                               const void* staged, const float* sx, int64_t M, const float* bias,
                               float* y, int64_t ldy, int8_t* w, int32_t* sums, SpqmmSeen* seen) {
  constexpr int kVectors = L == Lut::k256 ? 4 : L == Lut::k128 ? 2 : 1;
  constexpr int64_t ldw = kFusedChunk * 64;
  const int64_t K = p.k, units = q8_units(D, K), quads = units * 16, groups = q8_lane_groups(M);
  const UnitIds<D> unit(p.bits);
  // The last units may hold columns past K (the bytes past them are not read as weights).
  int64_t full = units;
  while (full > 0 && unit_valid(D, full - 1, K) != ~__mmask64(0)) --full;
  if (D == SpqmmDense::kNibbles) full &= ~int64_t(1);  // the units of a block whole (each_full)
  __mmask64 tail[2] = {~__mmask64(0), ~__mmask64(0)};
  for (int64_t u = full; u < units; ++u) tail[u - full] = unit_valid(D, u, K);
  __m512i rank[kVectors];
  for (int v = 0; v < kVectors; ++v) rank[v] = _mm512_load_si512(ft.rank + 64 * v);
  __m512i seen_ids = _mm512_setzero_si512();
  alignas(64) int8_t tables[kFusedRows][256];
  std::memset(tables, 0, sizeof(tables));  // entries past 2^bits: never looked up
  float sw[kFusedRows];
  int32_t wsum[kFusedRows];
  __m512i wsums[kFusedRows];
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t r = r0; r < r1; r += kFusedRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kFusedRows, r1 - r));
    for (int i = 0; i < rows; ++i) {
      const uint8_t* row = p.dense_codes + (r + i) * p.dense_width;
      __m512i most = _mm512_setzero_si512();
      unit.each_full(row, 0, full, [&](int64_t, __m512i ids) DCX_AVX512_Q8_FN {
        seen_ids = _mm512_max_epu8(seen_ids, ids);
        most = _mm512_max_epu8(most, lookup_bytes<L>(ids, rank));
      });
      for (int64_t u = full; u < units; ++u) {
        const __mmask64 valid = tail[u - full];
        const __m512i ids = _mm512_maskz_mov_epi8(valid, unit.get(row, u, valid));
        seen_ids = _mm512_max_epu8(seen_ids, ids);
        most = _mm512_max_epu8(most, _mm512_maskz_mov_epi8(valid, lookup_bytes<L>(ids, rank)));
      }
      // The largest rank: bytes to dwords, then across the lanes.
      most = _mm512_max_epu8(most, _mm512_srli_epi32(most, 16));
      most = _mm512_max_epu8(most, _mm512_srli_epi32(most, 8));
      const uint32_t top = _mm512_reduce_max_epu32(_mm512_and_si512(most, _mm512_set1_epi32(0xFF)));
      const float amax = ft.by_rank[top];
      sw[i] = q8_scale(amax);
      const __m512 inv = _mm512_set1_ps(q8_inverse(amax));
      for (int e = 0; e < ft.entries; e += 16)  // the row's table, 16 entries a vector
        _mm_storeu_si128(reinterpret_cast<__m128i*>(tables[i] + e),
                         _mm512_cvtepi32_epi8(q8_round16(_mm512_loadu_ps(ft.codebook + e), inv)));
      wsums[i] = _mm512_setzero_si512();
    }
    std::memset(sums, 0, sizeof(int32_t) * size_t((O == FusedOrder::kDots ? M : groups) * kFusedRows * kQ8Lanes));
    if (rows < kFusedRows) std::memset(w + rows * ldw, 0, size_t((kFusedRows - rows) * ldw));
    for (int64_t u0 = 0; u0 < units; u0 += kFusedChunk) {
      const int64_t u1 = std::min(units, u0 + kFusedChunk);
      // The same share of the next 8 rows' codes fetched meanwhile (this tile's or the next one's,
      // which the other thread may take: then they wait in L3), so that their first pass reads
      // them from cache: it waited on memory for most of its time.
      const int64_t from = u0 * p.dense_width / units, to = u1 * p.dense_width / units;
      for (int64_t row = r + kFusedRows; row < std::min(p.n, r + 2 * kFusedRows); ++row)
        for (int64_t at = from; at < to; at += 64) prefetch_line(p.dense_codes + row * p.dense_width + at);
      for (int i = 0; i < rows; ++i) {
        const uint8_t* row = p.dense_codes + (r + i) * p.dense_width;
        __m512i t[kVectors];
        for (int v = 0; v < kVectors; ++v) t[v] = _mm512_load_si512(tables[i] + 64 * v);
        // The row's sum of weights (padding included: x + 128 there is 128 too, which the sum
        // takes off again), in the lanes until the row ends.
        __m512i sum = wsums[i];
        auto decode = [&](int64_t u, __m512i ids) DCX_AVX512_Q8_FN {
          const __m512i wv = lookup_bytes<L>(ids, t);
          _mm512_storeu_si512(w + i * ldw + (u - u0) * 64, wv);
          sum = _mm512_dpbusd_epi32(sum, ones, wv);
        };
        const int64_t u_full = std::min(u1, std::max(u0, full));
        unit.each_full(row, u0, u_full, decode);
        for (int64_t u = u_full; u < u1; ++u) decode(u, unit.get(row, u, tail[u - full]));
        wsums[i] = sum;
      }
      if constexpr (O == FusedOrder::kDots) {
        // Passes of 8, 4, 2 or 1 rows of x, 16 accumulators each (rows of W past `rows` are
        // zeros in w; their sums are never read).
        const uint8_t* xu = static_cast<const uint8_t*>(staged) + u0 * 64;
        const int64_t ldx = units * 64, ld = M * kQ8Lanes, nu = u1 - u0;
        for (int64_t m0 = 0; m0 < M;) {
          const int64_t left = M - m0;
          const uint8_t* xm = xu + m0 * ldx;
          int32_t* sm = sums + m0 * kQ8Lanes;
          if (left >= 8) {
            for (int i = 0; i < kFusedRows; i += 2) dots_apply<8, 2>(w + i * ldw, ldw, nu, xm, ldx, sm + i * ld, ld);
            m0 += 8;
          } else if (left >= 4) {
            for (int i = 0; i < kFusedRows; i += 4) dots_apply<4, 4>(w + i * ldw, ldw, nu, xm, ldx, sm + i * ld, ld);
            m0 += 4;
          } else if (left >= 2) {
            dots_apply<2, 8>(w, ldw, nu, xm, ldx, sm, ld);
            m0 += 2;
          } else {
            dots_apply<1, 8>(w, ldw, nu, xm, ldx, sm, ld);
            m0 += 1;
          }
        }
      } else {
        const int32_t* xv = static_cast<const int32_t*>(staged);
        const int64_t q0 = u0 * 16, nq = (u1 - u0) * 16, ldx = quads * kQ8Lanes;
        const int32_t* wq = reinterpret_cast<const int32_t*>(w);
        for (int64_t g = 0; g < groups; g += 2) {
          const int32_t* xg = xv + g * ldx + q0 * kQ8Lanes;
          int32_t* sg = sums + g * kFusedRows * kQ8Lanes;
          if (g + 1 < groups) {
            fused_apply<2>(wq, ldw / 4, nq, xg, ldx, sg);
          } else {
            fused_apply<1>(wq, ldw / 4, nq, xg, ldx, sg);
          }
        }
      }
    }
    for (int i = 0; i < rows; ++i) wsum[i] = _mm512_reduce_add_epi32(wsums[i]);
    if constexpr (O == FusedOrder::kDots) {
      // A row of y at a time (its stores to one line; see below).
      for (int64_t m = 0; m < M; ++m)
        for (int i = 0; i < rows; ++i) {
          const int32_t dot = _mm512_reduce_add_epi32(_mm512_loadu_si512(sums + (i * M + m) * kQ8Lanes));
          y[m * ldy + r + i] = float(dot - 128 * wsum[i]) * (sx[m] * sw[i]) + (bias ? bias[r + i] : 0.f);
        }
      continue;
    }
    // The epilogue, 16 batch rows a vector, then y written a row at a time (the rows' results
    // contiguous): written a column at a time, its stores went N floats apart, all into one L1 set
    // when N is a multiple of 1024, at about 16 cycles an output (a quarter of the kernel's time
    // at 128 rows on a Zen 5 core).
    alignas(64) float out[kFusedRows][kQ8Lanes];
    for (int64_t g = 0; g < groups; ++g) {
      const int lanes = static_cast<int>(std::min<int64_t>(kQ8Lanes, M - g * kQ8Lanes));
      const __m512 sxv = _mm512_maskz_loadu_ps(__mmask16((1u << lanes) - 1), sx + g * kQ8Lanes);
      for (int i = 0; i < rows; ++i) {
        const __m512i dots = _mm512_sub_epi32(_mm512_loadu_si512(sums + (g * kFusedRows + i) * kQ8Lanes),
                                              _mm512_set1_epi32(128 * wsum[i]));
        _mm512_store_ps(out[i], _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(sxv, _mm512_set1_ps(sw[i])),
                                                _mm512_set1_ps(bias ? bias[r + i] : 0.f)));
      }
      for (int l = 0; l < lanes; ++l) {
        float* yr = y + (g * kQ8Lanes + l) * ldy + r;
        for (int i = 0; i < rows; ++i) yr[i] = out[i][l];
      }
    }
  }
  alignas(64) uint8_t most[64];
  _mm512_storeu_si512(most, seen_ids);
  for (uint8_t v : most) seen->max_id = std::max<uint32_t>(seen->max_id, v);
}

// The sparse int8 kernel (SpqmmKernel::kSparseInt8): the int8 GEMM's rule (rows of W and of x
// quantized whole, core/spqmm_int8.h) on the packed steps, W never decoded into rows. A group's
// steps are taken up to four at a time, a unit: byte 4 i + j of a unit's 64 holds row 16 g + i's
// weight in its step j as int8 (the row's own scale), and beside it that weight's column less the
// unit's base (its first step's window rounded down to 64 columns, so that x is read a cache line
// at a time: loads across two lines cost twice). Steps whose windows lie within kQ8UnitSpan
// columns of the base share a unit, so every offset is below 128 and one byte permute (vpermt2b)
// picks a row of x's 64 activations for the unit from the 128 bytes at its base; one vpdpbusd then
// does the unit's 64 products with that row: two instructions and two loads per 64 products,
// where the sparse bf16 kernel takes a permute, a dot product and three loads per 32 (on Zen 5
// about 1.5 cycles a unit and row, the permute and the dot product sharing two pipes at 1.25 a
// pair; 4096 x 4096, 10% kept, 5 bits, two threads: 16 / 128 rows 313 / 1,305 us against the bf16
// kernel's 639 / 4,243). x is staged as unsigned x + 128, as for the fused kernel; each row's sum
// of weights takes the 128 off again.
constexpr int kQ8UnitSpan = 96;     // the farthest a unit's windows lie from its base
constexpr int kSparseQ8Units = 64;  // units decoded ahead of their products (8 KB, in L1)

struct SparseQ8Units {
  alignas(64) uint8_t idx[kSparseQ8Units][64];  // byte 4 i + j: step j's column in row i, less base
  alignas(64) int8_t w[kSparseQ8Units][64];     // byte 4 i + j: its weight (0: padding, no step)
  int64_t base[kSparseQ8Units];
};

// sums [MB][16] += the first `units` units times MB staged rows of x (ldx bytes apart, 64-byte
// aligned). Below 4 rows the units alternate between two sets of accumulators, so that each
// vpdpbusd does not wait for the one before (one row: 12% of the kernel's time on that chain).
template <int MB>
DCX_AVX512_Q8_FN void sparse_q8_apply(const SparseQ8Units& u, int units, const uint8_t* x, int64_t ldx,
                                      int32_t* sums) {
  constexpr int kChains = MB < 4 ? 2 : 1;
  __m512i acc[kChains][MB];
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) {
    acc[0][m] = _mm512_loadu_si512(sums + m * kQ8Lanes);
    if constexpr (kChains == 2) acc[1][m] = _mm512_setzero_si512();
  }
  auto unit = [&](int t, __m512i* a) DCX_AVX512_Q8_FN {
    const __m512i idx = _mm512_load_si512(u.idx[t]), w = _mm512_load_si512(u.w[t]);
    const uint8_t* xb = x + u.base[t];
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      const uint8_t* xm = xb + m * ldx;
      const __m512i v = _mm512_permutex2var_epi8(_mm512_load_si512(xm), idx, _mm512_load_si512(xm + 64));
      a[m] = _mm512_dpbusd_epi32(a[m], v, w);
    }
  };
  int t = 0;
  for (; t + kChains <= units; t += kChains) {
#pragma GCC unroll 2
    for (int c = 0; c < kChains; ++c) unit(t + c, acc[c]);
  }
  if (t < units) unit(t, acc[0]);
#pragma GCC unroll 16
  for (int m = 0; m < MB; ++m) {
    if constexpr (kChains == 2) acc[0][m] = _mm512_add_epi32(acc[0][m], acc[1][m]);
    _mm512_storeu_si512(sums + m * kQ8Lanes, acc[0][m]);
  }
}

// Groups [g0, g1) of W against M staged rows of x (xs [M][ldx] bytes, 64-byte aligned: x + 128,
// then 128 (a zero) up to ldx >= K + 128; sx the rows' scales): y[m][r] = sx[m] sw[r] (dot - 128
// wsum[r]) + bias[r] for the groups' rows below N, as the GEMM's epilogue. Per group a first pass
// over its steps finds each row's largest |weight| (its scale, as sparse_quantize_rows), then
// runs of kSparseQ8Units units are decoded and multiplied by every row of x (sums: M * 16 int32).
// Padding and a unit's missing steps weigh 0. The ids and windows go to seen as sparse_step's do,
// and a window below its group's previous one too (seen->descending, as the sparse AMX kernel
// reports it: units need windows in order). ft: the codebook's ranks by magnitude (fused_tables).
template <Lut L>
DCX_AVX512_Q8_FN void sparse_q8(const SpqmmPacked& p, int64_t g0, int64_t g1, const float* table,
                                const FusedTables& ft, const uint8_t* xs, int64_t ldx, const float* sx,
                                int64_t M, const float* bias, float* y, int64_t ldy, int32_t* sums,
                                SpqmmSeen* seen) {
  const int64_t K = p.k;
  // Codebooks of up to 32 entries without group scales: a row's largest |weight| from the ranks
  // of its ids (two steps a word permute), its weights by a table of its own (the 16 rows' tables,
  // 32 int8 entries each, in 8 registers; four rows a byte permute), a unit's ids, offsets and
  // live bits by three permutes of its codes. Otherwise each step's float weights (sparse_step,
  // group scales included) rounded by the row's scale: about four times the work per unit.
  constexpr bool kSmallLut = L == Lut::k16 || L == Lut::k32;
  const bool small = kSmallLut && p.group_scale == nullptr;
  const Table tab = load_table(table);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), ones = _mm512_set1_epi8(1);
  __m512i max_id = _mm512_setzero_si512(), max_id_words = max_id;
  int64_t max_col = -1;
  SparseQ8Units units;
  // Byte 0 of lane i of four steps' int32 vectors to byte 4 i + j of a unit (the general path):
  // the first two by one permute (pair01), the last two by another (pair23), then a blend.
  alignas(64) uint8_t order[2][64];
  // The small path: byte 4 i + j of a unit gets the low (id_order) or high (high_order) byte of
  // word i of step j among the unit's 128 bytes of codes; row_bits puts row i's table (i & 3) in
  // the index's bits 5 and 6.
  alignas(64) uint8_t id_order[64], high_order[64], row_bits[64];
  for (int i = 0; i < 16; ++i) {
    for (int h = 0; h < 2; ++h) {
      order[h][4 * i + 2 * h] = uint8_t(4 * i);
      order[h][4 * i + 2 * h + 1] = uint8_t(64 + 4 * i);
      order[h][4 * i + 2 - 2 * h] = order[h][4 * i + 3 - 2 * h] = 0;
    }
    for (int j = 0; j < 4; ++j) {
      id_order[4 * i + j] = uint8_t(32 * j + 2 * i);
      high_order[4 * i + j] = uint8_t(32 * j + 2 * i + 1);
      row_bits[4 * i + j] = uint8_t((i & 3) << 5);
    }
  }
  const __m512i pair01 = _mm512_load_si512(order[0]), pair23 = _mm512_load_si512(order[1]);
  constexpr __mmask64 kSteps23 = 0xCCCCCCCCCCCCCCCCull;  // bytes 2 and 3 of each lane
  auto bytes_of = [&](const __m512i* v) DCX_AVX512_Q8_FN {
    return _mm512_mask_blend_epi8(kSteps23, _mm512_permutex2var_epi8(v[0], pair01, v[1]),
                                  _mm512_permutex2var_epi8(v[2], pair23, v[3]));
  };
  const __m512i ids_of = _mm512_load_si512(id_order), highs_of = _mm512_load_si512(high_order),
                rows_of = _mm512_load_si512(row_bits);
  alignas(64) uint16_t rank_words[32];
  for (int e = 0; e < 32; ++e) rank_words[e] = uint16_t(ft.rank[e] + 1);  // 0: no live slot
  const __m512i ranks = _mm512_load_si512(rank_words);
  alignas(64) int8_t row_tables[kSpqmmRows][32];
  alignas(64) uint16_t most_words[32];
  alignas(64) uint32_t amax_bits[kSpqmmRows];
  alignas(64) float inv[kSpqmmRows], sw[kSpqmmRows];
  SpqmmStepScales scales(p);
  auto window = [&](int64_t s) { return std::min<int64_t>(static_cast<uint32_t>(p.windows[s]), K); };
  // The windows of steps [s, s + count) (count <= 16) to the running maximum (as unsigned
  // values: a negative one is reported too), 16 a vector, and the live columns of those that
  // reach past K (only there can one point past K).
  __m512i max_window = _mm512_setzero_si512();
  bool descending = false;  // a window below its group's previous one (seen->descending)
  const __m512i last_inside = _mm512_set1_epi32(int32_t(std::max<int64_t>(K - kSpqmmWindow, 0)));
  auto check_windows = [&](int64_t s, int64_t count) DCX_AVX512_Q8_FN {
    const __mmask16 here = __mmask16((1u << count) - 1);
    const __m512i w = _mm512_maskz_loadu_epi32(here, p.windows + s);
    max_window = _mm512_max_epu32(max_window, w);
    __mmask16 past = _mm512_mask_cmpgt_epu32_mask(here, w, last_inside);
    if (K < kSpqmmWindow) past = here;
    for (; past; past &= __mmask16(past - 1)) {
      const int64_t t = s + __builtin_ctz(past);
      live_columns(p.codes + t * kSpqmmRows, window(t), &max_col);
    }
  };
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t begin = p.group_ptr[g], end = p.group_ptr[g + 1];
    const uint32_t in_range = rows_in_range(g, p.n);
    // Pass 1: each row's largest |weight| (accumulated in locals: a maximum kept through the
    // kernel's calls lived on the stack, a store and a load a step).
    if (small) {
      __m512i most = _mm512_setzero_si512(), ids = most;
      for (int64_t s = begin; s < end; s += 2) {
        _mm_prefetch(reinterpret_cast<const char*>(p.codes + std::min(s + 64, p.steps - 1) * kSpqmmRows), _MM_HINT_T0);
        if ((s & 15) < 2)
          _mm_prefetch(reinterpret_cast<const char*>(p.windows + std::min(s + 256, p.steps - 1)), _MM_HINT_T0);
        const bool second = s + 1 < end;
        const __m512i codes = _mm512_maskz_loadu_epi16(second ? ~__mmask32(0) : __mmask32(0xFFFF), p.codes + s * kSpqmmRows);
        ids = _mm512_max_epu16(ids, _mm512_and_si512(codes, _mm512_set1_epi16(kSpqmmIdMask)));
        const __mmask32 live = _mm512_test_epi16_mask(codes, _mm512_set1_epi16(int16_t(kSpqmmLive)));
        most = _mm512_max_epu16(most, _mm512_maskz_permutexvar_epi16(live, codes, ranks));
        if ((s - begin) % 16 == 0) check_windows(s, std::min<int64_t>(16, end - s));
      }
      max_id_words = _mm512_max_epu16(max_id_words, ids);
      _mm512_store_si512(most_words, most);
      for (int i = 0; i < kSpqmmRows; ++i) {
        const int top = std::max(most_words[i], most_words[16 + i]);  // a row with no weights: 0
        const float amax = top > 0 ? ft.by_rank[top - 1] : 0.f;
        std::memcpy(amax_bits + i, &amax, sizeof(amax));
      }
    } else {
      __m512i most = _mm512_setzero_si512(), ids = most;
      int64_t cols = -1;
      for (int64_t s = begin; s < end; ++s) {
        if ((s & 1) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(p.codes + std::min(s + 64, p.steps - 1) * kSpqmmRows), _MM_HINT_T0);
        const SparseStep st = sparse_step<L>(p, tab, scales, s, g, &ids, &cols);
        most = _mm512_max_epu32(most, _mm512_and_si512(_mm512_castps_si512(st.w), abs_mask));
      }
      max_id = _mm512_max_epu32(max_id, ids);
      max_col = std::max(max_col, cols);
      _mm512_store_si512(amax_bits, most);
    }
    for (int i = 0; i < kSpqmmRows; ++i) {
      float amax;
      std::memcpy(&amax, amax_bits + i, sizeof(amax));
      const bool here = (in_range >> i) & 1;
      inv[i] = here ? q8_inverse(amax) : 0.f;
      sw[i] = here ? q8_scale(amax) : 0.f;
    }
    const __m512 inv_v = _mm512_load_ps(inv);
    __m512i tables[8];  // the small path: rows 4 r .. 4 r + 3 in tables 2 r, 2 r + 1
    if (small) {
      for (int i = 0; i < kSpqmmRows; ++i)
        for (int e = 0; e < 32; e += 16)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(row_tables[i] + e),
                           _mm512_cvtepi32_epi8(q8_round16(_mm512_loadu_ps(table + e), _mm512_set1_ps(inv[i]))));
      for (int v = 0; v < 8; ++v) tables[v] = _mm512_load_si512(row_tables[2 * v]);
    }
    std::memset(sums, 0, sizeof(int32_t) * size_t(M * kQ8Lanes));
    __m512i wsum = _mm512_setzero_si512();  // lane i: row 16 g + i's sum of int8 weights
    int64_t last = 0;                       // the group's last window so far (clamped)
    // The next group's codes and windows fetched while this one computes, about as many steps
    // as a unit takes: pass 1 waited on memory, the rest of the kernel did not use it.
    int64_t ahead = end;
    const int64_t ahead_end = g + 1 < p.groups ? p.group_ptr[g + 2] : end;
    for (int64_t s = begin; s < end;) {
      int n = 0;
      for (; n < kSparseQ8Units && s < end; ++n) {
        if (ahead < ahead_end) {
          _mm_prefetch(reinterpret_cast<const char*>(p.codes + ahead * kSpqmmRows), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(p.codes + (ahead + 2) * kSpqmmRows), _MM_HINT_T0);
          if ((ahead & 15) < 4) _mm_prefetch(reinterpret_cast<const char*>(p.windows + ahead), _MM_HINT_T0);
          ahead += 4;
        }
        const int64_t first = window(s), base = first & ~int64_t(63);
        descending |= first < last;
        // The next three steps join while their windows lie within the span and do not descend
        // (a window below the one before starts the next unit, which reports it), without
        // branches: how many join is hard to predict.
        uint32_t deltas = uint32_t(first - base);  // byte j: step j's window less the base
        int steps = 1;
        bool joins = true;
        last = first;
        for (int j = 1; j < 4; ++j) {
          const int64_t wj = window(std::min(s + j, end - 1));
          joins = joins && s + j < end && wj >= last && wj - base <= kQ8UnitSpan;
          steps += joins;
          deltas |= joins ? uint32_t(wj - base) << (8 * j) : 0u;
          last = joins ? wj : last;
        }
        __m512i w, idx;
        if (small) {
          const uint16_t* c = p.codes + s * kSpqmmRows;
          const __m512i a = _mm512_maskz_loadu_epi16(steps >= 2 ? ~__mmask32(0) : __mmask32(0xFFFF), c);
          const __m512i b = _mm512_maskz_loadu_epi16(steps >= 4 ? ~__mmask32(0) : steps == 3 ? __mmask32(0xFFFF) : 0,
                                                     c + 2 * kSpqmmRows);
          const __m512i high = _mm512_permutex2var_epi8(a, highs_of, b);
          idx = _mm512_add_epi8(_mm512_and_si512(high, _mm512_set1_epi8(kSpqmmWindow - 1)),
                                _mm512_set1_epi32(int32_t(deltas)));
          __m512i t = _mm512_or_si512(_mm512_and_si512(_mm512_permutex2var_epi8(a, ids_of, b), _mm512_set1_epi8(31)),
                                      rows_of);
#pragma GCC unroll 4
          for (int r = 0; r < 4; ++r)  // bytes 16 r .. 16 r + 15: rows 4 r .. 4 r + 3
            t = _mm512_mask2_permutex2var_epi8(tables[2 * r], t, __mmask64(0xFFFFull) << (16 * r), tables[2 * r + 1]);
          w = _mm512_maskz_mov_epi8(_mm512_movepi8_mask(high), t);  // the live bit: bit 7 of the high byte
        } else {
          __m512i wq[4], cq[4];
          for (int j = 0; j < 4; ++j) {
            wq[j] = cq[j] = _mm512_setzero_si512();
            if (j >= steps) continue;
            __m512i unused_id = _mm512_setzero_si512();  // seen in pass 1
            int64_t unused_col = -1;
            const SparseStep st = sparse_step<L>(p, tab, scales, s + j, g, &unused_id, &unused_col);
            wq[j] = q8_round16(st.w, inv_v);
            cq[j] = _mm512_sub_epi32(st.col, _mm512_set1_epi32(int32_t(base)));
          }
          w = bytes_of(wq);
          idx = bytes_of(cq);
        }
        _mm512_store_si512(units.w[n], w);
        _mm512_store_si512(units.idx[n], idx);
        units.base[n] = base;
        wsum = _mm512_dpbusd_epi32(wsum, ones, w);
        s += steps;
      }
      for (int64_t m0 = 0; m0 < M;) {  // passes of 16, 8, 4, 2 or 1 rows of x
        const int64_t left = M - m0;
        const uint8_t* xm = xs + m0 * ldx;
        int32_t* sm = sums + m0 * kQ8Lanes;
        if (left >= 16) {
          sparse_q8_apply<16>(units, n, xm, ldx, sm);
          m0 += 16;
        } else if (left >= 8) {
          sparse_q8_apply<8>(units, n, xm, ldx, sm);
          m0 += 8;
        } else if (left >= 4) {
          sparse_q8_apply<4>(units, n, xm, ldx, sm);
          m0 += 4;
        } else if (left >= 2) {
          sparse_q8_apply<2>(units, n, xm, ldx, sm);
          m0 += 2;
        } else {
          sparse_q8_apply<1>(units, n, xm, ldx, sm);
          m0 += 1;
        }
      }
    }
    // The epilogue, a row of y's 16 outputs at a time.
    const int64_t r0 = g * kSpqmmRows;
    const __mmask16 lanes = tail_mask(p.n, r0);
    const __m512i offset = _mm512_slli_epi32(wsum, 7);  // 128 wsum
    const __m512 swv = _mm512_load_ps(sw);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(lanes, bias + r0) : _mm512_setzero_ps();
    for (int64_t m = 0; m < M; ++m) {
      const __m512i dots = _mm512_sub_epi32(_mm512_loadu_si512(sums + m * kQ8Lanes), offset);
      _mm512_mask_storeu_ps(y + m * ldy + r0, lanes,
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots), _mm512_mul_ps(swv, _mm512_set1_ps(sx[m])), bv));
    }
  }
  max_id = _mm512_max_epu32(max_id, _mm512_max_epu32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(max_id_words)),
                                                       _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(max_id_words, 1))));
  max_col = std::max<int64_t>(max_col, _mm512_reduce_max_epu32(max_window));
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
  seen->max_col = std::max<int64_t>(seen->max_col, max_col);
  seen->descending |= descending;
}

// The kernel for a layer's lookup kind: f(lut) with the kind as a compile-time constant.
template <typename F>
DCX_AVX512_FN inline void with_lut_kind(const SpqmmPacked& p, F&& f) {
  switch (lut_kind(p.bits)) {
    case Lut::k16: f(std::integral_constant<Lut, Lut::k16>()); break;
    case Lut::k32: f(std::integral_constant<Lut, Lut::k32>()); break;
    case Lut::k64: f(std::integral_constant<Lut, Lut::k64>()); break;
    case Lut::k128: f(std::integral_constant<Lut, Lut::k128>()); break;
    case Lut::k256: f(std::integral_constant<Lut, Lut::k256>()); break;
  }
}

// The kernel for a layer's lookup kind and layout: f(lut, layout), both compile-time constants.
template <typename F>
DCX_AVX512_FN inline void with_dense_kind(const SpqmmPacked& p, F&& f) {
  with_lut_kind(p, [&](auto lut) DCX_AVX512_FN {
    constexpr Lut L = decltype(lut)::value;
    switch (p.layout) {
      case SpqmmDense::kNibbles: f(std::integral_constant<Lut, L>(), std::integral_constant<SpqmmDense, SpqmmDense::kNibbles>()); break;
      case SpqmmDense::kBits: f(std::integral_constant<Lut, L>(), std::integral_constant<SpqmmDense, SpqmmDense::kBits>()); break;
      default: f(std::integral_constant<Lut, L>(), std::integral_constant<SpqmmDense, SpqmmDense::kBytes>()); break;
    }
  });
}

}  // namespace avx512
}  // namespace dcx
#endif  // DCX_SPQMM_AVX512
