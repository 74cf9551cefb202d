// Shared bits of the emulated-kernel harnesses (test_<kernel>_kernel.cpp: plain C++, no torch,
// the launchers of csrc/cuda/launch.h against references on the host): checks, conversions,
// and the command line every harness takes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "cuda/launch.h"

namespace h {

inline int& failures() {
  static int f = 0;
  return f;
}
inline int& checks() {
  static int c = 0;
  return c;
}
#define HCHECK(cond, ...)                                           \
  do {                                                              \
    ++h::checks();                                                  \
    if (!(cond)) {                                                  \
      ++h::failures();                                              \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
      std::printf(__VA_ARGS__);                                     \
      std::printf("\n");                                            \
    }                                                               \
  } while (0)

// argv[1], when given, names the one part of a harness to run (each harness lists its parts).
inline bool wanted(int argc, char** argv, const char* part) {
  return argc < 2 || std::strcmp(argv[1], part) == 0;
}

inline int finish(const char* name) {
  if (checks() == 0) {
    std::printf("%s: no checks ran (a part name that names nothing?)\n", name);
    return 1;
  }
  std::printf("%s: %d checks, %d passed, %d failed\n", name, checks(), checks() - failures(), failures());
  return failures() ? 1 : 0;
}

template <typename T> float to_f(T v) { return static_cast<float>(v); }
template <> inline float to_f(__half v) { return __half2float(v); }
template <> inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_f(float v) { return static_cast<T>(v); }
template <> inline __half from_f(float v) { return __float2half_rn(v); }
template <> inline __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }

template <typename T> constexpr dcx::cuda::Dtype dtype_of();
template <> constexpr dcx::cuda::Dtype dtype_of<float>() { return dcx::cuda::Dtype::kFloat32; }
template <> constexpr dcx::cuda::Dtype dtype_of<__half>() { return dcx::cuda::Dtype::kFloat16; }
template <> constexpr dcx::cuda::Dtype dtype_of<__nv_bfloat16>() { return dcx::cuda::Dtype::kBFloat16; }
template <> constexpr dcx::cuda::Dtype dtype_of<double>() { return dcx::cuda::Dtype::kFloat64; }
template <typename T> const char* name_of();
template <> inline const char* name_of<float>() { return "f32"; }
template <> inline const char* name_of<__half>() { return "f16"; }
template <> inline const char* name_of<__nv_bfloat16>() { return "bf16"; }
template <> inline const char* name_of<double>() { return "f64"; }

// A buffer with `offset` elements of slack in front, to get misaligned pointers on purpose.
template <typename T>
struct Buf {
  std::vector<T> store;
  size_t off;
  Buf(size_t n, size_t offset = 0) : store(n + offset), off(offset) {}
  T* data() { return store.data() + off; }
  T& operator[](size_t i) { return store[off + i]; }
};

inline bool bits_equal(float a, float b) { return std::memcmp(&a, &b, 4) == 0; }

// Half the distance from 1 to the next value of T: the relative error of one rounding to T.
template <typename T> constexpr double unit_roundoff();
template <> constexpr double unit_roundoff<float>() { return 0x1p-24; }
template <> constexpr double unit_roundoff<__half>() { return 0x1p-11; }
template <> constexpr double unit_roundoff<__nv_bfloat16>() { return 0x1p-8; }

// count values uniform in [-1, 1), rounded to T.
template <typename T>
std::vector<T> uniform(int64_t count, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<T> v(count);
  for (auto& e : v) e = from_f<T>(u(rng));
  return v;
}

// A codebook of kc entries between -1.5 and 8.3 (40 distinct steps, then shifted copies).
template <typename T>
std::vector<T> codebook(int kc) {
  std::vector<T> cb(kc);
  for (int i = 0; i < kc; ++i) cb[i] = from_f<T>(0.25f * float(i % 40) - 1.5f + 0.01f * float(i / 40));
  return cb;
}

}  // namespace h
