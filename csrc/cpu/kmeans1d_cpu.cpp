// kmeans1d on CPU: radix-sort a copy of the values (with their weights), fit on the sorted copy (core/kmeans1d.h:
// Lloyd over cluster ranges, or the exact program with its rows parallel over nodes), then label
// every value by a binary search over the k - 1 midpoints, parallel over the values in their own
// order (so no permutation is kept and nothing is scattered).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "core/kmeans1d.h"
#include "op_args.h"

namespace dcx {
namespace {

std::tuple<at::Tensor, at::Tensor> kmeans1d_cpu(const at::Tensor& values, int64_t num_clusters,
                                                c10::string_view init, int64_t max_iter,
                                                double tol, int64_t seed,
                                                c10::string_view method,
                                                const std::optional<at::Tensor>& weights) {
  bool optimal = false;
  const kmeans1d::Init init_kind = check_kmeans1d_args(
      values, num_clusters, std::string(init), max_iter, tol, std::string(method), &optimal);
  check_kmeans1d_weights(weights, values);
  const at::Tensor v = values.contiguous();
  const at::Tensor w = weights.has_value() ? weights->contiguous() : at::Tensor();
  const int64_t n = v.numel(), k = num_clusters;
  at::Tensor centroids = at::empty({k}, v.options());
  at::Tensor labels = at::empty(v.sizes(), v.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "kmeans1d_cpu", [&] {
    const scalar_t* x = v.data_ptr<scalar_t>();
    std::vector<scalar_t> sorted(x, x + n), sorted_w;
    if (w.defined()) sorted_w.assign(w.data_ptr<scalar_t>(), w.data_ptr<scalar_t>() + n);
    scalar_t* wp = w.defined() ? sorted_w.data() : nullptr;
    kmeans1d::radix_sort(sorted.data(), wp, n);
    if (n > 0) check_kmeans1d_finite(sorted.front(), sorted.back());
    auto parallel = [](int64_t begin, int64_t end, auto&& fn) {
      at::parallel_for(begin, end, 1, fn);
    };
    kmeans1d::Fit fit = kmeans1d::fit_sorted(sorted.data(), wp, n, k, init_kind,
                                             static_cast<uint64_t>(seed), max_iter, tol, optimal,
                                             parallel);
    sorted = std::vector<scalar_t>();
    sorted_w = std::vector<scalar_t>();
    // Round the centroids to the output dtype first, so the labels are those of the centroids
    // returned.
    scalar_t* cp = centroids.data_ptr<scalar_t>();
    std::vector<double> c(k), mid(k > 1 ? k - 1 : 1);
    for (int64_t j = 0; j < k; ++j) c[j] = cp[j] = static_cast<scalar_t>(fit.centroids[j]);
    kmeans1d::midpoints(c.data(), k, mid.data());
    int32_t* lp = labels.data_ptr<int32_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        lp[i] = static_cast<int32_t>(kmeans1d::label_of(static_cast<double>(x[i]), mid.data(), k - 1));
    });
  });
  return {centroids, labels};
}

}  // namespace
}  // namespace dcx

TORCH_LIBRARY_IMPL(dcx, CPU, m) { m.impl("kmeans1d", &dcx::kmeans1d_cpu); }
