"""The figures a person would rather look at than read: weight distributions through the stages
(the paper's figures), accuracy against size after each stage, and sensitivity curves.

Every function writes one PNG and returns its path; matplotlib runs headless (Agg).
"""

from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def weight_distribution(
    path,
    stages: Mapping[str, torch.Tensor],
    centroids: Optional[torch.Tensor] = None,
    title: str = "weight distribution",
    bins: int = 200,
):
    """One histogram panel per stage ({"dense": w, "pruned": w, "clustered": w}), zeros of pruned
    weights left out so the surviving distribution is visible; `centroids` are marked on the last
    panel, as in the paper's Figure 4 and 5."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.2), squeeze=False)
    for ax, (name, weights) in zip(axes[0], stages.items()):
        w = weights.detach().float().reshape(-1).cpu()
        nonzero = w[w != 0]
        ax.hist(nonzero.numpy(), bins=bins, color="tab:blue", alpha=0.85)
        ax.set_title(f"{name} ({nonzero.numel():,} of {w.numel():,} kept)", fontsize=9)
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
    if centroids is not None:
        ax = axes[0][-1]
        for c in centroids.detach().float().cpu().tolist():
            ax.axvline(c, color="tab:red", linewidth=0.6, alpha=0.8)
        ax.plot([], [], color="tab:red", label=f"{centroids.numel()} centroids")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def accuracy_vs_size(path, stages: Sequence[Mapping], title: str = "accuracy vs size"):
    """stages: [{"stage": name, "size_bytes": int, "accuracy": float}, ...] in pipeline order;
    size on a log axis, each point labelled with its stage."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    sizes = [s["size_bytes"] / 1024 for s in stages]
    accs = [100 * s["accuracy"] for s in stages]
    ax.plot(sizes, accs, "o-", color="tab:blue")
    for s, x, y in zip(stages, sizes, accs):
        ax.annotate(s["stage"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model size (KiB, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def distillation_curves(path, runs: Mapping[str, Mapping[str, Sequence]],
                        metric_name: str = "metric", window: int = 10,
                        title: str = "retraining by distillation"):
    """The metric against the step for each run ({label: {stage: [DistillStep, ...]}}, the
    stages in order, e.g. convert_distilled_'s {"pruned": ..., "shared": ...}), one line per
    run and stage, the steps counted on across stages; a running mean over `window` steps,
    since each step's metric is of its own batch."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, stages in runs.items():
        offset = 0
        for stage, history in stages.items():
            if not history:
                continue
            metrics = [h.metric for h in history]
            means = [sum(metrics[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
                     for i in range(len(metrics))]
            steps = [offset + h.step for h in history]
            ax.plot(steps, means, label=f"{label} {stage}".strip())
            offset = steps[-1] + 1
    ax.set_xlabel("distillation step")
    ax.set_ylabel(metric_name)
    ax.set_title(f"{title} (running mean of {window} steps)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6 if len(runs) > 4 else 8, ncol=2 if len(runs) > 4 else 1)
    return _save(fig, path)
