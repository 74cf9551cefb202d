"""The dcx command through subprocesses, as a script would call it: outputs and exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testing import requires_kernels

pytestmark = requires_kernels
REPO = Path(__file__).resolve().parents[1]

SMALL = """
prune: {sparsity: 0.8, schedule: oneshot}
cluster: {linear_bits: 4}
train: {epochs: 3, lr: 0.1, batch_size: 64}
retrain: {epochs: 2, lr: 0.05, batch_size: 64}
finetune: {epochs: 1, lr: 0.001, batch_size: 64}
"""


def dcx(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "dcx.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    (folder / "small.yaml").write_text(SMALL)
    out = folder / "small.dcx"
    run = dcx("compress", "--config", folder / "small.yaml", "--data", "digits", "--out", out,
              "--quiet", "--json", folder / "stages.json")
    assert run.returncode == 0, run.stderr + run.stdout
    return folder, out, run.stdout


def test_compress_prints_stages_and_report(compressed):
    folder, out, stdout = compressed
    assert out.exists() and (folder / "small-weights.png").exists()
    assert (folder / "small-accuracy-size.png").exists()
    assert "| encoded |" in stdout and "fc1.weight" in stdout
    assert "gives the same predictions: yes" in stdout
    stages = json.loads((folder / "stages.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == ["reference", "pruned", "quantized", "encoded"]


def test_eval_report_verify(compressed):
    _, out, _ = compressed
    run = dcx("eval", out, "--data", "digits")
    assert run.returncode == 0 and "accuracy" in run.stdout
    run = dcx("report", out, "--json")
    assert run.returncode == 0
    assert json.loads(run.stdout)["file_bytes"] == out.stat().st_size
    run = dcx("verify", out)
    assert run.returncode == 0 and "OK" in run.stdout


def test_corrupt_file_exit_code(compressed, tmp_path):
    _, out, _ = compressed
    bad = tmp_path / "bad.dcx"
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    for command in (("verify", bad), ("report", bad), ("eval", bad, "--data", "digits")):
        run = dcx(*command)
        assert run.returncode == 3, command
        assert "corrupt or foreign file" in run.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("verify", "/no/such/file.dcx"), "No such file"),
        (("compress", "--config", "/no/such.yaml"), "does not exist"),
        (("compress", "--config", "{cfg}", "--data", "/no/mnist/here"), "data folder"),
        (("compress", "--config", "{bad}"), "unknown key"),
        (("eval", "{file}", "--model", "lenet5", "--data", "digits"), "lenet5 needs 28x28"),
    ],
)
def test_usage_errors_exit_2(compressed, tmp_path, args, message):
    folder, out, _ = compressed
    (tmp_path / "bad.yaml").write_text("trian: {epochs: 1}\n")
    args = [a.format(cfg=folder / "small.yaml", bad=tmp_path / "bad.yaml", file=out) for a in args]
    run = dcx(*args)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr


def test_no_command_is_a_usage_error():
    run = dcx()
    assert run.returncode == 2 and "usage" in run.stderr


@pytest.mark.slow
def test_demo(tmp_path):
    run = dcx("demo", "--out", tmp_path, "--quiet")
    assert run.returncode == 0, run.stderr
    assert "gives the same predictions: yes" in run.stdout
    assert (tmp_path / "demo.dcx").exists() and (tmp_path / "demo-weights.png").exists()


# --- any model: convert, export, compress with a user's model and data -----------------------

USER_MODELS = '''
import torch
from torch import nn


class Padded(nn.Conv2d):
    """A "same"-padding conv that pads in its own forward, as real model code does."""

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 16, padding_idx=0), nn.Flatten(), nn.Linear(16 * 6, 32),
                         nn.ReLU(), nn.Linear(32, 4))


def make_conv():
    torch.manual_seed(0)
    return nn.Sequential(Padded(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1, groups=4),
                         nn.Conv2d(8, 4, 3, padding="same"), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))


def loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 8, 8, generator=g)
    y = (x.flatten(1).sum(1) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    data = torch.utils.data.TensorDataset(x, y)
    return (torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, generator=g),
            torch.utils.data.DataLoader(data, batch_size=128))


def small_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))


class BreaksWhenPacked(nn.Sequential):
    """A model whose forward fails once its layers are packed (as one that reads a layer's
    internals would): the pipeline's last stage, which loads its file, fails."""

    def forward(self, x):
        if any(type(m).__name__ == "SparseQuantLinear" for m in self.modules()):
            raise RuntimeError("this model cannot run once packed")
        return super().forward(x)


