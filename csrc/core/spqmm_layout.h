// The constants of the packed spqmm layout (described at the top of core/spqmm.h): the one
// definition, included by the CPU and CUDA kernels and exported by dcx._C (SPQMM_LAYOUT) to the
// Python packer, dcx.packing.pack. Torch-free and intrinsic-free, so nvcc and the native tests take it.
#pragma once

#include <cstdint>

#include "core/common.h"

namespace dcx {

constexpr int kSpqmmTable = 512;        // codebook table: 256 ids, then 256 zeros for padding
constexpr int kSpqmmRows = 16;          // rows per group = slots per step (an AVX-512 vector)
constexpr int kSpqmmWindow = 32;        // columns of x a step can reach (5-bit offsets)
constexpr int kSpqmmLiveBit = 15;       // slot bit 15: a weight (1) or padding (0)
constexpr int kSpqmmOffsetShift = 8;    // slot bits 8..12: the column's offset in the window
constexpr int kSpqmmIdMask = 0xFF;      // slot bits 0..7: the codebook id
constexpr int kSpqmmNibbleBlock = 128;  // dense mode, bits <= 4: columns per block of 16 words
constexpr int kSpqmmBitBlock = 64;      // dense mode, bits 5..7: columns per block of 8 bits bytes
constexpr uint32_t kSpqmmLive = 1u << kSpqmmLiveBit;

static_assert((kSpqmmWindow - 1) << kSpqmmOffsetShift < kSpqmmLive, "offsets sit below the live bit");
static_assert(kSpqmmIdMask < (1 << kSpqmmOffsetShift), "ids sit below the offsets");
// The portable kernel sends padding (live bit 0) to the zero half of the table by moving the
// complement of the live bit onto bit 8: table index = id | 256 for padding.
static_assert(kSpqmmTable == 2 * (kSpqmmIdMask + 1) && kSpqmmLiveBit >= 8, "table layout");

// Dense mode (codes uint8 [n, width], no positions): the ids of a row in one of three layouts,
// chosen by the bits of an id, so that a row costs about bits / 8 bytes per weight:
//   bits <= 4   nibbles: blocks of kSpqmmNibbleBlock columns, each 16 little-endian 32-bit words;
//               nibble t of word d holds column 16 t + d (a shift and a mask of one 64-byte
//               vector give 16 consecutive columns' ids)
//   bits 5..7   bit-packed: blocks of kSpqmmBitBlock columns in 8 * bits bytes; column j of the
//               row is bits [j * bits, (j + 1) * bits) of the row's little-endian bit stream, so
//               each group of 8 columns fills `bits` whole bytes
//   bits == 8   one id per byte
// Columns past K in the last block are padding: never read as weights, so never checked.
enum class SpqmmDense : int { kBytes = 0, kNibbles = 1, kBits = 2 };

DCX_HOST_DEVICE SpqmmDense spqmm_dense_layout(int64_t bits) {
  return bits <= 4 ? SpqmmDense::kNibbles : bits < 8 ? SpqmmDense::kBits : SpqmmDense::kBytes;
}

// Bytes per row of dense codes.
DCX_HOST_DEVICE int64_t spqmm_dense_width(int64_t k, int64_t bits) {
  switch (spqmm_dense_layout(bits)) {
    case SpqmmDense::kNibbles: return (k + kSpqmmNibbleBlock - 1) / kSpqmmNibbleBlock * (kSpqmmNibbleBlock / 2);
    case SpqmmDense::kBits: return (k + kSpqmmBitBlock - 1) / kSpqmmBitBlock * (kSpqmmBitBlock / 8) * bits;
    default: return k;
  }
}

// The id of column j < K of a dense row, in any layout (the portable kernels, the decodes and
// the CUDA kernels read ids through it; it never reads past the column's block).
DCX_HOST_DEVICE uint32_t spqmm_dense_id(const uint8_t* row, int64_t j, int bits) {
  switch (spqmm_dense_layout(bits)) {
    case SpqmmDense::kNibbles: {
      const int64_t t = (j >> 4) & 7, d = j & 15;
      return (row[(j / kSpqmmNibbleBlock) * (kSpqmmNibbleBlock / 2) + 4 * d + (t >> 1)] >> (4 * (t & 1))) & 15u;
    }
    case SpqmmDense::kBits: {
      const int64_t bit = j * bits;
      const int shift = int(bit & 7);
      uint32_t v = uint32_t(row[bit >> 3]) >> shift;
      if (shift + bits > 8) v |= uint32_t(row[(bit >> 3) + 1]) << (8 - shift);
      return v & ((1u << bits) - 1u);
    }
    default: return row[j];
  }
}

}  // namespace dcx
