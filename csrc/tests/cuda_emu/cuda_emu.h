// cuda_emu.h: dcx's CUDA kernels run on the CPU, to check what they compute (indexing, shared
// memory, barriers, warp shuffles, atomics) where no GPU is at hand. Not for speed.
//
// A .cu file is rewritten by cu2cpp.py (kernel launches, __shared__ declarations) and compiled as
// plain C++20 with this header force-included (-include cuda_emu.h); CMakeLists.txt does both
// (DCX_CUDA_EMU=ON). Every CUDA thread of a block is a fiber (cuda_emu.cpp); blocks run one after
// another. What a kernel does against the rules aborts it with a message naming file and line:
//   * warps are 32 lanes (threadIdx linearised x, y, z); a *_sync warp collective completes only
//     when every lane of its mask has arrived, and all lanes must be at the same call site with
//     the same mask; a lane that exits while its warp waits in a collective naming it is an error;
//   * __syncthreads must be reached by every thread of the block (none exited), at one call site;
//   * a deadlock (every live thread waiting, no barrier complete) is reported with who waits where;
//   * shared memory (static and dynamic) is allocated per block, filled with 0xFF bytes (NaN / -1)
//     so that reads of unwritten shared memory show; its size is checked against the device limit
//     (48 KiB, or the cudaFuncSetAttribute opt-in);
//   * launch configurations are checked as the driver checks them (block <= 1024 threads, grid
//     y/z <= 65535, no zero dims): an invalid one sets the error cudaGetLastError returns and runs
//     nothing.
// Floating point is the host's IEEE arithmetic. nvcc contracts a * b + c into one FMA where it
// can; the kernels are compiled either way (DCX_CUDA_EMU_FMA), so a result that depends on the
// choice shows as a failed check. The explicitly rounded intrinsics (__dmul_rn, ...) are never
// contracted, on the GPU or here.
#pragma once

#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

