// Native tests of the canonical Huffman codec: code lengths (optimal, limited), round trips through
// the table and the slow path, and corrupt streams that must fail cleanly (run under ASan/UBSan).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <queue>
#include <random>
#include <string>
#include <vector>

#include "core/huffman.h"
#include "tests/check.h"

using dcx::huffman::Code;

static std::vector<uint8_t> lengths_for(const std::vector<uint64_t>& freq, int max_length = 24) {
  std::vector<uint8_t> len(freq.size());
  CHECK(dcx::huffman::code_lengths(freq.data(), freq.size(), max_length, len.data()).empty());
  return len;
}

static uint64_t cost(const std::vector<uint64_t>& freq, const std::vector<uint8_t>& len) {
  uint64_t c = 0;
  for (size_t s = 0; s < freq.size(); ++s) c += freq[s] * len[s];
  return c;
}

// Unlimited Huffman cost: the sum of the weights of the internal nodes.
static uint64_t huffman_cost(const std::vector<uint64_t>& freq) {
  std::priority_queue<uint64_t, std::vector<uint64_t>, std::greater<uint64_t>> heap;
  for (uint64_t f : freq) if (f) heap.push(f);
  if (heap.size() == 1) return heap.top();
  uint64_t c = 0;
  while (heap.size() > 1) {
    const uint64_t a = heap.top(); heap.pop();
    const uint64_t b = heap.top(); heap.pop();
    c += a + b;
    heap.push(a + b);
  }
  return c;
}

static double kraft(const std::vector<uint8_t>& len) {
  double k = 0;
  for (uint8_t l : len) if (l) k += std::ldexp(1.0, -l);
  return k;
}

template <typename S>
static void round_trip(const std::vector<S>& symbols, const std::vector<uint8_t>& len) {
  Code code;
  CHECK(code.init(len.data(), len.size()).empty());
  uint64_t bits = 0;
  CHECK(code.encoded_bits(symbols.data(), symbols.size(), &bits).empty());
  std::vector<uint8_t> stream((bits + 7) / 8);
  code.encode(symbols.data(), symbols.size(), stream.data(), stream.size());
  std::vector<S> back(symbols.size());
  const std::string err = code.decode(stream.data(), stream.size(), back.data(), back.size());
  if (!err.empty()) std::printf("decode: %s\n", err.c_str());
  CHECK(err.empty());
  CHECK(back == symbols);
}

static void test_code_lengths() {
  CHECK(lengths_for({0, 0, 0}) == std::vector<uint8_t>({0, 0, 0}));
  CHECK(lengths_for({0, 7, 0}) == std::vector<uint8_t>({0, 1, 0}));  // one symbol: one bit
  CHECK(lengths_for({3, 9}) == std::vector<uint8_t>({1, 1}));
  std::vector<uint64_t> uniform(256, 5);
  for (uint8_t l : lengths_for(uniform)) CHECK(l == 8);
  // Fibonacci weights give the deepest Huffman tree: lengths 1..n-1 unlimited.
  std::vector<uint64_t> fib = {1, 1};
  while (fib.size() < 30) fib.push_back(fib[fib.size() - 1] + fib[fib.size() - 2]);
  const auto unl = lengths_for(fib, 24);
  for (int limit : {5, 8, 12, 24}) {
    const auto len = lengths_for(fib, limit);
    int mx = 0;
    for (uint8_t l : len) mx = std::max<int>(mx, l);
    CHECK(mx <= limit);
    CHECK(kraft(len) == 1.0);  // optimal codes are complete
  }
  // Limit 24 binds for 30 Fibonacci weights (the free tree is 29 deep), so the cost is above
  // Huffman's; with 20 weights the tree fits and the cost is Huffman's exactly.
  CHECK(cost(fib, unl) > huffman_cost(fib));
  std::vector<uint64_t> fib20(fib.begin(), fib.begin() + 20);
  CHECK(cost(fib20, lengths_for(fib20, 24)) == huffman_cost(fib20));
  // Random skewed alphabets: Huffman's cost whenever the limit does not bind.
  std::mt19937_64 rng(1);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<uint64_t> f(1 + rng() % 300);
    for (auto& x : f) x = (rng() % 4 == 0) ? 0 : (rng() % 1000) * (rng() % 1000) + 1;
    const auto len = lengths_for(f, 24);
    CHECK(cost(f, len) == huffman_cost(f));
    CHECK(kraft(len) <= 1.0);
  }
  // A limit that cannot hold the alphabet, and arguments out of range, are errors.
  std::vector<uint8_t> out(5);
  std::vector<uint64_t> five(5, 1);
  CHECK(!dcx::huffman::code_lengths(five.data(), 5, 2, out.data()).empty());
  CHECK(dcx::huffman::code_lengths(five.data(), 5, 3, out.data()).empty());
  CHECK(!dcx::huffman::code_lengths(five.data(), 5, 0, out.data()).empty());
  CHECK(!dcx::huffman::code_lengths(five.data(), 5, 25, out.data()).empty());
  std::vector<uint64_t> huge = {uint64_t(1) << 60, 1};
  CHECK(!dcx::huffman::code_lengths(huge.data(), 2, 24, out.data()).empty());
}

