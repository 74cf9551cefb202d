"""Post-training compression from unlabeled inputs: layer input statistics, then second-order
pruning and codebook assignment with error feedback.

A user with a pretrained model and no training set still has inputs (sentences, photos). Run
through the model, they give each layer's input statistics H = E[x x^T]: how much each input
column matters and how columns move together. With H, the error of pruning or rounding one
weight can be paid back by the other weights of its row (optimal brain surgeon, as SparseGPT and
GPTQ do), so a layer's outputs, not its weights, stay close to the original:

    stats = dcx.calibrate(model, batches)          # {layer name: LayerStats}
    model, rows = dcx.convert_(model, dcx.ConvertConfig(bits=4), calibration=batches)

`compress_layer` is the per-layer step ("gptq", ConvertConfig.method): for each block of columns
in order, SparseGPT's adaptive mask (the weights whose removal costs least, w^2 / [H^-1]_jj^2),
then each kept weight rounded to its nearest codebook entry and the rounding error spread over
the columns still to come through the inverse Hessian's Cholesky factor (GPTQ, with a k-means
codebook in place of a uniform grid); finally the codebook itself refit by least squares on the
layer's outputs, tr((W - Q) H (W - Q)^T), labels and mask held. `weighted_layer`
("weighted") is the cheap path from H's diagonal alone: pruning by |w| times the input column's
norm within each row (Wanda), activation-weighted k-means (each weight counted by its input
column's energy H_jj, SqueezeLLM's sensitivity), nearest assignment. convert_ runs either layer
group by layer group in the order the model calls them, each group's statistics taken with the
layers before it already compressed, so later layers compensate the earlier ones' error too; a
transformer block by block (`block_chain`), each block alone on the inputs it received, so the
model runs about once, not once per group.

Statistics: nn.Linear (any leading dims) and 2-D convolutions with zero padding (inputs unfolded
into columns, one H per group of a grouped convolution, so a depthwise layer has a 9x9 H per
channel). Embeddings have no input to weigh and keep the plain k-means path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dcx import ops, state
from dcx.config import ClusterConfig
from dcx.format import scale_like
from dcx.quantize import codebook_scales

__all__ = ["LayerStats", "calibrate", "calibratable", "compress_layer", "weighted_layer",
           "run_batch", "CalibrationError"]


class CalibrationError(ValueError):
    """Calibration inputs that cannot be used (none at all, or none that reach a layer)."""


@dataclass
class LayerStats:
    """Input statistics of one layer: hessian [groups, k, k] float64, the sum of x x^T over
    `count` input rows x of k columns (per group of a grouped convolution; one group otherwise)."""

    hessian: Tensor
    count: int

    def mean(self) -> Tensor:
        """E[x x^T] [groups, k, k]."""
        return self.hessian / max(self.count, 1)


def calibratable(module: nn.Module) -> Optional[str]:
    """None when calibrate can take `module`'s input statistics, else why not."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            return f"padding_mode {module.padding_mode!r} (only zero padding is unfolded)"
        if isinstance(module.padding, str):
            return f"padding {module.padding!r} (give the padding as numbers)"
        return None
    return f"{type(module).__name__} has no input columns to weigh"