def breaks_when_packed():
    return BreaksWhenPacked(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
'''


@pytest.fixture
def user_folder(tmp_path):
    (tmp_path / "usermodels.py").write_text(USER_MODELS)
    return tmp_path


def test_convert_a_factory_model_with_weights(user_folder):
    import torch

    import dcx as dcx_pkg

    sys.path.insert(0, str(user_folder))
    try:
        import usermodels
    finally:
        sys.path.remove(str(user_folder))
    model = usermodels.make()
    torch.save(model.state_dict(), user_folder / "weights.pt")
    run = dcx("convert", "usermodels:make", "--weights", "weights.pt", "--bits", "5",
              "--sparsity", "0.3", "--out", "m.dcx", "--quiet", cwd=user_folder)
    assert run.returncode == 0, run.stderr
    assert "| 0 | Embedding | 50x16 | packed | 5 | 30% |" in run.stdout
    assert "3 packed, 0 shared with their decoded weight, 0 left dense" in run.stdout
    loaded = dcx_pkg.load(user_folder / "m.dcx", usermodels.make())
    assert isinstance(loaded[0], dcx_pkg.SparseQuantEmbedding) and loaded[0].padding_idx == 0
    ids = torch.randint(0, 50, (3, 6))
    reference, _ = dcx_pkg.convert_(usermodels.make(), dcx_pkg.ConvertConfig(bits=5, sparsity=0.3))
    torch.testing.assert_close(loaded(ids), reference(ids), rtol=1e-5, atol=1e-5)
    # safetensors weights, and convs: a subclass with its own forward and a grouped conv keep
    # their decoded weight (shared), "same" padding is packed; every one listed with its reason.
    from safetensors.torch import save_file

    save_file(usermodels.make_conv().state_dict(), str(user_folder / "conv.safetensors"))
    run = dcx("convert", "usermodels:make_conv", "--weights", "conv.safetensors", "--bits", "6",
              "--out", "c.dcx", "--quiet", cwd=user_folder)
    assert run.returncode == 0, run.stderr
    assert "| 0 | Padded | 8x3x3x3 | shared | 6 | 0% | Padded overrides nn.Conv2d's forward |" in run.stdout
    assert "groups=4 (SparseQuantConv2d runs groups=1)" in run.stdout
    assert "2 packed, 2 shared with their decoded weight, 0 left dense" in run.stdout
    # export: the decoded weights as safetensors, for tools that know no dcx
    run = dcx("export", "c.dcx", "--out", "c-decoded.safetensors", cwd=user_folder)
    assert run.returncode == 0, run.stderr
    from safetensors.torch import load_file

    exported = load_file(str(user_folder / "c-decoded.safetensors"))
    decoded = dcx_pkg.load_state_dict(user_folder / "c.dcx")
    assert exported.keys() == decoded.keys()
    assert all(torch.equal(exported[k], decoded[k]) for k in decoded)
    plain = usermodels.make_conv()
    plain.load_state_dict(exported)  # a plain model runs the decoded weights


def test_convert_a_transformers_folder(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    import torch

    import dcx as dcx_pkg

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    (tmp_path / "over.yaml").write_text("re:embeddings\\..*: {bits: 4}\npooler.dense: null\n")
    run = dcx("convert", tmp_path / "bert", "--bits", "6", "--overrides", tmp_path / "over.yaml",
              "--compute", "int8", "--out", tmp_path / "bert.dcx", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "smaller than model.safetensors" in run.stdout
    assert "| pooler.dense | Linear | 32x32 | dense |  | 0% | excluded" in run.stdout
    # The file and its config alone rebuild the model; or a model built from the folder's config.
    original = transformers.BertModel.from_pretrained(tmp_path / "bert").eval()
    rebuilt = dcx_pkg.hf.model_from_file(tmp_path / "bert.dcx")
    fresh = transformers.AutoModel.from_config(
        transformers.AutoConfig.from_pretrained(tmp_path / "bert")).eval()
    loaded = dcx_pkg.load(tmp_path / "bert.dcx", fresh)
    assert isinstance(loaded.embeddings.word_embeddings, dcx_pkg.SparseQuantEmbedding)
    for model in (rebuilt, loaded):  # the compute mode comes back from the file, on either path
        assert model.encoder.layer[0].attention.self.query.compute == "int8"
    assert loaded.embeddings.word_embeddings.bits <= 5  # 4 bits, and a zero id if needed
    ids = torch.randint(1, 100, (2, 10))
    with torch.no_grad():
        a, b = rebuilt(ids).last_hidden_state, loaded(ids).last_hidden_state
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        cos = torch.nn.functional.cosine_similarity(a.flatten(1), original(ids).last_hidden_state.flatten(1))
    assert (cos > 0.9).all()


def test_compress_a_factory_model_on_its_own_loaders(user_folder, tmp_path):
    (user_folder / "c.yaml").write_text(SMALL)
    run = dcx("compress", "--config", "c.yaml", "--model", "usermodels:small_mlp",
              "--data", "usermodels:loaders", "--out", "mlp.dcx", "--quiet", "--no-plots",
              cwd=user_folder)
    assert run.returncode == 0, run.stderr + run.stdout
    assert "| encoded |" in run.stdout and "gives the same predictions: yes" in run.stdout
    run = dcx("eval", "mlp.dcx", "--model", "usermodels:small_mlp", "--data", "usermodels:loaders",
              cwd=user_folder)
    assert run.returncode == 0 and "accuracy" in run.stdout


def test_a_failing_late_stage_reports_what_was_done(user_folder):
    """A stage that fails while running: the stages it finished, the file it wrote, then the
    error and its traceback, exit 1 (a failure while running, not a usage error)."""
    (user_folder / "c.yaml").write_text(SMALL)
    run = dcx("compress", "--config", "c.yaml", "--model", "usermodels:breaks_when_packed",
              "--data", "usermodels:loaders", "--out", "mlp.dcx", "--quiet", "--no-plots",
              cwd=user_folder)
    assert run.returncode == 1, run.stderr + run.stdout
    assert "| reference |" in run.stdout and "| quantized |" in run.stdout
    size = (user_folder / "mlp.dcx").stat().st_size
    assert f"file written: mlp.dcx ({size:,} bytes)" in run.stdout
    assert "Traceback" in run.stderr and "this model cannot run once packed" in run.stderr
    assert "dcx: stage 'encoded' failed after 3 finished stage(s); the file mlp.dcx was written" \
        in run.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (("convert", "/no/such/folder", "--bits", "4", "--out", "x.dcx"), "neither a model folder"),
        (("convert", "usermodels:make", "--weights", "missing.pt", "--bits", "4", "--out", "x.dcx"),
         "weights file 'missing.pt' does not exist"),
        (("convert", "usermodels:make", "--bits", "9", "--out", "x.dcx"), r"bits must lie in [1, 8]"),
        (("convert", "usermodels:make", "--bits", "4", "--overrides", "o.yaml", "--out", "x.dcx"),
         "override 'fc9' matches no layer"),
        (("convert", "usermodels:nothing", "--bits", "4", "--out", "x.dcx"), "has no 'nothing'"),
        (("convert", "nomodule:make", "--bits", "4", "--out", "x.dcx"), "cannot import 'nomodule'"),
        (("compress", "--config", "c.yaml", "--data", "usermodels:small_mlp"),
         "must return (train_loader, test_loader)"),
    ],
)
def test_any_model_usage_errors_exit_2(user_folder, args, message):
    (user_folder / "o.yaml").write_text("fc9: {bits: 3}\n")
    (user_folder / "c.yaml").write_text(SMALL)
    run = dcx(*args, cwd=user_folder)
    assert run.returncode == 2, run.stderr + run.stdout
    assert message in run.stderr
    assert not (user_folder / "x.dcx").exists()


def test_a_missing_optional_package_names_its_extra(tmp_path, compressed):
    """Without safetensors (or transformers) the command says which extra to install."""
    _, out, _ = compressed
    code = ("import sys; sys.modules['safetensors'] = None; sys.modules['safetensors.torch'] = None;"
            "from dcx.cli import main; sys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", code, "export", str(out), "--out",
                          str(tmp_path / "x.safetensors")], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert run.returncode == 2, run.stderr
    assert "pip install 'dcx[hf]'" in run.stderr


def test_the_demo_data_needs_no_scikit_learn():
    code = ("import sys; sys.modules['sklearn'] = None; from dcx.data import load_digits;"
            "x, y = load_digits('train'); assert x.shape[1:] == (1, 8, 8); print(len(x))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "1438"


def test_convert_a_language_model_with_tied_embeddings(tmp_path):
    """A causal LM folder with a tokenizer that has no padding token, calibrated on text: its
    own class (the head included), the tied table stored once, and the file alone rebuilds the
    model with the head tied again."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    import torch

    import dcx as dcx_pkg
    from dcx import format as fmt

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "lm")
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "and", "home"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[UNK]", "[SEP]"] + words + ["."]) + "\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt"), pad_token=None, cls_token=None,
                               mask_token=None, eos_token="[SEP]").save_pretrained(tmp_path / "lm")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "corpus.txt").write_text(" ".join(
        " ".join(words[i] for i in torch.randint(0, len(words), (6,), generator=g)) + "."
        for _ in range(40)))
    run = dcx("convert", tmp_path / "lm", "--bits", "5", "--calibration", tmp_path / "corpus.txt",
              "--samples", "24", "--out", tmp_path / "lm.dcx", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "| lm_head | Linear | 100x32 | packed | 5 | 0% | tied to model.embed_tokens |" in \
        run.stdout
    assert fmt.load_records(tmp_path / "lm.dcx")[2]["tied"] == {
        "lm_head.weight": "model.embed_tokens.weight"}
    rebuilt = dcx_pkg.hf.model_from_file(tmp_path / "lm.dcx")
    assert isinstance(rebuilt, transformers.LlamaForCausalLM)
    assert rebuilt.lm_head.codes is rebuilt.model.embed_tokens.codes
    original = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "lm").eval()
    ids = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(rebuilt(ids).logits.flatten(),
                                                    original(ids).logits.flatten(), 0)
    assert cos > 0.95


def test_convert_with_calibration_text(tmp_path):
    """--calibration text files: sentences tokenized by the folder's tokenizer; --scale row; a
    corpus with no sentence, or text files for a model without a tokenizer folder, is a usage
    error that writes no file."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    import torch

    import dcx as dcx_pkg

    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "and", "home"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                  + words + [".", ","]) + "\n")
    config = transformers.BertConfig(vocab_size=5 + len(words) + 2, hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    folder = tmp_path / "bert"
    transformers.BertModel(config).save_pretrained(folder)
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    text = " ".join(" ".join(words[i] for i in torch.randint(0, len(words), (6,), generator=g))
                    + "." for _ in range(60))
    (tmp_path / "corpus.txt").write_text(text)
    run = dcx("convert", folder, "--bits", "3", "--calibration", tmp_path / "corpus.txt",
              "--samples", "40", "--scale", "row", "--no-embeddings", "--out",
              tmp_path / "bert.dcx", "--quiet")
    assert run.returncode == 0, run.stderr
    loaded = dcx_pkg.hf.model_from_file(tmp_path / "bert.dcx")
    assert loaded.encoder.layer[0].attention.self.query.scale is not None
    (tmp_path / "empty.txt").write_text("no.\n")
    run = dcx("convert", folder, "--bits", "3", "--calibration", tmp_path / "empty.txt",
              "--out", tmp_path / "none.dcx", "--quiet")
    assert run.returncode == 2 and "no sentence of 4 to 64 words" in run.stderr
    assert not (tmp_path / "none.dcx").exists()
    run = dcx("convert", folder, "--bits", "3", "--calibration", tmp_path / "missing.txt",
              "--out", tmp_path / "none.dcx", "--quiet")
    assert run.returncode == 2 and "missing.txt' does not exist" in run.stderr


def test_convert_with_calibration_images(user_folder):
    """--calibration FOLDER: the photos in it, resized to --image-size and normalised, calibrate
    a package.module:factory CNN (gptq and weighted); an empty folder is a usage error that
    writes no file."""
    from tests.test_data import write_images

    write_images(user_folder / "photos", 6, size=(16, 10))
    for method in ("gptq", "weighted"):
        run = dcx("convert", "usermodels:make_conv", "--bits", "4", "--calibration", "photos",
                  "--image-size", "8", "--method", method, "--out", f"{method}.dcx", "--quiet",
                  cwd=user_folder)
        assert run.returncode == 0, run.stderr
        assert (user_folder / f"{method}.dcx").exists()
    (user_folder / "empty").mkdir()
    run = dcx("convert", "usermodels:make_conv", "--bits", "4", "--calibration", "empty",
              "--image-size", "8", "--out", "none.dcx", "--quiet", cwd=user_folder)
    assert run.returncode == 2 and "no image" in run.stderr
    assert not (user_folder / "none.dcx").exists()
    run = dcx("convert", "usermodels:make_conv", "--bits", "4", "--calibration", "photos",
              "--image-size", "0", "--out", "none.dcx", "--quiet", cwd=user_folder)
    assert run.returncode == 2 and "image size must be >= 1" in run.stderr


def test_convert_with_distillation(user_folder):
    """--distill STEPS retrains on the --corpus inputs after pruning and after sharing, says
    how each stage went (metric and file size), plots the metric against the step and writes
    the file; a time budget works the same; --distill without inputs, or with no budget, is a
    usage error that writes no file."""
    from tests.test_data import write_images

    write_images(user_folder / "photos", 6, size=(16, 10))
    run = dcx("convert", "usermodels:make_conv", "--bits", "4", "--sparsity", "0.5",
              "--corpus", "photos", "--image-size", "8", "--distill", "3",
              "--out", "distilled.dcx", "--quiet", cwd=user_folder)
    assert run.returncode == 0, run.stderr
    assert "retraining by distillation (1 process)" in run.stdout
    assert "| pruned by magnitude, retrained | 3 |" in run.stdout
    assert "| shared (calibrated), codebooks retrained | 3 |" in run.stdout
    size = (user_folder / "distilled.dcx").stat().st_size
    assert f"| {size:,} |" in run.stdout
    assert (user_folder / "distilled-distill.png").stat().st_size > 0
    run = dcx("convert", "usermodels:make_conv", "--bits", "4", "--corpus", "photos",
              "--image-size", "8", "--distill", "1s", "--no-plots", "--out", "timed.dcx",
              "--quiet", cwd=user_folder)
    assert run.returncode == 0, run.stderr
    assert "| shared (calibrated), codebooks retrained |" in run.stdout
    assert "| pruned" not in run.stdout and not (user_folder / "timed-distill.png").exists()
    for extra, match in ((["--distill", "3"], "give them with --corpus"),
                         (["--distill", "0", "--corpus", "photos"], "more than zero"),
                         (["--distill", "0m", "--corpus", "photos"], "more than zero"),
                         (["--distill", "ten", "--corpus", "photos"], "a step count (300) or"),
                         (["--distill", "3", "--corpus", "empty"], "no image (")):
        (user_folder / "empty").mkdir(exist_ok=True)
        run = dcx("convert", "usermodels:make_conv", "--bits", "4", *extra, "--out", "none.dcx",
                  "--quiet", cwd=user_folder)
        assert run.returncode == 2 and match in run.stderr, (extra, run.stderr)
        assert not (user_folder / "none.dcx").exists()


def test_convert_to_a_ratio(user_folder):
    """--ratio picks the smallest whole-percent sparsity whose file is that many times smaller
    than the fp32 parameters (a factory model without --weights); an unreachable ratio, or one
    given with --sparsity, is a usage error."""
    sys.path.insert(0, str(user_folder))
    try:
        import usermodels
    finally:
        sys.path.remove(str(user_folder))
    fp32 = 4 * sum(p.numel() for p in usermodels.make_conv().parameters())
    run = dcx("convert", "usermodels:make_conv", "--bits", "4", "--ratio", "5",
              "--out", "r.dcx", "--quiet", cwd=user_folder)
    assert run.returncode == 0, run.stderr
    chosen = next(line for line in run.stdout.splitlines() if line.startswith("--ratio 5:"))
    percent = int(chosen.split("sparsity ")[1].split("%")[0])
    assert 0 < percent < 99
    assert (user_folder / "r.dcx").stat().st_size <= fp32 / 5
    run = dcx("convert", "usermodels:make_conv", "--bits", "4",
              "--sparsity", f"{(percent - 1) / 100}", "--out", "below.dcx", "--quiet",
              cwd=user_folder)
    assert run.returncode == 0 and (user_folder / "below.dcx").stat().st_size > fp32 / 5
    for extra, match in ((["--ratio", "1000"], "cannot be reached at 4 bits"),
                         (["--ratio", "5", "--sparsity", "0.5"], "not both"),
                         (["--ratio", "1"], "more than 1")):
        run = dcx("convert", "usermodels:make_conv", "--bits", "4", *extra, "--out", "none.dcx",
                  "--quiet", cwd=user_folder)
        assert run.returncode == 2 and match in run.stderr, (extra, run.stderr)
        assert not (user_folder / "none.dcx").exists()


def test_convert_with_distillation_under_torchrun(user_folder):
    """Two processes (torchrun, gloo): each retrains on its share of the batches, rank 0
    alone reports and writes the file, which loads."""
    import torch.distributed as dist

    import dcx as dcx_pkg

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from tests.test_data import write_images

    write_images(user_folder / "photos", 20, size=(16, 10))  # two batches of up to 16
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "dcx.cli", "convert",
                          "usermodels:make_conv", "--bits", "4", "--sparsity", "0.5",
                          "--corpus", "photos", "--image-size", "8", "--distill", "2",
                          "--out", "ddp.dcx", "--quiet"], capture_output=True, text=True,
                         cwd=user_folder, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("retraining by distillation (2 processes)") == 1
    sys.path.insert(0, str(user_folder))
    try:
        import usermodels
    finally:
        sys.path.remove(str(user_folder))
    dcx_pkg.load(user_folder / "ddp.dcx", usermodels.make_conv())


def test_the_compute_choices_are_the_layers_modes():
    from dcx import cli, config, nn

    assert cli.CONVERT_METHODS == config.CONVERT_METHODS
    assert cli.COMPUTE_MODES == nn.COMPUTE_MODES
    choices = [a.choices for a in cli.parser()._subparsers._group_actions[0].choices["convert"]._actions
               if a.dest == "compute"]
    assert choices == [nn.COMPUTE_MODES]
