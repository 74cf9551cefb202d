import copy

import pytest
import torch
from torch import nn

import dcx
from dcx import quantize
from dcx.quantize import ClusterConfig
from tests.testing import devices, requires_kernels

pytestmark = requires_kernels


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def random_masks(model, density=0.4):
    return {name: torch.rand_like(m.weight) < density
            for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def prune_to(model, masks):
    """The pruning stage's state, from {module name: mask}."""
    return dcx.prune.set_masks_(model, {f"{name}.weight": m for name, m in masks.items()})


def codebooks(model):
    """{module name: (codebook, labels, mask)} of the shared layers, from dcx.state."""
    return {st.module_name: (st.codebook, st.labels, st.mask)
            for st in dcx.state.layers(model).values() if st.shared}


def test_config_validation_and_round_trip():
    config = ClusterConfig(conv_bits=6, overrides={"fc2": {"bits": 2}, r"re:fc\d": {"init": "density"},
                                                   "conv": None})
    assert ClusterConfig.from_dict(config.to_dict()) == config
    for bad, match in [
        (dict(conv_bits=0), "bits must be an int in"),
        (dict(linear_bits=17), "bits must be an int in"),
        (dict(init="forgy"), "init must be one of"),
        (dict(method="exact"), "method must be one of"),
        (dict(mode="log"), "mode must be one of"),
        (dict(tol=-1.0), "tol must be"),
        (dict(overrides={"re:fc[": {"bits": 2}}), "bad regex"),
        (dict(overrides={"fc1": {"colour": 2}}), "unknown field"),
        (dict(overrides={"fc1": 5}), "must be a mapping or None"),
        (dict(overrides={"fc1": {"bits": 40}}), "bits must be an int in"),
    ]:
        with pytest.raises(ValueError, match=match):
            ClusterConfig(**bad)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bitz'\]"):
        ClusterConfig.from_dict({"bitz": 3})


def test_per_layer_bits_and_overrides():
    model = Small()
    config = ClusterConfig(overrides={"fc2": {"bits": 2}, r"re:fc\d": {"bits": 3}, "conv": None})
    assert quantize.cluster_(model, config) is model
    books = codebooks(model)
    assert set(books) == {"fc1", "fc2"}
    assert books["fc1"][0].numel() == 8 and books["fc2"][0].numel() == 4  # exact name wins
    assert isinstance(model.conv.weight, nn.Parameter)
    model2 = quantize.cluster_(Small(), ClusterConfig())
    sizes = {name: b[0].numel() for name, b in codebooks(model2).items()}
    assert sizes == {"conv": 256, "fc1": 32, "fc2": 32}  # the paper's 8 bits conv, 5 bits fc


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", ["kmeans", "linear", "fixed-point"])
def test_weight_is_codebook_of_labels_with_mask(device, mode):
    model = Small().to(device)
    masks = random_masks(model)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in masks}
    quantize.cluster_(prune_to(model, masks), ClusterConfig(mode=mode, linear_bits=4))
    for name, (codebook, labels, mask) in codebooks(model).items():
        module = model.get_submodule(name)
        assert torch.equal(mask, masks[name])
        expected = torch.where(mask, codebook[labels.long()], torch.zeros(()))
        assert torch.equal(module.weight, expected)
        assert (module.weight[~mask] == 0).all()
        # Each kept weight moved to a nearby shared value: within half the largest codebook gap
        # (or, for fixed-point, half a step, the grid covering every weight).
        err = (module.weight - before[name])[mask].abs().max()
        gap = codebook.sort().values.diff().max()
        assert err <= gap / 2 * (1 + 1e-5) + 1e-7


