// spqmm with AMX (the tile matrix unit of Intel Xeons since Sapphire Rapids) in bfloat16 compute:
// the same arithmetic as decode + oneDNN's bf16 GEMM (activations and weights rounded to bf16
// once, products exact, sums in float32), with W decoded in L1-sized chunks straight into the
// tiles' layout instead of into a float32 copy that the GEMM reads again.
//
// One tdpbf16ps multiplies a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 float sums (8,192
// multiply-adds; 16 cycles a tile on Sapphire Rapids), so the kernels are bound by the decode and
// the codes' bytes, not by the products, from one activation row to a hundred and more:
//   A tiles  16 rows of W x one block of 32 columns as 16 pairs of bf16 (32-bit words). Dense
//            layers: the int8 VNNI kernel's pairs (word d holds columns d and 16 + d), decoded
//            by q8_decode_pairs with a table of the codebook's bf16 bit patterns (a block of 4-bit
//            nibbles: two shifts, two permutes and an or per 32 weights; 5 to 7 bits by VBMI byte
//            permutes). Sparse layers: columns in order (word d holds 2 d and 2 d + 1), each
//            step's weights stored at their columns (AmxSteps);
//   B tiles  16 activation rows paired as the A tiles (bf16_stage_pairs, once per call), pair d
//            in tile row d, activation row i in 32-bit column i;
//   C tiles  16 rows of W x 16 activation rows of float sums.
// Per pass 32 rows of W (two A tiles), decoded once, by every pair of activation groups (two B
// tiles) into four C tiles (amx_product, for both).
#pragma once

#include "core/spqmm_avx512.h"

#if defined(DCX_SPQMM_AVX512) && !defined(DCX_AVX512_EMULATE) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace dcx {

// bf16 bits of a bf16 value (already rounded) or of a float (rounded here).
inline uint16_t bf16_of(uint16_t bits) { return bits; }
inline uint16_t bf16_of(float v) { return bf16_bits(v); }

// Activation rows [16 g, 16 g + 16) of x ([m_rows][k] floats, or bf16 bit patterns) as bf16 pairs
// into xv ([blocks][16 pairs][16 rows] 32-bit words, blocks = ceil(k / 32)), activation row i in
// word i of a pair's 16; zero past k and past m_rows. interleaved (the dense kernel, whose decode
// makes pairs of columns d and 16 + d): pair d of block b holds columns 32 b + d (low half) and 32
// b + 16 + d (high half); else (the sparse kernel): columns 32 b + 2 d and 32 b + 2 d + 1.
template <typename T>
void bf16_stage_pairs(const T* x, int64_t m_rows, int64_t k, int64_t g, bool interleaved, uint32_t* xv) {
  const int64_t blocks = (k + 31) / 32;
  for (int i = 0; i < 16; ++i) {
    const int64_t m = g * 16 + i;
    const T* row = x + m * k;
    for (int64_t b = 0; b < blocks; ++b) {
      uint32_t* out = xv + b * 256 + i;
      for (int d = 0; d < 16; ++d) {
        const int64_t lo = interleaved ? 32 * b + d : 32 * b + 2 * d, hi = interleaved ? lo + 16 : lo + 1;
        const uint32_t vlo = m < m_rows && lo < k ? bf16_of(row[lo]) : 0u;
        const uint32_t vhi = m < m_rows && hi < k ? bf16_of(row[hi]) : 0u;
        out[16 * d] = vlo | vhi << 16;
      }
    }
  }
}

