"""One rank of the distributed pruning test (tests/test_prune_ddp.py), launched by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_prune_worker.py OUT

Prunes LeNet-300-100 on a gradual schedule inside DistributedDataParallel (gloo, CPU) while
retraining with MaskedSGD on different data per rank, then saves its state to OUT/rank<r>.pt.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcx import prune as P  # noqa: E402
from dcx.models import LeNet300100  # noqa: E402
from dcx.optim import MaskedSGD  # noqa: E402

STEPS = 8
CONFIG = P.PruneConfig(sparsity=0.8, schedule="gradual", start=1, frequency=2, iterations=3,
                       overrides={"fc3": {"sparsity": 0.5, "granularity": "channel"}})


def main(out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    model = LeNet300100()
    ddp = DistributedDataParallel(model)
    pruner = P.Pruner(model, CONFIG)
    optimizer = MaskedSGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, masks=model)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    for _ in range(STEPS):
        pruner.step()
        x = torch.randn(32, 784, generator=data)
        y = torch.randint(0, 10, (32,), generator=data)
        optimizer.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = {n: optimizer.state[p]["momentum_buffer"].clone()
                for n, p in model.named_parameters()}

    # Masks cannot diverge: even from different weights, every rank ends with rank 0's masks.
    with torch.no_grad():
        model.fc1.weight.mul_(torch.rand(model.fc1.weight.shape, generator=data) + 0.5)
    P.Pruner(model, P.PruneConfig(sparsity=0.9, targets=["fc1"])).prune_to(1.0)
    torch.save(dict(state=state, momentum=momentum, diverged_mask=model.fc1.weight_mask.clone(),
                    final_step=pruner.final_step), Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
