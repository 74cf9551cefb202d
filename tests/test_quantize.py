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


def test_config_validation_and_round_trip():
    config = ClusterConfig(conv_bits=6, overrides={"fc2": {"bits": 2}, r"fc\d": {"init": "density"}})
    assert ClusterConfig.from_dict(config.to_dict()) == config
    for bad, match in [
        (dict(conv_bits=0), "bits must be an int in"),
        (dict(linear_bits=17), "bits must be an int in"),
        (dict(init="forgy"), "init must be one of"),
        (dict(method="exact"), "method must be one of"),
        (dict(mode="log"), "mode must be one of"),
        (dict(tol=-1.0), "tol must be"),
        (dict(overrides={"fc[": {"bits": 2}}), "not a valid regex"),
        (dict(overrides={"fc1": {"colour": 2}}), "unknown keys"),
        (dict(overrides={"fc1": {"bits": 40}}), "bits must be an int in"),
    ]:
        with pytest.raises(ValueError, match=match):
            ClusterConfig(**bad)
    with pytest.raises(ValueError, match="unknown ClusterConfig keys"):
        ClusterConfig.from_dict({"bitz": 3})


def test_per_layer_bits_and_overrides():
    model = Small()
    config = ClusterConfig(overrides={"fc2": {"bits": 2}, r"fc\d": {"bits": 3}, "conv": {"skip": True}})
    quantize.cluster_(model, config)
    books = quantize.codebooks(model)
    assert set(books) == {"fc1", "fc2"}
    assert books["fc1"][0].numel() == 8 and books["fc2"][0].numel() == 4  # exact name wins
    assert isinstance(model.conv.weight, nn.Parameter)
    model2 = quantize.cluster_(Small(), ClusterConfig())
    sizes = {name: b[0].numel() for name, b in quantize.codebooks(model2).items()}
    assert sizes == {"conv": 256, "fc1": 32, "fc2": 32}  # the paper's 8 bits conv, 5 bits fc


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mode", ["kmeans", "linear", "fixed-point"])
def test_weight_is_codebook_of_labels_with_mask(device, mode):
    model = Small().to(device)
    masks = random_masks(model)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in masks}
    quantize.cluster_(model, ClusterConfig(mode=mode, linear_bits=4), masks=masks)
    for name, (codebook, labels, mask) in quantize.codebooks(model).items():
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
    quantize.cluster_(model, ClusterConfig(linear_bits=3, conv_bits=3), masks=masks)
    x = torch.randn(5, 1, 8, 8)
    model(x).square().sum().backward()
    grads = {name: book[0].grad.clone() for name, book in quantize.codebooks(model).items()}
    for name, (codebook, labels, mask) in quantize.codebooks(model).items():
        module = model.get_submodule(name)
        # The gradient of the rebuilt weight, by hand: the same loss with the weight as a leaf.
        w = module.weight.detach().requires_grad_()
        hook = module._dcx_cluster_hook
        hook.remove()
        module.weight = w
        model(x).square().sum().backward()
        module._dcx_cluster_hook = module.register_forward_pre_hook(quantize._rebuild)
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
    quantize.cluster_(student, ClusterConfig(conv_bits=2, linear_bits=2), masks=masks)
    params = quantize.codebook_parameters(student)
    opt = (torch.optim.SGD(params, lr=1e-3, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(params, lr=1e-3))
    labels_before = {n: l.clone() for n, (_, l, _) in quantize.codebooks(student).items()}
    loss0 = nn.functional.mse_loss(student(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        nn.functional.mse_loss(student(x), y).backward()
        opt.step()
    loss1 = nn.functional.mse_loss(student(x), y).item()
    assert loss1 < 0.9 * loss0
    for name, (_, labels, mask) in quantize.codebooks(student).items():
        assert torch.equal(labels, labels_before[name])  # labels frozen
        assert (student.get_submodule(name).weight[~mask] == 0).all()
    quantize.finalize_(student)
    assert not quantize.codebooks(student)
    for name, mask in masks.items():
        module = student.get_submodule(name)
        assert isinstance(module.weight, nn.Parameter) and (module.weight[~mask] == 0).all()
        assert module.weight[mask].unique().numel() <= 4
    assert abs(nn.functional.mse_loss(student(x), y).item() - loss1) < 1e-6 * (1 + loss1)


def test_mask_buffers_are_read_and_reassign():
    model = Small()
    for m in (model.fc1, model.fc2):
        m.register_buffer("weight_mask", torch.rand_like(m.weight) < 0.5)
    quantize.cluster_(model, ClusterConfig(linear_bits=3, conv_bits=3, reassign=True))
    books = quantize.codebooks(model)
    assert books["conv"][2] is None and books["fc1"][2] is model.fc1.weight_mask
    assert (model.fc1.weight[~model.fc1.weight_mask] == 0).all()
    assert quantize.reassign_(model) == 0  # nothing moved yet: labels are already nearest
    with torch.no_grad():
        books["fc1"][0][0] += 10.0  # one centroid far away: its weights move to neighbours
    assert quantize.reassign_(model) > 0
    assert (model.fc1.weight_labels[model.fc1.weight_mask] != 0).all()


def test_bad_masks():
    with pytest.raises(ValueError, match="must be a bool tensor of shape"):
        quantize.cluster_(Small(), masks={"fc1": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not in the model"):
        quantize.cluster_(Small(), masks={"fc9": torch.ones(3, dtype=torch.bool)})


def test_state_dict_and_public_surface():
    model = dcx.cluster_(Small(), ClusterConfig(linear_bits=2, conv_bits=2))
    clone = copy.deepcopy(model)
    assert torch.equal(clone(torch.ones(1, 1, 8, 8)), model(torch.ones(1, 1, 8, 8)))
    keys = set(model.state_dict())
    assert {"fc1.weight_codebook", "fc1.weight_labels"} <= keys and "fc1.weight" not in keys
