// Native tests of the 1-D k-means core: sort, generator, initialisations, Lloyd on ranges, the
// exact dynamic program against brute force, and the edge cases with defined behaviour.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "core/kmeans1d.h"
#include "tests/check.h"

namespace km = dcx::kmeans1d;

static auto serial = [](int64_t begin, int64_t end, auto&& fn) { fn(begin, end); };

template <typename T>
static std::vector<T> random_values(int64_t n, uint64_t seed, double scale = 1.0) {
  km::SplitMix64 rng(seed);
  std::vector<T> v(n);
  for (auto& x : v) x = static_cast<T>((rng.uniform() * 2.0 - 1.0) * scale);
  return v;
}

// Sum of squared distances of each value to its nearest centroid.
template <typename T>
static double inertia(const std::vector<T>& x, const std::vector<double>& c) {
  double total = 0.0;
  for (T v : x) {
    double best = std::numeric_limits<double>::infinity();
    for (double cj : c) best = std::min(best, (v - cj) * (v - cj));
    total += best;
  }
  return total;
}

static void test_splitmix64() {
  km::SplitMix64 rng(0);
  CHECK(rng.next() == 0xe220a8397b1dcdafULL);  // the published first output for seed 0
  km::SplitMix64 r(7);
  for (int i = 0; i < 1000; ++i) {
    const double u = r.uniform();
    CHECK(u >= 0.0 && u < 1.0);
    CHECK(r.below(10) < 10);
  }
}

template <typename T>
static void test_radix_sort() {
  for (int64_t n : {0, 1, 2, 97, 4097, 100003}) {
    std::vector<T> v = random_values<T>(n, 11 + n, 1e3);
    if (n > 10) {
      v[3] = -0.0;
      v[4] = 0.0;
      v[5] = std::numeric_limits<T>::infinity();
      v[6] = -std::numeric_limits<T>::infinity();
      v[7] = std::numeric_limits<T>::denorm_min();
      v[8] = v[9];  // duplicates
    }
    std::vector<T> expected = v;
    std::sort(expected.begin(), expected.end());
    km::radix_sort(v.data(), nullptr, n);
    bool same = true;
    for (int64_t i = 0; i < n; ++i) same = same && v[i] == expected[i];
    CHECK(same);
  }
  for (int64_t n : {1, 2, 3}) {  // -0.0 becomes +0.0 at every n, a single value too (as on CUDA)
    std::vector<T> zeros(n, T(-0.0));
    km::radix_sort(zeros.data(), nullptr, n);
    for (T z : zeros) CHECK(z == T(0) && !std::signbit(z));
  }
  std::vector<T> nan = {1, std::numeric_limits<T>::quiet_NaN(), -1};
  km::radix_sort(nan.data(), nullptr, 3);
  CHECK(nan[0] == -1 && nan[1] == 1 && std::isnan(nan[2]));  // positive NaN sorts last
}

// The weights move with their values, in the stable order of equal keys (-0.0 and +0.0 one key).
template <typename T>
static void test_radix_sort_pairs() {
  for (int64_t n : {1, 2, 97, 4097, 30011}) {
    std::vector<T> v = random_values<T>(n, 5 + n, 4.0), w(n);
    for (int64_t i = 0; i < n; ++i) {
      v[i] = std::round(v[i]);  // many equal keys
      if (i % 7 == 0) v[i] = (i % 14 == 0) ? T(-0.0) : T(0.0);
      w[i] = static_cast<T>(i + 1);  // the input position
    }
    std::vector<int64_t> order(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    auto key = [&](int64_t i) { return v[i] == T(0) ? T(0) : v[i]; };
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key(a) < key(b); });
    std::vector<T> sv = v, sw = w;
    km::radix_sort(sv.data(), sw.data(), n);
    bool same = true;
    for (int64_t i = 0; i < n; ++i)
      same = same && sv[i] == key(order[i]) && !(sv[i] == T(0) && std::signbit(sv[i])) &&
             sw[i] == w[order[i]];
    CHECK(same);
  }
}

