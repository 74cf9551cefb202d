// spqmm on CUDA: y = x W^T + bias with W packed as codebook ids (layout at the top of
// csrc/core/spqmm.h). Sparse mode: rows in groups of 16; a step is 16 slots (slot i for row
// 16g + i, uint16 live << 15 | offset << 8 | id) and one window (the first of the 32 columns the
// step's slots read); group g is steps [group_ptr[g], group_ptr[g+1]). Dense mode: uint8 codes in
// the layouts of csrc/core/spqmm_layout.h: one id per byte [N, K] (8 bits), bit-packed in blocks
// of 64 columns (5 to 7 bits), or two per byte in blocks of 128 columns [N, ceil(K / 128) * 64]
// (up to 4 bits).
//
// Sparse mode. A step costs the same whatever its rows hold, so the kernel splits the steps
// itself into equal pieces, one per warp (the packer's chunks are the CPU's work items; here they
// are only checked). The grid is sized to the resident warps and every block first stages the
// codebook (float table[256] in shared memory) and, when it fits, x for the MB batch columns of
// this pass ([MB, K] in x's dtype, shared memory), so a slot's x read is one shared load.
// A warp walks its piece two steps at a time: half-warp h takes step s + h, lane i of it is
// row 16g + i and reads its slot (a warp reads 64 contiguous bytes; 32 steps' slots and windows
// are loaded before any is used, to keep loads in flight), decodes it once (masks and shifts),
// looks the weight up (a warp shuffle of a per-lane register when the codebook has <= 32 entries,
// else the shared table) and applies it to each of the MB columns: acc[m] += w * x[m][window +
// offset]. Each lane so keeps its row's sums in registers; when its half-warp's step enters
// another group, and at the piece's end, the sums go to a float32 workspace [M, N] with one
// atomicAdd per row and column (a group may span pieces, so partial sums are added). A last small
// kernel adds the bias and rounds to x's dtype. Shuffles are outside any branch that can differ
// between lanes (loop trip counts are per warp), so every __shfl_sync sees the whole warp.
// Dense mode: one warp per row, each lane loads 16 ids (one 16-byte load) and 16 x values.
// Past the crossover batch the glue decodes W once (decode kernels below) and calls cuBLAS.
//
// Nothing is trusted: a slot counts only when live, its id < kc (flag 1, checked in every slot,
// live or not, as on the CPU) and its window lies in [0, K) with window + offset < K (flag 2; a
// window outside [0, K) is flagged even when its step has no live slot); other slots are
// skipped. group_ptr and chunks must start at 0, not decrease and end at steps (flag 4); a
// step's group is found by a binary search whose answer is always in range, so corrupted pointers
// give wrong rows, never out-of-bounds accesses. Live slots in the padding rows of a partial last
// group are dropped. The glue turns the flags into an error (outside graph capture).
//
// Group scales (launch.h): a weight is its codebook value times its row's scale for its column's
// group, one float multiply (as on the CPU). In sparse mode a step's window lies in one column
// group (flag 8 when it does not), so a lane reads its row's scale once per group and column
// group, never for padding rows. In dense mode a lane's ids come one, or 16 from a multiple of 16,
// at a time (never straddling a group, a multiple of 32 columns), and a lane reads a scale when
// its columns enter the next group. The sparse and dense kernels take kScaled as a template
// argument: the unscaled ones compile as they did without group scales (the sparse kernel at
// MB <= 4 is held to 64 registers, and the scale's bookkeeping would make it spill).
#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

#include "core/spqmm_layout.h"
#include "cuda/dtype.cuh"

