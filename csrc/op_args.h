// Argument validation per op, shared by the CPU and CUDA implementations so both reject the same
// inputs with the same messages.
#pragma once

#include <cmath>
#include <optional>

#include "checks.h"
#include "core/kmeans1d.h"

namespace dcx {

inline void check_masked_sgd_step_args(const at::Tensor& param, const at::Tensor& grad,
                                       const at::Tensor& mask,
                                       const std::optional<at::Tensor>& momentum_buffer,
                                       double lr, double momentum, double dampening,
                                       double weight_decay, bool nesterov) {
  check_dtype_in(param, "param", {at::kFloat, at::kHalf, at::kBFloat16},
                 "float32, float16 or bfloat16");
  check_same_dtype(grad, "grad", param, "param");
  check_same_shape(grad, "grad", param, "param");
  check_same_device(grad, "grad", param, "param");
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
    const at::Tensor& buf = *momentum_buffer;
    check_same_dtype(buf, "momentum_buffer", param, "param");
    check_same_shape(buf, "momentum_buffer", param, "param");
    check_same_device(buf, "momentum_buffer", param, "param");
  }
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

// After sorting, NaN (either sign) and infinities sit at the ends.
inline void check_kmeans1d_finite(double first, double last) {
  TORCH_CHECK(std::isfinite(first) && std::isfinite(last),
              "values must be finite: found NaN or Inf");
}

}  // namespace dcx
