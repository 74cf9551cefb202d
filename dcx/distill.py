"""Retraining without labels: the compressed model (the student) learns to reproduce the outputs
of the model as it came in (the teacher) on unlabeled inputs.

    teacher = copy.deepcopy(model).eval()
    dcx.prune_(model, dcx.PruneConfig(sparsity=0.5))
    history = dcx.distill_(model, dcx.Distillation(teacher), batches, steps=200, lr=1e-4)

    # or all of it: prune -> retrain -> calibrated sharing -> retrain codebooks -> pack
    model, rows, stages = dcx.distill.convert_distilled_(model, dcx.ConvertConfig(bits=4,
                                                         sparsity=0.5), batches, steps=300)

`Distillation` is the objective: from the outputs it tells what kind of model it has and takes
the loss the literature uses for it, or a user's `loss(student_out, teacher_out, batch)`:

- hidden states (an encoder's `last_hidden_state`, e.g. a sentence-embedding model): mean
  squared error of the hidden states over the real tokens, relative to the teacher's mean
  square (TinyBERT's hidden-state loss), plus 1 - cosine of the mean-pooled embeddings
  (sentence-transformers' embedding distillation); metric: mean cosine of the embeddings.
- logits (a classifier's [batch, classes], a language model's [batch, tokens, vocab]): the KL
  divergence of the student's softened distribution from the teacher's, times T^2 (Hinton et
  al.); metric: top-1 agreement with the teacher.

`distill_` runs the steps: a MaskedAdamW over every trainable parameter (pruned weights and
their moments stay exactly zero; a weight-shared layer trains its codebook), the batches
cycled, stopped by a step count or a time budget, with a progress bar that shows the running
loss and metric. Batches are inputs only (a dict of keyword arguments, a tuple of arguments or
one tensor), as for dcx.calibrate.

Under torch.distributed (torchrun; gloo on CPU, nccl on GPU) every rank runs the same code on
its own share of the batches (rank r takes batches r, r + world, ...): the model starts from
rank 0's parameters and buffers, the gradients are averaged across ranks before each step,
and rank 0's clock decides the learning rate and the end of a time budget, so every rank
takes the same steps and ends with the same model.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dcx.calibration import run_batch
from dcx.distributed import broadcast_model_, world
from dcx.optim import MaskedAdamW

__all__ = ["Distillation", "DistillStep", "DistilledStages", "convert_distilled_", "distill_",
           "parameter_groups", "trainable_parameters"]

KINDS = ("auto", "hidden", "logits")


def _field(output: Any, name: str) -> Optional[Tensor]:
    """output.<name> or output[name] of a transformers ModelOutput or dict (None: absent)."""
    value = getattr(output, name, None)
    if value is None and isinstance(output, dict):
        value = output.get(name)
    return value if isinstance(value, Tensor) else None


def _tensor(output: Any) -> Optional[Tensor]:
    """The output itself when it is a tensor, or the first tensor of a tuple or list."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _token_mask(batch: Any, like: Tensor) -> Tensor:
    """[batch, tokens, 1] float: the batch's attention mask when it has one, else all ones."""
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is None or tuple(mask.shape) != tuple(like.shape[:2]):
        return torch.ones(like.shape[:2] + (1,), dtype=like.dtype, device=like.device)
    return mask.to(device=like.device, dtype=like.dtype).unsqueeze(-1)


