// kmeans1d on CUDA: the steps of kmeans1d::fit_sorted (core/kmeans1d.h) with the O(n) work on
// the device (kmeans1d_kernel.cu) and the O(k) decisions on the host through the same core code
// as the CPU op, so the two devices take the same decisions. Every buffer, CUB scratch included,
// comes from the caching allocator. The op reads small results back (ends of the sorted values,
// the distinct count, k cluster statistics per Lloyd iteration), so it cannot be captured in a
// CUDA graph.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda/cuda_glue.h"
#include "op_args.h"

namespace dcx {
namespace {

void to_host(void* host, const void* dev, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return;
  C10_CUDA_CHECK(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void to_device(void* dev, const void* host, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return;
  // From pageable memory: returns once the host buffer has been read.
  C10_CUDA_CHECK(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, stream));
}

double read_value(const at::Tensor& sorted, int64_t i, cudaStream_t stream) {
  if (sorted.scalar_type() == at::kDouble) {
    double v;
    to_host(&v, sorted.data_ptr<double>() + i, sizeof(v), stream);
    return v;
  }
  float v;
  to_host(&v, sorted.data_ptr<float>() + i, sizeof(v), stream);
  return v;
}

std::tuple<at::Tensor, at::Tensor> kmeans1d_cuda(const at::Tensor& values, int64_t num_clusters,
                                                 c10::string_view init, int64_t max_iter,
                                                 double tol, int64_t seed,
                                                 c10::string_view method,
                                                 const std::optional<at::Tensor>& weights) {
  bool optimal = false;
  const kmeans1d::Init init_kind = check_kmeans1d_args(
      values, num_clusters, std::string(init), max_iter, tol, std::string(method), &optimal);
  cuda::check_cuda_tensor(values, "values");
  check_kmeans1d_weights(weights, values);
  const c10::cuda::CUDAGuard guard(values.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor v = values.contiguous();
  const int64_t n = v.numel(), k = num_clusters;
  const cuda::Dtype dtype = cuda::to_dtype(v.scalar_type(), "values");
  const auto bytes = v.options().dtype(at::kByte);
  const auto f64 = v.options().dtype(at::kDouble);
  const auto i64 = v.options().dtype(at::kLong);

  // ---- kmeans1d::fit_sorted, step by step ----
  std::vector<double> c;
  if (n > 0) {
    const bool weighted = weights.has_value();
    const at::Tensor w = weighted ? weights->contiguous() : at::Tensor();
    at::Tensor sorted = at::empty({n}, v.options());
    at::Tensor sorted_w = weighted ? at::empty({n}, v.options()) : at::Tensor();
    void* wp = weighted ? sorted_w.data_ptr() : nullptr;
    at::Tensor sort_temp =
        at::empty({int64_t(cuda::kmeans1d_sort_temp_bytes(dtype, n, weighted))}, bytes);
    C10_CUDA_CHECK(cuda::launch_kmeans1d_sort(dtype, v.data_ptr(), sorted.data_ptr(),
                                              weighted ? w.data_ptr() : nullptr, wp, n,
                                              sort_temp.data_ptr(), sort_temp.numel(), stream));
    sort_temp.reset();
    check_kmeans1d_finite(read_value(sorted, 0, stream), read_value(sorted, n - 1, stream));

    at::Tensor counter = at::zeros({1}, i64);
    auto* counter_ptr = reinterpret_cast<unsigned long long*>(counter.data_ptr<int64_t>());
    C10_CUDA_CHECK(cuda::launch_kmeans1d_distinct(dtype, sorted.data_ptr(), n, k, false, nullptr,
                                                  counter_ptr, stream));
    int64_t num_distinct = 0;
    to_host(&num_distinct, counter_ptr, sizeof(num_distinct), stream);
    if (num_distinct <= k) {  // each distinct value is a centroid
      at::Tensor distinct = at::empty({num_distinct}, f64);
      counter.zero_();
      C10_CUDA_CHECK(cuda::launch_kmeans1d_distinct(dtype, sorted.data_ptr(), n, k, true,
                                                    distinct.data_ptr<double>(), counter_ptr, stream));
      c.resize(num_distinct);
      to_host(c.data(), distinct.data_ptr<double>(), sizeof(double) * num_distinct, stream);
      std::sort(c.begin(), c.end());
      c.resize(k, c.back());
    } else {
      const double shift = read_value(sorted, n / 2, stream);
      at::Tensor S = at::empty({n + 1}, f64), S2 = at::empty({n + 1}, f64);
      at::Tensor W = weighted ? at::empty({n + 1}, f64) : at::Tensor();
      double* Wp = weighted ? W.data_ptr<double>() : nullptr;
      {
        at::Tensor scratch = at::empty({cuda::kmeans1d_prefix_scratch(n)}, f64);
        C10_CUDA_CHECK(cuda::launch_kmeans1d_prefix(dtype, sorted.data_ptr(), wp, n, shift,
                                                    S.data_ptr<double>(), S2.data_ptr<double>(),
                                                    Wp, scratch.data_ptr<double>(), stream));
      }
      const double* Sp = S.data_ptr<double>();
      const double* S2p = S2.data_ptr<double>();
      // The totals: sum, sum of squares, weight (n when unweighted).
      double ends[3] = {0.0, 0.0, static_cast<double>(n)};
      to_host(ends, Sp + n, sizeof(double), stream);
      to_host(ends + 1, S2p + n, sizeof(double), stream);
      if (weighted) to_host(ends + 2, Wp + n, sizeof(double), stream);
      // Values at positions of the sorted values (or of S), read back in one small copy.
      auto gather = [&](cuda::Dtype dt, const void* src, const std::vector<int64_t>& idx) {
        at::Tensor idx_dev = at::empty({int64_t(idx.size())}, i64);
        to_device(idx_dev.data_ptr(), idx.data(), sizeof(int64_t) * idx.size(), stream);
        at::Tensor out = at::empty({int64_t(idx.size())}, f64);
        C10_CUDA_CHECK(cuda::launch_kmeans1d_gather(dt, src, idx_dev.data_ptr<int64_t>(),
                                                    idx.size(), out.data_ptr<double>(), stream));
        std::vector<double> host(idx.size());
        to_host(host.data(), out.data_ptr<double>(), sizeof(double) * idx.size(), stream);
        return host;
      };
      if (optimal) {
        at::Tensor D = at::empty({2, n}, f64);
        at::Tensor J = at::empty({(k - 1) * n}, v.options().dtype(at::kInt));
        at::Tensor b_dev = at::empty({k + 1}, i64);
        C10_CUDA_CHECK(cuda::launch_kmeans1d_optimal(Sp, S2p, Wp, n, k, D.data_ptr<double>(),
                                                     D.data_ptr<double>() + n, J.data_ptr<int32_t>(),
                                                     b_dev.data_ptr<int64_t>(), stream));
        std::vector<int64_t> b(k + 1);
        to_host(b.data(), b_dev.data_ptr<int64_t>(), sizeof(int64_t) * (k + 1), stream);
        // kmeans1d::range_mean of each range, from its ends' sums (and first value).
        const std::vector<double> Sb = gather(cuda::Dtype::kFloat64, Sp, b);
        const std::vector<double> Wb = weighted ? gather(cuda::Dtype::kFloat64, Wp, b) : std::vector<double>();
        const std::vector<double> first = gather(dtype, sorted.data_ptr(), std::vector<int64_t>(b.begin(), b.end() - 1));
        c.resize(k);
        for (int64_t j = 0; j < k; ++j) {
          const double wj = weighted ? Wb[j + 1] - Wb[j] : double(b[j + 1] - b[j]);
          c[j] = wj > 0.0 ? shift + (Sb[j + 1] - Sb[j]) / wj : first[j];
        }
      } else if (init_kind == kmeans1d::Init::kLinear) {
        c = kmeans1d::init_linear(read_value(sorted, 0, stream), read_value(sorted, n - 1, stream), k);
      } else if (init_kind == kmeans1d::Init::kPlusPlus) {
        // Needs every value: on the host from a copy, with the host's prefix sums, so it draws
        // exactly what the CPU op draws.
        AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "kmeans1d_plusplus", [&] {
          std::vector<scalar_t> x(n), hw(weighted ? n : 0);
          to_host(x.data(), sorted.data_ptr(), sizeof(scalar_t) * n, stream);
          if (weighted) to_host(hw.data(), wp, sizeof(scalar_t) * n, stream);
          std::vector<double> hS(n + 1), hS2(n + 1), hW(weighted ? n + 1 : 0);
          kmeans1d::prefix_sums(x.data(), weighted ? hw.data() : nullptr, n, shift, hS.data(),
                                hS2.data(), weighted ? hW.data() : nullptr);
          c = kmeans1d::init_plusplus(x.data(), n, hS.data(), hS2.data(),
                                      weighted ? hW.data() : nullptr, shift, k,
                                      static_cast<uint64_t>(seed));
        });
      } else if (init_kind == kmeans1d::Init::kDensity && weighted) {
        // Weighted quantiles: positions found on the device from W, values gathered.
        std::vector<double> targets(k);
        for (int64_t j = 0; j < k; ++j) targets[j] = (static_cast<double>(j) + 0.5) / k * ends[2];
        at::Tensor t_dev = at::empty({k}, f64), pos_dev = at::empty({k}, i64);
        to_device(t_dev.data_ptr(), targets.data(), sizeof(double) * k, stream);
        C10_CUDA_CHECK(cuda::launch_kmeans1d_weight_positions(Wp, n, t_dev.data_ptr<double>(), k,
                                                              pos_dev.data_ptr<int64_t>(), stream));
        std::vector<int64_t> pos(k);
        to_host(pos.data(), pos_dev.data_ptr<int64_t>(), sizeof(int64_t) * k, stream);
        c = gather(dtype, sorted.data_ptr(), pos);
      } else {
        c = gather(dtype, sorted.data_ptr(), kmeans1d::init_indices(init_kind, n, k, uint64_t(seed)));
      }
      at::Tensor mid_dev = at::empty({std::max<int64_t>(k - 1, 1)}, f64);
      at::Tensor stats_dev = at::empty({int64_t(sizeof(kmeans1d::ClusterStats)) * k}, bytes);
      auto* stats_ptr = reinterpret_cast<kmeans1d::ClusterStats*>(stats_dev.data_ptr());
      auto stats = [&](const double* mid, kmeans1d::ClusterStats* out) {
        to_device(mid_dev.data_ptr(), mid, sizeof(double) * (k - 1), stream);
        C10_CUDA_CHECK(cuda::launch_kmeans1d_stats(dtype, sorted.data_ptr(), n, Sp, S2p, Wp,
                                                   mid_dev.data_ptr<double>(), k, stats_ptr, stream));
        to_host(out, stats_ptr, sizeof(kmeans1d::ClusterStats) * k, stream);
      };
      kmeans1d::lloyd(stats, c.data(), k, shift, max_iter,
                      kmeans1d::scaled_tol(tol, ends[0], ends[1], ends[2]));
    }
  } else {
    c.assign(k, 0.0);
  }

  // Round to the output dtype, then label by the midpoints of the centroids returned.
  at::Tensor centroids_host = at::empty({k}, v.options().device(at::kCPU));
  std::vector<double> mid(std::max<int64_t>(k - 1, 1));
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "kmeans1d_round", [&] {
    scalar_t* cp = centroids_host.data_ptr<scalar_t>();
    for (int64_t j = 0; j < k; ++j) c[j] = cp[j] = static_cast<scalar_t>(c[j]);
  });
  kmeans1d::midpoints(c.data(), k, mid.data());
  at::Tensor centroids = centroids_host.to(v.device());
  at::Tensor labels = at::empty(v.sizes(), v.options().dtype(at::kInt));
  if (n > 0) {
    at::Tensor mid_dev = at::empty({int64_t(mid.size())}, f64);
    to_device(mid_dev.data_ptr(), mid.data(), sizeof(double) * mid.size(), stream);
    C10_CUDA_CHECK(cuda::launch_kmeans1d_labels(dtype, v.data_ptr(), n, mid_dev.data_ptr<double>(),
                                                k, labels.data_ptr<int32_t>(), stream));
  }
  return {centroids, labels};
}

}  // namespace
}  // namespace dcx

TORCH_LIBRARY_IMPL(dcx, CUDA, m) { m.impl("kmeans1d", &dcx::kmeans1d_cuda); }