// cu2cpp.py rewrites every __shared__ declaration; one it missed must not compile.
#undef __shared__
#define __shared__ EMU_ERROR_shared_declaration_not_rewritten_by_cu2cpp_py
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace emu {

struct Block;

struct ThreadState {
  uint3 tid{}, bid{};
  dim3 bdim, gdim;
  unsigned linear = 0, lane = 0, warp = 0;
  Block* block = nullptr;
};
ThreadState& self();

[[noreturn]] void fail(const char* fmt, ...);

void syncthreads(const std::source_location& loc);
enum class Op : int { kIdx, kDown, kUp, kXor, kAny, kAll, kBallot, kSyncwarp };
// One warp collective: deposits `value` (and the op's lane argument), returns this lane's result.
uint64_t warp_collective(Op op, unsigned mask, uint64_t value, int arg, int width,
                         const std::source_location& loc);

void* shared_var(const void* key, size_t size, size_t align);
void* dynamic_smem();

struct Config {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
};
inline Config cfg(dim3 g, dim3 b, size_t smem = 0, cudaStream_t s = nullptr) { return {g, b, smem, s}; }

// Runs body(): one fiber per CUDA thread, block after block. key: the kernel (its dynamic
// shared memory limit, cudaFuncSetAttribute).
void run_grid(const Config& c, const void* key, const std::function<void()>& body);

template <typename... P, typename... A>
void launch(const Config& c, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel argument count");
  // Arguments are converted to the parameter types once, as the launch copies them.
  std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
  run_grid(c, reinterpret_cast<const void*>(kernel), [&] {
    std::tuple<std::decay_t<P>...> mine = params;  // each thread its own copy
    std::apply(kernel, mine);
  });
}

// A kernel template whose arguments the call deduces, wrapped in a generic lambda by cu2cpp.py
// (no function pointer, so no cudaFuncSetAttribute key: such launches get the default limits).
template <typename F, typename... A>
void launch_deduced(const Config& c, F f, A... args) {
  run_grid(c, nullptr, [&] {
    std::tuple<A...> mine(args...);
    std::apply(f, mine);
  });
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type > 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

}  // namespace emu

#define threadIdx (static_cast<const uint3&>(::emu::self().tid))
#define blockIdx (static_cast<const uint3&>(::emu::self().bid))
#define blockDim (static_cast<const dim3&>(::emu::self().bdim))
#define gridDim (static_cast<const dim3&>(::emu::self().gdim))
static constexpr int warpSize = 32;

#define EMU_SHARED(T, name, dims)                                                             \
  using emu_shared_type_##name = T dims;                                                      \
  static const char emu_shared_key_##name = 0;                                                \
  emu_shared_type_##name& name = *static_cast<emu_shared_type_##name*>(::emu::shared_var(     \
      &emu_shared_key_##name, sizeof(emu_shared_type_##name), alignof(emu_shared_type_##name)))

inline void __syncthreads(const std::source_location& loc = std::source_location::current()) {
  emu::syncthreads(loc);
}
inline void __syncwarp(unsigned mask = 0xffffffffu,
                       const std::source_location& loc = std::source_location::current()) {
  emu::warp_collective(emu::Op::kSyncwarp, mask, 0, 0, 32, loc);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_sync(unsigned mask, T var, int src, int width = 32,
              const std::source_location& loc = std::source_location::current()) {
  return emu::from_bits<T>(emu::warp_collective(emu::Op::kIdx, mask, emu::to_bits(var), src, width, loc));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   const std::source_location& loc = std::source_location::current()) {
  return emu::from_bits<T>(emu::warp_collective(emu::Op::kDown, mask, emu::to_bits(var), int(delta), width, loc));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 const std::source_location& loc = std::source_location::current()) {
  return emu::from_bits<T>(emu::warp_collective(emu::Op::kUp, mask, emu::to_bits(var), int(delta), width, loc));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  const std::source_location& loc = std::source_location::current()) {
  return emu::from_bits<T>(emu::warp_collective(emu::Op::kXor, mask, emu::to_bits(var), lane_mask, width, loc));
}
inline int __any_sync(unsigned mask, int pred,
                      const std::source_location& loc = std::source_location::current()) {
  return int(emu::warp_collective(emu::Op::kAny, mask, pred != 0, 0, 32, loc));
}
inline int __all_sync(unsigned mask, int pred,
                      const std::source_location& loc = std::source_location::current()) {
  return int(emu::warp_collective(emu::Op::kAll, mask, pred != 0, 0, 32, loc));
}
inline unsigned __ballot_sync(unsigned mask, int pred,
                              const std::source_location& loc = std::source_location::current()) {
  return unsigned(emu::warp_collective(emu::Op::kBallot, mask, pred != 0, 0, 32, loc));
}

// Atomics (device-wide and shared memory alike): std::atomic_ref, so ThreadSanitizer knows them.
template <typename T>
T atomicAdd(T* p, T v) {
  static_assert(std::is_arithmetic_v<T>, "atomicAdd type");
  if (reinterpret_cast<uintptr_t>(p) % sizeof(T) != 0) emu::fail("misaligned atomicAdd at %p", (void*)p);
  return std::atomic_ref<T>(*p).fetch_add(v);
}
template <typename T>
T atomicOr(T* p, T v) {
  static_assert(std::is_integral_v<T>, "atomicOr type");
  return std::atomic_ref<T>(*p).fetch_or(v);
}
template <typename T>
T atomicAnd(T* p, T v) {
  return std::atomic_ref<T>(*p).fetch_and(v);
}
template <typename T>
T atomicMax(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* p, T v) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (v < old && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <typename T>
T atomicExch(T* p, T v) {
  return std::atomic_ref<T>(*p).exchange(v);
}
template <typename T>
T atomicCAS(T* p, T cmp, T v) {
  std::atomic_ref<T>(*p).compare_exchange_strong(cmp, v);
  return cmp;
}

// Device intrinsics with an explicit rounding (host IEEE arithmetic is round-to-nearest). nvcc
// never fuses them into an FMA; here each result is stored to a volatile (so rounded) before any
// use, so that a build with contraction on (DCX_CUDA_EMU_FMA) cannot fuse them either.
namespace emu {
template <typename T>
inline T rounded(T v) {
  volatile T r = v;
  return r;
}
}  // namespace emu
inline double __dadd_rn(double a, double b) { return emu::rounded(a + b); }
inline double __dsub_rn(double a, double b) { return emu::rounded(a - b); }
inline double __dmul_rn(double a, double b) { return emu::rounded(a * b); }
inline float __fadd_rn(float a, float b) { return emu::rounded(a + b); }
inline float __fmul_rn(float a, float b) { return emu::rounded(a * b); }

// CUDA's integer and float min / max overloads, for unqualified calls in device code.
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
constexpr std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(b) < C(a) ? C(b) : C(a);
}
template <typename A, typename B, typename = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
constexpr std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return C(a) < C(b) ? C(b) : C(a);
}
