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

}  // namespace cuda
}  // namespace dcx
