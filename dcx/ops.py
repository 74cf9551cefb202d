"""Typed wrappers of the dcx torch ops, each followed by its fake kernel (shapes and dtypes only,
for torch.compile and meta tensors) and, where the op has one, its autograd formula.
Registrations are skipped when the kernels are not built (calling an op then says how to build).

The kernels are C++ (csrc/cpu/<op>_cpu.cpp) and CUDA (csrc/cuda/<op>_cuda.cpp + _kernel.cu);
plain-torch oracles of the same ops are in dcx.reference.
"""

from typing import Optional

import torch
from torch import Tensor

from dcx._native import available, op

__all__ = [
    "masked_sgd_step_", "masked_adamw_step_", "centroid_grad", "kmeans1d", "spqmm", "spqmm_decode", "spqmm_int8",
    "huffman_code_lengths", "huffman_encode", "huffman_decode",
]

def _fake(name):
    """torch.library.register_fake for dcx::name (nothing when the kernels are not built)."""
    if available():
        return torch.library.register_fake(f"dcx::{name}")
    return lambda fn: fn


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


@_fake("masked_sgd_step_")
def _(param, grad, mask, momentum_buffer, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
      nesterov=False, maximize=False, init_buffer=False):
    return None


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
    """One fused, in-place AdamW step that keeps pruned weights and their moments at exactly zero.

    param, grad, exp_avg, exp_avg_sq (and max_exp_avg_sq, required with amsgrad): the same shape
    and dtype (float32, float16 or bfloat16); arithmetic is float32 in the order of
    torch.optim.AdamW's single-tensor step, rounded to the dtype once. mask: bool or uint8 of
    param's shape, 0 = pruned. step: the step number counted from 1 (AdamW's state["step"] after
    its increment), which the bias corrections take.
    """
    op("masked_adamw_step_")(
        param, grad, mask, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1, beta2, eps,
        weight_decay, amsgrad, maximize,
    )


@_fake("masked_adamw_step_")
def _(param, grad, mask, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, beta1=0.9, beta2=0.999,
      eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False):
    return None


def centroid_grad(
    grad: Tensor, labels: Tensor, num_clusters: int, mask: Optional[Tensor] = None,
    check: bool = True,
) -> Tensor:
    """Sum of `grad` over the positions of each label: the gradient of a shared-weight codebook.

    grad: float tensor of any shape; labels: int32/int64 of grad's shape, in [0, num_clusters)
    where mask is set; mask: optional bool/uint8, 0 = excluded. Returns [num_clusters] in grad's
    dtype (float32 accumulation, float64 for float64). Deterministic on CPU. Labels outside the
    range are never written; check=True raises RuntimeError for them (on CUDA one host sync,
    which check=False skips: a training step over labels the clustering made needs no check).
    """
    return op("centroid_grad")(grad, labels, num_clusters, mask, check)


@_fake("centroid_grad")
def _(grad, labels, num_clusters, mask=None, check=True):
    torch._check(num_clusters >= 1, lambda: f"num_clusters must be >= 1, got {num_clusters}")
    return grad.new_empty((num_clusters,))


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
    """1-D k-means of all elements of `values` (float32 or float64, any shape, finite).

    Returns (centroids, labels): centroids [num_clusters] in values' dtype, ascending; labels int32
    of values' shape, each value's nearest centroid (ties to the lower one). init: "linear"
    (evenly spaced from min to max, Deep Compression's choice), "density" (evenly spaced
    quantiles), "random" (Forgy: distinct values drawn with `seed`), "kmeans++". method: "lloyd"
    (Lloyd's iterations on the sorted values, O(k log n) each) or "optimal" (the globally optimal
    clustering by dynamic programming, O(k n log n) time, 4 k n bytes; init is then unused).
    tol: stop when the squared centroid shift summed over clusters is <= tol x the variance
    (sklearn's rule); tol=0 runs to the fixed point (or max_iter).
    With no more distinct values than clusters the centroids are those values (ascending, the
    spare ones repeating the largest); empty clusters are re-seeded with the value farthest from
    its centroid; no values gives zero centroids. The same seed gives the same labels on CPU
    and CUDA.

    weights: one per value (values' shape, dtype and device; finite and > 0), for weighted
    k-means: the objective is sum weights * (values - centroid)^2, each centroid the weighted
    mean of its cluster (sklearn's sample_weight), e.g. a weight's importance to a layer's
    outputs. density then takes quantiles of the weight, kmeans++ draws in proportion to it,
    the tolerance scales by the weighted variance; linear and random ignore it.
    """
    return op("kmeans1d")(values, num_clusters, init, max_iter, tol, seed, method, weights)


