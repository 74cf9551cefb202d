// The AVX-512 intrinsics the spqmm kernels use, written in plain C++ with the instructions'
// semantics (Intel's pseudocode), for the native tests: built with -DDCX_AVX512_EMULATE,
// core/spqmm.h includes this header inside namespace dcx::avx512 (where these names hide the
// real ones) and the AVX-512 kernels run on any CPU, under ASan and UBSan too: a masked load
// here reads only its masked bytes, so a kernel that touches memory it should not is caught.
// Only for tests: about two orders of magnitude slower than the hardware.
//
// Included inside a namespace: no #include here (core/spqmm.h includes <cstdint>, <cstring>).
#pragma once

struct __m512 { float f[16]; };
struct __m512i {
  union {
    uint8_t u8[64];
    int8_t i8[64];
    uint16_t u16[32];
    int16_t i16[32];
    uint32_t u32[16];
    int32_t i32[16];
    uint64_t u64[8];
  };
};
struct __m128i {
  union {
    uint8_t u8[16];
    int8_t i8[16];
    uint32_t u32[4];
    int32_t i32[4];
    uint64_t u64[2];
  };
};
struct __m256i {
  union {
    uint8_t u8[32];
    uint16_t u16[16];
  };
};
typedef uint16_t __mmask16;
typedef uint32_t __mmask32;
typedef uint64_t __mmask64;

// Without optimisation GCC's headers define the immediate-operand intrinsics as macros.
#undef _mm_prefetch
#undef _mm512_srli_epi32
#undef _mm512_mask_blend_epi8
#undef _mm512_roundscale_ps
#undef _mm512_i32gather_epi32
#ifndef _MM_FROUND_TO_NEAREST_INT
#define _MM_FROUND_TO_NEAREST_INT 0
#define _MM_FROUND_NO_EXC 8
#endif
#undef _mm512_slli_epi32
#undef _mm512_extracti32x4_epi32
#undef _mm512_extracti64x4_epi64
#undef _mm512_srli_epi16
#undef _mm_extract_epi64
#ifndef _MM_HINT_T0
#define _MM_HINT_T0 3
#endif
inline void _mm_prefetch(const char*, int) {}

inline __m512 _mm512_setzero_ps() { __m512 r; for (float& v : r.f) v = 0.f; return r; }
inline __m512i _mm512_setzero_si512() { __m512i r; std::memset(&r, 0, sizeof r); return r; }
inline __m512i _mm512_set1_epi32(int v) {
  __m512i r;
  for (int i = 0; i < 16; ++i) r.i32[i] = v;
  return r;
}
inline __m512 _mm512_loadu_ps(const float* p) { __m512 r; std::memcpy(r.f, p, 64); return r; }
inline __m512 _mm512_load_ps(const float* p) { return _mm512_loadu_ps(p); }
inline __m512i _mm512_loadu_si512(const void* p) { __m512i r; std::memcpy(&r, p, 64); return r; }
inline __m512i _mm512_load_si512(const void* p) { return _mm512_loadu_si512(p); }
inline __m256i _mm256_loadu_si256(const __m256i* p) { __m256i r; std::memcpy(&r, p, 32); return r; }
inline void _mm512_store_ps(float* p, __m512 v) { std::memcpy(p, v.f, 64); }
inline void _mm512_storeu_si512(void* p, __m512i v) { std::memcpy(p, &v, 64); }
inline void _mm512_store_si512(void* p, __m512i v) { _mm512_storeu_si512(p, v); }
inline __m512 _mm512_set1_ps(float v) { __m512 r; for (float& f : r.f) f = v; return r; }
inline __m512 _mm512_maskz_loadu_ps(__mmask16 k, const float* p) {
  __m512 r = _mm512_setzero_ps();
  for (int i = 0; i < 16; ++i) if (k >> i & 1) r.f[i] = p[i];
  return r;
}
inline void _mm512_mask_storeu_ps(float* p, __mmask16 k, __m512 v) {
  for (int i = 0; i < 16; ++i) if (k >> i & 1) p[i] = v.f[i];
}
inline __m128i _mm_maskz_loadu_epi8(__mmask16 k, const void* p) {
  __m128i r;
  std::memset(&r, 0, sizeof r);
  for (int i = 0; i < 16; ++i) if (k >> i & 1) r.u8[i] = static_cast<const uint8_t*>(p)[i];
  return r;
}
inline __m128i _mm512_extracti32x4_epi32(__m512i a, int i) {
  __m128i r;
  std::memcpy(&r, a.u32 + 4 * (i & 3), 16);
  return r;
}
inline __m128i _mm512_castsi512_si128(__m512i a) { return _mm512_extracti32x4_epi32(a, 0); }
inline long long _mm_cvtsi128_si64(__m128i a) { return (long long)a.u64[0]; }
inline long long _mm_extract_epi64(__m128i a, int i) { return (long long)a.u64[i & 1]; }
inline __m128i _mm_cvtsi32_si128(int v) {
  __m128i r;
  std::memset(&r, 0, sizeof r);
  r.i32[0] = v;
  return r;
}

