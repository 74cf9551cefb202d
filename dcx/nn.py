"""Layers that run on packed weights (dcx.packing): SparseQuantLinear (a drop-in nn.Linear),
SparseQuantConv2d, SparseQuantEmbedding, their compute modes, and `packable` (whether a packed
twin computes what a layer computes). The model transforms that swap layers for them are in
dcx.convert.
"""

import importlib
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dcx import format as fmt
from dcx import ops, state
from dcx.config import COMPUTE_MODES, ClusterConfig, check_compute
from dcx.packing import PACKED_BUFFERS, PackedWeight, bits_for, can_pack_dense, pack, unpack
from dcx.prune import compute_mask
from dcx.quantize import share_weight

__all__ = ["COMPUTE_MODES", "check_compute", "packable", "PackedModule",
           "SparseQuantLinear", "SparseQuantConv2d", "SparseQuantEmbedding"]

# What a packed layer computes in (its `compute`, one of COMPUTE_MODES) is an argument of the op:
# "auto" follows the activations' dtype; "float32" and "bfloat16" round the activations to that
# dtype first (fp32 accumulation either way; with AMX bfloat16 runs the tile kernels, dense layers
# from one row and sparse ones from a dozen, and past the crossover a bf16 GEMM on the decoded
# weight, the fastest path on CPUs with AVX512-BF16 or AMX); "int8" (opt-in) runs a
# dense-mode layer through the int8 kernels (activations quantized to int8 per row in blocks of
# 32, an int16 codebook, int32 dot products; about 1e-2 relative error per output; with AVX-512
# VNNI and VBMI from 2 rows (from one at 6 bits and more) the fused int8 kernel, then the int8 GEMM, with W and x quantized per row
# instead, somewhat coarser) at the batch and layer
# sizes where they are faster, float32 elsewhere; on CPUs with AVX-512 VNNI and VBMI a sparse-mode
# layer runs from 2 rows through the sparse int8 kernel (the GEMM's per-row rule on the packed
# steps, four steps a unit, u8 x s8 dot products) and, past 512 to 1,536 rows by density and size
# (never on large layers with few slots), through the int8 GEMM; in float32 elsewhere. Which kernel runs for a batch is
# decided by the table in csrc/core/spqmm_plan.h.


def _spqmm_op():
    """dcx::spqmm's default overload (the op packet's dispatch costs a few microseconds a call),
    or the error that says how to build the kernels."""
    global _SPQMM
    if _SPQMM is None:
        _SPQMM = ops.op("spqmm").default
    return _SPQMM


_SPQMM = None


