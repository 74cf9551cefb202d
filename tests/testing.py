"""Shared test helpers: the device x dtype grids, odd sizes, and tolerances derived from the
arithmetic."""

import pytest
import torch

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
    has = {"avx512": capability.startswith("AVX512"),
           "avx2": capability.startswith(("AVX512", "AVX2"))}
    return [pytest.param(isa, marks=pytest.mark.skipif(not has.get(isa, True),
                                                       reason=f"this CPU has no {isa.upper()} "
                                                              f"(torch reports {capability})"))
            for isa in ("avx512", "avx2", "generic")]
SIZES = [0, 1, 97, 4097, (1 << 20) + 3]


def unit_roundoff(dtype):
    """Half the machine epsilon: the relative error of one rounding in `dtype`."""
    return torch.finfo(dtype).eps / 2


def noncontiguous(t):
    """The same values as `t` in a view that is not contiguous (every other element of a buffer
    twice as wide)."""
    wide = torch.zeros(*t.shape, 2, dtype=t.dtype, device=t.device)
    wide[..., 0] = t
    return wide[..., 0]
