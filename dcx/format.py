"""The .dcx container and its tensor codec: bytes <-> compressed tensors. It knows no module
(dcx.io puts models into files and files into models).

Layout (all integers little-endian):

    header    32 bytes: magic b"\\x89DCX\\r\\n\\x1a\\n", major u16, minor u16, flags u32 (bit 0: the
              manifest is zlib-deflated, as dcx writes it),
              manifest length u64, manifest CRC32 u32, 4 zero bytes
    manifest  UTF-8 JSON: format version, the compression config ("extra"), one entry per tensor
              (name, shape, dtype, bits, mode, section numbers), the section table (offset from
              the start of the data area, size, CRC32) and, from 1.3, "layers": the settings of
              the packed layers the file was saved from where they differ from dcx.load's
              defaults, {module name: {"compute": one of dcx.config.COMPUTE_MODES (default
              "auto"), "mode": "dense" or "sparse" (default: by density)}}, which dcx.load
              restores; from 1.5, "tied": {name: source}, a compressed tensor stored once under
              `source`
              that the model also holds as `name` (a tied input embedding and output
              projection), which dcx.load ties again
    data      the sections, back to back in table order: codebooks, Huffman code lengths,
              bitstreams, segment pointers, row scales (from 1.4), and raw parameters
    digest    32 bytes: SHA-256 of everything before it

A compressed tensor (a `CompressedTensor`) is a mask with, per kept weight, either a codebook
label (weight sharing: payload "codes") or a raw value (pruning alone: payload "values"). Codes
are stored in one of two modes, whichever is smaller:

  sparse  positions of the kept weights as relative indices (the gap to the previous kept weight,
          in `index_bits` bits, Han et al. section 2), Huffman coded, plus the Huffman-coded labels
          of the kept weights only.
  dense   one Huffman-coded symbol per position: the label, or k (one past the codebook) for a
          pruned position; no positions. A quantized but unpruned layer stores its codes alone.

Values are stored in sparse mode: the Huffman-coded positions, then the kept values raw, in
position order.

A scaled codebook (from 1.4) adds a "scale" section to codes in either mode: one float16 per row
of the weight viewed as [shape[0], -1] (2 bytes a row, 1% of a 4-bit row of 384 weights),
tensor = scale[row] * codebook[labels]; or (from 1.6) G float16 per row, row by row, for group
scales: tensor[row, j] = scale[row, j // size] * codebook[labels], the columns cut into G groups
of `size`, the smallest power of two from 32 with ceil(columns / size) = G (group_size_of; every
power of two that gives G cuts the columns alike). Float16 because its rounding (2^-11 relative)
is far below a 3-8 bit codebook's, and the stage that makes the scales rounds them to float16, so
the file holds them exactly.

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
import secrets
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dcx import ops
from dcx.config import COMPUTE_MODES

__all__ = [
    "FormatError",
    "CompressedTensor",
    "check_scale",
    "group_size_of",
    "scale_like",
    "scale_columns",
    "encode_tensor",
    "decode_tensor",
    "save_records",
    "load_records",
    "verify",
    "read",
    "write_atomic",
    "encode_positions",
    "decode_positions",
    "encode_file",
    "decode_file",
    "seal",
]

MAGIC = b"\x89DCX\r\n\x1a\n"
# 1.1: the manifest may be zlib-deflated (header flag bit 0); 1.2: "values" records (pruning
# alone); 1.3: "layers", the packed layers' settings; 1.4: row scales; 1.5: "tied"; 1.6: group
# scales. A reader takes every 1.x file.
VERSION = (1, 6)
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
    """One pruned and/or weight-shared tensor.

    mask: bool, the tensor's shape, True = kept. Then either
      codebook (1-D float [k], k <= 2^bits), labels (integer, the tensor's shape; ignored where
      pruned) and bits: tensor = codebook[labels] where mask, exactly 0 elsewhere; or
      values (float, the tensor's shape; ignored where pruned): tensor = values where mask.
    index_bits: bits of a relative index (the paper uses 4 for fully connected layers, 5 for VGG,
    8 for conv). segment_rows: rows per segment of positions (None: enough rows for
    SEGMENT_POSITIONS). mode: codes only, "sparse", "dense" or None (whichever is smaller).
    scale: codes only, float [shape[0]] row scales of a scaled codebook (float16 values, > 0):
    tensor = scale[row] * codebook[labels] where mask; or [shape[0], G] group scales (the
    tensor viewed [shape[0], columns], column j in group j // group_size_of(scale, columns)).
    """

    mask: Tensor
    labels: Tensor | None = None
    codebook: Tensor | None = None
    bits: int | None = None
    values: Tensor | None = None
    index_bits: int = 4
    segment_rows: int | None = None
    mode: str | None = None
    scale: Tensor | None = None

    @property
    def shape(self):
        return tuple(self.mask.shape)

    @property
    def payload(self) -> str:
        return "values" if self.values is not None else "codes"

    def to_dense(self) -> Tensor:
        """The tensor: codebook[labels] (or values) at kept positions, exactly +0.0 elsewhere, in
        the codebook's (or the values') dtype."""
        if self.values is not None:
            values = self.values
        else:
            values = self.codebook[self.labels.long().clamp(0, self.codebook.numel() - 1)]
            if self.scale is not None:
                values = values * scale_like(self.scale.to(values.dtype), values.shape)
        return torch.where(self.mask, values, torch.zeros((), dtype=values.dtype))


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

    if not isinstance(ct.mask, Tensor) or ct.mask.dtype != torch.bool:
        fail(f"mask must be a bool tensor, got {getattr(ct.mask, 'dtype', type(ct.mask))}")
    if ct.mask.dim() > MAX_DIMS:
        fail(f"at most {MAX_DIMS} dimensions, got {ct.mask.dim()}")
    if not (isinstance(ct.index_bits, int) and 1 <= ct.index_bits <= 16):
        fail(f"index_bits must be an int in [1, 16], got {ct.index_bits!r}")
    if ct.segment_rows is not None and not (
        isinstance(ct.segment_rows, int) and ct.segment_rows >= 1
    ):
        fail(f"segment_rows must be None or an int >= 1, got {ct.segment_rows!r}")
    if ct.values is not None:
        if ct.codebook is not None or ct.labels is not None or ct.scale is not None:
            fail("give either values or codebook, labels (and scale), not both")
        if ct.values.shape != ct.mask.shape:
            fail(f"values must have the shape of mask {tuple(ct.mask.shape)}, got "
                 f"{tuple(ct.values.shape)}")
        if DTYPE_NAMES.get(ct.values.dtype) not in FLOAT_DTYPES:
            fail(f"values must be float32, float64, float16 or bfloat16, got {ct.values.dtype}")
        if ct.mode not in (None, "sparse"):
            fail(f"values are stored in sparse mode only, got mode {ct.mode!r}")
        return
    if ct.codebook is None or ct.labels is None:
        fail("give values, or codebook and labels")
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
    if ct.mode not in (None, "sparse", "dense"):
        fail(f"mode must be None, 'sparse' or 'dense', got {ct.mode!r}")
    kept = ct.labels[ct.mask]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= ct.codebook.numel()):
        fail(f"labels must lie in [0, {ct.codebook.numel()}) where mask is set")
    if ct.scale is not None:
        try:
            rows = ct.mask.shape[0] if ct.mask.dim() else 1
            check_scale(ct.scale.cpu(), rows, "scale", ct.mask.numel() // max(rows, 1))
        except ValueError as error:
            fail(str(error))


def scale_columns(scale: Tensor, group_size: int, columns: int) -> Tensor:
    """A scaled codebook's scales shaped to multiply its weight viewed [rows, columns]: row scales
    [rows] (group_size 0) as [rows, 1]; group scales [rows, ceil(columns / group_size)] repeated
    over each group's columns, [rows, columns]."""
    if not group_size:
        return scale.reshape(-1, 1)
    return scale.repeat_interleave(group_size, 1)[:, :columns]


def group_size_of(scale: Tensor, columns: int) -> int:
    """The columns per group of a scaled codebook's scales for a weight of `columns` columns: 0
    for row scales [rows]; for group scales [rows, G], the smallest power of two from 32 with
    ceil(columns / size) = G (ValueError when none gives G)."""
    if scale.dim() == 1:
        return 0
    groups, size = scale.shape[1], 32
    while -(-columns // size) > groups:
        size *= 2
    if groups < 2 or -(-columns // size) != groups:
        raise ValueError(f"group scales of {groups} groups do not cut {columns} columns into "
                         "groups of a power of two from 32 (one group: give row scales [rows])")
    return size


def scale_like(scale: Tensor, shape) -> Tensor:
    """A scaled codebook's scales (row [rows] or group [rows, G]) shaped to multiply a weight of
    `shape` (viewed as [rows, columns])."""
    columns = math.prod(shape[1:])
    if scale.dim() == 1:
        return scale.reshape((-1,) + (1,) * (len(shape) - 1))
    return scale_columns(scale, group_size_of(scale, columns), columns).reshape(shape)


def check_scale(scale: Tensor, rows: int, what: str, columns: int | None = None) -> Tensor:
    """`scale` as float32 [rows] (row scales) or [rows, G] (group scales of a weight of `columns`
    columns, group_size_of) when it is finite, positive and float16-exact (the file stores it in
    float16: its rounding, 2^-11 relative, is far below a 3-8 bit codebook's), else ValueError
    naming `what`."""
    scale = scale.detach()
    if scale.dim() not in (1, 2) or scale.shape[0] != rows:
        raise ValueError(f"{what} must be [rows] (row scales) or [rows, groups] (group scales) "
                         f"with {rows} rows, got shape {tuple(scale.shape)}")
    if scale.dim() == 2:
        if columns is None:
            raise ValueError(f"{what}: group scales need the weight's columns")
        group_size_of(scale, columns)
    if not scale.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {scale.dtype}")
    scale = scale.float()
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise ValueError(f"{what} must be finite and positive")
    if not torch.equal(scale.half().float(), scale):
        raise ValueError(f"{what} must hold float16 values (round it with .half().float())")
    return scale


def _geometry(shape, segment_rows: int | None):
    """(rows, cols, segment_rows) of a weight viewed as [shape[0], -1]."""
    numel = math.prod(shape)
    rows = shape[0] if len(shape) else 1
    cols = numel // rows if rows else 0
    if segment_rows is None:
        segment_rows = max(1, -(-SEGMENT_POSITIONS // cols)) if cols else 1
    return rows, cols, min(segment_rows, max(rows, 1))  # more rows than the weight has: one


def encode_tensor(ct: CompressedTensor, name: str = "tensor"):
    """(manifest entry, [(section kind, bytes)]) of one compressed tensor: codes in sparse or dense
    mode (ct.mode, or the smaller), values in sparse mode."""
    _check_record(name, ct)
    shape = tuple(ct.mask.shape)
    numel = ct.mask.numel()
    rows, cols, segment_rows = _geometry(shape, ct.segment_rows)
    mask = ct.mask.detach().cpu().reshape(-1)
    meta = {
        "kind": "compressed",
        "payload": ct.payload,
        "shape": list(shape),
        "index_bits": ct.index_bits,
        "nnz": int(mask.sum()),
    }

    def positions():
        entries, seg_entries = encode_positions(
            torch.nonzero(mask).reshape(-1).numpy(), numel, segment_rows * cols, ct.index_bits
        )
        index_lengths, index_stream = _huffman(
            torch.from_numpy(entries.astype(np.int64)), 1 << ct.index_bits
        )
        extra = {"mode": "sparse", "segment_rows": segment_rows, "entries": len(entries)}
        return extra, [("index_lengths", index_lengths), ("index", index_stream),
                       ("pointers", seg_entries.astype("<u4").tobytes())]

    if ct.values is not None:
        values = ct.values.detach().cpu().reshape(-1)
        extra, sections = positions()
        meta.update(extra, dtype=DTYPE_NAMES[values.dtype])
        return meta, sections + [("values", _raw_bytes(values[mask]))]

    k = ct.codebook.numel()
    labels = ct.labels.detach().cpu().reshape(-1).long()
    codebook = _raw_bytes(ct.codebook.detach().cpu())
    meta.update(dtype=DTYPE_NAMES[ct.codebook.dtype], bits=ct.bits)
    candidates = {}
    if ct.mode in (None, "sparse"):
        extra, index_sections = positions()
        label_lengths, label_stream = _huffman(labels[mask], k)
        candidates["sparse"] = (
            extra,
            [("codebook", codebook), ("label_lengths", label_lengths), ("labels", label_stream)]
            + index_sections,
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
    if ct.scale is not None:
        sections = sections + [("scale", ct.scale.detach().cpu().half().numpy().astype("<f2")
                                .tobytes())]
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


def _decode_positions(meta, sections, shape, index_bits, where) -> Tensor:
    """Flat int64 positions of the kept weights of a sparse-mode entry."""
    numel = math.prod(shape)
    rows, cols, segment_rows = _geometry(shape, _need_int(meta, "segment_rows", 1, 2**62, where))
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
    stream = _decode_stream(sections["index"], sections["index_lengths"], entries, f"{where} index")
    positions = decode_positions(stream.numpy(), seg_entries, numel, seg_size, index_bits)
    return torch.from_numpy(positions)


def decode_tensor(meta: dict, sections: dict, name: str = "tensor") -> CompressedTensor:
    """The CompressedTensor of a manifest entry and its sections {kind: bytes}; FormatError when
    anything disagrees. Sizes are checked against the bytes before anything is allocated."""
    where = f"tensor {name!r}"
    shape = _shape_of(meta, where)
    dtype = _dtype_of(meta, where, FLOAT_DTYPES)
    index_bits = _need_int(meta, "index_bits", 1, 16, where)
    payload = meta.get("payload", "codes")  # files before 1.2 hold codes only
    mode = meta.get("mode")
    if payload not in ("codes", "values"):
        raise FormatError(f"{where}: payload must be 'codes' or 'values', got {payload!r}")
    allowed = ("sparse",) if payload == "values" else ("sparse", "dense")
    if mode not in allowed:
        raise FormatError(f"{where}: {payload} need mode {' or '.join(map(repr, allowed))}, got "
                          f"{mode!r}")
    wanted = ["index_lengths", "index", "pointers"] if mode == "sparse" else []
    wanted += ["values"] if payload == "values" else ["codebook", "label_lengths", "labels"]
    if payload == "codes" and "scale" in sections:
        wanted.append("scale")
    if sorted(sections) != sorted(wanted):
        raise FormatError(f"{where}: {payload} in {mode} mode need sections {wanted}, got "
                          f"{sorted(sections)}")
    numel = math.prod(shape)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    # Every size is checked against the bytes before a tensor of `numel` is allocated.
    index = _decode_positions(meta, sections, shape, index_bits, where) if mode == "sparse" else None
    if payload == "values":
        raw = sections["values"]
        if len(raw) != len(index) * itemsize:
            raise FormatError(f"{where}: values section of {len(raw)} bytes, {len(index)} kept "
                              f"{meta['dtype']} weights need {len(index) * itemsize}")
        mask = torch.zeros(numel, dtype=torch.bool)
        values = torch.zeros(numel, dtype=dtype)
        values[index] = _as_tensor(raw).view(dtype)
        mask[index] = True
        record = CompressedTensor(mask.reshape(shape), values=values.reshape(shape))
    else:
        bits = _need_int(meta, "bits", 1, 16, where)
        cb = sections["codebook"]
        k = len(cb) // itemsize
        if len(cb) % itemsize or not 1 <= k <= 1 << bits:
            raise FormatError(
                f"{where}: codebook section of {len(cb)} bytes is not 1 to 2^{bits} "
                f"{meta['dtype']} values"
            )
        codebook = _as_tensor(cb).view(dtype).clone()
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
            kept = _decode_stream(sections["labels"], sections["label_lengths"], len(index),
                                  f"{where} labels")
            mask = torch.zeros(numel, dtype=torch.bool)
            labels = torch.zeros(numel, dtype=torch.long)
            mask[index] = True
            labels[index] = kept
        record = CompressedTensor(mask.reshape(shape), labels.reshape(shape), codebook, bits)
        if "scale" in sections:
            rows = shape[0] if shape else 1
            size = len(sections["scale"])
            if size == 0 or size % (2 * rows):
                raise FormatError(f"{where}: scale section of {size} bytes, {rows} rows need a "
                                  f"multiple of {2 * rows}")
            scale = torch.from_numpy(np.frombuffer(sections["scale"], dtype="<f2").astype(
                np.float32))
            if size > 2 * rows:
                scale = scale.reshape(rows, -1)
                try:
                    group_size_of(scale, numel // max(rows, 1))
                except ValueError as error:
                    raise FormatError(f"{where}: {error}") from None
            if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
                raise FormatError(f"{where}: scales must be finite and positive")
            record.scale = scale
    nnz = meta.get("nnz")
    if nnz != int(mask.sum()):
        raise FormatError(
            f"{where}: manifest says {nnz!r} kept weights, the streams hold {int(mask.sum())}"
        )
    record.index_bits, record.segment_rows, record.mode = index_bits, meta.get("segment_rows"), mode
    return record


# ------------------------------------------------------------------------------ the file


def _check_layer_settings(layers):
    """FormatError unless `layers` maps module names to {"compute": a compute mode, "mode":
    "dense" or "sparse"} (either key may be absent)."""
    if not isinstance(layers, dict):
        raise FormatError("manifest: 'layers' must map module names to settings")
    for name, settings in layers.items():
        where = f"manifest: layers[{name!r}]"
        if not isinstance(settings, dict) or set(settings) - {"compute", "mode"}:
            raise FormatError(f"{where} must be a mapping with 'compute' and 'mode' only")
        if settings.get("compute", "auto") not in COMPUTE_MODES:
            raise FormatError(f"{where}: compute {settings['compute']!r} is not one of "
                              f"{COMPUTE_MODES}")
        if settings.get("mode", "dense") not in ("dense", "sparse"):
            raise FormatError(f"{where}: mode {settings['mode']!r} is not 'dense' or 'sparse'")


def encode_file(records: dict, dense: dict, manifest_extra: dict | None = None,
                layers: dict | None = None, tied: dict | None = None) -> bytes:
    """The bytes of a .dcx file: {name: CompressedTensor} compressed, {name: Tensor} raw,
    `manifest_extra` (JSON-serialisable: the compression config), `layers` ({module name:
    {setting: value}}, the packed layers' settings) and `tied` ({name: the name of a tensor of
    the file it is the same tensor as}) in the manifest. The same inputs give the same bytes."""
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
    _check_tied(tied or {}, records, dense)
    manifest = {
        "format": "dcx",
        "version": f"{VERSION[0]}.{VERSION[1]}",
        "extra": manifest_extra or {},
        "layers": layers or {},
        "tied": tied or {},
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


def save_records(path, records: dict, dense: dict, manifest_extra: dict | None = None,
                 layers: dict | None = None, tied: dict | None = None):
    """Write a .dcx file atomically (see encode_file)."""
    write_atomic(path, encode_file(records, dense, manifest_extra, layers, tied))


def write_atomic(path, data: bytes):
    """A temporary file in the target's folder, fsync, rename: a crash leaves the old file or the
    new one at `path`, never a torn one. The file's mode follows the umask, as open() would."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
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
    _check_layer_settings(manifest.setdefault("layers", {}))  # absent before 1.3

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


def read(path) -> bytes:
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
    _check_tied(manifest.setdefault("tied", {}), records, dense)  # absent before 1.5
    return records, dense, manifest


def _check_tied(tied, records: dict, dense: dict):
    """FormatError unless `tied` maps names that are not tensors of the file to names of its
    compressed tensors."""
    if not isinstance(tied, dict):
        raise FormatError("manifest: 'tied' must map names to names of the file's compressed "
                          "tensors")
    for name, source in tied.items():
        if name in records or name in dense:
            raise FormatError(f"manifest: tied[{name!r}] names a tensor the file stores")
        if not isinstance(source, str) or source not in records:
            raise FormatError(f"manifest: tied[{name!r}] = {source!r} is not a compressed "
                              "tensor of the file")


def load_records(path):
    """(records {name: CompressedTensor}, dense {name: Tensor}, manifest) of a .dcx file, every
    check passed; FormatError otherwise."""
    return decode_file(read(path))


def verify(path) -> dict:
    """Check a .dcx file completely (header, checksums, digest, every stream decoded); returns a
    summary, raises FormatError."""
    buf = read(path)
    records, dense, manifest = decode_file(buf)
    return {
        "path": os.fspath(path),
        "bytes": len(buf),
        "version": manifest.get("version"),
        "compressed": len(records),
        "dense": len(dense),
        "sha256": buf[-DIGEST_SIZE:].hex(),
    }
