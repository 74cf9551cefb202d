// The gradients of spqmm and spqmm_int8, registered for every device at the Autograd key: y = x W^T
// + bias gives grad_x = grad_y W (W decoded once per backward by spqmm_decode: the same bytes a
// product reads, against the N x K x batch multiply-adds that follow) and grad_bias the sum of
// grad_y over the batch. int8 compute passes its rounding straight through (the gradient of the
// exact product). The packed weight is fixed: codes and positions are integers, and a codebook
// that requires grad is refused (trained quantization fine-tunes the codebook before packing).
//
// In C++ rather than torch.library.register_autograd: a Python autograd kernel runs on every call,
// grad mode or not, and cost more than the product of a small layer (about 60 us against 7 for a
// 32 x 32 layer).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace dcx {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void check_codebook(const at::Tensor& codebook, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && codebook.requires_grad()),
              "codebook requires grad, but a packed layer's codebook gets no gradient: fine-tune "
              "the codebook before packing (dcx.cluster_ and retraining), or detach it");
  TORCH_CHECK(!(at::GradMode::is_enabled() && scale.has_value() && scale->defined() &&
                scale->requires_grad()),
              "scale requires grad, but a packed layer's scales get no gradient: detach it");
}

// What the backward keeps: the packed weight (for spqmm_decode), its sizes and the bias's dtype.
void save_weight(AutogradContext* ctx, const at::Tensor& codes, const at::Tensor& windows,
                 const at::Tensor& group_ptr, const at::Tensor& chunks, const at::Tensor& codebook,
                 int64_t n, int64_t k, int64_t bits, const std::optional<at::Tensor>& bias,
                 const std::optional<at::Tensor>& scale, int64_t group_size) {
  ctx->save_for_backward({codes, windows, group_ptr, chunks, codebook,
                          scale.has_value() ? *scale : at::Tensor()});
  ctx->saved_data["n"] = n;
  ctx->saved_data["k"] = k;
  ctx->saved_data["bits"] = bits;
  ctx->saved_data["group_size"] = group_size;
  const bool has_bias = bias.has_value() && bias->defined();
  ctx->saved_data["bias_dtype"] = has_bias ? int64_t(bias->scalar_type()) : int64_t(-1);
}

// (grad_x, grad_bias) for grad_y. Gradient edges exist for tensor inputs only: x is edge 0, a
// bias (when given) edge `bias_edge`. A scaled codebook's W is scale[row] * decoded: grad_x =
// (grad_y * scale) decoded; with group scales, each group's columns of the decoded W scaled.
std::pair<at::Tensor, at::Tensor> weight_backward(AutogradContext* ctx, const at::Tensor& grad_y,
                                                  size_t bias_edge) {
  static const auto decode = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("dcx::spqmm_decode", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, int64_t, int64_t, int64_t,
                                                   bool)>();
  const variable_list saved = ctx->get_saved_variables();
  const int64_t n = ctx->saved_data["n"].toInt();
  at::Tensor grad_x, grad_bias;
  if (ctx->needs_input_grad(0)) {
    // Dense mode saved no positions (spqmm_int8 has none): empty ones, made only here.
    const at::Tensor none = saved[1].defined() ? at::Tensor()
                                               : at::empty({0}, saved[0].options().dtype(at::kInt));
    const at::Tensor& windows = saved[1].defined() ? saved[1] : none;
    const at::Tensor& group_ptr = saved[2].defined() ? saved[2] : none;
    const at::Tensor& chunks = saved[3].defined() ? saved[3] : none;
    const at::Tensor w = decode.call(saved[0], windows, group_ptr, chunks, saved[4], n,
                                     ctx->saved_data["k"].toInt(), ctx->saved_data["bits"].toInt(),
                                     /*check=*/true);
    const at::Tensor& scale = saved[5];
    const int64_t group_size = ctx->saved_data["group_size"].toInt();
    at::Tensor wt = w.to(grad_y.scalar_type());
    if (scale.defined() && group_size > 0) {
      const int64_t k = wt.size(1);
      wt = wt.mul(scale.to(wt.scalar_type()).repeat_interleave(group_size, 1).narrow(1, 0, k));
    }
    const bool row_scaled = scale.defined() && group_size == 0;
    grad_x = at::matmul(row_scaled ? grad_y.mul(scale.to(grad_y.scalar_type())) : grad_y, wt);
  }
  const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
  if (bias_dtype >= 0 && ctx->needs_input_grad(bias_edge))
    grad_bias = grad_y.reshape({-1, n}).sum(0).to(at::ScalarType(bias_dtype));
  return {grad_x, grad_bias};
}

