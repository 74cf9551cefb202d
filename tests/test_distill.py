import copy

import pytest
import torch
from torch import nn

import dcx
from dcx import state
from dcx.distill import Distillation, distill_, trainable_parameters
from tests.test_calibration import SmallCNN, token_batches
from tests.testing import requires_kernels

pytestmark = requires_kernels


def images(count, seed, size=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 12, 12, generator=g) for _ in range(count)]


def mean_metric(objective, model, batches):
    with torch.no_grad():
        return sum(objective.metric(model(**b) if isinstance(b, dict) else model(b),
                                    objective.teacher_outputs(b), b) for b in batches) / len(batches)


def test_a_pruned_bert_recovers_its_embeddings_and_stays_pruned():
    """A tiny BertModel (weights drawn at 0.2, so that its encoder matters) pruned to 60%
    (magnitude) learns its own dense self back by hidden-state distillation: the mean embedding
    cosine on held-out inputs rises (0.83 -> 0.99), every pruned weight stays +0.0 and the
    pruned layers' masks are unchanged."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32, initializer_range=0.2)
    torch.manual_seed(0)
    teacher = transformers.BertModel(config).eval()
    linear = [f"{n}.weight" for n, m in teacher.named_modules() if isinstance(m, nn.Linear)]
    student = dcx.prune_(copy.deepcopy(teacher), dcx.PruneConfig(sparsity=0.6, targets=linear))
    masks = {n: m.clone() for n, m in dcx.prune.masks(student).items()}
    objective = Distillation(teacher)
    train, held_out = token_batches(8, 120, seed=1), token_batches(4, 120, seed=2)
    before = mean_metric(objective, student, held_out)
    history = distill_(student, objective, train, steps=40, lr=3e-3, progress=False)
    after = mean_metric(objective, student, held_out)
    assert len(history) == 40 and history[-1].loss < history[0].loss
    assert before < 0.9 and after > 0.97, (before, after)
    assert objective.metric_name(student(**held_out[0]), objective.teacher_outputs(held_out[0])) == "cosine"
    for name, mask in dcx.prune.masks(student).items():
        assert torch.equal(mask, masks[name])
        weight = student.get_parameter(name)
        assert (weight[~mask] == 0).all() and not torch.signbit(weight[~mask]).any()
    assert not student.training and all(p.grad is None for p in teacher.parameters())


def test_a_shared_cnn_fine_tunes_its_centroids_by_logits():
    """A small CNN shared at 2 bits: distillation on its logits (KL) moves the codebooks and
    the biases, never the labels, and the top-1 agreement with the teacher does not fall."""
    torch.manual_seed(0)
    teacher = SmallCNN().eval()
    student = copy.deepcopy(teacher)
    dcx.cluster_(student, dcx.ClusterConfig(conv_bits=2, linear_bits=2))
    labels = {n: st.labels.clone() for n, st in state.layers(student).items()}
    codebooks = {n: st.codebook.detach().clone() for n, st in state.layers(student).items()}
    objective = Distillation(teacher, temperature=2.0)
    train = images(6, seed=1)
    before = mean_metric(objective, student, train)
    history = distill_(student, objective, train, steps=30, lr=1e-2, progress=False)
    assert history[-1].loss < history[0].loss
    assert mean_metric(objective, student, train) >= before
    codebook_ids = {id(st.codebook) for st in state.layers(student).values()}
    assert codebook_ids <= {id(p) for p in trainable_parameters(student)}
    moved = 0
    for name, st in state.layers(student).items():
        assert torch.equal(st.labels, labels[name])
        moved += not torch.equal(st.codebook.detach(), codebooks[name])
    assert moved == len(codebooks)


def test_a_language_model_distills_over_real_tokens_only():
    """Token logits [batch, tokens, vocab]: the KL and the agreement count the attention mask's
    tokens only (padding changes neither), and a user's loss replaces the built-in one."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(config).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    objective = Distillation(teacher)
    batch = token_batches(1, 100, seed=5)[0]
    padded = {"input_ids": torch.cat([batch["input_ids"], torch.zeros(8, 4, dtype=torch.long)], 1),
              "attention_mask": torch.cat([batch["attention_mask"],
                                           torch.zeros(8, 4, dtype=torch.long)], 1)}
    with torch.no_grad():
        plain = objective.loss(student(**batch), teacher(**batch), batch)
        with_pad = objective.loss(student(**padded), teacher(**padded), padded)
        agree = objective.metric(student(**batch), teacher(**batch), batch)
        agree_pad = objective.metric(student(**padded), teacher(**padded), padded)
    torch.testing.assert_close(plain, with_pad, rtol=1e-5, atol=1e-7)
    assert agree == pytest.approx(agree_pad)
    calls = []

    def user_loss(s, t, b):
        calls.append(b)
        return ((s.logits - t.logits) ** 2).mean()

    history = distill_(student, Distillation(teacher, loss=user_loss), [batch], steps=3,
                       progress=False)
    assert len(calls) == 3 and history[-1].loss < history[0].loss


