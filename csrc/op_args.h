// Argument validation per op, shared by the CPU and CUDA implementations so both reject the same
// inputs with the same messages.
#pragma once

#include <cmath>
#include <optional>

#include "checks.h"
#include "core/kmeans1d.h"
#include "core/spqmm_layout.h"

namespace dcx {

inline void check_masked_sgd_step_args(const at::Tensor& param, const at::Tensor& grad,
                                       const at::Tensor& mask,
                                       const std::optional<at::Tensor>& momentum_buffer,
                                       double lr, double momentum, double dampening,
                                       double weight_decay, bool nesterov) {
  check_dtype_in(param, "param", {at::kFloat, at::kHalf, at::kBFloat16},
                 "float32, float16 or bfloat16");
  check_like(grad, "grad", param, "param");
  check_mask(mask, "mask", param, "param");
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "lr must be a finite number >= 0, got ", lr);
  TORCH_CHECK(std::isfinite(momentum) && momentum >= 0.0,
              "momentum must be a finite number >= 0, got ", momentum);
  TORCH_CHECK(std::isfinite(dampening), "dampening must be finite, got ", dampening);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0,
              "weight_decay must be a finite number >= 0, got ", weight_decay);
  TORCH_CHECK(!nesterov || (momentum > 0.0 && dampening == 0.0),
              "nesterov requires momentum > 0 and dampening == 0");
  if (momentum != 0.0) {
    TORCH_CHECK(momentum_buffer.has_value() && momentum_buffer->defined(),
                "momentum_buffer must be given when momentum != 0");
  }
  if (momentum_buffer.has_value() && momentum_buffer->defined()) {
    check_like(*momentum_buffer, "momentum_buffer", param, "param");
  }
}

inline void check_masked_adamw_step_args(const at::Tensor& param, const at::Tensor& grad,
                                         const at::Tensor& mask, const at::Tensor& exp_avg,
                                         const at::Tensor& exp_avg_sq,
                                         const std::optional<at::Tensor>& max_exp_avg_sq,
                                         int64_t step, double lr, double beta1, double beta2,
                                         double eps, double weight_decay, bool amsgrad) {
  check_dtype_in(param, "param", {at::kFloat, at::kHalf, at::kBFloat16},
                 "float32, float16 or bfloat16");
  check_like(grad, "grad", param, "param");
  check_mask(mask, "mask", param, "param");
  check_like(exp_avg, "exp_avg", param, "param");
  check_like(exp_avg_sq, "exp_avg_sq", param, "param");
  if (amsgrad) {
    TORCH_CHECK(max_exp_avg_sq.has_value() && max_exp_avg_sq->defined(),
                "max_exp_avg_sq must be given when amsgrad is set");
    check_like(*max_exp_avg_sq, "max_exp_avg_sq", param, "param");
  }
  TORCH_CHECK(step >= 1, "step must be >= 1 (the step number after its increment), got ", step);
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "lr must be a finite number >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "beta1 must lie in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "beta2 must lie in [0, 1), got ", beta2);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "eps must be a finite number >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0,
              "weight_decay must be a finite number >= 0, got ", weight_decay);
}

inline void check_centroid_grad_args(const at::Tensor& grad, const at::Tensor& labels,
                                     int64_t num_clusters, const std::optional<at::Tensor>& mask) {
  check_float_dtype(grad, "grad");
  check_index_dtype(labels, "labels");
  check_same_shape(labels, "labels", grad, "grad");
  check_same_device(labels, "labels", grad, "grad");
  TORCH_CHECK(num_clusters >= 1, "num_clusters must be >= 1, got ", num_clusters);
  if (mask.has_value() && mask->defined()) check_mask(*mask, "mask", grad, "grad");
}

