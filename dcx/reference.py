"""Plain-torch oracles of every dcx op: slow, obviously right, and what the tests compare the
kernels against."""

from typing import Optional

import torch
from torch import Tensor

from dcx import _native
from dcx.format import scale_columns


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


def masked_adamw_step_(
    param: Tensor,
    grad: Tensor,
    mask: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    maximize: bool = False,
) -> None:
    """torch.optim.AdamW's single-tensor update (torch/optim/adam.py) in float32, op by op, then
    pruned positions of param and every moment buffer set to 0. The moments equal the kernel's
    bit for bit on CPU; torch's float32 sqrt (its vector library's, within an ulp) may move the
    weights by an ulp or two from the kernel's correctly rounded one."""
    keep = mask.bool()
    p, m, v = param.float(), exp_avg.float(), exp_avg_sq.float()
    g = -grad.float() if maximize else grad.float()
    if weight_decay != 0:
        p = p.mul(1 - lr * weight_decay)
    m = m.lerp(g, 1 - beta1)
    v = v.mul(beta2).addcmul(g, g, value=1 - beta2)
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    if amsgrad:
        v_max = torch.maximum(max_exp_avg_sq.float(), v)
        max_exp_avg_sq.copy_(torch.where(keep, v_max, torch.zeros_like(v_max)))
    denom = ((v_max if amsgrad else v).sqrt() / bias_correction2_sqrt).add(eps)
    p = p.addcdiv(m, denom, value=-(lr / (1 - beta1**step)))
    zero = torch.zeros_like(p)
    param.copy_(torch.where(keep, p, zero))
    exp_avg.copy_(torch.where(keep, m, zero))
    exp_avg_sq.copy_(torch.where(keep, v, zero))


def centroid_grad(
    grad: Tensor, labels: Tensor, num_clusters: int, mask: Optional[Tensor] = None,
    check: bool = True,
) -> Tensor:
    """Per-label sums in float64 (the exact-enough oracle), returned in grad's dtype; labels out
    of range are skipped (an error with check=True)."""
    values = grad.reshape(-1).double()
    index = labels.reshape(-1).long()
    if mask is not None:
        keep = mask.reshape(-1).bool()
        values, index = values[keep], index[keep]
    inside = (index >= 0) & (index < num_clusters)
    if check and not bool(inside.all()):
        raise RuntimeError("labels must lie in [0, num_clusters) where mask is set")
    values, index = values[inside], index[inside]
    out = torch.zeros(num_clusters, dtype=torch.float64, device=grad.device)
    return out.index_add_(0, index, values).to(grad.dtype)


def huffman_code_lengths(freqs: Tensor, max_length: int = 24) -> Tensor:
    """Package-merge with explicit symbol lists (slow, plain Python): optimal code lengths of at
    most max_length bits. Ties may be broken differently from the kernel, so compare costs
    (sum of freq * length), not lengths."""
    freq = [int(f) for f in freqs.tolist()]
    present = sorted((f, s) for s, f in enumerate(freq) if f > 0)
    lengths = [0] * len(freq)
    if len(present) == 1:
        lengths[present[0][1]] = 1
    if len(present) <= 1:
        return torch.tensor(lengths, dtype=torch.uint8)
    if len(present) > 2**max_length:
        raise ValueError(f"{len(present)} symbols do not fit codes of {max_length} bits")
    leaves = [(f, [s]) for f, s in present]
    items = list(leaves)
    for _ in range(max_length - 1):
        packages = [(items[i][0] + items[i + 1][0], items[i][1] + items[i + 1][1])
                    for i in range(0, len(items) - 1, 2)]
        items = sorted(leaves + packages, key=lambda item: item[0])
    for _, symbols in items[: 2 * len(present) - 2]:
        for s in symbols:
            lengths[s] += 1
    return torch.tensor(lengths, dtype=torch.uint8)


def canonical_codes(code_lengths: Tensor) -> dict:
    """{symbol: code as a '0'/'1' string}: shorter codes first, then by symbol (as DEFLATE)."""
    lengths = [int(n) for n in code_lengths.tolist()]
    codes, code, prev = {}, 0, 0
    for length, s in sorted((n, s) for s, n in enumerate(lengths) if n > 0):
        code <<= length - prev
        codes[s] = format(code, f"0{length}b")
        code, prev = code + 1, length
    return codes


