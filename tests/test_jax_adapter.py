"""cuconv.jax: every op as a jax.custom_vjp, eager and under jit, with jax.grad.

Oracles, float64 to 1e-10: cuconv's own forward and *_backward (the adapter adds no
arithmetic), JAX's own implementation of the same function where it is straightforward
(lax.conv_general_dilated for the convolutions, jnp.fft for spectral_filter2d, jnp
reshapes for pixel (un)shuffle, vmapped lax convs for the dynamic convs), and torch CPU
autograd of the same function built in torch (the torch oracles of the op test modules).

These run on JAX's CPU device (the interpret backend), on a GPU machine too. The
test_cuda_* tests place their arrays on JAX's GPU (skipped without one, or without a
CUDA build of jaxlib): every op eager and under jit, every dtype in both callback modes,
the complex filter, ordering with XLA's own work, a second GPU.
"""

import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

# Leave the GPU to CuPy and torch as well: JAX would otherwise take 75% of it at start.
jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import cuconv  # noqa: E402
import cuconv.jax as cj  # noqa: E402
from cuconv import _interpret  # noqa: E402
from cuconv._registry import OPS, output_shape  # noqa: E402
from conftest import DTYPES, gpu_available, rel_err, to_numpy, unit_roundoff  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cpu_by_default():
    """Arrays made without a device go to the CPU: the tests that name no device run on
    interpret where JAX also has a GPU (the test_cuda_* tests place theirs)."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield
TOL = 1e-10
# Callback mechanisms for traced calls; buffer_callback exists only in newer JAX.
MODES = [m for m in cj.CALLBACKS if m != "buffer" or cj._buffer_callback is not None]
lax = jax.lax


# --- the registered examples of every op, in float64 ---

def _case(case, seed):
    """[arrays by name in the op's order (None: absent), params] of example `case` ('OP-i')."""
    op, index = _op(case), int(case.rsplit("-", 1)[1])
    rng = np.random.default_rng(seed)
    example = OPS[op].examples[index]
    arrays = {}
    for name in OPS[op].arrays:
        shape = example.shapes[name]
        arrays[name] = None if shape is None else rng.standard_normal(shape)
        if shape is not None and name in OPS[op].complex_arrays:
            arrays[name] = arrays[name] + 1j * rng.standard_normal(shape)
    return [arrays, dict(example.params)]


CASES = [f"{op}-{i}" for op, opdef in sorted(OPS.items()) for i in range(len(opdef.examples))]


def _op(case):
    return case.rsplit("-", 1)[0]


def _setup(case, seed=0):
    """(op, arrays dict in the op's order, params, present names, grad_output)."""
    op = _op(case)
    arrays, params = _case(case, seed)
    assert tuple(arrays) == OPS[op].arrays, case
    present = tuple(n for n, a in arrays.items() if a is not None)
    y = getattr(cuconv, op)(**arrays, **params)
    gy = np.random.default_rng(seed + 100).standard_normal(y.shape)
    return op, arrays, params, present, gy


def _call(op, params):
    """f(*present arrays) -> cj.op(...), the arrays by position and keyword as a user would."""
    names = OPS[op].arrays

    def f(arrays):
        positional = [arrays.get(n) for n in names if n not in OPS[op].keyword_arrays]
        while positional and positional[-1] is None:
            positional.pop()
        keyword = {n: arrays[n] for n in OPS[op].keyword_arrays if arrays.get(n) is not None}
        return getattr(cj, op)(*positional, **params, **keyword)

    return f


def _grads(fn, arrays, present, jit, device=None):
    """jax.grad of fn(dict of present arrays) with respect to every present array, the
    arrays on `device` (None: the default device)."""
    g = jax.grad(lambda d: fn(d))
    if jit:
        g = jax.jit(g)
    out = g({n: jax.device_put(arrays[n], device) for n in present})
    if device is not None:
        assert all(v.devices() == {device} for v in out.values())
    return {n: np.asarray(v) for n, v in out.items()}


def _close(got, expected, what, tol=TOL):
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape and got.dtype == expected.dtype, (what, got.shape, expected.shape,
                                                                          got.dtype, expected.dtype)
    scale = max(np.abs(expected).max(initial=0.0), 1e-300)
    err = np.abs(got - expected).max(initial=0.0) / scale
    assert err <= tol, f"{what}: relative error {err:.3g}"


def test_every_op_is_wrapped_and_covered():
    assert set(map(_op, CASES)) == set(OPS)
    for op in OPS:
        fn = getattr(cj, op)
        assert fn.__name__ == op
        assert inspect.signature(fn).parameters == inspect.signature(getattr(cuconv, op)).parameters
    assert set(cj.__all__) >= set(OPS)


# --- forward: the same numbers as cuconv, eager and under jit ---

@pytest.mark.parametrize("case", CASES)
def test_forward_equals_cuconv(case):
    op, arrays, params, present, _ = _setup(case)
    expected = getattr(cuconv, op)(**arrays, **params)
    f = _call(op, params)
    jarrays = {n: jnp.asarray(arrays[n]) for n in present}
    eager = f(jarrays)
    assert isinstance(eager, jax.Array)
    np.testing.assert_array_equal(np.asarray(eager), expected)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(jarrays)), expected)


