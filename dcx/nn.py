"""Compressed layers that run on the packed sparse-quantized format: SparseQuantLinear (a drop-in
nn.Linear), SparseQuantConv2d, `pack` (the one place the in-memory format is built, from
(mask, labels, codebook)) and `convert` (swap the layers of any model).

The format and the kernels are described at the top of csrc/core/spqmm.h.
"""

import math
import re
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcx import ops

__all__ = ["PackedWeight", "pack", "SparseQuantLinear", "SparseQuantConv2d", "convert"]

# Layers at or above this density are packed in dense mode (one uint8 id per weight, no
# positions). Sparse mode costs about 3.2 bytes per non-zero at 10% density (2 bytes a slot, 70%
# of the slots live) and 2.6 at 25%; on a Zen 4 CPU at batch 1 (4096x4096) it runs in 1.06 ms at
# 25% density against 1.26 ms for dense mode, and in 1.82 ms at 50% against 1.31 ms
# (benchmarks/results/spqmm-cpu.md).
DENSE_DENSITY = 0.3
ROWS = 16  # rows per group = slots per step (csrc/core/spqmm.h)
WINDOW = 32  # columns of x one step can reach
# Steps per chunk (a work item of the CPU threads or of a GPU thread block).
CHUNK_STEPS = 1024


