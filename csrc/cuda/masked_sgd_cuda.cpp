// masked_sgd_step_ on CUDA: argument checks and the launch on the current stream; the kernel is
// in masked_sgd_kernel.cu.
#include <torch/library.h>

#include "cuda/cuda_glue.h"
#include "op_args.h"

namespace dcx {
namespace {

void masked_sgd_step_cuda(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mask,
                          const std::optional<at::Tensor>& momentum_buffer, double lr,
                          double momentum, double dampening, double weight_decay, bool nesterov,
                          bool maximize, bool init_buffer) {
  check_masked_sgd_step_args(param, grad, mask, momentum_buffer, lr, momentum, dampening,
                             weight_decay, nesterov);
  cuda::check_cuda_tensor(param, "param");
  const SgdHyper h =
      make_sgd_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer);
  const c10::cuda::CUDAGuard guard(param.device());
  at::Tensor p = param.contiguous();
  const at::Tensor g = grad.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor b = h.has_momentum ? momentum_buffer->contiguous() : at::Tensor();
  C10_CUDA_CHECK(cuda::launch_masked_sgd_step(
      cuda::to_dtype(p.scalar_type(), "param"), p.data_ptr(), g.data_ptr(),
      static_cast<const uint8_t*>(m.data_ptr()), h.has_momentum ? b.data_ptr() : nullptr,
      p.numel(), h, at::cuda::getCurrentCUDAStream()));
  if (!p.is_same(param)) param.copy_(p);
  if (h.has_momentum && !b.is_same(*momentum_buffer)) momentum_buffer->copy_(b);
}

}  // namespace
}  // namespace dcx

TORCH_LIBRARY_IMPL(dcx, CUDA, m) { m.impl("masked_sgd_step_", &dcx::masked_sgd_step_cuda); }
