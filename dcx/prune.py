"""Pruning, the first stage of Deep Compression: remove the unimportant connections, then retrain
the rest with their masks held fixed (dcx.optim.MaskedSGD).

Lifecycle, as torch.ao.pruning: prepare -> step -> finalize.

    config = PruneConfig(sparsity=0.9, schedule="iterative", iterations=4, frequency=2,
                         overrides={"fc3": {"sparsity": 0.7}})
    pruner = Pruner(model, config)          # prepare: all-ones masks, nothing pruned yet
    for epoch in range(epochs):
        pruner.step()                       # prunes on the schedule's steps
        train_one_epoch(model, MaskedSGD(model.parameters(), lr=0.01, masks=model))
    pruner.finalize()                       # bake the zeros in, drop masks and hooks

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

Masks are bool buffers named `<param>_mask` on the module that owns the parameter (so they
travel with state_dict and deepcopy); pruned weights are zeroed in place, with no second dense
copy. A forward pre-hook re-zeroes pruned weights in training mode (so even an optimizer that
knows nothing of masks cannot bring them back into the forward pass) and a load_state_dict
post-hook re-applies masks after loading. Under torch.distributed, masks are broadcast from
rank 0 after each pruning step, so ranks can never disagree.

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

import copy
import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "PruneConfig",
    "Pruner",
    "prune_",
    "finalize_",
    "masks",
    "sparsity",
    "apply_masks_",
    "attach_masks_",
    "compute_mask",
    "schedule_progress",
    "GRANULARITIES",
    "SCHEDULES",
]

GRANULARITIES = ("element", "kernel", "filter", "channel")
NORMS = ("l1", "l2")
SCHEDULES = ("oneshot", "iterative", "gradual")
CRITERIA = ("sparsity", "global_sparsity", "threshold", "quality")
# Fields a per-layer override may set.
LAYER_FIELDS = CRITERIA + ("granularity", "norm", "include_bias")
MASK_SUFFIX = "_mask"
PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_fraction(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_layer_fields(where, fields):
    unknown = set(fields) - set(LAYER_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; "
                         f"a layer may set {list(LAYER_FIELDS)}")
    chosen = [c for c in CRITERIA if fields.get(c) is not None]
    if len(chosen) > 1:
        raise ValueError(f"{where}: set exactly one criterion of {list(CRITERIA)}, got {chosen}")
    for name in ("sparsity", "global_sparsity"):
        if fields.get(name) is not None:
            _check_fraction(f"{where}: {name}", fields[name])
    for name in ("threshold", "quality"):
        value = fields.get(name)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                      and value >= 0):
            raise ValueError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    if fields.get("granularity") is not None and fields["granularity"] not in GRANULARITIES:
        raise ValueError(f"{where}: unknown granularity {fields['granularity']!r}; "
                         f"expected one of {list(GRANULARITIES)}")
    if fields.get("norm") is not None and fields["norm"] not in NORMS:
        raise ValueError(f"{where}: norm must be one of {list(NORMS)}, got {fields['norm']!r}")
    if fields.get("include_bias") is not None and not isinstance(fields["include_bias"], bool):
        raise ValueError(f"{where}: include_bias must be a bool, got {fields['include_bias']!r}")


@dataclass
class PruneConfig:
    """What to prune, how much, and when. Validated on construction.

    overrides: {pattern: {field: value} or None}; a pattern is a module name or parameter name
    ("fc3", "fc3.weight") or a regex "re:<pattern>" matched in full against either. An exact
    name wins over regexes; among regexes the first listed wins. None excludes the layer.
    Every target and override pattern must match something in the model.
    """

    sparsity: float | None = None
    global_sparsity: float | None = None
    threshold: float | None = None
    quality: float | None = None
    granularity: str = "element"
    norm: str = "l1"
    include_bias: bool = False
    targets: list[str] | None = None
    overrides: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    schedule: str = "oneshot"
    start: int = 0
    frequency: int = 1
    iterations: int = 1
    initial_sparsity: float = 0.0

    def __post_init__(self):
        _check_layer_fields("PruneConfig", self._layer_fields())
        if all(getattr(self, c) is None for c in CRITERIA):
            raise ValueError(f"PruneConfig: set one criterion of {list(CRITERIA)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"PruneConfig: unknown schedule {self.schedule!r}; "
                             f"expected one of {list(SCHEDULES)}")
        for name, low in (("start", 0), ("frequency", 1), ("iterations", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"PruneConfig: {name} must be an int >= {low}, got {value!r}")
        _check_fraction("PruneConfig: initial_sparsity", self.initial_sparsity)
        if self.targets is not None:
            if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
                raise ValueError("PruneConfig: targets must be a list of names, got "
                                 f"{self.targets!r}")
            self.targets = list(self.targets)
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"PruneConfig: overrides must be a dict, got {self.overrides!r}")
        self.overrides = {key: (None if value is None else dict(value))
                          for key, value in self.overrides.items()}
        for pattern, fields in self.overrides.items():
            _pattern(pattern)  # a bad regex fails here
            if fields is not None:
                _check_layer_fields(f"PruneConfig override {pattern!r}", fields)

    def _layer_fields(self):
        return {name: getattr(self, name) for name in LAYER_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"PruneConfig: unknown field(s) {sorted(unknown)}")
        return cls(**copy.deepcopy(dict(data)))


# ---------------------------------------------------------------------------------------------
# Name matching


def _pattern(pattern):
    """(exact name, None) or (None, compiled regex) for 're:<regex>'."""
    if pattern.startswith("re:"):
        try:
            return None, re.compile(pattern[3:])
        except re.error as error:
            raise ValueError(f"bad regex in {pattern!r}: {error}") from None
    return pattern, None


def _matches(pattern, names):
    exact, regex = _pattern(pattern)
    if exact is not None:
        return exact in names
    return any(regex.fullmatch(n) for n in names)


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
        _check_fraction("sparsity", sparsity)
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


def _final_step(config):
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


def _owner(model, full_name):
    module_name, _, param_name = full_name.rpartition(".")
    return module_name, model.get_submodule(module_name), param_name


def _select(model, config):
    """Full names of the parameters config.targets selects (default: the weight of every
    Linear and ConvNd); a module name selects its weight."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    if config.targets is None:
        return [f"{name}.weight" if name else "weight" for name, m in modules.items()
                if isinstance(m, PRUNABLE)]
    chosen = []
    for pattern in config.targets:
        exact, regex = _pattern(pattern)
        hits = [n for n in list(modules) + list(params)
                if (n == exact if exact is not None else regex.fullmatch(n))]
        if not hits:
            raise ValueError(f"target {pattern!r} matches no module or parameter of the model; "
                             f"modules: {sorted(n for n in modules if n)}")
        for name in hits:
            if name in params:
                chosen.append(name)
            elif name in modules:
                weight = getattr(modules[name], "weight", None)
                if isinstance(weight, nn.Parameter):
                    chosen.append(f"{name}.weight" if name else "weight")
                elif exact is not None:
                    raise ValueError(f"target {pattern!r} is a module without a weight parameter")
    return list(dict.fromkeys(chosen))


