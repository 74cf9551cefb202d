// 1-D k-means on sorted data, torch-free, shared by the CPU and CUDA kernels and native tests.
//
// Sorted values make 1-D k-means cheap: with sorted centroids each cluster is the contiguous
// range of values between the midpoints of its neighbours, so with prefix sums of the values (and
// their squares) a Lloyd iteration is k binary searches, O(k log n), after one O(n log n) sort;
// no n x k distance matrix. The same prefix sums give the cost of any contiguous cluster in O(1),
// which the exact dynamic program (Wang & Song's Ckmeans.1d.dp recurrence) needs.
//
// Conventions: centroids are kept in double, in the values' own coordinates and ascending.
// Prefix sums are of the shifted values x - shift (shift: the median) so that cluster sums of
// squares lose little to cancellation. Weighted k-means (each value x with a weight w > 0, the
// objective sum w (x - c)^2, a centroid the weighted mean of its cluster) sorts the weights with
// the values and sums w (x - shift), w (x - shift)^2 and w; W, the prefix sums of the weights, is
// null when every weight is 1 (a range's weight is then its count), so the unweighted op does
// the same arithmetic it always did. A value x belongs to the cluster j with
// mid[j-1] < x <= mid[j], mid[j] = (c[j] + c[j+1]) / 2: on a tie the lower cluster wins, and a run
// of equal values never straddles two clusters.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "core/common.h"

