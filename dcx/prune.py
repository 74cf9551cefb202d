"""Pruning, the first stage of Deep Compression: remove the unimportant connections, then retrain
the rest with their masks held fixed (dcx.MaskedSGD).

Lifecycle, as torch.ao.pruning: prepare -> step -> finalize.

    config = PruneConfig(sparsity=0.9, schedule="iterative", iterations=4, frequency=2,
                         overrides={"fc3": {"sparsity": 0.7}})
    pruner = Pruner(model, config)          # prepare: all-ones masks, nothing pruned yet
    optimizer = MaskedSGD(model.parameters(), lr=0.01)   # reads the masks from the parameters
    for epoch in range(epochs):
        pruner.step()                       # prunes on the schedule's steps
        train_one_epoch(model, optimizer)
    pruner.finalize()                       # = finalize_pruning_(model): the final masks

`prune_(model, config)` prunes to the final target at once.

What is pruned: by default the `weight` of every Linear and ConvNd; `targets` selects modules
(their weight) or any parameter by name or regex ("re:<pattern>", matched in full).

Criteria (exactly one in the config; a per-layer override may choose another):
  sparsity         the fraction of each layer's units pruned, exactly round(s * units)
  global_sparsity  one magnitude threshold over all the layers that use it (element granularity)
  threshold        prune the units whose score is below an absolute threshold
  quality          Han's rule: threshold = quality x the standard deviation of the layer's weights

Granularity: element (|w|); kernel (each 2-D kernel w[o, i] of a convolution), filter (each
output channel w[o]), channel (each input channel w[:, i]) scored by the L1 or L2 norm of the
structure divided by its size (mean |w| or root mean square), so thresholds stay in weight
units. Filter and channel also apply to Linear weights (output neurons, input features).
Ties are broken deterministically: among equal scores the lower flat index is pruned first.
Pruning is monotone: a pruned unit stays pruned.

The masks are the layers' compressed state (dcx.state): bool buffers `<param>_mask` on the
module that owns the parameter, read by every later stage (cluster_, save, the report).
Pruned weights are zeroed in place, with no second dense copy, and stay zero in training (the
state's forward hook, and the masks' link to their Parameters that dcx.MaskedSGD and
dcx.mask_optimizer_ read). A layer pruned after it was clustered works too: its mask joins the
codebook state. Under torch.distributed, masks are broadcast from rank 0 after each pruning
step, so ranks can never disagree.

Schedules count `Pruner.step()` calls (call it once per epoch or once per batch, as you like):
  oneshot    the full target at step `start`
  iterative  `iterations` rounds, every `frequency` steps from `start` (Han's iterative prune
             and retrain); each round prunes the same fraction of the surviving weights, so
             round k of n keeps (1 - target)^(k/n): late rounds, where the network is already
             sparse, remove fewer weights
  gradual    Zhu & Gupta (2017): s_k = s_f + (s_i - s_f)(1 - k/n)^3 at step start + k*frequency,
             k = 0..n (n = iterations)
For threshold criteria the threshold grows with the schedule's progress, k/n or Zhu & Gupta's
1 - (1 - k/n)^3 (threshold x progress).
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dcx import state
from dcx.config import (CRITERIA, GRANULARITIES, NORMS, SCHEDULES, ConfigError, PruneConfig,
                        check_fraction, compile_pattern, layer_overrides)

__all__ = [
    "PruneConfig",
    "Pruner",
    "prune_",
    "finalize_pruning_",
    "masks",
    "sparsity",
    "apply_masks_",
    "set_masks_",
    "compute_mask",
    "schedule_progress",
    "GRANULARITIES",
    "SCHEDULES",
]

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ---------------------------------------------------------------------------------------------
# Scores and masks of one tensor


def _check_granularity(granularity, shape, name="tensor"):
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; "
                         f"expected one of {list(GRANULARITIES)}")
    if granularity == "kernel" and len(shape) < 3:
        raise ValueError(f"granularity 'kernel' needs a convolution weight (3 or more dims); "
                         f"{name} has shape {tuple(shape)}")
    if granularity in ("filter", "channel") and len(shape) < 2:
        raise ValueError(f"granularity {granularity!r} needs a weight with 2 or more dims; "
                         f"{name} has shape {tuple(shape)}")


def _units(t: Tensor, granularity: str) -> Tensor:
    """t as [units, elements per unit]."""
    if granularity == "element":
        return t.reshape(-1, 1)
    if granularity == "filter":
        return t.reshape(t.shape[0], -1)
    if granularity == "channel":
        return t.transpose(0, 1).reshape(t.shape[1], -1)
    return t.reshape(t.shape[0] * t.shape[1], -1)  # kernel


def _expand(keep_units: Tensor, shape, granularity: str) -> Tensor:
    """A unit mask back to the tensor's shape."""
    if granularity == "element":
        return keep_units.reshape(shape)
    ones = [1] * (len(shape) - 2)
    if granularity == "filter":
        return keep_units.reshape(shape[0], *([1] * (len(shape) - 1))).expand(shape).clone()
    if granularity == "channel":
        return keep_units.reshape(1, shape[1], *ones).expand(shape).clone()
    return keep_units.reshape(shape[0], shape[1], *ones).expand(shape).clone()


