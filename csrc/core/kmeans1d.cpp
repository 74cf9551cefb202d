// Host parts of 1-D k-means (see kmeans1d.h): sort, prefix sums, distinct values, initialisations.
#include "core/kmeans1d.h"

#include <cstring>
#include <unordered_set>

namespace dcx {
namespace kmeans1d {
namespace {

template <typename T> struct Bits;
template <> struct Bits<float> { using U = uint32_t; static constexpr int kDigit = 11; };
template <> struct Bits<double> { using U = uint64_t; static constexpr int kDigit = 16; };

// Order-preserving map of IEEE bits to unsigned integers: flip all bits of negatives, only the
// sign bit of the rest.
template <typename U>
inline U to_key(U u) {
  constexpr U sign = U(1) << (sizeof(U) * 8 - 1);
  return (u & sign) ? ~u : (u | sign);
}
template <typename U>
inline U from_key(U u) {
  constexpr U sign = U(1) << (sizeof(U) * 8 - 1);
  return (u & sign) ? (u & ~sign) : ~u;
}

}  // namespace

template <typename T>
void radix_sort(T* data, WeightOf<T>* payload, int64_t n) {
  using U = typename Bits<T>::U;
  constexpr int kDigit = Bits<T>::kDigit;
  constexpr int kBuckets = 1 << kDigit;
  constexpr int kBits = sizeof(U) * 8;
  static_assert(sizeof(U) == sizeof(T), "key and value sizes differ");
  // -0.0 becomes +0.0 first: one key for both zeros, so their weights keep their input order.
  for (int64_t i = 0; i < n; ++i) data[i] = data[i] == T(0) ? T(0) : data[i];
  if (n <= 1) return;
  // The keys live in the value buffers themselves (same size), copied in and out with memcpy.
  std::vector<U> a(n), b(n);
  std::vector<T> pa, pb;
  if (payload != nullptr) pa.assign(payload, payload + n), pb.resize(n);
  std::memcpy(a.data(), data, sizeof(T) * n);
  for (int64_t i = 0; i < n; ++i) a[i] = to_key(a[i]);
  // All digit histograms in one read of the keys, then one scatter pass per digit.
  constexpr int kPasses = (kBits + kDigit - 1) / kDigit;
  std::vector<int64_t> count(static_cast<size_t>(kPasses) * kBuckets, 0);
  for (int64_t i = 0; i < n; ++i)
    for (int p = 0; p < kPasses; ++p) ++count[p * kBuckets + ((a[i] >> (p * kDigit)) & (kBuckets - 1))];
  for (int p = 0; p < kPasses; ++p) {
    const int shift = p * kDigit;
    int64_t* cnt = count.data() + p * kBuckets;
    if (cnt[(a[0] >> shift) & (kBuckets - 1)] == n) continue;  // one bucket: nothing to move
    int64_t sum = 0;
    for (int d = 0; d < kBuckets; ++d) {
      const int64_t c = cnt[d];
      cnt[d] = sum;
      sum += c;
    }
    if (payload != nullptr) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t to = cnt[(a[i] >> shift) & (kBuckets - 1)]++;
        b[to] = a[i];
        pb[to] = pa[i];
      }
      pa.swap(pb);
    } else {
      for (int64_t i = 0; i < n; ++i) b[cnt[(a[i] >> shift) & (kBuckets - 1)]++] = a[i];
    }
    a.swap(b);
  }
  for (int64_t i = 0; i < n; ++i) a[i] = from_key(a[i]);
  std::memcpy(data, a.data(), sizeof(T) * n);
  if (payload != nullptr) std::memcpy(payload, pa.data(), sizeof(T) * n);
}

// The tiled order of kmeans1d.h, each product and sum rounded on its own: the compiler must not
// fuse d * d into the addition (the CUDA kernels use __dmul_rn / __dadd_rn for the same reason).
template <typename T>
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
double prefix_sums(const T* x, const WeightOf<T>* w, int64_t n, double shift, double* S,
                   double* S2, double* W) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  S[0] = 0.0;
  if (S2 != nullptr) S2[0] = 0.0;
  if (W != nullptr) W[0] = 0.0;
  double offset = 0.0, offset2 = 0.0, offsetw = 0.0, last2 = 0.0;
  for (int64_t t0 = 0; t0 < n; t0 += kScanTile) {
    const int64_t t1 = std::min(n, t0 + kScanTile);
    double total = 0.0, total2 = 0.0, totalw = 0.0, run = offset, run2 = offset2, runw = offsetw;
    for (int64_t i = t0; i < t1; ++i) {
      const double d = static_cast<double>(x[i]) - shift;
      const double wi = w != nullptr ? static_cast<double>(w[i]) : 1.0;
      const double wd = w != nullptr ? wi * d : d;
      const double d2 = wd * d;
      total += wd;
      total2 += d2;
      totalw += wi;
      run += wd;
      run2 += d2;
      runw += wi;
      S[i + 1] = run;
      if (S2 != nullptr) S2[i + 1] = run2;
      if (W != nullptr) W[i + 1] = runw;
    }
    offset += total;
    offset2 += total2;
    offsetw += totalw;
    last2 = run2;
  }
  return last2;
}

