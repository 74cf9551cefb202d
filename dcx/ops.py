"""Typed wrappers of the dcx torch ops, each followed by its fake kernel (shapes and dtypes only,
for torch.compile and meta tensors) and, where the op has one, its autograd formula.

The kernels are C++ (csrc/cpu/<op>_cpu.cpp) and CUDA (csrc/cuda/<op>_cuda.cpp + _kernel.cu);
plain-torch oracles of the same ops are in dcx.reference.
"""

from typing import Optional

import torch
from torch import Tensor

from dcx._native import available, op

__all__ = ["masked_sgd_step_", "centroid_grad"]


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
    """One fused, in-place SGD step that keeps pruned weights and their momentum at exactly zero.

    param, grad, momentum_buffer: the same shape and dtype (float32, float16 or bfloat16);
    arithmetic is float32 in torch.optim.SGD's order, so float32 results equal SGD's bit for bit
    on the kept positions. mask: bool or uint8 of param's shape, 0 = pruned. momentum_buffer is
    required when momentum != 0; init_buffer=True makes it the gradient (SGD's first step).
    """
    op("masked_sgd_step_")(
        param, grad, mask, momentum_buffer, lr, momentum, dampening, weight_decay, nesterov,
        maximize, init_buffer,
    )


def centroid_grad(
    grad: Tensor, labels: Tensor, num_clusters: int, mask: Optional[Tensor] = None
) -> Tensor:
    """Sum of `grad` over the positions of each label: the gradient of a shared-weight codebook.

    grad: float tensor of any shape; labels: int32/int64 of grad's shape, in [0, num_clusters)
    where mask is set; mask: optional bool/uint8, 0 = excluded. Returns [num_clusters] in grad's
    dtype (float32 accumulation, float64 for float64). Deterministic on CPU.
    """
    return op("centroid_grad")(grad, labels, num_clusters, mask)


if available():

    @torch.library.register_fake("dcx::masked_sgd_step_")
    def _(param, grad, mask, momentum_buffer, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
          nesterov=False, maximize=False, init_buffer=False):
        return None

    @torch.library.register_fake("dcx::centroid_grad")
    def _(grad, labels, num_clusters, mask=None):
        torch._check(num_clusters >= 1, lambda: f"num_clusters must be >= 1, got {num_clusters}")
        return grad.new_empty((num_clusters,))


__all__ += ["spqmm"]


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
    """y = x W^T + bias, W [out_features, in_features] packed by dcx.nn.pack and decoded on the fly.

    x: [..., in_features], float32, float16 or bfloat16; codebook (<= 2^bits entries) and bias
    ([out_features]) in x's dtype; float32 accumulation. codes: int16 [nnz] (sparse mode, with
    seg_ptr and chunks int32) or uint8 [out_features, in_features] (dense mode, seg_ptr and chunks
    empty); the layout is described at the top of csrc/core/spqmm.h. Returns [..., out_features]
    in x's dtype. From a batch (product of x's leading dims) of `crossover` on (-1: a measured
    default per device), W is decoded once and the BLAS runs instead. Corrupted packed data
    (ids >= codebook size, columns >= in_features, bad pointers) raises RuntimeError; on CUDA
    that costs one host sync, which check=False skips (reads stay in bounds either way; a CUDA
    graph capture never syncs).
    """
    return op("spqmm")(
        x, codes, seg_ptr, chunks, codebook, out_features, in_features, bits, bias, crossover,
        check,
    )


if available():

    @torch.library.register_fake("dcx::spqmm")
    def _(x, codes, seg_ptr, chunks, codebook, out_features, in_features, bits, bias=None,
          crossover=-1, check=True):
        torch._check(x.shape[-1] == in_features,
                     lambda: f"x must have in_features = {in_features} elements in its last dimension")
        torch._check(codebook.dtype == x.dtype, lambda: "codebook must have the dtype of x")
        return x.new_empty((*x.shape[:-1], out_features))