inline void check_huffman_code_lengths(const at::Tensor& code_lengths) {
  check_dtype_in(code_lengths, "code_lengths", {at::kByte}, "uint8");
  TORCH_CHECK(code_lengths.dim() == 1, "code_lengths must be 1-D, got ", code_lengths.dim(), "-D");
  TORCH_CHECK(code_lengths.numel() <= 65536, "code_lengths must have at most 65536 entries, got ",
              code_lengths.numel());
}

inline void check_huffman_code_lengths_args(const at::Tensor& freqs, int64_t max_length) {
  check_dtype_in(freqs, "freqs", {at::kLong}, "int64");
  TORCH_CHECK(freqs.dim() == 1, "freqs must be 1-D, got ", freqs.dim(), "-D");
  TORCH_CHECK(max_length >= 1 && max_length <= 24, "max_length must be in [1, 24], got ",
              max_length);
}

inline void check_huffman_encode_args(const at::Tensor& symbols, const at::Tensor& code_lengths) {
  check_dtype_in(symbols, "symbols", {at::kByte, at::kUInt16, at::kShort, at::kInt, at::kLong},
                 "uint8, uint16, int16, int32 or int64");
  check_huffman_code_lengths(code_lengths);
}

inline void check_huffman_decode_args(const at::Tensor& data, const at::Tensor& code_lengths,
                                      int64_t count) {
  check_dtype_in(data, "data", {at::kByte}, "uint8");
  TORCH_CHECK(data.dim() == 1, "data must be 1-D, got ", data.dim(), "-D");
  check_huffman_code_lengths(code_lengths);
  TORCH_CHECK(count >= 0, "count must be >= 0, got ", count);
}

// Returns the initialisation; `optimal` says whether the method is the exact program.
inline kmeans1d::Init check_kmeans1d_args(const at::Tensor& values, int64_t num_clusters,
                                          const std::string& init, int64_t max_iter, double tol,
                                          const std::string& method, bool* optimal) {
  check_dtype_in(values, "values", {at::kFloat, at::kDouble}, "float32 or float64");
  TORCH_CHECK(num_clusters >= 1 && num_clusters <= INT32_MAX,
              "num_clusters must be in [1, 2^31), got ", num_clusters);
  TORCH_CHECK(values.numel() <= INT32_MAX, "values must have fewer than 2^31 elements, got ",
              values.numel());
  TORCH_CHECK(max_iter >= 0, "max_iter must be >= 0, got ", max_iter);
  TORCH_CHECK(std::isfinite(tol) && tol >= 0.0, "tol must be a finite number >= 0, got ", tol);
  TORCH_CHECK(method == "lloyd" || method == "optimal",
              "method must be 'lloyd' or 'optimal', got '", method, "'");
  *optimal = method == "optimal";
  if (init == "linear") return kmeans1d::Init::kLinear;
  if (init == "density") return kmeans1d::Init::kDensity;
  if (init == "random") return kmeans1d::Init::kRandom;
  if (init == "kmeans++") return kmeans1d::Init::kPlusPlus;
  TORCH_CHECK(false, "init must be 'linear', 'density', 'random' or 'kmeans++', got '", init, "'");
}

// Weighted k-means: one weight per value, finite and > 0 (a zero-weight value would leave a
// cluster without a mean; give such values a tiny weight instead).
inline void check_kmeans1d_weights(const std::optional<at::Tensor>& weights,
                                   const at::Tensor& values) {
  if (!weights.has_value()) return;
  check_same_dtype(*weights, "weights", values, "values");
  check_same_shape(*weights, "weights", values, "values");
  check_same_device(*weights, "weights", values, "values");
  // Tensor methods, not at:: functions: some includers see only <ATen/core/Tensor.h>.
  TORCH_CHECK(weights->isfinite().logical_and(weights->gt(0)).all().item<bool>(),
              "weights must be finite and > 0");
}

// After sorting, NaN (either sign) and infinities sit at the ends.
inline void check_kmeans1d_finite(double first, double last) {
  TORCH_CHECK(std::isfinite(first) && std::isfinite(last),
              "values must be finite: found NaN or Inf");
}

