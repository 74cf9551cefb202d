// spqmm_int8, torch-free: y = x W^T + bias for a dense-mode packed W (core/spqmm_layout.h) in
// integer arithmetic, llama.cpp's Q8_0 idea applied to a codebook:
//
//   weights      the codebook c as int8 with one scale for the layer: sw = max|c| / 127,
//                cq[i] = round(c[i] * (127 / max|c|)); a weight is cq[id] * sw.
//   activations  each row of x quantized on the fly in blocks of 32 columns (kQ8Block):
//                sx[m, b] = max|x[m, block b]| / 127, xq = round(x * (127 / max|x|)) in [-127, 127]
//                (round half to even; a block of zeros has scale 0).
//   product      y[m, n] = sw * sum_b sx[m, b] * dot_b + bias[n], dot_b = sum over block b of
//                xq * cq[id] in int32 (exact), the sum over blocks in float32.
//
// The rule (q8_* below) is shared by the CPU kernels, the CUDA kernels and, written in torch,
// dcx.reference.spqmm_int8. The ids -> int8 weights are register byte shuffles (pshufb: 16 entries
// per shuffle, a tree of blends on the id's bits 4.. beyond), the dot products maddubs + madd.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/common.h"
#include "core/spqmm_layout.h"

namespace dcx {

constexpr int kQ8Block = 32;  // activation columns per scale
constexpr float kQ8Max = 127.f;

// 127 / amax (0 for a block of zeros) and amax / 127: the factors of one block.
DCX_HOST_DEVICE float q8_inverse(float amax) { return amax > 0.f ? kQ8Max / amax : 0.f; }
DCX_HOST_DEVICE float q8_scale(float amax) { return amax / kQ8Max; }

// round(v * inverse), clamped to [-127, 127] (a NaN reads as -127: defined, never UB).
DCX_HOST_DEVICE int8_t q8_round(float v, float inverse) {
#if defined(__CUDA_ARCH__)
  const float r = rintf(v * inverse);
#else
  const float r = std::nearbyint(v * inverse);
#endif
  return static_cast<int8_t>(fminf(fmaxf(r, -kQ8Max), kQ8Max));
}

DCX_HOST_DEVICE int64_t q8_blocks(int64_t k) { return (k + kQ8Block - 1) / kQ8Block; }

// One row of K values -> q8_blocks(K) * 32 int8 (zero past K) and q8_blocks(K) scales.
inline void q8_quantize_row(const float* x, int64_t k, int8_t* q, float* scale) {
  for (int64_t b = 0; b < q8_blocks(k); ++b) {
    const int64_t j0 = b * kQ8Block, n = std::min<int64_t>(kQ8Block, k - j0);
    float amax = 0.f;
    for (int64_t t = 0; t < n; ++t) amax = std::max(amax, std::fabs(x[j0 + t]));
    const float inv = q8_inverse(amax);
    scale[b] = q8_scale(amax);
    for (int64_t t = 0; t < n; ++t) q[j0 + t] = q8_round(x[j0 + t], inv);
    for (int64_t t = n; t < kQ8Block; ++t) q[j0 + t] = 0;
  }
}

// The codebook (k <= 256 entries) as int8 values and the layer's scale; table has 256 entries,
// zero past k (an id outside the codebook reads 0 and is reported by the op).
inline float q8_codebook(const float* codebook, int64_t k, int8_t* table) {
  float amax = 0.f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(codebook[i]));
  const float inv = q8_inverse(amax);
  for (int64_t i = 0; i < 256; ++i) table[i] = i < k ? q8_round(codebook[i], inv) : 0;
  return q8_scale(amax);
}

}  // namespace dcx