# --- gradients: cuconv's *_backward (complex: conjugated into JAX's convention) ---

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_grad_equals_cuconv_backward(case, mode, monkeypatch):
    monkeypatch.setenv("CUCONV_JAX_CALLBACK", mode)
    op, arrays, params, present, gy = _setup(case)
    expected = dict(zip(OPS[op].arrays, getattr(cuconv, f"{op}_backward")(gy, **arrays, **params)))
    f = _call(op, params)
    loss = lambda d: jnp.sum(f(d) * gy)  # noqa: E731  (cotangent of the output: gy)
    for jit in ([False, True] if mode == MODES[0] else [True]):  # eager calls use no callback
        got = _grads(loss, arrays, present, jit)
        assert set(got) == set(present)
        for n in present:
            want = np.conj(expected[n]) if n in OPS[op].complex_arrays else expected[n]
            _close(got[n], want, f"{op} d/d{n} jit={jit}")


# --- gradients: JAX's own implementation of the same function ---

def _conv(x, w, stride=1, padding=0, dilation=1, groups=1):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return lax.conv_general_dilated(x, w, pair(stride), [(p, p) for p in pair(padding)], rhs_dilation=pair(dilation),
                                    dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=groups,
                                    precision=lax.Precision.HIGHEST)


def _bias(y, b):
    return y if b is None else y + b[:, None, None]