#ifdef DCX_SPQMM_AVX512
namespace avx512 {

constexpr int kAmxRows = 32;  // rows of W per pass (two A tiles)

// Columns decoded at a time: 32 x 256 bf16 (16 KB) dense, 32 x 128 sparse, whose chunk is
// written 16 bits at a time (with 256 columns, two chunks, the activations' tiles and the codes
// overflowed L1 and the tile loads waited for L2).
constexpr int64_t kAmxDenseChunk = 256, kAmxSparseChunk = 128;

// Words per row of a decoded chunk of `cols` columns: one cache line more than its 2 cols bytes,
// so that the 16 rows of an A tile fall in different sets of L1 (at a stride of 8 KB they shared
// one set of 12 ways). The sparse kernel writes the columns that a window reaches past the chunk
// into that line.
constexpr int64_t amx_ldw(int64_t cols) { return cols / 2 + 16; }

// Words of a decoded chunk: kAmxRows rows, and a spare row that the sparse kernel's padding slots
// write to.
constexpr int64_t amx_chunk_words(int64_t cols) { return (kAmxRows + 1) * amx_ldw(cols); }

// Words of the buffer the kernels decode into (two chunks), 64-byte aligned: a tile load whose
// rows straddle cache lines took 1.4 times as long.
constexpr int64_t kAmxBufferWords = 2 * amx_chunk_words(kAmxDenseChunk);

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

// The tile driver, for dense and sparse layers alike: rows [r0, r1) of W (r0 a multiple of 32) for
// M activation rows staged by bf16_stage_pairs (xv: groups = ceil(M / 16) of [blocks][16][16]),
// y [M][ldy] = the products plus bias. w: kAmxBufferWords words (two decoded chunks), sums:
// amx_sums_floats(M) (C tiles between chunks and on their way to y). decode(r, rows, j0, j1, to,
// from) fills `to` with columns [j0, j1) of rows [r, r + rows) of W as bf16 pairs, as xv pairs
// them (block c of the chunk at to[.][16 c], a row every amx_ldw(Chunk) words); `from` holds the
// chunk before (none at j0 = 0). The driver zeroes the rows of a pass past W's last.
//
// Per pass 32 rows of W are decoded Chunk columns at a time, so that a chunk stays in L1
// (decoded 4096 columns at a time into L2, the tile loads and the decode's stores ran at L2's
// pace), and every pair of activation groups runs over the chunk. The products of a chunk come
// after the next chunk is decoded: a tile load waits until the stores of the data it reads have
// left the store buffer (no forwarding from stores to tiles), about 100 cycles, and longer after
// many small stores.
template <int64_t Chunk, typename Decode>
DCX_AMX_FN void amx_product(int64_t K, int64_t r0, int64_t r1, const uint32_t* xv, int64_t M,
                            const float* bias, float* y, int64_t ldy, int32_t* w, float* sums,
                            Decode&& decode) {
  constexpr int64_t ldw = amx_ldw(Chunk), kChunkBlocks = Chunk / 32;
  constexpr int64_t kTile = 256;  // words (or floats) of a tile
  const int64_t blocks = (K + 31) / 32, groups = (M + 15) / 16;
  int32_t* const chunk[2] = {w, w + amx_chunk_words(Chunk)};
  // Up to 32 activation rows the C tiles stay in their registers for the whole pass; past that each
  // pair of groups stores its sums after a chunk and loads them before the next.
  const bool resident = groups <= 2;
  // The products of blocks [b0, b1) of the pass, decoded into wc.
  auto multiply = [&](int64_t b0, int64_t b1, const int32_t* wc) DCX_AMX_FN {
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
          const int32_t* wb = wc + (b - b0) * 16;
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
          const int32_t* wb = wc + (b - b0) * 16;
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
          const int32_t* wb = wc + (b - b0) * 16;
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
  };
  _tile_loadconfig(kAmxConfig);
  for (int64_t r = r0; r < r1; r += kAmxRows) {
    const int64_t rows = std::min<int64_t>(kAmxRows, r1 - r);
    // Rows of the pass past W's last: zero weights (their sums are never written out).
    if (rows < kAmxRows)
      for (int32_t* c : chunk) std::memset(c + rows * ldw, 0, sizeof(int32_t) * size_t((kAmxRows - rows) * ldw));
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    // Chunk i is decoded into chunk[i % 2], then chunk i - 1 multiplied.
    int64_t i = 0;
    for (int64_t b0 = 0;; b0 += kChunkBlocks, ++i) {
      const bool more = b0 < blocks;
      if (more) decode(r, rows, b0 * 32, std::min(blocks, b0 + kChunkBlocks) * 32, chunk[i % 2], chunk[(i + 1) % 2]);
      if (b0 > 0) multiply(b0 - kChunkBlocks, std::min(blocks, b0), chunk[(i + 1) % 2]);
      if (!more) break;
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
      for (int64_t j = 0; j < rows; ++j) out[j] = c[(j / 16) * kTile + (j % 16) * 16] + (bias ? bias[r + j] : 0.f);
    }
  }
  _tile_release();
}

// Dense mode: rows [r0, r1) of W decoded by q8_decode_pairs (a table of the codebook's bf16 bit
// patterns, tab) or, group-scaled, by bf16_decode_scaled_pairs (table: the codebook as floats),
// for activations staged in interleaved pairs. w: kAmxBufferWords words.
template <Lut L, SpqmmDense D>
DCX_AMX_FN void bf16_amx(const SpqmmPacked& p, int64_t r0, int64_t r1, const float* table,
                         const PairTables& tab, const uint32_t* xv, int64_t M, const float* bias,
                         float* y, int64_t ldy, int32_t* w, float* sums, SpqmmSeen* seen) {
  const int64_t blocks = (p.k + 31) / 32;
  constexpr int64_t ldw = amx_ldw(kAmxDenseChunk);
  amx_product<kAmxDenseChunk>(p.k, r0, r1, xv, M, bias, y, ldy, w, sums,
              [&](int64_t r, int64_t rows, int64_t j0, int64_t j1, int32_t* to, const int32_t*) DCX_AVX512_FN {
                // The codes of the next chunk (of these rows, or past their last chunk the first of
                // the next rows) are fetched before this one is decoded, as in q8_vnni.
                const bool more = j1 < blocks * 32;
                prefetch_chunk(p, more ? r : r + kAmxRows, kAmxRows, more ? j1 : 0, kAmxDenseChunk);
                if (p.group_scale) {
                  bf16_decode_scaled_pairs<L, D>(p, r, r + rows, j0, j1, table, to, ldw, seen);
                } else if constexpr (D == SpqmmDense::kBits) {
                  q8_decode_pairs_vbmi<L>(p, r, r + rows, j0, j1, tab, to, ldw, seen);
                } else {
                  q8_decode_pairs<L, D>(p, r, r + rows, j0, j1, tab, to, ldw, seen);
                }
              });
}

// Sparse mode. The (one or two) groups of 16 rows of a pass walk their steps chunk by chunk: a
// step whose window begins before the chunk's end puts each live slot's bf16 weight at its column
// in the chunk, which holds the columns in order (pair d of a block: columns 2 d and 2 d + 1; the
// activations are staged to match) and 32 more: the spare line of a row after the chunk's takes
// the columns a window reaches past it and becomes the first block of the next chunk.
//
// There is no 16-bit scatter: the 16 (place, weight) pairs of a step go to general registers 64
// bits at a time and 16 scalar stores write them (stored as one vector and loaded back one by one,
// they cost three times as much: the loads are not forwarded from the 64-byte store), a padding
// slot to the chunk's spare row (row 32), so that the loop has no branch.
//
// Windows must not descend within a group (the packer writes them in order); one that does is
// reported as corrupted data (seen->descending) and read as the chunk's first column.
template <Lut L>
struct AmxSteps {
  static constexpr int64_t ldw = amx_ldw(kAmxSparseChunk);
  const SpqmmPacked& p;
  const Table& tab;  // the codebook as bf16 bit patterns, or as floats when group-scaled
  SpqmmSeen* seen;
  int64_t g0 = 0, next[2] = {0, 0}, end[2] = {0, 0};  // the pass's first group, its steps left
  SpqmmStepScales scales[2] = {SpqmmStepScales(p), SpqmmStepScales(p)};

