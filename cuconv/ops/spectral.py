"""Spectral ops: spectral_filter2d (the adaptive frequency filter of AFFNet), forward and
hand-written backward, and conv2d's algorithm='fft' (registered in conv2d's algorithm
table, conv2d.CONV2D).

The FFTs run in the FFT library of the backend's array module: cuFFT through
`cupy.fft` on the GPU (on the caller's stream), pocketfft through `scipy.fft` on the
host (scipy keeps float32 in float32). The pointwise complex products and the filter
gradient's batch reduction are the kernels of kernels_cu/spectral.cu (formulas, the
complex-gradient convention and the thread mapping are documented there).

dtypes: float32 input with a complex64 filter, float64 with complex128; float16 and
bfloat16 inputs are computed in float32 (their filter is complex64; the spectra are
complex64) and the real outputs come back in the input's dtype.

Workspaces (spectral_filter2d): one complex spectrum [B, C, H, W/2+1] in the
accumulator precision (two in the backward when both gradients are wanted), the
inverse FFT's real result [B, C, H, W], and for a 16-bit input its float32 copy. The
pointwise kernels write in place over the spectrum they read.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .. import _arrays
from .._kernels import KernelModule
from .._registry import Example, OpDef, register_op
from ._algorithms import Algorithm
from ._common import Call, check_grad_output, parse_wrt
from .conv2d import CONV2D, ConvGeometry, launch_grad_bias

KERNELS = KernelModule(
    "spectral.cu",
    kernels=("spectral_filter2d_fwd", "spectral_filter2d_bwd_input", "spectral_filter2d_bwd_filter",
             "spectral_widen", "spectral_narrow"),
    params_struct="SpectralParams",
)
_BLOCK = 256
_ACC = {"float16": "float32", "bfloat16": "float32", "float32": "float32", "float64": "float64"}
_COMPLEX = {"float32": "complex64", "float64": "complex128"}


# --- plumbing shared by both ops ---

@contextlib.contextmanager
def _fft_backend(call: Call):
    """(fft module, array module) of the call's backend; on the GPU the FFTs run on the
    call's device and stream, ordered with its kernel launches."""
    if call.backend == "interpret":
        import scipy.fft

        yield scipy.fft, np
    else:
        import cupy
        import cupy.fft

        with call.on_device():
            yield cupy.fft, cupy


def _params(**values) -> dict:
    fields = dict(batch=0, channels=0, height=0, freq_w=0, filter_batch=1, double_lo=0, double_hi=0, count=0)
    fields.update(values)
    return fields


def _wrap(call: Call, data, dtype: str) -> _arrays.Array:
    """An array the FFT library returned, as a kernel operand (launch reads only .data)."""
    framework = "numpy" if isinstance(data, np.ndarray) else "cupy"
    return _arrays.Array(data, dtype, framework, call.anchor.device, None)


def _fresh(call: Call, data):
    """Records an array the FFT library (or the array module) allocated for this call."""
    _arrays.record_allocation(data.shape, str(data.dtype))
    return data


