"""The whole pipeline end to end on a small model and data (scikit-learn's digits), in seconds."""

import pytest
import torch

import dcx
from dcx.config import CompressionConfig, ConfigError
from dcx.data import load_digits, loader
from dcx.models import LeNet300100
from dcx.pipeline import DeepCompression, evaluate_accuracy, predictions, seed_everything
from tests.testing import requires_kernels

pytestmark = requires_kernels


def small_config(**changes):
    data = {
        "prune": {"sparsity": 0.8, "schedule": "iterative", "iterations": 2, "frequency": 1},
        "cluster": {"linear_bits": 4},
        "train": {"epochs": 4, "lr": 0.1, "batch_size": 64},
        "retrain": {"epochs": 3, "lr": 0.05, "batch_size": 64},
        "finetune": {"epochs": 1, "lr": 0.001, "batch_size": 64},
        "random_seed": 1,
    }
    data.update(changes)
    return CompressionConfig.from_dict(data)


@pytest.fixture(scope="module")
def digits():
    train_x, train_y = load_digits("train")
    test_x, test_y = load_digits("test")
    return loader(train_x, train_y, 64, shuffle=True, seed=0), loader(test_x, test_y, 500)


def run(tmp_path, digits, config, name="model.dcx"):
    _, test = digits
    seed_everything(config.random_seed)
    model = LeNet300100(in_features=64)
    train = loader(*load_digits("train"), 64, shuffle=True, seed=0)  # fresh: same batch order
    pipeline = DeepCompression(model, config, train_loader=train, test_loader=test, progress=False,
                               log=lambda *a: None, snapshot=True)
    return pipeline.run(tmp_path / name), model


def test_stages_run_sizes_shrink_and_the_file_predicts_the_same(tmp_path, digits):
    result, model = run(tmp_path, digits, small_config())
    names = [s.stage for s in result.stages]
    assert names == ["reference", "pruned", "quantized", "encoded"]
    sizes = [s.size_bytes for s in result.stages]
    assert sizes[0] > sizes[1] > sizes[2], sizes
    assert result.path.stat().st_size == sizes[3] < sizes[1]
    # Seeded: 94.7% for the reference, 96.4% after each stage on this machine. A stage that
    # breaks retraining or sharing costs far more than three points.
    reference = result.stages[0].accuracy
    assert 0.90 <= reference <= 1.0, result.table()
    assert all(s.accuracy >= reference - 0.03 for s in result.stages[1:]), result.table()
    assert result.same_predictions is True
    # The file loads into a fresh model as SparseQuantLinear layers with the same predictions.
    _, test = digits
    loaded = dcx.load(result.path, LeNet300100(in_features=64))
    assert isinstance(loaded.fc1, dcx.SparseQuantLinear)
    assert torch.equal(predictions(loaded, test), predictions(model, test))
    assert evaluate_accuracy(loaded, test) == pytest.approx(result.stages[-1].accuracy)
    # Pruned positions stay pruned through clustering and fine-tuning.
    kept = (model.fc1.weight != 0).float().mean().item()
    assert kept == pytest.approx(0.2, abs=0.01)
    assert list(result.snapshots) == ["fc2.weight"]  # the largest weight
    assert set(result.snapshots["fc2.weight"]) == {"dense", "pruned", "clustered"}
    assert result.centroids["fc2.weight"].numel() <= 16
    assert "| encoded |" in result.table()
    assert result.report.file_bytes == sizes[3]


def test_same_seed_same_file(tmp_path, digits):
    first, _ = run(tmp_path, digits, small_config(train={"epochs": 2, "batch_size": 64}), "a.dcx")
    second, _ = run(tmp_path, digits, small_config(train={"epochs": 2, "batch_size": 64}), "b.dcx")
    assert first.path.read_bytes() == second.path.read_bytes()


def test_quantize_only_and_start_from_given_weights(tmp_path, digits):
    """No pruning, no training: weight sharing of the given weights, stored as codes alone."""
    config = small_config(prune=None, train={"epochs": 0}, finetune={"epochs": 0})
    result, _ = run(tmp_path, digits, config)
    assert [s.stage for s in result.stages] == ["reference", "quantized", "encoded"]
    assert result.same_predictions


def test_configuration_errors(digits):
    train, test = digits
    model = LeNet300100(in_features=64)
    with pytest.raises(ValueError, match="give train_loader or train_fn"):
        DeepCompression(model, small_config(), test_loader=test)
    with pytest.raises(ValueError, match="give test_loader or eval_fn"):
        DeepCompression(model, small_config(), train_loader=train)
    with pytest.raises(ConfigError, match="must be a CompressionConfig"):
        DeepCompression(model, 42, train_loader=train, test_loader=test)
    too_short = small_config(retrain={"epochs": 1})
    pipeline = DeepCompression(model, too_short, train_loader=train, test_loader=test,
                               progress=False, log=lambda *a: None)
    with pytest.raises(ConfigError, match="retrain.epochs"):
        pipeline.run("unused.dcx")


def test_distillation_objective_retrains_from_inputs_only(tmp_path, digits):
    """objective="distill": the loaders give inputs only, retraining after pruning and the
    centroid fine-tuning learn the model's own outputs, each stage's score is the top-1
    agreement with the model as it came in, and the file agrees with the model in memory.
    A dense training phase is a configuration error with it."""
    train, test = digits
    seed_everything(0)
    model = LeNet300100(in_features=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):  # a trained model, as a user brings one
        for x, y in train:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    inputs = [x for x, _ in train]
    held_out = [x for x, _ in test]
    config = small_config(train={"epochs": 0})
    dc = DeepCompression(model, config, train_loader=inputs, test_loader=held_out,
                         objective="distill", progress=False, log=lambda *a: None)
    result = dc.run(tmp_path / "distilled.dcx")
    scores = {s.stage: s.accuracy for s in result.stages}
    assert scores["reference"] == 1.0  # the teacher agrees with itself
    assert scores["encoded"] > 0.9 and result.same_predictions, scores
    with pytest.raises(ConfigError, match="train.epochs must be 0"):
        DeepCompression(LeNet300100(in_features=64), small_config(), train_loader=inputs,
                        test_loader=held_out, objective="distill")
    with pytest.raises(TypeError, match="objective must be"):
        DeepCompression(LeNet300100(in_features=64), config, train_loader=inputs,
                        test_loader=held_out, objective="kl")
