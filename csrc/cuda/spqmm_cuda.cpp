// spqmm on CUDA: argument checks, workspace from the caching allocator (one allocation and one
// memset per call), launches on the current stream, the crossover to cuBLAS (core/spqmm_plan.h,
// as on the CPU), the compute mode (op_args.h), and the corruption
// check (one 4-byte read back, skipped with check=False, as SparseQuantLinear calls it after
// validating its packed weight once, and while a CUDA graph is being captured; the kernels never
// read out of bounds either way). Device limits and occupancy are cached in spqmm_kernel.cu, so a
// call makes no runtime queries. The kernels are in spqmm_kernel.cu.
#include <ATen/ATen.h>
#include <cstdint>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "core/spqmm_int8.h"
#include "core/spqmm_plan.h"
#include "cuda/cuda_glue.h"
#include "op_args.h"

namespace dcx {
namespace {

void check_flag(const at::Tensor& bad, bool check) {
  if (!check || cuda::stream_capturing()) return;
  const int flag = bad.item<int>();
  TORCH_CHECK(!(flag & 4),
              "group_ptr or chunks are not sound step pointers (they must start at 0, not decrease "
              "and end at the number of steps; corrupted packed weight)");
  TORCH_CHECK(!(flag & 1), "codes hold a codebook id outside the codebook (corrupted packed weight)");
  TORCH_CHECK(!(flag & 2),
              "windows and codes point at a column outside in_features (corrupted packed weight)");
  TORCH_CHECK(!(flag & 8),
              "a window crosses a scale group (each step's window must keep window % group_size + "
              "32 <= group_size; corrupted packed weight)");
}

// The packed weight's part of the launch arguments, for spqmm and spqmm_decode. Two ids per byte
// (bits <= 4): the kernels read rows of 16-byte blocks with 16-byte loads, so a view that does
// not start on 16 bytes is copied to a fresh (aligned) allocation, kept alive in *realigned.
cuda::SpqmmCudaArgs weight_args(const at::Tensor& codes, const at::Tensor& windows,
                                const at::Tensor& group_ptr, const at::Tensor& chunks,
                                const at::Tensor& cb, int64_t N, int64_t K, int64_t bits,
                                at::Tensor* realigned) {
  cuda::SpqmmCudaArgs a{};
  a.device = cb.get_device();
  a.n = N;
  a.k = K;
  a.bits = static_cast<int>(bits);
  a.codebook = cb.data_ptr();
  a.kc = static_cast<int>(cb.numel());
  a.dense = codes.scalar_type() == at::kByte;
  if (a.dense) {
    const bool misaligned = reinterpret_cast<uintptr_t>(codes.data_ptr()) % 16 != 0;
    *realigned = bits <= 4 && misaligned ? codes.clone() : codes;
    a.dense_codes = realigned->data_ptr<uint8_t>();
  } else {
    a.codes = reinterpret_cast<const uint16_t*>(codes.data_ptr<int16_t>());
    a.steps = codes.size(0);
    a.windows = windows.data_ptr<int32_t>();
    a.groups = (N + kSpqmmGroupRows - 1) / kSpqmmGroupRows;
    a.group_ptr = group_ptr.data_ptr<int32_t>();
    a.chunks = chunks.data_ptr<int32_t>();
    a.num_chunks = chunks.numel() - 1;
  }
  return a;
}

// The float product for x2 [M, K] (the compute dtype; codebook and bias cast to it): the kernels,
// or past the plan's crossover W decoded once (group scales applied) and cuBLAS.
at::Tensor float_product(const at::Tensor& x2, const at::Tensor& codes, const at::Tensor& windows,
                         const at::Tensor& group_ptr, const at::Tensor& chunks,
                         const at::Tensor& cb, int64_t N, int64_t K, int64_t bits,
                         const at::Tensor& b, const GroupScales& gs, bool decode_gemm, bool check,
                         cudaStream_t stream) {
  const bool dense_mode = codes.scalar_type() == at::kByte;
  const int64_t M = x2.size(0);
  const bool has_bias = b.defined();
  const bool empty = M == 0 || N == 0 || K == 0;
  const bool decode = !empty && decode_gemm;
  // One allocation and one memset for the corruption flag (16 bytes, keeping the workspace
  // aligned) and, in sparse mode below the crossover, the float32 workspace [M, N].
  const int64_t ws_floats = dense_mode || decode || empty ? 0 : M * N;
  at::Tensor scratch = at::empty({4 + ws_floats}, x2.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cudaMemsetAsync(scratch.data_ptr(), 0, scratch.nbytes(), stream));
  const at::Tensor bad = scratch.narrow(0, 0, 1).view(at::kInt);
  at::Tensor realigned;
  cuda::SpqmmCudaArgs a = weight_args(codes, windows, group_ptr, chunks, cb, N, K, bits, &realigned);
  a.dtype = cuda::to_dtype(x2.scalar_type(), "x");
  a.x = x2.data_ptr();
  a.m = M;
  a.bias = has_bias ? b.data_ptr() : nullptr;
  a.bad_flag = bad.data_ptr<int>();
  a.ws = ws_floats > 0 ? scratch.data_ptr<float>() + 4 : nullptr;
  a.group_scale = gs.data();
  a.scale_group = gs.group;
  a.scale_groups = gs.groups;
  a.stream = stream;
  if (decode) {  // past the crossover: W decoded once (every element written), then the BLAS
    at::Tensor w = at::empty({N, K}, x2.options());
    C10_CUDA_CHECK(cuda::launch_spqmm_decode(a, w.data_ptr()));
    check_flag(bad, check);
    return has_bias ? at::linear(x2, w, b) : at::linear(x2, w);
  }
  at::Tensor y = at::empty({M, N}, x2.options());
  a.y = y.data_ptr();
  C10_CUDA_CHECK(cuda::launch_spqmm(a));  // with nothing to compute, only the pointer checks
  if (empty && M > 0 && N > 0) y.copy_(has_bias ? b.expand({M, N}) : at::zeros({M, N}, x2.options()));
  check_flag(bad, check);
  return y;
}

// W [N, K] in the codebook's dtype (every element written by the decode kernel), then the
// corruption check (skipped while a CUDA graph is captured, or with check=False: no host sync).
at::Tensor spqmm_decode_cuda(const at::Tensor& codes, const at::Tensor& windows,
                             const at::Tensor& group_ptr, const at::Tensor& chunks,
                             const at::Tensor& codebook, int64_t out_features, int64_t in_features,
                             int64_t bits, bool check) {
  check_spqmm_decode_args(codes, windows, group_ptr, chunks, codebook, out_features, in_features,
                          bits);
  cuda::check_cuda_tensor(codebook, "codebook");
  const c10::cuda::CUDAGuard guard(codebook.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  at::Tensor bad = at::empty({4}, codebook.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(bad.data_ptr(), 0, bad.nbytes(), stream));
  const at::Tensor cb = codebook.contiguous();
  at::Tensor realigned;
  cuda::SpqmmCudaArgs a =
      weight_args(codes, windows, group_ptr, chunks, cb, out_features, in_features, bits, &realigned);
  a.dtype = cuda::to_dtype(codebook.scalar_type(), "codebook");
  a.bad_flag = bad.data_ptr<int>();
  a.stream = stream;
  at::Tensor w = at::empty({out_features, in_features}, codebook.options());
  if (w.numel() > 0) {
    C10_CUDA_CHECK(cuda::launch_spqmm_decode(a, w.data_ptr()));
  } else {
    C10_CUDA_CHECK(cuda::launch_spqmm(a));  // nothing to decode: only the pointer checks (m = 0)
  }
  check_flag(bad.narrow(0, 0, 1), check);
  return w;
}

// int8 compute for a dense-mode layer: one allocation for the flag (16 bytes), the quantized x
// and its scales (both written in full by the quantize kernel), one 16-byte memset.
// int8 compute for x2 [M, K] (codebook and bias in x2's dtype): the product in x2's dtype.
at::Tensor int8_product(const at::Tensor& x2, const at::Tensor& codes, const at::Tensor& cb,
                        int64_t N, int64_t K, int64_t bits, const at::Tensor& b,
                        const GroupScales& gs, bool check, cudaStream_t stream) {
  const int64_t M = x2.size(0);
  const bool has_bias = b.defined();
  const at::TensorOptions xo = x2.options();
  at::Tensor y = at::empty({M, N}, xo);
  if (M == 0 || N == 0) return y;
  if (K == 0) {
    y.copy_(has_bias ? b.expand({M, N}) : at::zeros({M, N}, xo));
    return y;
  }
  const int64_t blocks = q8_blocks(K), quantized = M * blocks * kQ8Block;
  const int64_t scales_at = 16 + (quantized + 15) / 16 * 16;
  at::Tensor scratch = at::empty({scales_at + M * blocks * 4}, xo.dtype(at::kByte));
  uint8_t* base = scratch.data_ptr<uint8_t>();
  C10_CUDA_CHECK(cudaMemsetAsync(base, 0, 16, stream));
  cuda::SpqmmInt8CudaArgs a{};
  a.dtype = cuda::to_dtype(x2.scalar_type(), "x");
  a.x = x2.data_ptr();
  a.y = y.data_ptr();
  a.m = M;
  a.n = N;
  a.k = K;
  a.codes = codes.data_ptr<uint8_t>();
  a.bits = static_cast<int>(bits);
  a.codebook = cb.data_ptr();
  a.kc = static_cast<int>(cb.numel());
  a.bias = has_bias ? b.data_ptr() : nullptr;
  a.group_scale = gs.data();
  a.scale_group = gs.group;
  a.scale_groups = gs.groups;
  a.xq = reinterpret_cast<int8_t*>(base + 16);
  a.xs = reinterpret_cast<float*>(base + scales_at);
  a.bad_flag = reinterpret_cast<int*>(base);
  a.stream = stream;
  C10_CUDA_CHECK(cuda::launch_spqmm_int8(a));
  check_flag(scratch.narrow(0, 0, 4).view(at::kInt), check);
  return y;
}

// The dtype a product runs in on the GPU: a row-scaled codebook's product comes out of the kernels
// unscaled (about 1 / scale, often 20-50x, larger than the layer's output), which float16 may
// not hold; it runs in float32 then (the CPU kernels always write float32). Group scales are
// applied inside the kernels, so their product needs no wider dtype.
at::ScalarType scaled_dtype(at::ScalarType dtype, const std::optional<at::Tensor>& scale,
                            int64_t group_size) {
  return row_scaled(scale, group_size) && dtype == at::kHalf ? at::kFloat : dtype;
}

// x [..., K] as [M, K] in `dtype`, with the codebook and bias cast to it (all contiguous).
struct Operands {
  at::Tensor x2, cb, b;
  std::vector<int64_t> out_shape;
  Operands(const at::Tensor& x, const at::Tensor& codebook, const std::optional<at::Tensor>& bias,
           int64_t N, at::ScalarType dtype)
      : out_shape(x.sizes().begin(), x.sizes().end()) {
    out_shape.back() = N;
    const int64_t M = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
    x2 = x.reshape({M, x.size(-1)}).to(dtype).contiguous();
    cb = codebook.to(dtype).contiguous();
    if (bias.has_value() && bias->defined()) b = bias->to(dtype).contiguous();
  }
};

at::Tensor spqmm_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& windows,
                      const at::Tensor& group_ptr, const at::Tensor& chunks,
                      const at::Tensor& codebook, int64_t out_features, int64_t in_features,
                      int64_t bits, const std::optional<at::Tensor>& bias, int64_t crossover,
                      bool check, c10::string_view compute, const std::optional<at::Tensor>& scale,
                      int64_t group_size) {
  check_spqmm_args(x, codes, windows, group_ptr, chunks, codebook, out_features, in_features, bits,
                   bias);
  check_spqmm_scale(scale, group_size, x, out_features, in_features);
  const SpqmmCompute c = parse_spqmm_compute(compute);
  cuda::check_cuda_tensor(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t N = out_features, K = in_features;
  const Operands o(x, codebook, bias, N,
                   scaled_dtype(spqmm_compute_dtype(c, x.scalar_type()), scale, group_size));
  const bool dense_mode = codes.scalar_type() == at::kByte;
  const SpqmmMode mode = !dense_mode ? SpqmmMode::kSparse
                         : c == SpqmmCompute::kInt8 ? SpqmmMode::kInt8 : SpqmmMode::kDense;
  // Sparse mode's density is that of the slots, padding included: the kernel pays for every slot.
  const double density = dense_mode ? 1.0 : double(codes.numel()) / std::max(1.0, double(N) * double(K));
  const SpqmmPlan plan = spqmm_plan(SpqmmIsa::kCuda, mode, static_cast<int>(bits), density, N, K,
                                    o.x2.size(0), 1, crossover);
  // A row-scaled codebook: the kernels sum codebook values, the row scale and bias come after.
  // Group scales are applied in the kernels (and the decode), the bias with them.
  const bool by_row = row_scaled(scale, group_size);
  const GroupScales gs(scale, group_size);
  const at::Tensor b = by_row ? at::Tensor() : o.b;
  at::Tensor y =
      plan.kernel == SpqmmKernel::kInt8Rows
          ? int8_product(o.x2, codes, o.cb, N, K, bits, b, gs, check, stream)
          : float_product(o.x2, codes, windows, group_ptr, chunks, o.cb, N, K, bits, b, gs,
                          plan.kernel == SpqmmKernel::kDecodeGemm, check, stream);
  if (by_row) apply_row_scale(y, *scale, o.b);
  return y.to(x.scalar_type()).reshape(o.out_shape);
}

at::Tensor spqmm_int8_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebook,
                           int64_t out_features, int64_t in_features, int64_t bits,
                           const std::optional<at::Tensor>& bias, bool check,
                           const std::optional<at::Tensor>& scale, int64_t group_size) {
  check_spqmm_int8_args(x, codes, codebook, out_features, in_features, bits, bias);
  check_spqmm_scale(scale, group_size, x, out_features, in_features);
  cuda::check_cuda_tensor(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const Operands o(x, codebook, bias, out_features,
                   scaled_dtype(x.scalar_type(), scale, group_size));
  const bool by_row = row_scaled(scale, group_size);
  const GroupScales gs(scale, group_size);
  at::Tensor y = int8_product(o.x2, codes, o.cb, out_features, in_features, bits,
                              by_row ? at::Tensor() : o.b, gs, check,
                              at::cuda::getCurrentCUDAStream());
  if (by_row) apply_row_scale(y, *scale, o.b);
  return y.to(x.scalar_type()).reshape(o.out_shape);
}

}  // namespace
}  // namespace dcx

TORCH_LIBRARY_IMPL(dcx, CUDA, m) {
  m.impl("spqmm", &dcx::spqmm_cuda);
  m.impl("spqmm_int8", &dcx::spqmm_int8_cuda);
  m.impl("spqmm_decode", &dcx::spqmm_decode_cuda);
}