namespace dcx {
namespace cuda {
namespace {

constexpr int kDenseThreads = 256;
constexpr int kDenseWarps = kDenseThreads / 32;
constexpr int kSparseThreads = 512;
constexpr int kSparseWarps = kSparseThreads / 32;
constexpr int kGroupRows = kSpqmmRows;  // rows per group = slots per step = lanes per half-warp
static_assert(kGroupRows == 16, "a step's slots fill a half-warp");
constexpr int kBatchSteps = 32;   // steps whose slots and windows a warp loads before using them
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ void load_table(const T* codebook, int kc, float* table) {
  for (int i = threadIdx.x; i < 256; i += blockDim.x) table[i] = i < kc ? to_float(codebook[i]) : 0.f;
}

// Flag 4 unless p[0 .. count) starts at 0, never decreases and ends at `steps`; the grid's
// threads share the entries.
__device__ __forceinline__ int check_pointers(const int32_t* __restrict__ p, int64_t count,
                                              int64_t steps) {
  int flag = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = p[i];
    const bool bad = i == 0 ? v != 0 : v < p[i - 1];
    if (bad || v > steps || (i == count - 1 && v != steps)) flag = 4;
  }
  return flag;
}

// The largest g in [0, groups) with group_ptr[g] <= s (0 if none): the group of step s when the
// pointers are sound, and a group in range whatever they hold. groups >= 1.
__device__ __forceinline__ int64_t find_group(const int32_t* __restrict__ group_ptr,
                                              int64_t groups, int64_t s) {
  int64_t lo = 0, hi = groups - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (group_ptr[mid] <= s) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// The group after g holds s in the common case (one read); otherwise search.
__device__ __forceinline__ int64_t next_group(const int32_t* __restrict__ group_ptr,
                                              int64_t groups, int64_t g, int64_t s) {
  if (g + 1 < groups && group_ptr[g + 1] <= s && s < group_ptr[g + 2]) return g + 1;
  return find_group(group_ptr, groups, s);
}

// One slot, decoded and checked: ok when it is live, its id in the codebook and its column
// (window + offset) in [0, k). col is 0 when not ok, so callers may read x[col] either way.
// Ids are checked in every slot (padding is all zeros, so id 0), as the CPU kernels do; columns
// only in live slots.
struct Slot {
  uint32_t id;
  int col;
  bool ok;
};

__device__ __forceinline__ Slot decode_slot(uint32_t v, int window, int k, int kc, int* flag) {
  const uint32_t id = v & uint32_t(kSpqmmIdMask);
  const uint32_t off = (v >> kSpqmmOffsetShift) & uint32_t(kSpqmmWindow - 1);
  const bool live = (v & kSpqmmLive) != 0;
  // Columns left in [window, k); 0 for a window outside [0, k). No overflow: k < 2^31 - 64.
  const uint32_t room = uint32_t(window) < uint32_t(k) ? uint32_t(k - window) : 0u;
  const bool id_ok = id < uint32_t(kc), col_ok = off < room;
  if (!id_ok) *flag |= 1;
  if (live && !col_ok) *flag |= 2;
  const bool ok = live && id_ok && col_ok;
  return {id, ok ? window + int(off) : 0, ok};
}

// Sparse mode's column groups in 32 bits: k < 2^31 - 64, so a group size past 2^31 acts as 2^31
// (every valid window in group 0, none crossing; a negative window is flagged 2 anyway).
__device__ __forceinline__ uint32_t group_cols32(int64_t scale_group) {
  return uint32_t(min(scale_group, int64_t(1) << 31));
}

// Flag 8 when a window breaks window % scale_group + 32 <= scale_group (read as unsigned, as the
// CPU's structure check does).
__device__ __forceinline__ int window_group_flag(int window, uint32_t sg) {
  return uint32_t(window) % sg + uint32_t(kSpqmmWindow) > sg ? 8 : 0;
}

// The column group of a window, clamped into [0, scale_groups): a window outside [0, k) (no slot
// of its step counts) reads group 0.
__device__ __forceinline__ int64_t window_group(int window, int k, uint32_t sg, int64_t scale_groups) {
  const uint32_t w = uint32_t(window) < uint32_t(k) ? uint32_t(window) : 0u;
  return min(int64_t(w / sg), scale_groups - 1);
}

extern __shared__ __align__(16) unsigned char spqmm_smem[];

// kStaged: x's [mvalid, k] slice is copied to shared memory (dynamic size mvalid * k * sizeof(T)).
// piece: steps per warp work item (a multiple of kBatchSteps). validate: check the pointers (the
// first batch pass does). Up to MB = 4, two blocks per SM (64 registers): at small batches the
// kernel streams codes and wants warps in flight; MB = 8 needs ~100 registers not to spill.
template <typename T, int MB, bool kShuffle, bool kStaged, bool kScaled>
__global__ void __launch_bounds__(kSparseThreads, MB <= 4 ? 2 : 1)
spqmm_sparse_kernel(const T* __restrict__ x, int mvalid, const uint16_t* __restrict__ codes,
                    const int32_t* __restrict__ windows, const int32_t* __restrict__ group_ptr,
                    const int32_t* __restrict__ chunks, int64_t steps, int64_t groups,
                    int64_t num_chunks, int64_t n, int k, int64_t piece, bool validate,
                    const T* __restrict__ codebook, int kc, const float* __restrict__ gscale,
                    int64_t scale_group, int64_t scale_groups, float* __restrict__ ws,
                    int* __restrict__ bad_flag) {
  __shared__ float table[256];
  T* xs = reinterpret_cast<T*>(spqmm_smem);
  load_table(codebook, kc, table);
  if (kStaged) {
    for (int i = threadIdx.x; i < mvalid * k; i += blockDim.x) xs[i] = x[i];
  }
  __syncthreads();
  int flag = 0;
  if (validate) {
    flag |= check_pointers(group_ptr, groups + 1, steps);
    flag |= check_pointers(chunks, num_chunks + 1, steps);
  }
  const int lane = threadIdx.x & 31, half = lane >> 4, slot = lane & 15;
  const float reg_entry = kShuffle ? table[lane] : 0.f;  // table[lane] is 0 for lane >= kc
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  const int64_t pieces = (steps + piece - 1) / piece;
  float acc[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0.f;
  // Group scales: the lane's row's scales, set when the group changes (null for a padding row,
  // whose sums are dropped, so no scale is read for it).
  const uint32_t sg = kScaled ? group_cols32(scale_group) : 1u;
  const float* srow = nullptr;
  auto row_scales = [&](int64_t g) {
    const int64_t row = g * kGroupRows + slot;
    return kScaled && row < n ? gscale + row * scale_groups : nullptr;
  };
  // Adds the lane's sums for group g to the workspace (zeros are skipped: padding rows, rows
  // with no weight in this piece).
  auto flush = [&](int64_t g) {
    const int64_t row = g * kGroupRows + slot;
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m < mvalid && row < n && acc[m] != 0.f) atomicAdd(&ws[m * n + row], acc[m]);
      acc[m] = 0.f;
    }
  };
  for (int64_t p = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5); p < pieces;
       p += warps) {
    const int64_t a = p * piece, b = a + min(piece, steps - a);
    int64_t g = find_group(group_ptr, groups, a);
    int64_t gend = group_ptr[g + 1];
    if (kScaled) srow = row_scales(g);
    for (int64_t base = a; base < b; base += kBatchSteps) {
      // Step base + t for t < rem; t = 2j + h is half h's step in pair j. Lane l holds the window
      // of step base + l. Indices within the batch are 32-bit.
      const int rem = int(min(b - base, int64_t(kBatchSteps)));
      // Steps t >= until lie past the current group's end.
      int until = int(min(max(gend - base, int64_t(0)), int64_t(kBatchSteps)));
      int window = 0, wgroup = 0;  // wgroup: the column group of the window (group scales)
      if (lane < rem) {
        window = windows[base + lane];
        if (uint32_t(window) >= uint32_t(k)) flag |= 2;
        if (kScaled) {
          flag |= window_group_flag(window, sg);
          wgroup = int(window_group(window, k, sg, scale_groups));
        }
      }
      const uint16_t* cp = codes + base * kGroupRows + lane;
      uint32_t v[kBatchSteps / 2];
#pragma unroll
      for (int j = 0; j < kBatchSteps / 2; ++j) {
        v[j] = 2 * j + half < rem ? uint32_t(cp[j * 2 * kGroupRows]) : 0u;  // 0: not live
      }
#pragma unroll
      for (int j = 0; j < kBatchSteps / 2; ++j) {
        const int t = 2 * j + half;
        const int w0 = __shfl_sync(kFull, window, t);
        const int c0 = kScaled ? __shfl_sync(kFull, wgroup, t) : 0;
        if (t < rem && t >= until) {  // uniform within the half-warp
          flush(g);
          g = next_group(group_ptr, groups, g, base + t);
          gend = group_ptr[g + 1];
          until = int(min(max(gend - base, int64_t(0)), int64_t(kBatchSteps)));
          if (kScaled) srow = row_scales(g);
        }
        const Slot e = decode_slot(v[j], w0, k, kc, &flag);
        float w = kShuffle ? __shfl_sync(kFull, reg_entry, int(e.id & 31u)) : table[e.id];
        if (kScaled) w *= srow ? srow[c0] : 0.f;
        if (e.ok) {
#pragma unroll
          for (int m = 0; m < MB; ++m) {
            if (m < mvalid) {
              const float xv = kStaged ? to_float(xs[m * k + e.col])
                                       : to_float(x[int64_t(m) * k + e.col]);
              acc[m] += w * xv;
            }
          }
        }
      }
    }
    flush(g);
  }
  if (flag) atomicOr(bad_flag, flag);
}

template <typename T>
__global__ void spqmm_epilogue_kernel(const float* __restrict__ ws, const T* __restrict__ bias,
                                      T* __restrict__ y, int64_t m, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < m * n;
       i += int64_t(gridDim.x) * blockDim.x) {
    y[i] = from_float<T>(ws[i] + (bias ? to_float(bias[i % n]) : 0.f));
  }
}