def _shuffle(y, r):
    b, c, h, w = y.shape
    return y.reshape(b, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(b, c // (r * r), h * r, w * r)


def _unshuffle(y, r):
    b, c, h, w = y.shape
    return y.reshape(b, c, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4).reshape(b, c * r * r, h // r, w // r)


def _per_sample(x, kernels, stride=1, padding=0, dilation=1, groups=1):
    return jax.vmap(lambda xb, kb: _conv(xb[None], kb, stride, padding, dilation, groups)[0])(x, kernels)


def _jax_oracle(op, params):
    """The op as a jnp / lax function of a dict of present arrays (None: no JAX oracle)."""
    p = dict(params)
    if op == "conv2d":
        return lambda a: _bias(_conv(a["input"], a["weight"], **p), a.get("bias"))
    if op == "conv_transpose2d":  # the transpose (VJP) of the forward conv it inverts, by JAX autodiff
        conv = dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"])

        def transposed(a):
            out = output_shape(op, {"input": a["input"].shape, "weight": a["weight"].shape}, **p)
            _, vjp = jax.vjp(lambda z: _conv(z, a["weight"], **conv), jnp.zeros(out))
            return _bias(vjp(a["input"])[0], a.get("bias"))

        return transposed
    if op == "subpixel_conv2d":
        r = p.pop("upscale_factor")
        return lambda a: _shuffle(_bias(_conv(a["input"], a["weight"], **p), a.get("bias")), r)
    if op == "depthwise_separable_conv2d":
        return lambda a: _bias(_conv(_bias(_conv(a["input"], a["depthwise_weight"], groups=a["input"].shape[1], **p),
                                           a.get("depthwise_bias")), a["pointwise_weight"]), a.get("pointwise_bias"))
    if op == "spatial_separable_conv2d":
        (sh, sw), (ph, pw), (dh, dw), g = p["stride"], p["padding"], p["dilation"], p["groups"]
        return lambda a: _bias(_conv(_conv(a["input"], a["weight_v"], (sh, 1), (ph, 0), (dh, 1), g), a["weight_h"],
                                     (1, sw), (0, pw), (1, dw), g), a.get("bias"))
    if op == "pixel_shuffle":
        return lambda a: _shuffle(a["input"], p["upscale_factor"])
    if op == "pixel_unshuffle":
        return lambda a: _unshuffle(a["input"], p["downscale_factor"])
    if op == "dynamic_conv2d":
        return lambda a: (_per_sample(a["input"], jnp.einsum("bk,koiyx->boiyx", a["attention"], a["weight"]), **p)
                          + (a["attention"] @ a["bias"])[:, :, None, None])
    if op == "odconv2d":
        def odconv(a):
            kernels = jnp.einsum("bk,koiyx->boiyx", a["kernel_attention"], a["weight"])
            if a.get("spatial_attention") is not None:
                kernels = kernels * a["spatial_attention"][:, None, None]
            x = a["input"]
            if a.get("channel_attention") is not None:
                x = x * a["channel_attention"][:, :, None, None]
            y = _per_sample(x, kernels, **p)
            return y if a.get("filter_attention") is None else y * a["filter_attention"][:, :, None, None]

        return odconv
    if op == "spectral_filter2d":
        return lambda a: jnp.fft.irfft2(jnp.fft.rfft2(a["input"], norm="ortho") * a["filter"],
                                        s=a["input"].shape[2:], norm="ortho")
    return None


JAX_ORACLE_CASES = [c for c in CASES if _jax_oracle(_op(c), _case(c, 0)[1]) is not None]


def test_jax_oracles_cover_the_convolutions_and_spectral():
    """Every op with a lax / jnp formulation here has its oracle (a new op's own test file
    brings its oracles; the adapter tests above cover it through its registered examples)."""
    assert {_op(c) for c in JAX_ORACLE_CASES} >= {
        "conv2d", "conv_transpose2d", "subpixel_conv2d", "depthwise_separable_conv2d", "spatial_separable_conv2d",
        "pixel_shuffle", "pixel_unshuffle", "dynamic_conv2d", "odconv2d", "spectral_filter2d"}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", JAX_ORACLE_CASES)
def test_grad_matches_jax_implementation(case, jit):
    op, arrays, params, present, gy = _setup(case)
    oracle = _jax_oracle(op, params)
    jarrays = {n: jnp.asarray(arrays[n]) for n in present}
    _close(np.asarray(_call(op, params)(jarrays)), np.asarray(oracle(jarrays)), f"{op} forward vs jax")
    # A non-linear loss: the cotangent reaching the op is cos(y) * gy, not a constant.
    got = _grads(lambda d: jnp.sum(jnp.sin(_call(op, params)(d)) * gy), arrays, present, jit)
    want = _grads(lambda d: jnp.sum(jnp.sin(oracle(d)) * gy), arrays, present, False)
    for n in present:
        _close(got[n], want[n], f"{op} d/d{n} vs jax, jit={jit}")


# --- gradients: torch autograd of the same function (the torch adapter's contract) ---

def _torch_fn(op, params):
    """A torch function of the present arrays (in the op's order, None for absent ones)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    p = dict(params)
    if op == "conv2d":
        return lambda x, w, b: F.conv2d(x, w, b, **p)
    if op == "conv_transpose2d":
        return lambda x, w, b: F.conv_transpose2d(x, w, b, **p)
    if op == "subpixel_conv2d":
        r = p.pop("upscale_factor")
        return lambda x, w, b: F.pixel_shuffle(F.conv2d(x, w, b, **p), r)
    if op == "depthwise_separable_conv2d":
        return lambda x, dw, pw, dwb, pwb: F.conv2d(F.conv2d(x, dw, dwb, groups=x.shape[1], **p), pw, pwb)
    if op == "spatial_separable_conv2d":
        from test_separable import _torch_stage_params

        v, h = _torch_stage_params(p)
        return lambda x, wv, wh, b: F.conv2d(F.conv2d(x, wv, None, **v), wh, b, **h)
    if op == "pixel_shuffle":
        return lambda x: F.pixel_shuffle(x, p["upscale_factor"])
    if op == "pixel_unshuffle":
        return lambda x: F.pixel_unshuffle(x, p["downscale_factor"])
    if op == "deform_conv2d":
        from test_deform_conv import torch_deform_conv2d

        return lambda x, o, w, b, m: torch_deform_conv2d(x, o, w, b, mask=m, **p)
    if op == "involution2d":
        from test_involution import torch_involution

        return lambda x, k: torch_involution(x, k, **p)
    if op == "dynamic_conv2d":
        from test_dynamic_conv import torch_dynamic

        return lambda x, w, a, b: torch_dynamic(x, w, a, b, **p)
    if op == "odconv2d":
        from test_dynamic_conv import torch_odconv

        return lambda *a: torch_odconv(*a, **p)
    if op == "warehouse_conv2d":
        from test_dynamic_conv import torch_warehouse

        return lambda x, c, a: torch_warehouse(x, c, a, **p)
    return None  # spectral_filter2d has its own test below; a new op's own tests bring its oracles


TORCH_ORACLE_OPS = ("conv2d", "conv_transpose2d", "subpixel_conv2d", "depthwise_separable_conv2d",
                    "spatial_separable_conv2d", "pixel_shuffle", "pixel_unshuffle", "deform_conv2d", "involution2d",
                    "dynamic_conv2d", "odconv2d", "warehouse_conv2d")


def test_torch_oracles_cover_every_real_op():
    pytest.importorskip("torch")
    assert all(_torch_fn(op, _case(f"{op}-0", 0)[1]) is not None for op in TORCH_ORACLE_OPS)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", [c for c in CASES if _op(c) in TORCH_ORACLE_OPS])
def test_grad_matches_torch_autograd(case, jit):
    from conftest import torch_autograd

    op, arrays, params, present, gy = _setup(case)
    fn = _torch_fn(op, params)
    y_torch, torch_grads = torch_autograd(fn, list(arrays.values()), gy)
    _close(np.asarray(_call(op, params)({n: jnp.asarray(arrays[n]) for n in present})), y_torch,
           f"{op} forward vs torch")
    got = _grads(lambda d: jnp.sum(_call(op, params)(d) * gy), arrays, present, jit)
    for n, g in zip(OPS[op].arrays, torch_grads):
        assert (g is None) == (n not in present), n
        if g is not None:
            _close(got[n], g, f"{op} d/d{n} vs torch, jit={jit}")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("case", ["spectral_filter2d-0", "spectral_filter2d-1"])  # shared and per-sample filter
def test_complex_gradient_is_the_conjugate_of_torch(case, jit):
    """torch stores dL/dRe + i dL/dIm in .grad of a complex leaf; JAX's cotangent is its
    conjugate. cuconv.jax follows JAX: conj(torch's grad)."""
    torch = pytest.importorskip("torch")
    op, arrays, params, present, gy = _setup(case)
    x, f = (torch.tensor(arrays[n], requires_grad=True) for n in ("input", "filter"))
    y = torch.fft.irfft2(torch.fft.rfft2(x, norm="ortho") * f, s=tuple(x.shape[2:]), norm="ortho")
    y.backward(torch.tensor(gy))
    got = _grads(lambda d: jnp.sum(_call(op, params)(d) * gy), arrays, present, jit)
    _close(got["input"], x.grad.numpy(), "d/dinput vs torch")
    _close(got["filter"], np.conj(f.grad.numpy()), "d/dfilter vs conj(torch)")
    assert np.abs(f.grad.numpy().imag).max() > 1e-3  # the conjugation is visible


# --- None handling, transformations, errors, dtypes ---

def test_absent_optional_arrays_and_partial_argnums():
    op, arrays, params, present, gy = _setup("odconv2d-1")  # spatial and filter attention absent
    assert present == ("input", "weight", "kernel_attention", "channel_attention")
    x, w, ka, ca = (jnp.asarray(arrays[n]) for n in present)
    # grad with respect to one argument only; the others are constants closed over
    gw = jax.jit(jax.grad(lambda w: jnp.sum(cj.odconv2d(x, w, ka, None, ca, None, **params) * gy)))(w)
    expected = cuconv.odconv2d_backward(gy, **arrays, **params)[1]
    _close(gw, expected, "odconv2d d/dweight")
    # conv2d without bias, bias=None spelled out
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 5, 5)))
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2, 3, 3)))
    gx = jax.grad(lambda x: jnp.sum(cj.conv2d(x, w, None, padding=1) ** 2))(x)
    y = np.asarray(cj.conv2d(x, w, padding=1))
    _close(gx, cuconv.conv2d_backward(2 * y, np.asarray(x), np.asarray(w), padding=1, wrt="input")[0], "conv2d dx")