def _columns(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's input as rows of columns its weight multiplies: [groups, rows, k]."""
    if isinstance(module, nn.Linear):
        return x.detach().reshape(1, -1, x.shape[-1])
    # Conv2d: unfold gives [N, C * kh * kw, L], channel-major like the weight's flattening.
    x = x.detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    groups = module.groups
    k = cols.shape[1] // groups
    return cols.reshape(cols.shape[0], groups, k, -1).permute(1, 0, 3, 2).reshape(groups, -1, k)


class _Call:
    """One recorded call of a model's block (its positional and keyword arguments), replayed by
    run_batch."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = args, kwargs


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call `model` on one calibration batch: a dict is keyword arguments, a tuple or list the
    positional arguments, anything else the one argument."""
    if isinstance(batch, _Call):
        return model(*batch.args, **batch.kwargs)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class _Stop(BaseException):
    """Raised by a hook to end a forward pass once the layers being measured have run (a
    BaseException, so a model's own `except Exception` does not swallow it)."""


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, names: Optional[Iterable[str]] = None,
              stop_after: Optional[int] = None, progress: bool = False) -> dict[str, LayerStats]:
    """Input statistics of `model`'s layers over `batches` (an iterable of inputs, each a dict of
    keyword arguments, a tuple of arguments or one tensor; no labels): {module name:
    LayerStats} for every nn.Linear and zero-padded nn.Conv2d, or for `names`. The model runs as
    it is (call model.eval() first for inference statistics); every input row counts, padded
    token positions included (leaving them out measured worse on MiniLM: min cosine 0.95 -> 0.85
    at 4 bits; they are more rows of the same kind). stop_after: end each forward after that
    many layer calls (the layers after the measured ones need not run). progress: a bar over
    the batches."""
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if n and calibratable(m) is None]
    stats: dict[str, LayerStats] = {}
    calls = [0]

    def hook(name):
        def record(module, args, output):
            cols = _columns(module, args[0]).double()
            h = torch.matmul(cols.transpose(1, 2), cols)
            st = stats.get(name)
            if st is None:
                stats[name] = LayerStats(h, cols.shape[1])
            else:
                st.hessian += h
                st.count += cols.shape[1]
        return record

    def counter(module, args, output):
        calls[0] += 1
        if stop_after is not None and calls[0] >= stop_after:
            raise _Stop

    handles = []
    try:
        for name in names:
            module = modules.get(name)
            if module is None:
                raise KeyError(f"calibrate: the model has no module {name!r}")
            why = calibratable(module)
            if why is not None:
                raise ValueError(f"calibrate: {name}: {why}")
            handles.append(module.register_forward_hook(hook(name)))
        for n, m in modules.items():
            if _counted(n, m):
                handles.append(m.register_forward_hook(counter))
        seen = 0
        for batch in tqdm(batches, desc="calibrate", unit="batch", leave=False,
                          disable=None if progress else True):
            calls[0] = 0
            try:
                run_batch(model, batch)
            except _Stop:
                pass
            seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise CalibrationError("calibrate: no calibration batches (the iterable was empty)")
    return stats


def _counted(name: str, module: nn.Module) -> bool:
    """The layers whose calls call_order lists and calibrate's stop_after counts."""
    return bool(name) and (calibratable(module) is None or isinstance(module, nn.Embedding))


def call_order(model: nn.Module, batch: Any) -> list[tuple[str, int]]:
    """[(module name, number of its input tensor)] of the calibratable layers and embeddings, in
    the order one forward calls them (a layer called twice appears twice); layers that read the
    same tensor object get the same number."""
    order = []
    handles = []
    inputs = []  # held for the pass, so that no input is freed and its id reused

    def hook(name):
        def record(module, args, output):
            x = args[0] if args else None
            number = next((i for i, t in enumerate(inputs) if t is x), None)
            if number is None:
                inputs.append(x)
                number = len(inputs) - 1
            order.append((name, number))
        return record

    try:
        for name, m in model.named_modules():
            if _counted(name, m):
                handles.append(m.register_forward_hook(hook(name)))
        with torch.no_grad():
            run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    return order


# ---------------------------------------------------------------------------------------------
# One layer: SparseGPT mask + GPTQ assignment to a codebook + least-squares codebook


def _nearest(mid: Tensor, w: Tensor) -> Tensor:
    """Index into the sorted codebook whose midpoints are `mid` of each value's nearest entry
    (ties to the lower one)."""
    return torch.searchsorted(mid, w.contiguous(), right=False)


def _importance(h: Tensor, shape: torch.Size, scale: Optional[Tensor]) -> Tensor:
    """[G, rows, k]: how much each weight moves the layer's outputs per unit it moves in codebook
    units, alone: its input column's energy H_cc (the diagonal of the output error tr(E H E^T)),
    times its row scale squared."""
    col = h.diagonal(dim1=-2, dim2=-1)[:, None, :].expand(shape)
    return col if scale is None else col * scale * scale