// spqmm: shapes, dtypes and devices of the packed weight (csrc/core/spqmm.h describes the
// layout). The contents (ids, windows, pointers) are checked by the kernels themselves.
constexpr int64_t kSpqmmGroupRows = kSpqmmRows;  // rows per group: a step holds a slot per row

// The packed weight alone (spqmm_decode has no x): bits, the sizes, the codebook, the codes'
// dtype and, for dense mode (uint8), their shape; codes on the codebook's device.
inline void check_spqmm_sizes(int64_t out_features, int64_t in_features, int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "bits must lie in [1, 8], got ", bits);
  TORCH_CHECK(out_features >= 0 && in_features >= 0,
              "out_features and in_features must be >= 0, got ", out_features, " and ", in_features);
  TORCH_CHECK(in_features < (int64_t(1) << 31) - 64, "in_features must be below 2^31 - 64, got ",
              in_features);
}

inline void check_spqmm_weight_args(const at::Tensor& codes, const at::Tensor& codebook,
                                    int64_t out_features, int64_t in_features, int64_t bits) {
  check_spqmm_sizes(out_features, in_features, bits);
  check_dtype_in(codebook, "codebook", {at::kFloat, at::kHalf, at::kBFloat16},
                 "float32, float16 or bfloat16");
  TORCH_CHECK(codebook.dim() == 1 && codebook.numel() >= 1 && codebook.numel() <= (1 << bits),
              "codebook must be 1-D with 1 to 2^bits = ", (1 << bits), " entries, got shape ",
              codebook.sizes());
  check_same_device(codes, "codes", codebook, "codebook");
  check_dtype_in(codes, "codes", {at::kShort, at::kByte}, "int16 (sparse) or uint8 (dense)");
  if (codes.scalar_type() == at::kByte) {
    const int64_t width = spqmm_dense_width(in_features, bits);
    TORCH_CHECK(codes.dim() == 2 && codes.size(0) == out_features && codes.size(1) == width,
                "codes (dense mode, uint8) must have shape [out_features, ",
                bits <= 4 ? "ceil(in_features / 128) * 64"
                          : bits < 8 ? "ceil(in_features / 64) * 8 * bits" : "in_features",
                "] = [", out_features, ", ", width, "], got ", codes.sizes());
    TORCH_CHECK(codes.is_contiguous(), "codes must be contiguous");
  }
}

// The checks spqmm and spqmm_int8 share: x, then the packed weight (x's device; the codebook in
// any float dtype, read in the compute dtype), the bias (likewise).
inline void check_spqmm_common_args(const at::Tensor& x, const at::Tensor& codes,
                                    const at::Tensor& codebook, int64_t out_features,
                                    int64_t in_features, int64_t bits,
                                    const std::optional<at::Tensor>& bias) {
  check_dtype_in(x, "x", {at::kFloat, at::kHalf, at::kBFloat16}, "float32, float16 or bfloat16");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension, got a scalar");
  check_spqmm_sizes(out_features, in_features, bits);
  TORCH_CHECK(x.size(-1) == in_features, "x must have in_features = ", in_features,
              " elements in its last dimension, got shape ", x.sizes());
  check_same_device(codebook, "codebook", x, "x");
  check_same_device(codes, "codes", x, "x");
  check_spqmm_weight_args(codes, codebook, out_features, in_features, bits);
  if (bias.has_value() && bias->defined()) {
    check_dtype_in(*bias, "bias", {at::kFloat, at::kHalf, at::kBFloat16},
                   "float32, float16 or bfloat16");
    check_same_device(*bias, "bias", x, "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features,
                "bias must have shape [out_features] = [", out_features, "], got ", bias->sizes());
  }
}

