"""Scaled codebooks, w = scale[row] * codebook[id]: through spqmm / spqmm_int8 (CPU and CUDA glue
alike apply the scale after the kernel, one multiply per output), the stages' state, the file,
and the packed layers."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcx
from dcx import format as fmt
from dcx import reference, state
from dcx.quantize import row_scales
from tests.testing import FLOAT_DTYPES, devices, requires_kernels, unit_roundoff

pytestmark = requires_kernels


def make_layer(n, k, density, bits, device, dense=None):
    g = torch.Generator().manual_seed(n * 1000 + k)
    mask = torch.rand(n, k, generator=g) < density
    labels = torch.randint(0, 1 << bits, (n, k), generator=g)
    codebook = torch.randn(1 << bits, generator=g)
    scale = row_scales(torch.randn(n, 8, generator=g) * torch.logspace(-2, 1, n)[:, None])
    p = dcx.pack(mask.to(device), labels.to(device), codebook.to(device), bits, dense)
    return mask.to(device), labels.to(device), codebook.to(device), scale.to(device), p


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("crossover", [-1, 1])
@pytest.mark.parametrize("batch", [1, 5, 70])
def test_spqmm_scales_each_output_after_the_kernel(device, dense, crossover, batch):
    """In float32, exactly (kernel result without the bias) * scale + bias; and the product
    itself within the float32 bound of the decoded weight scale[row] * codebook[id]."""
    mask, labels, codebook, scale, p = make_layer(45, 130, 0.3, 5, device, dense)
    x = torch.randn(batch, 130, device=device)
    bias = torch.randn(45, device=device)
    y = p.spqmm(x, bias, crossover=crossover, scale=scale)
    plain = p.spqmm(x, crossover=crossover)
    torch.testing.assert_close(y, plain * scale + bias, rtol=0, atol=0)
    w = codebook.double()[labels] * mask * scale.double()[:, None]
    expected = F.linear(x.double(), w, bias.double())
    magnitude = F.linear(x.double().abs(), w.abs(), bias.double().abs())
    bound = (mask.sum(1).double() + 3) * unit_roundoff(torch.float32) * magnitude
    assert bool(((y.double() - expected).abs() <= bound * 1.01).all())
    ref = reference.spqmm(x, p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, 45, 130,
                          p.bits, bias, scale=scale)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("compute", ["auto", "float32", "bfloat16", "int8"])
def test_spqmm_scale_in_every_compute_mode(device, dtype, compute):
    mask, labels, codebook, scale, p = make_layer(40, 96, 1.0, 4, device, dense=True)
    x = torch.randn(6, 96, device=device).to(dtype)
    bias = torch.randn(40, device=device).to(dtype)
    y = p.spqmm(x, bias, compute=compute, scale=scale)
    assert y.dtype == dtype
    w = codebook.double()[labels] * scale.double()[:, None]
    expected = F.linear(x.double(), w, bias.double())
    # bfloat16 and int8 compute round x (and, for int8, the codebook) first: a few 1e-3
    # relative to the output's magnitude.
    magnitude = F.linear(x.double().abs(), w.abs(), bias.double().abs())
    tol = 4e-2 if compute in ("bfloat16", "int8") or dtype == torch.bfloat16 else 2e-3
    assert bool(((y.double() - expected).abs() <= tol * magnitude + 1e-6).all())


@pytest.mark.parametrize("device", devices())
def test_spqmm_int8_scale(device):
    _, _, _, scale, p = make_layer(40, 96, 1.0, 4, device, dense=True)
    x = torch.randn(6, 96, device=device)
    bias = torch.randn(40, device=device)
    y = p.spqmm_int8(x, bias, scale=scale)
    torch.testing.assert_close(y, p.spqmm_int8(x) * scale + bias, rtol=0, atol=0)
    ref = reference.spqmm_int8(x, p.codes, p.codebook, 40, 96, p.bits, bias, scale=scale)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dense", [False, True])
def test_opcheck_and_compile_with_scale(device, dense):
    _, _, _, scale, p = make_layer(33, 97, 0.2, 5, device, dense)
    x = torch.randn(3, 97, device=device)
    args = (x, p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, 33, 97, p.bits,
            torch.randn(33, device=device), -1, True, "auto", scale)
    torch.library.opcheck(torch.ops.dcx.spqmm.default, args)
    if dense:
        torch.library.opcheck(torch.ops.dcx.spqmm_int8.default,
                              (x, p.codes, p.codebook, 33, 97, p.bits, None, True, scale))
    compiled = torch.compile(lambda x: p.spqmm(x, scale=scale).relu(), fullgraph=True)
    torch.testing.assert_close(compiled(x), p.spqmm(x, scale=scale).relu())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dense", [False, True])
def test_gradients_with_scale(device, dense):
    mask, labels, codebook, scale, p = make_layer(33, 97, 0.3, 5, device, dense)
    x = torch.randn(2, 3, 97, device=device, requires_grad=True)
    bias = torch.randn(33, device=device, requires_grad=True)
    grad_y = torch.randn(2, 3, 33, device=device)
    p.spqmm(x, bias, scale=scale).backward(grad_y)
    w = torch.where(mask, codebook[labels], torch.zeros((), device=device)) * scale[:, None]
    x2, b2 = x.detach().requires_grad_(), bias.detach().requires_grad_()
    F.linear(x2, w, b2).backward(grad_y)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, b2.grad)
    with pytest.raises(RuntimeError, match="scale requires grad"):
        p.spqmm(x, scale=scale.clone().requires_grad_())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("change, match", [
    (dict(scale=torch.ones(32)), r"scale must have shape \[out_features\] = \[33\]"),
    (dict(scale=torch.ones(33, 1)), r"scale must have shape"),
    (dict(scale=torch.ones(33, dtype=torch.int32)), r"scale must be float32, float16 or bfloat16"),
])
def test_bad_scale(device, change, match):
    _, _, _, _, p = make_layer(33, 97, 0.2, 5, device)
    x = torch.randn(3, 97, device=device)
    with pytest.raises(RuntimeError, match=match):
        p.spqmm(x, scale=change["scale"].to(device))


def test_cluster_with_row_scales_then_file_and_packed_layers(tmp_path):
    """ClusterConfig(scale="row"): the weight is scale[row] * codebook[labels]; the file stores
    the scales (float16) and the packed layers (Linear, Embedding) compute what the shared model
    computes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 24), nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 10))
    with torch.no_grad():
        model[1].weight.mul_(torch.logspace(-2, 1, 40)[:, None])  # rows of very different scale
    original = copy.deepcopy(model)
    dcx.prune_(model, dcx.PruneConfig(sparsity=0.5))
    dcx.cluster_(model, dcx.ClusterConfig(linear_bits=3, scale="row"))
    for name in ("0.weight", "1.weight", "3.weight"):
        st = state.layers(model)[name]
        assert st.scale is not None and st.scale.shape == (st.labels.shape[0],)
        expected = st.codebook.detach()[st.labels.long()] * st.scale[:, None] * st.kept
        torch.testing.assert_close(getattr(st.module, "weight").detach(), expected)
    ids = torch.randint(0, 50, (4, 7))
    # row scales follow the row: error far below one codebook for all rows at 3 bits
    plain = copy.deepcopy(original)
    dcx.prune_(plain, dcx.PruneConfig(sparsity=0.5))
    dcx.cluster_(plain, dcx.ClusterConfig(linear_bits=3))
    def rel(m):  # squared error relative to each row's largest weight
        w0 = original[1].weight.detach()
        return float(((m[1].weight.detach() - w0) / w0.abs().amax(1, keepdim=True)).pow(2).mean())

    assert rel(model) < 0.7 * rel(plain)
    dcx.finalize_clustering_(model)
    path = tmp_path / "scaled.dcx"
    dcx.save(model, path)
    loaded = dcx.load(path, copy.deepcopy(original))  # packed layers
    assert isinstance(loaded[1], dcx.SparseQuantLinear) and loaded[1].scale is not None
    assert isinstance(loaded[0], dcx.SparseQuantEmbedding) and loaded[0].scale is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
        torch.testing.assert_close(loaded[1].weight, model[1].weight)
    unpacked = dcx.load(path, copy.deepcopy(original), packed=False)
    torch.testing.assert_close(unpacked[1].weight, model[1].weight)
    dcx.save(loaded, tmp_path / "again.dcx")  # the packed model saves the same records
    again = fmt.load_records(tmp_path / "again.dcx")[0]
    for name, ct in fmt.load_records(path)[0].items():
        if isinstance(ct, fmt.CompressedTensor) and ct.scale is not None:
            torch.testing.assert_close(again[name].scale, ct.scale, rtol=0, atol=0)
    # state_dict round trip of a scaled packed layer into a fresh one
    fresh = dcx.SparseQuantLinear(24, 40, bits=3)
    fresh.load_state_dict(loaded[1].state_dict())
    x = torch.randn(5, 24)
    torch.testing.assert_close(fresh(x), loaded[1](x))


