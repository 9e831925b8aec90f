"""The NVRTC compile check (`cuconv check`). Every instantiation of every module is
compiled once, by `.ci/run`'s `cuconv check` (a failure fails CI); here a representative
subset: the direct conv kernels, the tensor-core kernels (inline PTX: mma, ldmatrix,
cvt) and a data-movement kernel, for sm_80 and sm_90. `.ci/run` also runs
`cuconv check --via cupy` in a CuPy 14.2 venv per CUDA toolkit; here that path on a
small subset where CuPy is installed, and its refusal of other CuPy versions."""

import sys
import types

import pytest

from cuconv import _cupy_compile, check


try:
    import nvidia.cuda_nvrtc  # noqa: F401  (the NVRTC wheel cuconv's own binding loads)

    HAVE_NVRTC = True
except ImportError:
    HAVE_NVRTC = False
needs_nvrtc = pytest.mark.skipif(not HAVE_NVRTC, reason="nvidia-cuda-nvrtc-cu12 not installed (pip install '.[check]')")

SUBSET = ("conv2d.cu", "depthwise_tc.cu", "pixel_shuffle.cu")


@needs_nvrtc
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


@needs_nvrtc
def test_cli_prints_a_row_per_kernel(capsys):
    from cuconv.cli import main

    assert main(["check", "--arch", "sm_90", "--module", "pixel_shuffle.cu"]) == 0
    out = capsys.readouterr().out
    assert "pixel_shuffle_fwd<__nv_bfloat16>" in out and "sm_90" in out
    assert "8 kernel instantiations compiled for sm_90; 0 spill registers." in out
    assert main(["check", "--module", "conv9d.cu"]) == 2
    assert "no kernel module ['conv9d.cu']" in capsys.readouterr().out


def _cupy_toolchain():
    """The CuPy toolchain here, or a skip saying why there is none."""
    pytest.importorskip("cupy", reason="CuPy not installed: `cuconv check --via cupy` runs in .ci/run's "
                                       "CuPy 14.2 venvs (pip install '.[cuda12]' or '.[cuda13]')")
    try:
        return _cupy_compile.toolchain()
    except _cupy_compile.CupyUnavailable as e:
        pytest.skip(f"CuPy cannot compile here: {e}")


def test_via_cupy_compiles_a_subset_through_cupys_path(capsys):
    _cupy_toolchain()
    from cupy.cuda import compiler

    probe = compiler._get_arch_for_options_for_nvrtc
    modules = ("pixel_shuffle.cu", "channel_shuffle.cu")
    rows = check.compile_all(modules=modules, via="cupy", workers=2)
    expected = {(m.filename, name, arch) for m in check.selected_modules(modules)
                for name in m.name_expressions for arch in check.ARCHS}
    assert {(r.module, r.kernel, r.arch) for r in rows} == expected and len(rows) == len(expected)
    for r in rows:  # every name expression was lowered and found in ptxas's report
        assert r.resources.registers and r.resources.spill_stores == 0 and r.resources.shared_bytes is not None, r
    assert compiler._get_arch_for_options_for_nvrtc is probe  # CuPy's device probe is back

    assert check.main(("sm_90",), ["pixel_shuffle.cu"], via="cupy") == 0
    out = capsys.readouterr().out
    assert "compiling through CuPy's compile path: CuPy 14.2" in out and "NVRTC " in out
    assert "pixel_unshuffle_fwd<__nv_bfloat16>" in out and "8 kernel instantiations compiled for sm_90" in out


@pytest.mark.parametrize("version", ["15.0.0", "14.1.0", "13.6.1"])
def test_via_cupy_refuses_another_cupy_version(monkeypatch, capsys, version):
    # CuPy's private compile functions are used as 14.2 has them: another release is
    # refused before anything is compiled or even looked up in it.
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(__version__=version))
    assert check.main(("sm_90",), ["pixel_shuffle.cu"], via="cupy") == 2
    out = capsys.readouterr().out
    assert f"this is CuPy {version}" in out and "CuPy 14.2.x" in out and "plain `cuconv check`" in out
    assert "kernel instantiations compiled" not in out


def test_via_cupy_without_cupy_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    from cuconv.cli import main

    assert main(["check", "--via", "cupy", "--module", "pixel_shuffle.cu"]) == 2
    assert "needs CuPy 14.2: pip install '.[cuda12]' or '.[cuda13]'" in capsys.readouterr().out


def test_via_cupy_fails_on_a_spill(monkeypatch, capsys):
    from cuconv._nvrtc import CompileResult, KernelResources

    module = check.selected_modules(["pixel_shuffle.cu"])[0]
    spilling = {name: KernelResources(255, 8 if "unshuffle" in name else 0, 8, 0) for name in module.name_expressions}
    monkeypatch.setattr(_cupy_compile, "toolchain", lambda: types.SimpleNamespace(describe=lambda: "a stand-in"))
    monkeypatch.setattr(_cupy_compile, "compile_all",
                        lambda jobs, workers: [CompileResult(arch, b"", "", {}, spilling) for *_, arch, _ in jobs])
    assert check.main(("sm_90",), ["pixel_shuffle.cu"], via="cupy") == 1
    out = capsys.readouterr().out
    assert "cuconv check --via cupy: spills: pixel_unshuffle_fwd<__half> (sm_90)" in out
    assert "pixel_shuffle_fwd<__half> (sm_90)" not in out.split("spills:")[1]