def test_centroid_gradient_is_per_cluster_sum():
    model = Small()
    masks = random_masks(model)
    quantize.cluster_(prune_to(model, masks), ClusterConfig(linear_bits=3, conv_bits=3))
    x = torch.randn(5, 1, 8, 8)
    model(x).square().sum().backward()
    grads = {name: book[0].grad.clone() for name, book in codebooks(model).items()}
    for name, (codebook, labels, mask) in codebooks(model).items():
        # The gradient of the rebuilt weight, by hand: the same loss through a copy of the model
        # whose shared layers are plain weights (finalized) and leaves.
        plain = dcx.finalize_clustering_(copy.deepcopy(model))
        w = plain.get_submodule(name).weight
        plain(x).square().sum().backward()
        expected = torch.zeros(codebook.numel(), dtype=torch.float64)
        for j in range(codebook.numel()):
            expected[j] = w.grad.double()[(labels == j) & mask].sum()
        torch.testing.assert_close(grads[name].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_centroids_lowers_loss_and_keeps_zeros(device, optimizer):
    torch.manual_seed(0)
    teacher = Small().to(device)
    x = torch.randn(256, 1, 8, 8, device=device)
    y = teacher(x).detach()
    student = Small().to(device)
    student.load_state_dict(teacher.state_dict())
    masks = random_masks(student, density=0.5)
    quantize.cluster_(prune_to(student, masks), ClusterConfig(conv_bits=2, linear_bits=2))
    params = quantize.codebook_parameters(student)
    opt = (torch.optim.SGD(params, lr=1e-3, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(params, lr=1e-3))
    labels_before = {n: l.clone() for n, (_, l, _) in codebooks(student).items()}
    loss0 = nn.functional.mse_loss(student(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        nn.functional.mse_loss(student(x), y).backward()
        opt.step()
    loss1 = nn.functional.mse_loss(student(x), y).item()
    assert loss1 < 0.9 * loss0
    for name, (_, labels, mask) in codebooks(student).items():
        assert torch.equal(labels, labels_before[name])  # labels frozen
        assert (student.get_submodule(name).weight[~mask] == 0).all()
    assert quantize.finalize_clustering_(student) is student
    assert not quantize.codebook_parameters(student)  # nothing left to fine-tune
    assert set(codebooks(student)) == set(labels_before)  # the codes stay the layers' state
    for name, mask in masks.items():
        module = student.get_submodule(name)
        assert isinstance(module.weight, nn.Parameter) and (module.weight[~mask] == 0).all()
        assert module.weight[mask].unique().numel() <= 4
    assert abs(nn.functional.mse_loss(student(x), y).item() - loss1) < 1e-6 * (1 + loss1)


def test_masks_are_read_and_reassign():
    model = Small()
    dcx.prune.set_masks_(model, {f"{m}.weight": torch.rand_like(getattr(model, m).weight) < 0.5
                                 for m in ("fc1", "fc2")})
    quantize.cluster_(model, ClusterConfig(linear_bits=3, conv_bits=3, reassign=True))
    books = codebooks(model)
    assert books["conv"][2] is None and books["fc1"][2] is model.fc1.weight_mask
    assert (model.fc1.weight[~model.fc1.weight_mask] == 0).all()
    assert quantize.reassign_(model) == 0  # nothing moved yet: labels are already nearest
    on_first = int(((model.fc1.weight_labels == 0) & model.fc1.weight_mask).sum())
    assert on_first > 0
    with torch.no_grad():
        books["fc1"][0][0] += 10.0  # one centroid far away: its weights move to neighbours
    assert quantize.reassign_(model) == on_first  # exactly those, and nothing in fc2
    assert (model.fc1.weight_labels[model.fc1.weight_mask] != 0).all()


def test_overrides_that_select_nothing_and_tied_weights():
    with pytest.raises(ValueError, match="override 'fc9' matches no layer of the model"):
        quantize.cluster_(Small(), ClusterConfig(overrides={"fc9": {"bits": 2}}))
    with pytest.raises(ValueError, match="override 're:fc3' matches no layer"):
        quantize.cluster_(Small(), ClusterConfig(overrides={"re:fc3": {"bits": 2}}))
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied"):
        quantize.cluster_(tied)
    quantize.cluster_(tied, ClusterConfig(overrides={"0": None, "1": None}))  # excluded: fine


def test_prune_after_cluster_composes():
    """Pruning a shared layer adds its mask to the codebook state: pruned weights are exact
    zeros and leave the clusters' gradients."""
    model = quantize.cluster_(Small(), ClusterConfig(linear_bits=3, conv_bits=3))
    dcx.prune_(model, dcx.PruneConfig(sparsity=0.5))
    for name, (codebook, labels, mask) in codebooks(model).items():
        assert mask is not None and mask.float().mean().item() == pytest.approx(0.5, abs=0.01)
        assert (model.get_submodule(name).weight[~mask] == 0).all()
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert all(c.grad is not None for c in quantize.codebook_parameters(model))


def test_state_dict_and_public_surface():
    model = dcx.cluster_(Small(), ClusterConfig(linear_bits=2, conv_bits=2))
    clone = copy.deepcopy(model)
    assert torch.equal(clone(torch.ones(1, 1, 8, 8)), model(torch.ones(1, 1, 8, 8)))
    keys = set(model.state_dict())
    assert {"fc1.weight_codebook", "fc1.weight_labels"} <= keys and "fc1.weight" not in keys
