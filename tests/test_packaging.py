"""A built wheel (non-editable install) contains the kernels and finds them."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_kernels_and_runs_from_site_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("cuconv-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT / "kernels_cu").as_posix() for p in (ROOT / "kernels_cu").rglob("*.cu*")}
    assert sources and {f"cuconv/kernels_cu/{s}" for s in sources} <= names
    assert "cuconv/interpret/cuda_emulation.h" in names
    assert "cuconv/bench/harness.py" in names and not any(n.startswith("cuconv/bench/results/") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True)
    script = ("import cuconv, numpy as np; from cuconv._kernels import kernels_dir; "
              "print(kernels_dir()); print(cuconv.conv2d(np.ones((1,1,4,4)), np.ones((1,1,3,3))).sum())")
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=env).stdout.split()
    assert Path(out[0]).is_relative_to(target)  # the installed copy, not the checkout
    assert float(out[1]) == 36.0
    # `cuconv bench` from the wheel: bench/ ships as cuconv.bench and writes no results
    bench = subprocess.run([sys.executable, "-m", "cuconv", "bench", "--quick", "--op", "pixel_shuffle",
                            "--dtype", "float32"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    assert "self-check: 12 passed, 0 failed" in bench.stdout
    assert not (tmp_path / "cuconv-bench-results").exists()