// Dense mode: one warp per row. Layouts (csrc/core/spqmm.h):
//   kBytes      one id per byte, a lane per column;
//   kBytesVec   one id per byte, K % 16 == 0 and aligned rows: 16 ids per 16-byte load;
//   kNibbles    two ids per byte (bits <= 4): a row is ceil(k / 128) blocks of 64 bytes, 16
//               little-endian 32-bit words each, nibble t of word d holding column
//               128 b + 16 t + d; a lane takes a quarter block at a time (a 16-byte load: words
//               4 q .. 4 q + 3, 32 ids), so a warp reads 512 contiguous bytes; the padding
//               nibbles past k are skipped, ids and all (as on the CPU and in the decode).
//   kBits       bit-packed ids (bits 5..7, core/spqmm_layout.h): a lane per column, its id read
//               from the one or two bytes that hold it (neighbouring lanes share bytes, so a
//               warp's reads stay within a few cache lines).
enum class DenseLayout { kBytes, kBytesVec, kNibbles, kBits };

// A lane's group scale as its columns go up (dense mode): its row's scales and the columns
// [begin, end) of the group last read, so the next group costs a compare and only a jump past it
// a division. Columns past k read the last group (in range).
struct GroupCursor {
  const float* row;  // the row's scale_groups scales
  int64_t sg, last;  // group size, scale_groups - 1
  int64_t g = -1, begin = 0, end = 0;
  float s = 0.f;
  __device__ __forceinline__ float at(int64_t col) {
    if (col < begin || col >= end) {
      g = min(g >= 0 && col >= end && col - end < sg ? g + 1 : col / sg, last);
      begin = g * sg;
      end = g == last ? INT64_MAX : begin + sg;
      s = row[g];
    }
    return s;
  }
};

