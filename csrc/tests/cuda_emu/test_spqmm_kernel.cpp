// spqmm_kernel.cu under the emulator: launch_spqmm (sparse and dense modes, every dense layout,
// 1 to 11 batch rows, float32 / float16 / bfloat16, without and with group scales) and
// launch_spqmm_decode against plain dot products in double on the host, and corrupted layers
// against the flags they must raise. Layers come from tests/spqmm_test_layers.h (the packer
// written out), as in the native tests.
//
// Tolerance: the kernels sum float products in float, in any order and with or without FMA
// contraction. Each output is then within gamma * sum|terms| of the exact sum, gamma = d * 2^-24
// for a depth d of at most k + 3 additions (k terms, the bias, the two partial sums of a group
// split between chunks), and its rounding to T adds u_T (2^-24, 2^-11, 2^-8) of its value. x,
// codebook and bias are T values, so each product of two is exact or one float rounding (u).
// With group scales a weight is the float product codebook * scale, one more rounding per term:
// d = k + 4. The decode writes that product rounded to T, checked bit for bit.
#include <algorithm>
#include <string>

#include "core/spqmm_layout.h"
#include "harness.h"
#include "tests/spqmm_test_layers.h"

using namespace dcx;
using dcx::cuda::Dtype;

namespace {

// Group scales of a layer: [n][ceil(k / sg)] floats, positive, 2^-5 to 2^5 (so the products
// round), none when sg is 0.
struct Scales {
  std::vector<float> s;
  int64_t sg = 0, groups = 0;
  Scales() = default;
  Scales(int64_t n, int64_t k, int64_t group, uint32_t seed) : sg(group), groups((k + group - 1) / group) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> u(-5.f, 5.f);
    s.resize(n * groups);  // exactly n rows: a read of a padding row's scale fails under ASan
    for (auto& v : s) v = std::exp2(u(rng));
  }
  float at(int64_t r, int64_t j) const { return sg > 0 ? s[r * groups + j / sg] : 1.f; }
  void set(cuda::SpqmmCudaArgs& a) const {
    a.group_scale = sg > 0 ? s.data() : nullptr;
    a.scale_group = sg;
    a.scale_groups = groups;
  }
};

// The decoded weight: the codebook value, times its group scale in float when scaled, in T.
template <typename T>
float weight(const std::vector<T>& cb, int32_t id, const Scales& sc, int64_t r, int64_t j) {
  if (id < 0) return 0.f;
  return sc.sg > 0 ? h::to_f(h::from_f<T>(h::to_f(cb[id]) * sc.at(r, j))) : h::to_f(cb[id]);
}

// y [m, n] in T against x W^T + bias in double (x, codebook, bias as rounded to T; the group
// scales' products exact).
template <typename T>
int compare(const std::vector<T>& y, const std::vector<T>& x, const std::vector<int32_t>& ids,
            const std::vector<T>& cb, const std::vector<T>* bias, int64_t m, int64_t n, int64_t k,
            const char* what, const Scales& sc = Scales()) {
  // k terms, the bias, 2 partial sums of a split group; a scaled weight's rounding
  const double gamma = double(k + 3 + (sc.sg > 0)) * 0x1p-24;
  int bad = 0;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t r = 0; r < n; ++r) {
      double ref = bias ? h::to_f((*bias)[r]) : 0.0, mag = std::fabs(ref);
      for (int64_t j = 0; j < k; ++j) {
        const int32_t id = ids[r * k + j];
        if (id < 0) continue;
        const double t = double(h::to_f(cb[id])) * sc.at(r, j) * h::to_f(x[i * k + j]);
        ref += t;
        mag += std::fabs(t);
      }
      const double got = h::to_f(y[i * n + r]);
      const double tol = h::unit_roundoff<T>() * std::fabs(ref) + (1 + h::unit_roundoff<T>()) * gamma * mag;
      if (!(std::fabs(got - ref) <= tol)) {
        if (bad++ < 3)
          std::printf("  %s: y[%lld, %lld] = %.7g, want %.7g (tol %.3g)\n", what, (long long)i,
                      (long long)r, got, ref, tol);
      }
    }
  return bad;
}

