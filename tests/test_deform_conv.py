"""deform_conv2d (torchvision semantics), forward and all five gradients: against the
float64 reference, an independent torch oracle (bilinear sampling with
F.grid_sample + autograd), finite differences of the reference, conv2d (zero
offsets), a hand-computed boundary case (a sample exactly on y = -1 / x = -1), and the
API contract (batch 0, non-contiguous, dtypes, bitwise determinism, wrt, bad inputs,
no im2col allocation)."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench import deform_conv as deform_bench
from bench.deform_conv import positional, positional_backward
from cuconv import _arrays
from cuconv.ops import _common
from cuconv.ops import deform_conv as deform_module
from cuconv.ops.conv2d import conv2d
from cuconv.ops.deform_conv import deform_conv2d, deform_conv2d_backward
from cuconv.reference import deform_conv as reference
from conftest import (
    assert_all_match, assert_gradients_match_finite_differences, assert_reduced_precision, rel_err, to_backend,
    to_numpy, torch_autograd)

GRADS = ("input", "offset", "weight", "bias", "mask")

# The independent torch oracle (F.grid_sample per tap, autograd), shared with the bench's
# self-check: torch_deform_conv2d(x, offset, weight, bias, mask=..., stride=..., ...).
torch_deform_conv2d = functools.partial(deform_bench.torch_deform_conv2d, F)


def torch_oracle(arrays, gy, params, dtype="float64"):
    """[y, grad_input, grad_offset, grad_weight, grad_bias, grad_mask] by torch autograd."""
    y, grads = torch_autograd(lambda x, o, w, b, m: torch_deform_conv2d(x, o, w, b, mask=m, **params), arrays, gy,
                              dtype)
    return [y, *grads]


def random_config(seed, with_mask=None):
    """(x, offset, weight, bias, mask, params): odd sizes, stride, padding, dilation, weight
    groups 1-2, offset groups 1, 2 or Cin, offsets of several pixels (normal * 3: many
    samples land partly or wholly outside the image), with or without mask / bias."""
    rng = np.random.default_rng(seed)
    gw = int(rng.choice([1, 2]))
    cin = gw * int(rng.integers(1, 4))
    go = int(rng.choice([g for g in (1, 2, cin) if cin % g == 0]))
    cout = gw * int(rng.integers(1, 4))
    kh, kw = (int(v) for v in rng.integers(1, 4, size=2))
    stride = tuple(int(v) for v in rng.integers(1, 3, size=2))
    padding = tuple(int(v) for v in rng.integers(0, 3, size=2))
    dilation = tuple(int(v) for v in rng.integers(1, 3, size=2))
    h = int(rng.integers(dilation[0] * (kh - 1) + 1, 9))
    w = int(rng.integers(dilation[1] * (kw - 1) + 1, 9))
    batch = int(rng.integers(1, 3))
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    x = rng.standard_normal((batch, cin, h, w))
    offset = rng.standard_normal((batch, 2 * go * kh * kw, ho, wo)) * 3
    weight = rng.standard_normal((cout, cin // gw, kh, kw))
    bias = rng.standard_normal(cout) if rng.random() < 0.6 else None
    if with_mask is None:
        with_mask = rng.random() < 0.6
    mask = rng.standard_normal((batch, go * kh * kw, ho, wo)) if with_mask else None
    return x, offset, weight, bias, mask, dict(stride=stride, padding=padding, dilation=dilation)


def _check_all(got, expected, tol=1e-10, label=""):
    assert_all_match(got, expected, names=("output",) + GRADS, tol=tol, context=label)


# --- float64 against the reference and the torch oracle ---

@pytest.mark.parametrize("seed", range(14))
def test_matches_reference_and_torch_float64(backend, seed):
    x, offset, weight, bias, mask, params = random_config(seed, with_mask=seed % 2 == 0)
    arrays = (x, offset, weight, bias, mask)
    args = [to_backend(a, backend) for a in arrays]
    y = deform_conv2d(*args[:4], mask=args[4], **params)
    y_ref = reference.deform_conv2d(x, offset, weight, bias, mask=mask, **params)
    gy = np.random.default_rng(1000 + seed).standard_normal(y_ref.shape)
    grads = deform_conv2d_backward(to_backend(gy, backend), *args[:4], mask=args[4], **params)
    grads_ref = reference.deform_conv2d_backward(gy, x, offset, weight, bias, mask=mask, **params)
    _check_all([y, *grads], [y_ref, *grads_ref], label="reference")
    _check_all([y, *grads], torch_oracle(arrays, gy, params), label="torch")
    fast = deform_conv2d_backward(to_backend(gy, backend), *args[:4], mask=args[4], wrt="input",
                                  deterministic=False, **params)
    assert rel_err(fast[0], grads_ref[0]) < 1e-10


def test_reference_matches_torch_oracle_on_more_configs():
    """The two independent float64 implementations agree (forward and every gradient)."""
    for seed in range(100, 110):
        x, offset, weight, bias, mask, params = random_config(seed)
        y = reference.deform_conv2d(x, offset, weight, bias, mask=mask, **params)
        gy = np.random.default_rng(seed).standard_normal(y.shape)
        grads = reference.deform_conv2d_backward(gy, x, offset, weight, bias, mask=mask, **params)
        _check_all([y, *grads], torch_oracle((x, offset, weight, bias, mask), gy, params), label=seed)


@pytest.mark.parametrize("seed", range(2))
def test_torch_tensors_in_torch_tensors_out(seed):
    x, offset, weight, bias, mask, params = random_config(200 + seed, with_mask=True)
    targs = [None if a is None else torch.tensor(a) for a in (x, offset, weight, bias, mask)]
    y = deform_conv2d(*targs[:4], mask=targs[4], **params)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    gy = torch.randn(y.shape, dtype=torch.float64)
    grads = deform_conv2d_backward(gy, *targs[:4], mask=targs[4], **params)
    assert all(g is None or isinstance(g, torch.Tensor) for g in grads)
    expected = torch_oracle((x, offset, weight, bias, mask), gy.numpy(), params)
    _check_all([y, *grads], expected)


def test_finite_differences_of_the_reference():
    """The reference's analytic gradients are the derivative of its forward (the random
    offsets keep every sample away from integer positions, where the bilinear kinks are)."""
    rng = np.random.default_rng(11)
    x, offset, weight = rng.standard_normal((2, 4, 6, 5)), rng.standard_normal((2, 2 * 2 * 6, 6, 2)) * 2, \
        rng.standard_normal((6, 2, 3, 2))
    bias, mask = rng.standard_normal(6), rng.standard_normal((2, 2 * 6, 6, 2))
    params = dict(stride=(1, 2), padding=(1, 0), dilation=(1, 2))
    args = [x, offset, weight, bias, mask]

    assert_gradients_match_finite_differences(
        positional(reference.deform_conv2d), positional_backward(reference.deform_conv2d_backward),
        args, params, rng)


# --- identities and the boundary decision ---

@pytest.mark.parametrize("groups", [1, 2, 4])
def test_zero_offsets_and_unit_mask_reproduce_conv2d(backend, groups):
    rng = np.random.default_rng(groups)
    x, weight, bias = rng.standard_normal((2, 4, 9, 8)), rng.standard_normal((6 if groups < 4 else 4, 4 // groups, 3, 3)), \
        rng.standard_normal(6 if groups < 4 else 4)
    params = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    y_conv = to_numpy(conv2d(x, weight, bias, groups=groups, **params))
    offset = np.zeros((2, 2 * 2 * 9) + y_conv.shape[2:])
    mask = np.ones((2, 2 * 9) + y_conv.shape[2:])
    args = [to_backend(a, backend) for a in (x, offset, weight, bias)]
    assert rel_err(deform_conv2d(*args, **params), y_conv) < 1e-12
    assert rel_err(deform_conv2d(*args, mask=to_backend(mask, backend), **params), y_conv) < 1e-12


def test_boundary_sample_exactly_on_minus_one(backend):
    """torchvision's rule, hand-computed: at Y = -1 exactly the sample is 0 (and so are the
    mask and input gradients it contributes), but dL/d(dy) is the right derivative,
    gy * m * ((1-lx) x[0, xl] + lx x[0, xl+1]); dL/d(dx) is 0 there. Likewise at X = -1.
    (mmcv and DCNv3/v4 return 0 for the first: documented difference.)"""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 1, 3, 4))
    weight = np.full((1, 1, 1, 1), 1.5)
    offset = rng.uniform(0.1, 0.9, (1, 2, 3, 4))  # interior, non-integer elsewhere
    offset[0, :, 0, 0] = (-1.0, 0.5)   # pixel (0, 0): Y = -1, X = 0.5
    offset[0, :, 1, 0] = (0.25, -1.0)  # pixel (1, 0): Y = 1.25, X = -1
    mask = rng.uniform(0.5, 1.5, (1, 1, 3, 4))
    gy = rng.standard_normal((1, 1, 3, 4))
    args = [to_backend(a, backend) for a in (x, offset, weight)]
    y = to_numpy(deform_conv2d(*args, mask=to_backend(mask, backend)))
    gx, goff, _, _, gm = (to_numpy(g) for g in deform_conv2d_backward(to_backend(gy, backend), *args,
                                                                       mask=to_backend(mask, backend)))
    col = 1.5 * gy[0, 0]  # gcol = w * gy
    assert y[0, 0, 0, 0] == 0 and y[0, 0, 1, 0] == 0
    expected_dy = col[0, 0] * mask[0, 0, 0, 0] * (0.5 * x[0, 0, 0, 0] + 0.5 * x[0, 0, 0, 1])
    expected_dx = col[1, 0] * mask[0, 0, 1, 0] * (0.75 * x[0, 0, 1, 0] + 0.25 * x[0, 0, 2, 0])
    assert goff[0, 0, 0, 0] == pytest.approx(expected_dy, rel=1e-13) and expected_dy != 0
    assert goff[0, 1, 0, 0] == 0
    assert goff[0, 1, 1, 0] == pytest.approx(expected_dx, rel=1e-13) and expected_dx != 0
    assert goff[0, 0, 1, 0] == 0
    assert gm[0, 0, 0, 0] == 0 and gm[0, 0, 1, 0] == 0
    # the input gradient is the adjoint of the (gated) forward: the boundary points add nothing
    rest = gy.copy()
    rest[0, 0, 0, 0] = rest[0, 0, 1, 0] = 0
    gx_rest = to_numpy(deform_conv2d_backward(to_backend(rest, backend), *args, mask=to_backend(mask, backend),
                                              wrt="input")[0])
    np.testing.assert_allclose(gx, gx_rest, rtol=1e-14, atol=1e-15)
    ref = reference.deform_conv2d_backward(gy, x, offset, weight, mask=mask)
    for got, r in zip((gx, goff, gm), (ref[0], ref[1], ref[4])):
        assert rel_err(got, r) < 1e-13


# --- reduced precision: within 2x the torch oracle's error in that dtype (DESIGN.md §5) ---

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_reduced_precision_within_twice_torch_error(dtype):
    rng = np.random.default_rng(3)
    x, offset, weight = rng.standard_normal((2, 8, 7, 6)), rng.standard_normal((2, 2 * 2 * 9, 7, 6)) * 2, \
        rng.standard_normal((6, 4, 3, 3))
    bias, mask = rng.standard_normal(6), rng.uniform(0, 1, (2, 2 * 9, 7, 6))
    params = dict(padding=1)

    assert_reduced_precision(positional(deform_conv2d), positional_backward(deform_conv2d_backward),
                             positional(reference.deform_conv2d),
                             positional_backward(reference.deform_conv2d_backward),
                             lambda tx, to, tw, tb, tm: torch_deform_conv2d(tx, to, tw, tb, mask=tm, **params),
                             (x, offset, weight, bias, mask), params, dtype)


def test_bfloat16_torch_tensors():
    x, offset, weight = torch.randn(1, 4, 6, 6), torch.randn(1, 18, 6, 6), torch.randn(3, 4, 3, 3)
    y = deform_conv2d(*(t.bfloat16() for t in (x, offset, weight)), padding=1)
    assert y.dtype == torch.bfloat16
    y_ref = reference.deform_conv2d(*(t.bfloat16().double().numpy() for t in (x, offset, weight)), padding=1)
    anchor = rel_err(torch_deform_conv2d(*(t.bfloat16() for t in (x, offset, weight)), padding=1).double().numpy(),
                     y_ref)
    assert rel_err(y, y_ref) <= 2 * anchor + 2**-8


# --- determinism ---

def test_backward_is_bitwise_deterministic(backend):
    """Many sample points share destinations (small image, large offsets clipped inside);
    the default grad_input must not depend on scheduling: two calls, identical bits."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 4, 5, 5)).astype(np.float32)
    offset = rng.uniform(-1, 1, (2, 2 * 2 * 9, 5, 5)).astype(np.float32)
    weight = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    mask = rng.uniform(0, 1, (2, 2 * 9, 5, 5)).astype(np.float32)
    gy = rng.standard_normal((2, 8, 5, 5)).astype(np.float32)
    args = [to_backend(a, backend) for a in (gy, x, offset, weight)]
    runs = [[to_numpy(g) for g in deform_conv2d_backward(*args, mask=to_backend(mask, backend), padding=1)]
            for _ in range(2)]
    for g1, g2 in zip(*runs):
        assert (g1 is None and g2 is None) or g1.tobytes() == g2.tobytes()
    y1, y2 = (to_numpy(deform_conv2d(*args[1:], mask=to_backend(mask, backend), padding=1)) for _ in range(2))
    assert y1.tobytes() == y2.tobytes()
    ref = reference.deform_conv2d_backward(gy, x, offset, weight, mask=mask, padding=1)
    fast = deform_conv2d_backward(*args, mask=to_backend(mask, backend), padding=1, wrt="input",
                                  deterministic=False)[0]
    assert rel_err(fast, ref[0]) < 1e-5 and rel_err(runs[0][0], ref[0]) < 1e-5


