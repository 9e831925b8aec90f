"""pixel_shuffle / pixel_unshuffle forward and backward: against the float64
reference and torch CPU (forward and autograd, an independent oracle), bit-exact in
all four dtypes (a permutation rounds nothing), the identities that tie the two ops
together (inverse, adjoint), and the API contract (leading dims, batch 0,
non-contiguous inputs, NaN/Inf, bad inputs with nothing launched)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cuconv.ops import _common
from cuconv.ops.pixel_shuffle import (pixel_shuffle, pixel_shuffle_backward, pixel_unshuffle,
                                      pixel_unshuffle_backward)
from cuconv.reference import pixel_shuffle as reference
from conftest import (DTYPES, as_torch, assert_matches_reference, bits, random_input, skip_unsupported, to_backend,
                      to_numpy)


TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float64": torch.float64}

# Low-resolution shapes [*lead, C, H, W] (the shuffle input is [*lead, C*r*r, H, W]): odd
# sizes, a single pixel, 3-D (no batch) and 5-D (two leading dims).
SHAPES = {
    "4d odd": ((2,), 3, 5, 7),
    "4d one pixel": ((1,), 1, 1, 1),
    "3d": ((), 2, 3, 4),
    "5d": ((2, 3), 1, 3, 2),
}
FACTORS = (1, 2, 3, 4)








def shuffle_shapes(case: str, r: int):
    """(low-resolution shape [*, C*r*r, H, W], high-resolution shape [*, C, H*r, W*r])."""
    lead, c, h, w = SHAPES[case]
    return (*lead, c * r * r, h, w), (*lead, c, h * r, w * r)






# --- forward and backward against the reference and torch, every dtype, bit-exact ---

@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("r", FACTORS)
def test_pixel_shuffle_matches_reference_and_torch(backend, r, case, dtype):
    skip_unsupported(backend, dtype)
    lo_shape, hi_shape = shuffle_shapes(case, r)
    x = random_input(lo_shape, dtype, seed=r)
    y = pixel_shuffle(to_backend(x, backend), r)
    assert to_numpy(y).dtype == x.dtype and to_numpy(y).shape == hi_shape
    assert_matches_reference(y, reference.pixel_shuffle(x.astype(np.float64), r))
    np.testing.assert_array_equal(bits(y), bits(F.pixel_shuffle(as_torch(x), r)))

    # backward: torch autograd of pixel_shuffle in the same dtype
    gy = random_input(hi_shape, dtype, seed=100 + r)
    (gx,) = pixel_shuffle_backward(to_backend(gy, backend), to_backend(x, backend), r)
    tx = as_torch(x).clone().requires_grad_()
    F.pixel_shuffle(tx, r).backward(as_torch(gy))
    assert to_numpy(gx).dtype == x.dtype
    assert_matches_reference(gx, reference.pixel_shuffle_backward(gy.astype(np.float64), x, r)[0])
    np.testing.assert_array_equal(bits(gx), bits(tx.grad))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("r", FACTORS)
def test_pixel_unshuffle_matches_reference_and_torch(backend, r, case, dtype):
    skip_unsupported(backend, dtype)
    lo_shape, hi_shape = shuffle_shapes(case, r)
    x = random_input(hi_shape, dtype, seed=200 + r)
    y = pixel_unshuffle(to_backend(x, backend), r)
    assert to_numpy(y).dtype == x.dtype and to_numpy(y).shape == lo_shape
    assert_matches_reference(y, reference.pixel_unshuffle(x.astype(np.float64), r))
    np.testing.assert_array_equal(bits(y), bits(F.pixel_unshuffle(as_torch(x), r)))

    gy = random_input(lo_shape, dtype, seed=300 + r)
    (gx,) = pixel_unshuffle_backward(to_backend(gy, backend), to_backend(x, backend), r)
    tx = as_torch(x).clone().requires_grad_()
    F.pixel_unshuffle(tx, r).backward(as_torch(gy))
    assert to_numpy(gx).dtype == x.dtype
    assert_matches_reference(gx, reference.pixel_unshuffle_backward(gy.astype(np.float64), x, r)[0])
    np.testing.assert_array_equal(bits(gx), bits(tx.grad))


def test_reference_matches_torch():
    """The reference agrees with torch on its own (so the two oracles are independent
    witnesses of the same semantics, not one copying the other)."""
    x = np.random.default_rng(0).standard_normal((2, 3, 36, 5, 7))
    for r in (2, 3):
        np.testing.assert_array_equal(reference.pixel_shuffle(x, r), F.pixel_shuffle(torch.tensor(x), r).numpy())
    y = np.random.default_rng(1).standard_normal((2, 3, 4, 12, 6))
    np.testing.assert_array_equal(reference.pixel_unshuffle(y, 2), F.pixel_unshuffle(torch.tensor(y), 2).numpy())


def test_formula_elementwise():
    """out[b, c, h*r+i, w*r+j] == in[b, c*r*r + i*r + j, h, w], spelled out index by index."""
    r, c_out, h, w = 3, 2, 3, 4
    x = np.arange(1 * c_out * r * r * h * w, dtype=np.float64).reshape(1, c_out * r * r, h, w)
    y = pixel_shuffle(x, r)
    for c in range(c_out):
        for i in range(r):
            for j in range(r):
                np.testing.assert_array_equal(y[0, c, i::r, j::r], x[0, c * r * r + i * r + j])
    np.testing.assert_array_equal(pixel_unshuffle(y, r), x)


# --- torch tensors in, torch tensors out ---

@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
def test_torch_tensors_in_torch_tensors_out(dtype):
    x = torch.randn(2, 3, 12, 5, 7).to(TORCH_DTYPES[dtype])
    y = pixel_shuffle(x, 2)
    assert isinstance(y, torch.Tensor) and y.dtype == x.dtype and y.device == x.device
    np.testing.assert_array_equal(bits(y), bits(F.pixel_shuffle(x, 2)))
    z = pixel_unshuffle(y, 2)
    assert isinstance(z, torch.Tensor)
    np.testing.assert_array_equal(bits(z), bits(x))
    gy = torch.randn(y.shape).to(x.dtype)
    (gx,) = pixel_shuffle_backward(gy, x, 2)
    assert isinstance(gx, torch.Tensor) and gx.dtype == x.dtype
    np.testing.assert_array_equal(bits(gx), bits(F.pixel_unshuffle(gy, 2)))
    (gz,) = pixel_unshuffle_backward(torch.randn(z.shape).to(x.dtype), y, 2)
    assert isinstance(gz, torch.Tensor) and gz.shape == y.shape


def test_torch_tensor_requiring_grad_is_accepted():
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64, requires_grad=True)
    y = pixel_shuffle(x, 2)
    assert not y.requires_grad  # the functional API is not autograd-aware (cuconv.torch is)
    np.testing.assert_array_equal(y.numpy(), F.pixel_shuffle(x, 2).detach().numpy())


# --- the identities: inverse and adjoint ---

@pytest.mark.parametrize("r", FACTORS)
def test_round_trip_is_identity(backend, r):
    x = random_input((2, 3 * r * r, 5, 3), "float32", seed=400 + r)
    y = pixel_shuffle(to_backend(x, backend), r)
    np.testing.assert_array_equal(bits(pixel_unshuffle(y, r)), bits(x))
    hi = random_input((3, 2, 3 * r, 5 * r), "float32", seed=500 + r)
    lo = pixel_unshuffle(to_backend(hi, backend), r)
    np.testing.assert_array_equal(bits(pixel_shuffle(lo, r)), bits(hi))


@pytest.mark.parametrize("r", FACTORS)
def test_adjoint_identity_float64(backend, r):
    """<shuffle(x), y> == <x, unshuffle(y)>, and each backward is the other forward."""
    rng = np.random.default_rng(600 + r)
    x = rng.standard_normal((2, 3 * r * r, 5, 7))
    y = rng.standard_normal((2, 3, 5 * r, 7 * r))
    xb, yb = to_backend(x, backend), to_backend(y, backend)
    lhs = np.vdot(to_numpy(pixel_shuffle(xb, r)), y)
    rhs = np.vdot(x, to_numpy(pixel_unshuffle(yb, r)))
    assert abs(lhs - rhs) <= 1e-12 * np.sqrt(np.vdot(x, x) * np.vdot(y, y))
    np.testing.assert_array_equal(to_numpy(pixel_shuffle_backward(yb, xb, r)[0]), to_numpy(pixel_unshuffle(yb, r)))
    np.testing.assert_array_equal(to_numpy(pixel_unshuffle_backward(xb, yb, r)[0]), to_numpy(pixel_shuffle(xb, r)))


# --- the API contract ---

EMPTY_SHUFFLE = [(0, 8, 3, 5), (2, 0, 3, 3), (2, 4, 0, 3), (4, 0, 3), (3, 0, 4, 4, 5), (0, 2, 4, 4, 5)]
EMPTY_UNSHUFFLE = [(0, 4, 4, 6), (2, 0, 4, 4), (2, 1, 0, 4), (0, 3, 2, 2, 2)]


def torch_shape(fn, shape, r):
    """torch's output shape, from its meta kernel: torch 2.x's CPU pixel_unshuffle returns an
    empty input's own shape unchanged ([0, 4, 4, 6] -> [0, 4, 4, 6], not [0, 16, 2, 3]),
    while its shape function (meta) follows the formula as for non-empty inputs."""
    return tuple(fn(torch.empty(shape, device="meta"), r).shape)


@pytest.mark.parametrize("shape", EMPTY_SHUFFLE, ids=str)
def test_empty_pixel_shuffle(backend, shape, launches):
    x = np.zeros(shape, np.float32)
    expected = torch_shape(F.pixel_shuffle, shape, 2)
    y = to_numpy(pixel_shuffle(to_backend(x, backend), 2))
    assert y.shape == expected and y.dtype == np.float32
    (gx,) = pixel_shuffle_backward(to_backend(np.zeros(expected, np.float32), backend), to_backend(x, backend), 2)
    assert to_numpy(gx).shape == shape
    assert launches == []


@pytest.mark.parametrize("shape", EMPTY_UNSHUFFLE, ids=str)
def test_empty_pixel_unshuffle(backend, shape, launches):
    x = np.zeros(shape, np.float64)
    expected = torch_shape(F.pixel_unshuffle, shape, 2)
    y = to_numpy(pixel_unshuffle(to_backend(x, backend), 2))
    assert y.shape == expected and y.dtype == np.float64
    (gx,) = pixel_unshuffle_backward(to_backend(np.zeros(expected), backend), to_backend(x, backend), 2)
    assert to_numpy(gx).shape == shape
    assert launches == []


def test_empty_torch_tensor_stays_torch(launches):
    y = pixel_shuffle(torch.zeros(0, 12, 5, 5, dtype=torch.bfloat16), 2)
    assert isinstance(y, torch.Tensor) and y.shape == (0, 3, 10, 10) and y.dtype == torch.bfloat16
    assert launches == []


def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(7)
    # a transposed view with negative strides, [2, 12, 5, 7]
    x = rng.standard_normal((2, 7, 5, 12)).transpose(0, 3, 2, 1)[:, :, ::-1, :]
    assert not x.flags.c_contiguous
    np.testing.assert_array_equal(to_numpy(pixel_shuffle(to_backend(x, backend), 2)), reference.pixel_shuffle(x, 2))
    # every other element of a wider array, [3, 2, 6, 9]
    hi = rng.standard_normal((3, 2, 6, 18))[..., ::2]
    assert not hi.flags.c_contiguous
    np.testing.assert_array_equal(to_numpy(pixel_unshuffle(to_backend(hi, backend), 3)),
                                  reference.pixel_unshuffle(hi, 3))
    gy = rng.standard_normal((2, 3, 10, 14, 2))[..., 1]  # non-contiguous grad_output
    np.testing.assert_array_equal(to_numpy(pixel_shuffle_backward(to_backend(gy, backend), to_backend(x, backend),
                                                                  2)[0]),
                                  reference.pixel_shuffle_backward(gy, x, 2)[0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_non_contiguous_torch_tensors(dtype):
    x = torch.randn(2, 5, 7, 18).to(TORCH_DTYPES[dtype]).permute(0, 3, 1, 2)  # channels_last [2, 18, 5, 7]
    np.testing.assert_array_equal(bits(pixel_shuffle(x, 3)), bits(F.pixel_shuffle(x, 3)))
    hi = torch.randn(4, 3, 8, 12).to(TORCH_DTYPES[dtype])[::2, :, :, 2:10]  # sliced [2, 3, 8, 8]
    np.testing.assert_array_equal(bits(pixel_unshuffle(hi, 4)), bits(F.pixel_unshuffle(hi, 4)))


def test_nan_and_inf_pass_through(backend):
    x = np.full((1, 4, 2, 2), 1.5)
    x[0, 1, 0, 1] = np.nan
    x[0, 2, 1, 0] = np.inf
    x[0, 3, 1, 1] = -np.inf
    y = to_numpy(pixel_shuffle(to_backend(x, backend), 2))
    assert np.isnan(y[0, 0, 0, 3]) and y[0, 0, 3, 0] == np.inf and y[0, 0, 3, 3] == -np.inf
    assert np.isnan(y).sum() == 1 and np.isinf(y).sum() == 2


def test_wrt(backend):
    x = np.random.default_rng(8).standard_normal((1, 4, 3, 3))
    gy = np.random.default_rng(9).standard_normal((1, 1, 6, 6))
    xb, gyb = to_backend(x, backend), to_backend(gy, backend)
    full = to_numpy(pixel_shuffle_backward(gyb, xb, 2)[0])
    for wrt in ("input", ("input",)):
        np.testing.assert_array_equal(to_numpy(pixel_shuffle_backward(gyb, xb, 2, wrt=wrt)[0]), full)
    assert pixel_shuffle_backward(gyb, xb, 2, wrt=()) == (None,)
    assert pixel_unshuffle_backward(xb, gyb, 2, wrt=()) == (None,)


@pytest.mark.parametrize("r", (2, 3))
def test_grid_stride_loop(backend, r, monkeypatch):
    """A grid far smaller than the work (3 blocks), so every thread loops: the path
    tensors beyond the grid limit take, at test sizes."""
    monkeypatch.setattr(_common, "_MAX_GRID", 3)
    x = random_input((2, 5 * r * r, 9, 11), "float32", seed=700 + r)
    y = pixel_shuffle(to_backend(x, backend), r)
    np.testing.assert_array_equal(bits(y), bits(F.pixel_shuffle(as_torch(x), r)))
    np.testing.assert_array_equal(bits(pixel_unshuffle(y, r)), bits(x))


def test_factor_accepts_numpy_integers():
    x = np.random.default_rng(10).standard_normal((1, 8, 2, 3))
    np.testing.assert_array_equal(pixel_shuffle(x, np.int64(2)), pixel_shuffle(x, 2))


# --- bad inputs: each a ValueError/TypeError naming the argument, nothing launched ---

_rng = np.random.default_rng(0)
LO = _rng.standard_normal((2, 12, 4, 5))  # pixel_shuffle input for r = 2 (C = 3)
HI = _rng.standard_normal((2, 3, 8, 10))  # pixel_unshuffle input for r = 2

BAD_FORWARD = [
    ("shuffle 2-D", pixel_shuffle, (LO[0, 0], 2), ValueError, r"input must have at least 3 dims .*\(4, 5\)"),
    ("shuffle 1-D", pixel_shuffle, (LO[0, 0, 0], 1), ValueError, r"at least 3 dims .*\(5,\)"),
    ("shuffle channels not divisible", pixel_shuffle, (LO[:, :10], 2), ValueError,
     r"channel dim \(10, at dim -3\) must be divisible by upscale_factor\^2 = 4; got input shape \(2, 10, 4, 5\)"),
    ("shuffle channels not divisible r=3", pixel_shuffle, (LO, 3), ValueError,
     r"channel dim \(12.*upscale_factor\^2 = 9"),
    ("shuffle factor zero", pixel_shuffle, (LO, 0), ValueError, r"upscale_factor must be positive, got 0"),
    ("shuffle factor negative", pixel_shuffle, (LO, -2), ValueError, r"upscale_factor must be positive, got -2"),
    ("shuffle factor float", pixel_shuffle, (LO, 2.0), TypeError, r"upscale_factor must be an int, got 2.0"),
    ("shuffle factor bool", pixel_shuffle, (LO, True), TypeError, r"upscale_factor must be an int, got True"),
    ("shuffle factor None", pixel_shuffle, (LO, None), TypeError, r"upscale_factor must be an int, got None"),
    ("shuffle factor tuple", pixel_shuffle, (LO, (2, 2)), TypeError, r"upscale_factor must be an int"),
    ("shuffle integer dtype", pixel_shuffle, (LO.astype(np.int32), 2), TypeError, r"input has dtype int32"),
    ("shuffle complex dtype", pixel_shuffle, (LO.astype(np.complex64), 2), TypeError, r"input has dtype complex64"),
    ("shuffle not an array", pixel_shuffle, (LO.tolist(), 2), TypeError, r"input must be an array"),
    ("shuffle input None", pixel_shuffle, (None, 2), TypeError, r"input must be an array, got None"),
    ("unshuffle 2-D", pixel_unshuffle, (HI[0, 0], 2), ValueError, r"input must have at least 3 dims .*\(8, 10\)"),
    ("unshuffle height not divisible", pixel_unshuffle, (HI[:, :, :7], 2), ValueError,
     r"height \(7\) and width \(10\) must be divisible by downscale_factor=2; got input shape \(2, 3, 7, 10\)"),
    ("unshuffle width not divisible", pixel_unshuffle, (HI, 4), ValueError,
     r"height \(8\) and width \(10\) must be divisible by downscale_factor=4"),
    ("unshuffle factor zero", pixel_unshuffle, (HI, 0), ValueError, r"downscale_factor must be positive, got 0"),
    ("unshuffle factor float", pixel_unshuffle, (HI, 0.5), TypeError, r"downscale_factor must be an int"),
    ("unshuffle integer dtype", pixel_unshuffle, (HI.astype(np.int64), 2), TypeError, r"input has dtype int64"),
    ("unshuffle torch integer", pixel_unshuffle, (torch.zeros(1, 1, 2, 2, dtype=torch.int8), 2), TypeError,
     r"input has dtype int8"),
]


@pytest.mark.parametrize("case", BAD_FORWARD, ids=[c[0] for c in BAD_FORWARD])
def test_bad_inputs_raise_before_launch(case, launches):
    _, fn, args, error, pattern = case
    with pytest.raises(error, match=fn.__name__ + ": " + ".*" + pattern):
        fn(*args)
    assert launches == []


GY_SHUFFLE = np.ones((2, 3, 8, 10))  # pixel_shuffle(LO, 2)'s shape
GY_UNSHUFFLE = np.ones((2, 12, 4, 5))  # pixel_unshuffle(HI, 2)'s shape

BAD_BACKWARD = [
    ("shuffle grad_output shape", pixel_shuffle_backward, (GY_SHUFFLE[:, :, :7], LO, 2), {}, ValueError,
     r"grad_output must have the forward output's shape \(2, 3, 8, 10\), got \(2, 3, 7, 10\) "
     r"\(input \(2, 12, 4, 5\)\)"),
    ("shuffle grad_output dtype", pixel_shuffle_backward, (GY_SHUFFLE.astype(np.float32), LO, 2), {}, TypeError,
     r"one dtype; got input float64, grad_output float32"),
    ("shuffle grad_output None", pixel_shuffle_backward, (None, LO, 2), {}, TypeError,
     r"grad_output must be an array, got None"),
    ("shuffle input None", pixel_shuffle_backward, (GY_SHUFFLE, None, 2), {}, TypeError,
     r"input must be an array, got None"),
    ("shuffle wrt unknown", pixel_shuffle_backward, (GY_SHUFFLE, LO, 2), dict(wrt=("weight",)), ValueError,
     r"wrt names unknown arguments \['weight'\]"),
    ("shuffle bad factor", pixel_shuffle_backward, (GY_SHUFFLE, LO, 3), {}, ValueError,
     r"must be divisible by upscale_factor\^2 = 9"),
    ("shuffle factor zero", pixel_shuffle_backward, (GY_SHUFFLE, LO, 0), {}, ValueError,
     r"upscale_factor must be positive"),
    ("unshuffle grad_output shape", pixel_unshuffle_backward, (GY_UNSHUFFLE[:1], HI, 2), {}, ValueError,
     r"grad_output must have the forward output's shape \(2, 12, 4, 5\), got \(1, 12, 4, 5\)"),
    ("unshuffle grad_output given the input's shape", pixel_unshuffle_backward, (HI, HI, 2), {}, ValueError,
     r"forward output's shape \(2, 12, 4, 5\), got \(2, 3, 8, 10\)"),
    ("unshuffle grad_output dtype", pixel_unshuffle_backward, (GY_UNSHUFFLE.astype(np.float16), HI, 2), {},
     TypeError, r"grad_output float16"),
    ("unshuffle wrt unknown", pixel_unshuffle_backward, (GY_UNSHUFFLE, HI, 2), dict(wrt="bias"), ValueError,
     r"wrt names unknown arguments \['bias'\]"),
    ("unshuffle bad factor", pixel_unshuffle_backward, (GY_UNSHUFFLE, HI, 3), {}, ValueError,
     r"height \(8\) and width \(10\) must be divisible by downscale_factor=3"),
]


@pytest.mark.parametrize("case", BAD_BACKWARD, ids=[c[0] for c in BAD_BACKWARD])
def test_bad_backward_inputs_raise_before_launch(case, launches):
    _, fn, args, kwargs, error, pattern = case
    with pytest.raises(error, match=fn.__name__ + ": " + ".*" + pattern):
        fn(*args, **kwargs)
    assert launches == []


def test_launch_counter_sees_launches(launches):
    """The fixture above would notice a launch (so its empty lists mean something), and
    each backward runs the other op's forward kernel."""
    pixel_shuffle(LO, 2)
    pixel_shuffle_backward(GY_SHUFFLE, LO, 2)
    pixel_unshuffle(HI, 2)
    pixel_unshuffle_backward(GY_UNSHUFFLE, HI, 2)
    assert launches == ["pixel_shuffle_fwd", "pixel_unshuffle_fwd", "pixel_unshuffle_fwd", "pixel_shuffle_fwd"]
