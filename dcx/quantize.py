"""Weight sharing (Deep Compression, stage two) on any nn.Module.

`cluster_(model, config)` clusters the surviving (unpruned) weights of each layer into
2^bits shared values: the layer's `weight` Parameter is replaced by a codebook Parameter
`weight_codebook` [2^bits] and an int32 buffer `weight_labels` of the weight's shape, and a forward
pre-hook rebuilds `module.weight = codebook[labels] * mask` before every forward (the pattern of
torch.nn.utils.prune). Pruned positions stay exactly zero and are no cluster's members; the
codebook's gradient is the sum of the weight gradients of each cluster (dcx.ops.centroid_grad), so
any optimizer over the codebooks fine-tunes the centroids while the labels stay frozen (the paper).
`finalize_(model)` bakes codebook[labels] back into a plain weight Parameter.

Masks come from `masks={module name: bool tensor}` or, where present, the module's `weight_mask`
buffer (the pruning stage's convention); without either, every weight survives.

    config = ClusterConfig(conv_bits=8, linear_bits=5, overrides={"fc3": {"bits": 2}})
    dcx.quantize.cluster_(model, config)
    optimizer = torch.optim.SGD(dcx.quantize.codebook_parameters(model), lr=1e-3)
    ...  # train: only the centroids move
    dcx.quantize.finalize_(model)
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from dcx import ops

__all__ = [
    "ClusterConfig",
    "cluster_",
    "finalize_",
    "reassign_",
    "codebooks",
    "codebook_parameters",
    "is_clustered",
]

INITS = ("linear", "density", "random", "kmeans++")
METHODS = ("lloyd", "optimal")
MODES = ("kmeans", "linear", "fixed-point")
_LAYER_KEYS = ("bits", "init", "method", "mode", "max_iter", "tol", "seed", "skip")
_PARAM = "weight"


@dataclass
class ClusterConfig:
    """How `cluster_` quantizes each layer.

    conv_bits / linear_bits: codebook size 2^bits for convolutions / every other layer with a
    weight of two or more dimensions (Linear, Embedding, ...); the paper's defaults 8 and 5.
    mode: "kmeans" (1-D k-means, dcx.ops.kmeans1d), "linear" (2^bits evenly spaced values from
    the smallest to the largest surviving weight, nearest assignment) or "fixed-point" (the
    signed fixed-point grid with the fewest fractional bits that still covers max |w|).
    init, method, max_iter, tol, seed: passed to dcx.ops.kmeans1d.
    reassign: keep the clustered weights (a `weight_dense` buffer) so that `reassign_` can move
    each weight to its nearest fine-tuned centroid, e.g. after each epoch.
    overrides: {module name or regex: {key: value}} with keys bits, init, method, mode, max_iter,
    tol, seed, skip (True: leave the layer alone). An exact name wins; otherwise the first pattern
    (in order) that matches the whole name.
    """

    conv_bits: int = 8
    linear_bits: int = 5
    mode: str = "kmeans"
    init: str = "linear"
    method: str = "lloyd"
    max_iter: int = 300
    tol: float = 1e-4
    seed: int = 0
    reassign: bool = False
    overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        _validate_layer(dataclasses.asdict(self) | {"bits": self.conv_bits}, "config")
        _validate_layer({"bits": self.linear_bits}, "config")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides must be a dict, got {type(self.overrides).__name__}")
        for pattern, layer in self.overrides.items():
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"overrides key {pattern!r} is not a valid regex: {error}") from None
            if not isinstance(layer, dict):
                raise ValueError(f"overrides[{pattern!r}] must be a dict, got {layer!r}")
            unknown = set(layer) - set(_LAYER_KEYS)
            if unknown:
                raise ValueError(
                    f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}; allowed: {_LAYER_KEYS}"
                )
            _validate_layer(layer, f"overrides[{pattern!r}]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ClusterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown ClusterConfig keys {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**data)

    def for_layer(self, name: str, module: nn.Module) -> Optional[dict]:
        """The settings of module `name` (None: skipped)."""
        conv = isinstance(module, nn.modules.conv._ConvNd)
        layer = dict(
            bits=self.conv_bits if conv else self.linear_bits, mode=self.mode, init=self.init,
            method=self.method, max_iter=self.max_iter, tol=self.tol, seed=self.seed, skip=False,
        )
        if name in self.overrides:
            layer.update(self.overrides[name])
        else:
            for pattern, values in self.overrides.items():
                if re.fullmatch(pattern, name):
                    layer.update(values)
                    break
        return None if layer["skip"] else layer


def _validate_layer(layer: dict, where: str):
    def bad(key, expected):
        raise ValueError(f"{where}: {key} must be {expected}, got {layer[key]!r}")

    if "bits" in layer and not (isinstance(layer["bits"], int) and 1 <= layer["bits"] <= 16):
        bad("bits", "an int in [1, 16]")
    if "mode" in layer and layer["mode"] not in MODES:
        bad("mode", f"one of {MODES}")
    if "init" in layer and layer["init"] not in INITS:
        bad("init", f"one of {INITS}")
    if "method" in layer and layer["method"] not in METHODS:
        bad("method", f"one of {METHODS}")
    if "max_iter" in layer and not (isinstance(layer["max_iter"], int) and layer["max_iter"] >= 0):
        bad("max_iter", "an int >= 0")
    if "tol" in layer and not (isinstance(layer["tol"], (int, float)) and math.isfinite(layer["tol"])
                               and layer["tol"] >= 0):
        bad("tol", "a finite number >= 0")
    if "seed" in layer and not isinstance(layer["seed"], int):
        bad("seed", "an int")
    if "skip" in layer and not isinstance(layer["skip"], bool):
        bad("skip", "a bool")


class SharedWeight(torch.autograd.Function):
    """weight = codebook[labels] where mask (exact zeros elsewhere); the codebook's gradient is the
    per-cluster sum of the weight's gradient over the kept positions (dcx.ops.centroid_grad)."""

    @staticmethod
    def forward(codebook: Tensor, labels: Tensor, mask: Optional[Tensor]) -> Tensor:
        weight = codebook[labels]
        return weight if mask is None else torch.where(mask, weight, torch.zeros_like(weight))

    @staticmethod
    def setup_context(ctx, inputs, output):
        codebook, labels, mask = inputs
        ctx.save_for_backward(labels, mask)
        ctx.num_clusters = codebook.numel()

    @staticmethod
    def backward(ctx, grad_weight):
        labels, mask = ctx.saved_tensors
        grad = ops.centroid_grad(grad_weight.contiguous(), labels, ctx.num_clusters, mask)
        return grad, None, None


