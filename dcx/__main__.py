"""`python -m dcx`: the version, and which kernels were built for which device."""

import sys

import torch

import dcx
from dcx._native import BUILD_HINT, LOAD_ERROR


def main():
    print(f"dcx {dcx.__version__} (torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
          f"GPU {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'})")
    if LOAD_ERROR is not None:
        print(f"kernels: not built ({LOAD_ERROR})\n{BUILD_HINT}")
        return 1
    width = max(len(name) for name in dcx.kernels())
    for name, keys in dcx.kernels().items():
        print(f"  {name:<{width}}  {', '.join(keys) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