cuda::SpqmmCudaArgs base_args(Dtype dt, int device) {
  cuda::SpqmmCudaArgs a{};
  a.dtype = dt;
  a.device = device;
  a.stream = nullptr;
  return a;
}

// The arguments of a sparse-mode layer; x, y, m, the codebook and the rest are the caller's.
cuda::SpqmmCudaArgs sparse_args(Dtype dt, int device, const dcx_test::SparseLayer& l) {
  auto a = base_args(dt, device);
  a.n = l.n;
  a.k = l.k;
  a.dense = false;
  a.codes = l.codes.data();
  a.windows = l.windows.data();
  a.group_ptr = l.group_ptr.data();
  a.chunks = l.chunks.data();
  a.num_chunks = l.num_chunks;
  a.steps = l.steps;
  a.groups = l.groups;
  a.bits = 8;
  return a;
}

template <typename T>
void test_sparse(int64_t n, int64_t k, int kc, int keep, int64_t m, bool with_bias, int device,
                 uint32_t seed, int64_t sg = 0) {
  const dcx_test::SparseLayer l = dcx_test::pack_sparse(n, k, kc, keep, 5, sg);
  const Scales sc = sg > 0 ? Scales(n, k, sg, seed + 7) : Scales();
  const auto x = h::uniform<T>(m * k, seed);
  const auto cb = h::codebook<T>(kc);
  std::vector<T> bias(n);
  for (int64_t r = 0; r < n; ++r) bias[r] = h::from_f<T>(0.5f * float(r % 3) - 0.25f);
  std::vector<T> y(m * n, h::from_f<T>(12345.f));
  std::vector<float> ws(m * n, 0.f);
  int flag = 0;
  auto a = sparse_args(h::dtype_of<T>(), device, l);
  a.x = x.data();
  a.y = y.data();
  a.m = m;
  a.codebook = cb.data();
  a.kc = kc;
  a.bias = with_bias ? bias.data() : nullptr;
  a.ws = ws.data();
  a.bad_flag = &flag;
  sc.set(a);
  const cudaError_t err = cuda::launch_spqmm(a);
  char what[200];
  std::snprintf(what, sizeof what,
                "sparse %s dev%d n=%lld k=%lld kc=%d keep=%d m=%lld bias=%d steps=%lld group=%lld",
                h::name_of<T>(), device, (long long)n, (long long)k, kc, keep, (long long)m, with_bias,
                (long long)a.steps, (long long)sg);
  const int bad = compare(y, x, l.ids, cb, with_bias ? &bias : nullptr, m, n, k, what, sc);
  HCHECK(err == cudaSuccess && flag == 0 && bad == 0, "%s: err %d flag %d, %d wrong", what, int(err), flag, bad);

  // decode: every element of W [n, k], exactly the codebook's value (times its scale) or zero
  std::vector<T> w(n * k, h::from_f<T>(777.f));
  flag = 0;
  const cudaError_t derr = cuda::launch_spqmm_decode(a, w.data());
  int dbad = 0;
  for (int64_t i = 0; i < n * k; ++i) {
    const float want = weight(cb, l.ids[i], sc, i / k, i % k);
    if (!h::bits_equal(h::to_f(w[i]), want) && dbad++ < 3)
      std::printf("  decode w[%lld] = %g, want %g\n", (long long)i, h::to_f(w[i]), want);
  }
  HCHECK(derr == cudaSuccess && flag == 0 && dbad == 0, "decode %s: err %d flag %d, %d wrong", what,
         int(derr), flag, dbad);
}

