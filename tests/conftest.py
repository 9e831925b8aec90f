"""Shared test machinery: the backend parametrization and array helpers.

Every output cuconv allocates is filled with NaN before its kernel runs
(CUCONV_POISON=1), so an element a kernel fails to write fails the comparison."""

import os

os.environ["CUCONV_POISON"] = "1"

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


BACKENDS = [
    "interpret",
    pytest.param("cuda", marks=pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU")),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend a test runs on: its arrays live where that backend runs."""
    return request.param


def to_backend(a, backend):
    """A NumPy array as the array type the backend runs on natively."""
    if a is None or backend == "interpret":
        return a
    import cupy

    if a.dtype == ml_dtypes.bfloat16:
        raise ValueError("CuPy has no bfloat16; use torch tensors for bfloat16 on the GPU")
    return cupy.asarray(a)


def to_numpy(a):
    if a is None:
        return None
    if type(a).__module__.startswith("torch"):
        import torch

        t = a.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| in float64 (NaN if actual has NaN)."""
    actual = np.asarray(to_numpy(actual), np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return 0.0
    scale = max(np.abs(expected).max(), np.finfo(np.float64).tiny)
    return float(np.abs(actual - expected).max() / scale)
