// spqmm on CUDA: y = x W^T + bias with W packed as codebook ids (the layout is described at the
// top of csrc/core/spqmm.h: 16-bit entries (tile-local column << bits | id), per-segment pointers,
// chunks of about equal non-zeros; or uint8 ids only in dense mode).
//
// Sparse mode: one block per chunk, so work is split by non-zeros, not rows. The block's warps
// take its segments in turn; the 32 lanes of a warp read 32 consecutive 16-bit entries (one 64-byte
// coalesced load), decode each once (a mask, a shift) and apply it to every one of the MB batch
// columns. The codebook lives in a register per lane and is read with a warp shuffle when it has
// <= 32 entries, else in shared memory (<= 256). A segment's sums are reduced with shuffles and
// added to a float32 workspace [M, N] with one atomic per batch column; a last small kernel adds
// the bias and rounds to x's dtype.
// Dense mode: one warp per row, each lane loads 16 ids (one 16-byte load) and 16 x values.
// Past the crossover batch the glue decodes W once (decode kernels below) and calls cuBLAS.
//
// Nothing is trusted: pointers are clamped to the arrays, ids >= k read 0 and columns >= K are
// skipped; each such event sets a flag the glue turns into an error (outside graph capture).
#include <algorithm>

#include "cuda/dtype.cuh"

namespace dcx {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ void load_table(const T* codebook, int kc, float* table) {
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = i < kc ? to_float(codebook[i]) : 0.f;
}

// Clamped segment bounds; sets `flag` bit 4 when the pointers are not sound.
__device__ __forceinline__ void segment_bounds(const int32_t* seg_ptr, int64_t s, int64_t nnz,
                                               int64_t* lo, int64_t* hi, int* flag) {
  const int64_t a = seg_ptr[s], b = seg_ptr[s + 1];
  if (a < 0 || b < a || b > nnz) *flag |= 4;
  *lo = min(max(a, int64_t(0)), nnz);
  *hi = min(max(b, *lo), nnz);
}

template <typename T, int MB, bool kShuffle>
__global__ void __launch_bounds__(kThreads)
spqmm_sparse_kernel(const T* __restrict__ x, int64_t ldx, int mvalid,
                    const uint16_t* __restrict__ codes, const int32_t* __restrict__ seg_ptr,
                    const int32_t* __restrict__ chunks, int64_t nnz, int64_t n, int64_t k,
                    int64_t tiles, int bits, const T* __restrict__ codebook, int kc,
                    float* __restrict__ ws, int* __restrict__ bad_flag) {
  __shared__ float table[256];
  load_table(codebook, kc, table);
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float reg_entry = lane < kc ? table[lane] : 0.f;
  const int64_t nseg = n * tiles;
  int flag = 0;
  int64_t s0 = chunks[blockIdx.x], s1 = chunks[blockIdx.x + 1];
  if (s0 < 0 || s1 < s0 || s1 > nseg) flag |= 4;
  s0 = min(max(s0, int64_t(0)), nseg);
  s1 = min(max(s1, s0), nseg);
  const uint32_t idmask = (1u << bits) - 1;
  const int64_t tile_w = int64_t(1) << (16 - bits);
  for (int64_t s = s0 + warp; s < s1; s += kWarps) {
    int64_t lo, hi;
    segment_bounds(seg_ptr, s, nnz, &lo, &hi, &flag);
    const int64_t row = s / tiles, base = (s - row * tiles) * tile_w;
    float acc[MB];
#pragma unroll
    for (int m = 0; m < MB; ++m) acc[m] = 0.f;
    // Every lane runs the same number of steps, so the shuffle below sees the whole warp.
    for (int64_t e0 = lo; e0 < hi; e0 += 32) {
      const int64_t e = e0 + lane;
      const uint32_t v = e < hi ? codes[e] : 0u;
      const uint32_t id = v & idmask;
      const int64_t col = base + (v >> bits);
      const bool ok = e < hi && id < uint32_t(kc) && col < k;
      if (e < hi && !ok) flag |= id >= uint32_t(kc) ? 1 : 2;
      float w = kShuffle ? __shfl_sync(kFull, reg_entry, id & 31) : table[id];
      if (!ok) w = 0.f;
      const int64_t c = ok ? col : 0;
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m < mvalid) acc[m] += w * to_float(x[m * ldx + c]);
      }
    }
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      const float sum = warp_sum(acc[m]);
      if (lane == 0 && m < mvalid && hi > lo) atomicAdd(&ws[m * n + row], sum);
    }
  }
  if (flag) atomicOr(bad_flag, flag);
}

