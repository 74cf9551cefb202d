// masked_sgd_kernel.cu under the emulator: launch_masked_sgd_step against sgd_update (core/sgd.h,
// the CPU kernel's per-element rule) on the host, bit for bit: the rule is explicit fmaf calls,
// so nvcc's contraction cannot change it. float32, float16 and bfloat16; every kind of step;
// aligned (the 16-byte vector kernel) and misaligned (the scalar kernel) pointers.
#include "core/sgd.h"
#include "harness.h"

using namespace dcx;
using dcx::cuda::Dtype;

namespace {

template <SgdKind K>
void ref_step(float& p, float g, float& b, bool keep, const SgdHyper& hy) {
  sgd_update<K>(p, g, b, keep, hy);
}

template <typename T>
void test_sgd(int64_t n, size_t misalign, bool momentum, bool nesterov, bool init, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  h::Buf<T> p(n, misalign), g(n, misalign), b(n, misalign);
  h::Buf<uint8_t> m(n, misalign);
  std::vector<float> pr(n), gr(n), br(n);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = h::from_f<T>(nd(rng));
    g[i] = h::from_f<T>(nd(rng));
    b[i] = h::from_f<T>(nd(rng));
    m[i] = (rng() % 4) ? 1 : 0;
    pr[i] = h::to_f(p[i]);
    gr[i] = h::to_f(g[i]);
    br[i] = h::to_f(b[i]);
  }
  const SgdHyper hy = make_sgd_hyper(0.1, momentum ? 0.9 : 0.0, 0.1, 0.01, nesterov, false, init);
  for (int64_t i = 0; i < n; ++i) {
    float pf = pr[i], bf = br[i];
    switch (sgd_kind(hy)) {
      case SgdKind::kPlain: ref_step<SgdKind::kPlain>(pf, gr[i], bf, m[i] != 0, hy); break;
      case SgdKind::kMomentum: ref_step<SgdKind::kMomentum>(pf, gr[i], bf, m[i] != 0, hy); break;
      case SgdKind::kMomentumInit: ref_step<SgdKind::kMomentumInit>(pf, gr[i], bf, m[i] != 0, hy); break;
      case SgdKind::kNesterov: ref_step<SgdKind::kNesterov>(pf, gr[i], bf, m[i] != 0, hy); break;
      case SgdKind::kNesterovInit: ref_step<SgdKind::kNesterovInit>(pf, gr[i], bf, m[i] != 0, hy); break;
    }
    pr[i] = h::to_f(h::from_f<T>(pf));
    br[i] = h::to_f(h::from_f<T>(bf));
  }
  const cudaError_t err = cuda::launch_masked_sgd_step(h::dtype_of<T>(), p.data(), g.data(), m.data(),
                                                       momentum ? b.data() : nullptr, n, hy, nullptr);
  HCHECK(err == cudaSuccess, "err %d", int(err));
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!h::bits_equal(h::to_f(p[i]), pr[i]) || (momentum && !h::bits_equal(h::to_f(b[i]), br[i]))) {
      if (bad++ < 3)
        std::printf("  sgd %s n=%lld i=%lld: param %g vs %g, buf %g vs %g\n", h::name_of<T>(),
                    (long long)n, (long long)i, h::to_f(p[i]), pr[i], h::to_f(b[i]), br[i]);
    }
  }
  HCHECK(bad == 0, "masked_sgd %s n=%lld misalign=%zu momentum=%d nesterov=%d init=%d: %d wrong",
         h::name_of<T>(), (long long)n, misalign, momentum, nesterov, init, bad);
}

}  // namespace

int main() {
  uint32_t seed = 1;
  for (int64_t n : {1, 5, 37, 1000, 4099})
    for (size_t mis : {size_t(0), size_t(1)})
      for (int kind = 0; kind < 5; ++kind) {
        const bool mom = kind > 0, nest = kind >= 3, init = kind == 2 || kind == 4;
        test_sgd<float>(n, mis, mom, nest, init, seed++);
        test_sgd<__half>(n, mis, mom, nest, init, seed++);
        test_sgd<__nv_bfloat16>(n, mis, mom, nest, init, seed++);
      }
  float p = 1.f;
  const SgdHyper hy = make_sgd_hyper(0.1, 0, 0, 0, false, false, false);
  HCHECK(cuda::launch_masked_sgd_step(Dtype::kFloat64, &p, &p, nullptr, nullptr, 1, hy, nullptr) ==
             cudaErrorInvalidValue, "float64 refused");
  return h::finish("emulated masked_sgd kernels");
}
