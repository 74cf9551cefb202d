// centroid_grad on CUDA.
//
// Fast path (k <= 256): each warp owns a private copy of the k sums in shared memory, so a
// shared-memory atomic contends only within one warp even when a few clusters take most weights;
// at the end the block folds its warp copies and issues one global atomic per cluster, not one
// per element. General path (any k): one global atomic per element.
#include <algorithm>

#include "cuda/dtype.cuh"

namespace dcx {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kFastMaxClusters = 256;

// float64 gradients accumulate in double and are read as they are; the others through float.
template <typename Acc, typename T>
__device__ __forceinline__ Acc load_acc(T v) { return static_cast<Acc>(to_float(v)); }
template <>
__device__ __forceinline__ double load_acc<double, double>(double v) { return v; }

template <typename L>
__device__ __forceinline__ bool label_ok(L label, int64_t k) {
  return static_cast<uint64_t>(static_cast<int64_t>(label)) < static_cast<uint64_t>(k);
}

template <typename T, typename L, typename Acc>
__global__ void centroid_grad_shared_kernel(const T* __restrict__ grad, const L* __restrict__ labels,
                                            const uint8_t* __restrict__ mask, int64_t n, int k,
                                            Acc* __restrict__ out, int* __restrict__ bad_flag) {
  extern __shared__ unsigned char smem_raw[];
  Acc* sums = reinterpret_cast<Acc*>(smem_raw);  // [kWarps][k]
  for (int i = threadIdx.x; i < kWarps * k; i += blockDim.x) sums[i] = Acc(0);
  __syncthreads();
  Acc* mine = sums + (threadIdx.x / 32) * k;
  bool bad = false;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (mask != nullptr && mask[i] == 0) continue;
    const L label = labels[i];
    if (!label_ok(label, k)) {
      bad = true;
      continue;
    }
    atomicAdd(&mine[static_cast<int64_t>(label)], load_acc<Acc>(grad[i]));
  }
  if (bad) atomicOr(bad_flag, 1);  // many threads may set it: a plain store would race
  __syncthreads();
  for (int c = threadIdx.x; c < k; c += blockDim.x) {
    Acc s = 0;
    for (int w = 0; w < kWarps; ++w) s += sums[w * k + c];
    if (s != Acc(0)) atomicAdd(&out[c], s);
  }
}

template <typename T, typename L, typename Acc>
__global__ void centroid_grad_global_kernel(const T* __restrict__ grad, const L* __restrict__ labels,
                                            const uint8_t* __restrict__ mask, int64_t n, int64_t k,
                                            Acc* __restrict__ out, int* __restrict__ bad_flag) {
  bool bad = false;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (mask != nullptr && mask[i] == 0) continue;
    const L label = labels[i];
    if (!label_ok(label, k)) {
      bad = true;
      continue;
    }
    atomicAdd(&out[static_cast<int64_t>(label)], load_acc<Acc>(grad[i]));
  }
  if (bad) atomicOr(bad_flag, 1);
}

template <typename T, typename L, typename Acc>
cudaError_t launch_typed(const T* grad, const L* labels, const uint8_t* mask, int64_t n, int64_t k,
                         Acc* out, int* bad_flag, int sm_count, cudaStream_t stream) {
  // Enough blocks to fill the device a few times over; each block folds its sums once.
  const int64_t want = (n + kThreads - 1) / kThreads;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(want, int64_t(sm_count) * 8));
  if (k <= kFastMaxClusters) {
    const size_t smem = sizeof(Acc) * kWarps * k;
    centroid_grad_shared_kernel<T, L, Acc><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        grad, labels, mask, n, static_cast<int>(k), out, bad_flag);
  } else {
    const int64_t gblocks = std::max<int64_t>(1, std::min<int64_t>(want, int64_t(sm_count) * 32));
    centroid_grad_global_kernel<T, L, Acc><<<static_cast<unsigned>(gblocks), kThreads, 0, stream>>>(
        grad, labels, mask, n, k, out, bad_flag);
  }
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t launch_labels(const void* grad, IndexDtype index_dtype, const void* labels,
                          const uint8_t* mask, int64_t n, int64_t k, void* out, int* bad_flag,
                          int sm_count, cudaStream_t stream) {
  const T* g = static_cast<const T*>(grad);
  Acc* o = static_cast<Acc*>(out);
  if (index_dtype == IndexDtype::kInt32)
    return launch_typed(g, static_cast<const int32_t*>(labels), mask, n, k, o, bad_flag, sm_count, stream);
  return launch_typed(g, static_cast<const int64_t*>(labels), mask, n, k, o, bad_flag, sm_count, stream);
}

}  // namespace

cudaError_t launch_centroid_grad(Dtype dtype, const void* grad, IndexDtype index_dtype,
                                 const void* labels, const uint8_t* mask, int64_t n, int64_t k,
                                 void* out, int* bad_flag, int sm_count, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dtype) {
    case Dtype::kFloat32:
      return launch_labels<float, float>(grad, index_dtype, labels, mask, n, k, out, bad_flag, sm_count, stream);
    case Dtype::kFloat16:
      return launch_labels<__half, float>(grad, index_dtype, labels, mask, n, k, out, bad_flag, sm_count, stream);
    case Dtype::kBFloat16:
      return launch_labels<__nv_bfloat16, float>(grad, index_dtype, labels, mask, n, k, out, bad_flag, sm_count, stream);
    case Dtype::kFloat64:
      return launch_labels<double, double>(grad, index_dtype, labels, mask, n, k, out, bad_flag, sm_count, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dcx
