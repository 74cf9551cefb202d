"""Han et al.'s pruning of LeNet-300-100 on MNIST: train dense, prune iteratively with retraining
(MaskedSGD) to fc1 92%, fc2 91%, fc3 74% (about 92% overall, the paper's 12x), and report the
per-layer sparsity and the test accuracy of the dense model, right after pruning, and after
retraining. Writes benchmarks/results/prune-lenet300.md.

    python benchmarks/prune_lenet.py [--data ../shared/data/mnist]

Defaults: 20 dense epochs (SGD, lr 0.1 cosine, momentum 0.9, weight decay 5e-4); 6 prune/retrain
rounds 3 epochs apart, each removing the same fraction of the surviving weights, retrained with
MaskedSGD at lr 0.05; then 30 epochs of MaskedSGD with lr 0.05 cosine to 0.
"""

import argparse
import copy
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/common.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # dcx from a source tree

from common import RESULTS, stamp  # noqa: E402

import dcx  # noqa: E402
from dcx.data import load_mnist, loader  # noqa: E402
from dcx.models import LeNet300100  # noqa: E402
from dcx.optim import MaskedSGD  # noqa: E402
from dcx.prune import PruneConfig, Pruner  # noqa: E402
from dcx.sensitivity import pick_sparsities, sensitivity_analysis  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"fc1": 0.92, "fc2": 0.91, "fc3": 0.74}  # Han et al. 2015, Table 2 (remaining 8/9/26%)


def accuracy(model, x, y, batch_size=2000):
    model.eval()
    with torch.no_grad():
        batches = loader(x, y, batch_size)
        correct = sum((model(xb).argmax(1) == yb).sum().item() for xb, yb in batches)
    model.train()
    return correct / len(y)


def train_epoch(model, optimizer, x, y, batch_size, seed, desc, lr_at=None):
    """One epoch; lr_at(fraction of the epoch done) sets the learning rate per batch."""
    batches = loader(x, y, batch_size, shuffle=True, seed=seed)
    for i, (xb, yb) in enumerate(tqdm(batches, desc=desc, leave=False, mininterval=1.0)):
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(i / len(batches))
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()


