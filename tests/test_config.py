import json

import pytest

from dcx.config import CompressionConfig, ConfigError, EncodeConfig, TrainConfig
from dcx.models import LeNet5, LeNet300100
from dcx.prune import PruneConfig
from dcx.quantize import ClusterConfig


def full_config():
    return CompressionConfig(
        prune=PruneConfig(sparsity=0.9, schedule="iterative", iterations=3, frequency=2,
                          overrides={"fc3": {"sparsity": 0.5}}),
        cluster=ClusterConfig(linear_bits=4, overrides={"fc1": {"bits": 3}}),
        train=TrainConfig(epochs=2, lr=0.1),
        retrain=TrainConfig(epochs=7, lr=0.05, weight_decay=5e-4),
        finetune=TrainConfig(epochs=1, lr=1e-3),
        encode=EncodeConfig(linear_index_bits=5),
        random_seed=7,
    )


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_round_trip_through_files(tmp_path, suffix):
    config = full_config()
    path = config.save(tmp_path / f"run{suffix}")
    back = CompressionConfig.load(path)
    assert back == config
    assert back.to_dict() == config.to_dict()
    if suffix == ".json":
        assert json.loads(path.read_text())["random_seed"] == 7


def test_round_trip_of_defaults_and_nones():
    config = CompressionConfig()
    assert config.prune is None and config.cluster is None
    assert CompressionConfig.loads(config.dumps("yaml")) == config
    assert CompressionConfig.loads(config.dumps("json"), "json") == config
    assert CompressionConfig.loads("") == config  # an empty YAML file is all defaults


@pytest.mark.parametrize(
    "text, match",
    [
        ("retrian: {epochs: 3}", r"unknown key\(s\) \['retrian'\]"),
        ("train: {epochs: -1}", "epochs must be an int >= 0"),
        ("train: {lr: fast}", "lr must be a number"),
        ("train: {momentum: 1.5}", r"momentum must be in \[0, 1\)"),
        ("train: {batch_size: 0}", "batch_size must be an int >= 1"),
        ("encode: {linear_index_bits: 40}", "linear_index_bits must be an int in 1..16"),
        ("prune: {sparsity: 1.5}", r"prune: .*sparsity must be a number in \[0, 1\]"),
        ("prune: {sparsity: 0.5, granularity: diagonal}", "unknown granularity"),
        ("cluster: {linear_bits: 0}", "cluster"),
        ("cluster: {bogus: 1}", "cluster"),
        ("random_seed: -3", "random_seed must be an int >= 0"),
        ("[1, 2]", "config must be a mapping"),
        ("train: {epochs: 2", "cannot parse the yaml config"),
    ],
)
def test_bad_configs_name_the_problem(text, match):
    with pytest.raises(ConfigError, match=match):
        CompressionConfig.loads(text)


def test_bad_file_names(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        CompressionConfig.load(tmp_path / "missing.yaml")
    (tmp_path / "run.txt").write_text("{}")
    with pytest.raises(ConfigError, match=r"must end in \.json, \.yaml or \.yml"):
        CompressionConfig.load(tmp_path / "run.txt")


def test_paper_preset_follows_the_model():
    fc = CompressionConfig.preset("paper", LeNet300100())
    assert fc.prune.sparsity == 0.92 and fc.prune.overrides == {}
    assert fc.cluster.linear_bits == 5 and fc.cluster.conv_bits == 8
    conv = CompressionConfig.preset("paper", LeNet5(), random_seed=3)
    assert conv.prune.overrides == {"conv1": {"sparsity": 0.65}, "conv2": {"sparsity": 0.65}}
    assert conv.random_seed == 3
    with pytest.raises(ConfigError, match="unknown preset"):
        CompressionConfig.preset("tiny")


@pytest.mark.parametrize("name", ["lenet300", "lenet5"])
def test_example_configs_load(name):
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"
    config = CompressionConfig.load(path)
    assert config.prune is not None and config.cluster is not None
    assert "dcx compress --config" in path.read_text()  # the header records the command
