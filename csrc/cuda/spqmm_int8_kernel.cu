// spqmm_int8 on CUDA (the arithmetic is at the top of csrc/core/spqmm_int8.h): one kernel
// quantizes x per row in blocks of 32 (a warp per block: lane t holds column 32 b + t), a second
// multiplies. There a warp owns one row of W and up to kRowsPerWarp rows of x: per block, each
// lane decodes the id of its column, looks its int16 weight up in a shared table, and the warp
// sums the 32 exact int32 products by shuffles before one scaled float add per row of x. x is
// held in natural column order here (the CPU's q8_slot order serves its AVX2 lookups only).
// The float steps are written as fmaf: nvcc would contract them anyway, and spelt out they
// round the same in every build (the emulator's harness checks them bit for bit). Group scales
// (launch.h; groups of a multiple of 32 columns): a block's activation scale is multiplied by
// the row's scale for the block's group first, fmaf(dot, sx * gs, acc) as the CPU's
// dot * (sx * gs); without them gs is 1 and the product exact, so nothing rounds differently.
#include <cstdint>

#include "core/spqmm_int8.h"
#include "core/spqmm_layout.h"
#include "cuda/dtype.cuh"

namespace dcx {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 8;  // rows of x a warp carries at once (float sums in registers)
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__global__ void __launch_bounds__(kThreads)
q8_quantize_kernel(const T* __restrict__ x, int64_t m, int64_t k, int64_t blocks,
                   int8_t* __restrict__ xq, float* __restrict__ xs) {
  const int lane = threadIdx.x & 31;
  const int64_t item = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);  // (row, block)
  if (item >= m * blocks) return;
  const int64_t row = item / blocks, b = item % blocks, j = b * kQ8Block + lane;
  const float v = j < k ? to_float(x[row * k + j]) : 0.f;
  float amax = fabsf(v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, o));
  xq[row * blocks * kQ8Block + j] = j < k ? int8_t(q8_round(v, q8_inverse(amax))) : int8_t(0);
  if (lane == 0) xs[row * blocks + b] = q8_scale(amax);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
q8_dense_kernel(const int8_t* __restrict__ xq, const float* __restrict__ xs, int64_t m,
                const uint8_t* __restrict__ codes, int64_t n, int64_t k, int bits,
                const T* __restrict__ codebook, int kc, const T* __restrict__ bias,
                const float* __restrict__ gscale, int64_t scale_group, int64_t scale_groups,
                T* __restrict__ y, int* __restrict__ bad_flag) {
  __shared__ int table[256];
  __shared__ float wscale;
  // The codebook's int16 values and scale (q8_codebook's rule), by the first warp.
  if (threadIdx.x < 32) {
    float amax = 0.f;
    for (int i = threadIdx.x; i < kc; i += 32) amax = fmaxf(amax, fabsf(to_float(codebook[i])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, o));
    const float inv = q8_inverse(amax, kQ8WMax);
    for (int i = threadIdx.x; i < 256; i += 32)
      table[i] = i < kc ? q8_round(to_float(codebook[i]), inv, kQ8WMax) : 0;
    if (threadIdx.x == 0) wscale = q8_scale(amax, kQ8WMax);
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= n) return;
  const int64_t m0 = blockIdx.y * int64_t(kRowsPerWarp);
  const int mvalid = m - m0 < kRowsPerWarp ? int(m - m0) : kRowsPerWarp;
  const int64_t blocks = q8_blocks(k), ldq = blocks * kQ8Block;
  const uint8_t* code = codes + row * spqmm_dense_width(k, bits);
  float acc[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) acc[r] = 0.f;
  uint32_t max_id = 0;
  // The row's scale for block b's group, read when the blocks enter the next group (the same for
  // the whole warp: one row).
  const float* srow = gscale ? gscale + row * scale_groups : nullptr;
  float gs = 1.f;
  int64_t sgroup = -1, snext = 0;  // the group of gs; the first column past it
  for (int64_t b = 0; b < blocks; ++b) {
    if (srow && b * kQ8Block >= snext) {
      sgroup = min(sgroup + 1, scale_groups - 1);
      snext += scale_group;
      gs = srow[sgroup];
    }
    const int64_t j = b * kQ8Block + lane;
    const uint32_t id = j < k ? spqmm_dense_id(code, j, bits) : 0u;  // padding is never read
    max_id = max(max_id, id);
    const int w = table[id & 255u];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      if (r < mvalid) {
        int dot = int(xq[(m0 + r) * ldq + j]) * w;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(kFull, dot, o);
        acc[r] = fmaf(float(dot), xs[(m0 + r) * blocks + b] * gs, acc[r]);
      }
    }
  }
  if (__any_sync(kFull, max_id >= uint32_t(kc)) && lane == 0) atomicOr(bad_flag, 1);
  if (lane == 0) {
    const float bv = bias ? to_float(bias[row]) : 0.f;
    for (int r = 0; r < mvalid; ++r) y[(m0 + r) * n + row] = from_float<T>(fmaf(acc[r], wscale, bv));
  }
}

template <typename T>
cudaError_t launch_typed(const SpqmmInt8CudaArgs& a) {
  const int64_t blocks = q8_blocks(a.k), ldq = blocks * kQ8Block;
  const int64_t items = a.m * blocks;
  q8_quantize_kernel<T><<<dim3(unsigned((items + kWarps - 1) / kWarps)), kThreads, 0, a.stream>>>(
      static_cast<const T*>(a.x), a.m, a.k, blocks, a.xq, a.xs);
  cudaError_t err = cudaGetLastError();
  // Rows of x in pieces the grid's second dimension (at most 65535 blocks) can hold.
  constexpr int64_t kPiece = int64_t(65535) * kRowsPerWarp;
  for (int64_t m0 = 0; m0 < a.m && err == cudaSuccess; m0 += kPiece) {
    const int64_t rows = a.m - m0 < kPiece ? a.m - m0 : kPiece;
    const dim3 grid(unsigned((a.n + kWarps - 1) / kWarps), unsigned((rows + kRowsPerWarp - 1) / kRowsPerWarp));
    q8_dense_kernel<T><<<grid, kThreads, 0, a.stream>>>(
        a.xq + m0 * ldq, a.xs + m0 * blocks, rows, a.codes, a.n, a.k, a.bits,
        static_cast<const T*>(a.codebook), a.kc, static_cast<const T*>(a.bias), a.group_scale,
        a.scale_group, a.scale_groups, static_cast<T*>(a.y) + m0 * a.n, a.bad_flag);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace

cudaError_t launch_spqmm_int8(const SpqmmInt8CudaArgs& args) {
  if (args.m == 0 || args.n == 0 || args.k == 0) return cudaSuccess;
  // grid sizes: rows of W and (row, block) items of x over 8 warps per block, below 2^31 blocks
  if (args.n / kWarps >= (int64_t(1) << 31) - 1 ||
      args.m * q8_blocks(args.k) / kWarps >= (int64_t(1) << 31) - 1) {
    return cudaErrorInvalidConfiguration;
  }
  switch (args.dtype) {
    case Dtype::kFloat32: return launch_typed<float>(args);
    case Dtype::kFloat16: return launch_typed<__half>(args);
    case Dtype::kBFloat16: return launch_typed<__nv_bfloat16>(args);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace dcx
