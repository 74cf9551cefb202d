"""The .dcx file: relative indices (the filler rule at its boundaries), bit-exact round trips of
compressed tensors and models, byte-identical saves, atomic saves, and every kind of corruption
raising FormatError."""

import json
import zlib
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dcx
from dcx import format as fmt
from tests.fuzz import fuzz_format
from tests.testing import requires_kernels

pytestmark = requires_kernels


def bitwise_equal(a, b):
    """Same dtype, shape and bits (so -0.0 != 0.0 and NaN == NaN with the same payload)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and bytes(fmt._raw_bytes(a)) == bytes(fmt._raw_bytes(b))
    )


def random_record(
    shape, density, bits, index_bits=4, dtype=torch.float32, mode=None, skew=True, segment_rows=None
):
    mask = torch.rand(shape) < density
    k = 1 << bits
    if skew:  # clusters near zero are the most common, as in real weight sharing
        labels = (torch.randn(shape).abs() * k / 6).long().clamp_(max=k - 1)
    else:
        labels = torch.randint(0, k, shape)
    codebook = torch.sort(torch.randn(k))[0].to(dtype)
    return fmt.CompressedTensor(mask, labels, codebook, bits, index_bits=index_bits,
                                segment_rows=segment_rows, mode=mode)


def check_same(ct, back):
    assert torch.equal(back.mask, ct.mask)
    assert torch.equal(back.labels[ct.mask], ct.labels[ct.mask].long())
    assert bitwise_equal(back.codebook, ct.codebook)
    dense = back.to_dense()
    assert bitwise_equal(dense, ct.to_dense())
    assert (dense[~ct.mask] == 0).all() and not torch.signbit(dense[~ct.mask]).any()


def round_trip(ct):
    meta, sections = fmt.encode_tensor(ct)
    back = fmt.decode_tensor(json.loads(json.dumps(meta)), dict(sections))
    check_same(ct, back)
    return meta, sections


# ---------------------------------------------------------------------------- relative indices


def encode(positions, numel, seg_size, index_bits):
    entries, seg = fmt.encode_positions(
        np.array(positions, dtype=np.int64), numel, seg_size, index_bits
    )
    back = fmt.decode_positions(entries, seg, numel, seg_size, index_bits)
    assert back.tolist() == list(positions)
    return entries.tolist(), seg.tolist()


@pytest.mark.parametrize("index_bits", [1, 2, 3, 4, 8])
def test_filler_rule_at_boundaries(index_bits):
    """With M = 2^bits - 1: a gap of M is one entry; M + 1 is a filler and 1; 2M is a filler and
    M; 2M + 1 is two fillers and 1. The first position's gap counts from -1."""
    m = (1 << index_bits) - 1
    n = 10 * m + 10
    assert encode([m - 1], m, n, index_bits)[0] == [m]  # gap M, ends the segment
    assert encode([m], m + 1, n, index_bits)[0] == [0, 1]  # gap M + 1
    assert encode([2 * m - 1], 2 * m, n, index_bits)[0] == [0, m]  # gap 2M
    assert encode([2 * m], 2 * m + 1, n, index_bits)[0] == [0, 0, 1]  # gap 2M + 1
    assert encode([0, m, m + m + 1], 2 * m + 2, n, index_bits)[0] == [1, m, 0, 1]
    assert encode([0], 1, n, index_bits)[0] == [1]