inline void _mm512_storeu_ps(float* p, __m512 v) { std::memcpy(p, v.f, 64); }
inline __m512i _mm512_castps_si512(__m512 v) { __m512i r; std::memcpy(&r, v.f, 64); return r; }
inline __m512i _mm512_or_si512(__m512i a, __m512i b) {
  for (int i = 0; i < 8; ++i) a.u64[i] |= b.u64[i];
  return a;
}
// AVX-512 VBMI and the byte forms of AVX-512BW.
inline __m512i _mm512_set1_epi8(char v) {
  __m512i r;
  std::memset(r.u8, static_cast<unsigned char>(v), 64);
  return r;
}
inline __m512i _mm512_maskz_loadu_epi8(__mmask64 k, const void* p) {  // reads only the masked bytes
  __m512i r;
  for (int i = 0; i < 64; ++i) r.u8[i] = (k >> i & 1) ? static_cast<const uint8_t*>(p)[i] : 0;
  return r;
}
inline __m512i _mm512_maskz_mov_epi8(__mmask64 k, __m512i a) {
  for (int i = 0; i < 64; ++i) a.u8[i] = (k >> i & 1) ? a.u8[i] : 0;
  return a;
}
inline __m512i _mm512_permutexvar_epi8(__m512i idx, __m512i a) {  // vpermb: low 6 bits of each index
  __m512i r;
  for (int i = 0; i < 64; ++i) r.u8[i] = a.u8[idx.u8[i] & 63];
  return r;
}
inline __m512i _mm512_permutex2var_epi8(__m512i a, __m512i idx, __m512i b) {  // vpermt2b: 7 bits
  __m512i r;
  for (int i = 0; i < 64; ++i) r.u8[i] = (idx.u8[i] & 64) ? b.u8[idx.u8[i] & 63] : a.u8[idx.u8[i] & 63];
  return r;
}
inline __m512i _mm512_maskz_loadu_epi32(__mmask16 k, const void* p) {  // reads only the masked words
  __m512i r = _mm512_setzero_si512();
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1) std::memcpy(&r.i32[i], static_cast<const char*>(p) + 4 * i, 4);
  return r;
}
inline __mmask16 _mm512_mask_cmpgt_epu32_mask(__mmask16 k, __m512i a, __m512i b) {
  __mmask16 r = 0;
  for (int i = 0; i < 16; ++i)
    if (((k >> i) & 1) && uint32_t(a.i32[i]) > uint32_t(b.i32[i])) r |= __mmask16(1u << i);
  return r;
}
// vpermi2b with a merge mask: bytes outside k keep idx's value.
inline __m512i _mm512_mask2_permutex2var_epi8(__m512i a, __m512i idx, __mmask64 k, __m512i b) {
  __m512i r = idx;
  for (int i = 0; i < 64; ++i)
    if ((k >> i) & 1) r.u8[i] = (idx.u8[i] & 64) ? b.u8[idx.u8[i] & 63] : a.u8[idx.u8[i] & 63];
  return r;
}
inline __m512i _mm512_add_epi8(__m512i a, __m512i b) {
  __m512i r;
  for (int i = 0; i < 64; ++i) r.u8[i] = uint8_t(a.u8[i] + b.u8[i]);
  return r;
}
inline __m512i _mm512_permutex2var_epi16(__m512i a, __m512i idx, __m512i b) {  // vpermt2w: 6 bits
  __m512i r;
  for (int i = 0; i < 32; ++i) r.u16[i] = (idx.u16[i] & 32) ? b.u16[idx.u16[i] & 31] : a.u16[idx.u16[i] & 31];
  return r;
}
// The upper 256 bits are undefined on the hardware; zero here.
inline __m512i _mm512_castsi256_si512(__m256i a) {
  __m512i r = _mm512_setzero_si512();
  std::memcpy(&r, &a, 32);
  return r;
}
inline __m512i _mm512_permutexvar_epi16(__m512i idx, __m512i a) {  // vpermw: low 5 bits
  __m512i r;
  for (int i = 0; i < 32; ++i) r.u16[i] = a.u16[idx.u16[i] & 31];
  return r;
}
// AVX512-BF16 (vcvtne2ps2bf16, the result as 32 16-bit words): words 0 to 15 b's floats, 16 to 31
// a's, rounded to nearest even; a NaN stays a quiet NaN, a denormal reads as zero.
inline uint16_t bf16_convert(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40u);
  if ((u & 0x7F800000u) == 0) return uint16_t((u & 0x80000000u) >> 16);
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline __m512i _mm512_cvtne2ps_pbh(__m512 a, __m512 b) {
  __m512i r;
  for (int i = 0; i < 16; ++i) {
    r.u16[i] = bf16_convert(b.f[i]);
    r.u16[16 + i] = bf16_convert(a.f[i]);
  }
  return r;
}
// 16-bit lanes (AVX512BW), for the sparse bf16 kernel's decode.
inline __m512i _mm512_set1_epi16(int16_t v) {
  __m512i r;
  for (int i = 0; i < 32; ++i) r.i16[i] = v;
  return r;
}
inline __m512i _mm512_maskz_loadu_epi16(__mmask32 k, const void* p) {  // reads only the masked words
  __m512i r = _mm512_setzero_si512();
  for (int i = 0; i < 32; ++i)
    if (k >> i & 1) std::memcpy(&r.u16[i], static_cast<const char*>(p) + 2 * i, 2);
  return r;
}
inline __m512i _mm512_max_epu16(__m512i a, __m512i b) {
  for (int i = 0; i < 32; ++i) a.u16[i] = std::max(a.u16[i], b.u16[i]);
  return a;
}
inline __m512i _mm512_srli_epi16(__m512i a, unsigned n) {
  for (int i = 0; i < 32; ++i) a.u16[i] = n > 15 ? 0 : uint16_t(a.u16[i] >> n);
  return a;
}
inline __mmask32 _mm512_test_epi16_mask(__m512i a, __m512i b) {
  __mmask32 k = 0;
  for (int i = 0; i < 32; ++i)
    if (a.u16[i] & b.u16[i]) k |= __mmask32(1) << i;
  return k;
}
inline __m512i _mm512_maskz_permutexvar_epi16(__mmask32 k, __m512i idx, __m512i a) {
  __m512i r;
  for (int i = 0; i < 32; ++i) r.u16[i] = (k >> i & 1) ? a.u16[idx.u16[i] & 31] : 0;
  return r;
}
inline __m256i _mm512_castsi512_si256(__m512i a) {
  __m256i r;
  std::memcpy(&r, &a, 32);
  return r;
}
inline __m256i _mm512_extracti64x4_epi64(__m512i a, int i) {
  __m256i r;
  std::memcpy(&r, a.u8 + 32 * (i & 1), 32);
  return r;
}
// AVX512-BF16 (vdpbf16ps, with the bf16 pairs as 32-bit words): per 32-bit lane, src plus the
// product of the high halves, then plus that of the low halves, as Intel's pseudocode orders
// them; denormal inputs and results flushed to zero, round to nearest even. A bf16 x bf16 product
// is exact in float.
inline float bf16_word_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  if ((u & 0x7F800000u) == 0) u &= 0x80000000u;  // a denormal is read as zero
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float flush_denormal(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7F800000u) == 0) u &= 0x80000000u;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __m512 _mm512_dpbf16_ps(__m512 src, __m512i a, __m512i b) {
  for (int i = 0; i < 16; ++i) {
    float v = flush_denormal(src.f[i]);
    v = flush_denormal(v + bf16_word_to_float(a.u16[2 * i + 1]) * bf16_word_to_float(b.u16[2 * i + 1]));
    src.f[i] = flush_denormal(v + bf16_word_to_float(a.u16[2 * i]) * bf16_word_to_float(b.u16[2 * i]));
  }
  return src;
}
// vpmultishiftqb: byte j of each 64-bit lane of the result is the 8 bits of that lane of b from
// bit a[j] & 63 on, wrapping around the lane.
inline __m512i _mm512_multishift_epi64_epi8(__m512i a, __m512i b) {
  __m512i r;
  for (int q = 0; q < 8; ++q)
    for (int j = 0; j < 8; ++j) {
      const int at = a.u8[8 * q + j] & 63;
      const uint64_t v = b.u64[q];
      r.u8[8 * q + j] = uint8_t(at == 0 ? v : (v >> at) | (v << (64 - at)));
    }
  return r;
}
inline __m512i _mm512_max_epu8(__m512i a, __m512i b) {
  for (int i = 0; i < 64; ++i) a.u8[i] = std::max(a.u8[i], b.u8[i]);
  return a;
}
// Round to nearest even (the MXCSR default), as the hardware converts.
inline __m512 _mm512_cvtepi32_ps(__m512i a) {
  __m512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = static_cast<float>(a.i32[i]);
  return r;
}
// AVX512-VNNI: per 32-bit lane, src + the two signed 16-bit products of a and b, wrapping
// (vpdpwssd; the saturating form is vpdpwssds).
inline __m512i _mm512_dpwssd_epi32(__m512i src, __m512i a, __m512i b) {
  for (int i = 0; i < 16; ++i) {
    const int64_t sum = int64_t(a.i16[2 * i]) * b.i16[2 * i] + int64_t(a.i16[2 * i + 1]) * b.i16[2 * i + 1];
    src.u32[i] = uint32_t(int64_t(src.i32[i]) + sum);
  }
  return src;
}
// AVX512-VNNI: per 32-bit lane, src + the four products of a's unsigned bytes and b's signed
// ones, wrapping (vpdpbusd; the saturating form is vpdpbusds).
inline __m512i _mm512_dpbusd_epi32(__m512i src, __m512i a, __m512i b) {
  for (int i = 0; i < 16; ++i) {
    int64_t sum = 0;
    for (int t = 0; t < 4; ++t) sum += int64_t(a.u8[4 * i + t]) * b.i8[4 * i + t];
    src.u32[i] = uint32_t(int64_t(src.i32[i]) + sum);
  }
  return src;
}
// The sign bits of the bytes (vpmovb2m) and a byte blend by mask (vpblendmb: b where set).
inline __mmask64 _mm512_movepi8_mask(__m512i a) {
  __mmask64 k = 0;
  for (int i = 0; i < 64; ++i) k |= __mmask64(a.u8[i] >> 7) << i;
  return k;
}
inline __m512i _mm512_mask_blend_epi8(__mmask64 k, __m512i a, __m512i b) {
  for (int i = 0; i < 64; ++i) a.u8[i] = (k >> i & 1) ? b.u8[i] : a.u8[i];
  return a;
}

