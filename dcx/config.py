"""Every config of dcx as a validated dataclass, the one per-layer override rule, and the whole run
as one config with a YAML and JSON round trip.

    config = CompressionConfig.load("configs/lenet300.yaml")
    config.save("run.json")                  # .json or .yaml/.yml, by suffix

Stage configs: PruneConfig (dcx.prune_), ClusterConfig (dcx.cluster_), EncodeConfig (dcx.encode_),
TrainConfig (the training phases of the pipeline). Every class validates itself in __post_init__
and from_dict rejects unknown keys, so a typo in a YAML file is an error that names the key, not
a silent default. This module imports no stage: the stages import their configs from here.

Per-layer overrides, one rule for every config and for dcx.convert: `overrides` maps a pattern to
the settings of the layers it selects (or None: leave those layers alone). A pattern is a name,
the module's ("fc3") or the parameter's ("fc3.weight"), or "re:<regex>" matched against the
whole of either name. An exact name wins over every regex; among regexes the first listed wins.
A pattern that selects no layer of the model is an error that names it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "ConfigError", "PruneConfig", "ClusterConfig", "EncodeConfig", "ConvertConfig", "TrainConfig",
    "CompressionConfig", "PRESETS", "COMPUTE_MODES", "CONVERT_METHODS", "check_compute",
    "check_overrides", "resolve_overrides", "layer_overrides",
]


class ConfigError(ValueError):
    """A config that is malformed: unknown keys, wrong types, values out of range, overrides that
    select nothing."""


# ---------------------------------------------------------------------------------------------
# The override rule


def compile_pattern(pattern: str, where: str):
    """(exact name, None) or (None, compiled regex) for 're:<regex>'."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{where}: override keys must be strings, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            return None, re.compile(pattern[3:])
        except re.error as error:
            raise ConfigError(f"{where}: bad regex in {pattern!r}: {error}") from None
    return pattern, None


def check_overrides(overrides, where: str, check_value=None) -> dict:
    """A validated copy of `overrides` ({pattern: settings dict or None}): keys are strings, regexes
    compile, values are mappings (checked by `check_value(where, value)`) or None."""
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{where}: overrides must be a mapping, got {type(overrides).__name__}")
    result = {}
    for pattern, value in overrides.items():
        compile_pattern(pattern, where)
        if value is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: override {pattern!r} must be a mapping or None, "
                                  f"got {value!r}")
            value = dict(value)
            if check_value is not None:
                check_value(f"{where} override {pattern!r}", value)
        result[pattern] = value
    return result


def resolve_overrides(overrides: Mapping[str, Any], layers: Mapping[str, Sequence[str]],
                      where: str, known: Sequence[str] = ()) -> dict[str, tuple[str, Any]]:
    """Apply the override rule. layers: {layer key: its names (module name, parameter name)}.
    Returns {layer key: (winning pattern, its value)} for every layer a pattern selects.
    Raises ConfigError for a pattern that selects no layer; `known` (every name in the model)
    tells apart a pattern that names something which is not a layer here."""
    compiled = {p: compile_pattern(p, where) for p in overrides}
    exact = {p for p, (name, _) in compiled.items() if name is not None}
    regexes = [(p, rx) for p, (_, rx) in compiled.items() if rx is not None]
    result, selects = {}, set()
    for key, names in layers.items():
        hit = next((n for n in names if n in exact), None)
        matching = [p for p, rx in regexes if any(rx.fullmatch(n) for n in names)]
        selects.update(matching)
        if hit is None and matching:
            hit = matching[0]
        if hit is not None:
            selects.add(hit)
            result[key] = (hit, overrides[hit])
    for pattern in overrides:
        if pattern in selects:
            continue
        name, rx = compiled[pattern]
        if any((n == name) if rx is None else rx.fullmatch(n) for n in known):
            raise ConfigError(f"{where}: override {pattern!r} matches no layer it applies to; "
                              f"layers: {list(layers)}")
        raise ConfigError(f"{where}: override {pattern!r} matches no layer of the model; "
                          f"layers: {list(layers)}")
    return result