class SpqmmFunction : public torch::autograd::Function<SpqmmFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& codes,
                            const at::Tensor& windows, const at::Tensor& group_ptr,
                            const at::Tensor& chunks, const at::Tensor& codebook, int64_t n,
                            int64_t k, int64_t bits, const std::optional<at::Tensor>& bias,
                            int64_t crossover, bool check, c10::string_view compute,
                            const std::optional<at::Tensor>& scale, int64_t group_size) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("dcx::spqmm", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                              int64_t, int64_t, const std::optional<at::Tensor>&, int64_t, bool,
                              c10::string_view, const std::optional<at::Tensor>&, int64_t)>();
    save_weight(ctx, codes, windows, group_ptr, chunks, codebook, n, k, bits, bias, scale, group_size);
    const at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, codes, windows, group_ptr, chunks, codebook, n, k, bits, bias, crossover,
                   check, compute, scale, group_size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [grad_x, grad_bias] = weight_backward(ctx, grads[0], 6);
    variable_list out(15);
    out[0] = grad_x;
    out[9] = grad_bias;
    return out;
  }
};

class SpqmmInt8Function : public torch::autograd::Function<SpqmmInt8Function> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& codes,
                            const at::Tensor& codebook, int64_t n, int64_t k, int64_t bits,
                            const std::optional<at::Tensor>& bias, bool check,
                            const std::optional<at::Tensor>& scale, int64_t group_size) {
    static const auto op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("dcx::spqmm_int8", "")
            .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                              int64_t, int64_t, const std::optional<at::Tensor>&, bool,
                              const std::optional<at::Tensor>&, int64_t)>();
    const at::Tensor none;  // no positions; the backward makes empty ones if it runs
    save_weight(ctx, codes, none, none, none, codebook, n, k, bits, bias, scale, group_size);
    const at::AutoDispatchBelowADInplaceOrView below;
    return op.call(x, codes, codebook, n, k, bits, bias, check, scale, group_size);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto [grad_x, grad_bias] = weight_backward(ctx, grads[0], 3);
    variable_list out(10);
    out[0] = grad_x;
    out[6] = grad_bias;
    return out;
  }
};

at::Tensor spqmm_autograd(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& windows,
                          const at::Tensor& group_ptr, const at::Tensor& chunks,
                          const at::Tensor& codebook, int64_t n, int64_t k, int64_t bits,
                          const std::optional<at::Tensor>& bias, int64_t crossover, bool check,
                          c10::string_view compute, const std::optional<at::Tensor>& scale,
                          int64_t group_size) {
  check_codebook(codebook, scale);
  return SpqmmFunction::apply(x, codes, windows, group_ptr, chunks, codebook, n, k, bits, bias,
                              crossover, check, compute, scale, group_size);
}

at::Tensor spqmm_int8_autograd(const at::Tensor& x, const at::Tensor& codes,
                               const at::Tensor& codebook, int64_t n, int64_t k, int64_t bits,
                               const std::optional<at::Tensor>& bias, bool check,
                               const std::optional<at::Tensor>& scale, int64_t group_size) {
  check_codebook(codebook, scale);
  return SpqmmInt8Function::apply(x, codes, codebook, n, k, bits, bias, check, scale, group_size);
}

}  // namespace
}  // namespace dcx

TORCH_LIBRARY_IMPL(dcx, Autograd, m) {
  m.impl("spqmm", &dcx::spqmm_autograd);
  m.impl("spqmm_int8", &dcx::spqmm_int8_autograd);
}