def _resolve(model, config) -> list[_Target]:
    names = _select(model, config)
    base = config._layer_fields()
    # Overrides: exact names first, then regexes in order.
    exact = {p: f for p, f in config.overrides.items() if not p.startswith("re:")}
    regexes = [(p, f) for p, f in config.overrides.items() if p.startswith("re:")]
    used = set()
    targets = []
    for full in names:
        module_name, module, param_name = _owner(model, full)
        keys = [full, module_name]
        fields = dict(base)
        hit = next(((k, exact[k]) for k in keys if k in exact), None)
        if hit is None:
            hit = next(((p, f) for p, f in regexes if _matches(p, keys)), None)
        if hit is not None:
            used.add(hit[0])
            if hit[1] is None:
                continue  # excluded
            if any(hit[1].get(c) is not None for c in CRITERIA):
                fields.update({c: None for c in CRITERIA})
            fields.update({k: v for k, v in hit[1].items() if v is not None})
        param = getattr(module, param_name)
        _check_granularity(fields["granularity"], param.shape, full)
        targets.append(_Target(full, module_name, module, param_name, fields))
        bias = getattr(module, "bias", None)
        bias_name = f"{module_name}.bias" if module_name else "bias"
        if (fields["include_bias"] and param_name == "weight" and isinstance(bias, nn.Parameter)
                and bias_name not in names):
            bias_fields = dict(fields, granularity="element")
            tied = full if fields["granularity"] == "filter" else None
            targets.append(_Target(bias_name, module_name, module, "bias", bias_fields, tied))
    all_names = list(dict(model.named_modules())) + list(dict(model.named_parameters()))
    for pattern in config.overrides:
        if pattern in used or any(_matches(pattern, [n, _owner(model, n)[0]]) for n in names):
            continue
        if _matches(pattern, all_names):
            raise ValueError(f"override {pattern!r} matches no pruning target; targets: {names}")
        raise ValueError(f"override {pattern!r} matches no module or parameter of the model; "
                         f"modules: {sorted(n for n, _ in model.named_modules() if n)}")
    if not targets:
        raise ValueError("the config selects no parameter to prune")
    global_targets = [t for t in targets if t.spec["global_sparsity"] is not None]
    for t in global_targets:
        if t.spec["granularity"] != "element":
            raise ValueError(f"global_sparsity needs element granularity; {t.name} has "
                             f"{t.spec['granularity']!r}")
    if len({t.spec["global_sparsity"] for t in global_targets}) > 1:
        raise ValueError("all layers pruned by global_sparsity must share one value")
    return targets