template <typename T, int MB, DenseLayout kLayout, bool kScaled>
__global__ void __launch_bounds__(kDenseThreads)
spqmm_dense_kernel(const T* __restrict__ x, int64_t ldx, int mvalid,
                   const uint8_t* __restrict__ codes, int64_t n, int64_t k, int bits,
                   const T* __restrict__ codebook, int kc, const T* __restrict__ bias,
                   const float* __restrict__ gscale, int64_t scale_group, int64_t scale_groups,
                   T* __restrict__ y, int* __restrict__ bad_flag) {
  __shared__ float table[256];
  load_table(codebook, kc, table);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x * int64_t(kDenseWarps) + (threadIdx.x >> 5);
  if (row >= n) return;
  float acc[MB];
#pragma unroll
  for (int m = 0; m < MB; ++m) acc[m] = 0.f;
  uint32_t max_id = 0;
  GroupCursor cur{kScaled ? gscale + row * scale_groups : nullptr, scale_group, scale_groups - 1};
  // The group scale of column col (1, unread, without group scales).
  auto scale_at = [&](int64_t col) { return kScaled ? cur.at(col) : 1.f; };
  // One weight: its id (checked after the row), times its group scale s when there are group
  // scales, times column col of each batch column.
  auto add = [&](uint32_t id, int64_t col, float s) {
    max_id = max(max_id, id);
    const float w = kScaled ? table[id] * s : table[id];
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m < mvalid) acc[m] += w * to_float(x[m * ldx + col]);
    }
  };
  if constexpr (kLayout == DenseLayout::kNibbles) {
    const int64_t quarters = (k + 127) / 128 * 4;
    const uint8_t* code = codes + row * quarters * 16;
    for (int64_t q = lane; q < quarters; q += 32) {
      const uint4 packed = *reinterpret_cast<const uint4*>(code + q * 16);
      const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
      const int64_t base = (q >> 2) * 128 + (q & 3) * 4;  // column of word 0, nibble 0
      // Nibble t's columns lie in the 32-column block t / 2 of the 128: one scale per block.
      float s[4];
#pragma unroll
      for (int b = 0; b < 4; ++b) s[b] = scale_at((q >> 2) * 128 + 32 * b);
#pragma unroll
      for (int dd = 0; dd < 4; ++dd) {
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          const uint32_t id = (words[dd] >> (4 * t)) & 15u;
          const int64_t col = base + 16 * t + dd;
          if (col < k) add(id, col, s[t >> 1]);  // padding past k is never read, so never checked
        }
      }
    }
  } else if constexpr (kLayout == DenseLayout::kBits) {
    const uint8_t* code = codes + row * spqmm_dense_width(k, bits);
    for (int64_t j = lane; j < k; j += 32) add(spqmm_dense_id(code, j, bits), j, scale_at(j));
  } else if constexpr (kLayout == DenseLayout::kBytesVec) {
    const uint8_t* code = codes + row * k;
    for (int64_t j0 = int64_t(lane) * 16; j0 < k; j0 += 32 * 16) {
      const uint4 packed = *reinterpret_cast<const uint4*>(code + j0);
      const uint8_t* ids = reinterpret_cast<const uint8_t*>(&packed);
      const float s = scale_at(j0);  // 16 columns from a multiple of 16: one group
#pragma unroll
      for (int i = 0; i < 16; ++i) add(ids[i], j0 + i, s);
    }
  } else {
    const uint8_t* code = codes + row * k;
    for (int64_t j = lane; j < k; j += 32) add(code[j], j, scale_at(j));
  }
  if (max_id >= uint32_t(kc)) atomicOr(bad_flag, 1);