def unit_scores(weight: Tensor, granularity: str = "element", norm: str = "l1") -> Tensor:
    """Importance of each unit, float32 [units]: |w| for elements; for structures the L1 norm
    divided by the structure's size (mean |w|) or the L2 norm divided by the square root of
    its size (root mean square), so structure scores are in weight units."""
    _check_granularity(granularity, weight.shape)
    w = _units(weight.detach().float(), granularity)
    if norm == "l1":
        return w.abs().mean(dim=1)
    if norm == "l2":
        return w.square().mean(dim=1).sqrt()
    raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")


def _count(fraction: float, n: int) -> int:
    """round(fraction * n), halves up: the number of units a sparsity removes."""
    return min(n, int(math.floor(fraction * n + 0.5)))


def _lowest(scores: Tensor, k: int) -> Tensor:
    """Bool [n]: the k lowest scores, ties to the lower index (a stable sort)."""
    prune = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        order = torch.sort(scores, stable=True).indices
        prune[order[:k]] = True
    return prune


def compute_mask(
    weight: Tensor,
    granularity: str = "element",
    sparsity: float | None = None,
    threshold: float | None = None,
    norm: str = "l1",
    mask: Tensor | None = None,
) -> Tensor:
    """The keep-mask (bool, weight's shape) of one tensor: the round(sparsity x units) units of
    lowest score pruned, or the units scoring below `threshold`. `mask`, the current mask, is
    respected: already pruned units count first and stay pruned."""
    if (sparsity is None) == (threshold is None):
        raise ValueError("give exactly one of sparsity and threshold")
    scores = unit_scores(weight, granularity, norm)
    pruned = None
    if mask is not None:
        pruned = ~_units(mask.bool(), granularity).any(dim=1)  # units with nothing left
        scores = scores.masked_fill(pruned, -1.0)  # below any real score: pruned first
    if sparsity is not None:
        check_fraction("sparsity", sparsity)
        prune = _lowest(scores, _count(sparsity, scores.numel()))
    else:
        prune = scores < threshold
    keep = _expand(~prune, weight.shape, granularity)
    return keep if mask is None else keep & mask.bool()


# ---------------------------------------------------------------------------------------------
# Schedules


def schedule_progress(config: PruneConfig, step: int) -> float | None:
    """The fraction of the final target to reach at `step` (a Pruner.step() count from 0), or
    None when `step` is not a pruning step. The last pruning step returns 1.0."""
    k, rem = divmod(step - config.start, config.frequency)
    if step < config.start or rem != 0:
        return None
    n = config.iterations
    if config.schedule == "oneshot":
        return 1.0 if k == 0 else None
    if config.schedule == "iterative":
        return (k + 1) / n if k < n else None
    return 1.0 - (1.0 - k / n) ** 3 if k <= n else None  # gradual (Zhu & Gupta)


def final_step(config: PruneConfig) -> int:
    """The Pruner.step() count at which the schedule reaches its final target."""
    if config.schedule == "oneshot":
        return config.start
    last = config.iterations - 1 if config.schedule == "iterative" else config.iterations
    return config.start + last * config.frequency


# ---------------------------------------------------------------------------------------------
# Targets: which parameters, with which per-layer settings


@dataclass
class _Target:
    name: str          # full parameter name, "fc1.weight"
    module_name: str   # "fc1"
    module: nn.Module
    param_name: str    # "weight"
    spec: dict[str, Any]      # resolved layer fields (criterion, granularity, ...)
    tied_to: str | None = None  # a bias that follows its weight's filters

    def weight(self) -> Tensor:
        return state.values(self.module, self.param_name)

    def mask(self) -> Tensor:
        return state.mask(self.module, self.param_name)


def _owner(model, full_name):
    module_name, _, param_name = full_name.rpartition(".")
    return module_name, model.get_submodule(module_name), param_name


def _weight_name(module_name, module):
    """The full name of a module's weight, when it has one (a Parameter, or a shared weight)."""
    if hasattr(module, "layer_state"):  # a packed layer: its state is final
        return None
    if isinstance(module._parameters.get("weight"), nn.Parameter) or state.get(module) is not None:
        return f"{module_name}.weight" if module_name else "weight"
    return None


