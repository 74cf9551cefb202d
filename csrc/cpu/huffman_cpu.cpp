// The Huffman codec ops on CPU: thin glue over csrc/core/huffman.h. Single-threaded: a bitstream
// is sequential, and the .dcx file keeps one stream per layer and kind. No CUDA twin: the codec
// is a file-format step (see csrc/dcx.cpp).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "core/huffman.h"
#include "op_args.h"

namespace dcx {
namespace {

huffman::Code make_code(const at::Tensor& code_lengths) {
  const at::Tensor len = code_lengths.contiguous();
  huffman::Code code;
  const std::string err = code.init(len.const_data_ptr<uint8_t>(), len.numel());
  TORCH_CHECK(err.empty(), "code_lengths: ", err);
  return code;
}

at::Tensor huffman_code_lengths_cpu(const at::Tensor& freqs, int64_t max_length) {
  check_huffman_code_lengths_args(freqs, max_length);
  TORCH_CHECK(freqs.numel() <= huffman::kMaxAlphabet, "freqs must have at most ",
              huffman::kMaxAlphabet, " entries, got ", freqs.numel());
  const at::Tensor f = freqs.contiguous();
  const int64_t n = f.numel();
  const int64_t* fp = f.const_data_ptr<int64_t>();
  std::vector<uint64_t> counts(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(fp[i] >= 0, "freqs must be >= 0, got ", fp[i], " at index ", i);
    counts[i] = static_cast<uint64_t>(fp[i]);
  }
  at::Tensor out = at::empty({n}, f.options().dtype(at::kByte));
  const std::string err = huffman::code_lengths(counts.data(), n, static_cast<int>(max_length),
                                                out.data_ptr<uint8_t>());
  TORCH_CHECK(err.empty(), "huffman_code_lengths: ", err);
  return out;
}

at::Tensor huffman_encode_cpu(const at::Tensor& symbols, const at::Tensor& code_lengths) {
  check_huffman_encode_args(symbols, code_lengths);
  const huffman::Code code = make_code(code_lengths);
  const at::Tensor s = symbols.contiguous();
  const int64_t n = s.numel();
  at::Tensor out;
  auto run = [&](const auto* ptr) {
    uint64_t bits = 0;
    const std::string err = code.encoded_bits(ptr, n, &bits);
    TORCH_CHECK(err.empty(), "huffman_encode: ", err);
    out = at::empty({static_cast<int64_t>((bits + 7) / 8)}, s.options().dtype(at::kByte));
    code.encode(ptr, n, out.data_ptr<uint8_t>(), out.numel());
  };
  const void* p = s.const_data_ptr();
  switch (s.scalar_type()) {
    case at::kByte: run(static_cast<const uint8_t*>(p)); break;
    case at::kUInt16: run(static_cast<const uint16_t*>(p)); break;
    case at::kShort: run(static_cast<const int16_t*>(p)); break;
    case at::kInt: run(static_cast<const int32_t*>(p)); break;
    default: run(static_cast<const int64_t*>(p)); break;  // kLong, the last allowed dtype
  }
  return out;
}

at::Tensor huffman_decode_cpu(const at::Tensor& data, const at::Tensor& code_lengths,
                              int64_t count) {
  check_huffman_decode_args(data, code_lengths, count);
  const huffman::Code code = make_code(code_lengths);
  // Each code is at least one bit: refuse an impossible count before allocating the output.
  TORCH_CHECK(count <= data.numel() * 8, "huffman_decode: ", count,
              " symbols need at least as many bits, but data has ", data.numel(), " byte(s)");
  const at::Tensor d = data.contiguous();
  const bool wide = code_lengths.numel() > 256;
  at::Tensor out = at::empty({count}, d.options().dtype(wide ? at::kUInt16 : at::kByte));
  const std::string err =
      wide ? code.decode(d.const_data_ptr<uint8_t>(), d.numel(),
                         static_cast<uint16_t*>(out.data_ptr()), count)
           : code.decode(d.const_data_ptr<uint8_t>(), d.numel(), out.data_ptr<uint8_t>(), count);
  TORCH_CHECK(err.empty(), "huffman_decode: ", err);
  return out;
}

}  // namespace
}  // namespace dcx

TORCH_LIBRARY_IMPL(dcx, CPU, m) {
  m.impl("huffman_code_lengths", &dcx::huffman_code_lengths_cpu);
  m.impl("huffman_encode", &dcx::huffman_encode_cpu);
  m.impl("huffman_decode", &dcx::huffman_decode_cpu);
}