// Integer weights are repetitions: the weighted sums, the exact program and Lloyd give what the
// values repeated give; weighted density quantiles follow the weight.
static void test_weighted() {
  km::SplitMix64 rng(17);
  const int64_t n = 3000;
  std::vector<double> x(n), w(n), rep;
  for (int64_t i = 0; i < n; ++i) x[i] = (rng.uniform() * 2.0 - 1.0) * 10.0;  // no ties
  std::sort(x.begin(), x.end());
  for (int64_t i = 0; i < n; ++i) {
    w[i] = static_cast<double>(1 + rng.below(3));
    for (int r = 0; r < static_cast<int>(w[i]); ++r) rep.push_back(x[i]);
  }
  const int64_t m = static_cast<int64_t>(rep.size());
  for (bool optimal : {false, true}) {
    for (km::Init init : {km::Init::kLinear, km::Init::kDensity}) {
      const km::Fit a = km::fit_sorted(x.data(), w.data(), n, 8, init, 0, 300, 0.0, optimal, serial);
      const km::Fit b = km::fit_sorted(rep.data(), nullptr, m, 8, init, 0, 300, 0.0, optimal, serial);
      bool close = true;
      for (int64_t j = 0; j < 8; ++j)
        close = close && std::fabs(a.centroids[j] - b.centroids[j]) <= 1e-9 * (1.0 + std::fabs(b.centroids[j]));
      CHECK(close);
    }
  }
  // Weighted costs: the exact program against brute force over the repeated values' splits that
  // never cut a run of one value (a weighted value cannot be split).
  std::vector<double> S(n + 1), S2(n + 1), W(n + 1);
  const double total2 = km::prefix_sums(x.data(), w.data(), n, x[n / 2], S.data(), S2.data(), W.data());
  CHECK(W[n] == std::accumulate(w.begin(), w.end(), 0.0) && total2 == S2[n]);
  const auto b = km::optimal_boundaries(S.data(), S2.data(), W.data(), 40, 3, serial);
  double cost = 0.0;
  for (int64_t j = 0; j < 3; ++j) cost += km::segment_cost(S.data(), S2.data(), W.data(), b[j], b[j + 1] - 1);
  double best = std::numeric_limits<double>::infinity();
  for (int64_t c1 = 1; c1 < 39; ++c1)
    for (int64_t c2 = c1 + 1; c2 < 40; ++c2) {
      const int64_t cuts[4] = {0, c1, c2, 40};
      double total = 0.0;
      for (int j = 0; j < 3; ++j) {
        double sw = 0.0, sx = 0.0;
        for (int64_t i = cuts[j]; i < cuts[j + 1]; ++i) sw += w[i], sx += w[i] * x[i];
        for (int64_t i = cuts[j]; i < cuts[j + 1]; ++i) total += w[i] * (x[i] - sx / sw) * (x[i] - sx / sw);
      }
      best = std::min(best, total);
    }
  CHECK(std::fabs(cost - best) <= 1e-9 * (1.0 + best));
  // Weighted quantiles: all the weight on the last value puts every density centroid there.
  std::vector<double> heavy(n, 1e-6);
  heavy[n - 1] = 1e6;
  std::vector<double> HS(n + 1), HW(n + 1);
  km::prefix_sums(x.data(), heavy.data(), n, 0.0, HS.data(), nullptr, HW.data());
  for (int64_t i : km::init_indices(km::Init::kDensity, n, 4, 0, HW.data())) CHECK(i == n - 1);
  // k-means++ draws only values that carry weight.
  std::vector<double> HS2(n + 1);
  km::prefix_sums(x.data(), heavy.data(), n, 0.0, HS.data(), HS2.data(), HW.data());
  const auto pp = km::init_plusplus(x.data(), n, HS.data(), HS2.data(), HW.data(), 0.0, 2, 3);
  CHECK(pp.size() == 2 && (pp[0] == x[n - 1] || pp[1] == x[n - 1]));
}

static void test_init_indices() {
  const auto r = km::init_indices(km::Init::kRandom, 1000, 50, 3);
  CHECK(r.size() == 50);
  CHECK(std::adjacent_find(r.begin(), r.end()) == r.end());  // distinct
  CHECK(std::is_sorted(r.begin(), r.end()) && r.front() >= 0 && r.back() < 1000);
  CHECK(km::init_indices(km::Init::kRandom, 1000, 50, 3) == r);  // same seed, same picks
  CHECK(km::init_indices(km::Init::kRandom, 1000, 50, 4) != r);
  const auto all = km::init_indices(km::Init::kRandom, 5, 5, 9);
  CHECK((all == std::vector<int64_t>{0, 1, 2, 3, 4}));
  const auto d = km::init_indices(km::Init::kDensity, 100, 4, 0);
  CHECK((d == std::vector<int64_t>{12, 37, 62, 87}));
  const auto lin = km::init_linear(-1.0, 2.0, 4);
  CHECK(lin[0] == -1.0 && lin[1] == 0.0 && lin[2] == 1.0 && lin[3] == 2.0);
}