#pragma unroll
  for (int m = 0; m < MB; ++m) {
    const float sum = warp_sum(acc[m]);
    if (lane == 0 && m < mvalid) {
      y[m * n + row] = from_float<T>(sum + (bias ? to_float(bias[row]) : 0.f));
    }
  }
}

// Decode to dense W [n, k] in T for cuBLAS past the crossover, writing every element (no zero
// fill before it): a block takes whole groups; it zeroes the group's rows, then its half-warps
// scatter the group's steps, one step each at a time, into the rows it just zeroed (in L2). A
// group's steps are group_ptr[g] .. group_ptr[g + 1] clamped into [0, steps], so corrupted
// pointers (flagged) give wrong weights, never an access out of bounds; a block writes only its
// own groups' rows. With group scales a weight is written as its value times its scale, rounded
// to T once.
template <typename T>
__global__ void __launch_bounds__(kSparseThreads)
spqmm_decode_sparse_kernel(const uint16_t* __restrict__ codes, const int32_t* __restrict__ windows,
                           const int32_t* __restrict__ group_ptr,
                           const int32_t* __restrict__ chunks, int64_t steps, int64_t groups,
                           int64_t num_chunks, int64_t n, int k,
                           const T* __restrict__ codebook, int kc,
                           const float* __restrict__ gscale, int64_t scale_group,
                           int64_t scale_groups, T* __restrict__ w, int* __restrict__ bad_flag) {
  int flag = check_pointers(group_ptr, groups + 1, steps) |
             check_pointers(chunks, num_chunks + 1, steps);
  const uint32_t sg = gscale ? group_cols32(scale_group) : 1u;
  const int slot = threadIdx.x & 15, halves = blockDim.x >> 4;
  for (int64_t g = blockIdx.x; g < groups; g += gridDim.x) {
    const int64_t r0 = g * kGroupRows, rows = min(int64_t(kGroupRows), n - r0);
    T* wg = w + r0 * k;
    for (int64_t i = threadIdx.x; i < rows * k; i += blockDim.x) wg[i] = from_float<T>(0.f);
    __syncthreads();
    const int64_t s0 = min(max(int64_t(group_ptr[g]), int64_t(0)), steps);
    const int64_t s1 = min(max(int64_t(group_ptr[g + 1]), s0), steps);
    for (int64_t s = s0 + (threadIdx.x >> 4); s < s1; s += halves) {
      const int window = windows[s];
      if (slot == 0 && uint32_t(window) >= uint32_t(k)) flag |= 2;
      if (slot == 0 && gscale) flag |= window_group_flag(window, sg);
      const Slot e = decode_slot(codes[s * kGroupRows + slot], window, k, kc, &flag);
      if (e.ok && slot < rows) {
        wg[slot * int64_t(k) + e.col] =
            gscale ? from_float<T>(to_float(codebook[e.id]) *
                                   gscale[(r0 + slot) * scale_groups +
                                          window_group(window, k, sg, scale_groups)])
                   : codebook[e.id];
      }
    }
    __syncthreads();  // the scatter into this group's rows ends before the next group is zeroed
  }
  if (flag) atomicOr(bad_flag, flag);
}

// Only the structure checks (flag 4, and flag 8 for windows crossing a scale group), for a call
// with nothing else to compute (M, N or K zero): the CPU op checks the structure whatever the
// sizes, and so does this one.
__global__ void spqmm_check_pointers_kernel(const int32_t* __restrict__ group_ptr, int64_t groups,
                                            const int32_t* __restrict__ chunks, int64_t num_chunks,
                                            int64_t steps, const int32_t* __restrict__ windows,
                                            bool group_scaled, int64_t scale_group,
                                            int* __restrict__ bad_flag) {
  int flag = check_pointers(group_ptr, groups + 1, steps) |
             check_pointers(chunks, num_chunks + 1, steps);
  if (group_scaled) {
    const uint32_t sg = group_cols32(scale_group);
    for (int64_t s = threadIdx.x; s < steps; s += blockDim.x) flag |= window_group_flag(windows[s], sg);
  }
  if (flag) atomicOr(bad_flag, flag);
}