def test_eager_calls_run_cuconv_directly(monkeypatch):
    """Concrete arrays (eager calls, eager jax.grad) go to cuconv through DLPack, no callback."""
    def no_callback(*args, **kwargs):
        raise AssertionError("a callback for concrete arrays")

    monkeypatch.setattr(cj, "_callback", no_callback)
    op, arrays, params, present, gy = _setup("deform_conv2d-0")
    got = _grads(lambda d: jnp.sum(_call(op, params)(d) * gy), arrays, present, jit=False)
    expected = cuconv.deform_conv2d_backward(gy, **arrays, **params)
    for n, e in zip(OPS[op].arrays, expected):
        _close(got[n], e, f"eager d/d{n}")
    with pytest.raises(AssertionError, match="a callback"):
        jax.jit(_call(op, params))({n: jnp.asarray(arrays[n]) for n in present})


def test_vmap_and_value_and_grad_under_jit():
    rng = np.random.default_rng(3)
    x, w = jnp.asarray(rng.standard_normal((3, 2, 6, 6))), jnp.asarray(rng.standard_normal((4, 2, 3, 3)))
    batched = jax.jit(jax.vmap(lambda xb: cj.conv2d(xb[None], w, padding=1)[0]))(x)
    np.testing.assert_array_equal(np.asarray(batched), cuconv.conv2d(np.asarray(x), np.asarray(w), padding=1))
    value, (gx, gw) = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(cj.conv2d(x, w) ** 2), argnums=(0, 1)))(x, w)
    y = cuconv.conv2d(np.asarray(x), np.asarray(w))
    assert abs(float(value) - float(np.sum(y ** 2))) <= 1e-10 * float(np.sum(y ** 2))
    ex, ew, _ = cuconv.conv2d_backward(2 * y, np.asarray(x), np.asarray(w))
    _close(gx, ex, "dx")
    _close(gw, ew, "dw")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("mode", MODES)
def test_reduced_precision_under_jit_equals_cuconv(dtype, mode, monkeypatch):
    monkeypatch.setenv("CUCONV_JAX_CALLBACK", mode)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 3, 6, 6)), dtype=dtype)
    w = jnp.asarray(rng.standard_normal((4, 3, 3, 3)), dtype=dtype)
    y = jax.jit(lambda x, w: cj.conv2d(x, w, padding=1))(x, w)
    assert y.dtype == jnp.dtype(dtype)
    expected = cuconv.conv2d(np.asarray(x), np.asarray(w), padding=1)
    np.testing.assert_array_equal(np.asarray(y).astype(np.float64), expected.astype(np.float64))
    gw = jax.jit(jax.grad(lambda w: jnp.sum(cj.conv2d(x, w, padding=1).astype(jnp.float32))))(w)
    assert gw.dtype == jnp.dtype(dtype)
    ones = np.ones(expected.shape, expected.dtype)
    want = cuconv.conv2d_backward(ones, np.asarray(x), np.asarray(w), padding=1, wrt="weight")[1]
    np.testing.assert_array_equal(np.asarray(gw).astype(np.float64), want.astype(np.float64))


