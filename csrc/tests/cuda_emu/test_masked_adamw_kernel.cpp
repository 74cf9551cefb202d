// masked_adamw_kernel.cu under the emulator: launch_masked_adamw_step against adamw_update
// (core/adamw.h, the CPU kernel's per-element rule) on the host, bit for bit: the fused steps
// are explicit fmaf calls and the kernel rounds its other products with __fmul_rn, so nvcc's
// contraction (the FMA build) cannot change them. float32, float16 and bfloat16; with and
// without amsgrad, maximize and weight decay; both lerp branches; aligned (the 16-byte vector
// kernel) and misaligned (the scalar kernel) pointers.
#include "core/adamw.h"
#include "harness.h"

using namespace dcx;
using dcx::cuda::Dtype;

namespace {

struct Case {
  double beta1, beta2, weight_decay;
  bool amsgrad, maximize;
};

template <typename T>
void test_adamw(int64_t n, size_t misalign, const Case& c, int64_t step, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud(0.f, 0.1f);
  h::Buf<T> p(n, misalign), g(n, misalign), m(n, misalign), v(n, misalign), x(n, misalign);
  h::Buf<uint8_t> k(n, misalign);
  std::vector<float> pr(n), mr(n), vr(n), xr(n);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = h::from_f<T>(nd(rng));
    g[i] = h::from_f<T>(nd(rng));
    m[i] = h::from_f<T>(0.1f * nd(rng));
    v[i] = h::from_f<T>(ud(rng));
    x[i] = h::from_f<T>(ud(rng));
    k[i] = (rng() % 4) ? 1 : 0;
  }
  const AdamwHyper hy =
      make_adamw_hyper(step, 1e-2, c.beta1, c.beta2, 1e-8, c.weight_decay, c.amsgrad, c.maximize);
  for (int64_t i = 0; i < n; ++i) {
    float pf = h::to_f(p[i]), mf = h::to_f(m[i]), vf = h::to_f(v[i]), xf = h::to_f(x[i]);
    if (c.amsgrad) {
      adamw_update<true>(pf, h::to_f(g[i]), mf, vf, xf, k[i] != 0, hy);
    } else {
      adamw_update<false>(pf, h::to_f(g[i]), mf, vf, xf, k[i] != 0, hy);
    }
    pr[i] = h::to_f(h::from_f<T>(pf));
    mr[i] = h::to_f(h::from_f<T>(mf));
    vr[i] = h::to_f(h::from_f<T>(vf));
    xr[i] = c.amsgrad ? h::to_f(h::from_f<T>(xf)) : h::to_f(x[i]);
  }
  const cudaError_t err =
      cuda::launch_masked_adamw_step(h::dtype_of<T>(), p.data(), g.data(), k.data(), m.data(),
                                     v.data(), c.amsgrad ? x.data() : nullptr, n, hy, nullptr);
  HCHECK(err == cudaSuccess, "err %d", int(err));
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!h::bits_equal(h::to_f(p[i]), pr[i]) || !h::bits_equal(h::to_f(m[i]), mr[i]) ||
        !h::bits_equal(h::to_f(v[i]), vr[i]) || !h::bits_equal(h::to_f(x[i]), xr[i])) {
      if (bad++ < 3)
        std::printf("  adamw %s n=%lld i=%lld: param %g vs %g, exp_avg %g vs %g, exp_avg_sq %g vs %g\n",
                    h::name_of<T>(), (long long)n, (long long)i, h::to_f(p[i]), pr[i],
                    h::to_f(m[i]), mr[i], h::to_f(v[i]), vr[i]);
    }
  }
  HCHECK(bad == 0, "masked_adamw %s n=%lld misalign=%zu beta1=%g amsgrad=%d maximize=%d: %d wrong",
         h::name_of<T>(), (long long)n, misalign, c.beta1, c.amsgrad, c.maximize, bad);
}

}  // namespace

int main() {
  const Case cases[] = {
      {0.9, 0.999, 1e-2, false, false},
      {0.9, 0.999, 0.0, true, false},
      {0.3, 0.99, 0.1, false, true},  // 1 - beta1 >= 0.5: lerp counts from the end
      {0.6, 0.9, 1e-2, true, true},
  };
  uint32_t seed = 1;
  int64_t step = 1;
  for (int64_t n : {1, 5, 37, 1000, 4099})
    for (size_t mis : {size_t(0), size_t(1)})
      for (const Case& c : cases) {
        test_adamw<float>(n, mis, c, step, seed++);
        test_adamw<__half>(n, mis, c, step, seed++);
        test_adamw<__nv_bfloat16>(n, mis, c, step, seed++);
        step = step % 7 + 1;
      }
  float p = 1.f;
  const AdamwHyper hy = make_adamw_hyper(1, 0.1, 0.9, 0.999, 1e-8, 0, false, false);
  HCHECK(cuda::launch_masked_adamw_step(Dtype::kFloat64, &p, &p, nullptr, &p, &p, nullptr, 1, hy,
                                        nullptr) == cudaErrorInvalidValue, "float64 refused");
  const AdamwHyper ams = make_adamw_hyper(1, 0.1, 0.9, 0.999, 1e-8, 0, true, false);
  HCHECK(cuda::launch_masked_adamw_step(Dtype::kFloat32, &p, &p, nullptr, &p, &p, nullptr, 1, ams,
                                        nullptr) == cudaErrorInvalidValue,
         "amsgrad without max_sq refused");
  return h::finish("emulated masked_adamw kernels");
}