def _select(model, config):
    """Full names of the parameters config.targets selects (default: the weight of every
    Linear and ConvNd); a module name selects its weight."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    if config.targets is None:
        return [n for n in (_weight_name(name, m) for name, m in modules.items()
                            if isinstance(m, PRUNABLE)) if n is not None]
    chosen = []
    for pattern in config.targets:
        exact, regex = compile_pattern(pattern, "PruneConfig targets")
        hits = [n for n in list(modules) + list(params)
                if (n == exact if exact is not None else regex.fullmatch(n))]
        if not hits:
            raise ConfigError(f"target {pattern!r} matches no module or parameter of the model; "
                              f"modules: {sorted(n for n in modules if n)}")
        for name in hits:
            if name in params:
                chosen.append(name)
            elif name in modules:
                weight = _weight_name(name, modules[name])
                if weight is not None:
                    chosen.append(weight)
                elif exact is not None:
                    raise ConfigError(f"target {pattern!r} is a module without a weight "
                                      "parameter")
    return list(dict.fromkeys(chosen))


def resolve_targets(model, config) -> list[_Target]:
    names = _select(model, config)
    chosen = layer_overrides(model, config.overrides, names, "PruneConfig")
    base = config.layer_fields()
    targets = []
    for full in names:
        module_name, module, param_name = _owner(model, full)
        fields = dict(base)
        if full in chosen:
            override = chosen[full][1]
            if override is None:
                continue  # excluded
            if any(override.get(c) is not None for c in CRITERIA):
                fields.update({c: None for c in CRITERIA})
            fields.update({k: v for k, v in override.items() if v is not None})
        _check_granularity(fields["granularity"], state.values(module, param_name).shape, full)
        targets.append(_Target(full, module_name, module, param_name, fields))
        bias = getattr(module, "bias", None)
        bias_name = f"{module_name}.bias" if module_name else "bias"
        if (fields["include_bias"] and param_name == "weight" and isinstance(bias, nn.Parameter)
                and bias_name not in names):
            bias_fields = dict(fields, granularity="element")
            tied = full if fields["granularity"] == "filter" else None
            targets.append(_Target(bias_name, module_name, module, "bias", bias_fields, tied))
    if not targets:
        raise ConfigError("the config selects no parameter to prune")
    global_targets = [t for t in targets if t.spec["global_sparsity"] is not None]
    for t in global_targets:
        if t.spec["granularity"] != "element":
            raise ConfigError(f"global_sparsity needs element granularity; {t.name} has "
                              f"{t.spec['granularity']!r}")
    if len({t.spec["global_sparsity"] for t in global_targets}) > 1:
        raise ConfigError("all layers pruned by global_sparsity must share one value")
    return targets


# ---------------------------------------------------------------------------------------------
# Masks of a model (the pruning part of dcx.state)


def masks(model: nn.Module) -> dict[str, Tensor]:
    """{parameter name: its mask (bool, True = kept)} for every pruned parameter; the tensors are
    the buffers themselves."""
    return {name: st.mask for name, st in state.layers(model).items() if st.mask is not None}


def sparsity(model: nn.Module) -> dict[str, float]:
    """{parameter name: fraction of its mask pruned} for every masked parameter."""
    return {full: (mask.numel() - int(mask.count_nonzero())) / mask.numel() if mask.numel() else 0.0
            for full, mask in masks(model).items()}


def apply_masks_(model: nn.Module) -> nn.Module:
    """Zero every pruned weight in place (+0.0), e.g. after an optimizer that does not know the
    masks moved them."""
    for st in state.layers(model).values():
        if st.mask is not None and not st.packed:
            state.apply_(st.module, st.param)
    return model


def set_masks_(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Prune `model` to given masks: {parameter name ("fc1.weight"): bool mask, True = kept}, or
    a pruned model's state_dict (its "<param>_mask" entries are the masks; the other entries
    are ignored). Returns the model."""
    params = {name for name, _ in model.named_parameters()} | set(state.layers(model))
    for key, value in masks.items():
        full = key[: -len(state.MASK)] if key.endswith(state.MASK) else key
        if full not in params or (full == key and value.dtype != torch.bool):
            if value.dtype == torch.bool and full == key:
                raise ValueError(f"set_masks_: {key!r} is not a parameter of the model")
            continue
        _, module, param_name = _owner(model, full)
        state.set_mask_(module, param_name, value.bool())
    return model


def finalize_pruning_(model: nn.Module) -> nn.Module:
    """End pruning: every pruned weight is exactly +0.0 and the masks become the layers' final
    state, which the later stages read (cluster_ shares only the kept weights, save stores only
    their positions) and training keeps (pruned weights stay zero). Returns the model."""
    return apply_masks_(model)