def test_bad_shapes_and_dtypes_raise_when_tracing():
    x, w = jnp.zeros((1, 3, 5, 5)), jnp.zeros((4, 2, 3, 3))
    with pytest.raises(ValueError, match="weight") as eager:
        cj.conv2d(x, w)
    with pytest.raises(ValueError, match="weight") as traced:
        jax.jit(lambda x, w: cj.conv2d(x, w))(x, w)
    assert str(eager.value) == str(traced.value)
    with pytest.raises(TypeError, match="weight has dtype float32"):
        jax.jit(lambda x, w: cj.conv2d(x, w))(x, jnp.zeros((4, 3, 3, 3), jnp.float32))
    with pytest.raises(TypeError, match="input has dtype int32"):
        cj.pixel_shuffle(jnp.zeros((1, 4, 2, 2), jnp.int32), 2)
    with pytest.raises(TypeError, match="filter has dtype complex64, expected complex128"):
        cj.spectral_filter2d(jnp.zeros((1, 1, 4, 4)), jnp.zeros((1, 1, 4, 3), jnp.complex64))
    with pytest.raises(TypeError, match="missing a required argument: 'weight'"):
        cj.conv2d(x)


def test_callback_mode_selection(monkeypatch):
    monkeypatch.delenv("CUCONV_JAX_CALLBACK", raising=False)
    assert cj.callback_mode() in cj.CALLBACKS
    monkeypatch.setenv("CUCONV_JAX_CALLBACK", "pure")
    assert cj.callback_mode() == "pure"
    monkeypatch.setenv("CUCONV_JAX_CALLBACK", "ffi")
    with pytest.raises(ValueError, match="CUCONV_JAX_CALLBACK"):
        cj.callback_mode()


def test_each_mode_lowers_to_its_callback(monkeypatch):
    x, w = jnp.zeros((1, 1, 4, 4)), jnp.zeros((1, 1, 3, 3))
    for mode in MODES:
        name = f"{mode}_callback"
        monkeypatch.setenv("CUCONV_JAX_CALLBACK", mode)
        forward = str(jax.make_jaxpr(lambda x: cj.conv2d(x, w))(x))
        assert "custom_vjp_call" in forward and name in forward, forward
        backward = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(cj.conv2d(x, w))))(x))
        # the forward's and the backward's; pure stages one per platform branch (CPU, CUDA)
        assert backward.count(name) == (2 if mode == "buffer" else 4), backward


# --- the GPU paths, driven on the CPU with a stand-in for CuPy ---

XLA_STREAM = 0x5EED


class _StubCupy(types.ModuleType):
    """Just the CuPy that cuconv.jax's GPU paths may use, recording the device and the
    stream each view and write happens under. "Device" arrays are NumPy arrays of the
    class _OnDevice, so cuconv's interpret backend still computes real numbers."""

    def __init__(self):
        super().__init__("cupy")
        self.device = self.stream = None  # what is entered now
        self.views, self.writes, self.sent, self.fetched = [], [], [], []
        stub = self

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                stub.device = self.index

            def __exit__(self, *exc):
                stub.device = None

        class Stream:
            @classmethod
            def from_external(cls, handle):
                stream = cls()
                version, stream.ptr = handle.__cuda_stream__()
                assert version == 0 and isinstance(stream.ptr, int)
                return stream

            def __enter__(self):
                stub.stream = self.ptr

            def __exit__(self, *exc):
                stub.stream = None

        def deprecated(*args, **kwargs):
            raise AssertionError("cupy.cuda.ExternalStream is deprecated (a DeprecationWarning per call)")

        self.cuda = types.SimpleNamespace(Device=Device, Stream=Stream, ExternalStream=deprecated)

    def context(self):
        return self.device, self.stream

    def from_dlpack(self, buffer):
        self.views.append((buffer, self.context()))
        return buffer.data.view(_OnDevice)._recording(self)

    def asarray(self, a):
        self.sent.append(a)
        return np.array(a).view(_OnDevice)

    def asnumpy(self, a):
        self.fetched.append(a)
        return np.asarray(a)


class _OnDevice(np.ndarray):
    def _recording(self, stub):
        self.stub = stub
        return self

    def __array_finalize__(self, obj):
        self.stub = getattr(obj, "stub", None)

    def __setitem__(self, key, value):
        if self.stub is not None:
            self.stub.writes.append(self.stub.context())
        super().__setitem__(key, value)


class _GpuBuffer:
    """An XLA buffer on CUDA device 1, as buffer_callback hands it over: DLPack only."""

    def __init__(self, data):
        self.data = data

    def __dlpack_device__(self):
        return (2, 1)  # kDLCUDA, device 1