template <typename T>
__global__ void spqmm_epilogue_kernel(const float* __restrict__ ws, const T* __restrict__ bias,
                                      T* __restrict__ y, int64_t m, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < m * n;
       i += int64_t(gridDim.x) * blockDim.x) {
    y[i] = from_float<T>(ws[i] + (bias ? to_float(bias[i % n]) : 0.f));
  }
}

// Dense mode: one warp per row; kVec: K % 16 == 0 and aligned rows, 16 ids per 16-byte load.
template <typename T, int MB, bool kVec>
__global__ void __launch_bounds__(kThreads)
spqmm_dense_kernel(const T* __restrict__ x, int64_t ldx, int mvalid,
                   const uint8_t* __restrict__ codes, int64_t n, int64_t k,
                   const T* __restrict__ codebook, int kc, const T* __restrict__ bias,
                   T* __restrict__ y, int* __restrict__ bad_flag) {
  __shared__ float table[256];
  load_table(codebook, kc, table);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(kWarps) + (threadIdx.x >> 5);
  if (row >= n) return;
  const uint8_t* code = codes + row * k;
  float acc[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0.f;
  uint32_t max_id = 0;
  if (kVec) {
    for (int64_t j0 = int64_t(lane) * 16; j0 < k; j0 += 32 * 16) {
      const uint4 packed = *reinterpret_cast<const uint4*>(code + j0);
      const uint8_t* ids = reinterpret_cast<const uint8_t*>(&packed);
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        max_id = max(max_id, uint32_t(ids[i]));
        const float w = table[ids[i]];
#pragma unroll
        for (int m = 0; m < MB; ++m) {
          if (m < mvalid) acc[m] += w * to_float(x[m * ldx + j0 + i]);
        }
      }
    }
  } else {
    for (int64_t j = lane; j < k; j += 32) {
      max_id = max(max_id, uint32_t(code[j]));
      const float w = table[code[j]];
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m < mvalid) acc[m] += w * to_float(x[m * ldx + j]);
      }
    }
  }
  if (max_id >= uint32_t(kc)) atomicOr(bad_flag, 1);
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    const float sum = warp_sum(acc[m]);
    if (lane == 0 && m < mvalid) {
      y[m * n + row] = from_float<T>(sum + (bias ? to_float(bias[row]) : 0.f));
    }
  }
}

// Decode to dense W [n, k] in T (zeroed by the caller), for cuBLAS past the crossover.
template <typename T>
__global__ void spqmm_decode_sparse_kernel(const uint16_t* __restrict__ codes,
                                           const int32_t* __restrict__ seg_ptr, int64_t nnz,
                                           int64_t n, int64_t k, int64_t tiles, int bits,
                                           const T* __restrict__ codebook, int kc,
                                           T* __restrict__ w, int* __restrict__ bad_flag) {
  const int64_t tile_w = int64_t(1) << (16 - bits);
  const uint32_t idmask = (1u << bits) - 1;
  int flag = 0;
  for (int64_t s = blockIdx.x; s < n * tiles; s += gridDim.x) {
    int64_t lo, hi;
    segment_bounds(seg_ptr, s, nnz, &lo, &hi, &flag);
    const int64_t row = s / tiles, base = (s - row * tiles) * tile_w;
    for (int64_t e = lo + threadIdx.x; e < hi; e += blockDim.x) {
      const uint32_t v = codes[e];
      const uint32_t id = v & idmask;
      const int64_t col = base + (v >> bits);
      if (id >= uint32_t(kc)) flag |= 1;
      else if (col >= k) flag |= 2;
      else w[row * k + col] = codebook[id];
    }
  }
  if (flag) atomicOr(bad_flag, flag);
}

template <typename T>
__global__ void spqmm_decode_dense_kernel(const uint8_t* __restrict__ codes, int64_t count,
                                          const T* __restrict__ codebook, int kc,
                                          T* __restrict__ w, int* __restrict__ bad_flag) {
  int flag = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    const uint32_t id = codes[i];
    if (id >= uint32_t(kc)) flag = 1;
    w[i] = id < uint32_t(kc) ? codebook[id] : from_float<T>(0.f);
  }
  if (flag) atomicOr(bad_flag, flag);
}