def layer_overrides(model, overrides: Mapping[str, Any], keys, where: str
                    ) -> dict[str, tuple[str, Any]]:
    """The override rule over layers of `model`, as every verb applies it: each key is a module
    name ("fc1") or a parameter name ("fc1.weight"), and a pattern may name a layer either way.
    Returns {key: (winning pattern, its value)}; a pattern that selects none of the keys is a
    ConfigError, worded alike for every verb."""
    modules = [n for n, _ in model.named_modules()]
    module_set = set(modules)

    def aliases(key):  # a live-shared weight is no Parameter, so decide by the module names
        if key in module_set:
            return [key, f"{key}.weight" if key else "weight"]
        return [key, key.rpartition(".")[0]]

    keys = list(keys)
    known = modules + [n for n, _ in model.named_parameters()] + keys
    return resolve_overrides(overrides, {key: aliases(key) for key in keys}, where, known)


# ---------------------------------------------------------------------------------------------
# Small checks


def _check(condition, message):
    if not condition:
        raise ConfigError(message)


def _is_int(value, low=0):
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value, low=0.0):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low


def check_fraction(name, value):
    _check(_is_number(value) and value <= 1.0, f"{name} must be a number in [0, 1], got {value!r}")


def _from_dict(cls, data, where):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(names)}")
    try:
        return cls(**copy.deepcopy(dict(data)))
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


class _Config:
    """to_dict / from_dict and the YAML / JSON round trip of every config dataclass."""

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        return _from_dict(cls, data, cls.__name__)

    def dumps(self, fmt: str = "yaml") -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def loads(cls, text: str, fmt: str = "yaml"):
        try:
            if fmt == "json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as error:  # json's ValueError, yaml.YAMLError
            raise ConfigError(f"cannot parse the {fmt} config: {error}") from None
        return cls.from_dict(data if data is not None else {})

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(self.dumps(_format_of(path)))
        return path

    @classmethod
    def load(cls, path):
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return cls.loads(path.read_text(), _format_of(path))


# ---------------------------------------------------------------------------------------------
# Pruning

GRANULARITIES = ("element", "kernel", "filter", "channel")
NORMS = ("l1", "l2")
SCHEDULES = ("oneshot", "iterative", "gradual")
CRITERIA = ("sparsity", "global_sparsity", "threshold", "quality")
PRUNE_LAYER_FIELDS = CRITERIA + ("granularity", "norm", "include_bias")


def _check_prune_layer(where, fields):
    unknown = set(fields) - set(PRUNE_LAYER_FIELDS)
    _check(not unknown, f"{where}: unknown field(s) {sorted(unknown)}; a layer may set "
                        f"{list(PRUNE_LAYER_FIELDS)}")
    chosen = [c for c in CRITERIA if fields.get(c) is not None]
    _check(len(chosen) <= 1, f"{where}: set exactly one criterion of {list(CRITERIA)}, got {chosen}")
    for name in ("sparsity", "global_sparsity"):
        if fields.get(name) is not None:
            check_fraction(f"{where}: {name}", fields[name])
    for name in ("threshold", "quality"):
        value = fields.get(name)
        _check(value is None or (_is_number(value) and math.isfinite(value)),
               f"{where}: {name} must be a finite number >= 0, got {value!r}")
    _check(fields.get("granularity") in (None,) + GRANULARITIES,
           f"{where}: unknown granularity {fields.get('granularity')!r}; expected one of "
           f"{list(GRANULARITIES)}")
    _check(fields.get("norm") in (None,) + NORMS,
           f"{where}: norm must be one of {list(NORMS)}, got {fields.get('norm')!r}")
    _check(fields.get("include_bias") in (None, True, False),
           f"{where}: include_bias must be a bool, got {fields.get('include_bias')!r}")


