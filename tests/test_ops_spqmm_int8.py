"""dcx.ops.spqmm_int8: a dense-mode layer in int8 arithmetic (csrc/core/spqmm_int8.h), against
dcx.reference.spqmm_int8 (the same quantization rule, its sums in float64)."""

import pytest
import torch
import torch.nn.functional as F

import dcx
from dcx import _native
from dcx import reference
from tests.testing import (INT8_GEMM_KERNELS, FLOAT_DTYPES, cpu_isas, cpu_kind, devices,
                           requires_kernels, unit_roundoff)

pytestmark = requires_kernels


def make_layer(n, k, bits, dtype, device, entries=None):
    """A random dense-mode layer: labels over `entries` codebook entries (2^bits by default)."""
    entries = entries or 1 << bits
    labels = torch.randint(0, entries, (n, k), device=device)
    codebook = torch.randn(entries, device=device).to(dtype)
    p = dcx.pack(torch.ones(n, k, dtype=torch.bool, device=device), labels, codebook, bits,
                 dense=True)
    return labels, codebook, p


def run(x, p, bias=None):
    return dcx.ops.spqmm_int8(x, p.codes, p.codebook, p.out_features, p.in_features, p.bits, bias)


def check(y, x, p, bias=None):
    """Against the reference: the int32 block dots are exact on both sides, so they differ only
    by float32 rounding. The kernels add B = ceil(K / 32) scaled block dots per output (a
    conversion to float, exact on the CPU, a product and a sum each, in 8 lanes, then 3 sums
    across lanes), scale and add the bias: at most 3 B + 8 roundings of magnitude
    S = sw * sum_b sx_b * sum |xq cq| + |bias|, then one rounding to x's dtype."""
    expected = reference.spqmm_int8_float64(x, p.codes, p.codebook, p.out_features,
                                            p.in_features, p.bits, bias)
    empty = torch.empty(0, dtype=torch.int32, device=x.device)
    _, ids = reference.spqmm_ids(p.codes, empty, empty, p.out_features, p.in_features, p.bits)
    cq, cs = reference.q8_quantize(p.codebook, levels=32767)
    xq, xs = reference.q8_quantize(x, reference.Q8_BLOCK)
    blocks = xq.shape[-2]
    w = F.pad(cq[0].double()[ids].abs(), (0, blocks * reference.Q8_BLOCK - p.in_features))
    mag = torch.einsum("...bt,nbt->...nb", xq.double().abs(), w.reshape(p.out_features, blocks, -1))
    magnitude = (mag * xs.double().unsqueeze(-2)).sum(-1) * cs.double()
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    bound = (3 * blocks + 8) * unit_roundoff(torch.float32) * magnitude
    bound = bound + unit_roundoff(x.dtype) * expected.abs()
    assert y.dtype == x.dtype and y.shape == expected.shape
    err = (y.double() - expected).abs()
    assert (err <= bound * 1.01 + 1e-30).all(), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 97), (97, 31), (40, 4097)])
@pytest.mark.parametrize("batch", [1, 2, 3, 9, 64])
def test_matches_reference(device, dtype, shape, batch):
    n, k = shape
    _, _, p = make_layer(n, k, 6, dtype, device)
    x = torch.randn(batch, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    check(run(x, p, bias), x, p, bias)


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 31, 32, 33, 127, 128, 129, 300, 600])
@pytest.mark.parametrize("batch", [1, 4, 19])
def test_cpu_kernels_of_each_isa(monkeypatch, isa, bits, k, batch):
    """Every layout (nibbles, bit-packed, bytes), codebook size and tail of K, on each ISA path."""
    monkeypatch.setenv("DCX_CPU_ISA", isa)
    _, _, p = make_layer(19, k, bits, torch.float32, "cpu")
    x = torch.randn(batch, k)
    bias = torch.randn(19)
    check(run(x, p, bias), x, p, bias)


@pytest.mark.parametrize("device", devices())
def test_fidelity_against_float32(device):
    """Quantizing the activations costs about 1% relative error on random data (int8 values in
    blocks of 32: a step of max / 127); the int16 codebook adds almost nothing."""
    labels, codebook, p = make_layer(256, 1024, 6, torch.float32, device)
    x = torch.randn(16, 1024, device=device)
    exact = F.linear(x, codebook[labels])
    rel = (run(x, p) - exact).norm() / exact.norm()
    assert 1e-4 < rel < 2e-2