@_fake("kmeans1d")
def _(values, num_clusters, init="linear", max_iter=300, tol=1e-4, seed=0, method="lloyd",
      weights=None):
    torch._check(num_clusters >= 1, lambda: f"num_clusters must be >= 1, got {num_clusters}")
    torch._check(
        values.dtype in (torch.float32, torch.float64),
        lambda: f"values must be float32 or float64, got {values.dtype}",
    )
    if weights is not None:
        torch._check(weights.shape == values.shape,
                     lambda: f"weights must have the shape of values {tuple(values.shape)}, "
                             f"got {tuple(weights.shape)}")
    return values.new_empty((num_clusters,)), values.new_empty(values.shape, dtype=torch.int32)


def huffman_code_lengths(freqs: Tensor, max_length: int = 24) -> Tensor:
    """Optimal Huffman code lengths of at most `max_length` bits (package-merge), CPU only.

    freqs: int64 [n] symbol counts, n <= 65536. Returns uint8 [n]: 0 for absent symbols, 1 when a
    single symbol is present. Deterministic (ties broken by symbol index).
    """
    return op("huffman_code_lengths")(freqs, max_length)


@_fake("huffman_code_lengths")
def _(freqs, max_length=24):
    return freqs.new_empty(freqs.shape, dtype=torch.uint8)


def huffman_encode(symbols: Tensor, code_lengths: Tensor) -> Tensor:
    """Canonical Huffman bitstream of `symbols` (read flat), CPU only.

    symbols: uint8, uint16, int16, int32 or int64, each in [0, n) with a non-zero code length;
    code_lengths: uint8 [n] (from huffman_code_lengths). Returns uint8 [ceil(bits / 8)], codes
    packed MSB first, the last byte padded with zero bits.
    """
    return op("huffman_encode")(symbols, code_lengths)


@_fake("huffman_encode")
def _(symbols, code_lengths):
    nbytes = torch.library.get_ctx().new_dynamic_size()
    return symbols.new_empty((nbytes,), dtype=torch.uint8)


def huffman_decode(data: Tensor, code_lengths: Tensor, count: int) -> Tensor:
    """Decodes exactly `count` symbols from a huffman_encode bitstream, CPU only.

    data: uint8 [nbytes]; code_lengths: uint8 [n]. Returns uint8 [count] when n <= 256, else
    uint16 [count]. A corrupt stream (unused code, too short, bytes or padding bits left over)
    raises RuntimeError; nothing is read past `data` or written past `count`.
    """
    return op("huffman_decode")(data, code_lengths, count)


@_fake("huffman_decode")
def _(data, code_lengths, count):
    dtype = torch.uint8 if code_lengths.shape[0] <= 256 else torch.uint16
    return data.new_empty((count,), dtype=dtype)


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
    """y = x W^T + bias, W [out_features, in_features] packed by dcx.pack and decoded on the fly.

    x: [..., in_features], float32, float16 or bfloat16; codebook (<= 2^bits entries) and bias
    ([out_features]) float32, float16 or bfloat16, read in the compute dtype; float32
    accumulation. codes: int16 [steps, 16] (sparse mode, with windows, group_ptr and chunks
    int32) or uint8 [out_features, in_features] (dense mode, the others empty); the layout is
    described at the top of csrc/core/spqmm.h. compute (dcx.COMPUTE_MODES): "auto" computes in
    x's dtype, "float32" and "bfloat16" round x to that dtype first, "int8" runs a dense-mode
    layer through the int8 kernels (as spqmm_int8) at the batch and layer sizes where they are
    faster, a sparse-mode one (CPUs with AVX-512 VNNI and VBMI) from 2 rows through the sparse
    int8 kernel and past several hundred rows (by density and size) through the int8 GEMM (rows of W and x quantized
    whole, as dcx.reference.spqmm_int8_gemm). Which
    kernel runs is decided by the table in csrc/core/spqmm_plan.h. Returns [..., out_features]
    in x's dtype. From a batch (product of x's leading dims) of `crossover`
    on (-1: the plan's measured default), W is decoded once and the BLAS runs instead.
    Corrupted packed data (ids >= codebook size, columns >= in_features, bad pointers) raises
    RuntimeError; on CUDA that costs one host sync, which check=False skips (reads stay in
    bounds either way; a CUDA graph capture never syncs). scale: a scaled codebook's
    [out_features] row scales (W = scale[row] * codebook[id]; float), applied to each output
    before the bias, whichever kernel runs; or, with group_size > 0 (a multiple of 32), its
    [out_features, ceil(in_features / group_size)] group scales (W[r, j] = scale[r, j //
    group_size] * codebook[id]), applied by every kernel to the weights it decodes (in sparse
    mode the packer keeps each step's window inside one group: dcx.pack's scale_group).
    """
    return op("spqmm")(
        x, codes, windows, group_ptr, chunks, codebook, out_features, in_features, bits, bias,
        crossover, check, compute, scale, group_size,
    )


