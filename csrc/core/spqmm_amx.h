// spqmm with AMX (the tile matrix unit of Intel Xeons since Sapphire Rapids) for dense-mode layers
// in bfloat16 compute: the same arithmetic as decode + oneDNN's bf16 GEMM (activations and
// weights rounded to bf16 once, products exact, sums in float32), with W decoded in L1-sized
// chunks straight into the tiles' layout instead of into a float32 copy that the GEMM reads again.
//
// One tdpbf16ps multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 float sums (8,192
// multiply-adds; 16 cycles a tile on Sapphire Rapids), so the kernel is bound by the decode and
// the codes' bytes, not by the products, from one activation row to a hundred and more:
//   A tiles  16 rows of W x one block of 32 columns, as the int8 VNNI kernel's pairs (32-bit word
//            d of a block holds the bf16 weights of columns d and 16 + d): q8_decode_pairs with a
//            table of the codebook's bf16 bit patterns, so a block of 4-bit nibbles costs two
//            shifts, two permutes and an or per 32 weights;
//   B tiles  16 activation rows in the same pairs (bf16_stage_pairs, once per call), pair d in
//            tile row d, activation row i in 32-bit column i;
//   C tiles  16 rows of W x 16 activation rows of float sums.
// Per pass 32 rows of W (two A tiles), decoded once, by every pair of activation groups (two B
// tiles) into four C tiles.
#pragma once

#include "core/spqmm_avx512.h"

#if defined(DCX_SPQMM_AVX512) && !defined(DCX_AVX512_EMULATE) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace dcx {

// bf16 bits of a float, rounded to nearest even (NaN stays NaN).
inline uint16_t bf16_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Activation rows [16 g, 16 g + 16) of x ([m_rows][ldx] floats, columns [0, k)) as bf16 pairs
// into xv ([blocks][16 pairs][16 rows] 32-bit words, blocks = ceil(k / 32)): pair d of block b of
// row i holds columns 32 b + d (low half) and 32 b + 16 + d (high half); zero past k and past
// m_rows.
inline void bf16_stage_pairs(const float* x, int64_t ldx, int64_t m_rows, int64_t k, int64_t g,
                             uint32_t* xv) {
  const int64_t blocks = (k + 31) / 32;
  for (int i = 0; i < 16; ++i) {
    const int64_t m = g * 16 + i;
    const float* row = x + m * ldx;
    for (int64_t b = 0; b < blocks; ++b) {
      uint32_t* out = xv + b * 256 + i;
      for (int d = 0; d < 16; ++d) {
        const int64_t lo = 32 * b + d, hi = lo + 16;
        const uint32_t vlo = m < m_rows && lo < k ? bf16_bits(row[lo]) : 0u;
        const uint32_t vhi = m < m_rows && hi < k ? bf16_bits(row[hi]) : 0u;
        out[16 * d] = vlo | vhi << 16;
      }
    }
  }
}

