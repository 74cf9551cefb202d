// spqmm_int8, torch-free: y = x W^T + bias for a dense-mode packed W (core/spqmm_layout.h) with
// int8 activations and integer dot products, llama.cpp's Q8_0 idea applied to a codebook:
//
//   weights      the codebook c as int16 values with one scale for the layer: sw = max|c| / 32767,
//                cq[i] = round(c[i] * (32767 / max|c|)); a weight is cq[id] * sw. (int8 values
//                cost too much: a trained codebook's largest entry is often 30 to 300 times its
//                median weight, and with 127 levels all-MiniLM-L6-v2 at 6 bits fell from cos
//                0.994 to 0.963 against fp32; the codebook has at most 256 entries, so its width
//                costs no memory, only a second byte shuffle per lookup.)
//   activations  each row of x quantized on the fly in blocks of 32 columns (kQ8Block):
//                sx[m, b] = max|x[m, block b]| / 127, xq = round(x * (127 / max|x|)) in [-127, 127]
//                (round half to even; a block of zeros has scale 0).
//   product      y[m, n] = sw * sum_b sx[m, b] * dot_b + bias[n], dot_b = sum over block b of
//                xq * cq[id] in int32 (exact: |dot_b| <= 32 * 127 * 32767 < 2^31), the sum over
//                blocks in float32.
//
// The rule (q8_* below) is shared by the CPU kernels, the CUDA kernels and, written in torch,
// dcx.reference.spqmm_int8. On the CPU the ids become int16 weights by byte shuffles (pshufb:
// 16 entries per shuffle and byte plane, a tree of blends on the id's bits 4.. beyond), and the
// dot products are pmaddwd on int16 activations.
//
// Many rows (the plan's kInt8Gemm, CPU only; with VNNI from 2 rows, from one at 6 bits and more,
// also kInt8Dots and kInt8Fused, the same rule in one pass, and for sparse layers kSparseInt8) take a coarser rule that a GEMM can run, as torch's int8
// dynamic quantization and torchao's do: W decoded once (group scales included) and each of its rows quantized whole
// to int8 (sw[n] = max|W[n]| / 127), each row of x likewise (sx[m]), the int32 products by ATen's
// int8 GEMM, y[m, n] = sx[m] sw[n] acc[m, n] + bias[n] (written in torch:
// dcx.reference.spqmm_int8_gemm). One scale per row of x instead of one per 32 columns
// costs fidelity: all-MiniLM-L6-v2 at 6 bits, 64 sentences of up to 128 tokens, cos 0.9907
// against fp32 where the blocks of 32 gave 0.9942 (benchmarks/bench_transformer.py; in a float
// simulation the rows of x alone cost 0.9942 -> 0.9917, the rows of W then 0.9906; torch's int8
// dynamic quantization, one scale for all of W, 0.9462).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/common.h"
#include "core/spqmm_layout.h"

