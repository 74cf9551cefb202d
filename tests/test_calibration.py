"""dcx.calibrate: layer input statistics, the second-order per-layer step, and convert_ with
calibration inputs on a tiny BertModel / LlamaModel from config and a small CNN."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcx
from dcx import state
from dcx.calibration import (CalibrationError, LayerStats, _refit_codebook, calibrate,
                           compress_layer, output_error, weighted_layer)
from dcx.config import ConfigError

KMEANS = dcx.ClusterConfig().layer_fields(conv=False)


class SmallCNN(nn.Module):
    """A stem convolution, a depthwise and a pointwise one, then a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.depthwise(x))
        x = F.relu(self.pointwise(x))
        return self.head(x.mean((2, 3)))


def correlated(rows, k, seed):
    """Inputs whose columns differ in scale and move together (what real activations do)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    scale = torch.logspace(-1, 0.7, k)[torch.randperm(k, generator=g)]
    return (torch.randn(rows, k, generator=g) @ mix) * scale


def test_statistics_are_the_sum_of_x_xt():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    stats = calibrate(model, [x, x[:1]])
    assert set(stats) == {"stem", "depthwise", "pointwise", "head"}
    # stem: unfolded 3x3 patches of the padded image, both batches.
    cols = torch.cat([F.unfold(t, 3, padding=1).transpose(1, 2).reshape(-1, 27)
                      for t in (x, x[:1])]).double()
    torch.testing.assert_close(stats["stem"].hessian[0], cols.T @ cols)
    assert stats["stem"].count == 3 * 64
    # depthwise: one 9x9 H per channel, from that channel's patches alone.
    inner = F.relu(model.stem(x))
    patches = F.unfold(inner[:, 5:6], 3, padding=1).transpose(1, 2).reshape(-1, 9).double()
    assert stats["depthwise"].hessian.shape == (16, 9, 9)
    h5 = stats["depthwise"].hessian[5]
    inner1 = F.relu(model.stem(x[:1]))
    patches1 = F.unfold(inner1[:, 5:6], 3, padding=1).transpose(1, 2).reshape(-1, 9).double()
    torch.testing.assert_close(h5, patches.T @ patches + patches1.T @ patches1)
    # head: a Linear's rows are its input vectors.
    assert stats["head"].hessian.shape == (1, 24, 24) and stats["head"].count == 3


def plain_output_error(w, x, bits, sparsity):
    """The output error on inputs x of plain compression: magnitude pruning, k-means, nearest
    centroid."""
    keep = w.abs() > w.abs().flatten().kthvalue(int(sparsity * w.numel())).values \
        if sparsity else torch.ones_like(w, dtype=torch.bool)
    cb, lab = dcx.ops.kmeans1d(w[keep], 1 << bits)
    plain = torch.zeros_like(w)
    plain[keep] = cb[lab.long()]
    return ((x @ (w - plain).T) ** 2).sum()


def test_layer_step_beats_plain_kmeans_on_the_outputs():
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    x = correlated(2048, 64, seed=1)
    h = (x.T.double() @ x.double())[None]
    stats = LayerStats(h, x.shape[0])
    for bits, sparsity in [(3, 0.0), (4, 0.5)]:
        # damping 0.01: these inputs are the calibration inputs, nothing to generalise to
        mask, codebook, labels = compress_layer(w, stats, sparsity, bits, KMEANS, damp=0.01)
        q = codebook[labels.long()] * (mask if mask is not None else 1)
        err, err_plain = ((x @ (w - q).T) ** 2).sum(), plain_output_error(w, x, bits, sparsity)
        assert err < 0.6 * err_plain, (bits, sparsity, float(err), float(err_plain))
        assert codebook.numel() <= 1 << bits and labels.dtype == torch.int32
        assert int(labels.min()) >= 0 and int(labels.max()) < codebook.numel()
        if sparsity:
            # exactly the share asked for, rounded down per block of columns
            assert int((~mask).sum()) == int(sparsity * w.numel())
            assert bool((labels[~mask] == 0).all())
        else:
            assert mask is None


@pytest.mark.parametrize("scaled", [False, True])
def test_weighted_step_beats_plain_kmeans_on_the_outputs(scaled):
    """The cheap step: input-norm pruning per row and activation-weighted k-means, from the
    diagonal of H. Where a few input columns carry most of the energy and hold small weights
    (a transformer's outlier features), plain k-means (magnitude pruning, unweighted codebook)
    spends its entries on the large weights of quiet columns; the weighted step's output error
    is a fraction of it (iid weights on every column: about even at 3 bits, 0.8x at 4)."""
    torch.manual_seed(0)
    w = torch.randn(48, 64) * torch.logspace(0.5, -0.5, 64)
    x = correlated(2048, 64, seed=1) * torch.logspace(-1.5, 1.5, 64)  # a few columns dominate
    stats = LayerStats((x.T.double() @ x.double())[None], x.shape[0])
    scale = dcx.quantize.row_scales(w, None) if scaled else None
    for bits, sparsity in [(3, 0.0), (4, 0.5)]:
        mask, codebook, labels = weighted_layer(w, stats, sparsity, bits, KMEANS, scale)
        q = codebook[labels.long()] * (mask if mask is not None else 1)
        if scaled:
            q = q * scale[:, None]
        err, err_plain = ((x @ (w - q).T) ** 2).sum(), plain_output_error(w, x, bits, sparsity)
        assert err < 0.5 * err_plain, (bits, sparsity, float(err), float(err_plain))
        assert codebook.numel() <= 1 << bits and labels.dtype == torch.int32
        if sparsity:
            assert bool(((~mask).sum(1) == int(sparsity * 64)).all())  # per row, exactly
            assert bool((labels[~mask] == 0).all())
            # the pruned weights are those of least |w| * |x column| in their row
            score = w.abs() * x.norm(dim=0)
            assert bool((score[~mask].reshape(48, -1).max(1).values
                         <= score[mask].reshape(48, -1).min(1).values).all())
        else:
            assert mask is None


def test_refit_is_the_least_squares_codebook():
    torch.manual_seed(0)
    w = torch.randn(1, 16, 24).double()
    x = correlated(512, 24, seed=2).double()
    h = (x.T @ x)[None]
    labels = torch.randint(0, 4, (1, 16, 24))
    mask = torch.rand(1, 16, 24) > 0.3
    start = torch.tensor([-1.0, -0.3, 0.3, 1.0], dtype=torch.float64)
    c = _refit_codebook(w, labels, mask, h, start)
    # the normal equations, written out
    onehot = F.one_hot(labels, 4).double() * mask[..., None]
    a = torch.einsum("grkc,gkl,grld->cd", onehot, h, onehot)
    b = torch.einsum("grkc,gkl,grl->c", onehot, h, w)
    torch.testing.assert_close(c, torch.linalg.solve(a, b))
    assert output_error(w, c[labels] * mask, h) <= output_error(w, start[labels] * mask, h)
    # group scales weigh each weight; an entry no kept weight uses keeps its value
    scale = torch.rand(1, 16, 3).double().repeat_interleave(8, -1) + 0.5
    five = torch.cat([start, torch.tensor([7.0], dtype=torch.float64)])
    c = _refit_codebook(w, labels, mask, h, five, scale)
    onehot = onehot * scale[..., None]
    a = torch.einsum("grkc,gkl,grld->cd", onehot, h, onehot)
    b = torch.einsum("grkc,gkl,grl->c", onehot, h, w)
    torch.testing.assert_close(c[:4], torch.linalg.solve(a, b))
    assert c[4] == 7.0


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def token_batches(count, vocab, seed, length=12, size=8):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (size, length), generator=g),
             "attention_mask": torch.ones(size, length, dtype=torch.long)}
            for _ in range(count)]


def hidden_error(model, reference, batches):
    with torch.no_grad():
        errs = [((model(**b).last_hidden_state - reference(**b).last_hidden_state) ** 2).mean()
                for b in batches]
    return float(torch.stack(errs).mean())


@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_convert_a_bert_with_calibration(tmp_path, sparsity):
    original = tiny_bert()
    calib, held_out = token_batches(8, 120, seed=1), token_batches(4, 120, seed=2)
    config = dcx.ConvertConfig(bits=3, sparsity=sparsity, embeddings=False)
    plain, _ = dcx.convert_(copy.deepcopy(original), config)
    calibrated, rows = dcx.convert_(copy.deepcopy(original), config, calibration=calib)
    assert all(r.action == "packed" for r in rows if r.kind == "Linear")
    err_plain = hidden_error(plain, original, held_out)
    err = hidden_error(calibrated, original, held_out)
    assert err < 0.8 * err_plain, (err, err_plain)
    # the file holds what was computed
    path = tmp_path / "bert.dcx"
    dcx.save(calibrated, path)
    loaded = dcx.load(path, copy.deepcopy(original))
    assert hidden_error(loaded, calibrated, held_out) < 1e-10
    if sparsity:
        for st in state.layers(calibrated).values():
            if st.mask is not None:
                assert abs(1 - st.mask.float().mean().item() - sparsity) < 0.02


def test_convert_a_bert_with_the_weighted_method(tmp_path):
    original = tiny_bert()
    calib, held_out = token_batches(8, 120, seed=1), token_batches(4, 120, seed=2)
    cfg = dcx.ConvertConfig(bits=3, sparsity=0.5, embeddings=False, method="weighted")
    plain, _ = dcx.convert_(copy.deepcopy(original),
                            dcx.ConvertConfig(bits=3, sparsity=0.5, embeddings=False))
    weighted, rows = dcx.convert_(copy.deepcopy(original), cfg, calibration=calib)
    assert {r.action for r in rows if r.kind == "Linear"} == {"packed"}
    assert hidden_error(weighted, original, held_out) < hidden_error(plain, original, held_out)
    path = tmp_path / "bert.dcx"
    dcx.save(weighted, path)
    loaded = dcx.load(path, copy.deepcopy(original))
    assert hidden_error(loaded, weighted, held_out) < 1e-10


def test_convert_a_llama_with_calibration():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    original = transformers.LlamaModel(config).eval()
    calib, held_out = token_batches(8, 100, seed=3), token_batches(4, 100, seed=4)
    cfg = dcx.ConvertConfig(bits=3, embeddings=False)
    plain, _ = dcx.convert_(copy.deepcopy(original), cfg)
    calibrated, _ = dcx.convert_(copy.deepcopy(original), cfg, calibration=calib)
    assert hidden_error(calibrated, original, held_out) < 0.8 * hidden_error(plain, original,
                                                                            held_out)


def test_convert_a_cnn_with_depthwise_layers():
    torch.manual_seed(0)
    original = SmallCNN().eval()
    calib = [torch.randn(8, 3, 12, 12) for _ in range(4)]
    held_out = torch.randn(16, 3, 12, 12)
    cfg = dcx.ConvertConfig(bits=3)
    plain, _ = dcx.convert_(copy.deepcopy(original), cfg)
    calibrated, rows = dcx.convert_(copy.deepcopy(original), cfg, calibration=calib)
    assert {r.name: r.action for r in rows}["depthwise"] == "shared"  # no packed grouped conv
    with torch.no_grad():
        ref = original(held_out)
        err = float(((calibrated(held_out) - ref) ** 2).mean())
        err_plain = float(((plain(held_out) - ref) ** 2).mean())
    assert err < 0.8 * err_plain, (err, err_plain)


def test_calibration_errors():
    model = SmallCNN().eval()
    for method in ("gptq", "weighted"):
        with pytest.raises(ConfigError, match=f"method '{method}' needs calibration"):
            dcx.convert_(copy.deepcopy(model), dcx.ConvertConfig(method=method))
    with pytest.raises(CalibrationError, match="empty"):
        dcx.convert_(copy.deepcopy(model), dcx.ConvertConfig(), calibration=[])
    with pytest.raises(ConfigError, match="method must be one of"):
        dcx.ConvertConfig(method="obs")

    class Branches(nn.Module):  # `unused` is never called by forward
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(CalibrationError, match="never calls \\['unused'\\]"):
        dcx.convert_(Branches(), dcx.ConvertConfig(), calibration=[torch.randn(2, 4)])
    with pytest.raises(ValueError, match="Embedding has no input columns"):
        calibrate(nn.Sequential(nn.Embedding(4, 4)), [torch.zeros(1, dtype=torch.long)], ["0"])


def test_row_scales_follow_depthwise_channels(tmp_path):
    """A depthwise layer whose channels differ in scale, the next layer undoing it (as a
    folded BatchNorm leaves them): one codebook per layer cannot follow the small channels, row
    scales can; convert_ packs the scaled Conv2d / Linear layers and the file keeps them."""
    torch.manual_seed(0)
    original = SmallCNN().eval()
    spread = torch.logspace(-1.5, 0.5, 16)
    with torch.no_grad():
        original.depthwise.weight.mul_(spread[:, None, None, None])
        original.depthwise.bias.mul_(spread)
        original.pointwise.weight.div_(spread[None, :, None, None])
    calib = [torch.randn(8, 3, 12, 12) for _ in range(4)]
    held_out = torch.randn(16, 3, 12, 12)
    with torch.no_grad():
        ref = original(held_out)
    errors = {}
    for scale in (None, "row"):
        cfg = dcx.ConvertConfig(bits=3, scale=scale)
        model, rows = dcx.convert_(copy.deepcopy(original), cfg, calibration=calib)
        with torch.no_grad():
            errors[scale] = float(((model(held_out) - ref) ** 2).mean())
    assert errors["row"] < 0.8 * errors[None], errors
    assert isinstance(model.stem, dcx.SparseQuantConv2d) and model.stem.scale is not None
    path = tmp_path / "cnn.dcx"
    dcx.save(model, path)
    loaded = dcx.load(path, copy.deepcopy(original))
    with torch.no_grad():
        torch.testing.assert_close(loaded(held_out), model(held_out))



def test_groups_follow_the_inputs_each_layer_reads():
    """q / k / v read one tensor and form one group; layers of a Sequential MLP read tensors
    that are freed as it runs (their ids could be reused) and stay apart; a layer called
    twice is listed twice."""
    from dcx.calibration import _groups, call_order

    model = tiny_bert()
    order = call_order(model, token_batches(1, 120, seed=0)[0])
    groups = _groups(order, {n for n, _ in order if "embeddings" not in n})
    assert groups[0] == [f"encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")]
    assert all(len(g) == 1 for g in groups[1:4])
    mlp = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(16, 16), nn.ReLU())])
    order = call_order(mlp, torch.randn(4, 16))
    assert [g for g in _groups(order, {n for n, _ in order})] == [[str(2 * i)] for i in range(6)]

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(8, 8)

        def forward(self, x):
            return self.layer(torch.relu(self.layer(x)))

    assert [n for n, _ in call_order(Twice(), torch.randn(2, 8))] == ["layer", "layer"]
    calibrated, _ = dcx.convert_(Twice(), dcx.ConvertConfig(bits=3),
                                 calibration=[torch.randn(4, 8) for _ in range(2)])
    assert isinstance(calibrated.layer, dcx.SparseQuantLinear)


def test_a_model_that_catches_exceptions_still_stops_early():
    class Careful(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            try:
                return self.b(torch.relu(self.a(x)))
            except Exception:  # a model's own error handling must not swallow the stop
                raise AssertionError("the early stop was caught")

    model, _ = dcx.convert_(Careful(), dcx.ConvertConfig(bits=3),
                            calibration=[torch.randn(4, 8) for _ in range(2)])
    assert isinstance(model.a, dcx.SparseQuantLinear)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_the_block_chain_gives_what_whole_forwards_give(kind, monkeypatch):
    """A transformer's layers are calibrated block by block on the inputs each block received
    (one pass over the model; a decoder's key/value cache left out of the replays): the same
    masks, codebooks and labels as one forward of the whole model per layer group."""
    transformers = pytest.importorskip("transformers")
    if kind == "bert":
        model, calib = tiny_bert(), token_batches(6, 120, seed=1)
        blocks = ["encoder.layer.0", "encoder.layer.1"]
    else:
        config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=3, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=32)
        torch.manual_seed(0)
        model, calib = transformers.LlamaForCausalLM(config).eval(), token_batches(6, 100, seed=3)
        blocks = ["model.layers.0", "model.layers.1", "model.layers.2"]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert dcx.calibration.block_chain(model, calib[0], names) == blocks
    cfg = dcx.ConvertConfig(bits=3, sparsity=0.3, embeddings=False)
    chained, _ = dcx.convert_(copy.deepcopy(model), cfg, calibration=calib)
    monkeypatch.setattr(dcx.calibration, "block_chain", lambda *args: [])
    whole, _ = dcx.convert_(copy.deepcopy(model), cfg, calibration=calib)
    a, b = state.layers(chained), state.layers(whole)
    assert a.keys() == b.keys() and len(a) == len(names)
    for name in a:
        assert torch.equal(a[name].labels, b[name].labels), name
        assert torch.equal(a[name].codebook, b[name].codebook), name
        assert torch.equal(a[name].mask, b[name].mask), name


def test_blocks_that_do_not_chain_are_run_whole():
    """Blocks called side by side on one input (not each on the one before) are no chain."""

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU())
                                        for _ in range(3)])

        def forward(self, x):
            return sum(h(x) for h in self.heads)

    torch.manual_seed(0)
    model = Branches().eval()
    calib = [torch.randn(16, 8) for _ in range(3)]
    assert dcx.calibration.block_chain(model, calib[0], ["heads.0.0", "heads.1.0"]) == []
    converted, rows = dcx.convert_(copy.deepcopy(model), dcx.ConvertConfig(bits=3),
                                   calibration=calib)
    assert {r.action for r in rows} == {"packed"}


@pytest.mark.parametrize("method", ["gptq", "weighted"])
def test_a_layer_pruned_before_keeps_its_mask(method):
    """Calibrated sharing of a layer that was pruned (and perhaps retrained) before keeps that
    mask, whatever sparsity the config gives: it must not re-prune the weights retraining moved."""
    torch.manual_seed(0)
    model = SmallCNN().eval()
    dcx.prune_(model, dcx.PruneConfig(sparsity=0.5, targets=["pointwise.weight", "head.weight"]))
    masks = {n: m.clone() for n, m in dcx.prune.masks(model).items()}
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 12, 12, generator=g) for _ in range(2)]
    dcx.convert_(model, dcx.ConvertConfig(bits=3, sparsity=0.3, method=method),
                 calibration=batches, pack=False)
    for name, mask in masks.items():
        module = model.get_submodule(name.rpartition(".")[0])
        assert torch.equal(dcx.state.mask(module), mask), name
        assert (module.weight[~mask] == 0).all()