def cosine(lr, start, total):
    """lr at epoch `start + fraction` of a cosine decay to 0 over `total` epochs."""
    return lambda fraction: 0.5 * lr * (1 + math.cos(math.pi * (start + fraction) / total))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"),
                        help="folder with the MNIST IDX files (default ../shared/data/mnist)")
    parser.add_argument("--epochs", type=int, default=20, help="dense training epochs")
    parser.add_argument("--rounds", type=int, default=6, help="prune/retrain rounds")
    parser.add_argument("--retrain-epochs", type=int, default=3, help="retraining epochs per round")
    parser.add_argument("--final-epochs", type=int, default=30,
                        help="retraining after the last round")
    parser.add_argument("--lr", type=float, default=0.1, help="dense learning rate (cosine to 0)")
    parser.add_argument("--retrain-lr", type=float, default=0.05, help="retraining learning rate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=5e-4,
                        help="L2 regularisation (Han et al.: it makes weights prunable)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: as fast on these small layers, and deterministic)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "prune-lenet300.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    began = time.perf_counter()

    x, y = load_mnist(args.data, "train")
    xt, yt = load_mnist(args.data, "test")
    model = LeNet300100()
    hyper = dict(momentum=0.9, weight_decay=args.weight_decay)

    # 1. Dense training (MaskedSGD without masks is SGD).
    optimizer = MaskedSGD(model.parameters(), lr=args.lr, **hyper)
    for epoch in tqdm(range(args.epochs), desc="dense"):
        train_epoch(model, optimizer, x, y, args.batch_size, args.seed + epoch, f"dense {epoch}",
                    cosine(args.lr, epoch, args.epochs))
    dense_acc = accuracy(model, xt, yt)
    tqdm.write(f"dense: test accuracy {dense_acc:.4f}")

    # Sensitivity of each layer alone (Han et al., Figure 6), on the test set as in the paper.
    sensitivity = sensitivity_analysis(model, lambda m: accuracy(m, xt, yt))
    stem = Path(args.out).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    sensitivity.save_csv(f"{stem}-sensitivity.csv")
    sensitivity.plot(f"{stem}-sensitivity.png", title="LeNet-300-100: each layer pruned alone",
                     ylabel="test accuracy")
    picks = pick_sparsities(sensitivity, 0.005)
    tqdm.write(f"sparsities within 0.5% of dense accuracy: {picks}")

    # Reference point: the dense model pruned to the final sparsities at once, not retrained.
    overrides = {name: {"sparsity": s} for name, s in TARGETS.items()}
    oneshot = copy.deepcopy(model)
    dcx.prune_(oneshot, PruneConfig(sparsity=0.0, overrides=overrides))
    oneshot_acc = accuracy(oneshot, xt, yt)
    tqdm.write(f"one-shot pruned, not retrained: test accuracy {oneshot_acc:.4f}")

    # 2. Iterative prune and retrain (Han et al.): a round every retrain_epochs epochs, each
    #    reaching k/rounds of the target, retraining with masked SGD in between.
    config = PruneConfig(sparsity=0.0, overrides=overrides, schedule="iterative",
                         iterations=args.rounds, frequency=args.retrain_epochs)
    pruner = Pruner(model, config)
    optimizer = MaskedSGD(model.parameters(), lr=args.retrain_lr, **hyper)
    rounds = []
    for epoch in tqdm(range(pruner.final_step + 1), desc="prune/retrain"):
        if pruner.step():
            acc = accuracy(model, xt, yt)
            rounds.append((len(rounds) + 1, dict(pruner.sparsity()), acc))
            tqdm.write(f"round {len(rounds)}: pruned to {fmt_sparsity(pruner.sparsity())}, "
                       f"test accuracy {acc:.4f}")
        if epoch < pruner.final_step:
            train_epoch(model, optimizer, x, y, args.batch_size, 1000 + epoch, f"retrain {epoch}")
    pruned_acc = rounds[-1][2]
    for epoch in tqdm(range(args.final_epochs), desc="final retrain"):
        train_epoch(model, optimizer, x, y, args.batch_size, 2000 + epoch, f"final {epoch}",
                    cosine(args.retrain_lr, epoch, args.final_epochs))
    retrained_acc = accuracy(model, xt, yt)
    tqdm.write(f"retrained: test accuracy {retrained_acc:.4f}")

    # Every pruned weight is exactly zero after retraining.
    for name, mask in dcx.prune.masks(model).items():
        weight = model.get_parameter(name)
        assert (weight[~mask] == 0).all(), f"{name}: pruned weights came back"
    wall = time.perf_counter() - began
    write_report(args, model, dense_acc, oneshot_acc, rounds, pruned_acc, retrained_acc, wall,
                 sensitivity, picks)


def fmt_sparsity(report):
    return ", ".join(f"{name.split('.')[0]} {100 * s:.1f}%" for name, s in report.items())


def write_report(args, model, dense_acc, oneshot_acc, rounds, pruned_acc, retrained_acc, wall,
                 sensitivity, picks):
    masks = dcx.prune.masks(model)
    sweep = next(iter(sensitivity.curves.values()))
    lines = [
        "# Pruning LeNet-300-100 on MNIST (Han et al. 2015, iterative prune and masked retraining)",
        "",
        stamp("cpu") + f"; wall time {wall:.0f} s",
        "",
        "Command: `" + " ".join(["python"] + [shlex.quote(a) for a in sys.argv]) + "`",
        "",
        "| layer | weights | kept | sparsity | paper's sparsity |",
        "|---|---|---|---|---|",
    ]
    total = kept = 0
    for name, mask in masks.items():
        n, k = mask.numel(), int(mask.count_nonzero())
        total, kept = total + n, kept + k
        paper = TARGETS[name.split(".")[0]]
        lines.append(f"| {name} | {n:,} | {k:,} | {100 * (1 - k / n):.2f}% | {100 * paper:.0f}% |")
    lines.append(f"| total | {total:,} | {kept:,} | {100 * (1 - kept / total):.2f}% "
                 f"({total / kept:.1f}x fewer weights) | 92% (12x) |")
    lines += [
        "",
        "| model | test accuracy | test error |",
        "|---|---|---|",
        f"| dense ({args.epochs} epochs, SGD lr {args.lr} cosine, momentum 0.9) | "
        f"{100 * dense_acc:.2f}% | {100 * (1 - dense_acc):.2f}% |",
        f"| dense pruned at once to the final sparsities, not retrained | "
        f"{100 * oneshot_acc:.2f}% | {100 * (1 - oneshot_acc):.2f}% |",
    ]
    for number, report, acc in rounds:
        lines.append(f"| round {number}/{len(rounds)}, right after pruning to "
                     f"{fmt_sparsity(report)} | {100 * acc:.2f}% | {100 * (1 - acc):.2f}% |")
    lines += [
        f"| after retraining ({args.rounds} rounds x {args.retrain_epochs} epochs, then "
        f"{args.final_epochs} epochs, MaskedSGD lr {args.retrain_lr}) | {100 * retrained_acc:.2f}% "
        f"| {100 * (1 - retrained_acc):.2f}% |",
        "",
        "Paper (Caffe): dense 1.64% error, pruned and retrained 1.59% error at 8% of the weights.",
        "",
        "Sensitivity of the dense model, each layer pruned alone without retraining (test "
        f"accuracy; plot: {Path(args.out).stem}-sensitivity.png):",
        "",
        "| layer | " + " | ".join(f"{100 * s:g}%" for s, _ in sweep)
        + " | largest sparsity within 0.5% |",
        "|---|" + "---|" * (len(sweep) + 1),
    ]
    for name, curve in sensitivity.curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * m:.2f}" for _, m in curve)
                     + f" | {100 * picks[name]:g}% |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    print(f"pruned weights: {sum(int((~m).sum()) for m in masks.values())} of "
          f"{sum(m.numel() for m in masks.values())}; dense accuracy {dense_acc:.4f}, "
          f"right after pruning {pruned_acc:.4f}, retrained {retrained_acc:.4f}")


if __name__ == "__main__":
    main()