# ---------------------------------------------------------------------------------------------
# Masks on modules


class _MaskHook:
    """Forward pre-hook and load_state_dict post-hook of a module with masks. It holds only
    names (no tensors), so deepcopy and pickling of the module carry it correctly."""

    def __init__(self, param_names):
        self.param_names = list(param_names)

    def apply(self, module):
        with torch.no_grad():
            for name in self.param_names:
                mask = getattr(module, name + MASK_SUFFIX, None)
                if mask is not None:
                    getattr(module, name).masked_fill_(~mask, 0.0)

    def __call__(self, module, args):  # forward pre-hook
        if module.training:
            with torch.no_grad():  # .data: no version bump, so saved activations stay valid
                for name in self.param_names:
                    mask = getattr(module, name + MASK_SUFFIX, None)
                    if mask is not None:
                        getattr(module, name).data.mul_(mask)

    def after_load(self, module, incompatible_keys):
        self.apply(module)


def _hook_of(module):
    return next((h for h in module._forward_pre_hooks.values() if isinstance(h, _MaskHook)), None)


def _add_mask(module, param_name, mask=None):
    """Register `<param_name>_mask` on module (all ones unless given) and its hooks once."""
    param = getattr(module, param_name)
    buffer_name = param_name + MASK_SUFFIX
    if buffer_name not in module._buffers:
        if mask is None:
            mask = torch.ones_like(param, dtype=torch.bool)
        module.register_buffer(buffer_name, mask.to(device=param.device, dtype=torch.bool).clone())
    hook = _hook_of(module)
    if hook is None:
        hook = _MaskHook([])
        module.register_forward_pre_hook(hook)
        module.register_load_state_dict_post_hook(hook.after_load)
    if param_name not in hook.param_names:
        hook.param_names.append(param_name)
    return getattr(module, buffer_name)


def _remove_hooks(module):
    for hooks in (module._forward_pre_hooks, module._load_state_dict_post_hooks):
        for key, hook in list(hooks.items()):
            owner = getattr(hook, "__self__", hook)  # after_load is a bound method
            if isinstance(owner, _MaskHook):
                del hooks[key]


def _mask_items(model):
    """(full param name, module, param name, mask) for every mask buffer in the model."""
    for module_name, module in model.named_modules():
        for buffer_name, buffer in module._buffers.items():
            if buffer is None or not buffer_name.endswith(MASK_SUFFIX):
                continue
            param_name = buffer_name[: -len(MASK_SUFFIX)]
            param = module._parameters.get(param_name)
            if buffer.dtype == torch.bool and isinstance(param, Tensor):
                full = f"{module_name}.{param_name}" if module_name else param_name
                yield full, module, param_name, buffer


def masks(model: nn.Module) -> dict[str, Tensor]:
    """{parameter name: its mask (bool, True = kept)} for every masked parameter; the tensors are
    the buffers themselves (later stages read them: clustering keeps to surviving weights, the
    file format stores them)."""
    return {full: mask for full, _, _, mask in _mask_items(model)}


def param_masks(model: nn.Module) -> dict[Tensor, Tensor]:
    """{parameter tensor: mask}, the form optimizers use (dcx.optim)."""
    return {getattr(module, p): mask for _, module, p, mask in _mask_items(model)}


def sparsity(model: nn.Module) -> dict[str, float]:
    """{parameter name: fraction of its mask pruned} for every masked parameter."""
    return {full: (mask.numel() - int(mask.count_nonzero())) / mask.numel() if mask.numel() else 0.0
            for full, mask in masks(model).items()}


def apply_masks_(model: nn.Module) -> nn.Module:
    """Zero every pruned weight in place (+0.0)."""
    with torch.no_grad():
        for _, module, param_name, mask in _mask_items(model):
            getattr(module, param_name).masked_fill_(~mask, 0.0)
    return model


