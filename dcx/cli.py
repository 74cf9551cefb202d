"""The `dcx` command.

    dcx demo [--out DIR]                          the whole pipeline on the bundled digits
    dcx compress --config CFG [--model M] [--data D] [--out FILE]
    dcx convert SRC --bits B [--sparsity S | --ratio R] [--overrides O.yaml] [--no-embeddings]
                [--scale S] [--compute MODE] [--corpus PATH ...] [--distill BUDGET] --out FILE
    dcx eval FILE [--model M] [--data D]          accuracy of a .dcx file loaded into the model
    dcx report FILE [--json | --markdown]         the per-layer compression table
    dcx verify FILE                               check every checksum and decode everything
    dcx export FILE --out model.safetensors       the decoded weights, for tools without dcx
    dcx bench [NAME ...]                          the microbenchmarks (from a source checkout)

Models (--model): lenet300, lenet5, or package.module:factory (a callable returning the
nn.Module; the current folder is importable). Data (--data): digits (bundled, no download), a
folder of MNIST IDX files (or $DCX_MNIST), or package.module:loaders (a callable returning
(train_loader, test_loader)). convert's SRC: a transformers model folder (config.json + weights,
loaded offline) or package.module:factory with --weights (.safetensors, or .pt loaded with
weights_only=True).
Exit codes: 0 success, 1 a failure while running, 2 bad usage, config or data (or a missing
optional package: the message names the extra to install), 3 a corrupt or foreign .dcx file.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Mapping
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CORRUPT = 0, 1, 2, 3
MODELS = ("lenet300", "lenet5")
# dcx.nn.COMPUTE_MODES, spelt out so that `dcx --help` imports no torch (a test keeps them equal)
COMPUTE_MODES = ("auto", "float32", "bfloat16", "int8")
CONVERT_METHODS = ("auto", "plain", "gptq", "weighted")  # dcx.config.CONVERT_METHODS, likewise


class UsageError(Exception):
    """Bad arguments, config or data: exit code 2."""


def resolve(spec: str, what: str):
    """The object that 'package.module:name' names (name may be dotted), imported with the
    current folder on sys.path, as `python -m` would."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} {spec!r} must be 'package.module:name'")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"cannot import {module_name!r} for {what} {spec!r}: {error}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"{what} {spec!r}: {module_name} has no {attr!r}") from None
    if not callable(obj):
        raise UsageError(f"{what} {spec!r} is not callable")
    return obj


