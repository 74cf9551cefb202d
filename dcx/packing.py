"""The packed in-memory format of a compressed weight, the one place it is built: `pack` (from
(mask, labels, codebook)), `unpack` (back, through the kernels' decode), `PackedWeight` (the
tensors dcx.ops.spqmm reads). The layout and the kernels are described at the top of
csrc/core/spqmm.h; its constants are defined in csrc/core/spqmm_layout.h
(dcx._native.spqmm_layout() reads them). It knows no module: dcx.nn holds packed weights in
layers.
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from dcx import _native, ops

__all__ = ["PackedWeight", "PACKED_BUFFERS", "pack", "unpack", "DENSE_DENSITY", "CHUNK_STEPS"]

# Layers at or above this density are packed in dense mode (ids only, no positions). Sparse mode
# costs about 3.2 bytes per non-zero at 10% density (2 bytes a slot, 70% of the slots live) and
# 2.6 at 25%; on a Zen 4 CPU at batch 1 (4096x4096) it runs in 1.06 ms at 25% density against
# 1.26 ms for dense mode, and in 1.82 ms at 50% against 1.31 ms (benchmarks/results/spqmm-cpu.md).
DENSE_DENSITY = 0.3
# Steps per chunk (a work item of the CPU threads or of a GPU thread block): the packer's choice,
# the kernels read the chunk boundaries from the data.
CHUNK_STEPS = 1024


class PackedWeight(NamedTuple):
    # sparse mode: int16 [steps, rows per group]; dense mode: uint8 [out_features, width], the ids
    # at about bits / 8 bytes each: two per byte up to 4 bits, bit-packed from 5 to 7, one per
    # byte at 8 (the layouts are at the end of csrc/core/spqmm_layout.h)
    codes: Tensor
    windows: Tensor  # int32 [steps]: first column of each step's window (empty in dense mode)
    group_ptr: Tensor  # int32 [ceil(out_features / 16) + 1] (empty in dense mode)
    chunks: Tensor  # int32 [num_chunks + 1] (empty in dense mode)
    codebook: Tensor  # [<= 2^bits]
    out_features: int
    in_features: int
    bits: int
    # columns per scale group of a group-scaled codebook (0: none); in sparse mode every step's
    # window lies inside one group (window % group_size + 32 <= group_size)
    group_size: int = 0

    @property
    def dense(self) -> bool:
        return self.codes.dtype == torch.uint8

    def nbytes(self) -> int:
        """Bytes the kernel reads for the weight (codes, pointers, codebook)."""
        return sum(t.numel() * t.element_size() for t in self[:5])

    def to(self, device) -> "PackedWeight":
        """The same packed weight with its tensors on `device`."""
        return self._replace(**{name: getattr(self, name).to(device) for name in PACKED_BUFFERS})

    def spqmm(self, x: Tensor, bias: Optional[Tensor] = None, check: bool = True,
              crossover: int = -1, compute: str = "auto", scale: Optional[Tensor] = None) -> Tensor:
        """x W^T + bias through dcx.ops.spqmm (scale: the row scales, or with group_size the
        group scales, of a scaled codebook)."""
        return ops.spqmm(x, self.codes, self.windows, self.group_ptr, self.chunks, self.codebook,
                         self.out_features, self.in_features, self.bits, bias, crossover, check,
                         compute, scale, self.group_size if scale is not None else 0)

    def spqmm_int8(self, x: Tensor, bias: Optional[Tensor] = None, check: bool = True,
                   scale: Optional[Tensor] = None) -> Tensor:
        """x W^T + bias through dcx.ops.spqmm_int8 (dense mode only; int8 arithmetic)."""
        return ops.spqmm_int8(x, self.codes, self.codebook, self.out_features, self.in_features,
                              self.bits, bias, check, scale,
                              self.group_size if scale is not None else 0)


# The tensors of a PackedWeight (SparseQuantLinear's buffers).
PACKED_BUFFERS = PackedWeight._fields[:5]


def as_dtype(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """t in dtype; t itself (no call into torch) when it is None or already is. A forward runs
    this a few times per layer, where a no-op .to() costs about as much as a small kernel."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def bits_for(k: int) -> int:
    return max(1, math.ceil(math.log2(k))) if k > 1 else 1