namespace dcx {

constexpr int kQ8Block = 32;        // activation columns per scale
constexpr float kQ8Max = 127.f;     // activations: int8 levels either side of 0
constexpr float kQ8WMax = 32767.f;  // codebook: int16 levels either side of 0

// levels / amax (0 for a block of zeros) and amax / levels: the factors of one block.
DCX_HOST_DEVICE float q8_inverse(float amax, float levels = kQ8Max) {
  return amax > 0.f ? levels / amax : 0.f;
}
DCX_HOST_DEVICE float q8_scale(float amax, float levels = kQ8Max) { return amax / levels; }

// round(v * inverse), clamped to [-levels, levels] (a NaN reads as -levels: defined, never UB).
DCX_HOST_DEVICE int32_t q8_round(float v, float inverse, float levels = kQ8Max) {
#if defined(__CUDA_ARCH__)
  const float r = rintf(v * inverse);
#else
  const float r = std::nearbyint(v * inverse);
#endif
  // fmaxf / fminf without the calls into libm they compile to on the CPU: a NaN fails the first
  // comparison and reads -levels, as fmaxf(NaN, -levels) does.
  const float low = r >= -levels ? r : -levels;
  return static_cast<int32_t>(low <= levels ? low : levels);
}

// Where column t of a block of 32 sits in the staged activations (the CPU kernels' order: the
// AVX2 lookup yields the weights of columns 0-7 and 16-23 in one vector, 8-15 and 24-31 in the
// other, so x is staged to match; the order within a block does not change the int32 dot).
DCX_HOST_DEVICE int q8_slot(int t) { return t < 8 || t >= 24 ? t : t < 16 ? t + 8 : t - 8; }

DCX_HOST_DEVICE int64_t q8_blocks(int64_t k) { return (k + kQ8Block - 1) / kQ8Block; }

// One row of K values -> q8_blocks(K) * 32 int16 activations (each block in q8_slot order, zero
// past K) and q8_blocks(K) scales.
inline void q8_quantize_row(const float* x, int64_t k, int16_t* q, float* scale) {
  for (int64_t b = 0; b < q8_blocks(k); ++b) {
    const int64_t j0 = b * kQ8Block, n = std::min<int64_t>(kQ8Block, k - j0);
    float amax = 0.f;
    for (int64_t t = 0; t < n; ++t) amax = std::max(amax, std::fabs(x[j0 + t]));
    const float inv = q8_inverse(amax);
    scale[b] = q8_scale(amax);
    for (int t = 0; t < kQ8Block; ++t)
      q[j0 + q8_slot(t)] = int16_t(t < n ? q8_round(x[j0 + t], inv) : 0);
  }
}

// The longest row the int8 GEMM and the fused kernel take: both add 128 to one operand to use
// u8 x s8 products, so a dot of K terms reaches 255 * 127 * K, which must stay below 2^31.
constexpr int64_t kQ8GemmMaxK = 65536;

// v [K] quantized whole (the many-rows rule above): q [K] int8 and the row's scale.
// max|v| is taken as the largest bit pattern of |v|, an integer max that the compiler vectorises
// (a float max is not associative: it ran one value per 4 cycles); a NaN is the largest and
// makes the row's scale NaN, as torch's amax does.
inline float q8_quantize_whole_row(const float* v, int64_t k, int8_t* q) {
  uint32_t amax_bits = 0;
  for (int64_t j = 0; j < k; ++j) {
    uint32_t bits;
    std::memcpy(&bits, v + j, sizeof(bits));
    amax_bits = std::max(amax_bits, bits & 0x7fffffffu);
  }
  float amax;
  std::memcpy(&amax, &amax_bits, sizeof(amax));
  const float inv = q8_inverse(amax);
  for (int64_t j = 0; j < k; ++j) q[j] = int8_t(q8_round(v[j], inv));
  return q8_scale(amax);
}

// The VNNI kernels' activations (core/spqmm_avx512.h): the batch rows in the vector lanes, 16 rows
// a group. Quantized rows (xq [M][ldq] in q8_slot order, xs [M][blocks]) restaged as
// xv [ceil(M / 16)][blocks][16 pairs][16 rows] int32, pair d of block b holding the int16s of
// columns 32 b + d (low half) and 32 b + 16 + d (high half) of one row, and sv [..][blocks][16
// rows] scales; rows past M are zeros.
constexpr int kQ8Lanes = 16;
constexpr int kQ8Pairs = kQ8Block / 2;

inline int64_t q8_lane_groups(int64_t m) { return (m + kQ8Lanes - 1) / kQ8Lanes; }

inline void q8_stage_pairs(const int16_t* xq, int64_t ldq, const float* xs, int64_t m_rows,
                           int64_t blocks, int32_t* xv, float* sv) {
  for (int64_t g = 0; g < q8_lane_groups(m_rows); ++g)
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t* pairs = xv + (g * blocks + b) * kQ8Pairs * kQ8Lanes;
      float* scales = sv + (g * blocks + b) * kQ8Lanes;
      for (int i = 0; i < kQ8Lanes; ++i) {
        const int64_t m = g * kQ8Lanes + i;
        const int16_t* q = xq + m * ldq + b * kQ8Block;
        scales[i] = m < m_rows ? xs[m * blocks + b] : 0.f;
        for (int d = 0; d < kQ8Pairs; ++d)
          pairs[d * kQ8Lanes + i] =
              m < m_rows ? int32_t(uint32_t(uint16_t(q[q8_slot(d)])) |
                                   uint32_t(uint16_t(q[q8_slot(d + kQ8Pairs)])) << 16)
                         : 0;
      }
    }
}