  AmxSteps(const SpqmmPacked& p_, const Table& tab_, SpqmmSeen* seen_) : p(p_), tab(tab_), seen(seen_) {}

  DCX_AVX512_FN void operator()(int64_t r, int64_t rows, int64_t j0, int64_t j1, int32_t* to,
                                const int32_t* from) {
    constexpr int64_t kSpare = kAmxSparseChunk / 2;  // the spare line of a row, in words
    if (j0 == 0) {
      g0 = r / kSpqmmRows;
      for (int h = 0; h < 2; ++h) {
        const bool exists = h * kSpqmmRows < rows;
        next[h] = exists ? p.group_ptr[g0 + h] : 0;
        end[h] = exists ? p.group_ptr[g0 + h + 1] : 0;
      }
    }
    // The chunk zeroed but for its first block, the previous chunk's spare line. (The zero is
    // read from a volatile, hidden from the compiler, which would otherwise call memset for each
    // row.)
    static volatile int32_t zero_bits = 0;
    const __m512i zero = _mm512_set1_epi32(zero_bits);
    for (int64_t i = 0; i < kAmxRows; ++i) {
      int32_t* row = to + i * ldw;
      _mm512_storeu_si512(row, j0 == 0 ? zero : _mm512_loadu_si512(from + i * ldw + kSpare));
      for (int64_t c = 16; c < ldw; c += 16) _mm512_storeu_si512(row + c, zero);
    }
    uint16_t* const w16 = reinterpret_cast<uint16_t*>(to);
    const bool last = j1 >= p.k;
    const __m512i live_bit = _mm512_set1_epi32(kSpqmmLive), id_mask = _mm512_set1_epi32(kSpqmmIdMask);
    const __m512i off_mask = _mm512_set1_epi32(kSpqmmWindow - 1), low = _mm512_set1_epi32(0xFFFF);
    const __m512i spare = _mm512_set1_epi32(int32_t(kAmxRows * 2 * ldw) << 16);
    __m512i max_id = _mm512_setzero_si512();
    int64_t max_col = -1;
    bool descending = false;
    for (int h = 0; h < 2; ++h) {
      alignas(64) int32_t rows_at[kSpqmmRows];  // the halfword where lane i's row begins
      for (int i = 0; i < kSpqmmRows; ++i) rows_at[i] = int32_t((h * kSpqmmRows + i) * 2 * ldw);
      const __m512i lane = _mm512_load_si512(rows_at);
      int64_t s = next[h];
      for (; s < end[h]; ++s) {
        int64_t jw = spqmm_window(p, s, &max_col);
        if (jw >= j1 && !last) break;
        if (jw < j0) {
          descending = true;
          jw = j0;
        }
        const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(p.codes + s * kSpqmmRows)));
        const __mmask16 live = _mm512_test_epi32_mask(v, live_bit);
        max_id = _mm512_max_epu32(max_id, _mm512_and_si512(v, id_mask));
        const __m512i bits = p.group_scale
            ? bf16_round(_mm512_mul_ps(lookup<L>(tab, v), _mm512_loadu_ps(scales[h].get(p, g0 + h, jw))))
            : _mm512_castps_si512(lookup<L>(tab, v));
        const __m512i off = _mm512_and_si512(_mm512_srli_epi32(v, kSpqmmOffsetShift), off_mask);
        if (jw + kSpqmmWindow > p.k && live)  // only here can a live slot point past K
          max_col = std::max<int64_t>(max_col, jw + _mm512_mask_reduce_max_epu32(live, off));
        const __m512i at = _mm512_add_epi32(_mm512_add_epi32(lane, off), _mm512_set1_epi32(int32_t(jw - j0)));
        const __m512i place = _mm512_mask_mov_epi32(spare, live, _mm512_slli_epi32(at, 16));
        const __m512i pairs = _mm512_or_si512(place, _mm512_and_si512(bits, low));
        auto put = [w16](__m128i four) DCX_AVX512_FN {
          const uint64_t a = uint64_t(_mm_cvtsi128_si64(four)), b = uint64_t(_mm_extract_epi64(four, 1));
          w16[(a >> 16) & 0xFFFF] = uint16_t(a);
          w16[a >> 48] = uint16_t(a >> 32);
          w16[(b >> 16) & 0xFFFF] = uint16_t(b);
          w16[b >> 48] = uint16_t(b >> 32);
        };
        put(_mm512_castsi512_si128(pairs));
        put(_mm512_extracti32x4_epi32(pairs, 1));
        put(_mm512_extracti32x4_epi32(pairs, 2));
        put(_mm512_extracti32x4_epi32(pairs, 3));
      }
      next[h] = s;
    }
    seen->max_id = std::max<uint32_t>(seen->max_id, _mm512_reduce_max_epu32(max_id));
    seen->max_col = std::max<int64_t>(seen->max_col, max_col);
    seen->descending |= descending;
  }
};