def load_weights(model, path):
    """Fill `model` from a state_dict file: .safetensors, or .pt / .pth / .bin through
    torch.load(weights_only=True) (no code runs)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from dcx.hf import require

        state = require("safetensors.torch").load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # unpickling refused or a corrupt file
            raise UsageError(f"cannot read weights {str(path)!r}: {error}") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{str(path)!r} does not hold a state_dict (a mapping of names to tensors)")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise UsageError(f"the weights in {str(path)!r} do not fit the model: {error}") from None


def build_model(name: str, sample_shape=None, weights=None):
    """A fresh model: lenet300 / lenet5 for inputs of `sample_shape` ([C, H, W]), or the
    nn.Module a package.module:factory returns; `weights` (a state_dict file) loaded into it."""
    from torch import nn

    from dcx.models import LeNet5, LeNet300100

    if ":" in name:
        model = resolve(name, "model")()
        if not isinstance(model, nn.Module):
            raise UsageError(f"model {name!r} returned {type(model).__name__}, not an nn.Module")
        if weights is not None:
            load_weights(model, weights)
        return model
    if weights is not None:
        raise UsageError("--weights fills a package.module:factory model; lenet300 and lenet5 "
                         "are built fresh")
    if name == "lenet300":
        features = 1
        for d in sample_shape:
            features *= d
        return LeNet300100(in_features=features)
    if name == "lenet5":
        if tuple(sample_shape[-2:]) != (28, 28):
            raise UsageError(f"lenet5 needs 28x28 images (MNIST), the data has {tuple(sample_shape)}")
        return LeNet5(in_channels=sample_shape[0])
    raise UsageError(f"unknown model {name!r}; choose one of {', '.join(MODELS)} or give "
                     "package.module:factory")


def make_loaders(spec: str | None, batch_size: int, seed: int):
    """(train_loader, test_loader, name, sample shape) from 'digits', an MNIST folder, or a
    package.module:loaders callable."""
    if spec and ":" in spec and not Path(spec).exists():
        loaders = resolve(spec, "data")()
        if not (isinstance(loaders, (tuple, list)) and len(loaders) == 2):
            raise UsageError(f"data {spec!r} must return (train_loader, test_loader)")
        train, test = loaders
        try:
            sample = next(iter(test))[0]
        except (StopIteration, TypeError, IndexError):
            raise UsageError(f"data {spec!r}: the test loader must yield (x, y) batches") from None
        return train, test, spec, tuple(sample.shape[1:])
    train_x, train_y, test_x, test_y, name = load_data(spec)
    train, test = _loaders(train_x, train_y, test_x, test_y, batch_size, seed)
    return train, test, name, tuple(train_x.shape[1:])


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

    train, test, data_name, sample_shape = make_loaders(data_spec, config.train.batch_size,
                                                        config.random_seed)
    seed_everything(config.random_seed)
    model = build_model(model_name, sample_shape)
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
    from dcx.pipeline import PipelineError

    config = CompressionConfig.load(args.config)
    try:
        result = run_pipeline(config, args.model, args.data, Path(args.out),
                              plots=not args.no_plots, progress=not args.quiet)
    except PipelineError as error:  # what was done, then the error with its traceback
        if error.result.stages:
            print(f"\n{args.model}: the stages finished before {error.stage!r} failed\n")
            print(error.result.table())
        if error.result.path is not None:
            print(f"\nfile written: {error.result.path} "
                  f"({error.result.path.stat().st_size:,} bytes)")
        traceback.print_exception(error.__cause__, file=sys.stderr)
        print(f"dcx: {error}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2))
    return EXIT_OK if result.same_predictions else EXIT_FAILED


def cmd_eval(args):
    import dcx
    from dcx.pipeline import evaluate_accuracy

    _, test, data_name, sample_shape = make_loaders(args.data, 1000, 0)
    model = dcx.load(args.file, build_model(args.model, sample_shape))
    accuracy = evaluate_accuracy(model, test)
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


def load_overrides(path):
    """{pattern: {"bits": b, "sparsity": s} or None} from a .yaml or .json file."""
    from dcx.config import ConfigError

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"overrides file {str(path)!r} does not exist")
    try:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            import yaml

            data = yaml.safe_load(path.read_text())
    except Exception as error:  # json's ValueError, yaml.YAMLError
        raise ConfigError(f"cannot parse {str(path)!r}: {error}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{str(path)!r} must hold a mapping of layer patterns to settings")
    return dict(data)


def convert_source(src: str, weights):
    """(model, bytes of its weights on disk, what they are, manifest extra) of convert's SRC."""
    from dcx import hf

    path = Path(src)
    if path.is_dir():
        if weights is not None:
            raise UsageError("--weights fills a package.module:factory model; a model folder "
                             "holds its own weights")
        model = hf.load_folder(path)
        files = [f for f in path.iterdir() if f.suffix in (".safetensors", ".bin")]
        return model, sum(f.stat().st_size for f in files), ", ".join(f.name for f in files), \
            hf.manifest_extra(model)
    if ":" in src and not path.exists():
        model = build_model(src, weights=weights)
        size = Path(weights).stat().st_size if weights else 0
        return model, size, str(weights) if weights else "", hf.manifest_extra(model)
    raise UsageError(f"{src!r} is neither a model folder (config.json + weights) nor "
                     "package.module:factory")