template <typename T>
int64_t distinct_values(const T* x, int64_t n, int64_t limit, std::vector<double>* out) {
  out->clear();
  int64_t count = 0;
  for (int64_t i = 0; i < n && count <= limit; ++i) {
    if (i > 0 && x[i] == x[i - 1]) continue;
    if (count < limit) out->push_back(static_cast<double>(x[i]));
    ++count;
  }
  return count;
}

std::vector<int64_t> init_indices(Init init, int64_t n, int64_t k, uint64_t seed,
                                  const double* W) {
  std::vector<int64_t> idx;
  idx.reserve(k);
  if (init == Init::kDensity && W != nullptr) {
    for (int64_t j = 0; j < k; ++j)
      idx.push_back(weight_position(W, n, (static_cast<double>(j) + 0.5) / k * W[n]));
    return idx;
  }
  if (init == Init::kDensity) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = static_cast<int64_t>((static_cast<double>(j) + 0.5) * n / k);
      idx.push_back(std::min(i, n - 1));
    }
    return idx;
  }
  // Floyd's algorithm: k distinct positions of [0, n) with k draws, no O(n) memory.
  SplitMix64 rng(seed);
  std::unordered_set<int64_t> chosen;
  const int64_t take = std::min(k, n);
  for (int64_t r = n - take; r < n; ++r) {
    const int64_t t = static_cast<int64_t>(rng.below(static_cast<uint64_t>(r + 1)));
    const int64_t pick = chosen.count(t) ? r : t;
    chosen.insert(pick);
    idx.push_back(pick);
  }
  std::sort(idx.begin(), idx.end());
  return idx;
}

std::vector<double> init_linear(double lo, double hi, int64_t k) {
  std::vector<double> c(k);
  if (k == 1) {
    c[0] = 0.5 * lo + 0.5 * hi;
    return c;
  }
  for (int64_t j = 0; j < k; ++j) c[j] = lo + (hi - lo) * (static_cast<double>(j) / (k - 1));
  c[k - 1] = hi;
  return c;
}

template <typename T>
std::vector<double> init_plusplus(const T* x, int64_t n, const double* S, const double* S2,
                                  const double* W, double shift, int64_t k, uint64_t seed) {
  SplitMix64 rng(seed);
  const int64_t first = W != nullptr ? weight_position(W, n, rng.uniform() * W[n])
                                     : static_cast<int64_t>(rng.below(static_cast<uint64_t>(n)));
  std::vector<double> c{static_cast<double>(x[first])};
  std::vector<double> mid, mass;
  // Weighted squared distances of x[b..i] to centroid v (shifted sums; clamped against
  // cancellation).
  auto range_mass = [&](int64_t b, int64_t e, double v) {
    const double d = v - shift, cnt = range_weight(W, b, e);
    const double m = (S2[e] - S2[b]) - 2.0 * d * (S[e] - S[b]) + d * d * cnt;
    return m > 0.0 ? m : 0.0;
  };
  while (static_cast<int64_t>(c.size()) < k) {
    const int64_t kk = static_cast<int64_t>(c.size());
    mid.assign(kk > 1 ? kk - 1 : 1, 0.0);
    midpoints(c.data(), kk, mid.data());
    std::vector<int64_t> bound(kk + 1);
    bound[0] = 0;
    bound[kk] = n;
    for (int64_t j = 1; j < kk; ++j) bound[j] = std::max(bound[j - 1], count_le(x, n, mid[j - 1]));
    mass.assign(kk, 0.0);
    double total = 0.0;
    for (int64_t j = 0; j < kk; ++j) total += mass[j] = range_mass(bound[j], bound[j + 1], c[j]);
    if (!(total > 0.0)) break;  // every value is a centroid already
    double r = rng.uniform() * total;
    int64_t j = 0;
    while (j < kk - 1 && (r >= mass[j] || mass[j] == 0.0)) r -= mass[j++];
    // Smallest i in the range whose cumulative mass from the range start exceeds r.
    int64_t lo = bound[j], hi = bound[j + 1] - 1;
    while (lo < hi) {
      const int64_t m = lo + (hi - lo) / 2;
      if (range_mass(bound[j], m + 1, c[j]) > r) hi = m;
      else lo = m + 1;
    }
    const double v = static_cast<double>(x[lo]);
    c.insert(std::upper_bound(c.begin(), c.end(), v), v);
  }
  while (static_cast<int64_t>(c.size()) < k) c.push_back(c.back());  // relocated by Lloyd
  return c;
}

#define DCX_KMEANS1D_INSTANTIATE(T)                                                          \
  template void radix_sort<T>(T*, T*, int64_t);                                               \
  template double prefix_sums<T>(const T*, const T*, int64_t, double, double*, double*,      \
                                 double*);                                                   \
  template int64_t distinct_values<T>(const T*, int64_t, int64_t, std::vector<double>*);     \
  template std::vector<double> init_plusplus<T>(const T*, int64_t, const double*,            \
                                                const double*, const double*, double, int64_t, \
                                                uint64_t);
DCX_KMEANS1D_INSTANTIATE(float)
DCX_KMEANS1D_INSTANTIATE(double)
#undef DCX_KMEANS1D_INSTANTIATE

}  // namespace kmeans1d
}  // namespace dcx
