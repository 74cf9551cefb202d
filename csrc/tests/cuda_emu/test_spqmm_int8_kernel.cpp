// spqmm_int8_kernel.cu under the emulator: launch_spqmm_int8 against the rule of
// core/spqmm_int8.h written out on the host, bit for bit: the int8 activations and their scales,
// the exact int32 block dots, and the float sum over blocks with the fused multiply-adds the
// kernel spells out (fmaf), so that nvcc's contraction has nothing left to choose. With group
// scales each block's float term is dot * (sx * gs), gs its row's scale for the block's group
// (positive, 2^-5 to 2^5, groups of 32, 64 or 96 columns, k a multiple of them or not).
#include <algorithm>
#include <cmath>

#include "core/spqmm_int8.h"
#include "harness.h"
#include "tests/spqmm_test_layers.h"

using namespace dcx;

namespace {

// spqmm_int8: the rule of core/spqmm_int8.h written out here on the host (same float operations
// in the same order: int32 dots per block of 32, float sums over blocks), so results are exact.
template <typename T>
void test_int8(int64_t n, int64_t k, int bits, int64_t m, bool with_bias, uint32_t seed, int64_t sg = 0) {
  const int64_t groups = sg > 0 ? (k + sg - 1) / sg : 0;
  std::vector<float> gs(n * groups);  // exactly n rows (ASan)
  {
    std::mt19937 rng(seed + 7);
    std::uniform_real_distribution<float> u(-5.f, 5.f);
    for (auto& v : gs) v = std::exp2(u(rng));
  }
  const int k_ids = 1 << bits;
  const dcx_test::DenseLayer l = dcx_test::pack_dense(n, k, bits, k_ids);
  const int kc = k_ids;
  const auto x = h::uniform<T>(m * k, seed);
  const auto cb = h::codebook<T>(kc);
  std::vector<T> bias(n);
  for (int64_t r = 0; r < n; ++r) bias[r] = h::from_f<T>(0.5f * float(r % 3) - 0.25f);
  const int64_t blocks = q8_blocks(k), ldq = blocks * kQ8Block;
  std::vector<int8_t> xq(m * ldq, 99);
  std::vector<float> xs(m * blocks, -1.f);
  std::vector<T> y(m * n, h::from_f<T>(12345.f));
  int flag = 0;
  cuda::SpqmmInt8CudaArgs a{};
  a.dtype = h::dtype_of<T>();
  a.x = x.data();
  a.y = y.data();
  a.m = m;
  a.n = n;
  a.k = k;
  a.codes = l.codes.data();
  a.bits = bits;
  a.codebook = cb.data();
  a.kc = kc;
  a.bias = with_bias ? bias.data() : nullptr;
  a.group_scale = sg > 0 ? gs.data() : nullptr;
  a.scale_group = sg;
  a.scale_groups = groups;
  a.xq = xq.data();
  a.xs = xs.data();
  a.bad_flag = &flag;
  const cudaError_t err = cuda::launch_spqmm_int8(a);
  // reference
  std::vector<int32_t> rq(m * ldq, 0);
  std::vector<float> rs(m * blocks);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t b = 0; b < blocks; ++b) {
      float amax = 0.f;
      for (int64_t j = b * 32; j < std::min(k, b * 32 + 32); ++j) amax = std::max(amax, std::fabs(h::to_f(x[i * k + j])));
      const float inv = q8_inverse(amax);
      rs[i * blocks + b] = q8_scale(amax);
      for (int64_t j = b * 32; j < std::min(k, b * 32 + 32); ++j) rq[i * ldq + j] = q8_round(h::to_f(x[i * k + j]), inv);
    }
  float camax = 0.f;
  for (int i = 0; i < kc; ++i) camax = std::max(camax, std::fabs(h::to_f(cb[i])));
  const float cinv = q8_inverse(camax, kQ8WMax), sw = q8_scale(camax, kQ8WMax);
  std::vector<int32_t> cq(kc);
  for (int i = 0; i < kc; ++i) cq[i] = q8_round(h::to_f(cb[i]), cinv, kQ8WMax);
  int qbad = 0, bad = 0;
  for (int64_t i = 0; i < m * ldq; ++i) qbad += int32_t(xq[i]) != rq[i];
  for (int64_t i = 0; i < m * blocks; ++i) qbad += !h::bits_equal(xs[i], rs[i]);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r) {
      float acc = 0.f;
      for (int64_t b = 0; b < blocks; ++b) {
        int32_t dot = 0;
        for (int64_t j = b * 32; j < std::min(k, b * 32 + 32); ++j) dot += rq[i * ldq + j] * cq[l.ids[r * k + j]];
        const float g = sg > 0 ? gs[r * groups + b * 32 / sg] : 1.f;
        acc = std::fmaf(float(dot), sg > 0 ? rs[i * blocks + b] * g : rs[i * blocks + b], acc);
      }
      const T want = h::from_f<T>(std::fmaf(acc, sw, with_bias ? h::to_f(bias[r]) : 0.f));
      if (!h::bits_equal(h::to_f(y[i * n + r]), h::to_f(want)) && bad++ < 3)
        std::printf("  int8 y[%lld, %lld] = %.9g, want %.9g\n", (long long)i, (long long)r,
                    h::to_f(y[i * n + r]), h::to_f(want));
    }
  HCHECK(err == cudaSuccess && flag == 0 && qbad == 0 && bad == 0,
         "int8 %s n=%lld k=%lld bits=%d m=%lld group=%lld: err %d flag %d, %d quantization and %d output "
         "mismatches", h::name_of<T>(), (long long)n, (long long)k, bits, (long long)m, (long long)sg,
         int(err), flag, qbad, bad);
}

}  // namespace

int main() {
  uint32_t seed = 100;
  const int64_t shapes[][2] = {{1, 1}, {7, 5}, {33, 129}, {16, 256}, {9, 300}};
  for (int bits : {3, 4, 6, 8})
    for (auto& s : shapes)
      for (int64_t m : {1, 9}) {
        test_int8<float>(s[0], s[1], bits, m, m == 1, seed++);
        if (m == 9) {
          test_int8<__half>(s[0], s[1], bits, m, true, seed++);
          test_int8<__nv_bfloat16>(s[0], s[1], bits, m, true, seed++);
        }
      }
  // group scales
  for (int bits : {3, 4, 6, 8})
    for (auto& s : shapes)
      for (int64_t sg : {32, 64, 96}) {
        test_int8<float>(s[0], s[1], bits, 1, true, seed++, sg);
        test_int8<float>(s[0], s[1], bits, 9, false, seed++, sg);
        if (sg == 64) {
          test_int8<__half>(s[0], s[1], bits, 9, true, seed++, sg);
          test_int8<__nv_bfloat16>(s[0], s[1], bits, 9, true, seed++, sg);
        }
      }
  return h::finish("emulated spqmm_int8 kernels");
}
