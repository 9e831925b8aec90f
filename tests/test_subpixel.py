"""subpixel_conv2d: pixel_shuffle(conv2d(...)) fused, against the reference and torch
autograd, with the fusion proven by the allocation tracker."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cuconv import _arrays
from cuconv.ops.subpixel import subpixel_conv2d, subpixel_conv2d_backward
from cuconv.reference import subpixel as ref
from conftest import assert_reduced_precision, rel_err, to_backend, torch_autograd


def random_config(seed):
    rng = np.random.default_rng(seed)
    r = int(rng.integers(1, 4))
    groups = int(rng.choice([1, 2]))
    cin_g = int(rng.integers(1, 4))
    cout = r * r * groups * int(rng.integers(1, 3))  # divisible by r^2 and by groups
    kh, kw = (int(v) for v in rng.integers(1, 4, size=2))
    params = dict(upscale_factor=r, stride=tuple(int(v) for v in rng.integers(1, 3, size=2)),
                  padding=tuple(int(v) for v in rng.integers(0, 2, size=2)), dilation=int(rng.integers(1, 3)),
                  groups=groups)
    x = rng.standard_normal((int(rng.integers(1, 3)), cin_g * groups, int(rng.integers(5, 10)), int(rng.integers(5, 10))))
    w = rng.standard_normal((cout, cin_g, kh, kw))
    b = rng.standard_normal(cout) if rng.random() < 0.7 else None
    return x, w, b, params


def torch_grads(x, w, b, gy, params, dtype="float64"):
    p = dict(params)
    r = p.pop("upscale_factor")
    y, grads = torch_autograd(lambda *t: F.pixel_shuffle(F.conv2d(*t, **p), r), (x, w, b), gy, dtype)
    return [y, *grads]


@pytest.mark.parametrize("seed", range(16))
def test_matches_reference_and_torch_float64(backend, seed):
    x, w, b, params = random_config(seed)
    on = lambda a: to_backend(a, backend)  # noqa: E731
    y = subpixel_conv2d(on(x), on(w), on(b), **params)
    y_ref = ref.subpixel_conv2d(x, w, b, **params)
    gy = np.random.default_rng(seed).standard_normal(y_ref.shape)
    torch_y, *torch_g = torch_grads(x, w, b, gy, params)
    assert rel_err(y, y_ref) < 1e-10 and rel_err(y, torch_y) < 1e-10
    grads = subpixel_conv2d_backward(on(gy), on(x), on(w), on(b), **params)
    for g, g_ref, g_torch in zip(grads, ref.subpixel_conv2d_backward(gy, x, w, b, **params), torch_g):
        assert (g is None) == (g_ref is None)
        if g is not None:
            assert rel_err(g, g_ref) < 1e-10 and rel_err(g, g_torch) < 1e-10


def test_torch_tensors_in_torch_tensors_out():
    x, w, b, params = random_config(3)
    y = subpixel_conv2d(torch.tensor(x), torch.tensor(w), None if b is None else torch.tensor(b), **params)
    assert isinstance(y, torch.Tensor)
    assert rel_err(y, torch_grads(x, w, b, None, params)[0]) < 1e-10


def test_fused_no_unshuffled_intermediate():
    """Forward allocates only the shuffled output; backward only the three gradients
    (no unshuffled copy of grad_output): the shuffle lives in the kernels' indexing."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((12, 3, 3, 3)), rng.standard_normal(12)
    with _arrays.track_allocations() as log:
        y = subpixel_conv2d(x, w, b, upscale_factor=2, padding=1)
    assert log == [((2, 3, 16, 16), "float64")]
    with _arrays.track_allocations() as log:
        subpixel_conv2d_backward(np.ones_like(y), x, w, b, upscale_factor=2, padding=1)
    assert sorted(log) == sorted([(x.shape, "float64"), (w.shape, "float64"), (b.shape, "float64")])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_reduced_precision_within_twice_torch_error(dtype):
    x, w, b, params = random_config(7)
    x, w = np.concatenate([x] * 6, axis=1), np.concatenate([w] * 6, axis=1)
    conv_params = {k: v for k, v in params.items() if k != "upscale_factor"}
    assert_reduced_precision(subpixel_conv2d, subpixel_conv2d_backward, ref.subpixel_conv2d,
                             ref.subpixel_conv2d_backward,
                             lambda *t: F.pixel_shuffle(F.conv2d(*t, **conv_params), params["upscale_factor"]),
                             (x, w, b), params, dtype, 1)


def test_bad_inputs_raise_before_launch(launches):
    x, w = np.ones((1, 2, 6, 6)), np.ones((6, 2, 3, 3))
    with pytest.raises(ValueError, match=r"out_channels=6 must be divisible by upscale_factor\*\*2=4"):
        subpixel_conv2d(x, w, upscale_factor=2)
    with pytest.raises(ValueError, match=r"upscale_factor must be positive"):
        subpixel_conv2d(x, w, upscale_factor=0)
    with pytest.raises(TypeError, match=r"upscale_factor must be an int"):
        subpixel_conv2d(x, w, upscale_factor=1.5)
    with pytest.raises(ValueError, match=r"grad_output must have the forward output's shape \(1, 6, 4, 4\)"):
        subpixel_conv2d_backward(np.ones((1, 6, 5, 5)), x, w, upscale_factor=1)
    assert launches == []
