"""Builds the one native extension, dcx._C, with torch.utils.cpp_extension.

Flag tree:
  DCX_USE_CUDA   auto (default) -> CUDA kernels when torch has CUDA (torch.version.cuda)
                                   and nvcc is found; a GPU need not be present
                 1              -> CUDA kernels required; fail if torch or nvcc lack CUDA
                 0              -> CPU kernels only
  TORCH_CUDA_ARCH_LIST          honoured as torch reads it; default "8.0;9.0" (A100, H100/H200)
  DCX_DEBUG=1                   -O0 -g, no NDEBUG
  CUDA library headers          from pip wheels (site-packages/nvidia/*/include) only for the
                                headers the toolkit lacks, searched after the toolkit's (-isystem)
  MAX_JOBS                      parallel compile jobs (ninja), as torch reads it

Sources are found by glob, so a new op only adds files:
  csrc/*.cpp (the op schemas, the gradients), csrc/core/*.cpp, csrc/cpu/*.cpp   always
  csrc/cuda/*.cpp (torch glue), csrc/cuda/*.cu     with CUDA
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _use_cuda():
    import torch

    choice = os.environ.get("DCX_USE_CUDA", "auto").lower()
    if choice not in ("auto", "0", "1"):
        sys.exit(f"DCX_USE_CUDA must be auto, 0 or 1, got {choice!r}")
    if choice == "0":
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    has_nvcc = CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    available = torch.version.cuda is not None and has_nvcc
    if choice == "1" and not available:
        sys.exit(
            "DCX_USE_CUDA=1 but CUDA is not available: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    return available


def _cuda_library_includes(cuda_home):
    """Folders of CUDA library headers shipped as pip wheels (nvidia/cu13/include,
    nvidia/*/include) that hold a header the toolkit at cuda_home lacks: an nvcc-only toolkit has
    no cuBLAS or cuSPARSE headers, which torch's CUDA headers include. They are passed with
    -isystem, so they are searched after the toolkit's own folder (which torch adds with -I): a
    full toolkit's headers always win, and two versions of cuda_fp16.h or crt/ never mix."""
    import site

    toolkit = os.path.join(cuda_home or "", "include")
    have = set(os.listdir(toolkit)) if os.path.isdir(toolkit) else set()
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            dirs += sorted(glob.glob(os.path.join(base, pattern)))
    return [d for d in dict.fromkeys(dirs)
            if os.path.isdir(d) and any(f.endswith(".h") and f not in have for f in os.listdir(d))]


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("DCX_DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    # The C++ standard is left to torch: 2.13 builds with C++17, 2.14 needs C++20.
    # -fno-math-errno -fno-trapping-math: no code reads errno or FP traps, and without them GCC
    # will not if-convert (so not vectorise) loops that select between fmaf results. Neither
    # flag changes a rounded value (no reassociation, no fast-math).
    cxx = opt + ["-fno-math-errno", "-fno-trapping-math"]
    cxx += ["-fopenmp"] if sys.platform != "darwin" else []
    sources = _sources("csrc/*.cpp") + _sources("csrc/core/*.cpp") + _sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    kwargs = dict(name="dcx._C", include_dirs=include_dirs, py_limited_api=False)

    if not _use_cuda():
        return [CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)]

    from torch.utils.cpp_extension import CUDA_HOME

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
    wheel_headers = [flag for d in _cuda_library_includes(CUDA_HOME) for flag in ("-isystem", d)]
    cxx += wheel_headers
    nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"] + wheel_headers
    return [
        CUDAExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx + ["-DDCX_WITH_CUDA"], "nvcc": nvcc},
            **kwargs,
        )
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
