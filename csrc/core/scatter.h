// Sum of values per label: the centroid gradient of trained quantization is the sum of the
// weight gradients of each cluster. Torch-free, so the CPU kernel and the native tests share it.
#pragma once

#include <cstdint>

namespace dcx {

// acc[labels[i]] += values[i] for every i with mask[i] != 0 (mask may be null). Labels outside
// [0, k) are skipped, never written, and counted in the return value so the caller can report
// them.
template <typename T, typename L, typename Acc>
int64_t accumulate_by_label(const T* values, const L* labels, const uint8_t* mask, int64_t n,
                            int64_t k, Acc* acc) {
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (mask != nullptr && mask[i] == 0) continue;
    const uint64_t label = static_cast<uint64_t>(static_cast<int64_t>(labels[i]));
    if (label >= static_cast<uint64_t>(k)) {
      ++bad;
      continue;
    }
    acc[label] += static_cast<Acc>(values[i]);
  }
  return bad;
}

// Fixed work split for a deterministic CPU result: the chunking depends only on n and k (never on
// the thread count), each chunk sums into its own row, and rows are added in chunk order.
struct ChunkPlan {
  int64_t chunk;       // elements per chunk
  int64_t num_chunks;  // rows of partial sums
};

inline ChunkPlan plan_chunks(int64_t n, int64_t k, int64_t chunk = 1 << 15,
                             int64_t max_partials = int64_t(1) << 22) {
  if (n <= 0) return {chunk, 0};
  int64_t num = (n + chunk - 1) / chunk;
  const int64_t cap = k > 0 ? (max_partials / k > 1 ? max_partials / k : 1) : 1;
  if (num > cap) {
    num = cap;
    chunk = (n + num - 1) / num;
    num = (n + chunk - 1) / chunk;
  }
  return {chunk, num};
}

}  // namespace dcx
