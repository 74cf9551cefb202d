// masked_adamw_step_ on CUDA. Memory bound: per element it reads param, grad, mask and the two
// (three with amsgrad) moment buffers and writes all but grad and mask, so the kernel is a
// grid-stride loop whose threads each move a vector of kVec elements with 16-byte loads where
// every pointer is aligned, one element at a time otherwise.
#include <algorithm>

#include "cuda/dtype.cuh"

namespace dcx {
namespace cuda {
namespace {

// Products rounded on their own: nvcc would otherwise contract a * b + c into one FMA, which
// torch.optim.AdamW's unfused ops (and the CPU kernel) do not.
struct DeviceArith {
  static __device__ __forceinline__ float mul(float a, float b) { return __fmul_rn(a, b); }
};

template <typename T, int kVec, bool kAmsgrad>
__global__ void masked_adamw_vec_kernel(T* __restrict__ param, const T* __restrict__ grad,
                                        const uint8_t* __restrict__ mask, T* __restrict__ exp_avg,
                                        T* __restrict__ exp_avg_sq, T* __restrict__ max_sq,
                                        int64_t num_packs, AdamwHyper h) {
  using P = Pack<T, kVec>;
  using M = Pack<uint8_t, kVec>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < num_packs;
       i += int64_t(gridDim.x) * blockDim.x) {
    P p = reinterpret_cast<P*>(param)[i];
    const P g = reinterpret_cast<const P*>(grad)[i];
    const M k = reinterpret_cast<const M*>(mask)[i];
    P m = reinterpret_cast<P*>(exp_avg)[i];
    P v = reinterpret_cast<P*>(exp_avg_sq)[i];
    P x;
    if constexpr (kAmsgrad) x = reinterpret_cast<P*>(max_sq)[i];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float pf = to_float(p.v[j]), mf = to_float(m.v[j]), vf = to_float(v.v[j]);
      float xf = kAmsgrad ? to_float(x.v[j]) : 0.0f;
      adamw_update<kAmsgrad, DeviceArith>(pf, to_float(g.v[j]), mf, vf, xf, k.v[j] != 0, h);
      p.v[j] = from_float<T>(pf);
      m.v[j] = from_float<T>(mf);
      v.v[j] = from_float<T>(vf);
      if constexpr (kAmsgrad) x.v[j] = from_float<T>(xf);
    }
    reinterpret_cast<P*>(param)[i] = p;
    reinterpret_cast<P*>(exp_avg)[i] = m;
    reinterpret_cast<P*>(exp_avg_sq)[i] = v;
    if constexpr (kAmsgrad) reinterpret_cast<P*>(max_sq)[i] = x;
  }
}

template <typename T, bool kAmsgrad>
__global__ void masked_adamw_scalar_kernel(T* __restrict__ param, const T* __restrict__ grad,
                                           const uint8_t* __restrict__ mask,
                                           T* __restrict__ exp_avg, T* __restrict__ exp_avg_sq,
                                           T* __restrict__ max_sq, int64_t begin, int64_t n,
                                           AdamwHyper h) {
  for (int64_t i = begin + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float pf = to_float(param[i]), mf = to_float(exp_avg[i]), vf = to_float(exp_avg_sq[i]);
    float xf = kAmsgrad ? to_float(max_sq[i]) : 0.0f;
    adamw_update<kAmsgrad, DeviceArith>(pf, to_float(grad[i]), mf, vf, xf, mask[i] != 0, h);
    param[i] = from_float<T>(pf);
    exp_avg[i] = from_float<T>(mf);
    exp_avg_sq[i] = from_float<T>(vf);
    if constexpr (kAmsgrad) max_sq[i] = from_float<T>(xf);
  }
}

template <typename T, bool kAmsgrad>
cudaError_t launch_typed(T* param, const T* grad, const uint8_t* mask, T* exp_avg, T* exp_avg_sq,
                         T* max_sq, int64_t n, const AdamwHyper& h, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T) >= 4 ? 16 / sizeof(T) : 4;  // 4 floats or 8 halves
  constexpr int kThreads = 256;
  const int64_t max_blocks = 65535LL * 8;
  int64_t vec_end = 0;
  if (is_aligned(param, 16) && is_aligned(grad, 16) && is_aligned(exp_avg, 16) &&
      is_aligned(exp_avg_sq, 16) && is_aligned(max_sq, 16) && is_aligned(mask, kVec)) {
    const int64_t packs = n / kVec;
    vec_end = packs * kVec;
    if (packs > 0) {
      const int64_t blocks = std::min((packs + kThreads - 1) / kThreads, max_blocks);
      masked_adamw_vec_kernel<T, kVec, kAmsgrad><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          param, grad, mask, exp_avg, exp_avg_sq, max_sq, packs, h);
    }
  }
  if (vec_end < n) {
    const int64_t rest = n - vec_end;
    const int64_t blocks = std::min((rest + kThreads - 1) / kThreads, max_blocks);
    masked_adamw_scalar_kernel<T, kAmsgrad><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        param, grad, mask, exp_avg, exp_avg_sq, max_sq, vec_end, n, h);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(void* param, const void* grad, const uint8_t* mask, void* exp_avg,
                         void* exp_avg_sq, void* max_sq, int64_t n, const AdamwHyper& h,
                         cudaStream_t stream) {
  T* p = static_cast<T*>(param);
  const T* g = static_cast<const T*>(grad);
  T* m = static_cast<T*>(exp_avg);
  T* v = static_cast<T*>(exp_avg_sq);
  if (h.amsgrad) {
    if (max_sq == nullptr) return cudaErrorInvalidValue;
    return launch_typed<T, true>(p, g, mask, m, v, static_cast<T*>(max_sq), n, h, stream);
  }
  return launch_typed<T, false>(p, g, mask, m, v, nullptr, n, h, stream);
}

}  // namespace

cudaError_t launch_masked_adamw_step(Dtype dtype, void* param, const void* grad,
                                     const uint8_t* mask, void* exp_avg, void* exp_avg_sq,
                                     void* max_sq, int64_t n, const AdamwHyper& h,
                                     cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::kFloat32:
      return launch_dtype<float>(param, grad, mask, exp_avg, exp_avg_sq, max_sq, n, h, stream);
    case Dtype::kFloat16:
      return launch_dtype<__half>(param, grad, mask, exp_avg, exp_avg_sq, max_sq, n, h, stream);
    case Dtype::kBFloat16:
      return launch_dtype<__nv_bfloat16>(param, grad, mask, exp_avg, exp_avg_sq, max_sq, n, h,
                                         stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace dcx
