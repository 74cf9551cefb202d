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


def kmeans1d(
    values: Tensor,
    num_clusters: int,
    init: str = "linear",
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    method: str = "lloyd",
) -> tuple[Tensor, Tensor]:
    """Lloyd's algorithm with an n x k distance matrix in float64 (linear and density inits), or
    for method="optimal" the O(k n^2) dynamic program; the same conventions as dcx.ops.kmeans1d
    (ties to the lower centroid, empty clusters take the value farthest from its centroid)."""
    if init not in ("linear", "density"):
        raise ValueError(f"the reference has only the deterministic inits, got {init!r}")
    k = num_clusters
    x = torch.sort(values.reshape(-1).double()).values
    n = x.numel()

    def finish(c):
        c = c.to(values.dtype).double()
        labels = torch.argmin((values.reshape(-1).double()[:, None] - c[None, :]).abs(), dim=1)
        return c.to(values.dtype), labels.to(torch.int32).reshape(values.shape)

    distinct = torch.unique(x)
    if n == 0:
        return finish(torch.zeros(k, dtype=torch.float64))
    if distinct.numel() <= k:
        return finish(torch.cat([distinct, distinct[-1].repeat(k - distinct.numel())]))
    if method == "optimal":
        cs = torch.cat([x.new_zeros(1), torch.cumsum(x - x[n // 2], 0)])
        cs2 = torch.cat([x.new_zeros(1), torch.cumsum((x - x[n // 2]) ** 2, 0)])
        j = torch.arange(n)[:, None]
        i = torch.arange(n)[None, :]
        cnt = (i - j + 1).clamp(min=1).double()
        cost = (cs2[i + 1] - cs2[j]) - (cs[i + 1] - cs[j]) ** 2 / cnt  # cost[j, i] of x[j..i]
        cost = torch.where(j <= i, cost.clamp(min=0), torch.full_like(cost, float("inf")))
        D, back = cost[0], []
        for _ in range(1, k):
            prev = torch.cat([x.new_full((1,), float("inf")), D[:-1]])  # D[j - 1]
            total = prev[:, None] + cost
            D, arg = total.min(dim=0)
            back.append(arg)
        bounds, i_end = [n], n - 1
        for arg in reversed(back):
            bounds.append(int(arg[i_end]))
            i_end = bounds[-1] - 1
        bounds = [0] + bounds[::-1]
        c = torch.stack([x[bounds[m]:bounds[m + 1]].mean() for m in range(k)])
        return finish(c)
    if init == "linear":
        c = torch.linspace(0, 1, k, dtype=torch.float64) * (x[-1] - x[0]) + x[0]
        c[-1] = x[-1]
    else:
        c = x[((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp(max=n - 1)]
    tol_abs = tol * x.var(unbiased=False)
    previous = None
    for _ in range(max_iter):
        labels = torch.argmin((x[:, None] - c[None, :]).abs(), dim=1)
        for _ in range(k):
            counts = torch.bincount(labels, minlength=k)
            empty = (counts == 0).nonzero()
            dist = (x - c[labels]).abs()
            if empty.numel() == 0 or dist.max() <= 0:
                break
            c[empty[0, 0]] = x[torch.argmax(dist)]
            c = torch.sort(c).values
            labels = torch.argmin((x[:, None] - c[None, :]).abs(), dim=1)
        if previous is not None and torch.equal(labels, previous):
            break
        previous = labels
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, x)
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        moved = ((new - c) ** 2).sum()
        c = torch.sort(new).values
        if moved <= tol_abs:
            break
    return finish(c)
