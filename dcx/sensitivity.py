"""Pruning sensitivity analysis (Han et al. 2015, Figure 6): prune each layer alone at a sweep of
sparsities, evaluate the model with a user-given function, and pick per-layer sparsities that
keep the metric within an allowed drop.

    result = sensitivity_analysis(model, lambda m: accuracy(m, x_test, y_test))
    result.save_csv("sensitivity.csv"); result.plot("sensitivity.png")
    config = PruneConfig(sparsity=0.0, overrides=to_overrides(pick_sparsities(result, 0.005)))

The metric is "higher is better" (accuracy); pass lambda m: -loss(m) for a loss.
"""

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dcx import state
from dcx.config import PruneConfig, check_fraction
from dcx.prune import resolve_targets, compute_mask

__all__ = ["SensitivityResult", "sensitivity_analysis", "pick_sparsities", "to_overrides",
           "DEFAULT_SPARSITIES"]

DEFAULT_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)


@dataclass
class SensitivityResult:
    """baseline: the metric of the model as given; curves: {parameter name: [(sparsity,
    metric)]} in increasing sparsity."""

    baseline: float
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def rows(self):
        return [(name, s, m) for name, curve in self.curves.items() for s, m in curve]

    def save_csv(self, path) -> Path:
        path = Path(path)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "sparsity", "metric", "baseline"])
            writer.writerows([(n, s, m, self.baseline) for n, s, m in self.rows()])
        return path

    def save_json(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def to_dict(self):
        return {"baseline": self.baseline,
                "curves": {n: [[s, m] for s, m in c] for n, c in self.curves.items()}}

    @classmethod
    def from_dict(cls, data):
        return cls(float(data["baseline"]),
                   {n: [(float(s), float(m)) for s, m in c] for n, c in data["curves"].items()})

    @classmethod
    def load_json(cls, path) -> "SensitivityResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def plot(self, path, title: str = "Pruning sensitivity", ylabel: str = "metric") -> Path:
        """Metric vs sparsity, one line per layer, saved to `path` (png, pdf, svg)."""
        from matplotlib.figure import Figure  # no pyplot: no global backend or state

        figure = Figure(figsize=(6, 4), dpi=120)
        axes = figure.add_subplot()
        for name, curve in self.curves.items():
            axes.plot([100 * s for s, _ in curve], [m for _, m in curve], marker="o", ms=3,
                      label=name)
        axes.axhline(self.baseline, color="gray", lw=0.8, ls="--", label="unpruned")
        axes.set_xlabel("sparsity of the layer (%)")
        axes.set_ylabel(ylabel)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        path = Path(path)
        figure.savefig(path)
        return path


def sensitivity_analysis(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    config: PruneConfig | None = None,
    progress: bool = True,
) -> SensitivityResult:
    """Prune each target of `config` (default: every Linear and ConvNd weight, element
    granularity) alone to each sparsity, call `evaluate(model)`, and restore the layer exactly.
    Existing masks are respected (already pruned weights stay pruned). The config's criterion
    is ignored; its targets, overrides (None excludes a layer), granularity and norm are used."""
    sparsities = sorted(float(s) for s in sparsities)
    for s in sparsities:
        check_fraction("sparsity", s)
    if config is None:
        config = PruneConfig(sparsity=0.0)
    targets = [t for t in resolve_targets(model, config) if t.tied_to is None]
    result = SensitivityResult(float(evaluate(model)))
    steps = tqdm(total=len(targets) * len(sparsities), desc="sensitivity", disable=not progress)
    for t in targets:
        param = getattr(t.module, t.param_name)
        existing = state.mask(t.module, t.param_name)
        saved = param.detach().clone()
        curve = []
        try:
            for s in sparsities:
                mask = compute_mask(saved, t.spec["granularity"], sparsity=s, norm=t.spec["norm"],
                                    mask=existing)
                with torch.no_grad():
                    param.copy_(saved * mask)
                curve.append((s, float(evaluate(model))))
                steps.update()
        finally:
            with torch.no_grad():
                param.copy_(saved)
        result.curves[t.name] = curve
    steps.close()
    return result


def pick_sparsities(result: SensitivityResult, max_drop: float) -> dict[str, float]:
    """Per layer, the largest swept sparsity such that it and every lower one keep the metric
    >= baseline - max_drop (0.0 when even the lowest does not)."""
    if not max_drop >= 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    picks = {}
    for name, curve in result.curves.items():
        best = 0.0
        for s, metric in curve:
            if metric < result.baseline - max_drop:
                break
            best = s
        picks[name] = best
    return picks


def to_overrides(picks: dict[str, float]) -> dict[str, dict[str, float]]:
    """{parameter name: sparsity} as PruneConfig overrides."""
    return {name: {"sparsity": s} for name, s in picks.items()}
