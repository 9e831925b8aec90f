"""Separable convolutions (depthwise-separable, spatial-separable), forward and backward:
against the float64 reference, torch CPU autograd over the two F.conv2d calls (an
independent oracle), finite differences of the reference, and the API contract (batch
0, non-contiguous inputs, dtypes, determinism, bad inputs). Also proves the forward is
fused (no intermediate allocated) and that the unfused fallback is correct."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cuconv import _arrays
from cuconv.ops import _common
from cuconv.ops import separable as separable_module
from cuconv.ops.separable import (
    depthwise_separable_conv2d,
    depthwise_separable_conv2d_backward,
    spatial_separable_conv2d,
    spatial_separable_conv2d_backward,
)
from cuconv.reference import separable as reference
from conftest import (
    assert_all_match, assert_gradients_match_finite_differences, assert_reduced_precision, rel_err, to_backend,
    to_numpy, torch_autograd)

DW_GRADS = ("input", "depthwise_weight", "pointwise_weight", "depthwise_bias", "pointwise_bias")
SPATIAL_GRADS = ("input", "weight_v", "weight_h", "bias")


def _padding_choice(rng):
    return [0, int(rng.integers(0, 3)), tuple(int(v) for v in rng.integers(0, 3, size=2)), "valid", "same"][
        int(rng.integers(0, 5))]


def random_dw_config(seed):
    """(x, dw, pw, dw_bias, pw_bias, params): odd sizes, stride, padding (incl. 'same' and
    'valid'), dilation, depth multiplier 1..3, with or without each bias."""
    rng = np.random.default_rng(seed)
    channels, multiplier, cout = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(1, 10))
    kh, kw = (int(v) for v in rng.integers(1, 5, size=2))
    dilation = tuple(int(v) for v in rng.integers(1, 3, size=2))
    stride = tuple(int(v) for v in rng.integers(1, 4, size=2))
    padding = _padding_choice(rng)
    if padding == "same":
        stride = (1, 1)
    h = int(rng.integers(dilation[0] * (kh - 1) + 1, 14))
    w = int(rng.integers(dilation[1] * (kw - 1) + 1, 14))
    mid = channels * multiplier
    x = rng.standard_normal((int(rng.integers(1, 4)), channels, h, w))
    dw = rng.standard_normal((mid, 1, kh, kw))
    pw = rng.standard_normal((cout, mid, 1, 1))
    dwb = rng.standard_normal(mid) if rng.random() < 0.6 else None
    pwb = rng.standard_normal(cout) if rng.random() < 0.6 else None
    return x, dw, pw, dwb, pwb, dict(stride=stride, padding=padding, dilation=dilation)


def random_spatial_config(seed):
    """(x, wv, wh, bias, params): odd sizes, stride, padding (incl. 'same' and 'valid'),
    dilation, groups, with or without bias."""
    rng = np.random.default_rng(seed)
    groups = int(rng.choice([1, 1, 2, 3]))
    cin_g, cmid_g, cout_g = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(1, 7))
    kh, kw = (int(v) for v in rng.integers(1, 6, size=2))
    dilation = tuple(int(v) for v in rng.integers(1, 3, size=2))
    stride = tuple(int(v) for v in rng.integers(1, 4, size=2))
    padding = _padding_choice(rng)
    if padding == "same":
        stride = (1, 1)
    h = int(rng.integers(dilation[0] * (kh - 1) + 1, 14))
    w = int(rng.integers(dilation[1] * (kw - 1) + 1, 14))
    x = rng.standard_normal((int(rng.integers(1, 4)), cin_g * groups, h, w))
    wv = rng.standard_normal((cmid_g * groups, cin_g, kh, 1))
    wh = rng.standard_normal((cout_g * groups, cmid_g, 1, kw))
    bias = rng.standard_normal(cout_g * groups) if rng.random() < 0.7 else None
    return x, wv, wh, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def _torch_stage_params(params):
    """The two F.conv2d calls' keywords of a spatial-separable conv, written out from the
    definition (independently of cuconv's own split)."""
    (sh, sw), (dh, dw), padding = params["stride"], params["dilation"], params["padding"]
    if isinstance(padding, str):
        pv = ph = padding
    else:
        p = (padding, padding) if isinstance(padding, int) else padding
        pv, ph = (p[0], 0), (0, p[1])
    g = params.get("groups", 1)
    return (dict(stride=(sh, 1), padding=pv, dilation=(dh, 1), groups=g),
            dict(stride=(1, sw), padding=ph, dilation=(1, dw), groups=g))


def torch_dw(x, dw, pw, dwb, pwb, gy, params, dtype="float64"):
    """torch CPU autograd through two F.conv2d calls: [y, grads in forward order] as float64."""
    y, grads = torch_autograd(lambda tx, tdw, tpw, tdwb, tpwb: F.conv2d(
        F.conv2d(tx, tdw, tdwb, groups=tx.shape[1], **params), tpw, tpwb), (x, dw, pw, dwb, pwb), gy, dtype)
    return [y, *grads]


def torch_spatial(x, wv, wh, b, gy, params, dtype="float64"):
    v, h = _torch_stage_params(params)
    y, grads = torch_autograd(lambda tx, twv, twh, tb: F.conv2d(F.conv2d(tx, twv, None, **v), twh, tb, **h),
                              (x, wv, wh, b), gy, dtype)
    return [y, *grads]


def _check_all(got, refs, torch_refs, names, tol=1e-10):
    assert_all_match(got, refs, torch_refs, names=names, tol=tol)


# --- float64 against the reference and torch autograd ---

@pytest.mark.parametrize("seed", range(24))
def test_depthwise_separable_matches_reference_and_torch_float64(backend, seed):
    x, dw, pw, dwb, pwb, params = random_dw_config(seed)
    args = [to_backend(a, backend) for a in (x, dw, pw, dwb, pwb)]
    y = depthwise_separable_conv2d(*args, **params)
    y_ref = reference.depthwise_separable_conv2d(x, dw, pw, dwb, pwb, **params)
    gy = np.random.default_rng(1000 + seed).standard_normal(y_ref.shape)
    grads = depthwise_separable_conv2d_backward(to_backend(gy, backend), *args, **params)
    grads_ref = reference.depthwise_separable_conv2d_backward(gy, x, dw, pw, dwb, pwb, **params)
    torch_y, *torch_grads = torch_dw(x, dw, pw, dwb, pwb, gy, params)
    _check_all([y, *grads], [y_ref, *grads_ref], [torch_y, *torch_grads], ("output",) + DW_GRADS)


@pytest.mark.parametrize("seed", range(24))
def test_spatial_separable_matches_reference_and_torch_float64(backend, seed):
    x, wv, wh, b, params = random_spatial_config(seed)
    args = [to_backend(a, backend) for a in (x, wv, wh, b)]
    y = spatial_separable_conv2d(*args, **params)
    y_ref = reference.spatial_separable_conv2d(x, wv, wh, b, **params)
    gy = np.random.default_rng(2000 + seed).standard_normal(y_ref.shape)
    grads = spatial_separable_conv2d_backward(to_backend(gy, backend), *args, **params)
    grads_ref = reference.spatial_separable_conv2d_backward(gy, x, wv, wh, b, **params)
    torch_y, *torch_grads = torch_spatial(x, wv, wh, b, gy, params)
    _check_all([y, *grads], [y_ref, *grads_ref], [torch_y, *torch_grads], ("output",) + SPATIAL_GRADS)


@pytest.mark.parametrize("seed", range(3))
def test_torch_tensors_in_torch_tensors_out(seed):
    x, dw, pw, dwb, pwb, params = random_dw_config(100 + seed)
    targs = [None if a is None else torch.tensor(a) for a in (x, dw, pw, dwb, pwb)]
    y = depthwise_separable_conv2d(*targs, **params)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    torch_y, *torch_grads = torch_dw(x, dw, pw, dwb, pwb, np.ones(y.shape), params)
    grads = depthwise_separable_conv2d_backward(torch.ones_like(y), *targs, **params)
    assert all(g is None or isinstance(g, torch.Tensor) for g in grads)
    _check_all([y, *grads], [torch_y, *torch_grads], [torch_y, *torch_grads], ("output",) + DW_GRADS)

    x, wv, wh, b, params = random_spatial_config(100 + seed)
    targs = [None if a is None else torch.tensor(a) for a in (x, wv, wh, b)]
    y = spatial_separable_conv2d(*targs, **params)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    torch_y, *torch_grads = torch_spatial(x, wv, wh, b, np.ones(y.shape), params)
    grads = spatial_separable_conv2d_backward(torch.ones_like(y), *targs, **params)
    assert all(g is None or isinstance(g, torch.Tensor) for g in grads)
    _check_all([y, *grads], [torch_y, *torch_grads], [torch_y, *torch_grads], ("output",) + SPATIAL_GRADS)


def test_finite_differences_of_the_reference():
    """The composed references' backward is the derivative of their forward."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 2, 6, 7))
    dw_args = [x, rng.standard_normal((4, 1, 3, 2)), rng.standard_normal((3, 4, 1, 1)), rng.standard_normal(4),
               rng.standard_normal(3)]
    dw_params = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    sp_args = [x, rng.standard_normal((4, 1, 3, 1)), rng.standard_normal((6, 2, 1, 3)), rng.standard_normal(6)]
    sp_params = dict(stride=(1, 2), padding="valid", dilation=(2, 1), groups=2)
    for fwd, bwd, args, params in (
            (reference.depthwise_separable_conv2d, reference.depthwise_separable_conv2d_backward, dw_args, dw_params),
            (reference.spatial_separable_conv2d, reference.spatial_separable_conv2d_backward, sp_args, sp_params)):
        assert_gradients_match_finite_differences(fwd, bwd, args, params, rng, samples=6)


# --- reduced precision: within 2x torch's error (DESIGN.md §5) ---

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("seed", range(2))
def test_reduced_precision_within_twice_torch_error(dtype, seed):
    """Error against float64 at most 2x torch's (two F.conv2d calls in that dtype), plus two
    units of the output's own rounding. The fused forward keeps the intermediate in float32
    (torch rounds it to the dtype), so its error is usually well below torch's."""
    rng = np.random.default_rng(seed)
    x, dw, pw, dwb, pwb, params = random_dw_config(200 + seed)
    reps = 8  # more channels: longer pointwise reductions, where precision matters
    x, dw, dwb = np.concatenate([x] * reps, 1), np.concatenate([dw] * reps), rng.standard_normal(dw.shape[0] * reps)
    pw = rng.standard_normal((pw.shape[0], dw.shape[0], 1, 1))
    assert_reduced_precision(depthwise_separable_conv2d, depthwise_separable_conv2d_backward,
                             reference.depthwise_separable_conv2d, reference.depthwise_separable_conv2d_backward,
                             lambda tx, tdw, tpw, tdwb, tpwb: F.conv2d(F.conv2d(tx, tdw, tdwb, groups=tx.shape[1],
                                                                                **params), tpw, tpwb),
                             (x, dw, pw, dwb, pwb), params, dtype, seed)

    x, wv, wh, b, params = random_spatial_config(200 + seed)
    reps, g = 4, params["groups"]  # 4x the channels of every stage
    x = np.concatenate([x] * reps, 1)
    wv = rng.standard_normal((wv.shape[0] * reps, wv.shape[1] * reps) + wv.shape[2:])
    wh = rng.standard_normal((wh.shape[0], wv.shape[0] // g) + wh.shape[2:])
    v, h = _torch_stage_params(params)
    assert_reduced_precision(spatial_separable_conv2d, spatial_separable_conv2d_backward,
                             reference.spatial_separable_conv2d, reference.spatial_separable_conv2d_backward,
                             lambda tx, twv, twh, tb: F.conv2d(F.conv2d(tx, twv, None, **v), twh, tb, **h),
                             (x, wv, wh, b), params, dtype, seed)


def test_bfloat16_torch_tensors():
    x = torch.randn(2, 6, 9, 9, dtype=torch.bfloat16)
    dw, pw = torch.randn(12, 1, 3, 3, dtype=torch.bfloat16), torch.randn(5, 12, 1, 1, dtype=torch.bfloat16)
    y = depthwise_separable_conv2d(x, dw, pw, padding=1)
    assert y.dtype == torch.bfloat16
    y_ref = reference.depthwise_separable_conv2d(*(t.double().numpy() for t in (x, dw, pw)), padding=1)
    anchor = rel_err(F.conv2d(F.conv2d(x, dw, padding=1, groups=6), pw).double().numpy(), y_ref)
    assert rel_err(y, y_ref) <= 2 * anchor + 2**-8


# --- the contract: batch 0, non-contiguous, NaN, determinism, wrt ---

def test_batch_zero(backend):
    rng = np.random.default_rng(0)
    x = to_backend(np.zeros((0, 4, 9, 9)), backend)
    dw, pw, dwb, pwb = (to_backend(a, backend) for a in (rng.standard_normal((8, 1, 3, 3)),
                                                           rng.standard_normal((5, 8, 1, 1)), np.ones(8), np.ones(5)))
    y = to_numpy(depthwise_separable_conv2d(x, dw, pw, dwb, pwb, stride=2))
    assert y.shape == (0, 5, 4, 4)
    gx, gdw, gpw, gdwb, gpwb = (to_numpy(g) for g in depthwise_separable_conv2d_backward(
        to_backend(np.zeros((0, 5, 4, 4)), backend), x, dw, pw, dwb, pwb, stride=2))
    assert gx.shape == (0, 4, 9, 9)
    for g, shape in ((gdw, (8, 1, 3, 3)), (gpw, (5, 8, 1, 1)), (gdwb, (8,)), (gpwb, (5,))):
        np.testing.assert_array_equal(g, np.zeros(shape))  # sums over nothing, written

    wv, wh, b = (to_backend(a, backend) for a in (rng.standard_normal((6, 2, 3, 1)),
                                                   rng.standard_normal((4, 3, 1, 2)), np.ones(4)))
    y = to_numpy(spatial_separable_conv2d(x, wv, wh, b, padding=(1, 0), groups=2))
    assert y.shape == (0, 4, 9, 8)
    gx, gwv, gwh, gb = (to_numpy(g) for g in spatial_separable_conv2d_backward(
        to_backend(np.zeros((0, 4, 9, 8)), backend), x, wv, wh, b, padding=(1, 0), groups=2))
    assert gx.shape == (0, 4, 9, 9)
    for g, shape in ((gwv, (6, 2, 3, 1)), (gwh, (4, 3, 1, 2)), (gb, (4,))):
        np.testing.assert_array_equal(g, np.zeros(shape))


def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(3)
    x = np.ascontiguousarray(rng.standard_normal((2, 11, 3, 9)).transpose(0, 2, 1, 3))[:, :, ::-1, :]
    dw = rng.standard_normal((6, 1, 3, 2)).transpose(0, 1, 3, 2)
    pw = rng.standard_normal((6, 4, 1, 1)).transpose(1, 0, 2, 3)
    dwb = rng.standard_normal(12)[::2]
    assert not any(a.flags.c_contiguous for a in (x, dw, pw, dwb))
    params = dict(stride=(1, 2), padding=1)
    y = depthwise_separable_conv2d(*(to_backend(a, backend) for a in (x, dw, pw, dwb)), **params)
    y_ref = reference.depthwise_separable_conv2d(x, dw, pw, dwb, **params)
    assert rel_err(y, y_ref) < 1e-10
    gy = rng.standard_normal(y_ref.shape + (2,))[..., 1]
    grads = depthwise_separable_conv2d_backward(*(to_backend(a, backend) for a in (gy, x, dw, pw, dwb)), **params)
    for g, g_ref in zip(grads, reference.depthwise_separable_conv2d_backward(gy, x, dw, pw, dwb, **params)):
        assert (g is None) == (g_ref is None) and (g is None or rel_err(g, g_ref) < 1e-10)

    wv = rng.standard_normal((3, 4, 3, 1)).transpose(1, 0, 2, 3)  # [4, 3, 3, 1]
    wh = rng.standard_normal((5, 3, 4, 1)).transpose(0, 2, 3, 1)[..., ::-1]  # [5, 4, 1, 3], reversed taps
    assert not (wv.flags.c_contiguous or wh.flags.c_contiguous)
    params = dict(stride=(2, 1), padding=(2, 1))
    args = [to_backend(a, backend) for a in (x, wv, wh)]
    y = spatial_separable_conv2d(*args, **params)
    y_ref = reference.spatial_separable_conv2d(x, wv, wh, **params)
    assert rel_err(y, y_ref) < 1e-10
    gy = rng.standard_normal(y_ref.shape + (2,))[..., 0]
    grads = spatial_separable_conv2d_backward(to_backend(gy, backend), *args, **params)
    for g, g_ref in zip(grads, reference.spatial_separable_conv2d_backward(gy, x, wv, wh, **params)):
        assert (g is None) == (g_ref is None) and (g is None or rel_err(g, g_ref) < 1e-10)


def test_non_contiguous_torch_tensors():
    x = torch.randn(2, 8, 10, 3, dtype=torch.float64).permute(0, 3, 1, 2)  # channels_last-like
    dw, pw = torch.randn(6, 1, 3, 3, dtype=torch.float64), torch.randn(4, 6, 1, 1, dtype=torch.float64)
    y = depthwise_separable_conv2d(x, dw, pw, padding="same")
    assert rel_err(y, F.conv2d(F.conv2d(x, dw, padding="same", groups=3), pw).numpy()) < 1e-10
    wv, wh = torch.randn(5, 3, 3, 1, dtype=torch.float64), torch.randn(4, 5, 1, 3, dtype=torch.float64)
    y = spatial_separable_conv2d(x, wv, wh, padding="same")
    assert rel_err(y, F.conv2d(F.conv2d(x, wv, padding="same"), wh, padding="same").numpy()) < 1e-10


def test_nan_and_inf_propagate(backend):
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6))
    x[0, 0, 2, 3] = np.nan
    x[0, 1, 5, 5] = np.inf
    y = to_numpy(depthwise_separable_conv2d(to_backend(x, backend), to_backend(np.ones((2, 1, 3, 3)), backend),
                                            to_backend(np.ones((1, 2, 1, 1)), backend), padding=1))
    assert np.isnan(y[0, 0, 1:4, 2:5]).all() and np.isinf(y[0, 0, 4:, 4:]).all() and np.isfinite(y[0, 0, :1]).all()
    y = to_numpy(spatial_separable_conv2d(to_backend(x, backend), to_backend(np.ones((1, 2, 3, 1)), backend),
                                          to_backend(np.ones((1, 1, 1, 3)), backend), padding=1))
    assert np.isnan(y[0, 0, 1:4, 2:5]).all() and np.isinf(y[0, 0, 4:, 4:]).all() and np.isfinite(y[0, 0, :1]).all()


def test_forward_and_backward_are_bitwise_deterministic(backend):
    x, dw, pw, dwb, pwb, params = random_dw_config(5)
    x = np.concatenate([x] * 4).astype(np.float32)
    args = [None if a is None else to_backend(np.asarray(a, np.float32), backend) for a in (x, dw, pw, dwb, pwb)]
    y1, y2 = (to_numpy(depthwise_separable_conv2d(*args, **params)) for _ in range(2))
    assert y1.tobytes() == y2.tobytes()
    gy = to_backend(np.random.default_rng(1).standard_normal(y1.shape).astype(np.float32), backend)
    first, second = ([to_numpy(g) for g in depthwise_separable_conv2d_backward(gy, *args, **params)] for _ in range(2))
    for g1, g2 in zip(first, second):
        assert (g1 is None and g2 is None) or g1.tobytes() == g2.tobytes()

    x, wv, wh, b, params = random_spatial_config(5)
    x = np.concatenate([x] * 4).astype(np.float32)
    args = [None if a is None else to_backend(np.asarray(a, np.float32), backend) for a in (x, wv, wh, b)]
    y1, y2 = (to_numpy(spatial_separable_conv2d(*args, **params)) for _ in range(2))
    assert y1.tobytes() == y2.tobytes()
    gy = to_backend(np.random.default_rng(1).standard_normal(y1.shape).astype(np.float32), backend)
    first, second = ([to_numpy(g) for g in spatial_separable_conv2d_backward(gy, *args, **params)] for _ in range(2))
    for g1, g2 in zip(first, second):
        assert (g1 is None and g2 is None) or g1.tobytes() == g2.tobytes()


def test_wrt_subsets(backend):
    rng = np.random.default_rng(2)
    x, dw, pw = rng.standard_normal((2, 3, 7, 8)), rng.standard_normal((6, 1, 3, 3)), rng.standard_normal((4, 6, 1, 1))
    dwb, pwb = rng.standard_normal(6), rng.standard_normal(4)
    gy = rng.standard_normal((2, 4, 7, 8))
    args = [to_backend(a, backend) for a in (gy, x, dw, pw, dwb, pwb)]
    full = [to_numpy(g) for g in depthwise_separable_conv2d_backward(*args, padding=1)]
    for i, name in enumerate(DW_GRADS):
        grads = depthwise_separable_conv2d_backward(*args, padding=1, wrt=name)
        assert all(g is None for j, g in enumerate(grads) if j != i), name
        np.testing.assert_array_equal(to_numpy(grads[i]), full[i])
    assert depthwise_separable_conv2d_backward(*args[:4], padding=1, wrt=("depthwise_bias", "pointwise_bias")) == \
        (None,) * 5

    wv, wh, b = rng.standard_normal((4, 3, 3, 1)), rng.standard_normal((5, 4, 1, 3)), rng.standard_normal(5)
    gy = rng.standard_normal((2, 5, 7, 6))
    args = [to_backend(a, backend) for a in (gy, x, wv, wh, b)]
    full = [to_numpy(g) for g in spatial_separable_conv2d_backward(*args, padding=(1, 0))]
    for i, name in enumerate(SPATIAL_GRADS):
        grads = spatial_separable_conv2d_backward(*args, padding=(1, 0), wrt=(name,))
        assert all(g is None for j, g in enumerate(grads) if j != i), name
        np.testing.assert_array_equal(to_numpy(grads[i]), full[i])
    assert spatial_separable_conv2d_backward(*args[:4], padding=(1, 0), wrt="bias") == (None,) * 4


# --- fusion: the forward allocates only its output; the fallback is still correct ---

def _fusion_cases():
    rng = np.random.default_rng(8)
    dw_args = (rng.standard_normal((2, 5, 9, 10)), rng.standard_normal((15, 1, 3, 3)),
               rng.standard_normal((7, 15, 1, 1)), rng.standard_normal(15), rng.standard_normal(7))
    sp_args = (rng.standard_normal((2, 6, 9, 10)), rng.standard_normal((8, 3, 3, 1)),
               rng.standard_normal((4, 4, 1, 5)), rng.standard_normal(4))
    return [
        (depthwise_separable_conv2d, reference.depthwise_separable_conv2d, dw_args, dict(stride=2, padding=1),
         (2, 15, 5, 5), (2, 7, 5, 5)),
        (spatial_separable_conv2d, reference.spatial_separable_conv2d, sp_args,
         dict(stride=(1, 2), padding=(1, 2), groups=2), (2, 8, 9, 10), (2, 4, 9, 5)),
    ]


@pytest.mark.parametrize("case", _fusion_cases(), ids=["depthwise", "spatial"])
def test_forward_is_fused_allocating_only_the_output(case, launches):
    op, ref, args, params, mid_shape, out_shape = case
    with _arrays.track_allocations() as log:
        y = op(*args, **params)
    assert log == [(out_shape, "float64")]  # no intermediate [B, Cmid, Ho, W(o)] anywhere
    assert len(launches) == 1 and launches[0].endswith("separable_conv2d_fwd")
    assert rel_err(y, ref(*args, **params)) < 1e-10


@pytest.mark.parametrize("case", _fusion_cases(), ids=["depthwise", "spatial"])
def test_unfused_fallback_matches_reference(case, monkeypatch, launches):
    """A budget too small for one tile of the intermediate: two conv2d calls, which the
    allocation log shows (so the fusion test above would notice an unfused forward)."""
    op, ref, args, params, mid_shape, out_shape = case
    monkeypatch.setattr(separable_module, "_SHARED_BUDGET_BYTES", 8)
    with _arrays.track_allocations() as log:
        y = op(*args, **params)
    assert (mid_shape, "float64") in log and log[-1] == (out_shape, "float64")
    assert len(launches) == 2 and not any("separable" in k for k in launches)
    assert rel_err(y, ref(*args, **params)) < 1e-10


@pytest.mark.parametrize("seed", range(4))
def test_small_tiles_and_grid_stride_loops(backend, seed, monkeypatch, launches):
    """A budget that fits only a few pixels (columns) per tile, tiles with a short last
    one, and a grid smaller than the work so every block loops: the paths large layers
    take, at test sizes."""
    monkeypatch.setattr(_common, "_MAX_GRID", 3)
    x, dw, pw, dwb, pwb, params = random_dw_config(300 + seed)
    monkeypatch.setattr(separable_module, "_SHARED_BUDGET_BYTES", dw.shape[0] * 8 * 3)  # 3 pixels per tile
    y = depthwise_separable_conv2d(*(to_backend(a, backend) for a in (x, dw, pw, dwb, pwb)), **params)
    assert rel_err(y, reference.depthwise_separable_conv2d(x, dw, pw, dwb, pwb, **params)) < 1e-10

    x, wv, wh, b, params = random_spatial_config(300 + seed)
    cmid_g = wv.shape[0] // params["groups"]
    halo = (wh.shape[3] - 1) * params["dilation"][1] + 1
    monkeypatch.setattr(separable_module, "_SHARED_BUDGET_BYTES", cmid_g * 8 * (halo + params["stride"][1]))
    y = spatial_separable_conv2d(*(to_backend(a, backend) for a in (x, wv, wh, b)), **params)
    assert rel_err(y, reference.spatial_separable_conv2d(x, wv, wh, b, **params)) < 1e-10
    assert launches == ["depthwise_separable_conv2d_fwd", "spatial_separable_conv2d_fwd"]


def test_default_budget_with_several_tiles(backend, launches):
    """Planes wider than one tile at the real budget: 196 pixels in tiles of 128 (+ a short
    68), and 138 output columns in tiles of 128 (+ 10) with a 2-column halo."""
    rng = np.random.default_rng(4)
    x, dw, pw, dwb = (rng.standard_normal(s) for s in ((2, 40, 14, 14), (40, 1, 3, 3), (6, 40, 1, 1), (40,)))
    y = depthwise_separable_conv2d(*(to_backend(a, backend) for a in (x, dw, pw, dwb)), padding=1)
    assert rel_err(y, reference.depthwise_separable_conv2d(x, dw, pw, dwb, padding=1)) < 1e-10
    x, wv, wh = (rng.standard_normal(s) for s in ((1, 2, 3, 140), (3, 2, 3, 1), (5, 3, 1, 3)))
    y = spatial_separable_conv2d(*(to_backend(a, backend) for a in (x, wv, wh)), padding="valid")
    assert rel_err(y, reference.spatial_separable_conv2d(x, wv, wh, padding="valid")) < 1e-10
    assert launches == ["depthwise_separable_conv2d_fwd", "spatial_separable_conv2d_fwd"]


def test_tile_planning():
    """The tile sizes the docs quote: whole warps of pixels, as many as the budget holds."""
    call = _common.Call("test", input=np.zeros((1, 1, 1, 1)))  # float64: 8-byte accumulators
    budget = separable_module._SHARED_BUDGET_BYTES
    assert budget == 48 * 1024
    assert separable_module.depthwise_tile(call, 144, 24, 56 * 56) == 32  # 48 KiB / (144 * 8 B) = 42 -> 32
    call32 = _common.Call("test", input=np.zeros((1, 1, 1, 1), np.float32))
    assert separable_module.depthwise_tile(call32, 144, 24, 56 * 56) == 64  # 85 -> 64
    assert separable_module.depthwise_tile(call32, 960, 160, 7 * 7) == 12
    assert separable_module.depthwise_tile(call32, 24, 160, 7 * 7) == 49  # the whole plane
    assert separable_module.depthwise_tile(call, budget // 8, 24, 100) == 1
    assert separable_module.depthwise_tile(call, budget // 8 + 1, 24, 100) is None
    tile, span = separable_module.spatial_tile(call, 192, 192, 17, 7, 1, 1)
    assert (tile, span) == (17, 23) and 192 * span * 8 <= budget
    assert separable_module.spatial_tile(call, budget // 8 // 7 + 1, 4, 17, 7, 1, 1) is None


# --- bad inputs: each a ValueError/TypeError naming the argument, nothing launched ---

_rng = np.random.default_rng(0)
X = _rng.standard_normal((2, 4, 8, 8))
DW = _rng.standard_normal((8, 1, 3, 3))
PW = _rng.standard_normal((6, 8, 1, 1))
DWB, PWB = _rng.standard_normal(8), _rng.standard_normal(6)
WV = _rng.standard_normal((6, 2, 3, 1))
WH = _rng.standard_normal((4, 3, 1, 3))
B = _rng.standard_normal(4)

BAD_DEPTHWISE = [
    ("input 3-D", (X[0], DW, PW), {}, ValueError, r"input must be 4-D .*\(4, 8, 8\)"),
    ("depthwise_weight 3-D", (X, DW[:, 0], PW), {}, ValueError, r"depthwise_weight must be 4-D .*\(8, 3, 3\)"),
    ("pointwise_weight 2-D", (X, DW, PW[:, :, 0, 0]), {}, ValueError, r"pointwise_weight must be 4-D .*\(6, 8\)"),
    ("depthwise_weight not [C*m, 1, kh, kw]", (X, _rng.standard_normal((8, 2, 3, 3)), PW), {}, ValueError,
     r"depthwise_weight must have shape \[channels \* multiplier, 1, kh, kw\] .*got \(8, 2, 3, 3\)"),
    ("depthwise_weight channels not a multiple of C", (X, DW[:6], PW[:, :6]), {}, ValueError,
     r"depthwise_weight must have shape .*channels=4 .*got \(6, 1, 3, 3\)"),
    ("pointwise_weight not 1x1", (X, DW, _rng.standard_normal((6, 8, 3, 3))), {}, ValueError,
     r"pointwise_weight must be a 1x1 kernel .*got \(6, 8, 3, 3\)"),
    ("pointwise channel mismatch", (X, DW, PW[:, :4]), {}, ValueError,
     r"pointwise_weight has 4 input channels but depthwise_weight produces 8"),
    ("depthwise_bias shape", (X, DW, PW, DWB[:7]), {}, ValueError,
     r"depthwise_bias must have shape \(8,\), got \(7,\)"),
    ("pointwise_bias shape", (X, DW, PW, DWB, PWB[:5]), {}, ValueError,
     r"pointwise_bias must have shape \(6,\), got \(5,\)"),
    ("pointwise_bias 2-D", (X, DW, PW, None, PWB[None]), {}, ValueError, r"pointwise_bias must have shape \(6,\)"),
    ("negative padding", (X, DW, PW), dict(padding=-1), ValueError, r"padding must be >= 0"),
    ("zero stride", (X, DW, PW), dict(stride=(1, 0)), ValueError, r"stride must be positive"),
    ("same with stride", (X, DW, PW), dict(padding="same", stride=2), ValueError, r"padding='same' requires stride 1"),
    ("unknown padding string", (X, DW, PW), dict(padding="full"), ValueError, r"padding must be"),
    ("kernel larger than input", (X, _rng.standard_normal((8, 1, 9, 3)), PW), {}, ValueError,
     r"larger than the padded input 8x8"),
    ("mixed dtypes", (X, DW.astype(np.float32), PW), {}, TypeError, r"one dtype; got .*depthwise_weight float32"),
    ("input None", (None, DW, PW), {}, TypeError, r"input must be an array, got None"),
    ("pointwise_weight None", (X, DW, None), {}, TypeError, r"pointwise_weight must be an array, got None"),
    ("not an array", (X, DW.tolist(), PW), {}, TypeError, r"depthwise_weight must be an array"),
]

BAD_SPATIAL = [
    ("input 3-D", (X[0], WV, WH), dict(groups=2), ValueError, r"input must be 4-D .*\(4, 8, 8\)"),
    ("weight_v 3-D", (X, WV[..., 0], WH), dict(groups=2), ValueError, r"weight_v must be 4-D .*\(6, 2, 3\)"),
    ("weight_h 5-D", (X, WV, WH[None]), dict(groups=2), ValueError, r"weight_h must be 4-D .*\(1, 4, 3, 1, 3\)"),
    ("weight_v with kw != 1", (X, _rng.standard_normal((6, 2, 3, 3)), WH), dict(groups=2), ValueError,
     r"weight_v must be a vertical kernel .*got \(6, 2, 3, 3\)"),
    ("weight_h with kh != 1", (X, WV, _rng.standard_normal((4, 3, 3, 3))), dict(groups=2), ValueError,
     r"weight_h must be a horizontal kernel .*got \(4, 3, 3, 3\)"),
    ("swapped orientation", (X, WH, WV), dict(groups=2), ValueError, r"weight_v must be a vertical kernel"),
    ("groups mismatch with input", (X, WV, WH), dict(groups=1), ValueError,
     r"input has 4 channels but weight_v expects in_channels/groups=2 x groups=1"),
    ("groups do not divide mid_channels", (X[:, :2], WV[:5, :1], WH), dict(groups=2), ValueError,
     r"mid_channels=5 is not divisible by groups=2"),
    ("weight_h mid channel mismatch", (X, WV, WH[:, :2]), dict(groups=2), ValueError,
     r"weight_h expects mid_channels/groups=2, but weight_v gives 6 / groups=2 = 3"),
    ("groups do not divide out_channels", (X, WV, WH[:3]), dict(groups=2), ValueError,
     r"out_channels=3 is not divisible by groups=2"),
    ("groups zero", (X, WV, WH), dict(groups=0), ValueError, r"groups must be positive"),
    ("groups float", (X, WV, WH), dict(groups=2.0), TypeError, r"groups must be an int"),
    ("bias shape", (X, WV, WH, B[:3]), dict(groups=2), ValueError, r"bias must have shape \(4,\) .*got \(3,\)"),
    ("same with stride", (X, WV, WH), dict(groups=2, padding="same", stride=(1, 2)), ValueError,
     r"padding='same' requires stride 1"),
    ("unknown padding string", (X, WV, WH), dict(groups=2, padding="full"), ValueError, r"padding must be"),
    ("triple padding", (X, WV, WH), dict(groups=2, padding=(1, 1, 1)), TypeError, r"padding must be an int or"),
    ("zero dilation", (X, WV, WH), dict(groups=2, dilation=0), ValueError, r"dilation must be positive"),
    ("kernel larger than input", (X, _rng.standard_normal((6, 2, 9, 1)), WH), dict(groups=2), ValueError,
     r"larger than the padded input 8x8"),
    ("mixed dtypes", (X, WV, WH.astype(np.float16)), dict(groups=2), TypeError, r"weight_h float16"),
    ("integer dtype", (X.astype(np.int64), WV, WH), dict(groups=2), TypeError, r"input has dtype int64"),
    ("weight_h None", (X, WV, None), dict(groups=2), TypeError, r"weight_h must be an array, got None"),
]


@pytest.mark.parametrize("case", BAD_DEPTHWISE, ids=[c[0] for c in BAD_DEPTHWISE])
def test_bad_depthwise_inputs_raise_before_launch(case, launches):
    _, args, params, error, pattern = case
    with pytest.raises(error, match=pattern):
        depthwise_separable_conv2d(*args, **params)
    if all(a is not None for a in args[:3]):  # the backward validates the same way
        with pytest.raises(error, match=pattern):
            depthwise_separable_conv2d_backward(np.ones((2, 6, 6, 6)), *args, **params)
    assert launches == []


@pytest.mark.parametrize("case", BAD_SPATIAL, ids=[c[0] for c in BAD_SPATIAL])
def test_bad_spatial_inputs_raise_before_launch(case, launches):
    _, args, params, error, pattern = case
    with pytest.raises(error, match=pattern):
        spatial_separable_conv2d(*args, **params)
    if all(a is not None for a in args[:3]):  # the backward validates the same way
        with pytest.raises(error, match=pattern):
            spatial_separable_conv2d_backward(np.ones((2, 4, 6, 6)), *args, **params)
    assert launches == []


def test_bad_backward_inputs_raise_before_launch(launches):
    gy = np.ones((2, 6, 6, 6))
    with pytest.raises(ValueError, match=r"grad_output must have the forward output's shape \(2, 6, 6, 6\)"):
        depthwise_separable_conv2d_backward(gy[:, :5], X, DW, PW)
    with pytest.raises(ValueError, match=r"wrt names unknown arguments \['weight'\]"):
        depthwise_separable_conv2d_backward(gy, X, DW, PW, wrt=("weight",))
    with pytest.raises(TypeError, match=r"grad_output float32"):
        depthwise_separable_conv2d_backward(gy.astype(np.float32), X, DW, PW)
    gy = np.ones((2, 4, 6, 6))
    with pytest.raises(ValueError, match=r"grad_output must have the forward output's shape \(2, 4, 6, 6\)"):
        spatial_separable_conv2d_backward(gy[..., :5], X, WV, WH, groups=2)
    with pytest.raises(ValueError, match=r"wrt names unknown arguments \['depthwise_weight'\]"):
        spatial_separable_conv2d_backward(gy, X, WV, WH, groups=2, wrt="depthwise_weight")
    assert launches == []


def test_launch_counter_sees_launches(launches):
    """The fixture would notice a launch (so its empty lists mean something)."""
    depthwise_separable_conv2d(X, DW, PW)
    spatial_separable_conv2d(X, WV, WH, groups=2)
    assert launches == ["depthwise_separable_conv2d_fwd", "spatial_separable_conv2d_fwd"]
