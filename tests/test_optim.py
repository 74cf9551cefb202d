import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dcx import prune as P
from dcx.models import LeNet300100
from dcx.optim import MaskedAdamW, MaskedSGD, mask_optimizer_
from dcx.prune import PruneConfig, prune_
from tests.testing import devices, requires_kernels

HYPERS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(momentum=0.8, dampening=0.1, weight_decay=5e-4),
    dict(momentum=0.5, maximize=True),
]


def train(model, optimizer, steps=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 784, generator=generator)
        y = torch.randint(0, 10, (16,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


@requires_kernels
@pytest.mark.parametrize("hyper", HYPERS)
def test_masked_sgd_equals_torch_sgd_on_kept_positions(hyper):
    """torch.optim.SGD on the same pruned model (its forward sees masked weights through the
    mask hook) gives bit-identical kept weights; MaskedSGD also keeps pruned weights and their
    momentum at +0.0. Biases carry no mask and equal SGD's everywhere."""
    ours = LeNet300100()
    prune_(ours, PruneConfig(sparsity=0.7))
    theirs = LeNet300100()
    P.set_masks_(theirs, ours.state_dict())
    theirs.load_state_dict(ours.state_dict())
    opt_ours = MaskedSGD(ours.parameters(), lr=0.05, **hyper)  # masks found by themselves
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.05, **hyper)
    train(ours, opt_ours)
    train(theirs, opt_theirs)
    for name, p in ours.named_parameters():
        q = theirs.get_parameter(name)
        mask = P.masks(ours).get(name)
        if mask is None:
            assert torch.equal(p, q), name
            continue
        assert torch.equal(p[mask], q[mask]), name
        assert (p[~mask] == 0).all() and not torch.signbit(p[~mask]).any()
        if hyper["momentum"]:
            buf = opt_ours.state[p]["momentum_buffer"]
            assert (buf[~mask] == 0).all()
            assert torch.equal(buf[mask], opt_theirs.state[q]["momentum_buffer"][mask])


@requires_kernels
def test_masked_sgd_first_step_and_dense_match_sgd():
    torch.manual_seed(3)
    a = nn.Linear(30, 20)
    b = nn.Linear(30, 20)
    b.load_state_dict(a.state_dict())
    opt_a = MaskedSGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    for step in range(3):
        x = torch.randn(8, 30)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q), f"step {step}"
    # The state is torch.optim.SGD's: it loads into SGD and continues identically.
    opt_c = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt_c.load_state_dict(opt_a.state_dict())
    x = torch.randn(8, 30)
    for model, opt in ((a, opt_c), (b, opt_b)):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@requires_kernels
def test_masked_sgd_follows_masks_added_later():
    model = LeNet300100()
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, steps=2)
    pruner = P.Pruner(model, PruneConfig(sparsity=0.5))
    pruner.step()
    train(model, opt, steps=3)
    for name, mask in P.masks(model).items():
        p = model.get_parameter(name)
        assert (p[~mask] == 0).all() and (opt.state[p]["momentum_buffer"][~mask] == 0).all()


@requires_kernels
def test_masked_sgd_finds_masks_without_being_told():
    """The issue's trap: MaskedSGD(model.parameters()) after prune_ keeps the model pruned, also
    in a deep copy (relinked at its first forward) and after .to(); masks=model does the same."""
    import copy

    import dcx

    model = dcx.prune_(LeNet300100(), PruneConfig(sparsity=0.9))
    train(model, MaskedSGD(model.parameters(), lr=0.1, momentum=0.9), steps=5)
    assert P.sparsity(model)["fc1.weight"] == pytest.approx(0.9)
    assert (model.fc1.weight == 0).float().mean().item() == pytest.approx(0.9, abs=1e-3)
    clone = copy.deepcopy(model).to(torch.float64).to(torch.float32)
    opt = MaskedSGD(clone.parameters(), lr=0.1, momentum=0.9)
    train(clone, opt, steps=3)
    for name, mask in P.masks(clone).items():
        p = clone.get_parameter(name)
        assert (p[~mask] == 0).all() and (opt.state[p]["momentum_buffer"][~mask] == 0).all()
    explicit = dcx.prune_(LeNet300100(), PruneConfig(sparsity=0.5))
    opt = MaskedSGD(explicit.parameters(), lr=0.1, momentum=0.9, masks=explicit)
    train(explicit, opt, steps=2)
    assert all((explicit.get_parameter(n)[~m] == 0).all() for n, m in P.masks(explicit).items())


