"""The documentation: every ```python block in README.md and docs/**/*.md runs (the blocks
of one page share a namespace, in order); ```py blocks are GPU-only examples and run
when a GPU is present; the site builds with `mkdocs build --strict`; the performance
page is what bench/results gives."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import gpu_available

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: p.name)
def test_examples_run(page):
    namespace = {}
    for block in blocks(page, "python"):
        exec(compile(block, str(page), "exec"), namespace)


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "py")], ids=lambda p: p.name)
@pytest.mark.skipif(not gpu_available(), reason="GPU-only examples (```py blocks)")
def test_gpu_examples_run(page):
    namespace = {}
    for block in blocks(page, "py"):
        exec(compile(block, str(page), "exec"), namespace)


def test_examples_exist():
    assert sum(len(blocks(p, "python")) for p in PAGES) >= 10


def test_site_builds_without_warnings(tmp_path):
    """--strict: a page missing from the nav, a broken link or anchor fails the build."""
    pytest.importorskip("mkdocs", reason="pip install '.[test]' brings mkdocs")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "conv2d" / "index.html").is_file()


def test_performance_page_matches_the_results():
    from bench import report

    assert report.PAGE.read_text() == report.render(images_dir=None), "run: python -m bench.report"