// Sparse mode: rows [r0, r1) of W (r0 a multiple of 32) for activations staged in consecutive
// pairs (bf16_stage_pairs, not interleaved). tab: the codebook as bf16 bit patterns
// (bf16_pair_tables' lo) or, group-scaled, as floats. w: kAmxBufferWords words.
template <Lut L>
DCX_AMX_FN void sparse_amx(const SpqmmPacked& p, int64_t r0, int64_t r1, const Table& tab,
                           const uint32_t* xv, int64_t M, const float* bias, float* y, int64_t ldy,
                           int32_t* w, float* sums, SpqmmSeen* seen) {
  AmxSteps<L> steps(p, tab, seen);
  amx_product<kAmxSparseChunk>(p.k, r0, r1, xv, M, bias, y, ldy, w, sums, steps);
}

// Whether this CPU runs the AMX kernels: AMX-TILE, AMX-BF16, AVX512-BF16 and AVX512-VBMI (CPUID
// leaf 7; every CPU with AMX so far has VBMI, which the dense kernel's 5 to 7-bit decode uses), and
// the permission to use the tile state, which Linux grants a process on request (oneDNN asks too).
inline bool supports_amx() {
#if defined(DCX_AVX512_EMULATE)
  return true;
#elif defined(__linux__)
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!supported() || !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 22 & 1u) || !(d >> 24 & 1u) ||
        !(c >> 1 & 1u))
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
