"""involution2d, forward and backward: against the float64 reference, torch CPU autograd
through the official "unfold" formulation (F.unfold, multiply, sum over taps: an
independent oracle), finite differences of the reference, the depthwise-conv identity
(a spatially constant kernel), and the API contract (batch 0, non-contiguous inputs,
dtypes, determinism, bad inputs). Also proves the forward allocates only its output and
exercises small tiles, grid-stride loops and the direct fallback."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench import involution as involution_bench
from cuconv import _arrays
from cuconv.ops import _common
from cuconv.ops import involution as involution_module
from cuconv.ops.conv2d import conv2d, conv_output_size
from cuconv.ops.involution import involution2d, involution2d_backward
from cuconv.reference import involution as reference
from conftest import (
    assert_all_match, assert_gradients_match_finite_differences, assert_reduced_precision, rel_err, to_backend,
    to_numpy, torch_autograd)

# The unfold formulation of d-li14/involution (shared with the bench's self-check):
# torch_involution(x, k, stride=1, padding=0, dilation=1) on torch tensors.
torch_involution = functools.partial(involution_bench.torch_unfold, F)


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def kernel_shape(x_shape, groups, kh, kw, stride=1, padding=0, dilation=1):
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    b, _, h, w = x_shape
    return (b, groups, kh, kw, conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw))


def random_config(seed):
    """(x, kernel, params): odd sizes, stride, padding (int or pair), dilation, groups
    among 1, C and a proper divisor."""
    rng = np.random.default_rng(seed)
    cg, groups = int(rng.integers(1, 7)), int(rng.choice([1, 2, 3]))
    channels = cg * groups
    if seed % 4 == 1:
        groups = channels  # G = C: one channel per group (depthwise-like)
    elif seed % 4 == 2:
        groups = 1
    kh, kw = (int(v) for v in rng.integers(1, 6, size=2))
    dilation = tuple(int(v) for v in rng.integers(1, 3, size=2))
    stride = tuple(int(v) for v in rng.integers(1, 4, size=2))
    padding = int(rng.integers(0, 4)) if rng.random() < 0.5 else tuple(int(v) for v in rng.integers(0, 4, size=2))
    if rng.random() < 0.3:
        stride, dilation = int(stride[0]), int(dilation[0])
    (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
    h = int(rng.integers(max(1, dh * (kh - 1) + 1 - 2 * ph), 15))
    w = int(rng.integers(max(1, dw * (kw - 1) + 1 - 2 * pw), 15))
    x = rng.standard_normal((int(rng.integers(1, 4)), channels, h, w))
    k = rng.standard_normal(kernel_shape(x.shape, groups, kh, kw, stride, padding, dilation))
    return x, k, dict(stride=stride, padding=padding, dilation=dilation)


def torch_oracle(x, k, gy, params, dtype="float64"):
    y, grads = torch_autograd(lambda tx, tk: torch_involution(tx, tk, **params), (x, k), gy, dtype)
    return [y, *grads]


def _check_all(got, refs, oracle, tol=1e-10):
    assert_all_match(got, refs, oracle, names=("output", "grad_input", "grad_kernel"), tol=tol)


# --- float64 against the reference and the torch unfold oracle ---

@pytest.mark.parametrize("seed", range(24))
def test_matches_reference_and_torch_unfold_float64(backend, seed):
    x, k, params = random_config(seed)
    args = [to_backend(a, backend) for a in (x, k)]
    y = involution2d(*args, **params)
    y_ref = reference.involution2d(x, k, **params)
    gy = np.random.default_rng(1000 + seed).standard_normal(y_ref.shape)
    grads = involution2d_backward(to_backend(gy, backend), *args, **params)
    _check_all([y, *grads], [y_ref, *reference.involution2d_backward(gy, x, k, **params)],
               torch_oracle(x, k, gy, params))


@pytest.mark.parametrize("seed", range(3))
def test_torch_tensors_in_torch_tensors_out(seed):
    x, k, params = random_config(100 + seed)
    tx, tk = torch.tensor(x), torch.tensor(k)
    y = involution2d(tx, tk, **params)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    gy = np.random.default_rng(seed).standard_normal(tuple(y.shape))
    grads = involution2d_backward(torch.tensor(gy), tx, tk, **params)
    assert all(isinstance(g, torch.Tensor) and g.dtype == torch.float64 for g in grads)
    oracle = torch_oracle(x, k, gy, params)
    _check_all([y, *grads], oracle, oracle)


def test_finite_differences_of_the_reference():
    """The reference's backward is the derivative of its forward."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 6, 7, 8))
    params = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    k = rng.standard_normal(kernel_shape(x.shape, 3, 3, 2, **params))
    assert_gradients_match_finite_differences(reference.involution2d, reference.involution2d_backward, [x, k],
                                              params, rng)