template <typename T>
__global__ void spqmm_decode_dense_kernel(const uint8_t* __restrict__ codes, int64_t count,
                                          int64_t k, int bits,
                                          const T* __restrict__ codebook, int kc,
                                          const float* __restrict__ gscale, int64_t scale_group,
                                          int64_t scale_groups, T* __restrict__ w,
                                          int* __restrict__ bad_flag) {
  int flag = 0;
  const int64_t width = spqmm_dense_width(k, bits);  // bytes per row, in any layout
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / k, col = i - row * k;
    const uint32_t id = spqmm_dense_id(codes + row * width, col, bits);
    if (id >= uint32_t(kc)) flag = 1;
    const T v = id < uint32_t(kc) ? codebook[id] : from_float<T>(0.f);
    if (gscale) {
      w[i] = from_float<T>(to_float(v) *
                           gscale[row * scale_groups + min(col / scale_group, scale_groups - 1)]);
    } else {
      w[i] = v;
    }
  }
  if (flag) atomicOr(bad_flag, flag);
}

// What the sparse launches need to know about a device, queried once per device: a call then
// makes no runtime queries (they cost microseconds of host time per call, about what the kernel
// itself takes at batch 1).
struct DeviceLimits {
  int sms = 1, smem_per_sm = 0, smem_per_block = 0;
};

std::mutex& cache_mutex() {
  static std::mutex mu;
  return mu;
}

cudaError_t device_limits(int dev, DeviceLimits* d) {
  static std::map<int, DeviceLimits> cache;
  std::lock_guard<std::mutex> lock(cache_mutex());
  const auto it = cache.find(dev);
  if (it != cache.end()) {
    *d = it->second;
    return cudaSuccess;
  }
  cudaError_t err = cudaDeviceGetAttribute(&d->sms, cudaDevAttrMultiProcessorCount, dev);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&d->smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  }
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&d->smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  }
  if (err == cudaSuccess) cache[dev] = *d;
  return err;
}

// Resident blocks per SM of `kernel` with `smem` bytes of dynamic shared memory, once per
// (device, kernel, smem); the first query of a kernel on a device also raises its dynamic shared
// memory limit to the device's maximum, once, instead of per call.
cudaError_t blocks_per_sm(int dev, const void* kernel, int threads, size_t smem,
                          const DeviceLimits& d, int* per_sm) {
  static std::map<std::tuple<int, const void*, size_t>, int> cache;
  static std::set<std::pair<int, const void*>> raised;
  std::lock_guard<std::mutex> lock(cache_mutex());
  const auto key = std::make_tuple(dev, kernel, smem);
  const auto it = cache.find(key);
  if (it != cache.end()) {
    *per_sm = it->second;
    return cudaSuccess;
  }
  cudaError_t err = cudaSuccess;
  if (raised.insert({dev, kernel}).second && d.smem_per_block > 48 * 1024) {
    // The opt-in limit holds the kernel's static shared memory too (the sparse kernel's codebook
    // table): asking for all of it as dynamic memory is refused (an H200: invalid argument).
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, kernel);
    if (err != cudaSuccess) return err;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               d.smem_per_block - static_cast<int>(attr.sharedSizeBytes));
    if (err != cudaSuccess) return err;
  }
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, threads, smem);
  if (err == cudaSuccess) cache[key] = *per_sm;
  return err;
}

// Stage x's slice in shared memory when it fits with two blocks on an SM (room for the static
// table and the runtime's 1 KiB reserve per block); past that, fewer warps would be left to keep
// loads in flight than reading x through L1 costs.
bool stage_x(const DeviceLimits& d, size_t xbytes) {
  constexpr size_t kFixed = 2048;
  const size_t limit =
      std::min<size_t>(std::max(d.smem_per_block, 0), std::max(d.smem_per_sm, 0) / 2);
  return xbytes > 0 && limit > kFixed && xbytes <= limit - kFixed;
}

// Grid and piece size of one sparse launch: one piece of equal steps per resident warp (steps are
// equal work), at least one batch of steps each; at least one block, which also checks the
// pointers when there are no steps.
struct SparsePlan {
  unsigned blocks;
  int64_t piece;
};

