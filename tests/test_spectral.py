"""spectral_filter2d (forward, input and complex filter gradients) against torch.fft
autograd (an independent oracle: torch CPU, complex128 filter leaf) and the float64
reference, plus the reference against finite differences, the API contract (torch in ->
torch out, half inputs, batch 0, non-contiguous, determinism, bad inputs, complex
rejected elsewhere); and conv2d(algorithm='fft') against the direct convolution, its
unsupported cases and the 'auto' rule."""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cuconv import _arrays
from cuconv.ops.conv2d import conv2d, conv2d_backward, conv_geometry
from cuconv.ops.spectral import (
    FFT_AUTO_MIN_TAPS,
    fft_preferred,
    spectral_filter2d,
    spectral_filter2d_backward,
)
from cuconv.reference import conv2d as conv_reference
from cuconv.reference import spectral as reference
from conftest import (
    DTYPES,
    assert_reduced_precision,
    rel_err,
    to_backend,
    to_numpy,
    unit_roundoff,
)


def _complex(rng, shape):
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def _case(seed, batch, channels, h, w, shared):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, h, w))
    f = _complex(rng, (1 if shared else batch, channels, h, w // 2 + 1))
    gy = rng.standard_normal((batch, channels, h, w))
    return x, f, gy


def torch_spectral(x, f, gy, dtype=torch.float64):
    """torch.fft autograd: (y, grad_x, grad_filter) as NumPy (the filter a complex leaf)."""
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    xt = torch.tensor(np.asarray(x, np.float64), dtype=dtype, requires_grad=True)
    ft = torch.tensor(np.asarray(f, np.complex128), dtype=cdtype, requires_grad=True)
    h, w = x.shape[-2:]
    y = torch.fft.irfft2(torch.fft.rfft2(xt, norm="ortho") * ft, s=(h, w), norm="ortho")
    y.backward(torch.tensor(np.asarray(gy, np.float64), dtype=dtype))
    return y.detach().numpy(), xt.grad.numpy(), ft.grad.numpy()


def complex_err(actual, expected) -> float:
    """rel_err over the real and imaginary parts together."""
    a, e = to_numpy(actual), np.asarray(expected)
    return rel_err(np.stack([a.real, a.imag]), np.stack([e.real, e.imag]))


# (batch, channels, H, W, shared filter): even and odd H and W, per-sample and broadcast
SHAPES = [(2, 3, 6, 8, False), (2, 3, 6, 8, True), (3, 2, 5, 7, False), (3, 2, 5, 7, True),
          (2, 2, 7, 6, True), (1, 4, 4, 9, False), (2, 1, 1, 1, True), (2, 2, 3, 2, False)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + ("-shared" if s[4] else ""))
def test_float64_matches_torch_fft_autograd_and_reference(backend, shape):
    x, f, gy = _case(sum(shape[:4]), *shape)
    y_t, gx_t, gf_t = torch_spectral(x, f, gy)
    y = spectral_filter2d(to_backend(x, backend), to_backend(f, backend))
    gx, gf = spectral_filter2d_backward(*(to_backend(a, backend) for a in (gy, x, f)))
    assert rel_err(y, y_t) < 1e-10
    assert rel_err(gx, gx_t) < 1e-10
    assert complex_err(gf, gf_t) < 1e-10
    assert to_numpy(gf).dtype == np.complex128 and to_numpy(gf).shape == f.shape
    ref_y = reference.spectral_filter2d(x, f)
    ref_gx, ref_gf = reference.spectral_filter2d_backward(gy, x, f)
    assert rel_err(y, ref_y) < 1e-10 and rel_err(gx, ref_gx) < 1e-10 and complex_err(gf, ref_gf) < 1e-10


@pytest.mark.parametrize("shared", [False, True])
def test_torch_tensors_in_torch_tensors_out(shared):
    x, f, gy = _case(7, 2, 3, 5, 6, shared)
    xt, ft, gyt = torch.tensor(x), torch.tensor(f), torch.tensor(gy)
    y = spectral_filter2d(xt, ft)
    gx, gf = spectral_filter2d_backward(gyt, xt, ft)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64
    assert isinstance(gf, torch.Tensor) and gf.dtype == torch.complex128 and gf.shape == ft.shape
    y_t, gx_t, gf_t = torch_spectral(x, f, gy)
    assert rel_err(y, y_t) < 1e-10 and rel_err(gx, gx_t) < 1e-10 and complex_err(gf, gf_t) < 1e-10
    # A lazily conjugated torch filter (conj bit set) is read as its values.
    assert rel_err(spectral_filter2d(xt, ft.conj()), reference.spectral_filter2d(x, np.conj(f))) < 1e-10


def test_reference_matches_finite_differences():
    """The reference's gradients (incl. both parts of the complex filter gradient, even
    and odd W) against central differences of its own forward."""
    for w in (4, 5):
        x, f, gy = _case(w, 2, 1, 3, w, True)
        gx, gf = reference.spectral_filter2d_backward(gy, x, f)
        loss = lambda x_, f_: float(np.sum(gy * reference.spectral_filter2d(x_, f_)))  # noqa: E731
        eps = 1e-6
        for index in [(0, 0, 1, 2), (1, 0, 2, w - 1), (0, 0, 0, 0)]:
            dx = np.zeros_like(x)
            dx[index] = eps
            assert abs((loss(x + dx, f) - loss(x - dx, f)) / (2 * eps) - gx[index]) < 1e-7
        for index in [(0, 0, 1, 1), (0, 0, 2, w // 2), (0, 0, 0, 0), (0, 0, 1, 0)]:
            for unit, part in ((1.0, np.real), (1j, np.imag)):
                df = np.zeros_like(f)
                df[index] = eps * unit
                numeric = (loss(x, f + df) - loss(x, f - df)) / (2 * eps)
                assert abs(numeric - part(gf[index])) < 1e-7, (w, index, unit)


def test_float32_within_twice_torch_float32_error(backend):
    """float32 / complex64 against the float64 reference: at most twice torch.fft's own
    float32 error (torch computes the same three transforms in float32), plus two units
    of float32 rounding."""
    for shape in [(3, 4, 12, 15, True), (2, 3, 16, 16, False)]:
        x, f, gy = _case(11, *shape)
        x, gy, f = x.astype(np.float32), gy.astype(np.float32), f.astype(np.complex64)
        ref = (reference.spectral_filter2d(x, f), *reference.spectral_filter2d_backward(gy, x, f))
        anchor = torch_spectral(x, f, gy, torch.float32)
        y = spectral_filter2d(to_backend(x, backend), to_backend(f, backend))
        gx, gf = spectral_filter2d_backward(*(to_backend(a, backend) for a in (gy, x, f)))
        assert to_numpy(y).dtype == np.float32 and to_numpy(gf).dtype == np.complex64
        u = unit_roundoff("float32")
        assert rel_err(y, ref[0]) <= 2 * rel_err(anchor[0], ref[0]) + 2 * u
        assert rel_err(gx, ref[1]) <= 2 * rel_err(anchor[1], ref[1]) + 2 * u
        assert complex_err(gf, ref[2]) <= 2 * complex_err(anchor[2], ref[2]) + 2 * u


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_computed_in_float32_returned_in_half(dtype):
    """A 16-bit input pairs with a complex64 filter; the result is the float32 computation
    rounded once to the input's dtype. Anchor: torch.fft in float32 on the same 16-bit
    values, rounded to the dtype (torch.fft has no CPU half path)."""
    x, f, gy = _case(3, 2, 3, 7, 10, True)
    x, gy, f = x.astype(DTYPES[dtype]), gy.astype(DTYPES[dtype]), f.astype(np.complex64)
    ref = (reference.spectral_filter2d(x, f), *reference.spectral_filter2d_backward(gy, x, f))
    anchor = torch_spectral(x, f, gy, torch.float32)
    anchor = (anchor[0].astype(DTYPES[dtype]), anchor[1].astype(DTYPES[dtype]), anchor[2])
    for wrap in (lambda a: a, torch.tensor if dtype == "float16" else None):
        if wrap is None:  # bfloat16 torch tensors from NumPy: via float32
            wrap = lambda a: torch.tensor(np.asarray(a, np.float32)).to(torch.bfloat16) if a.dtype != np.complex64 \
                else torch.tensor(a)  # noqa: E731
        y = spectral_filter2d(wrap(x), wrap(f))
        gx, gf = spectral_filter2d_backward(wrap(gy), wrap(x), wrap(f))
        assert to_numpy(y).dtype == DTYPES[dtype] and to_numpy(gx).dtype == DTYPES[dtype]
        assert to_numpy(gf).dtype == np.complex64
        u = unit_roundoff(dtype)
        assert rel_err(y, ref[0]) <= 2 * rel_err(anchor[0], ref[0]) + 2 * u
        assert rel_err(gx, ref[1]) <= 2 * rel_err(anchor[1], ref[1]) + 2 * u
        assert complex_err(gf, ref[2]) <= 2 * complex_err(anchor[2], ref[2]) + 2 * unit_roundoff("float32")


def test_batch_zero(backend):
    x, f, gy = _case(0, 0, 3, 4, 5, False)
    y = spectral_filter2d(to_backend(x, backend), to_backend(f, backend))
    gx, gf = spectral_filter2d_backward(*(to_backend(a, backend) for a in (gy, x, f)))
    assert to_numpy(y).shape == x.shape and to_numpy(gx).shape == x.shape and to_numpy(gf).shape == f.shape
    shared = _complex(np.random.default_rng(1), (1, 3, 4, 3))
    _, gf = spectral_filter2d_backward(*(to_backend(a, backend) for a in (gy, x, shared)))
    np.testing.assert_array_equal(to_numpy(gf), np.zeros_like(shared))  # a sum over no samples


def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 5, 7, 3)).transpose(0, 3, 1, 2)  # [2, 3, 5, 7], non-contiguous
    f = _complex(rng, (2, 3, 5, 8))[..., ::2]  # [2, 3, 5, 4], strided
    gy = rng.standard_normal((2, 3, 10, 7))[:, :, ::2]
    assert not (x.flags.c_contiguous or f.flags.c_contiguous or gy.flags.c_contiguous)
    y = spectral_filter2d(to_backend(x, backend), to_backend(f, backend))
    gx, gf = spectral_filter2d_backward(*(to_backend(a, backend) for a in (gy, x, f)))
    y_t, gx_t, gf_t = torch_spectral(x, f, gy)
    assert rel_err(y, y_t) < 1e-10 and rel_err(gx, gx_t) < 1e-10 and complex_err(gf, gf_t) < 1e-10


def test_wrt_and_bitwise_determinism(backend):
    x, f, gy = (to_backend(a, backend) for a in _case(9, 4, 3, 6, 7, True))
    gx, gf = spectral_filter2d_backward(gy, x, f)
    gx2, gf2 = spectral_filter2d_backward(gy, x, f)
    np.testing.assert_array_equal(to_numpy(gx), to_numpy(gx2))
    np.testing.assert_array_equal(to_numpy(gf), to_numpy(gf2))
    only_x = spectral_filter2d_backward(gy, x, f, wrt="input")
    only_f = spectral_filter2d_backward(gy, x, f, wrt=("filter",))
    assert only_x[1] is None and only_f[0] is None
    np.testing.assert_array_equal(to_numpy(only_x[0]), to_numpy(gx))
    np.testing.assert_array_equal(to_numpy(only_f[1]), to_numpy(gf))


def test_nan_propagates():
    x, f, _ = _case(2, 1, 2, 4, 4, False)
    x[0, 1, 2, 3] = np.nan
    y = spectral_filter2d(x, f)
    assert np.isnan(y[0, 1]).all() and np.isfinite(y[0, 0]).all()


def test_forward_filters_in_place(launches):
    """The forward allocates one spectrum (filtered in place), the inverse transform's
    result and the output: no second spectrum-sized buffer."""
    x, f, _ = _case(4, 2, 3, 6, 8, True)
    with _arrays.track_allocations() as log:
        spectral_filter2d(x, f)
    assert log == [((2, 3, 6, 5), "complex128"), ((2, 3, 6, 8), "float64"), ((2, 3, 6, 8), "float64")]
    assert launches == ["spectral_filter2d_fwd", "spectral_narrow"]


# --- bad inputs: ValueError/TypeError naming the argument, nothing launched ---

_rng = np.random.default_rng(0)
X = _rng.standard_normal((2, 3, 6, 7))
FILT = _complex(_rng, (2, 3, 6, 4))

BAD = [
    ("input 3-D", (X[0], FILT[0]), ValueError, r"input must be 4-D .*\(3, 6, 7\)"),
    ("filter width W not W//2+1", (X, _complex(_rng, (2, 3, 6, 7))), ValueError,
     r"filter must have shape \[2 or 1, 3, 6, 4\] .*input \(2, 3, 6, 7\), got \(2, 3, 6, 7\)"),
    ("filter height", (X, FILT[:, :, :5]), ValueError, r"filter must have shape .*got \(2, 3, 5, 4\)"),
    ("filter channels", (X, FILT[:, :2]), ValueError, r"filter must have shape .*got \(2, 2, 6, 4\)"),
    ("filter batch neither B nor 1", (np.concatenate([X, X]), FILT[:, None].repeat(2, 1).reshape(4, 3, 6, 4)[:3]),
     ValueError, r"filter must have shape \[4 or 1, .*got \(3, 3, 6, 4\)"),
    ("filter 3-D", (X, FILT[0]), ValueError, r"filter must have shape .*got \(3, 6, 4\)"),
    ("real filter", (X, FILT.real), TypeError, r"filter must be complex128 to pair with float64 .*filter float64"),
    ("complex input", (X + 0j, FILT), TypeError, r"input has dtype complex128; supported: float16, bfloat16, "
                                                 r"float32, float64$"),
    ("complex128 filter with float32 input", (X.astype(np.float32), FILT), TypeError,
     r"filter must be complex64 to pair with float32 .*input float32, .*filter complex128"),
    ("complex64 filter with float64 input", (X, FILT.astype(np.complex64)), TypeError,
     r"filter must be complex128 to pair with float64"),
    ("complex128 filter with float16 input", (X.astype(np.float16), FILT), TypeError,
     r"filter must be complex64 to pair with float16"),
    ("filter None", (X, None), TypeError, r"filter must be an array, got None"),
    ("filter a list", (X, [1j]), TypeError, r"filter must be an array"),
    ("zero width", (X[..., :0], FILT[..., :1]), ValueError, r"height and width must be positive"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_raise_before_launch(case, launches):
    _, args, error, pattern = case
    with pytest.raises(error, match=pattern):
        spectral_filter2d(*args)
    with pytest.raises(error, match=pattern):
        spectral_filter2d_backward(np.zeros(np.shape(args[0]), np.asarray(args[0]).real.dtype), *args)
    assert launches == []


def test_bad_backward_inputs_raise_before_launch(launches):
    with pytest.raises(ValueError, match=r"grad_output must have the forward output's shape \(2, 3, 6, 7\)"):
        spectral_filter2d_backward(X[:, :, :5], X, FILT)
    with pytest.raises(ValueError, match=r"wrt names unknown arguments \['weight'\]"):
        spectral_filter2d_backward(X, X, FILT, wrt="weight")
    with pytest.raises(TypeError, match=r"grad_output has dtype complex128"):
        spectral_filter2d_backward(X + 0j, X, FILT)
    assert launches == []


def test_other_ops_still_reject_complex(launches):
    with pytest.raises(TypeError, match=r"weight has dtype complex128; supported: float16, bfloat16, float32, "
                                        r"float64$"):
        conv2d(X, _complex(_rng, (4, 3, 3, 3)))
    with pytest.raises(TypeError, match=r"input has dtype complex64"):
        conv2d(torch.zeros(1, 3, 5, 5, dtype=torch.complex64), np.zeros((4, 3, 3, 3)))
    assert launches == []


# --- conv2d(algorithm='fft') ---

def random_conv_config(seed):
    """(x, w, bias, params): odd sizes, kernels up to 15x15, dilation, 'same' / 'valid' /
    int / pair padding, groups=1 or depthwise (multiplier 1..2), with or without bias."""
    rng = np.random.default_rng(seed)
    kind = ["dense", "depthwise", "depthwise"][seed % 3]
    cin = int(rng.integers(1, 4))
    multiplier = int(rng.integers(1, 3))
    cout = int(rng.integers(1, 4)) if kind == "dense" else cin * multiplier
    groups = 1 if kind == "dense" else cin
    kh, kw = (int(v) for v in rng.integers(1, 16, size=2))
    dilation = (1, 1) if rng.random() < 0.6 else tuple(int(v) for v in rng.integers(1, 3, size=2))
    padding = [int(rng.integers(0, 8)), (int(rng.integers(0, 5)), int(rng.integers(0, 8))), "same", "valid"][seed % 4]
    span = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    h = int(rng.integers(span[0], span[0] + 9))
    w = int(rng.integers(span[1], span[1] + 9))
    x = rng.standard_normal((int(rng.integers(1, 3)), cin, h, w))
    weight = rng.standard_normal((cout, cin // groups, kh, kw))
    bias = rng.standard_normal(cout) if rng.random() < 0.6 else None
    return x, weight, bias, dict(padding=padding, dilation=dilation, groups=groups)


@pytest.mark.parametrize("seed", range(12))
def test_conv2d_fft_matches_direct_float64(backend, seed):
    x, w, b, params = random_conv_config(seed)
    args = [to_backend(a, backend) for a in (x, w, b)]
    y = conv2d(*args, **params, algorithm="fft")
    y_direct = conv2d(*args, **params, algorithm="direct")
    assert rel_err(y, to_numpy(y_direct)) < 1e-9
    assert rel_err(y, conv_reference.conv2d(x, w, b, **params)) < 1e-9
    gy = np.random.default_rng(seed).standard_normal(to_numpy(y).shape)
    grads = conv2d_backward(to_backend(gy, backend), *args, **params, algorithm="fft")
    grads_direct = conv2d_backward(to_backend(gy, backend), *args, **params, algorithm="direct")
    for got, direct, ref in zip(grads, grads_direct, conv_reference.conv2d_backward(gy, x, w, b, **params)):
        assert (got is None) == (ref is None)
        if ref is not None:
            assert rel_err(got, to_numpy(direct)) < 1e-9 and rel_err(got, ref) < 1e-9


def test_conv2d_fft_torch_tensors_batch_zero_non_contiguous():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 9, 11, 3)).transpose(0, 3, 1, 2)  # [2, 3, 9, 11], non-contiguous
    w, b = rng.standard_normal((3, 1, 5, 4)), rng.standard_normal(3)
    y = conv2d(torch.tensor(x), torch.tensor(w), torch.tensor(b), padding="same", groups=3, algorithm="fft")
    assert isinstance(y, torch.Tensor)
    assert rel_err(y, conv_reference.conv2d(x, w, b, padding="same", groups=3)) < 1e-10
    y = conv2d(x, w, b, padding="same", groups=3, algorithm="fft")
    assert rel_err(y, conv_reference.conv2d(x, w, b, padding="same", groups=3)) < 1e-10
    empty = np.zeros((0, 3, 9, 11))
    assert conv2d(empty, w, b, padding=2, groups=3, algorithm="fft").shape == (0, 3, 9, 12)
    gx, gw, gb = conv2d_backward(np.zeros((0, 3, 9, 12)), empty, w, b, padding=2, groups=3, algorithm="fft")
    assert gx.shape == empty.shape
    np.testing.assert_array_equal(gw, np.zeros_like(w))
    np.testing.assert_array_equal(gb, np.zeros(3))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_conv2d_fft_reduced_precision_within_twice_torch_error(dtype):
    """design §2 (error at most 2x torch F.conv2d's in that dtype) for a 9x9 depthwise and a
    7x7 dense conv computed by FFT in float32."""
    rng = np.random.default_rng(1)
    for x, w, params in [(rng.standard_normal((2, 3, 17, 19)), rng.standard_normal((3, 1, 9, 9)),
                          dict(padding=4, groups=3)),
                         (rng.standard_normal((2, 4, 13, 12)), rng.standard_normal((5, 4, 7, 7)) / 7,
                          dict(padding="same"))]:
        b = rng.standard_normal(w.shape[0])
        assert_reduced_precision(functools.partial(conv2d, algorithm="fft"),
                                 functools.partial(conv2d_backward, algorithm="fft"), conv_reference.conv2d,
                                 conv_reference.conv2d_backward, lambda *t, **k: F.conv2d(*t, **params),
                                 [x, w, b], params, dtype)


UNSUPPORTED = [
    (dict(stride=2), (4, 4, 3, 3), "stride 1"),
    (dict(groups=2), (4, 2, 3, 3), "groups=1 or depthwise"),
]


@pytest.mark.parametrize("case", UNSUPPORTED, ids=["stride", "groups"])
def test_conv2d_fft_unsupported_raise_naming_algorithm(case, launches):
    params, w_shape, why = case
    x, w = np.ones((1, 4, 8, 8)), np.ones(w_shape)
    with pytest.raises(ValueError, match=rf"algorithm='fft' supports only {why}"):
        conv2d(x, w, **params, algorithm="fft")
    with pytest.raises(ValueError, match=rf"algorithm='fft' supports only {why}"):
        conv2d_backward(np.ones((1, w_shape[0], 3, 3)), x, w, **params, algorithm="fft")
    assert launches == []


AUTO = [  # (input, weight, params, algorithm 'auto' picks)
    ((1, 2, 40, 40), (2, 2, 15, 15), {}, "fft"),
    ((1, 2, 40, 40), (2, 1, 15, 15), dict(groups=2, padding="same"), "fft"),
    ((1, 2, 40, 40), (4, 1, 31, 9), dict(groups=2), "fft"),  # 279 taps, depth multiplier 2
    ((1, 2, 40, 40), (2, 2, 15, 14), {}, "direct"),  # 210 taps < 225
    ((1, 2, 40, 40), (2, 2, 3, 3), {}, "direct"),
    ((1, 2, 40, 40), (2, 2, 15, 15), dict(stride=2), "direct"),  # fft needs stride 1
    ((1, 4, 40, 40), (2, 2, 15, 15), dict(groups=2), "direct"),  # neither dense nor depthwise
]


@pytest.mark.parametrize("case", AUTO, ids=lambda c: f"{c[1]}-{c[2]}-{c[3]}")
def test_auto_rule(case, launches):
    """'auto' = fft for stride 1, groups 1 or depthwise, kh*kw >= 225 (unmeasured, conservative)."""
    x_shape, w_shape, params, expected = case
    assert FFT_AUTO_MIN_TAPS == 225
    geom = conv_geometry("test", x_shape, w_shape, None, params.get("stride", 1), params.get("padding", 0), 1,
                         params.get("groups", 1))
    assert fft_preferred(geom) == (expected == "fft")
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    y = conv2d(x, w, **params)
    assert ("conv2d_fwd" in launches) == (expected == "direct") and bool(launches)
    assert rel_err(y, conv_reference.conv2d(x, w, **params)) < 1e-10