def int8_gemm_rows(isa, n, k, bits, mode="int8", density=1.0):
    """The smallest batch at which the kernel table runs the int8 GEMM for an n x k layer of
    `bits`-bit codes in `mode` (int8 or sparse_int8, at this slot density) on this kind of CPU
    (None: never)."""
    table = _native.spqmm_plan()
    for rows in range(1, 4097):
        if table[_native.spqmm_plan_rule(isa, mode, bits, density, n, k, rows)]["kernel"] == "int8_gemm":
            return rows
    return None


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("scaled", [None, "row", "group"])
@pytest.mark.parametrize("n", [70, 600])
def test_int8_gemm_matches_its_reference(monkeypatch, isa, scaled, n):
    """At many rows compute="int8" runs the int8 GEMM (W and x quantized per row, ATen's int8
    GEMM; csrc/core/spqmm_int8.h), which equals dcx.reference.spqmm_int8_gemm up to the float32
    rounding of its epilogue (the exact int32 sum converted, two products, the bias added), row
    and group scales included; odd shapes, at the first such batch and 70 rows past it (both
    orders of the product: several tiles of W and several blocks of the epilogue at n = 600)."""
    monkeypatch.setenv("DCX_CPU_ISA", isa)
    kind = "portable" if isa == "generic" else isa
    k = 301
    first = int8_gemm_rows(kind, n, k, 5)
    if first is None:
        pytest.skip(f"the {kind} rules never run the int8 GEMM")
    torch.manual_seed(0)
    labels, codebook, p = make_layer(n, k, 5, torch.float32, "cpu")
    scale, group = None, 0
    if scaled == "row":
        scale = torch.rand(n) + 0.5
    elif scaled == "group":
        scale, group = torch.rand(n, 5) + 0.5, 64
    bias = torch.randn(n)
    for rows in (first, first + 70):
        x = torch.randn(rows, k)
        x[1] = 0.0  # a row of zeros: scale 0
        y = dcx.ops.spqmm(x, p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, n, k, p.bits,
                          bias, compute="int8", scale=scale, group_size=group)
        expected = reference.spqmm_int8_gemm(x, p.codes, p.codebook, n, k, p.bits, bias, scale,
                                             group)
        magnitude = expected.abs() + bias.double().abs()
        assert y.dtype == torch.float32 and y.shape == expected.shape
        assert ((y.double() - expected).abs() <= 6 * unit_roundoff(torch.float32) * magnitude).all()
        w = codebook.double()[labels]
        if scale is not None:
            w = w * (scale.double()[:, None] if not group
                     else scale.double().repeat_interleave(group, 1)[:, :k])
        exact = F.linear(x.double(), w, bias.double())
        rel = (y.double() - exact).norm() / exact.norm()
        assert 1e-3 < rel < 3e-2  # one int8 step per row of x and of W


def test_int8_gemm_needs_onednn():
    """torch runs its int8 GEMM through oneDNN only with oneDNN enabled (a plain loop otherwise),
    so with it switched off compute="int8" decodes W and multiplies in float32 where the table
    says int8 GEMM."""
    n, k = 600, 301
    first = int8_gemm_rows(cpu_kind(), n, k, 5)
    if first is None:
        pytest.skip(f"the {cpu_kind()} rules never run the int8 GEMM")
    torch.manual_seed(0)
    _, _, p = make_layer(n, k, 5, torch.float32, "cpu")
    x = torch.randn(first, k)

    def spqmm(compute, crossover=-1):
        return dcx.ops.spqmm(x, p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, n, k,
                             p.bits, crossover=crossover, compute=compute)

    with torch.backends.mkldnn.flags(enabled=False):
        y = spqmm("int8")
    torch.testing.assert_close(y, spqmm("float32", crossover=0))
    assert not torch.allclose(spqmm("int8"), y, rtol=1e-4, atol=1e-4)  # the int8 GEMM otherwise


