"""The .dcx file: a pruned, weight-shared model as a small file that loads back bit for bit.

Layout (all integers little-endian):

    header    32 bytes: magic b"\\x89DCX\\r\\n\\x1a\\n", major u16, minor u16, flags u32 (bit 0: the
              manifest is zlib-deflated, as dcx writes it),
              manifest length u64, manifest CRC32 u32, 4 zero bytes
    manifest  UTF-8 JSON: format version, the compression config, one entry per tensor (name,
              shape, dtype, bits, mode, section numbers) and the section table (offset from the
              start of the data area, size, CRC32)
    data      the sections, back to back in table order: codebooks, Huffman code lengths,
              bitstreams, segment pointers, and raw parameters
    digest    32 bytes: SHA-256 of everything before it

A compressed tensor (a `CompressedTensor`: mask, cluster labels, codebook) is stored in one of two
modes, whichever is smaller:

  sparse  positions of the kept weights as relative indices (the gap to the previous kept weight,
          in `index_bits` bits, Han et al. section 2), Huffman coded, plus the Huffman-coded labels
          of the kept weights only.
  dense   one Huffman-coded symbol per position: the label, or k (one past the codebook) for a
          pruned position; no positions. A quantized but unpruned layer stores its codes alone.

Relative indices: with M = 2^index_bits - 1, an entry v in 1..M is a kept weight v positions after
the previous one; v = 0 is a filler that skips M positions and holds no weight (the paper's filler
zero, without a weight slot: no zero is needed in the codebook). A gap g > M becomes
(g - 1) // M fillers and then g - fillers * M. The positions are cut into segments (blocks of rows
of the weight viewed as [shape[0], -1]); gaps restart at each segment and the pointer section
holds each segment's entry count, so segments decode independently. Each segment ends with
fillers until fewer than M positions remain uncovered: the decoder checks this, which bounds a
layer's size by its bytes (a crafted header cannot make the loader allocate more than about
8 * M elements per byte of index stream).

Loading never executes code (JSON and raw bytes only, no pickle) and checks every count, size
and offset against the file before allocating or reading; anything wrong raises FormatError
saying what and where. Saving is atomic: a temporary file in the target's folder, flushed,
fsynced, then renamed over the target.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dcx import ops

__all__ = [
    "FormatError",
    "CompressedTensor",
    "encode_tensor",
    "decode_tensor",
    "save_records",
    "load_records",
    "verify",
    "save",
    "load",
    "encode_positions",
    "decode_positions",
    "encode_file",
    "decode_file",
    "seal",
]

MAGIC = b"\x89DCX\r\n\x1a\n"
VERSION = (1, 1)  # 1.1: the manifest may be zlib-deflated (header flag bit 0)
FLAG_MANIFEST_ZLIB = 1
MAX_MANIFEST_EXPANSION = 1 << 26  # bytes a deflated manifest may inflate to (64 MiB)
HEADER = struct.Struct("<8sHHIQI4x")
DIGEST_SIZE = 32
MAX_CODE_LENGTH = 24
SEGMENT_POSITIONS = 1 << 16  # default segment: whole rows covering at least this many positions
MAX_DIMS = 16

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")


class FormatError(ValueError):
    """A .dcx file that is corrupt, truncated, foreign or from a newer major version."""


@dataclass
class CompressedTensor:
    """One pruned, weight-shared tensor: weight = codebook[labels] where mask, exactly 0 elsewhere.

    mask: bool, the weight's shape; labels: integer, the weight's shape (values at pruned positions
    are ignored); codebook: 1-D float [k], k <= 2^bits; index_bits: bits of a relative index (the
    paper uses 4 for fully connected layers, 5 for VGG, 8 for conv). segment_rows: rows per
    segment of positions (None: enough rows for SEGMENT_POSITIONS). mode: "sparse", "dense" or
    None (whichever is smaller).
    """

    mask: Tensor
    labels: Tensor
    codebook: Tensor
    bits: int
    index_bits: int = 4
    segment_rows: int | None = None
    mode: str | None = None

    @property
    def shape(self):
        return tuple(self.mask.shape)

    def to_dense(self) -> Tensor:
        """codebook[labels] at kept positions, exactly zero elsewhere, in the codebook's dtype."""
        values = self.codebook[self.labels.long().clamp(0, self.codebook.numel() - 1)]
        return torch.where(self.mask, values, torch.zeros((), dtype=self.codebook.dtype))


