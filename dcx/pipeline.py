"""DeepCompression: the three stages of Han et al. run as one object, the way a user meets them.

    dc = DeepCompression(model, config, train_loader=train, test_loader=test)
    result = dc.run("model.dcx")       # train -> prune + retrain -> cluster + fine-tune -> encode
    print(result.table())              # accuracy and real size after every stage

Every stage is evaluated, and its size is measured from real bytes: the reference and pruned
models as torch.save writes them (the pruned weights as CSR with int32 indices, what a user would
store without dcx), the quantized model by the file's own bit counts before Huffman coding (P+Q),
and the encoded model by the size of the .dcx file on disk. The file is then loaded back into a
fresh model (compressed layers become SparseQuantLinear / SparseQuantConv2d) and evaluated
again, and its predictions are compared with the in-memory model's.
"""

from __future__ import annotations

import copy
import functools
import io
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from dcx import io as dcx_io
from dcx import report as dcx_report
from dcx import state
from dcx.calibration import run_batch
from dcx.config import CompressionConfig, ConfigError, TrainConfig
from dcx.distill import Distillation, to_device
from dcx.encode import encode_
from dcx.optim import MaskedSGD
from dcx.prune import Pruner, masks
from dcx.quantize import cluster_, codebook_parameters, finalize_clustering_

__all__ = ["DeepCompression", "CompressionResult", "StageResult", "PipelineError",
           "seed_everything", "evaluate_accuracy", "state_dict_bytes"]


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def predictions(model: nn.Module, loader) -> torch.Tensor:
    """Arg-max class of every sample, in loader order."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device
    return torch.cat([model(x.to(device)).argmax(dim=1).cpu() for x, _ in loader])


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy of `model` over `loader`."""
    labels = torch.cat([y for _, y in loader])
    return (predictions(model, loader) == labels).float().mean().item()


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes torch.save writes for the model's state_dict."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@dataclass
class StageResult:
    stage: str
    accuracy: float
    size_bytes: int
    seconds: float
    note: str = ""


@dataclass
class CompressionResult:
    """What run() did: one StageResult per stage, the file, and its per-layer report."""

    stages: list = field(default_factory=list)
    path: Optional[Path] = None
    report: object = None
    same_predictions: Optional[bool] = None
    snapshots: dict = field(default_factory=dict)  # {weight name: {stage: weight copy}}
    centroids: dict = field(default_factory=dict)  # {weight name: fine-tuned codebook}

    def table(self) -> str:
        """The stage table as markdown (also readable in a terminal)."""
        base = self.stages[0].size_bytes if self.stages else 1
        lines = ["| stage | accuracy | error | size | ratio | time | note |", "|---|---|---|---|---|---|---|"]
        for s in self.stages:
            lines.append(
                f"| {s.stage} | {100 * s.accuracy:.2f}% | {100 * (1 - s.accuracy):.2f}% | "
                f"{s.size_bytes / 1024:,.1f} KiB | {base / s.size_bytes:.1f}x | {s.seconds:.1f} s | {s.note} |"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "stages": [asdict(s) for s in self.stages],
            "path": None if self.path is None else str(self.path),
            "same_predictions": self.same_predictions,
        }


class PipelineError(RuntimeError):
    """A stage failed while running (not a config error): `stage` names it, `result` holds the
    stages finished before it and, when the file was written, its path; the cause is chained."""

    def __init__(self, stage: str, result: CompressionResult, error: BaseException):
        written = f"; the file {result.path} was written" if result.path is not None else ""
        super().__init__(f"stage {stage!r} failed after {len(result.stages)} finished "
                         f"stage(s){written}: {type(error).__name__}: {error}")
        self.stage, self.result = stage, result


