"""The cuda backend's Python path, run on a fake GPU (tests/fake_cupy.py): every copy,
allocation, fill, FFT and launch of a call happens on the device its arrays live on
and on that device's current stream; bfloat16 CuPy arrays stay bfloat16; each kernel
is resolved once per (module, device, instantiation); torch streams reach CuPy without
deprecated API; torch makes its own tensors contiguous; JAX gets device results
through DLPack. Results through the fake equal the interpret backend's bit for bit
(the same compiled kernels run on the same bytes)."""

import dataclasses
import types
import warnings

import ml_dtypes
import numpy as np
import pytest
import torch

import cuconv
import fake_cupy
from cuconv import _arrays, _autotune, _cuda, _probes
from cuconv.ops._common import Call
from conftest import bits, to_numpy


@pytest.fixture
def gpu(monkeypatch):
    """The fake GPU as `cupy`. What cuconv caches per device is emptied around the test,
    so nothing of the fake outlives it. The tensor-core verdict is forced to pass on
    both backends alike (the fake's probes would only rerun the interpret fallbacks)."""
    monkeypatch.delenv("CUCONV_BACKEND", raising=False)
    monkeypatch.setenv("CUCONV_TENSOR_CORE_PROBES", "pass")
    state = fake_cupy.install(monkeypatch)
    _clear_device_caches()
    yield state
    _clear_device_caches()


def _clear_device_caches():
    for module in (_cuda, _probes):
        for value in vars(module).values():
            if hasattr(value, "cache_clear"):
                value.cache_clear()
    _probes._reports.clear()


def on_device(device: int, array: np.ndarray):
    import cupy

    with cupy.cuda.Device(device):
        return cupy.asarray(array)


