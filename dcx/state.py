"""The compressed state of a layer: the one definition every stage writes (prune_, cluster_,
encode_, load) and everything downstream reads (MaskedSGD, save, the report, the pipeline,
SparseQuant*).

A compressed parameter, say `fc1.weight`, keeps its state on the module that owns it, as tensors
named after it, so they travel with state_dict, deepcopy, .to() and DDP like any other:

    weight_mask       bool, the weight's shape, True = kept                           pruning
    weight_codebook   [k] shared values: a Parameter while the weight is rebuilt      sharing
                      from it before each forward (centroid fine-tuning), a buffer
                      once finalize_clustering_ baked the weight back into a Parameter
    weight_labels     int32, the weight's shape: each weight's codebook id            sharing
    weight_clustered  the weights as they were clustered (for quantize.reassign_)     sharing
    weight_scale      [out] per output row, or [out, groups] per row and group of columns  sharing
                      (dcx.format.group_size_of), float32 holding float16 values: a
                      scaled codebook, the weight being scale[row(, group)] * codebook[labels]

and its integers in the module attribute `_dcx_meta` ({"weight": {"bits": 5, "index_bits": 4}}):
the bits of a codebook id (weight sharing) and of a relative index (encoding, None: the
encoder's default for the layer kind).

One forward pre-hook per module serves every stage: it rebuilds a shared weight as
codebook[labels], exactly zero where pruned (the codebook's gradient is then the per-cluster sum,
dcx.ops.centroid_grad; after the forward the attribute keeps a detached copy, so the module stays
deep-copyable), and in training mode it zeroes pruned weights, so an optimizer that knows nothing
of masks cannot bring them back into the forward pass. A masked Parameter carries a
link to its mask, which the optimizers read: dcx.MaskedSGD(model.parameters()) keeps pruned
weights and their momentum at zero without being told the masks.

Why plain tensors on the module: they are what torch already moves, copies, saves and
broadcasts. torch.nn.utils.parametrize would rename the state_dict keys
(parametrizations.weight.original) so that a fresh model no longer matches, and a tensor subclass
would stand in the way of torch.compile and DDP. Packed layers (dcx.SparseQuantLinear, ...) hold
the same state packed for speed and hand it back through their `layer_state` method.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from dcx import ops
from dcx.format import check_scale, scale_like

__all__ = [
    "LayerState", "get", "layers", "set_mask_", "set_shared_", "finalize_shared_",
    "set_index_bits_", "apply_", "mask_of", "shared_weight", "SUFFIXES",
]

MASK, CODEBOOK, LABELS, CLUSTERED, SCALE = "_mask", "_codebook", "_labels", "_clustered", "_scale"
SUFFIXES = (MASK, CODEBOOK, LABELS, CLUSTERED, SCALE)
_META = "_dcx_meta"
_LINK = "_dcx_link"


class SharedWeight(torch.autograd.Function):
    """weight = scale * codebook[labels] where mask (row or group scales, dcx.format.scale_like;
    exact zeros elsewhere; scale None: 1);
    the codebook's gradient is the per-cluster sum of the weight's gradient (times the row's
    scale) over the kept positions (dcx.ops.centroid_grad)."""

    @staticmethod
    def forward(codebook: Tensor, labels: Tensor, mask: Optional[Tensor],
                scale: Optional[Tensor]) -> Tensor:
        weight = codebook[labels]
        if scale is not None:
            weight = weight * scale_like(scale.to(weight.dtype), weight.shape)
        return weight if mask is None else torch.where(mask, weight, torch.zeros_like(weight))

    @staticmethod
    def setup_context(ctx, inputs, output):
        codebook, labels, mask, scale = inputs
        ctx.save_for_backward(labels, mask, scale)
        ctx.num_clusters = codebook.numel()

    @staticmethod
    def backward(ctx, grad_weight):
        labels, mask, scale = ctx.saved_tensors
        if scale is not None:
            grad_weight = grad_weight * scale_like(scale.to(grad_weight.dtype), grad_weight.shape)
        # The labels came from the clustering: no check (on CUDA a host sync per step).
        grad = ops.centroid_grad(grad_weight.contiguous(), labels, ctx.num_clusters, mask,
                                 check=False)
        return grad, None, None, None


def shared_weight(codebook: Tensor, labels: Tensor, mask: Optional[Tensor] = None,
                  scale: Optional[Tensor] = None) -> Tensor:
    """scale[row] * codebook[labels] (zero where mask is False; scale None: 1), differentiable
    in the codebook."""
    return SharedWeight.apply(codebook, labels, mask, scale)


@dataclass(frozen=True)
class LayerState:
    """What the stages know of one parameter: read it with `get` or `layers`, change it only
    through the stage verbs (or the set_* functions here)."""

    module_name: str
    param: str  # the parameter's name on its module, "weight"
    module: nn.Module
    stored_mask: Optional[Tensor] = None  # read `mask`
    codebook: Optional[Tensor] = None  # [k]; None: not weight-shared
    stored_labels: Optional[Tensor] = None  # read `labels`
    bits: Optional[int] = None  # bits of a codebook id (k <= 2^bits)
    scale: Optional[Tensor] = None  # row [out] or group [out, G] scales (None: unscaled)
    index_bits: Optional[int] = None  # bits of a relative index in the file (None: default)
    keys: tuple = ()  # the module's state_dict keys that hold this state (the weight's included)
    packed: bool = False  # held by a packed layer (SparseQuant*), rebuilt from its packed form
    conv: bool = False  # a convolution's weight (the encoder's default index bits differ)
    # A packed layer's () -> (mask, labels), decoded on the first read of either, once.
    unpack: Optional[Callable[[], tuple]] = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def _unpacked(self) -> tuple:
        return self.unpack() if self.unpack is not None else (self.stored_mask, self.stored_labels)

    @property
    def mask(self) -> Optional[Tensor]:
        """bool, the weight's shape, True = kept; None: nothing pruned."""
        return self._unpacked[0]

    @property
    def kept(self) -> Tensor:
        """The mask, or all True when nothing is pruned (bool, the weight's shape; needs labels
        or a mask)."""
        mask = self.mask
        return mask if mask is not None else torch.ones_like(self.labels, dtype=torch.bool)

    @property
    def labels(self) -> Optional[Tensor]:
        """int32 codebook ids, the weight's shape (None: not weight-shared)."""
        return self._unpacked[1]

    @property
    def name(self) -> str:
        """The parameter's full name, "fc1.weight"."""
        return f"{self.module_name}.{self.param}" if self.module_name else self.param

    @property
    def shared(self) -> bool:
        return self.codebook is not None

    @property
    def live(self) -> bool:
        """The weight is rebuilt from a trainable codebook before each forward."""
        return isinstance(self.codebook, nn.Parameter)

    def weight(self) -> Tensor:
        """The weight the layer computes with (detached)."""
        if self.shared and (self.live or self.packed):
            with torch.no_grad():
                return shared_weight(self.codebook.detach(), self.labels, self.mask, self.scale)
        return getattr(self.module, self.param).detach()

    def shared_values(self) -> Tensor:
        """scale[row] * codebook[labels], zero where pruned: what a shared weight must equal."""
        with torch.no_grad():
            return shared_weight(self.codebook.detach(), self.labels, self.mask, self.scale)


