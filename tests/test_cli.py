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
