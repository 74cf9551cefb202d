// centroid_grad_kernel.cu under the emulator: launch_centroid_grad against per-cluster sums in
// double on the host. Both paths (per-warp sums in shared memory for k <= 256, global atomics
// above), int32 and int64 labels, with and without a mask, and labels outside [0, k) (the flag).
//
// Tolerance: the kernel adds in float (double for float64 gradients) in an order the atomics
// choose; whatever the order, a sum of t terms is within (t - 1) * u * sum|g| of the exact one
// (u = 2^-24 or 2^-53; there is no product, so contraction changes nothing), and the reference's
// own double sum within (t - 1) * 2^-53 * sum|g|. A lost or doubled term shows unless it is that
// small.
#include <algorithm>

#include "harness.h"

using namespace dcx;
using dcx::cuda::IndexDtype;

namespace {

template <typename T, typename L>
void test_centroid(int64_t n, int64_t k, bool use_mask, bool bad_labels, int sm_count, uint32_t seed) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<T> g(n);
  std::vector<L> lab(n);
  std::vector<uint8_t> m(n);
  std::vector<double> ref(k, 0.0), mag(k, 0.0), terms(k, 0.0);
  bool expect_bad = false;
  for (int64_t i = 0; i < n; ++i) {
    g[i] = h::from_f<T>(nd(rng));
    // skewed: a third of the weights in cluster 0 (contention on one shared-memory address)
    lab[i] = L(rng() % 3 == 0 ? 0 : int64_t(rng() % uint64_t(k)));
    if (bad_labels && rng() % 50 == 0) lab[i] = L(rng() % 2 ? -1 : k);
    m[i] = use_mask ? uint8_t(rng() % 3 != 0) : 1;
    if (use_mask && !m[i]) continue;
    if (lab[i] < 0 || int64_t(lab[i]) >= k) {
      expect_bad = true;
      continue;
    }
    const double v = std::is_same_v<T, double> ? double(g[i]) : double(h::to_f(g[i]));
    ref[int64_t(lab[i])] += v;
    mag[int64_t(lab[i])] += std::fabs(v);
    terms[int64_t(lab[i])] += 1;
  }
  std::vector<Acc> out(k, Acc(0));
  int flag = 0;
  const cudaError_t err = cuda::launch_centroid_grad(
      h::dtype_of<T>(), g.data(), sizeof(L) == 4 ? IndexDtype::kInt32 : IndexDtype::kInt64, lab.data(),
      use_mask ? m.data() : nullptr, n, k, out.data(), &flag, sm_count, nullptr);
  HCHECK(err == cudaSuccess, "err %d", int(err));
  int bad = 0;
  for (int64_t c = 0; c < k; ++c) {
    const double u = std::is_same_v<Acc, double> ? 0x1p-53 : 0x1p-24;
    const double tol = std::max(terms[c] - 1, 0.0) * (u + 0x1p-53) * mag[c];
    if (!(std::fabs(double(out[c]) - ref[c]) <= tol)) {
      if (bad++ < 3) std::printf("  centroid c=%lld: %g vs %g\n", (long long)c, double(out[c]), ref[c]);
    }
  }
  HCHECK(bad == 0 && flag == int(expect_bad),
         "centroid_grad %s L%zu n=%lld k=%lld mask=%d bad_labels=%d: %d wrong, flag %d (want %d)",
         h::name_of<T>(), sizeof(L) * 8, (long long)n, (long long)k, use_mask, bad_labels, bad, flag,
         int(expect_bad));
}

}  // namespace

// Parts: "sums" (every case), "bad-labels" (only the cases with labels outside [0, k): the ones
// that set the flag, which ThreadSanitizer checks in CI).
int main(int argc, char** argv) {
  uint32_t seed = 1;
  const bool all = h::wanted(argc, argv, "sums"), flags = h::wanted(argc, argv, "bad-labels");
  for (int64_t k : {1, 7, 256, 257, 1000})
    for (int64_t n : {1, 100, 3000})
      for (int variant = 0; variant < 3; ++variant) {
        const bool mask = variant >= 1, badl = variant == 2;
        if (!all && !(flags && badl)) {
          seed += 4;
          continue;
        }
        test_centroid<float, int32_t>(n, k, mask, badl, 2, seed++);
        test_centroid<__half, int64_t>(n, k, mask, badl, 2, seed++);
        test_centroid<__nv_bfloat16, int32_t>(n, k, mask, badl, 1, seed++);
        test_centroid<double, int64_t>(n, k, mask, badl, 2, seed++);
      }
  return h::finish("emulated centroid_grad kernels");
}