@pytest.mark.parametrize("seed", range(3))
def test_chunked_bins_small_stage_and_grid_stride(backend, seed, monkeypatch):
    """A binning workspace that holds one segment (several chunks), a shared-memory budget
    that forces channel and tap chunking of the forward stage, and a grid smaller than the
    work so every block loops: the paths large layers take, at test sizes."""
    x, offset, weight, bias, mask, params = random_config(300 + seed, with_mask=True)
    monkeypatch.setattr(_common, "_MAX_GRID", 3)
    monkeypatch.setattr(deform_module, "_BIN_WORKSPACE_ENTRIES", 1)
    tile = min(offset.shape[2] * offset.shape[3], deform_module._MAX_TILE)
    monkeypatch.setattr(deform_module, "_SHARED_BUDGET_BYTES", tile * 8)  # one (channel, tap) per stage
    args = [to_backend(a, backend) for a in (x, offset, weight, bias, mask)]
    y = deform_conv2d(*args[:4], mask=args[4], **params)
    gy = np.random.default_rng(seed).standard_normal(to_numpy(y).shape)
    grads = deform_conv2d_backward(to_backend(gy, backend), *args[:4], mask=args[4], **params)
    expected = [reference.deform_conv2d(x, offset, weight, bias, mask=mask, **params),
                *reference.deform_conv2d_backward(gy, x, offset, weight, bias, mask=mask, **params)]
    _check_all([y, *grads], expected)


