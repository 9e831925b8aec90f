"""conv2d forward and backward: against the float64 reference, torch CPU autograd
(an independent oracle), finite differences, and the API contract (batch 0,
non-contiguous inputs, dtypes, NaN propagation, determinism, bad inputs)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cuconv
from cuconv.ops import _common
from cuconv.ops import conv2d as conv2d_module
from cuconv.reference import conv2d as reference
from conftest import (
    assert_gradients_match_finite_differences, assert_reduced_precision, rel_err, to_backend, to_numpy,
    torch_autograd)


def random_config(seed):
    """A random conv2d configuration with odd sizes: stride, padding (incl. 'same' and
    'valid'), dilation, groups (incl. depthwise), with or without bias."""
    rng = np.random.default_rng(seed)
    groups = int(rng.choice([1, 1, 2, 3]))
    depthwise = rng.random() < 0.2
    cin_g = 1 if depthwise else int(rng.integers(1, 4))
    cout_g = int(rng.integers(1, 4))
    kh, kw = (int(v) for v in rng.integers(1, 5, size=2))
    dilation = tuple(int(v) for v in rng.integers(1, 3, size=2))
    stride = tuple(int(v) for v in rng.integers(1, 4, size=2))
    padding = [0, int(rng.integers(0, 3)), tuple(int(v) for v in rng.integers(0, 3, size=2)), "valid", "same"][
        int(rng.integers(0, 5))]
    if padding == "same":
        stride = (1, 1)
    h = int(rng.integers(dilation[0] * (kh - 1) + 1, 14))
    w = int(rng.integers(dilation[1] * (kw - 1) + 1, 14))
    x = rng.standard_normal((int(rng.integers(1, 4)), cin_g * groups, h, w))
    weight = rng.standard_normal((cout_g * groups, cin_g, kh, kw))
    bias = rng.standard_normal(cout_g * groups) if rng.random() < 0.7 else None
    return x, weight, bias, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def torch_conv_grads(x, w, b, gy, params, dtype="float64"):
    """torch CPU autograd: (y, grad_x, grad_w, grad_b) as float64 NumPy."""
    y, grads = torch_autograd(lambda *t: F.conv2d(*t, **params), (x, w, b), gy, dtype)
    return [y, *grads]


@pytest.mark.parametrize("seed", range(24))
def test_matches_reference_and_torch_float64(backend, seed):
    x, w, b, params = random_config(seed)
    y = cuconv.conv2d(to_backend(x, backend), to_backend(w, backend), to_backend(b, backend), **params)
    y_ref = reference.conv2d(x, w, b, **params)
    gy = np.random.default_rng(1000 + seed).standard_normal(y_ref.shape)
    grads = cuconv.conv2d_backward(to_backend(gy, backend), to_backend(x, backend), to_backend(w, backend),
                                   to_backend(b, backend), **params)
    grads_ref = reference.conv2d_backward(gy, x, w, b, **params)
    torch_y, *torch_grads = torch_conv_grads(x, w, b, gy, params)
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(y, torch_y) < 1e-10
    for name, g, g_ref, g_torch in zip(("input", "weight", "bias"), grads, grads_ref, torch_grads):
        if b is None and name == "bias":
            assert g is None
            continue
        assert rel_err(g, g_ref) < 1e-10, name
        assert rel_err(g, g_torch) < 1e-10, name


@pytest.mark.parametrize("seed", range(6))
def test_torch_tensors_in_torch_tensors_out(seed):
    x, w, b, params = random_config(100 + seed)
    tx, tw = torch.tensor(x), torch.tensor(w)
    tb = None if b is None else torch.tensor(b)
    y = cuconv.conv2d(tx, tw, tb, **params)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64 and y.device == tx.device
    torch_y, *torch_grads = torch_conv_grads(x, w, b, np.ones(y.shape), params)
    assert rel_err(y, torch_y) < 1e-10
    grads = cuconv.conv2d_backward(torch.ones_like(y), tx, tw, tb, **params)
    for g, g_torch in zip(grads, torch_grads):
        if g_torch is None:
            assert g is None
            continue
        assert isinstance(g, torch.Tensor)
        assert rel_err(g, g_torch) < 1e-10


def test_torch_tensor_requiring_grad_is_accepted_and_shares_memory():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    y = cuconv.conv2d(x, w, padding=1)
    assert rel_err(y, F.conv2d(x, w, padding=1).detach().numpy()) < 1e-10
    # zero-copy import: NumPy sees the tensor's own memory
    from cuconv._arrays import import_array

    view = import_array("test", "input", x)
    assert view.data.ctypes.data == x.data_ptr()


def test_finite_differences_of_the_reference():
    """The reference's backward is the derivative of its forward (checked numerically),
    so agreeing with it means agreeing with the true gradient."""
    rng = np.random.default_rng(7)
    x, w, b = rng.standard_normal((2, 4, 7, 6)), rng.standard_normal((6, 2, 3, 2)), rng.standard_normal(6)
    params = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    assert_gradients_match_finite_differences(reference.conv2d, reference.conv2d_backward, [x, w, b], params, rng)


def test_batch_zero(backend):
    x = np.zeros((0, 4, 9, 9))
    w = np.random.default_rng(0).standard_normal((6, 2, 3, 3))
    b = np.ones(6)
    y = to_numpy(cuconv.conv2d(to_backend(x, backend), to_backend(w, backend), to_backend(b, backend),
                               stride=2, groups=2))
    assert y.shape == (0, 6, 4, 4)
    gx, gw, gb = (to_numpy(g) for g in cuconv.conv2d_backward(
        to_backend(np.zeros((0, 6, 4, 4)), backend), to_backend(x, backend), to_backend(w, backend),
        to_backend(b, backend), stride=2, groups=2))
    assert gx.shape == (0, 4, 9, 9)
    np.testing.assert_array_equal(gw, np.zeros_like(w))  # a sum over nothing, written (outputs are poisoned)
    np.testing.assert_array_equal(gb, np.zeros(6))


def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 9, 11, 2))[..., 0].transpose(0, 2, 1)[:, None].repeat(2, 1)  # strided view
    x = np.ascontiguousarray(x)[:, :, ::-1, :]  # negative strides
    w = rng.standard_normal((5, 2, 3, 3)).transpose(0, 1, 3, 2)
    b = rng.standard_normal(10)[::2]
    assert not (x.flags.c_contiguous or w.flags.c_contiguous or b.flags.c_contiguous)
    params = dict(stride=(1, 2), padding=1)
    y = cuconv.conv2d(to_backend(x, backend), to_backend(w, backend), to_backend(b, backend), **params)
    assert rel_err(y, reference.conv2d(x, w, b, **params)) < 1e-10
    gy = rng.standard_normal(reference.conv2d(x, w, b, **params).shape + (2,))[..., 1]
    grads = cuconv.conv2d_backward(to_backend(gy, backend), to_backend(x, backend), to_backend(w, backend),
                                   to_backend(b, backend), **params)
    for g, g_ref in zip(grads, reference.conv2d_backward(gy, x, w, b, **params)):
        assert rel_err(g, g_ref) < 1e-10


def test_non_contiguous_torch_tensors():
    x = torch.randn(2, 8, 10, 3, dtype=torch.float64).permute(0, 3, 1, 2)  # channels_last-like
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64).transpose(2, 3)
    y = cuconv.conv2d(x, w, padding="same")
    assert rel_err(y, F.conv2d(x, w, padding="same").numpy()) < 1e-10


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("seed", range(4))
def test_reduced_precision_within_twice_torch_error(dtype, seed):
    x, w, b, params = random_config(200 + seed)
    x, w = np.concatenate([x] * 8, axis=1), np.concatenate([w] * 8, axis=1)  # longer reductions
    assert_reduced_precision(cuconv.conv2d, cuconv.conv2d_backward, reference.conv2d, reference.conv2d_backward,
                             lambda *t: F.conv2d(*t, **params), (x, w, b), params, dtype, seed)


def test_bfloat16_torch_tensors():
    x = torch.randn(2, 4, 9, 9, dtype=torch.bfloat16)
    w = torch.randn(6, 2, 3, 3, dtype=torch.bfloat16)
    y = cuconv.conv2d(x, w, groups=2, padding=1)
    assert y.dtype == torch.bfloat16
    y_ref = reference.conv2d(x.double().numpy(), w.double().numpy(), groups=2, padding=1)
    anchor = rel_err(F.conv2d(x, w, groups=2, padding=1).double().numpy(), y_ref)
    assert rel_err(y, y_ref) <= 2 * anchor + 2 ** -8


def test_nan_and_inf_propagate(backend):
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6))
    x[0, 0, 2, 3] = np.nan
    x[0, 1, 5, 5] = np.inf
    w = np.ones((1, 2, 3, 3))
    y = to_numpy(cuconv.conv2d(to_backend(x, backend), to_backend(w, backend), padding=1))
    assert np.isnan(y[0, 0, 1:4, 2:5]).all()
    assert np.isinf(y[0, 0, 4:, 4:]).all()
    assert np.isfinite(y[0, 0, :1]).all()


def test_backward_is_bitwise_deterministic(backend):
    x, w, b, params = random_config(5)
    x, w = np.concatenate([x] * 4), np.asarray(w, np.float32)
    x = x.astype(np.float32)
    b = None if b is None else b.astype(np.float32)
    gy = np.random.default_rng(1).standard_normal(reference.conv2d(x, w, b, **params).shape).astype(np.float32)
    args = [to_backend(a, backend) for a in (gy, x, w, b)]
    first = [to_numpy(g) for g in cuconv.conv2d_backward(*args, **params)]
    second = [to_numpy(g) for g in cuconv.conv2d_backward(*args, **params)]
    for g1, g2 in zip(first, second):
        if g1 is not None:
            assert g1.tobytes() == g2.tobytes()


def test_wrt_subsets(backend):
    x, w, b, params = random_config(9)
    b = np.ones(w.shape[0])
    y_shape = reference.conv2d(x, w, b, **params).shape
    gy = np.random.default_rng(2).standard_normal(y_shape)
    args = [to_backend(a, backend) for a in (gy, x, w, b)]
    full = [to_numpy(g) for g in cuconv.conv2d_backward(*args, **params)]
    gx, gw, gb = cuconv.conv2d_backward(*args, **params, wrt=("weight",))
    assert gx is None and gb is None
    np.testing.assert_array_equal(to_numpy(gw), full[1])
    gx, gw, gb = cuconv.conv2d_backward(*args, **params, wrt="bias")
    assert gx is None and gw is None
    np.testing.assert_array_equal(to_numpy(gb), full[2])
    assert cuconv.conv2d_backward(*args[:3], None, **params, wrt=("bias",)) == (None, None, None)


def test_conv_output_size_matches_torch():
    rng = np.random.default_rng(4)
    for _ in range(50):
        size, k, s, p, d = (int(v) for v in (rng.integers(5, 30), rng.integers(1, 6), rng.integers(1, 4),
                                            rng.integers(0, 3), rng.integers(1, 3)))
        expected = F.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, k, k), stride=s, padding=p,
                            dilation=d).shape[-1]
        assert cuconv.conv_output_size(size, k, s, p, d) == expected
    assert cuconv.conv_output_size((9, 10), 3, stride=(1, 2), padding=1) == (9, 5)


def test_algorithm_choice():
    x, w = np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3))
    np.testing.assert_array_equal(cuconv.conv2d(x, w, algorithm="direct"), cuconv.conv2d(x, w))
    with pytest.raises(ValueError, match="algorithm"):
        cuconv.conv2d(x, w, algorithm="winograd")


def test_forced_backend_variable(monkeypatch):
    x, w = np.ones((1, 1, 5, 5)), np.ones((1, 1, 3, 3))
    monkeypatch.setenv("CUCONV_BACKEND", "interpret")
    np.testing.assert_array_equal(cuconv.conv2d(x, w), np.full((1, 1, 3, 3), 9.0))
    monkeypatch.setenv("CUCONV_BACKEND", "tpu")
    with pytest.raises(ValueError, match="CUCONV_BACKEND"):
        cuconv.conv2d(x, w)


# --- bad inputs: each a ValueError/TypeError naming the argument, nothing launched ---

_rng = np.random.default_rng(0)
X = _rng.standard_normal((2, 4, 8, 8))
W = _rng.standard_normal((6, 2, 3, 3))
B = _rng.standard_normal(6)

BAD_FORWARD = [
    ("input 2-D", (X[0, 0], W, None), dict(groups=2), ValueError, r"input must be 4-D .* or 3-D .*\(8, 8\)"),
    ("weight 5-D", (X, W[None], None), dict(groups=2), ValueError, r"weight must be 4-D .*\(1, 6, 2, 3, 3\)"),
    ("channel mismatch", (X, W, None), dict(groups=1), ValueError, r"input has 4 channels .* groups=1"),
    ("groups do not divide out_channels", (X, W[:5], None), dict(groups=2), ValueError,
     r"out_channels=5 is not divisible by groups=2"),
    ("groups do not divide in_channels", (X[:, :3], W, None), dict(groups=2), ValueError, r"input has 3 channels"),
    ("groups zero", (X, W, None), dict(groups=0), ValueError, r"groups must be positive"),
    ("negative padding", (X, W, None), dict(groups=2, padding=-1), ValueError, r"padding must be >= 0"),
    ("zero stride", (X, W, None), dict(groups=2, stride=(1, 0)), ValueError, r"stride must be positive"),
    ("zero dilation", (X, W, None), dict(groups=2, dilation=0), ValueError, r"dilation must be positive"),
    ("float stride", (X, W, None), dict(groups=2, stride=1.5), TypeError, r"stride must be an int or a pair"),
    ("triple padding", (X, W, None), dict(groups=2, padding=(1, 1, 1)), TypeError, r"padding must be an int or"),
    ("unknown padding string", (X, W, None), dict(groups=2, padding="full"), ValueError, r"padding must be"),
    ("same with stride", (X, W, None), dict(groups=2, padding="same", stride=2), ValueError,
     r"padding='same' requires stride 1"),
    ("kernel larger than padded input", (X, _rng.standard_normal((6, 2, 9, 3)), None), dict(groups=2),
     ValueError, r"kernel \(dilated extent 9x3\) is larger than the padded input 8x8"),
    ("dilated kernel too large", (X, W, None), dict(groups=2, dilation=4), ValueError, r"larger than the padded"),
    ("bias shape", (X, W, B[:5]), dict(groups=2), ValueError, r"bias must have shape \(6,\) .* got \(5,\)"),
    ("mixed dtypes", (X.astype(np.float32), W, None), dict(groups=2), TypeError,
     r"one dtype; got input float32, weight float64"),
    ("integer dtype", (X.astype(np.int32), W, None), dict(groups=2), TypeError, r"input has dtype int32"),
    ("not an array", (X.tolist(), W, None), dict(groups=2), TypeError, r"input must be an array"),
    ("input None", (None, W, None), dict(groups=2), TypeError, r"input must be an array, got None"),
    ("weight None", (X, None, None), dict(groups=2), TypeError, r"weight must be an array, got None"),
    ("complex dtype", (X, W.astype(np.complex128), None), dict(groups=2), TypeError, r"weight has dtype complex128"),
]


@pytest.mark.parametrize("case", BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_bad_inputs_raise_before_launch(case, launches):
    _, args, params, error, pattern = case
    with pytest.raises(error, match=pattern):
        cuconv.conv2d(*args, **params)
    assert launches == []


def test_bad_backward_inputs_raise_before_launch(launches):
    gy = np.ones((2, 6, 6, 6))
    with pytest.raises(ValueError, match=r"grad_output must have the forward output's shape \(2, 6, 6, 6\)"):
        cuconv.conv2d_backward(gy[:, :, :5], X, W, B, groups=2)
    with pytest.raises(ValueError, match=r"wrt names unknown arguments \['offset'\]"):
        cuconv.conv2d_backward(gy, X, W, B, groups=2, wrt=("offset",))
    with pytest.raises(TypeError, match=r"grad_output float32"):
        cuconv.conv2d_backward(gy.astype(np.float32), X, W, B, groups=2)
    assert launches == []


def test_launch_counter_sees_launches(launches):
    """The fixture above would notice a launch (so its empty lists mean something)."""
    cuconv.conv2d(X, W, B, groups=2)
    assert launches == ["conv2d_fwd"]


@pytest.mark.parametrize("seed", range(4))
def test_multi_chunk_staging_and_grid_stride_loops(backend, seed, monkeypatch):
    """Tiny shared-memory chunks (boundaries fall mid-filter) and a grid smaller than the
    work, so every block loops: the paths large layers take, at test sizes."""
    monkeypatch.setattr(conv2d_module, "_WEIGHT_STAGE_BYTES", 40)  # 5 float64 weights per chunk
    monkeypatch.setattr(_common, "_MAX_GRID", 3)
    x, w, b, params = random_config(300 + seed)
    y = cuconv.conv2d(to_backend(x, backend), to_backend(w, backend), to_backend(b, backend), **params)
    assert rel_err(y, reference.conv2d(x, w, b, **params)) < 1e-10
    gy = np.random.default_rng(seed).standard_normal(reference.conv2d(x, w, b, **params).shape)
    grads = cuconv.conv2d_backward(to_backend(gy, backend), to_backend(x, backend), to_backend(w, backend),
                                   to_backend(b, backend), **params)
    for g, g_ref in zip(grads, reference.conv2d_backward(gy, x, w, b, **params)):
        assert (g is None) == (g_ref is None)
        if g is not None:
            assert rel_err(g, g_ref) < 1e-10
