"""The `dcx` command.

    dcx demo [--out DIR]                          the whole pipeline on scikit-learn's digits
    dcx compress --config CFG [--model M] [--data D] [--out FILE]
    dcx eval FILE [--model M] [--data D]          accuracy of a .dcx file loaded into the model
    dcx report FILE [--json | --markdown]         the per-layer compression table
    dcx verify FILE                               check every checksum and decode everything
    dcx bench [NAME ...]                          the microbenchmarks (from a source checkout)

Data: --data digits (bundled, no download) or a folder of MNIST IDX files (or $DCX_MNIST).
Exit codes: 0 success, 1 a failure while running, 2 bad usage, config or data, 3 a corrupt or
foreign .dcx file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CORRUPT = 0, 1, 2, 3
MODELS = ("lenet300", "lenet5")


class UsageError(Exception):
    """Bad arguments, config or data: exit code 2."""


def build_model(name: str, sample_shape):
    """A fresh model by name for inputs of `sample_shape` ([C, H, W])."""
    from dcx.models import LeNet5, LeNet300100

    if name == "lenet300":
        features = 1
        for d in sample_shape:
            features *= d
        return LeNet300100(in_features=features)
    if name == "lenet5":
        if tuple(sample_shape[-2:]) != (28, 28):
            raise UsageError(f"lenet5 needs 28x28 images (MNIST), the data has {tuple(sample_shape)}")
        return LeNet5(in_channels=sample_shape[0])
    raise UsageError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def load_data(spec: str | None):
    """(train_x, train_y, test_x, test_y, name) from 'digits' or an MNIST folder."""
    from dcx import data

    spec = spec or os.environ.get("DCX_MNIST") or "digits"
    if spec == "digits":
        return (*data.load_digits("train"), *data.load_digits("test"), "digits")
    folder = Path(spec)
    if not folder.is_dir():
        raise UsageError(f"data folder {spec!r} does not exist (give --data digits, or a folder "
                         "holding the MNIST IDX files train-images-idx3-ubyte[.gz] etc.)")
    try:
        return (*data.load_mnist(folder, "train"), *data.load_mnist(folder, "test"), "mnist")
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read MNIST from {spec!r}: {error}") from None


def _loaders(train_x, train_y, test_x, test_y, batch_size, seed):
    from dcx.data import loader

    return (loader(train_x, train_y, batch_size, shuffle=True, seed=seed),
            loader(test_x, test_y, 1000))


def run_pipeline(config, model_name, data_spec, out: Path, plots: bool = True, progress=True):
    """Compress `model_name` on the data with `config`; write the file (and plots) and print the
    stage table, the per-layer report and the check of the loaded model. Returns the result."""
    from dcx import plots as dcx_plots
    from dcx.pipeline import DeepCompression, seed_everything

    train_x, train_y, test_x, test_y, data_name = load_data(data_spec)
    seed_everything(config.random_seed)
    model = build_model(model_name, tuple(train_x.shape[1:]))
    train, test = _loaders(train_x, train_y, test_x, test_y, config.train.batch_size, config.random_seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pipeline = DeepCompression(model, config, train_loader=train, test_loader=test,
                               progress=progress, snapshot=plots)
    result = pipeline.run(out)
    print(f"\n{model_name} on {data_name}: stages\n")
    print(result.table())
    print(f"\nper-layer compression ({out}):\n")
    print(result.report)
    size = out.stat().st_size
    print(f"\nfile {out}: {size:,} bytes; {result.report.fp32_bytes / size:.1f}x smaller than the "
          f"fp32 parameters, {result.report.torch_save_bytes / size:.1f}x smaller than torch.save")
    print(f"loaded model (SparseQuantLinear layers) gives the same predictions: "
          f"{'yes' if result.same_predictions else 'NO'}")
    if plots and result.snapshots:
        stem = out.with_suffix("")
        layer, stages = next(iter(result.snapshots.items()))
        paths = [
            dcx_plots.weight_distribution(f"{stem}-weights.png", stages, result.centroids.get(layer),
                                          title=f"{model_name} {layer}: weights through the stages"),
            dcx_plots.accuracy_vs_size(f"{stem}-accuracy-size.png",
                                       [{"stage": s.stage, "size_bytes": s.size_bytes,
                                         "accuracy": s.accuracy} for s in result.stages],
                                       title=f"{model_name} on {data_name}"),
        ]
        print("plots: " + ", ".join(str(p) for p in paths))
    print(f"total time {time.perf_counter() - started:.1f} s")
    return result


def cmd_demo(args):
    from dcx.config import CompressionConfig

    config = CompressionConfig.from_dict({
        "prune": {"sparsity": 0.9, "schedule": "iterative", "iterations": 3, "frequency": 3,
                  "overrides": {"fc3": {"sparsity": 0.7}}},
        "cluster": {"linear_bits": 5},
        "train": {"epochs": 30, "lr": 0.1, "momentum": 0.9, "batch_size": 64},
        "retrain": {"epochs": 20, "lr": 0.05, "momentum": 0.9, "batch_size": 64},
        "finetune": {"epochs": 5, "lr": 0.002, "momentum": 0.9, "batch_size": 64},
        "random_seed": args.seed,
    })
    out = Path(args.out) / "demo.dcx"
    result = run_pipeline(config, "lenet300", "digits", out, progress=not args.quiet)
    return EXIT_OK if result.same_predictions else EXIT_FAILED


def cmd_compress(args):
    from dcx.config import CompressionConfig

    config = CompressionConfig.load(args.config)
    result = run_pipeline(config, args.model, args.data, Path(args.out), plots=not args.no_plots,
                          progress=not args.quiet)
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    return EXIT_OK if result.same_predictions else EXIT_FAILED


def cmd_eval(args):
    import dcx
    from dcx.pipeline import evaluate_accuracy

    _, _, test_x, test_y, data_name = load_data(args.data)
    model = dcx.load(args.file, build_model(args.model, tuple(test_x.shape[1:])))
    from dcx.data import loader

    accuracy = evaluate_accuracy(model, loader(test_x, test_y, 1000))
    print(f"{args.file}: {args.model} on {data_name} test: accuracy {100 * accuracy:.2f}% "
          f"(error {100 * (1 - accuracy):.2f}%)")
    return EXIT_OK


def cmd_report(args):
    from dcx.report import report

    result = report(args.file)
    print(result.to_json() if args.json else result.to_markdown() if args.markdown else result)
    return EXIT_OK


def cmd_verify(args):
    from dcx.format import verify

    info = verify(args.file)
    print(f"{args.file}: OK ({json.dumps(info, default=str)})")
    return EXIT_OK


def cmd_bench(args):
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if not folder.is_dir():
        raise UsageError("the benchmarks live in the dcx source tree; run `dcx bench` from an "
                         "editable install (pip install -e .) of a checkout")
    names = args.names or sorted(p.stem[len("bench_"):] for p in folder.glob("bench_*.py"))
    for name in names:
        script = folder / f"bench_{name}.py"
        if not script.is_file():
            raise UsageError(f"no benchmark {name!r} (have: "
                             f"{', '.join(p.stem[6:] for p in folder.glob('bench_*.py'))})")
        print(f"== {script.name}", flush=True)
        code = subprocess.call([sys.executable, str(script)])
        if code:
            return EXIT_FAILED
    return EXIT_OK


def parser():
    p = argparse.ArgumentParser(prog="dcx", description="Deep Compression for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="the whole pipeline on scikit-learn's digits (about a minute)")
    s.add_argument("--out", default="dcx-demo", help="folder for the file and plots (dcx-demo)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("compress", help="run a compression config on a model and data set")
    s.add_argument("--config", required=True, help="a .yaml or .json CompressionConfig")
    s.add_argument("--model", default="lenet300", choices=MODELS)
    s.add_argument("--data", help="'digits' or an MNIST folder (default: $DCX_MNIST or digits)")
    s.add_argument("--out", default="model.dcx")
    s.add_argument("--json", help="also write the stage results as JSON here")
    s.add_argument("--no-plots", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_compress)

    s = sub.add_parser("eval", help="accuracy of a .dcx file loaded into its model")
    s.add_argument("file")
    s.add_argument("--model", default="lenet300", choices=MODELS)
    s.add_argument("--data")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("report", help="the per-layer compression table of a .dcx file")
    s.add_argument("file")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--markdown", action="store_true")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("verify", help="check a .dcx file completely")
    s.add_argument("file")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("bench", help="run the microbenchmarks (source checkout)")
    s.add_argument("names", nargs="*", help="e.g. masked_sgd spqmm (default: all)")
    s.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from dcx.config import ConfigError
    from dcx.format import FormatError

    try:
        return args.fn(args)
    except FormatError as error:
        print(f"dcx: corrupt or foreign file: {error}", file=sys.stderr)
        return EXIT_CORRUPT
    except FileNotFoundError as error:
        print(f"dcx: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, ConfigError) as error:
        print(f"dcx: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dcx: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