@requires_kernels
def test_masked_sgd_with_a_mask_dict_and_closure():
    p = nn.Parameter(torch.randn(50))
    mask = torch.rand(50) < 0.5
    opt = MaskedSGD([p], lr=0.1, momentum=0.9, masks={p: mask})

    def closure():
        opt.zero_grad()
        loss = (p - 3).square().sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0 and (p[~mask] == 0).all() and (p[mask] != 0).all()


def test_masked_sgd_bad_arguments():
    p = nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        MaskedSGD([p], lr=-1.0)
    with pytest.raises(ValueError, match="Nesterov"):
        MaskedSGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="mask has shape"):
        MaskedSGD([p], lr=0.1, masks={p: torch.ones(4, dtype=torch.bool)})
    with pytest.raises(TypeError, match="masks must"):
        MaskedSGD([p], lr=0.1, masks=[torch.ones(5, dtype=torch.bool)])
    with pytest.raises(TypeError, match="masks must map parameters"):
        MaskedSGD([p], lr=0.1, masks={"p": torch.ones(5, dtype=torch.bool)})


ADAMW_HYPERS = [
    dict(lr=1e-3),
    dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.0, amsgrad=True),
    dict(lr=1e-3, eps=1e-6, weight_decay=0.1, maximize=True),
]


@requires_kernels
@pytest.mark.parametrize("hyper", ADAMW_HYPERS)
def test_masked_adamw_equals_torch_adamw_on_kept_positions(hyper):
    """torch.optim.AdamW (single-tensor path) on the same pruned model: the kept weights agree
    to a few float32 ulps per step (torch's float32 sqrt is its vector library's, the kernel's
    is correctly rounded: tests/test_ops_masked_adamw.py), and so the gradients and moments after
    the first step to about as much; MaskedAdamW also keeps pruned weights and every moment at
    +0.0. Biases carry no mask (all kept)."""
    ours = LeNet300100()
    prune_(ours, PruneConfig(sparsity=0.7))
    theirs = LeNet300100()
    P.set_masks_(theirs, ours.state_dict())
    theirs.load_state_dict(ours.state_dict())
    opt_ours = MaskedAdamW(ours.parameters(), **hyper)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), foreach=False, **hyper)
    train(ours, opt_ours)
    train(theirs, opt_theirs)
    moments = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hyper.get("amsgrad") else [])
    for name, p in ours.named_parameters():
        q = theirs.get_parameter(name)
        mask = P.masks(ours).get(name)
        if mask is None:
            mask = torch.ones_like(p, dtype=torch.bool)
        torch.testing.assert_close(p[mask], q[mask], rtol=1e-5, atol=1e-7)
        assert (p[~mask] == 0).all() and not torch.signbit(p[~mask]).any()
        for key in moments:
            mine, other = opt_ours.state[p][key], opt_theirs.state[q][key]
            torch.testing.assert_close(mine[mask], other[mask], rtol=1e-4, atol=1e-9)
            assert (mine[~mask] == 0).all(), (name, key)
        assert opt_ours.state[p]["step"].item() == opt_theirs.state[q]["step"].item() == 4


@requires_kernels
def test_masked_adamw_state_dict_moves_to_and_from_adamw():
    """MaskedAdamW's state is AdamW's: a run continued by the other optimizer after
    load_state_dict stays the same (to the few ulps the two square roots differ by), both
    ways."""
    torch.manual_seed(3)
    a, b = nn.Linear(30, 20), nn.Linear(30, 20)
    b.load_state_dict(a.state_dict())
    hyper = dict(lr=1e-2, weight_decay=1e-2)

    def step(model, opt):
        opt.zero_grad()
        model(torch.randn(8, 30, generator=generator)).square().sum().backward()
        opt.step()

    opt_a, opt_b = MaskedAdamW(a.parameters(), **hyper), torch.optim.AdamW(b.parameters(), foreach=False, **hyper)
    for i in range(2):
        for model, opt in ((a, opt_a), (b, opt_b)):
            generator = torch.Generator().manual_seed(i)
            step(model, opt)
    swapped_a = torch.optim.AdamW(a.parameters(), foreach=False, **hyper)
    swapped_a.load_state_dict(opt_a.state_dict())
    swapped_b = MaskedAdamW(b.parameters(), **hyper)
    swapped_b.load_state_dict(opt_b.state_dict())
    for model, opt in ((a, swapped_a), (b, swapped_b)):
        generator = torch.Generator().manual_seed(7)
        step(model, opt)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@requires_kernels