def mean_pooled(hidden: Tensor, batch: Any) -> Tensor:
    """Mean of the hidden states over the real tokens ([batch, tokens, dim] -> [batch, dim])."""
    mask = _token_mask(batch, hidden)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class Distillation:
    """The distillation objective: `loss(student_out, teacher_out, batch)` and
    `metric(student_out, teacher_out, batch)` (higher is better, named by `metric_name`).

    teacher: the model whose outputs the student learns (put in eval mode; run without
    gradients). kind: "auto" (from the outputs: `last_hidden_state` -> hidden, `logits` or a tensor
    -> logits), "hidden" or "logits". loss: a user's fn(student_out, teacher_out, batch) -> scalar
    tensor, replacing the built-in loss (the metric stays the kind's). temperature: the logits'
    softening. pooled_weight: the weight of the embedding-cosine term beside the hidden-state MSE.
    """

    def __init__(self, teacher: nn.Module, kind: str = "auto",
                 loss: Optional[Callable] = None, temperature: float = 1.0,
                 pooled_weight: float = 1.0):
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if loss is not None and not callable(loss):
            raise TypeError("loss must be a callable loss(student_out, teacher_out, batch)")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.teacher = teacher.eval()  # its outputs are taken under no_grad
        self.kind, self.user_loss = kind, loss
        self.seen = None  # the kind of output last distilled from ("hidden" or "logits")
        self.temperature, self.pooled_weight = float(temperature), float(pooled_weight)

    @torch.no_grad()
    def teacher_outputs(self, batch: Any) -> Any:
        return run_batch(self.teacher, batch)

    def _output(self, output: Any) -> tuple[str, Optional[Tensor]]:
        """(kind, tensor) of one model's output as this objective reads it."""
        if self.kind in ("auto", "hidden"):
            hidden = _field(output, "last_hidden_state")
            if hidden is not None:
                return "hidden", hidden
        if self.kind in ("auto", "logits"):
            logits = _field(output, "logits")
            if logits is not None:
                return "logits", logits
        return ("logits" if self.kind == "auto" else self.kind), _tensor(output)

    def _pick(self, student_out: Any, teacher_out: Any) -> tuple[str, Tensor, Tensor]:
        kind, s = self._output(student_out)
        _, t = self._output(teacher_out)
        if s is None or t is None:
            raise ValueError(f"cannot distill from these outputs ({type(student_out).__name__}): "
                             "expected last_hidden_state, logits or a tensor; give kind= or loss=")
        self.seen = kind
        if s.shape != t.shape:
            raise ValueError(f"the student's {kind} have shape {tuple(s.shape)} but the teacher's "
                             f"{tuple(t.shape)}: the teacher must be the same kind of model on "
                             "the same inputs")
        return kind, s, t

    def kind_of(self, student_out: Any, teacher_out: Any) -> str:
        return self._pick(student_out, teacher_out)[0]

    def loss(self, student_out: Any, teacher_out: Any, batch: Any) -> Tensor:
        if self.user_loss is not None:
            return self.user_loss(student_out, teacher_out, batch)
        kind, s, t = self._pick(student_out, teacher_out)
        s, t = s.float(), t.float()
        if kind == "hidden":
            mask = _token_mask(batch, t) if t.dim() == 3 else torch.ones_like(t[..., :1])
            tokens = mask.sum() * t.shape[-1]
            mse = ((s - t) ** 2 * mask).sum() / tokens
            scale = (t ** 2 * mask).sum() / tokens
            loss = mse / scale.clamp_min(1e-12)
            if self.pooled_weight and t.dim() == 3:
                cos = F.cosine_similarity(mean_pooled(s, batch), mean_pooled(t, batch), dim=-1)
                loss = loss + self.pooled_weight * (1 - cos).mean()
            return loss
        temp = self.temperature
        log_p = F.log_softmax(s / temp, dim=-1)
        log_q = F.log_softmax(t / temp, dim=-1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # per sample (and token)
        if kl.dim() == 2:  # [batch, tokens]: the real tokens only
            weights = _token_mask(batch, t)[..., 0]
            return (kl * weights).sum() / weights.sum().clamp_min(1.0) * temp * temp
        return kl.mean() * temp * temp

    @torch.no_grad()
    def metric(self, student_out: Any, teacher_out: Any, batch: Any) -> float:
        kind, s, t = self._pick(student_out, teacher_out)
        if kind == "hidden":
            if t.dim() == 3:
                s, t = mean_pooled(s.float(), batch), mean_pooled(t.float(), batch)
            return F.cosine_similarity(s.float(), t.float(), dim=-1).mean().item()
        agree = (s.argmax(-1) == t.argmax(-1)).float()
        if agree.dim() == 2:
            weights = _token_mask(batch, t)[..., 0]
            return ((agree * weights).sum() / weights.sum().clamp_min(1.0)).item()
        return agree.mean().item()

    def metric_name(self, student_out: Any, teacher_out: Any) -> str:
        return "cosine" if self.kind_of(student_out, teacher_out) == "hidden" else "agreement"

    @property
    def metric_label(self) -> str:
        """What the metric of the outputs distilled so far measures, in words."""
        return {"hidden": "embedding cosine to the teacher",
                "logits": "top-1 agreement with the teacher"}.get(self.seen, "metric")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What retraining moves: every parameter that requires grad. A weight-shared layer being
    fine-tuned (dcx.cluster_, live) holds its codebook as the Parameter and its weight as a
    tensor rebuilt from it, so its centroids train and its labels stay."""
    return [p for p in model.parameters() if p.requires_grad]


@dataclass
class DistillStep:
    """One step: its loss and metric (of its batch, before its update), the wall time since the
    start, and where the step's time went (teacher forward, student forward + loss, backward,
    optimizer step)."""
    step: int
    loss: float
    metric: float
    seconds: float
    teacher_s: float = 0.0
    forward_s: float = 0.0
    backward_s: float = 0.0
    optimizer_s: float = 0.0


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (a tensor, or a dict, tuple or list of them) on `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def parameter_groups(model: nn.Module, lr: float,
                     codebook_lr: Optional[float] = None) -> list[dict]:
    """The optimizer's parameter groups for retraining `model`: every trainable parameter at lr,
    except, with codebook_lr, each live codebook (a shared layer being fine-tuned) at codebook_lr
    times the standard deviation of its entries. Adam's step is about lr whatever a parameter's
    scale, and codebooks differ in scale by orders (an embedding's entries span about 0.1, a
    row- or group-scaled layer's, in units of its scales, about 6)."""
    params = trainable_parameters(model)
    if codebook_lr is None:
        return [{"params": params, "lr": lr}]
    from dcx.quantize import codebook_parameters

    codebooks = [c for c in codebook_parameters(model) if c.requires_grad]
    ids = {id(c) for c in codebooks}
    def spread(c: Tensor) -> float:
        c = c.detach().float()
        return float(c.std()) if c.numel() > 1 else float(c.abs().max().clamp_min(1e-12))

    groups = [{"params": [c], "lr": codebook_lr * spread(c)} for c in codebooks]
    rest = [p for p in params if id(p) not in ids]
    return groups + ([{"params": rest, "lr": lr}] if rest else [])


def _average_across_ranks(params: list, values: list[float], device) -> list[float]:
    """Average the gradients of `params` and the floats `values` over the ranks, in one
    all-reduce of a layout every rank shares (a gradient a rank lacks counts as zeros; a
    parameter no rank has a gradient for keeps none); returns the averaged values."""
    import torch.distributed as dist

    _, size = world()
    parts = [p.grad.reshape(-1).float() if p.grad is not None
             else torch.zeros(p.numel(), device=device) for p in params]
    has = [float(p.grad is not None) for p in params]
    flat = torch.cat(parts + [torch.tensor(has + values, dtype=torch.float32, device=device)])
    dist.all_reduce(flat)
    flat /= size
    total = sum(p.numel() for p in params)
    offset = 0
    for p, share in zip(params, flat[total:total + len(params)].tolist()):
        mean = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if share > 0:  # some rank had a gradient
            if p.grad is None:
                p.grad = mean.to(p.dtype).clone()
            else:
                p.grad.copy_(mean)
    return flat[total + len(params):].tolist()


def distill_(model: nn.Module, objective: Distillation | nn.Module, batches: Iterable,
             steps: Optional[int] = None, seconds: Optional[float] = None, lr: float = 1e-4,
             codebook_lr: Optional[float] = None, weight_decay: float = 0.0,
             optimizer: Optional[torch.optim.Optimizer] = None, warmup: int = 0,
             train_mode: bool = False, progress: bool = True,
             callback: Optional[Callable[[DistillStep], None]] = None) -> list[DistillStep]:
    """Retrain `model` in place to match `objective`'s teacher (a Distillation, or the teacher
    module itself for the default objective) on `batches` (inputs only; cycled), for `steps`
    steps and/or `seconds` of wall time (whichever ends first; at least one of them).

    optimizer: by default MaskedAdamW(parameter_groups(model, lr, codebook_lr), weight_decay),
    whose step keeps pruned weights and their moments at exactly zero (codebook_lr: each
    codebook's rate relative to its spread, see parameter_groups); after `warmup` linear steps
    the learning rate falls on a cosine to zero over the budget (the steps after the warm-up,
    or all the seconds, whichever runs out first).
    train_mode: run the student in training mode (dropout on, batch-norm statistics updated);
    off by default: the student learns a deterministic teacher, and batch-norm statistics from
    a few unlabeled batches would drift from the ones the model was trained with.
    callback: called with each DistillStep. Returns one DistillStep per step (the loss and the
    metric of that step's batch, measured before its update; under torch.distributed, their
    means over the ranks)."""
    if not isinstance(objective, Distillation):
        objective = Distillation(objective)
    if steps is None and seconds is None:
        raise ValueError("give steps or seconds (the retraining budget)")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    batches = list(batches)
    if not batches:
        raise ValueError("distillation: no batches (the corpus gave no inputs)")
    rank, size = world()
    if size > 1:
        if len(batches) < size:
            raise ValueError(f"distillation on {size} ranks needs at least {size} batches, got "
                             f"{len(batches)}")
        batches = batches[rank::size]
        broadcast_model_(model)
        broadcast_model_(objective.teacher)
    if optimizer is None:
        groups = parameter_groups(model, lr, codebook_lr)
        if not any(group["params"] for group in groups):
            raise ValueError("distillation: the model has no trainable parameters")
        optimizer = MaskedAdamW(groups, weight_decay=weight_decay)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def schedule(step: int, elapsed: float) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        done = 0.0
        if steps is not None:
            done = (step - warmup) / max(steps - warmup, 1)
        if seconds is not None:
            done = max(done, elapsed / seconds)
        return 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))

    device = next(model.parameters()).device
    history: list[DistillStep] = []
    was_training = model.training
    model.train(train_mode)
    started = time.perf_counter()
    elapsed = 0.0  # the clock every rank goes by: rank 0's, taken after each backward
    bar = tqdm(total=steps, desc="distill", unit="step", leave=False,
               disable=None if progress and rank == 0 else True)
    with bar:
        for step, batch in enumerate(itertools.cycle(batches)):
            if steps is not None and step >= steps:
                break
            if seconds is not None and elapsed >= seconds:
                break
            batch = to_device(batch, device)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * schedule(step, elapsed)
            t0 = time.perf_counter()
            teacher_out = objective.teacher_outputs(batch)
            t1 = time.perf_counter()
            student_out = run_batch(model, batch)
            loss = objective.loss(student_out, teacher_out, batch)
            metric = objective.metric(student_out, teacher_out, batch)
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            if torch.isfinite(loss):
                loss.backward()
            values = [loss.item(), metric, time.perf_counter() - started]
            if size > 1:  # rank 0's clock: the others add zeros, the mean is divided back
                values[2] *= size if rank == 0 else 0.0
                values = _average_across_ranks(params, values, device)
            if not math.isfinite(values[0]):  # after the average: every rank stops together
                raise FloatingPointError(f"distillation: the loss became {values[0]} at step "
                                         f"{step}; lower the learning rate")
            elapsed = values[2]
            t3 = time.perf_counter()
            optimizer.step()
            t4 = time.perf_counter()
            record = DistillStep(step, values[0], values[1], time.perf_counter() - started,
                                 t1 - t0, t2 - t1, t3 - t2, t4 - t3)
            history.append(record)
            if callback is not None:
                callback(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record.loss:.4f}", metric=f"{record.metric:.4f}",
                            refresh=False)
    model.train(was_training)
    for group, base in zip(optimizer.param_groups, base_lrs):
        group["lr"] = base
    return history


