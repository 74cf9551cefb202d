// kmeans1d on CUDA: the O(n) and O(k n log n) work on the device, the O(k) decisions on the host
// (core/kmeans1d.h, shared with the CPU op, so both devices decide alike).
//
//   sort      cub::DeviceRadixSort::SortKeys, or SortPairs with the weights (no index: labels
//             come from a binary search of each value in its own order, so no permutation is
//             kept and nothing is scattered), then -0.0 written as +0.0, as the CPU sort does
//   prefix    the (weighted) shifted values, their squares and the weights in double, in the
//             fixed tiled order of
//             kmeans1d::prefix_sums (a thread per tile, then one thread over the tile totals):
//             the same sums as the CPU bit for bit, so both devices take the same decisions
//             (a library scan's order of additions is its own and may change from run to run)
//   stats     per Lloyd iteration, one thread per cluster: its range by two binary searches of
//             the sorted values, its sums from prefix-sum differences
//   labels    one thread per value: binary search over the k - 1 midpoints in shared memory
//   exact DP  each row level by level, the nodes of a level in parallel (a warp per node while
//             nodes are few and their candidate ranges long, a thread per node after)
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>

#include "core/kmeans1d.h"
#include "cuda/launch.h"

namespace dcx {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSharedMidpoints = 4096;  // 32 KiB of doubles

inline unsigned blocks_for(int64_t n, int64_t cap = 65535LL * 8) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, cap)));
}

// -0.0 -> +0.0 in the sorted values (both compare equal, so the order stays sorted).
template <typename T>
__global__ void positive_zero_kernel(T* __restrict__ x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    if (x[i] == T(0)) x[i] = T(0);
}

// The tiled prefix sums of kmeans1d::prefix_sums, each product and sum rounded on its own
// (__dmul_rn / __dadd_rn: nvcc would otherwise fuse d * d into the addition, and the CPU does not).
// w: the weights (null: 1, and then w d is d itself, as on the CPU). One value's three terms:
struct PrefixTerms {
  double wd, d2, w;
};
template <typename T>
__device__ __forceinline__ PrefixTerms prefix_terms(const T* x, const T* w, int64_t i, double shift) {
  const double d = __dsub_rn(static_cast<double>(x[i]), shift);
  const double wi = w != nullptr ? static_cast<double>(w[i]) : 1.0;
  const double wd = w != nullptr ? __dmul_rn(wi, d) : d;
  return {wd, __dmul_rn(wd, d), wi};
}

// Pass 1: each tile's totals, summed from zero in order; one thread per tile. total: 3 x tiles.
template <typename T>
__global__ void tile_totals_kernel(const T* __restrict__ x, const T* __restrict__ w, int64_t n,
                                   double shift, double* __restrict__ total, int64_t tiles) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < tiles; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t0 = t * kmeans1d::kScanTile, t1 = min(n, t0 + kmeans1d::kScanTile);
    double s = 0.0, s2 = 0.0, sw = 0.0;
    for (int64_t i = t0; i < t1; ++i) {
      const PrefixTerms p = prefix_terms(x, w, i, shift);
      s = __dadd_rn(s, p.wd);
      s2 = __dadd_rn(s2, p.d2);
      sw = __dadd_rn(sw, p.w);
    }
    total[t] = s;
    total[tiles + t] = s2;
    total[2 * tiles + t] = sw;
  }
}

// Pass 2: the totals become the tiles' offsets (their running sum, in order), in place; one thread.
__global__ void tile_offsets_kernel(double* __restrict__ total, int64_t tiles) {
  for (int c = 0; c < 3; ++c) {
    double* tc = total + c * tiles;
    double off = 0.0;
    for (int64_t t = 0; t < tiles; ++t) {
      const double a = tc[t];
      tc[t] = off;
      off = __dadd_rn(off, a);
    }
  }
}