inline __m512 _mm512_add_ps(__m512 a, __m512 b) {
  for (int i = 0; i < 16; ++i) a.f[i] += b.f[i];
  return a;
}
inline __m512 _mm512_mul_ps(__m512 a, __m512 b) {
  for (int i = 0; i < 16; ++i) a.f[i] *= b.f[i];
  return a;
}
inline __m512 _mm512_fmadd_ps(__m512 a, __m512 b, __m512 c) {
  for (int i = 0; i < 16; ++i) c.f[i] = std::fma(a.f[i], b.f[i], c.f[i]);
  return c;
}
inline float _mm512_reduce_add_ps(__m512 v) {
  float s = 0.f;
  for (float x : v.f) s += x;
  return s;
}
inline __m512 _mm512_maskz_mov_ps(__mmask16 k, __m512 v) {
  for (int i = 0; i < 16; ++i) if (!(k >> i & 1)) v.f[i] = 0.f;
  return v;
}
inline __m512 _mm512_mask_blend_ps(__mmask16 k, __m512 a, __m512 b) {
  for (int i = 0; i < 16; ++i) if (k >> i & 1) a.f[i] = b.f[i];
  return a;
}
inline __m512 _mm512_permutexvar_ps(__m512i idx, __m512 a) {  // idx bits 0..3
  __m512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = a.f[idx.u32[i] & 15];
  return r;
}
inline __m512 _mm512_permutex2var_ps(__m512 a, __m512i idx, __m512 b) {  // bit 4 picks b
  __m512 r;
  for (int i = 0; i < 16; ++i) r.f[i] = (idx.u32[i] & 16 ? b : a).f[idx.u32[i] & 15];
  return r;
}