def shared_weight(codebook: Tensor, labels: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """codebook[labels] (zero where mask is False), differentiable in the codebook."""
    return SharedWeight.apply(codebook, labels, mask)


def _mask_of(module: nn.Module) -> Optional[Tensor]:
    return getattr(module, f"{_PARAM}_mask", None)


def _rebuild(module: nn.Module, _inputs=None):
    codebook = getattr(module, f"{_PARAM}_codebook")
    labels = getattr(module, f"{_PARAM}_labels")
    setattr(module, _PARAM, shared_weight(codebook, labels, _mask_of(module)))


def is_clustered(module: nn.Module) -> bool:
    return hasattr(module, f"{_PARAM}_codebook") and hasattr(module, "_dcx_cluster_hook")


def _quantize(values: Tensor, bits: int, layer: dict) -> tuple[Tensor, Tensor]:
    """(codebook, labels) of a 1-D float tensor of surviving weights."""
    k = 1 << bits
    x = values.detach().float() if values.dtype != torch.float64 else values.detach()
    if layer["mode"] == "kmeans":
        return ops.kmeans1d(x, k, layer["init"], layer["max_iter"], layer["tol"], layer["seed"],
                            layer["method"])
    if layer["mode"] == "linear":  # evenly spaced from min to max, nearest assignment
        return ops.kmeans1d(x, k, "linear", 0, 0.0, 0, "lloyd")
    # fixed-point: 1 sign bit, the fewest integer bits that cover max |w|, the rest fractional.
    top = x.abs().max().item() if x.numel() else 0.0
    int_bits = max(0, math.ceil(math.log2(top))) if top > 0 else 0
    step = 2.0 ** (int_bits - (bits - 1))
    codebook = torch.arange(-(k // 2), k - k // 2, dtype=x.dtype, device=x.device) * step
    labels = (torch.round(x / step) + k // 2).clamp_(0, k - 1).to(torch.int32)
    return codebook, labels


def cluster_(model: nn.Module, config: Optional[ClusterConfig] = None,
             masks: Optional[dict] = None) -> nn.Module:
    """Cluster the weights of every layer of `model` in place (see the module docstring).

    masks: {module name: bool tensor of the weight's shape}; a given mask is stored as the
    module's `weight_mask` buffer. Layers whose weight has fewer than two dimensions (biases,
    norms) are left alone, as are layers already clustered. Returns the model.
    """
    config = config or ClusterConfig()
    masks = masks or {}
    unknown = set(masks) - {name for name, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"masks name modules that are not in the model: {sorted(unknown)}")
    seen = set()
    for name, module in model.named_modules():
        if id(module) in seen or is_clustered(module):
            continue
        seen.add(id(module))
        weight = module._parameters.get(_PARAM)
        if weight is None or weight.dim() < 2:
            if name in masks:
                raise ValueError(f"masks[{name!r}]: the module has no weight Parameter to cluster")
            continue
        layer = config.for_layer(name, module)
        if layer is None:
            continue
        mask = masks.get(name)
        if mask is not None:
            if mask.shape != weight.shape or mask.dtype != torch.bool:
                raise ValueError(f"masks[{name!r}] must be a bool tensor of shape "
                                 f"{tuple(weight.shape)}, got {mask.dtype} {tuple(mask.shape)}")
            mask = mask.to(weight.device)
            if f"{_PARAM}_mask" in module._buffers:
                module._buffers[f"{_PARAM}_mask"] = mask
            else:
                module.register_buffer(f"{_PARAM}_mask", mask)
        mask = _mask_of(module)
        if mask is not None:
            mask = mask.bool()
            module._buffers[f"{_PARAM}_mask"] = mask
        w = weight.detach()
        survivors = w[mask] if mask is not None else w.reshape(-1)
        codebook, survivor_labels = _quantize(survivors, layer["bits"], layer)
        labels = torch.zeros(w.shape, dtype=torch.int32, device=w.device)
        if mask is not None:
            labels[mask] = survivor_labels.to(w.device)
        else:
            labels = survivor_labels.reshape(w.shape).to(w.device)
        del module._parameters[_PARAM]
        module.register_parameter(f"{_PARAM}_codebook",
                                  nn.Parameter(codebook.to(device=w.device, dtype=w.dtype)))
        module.register_buffer(f"{_PARAM}_labels", labels)
        if config.reassign:
            module.register_buffer(f"{_PARAM}_dense", w.clone())
        module._dcx_cluster_hook = module.register_forward_pre_hook(_rebuild)
        with torch.no_grad():  # a leaf until the first forward: the model stays deep-copyable
            _rebuild(module)
    return model


def _clustered(model: nn.Module):
    seen = set()
    for name, module in model.named_modules():
        if is_clustered(module) and id(module) not in seen:
            seen.add(id(module))
            yield name, module


def codebooks(model: nn.Module) -> dict:
    """{module name: (codebook, labels, mask or None)} of every clustered layer: the codebook
    Parameter, the int32 labels (0 at pruned positions) and the bool mask."""
    return {
        name: (getattr(m, f"{_PARAM}_codebook"), getattr(m, f"{_PARAM}_labels"), _mask_of(m))
        for name, m in _clustered(model)
    }


def codebook_parameters(model: nn.Module) -> list:
    """The codebook Parameters, for an optimizer that fine-tunes only the centroids."""
    return [codebook for codebook, _, _ in codebooks(model).values()]


@torch.no_grad()
def reassign_(model: nn.Module) -> int:
    """Move every kept weight to its nearest current centroid: the label of each weight as it was
    clustered (the `weight_dense` buffer that ClusterConfig(reassign=True) keeps) under the
    fine-tuned codebook. Returns how many labels changed."""
    changed = 0
    for name, module in _clustered(model):
        dense = getattr(module, f"{_PARAM}_dense", None)
        if dense is None:
            raise RuntimeError(f"{name}: reassign_ needs ClusterConfig(reassign=True) at cluster_ time")
        codebook, labels = getattr(module, f"{_PARAM}_codebook"), getattr(module, f"{_PARAM}_labels")
        order = torch.argsort(codebook.detach())
        c = codebook.detach()[order].double()
        mid = (c[1:] + c[:-1]) / 2
        new = order[torch.searchsorted(mid, dense.double().contiguous(), right=False)].to(torch.int32)
        mask = _mask_of(module)
        if mask is not None:
            new = torch.where(mask, new, torch.zeros_like(new))
        changed += int((new != labels).sum())
        labels.copy_(new)
        _rebuild(module)
    return changed


@torch.no_grad()
def finalize_(model: nn.Module) -> nn.Module:
    """Bake codebook[labels] (zero where pruned) into a plain `weight` Parameter of each clustered
    layer and remove the codebook, the labels and the hook; the mask buffer stays."""
    for _, module in list(_clustered(model)):
        codebook = getattr(module, f"{_PARAM}_codebook")
        weight = shared_weight(codebook.detach(), getattr(module, f"{_PARAM}_labels"), _mask_of(module))
        module._dcx_cluster_hook.remove()
        del module._dcx_cluster_hook
        del module._parameters[f"{_PARAM}_codebook"]
        del module._buffers[f"{_PARAM}_labels"]
        module._buffers.pop(f"{_PARAM}_dense", None)
        if _PARAM in module.__dict__:
            del module.__dict__[_PARAM]
        module.register_parameter(_PARAM, nn.Parameter(weight.clone()))
    return model
