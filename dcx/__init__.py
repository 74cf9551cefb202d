"""dcx: Deep Compression for PyTorch (pruning, trained quantization, Huffman coding) with kernels
that run the compressed model fast."""

from dcx import ops, reference
from dcx._native import available, kernels
from dcx import quantize
from dcx.quantize import cluster_

__version__ = "0.1.0"

__all__ = ["__version__", "available", "kernels", "ops", "reference", "quantize", "cluster_"]