@pytest.mark.parametrize("group", [0, 256])
def test_sparse_int8_gemm_matches_its_reference(group):
    """A sparse layer in int8 compute runs the sparse int8 kernel from a few rows and the int8
    GEMM at many, on the CPUs whose table says so, both by the GEMM's rule with the rows of W
    quantized straight from the steps (csrc/core/spqmm_avx512.h): equal to
    dcx.reference.spqmm_int8_gemm up to the epilogue's float32 roundings, group scales included,
    with a partial last group of rows (n = 70) and rows without weights (their output the bias);
    with oneDNN switched off the GEMM's batch takes the sparse kernels' float32 product."""
    n, k = 70, 3001
    torch.manual_seed(0)
    mask = torch.rand(n, k) < 0.25
    mask[[5, 69]] = False  # rows without weights: scale 0
    labels = torch.randint(0, 32, (n, k))
    codebook = torch.randn(32)
    scale = torch.rand(n, -(-k // group)) + 0.5 if group else None
    p = dcx.pack(mask, labels, codebook, 5, dense=False, group_size=group)
    density = p.codes.shape[0] * 16 / (n * k)
    table = _native.spqmm_plan()
    kernels = {rows: table[_native.spqmm_plan_rule(cpu_kind(), "sparse_int8", 5, density, n, k,
                                                   rows)]["kernel"]
               for rows in (2, 17)}
    first = int8_gemm_rows(cpu_kind(), n, k, 5, "sparse_int8", density)
    batches = [rows for rows, kernel in kernels.items() if kernel == "sparse_int8"]
    batches += [first] if first is not None else []
    if not batches:
        pytest.skip(f"the {cpu_kind()} rules run neither int8 kernel for sparse layers")
    bias = torch.randn(n)
    for rows in batches:
        x = torch.randn(rows, k)

        def spqmm(compute):
            return dcx.ops.spqmm(x, p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, n, k,
                                 p.bits, bias, compute=compute, scale=scale, group_size=group)

        y = spqmm("int8")
        expected = reference.spqmm_int8_gemm(x, p.codes, p.codebook, n, k, p.bits, bias, scale,
                                             group, windows=p.windows, group_ptr=p.group_ptr)
        magnitude = expected.abs() + bias.double().abs()
        assert ((y.double() - expected).abs() <= 6 * unit_roundoff(torch.float32) * magnitude).all(), rows
        assert torch.equal(y[:, [5, 69]], bias[[5, 69]].expand(rows, 2))
        if rows == first:
            with torch.backends.mkldnn.flags(enabled=False):
                torch.testing.assert_close(spqmm("int8"), spqmm("float32"))


@pytest.mark.parametrize("device", devices())
def test_zero_and_constant_rows(device):
    """A block of zeros has scale 0 (no division by zero)."""
    labels, codebook, p = make_layer(8, 70, 4, torch.float32, device)
    x = torch.zeros(3, 70, device=device)
    x[1] = 2.5
    x[2, 40:] = -1.0
    y = run(x, p)
    assert torch.isfinite(y).all() and (y[0] == 0).all()
    check(y, x, p)


@pytest.mark.parametrize("device", devices())
def test_empty(device):
    for n, k, batch in [(0, 5, 3), (5, 0, 3), (5, 7, 0)]:
        _, _, p = make_layer(n, k, 3, torch.float32, device)
        bias = torch.randn(n, device=device)
        y = run(torch.randn(batch, k, device=device), p, bias)
        assert y.shape == (batch, n)
        torch.testing.assert_close(y, bias.expand(batch, n).clone())


@pytest.mark.parametrize("device", devices())
def test_leading_dims(device):
    _, _, p = make_layer(33, 97, 5, torch.float32, device)
    x = torch.randn(2, 3, 97, device=device)
    y = run(x, p)
    assert y.shape == (2, 3, 33)
    torch.testing.assert_close(y, run(x.reshape(6, 97), p).reshape(2, 3, 33))


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    _, _, p = make_layer(33, 97, 5, torch.float32, device)
    args = (torch.randn(3, 97, device=device), p.codes, p.codebook, 33, 97, p.bits,
            torch.randn(33, device=device), True)
    torch.library.opcheck(torch.ops.dcx.spqmm_int8.default, args)


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph(device):
    _, _, p = make_layer(33, 97, 5, torch.float32, device)
    x = torch.randn(4, 97, device=device)
    compiled = torch.compile(lambda x: run(x, p).relu() * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), run(x, p).relu() * 2)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_ids_outside_the_codebook(monkeypatch, device, isa):
    """Codes that name an id past the codebook are reported (they read 0, never out of bounds)."""
    monkeypatch.setenv("DCX_CPU_ISA", isa)
    _, _, p = make_layer(20, 100, 5, torch.float32, device, entries=32)
    short = p._replace(codebook=p.codebook[:20])
    with pytest.raises(RuntimeError, match="outside the codebook"):
        run(torch.randn(2, 100, device=device), short)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, p, b: (x, p._replace(codes=p.codes.short()), b), "codes must be uint8"),
        (lambda x, p, b: (torch.randn(2, 99, device=x.device), p, b), "x must have in_features = 100"),
        (lambda x, p, b: (x.double(), p, b), "x must be float32, float16 or bfloat16"),
        (lambda x, p, b: (x.half(), p._replace(codebook=p.codebook.int()), b), "codebook must be float32"),
        (lambda x, p, b: (x, p._replace(bits=9), b), r"bits must lie in \[1, 8\]"),
        (lambda x, p, b: (x, p._replace(codes=p.codes[:, :-1]), b), r"codes \(dense mode, uint8\) must have shape"),
        (lambda x, p, b: (x, p._replace(codebook=torch.zeros(33, device=x.device)), b), "codebook must be 1-D"),
        (lambda x, p, b: (x, p, b[:3]), r"bias must have shape \[out_features\]"),
    ],
)
def test_bad_input(device, change, match):
    _, _, p = make_layer(8, 100, 5, torch.float32, device)
    x, p, b = change(torch.randn(2, 100, device=device), p, torch.zeros(8, device=device))
    with pytest.raises(RuntimeError, match=match):
        run(x, p, b)