@dataclass
class PruneConfig(_Config):
    """What dcx.prune_ / dcx.Pruner prune, how much, and when.

    Criteria (exactly one; an override may choose another): sparsity (the fraction of each
    layer's units), global_sparsity (one magnitude threshold over every layer using it),
    threshold (absolute), quality (Han's rule: quality x the layer's weight std).
    granularity: element, kernel, filter or channel (scored by the L1 or L2 `norm`).
    targets: the modules (their weight) or parameters to prune, by name or "re:" pattern
    (default: the weight of every Linear and ConvNd). overrides: the rule at the top of
    dcx.config, over the fields of PRUNE_LAYER_FIELDS.
    schedule: oneshot, iterative or gradual, counted in Pruner.step() calls from `start`,
    every `frequency` steps, `iterations` rounds, ramping from `initial_sparsity`.
    """

    sparsity: float | None = None
    global_sparsity: float | None = None
    threshold: float | None = None
    quality: float | None = None
    granularity: str = "element"
    norm: str = "l1"
    include_bias: bool = False
    targets: list[str] | None = None
    overrides: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    schedule: str = "oneshot"
    start: int = 0
    frequency: int = 1
    iterations: int = 1
    initial_sparsity: float = 0.0

    def __post_init__(self):
        _check_prune_layer("PruneConfig", self.layer_fields())
        _check(any(getattr(self, c) is not None for c in CRITERIA),
               f"PruneConfig: set one criterion of {list(CRITERIA)}")
        _check(self.schedule in SCHEDULES, f"PruneConfig: unknown schedule {self.schedule!r}; "
                                           f"expected one of {list(SCHEDULES)}")
        for name, low in (("start", 0), ("frequency", 1), ("iterations", 1)):
            value = getattr(self, name)
            _check(_is_int(value, low), f"PruneConfig: {name} must be an int >= {low}, got {value!r}")
        check_fraction("PruneConfig: initial_sparsity", self.initial_sparsity)
        if self.targets is not None:
            _check(not isinstance(self.targets, str) and all(isinstance(t, str) for t in self.targets),
                   f"PruneConfig: targets must be a list of names, got {self.targets!r}")
            self.targets = list(self.targets)
            for pattern in self.targets:
                compile_pattern(pattern, "PruneConfig targets")
        self.overrides = check_overrides(self.overrides, "PruneConfig", _check_prune_layer)

    def layer_fields(self) -> dict[str, Any]:
        """The per-layer fields at their config-wide values."""
        return {name: getattr(self, name) for name in PRUNE_LAYER_FIELDS}


# ---------------------------------------------------------------------------------------------
# Weight sharing

INITS = ("linear", "density", "random", "kmeans++")
METHODS = ("lloyd", "optimal")
MODES = ("kmeans", "linear", "fixed-point")
CLUSTER_LAYER_FIELDS = ("bits", "init", "method", "mode", "max_iter", "tol", "seed", "scale")
# A codebook's scaling: None (one codebook for the layer), "row" (w = scale[row] * codebook[id],
# one float16 scale per output row, the codebook shared on the normalised weights) or a group
# size, a power of two from 32 (w = scale[row, column // size] * codebook[id]).
SCALES = (None, "row", "a power of two from 32")


def is_scale(v) -> bool:
    """A valid ClusterConfig.scale: None, "row" or a group size (a power of two from 32)."""
    if v is None or v == "row":
        return True
    return _is_int(v, 32) and v & (v - 1) == 0


def _check_cluster_layer(where, layer):
    unknown = set(layer) - set(CLUSTER_LAYER_FIELDS)
    _check(not unknown, f"{where}: unknown field(s) {sorted(unknown)}; a layer may set "
                        f"{list(CLUSTER_LAYER_FIELDS)}")

    def check(key, ok, expected):
        _check(key not in layer or ok(layer[key]), f"{where}: {key} must be {expected}, "
                                                   f"got {layer.get(key)!r}")

    check("bits", lambda v: _is_int(v, 1) and v <= 16, "an int in [1, 16]")
    check("mode", lambda v: v in MODES, f"one of {MODES}")
    check("init", lambda v: v in INITS, f"one of {INITS}")
    check("method", lambda v: v in METHODS, f"one of {METHODS}")
    check("max_iter", _is_int, "an int >= 0")
    check("tol", lambda v: _is_number(v) and math.isfinite(v), "a finite number >= 0")
    check("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an int")
    check("scale", is_scale, f"one of {SCALES}")