template <typename Kernel>
cudaError_t plan_sparse(Kernel kernel, int dev, const DeviceLimits& d, int64_t steps, size_t smem,
                        SparsePlan* p) {
  int per_sm = 0;
  const cudaError_t err = blocks_per_sm(dev, reinterpret_cast<const void*>(kernel), kSparseThreads,
                                        smem, d, &per_sm);
  if (err != cudaSuccess) return err;
  const int64_t max_blocks = int64_t(std::max(d.sms, 1)) * std::max(per_sm, 1);
  const int64_t warps = max_blocks * kSparseWarps;
  int64_t piece = std::max<int64_t>((steps + warps - 1) / warps, kBatchSteps);
  piece = (piece + kBatchSteps - 1) / kBatchSteps * kBatchSteps;
  const int64_t pieces = (steps + piece - 1) / piece;
  p->piece = piece;
  const int64_t want = (pieces + kSparseWarps - 1) / kSparseWarps;
  p->blocks = unsigned(std::max<int64_t>(1, std::min(max_blocks, want)));
  return cudaSuccess;
}

template <typename T, int MB, bool kShuffle, bool kStaged>
cudaError_t launch_sparse(const SpqmmCudaArgs& a, const DeviceLimits& d, const T* x, int mvalid,
                          bool validate, float* ws) {
  auto kernel = a.group_scale ? spqmm_sparse_kernel<T, MB, kShuffle, kStaged, true>
                              : spqmm_sparse_kernel<T, MB, kShuffle, kStaged, false>;
  const size_t smem = kStaged ? size_t(mvalid) * size_t(a.k) * sizeof(T) : 0;
  SparsePlan p;
  const cudaError_t err = plan_sparse(kernel, a.device, d, a.steps, smem, &p);
  if (err != cudaSuccess) return err;
  kernel<<<p.blocks, kSparseThreads, smem, a.stream>>>(
      x, mvalid, a.codes, a.windows, a.group_ptr, a.chunks, a.steps, a.groups, a.num_chunks, a.n,
      int(a.k), p.piece, validate, static_cast<const T*>(a.codebook), a.kc, a.group_scale,
      a.scale_group, a.scale_groups, ws, a.bad_flag);
  return cudaGetLastError();
}

template <typename T, int MB>
cudaError_t launch_block(const SpqmmCudaArgs& a, const DeviceLimits& d, const T* x, int mvalid,
                         bool first, float* ws, T* y) {
  const T* cb = static_cast<const T*>(a.codebook);
  if (a.dense) {
    const unsigned blocks = static_cast<unsigned>((a.n + kDenseWarps - 1) / kDenseWarps);
    if (blocks == 0) return cudaSuccess;
    // The kernel without group scales, or with them.
    auto launch = [&](auto unscaled, auto scaled) {
      auto kernel = a.group_scale ? scaled : unscaled;
      kernel<<<blocks, kDenseThreads, 0, a.stream>>>(
          x, a.k, mvalid, a.dense_codes, a.n, a.k, a.bits, cb, a.kc,
          static_cast<const T*>(a.bias), a.group_scale, a.scale_group, a.scale_groups, y,
          a.bad_flag);
    };
    const SpqmmDense layout = spqmm_dense_layout(a.bits);
    if (layout == SpqmmDense::kNibbles) {  // rows of whole 16-byte blocks (the glue aligns them)
      launch(spqmm_dense_kernel<T, MB, DenseLayout::kNibbles, false>,
             spqmm_dense_kernel<T, MB, DenseLayout::kNibbles, true>);
    } else if (layout == SpqmmDense::kBits) {
      launch(spqmm_dense_kernel<T, MB, DenseLayout::kBits, false>,
             spqmm_dense_kernel<T, MB, DenseLayout::kBits, true>);
    } else if (a.k % 16 == 0 && is_aligned(a.dense_codes, 16)) {
      launch(spqmm_dense_kernel<T, MB, DenseLayout::kBytesVec, false>,
             spqmm_dense_kernel<T, MB, DenseLayout::kBytesVec, true>);
    } else {
      launch(spqmm_dense_kernel<T, MB, DenseLayout::kBytes, false>,
             spqmm_dense_kernel<T, MB, DenseLayout::kBytes, true>);
    }
    return cudaGetLastError();
  }
  // Later passes have nothing to check and, without steps, nothing to add.
  if (a.steps == 0 && !first) return cudaSuccess;
  const bool staged = stage_x(d, size_t(mvalid) * size_t(a.k) * sizeof(T));
  if (a.kc <= 32) {
    return staged ? launch_sparse<T, MB, true, true>(a, d, x, mvalid, first, ws)
                  : launch_sparse<T, MB, true, false>(a, d, x, mvalid, first, ws);
  }
  return staged ? launch_sparse<T, MB, false, true>(a, d, x, mvalid, first, ws)
                : launch_sparse<T, MB, false, false>(a, d, x, mvalid, first, ws);
}

