"""Tied weights (an input embedding that is also the output projection): compressed once, packed
once for both uses, stored once in the file, tied again by dcx.load."""

import copy

import pytest
import torch
from torch import nn

import dcx
from dcx import format as fmt


class TinyLM(nn.Module):
    """Embedding -> one hidden layer -> an output projection tied to the embedding."""

    def __init__(self, vocab=60, dim=24, tie=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(self.embed(ids))))


IDS = torch.randint(0, 60, (3, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("sparsity, bits, scale", [(0.0, 4, None), (0.5, 5, "row"), (0.0, 8, None)])
def test_convert_shares_a_tied_weight_once(sparsity, bits, scale):
    torch.manual_seed(0)
    model = TinyLM()
    original = copy.deepcopy(model)
    _, rows = dcx.convert_(model, dcx.ConvertConfig(sparsity=sparsity, bits=bits, scale=scale))
    by_name = {r.name: r for r in rows}
    assert by_name["embed"].action == "packed" and by_name["embed"].reason == ""
    assert by_name["head"].action == "packed" and by_name["head"].reason == "tied to embed"
    assert by_name["head"].bits == bits and by_name["head"].sparsity == sparsity
    assert isinstance(model.embed, dcx.SparseQuantEmbedding) and model.embed.tied
    assert isinstance(model.head, dcx.SparseQuantLinear)
    for name in ("codes", "codebook", "scale"):  # one packed weight read by both
        assert model.embed._buffers[name] is model.head._buffers[name]
    assert model.head.packed.dense
    # Both uses decode the same table: the lookup's rows are the projection's weight rows.
    table = model.head.decoded_weight()
    assert torch.equal(model.embed(torch.arange(60)), table)
    assert torch.equal(model.embed.weight, table)
    kept = (table != 0).float().mean().item()
    assert kept == pytest.approx(1 - sparsity, abs=0.02)
    if sparsity == 0.0 and scale is None:  # one shared codebook over the whole table
        assert torch.unique(table).numel() <= 1 << bits
    cos = torch.nn.functional.cosine_similarity(model(IDS).flatten(), original(IDS).flatten(), 0)
    assert cos > {4: 0.95, 5: 0.85, 8: 0.999}[bits]  # 5: half of every layer pruned


def test_a_tied_weight_is_stored_once_and_tied_again(tmp_path):
    torch.manual_seed(0)
    model, _ = dcx.convert_(TinyLM(), dcx.ConvertConfig(bits=5))
    expected = model(IDS)
    path = dcx.save(model, tmp_path / "lm.dcx")
    compressed, raw, manifest = fmt.load_records(path)
    assert list(compressed) == ["embed.weight", "hidden.weight"]
    assert manifest["tied"] == {"head.weight": "embed.weight"} and manifest["version"] == "{}.{}".format(*fmt.VERSION)
    # The tied copy would cost a second record of the table: the file is smaller than that.
    untied = TinyLM(tie=False)
    dcx.convert_(untied, dcx.ConvertConfig(bits=5))
    assert path.stat().st_size < dcx.save(untied, tmp_path / "untied.dcx").stat().st_size - 400

    for fresh in (TinyLM(), TinyLM(tie=False)):  # an untied model is tied again
        loaded = dcx.load(path, fresh)
        assert torch.equal(loaded(IDS), expected)
        assert loaded.embed.codes is loaded.head.codes
    plain = dcx.load(path, TinyLM(tie=False), packed=False)
    assert plain.head.weight is plain.embed.weight
    assert torch.allclose(plain(IDS), expected, atol=1e-5)
    assert dcx.save(plain, tmp_path / "again.dcx").read_bytes() == path.read_bytes()
    decoded = dcx.load_state_dict(path)
    assert list(decoded) == ["embed.weight", "hidden.weight", "hidden.bias", "head.weight"]
    assert torch.equal(decoded["head.weight"], decoded["embed.weight"])


def test_ties_in_a_file_are_checked(tmp_path):
    torch.manual_seed(0)
    model, _ = dcx.convert_(TinyLM(), dcx.ConvertConfig(bits=4))
    compressed, raw, _ = fmt.load_records(dcx.save(model, tmp_path / "lm.dcx"))
    manifest, sections = fmt.parse(fmt.encode_file(compressed, raw))
    data = b"".join(sections[i] for i in sorted(sections))
    for tied, match in (({"head.weight": "nowhere.weight"}, "is not a compressed tensor"),
                        ({"head.weight": "hidden.bias"}, "is not a compressed tensor"),
                        ({"hidden.weight": "embed.weight"}, "names a tensor the file stores"),
                        ([1], "must map names")):
        with pytest.raises(fmt.FormatError, match=match):  # the writer checks, and the reader
            fmt.encode_file(compressed, raw, tied=tied)
        with pytest.raises(fmt.FormatError, match=match):
            fmt.decode_file(fmt.seal({**manifest, "tied": tied}, data))
    # A tie the model cannot take: the tensor it names has another shape.
    data = fmt.encode_file(compressed, raw, tied={"head.weight": "hidden.weight"})
    (tmp_path / "bad.dcx").write_bytes(data)
    with pytest.raises(ValueError, match="head.weight: the file holds"):
        dcx.load(tmp_path / "bad.dcx", TinyLM())


def test_a_tie_with_a_layer_convert_cannot_pack_stays_dense():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = TinyLM()
    model.head = Custom(24, 60, bias=False)
    model.head.weight = model.embed.weight
    _, rows = dcx.convert_(model, dcx.ConvertConfig(bits=4))
    by_name = {r.name: r for r in rows}
    assert by_name["embed"].action == "shared" and "overrides nn.Linear.forward" in \
        by_name["embed"].reason
    assert by_name["head"].action == "shared" and by_name["head"].reason == "tied to embed"
    assert type(model.embed) is nn.Embedding and model.head.weight is model.embed.weight
    assert torch.unique(model.embed.weight).numel() <= 16  # shared, still tied


def test_a_tied_llama_with_calibration(tmp_path):
    """A decoder with tied input and output embeddings: the tie takes the plain path, every
    other Linear the calibrated one; the file stores the table once and loads into a fresh
    model with the same logits."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batches = [torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(s))
               for s in range(4)]
    _, rows = dcx.convert_(model, dcx.ConvertConfig(bits=6), calibration=batches)
    by_name = {r.name: r for r in rows}
    assert by_name["lm_head"].reason == "tied to model.embed_tokens"
    assert all(r.action == "packed" for r in rows)
    assert model.lm_head.codes is model.model.embed_tokens.codes
    with torch.no_grad():
        logits = model(batches[0]).logits
    path = dcx.save(model, tmp_path / "llama.dcx")
    assert fmt.load_records(path)[2]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    fresh = dcx.load(path, transformers.LlamaForCausalLM(config).eval())
    with torch.no_grad():
        assert torch.equal(fresh(batches[0]).logits, logits)


def test_a_table_saved_before_it_was_packed_loads():
    """SparseQuantEmbedding's state_dict used to hold one uint8 id per entry ("ids")."""
    torch.manual_seed(0)
    layer = dcx.SparseQuantEmbedding.from_float(nn.Embedding(30, 8), sparsity=0.3, bits=4)
    table = layer.weight
    mask, labels = dcx.packing.unpack(layer.packed)
    old = {"ids": torch.where(mask, labels, layer.codebook.eq(0).nonzero()[0, 0]).to(torch.uint8),
           "codebook": layer.codebook.clone(), "_extra_state": {"bits": layer.bits}}
    fresh = dcx.SparseQuantEmbedding(30, 8)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.weight, table) and fresh.bits == layer.bits


class HeadFirst(TinyLM):
    """The projection registered before the embedding (module order decides the first owner)."""

    def __init__(self):
        nn.Module.__init__(self)
        self.head = nn.Linear(24, 60, bias=False)
        self.hidden = nn.Linear(24, 24)
        self.embed = nn.Embedding(60, 24)
        self.embed.weight = self.head.weight


def test_a_tie_with_an_owner_left_out_is_left_dense():
    model = HeadFirst()
    _, rows = dcx.convert_(model, dcx.ConvertConfig(bits=4, embeddings=False))
    by_name = {r.name: r for r in rows}
    assert by_name["head"].action == "dense" and "weight tied to" in by_name["head"].reason
    assert by_name["embed"].action == "dense" and "embeddings left out" in by_name["embed"].reason
    assert by_name["hidden"].action == "packed"
    model, rows = dcx.convert_(HeadFirst(), dcx.ConvertConfig(bits=4))  # the Linear first
    assert {r.name: r.reason for r in rows}["embed"] == "tied to head"
    assert model.embed.codes is model.head.codes


def test_a_tied_table_at_8_bits_with_pruning_stays_shared(tmp_path):
    """Dense mode has no id left for pruned weights of a full 256-entry codebook: the group
    keeps its decoded, shared weight (still tied), and the file still stores it once."""
    torch.manual_seed(0)
    model = TinyLM(vocab=600, dim=24)
    _, rows = dcx.convert_(model, dcx.ConvertConfig(bits=8, sparsity=0.5))
    by_name = {r.name: r for r in rows}
    assert by_name["embed"].action == "shared" and "dense mode" in by_name["embed"].reason
    assert type(model.embed) is nn.Embedding and model.head.weight is model.embed.weight
    expected = model(IDS)
    path = dcx.save(model, tmp_path / "lm.dcx")
    assert fmt.load_records(path)[2]["tied"] == {"head.weight": "embed.weight"}
    loaded = dcx.load(path, TinyLM(vocab=600, dim=24))
    assert loaded.head.weight is loaded.embed.weight and torch.equal(loaded(IDS), expected)


def test_the_tie_survives_to_and_load_state_dict():
    torch.manual_seed(0)
    model, _ = dcx.convert_(TinyLM(), dcx.ConvertConfig(bits=5, scale="row"))
    expected = model(IDS)
    model.to(torch.bfloat16)  # every buffer replaced: one dict, so both layers see the new ones
    assert model.embed.codebook is model.head.codebook
    assert model.head.codebook.dtype == torch.bfloat16
    torch.testing.assert_close(model(IDS).float(), expected, rtol=0.05, atol=0.05)
    other, _ = dcx.convert_(TinyLM(), dcx.ConvertConfig(bits=3))
    other.to(torch.bfloat16).load_state_dict(model.state_dict())
    assert other.embed.codes is other.head.codes and other.embed.bits == 5
    assert torch.equal(other(IDS), model(IDS))


def test_an_untied_file_loads_into_a_tied_model(tmp_path):
    """The file is the truth: two records of one Parameter of the model give it two."""
    torch.manual_seed(0)
    untied, _ = dcx.convert_(TinyLM(tie=False), dcx.ConvertConfig(bits=4))
    expected = untied(IDS)
    path = dcx.save(untied, tmp_path / "untied.dcx")
    loaded = dcx.load(path, TinyLM())
    assert loaded.embed.codes is not loaded.head.codes and torch.equal(loaded(IDS), expected)


def test_a_tie_must_name_a_weight(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    dcx.convert_(model, dcx.ConvertConfig(bits=3))
    compressed, raw, _ = fmt.load_records(dcx.save(model, tmp_path / "m.dcx"))
    raw.pop("1.running_mean")
    (tmp_path / "bad.dcx").write_bytes(fmt.encode_file(compressed, raw,
                                                       tied={"1.running_mean": "0.weight"}))
    with pytest.raises(ValueError, match="1.running_mean: the file ties it to 0.weight, but it "
                                         "is not a module's weight Parameter"):
        dcx.load(tmp_path / "bad.dcx", nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