// Pass 3: each tile's running sums from its offset; one thread per tile. W: null when unweighted.
template <typename T>
__global__ void tile_scan_kernel(const T* __restrict__ x, const T* __restrict__ w, int64_t n,
                                 double shift, const double* __restrict__ offset, int64_t tiles,
                                 double* __restrict__ S, double* __restrict__ S2,
                                 double* __restrict__ W) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < tiles; t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t0 = t * kmeans1d::kScanTile, t1 = min(n, t0 + kmeans1d::kScanTile);
    double run = offset[t], run2 = offset[tiles + t], runw = offset[2 * tiles + t];
    for (int64_t i = t0; i < t1; ++i) {
      const PrefixTerms p = prefix_terms(x, w, i, shift);
      run = __dadd_rn(run, p.wd);
      run2 = __dadd_rn(run2, p.d2);
      runw = __dadd_rn(runw, p.w);
      S[i + 1] = run;
      S2[i + 1] = run2;
      if (W != nullptr) W[i + 1] = runw;
    }
    if (t == 0) {
      S[0] = S2[0] = 0.0;
      if (W != nullptr) W[0] = 0.0;
    }
  }
}

// Number of positions where a new value starts (one atomic per block).
template <typename T>
__global__ void count_distinct_kernel(const T* __restrict__ x, int64_t n,
                                      unsigned long long* __restrict__ count) {
  int64_t mine = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    mine += (i == 0 || x[i] != x[i - 1]) ? 1 : 0;
  __shared__ unsigned long long block_sum;
  if (threadIdx.x == 0) block_sum = 0;
  __syncthreads();
  if (mine) atomicAdd(&block_sum, static_cast<unsigned long long>(mine));
  __syncthreads();
  if (threadIdx.x == 0 && block_sum) atomicAdd(count, block_sum);
}

// Writes the distinct values (at most `limit` of them, in any order: the host sorts them).
template <typename T>
__global__ void write_distinct_kernel(const T* __restrict__ x, int64_t n, int64_t limit,
                                      double* __restrict__ out, unsigned long long* __restrict__ slot) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if (i == 0 || x[i] != x[i - 1]) {
      const unsigned long long pos = atomicAdd(slot, 1ULL);
      if (pos < static_cast<unsigned long long>(limit)) out[pos] = static_cast<double>(x[i]);
    }
  }
}

template <typename T>
__global__ void gather_kernel(const T* __restrict__ x, const int64_t* __restrict__ idx, int64_t m,
                              double* __restrict__ out) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j < m) out[j] = static_cast<double>(x[idx[j]]);
}

__global__ void weight_positions_kernel(const double* __restrict__ W, int64_t n,
                                        const double* __restrict__ targets, int64_t m,
                                        int64_t* __restrict__ out) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j < m) out[j] = kmeans1d::weight_position(W, n, targets[j]);
}

template <typename T>
__global__ void stats_kernel(const T* __restrict__ x, int64_t n, const double* __restrict__ S,
                             const double* __restrict__ S2, const double* __restrict__ W,
                             const double* __restrict__ mid, int64_t k,
                             kmeans1d::ClusterStats* __restrict__ out) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j < k) out[j] = kmeans1d::cluster_stats_one(x, n, S, S2, W, mid, k, j);
}

template <typename T>
__global__ void labels_kernel(const T* __restrict__ v, int64_t n, const double* __restrict__ mid,
                              int64_t num_mid, int32_t* __restrict__ labels) {
  extern __shared__ double smem_mid[];
  const double* m = mid;
  if (num_mid <= kSharedMidpoints) {
    for (int64_t j = threadIdx.x; j < num_mid; j += blockDim.x) smem_mid[j] = mid[j];
    __syncthreads();
    m = smem_mid;
  }
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    labels[i] = static_cast<int32_t>(kmeans1d::label_of(static_cast<double>(v[i]), m, num_mid));
}

