"""dcx: Deep Compression for PyTorch (pruning, trained quantization, Huffman coding) with kernels
that run the compressed model fast.

    dcx.prune_ / dcx.Pruner / dcx.MaskedSGD    stage one: pruning and masked retraining
    dcx.cluster_                               stage two: weight sharing, centroid fine-tuning
    dcx.encode_ / dcx.save / dcx.load          stage three: the Huffman-coded .dcx file
    dcx.SparseQuantLinear / dcx.convert_       fast inference on the compressed weights
    dcx.calibrate / convert_(calibration=...)  post-training compression from unlabeled inputs
    dcx.distill_ / dcx.Distillation            retraining from the original model's outputs
    dcx.DeepCompression                        all of it in one run

Every stage writes one compressed state per layer (dcx.state), which every later stage, the
optimizers and the file read; so the verbs compose in any order on any nn.Module.
"""

__version__ = "0.1.0"

from dcx import ops, reference  # noqa: E402
from dcx._native import available, kernels  # noqa: E402

from dcx import config, state  # noqa: E402
from dcx import data, models, optim, prune, quantize, sensitivity  # noqa: E402
from dcx.config import (ClusterConfig, CompressionConfig, ConvertConfig,  # noqa: E402
                        EncodeConfig, PruneConfig, TrainConfig)
from dcx.optim import MaskedAdamW, MaskedSGD, mask_optimizer_  # noqa: E402
from dcx.prune import Pruner, finalize_pruning_, prune_  # noqa: E402
from dcx.quantize import cluster_, finalize_clustering_  # noqa: E402

from dcx import nn, packing  # noqa: E402
from dcx.calibration import calibrate  # noqa: E402
from dcx import distill  # noqa: E402
from dcx.distill import Distillation, distill_  # noqa: E402
from dcx.convert import convert, convert_, pack_layers_  # noqa: E402
from dcx.nn import SparseQuantConv2d, SparseQuantEmbedding, SparseQuantLinear  # noqa: E402
from dcx.packing import pack  # noqa: E402

from dcx import format, hf, io, report  # noqa: E402
from dcx.encode import encode_  # noqa: E402
from dcx.format import FormatError, verify  # noqa: E402
from dcx.io import load, load_state_dict, save  # noqa: E402

from dcx.pipeline import DeepCompression  # noqa: E402

__all__ = [
    "__version__", "available", "kernels", "ops", "reference", "config", "state",
    "data", "models", "optim", "prune", "quantize", "sensitivity", "nn", "packing", "format",
    "io", "report",
    "MaskedAdamW", "MaskedSGD", "mask_optimizer_", "PruneConfig", "Pruner", "finalize_pruning_", "prune_",
    "ClusterConfig", "cluster_", "finalize_clustering_", "EncodeConfig", "encode_",
    "SparseQuantLinear", "SparseQuantConv2d", "SparseQuantEmbedding", "ConvertConfig", "convert_",
    "convert", "pack", "calibrate", "distill", "Distillation", "distill_",
    "pack_layers_", "hf",
    "FormatError", "save", "load", "load_state_dict", "verify",
    "CompressionConfig", "TrainConfig", "DeepCompression",
]
