"""Pruning and masked retraining inside DistributedDataParallel: two ranks launched with torchrun
(gloo, CPU) end with identical weights and masks, and every pruned weight exactly zero."""

from pathlib import Path

import torch

from tests.testing import requires_gloo, requires_kernels, two_ranks

WORKER = Path(__file__).with_name("ddp_prune_worker.py")

pytestmark = [requires_kernels, requires_gloo]


def test_ddp_two_ranks_identical_and_pruned(tmp_path):
    ranks = two_ranks(WORKER, tmp_path, timeout=120)
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
