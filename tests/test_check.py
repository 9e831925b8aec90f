"""The NVRTC compile check (`cuconv check`). Every instantiation of every module is
compiled once, by `.ci/run`'s `cuconv check` (a failure fails CI); here a representative
subset: the direct conv kernels, the tensor-core kernels (inline PTX: mma, ldmatrix,
cvt) and a data-movement kernel, for sm_80 and sm_90."""

import pytest

pytest.importorskip("nvidia.cuda_nvrtc", reason="nvidia-cuda-nvrtc-cu12 not installed (pip install '.[check]')")

from cuconv import check  # noqa: E402

SUBSET = ("conv2d.cu", "depthwise_tc.cu", "pixel_shuffle.cu")


def test_a_representative_subset_compiles_for_sm80_and_sm90():
    rows = check.compile_all(modules=SUBSET)
    modules = check.selected_modules(SUBSET)
    expected = {(m.filename, name, arch) for m in modules for name in m.name_expressions for arch in check.ARCHS}
    assert {(r.module, r.kernel, r.arch) for r in rows} == expected
    assert {m.filename for m in modules} == set(SUBSET) and len(expected) >= 32
    for r in rows:
        assert r.resources.registers is not None and r.resources.registers > 0, r
        assert r.resources.spill_stores == 0, f"{r.kernel} spills on {r.arch}"


def test_every_module_is_listed():
    names = {m.filename for m in check.all_modules()}
    assert {"conv2d.cu", "conv2d_igemm.cu", "deform_conv.cu", "dynamic_conv.cu", "spectral.cu"} <= names


def test_cli_prints_a_row_per_kernel(capsys):
    from cuconv.cli import main

    assert main(["check", "--arch", "sm_90", "--module", "pixel_shuffle.cu"]) == 0
    out = capsys.readouterr().out
    assert "pixel_shuffle_fwd<__nv_bfloat16>" in out and "sm_90" in out
    assert "8 kernel instantiations compiled for sm_90; 0 spill registers." in out
    assert main(["check", "--module", "conv9d.cu"]) == 2
    assert "no kernel module ['conv9d.cu']" in capsys.readouterr().out
