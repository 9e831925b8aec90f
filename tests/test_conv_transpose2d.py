"""conv_transpose2d: against the float64 reference (scatter definition), torch CPU
autograd, the adjoint identity with conv2d, and the API contract."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cuconv
from cuconv import _arrays
from cuconv.ops.conv_transpose2d import conv_transpose2d, conv_transpose2d_backward
from cuconv.reference import conv_transpose2d as ref
from conftest import assert_reduced_precision, rel_err, to_backend, to_numpy, torch_autograd


def random_config(seed):
    """Random odd-sized configurations over stride, padding, output_padding, dilation,
    groups and bias (output_padding kept below stride or dilation, as torch requires)."""
    rng = np.random.default_rng(seed)
    groups = int(rng.choice([1, 1, 2, 3]))
    cin_g, cout_g = (int(v) for v in rng.integers(1, 4, size=2))
    kh, kw = (int(v) for v in rng.integers(1, 5, size=2))
    stride = tuple(int(v) for v in rng.integers(1, 4, size=2))
    dilation = tuple(int(v) for v in rng.integers(1, 3, size=2))
    h, w = (int(v) for v in rng.integers(2, 9, size=2))
    # padding up to the kernel's extent, but leaving an output of at least one pixel
    padding = tuple(int(rng.integers(0, min((k - 1) * d, ((n - 1) * s + (k - 1) * d) // 2) + 1))
                    for k, d, n, s in zip((kh, kw), dilation, (h, w), stride))
    output_padding = tuple(int(rng.integers(0, max(s, d))) for s, d in zip(stride, dilation))
    x = rng.standard_normal((int(rng.integers(1, 4)), cin_g * groups, h, w))
    weight = rng.standard_normal((cin_g * groups, cout_g, kh, kw))
    bias = rng.standard_normal(cout_g * groups) if rng.random() < 0.7 else None
    return x, weight, bias, dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                                 dilation=dilation)


def torch_grads(x, w, b, gy, params, dtype="float64"):
    y, grads = torch_autograd(lambda *t: F.conv_transpose2d(*t, **params), (x, w, b), gy, dtype)
    return [y, *grads]


@pytest.mark.parametrize("seed", range(20))
def test_matches_reference_and_torch_float64(backend, seed):
    x, w, b, params = random_config(seed)
    on = lambda a: to_backend(a, backend)  # noqa: E731
    y = conv_transpose2d(on(x), on(w), on(b), **params)
    y_ref = ref.conv_transpose2d(x, w, b, **params)
    gy = np.random.default_rng(500 + seed).standard_normal(y_ref.shape)
    grads = conv_transpose2d_backward(on(gy), on(x), on(w), on(b), **params)
    torch_y, *torch_g = torch_grads(x, w, b, gy, params)
    assert rel_err(y, y_ref) < 1e-10 and rel_err(y, torch_y) < 1e-10
    for g, g_ref, g_torch in zip(grads, ref.conv_transpose2d_backward(gy, x, w, b, **params), torch_g):
        assert (g is None) == (g_ref is None)
        if g is not None:
            assert rel_err(g, g_ref) < 1e-10 and rel_err(g, g_torch) < 1e-10


@pytest.mark.parametrize("seed", range(4))
def test_torch_tensors_in_torch_tensors_out(seed):
    x, w, b, params = random_config(40 + seed)
    t = lambda a: None if a is None else torch.tensor(a)  # noqa: E731
    y = conv_transpose2d(t(x), t(w), t(b), **params)
    assert isinstance(y, torch.Tensor)
    torch_y, *torch_g = torch_grads(x, w, b, np.ones(y.shape), params)
    assert rel_err(y, torch_y) < 1e-10
    for g, g_torch in zip(conv_transpose2d_backward(torch.ones_like(y), t(x), t(w), t(b), **params), torch_g):
        assert (g is None) == (g_torch is None)
        if g is not None:
            assert isinstance(g, torch.Tensor) and rel_err(g, g_torch) < 1e-10


@pytest.mark.parametrize("seed", range(8))
def test_adjoint_of_conv2d(backend, seed):
    """<conv2d(x), y> == <x, conv_transpose2d(y)> with the same weight and geometry;
    output_padding restores the rows a strided conv drops."""
    rng = np.random.default_rng(seed)
    _, w, _, params = random_config(80 + seed)
    stride, padding, dilation, groups = params["stride"], params["padding"], params["dilation"], params["groups"]
    cin = w.shape[1] * groups  # conv2d's in_channels = the transposed conv's out_channels
    h, w_in = (int(v) for v in rng.integers(8, 14, size=2))
    span = [d * (k - 1) + 1 for d, k in zip(dilation, w.shape[2:])]
    if any(n + 2 * p < s for n, p, s in zip((h, w_in), padding, span)):
        pytest.skip("kernel larger than the padded input for this draw")
    x = rng.standard_normal((2, cin, h, w_in))
    conv_out = cuconv.conv2d(to_backend(x, backend), to_backend(w, backend), None, stride, padding, dilation, groups)
    y = rng.standard_normal(to_numpy(conv_out).shape)
    output_padding = tuple((n + 2 * p - sp) % s for n, p, sp, s in zip((h, w_in), padding, span, stride))
    if any(op >= s and op >= d for op, s, d in zip(output_padding, stride, dilation)):
        pytest.skip("torch's output_padding rule excludes this geometry")
    back = conv_transpose2d(to_backend(y, backend), to_backend(w, backend), None, stride, padding, output_padding,
                            groups, dilation)
    lhs, rhs = np.vdot(to_numpy(conv_out), y), np.vdot(x, to_numpy(back))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs))


def test_batch_zero_and_non_contiguous(backend):
    rng = np.random.default_rng(1)
    params = dict(stride=2, padding=1, output_padding=1)
    w = rng.standard_normal((4, 3, 3, 3))
    y = to_numpy(conv_transpose2d(to_backend(np.zeros((0, 4, 5, 5)), backend), to_backend(w, backend), **params))
    assert y.shape == (0, 3, 10, 10)
    gx, gw, _ = (to_numpy(g) for g in conv_transpose2d_backward(
        to_backend(np.zeros((0, 3, 10, 10)), backend), to_backend(np.zeros((0, 4, 5, 5)), backend),
        to_backend(w, backend), **params, wrt=("input", "weight")) if True)
    assert gx.shape == (0, 4, 5, 5)
    np.testing.assert_array_equal(gw, np.zeros_like(w))
    x = rng.standard_normal((2, 5, 4, 7))[:, 1:, :, ::-1].transpose(0, 1, 3, 2)  # non-contiguous [2, 4, 7, 4]
    wt = rng.standard_normal((3, 4, 3, 3)).transpose(1, 0, 2, 3)  # non-contiguous [4, 3, 3, 3]
    got = conv_transpose2d(to_backend(x, backend), to_backend(wt, backend), **params)
    assert rel_err(got, ref.conv_transpose2d(x, wt, **params)) < 1e-10


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("seed", range(3))
def test_reduced_precision_within_twice_torch_error(dtype, seed):
    x, w, b, params = random_config(120 + seed)
    x, w = np.concatenate([x] * 6, axis=1), np.concatenate([w] * 6, axis=0)  # longer reductions
    assert_reduced_precision(conv_transpose2d, conv_transpose2d_backward, ref.conv_transpose2d,
                             ref.conv_transpose2d_backward, lambda *t: F.conv_transpose2d(*t, **params),
                             (x, w, b), params, dtype, seed)


def test_gather_allocates_only_the_output():
    """No zero-inserted (dilated) input and no workspace: the forward allocates its output."""
    x, w = np.ones((1, 2, 6, 6)), np.ones((2, 3, 4, 4))
    with _arrays.track_allocations() as log:
        conv_transpose2d(x, w, stride=3)
    assert log == [((1, 3, 19, 19), "float64")]


X = np.random.default_rng(0).standard_normal((2, 4, 5, 5))
W = np.random.default_rng(1).standard_normal((4, 3, 3, 3))

BAD = [
    ("input 5-D", (X[None], W), {}, ValueError, r"input must be 4-D .* or 3-D .*\(1, 2, 4, 5, 5\)"),
    ("weight 3-D", (X, W[0]), {}, ValueError, r"weight must be 4-D"),
    ("channel mismatch", (X[:, :3], W), {}, ValueError, r"input has 3 channels but weight's in_channels .* is 4"),
    ("groups do not divide in_channels", (X, W), dict(groups=3), ValueError, r"in_channels=4 is not divisible by groups=3"),
    ("output_padding too large", (X, W), dict(stride=2, output_padding=2), ValueError,
     r"output_padding \(2, 2\) must be smaller than stride \(2, 2\) or dilation"),
    ("negative padding", (X, W), dict(padding=-1), ValueError, r"padding must be >= 0"),
    ("zero stride", (X, W), dict(stride=0), ValueError, r"stride must be positive"),
    ("string padding", (X, W), dict(padding="same"), TypeError, r"padding must be an int or a pair"),
    ("empty output", (X[:, :, :1, :1], W[:, :, :1, :1]), dict(padding=1), ValueError, r"the output would be -1x-1"),
    ("bias shape", (X, W, np.ones(4)), {}, ValueError, r"bias must have shape \(3,\)"),
    ("mixed dtypes", (X.astype(np.float32), W), {}, TypeError, r"one dtype"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_raise_before_launch(case, launches):
    _, args, params, error, pattern = case
    with pytest.raises(error, match=pattern):
        conv_transpose2d(*args, **params)
    assert launches == []