__global__ void dp_row0_kernel(const double* __restrict__ S, const double* __restrict__ S2,
                               const double* __restrict__ W, int64_t n, double* __restrict__ D) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    D[i] = kmeans1d::segment_cost(S, S2, W, 0, i);
}

struct DpRow {
  const double* S;
  const double* S2;
  const double* W;
  const double* Dprev;
  double* Dcur;
  int32_t* J;
  int64_t m, row_lo, row_hi;
};

__device__ __forceinline__ void dp_better(double v, int64_t j, double& best, int64_t& arg) {
  if (v < best || (v == best && j < arg)) best = v, arg = j;
}

// A thread per node: many short candidate ranges.
__global__ void dp_level_thread_kernel(DpRow r, int level, int64_t nodes) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < nodes; t += int64_t(gridDim.x) * blockDim.x) {
    int64_t a, b, jlo, jhi;
    if (!kmeans1d::dp_node_range(r.row_lo, r.row_hi, level, t, &a, &b)) continue;
    kmeans1d::dp_node_bounds(r.m, r.row_lo, r.row_hi, a, b, r.J, &jlo, &jhi);
    const int64_t mid = a + ((b - a) >> 1);
    double best = r.Dprev[jlo - 1] + kmeans1d::segment_cost(r.S, r.S2, r.W, jlo, mid);
    int64_t arg = jlo;
    for (int64_t j = jlo + 1; j <= jhi; ++j) {
      const double v = r.Dprev[j - 1] + kmeans1d::segment_cost(r.S, r.S2, r.W, j, mid);
      if (v < best) best = v, arg = j;
    }
    r.Dcur[mid] = best;
    r.J[mid] = static_cast<int32_t>(arg);
  }
}

// A warp per node: few nodes with long candidate ranges; the lanes split the range and reduce.
__global__ void dp_level_warp_kernel(DpRow r, int level, int64_t nodes) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t t = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; t < nodes; t += warps) {
    int64_t a, b, jlo, jhi;
    if (!kmeans1d::dp_node_range(r.row_lo, r.row_hi, level, t, &a, &b)) continue;  // warp-uniform
    kmeans1d::dp_node_bounds(r.m, r.row_lo, r.row_hi, a, b, r.J, &jlo, &jhi);
    const int64_t mid = a + ((b - a) >> 1);
    double best = INFINITY;
    int64_t arg = INT64_MAX;
    for (int64_t j = jlo + lane; j <= jhi; j += 32)
      dp_better(r.Dprev[j - 1] + kmeans1d::segment_cost(r.S, r.S2, r.W, j, mid), j, best, arg);
    for (int off = 16; off > 0; off >>= 1) {
      const double ob = __shfl_down_sync(0xffffffffu, best, off);
      const int64_t oa = __shfl_down_sync(0xffffffffu, arg, off);
      dp_better(ob, oa, best, arg);
    }
    if (lane == 0) {
      r.Dcur[mid] = best;
      r.J[mid] = static_cast<int32_t>(arg);
    }
  }
}

__global__ void dp_backtrack_kernel(const int32_t* __restrict__ J, int64_t n, int64_t k,
                                    int64_t* __restrict__ bounds) {
  int64_t i = n - 1;
  bounds[0] = 0;
  bounds[k] = n;
  for (int64_t m = k - 1; m >= 1; --m) {
    const int64_t j = J[(m - 1) * n + i];
    bounds[m] = j;
    i = j - 1;
  }
}

// CUB's radix sorts are stable and read -0.0 and +0.0 as one key, as the CPU sort does.
// weighted: the weights w_in move with their values (SortPairs); a size query passes null arrays.
template <typename T>
cudaError_t sort_typed(const void* in, void* out, const void* w_in, void* w_out, bool weighted,
                       int64_t n, void* temp, size_t* temp_bytes, cudaStream_t stream) {
  if (weighted)
    return cub::DeviceRadixSort::SortPairs(temp, *temp_bytes, static_cast<const T*>(in),
                                           static_cast<T*>(out), static_cast<const T*>(w_in),
                                           static_cast<T*>(w_out), static_cast<int>(n), 0,
                                           int(sizeof(T) * 8), stream);
  return cub::DeviceRadixSort::SortKeys(temp, *temp_bytes, static_cast<const T*>(in),
                                        static_cast<T*>(out), static_cast<int>(n), 0,
                                        int(sizeof(T) * 8), stream);
}

}  // namespace