inline __m512i _mm512_and_si512(__m512i a, __m512i b) {
  for (int i = 0; i < 8; ++i) a.u64[i] &= b.u64[i];
  return a;
}
inline __m512i _mm512_max_epu32(__m512i a, __m512i b) {
  for (int i = 0; i < 16; ++i) a.u32[i] = std::max(a.u32[i], b.u32[i]);
  return a;
}
inline uint32_t _mm512_reduce_max_epu32(__m512i a) {
  uint32_t m = 0;
  for (uint32_t v : a.u32) m = std::max(m, v);
  return m;
}
inline uint32_t _mm512_mask_reduce_max_epu32(__mmask16 k, __m512i a) {
  uint32_t m = 0;
  for (int i = 0; i < 16; ++i) if (k >> i & 1) m = std::max(m, a.u32[i]);
  return m;
}
inline __m512i _mm512_maskz_mov_epi32(__mmask16 k, __m512i a) {
  for (int i = 0; i < 16; ++i) if (!(k >> i & 1)) a.u32[i] = 0;
  return a;
}
// Rounding to an integer in the current mode (the kernels ask for nearest even, the default),
// vmaxps / vminps (the second operand when either is NaN), conversion by the current mode.
inline __m512 _mm512_roundscale_ps(__m512 a, int) {
  for (float& v : a.f) v = std::nearbyint(v);
  return a;
}
inline __m512 _mm512_max_ps(__m512 a, __m512 b) {
  for (int i = 0; i < 16; ++i) a.f[i] = a.f[i] > b.f[i] ? a.f[i] : b.f[i];
  return a;
}
inline __m512 _mm512_min_ps(__m512 a, __m512 b) {
  for (int i = 0; i < 16; ++i) a.f[i] = a.f[i] < b.f[i] ? a.f[i] : b.f[i];
  return a;
}
inline __m512i _mm512_cvtps_epi32(__m512 a) {
  __m512i r;
  for (int i = 0; i < 16; ++i) r.i32[i] = static_cast<int32_t>(std::nearbyint(a.f[i]));
  return r;
}
inline int _mm512_reduce_add_epi32(__m512i a) {
  uint32_t sum = 0;
  for (int i = 0; i < 16; ++i) sum += a.u32[i];
  return static_cast<int>(sum);
}
inline __mmask16 _mm512_test_epi32_mask(__m512i a, __m512i b) {
  __mmask16 k = 0;
  for (int i = 0; i < 16; ++i) if (a.u32[i] & b.u32[i]) k |= __mmask16(1u << i);
  return k;
}
inline __m512i _mm512_srli_epi32(__m512i a, unsigned n) {
  for (int i = 0; i < 16; ++i) a.u32[i] = n > 31 ? 0 : a.u32[i] >> n;
  return a;
}
inline __m512i _mm512_srl_epi32(__m512i a, __m128i count) {  // the low 64 bits of count
  const uint64_t n = uint64_t(count.u32[0]) | uint64_t(count.u32[1]) << 32;
  for (int i = 0; i < 16; ++i) a.u32[i] = n > 31 ? 0 : a.u32[i] >> n;
  return a;
}
inline __m512i _mm512_srlv_epi32(__m512i a, __m512i count) {
  for (int i = 0; i < 16; ++i) a.u32[i] = count.u32[i] > 31 ? 0 : a.u32[i] >> count.u32[i];
  return a;
}
inline __m512i _mm512_shuffle_epi8(__m512i a, __m512i b) {  // within each 128-bit lane
  __m512i r;
  for (int i = 0; i < 64; ++i)
    r.u8[i] = b.u8[i] & 0x80 ? 0 : a.u8[(i & ~15) + (b.u8[i] & 15)];
  return r;
}
inline __m512i _mm512_broadcast_i32x4(__m128i a) {
  __m512i r;
  for (int l = 0; l < 4; ++l) std::memcpy(r.u8 + 16 * l, a.u8, 16);
  return r;
}
inline __m512i _mm512_cvtepu8_epi32(__m128i a) {
  __m512i r;
  for (int i = 0; i < 16; ++i) r.u32[i] = a.u8[i];
  return r;
}
inline __m512i _mm512_cvtepu16_epi32(__m256i a) {
  __m512i r;
  for (int i = 0; i < 16; ++i) r.u32[i] = a.u16[i];
  return r;
}