def _broadcast_masks(targets):
    """Make every rank hold rank 0's masks (identical weights give identical masks already;
    this makes divergence impossible)."""
    from dcx.distributed import broadcast_

    for t in targets:
        broadcast_(t.mask())


# ---------------------------------------------------------------------------------------------
# Pruner


class Pruner:
    """Prunes `model` on `config`'s schedule. Construction prepares (all-ones masks on every
    target, or the masks the layers already have); `step()` prunes when the schedule says so;
    `finalize()` ends pruning (finalize_pruning_)."""

    def __init__(self, model: nn.Module, config: PruneConfig):
        if not isinstance(config, PruneConfig):
            raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
        self.model = model
        self.config = config
        self.targets = resolve_targets(model, config)
        self.step_count = 0
        for t in self.targets:
            if state.mask(t.module, t.param_name) is None:
                state.set_mask_(t.module, t.param_name,
                                torch.ones_like(t.weight(), dtype=torch.bool))

    @property
    def final_step(self) -> int:
        """The step on which the final target is reached."""
        return final_step(self.config)

    def step(self, step: int | None = None) -> bool:
        """Advance the schedule by one (or jump to `step`) and prune if this is a pruning step.
        Returns True when it pruned."""
        if step is not None:
            self.step_count = step
        progress = schedule_progress(self.config, self.step_count)
        self.step_count += 1
        if progress is None:
            return False
        self.prune_to(progress)
        return True

    def prune_to(self, progress: float = 1.0) -> dict[str, float]:
        """Prune every target to `progress` of its final target (1.0 = the final target)."""
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        s_i = self.config.initial_sparsity
        level = {}  # per target: (sparsity or None, threshold or None)
        pool = []
        for t in self.targets:
            spec, weight = t.spec, t.weight()
            if t.tied_to is not None:
                continue
            if spec["sparsity"] is not None:
                level[t.name] = (_ramp(self.config.schedule, s_i, spec["sparsity"], progress), None)
            elif spec["global_sparsity"] is not None:
                pool.append(t)
            elif spec["threshold"] is not None:
                level[t.name] = (None, spec["threshold"] * progress)
            else:  # Han's rule, on the weights as they are now (pruned ones count as zeros)
                std = weight.detach().float().std().item() if weight.numel() > 1 else 0.0
                level[t.name] = (None, spec["quality"] * progress * std)
        with torch.no_grad():
            for t in self.targets:
                if t.name in level:
                    s, thr = level[t.name]
                    t.mask().copy_(compute_mask(t.weight(), t.spec["granularity"], s, thr,
                                                t.spec["norm"], t.mask()))
            if pool:
                final = pool[0].spec["global_sparsity"]
                self._prune_global(pool, _ramp(self.config.schedule, s_i, final, progress))
            for t in self.targets:
                if t.tied_to is not None:  # a bias follows its filters
                    bias_mask = t.mask()
                    bias_mask &= _units(state.mask(t.module, "weight"), "filter").any(1)
            _broadcast_masks(self.targets)
            for t in self.targets:
                state.apply_(t.module, t.param_name)
        return sparsity(self.model)

    def _prune_global(self, pool, target):
        """One magnitude threshold over every layer in `pool`: the round(target x total)
        smallest |w| over all of them, ties to the earlier layer and lower index."""
        scores, mask_list = [], []
        for t in pool:
            mask = t.mask()
            score = t.weight().detach().float().abs().reshape(-1)
            scores.append(score.masked_fill(~mask.reshape(-1), -1.0))
            mask_list.append(mask)
        flat = torch.cat(scores)
        prune = _lowest(flat, _count(target, flat.numel()))
        parts = torch.split(prune, [m.numel() for m in mask_list])
        for mask, part in zip(mask_list, parts, strict=True):
            mask &= ~part.reshape(mask.shape)

    def finalize(self) -> nn.Module:
        return finalize_pruning_(self.model)

    def sparsity(self) -> dict[str, float]:
        return sparsity(self.model)


def _ramp(schedule, initial, final, progress):
    """Sparsity at `progress` in [0, 1] on the way from `initial` to `final`: for iterative
    pruning, the same fraction of the survivors per round (density falls geometrically); for
    gradual, Zhu & Gupta's s_f + (s_i - s_f)(1 - k/n)^3 (progress holds the cubic)."""
    if schedule == "iterative" and final < 1.0 and initial < 1.0:
        return 1.0 - (1.0 - initial) * ((1.0 - final) / (1.0 - initial)) ** progress
    return final + (initial - final) * (1.0 - progress)


def prune_(model: nn.Module, config: PruneConfig) -> nn.Module:
    """Prune `model` in place to `config`'s final target at once (the schedule is not used) and
    return it; `dcx.prune.sparsity(model)` tells what each layer reached."""
    Pruner(model, config).prune_to(1.0)
    return model
