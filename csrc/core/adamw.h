// The masked AdamW update of one element, shared by the CPU and CUDA kernels so both round the
// same way. The order of operations is torch.optim.AdamW's single-tensor step
// (torch/optim/adam.py, _single_tensor_adam with decoupled weight decay) as ATen's vectorised CPU
// kernels compute each of its ops in float32 (found by matching them bit for bit):
//   param.mul_(1 - lr * wd)                 p * decay
//   exp_avg.lerp_(grad, 1 - beta1)          fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g)
//   exp_avg_sq.mul_(beta2)
//             .addcmul_(grad, grad, 1 - b2) fma(c * g, g, v * beta2)
//   denom = sqrt(v) / sqrt(bc2) + eps       (with amsgrad: of max(vmax, v))
//   param.addcdiv_(exp_avg, denom, -step)   p + (-step * m) / denom, unfused
// Every scalar is computed in double as Python computes it and rounded to float once, as ATen
// rounds a Python scalar. So the moments equal AdamW's bit for bit; the weights may differ by an
// ulp or two, since the square root here is IEEE's (correctly rounded) and torch's CPU sqrt on
// a float32 tensor is its vector library's (within one ulp). The fused steps are explicit fmaf
// calls; the unfused products go through Arith::mul, which the CUDA kernel makes __fmul_rn so
// that nvcc cannot contract a * b + c into one FMA (the host build compiles without
// contraction).
#pragma once

#include <cmath>

#include "core/common.h"

namespace dcx {

struct AdamwHyper {
  float decay;         // 1 - lr * weight_decay (1 when weight decay is off: p * 1 == p)
  float avg_weight;    // 1 - beta1, lerp's weight
  float beta2;
  float sq_weight;     // 1 - beta2
  float bc2_sqrt;      // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size; // -lr / (1 - beta1^step)
  float grad_sign;     // -1 to maximize, else +1 (an exact multiply)
  bool amsgrad;
};

// step: the step number counted from 1 (torch's state["step"] after its increment).
inline AdamwHyper make_adamw_hyper(int64_t step, double lr, double beta1, double beta2, double eps,
                                   double weight_decay, bool amsgrad, bool maximize) {
  AdamwHyper h;
  h.decay = static_cast<float>(weight_decay != 0.0 ? 1.0 - lr * weight_decay : 1.0);
  h.avg_weight = static_cast<float>(1.0 - beta1);
  h.beta2 = static_cast<float>(beta2);
  h.sq_weight = static_cast<float>(1.0 - beta2);
  const double t = static_cast<double>(step);
  h.bc2_sqrt = static_cast<float>(std::pow(1.0 - std::pow(beta2, t), 0.5));
  h.eps = static_cast<float>(eps);
  h.neg_step_size = static_cast<float>(-(lr / (1.0 - std::pow(beta1, t))));
  h.grad_sign = maximize ? -1.0f : 1.0f;
  h.amsgrad = amsgrad;
  return h;
}

// ATen's lerp: weights below one half count from the start, the others from the end, each one
// fused multiply-add (at::vec::lerp_vec).
DCX_HOST_DEVICE float adamw_lerp(float start, float end, float weight) {
  const float diff = end - start;
  return fabsf(weight) < 0.5f ? fmaf(weight, diff, start) : fmaf(weight - 1.0f, diff, end);
}

// Host arithmetic: products rounded on their own (the host build never contracts).
struct HostArith {
  static inline float mul(float a, float b) { return a * b; }
};

// Updates param, exp_avg, exp_avg_sq (and max_sq with amsgrad) in float32. keep == false (a
// pruned position) writes exact zeros to all of them, whatever the inputs held.
template <bool kAmsgrad, typename Arith = HostArith>
DCX_HOST_DEVICE void adamw_update(float& param, float grad, float& exp_avg, float& exp_avg_sq,
                                  float& max_sq, bool keep, const AdamwHyper& h) {
  const float g = grad * h.grad_sign;
  const float m = adamw_lerp(exp_avg, g, h.avg_weight);
  const float v = fmaf(h.sq_weight * g, g, Arith::mul(exp_avg_sq, h.beta2));
  float vmax = v;
  if constexpr (kAmsgrad) vmax = v > max_sq || v != v ? v : max_sq;  // NaN wins, as torch.maximum
  const float denom = sqrtf(vmax) / h.bc2_sqrt + h.eps;
  const float p = Arith::mul(param, h.decay) + (h.neg_step_size * m) / denom;
  param = keep ? p : 0.0f;
  exp_avg = keep ? m : 0.0f;
  exp_avg_sq = keep ? v : 0.0f;
  if constexpr (kAmsgrad) max_sq = keep ? vmax : 0.0f;
}

}  // namespace dcx