def calibration_batches(sources: list[str], src: str, samples: int, image_size: int) -> list:
    """convert's --calibration: a folder of images (SRC's own image processor when SRC is a
    transformers folder with one, else resized to image_size, centre-cropped and normalised as
    ImageNet models expect), text files (sentences tokenized by SRC's tokenizer, SRC a
    transformers folder) or one package.module:inputs callable."""
    from dcx import data, hf

    if samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    if len(sources) == 1 and ":" in sources[0] and not Path(sources[0]).exists():
        batches = list(resolve(sources[0], "--calibration")())
        if not batches:
            raise UsageError(f"--calibration {sources[0]} returned no batches")
        return batches
    if any(Path(p).is_dir() for p in sources):
        if len(sources) > 1:
            raise UsageError("--calibration takes one folder of images (or text files)")
        processor = None
        if (Path(src) / "preprocessor_config.json").is_file():
            transformers = hf.require("transformers")
            processor = transformers.AutoImageProcessor.from_pretrained(src, local_files_only=True)
        try:
            return data.image_batches(sources[0], samples, size=image_size, processor=processor)
        except ValueError as error:
            raise UsageError(f"--calibration: {error}") from None
    if not Path(src).is_dir():
        raise UsageError("--calibration text files need a transformers model folder (its "
                         "tokenizer); give a package.module:inputs callable for other models")
    try:
        sentences = data.read_sentences(sources, samples, seed=0)
    except ValueError as error:
        raise UsageError(f"--calibration: {error}") from None
    transformers = hf.require("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(src, local_files_only=True)
    return data.text_batches(tokenizer, sentences, batch_size=16)


def _scale_arg(text: str):
    """--scale: none, row or a group size, a power of two from 32 (dcx.config.is_scale's rule,
    spelt out so that parsing imports no torch)."""
    if text in ("none", "row"):
        return None if text == "none" else text
    size = int(text) if text.isdigit() else 0
    if size < 32 or size & (size - 1):
        raise argparse.ArgumentTypeError(f"expected none, row or a power of two from 32, got {text!r}")
    return size


def _budget_arg(text: str):
    """--distill: a step count per stage ("300") or a wall time for all the retraining ("90s",
    "30m", "1.5h") -> ("steps", int) or ("seconds", float)."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text.isdigit():
            budget = ("steps", int(text))
        elif text[-1:] in units:
            budget = ("seconds", float(text[:-1]) * units[text[-1]])
        else:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count (300) or a time (90s, 30m, "
                                         f"1.5h), got {text!r}") from None
    if not budget[1] > 0:
        raise argparse.ArgumentTypeError(f"the budget must be more than zero, got {text!r}")
    return budget


def start_distributed() -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1 in the environment): join the process group (gloo: the
    command's model lives on the CPU) and return (rank, world size); (0, 1) otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
        atexit.register(leave_distributed, wait=False)  # on the way out after an error
    return dist.get_rank(), dist.get_world_size()


def leave_distributed(wait: bool = True):
    """Leave the process group, if one was joined. With wait, first wait until every rank gets
    here: a rank whose work is done (the others wait while rank 0 writes the file) must not
    tear its gloo connections down under a peer still using them; that aborted a rank at exit
    ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def cmd_convert(args):
    import dcx
    from dcx.convert import sparsity_for_size
    from dcx.distributed import broadcast_model_
    from dcx.io import encode
    from dcx.plots import distillation_curves

    started = time.perf_counter()
    overrides = load_overrides(args.overrides) if args.overrides else None
    if args.ratio is not None and args.sparsity is not None:
        raise UsageError("give --sparsity or --ratio (which chooses the sparsity), not both")
    if args.ratio is not None and not args.ratio > 1:
        raise UsageError(f"--ratio must be more than 1, got {args.ratio}")
    if args.distill and not args.calibration:
        raise UsageError("--distill retrains from unlabeled inputs: give them with --corpus "
                         "(text files, a folder of images or package.module:inputs)")
    rank, ranks = start_distributed()
    quiet = args.quiet or rank != 0
    model, source_bytes, source, extra = convert_source(args.src, args.weights)
    model.eval()
    broadcast_model_(model)  # under torchrun: every rank starts from (and sizes) rank 0's
    config = dcx.ConvertConfig(sparsity=args.sparsity or 0.0, bits=args.bits,
                               overrides=overrides or {}, embeddings=args.embeddings,
                               compute=args.compute, method=args.method, scale=args.scale)
    fp32_bytes = 4 * sum(t.numel() for t in [*model.parameters(), *model.buffers()]
                         if t.is_floating_point())  # as dcx report counts them
    against = source_bytes or fp32_bytes
    if args.ratio is not None:
        try:
            sparsity, trial = sparsity_for_size(
                model, config, int(against / args.ratio), extra, progress=not quiet)
        except dcx.config.ConfigError as error:
            raise UsageError(f"--ratio {args.ratio:g}: {error}") from None
        config = dataclasses.replace(config, sparsity=sparsity)
        if rank == 0:
            print(f"--ratio {args.ratio:g}: sparsity {sparsity:.0%} (a plain trial compression "
                  f"wrote {trial:,} bytes, {against / trial:.1f}x)", flush=True)
    calibration = None
    if args.calibration:
        calibration = calibration_batches(args.calibration, args.src, args.samples,
                                          args.image_size)
    out = Path(args.out)
    if args.distill:
        kind, amount = args.distill
        stage_bytes = {}

        def sized(stage, m):
            if stage == "pruned" and rank == 0:
                stage_bytes[stage] = len(encode(m, config, extra))

        with warnings.catch_warnings():  # a pruned model with nothing shared yet is fine here
            warnings.filterwarnings("ignore", "no layer of the model holds compressed state")
            model, rows, stages = dcx.distill.convert_distilled_(
                model, config, calibration, steps=amount if kind == "steps" else None,
                seconds=amount if kind == "seconds" else None, lr=args.lr,
                codebook_lr=args.codebook_lr, progress=not quiet, after_stage=sized)
    else:
        model, rows = dcx.convert_(model, config, progress=not quiet, calibration=calibration)
    if rank != 0:  # every rank holds the same model; rank 0 writes and reports
        leave_distributed()
        return EXIT_OK
    out.parent.mkdir(parents=True, exist_ok=True)
    dcx.save(model, out, config=config, extra=extra)  # the ConvertConfig in the manifest
    seconds = time.perf_counter() - started
    print(f"\n{args.src}: {len(rows)} layers with a weight of two or more dimensions\n")
    print(convert_table(rows))
    report = dcx.report.report(out)
    print(f"\nper-layer compression ({out}):\n")
    print(report)
    size = out.stat().st_size
    if args.distill:
        stage_bytes["shared"] = size
        print(f"\nretraining by distillation ({ranks} process{'es' if ranks > 1 else ''}):\n")
        print(distill_table(stages, against, stage_bytes))
        if not args.no_plots:
            curve = out.with_name(out.stem + "-distill.png")
            distillation_curves(curve, {"": stages.history}, stages.metric,
                                title=f"{out.name}: retraining by distillation")
            print(f"\nthe metric against the step: {curve}")
    if args.ratio is not None and size > against / args.ratio:
        print(f"\nnote: {against / size:.2f}x, short of --ratio {args.ratio:g}: calibration and "
              "retraining moved the codes' Huffman lengths from the trial's; a higher --ratio "
              "(or --sparsity) reaches it")
    versus = f"{source_bytes / size:.1f}x smaller than {source} ({source_bytes:,} bytes), " \
        if source_bytes else ""
    print(f"\nfile {out}: {size:,} bytes; {versus}{report.fp32_bytes / size:.1f}x smaller than "
          f"the fp32 parameters; {seconds:.1f} s")
    leave_distributed()
    return EXIT_OK


def distill_table(stages, source_bytes: int, stage_bytes: dict) -> str:
    """convert --distill's per-stage table: each stage's metric on the training batches (the
    first step, after the stage's change; the mean of the last 10, after its retraining) and
    the size of the file the model would write then."""
    lines = ["| stage | steps | minutes | metric before | metric after (last 10 steps) | "
             ".dcx bytes | ratio |", "|---|---|---|---|---|---|---|"]
    names = {"pruned": "pruned by magnitude, retrained",
             "shared": "shared (calibrated), codebooks retrained"}
    for stage, history in stages.history.items():
        last = history[-10:]
        size = stage_bytes.get(stage)
        lines.append(f"| {names.get(stage, stage)} | {len(history)} | "
                     f"{history[-1].seconds / 60:.1f} | {history[0].metric:.4f} | "
                     f"{sum(h.metric for h in last) / len(last):.4f} | "
                     f"{'' if size is None else f'{size:,}'} | "
                     f"{'' if size is None else f'{source_bytes / size:.1f}x'} |")
    return "\n".join(lines)


def convert_table(rows) -> str:
    """One line per layer: what convert did and, where it did not pack the layer, why."""
    lines = ["| layer | type | shape | done | bits | sparsity | why not packed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        bits = "" if r.bits is None else str(r.bits)
        lines.append(f"| {r.name} | {r.kind} | {'x'.join(map(str, r.shape))} | {r.action} | "
                     f"{bits} | {100 * r.sparsity:.0f}% | {r.reason} |")
    dense = [r for r in rows if r.action == "dense"]
    lines.append(f"\n{sum(r.action == 'packed' for r in rows)} packed, "
                 f"{sum(r.action == 'shared' for r in rows)} shared with their decoded weight, "
                 f"{len(dense)} left dense")
    return "\n".join(lines)


def cmd_export(args):
    import dcx
    from dcx import format as fmt
    from dcx.hf import require

    safetensors = require("safetensors.torch")
    tensors = {name: t.contiguous() for name, t in dcx.load_state_dict(args.file).items()}
    data = safetensors.save(tensors, metadata={"producer": "dcx export",
                                               "source": os.path.basename(args.file)})
    fmt.write_atomic(args.out, data)
    print(f"{args.out}: {len(tensors)} tensors, {len(data):,} bytes (decoded from {args.file})")
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

    s = sub.add_parser("demo", help="the whole pipeline on the bundled digits (about a minute)")
    s.add_argument("--out", default="dcx-demo", help="folder for the file and plots (dcx-demo)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("compress", help="run a compression config on a model and data set")
    s.add_argument("--config", required=True, help="a .yaml or .json CompressionConfig")
    s.add_argument("--model", default="lenet300",
                   help="lenet300, lenet5 or package.module:factory (default lenet300)")
    s.add_argument("--data", help="'digits', an MNIST folder or package.module:loaders "
                                  "(default: $DCX_MNIST or digits)")
    s.add_argument("--out", default="model.dcx")
    s.add_argument("--json", help="also write the stage results as JSON here")
    s.add_argument("--no-plots", action="store_true")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=cmd_compress)

    s = sub.add_parser("eval", help="accuracy of a .dcx file loaded into its model")
    s.add_argument("file")
    s.add_argument("--model", default="lenet300",
                   help="lenet300, lenet5 or package.module:factory")
    s.add_argument("--data", help="'digits', an MNIST folder or package.module:loaders")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("convert", help="post-training compression of a transformers folder or "
                                       "any model into a .dcx file")
    s.add_argument("src", help="a transformers model folder, or package.module:factory")
    s.add_argument("--weights", help="a state_dict (.safetensors or .pt) for a factory model")
    s.add_argument("--bits", type=int, required=True, help="codebook bits per layer (1 to 8)")
    s.add_argument("--sparsity", type=float, default=None,
                   help="fraction pruned by magnitude first (default 0: sharing only)")
    s.add_argument("--ratio", type=float, default=None,
                   help="instead of --sparsity: the smallest sparsity (whole percent) at which "
                        "the file is RATIO times smaller than the source weights (the fp32 "
                        "parameters for a factory model without --weights), found by trial "
                        "compressions; --bits, --scale and overrides as given")
    s.add_argument("--overrides", help="a .yaml or .json file: {layer pattern: {bits: b, "
                                       "sparsity: s} or null}, patterns as in dcx.config")
    s.add_argument("--embeddings", action=argparse.BooleanOptionalAction, default=True,
                   help="compress nn.Embedding tables too (default: yes)")
    s.add_argument("--compute", default="auto", choices=COMPUTE_MODES,
                   help="what the packed layers compute in once loaded (each layer's mode is "
                        "recorded in the file; default auto: the activations' dtype)")
    s.add_argument("--calibration", "--corpus", nargs="+", metavar="PATH", dest="calibration",
                   help="unlabeled inputs for calibrated compression and --distill's "
                        "retraining: text files (split into sentences, tokenized by the model "
                        "folder's tokenizer), a folder of images, or package.module:inputs (a "
                        "callable returning an iterable of batches)")
    s.add_argument("--samples", type=int, default=256,
                   help="calibration sentences or images drawn from --calibration (default "
                        "256; a package.module:inputs source gives its own batches)")
    s.add_argument("--image-size", type=int, default=224,
                   help="calibration images: shorter side resized to this, centre-cropped to a "
                        "square, normalised with ImageNet's mean and std (default 224; a model "
                        "folder with its own image processor uses that instead)")
    s.add_argument("--method", default="auto", choices=CONVERT_METHODS,
                   help="auto: gptq with --calibration, else plain (magnitude pruning, k-means); "
                        "gptq: second-order pruning and codebook assignment with error feedback; "
                        "weighted: input-norm pruning and activation-weighted k-means (faster, "
                        "no error feedback)")
    s.add_argument("--scale", default=None, type=_scale_arg, metavar="{none,row,SIZE}",
                   help="row: one float16 scale per output row on the shared codebook; SIZE (a "
                        "power of two from 32, e.g. 128): one per row and group of SIZE input "
                        "columns (every compressed layer; default none)")
    s.add_argument("--distill", type=_budget_arg, metavar="BUDGET",
                   help="retrain by distillation from the model as it came in, on the --corpus "
                        "inputs, after magnitude pruning (when --sparsity, --ratio or overrides "
                        "prune) and again after sharing (the codebooks, biases and norms): "
                        "BUDGET is the steps of each stage (300) or a wall time for both (30m, "
                        "1.5h, 90s; shared equally). Runs under torchrun, each process on its "
                        "share of the batches (dcx.distill.convert_distilled_)")
    s.add_argument("--lr", type=float, default=1e-4,
                   help="--distill's peak learning rate (weights, biases, norms; default 1e-4)")
    s.add_argument("--codebook-lr", type=float, default=1e-3,
                   help="--distill's codebook rate, times each codebook's spread (default 1e-3)")
    s.add_argument("--out", required=True, help="the .dcx file to write")
    s.add_argument("--no-plots", action="store_true",
                   help="no OUT-distill.png (--distill's metric against the step)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("export", help="the decoded weights of a .dcx file as safetensors")
    s.add_argument("file")
    s.add_argument("--out", required=True, help="the .safetensors file to write")
    s.set_defaults(fn=cmd_export)

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
    from dcx.calibration import CalibrationError
    from dcx.config import ConfigError
    from dcx.format import FormatError
    from dcx.hf import MissingDependency

    try:
        return args.fn(args)
    except FormatError as error:
        print(f"dcx: corrupt or foreign file: {error}", file=sys.stderr)
        return EXIT_CORRUPT
    except MissingDependency as error:
        print(f"dcx: {error}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as error:
        print(f"dcx: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (UsageError, ConfigError, CalibrationError) as error:
        print(f"dcx: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("dcx: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
