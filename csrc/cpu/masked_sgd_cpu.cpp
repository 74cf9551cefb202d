// masked_sgd_step_ on CPU: one pass over param, grad, mask and the momentum buffer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "core/sgd.h"
#include "op_args.h"

namespace dcx {
namespace {

// The element type converts to float and back; the body has no branches, so the loop vectorises,
// with fmaf one instruction in the x86-64-v3 clone.
template <typename T, SgdKind kKind>
DCX_CPU_MULTIVERSION void sgd_range(T* __restrict param, const T* __restrict grad,
                                    const uint8_t* __restrict mask, T* __restrict buf,
                                    int64_t begin, int64_t end, SgdHyper h) {
  for (int64_t i = begin; i < end; ++i) {
    float p = static_cast<float>(param[i]);
    float b = uses_buffer(kKind) ? static_cast<float>(buf[i]) : 0.0f;
    sgd_update<kKind>(p, static_cast<float>(grad[i]), b, mask[i] != 0, h);
    param[i] = static_cast<T>(p);
    if (uses_buffer(kKind)) buf[i] = static_cast<T>(b);
  }
}

template <typename T>
void sgd_range_any(T* param, const T* grad, const uint8_t* mask, T* buf, int64_t begin,
                   int64_t end, const SgdHyper& h) {
  switch (sgd_kind(h)) {
    case SgdKind::kPlain: return sgd_range<T, SgdKind::kPlain>(param, grad, mask, buf, begin, end, h);
    case SgdKind::kMomentum: return sgd_range<T, SgdKind::kMomentum>(param, grad, mask, buf, begin, end, h);
    case SgdKind::kMomentumInit: return sgd_range<T, SgdKind::kMomentumInit>(param, grad, mask, buf, begin, end, h);
    case SgdKind::kNesterov: return sgd_range<T, SgdKind::kNesterov>(param, grad, mask, buf, begin, end, h);
    case SgdKind::kNesterovInit: return sgd_range<T, SgdKind::kNesterovInit>(param, grad, mask, buf, begin, end, h);
  }
}

void masked_sgd_step_cpu(at::Tensor& param, const at::Tensor& grad, const at::Tensor& mask,
                         const std::optional<at::Tensor>& momentum_buffer, double lr,
                         double momentum, double dampening, double weight_decay, bool nesterov,
                         bool maximize, bool init_buffer) {
  check_masked_sgd_step_args(param, grad, mask, momentum_buffer, lr, momentum, dampening,
                             weight_decay, nesterov);
  const SgdHyper h =
      make_sgd_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffer);
  // In-place on possibly strided tensors: work on contiguous views (copies only when needed)
  // and write back.
  at::Tensor p = param.contiguous();
  at::Tensor g = grad.contiguous();
  at::Tensor m = mask.contiguous();
  at::Tensor b;
  if (h.has_momentum) b = momentum_buffer->contiguous();
  const int64_t n = p.numel();
  const uint8_t* mask_ptr = static_cast<const uint8_t*>(m.data_ptr());  // bool is one byte
  const auto body = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    scalar_t* pp = p.data_ptr<scalar_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    scalar_t* bp = h.has_momentum ? b.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, 1 << 15, [&](int64_t lo, int64_t hi) {
      sgd_range_any<scalar_t>(pp, gp, mask_ptr, bp, lo, hi, h);
    });
  };
  switch (p.scalar_type()) {  // the dtypes check_masked_sgd_step_args admits
    case at::kFloat: body(static_cast<float*>(nullptr)); break;
    case at::kHalf: body(static_cast<at::Half*>(nullptr)); break;
    case at::kBFloat16: body(static_cast<at::BFloat16*>(nullptr)); break;
    default: TORCH_INTERNAL_ASSERT(false, "unchecked dtype ", p.scalar_type());
  }
  if (!p.is_same(param)) param.copy_(p);
  if (h.has_momentum && !b.is_same(*momentum_buffer)) momentum_buffer->copy_(b);
}

}  // namespace
}  // namespace dcx

TORCH_LIBRARY_IMPL(dcx, CPU, m) { m.impl("masked_sgd_step_", &dcx::masked_sgd_step_cpu); }
