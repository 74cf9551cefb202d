"""Masked retraining: optimizers under which pruned weights, and their optimizer state, stay
exactly zero.

- `MaskedSGD`: torch.optim.SGD (momentum, dampening, nesterov, weight decay, maximize) as one
  fused op per parameter, dcx.ops.masked_sgd_step_. On kept positions it equals
  torch.optim.SGD bit for bit in float32 (CPU); pruned weights and their momentum are +0.0.
- `MaskedAdamW`: torch.optim.AdamW (amsgrad, maximize) as one fused op per parameter,
  dcx.ops.masked_adamw_step_, in AdamW's order of operations; pruned weights and their moments
  are +0.0. One pass over each tensor, where AdamW + mask_optimizer_ makes about a dozen.
- `mask_optimizer_(optimizer, masks)`: any other optimizer (Adam, AdamW, ...) gets step hooks
  that zero pruned gradients before the step and pruned weights and every per-weight state
  tensor (exp_avg, exp_avg_sq, ...) after it.

Masks need not be passed: a pruned Parameter carries a link to its mask (dcx.state), read at
every step, so masks a Pruner adds or tightens later are honoured. `masks=` overrides that with
the model (its pruned parameters) or a {parameter: bool mask} mapping.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Optional

import torch
from torch import Tensor, nn

from dcx import ops, state

__all__ = ["MaskedAdamW", "MaskedSGD", "mask_optimizer_"]

Masks = nn.Module | Mapping[Tensor, Tensor] | None


def _resolver(masks: Masks) -> Callable[[], Callable[[Tensor], Optional[Tensor]]]:
    """A function, called once per step, that gives a lookup from a parameter to its mask (None:
    not pruned)."""
    if masks is None:
        return lambda: state.mask_of
    if isinstance(masks, nn.Module):
        def lookup():
            found = {id(st.module._parameters.get(st.param)): st.mask
                     for st in state.layers(masks).values() if st.mask is not None}
            return lambda p: found.get(id(p))
        return lookup
    if isinstance(masks, Mapping):
        for key, mask in masks.items():
            if not isinstance(key, Tensor) or not isinstance(mask, Tensor):
                raise TypeError("masks must map parameters (tensors) to mask tensors, or be the "
                                "model; pruned parameters need no masks= at all")
            if mask.shape != key.shape:
                raise ValueError(f"a mask has shape {tuple(mask.shape)} but its parameter has "
                                 f"{tuple(key.shape)}")
        fixed = {id(p): mask for p, mask in masks.items()}
        return lambda: lambda p: fixed.get(id(p))
    raise TypeError(f"masks must be an nn.Module, a {{parameter: mask}} dict or None, "
                    f"got {type(masks).__name__}")


class _MaskedOptimizer(torch.optim.Optimizer):
    """What the masked optimizers share: each parameter's mask (its own, the masks= override, or
    an all-ones mask for a parameter that is not pruned) and the per-parameter loop."""

    def __init__(self, params: Iterable, defaults: dict, masks: Masks):
        super().__init__(params, defaults)
        self._masks = _resolver(masks)
        self._dense: dict[tuple, Tensor] = {}  # all-ones masks of unmasked params, by shape

    def _dense_mask(self, p: Tensor) -> Tensor:
        key = (tuple(p.shape), p.device)
        if key not in self._dense:
            self._dense[key] = torch.ones(p.shape, dtype=torch.bool, device=p.device)
        return self._dense[key]

    def _update(self, p: Tensor, mask: Tensor, group: dict) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        mask_of = self._masks()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                mask = mask_of(p)
                self._update(p, self._dense_mask(p) if mask is None else mask, group)
        return loss


class MaskedSGD(_MaskedOptimizer):
    """SGD in which pruned weights and their momentum stay exactly zero.

    Arguments as torch.optim.SGD. Pruned parameters are found by themselves (dcx.state);
    `masks` (the model or {parameter: mask}) overrides that. Parameters without a mask are
    updated densely. Parameters must be float32, float16 or bfloat16.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        masks: Masks = None,
    ):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, masks)

    def _update(self, p: Tensor, mask: Tensor, group: dict) -> None:
        momentum = group["momentum"]
        buf, new_buffer = None, False
        if momentum != 0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:  # SGD's first step: the buffer becomes the gradient
                buf = state["momentum_buffer"] = torch.zeros_like(p)
                new_buffer = True
        ops.masked_sgd_step_(
            p, p.grad, mask, buf, float(group["lr"]), momentum, group["dampening"],
            group["weight_decay"], group["nesterov"], group["maximize"], new_buffer,
        )


class MaskedAdamW(_MaskedOptimizer):
    """AdamW in which pruned weights and their moments stay exactly zero.

    Arguments as torch.optim.AdamW; the state (step, exp_avg, exp_avg_sq, max_exp_avg_sq) has
    AdamW's names and types, so state dicts move between the two. Pruned parameters are found by
    themselves (dcx.state); `masks` overrides that as for MaskedSGD. Parameters without a mask
    are updated densely. Parameters must be float32, float16 or bfloat16.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        masks: Masks = None,
    ):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults, masks)

    def _update(self, p: Tensor, mask: Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:  # AdamW's lazy state: a float32 step count and zero moments
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        ops.masked_adamw_step_(
            p, p.grad, mask, state["exp_avg"], state["exp_avg_sq"],
            state.get("max_exp_avg_sq") if group["amsgrad"] else None, int(state["step"]),
            float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"],
            group["amsgrad"], group["maximize"],
        )


def mask_optimizer_(optimizer: torch.optim.Optimizer, masks: Masks = None) -> torch.optim.Optimizer:
    """Make `optimizer` keep pruned weights at zero: before each step pruned gradients are
    zeroed, after it pruned weights and every state tensor of a weight's shape (exp_avg,
    exp_avg_sq, momentum_buffer, ...). Pruned parameters are found by themselves; `masks`
    overrides that as for MaskedSGD. Returns the same optimizer (LR schedulers still work)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    resolve = _resolver(masks)

    def own_masks(opt):
        mask_of = resolve()
        pairs = ((p, mask_of(p)) for group in opt.param_groups for p in group["params"])
        return [(p, m) for p, m in pairs if m is not None]

    @torch.no_grad()
    def before(opt, args, kwargs):
        for p, mask in own_masks(opt):
            if p.grad is not None:
                p.grad.masked_fill_(~mask, 0.0)

    @torch.no_grad()
    def after(opt, args, kwargs):
        for p, mask in own_masks(opt):
            pruned = ~mask
            p.masked_fill_(pruned, 0.0)
            for value in opt.state.get(p, {}).values():
                if isinstance(value, Tensor) and value.shape == p.shape:
                    value.masked_fill_(pruned, 0.0)

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return optimizer
