"""Loads the compiled kernels (dcx._C) and says which ops have kernels on which device.

`import dcx` works without the extension; an op called then raises an error that says how to
build it.
"""

import torch

BUILD_HINT = (
    "build the kernels with `pip install --no-build-isolation -e .` in the dcx source tree "
    "(with a CUDA build of torch and nvcc on PATH for the CUDA kernels; DCX_USE_CUDA=1 makes a "
    "missing CUDA toolchain an error)"
)

try:
    from dcx import _C  # loading the library registers torch.ops.dcx.*

    LOAD_ERROR = None
except ImportError as error:  # not built, or built against another torch
    LOAD_ERROR = error

# Every op in the TORCH_LIBRARY(dcx) block of csrc/dcx.cpp.
OP_NAMES = ("masked_sgd_step_", "masked_adamw_step_", "centroid_grad", "kmeans1d", "spqmm", "spqmm_int8", "spqmm_decode")
# Ops with a CPU kernel only, on purpose: the Huffman codec is a file-format step (dcx.save and
# dcx.load), never on the model's path. CI requires CPU and CUDA kernels of every other op.
CPU_ONLY = ("huffman_code_lengths", "huffman_encode", "huffman_decode")
OP_NAMES += CPU_ONLY


def available():
    """True when the compiled extension loaded."""
    return LOAD_ERROR is None


def op(name):
    """The torch op `dcx::name`, or a RuntimeError saying how to build it."""
    if LOAD_ERROR is not None:
        raise RuntimeError(f"dcx kernels are not built ({LOAD_ERROR}); {BUILD_HINT}")
    return getattr(torch.ops.dcx, name)


def kernels():
    """{op name: [dispatch keys with a kernel]} for every dcx op, e.g. {'centroid_grad': ['CPU']}."""
    result = {}
    for name in OP_NAMES:
        keys = []
        if LOAD_ERROR is None:
            for key in ("CPU", "CUDA"):
                if torch._C._dispatch_has_kernel_for_dispatch_key(f"dcx::{name}", key):
                    keys.append(key)
        result[name] = keys
    return result


def spqmm_layout():
    """The packed layout's constants of dcx.ops.spqmm, from the one place that defines them
    (csrc/core/spqmm_layout.h, exported by the compiled extension): rows (per group, = slots per step),
    window (columns one step reaches), live_bit, offset_shift and id_mask (the fields of a
    16-bit slot), nibble_block (columns per block of two-ids-per-byte dense codes), bit_block
    (columns per block of bit-packed dense codes, bits 5 to 7)."""
    if LOAD_ERROR is not None:
        raise RuntimeError(f"dcx kernels are not built ({LOAD_ERROR}); {BUILD_HINT}")
    return dict(_C.SPQMM_LAYOUT)


def spqmm_plan():
    """The rules dcx.ops.spqmm picks its kernel by (csrc/core/spqmm_plan.h, exported by the
    compiled extension), in the order they are tried: dicts of isa (portable, avx2, avx512, cuda,
    avx512vnni: AVX-512 with VNNI and VBMI, which also takes the avx512 rules; avx512amx: with AMX too,
    which takes the rules of both), mode (sparse, dense, int8, bfloat16: a dense layer in bf16
    compute, which the dense rules serve where no bfloat16 rule does; sparse_bfloat16 and
    sparse_int8 likewise for a sparse layer and the sparse rules), rows_below (-1: no bound),
    min_rows, max_density (of sparse mode's slots), min_weights (of the layer, N x K), min_bits
    (of the codes), kernel and block (batch rows per pass; 0: the smallest of 1, 2, 4, 8 that
    holds the batch)."""
    if LOAD_ERROR is not None:
        raise RuntimeError(f"dcx kernels are not built ({LOAD_ERROR}); {BUILD_HINT}")
    return [dict(rule) for rule in _C.SPQMM_PLAN]


def spqmm_plan_rule(isa: str, mode: str, bits: int, density: float, out_features: int,
                    in_features: int, rows: int) -> int:
    """The index in spqmm_plan() of the rule dcx.ops.spqmm takes for a call (-1: none): isa and
    mode by name as there, bits those of the codes, density that of sparse mode's slots (padding
    included)."""
    if LOAD_ERROR is not None:
        raise RuntimeError(f"dcx kernels are not built ({LOAD_ERROR}); {BUILD_HINT}")
    isas = ("portable", "avx2", "avx512", "cuda", "avx512vnni", "avx512amx")
    modes = ("sparse", "dense", "int8", "bfloat16", "sparse_bfloat16", "sparse_int8")
    return _C.spqmm_plan_rule(isas.index(isa), modes.index(mode), bits, density, out_features,
                              in_features, rows)