def test_a_time_budget_and_a_callback():
    teacher = SmallCNN().eval()
    student = copy.deepcopy(teacher)
    seen = []
    history = distill_(student, teacher, images(2, seed=3), seconds=0.5, lr=1e-3,
                       progress=False, callback=seen.append)
    assert history and seen == history and history[-1].seconds < 5


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=None), ValueError, "give steps or seconds"),
    (dict(steps=0), ValueError, "steps must be >= 1"),
    (dict(steps=None, seconds=0), ValueError, "seconds must be > 0"),
    (dict(batches=[]), ValueError, "no batches"),
    (dict(teacher=nn.Linear(3, 5)), ValueError, "but the teacher's"),
])
def test_bad_input(kwargs, error, match):
    teacher = nn.Linear(3, 4)
    student = copy.deepcopy(teacher)
    args = dict(batches=[torch.randn(2, 3)], steps=2, teacher=teacher) | kwargs
    with pytest.raises(error, match=match):
        distill_(student, args.pop("teacher"), args.pop("batches"), progress=False, **args)


def test_bad_objective_arguments():
    with pytest.raises(TypeError, match="teacher must be an nn.Module"):
        Distillation(lambda x: x)
    with pytest.raises(ValueError, match="kind must be one of"):
        Distillation(nn.Linear(2, 2), kind="cosine")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Distillation(nn.Linear(2, 2), temperature=0)
    with pytest.raises(ValueError, match="cannot distill from these outputs"):
        objective = Distillation(nn.Linear(2, 2))
        objective.loss({"pooler": 1}, {"pooler": 1}, None)


def test_convert_without_packing_then_distill_codebooks_then_pack(tmp_path):
    """convert_(pack=False) leaves the shared layers live; distill_ with codebook_lr gives each
    codebook its own rate (its spread times codebook_lr) and moves it; finalize + pack_layers_
    then make the layers convert_ would have packed, and the file round-trips."""
    torch.manual_seed(0)
    teacher = SmallCNN().eval()
    student = copy.deepcopy(teacher)
    config = dcx.ConvertConfig(bits=3, scale="row")
    _, rows = dcx.convert_(student, config, calibration=images(2, seed=4), pack=False)
    packed = {r.name for r in rows if r.action == "packed"}
    assert packed and all(state.get(student.get_submodule(n)).live for n in packed)
    groups = dcx.distill.parameter_groups(student, lr=1e-3, codebook_lr=1e-2)
    codebooks = dcx.quantize.codebook_parameters(student)
    for group, codebook in zip(groups, codebooks):
        assert group["params"] == [codebook]
        assert group["lr"] == pytest.approx(1e-2 * float(codebook.detach().std()))
    assert groups[-1]["lr"] == 1e-3 and len(groups) == len(codebooks) + 1
    before = [c.detach().clone() for c in codebooks]
    distill_(student, teacher, images(4, seed=5), steps=5, lr=1e-3, codebook_lr=1e-2,
             progress=False)
    assert all(not torch.equal(b, c.detach()) for b, c in zip(before, codebooks))
    dcx.finalize_clustering_(student)
    dcx.pack_layers_(student)
    assert {n for n, m in student.named_modules()
            if isinstance(m, (dcx.SparseQuantLinear, dcx.SparseQuantConv2d))} == packed
    dcx.save(student, tmp_path / "cnn.dcx")
    loaded = dcx.load(tmp_path / "cnn.dcx", SmallCNN())
    x = images(1, seed=6)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x), rtol=1e-4, atol=1e-5)