def test_buffer_callback_on_a_gpu_views_xlas_buffers_on_xlas_stream(monkeypatch):
    """The GPU branch: each buffer viewed with cupy.from_dlpack (bfloat16 stays typed),
    the op run and the result written under the buffers' device and XLA's stream
    (Stream.from_external, not the deprecated ExternalStream)."""
    stub = _StubCupy()
    monkeypatch.setitem(sys.modules, "cupy", stub)
    rng = np.random.default_rng(9)
    x, w = (_GpuBuffer(rng.standard_normal(6).astype(ml_dtypes.bfloat16)) for _ in range(2))
    out = _GpuBuffer(np.full(6, np.nan, ml_dtypes.bfloat16))
    seen = []

    def compute(a, b):
        seen.append((stub.context(), a.dtype, np.shares_memory(a, x.data), np.shares_memory(b, w.data)))
        return (a * b,)

    cj._on_buffers(compute, types.SimpleNamespace(stream=XLA_STREAM), [out], [x, w])
    assert seen == [((1, XLA_STREAM), np.dtype(ml_dtypes.bfloat16), True, True)]
    assert [b for b, _ in stub.views] == [x, w, out] and {c for _, c in stub.views} == {(1, XLA_STREAM)}
    assert stub.writes == [(1, XLA_STREAM)]
    np.testing.assert_array_equal(out.data, x.data * w.data)


@pytest.mark.skipif(cj._buffer_callback is None, reason="this JAX has no buffer_callback")
def test_bfloat16_takes_the_buffer_callback_on_a_gpu(monkeypatch):
    """Every dtype, bfloat16 included, takes the buffer callback on any platform."""
    monkeypatch.setenv("CUCONV_JAX_CALLBACK", "buffer")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    x, w = jnp.zeros((1, 1, 4, 4), jnp.bfloat16), jnp.zeros((1, 1, 3, 3), jnp.bfloat16)
    forward = str(jax.make_jaxpr(lambda x: cj.conv2d(x, w))(x))
    assert "buffer_callback" in forward and "pure_callback" not in forward, forward


def _lowered_for_cuda(*args, default=None, **per_platform):
    """jax.lax.platform_dependent as it resolves when the computation is lowered for CUDA."""
    return per_platform["cuda"](*args)


@pytest.mark.parametrize("platform,forced,on_gpu", [("cuda", "", True), ("cuda", "interpret", False),
                                                    ("cpu", "", False)], ids=["gpu", "gpu-forced-host", "cpu"])
def test_pure_callback_on_a_gpu_runs_the_kernels_there(platform, forced, on_gpu, monkeypatch):
    """Under `pure`, a computation lowered for CUDA sends the callback's host arrays to
    CuPy (so cuconv runs its cuda kernels on them) and fetches the results back; on the
    CPU, or with CUCONV_BACKEND=interpret, they stay on the host. Forward and backward,
    under jit, with the numbers of cuconv on the host arrays."""
    stub = _StubCupy()
    monkeypatch.setitem(sys.modules, "cupy", stub)
    monkeypatch.setenv("CUCONV_JAX_CALLBACK", "pure")
    monkeypatch.setenv("CUCONV_BACKEND", forced)
    if platform == "cuda":
        monkeypatch.setattr(jax.lax, "platform_dependent", _lowered_for_cuda)
    seen = []
    for name in ("_run_forward", "_run_backward"):
        original = getattr(cj, name)
        monkeypatch.setattr(cj, name, lambda *a, original=original: (seen.append(type(a[-1][0])), original(*a))[1])
    rng = np.random.default_rng(10)
    x, w = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 3))
    value, (gx, gw) = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(cj.conv2d(x, w, padding=1) ** 2),
                                                 argnums=(0, 1)))(x, w)
    y = cuconv.conv2d(x, w, padding=1)
    expected_gx, expected_gw = cuconv.conv2d_backward(2 * y, x, w, padding=1)[:2]
    _close(value, np.sum(y ** 2), "loss")
    _close(gx, expected_gx, "d/dinput")
    _close(gw, expected_gw, "d/dweight")
    assert seen == [_OnDevice if on_gpu else np.ndarray] * 2  # the forward's and the backward's arrays
    assert len(stub.sent) == (2 + 3 if on_gpu else 0)  # (input, weight), then (grad_output, input, weight)
    assert len(stub.fetched) == (1 + 2 if on_gpu else 0)  # the output, then the two gradients


# --- a small model trains under jit ---

def _block(params, x):
    """A ResNet-style block: deform_conv2d (offsets and mask predicted from x),
    involution2d (kernels generated from the features), odconv2d (attentions from the
    pooled features), plus the identity."""
    b, c, h, w = x.shape
    offset = 0.5 * jnp.tanh(cj.conv2d(x, params["w_offset"], padding=1))
    mask = jax.nn.sigmoid(cj.conv2d(x, params["w_mask"], padding=1))
    h1 = jax.nn.relu(cj.deform_conv2d(x, offset, params["w_deform"], params["b_deform"], padding=1, mask=mask))
    kernel = cj.conv2d(h1, params["w_kernel"]).reshape(b, 2, 3, 3, h, w)
    h2 = jax.nn.relu(cj.involution2d(h1, kernel, padding=1))
    pooled = h2.mean(axis=(2, 3))
    ka = jax.nn.softmax(pooled @ params["a_kernel"], axis=-1)
    sa = jax.nn.sigmoid(pooled @ params["a_spatial"]).reshape(b, 3, 3)
    ca = jax.nn.sigmoid(pooled @ params["a_channel"])
    fa = jax.nn.sigmoid(pooled @ params["a_filter"])
    return x + cj.odconv2d(h2, params["w_od"], ka, sa, ca, fa, padding=1)


