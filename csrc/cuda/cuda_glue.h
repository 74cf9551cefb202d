// Torch-side helpers for the CUDA glue files (*_cuda.cpp): dtype mapping, stream, error checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launch.h"

namespace dcx {
namespace cuda {

inline Dtype to_dtype(at::ScalarType s, const char* name) {
  switch (s) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kDouble: return Dtype::kFloat64;
    default: TORCH_CHECK(false, name, " has unsupported dtype ", s);
  }
}

inline IndexDtype to_index_dtype(at::ScalarType s, const char* name) {
  TORCH_CHECK(s == at::kInt || s == at::kLong, name, " must be int32 or int64, got ", s);
  return s == at::kInt ? IndexDtype::kInt32 : IndexDtype::kInt64;
}

inline void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

// True while the current stream is being captured into a CUDA graph: no host syncs then.
inline bool stream_capturing() {
  cudaStreamCaptureStatus status;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace cuda
}  // namespace dcx
