"""Plain-torch oracles of every dcx op: slow, obviously right, and what the tests compare the
kernels against."""

from typing import Optional

import torch
from torch import Tensor


def masked_sgd_step_(
    param: Tensor,
    grad: Tensor,
    mask: Tensor,
    momentum_buffer: Optional[Tensor],
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    init_buffer: bool = False,
) -> None:
    """torch.optim.SGD's update in float32, then pruned positions of param and buffer set to 0."""
    keep = mask.bool()
    p = param.float()
    g = -grad.float() if maximize else grad.float()
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    if momentum != 0:
        if init_buffer:
            b = g.clone()
        else:
            b = momentum_buffer.float().mul(momentum).add_(g, alpha=1 - dampening)
        momentum_buffer.copy_(torch.where(keep, b, torch.zeros_like(b)))
        g = g.add(b, alpha=momentum) if nesterov else b
    p = p.add(g, alpha=-lr)
    param.copy_(torch.where(keep, p, torch.zeros_like(p)))


def centroid_grad(
    grad: Tensor, labels: Tensor, num_clusters: int, mask: Optional[Tensor] = None
) -> Tensor:
    """Per-label sums in float64 (the exact-enough oracle), returned in grad's dtype."""
    values = grad.reshape(-1).double()
    index = labels.reshape(-1).long()
    if mask is not None:
        keep = mask.reshape(-1).bool()
        values, index = values[keep], index[keep]
    out = torch.zeros(num_clusters, dtype=torch.float64, device=grad.device)
    return out.index_add_(0, index, values).to(grad.dtype)


def spqmm_weight(
    codes: Tensor, seg_ptr: Tensor, codebook: Tensor, out_features: int, in_features: int, bits: int
) -> Tensor:
    """The dense [out_features, in_features] weight a packed layer stands for (csrc/core/spqmm.h
    describes the layout), decoded with plain torch ops, in float64."""
    table = codebook.double()
    if codes.dtype == torch.uint8:  # dense mode: one id per weight
        return table[codes.long()]
    tile = 1 << (16 - bits)
    tiles = -(-in_features // tile)
    entries = codes.long() & 0xFFFF
    counts = (seg_ptr[1:] - seg_ptr[:-1]).long()
    segment = torch.repeat_interleave(torch.arange(counts.numel(), device=codes.device), counts)
    rows, cols = segment // tiles, (segment % tiles) * tile + (entries >> bits)
    w = torch.zeros(out_features, in_features, dtype=torch.float64, device=codes.device)
    w[rows, cols] = table[entries & ((1 << bits) - 1)]
    return w


def spqmm(
    x: Tensor,
    codes: Tensor,
    seg_ptr: Tensor,
    chunks: Tensor,
    codebook: Tensor,
    out_features: int,
    in_features: int,
    bits: int,
    bias: Optional[Tensor] = None,
    crossover: int = -1,
    check: bool = True,
) -> Tensor:
    """F.linear with the decoded weight, in float64, returned in x's dtype."""
    w = spqmm_weight(codes, seg_ptr, codebook, out_features, in_features, bits)
    b = None if bias is None else bias.double()
    return torch.nn.functional.linear(x.double(), w, b).to(x.dtype)
