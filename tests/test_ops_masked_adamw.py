import pytest
import torch

import dcx
from dcx import reference
from tests.testing import FLOAT_DTYPES, SIZES, devices, noncontiguous, requires_kernels, unit_roundoff

pytestmark = requires_kernels

CONFIGS = [
    dict(),
    dict(weight_decay=0.0),
    dict(amsgrad=True),
    dict(beta1=0.6, beta2=0.9, eps=1e-6, weight_decay=0.1, maximize=True),
    dict(beta1=0.3, beta2=0.99, amsgrad=True, maximize=True),  # lerp's other branch (1 - beta1 >= 0.5)
]


def make_inputs(n, dtype, device, density=0.6):
    param = torch.randn(n, device=device).to(dtype)
    grad = torch.randn(n, device=device).to(dtype)
    mask = torch.rand(n, device=device) < density
    exp_avg = (torch.randn(n, device=device) * 0.1).to(dtype)
    exp_avg_sq = (torch.rand(n, device=device) * 0.1).to(dtype)
    max_sq = (torch.rand(n, device=device) * 0.1).to(dtype)
    return param, grad, mask, exp_avg, exp_avg_sq, max_sq


def tolerance(dtype, device, name="param", step_size=1e-1):
    """Both sides compute in float32 and round once to dtype. On CPU the moments agree exactly
    (the kernel rounds every step as ATen's vectorised kernels do); the weights may not: torch's
    float32 sqrt is its vector library's, within one ulp of the correctly rounded one the kernel
    takes, which moves the step's denominator and so the update by a few float32 ulps, and can
    move the final rounding to dtype by one ulp. On CUDA torch's own kernels may also fuse a
    product or divide differently. A weight that the update nearly cancels keeps the update's
    absolute error: a few ulps of the step size (lr / (1 - beta1^step)) per step."""
    if device == "cpu" and name != "param":
        return dict(rtol=0, atol=0)
    u = unit_roundoff(torch.float32)
    return dict(rtol=2 * unit_roundoff(dtype) + 16 * u, atol=16 * u * step_size)


def run_both(n, dtype, device, config, step=3, contiguous=True):
    param, grad, mask, m, v, x = make_inputs(n, dtype, device)
    amsgrad = config.get("amsgrad", False)
    expected = [t.clone() for t in (param, m, v, x)]
    reference.masked_adamw_step_(expected[0], grad, mask, expected[1], expected[2],
                                 expected[3] if amsgrad else None, step, 1e-2, **config)
    if not contiguous:
        param, grad, mask, m, v, x = map(noncontiguous, (param, grad, mask, m, v, x))
    dcx.ops.masked_adamw_step_(param, grad, mask, m, v, x if amsgrad else None, step, 1e-2, **config)
    return [param, m, v, x], expected, mask, amsgrad