template <typename T>
cudaError_t launch_typed(const SpqmmCudaArgs& a) {
  const T* x = static_cast<const T*>(a.x);
  T* y = static_cast<T*>(a.y);
  DeviceLimits d;
  if (!a.dense) {
    const cudaError_t err = device_limits(a.device, &d);
    if (err != cudaSuccess) return err;
  }
  // Batch columns per pass: each decoded weight is applied to all of them.
  const int mb = a.m <= 1 ? 1 : a.m <= 2 ? 2 : a.m <= 4 ? 4 : 8;
  for (int64_t m0 = 0; m0 < a.m; m0 += mb) {
    const int mvalid = static_cast<int>(std::min<int64_t>(mb, a.m - m0));
    const T* xb = x + m0 * a.k;
    float* wsb = a.ws != nullptr ? a.ws + m0 * a.n : nullptr;
    T* yb = y + m0 * a.n;
    const bool first = m0 == 0;
    cudaError_t err;
    switch (mb) {
      case 1: err = launch_block<T, 1>(a, d, xb, mvalid, first, wsb, yb); break;
      case 2: err = launch_block<T, 2>(a, d, xb, mvalid, first, wsb, yb); break;
      case 4: err = launch_block<T, 4>(a, d, xb, mvalid, first, wsb, yb); break;
      default: err = launch_block<T, 8>(a, d, xb, mvalid, first, wsb, yb); break;
    }
    if (err != cudaSuccess) return err;
  }
  if (!a.dense && a.m * a.n > 0) {
    const int64_t want = (a.m * a.n + kDenseThreads - 1) / kDenseThreads;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(want, 4096));
    spqmm_epilogue_kernel<T><<<blocks, kDenseThreads, 0, a.stream>>>(
        a.ws, static_cast<const T*>(a.bias), y, a.m, a.n);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t decode_typed(const SpqmmCudaArgs& a, void* w) {
  const T* cb = static_cast<const T*>(a.codebook);
  if (a.dense) {
    const int64_t count = a.n * a.k;
    if (count == 0) return cudaSuccess;
    const int64_t want = (count + kDenseThreads - 1) / kDenseThreads;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(want, 8192));
    spqmm_decode_dense_kernel<T><<<blocks, kDenseThreads, 0, a.stream>>>(
        a.dense_codes, count, a.k, a.bits, cb, a.kc, a.group_scale, a.scale_group, a.scale_groups,
        static_cast<T*>(w), a.bad_flag);
  } else {
    if (a.n == 0) return cudaSuccess;
    DeviceLimits d;
    cudaError_t err = device_limits(a.device, &d);
    if (err != cudaSuccess) return err;
    int per_sm = 0;
    auto kernel = spqmm_decode_sparse_kernel<T>;
    err = blocks_per_sm(a.device, reinterpret_cast<const void*>(kernel), kSparseThreads, 0, d,
                        &per_sm);
    if (err != cudaSuccess) return err;
    const int64_t resident = int64_t(std::max(d.sms, 1)) * std::max(per_sm, 1);
    const unsigned blocks = unsigned(std::max<int64_t>(1, std::min(resident, a.groups)));
    kernel<<<blocks, kSparseThreads, 0, a.stream>>>(
        a.codes, a.windows, a.group_ptr, a.chunks, a.steps, a.groups, a.num_chunks, a.n,
        int(a.k), cb, a.kc, a.group_scale, a.scale_group, a.scale_groups, static_cast<T*>(w),
        a.bad_flag);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_spqmm_check(const SpqmmCudaArgs& a) {
  if (a.dense) return cudaSuccess;
  spqmm_check_pointers_kernel<<<1, kDenseThreads, 0, a.stream>>>(
      a.group_ptr, a.groups, a.chunks, a.num_chunks, a.steps, a.windows, a.group_scale != nullptr,
      a.scale_group, a.bad_flag);
  return cudaGetLastError();
}

cudaError_t launch_spqmm(const SpqmmCudaArgs& args) {
  if (args.m == 0 || args.n == 0 || args.k == 0) return launch_spqmm_check(args);
  switch (args.dtype) {
    case Dtype::kFloat32: return launch_typed<float>(args);
    case Dtype::kFloat16: return launch_typed<__half>(args);
    case Dtype::kBFloat16: return launch_typed<__nv_bfloat16>(args);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_spqmm_decode(const SpqmmCudaArgs& args, void* weight) {
  switch (args.dtype) {
    case Dtype::kFloat32: return decode_typed<float>(args, weight);
    case Dtype::kFloat16: return decode_typed<__half>(args, weight);
    case Dtype::kBFloat16: return decode_typed<__nv_bfloat16>(args, weight);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace dcx