# ---------------------------------------------------------------------------------------------
# Reading


def kind(module: nn.Module) -> Optional[str]:
    """"conv", "linear" or "embedding" for a layer of that kind (subclasses and the packed twins,
    which say so in `layer_kind`, included), else None: the one place that decides."""
    declared = getattr(module, "layer_kind", None)
    if declared is not None:
        return declared
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return "embedding" if isinstance(module, nn.Embedding) else None


def get(module: nn.Module, param: str = "weight", module_name: str = "") -> Optional[LayerState]:
    """The state of `module`'s parameter `param`, or None when it has none."""
    if hasattr(module, "layer_state"):  # a packed layer
        return module.layer_state(module_name) if param == "weight" else None
    meta = getattr(module, _META, {}).get(param)
    if meta is None:
        return None
    buffers, params = module._buffers, module._parameters
    codebook = params.get(param + CODEBOOK)
    if codebook is None:
        codebook = buffers.get(param + CODEBOOK)
    keys = tuple(k for k in [param] + [param + s for s in SUFFIXES]
                 if params.get(k) is not None or (buffers.get(k) is not None
                                                  and k not in module._non_persistent_buffers_set))
    return LayerState(module_name, param, module, buffers.get(param + MASK), codebook,
                      buffers.get(param + LABELS), meta.get("bits"), buffers.get(param + SCALE),
                      meta.get("index_bits"), keys, conv=kind(module) == "conv")


def layers(model: nn.Module) -> dict[str, LayerState]:
    """{full parameter name: its state} for every parameter of `model` that has one, in module
    order (each module once, under its first name)."""
    result = {}
    for module_name, module in model.named_modules():
        params = ["weight"] if hasattr(module, "layer_state") else list(getattr(module, _META, {}))
        for param in params:
            st = get(module, param, module_name)
            if st is not None:
                result[st.name] = st
    return result