def test_forward_plan_and_bin_chunks():
    call = _common.Call("test", input=np.zeros((1, 1, 1, 1), np.float32))
    x, offset, weight = np.zeros((8, 64, 56, 56)), np.zeros((8, 18, 56, 56)), np.zeros((64, 64, 3, 3))
    geom = deform_module.DeformGeometry("t", _common.Call("t", input=x, offset=offset, weight=weight), 1, 1, 1)
    plan = deform_module.forward_plan(call, geom)
    assert plan["tile"] == 64 and plan["block"] == 256 and plan["tap_chunk"] == 9
    assert plan["shared_bytes"] == plan["channel_chunk"] * 9 * 64 * 4 <= 48 * 1024
    chunk = deform_module.bin_chunk_segments(geom)
    assert chunk * (57 * 57 + 2 + 9 * 56 * 56) <= deform_module._BIN_WORKSPACE_ENTRIES and chunk == 8


# --- the contract: batch 0, non-contiguous, wrt, allocations ---

def test_batch_zero(backend):
    rng = np.random.default_rng(0)
    x = to_backend(np.zeros((0, 4, 7, 7)), backend)
    offset, mask = to_backend(np.zeros((0, 18, 7, 7)), backend), to_backend(np.zeros((0, 9, 7, 7)), backend)
    weight, bias = to_backend(rng.standard_normal((5, 4, 3, 3)), backend), to_backend(np.ones(5), backend)
    y = to_numpy(deform_conv2d(x, offset, weight, bias, padding=1, mask=mask))
    assert y.shape == (0, 5, 7, 7)
    for deterministic in (True, False):
        grads = [to_numpy(g) for g in deform_conv2d_backward(to_backend(np.zeros((0, 5, 7, 7)), backend), x, offset,
                                                             weight, bias, padding=1, mask=mask,
                                                             deterministic=deterministic)]
        assert [g.shape for g in grads] == [(0, 4, 7, 7), (0, 18, 7, 7), (5, 4, 3, 3), (5,), (0, 9, 7, 7)]
        np.testing.assert_array_equal(grads[2], 0)  # sums over nothing, written
        np.testing.assert_array_equal(grads[3], 0)