namespace dcx {
namespace kmeans1d {

enum class Init : int { kLinear = 0, kDensity = 1, kRandom = 2, kPlusPlus = 3 };

// The weights' type follows the values' (not deduced from it, so nullptr passes for none).
template <typename T>
using WeightOf = typename std::enable_if<true, T>::type;

// splitmix64 (Steele, Lea, Flood 2014): a tiny seeded generator that gives the same stream on
// every platform, so CPU and CUDA pick the same initial centroids for the same seed.
struct SplitMix64 {
  uint64_t state;
  explicit SplitMix64(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  uint64_t below(uint64_t bound) {  // [0, bound), Lemire's multiply-shift (bias < bound / 2^64)
    return static_cast<uint64_t>((static_cast<unsigned __int128>(next()) * bound) >> 64);
  }
};

// Statistics of one cluster: its range [begin, end) of the sorted values, the (weighted) sums of
// the shifted values and of their squares over it, its weight (the count when unweighted), and
// its first and last value (unshifted).
struct ClusterStats {
  int64_t begin, end;
  double sum, sumsq, weight;
  double lo, hi;
};

// Weight of the sorted values [b, e): from W's prefix sums, or the count when W is null.
DCX_HOST_DEVICE double range_weight(const double* W, int64_t b, int64_t e) {
  return W != nullptr ? W[e] - W[b] : static_cast<double>(e - b);
}

// Number of sorted values <= t (std::upper_bound), as a host/device function for the kernels.
template <typename T>
DCX_HOST_DEVICE int64_t count_le(const T* x, int64_t n, double t) {
  int64_t lo = 0, len = n;
  while (len > 0) {
    const int64_t half = len >> 1;
    if (static_cast<double>(x[lo + half]) <= t) {
      lo += half + 1;
      len -= half + 1;
    } else {
      len = half;
    }
  }
  return lo;
}

// The cluster of value v: the number of midpoints strictly below it. Branch-free (the trip count
// depends on num_mid only, the step is a conditional move), as it runs once per weight.
DCX_HOST_DEVICE int64_t label_of(double v, const double* mid, int64_t num_mid) {
  int64_t lo = 0, len = num_mid;
  while (len > 1) {  // the answer lies in [lo, lo + len]
    const int64_t half = len >> 1;
    lo = mid[lo + half - 1] < v ? lo + half : lo;
    len -= half;
  }
  return lo + ((len == 1 && mid[lo] < v) ? 1 : 0);
}

// Stats of cluster j, bounded by mid[j-1] and mid[j]; S, S2 (may be null) and W (null:
// unweighted) have n + 1 entries (S[0] = 0).
template <typename T>
DCX_HOST_DEVICE ClusterStats cluster_stats_one(const T* x, int64_t n, const double* S,
                                               const double* S2, const double* W,
                                               const double* mid, int64_t k, int64_t j) {
  ClusterStats s;
  s.begin = j == 0 ? 0 : count_le(x, n, mid[j - 1]);
  s.end = j == k - 1 ? n : count_le(x, n, mid[j]);
  if (s.end < s.begin) s.end = s.begin;  // equal midpoints (duplicate centroids)
  s.sum = S[s.end] - S[s.begin];
  s.sumsq = S2 != nullptr ? S2[s.end] - S2[s.begin] : 0.0;
  s.weight = range_weight(W, s.begin, s.end);
  s.lo = s.end > s.begin ? static_cast<double>(x[s.begin]) : 0.0;
  s.hi = s.end > s.begin ? static_cast<double>(x[s.end - 1]) : 0.0;
  return s;
}

// count_le(x, n, t) found by galloping from `hint` (the boundary of the previous iteration, which
// moves little): O(log distance) reads near the hint instead of log n reads across the array.
template <typename T>
int64_t count_le_near(const T* x, int64_t n, double t, int64_t hint) {
  hint = std::min(std::max<int64_t>(hint, 0), n);
  int64_t lo, hi;  // the answer lies in [lo, hi]
  if (hint < n && static_cast<double>(x[hint]) <= t) {
    lo = hint + 1;
    int64_t step = 1;
    while (lo + step - 1 < n && static_cast<double>(x[lo + step - 1]) <= t) lo += step, step *= 2;
    hi = std::min(n, lo + step - 1);
  } else {
    hi = hint;
    int64_t step = 1;
    while (hi - step >= 0 && !(static_cast<double>(x[hi - step]) <= t)) hi -= step, step *= 2;
    lo = std::max<int64_t>(0, hi - step + 1);
  }
  return lo + count_le(x + lo, hi - lo, t);
}

// (Weighted) sum of squared deviations from their mean of the sorted values x[j..i]
// (inclusive), from the prefix sums: the cost of one cluster in the dynamic program.
DCX_HOST_DEVICE double segment_cost(const double* S, const double* S2, const double* W, int64_t j,
                                    int64_t i) {
  const double w = range_weight(W, j, i + 1);
  if (!(w > 0.0)) return 0.0;  // weights too small to register against the running sum
  const double s = S[i + 1] - S[j];
  const double c = (S2[i + 1] - S2[j]) - s * s / w;
  return c > 0.0 ? c : 0.0;
}

// One node of the divide-and-conquer row of the dynamic program. Row m (m >= 1 clusters before
// the last) computes, for i in [row_lo, row_hi],
//   D[i] = min_{j in [m, i]} Dprev[j - 1] + cost(j, i),  J[i] = the smallest minimising j,
// and the minimising j is monotone in i. The nodes form a fixed binary tree over [row_lo, row_hi]
// (node t of level l: follow the bits of t from the root, halving at mid = (a + b) / 2), so the
// bounds on j of a node come from J at its neighbours a - 1 and b + 1, which are mids of its
// ancestors, computed at earlier levels. Every level is parallel over its nodes.
DCX_HOST_DEVICE bool dp_node_range(int64_t row_lo, int64_t row_hi, int level, int64_t t,
                                   int64_t* a_out, int64_t* b_out) {
  int64_t a = row_lo, b = row_hi;
  for (int d = level - 1; d >= 0; --d) {
    if (a > b) return false;
    const int64_t mid = a + ((b - a) >> 1);
    if ((t >> d) & 1) a = mid + 1;
    else b = mid - 1;
  }
  *a_out = a;
  *b_out = b;
  return a <= b;
}

// Candidates [jlo, jhi] for node [a, b] of row m (jhi also capped by the node's mid).
DCX_HOST_DEVICE void dp_node_bounds(int64_t m, int64_t row_lo, int64_t row_hi, int64_t a,
                                    int64_t b, const int32_t* J, int64_t* jlo, int64_t* jhi) {
  const int64_t mid = a + ((b - a) >> 1);
  *jlo = a > row_lo ? static_cast<int64_t>(J[a - 1]) : m;
  const int64_t up = b < row_hi ? static_cast<int64_t>(J[b + 1]) : mid;
  *jhi = up < mid ? up : mid;
}

// Lloyd's iterations over cluster ranges. compute_stats(mid, stats) fills the k ClusterStats for
// the midpoints mid[0..k-2]; it is where the device does its work (CPU: binary searches in
// memory; CUDA: one small kernel and two small copies). The rest is O(k) host work shared by
// both devices, so they take the same decisions.
struct LloydResult {
  int64_t iterations = 0;
  bool converged = false;
};

inline void midpoints(const double* c, int64_t k, double* mid) {
  for (int64_t j = 0; j + 1 < k; ++j) mid[j] = 0.5 * c[j] + 0.5 * c[j + 1];
}

// Empty clusters take the value farthest from its centroid (sklearn's rule), found among the
// first and last values of the non-empty clusters; ties go to the lower cluster and to its first
// value. Repeated until no cluster is empty or no value lies off its centroid.
template <class StatsFn>
void relocate_empty(StatsFn& compute_stats, double* c, int64_t k, std::vector<double>& mid,
                    std::vector<ClusterStats>& stats) {
  for (int64_t round = 0; round < k; ++round) {
    int64_t empty = -1;
    for (int64_t j = 0; j < k && empty < 0; ++j)
      if (stats[j].end == stats[j].begin) empty = j;
    if (empty < 0) return;
    double best = 0.0, value = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      const ClusterStats& s = stats[j];
      if (s.end == s.begin) continue;
      const double d_lo = std::fabs(s.lo - c[j]), d_hi = std::fabs(s.hi - c[j]);
      if (d_lo > best) best = d_lo, value = s.lo;
      if (d_hi > best) best = d_hi, value = s.hi;
    }
    if (!(best > 0.0)) return;  // every value sits on its centroid: nothing left to split
    c[empty] = value;
    std::sort(c, c + k);
    midpoints(c, k, mid.data());
    compute_stats(mid.data(), stats.data());
  }
}

// c: k initial centroids, ascending; on return the final centroids (the means of the last ranges).
// tol: stop when the squared centroid shift summed over clusters is <= tol (sklearn's rule with
// tol already scaled by the variance); also stops at a fixed point (no range changed).
template <class StatsFn>
LloydResult lloyd(StatsFn&& compute_stats, double* c, int64_t k, double shift, int64_t max_iter,
                  double tol) {
  LloydResult result;
  std::vector<double> mid(k > 1 ? k - 1 : 1);
  std::vector<ClusterStats> stats(k);
  std::vector<int64_t> prev_begin(k, -1), prev_end(k, -1);
  for (int64_t it = 0; it < max_iter; ++it) {
    midpoints(c, k, mid.data());
    compute_stats(mid.data(), stats.data());
    relocate_empty(compute_stats, c, k, mid, stats);
    bool same = true;
    for (int64_t j = 0; j < k; ++j) {
      same = same && stats[j].begin == prev_begin[j] && stats[j].end == prev_end[j];
      prev_begin[j] = stats[j].begin;
      prev_end[j] = stats[j].end;
    }
    if (same) {  // the means of these ranges are the centroids already
      result.converged = true;
      break;
    }
    double moved = 0.0;
    for (int64_t j = 0; j < k; ++j) {
      const ClusterStats& s = stats[j];
      if (!(s.weight > 0.0)) continue;  // still empty: keeps its place
      const double mean = shift + s.sum / s.weight;
      moved += (mean - c[j]) * (mean - c[j]);
      c[j] = mean;
    }
    std::sort(c, c + k);  // a no-op but for clusters left empty
    result.iterations = it + 1;
    if (moved <= tol) {
      result.converged = true;
      break;
    }
  }
  return result;
}

// ---- host functions (kmeans1d.cpp), for float and double values ----

// Sorts n values ascending (stable LSD radix sort on the order-preserving bit pattern; NaN with
// the sign bit set first and without it last), -0.0 read and written as +0.0 (as CUB's sort does
// on CUDA), so both devices hold the same sorted values bit for bit. payload (may be null): n
// values moved with their keys (the weights), in the same order as CUB's SortPairs leaves them.
template <typename T>
void radix_sort(T* data, WeightOf<T>* payload, int64_t n);

// Prefix sums in one fixed order, the same on every device (the CUDA op runs these steps in its
// kernels): the values are cut into tiles of kScanTile; a tile's total is summed from zero in
// order; the tiles' offsets are the running sum of the totals in order; inside a tile the running
// sum starts from the tile's offset. Every operation is one IEEE double rounding (no fused
// multiply-add), so the CPU and CUDA sums agree bit for bit, and the decisions made from them.
// With d = x[j] - shift and weights w (null: all 1), S[i + 1] is the sum of w d over j <= i,
// S2 of (w d) d, W of w; n + 1 entries each, [0] = 0. S2 may be null (Lloyd needs only S); W
// must be given with w. Returns the total of the squares (S2[n], also when S2 is null).
constexpr int64_t kScanTile = 2048;
template <typename T>
double prefix_sums(const T* x, const WeightOf<T>* w, int64_t n, double shift, double* S,
                   double* S2, double* W);

// Distinct values of sorted x, up to `limit` of them (returns how many there are, capped at
// limit + 1).
template <typename T>
int64_t distinct_values(const T* x, int64_t n, int64_t limit, std::vector<double>* out);

// Indices into the sorted values of the initial centroids for density (quantiles (j + 1/2) / k,
// of the weight when W is given) and random (Forgy: k distinct positions, by Floyd's sampling
// with splitmix64, uniform whatever the weights: Lloyd weighs them), ascending.
std::vector<int64_t> init_indices(Init init, int64_t n, int64_t k, uint64_t seed,
                                  const double* W = nullptr);

// The position i of the sorted values whose weight interval [W[i], W[i + 1]) holds t (the last
// value for t past the total): a weighted quantile.
DCX_HOST_DEVICE int64_t weight_position(const double* W, int64_t n, double t) {
  const int64_t i = count_le(W + 1, n, t);
  return i < n ? i : n - 1;
}

// Linear initialisation: k values evenly spaced from lo to hi, both included.
std::vector<double> init_linear(double lo, double hi, int64_t k);

// k-means++ (Arthur & Vassilvitskii 2007) on sorted x with its prefix sums: each next centroid is
// a value drawn with probability proportional to its (weighted) squared distance to the nearest
// chosen one, found by sampling a cluster range and then bisecting its cumulative mass; the first
// one in proportion to its weight; O(k^2 log n). W: null when unweighted.
template <typename T>
std::vector<double> init_plusplus(const T* x, int64_t n, const double* S, const double* S2,
                                  const double* W, double shift, int64_t k, uint64_t seed);

// Boundaries b[0..k] (b[0] = 0, b[k] = n) of the globally optimal partition of sorted x into k
// clusters, by the dynamic program with divide-and-conquer rows: O(k n log n) time, k n int32
// back-pointers. parallel(begin, end, fn) runs fn(lo, hi) over [begin, end), in parallel or not.
// Needs n >= k. W: null when unweighted.
template <typename ParallelFor>
std::vector<int64_t> optimal_boundaries(const double* S, const double* S2, const double* W,
                                        int64_t n, int64_t k, ParallelFor&& parallel) {
  std::vector<int64_t> b(k + 1, 0);
  b[k] = n;
  if (k <= 1 || n < k) return b;
  std::vector<double> prev(n), cur(n);
  std::vector<int32_t> J(static_cast<size_t>(k - 1) * n);  // rows 1..k-1
  parallel(0, n, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) prev[i] = segment_cost(S, S2, W, 0, i);
  });
  for (int64_t m = 1; m < k; ++m) {
    // Row m is needed only where k - 1 - m clusters still fit after it.
    const int64_t row_lo = m, row_hi = n - k + m, len = row_hi - row_lo + 1;
    int32_t* Jm = J.data() + static_cast<size_t>(m - 1) * n;
    for (int level = 0; (int64_t(1) << level) <= len; ++level) {
      parallel(0, int64_t(1) << level, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          int64_t a, bb, jlo, jhi;
          if (!dp_node_range(row_lo, row_hi, level, t, &a, &bb)) continue;
          dp_node_bounds(m, row_lo, row_hi, a, bb, Jm, &jlo, &jhi);
          const int64_t mid = a + ((bb - a) >> 1);
          double best = prev[jlo - 1] + segment_cost(S, S2, W, jlo, mid);
          int64_t arg = jlo;
          for (int64_t j = jlo + 1; j <= jhi; ++j) {
            const double v = prev[j - 1] + segment_cost(S, S2, W, j, mid);
            if (v < best) best = v, arg = j;
          }
          cur[mid] = best;
          Jm[mid] = static_cast<int32_t>(arg);
        }
      });
    }
    std::swap(prev, cur);
  }
  int64_t i = n - 1;
  for (int64_t m = k - 1; m >= 1; --m) {
    const int64_t j = J[static_cast<size_t>(m - 1) * n + i];
    b[m] = j;
    i = j - 1;
  }
  return b;
}

