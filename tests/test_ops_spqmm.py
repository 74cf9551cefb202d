import pytest
import torch
import torch.nn.functional as F

import dcx
from dcx import _native, reference
from tests.testing import (INT8_GEMM_KERNELS, FLOAT_DTYPES, check_bfloat16, cpu_isas, cpu_kind,
                           devices, first_plan_rules, noncontiguous, plan_compute, requires_kernels,
                           sparse_int8_rules, unit_roundoff)

pytestmark = requires_kernels

SHAPES = [(1, 1), (3, 97), (97, 3), (97, 4097), (4097, 97)]  # (out_features N, in_features K)
BATCHES = [1, 2, 7, 64]
DENSITIES = [0.0, 0.01, 0.1, 0.5, 1.0]


def make_layer(n, k, density, bits, dtype, device, dense=None):
    """A random weight-shared layer (mask, labels, codebook) and its packed form."""
    mask = torch.rand(n, k, device=device) < density
    labels = torch.randint(0, 1 << bits, (n, k), device=device)
    codebook = torch.randn(1 << bits, device=device).to(dtype)
    return mask, labels, codebook, dcx.pack(mask, labels, codebook, bits, dense)


def run(x, p, bias=None, crossover=-1, compute="auto"):
    return dcx.ops.spqmm(x, p.codes, p.windows, p.group_ptr, p.chunks, p.codebook,
                         p.out_features, p.in_features, p.bits, bias, crossover, compute=compute)


def check(y, x, mask, labels, codebook, bias=None):
    """Against F.linear in float64 with the decoded weight codebook[labels] x mask. Weights and x
    are exact in x's dtype; each output sums at most K products in float32 (error <= (K + 1) u32
    sum |w x|, one more term for the bias), then rounds once to x's dtype."""
    w = codebook.double()[labels] * mask
    b = None if bias is None else bias.double()
    expected = F.linear(x.double(), w, b)
    magnitude = F.linear(x.double().abs(), w.abs(), None if b is None else b.abs())
    terms = mask.sum(1).double() + 2
    bound = terms * unit_roundoff(torch.float32) * magnitude + unit_roundoff(x.dtype) * expected.abs()
    assert y.dtype == x.dtype and y.shape == expected.shape
    err = (y.double() - expected).abs()
    assert (err <= bound * 1.01 + 1e-30).all(), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("density", DENSITIES)
def test_matches_reference(device, dtype, shape, batch, density):
    n, k = shape
    bits = 5
    mask, labels, codebook, p = make_layer(n, k, density, bits, dtype, device)
    x = torch.randn(batch, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype)
    check(run(x, p, bias), x, mask, labels, codebook, bias)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("density", [0.1, 1.0])
@pytest.mark.parametrize("batch", [1, 7])
def test_every_bit_width(device, bits, density, batch):
    mask, labels, codebook, p = make_layer(97, 4097, density, bits, torch.float32, device)
    x = torch.randn(batch, 4097, device=device)
    check(run(x, p), x, mask, labels, codebook)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("crossover", [0, 1, 3, 1 << 30])
def test_modes_and_crossover(device, dense, crossover):
    """Both packed modes, whatever the density, and both sides of the crossover (kernel / decode +
    BLAS) agree with the reference."""
    mask, labels, codebook, p = make_layer(64, 300, 0.3, 4, torch.float32, device, dense=dense)
    assert p.dense == dense
    x = torch.randn(7, 300, device=device)
    bias = torch.randn(64, device=device)
    check(run(x, p, bias, crossover), x, mask, labels, codebook, bias)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("crossover", [0, 1 << 30])
@pytest.mark.parametrize("mode", ["grad", "inference"])
def test_grad_and_inference_mode(device, dense, crossover, mode):
    """An inference op called in grad mode with leaf inputs (activations of a model being
    examined), or inside torch.inference_mode: the kernel's inner BLAS calls, on every thread,
    must neither try to record the inputs nor refuse to write inference tensors."""
    mask, labels, codebook, p = make_layer(200, 300, 0.3, 4, torch.float32, device, dense=dense)
    x = torch.randn(40, 300, device=device, requires_grad=mode == "grad")
    bias = torch.randn(200, device=device, requires_grad=mode == "grad")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        with torch.inference_mode(mode == "inference"):
            y = run(x, p, bias, crossover)
    finally:
        torch.set_num_threads(threads)
    check(y.detach(), x.detach(), mask, labels, codebook, bias.detach())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dense", [False, True])