def _compress_layer(weight: Tensor, sparsity: float, bits: int, scale=None):
    """Post-training compression of one weight as the stages do it (dcx.prune.compute_mask, then
    dcx.quantize.share_weight with linear init; scale: ClusterConfig.scale): (mask, labels,
    codebook, row or group scales or None) of the weight viewed as [out, -1]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must lie in [1, 8], got {bits}")
    w = weight.detach().reshape(weight.shape[0], -1)
    mask = compute_mask(w, "element", sparsity=sparsity)
    fields = {**ClusterConfig(linear_bits=bits).layer_fields(False), "scale": scale}
    codebook, labels, scale, _ = share_weight(w, mask, fields)
    return mask, labels.long(), codebook.to(weight.dtype), scale


def _deprecated(old: str, new: str):
    warnings.warn(f"{old} is deprecated (one release): use {new}", DeprecationWarning, stacklevel=3)


class PackedModule(nn.Module):
    """Holds a PackedWeight as buffers (resized on load_state_dict) and `bits` and `compute` as
    extra state, and hands its compressed state back to dcx.state (`layer_state`)."""

    layer_kind = "linear"  # dcx.state.kind
    _compute = "auto"
    tied = False  # reads another packed layer's buffers (tie_to)

    @property
    def compute(self) -> str:
        """What the layer computes in: one of COMPUTE_MODES (settable on a built layer)."""
        return self._compute

    @compute.setter
    def compute(self, value: str):
        self._compute = check_compute(value)

    def _init_empty(self, out_features: int, bits: int, bias: bool, dtype, device,
                    dense: bool = False):
        """An all-pruned packed weight [out_features, _packed_in_features()] (in sparse mode
        unless `dense`) and a zero bias: the state a constructor leaves before load_state_dict
        or from_* fills it."""
        dtype = dtype or torch.get_default_dtype()
        mask = torch.zeros(out_features, self._packed_in_features(), dtype=torch.bool, device=device)
        codebook = torch.zeros(1 << bits, dtype=dtype, device=device)
        self._set_packed(pack(mask, torch.zeros_like(mask, dtype=torch.int64), codebook, bits,
                              dense=dense))
        self.register_buffer("scale", None)  # row [out] or group [out, G] scales of a scaled codebook
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    def _set_packed(self, p: PackedWeight):
        for name in PACKED_BUFFERS:
            self.register_buffer(name, getattr(p, name))
        self.bits = p.bits
        self.validate()

    def validate(self):
        """Run the kernel once with its checks on (RuntimeError on corrupted packed data), so that
        forward can skip them: on CUDA they cost a host sync per call."""
        scale = self._buffers.get("scale")  # None too before _init_empty registers it
        if self.codes.is_meta or (scale is not None and scale.is_meta):
            return
        x = torch.zeros(1, self._packed_in_features(), device=self.codes.device)
        self.packed.spqmm(x, check=True, scale=scale)

    def _group_size(self) -> int:
        """Columns per scale group (0: row scales or none; dcx.format.group_size_of)."""
        scale = self._buffers.get("scale")
        if scale is None or scale.dim() == 1:
            return 0
        return fmt.group_size_of(scale, self._packed_in_features())

    def _set_scale(self, scale: Optional[Tensor]):
        n = self.out_features
        self.scale = (None if scale is None else
                      fmt.check_scale(scale, n, "scale", self._packed_in_features()).to(self.codes.device))

    @property
    def packed(self) -> PackedWeight:
        buffers = self._buffers  # not Module.__getattr__: this runs on every forward
        return PackedWeight(*(buffers[name] for name in PACKED_BUFFERS), self.out_features,
                            self._packed_in_features(), self.bits, self._group_size())

    def get_extra_state(self):
        return {"bits": self.bits, "compute": self.compute}

    def set_extra_state(self, extra):
        self.bits = int(extra["bits"])
        self.compute = extra.get("compute", "auto")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Packed buffers differ in size from layer to layer: take the incoming ones as they are.
        for name in PACKED_BUFFERS:
            key = prefix + name
            if key in state_dict:
                old = getattr(self, name)
                setattr(self, name, torch.empty(state_dict[key].shape, dtype=state_dict[key].dtype,
                                                device=old.device))
        _take_scale(self, state_dict, prefix, self.codes.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.validate()

    def load_compressed(self, mask: Tensor, labels: Tensor, codebook: Tensor, bits: int,
                        dense: Optional[bool] = None, scale: Optional[Tensor] = None):
        """Repack from (mask, labels, codebook, row or group scales or None) of the weight this
        layer stands for (a file's record, as dcx.load meets a packed layer in the model it
        fills); dense as `pack`."""
        device, n = self.codes.device, self.out_features
        self._set_scale(None)  # the old scales do not describe the new weight
        group_size = 0 if scale is None else fmt.group_size_of(scale, self._packed_in_features())
        self._set_packed(pack(mask.to(device).reshape(n, -1), labels.to(device).reshape(n, -1),
                              codebook.to(device, self.codebook.dtype), bits, dense, group_size))
        self._set_scale(scale)
        self.validate()

    def tie_to(self, other: "PackedModule") -> "PackedModule":
        """Read `other`'s packed weight and scales: a table tied to an output projection,
        packed once for both uses. The two layers hold one buffer dict, so whatever replaces a
        buffer of either (.to(), load_state_dict, load_compressed) replaces it for both.
        Returns self."""
        if self.weight_shape[0] != other.out_features or (
                self._packed_in_features() != other._packed_in_features()):
            raise ValueError(f"cannot tie a {tuple(self.weight_shape)} weight to a "
                             f"{(other.out_features, other._packed_in_features())} one")
        if not other.packed.dense and self.layer_kind == "embedding":
            raise ValueError("a table reads a packed weight in dense mode only")
        self._buffers = other._buffers  # every buffer of a packed layer is its weight's
        self.bits, self.tied = other.bits, True
        return self

    def layer_state(self, module_name: str = "") -> state.LayerState:
        """The compressed state this layer holds packed (dcx.state reads it here): mask, labels
        and codebook in the shape of the weight it stands for, the first two decoded only when a
        caller reads them (a verb with nothing to do on a packed layer decodes nothing)."""
        shape, packed = self.weight_shape, self.packed  # the codebook below belongs to this

        def unpacked():
            mask, labels = unpack(packed)
            return mask.reshape(shape), labels.reshape(shape).to(torch.int32)

        keys = tuple(k for k in self.state_dict(keep_vars=True) if k != "bias")
        return state.LayerState(module_name, "weight", self, None, self.codebook, None, self.bits,
                                self.scale, None, keys, packed=True,
                                conv=self.layer_kind == "conv", unpack=unpacked)

    @classmethod
    def from_float(cls, layer: nn.Module, sparsity: float = 0.0, bits: int = 5,
                   dense: Optional[bool] = None, compute: str = "auto"):
        """Post-training compression of `layer` (the plain layer this class stands for): prune
        the `sparsity` fraction of smallest weights by magnitude, share the rest among 2^bits
        k-means centroids, pack (dense as `pack`); `compute` one of COMPUTE_MODES."""
        check_compute(compute)
        mask, labels, codebook, _ = _compress_layer(layer.weight, sparsity, bits)
        packed = cls.from_shared(layer, mask, labels, codebook, bits, dense=dense)
        packed.compute = compute
        return packed

    @classmethod
    def from_shared(cls, layer: nn.Module, mask: Tensor, labels: Tensor, codebook: Tensor,
                    bits: Optional[int] = None, dense: Optional[bool] = None,
                    scale: Optional[Tensor] = None):
        """From (mask, labels, codebook) of `layer`'s weight (its shape, or [out, -1]) and its
        row or group scales (a scaled codebook; None: unscaled); the shape, hyperparameters and
        bias come from `layer`."""
        packed = cls._like(layer, bits or bits_for(codebook.numel()))
        packed.load_compressed(mask, labels, codebook, packed.bits, dense=dense, scale=scale)
        if layer.bias is not None:
            packed.bias = nn.Parameter(layer.bias.detach().to(codebook.dtype).clone())
        return packed

    @classmethod
    def from_state(cls, st: state.LayerState, dense: Optional[bool] = None):
        """The packed twin of the layer whose weight the stages shared (dcx.state)."""
        mask = st.kept
        return cls.from_shared(st.module, mask, st.labels, st.codebook.detach(), st.bits,
                               dense=dense, scale=st.scale)

    @property
    def weight(self) -> Tensor:
        """The dense weight this layer stands for, in the plain layer's shape (decoded on each
        access: for code that reads a layer's weight; forward never does)."""
        return self.decoded_weight().reshape(self.weight_shape)

    def decoded_weight(self) -> Tensor:
        """The dense weight this layer stands for, scale x codebook[labels] x mask,
        [out_features, in_features] in the codebook dtype."""
        mask, labels = unpack(self.packed)
        values = self.codebook[labels]
        if self.scale is not None:
            values = values * fmt.scale_like(self.scale.to(values.dtype), values.shape)
        return torch.where(mask, values, torch.zeros((), dtype=self.codebook.dtype))

    def _linear(self, x: Tensor) -> Tensor:
        # One call into the op with the buffers as held: the op reads the codebook and bias in its
        # compute dtype and picks the kernel per call. The packed data was validated when set or
        # loaded, so no per-call check (on CUDA it costs a host sync).
        b = self._buffers  # not Module.__getattr__: this runs on every forward
        scale = b["scale"]
        return _spqmm_op()(x, b["codes"], b["windows"], b["group_ptr"], b["chunks"], b["codebook"],
                           self.out_features, self._packed_in_features(), self.bits, self.bias,
                           -1, False, self._compute, scale,
                           0 if scale is None or scale.dim() == 1 else self._group_size())


