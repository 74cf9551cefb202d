"""dcx: Deep Compression for PyTorch (pruning, trained quantization, Huffman coding) with kernels
that run the compressed model fast.

    dcx.prune_ / dcx.Pruner / dcx.MaskedSGD    stage one: pruning and masked retraining
    dcx.cluster_                               stage two: weight sharing, centroid fine-tuning
    dcx.save / dcx.load / dcx.verify           stage three: the Huffman-coded .dcx file
    dcx.SparseQuantLinear / dcx.convert        fast inference on the compressed weights
    dcx.DeepCompression                        all of it in one run
"""

__version__ = "0.1.0"

from dcx import ops, reference  # noqa: E402
from dcx._native import available, kernels  # noqa: E402

from dcx import data, models, optim, prune, quantize, sensitivity  # noqa: E402
from dcx.optim import MaskedSGD, mask_optimizer_  # noqa: E402
from dcx.prune import PruneConfig, Pruner, finalize_, prune_  # noqa: E402
from dcx.quantize import ClusterConfig, cluster_  # noqa: E402

from dcx import nn  # noqa: E402
from dcx.nn import SparseQuantConv2d, SparseQuantLinear, convert, pack  # noqa: E402

from dcx import format, report  # noqa: E402
from dcx.format import FormatError, load, save, verify  # noqa: E402

from dcx.config import CompressionConfig, EncodeConfig, TrainConfig  # noqa: E402
from dcx.pipeline import DeepCompression  # noqa: E402

__all__ = [
    "__version__", "available", "kernels", "ops", "reference",
    "data", "models", "optim", "prune", "quantize", "sensitivity", "nn", "format", "report",
    "MaskedSGD", "mask_optimizer_", "PruneConfig", "Pruner", "finalize_", "prune_",
    "ClusterConfig", "cluster_",
    "SparseQuantLinear", "SparseQuantConv2d", "convert", "pack",
    "FormatError", "save", "load", "verify",
    "CompressionConfig", "EncodeConfig", "TrainConfig", "DeepCompression",
]