def test_masked_adamw_follows_masks_added_later_and_dicts():
    model = LeNet300100()
    opt = MaskedAdamW(model.parameters(), lr=1e-2)
    train(model, opt, steps=2)
    P.Pruner(model, PruneConfig(sparsity=0.5)).step()
    train(model, opt, steps=3)
    for name, mask in P.masks(model).items():
        p = model.get_parameter(name)
        assert (p[~mask] == 0).all()
        assert all((opt.state[p][k][~mask] == 0).all() for k in ("exp_avg", "exp_avg_sq"))
    p = nn.Parameter(torch.randn(50))
    mask = torch.rand(50) < 0.5
    opt = MaskedAdamW([p], lr=0.1, masks={p: mask})
    (p - 3).square().sum().backward()
    opt.step()
    assert (p[~mask] == 0).all() and (p[mask] != 0).all()


def test_masked_adamw_bad_arguments():
    p = nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match="Invalid learning rate"):
        MaskedAdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        MaskedAdamW([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Invalid epsilon"):
        MaskedAdamW([p], eps=-1.0)
    with pytest.raises(ValueError, match="mask has shape"):
        MaskedAdamW([p], masks={p: torch.ones(4, dtype=torch.bool)})


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True, foreach=False),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
], ids=["adam", "adamw", "adam-amsgrad", "sgd"])
def test_mask_optimizer_keeps_pruned_weights_and_state_zero(make):
    """Against the same optimizer run by hand (gradients masked before, weights masked after
    each step): kept weights are equal, and pruned weights and per-weight state are +0.0."""
    torch.manual_seed(2)
    mask = torch.rand(40, 30) < 0.3
    start = torch.randn(40, 30) * mask
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    opt = mask_optimizer_(make([ours]), {ours: mask})
    ref = make([theirs])
    for _ in range(5):
        grad = torch.randn(40, 30)
        ours.grad = grad.clone()
        theirs.grad = grad * mask
        opt.step()
        ref.step()
        with torch.no_grad():
            theirs.mul_(mask)
    assert torch.equal(ours[mask], theirs.detach()[mask])
    assert (ours[~mask] == 0).all()
    for value in opt.state[ours].values():
        if torch.is_tensor(value) and value.shape == ours.shape:
            assert (value[~mask] == 0).all()


def test_mask_optimizer_with_model_and_scheduler():
    model = LeNet300100()
    prune_(model, PruneConfig(sparsity=0.8))
    opt = mask_optimizer_(torch.optim.AdamW(model.parameters(), lr=1e-3))  # masks by themselves
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, steps=3)
    scheduler.step()
    for name, mask in P.masks(model).items():
        p = model.get_parameter(name)
        assert (p[~mask] == 0).all()
        assert (opt.state[p]["exp_avg"][~mask] == 0).all()
        assert (opt.state[p]["exp_avg_sq"][~mask] == 0).all()
    with pytest.raises(TypeError, match="optimizer must be"):
        mask_optimizer_(object(), model)
    other = LeNet300100()
    prune_(other, PruneConfig(sparsity=0.5))
    opt = mask_optimizer_(torch.optim.Adam(other.parameters(), lr=1e-3), other)  # masks=model
    train(other, opt, steps=2)
    assert all((other.get_parameter(n)[~m] == 0).all() for n, m in P.masks(other).items())


@requires_kernels
@pytest.mark.parametrize("device", devices())
def test_masked_sgd_on_device(device):
    """On CUDA torch's own SGD kernels may round a product separately (see
    test_ops_masked_sgd.tolerance), so kept weights agree to a few float32 roundings per step."""
    ours = LeNet300100().to(device)
    prune_(ours, PruneConfig(sparsity=0.7))
    theirs = LeNet300100().to(device)
    P.set_masks_(theirs, ours.state_dict())
    theirs.load_state_dict(ours.state_dict())
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt_ours = MaskedSGD(ours.parameters(), **hyper)
    opt_theirs = torch.optim.SGD(theirs.parameters(), **hyper)
    for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            x = torch.randn(16, 784, generator=generator).to(device)
            y = torch.randint(0, 10, (16,), generator=generator).to(device)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for name, mask in P.masks(ours).items():
        p, q = ours.get_parameter(name), theirs.get_parameter(name)
        assert (p[~mask] == 0).all()
        torch.testing.assert_close(p[mask], q[mask], rtol=1e-5, atol=1e-6)
