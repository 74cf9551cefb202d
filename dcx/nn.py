"""Compressed layers that run on the packed sparse-quantized format: SparseQuantLinear (a drop-in
nn.Linear), SparseQuantConv2d, `pack` (the one place the in-memory format is built, from
(mask, labels, codebook)), `pack_layers_` (every shared layer of a model that a packed twin can
run, swapped for it: what dcx.load and convert do) and `convert` (post-training compression of
any model's Linear / Conv2d layers through the stage verbs).

The format and the kernels are described at the top of csrc/core/spqmm.h; its constants come from
there (dcx._native.spqmm_layout()).
"""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcx import _native, ops, state
from dcx.config import ClusterConfig, PruneConfig, check_overrides, resolve_overrides

__all__ = ["PackedWeight", "pack", "unpack", "packable", "pack_layers_", "COMPUTE_MODES",
           "SparseQuantLinear",
           "SparseQuantConv2d", "SparseQuantEmbedding", "convert", "ConvertRow"]

# Layers at or above this density are packed in dense mode (ids only, no positions). Sparse mode
# costs about 3.2 bytes per non-zero at 10% density (2 bytes a slot, 70% of the slots live) and
# 2.6 at 25%; on a Zen 4 CPU at batch 1 (4096x4096) it runs in 1.06 ms at 25% density against
# 1.26 ms for dense mode, and in 1.82 ms at 50% against 1.31 ms (benchmarks/results/spqmm-cpu.md).
DENSE_DENSITY = 0.3
# Steps per chunk (a work item of the CPU threads or of a GPU thread block): the packer's choice,
# the kernels read the chunk boundaries from the data.
CHUNK_STEPS = 1024
# What a packed layer computes in (its `compute`): "auto" follows the activations' dtype;
# "float32" and "bfloat16" run the op on activations cast to that dtype (fp32 accumulation
# either way; past the crossover bfloat16 runs a bf16 GEMM on the decoded weight, the fastest
# path on CPUs with AVX512-BF16 or AMX) and cast the result back. "int8" (opt-in) runs a
# dense-mode layer through dcx.ops.spqmm_int8 (activations quantized to int8 per row in blocks of
# 32, an int16 codebook, int32 dot products; about 1e-2 relative error per output);
# a sparse-mode layer computes in float32 there (its kernel already reads about 0.3 byte per
# weight, and int8 would only add error), and so does any layer from INT8_ROWS rows of
# activations on, where decoding the weight once for the fp32 GEMM is faster than the int8
# kernel (on a CPU without VNNI its dot products cost as much as fp32 FMAs).
COMPUTE_MODES = ("auto", "float32", "bfloat16", "int8")
INT8_ROWS = 16
# The activations' dtype of each mode's spqmm path ("int8": the layers it leaves to spqmm).
_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.float32}


def _check_compute(compute):
    if compute not in COMPUTE_MODES:
        raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
    return compute


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
                         _as_dtype(self.codebook, x.dtype), self.out_features, self.in_features,
                         self.bits, bias, crossover, check)

    def spqmm_int8(self, x: Tensor, bias: Optional[Tensor] = None, check: bool = True) -> Tensor:
        """x W^T + bias through dcx.ops.spqmm_int8 (dense mode only; int8 arithmetic)."""
        return ops.spqmm_int8(x, self.codes, _as_dtype(self.codebook, x.dtype), self.out_features,
                              self.in_features, self.bits, bias, check)


# The tensors of a PackedWeight (SparseQuantLinear's buffers).
_BUFFERS = PackedWeight._fields[:5]


