"""Encoding (Deep Compression, stage three): the bits of a relative index with which the file
stores each compressed layer's positions (Han et al.: 4 for fully connected layers, 8 for
convolutions, 5 for VGG). `encode_` writes them into the layers' state (dcx.state); dcx.save
reads them, and uses EncodeConfig's defaults for a layer that has none.

    dcx.encode_(model, EncodeConfig(linear_index_bits=5, overrides={"fc3": {"index_bits": 3}}))
    dcx.save(model, "model.dcx")
"""

from torch import nn

from dcx import state
from dcx.config import EncodeConfig, layer_overrides

__all__ = ["EncodeConfig", "encode_"]


def encode_(model: nn.Module, config: EncodeConfig | None = None) -> nn.Module:
    """Set the relative-index bits of every compressed layer of `model` (not packed ones: their
    file form is fixed at pack time) from `config`. Returns the model."""
    config = config or EncodeConfig()
    layers = {name: st for name, st in state.layers(model).items() if not st.packed}
    chosen = layer_overrides(model, config.overrides, layers, "EncodeConfig")
    for name, st in layers.items():
        bits = config.conv_index_bits if st.conv else config.linear_index_bits
        override = chosen.get(name, (None, {}))[1]
        if override is None:
            continue
        state.set_index_bits_(st.module, st.param, override.get("index_bits", bits))
    return model
