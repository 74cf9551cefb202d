// Launchers of the CUDA kernels: plain pointers, sizes and a stream, no torch types, so the .cu
// files that define them compile with nvcc alone (seconds) and the torch glue (*_cuda.cpp)
// compiles with the host compiler.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/sgd.h"

namespace dcx {
namespace cuda {

enum class Dtype { kFloat32, kFloat16, kBFloat16, kFloat64 };
enum class IndexDtype { kInt32, kInt64 };

// param, grad, buf: n elements of `dtype`; mask: n bytes (0 = pruned); buf may be null when
// momentum is off.
cudaError_t launch_masked_sgd_step(Dtype dtype, void* param, const void* grad, const uint8_t* mask,
                                   void* buf, int64_t n, const SgdHyper& h, cudaStream_t stream);

// out: k accumulators, zeroed by the caller, float (grad float32/16/bf16) or double (float64).
// bad_flag: one int, set to 1 when an unmasked label lies outside [0, k).
cudaError_t launch_centroid_grad(Dtype dtype, const void* grad, IndexDtype index_dtype,
                                 const void* labels, const uint8_t* mask, int64_t n, int64_t k,
                                 void* out, int* bad_flag, int sm_count, cudaStream_t stream);

// spqmm (layout at the top of csrc/core/spqmm.h). x: [m, k] contiguous, y: [m, n], codebook
// (kc entries) and bias (or null) in `dtype`. Sparse mode: codes, seg_ptr, chunks set and ws a
// zeroed float [m, n] workspace; dense mode: dense_codes [n, k] set. bad_flag: one int, bit 1 an
// id >= kc, bit 2 a column >= k, bit 4 unsound pointers.
struct SpqmmCudaArgs {
  Dtype dtype;
  const void* x;
  void* y;
  int64_t m, n, k;
  bool dense;  // dense mode (dense_codes) or sparse mode (codes, seg_ptr, chunks)
  const uint16_t* codes;
  const uint8_t* dense_codes;
  const int32_t* seg_ptr;
  const int32_t* chunks;
  int64_t num_chunks, nnz, tiles;
  int bits;
  const void* codebook;
  int kc;
  const void* bias;
  float* ws;
  int* bad_flag;
  cudaStream_t stream;
};

cudaError_t launch_spqmm(const SpqmmCudaArgs& args);

// Decode the packed weight to dense [n, k] in `dtype` at `weight` (zeroed by the caller).
cudaError_t launch_spqmm_decode(const SpqmmCudaArgs& args, void* weight);

}  // namespace cuda
}  // namespace dcx
