"""docs/performance.md from the result files in bench/results/: one section per device
(its name, the date of the run, versions, the ceilings measured in that run, the table
and the plots). `python -m bench.report` rewrites the page; tests/test_docs.py fails
when the committed page is not what the committed results give."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .harness import markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "docs" / "performance.md"
IMAGES = ROOT / "docs" / "img"

HEADER = """# Performance

Every number here was measured by `cuconv bench` on the device it names, with each
baseline timed in the same process on the same inputs. The method is CUDA events after
warm-up, the median of many runs, and input sets rotated so that L2 does not hold them.
Ratios are baseline time / cuconv time, so a value above 1 means cuconv is faster.
The ceilings (a large device-to-device copy and a large bf16 GEMM) were measured in the
same run. This page is generated from `bench/results/*.json` by `python -m bench.report`.
"""


def render(results_dir: Path = RESULTS, images_dir: Path | None = IMAGES) -> str:
    """The page's Markdown; copies each result's plots into `images_dir` (when given)."""
    files = sorted(results_dir.glob("*.json"))
    if not files:
        return HEADER + ("\nNo GPU results have been recorded yet: every development session so far ran "
                         "without a GPU, so nothing has been measured. The kernels are verified on the "
                         "interpret backend and compiled for sm_80/sm_90 by `cuconv check`.\n")
    parts = [HEADER]
    for path in files:
        result = json.loads(path.read_text())
        c, v = result["ceilings"], result["versions"]
        parts.append(f"\n## {result['device']}\n\nRun of {result['date']} (cuconv {v.get('cuconv')}, "
                     f"CuPy {v.get('cupy')}, torch {v.get('torch')}). Ceilings: device-to-device copy "
                     f"{c['copy_gbs']:.0f} GB/s, {c['gemm']} {c['gemm_tflops']:.1f} TFLOP/s. Self-check: "
                     f"{result['self_check']['passed']} passed, {result['self_check']['failed']} failed.\n\n")
        parts.append(markdown_table(result["rows"]) + "\n")
        for kind in ("ratios", "roofline"):
            png = path.with_name(f"{path.stem}-{kind}.png")
            if png.is_file() and images_dir is not None:
                images_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, images_dir / png.name)
                parts.append(f"\n![{kind}: {result['device']}](img/{png.name})\n")
    return "".join(parts)


def main() -> int:
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