# --- identity: a spatially constant kernel is a depthwise conv2d ---

@pytest.mark.parametrize("groups", [1, 2, 6])
def test_spatially_constant_kernel_is_depthwise_conv2d(backend, groups):
    rng = np.random.default_rng(groups)
    x = rng.standard_normal((3, 6, 11, 10))
    params = dict(stride=(2, 1), padding=(2, 1), dilation=(1, 2))
    per_group = rng.standard_normal((groups, 3, 3))  # one 3x3 filter per group, same at every pixel and image
    shape = kernel_shape(x.shape, groups, 3, 3, **params)
    k = np.broadcast_to(per_group[None, :, :, :, None, None], shape).copy()
    weight = np.repeat(per_group, 6 // groups, axis=0)[:, None]  # [C, 1, 3, 3]: weight[c, 0] = kernel[g(c)]
    y = involution2d(to_backend(x, backend), to_backend(k, backend), **params)
    y_conv = conv2d(to_backend(x, backend), to_backend(weight, backend), groups=6, **params)
    assert rel_err(y, to_numpy(y_conv)) < 1e-12


# --- reduced precision: within 2x torch's error (DESIGN.md §5) ---

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("seed", range(2))
def test_reduced_precision_within_twice_torch_error(dtype, seed):
    """Error against float64 at most 2x that of the unfold formulation in torch in that
    dtype, plus two units of output rounding. Groups of 12 channels make grad_kernel's
    reduction long enough for the precision to matter."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 24, 11, 9))
    params = [dict(stride=1, padding=2, dilation=1), dict(stride=(2, 1), padding=(3, 1), dilation=(1, 2))][seed]
    k = rng.standard_normal(kernel_shape(x.shape, 2, 5, 5, **params))
    assert_reduced_precision(involution2d, involution2d_backward, reference.involution2d,
                             reference.involution2d_backward,
                             lambda tx, tk: torch_involution(tx, tk, **params), (x, k), params, dtype, seed)


def test_bfloat16_torch_tensors():
    x = torch.randn(2, 8, 9, 9, dtype=torch.bfloat16)
    k = torch.randn(2, 4, 3, 3, 9, 9, dtype=torch.bfloat16)
    y = involution2d(x, k, padding=1)
    assert y.dtype == torch.bfloat16
    y_ref = reference.involution2d(x.double().numpy(), k.double().numpy(), padding=1)
    anchor = rel_err(torch_involution(x, k, padding=1).double().numpy(), y_ref)
    assert rel_err(y, y_ref) <= 2 * anchor + 2**-8


# --- the contract: batch 0, non-contiguous, NaN, determinism, wrt ---

def test_batch_zero(backend, launches):
    x = to_backend(np.zeros((0, 4, 9, 9)), backend)
    k = to_backend(np.zeros((0, 2, 3, 3, 4, 4)), backend)
    y = to_numpy(involution2d(x, k, stride=2))
    assert y.shape == (0, 4, 4, 4)
    gx, gk = (to_numpy(g) for g in involution2d_backward(to_backend(np.zeros((0, 4, 4, 4)), backend), x, k,
                                                         stride=2))
    assert gx.shape == (0, 4, 9, 9) and gk.shape == (0, 2, 3, 3, 4, 4)
    assert launches == []


def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(3)
    x = np.ascontiguousarray(rng.standard_normal((2, 11, 6, 9)).transpose(0, 2, 1, 3))[:, :, ::-1, :]  # [2,6,11,9]
    params = dict(stride=(1, 2), padding=1)
    shape = kernel_shape(x.shape, 3, 3, 2, **params)  # [2, 3, 3, 2, 11, 5]
    k = rng.standard_normal(shape[:2] + shape[4:] + shape[2:4]).transpose(0, 1, 4, 5, 2, 3)
    assert not (x.flags.c_contiguous or k.flags.c_contiguous)
    args = [to_backend(a, backend) for a in (x, k)]
    y = involution2d(*args, **params)
    y_ref = reference.involution2d(x, k, **params)
    assert rel_err(y, y_ref) < 1e-10
    gy = rng.standard_normal(y_ref.shape + (2,))[..., 1]
    grads = involution2d_backward(to_backend(gy, backend), *args, **params)
    for g, g_ref in zip(grads, reference.involution2d_backward(gy, x, k, **params)):
        assert rel_err(g, g_ref) < 1e-10


def test_non_contiguous_torch_tensors():
    x = torch.randn(2, 8, 10, 4, dtype=torch.float64).permute(0, 3, 1, 2)  # channels_last-like [2, 4, 8, 10]
    k = torch.randn(2, 8, 10, 2, 3, 3, dtype=torch.float64).permute(0, 3, 4, 5, 1, 2)
    y = involution2d(x, k, padding=1)
    assert rel_err(y, torch_involution(x, k, padding=1).numpy()) < 1e-10


def test_nan_and_inf_propagate(backend):
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6))
    x[0, 0, 2, 3] = np.nan
    x[0, 1, 5, 5] = np.inf
    k = np.ones((1, 1, 3, 3, 6, 6))
    y = to_numpy(involution2d(to_backend(x, backend), to_backend(k, backend), padding=1))
    assert np.isnan(y[0, 0, 1:4, 2:5]).all() and np.isfinite(np.delete(y[0, 0], np.s_[1:4], axis=0)).all()
    assert np.isinf(y[0, 1, 4:, 4:]).all() and np.isfinite(y[0, 1, :4]).all()


def test_forward_and_backward_are_bitwise_deterministic(backend):
    x, k, params = random_config(5)
    x, k = np.concatenate([x] * 4).astype(np.float32), np.concatenate([k] * 4).astype(np.float32)
    args = [to_backend(a, backend) for a in (x, k)]
    y1, y2 = (to_numpy(involution2d(*args, **params)) for _ in range(2))
    assert y1.tobytes() == y2.tobytes()
    gy = to_backend(np.random.default_rng(1).standard_normal(y1.shape).astype(np.float32), backend)
    first, second = ([to_numpy(g) for g in involution2d_backward(gy, *args, **params)] for _ in range(2))
    for g1, g2 in zip(first, second):
        assert g1.tobytes() == g2.tobytes()


def test_wrt_subsets(backend, launches):
    x, k, params = random_config(7)
    gy = np.random.default_rng(2).standard_normal(reference.involution2d(x, k, **params).shape)
    args = [to_backend(a, backend) for a in (gy, x, k)]
    full = [to_numpy(g) for g in involution2d_backward(*args, **params)]
    for i, name in enumerate(("input", "kernel")):
        del launches[:]
        grads = involution2d_backward(*args, **params, wrt=name)
        assert grads[1 - i] is None and launches == [f"involution2d_bwd_{name}"]
        np.testing.assert_array_equal(to_numpy(grads[i]), full[i])
    assert involution2d_backward(*args, **params, wrt=()) == (None, None)


# --- the forward allocates only its output; tiles, chunks, grid-stride loops, fallback ---

def test_forward_allocates_only_the_output(launches):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 12, 13, 14))
    params = dict(stride=2, padding=3)
    k = rng.standard_normal(kernel_shape(x.shape, 3, 7, 7, **params))
    with _arrays.track_allocations() as log:
        y = involution2d(x, k, **params)
    assert log == [((2, 12, 7, 7), "float64")]  # no unfolded [B, C*kh*kw, Ho*Wo] anywhere
    assert launches == ["involution2d_fwd"]
    assert rel_err(y, reference.involution2d(x, k, **params)) < 1e-10


def test_default_budget_with_several_tiles_and_chunks(backend, launches):
    """At the real budget: a 20x20 output plane in 8x8 tiles (short last ones: 8 + 8 + 4
    each way) and groups of 22 channels in a chunk of 16 and a short one of 6 (not a
    whole number of 4-channel items)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 44, 20, 20))
    k = rng.standard_normal(kernel_shape(x.shape, 2, 5, 5, padding=2))
    call = _common.Call("t", input=x, kernel=k)
    assert involution_module.forward_plan(call, involution_module.Geometry("t", call, 1, 2, 1)) == (8, 8, 16)
    y = involution2d(to_backend(x, backend), to_backend(k, backend), padding=2)
    assert rel_err(y, reference.involution2d(x, k, padding=2)) < 1e-10
    assert launches == ["involution2d_fwd"]