def _normal(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


def _deform_arrays(rng):
    # offsets and mask sliced out of one predictor output [B, 3*kh*kw, Ho, Wo], as
    # DeformConv2d does: neither slice is contiguous
    return [_normal(rng, (2, 3, 6, 5)), _normal(rng, (2, 27, 6, 5)) * 0.7, _normal(rng, (4, 3, 3, 3))]


# name -> (the op's arrays from a generator, the op on those arrays)
CASES = {
    "conv2d": (lambda rng: [_normal(rng, (2, 3, 7, 6)), _normal(rng, (4, 3, 3, 3)), _normal(rng, (4,))],
               lambda x, w, b: cuconv.conv2d(x, w, b, padding=1)),
    "conv2d_backward": (
        lambda rng: [_normal(rng, (2, 4, 5, 4)), _normal(rng, (2, 3, 7, 6)), _normal(rng, (4, 3, 3, 3))],
        lambda gy, x, w: cuconv.conv2d_backward(gy, x, w)),
    "conv2d non-contiguous input": (lambda rng: [_normal(rng, (2, 3, 14, 6)), _normal(rng, (4, 3, 3, 3))],
                                    lambda x, w: cuconv.conv2d(x[:, :, ::2], w, padding=1)),
    "conv2d fft": (lambda rng: [_normal(rng, (2, 3, 9, 8)), _normal(rng, (4, 3, 5, 5)), _normal(rng, (4,))],
                   lambda x, w, b: cuconv.conv2d(x, w, b, padding=2, algorithm="fft")),
    "conv2d fft backward": (
        lambda rng: [_normal(rng, (2, 4, 9, 8)), _normal(rng, (2, 3, 9, 8)), _normal(rng, (4, 3, 5, 5))],
        lambda gy, x, w: cuconv.conv2d_backward(gy, x, w, padding=2, algorithm="fft")),
    "spectral_filter2d": (
        lambda rng: [_normal(rng, (2, 3, 6, 7)), (_normal(rng, (1, 3, 6, 4)) + 1j * _normal(rng, (1, 3, 6, 4)))
                     .astype(np.complex64)],
        lambda x, f: cuconv.spectral_filter2d(x, f)),
    "deform_conv2d non-contiguous offset": (
        _deform_arrays, lambda x, om, w: cuconv.deform_conv2d(x, om[:, :18], w, padding=1, mask=om[:, 18:])),
    "deform_conv2d_backward": (
        lambda rng: [_normal(rng, (2, 4, 6, 5)), *_deform_arrays(rng)],
        lambda gy, x, om, w: cuconv.deform_conv2d_backward(gy, x, om[:, :18], w, padding=1, mask=om[:, 18:])),
}


def _results(result) -> list:
    return [r for r in (result if isinstance(result, tuple) else (result,)) if r is not None]


def assert_same_bits(got, expected) -> None:
    got, expected = _results(got), _results(expected)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert type(g).__module__ == "cupy"
        g = to_numpy(g)
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_array_equal(bits(g), bits(e))


def _run(gpu, name, device, seed=0):
    """(the op's result on fake `device`'s arrays, called with device 0 current; the
    interpret backend's result on the same values)."""
    make, op = CASES[name]
    arrays = make(np.random.default_rng(seed))
    expected = op(*arrays)
    args = [on_device(device, a) for a in arrays]
    gpu.log.clear()
    return op(*args), expected


@pytest.mark.parametrize("name", CASES)
def test_a_call_on_another_device_runs_all_its_work_there(gpu, name):
    got, expected = _run(gpu, name, device=1)
    assert_same_bits(got, expected)
    assert all(r.device.id == 1 for r in _results(got))
    assert any(op.startswith("launch ") for op, _, _ in gpu.log)
    assert {device for _, device, _ in gpu.log} == {1}, gpu.log
    assert {device for _, device in gpu.loads} == {1}
    assert {device for _, device, _ in gpu.resolutions} == {1}


@pytest.mark.parametrize("device", [0, 1])
@pytest.mark.parametrize("name", CASES)
def test_a_call_runs_on_its_devices_current_stream(gpu, name, device):
    import cupy

    make, op = CASES[name]
    arrays = make(np.random.default_rng(1))
    expected = op(*arrays)
    args = [on_device(device, a) for a in arrays]
    with cupy.cuda.Device(device):
        stream = cupy.cuda.Stream()
        with stream, cupy.cuda.Device(0):  # `stream` is current on the arrays' device, device 0 is current
            gpu.log.clear()
            got = op(*args)
    assert_same_bits(got, expected)
    assert {ptr for _, _, ptr in gpu.log} == {stream.ptr}, gpu.log


@pytest.mark.parametrize("name", ["conv2d", "conv2d_backward", "deform_conv2d non-contiguous offset"])
def test_bfloat16_cupy_arrays_give_bfloat16_cupy_arrays(gpu, name):
    make, op = CASES[name]
    arrays = [a.astype(ml_dtypes.bfloat16) for a in make(np.random.default_rng(2))]
    expected = op(*arrays)
    got = op(*(on_device(0, a) for a in arrays))
    assert all(r.dtype == ml_dtypes.bfloat16 for r in _results(got))
    assert_same_bits(got, expected)


def test_a_forced_cuda_backend_runs_numpy_bfloat16_on_the_device(gpu, monkeypatch):
    monkeypatch.setenv("CUCONV_BACKEND", "cuda")
    make, op = CASES["conv2d"]
    arrays = [a.astype(ml_dtypes.bfloat16) for a in make(np.random.default_rng(3))]
    got = op(*arrays)
    assert any(o.startswith("launch ") for o, _, _ in gpu.log)
    monkeypatch.setenv("CUCONV_BACKEND", "interpret")
    expected = op(*arrays)
    assert isinstance(got, np.ndarray) and got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bits(got), bits(expected))


def test_kernels_are_resolved_once_per_module_device_and_instantiation(gpu):
    for device in (0, 1, 0, 1):
        for name in ("conv2d", "conv2d_backward"):
            got, _ = _run(gpu, name, device)
    launched = {op for op, _, _ in gpu.log if op.startswith("launch ")}
    assert launched
    assert len(gpu.resolutions) == len(set(gpu.resolutions)), gpu.resolutions
    assert {device for _, device, _ in gpu.resolutions} == {0, 1}
    assert len(gpu.loads) == len(set(gpu.loads)), gpu.loads