def test_small_model_trains_under_jit():
    rng = np.random.default_rng(7)
    c = 4
    n = lambda *shape: jnp.asarray(0.5 * rng.standard_normal(shape))  # noqa: E731
    params = {"w_offset": n(18, c, 3, 3) * 0.1, "w_mask": n(9, c, 3, 3), "w_deform": n(c, c, 3, 3),
              "b_deform": n(c), "w_kernel": n(18, c, 1, 1), "a_kernel": n(c, 3), "a_spatial": n(c, 9),
              "a_channel": n(c, c), "a_filter": n(c, c), "w_od": n(3, c, c, 3, 3)}
    x = jnp.asarray(rng.standard_normal((2, c, 6, 6)))
    target = x + 0.5 * jnp.asarray(rng.standard_normal((2, c, 6, 6)))

    def loss(params):
        return jnp.mean((_block(params, x) - target) ** 2)

    @jax.jit
    def step(params):
        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree_util.tree_map(lambda p, g: p - 1.0 * g, params, grads)

    losses = []
    for _ in range(6):
        value, params = step(params)
        losses.append(float(value))
    assert all(np.isfinite(losses))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.8 * losses[0], losses
    # the jitted gradient is the eager one
    eager = jax.grad(loss)(params)
    jitted = jax.jit(jax.grad(loss))(params)
    for k in params:
        _close(jitted[k], eager[k], f"model d/d{k}", tol=1e-12)


# --- cuconv without jax ---

