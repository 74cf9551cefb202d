"""centroid_grad against what a user does today: torch.bincount(labels, weights=grad) and
torch.zeros(k).index_add_(0, labels, grad). float32 gradients, int64 labels, no mask (the
alternatives take none); k = 32 and 256 clusters.

Bytes the op must move per element: grad 4 + label 8 = 12.

    python benchmarks/bench_centroid_grad.py   ->  benchmarks/results/centroid_grad-<device>.md
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import dcx  # noqa: E402

BYTES_PER_ELEMENT = 4 + 8


def run(device, sizes):
    rows = []
    copy_gbs = common.copy_bandwidth(device)
    for n in sizes:
        grad = torch.randn(n, device=device)
        for k in (32, 256):
            labels = torch.randint(0, k, (n,), device=device)
            ours = lambda: dcx.ops.centroid_grad(grad, labels, k)  # noqa: E731
            bincount = lambda: torch.bincount(labels, weights=grad, minlength=k)  # noqa: E731
            index_add = lambda: torch.zeros(k, device=device).index_add_(0, labels, grad)  # noqa: E731
            t_ours = common.bench(ours, device)
            t_bin = common.bench(bincount, device)
            t_idx = common.bench(index_add, device)
            gbs = n * BYTES_PER_ELEMENT / t_ours / 1e9
            rows.append([f"{n:,}", k, f"{t_bin * 1e3:.3f}", f"{t_idx * 1e3:.3f}", f"{t_ours * 1e3:.3f}",
                         f"{gbs:.1f}", f"{gbs / copy_gbs:.0%}", f"{t_bin / t_ours:.2f}x",
                         f"{t_idx / t_ours:.2f}x"])
            del labels
        del grad
    header = ["n", "k", "bincount ms", "index_add_ ms", "dcx ms", "dcx GB/s", "of copy bw",
              "vs bincount", "vs index_add_"]
    notes = [common.stamp(device), "",
             f"Measured copy bandwidth: {copy_gbs:.1f} GB/s (torch copy_, read + write bytes; the "
             f"write-allocate read of its destination is not counted, so an op that reads what it "
             f"writes, or only reads, can exceed 100%). GB/s counts the "
             f"{BYTES_PER_ELEMENT} bytes per element the op must read; median of >= 20 runs."]
    common.write_table(f"centroid_grad-{device}", "centroid_grad vs bincount and index_add_",
                       header, rows, notes)


def main():
    sizes = common.sizes_from_env([1_000_000, 10_000_000, 100_000_000])
    for device in common.devices_to_run():
        run(device, sizes)


if __name__ == "__main__":
    main()