static void test_plusplus() {
  std::vector<float> x = random_values<float>(5000, 5);
  std::sort(x.begin(), x.end());
  const double shift = x[2500];
  std::vector<double> S(x.size() + 1), S2(x.size() + 1);
  km::prefix_sums(x.data(), nullptr, 5000, shift, S.data(), S2.data(), nullptr);
  const auto c = km::init_plusplus(x.data(), 5000, S.data(), S2.data(), nullptr, shift, 16, 1);
  CHECK(c.size() == 16 && std::is_sorted(c.begin(), c.end()));
  CHECK(std::adjacent_find(c.begin(), c.end()) == c.end());  // D^2 sampling never repeats
  for (double v : c) CHECK(std::binary_search(x.begin(), x.end(), static_cast<float>(v)));
  CHECK(km::init_plusplus(x.data(), 5000, S.data(), S2.data(), nullptr, shift, 16, 1) == c);
}

// Every partition of sorted x into k non-empty contiguous ranges: the minimum cost.
static double brute_force(const std::vector<double>& x, int64_t k) {
  const int64_t n = static_cast<int64_t>(x.size());
  double best = std::numeric_limits<double>::infinity();
  std::vector<int64_t> cut(k + 1);
  std::function<void(int64_t, int64_t)> rec = [&](int64_t m, int64_t start) {
    if (m == k - 1) {
      cut[k - 1] = start;
      cut[k] = n;
      double total = 0.0;
      for (int64_t j = 0; j < k; ++j) {
        double mean = 0.0;
        for (int64_t i = cut[j]; i < cut[j + 1]; ++i) mean += x[i];
        mean /= (cut[j + 1] - cut[j]);
        for (int64_t i = cut[j]; i < cut[j + 1]; ++i) total += (x[i] - mean) * (x[i] - mean);
      }
      best = std::min(best, total);
      return;
    }
    cut[m] = start;
    for (int64_t next = start + 1; next <= n - (k - 1 - m); ++next) rec(m + 1, next);
  };
  rec(0, 0);
  return best;
}

static void test_optimal_brute_force() {
  int cases = 0;
  for (uint64_t seed = 0; seed < 40; ++seed) {
    km::SplitMix64 rng(seed);
    const int64_t n = 2 + static_cast<int64_t>(rng.below(9));
    std::vector<double> x(n);
    for (auto& v : x) v = std::round(rng.uniform() * 20.0) / 4.0;  // ties on purpose
    std::sort(x.begin(), x.end());
    for (int64_t k = 1; k <= std::min<int64_t>(n, 5); ++k) {
      std::vector<double> S(n + 1), S2(n + 1);
      km::prefix_sums(x.data(), nullptr, n, x[n / 2], S.data(), S2.data(), nullptr);
      const auto b = km::optimal_boundaries(S.data(), S2.data(), nullptr, n, k, serial);
      double cost = 0.0;
      for (int64_t j = 0; j < k; ++j) cost += km::segment_cost(S.data(), S2.data(), nullptr, b[j], b[j + 1] - 1);
      const double expected = brute_force(x, k);
      CHECK(std::fabs(cost - expected) <= 1e-9 * (1.0 + expected));
      ++cases;
    }
  }
  CHECK(cases > 100);
}

static void test_fit_lloyd_and_optimal() {
  std::vector<float> x = random_values<float>(20000, 21);
  for (auto& v : x) v = v * v * v;  // skewed: linear init leaves clusters empty
  std::sort(x.begin(), x.end());
  for (km::Init init : {km::Init::kLinear, km::Init::kDensity, km::Init::kRandom, km::Init::kPlusPlus}) {
    const km::Fit fit = km::fit_sorted(x.data(), nullptr, 20000, 16, init, 3, 300, 0.0, false, serial);
    CHECK(fit.centroids.size() == 16 && fit.lloyd.converged);
    CHECK(std::adjacent_find(fit.centroids.begin(), fit.centroids.end()) == fit.centroids.end());
    const km::Fit opt = km::fit_sorted(x.data(), nullptr, 20000, 16, init, 3, 300, 0.0, true, serial);
    CHECK(inertia(x, opt.centroids) <= inertia(x, fit.centroids) * (1.0 + 1e-9));
    CHECK(opt.lloyd.iterations <= 1);  // the exact partition is already a fixed point
  }
}

