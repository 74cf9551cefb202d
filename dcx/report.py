"""The per-layer compression table of Han et al. (Tables 2 and 3), computed from the real bytes of
a .dcx file.

Per compressed layer: weights kept (%); weight bits and index bits per stored weight, fixed width
(P+Q: pruning + quantization) and as Huffman coded in the file (P+Q+H); and the compress rate
(stored bytes / fp32 bytes, as the paper prints it) for both. P+Q bytes are what fixed-width codes
would take: ceil((symbols * bits + entries * index_bits) / 8) plus the codebook and segment
pointers; P+Q+H bytes are the layer's sections in the file (codebook, code tables, bitstreams,
pointers). A layer pruned but not shared stores its kept values raw (their dtype's bits in both
columns). Weight bits count per stored symbol (the kept weights in sparse mode, every position in
dense mode); index bits count per kept weight, fillers included. Totals add the layers; the
overall ratios divide the fp32 parameters (4 bytes per element of every floating tensor) and
torch.save(model.state_dict()) by the whole file. On the command line: `dcx report FILE`.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch

from dcx import format as fmt

__all__ = ["LayerRow", "Report", "report"]


@dataclass
class LayerRow:
    name: str
    shape: list
    numel: int
    nnz: int
    mode: str
    bits: int
    index_bits: int
    weight_bits_pq: float
    weight_bits_pqh: float
    index_bits_pq: float
    index_bits_pqh: float
    bytes_fp32: int
    bytes_pq: int
    bytes_pqh: int

    @property
    def kept(self):
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def rate_pq(self):
        return self.bytes_pq / self.bytes_fp32 if self.bytes_fp32 else 0.0

    @property
    def rate_pqh(self):
        return self.bytes_pqh / self.bytes_fp32 if self.bytes_fp32 else 0.0


@dataclass
class Report:
    path: str
    file_bytes: int
    rows: list
    total: LayerRow
    raw_bytes: int  # parameters stored raw (biases, batch norm, layers not compressed)
    overhead_bytes: int  # header, manifest, digest
    fp32_bytes: int  # 4 bytes per element of every floating tensor
    torch_save_bytes: int
    torch_save_source: str
    notes: list = field(default_factory=list)

    @property
    def ratio_fp32(self):
        return self.fp32_bytes / self.file_bytes

    @property
    def file_bytes_pq(self):
        """The whole file's bytes with fixed-width codes and indices instead of Huffman streams:
        the same container, header, manifest and raw tensors included."""
        return self.file_bytes - self.total.bytes_pqh + self.total.bytes_pq

    @property
    def ratio_torch_save(self):
        return self.torch_save_bytes / self.file_bytes

    HEADER = [
        "layer",
        "#weights",
        "weights %",
        "weight bits P+Q",
        "weight bits P+Q+H",
        "index bits P+Q",
        "index bits P+Q+H",
        "compress rate P+Q",
        "compress rate P+Q+H",
    ]

    def _cells(self, row):
        return [
            row.name,
            f"{row.numel:,}",
            f"{row.kept:.1%}",
            f"{row.weight_bits_pq:.2f}",
            f"{row.weight_bits_pqh:.2f}",
            f"{row.index_bits_pq:.2f}",
            f"{row.index_bits_pqh:.2f}",
            f"{row.rate_pq:.2%}",
            f"{row.rate_pqh:.2%}",
        ]

    def _summary(self):
        return [
            f"file: {self.path}: {self.file_bytes:,} bytes "
            f"(compressed layers {self.total.bytes_pqh:,}, "
            f"raw parameters {self.raw_bytes:,}, header+manifest+digest {self.overhead_bytes:,})",
            f"vs fp32 parameters ({self.fp32_bytes:,} bytes): {self.ratio_fp32:.1f}x smaller",
            f"vs torch.save(state_dict) ({self.torch_save_bytes:,} bytes, "
            f"{self.torch_save_source}): "
            f"{self.ratio_torch_save:.1f}x smaller",
        ] + list(self.notes)

    def __str__(self):
        table = [self.HEADER] + [self._cells(r) for r in self.rows] + [self._cells(self.total)]
        widths = [max(len(line[i]) for line in table) for i in range(len(self.HEADER))]
        fmt_line = lambda cells: "  ".join(  # noqa: E731
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        lines = [fmt_line(table[0]), "  ".join("-" * w for w in widths)]
        lines += [fmt_line(c) for c in table[1:-1]]
        lines += ["  ".join("-" * w for w in widths), fmt_line(table[-1]), ""]
        return "\n".join(lines + self._summary())

    def to_markdown(self):
        lines = [
            "| " + " | ".join(self.HEADER) + " |",
            "|" + "|".join("---" for _ in self.HEADER) + "|",
        ]
        lines += ["| " + " | ".join(self._cells(r)) + " |" for r in self.rows]
        lines.append("| " + " | ".join(f"**{c}**" for c in self._cells(self.total)) + " |")
        return "\n".join(lines + [""] + [f"- {s}" for s in self._summary()]) + "\n"

    def to_dict(self):
        def row(r):
            return {**asdict(r), "kept": r.kept, "rate_pq": r.rate_pq, "rate_pqh": r.rate_pqh}

        return {
            "path": self.path,
            "file_bytes": self.file_bytes,
            "layers": [row(r) for r in self.rows],
            "total": row(self.total),
            "raw_bytes": self.raw_bytes,
            "overhead_bytes": self.overhead_bytes,
            "fp32_bytes": self.fp32_bytes,
            "torch_save_bytes": self.torch_save_bytes,
            "torch_save_source": self.torch_save_source,
            "ratio_fp32": self.ratio_fp32,
            "ratio_torch_save": self.ratio_torch_save,
            "notes": list(self.notes),
        }

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)


def _layer_row(meta, sizes):
    numel, nnz, index_bits = math.prod(meta["shape"]), meta["nnz"], meta["index_bits"]
    itemsize = torch.empty(0, dtype=fmt.DTYPES[meta["dtype"]]).element_size()
    values = meta.get("payload") == "values"
    codebook = sizes.get("codebook", 0)
    if values:  # the kept weights raw: their dtype's bits, fixed width or not
        bits = fixed_bits = 8 * itemsize
    else:
        bits = meta["bits"]
        k = codebook // itemsize
    if meta["mode"] == "sparse":
        symbols, entries, pointers = nnz, meta["entries"], sizes["pointers"]
        if not values:
            fixed_bits = bits
        index_pq = index_bits * entries / nnz if nnz else 0.0
        index_pqh = 8 * sizes["index"] / nnz if nnz else 0.0
    else:  # one symbol per position; a pruned position is one more symbol (k)
        symbols, entries, pointers = numel, 0, 0
        fixed_bits = bits if nnz == numel else max(1, math.ceil(math.log2(k + 1)))
        index_pq = index_pqh = 0.0
    bytes_pq = (math.ceil((symbols * fixed_bits + entries * index_bits) / 8) + codebook + pointers
                + sizes.get("scale", 0))
    stream = sizes["values"] if values else sizes["labels"]
    return LayerRow(
        name=meta["name"],
        shape=list(meta["shape"]),
        numel=numel,
        nnz=nnz,
        mode=meta["mode"],
        bits=bits,
        index_bits=index_bits,
        weight_bits_pq=float(fixed_bits),
        weight_bits_pqh=8 * stream / symbols if symbols else 0.0,
        index_bits_pq=index_pq,
        index_bits_pqh=index_pqh,
        bytes_fp32=4 * numel,
        bytes_pq=bytes_pq,
        bytes_pqh=sum(sizes.values()),
    )


def _total(rows):
    numel, nnz = sum(r.numel for r in rows), sum(r.nnz for r in rows)
    symbols = [r.nnz if r.mode == "sparse" else r.numel for r in rows]
    nsym = sum(symbols)

    def mean(values, weights, n):
        return sum(v * w for v, w in zip(values, weights, strict=True)) / n if n else 0.0

    return LayerRow(
        name="total",
        shape=[],
        numel=numel,
        nnz=nnz,
        mode="",
        bits=0,
        index_bits=0,
        weight_bits_pq=mean([r.weight_bits_pq for r in rows], symbols, nsym),
        weight_bits_pqh=mean([r.weight_bits_pqh for r in rows], symbols, nsym),
        index_bits_pq=mean([r.index_bits_pq for r in rows], [r.nnz for r in rows], nnz),
        index_bits_pqh=mean([r.index_bits_pqh for r in rows], [r.nnz for r in rows], nnz),
        bytes_fp32=sum(r.bytes_fp32 for r in rows),
        bytes_pq=sum(r.bytes_pq for r in rows),
        bytes_pqh=sum(r.bytes_pqh for r in rows),
    )


def report(source, model: torch.nn.Module | None = None) -> Report:
    """The compression table of a .dcx file (a path, or the file's bytes; checked and decoded
    completely). With `model`, the torch.save baseline is model.state_dict(); without, the
    state_dict rebuilt from the file (the compressed weights dense, every raw tensor as stored)."""
    buf = bytes(source) if isinstance(source, (bytes, bytearray, memoryview)) else fmt.read(source)
    path = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else source
    records, dense, manifest = fmt.decode_file(buf)
    sizes = [entry["size"] for entry in manifest["sections"]]
    rows, raw_bytes = [], 0
    for meta in manifest["tensors"]:
        layer_sizes = {kind: sizes[i] for kind, i in meta["sections"].items()}
        if meta["kind"] == "compressed":
            rows.append(_layer_row(meta, layer_sizes))
        else:
            raw_bytes += layer_sizes["data"]
    total = _total(rows)
    fp32 = total.bytes_fp32 + sum(4 * t.numel() for t in dense.values() if t.is_floating_point())
    if model is not None:
        state, source = model.state_dict(), "the model's"
    else:
        state = {**{n: ct.to_dense() for n, ct in records.items()}, **dense}
        source = "rebuilt from the file"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return Report(
        path=os.fspath(path),
        file_bytes=len(buf),
        rows=rows,
        total=total,
        raw_bytes=raw_bytes,
        overhead_bytes=len(buf) - sum(sizes),
        fp32_bytes=fp32,
        torch_save_bytes=len(buffer.getvalue()),
        torch_save_source=source,
    )