def test_many_rows_decode_the_whole_weight(dtype, dense):
    """From 1024 rows a small layer is decoded whole for one GEMM (csrc/cpu/spqmm_cpu.cpp), in
    either mode (a sparse layer this dense crosses over at 64 rows)."""
    mask, labels, codebook, p = make_layer(37, 97, 0.5, 5, dtype, "cpu", dense=dense)
    assert p.dense == dense
    x = torch.randn(3, 350, 97).to(dtype)
    bias = torch.randn(37).to(dtype)
    check(run(x, p, bias), x, mask, labels, codebook, bias)


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("bits", [2, 5, 6, 7, 8])
@pytest.mark.parametrize("density", [0.1, 1.0])
@pytest.mark.parametrize("batch", [1, 3, 13])
def test_cpu_kernels_of_each_isa(monkeypatch, isa, bits, density, batch):
    """DCX_CPU_ISA picks narrower kernels than the CPU could run (the widest it has otherwise):
    every one is right."""
    monkeypatch.setenv("DCX_CPU_ISA", isa)
    mask, labels, codebook, p = make_layer(33, 4099, density, bits, torch.float32, "cpu")
    x = torch.randn(batch, 4099)
    check(run(x, p), x, mask, labels, codebook)


@pytest.mark.parametrize("isa", cpu_isas())
def test_every_plan_rule_runs(monkeypatch, isa):
    """Every rule of the kernel table (csrc/core/spqmm_plan.h) for this kind of CPU is reached by
    one of eight layers (sparse at low, middle and high slot density, in float32, bfloat16 and
    int8, small and past every size bound; dense, in float32, int8 and bfloat16, small with 4- and
    6-bit codes (either side of the code-width bound) and past every size bound) at some batch, and what it runs is right: float kernels
    against the float64 product (bfloat16 within its roundings), int8 ones equal to spqmm_int8
    (tested against its reference in test_ops_spqmm_int8.py), the int8 GEMM against its own
    reference."""
    monkeypatch.setenv("DCX_CPU_ISA", isa)
    kind = "portable" if isa == "generic" else isa
    torch.manual_seed(0)
    table = _native.spqmm_plan()
    # Layers below every rule's size bound, and past them (sparse at slot densities about 0.14
    # and 0.45, either side of the sparse int8 rules' density bound for large layers).
    big = max(300, -(-max(r["min_weights"] for r in table) // 64))
    layers = [make_layer(40, 300, 0.1, 5, torch.float32, "cpu", dense=False),
              make_layer(40, 300, 0.3, 5, torch.float32, "cpu", dense=False),
              make_layer(40, 300, 0.6, 6, torch.float32, "cpu", dense=False),
              make_layer(40, 300, 1.0, 4, torch.float32, "cpu", dense=True),
              make_layer(40, 300, 1.0, 6, torch.float32, "cpu", dense=True),
              make_layer(64, big, 1.0, 4, torch.float32, "cpu", dense=True)]
    if sparse_int8_rules(kind, big):  # packing them takes seconds: only where they are reached
        layers += [make_layer(64, big, 0.1, 5, torch.float32, "cpu", dense=False),
                   make_layer(64, big, 0.4, 5, torch.float32, "cpu", dense=False)]
    for i, mode, rows, rule in first_plan_rules(kind, [layer[3] for layer in layers]):
        mask, labels, codebook, p = layers[i]
        n, k = p.out_features, p.in_features
        x, bias = torch.randn(rows, k), torch.randn(n)
        y = dcx.ops.spqmm(x, p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, n, k,
                          p.bits, bias, compute=plan_compute(mode))
        if table[rule]["kernel"] in INT8_GEMM_KERNELS:  # their own, coarser rule
            expected = reference.spqmm_int8_gemm(x, p.codes, p.codebook, n, k, p.bits, bias,
                                                 windows=p.windows, group_ptr=p.group_ptr)
            torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
        elif table[rule]["kernel"].startswith("int8"):
            assert torch.equal(y, dcx.ops.spqmm_int8(x, p.codes, p.codebook, n, k, p.bits,
                                                     bias)), table[rule]
        elif plan_compute(mode) == "bfloat16":
            check_bfloat16(y, x, codebook.double()[labels] * mask, bias)
        else:
            check(y, x, mask, labels, codebook, bias)


def test_skewed_rows_split_between_chunks():
    """One full row among empty ones spans many chunks; its partial sums must add up once."""
    n, k = 9, 40000
    mask = torch.zeros(n, k, dtype=torch.bool)
    mask[4] = True
    mask[7, ::3] = True
    labels = torch.randint(0, 16, (n, k))
    codebook = torch.randn(16)
    p = dcx.pack(mask, labels, codebook, 4, dense=False)
    assert p.chunks.numel() > 5
    for batch in (1, 3, 17):
        x = torch.randn(batch, k)
        bias = torch.randn(n)
        check(run(x, p, bias), x, mask, labels, codebook, bias)


@pytest.mark.parametrize("device", devices())
def test_leading_dims_and_noncontiguous(device):
    mask, labels, codebook, p = make_layer(33, 97, 0.2, 5, torch.float32, device)
    x = noncontiguous(torch.randn(2, 3, 97, device=device))
    y = run(x, p)
    assert y.shape == (2, 3, 33)
    check(y.reshape(6, 33), x.reshape(6, 97), mask, labels, codebook)
    xt = torch.randn(97, 5, device=device).t()  # transposed view
    check(run(xt, p), xt, mask, labels, codebook)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dense", [False, True])
def test_empty(device, dense):
    for n, k, batch in [(0, 5, 3), (5, 0, 3), (5, 7, 0)]:
        mask, labels, codebook, p = make_layer(n, k, 0.5, 3, torch.float32, device, dense=dense)
        bias = torch.randn(n, device=device)
        x = torch.randn(batch, k, device=device)
        y = run(x, p, bias)
        assert y.shape == (batch, n)
        torch.testing.assert_close(y, bias.expand(batch, n) + x @ (codebook[labels] * mask).t())


def test_reference_decodes_pack():
    mask, labels, codebook, p = make_layer(97, 4097, 0.1, 5, torch.float32, "cpu")
    w = reference.spqmm_weight(p.codes, p.windows, p.group_ptr, p.codebook, 97, 4097, 5)
    assert torch.equal(w, codebook.double()[labels] * mask)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dense", [False, True])
def test_opcheck(device, dense):
    _, _, _, p = make_layer(33, 97, 0.2, 5, torch.float32, device, dense=dense)
    x = torch.randn(3, 97, device=device)
    args = (x, p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, 33, 97, p.bits,
            torch.randn(33, device=device), -1, True)
    torch.library.opcheck(torch.ops.dcx.spqmm.default, args)


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph(device):
    _, _, _, p = make_layer(33, 97, 0.2, 5, torch.float32, device)
    x = torch.randn(4, 97, device=device)
    compiled = torch.compile(lambda x: run(x, p).relu() * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), run(x, p).relu() * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("dense", [False, True])
def test_cuda_graph_capture(dense):
    mask, labels, codebook, p = make_layer(256, 1000, 0.1, 5, torch.float16, "cuda", dense=dense)
    x = torch.randn(4, 1000, device="cuda", dtype=torch.float16)
    run(x, p)  # warm-up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run(x, p)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    check(y, x, mask, labels, codebook)


def _corrupt(p, **changes):
    return p._replace(**changes)


def _corruptions(device):
    _, _, _, p = make_layer(40, 100, 0.5, 5, torch.float32, device, dense=False)
    _, _, _, d = make_layer(8, 100, 0.9, 5, torch.float32, device, dense=True)
    live = (p.codes.long() & 0xFFFF) >> 15 == 1
    step, lane = [int(i) for i in live.nonzero()[0]]
    bad_id = p.codes.clone()
    bad_id[step, lane] |= 31  # id 31 with a 3-entry codebook below
    bad_window = p.windows.clone()
    bad_window[-1] = 1000  # K = 100
    negative_window = p.windows.clone()
    negative_window[0] = -5
    bad_offset = p.codes.clone()  # the last step's window moved to K - 1 with a live offset 31
    bad_offset[-1, 0] = torch.tensor(0x8000 | (31 << 8), dtype=torch.int32).to(torch.int16)
    last_window = p.windows.clone()
    last_window[-1] = 99
    bad_ptr = p.group_ptr.clone()
    bad_ptr[2] = p.codes.shape[0] + 50
    bad_chunks = p.chunks.clone()
    bad_chunks[-1] = 10**6
    bad_dense = d.codes.clone()
    bad_dense[1, 2] = 200
    mask = torch.rand(8, 100, device=device) < 0.9
    nibbles = dcx.pack(mask, torch.randint(0, 10, (8, 100), device=device),
                       torch.randn(10, device=device), dense=True)  # 10 ids + a zero: 4 bits
    bad_nibble = nibbles.codes.clone()
    bad_nibble[3, 5] |= 0xF0  # id 15 for column 49 (word 1, nibble 3) of row 3
    return [
        (_corrupt(p, codes=bad_id, codebook=p.codebook[:3]), "codebook id outside the codebook"),
        (_corrupt(p, windows=bad_window), "column outside in_features"),
        (_corrupt(p, windows=negative_window), "column outside in_features"),
        (_corrupt(p, codes=bad_offset, windows=last_window), "column outside in_features"),
        (_corrupt(p, group_ptr=bad_ptr), "group_ptr"),
        (_corrupt(p, chunks=bad_chunks), "chunks"),
        (_corrupt(d, codes=bad_dense), "codebook id outside the codebook"),
        (_corrupt(nibbles, codes=bad_nibble), "codebook id outside the codebook"),
    ]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", range(8))
@pytest.mark.parametrize("crossover", [-1, 1])
@pytest.mark.parametrize("compute", ["auto", "int8"])
def test_corrupted_packed_data(device, case, crossover, compute):
    """Corrupted packed data is reported, not read out of bounds: by the step and batch kernels,
    and with compute="int8" by the sparse int8 kernel where the CPU has it."""
    p, match = _corruptions(device)[case]
    for rows in (2, 17):
        x = torch.randn(rows, 100, device=device)
        with pytest.raises(RuntimeError, match=match):
            run(x, p, crossover=crossover, compute=compute)
        if device == "cuda":
            torch.cuda.synchronize()


def test_descending_windows_with_int8():
    """Windows that descend within a group (corrupted: the packer never writes them) are reported
    by the sparse int8 kernel, whose units need them in order, where the CPU runs it."""
    _, _, _, p = make_layer(40, 300, 0.3, 5, torch.float32, "cpu", dense=False)
    density = p.codes.shape[0] * 16 / (40 * 300)
    table = _native.spqmm_plan()
    if table[_native.spqmm_plan_rule(cpu_kind(), "sparse_int8", p.bits, density, 40, 300, 2)]["kernel"] != "sparse_int8":
        pytest.skip(f"the {cpu_kind()} rules have no sparse int8 kernel")
    windows = p.windows.clone()
    windows[int(p.group_ptr[1]) - 2] = 0  # late in group 0
    bad = _corrupt(p, windows=windows)
    for rows in (2, 17):
        with pytest.raises(RuntimeError, match="windows descend"):
            run(torch.randn(rows, 300), bad, compute="int8")


def test_cpu_ops_give_the_thread_count_back():
    """The CPU ops may set the calling thread's OpenMP count to one for a call (while a worker
    straggles); the caller's count is back after each call, an error's too, and one thread
    computes what two do."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _, _, _, p = make_layer(256, 512, 0.3, 5, torch.float32, "cpu", dense=False)
        x = torch.randn(16, 512)
        y = run(x, p)
        assert torch.get_num_threads() == 2
        bad, match = _corruptions("cpu")[0]
        with pytest.raises(RuntimeError, match=match):
            run(torch.randn(2, 100), bad)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        torch.testing.assert_close(run(x, p), y)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("rows", [1, 2, 9])
@pytest.mark.parametrize("compute", ["float32", "bfloat16", "int8"])
def test_bad_nibble_in_a_whole_block(monkeypatch, isa, rows, compute):
    """An id past a 10-entry codebook in a whole block of 4-bit nibbles (the AVX-512 row kernel
    reads such blocks without masking the ids, and tracks their maximum only when the codebook
    has fewer than 16 entries) is reported at every batch size and compute mode; a full 16-entry
    codebook takes the same kernels untracked and gives the reference result."""
    monkeypatch.setenv("DCX_CPU_ISA", isa)
    mask = torch.ones(8, 256, dtype=torch.bool)
    labels = torch.randint(0, 10, (8, 256))
    p = dcx.pack(mask, labels, torch.randn(10), bits=4, dense=True)
    codes = p.codes.clone()
    codes[5, 64 + 4 * 3 + 2] |= 0xF0  # row 5, second block, word 3, nibble 5: column 128 + 83
    x = torch.randn(rows, 256)
    with pytest.raises(RuntimeError, match="codebook id outside the codebook"):
        run(x, p._replace(codes=codes), compute=compute)
    full = dcx.pack(mask, torch.randint(0, 16, (8, 256)), torch.randn(16), bits=4, dense=True)
    w = dcx.ops.spqmm_decode(full.codes, full.windows, full.group_ptr, full.chunks, full.codebook, 8, 256, 4)
    expected = F.linear(x, w)
    y = run(x, full, compute=compute)
    tol = 1e-4 if compute == "float32" else 0.05 * float(expected.abs().max())
    torch.testing.assert_close(y, expected, atol=tol, rtol=0.02 if compute != "float32" else 1e-5)


@pytest.mark.skipif(cpu_kind() != "avx512amx", reason="the sparse AMX kernel needs a CPU with AMX")
@pytest.mark.parametrize("case", range(5))
def test_corrupted_steps_on_the_amx_kernel(case):
    """The sparse AMX kernel (bfloat16 compute from a dozen rows) reports corrupted steps as the
    other kernels do, and also a window below its group's previous one: it reads a group's steps
    in the order of their windows, chunk by chunk."""
    corruptions = _corruptions("cpu")[:4]
    _, _, _, p = make_layer(40, 300, 0.5, 5, torch.float32, "cpu", dense=False)
    windows = p.windows.clone()
    windows[int(p.group_ptr[1]) - 2] = 0  # late in group 0: past its first chunk of 128 columns
    corruptions.append((_corrupt(p, windows=windows), "windows descend within a group"))
    p, match = corruptions[case]
    x = torch.randn(20, p.in_features)
    with pytest.raises(RuntimeError, match=match):
        run(x, p, compute="bfloat16")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("crossover", [-1, 1])
def test_padding_nibbles_are_never_read(monkeypatch, device, isa, crossover):
    """Dense codes of up to 4 bits pad each row to whole blocks of 128 columns: those nibbles are
    never read as weights, so a value there is no error on any path (kernel, decode, ISA)."""
    monkeypatch.setenv("DCX_CPU_ISA", isa)
    mask = torch.ones(5, 100, dtype=torch.bool, device=device)
    labels = torch.randint(0, 10, (5, 100), device=device)
    p = dcx.pack(mask, labels, torch.randn(10, device=device), dense=True)
    codes = p.codes.clone()
    codes[:, 4 * 9 + 3] |= 0xF0  # nibble 7 of word 9: column 16 * 7 + 9 = 121 >= K
    x = torch.randn(3, 100, device=device)
    y = run(x, p._replace(codes=codes), crossover=crossover)
    check(y, x, mask, labels, p.codebook)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape, batch", [((0, 40), 3), ((8, 40), 0), ((8, 0), 3), ((0, 0), 0),
                                          ((8, 0), 0)])
def test_empty_dimensions_still_check_the_pointers(device, shape, batch):
    """With nothing to compute (M, N or K zero) the structure of a sparse weight is still
    checked, on every device alike."""
    n, k = shape
    _, _, _, p = make_layer(n, k, 0.3, 5, torch.float32, device, dense=False)
    x = torch.randn(batch, k, device=device)
    y = run(x, p, torch.ones(n, device=device))
    assert y.shape == (batch, n) and (y == 1).all()
    with pytest.raises(RuntimeError, match="group_ptr or chunks|group_ptr|chunks"):
        run(x, p._replace(chunks=p.chunks + 7))
        if device == "cuda":
            torch.cuda.synchronize()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda x, p, b: (torch.randn(2, 99, device=x.device), p, b), "x must have in_features = 100"),
        (lambda x, p, b: (x.double(), p, b), "x must be float32, float16 or bfloat16"),
        (lambda x, p, b: (x.half(), p._replace(codebook=p.codebook.int()), b), "codebook must be float32"),
        (lambda x, p, b: (x, p._replace(bits=9), b), r"bits must lie in \[1, 8\]"),
        (lambda x, p, b: (x, p._replace(codes=p.codes.int()), b), "codes must be int16"),
        (lambda x, p, b: (x, p._replace(codes=p.codes.flatten()), b), r"codes \(sparse mode, int16\) must be"),
        (lambda x, p, b: (x, p._replace(windows=p.windows[:-1]), b), "windows must be 1-D"),
        (lambda x, p, b: (x, p._replace(windows=p.windows.long()), b), "windows must be int32"),
        (lambda x, p, b: (x, p._replace(group_ptr=p.group_ptr[:-1]), b), "group_ptr must be 1-D"),
        (lambda x, p, b: (x, p._replace(group_ptr=p.group_ptr.long()), b), "group_ptr must be int32"),
        (lambda x, p, b: (x, p._replace(codebook=torch.zeros(33, device=x.device)), b), "codebook must be 1-D"),
        (lambda x, p, b: (x, p, b[:3]), r"bias must have shape \[out_features\]"),
        (lambda x, p, b: (x, p, b.int()), "bias must be float32, float16 or bfloat16"),
    ],
)
def test_bad_input(device, change, match):
    _, _, _, p = make_layer(8, 100, 0.5, 5, torch.float32, device, dense=False)
    x, p, b = change(torch.randn(2, 100, device=device), p, torch.zeros(8, device=device))
    with pytest.raises(RuntimeError, match=match):
        run(x, p, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_bad_input_device_mismatch():
    _, _, _, p = make_layer(8, 100, 0.5, 5, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="must be on the device of x"):
        run(torch.randn(2, 100), p)
    with pytest.raises(RuntimeError, match="bias must be on the device of x"):
        run(torch.randn(2, 100, device="cuda"), p, torch.zeros(8))


@pytest.mark.parametrize(
    "args, match",
    [
        (lambda: (torch.ones(3), torch.zeros(3, dtype=torch.long), torch.zeros(4)), "mask must be 2-D"),
        (lambda: (torch.ones(2, 3), torch.zeros(2, 4, dtype=torch.long), torch.zeros(4)), "labels must have the shape"),
        (lambda: (torch.ones(2, 3), torch.zeros(2, 3), torch.zeros(4)), "labels must be an integer"),
        (lambda: (torch.ones(2, 3), torch.full((2, 3), 4), torch.zeros(4)), r"labels must lie in \[0, 4\)"),
        (lambda: (torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(300)), "codebook must be 1-D with 1 to 256"),
        (lambda: (torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(5), 2), r"bits must lie in \[1, 8\] and hold"),
    ],
)
def test_pack_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        dcx.pack(*args())


def test_dense_mode_packs_small_ids_two_per_byte():
    """Up to 4 bits, dense mode holds two ids per byte: [N, ceil(K / 128) * 64]; in a block of
    128 columns, nibble t of little-endian 32-bit word d holds column 16 t + d."""
    labels = torch.arange(40).remainder(16).repeat(3, 1)
    p = dcx.pack(torch.ones(3, 40, dtype=torch.bool), labels, torch.randn(16), dense=True)
    assert p.bits == 4 and p.codes.shape == (3, 64)
    # labels are column % 16. Byte 4 d + t // 2: columns 5 (t 0) and 21 (t 1) share byte 20;
    # column 39 (d 7, t 2) is the low nibble of byte 29, whose high nibble (column 55) is empty.
    assert p.codes[0, 20] == 5 | (21 % 16) << 4
    assert p.codes[0, 29] == 39 % 16
    x = torch.randn(2, 40)
    check(run(x, p), x, torch.ones(3, 40, dtype=torch.bool), labels, p.codebook)


def test_pack_pruned_labels_are_free_and_dense_mode_zero():
    """Pruned positions may hold any label; dense mode maps them to a zero codebook entry (added
    when the codebook has none)."""
    mask = torch.tensor([[True, False], [False, True]])
    labels = torch.tensor([[1, -7], [99, 0]])
    codebook = torch.tensor([0.5, -2.0])
    p = dcx.pack(mask, labels, codebook, dense=True)
    assert p.dense and p.codebook.tolist() == [0.5, -2.0, 0.0] and p.bits == 2
    x = torch.tensor([[1.0, 10.0]])
    torch.testing.assert_close(run(x, p), torch.tensor([[-2.0, 5.0]]))
    assert dcx.pack(mask, labels, codebook).codes.dtype == torch.uint8  # 50%: dense by default
    assert dcx.pack(mask, labels, codebook, dense=False).codes.dtype == torch.int16


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_pack_label_dtypes(label_dtype):
    """Any integer labels, including uint8 holding id 255 of a 256-entry codebook."""
    mask = torch.rand(20, 300) < 0.3
    labels = torch.randint(0, 128, (20, 300)).to(label_dtype)
    labels[0, :] = 127 if label_dtype == torch.int16 else 255 if label_dtype == torch.uint8 else 200
    codebook = torch.randn(256)
    for dense in (False, True):
        p = dcx.pack(mask, labels, codebook, dense=dense)
        x = torch.randn(2, 300)
        check(run(x, p), x, mask, labels.long(), codebook)


def linear_grads(x, w, bias, grad_y):
    """(grad_x, grad_bias) of F.linear with the weight given dense: the oracle of the gradients."""
    xr = x.detach().clone().requires_grad_()
    br = bias.detach().clone().requires_grad_()
    F.linear(xr, w, br).backward(grad_y)
    return xr.grad, br.grad


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("crossover", [-1, 0])
def test_gradients(device, dtype, dense, crossover):
    """grad_x = grad_y W and grad_bias = the sum of grad_y over the batch, whichever path ran
    forward, against F.linear's gradients with the decoded weight (the same arithmetic in
    another GEMM: assert_close's tolerances for the dtype)."""
    mask, labels, codebook, p = make_layer(33, 97, 0.3, 5, dtype, device, dense=dense)
    x = torch.randn(2, 3, 97, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(33, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(2, 3, 33, device=device, dtype=dtype)
    run(x, p, bias, crossover).backward(grad_y)
    w = torch.where(mask, codebook[labels], torch.zeros((), dtype=dtype, device=device))
    grad_x, grad_bias = linear_grads(x, w, bias, grad_y)
    torch.testing.assert_close(x.grad, grad_x)
    torch.testing.assert_close(bias.grad, grad_bias)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dense", [False, True])
def test_gradcheck(device, dense):
    """Finite differences of the op itself. The op is float32 at most; it is linear in x and the
    bias, so a wide step (0.25) leaves only the float32 rounding of outputs of size about 10:
    about 1e-6 / 0.25, far inside atol 1e-3."""
    _, _, _, p = make_layer(9, 40, 0.5, 4, torch.float32, device, dense=dense)
    x = torch.randn(3, 40, device=device, requires_grad=True)
    bias = torch.randn(9, device=device, requires_grad=True)
    with pytest.warns(UserWarning, match="double precision"):
        assert torch.autograd.gradcheck(lambda x, b: run(x, p, b), (x, bias), eps=0.25,
                                        atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("device", devices())
def test_opcheck_autograd(device):
    _, _, _, p = make_layer(33, 97, 0.2, 5, torch.float32, device, dense=False)
    args = (torch.randn(3, 97, device=device, requires_grad=True), p.codes, p.windows,
            p.group_ptr, p.chunks, p.codebook, 33, 97, p.bits,
            torch.randn(33, device=device, requires_grad=True), -1, True)
    torch.library.opcheck(torch.ops.dcx.spqmm.default, args)


def test_codebook_gets_no_gradient():
    _, _, _, p = make_layer(8, 40, 0.5, 4, torch.float32, "cpu")
    x = torch.randn(2, 40)
    with pytest.raises(RuntimeError, match="codebook requires grad.*fine-tune the codebook before packing"):
        run(x, p._replace(codebook=p.codebook.clone().requires_grad_()))