static void test_two_groups() {
  std::vector<double> x = {1.0, 1.5, 2.0, 10.0, 11.0, 12.0};
  const km::Fit fit = km::fit_sorted(x.data(), nullptr, 6, 2, km::Init::kLinear, 0, 100, 0.0, false, serial);
  CHECK(fit.centroids[0] == 1.5 && fit.centroids[1] == 11.0);
}

static void test_edge_cases() {
  const km::Fit empty = km::fit_sorted<float>(nullptr, nullptr, 0, 4, km::Init::kLinear, 0, 10, 0.0, false, serial);
  CHECK((empty.centroids == std::vector<double>{0, 0, 0, 0}));
  const std::vector<float> one = {2.5f};
  const km::Fit single = km::fit_sorted(one.data(), nullptr, 1, 3, km::Init::kLinear, 0, 10, 0.0, false, serial);
  CHECK((single.centroids == std::vector<double>{2.5, 2.5, 2.5}));
  const std::vector<float> equal(100, -1.0f);
  const km::Fit same = km::fit_sorted(equal.data(), nullptr, 100, 2, km::Init::kRandom, 0, 10, 0.0, true, serial);
  CHECK((same.centroids == std::vector<double>{-1.0, -1.0}));
  const std::vector<float> few = {0, 0, 1, 1, 1, 5};  // 3 distinct values, 4 clusters
  const km::Fit f = km::fit_sorted(few.data(), nullptr, 6, 4, km::Init::kLinear, 0, 10, 0.0, false, serial);
  CHECK((f.centroids == std::vector<double>{0, 1, 5, 5}));
  const std::vector<float> two = {1, 2, 3, 10};
  const km::Fit mean = km::fit_sorted(two.data(), nullptr, 4, 1, km::Init::kLinear, 0, 10, 0.0, false, serial);
  CHECK(mean.centroids.size() == 1 && mean.centroids[0] == 4.0);
  // An outlier: linear init puts centroids where no value is; relocation fills them.
  std::vector<float> tail(1000);
  for (int i = 0; i < 999; ++i) tail[i] = static_cast<float>(i) / 999.0f;
  tail[999] = 1000.0f;
  const km::Fit t = km::fit_sorted(tail.data(), nullptr, 1000, 8, km::Init::kLinear, 0, 300, 0.0, false, serial);
  std::vector<double> mid(7);
  km::midpoints(t.centroids.data(), 8, mid.data());
  std::vector<int64_t> count(8, 0);
  for (float v : tail) ++count[km::label_of(v, mid.data(), 7)];
  CHECK(std::count(count.begin(), count.end(), 0) == 0);  // no empty cluster left
}

static void test_labels() {
  const std::vector<double> c = {0.0, 1.0, 1.0, 3.0};
  std::vector<double> mid(3);
  km::midpoints(c.data(), 4, mid.data());
  CHECK(km::label_of(0.5, mid.data(), 3) == 0);  // a tie goes to the lower cluster
  CHECK(km::label_of(0.6, mid.data(), 3) == 1);
  CHECK(km::label_of(1.0, mid.data(), 3) == 1);  // duplicate centroids: the first one
  CHECK(km::label_of(2.0, mid.data(), 3) == 2);
  CHECK(km::label_of(2.1, mid.data(), 3) == 3);
  const std::vector<float> x = {-1, 0, 0.5f, 0.5f, 2, 7};
  CHECK(km::count_le(x.data(), 6, 0.5) == 4 && km::count_le(x.data(), 6, -2.0) == 0);
  // Galloping from any hint finds what the plain search finds.
  std::vector<float> v = random_values<float>(1000, 3);
  for (int i = 0; i < 100; ++i) v[i] = v[i + 1];  // runs of equal values
  std::sort(v.begin(), v.end());
  bool same = true;
  for (double t : {-2.0, -0.5, static_cast<double>(v[0]), static_cast<double>(v[500]), 0.3, 2.0})
    for (int64_t hint : {-5, 0, 1, 17, 499, 500, 998, 999, 1000, 2000})
      same = same && km::count_le_near(v.data(), 1000, t, hint) == km::count_le(v.data(), 1000, t);
  CHECK(same);
  CHECK(km::count_le_near(v.data(), 0, 1.0, 0) == 0);
}

int main() {
  test_splitmix64();
  test_radix_sort<float>();
  test_radix_sort<double>();
  test_radix_sort_pairs<float>();
  test_radix_sort_pairs<double>();
  test_weighted();
  test_init_indices();
  test_plusplus();
  test_optimal_brute_force();
  test_fit_lloyd_and_optimal();
  test_two_groups();
  test_edge_cases();
  test_labels();
  return dcx_test::finish("test_kmeans1d");
}