@_fake("spqmm")
def _(x, codes, windows, group_ptr, chunks, codebook, out_features, in_features, bits,
      bias=None, crossover=-1, check=True, compute="auto", scale=None, group_size=0):
    torch._check(x.shape[-1] == in_features,
                 lambda: f"x must have in_features = {in_features} elements in its last dimension")
    return x.new_empty((*x.shape[:-1], out_features))


# The gradients of spqmm and spqmm_int8 (grad_x = grad_y W with W from spqmm_decode, grad_bias
# the sum of grad_y over the batch) are registered in C++ (csrc/autograd.cpp): a Python autograd
# kernel runs on every call and cost more than a small layer's product.


def spqmm_decode(
    codes: Tensor,
    windows: Tensor,
    group_ptr: Tensor,
    chunks: Tensor,
    codebook: Tensor,
    out_features: int,
    in_features: int,
    bits: int,
    check: bool = True,
) -> Tensor:
    """The dense weight W [out_features, in_features] a packed layer stands for, in the codebook's
    dtype: codebook[id] where a weight is kept, 0 where pruned. Arguments as spqmm (without x);
    corrupted packed data raises RuntimeError (on CUDA after one host sync; check=False skips
    that sync, reads staying in bounds). The backward of spqmm and spqmm_int8 multiplies by it."""
    return op("spqmm_decode")(codes, windows, group_ptr, chunks, codebook, out_features,
                              in_features, bits, check)


@_fake("spqmm_decode")
def _(codes, windows, group_ptr, chunks, codebook, out_features, in_features, bits, check=True):
    torch._check(out_features >= 0 and in_features >= 0,
                 lambda: "out_features and in_features must be >= 0")
    return codebook.new_empty((out_features, in_features))


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
    """spqmm for a dense-mode layer (uint8 codes) with int8 activations and integer dot products:
    each row of x quantized on the fly in blocks of 32 columns (scale max|x| / 127, round half to
    even), the codebook held as int16 values with one scale (max|c| / 32767), int32 dot products
    per block, their scaled sum in float32 (the rule is written out at the top of
    csrc/core/spqmm_int8.h and, in torch, in dcx.reference.spqmm_int8). Arguments and errors as
    spqmm; returns [..., out_features] in x's dtype. The activations' rounding costs about 1e-2
    relative error per output on random data (all-MiniLM-L6-v2: benchmarks/results/transformer-cpu.md)."""
    return op("spqmm_int8")(x, codes, codebook, out_features, in_features, bits, bias, check,
                            scale, group_size)


@_fake("spqmm_int8")
def _(x, codes, codebook, out_features, in_features, bits, bias=None, check=True, scale=None,
      group_size=0):
    torch._check(codes.dtype == torch.uint8,
                 lambda: "codes must be uint8 (a dense-mode layer: spqmm_int8 serves dense mode only)")
    torch._check(x.shape[-1] == in_features,
                 lambda: f"x must have in_features = {in_features} elements in its last dimension")
    return x.new_empty((*x.shape[:-1], out_features))
