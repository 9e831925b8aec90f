"""spectral suite: the self-check of spectral_filter2d (forward, input gradient and both
parts of the complex filter gradient) and of conv2d(algorithm='fft') against
cuconv.reference, and timings: spectral_filter2d against the same three torch.fft calls
at AFFNet-like shapes, conv2d 'fft' against cuDNN (F.conv2d) for large kernels.

The self-check harness draws real arrays, so the complex filter travels as its real and
imaginary parts (two arrays of the input's dtype) and the filter gradient is checked as
two results, "bwd filter.re" and "bwd filter.im". A 16-bit input is computed in float32
with a complex64 filter; its anchor is torch.fft doing the same in float32 on the same
16-bit values (torch.fft has no CPU half path)."""

from __future__ import annotations

import functools

import numpy as np

from cuconv.ops.conv2d import conv2d, conv2d_backward
from cuconv.ops.spectral import spectral_filter2d, spectral_filter2d_backward
from cuconv.reference import conv2d as conv_reference
from cuconv.reference import spectral as reference

from .harness import (FWD_BWD, BenchCase, CheckRow, OpCheck, random_inputs, self_check_op, tensor_bytes, timed_dtypes,
                      timed_layers, torch_baselines)

NAME = "spectral"
OPS = ("spectral_filter2d",)  # the public ops it checks and times


# --- self-check ---

def _module(a) -> str:
    return type(a).__module__.split(".")[0]


def _complex_of(re, im):
    """re + i*im as the complex type that pairs with their dtype (complex64 for 16-bit)."""
    if _module(re) == "torch":
        import torch

        wide = torch.float64 if re.dtype == torch.float64 else torch.float32
        return torch.complex(re.to(wide), im.to(wide))
    wide = np.float64 if re.dtype == np.float64 else np.float32
    if isinstance(re, np.ndarray):
        return np.asarray(re, wide) + 1j * np.asarray(im, wide)
    import cupy

    return cupy.asarray(re, wide) + 1j * cupy.asarray(im, wide)


def _filter_forward(x, f_re, f_im):
    return spectral_filter2d(x, _complex_of(f_re, f_im))


def _filter_backward(gy, x, f_re, f_im):
    gx, gf = spectral_filter2d_backward(gy, x, _complex_of(f_re, f_im))
    return gx, gf.real, gf.imag


def _complex128(f_re, f_im):
    return np.asarray(f_re, np.float64) + 1j * np.asarray(f_im, np.float64)


def _reference_forward(x, f_re, f_im):
    return reference.spectral_filter2d(x, _complex128(f_re, f_im))


def _reference_backward(gy, x, f_re, f_im):
    gx, gf = reference.spectral_filter2d_backward(gy, x, _complex128(f_re, f_im))
    return gx, gf.real, gf.imag


def _torch_filter(F, x, f_re, f_im):
    """torch.fft in float32 (float64 for float64) on the given values, rounded to x's dtype."""
    import torch

    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    h, w = x.shape[-2:]
    spectrum = torch.fft.rfft2(x.to(wide), norm="ortho") * torch.complex(f_re.to(wide), f_im.to(wide))
    return torch.fft.irfft2(spectrum, s=(h, w), norm="ortho").to(x.dtype)


