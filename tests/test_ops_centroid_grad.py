import pytest
import torch

import dcx
from dcx import reference
from tests.testing import FLOAT_DTYPES, SIZES, devices, noncontiguous, requires_kernels, unit_roundoff

pytestmark = requires_kernels


def make_inputs(n, k, dtype, device, label_dtype=torch.int64, masked=True):
    grad = torch.randn(n, device=device).to(dtype)
    labels = torch.randint(0, k, (n,), device=device, dtype=label_dtype)
    mask = (torch.rand(n, device=device) < 0.7) if masked else None
    return grad, labels, mask


def check_against_reference(out, grad, labels, k, mask):
    """Each cluster's sum is float32-accumulated (float64 for float64) from values exact in that
    type; the error of a sum of m terms is at most (m - 1) u sum|g|, plus one final rounding to
    grad's dtype."""
    expected = reference.centroid_grad(grad.double(), labels, k, mask)
    abs_sum = reference.centroid_grad(grad.double().abs(), labels, k, mask)
    keep = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    counts = torch.bincount(labels[keep].long().reshape(-1), minlength=k).double()
    acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
    bound = counts * unit_roundoff(acc) * abs_sum + unit_roundoff(grad.dtype) * expected.abs()
    err = (out.double() - expected).abs()
    assert out.dtype == grad.dtype and out.shape == (k,)
    assert (err <= bound * 1.01 + 1e-30).all(), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float64])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("k", [1, 16, 256, 3000])
def test_matches_reference(device, dtype, n, k):
    if n > 5000 and k not in (16, 3000):
        pytest.skip("large inputs: one fast-path and one general-path k suffice")
    grad, labels, mask = make_inputs(n, k, dtype, device)
    check_against_reference(dcx.ops.centroid_grad(grad, labels, k, mask), grad, labels, k, mask)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("masked", [False, True])
def test_label_dtypes_and_no_mask(device, label_dtype, masked):
    grad, labels, mask = make_inputs(4097, 32, torch.float32, device, label_dtype, masked)
    check_against_reference(dcx.ops.centroid_grad(grad, labels, 32, mask), grad, labels, 32, mask)


@pytest.mark.parametrize("device", devices())
def test_noncontiguous_and_2d(device):
    grad, labels, mask = make_inputs(64 * 33, 8, torch.float32, device)
    grad, labels, mask = (t.view(64, 33) for t in (grad, labels, mask))
    out = dcx.ops.centroid_grad(noncontiguous(grad), noncontiguous(labels), 8, noncontiguous(mask))
    check_against_reference(out, grad, labels, 8, mask)


def test_cpu_deterministic():
    grad, labels, mask = make_inputs((1 << 20) + 3, 256, torch.float32, "cpu")
    first = dcx.ops.centroid_grad(grad, labels, 256, mask)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = dcx.ops.centroid_grad(grad, labels, 256, mask)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)
    assert torch.equal(first, dcx.ops.centroid_grad(grad, labels, 256, mask))


def test_masked_labels_are_not_validated():
    """Pruned positions may hold any label (e.g. -1): they are excluded, not checked."""
    grad = torch.ones(6)
    labels = torch.tensor([0, -1, 1, 99, 1, 0])
    mask = torch.tensor([1, 0, 1, 0, 1, 1], dtype=torch.bool)
    assert dcx.ops.centroid_grad(grad, labels, 2, mask).tolist() == [2.0, 2.0]


@pytest.mark.parametrize("device", devices())
def test_unchecked_labels_out_of_range_are_skipped(device):
    """check=False: no error (on CUDA no host sync), and labels outside the range are skipped on
    both devices as the reference skips them."""
    grad = torch.arange(1.0, 9.0, device=device)
    labels = torch.tensor([0, 1, 5, -2, 1, 0, 2, 9], device=device)
    out = dcx.ops.centroid_grad(grad, labels, 3, None, check=False)
    assert out.tolist() == [1.0 + 6.0, 2.0 + 5.0, 7.0]
    assert torch.equal(out, reference.centroid_grad(grad, labels, 3, None, check=False))
    with pytest.raises(RuntimeError, match="labels must lie in"):
        reference.centroid_grad(grad, labels, 3)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("check", [True, False])
def test_opcheck(device, dtype, masked, check):
    grad, labels, mask = make_inputs(1000, 16, dtype, device, masked=masked)
    torch.library.opcheck(torch.ops.dcx.centroid_grad.default, (grad, labels, 16, mask, check))


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph(device):
    grad, labels, mask = make_inputs(1000, 16, torch.float32, device)
    compiled = torch.compile(lambda g, l, m: dcx.ops.centroid_grad(g, l, 16, m) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(grad, labels, mask), 2 * dcx.ops.centroid_grad(grad, labels, 16, mask))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "args, match",
    [
        (lambda d: (torch.randn(8, device=d), torch.zeros(8, device=d).float(), 4), "labels must be int32 or int64"),
        (lambda d: (torch.zeros(8, dtype=torch.int32, device=d), torch.zeros(8, dtype=torch.long, device=d), 4), "grad must be float"),
        (lambda d: (torch.randn(8, device=d), torch.zeros(7, dtype=torch.long, device=d), 4), "labels must have the shape of grad"),
        (lambda d: (torch.randn(8, device=d), torch.zeros(8, dtype=torch.long, device=d), -3), "num_clusters must be >= 1"),
        (lambda d: (torch.randn(8, device=d), torch.zeros(8, dtype=torch.long, device=d), 0), "num_clusters must be >= 1"),
        (lambda d: (torch.randn(8, device=d), torch.full((8,), 4, device=d), 4), r"labels must lie in \[0, num_clusters\)"),
        (lambda d: (torch.randn(8, device=d), torch.full((8,), -1, device=d), 4), r"labels must lie in \[0, num_clusters\)"),
        (lambda d: (torch.randn(8, device=d), torch.zeros(8, dtype=torch.long, device=d), 4, torch.ones(8, device=d)), "mask must be bool or uint8"),
        (lambda d: (torch.randn(8, device=d), torch.zeros(8, dtype=torch.long, device=d), 4, torch.ones(3, dtype=torch.bool, device=d)), "mask must have the shape of grad"),
    ],
)
def test_bad_input(device, args, match):
    with pytest.raises(RuntimeError, match=match):
        dcx.ops.centroid_grad(*args(device))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_bad_input_device_mismatch():
    with pytest.raises(RuntimeError, match="labels must be on the device of grad"):
        dcx.ops.centroid_grad(torch.randn(8, device="cuda"), torch.zeros(8, dtype=torch.long), 4)