def test_codebook_gradient_with_row_scales():
    torch.manual_seed(0)
    layer = nn.Linear(12, 6)
    dcx.cluster_(nn.Sequential(layer), dcx.ClusterConfig(linear_bits=2, scale="row"))
    st = state.get(layer)
    x = torch.randn(5, 12)
    layer(x).square().sum().backward()
    cb = st.codebook.detach().clone().requires_grad_()
    w = cb[st.labels.long()] * st.scale[:, None]
    F.linear(x, w, layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(st.codebook.grad, cb.grad)


@pytest.mark.parametrize("bad, match", [
    (torch.ones(3), r"scale must be \[rows\] \(row scales\) or \[rows, groups\] .* with 4 rows"),
    (torch.ones(4, 2), "group scales of 2 groups do not cut 3 columns"),
    (torch.ones(4, dtype=torch.int32), "scale must be floating point"),
    (torch.full((4,), -1.0), "scale must be finite and positive"),
    (torch.full((4,), 0.1), "scale must hold float16 values"),  # 0.1 is not a float16 value
])
def test_file_rejects_bad_scales(tmp_path, bad, match):
    ct = fmt.CompressedTensor(torch.ones(4, 3, dtype=torch.bool), torch.zeros(4, 3, dtype=torch.long),
                              torch.tensor([0.5]), 1, scale=bad)
    with pytest.raises(ValueError, match=match):
        fmt.encode_tensor(ct)


def test_file_scale_section_round_trip_and_corruption():
    scale = torch.tensor([0.5, 2.0, 0.25, 3.0])
    ct = fmt.CompressedTensor(torch.rand(4, 6) < 0.7, torch.randint(0, 4, (4, 6)),
                              torch.randn(4), 2, scale=scale)
    meta, sections = fmt.encode_tensor(ct)
    back = fmt.decode_tensor(meta, dict(sections))
    torch.testing.assert_close(back.scale, scale)
    torch.testing.assert_close(back.to_dense(), ct.to_dense())
    short = dict(sections) | {"scale": dict(sections)["scale"][:6]}
    with pytest.raises(fmt.FormatError, match="scale section of 6 bytes, 4 rows need a multiple of 8"):
        fmt.decode_tensor(meta, short)
    negative = dict(sections) | {"scale": torch.tensor([-1.0] * 4).half().numpy().tobytes()}
    with pytest.raises(fmt.FormatError, match="finite and positive"):
        fmt.decode_tensor(meta, negative)


def test_set_shared_checks_the_scale():
    layer = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="float16 values"):
        state.set_shared_(layer, "weight", torch.zeros(2), torch.zeros(3, 4, dtype=torch.int32), 1,
                          scale=torch.full((3,), 0.1))
    with pytest.raises(ValueError, match=r"\[rows\] \(row scales\) or \[rows, groups\] \(group scales\) with 3 rows"):
        state.set_shared_(layer, "weight", torch.zeros(2), torch.zeros(3, 4, dtype=torch.int32), 1,
                          scale=torch.ones(4))
