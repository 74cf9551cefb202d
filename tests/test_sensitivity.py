import functools
import json

import pytest
import torch
from torch.nn import functional as F

from dcx import prune as P
from dcx.data import load_digits
from dcx.models import LeNet300100
from dcx.prune import PruneConfig
from dcx.sensitivity import SensitivityResult, pick_sparsities, sensitivity_analysis, to_overrides


@functools.cache
def digits(split):
    return load_digits(split)


def trained_digits_model():
    x, y = digits("train")
    model = LeNet300100(in_features=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def accuracy(model):
    x, y = digits("test")
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def test_sweep_prunes_one_layer_at_a_time_and_restores():
    model = trained_digits_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def evaluate(m):
        zeros = {n: (m.get_parameter(n + ".weight") == 0).float().mean().item()
                 for n in ("fc1", "fc2", "fc3")}
        calls.append(zeros)
        return accuracy(m)

    sweep = [0.0, 0.5, 0.9, 0.99]
    result = sensitivity_analysis(model, evaluate, sweep, progress=False)
    assert len(calls) == 1 + 3 * len(sweep)
    for i, layer in enumerate(("fc1", "fc2", "fc3")):
        for j, s in enumerate(sweep):
            zeros = calls[1 + i * len(sweep) + j]
            n = model.get_parameter(layer + ".weight").numel()
            assert zeros[layer] == pytest.approx(round(s * n) / n, abs=1e-6)
            assert all(v == 0 for k, v in zeros.items() if k != layer)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert list(result.curves) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert result.baseline > 0.8
    assert result.curves["fc1.weight"][0] == (0.0, result.baseline)
    assert result.curves["fc1.weight"][-1][1] < result.baseline  # 99% of fc1 gone hurts


def test_respects_existing_masks_and_config():
    model = trained_digits_model()
    P.prune_(model, PruneConfig(sparsity=0.5))
    seen = []
    result = sensitivity_analysis(
        model, lambda m: seen.append(m.fc2.weight.eq(0).float().mean().item()) or 0.0,
        [0.0, 0.25, 0.75], config=PruneConfig(sparsity=0.0, overrides={"fc1": None, "fc3": None}),
        progress=False)
    assert list(result.curves) == ["fc2.weight"]
    assert seen == [0.5, 0.5, 0.5, 0.75]  # pruned weights stay pruned


def test_outputs_and_picks(tmp_path):
    result = SensitivityResult(0.98, {
        "fc1.weight": [(0.0, 0.98), (0.5, 0.979), (0.9, 0.975), (0.95, 0.90)],
        "fc2.weight": [(0.0, 0.98), (0.5, 0.96), (0.9, 0.978)],  # a dip stops the pick
    })
    assert pick_sparsities(result, 0.005) == {"fc1.weight": 0.9, "fc2.weight": 0.0}
    assert pick_sparsities(result, 0.05) == {"fc1.weight": 0.9, "fc2.weight": 0.9}
    assert to_overrides({"fc1.weight": 0.9}) == {"fc1.weight": {"sparsity": 0.9}}
    with pytest.raises(ValueError, match="max_drop"):
        pick_sparsities(result, -1)
    assert SensitivityResult.load_json(result.save_json(tmp_path / "s.json")) == result
    assert json.loads((tmp_path / "s.json").read_text())["baseline"] == 0.98
    lines = result.save_csv(tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "layer,sparsity,metric,baseline" and lines[1] == "fc1.weight,0.0,0.98,0.98"
    assert len(lines) == 8
    png = result.plot(tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_picks_feed_a_prune_config():
    model = trained_digits_model()
    result = sensitivity_analysis(model, accuracy, [0.0, 0.5, 0.8], progress=False)
    picks = pick_sparsities(result, 0.02)
    P.prune_(model, PruneConfig(sparsity=0.0, overrides=to_overrides(picks)))
    assert P.sparsity(model) == pytest.approx(picks, abs=1e-3)
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\]"):
        sensitivity_analysis(model, accuracy, [0.5, 1.2], progress=False)