class TorchLikeStream:
    """What the CUDA stream protocol asks of torch.cuda.Stream."""

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def _call_as_if_from(framework: str, original, device: int = 1) -> Call:
    """A Call on fake `device`'s arrays whose caller is `framework` (a torch or JAX
    array on a GPU cannot exist on this machine)."""
    call = Call("test", input=on_device(device, np.zeros((2, 3), np.float32)))
    call.anchor = dataclasses.replace(call.anchor, framework=framework, original=original)
    return call


def test_a_torch_cuda_call_runs_on_torchs_stream_without_deprecated_api(gpu, monkeypatch):
    # Mocked: torch.cuda.current_stream (CPU torch has no CUDA) and the caller (a cuda:1 tensor).
    import cupy

    asked = []
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: asked.append(device) or TorchLikeStream(0xBEEF))
    call = _call_as_if_from("torch", types.SimpleNamespace(device="cuda:1"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with call.on_device():
            assert cupy.cuda.runtime.getDevice() == 1
            assert cupy.cuda.get_current_stream().ptr == 0xBEEF
    assert call.stream().ptr == 0xBEEF and asked == ["cuda:1"]
    assert cupy.cuda.runtime.getDevice() == 0 and cupy.cuda.get_current_stream(1).ptr == 0


def test_torch_operands_are_made_contiguous_by_torch():
    rng = np.random.default_rng(4)
    x, w = torch.from_numpy(_normal(rng, (2, 3, 12, 5))), torch.from_numpy(_normal(rng, (4, 3, 3, 3)))
    strided = x[:, :, ::2]
    call = Call("test", input=strided)
    with _arrays.track_allocations() as log:
        a = call.operand("input")
    assert log == [((2, 3, 6, 5), "float32")]
    assert isinstance(a.original, torch.Tensor) and a.original.is_contiguous()
    assert a.data.ctypes.data == a.original.data_ptr()
    np.testing.assert_array_equal(cuconv.conv2d(strided, w).numpy(), cuconv.conv2d(strided.numpy(), w.numpy()))


def test_jax_gets_device_results_through_dlpack(gpu, monkeypatch):
    # Mocked: the caller (a JAX array on GPU 1) and jax.numpy.from_dlpack (a CPU JAX cannot
    # import the fake's CUDA memory: the mock takes the DLPack export, as JAX would, and
    # builds the array from the fake's bytes). The host round trip is made to fail.
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    consumed = []

    def from_dlpack(x):
        consumed.append(x)
        x.__dlpack__()
        return jnp.asarray(x.get())

    def no_host_copy(*args, **kwargs):
        raise AssertionError("a device result was copied through the host")

    call = _call_as_if_from("jax", jnp.zeros(1))
    out = call.empty((2, 3))
    monkeypatch.setattr(jnp, "from_dlpack", from_dlpack)
    monkeypatch.setattr(_arrays, "to_host", no_host_copy)
    monkeypatch.setattr(jax, "device_put", no_host_copy)
    gpu.log.clear()
    result = call.export(out)
    assert consumed == [out.data]
    assert gpu.log == [("dlpack export", 1, 0)]
    np.testing.assert_array_equal(bits(np.asarray(result)), bits(out.data.get()))


def test_autotuning_times_on_the_arrays_device(gpu, monkeypatch, tmp_path):
    monkeypatch.setenv("CUCONV_AUTOTUNE", "1")
    monkeypatch.setenv("CUCONV_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setenv("CUCONV_AUTOTUNE_REPEATS", "1")
    _autotune.forget()
    try:
        make, op = CASES["conv2d"]
        arrays = [a.astype(np.float16) for a in make(np.random.default_rng(6))]
        got = op(*(on_device(1, a) for a in arrays))
    finally:
        _autotune.forget()
    assert any(o == "event.record" for o, _, _ in gpu.log)
    assert {device for _, device, _ in gpu.log} == {1}, gpu.log
    assert got.device.id == 1
