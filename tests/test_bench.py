"""Tests for bench/: the CPU path of `python -m bench --quick` end to end, and the
error / tolerance helper its verdicts rest on."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is a repo-root package, not part of the installed cuconv
    sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.__main__ import NO_GPU, RESULTS_DIR  # noqa: E402


def _results_files():
    return sorted(RESULTS_DIR.glob("*.json")) if RESULTS_DIR.exists() else []


@pytest.mark.skipif(harness.cuda_gpu_usable(), reason="the no-GPU path; a GPU run times and writes results")
def test_quick_run_without_gpu(tmp_path):
    before = _results_files()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("CUCONV_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(tmp_path / "r.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    from bench import SUITES

    for suite in SUITES:
        rows = [line.split() for line in out.splitlines() if line.startswith(suite.NAME + " ")]
        for dtype in harness.ALL_DTYPES:
            mine = [r for r in rows if dtype in r]
            assert mine and all(r[-1] == "PASS" for r in mine), (suite.NAME, dtype, out)
            assert {"fwd", "bwd"} <= {r[1] for r in mine}, (suite.NAME, dtype, out)
    assert "FAIL" not in out
    assert NO_GPU in out
    # No results anywhere: neither the --json path nor the default directory.
    assert not (tmp_path / "r.json").exists()
    assert _results_files() == before


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
