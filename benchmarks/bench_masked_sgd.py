"""masked_sgd_step_ against what a user does today: torch.optim.SGD(foreach=True).step() followed
by param.mul_(mask) and buf.mul_(mask). Momentum 0.9 and weight decay on, float32.

Bytes the fused op must move per element: param r+w, grad r, mask r (1 byte), buf r+w = 21 bytes.

    python benchmarks/bench_masked_sgd.py   ->  benchmarks/results/masked_sgd-<device>.md
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import dcx  # noqa: E402

BYTES_PER_ELEMENT = (4 + 4) + 4 + 1 + (4 + 4)  # param r+w, grad r, mask r, buf r+w


def run(device, sizes):
    rows = []
    copy_gbs = common.copy_bandwidth(device)
    for n in sizes:
        param = torch.randn(n, device=device)
        grad = torch.randn(n, device=device)
        mask = torch.rand(n, device=device) < 0.1
        buf = torch.zeros(n, device=device)
        ours = lambda: dcx.ops.masked_sgd_step_(param, grad, mask, buf, 0.01, 0.9, 0.0, 1e-4)  # noqa: E731

        p = torch.nn.Parameter(param.clone())
        p.grad = grad.clone()
        sgd = torch.optim.SGD([p], lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True)
        sgd.step()
        state_buf = sgd.state[p]["momentum_buffer"]
        maskf = mask.to(param.dtype)

        def theirs():
            sgd.step()
            with torch.no_grad():
                p.mul_(maskf)
                state_buf.mul_(maskf)

        t_ours = common.bench(ours, device)
        t_theirs = common.bench(theirs, device)
        gbs = n * BYTES_PER_ELEMENT / t_ours / 1e9
        rows.append([f"{n:,}", f"{t_theirs * 1e3:.3f}", f"{t_ours * 1e3:.3f}", f"{gbs:.1f}",
                     f"{gbs / copy_gbs:.0%}", f"{t_theirs / t_ours:.2f}x"])
        del param, grad, mask, buf, p, sgd, state_buf, maskf
    header = ["params", "SGD(foreach)+mul_(mask) ms", "dcx masked_sgd_step_ ms", "dcx GB/s",
              "of copy bw", "speedup"]
    notes = [common.stamp(device), "",
             f"Measured copy bandwidth: {copy_gbs:.1f} GB/s (torch copy_, read + write bytes; the "
             f"write-allocate read of its destination is not counted, so an op that reads what it "
             f"writes, or only reads, can exceed 100%). GB/s counts the "
             f"{BYTES_PER_ELEMENT} bytes per element the fused step must move; median of >= 20 runs."]
    common.write_table(f"masked_sgd-{device}", "masked_sgd_step_ vs torch.optim.SGD + masking",
                       header, rows, notes)


def main():
    sizes = common.sizes_from_env([1_000_000, 10_000_000, 100_000_000])
    for device in common.devices_to_run():
        run(device, sizes)


if __name__ == "__main__":
    main()
