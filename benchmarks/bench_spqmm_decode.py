"""dcx.ops.spqmm_decode, as the backward of a packed layer runs it (grad_x = grad_y W, W decoded
once per backward), against the GEMM that every backward runs anyway (grad_y @ W with the dense
weight at hand, what nn.Linear's backward costs), and the packed layer's whole forward + backward.

    python benchmarks/bench_spqmm_decode.py     # table: benchmarks/results/spqmm_decode-<device>.md

Shapes: all-MiniLM-L6-v2's MLP (1536x384, 384x1536, 6 bits) and 4096x4096 (dense 4 bits; 90%
pruned, 5 bits); 16, 128 and 512 rows of grad_y. Interleaved medians (common.bench_side_by_side).
"""

import torch

import dcx
from common import bench_side_by_side, devices_to_run, stamp, write_table

CASES = [((1536, 384), 0.0, 6), ((384, 1536), 0.0, 6), ((4096, 4096), 0.0, 4),
         ((4096, 4096), 0.9, 5)]
ROWS = (16, 128, 512)


def main():
    for device in devices_to_run():
        torch.manual_seed(0)
        rows_out = []
        for (n, k), sparsity, bits in CASES:
            layer = dcx.SparseQuantLinear.from_float(torch.nn.Linear(k, n).to(device), sparsity,
                                                     bits)
            p = layer.packed

            def decode(p=p, n=n, k=k):
                return dcx.ops.spqmm_decode(p.codes, p.windows, p.group_ptr, p.chunks, p.codebook,
                                            n, k, p.bits)

            w = decode()
            for rows in ROWS:
                grad_y = torch.randn(rows, n, device=device)
                x = torch.randn(rows, k, device=device, requires_grad=True)

                def step(layer=layer, x=x, grad_y=grad_y):
                    x.grad = None
                    layer(x).backward(grad_y)

                t = bench_side_by_side({"decode": decode, "gemm": lambda g=grad_y, w=w: g @ w,
                                        "step": step}, device, repeat=10)
                rows_out.append([f"{n}x{k}", f"{100 * sparsity:.0f}%", bits, rows,
                                 f"{1e3 * t['decode']:.2f}", f"{1e3 * t['gemm']:.2f}",
                                 f"{t['decode'] / t['gemm']:.2f}", f"{1e3 * t['step']:.2f}"])
        write_table(
            f"spqmm_decode-{device}", "spqmm_decode: the backward's decode against its GEMM",
            ["shape", "pruned", "bits", "grad rows", "decode ms", "grad GEMM ms",
             "decode / GEMM", "layer forward + backward ms"], rows_out,
            notes=[stamp(device), "",
                   "decode: dcx.ops.spqmm_decode of the packed weight (a fresh [N, K] tensor each "
                   "call); grad GEMM: grad_y @ W with W dense; forward + backward: "
                   "SparseQuantLinear(x).backward(grad_y). Command: "
                   "`python benchmarks/bench_spqmm_decode.py`."])


if __name__ == "__main__":
    main()