def pack(
    mask: Tensor,
    labels: Tensor,
    codebook: Tensor,
    bits: Optional[int] = None,
    dense: Optional[bool] = None,
    group_size: int = 0,
) -> PackedWeight:
    """Pack a weight-shared layer W = codebook[labels] * mask ([out, in]) for dcx.ops.spqmm.

    mask: bool/uint8 [out, in] (0 = pruned); labels: int [out, in], in [0, k) where mask is set
    (pruned positions may hold anything); codebook: float [k], k <= 256. bits: width of an id
    (default: the fewest that hold k ids). dense: force dense mode (codes only) or sparse mode;
    default: dense from DENSE_DENSITY on. group_size: the columns per scale group of a
    group-scaled codebook (a multiple of 32; 0: none), whose scales the caller passes to spqmm:
    sparse mode then keeps each step's window inside one group. Raises ValueError on inconsistent
    input, so the packed data the kernels read is valid by construction.
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
    bits = bits_for(k) if bits is None else int(bits)
    if not 1 <= bits <= 8 or k > (1 << bits):
        raise ValueError(f"bits must lie in [1, 8] and hold the {k} codebook ids, got {bits}")
    if group_size < 0 or group_size % 32:
        raise ValueError(f"group_size must be 0 or a positive multiple of 32, got {group_size}")
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
    layout = _native.spqmm_layout()
    if dense is None:
        dense = dense_by_density(mask)
    empty = torch.zeros(0, dtype=torch.int32, device=device)

    if dense:
        with_zero = dense_ids(mask, labels, codebook, bits)
        if with_zero is None:  # no id is left for the pruned positions
            return pack(mask, labels, codebook, bits, dense=False, group_size=group_size)
        ids, codebook, bits = with_zero
        if bits <= 4:
            ids = _pack_nibbles(ids, layout["nibble_block"])
        elif bits < 8:
            ids = _pack_bits(ids, bits, layout["bit_block"])
        return PackedWeight(ids.contiguous(), empty, empty, empty, codebook, n, K, bits, group_size)

    if nnz >= 2**31:
        raise ValueError(f"a sparse layer must have fewer than 2^31 non-zeros, got {nnz}")
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: each row's columns ascending
    slots = (1 << layout["live_bit"]) | labels[rows, cols].long()  # the offset is added below
    codes, windows, group_ptr = _fill_steps(rows, cols, slots, n, layout, group_size)
    return PackedWeight(codes, windows, group_ptr, _chunk_plan(windows.numel(), device), codebook, n, K,
                        bits, group_size)


def dense_by_density(mask: Tensor) -> bool:
    """pack's default mode for a weight with this mask: dense from DENSE_DENSITY kept on."""
    return mask.numel() > 0 and int(mask.sum()) >= DENSE_DENSITY * mask.numel()


def can_pack_dense(mask: Tensor, codebook: Tensor, bits: int) -> bool:
    """Whether dense mode has an id for every position of this weight (dense_ids is not None):
    False only for a pruned weight whose full 256-entry codebook holds no zero."""
    return bool(mask.all()) or bits < 8 or codebook.numel() < 256 or bool((codebook == 0).any())


def dense_ids(mask: Tensor, labels: Tensor, codebook: Tensor, bits: int):
    """(uint8 ids, codebook, bits) of a weight-shared layer with an id at every position: pruned
    positions take an id that decodes to exactly 0 (a zero entry of the codebook, or one added,
    which may take one more bit); None when a full 256-entry codebook leaves no id for them."""
    ids = labels.to(torch.uint8)  # ids < 256 where mask is set; pruned ones are set below
    if bool(mask.all()):
        return ids, codebook, bits
    if not can_pack_dense(mask, codebook, bits):
        return None
    k = codebook.numel()
    zero = (codebook == 0).nonzero()
    if zero.numel():
        zero_id = int(zero[0, 0])
    else:
        zero_id, bits = k, max(bits, bits_for(k + 1))
        codebook = torch.cat([codebook, codebook.new_zeros(1)])
    ids[~mask] = zero_id
    return ids, codebook, bits


