"""Group-scaled codebooks, w[r, j] = scale[r, j // group_size] * codebook[id]: applied inside
every spqmm kernel (each rule of the plan table, CPU and CUDA), the packer's one-group windows,
the op's checks, autograd, the stages' state, the file, the packed layers and the calibrated
methods."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcx
from dcx import _native, reference, state
from dcx import format as fmt
from dcx.packing import unpack
from dcx.quantize import group_scales
from tests.testing import (INT8_GEMM_KERNELS, check_bfloat16, cpu_isas, cpu_kind, devices,
                           first_plan_rules, plan_compute, requires_kernels, sparse_int8_rules, unit_roundoff)

pytestmark = requires_kernels


def make_layer(n, k, density, bits, group_size, device="cpu", dense=None, seed=0):
    """A packed layer with random ids and group scales spanning three decades."""
    g = torch.Generator().manual_seed(seed + n * 1000 + k)
    mask = torch.rand(n, k, generator=g) < density
    labels = torch.randint(0, 1 << bits, (n, k), generator=g)
    codebook = torch.randn(1 << bits, generator=g)
    groups = -(-k // group_size)
    scale = (10 ** (3 * torch.rand(n, groups, generator=g) - 2)).half().float()
    p = dcx.pack(mask.to(device), labels.to(device), codebook.to(device), bits, dense,
                 group_size=group_size)
    return mask.to(device), labels.to(device), codebook.to(device), scale.to(device), p


def weight(mask, labels, codebook, scale, group_size):
    k = mask.shape[1]
    w = codebook.double()[labels] * fmt.scale_columns(scale.double(), group_size, k)
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def check(y, x, w, bias=None, extra=0):
    """y within the float32 bound of x w^T + bias: (nnz + 4) roundings of the magnitude (the
    terms, the bias, a group split between chunks, the scale's product; `extra` more)."""
    expected = F.linear(x.double(), w, None if bias is None else bias.double())
    magnitude = F.linear(x.double().abs(), w.abs(), None if bias is None else bias.double().abs())
    depth = (w != 0).sum(1).double() + 4 + extra
    bound = depth * unit_roundoff(torch.float32) * magnitude
    assert bool(((y.double() - expected).abs() <= bound * 1.01 + 1e-30).all())


def test_packer_keeps_each_window_in_one_group():
    for group_size in (32, 64, 128):
        mask, labels, _, _, p = make_layer(37, 700, 0.2, 4, group_size, dense=False)
        assert bool((p.windows % group_size + 32 <= group_size).all())
        assert p.group_size == group_size
        kept, ids = unpack(p)
        assert torch.equal(kept, mask) and torch.equal(ids[mask], labels[mask])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 256])
@pytest.mark.parametrize("batch", [1, 3, 9, 40])
def test_spqmm_applies_group_scales(device, dense, group_size, batch):
    mask, labels, codebook, scale, p = make_layer(45, 333, 0.3 if not dense else 0.9, 5,
                                                  group_size, device, dense)
    x = torch.randn(batch, 333, device=device)
    bias = torch.randn(45, device=device)
    y = p.spqmm(x, bias, scale=scale)
    w = weight(mask, labels, codebook, scale, group_size)
    check(y.cpu(), x.cpu(), w.cpu(), bias.cpu())
    ref = reference.spqmm(x.double(), p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, 45,
                          333, p.bits, bias, scale=scale, group_size=group_size)
    torch.testing.assert_close(ref, F.linear(x.double(), w, bias.double()))


