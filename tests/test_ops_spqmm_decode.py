import pytest
import torch

import dcx
from dcx import reference
from tests.test_ops_spqmm import _corruptions, make_layer
from tests.testing import FLOAT_DTYPES, devices, requires_kernels

pytestmark = requires_kernels


def decode(p):
    return dcx.ops.spqmm_decode(p.codes, p.windows, p.group_ptr, p.chunks, p.codebook,
                                p.out_features, p.in_features, p.bits)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 97), (97, 3), (33, 4097), (0, 5), (5, 0)])
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("dense", [False, True])
def test_matches_reference(device, dtype, shape, density, dense):
    """Every element is a codebook entry or 0: exact, in the codebook's dtype."""
    mask, labels, codebook, p = make_layer(*shape, density, 5, dtype, device, dense=dense)
    w = decode(p)
    assert w.dtype == dtype and w.shape == shape and w.device.type == device
    expected = torch.where(mask, codebook[labels], torch.zeros((), dtype=dtype, device=device))
    assert torch.equal(w, expected)
    assert torch.equal(w, reference.spqmm_decode(p.codes, p.windows, p.group_ptr, p.chunks,
                                                 p.codebook, *shape, p.bits))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("bits", range(1, 9))
def test_every_bit_width(device, bits):
    mask, labels, codebook, p = make_layer(20, 300, 1.0, bits, torch.float32, device, dense=True)
    assert torch.equal(decode(p), codebook[labels] * mask)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dense", [False, True])
def test_opcheck(device, dense):
    _, _, _, p = make_layer(33, 97, 0.2, 5, torch.float32, device, dense=dense)
    args = (p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, 33, 97, p.bits)
    torch.library.opcheck(torch.ops.dcx.spqmm_decode.default, args)


@pytest.mark.parametrize("device", devices())
def test_compile_fullgraph(device):
    _, _, _, p = make_layer(33, 97, 0.2, 5, torch.float32, device)
    compiled = torch.compile(lambda: decode(p) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(), decode(p) * 2)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("case", range(8))
def test_corrupted_packed_data(device, case):
    p, match = _corruptions(device)[case]
    with pytest.raises(RuntimeError, match=match):
        decode(p)
        if device == "cuda":
            torch.cuda.synchronize()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p: p._replace(bits=0), r"bits must lie in \[1, 8\]"),
        (lambda p: p._replace(codebook=p.codebook.double()), "codebook must be float32, float16 or bfloat16"),
        (lambda p: p._replace(codebook=torch.zeros(33)), "codebook must be 1-D with 1 to"),
        (lambda p: p._replace(codes=p.codes.int()), "codes must be int16"),
        (lambda p: p._replace(windows=p.windows[:-1]), "windows must be 1-D"),
        (lambda p: p._replace(group_ptr=p.group_ptr.long()), "group_ptr must be int32"),
        (lambda p: p._replace(out_features=-1), "out_features and in_features must be >= 0"),
    ],
)
def test_bad_input(change, match):
    _, _, _, p = make_layer(8, 100, 0.5, 5, torch.float32, "cpu", dense=False)
    with pytest.raises(RuntimeError, match=match):
        decode(change(p))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dense", [False, True])
def test_unchecked_decode_is_the_same(device, dense):
    """check=False (a packed embedding's lookup: no host sync on CUDA) decodes the same; on the
    CPU, where the checks cost nothing, corrupted data still raises."""
    _, _, _, p = make_layer(33, 97, 0.2, 5, torch.float32, device, dense=dense)
    unchecked = dcx.ops.spqmm_decode(p.codes, p.windows, p.group_ptr, p.chunks, p.codebook,
                                     33, 97, p.bits, check=False)
    assert torch.equal(unchecked, decode(p))
    args = (p.codes, p.windows, p.group_ptr, p.chunks, p.codebook, 33, 97, p.bits, False)
    torch.library.opcheck(torch.ops.dcx.spqmm_decode.default, args)
    if device == "cpu":
        bad, match = _corruptions(device)[0]
        with pytest.raises(RuntimeError, match=match):
            dcx.ops.spqmm_decode(bad.codes, bad.windows, bad.group_ptr, bad.chunks, bad.codebook,
                                 bad.out_features, bad.in_features, bad.bits, check=False)
