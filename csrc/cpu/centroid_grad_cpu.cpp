// centroid_grad on CPU: deterministic per-cluster sums. Each fixed-size chunk of the input sums
// into its own row of partials (parallel over chunks), then rows are added in chunk order
// (parallel over clusters), so the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "core/scatter.h"
#include "op_args.h"

namespace dcx {
namespace {

at::Tensor centroid_grad_cpu(const at::Tensor& grad, const at::Tensor& labels,
                             int64_t num_clusters, const std::optional<at::Tensor>& mask,
                             bool check) {
  check_centroid_grad_args(grad, labels, num_clusters, mask);
  const at::Tensor g = grad.contiguous();
  const at::Tensor l = labels.contiguous();
  const bool has_mask = mask.has_value() && mask->defined();
  const at::Tensor m = has_mask ? mask->contiguous() : at::Tensor();
  const uint8_t* mask_ptr = has_mask ? static_cast<const uint8_t*>(m.data_ptr()) : nullptr;
  const int64_t n = g.numel();
  const int64_t k = num_clusters;
  const ChunkPlan plan = plan_chunks(n, k);

  at::Tensor out;
  std::atomic<int64_t> bad{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "centroid_grad_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor partial = at::zeros({plan.num_chunks, k}, g.options().dtype(acc_dtype));
    acc_t* part = partial.data_ptr<acc_t>();
    const scalar_t* gp = g.data_ptr<scalar_t>();
    AT_DISPATCH_INDEX_TYPES(l.scalar_type(), "centroid_grad_cpu_labels", [&] {
      const index_t* lp = l.data_ptr<index_t>();
      at::parallel_for(0, plan.num_chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t lo = c * plan.chunk;
          const int64_t len = std::min(plan.chunk, n - lo);
          const int64_t b = accumulate_by_label(gp + lo, lp + lo, mask_ptr ? mask_ptr + lo : nullptr,
                                                len, k, part + c * k);
          if (b) bad += b;
        }
      });
    });
    at::Tensor total = at::empty({k}, g.options().dtype(acc_dtype));
    acc_t* tp = total.data_ptr<acc_t>();
    at::parallel_for(0, k, 64, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        acc_t s = 0;
        for (int64_t c = 0; c < plan.num_chunks; ++c) s += part[c * k + j];
        tp[j] = s;
      }
    });
    out = total.to(g.scalar_type());
  });
  TORCH_CHECK(!check || bad.load() == 0, "labels must lie in [0, num_clusters) = [0, ", k, ") where mask ",
              "is set; ", bad.load(), " label(s) are outside");
  return out;
}

}  // namespace
}  // namespace dcx

TORCH_LIBRARY_IMPL(dcx, CPU, m) { m.impl("centroid_grad", &dcx::centroid_grad_cpu); }
