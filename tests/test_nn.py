import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcx
from dcx.nn import SparseQuantConv2d, SparseQuantLinear
from tests.testing import devices, requires_kernels, unit_roundoff

pytestmark = requires_kernels


def assert_linear_close(y, x, weight, bias):
    """y against F.linear in float64 with the layer's decoded weight: float32 accumulation of K
    products, one rounding to x's dtype."""
    expected = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    magnitude = F.linear(x.double().abs(), weight.double().abs(),
                         None if bias is None else bias.double().abs())
    k = x.shape[-1]
    bound = (k + 2) * unit_roundoff(torch.float32) * magnitude + unit_roundoff(y.dtype) * expected.abs()
    assert y.shape == expected.shape and y.dtype == x.dtype
    assert ((y.double() - expected).abs() <= bound * 1.01 + 1e-30).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("sparsity, bits", [(0.0, 6), (0.9, 5), (0.5, 4), (1.0, 3)])
def test_from_float(device, sparsity, bits):
    linear = nn.Linear(300, 70).to(device)
    layer = SparseQuantLinear.from_float(linear, sparsity=sparsity, bits=bits)
    w = layer.decoded_weight()
    assert (w != 0).float().mean().item() == pytest.approx(1 - sparsity, abs=0.01)
    assert torch.unique(w[w != 0]).numel() <= 1 << bits
    if sparsity < 1:  # weight sharing keeps the weights close: within the largest cluster gap
        kept = w != 0
        assert (w[kept] - linear.weight[kept]).abs().max() < linear.weight.abs().max() / 2
    x = torch.randn(2, 5, 300, device=device)
    assert_linear_close(layer(x), x, w, linear.bias)


@pytest.mark.parametrize("device", devices())
def test_from_shared_and_dtypes(device):
    mask = torch.rand(40, 97, device=device) < 0.1
    labels = torch.randint(0, 32, (40, 97), device=device)
    codebook = torch.randn(32, device=device)
    linear = nn.Linear(97, 40).to(device)
    bias = linear.bias.detach()
    layer = SparseQuantLinear.from_shared(linear, mask, labels, codebook)
    assert layer.bits == 5 and not layer.packed.dense
    w = codebook[labels] * mask
    assert torch.equal(layer.decoded_weight(), w)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        half = SparseQuantLinear.from_shared(linear, mask, labels, codebook).to(dtype)
        x = torch.randn(7, 97, device=device).to(dtype)
        assert_linear_close(half(x), x, w.to(dtype), bias.to(dtype))


def test_one_constructor_scheme_and_the_old_spellings():
    """from_float / from_shared / from_state on every packed layer; the old names still build
    the same layer for one release, with a DeprecationWarning."""
    torch.manual_seed(0)
    linear, conv, embedding = nn.Linear(30, 20), nn.Conv2d(3, 4, 3), nn.Embedding(12, 6)
    x, image, ids = torch.randn(2, 30), torch.randn(1, 3, 5, 5), torch.tensor([[1, 5, 11]])
    cases = [(SparseQuantLinear, linear, x, "from_linear"), (SparseQuantConv2d, conv, image, "from_conv"),
             (dcx.SparseQuantEmbedding, embedding, ids, "from_embedding")]
    for cls, plain, inp, old in cases:
        new = cls.from_float(plain, sparsity=0.5, bits=4)
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated"):
            legacy = getattr(cls, old)(plain, sparsity=0.5, bits=4)
        torch.testing.assert_close(legacy(inp), new(inp))
        st = dcx.state.get(new)
        again = cls.from_shared(plain, st.mask, st.labels, st.codebook, st.bits)
        torch.testing.assert_close(again(inp), new(inp))
    mask, labels, codebook = torch.rand(20, 30) < 0.5, torch.randint(0, 8, (20, 30)), torch.randn(8)
    with pytest.warns(DeprecationWarning, match="from_compressed"):
        legacy = SparseQuantLinear.from_compressed(mask, labels, codebook, linear.bias)
    torch.testing.assert_close(legacy(x), SparseQuantLinear.from_shared(linear, mask, labels, codebook)(x))
    with pytest.warns(DeprecationWarning, match="from_compressed_like"):
        SparseQuantConv2d.from_compressed_like(conv, torch.ones(4, 27, dtype=torch.bool),
                                               torch.zeros(4, 27, dtype=torch.long), torch.ones(2))
    with pytest.warns(DeprecationWarning, match="dcx.nn.pack_layers_ is deprecated"):
        assert dcx.nn.pack_layers_ is dcx.pack_layers_
    with pytest.warns(DeprecationWarning, match="dcx.convert_"):
        rows = []
        model = dcx.convert(nn.Sequential(nn.Linear(8, 4)), bits=3, report=rows)
    assert isinstance(model[0], SparseQuantLinear) and rows[0].action == "packed"