# --------------------------------------------------------------------------- relative indices


def _segments(numel: int, seg_size: int):
    """Start and end position of each segment."""
    nseg = -(-numel // seg_size) if numel else 0
    start = np.arange(nseg, dtype=np.int64) * seg_size
    return start, np.minimum(start + seg_size, numel)


def encode_positions(positions: np.ndarray, numel: int, seg_size: int, index_bits: int):
    """Relative-index stream of sorted flat `positions` in [0, numel): (entries, per-segment entry
    counts). Entries are uint8 (index_bits <= 8) or uint16; see the module docstring."""
    m = (1 << index_bits) - 1
    seg_size = max(seg_size, 1)
    start, end = _segments(numel, seg_size)
    nseg = len(start)
    positions = np.asarray(positions, dtype=np.int64)
    seg_of = positions // seg_size
    counts = np.bincount(seg_of, minlength=nseg)
    # Each segment's kept positions followed by a sentinel at its end; the sentinel's gap gives
    # the trailing fillers.
    kept_at = np.arange(len(positions)) + seg_of
    sentinel_at = np.cumsum(counts) + np.arange(nseg)
    item_pos = np.empty(len(positions) + nseg, dtype=np.int64)
    kept = np.zeros(len(item_pos), dtype=bool)
    item_pos[kept_at] = positions
    kept[kept_at] = True
    item_pos[sentinel_at] = end
    prev = np.empty_like(item_pos)
    prev[1:] = item_pos[:-1]
    first = np.concatenate([[0], sentinel_at[:-1] + 1]).astype(np.int64) if nseg else sentinel_at
    prev[first] = start - 1
    gap = item_pos - prev
    fill = (gap - 1) // m
    ends = np.cumsum(fill + kept)
    entries = np.zeros(
        int(ends[-1]) if len(ends) else 0, dtype=np.uint8 if index_bits <= 8 else np.uint16
    )
    entries[ends[kept] - 1] = gap[kept] - fill[kept] * m
    seg_ends = ends[sentinel_at] if nseg else np.zeros(0, dtype=np.int64)
    seg_entries = np.diff(np.concatenate([[0], seg_ends])).astype(np.int64)
    return entries, seg_entries


def decode_positions(
    entries: np.ndarray, seg_entries: np.ndarray, numel: int, seg_size: int, index_bits: int
) -> np.ndarray:
    """Flat positions of the kept weights from a relative-index stream; FormatError when the
    stream does not cover each segment as the encoder writes it."""
    m = (1 << index_bits) - 1
    start, end = _segments(numel, seg_size)
    seg_entries = np.asarray(seg_entries, dtype=np.int64)
    if len(seg_entries) != len(start):
        raise FormatError(f"{len(seg_entries)} segment pointers for {len(start)} segments")
    if int(seg_entries.sum()) != len(entries):
        raise FormatError(
            f"segment pointers count {int(seg_entries.sum())} entries, the stream "
            f"holds {len(entries)}"
        )
    v = np.asarray(entries, dtype=np.int64)
    advance = np.where(v == 0, m, v)
    cum = np.concatenate([[0], np.cumsum(advance)])
    seg_stop = np.cumsum(seg_entries)
    before = cum[seg_stop - seg_entries]
    covered = cum[seg_stop] - before
    seg_len = end - start
    bad = np.flatnonzero((covered > seg_len) | (seg_len - covered >= m))
    if len(bad):
        s = int(bad[0])
        raise FormatError(
            f"segment {s} covers {int(covered[s])} of its {int(seg_len[s])} "
            f"positions (must be within {m - 1} of the end, not past it)"
        )
    pos = cum[1:] - 1 + np.repeat(start - before, seg_entries)
    return pos[v != 0]


# ------------------------------------------------------------------------ one tensor <-> bytes


def _raw_bytes(t: Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _huffman(symbols: Tensor, alphabet: int):
    """(code lengths bytes, bitstream bytes) of integer symbols in [0, alphabet)."""
    freqs = torch.bincount(symbols.reshape(-1), minlength=alphabet)
    lengths = ops.huffman_code_lengths(freqs, MAX_CODE_LENGTH)
    return _raw_bytes(lengths), _raw_bytes(ops.huffman_encode(symbols, lengths))


def _check_record(name: str, ct: CompressedTensor):
    def fail(msg):
        raise ValueError(f"{name}: {msg}")

    if ct.mask.dtype != torch.bool:
        fail(f"mask must be bool, got {ct.mask.dtype}")
    if ct.labels.shape != ct.mask.shape:
        fail(
            f"labels must have the shape of mask {tuple(ct.mask.shape)}, "
            f"got {tuple(ct.labels.shape)}"
        )
    if ct.labels.dtype.is_floating_point or ct.labels.dtype in (torch.bool, torch.complex64):
        fail(f"labels must be an integer tensor, got {ct.labels.dtype}")
    if ct.codebook.dim() != 1 or ct.codebook.numel() < 1:
        fail(f"codebook must be 1-D and non-empty, got shape {tuple(ct.codebook.shape)}")
    if DTYPE_NAMES.get(ct.codebook.dtype) not in FLOAT_DTYPES:
        fail(f"codebook must be float32, float64, float16 or bfloat16, got {ct.codebook.dtype}")
    if not (isinstance(ct.bits, int) and 1 <= ct.bits <= 16):
        fail(f"bits must be an int in [1, 16], got {ct.bits!r}")
    if ct.codebook.numel() > 1 << ct.bits:
        fail(f"codebook has {ct.codebook.numel()} entries, more than 2^bits = {1 << ct.bits}")
    if not (isinstance(ct.index_bits, int) and 1 <= ct.index_bits <= 16):
        fail(f"index_bits must be an int in [1, 16], got {ct.index_bits!r}")
    if ct.segment_rows is not None and not (
        isinstance(ct.segment_rows, int) and ct.segment_rows >= 1
    ):
        fail(f"segment_rows must be None or an int >= 1, got {ct.segment_rows!r}")
    if ct.mode not in (None, "sparse", "dense"):
        fail(f"mode must be None, 'sparse' or 'dense', got {ct.mode!r}")
    if ct.mask.dim() > MAX_DIMS:
        fail(f"at most {MAX_DIMS} dimensions, got {ct.mask.dim()}")
    kept = ct.labels[ct.mask]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= ct.codebook.numel()):
        fail(f"labels must lie in [0, {ct.codebook.numel()}) where mask is set")


def _geometry(shape, segment_rows: int | None):
    """(rows, cols, segment_rows) of a weight viewed as [shape[0], -1]."""
    numel = math.prod(shape)
    rows = shape[0] if len(shape) else 1
    cols = numel // rows if rows else 0
    if segment_rows is None:
        segment_rows = max(1, -(-SEGMENT_POSITIONS // cols)) if cols else 1
    return rows, cols, min(segment_rows, max(rows, 1))  # more rows than the weight has: one


def encode_tensor(ct: CompressedTensor, name: str = "tensor"):
    """(manifest entry, [(section kind, bytes)]) of one compressed tensor, in sparse or dense
    mode (ct.mode, or the smaller)."""
    _check_record(name, ct)
    shape = tuple(ct.mask.shape)
    numel = ct.mask.numel()
    k = ct.codebook.numel()
    rows, cols, segment_rows = _geometry(shape, ct.segment_rows)
    mask = ct.mask.detach().cpu().reshape(-1)
    labels = ct.labels.detach().cpu().reshape(-1).long()
    meta = {
        "kind": "compressed",
        "shape": list(shape),
        "dtype": DTYPE_NAMES[ct.codebook.dtype],
        "bits": ct.bits,
        "index_bits": ct.index_bits,
        "nnz": int(mask.sum()),
    }
    codebook = _raw_bytes(ct.codebook.detach().cpu())

    candidates = {}
    if ct.mode in (None, "sparse"):
        positions = torch.nonzero(mask).reshape(-1).numpy()
        entries, seg_entries = encode_positions(
            positions, numel, segment_rows * cols, ct.index_bits
        )
        label_lengths, label_stream = _huffman(labels[mask], k)
        index_lengths, index_stream = _huffman(
            torch.from_numpy(entries.astype(np.int64)), 1 << ct.index_bits
        )
        candidates["sparse"] = (
            {"mode": "sparse", "segment_rows": segment_rows, "entries": len(entries)},
            [
                ("codebook", codebook),
                ("label_lengths", label_lengths),
                ("labels", label_stream),
                ("index_lengths", index_lengths),
                ("index", index_stream),
                ("pointers", seg_entries.astype("<u4").tobytes()),
            ],
        )
    if ct.mode in (None, "dense"):
        symbols = torch.where(mask, labels, torch.full_like(labels, k))  # k marks a pruned position
        label_lengths, label_stream = _huffman(symbols, k + 1)
        candidates["dense"] = (
            {"mode": "dense"},
            [("codebook", codebook), ("label_lengths", label_lengths), ("labels", label_stream)],
        )
    mode = min(candidates, key=lambda m: (sum(len(b) for _, b in candidates[m][1]), m))
    extra, sections = candidates[mode]
    meta.update(extra)
    return meta, sections


def _need_int(meta, key, lo, hi, where):
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise FormatError(f"{where}: '{key}' must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _shape_of(meta, where):
    shape = meta.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape)
    ):
        raise FormatError(
            f"{where}: 'shape' must be a list of at most {MAX_DIMS} sizes, got {shape!r}"
        )
    if math.prod(shape) >= 2**62:
        raise FormatError(f"{where}: shape {shape} has too many elements")
    return shape


def _dtype_of(meta, where, allowed=tuple(DTYPES)):
    name = meta.get("dtype")
    if name not in allowed:
        raise FormatError(f"{where}: dtype must be one of {', '.join(allowed)}, got {name!r}")
    return DTYPES[name]


def _decode_stream(data: bytes, lengths: bytes, count: int, where: str) -> Tensor:
    """Huffman-decoded symbols as int64; FormatError on a corrupt stream (checked before
    allocating: count <= 8 * len(data))."""
    if count > 8 * len(data):
        raise FormatError(f"{where}: {count} symbols cannot fit in {len(data)} byte(s)")
    try:
        out = ops.huffman_decode(_as_tensor(data), _as_tensor(lengths), count)
    except RuntimeError as error:
        raise FormatError(f"{where}: {error}") from None
    return out.long()


def _as_tensor(data: bytes) -> Tensor:
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )


def decode_tensor(meta: dict, sections: dict, name: str = "tensor") -> CompressedTensor:
    """The CompressedTensor of a manifest entry and its sections {kind: bytes}; FormatError when
    anything disagrees. Sizes are checked against the bytes before anything is allocated."""
    where = f"tensor {name!r}"
    shape = _shape_of(meta, where)
    dtype = _dtype_of(meta, where, FLOAT_DTYPES)
    bits = _need_int(meta, "bits", 1, 16, where)
    index_bits = _need_int(meta, "index_bits", 1, 16, where)
    mode = meta.get("mode")
    if mode not in ("sparse", "dense"):
        raise FormatError(f"{where}: mode must be 'sparse' or 'dense', got {mode!r}")
    wanted = ["codebook", "label_lengths", "labels"]
    if mode == "sparse":
        wanted += ["index_lengths", "index", "pointers"]
    if sorted(sections) != sorted(wanted):
        raise FormatError(f"{where}: {mode} mode needs sections {wanted}, got {sorted(sections)}")
    numel = math.prod(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    cb = sections["codebook"]
    k = len(cb) // itemsize
    if len(cb) % itemsize or not 1 <= k <= 1 << bits:
        raise FormatError(
            f"{where}: codebook section of {len(cb)} bytes is not 1 to 2^{bits} "
            f"{meta['dtype']} values"
        )
    codebook = torch.frombuffer(bytearray(cb), dtype=torch.uint8).view(dtype).clone()
    alphabet = k + (1 if mode == "dense" else 0)
    if len(sections["label_lengths"]) != alphabet:
        raise FormatError(
            f"{where}: label code lengths hold {len(sections['label_lengths'])} "
            f"entries, expected {alphabet}"
        )

    if mode == "dense":
        symbols = _decode_stream(
            sections["labels"], sections["label_lengths"], numel, f"{where} labels"
        )
        mask = symbols != k
        labels = torch.where(mask, symbols, torch.zeros((), dtype=torch.long))
    else:
        rows, cols, segment_rows = _geometry(
            shape, _need_int(meta, "segment_rows", 1, 2**62, where)
        )
        m = (1 << index_bits) - 1
        if len(sections["index_lengths"]) != 1 << index_bits:
            raise FormatError(
                f"{where}: index code lengths hold {len(sections['index_lengths'])} "
                f"entries, expected {1 << index_bits}"
            )
        seg_size = segment_rows * cols
        nseg = -(-numel // seg_size) if numel else 0
        if len(sections["pointers"]) != 4 * nseg:
            raise FormatError(
                f"{where}: pointer section has {len(sections['pointers'])} bytes, "
                f"{nseg} segments need {4 * nseg}"
            )
        seg_entries = np.frombuffer(sections["pointers"], dtype="<u4").astype(np.int64)
        entries = int(seg_entries.sum())
        # Every segment is covered to within M positions by entries of <= M positions each.
        if numel > (entries + nseg) * m:
            raise FormatError(f"{where}: {entries} relative indices cannot cover {numel} positions")
        stream = _decode_stream(
            sections["index"], sections["index_lengths"], entries, f"{where} index"
        )
        positions = decode_positions(stream.numpy(), seg_entries, numel, seg_size, index_bits)
        nnz = len(positions)
        kept = _decode_stream(sections["labels"], sections["label_lengths"], nnz, f"{where} labels")
        mask = torch.zeros(numel, dtype=torch.bool)
        labels = torch.zeros(numel, dtype=torch.long)
        index = torch.from_numpy(positions)
        mask[index] = True
        labels[index] = kept
    nnz = meta.get("nnz")
    if nnz != int(mask.sum()):
        raise FormatError(
            f"{where}: manifest says {nnz!r} kept weights, the streams hold {int(mask.sum())}"
        )
    return CompressedTensor(
        mask.reshape(shape),
        labels.reshape(shape),
        codebook,
        bits,
        index_bits,
        meta.get("segment_rows"),
        mode,
    )


# ------------------------------------------------------------------------------ the file


def encode_file(records: dict, dense: dict, manifest_extra: dict | None = None) -> bytes:
    """The bytes of a .dcx file: {name: CompressedTensor} compressed, {name: Tensor} raw, and
    `manifest_extra` (JSON-serialisable: the compression config) in the manifest. The same inputs
    give the same bytes."""
    if sys.byteorder != "little":
        raise RuntimeError("dcx files are little-endian; this host is big-endian")
    overlap = set(records) & set(dense)
    if overlap:
        raise ValueError(f"names both compressed and dense: {sorted(overlap)}")
    tensors, blobs, table = [], [], []

    def add_section(data):
        table.append(
            {"offset": sum(len(b) for b in blobs), "size": len(data), "crc32": zlib.crc32(data)}
        )
        blobs.append(data)
        return len(table) - 1

    for name, ct in records.items():
        meta, sections = encode_tensor(ct, name)
        meta["sections"] = {kind: add_section(data) for kind, data in sections}
        tensors.append({"name": name, **meta})
    for name, t in dense.items():
        if not isinstance(t, Tensor) or t.dtype not in DTYPE_NAMES:
            raise ValueError(
                f"{name}: only tensors of dtype {', '.join(DTYPES)} can be stored, "
                f"got {type(t).__name__ if not isinstance(t, Tensor) else t.dtype}"
            )
        tensors.append(
            {
                "name": name,
                "kind": "raw",
                "shape": list(t.shape),
                "dtype": DTYPE_NAMES[t.dtype],
                "sections": {"data": add_section(_raw_bytes(t.cpu()))},
            }
        )
    manifest = {
        "format": "dcx",
        "version": f"{VERSION[0]}.{VERSION[1]}",
        "extra": manifest_extra or {},
        "tensors": tensors,
        "sections": table,
    }
    return seal(manifest, b"".join(blobs))


def seal(manifest: dict, data: bytes, version=VERSION) -> bytes:
    """Header + manifest + data + digest, checksums computed here (the manifest's section table
    must already describe `data`)."""
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    # The manifest (config, section table) is repetitive JSON: stored deflated it is about a
    # quarter of its size, which matters for small models. Level 9 is deterministic.
    text = zlib.compress(text, 9)
    flags = FLAG_MANIFEST_ZLIB
    body = HEADER.pack(MAGIC, version[0], version[1], flags, len(text), zlib.crc32(text)) + text + data
    return body + hashlib.sha256(body).digest()


def save_records(path, records: dict, dense: dict, manifest_extra: dict | None = None):
    """Write a .dcx file atomically (see encode_file)."""
    _write_atomic(path, encode_file(records, dense, manifest_extra))


def _write_atomic(path, data: bytes):
    """Temporary file in the target's folder, fsync, rename: a crash leaves the old file or the
    new one at `path`, never a torn one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # persist the rename itself (best effort: not every platform can open a folder)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _section_labels(tensors) -> dict:
    """{section number: "tensor/kind"} from the well-formed tensor entries, for messages."""
    labels = {}
    for meta in tensors:
        if isinstance(meta, dict) and isinstance(meta.get("sections"), dict):
            for kind, i in meta["sections"].items():
                if isinstance(i, int):
                    labels.setdefault(i, f"{meta.get('name')}/{kind}")
    return labels


def parse(buf: bytes):
    """Check a whole file in memory; returns (manifest, {section number: bytes}). Raises
    FormatError naming what is wrong and where."""
    n = len(buf)
    if n < HEADER.size + DIGEST_SIZE:
        raise FormatError(
            f"file is {n} bytes, shorter than a header and digest "
            f"({HEADER.size + DIGEST_SIZE} bytes): truncated or not a .dcx file"
        )
    magic, major, minor, flags, manifest_len, manifest_crc = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FormatError(f"not a .dcx file: bytes 0..8 are {magic!r}, expected {MAGIC!r}")
    if major > VERSION[0]:
        raise FormatError(
            f"file format {major}.{minor} is newer than this dcx reads "
            f"({VERSION[0]}.x); upgrade dcx to load it"
        )
    if major < 1:
        raise FormatError(f"unknown file format version {major}.{minor}")
    if flags & ~FLAG_MANIFEST_ZLIB or buf[HEADER.size - 4 : HEADER.size] != b"\0\0\0\0":
        raise FormatError(
            "header flags (bytes 16..20) may only have bit 0 set, and bytes 28..32 are "
            "reserved and must be zero"
        )
    data_start = HEADER.size + manifest_len
    data_end = n - DIGEST_SIZE
    if data_start > data_end:
        raise FormatError(
            f"header says the manifest is {manifest_len} bytes, but the file has "
            f"only {data_end - HEADER.size} bytes between header and digest"
        )
    text = buf[HEADER.size : data_start]
    if zlib.crc32(text) != manifest_crc:
        raise FormatError(f"manifest (bytes {HEADER.size}..{data_start}): CRC32 mismatch")
    if flags & FLAG_MANIFEST_ZLIB:
        inflate = zlib.decompressobj()
        try:
            text = inflate.decompress(text, MAX_MANIFEST_EXPANSION)
        except zlib.error as error:
            raise FormatError(f"manifest (bytes {HEADER.size}..{data_start}) does not inflate: "
                              f"{error}") from None
        if inflate.unconsumed_tail or not inflate.eof:
            raise FormatError(f"manifest (bytes {HEADER.size}..{data_start}) is truncated or "
                              f"inflates past {MAX_MANIFEST_EXPANSION} bytes")
    try:
        manifest = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise FormatError(
            f"manifest (bytes {HEADER.size}..{data_start}) is not valid JSON: {error}"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != "dcx":
        raise FormatError('manifest is not a dcx manifest (no "format": "dcx")')
    for key, kind in (("tensors", list), ("sections", list), ("extra", dict)):
        if not isinstance(manifest.get(key), kind):
            raise FormatError(f"manifest: '{key}' must be a {kind.__name__}")

    sections, offset, labels = {}, 0, _section_labels(manifest["tensors"])
    for i, entry in enumerate(manifest["sections"]):
        where = f"section {i}" + (f" ({labels[i]!r})" if i in labels else "")
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: entry must be an object")
        size = _need_int(entry, "size", 0, data_end - data_start, where)
        start = _need_int(entry, "offset", 0, data_end - data_start, where)
        crc = _need_int(entry, "crc32", 0, 2**32 - 1, where)
        if start != offset:
            raise FormatError(
                f"{where}: starts at data offset {start}, expected {offset} "
                f"(sections are stored back to back)"
            )
        if start + size > data_end - data_start:
            raise FormatError(
                f"{where}: {size} bytes at data offset {start} run past the end of "
                f"the data area ({data_end - data_start} bytes)"
            )
        chunk = buf[data_start + start : data_start + start + size]
        if zlib.crc32(chunk) != crc:
            raise FormatError(
                f"{where}, file bytes {data_start + start}..{data_start + start + size}: "
                "CRC32 mismatch"
            )
        sections[i] = chunk
        offset = start + size
    if offset != data_end - data_start:
        raise FormatError(
            f"data area is {data_end - data_start} bytes but the sections cover {offset}"
        )
    if hashlib.sha256(buf[:data_end]).digest() != buf[data_end:]:
        raise FormatError(
            f"file digest (SHA-256, last {DIGEST_SIZE} bytes) mismatch: the file is "
            "damaged or truncated"
        )
    return manifest, sections


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def decode_file(buf: bytes):
    """(records, dense, manifest) of a whole file in memory."""
    manifest, sections = parse(buf)
    records, dense, used = {}, {}, set()
    for i, meta in enumerate(manifest["tensors"]):
        if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
            raise FormatError(f"tensor entry {i} must be an object with a string 'name'")
        name = meta["name"]
        where = f"tensor {name!r}"
        if name in records or name in dense:
            raise FormatError(f"{where} appears twice")
        refs = meta.get("sections")
        if not isinstance(refs, dict) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r in sections for r in refs.values()
        ):
            raise FormatError(f"{where}: 'sections' must map kinds to section numbers of this file")
        if used & set(refs.values()) or len(set(refs.values())) != len(refs):
            raise FormatError(f"{where}: refers to a section already used")
        used |= set(refs.values())
        data = {kind: sections[r] for kind, r in refs.items()}
        if meta.get("kind") == "compressed":
            records[name] = decode_tensor(meta, data, name)
        elif meta.get("kind") == "raw":
            shape = _shape_of(meta, where)
            dtype = _dtype_of(meta, where)
            if list(data) != ["data"]:
                raise FormatError(f"{where}: a raw tensor has one section 'data', got {list(data)}")
            itemsize = torch.empty(0, dtype=dtype).element_size()
            if len(data["data"]) != math.prod(shape) * itemsize:
                raise FormatError(
                    f"{where}: {len(data['data'])} bytes, shape {shape} of "
                    f"{meta['dtype']} needs {math.prod(shape) * itemsize}"
                )
            raw = (
                torch.frombuffer(bytearray(data["data"]), dtype=torch.uint8)
                if data["data"]
                else torch.empty(0, dtype=torch.uint8)
            )
            dense[name] = raw.view(dtype).reshape(shape).clone()
        else:
            raise FormatError(
                f"{where}: kind must be 'compressed' or 'raw', got {meta.get('kind')!r}"
            )
    if used != set(sections):
        raise FormatError(f"sections {sorted(set(sections) - used)} belong to no tensor")
    return records, dense, manifest


def load_records(path):
    """(records {name: CompressedTensor}, dense {name: Tensor}, manifest) of a .dcx file, every
    check passed; FormatError otherwise."""
    return decode_file(_read(path))


def verify(path) -> dict:
    """Check a .dcx file completely (header, checksums, digest, every stream decoded); returns a
    summary, raises FormatError."""
    buf = _read(path)
    records, dense, manifest = decode_file(buf)
    return {
        "path": os.fspath(path),
        "bytes": len(buf),
        "version": manifest.get("version"),
        "compressed": len(records),
        "dense": len(dense),
        "sha256": buf[-DIGEST_SIZE:].hex(),
    }


# ------------------------------------------------------------------- models <-> the file
# The two adapters below are the only places that know how the other stages keep their state.


def compressed_tensors(model: torch.nn.Module, compressed: dict | None = None) -> dict:
    """ADAPTER, stages -> file: {state_dict name of a weight: CompressedTensor}.

    Today: the `compressed` mapping the caller passes; a record whose mask is None takes the
    pruning stage's `<param>_mask` buffer of the module (all True when there is none).
    Integration: when `compressed` is None, build the records here from what the weight-sharing
    stage keeps on each module (codebook [k] float, labels int of the weight's shape, mask bool).
    """
    result = {}
    for name, ct in (compressed or {}).items():
        if ct.mask is None:
            module_name, _, param = name.rpartition(".")
            module = model.get_submodule(module_name)
            mask = getattr(module, f"{param}_mask", None)
            shape = getattr(module, param).shape
            mask = mask.bool() if mask is not None else torch.ones(shape, dtype=torch.bool)
            ct = CompressedTensor(
                mask, ct.labels, ct.codebook, ct.bits, ct.index_bits, ct.segment_rows, ct.mode
            )
        result[name] = ct
    return result


def restore_compressed(model: torch.nn.Module, name: str, ct: CompressedTensor):
    """ADAPTER, file -> model: put one decoded tensor back into `model`.

    The weight of an nn.Linear / nn.Conv2d becomes a dcx.SparseQuantLinear / SparseQuantConv2d
    packed straight from (mask, labels, codebook), its bias kept; any other tensor is written
    dense (codebook[labels] * mask) into the model, with its `<param>_mask` buffer if it has one.
    """
    from dcx.nn import SparseQuantConv2d, SparseQuantLinear

    module_name, _, param = name.rpartition(".")
    module = model.get_submodule(module_name)
    replacement = None
    if param == "weight" and type(module) is torch.nn.Linear:
        replacement = SparseQuantLinear.from_compressed(
            ct.mask, ct.labels, ct.codebook, bias=module.bias, bits=ct.bits
        )
    elif param == "weight" and type(module) is torch.nn.Conv2d and module.groups == 1 \
            and module.padding_mode == "zeros":
        replacement = SparseQuantConv2d.from_compressed_like(
            module, ct.mask, ct.labels, ct.codebook, bits=ct.bits
        )
    if replacement is not None:
        device = module.weight.device
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, replacement.to(device))
        return
    getattr(module, param).data.copy_(ct.to_dense())
    mask = getattr(module, f"{param}_mask", None)
    if mask is not None:
        mask.copy_(ct.mask)


def save(model: torch.nn.Module, path, compressed: dict | None = None, config=None):
    """Save `model` as a .dcx file: the weights in `compressed` ({state_dict name:
    CompressedTensor}, see compressed_tensors) Huffman coded, every other state_dict entry raw.
    `config`: the compression config (a dict, or an object with to_dict()), kept in the manifest."""
    records = compressed_tensors(model, compressed)
    state = model.state_dict()
    for name, ct in records.items():
        if name not in state:
            raise ValueError(f"{name!r} is not in the model's state_dict")
        if tuple(state[name].shape) != ct.shape:
            raise ValueError(
                f"{name}: the model's shape {tuple(state[name].shape)} differs from "
                f"the record's {ct.shape}"
            )
    skip = set(records) | {f"{name}_mask" for name in records}
    dense = {name: t for name, t in state.items() if name not in skip}
    if config is not None and hasattr(config, "to_dict"):
        config = config.to_dict()
    save_records(path, records, dense, {"config": config} if config is not None else {})


def load(path, model: torch.nn.Module) -> torch.nn.Module:
    """Fill `model` (freshly built, same architecture) from a .dcx file and return it: compressed
    nn.Linear / nn.Conv2d layers come back as dcx.SparseQuantLinear / SparseQuantConv2d (fast
    inference on the packed weight), everything else as stored. The file is checked completely,
    and the model's names and shapes against it, before anything is written to the model."""
    records, dense, _ = load_records(path)
    state = model.state_dict()
    restored = set(records) | {f"{n}_mask" for n in records if f"{n}_mask" in state}
    missing = sorted(set(state) - restored - set(dense))
    unexpected = sorted((set(records) | set(dense)) - set(state))
    if missing or unexpected:
        raise ValueError(
            f"the file does not match the model: missing {missing}, unexpected {unexpected}"
        )
    for name, t in list(dense.items()) + [(n, ct.to_dense()) for n, ct in records.items()]:
        if state[name].shape != t.shape or state[name].dtype != t.dtype:
            raise ValueError(
                f"{name}: the file holds {t.dtype} {tuple(t.shape)}, the model "
                f"{state[name].dtype} {tuple(state[name].shape)}"
            )
    with torch.no_grad():
        for name, t in dense.items():
            state[name].copy_(t)
        for name, ct in records.items():
            restore_compressed(model, name, ct)
    return model
