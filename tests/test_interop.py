"""Array interop: what goes in through DLPack comes back in the caller's framework,
dtype and device, without copies on the way in (nor, on a GPU, on the way out).

The `backend` parametrization runs the round trips on NumPy / CPU torch / CPU JAX
(interpret) and on CuPy / CUDA torch / GPU JAX (cuda, skipped without a GPU)."""

import contextlib

import numpy as np
import pytest
import torch

import cuconv
from cuconv import _arrays
from cuconv.reference import conv2d as reference
from conftest import DTYPES, as_torch, bits, gpu_available, rel_err, to_backend, to_numpy, unit_roundoff

# Leave the GPU to CuPy and torch as well: JAX would otherwise take 75% of it at start.


class DLPackOnly:
    """An array known only through the DLPack protocol (no framework cuconv knows)."""

    def __init__(self, array):
        self._array = array
        self.dtype = array.dtype

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_any_dlpack_object_is_accepted_zero_copy():
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5))
    imported = _arrays.import_array("test", "input", DLPackOnly(x))
    assert imported.data.ctypes.data == x.ctypes.data
    y = cuconv.conv2d(DLPackOnly(x), np.ones((3, 2, 3, 3)))
    assert isinstance(y, np.ndarray)
    assert rel_err(y, reference.conv2d(x, np.ones((3, 2, 3, 3)))) < 1e-12


def test_output_follows_the_input_framework():
    x = np.random.default_rng(1).standard_normal((1, 2, 5, 5))
    w = np.random.default_rng(2).standard_normal((3, 2, 3, 3))
    y = cuconv.conv2d(torch.tensor(x), w)  # torch input, NumPy weight
    assert isinstance(y, torch.Tensor)
    y2 = cuconv.conv2d(x, torch.tensor(w))
    assert isinstance(y2, np.ndarray)
    np.testing.assert_array_equal(y.numpy(), y2)


def test_torch_bfloat16_travels_as_bits_without_copy():
    t = torch.randn(2, 3, dtype=torch.bfloat16)
    a = _arrays.import_array("test", "input", t)
    assert a.dtype == "bfloat16" and a.data.ctypes.data == t.data_ptr()
    np.testing.assert_array_equal(a.data.astype(np.float32), t.float().numpy())


def test_poisoned_outputs_are_nan():
    like = _arrays.import_array("test", "input", np.zeros(3, np.float32))
    assert np.isnan(_arrays.empty(like, (4,), on_host=True).data).all()
    like = _arrays.import_array("test", "input", torch.zeros(3, dtype=torch.bfloat16))
    out = _arrays.empty(like, (4,), on_host=True)
    assert isinstance(out.original, torch.Tensor) and torch.isnan(out.original).all()


def test_jax_arrays_in_jax_arrays_out():
    jnp = pytest.importorskip("jax.numpy")
    x = np.random.default_rng(3).standard_normal((2, 2, 6, 6)).astype(np.float32)
    w = np.random.default_rng(4).standard_normal((4, 1, 3, 3)).astype(np.float32)
    y = cuconv.conv2d(jnp.asarray(x), jnp.asarray(w), groups=2, padding=1)
    assert type(y).__module__.startswith("jax")
    assert rel_err(np.asarray(y), reference.conv2d(x, w, groups=2, padding=1)) < 1e-6


def test_allocation_tracker_sees_outputs_and_contiguous_copies():
    x = np.random.default_rng(5).standard_normal((2, 3, 6, 6))
    w = np.ones((4, 3, 3, 3))
    with _arrays.track_allocations() as log:
        cuconv.conv2d(x, w)
    assert log == [((2, 4, 4, 4), "float64")]
    with _arrays.track_allocations() as log:
        cuconv.conv2d(x[:, :, ::-1], w)  # non-contiguous input: the output, then one contiguous copy
    assert sorted(log) == [((2, 3, 6, 6), "float64"), ((2, 4, 4, 4), "float64")]


# --- round trips in every dtype: the input's framework, dtype and device come back ---

FRAMEWORKS = ("native", "torch", "jax")  # native: NumPy on interpret, CuPy on cuda


def _jax_device(backend):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)  # float64 arrays stay float64 (test_jax_adapter does the same)
    if backend == "interpret":
        return jax.devices("cpu")[0]
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU backend (jaxlib without CUDA)")


def _as_framework(a: np.ndarray, framework: str, backend: str):
    """`a` (bfloat16 included) as `framework`'s array where `backend` runs."""
    if framework == "native":
        return to_backend(a, backend)
    if framework == "torch":
        if backend == "cuda" and not torch.cuda.is_available():
            pytest.skip("torch has no CUDA")
        return as_torch(a).to("cuda" if backend == "cuda" else "cpu")
    import jax

    return jax.device_put(a, _jax_device(backend))


def _placement(a):
    """(array type, dtype name, device) of any framework's array."""
    if isinstance(a, torch.Tensor):
        return type(a), str(a.dtype).removeprefix("torch."), a.device
    if type(a).__module__.startswith("cupy"):
        return type(a), str(a.dtype), a.device.id
    if isinstance(a, np.ndarray):
        return type(a), str(a.dtype), "cpu"
    return "jax", str(a.dtype), a.devices()