def test_state_dict_round_trip():
    linear = nn.Linear(200, 30)
    layer = SparseQuantLinear.from_float(linear, sparsity=0.9, bits=5)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = SparseQuantLinear(200, 30)  # all pruned, other buffer sizes
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(3, 200)
    assert torch.equal(fresh(x), layer(x))
    assert fresh.bits == 5
    dense = SparseQuantLinear.from_float(linear, sparsity=0.0, bits=6)
    fresh.load_state_dict(dense.state_dict())
    assert fresh.packed.dense and torch.equal(fresh(x), dense(x))


def test_corrupted_state_dict_is_rejected():
    layer = SparseQuantLinear.from_float(nn.Linear(200, 30), sparsity=0.9, bits=5)
    state = layer.state_dict()
    state["codebook"] = state["codebook"][:4]  # ids up to 31 now point outside the codebook
    with pytest.raises(RuntimeError, match="codebook id outside the codebook"):
        SparseQuantLinear(200, 30).load_state_dict(state)
    state = layer.state_dict()
    state["group_ptr"] = state["group_ptr"].flip(0)
    with pytest.raises(RuntimeError, match="group_ptr"):
        SparseQuantLinear(200, 30).load_state_dict(state)


def test_no_bias_and_repr():
    layer = SparseQuantLinear.from_float(nn.Linear(16, 8, bias=False), sparsity=0.9, bits=2)
    assert layer.bias is None
    assert "bits=2" in repr(layer)
    x = torch.randn(4, 16)
    assert_linear_close(layer(x), x, layer.decoded_weight(), None)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("stride, padding, dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_conv2d(device, stride, padding, dilation):
    conv = nn.Conv2d(3, 6, 5, stride=stride, padding=padding, dilation=dilation).to(device)
    layer = SparseQuantConv2d.from_float(conv, sparsity=0.6, bits=4)
    w = layer.decoded_weight().reshape_as(conv.weight)
    x = torch.randn(2, 3, 20, 17, device=device)
    expected = F.conv2d(x, w, conv.bias, stride, padding, dilation)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x[0]), expected[0], rtol=1e-5, atol=1e-5)


def lenet5():
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    )


def test_convert_lenet5_and_filters():
    model = lenet5()
    x = torch.randn(4, 1, 28, 28)
    compressed, _ = dcx.convert_(lenet5().eval(), dcx.ConvertConfig(sparsity=0.0, bits=8, conv=True))
    assert sum(isinstance(m, (SparseQuantLinear, SparseQuantConv2d)) for m in compressed.modules()) == 5
    # The compressed model computes what a dense model holding its decoded weights computes.
    model.load_state_dict(_dense_state(compressed), strict=False)
    torch.testing.assert_close(compressed(x), model(x), rtol=1e-4, atol=1e-4)

    only_fc, _ = dcx.convert_(lenet5(), dcx.ConvertConfig(sparsity=0.9, bits=5, include=["7", "re:9"]))
    kinds = [type(m) for m in only_fc]
    assert kinds[7] is SparseQuantLinear and kinds[9] is SparseQuantLinear
    assert kinds[11] is nn.Linear and kinds[0] is nn.Conv2d
    excluded, _ = dcx.convert_(lenet5(), dcx.ConvertConfig(sparsity=0.5, bits=5, exclude=["11"]))
    assert type(excluded[11]) is nn.Linear and type(excluded[7]) is SparseQuantLinear
    assert excluded(x).shape == (4, 10)

    buffer = io.BytesIO()
    torch.save(compressed.state_dict(), buffer)
    buffer.seek(0)
    reloaded, _ = dcx.convert_(lenet5(), dcx.ConvertConfig(sparsity=1.0, bits=8, conv=True))
    reloaded.load_state_dict(torch.load(buffer))
    assert torch.equal(reloaded(x), compressed(x))


def _dense_state(model):
    """The dense weights a compressed model stands for, as an nn.Linear / nn.Conv2d state dict."""
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, SparseQuantConv2d):
            state[f"{name}.weight"] = m.decoded_weight().reshape(
                m.out_channels, m.in_channels, *m.kernel_size)
        elif isinstance(m, SparseQuantLinear):
            state[f"{name}.weight"] = m.decoded_weight()
        else:
            continue
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias.detach()
    return state