template <typename T, int MB>
cudaError_t launch_block(const SpqmmCudaArgs& a, const T* x, int mvalid, float* ws, T* y) {
  const T* cb = static_cast<const T*>(a.codebook);
  if (a.dense) {
    const unsigned blocks = static_cast<unsigned>((a.n + kWarps - 1) / kWarps);
    const bool vec = a.k % 16 == 0 && is_aligned(a.dense_codes, 16);
    if (blocks == 0) return cudaSuccess;
    if (vec) {
      spqmm_dense_kernel<T, MB, true><<<blocks, kThreads, 0, a.stream>>>(
          x, a.k, mvalid, a.dense_codes, a.n, a.k, cb, a.kc, static_cast<const T*>(a.bias), y,
          a.bad_flag);
    } else {
      spqmm_dense_kernel<T, MB, false><<<blocks, kThreads, 0, a.stream>>>(
          x, a.k, mvalid, a.dense_codes, a.n, a.k, cb, a.kc, static_cast<const T*>(a.bias), y,
          a.bad_flag);
    }
    return cudaGetLastError();
  }
  if (a.num_chunks == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(a.num_chunks);
  if (a.kc <= 32) {
    spqmm_sparse_kernel<T, MB, true><<<blocks, kThreads, 0, a.stream>>>(
        x, a.k, mvalid, a.codes, a.seg_ptr, a.chunks, a.nnz, a.n, a.k, a.tiles, a.bits, cb, a.kc,
        ws, a.bad_flag);
  } else {
    spqmm_sparse_kernel<T, MB, false><<<blocks, kThreads, 0, a.stream>>>(
        x, a.k, mvalid, a.codes, a.seg_ptr, a.chunks, a.nnz, a.n, a.k, a.tiles, a.bits, cb, a.kc,
        ws, a.bad_flag);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const SpqmmCudaArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  // Batch columns per pass: each decoded weight is applied to all of them.
  const int mb = a.m <= 1 ? 1 : a.m <= 2 ? 2 : a.m <= 4 ? 4 : 8;
  for (int64_t m0 = 0; m0 < a.m; m0 += mb) {
    const int mvalid = static_cast<int>(std::min<int64_t>(mb, a.m - m0));
    const T* xb = x + m0 * a.k;
    float* wsb = a.ws != nullptr ? a.ws + m0 * a.n : nullptr;
    T* yb = y + m0 * a.n;
    cudaError_t err;
    switch (mb) {
      case 1: err = launch_block<T, 1>(a, xb, mvalid, wsb, yb); break;
      case 2: err = launch_block<T, 2>(a, xb, mvalid, wsb, yb); break;
      case 4: err = launch_block<T, 4>(a, xb, mvalid, wsb, yb); break;
      default: err = launch_block<T, 8>(a, xb, mvalid, wsb, yb); break;
    }
    if (err != cudaSuccess) return err;
  }
  if (!a.dense && a.m * a.n > 0) {
    const int64_t want = (a.m * a.n + kThreads - 1) / kThreads;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(want, 4096));
    spqmm_epilogue_kernel<T><<<blocks, kThreads, 0, a.stream>>>(
        a.ws, static_cast<const T*>(a.bias), y, a.m, a.n);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t decode_typed(const SpqmmCudaArgs& a, void* w) {
  const T* cb = static_cast<const T*>(a.codebook);
  if (a.dense) {
    const int64_t count = a.n * a.k;
    if (count == 0) return cudaSuccess;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((count + kThreads - 1) / kThreads, 8192));
    spqmm_decode_dense_kernel<T><<<blocks, kThreads, 0, a.stream>>>(a.dense_codes, count, cb, a.kc,
                                                                     static_cast<T*>(w), a.bad_flag);
  } else {
    const int64_t nseg = a.n * a.tiles;
    if (nseg == 0) return cudaSuccess;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(nseg, 65535));
    spqmm_decode_sparse_kernel<T><<<blocks, 128, 0, a.stream>>>(
        a.codes, a.seg_ptr, a.nnz, a.n, a.k, a.tiles, a.bits, cb, a.kc, static_cast<T*>(w),
        a.bad_flag);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_spqmm(const SpqmmCudaArgs& args) {
  if (args.m == 0 || args.n == 0) return cudaSuccess;
  switch (args.dtype) {
    case Dtype::kFloat32: return launch_typed<float>(args);
    case Dtype::kFloat16: return launch_typed<__half>(args);
    case Dtype::kBFloat16: return launch_typed<__nv_bfloat16>(args);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_spqmm_decode(const SpqmmCudaArgs& args, void* weight) {
  switch (args.dtype) {
    case Dtype::kFloat32: return decode_typed<float>(args, weight);
    case Dtype::kFloat16: return decode_typed<__half>(args, weight);
    case Dtype::kBFloat16: return decode_typed<__nv_bfloat16>(args, weight);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace dcx
