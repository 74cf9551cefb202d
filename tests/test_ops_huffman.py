"""The Huffman codec ops (CPU only) against the plain-Python reference: code lengths (optimal under
the length limit), bit-exact streams, round trips, and corrupt streams raising, never crashing."""

import heapq

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dcx
from dcx import reference
from tests.testing import noncontiguous, requires_kernels

pytestmark = requires_kernels

ops = dcx.ops


def cost(freqs, lengths):
    return int((freqs.long() * lengths.long()).sum())


def huffman_cost(freqs):
    """Unlimited Huffman cost: the sum of the internal node weights (heapq)."""
    heap = [int(f) for f in freqs.tolist() if f > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        total += a + b
        heapq.heappush(heap, a + b)
    return total


def kraft(lengths):
    return sum(2.0 ** -int(n) for n in lengths.tolist() if n > 0)


def skewed(n, k, p=0.35, dtype=torch.uint8):
    """Geometric-like symbols over k values: what cluster ids and relative indices look like."""
    g = torch.distributions.Geometric(probs=torch.tensor(p)).sample((n,)).long()
    return g.clamp_(max=k - 1).to(dtype)


def round_trip(symbols, k, max_length=24):
    freqs = torch.bincount(symbols.reshape(-1).long(), minlength=k)
    lengths = ops.huffman_code_lengths(freqs, max_length)
    data = ops.huffman_encode(symbols, lengths)
    back = ops.huffman_decode(data, lengths, symbols.numel())
    assert back.dtype == (torch.uint8 if k <= 256 else torch.uint16)
    assert torch.equal(back.long(), symbols.reshape(-1).long())
    assert data.numel() * 8 - cost(freqs, lengths) in range(8)  # exactly ceil(bits / 8) bytes
    return freqs, lengths, data


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 97, 4097, (1 << 20) + 3])
@pytest.mark.parametrize("k", [1, 2, 32, 256])
def test_round_trip_skewed(n, k):
    round_trip(skewed(n, k), k)


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.uint16, torch.int16, torch.int32, torch.int64]
)
def test_symbol_dtypes(dtype):
    symbols = skewed(1000, 200).to(dtype)
    _, lengths, data = round_trip(symbols, 200)
    assert torch.equal(data, ops.huffman_encode(symbols.to(torch.int64), lengths))


def test_noncontiguous_and_2d():
    symbols = skewed(64 * 33, 16).view(64, 33)
    freqs = torch.bincount(symbols.reshape(-1).long(), minlength=16)
    lengths = ops.huffman_code_lengths(freqs)
    assert torch.equal(
        ops.huffman_encode(noncontiguous(symbols), lengths),
        ops.huffman_encode(symbols.contiguous(), lengths),
    )


def test_one_symbol_two_symbols_uniform():
    _, lengths, data = round_trip(torch.full((100,), 3, dtype=torch.uint8), 8)
    assert lengths.tolist() == [0, 0, 0, 1, 0, 0, 0, 0] and data.numel() == 13  # one bit each
    _, lengths, _ = round_trip(torch.tensor([0, 1, 1, 1, 1, 1], dtype=torch.uint8), 2)
    assert lengths.tolist() == [1, 1]
    uniform = torch.arange(256).repeat(40).to(torch.uint8)
    _, lengths, data = round_trip(uniform, 256)
    assert (lengths == 8).all() and torch.equal(data, uniform)  # 8-bit canonical codes: identity


def test_wide_alphabet_uint16():
    symbols = torch.randint(0, 65536, (200_000,)).to(torch.uint16)
    round_trip(symbols, 65536)


def test_matches_reference_bit_for_bit():
    symbols = skewed(5000, 32)
    freqs = torch.bincount(symbols.long(), minlength=32)
    lengths = ops.huffman_code_lengths(freqs)
    data = ops.huffman_encode(symbols, lengths)
    assert torch.equal(data, reference.huffman_encode(symbols, lengths))
    assert torch.equal(reference.huffman_decode(data, lengths, 5000), symbols)


