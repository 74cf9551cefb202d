import copy
import io
import math

import pytest
import torch

import dcx
from torch import nn

from dcx import prune as P
from dcx.models import LeNet5, LeNet300100
from dcx.prune import PruneConfig, Pruner, prune_
from tests.testing import devices


def lowest_k(scores, k):
    """Oracle: indices of the k lowest scores, ties to the lower index, by a Python sort."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return set(order[:k])


def count(s, n):
    return min(n, math.floor(s * n + 0.5))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.conv1d = nn.Conv1d(4, 6, 5)
        self.fc = nn.Linear(97, 31)
        self.head = nn.Linear(31, 5)
        self.scale = nn.Parameter(torch.randn(13, 7))


# --- criteria against plain torch ------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1), (31, 97), (8, 3, 3, 3), (6, 4, 5)])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.92, 1.0])
def test_element_sparsity_exact(shape, s):
    w = torch.randn(shape)
    mask = P.compute_mask(w, "element", sparsity=s)
    flat = w.abs().reshape(-1).tolist()
    pruned = lowest_k(flat, count(s, len(flat)))
    expected = torch.tensor([i not in pruned for i in range(len(flat))]).reshape(shape)
    assert torch.equal(mask, expected)
    assert int((~mask).sum()) == count(s, w.numel())


def test_ties_are_deterministic():
    w = torch.tensor([[2.0, -1.0, 1.0, 0.0], [1.0, -2.0, 0.0, 1.0]])
    mask = P.compute_mask(w, "element", sparsity=0.5)
    # |w| sorted with index: 0 at 3 and 6, 1 at 1, 2, 4, 7: prune 3, 6, 1, 2.
    expected = torch.tensor([[True, False, False, False], [True, True, False, True]])
    assert torch.equal(mask, expected)
    assert torch.equal(P.compute_mask(w.clone(), "element", sparsity=0.5), expected)


def test_ties_integer_weights_match_oracle():
    w = torch.randint(-3, 4, (50, 40)).float()
    mask = P.compute_mask(w, "element", sparsity=0.37)
    pruned = lowest_k(w.abs().reshape(-1).tolist(), count(0.37, w.numel()))
    assert {i for i, k in enumerate(mask.reshape(-1).tolist()) if not k} == pruned


@pytest.mark.parametrize("thr", [0.0, 0.3, 1.0, 10.0])
def test_absolute_threshold(thr):
    w = torch.randn(40, 30)
    assert torch.equal(P.compute_mask(w, "element", threshold=thr), w.abs() >= thr)
    model = nn.Sequential(nn.Linear(30, 40))
    model[0].weight.data.copy_(w)
    prune_(model, PruneConfig(threshold=thr))
    assert torch.equal(model[0].weight_mask, w.abs() >= thr)
    assert torch.equal(model[0].weight.data, w * (w.abs() >= thr))


def test_han_quality_threshold():
    model = LeNet300100()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    prune_(model, PruneConfig(quality=0.7))
    for name in ("fc1", "fc2", "fc3"):
        w = dense[f"{name}.weight"]
        expected = w.abs() >= 0.7 * w.std()
        assert torch.equal(getattr(model, name).weight_mask, expected)


def test_per_layer_sparsity_on_model():
    model = LeNet300100()
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = P.sparsity(prune_(model, PruneConfig(sparsity=0.92, overrides={
        "fc2": {"sparsity": 0.91}, "re:fc3": {"sparsity": 0.74}})))
    for name, s in (("fc1", 0.92), ("fc2", 0.91), ("fc3", 0.74)):
        w = dense[f"{name}.weight"]
        k = count(s, w.numel())
        assert report[f"{name}.weight"] == k / w.numel()
        kth = w.abs().reshape(-1).sort().values[k - 1]
        mask = getattr(model, name).weight_mask
        assert (w.abs()[~mask] <= kth).all() and (w.abs()[mask] >= kth).all()
        assert (getattr(model, name).weight[~mask] == 0).all()
    assert set(report) == {"fc1.weight", "fc2.weight", "fc3.weight"}  # biases untouched
    assert torch.equal(model.fc1.bias, dense["fc1.bias"])


def test_global_sparsity_one_threshold():
    model = LeNet300100()
    weights = [model.fc1.weight, model.fc2.weight, model.fc3.weight]
    flat = torch.cat([w.detach().abs().reshape(-1) for w in weights])
    prune_(model, PruneConfig(global_sparsity=0.8))
    kept = torch.cat([m.weight_mask.reshape(-1) for m in (model.fc1, model.fc2, model.fc3)])
    assert int((~kept).sum()) == count(0.8, flat.numel())
    assert flat[~kept].max() <= flat[kept].min()
    # Layers end up with different sparsities (one threshold, not one fraction).
    per_layer = P.sparsity(model)
    assert len({round(v, 3) for v in per_layer.values()}) > 1


def test_global_ties_first_layer_first():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].weight.fill_(1.0)
    prune_(model, PruneConfig(global_sparsity=0.5))
    assert not model[0].weight_mask.any() and model[1].weight_mask.all()


# --- structured granularities ----------------------------------------------------------------


@pytest.mark.parametrize("norm", ["l1", "l2"])
@pytest.mark.parametrize("s", [0.25, 0.5, 0.9])
def test_kernel_granularity(norm, s):
    conv = nn.Conv2d(5, 7, 3)
    w = conv.weight.detach().clone()
    prune_(conv, PruneConfig(sparsity=s, granularity="kernel", norm=norm))
    scores = (w.abs().sum((2, 3)) if norm == "l1" else w.square().sum((2, 3)).sqrt()).reshape(-1)
    pruned = lowest_k(scores.tolist(), count(s, 35))
    kernel_kept = conv.weight_mask.reshape(35, 9)
    assert (kernel_kept.all(1) | ~kernel_kept.any(1)).all(), "whole kernels only"
    assert {i for i in range(35) if not kernel_kept[i, 0]} == pruned
    assert (conv.weight.reshape(35, 9)[list(pruned)] == 0).all()


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(6, 10, 3), lambda: nn.Conv1d(6, 10, 5),
                                  lambda: nn.Linear(6, 10)], ids=["conv2d", "conv1d", "linear"])
@pytest.mark.parametrize("granularity", ["filter", "channel"])
def test_filter_and_channel(make, granularity):
    layer = make()
    w = layer.weight.detach().clone()
    prune_(layer, PruneConfig(sparsity=0.5, granularity=granularity, norm="l2"))
    dim = 0 if granularity == "filter" else 1
    other = [d for d in range(w.dim()) if d != dim]
    scores = w.square().sum(other).sqrt()
    pruned = lowest_k(scores.tolist(), count(0.5, w.shape[dim]))
    mask = layer.weight_mask
    for i in range(w.shape[dim]):
        unit = mask.select(dim, i)
        assert bool(unit.all()) == (i not in pruned) and bool(unit.any()) == (i not in pruned)
        if i in pruned:
            assert (layer.weight.select(dim, i) == 0).all()


def test_structured_threshold_is_in_weight_units():
    conv = nn.Conv2d(4, 4, 3)
    w = conv.weight.detach().clone()
    prune_(conv, PruneConfig(threshold=0.1, granularity="kernel"))
    expected = (w.abs().mean((2, 3)) >= 0.1)[:, :, None, None].expand_as(w)
    assert torch.equal(conv.weight_mask, expected)


def test_bias_follows_filters_and_element_bias():
    conv = nn.Conv2d(3, 8, 3)
    prune_(conv, PruneConfig(sparsity=0.5, granularity="filter", include_bias=True))
    filters = conv.weight_mask.reshape(8, -1).all(1)
    assert torch.equal(conv.bias_mask, filters)
    assert (conv.bias[~filters] == 0).all()
    fc = nn.Linear(10, 20)
    b = fc.bias.detach().clone()
    prune_(fc, PruneConfig(sparsity=0.25, include_bias=True))
    pruned = lowest_k(b.abs().tolist(), 5)
    assert {i for i in range(20) if not fc.bias_mask[i]} == pruned


def test_param_selected_by_name_and_regex():
    net = Net()
    report = P.sparsity(prune_(net, PruneConfig(sparsity=0.5, targets=["scale", "re:head.*"])))
    assert set(report) == {"scale", "head.weight", "head.bias"}
    assert net.scale_mask.shape == net.scale.shape and report["scale"] == count(0.5, 91) / 91
    assert not hasattr(net.fc, "weight_mask")


def test_override_precedence_and_exclusion():
    net = Net()
    config = PruneConfig(sparsity=0.5, overrides={
        "re:.*": {"sparsity": 0.1},       # every other layer
        "re:fc|head": {"sparsity": 0.9},  # shadowed by the first regex
        "fc": {"sparsity": 0.3},          # exact beats regex
        "conv1d": None,                   # excluded
    })
    report = P.sparsity(prune_(net, config))
    assert report == {"conv.weight": count(0.1, 216) / 216, "fc.weight": count(0.3, 3007) / 3007,
                      "head.weight": count(0.1, 155) / 155}


def test_override_switches_criterion_and_granularity():
    model = LeNet5()
    w = model.fc2.weight.detach().clone()
    prune_(model, PruneConfig(sparsity=0.5, granularity="kernel",
                              overrides={"re:fc.": {"threshold": 0.02, "granularity": "element"}}))
    assert torch.equal(model.fc2.weight_mask, w.abs() >= 0.02)
    assert P.sparsity(model)["conv2.weight"] == 0.5


# --- schedules ----------------------------------------------------------------------------------


def test_schedule_progress():
    one = PruneConfig(sparsity=0.5, start=3)
    assert [P.schedule_progress(one, t) for t in range(6)] == [None] * 3 + [1.0, None, None]
    it = PruneConfig(sparsity=0.5, schedule="iterative", start=1, frequency=2, iterations=3)
    got = [P.schedule_progress(it, t) for t in range(9)]
    assert got == [None, 1 / 3, None, 2 / 3, None, 1.0, None, None, None]
    gr = PruneConfig(sparsity=0.5, schedule="gradual", frequency=10, iterations=4)
    got = {t: P.schedule_progress(gr, t) for t in range(60)}
    got = {t: p for t, p in got.items() if p is not None}
    assert list(got) == [0, 10, 20, 30, 40]
    assert got == pytest.approx({t: 1 - (1 - t / 40) ** 3 for t in got})


@pytest.mark.parametrize("schedule", ["oneshot", "iterative", "gradual"])
def test_pruner_reaches_target_on_the_right_step(schedule):
    model = LeNet300100()
    config = PruneConfig(sparsity=0.8, schedule=schedule, start=2, frequency=3, iterations=4,
                         initial_sparsity=0.1 if schedule == "gradual" else 0.0)
    pruner = Pruner(model, config)
    n = model.fc1.weight.numel()
    seen = []
    for t in range(20):
        pruned = pruner.step()
        seen.append((t, pruned, P.sparsity(model)["fc1.weight"]))
    steps = [t for t, pruned, _ in seen if pruned]
    final = {"oneshot": 2, "iterative": 11, "gradual": 14}[schedule]
    assert pruner.final_step == final and steps[-1] == final
    assert steps == list(range(2, final + 1, 3))
    for t, _, s in seen:
        if t < 2:
            assert s == 0.0
        if t >= final:
            assert s == count(0.8, n) / n
    if schedule == "gradual":
        for t, _, s in seen:
            if t in steps:
                k = (t - 2) // 3
                target = 0.8 + (0.1 - 0.8) * (1 - k / 4) ** 3
                assert s == count(target, n) / n
    if schedule == "iterative":
        # The same fraction of the survivors each round: density 0.2^(k/4).
        assert [s for t, _, s in seen if t in steps] == [count(1 - 0.2 ** (k / 4), n) / n
                                                         for k in (1, 2, 3, 4)]


def test_masks_are_monotone():
    model = nn.Sequential(nn.Linear(20, 20))
    pruner = Pruner(model, PruneConfig(sparsity=0.5, schedule="iterative", iterations=2))
    pruner.step()
    first = model[0].weight_mask.clone()
    with torch.no_grad():  # move weights so that another set would be lowest
        model[0].weight.copy_(torch.randn(20, 20) * first)
    pruner.step()
    assert not (model[0].weight_mask & ~first).any()
    assert P.sparsity(model)["0.weight"] == 0.5


# --- masks as buffers: forward, state_dict, deepcopy, finalize ---------------------------------


def test_forward_sees_masked_weights_without_a_copy():
    model = LeNet300100()
    prune_(model, PruneConfig(sparsity=0.9))
    names = {n for n, _ in model.named_parameters()}
    assert names == {f"fc{i}.{k}" for i in (1, 2, 3) for k in ("weight", "bias")}  # no *_orig
    x = torch.randn(4, 784)
    expected = model(x)
    with torch.no_grad():  # an optimizer that ignores masks moves pruned weights
        model.fc1.weight.add_(~model.fc1.weight_mask * 5.0)
    out = model(x)  # training mode: the hook zeroes pruned weights first
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (model.fc1.weight[~model.fc1.weight_mask] == 0).all()


def test_state_dict_round_trip():
    model = LeNet5()
    prune_(model, PruneConfig(sparsity=0.7, granularity="kernel",
                              overrides={"re:fc.": {"granularity": "element", "sparsity": 0.9}}))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert {k for k in state if k.endswith("_mask")} == {
        "conv1.weight_mask", "conv2.weight_mask", "fc1.weight_mask", "fc2.weight_mask"}
    fresh = LeNet5()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict(state)
    P.set_masks_(fresh, state)
    fresh.load_state_dict(state)
    for name, mask in P.masks(model).items():
        assert torch.equal(P.masks(fresh)[name], mask)
    for name, p in model.named_parameters():
        assert torch.equal(fresh.get_parameter(name), p)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_loading_dense_weights_reapplies_masks():
    model = LeNet300100()
    prune_(model, PruneConfig(sparsity=0.5))
    dense = LeNet300100().state_dict()
    state = dict(model.state_dict())
    state.update({k: v for k, v in dense.items()})
    model.load_state_dict(state)
    for name, mask in P.masks(model).items():
        assert (model.get_parameter(name)[~mask] == 0).all()


def test_deepcopy_and_pickle():
    model = LeNet300100()
    prune_(model, PruneConfig(sparsity=0.6))
    twin = copy.deepcopy(model)
    assert P.sparsity(twin) == P.sparsity(model)
    twin.fc1.weight_mask.fill_(True)  # the copy's hook reads the copy's masks
    with torch.no_grad():
        twin.fc1.weight.fill_(1.0)
    twin(torch.randn(1, 784))
    assert (twin.fc1.weight == 1).all()
    model(torch.randn(1, 784))
    assert P.sparsity(model)["fc1.weight"] == 0.6
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        loaded.fc2.weight.fill_(1.0)
    loaded(torch.randn(1, 784))
    assert (loaded.fc2.weight[~loaded.fc2.weight_mask] == 0).all()


def test_finalize_pruning_keeps_the_masks_as_state():
    """finalize_pruning_ ends pruning: zeros baked in, the masks stay the layers' state (read by
    cluster_ and save) and stay enforced in training."""
    model = LeNet300100()
    pruner = Pruner(model, PruneConfig(sparsity=0.9))
    pruner.step()
    saved = {k: v.clone() for k, v in P.masks(model).items()}
    assert pruner.finalize() is model
    assert {k: torch.equal(v, saved[k]) for k, v in P.masks(model).items()} == dict.fromkeys(saved, True)
    for name, mask in saved.items():
        assert (model.get_parameter(name)[~mask] == 0).all()
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
    model.train()(torch.randn(1, 784))
    assert (model.fc1.weight[~saved["fc1.weight"]] == 0).all()
    assert P.finalize_pruning_(model) is model


def test_masks_helpers():
    model = LeNet300100()
    prune_(model, PruneConfig(sparsity=0.5, include_bias=True))
    m = P.masks(model)
    assert list(m) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    assert m["fc1.weight"] is model.fc1.weight_mask and m["fc1.weight"].dtype == torch.bool
    assert dcx.state.mask_of(model.fc2.bias) is model.fc2.bias_mask
    assert dcx.state.mask_of(torch.nn.Parameter(torch.ones(2))) is None


# --- config ---------------------------------------------------------------------------------------


def test_config_round_trip():
    config = PruneConfig(sparsity=0.9, granularity="filter", norm="l2", schedule="gradual",
                         iterations=5, frequency=2, targets=["fc1", "re:conv.*"],
                         overrides={"fc1": {"sparsity": 0.5}, "re:conv2": None})
    assert PruneConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown key"):
        PruneConfig.from_dict({"sparsity": 0.5, "sparsty": 0.1})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.5), r"sparsity must be a number in \[0, 1\], got 1.5"),
        (dict(sparsity=-0.1), r"sparsity must be a number in \[0, 1\]"),
        (dict(global_sparsity=2.0), r"global_sparsity must be a number in \[0, 1\]"),
        (dict(sparsity=0.5, granularity="block"), "unknown granularity 'block'"),
        (dict(sparsity=0.5, norm="l3"), "norm must be one of"),
        (dict(), "set one criterion"),
        (dict(sparsity=0.5, threshold=0.1), "exactly one criterion"),
        (dict(threshold=-1.0), "threshold must be a finite number >= 0"),
        (dict(quality=float("nan")), "quality must be a finite number >= 0"),
        (dict(sparsity=0.5, schedule="cubic"), "unknown schedule 'cubic'"),
        (dict(sparsity=0.5, iterations=0), "iterations must be an int >= 1"),
        (dict(sparsity=0.5, frequency=0), "frequency must be an int >= 1"),
        (dict(sparsity=0.5, overrides={"fc1": {"sparsity": 3}}), "override 'fc1': sparsity"),
        (dict(sparsity=0.5, overrides={"fc1": {"sparse": 0.1}}), "unknown field"),
        (dict(sparsity=0.5, overrides={"re:fc[": {}}), "bad regex"),
        (dict(sparsity=0.5, targets="fc1"), "targets must be a list"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(**kwargs)


@pytest.mark.parametrize(
    "config, match",
    [
        (PruneConfig(sparsity=0.5, granularity="kernel"),
         r"granularity 'kernel' needs a convolution weight .* fc1.weight has shape \(300, 784\)"),
        (PruneConfig(sparsity=0.5, overrides={"fc2": {"granularity": "kernel"}}), "fc2.weight"),
        (PruneConfig(sparsity=0.5, targets=["fc9"]), "target 'fc9' matches no module"),
        (PruneConfig(sparsity=0.5, targets=["re:conv.*"]), "matches no module"),
        (PruneConfig(sparsity=0.5, overrides={"fc4": {"sparsity": 0.1}}),
         "override 'fc4' matches no layer of the model"),
        (PruneConfig(sparsity=0.5, targets=["fc1"], overrides={"fc2": None}),
         "override 'fc2' matches no layer it applies to"),
        (PruneConfig(sparsity=0.5, overrides={"re:fc.*": None}), "selects no parameter"),
        (PruneConfig(global_sparsity=0.5, granularity="filter"), "global_sparsity needs element"),
    ],
)
def test_bad_config_for_model(config, match):
    with pytest.raises(ValueError, match=match):
        prune_(LeNet300100(), config)


def test_compute_mask_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of sparsity and threshold"):
        P.compute_mask(torch.randn(3, 3))
    with pytest.raises(ValueError, match="needs a weight with 2 or more dims"):
        P.compute_mask(torch.randn(5), "filter", sparsity=0.5)
    with pytest.raises(TypeError, match="config must be a PruneConfig"):
        Pruner(LeNet300100(), {"sparsity": 0.5})


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("granularity", ["element", "kernel", "filter"])
def test_same_masks_on_every_device(device, granularity):
    model = LeNet5()
    twin = copy.deepcopy(model).to(device)
    config = PruneConfig(sparsity=0.8, granularity=granularity,
                         overrides={"re:fc.": {"granularity": "element"}})
    prune_(model, config)
    prune_(twin, config)
    for name, mask in P.masks(twin).items():
        assert mask.device.type == device
        assert torch.equal(mask.cpu(), P.masks(model)[name])


def test_threshold_criteria_follow_the_schedule():
    model = nn.Sequential(nn.Linear(40, 30))
    w = model[0].weight.detach().clone()
    pruner = Pruner(model, PruneConfig(threshold=0.1, schedule="iterative", iterations=2))
    pruner.step()
    assert torch.equal(model[0].weight_mask, w.abs() >= 0.05)
    pruner.step()
    assert torch.equal(model[0].weight_mask, w.abs() >= 0.1)
    model = nn.Sequential(nn.Linear(40, 30))
    pruner = Pruner(model, PruneConfig(quality=1.0, schedule="gradual", iterations=2))
    pruner.step()  # k = 0: progress 0, nothing pruned
    assert model[0].weight_mask.all()
    w = model[0].weight.detach().clone()
    pruner.step()  # k = 1: progress 1 - 1/8, on the std of the weights as they are
    assert torch.equal(model[0].weight_mask, w.abs() >= 0.875 * w.std())


def test_global_sparsity_on_a_schedule():
    model = LeNet300100()
    total = sum(m.weight.numel() for m in (model.fc1, model.fc2, model.fc3))
    pruner = Pruner(model, PruneConfig(global_sparsity=0.9, schedule="iterative", iterations=3))
    pruned = []
    for _ in range(3):
        pruner.step()
        pruned.append(sum(int((~m).sum()) for m in P.masks(model).values()))
    expected = [count(1 - 0.1 ** (k / 3), total) for k in (1, 2, 3)]
    assert pruned == expected
