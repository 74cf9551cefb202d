// masked_adamw_step_ on CUDA: argument checks and the launch on the current stream; the kernel is
// in masked_adamw_kernel.cu.
#include <torch/library.h>

#include "cuda/cuda_glue.h"
#include "op_args.h"

namespace dcx {
namespace {

void masked_adamw_step_cuda(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mask,
                            at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                            const std::optional<at::Tensor>& max_exp_avg_sq, int64_t step,
                            double lr, double beta1, double beta2, double eps,
                            double weight_decay, bool amsgrad, bool maximize) {
  check_masked_adamw_step_args(param, grad, mask, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr,
                               beta1, beta2, eps, weight_decay, amsgrad);
  cuda::check_cuda_tensor(param, "param");
  const AdamwHyper h =
      make_adamw_hyper(step, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize);
  const c10::cuda::CUDAGuard guard(param.device());
  at::Tensor p = param.contiguous();
  const at::Tensor g = grad.contiguous();
  const at::Tensor msk = mask.contiguous();
  at::Tensor m = exp_avg.contiguous();
  at::Tensor v = exp_avg_sq.contiguous();
  at::Tensor vmax = amsgrad ? max_exp_avg_sq->contiguous() : at::Tensor();
  C10_CUDA_CHECK(cuda::launch_masked_adamw_step(
      cuda::to_dtype(p.scalar_type(), "param"), p.data_ptr(), g.data_ptr(),
      static_cast<const uint8_t*>(msk.data_ptr()), m.data_ptr(), v.data_ptr(),
      amsgrad ? vmax.data_ptr() : nullptr, p.numel(), h, at::cuda::getCurrentCUDAStream()));
  if (!p.is_same(param)) param.copy_(p);
  if (!m.is_same(exp_avg)) exp_avg.copy_(m);
  if (!v.is_same(exp_avg_sq)) exp_avg_sq.copy_(v);
  if (amsgrad && !vmax.is_same(*max_exp_avg_sq)) max_exp_avg_sq->copy_(vmax);
}

}  // namespace
}  // namespace dcx

TORCH_LIBRARY_IMPL(dcx, CUDA, m) { m.impl("masked_adamw_step_", &dcx::masked_adamw_step_cuda); }