# cuda against interpret on the same rounded inputs: the same kernel, compiled by NVRTC
# rather than g++ (contractions into FMA differ), rounded once into the output dtype.
CUDA_TOL = {"float16": 4 * unit_roundoff("float16"), "bfloat16": 4 * unit_roundoff("bfloat16"),
            "float32": 1e-5, "float64": 1e-12}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_round_trip_keeps_framework_dtype_and_device(backend, framework, dtype, monkeypatch):
    """conv2d and conv2d_backward on any framework's arrays return that framework's
    arrays of the same dtype on the same device, with interpret's numbers (bitwise on the
    host, within a few roundings on the GPU). On a GPU nothing crosses to the host: no
    device-to-host copy in cuconv, no host-to-device transfer in JAX."""
    rng = np.random.default_rng(6)
    x, w, b, gy = (rng.standard_normal(shape).astype(DTYPES[dtype])
                   for shape in ((2, 3, 6, 5), (4, 3, 3, 3), (4,), (2, 4, 6, 5)))
    expected = [cuconv.conv2d(x, w, b, padding=1), *cuconv.conv2d_backward(gy, x, w, b, padding=1)]
    args = [_as_framework(a, framework, backend) for a in (gy, x, w, b)]
    guard = None
    if backend == "cuda":
        def no_host_copy(*_):
            raise AssertionError("a device array was copied to the host")

        monkeypatch.setattr(_arrays, "to_host", no_host_copy)
        guard = pytest.importorskip("jax").transfer_guard("disallow") if framework == "jax" else None
    with guard or contextlib.nullcontext():
        got = [cuconv.conv2d(*args[1:], padding=1), *cuconv.conv2d_backward(*args, padding=1)]
    likes = [args[1], *args[1:]]  # the output goes where the input is; each gradient where its array is
    assert len(got) == len(likes) == len(expected) == 4
    for index, (result, like, want) in enumerate(zip(got, likes, expected)):
        assert _placement(result) == _placement(like), index  # (output, then input, weight, bias grads)
        if backend == "interpret":
            np.testing.assert_array_equal(bits(result), bits(want))
        else:
            assert rel_err(result, want) <= CUDA_TOL[dtype], (index, rel_err(result, want))


# --- CUDA only: a second GPU, CuPy's streams ---

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU")


def _gpu_count() -> int:
    if not gpu_available():
        return 0
    import cupy

    return cupy.cuda.runtime.getDeviceCount()


@pytest.mark.skipif(_gpu_count() < 2, reason=f"needs 2 CUDA GPUs (found {_gpu_count()})")
@pytest.mark.parametrize("framework", ["cupy", "torch", "jax"])
def test_cuda_arrays_on_the_second_gpu_stay_there(framework):
    """Arrays on GPU 1 while GPU 0 is current: the output and the gradients are on GPU 1
    and equal the results on GPU 0."""
    import cupy

    rng = np.random.default_rng(7)
    x, w, gy = (rng.standard_normal(shape) for shape in ((2, 3, 6, 5), (4, 3, 3, 3), (2, 4, 6, 5)))
    results = []
    for index in (0, 1):
        if framework == "cupy":
            with cupy.cuda.Device(index):
                args = [cupy.asarray(a) for a in (gy, x, w)]
        elif framework == "torch":
            if torch.cuda.device_count() < 2:
                pytest.skip("torch sees fewer than 2 CUDA GPUs")
            args = [torch.from_numpy(a).to(f"cuda:{index}") for a in (gy, x, w)]
        else:
            import jax

            _jax_device("cuda")
            if len(jax.devices("gpu")) < 2:
                pytest.skip("JAX sees fewer than 2 GPUs")
            args = [jax.device_put(a, jax.devices("gpu")[index]) for a in (gy, x, w)]
        torch_current = torch.cuda.device(0) if framework == "torch" else contextlib.nullcontext()
        with cupy.cuda.Device(0), torch_current:
            got = [cuconv.conv2d(*args[1:], padding=1), *cuconv.conv2d_backward(*args, padding=1)[:2]]
        for result, like in zip(got, [args[1], args[1], args[2]]):  # output, grad input, grad weight
            assert _placement(result) == _placement(like)
        results.append([to_numpy(r) for r in got])
    for a, b in zip(*results):
        assert rel_err(b, a) <= 1e-12


@needs_gpu
def test_cuda_cupy_arrays_run_on_cupys_current_stream():
    """Under `with cupy.cuda.Stream(non_blocking=True)`, on a non-contiguous input computed
    on that stream behind a long matmul chain: the call's copies and kernels wait for it
    (a copy on another stream would read the NaN the input held)."""
    import cupy

    rng = np.random.default_rng(8)
    x, w, gy = (rng.standard_normal(shape).astype(np.float32) for shape in ((2, 3, 6, 5), (4, 3, 3, 3), (2, 4, 6, 5)))
    w_d, gy_d = cupy.asarray(w), cupy.asarray(gy)
    expected = [cuconv.conv2d(cupy.asarray(x), w_d, padding=1),
                *cuconv.conv2d_backward(gy_d, cupy.asarray(x), w_d, padding=1)[:2]]
    cupy.cuda.Device().synchronize()  # a non-blocking stream does not wait for the default one
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        one = cupy.ones((2048, 2048), cupy.float32)
        for _ in range(8):  # each product is exactly `one` again, after ~17 GFLOP
            one = (one @ one) * (1 / 2048)
        wide = cupy.full((2, 3, 6, 10), np.nan, cupy.float32)
        wide[..., ::2] = cupy.asarray(x) * one[0, 0]
        x_d = wide[..., ::2]
        got = [cuconv.conv2d(x_d, w_d, padding=1), *cuconv.conv2d_backward(gy_d, x_d, w_d, padding=1)[:2]]
    stream.synchronize()
    for index, (a, b) in enumerate(zip(got, expected)):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=f"result {index}")
