"""The C++ Huffman codec (dcx.ops.huffman_*) against a plain-Python coder (heapq-built code
lengths, canonical codes as bit strings: dcx.reference.huffman_encode / huffman_decode), on skewed
symbol streams like those in a .dcx file:

  cluster ids   5-bit weight-sharing labels of unpruned weights (Laplace-shaped, ~4 bits entropy)
  rel. indices  4-bit relative indices of a layer pruned to 8% (geometric gaps with fillers)

MB/s counts one byte per symbol (uint8 symbols in and out); the codec runs on one core (a
bitstream is sequential). The target is >= 100 MB/s decode per core.

    python benchmarks/bench_huffman.py   ->  benchmarks/results/huffman-cpu.md
    DCX_BENCH_SIZES=1000000 python benchmarks/bench_huffman.py   (quick run)
"""

import heapq
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import dcx  # noqa: E402
from dcx import format as fmt  # noqa: E402
from dcx import reference  # noqa: E402


def cluster_ids(n, g):
    x = torch.distributions.Laplace(16.0, 3.0).sample((n,))
    return x.round().clamp(0, 31).to(torch.uint8)


def relative_indices(n, g):
    """About n entries of the 4-bit relative-index stream of a random 8%-dense layer."""
    numel = int(n / 0.08 / 1.35)
    mask = torch.rand(numel, generator=g) < 0.08
    entries, _ = fmt.encode_positions(torch.nonzero(mask).reshape(-1).numpy(), numel, 1 << 16, 4)
    return torch.from_numpy(entries[:n].copy())


def heapq_code_lengths(freqs):
    """Textbook Huffman: merge the two lightest subtrees until one is left (no length limit)."""
    heap = [(int(f), s, [s]) for s, f in enumerate(freqs.tolist()) if f > 0]
    lengths = [0] * len(freqs)
    if len(heap) == 1:
        lengths[heap[0][1]] = 1
    heapq.heapify(heap)
    while len(heap) > 1:
        fa, sa, a = heapq.heappop(heap)
        fb, sb, b = heapq.heappop(heap)
        for s in a + b:
            lengths[s] += 1
        heapq.heappush(heap, (fa + fb, min(sa, sb), a + b))
    return torch.tensor(lengths, dtype=torch.uint8)


def entropy_bits(freqs):
    p = freqs.double() / freqs.sum()
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(sizes):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rows = []
    for label, make, k in (
        ("cluster ids (5-bit)", cluster_ids, 32),
        ("rel. indices (4-bit)", relative_indices, 16),
    ):
        for n in sizes:
            symbols = make(n, g)
            n = symbols.numel()
            freqs = torch.bincount(symbols.long(), minlength=k)
            lengths = dcx.ops.huffman_code_lengths(freqs)
            data = dcx.ops.huffman_encode(symbols, lengths)
            assert torch.equal(dcx.ops.huffman_decode(data, lengths, n), symbols)
            t_len = common.bench(lambda: dcx.ops.huffman_code_lengths(freqs), "cpu")  # noqa: B023
            t_enc = common.bench(lambda: dcx.ops.huffman_encode(symbols, lengths), "cpu")  # noqa: B023
            t_dec = common.bench(lambda: dcx.ops.huffman_decode(data, lengths, n), "cpu")  # noqa: B023

            py_lengths, t_py_len = timed(lambda: heapq_code_lengths(freqs))  # noqa: B023
            py_data, t_py_enc = timed(lambda: reference.huffman_encode(symbols, py_lengths))  # noqa: B023
            py_back, t_py_dec = timed(lambda: reference.huffman_decode(py_data, py_lengths, n))  # noqa: B023
            assert torch.equal(py_back, symbols)
            assert int((freqs * py_lengths.long()).sum()) == int((freqs * lengths.long()).sum())

            mbs = lambda t: n / t / 1e6  # noqa: E731, B023
            rows.append(
                [
                    label,
                    f"{n:,}",
                    f"{entropy_bits(freqs):.3f}",
                    f"{8 * data.numel() / n:.3f}",
                    f"{t_py_len * 1e3:.1f} / {t_len * 1e3:.3f}",
                    f"{mbs(t_py_enc):.2f}",
                    f"{mbs(t_py_dec):.2f}",
                    f"{mbs(t_enc):.0f}",
                    f"{mbs(t_dec):.0f}",
                    f"{t_py_enc / t_enc:.0f}x",
                    f"{t_py_dec / t_dec:.0f}x",
                ]
            )
            print(rows[-1], flush=True)
    header = [
        "stream",
        "symbols",
        "entropy bits",
        "coded bits/sym",
        "code lengths ms (py / dcx)",
        "python enc MB/s",
        "python dec MB/s",
        "dcx enc MB/s",
        "dcx dec MB/s",
        "enc speedup",
        "dec speedup",
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes = [
        common.stamp("cpu") + f"; load average {load:.1f} while measuring",
        "",
        "One core (the ops are single-threaded). MB/s = millions of uint8 symbols per second. "
        "dcx: median of >= 20 runs; python (heapq code lengths, bit-string encode/decode from "
        "dcx.reference): one run. Both produce the same code cost; dcx's lengths are limited "
        "to 24 bits (package-merge). Target: >= 100 MB/s decode per core.",
    ]
    common.write_table(
        "huffman-cpu", "Huffman codec: dcx (C++) vs plain Python", header, rows, notes
    )


def main():
    torch.set_num_threads(1)
    run(common.sizes_from_env([10_000_000]))


if __name__ == "__main__":
    main()