def test_cuconv_imports_without_jax():
    code = ("import sys; sys.modules['jax'] = None\n"
            "import numpy as np, cuconv\n"
            "assert cuconv.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3))).shape == (1, 1, 1, 1)\n"
            "try:\n    import cuconv.jax\nexcept ImportError:\n    print('no-jax-ok')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "no-jax-ok"


# --- CUDA: JAX arrays on a GPU (the cuda backend), eager and under jit ---

needs_gpu = pytest.mark.skipif(not gpu_available(), reason="no CUDA GPU")


def _jax_gpus():
    try:
        return jax.devices("gpu")
    except RuntimeError:  # jaxlib without CUDA
        return []


@pytest.fixture
def jax_gpu():
    """JAX's first GPU (skips without a CUDA build of jaxlib)."""
    gpus = _jax_gpus()
    if not gpus:
        pytest.skip("JAX has no GPU backend (jaxlib without CUDA)")
    return gpus[0]


def _on_cupy(arrays):
    import cupy

    return {n: None if a is None else cupy.asarray(a) for n, a in arrays.items()}


def _setup_on_gpu(case, seed=0):
    """_setup's (op, arrays, params, present names, grad_output) plus the op's output,
    all computed by the cuda backend (on CuPy arrays)."""
    op = _op(case)
    arrays, params = _case(case, seed)
    present = tuple(n for n, a in arrays.items() if a is not None)
    y = to_numpy(getattr(cuconv, op)(**_on_cupy(arrays), **params))
    gy = np.random.default_rng(seed + 100).standard_normal(y.shape)
    return op, arrays, params, present, gy, y


@needs_gpu
@pytest.mark.parametrize("case", CASES)
def test_cuda_every_op_eager_and_jit(case, jax_gpu, monkeypatch):
    """Every op on GPU arrays, eager and under jit (buffer callback): results on the input's
    GPU, the forward and every gradient equal to cuconv's on CuPy arrays (the same kernels)."""
    monkeypatch.setenv("CUCONV_JAX_CALLBACK", MODES[0])
    op, arrays, params, present, gy, expected_y = _setup_on_gpu(case)
    expected = dict(zip(OPS[op].arrays, getattr(cuconv, f"{op}_backward")(_on_cupy({"g": gy})["g"],
                                                                          **_on_cupy(arrays), **params)))
    f = _call(op, params)
    jarrays = {n: jax.device_put(arrays[n], jax_gpu) for n in present}
    for run in (f, jax.jit(f)):
        y = run(jarrays)
        assert y.devices() == {jax_gpu}
        _close(np.asarray(y), expected_y, f"{op} forward on the GPU")
    loss = lambda d: jnp.sum(f(d) * gy)  # noqa: E731
    for jit in (False, True):
        got = _grads(loss, arrays, present, jit, device=jax_gpu)
        for n in present:
            want = to_numpy(expected[n])
            _close(got[n], np.conj(want) if n in OPS[op].complex_arrays else want, f"{op} d/d{n} jit={jit}")


# cuda against interpret on the same rounded inputs: the same kernels, compiled by NVRTC
# rather than g++ (contractions into FMA differ), rounded once into the output dtype.
CUDA_TOL = {"float16": 4 * unit_roundoff("float16"), "bfloat16": 4 * unit_roundoff("bfloat16"),
            "float32": 1e-5, "float64": 1e-12}


@needs_gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", MODES)
def test_cuda_every_dtype_under_jit_runs_the_cuda_kernels(dtype, mode, jax_gpu, monkeypatch):
    """conv2d and its gradients under jit on GPU arrays, in both callback modes and every
    dtype (bfloat16 through the buffer callback too): results of the input's dtype on its
    GPU, computed by the cuda kernels (the emulator is never called) and equal to eager
    mode's; within a few roundings of interpret's numbers."""
    monkeypatch.setenv("CUCONV_JAX_CALLBACK", mode)
    rng = np.random.default_rng(11)
    x, w, gy = (rng.standard_normal(shape).astype(DTYPES[dtype])
                for shape in ((2, 3, 6, 5), (4, 3, 3, 3), (2, 4, 6, 5)))
    expected = [cuconv.conv2d(x, w, padding=1), *cuconv.conv2d_backward(gy, x, w, padding=1)[:2]]

    def no_emulator(*args, **kwargs):
        raise AssertionError("a kernel ran on the CPU emulator")

    monkeypatch.setattr(_interpret, "launch", no_emulator)
    args = [jax.device_put(a, jax_gpu) for a in (x, w, gy)]

    def forward_and_grads(x, w, gy):
        y, vjp = jax.vjp(lambda x, w: cj.conv2d(x, w, padding=1), x, w)
        return (y, *vjp(gy))

    eager = forward_and_grads(*args)
    jitted = jax.jit(forward_and_grads)(*args)
    for index, (e, j, want) in enumerate(zip(eager, jitted, expected)):
        assert j.dtype == jnp.dtype(dtype) and j.devices() == {jax_gpu}, index
        np.testing.assert_array_equal(np.asarray(j), np.asarray(e), err_msg=f"result {index}: jit vs eager")
        assert rel_err(np.asarray(j), want) <= CUDA_TOL[dtype], (index, rel_err(np.asarray(j), want))


@needs_gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_complex_filter_under_jit(mode, jax_gpu, monkeypatch):
    """spectral_filter2d's complex filter on the GPU in both modes (complex buffers, and
    complex host arrays sent to the GPU under `pure`): the cuda results, conjugated."""
    monkeypatch.setenv("CUCONV_JAX_CALLBACK", mode)
    op, arrays, params, present, gy, _ = _setup_on_gpu("spectral_filter2d-0")
    expected = getattr(cuconv, f"{op}_backward")(_on_cupy({"g": gy})["g"], **_on_cupy(arrays), **params)
    got = _grads(lambda d: jnp.sum(_call(op, params)(d) * gy), arrays, present, jit=True, device=jax_gpu)
    _close(got["input"], to_numpy(expected[0]), "d/dinput")
    _close(got["filter"], np.conj(to_numpy(expected[1])), "d/dfilter")


@needs_gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_callback_is_ordered_with_xlas_work(mode, jax_gpu, monkeypatch):
    """Inside one jit: the op's input comes out of a long chain of XLA matmuls and XLA
    consumes its output at once. The callback's kernels and copies are ordered with
    XLA's (XLA's stream): reading the input early, or XLA reading the output before it is
    written, would give other numbers."""
    monkeypatch.setenv("CUCONV_JAX_CALLBACK", mode)
    rng = np.random.default_rng(12)
    a = jax.device_put((rng.standard_normal((4096, 4096)) / 64).astype(np.float32), jax_gpu)
    w = jax.device_put(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), jax_gpu)

    @jax.jit
    def producer(a):
        for _ in range(6):  # ~0.8 TFLOP of XLA work ahead of the callback
            a = jnp.tanh(a @ a)
        return a[0, :180].reshape(2, 3, 6, 5)

    @jax.jit
    def both(a, w):
        return cj.conv2d(producer(a), w, padding=1) * 2 + 1

    got = both(a, w)  # first: the memory of its intermediate x held nothing like x before
    assert got.devices() == {jax_gpu}
    expected = np.asarray(cj.conv2d(producer(a), w, padding=1)) * 2 + 1
    _close(np.asarray(got), expected, "conv2d of XLA's result, consumed by XLA", tol=1e-5)


@needs_gpu
@pytest.mark.parametrize("mode", MODES)
def test_cuda_second_gpu(mode, jax_gpu, monkeypatch):
    """Arrays on JAX's second GPU: eager and jitted results and gradients stay there and
    equal the first GPU's (the callback runs under the buffers' device)."""
    if len(_jax_gpus()) < 2:  # asked here, not at collection: JAX would start on every GPU then
        pytest.skip(f"needs 2 JAX GPUs (found {len(_jax_gpus())})")
    monkeypatch.setenv("CUCONV_JAX_CALLBACK", mode)
    rng = np.random.default_rng(13)
    x, w = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((4, 3, 3, 3))
    loss = lambda d: jnp.sum(jnp.sin(cj.conv2d(d["x"], d["w"], padding=1)))  # noqa: E731
    results = []
    for device in _jax_gpus()[:2]:
        d = {"x": jax.device_put(x, device), "w": jax.device_put(w, device)}
        y = cj.conv2d(d["x"], d["w"], padding=1)
        value, grads = jax.jit(jax.value_and_grad(loss))(d)
        assert all(t.devices() == {device} for t in (y, value, *grads.values()))
        results.append([np.asarray(t) for t in (y, value, grads["x"], grads["w"])])
    for index, (a, b) in enumerate(zip(*results)):
        _close(b, a, f"result {index} on the second GPU", tol=1e-12)
