"""Tests for bench/: the CPU path of `python -m bench --quick` end to end, and the
error / tolerance helper its verdicts rest on."""

import os
import subprocess
import sys

import numpy as np
import pytest

from bench import harness  # the repo root is on sys.path: conftest.py
from bench.__main__ import NO_GPU, RESULTS_DIR
from conftest import REPO


def _results_files():
    return sorted(RESULTS_DIR.glob("*.json")) if RESULTS_DIR.exists() else []


@pytest.mark.skipif(harness.cuda_gpu_usable(), reason="the no-GPU path; a GPU run times and writes results")
def test_quick_run_without_gpu(tmp_path):
    before = _results_files()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("CUCONV_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(tmp_path / "r.json"), "--plot"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    from bench import SUITES, suite_ops

    # The compact table: one line per public op and dtype, PASS, over at least a forward
    # and a backward row each.
    lines = [line.split() for line in out.splitlines()]
    for suite in SUITES:
        for op in suite_ops(suite):
            for dtype in harness.ALL_DTYPES:
                mine = [r for r in lines if r[:2] == [op, dtype]]
                assert len(mine) == 1 and mine[0][-1] == "PASS" and int(mine[0][2]) >= 2, (op, dtype, out)
    assert "FAIL" not in out
    assert NO_GPU in out
    assert "--json and --plot: nothing written, there are no timings without a GPU." in out
    assert out.strip().splitlines()[-1].startswith("self-check: ") and " 0 failed" in out.strip().splitlines()[-1]
    # No results anywhere: neither the --json path nor the default directory.
    assert not (tmp_path / "r.json").exists()
    assert _results_files() == before


def test_op_names_select_suites_and_help_lists_them(capsys):
    from bench import suites_named
    from bench.__main__ import parse_args

    assert [s.NAME for s in parse_args(["--op", "deform_conv2d"]).suites] == ["deform_conv"]
    assert [s.NAME for s in parse_args(["--op", "odconv2d,involution"]).suites] == ["dynamic_conv", "involution"]
    assert suites_named("deform_conv") == suites_named("deform_conv2d")
    with pytest.raises(SystemExit):
        parse_args(["--op", "conv9d"])
    assert "--op: unknown ['conv9d']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert text.startswith("usage: cuconv bench") and "deform_conv2d (suite deform_conv)" in text
    assert "python -m bench" not in text


def test_rel_error_and_tolerance_fail_a_wrong_result():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 4, 5, 6))
    scale = np.abs(ref).max()
    wrong = ref + 1e-2 * scale * rng.choice([-1.0, 1.0], ref.shape)  # 1e-2 relative perturbation
    err = harness.rel_error(wrong, ref)
    assert err == pytest.approx(1e-2)
    for dtype, anchor in (("float64", None), ("float32", None), ("float16", 1e-4), ("bfloat16", 1e-3)):
        tol, _ = harness.tolerance(dtype, anchor)
        assert not harness.within(err, tol), dtype
    # float16 with no torch anchor: the documented 2e-2 bound lets 1e-2 through, but not 3e-2.
    assert harness.tolerance("float16", None) == (2e-2, "bound")
    assert not harness.within(harness.rel_error(ref + 3e-2 * scale, ref), 2e-2)
    # The right answer, rounded to float32, passes; NaN and a wrong shape always fail.
    assert harness.within(harness.rel_error(ref.astype(np.float32), ref), harness.tolerance("float32", None)[0])
    poisoned = ref.copy()
    poisoned[0, 0, 0, 0] = np.nan
    assert harness.rel_error(poisoned, ref) == np.inf
    assert harness.rel_error(ref[:1], ref) == np.inf


def test_tolerance_from_torch_anchor():
    assert harness.tolerance("float16", 1e-3) == (2e-3, "2x torch")
    assert harness.tolerance("float16", 1e-5) == (2.0**-10, "floor")
    assert harness.tolerance("bfloat16", 1e-2) == (2e-2, "2x torch")
    assert harness.tolerance("float64", 0.5) == (1e-9, "fixed")


def test_every_suite_builds_its_gpu_cases():
    """The GPU rows cannot run here; at least every suite must describe them: unique
    labels per (dtype, pass), and work (FLOPs or bytes) to rate them by."""
    from bench import SUITES

    for suite in SUITES:
        for quick in (True, False):
            cases = suite.bench_cases(harness.GPU_DEFAULT_DTYPES, quick, None)
            assert cases, suite.NAME
            keys = [(c.label, c.dtype, c.pass_) for c in cases]
            assert len(keys) == len(set(keys)), suite.NAME
            assert all(c.flops > 0 or c.bytes_moved > 0 for c in cases), suite.NAME


def test_markdown_table_and_plots_of_a_result(tmp_path):
    """The report code on a result shaped like the one `cuconv bench` writes on a GPU. The
    numbers are made up for the test and written only to tmp_path."""
    from bench import plots

    rows = [
        {"op": "conv2d", "shape": "3x3 64->64 56", "dtype": "float16", "pass": "fwd", "cuconv_ms": 0.5,
         "cuconv_peak_mib": 12.0, "tflops": 100.0, "fraction_of_gemm": 0.2, "gbs": 800.0, "fraction_of_copy": 0.3,
         "baselines": {"torch": {"ms": 0.4, "ratio": 0.8, "peak_mib": 20.0},
                       "torch CL": {"ms": 0.3, "ratio": 0.6, "peak_mib": 18.0}}},
        {"op": "pixel_shuffle", "shape": "ESPCN x3", "dtype": "float32", "pass": "fwd", "cuconv_ms": 0.2,
         "cuconv_peak_mib": None, "gbs": 2000.0, "fraction_of_copy": 0.7,
         "baselines": {"torch": {"ms": 0.3, "ratio": 1.5, "peak_mib": None}}},
    ]
    table = harness.markdown_table(rows)
    assert table.count("\n") == 3  # header, rule, two rows
    assert "| 0.80 |" in table and "| 70.0% |" in table and "12 / 20" in table and "- / -" in table
    result = {"device": "test device", "date": "2026-01-01T00:00:00+00:00", "rows": rows,
              "ceilings": {"copy_gbs": 3000.0, "gemm_tflops": 700.0, "gemm": "bf16 GEMM"}}
    for png in plots.write_plots(result, tmp_path / "result.json"):
        assert png.parent == tmp_path and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_session_script_parses_and_names_existing_tests():
    """tools/gpu_session.sh runs on a GPU only; here: valid bash, and every test file it
    names exists (a rename must not silently empty the sanitizer stage)."""
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = root / "tools" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    named = set(re.findall(r"tests/[\w/]+\.py", script.read_text()))
    assert named and all((root / path).is_file() for path in named), named
