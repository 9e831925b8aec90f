"""cuconv/_probes.py: the tensor-core fragment probes, the per-device verdict, and the
'auto' rule built on it (cuconv/ops/_algorithms.py).

On the interpret backend the probes test the host fallbacks of kernels_cu/common/mma.cuh
against the layouts they document; each probe is shown to fail when its expected answer
or its kernel's output is wrong. CUCONV_TENSOR_CORE_PROBES=pass|fail forces the verdict,
so the 'auto' rule is tested both ways without a GPU."""

import json
import sys
import types
import warnings

import numpy as np
import pytest

import cuconv
from cuconv import _autotune, _probes, cli
from cuconv.ops.conv2d import CONV2D, conv_geometry
from cuconv.ops.dynamic_conv import DYNAMIC
from conftest import gpu_available


@pytest.fixture(autouse=True)
def fresh_verdicts():
    _probes.forget()
    yield
    _probes.forget()


@pytest.fixture
def verdict(monkeypatch):
    """verdict('pass' | 'fail' | 'run'): sets CUCONV_TENSOR_CORE_PROBES."""
    return lambda mode: monkeypatch.setenv("CUCONV_TENSOR_CORE_PROBES", mode)


class FakeCall:
    backend = "interpret"
    device_id = 0
    dtype = "float16"


def _geometry(x_shape, w_shape, stride=1, groups=1):
    return conv_geometry("test", x_shape, w_shape, None, stride, 0, 1, groups)


def _rng_arrays(seed, *shapes, dtype=np.float16):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


# --- the probes ---

def test_probes_pass_on_interpret():
    report = _probes.run_probes(backend="interpret")
    assert report.passed, report.results
    assert set(report.results) == set(_probes.PROBES) and set(report.results.values()) == {"ok"}
    assert report.device.startswith("interpret")
    assert json.loads(json.dumps(report.as_dict()))["results"] == report.results


@pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU")
def test_probes_pass_on_every_gpu():
    import cupy

    for device in range(cupy.cuda.runtime.getDeviceCount()):
        report = _probes.run_probes(device, "cuda")
        assert report.passed, report.as_dict()