// For the AMX kernel's bf16 rounding.
inline __m512i _mm512_add_epi32(__m512i a, __m512i b) {
  for (int i = 0; i < 16; ++i) a.u32[i] += b.u32[i];
  return a;
}
// The fused int8 kernel's tables (vpmovdb: each int32 truncated to its low byte).
inline __m128i _mm512_cvtepi32_epi8(__m512i a) {
  __m128i r;
  for (int i = 0; i < 16; ++i) r.u8[i] = uint8_t(a.u32[i]);
  return r;
}
inline void _mm_storeu_si128(__m128i* p, __m128i v) { std::memcpy(p, &v, 16); }
// The fused int8 kernel's staging of many rows (vpgatherdd: lane i from base + index[i] * scale).
inline __m512i _mm512_i32gather_epi32(__m512i index, const void* base, int scale) {
  __m512i r;
  for (int i = 0; i < 16; ++i)
    std::memcpy(&r.i32[i], static_cast<const char*>(base) + int64_t(index.i32[i]) * scale, 4);
  return r;
}
// The fused int8 kernel's staging of few rows.
inline __m512i _mm512_xor_si512(__m512i a, __m512i b) {
  for (int i = 0; i < 16; ++i) a.u32[i] ^= b.u32[i];
  return a;
}
// The fused int8 kernel's epilogue.
inline __m512i _mm512_sub_epi32(__m512i a, __m512i b) {
  for (int i = 0; i < 16; ++i) a.u32[i] -= b.u32[i];
  return a;
}
inline __m512i _mm512_slli_epi32(__m512i a, unsigned n) {
  for (int i = 0; i < 16; ++i) a.u32[i] = n > 31 ? 0 : a.u32[i] << n;
  return a;
}
inline __m512i _mm512_mask_mov_epi32(__m512i src, __mmask16 k, __m512i a) {
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) src.u32[i] = a.u32[i];
  return src;
}
#undef _mm512_cmp_ps_mask
#ifndef _CMP_UNORD_Q
#define _CMP_UNORD_Q 3
#endif
inline __mmask16 _mm512_cmp_ps_mask(__m512 a, __m512 b, int predicate) {  // _CMP_UNORD_Q only
  __mmask16 k = 0;
  for (int i = 0; i < 16; ++i)
    if (predicate == _CMP_UNORD_Q && (a.f[i] != a.f[i] || b.f[i] != b.f[i])) k = __mmask16(k | 1u << i);
  return k;
}