def _filter_shapes(b, c, h, w, shared):
    f = (1 if shared else b, c, h, w // 2 + 1)
    return ((b, c, h, w), f, f)


FILTER = OpCheck("spectral_filter2d", _filter_forward, _filter_backward, _reference_forward, _reference_backward, _torch_filter,
                 ("input", "filter.re", "filter.im"))
FILTER_CHECK = [
    ("filter 6x8 per-sample", _filter_shapes(2, 3, 6, 8, False), {}),
    ("filter 7x9 shared", _filter_shapes(3, 2, 7, 9, True), {}),
    ("filter 14x14 shared", _filter_shapes(2, 4, 14, 14, True), {}),
]

CONV_FFT = OpCheck("conv2d_fft", functools.partial(conv2d, algorithm="fft"),
                   functools.partial(conv2d_backward, algorithm="fft"), conv_reference.conv2d, conv_reference.conv2d_backward,
                   lambda F, x, w, b, **params: F.conv2d(x, w, b, **params), ("input", "weight", "bias"))
CONV_CHECK = [
    ("conv fft dw 9x9 same", ((2, 3, 17, 15), (3, 1, 9, 9), (3,)), dict(padding="same", groups=3)),
    ("conv fft dense 7x7 p3", ((2, 4, 13, 12), (5, 4, 7, 7), (5,)), dict(padding=3)),
    ("conv fft dw m2 5x6 d2 valid", ((1, 2, 16, 19), (4, 1, 5, 6), None), dict(dilation=2, groups=2)),
]


def self_check(dtypes, backends, rng, torch_module=None) -> list[CheckRow]:
    return (self_check_op(FILTER, FILTER_CHECK, dtypes, backends, rng, torch_module)
            + self_check_op(CONV_FFT, CONV_CHECK, dtypes, backends, rng, torch_module))


# --- benchmark ---

# AFFNet-like stages: (label, batch, channels, size)
AFFNET = [
    ("AFF 64x96 56x56", 64, 96, 56),
    ("AFF 64x192 28x28", 64, 192, 28),
    ("AFF 64x384 14x14", 64, 384, 14),
    ("AFF 64x384 7x7", 64, 384, 7),
]
# Large-kernel convs at 56x56, C=64: (label, batch, kernel, depthwise)
LARGE_KERNELS = [(f"{'dw' if dw else 'dense'} {k}x{k} 64 56", 32 if dw else 8, k, dw)
                 for dw in (True, False) for k in (7, 15, 31, 63)]
QUICK = ("AFF 64x96 56x56", "AFF 64x384 7x7", "dw 31x31 64 56", "dense 15x15 64 56")


def bench_cases(dtypes, quick, torch_module=None) -> list[BenchCase]:
    cases = []
    for dtype in timed_dtypes(dtypes, torch_module):
        cases += [_filter_case(label, dtype, pass_, batch, channels, size, torch_module)
                  for label, batch, channels, size in timed_layers(AFFNET, quick, QUICK) for pass_ in FWD_BWD]
        cases += [_conv_case(label, dtype, pass_, batch, k, depthwise, torch_module)
                  for label, batch, k, depthwise in timed_layers(LARGE_KERNELS, quick, QUICK) for pass_ in FWD_BWD]
    return cases


def _filter_inputs(shapes, dtype, backward, torch):
    """x (dtype), filter (complex64; complex128 for float64) [, gy]: fresh GPU arrays."""
    complex_name = "complex128" if dtype == "float64" else "complex64"

    def make():
        if torch is not None:
            x = torch.randn(shapes[0], device="cuda", dtype=getattr(torch, dtype)).requires_grad_(backward)
            f = torch.randn(shapes[1], device="cuda", dtype=getattr(torch, complex_name)).requires_grad_(backward)
            rest = (torch.randn(shapes[0], device="cuda", dtype=getattr(torch, dtype)),) if backward else ()
            return (x, f, *rest)
        import cupy

        x = cupy.random.standard_normal(shapes[0], dtype=cupy.float32).astype(dtype)
        f = (cupy.random.standard_normal(shapes[1], dtype=cupy.float32)
             + 1j * cupy.random.standard_normal(shapes[1], dtype=cupy.float32)).astype(complex_name)
        rest = (cupy.random.standard_normal(shapes[0], dtype=cupy.float32).astype(dtype),) if backward else ()
        return (x, f, *rest)

    return make


def _filter_case(label, dtype, pass_, batch, channels, size, torch) -> BenchCase:
    backward = pass_ == "fwd+bwd"
    x_shape, f_shape = (batch, channels, size, size), (batch, channels, size, size // 2 + 1)
    complex_bytes = 8 if dtype != "float64" else 16
    # Compulsory traffic: x, filter and y once (forward); gy, x, filter, grad_x, grad_filter too (backward).
    one = tensor_bytes([x_shape], dtype)
    filt = float(np.prod(f_shape) * complex_bytes)
    traffic = 2 * one + filt + ((3 * one + 2 * filt) if backward else 0)

    def run_cuconv(x, f, gy=None):
        spectral_filter2d(x, f)
        if backward:
            spectral_filter2d_backward(gy, x, f)

    baselines = {}
    if torch is not None:
        def run_torch(x, f, gy=None):
            wide = torch.float64 if x.dtype == torch.float64 else torch.float32
            y = torch.fft.irfft2(torch.fft.rfft2(x.to(wide), norm="ortho") * f, s=(size, size), norm="ortho")
            y = y.to(x.dtype)
            if backward:
                torch.autograd.grad(y, (x, f), gy)

        baselines = {"torch.fft": (lambda s: s, run_torch)}
    return BenchCase(NAME, label, dtype, pass_, 0.0, _filter_inputs((x_shape, f_shape), dtype, backward, torch),
                     run_cuconv, baselines, bytes_moved=traffic)


def _conv_case(label, dtype, pass_, batch, k, depthwise, torch) -> BenchCase:
    backward = pass_ == "fwd+bwd"
    channels, size = 64, 56
    groups = channels if depthwise else 1
    shapes = [(batch, channels, size, size), (channels, channels // groups, k, k)]
    scales = [1.0, (channels // groups * k * k) ** -0.5]
    y_shape = (batch, channels, size, size)  # 'same'
    # Work of the direct convolution (what cuDNN would do without its own FFT path):
    # the TFLOP/s column is "effective" for the fft algorithm.
    flops = 2.0 * batch * channels * (channels // groups) * k * k * size * size * (3 if backward else 1)
    if backward:
        shapes, scales = shapes + [y_shape], scales + [1.0]

    def run_cuconv(x, w, gy=None):
        conv2d(x, w, padding="same", groups=groups, algorithm="fft")
        if backward:
            conv2d_backward(gy, x, w, padding="same", groups=groups, wrt=("input", "weight"), algorithm="fft")

    baselines = {}
    if torch is not None:
        def run_torch(x, w, gy=None):
            y = torch.nn.functional.conv2d(x, w, padding="same", groups=groups)
            if backward:
                torch.autograd.grad(y, (x, w), gy)

        baselines = torch_baselines(torch, run_torch)
    return BenchCase(NAME, f"fft {label}", dtype, pass_, flops, random_inputs(shapes, dtype, backward, scales, torch),
                     run_cuconv, baselines, bytes_moved=tensor_bytes(shapes + [y_shape], dtype))