def test_trailing_fillers_and_empty_segments():
    # M = 7: 20 positions, none kept -> 2 fillers (14 covered, 6 < 7 left); per segment of 8:
    # 8 -> 1 filler, 8 -> 1 filler, 4 -> none.
    assert encode([], 20, 100, 3) == ([0, 0], [2])
    assert encode([], 20, 8, 3) == ([0, 0], [1, 1, 0])
    # One kept weight per segment of 10, at its first position: gap 1 then 9 trailing -> 1 filler.
    assert encode([0, 10, 20], 30, 10, 3) == ([1, 0, 1, 0, 1, 0], [2, 2, 2])
    # index_bits = 1 is a bitmap: one entry per position.
    assert encode([1, 2, 5], 7, 100, 1) == ([0, 1, 1, 0, 0, 1, 0], [7])
    assert encode([], 0, 10, 4) == ([], [])


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 3000), st.integers(1, 700), st.integers(1, 12), st.floats(0, 1), st.randoms())
def test_positions_round_trip_property(numel, seg_size, index_bits, density, rnd):
    positions = sorted(i for i in range(numel) if rnd.random() < density)
    entries, seg = encode(positions, numel, seg_size, index_bits)
    assert all(0 <= v < 1 << index_bits for v in entries)
    assert sum(v != 0 for v in entries) == len(positions) and sum(seg) == len(entries)


def test_decode_positions_rejects_bad_streams():
    entries, seg = fmt.encode_positions(np.array([3, 9]), 12, 100, 3)  # [4, 6] + ... covers 10
    with pytest.raises(fmt.FormatError, match="covers"):  # last position past the segment
        fmt.decode_positions(np.array([7, 7]), np.array([2]), 12, 100, 3)
    with pytest.raises(fmt.FormatError, match="covers"):  # trailing filler missing
        fmt.decode_positions(np.array([1]), np.array([1]), 12, 100, 3)
    with pytest.raises(fmt.FormatError, match="pointers count"):
        fmt.decode_positions(entries, seg + 1, 12, 100, 3)
    with pytest.raises(fmt.FormatError, match="segment pointers for"):
        fmt.decode_positions(entries, np.array([1, 1]), 12, 100, 3)


# ---------------------------------------------------------------------------- one tensor


SHAPES = [(), (1,), (7,), (3, 5), (300, 100), (16, 3, 3, 3), (5, 0), (2, 1, 97)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.09, 0.5, 1.0])
@pytest.mark.parametrize("mode", [None, "sparse", "dense"])
def test_round_trip_shapes_densities_modes(shape, density, mode):
    round_trip(random_record(shape, density, bits=5, index_bits=4, mode=mode))


@pytest.mark.parametrize("bits", [1, 2, 4, 5, 8, 9, 12])
@pytest.mark.parametrize("index_bits", [1, 3, 5, 8, 12])
def test_round_trip_bits(bits, index_bits):
    round_trip(random_record((64, 75), 0.1, bits, index_bits, mode="sparse"))
    round_trip(random_record((64, 75), 0.1, bits, index_bits, mode="dense", skew=False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_codebook_dtypes_and_signed_zero(dtype):
    ct = random_record((20, 30), 0.3, 3, dtype=dtype)
    ct.codebook[0] = -0.0
    ct.codebook[1] = float("nan")
    round_trip(ct)


@pytest.mark.parametrize("segment_rows", [1, 2, 7, 1000])
def test_segment_rows(segment_rows):
    meta, sections = round_trip(
        random_record((40, 50), 0.05, 5, segment_rows=segment_rows, mode="sparse")
    )
    assert meta["segment_rows"] == min(segment_rows, 40)
    assert len(dict(sections)["pointers"]) == 4 * -(-40 // segment_rows)


def test_mode_choice():
    """Unpruned: codes alone; heavily pruned: positions; each the smaller of the two."""
    dense_meta, _ = round_trip(random_record((100, 100), 1.0, 5))
    assert dense_meta["mode"] == "dense"
    sparse_meta, sparse = round_trip(random_record((100, 100), 0.05, 5))
    assert sparse_meta["mode"] == "sparse"
    _, forced = fmt.encode_tensor(random_record((100, 100), 0.05, 5, mode="dense"))
    assert sum(len(b) for _, b in sparse) <= sum(len(b) for _, b in forced)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 40), min_size=0, max_size=3),
    st.floats(0, 1),
    st.integers(1, 10),
    st.integers(1, 10),
    st.sampled_from([None, "sparse", "dense"]),
    st.integers(0, 2**31),
)
def test_round_trip_property(shape, density, bits, index_bits, mode, seed):
    torch.manual_seed(seed)
    round_trip(random_record(tuple(shape), density, bits, index_bits, mode=mode))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda ct: setattr(ct, "mask", ct.mask.int()), "mask must be a bool tensor"),
        (lambda ct: setattr(ct, "labels", ct.labels.float()), "labels must be an integer"),
        (lambda ct: setattr(ct, "labels", ct.labels[:1]), "labels must have the shape"),
        (lambda ct: setattr(ct, "bits", 2), "more than 2"),
        (lambda ct: setattr(ct, "bits", 17), "bits must be an int"),
        (lambda ct: setattr(ct, "index_bits", 0), "index_bits must be an int"),
        (lambda ct: setattr(ct, "codebook", ct.codebook.int()), "codebook must be float"),
        (lambda ct: setattr(ct, "codebook", ct.codebook[:0]), "codebook must be 1-D and non-empty"),
        (lambda ct: ct.labels.fill_(8), r"labels must lie in \[0, 8\)"),
        (lambda ct: setattr(ct, "mode", "csr"), "mode must be"),
        (lambda ct: setattr(ct, "segment_rows", 0), "segment_rows must be"),
    ],
)
def test_bad_records(change, match):
    ct = random_record((4, 5), 0.5, 3)
    ct.mask[0, 0] = True
    change(ct)
    with pytest.raises(ValueError, match=match):
        fmt.encode_tensor(ct, "w")