// Corrupted sparse layers: the flags (1 id >= kc, 2 column >= k, 4 pointers) and no crash.
void test_sparse_flags(int device) {
  for (int which = 0; which < 5; ++which) {
    dcx_test::SparseLayer l = dcx_test::pack_sparse(40, 100, 64, 3, 4);
    int kc = 64, want = 0;
    switch (which) {
      case 0: kc = 20; want = 1; break;                                    // ids past the codebook
      case 1: l.windows[l.windows.size() / 2] = 100; want = 2; break;      // window past K
      case 2: l.windows[l.windows.size() / 2] = -7; want = 2; break;       // negative window
      case 3: l.group_ptr[2] = l.group_ptr[1] - 1; want = 4; break;        // decreasing pointers
      case 4: l.chunks.back() = 3; want = 4; break;                        // chunks not ending at steps
    }
    const auto x = h::uniform<float>(3 * 100, 7);
    const auto cb = h::codebook<float>(64);
    std::vector<float> y(3 * 40), ws(3 * 40, 0.f);
    int flag = 0;
    auto a = sparse_args(Dtype::kFloat32, device, l);
    a.x = x.data();
    a.y = y.data();
    a.m = 3;
    a.codebook = cb.data();
    a.kc = kc;
    a.ws = ws.data();
    a.bad_flag = &flag;
    const cudaError_t err = cuda::launch_spqmm(a);
    HCHECK(err == cudaSuccess && (flag & want) == want, "sparse flags case %d: err %d flag %d want bit %d",
           which, int(err), flag, want);
#if defined(EMU_TSAN)
    // Decreasing group pointers hand one group another's steps, so two half-warps may store the
    // same weight: a race on values the op then discards (it raises on flag 4). Not run under
    // ThreadSanitizer, which would report it; the other corruptions write each weight once.
    if (which == 3) continue;
#endif
    std::vector<float> w(40 * 100);
    flag = 0;
    const cudaError_t derr = cuda::launch_spqmm_decode(a, w.data());
    HCHECK(derr == cudaSuccess && (flag & want) == want, "decode flags case %d: err %d flag %d want bit %d",
           which, int(derr), flag, want);
  }
}

// Group scales on a sparse layer whose windows break window % group + 32 <= group: flag 8 from
// the product, the decode and the structure check alone (m = 0); none on a layer packed for them.
void test_group_flags(int device) {
  constexpr int64_t n = 40, k = 300, sg = 64;
  for (int which = 0; which < 3; ++which) {
    // 0: packed for the groups (no flag); 1: one window moved to cross its group's end; 2: packed
    // without groups (its windows begin at any column)
    dcx_test::SparseLayer l = dcx_test::pack_sparse(n, k, 64, 3, 4, which == 2 ? 0 : sg);
    int want = which == 0 ? 0 : 8;
    if (which == 1) {
      // One window moved to cross its group's end; its step's slots made padding, so that no
      // moved slot lands on a position another slot holds (the decode scatters each kept weight
      // to its position: two slots on one would be two threads writing one element). The flag
      // comes from the window alone.
      const int64_t s = l.steps / 2;
      l.windows[s] = std::min<int32_t>(l.windows[s], 200) / sg * sg + 40;  // 40 + 32 > 64
      std::fill_n(l.codes.begin() + s * dcx::kSpqmmRows, dcx::kSpqmmRows, uint16_t(0));
    }
    const bool crossing = std::any_of(l.windows.begin(), l.windows.end(),
                                      [&](int32_t w) { return w % sg + 32 > sg; });
    HCHECK(crossing == (want == 8), "group flags case %d: the layer %s a crossing window", which,
           crossing ? "has" : "lacks");
    const Scales sc(n, k, sg, 11);
    const auto x = h::uniform<float>(3 * k, 7);
    const auto cb = h::codebook<float>(64);
    std::vector<float> y(3 * n), ws(3 * n, 0.f), w(n * k);
    for (int64_t m : {3, 0}) {
      int flag = 0;
      auto a = sparse_args(Dtype::kFloat32, device, l);
      a.x = x.data();
      a.y = y.data();
      a.m = m;
      a.codebook = cb.data();
      a.kc = 64;
      a.ws = ws.data();
      a.bad_flag = &flag;
      sc.set(a);
      const cudaError_t err = cuda::launch_spqmm(a);
      HCHECK(err == cudaSuccess && (want ? (flag & want) == want : flag == 0),
             "group flags case %d m=%lld: err %d flag %d want %d", which, (long long)m, int(err), flag,
             want);
      if (m == 0) continue;
      flag = 0;
      const cudaError_t derr = cuda::launch_spqmm_decode(a, w.data());
      HCHECK(derr == cudaSuccess && (want ? (flag & want) == want : flag == 0),
             "group decode flags case %d: err %d flag %d want %d", which, int(derr), flag, want);
    }
  }
}