def _as_dtype(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """t in dtype; t itself (no call into torch) when it is None or already is. A forward runs
    this a few times per layer, where a no-op .to() costs about as much as a small kernel."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


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
    layout = _native.spqmm_layout()
    if dense is None:
        dense = n * K > 0 and nnz >= DENSE_DENSITY * n * K
    empty = torch.zeros(0, dtype=torch.int32, device=device)

    if dense:
        dense_ids = _dense_ids(mask, labels, codebook, bits)
        if dense_ids is None:  # no id is left for the pruned positions
            return pack(mask, labels, codebook, bits, dense=False)
        ids, codebook, bits = dense_ids
        if bits <= 4:
            ids = _pack_nibbles(ids, layout["nibble_block"])
        elif bits < 8:
            ids = _pack_bits(ids, bits, layout["bit_block"])
        return PackedWeight(ids.contiguous(), empty, empty, empty, codebook, n, K, bits)

    if nnz >= 2**31:
        raise ValueError(f"a sparse layer must have fewer than 2^31 non-zeros, got {nnz}")
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: each row's columns ascending
    slots = (1 << layout["live_bit"]) | labels[rows, cols].long()  # the offset is added below
    codes, windows, group_ptr = _fill_steps(rows, cols, slots, n, layout)
    return PackedWeight(codes, windows, group_ptr, _chunk_plan(windows.numel(), device), codebook, n, K,
                        bits)


def _dense_ids(mask: Tensor, labels: Tensor, codebook: Tensor, bits: int):
    """(uint8 ids, codebook, bits) of a weight-shared layer with an id at every position: pruned
    positions take an id that decodes to exactly 0 (a zero entry of the codebook, or one added,
    which may take one more bit); None when a full 256-entry codebook leaves no id for them."""
    ids = labels.to(torch.uint8)  # ids < 256 where mask is set; pruned ones are set below
    if bool(mask.all()):
        return ids, codebook, bits
    k = codebook.numel()
    zero = (codebook == 0).nonzero()
    if zero.numel():
        zero_id = int(zero[0, 0])
    elif k < (1 << bits) or bits < 8:
        zero_id, bits = k, max(bits, _bits_for(k + 1))
        codebook = torch.cat([codebook, codebook.new_zeros(1)])
    else:
        return None
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


def _fill_steps(rows: Tensor, cols: Tensor, slots: Tensor, n: int, layout: dict):
    """Lay out each group of layout["rows"] rows as steps (csrc/core/spqmm.h): a step's window
    begins at the smallest next column of the group's rows, and each row whose next weight lies
    within the window puts it in the step. All groups advance together, one step per iteration."""
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
    dense mode, positions whose id decodes to exactly zero count as pruned)."""
    from dcx.reference import spqmm_ids

    p = packed
    kept, ids = spqmm_ids(p.codes, p.windows, p.group_ptr, p.out_features, p.in_features, p.bits)
    if p.dense:
        kept = p.codebook[ids] != 0
    return kept, torch.where(kept, ids, torch.zeros_like(ids))


def _compress_layer(weight: Tensor, sparsity: float, bits: int):
    """Post-training compression of one weight as the stages do it (dcx.prune.compute_mask, then
    dcx.quantize.cluster_values with linear init): (mask, labels, codebook) of the weight viewed as
    [out, -1]."""
    from dcx.prune import compute_mask
    from dcx.quantize import cluster_values

    if not 1 <= bits <= 8:
        raise ValueError(f"bits must lie in [1, 8], got {bits}")
    w = weight.detach().reshape(weight.shape[0], -1)
    mask = compute_mask(w, "element", sparsity=sparsity)
    codebook, kept = cluster_values(w[mask], ClusterConfig(linear_bits=bits).layer_fields(False))
    labels = torch.zeros(w.shape, dtype=torch.int64, device=w.device)
    labels[mask] = kept.long().to(w.device)
    return mask, labels, codebook.to(weight.dtype)


class _PackedModule(nn.Module):
    """Holds a PackedWeight as buffers (resized on load_state_dict) and `bits` and `compute` as
    extra state, and hands its compressed state back to dcx.state (`layer_state`)."""

    is_conv = False
    _compute = "auto"

    @property
    def compute(self) -> str:
        """What the layer computes in: one of COMPUTE_MODES (settable on a built layer)."""
        return self._compute

    @compute.setter
    def compute(self, value: str):
        self._compute = _check_compute(value)

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
        buffers = self._buffers  # not Module.__getattr__: this runs on every forward
        return PackedWeight(*(buffers[name] for name in _BUFFERS), self.out_features,
                            self._packed_in_features(), self.bits)

    def get_extra_state(self):
        return {"bits": self.bits, "compute": self.compute}

    def set_extra_state(self, extra):
        self.bits = int(extra["bits"])
        self.compute = extra.get("compute", "auto")

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

    def load_compressed(self, mask: Tensor, labels: Tensor, codebook: Tensor, bits: int):
        """Repack from (mask, labels, codebook) of the weight this layer stands for (a file's
        record, as dcx.load meets a packed layer in the model it fills)."""
        device, n = self.codes.device, self.out_features
        self._set_packed(pack(mask.to(device).reshape(n, -1), labels.to(device).reshape(n, -1),
                              codebook.to(device, self.codebook.dtype), bits))

    def layer_state(self, module_name: str = "") -> state.LayerState:
        """The compressed state this layer holds packed (dcx.state reads it here): mask, labels
        and codebook in the shape of the weight it stands for."""
        mask, labels = unpack(self.packed)
        shape = self.weight_shape
        keys = tuple(k for k in self.state_dict(keep_vars=True) if k != "bias")
        return state.LayerState(module_name, "weight", self, mask.reshape(shape), self.codebook,
                                labels.reshape(shape).to(torch.int32), self.bits, None, keys,
                                packed=True, conv=self.is_conv)

    @property
    def weight(self) -> Tensor:
        """The dense weight this layer stands for, in the plain layer's shape (decoded on each
        access: for code that reads a layer's weight; forward never does)."""
        return self.decoded_weight().reshape(self.weight_shape)

    def decoded_weight(self) -> Tensor:
        """The dense weight this layer stands for, codebook[labels] x mask, [out_features,
        in_features] in the codebook dtype."""
        mask, labels = unpack(self.packed)
        return torch.where(mask, self.codebook[labels], torch.zeros((), dtype=self.codebook.dtype))

    def _linear(self, x: Tensor) -> Tensor:
        packed = self.packed
        # The packed data was validated when set or loaded: no per-call check (no sync on CUDA).
        if self.compute == "int8" and packed.dense and x.numel() < INT8_ROWS * x.shape[-1]:
            return packed.spqmm_int8(x, _as_dtype(self.bias, x.dtype), check=False)
        dtype = _COMPUTE_DTYPES.get(self.compute, x.dtype)
        y = packed.spqmm(_as_dtype(x, dtype), _as_dtype(self.bias, dtype), check=False)
        return _as_dtype(y, x.dtype)


class SparseQuantLinear(_PackedModule):
    """nn.Linear whose weight is pruned and weight-shared, run by dcx.ops.spqmm.

    Same forward as nn.Linear: x [..., in_features] -> [..., out_features] (float32, float16 or
    bfloat16). Build with `from_linear` (post-training: magnitude pruning + k-means),
    `from_state` (a layer the stages compressed), or `from_compressed` / `from_packed`. A plain
    constructor makes an all-pruned layer, to be filled by load_state_dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 5,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_empty(out_features, bits, bias, dtype, device)

    def _packed_in_features(self):
        return self.in_features

    @property
    def weight_shape(self):
        return (self.out_features, self.in_features)

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
        """From mask [out, in] (bool), labels [out, in] (int) and codebook [k]."""
        return cls.from_packed(pack(mask, labels, codebook, bits, dense), bias)

    @classmethod
    def from_state(cls, st: state.LayerState, dense: Optional[bool] = None):
        """The packed twin of an nn.Linear whose weight the stages shared (dcx.state)."""
        mask = st.mask if st.mask is not None else torch.ones_like(st.labels, dtype=torch.bool)
        return cls.from_compressed(mask, st.labels, st.codebook.detach(), st.module.bias, st.bits,
                                   dense)

    @classmethod
    def from_linear(cls, linear: nn.Linear, sparsity: float = 0.0, bits: int = 5,
                    dense: Optional[bool] = None, compute: str = "auto"):
        """Post-training compression of an nn.Linear: prune the `sparsity` fraction of smallest
        weights, share the rest among 2^bits k-means centroids; `compute` as COMPUTE_MODES."""
        _check_compute(compute)
        mask, labels, codebook = _compress_layer(linear.weight, sparsity, bits)
        layer = cls.from_compressed(mask, labels, codebook, linear.bias, bits, dense)
        layer.compute = compute
        return layer

    def forward(self, x: Tensor) -> Tensor:
        return self._linear(x)

    def extra_repr(self):
        p = self.packed
        mode = "dense" if p.dense else f"sparse, nnz={p.codes.numel()}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, {mode}")


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _conv_pads(padding, kernel_size, dilation) -> tuple:
    """F.pad amounts (left, right, top, bottom) of a 2-D convolution's padding, as nn.Conv2d
    computes them: "same" puts the odd one of d (k - 1) on the right and bottom."""
    pads = []
    for i in (1, 0):  # F.pad lists the last dimension first
        if padding == "valid":
            pads += [0, 0]
        elif padding == "same":
            total = dilation[i] * (kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
        else:
            pads += [padding[i], padding[i]]
    return tuple(pads)


class SparseQuantConv2d(_PackedModule):
    """nn.Conv2d (groups=1; numeric, "same" or "valid" padding in any padding_mode) with a packed
    weight: pad, im2col (F.unfold), then spqmm."""

    is_conv = True

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, bits: int = 5, padding_mode: str = "zeros",
                 device=None, dtype=None):
        super().__init__()
        pair = nn.modules.utils._pair
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be a number, a pair, 'same' or 'valid', got "
                                 f"{padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' needs stride 1, as in nn.Conv2d")
            self.padding = padding
        else:
            self.padding = pair(padding)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        self._pads = _conv_pads(self.padding, self.kernel_size, self.dilation)
        self.out_features = out_channels
        self._init_empty(out_channels, bits, bias, dtype, device)

    def _packed_in_features(self):
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @property
    def weight_shape(self):
        return (self.out_channels, self.in_channels, *self.kernel_size)

    @classmethod
    def _like(cls, conv: nn.Conv2d, bits: int):
        reason = packable(conv)
        if reason is not None:
            raise ValueError(f"SparseQuantConv2d cannot run this layer: {reason}")
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                   conv.padding, conv.dilation, conv.bias is not None, bits, conv.padding_mode,
                   conv.weight.device, conv.weight.dtype)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, sparsity: float = 0.0, bits: int = 5,
                  dense: Optional[bool] = None, compute: str = "auto"):
        _check_compute(compute)
        mask, labels, codebook = _compress_layer(conv.weight, sparsity, bits)
        layer = cls.from_compressed_like(conv, mask, labels, codebook, bits, dense)
        layer.compute = compute
        return layer

    @classmethod
    def from_compressed_like(cls, conv: nn.Conv2d, mask, labels, codebook, bits=None, dense=None):
        """From (mask, labels, codebook) of conv's weight, reshaped or not to [out, in*kh*kw]."""
        layer = cls._like(conv, bits or _bits_for(codebook.numel()))
        n = conv.out_channels
        layer._set_packed(pack(mask.reshape(n, -1), labels.reshape(n, -1), codebook, bits, dense))
        if conv.bias is not None:
            layer.bias = nn.Parameter(conv.bias.detach().clone())
        return layer

    @classmethod
    def from_state(cls, st: state.LayerState, dense: Optional[bool] = None):
        """The packed twin of an nn.Conv2d whose weight the stages shared (dcx.state)."""
        mask = st.mask if st.mask is not None else torch.ones_like(st.labels, dtype=torch.bool)
        return cls.from_compressed_like(st.module, mask, st.labels, st.codebook.detach(), st.bits,
                                        dense)

    def forward(self, x: Tensor) -> Tensor:
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        left, right, top, bottom = self._pads
        if self.padding_mode == "zeros" and left == right and top == bottom:
            padding = (top, left)  # symmetric zeros: unfold pads by itself
        else:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x, padding = F.pad(x, self._pads, mode=mode), (0, 0)
        b, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, padding, self.stride)
        y = self._linear(cols.transpose(1, 2))  # [b, L, out]
        (kh, kw), (dh, dw), (sh, sw) = self.kernel_size, self.dilation, self.stride
        oh = (h + 2 * padding[0] - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * padding[1] - dw * (kw - 1) - 1) // sw + 1
        y = y.transpose(1, 2).reshape(b, self.out_channels, oh, ow)
        return y if batched else y.squeeze(0)

    def extra_repr(self):
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}{mode}, bits={self.bits}")