def fibonacci(n):
    f = [1, 1]
    while len(f) < n:
        f.append(f[-1] + f[-2])
    return torch.tensor(f[:n], dtype=torch.int64)


@pytest.mark.parametrize("max_length", [5, 8, 11, 12, 16, 24])
def test_length_limit(max_length):
    """Fibonacci counts make the deepest tree (29 levels for 30 symbols): the limit binds, the
    code stays complete and as cheap as the reference package-merge's, and long codes (past the
    11-bit table) decode through the slow path."""
    freqs = fibonacci(30)
    lengths = ops.huffman_code_lengths(freqs, max_length)
    assert int(lengths.max()) == max_length and kraft(lengths) == 1.0
    assert cost(freqs, lengths) == cost(freqs, reference.huffman_code_lengths(freqs, max_length))
    assert cost(freqs, lengths) > huffman_cost(freqs)
    symbols = torch.arange(30).repeat(7).to(torch.uint8)
    back = ops.huffman_decode(ops.huffman_encode(symbols, lengths), lengths, symbols.numel())
    assert torch.equal(back, symbols)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=70), st.integers(7, 24))
def test_code_lengths_optimal(freq_list, max_length):
    freqs = torch.tensor(freq_list, dtype=torch.int64)
    lengths = ops.huffman_code_lengths(freqs, max_length)
    assert int(lengths.max()) <= max_length and kraft(lengths) <= 1.0
    assert ((lengths > 0) == (freqs > 0)).all() or int((freqs > 0).sum()) == 0
    assert cost(freqs, lengths) == cost(freqs, reference.huffman_code_lengths(freqs, max_length))
    if int(lengths.max()) < max_length:  # the limit did not bind: plain Huffman's cost
        assert cost(freqs, lengths) == huffman_cost(freqs) or int((freqs > 0).sum()) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=300), st.integers(1, 24))
def test_round_trip_property(symbol_list, max_length):
    symbols = torch.tensor(symbol_list, dtype=torch.uint8)
    k = 41
    if max_length < 6:  # 41 symbols need codes of up to 6 bits
        max_length = 6
    round_trip(symbols, k, max_length)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 600), st.sampled_from(["skewed", "single", "deep"]))
def test_garbage_never_crashes(data, count, which):
    """Random bytes decode or raise RuntimeError; the reference agrees on which."""
    lengths = {
        "skewed": ops.huffman_code_lengths(torch.tensor([50, 20, 9, 9, 4, 1, 1, 0])),
        "single": torch.tensor([0, 1, 0], dtype=torch.uint8),
        "deep": ops.huffman_code_lengths(fibonacci(25)),
    }[which]
    tensor = torch.tensor(list(data), dtype=torch.uint8)
    try:
        out = ops.huffman_decode(tensor, lengths, count)
    except RuntimeError:
        with pytest.raises(ValueError):
            reference.huffman_decode(tensor, lengths, count)
    else:
        assert torch.equal(out, reference.huffman_decode(tensor, lengths, count))