class DeepCompression:
    """Runs train -> prune + masked retrain -> cluster + centroid fine-tuning -> encode -> save,
    through the public stage verbs (Pruner, MaskedSGD, cluster_, finalize_clustering_, encode_,
    save, load) and nothing else.

    Sizes per stage, all of the .dcx container (header, manifest, codebooks and the tensors kept
    raw counted in each): pruned = P (fixed-width relative indices, fp32 values), quantized = P+Q
    (fixed-width codes and indices), encoded = P+Q+H (the Huffman-coded file on disk). The
    reference row is torch.save of the fp32 state_dict.

    model: any nn.Module (classification: logits of shape [batch, classes]).
    config: a CompressionConfig (or a dict / YAML path of one).
    train_loader, test_loader: iterables of (x, y) batches. loss_fn: defaults to cross-entropy.
    train_fn: optional fn(model, optimizer, epoch) running one training epoch, replacing the
    built-in loop over train_loader. eval_fn: optional fn(model) -> accuracy, replacing the
    built-in top-1 accuracy over test_loader.
    model_factory: builds a fresh model of the same architecture for loading the file (default:
    a deep copy of the input model taken before any stage runs).
    objective: a dcx.Distillation (or "distill": one from a copy of the model as it comes in):
    every retraining phase (masked retraining after pruning, centroid fine-tuning) then learns
    the teacher's outputs instead of labels, the loaders give inputs only (a tensor, tuple or
    dict per batch), and each stage's "accuracy" is the objective's metric over test_loader
    (embedding cosine or top-1 agreement with the teacher). A dense training phase has nothing
    to learn from then (config.train.epochs must be 0).
    """

    def __init__(self, model: nn.Module, config, *, train_loader=None, test_loader=None,
                 loss_fn: Callable = F.cross_entropy, train_fn: Optional[Callable] = None,
                 eval_fn: Optional[Callable] = None, model_factory: Optional[Callable] = None,
                 progress: bool = True, log: Optional[Callable] = None, snapshot: bool = False,
                 objective=None):
        if isinstance(config, (str, Path)):
            config = CompressionConfig.load(config)
        elif isinstance(config, dict):
            config = CompressionConfig.from_dict(config)
        if not isinstance(config, CompressionConfig):
            raise ConfigError(f"config must be a CompressionConfig, dict or path, got {type(config).__name__}")
        if objective == "distill":
            objective = Distillation(copy.deepcopy(model))
        if objective is not None and not isinstance(objective, Distillation):
            raise TypeError("objective must be a dcx.Distillation, \"distill\" or None, got "
                            f"{type(objective).__name__}")
        if objective is not None and config.train.epochs:
            raise ConfigError("train.epochs must be 0 with a distillation objective: the model "
                              "as it comes in is the teacher, there is nothing to train it to")
        self.objective = objective
        if train_fn is None and train_loader is None and _trains(config):
            raise ValueError("a training stage is configured: give train_loader or train_fn")
        if eval_fn is None and test_loader is None:
            raise ValueError("give test_loader or eval_fn to evaluate each stage")
        self.model = model
        self.config = config
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.loss_fn = loss_fn
        self.train_fn = train_fn
        self.eval_fn = eval_fn
        pristine = copy.deepcopy(model)
        self.model_factory = model_factory or (lambda: copy.deepcopy(pristine))
        self.progress = progress
        self.log = log or functools.partial(print, flush=True)  # stage lines show up in logs at once
        # For the distribution plots: copies of the largest weight after each stage.
        weights = [(p.numel(), n) for n, p in model.named_parameters() if p.dim() >= 2]
        self.snapshot_name = max(weights)[1] if snapshot and weights else None

    def _snapshot(self, result, stage, model):
        if self.snapshot_name is not None:
            module_name, _, param = self.snapshot_name.rpartition(".")
            weight = getattr(model.get_submodule(module_name), param)  # a Parameter, or rebuilt
            result.snapshots.setdefault(self.snapshot_name, {})[stage] = weight.detach().cpu().clone()

    # ----------------------------------------------------------------------------- helpers
    def evaluate(self, model: nn.Module) -> float:
        if self.eval_fn is not None:
            return self.eval_fn(model)
        if self.objective is not None:
            scores = self._metrics(model, self.objective)
            return sum(scores) / max(len(scores), 1)
        return evaluate_accuracy(model, self.test_loader)

    @torch.no_grad()
    def _metrics(self, model: nn.Module, objective: Distillation) -> list[float]:
        """The objective's metric on each of test_loader's batches (inputs only)."""
        model.eval()
        device = next(model.parameters()).device
        scores = []
        for batch in self.test_loader:
            batch = to_device(batch, device)
            scores.append(objective.metric(run_batch(model, batch),
                                           objective.teacher_outputs(batch), batch))
        return scores

    def _epoch(self, model, optimizer, epoch, desc):
        if self.train_fn is not None:
            return self.train_fn(model, optimizer, epoch)
        model.train()
        device = next(model.parameters()).device
        # disable=None: bars on a terminal only, not in logs.
        batches = tqdm(self.train_loader, desc=desc, leave=False, disable=None if self.progress else True)
        for item in batches:
            optimizer.zero_grad(set_to_none=True)
            if self.objective is not None:  # inputs only: the teacher's outputs are the targets
                batch = to_device(item, device)
                loss = self.objective.loss(run_batch(model, batch),
                                           self.objective.teacher_outputs(batch), batch)
            else:
                x, y = item
                loss = self.loss_fn(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            batches.set_postfix(loss=f"{loss.item():.4f}", refresh=False)

    def _train(self, model, optimizer, cfg: TrainConfig, desc, before_epoch=None):
        scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
                     if cfg.cosine else None)
        for epoch in range(cfg.epochs):
            if before_epoch is not None:
                before_epoch(epoch)
            self._epoch(model, optimizer, epoch, f"{desc} {epoch + 1}/{cfg.epochs}")
            if scheduler is not None:
                scheduler.step()

    def _stage(self, result, name, model, started, size, note=""):
        stage = StageResult(name, self.evaluate(model), size, time.perf_counter() - started, note)
        result.stages.append(stage)
        self.log(f"[dcx] {name:<10} accuracy {100 * stage.accuracy:6.2f}%  size {size / 1024:10,.1f} KiB"
                 f"  ({stage.seconds:.1f} s) {note}")
        return stage

    def _fixed_width_bytes(self, model) -> int:
        """The .dcx container of the model as it is now, with fixed-width codes and indices."""
        encode_(model, self.config.encode)
        return dcx_report.report(dcx_io.encode(model, self.config)).file_bytes_pq

    # ------------------------------------------------------------------------------- run
    def run(self, path) -> CompressionResult:
        """Every stage in order; the file at `path`. A stage that fails raises PipelineError
        with what was done before it (ConfigError stays itself: nothing ran wrong)."""
        result = CompressionResult()
        self._current = "train"
        try:
            return self._run(path, result)
        except (ConfigError, KeyboardInterrupt):
            raise
        except Exception as error:
            raise PipelineError(self._current, result, error) from error

    def _run(self, path, result: CompressionResult) -> CompressionResult:
        cfg = self.config
        seed_everything(cfg.random_seed)
        model = self.model

        started = time.perf_counter()
        if cfg.train.epochs:
            t = cfg.train
            optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                                        weight_decay=t.weight_decay)
            self._train(model, optimizer, t, "train")
        self._stage(result, "reference", model, started, state_dict_bytes(model),
                    "fp32, torch.save")
        self._snapshot(result, "dense", model)

        if cfg.prune is not None:
            self._current = "pruned"
            started = time.perf_counter()
            self._prune(model)
            pruned = list(masks(model).values())
            kept = sum(int(m.sum()) for m in pruned) / max(sum(m.numel() for m in pruned), 1)
            self._stage(result, "pruned", model, started, self._fixed_width_bytes(model),
                        f"{100 * kept:.1f}% of pruned layers' weights kept; P: .dcx with "
                        "fixed-width indices, fp32 values")
            self._snapshot(result, "pruned", model)

        if cfg.cluster is not None:
            self._current = "quantized"
            started = time.perf_counter()
            self._cluster(model)
            self._stage(result, "quantized", model, started, self._fixed_width_bytes(model),
                        "P+Q: .dcx with fixed-width codes and indices, before Huffman")
            self._snapshot(result, "clustered", model)
            if self.snapshot_name in state.layers(model):
                result.centroids[self.snapshot_name] = \
                    state.layers(model)[self.snapshot_name].codebook.detach().cpu().clone()

        self._current = "encoded"
        started = time.perf_counter()
        path = Path(path)
        encode_(model, cfg.encode)
        dcx_io.save(model, path, cfg)
        result.path = path
        loaded = dcx_io.load(path, self.model_factory())
        self._stage(result, "encoded", loaded, started, path.stat().st_size,
                    "P+Q+H: the .dcx file on disk, loaded back")
        if self.test_loader is not None and self.objective is not None:
            # The file against the model in memory: the objective's metric between the two.
            check = Distillation(model, kind=self.objective.kind)
            result.same_predictions = all(score > 0.9999 for score in self._metrics(loaded, check))
        elif self.test_loader is not None:
            result.same_predictions = bool(torch.equal(predictions(model, self.test_loader),
                                                       predictions(loaded, self.test_loader)))
        result.report = dcx_report.report(path, self.model_factory())
        return result

    def _prune(self, model):
        cfg = self.config
        pruner = Pruner(model, cfg.prune)
        if cfg.retrain.epochs <= pruner.final_step:
            raise ConfigError(f"retrain.epochs ({cfg.retrain.epochs}) must exceed the pruning "
                              f"schedule's last step ({pruner.final_step}), so every pruning "
                              "step is retrained")
        t = cfg.retrain
        optimizer = MaskedSGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                              weight_decay=t.weight_decay)
        self._train(model, optimizer, t, "prune+retrain", before_epoch=lambda epoch: pruner.step())
        pruner.finalize()

    def _cluster(self, model):
        """Weight sharing, then centroid fine-tuning (only the centroids move, as in the paper:
        every other parameter is frozen meanwhile), then the shared weights are finalized."""
        cfg = self.config
        cluster_(model, cfg.cluster)
        t = cfg.finetune
        if t.epochs:
            centroids = codebook_parameters(model)
            chosen = {id(c) for c in centroids}
            others = [p for p in model.parameters() if id(p) not in chosen and p.requires_grad]
            for p in others:
                p.requires_grad_(False)
            optimizer = torch.optim.SGD(centroids, lr=t.lr, momentum=t.momentum,
                                        weight_decay=t.weight_decay)
            self._train(model, optimizer, t, "fine-tune centroids")
            for p in others:
                p.requires_grad_(True)
        finalize_clustering_(model)


def _trains(config: CompressionConfig) -> bool:
    return bool(config.train.epochs or (config.prune and config.retrain.epochs)
                or (config.cluster and config.finetune.epochs))
