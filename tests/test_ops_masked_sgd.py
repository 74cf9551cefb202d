import pytest
import torch

import dcx
from dcx import reference
from tests.testing import FLOAT_DTYPES, SIZES, devices, noncontiguous, requires_kernels, unit_roundoff

pytestmark = requires_kernels

CONFIGS = [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, init_buffer=True),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(momentum=0.5, dampening=0.3, weight_decay=5e-4, maximize=True),
]


def make_inputs(n, dtype, device, density=0.6):
    param = torch.randn(n, device=device).to(dtype)
    grad = torch.randn(n, device=device).to(dtype)
    mask = torch.rand(n, device=device) < density
    buf = torch.randn(n, device=device).to(dtype)
    return param, grad, mask, buf


def tolerance(dtype, device):
    """Both sides compute in float32 and round once to dtype. On CPU both use the same fused
    multiply-adds, so they agree exactly; on CUDA torch's own kernels may round a product
    separately, a few float32 roundings, which can move the final rounding by one ulp of dtype."""
    if device == "cpu":
        return dict(rtol=0, atol=0)
    return dict(rtol=2 * unit_roundoff(dtype) + 8 * unit_roundoff(torch.float32), atol=1e-30)


def run_both(n, dtype, device, config, contiguous=True):
    param, grad, mask, buf = make_inputs(n, dtype, device)
    ref_param, ref_buf = param.clone(), buf.clone()
    momentum = config.get("momentum", 0.0)
    kw = dict(config)
    kw.pop("momentum", None)
    reference.masked_sgd_step_(ref_param, grad, mask, ref_buf if momentum else None, 0.1, momentum, **kw)
    if not contiguous:
        param, grad, mask, buf = map(noncontiguous, (param, grad, mask, buf))
    dcx.ops.masked_sgd_step_(param, grad, mask, buf if momentum else None, 0.1, momentum, **kw)
    return param, buf, ref_param, ref_buf, mask, momentum


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", SIZES[:-1])
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(device, dtype, n, config):
    param, buf, ref_param, ref_buf, mask, momentum = run_both(n, dtype, device, config)
    torch.testing.assert_close(param, ref_param, **tolerance(dtype, device))
    if momentum:
        torch.testing.assert_close(buf, ref_buf, **tolerance(dtype, device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_large_and_pruned_stay_zero(device, dtype):
    param, buf, ref_param, ref_buf, mask, _ = run_both(SIZES[-1], dtype, device, CONFIGS[3])
    torch.testing.assert_close(param, ref_param, **tolerance(dtype, device))
    torch.testing.assert_close(buf, ref_buf, **tolerance(dtype, device))
    assert (param[~mask] == 0).all() and (buf[~mask] == 0).all()
    assert torch.signbit(param[~mask]).logical_not().all(), "pruned weights must be +0.0"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_noncontiguous(device, dtype):
    param, buf, ref_param, ref_buf, _, _ = run_both(4097, dtype, device, CONFIGS[1], contiguous=False)
    torch.testing.assert_close(param, ref_param, **tolerance(dtype, device))
    torch.testing.assert_close(buf, ref_buf, **tolerance(dtype, device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "hyper",
    [
        dict(momentum=0.0),
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
        dict(momentum=0.8, dampening=0.1, weight_decay=1e-3, maximize=True),
    ],
)
def test_equals_torch_sgd_on_kept_positions(device, hyper):
    """Three steps against torch.optim.SGD, whose weights are masked by hand after each step:
    float32 results equal bit for bit on the kept positions (on CPU, where both fuse a*b+c)."""
    torch.manual_seed(1)
    shape = (37, 53)
    mask = torch.rand(shape, device=device) < 0.5
    start = torch.randn(shape, device=device) * mask
    ours = start.clone()
    theirs = torch.nn.Parameter(start.clone())
    sgd = torch.optim.SGD([theirs], lr=0.05, **hyper)
    buf = torch.zeros_like(ours) if hyper["momentum"] else None
    for step in range(3):
        grad = torch.randn(shape, device=device)
        theirs.grad = grad.clone()
        sgd.step()
        with torch.no_grad():
            theirs.mul_(mask)
        kw = {k: v for k, v in hyper.items() if k != "momentum"}
        dcx.ops.masked_sgd_step_(ours, grad, mask, buf, 0.05, hyper["momentum"], init_buffer=step == 0, **kw)
    tol = tolerance(torch.float32, device)
    torch.testing.assert_close(ours[mask], theirs.detach()[mask], **tol)
    assert (ours[~mask] == 0).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_opcheck(device, dtype, momentum):
    param, grad, mask, buf = make_inputs(257, dtype, device)
    args = (param, grad, mask.to(torch.uint8), buf if momentum else None, 0.1, momentum, 0.0, 1e-4, False, False, False)
    torch.library.opcheck(torch.ops.dcx.masked_sgd_step_.default, args)


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph(device):
    param, grad, mask, buf = make_inputs(1000, torch.float32, device)
    expected, expected_buf = param.clone(), buf.clone()
    reference.masked_sgd_step_(expected, grad, mask, expected_buf, 0.1, 0.9)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(p, g, m, b):
        dcx.ops.masked_sgd_step_(p, g, m, b, 0.1, 0.9)
        return p.sum()

    step(param, grad, mask, buf)
    torch.testing.assert_close(param, expected, **tolerance(torch.float32, device))
    torch.testing.assert_close(buf, expected_buf, **tolerance(torch.float32, device))


def call(param, grad, mask, buf=None, lr=0.1, momentum=0.0, **kw):
    dcx.ops.masked_sgd_step_(param, grad, mask, buf, lr, momentum, **kw)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.update(param=a["param"].double(), grad=a["grad"].double()), "param must be float32"),
        (lambda a: a.update(grad=a["grad"].half()), "grad must have the dtype of param"),
        (lambda a: a.update(grad=a["grad"][:-1]), "grad must have the shape of param"),
        (lambda a: a.update(mask=a["mask"].float()), "mask must be bool or uint8"),
        (lambda a: a.update(mask=a["mask"][:5]), "mask must have the shape of param"),
        (lambda a: a.update(momentum=0.9), "momentum_buffer must be given"),
        (lambda a: a.update(momentum=0.9, buf=torch.zeros(3)), "momentum_buffer must have the shape"),
        (lambda a: a.update(lr=-1.0), "lr must be"),
        (lambda a: a.update(lr=float("nan")), "lr must be"),
        (lambda a: a.update(nesterov=True), "nesterov requires momentum"),
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
    with pytest.raises(RuntimeError, match="grad must be on the device of param"):
        call(torch.randn(10, device="cuda"), torch.randn(10), torch.ones(10, dtype=torch.bool, device="cuda"))
