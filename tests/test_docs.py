"""Every ```python block in README.md and docs/*.md runs (blocks of one file share a
namespace, in order)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_examples_run(page):
    namespace = {}
    for block in python_blocks(page):
        exec(compile(block, str(page), "exec"), namespace)


def test_examples_exist():
    assert sum(len(python_blocks(p)) for p in PAGES) >= 3