def huffman_encode(symbols: Tensor, code_lengths: Tensor) -> Tensor:
    """Bit strings joined, padded with zeros to whole bytes, MSB first."""
    codes = canonical_codes(code_lengths)
    bits = "".join(codes[s] for s in symbols.reshape(-1).tolist())
    bits += "0" * (-len(bits) % 8)
    data = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def huffman_decode(data: Tensor, code_lengths: Tensor, count: int) -> Tensor:
    """Reads bits one at a time until they form a code; ValueError on a corrupt stream."""
    table = {code: s for s, code in canonical_codes(code_lengths).items()}
    raw = bytes(data.tolist())
    bits = format(int.from_bytes(raw, "big"), f"0{8 * len(raw)}b") if raw else ""
    out, current, used = [], "", 0
    for bit in bits:
        if len(out) == count:
            break
        current += bit
        used += 1
        if current in table:
            out.append(table[current])
            current = ""
        elif len(current) > 24:
            raise ValueError("invalid code")
    if len(out) < count or current:
        raise ValueError("stream ends early")
    if (used + 7) // 8 != len(raw) or "1" in bits[used:]:
        raise ValueError("bits left over")
    dtype = torch.uint8 if code_lengths.numel() <= 256 else torch.uint16
    return torch.tensor(out, dtype=torch.int64).to(dtype)