def test_non_contiguous_inputs(backend):
    x, offset, weight, bias, mask, params = random_config(7, with_mask=True)
    nc = [np.asfortranarray(a) if a is not None and a.ndim == 4 else a for a in (x, offset, weight, bias, mask)]
    nc[3] = np.repeat(bias, 2)[::2] if bias is not None else None
    assert not any(a.flags.c_contiguous for a in nc if a is not None and a.ndim == 4 and a.size > 1)
    args = [to_backend(a, backend) for a in nc]
    y = deform_conv2d(*args[:4], mask=args[4], **params)
    y_ref = reference.deform_conv2d(x, offset, weight, bias, mask=mask, **params)
    gy = np.random.default_rng(1).standard_normal(y_ref.shape + (2,))[..., 1]
    grads = deform_conv2d_backward(to_backend(gy, backend), *args[:4], mask=args[4], **params)
    _check_all([y, *grads], [y_ref, *reference.deform_conv2d_backward(gy, x, offset, weight, bias, mask=mask,
                                                                      **params)])
    tx = torch.tensor(x).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels_last
    assert not tx.is_contiguous()
    assert rel_err(deform_conv2d(tx, torch.tensor(offset), torch.tensor(weight), None, mask=torch.tensor(mask),
                                 **params), reference.deform_conv2d(x, offset, weight, mask=mask, **params)) < 1e-10