@dataclass
class DistilledStages:
    """What convert_distilled_ did: each retraining stage's DistillSteps ({"pruned": [...],
    "shared": [...]}; "pruned" absent when nothing was pruned), the seconds of each part and
    what the steps' metric measures (Distillation.metric_label)."""
    history: dict
    seconds: dict
    metric: str = "metric"


def convert_distilled_(model: nn.Module, config, corpus: Iterable,
                       calibration: Optional[Iterable] = None, steps: Optional[int] = 300,
                       shared_steps: Optional[int] = None, seconds: Optional[float] = None,
                       lr: float = 1e-4, codebook_lr: float = 1e-3, warmup: int = 10,
                       prune_rounds: int = 1,
                       objective: Optional[Distillation] = None, pack: bool = True,
                       progress: bool = True,
                       after_stage: Optional[Callable[[str, nn.Module], None]] = None):
    """convert_ with retraining, the paper's order on a model without labels, in place:

    1. the layers `config` prunes (dcx.convert.plan_convert: its sparsity and overrides) are
       pruned by magnitude, then retrained `steps` steps by distillation (distill_, lr); with
       prune_rounds > 1 the pruning is gradual instead (Zhu & Gupta's cubic ramp in that many
       rounds over the first half of the steps, retraining between them);
    2. convert_(config, calibration, pack=False) shares every layer (with calibration the
       second-order method; a pruned layer keeps its mask), then `shared_steps` (default:
       `steps`) more steps move the codebooks (codebook_lr, relative to each one's spread),
       biases and norms (lr);
    3. the codebooks are baked in and, with pack=True, the layers convert_ packs are packed.

    seconds: a wall-time budget for the retraining, with or without step counts, shared by the
    stages that run in proportion to their steps (equally without them); each stage ends at its
    steps or its share of the time, whichever comes first.
    corpus: unlabeled batches for retraining (read in turns); calibration: those for the
    statistics (default: the corpus). objective: default Distillation(a copy of the model as it
    came in). after_stage: called as after_stage("pruned", model) when the pruned layers'
    retraining ends and after_stage("shared", model) at the end (dcx convert sizes each stage's
    file so). Under torch.distributed every rank calls this with the same arguments (see
    distill_); the model ends the same on every rank. Returns (model, ConvertRows,
    DistilledStages)."""
    import copy

    from dcx.convert import convert_, pack_layers_, plan_convert
    from dcx.prune import PruneConfig, Pruner
    from dcx.quantize import finalize_clustering_

    corpus = list(corpus)
    if not corpus:
        raise ValueError("distillation: no batches (the corpus gave no inputs)")
    shared_steps = steps if shared_steps is None else shared_steps
    if steps is None and seconds is None:
        raise ValueError("give steps or seconds (the retraining budget)")
    for value in (steps, shared_steps):
        if value is not None and value < 1:
            raise ValueError(f"steps must be >= 1, got {steps} and {shared_steps}")
    if seconds is not None and not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if prune_rounds < 1 or (prune_rounds > 1 and steps is None):
        raise ValueError(f"prune_rounds must be >= 1 (more than 1 counts steps: give steps), "
                         f"got {prune_rounds} with steps={steps}")
    calibration = corpus if calibration is None else list(calibration)
    broadcast_model_(model)  # under torch.distributed: one start, so one default teacher
    objective = objective or Distillation(copy.deepcopy(model))
    stages, times = {}, {}
    plan = plan_convert(model, config)
    tied = set(plan.followers.values())
    pruned = {n: {"sparsity": v["sparsity"]} for n, v in plan.per_layer.items()
              if v["sparsity"] > 0 and n not in tied}
    budget = {"pruned": steps, "shared": shared_steps}
    if not pruned:
        del budget["pruned"]
    weights = {stage: n or 1 for stage, n in budget.items()}
    share = {stage: seconds * w / sum(weights.values()) if seconds else None
             for stage, w in weights.items()}
    started = time.perf_counter()
    if pruned:
        # Every rank prunes on the same step counts (the masks are broadcast from rank 0).
        pruner = Pruner(model, PruneConfig(
            sparsity=0.0, targets=list(pruned), overrides=pruned,
            schedule="gradual" if prune_rounds > 1 else "oneshot", start=0,
            frequency=max(1, (steps or 0) // (2 * prune_rounds)), iterations=prune_rounds))
        pruner.step()  # step 0: one-shot prunes it all (its later steps do nothing); a gradual
        # ramp starts at zero and prunes on the steps distill_'s callback counts
        stages["pruned"] = distill_(model, objective, corpus, steps=steps,
                                    seconds=share["pruned"], lr=lr, warmup=warmup,
                                    progress=progress, callback=lambda _: pruner.step())
        pruner.finalize()
        times["prune + retrain"] = time.perf_counter() - started
        if after_stage is not None:
            after_stage("pruned", model)
        started = time.perf_counter()
    model, rows = convert_(model, config, progress=progress, calibration=calibration, pack=False)
    times["share"] = time.perf_counter() - started
    started = time.perf_counter()
    stages["shared"] = distill_(model, objective, corpus, steps=shared_steps,
                                seconds=share["shared"], lr=lr, codebook_lr=codebook_lr,
                                warmup=warmup, progress=progress)
    times["retrain codebooks"] = time.perf_counter() - started
    finalize_clustering_(model)
    if pack:
        pack_layers_(model, names={r.name for r in rows if r.action == "packed"},
                     dense=config.dense, compute=config.compute)
    if after_stage is not None:
        after_stage("shared", model)
    return model, rows, DistilledStages(stages, times, objective.metric_label)