def attach_masks_(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Register the mask buffers a pruned model's state_dict holds (keys `<param>_mask`) on a
    fresh model of the same architecture, so `model.load_state_dict(state_dict)` then works."""
    params = dict(model.named_parameters())
    for key, value in state_dict.items():
        if not key.endswith(MASK_SUFFIX) or key[: -len(MASK_SUFFIX)] not in params:
            continue
        full = key[: -len(MASK_SUFFIX)]
        if tuple(value.shape) != tuple(params[full].shape):
            raise ValueError(f"mask {key} has shape {tuple(value.shape)} but {full} has "
                             f"{tuple(params[full].shape)}")
        _, module, param_name = _owner(model, full)
        _add_mask(module, param_name, value)
    return apply_masks_(model)


def finalize_(model: nn.Module) -> nn.Module:
    """Bake the masks in: pruned weights are zero, and the mask buffers and hooks are removed.
    Read `masks(model)` first if a later stage needs them."""
    apply_masks_(model)
    for _, module, param_name, _ in list(_mask_items(model)):
        del module._buffers[param_name + MASK_SUFFIX]
    for module in model.modules():
        _remove_hooks(module)
    return model


def _broadcast_masks(targets):
    """Make every rank hold rank 0's masks (identical weights give identical masks already;
    this makes divergence impossible)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for t in targets:
        mask = getattr(t.module, t.param_name + MASK_SUFFIX)
        as_bytes = mask.to(torch.uint8)
        dist.broadcast(as_bytes, src=0)
        mask.copy_(as_bytes.bool())


# ---------------------------------------------------------------------------------------------
# Pruner


class Pruner:
    """Prunes `model` on `config`'s schedule. Construction prepares (all-ones masks on every
    target); `step()` prunes when the schedule says so; `finalize()` bakes the masks in."""

    def __init__(self, model: nn.Module, config: PruneConfig):
        if not isinstance(config, PruneConfig):
            raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
        self.model = model
        self.config = config
        self.targets = _resolve(model, config)
        self.step_count = 0
        for t in self.targets:
            _add_mask(t.module, t.param_name)

    @property
    def final_step(self) -> int:
        """The step on which the final target is reached."""
        return _final_step(self.config)

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
            spec, param = t.spec, getattr(t.module, t.param_name)
            if t.tied_to is not None:
                continue
            if spec["sparsity"] is not None:
                level[t.name] = (_ramp(self.config.schedule, s_i, spec["sparsity"], progress), None)
            elif spec["global_sparsity"] is not None:
                pool.append(t)
            elif spec["threshold"] is not None:
                level[t.name] = (None, spec["threshold"] * progress)
            else:  # Han's rule, on the weights as they are now (pruned ones count as zeros)
                std = param.detach().float().std().item() if param.numel() > 1 else 0.0
                level[t.name] = (None, spec["quality"] * progress * std)
        with torch.no_grad():
            for t in self.targets:
                if t.name in level:
                    s, thr = level[t.name]
                    mask = getattr(t.module, t.param_name + MASK_SUFFIX)
                    mask.copy_(compute_mask(getattr(t.module, t.param_name), t.spec["granularity"],
                                            s, thr, t.spec["norm"], mask))
            if pool:
                final = pool[0].spec["global_sparsity"]
                self._prune_global(pool, _ramp(self.config.schedule, s_i, final, progress))
            for t in self.targets:
                if t.tied_to is not None:  # a bias follows its filters
                    weight_mask = getattr(t.module, "weight" + MASK_SUFFIX)
                    bias_mask = getattr(t.module, "bias" + MASK_SUFFIX)
                    bias_mask &= _units(weight_mask, "filter").any(dim=1)
            _broadcast_masks(self.targets)
            apply_masks_(self.model)
        return sparsity(self.model)

    def _prune_global(self, pool, target):
        """One magnitude threshold over every layer in `pool`: the round(target x total)
        smallest |w| over all of them, ties to the earlier layer and lower index."""
        scores, mask_list = [], []
        for t in pool:
            mask = getattr(t.module, t.param_name + MASK_SUFFIX)
            score = getattr(t.module, t.param_name).detach().float().abs().reshape(-1)
            scores.append(score.masked_fill(~mask.reshape(-1), -1.0))
            mask_list.append(mask)
        flat = torch.cat(scores)
        prune = _lowest(flat, _count(target, flat.numel()))
        parts = torch.split(prune, [m.numel() for m in mask_list])
        for mask, part in zip(mask_list, parts, strict=True):
            mask &= ~part.reshape(mask.shape)

    def finalize(self) -> nn.Module:
        return finalize_(self.model)

    def sparsity(self) -> dict[str, float]:
        return sparsity(self.model)


def _ramp(schedule, initial, final, progress):
    """Sparsity at `progress` in [0, 1] on the way from `initial` to `final`: for iterative
    pruning, the same fraction of the survivors per round (density falls geometrically); for
    gradual, Zhu & Gupta's s_f + (s_i - s_f)(1 - k/n)^3 (progress holds the cubic)."""
    if schedule == "iterative" and final < 1.0 and initial < 1.0:
        return 1.0 - (1.0 - initial) * ((1.0 - final) / (1.0 - initial)) ** progress
    return final + (initial - final) * (1.0 - progress)


def prune_(model: nn.Module, config: PruneConfig) -> dict[str, float]:
    """Prune `model` in place to `config`'s final target at once (the schedule is not used).
    Returns {parameter name: sparsity reached}."""
    return Pruner(model, config).prune_to(1.0)