@dataclass
class ClusterConfig(_Config):
    """How dcx.cluster_ shares the weights of each layer.

    conv_bits / linear_bits: codebook size 2^bits for convolutions / every other layer with a
    weight of two or more dimensions (Linear, Embedding, ...); the paper's defaults 8 and 5.
    mode: "kmeans" (1-D k-means, dcx.ops.kmeans1d), "linear" (2^bits evenly spaced values from
    the smallest to the largest surviving weight, nearest assignment) or "fixed-point" (the
    signed fixed-point grid with the fewest fractional bits that still covers max |w|).
    init, method, max_iter, tol, seed: passed to dcx.ops.kmeans1d.
    scale: None; "row": each output row divided by its scale (the RMS of its kept weights,
    rounded to float16) before k-means, the weight then scale[row] * codebook[id] (for layers
    whose rows differ in scale: depthwise convolutions, attention projections); or a group size
    (a power of two from 32): each row's groups of that many columns (of the weight viewed [out,
    -1]) divided by their own RMS, the weight scale[row, column // size] * codebook[id] (for
    rows whose inputs differ in scale, as language models' do; 16 bits per group in the file).
    reassign: keep the weights as clustered so that dcx.quantize.reassign_ can move each weight
    to its nearest fine-tuned centroid.
    overrides: the rule at the top of dcx.config, over the fields of CLUSTER_LAYER_FIELDS.
    """

    conv_bits: int = 8
    linear_bits: int = 5
    mode: str = "kmeans"
    init: str = "linear"
    method: str = "lloyd"
    max_iter: int = 300
    tol: float = 1e-4
    seed: int = 0
    scale: Optional[str | int] = None
    reassign: bool = False
    overrides: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def __post_init__(self):
        for bits in (self.conv_bits, self.linear_bits):
            _check_cluster_layer("ClusterConfig", {"bits": bits})
        _check_cluster_layer("ClusterConfig", {k: getattr(self, k) for k in CLUSTER_LAYER_FIELDS
                                               if k != "bits"})
        _check(isinstance(self.reassign, bool), f"ClusterConfig: reassign must be a bool, got "
                                                f"{self.reassign!r}")
        self.overrides = check_overrides(self.overrides, "ClusterConfig", _check_cluster_layer)

    def layer_fields(self, conv: bool) -> dict[str, Any]:
        """The per-layer fields at their config-wide values for a convolution or another layer."""
        fields = {k: getattr(self, k) for k in CLUSTER_LAYER_FIELDS if k != "bits"}
        return {"bits": self.conv_bits if conv else self.linear_bits, **fields}


# ---------------------------------------------------------------------------------------------
# Encoding


def _check_encode_layer(where, layer):
    _check(set(layer) <= {"index_bits"}, f"{where}: a layer may set only index_bits, got "
                                         f"{sorted(layer)}")
    _check("index_bits" not in layer or (_is_int(layer["index_bits"], 1)
                                         and layer["index_bits"] <= 16),
           f"{where}: index_bits must be an int in 1..16, got {layer.get('index_bits')!r}")


@dataclass
class EncodeConfig(_Config):
    """Stage three (dcx.encode_): bits of a relative index per layer kind (the paper: 4 fully
    connected, 8 conv), and per layer through `overrides` ({pattern: {"index_bits": n}})."""

    linear_index_bits: int = 4
    conv_index_bits: int = 8
    overrides: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("linear_index_bits", "conv_index_bits"):
            value = getattr(self, name)
            _check(_is_int(value, 1) and value <= 16, f"{name} must be an int in 1..16, got {value!r}")
        self.overrides = check_overrides(self.overrides, "EncodeConfig", _check_encode_layer)


# ---------------------------------------------------------------------------------------------
# Post-training conversion

# What a packed layer computes in (dcx.nn describes each mode).
COMPUTE_MODES = ("auto", "float32", "bfloat16", "int8")
# How convert_ chooses masks, codebooks and labels (dcx.calibrate): "plain" is magnitude pruning
# and k-means with nearest assignment; "gptq" and "weighted" need calibration inputs: "gptq"
# second-order pruning and codebook assignment with error feedback, "weighted" the cheap path
# (input-norm pruning and activation-weighted k-means, nearest assignment); "auto" is "gptq"
# when calibration inputs are given.
CONVERT_METHODS = ("auto", "plain", "gptq", "weighted")


def check_compute(compute):
    """`compute` when it is one of COMPUTE_MODES, else ConfigError (a ValueError)."""
    _check(compute in COMPUTE_MODES, f"compute must be one of {COMPUTE_MODES}, got {compute!r}")
    return compute


def _check_convert_layer(where, layer):
    _check(not set(layer) - {"sparsity", "bits", "scale"},
           f"{where}: a layer may set sparsity, bits and scale, got {sorted(layer)}")
    _check(is_scale(layer.get("scale")), f"{where}: scale must be one of {SCALES}, got "
                                         f"{layer.get('scale')!r}")
    _check("bits" not in layer or (_is_int(layer["bits"], 1) and layer["bits"] <= 8),
           f"{where}: bits must lie in [1, 8], got {layer.get('bits')!r}")
    value = layer.get("sparsity", 0.0)
    _check(_is_number(value) and value <= 1.0,
           f"{where}: sparsity must be a number in [0, 1], got {value!r}")


def _check_patterns(name, patterns):
    """None, or a list of override patterns (a single string becomes a list of one)."""
    if patterns is None:
        return None
    patterns = [patterns] if isinstance(patterns, str) else patterns
    _check(isinstance(patterns, (list, tuple)), f"{name} must be a pattern or a list of them, "
                                                f"got {patterns!r}")
    for pattern in patterns:
        compile_pattern(pattern, name)
    return list(patterns)