@pytest.mark.parametrize("isa", cpu_isas())
def test_every_plan_rule_runs_with_group_scales(monkeypatch, isa):
    """Every rule of the kernel table for this kind of CPU, reached by a layer with group
    scales: float kernels within the float32 bound of the scaled product (bfloat16 within its
    roundings), int8 ones equal to spqmm_int8 (against its reference below), the int8 GEMM against
    its own reference. The fused int8 kernel's tables are per row: its rules run the fp32 rows
    kernel where the dense rules would (a few rows), the int8 GEMM elsewhere."""
    monkeypatch.setenv("DCX_CPU_ISA", isa)
    kind = "portable" if isa == "generic" else isa
    table = _native.spqmm_plan()
    big = max(300, -(-max(r["min_weights"] for r in table) // 64))
    layers = [make_layer(40, 300, 0.07, 5, 64, dense=False),
              make_layer(40, 300, 0.3, 5, 64, dense=False),
              make_layer(40, 300, 0.6, 6, 32, dense=False),
              make_layer(40, 300, 1.0, 4, 128, dense=True),
              make_layer(40, 300, 1.0, 6, 64, dense=True),
              make_layer(64, big, 1.0, 4, 64, dense=True)]
    if sparse_int8_rules(kind, big):  # packing them takes seconds: only where they are reached
        layers += [make_layer(64, big, 0.07, 5, 32, dense=False),
                   make_layer(64, big, 0.4, 5, 128, dense=False)]
    for i, mode, rows, rule in first_plan_rules(kind, [layer[4] for layer in layers]):
        mask, labels, codebook, scale, p = layers[i]
        x, bias = torch.randn(rows, p.in_features), torch.randn(p.out_features)
        y = p.spqmm(x, bias, compute=plan_compute(mode), scale=scale)
        kernel = table[rule]["kernel"]
        if kernel in ("int8_fused", "int8_dots"):  # tables per row: the fp32 rows kernel where it
            fp32 = table[_native.spqmm_plan_rule(kind, "dense", p.bits, 1.0, p.out_features,
                                                 p.in_features, rows)]["kernel"]
            kernel = fp32 if fp32 == "dense_rows" else "int8_gemm"  # runs, else the int8 GEMM
        if kernel in INT8_GEMM_KERNELS:  # their own, coarser rule
            expected = reference.spqmm_int8_gemm(x, p.codes, p.codebook, p.out_features,
                                                 p.in_features, p.bits, bias, scale, p.group_size,
                                                 windows=p.windows, group_ptr=p.group_ptr)
            torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
        elif kernel.startswith("int8"):
            assert torch.equal(y, p.spqmm_int8(x, bias, scale=scale)), table[rule]
        elif plan_compute(mode) == "bfloat16":
            check_bfloat16(y, x, weight(mask, labels, codebook, scale, p.group_size), bias)
        else:
            check(y, x, weight(mask, labels, codebook, scale, p.group_size), bias)


def test_group_scales_int8_below_a_forced_crossover():
    """Below a forced crossover that lies past every dense kernel's bound, a layer with group
    scales in int8 compute still takes the int8 GEMM where the fused kernel would run many rows:
    the fp32 rows kernel takes over only at the few rows the dense rules give it."""
    table = _native.spqmm_plan()
    if table[_native.spqmm_plan_rule(cpu_kind(), "int8", 4, 1.0, 40, 300, 100)]["kernel"] != "int8_fused":
        pytest.skip(f"the {cpu_kind()} rules have no fused int8 kernel")
    _, _, _, scale, p = make_layer(40, 300, 1.0, 4, 64, dense=True)
    x, bias = torch.randn(100, 300), torch.randn(40)
    y = dcx.ops.spqmm(x, p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, 40, 300, p.bits,
                      bias, crossover=10000, compute="int8", scale=scale, group_size=64)
    expected = reference.spqmm_int8_gemm(x, p.codes, p.codebook, 40, 300, p.bits, bias, scale, 64)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("group_size", [32, 96, 128])
def test_spqmm_int8_group_scales(device, group_size):
    _, _, _, scale, p = make_layer(40, 300, 1.0, 4, group_size, device, dense=True)
    for batch in (1, 6, 20):
        x = torch.randn(batch, 300, device=device)
        bias = torch.randn(40, device=device)
        y = p.spqmm_int8(x, bias, scale=scale)
        ref = reference.spqmm_int8(x, p.codes, p.codebook, 40, 300, p.bits, bias, scale=scale,
                                   group_size=group_size)
        torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dense", [False, True])
def test_opcheck_compile_and_gradients(device, dense):
    mask, labels, codebook, scale, p = make_layer(33, 97, 0.3, 5, 32, device, dense)
    x = torch.randn(3, 97, device=device)
    args = (x, p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, 33, 97, p.bits,
            torch.randn(33, device=device), -1, True, "auto", scale, 32)
    torch.library.opcheck(torch.ops.dcx.spqmm.default, args)
    if dense:
        torch.library.opcheck(torch.ops.dcx.spqmm_int8.default,
                              (x, p.codes, p.codebook, 33, 97, p.bits, None, True, scale, 32))
    compiled = torch.compile(lambda x: p.spqmm(x, scale=scale).relu(), fullgraph=True)
    torch.testing.assert_close(compiled(x), p.spqmm(x, scale=scale).relu())
    x = torch.randn(2, 3, 97, device=device, requires_grad=True)
    grad_y = torch.randn(2, 3, 33, device=device)
    p.spqmm(x, scale=scale).backward(grad_y)
    x2 = x.detach().requires_grad_()
    F.linear(x2, weight(mask, labels, codebook, scale, 32).float()).backward(grad_y)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("change, match", [
    (dict(scale=torch.ones(33, 4)), r"group_size must be a positive multiple of 32, got 48"),
    (dict(scale=torch.ones(33, 3), group_size=32), r"scale must have shape \[out_features, "
                                                   r"ceil\(in_features / group_size\)\] = \[33, 4\]"),
    (dict(scale=torch.ones(33, 4)), r"scale must have shape \[out_features\]"),
    (dict(group_size=32), r"group_size is 32 but no scale was given"),
])
def test_bad_group_scales(device, change, match):
    _, _, _, _, p = make_layer(33, 97, 0.2, 5, 32, device)
    x = torch.randn(3, 97, device=device)
    change = dict(change)
    scale = change.pop("scale", None)
    group_size = change.get("group_size", 48 if "48" in match else 0)
    with pytest.raises(RuntimeError, match=match):
        dcx.ops.spqmm(x, p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, 33, 97, p.bits,
                      scale=None if scale is None else scale.to(device), group_size=group_size)


def test_a_window_across_groups_is_refused():
    """A layer packed without the groups' rule has windows across them: the op says so."""
    _, _, _, scale, p = make_layer(33, 300, 0.2, 5, 64)
    loose = dcx.pack(*unpack(p), p.codebook, p.bits, dense=False)
    assert bool((loose.windows % 64 + 32 > 64).any())
    with pytest.raises(RuntimeError, match="a window crosses a scale group"):
        dcx.ops.spqmm(torch.randn(1, 300), loose.codes, loose.windows, loose.group_ptr,
                      loose.chunks, loose.codebook, 33, 300, loose.bits, scale=scale,
                      group_size=64)


def test_group_scales_of_a_weight():
    w = torch.randn(6, 100) * torch.logspace(-2, 1, 100)  # columns of very different sizes
    mask = torch.rand(6, 100) < 0.7
    mask[2, 32:64] = False  # a group with nothing kept
    s = group_scales(w, mask, 32)
    assert s.shape == (6, 4) and torch.equal(s.half().float(), s)
    block = (w * mask)[0, 64:96]
    rms = (block.square().sum() / mask[0, 64:96].sum()).sqrt()
    torch.testing.assert_close(s[0, 2], torch.maximum(rms, block.abs().max() / 3), rtol=1e-3, atol=0)
    outlier = torch.ones(2, 64)
    outlier[0, 5] = 100.0  # an outlier stays within 3 of the codebook's units
    torch.testing.assert_close(group_scales(outlier, None, 32)[0], torch.tensor([100 / 3, 1.0]),
                               rtol=1e-3, atol=0)
    assert s[2, 1] == 1
    assert group_scales(w, mask, 128).shape == (6,)  # one group: row scales
    with pytest.raises(ValueError, match="do not cut 100 columns"):
        fmt.group_size_of(torch.ones(6, 5), 100)
    assert fmt.group_size_of(torch.ones(6, 4), 100) == 32
    assert fmt.group_size_of(torch.ones(6, 2), 100) == 64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 96)
        self.fc1 = nn.Linear(96, 80)
        self.conv = nn.Conv2d(4, 8, 3)

    def forward(self, ids, image):
        return self.fc1(self.embed(ids)).sum(), self.conv(image)


def test_cluster_file_and_packed_layers(tmp_path):
    """ClusterConfig(scale=32): each layer's weight is scale[row, group] * codebook[labels] (the
    codebook's gradient too); the file stores the scales, and the packed layers (Linear,
    Embedding, Conv2d) compute what the shared model does, through the file and state_dict."""
    torch.manual_seed(0)
    model = Net()
    original = copy.deepcopy(model)
    ids, image = torch.randint(0, 50, (2, 7)), torch.randn(1, 4, 9, 9)
    dcx.cluster_(model, dcx.ClusterConfig(linear_bits=4, conv_bits=4, scale=32))
    for name, groups in (("embed.weight", 3), ("fc1.weight", 3), ("conv.weight", 2)):
        st = state.layers(model)[name]
        rows = st.labels.shape[0]
        assert st.scale.shape == (rows, groups)
        w = weight(torch.ones(rows, st.labels[0].numel(), dtype=torch.bool),
                   st.labels.long().reshape(rows, -1), st.codebook.detach(), st.scale, 32)
        torch.testing.assert_close(st.module.weight.detach(), w.float().reshape(st.labels.shape))
    st = state.layers(model)["fc1.weight"]
    x = torch.randn(5, 96)
    model.fc1(x).square().sum().backward()
    cb = st.codebook.detach().clone().requires_grad_()
    w = cb[st.labels.long()] * fmt.scale_columns(st.scale, 32, 96)
    F.linear(x, w, model.fc1.bias.detach()).square().sum().backward()
    torch.testing.assert_close(st.codebook.grad, cb.grad)
    dcx.finalize_clustering_(model)
    with torch.no_grad():
        expected = model(ids, image)
    path = tmp_path / "grouped.dcx"
    dcx.save(model, path)
    loaded = dcx.load(path, copy.deepcopy(original))  # packed layers
    assert isinstance(loaded.fc1, dcx.SparseQuantLinear) and loaded.fc1.scale.shape == (80, 3)
    assert loaded.embed.scale.shape == (50, 3) and loaded.conv.scale.shape == (8, 2)
    unpacked = dcx.load(path, copy.deepcopy(original), packed=False)
    with torch.no_grad():
        for got in (loaded(ids, image), unpacked(ids, image)):
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    dcx.save(loaded, tmp_path / "again.dcx")  # the packed model saves the same records
    again = fmt.load_records(tmp_path / "again.dcx")[0]
    for name, ct in fmt.load_records(path)[0].items():
        if isinstance(ct, fmt.CompressedTensor) and ct.scale is not None:
            torch.testing.assert_close(again[name].scale, ct.scale, rtol=0, atol=0)
    fresh = dcx.SparseQuantLinear(96, 80, bits=4)
    fresh.load_state_dict(loaded.fc1.state_dict())
    torch.testing.assert_close(fresh(x), loaded.fc1(x))
    converted, _ = dcx.convert_(copy.deepcopy(original), dcx.ConvertConfig(bits=4, scale=32),
                                progress=False)
    assert converted.fc1.scale.shape == (80, 3) and converted.conv.scale.shape == (8, 2)
    with torch.no_grad():
        torch.testing.assert_close(converted.fc1(x), F.linear(x, converted.fc1.weight,
                                                              converted.fc1.bias))


def test_calibrated_methods_take_group_scales():
    """gptq and weighted with group scales: on a layer whose input columns differ in scale by
    groups, group scales keep the outputs better than row scales at the same bits."""
    torch.manual_seed(0)
    k = 256
    spread = torch.repeat_interleave(torch.logspace(-1, 1, 4), 64)
    layer = nn.Linear(k, 48)
    with torch.no_grad():
        layer.weight.mul_(spread)  # groups of 64 columns of very different sizes
    x = torch.randn(512, k)
    batches = [x[i:i + 64] for i in range(0, 512, 64)]
    errors = {}
    for method in ("gptq", "weighted"):
        for scale in ("row", 64):
            model = nn.Sequential(nn.Linear(k, 48))
            model[0].load_state_dict(layer.state_dict())
            config = dcx.ConvertConfig(bits=3, method=method, scale=scale)
            packed, _ = dcx.convert_(model, config, progress=False, calibration=batches)
            errors[method, scale] = float((packed(x) - layer(x)).square().mean())
    for method in ("gptq", "weighted"):
        assert errors[method, 64] < errors[method, "row"], errors