def kmeans1d(
    values: Tensor,
    num_clusters: int,
    init: str = "linear",
    max_iter: int = 300,
    tol: float = 1e-4,
    seed: int = 0,
    method: str = "lloyd",
    weights: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Lloyd's algorithm with an n x k distance matrix in float64 (linear and density inits), or
    for method="optimal" the O(k n^2) dynamic program; the same conventions as dcx.ops.kmeans1d
    (ties to the lower centroid, empty clusters take the value farthest from its centroid;
    weights: weighted means, costs, density quantiles and tolerance)."""
    if init not in ("linear", "density"):
        raise ValueError(f"the reference has only the deterministic inits, got {init!r}")
    k = num_clusters
    flat = values.reshape(-1).double()
    w = torch.ones_like(flat) if weights is None else weights.reshape(-1).double()
    # Equal values sort in input order, so their weights do too (as the op's stable sort).
    x, order = torch.sort(flat, stable=True)
    w = w[order]
    n = x.numel()

    def finish(c):
        c = c.to(values.dtype).double()
        labels = torch.argmin((flat[:, None] - c[None, :]).abs(), dim=1)
        return c.to(values.dtype), labels.to(torch.int32).reshape(values.shape)

    distinct = torch.unique(x)
    if n == 0:
        return finish(torch.zeros(k, dtype=torch.float64))
    if distinct.numel() <= k:
        return finish(torch.cat([distinct, distinct[-1].repeat(k - distinct.numel())]))

    def mean(part, part_w):
        return (part * part_w).sum() / part_w.sum()

    if method == "optimal":
        d = x - x[n // 2]
        cw = torch.cat([x.new_zeros(1), torch.cumsum(w, 0)])
        cs = torch.cat([x.new_zeros(1), torch.cumsum(w * d, 0)])
        cs2 = torch.cat([x.new_zeros(1), torch.cumsum(w * d * d, 0)])
        j = torch.arange(n)[:, None]
        i = torch.arange(n)[None, :]
        weight = (cw[i + 1] - cw[j]).clamp(min=1e-300)
        cost = (cs2[i + 1] - cs2[j]) - (cs[i + 1] - cs[j]) ** 2 / weight  # cost[j, i] of x[j..i]
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
        c = torch.stack([mean(x[bounds[m]:bounds[m + 1]], w[bounds[m]:bounds[m + 1]])
                         for m in range(k)])
        return finish(c)
    if init == "linear":
        c = torch.linspace(0, 1, k, dtype=torch.float64) * (x[-1] - x[0]) + x[0]
        c[-1] = x[-1]
    elif weights is None:
        c = x[((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp(max=n - 1)]
    else:  # weighted quantiles: the value whose weight interval holds (j + 1/2) / k of the total
        cw = torch.cumsum(w, 0)
        targets = (torch.arange(k, dtype=torch.float64) + 0.5) / k * cw[-1]
        c = x[torch.searchsorted(cw, targets, right=True).clamp(max=n - 1)]
    mu = mean(x, w)
    tol_abs = tol * ((w * (x - mu) ** 2).sum() / w.sum())
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
        weight = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, w)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, x * w)
        new = torch.where(weight > 0, sums / weight.clamp(min=1e-300), c)
        moved = ((new - c) ** 2).sum()
        c = torch.sort(new).values
        if moved <= tol_abs:
            break
    return finish(c)


def spqmm_ids(
    codes: Tensor, windows: Tensor, group_ptr: Tensor, out_features: int, in_features: int,
    bits: int
) -> tuple[Tensor, Tensor]:
    """(kept, ids) of a packed layer (csrc/core/spqmm.h describes the layout), decoded with plain
    torch ops: kept bool [out_features, in_features] (True at every position in dense mode) and
    int64 codebook ids (0 where nothing is stored)."""
    layout = _native.spqmm_layout()
    rows_per_group, block = layout["rows"], layout["nibble_block"]
    if codes.dtype == torch.uint8 and bits <= 4:  # dense mode, two ids per byte
        words = codes.long().view(out_features, codes.shape[1] // 64, 16, 4)  # [n, block, d, byte]
        nibbles = torch.stack([words & 15, words >> 4], dim=-1).flatten(-2)  # nibble t = 0..7
        ids = nibbles.transpose(2, 3).reshape(out_features, -1)  # column 128 b + 16 t + d
        assert block == 128  # the view above is that block's shape
        ids = ids[:, :in_features]
        return torch.ones_like(ids, dtype=torch.bool), ids
    if codes.dtype == torch.uint8 and bits < 8:  # dense mode, bit-packed: LSB-first bit stream
        stream = (codes.long().unsqueeze(-1) >> torch.arange(8, device=codes.device)) & 1
        stream = stream.reshape(out_features, codes.shape[1] * 8)[:, : in_features * bits]
        place = 1 << torch.arange(bits, device=codes.device)
        ids = (stream.reshape(out_features, in_features, bits) * place).sum(-1)
        return torch.ones_like(ids, dtype=torch.bool), ids
    if codes.dtype == torch.uint8:  # dense mode: one id per weight
        return torch.ones(codes.shape, dtype=torch.bool, device=codes.device), codes.long()
    slots = codes.long() & 0xFFFF  # [steps, rows_per_group]
    counts = (group_ptr[1:] - group_ptr[:-1]).long()
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=codes.device), counts)
    rows = group[:, None] * rows_per_group + torch.arange(rows_per_group, device=codes.device)
    offsets = (slots >> layout["offset_shift"]) & (layout["window"] - 1)
    cols = windows.long()[:, None] + offsets
    live = (slots >> layout["live_bit"]) == 1
    kept = torch.zeros(out_features, in_features, dtype=torch.bool, device=codes.device)
    ids = torch.zeros(out_features, in_features, dtype=torch.long, device=codes.device)
    kept[rows[live], cols[live]] = True
    ids[rows[live], cols[live]] = slots[live] & layout["id_mask"]
    return kept, ids


def spqmm_weight(
    codes: Tensor, windows: Tensor, group_ptr: Tensor, codebook: Tensor, out_features: int,
    in_features: int, bits: int
) -> Tensor:
    """The dense [out_features, in_features] weight a packed layer stands for, in float64."""
    kept, ids = spqmm_ids(codes, windows, group_ptr, out_features, in_features, bits)
    return torch.where(kept, codebook.double()[ids], torch.zeros((), dtype=torch.float64))


def spqmm(
    x: Tensor,
    codes: Tensor,
    windows: Tensor,
    group_ptr: Tensor,
    chunks: Tensor,
    codebook: Tensor,
    out_features: int,
    in_features: int,
    bits: int,
    bias: Optional[Tensor] = None,
    crossover: int = -1,
    check: bool = True,
    compute: str = "auto",
    scale: Optional[Tensor] = None,
    group_size: int = 0,
) -> Tensor:
    """F.linear with the decoded weight (times the row or group scales), in float64, returned
    in x's dtype."""
    w = spqmm_weight(codes, windows, group_ptr, codebook, out_features, in_features, bits)
    if scale is not None:
        w = w * scale_columns(scale.double(), group_size, in_features)
    b = None if bias is None else bias.double()
    return torch.nn.functional.linear(x.double(), w, b).to(x.dtype)


def spqmm_decode(
    codes: Tensor, windows: Tensor, group_ptr: Tensor, chunks: Tensor, codebook: Tensor,
    out_features: int, in_features: int, bits: int,
) -> Tensor:
    """dcx.ops.spqmm_decode in plain torch: the weight in the codebook's dtype (exact: each
    element is a codebook entry or 0)."""
    w = spqmm_weight(codes, windows, group_ptr, codebook, out_features, in_features, bits)
    return w.to(codebook.dtype)


Q8_BLOCK = 32  # activation columns per scale (kQ8Block in csrc/core/spqmm_int8.h)


def q8_quantize(v: Tensor, block: Optional[int] = None, levels: int = 127) -> tuple[Tensor, Tensor]:
    """Integer values and float32 scales of v [..., K] by the rule of csrc/core/spqmm_int8.h: per
    block of `block` trailing values (all of them when None), scale max|v| / levels and values
    round(v * (levels / max|v|)) (half to even; a block of zeros has scale 0); levels 127 for
    activations (int8), 32767 for the codebook (int16). Returns (q [..., blocks, block], int32,
    with zeros past K; scales [..., blocks])."""
    v = v.float()
    k = v.shape[-1]
    block = k if block is None else block
    blocks = -(-k // block)
    padded = torch.nn.functional.pad(v, (0, blocks * block - k)).reshape(*v.shape[:-1], blocks, block)
    amax = padded.abs().amax(-1)
    # a true division (127.0 / amax would be computed as 127 * (1 / amax), rounded twice)
    inverse = torch.where(amax > 0, torch.full_like(amax, float(levels)) / amax, torch.zeros_like(amax))
    q = torch.round(padded * inverse.unsqueeze(-1)).clamp(-levels, levels).to(torch.int32)
    return q, amax / float(levels)


def spqmm_int8(
    x: Tensor,
    codes: Tensor,
    codebook: Tensor,
    out_features: int,
    in_features: int,
    bits: int,
    bias: Optional[Tensor] = None,
    check: bool = True,
    scale: Optional[Tensor] = None,
    group_size: int = 0,
) -> Tensor:
    """dcx.ops.spqmm_int8 in plain torch: the same integer values and scales (int8 activations,
    int16 codebook), the block dots exact, the rest in float64 (the kernels sum in float32).
    Returns x's dtype."""
    return spqmm_int8_float64(x, codes, codebook, out_features, in_features, bits, bias,
                              scale, group_size).to(x.dtype)


def spqmm_int8_gemm(
    x: Tensor, codes: Tensor, codebook: Tensor, out_features: int, in_features: int, bits: int,
    bias: Optional[Tensor] = None, scale: Optional[Tensor] = None, group_size: int = 0,
    windows: Optional[Tensor] = None, group_ptr: Optional[Tensor] = None,
) -> Tensor:
    """The int8 compute of many rows (the plan's int8_gemm kernel; the coarser rule in
    csrc/core/spqmm_int8.h) in plain torch, float64: W decoded in float32 (group scales
    included) and each row quantized whole to int8, each row of x likewise, the products exact,
    y = sx sw acc (times the row scales, when given) + bias. A sparse-mode layer passes its
    windows and group_ptr too."""
    empty = torch.empty(0, dtype=torch.int32, device=codes.device)
    w = spqmm_weight(codes, empty if windows is None else windows,
                     empty if group_ptr is None else group_ptr, codebook.float(), out_features,
                     in_features, bits).float()
    if scale is not None and group_size:
        w = w * scale_columns(scale.float(), group_size, in_features)
    wq, ws = q8_quantize(w)  # [N, 1, K], [N, 1]
    xq, xs = q8_quantize(x)  # [..., 1, K], [..., 1]
    acc = xq[..., 0, :].double() @ wq[:, 0, :].double().T  # exact: integers below 2^53
    y = acc * xs.double() * ws[:, 0].double()
    if scale is not None and not group_size:
        y = y * scale.double()
    if bias is not None:
        y = y + bias.double()
    return y


def spqmm_int8_float64(
    x: Tensor, codes: Tensor, codebook: Tensor, out_features: int, in_features: int, bits: int,
    bias: Optional[Tensor] = None, scale: Optional[Tensor] = None, group_size: int = 0,
) -> Tensor:
    """spqmm_int8's result before the final rounding to x's dtype, in float64 (row scales, when
    given, multiply each output before the bias; group scales each 32-column block's dot)."""
    empty = torch.empty(0, dtype=torch.int32, device=codes.device)
    _, ids = spqmm_ids(codes, empty, empty, out_features, in_features, bits)
    cq, cscale = q8_quantize(codebook, levels=32767)  # cq [1, k] (int16 values), cscale [1]
    table = torch.zeros(256, dtype=torch.float64, device=codes.device)
    table[: codebook.numel()] = cq[0].double()
    xq, xs = q8_quantize(x, Q8_BLOCK)  # [..., B, 32], [..., B]
    blocks = xq.shape[-2]
    w = torch.nn.functional.pad(table[ids], (0, blocks * Q8_BLOCK - in_features))
    w = w.reshape(out_features, blocks, Q8_BLOCK)
    dots = torch.einsum("...bt,nbt->...nb", xq.double(), w)  # exact: integers below 2^53
    if scale is not None and group_size:  # one scale per block: 32 divides group_size
        dots = dots * scale.double().repeat_interleave(group_size // Q8_BLOCK, 1)[:, :blocks]
    y = (dots * xs.double().unsqueeze(-2)).sum(-1) * cscale.double()
    if scale is not None and not group_size:
        y = y * scale.double()
    if bias is not None:
        y = y + bias.double()
    return y
