"""dcx: Deep Compression for PyTorch (pruning, trained quantization, Huffman coding) with kernels
that run the compressed model fast."""

from dcx import ops, reference
from dcx._native import available, kernels

__version__ = "0.1.0"

__all__ = ["__version__", "available", "kernels", "ops", "reference"]

from dcx import nn  # noqa: E402
from dcx.nn import SparseQuantConv2d, SparseQuantLinear, convert, pack  # noqa: E402

__all__ += ["nn", "SparseQuantLinear", "SparseQuantConv2d", "convert", "pack"]