def test_corrupt_streams():
    symbols = skewed(1000, 32)
    freqs = torch.bincount(symbols.long(), minlength=32)
    lengths = ops.huffman_code_lengths(freqs)
    data = ops.huffman_encode(symbols, lengths)
    with pytest.raises(RuntimeError, match="stream ends"):
        ops.huffman_decode(data[:-3], lengths, 1000)
    with pytest.raises(RuntimeError, match="left over"):
        ops.huffman_decode(torch.cat([data, torch.zeros(1, dtype=torch.uint8)]), lengths, 1000)
    with pytest.raises(RuntimeError, match="need at least as many bits"):
        ops.huffman_decode(data, lengths, data.numel() * 8 + 1)
    with pytest.raises(RuntimeError, match="need at least as many bits"):
        ops.huffman_decode(data, lengths, 2**62)  # refused before allocating
    incomplete = torch.tensor([1, 2, 0], dtype=torch.uint8)  # "0", "10"; "11" is unused
    with pytest.raises(RuntimeError, match="invalid code at bit 0"):
        ops.huffman_decode(torch.tensor([0xFF], dtype=torch.uint8), incomplete, 2)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.huffman_code_lengths(torch.ones(4, dtype=torch.int32)), "freqs must be int64"),
        (
            lambda: ops.huffman_code_lengths(torch.ones(2, 2, dtype=torch.int64)),
            "freqs must be 1-D",
        ),
        (lambda: ops.huffman_code_lengths(torch.tensor([1, -2])), "freqs must be >= 0"),
        (
            lambda: ops.huffman_code_lengths(torch.ones(4, dtype=torch.int64), 0),
            "max_length must be in",
        ),
        (
            lambda: ops.huffman_code_lengths(torch.ones(4, dtype=torch.int64), 25),
            "max_length must be in",
        ),
        (
            lambda: ops.huffman_code_lengths(torch.ones(5, dtype=torch.int64), 2),
            "cannot all have codes",
        ),
        (lambda: ops.huffman_code_lengths(torch.ones(65537, dtype=torch.int64)), "at most 65536"),
        (
            lambda: ops.huffman_encode(torch.zeros(3), torch.ones(2, dtype=torch.uint8)),
            "symbols must be uint8",
        ),
        (
            lambda: ops.huffman_encode(torch.zeros(3, dtype=torch.uint8), torch.ones(2)),
            "code_lengths must be uint8",
        ),
        (
            lambda: ops.huffman_encode(torch.tensor([2]), torch.ones(2, dtype=torch.uint8)),
            "outside the alphabet",
        ),
        (
            lambda: ops.huffman_encode(torch.tensor([-1]), torch.ones(2, dtype=torch.uint8)),
            "outside the alphabet",
        ),
        (
            lambda: ops.huffman_encode(torch.tensor([1]), torch.tensor([1, 0], dtype=torch.uint8)),
            "has no code",
        ),
        (
            lambda: ops.huffman_encode(
                torch.tensor([0]), torch.tensor([1, 1, 1], dtype=torch.uint8)
            ),
            "over-subscribed",
        ),
        (
            lambda: ops.huffman_encode(torch.tensor([0]), torch.tensor([1, 25], dtype=torch.uint8)),
            "exceeds the limit",
        ),
        (
            lambda: ops.huffman_decode(
                torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.uint8), 1
            ),
            "data must be uint8",
        ),
        (
            lambda: ops.huffman_decode(
                torch.zeros(2, 1, dtype=torch.uint8), torch.ones(2, dtype=torch.uint8), 1
            ),
            "data must be 1-D",
        ),
        (
            lambda: ops.huffman_decode(
                torch.zeros(2, dtype=torch.uint8), torch.ones(2, dtype=torch.uint8), -1
            ),
            "count must be >= 0",
        ),
        (
            lambda: ops.huffman_decode(
                torch.zeros(2, dtype=torch.uint8), torch.zeros(2, dtype=torch.uint8), 1
            ),
            "code_lengths are all 0",
        ),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def test_cpu_only_registration():
    assert all(dcx.kernels()[name] == ["CPU"] for name in dcx._native.CPU_ONLY)


def test_opcheck():
    symbols = skewed(1000, 32)
    freqs = torch.bincount(symbols.long(), minlength=32)
    lengths = ops.huffman_code_lengths(freqs)
    data = ops.huffman_encode(symbols, lengths)
    torch.library.opcheck(torch.ops.dcx.huffman_code_lengths.default, (freqs, 24))
    torch.library.opcheck(torch.ops.dcx.huffman_decode.default, (data, lengths, 1000))
    # Output size depends on the data: the fake kernel returns an unbacked size, which the
    # dynamic-shape AOT test cannot trace; schema and fake-tensor checks still apply.
    torch.library.opcheck(
        torch.ops.dcx.huffman_encode.default,
        (symbols, lengths),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_compile_fullgraph():
    symbols = skewed(1000, 32)
    lengths = ops.huffman_code_lengths(torch.bincount(symbols.long(), minlength=32))
    data = ops.huffman_encode(symbols, lengths)
    compiled = torch.compile(lambda d, n: ops.huffman_decode(d, n, 1000).long() + 1, fullgraph=True)
    assert torch.equal(compiled(data, lengths), symbols.long() + 1)
