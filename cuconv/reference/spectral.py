"""float64 NumPy ground truth for spectral_filter2d, forward and backward, written from
the chain rule step by step (numpy.fft, norm='ortho' throughout). It shares nothing
with the op's shortcut (which computes dL/dx as the forward with the conjugate
filter): here every step is torch.fft's own backward formula.

Complex gradients follow PyTorch: for a real loss L and complex z, dL/dz means
dL/dRe z + i dL/dIm z. conv2d(algorithm='fft') has no reference of its own: it is
checked against cuconv.reference.conv2d (the direct convolution).
"""

from __future__ import annotations

import numpy as np


def _as_arrays(x, filter):
    x = np.asarray(x, np.float64)
    filter = np.asarray(filter, np.complex128)
    b, c, h, w = x.shape
    assert filter.shape in ((b, c, h, w // 2 + 1), (1, c, h, w // 2 + 1)), (x.shape, filter.shape)
    return x, filter


def spectral_filter2d(x, filter):
    """irfft2(rfft2(x) * filter, s=(H, W)); filter [B or 1, C, H, W//2+1] complex."""
    x, filter = _as_arrays(x, filter)
    h, w = x.shape[-2:]
    return np.fft.irfft2(np.fft.rfft2(x, norm="ortho") * filter, s=(h, w), norm="ortho")


def spectral_filter2d_backward(gy, x, filter):
    """(grad_x, grad_filter) of sum(gy * spectral_filter2d(x, filter))."""
    gy = np.asarray(gy, np.float64)
    x, filter = _as_arrays(x, filter)
    h, w = x.shape[-2:]
    wf = w // 2 + 1
    spectrum = np.fft.rfft2(x, norm="ortho")  # X
    # Through y = irfft2(Z): dL/dZ = rfft2(gy), with every stored column whose conjugate
    # mirror (column W - k) is not stored counted twice: k = 1 .. W - Wf.
    grad_z = np.fft.rfft2(gy, norm="ortho")
    grad_z[..., 1 : w - wf + 1] *= 2
    # Through Z = X * F: dL/dF = dL/dZ * conj(X), dL/dX = dL/dZ * conj(F).
    grad_filter = grad_z * np.conj(spectrum)
    if filter.shape[0] == 1:
        grad_filter = grad_filter.sum(axis=0, keepdims=True)  # one filter used by every sample
    grad_spectrum = grad_z * np.conj(filter)
    # Through X = rfft2(x): the gradient of the stored half spectrum, zero elsewhere,
    # through the adjoint (inverse, 'ortho') full transform; x is real.
    full = np.zeros((*grad_spectrum.shape[:-1], w), np.complex128)
    full[..., :wf] = grad_spectrum
    grad_x = np.fft.ifft2(full, norm="ortho").real
    return grad_x, grad_filter
