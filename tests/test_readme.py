"""The README's examples marked `<!-- runs as written: tests/test_readme.py -->` run as written,
in a scratch folder."""

import re
from pathlib import Path

import pytest

from tests.testing import requires_kernels

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- runs as written: tests/test_readme.py -->"


def marked_blocks():
    text = README.read_text()
    return re.findall(re.escape(MARK) + r"\s*```python\n(.*?)```", text, re.S)


def test_the_readme_marks_its_examples():
    assert marked_blocks(), f"no block in README.md is marked {MARK!r}"


@requires_kernels
@pytest.mark.parametrize("index", range(len(marked_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(marked_blocks()[index], f"README.md block {index}", "exec"), {})