#ifdef DCX_SPQMM_AVX512
namespace avx512 {

constexpr int kAmxRows = 32;       // rows of W per pass (two A tiles)
constexpr int64_t kAmxChunk = 256;  // columns decoded at a time: 32 x 256 bf16 = 16 KB of L1

// Words per row of the decoded chunk: one cache line more than its 2 * kAmxChunk bytes, so that the
// 16 rows of an A tile fall in different sets of L1 (at a stride of 8 KB they shared one set of 12
// ways).
constexpr int64_t kAmxLdw = kAmxChunk / 2 + 16;

// Floats of the kernel's `sums` for M activation rows: four C tiles per pair of groups of 16.
inline int64_t amx_sums_floats(int64_t M) { return (M + 31) / 32 * 4 * 256; }

// The codebook (k <= 256 entries, float) as bf16 pair tables (PairTables, bit patterns), zero
// past k.
inline PairTables bf16_pair_tables(const float* codebook, int64_t k) {
  int16_t bits[256];
  for (int i = 0; i < 256; ++i) bits[i] = int16_t(i < k ? bf16_bits(codebook[i]) : 0);
  return pair_tables(bits);
}

// bf16_bits of 16 floats, in the low halves of the 32-bit lanes.
DCX_AVX512_FN inline __m512i bf16_round(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// Group-scaled layers: rows [r0, r1) of W, columns [j0, j1) as bf16 pairs (q8_decode_pairs'
// layout), each weight codebook value times its group scale, rounded once; zero past K.
template <Lut L, SpqmmDense D>
DCX_AVX512_FN void bf16_decode_scaled_pairs(const SpqmmPacked& p, int64_t r0, int64_t r1, int64_t j0,
                                            int64_t j1, const float* table, int32_t* w, int64_t ldw,
                                            SpqmmSeen* seen) {
  constexpr int kCols = kBlockCols<D>, kU = kCols / 32;
  const Table tab = load_table(table);
  const BitIds bi = bit_ids_setup(D == SpqmmDense::kBits ? p.bits : 8);
  const int64_t K = p.k, blk0 = j0 / kCols, blk1 = (std::min(j1, K) + kCols - 1) / kCols;
  __m512i max_id = _mm512_setzero_si512();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.dense_codes + r * p.dense_width;
    int32_t* out = w + (r - r0) * ldw;
    for (int64_t blk = blk0; blk < blk1; ++blk)
      for (int u = 0; u < kU; ++u) {
        const int64_t j = kCols * blk + 32 * u;
        if (j >= K) break;
        const __mmask16 va = tail_mask(K, j), vb = tail_mask(K, j + 16);
        const __m512i ida = _mm512_maskz_mov_epi32(va, ids16<D>(row, blk, 2 * u, bi, va));
        const __m512i idb = _mm512_maskz_mov_epi32(vb, ids16<D>(row, blk, 2 * u + 1, bi, vb));
        max_id = _mm512_max_epu32(max_id, _mm512_max_epu32(ida, idb));
        const __m512 s = _mm512_set1_ps(spqmm_group_scale(p, r, j));
        const __m512i lo = _mm512_maskz_mov_epi32(va, bf16_round(_mm512_mul_ps(lookup<L>(tab, ida), s)));
        const __m512i hi = _mm512_maskz_mov_epi32(vb, bf16_round(_mm512_mul_ps(lookup<L>(tab, idb), s)));
        _mm512_storeu_si512(out + ((j - j0) / 32) * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
  }
  seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
}

// The tiles' configuration (palette 1; bytes 16 + 2 t: bytes per row of tile t; 48 + t: its rows):
// every tile 16 rows of 64 bytes (C: 16 rows of W x 16 activation rows of float; A: 16 rows of W
// x 32 bf16; B: 16 pairs x 16 activation rows). Constant data: GCC 12 drops stores into a local
// buffer whose only reader is ldtilecfg, which then faults on the unconfigured tiles.
alignas(64) constexpr uint8_t kAmxConfig[64] = {
    1,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,   // palette, start row, reserved
    64, 0,  64, 0,  64, 0,  64, 0,  64, 0,  64, 0,  64, 0,  64, 0,   // bytes per row, tiles 0-7
    0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,   // tiles 8-15 (none)
    16, 16, 16, 16, 16, 16, 16, 16, 0,  0,  0,  0,  0,  0,  0,  0};  // rows, tiles 0-15

// Rows [r0, r1) of W (r0 a multiple of 32) for M activation rows staged by bf16_stage_pairs (xv:
// groups = ceil(M / 16) of [blocks][16][16]), y [M][ldy] = the products plus bias. w: kAmxRows x
// kAmxLdw words (the decoded chunk), sums: amx_sums_floats(M) (C tiles between chunks and
// on their way to y). table: the codebook as floats (group scales), tab: as bf16 pairs.
//
// Per pass 32 rows of W are decoded kAmxChunk columns at a time into w, which stays in L1 (decoded
// 4096 columns at a time into L2, the tile loads and the decode's stores ran at L2's pace), and
// every pair of activation groups runs over the chunk.
template <Lut L, SpqmmDense D>
DCX_AMX_FN void bf16_amx(const SpqmmPacked& p, int64_t r0, int64_t r1, const float* table,
                         const PairTables& tab, const uint32_t* xv, int64_t M, const float* bias,
                         float* y, int64_t ldy, int32_t* w, float* sums, SpqmmSeen* seen) {
  constexpr int64_t ldw = kAmxLdw, kChunkBlocks = kAmxChunk / 32;
  constexpr int64_t kTile = 256;  // words (or floats) of a tile
  const int64_t K = p.k, blocks = (K + 31) / 32, groups = (M + 15) / 16;
  // Up to 32 activation rows the C tiles stay in their registers for the whole pass; past that each
  // pair of groups stores its sums after a chunk and loads them before the next (long after: a tile
  // load of data just stored waits about 100 cycles for it).
  const bool resident = groups <= 2;
  _tile_loadconfig(kAmxConfig);
  for (int64_t r = r0; r < r1; r += kAmxRows) {
    const int64_t rows = std::min<int64_t>(kAmxRows, r1 - r);
    // Rows of the pass past W's last: zero weights (their sums are never written out).
    if (rows < kAmxRows) std::memset(w + rows * ldw, 0, sizeof(int32_t) * size_t((kAmxRows - rows) * ldw));
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t b0 = 0; b0 < blocks; b0 += kChunkBlocks) {
      const int64_t b1 = std::min(blocks, b0 + kChunkBlocks);
      // The codes of the next chunk (of these rows, or past their last chunk the first of the next
      // rows) are fetched before this one is decoded, as in q8_vnni.
      prefetch_chunk(p, b1 < blocks ? r : r + kAmxRows, kAmxRows, b1 < blocks ? b1 * 32 : 0, kAmxChunk);
      if (p.group_scale) {
        bf16_decode_scaled_pairs<L, D>(p, r, r + rows, b0 * 32, b1 * 32, table, w, ldw, seen);
      } else {
        q8_decode_pairs<L, D>(p, r, r + rows, b0 * 32, b1 * 32, tab, w, ldw, seen);
      }
      for (int64_t g = 0; g < groups; g += 2) {
        const bool two = g + 1 < groups;
        float* cg = sums + g * 2 * kTile;  // C tiles of group g (rows of W 0-15, 16-31), then g + 1's
        const uint32_t* xg = xv + g * blocks * kTile;
        if (!resident && b0 > 0) {
          _tile_loadd(0, cg, 64);
          _tile_loadd(1, cg + kTile, 64);
          if (two) {
            _tile_loadd(2, cg + 2 * kTile, 64);
            _tile_loadd(3, cg + 3 * kTile, 64);
          }
        } else if (!resident) {
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
        }
        if (two) {
          for (int64_t b = b0; b < b1; ++b) {
            const int32_t* wb = w + (b - b0) * 16;
            _tile_loadd(4, wb, ldw * 4);
            _tile_loadd(5, wb + 16 * ldw, ldw * 4);
            _tile_loadd(6, xg + b * kTile, 64);
            _tile_loadd(7, xg + (blocks + b) * kTile, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 5, 6);
            _tile_dpbf16ps(2, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        } else {
          // One group: tiles 2 and 3 take every other block's A tiles and 7 its B tile (a tile
          // register is not renamed: a load into a tile waits for the product that reads it).
          int64_t b = b0;
          for (; b + 1 < b1; b += 2) {
            const int32_t* wb = w + (b - b0) * 16;
            _tile_loadd(4, wb, ldw * 4);
            _tile_loadd(5, wb + 16 * ldw, ldw * 4);
            _tile_loadd(6, xg + b * kTile, 64);
            _tile_loadd(2, wb + 16, ldw * 4);
            _tile_loadd(3, wb + 16 + 16 * ldw, ldw * 4);
            _tile_loadd(7, xg + (b + 1) * kTile, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 5, 6);
            _tile_dpbf16ps(0, 2, 7);
            _tile_dpbf16ps(1, 3, 7);
          }
          if (b < b1) {
            const int32_t* wb = w + (b - b0) * 16;
            _tile_loadd(4, wb, ldw * 4);
            _tile_loadd(5, wb + 16 * ldw, ldw * 4);
            _tile_loadd(6, xg + b * kTile, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 5, 6);
          }
        }
        if (!resident) {
          _tile_stored(0, cg, 64);
          _tile_stored(1, cg + kTile, 64);
          if (two) {
            _tile_stored(2, cg + 2 * kTile, 64);
            _tile_stored(3, cg + 3 * kTile, 64);
          }
        }
      }
    }
    if (resident) {
      _tile_stored(0, sums, 64);
      _tile_stored(1, sums + kTile, 64);
      if (groups == 2) {
        _tile_stored(2, sums + 2 * kTile, 64);
        _tile_stored(3, sums + 3 * kTile, 64);
      }
    }
    // sums[g][half][row of W][activation row] -> y[activation row][row of W] + bias, a run of
    // `rows` floats per activation row (writing y column by column, one float per row of y per
    // store, took a quarter of the kernel's time at 128 rows).
    for (int64_t m = 0; m < M; ++m) {
      const float* c = sums + (m / 16) * 2 * kTile + m % 16;
      float* out = y + m * ldy + r;
      for (int64_t i = 0; i < rows; ++i) out[i] = c[(i / 16) * kTile + (i % 16) * 16] + (bias ? bias[r + i] : 0.f);
    }
  }
  _tile_release();
}

// Whether this CPU runs the AMX kernel: AMX-TILE, AMX-BF16 and AVX512-BF16 (CPUID leaf 7), and the
// permission to use the tile state, which Linux grants a process on request (oneDNN asks too).
inline bool supports_amx() {
#if defined(DCX_AVX512_EMULATE)
  return true;
#elif defined(__linux__)
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!supported() || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 22 & 1u) || !(d >> 24 & 1u))
      return false;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a >> 5 & 1u)) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

}  // namespace avx512
#endif  // DCX_SPQMM_AVX512
}  // namespace dcx
