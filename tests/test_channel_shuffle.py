"""channel_shuffle forward and backward: against the float64 reference and torch CPU
(forward and autograd, an independent oracle), bit-exact in all four dtypes (a
permutation rounds nothing), the inverse and adjoint identities, and the API contract
(3-D to 5-D inputs, batch 0, non-contiguous inputs, NaN/Inf, bad inputs with nothing
launched). Outputs are poisoned with NaN before every launch (conftest.py), so an
element the kernel leaves unwritten fails the bitwise comparisons."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cuconv.ops import _common
from cuconv.ops.channel_shuffle import channel_shuffle, channel_shuffle_backward
from cuconv.reference import channel_shuffle as reference
from conftest import (DTYPES, as_torch, assert_matches_reference, bits, random_input, skip_unsupported, to_backend,
                      to_numpy)

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}

# (label, input shape [N, C, *], groups): odd sizes, every divisor of C somewhere (1 and C:
# the identity), 3-D [N, C, L] as torch reads it, 5-D, a single pixel, S = 1 (after global
# pooling: the strided-load case).
CASES = [
    ("4d odd g3", (2, 15, 5, 7), 3),
    ("4d odd g5", (2, 15, 5, 7), 5),
    ("4d g1 identity", (2, 15, 5, 7), 1),
    ("4d gC identity", (2, 15, 5, 7), 15),
    ("3d g4", (3, 12, 7), 4),
    ("3d g6", (3, 12, 7), 6),
    ("5d g2", (2, 6, 3, 2, 5), 2),
    ("one pixel g2", (1, 4, 1, 1), 2),
    ("S=1 g3", (5, 12, 1), 3),
    ("many groups g8", (2, 24, 3, 3), 8),
]












# --- forward and backward against the reference and torch, every dtype, bit-exact ---

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_and_torch(backend, case, dtype):
    skip_unsupported(backend, dtype)
    _, shape, g = case
    x = random_input(shape, dtype, seed=g)
    y = channel_shuffle(to_backend(x, backend), g)
    assert to_numpy(y).dtype == x.dtype and to_numpy(y).shape == shape
    assert_matches_reference(y, reference.channel_shuffle(x.astype(np.float64), g))
    np.testing.assert_array_equal(bits(y), bits(F.channel_shuffle(as_torch(x), g)))

    # backward: torch autograd of channel_shuffle in the same dtype
    gy = random_input(shape, dtype, seed=100 + g)
    (gx,) = channel_shuffle_backward(to_backend(gy, backend), to_backend(x, backend), g)
    tx = as_torch(x).clone().requires_grad_()
    F.channel_shuffle(tx, g).backward(as_torch(gy))
    assert to_numpy(gx).dtype == x.dtype
    assert_matches_reference(gx, reference.channel_shuffle_backward(gy.astype(np.float64), x, g)[0])
    np.testing.assert_array_equal(bits(gx), bits(tx.grad))


def test_reference_matches_torch():
    """The reference agrees with torch on its own (so the two oracles are independent
    witnesses of the same semantics, not one copying the other)."""
    rng = np.random.default_rng(0)
    for shape, g in (((2, 12, 5, 7), 3), ((3, 10, 4), 5), ((2, 6, 2, 3, 4), 2)):
        x = rng.standard_normal(shape)
        np.testing.assert_array_equal(reference.channel_shuffle(x, g), F.channel_shuffle(torch.tensor(x), g).numpy())
        tx = torch.tensor(x, requires_grad=True)
        gy = rng.standard_normal(shape)
        F.channel_shuffle(tx, g).backward(torch.tensor(gy))
        np.testing.assert_array_equal(reference.channel_shuffle_backward(gy, x, g)[0], tx.grad.numpy())


def test_formula_elementwise():
    """out[n, j*g + i] == in[n, i*K + j] (K = C / g), spelled out channel by channel."""
    g, k = 3, 4
    x = np.arange(2 * g * k * 2 * 3, dtype=np.float64).reshape(2, g * k, 2, 3)
    y = channel_shuffle(x, g)
    for i in range(g):
        for j in range(k):
            np.testing.assert_array_equal(y[:, j * g + i], x[:, i * k + j])
    # ShuffleNet's picture: with g = 2 and 4 channels [a0 a1 | b0 b1] -> [a0 b0 a1 b1]
    x = np.arange(4.0).reshape(1, 4, 1)
    assert channel_shuffle(x, 2)[0, :, 0].tolist() == [0.0, 2.0, 1.0, 3.0]


# --- torch tensors in, torch tensors out ---

@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_torch_tensors_in_torch_tensors_out(dtype):
    x = torch.randn(2, 12, 5, 7).to(TORCH_DTYPES[dtype])
    y = channel_shuffle(x, 4)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and y.device == x.device
    np.testing.assert_array_equal(bits(y), bits(F.channel_shuffle(x, 4)))
    gy = torch.randn(y.shape).to(x.dtype)
    (gx,) = channel_shuffle_backward(gy, x, 4)
    assert isinstance(gx, torch.Tensor) and gx.dtype == x.dtype and gx.shape == x.shape
    np.testing.assert_array_equal(bits(gx), bits(F.channel_shuffle(gy, 3)))


def test_torch_tensor_requiring_grad_is_accepted():
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True)
    y = channel_shuffle(x, 2)
    np.testing.assert_array_equal(y.detach().numpy(), F.channel_shuffle(x, 2).detach().numpy())


# --- the identities: inverse and adjoint ---

@pytest.mark.parametrize("g", (1, 2, 3, 4, 6, 12))
def test_inverse_is_shuffle_with_c_over_g_groups(backend, g):
    x = random_input((2, 12, 5, 3), "float32", seed=400 + g)
    y = channel_shuffle(to_backend(x, backend), g)
    np.testing.assert_array_equal(bits(channel_shuffle(y, 12 // g)), bits(x))
    np.testing.assert_array_equal(bits(channel_shuffle_backward(y, to_backend(x, backend), g)[0]), bits(x))
    if g not in (1, 12):  # a real permutation: it moves something
        assert not np.array_equal(bits(y), bits(x))


@pytest.mark.parametrize("g", (2, 3, 4))
def test_adjoint_identity_float64(backend, g):
    """<shuffle(x, g), y> == <x, backward(y)>, and the backward is the shuffle with C/g groups."""
    rng = np.random.default_rng(600 + g)
    x = rng.standard_normal((2, 12, 5, 7))
    y = rng.standard_normal((2, 12, 5, 7))
    xb, yb = to_backend(x, backend), to_backend(y, backend)
    (gx,) = channel_shuffle_backward(yb, xb, g)
    lhs = np.vdot(to_numpy(channel_shuffle(xb, g)), y)
    rhs = np.vdot(x, to_numpy(gx))
    assert abs(lhs - rhs) <= 1e-12 * np.sqrt(np.vdot(x, x) * np.vdot(y, y))
    np.testing.assert_array_equal(to_numpy(gx), to_numpy(channel_shuffle(yb, 12 // g)))


# --- the API contract ---

# (shape, groups): batch 0, no channels, an empty spatial dim, 3-D and 5-D
EMPTY = [((0, 6, 3, 5), 3), ((2, 0, 3, 3), 2), ((2, 4, 0, 3), 2), ((0, 4, 3), 4), ((3, 6, 2, 0, 5), 3),
         ((0, 2, 4, 4, 5), 1)]


@pytest.mark.parametrize("case", EMPTY, ids=str)
def test_empty(backend, case, launches):
    shape, g = case
    x = np.zeros(shape, np.float32)
    expected = tuple(F.channel_shuffle(torch.zeros(shape), g).shape)
    y = to_numpy(channel_shuffle(to_backend(x, backend), g))
    assert y.shape == expected == shape and y.dtype == np.float32
    (gx,) = channel_shuffle_backward(to_backend(np.zeros(shape, np.float32), backend), to_backend(x, backend), g)
    assert to_numpy(gx).shape == shape
    assert launches == []


def test_empty_torch_tensor_stays_torch(launches):
    y = channel_shuffle(torch.zeros(0, 12, 5, 5, dtype=torch.bfloat16), 3)
    assert isinstance(y, torch.Tensor) and y.shape == (0, 12, 5, 5) and y.dtype == torch.bfloat16
    assert launches == []


def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(7)
    # channels last with a reversed row order, [2, 12, 5, 7]
    x = rng.standard_normal((2, 7, 5, 12)).transpose(0, 3, 2, 1)[:, :, ::-1, :]
    assert not x.flags.c_contiguous
    np.testing.assert_array_equal(to_numpy(channel_shuffle(to_backend(x, backend), 3)),
                                  reference.channel_shuffle(x, 3))
    # every other channel of a wider array, [3, 6, 4]
    z = rng.standard_normal((3, 12, 4))[:, ::2]
    assert not z.flags.c_contiguous
    np.testing.assert_array_equal(to_numpy(channel_shuffle(to_backend(z, backend), 2)),
                                  reference.channel_shuffle(z, 2))
    gy = rng.standard_normal((2, 12, 5, 7, 2))[..., 1]  # non-contiguous grad_output
    np.testing.assert_array_equal(to_numpy(channel_shuffle_backward(to_backend(gy, backend),
                                                                    to_backend(x, backend), 3)[0]),
                                  reference.channel_shuffle_backward(gy, x, 3)[0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_non_contiguous_torch_tensors(dtype):
    x = torch.randn(2, 5, 7, 18).to(TORCH_DTYPES[dtype]).permute(0, 3, 1, 2)  # channels_last [2, 18, 5, 7]
    np.testing.assert_array_equal(bits(channel_shuffle(x, 3)), bits(F.channel_shuffle(x, 3)))
    z = torch.randn(4, 8, 8, 12).to(TORCH_DTYPES[dtype])[::2, :, :, 2:10]  # sliced [2, 8, 8, 8]
    np.testing.assert_array_equal(bits(channel_shuffle(z, 4)), bits(F.channel_shuffle(z, 4)))


def test_nan_and_inf_pass_through(backend):
    x = np.full((1, 4, 2, 2), 1.5)
    x[0, 1, 0, 1] = np.nan   # channel 1 = i*K + j with K = 2: i=0, j=1 -> output channel j*g + i = 2
    x[0, 2, 1, 0] = np.inf   # i=1, j=0 -> output channel 1
    x[0, 3, 1, 1] = -np.inf  # i=1, j=1 -> output channel 3
    y = to_numpy(channel_shuffle(to_backend(x, backend), 2))
    assert np.isnan(y[0, 2, 0, 1]) and y[0, 1, 1, 0] == np.inf and y[0, 3, 1, 1] == -np.inf
    assert np.isnan(y).sum() == 1 and np.isinf(y).sum() == 2


def test_wrt(backend):
    x = np.random.default_rng(8).standard_normal((1, 6, 3, 3))
    gy = np.random.default_rng(9).standard_normal((1, 6, 3, 3))
    xb, gyb = to_backend(x, backend), to_backend(gy, backend)
    full = to_numpy(channel_shuffle_backward(gyb, xb, 2)[0])
    for wrt in ("input", ("input",), None):
        np.testing.assert_array_equal(to_numpy(channel_shuffle_backward(gyb, xb, 2, wrt=wrt)[0]), full)
    assert channel_shuffle_backward(gyb, xb, 2, wrt=()) == (None,)


@pytest.mark.parametrize("g", (2, 3))
def test_grid_stride_loop(backend, g, monkeypatch):
    """A grid far smaller than the work (3 blocks), so every thread loops: the path
    tensors beyond the grid limit take, at test sizes."""
    monkeypatch.setattr(_common, "_MAX_GRID", 3)
    x = random_input((2, 6 * g, 9, 11), "float32", seed=700 + g)
    y = channel_shuffle(to_backend(x, backend), g)
    np.testing.assert_array_equal(bits(y), bits(F.channel_shuffle(as_torch(x), g)))
    np.testing.assert_array_equal(bits(channel_shuffle_backward(y, to_backend(x, backend), g)[0]), bits(x))


def test_groups_accepts_numpy_integers():
    x = np.random.default_rng(10).standard_normal((1, 8, 2, 3))
    np.testing.assert_array_equal(channel_shuffle(x, np.int64(2)), channel_shuffle(x, 2))


def test_an_unwritten_output_fails(monkeypatch):
    """The poison is on: an output whose kernel never runs is all NaN, so the comparisons
    above would fail if the kernel skipped elements (the tests can fail)."""
    monkeypatch.setattr(_common.Call, "launch", lambda self, *a, **k: None)
    x = np.random.default_rng(11).standard_normal((2, 6, 3, 3))
    y = channel_shuffle(x, 3)
    assert np.isnan(y).all()
    assert not np.array_equal(y, reference.channel_shuffle(x, 3))


# --- bad inputs: each a ValueError/TypeError naming the argument, nothing launched ---

_rng = np.random.default_rng(0)
X = _rng.standard_normal((2, 12, 4, 5))

BAD_FORWARD = [
    ("2-D", (X[0, 0], 2), ValueError, r"input must have at least 3 dims \[N, C, \*\].*got shape \(4, 5\)"),
    ("1-D", (X[0, 0, 0], 1), ValueError, r"at least 3 dims .*got shape \(5,\)"),
    ("0-D", (np.asarray(X[0, 0, 0, 0]), 1), ValueError, r"at least 3 dims .*got shape \(\)"),
    ("channels not divisible", (X[:, :10], 4), ValueError,
     r"input's channel dim \(10, at dim 1\) must be divisible by groups=4; got input shape \(2, 10, 4, 5\)"),
    ("groups above channels", (X, 24), ValueError, r"channel dim \(12, at dim 1\) must be divisible by groups=24"),
    ("dim -3 divisible, dim 1 not", (X[:, :5], 2), ValueError, r"channel dim \(5, at dim 1\)"),
    ("groups zero", (X, 0), ValueError, r"groups must be positive, got 0"),
    ("groups negative", (X, -3), ValueError, r"groups must be positive, got -3"),
    ("groups float", (X, 2.0), TypeError, r"groups must be an int, got 2.0"),
    ("groups bool", (X, True), TypeError, r"groups must be an int, got True"),
    ("groups None", (X, None), TypeError, r"groups must be an int, got None"),
    ("groups tuple", (X, (2, 2)), TypeError, r"groups must be an int"),
    ("integer dtype", (X.astype(np.int32), 2), TypeError, r"input has dtype int32"),
    ("complex dtype", (X.astype(np.complex64), 2), TypeError, r"input has dtype complex64"),
    ("not an array", (X.tolist(), 2), TypeError, r"input must be an array"),
    ("input None", (None, 2), TypeError, r"input must be an array, got None"),
    ("torch integer", (torch.zeros(1, 4, 2, 2, dtype=torch.int8), 2), TypeError, r"input has dtype int8"),
]


@pytest.mark.parametrize("case", BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_bad_inputs_raise_before_launch(case, launches):
    _, args, error, pattern = case
    with pytest.raises(error, match="channel_shuffle: .*" + pattern):
        channel_shuffle(*args)
    assert launches == []


def test_torch_refuses_what_cuconv_refuses():
    """The shape and groups refusals above are torch's own (it raises for each)."""
    for args in ((X[0, 0], 2), (X[:, :10], 4), (X, 24), (X, 0), (X, -3)):
        with pytest.raises(RuntimeError):
            F.channel_shuffle(torch.tensor(args[0]), args[1])
    for groups in (2.0, True, None):
        with pytest.raises(TypeError):
            F.channel_shuffle(torch.tensor(X), groups)