# ---------------------------------------------------------------------------- values and files


@pytest.mark.parametrize("shape", [(0,), (1,), (40, 60), (8, 3, 3, 3)])
@pytest.mark.parametrize("density", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_values_round_trip(shape, density, dtype):
    """Pruning alone: the kept values raw, bit for bit, at Huffman-coded positions."""
    mask = torch.rand(shape) < density
    values = torch.randn(shape).to(dtype)
    values.view(-1)[:1] = -0.0  # a signed zero survives
    ct = fmt.CompressedTensor(mask, values=values, index_bits=4)
    meta, sections = fmt.encode_tensor(ct)
    assert meta["payload"] == "values" and meta["mode"] == "sparse"
    assert len(dict(sections)["values"]) == int(mask.sum()) * values.element_size()
    back = fmt.decode_tensor(json.loads(json.dumps(meta)), dict(sections))
    assert torch.equal(back.mask, mask) and back.codebook is None
    assert bitwise_equal(back.to_dense(), ct.to_dense())


def test_bad_values_records():
    mask = torch.rand(4, 5) < 0.5
    for ct, match in [
        (fmt.CompressedTensor(mask, values=torch.randn(4, 6)), "values must have the shape"),
        (fmt.CompressedTensor(mask, values=torch.ones(4, 5, dtype=torch.int32)), "values must be"),
        (fmt.CompressedTensor(mask, values=torch.randn(4, 5), mode="dense"), "sparse mode only"),
        (fmt.CompressedTensor(mask, torch.zeros(4, 5, dtype=torch.long), torch.randn(2), 1,
                              values=torch.randn(4, 5)), "not both"),
        (fmt.CompressedTensor(mask), "give values, or codebook and labels"),
    ]:
        with pytest.raises(ValueError, match=match):
            fmt.encode_tensor(ct, "w")


def test_byte_identical(tmp_path):
    records = {"fc1.weight": random_record((40, 60), 0.1, 5, 4),
               "conv.weight": random_record((8, 3, 3, 3), 0.3, 8, 8),
               "p.weight": fmt.CompressedTensor(torch.rand(9, 9) < 0.3, values=torch.randn(9, 9))}
    dense = {"fc1.bias": torch.randn(40)}
    fmt.save_records(tmp_path / "a.dcx", records, dense, {"x": 1})
    fmt.save_records(tmp_path / "b.dcx", records, dense, {"x": 1})
    assert (tmp_path / "a.dcx").read_bytes() == (tmp_path / "b.dcx").read_bytes()
    # Saving what was loaded gives the same bytes again.
    loaded, dense, manifest = fmt.load_records(tmp_path / "a.dcx")
    fmt.save_records(tmp_path / "c.dcx", loaded, dense, manifest["extra"])
    assert (tmp_path / "c.dcx").read_bytes() == (tmp_path / "a.dcx").read_bytes()


def test_raw_dtypes(tmp_path):
    dense = {
        "f": torch.randn(3, 4),
        "d": torch.randn(2).double(),
        "h": torch.randn(5).half(),
        "bf": torch.randn(5).bfloat16(),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.tensor([255], dtype=torch.uint8),
        "i16": torch.tensor([-7], dtype=torch.int16),
        "i32": torch.tensor([1 << 30], dtype=torch.int32),
        "i64": torch.tensor(1 << 40),
        "b": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "nc": torch.randn(4, 6).t(),
    }
    fmt.save_records(tmp_path / "r.dcx", {}, dense)
    _, back, _ = fmt.load_records(tmp_path / "r.dcx")
    assert list(back) == list(dense)
    assert all(bitwise_equal(back[k], v.contiguous()) for k, v in dense.items())
    with pytest.raises(ValueError, match="only tensors"):
        fmt.save_records(tmp_path / "x.dcx", {}, {"c": torch.zeros(2, dtype=torch.complex64)})


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.dcx"
    fmt.save_records(path, {}, {"a": torch.ones(3)})
    old = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    for target in ("fsync", "replace"):
        with monkeypatch.context() as m:
            m.setattr(fmt.os, target, fail)
            with pytest.raises(OSError, match="disk full"):
                fmt.save_records(path, {}, {"a": torch.zeros(1000)})
        assert path.read_bytes() == old  # the old file, whole
        assert os.listdir(tmp_path) == ["m.dcx"]  # no temporary left behind
    fmt.save_records(path, {}, {"a": torch.zeros(1000)})
    assert path.read_bytes() != old and dcx.verify(path)["dense"] == 1


# ---------------------------------------------------------------------------- corruption


@pytest.fixture(scope="module")
def good_file():
    return fuzz_format.SEEDS[0]


def must_fail(buf, match=None):
    with pytest.raises(fmt.FormatError, match=match):
        fmt.decode_file(buf)


def test_good_file_loads(good_file):
    records, dense, _ = fmt.decode_file(good_file)
    assert len(records) == 7 and len(dense) == 5
    assert records["pruned.weight"].values is not None


def test_every_section_flipped(good_file):
    manifest, data = fuzz_format.split(good_file)
    start = len(good_file) - len(data) - fmt.DIGEST_SIZE
    labels = fmt._section_labels(manifest["tensors"])
    assert sorted(labels) == list(range(len(manifest["sections"])))
    for i, entry in enumerate(manifest["sections"]):
        for at in {0, entry["size"] // 2, entry["size"] - 1}:
            if entry["size"] == 0:
                continue
            buf = bytearray(good_file)
            buf[start + entry["offset"] + at] ^= 0x10
            must_fail(bytes(buf), rf"section {i} \('{labels[i]}'\).*CRC32 mismatch")


def test_header_manifest_digest_flipped(good_file):
    manifest_end = len(good_file) - len(fuzz_format.split(good_file)[1]) - fmt.DIGEST_SIZE
    for at in (
        list(range(fmt.HEADER.size))
        + list(range(fmt.HEADER.size, manifest_end, 97))
        + list(range(len(good_file) - fmt.DIGEST_SIZE, len(good_file)))
    ):
        for bit in (0x01, 0x80):
            buf = bytearray(good_file)
            buf[at] ^= bit
            must_fail(bytes(buf))


def test_truncated_everywhere(good_file):
    points = sorted(set(range(0, 80)) | set(range(80, len(good_file), 37)) | {len(good_file) - 1})
    for cut in points:
        must_fail(good_file[:cut])
    must_fail(good_file + b"\0")


def test_foreign_files():
    must_fail(b"", "shorter than a header")
    must_fail(b"\x89PNG\r\n\x1a\n" + bytes(100), "not a .dcx file")
    must_fail(b"PK\x03\x04" + bytes(100), "not a .dcx file")
    must_fail(bytes(range(256)) * 4, "not a .dcx file")


def test_versions(good_file):
    manifest, data = fuzz_format.split(good_file)
    must_fail(fmt.seal(manifest, data, version=(2, 0)), r"format 2\.0 is newer .* upgrade dcx")
    must_fail(fmt.seal(manifest, data, version=(0, 9)), "unknown file format version")
    fmt.decode_file(fmt.seal(manifest, data, version=(1, 7)))  # a newer minor version still loads


def crafted(good_file, edit):
    """The good file with its manifest edited and every checksum recomputed, so only the
    structural checks stand between the edit and the decoder."""
    manifest, data = fuzz_format.split(good_file)
    edit(manifest, data)
    return fuzz_format.reseal(manifest, data)


def tensor(manifest, name):
    return next(t for t in manifest["tensors"] if t["name"] == name)


@pytest.mark.parametrize(
    "edit, match",
    [
        (
            lambda m, d: m["sections"][-1].update(size=m["sections"][-1]["size"] + 10),
            "run past the end",
        ),
        (
            lambda m, d: m["sections"][3].update(size=m["sections"][3]["size"] + 10**9),
            "'size' must be an integer in",
        ),
        (
            lambda m, d: m["sections"][3].update(offset=m["sections"][3]["offset"] + 1),
            "back to back",
        ),
        (
            lambda m, d: m["sections"][-1].update(size=m["sections"][-1]["size"] - 1),
            "sections cover",
        ),
        (lambda m, d: m["sections"].append(m["sections"][0]), "starts at data offset"),
        (lambda m, d: m["sections"][2].update(size=-1), "'size' must be an integer"),
        (lambda m, d: m["sections"][2].update(size=2**70), "'size' must be an integer"),
        (lambda m, d: m["sections"][2].update(size="12"), "'size' must be an integer"),
        (lambda m, d: m.update(tensors={}), "'tensors' must be a list"),
        (lambda m, d: m.update(format="zip"), "not a dcx manifest"),
        (lambda m, d: tensor(m, "fc.weight").update(shape=[2**40, 2**20]), "pointer section"),
        (lambda m, d: tensor(m, "fc.weight").update(shape=[12, 4000]), "cannot cover"),
        (lambda m, d: tensor(m, "fc.weight").update(shape=[2**62]), "'shape' must be a list"),
        (lambda m, d: tensor(m, "fc.weight").update(shape=[2**31] * 3), "too many elements"),
        (lambda m, d: tensor(m, "fc.weight").update(shape=[12, 41]), "covers|cannot cover|pointer"),
        (lambda m, d: tensor(m, "dense.weight").update(shape=[10**6, 10**6]), "cannot fit"),
        (lambda m, d: tensor(m, "fc.weight").update(shape=[-1, 40]), "'shape' must be a list"),
        (lambda m, d: tensor(m, "fc.weight").update(nnz=3), "kept weights"),
        (lambda m, d: tensor(m, "fc.weight").update(segment_rows=1), "pointer section"),
        (lambda m, d: tensor(m, "fc.weight").update(segment_rows=0), "'segment_rows' must be"),
        (lambda m, d: tensor(m, "fc.weight").update(bits=2), "codebook section"),
        (lambda m, d: tensor(m, "fc.weight").update(index_bits=5), "index code lengths"),
        (lambda m, d: tensor(m, "fc.weight").update(index_bits=99), "'index_bits' must be"),
        (lambda m, d: tensor(m, "fc.weight").update(dtype="float64"), "label code lengths hold"),
        (lambda m, d: tensor(m, "fc.weight").update(dtype="object"), "dtype must be one of"),
        (lambda m, d: tensor(m, "fc.weight").update(mode="dense"), "need sections"),
        (lambda m, d: tensor(m, "fc.weight").update(payload="both"), "payload must be"),
        (lambda m, d: tensor(m, "pruned.weight").update(mode="dense"), "values need mode"),
        (lambda m, d: tensor(m, "pruned.weight").update(nnz=0), "kept weights"),
        (lambda m, d: tensor(m, "pruned.weight").update(dtype="float16"), "values section of"),
        (lambda m, d: tensor(m, "pruned.weight").update(payload="codes"), "need sections"),
        (lambda m, d: tensor(m, "fc.weight").update(mode="csr"), "need mode"),
        (lambda m, d: tensor(m, "fc.weight").update(kind="pickle"), "kind must be"),
        (lambda m, d: tensor(m, "fc.weight")["sections"].update(labels=0), "already used"),
        (lambda m, d: tensor(m, "fc.weight")["sections"].update(labels=999), "section numbers"),
        (lambda m, d: tensor(m, "fc.bias").update(shape=[13]), "needs"),
        (lambda m, d: tensor(m, "fc.bias").update(dtype="int64"), "needs"),
        (lambda m, d: m["tensors"].pop(), "belong to no tensor"),
        (lambda m, d: m["tensors"].append(dict(m["tensors"][0])), "appears twice"),
        (lambda m, d: m["tensors"].append(5), "must be an object"),
    ],
)
def test_crafted_manifests(good_file, edit, match):
    must_fail(crafted(good_file, edit), match)


def test_crafted_but_harmless(good_file):
    """Edits that keep the meaning load: segment_rows past the row count is one segment; a newer
    minor version and unknown extra keys are accepted."""
    edits = [
        lambda m, d: tensor(m, "fc.weight").update(segment_rows=2**62),
        lambda m, d: m.update(future_key=[1, 2]),
        lambda m, d: m["extra"].update(anything={"a": None}),
    ]
    for edit in edits:
        records, _, _ = fmt.decode_file(crafted(good_file, edit))
        assert records["fc.weight"].mask.shape == (12, 40)


def test_crafted_streams(good_file):
    """Bytes of a Huffman stream changed with checksums recomputed: the decoder itself refuses."""
    manifest, data = fuzz_format.split(good_file)
    hits, labels = 0, fmt._section_labels(manifest["tensors"])
    for i, entry in enumerate(manifest["sections"]):
        if labels[i].endswith(("/labels", "/index")) and entry["size"] > 2:
            for at, value in ((0, 0xFF), (entry["size"] - 1, 0xFF), (entry["size"] // 2, 0x00)):
                buf = bytearray(data)
                if buf[entry["offset"] + at] == value:
                    continue
                buf[entry["offset"] + at] = value
                try:
                    fmt.decode_file(
                        fuzz_format.reseal(json.loads(json.dumps(manifest)), bytes(buf))
                    )
                except fmt.FormatError:
                    hits += 1
    assert hits > 5  # most such edits break a stream (some merely change a label)


def test_random_mutations_through_the_harness():
    """The fuzz harness's own check on random inputs of every mode (atheris runs it in CI)."""
    rnd = random.Random(0)
    seed = fuzz_format.SEEDS[0]
    for _ in range(400):
        mode = rnd.randrange(3)
        body = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 40)))
        if mode == 0 and rnd.random() < 0.5:
            cut = rnd.randrange(len(seed))
            body = seed[:cut] + body + seed[cut + len(body) :]
        fuzz_format.check_one_input(bytes([mode, rnd.randrange(2)]) + body)


def test_manifest_bomb_is_refused():
    """A deflated manifest that would inflate past the limit is an error, not a huge allocation."""
    import hashlib

    text = zlib.compress(b" " * (fmt.MAX_MANIFEST_EXPANSION + 1), 9)
    body = fmt.HEADER.pack(fmt.MAGIC, 1, 1, fmt.FLAG_MANIFEST_ZLIB, len(text), zlib.crc32(text)) + text
    must_fail(body + hashlib.sha256(body).digest(), "inflates past")