def _weighted_codebook(values: Tensor, importance: Tensor, num: int, layer: dict) -> Tensor:
    """Activation-weighted k-means (SqueezeLLM's sensitivity-weighted codebook with the diagonal
    of H as the sensitivity): the codebook [num] float64 that minimises sum importance x (value -
    entry)^2, from layer["init"] (linear by default: on MiniLM more fidelity per byte than
    density quantiles of the importance, whose even label use Huffman codes in more bytes; 4 bits
    0.9472 at 10.25 MB against 0.9613 at 10.58 MB, 6 bits 0.9874 at 11.89 MB against 0.9915 at
    13.56 MB). The weights are scaled to at most 1, floored at 1e-9 (the op takes only positive
    weights; an input column never active costs nothing)."""
    weights = (importance / importance.max().clamp_min(1e-300)).clamp_min(1e-9)
    codebook, _ = ops.kmeans1d(values.double(), num, layer["init"], layer["max_iter"], layer["tol"],
                               layer["seed"], layer["method"], weights.double())
    return codebook


def _damped(h: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(H + lam I, U) per group ([G, k, k] each), lam = damp * mean(diag H), raised tenfold until
    the Cholesky factor exists, and U the upper Cholesky factor of (H + lam I)^-1. GPTQ's trick:
    row j of U, divided by U[j, j], updates the columns after j when column j is fixed, in the
    order 0..k-1, without re-inverting. The damping also makes the codebook refit well posed:
    inputs after a LayerNorm sum to zero, so H alone cannot tell a codebook from its shift."""
    k = h.shape[-1]
    eye = torch.eye(k, dtype=h.dtype, device=h.device)
    mean = h.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    for attempt in range(6):
        damped = h + (damp * 10 ** attempt * mean)[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(damped)
        if not bool(info.any()):
            break
    else:
        raise RuntimeError("calibration statistics are not positive definite even with damping")
    return damped, torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def _refit_codebook(w0: Tensor, labels: Tensor, mask: Tensor, h: Tensor, codebook: Tensor,
                    scale: Optional[Tensor] = None) -> Tensor:
    """The codebook that minimises sum_g tr((W0_g - Q_g) H_g (W0_g - Q_g)^T), Q = scale *
    codebook[labels] where kept (0 elsewhere), solved exactly: the problem is quadratic in the
    codebook, so its normal equations M c = b (M = sum over rows of Z^T H Z, b = sum of Z^T H w0,
    Z a row's [k, num] one-hot of its labels times its scales) are formed once, in products of
    about num x rows x k^2 multiply-adds (conjugate gradients took one product of rows x k^2 per
    step, and up to 64 steps), and solved by Cholesky. Entries no kept weight uses keep their
    value. w0, labels, mask: [G, rows, k]; scale: [G, rows, 1] or [G, rows, k] (None: 1); h
    positive definite (damped)."""
    num = codebook.numel()
    g, rows, k = w0.shape
    coef = mask.to(h.dtype) if scale is None else mask.to(h.dtype) * scale.to(h.dtype)
    flat = labels.reshape(-1).long()
    b = torch.bincount(flat, weights=(torch.matmul(w0.to(h.dtype), h) * coef).reshape(-1),
                       minlength=num)
    m = torch.zeros(num, num, dtype=h.dtype, device=h.device)
    chunk = max(1, (1 << 23) // max(1, k * num))  # rows per product: Z of 64 MB at most
    for gi in range(g):
        for r0 in range(0, rows, chunk):
            lab, cf = labels[gi, r0:r0 + chunk].long().t(), coef[gi, r0:r0 + chunk].t()
            # Z of these rows as [k, rows x num]: H Z is one GEMM (not one small one per row)
            z = torch.zeros(k, lab.shape[1], num, dtype=h.dtype, device=h.device)
            z.scatter_(2, lab.unsqueeze(-1), cf.unsqueeze(-1))
            hz = h[gi] @ z.reshape(k, -1)
            m += z.reshape(-1, num).t() @ hz.reshape(-1, num)
    c0 = codebook.to(h.dtype)
    unused = m.diagonal() <= 0
    m[unused] = 0
    m[:, unused] = 0
    m[unused, unused] = 1
    b = torch.where(unused, c0, b)
    chol, info = torch.linalg.cholesky_ex(m)
    if int(info) == 0:
        c = torch.cholesky_solve(b.unsqueeze(-1), chol).squeeze(-1)
    else:  # rounding made M semi-definite: the least-squares solution
        c = torch.linalg.lstsq(m, b.unsqueeze(-1)).solution.squeeze(-1)
    return c.to(codebook.dtype)


def output_error(w0: Tensor, q: Tensor, h: Tensor) -> float:
    """sum_g tr((W0_g - Q_g) H_g (W0_g - Q_g)^T): the squared output error over the calibration
    rows that H sums. w0, q: [G, rows, k]."""
    e = (w0 - q).to(h.dtype)
    return float((torch.matmul(e, h) * e).sum())


def _rows(weight: Tensor, stats: LayerStats,
          scale: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """(w0 [G, rows, k] float64, scales or None): a Linear's or Conv2d's weight as the rows of each
    group its statistics describe, and its codebook's scales in that shape ([G, rows, 1] for row
    scales, [G, rows, k] for group scales)."""
    groups = stats.hessian.shape[0]
    out = weight.shape[0]
    if out % groups:
        raise ValueError(f"weight of {out} rows does not split into {groups} groups")
    w0 = weight.detach().reshape(groups, out // groups, -1).double()
    if stats.hessian.shape[-1] != w0.shape[-1]:
        raise ValueError(f"statistics of {stats.hessian.shape[-1]} columns for a weight of "
                         f"{w0.shape[-1]}")
    if scale is None:
        return w0, None
    s = scale_like(scale.detach().to(w0), (out, w0.shape[-1]))
    return w0, s.reshape(groups, out // groups, -1)


@torch.no_grad()
def compress_layer(weight: Tensor, stats: LayerStats, sparsity: float, bits: int,
                   layer: dict, scale: Optional[Tensor] = None, block: int = 128,
                   damp: float = 0.03, rounds: int = 2,
                   mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(mask or None, codebook [<= 2^bits], int32 labels) of one weight, chosen to keep the
    layer's outputs on the calibration inputs (see the module docstring). weight: [out, ...]
    (a Linear's or Conv2d's); stats: its LayerStats; sparsity: the fraction of weights to prune
    (exactly, rounded down per block of columns); layer: the k-means settings of
    ClusterConfig.layer_fields (init, method, max_iter, tol, seed) for the initial codebook;
    scale: [out] row or [out, G] group scales, the weight being scale * codebook[label] (None:
    one codebook for the layer as it is); damp: the Hessian's damping, a fraction of its mean diagonal
    (MiniLM at 4 bits, mean / min cosine on other sentences: 128 calibration sentences, 0.01
    fits them too closely, 0.965 / 0.81, against 0.973 / 0.954 at 0.1; 256 sentences, 0.974 /
    0.954 at 0.03 against 0.967 / 0.914 at 0.1); rounds: assignment + refit passes (the second
    assigns with the refit codebook); mask: a mask to keep instead of choosing one (bool of
    weight's shape: a layer pruned and retrained before sharing keeps the weights it retrained;
    sparsity is then ignored)."""
    w0, s = _rows(weight, stats, scale)
    given = None if mask is None else mask.reshape(w0.shape).to(w0.device)
    k = w0.shape[-1]
    h = stats.mean().to(w0)
    # GPTQ's activation order: the columns with the largest inputs first, while the most
    # columns remain to absorb their error.
    perm = torch.argsort(h.diagonal(dim1=-2, dim2=-1).sum(0), descending=True)
    w0, h = w0[:, :, perm], h[:, perm][:, :, perm]
    if s is not None and s.shape[-1] > 1:  # group scales follow their columns
        s = s[:, :, perm]
    h, u = _damped(h, damp)
    num = 1 << bits
    wn = w0 if s is None else w0 / s  # the weights in codebook units
    # Initial codebook: k-means on the weights as they are, the largest-magnitude share kept
    # (the weights pruning will remove would pull centroids toward zero). Not the
    # activation-weighted codebook: on MiniLM it gave more even labels, which Huffman codes in
    # more bytes, and less fidelity per byte (4 bits: mean cosine 0.9702 at 10.58 MB against
    # 0.9672 at 10.38 MB; 5 bits: 0.9887 at 12.07 MB against 0.9880 at 11.48 MB).
    flat = wn.reshape(-1)
    if given is not None:
        given = given[:, :, perm]
        flat = wn[given] if bool(given.any()) else flat
    elif sparsity > 0:
        keep = max(1, flat.numel() - int(sparsity * flat.numel()))
        flat = flat[w0.reshape(-1).abs().topk(keep).indices]
    codebook, _ = ops.kmeans1d(flat.float(), num, layer["init"], layer["max_iter"], layer["tol"],
                               layer["seed"], layer["method"])
    codebook = codebook.double()
    mask = given
    for _ in range(rounds):
        labels, mask = _assign(w0, u, codebook, sparsity, block, mask, s)
        codebook = _refit_codebook(w0, labels, mask, h, codebook, s)
    # The refit may leave entries that no kept weight uses: they stay, harmless in the file.
    inverse = torch.argsort(perm)
    labels = labels[:, :, inverse].reshape(weight.shape).to(torch.int32)
    mask = mask[:, :, inverse].reshape(weight.shape)
    return (mask if sparsity > 0 or given is not None else None), codebook.to(weight.dtype), labels


@torch.no_grad()
def weighted_layer(weight: Tensor, stats: LayerStats, sparsity: float, bits: int, layer: dict,
                   scale: Optional[Tensor] = None,
                   mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The cheap calibrated step ("weighted", ConvertConfig.method), from the diagonal of H
    alone: each row pruned to `sparsity` by |w| sqrt(H_cc) (Wanda's score: the weight times its
    input column's norm, compared within its output row), the kept weights shared by
    activation-weighted k-means (_weighted_codebook) and each given its nearest entry; no error
    feedback. Arguments and result as compress_layer's."""
    w0, s = _rows(weight, stats, scale)
    wn = w0 if s is None else w0 / s
    h = stats.mean().to(w0)
    importance = _importance(h, wn.shape, s)
    given = mask
    mask = torch.ones_like(w0, dtype=torch.bool)
    drop = 0 if given is not None else int(sparsity * w0.shape[-1])
    if given is not None:
        mask = given.reshape(w0.shape).to(w0.device).clone()
    elif drop > 0:
        score = w0 * w0 * _importance(h, w0.shape, None)  # w^2 H_jj: the weight as it is
        mask.scatter_(2, score.topk(drop, dim=2, largest=False).indices, False)
    codebook = _weighted_codebook(wn[mask], importance[mask], 1 << bits, layer)
    order = torch.argsort(codebook)
    c_sorted = codebook[order]
    labels = order[_nearest((c_sorted[1:] + c_sorted[:-1]) / 2, wn)]
    labels = torch.where(mask, labels, torch.zeros_like(labels))
    return ((mask.reshape(weight.shape) if drop > 0 or given is not None else None),
            codebook.to(weight.dtype), labels.reshape(weight.shape).to(torch.int32))


def _assign(w0: Tensor, u: Tensor, codebook: Tensor, sparsity: float, block: int,
            fixed_mask: Optional[Tensor], scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """One GPTQ pass: (labels [G, rows, k] into `codebook`, mask) with the rounding and pruning
    error of each column fed back into the columns after it. w0: the weights as they are; scale:
    their scales ([G, rows, 1] or [G, rows, k]; None: 1): a weight is rounded in codebook units
    (w / scale) to scale * its entry, and its error fed back as it is, since the scales of the
    columns it moves may differ from its own. fixed_mask: reuse this mask instead of choosing
    one (the second round keeps the first round's)."""
    order = torch.argsort(codebook)
    c_sorted = codebook[order]
    mid = (c_sorted[1:] + c_sorted[:-1]) / 2
    w = w0.clone()
    g, rows, k = w.shape
    labels = torch.zeros(g, rows, k, dtype=torch.long, device=w.device)
    mask = torch.ones(g, rows, k, dtype=torch.bool, device=w.device)
    one = torch.ones((), dtype=w.dtype, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, :, i1:i2].clone()
        u1 = u[:, i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        d = u1.diagonal(dim1=-2, dim2=-1)  # [G, width]
        if fixed_mask is not None:
            m1 = fixed_mask[:, :, i1:i2]
        elif sparsity > 0:
            # SparseGPT's adaptive mask: the lowest w^2 / d^2 of this block, over all its rows.
            score = (w1 * w1) / (d * d)[:, None, :]
            drop = int(score[0].numel() * sparsity)
            m1 = torch.ones_like(w1, dtype=torch.bool)
            if drop > 0:
                flat = score.reshape(g, -1)
                idx = flat.topk(drop, dim=1, largest=False).indices
                m1.view(g, -1).scatter_(1, idx, False)
        else:
            m1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            col = w1[:, :, i]
            sc = one if scale is None else scale[:, :, min(i1 + i, scale.shape[-1] - 1)]
            ids = _nearest(mid, col / sc)
            q = torch.where(m1[:, :, i], c_sorted[ids] * sc, torch.zeros_like(col))
            labels[:, :, i1 + i] = order[ids]
            e = (col - q) / d[:, i][:, None]
            w1[:, :, i:] -= e[:, :, None] * u1[:, i, i:][:, None, :]
            err1[:, :, i] = e
        mask[:, :, i1:i2] = m1
        if i2 < k:
            w[:, :, i2:] -= torch.matmul(err1, u[:, i1:i2, i2:])
    labels = torch.where(mask, labels, torch.zeros_like(labels))
    return labels, mask


# ---------------------------------------------------------------------------------------------
# A whole model, layer group by layer group


def _groups(order: list[tuple[str, int]], names) -> list[list[str]]:
    """The layers of `names` in first-call order, consecutive ones that read the same input
    tensor (attention's query, key and value) in one group."""
    groups, last_input, seen = [], None, set()
    for name, inp in order:
        if name in seen or name not in names:
            continue
        seen.add(name)
        if groups and inp == last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = inp
    return groups


LAYER_METHODS = {"gptq": compress_layer, "weighted": weighted_layer}


# A block's key/value cache arguments: replayed without them (a cache would grow with every
# replay; a forward without one computes the same outputs).
_CACHE_KWARGS = ("cache", "past_key_value", "past_key_values", "layer_past")


def _first_output(output: Any) -> Any:
    return output[0] if isinstance(output, (tuple, list)) else output


def block_chain(model: nn.Module, batch: Any, names) -> list[str]:
    """The blocks (module names, in order) of the nn.ModuleList of `model` holding the most of
    the layers `names`, when one forward on `batch` calls each block once, in order, the first
    argument of each the first output of the one before (a transformer's layers); [] when no
    list of two or more blocks does."""
    best, best_count = None, 0
    for list_name, blocks in model.named_modules():
        if not isinstance(blocks, nn.ModuleList) or len(blocks) < 2:
            continue
        prefixes = [f"{list_name}.{i}." if list_name else f"{i}." for i in range(len(blocks))]
        count = sum(1 for n in names if any(n.startswith(p) for p in prefixes))
        if count > best_count:
            best, best_count = (list_name, blocks), count
    if best is None:
        return []
    list_name, blocks = best
    calls, handles = [], []  # calls: (block index, its first argument, its first output)

    def hook(index):
        def record(module, args, kwargs, output):
            first = args[0] if args else kwargs.get("hidden_states")
            calls.append((index, first, _first_output(output)))
        return record

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_hook(hook(i), with_kwargs=True))
        with torch.no_grad():
            run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()
    chained = [c[0] for c in calls] == list(range(len(blocks))) and all(
        calls[i + 1][1] is calls[i][2] for i in range(len(calls) - 1))
    if not chained:
        return []
    return [f"{list_name}.{i}" if list_name else str(i) for i in range(len(blocks))]


def _block_inputs(model: nn.Module, block: nn.Module, batches: list) -> list[_Call]:
    """The calls of `block` in one forward per batch (each forward stopped there), its cache
    arguments left out."""
    calls = []

    def record(module, args, kwargs):
        kwargs = {k: (None if k in _CACHE_KWARGS else v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        calls.append(_Call(args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    run_batch(model, batch)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise CalibrationError("calibration: a batch's forward never reached the first block")
    return calls


@torch.no_grad()
def _next_inputs(block: nn.Module, calls: list[_Call]) -> list[_Call]:
    """The next block's calls: each call's first argument replaced by the block's first output."""
    out = []
    for call in calls:
        y = _first_output(run_batch(block, call))
        if call.args:
            out.append(_Call((y,) + tuple(call.args[1:]), call.kwargs))
        else:
            out.append(_Call((), {**call.kwargs, "hidden_states": y}))
    return out


def compress_calibrated_(model: nn.Module, settings: dict[str, dict], batches: Iterable,
                         progress: bool = False, method: str = "gptq") -> nn.Module:
    """Prune and share each layer of `settings` ({module name: {"sparsity", "bits"}}, every one
    calibratable) with LAYER_METHODS[method] (compress_layer or weighted_layer), in place: layer
    group by layer group in the order the model calls them, each group's statistics taken over
    `batches` with the groups before it already compressed (their error is what the later
    layers see and compensate). Writes the layers' state (mask, codebook, labels) as prune_ and
    cluster_ do. Returns the model.

    A model whose layers sit in a chain of blocks (block_chain: a transformer's layers) runs
    once up to its first block; each block then runs alone on the inputs it received, once per
    layer group in it and once more for the next block's inputs, as GPTQ does: one pass over
    the model instead of one per group. Layers before and after the chain (a pooler, a head)
    take a forward of the model per group."""
    compress = LAYER_METHODS[method]
    if not settings:
        return model
    batches = list(batches)
    if not batches:
        raise CalibrationError("calibration: no batches (the iterable was empty)")
    modules = dict(model.named_modules())
    order = call_order(model, batches[0])
    groups = _groups(order, settings)
    missing = sorted(set(settings) - {n for g in groups for n in g})
    if missing:
        raise CalibrationError(f"calibration: the model's forward never calls {missing[:5]}"
                               f"{' ...' if len(missing) > 5 else ''}; give inputs that reach "
                               "every layer, or leave these layers out")
    last_call = {}
    for i, (name, _) in enumerate(order):
        last_call[name] = i + 1
    kmeans = ClusterConfig().layer_fields(conv=False)

    def compress_group(group, stats):
        for name in group:
            module = modules[name]
            s = settings[name]
            if name not in stats:
                raise CalibrationError(f"calibration: {name} was not reached (the model "
                                       "calls its layers in another order for other batches)")
            # A layer pruned before (and retrained) keeps its mask: sharing must not re-prune
            # the weights retraining moved.
            pruned = state.mask(module, "weight")
            scale = codebook_scales(module.weight, pruned, s.get("scale"))
            try:
                mask, codebook, labels = compress(module.weight, stats.pop(name),
                                                  float(s["sparsity"]), int(s["bits"]),
                                                  kmeans, scale, mask=pruned)
            except (RuntimeError, ValueError) as error:
                raise CalibrationError(f"calibration: {name}: {error}") from error
            if mask is not None:
                state.set_mask_(module, "weight", mask)
            state.set_shared_(module, "weight", codebook, labels, int(s["bits"]), live=True,
                              scale=scale)
            bar.update(1)

    def whole_model(group):
        compress_group(group, calibrate(model, batches, group,
                                        stop_after=max(last_call[n] for n in group)))

    blocks = block_chain(model, batches[0], settings)
    # Each group's block (None: outside the chain); the chain path needs the blocks' groups
    # consecutive and in block order, between the groups before and after the chain.
    where = [next((i for i, b in enumerate(blocks) if g[0].startswith(b + ".")), None)
             for g in groups]
    inside = [i for i, w in enumerate(where) if w is not None]
    if inside and (any(w is None for w in where[inside[0]:inside[-1] + 1])
                   or where[inside[0]:inside[-1] + 1] != sorted(where[inside[0]:inside[-1] + 1])
                   or any(not all(n.startswith(blocks[where[i]] + ".") for n in groups[i])
                          for i in inside)):
        inside = []
    bar = tqdm(total=len(settings), desc="calibrated compression", unit="layer", leave=False,
               disable=None if progress else True)
    with bar:
        if not inside:
            for group in groups:
                whole_model(group)
            return model
        for group in groups[:inside[0]]:
            whole_model(group)
        calls = _block_inputs(model, modules[blocks[where[inside[0]]]], batches)
        for b in range(where[inside[0]], where[inside[-1]] + 1):
            prefix = blocks[b] + "."
            block = modules[blocks[b]]
            for i in inside:
                if where[i] == b:
                    rel = [n[len(prefix):] for n in groups[i]]
                    stats = calibrate(block, calls, rel)
                    compress_group(groups[i], {prefix + n: st for n, st in stats.items()})
            if b < where[inside[-1]]:
                calls = _next_inputs(block, calls)
        for group in groups[inside[-1] + 1:]:
            whole_model(group)
    return model
