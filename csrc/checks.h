// Argument checks that name the argument at fault. User errors are TORCH_CHECK (a Python
// RuntimeError carrying the message); invariants are TORCH_INTERNAL_ASSERT.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace dcx {

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
}

inline void check_dtype_in(const at::Tensor& t, const char* name,
                           std::initializer_list<at::ScalarType> allowed, const char* allowed_text) {
  for (auto s : allowed) {
    if (t.scalar_type() == s) return;
  }
  TORCH_CHECK(false, name, " must be ", allowed_text, ", got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_same_shape(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

// The same dtype, shape and device as ref (an optimizer's gradient and state beside its param).
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  check_same_dtype(t, name, ref, ref_name);
  check_same_shape(t, name, ref, ref_name);
  check_same_device(t, name, ref, ref_name);
}

inline void check_mask(const at::Tensor& mask, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  check_dtype_in(mask, name, {at::kBool, at::kByte}, "bool or uint8");
  check_same_shape(mask, name, ref, ref_name);
  check_same_device(mask, name, ref, ref_name);
}

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  check_dtype_in(t, name, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble},
                 "float32, float16, bfloat16 or float64");
}

inline void check_index_dtype(const at::Tensor& t, const char* name) {
  check_dtype_in(t, name, {at::kInt, at::kLong}, "int32 or int64");
}

}  // namespace dcx