@pytest.mark.parametrize("sparsity, bits", [(0.0, 4), (0.5, 5), (0.0, 8)])
def test_sparse_quant_embedding(sparsity, bits):
    """A drop-in nn.Embedding: the same lookup as the plain layer holding the decoded table, for
    any index shape; padding_idx kept; the table round-trips through state_dict."""
    embedding = nn.Embedding(97, 24, padding_idx=-1)
    layer = dcx.SparseQuantEmbedding.from_float(embedding, sparsity=sparsity, bits=bits)
    assert layer.padding_idx == 96 and layer.codes.dtype == torch.uint8
    table = layer.weight
    assert table.shape == (97, 24)
    assert (table == 0).float().mean().item() == pytest.approx(sparsity, abs=0.01)
    assert torch.unique(table[table != 0]).numel() <= 1 << bits
    plain = nn.Embedding(97, 24, padding_idx=96)
    with torch.no_grad():
        plain.weight.copy_(table)
    for ids in (torch.randint(0, 97, (5,)), torch.randint(0, 97, (3, 7)), torch.tensor(4)):
        assert torch.equal(layer(ids), plain(ids))
    with pytest.raises(IndexError):
        layer(torch.tensor([97]))
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = dcx.SparseQuantEmbedding(97, 24, padding_idx=96)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.weight, table) and fresh.bits == layer.bits


def test_embedding_max_norm_is_refused_and_convert_says_why():
    with pytest.raises(ValueError, match="max_norm renormalises the table"):
        dcx.SparseQuantEmbedding.from_float(nn.Embedding(10, 4, max_norm=1.0), bits=3)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Linear(4, 3))
    _, rows = dcx.convert_(model, dcx.ConvertConfig(bits=3))
    assert type(model[0]) is nn.Embedding and isinstance(model[1], SparseQuantLinear)
    assert rows[0].action == "shared" and "max_norm" in rows[0].reason
    with pytest.raises(ValueError, match="padding_idx must lie in"):
        dcx.SparseQuantEmbedding(10, 4, padding_idx=10)


def test_convert_serves_subclasses_and_grouped_convs():
    """Subclasses that keep the plain layer's computation are packed; one with its own forward,
    and grouped or depthwise convolutions, keep their decoded weight, shared; every layer with a
    2-D+ weight is in the report with its reason."""

    class Scaled(nn.Linear):  # extra init logic, plain forward
        def __init__(self, *args):
            super().__init__(*args)
            nn.init.normal_(self.weight, std=0.02)

    class Own(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Flatten(),
                          Scaled(64, 16), Own(16, 8), nn.LayerNorm(8))
    x = torch.randn(2, 4, 4, 4)
    _, rows = dcx.convert_(model, dcx.ConvertConfig(bits=6))
    kinds = {r.name: (r.kind, r.action, r.reason) for r in rows}
    assert kinds == {"0": ("Conv2d", "shared", "groups=4 (SparseQuantConv2d runs groups=1)"),
                     "2": ("Scaled", "packed", ""),
                     "3": ("Own", "shared", "Own overrides nn.Linear.forward")}
    assert isinstance(model[2], SparseQuantLinear) and type(model[3]) is Own
    assert model(x).shape == (2, 8)


@pytest.mark.parametrize("compute", ["auto", "float32", "bfloat16"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 7, 64])
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_compute_modes(compute, x_dtype, batch, sparsity):
    """Each compute mode against F.linear in float64 on what the mode computes with: float32 on
    the weights as they are; bfloat16 on x and the codebook rounded to bf16 (each within a bf16
    rounding: 2 u_bf16 sum |w x|), products exact in fp32 and summed in fp32 (K u32 sum |w x|),
    the sum rounded once to the output dtype. Past the crossover (batch 64, dense) bfloat16 runs
    a bf16 GEMM with the same bound."""
    torch.manual_seed(0)
    linear = nn.Linear(200, 48)
    layer = SparseQuantLinear.from_float(linear, sparsity=sparsity, bits=6, compute=compute)
    x = torch.randn(batch, 200).to(x_dtype)
    y = layer(x)
    assert y.dtype == x_dtype and layer.compute == compute
    mode = {"auto": x_dtype, "float32": torch.float32, "bfloat16": torch.bfloat16}[compute]
    w, b = layer.decoded_weight().double(), linear.bias.detach().double()
    expected = F.linear(x.double(), w, b)
    magnitude = F.linear(x.double().abs(), w.abs(), b.abs())
    u_in = unit_roundoff(torch.bfloat16) if mode == torch.bfloat16 and x_dtype != mode else 0.0
    u_w = unit_roundoff(torch.bfloat16) if mode == torch.bfloat16 else 0.0
    u_out = max(unit_roundoff(x_dtype), unit_roundoff(mode))
    bound = ((200 + 2) * unit_roundoff(torch.float32) + u_in + 2 * u_w) * magnitude \
        + u_out * expected.abs()
    assert ((y.double() - expected).abs() <= bound * 1.01 + 1e-30).all()


