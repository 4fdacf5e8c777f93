"""Every Python block in README.md and docs/ runs as pasted, each on its own, in a fresh folder
(the README's Quickstart runs in test_readme.py, which also checks what it prints)."""
import re
import textwrap
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks():
    for page in PAGES:
        text = page.read_text()
        # fenced blocks, also indented ones inside list items
        for match in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M):
            line = text[:match.start()].count("\n") + 1
            if page.name == "README.md" and text.rfind("## ", 0, match.start()) == text.find("## Quickstart"):
                continue
            yield pytest.param(page, textwrap.dedent(match.group(2)), id=f"{page.name}:{line}")


BLOCKS = list(python_blocks())


def test_the_pages_have_blocks_to_run():
    assert len(BLOCKS) >= 8  # a regex that stopped matching would otherwise pass silently


@pytest.mark.parametrize("page, code", BLOCKS)
@pytest.mark.slow
def test_block_runs_as_pasted(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        exec(compile(code, f"{page.name} block", "exec"), {"__name__": "__docs__"})