size_t kmeans1d_sort_temp_bytes(Dtype dtype, int64_t n, bool weighted) {
  size_t bytes = 0;
  if (dtype == Dtype::kFloat64) sort_typed<double>(nullptr, nullptr, nullptr, nullptr, weighted, n, nullptr, &bytes, 0);
  else sort_typed<float>(nullptr, nullptr, nullptr, nullptr, weighted, n, nullptr, &bytes, 0);
  return bytes;
}

cudaError_t launch_kmeans1d_sort(Dtype dtype, const void* in, void* out, const void* w_in,
                                 void* w_out, int64_t n, void* temp, size_t temp_bytes,
                                 cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const bool weighted = w_in != nullptr;
  cudaError_t err = dtype == Dtype::kFloat64
                        ? sort_typed<double>(in, out, w_in, w_out, weighted, n, temp, &temp_bytes, stream)
                        : sort_typed<float>(in, out, w_in, w_out, weighted, n, temp, &temp_bytes, stream);
  if (err != cudaSuccess) return err;
  if (dtype == Dtype::kFloat64)
    positive_zero_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<double*>(out), n);
  else
    positive_zero_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<float*>(out), n);
  return cudaGetLastError();
}

int64_t kmeans1d_prefix_scratch(int64_t n) {
  return 3 * ((n + kmeans1d::kScanTile - 1) / kmeans1d::kScanTile);
}

cudaError_t launch_kmeans1d_prefix(Dtype dtype, const void* sorted, const void* w, int64_t n,
                                   double shift, double* S, double* S2, double* W,
                                   double* scratch, cudaStream_t stream) {
  if (n == 0) {
    cudaError_t err = cudaMemsetAsync(S, 0, sizeof(double), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(S2, 0, sizeof(double), stream);
    if (err == cudaSuccess && W != nullptr) err = cudaMemsetAsync(W, 0, sizeof(double), stream);
    return err;
  }
  const int64_t tiles = kmeans1d_prefix_scratch(n) / 3;
  if (dtype == Dtype::kFloat64) {
    const double* x = static_cast<const double*>(sorted);
    tile_totals_kernel<<<blocks_for(tiles), kThreads, 0, stream>>>(x, static_cast<const double*>(w), n, shift, scratch, tiles);
  } else {
    const float* x = static_cast<const float*>(sorted);
    tile_totals_kernel<<<blocks_for(tiles), kThreads, 0, stream>>>(x, static_cast<const float*>(w), n, shift, scratch, tiles);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  tile_offsets_kernel<<<1, 1, 0, stream>>>(scratch, tiles);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (dtype == Dtype::kFloat64) {
    const double* x = static_cast<const double*>(sorted);
    tile_scan_kernel<<<blocks_for(tiles), kThreads, 0, stream>>>(x, static_cast<const double*>(w), n, shift, scratch, tiles, S, S2, W);
  } else {
    const float* x = static_cast<const float*>(sorted);
    tile_scan_kernel<<<blocks_for(tiles), kThreads, 0, stream>>>(x, static_cast<const float*>(w), n, shift, scratch, tiles, S, S2, W);
  }
  return cudaGetLastError();
}

cudaError_t launch_kmeans1d_distinct(Dtype dtype, const void* sorted, int64_t n, int64_t limit,
                                     bool write, double* out, unsigned long long* counter,
                                     cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (dtype == Dtype::kFloat64) {
    const double* x = static_cast<const double*>(sorted);
    if (write) write_distinct_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, n, limit, out, counter);
    else count_distinct_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, n, counter);
  } else {
    const float* x = static_cast<const float*>(sorted);
    if (write) write_distinct_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, n, limit, out, counter);
    else count_distinct_kernel<<<blocks_for(n), kThreads, 0, stream>>>(x, n, counter);
  }
  return cudaGetLastError();
}

