// centroid_grad on CUDA: argument checks, the launch on the current stream, and the label check
// (one 4-byte read back, skipped with check=False and while a CUDA graph is being captured; the
// kernel never writes out of bounds either way). The kernels are in centroid_grad_kernel.cu.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/cuda_glue.h"
#include "op_args.h"

namespace dcx {
namespace {

at::Tensor centroid_grad_cuda(const at::Tensor& grad, const at::Tensor& labels,
                              int64_t num_clusters, const std::optional<at::Tensor>& mask,
                              bool check) {
  check_centroid_grad_args(grad, labels, num_clusters, mask);
  cuda::check_cuda_tensor(grad, "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g = grad.contiguous();
  const at::Tensor l = labels.contiguous();
  const bool has_mask = mask.has_value() && mask->defined();
  const at::Tensor m = has_mask ? mask->contiguous() : at::Tensor();
  const auto acc_dtype = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // The accumulators and the flag in one allocation, zeroed by one memset; the accumulators
  // first, so that the result (acc itself when grad is float32) starts its storage, as the fake
  // kernel's does (opcheck compares storage offsets).
  const int64_t acc_bytes = num_clusters * (acc_dtype == at::kDouble ? 8 : 4);
  const int64_t flag_at = (acc_bytes + 15) / 16 * 16;
  at::Tensor scratch = at::empty({flag_at + 16}, g.options().dtype(at::kByte));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(scratch.data_ptr(), 0, scratch.numel(), stream));
  at::Tensor acc = scratch.narrow(0, 0, acc_bytes).view(acc_dtype);
  at::Tensor bad = scratch.narrow(0, flag_at, 4).view(at::kInt);
  const int sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  C10_CUDA_CHECK(cuda::launch_centroid_grad(
      cuda::to_dtype(g.scalar_type(), "grad"), g.data_ptr(),
      cuda::to_index_dtype(l.scalar_type(), "labels"), l.data_ptr(),
      has_mask ? static_cast<const uint8_t*>(m.data_ptr()) : nullptr, g.numel(), num_clusters,
      acc.data_ptr(), bad.data_ptr<int>(), sm_count, stream));
  if (check && !cuda::stream_capturing()) {
    TORCH_CHECK(bad.item<int>() == 0, "labels must lie in [0, num_clusters) = [0, ", num_clusters,
                ") where mask is set; some labels are outside");
  }
  return acc.to(g.scalar_type());
}

}  // namespace
}  // namespace dcx

TORCH_LIBRARY_IMPL(dcx, CUDA, m) { m.impl("centroid_grad", &dcx::centroid_grad_cuda); }