GY = np.ones((2, 12, 4, 5))

BAD_BACKWARD = [
    ("grad_output shape", (GY[:, :, :3], X, 3), {}, ValueError,
     r"grad_output must have the forward output's shape \(2, 12, 4, 5\), got \(2, 12, 3, 5\) "
     r"\(input \(2, 12, 4, 5\)\)"),
    ("grad_output dtype", (GY.astype(np.float32), X, 3), {}, TypeError,
     r"one dtype; got input float64, grad_output float32"),
    ("grad_output None", (None, X, 3), {}, TypeError, r"grad_output must be an array, got None"),
    ("input None", (GY, None, 3), {}, TypeError, r"input must be an array, got None"),
    ("wrt unknown", (GY, X, 3), dict(wrt=("weight",)), ValueError, r"wrt names unknown arguments \['weight'\]"),
    ("groups not dividing", (GY, X, 5), {}, ValueError, r"must be divisible by groups=5"),
    ("groups zero", (GY, X, 0), {}, ValueError, r"groups must be positive"),
    ("groups float", (GY, X, 3.0), {}, TypeError, r"groups must be an int"),
    ("2-D input", (GY[0, 0], X[0, 0], 2), {}, ValueError, r"at least 3 dims"),
]


@pytest.mark.parametrize("case", BAD_BACKWARD, ids=[c[0] for c in BAD_BACKWARD])
def test_bad_backward_inputs_raise_before_launch(case, launches):
    _, args, kwargs, error, pattern = case
    with pytest.raises(error, match="channel_shuffle_backward: .*" + pattern):
        channel_shuffle_backward(*args, **kwargs)
    assert launches == []


def test_launch_counter_sees_launches(launches):
    """The fixture above would notice a launch (so its empty lists mean something); the
    backward runs the forward's kernel."""
    channel_shuffle(X, 3)
    channel_shuffle_backward(GY, X, 3)
    assert launches == ["channel_shuffle_fwd", "channel_shuffle_fwd"]
