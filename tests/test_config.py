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


def test_the_same_bad_override_gets_the_same_error_from_every_verb():
    """One override rule (dcx.config.layer_overrides) behind convert_, cluster_, prune_ and
    encode_: a pattern naming something that is not a layer they work on gets one message."""
    import dcx
    from torch import nn

    verbs = {
        "ConvertConfig": lambda m: dcx.convert_(m, dcx.ConvertConfig(overrides={"0.bias": {"bits": 3}})),
        "ClusterConfig": lambda m: dcx.cluster_(m, dcx.ClusterConfig(overrides={"0.bias": {"bits": 3}})),
        "PruneConfig": lambda m: dcx.prune_(m, dcx.PruneConfig(sparsity=0.5,
                                                               overrides={"0.bias": {"sparsity": 0.1}})),
        "EncodeConfig": lambda m: dcx.encode_(dcx.cluster_(m), dcx.EncodeConfig(
            overrides={"0.bias": {"index_bits": 3}})),
    }
    for where, verb in verbs.items():
        with pytest.raises(ConfigError) as error:
            verb(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
        message = str(error.value)
        assert message.startswith(f"{where}: override '0.bias' matches no layer it applies to"), message


def test_convert_config_round_trips_and_checks(tmp_path):
    from dcx.config import ConvertConfig

    config = ConvertConfig(sparsity=0.5, bits=4, overrides={"re:fc.*": {"bits": 6}, "fc3": None,
                                                            "fc2": {"scale": "row"}},
                           include="re:fc.*", dense=True, compute="int8", method="gptq",
                           scale="row")
    assert config.include == ["re:fc.*"]
    for suffix in (".yaml", ".json"):
        assert ConvertConfig.load(config.save(tmp_path / f"c{suffix}")) == config
    for bad, match in [({"bits": 9}, r"bits must lie in \[1, 8\]"),
                       ({"sparsity": 1.5}, r"sparsity must be a number in \[0, 1\]"),
                       ({"compute": "fp8"}, "compute must be one of"),
                       ({"overrides": {"fc1": {"index_bits": 3}}},
                        "may set sparsity, bits and scale"),
                       ({"scale": "group"}, r"scale must be one of \(None, 'row', 'a power of two from 32'\)"),
                       ({"scale": 48}, r"scale must be one of .*power of two from 32"),
                       ({"scale": 16}, r"scale must be one of .*power of two from 32"),
                       ({"method": "obs"}, "method must be one of"),
                       ({"exclude": ["re:("]}, "bad regex"),
                       ({"dense": "yes"}, "dense must be true, false or null")]:
        with pytest.raises(ConfigError, match=match):
            ConvertConfig(**bad)


def test_module_name_overrides_reach_layers_that_are_shared_live():
    """After cluster_ the shared weight is rebuilt from its codebook (no Parameter): encode_ and
    prune_ overrides by module name still select it."""
    import dcx
    from torch import nn

    model = dcx.cluster_(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)))
    dcx.encode_(model, dcx.EncodeConfig(overrides={"0": {"index_bits": 3}, "1.weight": None}))
    assert dcx.state.get(model[0]).index_bits == 3 and dcx.state.get(model[1]).index_bits is None
    dcx.prune_(model, dcx.PruneConfig(sparsity=0.5, overrides={"1": None}))
    assert dcx.state.get(model[0]).mask is not None and dcx.state.get(model[1]).mask is None
