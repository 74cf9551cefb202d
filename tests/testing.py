"""Shared test helpers: the device x dtype grids, odd sizes, and tolerances derived from the
arithmetic."""

import pytest
import torch
import torch.nn.functional as F

import dcx

requires_kernels = pytest.mark.skipif(
    not dcx.available(), reason="dcx kernels are not built (pip install --no-build-isolation -e .)"
)

CUDA_SKIP_REASON = "no CUDA GPU on this machine"


def devices():
    """'cpu' always; 'cuda' as a parameter that skips with a reason when no GPU is present."""
    return [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
        ),
    ]


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cpu_isas():
    """The DCX_CPU_ISA values for the CPU kernels, each a parameter that skips with a reason when
    this CPU lacks it (the native tests, csrc/tests, run the AVX-512 kernels on emulated
    intrinsics whatever the CPU)."""
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    flags = _cpu_flags()
    has = {"avx512amx": capability.startswith("AVX512") and _has_amx(flags),
           "avx512vnni": (capability.startswith("AVX512")
                          and {"avx512_vnni", "avx512vbmi"} <= set(flags)),
           "avx512": capability.startswith("AVX512"),
           "avx2": capability.startswith(("AVX512", "AVX2"))}
    return [pytest.param(isa, marks=pytest.mark.skipif(not has.get(isa, True),
                                                       reason=f"this CPU has no {isa.upper()} "
                                                              f"(torch reports {capability})"))
            for isa in ("avx512amx", "avx512vnni", "avx512", "avx2", "generic")]


def cpu_kind():
    """The kind of CPU (an isa name of the kernel table) whose kernels dcx.ops.spqmm runs here
    when DCX_CPU_ISA is not set."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        flags = _cpu_flags()
        if {"avx512_vnni", "avx512vbmi"} <= set(flags):  # the VNNI kind needs VBMI too
            return "avx512amx" if _has_amx(flags) else "avx512vnni"
        return "avx512"
    return "avx2" if capability.startswith("AVX2") else "portable"


def _has_amx(flags):
    """Whether Linux lists what dcx's AMX kernel needs (it also asks the kernel for the tile state
    and falls back to the avx512vnni kind if refused, which these tests would then report)."""
    return {"amx_tile", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx512vbmi"} <= set(flags)


def _cpu_flags():
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
SIZES = [0, 1, 97, 4097, (1 << 20) + 3]


def unit_roundoff(dtype):
    """Half the machine epsilon: the relative error of one rounding in `dtype`."""
    return torch.finfo(dtype).eps / 2


def check_bfloat16(y, x, w, bias=None):
    """y from bfloat16 compute against F.linear in float64 of x and bias rounded to bf16 and the
    float weight w: the kernels round W to bf16 too (AMX, decode + bf16 GEMM) or not (the float
    kernels), so each product may be off by one bf16 rounding of w, each sum by float32's, and
    the result rounds once to bf16."""
    xb = x.to(torch.bfloat16).double()
    b = None if bias is None else bias.to(torch.bfloat16).double()
    expected = F.linear(xb, w.double(), b)
    magnitude = F.linear(xb.abs(), w.double().abs(), None if b is None else b.abs())
    terms = w.shape[1] + 2
    bound = ((terms * unit_roundoff(torch.float32) + unit_roundoff(torch.bfloat16)) * magnitude
             + unit_roundoff(torch.bfloat16) * expected.abs())
    err = (y.double() - expected).abs()
    assert y.shape == expected.shape
    assert (err <= bound * 1.01 + 1e-30).all(), f"max excess {(err - bound).max().item()}"


def noncontiguous(t):
    """The same values as `t` in a view that is not contiguous (every other element of a buffer
    twice as wide)."""
    wide = torch.zeros(*t.shape, 2, dtype=t.dtype, device=t.device)
    wide[..., 0] = t
    return wide[..., 0]


# Batch sizes around every bound the spqmm kernel table uses.
PLAN_ROWS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 15, 16, 17, 23, 24, 31, 32, 33, 63, 64, 65, 79, 80,
             95, 96, 130, 159, 160, 170, 191, 192, 511, 512]

# The kernels that compute int8 by the GEMM's rule (rows of W and of x quantized whole; csrc/core/
# spqmm_int8.h), dcx.reference.spqmm_int8_gemm: the int8 GEMM, the fused kernel in both orders and
# the sparse int8 kernel.
INT8_GEMM_KERNELS = ("int8_gemm", "int8_fused", "int8_dots", "sparse_int8")


def plan_compute(mode):
    """The compute argument of dcx.ops.spqmm that puts a layer in the kernel table's `mode`."""
    return {"int8": "int8", "bfloat16": "bfloat16", "sparse_bfloat16": "bfloat16",
            "sparse_int8": "int8"}.get(mode, "auto")


def sparse_int8_rules(kind, in_features):
    """Whether this kind of CPU has rules of its own for sparse layers in int8 compute, which a
    64 x in_features layer reaches at many rows."""
    from dcx import _native

    rule = _native.spqmm_plan_rule(kind, "sparse_int8", 5, 0.1, 64, in_features, 1 << 20)
    return rule >= 0 and _native.spqmm_plan()[rule]["mode"] == "sparse_int8"


def first_plan_rules(kind, packed_layers):
    """(layer index, mode, batch rows, rule) for the first batch of PLAN_ROWS at which each rule
    of the kernel table (csrc/core/spqmm_plan.h) for this kind of CPU serves one of the packed
    layers (dense ones in "dense", "int8" and "bfloat16" mode, sparse ones in "sparse",
    "sparse_bfloat16" and "sparse_int8"); then asserts every rule of the kind was
    reached: one no batch reaches is a defect of the table."""
    from dcx import _native

    reached = set()
    for i, p in enumerate(packed_layers):
        n, k = p.out_features, p.in_features
        density = 1.0 if p.dense else p.codes.shape[0] * 16 / (n * k)
        for mode in (("dense", "int8", "bfloat16") if p.dense
                     else ("sparse", "sparse_bfloat16", "sparse_int8")):
            for rows in PLAN_ROWS:
                rule = _native.spqmm_plan_rule(kind, mode, p.bits, density, n, k, rows)
                if rule not in reached:
                    reached.add(rule)
                    yield i, mode, rows, rule
    table = _native.spqmm_plan()
    missing = [table[i] for i, r in enumerate(table) if r["isa"] == kind and i not in reached]
    assert not missing, f"rules no batch reaches: {missing}"


requires_gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available")


def two_ranks(worker, out, timeout=300) -> list:
    """Run `worker OUT` on two ranks with torchrun (one thread each) and return what each
    saved as OUT/rank<r>.pt."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(worker), str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
