// The constants of the packed spqmm layout (described at the top of core/spqmm.h): the one
// definition, included by the CPU and CUDA kernels and exported by dcx._C (SPQMM_LAYOUT) to the
// Python packer, dcx.nn.pack. Torch-free and intrinsic-free, so nvcc and the native tests take it.
#pragma once

#include <cstdint>

namespace dcx {

constexpr int kSpqmmTable = 512;        // codebook table: 256 ids, then 256 zeros for padding
constexpr int kSpqmmRows = 16;          // rows per group = slots per step (an AVX-512 vector)
constexpr int kSpqmmWindow = 32;        // columns of x a step can reach (5-bit offsets)
constexpr int kSpqmmLiveBit = 15;       // slot bit 15: a weight (1) or padding (0)
constexpr int kSpqmmOffsetShift = 8;    // slot bits 8..12: the column's offset in the window
constexpr int kSpqmmIdMask = 0xFF;      // slot bits 0..7: the codebook id
constexpr int kSpqmmNibbleBlock = 128;  // dense mode, bits <= 4: columns per block of 16 words
constexpr uint32_t kSpqmmLive = 1u << kSpqmmLiveBit;

static_assert((kSpqmmWindow - 1) << kSpqmmOffsetShift < kSpqmmLive, "offsets sit below the live bit");
static_assert(kSpqmmIdMask < (1 << kSpqmmOffsetShift), "ids sit below the offsets");
// The portable kernel sends padding (live bit 0) to the zero half of the table by moving the
// complement of the live bit onto bit 8: table index = id | 256 for padding.
static_assert(kSpqmmTable == 2 * (kSpqmmIdMask + 1) && kSpqmmLiveBit >= 8, "table layout");

}  // namespace dcx
