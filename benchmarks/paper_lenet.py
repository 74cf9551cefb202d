"""Reproduce Deep Compression's LeNet results on MNIST with the whole dcx pipeline, and put them
beside the paper's and the best public reimplementation's.

    python benchmarks/paper_lenet.py [--data ../shared/data/mnist] [--only lenet300|lenet5]

Each model runs configs/<model>.yaml through dcx.DeepCompression (train -> prune + retrain ->
cluster + fine-tune -> encode), writes benchmarks/results/paper-<model>.dcx and .json, and the
table benchmarks/results/paper-lenet.md is rebuilt from every model's JSON present (so the two
models can run separately). The size is the .dcx file on disk; the ratio is fp32 parameter bytes
over file bytes.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from dcx.cli import run_pipeline  # noqa: E402
from dcx.config import CompressionConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}
# Han et al. 2015 (Table 1) and the best public reimplementation we know of (as stated in the
# project's issue): compression ratio and top-1 error.
PAPER = {"lenet300": (40, 1.58), "lenet5": (39, 0.74)}
PUBLIC = {"lenet300": (48, 1.8), "lenet5": (46, 0.74)}
TARGET = {"lenet300": (50, 1.6), "lenet5": (50, 0.8)}


def run(model, data):
    config = CompressionConfig.load(REPO / "configs" / f"{model}.yaml")
    out = common.RESULTS / f"paper-{model}.dcx"
    started = time.perf_counter()
    result = run_pipeline(config, model, data, out, plots=True)
    wall = time.perf_counter() - started
    report = result.report
    record = {
        "model": model,
        "stages": result.to_dict()["stages"],
        "same_predictions": result.same_predictions,
        "file_bytes": out.stat().st_size,
        "fp32_bytes": report.fp32_bytes,
        "ratio": report.fp32_bytes / out.stat().st_size,
        "error": 100 * (1 - result.stages[-1].accuracy),
        "reference_error": 100 * (1 - result.stages[0].accuracy),
        "wall_seconds": wall,
        "layers": report.to_markdown(),
        "stamp": common.stamp("cpu"),
        "command": "python benchmarks/paper_lenet.py --only " + model
                   + (f" --data {shlex.quote(data)}" if data else ""),
    }
    (common.RESULTS / f"paper-{model}.json").write_text(json.dumps(record, indent=2))
    return record


def table():
    rows, sections = [], []
    for model, name in MODELS.items():
        path = common.RESULTS / f"paper-{model}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        met = r["ratio"] >= TARGET[model][0] and r["error"] <= TARGET[model][1]
        rows.append([name, f"{r['reference_error']:.2f}%", f"{r['error']:.2f}%",
                     f"{r['file_bytes']:,} B", f"{r['ratio']:.1f}x",
                     f"{PAPER[model][0]}x at {PAPER[model][1]}%",
                     f"{PUBLIC[model][0]}x at {PUBLIC[model][1]}%",
                     f">= {TARGET[model][0]}x at <= {TARGET[model][1]}%: {'met' if met else 'missed'}",
                     f"{r['wall_seconds'] / 60:.1f} min"])
        stages = "\n".join(
            f"| {s['stage']} | {100 * s['accuracy']:.2f}% | {s['size_bytes']:,} B | {s['note']} |"
            for s in r["stages"])
        sections.append(f"## {name}\n\n{r['stamp']}\n\n`{r['command']}` (config: configs/{model}.yaml)\n\n"
                        f"| stage | accuracy | size | note |\n|---|---|---|---|\n{stages}\n\n"
                        f"Loaded .dcx model (SparseQuantLinear/SparseQuantConv2d) gives the same "
                        f"predictions as the in-memory model: {'yes' if r['same_predictions'] else 'NO'}\n\n"
                        f"{r['layers']}\n")
    header = ["model", "reference error", "compressed error", ".dcx file", "ratio vs fp32",
              "Han et al.", "best public", "target", "wall time (2 cores)"]
    common.write_table("paper-lenet", "Deep Compression on MNIST: LeNet-300-100 and LeNet-5",
                       header, rows, notes=["Ratio: fp32 parameter bytes / .dcx file bytes "
                                            "(header, manifest, codebooks, biases included)."])
    path = common.RESULTS / "paper-lenet.md"
    path.write_text(path.read_text() + "\n" + "\n".join(sections))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mnist"))
    parser.add_argument("--only", choices=sorted(MODELS), action="append")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not Path(args.data).is_dir():
        sys.exit(f"MNIST folder {args.data!r} not found (give --data)")
    for model in args.only or list(MODELS):
        run(model, args.data)
    table()


if __name__ == "__main__":
    main()