def assert_all_close(got, expected, amsgrad, dtype, device):
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), got, expected):
        if name == "max_exp_avg_sq" and not amsgrad:
            continue
        torch.testing.assert_close(a, b, **tolerance(dtype, device, name),
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", SIZES[:-1])
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(device, dtype, n, config):
    got, expected, _, amsgrad = run_both(n, dtype, device, config)
    assert_all_close(got, expected, amsgrad, dtype, device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_large_and_pruned_stay_zero(device, dtype):
    got, expected, mask, _ = run_both(SIZES[-1], dtype, device, CONFIGS[2], step=1)
    assert_all_close(got, expected, True, dtype, device)
    for t in got:
        assert (t[~mask] == 0).all() and not torch.signbit(t[~mask]).any(), "pruned must be +0.0"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_noncontiguous(device, dtype):
    got, expected, _, amsgrad = run_both(4097, dtype, device, CONFIGS[2], contiguous=False)
    assert_all_close(got, expected, amsgrad, dtype, device)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "hyper",
    [
        dict(),
        dict(weight_decay=0.0, amsgrad=True),
        dict(betas=(0.5, 0.95), eps=1e-6, weight_decay=0.05, maximize=True),
        dict(betas=(0.2, 0.99), amsgrad=True),
    ],
)
def test_equals_torch_adamw_on_kept_positions(device, hyper):
    """Four steps against torch.optim.AdamW (its single-tensor path), whose weights and moments
    are masked by hand after each step: on the kept positions the moments equal bit for bit on
    CPU and the weights within a few float32 ulps (see tolerance); a size that is not a multiple
    of the vector width, so ATen's scalar tail runs too."""
    torch.manual_seed(1)
    shape = (37, 53)
    mask = torch.rand(shape, device=device) < 0.5
    start = torch.randn(shape, device=device) * mask
    ours = start.clone()
    state = [torch.zeros_like(ours) for _ in range(3)]
    theirs = torch.nn.Parameter(start.clone())
    adamw = torch.optim.AdamW([theirs], lr=0.05, foreach=False, **hyper)
    kw = dict(hyper)
    beta1, beta2 = kw.pop("betas", (0.9, 0.999))
    for step in range(1, 5):
        grad = torch.randn(shape, device=device)
        theirs.grad = grad.clone()
        adamw.step()
        with torch.no_grad():
            theirs.mul_(mask)
            for value in adamw.state[theirs].values():
                if value.shape == shape:
                    value.mul_(mask)
        dcx.ops.masked_adamw_step_(ours, grad, mask, *state, step, 0.05, beta1, beta2, **kw)
    tol = tolerance(torch.float32, device, "param", step_size=4 * 0.05 / (1 - beta1))
    torch.testing.assert_close(ours[mask], theirs.detach()[mask], **tol)
    tol = tolerance(torch.float32, device, "moments")
    torch.testing.assert_close(state[0][mask], adamw.state[theirs]["exp_avg"][mask], **tol)
    torch.testing.assert_close(state[1][mask], adamw.state[theirs]["exp_avg_sq"][mask], **tol)
    assert (ours[~mask] == 0).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck(device, dtype, amsgrad):
    param, grad, mask, m, v, x = make_inputs(257, dtype, device)
    args = (param, grad, mask.to(torch.uint8), m, v, x if amsgrad else None, 2, 1e-3, 0.9, 0.999,
            1e-8, 1e-2, amsgrad, False)
    torch.library.opcheck(torch.ops.dcx.masked_adamw_step_.default, args)


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph(device):
    param, grad, mask, m, v, _ = make_inputs(1000, torch.float32, device)
    expected = [t.clone() for t in (param, m, v)]
    reference.masked_adamw_step_(expected[0], grad, mask, expected[1], expected[2], None, 5, 1e-3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(p, g, k, m, v):
        dcx.ops.masked_adamw_step_(p, g, k, m, v, None, 5, 1e-3)
        return p.sum()

    step(param, grad, mask, m, v)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), (param, m, v), expected):
        torch.testing.assert_close(a, b, **tolerance(torch.float32, device, name))


def call(param, grad, mask, exp_avg=None, exp_avg_sq=None, max_exp_avg_sq=None, step=1, lr=0.1,
         **kw):
    exp_avg = torch.zeros_like(param) if exp_avg is None else exp_avg
    exp_avg_sq = torch.zeros_like(param) if exp_avg_sq is None else exp_avg_sq
    dcx.ops.masked_adamw_step_(param, grad, mask, exp_avg, exp_avg_sq, max_exp_avg_sq, step, lr, **kw)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(param=a["param"].double(), grad=a["grad"].double()), "param must be float32"),
        (lambda a: a.update(grad=a["grad"].half()), "grad must have the dtype of param"),
        (lambda a: a.update(grad=a["grad"][:-1]), "grad must have the shape of param"),
        (lambda a: a.update(mask=a["mask"].float()), "mask must be bool or uint8"),
        (lambda a: a.update(mask=a["mask"][:5]), "mask must have the shape of param"),
        (lambda a: a.update(exp_avg=torch.zeros(3)), "exp_avg must have the shape of param"),
        (lambda a: a.update(exp_avg_sq=torch.zeros(10).half()), "exp_avg_sq must have the dtype"),
        (lambda a: a.update(amsgrad=True), "max_exp_avg_sq must be given"),
        (lambda a: a.update(amsgrad=True, max_exp_avg_sq=torch.zeros(4)), "max_exp_avg_sq must have the shape"),
        (lambda a: a.update(step=0), "step must be >= 1"),
        (lambda a: a.update(lr=-1.0), "lr must be"),
        (lambda a: a.update(lr=float("nan")), "lr must be"),
        (lambda a: a.update(beta1=1.0), "beta1 must lie in"),
        (lambda a: a.update(beta2=float("nan")), "beta2 must lie in"),
        (lambda a: a.update(eps=-1e-8), "eps must be"),
        (lambda a: a.update(weight_decay=-1.0), "weight_decay must be"),
    ],
)
def test_bad_input(mutate, match):
    args = dict(param=torch.randn(10), grad=torch.randn(10), mask=torch.ones(10, dtype=torch.bool))
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        call(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_bad_input_device_mismatch():
    param = torch.randn(10, device="cuda")
    with pytest.raises(RuntimeError, match="grad must be on the device of param"):
        call(param, torch.randn(10), torch.ones(10, dtype=torch.bool, device="cuda"))
