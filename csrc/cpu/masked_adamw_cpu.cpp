// masked_adamw_step_ on CPU: one pass over param, grad, mask and the moment buffers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "core/adamw.h"
#include "op_args.h"

namespace dcx {
namespace {

// The element type converts to float and back; the body has no branches, so the loop vectorises,
// with fmaf one instruction in the x86-64-v3 clone.
template <typename T, bool kAmsgrad>
DCX_CPU_MULTIVERSION void adamw_range(T* __restrict param, const T* __restrict grad,
                                      const uint8_t* __restrict mask, T* __restrict exp_avg,
                                      T* __restrict exp_avg_sq, T* __restrict max_sq,
                                      int64_t begin, int64_t end, AdamwHyper h) {
  for (int64_t i = begin; i < end; ++i) {
    float p = static_cast<float>(param[i]);
    float m = static_cast<float>(exp_avg[i]);
    float v = static_cast<float>(exp_avg_sq[i]);
    float vmax = kAmsgrad ? static_cast<float>(max_sq[i]) : 0.0f;
    adamw_update<kAmsgrad>(p, static_cast<float>(grad[i]), m, v, vmax, mask[i] != 0, h);
    param[i] = static_cast<T>(p);
    exp_avg[i] = static_cast<T>(m);
    exp_avg_sq[i] = static_cast<T>(v);
    if (kAmsgrad) max_sq[i] = static_cast<T>(vmax);
  }
}

void masked_adamw_step_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mask,
                           at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                           const std::optional<at::Tensor>& max_exp_avg_sq, int64_t step,
                           double lr, double beta1, double beta2, double eps, double weight_decay,
                           bool amsgrad, bool maximize) {
  check_masked_adamw_step_args(param, grad, mask, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr,
                               beta1, beta2, eps, weight_decay, amsgrad);
  const AdamwHyper h =
      make_adamw_hyper(step, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize);
  // In-place on possibly strided tensors: work on contiguous views (copies only when needed)
  // and write back.
  at::Tensor p = param.contiguous();
  const at::Tensor g = grad.contiguous();
  const at::Tensor msk = mask.contiguous();
  at::Tensor m = exp_avg.contiguous();
  at::Tensor v = exp_avg_sq.contiguous();
  at::Tensor vmax = amsgrad ? max_exp_avg_sq->contiguous() : at::Tensor();
  const int64_t n = p.numel();
  const uint8_t* mask_ptr = static_cast<const uint8_t*>(msk.data_ptr());  // bool is one byte
  const auto body = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* mp = m.data_ptr<scalar_t>();
    scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* xp = amsgrad ? vmax.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, 1 << 14, [&](int64_t lo, int64_t hi) {
      if (amsgrad) {
        adamw_range<scalar_t, true>(pp, gp, mask_ptr, mp, vp, xp, lo, hi, h);
      } else {
        adamw_range<scalar_t, false>(pp, gp, mask_ptr, mp, vp, xp, lo, hi, h);
      }
    });
  };
  switch (p.scalar_type()) {  // the dtypes check_masked_adamw_step_args admits
    case at::kFloat: body(static_cast<float*>(nullptr)); break;
    case at::kHalf: body(static_cast<at::Half*>(nullptr)); break;
    case at::kBFloat16: body(static_cast<at::BFloat16*>(nullptr)); break;
    default: TORCH_INTERNAL_ASSERT(false, "unchecked dtype ", p.scalar_type());
  }
  if (!p.is_same(param)) param.copy_(p);
  if (!m.is_same(exp_avg)) exp_avg.copy_(m);
  if (!v.is_same(exp_avg_sq)) exp_avg_sq.copy_(v);
  if (amsgrad && !vmax.is_same(*max_exp_avg_sq)) max_exp_avg_sq->copy_(vmax);
}

}  // namespace
}  // namespace dcx

TORCH_LIBRARY_IMPL(dcx, CPU, m) { m.impl("masked_adamw_step_", &dcx::masked_adamw_step_cpu); }
