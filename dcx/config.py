"""The whole compression run as one validated config, with a YAML and JSON round trip.

    config = CompressionConfig.load("configs/lenet300.yaml")
    config.save("run.json")                  # .json or .yaml/.yml, by suffix

Each stage keeps its own dataclass beside its code (dcx.prune.PruneConfig,
dcx.quantize.ClusterConfig); this module composes them with the training settings and the
encoding settings. Every class validates itself in __post_init__, and from_dict rejects unknown
keys, so a typo in a YAML file is an error that names the key, not a silent default.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dcx.prune import PruneConfig
from dcx.quantize import ClusterConfig

__all__ = ["TrainConfig", "EncodeConfig", "CompressionConfig", "ConfigError", "PRESETS"]


class ConfigError(ValueError):
    """A config that is malformed: unknown keys, wrong types, values out of range."""


def _from_dict(cls, data, where):
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(names)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


def _check(condition, message):
    if not condition:
        raise ConfigError(message)


def _is_int(value, low=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value, low=0.0):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low


@dataclass
class TrainConfig:
    """One training phase: plain SGD (masked during retraining), cosine learning-rate decay."""

    epochs: int = 0
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    cosine: bool = True

    def __post_init__(self):
        _check(_is_int(self.epochs), f"epochs must be an int >= 0, got {self.epochs!r}")
        _check(_is_number(self.lr), f"lr must be a number >= 0, got {self.lr!r}")
        _check(_is_number(self.momentum) and self.momentum < 1,
               f"momentum must be in [0, 1), got {self.momentum!r}")
        _check(_is_number(self.weight_decay), f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(_is_int(self.batch_size, 1), f"batch_size must be an int >= 1, got {self.batch_size!r}")
        _check(isinstance(self.cosine, bool), f"cosine must be true or false, got {self.cosine!r}")

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclass
class EncodeConfig:
    """Stage three: relative-index bits per layer kind (the paper: 4 fully connected, 8 conv)."""

    linear_index_bits: int = 4
    conv_index_bits: int = 8

    def __post_init__(self):
        for name in ("linear_index_bits", "conv_index_bits"):
            value = getattr(self, name)
            _check(_is_int(value, 1) and value <= 16, f"{name} must be an int in 1..16, got {value!r}")

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclass
class CompressionConfig:
    """Everything DeepCompression runs: train -> prune + retrain -> cluster + fine-tune -> encode.

    train: training of the dense reference (epochs 0: start from the model's weights).
    prune / retrain: the pruning criterion and schedule (its steps count retraining epochs) and
    the masked retraining after it. cluster / finetune: weight sharing and the centroid
    fine-tuning. random_seed: seeds torch, numpy and Python, so a run is reproducible.
    """

    prune: Optional[PruneConfig] = None
    cluster: Optional[ClusterConfig] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    retrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=0.01))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=0.001))
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    random_seed: int = 0

    def __post_init__(self):
        for name, cls in (("prune", PruneConfig), ("cluster", ClusterConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, name))
            _check(getattr(self, name) is None or isinstance(getattr(self, name), cls),
                   f"{name} must be a {cls.__name__} or a mapping")
        for name, cls in (("train", TrainConfig), ("retrain", TrainConfig),
                          ("finetune", TrainConfig), ("encode", EncodeConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, name))
            _check(isinstance(getattr(self, name), cls), f"{name} must be a {cls.__name__} or a mapping")
        _check(_is_int(self.random_seed), f"random_seed must be an int >= 0, got {self.random_seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "prune": None if self.prune is None else self.prune.to_dict(),
            "cluster": None if self.cluster is None else self.cluster.to_dict(),
            "train": self.train.to_dict(),
            "retrain": self.retrain.to_dict(),
            "finetune": self.finetune.to_dict(),
            "encode": self.encode.to_dict(),
            "random_seed": self.random_seed,
        }

    @classmethod
    def from_dict(cls, data: dict) -> CompressionConfig:
        return _from_dict(cls, data, "config")

    def dumps(self, fmt: str = "yaml") -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def loads(cls, text: str, fmt: str = "yaml") -> CompressionConfig:
        try:
            if fmt == "json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except (ValueError, Exception) as error:  # yaml.YAMLError derives from Exception
            raise ConfigError(f"cannot parse the {fmt} config: {error}") from None
        return cls.from_dict(data if data is not None else {})

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(self.dumps(_format_of(path)))
        return path

    @classmethod
    def load(cls, path) -> CompressionConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return cls.loads(path.read_text(), _format_of(path))

    @classmethod
    def preset(cls, name: str, model=None, **changes) -> CompressionConfig:
        """A preset (see PRESETS) for `model`, top-level fields replaced by `changes`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        data = PRESETS[name](model)
        data.update(changes)
        return cls.from_dict(data)


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ConfigError(f"config file {str(path)!r} must end in .json, .yaml or .yml")


def _paper_preset(model=None):
    """Han et al.: fully connected layers pruned to 8-10% and shared with 5 bits, convolutions
    pruned to 35% and shared with 8 bits; iterative pruning with retraining."""
    import torch.nn as nn

    convs = [] if model is None else [
        name for name, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)
    ]
    return {
        "prune": {"sparsity": 0.92, "schedule": "iterative", "iterations": 4, "frequency": 2,
                  "overrides": {name: {"sparsity": 0.65} for name in convs}},
        "cluster": {"linear_bits": 5, "conv_bits": 8},
        "retrain": {"epochs": 12, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
        "finetune": {"epochs": 3, "lr": 0.001, "momentum": 0.9},
    }


PRESETS = {"paper": _paper_preset}