class PackedWeight(NamedTuple):
    # int16 [steps, 16] (sparse mode); dense mode: uint8 [out_features, in_features], or with
    # bits <= 4 two ids per byte, [out_features, ceil(in_features / 128) * 64]
    codes: Tensor
    windows: Tensor  # int32 [steps]: first column of each step's window (empty in dense mode)
    group_ptr: Tensor  # int32 [ceil(out_features / 16) + 1] (empty in dense mode)
    chunks: Tensor  # int32 [num_chunks + 1] (empty in dense mode)
    codebook: Tensor  # [<= 2^bits]
    out_features: int
    in_features: int
    bits: int

    @property
    def dense(self) -> bool:
        return self.codes.dtype == torch.uint8

    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight (codes, pointers, codebook)."""
        return sum(t.numel() * t.element_size() for t in self[:5])

    def to(self, device) -> "PackedWeight":
        """The same packed weight with its tensors on `device`."""
        return self._replace(**{name: getattr(self, name).to(device) for name in _BUFFERS})

    def spqmm(self, x: Tensor, bias: Optional[Tensor] = None, check: bool = True,
              crossover: int = -1) -> Tensor:
        """x W^T + bias through dcx.ops.spqmm (the codebook cast to x's dtype)."""
        return ops.spqmm(x, self.codes, self.windows, self.group_ptr, self.chunks,
                         self.codebook.to(x.dtype), self.out_features, self.in_features, self.bits,
                         bias, crossover, check)


# The tensors of a PackedWeight (SparseQuantLinear's buffers).
_BUFFERS = PackedWeight._fields[:5]


def _bits_for(k: int) -> int:
    return max(1, math.ceil(math.log2(k))) if k > 1 else 1


def pack(
    mask: Tensor,
    labels: Tensor,
    codebook: Tensor,
    bits: Optional[int] = None,
    dense: Optional[bool] = None,
) -> PackedWeight:
    """Pack a weight-shared layer W = codebook[labels] * mask ([out, in]) for dcx.ops.spqmm.

    mask: bool/uint8 [out, in] (0 = pruned); labels: int [out, in], in [0, k) where mask is set
    (pruned positions may hold anything); codebook: float [k], k <= 256. bits: width of an id
    (default: the fewest that hold k ids). dense: force dense mode (codes only) or sparse mode;
    default: dense from DENSE_DENSITY on. Raises ValueError on inconsistent input, so the packed
    data the kernels read is valid by construction.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [out_features, in_features], got shape {tuple(mask.shape)}")
    if labels.shape != mask.shape:
        raise ValueError(f"labels must have the shape of mask {tuple(mask.shape)}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if codebook.dim() != 1 or not 1 <= codebook.numel() <= 256:
        raise ValueError(f"codebook must be 1-D with 1 to 256 entries, got shape {tuple(codebook.shape)}")
    if not codebook.dtype.is_floating_point:
        raise ValueError(f"codebook must be a float tensor, got {codebook.dtype}")
    k = codebook.numel()
    bits = _bits_for(k) if bits is None else int(bits)
    if not 1 <= bits <= 8 or k > (1 << bits):
        raise ValueError(f"bits must lie in [1, 8] and hold the {k} codebook ids, got {bits}")
    device = mask.device
    mask = mask.bool()
    labels = labels.to(device)
    codebook = codebook.to(device)
    kept = labels[mask].long()
    if kept.numel() and (kept.min() < 0 or kept.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}) where mask is set, got "
                         f"[{kept.min().item()}, {kept.max().item()}]")
    n, K = mask.shape
    nnz = kept.numel()
    if dense is None:
        dense = n * K > 0 and nnz >= DENSE_DENSITY * n * K
    empty = torch.zeros(0, dtype=torch.int32, device=device)

    if dense:
        ids = labels.to(torch.uint8)  # ids < 256 where mask is set; pruned ones are set below
        if nnz < n * K:  # pruned positions need an id that decodes to exactly 0
            zero = (codebook == 0).nonzero()
            if zero.numel():
                zero_id = int(zero[0, 0])
            elif k < (1 << bits) or bits < 8:
                zero_id, bits = k, max(bits, _bits_for(k + 1))
                codebook = torch.cat([codebook, codebook.new_zeros(1)])
            else:
                return pack(mask, labels, codebook, bits, dense=False)
            ids[~mask] = zero_id
        if bits <= 4:
            ids = _pack_nibbles(ids)
        return PackedWeight(ids.contiguous(), empty, empty, empty, codebook, n, K, bits)

    if nnz >= 2**31:
        raise ValueError(f"a sparse layer must have fewer than 2^31 non-zeros, got {nnz}")
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: each row's columns ascending
    slots = (1 << 15) | labels[rows, cols].long()  # live bit and id; the offset is added below
    codes, windows, group_ptr = _fill_steps(rows, cols, slots, n)
    return PackedWeight(codes, windows, group_ptr, _chunk_plan(windows.numel(), device), codebook, n, K,
                        bits)


def _pack_nibbles(ids: Tensor) -> Tensor:
    """Dense mode with ids of up to 4 bits: two per byte, [N, ceil(K / 128) * 64]. A block of 128
    columns is 16 little-endian 32-bit words; nibble t of word d holds column 16 t + d, so shifts
    and masks of one 64-byte vector give 8 vectors of 16 consecutive columns' ids."""
    n, k = ids.shape
    blocks = -(-k // 128)
    padded = ids.new_zeros(n, blocks * 128)
    padded[:, :k] = ids
    nibbles = padded.view(n, blocks, 8, 16).transpose(2, 3)  # [n, block, word d, nibble t]
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).reshape(n, blocks * 64)


def _fill_steps(rows: Tensor, cols: Tensor, slots: Tensor, n: int):
    """Lay out each group of ROWS rows as steps (csrc/core/spqmm.h): a step's window begins at
    the smallest next column of the group's rows, and each row whose next weight lies within the
    window puts it in the step. All groups advance together, one step per iteration."""
    device = rows.device
    groups = -(-n // ROWS)
    row_ptr = torch.zeros(groups * ROWS + 1, dtype=torch.int64, device=device)
    row_ptr[1:n + 1] = torch.bincount(rows, minlength=n).cumsum(0)
    row_ptr[n + 1:] = row_ptr[n]
    nxt, end = row_ptr[:-1].view(groups, ROWS).clone(), row_ptr[1:].view(groups, ROWS)
    far = torch.iinfo(torch.int64).max // 2
    cols_ext = torch.cat([cols.long(), cols.new_full((1,), far, dtype=torch.int64)])
    slots_ext = torch.cat([slots, slots.new_zeros(1)])
    step_codes, step_windows, step_groups = [], [], []
    group_ids = torch.arange(groups, device=device)
    while True:
        has = nxt < end
        active = has.any(1)
        if not bool(active.any()):
            break
        at = torch.where(has, nxt, cols_ext.numel() - 1)  # rows with nothing left read `far`
        col = cols_ext[at]
        window = col.min(1).values
        take = has & (col < window[:, None] + WINDOW)
        code = torch.where(take, slots_ext[at] | ((col - window[:, None]).clamp(0, WINDOW - 1) << 8), 0)
        step_codes.append(code[active])
        step_windows.append(window[active])
        step_groups.append(group_ids[active])
        nxt += take.long()
    if step_codes:
        group_of = torch.cat(step_groups)
        order = torch.sort(group_of, stable=True).indices  # iteration order within a group
        codes = torch.cat(step_codes)[order]
        windows = torch.cat(step_windows)[order]
        counts = torch.bincount(group_of, minlength=groups)
    else:
        codes = torch.zeros(0, ROWS, dtype=torch.int64, device=device)
        windows = torch.zeros(0, dtype=torch.int64, device=device)
        counts = torch.zeros(groups, dtype=torch.int64, device=device)
    group_ptr = torch.zeros(groups + 1, dtype=torch.int64, device=device)
    group_ptr[1:] = counts.cumsum(0)
    if group_ptr[-1] >= 2**31:
        raise ValueError("a sparse layer must pack into fewer than 2^31 steps")
    codes = torch.where(codes >= 1 << 15, codes - (1 << 16), codes).to(torch.int16)
    return codes.contiguous(), windows.to(torch.int32), group_ptr.to(torch.int32)


def _chunk_plan(steps: int, device) -> Tensor:
    """Step boundaries of work items of CHUNK_STEPS steps."""
    return torch.tensor(list(range(0, steps, CHUNK_STEPS)) + [steps], dtype=torch.int32,
                        device=device)


def _compress_weight(weight: Tensor, sparsity: float, bits: int):
    """Magnitude pruning to `sparsity` (fraction removed) then k-means weight sharing of the kept
    weights with 2^bits clusters: (mask, labels, codebook)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must lie in [1, 8], got {bits}")
    w = weight.detach().reshape(weight.shape[0], -1).float()
    keep = w.numel() - round(sparsity * w.numel())
    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    if keep > 0:
        mask[w.abs().reshape(-1).topk(keep).indices] = True
    mask = mask.view_as(w)
    # The weight-sharing stage's clustering (linear init keeps the rare large weights).
    kept = w[mask]
    if kept.numel() == 0:
        codebook = torch.zeros(1 << bits, dtype=torch.float32, device=w.device)
        kept_labels = torch.zeros(0, dtype=torch.int64, device=w.device)
    else:
        codebook, kept_labels = ops.kmeans1d(kept, min(1 << bits, kept.numel()), init="linear")
    labels = torch.zeros(w.shape, dtype=torch.int64, device=w.device)
    labels[mask] = kept_labels.long()
    return mask, labels, codebook.to(weight.dtype)


class _PackedModule(nn.Module):
    """Holds a PackedWeight as buffers (resized on load_state_dict) and `bits` as extra state."""

    def _init_empty(self, out_features: int, bits: int, bias: bool, dtype, device):
        """An all-pruned packed weight [out_features, _packed_in_features()] and a zero bias:
        the state a constructor leaves before load_state_dict or from_* fills it."""
        dtype = dtype or torch.get_default_dtype()
        mask = torch.zeros(out_features, self._packed_in_features(), dtype=torch.bool, device=device)
        codebook = torch.zeros(1 << bits, dtype=dtype, device=device)
        self._set_packed(pack(mask, torch.zeros_like(mask, dtype=torch.int64), codebook, bits,
                              dense=False))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    def _set_packed(self, p: PackedWeight):
        for name in _BUFFERS:
            self.register_buffer(name, getattr(p, name))
        self.bits = p.bits
        self.validate()

    def validate(self):
        """Run the kernel once with its checks on (RuntimeError on corrupted packed data), so that
        forward can skip them: on CUDA they cost a host sync per call."""
        if self.codes.is_meta:
            return
        x = torch.zeros(1, self._packed_in_features(), device=self.codes.device)
        self.packed.spqmm(x, check=True)

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(*(getattr(self, name) for name in _BUFFERS), self.out_features,
                            self._packed_in_features(), self.bits)

    def get_extra_state(self):
        return {"bits": self.bits}

    def set_extra_state(self, state):
        self.bits = int(state["bits"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Packed buffers differ in size from layer to layer: take the incoming ones as they are.
        for name in _BUFFERS:
            key = prefix + name
            if key in state_dict:
                old = getattr(self, name)
                setattr(self, name, torch.empty(state_dict[key].shape, dtype=state_dict[key].dtype,
                                                device=old.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.validate()

    def decoded_weight(self) -> Tensor:
        """The dense weight this layer stands for, codebook[labels] x mask, in the codebook dtype."""
        from dcx.reference import spqmm_weight

        p = self.packed
        w = spqmm_weight(p.codes, p.windows, p.group_ptr, p.codebook, p.out_features, p.in_features,
                         p.bits)
        return w.to(self.codebook.dtype)

    def _linear(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # The packed data was validated when set or loaded: no per-call check (no sync on CUDA).
        return self.packed.spqmm(x, bias, check=False)


class SparseQuantLinear(_PackedModule):
    """nn.Linear whose weight is pruned and weight-shared, run by dcx.ops.spqmm.

    Same forward as nn.Linear: x [..., in_features] -> [..., out_features] (float32, float16 or
    bfloat16). Build with `from_linear` (post-training: magnitude pruning + k-means), or
    `from_compressed` / `from_packed` (from the weight-sharing stage or a .dcx file). A plain
    constructor makes an all-pruned layer, to be filled by load_state_dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 5,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_empty(out_features, bits, bias, dtype, device)

    def _packed_in_features(self):
        return self.in_features

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: Optional[Tensor] = None):
        layer = cls(packed.in_features, packed.out_features, bias=bias is not None, bits=packed.bits,
                    device=packed.codes.device, dtype=packed.codebook.dtype)
        layer._set_packed(packed)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(packed.codebook.dtype).clone())
        return layer

    @classmethod
    def from_compressed(cls, mask: Tensor, labels: Tensor, codebook: Tensor,
                        bias: Optional[Tensor] = None, bits: Optional[int] = None,
                        dense: Optional[bool] = None):
        """From the weight-sharing stage: mask [out, in] (bool), labels [out, in] (int), codebook [k]."""
        return cls.from_packed(pack(mask, labels, codebook, bits, dense), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, sparsity: float = 0.0, bits: int = 5,
                    dense: Optional[bool] = None):
        """Post-training compression of an nn.Linear: prune the `sparsity` fraction of smallest
        weights, share the rest among 2^bits k-means centroids."""
        mask, labels, codebook = _compress_weight(linear.weight, sparsity, bits)
        return cls.from_compressed(mask, labels, codebook, linear.bias, bits, dense)

    def forward(self, x: Tensor) -> Tensor:
        return self._linear(x)

    def extra_repr(self):
        p = self.packed
        mode = "dense" if p.dense else f"sparse, nnz={p.codes.numel()}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, {mode}")


