// masked_sgd_step_ on CUDA. Memory bound: per element it reads param, grad, mask (and buf) and
// writes param (and buf), so the kernel is a grid-stride loop whose threads each move a vector of
// kVec elements with 16-byte loads where every pointer is aligned, one element at a time
// otherwise.
#include <algorithm>

#include "cuda/dtype.cuh"

namespace dcx {
namespace cuda {
namespace {

template <typename T, int kVec, SgdKind kKind>
__global__ void masked_sgd_vec_kernel(T* __restrict__ param, const T* __restrict__ grad,
                                      const uint8_t* __restrict__ mask, T* __restrict__ buf,
                                      int64_t num_packs, SgdHyper h) {
  constexpr bool kMomentum = uses_buffer(kKind);
  using P = Pack<T, kVec>;
  using M = Pack<uint8_t, kVec>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < num_packs;
       i += int64_t(gridDim.x) * blockDim.x) {
    P p = reinterpret_cast<P*>(param)[i];
    const P g = reinterpret_cast<const P*>(grad)[i];
    const M m = reinterpret_cast<const M*>(mask)[i];
    P b;
    if constexpr (kMomentum) b = reinterpret_cast<P*>(buf)[i];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float pf = to_float(p.v[j]);
      float bf = kMomentum ? to_float(b.v[j]) : 0.0f;
      sgd_update<kKind>(pf, to_float(g.v[j]), bf, m.v[j] != 0, h);
      p.v[j] = from_float<T>(pf);
      if constexpr (kMomentum) b.v[j] = from_float<T>(bf);
    }
    reinterpret_cast<P*>(param)[i] = p;
    if constexpr (kMomentum) reinterpret_cast<P*>(buf)[i] = b;
  }
}

template <typename T, SgdKind kKind>
__global__ void masked_sgd_scalar_kernel(T* __restrict__ param, const T* __restrict__ grad,
                                         const uint8_t* __restrict__ mask, T* __restrict__ buf,
                                         int64_t begin, int64_t n, SgdHyper h) {
  constexpr bool kMomentum = uses_buffer(kKind);
  for (int64_t i = begin + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float pf = to_float(param[i]);
    float bf = kMomentum ? to_float(buf[i]) : 0.0f;
    sgd_update<kKind>(pf, to_float(grad[i]), bf, mask[i] != 0, h);
    param[i] = from_float<T>(pf);
    if constexpr (kMomentum) buf[i] = from_float<T>(bf);
  }
}

template <typename T, SgdKind kKind>
cudaError_t launch_typed(T* param, const T* grad, const uint8_t* mask, T* buf, int64_t n,
                         const SgdHyper& h, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T) >= 4 ? 16 / sizeof(T) : 4;  // 4 floats or 8 halves
  constexpr int kThreads = 256;
  const int64_t max_blocks = 65535LL * 8;
  int64_t vec_end = 0;
  if (is_aligned(param, 16) && is_aligned(grad, 16) && is_aligned(buf, 16) && is_aligned(mask, kVec)) {
    const int64_t packs = n / kVec;
    vec_end = packs * kVec;
    if (packs > 0) {
      const int64_t blocks = std::min((packs + kThreads - 1) / kThreads, max_blocks);
      masked_sgd_vec_kernel<T, kVec, kKind>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(param, grad, mask, buf, packs, h);
    }
  }
  if (vec_end < n) {
    const int64_t rest = n - vec_end;
    const int64_t blocks = std::min((rest + kThreads - 1) / kThreads, max_blocks);
    masked_sgd_scalar_kernel<T, kKind>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(param, grad, mask, buf, vec_end, n, h);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(void* param, const void* grad, const uint8_t* mask, void* buf, int64_t n,
                         const SgdHyper& h, cudaStream_t stream) {
  T* p = static_cast<T*>(param);
  const T* g = static_cast<const T*>(grad);
  T* b = static_cast<T*>(buf);
  switch (sgd_kind(h)) {
    case SgdKind::kPlain: return launch_typed<T, SgdKind::kPlain>(p, g, mask, nullptr, n, h, stream);
    case SgdKind::kMomentum: return launch_typed<T, SgdKind::kMomentum>(p, g, mask, b, n, h, stream);
    case SgdKind::kMomentumInit: return launch_typed<T, SgdKind::kMomentumInit>(p, g, mask, b, n, h, stream);
    case SgdKind::kNesterov: return launch_typed<T, SgdKind::kNesterov>(p, g, mask, b, n, h, stream);
    case SgdKind::kNesterovInit: return launch_typed<T, SgdKind::kNesterovInit>(p, g, mask, b, n, h, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_masked_sgd_step(Dtype dtype, void* param, const void* grad, const uint8_t* mask,
                                   void* buf, int64_t n, const SgdHyper& h, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::kFloat32: return launch_dtype<float>(param, grad, mask, buf, n, h, stream);
    case Dtype::kFloat16: return launch_dtype<__half>(param, grad, mask, buf, n, h, stream);
    case Dtype::kBFloat16: return launch_dtype<__nv_bfloat16>(param, grad, mask, buf, n, h, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace dcx
