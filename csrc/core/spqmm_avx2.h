// spqmm kernels with AVX2 and FMA (chosen at run time). Layout and helpers: core/spqmm.h.
#pragma once

#include "core/spqmm.h"

#ifdef DCX_SPQMM_AVX2
namespace dcx {

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

// Half h (lanes 8 h .. 8 h + 7) of step s: its slots widened to 32 bits (*v) and their weights, 0
// for padding slots; the largest id seen goes to *max_id. A codebook of <= 32 entries (tab) is
// read by register permutes, a larger one gathered from the table.
template <bool kSmallCodebook>
DCX_AVX2_FN inline __m256 half_step_weights(const SpqmmPacked& p, int64_t s, int h, const __m256* tab,
                                            const float* table, __m256i* v, __m256i* max_id) {
  *v = _mm256_cvtepu16_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.codes + s * kSpqmmRows + 8 * h)));
  const __m256i id = _mm256_and_si256(*v, _mm256_set1_epi32(kSpqmmIdMask));
  *max_id = _mm256_max_epu32(*max_id, id);
  if (kSmallCodebook) {  // padding slots: the live bit (15) moved to the sign bit selects 0
    const __m256 live = _mm256_castsi256_ps(_mm256_slli_epi32(*v, 16));
    return _mm256_blendv_ps(_mm256_setzero_ps(), lookup32(tab, *v), live);
  }
  // ids of padding slots read the zero half of the table
  const __m256i dead = _mm256_andnot_si256(_mm256_srli_epi32(*v, 7), _mm256_set1_epi32(0x100));
  return _mm256_i32gather_ps(table, _mm256_or_si256(id, dead), 4);
}

template <bool kSmallCodebook>
DCX_AVX2_FN void sparse_chunk(const SpqmmPacked& p, int64_t c, const float* table,
                              const float* xs, float* y, float* edge_sums, SpqmmEdge* edge,
                              SpqmmSeen* seen) {
  __m256 tab[4];
  for (int i = 0; i < 4; ++i) tab[i] = _mm256_loadu_ps(table + 8 * i);
  __m256i max_id = _mm256_setzero_si256();
  int64_t max_col = -1;
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  SpqmmStepScales scales(p);
  auto step = [&](int64_t s, int64_t g) DCX_AVX2_FN {
    const int64_t j0 = spqmm_window(p, s, &max_col);
    __m256 xw[4];
    for (int i = 0; i < 4; ++i) xw[i] = _mm256_loadu_ps(xs + j0 + 8 * i);
    const float* sc = p.group_scale ? scales.get(p, g, j0) : nullptr;
    for (int h = 0; h < 2; ++h) {
      __m256i v;
      __m256 w = half_step_weights<kSmallCodebook>(p, s, h, tab, table, &v, &max_id);
      if (sc) w = _mm256_mul_ps(w, _mm256_loadu_ps(sc + 8 * h));
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
  // As spqmm_flush, inline: a call in the walk keeps the accumulators on the stack (see the
  // AVX-512 sparse_chunk).
  auto flush = [&](int64_t g, int slot) DCX_AVX2_FN {
    if (slot >= 0) {
      edge->group[slot] = g;
      _mm256_storeu_ps(edge_sums + slot * kSpqmmRows, acc[0]);
      _mm256_storeu_ps(edge_sums + slot * kSpqmmRows + 8, acc[1]);
    } else {
      alignas(32) float sums[kSpqmmRows];
      _mm256_store_ps(sums, acc[0]);
      _mm256_store_ps(sums + 8, acc[1]);
      const int64_t r0 = g * kSpqmmRows;
      const int lanes = static_cast<int>(std::min<int64_t>(kSpqmmRows, p.n - r0));
      for (int i = 0; i < lanes; ++i) y[r0 + i] += sums[i];
    }
    acc[0] = acc[1] = _mm256_setzero_ps();
  };
  spqmm_walk_chunk(p, c, step, flush);
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), max_id);
  seen->max_id = std::max(seen->max_id, *std::max_element(lanes, lanes + 8));
  seen->max_col = std::max(seen->max_col, max_col);
}

// Sparse mode for 2 to 8 batch rows (a tile of xt [K + 32][8], the batch rows in the lanes,
// zero past K and past the valid rows), groups [g0, g1), 8 rows of W per pass, two passes per
// group, each in runs of kBatchSteps steps: first each half step's 8 weights and columns decoded
// as vectors (as sparse_chunk does) into a small buffer, then per slot one broadcast of its weight
// and one FMA with the 8 activations of its column, into the accumulator of its row (decoded a
// run ahead, the stores have retired before they are read back; see the AVX-512 kernel).
// y [8][ldy] gets bias + products for the mvalid rows.
constexpr int kBatchSteps = 32;

