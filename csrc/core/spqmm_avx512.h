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
  SpqmmStepScales scales;
  auto step = [&](int64_t s, int64_t g) DCX_AVX512_FN {
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
    __m512 w = _mm512_maskz_mov_ps(live, lookup<L>(tab, v));  // lookups use the id's bits
    if (p.group_scale) w = _mm512_mul_ps(w, _mm512_load_ps(scales.get(p, g, j0)));
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

// Sparse mode for 12 to 16 batch rows (a tile of xt [K + 32][16], the batch rows in the lanes,
// zero past K and past the valid rows), groups [g0, g1): per step the 16 weights by register
// lookup and the 16 offsets as one vector each (as sparse_chunk), then per slot a broadcast of its
// weight and one FMA with the 16 activations of its column (one aligned 64-byte load) into its
// row's accumulator; the 16 rows of a group stay in registers. (Written through a buffer, the
// compiler takes the lanes out of the registers; reading them back from memory, or decoding each
// slot as scalars, measured 1.4x slower.) y [16][ldy] gets bias + products for the mvalid rows.
template <Lut L>
DCX_AVX512_FN void sparse_batch(const SpqmmPacked& p, int64_t g0, int64_t g1, const float* table,
                                const float* xt, int mvalid, const float* bias, float* y,
                                int64_t ldy, SpqmmSeen* seen) {
  constexpr int MT = 16;
  const Table tab = load_table(table);
  const __m512i live_bit = _mm512_set1_epi32(kSpqmmLive), id_mask = _mm512_set1_epi32(kSpqmmIdMask);
  const __m512i off_mask = _mm512_set1_epi32(kSpqmmWindow - 1);
  __m512i max_id = _mm512_setzero_si512();
  int64_t max_col = -1;
  alignas(64) float wb[kSpqmmRows];
  alignas(64) int32_t ob[kSpqmmRows];
  SpqmmStepScales scales;
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[kSpqmmRows];
    for (int i = 0; i < kSpqmmRows; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t s = p.group_ptr[g]; s < p.group_ptr[g + 1]; ++s) {
      const int64_t j0 = spqmm_window(p, s, &max_col);
      const __m512i v =
          _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(p.codes + s * kSpqmmRows)));
      const __mmask16 live = _mm512_test_epi32_mask(v, live_bit);
      max_id = _mm512_max_epu32(max_id, _mm512_and_si512(v, id_mask));
      __m512 w = _mm512_maskz_mov_ps(live, lookup<L>(tab, v));
      if (p.group_scale) w = _mm512_mul_ps(w, _mm512_load_ps(scales.get(p, g, j0)));
      _mm512_store_ps(wb, w);
      const __m512i off = _mm512_and_si512(_mm512_srli_epi32(v, 8), off_mask);
      _mm512_storeu_si512(ob, off);
      if (j0 + kSpqmmWindow > p.k && live)  // only here can a live slot point past K
        max_col = std::max<int64_t>(max_col, j0 + _mm512_mask_reduce_max_epu32(live, off));
      const float* xw = xt + j0 * MT;
      for (int i = 0; i < kSpqmmRows; ++i)
        acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(wb[i]), _mm512_loadu_ps(xw + ob[i] * MT), acc[i]);
    }
    const int64_t r0 = g * kSpqmmRows;
    const int lanes = static_cast<int>(std::min<int64_t>(kSpqmmRows, p.n - r0));
    alignas(64) float sums[MT];
    for (int i = 0; i < lanes; ++i) {
      _mm512_store_ps(sums, acc[i]);
      const float b = bias ? bias[r0 + i] : 0.f;
      for (int m = 0; m < mvalid; ++m) y[m * ldy + r0 + i] = sums[m] + b;
    }
  }
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
        __m512 v = lookup<L>(tab, id);
        if (p.group_scale) v = _mm512_mul_ps(v, _mm512_set1_ps(spqmm_group_scale(p, r, j)));
        _mm512_mask_storeu_ps(wr + j, valid, v);
      }
    }
  }
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
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
}  // namespace dcx
#endif  // DCX_SPQMM_AVX512
