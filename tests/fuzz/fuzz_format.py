"""Fuzz harness of the .dcx loader (atheris, libFuzzer-driven). Any input must load or raise
dcx.FormatError: any other exception, a crash, a hang (-timeout) or a huge allocation
(-rss_limit_mb) is a finding.

    python tests/fuzz/fuzz_format.py -max_total_time=60 -timeout=10 -rss_limit_mb=2048

Each input picks a mode from its first byte:
  0  the bytes are the whole file (header, magic and digest checks);
  1  the bytes are spliced into a valid seed file at a chosen offset, and every checksum is then
     recomputed (reseal), so the mutation reaches the manifest and stream checks behind them;
  2  the bytes replace the seed's manifest JSON (resealed), reaching the structural checks.
"""

import json
import os
import struct
import sys
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from dcx import format as fmt  # noqa: E402


def seed_files():
    """Small valid files covering both modes of codes, values, several index widths, raw tensors
    of many dtypes."""
    g = torch.Generator().manual_seed(0)
    records = {}
    for name, shape, density, bits, index_bits in [
        ("fc.weight", (12, 40), 0.1, 5, 4),
        ("conv.weight", (4, 3, 3, 3), 0.3, 8, 8),
        ("dense.weight", (6, 7), 1.0, 3, 4),
        ("tiny.weight", (1,), 1.0, 1, 1),
        ("bitmap.weight", (5, 9), 0.5, 2, 1),
        ("wide.weight", (3, 50), 0.2, 9, 5),
    ]:
        mask = torch.rand(shape, generator=g) < density
        k = 1 << bits
        labels = torch.randint(0, k, shape, generator=g)
        records[name] = fmt.CompressedTensor(
            mask, labels, torch.randn(k, generator=g), bits, index_bits=index_bits
        )
    mask = torch.rand(8, 20, generator=g) < 0.2
    records["pruned.weight"] = fmt.CompressedTensor(
        mask, values=torch.randn(8, 20, generator=g), index_bits=3
    )
    dense = {
        "fc.bias": torch.randn(12, generator=g),
        "bn.num_batches_tracked": torch.tensor(3),
        "flags": torch.tensor([True, False]),
        "half": torch.randn(3).half(),
        "bf": torch.randn(2).bfloat16(),
    }
    return [
        fmt.encode_file(records, dense, {"config": {"bits": 5}}),
        fmt.encode_file({"x": records["fc.weight"]}, {}, {}),
    ]


def split(buf):
    """(manifest dict, data bytes) of a file whose header is sane, else None."""
    if len(buf) < fmt.HEADER.size + fmt.DIGEST_SIZE:
        return None
    flags, manifest_len = struct.unpack_from("<IQ", buf, 12)
    end = fmt.HEADER.size + manifest_len
    if end > len(buf) - fmt.DIGEST_SIZE:
        return None
    try:
        text = buf[fmt.HEADER.size : end]
        if flags & fmt.FLAG_MANIFEST_ZLIB:
            text = zlib.decompress(text)
        manifest = json.loads(text.decode())
    except (zlib.error, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return manifest, buf[end : len(buf) - fmt.DIGEST_SIZE]


def reseal(manifest, data):
    """A file of `manifest` and `data` with every checksum valid: section CRCs recomputed where
    the table's offsets and sizes make sense, then the manifest CRC and the digest."""
    if isinstance(manifest, dict) and isinstance(manifest.get("sections"), list):
        for entry in manifest["sections"]:
            try:
                start, size = int(entry["offset"]), int(entry["size"])
                if 0 <= start <= start + size <= len(data):
                    entry["crc32"] = zlib.crc32(data[start : start + size])
            except (KeyError, TypeError, ValueError, OverflowError):
                pass
    try:
        return fmt.seal(manifest, data)
    except (TypeError, ValueError):
        return None


SEEDS = seed_files()


def mutate(data: bytes):
    """The file a fuzz input stands for (see the module docstring)."""
    if len(data) < 3:
        return data
    mode, seed, rest = data[0] % 3, SEEDS[data[1] % len(SEEDS)], data[2:]
    if mode == 0:
        return rest
    manifest, payload = split(seed)
    if mode == 2:
        try:
            manifest = json.loads(rest.decode())
        except (UnicodeDecodeError, ValueError, RecursionError):
            return rest
        return reseal(manifest, payload) or rest
    # Mode 1: overwrite bytes of the manifest text or the data at an offset, then reseal.
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode() + payload
    at = int.from_bytes(rest[:4].ljust(4, b"\0"), "little") % max(len(text), 1)
    spliced = text[:at] + rest[4:] + text[at + len(rest[4:]) :]
    cut = len(spliced) - len(payload)
    try:
        manifest = json.loads(spliced[:cut].decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        return spliced
    return reseal(manifest, spliced[cut:]) or spliced


def check_one_input(data: bytes):
    buf = mutate(data)
    try:
        fmt.decode_file(buf)
    except fmt.FormatError:
        pass


def main():
    import inspect

    import atheris

    # Coverage feedback from the loader and this harness (torch itself stays uninstrumented).
    for module in (fmt, sys.modules[__name__]):
        for obj in list(vars(module).values()):
            if inspect.isfunction(obj) and obj.__module__ == module.__name__:
                atheris.instrument_func(obj)
    atheris.Setup(sys.argv, check_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