def test_compute_is_settable_and_kept():
    layer = SparseQuantLinear.from_float(nn.Linear(40, 8), bits=4)
    assert layer.compute == "auto"
    layer.compute = "bfloat16"
    with pytest.raises(ValueError, match="compute must be one of"):
        layer.compute = "int3"
    fresh = SparseQuantLinear(40, 8)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.compute == "bfloat16"
    model, _ = dcx.convert_(nn.Sequential(nn.Linear(40, 8)), dcx.ConvertConfig(bits=4, compute="float32"))
    assert model[0].compute == "float32"
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 40).bfloat16()
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv2d_keeps_the_memory_format_of_nn_conv2d(device, memory_format):
    """The output's strides are nn.Conv2d's: contiguous for an NCHW input, channels-last for a
    channels-last one; a model that flattens with .view after the conv runs once packed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Flatten()).to(device)

    class ViewFlatten(nn.Module):  # the x.view(x.size(0), -1) of many pretrained CNNs
        def forward(self, x):
            return x.view(x.size(0), -1)

    model[2] = ViewFlatten()
    x = torch.randn(2, 32, 14, 14, device=device).to(memory_format=memory_format)
    expected_conv = model[0](x)
    packed = SparseQuantConv2d.from_float(model[0], sparsity=0.5, bits=5)
    y = packed(x)
    assert y.stride() == expected_conv.stride() and y.shape == expected_conv.shape
    model[0] = packed
    if memory_format == torch.contiguous_format:
        assert model(x).shape == (2, 64 * 12 * 12)
    assert packed(x[0]).is_contiguous()  # unbatched input: contiguous, as nn.Conv2d


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("compute", ["auto", "float32", "bfloat16", "int8"])
@pytest.mark.parametrize("sparsity", [0.0, 0.8])
def test_gradients_flow_through_packed_layers(device, compute, sparsity):
    """Training around a packed model: x's gradient (and the bias's) through a packed Linear and
    Conv2d equal those through the plain layers with the decoded weight (int8 compute: straight
    through the activations' rounding; bfloat16 compute: within bfloat16's rounding)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(device)
    conv = nn.Conv2d(3, 8, 3, padding=1).to(device)
    layers = [(SparseQuantLinear.from_float(linear, sparsity, 5, compute=compute),
               torch.randn(4, 64, device=device), F.linear),
              (SparseQuantConv2d.from_float(conv, sparsity, 5, compute=compute),
               torch.randn(2, 3, 6, 6, device=device), lambda x, w, b: F.conv2d(x, w, b, 1, 1))]
    tol = dict(rtol=2e-2, atol=2e-2) if compute == "bfloat16" else {}
    for layer, x, plain in layers:
        x.requires_grad_()
        grad_y = torch.randn_like(layer(x))
        layer(x).backward(grad_y)
        xr = x.detach().clone().requires_grad_()
        br = layer.bias.detach().clone().requires_grad_()
        plain(xr, layer.weight.detach(), br).backward(grad_y)
        torch.testing.assert_close(x.grad, xr.grad, **tol)
        torch.testing.assert_close(layer.bias.grad, br.grad, **tol)
        assert x.grad.abs().sum() > 0


def test_do_nothing_verbs_decode_no_packed_layer(monkeypatch):
    """A packed layer hands back its state lazily: verbs with nothing to do on a packed model
    (encode_, codebook_parameters, pack_layers_, dcx.state.layers) decode no weight; reading a
    state's mask decodes that layer once."""
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 100), nn.Embedding(10, 4))
    dcx.convert_(model, dcx.ConvertConfig(sparsity=0.5, bits=5))
    decodes = []
    real_unpack = dcx.nn.unpack  # as dcx.nn calls it (imported from dcx.packing)
    monkeypatch.setattr(dcx.nn, "unpack", lambda p: decodes.append(p) or real_unpack(p))
    dcx.encode_(model)
    assert dcx.quantize.codebook_parameters(model) == []
    dcx.pack_layers_(model)
    layers = dcx.state.layers(model)
    assert len(layers) == 3 and decodes == []
    st = layers["0.weight"]
    assert st.mask.shape == (200, 300) and st.labels.shape == (200, 300) and len(decodes) == 1
    assert abs(st.mask.float().mean().item() - 0.5) < 0.01
    values = st.shared_values()
    assert len(decodes) == 1  # the state decoded once, then read from its cache
    assert torch.equal(values, model[0].weight)
    decodes.clear()
    dcx.io.encode(model)  # the records and the layer settings read one state per layer
    assert len(decodes) == 3  # the embedding is a packed layer too
