"""One rank of the distributed distillation test (tests/test_distill_ddp.py), launched by
torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_distill_worker.py OUT

(1) A pruned SmallCNN learns its teacher's logits by dcx.distill_ for STEPS steps, each rank on
its share of one list of batches, starting from weights that differ on rank 1 (rank 0's must
win); then for half a second more, rank 1 slower. (2) A tiny BertModel through dcx.distill.convert_distilled_ (prune 50%, retrain, share at
3 bits with calibration inputs that differ per rank, retrain codebooks, pack). Saves what each
rank ended with to OUT/rank<r>.pt.
"""

import copy
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dcx  # noqa: E402
from tests.test_calibration import SmallCNN, token_batches  # noqa: E402

STEPS = 4


def cnn_student_and_batches():
    """The teacher, its 50%-pruned student and 8 batches of 8 images, the same on every rank
    (and in the test's single-process run)."""
    torch.manual_seed(0)
    teacher = SmallCNN().eval()
    student = dcx.prune_(copy.deepcopy(teacher),
                         dcx.PruneConfig(sparsity=0.5, targets=["pointwise.weight", "head.weight"]))
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 3, 12, 12, generator=g) for _ in range(2 * STEPS)]
    return teacher, student, batches


def tiny_bert():
    import transformers

    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32, initializer_range=0.2)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def main(out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    teacher, student, batches = cnn_student_and_batches()
    if rank == 1:  # rank 0's start must win
        with torch.no_grad():
            student.head.bias.add_(1.0)
    history = dcx.distill_(student, teacher, batches, steps=STEPS, lr=1e-2, progress=False)
    result = {"cnn": {k: v.clone() for k, v in student.state_dict().items()},
              "losses": [h.loss for h in history], "metrics": [h.metric for h in history]}
    # A time budget: rank 0's clock ends it, so both ranks take the same steps even when one
    # is slower (rank 1 sleeps in each step's callback).
    slow = (lambda _: time.sleep(0.05)) if rank == 1 else None
    timed = dcx.distill_(student, teacher, batches, seconds=0.5, lr=1e-3, progress=False,
                         callback=slow)
    result["timed_steps"] = len(timed)
    result["timed"] = {k: v.clone() for k, v in student.state_dict().items()}

    bert = tiny_bert()
    config = dcx.ConvertConfig(bits=3, sparsity=0.5, embeddings=False)
    corpus = token_batches(6, 120, seed=1)
    calibration = token_batches(2, 120, seed=10 + rank)  # differs per rank: rank 0's must win
    bert, _, stages = dcx.distill.convert_distilled_(bert, config, corpus, calibration, steps=2,
                                                     progress=False)
    result["bert"] = copy.deepcopy(bert.state_dict())  # packed layers add non-tensor entries
    result["bert_steps"] = {stage: len(h) for stage, h in stages.history.items()}
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