// The whole fit on the host, from sorted values (and their weights w, sorted with them; null:
// unweighted): the special cases, the initialisation, Lloyd or the exact program. Used by the
// CPU op and the native tests; the CUDA op follows the same steps with device pieces.
struct Fit {
  std::vector<double> centroids;  // k, ascending
  LloydResult lloyd;
};

// A cluster's centroid from its range's sums: the weighted mean, or its first value when its
// weight does not register (weights below the rounding of the running sum).
template <typename T>
double range_mean(const T* x, const double* S, const double* W, double shift, int64_t b,
                  int64_t e) {
  const double w = range_weight(W, b, e);
  return w > 0.0 ? shift + (S[e] - S[b]) / w : static_cast<double>(x[b]);
}

// The tolerance of Lloyd: tol times the (weighted) variance of the values.
inline double scaled_tol(double tol, double sum, double sumsq, double weight) {
  const double mean = sum / weight;
  return tol * std::max(0.0, sumsq / weight - mean * mean);
}

template <typename T, typename ParallelFor>
Fit fit_sorted(const T* x, const WeightOf<T>* w, int64_t n, int64_t k, Init init, uint64_t seed,
               int64_t max_iter, double tol, bool optimal, ParallelFor&& parallel) {
  Fit fit;
  if (n == 0) {
    fit.centroids.assign(k, 0.0);
    return fit;
  }
  // No more distinct values than clusters: each distinct value is a centroid (the optimum,
  // inertia 0); the spare centroids repeat the largest value.
  std::vector<double> distinct;
  if (distinct_values(x, n, k, &distinct) <= k) {
    fit.centroids = distinct;
    fit.centroids.resize(k, distinct.back());
    fit.lloyd.converged = true;
    return fit;
  }
  const double shift = static_cast<double>(x[n / 2]);
  // Squares only where costs or squared distances are needed: the program and k-means++.
  const bool squares = optimal || init == Init::kPlusPlus;
  std::vector<double> S(n + 1), S2(squares ? n + 1 : 0), Wv(w != nullptr ? n + 1 : 0);
  const double* W = w != nullptr ? Wv.data() : nullptr;
  const double sumsq = prefix_sums(x, w, n, shift, S.data(), squares ? S2.data() : nullptr,
                                   w != nullptr ? Wv.data() : nullptr);
  std::vector<double>& c = fit.centroids;
  if (optimal) {
    const std::vector<int64_t> b = optimal_boundaries(S.data(), S2.data(), W, n, k, parallel);
    c.resize(k);
    for (int64_t j = 0; j < k; ++j) c[j] = range_mean(x, S.data(), W, shift, b[j], b[j + 1]);
  } else if (init == Init::kLinear) {
    c = init_linear(static_cast<double>(x[0]), static_cast<double>(x[n - 1]), k);
  } else if (init == Init::kPlusPlus) {
    c = init_plusplus(x, n, S.data(), S2.data(), W, shift, k, seed);
  } else {
    for (int64_t i : init_indices(init, n, k, seed, W)) c.push_back(static_cast<double>(x[i]));
  }
  // Boundaries found near the last ones; the same stats as cluster_stats_one (the CUDA path).
  std::vector<int64_t> bound(k + 1, 0);
  bound[k] = n;
  for (int64_t j = 1; j < k; ++j) bound[j] = n * j / k;
  auto stats = [&](const double* mid, ClusterStats* out) {
    for (int64_t j = 1; j < k; ++j) bound[j] = count_le_near(x, n, mid[j - 1], bound[j]);
    for (int64_t j = 0; j < k; ++j) {
      ClusterStats& st = out[j];
      st.begin = bound[j];
      st.end = std::max(bound[j + 1], bound[j]);
      st.sum = S[st.end] - S[st.begin];
      st.sumsq = squares ? S2[st.end] - S2[st.begin] : 0.0;
      st.weight = range_weight(W, st.begin, st.end);
      st.lo = st.end > st.begin ? static_cast<double>(x[st.begin]) : 0.0;
      st.hi = st.end > st.begin ? static_cast<double>(x[st.end - 1]) : 0.0;
    }
  };
  // The exact partition is a fixed point of Lloyd: these iterations only make the labels the
  // nearest-centroid ones (they differ only on ties).
  fit.lloyd = lloyd(stats, c.data(), k, shift, max_iter,
                    scaled_tol(tol, S[n], sumsq, range_weight(W, 0, n)));
  return fit;
}

}  // namespace kmeans1d
}  // namespace dcx
