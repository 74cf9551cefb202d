// Native tests of the torch-free kernel cores: the masked SGD element update and the per-label
// accumulation with its deterministic chunk plan.
#include <cstdint>
#include <vector>

#include "core/scatter.h"
#include "core/sgd.h"
#include "tests/check.h"

static void test_sgd_plain() {
  const dcx::SgdHyper h = dcx::make_sgd_hyper(0.5, 0.0, 0.0, 0.0, false, false, false);
  float p = 1.0f, unused = 0.0f;
  dcx::sgd_update<dcx::SgdKind::kPlain>(p, 2.0f, unused, true, h);
  CHECK(p == 0.0f);  // 1 - 0.5 * 2
  p = 3.0f;
  dcx::sgd_update<dcx::SgdKind::kPlain>(p, 2.0f, unused, false, h);
  CHECK(p == 0.0f && !std::signbit(p));  // pruned: exactly +0
}

static void test_sgd_momentum_nesterov_decay() {
  // g = 2 + 0.1 * 1 = 2.1; buf = 0.9 * 1 + 2.1 = 3.0; nesterov g = 2.1 + 0.9 * 3.0 = 4.8
  const dcx::SgdHyper h = dcx::make_sgd_hyper(0.5, 0.9, 0.0, 0.1, true, false, false);
  float p = 1.0f, b = 1.0f;
  dcx::sgd_update<dcx::SgdKind::kNesterov>(p, 2.0f, b, true, h);
  CHECK(std::fabs(b - 3.0f) < 1e-6f);
  CHECK(std::fabs(p - (1.0f - 0.5f * 4.8f)) < 1e-6f);
  float q = 1.0f, c = 7.0f;
  dcx::sgd_update<dcx::SgdKind::kNesterov>(q, 2.0f, c, false, h);
  CHECK(q == 0.0f && c == 0.0f);  // pruned: weight and momentum both zero
}

static void test_sgd_first_step_and_maximize() {
  // init_buffer: buf = g (no dampening on the first step), maximize flips the gradient.
  const dcx::SgdHyper h = dcx::make_sgd_hyper(1.0, 0.9, 0.5, 0.0, false, true, true);
  float p = 0.0f, b = 123.0f;
  dcx::sgd_update<dcx::SgdKind::kMomentumInit>(p, 2.0f, b, true, h);
  CHECK(b == -2.0f);
  CHECK(p == 2.0f);
}

static void test_accumulate() {
  const std::vector<float> g = {1, 2, 3, 4, 5, 6};
  const std::vector<int64_t> l = {0, 1, 1, 7, -1, 2};
  const std::vector<uint8_t> m = {1, 1, 0, 1, 1, 1};
  std::vector<double> acc(3, 0.0);
  const int64_t bad = dcx::accumulate_by_label(g.data(), l.data(), m.data(), 6, 3, acc.data());
  CHECK(bad == 2);  // labels 7 and -1 are outside [0, 3) and unmasked
  CHECK(acc[0] == 1 && acc[1] == 2 && acc[2] == 6);
  std::vector<double> all(8, 0.0);
  CHECK(dcx::accumulate_by_label(g.data(), l.data(), nullptr, 6, 8, all.data()) == 1);
  CHECK(all[1] == 5 && all[7] == 4);
}

static void test_sgd_kind() {
  CHECK(dcx::sgd_kind(dcx::make_sgd_hyper(1, 0, 0, 0, false, false, true)) == dcx::SgdKind::kPlain);
  CHECK(dcx::sgd_kind(dcx::make_sgd_hyper(1, 0.9, 0, 0, false, false, false)) == dcx::SgdKind::kMomentum);
  CHECK(dcx::sgd_kind(dcx::make_sgd_hyper(1, 0.9, 0, 0, true, false, true)) == dcx::SgdKind::kNesterovInit);
}

static void test_chunk_plan() {
  CHECK(dcx::plan_chunks(0, 16).num_chunks == 0);
  const dcx::ChunkPlan small = dcx::plan_chunks(100, 16);
  CHECK(small.num_chunks == 1 && small.chunk >= 100);
  const int64_t n = 10000019, k = 1 << 20;
  const dcx::ChunkPlan big = dcx::plan_chunks(n, k);
  CHECK(big.num_chunks * k <= (int64_t(1) << 22));  // partials stay bounded
  CHECK(big.chunk * big.num_chunks >= n && big.chunk * (big.num_chunks - 1) < n);
}

int main() {
  test_sgd_plain();
  test_sgd_momentum_nesterov_decay();
  test_sgd_first_step_and_maximize();
  test_accumulate();
  test_sgd_kind();
  test_chunk_plan();
  return dcx_test::finish("test_sgd_scatter");
}
