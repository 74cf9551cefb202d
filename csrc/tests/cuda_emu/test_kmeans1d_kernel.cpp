// kmeans1d_kernel.cu under the emulator: its launchers (sort, prefix sums, distinct values,
// gather, cluster stats, labels, the exact dynamic program) against the CPU functions of
// core/kmeans1d.h, bit for bit, as the op promises: the sort (-0.0 read as +0.0, also for a
// single value), the prefix sums (__dadd_rn / __dmul_rn: never contracted), the stats and the
// program's boundaries.
#include <algorithm>
#include <functional>
#include <string>

#include "harness.h"
#include "core/kmeans1d.h"

using namespace dcx;
using dcx::cuda::Dtype;

namespace {

template <typename T>
std::vector<T> make_values(int64_t n, int kind, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd;
  std::vector<T> v(n);
  for (int64_t i = 0; i < n; ++i) {
    switch (kind) {
      case 0: v[i] = T(nd(rng)); break;                                    // continuous
      case 1: v[i] = T(int(rng() % 7) - 3) * T(0.5); break;                // few distinct, with -0.0s
      default: v[i] = T(i % 3 == 0 ? -0.0 : nd(rng) * 1e3 + 5e3); break;  // shifted, signed zeros
    }
    if (kind == 1 && v[i] == T(0) && (rng() & 1)) v[i] = T(-0.0);
  }
  return v;
}

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

auto serial = [](int64_t lo, int64_t hi, const std::function<void(int64_t, int64_t)>& fn) { fn(lo, hi); };

template <typename T>
void test_all(int64_t n, int64_t k, int kind, uint32_t seed) {
  const Dtype dt = std::is_same_v<T, double> ? Dtype::kFloat64 : Dtype::kFloat32;
  char what[120];
  std::snprintf(what, sizeof what, "kmeans1d %s n=%lld k=%lld kind=%d", h::name_of<T>(), (long long)n,
                (long long)k, kind);
  const std::vector<T> x = make_values<T>(n, kind, seed);

  // sort
  std::vector<T> sorted(n), ref = x;
  kmeans1d::radix_sort(ref.data(), n);
  const size_t tb = cuda::kmeans1d_sort_temp_bytes(dt, n);
  std::vector<unsigned char> temp(tb);
  cudaError_t err = cuda::launch_kmeans1d_sort(dt, x.data(), sorted.data(), n, temp.data(), tb, nullptr);
  HCHECK(err == cudaSuccess && same_bits(sorted, ref), "%s: sort (err %d)", what, int(err));
  if (n == 0) return;

  // prefix sums, bit for bit
  const double shift = double(sorted[n / 2]);
  std::vector<double> S(n + 1, -1.0), S2(n + 1, -1.0), rS(n + 1), rS2(n + 1);
  std::vector<double> scratch(cuda::kmeans1d_prefix_scratch(n));
  kmeans1d::prefix_sums(sorted.data(), n, shift, rS.data(), rS2.data());
  err = cuda::launch_kmeans1d_prefix(dt, sorted.data(), n, shift, S.data(), S2.data(), scratch.data(), nullptr);
  HCHECK(err == cudaSuccess && same_bits(S, rS) && same_bits(S2, rS2), "%s: prefix sums (err %d)", what, int(err));

  // distinct values: count, then write up to a limit (any order)
  std::vector<double> rdist;
  const int64_t rcount = kmeans1d::distinct_values(sorted.data(), n, n, &rdist);
  unsigned long long counter = 0;
  err = cuda::launch_kmeans1d_distinct(dt, sorted.data(), n, 0, false, nullptr, &counter, nullptr);
  HCHECK(err == cudaSuccess && int64_t(counter) == rcount, "%s: distinct count %llu, want %lld", what, counter,
         (long long)rcount);
  const int64_t limit = std::min<int64_t>(rcount, 50);
  std::vector<double> dist(limit, -12345.0);
  unsigned long long slots = 0;
  err = cuda::launch_kmeans1d_distinct(dt, sorted.data(), n, limit, true, dist.data(), &slots, nullptr);
  std::sort(dist.begin(), dist.end());
  bool dist_ok = err == cudaSuccess && int64_t(slots) == rcount;
  for (double d : dist) dist_ok = dist_ok && std::binary_search(rdist.begin(), rdist.end(), d);
  dist_ok = dist_ok && std::adjacent_find(dist.begin(), dist.end()) == dist.end();
  HCHECK(dist_ok, "%s: distinct write (slots %llu)", what, slots);

  // gather
  std::vector<int64_t> idx = {0, n - 1, n / 2, n / 3};
  std::vector<double> g(idx.size());
  err = cuda::launch_kmeans1d_gather(dt, sorted.data(), idx.data(), int64_t(idx.size()), g.data(), nullptr);
  bool g_ok = err == cudaSuccess;
  for (size_t i = 0; i < idx.size(); ++i) g_ok = g_ok && g[i] == double(sorted[idx[i]]);
  HCHECK(g_ok, "%s: gather", what);

  // cluster stats and labels from k centroids spread over the range (some clusters empty)
  std::vector<double> c(k), mid(std::max<int64_t>(k - 1, 1));
  for (int64_t j = 0; j < k; ++j)
    c[j] = double(sorted[0]) + (double(sorted[n - 1]) - double(sorted[0])) * (double(j) + 0.3) / double(k);
  kmeans1d::midpoints(c.data(), k, mid.data());
  std::vector<kmeans1d::ClusterStats> st(k);
  err = cuda::launch_kmeans1d_stats(dt, sorted.data(), n, S.data(), S2.data(), mid.data(), k, st.data(), nullptr);
  bool st_ok = err == cudaSuccess;
  for (int64_t j = 0; j < k; ++j) {
    const auto r = kmeans1d::cluster_stats_one(sorted.data(), n, rS.data(), rS2.data(), mid.data(), k, j);
    st_ok = st_ok && std::memcmp(&r, &st[j], sizeof r) == 0;
  }
  HCHECK(st_ok, "%s: cluster stats", what);
  std::vector<int32_t> lab(n, -5);
  err = cuda::launch_kmeans1d_labels(dt, x.data(), n, mid.data(), k, lab.data(), nullptr);
  int lbad = 0;
  for (int64_t i = 0; i < n; ++i) lbad += lab[i] != int32_t(kmeans1d::label_of(double(x[i]), mid.data(), k - 1));
  HCHECK(err == cudaSuccess && lbad == 0, "%s: labels, %d wrong", what, lbad);

  // the exact program: the same boundaries as the CPU's
  if (n >= k && k >= 2 && n <= 4000 && k <= 12) {
    std::vector<double> D0(n), D1(n);
    std::vector<int32_t> J(size_t(k - 1) * n, -1);
    std::vector<int64_t> bounds(k + 1, -1);
    err = cuda::launch_kmeans1d_optimal(S.data(), S2.data(), n, k, D0.data(), D1.data(), J.data(),
                                        bounds.data(), nullptr);
    const std::vector<int64_t> rb = kmeans1d::optimal_boundaries(rS.data(), rS2.data(), n, k, serial);
    HCHECK(err == cudaSuccess && bounds == rb, "%s: optimal boundaries differ (err %d)", what, int(err));
  }
}

}  // namespace

int main() {
  uint32_t seed = 7;
  for (int64_t n : {0, 1, 2, 37, 2048, 2049, 5000})
    for (int kind = 0; kind < 3; ++kind)
      for (int64_t k : {2, 5, 12}) {
        test_all<float>(n, k, kind, seed++);
        test_all<double>(n, k, kind, seed++);
      }
  test_all<float>(6000, 4200, 0, seed++);  // more midpoints than fit in shared memory (4096)
  test_all<double>(300, 300, 0, seed++);
  test_all<float>(3000, 3, 2, seed++);     // long rows: the warp-per-node level kernel
  return h::finish("emulated kmeans1d kernels");
}
