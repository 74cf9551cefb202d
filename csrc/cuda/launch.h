// Launchers of the CUDA kernels: plain pointers, sizes and a stream, no torch types, so the .cu
// files that define them compile with nvcc alone (seconds) and the torch glue (*_cuda.cpp)
// compiles with the host compiler.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "core/adamw.h"
#include "core/kmeans1d.h"
#include "core/sgd.h"

namespace dcx {
namespace cuda {

enum class Dtype { kFloat32, kFloat16, kBFloat16, kFloat64 };
enum class IndexDtype { kInt32, kInt64 };

// param, grad, buf: n elements of `dtype`; mask: n bytes (0 = pruned); buf may be null when
// momentum is off.
cudaError_t launch_masked_sgd_step(Dtype dtype, void* param, const void* grad, const uint8_t* mask,
                                   void* buf, int64_t n, const SgdHyper& h, cudaStream_t stream);

// param, grad, exp_avg, exp_avg_sq (and max_sq with amsgrad, else null): n elements of `dtype`;
// mask: n bytes (0 = pruned).
cudaError_t launch_masked_adamw_step(Dtype dtype, void* param, const void* grad,
                                     const uint8_t* mask, void* exp_avg, void* exp_avg_sq,
                                     void* max_sq, int64_t n, const AdamwHyper& h,
                                     cudaStream_t stream);

// out: k accumulators, zeroed by the caller, float (grad float32/16/bf16) or double (float64).
// bad_flag: one int, set to 1 when an unmasked label lies outside [0, k).
cudaError_t launch_centroid_grad(Dtype dtype, const void* grad, IndexDtype index_dtype,
                                 const void* labels, const uint8_t* mask, int64_t n, int64_t k,
                                 void* out, int* bad_flag, int sm_count, cudaStream_t stream);

// kmeans1d (values: float32 or float64, n < 2^31). Scratch for the sort and the scans comes from
// the caller (the caching allocator), sized by the *_temp_bytes queries. Weighted k-means passes
// the weights (values' dtype) beside the values; null everywhere when unweighted.
size_t kmeans1d_sort_temp_bytes(Dtype dtype, int64_t n, bool weighted);
// Sorts `in` into `out` (and w_in into w_out with them: a stable sort, -0.0 as +0.0).
cudaError_t launch_kmeans1d_sort(Dtype dtype, const void* in, void* out, const void* w_in,
                                 void* w_out, int64_t n, void* temp, size_t temp_bytes,
                                 cudaStream_t stream);
// Doubles of scratch the prefix sums need (three per tile of kmeans1d::kScanTile values).
int64_t kmeans1d_prefix_scratch(int64_t n);
// S, S2 (and W when w is given): n + 1 doubles, the prefix sums of kmeans1d::prefix_sums in its
// fixed order (bit for bit the CPU's); scratch: kmeans1d_prefix_scratch(n) doubles.
cudaError_t launch_kmeans1d_prefix(Dtype dtype, const void* sorted, const void* w, int64_t n,
                                   double shift, double* S, double* S2, double* W,
                                   double* scratch, cudaStream_t stream);
// write == false: adds the number of distinct sorted values to *counter (zeroed by the caller);
// write == true: writes up to `limit` of them to out, in any order (counter: slots, zeroed).
cudaError_t launch_kmeans1d_distinct(Dtype dtype, const void* sorted, int64_t n, int64_t limit,
                                     bool write, double* out, unsigned long long* counter,
                                     cudaStream_t stream);
// out[j] = x[idx[j]] as double, j < m.
cudaError_t launch_kmeans1d_gather(Dtype dtype, const void* x, const int64_t* idx, int64_t m,
                                   double* out, cudaStream_t stream);
// out[j] = kmeans1d::weight_position(W, n, targets[j]), j < m: weighted quantiles.
cudaError_t launch_kmeans1d_weight_positions(const double* W, int64_t n, const double* targets,
                                             int64_t m, int64_t* out, cudaStream_t stream);
// The k clusters bounded by the midpoints mid[0..k-2] (kmeans1d::cluster_stats_one).
cudaError_t launch_kmeans1d_stats(Dtype dtype, const void* sorted, int64_t n, const double* S,
                                  const double* S2, const double* W, const double* mid, int64_t k,
                                  kmeans1d::ClusterStats* out, cudaStream_t stream);
// labels[i] = the number of midpoints below values[i].
cudaError_t launch_kmeans1d_labels(Dtype dtype, const void* values, int64_t n, const double* mid,
                                   int64_t k, int32_t* labels, cudaStream_t stream);
// The exact program: D0, D1: n doubles each; J: (k - 1) x n int32; bounds: k + 1 int64 written.
cudaError_t launch_kmeans1d_optimal(const double* S, const double* S2, const double* W, int64_t n,
                                    int64_t k, double* D0, double* D1, int32_t* J,
                                    int64_t* bounds, cudaStream_t stream);
// spqmm (layout at the top of csrc/core/spqmm.h). x: [m, k] contiguous, y: [m, n], codebook
// (kc entries) and bias (or null) in `dtype`. Sparse mode: codes [steps, 16], windows [steps],
// group_ptr [ceil(n / 16) + 1], chunks [num_chunks + 1] set, and ws a zeroed float [m, n]
// workspace; dense mode: dense_codes set. bad_flag: one zeroed int, bit 1 an id >= kc, bit 2 a
// column >= k, bit 4 unsound pointers. device: the current device (its limits are cached).
struct SpqmmCudaArgs {
  Dtype dtype;
  int device;
  const void* x;
  void* y;
  int64_t m, n, k;
  bool dense;  // dense mode (dense_codes) or sparse mode (codes, windows, group_ptr, chunks)
  const uint16_t* codes;
  const uint8_t* dense_codes;
  const int32_t* windows;
  const int32_t* group_ptr;
  const int32_t* chunks;
  int64_t num_chunks, steps, groups;
  int bits;
  const void* codebook;
  int kc;
  const void* bias;
  // Group scales or null (core/spqmm.h's SpqmmPacked says the rule): float32 [n][scale_groups],
  // W[r][j] = group_scale[r][j / scale_group] * codebook[id], scale_group a multiple of 32; in
  // sparse mode every window lies in one group (window % scale_group + 32 <= scale_group; bit 8
  // of bad_flag when not). launch_spqmm_decode applies them too.
  const float* group_scale;
  int64_t scale_group, scale_groups;
  float* ws;
  int* bad_flag;
  cudaStream_t stream;
};

// With m, n or k zero there is nothing to compute; sparse mode's pointers are still checked.
cudaError_t launch_spqmm(const SpqmmCudaArgs& args);

// Decode the packed weight to dense [n, k] in `dtype` at `weight`, every element written.
cudaError_t launch_spqmm_decode(const SpqmmCudaArgs& args, void* weight);

// spqmm_int8 (csrc/core/spqmm_int8.h) of a dense-mode layer: x [m, k] contiguous, y [m, n],
// codebook (kc entries) and bias (or null) in `dtype`; xq (m x ceil(k / 32) * 32 int8) and xs
// (m x ceil(k / 32) floats) scratch that the launch fills; bad_flag: one zeroed int, bit 1 an
// id >= kc.
struct SpqmmInt8CudaArgs {
  Dtype dtype;
  const void* x;
  void* y;
  int64_t m, n, k;
  const uint8_t* codes;
  int bits;
  const void* codebook;
  int kc;
  const void* bias;
  const float* group_scale;  // as SpqmmCudaArgs's, or null
  int64_t scale_group, scale_groups;
  int8_t* xq;
  float* xs;
  int* bad_flag;
  cudaStream_t stream;
};

cudaError_t launch_spqmm_int8(const SpqmmInt8CudaArgs& args);

}  // namespace cuda
}  // namespace dcx
