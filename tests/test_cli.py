"""`cuconv info` says what works here, worded by the actual cause (CuPy missing, no
driver, a driver too old for CuPy's CUDA, the GPUs), with versions and caches."""

import types

import pytest

from cuconv import cli


def _info(capsys) -> str:
    assert cli.main(["info"]) == 0
    return capsys.readouterr().out


def _fake_cupy(runtime: int, devices: list[dict]):
    def count():
        if not devices:
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return len(devices)

    runtime_api = types.SimpleNamespace(runtimeGetVersion=lambda: runtime, getDeviceCount=count,
                                        getDeviceProperties=lambda i: devices[i])
    return types.SimpleNamespace(__version__="14.2.0", cuda=types.SimpleNamespace(runtime=runtime_api))


def test_info_lists_backends_versions_and_caches(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CUCONV_CACHE_DIR", str(tmp_path))
    out = _info(capsys)
    assert "interpret backend: works (g++" in out
    for name in ("numpy", "CuPy", "NVRTC", "torch", "jax", "g++"):
        assert name in out.split("versions:")[1].splitlines()[0], name
    assert f"kernel cache (interpret): {tmp_path}" in out and "autotuning: " in out


@pytest.mark.parametrize("driver,runtime,devices,expected", [
    (None, 13000, [], "cuda backend: no NVIDIA driver found (CuPy 14.2.0 is installed)"),
    ((12, 4), 13000, [], "cuda backend: driver too old for CUDA 13.0 (CuPy 14.2.0); the driver supports CUDA 12.4"),
    ((13, 0), 13000, [], "cuda backend: no usable GPU (RuntimeError: cudaErrorNoDevice"),
    ((13, 0), 12090, [dict(name=b"NVIDIA H100 80GB HBM3", major=9, minor=0, totalGlobalMem=80 * 2**30)],
     "  GPU 0: NVIDIA H100 80GB HBM3 (sm_90, 80 GiB)"),
])
def test_gpu_status_names_the_cause(capsys, monkeypatch, driver, runtime, devices, expected):
    monkeypatch.setitem(__import__("sys").modules, "cupy", _fake_cupy(runtime, devices))
    monkeypatch.setattr(cli, "_driver_cuda_version", lambda: driver)
    assert expected in "\n".join(cli._gpu_status())


def test_gpu_status_without_cupy(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "cupy", None)
    assert cli._gpu_status()[0].startswith("cuda backend: CuPy not installed")
