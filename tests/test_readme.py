"""The README's examples marked `<!-- runs as written: tests/test_readme.py -->` run as written,
in a scratch folder."""

import re
from pathlib import Path

import pytest

from tests.testing import requires_kernels

README = Path(__file__).resolve().parents[1] / "README.md"
MARK = "<!-- runs as written: tests/test_readme.py"  # then " -->" or " (needs: module, ...) -->"


def marked_blocks():
    """[(the modules a block needs, its code)] of the marked python blocks."""
    text = README.read_text()
    found = re.findall(re.escape(MARK) + r"(?: \(needs: ([^)]*)\))? -->\s*```python\n(.*?)```",
                       text, re.S)
    return [([m.strip() for m in needs.split(",") if m.strip()], code) for needs, code in found]


def test_the_readme_marks_its_examples():
    assert marked_blocks(), f"no block in README.md is marked {MARK!r}"


@requires_kernels
@pytest.mark.parametrize("index", range(len(marked_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch, capsys):
    needs, code = marked_blocks()[index]
    for module in needs:
        pytest.importorskip(module, reason=f"README block {index} needs {module} "
                                           "(pip install -e '.[bench]')")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, f"README.md block {index}", "exec"), {})