// A scaled codebook's scales, x's device, float: row scales [out_features] (W = scale[row] *
// codebook[id], group_size 0), or group scales [out_features, ceil(in_features / group_size)]
// (W[r][j] = scale[r][j / group_size] * codebook[id]), group_size a positive multiple of 32.
inline void check_spqmm_scale(const std::optional<at::Tensor>& scale, int64_t group_size,
                              const at::Tensor& x, int64_t out_features, int64_t in_features) {
  if (!scale.has_value() || !scale->defined()) {
    TORCH_CHECK(group_size == 0, "group_size is ", group_size, " but no scale was given");
    return;
  }
  check_dtype_in(*scale, "scale", {at::kFloat, at::kHalf, at::kBFloat16},
                 "float32, float16 or bfloat16");
  check_same_device(*scale, "scale", x, "x");
  if (group_size == 0) {
    TORCH_CHECK(scale->dim() == 1 && scale->size(0) == out_features,
                "scale must have shape [out_features] = [", out_features,
                "] (row scales; group scales need group_size), got ", scale->sizes());
    return;
  }
  TORCH_CHECK(group_size > 0 && group_size % 32 == 0,
              "group_size must be a positive multiple of 32, got ", group_size);
  const int64_t groups = (in_features + group_size - 1) / group_size;
  TORCH_CHECK(scale->dim() == 2 && scale->size(0) == out_features && scale->size(1) == groups,
              "scale must have shape [out_features, ceil(in_features / group_size)] = [",
              out_features, ", ", groups, "] (group scales, group_size ", group_size, "), got ",
              scale->sizes());
}

inline bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Row scales (group_size 0) are applied after the kernels, one multiply per output.
inline bool row_scaled(const std::optional<at::Tensor>& scale, int64_t group_size) {
  return group_size == 0 && has_tensor(scale);
}

// Group scales as the CPU and CUDA kernels read them (core/spqmm.h's SpqmmPacked): float32,
// contiguous, [out_features][groups], alive as long as this; data() null without them.
struct GroupScales {
  at::Tensor t;
  int64_t group = 0, groups = 0;
  GroupScales(const std::optional<at::Tensor>& scale, int64_t group_size) {
    if (group_size == 0 || !has_tensor(scale)) return;
    t = scale->to(at::kFloat).contiguous();
    group = group_size;
    groups = t.size(1);
  }
  const float* data() const { return t.defined() ? t.data_ptr<float>() : nullptr; }
};

// The epilogue of a scaled codebook, on a product y [M, N] computed without the bias: y = y *
// scale + bias, one multiply per output, whichever kernel made y (CPU and CUDA alike).
inline void apply_row_scale(at::Tensor& y, const at::Tensor& scale, const at::Tensor& bias) {
  y.mul_(scale.to(y.scalar_type()));
  if (bias.defined()) y.add_(bias.to(y.scalar_type()));
}

// Sparse mode's positions (windows, group_ptr, chunks) on the codes' device; their contents are
// checked by the kernels.
inline void check_spqmm_positions(const at::Tensor& codes, const at::Tensor& windows,
                                  const at::Tensor& group_ptr, const at::Tensor& chunks,
                                  int64_t out_features) {
  check_same_device(windows, "windows", codes, "codes");
  check_same_device(group_ptr, "group_ptr", codes, "codes");
  check_same_device(chunks, "chunks", codes, "codes");
  check_dtype_in(windows, "windows", {at::kInt}, "int32");
  check_dtype_in(group_ptr, "group_ptr", {at::kInt}, "int32");
  check_dtype_in(chunks, "chunks", {at::kInt}, "int32");
  if (codes.scalar_type() == at::kShort) {
    const int64_t groups = (out_features + kSpqmmGroupRows - 1) / kSpqmmGroupRows;
    TORCH_CHECK(codes.dim() == 2 && codes.size(1) == kSpqmmGroupRows && codes.is_contiguous(),
                "codes (sparse mode, int16) must be contiguous with shape [steps, 16], got shape ",
                codes.sizes());
    TORCH_CHECK(codes.size(0) < (int64_t(1) << 31), "codes must hold fewer than 2^31 steps");
    TORCH_CHECK(windows.dim() == 1 && windows.numel() == codes.size(0) && windows.is_contiguous(),
                "windows must be 1-D and contiguous with one entry per step (", codes.size(0),
                "), got shape ", windows.sizes());
    TORCH_CHECK(group_ptr.dim() == 1 && group_ptr.numel() == groups + 1 && group_ptr.is_contiguous(),
                "group_ptr must be 1-D with ceil(out_features / 16) + 1 = ", groups + 1,
                " entries, got shape ", group_ptr.sizes());
    TORCH_CHECK(chunks.dim() == 1 && chunks.numel() >= 1 && chunks.is_contiguous(),
                "chunks must be 1-D, contiguous and non-empty, got shape ", chunks.sizes());
  }
}