template <bool kSmallCodebook>
DCX_AVX2_FN void sparse_batch(const SpqmmPacked& p, int64_t g0, int64_t g1, const float* table,
                              const float* xt, int mvalid, const float* bias, float* y,
                              int64_t ldy, SpqmmSeen* seen) {
  __m256 tab[4];
  for (int i = 0; i < 4; ++i) tab[i] = _mm256_loadu_ps(table + 8 * i);
  const __m256i off_mask = _mm256_set1_epi32(kSpqmmWindow - 1);
  __m256i max_id = _mm256_setzero_si256();
  int64_t max_col = -1;
  alignas(32) float wb[kBatchSteps][8];
  alignas(32) int32_t cb[kBatchSteps][8];  // the slot's column (window + offset)
  SpqmmStepScales scales(p);
  for (int64_t g = g0; g < g1; ++g) {
    for (int h = 0; h < 2; ++h) {
      __m256 acc[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t s0 = p.group_ptr[g], end = p.group_ptr[g + 1]; s0 < end; s0 += kBatchSteps) {
        const int run = static_cast<int>(std::min<int64_t>(kBatchSteps, end - s0));
        for (int t = 0; t < run; ++t) {
          const int64_t s = s0 + t;
          const int64_t j0 = spqmm_window(p, s, &max_col);
          __m256i v;
          __m256 w = half_step_weights<kSmallCodebook>(p, s, h, tab, table, &v, &max_id);
          if (p.group_scale) w = _mm256_mul_ps(w, _mm256_loadu_ps(scales.get(p, g, j0) + 8 * h));
          const __m256i col = _mm256_add_epi32(_mm256_set1_epi32(int32_t(j0)),
                                               _mm256_and_si256(_mm256_srli_epi32(v, 8), off_mask));
          _mm256_store_ps(wb[t], w);
          _mm256_store_si256(reinterpret_cast<__m256i*>(cb[t]), col);
          if (j0 + kSpqmmWindow > p.k) {  // only here can a live slot point past K
            alignas(32) uint32_t sv[8];
            _mm256_store_si256(reinterpret_cast<__m256i*>(sv), v);
            for (int i = 0; i < 8; ++i)
              if (sv[i] & kSpqmmLive) max_col = std::max<int64_t>(max_col, cb[t][i]);
          }
        }
        for (int t = 0; t < run; ++t) {
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i)  // 64-bit offsets: K * 8 may pass 2^31
            acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(wb[t] + i), _mm256_loadu_ps(xt + int64_t(cb[t][i]) * 8),
                                     acc[i]);
        }
      }
      // Stored at constant indices, so that the accumulators stay in registers (as in the
      // AVX-512 kernel).
      alignas(32) float sums[8][8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) _mm256_store_ps(sums[i], acc[i]);
      const int64_t r0 = g * kSpqmmRows + 8 * h;
      const int lanes = static_cast<int>(std::min<int64_t>(8, p.n - r0));
      for (int i = 0; i < lanes; ++i) {
        const float b = bias ? bias[r0 + i] : 0.f;
        for (int m = 0; m < mvalid; ++m) y[m * ldy + r0 + i] = sums[i][m] + b;
      }
    }
  }
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

  // Columns j .. j + 31 (j a multiple of 32) of row r (codes `row`): w[q] = columns j + 8 q ..
  // j + 8 q + 7, 0 past the row's `left` columns; times the row's scale for the block's group.
  DCX_AVX2_FN void weights32(int64_t r, const uint8_t* row, int64_t j, int64_t left, __m256* w) {
    const __m256i id = ids32<D>(row, j, bi, end, left);
    max_id = _mm256_max_epu8(max_id, id);
    lookup32_f32<NQ>(planes.t, table, id, w);
    if (p.group_scale) {
      const __m256 s = _mm256_set1_ps(spqmm_group_scale(p, r, j));
      for (int q = 0; q < 4; ++q) w[q] = _mm256_mul_ps(w[q], s);
    }
  }

  // Row r's K weights into w.
  DCX_AVX2_FN void row(int64_t r, float* w) {
    const uint8_t* row_codes = codes(r);
    for (int64_t j = 0; j < p.k; j += 32) {
      const int64_t left = p.k - j;
      __m256 v[4];
      weights32(r, row_codes, j, left, v);
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
      decode.weights32(r, row, j, 32, w);
      for (int q = 0; q < 4; ++q)
        for (int m = 0; m < MB; ++m)
          acc[m][q % kAcc] = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(x + m * ldx + j + 8 * q),
                                             acc[m][q % kAcc]);
    }
    if (j < K) {  // the last K % 32 columns
      const int64_t left = K - j;
      __m256 w[4];
      decode.weights32(r, row, j, left, w);
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
      const float gs = spqmm_group_scale(p, r, j);  // 1 without group scales
      for (int m = 0; m < MB; ++m) {
        const int16_t* xr = xq + m * ldq + j;
        const __m256i dot = _mm256_add_epi32(
            _mm256_madd_epi16(wa, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))),
            _mm256_madd_epi16(wb, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16))));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xs[m * blocks + b] * gs), acc[m]);
      }
    }
    const float bv = bias ? bias[r] : 0.f;
    for (int m = 0; m < mvalid; ++m) y[m * ldy + r] = hsum8(acc[m]) * wscale + bv;
  }
  seen->max_id = std::max(seen->max_id, hmax_u8(max_id));
}