def test_layer_compute_int8(tmp_path):
    """compute="int8" runs a dense-mode layer through the int8 kernels at the batch and layer
    sizes where the kernel table (csrc/core/spqmm_plan.h) takes them (the int8 GEMM, with its
    own rule, at many rows), float32 elsewhere, and a sparse-mode one through the sparse int8
    kernel where the table has it, else in float32; it survives dcx.save and dcx.load (the file's
    layer settings) and a state_dict (the layer's extra state)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(200, 48)
    dense = dcx.SparseQuantLinear.from_float(linear, sparsity=0.0, bits=6, compute="int8")
    sparse = dcx.SparseQuantLinear.from_float(linear, sparsity=0.9, bits=5, compute="int8")
    assert dense.packed.dense and not sparse.packed.dense
    x = torch.randn(5, 200)
    p = dense.packed
    table = _native.spqmm_plan()
    isa = cpu_kind()
    sp = sparse.packed
    density = sp.codes.numel() / (48 * 200)  # the slots' (padding included)
    sparse_int8 = sparse(x)
    sparse.compute = "float32"
    if table[_native.spqmm_plan_rule(isa, "sparse_int8", sp.bits, density, 48, 200, 5)]["kernel"] in INT8_GEMM_KERNELS:
        expected = reference.spqmm_int8_gemm(x, sp.codes, sp.codebook, 48, 200, sp.bits,
                                             sparse.bias.detach(), windows=sp.windows,
                                             group_ptr=sp.group_ptr)
        torch.testing.assert_close(sparse_int8.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(sparse_int8, sparse(x))
    for rows in (1, 8, 16, 40, 200):
        rule = table[_native.spqmm_plan_rule(isa, "int8", p.bits, 1.0, 48, 200, rows)]
        many = torch.randn(rows, 200)
        dense.compute = "int8"
        y = dense(many)
        exact_int8 = run(many, p, dense.bias.detach())
        dense.compute = "float32"
        if rule["kernel"] in INT8_GEMM_KERNELS:
            expected = reference.spqmm_int8_gemm(many, p.codes, p.codebook, 48, 200, p.bits,
                                                 dense.bias.detach())
            torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
            continue
        expected = exact_int8 if rule["kernel"].startswith("int8") else dense(many)
        assert torch.equal(y, expected), rule
    dense.compute = "int8"
    restored = dcx.SparseQuantLinear(200, 48)
    restored.load_state_dict(dense.state_dict())
    assert restored.compute == "int8"
    torch.testing.assert_close(restored(x), dense(x))
    path = dcx.save(torch.nn.Sequential(dense), tmp_path / "int8.dcx")
    loaded = dcx.load(path, torch.nn.Sequential(torch.nn.Linear(200, 48)))
    assert isinstance(loaded[0], dcx.SparseQuantLinear) and loaded[0].compute == "int8"
    torch.testing.assert_close(loaded(x), dense(x))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_gradients(device, dtype):
    """The activations' rounding passes the gradient straight through: grad_x = grad_y W with
    the layer's decoded weight, grad_bias the sum of grad_y, as for spqmm (F.linear's gradients
    are the oracle)."""
    labels, codebook, p = make_layer(33, 97, 5, dtype, device)
    x = torch.randn(4, 97, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(33, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(4, 33, device=device, dtype=dtype)
    run(x, p, bias).backward(grad_y)
    xr, br = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    F.linear(xr, codebook[labels], br).backward(grad_y)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(bias.grad, br.grad)


@pytest.mark.parametrize("device", devices())
def test_opcheck_autograd(device):
    _, _, p = make_layer(33, 97, 5, torch.float32, device)
    args = (torch.randn(3, 97, device=device, requires_grad=True), p.codes, p.codebook, 33, 97,
            p.bits, torch.randn(33, device=device, requires_grad=True), True)
    torch.library.opcheck(torch.ops.dcx.spqmm_int8.default, args)