static void test_round_trips() {
  std::mt19937_64 rng(2);
  round_trip<uint8_t>({}, {0, 0});
  round_trip<uint8_t>({1, 1, 1, 1, 1, 1, 1, 1, 1}, {0, 1});  // single symbol: 1 bit each
  round_trip<uint8_t>({0, 1, 1, 0, 1}, {1, 1});
  // Skewed (geometric) over 32 symbols, lengths from the data; sizes around the 8-byte tail.
  for (int n : {1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 100003}) {
    std::vector<uint8_t> sym(n);
    std::geometric_distribution<int> geo(0.3);
    for (auto& s : sym) s = static_cast<uint8_t>(std::min(geo(rng), 31));
    std::vector<uint64_t> f(32, 0);
    for (auto s : sym) ++f[s];
    round_trip<uint8_t>(sym, lengths_for(f));
  }
  // Long codes (up to 24 bits) exercise the slow path, in the bulk and in the tail.
  std::vector<uint64_t> fib = {1, 1};
  while (fib.size() < 25) fib.push_back(fib[fib.size() - 1] + fib[fib.size() - 2]);
  const auto len = lengths_for(fib, 24);
  std::vector<uint8_t> sym;
  for (int rep = 0; rep < 3; ++rep)
    for (int s = 0; s < 25; ++s) sym.push_back(static_cast<uint8_t>(s));
  round_trip<uint8_t>(sym, len);
  std::vector<uint8_t> only_long = {0, 1, 0, 1};
  round_trip<uint8_t>(only_long, len);
  // uint16: the full 65536-symbol alphabet, uniform (16-bit codes).
  std::vector<uint16_t> wide(200000);
  for (auto& s : wide) s = static_cast<uint16_t>(rng());
  std::vector<uint64_t> fw(65536, 0);
  for (auto s : wide) ++fw[s];
  round_trip<uint16_t>(wide, lengths_for(fw));
}

static void test_bad_input() {
  Code code;
  const std::vector<uint8_t> over = {1, 1, 1};
  CHECK(!code.init(over.data(), 3).empty());  // Kraft sum 1.5
  const std::vector<uint8_t> too_long = {1, 25};
  CHECK(!code.init(too_long.data(), 2).empty());
  const std::vector<uint8_t> len = {1, 2, 2};
  CHECK(code.init(len.data(), 3).empty());
  const std::vector<uint8_t> sym = {0, 1, 2, 2, 1, 0, 0, 0, 1, 2, 1, 1};  // 20 bits -> 3 bytes
  uint64_t bits = 0;
  CHECK(code.encoded_bits(sym.data(), sym.size(), &bits).empty() && bits == 20);
  std::vector<uint8_t> stream(3);
  code.encode(sym.data(), sym.size(), stream.data(), 3);
  std::vector<uint8_t> out(sym.size());
  CHECK(code.decode(stream.data(), 3, out.data(), out.size()).empty() && out == sym);
  CHECK(!code.decode(stream.data(), 2, out.data(), out.size()).empty());       // truncated
  std::vector<uint8_t> longer = stream;
  longer.push_back(0);
  CHECK(!code.decode(longer.data(), 4, out.data(), out.size()).empty());       // byte left over
  CHECK(!code.decode(stream.data(), 3, out.data(), out.size() - 3).empty());   // bits left over
  std::vector<uint8_t> pad = stream;
  pad[2] |= 1;
  CHECK(!code.decode(pad.data(), 3, out.data(), out.size()).empty());          // padding bits
  CHECK(!code.decode(stream.data(), 3, out.data(), 25).empty());               // count > bits
  CHECK(!code.decode(stream.data(), 3, out.data(), -1).empty());
  const std::vector<uint8_t> bad_sym = {0, 3};
  CHECK(!code.encoded_bits(bad_sym.data(), 2, &bits).empty());                 // outside alphabet
  const std::vector<uint8_t> holes = {1, 0, 2};                                // symbol 1 absent
  Code partial;
  CHECK(partial.init(holes.data(), 3).empty());
  const std::vector<uint8_t> one = {1};
  CHECK(!partial.encoded_bits(one.data(), 1, &bits).empty());                  // no code
  // An incomplete code (symbol 0 = "0", symbol 2 = "10"): the pattern "11" is invalid.
  const std::vector<uint8_t> ones = {0xff};
  CHECK(!partial.decode(ones.data(), 1, out.data(), 4).empty());
  // Garbage of every length decoded with every code must fail or succeed, never overrun.
  std::mt19937_64 rng(3);
  Code single;
  const std::vector<uint8_t> single_len = {0, 0, 1};
  CHECK(single.init(single_len.data(), 3).empty());
  std::vector<uint64_t> fib = {1, 1};
  while (fib.size() < 25) fib.push_back(fib[fib.size() - 1] + fib[fib.size() - 2]);
  Code deep;
  CHECK(deep.init(lengths_for(fib, 24).data(), 25).empty());
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<uint8_t> junk(rng() % 40);
    for (auto& b : junk) b = static_cast<uint8_t>(rng());
    std::vector<uint8_t> o(rng() % 400);
    const Code* codes[] = {&code, &partial, &single, &deep};
    for (const Code* c : codes) (void)c->decode(junk.data(), junk.size(), o.data(), o.size());
  }
  // An alphabet that does not fit the output type is refused.
  std::vector<uint8_t> wide_len(300, 0);
  wide_len[299] = 1;
  Code wide;
  CHECK(wide.init(wide_len.data(), 300).empty());
  CHECK(!wide.decode(stream.data(), 3, out.data(), 1).empty());
}

int main() {
  test_code_lengths();
  test_round_trips();
  test_bad_input();
  return dcx_test::finish("test_huffman");
}