cudaError_t launch_kmeans1d_gather(Dtype dtype, const void* x, const int64_t* idx, int64_t m,
                                   double* out, cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((m + kThreads - 1) / kThreads);
  if (dtype == Dtype::kFloat64)
    gather_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const double*>(x), idx, m, out);
  else
    gather_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(x), idx, m, out);
  return cudaGetLastError();
}

cudaError_t launch_kmeans1d_weight_positions(const double* W, int64_t n, const double* targets,
                                             int64_t m, int64_t* out, cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>((m + kThreads - 1) / kThreads);
  weight_positions_kernel<<<blocks, kThreads, 0, stream>>>(W, n, targets, m, out);
  return cudaGetLastError();
}

cudaError_t launch_kmeans1d_stats(Dtype dtype, const void* sorted, int64_t n, const double* S,
                                  const double* S2, const double* W, const double* mid, int64_t k,
                                  kmeans1d::ClusterStats* out, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((k + kThreads - 1) / kThreads);
  if (dtype == Dtype::kFloat64)
    stats_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const double*>(sorted), n, S, S2, W, mid, k, out);
  else
    stats_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const float*>(sorted), n, S, S2, W, mid, k, out);
  return cudaGetLastError();
}

cudaError_t launch_kmeans1d_labels(Dtype dtype, const void* values, int64_t n, const double* mid,
                                   int64_t k, int32_t* labels, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t num_mid = k - 1;
  const size_t smem = num_mid <= kSharedMidpoints ? sizeof(double) * std::max<int64_t>(num_mid, 1) : 0;
  if (dtype == Dtype::kFloat64)
    labels_kernel<<<blocks_for(n), kThreads, smem, stream>>>(static_cast<const double*>(values), n, mid, num_mid, labels);
  else
    labels_kernel<<<blocks_for(n), kThreads, smem, stream>>>(static_cast<const float*>(values), n, mid, num_mid, labels);
  return cudaGetLastError();
}

cudaError_t launch_kmeans1d_optimal(const double* S, const double* S2, const double* W, int64_t n,
                                    int64_t k, double* D0, double* D1, int32_t* J,
                                    int64_t* bounds, cudaStream_t stream) {
  dp_row0_kernel<<<blocks_for(n), kThreads, 0, stream>>>(S, S2, W, n, D0);
  cudaError_t err = cudaGetLastError();
  double* prev = D0;
  double* cur = D1;
  for (int64_t m = 1; m < k && err == cudaSuccess; ++m) {
    DpRow r{S, S2, W, prev, cur, J + (m - 1) * n, m, m, n - k + m};
    const int64_t len = r.row_hi - r.row_lo + 1;
    for (int level = 0; (int64_t(1) << level) <= len && err == cudaSuccess; ++level) {
      const int64_t nodes = int64_t(1) << level;
      // Candidates per node average about len / nodes: below a warp's worth, one thread each.
      if (nodes * 32 >= len) {
        dp_level_thread_kernel<<<blocks_for(nodes), kThreads, 0, stream>>>(r, level, nodes);
      } else {
        const int64_t blocks = std::min<int64_t>((nodes * 32 + kThreads - 1) / kThreads, 65535LL * 8);
        dp_level_warp_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(r, level, nodes);
      }
      err = cudaGetLastError();
    }
    std::swap(prev, cur);
  }
  if (err != cudaSuccess) return err;
  dp_backtrack_kernel<<<1, 1, 0, stream>>>(J, n, k, bounds);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dcx