@dataclass
class ConvertConfig(_Config):
    """Post-training compression (dcx.convert_): every nn.Linear (every convolution with
    conv=True, every nn.Embedding with embeddings=True) pruned to `sparsity` by magnitude, its
    surviving weights shared among 2^bits k-means centroids, and packed where a packed twin runs
    it. overrides: {pattern: {"sparsity": s, "bits": b} or None (left alone)} by the one rule
    (exact module name, then "re:" patterns in order); include / exclude: patterns by the same
    rule, sugar for leaving out every other layer / these layers; dense: force the packed mode
    (None: by density); compute: the packed layers' compute mode (COMPUTE_MODES); method:
    CONVERT_METHODS ("gptq" and "weighted" need calibration inputs, given to convert_); scale:
    None, "row" or a group size (ClusterConfig.scale), per layer too."""

    sparsity: float = 0.0
    bits: int = 5
    overrides: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    include: Optional[list[str]] = None
    exclude: Optional[list[str]] = None
    conv: bool = True
    embeddings: bool = True
    dense: Optional[bool] = None
    compute: str = "auto"
    method: str = "auto"
    scale: Optional[str | int] = None

    def __post_init__(self):
        _check(self.method in CONVERT_METHODS,
               f"method must be one of {CONVERT_METHODS}, got {self.method!r}")
        _check_convert_layer("ConvertConfig", {"sparsity": self.sparsity, "bits": self.bits,
                                               "scale": self.scale})
        self.overrides = check_overrides(self.overrides, "ConvertConfig", _check_convert_layer)
        self.include = _check_patterns("ConvertConfig include", self.include)
        self.exclude = _check_patterns("ConvertConfig exclude", self.exclude)
        for name in ("conv", "embeddings"):
            _check(isinstance(getattr(self, name), bool),
                   f"{name} must be true or false, got {getattr(self, name)!r}")
        _check(self.dense is None or isinstance(self.dense, bool),
               f"dense must be true, false or null, got {self.dense!r}")
        check_compute(self.compute)


# ---------------------------------------------------------------------------------------------
# Training and the whole run


@dataclass
class TrainConfig(_Config):
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


@dataclass
class CompressionConfig(_Config):
    """Everything DeepCompression runs: train -> prune + retrain -> cluster + fine-tune -> encode.

    train: training of the dense reference (epochs 0: start from the model's weights).
    prune / retrain: the pruning criterion and schedule (its steps count retraining epochs) and
    the masked retraining after it. cluster / finetune: weight sharing and the centroid
    fine-tuning. encode: the relative-index bits. random_seed: seeds torch, numpy and Python, so
    a run is reproducible.
    """

    prune: Optional[PruneConfig] = None
    cluster: Optional[ClusterConfig] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    retrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=0.01))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=3, lr=0.001))
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    random_seed: int = 0

    _PARTS = (("prune", PruneConfig, True), ("cluster", ClusterConfig, True),
              ("train", TrainConfig, False), ("retrain", TrainConfig, False),
              ("finetune", TrainConfig, False), ("encode", EncodeConfig, False))

    def __post_init__(self):
        for name, cls, optional in self._PARTS:
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _from_dict(cls, value, name))
            _check((optional and getattr(self, name) is None) or isinstance(getattr(self, name), cls),
                   f"{name} must be a {cls.__name__} or a mapping")
        _check(_is_int(self.random_seed), f"random_seed must be an int >= 0, got {self.random_seed!r}")

    def to_dict(self) -> dict[str, Any]:
        parts = {name: None if getattr(self, name) is None else getattr(self, name).to_dict()
                 for name, _, _ in self._PARTS}
        return {**parts, "random_seed": self.random_seed}

    @classmethod
    def from_dict(cls, data: dict) -> CompressionConfig:
        return _from_dict(cls, data, "config")

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
    from dcx.state import kind  # here, not at the top: config stays importable without torch

    convs = [] if model is None else [
        name for name, m in model.named_modules() if kind(m) == "conv"
    ]
    return {
        "prune": {"sparsity": 0.92, "schedule": "iterative", "iterations": 4, "frequency": 2,
                  "overrides": {name: {"sparsity": 0.65} for name in convs}},
        "cluster": {"linear_bits": 5, "conv_bits": 8},
        "retrain": {"epochs": 12, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0},
        "finetune": {"epochs": 3, "lr": 0.001, "momentum": 0.9},
    }


PRESETS = {"paper": _paper_preset}
