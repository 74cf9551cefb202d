// The masked SGD update of one element, shared by the CPU and CUDA kernels so both round the
// same way. The order of operations is torch.optim.SGD's (_single_tensor_sgd), and every
// `a + alpha * b` is one fused multiply-add, as ATen's vectorised add(alpha=) computes it; so on
// unmasked positions the result equals torch.optim.SGD bit for bit in float32.
#pragma once

#include <cmath>

#include "core/common.h"

namespace dcx {

struct SgdHyper {
  float lr_neg;            // -lr, rounded to float once as ATen rounds alpha
  float momentum;
  float one_minus_damp;    // 1 - dampening, computed in double and rounded once
  float weight_decay;
  bool has_momentum;       // momentum != 0
  bool has_weight_decay;   // weight_decay != 0
  bool nesterov;
  bool maximize;
  bool init_buffer;        // the buffer is new: it becomes the gradient (SGD's first step)
};

inline SgdHyper make_sgd_hyper(double lr, double momentum, double dampening, double weight_decay,
                               bool nesterov, bool maximize, bool init_buffer) {
  SgdHyper h;
  h.lr_neg = static_cast<float>(-lr);
  h.momentum = static_cast<float>(momentum);
  h.one_minus_damp = static_cast<float>(1.0 - dampening);
  h.weight_decay = static_cast<float>(weight_decay);
  h.has_momentum = momentum != 0.0;
  h.has_weight_decay = weight_decay != 0.0;
  h.nesterov = nesterov;
  h.maximize = maximize;
  h.init_buffer = init_buffer;
  return h;
}

// Updates param (and buf, when momentum is on) in float32. keep == false (a pruned position)
// writes exact zeros to both, whatever the inputs held.
DCX_HOST_DEVICE void sgd_update(float& param, float grad, float* buf, bool keep, const SgdHyper& h) {
  float g = h.maximize ? -grad : grad;
  if (h.has_weight_decay) g = fmaf(param, h.weight_decay, g);
  if (h.has_momentum) {
    float b = h.init_buffer ? g : fmaf(g, h.one_minus_damp, *buf * h.momentum);
    *buf = keep ? b : 0.0f;
    g = h.nesterov ? fmaf(b, h.momentum, g) : b;
  }
  float p = fmaf(g, h.lr_neg, param);
  param = keep ? p : 0.0f;
}

}  // namespace dcx