inline void check_spqmm_args(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& windows,
                             const at::Tensor& group_ptr, const at::Tensor& chunks,
                             const at::Tensor& codebook, int64_t out_features, int64_t in_features,
                             int64_t bits, const std::optional<at::Tensor>& bias) {
  check_spqmm_common_args(x, codes, codebook, out_features, in_features, bits, bias);
  check_spqmm_positions(codes, windows, group_ptr, chunks, out_features);
}

inline void check_spqmm_decode_args(const at::Tensor& codes, const at::Tensor& windows,
                                    const at::Tensor& group_ptr, const at::Tensor& chunks,
                                    const at::Tensor& codebook, int64_t out_features,
                                    int64_t in_features, int64_t bits) {
  check_spqmm_weight_args(codes, codebook, out_features, in_features, bits);
  check_spqmm_positions(codes, windows, group_ptr, chunks, out_features);
}

// spqmm_int8 takes a dense-mode layer only (uint8 codes, no positions); the rest as spqmm.
inline void check_spqmm_int8_args(const at::Tensor& x, const at::Tensor& codes,
                                  const at::Tensor& codebook, int64_t out_features,
                                  int64_t in_features, int64_t bits,
                                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(codes.scalar_type() == at::kByte,
              "codes must be uint8 (a dense-mode layer: spqmm_int8 serves dense mode only), got ",
              codes.scalar_type());
  check_spqmm_common_args(x, codes, codebook, out_features, in_features, bits, bias);
}

// What spqmm computes in (its `compute` argument, dcx.COMPUTE_MODES): auto follows x's dtype;
// float32 and bfloat16 round x to that dtype first (fp32 accumulation either way); int8 runs a
// layer through the int8 kernels where the plan (core/spqmm_plan.h) finds them faster (a sparse
// one through the sparse int8 kernel or the int8 GEMM, with AVX-512 VNNI), in float32 otherwise. The result is in x's dtype.
enum class SpqmmCompute { kAuto, kFloat32, kBFloat16, kInt8 };

inline SpqmmCompute parse_spqmm_compute(c10::string_view compute) {
  if (compute == "auto") return SpqmmCompute::kAuto;
  if (compute == "float32") return SpqmmCompute::kFloat32;
  if (compute == "bfloat16") return SpqmmCompute::kBFloat16;
  if (compute == "int8") return SpqmmCompute::kInt8;
  TORCH_CHECK(false, "compute must be one of 'auto', 'float32', 'bfloat16', 'int8', got '",
              std::string(compute), "'");
}

// The dtype x is rounded to before the kernels read it.
inline at::ScalarType spqmm_compute_dtype(SpqmmCompute c, at::ScalarType x) {
  switch (c) {
    case SpqmmCompute::kFloat32:
    case SpqmmCompute::kInt8: return at::kFloat;
    case SpqmmCompute::kBFloat16: return at::kBFloat16;
    default: return x;
  }
}

}  // namespace dcx