@pytest.mark.parametrize("seed", range(4))
def test_small_tiles_and_grid_stride_loops(backend, seed, monkeypatch, launches):
    """A budget that fits only small tiles and chunks (short last ones), and a grid
    smaller than the work so every block loops, in all four kernels."""
    monkeypatch.setattr(_common, "_MAX_GRID", 3)
    x, k, params = random_config(300 + seed)
    x, k = np.concatenate([x] * 3, axis=1), np.concatenate([k] * 3, axis=1)  # 3x the groups
    taps = k.shape[2] * k.shape[3]
    monkeypatch.setattr(involution_module, "_SHARED_BUDGET_BYTES", 8 * (taps * 6 + 2 * 200))
    args = [to_backend(a, backend) for a in (x, k)]
    y = involution2d(*args, **params)
    assert rel_err(y, reference.involution2d(x, k, **params)) < 1e-10
    gy = np.random.default_rng(seed).standard_normal(y.shape)
    grads = involution2d_backward(to_backend(gy, backend), *args, **params)
    for g, g_ref in zip(grads, reference.involution2d_backward(gy, x, k, **params)):
        assert rel_err(g, g_ref) < 1e-10
    assert launches == ["involution2d_fwd", "involution2d_bwd_input", "involution2d_bwd_kernel"]


