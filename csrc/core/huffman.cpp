// Canonical Huffman codec: length-limited code lengths (package-merge), table-driven decoding.
#include "core/huffman.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

namespace dcx {
namespace huffman {
namespace {

// Frequencies are symbol counts; this bound keeps every package-merge weight (at most
// kMaxCodeLength copies of the total) far from overflowing 64 bits.
constexpr uint64_t kMaxTotalFreq = uint64_t(1) << 56;

inline uint64_t load_be64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
#if defined(__GNUC__)
  return __builtin_bswap64(v);  // little-endian host; the stream is MSB first
#else
  uint64_t r = 0;
  for (int i = 0; i < 8; ++i) r = (r << 8) | p[i];
  return r;
#endif
}

inline std::string at_bit(uint64_t bitpos) { return " at bit " + std::to_string(bitpos); }

}  // namespace

std::string code_lengths(const uint64_t* freq, int64_t n, int max_length, uint8_t* lengths) {
  if (n < 0 || n > kMaxAlphabet) {
    return "alphabet size must be in [0, " + std::to_string(kMaxAlphabet) + "], got " +
           std::to_string(n);
  }
  if (max_length < 1 || max_length > kMaxCodeLength) {
    return "max_length must be in [1, " + std::to_string(kMaxCodeLength) + "], got " +
           std::to_string(max_length);
  }
  std::fill(lengths, lengths + n, uint8_t(0));
  std::vector<uint32_t> leaves;  // present symbols, to be sorted by (freq, symbol)
  uint64_t total = 0;
  for (int64_t s = 0; s < n; ++s) {
    if (freq[s] == 0) continue;
    if (freq[s] > kMaxTotalFreq - total) return "frequencies must sum to at most 2^56";
    total += freq[s];
    leaves.push_back(static_cast<uint32_t>(s));
  }
  const int64_t m = static_cast<int64_t>(leaves.size());
  if (m == 0) return "";
  if (m == 1) {
    lengths[leaves[0]] = 1;
    return "";
  }
  if (m > (int64_t(1) << max_length)) {
    return std::to_string(m) + " symbols cannot all have codes of at most " +
           std::to_string(max_length) + " bits";
  }
  std::stable_sort(leaves.begin(), leaves.end(),
                   [&](uint32_t a, uint32_t b) { return freq[a] < freq[b]; });

  // Package-merge (the coin collector's problem): list 0 is the sorted leaves; list l merges the
  // leaves with the pairs (packages) of list l-1. The first 2m-2 items of the last list are the
  // optimal selection; each leaf's code length is how often it occurs in them. Items taken from a
  // list are always a prefix, and leaves appear in it in sorted order, so it is enough to record
  // per list which items are leaves.
  std::vector<std::vector<uint8_t>> is_leaf(max_length);
  std::vector<uint64_t> prev(m), cur;
  for (int64_t j = 0; j < m; ++j) prev[j] = freq[leaves[j]];
  is_leaf[0].assign(m, 1);
  for (int l = 1; l < max_length; ++l) {
    const int64_t packages = static_cast<int64_t>(prev.size()) / 2;
    cur.clear();
    std::vector<uint8_t>& flags = is_leaf[l];
    flags.clear();
    int64_t i = 0, j = 0;
    while (i < m || j < packages) {
      const bool take_leaf =
          j == packages || (i < m && freq[leaves[i]] <= prev[2 * j] + prev[2 * j + 1]);
      if (take_leaf) {
        cur.push_back(freq[leaves[i++]]);
      } else {
        cur.push_back(prev[2 * j] + prev[2 * j + 1]);
        ++j;
      }
      flags.push_back(take_leaf ? 1 : 0);
    }
    prev.swap(cur);
  }
  int64_t take = 2 * m - 2;
  for (int l = max_length - 1; l >= 0; --l) {
    if (take > static_cast<int64_t>(is_leaf[l].size())) return "package-merge: internal error";
    int64_t nleaves = 0;
    for (int64_t t = 0; t < take; ++t) nleaves += is_leaf[l][t];
    for (int64_t t = 0; t < nleaves; ++t) ++lengths[leaves[t]];
    take = 2 * (take - nleaves);
  }
  return "";
}

std::string Code::init(const uint8_t* lengths, int64_t n) {
  if (n < 0 || n > kMaxAlphabet) {
    return "code_lengths must have 0 to " + std::to_string(kMaxAlphabet) + " entries, got " +
           std::to_string(n);
  }
  length_.assign(lengths, lengths + n);
  code_.assign(n, 0);
  std::fill(first_, first_ + kMaxCodeLength + 1, 0u);
  std::fill(count_, count_ + kMaxCodeLength + 1, 0u);
  std::fill(offset_, offset_ + kMaxCodeLength + 1, 0u);
  max_length_ = 0;
  for (int64_t s = 0; s < n; ++s) {
    const int len = length_[s];
    if (len > kMaxCodeLength) {
      return "code length " + std::to_string(len) + " of symbol " + std::to_string(s) +
             " exceeds the limit of " + std::to_string(kMaxCodeLength) + " bits";
    }
    if (len > 0) ++count_[len];
    max_length_ = std::max(max_length_, len);
  }
  // Kraft: sum 2^-len <= 1, in units of 2^-kMaxCodeLength.
  uint64_t kraft = 0;
  for (int len = 1; len <= kMaxCodeLength; ++len) {
    kraft += uint64_t(count_[len]) << (kMaxCodeLength - len);
  }
  if (kraft > (uint64_t(1) << kMaxCodeLength)) {
    return "code_lengths are over-subscribed (Kraft sum > 1): not a prefix code";
  }
  // Canonical codes (as DEFLATE): first code of each length, then consecutive per symbol.
  uint32_t code = 0, offset = 0;
  for (int len = 1; len <= kMaxCodeLength; ++len) {
    code = (code + count_[len - 1]) << 1;
    first_[len] = code;
    offset_[len] = offset;
    offset += count_[len];
  }
  sorted_.assign(offset, 0);
  uint32_t next[kMaxCodeLength + 1];
  std::copy(first_, first_ + kMaxCodeLength + 1, next);
  uint32_t fill[kMaxCodeLength + 1];
  std::copy(offset_, offset_ + kMaxCodeLength + 1, fill);
  lut_.assign(size_t(1) << kLutBits, 0u);
  for (int64_t s = 0; s < n; ++s) {
    const int len = length_[s];
    if (len == 0) continue;
    code_[s] = next[len]++;
    sorted_[fill[len]++] = static_cast<uint16_t>(s);
    if (len <= kLutBits) {
      const uint32_t lo = code_[s] << (kLutBits - len), span = 1u << (kLutBits - len);
      const uint32_t entry = (static_cast<uint32_t>(s) << 8) | static_cast<uint32_t>(len);
      std::fill(lut_.begin() + lo, lut_.begin() + lo + span, entry);
    }
  }
  return "";
}

int Code::slow_symbol(uint64_t window, int* length) const {
  for (int len = kLutBits + 1; len <= max_length_; ++len) {
    const uint32_t code = static_cast<uint32_t>(window >> (64 - len));
    const uint32_t rank = code - first_[len];  // wraps to a large value when code < first
    if (rank < count_[len]) {
      *length = len;
      return sorted_[offset_[len] + rank];
    }
  }
  return -1;
}

template <typename T>
std::string Code::encoded_bits(const T* symbols, int64_t count, uint64_t* bits) const {
  const int64_t n = alphabet();
  uint64_t total = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t s = static_cast<int64_t>(symbols[i]);
    if (s < 0 || s >= n) {
      return "symbols[" + std::to_string(i) + "] = " + std::to_string(s) +
             " is outside the alphabet [0, " + std::to_string(n) + ") of code_lengths";
    }
    if (length_[s] == 0) {
      return "symbols[" + std::to_string(i) + "] = " + std::to_string(s) +
             " has no code (its code length is 0)";
    }
    total += length_[s];
  }
  *bits = total;
  return "";
}

