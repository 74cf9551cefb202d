"""Weight sharing (Deep Compression, stage two) on any nn.Module.

`cluster_(model, config)` clusters the surviving (unpruned) weights of each layer into 2^bits
shared values and makes them the layer's compressed state (dcx.state): a codebook Parameter
`weight_codebook` [2^bits] and int32 labels `weight_labels` of the weight's shape, from which the
weight is rebuilt as codebook[labels] (exactly zero where pruned) before every forward. Pruned
positions are no cluster's members; the codebook's gradient is the sum of the weight gradients of
each cluster (dcx.ops.centroid_grad), so any optimizer over the codebooks fine-tunes the
centroids while the labels stay frozen (the paper). `finalize_clustering_(model)` bakes
codebook[labels] back into a plain weight Parameter; the codebook and labels stay the layer's
state, so dcx.save still stores the layer as codes.

The masks are the pruning stage's state (dcx.prune_ or dcx.load of a pruned file); without one,
every weight survives (quantization without pruning: the file stores codes alone).

    dcx.cluster_(model, ClusterConfig(conv_bits=8, linear_bits=5, overrides={"fc3": {"bits": 2}}))
    optimizer = torch.optim.SGD(dcx.quantize.codebook_parameters(model), lr=1e-3)
    ...  # train: only the centroids move
    dcx.finalize_clustering_(model)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from dcx import ops, state
from dcx.config import ClusterConfig, ConfigError, layer_overrides
from dcx.format import scale_like

__all__ = [
    "ClusterConfig",
    "cluster_",
    "cluster_values",
    "finalize_clustering_",
    "reassign_",
    "codebook_parameters",
    "row_scales",
    "group_scales",
    "codebook_scales",
    "share_weight",
]


def cluster_values(values: Tensor, layer: dict) -> tuple[Tensor, Tensor]:
    """(codebook [2^bits], int32 labels) of a 1-D float tensor of surviving weights, with the
    settings of one layer (ClusterConfig.layer_fields: bits, mode, init, method, max_iter, tol,
    seed)."""
    bits = layer["bits"]
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


def row_scales(weight: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """[out] float32 scales of a scaled codebook, one per output row: the RMS of the row's kept
    weights (all of them with no mask: the calibrated path scales before it prunes), rounded to
    float16 (what the file stores), 1 for a row with none. RMS rather than
    max |w|: one outlier would squeeze the rest of its row into a few codebook entries."""
    w = weight.detach().reshape(weight.shape[0], -1)
    return _rms_scales(w, mask, w.shape[1], floor=False)[:, 0]


def group_scales(weight: Tensor, mask: Optional[Tensor], group_size: int) -> Tensor:
    """[out, G] float32 scales of a group-scaled codebook, one per output row and group of
    `group_size` columns of the weight viewed [out, columns] (G = ceil(columns / group_size)): the
    RMS of the group's kept weights, or a third of their largest magnitude where that is more,
    rounded to float16, 1 for a group with none (as row_scales, whose [out] scales it returns
    when one group holds every column). The floor keeps an outlier within about 3 of the shared
    codebook's units: on all-MiniLM-L6-v2's layer 0 output projection (one weight of 7.9 where
    the RMS is 0.045) plain RMS put it at 11 units, past the codebook's last entry (3.9), and
    4-bit k-means lost 42% of the layer's output energy (0.9% with the floor; GPTQ 1.6% against
    0.02%); the floor binds on few other groups (a group of 128 normal values rarely reaches 3
    RMS). Row scales keep the plain RMS: there the floor measured worse (0.4% against 10%)."""
    w = weight.detach().reshape(weight.shape[0], -1)
    if w.shape[1] <= group_size:
        return row_scales(weight, mask)
    return _rms_scales(w, mask, group_size, floor=True)


def _rms_scales(w: Tensor, mask: Optional[Tensor], group_size: int, floor: bool) -> Tensor:
    """[out, G] scales of w [out, columns] per group of `group_size` columns (the last one
    short): the RMS of the kept weights (floor: at least a third of their largest magnitude),
    in float16's normal range and rounded to it, 1 for a group with none kept."""
    w = w.float()
    out, columns = w.shape
    groups = -(-columns // group_size)
    keep = torch.ones_like(w) if mask is None else mask.reshape(w.shape).float()
    pad = groups * group_size - columns
    w = torch.nn.functional.pad(w, (0, pad)).reshape(out, groups, group_size)
    keep = torch.nn.functional.pad(keep, (0, pad)).reshape(w.shape)
    scale = ((w * w * keep).sum(2) / keep.sum(2).clamp_min(1)).sqrt()
    amax = (w * keep).abs().amax(2)
    if floor:
        scale = torch.maximum(scale, amax / 3)
    scale = scale.clamp(2.0 ** -14, 65504.0).half().float()
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def codebook_scales(weight: Tensor, mask: Optional[Tensor], scale) -> Optional[Tensor]:
    """The scales ClusterConfig.scale asks for: None (none), "row" (row_scales) or a group size
    (group_scales)."""
    if scale is None:
        return None
    return row_scales(weight, mask) if scale == "row" else group_scales(weight, mask, int(scale))


def share_weight(weight: Tensor, mask: Optional[Tensor], layer: dict):
    """One layer's weight sharing as cluster_ does it: (codebook, int32 labels of the weight's
    shape, 0 where pruned; row or group scales, or None; the weight as clustered, divided by its
    scales). mask: bool of the weight's shape or None; layer: ClusterConfig.layer_fields (+
    overrides)."""
    w = weight.detach()
    scale = codebook_scales(w, mask, layer.get("scale"))
    if scale is not None:
        w = w / scale_like(scale.to(w.device, w.dtype), w.shape)
    survivors = w[mask] if mask is not None else w.reshape(-1)
    codebook, kept = cluster_values(survivors, layer)
    if mask is not None:
        labels = torch.zeros(w.shape, dtype=torch.int32, device=w.device)
        labels[mask] = kept.to(w.device)
    else:
        labels = kept.reshape(w.shape)
    return codebook, labels, scale, w


def clusterable(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: module} of the layers cluster_ may share: a weight Parameter of two or more
    dimensions, not shared yet, not packed."""
    result = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if hasattr(module, "layer_state") or weight is None or weight.dim() < 2:
            continue
        st = state.get(module)
        if st is None or not st.shared:
            result[name] = module
    return result


def cluster_(model: nn.Module, config: Optional[ClusterConfig] = None,
             progress: bool = False) -> nn.Module:
    """Share the weights of every layer of `model` in place (see the module docstring): every
    module whose weight has two or more dimensions (Linear, ConvNd, Embedding, ...), except the
    ones an override excludes (None) and the ones already shared. progress: a bar over the
    layers (on a terminal). Returns the model."""
    config = config or ClusterConfig()
    if not isinstance(config, ClusterConfig):
        raise TypeError(f"config must be a ClusterConfig, got {type(config).__name__}")
    candidates = clusterable(model)
    chosen = layer_overrides(model, config.overrides, candidates, "ClusterConfig")
    owners = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for param_name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append(f"{name}.{param_name}" if name else param_name)
    todo = {n: m for n, m in candidates.items() if n not in chosen or chosen[n][1] is not None}
    for name, module in tqdm(todo.items(), desc="cluster", unit="layer", leave=False,
                             disable=None if progress else True):
        layer = config.layer_fields(state.kind(module) == "conv")
        if name in chosen:
            layer.update(chosen[name][1])
        weight = module.weight
        tied = owners.get(id(weight), [])
        if len(set(tied)) > 1:
            raise ConfigError(f"{name}.weight is tied to {sorted(set(tied))}: one tensor cannot "
                              f"be shared under two names; exclude it with overrides "
                              f"{{{name!r}: None}}")
        st = state.get(module)
        codebook, labels, scale, w = share_weight(weight, None if st is None else st.mask, layer)
        state.set_shared_(module, "weight", codebook, labels, layer["bits"], live=True,
                          clustered=w if config.reassign else None, scale=scale)
    return model


def codebook_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The codebook Parameters of the layers being fine-tuned (shared, not yet finalized), for an
    optimizer that moves only the centroids."""
    return [st.codebook for st in state.layers(model).values() if st.live]


@torch.no_grad()
def reassign_(model: nn.Module) -> int:
    """Move every kept weight to its nearest current centroid: the label of each weight as it was
    clustered (kept by ClusterConfig(reassign=True)) under the fine-tuned codebook. Returns how
    many labels changed."""
    changed = 0
    for name, st in state.layers(model).items():
        if not st.live:
            continue
        dense = state.clustered(st.module, st.param)  # divided by the row scales, if any
        if dense is None:
            raise RuntimeError(f"{name}: reassign_ needs ClusterConfig(reassign=True) at "
                               "cluster_ time")
        order = torch.argsort(st.codebook.detach())
        c = st.codebook.detach()[order].double()
        mid = (c[1:] + c[:-1]) / 2
        new = order[torch.searchsorted(mid, dense.double().contiguous(), right=False)]
        new = new.to(torch.int32)
        if st.mask is not None:
            new = torch.where(st.mask, new, torch.zeros_like(new))
        changed += int((new != st.labels).sum())
        st.labels.copy_(new)
        state.apply_(st.module, st.param)
    return changed


def finalize_clustering_(model: nn.Module) -> nn.Module:
    """End weight sharing: each shared layer's weight becomes a plain Parameter again, holding
    codebook[labels] (zero where pruned), and the codebook a buffer; the codebook and labels stay
    the layer's state, so dcx.save still stores it as codes (and refuses a weight changed since).
    Returns the model."""
    for st in state.layers(model).values():
        if st.live:
            state.finalize_shared_(st.module, st.param)
    return model