def _pack_nibbles(ids: Tensor, block: int) -> Tensor:
    """Dense mode with ids of up to 4 bits: two per byte, [N, ceil(K / block) * block / 2]. A block
    of 128 columns is 16 little-endian 32-bit words; nibble t of word d holds column 16 t + d, so
    shifts and masks of one 64-byte vector give 8 vectors of 16 consecutive columns' ids."""
    n, k = ids.shape
    blocks = -(-k // block)
    padded = ids.new_zeros(n, blocks * block)
    padded[:, :k] = ids
    words = block // 8
    nibbles = padded.view(n, blocks, 8, words).transpose(2, 3)  # [n, block, word d, nibble t]
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).reshape(n, blocks * block // 2)


def _pack_bits(ids: Tensor, bits: int, block: int) -> Tensor:
    """Dense mode with ids of 5 to 7 bits, bit-packed: [N, ceil(K / block) * block / 8 * bits];
    column j of a row is bits [j * bits, (j + 1) * bits) of the row's little-endian bit stream
    (csrc/core/spqmm_layout.h). Rows are packed a slice at a time (the bit expansion takes 8x
    the ids' bytes)."""
    n, k = ids.shape
    width = -(-k // block) * block
    out = ids.new_zeros(n, width // 8 * bits)
    shifts = torch.arange(bits, device=ids.device, dtype=torch.uint8)
    weights = (1 << torch.arange(8, device=ids.device, dtype=torch.int32)).to(torch.int32)
    step = max(1, (1 << 22) // max(width * bits, 1))
    for r0 in range(0, n, step):
        part = ids.new_zeros(min(step, n - r0), width)
        part[:, :k] = ids[r0:r0 + step]
        stream = ((part.unsqueeze(-1) >> shifts) & 1).reshape(part.shape[0], -1, 8)  # LSB first
        out[r0:r0 + step] = (stream.to(torch.int32) * weights).sum(-1).to(torch.uint8)
    return out


def _fill_steps(rows: Tensor, cols: Tensor, slots: Tensor, n: int, layout: dict, group_size: int = 0):
    """Lay out each group of layout["rows"] rows as steps (csrc/core/spqmm.h): a step's window
    begins at the smallest next column of the group's rows (with scale groups, no later than
    where its 32 columns still end inside that column's group), and each row whose next weight
    lies within the window puts it in the step. All groups advance together, one step per
    iteration."""
    ROWS, WINDOW, shift = layout["rows"], layout["window"], layout["offset_shift"]
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
        if group_size:
            window = torch.minimum(window, window // group_size * group_size + group_size - WINDOW)
        take = has & (col < window[:, None] + WINDOW)
        offset = (col - window[:, None]).clamp(0, WINDOW - 1)
        code = torch.where(take, slots_ext[at] | (offset << shift), 0)
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
    codes = torch.where(codes >= 1 << 15, codes - (1 << 16), codes).to(torch.int16)  # as int16
    return codes.contiguous(), windows.to(torch.int32), group_ptr.to(torch.int32)


def _chunk_plan(steps: int, device) -> Tensor:
    """Step boundaries of work items of CHUNK_STEPS steps."""
    return torch.tensor(list(range(0, steps, CHUNK_STEPS)) + [steps], dtype=torch.int32,
                        device=device)


def unpack(packed: PackedWeight) -> tuple[Tensor, Tensor]:
    """(mask, labels) of a packed weight, [out_features, in_features]: the inverse of pack (in
    dense mode, positions whose id decodes to exactly zero count as pruned). The kernels decode
    it (dcx.ops.spqmm_decode) with the codebook 1, 2, ..., k in float32: each kept position
    reads its id + 1 exactly, each pruned one 0."""
    p = packed
    numbers = torch.arange(1, p.codebook.numel() + 1, dtype=torch.float32, device=p.codes.device)
    ids = ops.spqmm_decode(p.codes, p.windows, p.group_ptr, p.chunks, numbers, p.out_features,
                           p.in_features, p.bits).long() - 1
    kept = p.codebook[ids.clamp(min=0)] != 0 if p.dense else ids >= 0
    return kept, torch.where(kept, ids, torch.zeros_like(ids))
