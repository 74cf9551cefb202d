"""dcx: Deep Compression for PyTorch (pruning, trained quantization, Huffman coding) with kernels
that run the compressed model fast."""

from dcx import ops, reference
from dcx._native import available, kernels
from dcx import quantize
from dcx.quantize import cluster_

__version__ = "0.1.0"

__all__ = ["__version__", "available", "kernels", "ops", "reference"]

# Pruning and masked retraining.
from dcx import data, models, optim, prune, sensitivity  # noqa: E402
from dcx.optim import MaskedSGD, mask_optimizer_  # noqa: E402
from dcx.prune import PruneConfig, Pruner, finalize_, prune_  # noqa: E402

__all__ += ["data", "models", "optim", "prune", "sensitivity", "MaskedSGD", "mask_optimizer_",
            "PruneConfig", "Pruner", "finalize_", "prune_"]
from dcx.format import FormatError, load, save, verify  # noqa: E402

__all__ += ["FormatError", "save", "load", "verify"]
__all__ = ["__version__", "available", "kernels", "ops", "reference", "quantize", "cluster_"]
