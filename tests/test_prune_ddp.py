"""Pruning and masked retraining inside DistributedDataParallel: two ranks launched with torchrun
(gloo, CPU) end with identical weights and masks, and every pruned weight exactly zero."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.testing import requires_kernels

WORKER = Path(__file__).with_name("ddp_prune_worker.py")

pytestmark = [
    requires_kernels,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
]


def test_ddp_two_ranks_identical_and_pruned(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(WORKER), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["final_step"] < 8  # the schedule finished within the run
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys()
    assert {k for k in a if k.endswith("_mask")} == {f"fc{i}.weight_mask" for i in (1, 2, 3)}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for name in ("fc1", "fc2", "fc3"):
        mask = a[f"{name}.weight_mask"]
        assert (a[f"{name}.weight"][~mask] == 0).all()
        for r in (0, 1):
            assert (ranks[r]["momentum"][f"{name}.weight"][~mask] == 0).all()
    n1 = a["fc1.weight_mask"].numel()
    assert int((~a["fc1.weight_mask"]).sum()) == round(0.8 * n1)
    fc3_columns = a["fc3.weight_mask"].all(0)
    assert int((~fc3_columns).sum()) == 50 and not a["fc3.weight_mask"][:, ~fc3_columns].any()
    assert torch.equal(ranks[0]["diverged_mask"], ranks[1]["diverged_mask"])