class SparseQuantLinear(PackedModule):
    """nn.Linear whose weight is pruned and weight-shared, run by dcx.ops.spqmm.

    Same forward as nn.Linear: x [..., in_features] -> [..., out_features] (float32, float16 or
    bfloat16). Build as every packed layer: `from_float(linear, sparsity, bits)` (post-training:
    magnitude pruning + k-means), `from_state` (a layer the stages compressed), `from_shared`
    (mask, labels and codebook of a linear's weight); or `from_packed` (a PackedWeight). A plain
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
    def _like(cls, linear: nn.Linear, bits: int):
        reason = packable(linear)
        if reason is not None:
            raise ValueError(f"SparseQuantLinear cannot run this layer: {reason}")
        return cls(linear.in_features, linear.out_features, linear.bias is not None, bits,
                   linear.weight.device, linear.weight.dtype)

    @classmethod
    def from_compressed(cls, mask: Tensor, labels: Tensor, codebook: Tensor,
                        bias: Optional[Tensor] = None, bits: Optional[int] = None,
                        dense: Optional[bool] = None):
        """Deprecated: from_shared(linear, mask, labels, codebook, bits, dense)."""
        _deprecated("SparseQuantLinear.from_compressed(mask, labels, codebook, bias)",
                    "SparseQuantLinear.from_shared(linear, mask, labels, codebook)")
        return cls.from_packed(pack(mask, labels, codebook, bits, dense), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, sparsity: float = 0.0, bits: int = 5,
                    dense: Optional[bool] = None, compute: str = "auto"):
        """Deprecated: from_float."""
        _deprecated("SparseQuantLinear.from_linear", "SparseQuantLinear.from_float")
        return cls.from_float(linear, sparsity, bits, dense, compute)

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


class SparseQuantConv2d(PackedModule):
    """nn.Conv2d (groups=1; numeric, "same" or "valid" padding in any padding_mode) with a packed
    weight: pad, im2col (F.unfold), then spqmm."""

    layer_kind = "conv"

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
        """Deprecated: from_float."""
        _deprecated("SparseQuantConv2d.from_conv", "SparseQuantConv2d.from_float")
        return cls.from_float(conv, sparsity, bits, dense, compute)

    @classmethod
    def from_compressed_like(cls, conv: nn.Conv2d, mask, labels, codebook, bits=None, dense=None):
        """Deprecated: from_shared."""
        _deprecated("SparseQuantConv2d.from_compressed_like", "SparseQuantConv2d.from_shared")
        return cls.from_shared(conv, mask, labels, codebook, bits, dense)

    def forward(self, x: Tensor) -> Tensor:
        batched = x.dim() == 4
        # nn.Conv2d's rule for the output's memory format: channels-last for a channels-last
        # input, else contiguous (code that flattens with .view after a conv relies on it).
        channels_last = batched and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
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
        y = y.transpose(1, 2).reshape(b, self.out_channels, oh, ow)  # channels-last strides
        if not channels_last:
            y = y.contiguous()
        return y if batched else y.squeeze(0)

    def extra_repr(self):
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}{mode}, bits={self.bits}")


class SparseQuantEmbedding(PackedModule):
    """nn.Embedding whose table is weight-shared (and maybe pruned), held as a dense-mode packed
    weight (dcx.packing: about bits / 8 bytes an entry) and its codebook. Same forward as
    nn.Embedding: an index tensor of any shape -> [..., embedding_dim]; a lookup decodes only
    the rows it returns (dcx.ops.spqmm_decode of those rows' codes). padding_idx is kept (it only
    shapes gradients, and this layer has none to train); max_norm is refused, since it rewrites
    the table in place. A table tied to an output projection (`tie_to`) reads that
    SparseQuantLinear's packed buffers: one copy serves the lookup and the product.
    Build with `from_float` (post-training), `from_state` (a layer the stages shared),
    `from_shared`, or a plain constructor filled by load_state_dict."""

    layer_kind = "embedding"

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
        self.out_features = num_embeddings
        self._init_empty(num_embeddings, bits, False, dtype, device, dense=True)

    def _packed_in_features(self):
        return self.embedding_dim

    @property
    def weight_shape(self):
        return (self.num_embeddings, self.embedding_dim)

    def load_compressed(self, mask: Tensor, labels: Tensor, codebook: Tensor, bits: int,
                        scale: Optional[Tensor] = None, dense: Optional[bool] = None):
        """Set the table from (mask, labels, codebook, row or group scales or None) of the weight it
        stands for (dense: ignored, a table is always in dense mode: a lookup decodes rows on
        their own)."""
        if not can_pack_dense(mask, codebook, bits):
            raise ValueError("a pruned table with a full 256-entry codebook leaves no id for the "
                             "pruned entries: share it with 7 bits or fewer")
        super().load_compressed(mask, labels, codebook, bits, dense=True, scale=scale)

    @classmethod
    def _like(cls, embedding: nn.Embedding, bits: int):
        reason = packable(embedding)
        if reason is not None:
            raise ValueError(f"SparseQuantEmbedding cannot run this layer: {reason}")
        w = embedding.weight
        return cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, bits,
                   w.device, w.dtype)

    @classmethod
    def from_float(cls, embedding: nn.Embedding, sparsity: float = 0.0, bits: int = 5):
        """Post-training compression: prune the `sparsity` fraction of smallest entries, share
        the rest among 2^bits k-means centroids."""
        mask, labels, codebook, _ = _compress_layer(embedding.weight, sparsity, bits)
        return cls.from_shared(embedding, mask, labels, codebook, bits)

    @classmethod
    def from_shared(cls, embedding: nn.Embedding, mask: Tensor, labels: Tensor, codebook: Tensor,
                    bits: Optional[int] = None, scale: Optional[Tensor] = None,
                    dense: Optional[bool] = None):
        """From (mask, labels, codebook, row or group scales or None) of `embedding`'s table (dense:
        ignored, a table is always packed in dense mode)."""
        layer = cls._like(embedding, bits or bits_for(codebook.numel()))
        layer.load_compressed(mask, labels, codebook, layer.bits, scale=scale)
        return layer

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, sparsity: float = 0.0, bits: int = 5):
        """Deprecated: from_float."""
        _deprecated("SparseQuantEmbedding.from_embedding", "SparseQuantEmbedding.from_float")
        return cls.from_float(embedding, sparsity, bits)

    def forward(self, input: Tensor) -> Tensor:
        b = self._buffers  # not Module.__getattr__: this runs on every forward
        flat = input.reshape(-1)
        codes = b["codes"][flat]
        # No per-call check: the table was validated when set or loaded (on CUDA a check costs a
        # host sync per lookup).
        rows = ops.spqmm_decode(codes, b["windows"], b["group_ptr"], b["chunks"], b["codebook"],
                                codes.shape[0], self.embedding_dim, self.bits, check=False)
        scale = b["scale"]
        if scale is not None:
            rows = rows * fmt.scale_columns(scale[flat].to(rows.dtype), self._group_size(),
                                            self.embedding_dim)
        return rows.reshape(*input.shape, self.embedding_dim)

    def get_extra_state(self):
        return {"bits": self.bits}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        ids = state_dict.get(prefix + "ids")
        if ids is not None:  # a table saved before it was packed: one uint8 id per entry
            codebook = state_dict[prefix + "codebook"]
            bits = state_dict.get(prefix + "_extra_state", {}).get("bits", self.bits)
            packed = pack(torch.ones(ids.shape, dtype=torch.bool), ids.long(), codebook, bits,
                          dense=True)
            state_dict = {**{k: v for k, v in state_dict.items() if k != prefix + "ids"},
                          **{prefix + name: getattr(packed, name) for name in PACKED_BUFFERS}}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        tied = ", tied" if self.tied else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, bits={self.bits}{tied}"


def _take_scale(module: nn.Module, state_dict: dict, prefix: str, device) -> None:
    """A packed layer's scales follow the incoming state: made (in its shape) when it has them,
    dropped when it has none."""
    key = prefix + "scale"
    module.scale = (torch.empty(state_dict[key].shape, dtype=torch.float32, device=device)
                    if key in state_dict else None)


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


_MOVED_TO_CONVERT = ("convert", "pack_layers_", "ConvertRow")


def __getattr__(name):
    """dcx.nn.convert, pack_layers_ and ConvertRow moved to dcx.convert: the old names still
    work for one release, with a DeprecationWarning."""
    if name in _MOVED_TO_CONVERT:
        _deprecated(f"dcx.nn.{name}", f"dcx.convert.{name}")
        # Imported here, not at the top: dcx.convert imports this module.
        return getattr(importlib.import_module("dcx.convert"), name)
    raise AttributeError(f"module 'dcx.nn' has no attribute {name!r}")