def test_wrt_subsets(backend):
    x, offset, weight, bias, mask, params = random_config(4, with_mask=True)
    bias = np.ones(weight.shape[0])
    gy = np.random.default_rng(2).standard_normal(reference.deform_conv2d(x, offset, weight, mask=mask,
                                                                          **params).shape)
    args = [to_backend(a, backend) for a in (gy, x, offset, weight, bias)]
    m = to_backend(mask, backend)
    full = [to_numpy(g) for g in deform_conv2d_backward(*args, mask=m, **params)]
    for i, name in enumerate(GRADS):
        grads = deform_conv2d_backward(*args, mask=m, wrt=name, **params)
        assert all(g is None for j, g in enumerate(grads) if j != i), name
        np.testing.assert_array_equal(to_numpy(grads[i]), full[i])
    assert deform_conv2d_backward(*args[:4], wrt=("bias", "mask"), **params) == (None,) * 5


def test_forward_allocates_only_its_output_and_backward_is_bounded(launches):
    rng = np.random.default_rng(6)
    b, cin, h, w, cout, k, go = 2, 6, 9, 8, 4, 9, 2
    x, weight = rng.standard_normal((b, cin, h, w)), rng.standard_normal((cout, cin, 3, 3))
    offset, mask = rng.standard_normal((b, 2 * go * k, h, w)), rng.standard_normal((b, go * k, h, w))
    with _arrays.track_allocations() as log:
        y = deform_conv2d(x, offset, weight, padding=1, mask=mask)
    assert log == [((b, cout, h, w), "float64")]  # no im2col [B, Cin*k, Ho*Wo] anywhere
    assert launches == ["deform_conv2d_fwd"]
    gy = rng.standard_normal(y.shape)
    with _arrays.track_allocations() as log:
        deform_conv2d_backward(gy, x, offset, weight, padding=1, mask=mask)
    im2col = b * cin * k * h * w
    assert all(int(np.prod(shape)) < im2col for shape, _ in log)
    # the gradients, then the binning workspace of one chunk (every segment fits here)
    assert log == [((cout, cin, 3, 3), "float64"), (offset.shape, "float64"), (mask.shape, "float64"),
                   (x.shape, "float64"), ((b * go, (h + 1) * (w + 1) + 2), "float64"),
                   ((b * go, k * h * w), "float64")]