// int8 compute for many activation rows: each row of W decoded once into int16 weights (per
// block of 32 columns: those of columns 0-7 and 16-23, then of 8-15 and 24-31, the order x is
// staged in, q8_slot), kept in L1, then applied to every activation row, two rows of W by four
// of x at a time: each x vector loaded feeds both rows, each weight vector four rows of x, and the
// decode, which costs about as much as the dot products of 2 to 4 activation rows, is paid once.

// Rows [r0, r1) of W as int16 weights into w ([r1 - r0][ldw], ldw >= blocks * 32).
template <int NT, SpqmmDense D>
DCX_AVX2_FN void q8_decode_rows(const SpqmmPacked& p, int64_t r0, int64_t r1, const int16_t* table,
                                int16_t* w, int64_t ldw, SpqmmSeen* seen) {
  __m256i lo[NT], hi[NT];
  load_plane(table, 0, NT, lo);
  load_plane(table, 1, NT, hi);
  const BitIds32 bi = bit_ids32_setup(p.bits);
  const int64_t K = p.k, blocks = q8_blocks(K);
  const uint8_t* end = p.dense_codes + p.n * p.dense_width;
  __m256i max_id = _mm256_setzero_si256();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.dense_codes + r * p.dense_width;
    int16_t* out = w + (r - r0) * ldw;
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t j = b * kQ8Block;
      const __m256i id = ids32<D>(row, j, bi, end, K - j);
      max_id = _mm256_max_epu8(max_id, id);
      const __m256i wl = lookup_plane<NT>(lo, id), wh = lookup_plane<NT>(hi, id);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), _mm256_unpacklo_epi8(wl, wh));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j + 16), _mm256_unpackhi_epi8(wl, wh));
    }
  }
  seen->max_id = std::max(seen->max_id, hmax_u8(max_id));
}

// R (1 or 2) decoded rows of W (w [R][ldw]) times M activation rows (xq [M rounded up to 4][ldq]
// int16 in q8_slot order, xs [..][blocks] scales, zero past the valid rows): y[m][r + i].
// p: the layer, for its group scales (each block's activation scale times the row's).
template <int R>
DCX_AVX2_FN void q8_apply_rows(const SpqmmPacked& p, const int16_t* w, int64_t ldw, int64_t blocks,
                               const int16_t* xq, int64_t ldq, const float* xs, int64_t M,
                               float wscale, const float* bias, int64_t r, float* y, int64_t ldy) {
  constexpr int kRows = 4;
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    __m256 acc[R][kRows];
    for (int i = 0; i < R; ++i)
      for (int m = 0; m < kRows; ++m) acc[i][m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      __m256i wa[R], wb[R];
      for (int i = 0; i < R; ++i) {
        wa[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * ldw + b * kQ8Block));
        wb[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * ldw + b * kQ8Block + 16));
      }
      for (int m = 0; m < kRows; ++m) {
        const int16_t* xr = xq + (m0 + m) * ldq + b * kQ8Block;
        const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
        const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 16));
        const float xscale = xs[(m0 + m) * blocks + b];
        for (int i = 0; i < R; ++i) {
          const __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(wa[i], xa), _mm256_madd_epi16(wb[i], xb));
          const __m256 scale = _mm256_set1_ps(xscale * spqmm_group_scale(p, r + i, b * kQ8Block));
          acc[i][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[i][m]);
        }
      }
    }
    const int mvalid = static_cast<int>(std::min<int64_t>(kRows, M - m0));
    for (int i = 0; i < R; ++i) {
      const float bv = bias ? bias[r + i] : 0.f;
      for (int m = 0; m < mvalid; ++m) y[(m0 + m) * ldy + r + i] = hsum8(acc[i][m]) * wscale + bv;
    }
  }
}

// Rows [r0, r1) for M activation rows, decoded a pair at a time into w (2 * ldw int16).
template <int NT, SpqmmDense D>
DCX_AVX2_FN void q8_dense_many(const SpqmmPacked& p, int64_t r0, int64_t r1, const int16_t* table,
                               float wscale, const int16_t* xq, int64_t ldq, const float* xs,
                               int64_t M, const float* bias, float* y, int64_t ldy, int16_t* w,
                               int64_t ldw, SpqmmSeen* seen) {
  const int64_t blocks = q8_blocks(p.k);
  for (int64_t r = r0; r < r1; r += 2) {
    const int64_t rows = std::min<int64_t>(2, r1 - r);
    q8_decode_rows<NT, D>(p, r, r + rows, table, w, ldw, seen);
    if (rows == 2) {
      q8_apply_rows<2>(p, w, ldw, blocks, xq, ldq, xs, M, wscale, bias, r, y, ldy);
    } else {
      q8_apply_rows<1>(p, w, ldw, blocks, xq, ldq, xs, M, wscale, bias, r, y, ldy);
    }
  }
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
}  // namespace dcx
#endif  // DCX_SPQMM_AVX2