// The fused kernel of the many-rows rule (SpqmmKernel::kInt8Fused, core/spqmm_avx512.h): each
// row of W decoded straight into int8 by a table of its own (the codebook quantized with the
// row's scale), then u8 x s8 dot products (vpdpbusd) with the batch rows in the vector lanes.
// It reads a dense row in units of 64 ids, in the order one vector of codes yields them: for
// bits <= 4 a block of 128 columns is two units, the low and the high nibbles of its 64 bytes
// (byte 4 d + t of the block holds columns 32 t + d and 32 t + 16 + d), for more bits a unit is
// 64 consecutive columns. Byte i of unit u is column q8_unit_column(layout, u, i); the
// activations are staged in the same order, so the int32 dots are the GEMM's.
DCX_HOST_DEVICE int64_t q8_unit_column(SpqmmDense layout, int64_t u, int i) {
  if (layout == SpqmmDense::kNibbles) return 128 * (u >> 1) + 32 * (i & 3) + 16 * (u & 1) + (i >> 2);
  return 64 * u + i;
}

DCX_HOST_DEVICE int64_t q8_units(SpqmmDense layout, int64_t k) {
  return layout == SpqmmDense::kNibbles ? 2 * ((k + 127) / 128) : (k + 63) / 64;
}

// Lane group g (rows 16 g .. 16 g + 15) of xq ([m][k] int8, rows quantized whole) staged for the
// fused kernel as unsigned bytes xq + 128 (vpdpbusd multiplies unsigned by signed bytes, and the
// weights, broadcast from memory, must be the signed operand): xv [units * 16 quads][16 lanes]
// int32, quad 16 u + d of lane l holding bytes 4 d .. 4 d + 3 of unit u of row 16 g + l (128,
// a zero, past k and past m). Written out as the reference; the op stages with the vectorised
// avx512::stage_quads, which the native tests compare with this.
inline void q8_stage_quads(const int8_t* xq, int64_t m, int64_t k, SpqmmDense layout, int64_t g,
                           int32_t* xv) {
  const int64_t units = q8_units(layout, k);
  for (int l = 0; l < kQ8Lanes; ++l) {
    const int64_t row = g * kQ8Lanes + l;
    const int8_t* q = xq + row * k;
    for (int64_t u = 0; u < units; ++u)
      for (int d = 0; d < 16; ++d) {
        uint32_t word = 0;
        for (int t = 0; t < 4; ++t) {
          const int64_t j = q8_unit_column(layout, u, 4 * d + t);
          const int v = row < m && j < k ? q[j] : 0;
          word |= uint32_t(v + 128) << (8 * t);
        }
        xv[(u * 16 + d) * kQ8Lanes + l] = int32_t(word);
      }
  }
}

// The codebook (k <= 256 entries) as int16 values and the layer's scale; table has 256 entries,
// zero past k (an id outside the codebook reads 0 and is reported by the op).
inline float q8_codebook(const float* codebook, int64_t k, int16_t* table) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(codebook[i]));
  const float inv = q8_inverse(amax, kQ8WMax);
  for (int64_t i = 0; i < 256; ++i) table[i] = int16_t(i < k ? q8_round(codebook[i], inv, kQ8WMax) : 0);
  return q8_scale(amax, kQ8WMax);
}

}  // namespace dcx
