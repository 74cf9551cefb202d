// kmeans1d_kernel.cu under the emulator: its launchers (sort, prefix sums, distinct values,
// gather, cluster stats, labels, the exact dynamic program) against the CPU functions of
// core/kmeans1d.h, bit for bit, as the op promises: the sort (-0.0 read as +0.0, also for a
// single value), the prefix sums (__dadd_rn / __dmul_rn: never contracted), the stats and the
// program's boundaries; unweighted and weighted (the weights sorted with the values, the
// weighted sums, weighted quantile positions).
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
void test_all(int64_t n, int64_t k, int kind, uint32_t seed, bool weighted) {
  const Dtype dt = std::is_same_v<T, double> ? Dtype::kFloat64 : Dtype::kFloat32;
  char what[120];
  std::snprintf(what, sizeof what, "kmeans1d %s n=%lld k=%lld kind=%d%s", h::name_of<T>(), (long long)n,
                (long long)k, kind, weighted ? " weighted" : "");
  const std::vector<T> x = make_values<T>(n, kind, seed);
  std::vector<T> w;
  if (weighted) {
    std::mt19937 rng(seed + 1000);
    std::exponential_distribution<double> ed;
    for (int64_t i = 0; i < n; ++i) w.push_back(T(1e-3 + ed(rng)));
  }

  // sort (the weights with their values)
  std::vector<T> sorted(n), ref = x, sorted_w(weighted ? n : 0), ref_w = w;
  kmeans1d::radix_sort(ref.data(), weighted ? ref_w.data() : nullptr, n);
  const size_t tb = cuda::kmeans1d_sort_temp_bytes(dt, n, weighted);
  std::vector<unsigned char> temp(tb);
  cudaError_t err = cuda::launch_kmeans1d_sort(dt, x.data(), sorted.data(), weighted ? w.data() : nullptr,
                                               weighted ? sorted_w.data() : nullptr, n, temp.data(), tb, nullptr);
  HCHECK(err == cudaSuccess && same_bits(sorted, ref) && same_bits(sorted_w, ref_w), "%s: sort (err %d)", what,
         int(err));
  if (n == 0) return;

  // prefix sums, bit for bit
  const double shift = double(sorted[n / 2]);
  const T* sw = weighted ? sorted_w.data() : nullptr;
  std::vector<double> S(n + 1, -1.0), S2(n + 1, -1.0), rS(n + 1), rS2(n + 1);
  std::vector<double> Wv(weighted ? n + 1 : 0, -1.0), rW(weighted ? n + 1 : 0);
  double* W = weighted ? Wv.data() : nullptr;
  const double* RW = weighted ? rW.data() : nullptr;
  std::vector<double> scratch(cuda::kmeans1d_prefix_scratch(n));
  kmeans1d::prefix_sums(sorted.data(), sw, n, shift, rS.data(), rS2.data(), weighted ? rW.data() : nullptr);
  err = cuda::launch_kmeans1d_prefix(dt, sorted.data(), sw, n, shift, S.data(), S2.data(), W, scratch.data(),
                                     nullptr);
  HCHECK(err == cudaSuccess && same_bits(S, rS) && same_bits(S2, rS2) && same_bits(Wv, rW),
         "%s: prefix sums (err %d)", what, int(err));

  // weighted quantile positions
  if (weighted) {
    std::vector<double> targets = {-1.0, 0.0, rW[n] / 3, rW[n] / 2, rW[n], rW[n] * 2, rW[n / 2]};
    std::vector<int64_t> pos(targets.size(), -7);
    err = cuda::launch_kmeans1d_weight_positions(W, n, targets.data(), int64_t(targets.size()), pos.data(), nullptr);
    bool pos_ok = err == cudaSuccess;
    for (size_t j = 0; j < targets.size(); ++j) pos_ok = pos_ok && pos[j] == kmeans1d::weight_position(RW, n, targets[j]);
    HCHECK(pos_ok, "%s: weight positions", what);
  }

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
  err = cuda::launch_kmeans1d_stats(dt, sorted.data(), n, S.data(), S2.data(), W, mid.data(), k, st.data(),
                                    nullptr);
  bool st_ok = err == cudaSuccess;
  for (int64_t j = 0; j < k; ++j) {
    const auto r = kmeans1d::cluster_stats_one(sorted.data(), n, rS.data(), rS2.data(), RW, mid.data(), k, j);
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
    err = cuda::launch_kmeans1d_optimal(S.data(), S2.data(), W, n, k, D0.data(), D1.data(), J.data(),
                                        bounds.data(), nullptr);
    const std::vector<int64_t> rb = kmeans1d::optimal_boundaries(rS.data(), rS2.data(), RW, n, k, serial);
    HCHECK(err == cudaSuccess && bounds == rb, "%s: optimal boundaries differ (err %d)", what, int(err));
  }
}

}  // namespace

int main() {
  uint32_t seed = 7;
  for (bool weighted : {false, true})
    for (int64_t n : {0, 1, 2, 37, 2048, 2049, 5000})
      for (int kind = 0; kind < 3; ++kind)
        for (int64_t k : {2, 5, 12}) {
          test_all<float>(n, k, kind, seed++, weighted);
          test_all<double>(n, k, kind, seed++, weighted);
        }
  test_all<float>(6000, 4200, 0, seed++, false);  // more midpoints than fit in shared memory (4096)
  test_all<double>(300, 300, 0, seed++, false);
  test_all<float>(3000, 3, 2, seed++, false);     // long rows: the warp-per-node level kernel
  test_all<float>(3000, 3, 2, seed++, true);
  return h::finish("emulated kmeans1d kernels");
}