def test_convert_distilled_runs_the_stages_on_the_configs_layers():
    """convert_distilled_: the layers the config prunes (its overrides honoured) are pruned and
    retrained, then shared with calibration (which keeps their masks: test_calibration), then
    their codebooks retrained; every stage reported."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    config = dcx.ConvertConfig(bits=4, sparsity=0.5, overrides={"stem": {"sparsity": 0.0}})
    model, rows, stages = dcx.distill.convert_distilled_(model, config, images(3, seed=7),
                                                         steps=4, progress=False, pack=False)
    assert set(stages.history) == {"pruned", "shared"}
    assert all(len(h) == 4 for h in stages.history.values())
    assert set(stages.seconds) == {"prune + retrain", "share", "retrain codebooks"}
    kept = {n: st.mask for n, st in state.layers(model).items() if st.mask is not None}
    assert set(kept) == {"depthwise.weight", "pointwise.weight", "head.weight"}
    for mask in kept.values():
        assert abs(mask.float().mean().item() - 0.5) < 0.05
    assert all(r.action == "packed" or r.reason for r in rows)


def test_convert_distilled_on_a_time_budget_calls_back_after_each_stage():
    """A wall-time budget alone: both stages run, each within about its half, the caller hears
    of each stage's end, and the stages say what their metric measures."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    seen = []
    model, _, stages = dcx.distill.convert_distilled_(
        model, dcx.ConvertConfig(bits=4, sparsity=0.5), images(3, seed=7), steps=None,
        seconds=1.0, progress=False, pack=False,
        after_stage=lambda stage, m: seen.append((stage, len(dcx.prune.masks(m)))))
    assert seen == [("pruned", 4), ("shared", 4)]
    assert all(len(h) >= 1 for h in stages.history.values())
    assert stages.metric == "top-1 agreement with the teacher"
    for history in stages.history.values():  # its half, and the step crossing it (loosely)
        assert history[-1].seconds < 5.0
    with pytest.raises(ValueError, match="give steps or seconds"):
        dcx.distill.convert_distilled_(SmallCNN(), dcx.ConvertConfig(bits=4), images(1, seed=7),
                                       steps=None, progress=False)


def test_sparsity_for_size_is_the_smallest_whole_percent_that_fits():
    from dcx.convert import sparsity_for_size
    from dcx.io import encode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 96), nn.ReLU(), nn.Linear(96, 64))
    config = dcx.ConvertConfig(bits=4)

    def size(sparsity):
        tried = dcx.ConvertConfig(bits=4, sparsity=sparsity)
        return len(encode(dcx.convert_(copy.deepcopy(model), tried)[0], tried))

    target = int(0.6 * size(0.0))
    sparsity, trial = sparsity_for_size(model, config, target)
    assert trial == size(sparsity) <= target < size(round(sparsity - 0.01, 2))
    assert not state.layers(model)  # the model itself is not touched
    assert sparsity_for_size(model, config, size(0.0)) == (0.0, size(0.0))
    with pytest.raises(dcx.config.ConfigError, match="cannot be reached at 4 bits"):
        sparsity_for_size(model, config, 100)


def test_convert_distilled_prunes_gradually_in_rounds():
    """prune_rounds=3 over 12 steps: the sparsity ramps up in rounds during the first half of
    the pruned stage (Zhu & Gupta), retraining between them, and ends at the config's."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    seen = []

    def density(m):
        masks = dcx.prune.masks(m)
        return sum(int(k.sum()) for k in masks.values()) / sum(k.numel() for k in masks.values())

    original = dcx.distill.distill_

    def watched(*args, callback=None, **kwargs):
        def both(record):
            if callback is not None:
                callback(record)
            seen.append(round(density(args[0]), 3))
        return original(*args, callback=both, **kwargs)

    dcx.distill.distill_ = watched
    try:
        dcx.distill.convert_distilled_(model, dcx.ConvertConfig(bits=4, sparsity=0.6),
                                       images(3, seed=7), steps=12, shared_steps=1,
                                       prune_rounds=3, progress=False, pack=False)
    finally:
        dcx.distill.distill_ = original
    pruned_stage = seen[:12]
    assert pruned_stage[0] == 1.0 and abs(pruned_stage[5] - 0.4) < 0.01
    assert len(set(pruned_stage[:6])) == 4  # 0 then three rounds, two steps apart
    assert pruned_stage == sorted(pruned_stage, reverse=True)
    with pytest.raises(ValueError, match="prune_rounds must be >= 1"):
        dcx.distill.convert_distilled_(SmallCNN(), dcx.ConvertConfig(bits=4, sparsity=0.5),
                                       images(1, seed=7), steps=None, seconds=1.0,
                                       prune_rounds=2, progress=False)
