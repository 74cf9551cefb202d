// The masked SGD update of one element, shared by the CPU and CUDA kernels so both round the
// same way. The order of operations is torch.optim.SGD's (_single_tensor_sgd), and every
// `a + alpha * b` is one fused multiply-add, as ATen's vectorised add(alpha=) computes it; so on
// unmasked positions the result equals torch.optim.SGD bit for bit in float32.
#pragma once

#include <cmath>

#include "core/common.h"

namespace dcx {

struct SgdHyper {
  float lr_neg;          // -lr, rounded to float once as ATen rounds alpha
  float momentum;
  float one_minus_damp;  // 1 - dampening, computed in double and rounded once
  float weight_decay;    // 0 when off: fmaf(p, 0, g) == g for every finite p
  float grad_sign;       // -1 to maximize, else +1 (an exact multiply)
  bool has_momentum;     // momentum != 0
  bool nesterov;
  bool init_buffer;      // the buffer is new: it becomes the gradient (SGD's first step)
};

inline SgdHyper make_sgd_hyper(double lr, double momentum, double dampening, double weight_decay,
                               bool nesterov, bool maximize, bool init_buffer) {
  SgdHyper h;
  h.lr_neg = static_cast<float>(-lr);
  h.momentum = static_cast<float>(momentum);
  h.one_minus_damp = static_cast<float>(1.0 - dampening);
  h.weight_decay = static_cast<float>(weight_decay);
  h.grad_sign = maximize ? -1.0f : 1.0f;
  h.has_momentum = momentum != 0.0;
  h.nesterov = nesterov;
  h.init_buffer = init_buffer;
  return h;
}

// The kinds of step, fixed per call: the loops are instantiated per kind so their bodies have no
// branches and vectorise.
enum class SgdKind { kPlain, kMomentum, kMomentumInit, kNesterov, kNesterovInit };

inline SgdKind sgd_kind(const SgdHyper& h) {
  if (!h.has_momentum) return SgdKind::kPlain;
  if (h.nesterov) return h.init_buffer ? SgdKind::kNesterovInit : SgdKind::kNesterov;
  return h.init_buffer ? SgdKind::kMomentumInit : SgdKind::kMomentum;
}

constexpr bool uses_buffer(SgdKind k) { return k != SgdKind::kPlain; }

// Updates param (and buf, for the momentum kinds) in float32. keep == false (a pruned position)
// writes exact zeros to both, whatever the inputs held. Weight decay is always applied, with
// weight_decay == 0 when off: that equals SGD's skipped step for every finite weight.
template <SgdKind kKind>
DCX_HOST_DEVICE void sgd_update(float& param, float grad, float& buf, bool keep, const SgdHyper& h) {
  float g = fmaf(param, h.weight_decay, grad * h.grad_sign);
  if constexpr (uses_buffer(kKind)) {
    constexpr bool kInit = kKind == SgdKind::kMomentumInit || kKind == SgdKind::kNesterovInit;
    constexpr bool kNesterov = kKind == SgdKind::kNesterov || kKind == SgdKind::kNesterovInit;
    const float b = kInit ? g : fmaf(g, h.one_minus_damp, buf * h.momentum);
    buf = keep ? b : 0.0f;
    g = kNesterov ? fmaf(b, h.momentum, g) : b;
  }
  const float p = fmaf(g, h.lr_neg, param);
  param = keep ? p : 0.0f;
}

}  // namespace dcx
