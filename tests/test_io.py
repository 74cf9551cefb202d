"""Models <-> .dcx files: every stage combination saves with no other argument and loads into a
freshly built model with the same outputs, sizes as the format promises, convs in every padding
mode, transformers models, byte-identical and umask-following saves, and what save refuses."""

import copy
import os

import pytest
import torch
from torch import nn

import dcx
from dcx import format as fmt
from dcx.models import LeNet300100
from tests.testing import requires_kernels

pytestmark = requires_kernels


class Net(nn.Module):
    """Convolutions in the padding modes a packed layer serves (and a grouped one, which stays a
    Conv2d), a batch norm, two Linear layers."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(3, 8, 4, padding="same")  # even kernel: the odd pad goes right
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 6 * 6, 40)
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x):
        x = self.bn(self.grouped(torch.relu(self.reflect(torch.relu(self.same(x))))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def trained_net():
    net = Net()
    net.bn.running_mean.normal_()
    net.bn.running_var.uniform_(0.5, 2)
    return net.eval()


X = torch.randn(3, 3, 8, 8)


def effective(model):
    """{parameter name: the weight the model computes with} of every layer with state."""
    return {name: st.weight() for name, st in dcx.state.layers(model).items()}


def check_round_trip(model, path, fresh, packed_types=(dcx.SparseQuantLinear, dcx.SparseQuantConv2d)):
    dcx.save(model, path)
    loaded = dcx.load(path, fresh)
    before, after = effective(model), effective(loaded)
    assert set(before) <= set(after)
    for name, weight in before.items():
        assert torch.equal(after[name].reshape(weight.shape), weight), name
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(X), model.eval()(X), rtol=1e-5, atol=1e-5)
    return loaded


def stage(kind, finetune, finalize):
    model = trained_net()
    if "prune" in kind:
        dcx.prune_(model, dcx.PruneConfig(sparsity=0.8))
        if finalize:
            dcx.finalize_pruning_(model)
    if "cluster" in kind:
        dcx.cluster_(model, dcx.ClusterConfig(linear_bits=4, conv_bits=5))
        if finetune:
            opt = torch.optim.SGD(dcx.quantize.codebook_parameters(model), lr=0.01)
            model.train()(X).square().mean().backward()
            opt.step()
        if finalize:
            dcx.finalize_clustering_(model)
    return model


COMBINATIONS = [(kind, finetune, finalize) for kind in ("prune", "cluster", "prune+cluster")
                for finetune in (False, True) for finalize in (False, True)
                if not (finetune and kind == "prune")]  # fine-tuning moves centroids


@pytest.mark.parametrize("kind, finetune, finalize", COMBINATIONS)
def test_every_stage_combination_round_trips(tmp_path, kind, finetune, finalize):
    model = stage(kind, finetune, finalize)
    loaded = check_round_trip(model, tmp_path / "m.dcx", Net())
    manifest = fmt.load_records(tmp_path / "m.dcx")[2]
    by_name = {t["name"]: t for t in manifest["tensors"]}
    if kind == "prune":  # pruning alone: kept values at positions; the layers stay plain
        assert by_name["fc1.weight"]["payload"] == "values"
        assert type(loaded.fc1) is nn.Linear and dcx.prune.sparsity(loaded)["fc1.weight"] == 0.8
    else:
        assert by_name["fc1.weight"]["payload"] == "codes"
        assert isinstance(loaded.fc1, dcx.SparseQuantLinear)
        assert isinstance(loaded.same, dcx.SparseQuantConv2d)
        assert isinstance(loaded.reflect, dcx.SparseQuantConv2d)
        assert type(loaded.grouped) is nn.Conv2d  # no packed twin: the decoded weight, shared
        assert dcx.state.get(loaded.grouped).shared
        mode = "dense" if kind == "cluster" else "sparse"
        assert by_name["fc1.weight"]["mode"] == mode
    # Saving what was loaded gives the same file.
    dcx.save(loaded, tmp_path / "again.dcx")
    assert (tmp_path / "again.dcx").read_bytes() == (tmp_path / "m.dcx").read_bytes()


def test_sizes_of_the_stages(tmp_path):
    """A 90%-pruned LeNet-300-100 is >= 6x smaller than fp32 with its values raw; shared, it
    shrinks further; shared without pruning stores codes alone."""
    torch.manual_seed(0)
    fp32 = 4 * sum(p.numel() for p in LeNet300100().parameters())
    pruned = dcx.prune_(LeNet300100(), dcx.PruneConfig(sparsity=0.9))
    size_p = os.path.getsize(dcx.save(pruned, tmp_path / "p.dcx"))
    both = dcx.cluster_(copy.deepcopy(pruned), dcx.ClusterConfig(linear_bits=5))
    size_pq = os.path.getsize(dcx.save(both, tmp_path / "pq.dcx"))
    shared = dcx.cluster_(LeNet300100(), dcx.ClusterConfig(linear_bits=5))
    size_q = os.path.getsize(dcx.save(shared, tmp_path / "q.dcx"))
    assert fp32 / size_p >= 6.0, size_p
    assert size_pq < size_p / 3
    assert fp32 / size_q > 32 / 5 * 0.95  # about 5 bits a weight, Huffman below it
    print(f"fp32 {fp32} B; pruned 90% {size_p} B ({fp32 / size_p:.1f}x); + 5-bit sharing "
          f"{size_pq} B ({fp32 / size_pq:.1f}x); 5-bit sharing alone {size_q} B "
          f"({fp32 / size_q:.1f}x)")


def test_prune_cluster_save_with_no_other_argument(tmp_path):
    """prune_ then cluster_ then save with no other argument: smaller than the fp32 weights and
    loading into a fresh model (both failed before the state was one)."""
    m = LeNet300100()
    dcx.prune_(m, dcx.PruneConfig(sparsity=0.92))
    dcx.cluster_(m, dcx.ClusterConfig(linear_bits=5))
    dcx.save(m, tmp_path / "m.dcx")
    assert os.path.getsize(tmp_path / "m.dcx") < 4 * 266_610 / 30
    fresh = dcx.load(tmp_path / "m.dcx", LeNet300100())
    x = torch.randn(2, 784)
    torch.testing.assert_close(fresh(x), m(x), rtol=1e-5, atol=1e-5)


def test_convert_saves_and_loads(tmp_path):
    model, _ = dcx.convert_(trained_net(), dcx.ConvertConfig(sparsity=0.5, bits=4, conv=True))
    assert isinstance(model.same, dcx.SparseQuantConv2d) and type(model.grouped) is nn.Conv2d
    loaded = check_round_trip(model, tmp_path / "c.dcx", Net())
    assert isinstance(loaded.fc2, dcx.SparseQuantLinear)
    again = dcx.load(tmp_path / "c.dcx", copy.deepcopy(model))  # into a converted model, too
    torch.testing.assert_close(again(X), model(X), rtol=1e-5, atol=1e-5)


def test_load_state_dict_gives_the_decoded_tensors(tmp_path):
    model = stage("prune+cluster", False, False)
    dcx.save(model, tmp_path / "m.dcx")
    decoded = dcx.load_state_dict(tmp_path / "m.dcx")
    with pytest.warns(DeprecationWarning, match="load_state_dict"):  # the old spelling, one release
        legacy = dcx.load(tmp_path / "m.dcx")
    assert legacy.keys() == decoded.keys() and all(torch.equal(legacy[k], decoded[k]) for k in decoded)
    plain = Net()
    assert set(decoded) == set(plain.state_dict())
    plain.load_state_dict(decoded)
    torch.testing.assert_close(plain.eval()(X), model.eval()(X), rtol=1e-5, atol=1e-5)


def test_load_packed_false_keeps_the_stage_state_to_carry_on(tmp_path):
    """save after pruning, load the state back, cluster, save: the stages compose through files."""
    pruned = dcx.prune_(trained_net(), dcx.PruneConfig(sparsity=0.7))
    dcx.save(pruned, tmp_path / "p.dcx")
    back = dcx.load(tmp_path / "p.dcx", Net(), packed=False)
    assert torch.equal(back.fc1.weight_mask, pruned.fc1.weight_mask)
    dcx.cluster_(back, dcx.ClusterConfig(linear_bits=3))
    assert (back.fc1.weight[~back.fc1.weight_mask] == 0).all()
    final = check_round_trip(back, tmp_path / "pq.dcx", Net())
    assert isinstance(final.fc1, dcx.SparseQuantLinear)


def test_byte_identical_and_umask(tmp_path):
    model = stage("prune+cluster", True, False)
    old = os.umask(0o022)
    try:
        dcx.save(model, tmp_path / "a.dcx", config={"note": 1})
        dcx.save(model, tmp_path / "b.dcx", config={"note": 1})
        os.umask(0o077)
        dcx.save(model, tmp_path / "c.dcx")
    finally:
        os.umask(old)
    assert (tmp_path / "a.dcx").read_bytes() == (tmp_path / "b.dcx").read_bytes()
    assert os.stat(tmp_path / "a.dcx").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "c.dcx").st_mode & 0o777 == 0o600
    assert fmt.load_records(tmp_path / "a.dcx")[2]["extra"] == {"config": {"note": 1}}


def test_save_refuses_what_it_cannot_encode(tmp_path):
    model = dcx.prune_(LeNet300100(), dcx.PruneConfig(sparsity=0.5))
    with torch.no_grad():
        model.fc1.weight.add_(1.0)  # as an optimizer that knows no masks would
    with pytest.raises(ValueError, match="fc1.weight: .* pruned positions hold non-zero values"):
        dcx.save(model, tmp_path / "x.dcx")
    dcx.prune.apply_masks_(model)
    dcx.save(model, tmp_path / "x.dcx")

    shared = dcx.finalize_clustering_(dcx.cluster_(LeNet300100(), dcx.ClusterConfig(linear_bits=3)))
    with torch.no_grad():
        shared.fc2.weight[0, 0] += 0.5
    with pytest.raises(ValueError, match="fc2.weight: 1 weights differ from codebook"):
        dcx.save(shared, tmp_path / "y.dcx")

    class Extra(nn.Linear):
        def get_extra_state(self):
            return {"python": "object"}

        def set_extra_state(self, state):
            pass

    with pytest.raises(ValueError, match="extra state"):
        dcx.save(nn.Sequential(Extra(2, 2)), tmp_path / "z.dcx")
    assert sorted(os.listdir(tmp_path)) == ["x.dcx"]  # nothing half-written
    with pytest.warns(UserWarning, match="no layer of the model holds compressed state"):
        dcx.save(nn.Linear(3, 3), tmp_path / "raw.dcx")


def test_load_rejects_another_architecture(tmp_path):
    model = stage("prune+cluster", False, False)
    dcx.save(model, tmp_path / "m.dcx")
    other = Net()
    other.fc2 = nn.Linear(40, 11)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="fc2"):
        dcx.load(tmp_path / "m.dcx", other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # untouched
    with pytest.raises(ValueError, match="missing"):
        dcx.load(tmp_path / "m.dcx", nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("padding, mode, stride, dilation", [
    ("same", "zeros", 1, 1), ("same", "zeros", 1, 2), ("valid", "zeros", 2, 1),
    (1, "reflect", 1, 1), ((2, 1), "replicate", 2, 1), (1, "circular", 1, 2), ((0, 3), "zeros", 1, 1),
])
@pytest.mark.parametrize("kernel", [3, 4, (2, 5)])
def test_sparse_quant_conv2d_padding_modes(padding, mode, stride, dilation, kernel):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation,
                     padding_mode=mode)
    layer = dcx.SparseQuantConv2d.from_float(conv, sparsity=0.3, bits=6)
    with torch.no_grad():
        conv.weight.copy_(layer.weight)
    x = torch.randn(2, 3, 11, 9)
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-5)


def test_encode_sets_index_bits_and_overrides(tmp_path):
    model = dcx.prune_(LeNet300100(), dcx.PruneConfig(sparsity=0.9))
    dcx.encode_(model, dcx.EncodeConfig(linear_index_bits=5, overrides={"fc3": {"index_bits": 3}}))
    dcx.save(model, tmp_path / "m.dcx")
    bits = {t["name"]: t["index_bits"] for t in fmt.load_records(tmp_path / "m.dcx")[2]["tensors"]
            if t["kind"] == "compressed"}
    assert bits == {"fc1.weight": 5, "fc2.weight": 5, "fc3.weight": 3}
    with pytest.raises(ValueError, match="override 'fc9' matches no layer"):
        dcx.encode_(model, dcx.EncodeConfig(overrides={"fc9": {"index_bits": 3}}))
    with pytest.raises(ValueError, match="override 're:conv.*' matches no layer"):
        dcx.convert_(LeNet300100(), dcx.ConvertConfig(overrides={"re:conv.*": {"bits": 3}}))


def test_transformers_bert_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                       "(pip install -e '.[test]')")
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=40)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    dcx.prune_(model, dcx.PruneConfig(sparsity=0.5, targets=["re:encoder\\..*"]))
    dcx.cluster_(model, dcx.ClusterConfig(linear_bits=4))
    dcx.save(model, tmp_path / "bert.dcx")
    fresh = dcx.load(tmp_path / "bert.dcx", transformers.BertModel(config).eval())
    assert isinstance(fresh.encoder.layer[0].attention.self.query, dcx.SparseQuantLinear)
    assert dcx.state.get(fresh.embeddings.word_embeddings).shared  # no packed twin: decoded
    ids = torch.randint(0, 120, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).last_hidden_state, model(ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
    fp32 = 4 * sum(p.numel() for p in transformers.BertModel(config).parameters())
    assert os.path.getsize(tmp_path / "bert.dcx") < fp32 / 4


def test_packed_layer_settings_survive_the_file(tmp_path):
    """Each packed layer's compute mode and packed mode (dense even where its density would pick
    sparse) come back from the file: into a plain model, into an already packed one, and as
    one mode for all when load is given one."""
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16), nn.ReLU(),
                             nn.Linear(16, 8))

    model = build()
    dcx.convert_(model, dcx.ConvertConfig(sparsity=0.0, bits=6))
    model[0].compute = "int8"
    model[2] = dcx.SparseQuantLinear.from_float(build()[2], sparsity=0.8, bits=4, dense=True,
                                                 compute="bfloat16")
    path = dcx.save(model, tmp_path / "m.dcx")
    assert fmt.load_records(path)[2]["layers"] == {  # the choices, not the defaults
        "0": {"compute": "int8"}, "2": {"compute": "bfloat16", "mode": "dense"}}
    x = torch.randn(3, 64)
    expected = model(x)
    into_packed = build()
    dcx.convert_(into_packed, dcx.ConvertConfig(sparsity=0.5, bits=3))  # other settings, to be replaced
    for fresh in (build(), into_packed):
        loaded = dcx.load(path, fresh)
        assert [loaded[i].compute for i in (0, 2, 4)] == ["int8", "bfloat16", "auto"]
        assert all(loaded[i].packed.dense for i in (0, 2, 4))
        torch.testing.assert_close(loaded(x), expected)
    forced = dcx.load(path, build(), compute="float32")
    assert [forced[i].compute for i in (0, 2, 4)] == ["float32"] * 3
    assert dcx.save(loaded, tmp_path / "again.dcx").read_bytes() == path.read_bytes()


def test_bad_layer_settings_are_a_format_error(tmp_path):
    for bad in ({"0": {"compute": "fp8"}}, {"0": {"mode": "Dense"}}, {"0": {"speed": 1}}, {"0": 3},
                ["0"]):
        path = tmp_path / "bad.dcx"
        fmt.save_records(path, {}, {"w": torch.zeros(2)}, layers=bad)
        with pytest.raises(fmt.FormatError, match="layers"):
            fmt.load_records(path)


def test_a_file_from_before_layer_settings_keeps_its_convert_compute_mode(tmp_path):
    """Format 1.2 files of `dcx convert --compute` kept the mode in the manifest's extra; they
    load with it (for one release, then the "layers" section alone says)."""
    model, _ = dcx.convert_(nn.Sequential(nn.Linear(16, 8)), dcx.ConvertConfig(bits=4))
    manifest, sections = fmt.parse(dcx.io.encode(model, extra={"dcx_convert": {"compute": "bfloat16"}}))
    manifest = {k: v for k, v in manifest.items() if k != "layers"} | {"version": "1.2"}
    data = b"".join(sections[i] for i in range(len(manifest["sections"])))
    (tmp_path / "old.dcx").write_bytes(fmt.seal(manifest, data, version=(1, 2)))
    assert dcx.load(tmp_path / "old.dcx", nn.Sequential(nn.Linear(16, 8)))[0].compute == "bfloat16"
    new = dcx.save(model, tmp_path / "new.dcx", extra={"dcx_convert": {"compute": "bfloat16"}})
    assert dcx.load(new, nn.Sequential(nn.Linear(16, 8)))[0].compute == "auto"  # 1.3: layers only
