"""The NVRTC compile check (`cuconv check`): every kernel instantiation compiles for
sm_80 and sm_90 without a GPU."""

import pytest

pytest.importorskip("nvidia.cuda_nvrtc", reason="nvidia-cuda-nvrtc-cu12 not installed (pip install '.[check]')")

from cuconv import check  # noqa: E402
from cuconv.check import all_modules  # noqa: E402


def test_every_instantiation_compiles_for_sm80_and_sm90():
    rows = check.compile_all()
    expected = {(m.filename, name, arch) for m in all_modules() for name in m.name_expressions for arch in check.ARCHS}
    assert {(r.module, r.kernel, r.arch) for r in rows} == expected
    assert len(expected) >= 32
    for r in rows:
        assert r.resources.registers is not None and r.resources.registers > 0, r
        assert r.resources.spill_stores == 0, f"{r.kernel} spills on {r.arch}"


def test_cli_prints_a_row_per_kernel(capsys):
    from cuconv.cli import main

    assert main(["check", "--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    assert "conv2d_bwd_weight<__nv_bfloat16>" in out and "sm_90" in out
    assert "compiled for sm_90" in out