def _wrong_tf32(values):
    """tf32 with ties to even instead of away from zero (a plausible misreading of cvt.rna)."""
    u = np.asarray(values, np.float32).view(np.uint32)
    rounded = (u + np.uint32(0x0FFF) + ((u >> 13) & np.uint32(1))) & np.uint32(0xFFFFE000)
    finite = (u & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    return np.where(finite, rounded, u).astype(np.uint32).view(np.float32)


def _misread_layout(name, expected):
    """The expected answer under a plausible layout mistake for each probe."""
    if name.startswith("mma"):
        return np.roll(expected, 1, axis=-1)  # D's column 2t + (i & 1) off by one
    if name.startswith("ldmatrix"):
        return expected.reshape(*expected.shape[:-1], 4, 2)[..., ::-1].reshape(expected.shape)  # halves swapped
    return None  # cvt: see _wrong_tf32


@pytest.mark.parametrize("name", sorted(_probes.PROBES))
def test_each_probe_fails_on_a_wrong_expected_layout(monkeypatch, name):
    probe = _probes.PROBES[name]
    if name == "cvt_rna_tf32":
        wrong = lambda dtype, inputs: _wrong_tf32(inputs[0])  # noqa: E731
    else:
        wrong = lambda dtype, inputs: _misread_layout(name, probe.expected(dtype, inputs))  # noqa: E731
    monkeypatch.setitem(_probes.PROBES, name, _probes.Probe(probe.kernel, probe.dtype, probe.inputs, wrong,
                                                            probe.where))
    report = _probes.run_probes(backend="interpret")
    assert not report.passed
    assert list(report.failures()) == [name]
    assert "elements differ; first at (tile," in report.results[name]
    assert "\n" not in report.results[name]


@pytest.mark.parametrize("name", sorted(_probes.PROBES))
def test_each_probe_fails_when_its_kernel_answers_wrong(monkeypatch, name):
    """One element of one kernel's output flipped in its lowest bit (an instruction that
    disagrees with the layout): only that probe fails."""
    probe = _probes.PROBES[name]
    original = _probes.launch

    def corrupted(backend, device_id, kernel, dtype, arrays):
        out = original(backend, device_id, kernel, dtype, arrays)
        if (kernel, dtype) == (probe.kernel, probe.dtype):
            out = out.copy()
            flat = out.reshape(-1).view(np.uint16 if out.itemsize == 2 else np.uint32)
            flat[37] ^= 1
        return out

    monkeypatch.setattr(_probes, "launch", corrupted)
    report = _probes.run_probes(backend="interpret")
    assert list(report.failures()) == [name]
    assert report.results[name].startswith("1 of ")


def test_a_probe_that_cannot_run_fails_with_its_reason(monkeypatch):
    def broken(*args):
        raise RuntimeError("compiling probes.cu failed:\nline 2\nline 3")

    monkeypatch.setattr(_probes, "launch", broken)
    report = _probes.run_probes(backend="interpret")
    assert not report.passed
    assert set(report.results.values()) == {"RuntimeError: compiling probes.cu failed:"}
    assert report.summary() == "every probe: RuntimeError: compiling probes.cu failed:"


def test_cuda_probes_without_cupy_fail_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    _probes._device.cache_clear()
    report = _probes.run_probes(0, "cuda")
    _probes._device.cache_clear()
    assert not report.passed
    assert all("cupy" in why for why in report.results.values())


def test_devices_before_sm80_are_not_probed(monkeypatch):
    monkeypatch.setattr(_probes, "_device", lambda backend, device_id: ("Tesla T4 (sm_75, device 0)", (7, 5)))
    monkeypatch.setattr(_probes, "launch", lambda *a: pytest.fail("launched on sm_75"))
    report = _probes.run_probes(0, "cuda")
    assert not report.passed
    assert all("compute capability 8.0, this device has 7.5" in why for why in report.results.values())


# --- the verdict ---

def test_the_verdict_is_cached_per_device(monkeypatch, verdict):
    verdict("run")
    runs = []
    original = _probes.run_probes
    monkeypatch.setattr(_probes, "run_probes", lambda *a: (runs.append(a), original(*a))[1])
    assert _probes.tensor_cores_verified(FakeCall())
    assert _probes.tensor_cores_verified(FakeCall())
    x, w = _rng_arrays(0, (1, 4, 6, 6), (4, 4, 3, 3))
    cuconv.conv2d(x, w)
    assert runs == [(0, "interpret")]
    (key,) = _probes.reports()
    assert key[:2] == ("run", "interpret")


def test_forced_verdicts_and_a_bad_value(monkeypatch, verdict):
    monkeypatch.setattr(_probes, "run_probes", lambda *a: pytest.fail("forced verdicts run nothing"))
    verdict("pass")
    assert _probes.tensor_cores_verified(FakeCall())
    verdict("fail")
    with pytest.warns(RuntimeWarning, match="CUCONV_TENSOR_CORE_PROBES=fail"):
        assert not _probes.tensor_cores_verified(FakeCall())
    verdict("maybe")
    with pytest.raises(ValueError, match="CUCONV_TENSOR_CORE_PROBES must be one of"):
        _probes.tensor_cores_verified(FakeCall())


def test_failing_probes_warn_once_naming_the_device_and_the_probes(monkeypatch, verdict):
    verdict("run")
    failed = _probes.ProbeReport(False, dict.fromkeys(_probes.PROBES, "ok") | {"ldmatrix_x4_bf16": "3 of 1024 differ"},
                                 "NVIDIA Test GPU (sm_90, device 0)", "14.2.0")
    monkeypatch.setattr(_probes, "run_probes", lambda *a: failed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert not _probes.tensor_cores_verified(FakeCall())
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    message = str(caught[0].message)
    assert "NVIDIA Test GPU (sm_90, device 0)" in message and "ldmatrix_x4_bf16: 3 of 1024 differ" in message
    assert "mma_m16n8k16_f16" not in message


# --- the 'auto' rule ---

def test_forced_pass_puts_fp16_auto_on_the_tensor_cores(verdict, launches):
    verdict("pass")
    x, w, b = _rng_arrays(1, (2, 8, 7, 6), (6, 8, 3, 3), (6,))
    y = cuconv.conv2d(x, w, b, padding=1)
    assert launches == ["conv2d_igemm_fwd"]
    np.testing.assert_array_equal(y, cuconv.conv2d(x, w, b, padding=1, algorithm="implicit_gemm"))
    launches.clear()
    gy = _rng_arrays(2, y.shape)[0]
    cuconv.conv2d_backward(gy, x, w, b, padding=1)
    assert launches[:2] == ["conv2d_igemm_bwd_input", "conv2d_igemm_bwd_weight"]
    # a stride-1 depthwise conv with a large kernel: the banded-Toeplitz route
    launches.clear()
    xd, wd = _rng_arrays(3, (1, 4, 12, 12), (4, 1, 9, 9))
    cuconv.conv2d(xd, wd, padding=4, groups=4)
    assert launches == ["depthwise_tc_fwd"]
    # the pass ops and dynamic_conv2d
    launches.clear()
    cuconv.conv_transpose2d(x, _rng_arrays(4, (8, 2, 3, 3))[0], stride=2)
    cuconv.dynamic_conv2d(x, _rng_arrays(5, (3, 6, 8, 3, 3))[0], np.full((2, 3), 0.5, np.float16), padding=1)
    assert launches == ["conv2d_igemm_bwd_input", "conv2d_igemm_dynamic_fwd"]


def test_bfloat16_auto_follows_the_same_rule(verdict, launches):
    import ml_dtypes

    x, w = _rng_arrays(6, (1, 4, 5, 5), (4, 4, 3, 3), dtype=ml_dtypes.bfloat16)
    verdict("pass")
    cuconv.conv2d(x, w)
    _probes.forget()
    verdict("fail")
    with pytest.warns(RuntimeWarning):
        cuconv.conv2d(x, w)
    assert launches == ["conv2d_igemm_fwd", "conv2d_fwd"]


def test_where_the_tensor_cores_are_not_preferred_auto_keeps_the_cuda_core_kernels(verdict, launches):
    verdict("pass")
    x, w = _rng_arrays(7, (1, 4, 12, 12), (4, 1, 3, 3))
    cuconv.conv2d(x, w, padding=1, groups=4)  # small depthwise kernel: the CUDA-core depthwise kernel
    cuconv.conv2d(x, _rng_arrays(8, (4, 1, 9, 9))[0], padding=4, stride=2, groups=4)  # strided: no Toeplitz route
    cuconv.conv_transpose2d(x, w, groups=4)  # one channel per group: mostly padding in a GEMM tile
    assert launches == ["depthwise_fwd", "depthwise_fwd", "conv2d_bwd_input"]


def test_forced_fail_keeps_fp16_auto_exact_and_warns_once(verdict, launches):
    verdict("fail")
    x, w = _rng_arrays(9, (2, 8, 7, 6), (6, 8, 3, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cuconv.conv2d(x, w, padding=1)
        cuconv.conv2d_backward(_rng_arrays(10, (2, 6, 7, 6))[0], x, w, padding=1)
        cuconv.conv_transpose2d(x, _rng_arrays(11, (8, 2, 3, 3))[0])
    assert [type(c.message) for c in caught] == [RuntimeWarning]
    assert "forced to fail" in str(caught[0].message)
    assert launches == ["conv2d_fwd", "conv2d_bwd_input", "conv2d_bwd_weight", "conv2d_bwd_input"]
    # a named tensor-core algorithm is not gated
    launches.clear()
    cuconv.conv2d(x, w, padding=1, algorithm="implicit_gemm")
    assert launches == ["conv2d_igemm_fwd"]


@pytest.mark.parametrize("mode", ["pass", "fail"])
def test_float32_and_float64_auto_never_ask(monkeypatch, verdict, launches, mode):
    verdict(mode)
    monkeypatch.setattr(_probes, "tensor_cores_verified", lambda call: pytest.fail("asked for " + call.dtype))
    for dtype in (np.float32, np.float64):
        x, w = _rng_arrays(12, (1, 4, 6, 6), (4, 4, 3, 3), dtype=dtype)
        cuconv.conv2d(x, w)
    assert launches == ["conv2d_fwd", "conv2d_fwd"]


def test_candidates_respect_the_gate(verdict):
    dense = _geometry((1, 8, 9, 9), (8, 8, 3, 3))
    verdict("pass")
    assert CONV2D.candidates(dense, "float16", call=FakeCall()) == ["implicit_gemm", "direct", "fft"]
    assert CONV2D.candidates(dense, "float16", passes=True, call=FakeCall()) == ["implicit_gemm", "direct"]
    assert DYNAMIC.candidates(dense, "float16", call=FakeCall()) == ["implicit_gemm", "direct"]
    assert CONV2D.candidates(dense, "float32", call=FakeCall()) == ["direct", "fft"]
    assert "implicit_gemm" not in CONV2D.candidates(dense, "float16")  # no call, no device: not verified
    verdict("fail")
    with pytest.warns(RuntimeWarning):
        assert CONV2D.candidates(dense, "float16", call=FakeCall()) == ["direct", "fft"]
    assert DYNAMIC.candidates(dense, "float16", call=FakeCall()) == ["direct"]


def test_the_autotuner_never_times_an_unverified_tensor_core_kernel(monkeypatch, tmp_path, verdict):
    monkeypatch.setenv("CUCONV_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setattr(_autotune, "tuning_enabled", lambda call: True)
    measured = []
    monkeypatch.setattr(_autotune, "measure", lambda call, algorithm, run: (run(), measured.append(algorithm), 1.0)[2])
    _autotune.forget()
    x, w = _rng_arrays(13, (1, 4, 6, 6), (4, 4, 3, 3))
    try:
        verdict("fail")
        with pytest.warns(RuntimeWarning):
            cuconv.conv2d(x, w, padding=1)
        assert set(measured) == {"direct", "fft"}
        _autotune.forget()
        monkeypatch.setenv("CUCONV_AUTOTUNE_CACHE", str(tmp_path / "again.json"))
        measured.clear()
        verdict("pass")
        cuconv.conv2d(x, w, padding=1)
        assert set(measured) == {"implicit_gemm", "direct", "fft"}
    finally:
        _autotune.forget()


# --- cuconv info ---

def _fake_cupy(devices: int):
    runtime = types.SimpleNamespace(getDeviceCount=lambda: devices)
    return types.SimpleNamespace(__version__="14.2.0", cuda=types.SimpleNamespace(runtime=runtime))


def test_info_without_a_gpu_says_the_probes_have_not_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.setattr(_probes, "run_probes", lambda *a: pytest.fail("info ran the probes"))
    assert cli._probe_status() == ["tensor-core probes: not run (no GPU here); the interpret backend runs them on "
                                   "its host fallbacks at its first float16/bfloat16 algorithm='auto' call"]


def test_info_shows_each_gpus_verdict(monkeypatch, verdict):
    verdict("run")
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(2))
    monkeypatch.setattr(_probes, "_device", lambda backend, i: (f"GPU{i} (sm_90, device {i})", (9, 0)))
    ok = dict.fromkeys(_probes.PROBES, "ok")
    monkeypatch.setattr(_probes, "run_probes", lambda i, backend: _probes.ProbeReport(
        i == 0, ok if i == 0 else ok | {"cvt_rna_tf32": "2 of 1024 elements differ"}, f"GPU{i}", "14.2.0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # info prints the failure instead of warning
        lines = cli._probe_status()
    assert lines == [
        "  GPU 0 tensor-core probes: passed; algorithm='auto' may use the tensor cores for float16/bfloat16",
        "  GPU 1 tensor-core probes: FAILED (cvt_rna_tf32: 2 of 1024 elements differ); algorithm='auto' stays on "
        "the exact kernels"]
    verdict("pass")
    assert "passed (forced by CUCONV_TENSOR_CORE_PROBES=pass)" in cli._probe_status()[1]