@pytest.mark.parametrize("seed", range(3))
def test_direct_fallback_matches_reference(backend, seed, monkeypatch, launches):
    """A budget below one 1x1 tile of one channel: the direct kernel, same results."""
    monkeypatch.setattr(_common, "_MAX_GRID", 2)
    monkeypatch.setattr(involution_module, "_SHARED_BUDGET_BYTES", 8)
    x, k, params = random_config(400 + seed)
    y = involution2d(to_backend(x, backend), to_backend(k, backend), **params)
    assert launches == ["involution2d_direct_fwd"]
    assert rel_err(y, reference.involution2d(x, k, **params)) < 1e-10
    assert rel_err(y, torch_oracle(x, k, None, params)[0]) < 1e-10


def test_tile_planning():
    """The plans the docs quote (RedNet-50's 7x7, G = C/16 layers): the fewest device
    loads per output element that fit 48 KiB of accumulators."""
    def plan(shape, dtype, groups, stride, k=7):
        x = np.zeros(shape, dtype)
        kern = np.zeros(kernel_shape(shape, groups, k, k, stride, k // 2), dtype)
        call = _common.Call("t", input=x, kernel=kern)
        return involution_module.forward_plan(call, involution_module.Geometry("t", call, stride, k // 2, 1))

    assert plan((1, 64, 56, 56), np.float32, 4, 1) == (8, 16, 16)  # 49*128 + 16*14*22 = 11200 floats
    assert plan((1, 64, 56, 56), np.float16, 4, 1) == (8, 16, 16)  # float accumulators too
    assert plan((1, 64, 56, 56), np.float64, 4, 1) == (8, 8, 12)  # 49*64 + 12*14*14 = 5488 doubles
    assert plan((1, 512, 7, 7), np.float32, 32, 1) == (7, 7, 16)  # the whole 7x7 plane
    assert plan((1, 256, 14, 14), np.float32, 16, 1) == (9, 14, 16)  # 126 pixels in 14-wide rows
    assert plan((1, 128, 56, 56), np.float32, 8, 2) == (8, 8, 16)  # stride 2: 21x21 halos
    assert plan((1, 128, 56, 56), np.float64, 8, 2) == (4, 8, 16)
    assert plan((1, 64, 9, 9), np.float64, 4, 1, k=79) is None  # 79*79 + 79*79 doubles > 48 KiB
    x, kern = np.zeros((1, 4, 80, 80)), np.zeros((1, 1, 7, 7, 2, 2))  # 7x7, dilation 13: 49 + 79*79 > 6144
    call = _common.Call("t", input=x, kernel=kern)
    assert involution_module.forward_plan(call, involution_module.Geometry("t", call, 1, 0, 13)) is None


# --- bad inputs: each a ValueError/TypeError naming the argument, nothing launched ---

_rng = np.random.default_rng(0)
X = _rng.standard_normal((2, 6, 8, 8))
K = _rng.standard_normal((2, 3, 3, 3, 8, 8))  # padding=1

BAD = [
    ("input 3-D", (X[0], K), dict(padding=1), ValueError, r"input must be 4-D .*\(6, 8, 8\)"),
    ("kernel 5-D", (X, K[:, 0]), dict(padding=1), ValueError, r"kernel must be 6-D .*\(2, 3, 3, 8, 8\)"),
    ("kernel batch", (X, K[:1]), dict(padding=1), ValueError,
     r"kernel's batch 1 does not match input's batch 2 \(input \(2, 6, 8, 8\), kernel \(1, 3, 3, 3, 8, 8\)\)"),
    ("groups do not divide channels", (X, K[:, :1].repeat(4, axis=1)), dict(padding=1), ValueError,
     r"input's channels=6 must be divisible by kernel's groups=4"),
    ("zero groups", (X, K[:, :0]), dict(padding=1), ValueError, r"divisible by kernel's groups=0"),
    ("no channels", (X[:, :0], K), dict(padding=1), ValueError, r"input has no channels"),
    ("empty window", (X, K[:, :, :0]), dict(padding=1), ValueError, r"kernel has an empty window kh=0"),
    ("kernel output size", (X, K), {}, ValueError,
     r"kernel's last two dims must be the output size \(6, 6\) .*got \(8, 8\)"),
    ("kernel output size with stride", (X, K), dict(padding=1, stride=2), ValueError,
     r"output size \(4, 4\) .*stride \(2, 2\).*got \(8, 8\)"),
    ("window larger than input", (X, _rng.standard_normal((2, 3, 9, 3, 1, 8))), dict(padding=(0, 1)), ValueError,
     r"dilated extent 9x3\) is larger than the padded input 8x10"),
    ("negative padding", (X, K), dict(padding=-1), ValueError, r"padding must be >= 0"),
    ("zero stride", (X, K), dict(stride=(1, 0), padding=1), ValueError, r"stride must be positive"),
    ("zero dilation", (X, K), dict(dilation=0, padding=1), ValueError, r"dilation must be positive"),
    ("string padding", (X, K), dict(padding="same"), TypeError, r"padding must be an int or a pair"),
    ("triple stride", (X, K), dict(stride=(1, 1, 1), padding=1), TypeError, r"stride must be an int or a pair"),
    ("float dilation", (X, K), dict(dilation=1.0, padding=1), TypeError, r"dilation must be an int or a pair"),
    ("mixed dtypes", (X, K.astype(np.float32)), dict(padding=1), TypeError, r"one dtype; got .*kernel float32"),
    ("integer dtype", (X.astype(np.int64), K), dict(padding=1), TypeError, r"input has dtype int64"),
    ("input None", (None, K), dict(padding=1), TypeError, r"input must be an array, got None"),
    ("kernel None", (X, None), dict(padding=1), TypeError, r"kernel must be an array, got None"),
    ("not an array", (X, K.tolist()), dict(padding=1), TypeError, r"kernel must be an array"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_raise_before_launch(case, launches):
    _, args, params, error, pattern = case
    with pytest.raises(error, match=pattern):
        involution2d(*args, **params)
    with pytest.raises(error, match=pattern):  # the backward validates the same way
        involution2d_backward(np.ones((2, 6, 8, 8)), *args, **params)
    assert launches == []


def test_bad_backward_inputs_raise_before_launch(launches):
    gy = np.ones((2, 6, 8, 8))
    with pytest.raises(ValueError, match=r"grad_output must have the forward output's shape \(2, 6, 8, 8\), "
                                         r"got \(2, 6, 8, 7\)"):
        involution2d_backward(gy[..., :7], X, K, padding=1)
    with pytest.raises(ValueError, match=r"wrt names unknown arguments \['weight'\]"):
        involution2d_backward(gy, X, K, padding=1, wrt=("weight",))
    with pytest.raises(TypeError, match=r"grad_output float32"):
        involution2d_backward(gy.astype(np.float32), X, K, padding=1)
    with pytest.raises(TypeError, match=r"grad_output must be an array, got None"):
        involution2d_backward(None, X, K, padding=1)
    assert launches == []


def test_launch_counter_sees_launches(launches):
    """The fixture would notice a launch (so its empty lists mean something)."""
    involution2d(X, K, padding=1)
    involution2d_backward(np.ones((2, 6, 8, 8)), X, K, padding=1)
    assert launches == ["involution2d_fwd", "involution2d_bwd_input", "involution2d_bwd_kernel"]


def test_direct_algorithm_on_request(backend, launches):
    """algorithm='direct' runs the one-thread-per-output kernel (the benchmark's stand-in
    for the official design) and agrees with the reference; an unknown one is refused."""
    x, k, params = random_config(5)
    y = involution2d(to_backend(x, backend), to_backend(k, backend), **params, algorithm="direct")
    assert launches == ["involution2d_direct_fwd"]
    assert rel_err(y, reference.involution2d(x, k, **params)) < 1e-10
    with pytest.raises(ValueError, match="algorithm must be one of"):
        involution2d(x, k, **params, algorithm="tiled")