class SparseQuantConv2d(_PackedModule):
    """nn.Conv2d (groups=1, zero padding) with a packed weight: im2col (F.unfold) then spqmm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, bits: int = 5, device=None, dtype=None):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.out_features = out_channels
        self._init_empty(out_channels, bits, bias, dtype, device)

    def _packed_in_features(self):
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @classmethod
    def _like(cls, conv: nn.Conv2d, bits: int):
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SparseQuantConv2d supports groups=1, numeric zero padding only")
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                   conv.padding, conv.dilation, conv.bias is not None, bits,
                   conv.weight.device, conv.weight.dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, sparsity: float = 0.0, bits: int = 5,
                  dense: Optional[bool] = None):
        mask, labels, codebook = _compress_weight(conv.weight, sparsity, bits)
        return cls.from_compressed_like(conv, mask, labels, codebook, bits, dense)

    @classmethod
    def from_compressed_like(cls, conv: nn.Conv2d, mask, labels, codebook, bits=None, dense=None):
        """From (mask, labels, codebook) of conv's weight, reshaped or not to [out, in*kh*kw]."""
        layer = cls._like(conv, bits or _bits_for(codebook.numel()))
        n = conv.out_channels
        layer._set_packed(pack(mask.reshape(n, -1), labels.reshape(n, -1), codebook, bits, dense))
        if conv.bias is not None:
            layer.bias = nn.Parameter(conv.bias.detach().clone())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        b, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        y = self._linear(cols.transpose(1, 2))  # [b, L, out]
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        y = y.transpose(1, 2).reshape(b, self.out_channels, oh, ow)
        return y if batched else y.squeeze(0)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, bits={self.bits}")


def convert(model: nn.Module, sparsity: float = 0.0, bits: int = 5,
            include: Optional[str] = None, exclude: Optional[str] = None, conv: bool = False,
            dense: Optional[bool] = None) -> nn.Module:
    """Replace, in place, every nn.Linear (and nn.Conv2d with conv=True) of `model` whose
    qualified name matches `include` (a regex, re.search; None: all) and not `exclude` by its
    compressed twin (from_linear / from_conv with `sparsity` and `bits`). Returns `model`."""
    inc = re.compile(include) if include is not None else None
    exc = re.compile(exclude) if exclude is not None else None
    targets = []
    for name, module in model.named_modules():
        if not name or (inc and not inc.search(name)) or (exc and exc.search(name)):
            continue
        if type(module) is nn.Linear:
            targets.append((name, SparseQuantLinear.from_linear(module, sparsity, bits, dense)))
        elif conv and type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros" \
                and not isinstance(module.padding, str):
            targets.append((name, SparseQuantConv2d.from_conv(module, sparsity, bits, dense)))
    for name, new in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model