def values(module: nn.Module, param: str) -> Tensor:
    """The tensor the module computes with under `param` (a Parameter, or a rebuilt weight)."""
    value = getattr(module, param, None)
    if not isinstance(value, Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor {param!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Writing


def _meta(module: nn.Module, param: str) -> dict:
    if _META not in module.__dict__:
        module.__dict__[_META] = {}
    entry = module.__dict__[_META].setdefault(param, {"bits": None, "index_bits": None})
    if not any(isinstance(h, _StateHook) for h in module._forward_pre_hooks.values()):
        hook = _StateHook()
        module.register_forward_pre_hook(hook)
        module.register_forward_hook(hook.after_forward)
        module.register_load_state_dict_post_hook(hook.after_load)
    return entry


def set_mask_(module: nn.Module, param: str, mask: Tensor) -> Tensor:
    """Make `mask` (bool, True = kept) the pruning mask of module.<param> and zero the pruned
    weights. Returns the mask buffer."""
    weight = values(module, param)
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"the mask of {param} must have shape {tuple(weight.shape)}, got "
                         f"{tuple(mask.shape)}")
    _meta(module, param)
    name = param + MASK
    mask = mask.to(device=weight.device, dtype=torch.bool)
    current = module._buffers.get(name)
    if current is not None and current.shape == mask.shape and current.device == mask.device:
        current.copy_(mask)
    else:
        module._buffers.pop(name, None)
        module.register_buffer(name, mask.clone())
    _link(module, param)
    apply_(module, param)
    return module._buffers[name]


def set_shared_(module: nn.Module, param: str, codebook: Tensor, labels: Tensor, bits: int,
                live: bool = True, clustered: Optional[Tensor] = None,
                scale: Optional[Tensor] = None) -> None:
    """Make module.<param> weight-shared: codebook [k] (k <= 2^bits), labels int of its shape;
    scale: [out] row scales (weight = scale[row] * codebook[labels]) or [out, G] group scales
    (dcx.format.scale_like); float16 values, checked.
    live: the codebook becomes a Parameter and the weight is rebuilt from it before each forward
    (fine-tuning); otherwise the weight stays a Parameter holding codebook[labels] and the
    codebook a buffer (what finalize_clustering_ leaves, and what dcx.load restores).
    clustered: the weights as clustered, kept for reassign_."""
    weight = values(module, param)
    if tuple(labels.shape) != tuple(weight.shape):
        raise ValueError(f"the labels of {param} must have shape {tuple(weight.shape)}, got "
                         f"{tuple(labels.shape)}")
    if codebook.dim() != 1 or not 1 <= codebook.numel() <= 1 << bits:
        raise ValueError(f"the codebook of {param} must be 1-D with 1 to 2^{bits} entries, got "
                         f"shape {tuple(codebook.shape)}")
    if scale is not None:
        scale = check_scale(scale, weight.shape[0], f"the scale of {param}",
                            weight[0].numel() if weight.shape[0] else 0)
    _meta(module, param)["bits"] = int(bits)
    device, dtype = weight.device, weight.dtype
    requires_grad = weight.requires_grad
    for suffix in (CODEBOOK, LABELS, CLUSTERED, SCALE):
        module._parameters.pop(param + suffix, None)
        module._buffers.pop(param + suffix, None)
    codebook = codebook.detach().to(device=device, dtype=dtype).clone()
    module.register_buffer(param + LABELS, labels.to(device=device, dtype=torch.int32).clone())
    if scale is not None:
        module.register_buffer(param + SCALE, scale.to(device=device, dtype=torch.float32))
    if clustered is not None:
        module.register_buffer(param + CLUSTERED, clustered.detach().to(device).clone())
    if live:
        module._parameters.pop(param, None)
        module.register_parameter(param + CODEBOOK, nn.Parameter(codebook, requires_grad))
    else:
        module.register_buffer(param + CODEBOOK, codebook)
    apply_(module, param)


@torch.no_grad()
def set_compressed_(module: nn.Module, param: str, weight: Tensor, mask: Tensor,
                    codebook: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                    bits: Optional[int] = None, scale: Optional[Tensor] = None) -> None:
    """Make module.<param> a plain Parameter holding `weight` (the decoded values of the state
    given: scale[row] * codebook[labels] where mask is set, 0 elsewhere), with that state (not
    live): what dcx.load restores from a file's record. The Parameter is written in place, so a
    weight tied to other modules stays tied."""
    st = get(module, param)
    if st is not None and st.live:
        finalize_shared_(module, param)
    module._parameters[param].copy_(weight)
    if not bool(mask.all()) or (st is not None and st.mask is not None):
        set_mask_(module, param, mask)
    if codebook is not None:
        set_shared_(module, param, codebook, labels, bits, live=False, scale=scale)


def finalize_shared_(module: nn.Module, param: str) -> None:
    """Bake a live shared weight back into a plain Parameter (codebook[labels], zero where
    pruned); the codebook stays as a buffer and the labels stay, so the state is still known."""
    codebook = module._parameters.get(param + CODEBOOK)
    if codebook is None:
        return
    weight = shared_weight(codebook.detach(), module._buffers[param + LABELS],
                           module._buffers.get(param + MASK),
                           module._buffers.get(param + SCALE)).clone()
    del module._parameters[param + CODEBOOK]
    module.register_buffer(param + CODEBOOK, codebook.detach().clone())
    module._buffers.pop(param + CLUSTERED, None)
    module.__dict__.pop(param, None)
    module.register_parameter(param, nn.Parameter(weight, codebook.requires_grad))
    _link(module, param)


def set_index_bits_(module: nn.Module, param: str, index_bits: Optional[int]) -> None:
    """The bits of a relative index with which the file stores module.<param>."""
    _meta(module, param)["index_bits"] = index_bits


@torch.no_grad()
def apply_(module: nn.Module, param: str) -> None:
    """Make the weight follow its state: a live shared weight is rebuilt from its codebook, a
    pruned Parameter has its pruned positions set to +0.0."""
    codebook = module._parameters.get(param + CODEBOOK)
    mask = module._buffers.get(param + MASK)
    if codebook is not None:
        setattr(module, param, shared_weight(codebook, module._buffers[param + LABELS], mask,
                                             module._buffers.get(param + SCALE)))
    elif mask is not None and module._parameters.get(param) is not None:
        module._parameters[param].masked_fill_(~mask, 0.0)


class _StateHook:
    """The forward pre-hook and load_state_dict post-hook of a module with state. It holds no
    tensors (only the module's own attributes are read), so deepcopy and pickling carry it."""

    def __call__(self, module, args):
        for param in getattr(module, _META, {}):
            codebook = module._parameters.get(param + CODEBOOK)
            mask = module._buffers.get(param + MASK)
            if codebook is not None:
                setattr(module, param,
                        shared_weight(codebook, module._buffers[param + LABELS], mask,
                                      module._buffers.get(param + SCALE)))
            elif mask is not None and module._parameters.get(param) is not None:
                if not torch.compiler.is_compiling():
                    _link(module, param)  # after a deepcopy, whose Parameters carry no link
                if module.training:
                    with torch.no_grad():  # .data: no version bump, saved activations stay valid
                        module._parameters[param].data.mul_(mask)

    def after_forward(self, module, args, output):
        # The forward's graph holds the rebuilt weight; the attribute keeps a detached copy, so
        # the module stays deep-copyable and reading module.weight costs no graph.
        for param in getattr(module, _META, {}):
            if module._parameters.get(param + CODEBOOK) is not None:
                module.__dict__[param] = module.__dict__[param].detach()

    def after_load(self, module, incompatible_keys):
        for param in getattr(module, _META, {}):
            _link(module, param)
            apply_(module, param)


# ---------------------------------------------------------------------------------------------
# The link from a masked Parameter to its mask (what the optimizers read)


class _Link:
    """A weak reference from a Parameter to the module and name that own it. Pickled, it becomes
    None (the module relinks at its next forward); deepcopy of a Parameter drops it likewise."""

    __slots__ = ("module", "param")

    def __init__(self, module, param):
        self.module = weakref.ref(module)
        self.param = param

    def __reduce__(self):
        return (_no_link, ())


def _no_link():
    return None


def _link(module: nn.Module, param: str) -> None:
    p = module._parameters.get(param)
    if p is not None:
        link = p.__dict__.get(_LINK)
        if link is None or link.module() is not module or link.param != param:
            p.__dict__[_LINK] = _Link(module, param)


def mask(module: nn.Module, param: str = "weight") -> Optional[Tensor]:
    """The pruning mask of `module`'s `param` itself (the buffer the stages update in place), or
    None when it is not pruned. Cheaper than get() for a hot loop."""
    return module._buffers.get(param + MASK)


def clustered(module: nn.Module, param: str = "weight") -> Optional[Tensor]:
    """The weight as it was when shared (kept by ClusterConfig(reassign=True)), or None."""
    return module._buffers.get(param + CLUSTERED)


def mask_of(p: Tensor) -> Optional[Tensor]:
    """The pruning mask of Parameter `p` (bool, True = kept), or None when it is not pruned."""
    link = p.__dict__.get(_LINK) if isinstance(p, Tensor) else None
    if link is None:
        return None
    module = link.module()
    if module is None or module._parameters.get(link.param) is not p:
        return None
    return module._buffers.get(link.param + MASK)