template <typename T>
void test_dense(int64_t n, int64_t k, int bits, int64_t m, bool with_bias, int kc_cut, uint32_t seed,
                int64_t sg = 0) {
  const Scales sc = sg > 0 ? Scales(n, k, sg, seed + 7) : Scales();
  const int k_ids = 1 << bits;
  const dcx_test::DenseLayer l = dcx_test::pack_dense(n, k, bits, k_ids);
  const int kc = k_ids - kc_cut;  // kc_cut > 0: some ids lie past the codebook (flag 1)
  const auto x = h::uniform<T>(m * k, seed);
  auto cb = h::codebook<T>(kc);
  std::vector<T> bias(n);
  for (int64_t r = 0; r < n; ++r) bias[r] = h::from_f<T>(0.5f * float(r % 3) - 0.25f);
  std::vector<T> y(m * n, h::from_f<T>(12345.f));
  int flag = 0;
  auto a = base_args(h::dtype_of<T>(), 0);
  a.x = x.data();
  a.y = y.data();
  a.m = m;
  a.n = n;
  a.k = k;
  a.dense = true;
  a.dense_codes = l.codes.data();
  a.bits = bits;
  a.codebook = cb.data();
  a.kc = kc;
  a.bias = with_bias ? bias.data() : nullptr;
  a.bad_flag = &flag;
  sc.set(a);
  const cudaError_t err = cuda::launch_spqmm(a);
  char what[160];
  std::snprintf(what, sizeof what, "dense %s n=%lld k=%lld bits=%d m=%lld bias=%d kc=%d group=%lld",
                h::name_of<T>(), (long long)n, (long long)k, bits, (long long)m, with_bias, kc,
                (long long)sg);
  std::vector<int32_t> ids = l.ids;
  for (auto& id : ids)
    if (id >= kc) id = -1;  // an id past the codebook reads 0 (table zero-filled)
  const int bad = compare(y, x, ids, cb, with_bias ? &bias : nullptr, m, n, k, what, sc);
  const bool any_past = std::any_of(l.ids.begin(), l.ids.end(), [&](int32_t id) { return id >= kc; });
  HCHECK(err == cudaSuccess && flag == int(any_past) && bad == 0, "%s: err %d flag %d (want %d), %d wrong",
         what, int(err), flag, int(any_past), bad);
  if (m == 1) {  // the decode, once per layer
    std::vector<T> w(n * k, h::from_f<T>(777.f));
    flag = 0;
    const cudaError_t derr = cuda::launch_spqmm_decode(a, w.data());
    int dbad = 0;
    for (int64_t i = 0; i < n * k; ++i) {
      const float want = weight(cb, ids[i], sc, i / k, i % k);
      if (!h::bits_equal(h::to_f(w[i]), want) && dbad++ < 3)
        std::printf("  dense decode w[%lld] = %g, want %g\n", (long long)i, h::to_f(w[i]), want);
    }
    HCHECK(derr == cudaSuccess && flag == int(any_past) && dbad == 0, "decode %s: err %d flag %d, %d wrong",
           what, int(derr), flag, dbad);
  }
}

}  // namespace