template <typename T>
void Code::encode(const T* symbols, int64_t count, uint8_t* out, int64_t nbytes) const {
  // 64-bit accumulator: at most 31 pending bits plus one code of <= 24 bits.
  uint64_t acc = 0;
  int pending = 0;
  uint8_t* o = out;
  uint8_t* const end = out + nbytes;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t s = static_cast<int64_t>(symbols[i]);
    acc = (acc << length_[s]) | code_[s];
    pending += length_[s];
    if (pending >= 32) {
      pending -= 32;
      const uint32_t word = static_cast<uint32_t>(acc >> pending);
      if (end - o < 4) return;  // unreachable when nbytes came from encoded_bits
      o[0] = static_cast<uint8_t>(word >> 24);
      o[1] = static_cast<uint8_t>(word >> 16);
      o[2] = static_cast<uint8_t>(word >> 8);
      o[3] = static_cast<uint8_t>(word);
      o += 4;
    }
  }
  while (pending >= 8 && o < end) {
    pending -= 8;
    *o++ = static_cast<uint8_t>(acc >> pending);
  }
  if (pending > 0 && o < end) *o++ = static_cast<uint8_t>(acc << (8 - pending));
}

template <typename S>
std::string Code::decode(const uint8_t* data, int64_t nbytes, S* out, int64_t count) const {
  if (count < 0) return "count must be >= 0, got " + std::to_string(count);
  if (nbytes < 0) return "nbytes must be >= 0, got " + std::to_string(nbytes);
  if (alphabet() > int64_t(std::numeric_limits<S>::max()) + 1) {
    return "the alphabet of " + std::to_string(alphabet()) + " symbols does not fit the output type";
  }
  if (count == 0) {
    if (nbytes != 0) return std::to_string(nbytes) + " byte(s) left over after 0 symbols";
    return "";
  }
  if (max_length_ == 0) return "code_lengths are all 0 but " + std::to_string(count) + " symbols are wanted";
  // Every code is at least one bit, so a short stream cannot hold `count` symbols: refuse before
  // decoding (this also bounds the work on corrupt input by the input size).
  if (static_cast<uint64_t>(count) > static_cast<uint64_t>(nbytes) * 8) {
    return std::to_string(count) + " symbols need at least as many bits, but the stream has " +
           std::to_string(nbytes) + " byte(s)";
  }
  const uint32_t* lut = lut_.data();
  const uint64_t nbits = static_cast<uint64_t>(nbytes) * 8;
  uint64_t pos = 0;
  int64_t i = 0;
  // Bulk: while 8 bytes can be read at pos, one unaligned load gives >= 57 valid bits, enough for
  // four codes of <= kLutBits bits, or one long code of <= 24 bits.
  if (nbytes >= 8) {
    const uint64_t safe = static_cast<uint64_t>(nbytes - 8) * 8;
    while (i < count && pos <= safe) {
      const uint64_t w = load_be64(data + (pos >> 3)) << (pos & 7);
      uint32_t e = lut[w >> (64 - kLutBits)];
      if (e == 0) {
        int len = 0;
        const int s = slow_symbol(w, &len);
        if (s < 0) return "invalid code" + at_bit(pos) + " (symbol " + std::to_string(i) + ")";
        out[i++] = static_cast<S>(s);
        pos += len;
        continue;
      }
      out[i++] = static_cast<S>(e >> 8);
      uint32_t used = e & 0xff;
      for (int k = 0; k < 3 && i < count; ++k) {
        e = lut[(w << used) >> (64 - kLutBits)];
        if (e == 0) break;
        out[i++] = static_cast<S>(e >> 8);
        used += e & 0xff;
      }
      pos += used;
    }
  }
  // Tail: the last < 8 (or 8) bytes, copied into a zero-padded buffer so loads stay in bounds.
  if (i < count) {
    uint8_t tail[16] = {0};
    const uint64_t base = pos >> 3;
    const uint64_t rest = static_cast<uint64_t>(nbytes) > base ? nbytes - base : 0;
    std::memcpy(tail, data + base, rest);  // rest <= 8 here
    const uint64_t lbits = rest * 8;
    uint64_t lpos = pos - base * 8;
    while (i < count) {
      if (lpos >= lbits) {
        return "stream ends after " + std::to_string(i) + " of " + std::to_string(count) +
               " symbols";
      }
      const uint64_t w = load_be64(tail + (lpos >> 3)) << (lpos & 7);
      const uint32_t e = lut[w >> (64 - kLutBits)];
      int len = e & 0xff;
      int s = static_cast<int>(e >> 8);
      if (e == 0) {
        s = slow_symbol(w, &len);
        if (s < 0) return "invalid code" + at_bit(base * 8 + lpos) + " (symbol " + std::to_string(i) + ")";
      }
      out[i++] = static_cast<S>(s);
      lpos += len;
    }
    pos = base * 8 + lpos;
  }
  if (pos > nbits) {
    return "stream ends inside symbol " + std::to_string(count - 1) + " (needs " +
           std::to_string(pos) + " bits, has " + std::to_string(nbits) + ")";
  }
  const uint64_t used_bytes = (pos + 7) / 8;
  if (used_bytes != static_cast<uint64_t>(nbytes)) {
    return std::to_string(nbytes - used_bytes) + " byte(s) left over after " +
           std::to_string(count) + " symbols";
  }
  if (pos % 8 != 0 && (data[nbytes - 1] & ((1u << (8 - pos % 8)) - 1)) != 0) {
    return "non-zero padding bits after the last symbol";
  }
  return "";
}

#define DCX_HUFFMAN_ENCODE(T)                                                             \
  template std::string Code::encoded_bits<T>(const T*, int64_t, uint64_t*) const;         \
  template void Code::encode<T>(const T*, int64_t, uint8_t*, int64_t) const;
DCX_HUFFMAN_ENCODE(uint8_t)
DCX_HUFFMAN_ENCODE(uint16_t)
DCX_HUFFMAN_ENCODE(int16_t)
DCX_HUFFMAN_ENCODE(int32_t)
DCX_HUFFMAN_ENCODE(int64_t)
#undef DCX_HUFFMAN_ENCODE
template std::string Code::decode<uint8_t>(const uint8_t*, int64_t, uint8_t*, int64_t) const;
template std::string Code::decode<uint16_t>(const uint8_t*, int64_t, uint16_t*, int64_t) const;

}  // namespace huffman
}  // namespace dcx