def _acc_operand(call: Call, name: str):
    """The named real argument as a contiguous array of the accumulator dtype: itself
    for float32 / float64, a float32 copy (spectral_widen) for float16 / bfloat16."""
    a = call.operand(name)
    acc = _ACC[call.dtype]
    if a.dtype == acc:
        return a.data
    out = call.empty(a.shape, acc)
    n = int(np.prod(a.shape))
    call.launch(KERNELS, "spectral_widen", -(-n // _BLOCK), _BLOCK, _params(count=n), a, out)
    return out.data


def _narrow(call: Call, data, shape) -> _arrays.Array:
    """A new output of the call's dtype holding `data` (accumulator dtype, C-contiguous)
    rounded to it (spectral_narrow; an exact copy for float32 / float64)."""
    out = call.empty(shape)
    n = int(np.prod(shape))
    call.launch(KERNELS, "spectral_narrow", -(-n // _BLOCK), _BLOCK, _params(count=n),
                _wrap(call, data, _ACC[call.dtype]), out)
    return out


def _rfft2(fft, xp, a, s=None):
    """rfft2 over the last two axes (norm='ortho' when s is None, else unnormalised with
    zero padding to s); an empty batch gives an empty spectrum without calling the library."""
    rows, cols = a.shape[-2:] if s is None else s
    if a.size == 0:
        dtype = np.complex64 if a.dtype == np.float32 else np.complex128
        return xp.zeros((*a.shape[:-2], rows, cols // 2 + 1), dtype)
    return fft.rfft2(a, s=s, norm="ortho" if s is None else "backward")


def _irfft2(fft, xp, a, s, ortho: bool):
    if a.size == 0:
        dtype = np.float32 if a.dtype == np.complex64 else np.float64
        return xp.zeros((*a.shape[:-2], *s), dtype)
    return fft.irfft2(a, s=s, norm="ortho" if ortho else "backward")


# --- spectral_filter2d ---

def _filter_shapes(op: str, call: Call):
    """(B, C, H, W, filter batch); ValueError naming the argument and the shapes."""
    x_shape, f_shape = call.shape("input"), call.shape("filter")
    if len(x_shape) != 4:
        raise ValueError(f"{op}: input must be 4-D [batch, channels, height, width], got shape {x_shape}")
    batch, channels, h, w = x_shape
    if h < 1 or w < 1:
        raise ValueError(f"{op}: input height and width must be positive, got shape {x_shape}")
    expected = f"[{batch} or 1, {channels}, {h}, {w // 2 + 1}] (W//2+1 = {w // 2 + 1} frequency columns)"
    if len(f_shape) != 4 or f_shape[1:] != (channels, h, w // 2 + 1) or f_shape[0] not in (batch, 1):
        raise ValueError(f"{op}: filter must have shape {expected} for input {x_shape}, got {f_shape}")
    return batch, channels, h, w, f_shape[0]


def _spectrum_params(batch, channels, h, w, filter_batch, doubled: bool = False) -> dict:
    wf = w // 2 + 1
    # The columns 1 <= k < W - Wf + 1 stand for two conjugate columns of the full spectrum.
    return _params(batch=batch, channels=channels, height=h, freq_w=wf, filter_batch=filter_batch,
                   double_lo=1 if doubled else 0, double_hi=w - wf + 1 if doubled else 0)


def spectral_filter2d(input, filter):
    """y = irfft2(rfft2(input, norm='ortho') * filter, s=(H, W), norm='ortho').

    input  [B, C, H, W] real (float16, bfloat16, float32, float64)
    filter [B or 1, C, H, W//2+1] complex (complex64; complex128 with a float64 input);
           a leading 1 shares one filter across the batch
    returns [B, C, H, W] in input's dtype, framework and device."""
    op = "spectral_filter2d"
    call = Call(op, input=input, filter=filter, complex_args=("filter",))
    batch, channels, h, w, fb = _filter_shapes(op, call)
    params = _spectrum_params(batch, channels, h, w, fb)
    x = _acc_operand(call, "input")
    f = call.operand("filter")
    with _fft_backend(call) as (fft, xp):
        spectrum = _fresh(call, _rfft2(fft, xp, x))
        z = _wrap(call, spectrum, _COMPLEX[_ACC[call.dtype]])
        call.launch(KERNELS, "spectral_filter2d_fwd", -(-spectrum.size // _BLOCK), _BLOCK, params, z, f, z)
        y = _fresh(call, _irfft2(fft, xp, spectrum, (h, w), ortho=True))
    return call.export(_narrow(call, y, (batch, channels, h, w)))


def spectral_filter2d_backward(grad_output, input, filter, wrt=None):
    """Gradients of spectral_filter2d: (grad_input [B, C, H, W] in input's dtype,
    grad_filter in filter's shape and complex dtype: dL/dRe + i dL/dIm, PyTorch's
    convention, summed over the batch for a shared filter); None for an argument not in
    `wrt` (a name or tuple of names among input, filter)."""
    op = "spectral_filter2d_backward"
    call = Call(op, input=input, grad_output=grad_output, filter=filter, complex_args=("filter",))
    batch, channels, h, w, fb = _filter_shapes(op, call)
    check_grad_output(op, call, (batch, channels, h, w))
    wanted = parse_wrt(op, wrt, ("input", "filter"))
    complex_dtype = _COMPLEX[_ACC[call.dtype]]
    gy = _acc_operand(call, "grad_output")
    f = call.operand("filter")
    grad_input = grad_filter = None
    with _fft_backend(call) as (fft, xp):
        grad_spectrum = _fresh(call, _rfft2(fft, xp, gy))
        gs = _wrap(call, grad_spectrum, complex_dtype)
        if "filter" in wanted:  # first: the input gradient below overwrites grad_spectrum
            spectrum = _wrap(call, _fresh(call, _rfft2(fft, xp, _acc_operand(call, "input"))), complex_dtype)
            grad_filter = call.empty(call.shape("filter"), complex_dtype)
            call.launch(KERNELS, "spectral_filter2d_bwd_filter", -(-grad_filter.data.size // _BLOCK), _BLOCK,
                        _spectrum_params(batch, channels, h, w, fb, doubled=True), gs, spectrum, grad_filter)
        if "input" in wanted:
            call.launch(KERNELS, "spectral_filter2d_bwd_input", -(-grad_spectrum.size // _BLOCK), _BLOCK,
                        _spectrum_params(batch, channels, h, w, fb), gs, f, gs)
            gx = _fresh(call, _irfft2(fft, xp, grad_spectrum, (h, w), ortho=True))
            grad_input = _narrow(call, gx, (batch, channels, h, w))
    return call.export(grad_input), call.export(grad_filter)


# --- conv2d, algorithm='fft' ---
#
# Stride 1 only. With span = dilation*(k-1) + 1 per axis and the top/left padding p,
# every spatial axis is transformed at a length N = next_fast_len(max(p + size,
# out + span - 1)) (5-smooth), long enough that no circular wrap reaches an output:
#   x0 = input at the origin, zero-padded to N;  w0 = the dilated kernel (taps at
#   ky*dh, kx*dw) zero-padded to N;  hats are unnormalised rfft2 over (N_h, N_w).
#   forward:      c = irfft2(sum_c x0_hat[b,c] * conj(w0_hat[o,c]))    (circular correlation)
#                 y[b,o,oy,ox] = c[(oy - ph) mod N_h, (ox - pw) mod N_w] + bias[o]
#   grad input:   g = irfft2(sum_o gy0_hat[b,o] * w0_hat[o,c])         (circular convolution)
#                 dL/dx[b,c,iy,ix] = g[iy + ph, ix + pw]
#   grad weight:  r = irfft2(sum_b x0_hat[b,c] * conj(gy0_hat[b,o]))   (circular correlation)
#                 dL/dw[o,c,ky,kx] = r[(ky*dh - ph) mod N_h, (kx*dw - pw) mod N_w]
#   grad bias:    conv2d's own kernel (conv2d_bwd_bias).
# Channel contraction: groups=1 is a batched complex matmul over the frequencies
# (the array module's matmul: cuBLAS / the host BLAS, on frequency-major copies of the
# spectra); depthwise (groups = Cin, weight [Cin*m, 1, kh, kw]) is pointwise: for m = 1
# the spectral.cu kernels (the grad-weight batch sum in fixed order), for m > 1
# broadcasting in the array module. Everything is computed in the accumulator precision
# (float32 for 16-bit inputs) and rounded once at the end.
# Workspaces: the spectra of input, weight and output (each [.., N_h, N_w/2+1] complex),
# frequency-major copies of them for groups=1, and the real inverse transform [.., N_h, N_w].

# 'auto' picks fft from this many kernel taps on: a conservative guess, NOT measured
# (no GPU was available); see docs/spectral_filter2d.md.
FFT_AUTO_MIN_TAPS = 15 * 15


def fft_supported(geom: ConvGeometry) -> str | None:
    """None when algorithm='fft' can run this conv, else why not."""
    if geom.stride != (1, 1):
        return f"stride 1 (got stride {geom.stride})"
    if geom.groups != 1 and geom.groups != geom.in_channels:
        return (f"groups=1 or depthwise groups=in_channels (got groups={geom.groups} with "
                f"{geom.in_channels} input channels)")
    return None


def fft_preferred(geom: ConvGeometry) -> bool:
    """The 'auto' rule: fft for supported convs with kh*kw >= FFT_AUTO_MIN_TAPS."""
    return fft_supported(geom) is None and geom.kernel_h * geom.kernel_w >= FFT_AUTO_MIN_TAPS


def _fft_sizes(geom: ConvGeometry) -> tuple[int, int]:
    import scipy.fft

    span = (geom.dilation[0] * (geom.kernel_h - 1) + 1, geom.dilation[1] * (geom.kernel_w - 1) + 1)
    need_h = max(geom.pad[0] + geom.in_h, geom.out_h + span[0] - 1)
    need_w = max(geom.pad[1] + geom.in_w, geom.out_w + span[1] - 1)
    return scipy.fft.next_fast_len(need_h, real=True), scipy.fft.next_fast_len(need_w, real=True)


def _weight_spectrum(call: Call, geom: ConvGeometry, fft, xp, size):
    """rfft2 of the dilated kernel (taps at ky*dh, kx*dw), zero-padded to `size`."""
    w = _acc_operand(call, "weight")
    dh, dw = geom.dilation
    if (dh, dw) != (1, 1):
        dilated = _fresh(call, xp.zeros((*w.shape[:2], dh * (geom.kernel_h - 1) + 1, dw * (geom.kernel_w - 1) + 1),
                                        w.dtype))
        dilated[:, :, ::dh, ::dw] = w
        w = dilated
    return _fresh(call, _rfft2(fft, xp, w, size))


def _cyclic(xp, start: int, count: int, n: int, step: int = 1):
    """Indices (start + i*step) mod n for i < count."""
    return xp.asarray((start + step * np.arange(count)) % n)


def _frequency_major(xp, a):
    """[P, Q, Nh, Nf] -> contiguous [Nh*Nf, P, Q] (one matrix per frequency)."""
    p, q = a.shape[:2]
    return xp.ascontiguousarray(a.reshape(p, q, -1).transpose(2, 0, 1))


def _channel_major(xp, a, shape):
    """[Nh*Nf, P, Q] -> [P, Q, Nh, Nf]."""
    return a.transpose(1, 2, 0).reshape(shape)


def _depthwise_multiply(call: Call, kernel: str, a, b_, params: dict, dtype: str):
    """spectral_filter2d_fwd (a * b_) or _bwd_input (a * conj(b_)) in place on a; b_ is
    shared by the batch ([1, C, ...])."""
    target = _wrap(call, a, dtype)
    call.launch(KERNELS, kernel, -(-a.size // _BLOCK), _BLOCK, params, target, _wrap(call, b_, dtype), target)
    return a


def conv2d_fft(call: Call, geom: ConvGeometry):
    """conv2d's forward by FFT; `call` holds input, weight and (optional) bias."""
    size = _fft_sizes(geom)
    b, cin, cout = geom.batch, geom.in_channels, geom.out_channels
    cdtype = _COMPLEX[_ACC[call.dtype]]
    x = _acc_operand(call, "input")
    bias = _acc_operand(call, "bias") if call.shape("bias") is not None else None
    with _fft_backend(call) as (fft, xp):
        xs = _fresh(call, _rfft2(fft, xp, x, size))
        ws = _weight_spectrum(call, geom, fft, xp, size)
        spectrum_shape = (b, cout, size[0], size[1] // 2 + 1)
        if geom.groups == 1:
            ys = _fresh(call, xp.matmul(_fresh(call, _frequency_major(xp, xs)),
                                        _fresh(call, _frequency_major(xp, ws).conj().transpose(0, 2, 1))))
            ys = _channel_major(xp, ys, spectrum_shape)
        elif cout == cin:  # depthwise, multiplier 1: y_hat = x_hat * conj(w_hat)
            params = _params(batch=b, channels=cin, height=size[0], freq_w=size[1] // 2 + 1, filter_batch=1)
            ys = _depthwise_multiply(call, "spectral_filter2d_bwd_input", xs, ws, params, cdtype)
        else:  # depthwise, multiplier m
            m = cout // cin
            ys = _fresh(call, (xs[:, :, None] * ws.reshape(cin, m, *ws.shape[2:]).conj()[None]).reshape(spectrum_shape))
        c = _fresh(call, _irfft2(fft, xp, ys, size, ortho=False))
        rows = _cyclic(xp, -geom.pad[0], geom.out_h, size[0])
        cols = _cyclic(xp, -geom.pad[1], geom.out_w, size[1])
        y = _fresh(call, xp.ascontiguousarray(c[:, :, rows[:, None], cols[None, :]]))
        if bias is not None:
            y += bias[None, :, None, None]
    return call.export(_narrow(call, y, geom.output_shape))


def conv2d_fft_gradients(call: Call, geom: ConvGeometry, wanted, has_bias: bool):
    """(grad_input, grad_weight, grad_bias) of conv2d by FFT; `call` holds grad_output,
    input and weight."""
    size = _fft_sizes(geom)
    b, cin, cout = geom.batch, geom.in_channels, geom.out_channels
    cdtype = _COMPLEX[_ACC[call.dtype]]
    freq = (size[0], size[1] // 2 + 1)
    grad_input = grad_weight = grad_bias = None
    gy = _acc_operand(call, "grad_output") if {"input", "weight"} & wanted else None
    with _fft_backend(call) as (fft, xp):
        gys = _fresh(call, _rfft2(fft, xp, gy, size)) if gy is not None else None
        if "weight" in wanted:  # first: the depthwise (m = 1) input gradient overwrites gys in place
            xs = _fresh(call, _rfft2(fft, xp, _acc_operand(call, "input"), size))
            if geom.groups == 1:
                # r_hat[o, c] = sum_b conj(gy_hat[b, o]) x_hat[b, c]
                rs = _fresh(call, xp.matmul(_fresh(call, _frequency_major(xp, gys).conj().transpose(0, 2, 1)),
                                            _fresh(call, _frequency_major(xp, xs))))
                rs = _channel_major(xp, rs, (cout, cin, *freq))
            elif cout == cin:  # sum_b x_hat[b, c] * conj(gy_hat[b, c]), fixed batch order
                rs = call.empty((1, cin, *freq), cdtype)
                params = _params(batch=b, channels=cin, height=freq[0], freq_w=freq[1], filter_batch=1)
                call.launch(KERNELS, "spectral_filter2d_bwd_filter", -(-rs.data.size // _BLOCK), _BLOCK, params,
                            _wrap(call, xs, cdtype), _wrap(call, gys, cdtype), rs)
                rs = rs.data.reshape(cout, 1, *freq)
            else:
                m = cout // cin
                rs = _fresh(call, (xs[:, :, None] * gys.reshape(b, cin, m, *freq).conj()).sum(axis=0))
                rs = rs.reshape(cout, 1, *freq)
            r = _fresh(call, _irfft2(fft, xp, rs, size, ortho=False))
            rows = _cyclic(xp, -geom.pad[0], geom.kernel_h, size[0], geom.dilation[0])
            cols = _cyclic(xp, -geom.pad[1], geom.kernel_w, size[1], geom.dilation[1])
            gw = _fresh(call, xp.ascontiguousarray(r[:, :, rows[:, None], cols[None, :]]))
            grad_weight = _narrow(call, gw, call.shape("weight"))
        if "input" in wanted:
            ws = _weight_spectrum(call, geom, fft, xp, size)
            if geom.groups == 1:
                gxs = _fresh(call, xp.matmul(_fresh(call, _frequency_major(xp, gys)),
                                             _fresh(call, _frequency_major(xp, ws))))
                gxs = _channel_major(xp, gxs, (b, cin, *freq))
            elif cout == cin:  # gx_hat = gy_hat * w_hat, in place
                params = _params(batch=b, channels=cin, height=freq[0], freq_w=freq[1], filter_batch=1)
                gxs = _depthwise_multiply(call, "spectral_filter2d_fwd", gys, ws, params, cdtype)
            else:
                m = cout // cin
                gxs = _fresh(call, (gys.reshape(b, cin, m, *freq) * ws.reshape(cin, m, *freq)[None]).sum(axis=2))
            g = _fresh(call, _irfft2(fft, xp, gxs, size, ortho=False))
            (ph, pw), (h, w) = geom.pad, (geom.in_h, geom.in_w)
            gx = _fresh(call, xp.ascontiguousarray(g[:, :, ph : ph + h, pw : pw + w]))
            grad_input = _narrow(call, gx, (b, cin, h, w))
    if "bias" in wanted and has_bias:
        grad_bias = call.empty((cout,))
        launch_grad_bias(call, geom, call.operand("grad_output"), grad_bias)
    return call.export(grad_input), call.export(grad_weight), call.export(grad_bias)


CONV2D.register(Algorithm("fft", lambda geom, dtype: fft_supported(geom), forward=conv2d_fft,
                          gradients=conv2d_fft_gradients, rank=3, preferred=fft_preferred))


def _output_shape(op, s):
    return s.shape("input")


register_op(OpDef(spectral_filter2d, spectral_filter2d_backward, arrays=("input", "filter"),
                  output_shape=_output_shape, complex_arrays=("filter",),
                  autocast=False,  # torch's FFTs are not autocast either
                  examples=(Example(dict(input=(2, 3, 6, 7), filter=(1, 3, 6, 4))),
                            Example(dict(input=(2, 2, 5, 8), filter=(2, 2, 5, 5))))))