// Parts: "dense" (every layout, 1-11 rows, the decode), "sparse" (two devices' limits, the
// corruption flags).
int main(int argc, char** argv) {
  uint32_t seed = 100;
  if (h::wanted(argc, argv, "dense")) {
    const int64_t shapes[][2] = {{1, 1}, {7, 5}, {33, 129}, {16, 256}, {20, 300}};
    for (int bits : {2, 4, 5, 6, 8})
      for (auto& s : shapes)
        for (int64_t m : {1, 3, 8, 11}) {
          test_dense<float>(s[0], s[1], bits, m, m != 3, 0, seed++);
          if (m == 3) {
            test_dense<__half>(s[0], s[1], bits, m, true, 0, seed++);
            test_dense<__nv_bfloat16>(s[0], s[1], bits, m, true, 0, seed++);
          }
        }
    test_dense<float>(9, 40, 4, 2, true, 3, seed++);   // ids past the codebook: flag 1
    test_dense<float>(9, 160, 8, 1, true, 100, seed++);
    // group scales: groups of 32, 64 and 96 columns (k = 5, 129, 300 are no multiple of them;
    // k = 256 reads 16 ids per load and jumps groups)
    for (int bits : {2, 4, 5, 6, 8})
      for (auto& s : shapes)
        for (int64_t sg : {32, 64, 96}) {
          test_dense<float>(s[0], s[1], bits, 1, true, 0, seed++, sg);
          test_dense<float>(s[0], s[1], bits, 11, false, 0, seed++, sg);
          if (sg == 64) {
            test_dense<__half>(s[0], s[1], bits, 3, true, 0, seed++, sg);
            test_dense<__nv_bfloat16>(s[0], s[1], bits, 3, true, 0, seed++, sg);
          }
        }
    test_dense<float>(9, 40, 4, 2, true, 3, seed++, 32);  // ids past the codebook, scaled
  }
  if (h::wanted(argc, argv, "sparse")) {
    // device 1: limits that never stage x in shared memory and a smaller grid (cuda_emu reads
    // EMU_*_DEV1 for device 1)
    setenv("EMU_SMEM_PER_SM_DEV1", "4096", 1);
    setenv("EMU_SMS_DEV1", "1", 1);
    const int64_t shapes[][2] = {{1, 1}, {16, 32}, {33, 100}, {50, 300}, {130, 64}};
    for (int device : {0, 1})
      for (int kc : {16, 32, 64, 256})
        for (auto& s : shapes)
          for (int64_t m : {1, 2, 5, 11}) {
            const int keep = 1 + int(seed % 5);
            test_sparse<float>(s[0], s[1], kc, keep, m, m != 2, device, seed++);
            if (m == 2) {
              test_sparse<__half>(s[0], s[1], kc, keep, m, true, device, seed++);
              test_sparse<__nv_bfloat16>(s[0], s[1], kc, keep, m, true, device, seed++);
            }
          }
    // group scales (windows packed within groups of 32, 64, 96 columns)
    for (int device : {0, 1})
      for (int kc : {16, 256})
        for (auto& s : shapes)
          for (int64_t sg : {32, 64, 96}) {
            const int keep = 1 + int(seed % 5);
            test_sparse<float>(s[0], s[1], kc, keep, 1, true, device, seed++, sg);
            test_sparse<float>(s[0], s[1], kc, keep, 5, false, device, seed++, sg);
            if (sg == 64) {
              test_sparse<__half>(s[0], s[1], kc, keep, 2, true, device, seed++, sg);
              test_sparse<__nv_bfloat16>(s[0], s[1], kc, keep, 11, true, device, seed++, sg);
            }
          }
    test_sparse_flags(0);
    test_sparse_flags(1);
    test_group_flags(0);
    test_group_flags(1);
  }
  return h::finish("emulated spqmm kernels");
}