# --- bad inputs: each a ValueError/TypeError naming the argument, nothing launched ---

_rng = np.random.default_rng(0)
X = _rng.standard_normal((2, 4, 8, 8))
W = _rng.standard_normal((6, 2, 3, 3))  # weight groups 2
OFF = _rng.standard_normal((2, 2 * 2 * 9, 6, 6))  # offset groups 2, output 6x6
MASK = _rng.standard_normal((2, 2 * 9, 6, 6))
BIAS = _rng.standard_normal(6)

BAD = [
    ("input 3-D", (X[0], OFF, W), {}, ValueError, r"input must be 4-D .*\(4, 8, 8\)"),
    ("offset 3-D", (X, OFF[0], W), {}, ValueError, r"offset must be 4-D .*\(36, 6, 6\)"),
    ("weight 2-D", (X, OFF, W[:, :, 0, 0]), {}, ValueError, r"weight must be 4-D .*\(6, 2\)"),
    ("mask 3-D", (X, OFF, W), dict(mask=MASK[0]), ValueError, r"mask must be 4-D .*\(18, 6, 6\)"),
    ("channels not a multiple of weight.shape[1]", (X, OFF, _rng.standard_normal((6, 3, 3, 3))), {}, ValueError,
     r"input has 4 channels, not a positive multiple of weight's in_channels/weight_groups=3"),
    ("out_channels not divisible by weight groups", (X, OFF, W[:5]), {}, ValueError,
     r"out_channels=5 is not divisible by weight_groups=2"),
    ("bias shape", (X, OFF, W, BIAS[:4]), {}, ValueError, r"bias must have shape \(6,\) .*got \(4,\)"),
    ("offset channels not a multiple of 2*kh*kw", (X, OFF[:, :35], W), {}, ValueError,
     r"offset must have shape \[2, 2 \* offset_groups \* 9, 6, 6\] .*got \(2, 35, 6, 6\)"),
    ("offset spatial size", (X, OFF[:, :, :5], W), {}, ValueError, r"offset must have shape .*got \(2, 36, 5, 6\)"),
    ("offset batch", (X, OFF[:1], W), {}, ValueError, r"offset must have shape \[2, .*got \(1, 36, 6, 6\)"),
    ("offset groups do not divide channels", (X, _rng.standard_normal((2, 3 * 18, 6, 6)), W), {}, ValueError,
     r"input's 4 channels are not divisible by offset_groups=3"),
    ("mask channels", (X, OFF, W), dict(mask=MASK[:, :9]), ValueError,
     r"mask must have shape \(2, 18, 6, 6\) .*got \(2, 9, 6, 6\)"),
    ("mask spatial size", (X, OFF, W), dict(mask=MASK[..., :4]), ValueError, r"mask must have shape .*\(2, 18, 6, 4\)"),
    ("kernel larger than the input", (X, OFF, _rng.standard_normal((6, 2, 11, 3))), {}, ValueError,
     r"larger than the padded input 8x8"),
    ("negative padding", (X, OFF, W), dict(padding=-1), ValueError, r"padding must be >= 0"),
    ("string padding", (X, OFF, W), dict(padding="same"), TypeError, r"padding must be an int or a pair"),
    ("zero stride", (X, OFF, W), dict(stride=(1, 0)), ValueError, r"stride must be positive"),
    ("zero dilation", (X, OFF, W), dict(dilation=0), ValueError, r"dilation must be positive"),
    ("mixed dtypes", (X, OFF.astype(np.float32), W), {}, TypeError, r"one dtype; got .*offset float32"),
    ("integer dtype", (X, OFF, W.astype(np.int32)), {}, TypeError, r"weight has dtype int32"),
    ("input None", (None, OFF, W), {}, TypeError, r"input must be an array, got None"),
    ("offset None", (X, None, W), {}, TypeError, r"offset must be an array, got None"),
    ("weight not an array", (X, OFF, W.tolist()), {}, TypeError, r"weight must be an array"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_raise_before_launch(case, launches):
    _, args, params, error, pattern = case
    with pytest.raises(error, match=pattern):
        deform_conv2d(*args, **params)
    with pytest.raises(error, match=pattern):
        deform_conv2d_backward(np.ones((2, 6, 6, 6)), *args, **params)
    assert launches == []


def test_bad_backward_inputs_raise_before_launch(launches):
    gy = np.ones((2, 6, 6, 6))
    with pytest.raises(ValueError, match=r"grad_output must have the forward output's shape \(2, 6, 6, 6\)"):
        deform_conv2d_backward(gy[:, :5], X, OFF, W)
    with pytest.raises(ValueError, match=r"wrt names unknown arguments \['offsets'\]"):
        deform_conv2d_backward(gy, X, OFF, W, wrt="offsets")
    with pytest.raises(TypeError, match=r"grad_output float32"):
        deform_conv2d_backward(gy.astype(np.float32), X, OFF, W)
    with pytest.raises(TypeError, match=r"deterministic must be a bool"):
        deform_conv2d_backward(gy, X, OFF, W, deterministic="yes")
    assert launches == []


def test_launch_counter_sees_launches(launches):
    deform_conv2d(X, OFF, W, BIAS, mask=MASK)
    deform_conv2d_backward(np.ones((2, 6, 6, 6)), X, OFF, W, BIAS, mask=MASK)
    assert launches == ["deform_conv2d_fwd", "deform_conv2d_bwd_bias", "deform_conv2d_bwd_weight",
                        "deform_conv2d_bwd_offset", "deform_conv2d_bwd_input_bin", "deform_conv2d_bwd_input"]
