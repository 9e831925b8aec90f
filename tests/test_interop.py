"""Array interop: what goes in through DLPack comes back in the caller's framework,
without copies on the way in."""

import numpy as np
import pytest
import torch

import cuconv
from cuconv import _arrays
from cuconv.reference import conv2d as reference
from conftest import rel_err


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
