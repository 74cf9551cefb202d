// Canonical Huffman coding of uint8/uint16 symbol streams, torch-free: the CPU ops and the native
// tests share it. A code is stored as its code lengths only (one per symbol of the alphabet, 0 =
// symbol absent); the codes themselves are canonical (shorter first, then by symbol), so encoder
// and decoder rebuild the same codes from the lengths.
//
// Bits are packed MSB first; the last byte is padded with zero bits. Every function reports bad
// input by returning a non-empty message (empty = success) and never reads or writes out of the
// buffers it is given, whatever the input holds.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dcx {
namespace huffman {

constexpr int kMaxCodeLength = 24;   // longest code the decoder accepts
constexpr int kMaxAlphabet = 65536;  // uint16 symbols
constexpr int kLutBits = 11;         // first-level decode table: 2^11 entries of 4 bytes (8 KiB, L1)

// Optimal code lengths for `freq` (n symbols) with no code longer than max_length bits
// (package-merge, so the total cost sum(freq * length) is minimal under the limit). Absent
// symbols (freq 0) get length 0; a single present symbol gets length 1. Deterministic: ties are
// broken by symbol index.
std::string code_lengths(const uint64_t* freq, int64_t n, int max_length, uint8_t* lengths);

// A validated canonical code: built from lengths, it rejects lengths above kMaxCodeLength and an
// over-full code (Kraft sum > 1). An incomplete code is accepted (a single symbol has one code of
// length 1); a decoder meeting one of its unused bit patterns reports it.
class Code {
 public:
  std::string init(const uint8_t* lengths, int64_t n);

  int64_t alphabet() const { return static_cast<int64_t>(length_.size()); }

  // Bits needed to encode symbols[0..count) (T = uint8_t, uint16_t, int16_t, int32_t or int64_t),
  // or an error naming the first symbol outside the alphabet or without a code.
  template <typename T>
  std::string encoded_bits(const T* symbols, int64_t count, uint64_t* bits) const;

  // Writes the bitstream of symbols[0..count) to out (exactly nbytes = ceil(bits / 8) bytes, as
  // returned by encoded_bits, which must have succeeded for these symbols).
  template <typename T>
  void encode(const T* symbols, int64_t count, uint8_t* out, int64_t nbytes) const;

  // Decodes exactly `count` symbols from data[0..nbytes) into out[0..count). Fails when the
  // stream holds an unused code, ends before `count` symbols, or has bytes or non-zero padding
  // bits left after them (so every valid stream has exactly one encoding).
  template <typename S>
  std::string decode(const uint8_t* data, int64_t nbytes, S* out, int64_t count) const;

 private:
  int slow_symbol(uint64_t window, int* length) const;

  std::vector<uint8_t> length_;     // per symbol
  std::vector<uint32_t> code_;      // per symbol, right-aligned
  int max_length_ = 0;
  // Canonical decoding of long codes: codes of length L are first_[L] .. first_[L] + count_[L] - 1
  // and map to sorted_[offset_[L] + code - first_[L]].
  uint32_t first_[kMaxCodeLength + 1] = {};
  uint32_t count_[kMaxCodeLength + 1] = {};
  uint32_t offset_[kMaxCodeLength + 1] = {};
  std::vector<uint16_t> sorted_;    // symbols in canonical order
  // lut_[top kLutBits bits] = symbol << 8 | length for codes of at most kLutBits bits; 0 marks
  // a longer (or unused) code, resolved by the slow path.
  std::vector<uint32_t> lut_;
};

}  // namespace huffman
}  // namespace dcx