// AMX: eight tiles of up to 16 rows of 64 bytes, shaped by the configuration that
// _tile_loadconfig reads (palette 1: byte 0 the palette, bytes 16 + 2 t the bytes per row of tile
// t, byte 48 + t its rows). An instruction on a tile the configuration does not fit is a fault on
// the hardware; here it aborts. _tile_dpbf16ps follows Intel's pseudocode: per pair, its two
// products added in turn to the float sum (the hardware flushes denormals: the tests make none).
struct AmxTiles {
  bool configured = false;
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  uint8_t data[8][16][64] = {};
};
inline AmxTiles& amx_tiles() {
  static thread_local AmxTiles t;
  return t;
}
inline void amx_require(bool ok) {
  if (!ok) __builtin_trap();
}
#undef _tile_loadconfig
#undef _tile_release
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
inline void _tile_loadconfig(const void* config) {
  const uint8_t* c = static_cast<const uint8_t*>(config);
  AmxTiles& t = amx_tiles();
  amx_require(c[0] == 1);
  for (int i = 0; i < 8; ++i) {
    std::memcpy(&t.colsb[i], c + 16 + 2 * i, 2);
    t.rows[i] = c[48 + i];
    amx_require(t.rows[i] <= 16 && t.colsb[i] <= 64 && t.colsb[i] % 4 == 0);
  }
  std::memset(t.data, 0, sizeof t.data);
  t.configured = true;
}
inline void _tile_release() { amx_tiles() = AmxTiles(); }
inline void _tile_zero(int tile) {
  amx_require(amx_tiles().configured);
  std::memset(amx_tiles().data[tile], 0, sizeof amx_tiles().data[tile]);
}
inline void _tile_loadd(int tile, const void* base, long stride) {
  AmxTiles& t = amx_tiles();
  amx_require(t.configured && t.rows[tile] > 0);
  std::memset(t.data[tile], 0, sizeof t.data[tile]);
  for (int r = 0; r < t.rows[tile]; ++r)
    std::memcpy(t.data[tile][r], static_cast<const uint8_t*>(base) + r * stride, t.colsb[tile]);
}
inline void _tile_stored(int tile, void* base, long stride) {
  AmxTiles& t = amx_tiles();
  amx_require(t.configured && t.rows[tile] > 0);
  for (int r = 0; r < t.rows[tile]; ++r)
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, t.data[tile][r], t.colsb[tile]);
}
inline float amx_bf16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline void _tile_dpbf16ps(int c, int a, int b) {
  AmxTiles& t = amx_tiles();
  amx_require(t.configured && t.rows[a] == t.rows[c] && t.colsb[b] == t.colsb[c] && t.rows[b] * 4 == t.colsb[a]);
  for (int m = 0; m < t.rows[c]; ++m)
    for (int k = 0; k < t.colsb[a] / 4; ++k)
      for (int n = 0; n < t.colsb[c] / 4; ++n) {
        float sum;
        std::memcpy(&sum, t.data[c][m] + 4 * n, 4);
        sum += amx_bf16(t.data[a][m] + 4 * k) * amx_bf16(t.data[b][k] + 4 * n);
        sum += amx_bf16(t.data[a][m] + 4 * k + 2) * amx_bf16(t.data[b][k] + 4 * n + 2);
        std::memcpy(t.data[c][m] + 4 * n, &sum, 4);
      }
}