class SparseQuantEmbedding(nn.Module):
    """nn.Embedding whose table is weight-shared (and maybe pruned): one uint8 codebook id per
    entry (4x fewer bytes than fp32) and the codebook. Same forward as nn.Embedding: an index
    tensor of any shape -> [..., embedding_dim]; a lookup decodes only the rows it returns
    (codebook[ids[input]]). padding_idx is kept (it only shapes gradients, and this layer has
    none to train); max_norm is refused, since it rewrites the table in place.
    Build with `from_embedding` (post-training), `from_state` (a layer the stages shared), or a
    plain constructor filled by load_state_dict."""

    is_conv = False

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 bits: int = 5, device=None, dtype=None):
        super().__init__()
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx must lie in [-{num_embeddings}, {num_embeddings}), "
                                 f"got {padding_idx}")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim, self.padding_idx = (num_embeddings,
                                                                    embedding_dim, padding_idx)
        self.bits = bits
        self.register_buffer("ids", torch.zeros(num_embeddings, embedding_dim, dtype=torch.uint8,
                                                device=device))
        self.register_buffer("codebook", torch.zeros(1 << bits, dtype=dtype or torch.get_default_dtype(),
                                                     device=device))

    @property
    def weight_shape(self):
        return (self.num_embeddings, self.embedding_dim)

    def load_compressed(self, mask: Tensor, labels: Tensor, codebook: Tensor, bits: int):
        """Set the table from (mask, labels, codebook) of the weight it stands for."""
        device = self.ids.device
        dense = _dense_ids(mask.to(device).bool(), labels.to(device), codebook.to(device), bits)
        if dense is None:
            raise ValueError("a pruned table with a full 256-entry codebook leaves no id for the "
                             "pruned entries: share it with 7 bits or fewer")
        ids, codebook, bits = dense
        self.ids, self.codebook, self.bits = ids.contiguous(), codebook.to(self.codebook.dtype), bits

    @classmethod
    def _like(cls, embedding: nn.Embedding, bits: int):
        reason = packable(embedding)
        if reason is not None:
            raise ValueError(f"SparseQuantEmbedding cannot run this layer: {reason}")
        w = embedding.weight
        return cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, bits,
                   w.device, w.dtype)

    @classmethod
    def from_state(cls, st: state.LayerState, dense: Optional[bool] = None):
        """The packed twin of an nn.Embedding whose table the stages shared (dcx.state)."""
        layer = cls._like(st.module, st.bits)
        mask = st.mask if st.mask is not None else torch.ones_like(st.labels, dtype=torch.bool)
        layer.load_compressed(mask, st.labels, st.codebook.detach(), st.bits)
        return layer

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, sparsity: float = 0.0, bits: int = 5):
        """Post-training compression: prune the `sparsity` fraction of smallest entries, share
        the rest among 2^bits k-means centroids."""
        layer = cls._like(embedding, bits)
        layer.load_compressed(*_compress_layer(embedding.weight, sparsity, bits), bits)
        return layer

    def forward(self, input: Tensor) -> Tensor:
        return self.codebook[self.ids[input].long()]

    @property
    def weight(self) -> Tensor:
        """The dense table this layer stands for (decoded on each access: for code that reads a
        layer's weight; forward never does)."""
        return self.codebook[self.ids.long()]

    def layer_state(self, module_name: str = "") -> state.LayerState:
        ids = self.ids.long()
        keys = tuple(k for k in self.state_dict(keep_vars=True))
        return state.LayerState(module_name, "weight", self, self.codebook[ids] != 0, self.codebook,
                                ids.to(torch.int32), self.bits, None, keys, packed=True)

    def get_extra_state(self):
        return {"bits": self.bits}

    def set_extra_state(self, extra):
        self.bits = int(extra["bits"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "codebook"  # the codebook's size follows the bits
        if key in state_dict:
            self.codebook = torch.empty_like(state_dict[key], device=self.codebook.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, bits={self.bits}"


# ---------------------------------------------------------------------------------------------
# Models


def packable(module: nn.Module) -> Optional[str]:
    """None when a packed twin (SparseQuantLinear / SparseQuantConv2d) computes what `module`
    computes; otherwise the reason it cannot, for messages and reports. A subclass qualifies
    when it keeps the plain layer's forward."""
    kind = type(module).__name__
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "nn.MultiheadAttention reads this layer's weight directly"
    if isinstance(module, nn.Linear):
        if type(module).forward is not nn.Linear.forward:
            return f"{kind} overrides nn.Linear.forward"
        return None
    if isinstance(module, nn.Conv2d):
        if (type(module).forward is not nn.Conv2d.forward
                or type(module)._conv_forward is not nn.Conv2d._conv_forward):
            return f"{kind} overrides nn.Conv2d's forward"
        if module.groups != 1:
            return f"groups={module.groups} (SparseQuantConv2d runs groups=1)"
        return None
    if isinstance(module, nn.Embedding):
        if type(module).forward is not nn.Embedding.forward:
            return f"{kind} overrides nn.Embedding.forward"
        if module.max_norm is not None:
            return "max_norm renormalises the table in place"
        return None
    return f"{kind} has no packed twin"


def _twin(module: nn.Module):
    if isinstance(module, nn.Embedding):
        return SparseQuantEmbedding
    return SparseQuantConv2d if isinstance(module, nn.Conv2d) else SparseQuantLinear


def _replace_modules(model: nn.Module, new: dict) -> None:
    """Swap every occurrence of the modules {id(old): new} inside `model`."""
    if id(model) in new:
        raise ValueError("the model itself is a layer to replace: wrap it in a container")
    for _, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new:
                parent._modules[child_name] = new[id(child)]


def pack_layers_(model: nn.Module, names=None, dense: Optional[bool] = None,
                 compute: str = "auto") -> nn.Module:
    """Swap every weight-shared layer of `model` (dcx.state) that a packed twin can run
    (`packable`) for that twin: nn.Linear -> SparseQuantLinear, nn.Conv2d -> SparseQuantConv2d,
    nn.Embedding -> SparseQuantEmbedding, built from the layer's mask, labels and codebook.
    names: only these modules. dense: force the packed mode (default: dense from DENSE_DENSITY
    on). compute: the new Linear / Conv2d layers' compute mode (COMPUTE_MODES). Other layers
    stay as they are. Returns the model."""
    _check_compute(compute)
    new = {}
    for st in state.layers(model).values():
        if (not st.shared or st.packed or st.param != "weight"
                or (names is not None and st.module_name not in names)
                or packable(st.module) is not None):
            continue
        layer = _twin(st.module).from_state(st, dense)
        if isinstance(layer, _PackedModule):
            layer.compute = compute
        new[id(st.module)] = layer
    _replace_modules(model, new)
    return model


class ConvertRow(NamedTuple):
    """What convert did with one layer that has a weight of two or more dimensions."""

    name: str
    kind: str  # the module's class name
    shape: tuple
    action: str  # "packed" (a SparseQuant* layer), "shared" (its decoded weight kept), "dense"
    bits: Optional[int]
    sparsity: float
    reason: str  # why it is not packed, or not compressed at all ("" when packed)


def convert(model: nn.Module, sparsity: float = 0.0, bits: int = 5, overrides=None,
            include=None, exclude=None, conv: bool = True, embeddings: bool = True,
            dense: Optional[bool] = None, compute: str = "auto", progress: bool = False,
            report: Optional[list] = None) -> nn.Module:
    """Post-training compression, in place: every nn.Linear of `model` (and every convolution
    with conv=True, every nn.Embedding with embeddings=True, subclasses included) is pruned to
    `sparsity` by magnitude (dcx.prune_), its surviving weights shared among 2^bits k-means
    centroids (dcx.cluster_), and, where a packed twin computes what it computes (`packable`),
    swapped for SparseQuantLinear / SparseQuantConv2d / SparseQuantEmbedding (pack_layers_). A
    layer without one (a grouped convolution, a subclass with its own forward) keeps its decoded
    weight and its shared state, so dcx.save still stores it as codes. Returns the model.

    overrides: {pattern: {"sparsity": s, "bits": b} or None} by the rule of dcx.config (exact
    module name, else the first "re:" pattern matching the whole name; None leaves the layer
    alone). include / exclude: lists of patterns by the same rule, sugar for leaving out every
    other layer / these layers. A pattern that selects no layer is an error. compute: the packed
    Linear / Conv2d layers' compute mode (COMPUTE_MODES). progress: a bar over the layers.
    report: a list that gets one ConvertRow per layer with a weight of two or more dimensions,
    the ones left dense included, each with its reason.
    """
    _check_compute(compute)
    overrides = check_overrides(overrides or {}, "convert", _check_convert_layer)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must lie in [1, 8], got {bits}")
    kinds = (nn.Linear,) + ((nn.modules.conv._ConvNd,) if conv else ()) \
        + ((nn.Embedding,) if embeddings else ())
    owners = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for param_name, p in m._parameters.items():
            if p is not None:
                owners.setdefault(id(p), set()).add(f"{name}.{param_name}" if name else param_name)
    rows, layers = {}, {}  # layers: the ones convert may compress, with their names for patterns
    for name, m in model.named_modules():
        weight = m._parameters.get("weight")
        if not name or weight is None or weight.dim() < 2 or hasattr(m, "layer_state"):
            continue
        st = state.get(m)
        row = ConvertRow(name, type(m).__name__, tuple(weight.shape), "dense", None, 0.0, "")
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)):
            rows[name] = row._replace(reason="not a Linear, convolution or embedding")
        elif not isinstance(m, kinds):
            rows[name] = row._replace(reason="convolutions left out (conv=False)"
                                      if isinstance(m, nn.modules.conv._ConvNd)
                                      else "embeddings left out (embeddings=False)")
        elif st is not None and st.shared:
            rows[name] = row._replace(action="shared", reason="already shared")
        elif len(owners.get(id(weight), ())) > 1:
            rows[name] = row._replace(reason=f"weight tied to {sorted(owners[id(weight)])}")
        else:
            rows[name] = row
            layers[name] = [name, f"{name}.weight"]
    known = [n for n, _ in model.named_modules()]

    def selected(patterns, where):
        if isinstance(patterns, str):
            patterns = [patterns]
        return set(resolve_overrides({p: True for p in patterns}, layers, where, known))

    chosen = set(layers)
    if include is not None:
        chosen &= selected(include, "convert include")
    if exclude is not None:
        chosen -= selected(exclude, "convert exclude")
    settings = resolve_overrides(overrides, layers, "convert", known)
    per_layer = {}
    for name in layers:
        override = settings.get(name, (None, {}))[1]
        if name not in chosen or override is None:
            rows[name] = rows[name]._replace(reason="excluded (include / exclude / overrides)")
            continue
        per_layer[name] = {"sparsity": sparsity, "bits": bits, **override}
    if per_layer:
        pruned = {n: {"sparsity": v["sparsity"]} for n, v in per_layer.items() if v["sparsity"] > 0}
        if pruned:
            from dcx.prune import prune_

            prune_(model, PruneConfig(sparsity=0.0, targets=list(pruned), overrides=pruned))
        from dcx.quantize import _clusterable, cluster_

        others = {n: None for n in _clusterable(model) if n not in per_layer}
        cluster_(model, ClusterConfig(overrides={n: {"bits": v["bits"]}
                                                 for n, v in per_layer.items()} | others),
                 progress=progress)
        for name, v in per_layer.items():
            reason = packable(model.get_submodule(name))
            rows[name] = rows[name]._replace(action="shared" if reason else "packed",
                                             bits=v["bits"], sparsity=v["sparsity"],
                                             reason=reason or "")
        pack_layers_(model, names={n for n in per_layer if rows[n].action == "packed"},
                     dense=dense, compute=compute)
    if report is not None:
        report.extend(rows.values())
    return model


def _check_convert_layer(where, layer):
    from dcx.config import ConfigError

    if set(layer) - {"sparsity", "bits"}:
        raise ConfigError(f"{where}: a layer may set sparsity and bits, got {sorted(layer)}")
    if "bits" in layer and not (isinstance(layer["bits"], int) and 1 <= layer["bits"] <= 8):
        raise ConfigError(f"{where}: bits must be an int in [1, 8], got {layer['bits']!r}")
    value = layer.get("sparsity", 0.0)
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{where}: sparsity must be a number in [0, 1], got {value!r}")
